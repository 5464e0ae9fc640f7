//! Retries: a machine whose result matches its job's `retry_on` is launched again after
//! `retry_delay`, in the same run, as attempt 2, 3, ... until `retries` are used up. The run
//! ends when every machine has the result of its final attempt, and that result is the
//! machine's result.
//!
//! Rules:
//! - An operator's kill stops retries: nothing is retried once the run or the machine was
//!   asked to die, whatever `retry_on` lists, and a machine waiting for its next attempt is
//!   killed before it starts.
//! - A replaced attempt's result is kept in the store (`attempts`) and in memory
//!   ([`MachineRun::attempts`]); the machine's own fields start over for the next attempt.
//! - Each attempt has its own credential (see [`attempt_secret`]) and the connection of the
//!   previous attempt no longer speaks for the machine, so a wrapper of an earlier attempt
//!   that reports late cannot overwrite the later attempt's result.
//! - While a machine waits, the monitor holds its `retry_at` as the machine's deadline; when
//!   it comes the machine is launched alone (its batch has already gone).

use std::collections::BTreeMap;

use saltpeter_proto::Cause;

use super::Engine;
use super::missed::EngineEvent;
use crate::identity::{Identity, machine_token};
use crate::launch::StartRequest;
use crate::runs::model::MachineClock;
use crate::runs::{MachineRun, MachineStatus};
use saltpeter_joblog::LogEntry;
use saltpeter_store::{AttemptRecord, StoreOp};

/// The secret attempt `attempt` of a machine proves itself with: the run's own for the first
/// attempt (so runs and wrappers from before retries existed are unchanged), and one derived
/// from the run's secret, the attempt and the machine for later ones. With machine tokens the
/// machine's token is derived from this secret in turn.
pub(crate) fn attempt_secret(
    run_secret: &str,
    instance: &str,
    machine: &str,
    attempt: u32,
) -> String {
    if attempt <= 1 {
        return run_secret.to_owned();
    }
    machine_token(run_secret, &format!("{instance}#attempt{attempt}"), machine)
}

/// Whether a result ends retries no matter what `retry_on` says: a kill by an operator.
fn killed_by_operator(m: &MachineRun, cause: Cause) -> bool {
    m.clock.kill_requested.is_some()
        || matches!(cause, Cause::KilledBeforeStart | Cause::KillUnconfirmed)
}

impl Engine {
    /// Called for a machine's result before it is recorded as final. When the job retries
    /// this result, keeps it as a replaced attempt, resets the machine for its next attempt,
    /// arms the retry and returns true; the caller then records nothing.
    pub(super) fn retry_instead(
        &mut self,
        instance: &str,
        machine: &str,
        retcode: i64,
        cause: Cause,
    ) -> bool {
        let now = self.clock.instant();
        let wall = self.clock.wall();
        let Some(run) = self.runs.get_mut(instance) else {
            return false;
        };
        let job = run.job.clone();
        let policy = &job.recovery;
        if policy.retries == 0 || run.killed {
            return false;
        }
        let Some(m) = run.machines.get_mut(machine) else {
            return false;
        };
        if m.ended() || m.clock.launched.is_none() || killed_by_operator(m, cause) {
            return false;
        }
        let attempt = m.attempt();
        if attempt > policy.retries
            || !policy
                .retry_on
                .matches(retcode, matches!(cause, Cause::Exit))
        {
            return false;
        }
        let record = AttemptRecord {
            instance: instance.to_owned(),
            machine: machine.to_owned(),
            attempt,
            retcode: Some(retcode),
            cause: Some(cause),
            starttime: m.starttime,
            endtime: Some(wall),
        };
        m.attempts.push(record.clone());
        // The next attempt starts with a clean slate: no result, no sequence state (its
        // wrapper numbers output from 0) and no connection. `authenticated` stays: a machine a
        // credentialed wrapper spoke for is never left to a legacy client, whatever attempt.
        m.status = MachineStatus::Pending;
        m.retcode = None;
        m.cause = None;
        m.late_retcode = None;
        m.endtime = None;
        m.last_heartbeat = None;
        m.pid = None;
        m.wrapper_pid = None;
        m.next_seq = 0;
        m.durable_next_seq = 0;
        m.modern = false;
        let old_conn = m.conn.take();
        m.clock = MachineClock::default();
        m.retry_at = Some(now.checked_add(policy.retry_delay).unwrap_or(now));
        let next = attempt.saturating_add(1);
        let max = policy.retries.saturating_add(1);
        if let Some(c) = old_conn.and_then(|c| self.conns.get_mut(&c)) {
            // The previous attempt's wrapper no longer speaks for the machine: a late word from
            // it is refused instead of landing on the next attempt.
            c.bound = None;
        }
        // Debug only: the wiring's event consumer logs the event itself at info level.
        tracing::debug!(job = %job.name, %instance, %machine, retcode, attempt, next, "Machine failed; retrying.");
        self.metrics.machine_result(&job.name, retcode);
        self.joblog.record(
            &self.logdir,
            LogEntry::MachineResult {
                job: job.name.clone(),
                instance: instance.into(),
                machine: machine.into(),
                code: retcode,
                at: wall,
            },
        );
        self.log_note(
            &job.name,
            format!(
                "{machine}: attempt {attempt}/{max} of {instance} ended with {retcode}; attempt \
                 {next}/{max} in {}s",
                policy.retry_delay.as_secs()
            ),
        );
        self.store.push(StoreOp::Attempt(record));
        self.save_machine(instance, machine);
        self.rearm(instance, machine);
        self.emit(EngineEvent::Retry {
            job: job.name.clone(),
            instance: instance.to_owned(),
            machine: machine.to_owned(),
            retcode,
            next,
            max,
        });
        true
    }

