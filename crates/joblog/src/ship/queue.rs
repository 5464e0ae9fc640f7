//! The on-disk queue of one backend: append-only segment files of NDJSON under
//! `<data_dir>/ship/<backend>/`, a byte cap that drops the oldest segment when full, and a
//! cursor file that records how far the backend has acknowledged.
//!
//! One line is one item: `{"_index": ..., "_id": ..., "attempts": n, "doc": {...}}`. The id is
//! chosen at enqueue time so a batch resent after a lost response overwrites rather than
//! duplicates. A batch is read from one segment; when it is acknowledged the cursor moves past
//! it (written to a temporary file and renamed, so a crash leaves the old or the new cursor).
//! Items that failed inside an acknowledged batch are appended again at the tail, so the cursor
//! never has to stay behind items that were already accepted.

use std::collections::VecDeque;
use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::Document;

/// One queued document.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(super) struct Item {
    #[serde(rename = "_index")]
    pub index: String,
    #[serde(rename = "_id")]
    pub id: String,
    /// How many times the backend answered this item with a retryable error.
    #[serde(default)]
    pub attempts: u32,
    pub doc: Document,
}

/// A position in the queue: segment number and byte offset in it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct Cursor {
    pub segment: u64,
    pub offset: u64,
}

/// Items read from the queue, and where the queue stands once they are acknowledged.
#[derive(Debug)]
pub(super) struct Batch {
    pub items: Vec<Item>,
    pub end: Cursor,
}

/// Why the queue could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("cannot use the ship queue {dir}: {source}")]
    Io { dir: PathBuf, source: io::Error },
}

#[derive(Debug)]
pub(super) struct Queue {
    dir: PathBuf,
    /// Segment numbers and sizes, oldest first; the last one is being written.
    segments: VecDeque<(u64, u64)>,
    writer: Option<File>,
    cursor: Cursor,
    cap_bytes: u64,
    segment_bytes: u64,
    /// Documents dropped because the queue was full.
    pub dropped: u64,
}

const SUFFIX: &str = ".ndjson";

impl Queue {
    /// Opens (or creates) the queue in `dir`. Writing always starts a fresh segment, so a line
    /// torn by a crash stays at the end of an old one, where reading skips it.
    pub(super) fn open(
        dir: PathBuf,
        cap_bytes: u64,
        segment_bytes: u64,
    ) -> Result<Self, QueueError> {
        let err = |source| QueueError::Io {
            dir: dir.clone(),
            source,
        };
        saltpeter_files::create_dir(&dir).map_err(err)?;
        let mut segments = Vec::new();
        for entry in fs::read_dir(&dir).map_err(err)? {
            let entry = entry.map_err(err)?;
            let name = entry.file_name();
            let Some(seq) = name
                .to_str()
                .and_then(|n| n.strip_suffix(SUFFIX))
                .and_then(|n| n.parse::<u64>().ok())
            else {
                continue;
            };
            segments.push((seq, entry.metadata().map_err(err)?.len()));
        }
        segments.sort_unstable();
        let cursor = read_cursor(&dir).unwrap_or(Cursor {
            segment: 0,
            offset: 0,
        });
        let mut queue = Self {
            dir: dir.clone(),
            segments: segments.into(),
            writer: None,
            cursor,
            cap_bytes,
            segment_bytes: segment_bytes.max(1),
            dropped: 0,
        };
        // Segments wholly behind the cursor were acknowledged before the last shutdown.
        while let Some(&(seq, _)) = queue.segments.front() {
            if seq >= queue.cursor.segment {
                break;
            }
            let _ = fs::remove_file(queue.path(seq));
            queue.segments.pop_front();
        }
        let next = queue.segments.back().map_or(0, |s| s.0 + 1);
        queue
            .start_segment(next.max(queue.cursor.segment))
            .map_err(err)?;
        queue.settle_cursor();
        Ok(queue)
    }

    /// Bytes on disk.
    pub(super) fn bytes(&self) -> u64 {
        self.segments.iter().map(|s| s.1).sum()
    }

