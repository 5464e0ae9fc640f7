//! Opening the files the wrapper creates while it usually runs as root: the overlap lock, the
//! lock directory, the output spool and the local log.
//!
//! Anyone on the minion may plant a symbolic link or a hard link where root is about to open a
//! file, so every file here is opened with `O_NOFOLLOW` (a link as the last component is an
//! error, not a redirection), close-on-exec, and never `O_TRUNC`: emptying a file happens only
//! after `fstat` has shown that the open descriptor is a regular file with one link, owned by
//! the wrapper's effective user. Directories the wrapper keeps its own files in are checked
//! the same way before use: a real directory, not a link, owned by the wrapper's user, and
//! writable by nobody else.

use std::fs::{DirBuilder, File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::libc;
use nix::unistd::Uid;

/// Why a file or directory was not used.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("{} is a symbolic link", path.display())]
    Symlink { path: PathBuf },
    #[error("{} is not a {expected}", path.display())]
    WrongType {
        path: PathBuf,
        expected: &'static str,
    },
    #[error("{} is owned by uid {owner}, not by uid {me}", path.display())]
    Owner { path: PathBuf, owner: u32, me: u32 },
    #[error("{} has {links} hard links", path.display())]
    Links { path: PathBuf, links: u64 },
    #[error("{} is writable by group or others (mode {mode:o})", path.display())]
    Writable { path: PathBuf, mode: u32 },
}

impl FileError {
    fn io(path: &Path, source: io::Error) -> Self {
        // ELOOP from O_NOFOLLOW means the last component was a link: say so plainly.
        if source.raw_os_error() == Some(libc::ELOOP) {
            return Self::Symlink {
                path: path.to_owned(),
            };
        }
        Self::Io {
            path: path.to_owned(),
            source,
        }
    }
}

/// Flags every file the wrapper opens gets. std adds `O_CLOEXEC` on its own; naming it here
/// keeps the guarantee visible where the job's inheritance matters.
const SAFE_FLAGS: libc::c_int = libc::O_NOFOLLOW | libc::O_CLOEXEC;

/// Opens `path` for reading and writing, creating it with mode 0600 if absent, without
/// following a link and without truncating, then checks the descriptor with
/// [`check_own_file`]. A file this user owns but others may read is made private: anyone who
/// can open a lock file can `flock` it and hold the job off for ever.
pub fn open_own_file(path: &Path) -> Result<File, FileError> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(SAFE_FLAGS)
        .open(path)
        .map_err(|e| FileError::io(path, e))?;
    let mode = check_own_file(&file, path)?;
    if mode & 0o077 != 0 {
        file.set_permissions(std::fs::Permissions::from_mode(mode & 0o7700))
            .map_err(|e| FileError::io(path, e))?;
    }
    Ok(file)
}

/// Opens `path` for appending (the local log), creating it if absent, without following a
/// link, and checks it like [`open_own_file`] except for the permissions, which are the
/// administrator's to choose.
pub fn open_append(path: &Path) -> Result<File, FileError> {
    let file = OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o640)
        .custom_flags(SAFE_FLAGS | libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| FileError::io(path, e))?;
    check_own_file(&file, path)?;
    Ok(file)
}

/// Creates a new file in `dir` for the wrapper's private use and unlinks it at once, so it
/// vanishes with the wrapper. `O_EXCL` means a name somebody planted (a link or a file) is
/// never opened; another name is tried instead, up to a few times.
pub fn create_unlinked(dir: &Path, name: &str) -> Result<File, FileError> {
    let mut last = None;
    for attempt in 0..8u32 {
        let path = if attempt == 0 {
            dir.join(name)
        } else {
            dir.join(format!("{name}.{:08x}", rand::random::<u32>()))
        };
        match OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(SAFE_FLAGS)
            .open(&path)
        {
            Ok(file) => {
                std::fs::remove_file(&path).map_err(|e| FileError::io(&path, e))?;
                return Ok(file);
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                last = Some(FileError::io(&path, e));
            }
            Err(e) => return Err(FileError::io(&path, e)),
        }
    }
    Err(last.unwrap_or_else(|| FileError::io(dir, io::Error::other("no name left"))))
}

/// Checks that an open descriptor is a regular file with a single link, owned by this
/// process's effective user, and returns its permission bits. A hard link planted by someone
/// else to a file of ours would have two links.
pub fn check_own_file(file: &File, path: &Path) -> Result<u32, FileError> {
    let meta = file.metadata().map_err(|e| FileError::io(path, e))?;
    if !meta.file_type().is_file() {
        return Err(FileError::WrongType {
            path: path.to_owned(),
            expected: "regular file",
        });
    }
    let me = Uid::effective().as_raw();
    if meta.uid() != me {
        return Err(FileError::Owner {
            path: path.to_owned(),
            owner: meta.uid(),
            me,
        });
    }
    if meta.nlink() != 1 {
        return Err(FileError::Links {
            path: path.to_owned(),
            links: meta.nlink(),
        });
    }
    Ok(meta.mode() & 0o7777)
}

