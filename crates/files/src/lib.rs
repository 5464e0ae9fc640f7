//! Files and directories only the master's own user can read: its state, job logs, spools and
//! shipping queues hold job output and run tokens. Everything the master creates goes through
//! here, so the modes are set at creation (never a window with wider ones) whatever the
//! process's umask.

// What no other crate uses is `pub(crate)`, so the compiler reports it once nothing calls it.
#![warn(unreachable_pub)]

use std::fs::{DirBuilder, File, OpenOptions, Permissions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// Mode of the directories the master creates.
pub(crate) const DIR_MODE: u32 = 0o700;
/// Mode of the files the master creates.
pub(crate) const FILE_MODE: u32 = 0o600;

/// Creates `dir` and any missing parents, each private. Existing directories keep their mode
/// (an operator may have chosen a group on purpose).
pub fn create_dir(dir: &Path) -> io::Result<()> {
    DirBuilder::new().recursive(true).mode(DIR_MODE).create(dir)
}

/// Opens `path` for appending, creating it private when it does not exist.
pub fn open_append(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(FILE_MODE)
        .open(path)
}

/// Opens `path` for reading and appending, creating it private when it does not exist.
pub fn open_read_append(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .create(true)
        .read(true)
        .append(true)
        .mode(FILE_MODE)
        .open(path)
}

/// Writes `contents` to a new or truncated private file.
pub fn write(path: &Path, contents: &[u8]) -> io::Result<()> {
    use std::io::Write;
    let mut file = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(FILE_MODE)
        .open(path)?;
    file.write_all(contents)
}

/// Makes an existing file private if it is readable by others (a database created by an
/// earlier build, say). Returns whether its mode changed.
pub fn restrict_file(path: &Path) -> io::Result<bool> {
    let mode = std::fs::metadata(path)?.permissions().mode();
    if mode & 0o077 == 0 {
        return Ok(false);
    }
    std::fs::set_permissions(path, Permissions::from_mode(mode & 0o700))?;
    Ok(true)
}

/// Whether `path` is a directory others can read or enter.
pub fn is_open_to_others(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.permissions().mode() & 0o077 != 0)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn created_files_and_directories_are_private_whatever_the_umask() {
        let dir = tempfile::tempdir().unwrap();
        let nested = dir.path().join("a/b");
        create_dir(&nested).unwrap();
        assert_eq!(mode(&dir.path().join("a")), 0o700);
        assert_eq!(mode(&nested), 0o700);
        let log = nested.join("x.log");
        open_append(&log).unwrap();
        assert_eq!(mode(&log), 0o600);
        let other = nested.join("y");
        write(&other, b"1").unwrap();
        assert_eq!(mode(&other), 0o600);
        let spool = nested.join("z");
        open_read_append(&spool).unwrap();
        assert_eq!(mode(&spool), 0o600);
    }

    #[test]
    fn an_open_file_is_restricted_once() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("db");
        std::fs::write(&db, b"").unwrap();
        std::fs::set_permissions(&db, Permissions::from_mode(0o644)).unwrap();
        assert!(restrict_file(&db).unwrap());
        assert_eq!(mode(&db), 0o600);
        assert!(!restrict_file(&db).unwrap());
    }
}
