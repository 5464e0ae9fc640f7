//! The per-job overlap lock: `flock` on a lock file, taken in the invoking process before
//! forking and held by the daemon for the life of the run (no check-then-write, no trust in
//! recycled PIDs).
//!
//! A `flock` belongs to the open file description, so it survives the fork while the daemon
//! keeps the [`File`]; the file is opened close-on-exec, so the job never inherits it; and the
//! kernel drops it when the last descriptor closes, even if the wrapper is killed. The file
//! holds the owner's PID as information for the conflict message only. It is never deleted:
//! unlinking a lock file races with a newcomer that has just opened the old inode.
//!
//! By default the lock lives in a directory only the wrapper's user can write
//! ([`default_lock_dir`]), because anyone who can open a lock file can `flock` it and hold the
//! job off for ever, and a world-writable directory such as `/tmp` lets anyone plant a link
//! where root is about to write. A lock file the master names (`SP_LOCKFILE`) is honoured, but
//! opened by the same rules (see [`crate::files`]).

use std::ffi::OsStr;
use std::fs::{File, TryLockError};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use nix::unistd::Uid;

use crate::files::{self, FileError};

/// The lock directory of a wrapper running as root.
pub const ROOT_LOCK_DIR: &str = "/run/saltpeter";

/// Where the overlap lock lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LockPath {
    pub path: PathBuf,
    /// The wrapper's own lock directory that holds `path`, created and checked before use;
    /// `None` for a file the master named, whose directory belongs to the administrator.
    pub private_dir: Option<PathBuf>,
}

impl LockPath {
    /// `<dir>/<job>.lock` in the wrapper's own lock directory.
    pub fn in_private_dir(dir: PathBuf, job: &str) -> Self {
        Self {
            path: dir.join(format!("{job}.lock")),
            private_dir: Some(dir),
        }
    }

    /// A lock file named by the master.
    pub fn given(path: PathBuf) -> Self {
        Self {
            path,
            private_dir: None,
        }
    }
}

/// The wrapper's own lock directory: [`ROOT_LOCK_DIR`] for root; for anyone else (tests,
/// development) `$XDG_RUNTIME_DIR/saltpeter` when that is an absolute path, else
/// `/tmp/saltpeter-<uid>`. Either is created 0700 and checked before use.
pub fn default_lock_dir(euid: Uid, runtime_dir: Option<&OsStr>) -> PathBuf {
    if euid.is_root() {
        return PathBuf::from(ROOT_LOCK_DIR);
    }
    match runtime_dir.map(Path::new).filter(|d| d.is_absolute()) {
        Some(dir) => dir.join("saltpeter"),
        None => PathBuf::from(format!("/tmp/saltpeter-{euid}")),
    }
}

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

/// Why the lock file could not be used.
#[derive(Debug, thiserror::Error)]
enum LockError {
    /// The file system failed us; worded as the original wrapper words it.
    #[error("Failed to write lockfile {}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("Refusing to use the lock directory: {0}")]
    Dir(FileError),
    #[error("Refusing to use the lockfile: {0}")]
    File(FileError),
}

impl LockError {
    fn of_file(path: &Path, e: FileError) -> Self {
        match e {
            FileError::Io { source, .. } => Self::Io {
                path: path.to_owned(),
                source,
            },
            other => Self::File(other),
        }
    }
}

/// Tries to take the lock for `job` at `lock`.
pub fn acquire(lock: &LockPath, job: &str) -> LockState {
    match try_acquire(lock, job) {
        Ok(state) => state,
        Err(e) => LockState::Refused(e.to_string()),
    }
}

fn try_acquire(lock: &LockPath, job: &str) -> Result<LockState, LockError> {
    let path = &lock.path;
    let io_error = |source| LockError::Io {
        path: path.clone(),
        source,
    };
    match &lock.private_dir {
        Some(dir) => files::private_dir(dir).map_err(LockError::Dir)?,
        None => {
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir).map_err(io_error)?;
            }
        }
    }
    let mut file = files::open_own_file(path).map_err(|e| LockError::of_file(path, e))?;
    match file.try_lock() {
        Ok(()) => {
            let mut held = Held {
                file: Some(file),
                path: path.clone(),
            };
            held.record_pid(std::process::id()).map_err(io_error)?;
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
        Err(TryLockError::Error(e)) => Err(io_error(e)),
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
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn given(path: &Path) -> LockPath {
        LockPath::given(path.to_owned())
    }

    #[test]
    fn second_taker_is_refused_with_the_owner_pid_until_release() {
        let dir = tempfile::tempdir().unwrap();
        let lock = given(&dir.path().join("sub/job.lock"));
        let LockState::Held(first) = acquire(&lock, "job") else {
            panic!("first must hold")
        };
        assert_eq!(
            std::fs::read_to_string(&lock.path).unwrap(),
            format!("{}\n", std::process::id())
        );
        match acquire(&lock, "job") {
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
        assert!(matches!(acquire(&lock, "job"), LockState::Held(_)));
    }

    #[test]
    fn unusable_path_is_refused_with_the_reason() {
        match acquire(&given(Path::new("/proc/sp-wrapper-test/job.lock")), "job") {
            LockState::Refused(msg) => {
                assert!(msg.starts_with("Failed to write lockfile"), "{msg}")
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn a_link_at_the_lock_path_is_refused_and_its_target_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, "precious\n").unwrap();
        let path = dir.path().join("job.lock");
        std::os::unix::fs::symlink(&victim, &path).unwrap();
        match acquire(&given(&path), "job") {
            LockState::Refused(msg) => assert_eq!(
                msg,
                format!(
                    "Refusing to use the lockfile: {} is a symbolic link",
                    path.display()
                )
            ),
            other => panic!("expected a refusal, got {other:?}"),
        }
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious\n");
    }

    #[test]
    fn the_private_dir_is_created_and_an_unsafe_one_refused() {
        let base = tempfile::tempdir().unwrap();
        let dir = base.path().join("saltpeter");
        let lock = LockPath::in_private_dir(dir.clone(), "job");
        assert_eq!(lock.path, dir.join("job.lock"));
        let LockState::Held(held) = acquire(&lock, "job") else {
            panic!("must hold")
        };
        drop(held);
        let meta = std::fs::metadata(&dir).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o700);

        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o1777)).unwrap();
        match acquire(&lock, "job") {
            LockState::Refused(msg) => assert_eq!(
                msg,
                format!(
                    "Refusing to use the lock directory: {} is writable by group or others \
                     (mode 1777)",
                    dir.display()
                )
            ),
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn the_default_lock_dir_is_never_shared_tmp() {
        let root = default_lock_dir(Uid::from_raw(0), Some(OsStr::new("/run/user/0")));
        assert_eq!(root, Path::new("/run/saltpeter"));
        let user = Uid::from_raw(1000);
        assert_eq!(
            default_lock_dir(user, Some(OsStr::new("/run/user/1000"))),
            Path::new("/run/user/1000/saltpeter")
        );
        // A relative or absent runtime dir falls back to a per-user directory.
        for runtime in [None, Some(OsStr::new("relative"))] {
            assert_eq!(
                default_lock_dir(user, runtime),
                Path::new("/tmp/saltpeter-1000")
            );
        }
    }
}
