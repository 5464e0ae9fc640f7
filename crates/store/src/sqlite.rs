//! The SQLite side of the store: schema and migrations, applying ops in one transaction per
//! batch, output retention, restore after a restart, and history queries.
//!
//! Durability: WAL with `synchronous=NORMAL`. A committed batch survives the master being
//! killed at any instant (what the restart guarantees need); an operating-system crash may
//! roll back the last batches, which wrappers then resend because they were never acked.
// Input from clients, files or wrappers reaches arithmetic here, so every operation that could
// overflow or index out of bounds is written checked ("Totality" in docs/ARCHITECTURE.md).
#![warn(
    clippy::arithmetic_side_effects,
    clippy::indexing_slicing,
    clippy::string_slice
)]

use std::collections::BTreeMap;
use std::path::Path;

use rusqlite::{Connection, OptionalExtension, Transaction, params};
use saltpeter_proto::{Cause, Timestamp};
use time::OffsetDateTime;

use super::checkpoint::{Checkpointer, WalTuning, WriteGate};
use super::outputs::Outputs;
use super::{
    JobRecord, MachineRecord, Notice, OutputRange, Query, Restored, RestoredMachine, RunRecord,
    RunSummary, StoreOp,
};
use crate::{Backend, MachineStatus, OutputBuffer, RunView};

/// Why the store failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
    #[error("the database was written by a newer saltpeter (schema {0})")]
    TooNew(i64),
    /// An error of another backend than SQLite (PostgreSQL), which this crate does not know.
    #[error("database error: {0}")]
    Backend(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// How much history to keep.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Retention {
    /// Finished runs kept per job, newest first.
    pub runs_per_job: usize,
    /// Finished runs older than this are deleted.
    pub max_age_days: u32,
    /// Output bytes kept from the start of each machine's output.
    pub head_bytes: u64,
    /// Output bytes kept from the end of each machine's output.
    pub tail_bytes: u64,
}

impl Default for Retention {
    /// 100 runs per job for 30 days, 64 KiB of head and 448 KiB of tail per machine: a fleet
    /// of 200 jobs on 20 machines each stays under 200 GB even if every run fills its cap, and
    /// at typical cron output sizes (a few KB) under a few GB.
    fn default() -> Self {
        Self {
            runs_per_job: 100,
            max_age_days: 30,
            head_bytes: 64 * 1024,
            tail_bytes: 448 * 1024,
        }
    }
}

const SCHEMA_VERSION: i64 = 7;

const MIGRATION_1: &str = "
CREATE TABLE runs (
    instance TEXT PRIMARY KEY,
    job TEXT NOT NULL,
    grp TEXT NOT NULL,
    started TEXT NOT NULL,
    ended TEXT,
    success INTEGER,
    killed INTEGER NOT NULL,
    token TEXT NOT NULL,
    resolving INTEGER NOT NULL,
    maintenance TEXT NOT NULL,
    pending_batches TEXT NOT NULL
);
CREATE INDEX runs_by_job ON runs(job, started);
CREATE INDEX runs_active ON runs(ended) WHERE ended IS NULL;
CREATE TABLE machines (
    instance TEXT NOT NULL,
    machine TEXT NOT NULL,
    status TEXT NOT NULL,
    retcode INTEGER,
    cause TEXT,
    late_retcode INTEGER,
    starttime TEXT,
    endtime TEXT,
    last_heartbeat TEXT,
    wrapper_version TEXT,
    pid INTEGER,
    wrapper_pid INTEGER,
    launched INTEGER NOT NULL,
    started INTEGER NOT NULL,
    kill_requested INTEGER NOT NULL,
    launch_problem TEXT,
    modern INTEGER NOT NULL,
    next_seq INTEGER NOT NULL DEFAULT 0,
    output_bytes INTEGER NOT NULL DEFAULT 0,
    output_dropped INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (instance, machine)
) WITHOUT ROWID;
CREATE TABLE output (
    instance TEXT NOT NULL,
    machine TEXT NOT NULL,
    idx INTEGER NOT NULL,
    byte_offset INTEGER NOT NULL,
    head INTEGER NOT NULL,
    data TEXT NOT NULL,
    PRIMARY KEY (instance, machine, idx)
) WITHOUT ROWID;
CREATE TABLE jobs (
    name TEXT PRIMARY KEY,
    last_run TEXT,
    last_success INTEGER,
    last_failed INTEGER NOT NULL,
    last_total INTEGER NOT NULL,
    last_fired TEXT
);
";

/// The output journal (see `outputs.rs`) and how far each machine's journal is folded.
const MIGRATION_2: &str = "
CREATE TABLE output_journal (
    id INTEGER PRIMARY KEY,
    instance TEXT NOT NULL,
    machine TEXT NOT NULL,
    seq INTEGER,
    data TEXT NOT NULL
);
ALTER TABLE machines ADD COLUMN journal_folded INTEGER NOT NULL DEFAULT 0;
";

/// Output chunks move to a rowid table with a separate index. As a WITHOUT ROWID table keyed
/// by (instance, machine, idx), every seek compared whole rows, and a chunk of up to 64 KiB
/// lives in overflow pages: each fold's insert read several whole chunks back (one such read,
/// from disk, held a commit for 309 ms at 10,000 wrappers). The index holds only the key.
const MIGRATION_3: &str = "
CREATE TABLE output_v3 (
    id INTEGER PRIMARY KEY,
    instance TEXT NOT NULL,
    machine TEXT NOT NULL,
    idx INTEGER NOT NULL,
    byte_offset INTEGER NOT NULL,
    head INTEGER NOT NULL,
    data TEXT NOT NULL
);
INSERT INTO output_v3 (instance, machine, idx, byte_offset, head, data)
    SELECT instance, machine, idx, byte_offset, head, data FROM output
    ORDER BY instance, machine, idx;
