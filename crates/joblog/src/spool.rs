//! Run spools: where the job-log thread keeps machines' output that has left its memory
//! buffers, until each machine's result block is written.
//!
//! One append-only file per run, not one per machine. With a file per machine, 10,000
//! machines meant 10,000 file creations the first time their buffers were written and an
//! open and close per write after (only so many descriptors stay open); those bursts took
//! the log thread to 50-75% of a core every 30 s and pushed the master's ack p99 past a
//! second (docs/PERFORMANCE.md). Here a flush is one append to a file that stays open.
//!
//! Each record names its machine (`u16` name length, `u32` data length, both little-endian,
//! then the name and the data), so a spool left by a master that stopped is read back once,
//! when its run next writes, to find every machine's pieces. A record cut short by a crash is
//! cut off the file. Memory per run is one offset and length per piece written.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, BufReader, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

/// Bytes before a record's machine name: its length (`u16`) and the data's (`u32`).
const HEADER: usize = 6;

/// Run spool files kept open at once; a run's file is reopened when next needed.
const MAX_OPEN_FILES: usize = 256;

/// Every run's spool under one directory.
#[derive(Debug)]
pub(super) struct RunSpools {
    dir: PathBuf,
    runs: HashMap<String, RunSpool>,
    open_files: usize,
}

/// One run's spool file and where each machine's pieces are in it.
#[derive(Debug)]
struct RunSpool {
    path: PathBuf,
    file: Option<File>,
    len: u64,
    pieces: HashMap<String, Vec<Piece>>,
}

/// Where one record's data is in a run's spool.
#[derive(Clone, Copy, Debug)]
struct Piece {
    at: u64,
    len: u32,
}

impl RunSpools {
    /// Spools go in `dir`, created on demand.
    pub(super) fn new(dir: PathBuf) -> Self {
        Self {
            dir,
            runs: HashMap::new(),
            open_files: 0,
        }
    }

    /// Appends `data` to `instance`'s spool as a piece of `machine`'s output.
    pub(super) fn append(&mut self, instance: &str, machine: &str, data: &[u8]) -> io::Result<()> {
        let name_len = u16::try_from(machine.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "machine name too long"))?;
        let data_len = u32::try_from(data.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "output piece too large"))?;
        let mut record = Vec::with_capacity(HEADER + machine.len() + data.len());
        record.extend_from_slice(&name_len.to_le_bytes());
        record.extend_from_slice(&data_len.to_le_bytes());
        record.extend_from_slice(machine.as_bytes());
        record.extend_from_slice(data);
        let run = self.run(instance)?;
        let mut file = run.file()?;
        if let Err(error) = file.write_all(&record) {
            // The file may now end in part of this record: forget what we know, so the next
            // write reads the file back and cuts the torn record off.
            self.forget(instance);
            return Err(error);
        }
        let start = run.len;
        run.len += record.len() as u64;
        run.pieces
            .entry(machine.to_owned())
            .or_default()
            .push(Piece {
                at: start + (HEADER + machine.len()) as u64,
                len: data_len,
            });
        Ok(())
    }

    /// Everything spooled for `machine` in `instance`, in the order it was written.
    pub(super) fn output(&mut self, instance: &str, machine: &str) -> io::Result<SpooledOutput> {
        if !self.runs.contains_key(instance) && !self.path(instance).exists() {
            return Ok(SpooledOutput::empty());
        }
        let run = self.run(instance)?;
        let Some(pieces) = run.pieces.get(machine).filter(|p| !p.is_empty()) else {
            return Ok(SpooledOutput::empty());
        };
        Ok(SpooledOutput {
            pieces: pieces.clone(),
            file: Some(run.file()?.try_clone()?),
            next: 0,
            offset: 0,
        })
    }

    /// Forgets `machine`'s pieces; deletes the run's spool once no machine has any left.
    pub(super) fn release(&mut self, instance: &str, machine: &str) {
        let Some(run) = self.runs.get_mut(instance) else {
            return;
        };
        run.pieces.remove(machine);
        if run.pieces.is_empty() {
            let _ = fs::remove_file(&run.path);
            self.forget(instance);
        }
    }

    fn path(&self, instance: &str) -> PathBuf {
        self.dir
            .join(format!("{}.spool", super::safe_name(instance)))
    }

    /// Drops what is known of a run (its file stays).
    fn forget(&mut self, instance: &str) {
        if let Some(run) = self.runs.remove(instance)
            && run.file.is_some()
        {
            self.open_files -= 1;
        }
    }

    /// The run's spool with its file open, read back from disk the first time it is needed.
    fn run(&mut self, instance: &str) -> io::Result<&mut RunSpool> {
        match self.runs.get(instance) {
            None => {
                saltpeter_files::create_dir(&self.dir)?;
                self.make_room(instance);
                let run = RunSpool::recover(self.path(instance))?;
                self.open_files += 1;
                self.runs.insert(instance.to_owned(), run);
            }
            Some(run) if run.file.is_none() => {
                let path = run.path.clone();
                self.make_room(instance);
                let file = open(&path)?;
                self.open_files += 1;
                if let Some(run) = self.runs.get_mut(instance) {
                    run.file = Some(file);
                }
            }
            Some(_) => {}
        }
        self.runs
            .get_mut(instance)
            .ok_or_else(|| io::Error::other("a run spool vanished while in use"))
    }

    /// Closes another run's file (an arbitrary one) when as many as allowed are open; its
    /// pieces stay known and it is reopened when next needed.
    fn make_room(&mut self, keep: &str) {
        if self.open_files < MAX_OPEN_FILES {
            return;
        }
        if let Some((_, other)) = self
            .runs
            .iter_mut()
            .find(|(name, r)| name.as_str() != keep && r.file.is_some())
        {
            other.file = None;
            self.open_files -= 1;
        }
    }
}

