//! The store's [`Backend`] on PostgreSQL: the same ops, restore and history queries as the
//! SQLite backend of `saltpeter-store`, translated to the schema in [`crate::schema`].
//!
//! **Threading.** `Backend` is synchronous: the store thread hands it one batch at a time.
//! [`PgBackend`] owns a current-thread tokio runtime and blocks on it for each batch, so the
//! driver is the crate's tokio-postgres (with its rustls TLS and its pool) and not a second
//! client. The blocking `postgres` crate would not be lighter: it wraps the same driver in a
//! runtime of its own, and would need its TLS connector wired a second time. Opening happens on
//! a short-lived thread of its own, because the master opens its store from within its async
//! main, where a runtime may not block.
//!
//! **Transactions.** A batch is one transaction, as in SQLite (group commit). PostgreSQL aborts
//! a whole transaction at the first failing statement, where SQLite skips the failing op and
//! commits the rest; so when a batch fails, it is applied again one op per transaction, and an
//! op the server refuses is logged and skipped. A failure of the connection itself, or an op
//! whose job's lease is lost, drops the batch's notices: nothing is acked that is not
//! committed, and the wrappers resend.
//!
//! **Output.** Each message is one chunk row, head or tail, decided as the SQLite backend
//! decides it per message; the oldest tail chunks beyond `tail_bytes` are deleted, always
//! keeping the newest. SQLite needs an append-only journal to keep thousands of machines'
//! messages from rewriting thousands of B-tree pages per commit; PostgreSQL appends rows to its
//! heap and logs row changes, so the journal table of the schema is left unused. A machine's
//! totals (bytes, dropped, next sequence) are kept in memory while its run is active and
//! written once per batch in which they changed.
//!
//! **Statements per batch.** Every statement is a round trip to the server, and the batch's
//! transaction holds its jobs' lease rows (see fencing) until it commits. One statement per
//! message made a batch from 5,000 machines last over a second on two shared cores: acks
//! waited for it, and the coordinator's renewals waited for the lease rows until leases ran
//! out. So the chunk rows of a batch's consecutive messages are inserted by one statement
//! (arrays unnested, flushed before any other op, so statements keep the ops' order), and the
//! machines' totals by one more at the end of the batch.
//!
//! **Fencing.** When several masters share the database, each write for a job's runs must
//! carry the job's lease ([`Fence`]). A [`FenceHook`] says which fence a job's writes carry;
//! the first write of a batch for a job locks and checks its lease row (see
//! [`crate::lease::begin_fenced`]), so the whole batch's writes for that job commit under that
//! epoch or not at all, and new runs record the epoch they were started under. Without a hook
//! (one master) writes are plain.
//!
//! **Takeover.** What the backend keeps in memory about a run (its job, for the fence, and
//! its machines' output totals) is only true while no other master writes for the job. A
//! master that gains a job sends `Query::Takeover`: the backend drops what it knew of the job,
//! reads the job's unfinished runs as `restore` does, and makes them its active runs, so the
//! next output for a machine is numbered and counted after what the previous holder
//! committed. A master that loses a job sends `StoreOp::ForgetJob`, which drops the same
//! bookkeeping and writes nothing. Both act in their place in the batch: the writes queued
//! before them are committed first, so that a takeover reads them and no totals wait to be
//! written for a forgotten machine.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use deadpool_postgres::Transaction;
use saltpeter_proto::{Cause, Timestamp};
use saltpeter_store::{
    AttemptRecord, Backend, JobRecord, MachineRecord, MachineStatus, Notice, OutputBuffer,
    OutputRange, Query, Restored, RestoredMachine, Retention, RunRecord, RunSummary, RunView,
    StoreError, StoreOp, TimelineEntry, TimelineQuery, audit::AuditEntry,
};
use time::OffsetDateTime;
use tokio_postgres::types::ToSql;

use crate::{Database, Error, Fence, PostgresUrl, Result, schema};

/// Which fence the writes for a job carry: `None` for a plain write. Called once per job per
/// batch, on the store thread.
pub type FenceHook = Arc<dyn Fn(&str) -> Option<Fence> + Send + Sync>;

/// How often the backend applies the retention policy on its own (as the SQLite backend).
const PRUNE_EVERY: Duration = Duration::from_secs(3600);

/// The most chunk rows, and bytes of output, one insert carries: a statement stays well within
/// the server's limits on a message, and a batch of large messages is sent in parts.
const INSERT_ROWS: usize = 10_000;
const INSERT_BYTES: usize = 16 << 20;

/// Connections the backend's pool may open: one for the store thread, one spare for a
/// connection that broke and is being replaced.
const CONNECTIONS: usize = 2;

type Key = (String, String);
type Param<'a> = &'a (dyn ToSql + Sync);

/// A machine's output bookkeeping while its run is active.
#[derive(Debug, Default)]
struct OutputState {
    next_idx: i64,
    /// Bytes received.
    total: u64,
    head: u64,
    tail_bytes: u64,
    tail_chunks: u64,
    /// No tail chunk has an index below this.
    tail_from: i64,
    dropped: u64,
    /// The highest `seq + 1` seen since the totals were last written.
    next_seq: Option<u64>,
    dirty: bool,
}

/// Chunk rows not yet sent to the server, column by column (the arrays one insert unnests).
#[derive(Debug, Default)]
struct PendingChunks {
    instance: Vec<String>,
    machine: Vec<String>,
    idx: Vec<i64>,
    byte_offset: Vec<i64>,
    head: Vec<bool>,
    data: Vec<Vec<u8>>,
    bytes: usize,
}

impl PendingChunks {
    fn push(&mut self, key: &Key, idx: i64, byte_offset: i64, head: bool, data: &str) {
        self.instance.push(key.0.clone());
        self.machine.push(key.1.clone());
        self.idx.push(idx);
        self.byte_offset.push(byte_offset);
        self.head.push(head);
        self.data.push(data.as_bytes().to_vec());
        self.bytes = self.bytes.saturating_add(data.len());
    }

    fn is_empty(&self) -> bool {
        self.idx.is_empty()
    }

    fn is_full(&self) -> bool {
        self.idx.len() >= INSERT_ROWS || self.bytes >= INSERT_BYTES
    }
}

/// The state the store thread's batches work on.
struct State {
    db: Database,
    retention: Retention,
    outputs: HashMap<Key, OutputState>,
    /// Chunk rows of this transaction's latest messages, inserted together.
    chunks: PendingChunks,
    /// Machines whose totals changed in this batch.
    dirty: Vec<Key>,
    /// Machines of runs that ended in this batch, forgotten once their totals are written.
    forget: Vec<Key>,
    /// The job of each active run, so that writes for its machines carry the job's fence.
    run_jobs: HashMap<String, String>,
    fences: Option<FenceHook>,
    last_prune: Option<Instant>,
}

