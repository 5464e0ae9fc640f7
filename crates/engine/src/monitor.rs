//! The monitor: per-machine deadlines on the master's monotonic clock (the seed document's
//! rules, without the original's defects: docs/COMPATIBILITY.md). A wrapper's timestamps never decide liveness.
//!
//! Rules for a machine that has not ended, in order of precedence:
//! 1. Killed: no `complete` within [`KILL_GRACE`] of the kill request -> 143; the `kill` frame
//!    is re-sent every [`KILL_RESEND`] meanwhile.
//! 2. Timeout: `timeout` (when set) plus [`TIMEOUT_GRACE`] after launch without `complete` -> 124.
//! 3. Heartbeat: once `start` has arrived, [`heartbeat_timeout`] without a heartbeat -> 253.
//!    Only heartbeat messages (and `start`, which starts the clock) reset it.
//! 4. Start-up: no `start` within [`STARTUP_WINDOW`] of launch -> 254.
//!
//! Deadlines are kept lazily: each machine has at most one live entry in a min-heap (its
//! `armed` instant). A heartbeat only stores an instant, which moves the machine's true
//! deadline later; when the queued entry fires the rules are re-evaluated and the machine is
//! re-armed at its new deadline. So a heartbeat costs O(1), and the heap holds one entry per
//! machine whatever the message rate.
//!
//! [`heartbeat_timeout`]: saltpeter_config::Settings::heartbeat_timeout
// Input from clients, files or wrappers reaches arithmetic here, so every operation that could
// overflow or index out of bounds is written checked ("Totality" in docs/ARCHITECTURE.md).
#![warn(
    clippy::arithmetic_side_effects,
    clippy::indexing_slicing,
    clippy::string_slice
)]

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::Duration;

use saltpeter_proto::{
    Cause, EXIT_HEARTBEAT_LOST, EXIT_KILLED, EXIT_NOT_STARTED, EXIT_TIMEOUT, KILL_GRACE,
    KILL_GRACE_EXPIRED_LINE, MASTER_TIMEOUT_LINE, STARTUP_WINDOW, TIMEOUT_GRACE,
    heartbeat_lost_line,
};
use tokio::time::Instant;

use super::Engine;
use crate::runs::MachineRun;

/// How often an unconfirmed `kill` is repeated.
pub(crate) const KILL_RESEND: Duration = Duration::from_secs(2);

/// The queue of machine deadlines.
#[derive(Debug, Default)]
pub(crate) struct Monitor {
    heap: BinaryHeap<Reverse<(Instant, String, String)>>,
}

impl Monitor {
    /// The earliest queued deadline.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        self.heap.peek().map(|Reverse((at, _, _))| *at)
    }

    fn push(&mut self, at: Instant, instance: &str, machine: &str) {
        self.heap
            .push(Reverse((at, instance.to_owned(), machine.to_owned())));
    }
}

/// What is due for a machine at `now`.
#[derive(Debug, PartialEq, Eq)]
enum Due {
    Verdict {
        retcode: i64,
        cause: Cause,
        line: String,
    },
    ResendKill,
    /// The machine's next attempt is due (see `retry.rs`).
    Relaunch,
    Nothing,
}