impl RunSpool {
    /// Opens (creating) the spool at `path` and indexes the records in it, cutting off a
    /// record left incomplete.
    fn recover(path: PathBuf) -> io::Result<Self> {
        let file = open(&path)?;
        let file_len = file.metadata()?.len();
        let mut pieces: HashMap<String, Vec<Piece>> = HashMap::new();
        let mut reader = BufReader::new(&file);
        let mut good = 0u64;
        loop {
            let mut header = [0u8; HEADER];
            if good + HEADER as u64 > file_len || reader.read_exact(&mut header).is_err() {
                break;
            }
            let name_len = u64::from(u16::from_le_bytes([header[0], header[1]]));
            let data_len = u32::from_le_bytes([header[2], header[3], header[4], header[5]]);
            let data_at = good + HEADER as u64 + name_len;
            if data_at + u64::from(data_len) > file_len {
                break;
            }
            let mut name = vec![0u8; name_len as usize];
            reader.read_exact(&mut name)?;
            let Ok(name) = String::from_utf8(name) else {
                break;
            };
            reader.seek_relative(i64::from(data_len))?;
            pieces.entry(name).or_default().push(Piece {
                at: data_at,
                len: data_len,
            });
            good = data_at + u64::from(data_len);
        }
        drop(reader);
        if good < file_len {
            tracing::warn!(path = %path.display(), kept = good, dropped = file_len - good, "Cut an incomplete record off a job-log spool.");
            file.set_len(good)?;
        }
        Ok(Self {
            path,
            file: Some(file),
            len: good,
            pieces,
        })
    }

    fn file(&self) -> io::Result<&File> {
        self.file
            .as_ref()
            .ok_or_else(|| io::Error::other("a run spool was closed while in use"))
    }
}

fn open(path: &std::path::Path) -> io::Result<File> {
    saltpeter_files::open_read_append(path)
}

/// A machine's spooled output, read piece by piece.
#[derive(Debug)]
pub(super) struct SpooledOutput {
    file: Option<File>,
    pieces: Vec<Piece>,
    next: usize,
    /// Bytes of `pieces[next]` already read.
    offset: u32,
}

impl SpooledOutput {
    fn empty() -> Self {
        Self {
            file: None,
            pieces: Vec::new(),
            next: 0,
            offset: 0,
        }
    }
}

