//! The engine's side of durability: what it writes to the store at each change, how it acks
//! only what is durable, and how it rebuilds its state after a restart (nothing is lost).
//!
//! Restart rules: runs that had not ended are reloaded with their output and sequence state;
//! every in-flight machine gets fresh monotonic deadlines from the moment the engine starts (a
//! master that was down longer than the heartbeat timeout must not mark healthy jobs 253);
//! kills requested before the crash stay requested; each job's last fired slot is never fired
//! again.

use std::sync::Arc;

use saltpeter_proto::{Ack, AckType, MasterMessage, Timestamp};

use super::{Engine, Event, Outbound};
use crate::identity::Identity;
use crate::runs::{MachineRun, Run};
use saltpeter_store::{JobRecord, MachineRecord, Notice, Restored, RunRecord, StoreOp};

impl Engine {
    /// Writes a run's own fields.
    pub(super) fn save_run(&mut self, instance: &str) {
        let Some(run) = self
            .runs
            .get(instance)
            .or_else(|| self.finished.get(instance))
        else {
            return;
        };
        let record = RunRecord {
            instance: run.instance.clone(),
            job: run.job.name.clone(),
            group: run.job.group.clone(),
            started: run.started,
            ended: run.ended,
            success: run.success,
            killed: run.killed,
            token: run.token.clone(),
            identity: run.identity.as_str().to_owned(),
            resolving: run.resolving,
            maintenance: run.maintenance.clone(),
            pending_batches: run.pending_batches.iter().cloned().collect(),
        };
        self.store.push(StoreOp::Run(record));
    }

    /// Writes one machine's fields (not its output, which is appended as it arrives).
    pub(super) fn save_machine(&mut self, instance: &str, machine: &str) {
        let Some(m) = self
            .runs
            .get(instance)
            .or_else(|| self.finished.get(instance))
            .and_then(|r| r.machines.get(machine))
        else {
            return;
        };
        let record = MachineRecord {
            instance: instance.to_owned(),
            machine: machine.to_owned(),
            status: m.status,
            retcode: m.retcode,
            cause: m.cause,
            late_retcode: m.late_retcode,
            starttime: m.starttime,
            endtime: m.endtime,
            last_heartbeat: m.last_heartbeat,
            wrapper_version: m.wrapper_version.clone(),
            pid: m.pid,
            wrapper_pid: m.wrapper_pid,
            launched: m.clock.launched.is_some(),
            started: m.clock.started.is_some(),
            kill_requested: m.clock.kill_requested.is_some(),
            launch_problem: m.clock.launch_problem.clone(),
            modern: m.modern,
            authenticated: m.authenticated,
        };
        self.store.push(StoreOp::Machine(record));
    }

    /// Writes every machine of a run.
    pub(super) fn save_machines(&mut self, instance: &str) {
        let names: Vec<String> = self
            .runs
            .get(instance)
            .map(|r| r.machines.keys().cloned().collect())
            .unwrap_or_default();
        for name in names {
            self.save_machine(instance, &name);
        }
    }

    /// Writes a job's state.
    pub(super) fn save_job(&mut self, job: &str) {
        let Some(state) = self.jobs.get(job) else {
            return;
        };
        let record = JobRecord {
            name: job.to_owned(),
            last_run: state.last_run,
            last_success: state.last_success,
            last_success_at: state.last_success_at,
            last_failed: state.last_failed_count,
            last_total: state.last_total_count,
            last_fired: state.last_fired,
        };
        self.store.push(StoreOp::Job(record));
    }

    /// Sends the acks whose data is now durable.
    pub(super) fn on_persisted(&mut self, notices: Vec<Notice>) {
        let now = self.clock.instant();
        for notice in notices {
            let (instance, machine, seq, conn, ack_type, received) = match notice {
                Notice::Output {
                    instance,
                    machine,
                    seq,
                    conn,
                    received,
                } => {
                    if let Some(received) = received {
                        self.metrics
                            .output_ack
                            .observe(now.saturating_duration_since(received));
                    }
                    (instance, machine, seq, conn, AckType::Output, received)
                }
                Notice::Complete {
                    instance,
                    machine,
                    seq,
                    conn,
                } => (instance, machine, seq, conn, AckType::Complete, None),
            };
            let conn_alive = self.conns.contains_key(&conn);
            let Some(m) = self
                .run_mut(&instance)
                .and_then(|r| r.machines.get_mut(&machine))
            else {
                continue;
            };
            if ack_type == AckType::Output
                && let Some(seq) = seq
            {
                m.durable_next_seq = m.durable_next_seq.max(seq + 1);
            }
            // The wrapper may have moved to a new socket meanwhile; the ack follows it.
            let target = if conn_alive { Some(conn) } else { m.conn };
            if let Some(target) = target {
                let ack = MasterMessage::Ack(Ack {
                    ack_type,
                    seq,
                    last_seq: None,
                    timestamp: Some(Timestamp::now()),
                });
                let out = match ack_type {
                    AckType::Output => Outbound::OutputAck { ack, received },
                    _ => Outbound::Message(ack),
                };
                self.send(target, out);
            }
        }
    }