/// Creates `dir` with mode 0700 if it does not exist (its parent must), then checks it is a
/// directory and not a link, owned by this process's effective user, and not writable by
/// group or others; an existing directory that fails any check is refused, not repaired.
///
/// Nobody else can swap the directory for another afterwards as long as its parent only lets
/// owners rename entries, which holds for `/run` (root's) and `/tmp` (sticky).
pub fn private_dir(dir: &Path) -> Result<(), FileError> {
    match DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(FileError::io(dir, e)),
    }
    let meta = std::fs::symlink_metadata(dir).map_err(|e| FileError::io(dir, e))?;
    if meta.file_type().is_symlink() {
        return Err(FileError::Symlink {
            path: dir.to_owned(),
        });
    }
    if !meta.is_dir() {
        return Err(FileError::WrongType {
            path: dir.to_owned(),
            expected: "directory",
        });
    }
    let me = Uid::effective().as_raw();
    if meta.uid() != me {
        return Err(FileError::Owner {
            path: dir.to_owned(),
            owner: meta.uid(),
            me,
        });
    }
    if meta.mode() & 0o022 != 0 {
        return Err(FileError::Writable {
            path: dir.to_owned(),
            mode: meta.mode() & 0o7777,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_link_is_refused_and_its_target_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, "precious\n").unwrap();
        let link = dir.path().join("job.lock");
        std::os::unix::fs::symlink(&victim, &link).unwrap();
        let err = open_own_file(&link).unwrap_err();
        assert!(matches!(err, FileError::Symlink { .. }), "{err}");
        assert!(err.to_string().contains("symbolic link"), "{err}");
        let err = open_append(&link).unwrap_err();
        assert!(matches!(err, FileError::Symlink { .. }), "{err}");
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious\n");
    }

    #[test]
    fn a_hard_link_and_a_fifo_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, "precious\n").unwrap();
        let link = dir.path().join("job.lock");
        std::fs::hard_link(&victim, &link).unwrap();
        let err = open_own_file(&link).unwrap_err();
        assert!(matches!(err, FileError::Links { links: 2, .. }), "{err}");
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious\n");

        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let err = open_own_file(&fifo).unwrap_err();
        assert!(matches!(err, FileError::WrongType { .. }), "{err}");
        // Appending to a FIFO nobody reads fails at once (ENXIO) rather than blocking.
        assert!(open_append(&fifo).is_err());
    }

    #[test]
    fn an_own_file_is_opened_without_truncation_and_made_private() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("job.lock");
        std::fs::write(&path, "1234\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let file = open_own_file(&path).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "1234\n");
        assert_eq!(file.metadata().unwrap().mode() & 0o777, 0o600);
        let fresh = open_own_file(&dir.path().join("new.lock")).unwrap();
        assert_eq!(fresh.metadata().unwrap().mode() & 0o777, 0o600);
    }

    #[test]
    fn descriptors_are_close_on_exec() {
        use std::os::fd::AsFd;
        let dir = tempfile::tempdir().unwrap();
        let files = [
            open_own_file(&dir.path().join("a")).unwrap(),
            open_append(&dir.path().join("b")).unwrap(),
            create_unlinked(dir.path(), "c").unwrap(),
        ];
        for file in &files {
            let flags = nix::fcntl::fcntl(file.as_fd(), nix::fcntl::FcntlArg::F_GETFD).unwrap();
            assert_ne!(flags & libc::FD_CLOEXEC, 0);
        }
    }

    #[test]
    fn an_unlinked_file_skips_a_planted_name() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, "precious\n").unwrap();
        std::os::unix::fs::symlink(&victim, dir.path().join("spool")).unwrap();
        let mut file = create_unlinked(dir.path(), "spool").unwrap();
        std::io::Write::write_all(&mut file, b"spooled").unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious\n");
        // Only the victim and the planted link remain: the spool was unlinked.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
    }

    #[test]
    fn a_private_dir_is_created_0700_and_unsafe_ones_are_refused() {
        let base = tempfile::tempdir().unwrap();
        let dir = base.path().join("saltpeter");
        private_dir(&dir).unwrap();
        let mode = std::fs::metadata(&dir).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o700);
        private_dir(&dir).unwrap();

        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        let err = private_dir(&dir).unwrap_err();
        assert!(
            matches!(err, FileError::Writable { mode: 0o777, .. }),
            "{err}"
        );
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o775)).unwrap();
        assert!(matches!(private_dir(&dir), Err(FileError::Writable { .. })));
        // Read and search for others is fine: only writing matters.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        private_dir(&dir).unwrap();

        let link = base.path().join("link");
        std::os::unix::fs::symlink(&dir, &link).unwrap();
        assert!(matches!(private_dir(&link), Err(FileError::Symlink { .. })));
        let file = base.path().join("file");
        std::fs::write(&file, "").unwrap();
        assert!(matches!(
            private_dir(&file),
            Err(FileError::WrongType { .. })
        ));
    }

    #[test]
    fn a_dir_owned_by_another_user_is_refused() {
        if !Uid::effective().is_root() {
            assert!(
                std::env::var_os("CI").is_none(),
                "CI must run this test as root"
            );
            eprintln!("skipped: needs root to give a directory to another user");
            return;
        }
        let base = tempfile::tempdir().unwrap();
        let dir = base.path().join("saltpeter");
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        let nobody = nix::unistd::User::from_name("nobody").unwrap().unwrap();
        nix::unistd::chown(&dir, Some(nobody.uid), None).unwrap();
        let err = private_dir(&dir).unwrap_err();
        assert!(
            matches!(err, FileError::Owner { owner, me: 0, .. } if owner == nobody.uid.as_raw()),
            "{err}"
        );
        // A file of another user is refused too, even by root.
        let path = base.path().join("job.lock");
        std::fs::write(&path, "").unwrap();
        nix::unistd::chown(&path, Some(nobody.uid), None).unwrap();
        assert!(matches!(open_own_file(&path), Err(FileError::Owner { .. })));
    }
}
