//! The local log `<SP_WRAPPER_LOGDIR>/<job>.log`: one line per event in the original's format
//! `<YYYY-MM-DD HH:MM:SS UTC> [<job_instance>] <message>`. `normal` records start, end,
//! errors and delivery failures; `debug` also every frame; `off` nothing (the original's
//! `normal` logged every ack, which buried the events that matter).
//!
//! Writes go straight to an `O_APPEND` file with one `write` per line, so concurrent wrappers
//! of the same job interleave whole lines, and nothing is lost if the wrapper is killed. The
//! file is opened without following a link (see [`crate::files`]).

use std::fs::File;
use std::io::{self, Write};
use std::path::Path;

use time::OffsetDateTime;

use crate::config::LogLevel;

/// The local log. Cheap to share by reference; writing needs no lock.
#[derive(Debug)]
pub struct Log {
    level: LogLevel,
    file: Option<File>,
    instance: String,
}

impl Log {
    /// Opens (creating the directory if needed) the log for `job`. When the file cannot be
    /// opened the log is disabled and the error returned alongside, so the caller can tell
    /// the master, as the original does.
    pub fn open(level: LogLevel, dir: &Path, job: &str, instance: &str) -> (Self, Option<String>) {
        let mut log = Self {
            level,
            file: None,
            instance: instance.to_owned(),
        };
        if level == LogLevel::Off {
            return (log, None);
        }
        let path = dir.join(format!("{job}.log"));
        match open_append(dir, &path) {
            Ok(file) => {
                log.file = Some(file);
                (log, None)
            }
            Err(e) => {
                let msg = format!(
                    "[WRAPPER LOG ERROR] Failed to setup wrapper logging to {}: {e}\n",
                    path.display()
                );
                (log, Some(msg))
            }
        }
    }

    /// Records a `normal`-level event.
    pub fn info(&self, msg: impl AsRef<str>) {
        self.write(LogLevel::Normal, msg.as_ref());
    }

    /// Records a `debug`-level event.
    pub fn debug(&self, msg: impl AsRef<str>) {
        self.write(LogLevel::Debug, msg.as_ref());
    }

    /// Whether debug lines are recorded (to skip formatting them otherwise).
    pub fn debug_enabled(&self) -> bool {
        self.level >= LogLevel::Debug && self.file.is_some()
    }

    /// Writes a block of text verbatim between two marker lines: used for output that could
    /// not be delivered, which must be kept in full.
    pub fn dump(&self, title: &str, body: &mut dyn FnMut(&mut dyn Write) -> io::Result<()>) {
        let Some(mut file) = self
            .file
            .as_ref()
            .filter(|_| self.level >= LogLevel::Normal)
        else {
            return;
        };
        self.info(format!("--- {title} START ---"));
        let mut out = io::BufWriter::with_capacity(64 * 1024, &mut file);
        let result = body(&mut out).and_then(|()| out.flush());
        drop(out);
        if let Err(e) = result {
            self.info(format!("Could not write {title} to the log: {e}"));
        }
        let _ = file.write_all(b"\n");
        self.info(format!("--- {title} END ---"));
    }

    fn write(&self, level: LogLevel, msg: &str) {
        if level > self.level {
            return;
        }
        let Some(mut file) = self.file.as_ref() else {
            return;
        };
        let now = OffsetDateTime::now_utc();
        let line = format!(
            "{:04}-{:02}-{:02} {:02}:{:02}:{:02} UTC [{}] {}\n",
            now.year(),
            u8::from(now.month()),
            now.day(),
            now.hour(),
            now.minute(),
            now.second(),
            self.instance,
            msg
        );
        // A full disk must not take the job down; the line is simply lost.
        let _ = file.write_all(line.as_bytes());
    }
}

fn open_append(dir: &Path, path: &Path) -> io::Result<File> {
    std::fs::create_dir_all(dir)?;
    crate::files::open_append(path).map_err(io::Error::other)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_filter_lines() {
        let dir = tempfile::tempdir().unwrap();
        let (log, err) = Log::open(LogLevel::Normal, &dir.path().join("d"), "job", "job_1");
        assert!(err.is_none());
        log.info("started");
        log.debug("frame");
        log.dump("OUTPUT", &mut |w| w.write_all(b"all of it"));
        let text = std::fs::read_to_string(dir.path().join("d/job.log")).unwrap();
        assert!(text.contains(" UTC [job_1] started\n"), "{text}");
        assert!(!text.contains("frame"));
        assert!(text.contains("--- OUTPUT START ---\nall of it\n"), "{text}");

        let (off, _) = Log::open(LogLevel::Off, &dir.path().join("off"), "job", "job_1");
        off.info("x");
        assert!(!dir.path().join("off").exists());
    }

    #[test]
    fn unopenable_log_reports_the_original_error_line() {
        let (_, err) = Log::open(LogLevel::Normal, Path::new("/proc/sp-no-such"), "job", "i");
        assert!(
            err.unwrap()
                .starts_with("[WRAPPER LOG ERROR] Failed to setup wrapper logging")
        );
    }
}
