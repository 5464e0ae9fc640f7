//! The machines-endpoint protocol, engine side: what each wrapper message does to run state
//! and what is answered, and which connection may speak for which machine.
//!
//! A connection speaks for one (instance, machine) once its `connect` presents the credential
//! the run's [`Identity`] asks for: the machine's own token, or the run's token and a signature
//! with the minion's Salt key over a challenge this connection got from `hello`. Once the
//! machine's result is recorded the credential is spent: no connection can bind to it any
//! more, and the one that spoke for it may only add a late `complete`. A legacy wrapper
//! (no credential, when allowed) never takes a machine a credentialed wrapper spoke for.
//!
//! Sequence state lives on the machine, not the socket, so a reconnect never resets it: a
//! duplicate seq is acked again, a gap is nacked, and the `connect` ack tells a reconnecting
//! wrapper exactly where to resume. Acks go out only after the message has been applied.

use saltpeter_proto::{
    Ack, AckType, Cause, Challenge, Complete, Connect, EXIT_ERROR, EXIT_UNKNOWN, ErrorCode,
    ErrorReply, Kill, MasterMessage, Nack, NackType, Output, SyncResponse, Timestamp,
    WrapperMessage, signing_payload,
};

use tokio::time::Instant;

use super::{ConnId, Engine, Event, Outbound};
use crate::identity::{
    Identity, IdentityError, machine_token, new_nonce, same_secret, verify_minion_signature,
};
use crate::runs::MachineStatus;
use saltpeter_joblog::LogEntry;
use saltpeter_store::{Notice, StoreOp};

/// Why a message was refused.
enum Refusal {
    /// The instance is unknown (finished long ago, or never existed).
    JobNotFound,
    /// The connection is not entitled to speak for this machine.
    Unauthorized(String),
    /// The message names something that does not fit the run.
    BadRequest(String),
    /// Another master holds the run's job now (or this one is still loading it).
    NotHolder(String),
}

impl Engine {
    pub(super) fn on_wrapper(&mut self, conn: ConnId, msg: WrapperMessage, received: Instant) {
        let env = msg.envelope();
        let (instance, machine) = (env.job_instance.clone(), env.machine.clone());
        let job = env.job_name.clone();
        let result = match msg {
            WrapperMessage::Hello(_) => self.on_hello(conn, &job, &instance),
            WrapperMessage::Connect(connect) => self.on_connect(conn, connect),
            _ if self.conns.get(&conn).is_some_and(|c| c.verifying) => {
                // Our wrapper sends nothing before its connect is acknowledged but a heartbeat
                // on its own timer; that one is not worth closing the connection for.
                tracing::debug!(conn, %instance, %machine, kind = msg.kind(), "Ignored a message that came while its connect was being checked.");
                Ok(())
            }
            other => match self.authorize(conn, &instance, &machine) {
                Err(refusal) => Err(refusal),
                Ok(()) => self.on_bound_message(conn, &instance, &machine, other, received),
            },
        };
        if let Err(refusal) = result {
            self.refuse(conn, &instance, &machine, refusal);
        }
    }

    /// Answers a refused message; a refusal of the connection's right to speak also closes it.
    fn refuse(&mut self, conn: ConnId, instance: &str, machine: &str, refusal: Refusal) {
        let (code, message, close) = match refusal {
            Refusal::JobNotFound => {
                let reply = ErrorReply::job_not_found();
                (reply.code, reply.message, true)
            }
            Refusal::Unauthorized(why) => (ErrorCode::Unauthorized, why, true),
            Refusal::BadRequest(why) => (ErrorCode::BadRequest, why, false),
            Refusal::NotHolder(job) => {
                let reply = ErrorReply::not_holder(&job);
                (reply.code, reply.message, true)
            }
        };
        let peer = self.conns.get(&conn).map(|c| c.peer);
        tracing::warn!(conn, ?peer, %instance, %machine, ?code, %message, "Rejected a wrapper message.");
        let reply = MasterMessage::Error(ErrorReply {
            code,
            message,
            timestamp: None,
        });
        self.send(
            conn,
            if close {
                Outbound::Close(reply)
            } else {
                Outbound::Message(reply)
            },
        );
    }

    /// The refusal for a run this master does not know: with several masters, a run of a job
    /// it does not act for may well be alive on another one.
    fn unknown_run(&self, job: &str) -> Refusal {
        if self.acts_for(job) {
            Refusal::JobNotFound
        } else {
            Refusal::NotHolder(job.to_owned())
        }
    }