    /// Appends one item; drops the oldest segments first if the cap would be exceeded.
    pub(super) fn push(&mut self, item: &Item) -> io::Result<()> {
        let mut line = serde_json::to_vec(item).map_err(io::Error::other)?;
        line.push(b'\n');
        let len = line.len() as u64;
        if self
            .segments
            .back()
            .is_some_and(|s| s.1 > 0 && s.1 + len > self.segment_bytes)
        {
            let next = self.segments.back().map_or(0, |s| s.0 + 1);
            self.start_segment(next)?;
        }
        while self.bytes() + len > self.cap_bytes && self.segments.len() > 1 {
            self.drop_oldest();
        }
        let writer = match &mut self.writer {
            Some(w) => w,
            None => return Err(io::Error::other("no writable segment")),
        };
        writer.write_all(&line)?;
        if let Some(last) = self.segments.back_mut() {
            last.1 += len;
        }
        Ok(())
    }

    /// Up to `max_items` / about `max_bytes` of items from the cursor, all from one segment.
    /// Lines that do not parse are skipped with a warning (they cannot become valid later).
    pub(super) fn read(&mut self, max_items: usize, max_bytes: u64) -> io::Result<Batch> {
        // A segment may end in a torn line and nothing else; step over such ends.
        for _ in 0..=self.segments.len() {
            let batch = self.read_once(max_items, max_bytes)?;
            if !batch.items.is_empty() || batch.end <= self.cursor {
                return Ok(batch);
            }
            self.ack(batch.end)?;
        }
        self.read_once(max_items, max_bytes)
    }

    fn read_once(&mut self, max_items: usize, max_bytes: u64) -> io::Result<Batch> {
        self.settle_cursor();
        let mut batch = Batch {
            items: Vec::new(),
            end: self.cursor,
        };
        let Some(&(seq, len)) = self.segments.iter().find(|s| s.0 == self.cursor.segment) else {
            return Ok(batch);
        };
        if self.cursor.offset >= len {
            return Ok(batch);
        }
        let mut file = File::open(self.path(seq))?;
        file.seek(SeekFrom::Start(self.cursor.offset))?;
        let mut reader = BufReader::new(file.take(len - self.cursor.offset));
        let mut read = 0u64;
        let mut line = Vec::new();
        while batch.items.len() < max_items && read < max_bytes {
            line.clear();
            let n = reader.read_until(b'\n', &mut line)?;
            if n == 0 || line.last() != Some(&b'\n') {
                // End of the segment, or a line torn by a crash: nothing more to read here.
                if n > 0 && !self.is_writing(seq) {
                    read += n as u64;
                }
                break;
            }
            read += n as u64;
            match serde_json::from_slice::<Item>(&line) {
                Ok(item) => batch.items.push(item),
                Err(error) => {
                    tracing::warn!(%error, "Skipping an unreadable line in the ship queue.")
                }
            }
        }
        batch.end = Cursor {
            segment: seq,
            offset: self.cursor.offset + read,
        };
        Ok(batch)
    }

    /// Records that everything before `end` was delivered (or given up on).
    pub(super) fn ack(&mut self, end: Cursor) -> io::Result<()> {
        if end <= self.cursor {
            // The segment was dropped for space while the batch was in flight.
            return Ok(());
        }
        self.cursor = end;
        self.settle_cursor();
        write_cursor(&self.dir, self.cursor)
    }

    /// Settles a batch of `items` items that ended at `end`. When its segment was dropped for
    /// space while the batch was in flight, the drop counted the batch's items as lost,
    /// though each of them has had its outcome (delivered, requeued or refused): they leave
    /// the dropped count again, so every document is counted once.
    pub(super) fn settle(&mut self, end: Cursor, items: usize) -> io::Result<()> {
        if end <= self.cursor {
            self.dropped = self.dropped.saturating_sub(items as u64);
            return Ok(());
        }
        self.ack(end)
    }

