//! The store's side of missed slots and retried machines: schema version 7, the rows written
//! for a missed slot and for an attempt that a retry superseded, and reading them back.
//!
//! A missed slot is a row of `runs` with no machines, `started = ended = ` the slot, `missed`
//! set to its reason and `missed_count` to how many slots it stands for (1, or more for the
//! summary of slots beyond a job's `missed_limit`), so history pages, the timeline and
//! retention treat it like any other run. A machine's current (or final) attempt stays in
//! `machines`; each attempt a retry replaced is kept in `attempts`, so the current attempt's
//! number is one more than the machine's rows there. Rows written before version 7 have none,
//! and read as attempt 1.

use std::collections::BTreeMap;

use rusqlite::{Connection, Transaction, params};
use saltpeter_proto::{Cause, Timestamp};
use serde::Serialize;
use time::OffsetDateTime;

use super::StoreError;

/// Missed slots on `runs`, and the attempts retries replaced.
pub(super) const MIGRATION_7: &str = "
ALTER TABLE runs ADD COLUMN missed TEXT;
ALTER TABLE runs ADD COLUMN missed_count INTEGER NOT NULL DEFAULT 0;
CREATE TABLE attempts (
    instance TEXT NOT NULL,
    machine TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    retcode INTEGER,
    cause TEXT,
    starttime TEXT,
    endtime TEXT,
    PRIMARY KEY (instance, machine, attempt)
) WITHOUT ROWID;
";

/// Why a slot did not run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MissedReason {
    /// The master was not running (or not scheduling: stopped, suspended, asleep) at the slot.
    MasterDown,
    /// The job's previous run was still going and the job does not allow overlap.
    Overlap,
    /// Global maintenance was on.
    Maintenance,
}

impl MissedReason {
    pub fn as_str(self) -> &'static str {
        match self {
            MissedReason::MasterDown => "master_down",
            MissedReason::Overlap => "overlap",
            MissedReason::Maintenance => "maintenance",
        }
    }
}

/// A missed slot (or, with `count > 1`, the summary of several) for a job's history.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MissedRecord {
    /// The history row's id: `<job>_missed_<slot's unix seconds>`, with `_more` for a summary.
    pub instance: String,
    pub job: String,
    pub group: String,
    pub slot: OffsetDateTime,
    pub reason: MissedReason,
    pub count: u64,
}

impl MissedRecord {
    /// One missed slot.
    pub fn one(job: &str, group: &str, slot: OffsetDateTime, reason: MissedReason) -> Self {
        Self {
            instance: format!("{job}_missed_{}", slot.unix_timestamp()),
            job: job.to_owned(),
            group: group.to_owned(),
            slot,
            reason,
            count: 1,
        }
    }

    /// `count` missed slots from `first` on, beyond what was recorded one by one.
    pub fn summary(
        job: &str,
        group: &str,
        first: OffsetDateTime,
        reason: MissedReason,
        count: u64,
    ) -> Self {
        Self {
            instance: format!("{job}_missed_{}_more", first.unix_timestamp()),
            count,
            ..Self::one(job, group, first, reason)
        }
    }
}

/// The result of an attempt that a retry replaced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AttemptRecord {
    pub instance: String,
    pub machine: String,
    /// 1 for the first launch.
    pub attempt: u32,
    pub retcode: Option<i64>,
    pub cause: Option<Cause>,
    pub starttime: Option<OffsetDateTime>,
    pub endtime: Option<OffsetDateTime>,
}

/// An earlier attempt as the API shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct AttemptView {
    pub attempt: u32,
    pub retcode: Option<i64>,
    pub cause: Option<String>,
    pub starttime: Option<String>,
    pub endtime: Option<String>,
}

impl AttemptRecord {
    pub fn view(&self) -> AttemptView {
        AttemptView {
            attempt: self.attempt,
            retcode: self.retcode,
            cause: self.cause.map(|c| c.as_str().to_owned()),
            starttime: self.starttime.map(ts),
            endtime: self.endtime.map(ts),
        }
    }
}

fn ts(at: OffsetDateTime) -> String {
    Timestamp::new(at).to_string()
}

/// Writes a missed slot. A slot recorded before (the same id) is left as it was.
pub(super) fn write_missed(tx: &Transaction<'_>, m: &MissedRecord) -> Result<(), StoreError> {
    tx.prepare_cached(
        "INSERT OR IGNORE INTO runs (instance, job, grp, started, ended, success, killed, token,
                                     resolving, maintenance, pending_batches, missed, missed_count)
         VALUES (?1, ?2, ?3, ?4, ?4, NULL, 0, '', 0, '[]', '[]', ?5, ?6)",
    )?
    .execute(params![
        m.instance,
        m.job,
        m.group,
        ts(m.slot),
        m.reason.as_str(),
        i64::try_from(m.count).unwrap_or(i64::MAX),
    ])?;
    Ok(())
}

/// Writes an attempt a retry replaced.
pub(super) fn write_attempt(tx: &Transaction<'_>, a: &AttemptRecord) -> Result<(), StoreError> {
    tx.prepare_cached(
        "INSERT OR REPLACE INTO attempts (instance, machine, attempt, retcode, cause, starttime,
                                          endtime)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )?
    .execute(params![
        a.instance,
        a.machine,
        a.attempt,
        a.retcode,
        a.cause.map(Cause::as_str),
        a.starttime.map(ts),
        a.endtime.map(ts),
    ])?;
    Ok(())
}

/// The replaced attempts of a run's machines, oldest first per machine.
pub(super) fn attempts_of(
    conn: &Connection,
    instance: &str,
) -> Result<BTreeMap<String, Vec<AttemptRecord>>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT machine, attempt, retcode, cause, starttime, endtime FROM attempts
         WHERE instance = ?1 ORDER BY machine, attempt",
    )?;
    let rows = stmt.query_map([instance], |r| {
        Ok(AttemptRecord {
            instance: instance.to_owned(),
            machine: r.get(0)?,
            attempt: r.get(1)?,
            retcode: r.get(2)?,
            cause: crate::stored_cause(r.get(3)?),
            starttime: parse_ts(r.get(4)?),
            endtime: parse_ts(r.get(5)?),
        })
    })?;
    let mut out: BTreeMap<String, Vec<AttemptRecord>> = BTreeMap::new();
    for row in rows {
        let row = row?;
        out.entry(row.machine.clone()).or_default().push(row);
    }
    Ok(out)
}

/// A history row's missed reason and count, if it is a missed slot.
pub(super) fn missed_of(
    conn: &Connection,
    instance: &str,
) -> Result<Option<(String, u64)>, StoreError> {
    use rusqlite::OptionalExtension;
    let row: Option<(Option<String>, i64)> = conn
        .query_row(
            "SELECT missed, missed_count FROM runs WHERE instance = ?1",
            [instance],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    Ok(row.and_then(|(reason, count)| Some((reason?, u64::try_from(count).unwrap_or(0)))))
}

/// Deletes the attempts of runs retention removes (the `doomed` table of the prune).
pub(super) fn prune_doomed(tx: &Transaction<'_>) -> Result<(), StoreError> {
    tx.execute(
        "DELETE FROM attempts WHERE instance IN (SELECT instance FROM doomed)",
        [],
    )?;
    Ok(())
}

fn parse_ts(text: Option<String>) -> Option<OffsetDateTime> {
    text.and_then(|t| Timestamp::parse(&t).ok())
        .map(Timestamp::get)
}
