//! Missed slots and catch-up: which cron slots did not run and why, their records in the
//! job's history, the [`EngineEvent`]s others subscribe to, and the one late fire that
//! `catch_up: last` allows.
//!
//! A slot is missed when the master was not there to fire it (stopped, suspended, asleep:
//! `master_down`), when the job's previous run was still going (`overlap`), or when global
//! maintenance was on (`maintenance`). Slots the master was away for are found in two places:
//! at start-up, between each job's last fired slot and now; and when the scheduler wakes to
//! find a slot more than [`ON_TIME`] late or several slots due at once (a stall). The walk over
//! such slots is bounded by the job's `missed_limit` for the records and by [`COUNT_WALK`] for
//! the count of the rest, so a master that was down for a year in front of a job that runs
//! every second writes at most `missed_limit + 1` rows and does a bounded amount of work.
// Times from the store and the schedule reach arithmetic here, so every operation that could
// overflow is written checked ("Totality" in docs/ARCHITECTURE.md).
#![warn(
    clippy::arithmetic_side_effects,
    clippy::indexing_slicing,
    clippy::string_slice
)]

use std::time::Duration;

use time::OffsetDateTime;
use tokio::sync::mpsc;

use super::Engine;
use saltpeter_config::recovery::CatchUp;
use saltpeter_config::schedule::Schedule;
use saltpeter_store::{MissedReason, MissedRecord, StoreOp};

/// How late a slot may fire and still count as on time. The scheduler wakes at the slot, so
/// lateness beyond scheduling jitter means the master was not running.
pub(crate) const ON_TIME: Duration = Duration::from_secs(60);

/// The most slots counted (not recorded) beyond a job's `missed_limit` in one scan; past it,
/// the summary's count is a lower bound and says so. Small, because a stall ends with every
/// job's scan on the engine's thread at once.
pub(crate) const COUNT_WALK: usize = 1_000;

/// Capacity of the event sink's queue; events beyond it are dropped (and logged), so a slow
/// subscriber never holds up the engine.
pub(crate) const EVENT_QUEUE: usize = 1024;

/// A channel of the usual capacity for [`Engine::set_event_sink`].
pub fn event_channel() -> (mpsc::Sender<EngineEvent>, mpsc::Receiver<EngineEvent>) {
    mpsc::channel(EVENT_QUEUE)
}

/// Something the engine tells subscribers (a notifier, say) about, besides run state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EngineEvent {
    /// A slot of `job` did not run. `count` is 1, or, for the summary of slots beyond the
    /// job's `missed_limit`, how many slots from `slot` on it stands for (`at_least` when the
    /// count itself stopped at [`COUNT_WALK`]).
    Missed {
        job: String,
        slot: OffsetDateTime,
        reason: MissedReason,
        count: u64,
        at_least: bool,
    },
    /// A missed slot was fired late by `catch_up: last`, as run `instance`.
    CaughtUp {
        job: String,
        slot: OffsetDateTime,
        instance: String,
    },
    /// A machine's attempt failed and the machine will be launched again after the job's
    /// `retry_delay`, as attempt `next` of `max`.
    Retry {
        job: String,
        instance: String,
        machine: String,
        retcode: i64,
        next: u32,
        max: u32,
    },
}

/// The slots one scan found missed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct MissedScan {
    /// Recorded one by one, oldest first, at most the job's `missed_limit`.
    pub recorded: Vec<OffsetDateTime>,
    /// The first slot beyond those, and how many there are from it on.
    pub rest: Option<(OffsetDateTime, u64)>,
    /// The count of `rest` stopped at [`COUNT_WALK`].
    pub at_least: bool,
}

/// The slots of `schedule` in `(after, until]`: the first `limit` of them, then a count of the
/// rest (at most [`COUNT_WALK`] counted). Work is bounded by `limit + COUNT_WALK` searches.
pub(crate) fn scan(
    schedule: &Schedule,
    after: OffsetDateTime,
    until: OffsetDateTime,
    limit: usize,
) -> MissedScan {
    let mut out = MissedScan::default();
    if until <= after {
        return out;
    }
    let mut cursor = after;
    while out.recorded.len() < limit {
        match schedule.next_after(cursor) {
            Some(t) if t <= until && t > cursor => {
                out.recorded.push(t);
                cursor = t;
            }
            _ => return out,
        }
    }
    let mut counted: u64 = 0;
    let mut first = None;
    for _ in 0..COUNT_WALK {
        match schedule.next_after(cursor) {
            Some(t) if t <= until && t > cursor => {
                first.get_or_insert(t);
                counted = counted.saturating_add(1);
                cursor = t;
            }
            _ => {
                out.rest = first.map(|f| (f, counted));
                return out;
            }
        }
    }
    // The walk stopped before `until`: there are more slots than were counted.
    out.at_least = schedule
        .next_after(cursor)
        .is_some_and(|t| t <= until && t > cursor);
    out.rest = first.map(|f| (f, counted));
    out
}

