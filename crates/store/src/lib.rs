//! Durable state: runs, per-machine results, output chunks, job state, events and the audit
//! trail, so a master restart loses nothing (docs/COMPATIBILITY.md says what survives).
//!
//! This crate owns its own record, query and notice types and knows nothing of the engine: the
//! engine turns its runs into [`RunRecord`]s and [`MachineRecord`]s and is handed [`Notice`]s
//! back through a callback. A backend implements [`Backend`] (applying a batch of ops in one
//! transaction, restoring what was in flight); [`Db`] is the SQLite one, a file under
//! `data_dir`.
//!
//! One owner of the connection: the store thread. The engine never waits on disk; it pushes
//! [`StoreOp`]s down an unbounded channel (bounded in practice by the wrappers' ack windows) and
//! learns that they are durable from [`Notice`]s, which the thread hands back once per
//! committed batch. Ops are applied in order, many per transaction
//! (group commit), so a notice queued after an op is only delivered once that op is on disk.
//! Acks to wrappers wait for these notices: a wrapper never drops output the master could
//! still lose.
//!
//! Queries (history, output ranges) travel the same channel, so they see every earlier write.
//! When several masters share one database (the PostgreSQL backend), a master that gains a job
//! asks [`Query::Takeover`] for that job's unfinished runs, as [`Backend::restore`] returns
//! them at start-up, and one that loses a job sends [`StoreOp::ForgetJob`] so that its backend
//! keeps nothing stale about it.
//! Tests use [`Store::inline_memory`], which applies ops on the caller's thread against an
//! in-memory database: deterministic under tokio's paused clock.

// What no other crate uses is `pub(crate)`, so the compiler reports it once nothing calls it.
#![warn(unreachable_pub)]

pub mod audit;
mod checkpoint;
mod notify_outbox;
pub mod output;
mod outputs;
mod recovery;
mod sqlite;
mod view;

use std::path::Path;
use std::sync::Arc;
use std::sync::mpsc as std_mpsc;

use saltpeter_proto::Cause;
use time::OffsetDateTime;
use tokio::sync::oneshot;

use saltpeter_metrics::Metrics;

pub use checkpoint::WalTuning;
pub use notify_outbox::SqliteOutbox;
pub use output::OutputBuffer;
pub use recovery::{AttemptRecord, AttemptView, MissedReason, MissedRecord};
pub use sqlite::{Db, Retention, StoreError};
pub use view::{
    MachineStatus, MachineView, RunView, TimelineEntry, TimelineQuery, attempt_number, rfc3339,
    stored_cause,
};

/// Identifies one wrapper connection for the engine's lifetime; the store carries it through
/// so an ack reaches the connection that sent the output.
pub type ConnId = u64;

/// A durable backend: the store thread hands it every op in order, a batch per transaction.
/// SQLite ([`Db`]) is the one today; a second backend implements the same two methods.
pub trait Backend: Send + std::fmt::Debug + 'static {
    /// Loads what was in flight when the master stopped.
    fn restore(&mut self) -> Result<Restored, StoreError>;
    /// Applies `batch` in order, durably, and returns the notices it carried (each only once
    /// everything queued before it is durable).
    fn apply(&mut self, batch: Vec<StoreOp>) -> Vec<Notice>;
}

/// A backend chosen at run time (the master opens whichever its settings name).
impl<B: Backend + ?Sized> Backend for Box<B> {
    fn restore(&mut self) -> Result<Restored, StoreError> {
        (**self).restore()
    }

    fn apply(&mut self, batch: Vec<StoreOp>) -> Vec<Notice> {
        (**self).apply(batch)
    }
}

/// Commits start at least this far apart. Under load every commit rewrites the same few pages
/// (the journal's last leaf and its parent, the freelist, the header), so 1,400 tiny commits a
/// second at 10,000 wrappers put ~4,500 frames a second into the WAL for 2.4 MB of output;
/// spacing them groups more messages per commit (measured: ~3,450 frames a second; the rest
/// is the data itself) and costs an ack at most this much. At light load an op arrives after
/// the spacing has passed and is committed at once.
const COMMIT_SPACING: std::time::Duration = std::time::Duration::from_millis(2);