/// Applies the rules to one machine. Pure, so the rules can be read and tested in one place.
///
/// Deadlines are computed with checked arithmetic: `Instant + Duration` panics when the sum
/// does not fit the clock, and a deadline that does not fit is one that never comes, so its
/// rule is simply not armed. Validated settings and job files keep every span far below that
/// point; the check keeps the engine total whatever its caller hands it.
fn evaluate(
    m: &MachineRun,
    now: Instant,
    job_timeout: Option<Duration>,
    hb_timeout: Duration,
) -> (Due, Option<Instant>) {
    let c = &m.clock;
    // Retries: a machine waiting for its next attempt has only that deadline.
    if let Some(at) = m.retry_at.filter(|_| !m.ended()) {
        return if now >= at {
            (Due::Relaunch, None)
        } else {
            (Due::Nothing, Some(at))
        };
    }
    let Some(launched) = c.launched else {
        return (Due::Nothing, None);
    };
    if m.ended() {
        return (Due::Nothing, None);
    }
    let mut next: Option<Instant> = None;
    let mut consider = |at: Instant| next = Some(next.map_or(at, |n| n.min(at)));
    if let Some(requested) = c.kill_requested
        && let Some(give_up) = requested.checked_add(KILL_GRACE)
    {
        if now >= give_up {
            return (
                Due::Verdict {
                    retcode: EXIT_KILLED,
                    cause: Cause::KillUnconfirmed,
                    line: KILL_GRACE_EXPIRED_LINE.to_owned(),
                },
                None,
            );
        }
        consider(give_up);
        if let Some(resend) = c.kill_sent.unwrap_or(requested).checked_add(KILL_RESEND) {
            if now >= resend {
                return (Due::ResendKill, now.checked_add(KILL_RESEND));
            }
            consider(resend);
        }
    }
    if let Some(limit) =
        job_timeout.and_then(|t| launched.checked_add(t.saturating_add(TIMEOUT_GRACE)))
    {
        if now >= limit {
            return (
                Due::Verdict {
                    retcode: EXIT_TIMEOUT,
                    cause: Cause::MasterTimeout,
                    line: MASTER_TIMEOUT_LINE.to_owned(),
                },
                None,
            );
        }
        consider(limit);
    }
    if c.direct {
        // Legacy mode: no wrapper, so no `start` or heartbeat to wait for; the launcher
        // reports the command's end.
        return (Due::Nothing, next);
    }
    match (c.started, c.last_beat) {
        (Some(_), Some(beat)) => {
            let Some(lost) = beat.checked_add(hb_timeout) else {
                return (Due::Nothing, next);
            };
            if now >= lost {
                return (
                    Due::Verdict {
                        retcode: EXIT_HEARTBEAT_LOST,
                        cause: Cause::HeartbeatLost,
                        line: heartbeat_lost_line(hb_timeout.as_secs()),
                    },
                    None,
                );
            }
            consider(lost);
        }
        _ => {
            let Some(window) = launched.checked_add(STARTUP_WINDOW) else {
                return (Due::Nothing, next);
            };
            if now >= window {
                let line = match &c.launch_problem {
                    Some(why) => format!("Wrapper failed to start - {why}\n"),
                    None => {
                        "Wrapper failed to connect within 30s (no response from Salt or wrapper)\n"
                            .to_owned()
                    }
                };
                return (
                    Due::Verdict {
                        retcode: EXIT_NOT_STARTED,
                        cause: Cause::NotStarted,
                        line,
                    },
                    None,
                );
            }
            consider(window);
        }
    }
    (Due::Nothing, next)
}

impl Engine {
    /// Queues the machine's next deadline if it is earlier than the one it has queued.
    pub(super) fn rearm(&mut self, instance: &str, machine: &str) {
        let now = self.clock.instant();
        let hb = self.config.settings.heartbeat_timeout;
        let Some(run) = self.runs.get_mut(instance) else {
            return;
        };
        let timeout = run.job.timeout;
        let Some(m) = run.machines.get_mut(machine) else {
            return;
        };
        let (_, next) = evaluate(m, now, timeout, hb);
        // Something may already be due: check right away. That includes a retry that is due
        // at once (`retry_delay: 0`, or one restored after a restart), for which `evaluate`
        // reports no later deadline and the machine has no launch yet.
        let next = next
            .map(|n| n.max(now))
            .or_else(|| m.clock.launched.filter(|_| !m.ended()).map(|_| now))
            .or_else(|| m.retry_at.filter(|_| !m.ended()).map(|at| at.max(now)));
        if let Some(at) = next
            && m.clock.armed.is_none_or(|armed| at < armed)
        {
            m.clock.armed = Some(at);
            self.monitor.push(at, instance, machine);
        }
    }