impl Read for SpooledOutput {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let Some(file) = &self.file else {
            return Ok(0);
        };
        while let Some(piece) = self.pieces.get(self.next) {
            let left = (piece.len - self.offset) as usize;
            if left == 0 {
                self.next += 1;
                self.offset = 0;
                continue;
            }
            let want = left.min(buf.len());
            let n = file.read_at(&mut buf[..want], piece.at + u64::from(self.offset))?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the spool is shorter than its index",
                ));
            }
            self.offset += n as u32;
            return Ok(n);
        }
        Ok(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_all(mut r: impl Read) -> String {
        let mut s = String::new();
        r.read_to_string(&mut s).unwrap();
        s
    }

    #[test]
    fn pieces_of_many_machines_share_one_file_and_read_back_per_machine() {
        let dir = tempfile::tempdir().unwrap();
        let mut spools = RunSpools::new(dir.path().to_owned());
        spools.append("j_1", "a", b"one\n").unwrap();
        spools.append("j_1", "b", b"uno\n").unwrap();
        spools.append("j_1", "a", b"two\n").unwrap();
        spools.append("j_2", "a", b"other run\n").unwrap();
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 2);
        assert_eq!(read_all(spools.output("j_1", "a").unwrap()), "one\ntwo\n");
        assert_eq!(read_all(spools.output("j_1", "b").unwrap()), "uno\n");
        assert_eq!(read_all(spools.output("j_1", "c").unwrap()), "");
        assert_eq!(read_all(spools.output("j_9", "a").unwrap()), "");
        // A reader with a small buffer still gets every byte in order.
        let mut out = spools.output("j_1", "a").unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 3];
        loop {
            let n = out.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
        }
        assert_eq!(got, b"one\ntwo\n");
        // The file goes once its last machine is released.
        spools.release("j_1", "a");
        assert!(dir.path().join("j_1.spool").exists());
        spools.release("j_1", "b");
        assert!(!dir.path().join("j_1.spool").exists());
        assert!(dir.path().join("j_2.spool").exists());
    }

    #[test]
    fn a_spool_left_by_a_stopped_master_is_read_back_and_a_torn_record_cut_off() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut spools = RunSpools::new(dir.path().to_owned());
            spools.append("j_1", "a", b"before\n").unwrap();
            spools.append("j_1", "b", b"b's\n").unwrap();
        }
        // A crash in the middle of the next record: its header and half its name.
        let path = dir.path().join("j_1.spool");
        let mut f = fs::OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&[1, 0, 9, 0, 0]).unwrap();
        drop(f);
        let torn_len = fs::metadata(&path).unwrap().len();
        let mut spools = RunSpools::new(dir.path().to_owned());
        spools.append("j_1", "a", b"after\n").unwrap();
        assert_eq!(
            read_all(spools.output("j_1", "a").unwrap()),
            "before\nafter\n"
        );
        assert_eq!(read_all(spools.output("j_1", "b").unwrap()), "b's\n");
        assert_eq!(
            fs::metadata(&path).unwrap().len(),
            torn_len - 5 + (HEADER + 1 + 6) as u64
        );
    }

    #[test]
    fn closed_files_are_reopened_and_their_pieces_kept() {
        let dir = tempfile::tempdir().unwrap();
        let mut spools = RunSpools::new(dir.path().to_owned());
        let runs = MAX_OPEN_FILES + 10;
        for i in 0..runs {
            spools.append(&format!("j_{i}"), "m", b"x").unwrap();
        }
        assert!(spools.open_files <= MAX_OPEN_FILES);
        let open = spools.runs.values().filter(|r| r.file.is_some()).count();
        assert_eq!(open, spools.open_files);
        for i in 0..runs {
            spools.append(&format!("j_{i}"), "m", b"y").unwrap();
        }
        for i in 0..runs {
            assert_eq!(
                read_all(spools.output(&format!("j_{i}"), "m").unwrap()),
                "xy"
            );
        }
        assert!(spools.open_files <= MAX_OPEN_FILES);
    }
}