/// A commit at least this slow is logged.
const SLOW_COMMIT: std::time::Duration = std::time::Duration::from_millis(50);

/// A run's durable fields (everything but its machines).
#[derive(Clone, Debug)]
pub struct RunRecord {
    pub instance: String,
    pub job: String,
    pub group: String,
    pub started: OffsetDateTime,
    pub ended: Option<OffsetDateTime>,
    pub success: Option<bool>,
    pub killed: bool,
    pub token: String,
    /// The stored name of how the run's machines prove who they are; the engine parses it.
    pub identity: String,
    pub resolving: bool,
    pub maintenance: Vec<String>,
    pub pending_batches: Vec<Vec<String>>,
}

/// A machine's durable fields (its output is stored as chunks).
#[derive(Clone, Debug)]
pub struct MachineRecord {
    pub instance: String,
    pub machine: String,
    pub status: MachineStatus,
    pub retcode: Option<i64>,
    pub cause: Option<Cause>,
    pub late_retcode: Option<i64>,
    pub starttime: Option<OffsetDateTime>,
    pub endtime: Option<OffsetDateTime>,
    pub last_heartbeat: Option<OffsetDateTime>,
    pub wrapper_version: Option<String>,
    pub pid: Option<u32>,
    pub wrapper_pid: Option<u32>,
    pub launched: bool,
    pub started: bool,
    pub kill_requested: bool,
    pub launch_problem: Option<String>,
    pub modern: bool,
    pub authenticated: bool,
}

/// What the engine remembers about a job between runs.
#[derive(Clone, Debug, Default)]
pub struct JobRecord {
    pub name: String,
    pub last_run: Option<OffsetDateTime>,
    pub last_success: Option<bool>,
    /// When the job last ended successfully (the monitoring stack's staleness signal).
    pub last_success_at: Option<OffsetDateTime>,
    pub last_failed: usize,
    pub last_total: usize,
    /// The latest cron slot that fired, so a restart never fires it again.
    pub last_fired: Option<OffsetDateTime>,
}

/// Tells the engine that everything queued before it is durable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Notice {
    /// Output up to `seq` (or the unnumbered output) of a machine is durable: ack it.
    Output {
        instance: String,
        machine: String,
        seq: Option<u64>,
        conn: ConnId,
        /// When the output was read off the socket; `None` for a resend acked again.
        received: Option<tokio::time::Instant>,
    },
    /// A machine's `complete` is recorded: ack it.
    Complete {
        instance: String,
        machine: String,
        seq: Option<u64>,
        conn: ConnId,
    },
}

/// A restored machine: its record, output held in memory, and where its sequence stands.
#[derive(Debug)]
pub struct RestoredMachine {
    pub record: MachineRecord,
    /// Attempts a retry replaced, oldest first (empty before any retry).
    pub attempts: Vec<AttemptRecord>,
    pub output: OutputBuffer,
    pub next_seq: u64,
}

/// Everything the engine needs after a restart.
#[derive(Debug, Default)]
pub struct Restored {
    /// Runs that had not ended, with their machines.
    pub runs: Vec<(RunRecord, Vec<RestoredMachine>)>,
    pub jobs: Vec<JobRecord>,
}

/// A page of a job's history: one row per run with each machine's code, where [`RunView`] is
/// one run in full (output included), so a page of 50 runs stays small.
#[derive(Clone, Debug, serde::Serialize)]
pub struct RunSummary {
    pub instance: String,
    pub job: String,
    pub started: String,
    pub ended: Option<String>,
    pub success: Option<bool>,
    pub killed: bool,
    /// machine -> retcode (null while running).
    pub machines: std::collections::BTreeMap<String, Option<i64>>,
    /// For a missed slot: why it did not run (`master_down`, `overlap`, `maintenance`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub missed: Option<String>,
    /// For a missed slot: how many slots the row stands for (more than 1 for a summary).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub missed_count: Option<u64>,
}

/// A byte range of a machine's stored output.
#[derive(Clone, Debug)]
pub struct OutputRange {
    pub text: String,
    pub total_bytes: u64,
    pub dropped_bytes: u64,
}

