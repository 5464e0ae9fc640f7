//! Keeps the store's write-ahead log small without stalling commits: a thread with its own
//! connection copies the WAL back into the database file, and now and then starts the WAL over.
//!
//! Why a thread: a checkpoint copies pages and waits for two fsyncs; done by the committing
//! thread (SQLite's automatic checkpoint), that wait held every ack of the batch (issue 7:
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

/// The running checkpoint thread; dropping it stops the thread.
#[derive(Debug)]
pub(super) struct Checkpointer {
    _stop: mpsc::Sender<()>,
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
        let (stop, stopped) = mpsc::channel::<()>();
        std::thread::Builder::new()
            .name("checkpoint".into())
            .spawn(move || {
                while let Err(RecvTimeoutError::Timeout) =
                    stopped.recv_timeout(tuning.checkpoint_every)
                {
                    if passive(&conn).is_some_and(|(frames, _)| frames >= tuning.restart_frames) {
                        restart(&conn, &gate);
                    }
                }
            })
            .map_err(|e| StoreError::Io("checkpoint thread".into(), e))?;
        Ok(Self { _stop: stop })
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