/// The latest slot of `schedule` in `(after, now]`, if any.
fn latest_in(
    schedule: &Schedule,
    after: OffsetDateTime,
    now: OffsetDateTime,
) -> Option<OffsetDateTime> {
    schedule.due_slots(after, now)
}

/// Whether `slot` is within `window` of `now`.
fn within(slot: OffsetDateTime, now: OffsetDateTime, window: Duration) -> bool {
    let late = now
        .unix_timestamp_nanos()
        .checked_sub(slot.unix_timestamp_nanos());
    late.is_some_and(|l| l >= 0 && l <= i128::try_from(window.as_nanos()).unwrap_or(i128::MAX))
}

impl Engine {
    /// Subscribes `tx` to the engine's [`EngineEvent`]s (replacing an earlier subscriber).
    /// Sends never wait: when the queue is full the event is dropped and logged.
    pub fn set_event_sink(&mut self, tx: mpsc::Sender<EngineEvent>) {
        self.events = Some(tx);
    }

    /// Hands an event to the subscriber, if any.
    pub(super) fn emit(&mut self, event: EngineEvent) {
        let Some(tx) = &self.events else { return };
        if let Err(error) = tx.try_send(event) {
            tracing::warn!(%error, "An engine event was dropped: its subscriber is not keeping up.");
        }
    }

    /// At start-up: every job's slots between its last fired slot and now were missed while
    /// the master was down. Records them and, for `catch_up: last`, fires the latest one if it
    /// is still within the job's `starting_deadline`.
    pub(super) fn scan_missed_at_start(&mut self) {
        let now = self.clock.wall();
        let mut jobs: Vec<(String, OffsetDateTime)> = self
            .jobs
            .iter()
            .filter_map(|(name, s)| Some((name.clone(), s.last_fired?)))
            .filter(|(_, floor)| *floor < now)
            .collect();
        jobs.sort();
        for (name, floor) in jobs {
            self.scan_missed_since(&name, floor, now, None);
        }
    }

    /// Records the slots of `name` after `floor` up to `now` as missed (the latest maybe caught
    /// up): after a restart, or when this master takes a job over from another. `late_ok`
    /// fires the latest slot late whatever the job's policy when it is at most that old: a
    /// job handed from one master to the next waits for a renewal period, which is not a
    /// master being down.
    pub(super) fn scan_missed_since(
        &mut self,
        name: &str,
        floor: OffsetDateTime,
        now: OffsetDateTime,
        late_ok: Option<Duration>,
    ) {
        let Some(job) = self.config.jobs.get(name).cloned() else {
            return;
        };
        let Some(latest) = latest_in(&job.schedule, floor, now) else {
            return;
        };
        self.missed_window(name, floor, latest, now, late_ok);
    }

    /// The scheduler found `slot` of `name` due at `now`. Returns the slot the caller fires
    /// as usual: `slot` itself when it is on time and alone, or, after a stall, the latest due
    /// slot when that one is on time. Every other due slot is recorded as missed, and the
    /// latest of them fired here when `catch_up: last` reaches it (then `None` is returned).
    pub(super) fn plan_due_slot(
        &mut self,
        name: &str,
        slot: OffsetDateTime,
        now: OffsetDateTime,
    ) -> Option<OffsetDateTime> {
        let Some(job) = self.config.jobs.get(name).cloned() else {
            return Some(slot);
        };
        let before = slot.checked_sub(time::Duration::SECOND).unwrap_or(slot);
        let latest = latest_in(&job.schedule, before, now)
            .filter(|l| *l >= slot)
            .unwrap_or(slot);
        if latest == slot && within(slot, now, ON_TIME) {
            return Some(slot);
        }
        if within(latest, now, ON_TIME) {
            // A stall ended just after a slot: that slot is simply on time, the rest missed.
            let until = latest.checked_sub(time::Duration::SECOND).unwrap_or(latest);
            self.record_missed(name, before, until, MissedReason::MasterDown);
            return Some(latest);
        }
        self.missed_window(name, before, latest, now, None);
        None
    }

    /// The slots of `name` in `(after, latest]` were missed while the master was away;
    /// `latest` is the newest of them. Fires `latest` for `catch_up: last` within the
    /// deadline (and returns it), recording the others; else records them all.
    fn missed_window(
        &mut self,
        name: &str,
        after: OffsetDateTime,
        latest: OffsetDateTime,
        now: OffsetDateTime,
        late_ok: Option<Duration>,
    ) -> Option<OffsetDateTime> {
        let job = self.config.jobs.get(name).cloned()?;
        let policy = &job.recovery;
        let catch_up = (policy.catch_up == CatchUp::Last
            && within(latest, now, policy.starting_deadline))
            || late_ok.is_some_and(|w| within(latest, now, w));
        let until = if catch_up {
            latest.checked_sub(time::Duration::SECOND).unwrap_or(latest)
        } else {
            latest
        };
        self.record_missed(name, after, until, MissedReason::MasterDown);
        if let Some(state) = self.jobs.get_mut(name) {
            state.last_fired = Some(state.last_fired.map_or(latest, |f| f.max(latest)));
        }
        self.save_job(name);
        if !catch_up {
            return None;
        }
        if self.cluster.is_some() {
            self.claim_then_fire(name, latest, crate::cluster::SlotKind::CatchUp);
        } else {
            self.fire_catch_up(name, latest);
        }
        Some(latest)
    }