/// The PostgreSQL backend of the store.
pub struct PgBackend {
    /// Declared first so it is dropped first: its connections end before the runtime does.
    state: State,
    runtime: OwnRuntime,
}

/// The backend's own runtime, shut down without waiting when the backend is dropped: a backend
/// dropped inside an async context (a start-up that fails after the store opened) must not
/// block there, and dropping a runtime would.
struct OwnRuntime(Option<tokio::runtime::Runtime>);

impl std::ops::Deref for OwnRuntime {
    type Target = tokio::runtime::Runtime;

    fn deref(&self) -> &Self::Target {
        // Only `drop` takes it out.
        self.0
            .as_ref()
            .expect("the runtime is present until the backend is dropped")
    }
}

impl Drop for OwnRuntime {
    fn drop(&mut self) {
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}

impl fmt::Debug for PgBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgBackend")
            .field("url", &self.state.db.url())
            .field("retention", &self.state.retention)
            .field("active_machines", &self.state.outputs.len())
            .field("fenced", &self.state.fences.is_some())
            .finish()
    }
}

/// The store's error for one of this crate's.
fn store_error(e: Error) -> StoreError {
    StoreError::Backend(Box::new(e))
}

impl PgBackend {
    /// Connects, migrates the schema and loads what was in flight. Safe to call from within
    /// an async context: the work happens on a thread of its own.
    pub fn open(url: &PostgresUrl, retention: Retention) -> Result<(Self, Restored), StoreError> {
        let url = url.clone();
        std::thread::Builder::new()
            .name("store-open".into())
            .spawn(move || -> Result<(Self, Restored), StoreError> {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| StoreError::Io("store runtime".into(), e))?;
                let db = runtime
                    .block_on(async {
                        let db = Database::connect(&url, CONNECTIONS).await?;
                        db.timed(schema::migrate(&db)).await?;
                        Ok::<_, Error>(db)
                    })
                    .map_err(store_error)?;
                let mut backend = PgBackend {
                    state: State {
                        db,
                        retention,
                        outputs: HashMap::new(),
                        chunks: PendingChunks::default(),
                        dirty: Vec::new(),
                        forget: Vec::new(),
                        run_jobs: HashMap::new(),
                        fences: None,
                        last_prune: None,
                    },
                    runtime: OwnRuntime(Some(runtime)),
                };
                let restored = backend.restore()?;
                Ok((backend, restored))
            })
            .map_err(|e| StoreError::Io("store-open thread".into(), e))?
            .join()
            .unwrap_or_else(|_| {
                Err(StoreError::Io(
                    "store-open thread".into(),
                    std::io::Error::other("panicked"),
                ))
            })
    }

    /// Fences every later write for a job's runs with what `hook` returns for the job (the
    /// multi-master wiring sets this; one master leaves it unset).
    pub fn with_fences(mut self, hook: FenceHook) -> Self {
        self.state.fences = Some(hook);
        self
    }
}

impl Backend for PgBackend {
    fn restore(&mut self) -> Result<Restored, StoreError> {
        let Self { state, runtime } = self;
        runtime.block_on(state.restore()).map_err(store_error)
    }

    fn apply(&mut self, batch: Vec<StoreOp>) -> Vec<Notice> {
        let Self { state, runtime } = self;
        let mut notices = Vec::new();
        let mut queries = Vec::new();
        let mut writes = Vec::with_capacity(batch.len());
        let mut stored = true;
        for op in batch {
            match op {
                StoreOp::Notify(n) => notices.push(n),
                // A takeover reads what the ops before it wrote, and the ops after it continue
                // from what it loaded: the writes queued so far are committed first. Takeovers
                // are rare (a lease changing hands), so splitting a batch here costs nothing
                // in the common case.
                StoreOp::Query(Query::Takeover { job, reply }) => {
                    stored &= state.commit(runtime, &std::mem::take(&mut writes));
                    let restored = runtime.block_on(state.takeover(&job));
                    let _ = reply.send(restored.map_err(store_error));
                }
                StoreOp::Query(q) => queries.push(q),
                // The job's machines' totals are written before their bookkeeping goes, so
                // committing what came before is part of forgetting.
                StoreOp::ForgetJob(job) => {
                    stored &= state.commit(runtime, &std::mem::take(&mut writes));
                    state.forget_job(&job);
                }
                op => writes.push(op),
            }
        }
        stored &= state.commit(runtime, &writes);
        if !stored {
            notices.clear();
        }
        // Queries run after the batch's writes, so they see them.
        for q in queries {
            runtime.block_on(state.answer(q));
        }
        if state.last_prune.is_none_or(|t| t.elapsed() >= PRUNE_EVERY) {
            state.last_prune = Some(Instant::now());
            if let Err(error) = runtime.block_on(state.write(&[StoreOp::Prune])) {
                tracing::warn!(%error, "Could not apply the retention policy.");
            }
        }
        notices
    }
}

/// Whether a failed op is the op's own fault (the server refused it), so the others may still
/// commit; otherwise the connection failed.
fn skippable(error: &Error) -> bool {
    match error {
        Error::Db(e) => e.as_db_error().is_some(),
        _ => false,
    }
}

fn ts(at: OffsetDateTime) -> String {
    Timestamp::new(at).to_string()
}