    /// `hello`: a fresh challenge for this connection, which its `connect` must sign.
    fn on_hello(&mut self, conn: ConnId, job: &str, instance: &str) -> Result<(), Refusal> {
        if self.run_mut(instance).is_none() {
            return Err(self.unknown_run(job));
        }
        let nonce = new_nonce();
        let Some(c) = self.conns.get_mut(&conn) else {
            return Ok(());
        };
        c.nonce = Some(nonce.clone());
        self.send(
            conn,
            Outbound::Message(MasterMessage::Challenge(Challenge {
                nonce,
                timestamp: Some(Timestamp::now()),
            })),
        );
        Ok(())
    }

    /// `connect`: checks the credential the run's identity mode asks for, then binds the
    /// connection to the machine. A signed connect is checked off the engine's thread and
    /// bound in [`Self::on_verified`].
    fn on_connect(&mut self, conn: ConnId, connect: Connect) -> Result<(), Refusal> {
        let env = &connect.envelope;
        let (instance, machine) = (env.job_instance.as_str(), env.machine.as_str());
        let allow_legacy = self.config.settings.allow_legacy_wrappers;
        if self.run_mut(instance).is_none() {
            return Err(self.unknown_run(&env.job_name));
        }
        let run = self.run_mut(instance).ok_or(Refusal::JobNotFound)?;
        let identity = run.identity;
        let live = live_machine(run, instance, machine)?;
        let (authenticated, attempt) = (live.authenticated, live.attempt());
        // Retries: each attempt proves itself with its own secret.
        let secret = super::retry::attempt_secret(&run.token, instance, machine, attempt);
        let Some(token) = &connect.token else {
            if !allow_legacy {
                return Err(Refusal::Unauthorized(
                    "no run token; legacy wrappers are not allowed (allow_legacy_wrappers)".into(),
                ));
            }
            if authenticated {
                return Err(Refusal::Unauthorized(format!(
                    "{machine} is spoken for by a wrapper that proved its credential; a connection without one cannot take it over"
                )));
            }
            self.bind(conn, &connect, false);
            return Ok(());
        };
        match identity {
            Identity::RunToken if same_secret(token, &secret) => {}
            Identity::MachineToken
                if same_secret(token, &machine_token(&secret, instance, machine)) => {}
            Identity::RunToken | Identity::MachineToken => {
                return Err(Refusal::Unauthorized(format!(
                    "wrong token for {machine} in {instance}"
                )));
            }
            Identity::SaltKey => return self.check_signature(conn, connect, &secret),
        }
        self.bind(conn, &connect, true);
        Ok(())
    }

    /// The Salt-key check of a `connect`: the run's token, then a signature over this
    /// connection's challenge, verified in the background with the minion's accepted key.
    fn check_signature(
        &mut self,
        conn: ConnId,
        connect: Connect,
        secret: &str,
    ) -> Result<(), Refusal> {
        let env = &connect.envelope;
        let (instance, machine) = (env.job_instance.clone(), env.machine.clone());
        if !connect
            .token
            .as_deref()
            .is_some_and(|t| same_secret(t, secret))
        {
            return Err(Refusal::Unauthorized(format!(
                "wrong run token for {instance}"
            )));
        }
        let Some(signature) = connect.signature.clone() else {
            return Err(Refusal::Unauthorized(format!(
                "{instance} needs connect signed with the Salt key of minion {machine:?} (send hello first)"
            )));
        };
        // The challenge is spent by this attempt, whatever its outcome.
        let Some(nonce) = self.conns.get_mut(&conn).and_then(|c| c.nonce.take()) else {
            return Err(Refusal::Unauthorized(
                "no challenge on this connection; send hello first".into(),
            ));
        };
        let Some(pki_dir) = self.launcher.salt_pki_dir() else {
            return Err(Refusal::Unauthorized(
                "this master has no Salt pki directory to check minion keys in".into(),
            ));
        };
        if let Some(c) = self.conns.get_mut(&conn) {
            c.verifying = true;
        }
        let tx = self.self_tx.clone();
        let verifiers = self.verifiers.clone();
        self.spawner.spawn(async move {
            // The semaphore is never closed; without a permit the check runs anyway.
            let _permit = verifiers.acquire_owned().await;
            let check = tokio::task::spawn_blocking(move || {
                let payload = signing_payload(&nonce, &instance, &machine);
                verify_minion_signature(&pki_dir, &machine, &payload, &signature)
            });
            let result = check.await.unwrap_or_else(|e| {
                Err(IdentityError::Unavailable(format!(
                    "the check did not finish: {e}"
                )))
            });
            // The engine drops its receiver only when it stops.
            let _ = tx
                .send(Event::Verified {
                    conn,
                    connect,
                    result,
                })
                .await;
        });
        Ok(())
    }