    /// Fires the missed slot `latest` of `name` late (`catch_up: last`).
    pub(super) fn fire_catch_up(&mut self, name: &str, latest: OffsetDateTime) {
        self.log_note(
            name,
            format!(
                "Catching up the missed slot of {} (catch_up: last)",
                saltpeter_store::rfc3339(latest)
            ),
        );
        match self.fire(name, None) {
            Ok(instance) => {
                // Debug only: the wiring's event consumer logs the event itself at info level.
                tracing::debug!(job = %name, slot = %saltpeter_store::rfc3339(latest), %instance, "Caught up a missed slot.");
                self.emit(EngineEvent::CaughtUp {
                    job: name.to_owned(),
                    slot: latest,
                    instance,
                });
            }
            Err(error) => {
                tracing::debug!(job = %name, %error, "Catch-up run not started.");
                self.on_fire_refused(name, latest);
            }
        }
    }

    /// Records the slots of `name` in `(after, until]` as missed for `reason`, within the
    /// job's `missed_limit`, the rest summed up in one record and one log line.
    fn record_missed(
        &mut self,
        name: &str,
        after: OffsetDateTime,
        until: OffsetDateTime,
        reason: MissedReason,
    ) {
        let Some(job) = self.config.jobs.get(name).cloned() else {
            return;
        };
        let limit = usize::try_from(job.recovery.missed_limit).unwrap_or(usize::MAX);
        let found = scan(&job.schedule, after, until, limit);
        for slot in &found.recorded {
            self.missed_one(name, &job.group, *slot, reason, 1, false);
        }
        if let Some((first, count)) = found.rest {
            self.missed_one(name, &job.group, first, reason, count, found.at_least);
        }
    }

    /// A run the scheduler asked for was refused: the slot is missed because of overlap or
    /// maintenance. Other refusals (the job vanished) are not missed slots.
    pub(super) fn on_fire_refused(&mut self, name: &str, slot: OffsetDateTime) {
        let reason = if self.config.maintenance.global {
            MissedReason::Maintenance
        } else if self.jobs.get(name).is_some_and(|s| s.overlap) {
            MissedReason::Overlap
        } else {
            return;
        };
        let Some(group) = self.config.jobs.get(name).map(|j| j.group.clone()) else {
            return;
        };
        self.missed_one(name, &group, slot, reason, 1, false);
    }

    /// Writes one missed record, logs it and tells the subscriber.
    fn missed_one(
        &mut self,
        name: &str,
        group: &str,
        slot: OffsetDateTime,
        reason: MissedReason,
        count: u64,
        at_least: bool,
    ) {
        let record = if count == 1 && !at_least {
            MissedRecord::one(name, group, slot, reason)
        } else {
            MissedRecord::summary(name, group, slot, reason, count)
        };
        let when = saltpeter_store::rfc3339(slot);
        let text = if record.count == 1 && !at_least {
            format!("Missed the slot of {when} ({})", reason.as_str())
        } else {
            format!(
                "Missed {}{count} more slots from {when} on ({}); not recorded one by one (missed_limit)",
                if at_least { "at least " } else { "" },
                reason.as_str()
            )
        };
        // Debug only: the wiring's event consumer logs the event itself at info level.
        tracing::debug!(job = %name, slot = %when, reason = reason.as_str(), count, "Missed slot.");
        self.log_note(name, text);
        self.store.push(StoreOp::Missed(record));
        self.emit(EngineEvent::Missed {
            job: name.to_owned(),
            slot,
            reason,
            count,
            at_least,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(unix: i64) -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp(unix).expect("time")
    }

    #[test]
    fn a_scan_records_up_to_the_limit_and_counts_the_rest() {
        let every_second = Schedule::parse_line("* * * * * * *", None).expect("cron");
        let found = scan(&every_second, at(1_000), at(1_010), 3);
        assert_eq!(found.recorded, vec![at(1_001), at(1_002), at(1_003)]);
        assert_eq!(found.rest, Some((at(1_004), 7)));
        assert!(!found.at_least);
    }

    #[test]
    fn a_year_of_a_per_second_job_is_counted_with_bounded_work() {
        let every_second = Schedule::parse_line("* * * * * * *", None).expect("cron");
        let found = scan(&every_second, at(0), at(365 * 86_400), 100);
        assert_eq!(found.recorded.len(), 100);
        assert_eq!(found.rest, Some((at(101), COUNT_WALK as u64)));
        assert!(found.at_least);
    }

    #[test]
    fn an_empty_window_has_nothing_missed() {
        let every_minute = Schedule::parse_line("0 * * * * * *", None).expect("cron");
        assert_eq!(
            scan(&every_minute, at(60), at(60), 10),
            MissedScan::default()
        );
        assert_eq!(
            scan(&every_minute, at(61), at(119), 10),
            MissedScan::default()
        );
    }
}
