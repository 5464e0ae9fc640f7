//! Keeps the store's write-ahead log small without stalling commits: a thread with its own
//! connection copies the WAL back into the database file, and now and then starts the WAL over.
//!
//! Why a thread: a checkpoint copies pages and waits for two fsyncs; done by the committing
//! thread (SQLite's automatic checkpoint), that wait held every ack of the batch (docs/PERFORMANCE.md:
//! those were the slowest commits). PASSIVE checkpoints run beside the writer and never block it.
//!
//! Why the restart needs the writer: SQLite only starts the WAL over when a write begins while
//! every frame is already copied back. Under continuous commits a frame always lands during the
//! copy, so PASSIVE checkpoints alone let the WAL grow without end (1.5 GB in a minute at
//! 10,000 wrappers). So once the WAL is past [`WalTuning::restart_frames`], the thread copies
//! what it can beside the writer, then takes the [`WriteGate`] (which the store holds for each
//! batch) and runs a RESTART checkpoint that only has the last few frames to copy. The writer
//! waits for that step alone, at a moment the thread chose, not at an arbitrary commit with a
//! second's worth of frames behind it. The step's copy is small, but its fsyncs take whatever
//! the disk's tail is (see [`WalTuning::default`]), which is why restarts are kept rare.

use std::path::Path;
use std::sync::Arc;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use rusqlite::Connection;

use super::StoreError;

/// Held by the store for each batch and by the checkpoint thread while it restarts the WAL, so
/// the restart never waits on SQLite's busy polling and the writer never finds the WAL locked.
pub(super) type WriteGate = Arc<Mutex<()>>;

/// When the WAL is copied back and started over.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WalTuning {
    /// How often the thread checkpoints.
    pub checkpoint_every: Duration,
    /// WAL frames (4 KiB pages) past which the thread starts the WAL over.
    pub restart_frames: i64,
    /// WAL frames past which the writer checkpoints on its own: a backstop for when the
    /// thread cannot keep up, rare because each such checkpoint holds a commit up.
    pub writer_frames: i64,
}

impl Default for WalTuning {
    /// Checkpoints every second and starts the WAL over past 1 GiB. A restart holds the
    /// writer for its last fsyncs, and on a busy disk an fsync can take hundreds of
    /// milliseconds whatever it writes (measured at 10,000 wrappers: a 4 KiB fsync of an
    /// unrelated file had a p99 of 70 ms and a maximum of 120 ms, and restarts held the writer
    /// 150-560 ms while copying fewer than 100 frames). So restarts are made rare: at 10,000
    /// wrappers (~3,500 frames a second) one every ~85 s. The file keeps its largest size and is reused; at light
    /// load the WAL starts over by itself whenever a checkpoint finds no commit behind it.
    fn default() -> Self {
        Self {
            checkpoint_every: Duration::from_secs(1),
            restart_frames: 262_144,
            writer_frames: 524_288,
        }
    }
}

/// A restart that held the writer at least this long is logged.
const SLOW_RESTART: Duration = Duration::from_millis(50);
/// Catch-up passes before a restart, at most.
const CATCH_UP_PASSES: usize = 8;
/// A catch-up pass this short means little is left for the restart to copy.
const CAUGHT_UP: Duration = Duration::from_millis(15);
/// A PASSIVE checkpoint at least this long is logged.
const SLOW_CHECKPOINT: Duration = Duration::from_millis(100);

/// Bytes of a WAL frame: a 24-byte header and one 4 KiB page. The file starts with 32 bytes.
const WAL_FRAME_BYTES: i64 = 24 + 4096;
const WAL_HEADER_BYTES: i64 = 32;
/// How far past the writer's position the WAL is read ahead, at most: ~18 s of frames at
/// 10,000 wrappers, many checkpoint periods. Never more than a quarter of the WAL's restart
/// size, so a small WAL that starts over often is not read ahead at every cycle.
const READ_AHEAD_BYTES: i64 = 64 << 20;