/// A question for the store thread.
#[derive(Debug)]
pub enum Query {
    Runs {
        job: String,
        before: Option<String>,
        limit: usize,
        reply: oneshot::Sender<Result<Vec<RunSummary>, StoreError>>,
    },
    Run {
        instance: String,
        reply: oneshot::Sender<Result<Option<RunView>, StoreError>>,
    },
    Output {
        instance: String,
        machine: String,
        offset: u64,
        length: Option<u64>,
        reply: oneshot::Sender<Result<Option<OutputRange>, StoreError>>,
    },
    /// Audit entries, newest first: those with an id below `before` (when given), at most
    /// `limit`.
    Audit {
        before: Option<i64>,
        limit: usize,
        reply: oneshot::Sender<Result<Vec<crate::audit::AuditEntry>, StoreError>>,
    },
    /// Runs overlapping a time window, oldest first, for the UI timeline.
    Timeline {
        query: crate::TimelineQuery,
        reply: oneshot::Sender<Result<Vec<crate::TimelineEntry>, StoreError>>,
    },
    /// What [`Backend::restore`] returns, for one job: its unfinished runs (machines, attempts,
    /// output and `next_seq` as stored, whoever wrote them) and its [`JobRecord`] in
    /// `Restored::jobs` (none if it never ran). A master sends this when it gains a job that
    /// another master held. Once answered, the backend treats those runs as active exactly as
    /// after a restore: later ops for them continue from what the database holds, not from
    /// what this backend remembered of the job before. Other jobs are left as they are.
    Takeover {
        job: String,
        reply: oneshot::Sender<Result<Restored, StoreError>>,
    },
}

/// One unit of work for the store, applied in order.
#[derive(Debug)]
pub enum StoreOp {
    Run(RunRecord),
    Machine(MachineRecord),
    /// Appends text to a machine's output; `seq` also advances its stored sequence.
    Output {
        instance: String,
        machine: String,
        seq: Option<u64>,
        data: String,
    },
    Job(JobRecord),
    /// Appends an entry to the audit trail.
    Audit(crate::audit::AuditRecord),
    Notify(Notice),
    Query(Query),
    /// Applies the retention policy now.
    Prune,
    /// Records a missed slot in the job's history.
    Missed(MissedRecord),
    /// Keeps the result of an attempt that a retry replaces.
    Attempt(AttemptRecord),
    /// This master no longer holds the job (another master took it, or it was released): the
    /// backend drops what it keeps in memory about the job's active runs, so nothing stale is
    /// used if the job comes back ([`Query::Takeover`] reloads it). Writes nothing.
    ForgetJob(String),
}

/// Handle to the store.
#[derive(Debug)]
pub struct Store {
    mode: Mode,
}

#[derive(Debug)]
enum Mode {
    Thread {
        tx: std_mpsc::Sender<StoreOp>,
        thread: std::thread::JoinHandle<()>,
    },
    Inline {
        db: Box<dyn Backend>,
        notices: Vec<Notice>,
    },
}

impl Store {
    /// Opens (creating and migrating) `<data_dir>/saltpeter.db` and loads what was in flight.
    /// The store thread starts later, with [`Store::start`], once the engine's channel exists.
    pub fn open(data_dir: &Path, retention: Retention) -> Result<(Db, Restored), StoreError> {
        let io = |path: &Path| {
            let path = path.display().to_string();
            move |e| StoreError::Io(path, e)
        };
        saltpeter_files::create_dir(data_dir).map_err(io(data_dir))?;
        if saltpeter_files::is_open_to_others(data_dir) {
            tracing::warn!(data_dir = %data_dir.display(), "The data directory can be read by other users; it holds job output and run tokens.");
        }
        // SQLite gives its WAL and shared-memory files the database file's mode, so creating
        // the file private first covers all three.
        let path = data_dir.join("saltpeter.db");
        saltpeter_files::open_append(&path).map_err(io(&path))?;
        if saltpeter_files::restrict_file(&path).map_err(io(&path))? {
            tracing::warn!(path = %path.display(), "The store was readable by other users; it is private now.");
        }
        for side in ["saltpeter.db-wal", "saltpeter.db-shm"] {
            let side = data_dir.join(side);
            if side.exists() {
                saltpeter_files::restrict_file(&side).map_err(io(&side))?;
            }
        }
        let mut db = sqlite::Db::open(&path, retention)?;
        let restored = db.restore()?;
        Ok((db, restored))
    }