    /// Whether anything is waiting past the cursor.
    pub(super) fn is_empty(&mut self) -> bool {
        self.settle_cursor();
        self.segments
            .iter()
            .filter(|s| s.0 >= self.cursor.segment)
            .all(|s| s.0 == self.cursor.segment && s.1 <= self.cursor.offset)
    }

    /// Moves the cursor off finished segments, deleting them; keeps it inside the queue.
    fn settle_cursor(&mut self) {
        loop {
            let Some(&(seq, len)) = self.segments.front() else {
                return;
            };
            if self.cursor.segment < seq {
                self.cursor = Cursor {
                    segment: seq,
                    offset: 0,
                };
            }
            let finished = self.cursor.segment > seq
                || (self.cursor.segment == seq
                    && self.cursor.offset >= len
                    && !self.is_writing(seq));
            if !finished {
                return;
            }
            let _ = fs::remove_file(self.path(seq));
            self.segments.pop_front();
            if self.cursor.segment == seq {
                self.cursor = Cursor {
                    segment: seq + 1,
                    offset: 0,
                };
            }
        }
    }

    fn drop_oldest(&mut self) {
        let Some((seq, _)) = self.segments.pop_front() else {
            return;
        };
        let from = if self.cursor.segment == seq {
            self.cursor.offset
        } else {
            0
        };
        let lost = count_lines(&self.path(seq), from).unwrap_or(0);
        let _ = fs::remove_file(self.path(seq));
        self.dropped += lost;
        tracing::warn!(
            dir = %self.dir.display(),
            lost,
            dropped_total = self.dropped,
            "Ship queue full: dropped the oldest documents."
        );
        self.settle_cursor();
        let _ = write_cursor(&self.dir, self.cursor);
    }

    fn start_segment(&mut self, seq: u64) -> io::Result<()> {
        let file = saltpeter_files::open_append(&self.path(seq))?;
        let len = file.metadata()?.len();
        self.writer = Some(file);
        if self.segments.back().is_none_or(|s| s.0 != seq) {
            self.segments.push_back((seq, len));
        }
        Ok(())
    }

    fn is_writing(&self, seq: u64) -> bool {
        self.segments.back().is_some_and(|s| s.0 == seq)
    }

    fn path(&self, seq: u64) -> PathBuf {
        self.dir.join(format!("{seq:020}{SUFFIX}"))
    }
}

fn count_lines(path: &Path, from: u64) -> io::Result<u64> {
    let mut file = File::open(path)?;
    file.seek(SeekFrom::Start(from))?;
    let mut reader = BufReader::new(file);
    let mut count = 0;
    loop {
        let buf = reader.fill_buf()?;
        if buf.is_empty() {
            return Ok(count);
        }
        count += buf.iter().filter(|b| **b == b'\n').count() as u64;
        let n = buf.len();
        reader.consume(n);
    }
}

fn read_cursor(dir: &Path) -> Option<Cursor> {
    let text = fs::read_to_string(dir.join("cursor")).ok()?;
    let (segment, offset) = text.trim().split_once(' ')?;
    Some(Cursor {
        segment: segment.parse().ok()?,
        offset: offset.parse().ok()?,
    })
}