    /// Handles every deadline that has come.
    pub(super) fn on_deadlines(&mut self) {
        let now = self.clock.instant();
        let hb = self.config.settings.heartbeat_timeout;
        while let Some(at) = self.monitor.next_deadline().filter(|at| *at <= now) {
            let Some(Reverse((_, instance, machine))) = self.monitor.heap.pop() else {
                break;
            };
            let Some(run) = self.runs.get_mut(&instance) else {
                continue;
            };
            let timeout = run.job.timeout;
            let Some(m) = run.machines.get_mut(&machine) else {
                continue;
            };
            if m.clock.armed != Some(at) {
                // A stale entry: the machine was re-armed earlier since.
                continue;
            }
            m.clock.armed = None;
            let (due, next) = evaluate(m, now, timeout, hb);
            if let Some(next) = next {
                m.clock.armed = Some(next);
                self.monitor.push(next, &instance, &machine);
            }
            match due {
                Due::Nothing => {}
                Due::ResendKill => self.send_kill(&instance, &machine),
                Due::Relaunch => self.relaunch(&instance, &machine),
                Due::Verdict {
                    retcode,
                    cause,
                    line,
                } => {
                    tracing::warn!(%instance, %machine, retcode, cause = cause.as_str(), "Master verdict.");
                    if cause == Cause::HeartbeatLost {
                        self.metrics.heartbeat_timeout();
                    }
                    let connected = m.conn.is_some();
                    self.append_output(&instance, &machine, line);
                    if cause == Cause::MasterTimeout && connected {
                        // The wrapper is still there but past its time: stop the job too.
                        self.send_kill(&instance, &machine);
                    }
                    self.conclude(&instance, &machine, retcode, cause, None);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn machine(launched: Instant) -> MachineRun {
        let mut m = MachineRun::new();
        m.clock.launched = Some(launched);
        m
    }

    const HB: Duration = Duration::from_secs(15);

    #[tokio::test(start_paused = true)]
    async fn heartbeat_rule_fires_at_exactly_the_timeout() {
        let t0 = Instant::now();
        let mut m = machine(t0);
        m.clock.started = Some(t0);
        m.clock.last_beat = Some(t0 + Duration::from_secs(5));
        let (due, next) = evaluate(&m, t0 + Duration::from_secs(19), None, HB);
        assert_eq!(due, Due::Nothing);
        assert_eq!(next, Some(t0 + Duration::from_secs(20)));
        let (due, _) = evaluate(&m, t0 + Duration::from_secs(20), None, HB);
        assert!(matches!(due, Due::Verdict { retcode: 253, .. }), "{due:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn startup_window_applies_only_before_start() {
        let t0 = Instant::now();
        let m = machine(t0);
        let (due, next) = evaluate(&m, t0 + Duration::from_secs(29), None, HB);
        assert_eq!((due, next), (Due::Nothing, Some(t0 + STARTUP_WINDOW)));
        let (due, _) = evaluate(&m, t0 + STARTUP_WINDOW, None, HB);
        assert!(matches!(due, Due::Verdict { retcode: 254, .. }));
    }

    #[tokio::test(start_paused = true)]
    async fn kill_grace_beats_every_other_rule() {
        let t0 = Instant::now();
        let mut m = machine(t0);
        m.clock.started = Some(t0);
        m.clock.last_beat = Some(t0);
        m.clock.kill_requested = Some(t0);
        m.clock.kill_sent = Some(t0 + KILL_GRACE - Duration::from_secs(1));
        let (due, _) = evaluate(&m, t0 + KILL_GRACE, Some(Duration::from_secs(1)), HB);
        assert!(matches!(due, Due::Verdict { retcode: 143, .. }), "{due:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn unsent_kills_are_repeated() {
        let t0 = Instant::now();
        let mut m = machine(t0);
        m.clock.kill_requested = Some(t0);
        m.clock.kill_sent = Some(t0);
        let (due, _) = evaluate(&m, t0 + KILL_RESEND, None, HB);
        assert_eq!(due, Due::ResendKill);
    }

    #[tokio::test(start_paused = true)]
    async fn timeout_zero_means_none_but_heartbeats_still_apply() {
        let t0 = Instant::now();
        let mut m = machine(t0);
        m.clock.started = Some(t0);
        m.clock.last_beat = Some(t0 + Duration::from_secs(10_000));
        let (due, next) = evaluate(&m, t0 + Duration::from_secs(10_010), None, HB);
        assert_eq!(due, Due::Nothing);
        assert_eq!(next, Some(t0 + Duration::from_secs(10_015)));
    }

    #[tokio::test(start_paused = true)]
    async fn spans_beyond_the_clock_are_deadlines_that_never_come() {
        let t0 = Instant::now();
        let mut m = machine(t0);
        m.clock.started = Some(t0);
        m.clock.last_beat = Some(t0);
        let huge = Duration::from_secs(u64::MAX);
        let (due, next) = evaluate(&m, t0 + Duration::from_secs(60), Some(huge), huge);
        assert_eq!((due, next), (Due::Nothing, None));
        m.clock.kill_requested = Some(t0);
        let (due, _) = evaluate(&m, t0 + Duration::from_secs(1), Some(huge), huge);
        assert_eq!(due, Due::Nothing);
    }

    #[tokio::test(start_paused = true)]
    async fn a_machine_waiting_for_its_batch_has_no_deadline() {
        let m = MachineRun::new();
        assert_eq!(evaluate(&m, Instant::now(), None, HB), (Due::Nothing, None));
    }
}
