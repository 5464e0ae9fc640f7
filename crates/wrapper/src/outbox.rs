//! Every output message from the moment it is numbered until the master acknowledges it.
//!
//! Messages stay in memory up to a byte cap; beyond it they are appended to a spool file (in
//! the log directory, or the system temp directory if that is not writable), so a long
//! disconnect costs disk, not memory, and loses nothing. The file is unlinked as soon as it is
//! created, so it vanishes with the wrapper whatever happens. Memory always holds the oldest
//! messages, which are the ones in flight; the spool feeds memory back as acks free room.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Memory held by unacknowledged messages before further ones go to the spool.
pub const MEMORY_CAP: usize = 8 * 1024 * 1024;

/// Which stream an output message claims. The job's stdout and stderr are merged in one pipe,
/// so the job's text is always `stdout`; `stderr` marks the wrapper's own closing notice.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

impl Stream {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stdout => "stdout",
            Self::Stderr => "stderr",
        }
    }
}

/// One output message's content.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chunk {
    pub stream: Stream,
    pub data: String,
}

/// The queue of unacknowledged output messages, numbered consecutively from 0.
#[derive(Debug)]
pub struct Outbox {
    /// Seq of the oldest message held (the front of `mem`, or of the spool if `mem` is empty).
    first_seq: u64,
    mem: VecDeque<Chunk>,
    mem_bytes: usize,
    cap: usize,
    spool: Option<Spool>,
    spool_dirs: Vec<PathBuf>,
    spool_name: String,
    /// Set once spooling failed, so it is not retried (and logged) for every message.
    spool_error: Option<String>,
}

#[derive(Debug)]
struct Spool {
    file: File,
    read_at: u64,
    write_at: u64,
    count: u64,
}

impl Outbox {
    /// An empty outbox whose spool (if ever needed) goes to the first usable directory of
    /// `spool_dirs`, in a file named after `name`.
    pub fn new(cap: usize, spool_dirs: Vec<PathBuf>, name: &str) -> Self {
        Self {
            first_seq: 0,
            mem: VecDeque::new(),
            mem_bytes: 0,
            cap,
            spool: None,
            spool_dirs,
            spool_name: format!(".{name}.{}.spool", std::process::id()),
            spool_error: None,
        }
    }

    /// Seq the next pushed message will get (= number of messages ever pushed).
    pub fn next_seq(&self) -> u64 {
        self.first_seq + self.len()
    }

    /// Seq of the oldest unacknowledged message, or [`next_seq`](Self::next_seq) if none.
    #[cfg(test)]
    pub fn first_seq(&self) -> u64 {
        self.first_seq
    }