/// A count or size from the database, where a negative value (a corrupt row) counts as zero.
fn unsigned(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

/// A count or size for the database, saturating rather than wrapping.
fn signed(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// A process id as stored (BIGINT) and back.
fn pid_out(pid: Option<u32>) -> Option<i64> {
    pid.map(i64::from)
}

fn pid_in(pid: Option<i64>) -> Option<u32> {
    pid.and_then(|p| u32::try_from(p).ok())
}

fn text(data: Vec<u8>) -> String {
    String::from_utf8(data).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

/// The start time before which finished runs are too old; every run is kept when the limit
/// reaches past the calendar.
fn age_cutoff(now: OffsetDateTime, max_age_days: u32) -> OffsetDateTime {
    now.checked_sub(time::Duration::days(max_age_days.into()))
        .unwrap_or(time::PrimitiveDateTime::MIN.assume_utc())
}

const RUN_COLUMNS: &str = "instance, job, grp, started, ended, success, killed, token, resolving,
    maintenance, pending_batches, identity";

fn run_from_row(r: &tokio_postgres::Row) -> Result<RunRecord> {
    let maintenance: String = r.try_get(9)?;
    let batches: String = r.try_get(10)?;
    Ok(RunRecord {
        instance: r.try_get(0)?,
        job: r.try_get(1)?,
        group: r.try_get(2)?,
        started: r.try_get(3)?,
        ended: r.try_get(4)?,
        success: r.try_get(5)?,
        killed: r.try_get(6)?,
        token: r.try_get(7)?,
        resolving: r.try_get(8)?,
        maintenance: serde_json::from_str(&maintenance).unwrap_or_default(),
        pending_batches: serde_json::from_str(&batches).unwrap_or_default(),
        identity: r.try_get(11)?,
    })
}

impl State {
    /// Runs one statement within the store's bound.
    async fn exec(&self, tx: &Transaction<'_>, sql: &str, params: &[Param<'_>]) -> Result<u64> {
        self.db
            .timed(async {
                let statement = tx.prepare_cached(sql).await?;
                Ok(tx.execute(&statement, params).await?)
            })
            .await
    }

    /// Runs one query within the store's bound.
    async fn query(
        &self,
        tx: &Transaction<'_>,
        sql: &str,
        params: &[Param<'_>],
    ) -> Result<Vec<tokio_postgres::Row>> {
        self.db
            .timed(async {
                let statement = tx.prepare_cached(sql).await?;
                Ok(tx.query(&statement, params).await?)
            })
            .await
    }

    async fn query_opt(
        &self,
        tx: &Transaction<'_>,
        sql: &str,
        params: &[Param<'_>],
    ) -> Result<Option<tokio_postgres::Row>> {
        Ok(self.query(tx, sql, params).await?.into_iter().next())
    }

    /// Applies `writes` in one transaction, or one op per transaction once that fails: an op
    /// the server refuses is logged and skipped. Returns whether the notices queued with them
    /// may go out: not when a job's lease was lost (its wrappers must resend to whoever holds
    /// the job now) nor when the database itself failed.
    fn commit(&mut self, runtime: &tokio::runtime::Runtime, writes: &[StoreOp]) -> bool {
        if writes.is_empty() {
            return true;
        }
        let Err(error) = runtime.block_on(self.write(writes)) else {
            return true;
        };
        self.lost_batch();
        tracing::warn!(%error, ops = writes.len(), "A store batch failed; applying its ops one by one.");
        let mut stored = true;
        for op in writes {
            match runtime.block_on(self.write(std::slice::from_ref(op))) {
                Ok(()) => {}
                Err(error) if error.is_lost_lease() => {
                    // Another master holds the job now: its wrappers must not drop what this
                    // master could not store, so nothing of the batch is acked and they
                    // resend to whoever holds the job.
                    self.lost_batch();
                    tracing::warn!(%error, "Not stored: the job's lease is lost.");
                    stored = false;
                }
                Err(error) if skippable(&error) => {
                    self.lost_batch();
                    tracing::error!(%error, "Could not store an update.");
                }
                Err(error) => {
                    self.lost_batch();
                    tracing::error!(%error, "Could not commit to the store; nothing of this batch is acked.");
                    return false;
                }
            }
        }
        stored
    }

    /// Drops what this backend keeps about `job`'s active runs: which job each belongs to
    /// (so no write for them carries a fence any longer) and their machines' output
    /// bookkeeping, which is read again from the database when next needed. Called between
    /// transactions, when no totals are waiting to be written.
    fn forget_job(&mut self, job: &str) {
        let instances: HashSet<String> = self
            .run_jobs
            .iter()
            .filter(|(_, j)| *j == job)
            .map(|(instance, _)| instance.clone())
            .collect();
        self.run_jobs.retain(|_, j| j != job);
        self.outputs
            .retain(|(instance, _), _| !instances.contains(instance));
    }

    /// Loads `job`'s unfinished runs and its record as another master left them, and makes
    /// them this backend's active runs of the job, as [`State::restore`] does for all jobs.
    /// What the backend knew of the job before is dropped first, so after an error it knows
    /// nothing of it (as after [`StoreOp::ForgetJob`]) rather than something stale.
    async fn takeover(&mut self, job: &str) -> Result<Restored> {
        self.forget_job(job);
        let restored = self.read(async |s, tx| s.load(tx, Some(job)).await).await?;
        for (run, _) in &restored.runs {
            // Bookkeeping of a run this backend knew under no job (output for a run it never
            // saw start) is dropped too: the output of a taken-over run continues from the
            // database.
            self.outputs
                .retain(|(instance, _), _| *instance != run.instance);
            self.run_jobs.insert(run.instance.clone(), run.job.clone());
        }
        Ok(restored)
    }

    /// After a failed transaction the in-memory totals may be ahead of the database: forget
    /// them, so they are read again from what was committed.
    fn lost_batch(&mut self) {
        self.chunks = PendingChunks::default();
        self.outputs.clear();
        self.dirty.clear();
        self.forget.clear();
    }

    /// Applies `ops` in one transaction.
    async fn write(&mut self, ops: &[StoreOp]) -> Result<()> {
        let db = self.db.clone();
        let mut client = db.client().await?;
        let tx = db.timed(async { Ok(client.transaction().await?) }).await?;
        let mut fenced = HashSet::new();
        self.chunks = PendingChunks::default();
        for op in ops {
            if !matches!(op, StoreOp::Output { .. }) {
                self.flush_chunks(&tx).await?;
            }
            self.apply_one(&tx, op, &mut fenced).await?;
        }
        self.flush_chunks(&tx).await?;
        self.flush_totals(&tx).await?;
        db.timed(async { Ok(tx.commit().await?) }).await?;
        for key in std::mem::take(&mut self.forget) {
            self.outputs.remove(&key);
        }
        Ok(())
    }

    /// The job of a run, for the fence its writes carry. A run this backend does not track
    /// (it ended, or its job was forgotten when the lease was lost) is looked up in the
    /// database when writes are fenced, so that no write of a cluster's master goes unfenced.
    async fn job_for(&self, tx: &Transaction<'_>, instance: &str) -> Result<Option<String>> {
        if let Some(job) = self.run_jobs.get(instance) {
            return Ok(Some(job.clone()));
        }
        if self.fences.is_none() {
            return Ok(None);
        }
        let row = self
            .query_opt(tx, "SELECT job FROM runs WHERE instance = $1", &[&instance])
            .await?;
        row.map(|r| r.try_get::<_, String>(0))
            .transpose()
            .map_err(Error::from)
    }

    /// Checks, once per batch and job, that this master still holds the job's lease, and
    /// returns the epoch the job's writes carry (`None` without fencing).
    async fn fence(
        &self,
        tx: &Transaction<'_>,
        job: Option<&str>,
        fenced: &mut HashSet<String>,
    ) -> Result<Option<i64>> {
        let (Some(hook), Some(job)) = (&self.fences, job) else {
            return Ok(None);
        };
        let Some(fence) = hook(job) else {
            return Ok(None);
        };
        if !fenced.contains(job) {
            self.db.timed(crate::lease::check_fence(tx, &fence)).await?;
            fenced.insert(job.to_owned());
        }
        Ok(Some(fence.epoch.0))
    }

    async fn apply_one(
        &mut self,
        tx: &Transaction<'_>,
        op: &StoreOp,
        fenced: &mut HashSet<String>,
    ) -> Result<()> {
        match op {
            StoreOp::Run(r) => {
                let epoch = self.fence(tx, Some(&r.job), fenced).await?;
                let maintenance = serde_json::to_string(&r.maintenance).unwrap_or_default();
                let batches = serde_json::to_string(&r.pending_batches).unwrap_or_default();
                self.exec(
                    tx,
                    "INSERT INTO runs (instance, job, grp, started, ended, success, killed, token,
                                       resolving, maintenance, pending_batches, identity, epoch)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)
                     ON CONFLICT (instance) DO UPDATE SET ended = $5, success = $6, killed = $7,
                        resolving = $9, maintenance = $10, pending_batches = $11",
                    &[
                        &r.instance,
                        &r.job,
                        &r.group,
                        &r.started,
                        &r.ended,
                        &r.success,
                        &r.killed,
                        &r.token,
                        &r.resolving,
                        &maintenance,
                        &batches,
                        &r.identity,
                        &epoch,
                    ],
                )
                .await?;
                if r.ended.is_some() {
                    self.run_jobs.remove(&r.instance);
                    // Its machines' totals are written at the end of this batch, then dropped.
                    self.forget.extend(
                        self.outputs
                            .keys()
                            .filter(|(instance, _)| *instance == r.instance)
                            .cloned(),
                    );
                } else {
                    self.run_jobs.insert(r.instance.clone(), r.job.clone());
                }
            }
            StoreOp::Machine(m) => {
                let job = self.job_for(tx, &m.instance).await?;
                self.fence(tx, job.as_deref(), fenced).await?;
                self.exec(
                    tx,
                    "INSERT INTO machines (instance, machine, status, retcode, cause, late_retcode,
                        starttime, endtime, last_heartbeat, wrapper_version, pid, wrapper_pid,
                        launched, started, kill_requested, launch_problem, modern, authenticated)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15,
                        $16, $17, $18)
                     ON CONFLICT (instance, machine) DO UPDATE SET status = $3, retcode = $4,
                        cause = $5, late_retcode = $6, starttime = $7, endtime = $8,
                        last_heartbeat = $9, wrapper_version = $10, pid = $11, wrapper_pid = $12,
                        launched = $13, started = $14, kill_requested = $15,
                        launch_problem = $16, modern = $17, authenticated = $18",
                    &[
                        &m.instance,
                        &m.machine,
                        &m.status.as_str(),
                        &m.retcode,
                        &m.cause.map(Cause::as_str),
                        &m.late_retcode,
                        &m.starttime,
                        &m.endtime,
                        &m.last_heartbeat,
                        &m.wrapper_version,
                        &pid_out(m.pid),
                        &pid_out(m.wrapper_pid),
                        &m.launched,
                        &m.started,
                        &m.kill_requested,
                        &m.launch_problem,
                        &m.modern,
                        &m.authenticated,
                    ],
                )
                .await?;
            }
            StoreOp::Output {
                instance,
                machine,
                seq,
                data,
            } => {
                let job = self.job_for(tx, instance).await?;
                self.fence(tx, job.as_deref(), fenced).await?;
                self.append(tx, (instance.clone(), machine.clone()), *seq, data)
                    .await?;
            }
            StoreOp::Job(j) => {
                self.fence(tx, Some(&j.name), fenced).await?;
                self.exec(
                    tx,
                    "INSERT INTO jobs (name, last_run, last_success, last_failed, last_total,
                        last_fired, last_success_at)
                     VALUES ($1, $2, $3, $4, $5, $6, $7)
                     ON CONFLICT (name) DO UPDATE SET last_run = $2, last_success = $3,
                        last_failed = $4, last_total = $5, last_fired = $6, last_success_at = $7",
                    &[
                        &j.name,
                        &j.last_run,
                        &j.last_success,
                        &i64::try_from(j.last_failed).unwrap_or(i64::MAX),
                        &i64::try_from(j.last_total).unwrap_or(i64::MAX),
                        &j.last_fired,
                        &j.last_success_at,
                    ],
                )
                .await?;
            }
            StoreOp::Audit(a) => {
                let source = a.actor.source.map(|ip| ip.to_string());
                let row = self
                    .query_opt(
                        tx,
                        "INSERT INTO audit (at, actor, source, action, job, instance, machine, ok,
                            detail)
                         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) RETURNING id",
                        &[
                            &a.at,
                            &a.actor.name,
                            &source,
                            &a.action.as_str(),
                            &a.job,
                            &a.instance,
                            &a.machine,
                            &a.ok,
                            &a.detail,
                        ],
                    )
                    .await?;
                let id: i64 = row.map(|r| r.try_get(0)).transpose()?.unwrap_or(0);
                // As in SQLite: every thousandth entry trims the trail to its cap, so even a
                // client starting runs in a loop between two prunes leaves it bounded.
                if id.rem_euclid(1000) == 0 {
                    self.trim_audit(tx).await?;
                }
            }
            StoreOp::Missed(m) => {
                self.fence(tx, Some(&m.job), fenced).await?;
                self.exec(
                    tx,
                    "INSERT INTO runs (instance, job, grp, started, ended, success, killed, token,
                                       resolving, maintenance, pending_batches, missed,
                                       missed_count)
                     VALUES ($1, $2, $3, $4, $4, NULL, FALSE, '', FALSE, '[]', '[]', $5, $6)
                     ON CONFLICT (instance) DO NOTHING",
                    &[
                        &m.instance,
                        &m.job,
                        &m.group,
                        &m.slot,
                        &m.reason.as_str(),
                        &i64::try_from(m.count).unwrap_or(i64::MAX),
                    ],
                )
                .await?;
            }
            StoreOp::Attempt(a) => {
                let job = self.job_for(tx, &a.instance).await?;
                self.fence(tx, job.as_deref(), fenced).await?;
                self.exec(
                    tx,
                    "INSERT INTO attempts (instance, machine, attempt, retcode, cause, starttime,
                                           endtime)
                     VALUES ($1, $2, $3, $4, $5, $6, $7)
                     ON CONFLICT (instance, machine, attempt) DO UPDATE SET retcode = $4,
                        cause = $5, starttime = $6, endtime = $7",
                    &[
                        &a.instance,
                        &a.machine,
                        &i64::from(a.attempt),
                        &a.retcode,
                        &a.cause.map(Cause::as_str),
                        &a.starttime,
                        &a.endtime,
                    ],
                )
                .await?;
                // The next attempt numbers its output from 0 again: forget the sequence held
                // for this batch, so the batch's end does not write the old one back.
                if let Some(state) = self
                    .outputs
                    .get_mut(&(a.instance.clone(), a.machine.clone()))
                {
                    state.next_seq = None;
                }
                self.exec(
                    tx,
                    "UPDATE machines SET next_seq = 0 WHERE instance = $1 AND machine = $2",
                    &[&a.instance, &a.machine],
                )
                .await?;
            }
            StoreOp::Prune => self.prune(tx).await?,
            // `PgBackend::apply` handles these itself, in their place in the batch.
            StoreOp::Notify(_) | StoreOp::Query(_) | StoreOp::ForgetJob(_) => {}
        }
        Ok(())
    }

    /// Loads (once per active run) a machine's output bookkeeping from what is stored.
    async fn output_state(&mut self, tx: &Transaction<'_>, key: &Key) -> Result<()> {
        if self.outputs.contains_key(key) {
            return Ok(());
        }
        let mut state = OutputState::default();
        if let Some(row) = self
            .query_opt(
                tx,
                "SELECT COALESCE(MAX(idx) + 1, 0),
                    COALESCE(SUM(octet_length(data)) FILTER (WHERE head), 0)::BIGINT,
                    COALESCE(SUM(octet_length(data)) FILTER (WHERE NOT head), 0)::BIGINT,
                    COUNT(*) FILTER (WHERE NOT head),
                    COALESCE(MIN(idx) FILTER (WHERE NOT head), 0)
                 FROM output WHERE instance = $1 AND machine = $2",
                &[&key.0, &key.1],
            )
            .await?
        {
            state.next_idx = row.try_get(0)?;
            state.head = unsigned(row.try_get(1)?);
            state.tail_bytes = unsigned(row.try_get(2)?);
            state.tail_chunks = unsigned(row.try_get(3)?);
            state.tail_from = row.try_get(4)?;
        }
        if let Some(row) = self
            .query_opt(
                tx,
                "SELECT output_bytes, output_dropped FROM machines
                 WHERE instance = $1 AND machine = $2",
                &[&key.0, &key.1],
            )
            .await?
        {
            state.total = unsigned(row.try_get(0)?);
            state.dropped = unsigned(row.try_get(1)?);
        }
        self.outputs.insert(key.clone(), state);
        Ok(())
    }

    /// Stores one message as a chunk of the head or of the tail, and trims the tail.
    async fn append(
        &mut self,
        tx: &Transaction<'_>,
        key: Key,
        seq: Option<u64>,
        data: &str,
    ) -> Result<()> {
        self.output_state(tx, &key).await?;
        let retention = self.retention;
        let len = data.len() as u64;
        let Some(state) = self.outputs.get_mut(&key) else {
            return Ok(());
        };
        let at = state.total;
        let idx = state.next_idx;
        let in_head =
            state.tail_chunks == 0 && state.dropped == 0 && state.head < retention.head_bytes;
        state.total = state.total.saturating_add(len);
        state.next_idx = state.next_idx.saturating_add(1);
        if let Some(seq) = seq {
            let next = seq.saturating_add(1);
            state.next_seq = Some(state.next_seq.map_or(next, |n| n.max(next)));
        }
        if in_head {
            state.head = state.head.saturating_add(len);
        } else {
            state.tail_bytes = state.tail_bytes.saturating_add(len);
            state.tail_chunks = state.tail_chunks.saturating_add(1);
        }
        if !std::mem::replace(&mut state.dirty, true) {
            self.dirty.push(key.clone());
        }
        self.chunks.push(&key, idx, signed(at), in_head, data);
        let trim = self
            .outputs
            .get(&key)
            .is_some_and(|s| s.tail_bytes > retention.tail_bytes && s.tail_chunks > 1);
        // The chunk to trim may be among those not yet inserted.
        if trim || self.chunks.is_full() {
            self.flush_chunks(tx).await?;
        }
        // The oldest tail chunks beyond the cap go, the newest message always stays.
        while let Some(from) = self
            .outputs
            .get(&key)
            .filter(|s| s.tail_bytes > retention.tail_bytes && s.tail_chunks > 1)
            .map(|s| s.tail_from)
        {
            let row = self
                .query_opt(
                    tx,
                    "DELETE FROM output WHERE id = (
                        SELECT id FROM output
                        WHERE instance = $1 AND machine = $2 AND NOT head AND idx >= $3
                        ORDER BY idx LIMIT 1)
                     RETURNING idx, octet_length(data)::BIGINT",
                    &[&key.0, &key.1, &from],
                )
                .await?;
            let Some(state) = self.outputs.get_mut(&key) else {
                break;
            };
            let Some(row) = row else {
                // The bookkeeping counted chunks that are not there: trust the table.
                state.tail_chunks = 0;
                break;
            };
            let gone: i64 = row.try_get(0)?;
            let n = unsigned(row.try_get(1)?);
            state.tail_from = gone.saturating_add(1);
            state.tail_bytes = state.tail_bytes.saturating_sub(n);
            state.tail_chunks = state.tail_chunks.saturating_sub(1);
            state.dropped = state.dropped.saturating_add(n);
        }
        Ok(())
    }

    /// Writes the totals of every machine whose output changed in this batch.
    async fn flush_totals(&mut self, tx: &Transaction<'_>) -> Result<()> {
        let (mut instance, mut machine) = (Vec::new(), Vec::new());
        let (mut total, mut dropped, mut next_seq) = (Vec::new(), Vec::new(), Vec::new());
        for key in std::mem::take(&mut self.dirty) {
            let Some(state) = self.outputs.get_mut(&key) else {
                continue;
            };
            state.dirty = false;
            total.push(signed(state.total));
            dropped.push(signed(state.dropped));
            next_seq.push(state.next_seq.take().map(signed));
            instance.push(key.0);
            machine.push(key.1);
        }
        if instance.is_empty() {
            return Ok(());
        }
        // Each machine is dirty once per batch, so no row is updated twice.
        self.exec(
            tx,
            "UPDATE machines AS m SET output_bytes = u.total, output_dropped = u.dropped,
                next_seq = GREATEST(m.next_seq, COALESCE(u.next_seq, m.next_seq))
             FROM UNNEST($1::TEXT[], $2::TEXT[], $3::BIGINT[], $4::BIGINT[], $5::BIGINT[])
                AS u(instance, machine, total, dropped, next_seq)
             WHERE m.instance = u.instance AND m.machine = u.machine",
            &[&instance, &machine, &total, &dropped, &next_seq],
        )
        .await?;
        Ok(())
    }

    /// Inserts the chunk rows not yet sent, in one statement.
    async fn flush_chunks(&mut self, tx: &Transaction<'_>) -> Result<()> {
        if self.chunks.is_empty() {
            return Ok(());
        }
        let c = std::mem::take(&mut self.chunks);
        self.exec(
            tx,
            "INSERT INTO output (instance, machine, idx, byte_offset, head, data)
             SELECT * FROM UNNEST($1::TEXT[], $2::TEXT[], $3::BIGINT[], $4::BIGINT[],
                                  $5::BOOLEAN[], $6::BYTEA[])",
            &[
                &c.instance,
                &c.machine,
                &c.idx,
                &c.byte_offset,
                &c.head,
                &c.data,
            ],
        )
        .await?;
        Ok(())
    }

    /// Deletes the oldest audit entries beyond the cap; returns how many.
    async fn trim_audit(&self, tx: &Transaction<'_>) -> Result<u64> {
        let cap = signed(saltpeter_store::audit::MAX_ROWS);
        self.exec(
            tx,
            "DELETE FROM audit WHERE id <= (SELECT id FROM audit ORDER BY id DESC LIMIT 1 OFFSET $1)",
            &[&cap],
        )
        .await
    }

    /// Deletes finished runs beyond the per-job count or older than the age limit, and audit
    /// entries past the age limit or the cap.
    async fn prune(&mut self, tx: &Transaction<'_>) -> Result<()> {
        let cutoff = age_cutoff(OffsetDateTime::now_utc(), self.retention.max_age_days);
        let keep = i64::try_from(self.retention.runs_per_job).unwrap_or(i64::MAX);
        let row = self
            .query_opt(
                tx,
                "WITH doomed AS (
                    SELECT instance FROM runs WHERE ended IS NOT NULL AND started < $1
                    UNION
                    SELECT instance FROM (
                        SELECT instance,
                            ROW_NUMBER() OVER (PARTITION BY job ORDER BY started DESC) AS n
                        FROM runs WHERE ended IS NOT NULL) ranked
                    WHERE n > $2
                 ), chunks AS (
                    DELETE FROM output WHERE instance IN (SELECT instance FROM doomed) RETURNING 1
                 ), machines AS (
                    DELETE FROM machines WHERE instance IN (SELECT instance FROM doomed)
                    RETURNING 1
                 ), replaced AS (
                    DELETE FROM attempts WHERE instance IN (SELECT instance FROM doomed)
                 ), gone AS (
                    DELETE FROM runs WHERE instance IN (SELECT instance FROM doomed) RETURNING 1
                 )
                 SELECT (SELECT COUNT(*) FROM gone), (SELECT COUNT(*) FROM chunks),
                    (SELECT COUNT(*) FROM machines)",
                &[&cutoff, &keep],
            )
            .await?;
        if let Some(row) = row {
            let runs: i64 = row.try_get(0)?;
            let chunks: i64 = row.try_get(1)?;
            if runs > 0 {
                tracing::info!(runs, chunks, "Retention removed old runs.");
            }
        }
        let mut audit = self
            .exec(tx, "DELETE FROM audit WHERE at < $1", &[&cutoff])
            .await?;
        audit = audit.saturating_add(self.trim_audit(tx).await?);
        if audit > 0 {
            tracing::info!(entries = audit, "Retention removed old audit entries.");
        }
        Ok(())
    }

    /// A read-only transaction for restore and queries.
    async fn read<T>(
        &self,
        f: impl AsyncFnOnce(&Self, &Transaction<'_>) -> Result<T>,
    ) -> Result<T> {
        let mut client = self.db.client().await?;
        let tx = self
            .db
            .timed(async { Ok(client.build_transaction().read_only(true).start().await?) })
            .await?;
        let out = f(self, &tx).await?;
        self.db.timed(async { Ok(tx.commit().await?) }).await?;
        Ok(out)
    }

    async fn restore(&mut self) -> Result<Restored> {
        let restored = self.read(async |s, tx| s.load(tx, None).await).await?;
        self.outputs.clear();
        self.run_jobs = restored
            .runs
            .iter()
            .map(|(run, _)| (run.instance.clone(), run.job.clone()))
            .collect();
        Ok(restored)
    }

    /// The runs that have not ended, with their machines, and the jobs' state: of every job,
    /// or of `job` alone (a takeover).
    async fn load(&self, tx: &Transaction<'_>, job: Option<&str>) -> Result<Restored> {
        let mut restored = Restored::default();
        let rows = self
            .query(
                tx,
                &format!(
                    "SELECT {RUN_COLUMNS} FROM runs
                     WHERE ended IS NULL AND ($1::TEXT IS NULL OR job = $1)"
                ),
                &[&job],
            )
            .await?;
        for row in rows {
            let run = run_from_row(&row)?;
            let mut machines = Vec::new();
            let mut attempts = self.attempts_of(tx, &run.instance).await?;
            for (record, next_seq, dropped) in self.machines_of(tx, &run.instance).await? {
                let output = self
                    .output_buffer(tx, &record.instance, &record.machine, dropped)
                    .await?;
                machines.push(RestoredMachine {
                    attempts: attempts.remove(&record.machine).unwrap_or_default(),
                    record,
                    output,
                    next_seq,
                });
            }
            restored.runs.push((run, machines));
        }
        let rows = self
            .query(
                tx,
                "SELECT name, last_run, last_success, last_failed, last_total, last_fired,
                    last_success_at FROM jobs WHERE $1::TEXT IS NULL OR name = $1",
                &[&job],
            )
            .await?;
        for r in rows {
            restored.jobs.push(JobRecord {
                name: r.try_get(0)?,
                last_run: r.try_get(1)?,
                last_success: r.try_get(2)?,
                last_failed: usize::try_from(r.try_get::<_, i64>(3)?).unwrap_or(0),
                last_total: usize::try_from(r.try_get::<_, i64>(4)?).unwrap_or(0),
                last_fired: r.try_get(5)?,
                last_success_at: r.try_get(6)?,
            });
        }
        Ok(restored)
    }

    async fn machines_of(
        &self,
        tx: &Transaction<'_>,
        instance: &str,
    ) -> Result<Vec<(MachineRecord, u64, u64)>> {
        let rows = self
            .query(
                tx,
                "SELECT instance, machine, status, retcode, cause, late_retcode, starttime, endtime,
                    last_heartbeat, wrapper_version, pid, wrapper_pid, launched, started,
                    kill_requested, launch_problem, modern, next_seq, output_dropped,
                    authenticated
                 FROM machines WHERE instance = $1 ORDER BY machine",
                &[&instance],
            )
            .await?;
        rows.iter()
            .map(|r| {
                Ok((
                    MachineRecord {
                        instance: r.try_get(0)?,
                        machine: r.try_get(1)?,
                        status: MachineStatus::from_stored(r.try_get(2)?),
                        retcode: r.try_get(3)?,
                        cause: saltpeter_store::stored_cause(r.try_get(4)?),
                        late_retcode: r.try_get(5)?,
                        starttime: r.try_get(6)?,
                        endtime: r.try_get(7)?,
                        last_heartbeat: r.try_get(8)?,
                        wrapper_version: r.try_get(9)?,
                        pid: pid_in(r.try_get(10)?),
                        wrapper_pid: pid_in(r.try_get(11)?),
                        launched: r.try_get(12)?,
                        started: r.try_get(13)?,
                        kill_requested: r.try_get(14)?,
                        launch_problem: r.try_get(15)?,
                        modern: r.try_get(16)?,
                        authenticated: r.try_get(19)?,
                    },
                    unsigned(r.try_get(17)?),
                    unsigned(r.try_get(18)?),
                ))
            })
            .collect()
    }

    /// A machine's stored output as the engine holds it in memory: head, gap, tail.
    async fn output_buffer(
        &self,
        tx: &Transaction<'_>,
        instance: &str,
        machine: &str,
        dropped: u64,
    ) -> Result<OutputBuffer> {
        let mut buffer = OutputBuffer::default();
        let rows = self
            .query(
                tx,
                "SELECT head, data FROM output WHERE instance = $1 AND machine = $2 ORDER BY idx",
                &[&instance, &machine],
            )
            .await?;
        let mut in_head = true;
        for row in rows {
            let head: bool = row.try_get(0)?;
            let data: Vec<u8> = row.try_get(1)?;
            if in_head && !head {
                in_head = false;
                buffer.skip(dropped);
            }
            buffer.push(&text(data));
        }
        Ok(buffer)
    }

    async fn answer(&self, query: Query) {
        // A dropped receiver means the asker went away; nothing to do.
        let fail = |e: Error| store_error(e);
        match query {
            // `PgBackend::apply` answers a takeover in its place in the batch, since it changes
            // what the backend holds; this arm is never reached, but says so if it were.
            Query::Takeover { reply, .. } => {
                let _ = reply.send(Err(StoreError::Backend(
                    "a takeover must be answered in order with the writes".into(),
                )));
            }
            Query::Runs {
                job,
                before,
                limit,
                reply,
            } => {
                let page = self
                    .read(async |s, tx| s.runs_page(tx, &job, before.as_deref(), limit).await)
                    .await;
                let _ = reply.send(page.map_err(fail));
            }
            Query::Run { instance, reply } => {
                let view = self
                    .read(async |s, tx| s.run_view(tx, &instance).await)
                    .await;
                let _ = reply.send(view.map_err(fail));
            }
            Query::Timeline { query, reply } => {
                let rows = self.read(async |s, tx| s.timeline(tx, &query).await).await;
                let _ = reply.send(rows.map_err(fail));
            }
            Query::Audit {
                before,
                limit,
                reply,
            } => {
                let page = self
                    .read(async |s, tx| s.audit_page(tx, before, limit).await)
                    .await;
                let _ = reply.send(page.map_err(fail));
            }
            Query::Output {
                instance,
                machine,
                offset,
                length,
                reply,
            } => {
                let range = self
                    .read(async |s, tx| {
                        s.output_range(tx, &instance, &machine, offset, length)
                            .await
                    })
                    .await;
                let _ = reply.send(range.map_err(fail));
            }
        }
    }

    async fn audit_page(
        &self,
        tx: &Transaction<'_>,
        before: Option<i64>,
        limit: usize,
    ) -> Result<Vec<AuditEntry>> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = self
            .query(
                tx,
                "SELECT id, at, actor, source, action, job, instance, machine, ok, detail
                 FROM audit WHERE ($1::BIGINT IS NULL OR id < $1) ORDER BY id DESC LIMIT $2",
                &[&before, &limit],
            )
            .await?;
        rows.iter()
            .map(|r| {
                Ok(AuditEntry {
                    id: r.try_get(0)?,
                    at: ts(r.try_get(1)?),
                    actor: r.try_get(2)?,
                    source: r.try_get(3)?,
                    action: r.try_get(4)?,
                    job: r.try_get(5)?,
                    instance: r.try_get(6)?,
                    machine: r.try_get(7)?,
                    ok: r.try_get(8)?,
                    detail: r.try_get(9)?,
                })
            })
            .collect()
    }

    async fn runs_page(
        &self,
        tx: &Transaction<'_>,
        job: &str,
        before: Option<&str>,
        limit: usize,
    ) -> Result<Vec<RunSummary>> {
        // The cursor is a run's `started` as an earlier page printed it; one that does not
        // parse pages from the newest, as a text comparison in SQLite would for most inputs.
        let before: Option<OffsetDateTime> = before
            .and_then(|b| Timestamp::parse(b).ok())
            .map(Timestamp::get);
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = self
            .query(
                tx,
                "SELECT instance, job, started, ended, success, killed, missed, missed_count
                 FROM runs WHERE job = $1 AND ($2::TIMESTAMPTZ IS NULL OR started < $2)
                 ORDER BY started DESC LIMIT $3",
                &[&job, &before, &limit],
            )
            .await?;
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            let instance: String = r.try_get(0)?;
            let machines: BTreeMap<String, Option<i64>> = self
                .query(
                    tx,
                    "SELECT machine, retcode FROM machines WHERE instance = $1",
                    &[&instance],
                )
                .await?
                .iter()
                .map(|m| Ok((m.try_get(0)?, m.try_get(1)?)))
                .collect::<Result<_>>()?;
            out.push(RunSummary {
                instance,
                job: r.try_get(1)?,
                started: ts(r.try_get(2)?),
                ended: r.try_get::<_, Option<OffsetDateTime>>(3)?.map(ts),
                success: r.try_get(4)?,
                killed: r.try_get(5)?,
                machines,
                missed: r.try_get(6)?,
                missed_count: r
                    .try_get::<_, Option<String>>(6)?
                    .map(|_| r.try_get::<_, i64>(7))
                    .transpose()?
                    .map(|n| u64::try_from(n).unwrap_or(0)),
            });
        }
        Ok(out)
    }

    /// The runs overlapping `[start, end]`, newest `limit` of them, returned oldest first.
    async fn timeline(
        &self,
        tx: &Transaction<'_>,
        query: &TimelineQuery,
    ) -> Result<Vec<TimelineEntry>> {
        let limit = i64::try_from(query.limit.max(1)).unwrap_or(i64::MAX);
        let rows = self
            .query(
                tx,
                "SELECT instance, job, grp, started, ended, success, missed FROM runs
                 WHERE ($1::TEXT IS NULL OR job = $1) AND started <= $2
                    AND (ended IS NULL OR ended >= $3)
                 ORDER BY started DESC, instance DESC LIMIT $4",
                &[&query.job, &query.end, &query.start, &limit],
            )
            .await?;
        let mut out = Vec::with_capacity(rows.len());
        for r in rows.iter().rev() {
            let instance: String = r.try_get(0)?;
            let ended: Option<OffsetDateTime> = r.try_get(4)?;
            let success: Option<bool> = r.try_get(5)?;
            let codes: Vec<Option<i64>> = self
                .query(
                    tx,
                    "SELECT retcode FROM machines WHERE instance = $1 ORDER BY machine",
                    &[&instance],
                )
                .await?
                .iter()
                .map(|m| Ok(m.try_get(0)?))
                .collect::<Result<_>>()?;
            let known: Vec<i64> = codes.iter().flatten().copied().collect();
            let failed = known.iter().filter(|c| **c != 0).count();
            // As the engine's own view: the first failing machine's code, else 0 (or 1 for a
            // run that failed without any machine code, e.g. killed before start).
            let ret_code = ended.map(|_| {
                known
                    .iter()
                    .copied()
                    .find(|c| *c != 0)
                    .unwrap_or(i64::from(success == Some(false)))
            });
            // A missed slot is its own kind of entry: it neither succeeded nor failed.
            let missed: Option<String> = r.try_get(6)?;
            let ret_code = if missed.is_some() { None } else { ret_code };
            out.push(TimelineEntry {
                cron: r.try_get(1)?,
                group: r.try_get(2)?,
                job_instance: instance,
                msg_type: if missed.is_some() { "missed" } else { "run" },
                missed,
                timestamp: ts(r.try_get(3)?),
                end: ended.map(ts),
                ret_code,
                success,
                machines: codes.len(),
                failed,
            });
        }
        Ok(out)
    }

    /// The attempts retries replaced for a run's machines, oldest first per machine.
    async fn attempts_of(
        &self,
        tx: &Transaction<'_>,
        instance: &str,
    ) -> Result<BTreeMap<String, Vec<AttemptRecord>>> {
        let rows = self
            .query(
                tx,
                "SELECT machine, attempt, retcode, cause, starttime, endtime FROM attempts
                 WHERE instance = $1 ORDER BY machine, attempt",
                &[&instance],
            )
            .await?;
        let mut out: BTreeMap<String, Vec<AttemptRecord>> = BTreeMap::new();
        for r in rows {
            let machine: String = r.try_get(0)?;
            let record = AttemptRecord {
                instance: instance.to_owned(),
                machine: machine.clone(),
                attempt: u32::try_from(r.try_get::<_, i64>(1)?).unwrap_or(0),
                retcode: r.try_get(2)?,
                cause: saltpeter_store::stored_cause(r.try_get(3)?),
                starttime: r.try_get(4)?,
                endtime: r.try_get(5)?,
            };
            out.entry(machine).or_default().push(record);
        }
        Ok(out)
    }

    async fn run_view(&self, tx: &Transaction<'_>, instance: &str) -> Result<Option<RunView>> {
        let Some(row) = self
            .query_opt(
                tx,
                &format!("SELECT {RUN_COLUMNS} FROM runs WHERE instance = $1"),
                &[&instance],
            )
            .await?
        else {
            return Ok(None);
        };
        let run = run_from_row(&row)?;
        let mut machines = BTreeMap::new();
        let mut attempts = self.attempts_of(tx, instance).await?;
        for (record, _next_seq, dropped) in self.machines_of(tx, instance).await? {
            let output = self
                .output_buffer(tx, instance, &record.machine, dropped)
                .await?;
            let replaced = attempts.remove(&record.machine).unwrap_or_default();
            machines.insert(record.machine.clone(), record.view(&output, &replaced));
        }
        let missed: Option<String> = self
            .query_opt(
                tx,
                "SELECT missed FROM runs WHERE instance = $1",
                &[&instance],
            )
            .await?
            .map(|r| r.try_get(0))
            .transpose()?
            .flatten();
        Ok(Some(RunView {
            instance: run.instance,
            job: run.job,
            group: run.group,
            started: ts(run.started),
            ended: run.ended.map(ts),
            success: run.success,
            killed: run.killed,
            maintenance: run.maintenance,
            machines,
            missed,
        }))
    }

    async fn output_range(
        &self,
        tx: &Transaction<'_>,
        instance: &str,
        machine: &str,
        offset: u64,
        length: Option<u64>,
    ) -> Result<Option<OutputRange>> {
        let Some(totals) = self
            .query_opt(
                tx,
                "SELECT output_bytes, output_dropped FROM machines
                 WHERE instance = $1 AND machine = $2",
                &[&instance, &machine],
            )
            .await?
        else {
            return Ok(None);
        };
        let total: i64 = totals.try_get(0)?;
        let dropped: i64 = totals.try_get(1)?;
        // Positions are signed in the database: one past `i64::MAX` is past every byte anyway,
        // and clamping keeps `offset` non-negative, so the differences below cannot overflow.
        let offset = i64::try_from(offset).unwrap_or(i64::MAX);
        let end = length.map_or(i64::MAX, |l| {
            offset.saturating_add(i64::try_from(l).unwrap_or(i64::MAX))
        });
        let rows = self
            .query(
                tx,
                "SELECT byte_offset, data FROM output
                 WHERE instance = $1 AND machine = $2 AND byte_offset < $4
                   AND byte_offset + octet_length(data) > $3
                 ORDER BY idx",
                &[&instance, &machine, &offset, &end],
            )
            .await?;
        let chunks = rows
            .iter()
            .map(|row| Ok((row.try_get::<_, i64>(0)?, text(row.try_get(1)?))))
            .collect::<Result<Vec<_>>>()?;
        let out = saltpeter_store::output::join_range(chunks, offset, end);
        Ok(Some(OutputRange {
            text: out,
            total_bytes: unsigned(total),
            dropped_bytes: unsigned(dropped),
        }))
    }
}
