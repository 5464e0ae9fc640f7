//! The per-job overlap lock: `flock` on `SP_LOCKFILE`, taken in the invoking process before
//! forking and held by the daemon for the life of the run (defect D-15: no check-then-write,
//! no trust in recycled PIDs).
//!
//! A `flock` belongs to the open file description, so it survives the fork while the daemon
//! keeps the [`File`]; std opens files close-on-exec, so the job never inherits it; and the
//! kernel drops it when the last descriptor closes, even if the wrapper is killed. The file
//! holds the owner's PID as information for the conflict message only. It is never deleted:
//! unlinking a lock file races with a newcomer that has just opened the old inode.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// The outcome of trying to take the lock.
#[derive(Debug)]
pub enum LockState {
    /// Overlap is allowed; no lock is taken.
    NotUsed,
    /// We hold the lock.
    Held(Held),
    /// The job must not run; the message explains why (conflict, or the lock file could not
    /// be used). It is reported to the master as the run's output with retcode 254.
    Refused(String),
}

/// A lock we hold. Dropping it releases the lock.
#[derive(Debug)]
pub struct Held {
    /// Always `Some` until [`Held::leave`] takes it.
    file: Option<File>,
    path: PathBuf,
}

/// Tries to take the lock for `job` at `path`.
pub fn acquire(path: &Path, job: &str) -> LockState {
    match try_acquire(path, job) {
        Ok(state) => state,
        Err(e) => LockState::Refused(format!("Failed to write lockfile {}: {e}", path.display())),
    }
}

fn try_acquire(path: &Path, job: &str) -> io::Result<LockState> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)?;
    match file.try_lock() {
        Ok(()) => {
            let mut held = Held {
                file: Some(file),
                path: path.to_owned(),
            };
            held.record_pid(std::process::id())?;
            Ok(LockState::Held(held))
        }
        Err(TryLockError::WouldBlock) => {
            let mut text = String::new();
            // The owner may be rewriting its PID at this very moment; an empty or odd
            // content only makes the message less precise.
            let _ = file.read_to_string(&mut text);
            let pid = text.trim();
            let pid = if pid.parse::<u32>().is_ok() {
                pid
            } else {
                "unknown"
            };
            Ok(LockState::Refused(format!(
                "Job {job} already running (PID {pid}), overlap not allowed"
            )))
        }
        Err(TryLockError::Error(e)) => Err(e),
    }
}

impl Held {
    /// Writes `pid` as the owner. The daemon calls this once it knows its own PID.
    pub fn record_pid(&mut self, pid: u32) -> io::Result<()> {
        let Some(file) = self.file.as_mut() else {
            return Ok(());
        };
        file.set_len(0)?;
        file.seek(SeekFrom::Start(0))?;
        writeln!(file, "{pid}")
    }

    /// Closes this process's descriptor without touching the file. The invoking process
    /// calls this after forking: the daemon's descriptor keeps the lock, and clearing the
    /// PID here would erase the daemon's.
    pub fn leave(mut self) {
        self.file.take();
    }

    /// The lock file's descriptor, which the daemon must keep open.
    pub fn raw_fd(&self) -> Option<std::os::fd::RawFd> {
        use std::os::fd::AsRawFd;
        self.file.as_ref().map(AsRawFd::as_raw_fd)
    }

    /// The lock file's path, for log messages.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        // Clear the PID while still holding the lock, so nobody reads a stale owner; closing
        // the file then releases the lock.
        if let Some(file) = self.file.take() {
            let _ = file.set_len(0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_taker_is_refused_with_the_owner_pid_until_release() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/job.lock");
        let LockState::Held(first) = acquire(&path, "job") else {
            panic!("first must hold")
        };
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            format!("{}\n", std::process::id())
        );
        match acquire(&path, "job") {
            LockState::Refused(msg) => assert_eq!(
                msg,
                format!(
                    "Job job already running (PID {}), overlap not allowed",
                    std::process::id()
                )
            ),
            other => panic!("expected a refusal, got {other:?}"),
        }
        drop(first);
        assert!(matches!(acquire(&path, "job"), LockState::Held(_)));
    }

    #[test]
    fn unusable_path_is_refused_with_the_reason() {
        match acquire(Path::new("/proc/sp-wrapper-test/job.lock"), "job") {
            LockState::Refused(msg) => {
                assert!(msg.starts_with("Failed to write lockfile"), "{msg}")
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
    }
}