DROP TABLE output;
ALTER TABLE output_v3 RENAME TO output;
CREATE UNIQUE INDEX output_by_machine ON output(instance, machine, idx);
";

/// Machine credentials: how each run's machines prove who they are, and which machines a
/// wrapper with credentials has spoken for. Runs stored before this keep the one token per run
/// their wrappers were given (`run_token`).
const MIGRATION_4: &str = "
ALTER TABLE runs ADD COLUMN identity TEXT NOT NULL DEFAULT 'run_token';
ALTER TABLE machines ADD COLUMN authenticated INTEGER NOT NULL DEFAULT 0;
";

/// The audit trail (see `audit.rs`): one row per act, ids growing, times in the same text
/// form as the runs' so that age retention compares them the same way.
const MIGRATION_5: &str = "
CREATE TABLE audit (
    id INTEGER PRIMARY KEY,
    at TEXT NOT NULL,
    actor TEXT NOT NULL,
    source TEXT,
    action TEXT NOT NULL,
    job TEXT,
    instance TEXT,
    machine TEXT,
    ok INTEGER NOT NULL,
    detail TEXT
);
CREATE INDEX audit_by_at ON audit(at);
";

/// When each job last succeeded, for the per-job staleness metric.
const MIGRATION_6: &str = "
ALTER TABLE jobs ADD COLUMN last_success_at TEXT;
";

/// The open database.
#[derive(Debug)]
pub struct Db {
    conn: Connection,
    retention: Retention,
    /// Boxed: the engine moves a `Db` around by value before its thread starts.
    outputs: Box<Outputs>,
    last_prune: Option<std::time::Instant>,
    /// Held for each batch; the checkpoint thread takes it to start the WAL over.
    gate: WriteGate,
    /// Dropped with the `Db`, which stops the checkpoint thread.
    _checkpointer: Option<Checkpointer>,
}

