//! When jobs fire. Each job has its next slot in an ordered queue; the engine sleeps until the
//! earliest one (capped, so a wall-clock step is noticed within [`MAX_SLEEP`]) and then fires
//! every job whose slot has come. A slot fires once: after firing, the job's next slot is
//! computed strictly after both the slot and the current second, so slots missed during a slow
//! step collapse into the one fire and nothing from before start-up is caught up (the original's
//! rule, without its 50 ms polling; docs/COMPATIBILITY.md, "Schedules").
//!
//! What becomes of the slots such a step passed over (recorded as missed, the latest maybe
//! caught up) is decided in `missed.rs`, before the due slot fires.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use time::OffsetDateTime;
use tokio::time::Instant;

use super::Engine;
use crate::clock::Clock;
use saltpeter_config::Config;

/// The longest the scheduler sleeps without looking at the wall clock again.
const MAX_SLEEP: Duration = Duration::from_secs(60);

/// Next slots of every job.
#[derive(Debug, Default)]
pub(crate) struct Scheduler {
    queue: BTreeSet<(OffsetDateTime, String)>,
    next: HashMap<String, OffsetDateTime>,
    /// Each job's schedule as last queued, to tell whether a reload changed it.
    cron_lines: HashMap<String, String>,
}

impl Scheduler {
    /// Recomputes slots after a config change. Jobs whose schedule is unchanged keep their
    /// queued slot, so a reload never makes a slot fire twice or be skipped.
    /// `floors` holds each job's last fired slot (restored after a restart): the next slot is
    /// computed after it too, so it can never fire again.
    pub(crate) fn reload(
        &mut self,
        config: &Config,
        now: OffsetDateTime,
        floors: &HashMap<String, OffsetDateTime>,
    ) {
        let mut next = HashMap::new();
        for (name, job) in &config.jobs {
            let keep = self
                .next
                .get(name)
                .copied()
                .filter(|_| self.schedules_equal(name, job));
            let after = floors.get(name).map_or(now, |floor| now.max(*floor));
            let slot = keep.or_else(|| job.schedule.next_after(after));
            if let Some(slot) = slot {
                next.insert(name.clone(), slot);
            }
        }
        self.queue = next.iter().map(|(k, v)| (*v, k.clone())).collect();
        self.next = next;
        self.cron_lines = config
            .jobs
            .iter()
            .map(|(k, j)| (k.clone(), j.schedule.cron_line()))
            .collect();
    }

    fn schedules_equal(&self, name: &str, job: &saltpeter_config::JobSpec) -> bool {
        self.cron_lines
            .get(name)
            .is_some_and(|line| *line == job.schedule.cron_line())
    }

    /// When the engine should next look at the queue.
    pub(crate) fn next_wake(&self, clock: &Clock) -> Option<Instant> {
        let (slot, _) = self.queue.first()?;
        let wait = *slot - clock.wall();
        let wait = if wait.is_negative() {
            Duration::ZERO
        } else {
            Duration::try_from(wait).unwrap_or(MAX_SLEEP).min(MAX_SLEEP)
        };
        Some(clock.instant() + wait)
    }

    /// Removes and returns the jobs whose slot is at or before `now`, re-queuing each at its
    /// next slot strictly after `now`.
    pub(crate) fn take_due(
        &mut self,
        config: &Config,
        now: OffsetDateTime,
    ) -> Vec<(String, OffsetDateTime)> {
        let mut due = Vec::new();
        while let Some((slot, name)) = self.queue.first().cloned() {
            if slot > now {
                break;
            }
            self.queue.pop_first();
            self.next.remove(&name);
            let Some(job) = config.jobs.get(&name) else {
                continue;
            };
            if let Some(following) = job.schedule.next_after(now.max(slot)) {
                self.next.insert(name.clone(), following);
                self.queue.insert((following, name.clone()));
            }
            due.push((name, slot));
        }
        due
    }

    /// Queues `name` at its first slot after `after`, whatever was queued for it: a job this
    /// master just took over starts from the slot its last holder fired.
    pub(crate) fn restart_job(&mut self, config: &Config, name: &str, after: OffsetDateTime) {
        if let Some(old) = self.next.remove(name) {
            self.queue.remove(&(old, name.to_owned()));
        }
        let Some(job) = config.jobs.get(name) else {
            return;
        };
        if let Some(slot) = job.schedule.next_after(after) {
            self.next.insert(name.to_owned(), slot);
            self.queue.insert((slot, name.to_owned()));
        }
        self.cron_lines
            .insert(name.to_owned(), job.schedule.cron_line());
    }

    /// The queued next slot of a job.
    pub(crate) fn next_of(&self, job: &str) -> Option<OffsetDateTime> {
        self.next.get(job).copied()
    }
}

impl Engine {
    pub(super) fn on_schedule(&mut self) {
        let now = self.clock.wall();
        let config = self.config.clone();
        for (job, slot) in self.scheduler.take_due(&config, now) {
            // Another master fires the slots of the jobs it holds.
            if !self.acts_for(&job) {
                continue;
            }
            // Missed slots: a late or stalled slot is recorded (and maybe caught up) there.
            let Some(slot) = self.plan_due_slot(&job, slot, now) else {
                continue;
            };
            if self.cluster.is_some() {
                self.claim_then_fire(&job, slot, crate::cluster::SlotKind::OnTime);
            } else {
                self.fire_slot(&job, slot);
            }
        }
    }

    /// Fires a due slot of `job` (claimed first when there are several masters).
    pub(super) fn fire_slot(&mut self, job: &str, slot: OffsetDateTime) {
        if let Some(state) = self.jobs.get_mut(job) {
            state.last_fired = Some(state.last_fired.map_or(slot, |f| f.max(slot)));
        }
        self.save_job(job);
        if let Err(error) = self.fire(job, None) {
            tracing::debug!(%job, %error, "Scheduled run not started.");
            // Missed slots: overlap and maintenance refusals are recorded.
            self.on_fire_refused(job, slot);
        }
    }
}