/// Asks the kernel to read back the part of a reused WAL file the writer is about to overwrite.
///
/// Why: after a restart the writer overwrites the file from its start, and a frame (4,120
/// bytes) never covers whole 4 KiB pages, so writing into a page the kernel has dropped first
/// reads it from disk, inside a commit. At 10,000 wrappers a cycle through the 1 GiB file takes
/// ~85 s, long enough for a page to be reclaimed (this machine pages out file pages idle for
/// 60 s), and the seconds after a restart had most of the slow commits. Read ahead of the writer,
/// the pages are back in memory before it gets there; pages still cached cost a lookup.
struct WalReadAhead {
    path: std::path::PathBuf,
    file: Option<std::fs::File>,
    /// The end of the last range asked for, so each byte is asked for once per cycle.
    asked_to: i64,
    /// How far ahead of the writer to read.
    window: i64,
}

impl WalReadAhead {
    fn new(db: &Path, restart_frames: i64) -> Self {
        let mut path = db.as_os_str().to_owned();
        path.push("-wal");
        Self {
            path: path.into(),
            file: None,
            asked_to: 0,
            window: READ_AHEAD_BYTES.min(restart_frames.saturating_mul(WAL_FRAME_BYTES) / 4),
        }
    }

    /// The byte range to ask for with the writer at frame `frames`, if enough is new to be
    /// worth a call; notes it as asked.
    fn next_range(&mut self, frames: i64) -> Option<(i64, i64)> {
        let at = WAL_HEADER_BYTES + frames * WAL_FRAME_BYTES;
        if at < self.asked_to.saturating_sub(self.window) {
            // The WAL started over (by itself, at light load): start asking from its start.
            self.asked_to = 0;
        }
        let from = self.asked_to.max(at);
        let to = at + self.window;
        if self.window == 0 || to - from < self.window / 4 {
            return None;
        }
        self.asked_to = to;
        Some((from, to))
    }

    /// The writer is at frame `frames`: read ahead of it.
    fn ahead_of(&mut self, frames: i64) {
        let Some((from, to)) = self.next_range(frames) else {
            return;
        };
        if self.file.is_none() {
            self.file = std::fs::File::open(&self.path).ok();
        }
        let Some(file) = &self.file else { return };
        // Advice only: a failure (or a range past the end, while the file still grows) changes
        // nothing but the timing.
        let _ = nix::fcntl::posix_fadvise(
            file,
            from,
            to - from,
            nix::fcntl::PosixFadviseAdvice::POSIX_FADV_WILLNEED,
        );
    }

    /// The WAL was started over: the writer is back at its start.
    fn restarted(&mut self) {
        self.asked_to = 0;
    }
}

/// The running checkpoint thread; dropping it stops the thread and waits for it.
#[derive(Debug)]
pub(super) struct Checkpointer {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        // Closing the channel wakes the thread at once; it finishes the checkpoint it is in.
        self.stop = None;
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            tracing::error!("The checkpoint thread panicked.");
        }
    }
}