    /// The verdict on a signed `connect`.
    pub(super) fn on_verified(
        &mut self,
        conn: ConnId,
        connect: Connect,
        result: Result<(), IdentityError>,
    ) {
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        c.verifying = false;
        let env = &connect.envelope;
        let (instance, machine) = (env.job_instance.clone(), env.machine.clone());
        let checked = match result {
            Err(error) => {
                tracing::warn!(conn, %instance, %machine, %error, "Refused a wrapper: its minion key check failed.");
                Err(Refusal::Unauthorized(format!(
                    "minion key check failed: {error}"
                )))
            }
            // The run or the machine may have ended while the key was being checked.
            Ok(()) => match self.run_mut(&instance) {
                None => Err(Refusal::JobNotFound),
                Some(run) => live_machine(run, &instance, &machine).map(|_| ()),
            },
        };
        match checked {
            Ok(()) => self.bind(conn, &connect, true),
            Err(refusal) => self.refuse(conn, &instance, &machine, refusal),
        }
    }

    /// Makes `conn` the connection that speaks for the machine `connect` names, and answers.
    fn bind(&mut self, conn: ConnId, connect: &Connect, authenticated: bool) {
        let env = &connect.envelope;
        let Some(run) = self.run_mut(&env.job_instance) else {
            return;
        };
        let killed = run.killed;
        let Some(m) = run.machines.get_mut(&env.machine) else {
            return;
        };
        let previous = m.conn.replace(conn);
        m.modern = connect.protocol.is_some_and(|p| p >= 2);
        m.authenticated |= authenticated;
        if connect.wrapper_pid.is_some() {
            m.wrapper_pid = connect.wrapper_pid;
        }
        // Only what is durable counts as held: a wrapper drops what this says we hold.
        let last_seq = m.durable_next_seq as i64 - 1;
        let kill_pending = (killed || m.clock.kill_requested.is_some()) && !m.ended();
        let key = (env.job_instance.clone(), env.machine.clone());
        if let Some(old) = previous.filter(|old| *old != conn)
            && let Some(c) = self.conns.get_mut(&old)
        {
            // The machine moved to a new socket; the old one no longer speaks for it.
            c.bound = None;
        }
        self.bind_conn(conn, key.clone());
        tracing::debug!(conn, instance = %key.0, machine = %key.1, last_seq, authenticated, "Wrapper connected.");
        self.save_machine(&key.0, &key.1);
        self.send(conn, ack(AckType::Connect, None, Some(last_seq)));
        if kill_pending {
            self.send_kill(&key.0, &key.1);
        }
    }

    /// Checks that `conn` may speak for (instance, machine), binding legacy wrappers that
    /// reconnect without `connect` (the original wrapper never re-sends it) when allowed and
    /// when no wrapper with credentials has spoken for the machine.
    fn authorize(&mut self, conn: ConnId, instance: &str, machine: &str) -> Result<(), Refusal> {
        let Some(c) = self.conns.get(&conn) else {
            return Err(Refusal::JobNotFound);
        };
        if let Some((i, m)) = &c.bound {
            if i == instance && m == machine {
                return Ok(());
            }
            return Err(Refusal::Unauthorized(format!(
                "this connection speaks for {i}/{m}, not {instance}/{machine}"
            )));
        }
        let allow_legacy = self.config.settings.allow_legacy_wrappers;
        let Some(run) = self.run_mut(instance) else {
            return Err(Refusal::JobNotFound);
        };
        if !allow_legacy {
            return Err(Refusal::Unauthorized(
                "send connect with the run token first".into(),
            ));
        }
        let m = live_machine(run, instance, machine)?;
        if m.authenticated {
            return Err(Refusal::Unauthorized(format!(
                "{machine} is spoken for by a wrapper that proved its credential; send connect with it"
            )));
        }
        m.conn = Some(conn);
        self.bind_conn(conn, (instance.to_owned(), machine.to_owned()));
        Ok(())
    }