fn write_cursor(dir: &Path, cursor: Cursor) -> io::Result<()> {
    let tmp = dir.join("cursor.tmp");
    saltpeter_files::write(
        &tmp,
        format!("{} {}\n", cursor.segment, cursor.offset).as_bytes(),
    )?;
    fs::rename(tmp, dir.join("cursor"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(n: u32) -> Item {
        let mut doc = Document::new(
            "start",
            "j",
            "g",
            &format!("j_{n}"),
            time::OffsetDateTime::UNIX_EPOCH,
        );
        doc.output = "x".repeat(50);
        Item {
            index: "saltpeter-1970.01.01".into(),
            id: format!("id{n}"),
            attempts: 0,
            doc,
        }
    }

    fn ids(batch: &Batch) -> Vec<String> {
        batch.items.iter().map(|i| i.id.clone()).collect()
    }

    #[test]
    fn reads_acks_and_resumes_after_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q");
        let mut q = Queue::open(path.clone(), 1 << 20, 1 << 20).unwrap();
        for n in 0..5 {
            q.push(&item(n)).unwrap();
        }
        let b = q.read(2, u64::MAX).unwrap();
        assert_eq!(ids(&b), ["id0", "id1"]);
        q.ack(b.end).unwrap();
        drop(q);
        let mut q = Queue::open(path.clone(), 1 << 20, 1 << 20).unwrap();
        let b = q.read(10, u64::MAX).unwrap();
        assert_eq!(ids(&b), ["id2", "id3", "id4"]);
        q.ack(b.end).unwrap();
        assert!(q.is_empty());
        drop(q);
        let mut q = Queue::open(path.clone(), 1 << 20, 1 << 20).unwrap();
        assert!(q.is_empty());
        // Only the fresh, empty write segment is left.
        let files = fs::read_dir(&path).unwrap().count();
        assert_eq!(files, 2, "one segment and the cursor");
    }

    #[test]
    fn full_queue_drops_oldest_segments_and_counts() {
        let dir = tempfile::tempdir().unwrap();
        let line = serde_json::to_vec(&item(0)).unwrap().len() as u64 + 1;
        // Two items per segment, room for six.
        let mut q = Queue::open(dir.path().join("q"), line * 6, line * 2).unwrap();
        for n in 0..10 {
            q.push(&item(n)).unwrap();
        }
        assert!(q.bytes() <= line * 6);
        assert_eq!(q.dropped, 4);
        let mut got = Vec::new();
        for _ in 0..10 {
            let b = q.read(100, u64::MAX).unwrap();
            if b.items.is_empty() {
                break;
            }
            got.extend(ids(&b));
            q.ack(b.end).unwrap();
        }
        assert_eq!(got, ["id4", "id5", "id6", "id7", "id8", "id9"]);
    }

    #[test]
    fn a_batch_whose_segment_was_dropped_in_flight_is_counted_once() {
        let dir = tempfile::tempdir().unwrap();
        let line = serde_json::to_vec(&item(0)).unwrap().len() as u64 + 1;
        // Two items per segment, room for six.
        let mut q = Queue::open(dir.path().join("q"), line * 6, line * 2).unwrap();
        for n in 0..4 {
            q.push(&item(n)).unwrap();
        }
        // The sender takes the oldest segment's two items; while they are in flight the queue
        // fills and drops that very segment.
        let in_flight = q.read(100, u64::MAX).unwrap();
        assert_eq!(ids(&in_flight), ["id0", "id1"]);
        for n in 4..8 {
            q.push(&item(n)).unwrap();
        }
        assert_eq!(q.dropped, 2, "the in-flight segment went for space");
        // The request succeeded after all: its items were delivered, not lost.
        q.settle(in_flight.end, in_flight.items.len()).unwrap();
        assert_eq!(q.dropped, 0);
        let next = q.read(100, u64::MAX).unwrap();
        assert_eq!(
            ids(&next),
            ["id2", "id3"],
            "the cursor went on past the dropped segment"
        );
    }

    #[test]
    fn torn_line_at_the_end_of_an_old_segment_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q");
        let mut q = Queue::open(path.clone(), 1 << 20, 1 << 20).unwrap();
        q.push(&item(0)).unwrap();
        drop(q);
        let seg = path.join(format!("{:020}{SUFFIX}", 0));
        let mut f = fs::OpenOptions::new().append(true).open(&seg).unwrap();
        f.write_all(b"{\"_index\":\"tor").unwrap();
        let mut q = Queue::open(path, 1 << 20, 1 << 20).unwrap();
        q.push(&item(1)).unwrap();
        let mut got = Vec::new();
        for _ in 0..5 {
            let b = q.read(100, u64::MAX).unwrap();
            got.extend(ids(&b));
            q.ack(b.end).unwrap();
        }
        assert_eq!(got, ["id0", "id1"]);
        assert!(q.is_empty());
    }
}