    /// Number of messages held.
    pub fn len(&self) -> u64 {
        self.mem.len() as u64 + self.spool.as_ref().map_or(0, |s| s.count)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes held in memory.
    #[cfg(test)]
    pub fn mem_bytes(&self) -> usize {
        self.mem_bytes
    }

    /// Whether one more full-size message fits in memory without spilling.
    pub fn has_room(&self) -> bool {
        self.spooled() == 0 && self.mem_bytes + saltpeter_proto::OUTPUT_CHUNK_BYTES <= self.cap
    }

    /// Messages held in the spool file.
    pub fn spooled(&self) -> u64 {
        self.spool.as_ref().map_or(0, |s| s.count)
    }

    /// The first spooling failure, if any (memory was used instead).
    pub fn spool_error(&self) -> Option<&str> {
        self.spool_error.as_deref()
    }

    /// Appends a message and returns its seq.
    pub fn push(&mut self, chunk: Chunk) -> u64 {
        let seq = self.next_seq();
        let over = self.mem_bytes + chunk.data.len() > self.cap && !self.mem.is_empty();
        let spooling = self.spool.as_ref().is_some_and(|s| s.count > 0);
        if (over || spooling) && self.spool_error.is_none() {
            match self.append_to_spool(&chunk) {
                Ok(()) => return seq,
                // Keeping the message in memory loses nothing; only the bound is given up.
                Err(e) => self.spool_error = Some(e.to_string()),
            }
        }
        if spooling {
            // Order must be kept: once anything is spooled, memory cannot take newer ones.
            // Pull the spool back into memory first (only reached if spooling just failed).
            self.unspool_all();
        }
        self.mem_bytes += chunk.data.len();
        self.mem.push_back(chunk);
        seq
    }

    /// The message with `seq`, if it is held in memory. Messages in flight always are.
    pub fn get(&self, seq: u64) -> Option<&Chunk> {
        let index = usize::try_from(seq.checked_sub(self.first_seq)?).ok()?;
        self.mem.get(index)
    }

    /// Drops every message with a seq up to and including `seq` (a cumulative ack), then
    /// refills memory from the spool.
    pub fn ack_through(&mut self, seq: u64) {
        while self.first_seq <= seq {
            if let Some(chunk) = self.mem.pop_front() {
                self.mem_bytes -= chunk.data.len();
            } else if self.spooled() > 0 {
                // Acks can run ahead of memory only if the master held data we never knew
                // it held (a resumed session); skip it in the spool.
                if self.read_spool().is_none() {
                    break;
                }
            } else {
                break;
            }
            self.first_seq += 1;
        }
        self.refill();
    }

    /// Moves spooled messages into memory while there is room.
    fn refill(&mut self) {
        while self.mem_bytes < self.cap && self.spooled() > 0 {
            match self.read_spool() {
                Some(chunk) => {
                    self.mem_bytes += chunk.data.len();
                    self.mem.push_back(chunk);
                }
                None => break,
            }
        }
    }

    fn unspool_all(&mut self) {
        while self.spooled() > 0 {
            match self.read_spool() {
                Some(chunk) => {
                    self.mem_bytes += chunk.data.len();
                    self.mem.push_back(chunk);
                }
                None => break,
            }
        }
    }

    /// Writes every message still held to `out`, oldest first, emptying the outbox. Used when
    /// delivery has failed for good, so the text survives in the local log.
    pub fn drain_to(&mut self, out: &mut dyn Write) -> io::Result<()> {
        self.first_seq = self.next_seq();
        while let Some(chunk) = self.mem.pop_front() {
            out.write_all(chunk.data.as_bytes())?;
        }
        self.mem_bytes = 0;
        while self.spooled() > 0 {
            match self.read_spool() {
                Some(chunk) => out.write_all(chunk.data.as_bytes())?,
                None => break,
            }
        }
        Ok(())
    }

    fn append_to_spool(&mut self, chunk: &Chunk) -> io::Result<()> {
        if self.spool.is_none() {
            let file = self.open_spool()?;
            self.spool = Some(Spool {
                file,
                read_at: 0,
                write_at: 0,
                count: 0,
            });
        }
        let Some(spool) = self.spool.as_mut() else {
            return Ok(());
        };
        let mut record = Vec::with_capacity(5 + chunk.data.len());
        record.push(match chunk.stream {
            Stream::Stdout => 0,
            Stream::Stderr => 1,
        });
        let len = u32::try_from(chunk.data.len()).map_err(io::Error::other)?;
        record.extend_from_slice(&len.to_le_bytes());
        record.extend_from_slice(chunk.data.as_bytes());
        spool.file.write_all_at(&record, spool.write_at)?;
        spool.write_at += record.len() as u64;
        spool.count += 1;
        Ok(())
    }

    /// Takes the oldest spooled message. A read failure (the disk vanished) is recorded and
    /// the spooled messages are reported lost rather than looping forever.
    fn read_spool(&mut self) -> Option<Chunk> {
        let spool = self.spool.as_mut()?;
        let result = (|| -> io::Result<Chunk> {
            let mut head = [0u8; 5];
            spool.file.read_exact_at(&mut head, spool.read_at)?;
            let len = u32::from_le_bytes([head[1], head[2], head[3], head[4]]) as usize;
            let mut data = vec![0u8; len];
            spool.file.read_exact_at(&mut data, spool.read_at + 5)?;
            let data = String::from_utf8(data).map_err(io::Error::other)?;
            spool.read_at += 5 + len as u64;
            let stream = if head[0] == 1 {
                Stream::Stderr
            } else {
                Stream::Stdout
            };
            Ok(Chunk { stream, data })
        })();
        match result {
            Ok(chunk) => {
                spool.count -= 1;
                if spool.count == 0 {
                    // Reuse the file from the start instead of letting it grow for ever.
                    spool.read_at = 0;
                    spool.write_at = 0;
                    let _ = spool.file.set_len(0);
                }
                Some(chunk)
            }
            Err(e) => {
                self.spool_error = Some(format!("spool read failed, messages lost: {e}"));
                spool.count = 0;
                None
            }
        }
    }

    fn open_spool(&self) -> io::Result<File> {
        let mut last = io::Error::other("no spool directory");
        for dir in &self.spool_dirs {
            match open_unlinked(dir, &self.spool_name) {
                Ok(file) => return Ok(file),
                Err(e) => last = e,
            }
        }
        Err(last)
    }
}

fn open_unlinked(dir: &Path, name: &str) -> io::Result<File> {
    std::fs::create_dir_all(dir)?;
    crate::files::create_unlinked(dir, name).map_err(io::Error::other)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(text: &str) -> Chunk {
        Chunk {
            stream: Stream::Stdout,
            data: text.to_owned(),
        }
    }

    #[test]
    fn spills_beyond_the_cap_and_returns_everything_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let mut ob = Outbox::new(10, vec![dir.path().to_owned()], "job");
        for i in 0..20 {
            assert_eq!(ob.push(chunk(&format!("m{i:02}"))), i);
        }
        assert!(ob.mem_bytes() <= 12, "{}", ob.mem_bytes());
        assert!(ob.spooled() > 10);
        // The spool file is unlinked at once.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        let mut seen = Vec::new();
        while !ob.is_empty() {
            let seq = ob.first_seq();
            seen.push(ob.get(seq).unwrap().data.clone());
            ob.ack_through(seq);
        }
        let want: Vec<String> = (0..20).map(|i| format!("m{i:02}")).collect();
        assert_eq!(seen, want);
        assert_eq!(ob.next_seq(), 20);
        assert!(ob.spool_error().is_none());
    }

    #[test]
    fn cumulative_acks_can_skip_into_the_spool() {
        let dir = tempfile::tempdir().unwrap();
        let mut ob = Outbox::new(4, vec![dir.path().to_owned()], "job");
        for i in 0..10 {
            ob.push(chunk(&format!("{i}")));
        }
        ob.ack_through(6);
        assert_eq!(ob.first_seq(), 7);
        assert_eq!(ob.get(7).unwrap().data, "7");
        let mut rest = Vec::new();
        ob.drain_to(&mut rest).unwrap();
        assert_eq!(rest, b"789");
        assert!(ob.is_empty() || ob.mem_bytes() == 0);
    }

    #[test]
    fn unusable_spool_falls_back_to_memory_without_loss() {
        let mut ob = Outbox::new(2, vec![PathBuf::from("/proc/sp-no-such-dir")], "job");
        for i in 0..5 {
            ob.push(chunk(&format!("{i}")));
        }
        assert!(ob.spool_error().is_some());
        let mut all = Vec::new();
        ob.drain_to(&mut all).unwrap();
        assert_eq!(all, b"01234");
    }
}