/// A row limit for SQL. SQLite reads a negative `LIMIT` as "no limit", which a plain `as`
/// cast of a huge count would produce; saturating keeps a cap a cap.
fn sql_limit(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn ts(at: OffsetDateTime) -> String {
    Timestamp::new(at).to_string()
}

fn parse_ts(text: Option<String>) -> Option<OffsetDateTime> {
    text.and_then(|t| Timestamp::parse(&t).ok())
        .map(Timestamp::get)
}

/// How often the store applies the retention policy on its own.
const PRUNE_EVERY: std::time::Duration = std::time::Duration::from_secs(3600);

impl Db {
    pub fn open(path: &Path, retention: Retention) -> Result<Self, StoreError> {
        Self::open_tuned(path, retention, WalTuning::default())
    }

    /// Opens with the given WAL checkpoint settings (tests shrink them).
    pub fn open_tuned(
        path: &Path,
        retention: Retention,
        tuning: WalTuning,
    ) -> Result<Self, StoreError> {
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        // An 8 MiB page cache: enough for the journal's tail, the `machines` table and the
        // B-tree interior pages that folds walk (the default 2 MiB spilled them). Not more:
        // when a B-tree balance swaps two pages, SQLite parks one under the lock-byte page's
        // number (262,145), and the commit that follows walks the whole cache to drop it. With
        // 64 MiB that walk was 7% of the master's CPU at 10,000 wrappers. Batches of thousands
        // of ops (a fleet starting or ending) may spill pages to the WAL before they commit.
        conn.pragma_update(None, "cache_size", -8_192)?;
        conn.pragma_update(None, "foreign_keys", "OFF")?;
        let gate = WriteGate::default();
        let checkpointer = if path == Path::new(":memory:") {
            None
        } else {
            match Checkpointer::start(path, tuning, gate.clone()) {
                Ok(checkpointer) => {
                    // The thread checkpoints and restarts the WAL; the writer only does so
                    // itself if the WAL grows far past where the thread should have acted.
                    conn.pragma_update(None, "wal_autocheckpoint", tuning.writer_frames)?;
                    Some(checkpointer)
                }
                Err(error) => {
                    tracing::warn!(%error, "No checkpoint thread; the store checkpoints as it commits.");
                    None
                }
            }
        };
        let mut db = Self {
            conn,
            retention,
            outputs: Box::default(),
            last_prune: None,
            gate,
            _checkpointer: checkpointer,
        };
        db.migrate()?;
        let tx = db.conn.transaction()?;
        db.outputs = Box::new(Outputs::recover(&tx, retention)?);
        tx.commit()?;
        Ok(db)
    }

    fn migrate(&mut self) -> Result<(), StoreError> {
        let version: i64 = self
            .conn
            .pragma_query_value(None, "user_version", |r| r.get(0))?;
        if version > SCHEMA_VERSION {
            return Err(StoreError::TooNew(version));
        }
        if version < 1 {
            let tx = self.conn.transaction()?;
            tx.execute_batch(MIGRATION_1)?;
            tx.pragma_update(None, "user_version", 1)?;
            tx.commit()?;
        }
        if version < 2 {
            let tx = self.conn.transaction()?;
            tx.execute_batch(MIGRATION_2)?;
            tx.pragma_update(None, "user_version", 2)?;
            tx.commit()?;
        }
        if version < 3 {
            let tx = self.conn.transaction()?;
            tx.execute_batch(MIGRATION_3)?;
            tx.pragma_update(None, "user_version", 3)?;
            tx.commit()?;
        }
        if version < 4 {
            let tx = self.conn.transaction()?;
            tx.execute_batch(MIGRATION_4)?;
            tx.pragma_update(None, "user_version", 4)?;
            tx.commit()?;
        }
        if version < 5 {
            let tx = self.conn.transaction()?;
            tx.execute_batch(MIGRATION_5)?;
            tx.pragma_update(None, "user_version", 5)?;
            tx.commit()?;
        }
        if version < 6 {
            let tx = self.conn.transaction()?;
            tx.execute_batch(MIGRATION_6)?;
            tx.pragma_update(None, "user_version", 6)?;
            tx.commit()?;
        }
        if version < 7 {
            let tx = self.conn.transaction()?;
            tx.execute_batch(super::recovery::MIGRATION_7)?;
            tx.pragma_update(None, "user_version", 7)?;
            tx.commit()?;
        }
        Ok(())
    }
}

impl Backend for Db {
    /// Applies a batch in one transaction and returns the notices it carried. A failing op is
    /// logged and skipped; a failing commit drops the notices, so nothing is acked that is not
    /// on disk (wrappers resend).
    fn apply(&mut self, batch: Vec<StoreOp>) -> Vec<Notice> {
        let gate = self.gate.clone();
        let held = gate.lock();
        // Other queries are answered once the whole batch is committed; a takeover is
        // answered in its place, as on every backend: it reads the ops queued before it and
        // none after. So a batch is committed in parts, ending at each takeover (which come
        // only when a job changes hands).
        let mut notices = Vec::new();
        let mut part = Vec::with_capacity(batch.len());
        let mut split = false;
        for op in batch {
            let ends_part = matches!(op, StoreOp::Query(Query::Takeover { .. }));
            part.push(op);
            if ends_part {
                notices.extend(self.apply_held(std::mem::take(&mut part)));
                split = true;
            }
        }
        // An empty batch still does a batch's background work (folds, journal deletion).
        if !part.is_empty() || !split {
            notices.extend(self.apply_held(part));
        }
        // Fair: a checkpoint thread waiting to restart the WAL goes before the next batch.
        parking_lot::MutexGuard::unlock_fair(held);
        notices
    }

    /// Loads the runs that had not ended and every job's state.
    fn restore(&mut self) -> Result<Restored, StoreError> {
        self.load(None)
    }
}

impl Db {
    /// The runs that had not ended, with their machines, and the jobs' state: of every job, or
    /// of `job` alone (a takeover). Output that is still pending in the journal must have been
    /// folded first: this reads the chunks.
    fn load(&self, job: Option<&str>) -> Result<Restored, StoreError> {
        let mut restored = Restored::default();
        let runs: Vec<RunRecord> = {
            let mut stmt = self.conn.prepare_cached(
                "SELECT instance, job, grp, started, ended, success, killed, token, resolving,
                        maintenance, pending_batches, identity FROM runs
                 WHERE ended IS NULL AND (?1 IS NULL OR job = ?1)",
            )?;
            stmt.query_map([job], run_from_row)?
                .collect::<Result<_, _>>()?
        };
        for run in runs {
            let machines = self.machines_of(&run.instance)?;
            let mut attempts = super::recovery::attempts_of(&self.conn, &run.instance)?;
            let mut restored_machines = Vec::new();
            for (record, next_seq, dropped) in machines {
                let output = self.output_buffer(&record.instance, &record.machine, dropped)?;
                restored_machines.push(RestoredMachine {
                    attempts: attempts.remove(&record.machine).unwrap_or_default(),
                    record,
                    output,
                    next_seq,
                });
            }
            restored.runs.push((run, restored_machines));
        }
        let mut stmt = self.conn.prepare_cached(
            "SELECT name, last_run, last_success, last_failed, last_total, last_fired, \
             last_success_at FROM jobs WHERE ?1 IS NULL OR name = ?1",
        )?;
        restored.jobs = stmt
            .query_map([job], |r| {
                Ok(JobRecord {
                    name: r.get(0)?,
                    last_run: parse_ts(r.get(1)?),
                    last_success: r.get(2)?,
                    last_failed: r.get::<_, i64>(3)? as usize,
                    last_total: r.get::<_, i64>(4)? as usize,
                    last_fired: parse_ts(r.get(5)?),
                    last_success_at: parse_ts(r.get(6)?),
                })
            })?
            .collect::<Result<_, _>>()?;
        Ok(restored)
    }
}

impl Db {
    fn apply_held(&mut self, batch: Vec<StoreOp>) -> Vec<Notice> {
        let mut notices = Vec::new();
        let mut queries = Vec::new();
        let result = (|| -> Result<(), StoreError> {
            let tx = self.conn.transaction()?;
            for op in batch {
                match op {
                    StoreOp::Notify(n) => notices.push(n),
                    StoreOp::Query(q) => queries.push(q),
                    StoreOp::Prune => {
                        self.outputs.fold_finished(&tx, self.retention)?;
                        prune(&tx, self.retention)?;
                    }
                    op => {
                        if let Err(error) = apply_one(&tx, &mut self.outputs, self.retention, op) {
                            tracing::error!(%error, "Could not store an update.");
                        }
                    }
                }
            }
            // Queries read the `output` table: what they ask for is folded into it first.
            for q in &queries {
                match q {
                    Query::Run { instance, .. } => {
                        self.outputs.fold_run(&tx, instance, None, self.retention)?;
                    }
                    Query::Output {
                        instance, machine, ..
                    } => {
                        self.outputs
                            .fold_run(&tx, instance, Some(machine), self.retention)?;
                    }
                    // Every machine of the job's unfinished runs, whose totals and sequence
                    // are then written at the end of the batch, where the answer reads them.
                    Query::Takeover { job, .. } => {
                        for instance in unfinished_runs_of(&tx, job)? {
                            self.outputs
                                .fold_run(&tx, &instance, None, self.retention)?;
                        }
                    }
                    Query::Runs { .. } | Query::Timeline { .. } | Query::Audit { .. } => {}
                }
            }
            self.outputs.finish_batch(&tx, self.retention)?;
            tx.commit()?;
            Ok(())
        })();
        if let Err(error) = result {
            tracing::error!(%error, "Could not commit to the store; nothing of this batch is acked.");
            notices.clear();
        }
        // Queries run after the batch's writes, so they see them.
        for q in queries {
            self.answer(q);
        }
        let due = self.last_prune.is_none_or(|t| t.elapsed() >= PRUNE_EVERY);
        if due {
            self.last_prune = Some(std::time::Instant::now());
            let pruned = self
                .conn
                .transaction()
                .map_err(StoreError::from)
                .and_then(|tx| {
                    self.outputs.fold_finished(&tx, self.retention)?;
                    prune(&tx, self.retention)?;
                    tx.commit().map_err(StoreError::from)
                });
            if let Err(error) = pruned {
                tracing::warn!(%error, "Could not apply the retention policy.");
            }
        }
        notices
    }

    fn machines_of(&self, instance: &str) -> Result<Vec<(MachineRecord, u64, u64)>, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT instance, machine, status, retcode, cause, late_retcode, starttime, endtime,
                    last_heartbeat, wrapper_version, pid, wrapper_pid, launched, started,
                    kill_requested, launch_problem, modern, next_seq, output_dropped,
                    authenticated
             FROM machines WHERE instance = ?1 ORDER BY machine",
        )?;
        let rows = stmt.query_map([instance], |r| {
            Ok((
                MachineRecord {
                    instance: r.get(0)?,
                    machine: r.get(1)?,
                    status: MachineStatus::from_stored(&r.get::<_, String>(2)?),
                    retcode: r.get(3)?,
                    cause: crate::stored_cause(r.get(4)?),
                    late_retcode: r.get(5)?,
                    starttime: parse_ts(r.get(6)?),
                    endtime: parse_ts(r.get(7)?),
                    last_heartbeat: parse_ts(r.get(8)?),
                    wrapper_version: r.get(9)?,
                    pid: r.get(10)?,
                    wrapper_pid: r.get(11)?,
                    launched: r.get(12)?,
                    started: r.get(13)?,
                    kill_requested: r.get(14)?,
                    launch_problem: r.get(15)?,
                    modern: r.get(16)?,
                    authenticated: r.get(19)?,
                },
                r.get::<_, i64>(17)? as u64,
                r.get::<_, i64>(18)? as u64,
            ))
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// A machine's stored output as the engine holds it in memory: head, gap, tail.
    fn output_buffer(
        &self,
        instance: &str,
        machine: &str,
        dropped: u64,
    ) -> Result<OutputBuffer, StoreError> {
        let mut buffer = OutputBuffer::default();
        let mut stmt = self.conn.prepare_cached(
            "SELECT head, data FROM output WHERE instance = ?1 AND machine = ?2 ORDER BY idx",
        )?;
        let mut rows = stmt.query(params![instance, machine])?;
        let mut in_head = true;
        while let Some(row) = rows.next()? {
            let head: bool = row.get(0)?;
            let data: String = row.get(1)?;
            if in_head && !head {
                in_head = false;
                buffer.skip(dropped);
            }
            buffer.push(&data);
        }
        Ok(buffer)
    }

    fn answer(&mut self, query: Query) {
        // A dropped receiver means the asker went away; nothing to do.
        match query {
            Query::Runs {
                job,
                before,
                limit,
                reply,
            } => {
                let _ = reply.send(self.runs_page(&job, before.as_deref(), limit));
            }
            Query::Run { instance, reply } => {
                let _ = reply.send(self.run_view(&instance));
            }
            Query::Timeline { query, reply } => {
                let _ = reply.send(self.timeline(&query));
            }
            // One master owns a SQLite store and never shares its jobs, so its bookkeeping of
            // the job's machines (`Outputs`) is already what the file holds: a takeover only
            // reads, as a restore of that job would.
            Query::Takeover { job, reply } => {
                let _ = reply.send(self.load(Some(&job)));
            }
            Query::Audit {
                before,
                limit,
                reply,
            } => {
                let _ = reply.send(self.audit_page(before, limit));
            }
            Query::Output {
                instance,
                machine,
                offset,
                length,
                reply,
            } => {
                let _ = reply.send(self.output_range(&instance, &machine, offset, length));
            }
        }
    }

    fn audit_page(
        &self,
        before: Option<i64>,
        limit: usize,
    ) -> Result<Vec<crate::audit::AuditEntry>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT id, at, actor, source, action, job, instance, machine, ok, detail FROM audit
             WHERE (?1 IS NULL OR id < ?1) ORDER BY id DESC LIMIT ?2",
        )?;
        let rows = stmt
            .query_map(params![before, sql_limit(limit)], |r| {
                Ok(crate::audit::AuditEntry {
                    id: r.get(0)?,
                    at: r.get(1)?,
                    actor: r.get(2)?,
                    source: r.get(3)?,
                    action: r.get(4)?,
                    job: r.get(5)?,
                    instance: r.get(6)?,
                    machine: r.get(7)?,
                    ok: r.get(8)?,
                    detail: r.get(9)?,
                })
            })?
            .collect::<Result<_, _>>()?;
        Ok(rows)
    }

    fn runs_page(
        &self,
        job: &str,
        before: Option<&str>,
        limit: usize,
    ) -> Result<Vec<RunSummary>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT instance, job, started, ended, success, killed, missed, missed_count FROM runs
             WHERE job = ?1 AND (?2 IS NULL OR started < ?2)
             ORDER BY started DESC LIMIT ?3",
        )?;
        let rows: Vec<RunSummary> = stmt
            .query_map(params![job, before, sql_limit(limit)], |r| {
                Ok(RunSummary {
                    instance: r.get(0)?,
                    job: r.get(1)?,
                    started: r.get(2)?,
                    ended: r.get(3)?,
                    success: r.get(4)?,
                    killed: r.get(5)?,
                    machines: BTreeMap::new(),
                    missed: r.get(6)?,
                    missed_count: r
                        .get::<_, Option<String>>(6)?
                        .map(|_| r.get::<_, i64>(7))
                        .transpose()?
                        .map(|n| u64::try_from(n).unwrap_or(0)),
                })
            })?
            .collect::<Result<_, _>>()?;
        let mut out = Vec::with_capacity(rows.len());
        let mut stmt = self
            .conn
            .prepare_cached("SELECT machine, retcode FROM machines WHERE instance = ?1")?;
        for mut run in rows {
            run.machines = stmt
                .query_map([&run.instance], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<Result<_, _>>()?;
            out.push(run);
        }
        Ok(out)
    }

    /// The runs overlapping `[start, end]`, newest `limit` of them, returned oldest first.
    fn timeline(
        &self,
        query: &crate::TimelineQuery,
    ) -> Result<Vec<crate::TimelineEntry>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT instance, job, grp, started, ended, success, missed FROM runs
             WHERE (?1 IS NULL OR job = ?1) AND started <= ?2 AND (ended IS NULL OR ended >= ?3)
             ORDER BY started DESC, instance DESC LIMIT ?4",
        )?;
        type Row = (
            String,
            String,
            String,
            String,
            Option<String>,
            Option<bool>,
            Option<String>,
        );
        let rows: Vec<Row> = stmt
            .query_map(
                params![
                    query.job,
                    ts(query.end),
                    ts(query.start),
                    sql_limit(query.limit.max(1))
                ],
                |r| {
                    Ok((
                        r.get(0)?,
                        r.get(1)?,
                        r.get(2)?,
                        r.get(3)?,
                        r.get(4)?,
                        r.get(5)?,
                        r.get(6)?,
                    ))
                },
            )?
            .collect::<Result<_, _>>()?;
        let mut codes = self
            .conn
            .prepare_cached("SELECT retcode FROM machines WHERE instance = ?1 ORDER BY machine")?;
        let mut out = Vec::with_capacity(rows.len());
        for (instance, job, group, started, ended, success, missed) in rows.into_iter().rev() {
            let machine_codes: Vec<Option<i64>> = codes
                .query_map([&instance], |r| r.get(0))?
                .collect::<Result<_, _>>()?;
            let known: Vec<i64> = machine_codes.iter().flatten().copied().collect();
            let failed = known.iter().filter(|c| **c != 0).count();
            // As the engine's own view: the first failing machine's code, else 0 (or 1 for a
            // run that failed without any machine code, e.g. killed before start).
            let ret_code = ended.as_ref().map(|_| {
                known
                    .iter()
                    .copied()
                    .find(|c| *c != 0)
                    .unwrap_or(i64::from(success == Some(false)))
            });
            // A missed slot is its own kind of entry: it neither succeeded nor failed.
            let ret_code = if missed.is_some() { None } else { ret_code };
            out.push(crate::TimelineEntry {
                cron: job,
                group,
                job_instance: instance,
                msg_type: if missed.is_some() { "missed" } else { "run" },
                timestamp: started,
                end: ended,
                ret_code,
                missed,
                success,
                machines: machine_codes.len(),
                failed,
            });
        }
        Ok(out)
    }

    fn run_view(&self, instance: &str) -> Result<Option<RunView>, StoreError> {
        let run = self
            .conn
            .query_row(
                "SELECT instance, job, grp, started, ended, success, killed, token, resolving,
                        maintenance, pending_batches, identity FROM runs WHERE instance = ?1",
                [instance],
                run_from_row,
            )
            .optional()?;
        let Some(run) = run else { return Ok(None) };
        let mut machines = BTreeMap::new();
        let mut attempts = super::recovery::attempts_of(&self.conn, instance)?;
        for (record, _next_seq, dropped) in self.machines_of(instance)? {
            let output = self.output_buffer(instance, &record.machine, dropped)?;
            let replaced = attempts.remove(&record.machine).unwrap_or_default();
            machines.insert(record.machine.clone(), record.view(&output, &replaced));
        }
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
            missed: super::recovery::missed_of(&self.conn, instance)?.map(|(reason, _)| reason),
        }))
    }

    fn output_range(
        &self,
        instance: &str,
        machine: &str,
        offset: u64,
        length: Option<u64>,
    ) -> Result<Option<OutputRange>, StoreError> {
        let totals: Option<(i64, i64)> = self
            .conn
            .query_row(
                "SELECT output_bytes, output_dropped FROM machines WHERE instance = ?1 AND machine = ?2",
                params![instance, machine],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        let Some((total, dropped)) = totals else {
            return Ok(None);
        };
        // SQLite integers are signed: a position past `i64::MAX` is past every byte anyway, and
        // clamping keeps `offset` non-negative, so the differences below cannot overflow.
        let offset = i64::try_from(offset).unwrap_or(i64::MAX);
        let end = length.map_or(i64::MAX, |l| {
            offset.saturating_add(i64::try_from(l).unwrap_or(i64::MAX))
        });
        let mut stmt = self.conn.prepare_cached(
            "SELECT byte_offset, data FROM output
             WHERE instance = ?1 AND machine = ?2 AND byte_offset < ?4
               AND byte_offset + length(CAST(data AS BLOB)) > ?3
             ORDER BY idx",
        )?;
        let chunks = stmt
            .query_map(params![instance, machine, offset, end], |row| {
                Ok((row.get::<_, i64>(0)?, row.get::<_, String>(1)?))
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        let text = crate::output::join_range(chunks, offset, end);
        Ok(Some(OutputRange {
            text,
            total_bytes: total as u64,
            dropped_bytes: dropped as u64,
        }))
    }
}

fn run_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<RunRecord> {
    let maintenance: String = r.get(9)?;
    let batches: String = r.get(10)?;
    Ok(RunRecord {
        instance: r.get(0)?,
        job: r.get(1)?,
        group: r.get(2)?,
        started: parse_ts(r.get(3)?).unwrap_or(OffsetDateTime::UNIX_EPOCH),
        ended: parse_ts(r.get(4)?),
        success: r.get(5)?,
        killed: r.get(6)?,
        token: r.get(7)?,
        resolving: r.get(8)?,
        maintenance: serde_json::from_str(&maintenance).unwrap_or_default(),
        pending_batches: serde_json::from_str(&batches).unwrap_or_default(),
        identity: r.get::<_, String>(11)?,
    })
}

fn apply_one(
    tx: &Transaction<'_>,
    outputs: &mut Outputs,
    retention: Retention,
    op: StoreOp,
) -> Result<(), StoreError> {
    match op {
        StoreOp::Run(r) => {
            tx.prepare_cached(
                "INSERT INTO runs (instance, job, grp, started, ended, success, killed, token,
                                   resolving, maintenance, pending_batches, identity)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)
                 ON CONFLICT(instance) DO UPDATE SET ended = ?5, success = ?6, killed = ?7,
                    resolving = ?9, maintenance = ?10, pending_batches = ?11",
            )?
            .execute(params![
                r.instance,
                r.job,
                r.group,
                ts(r.started),
                r.ended.map(ts),
                r.success,
                r.killed,
                r.token,
                r.resolving,
                serde_json::to_string(&r.maintenance).unwrap_or_default(),
                serde_json::to_string(&r.pending_batches).unwrap_or_default(),
                r.identity.as_str(),
            ])?;
            if r.ended.is_some() {
                // The run is over: its output goes to its chunks over the next batches, and
                // then its machines' retention bookkeeping is no longer needed.
                outputs.forget_run(&r.instance);
            }
        }
        StoreOp::Machine(m) => {
            tx.prepare_cached(
                "INSERT INTO machines (instance, machine, status, retcode, cause, late_retcode,
                    starttime, endtime, last_heartbeat, wrapper_version, pid, wrapper_pid,
                    launched, started, kill_requested, launch_problem, modern, authenticated)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17,
                    ?18)
                 ON CONFLICT(instance, machine) DO UPDATE SET status = ?3, retcode = ?4,
                    cause = ?5, late_retcode = ?6, starttime = ?7, endtime = ?8,
                    last_heartbeat = ?9, wrapper_version = ?10, pid = ?11, wrapper_pid = ?12,
                    launched = ?13, started = ?14, kill_requested = ?15, launch_problem = ?16,
                    modern = ?17, authenticated = ?18",
            )?
            .execute(params![
                m.instance,
                m.machine,
                m.status.as_str(),
                m.retcode,
                m.cause.map(Cause::as_str),
                m.late_retcode,
                m.starttime.map(ts),
                m.endtime.map(ts),
                m.last_heartbeat.map(ts),
                m.wrapper_version,
                m.pid,
                m.wrapper_pid,
                m.launched,
                m.started,
                m.kill_requested,
                m.launch_problem,
                m.modern,
                m.authenticated,
            ])?;
        }
        StoreOp::Output {
            instance,
            machine,
            seq,
            data,
        } => outputs.append(tx, (instance, machine), seq, data, retention)?,
        StoreOp::Job(j) => {
            tx.prepare_cached(
                "INSERT INTO jobs (name, last_run, last_success, last_failed, last_total, last_fired,
                    last_success_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
                 ON CONFLICT(name) DO UPDATE SET last_run = ?2, last_success = ?3,
                    last_failed = ?4, last_total = ?5, last_fired = ?6, last_success_at = ?7",
            )?
            .execute(params![
                j.name,
                j.last_run.map(ts),
                j.last_success,
                j.last_failed as i64,
                j.last_total as i64,
                j.last_fired.map(ts),
                j.last_success_at.map(ts),
            ])?;
        }
        StoreOp::Audit(a) => {
            tx.prepare_cached(
                "INSERT INTO audit (at, actor, source, action, job, instance, machine, ok, detail)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            )?
            .execute(params![
                ts(a.at),
                a.actor.name,
                a.actor.source.map(|ip| ip.to_string()),
                a.action.as_str(),
                a.job,
                a.instance,
                a.machine,
                a.ok,
                a.detail,
            ])?;
            // Every thousandth entry trims the trail to its cap, so that even a client
            // starting runs in a loop between two hourly prunes leaves it bounded.
            if tx.last_insert_rowid().rem_euclid(1000) == 0 {
                trim_audit(tx, crate::audit::MAX_ROWS)?;
            }
        }
        StoreOp::Missed(m) => super::recovery::write_missed(tx, &m)?,
        StoreOp::Attempt(a) => {
            super::recovery::write_attempt(tx, &a)?;
            outputs.restart_sequence(tx, &a.instance, &a.machine, retention)?;
        }
        // A SQLite store belongs to one master, which never loses a job to another, and what
        // it keeps in memory is per machine of an active run, not per job: each machine's
        // output pending in the journal, which must still be folded into its chunks whoever
        // acts for the job. Dropping it would strand that output, so there is nothing to
        // forget.
        StoreOp::ForgetJob(_) => {}
        StoreOp::Notify(_) | StoreOp::Query(_) | StoreOp::Prune => {}
    }
    Ok(())
}