    fn on_bound_message(
        &mut self,
        conn: ConnId,
        instance: &str,
        machine: &str,
        msg: WrapperMessage,
        received: Instant,
    ) -> Result<(), Refusal> {
        let now = self.clock.instant();
        let wall = self.clock.wall();
        let run = self.run_mut(instance).ok_or(Refusal::JobNotFound)?;
        let job = run.job.clone();
        let fired = run.started;
        let m = run.machines.get_mut(machine).ok_or_else(|| {
            Refusal::BadRequest(format!("machine {machine:?} is not a target of {instance}"))
        })?;
        if m.ended() {
            // The machine's result is stored, so its credential is spent. Only the connection
            // that spoke for it before may still say how the job ended (kept beside the
            // verdict); liveness messages from it are harmless and pass unanswered.
            match msg {
                WrapperMessage::Complete(complete) => {
                    self.on_complete(conn, instance, machine, complete);
                    return Ok(());
                }
                WrapperMessage::Heartbeat(_) | WrapperMessage::SyncRequest(_) => return Ok(()),
                other => {
                    return Err(Refusal::Unauthorized(format!(
                        "the result of {machine} in {instance} is already recorded; {} is not accepted",
                        other.kind()
                    )));
                }
            }
        }
        match msg {
            WrapperMessage::Connect(_) | WrapperMessage::Hello(_) => unreachable_connect(),
            WrapperMessage::Start(start) => {
                if m.clock.started.is_none() && !m.ended() {
                    m.clock.started = Some(now);
                    m.clock.last_beat = Some(now);
                    m.status = MachineStatus::Running;
                    m.starttime = Some(wall);
                }
                m.pid = Some(start.pid);
                m.wrapper_version = Some(start.version);
                let since_fire = (m.clock.started == Some(now)).then(|| wall - fired);
                self.rearm(instance, machine);
                if let Some(d) = since_fire {
                    self.metrics.fire_to_start.observe_wall(d);
                }
                self.save_machine(instance, machine);
                self.send(conn, ack(AckType::Start, None, None));
            }
            WrapperMessage::Heartbeat(_) => {
                // Only heartbeats reset liveness, and only on our clock. The monitor's queued
                // deadline is now early; it re-checks and re-arms itself when it fires.
                m.clock.last_beat = Some(now);
                m.last_heartbeat = Some(wall);
                tracing::debug!(%instance, %machine, "Heartbeat.");
            }
            WrapperMessage::Output(output) => {
                self.on_output(conn, instance, machine, output, received)
            }
            WrapperMessage::SyncRequest(_) => {
                // Only what is durable counts as held: a wrapper drops what this says we hold.
                let last_seq = m.durable_next_seq as i64 - 1;
                self.send(
                    conn,
                    Outbound::Message(MasterMessage::SyncResponse(SyncResponse {
                        last_seq,
                        timestamp: Some(Timestamp::now()),
                    })),
                );
            }
            WrapperMessage::Complete(complete) => {
                self.on_complete(conn, instance, machine, complete)
            }
            WrapperMessage::Error(error) => {
                let text = format!("Wrapper error: {}", error.error);
                if !m.ended() {
                    m.output.push(&text);
                    self.joblog.record(
                        &self.logdir,
                        LogEntry::Output {
                            instance: instance.into(),
                            machine: machine.into(),
                            text,
                        },
                    );
                }
                self.conclude(instance, machine, EXIT_ERROR, Cause::WrapperError, None);
            }
            WrapperMessage::Killed(_) => {
                tracing::info!(job = %job.name, %instance, %machine, "Wrapper reports the job killed.");
            }
        }
        Ok(())
    }

    fn on_output(
        &mut self,
        conn: ConnId,
        instance: &str,
        machine: &str,
        output: Output,
        received: Instant,
    ) {
        // A finished run still takes late output into memory, so nothing a wrapper sends is
        // acked and then lost; its log block is already written, so the log does not get it.
        let live = self.runs.contains_key(instance);
        let Some(m) = self
            .run_mut(instance)
            .and_then(|r| r.machines.get_mut(machine))
        else {
            return;
        };
        match output.seq {
            Some(seq) if seq < m.next_seq => {
                // Already held: a resend after a lost ack. Ack again, apply nothing; if it is
                // not durable yet, the ack waits for the store like the original's did.
                if seq < m.durable_next_seq {
                    self.send(conn, ack(AckType::Output, Some(seq), None));
                } else {
                    self.store.push(StoreOp::Notify(Notice::Output {
                        instance: instance.into(),
                        machine: machine.into(),
                        seq: Some(seq),
                        conn,
                        received: None,
                    }));
                }
                return;
            }
            Some(seq) if seq > m.next_seq => {
                let expected = m.next_seq;
                self.send(conn, nack(expected, seq));
                return;
            }
            Some(seq) => m.next_seq = seq + 1,
            None => {}
        }
        m.output.push(&output.data);
        self.metrics.output(output.data.len());
        self.store.push(StoreOp::Output {
            instance: instance.into(),
            machine: machine.into(),
            seq: output.seq,
            data: output.data.clone(),
        });
        if live {
            self.joblog.record(
                &self.logdir,
                LogEntry::Output {
                    instance: instance.into(),
                    machine: machine.into(),
                    text: output.data,
                },
            );
        }
        // Acked once durable (see `on_persisted`).
        self.store.push(StoreOp::Notify(Notice::Output {
            instance: instance.into(),
            machine: machine.into(),
            seq: output.seq,
            conn,
            received: Some(received),
        }));
    }