    /// Handles notices an inline store produced while handling the last event.
    pub(super) fn drain_inline_notices(&mut self) {
        let notices = self.store.take_inline_notices();
        if !notices.is_empty() {
            self.on_persisted(notices);
        }
    }

    /// Rebuilds state from the store after a restart.
    pub(super) fn restore(&mut self, restored: Restored) {
        let now = self.clock.instant();
        for job in restored.jobs {
            let state = self.jobs.entry(job.name.clone()).or_default();
            state.last_run = job.last_run;
            state.last_success = job.last_success;
            state.last_success_at = job.last_success_at;
            state.last_failed_count = job.last_failed;
            state.last_total_count = job.last_total;
            state.last_fired = job.last_fired;
        }
        let mut resolve = Vec::new();
        let mut count = 0usize;
        for (record, machines) in restored.runs {
            let Some(job) = self.config.jobs.get(&record.job).cloned() else {
                // Its job file is gone, so the run cannot be judged by the job's rules any
                // more; close it rather than keep it forever.
                tracing::warn!(instance = %record.instance, job = %record.job, "Run of a job that no longer exists is closed.");
                let mut closed = record.clone();
                closed.ended = Some(self.clock.wall());
                closed.success = Some(false);
                self.store.push(StoreOp::Run(closed));
                continue;
            };
            let mut run = Run {
                instance: record.instance.clone(),
                job,
                started: record.started,
                ended: None,
                success: None,
                token: record.token.clone(),
                identity: Identity::parse(&record.identity),
                machines: Default::default(),
                maintenance: record.maintenance.clone(),
                pending_batches: record.pending_batches.into_iter().collect(),
                resolving: record.resolving,
                killed: record.killed,
            };
            for restored_machine in machines {
                let mut m = MachineRun::new();
                apply_record(&mut m, &restored_machine.record);
                m.output = restored_machine.output;
                m.attempts = restored_machine.attempts;
                m.next_seq = restored_machine.next_seq;
                m.durable_next_seq = restored_machine.next_seq;
                let r = &restored_machine.record;
                if !m.ended() {
                    // Fresh deadlines from now: time the master was down is nobody's fault.
                    m.clock.launched = r.launched.then_some(now);
                    m.clock.started = r.started.then_some(now);
                    m.clock.last_beat = r.started.then_some(now);
                    m.clock.kill_requested = r.kill_requested.then_some(now);
                    // Retries: a machine that was waiting for its next attempt gets it now.
                    if !r.launched && !m.attempts.is_empty() {
                        m.retry_at = Some(now);
                    }
                }
                run.machines.insert(r.machine.clone(), m);
            }
            let state = self.jobs.entry(record.job.clone()).or_default();
            state.running.push(record.instance.clone());
            if run.resolving {
                resolve.push((record.instance.clone(), run.job.clone()));
            }
            let names: Vec<String> = run.machines.keys().cloned().collect();
            self.runs.insert(record.instance.clone(), run);
            for name in names {
                self.rearm(&record.instance, &name);
            }
            count += 1;
        }
        for (instance, job) in resolve {
            self.spawn_resolve(instance, job);
        }
        if count > 0 {
            tracing::info!(
                runs = count,
                "Restored runs that were in flight; waiting for their wrappers."
            );
        }
        // A run whose machines all ended while we were down (or that had none left) ends now.
        let instances: Vec<String> = self.runs.keys().cloned().collect();
        for instance in instances {
            self.advance(&instance);
        }
    }

    /// Asks the launcher which machines a run targets, in the background.
    pub(super) fn spawn_resolve(&self, instance: String, job: Arc<saltpeter_config::JobSpec>) {
        let resolve = self.launcher.resolve(job);
        self.report(resolve, move |resolution| Event::Resolved {
            instance,
            resolution,
        });
    }

    /// Runs launcher work in the background and feeds its result back as an event, so the
    /// engine never waits on a launcher.
    pub(super) fn report<T: Send + 'static>(
        &self,
        work: crate::launch::BoxFuture<T>,
        event: impl FnOnce(T) -> Event + Send + 'static,
    ) {
        let tx = self.self_tx.clone();
        self.spawner.spawn(async move {
            let result = work.await;
            // The engine drops its receiver only when it stops; then nobody needs the result.
            let _ = tx.send(event(result)).await;
        });
    }
}
/// Copies a record's fields onto an in-memory machine.
fn apply_record(m: &mut MachineRun, r: &MachineRecord) {
    m.status = r.status;
    m.retcode = r.retcode;
    m.cause = r.cause;
    m.late_retcode = r.late_retcode;
    m.starttime = r.starttime;
    m.endtime = r.endtime;
    m.last_heartbeat = r.last_heartbeat;
    m.wrapper_version = r.wrapper_version.clone();
    m.pid = r.pid;
    m.wrapper_pid = r.wrapper_pid;
    m.modern = r.modern;
    m.authenticated = r.authenticated;
    m.clock.launch_problem = r.launch_problem.clone();
}