    /// Starts the store thread over `db`. Each committed batch's notices go to `deliver`;
    /// once it returns false (the engine stopped listening) later notices are dropped.
    pub fn start(
        mut db: impl Backend,
        deliver: impl FnMut(Vec<Notice>) -> bool + Send + 'static,
        metrics: Arc<Metrics>,
    ) -> Result<Store, StoreError> {
        let (tx, rx) = std_mpsc::channel::<StoreOp>();
        let thread = std::thread::Builder::new()
            .name("store".into())
            .spawn(move || {
                // Once the engine stops listening its notices are dropped, but every op queued
                // before the handle closed is still committed: that is the final commit.
                let mut deliver = Some(deliver);
                let mut last_began: Option<std::time::Instant> = None;
                while let Ok(first) = rx.recv() {
                    if let Some(wait) = last_began
                        .map(|t| {
                            (t + COMMIT_SPACING)
                                .saturating_duration_since(std::time::Instant::now())
                        })
                        .filter(|wait| !wait.is_zero())
                    {
                        std::thread::sleep(wait);
                    }
                    let mut batch = vec![first];
                    // Group commit: everything already queued goes into this transaction.
                    while batch.len() < 50_000 {
                        match rx.try_recv() {
                            Ok(op) => batch.push(op),
                            Err(_) => break,
                        }
                    }
                    let began = std::time::Instant::now();
                    last_began = Some(began);
                    let ops = batch.len();
                    let notices = db.apply(batch);
                    let took = began.elapsed();
                    metrics.store_commit.observe(took);
                    if took >= SLOW_COMMIT {
                        // Every ack of the batch waited this long; say so where operators look.
                        tracing::warn!(ms = took.as_millis() as u64, ops, "Slow store commit.");
                    }
                    metrics.store_ops(ops);
                    if !notices.is_empty()
                        && let Some(to) = &mut deliver
                        && !to(notices)
                    {
                        deliver = None;
                    }
                }
            })
            .map_err(|e| StoreError::Io("store thread".into(), e))?;
        Ok(Store {
            mode: Mode::Thread { tx, thread },
        })
    }

    /// Commits everything queued and stops the store thread, waiting for it. The engine's
    /// receiver must be closed first, so the thread never waits to hand it a notice.
    pub fn close(self) {
        match self.mode {
            Mode::Thread { tx, thread } => {
                drop(tx);
                if thread.join().is_err() {
                    tracing::error!("The store thread panicked.");
                }
            }
            Mode::Inline { .. } => {}
        }
    }

    /// A store applied on the caller's thread (tests that need a file, e.g. restarts).
    pub fn inline(db: impl Backend) -> Store {
        Store {
            mode: Mode::Inline {
                db: Box::new(db),
                notices: Vec::new(),
            },
        }
    }

    /// An in-memory store applied on the caller's thread (tests).
    pub fn inline_memory() -> Result<(Store, Restored), StoreError> {
        let db = sqlite::Db::open(Path::new(":memory:"), Retention::default())?;
        Ok((
            Store {
                mode: Mode::Inline {
                    db: Box::new(db),
                    notices: Vec::new(),
                },
            },
            Restored::default(),
        ))
    }

    /// Queues an op.
    pub fn push(&mut self, op: StoreOp) {
        match &mut self.mode {
            Mode::Thread { tx, .. } => {
                // The thread only ends when this handle is closed.
                let _ = tx.send(op);
            }
            Mode::Inline { db, notices } => notices.extend(db.apply(vec![op])),
        }
    }

    /// Notices that inline mode produced since the last call (always empty for the thread).
    pub fn take_inline_notices(&mut self) -> Vec<Notice> {
        match &mut self.mode {
            Mode::Thread { .. } => Vec::new(),
            Mode::Inline { notices, .. } => std::mem::take(notices),
        }
    }
}