/// The runs of `job` that have not ended.
fn unfinished_runs_of(tx: &Transaction<'_>, job: &str) -> Result<Vec<String>, StoreError> {
    let mut stmt =
        tx.prepare_cached("SELECT instance FROM runs WHERE ended IS NULL AND job = ?1")?;
    let rows = stmt.query_map([job], |r| r.get(0))?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// The start time before which finished runs are too old. Checked: `OffsetDateTime - Duration`
/// panics when the result leaves the calendar, and an age limit reaching back that far simply
/// keeps every run.
fn age_cutoff(now: OffsetDateTime, max_age_days: u32) -> OffsetDateTime {
    now.checked_sub(time::Duration::days(max_age_days.into()))
        .unwrap_or(time::PrimitiveDateTime::MIN.assume_utc())
}

/// Deletes the oldest audit entries beyond the cap; returns how many.
fn trim_audit(tx: &Transaction<'_>, cap: u64) -> Result<usize, StoreError> {
    Ok(tx.execute(
        "DELETE FROM audit WHERE id <= (SELECT id FROM audit ORDER BY id DESC LIMIT 1 OFFSET ?1)",
        [i64::try_from(cap).unwrap_or(i64::MAX)],
    )?)
}

/// Deletes finished runs beyond the per-job count or older than the age limit.
fn prune(tx: &Transaction<'_>, retention: Retention) -> Result<(), StoreError> {
    let cutoff = ts(age_cutoff(
        OffsetDateTime::now_utc(),
        retention.max_age_days,
    ));
    tx.execute_batch(
        "CREATE TEMP TABLE IF NOT EXISTS doomed (instance TEXT PRIMARY KEY); DELETE FROM doomed;",
    )?;
    tx.execute(
        "INSERT OR IGNORE INTO doomed SELECT instance FROM runs WHERE ended IS NOT NULL AND started < ?1",
        [&cutoff],
    )?;
    tx.execute(
        "INSERT OR IGNORE INTO doomed SELECT instance FROM (
            SELECT instance, ROW_NUMBER() OVER (PARTITION BY job ORDER BY started DESC) AS n
            FROM runs WHERE ended IS NOT NULL) WHERE n > ?1",
        [i64::try_from(retention.runs_per_job).unwrap_or(i64::MAX)],
    )?;
    let n = tx.execute(
        "DELETE FROM output WHERE instance IN (SELECT instance FROM doomed)",
        [],
    )?;
    tx.execute(
        "DELETE FROM machines WHERE instance IN (SELECT instance FROM doomed)",
        [],
    )?;
    super::recovery::prune_doomed(tx)?;
    let runs = tx.execute(
        "DELETE FROM runs WHERE instance IN (SELECT instance FROM doomed)",
        [],
    )?;
    if runs > 0 {
        tracing::info!(runs, chunks = n, "Retention removed old runs.");
    }
    // The audit trail ages like the runs, and is capped in rows as well so that a script
    // starting runs in a loop cannot make it grow without bound between two prunes' ages.
    let mut audit = tx.execute("DELETE FROM audit WHERE at < ?1", [&cutoff])?;
    audit = audit.saturating_add(trim_audit(tx, crate::audit::MAX_ROWS)?);
    if audit > 0 {
        tracing::info!(entries = audit, "Retention removed old audit entries.");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_age_limit_beyond_the_calendar_keeps_every_run() {
        let now = OffsetDateTime::now_utc();
        assert_eq!(
            age_cutoff(now, u32::MAX),
            time::PrimitiveDateTime::MIN.assume_utc()
        );
        assert_eq!(age_cutoff(now, 1), now - time::Duration::DAY);
    }

    #[test]
    fn output_ranges_past_the_signed_range_are_empty_not_wrapped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = Db::open(&dir.path().join("saltpeter.db"), Retention::default()).expect("open");
        db.conn
            .execute_batch(
                "INSERT INTO machines (instance, machine, status, launched, started,
                    kill_requested, modern, output_bytes)
                 VALUES ('j_1', 'm1', 'running', 1, 1, 0, 1, 6);
                 INSERT INTO output (instance, machine, idx, byte_offset, head, data)
                 VALUES ('j_1', 'm1', 0, 0, 1, 'hello\n');",
            )
            .expect("rows");
        for (offset, length) in [
            (1u64 << 63, None),
            (u64::MAX, None),
            (u64::MAX, Some(u64::MAX)),
            (7, Some(u64::MAX)),
        ] {
            let range = db
                .output_range("j_1", "m1", offset, length)
                .expect("range")
                .expect("the machine is there");
            assert_eq!(range.text, "", "{offset} {length:?}");
        }
        let all = db
            .output_range("j_1", "m1", 1, Some(u64::MAX))
            .expect("range")
            .expect("the machine is there");
        assert_eq!(all.text, "ello\n");
    }

    #[test]
    fn output_written_by_schema_2_reads_the_same_after_the_move_to_a_rowid_table() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("saltpeter.db");
        {
            let conn = Connection::open(&path).expect("open");
            conn.execute_batch(MIGRATION_1).expect("schema 1");
            conn.execute_batch(MIGRATION_2).expect("schema 2");
            conn.pragma_update(None, "user_version", 2)
                .expect("version");
            conn.execute_batch(
                "INSERT INTO machines (instance, machine, status, launched, started,
                    kill_requested, modern, output_bytes)
                 VALUES ('j_1', 'm1', 'running', 1, 1, 0, 1, 11);
                 INSERT INTO output VALUES ('j_1', 'm1', 1, 6, 0, 'world\n');
                 INSERT INTO output VALUES ('j_1', 'm1', 0, 0, 1, 'hello\n');",
            )
            .expect("rows");
        }
        let db = Db::open(&path, Retention::default()).expect("migrate");
        let version: i64 = db
            .conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .expect("version");
        assert_eq!(version, SCHEMA_VERSION);
        let range = db
            .output_range("j_1", "m1", 0, None)
            .expect("range")
            .expect("the machine is there");
        assert_eq!(range.text, "hello\nworld\n");
        // A second chunk index for the same machine is still refused.
        let again = db.conn.execute(
            "INSERT INTO output (instance, machine, idx, byte_offset, head, data)
             VALUES ('j_1', 'm1', 0, 0, 1, 'x')",
            [],
        );
        assert!(again.is_err());
    }

    fn audit_record(at: OffsetDateTime, n: usize) -> crate::audit::AuditRecord {
        crate::audit::AuditRecord {
            at,
            actor: crate::audit::Actor::remote(format!("a{n}"), "10.0.0.5".parse().ok()),
            action: crate::audit::Action::Run,
            job: Some("j".into()),
            instance: None,
            machine: None,
            ok: true,
            detail: None,
        }
    }

    #[test]
    fn a_schema_3_store_gains_an_audit_trail_that_ages_and_is_capped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("saltpeter.db");
        {
            let conn = Connection::open(&path).expect("open");
            for m in [MIGRATION_1, MIGRATION_2, MIGRATION_3] {
                conn.execute_batch(m).expect("older schema");
            }
            conn.pragma_update(None, "user_version", 3)
                .expect("version");
        }
        let retention = Retention {
            max_age_days: 30,
            ..Retention::default()
        };
        let mut db = Db::open(&path, retention).expect("migrate");
        let now = OffsetDateTime::now_utc();
        let old = now - time::Duration::days(31);
        db.apply(vec![
            StoreOp::Audit(audit_record(old, 0)),
            StoreOp::Audit(audit_record(now, 1)),
            StoreOp::Audit(audit_record(now, 2)),
        ]);
        // The first batch also applies retention: the 31-day-old entry is gone with the age
        // limit of the runs.
        let page = db.audit_page(None, 10).expect("page");
        let actors: Vec<&str> = page.iter().map(|e| e.actor.as_str()).collect();
        assert_eq!(actors, ["a2", "a1"]);
        let newest = page.first().expect("an entry");
        assert_eq!(newest.source.as_deref(), Some("10.0.0.5"));
        assert_eq!(newest.action, "run");
        let older = db.audit_page(Some(newest.id), 1).expect("page");
        let actors: Vec<&str> = older.iter().map(|e| e.actor.as_str()).collect();
        assert_eq!(actors, ["a1"]);
        // Count: only the newest `cap` stay.
        let tx = db.conn.transaction().expect("tx");
        assert_eq!(trim_audit(&tx, 1).expect("trim"), 1);
        tx.commit().expect("commit");
        let page = db.audit_page(None, 10).expect("page");
        let actors: Vec<&str> = page.iter().map(|e| e.actor.as_str()).collect();
        assert_eq!(actors, ["a2"]);
    }

    #[test]
    fn a_schema_6_store_reads_its_runs_as_first_attempts_after_schema_7() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("saltpeter.db");
        {
            let conn = Connection::open(&path).expect("open");
            for m in [
                MIGRATION_1,
                MIGRATION_2,
                MIGRATION_3,
                MIGRATION_4,
                MIGRATION_5,
                MIGRATION_6,
            ] {
                conn.execute_batch(m).expect("schema");
            }
            conn.pragma_update(None, "user_version", 6)
                .expect("version");
            conn.execute_batch(
                "INSERT INTO runs (instance, job, grp, started, ended, success, killed, token,
                    resolving, maintenance, pending_batches)
                 VALUES ('j_1', 'j', 'g', '2026-06-01T12:00:00.000000+00:00',
                    '2026-06-01T12:00:05.000000+00:00', 1, 0, 't', 0, '[]', '[]');
                 INSERT INTO machines (instance, machine, status, retcode, launched, started,
                    kill_requested, modern)
                 VALUES ('j_1', 'm1', 'success', 0, 1, 1, 0, 1);",
            )
            .expect("rows");
        }
        // The runs are older than the default age limit by the real clock; keep them.
        let keep = Retention {
            max_age_days: u32::MAX,
            ..Retention::default()
        };
        let mut db = Db::open(&path, keep).expect("migrate");
        let version: i64 = db
            .conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .expect("version");
        assert_eq!(version, 7);
        let view = db.run_view("j_1").expect("view").expect("the run is there");
        assert_eq!(view.missed, None);
        let m1 = view.machines.get("m1").expect("m1");
        assert_eq!((m1.attempt, m1.attempts.len(), m1.retcode), (1, 0, Some(0)));
        let slot = OffsetDateTime::from_unix_timestamp(1_780_315_200).expect("time");
        db.apply(vec![StoreOp::Missed(super::super::MissedRecord::one(
            "j",
            "g",
            slot,
            super::super::MissedReason::Overlap,
        ))]);
        let page = db.runs_page("j", None, 10).expect("page");
        let kinds: Vec<(&str, Option<&str>, Option<u64>)> = page
            .iter()
            .map(|r| (r.instance.as_str(), r.missed.as_deref(), r.missed_count))
            .collect();
        assert_eq!(
            kinds,
            [
                ("j_missed_1780315200", Some("overlap"), Some(1)),
                ("j_1", None, None)
            ]
        );
    }
}