    /// The monitor found a machine's retry due: launches its next attempt.
    pub(super) fn relaunch(&mut self, instance: &str, machine: &str) {
        let now = self.clock.instant();
        let wall = self.clock.wall();
        let Some(run) = self.runs.get_mut(instance) else {
            return;
        };
        if run.killed {
            return;
        }
        let job = run.job.clone();
        let identity = run.identity;
        let secret = run.token.clone();
        let Some(m) = run.machines.get_mut(machine) else {
            return;
        };
        if m.ended() || m.retry_at.take().is_none() {
            return;
        }
        m.clock.launched = Some(now);
        m.starttime = Some(wall);
        if !job.use_wrapper {
            m.clock.direct = true;
            m.status = MachineStatus::Running;
        }
        let attempt = m.attempt();
        let max = job.recovery.retries.saturating_add(1);
        let secret = attempt_secret(&secret, instance, machine, attempt);
        let (shared_token, tokens) = match identity {
            Identity::MachineToken => {
                let mut tokens = BTreeMap::new();
                tokens.insert(
                    machine.to_owned(),
                    machine_token(&secret, instance, machine),
                );
                (None, tokens)
            }
            Identity::RunToken | Identity::SaltKey => (Some(secret), BTreeMap::new()),
        };
        let env = self.wrapper_env(&job, instance, shared_token.as_deref(), identity);
        self.append_output(instance, machine, format!("[Attempt {attempt}/{max}]\n"));
        self.log_note(
            &job.name,
            format!("{machine}: starting attempt {attempt}/{max} of {instance}"),
        );
        self.joblog.record(
            &self.logdir,
            LogEntry::MachineStart {
                job: job.name.clone(),
                instance: instance.into(),
                machine: machine.into(),
                at: wall,
            },
        );
        self.rearm(instance, machine);
        self.save_machine(instance, machine);
        let request = StartRequest {
            job: job.clone(),
            instance: instance.into(),
            machines: vec![machine.to_owned()],
            env,
            tokens,
            wrapper_path: job
                .wrapper_path
                .clone()
                .or_else(|| self.config.settings.default_wrapper_path.clone()),
        };
        let instance = instance.to_owned();
        if !job.use_wrapper {
            let run = self.launcher.run_direct(request);
            self.report(run, move |outcome| super::Event::Finished {
                instance,
                outcome,
            });
            return;
        }
        let start = self.launcher.start(request);
        self.report(start, move |outcome| super::Event::Started {
            instance,
            outcome,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_attempt_keeps_the_run_secret_and_later_ones_differ() {
        assert_eq!(attempt_secret("s", "job_1", "m", 1), "s");
        let second = attempt_secret("s", "job_1", "m", 2);
        let third = attempt_secret("s", "job_1", "m", 3);
        assert_ne!(second, "s");
        assert_ne!(second, third);
        assert_ne!(second, attempt_secret("s", "job_1", "other", 2));
    }
}