    fn on_complete(&mut self, conn: ConnId, instance: &str, machine: &str, complete: Complete) {
        let Some(m) = self
            .run_mut(instance)
            .and_then(|r| r.machines.get_mut(machine))
        else {
            return;
        };
        if let Some(seq) = complete.seq
            && m.modern
            && seq > m.next_seq
        {
            // Our wrapper sends `complete` only once its output is acked, so a gap means we
            // lack output it still holds: ask for it rather than close the machine without it.
            let expected = m.next_seq;
            self.send(conn, nack(expected, seq));
            return;
        }
        let retcode = complete.retcode.unwrap_or(EXIT_UNKNOWN);
        let cause = complete.cause.unwrap_or(Cause::Exit);
        if m.ended() {
            // The master already decided (253, 124, ...). Keep the wrapper's word beside it.
            if m.late_retcode.is_none() {
                m.late_retcode = Some(retcode);
                tracing::info!(%instance, %machine, retcode, verdict = ?m.retcode, "Late completion kept beside the verdict.");
            }
        } else {
            self.conclude(
                instance,
                machine,
                retcode,
                cause,
                complete.seq.map(|s| s as i64),
            );
        }
        self.save_machine(instance, machine);
        // Acked once the result is durable (see `on_persisted`).
        self.store.push(StoreOp::Notify(Notice::Complete {
            instance: instance.into(),
            machine: machine.into(),
            seq: complete.seq,
            conn,
        }));
    }

    /// Sends `kill` to the machine's current connection, if it has one.
    pub(super) fn send_kill(&mut self, instance: &str, machine: &str) {
        let now = self.clock.instant();
        let Some(run) = self.runs.get_mut(instance) else {
            return;
        };
        let job = run.job.name.clone();
        let Some(m) = run.machines.get_mut(machine) else {
            return;
        };
        m.clock.kill_sent = Some(now);
        if let Some(conn) = m.conn {
            let kill = MasterMessage::Kill(Kill {
                job_name: job,
                job_instance: instance.to_owned(),
                machine: machine.to_owned(),
                timestamp: Some(Timestamp::now()),
            });
            self.send(conn, Outbound::Message(kill));
        }
    }
}

/// "Send from `expected` on": the answer to a gap in the sequence.
fn nack(expected: u64, received: u64) -> Outbound {
    Outbound::Message(MasterMessage::Nack(Nack {
        nack_type: NackType::OutOfOrder,
        expected_seq: expected,
        received_seq: received,
        timestamp: Some(Timestamp::now()),
    }))
}

fn ack(ack_type: AckType, seq: Option<u64>, last_seq: Option<i64>) -> Outbound {
    Outbound::Message(MasterMessage::Ack(Ack {
        ack_type,
        seq,
        last_seq,
        timestamp: Some(Timestamp::now()),
    }))
}

/// `connect` and `hello` are dispatched before binding; reaching here would be a logic slip,
/// not input.
fn unreachable_connect() {
    tracing::error!("A connect or hello message reached the bound-message path; ignored.");
}

/// The machine a connection wants to speak for, if it is a target of the run and its result
/// is not recorded yet (a stored result spends every credential for the machine).
fn live_machine<'a>(
    run: &'a mut crate::runs::Run,
    instance: &str,
    machine: &str,
) -> Result<&'a mut crate::runs::MachineRun, Refusal> {
    let Some(m) = run.machines.get_mut(machine) else {
        return Err(Refusal::BadRequest(format!(
            "machine {machine:?} is not a target of {instance}"
        )));
    };
    if m.ended() {
        return Err(Refusal::Unauthorized(format!(
            "the result of {machine} in {instance} is already recorded; its credential is spent"
        )));
    }
    Ok(m)
}