impl Checkpointer {
    /// Opens a second connection to `path` and starts the thread.
    pub(super) fn start(
        path: &Path,
        tuning: WalTuning,
        gate: WriteGate,
    ) -> Result<Self, StoreError> {
        let conn = Connection::open(path)?;
        conn.busy_timeout(Duration::from_secs(5))?;
        let mut wal = WalReadAhead::new(path, tuning.restart_frames);
        let (stop, stopped) = mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("checkpoint".into())
            .spawn(move || {
                while let Err(RecvTimeoutError::Timeout) =
                    stopped.recv_timeout(tuning.checkpoint_every)
                {
                    let Some((frames, _)) = passive(&conn) else {
                        continue;
                    };
                    if frames >= tuning.restart_frames {
                        restart(&conn, &gate);
                        wal.restarted();
                    } else {
                        wal.ahead_of(frames);
                    }
                }
            })
            .map_err(|e| StoreError::Io("checkpoint thread".into(), e))?;
        Ok(Self {
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

/// What `PRAGMA wal_checkpoint` reports: whether it was blocked, frames in the WAL, frames
/// copied back.
fn checkpoint(conn: &Connection, mode: &str) -> rusqlite::Result<(bool, i64, i64)> {
    conn.query_row(&format!("PRAGMA wal_checkpoint({mode})"), [], |r| {
        Ok((r.get::<_, i64>(0)? != 0, r.get(1)?, r.get(2)?))
    })
}

/// Copies back what it can beside the writer; returns the WAL's length in frames and how many
/// of them are copied back.
fn passive(conn: &Connection) -> Option<(i64, i64)> {
    let began = Instant::now();
    match checkpoint(conn, "PASSIVE") {
        Ok((_, wal_frames, copied)) => {
            let ms = began.elapsed().as_millis() as u64;
            if began.elapsed() >= SLOW_CHECKPOINT {
                tracing::info!(ms, wal_frames, copied, "Slow WAL checkpoint.");
            } else {
                tracing::debug!(ms, wal_frames, copied, "WAL checkpoint.");
            }
            Some((wal_frames, copied))
        }
        Err(error) => {
            tracing::warn!(%error, "Could not checkpoint the store's WAL.");
            None
        }
    }
}

/// Starts the WAL over: PASSIVE passes until one is short (each copies what was committed
/// during the one before, so they shrink quickly), then a RESTART with the writer held, which
/// copies only the frames of the last few batches (under 100 at 10,000 wrappers). Its fsyncs
/// still take what the disk's tail takes; the passes keep the copy itself from adding to it.
fn restart(conn: &Connection, gate: &WriteGate) {
    let mut passes = 0;
    let mut copied_before = 0;
    while passes < CATCH_UP_PASSES {
        passes += 1;
        let began = Instant::now();
        let Some((_, copied)) = passive(conn) else {
            return;
        };
        copied_before = copied;
        if began.elapsed() < CAUGHT_UP {
            break;
        }
    }
    let waited = Instant::now();
    let held = gate.lock();
    let began = Instant::now();
    let done = checkpoint(conn, "RESTART");
    drop(held);
    let held_ms = began.elapsed().as_millis() as u64;
    let waited_ms = began.duration_since(waited).as_millis() as u64;
    match done {
        Ok((true, wal_frames, copied)) => {
            tracing::warn!(wal_frames, copied, "Could not start the store's WAL over.");
        }
        Ok((false, _, copied)) if began.elapsed() >= SLOW_RESTART => {
            let copied = copied - copied_before;
            tracing::info!(held_ms, waited_ms, copied, passes, "Slow WAL restart.");
        }
        Ok((false, _, copied)) => {
            let copied = copied - copied_before;
            tracing::info!(held_ms, waited_ms, copied, passes, "WAL started over.");
        }
        Err(error) => tracing::warn!(%error, "Could not start the store's WAL over."),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wal_is_read_ahead_of_the_writer_once_per_cycle() {
        let mut ahead = WalReadAhead::new(
            Path::new("/nonexistent/saltpeter.db"),
            WalTuning::default().restart_frames,
        );
        let at = |frames: i64| WAL_HEADER_BYTES + frames * WAL_FRAME_BYTES;
        // From the start, one read-ahead window.
        assert_eq!(ahead.next_range(0), Some((at(0), at(0) + READ_AHEAD_BYTES)));
        // A second later (3,500 frames, ~14 MB) too little is new to ask again.
        assert_eq!(ahead.next_range(3_500), None);
        // Further on, only what was not asked for yet.
        let (from, to) = ahead.next_range(5_000).unwrap();
        assert_eq!(
            (from, to),
            (at(0) + READ_AHEAD_BYTES, at(5_000) + READ_AHEAD_BYTES)
        );
        // After a restart the writer is back at the start, and so is the read-ahead.
        ahead.restarted();
        assert_eq!(
            ahead.next_range(10),
            Some((at(10), at(10) + READ_AHEAD_BYTES))
        );
        // A restart the thread did not see (the WAL started over by itself) is noticed too.
        ahead.next_range(100_000);
        assert_eq!(ahead.next_range(0), Some((at(0), at(0) + READ_AHEAD_BYTES)));
        // A WAL that starts over at 1 MiB is read ahead a quarter of that.
        let mut small = WalReadAhead::new(Path::new("/nonexistent/saltpeter.db"), 256);
        assert_eq!(
            small.next_range(0),
            Some((at(0), at(0) + 256 * WAL_FRAME_BYTES / 4))
        );
    }
}
