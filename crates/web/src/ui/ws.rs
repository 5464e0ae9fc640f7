//! `GET /ws`: one task per browser connection, speaking the saltpeter-ui protocol.
//!
//! The task keeps the connection's subscriptions and, per subscribed job and machine, an
//! [`OutputCursor`] (run instance and UTF-16 position). Every [`TICK`] (and right after a
//! `subscribe`, `run` or kill) it asks the engine for one [`UiSnapshot`] and sends, in order:
//! `config` when the config serial changed, `status`, then per subscribed job its new
//! `output_chunk`s followed by `details` (docs/COMPATIBILITY.md, "The UI protocol"). Waiting on the socket
//! happens here, never in the engine.
//!
//! A connection with no frame from the browser for `ui_idle_timeout` is closed. The task pings
//! a quiet browser (every third of that time) and the pong counts as a frame, so a live page
//! that only watches stays connected while a vanished one does not hold its socket.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{Message, WebSocket};
use serde_json::Value;
use tokio::sync::watch;

use super::auth::Caller;
use super::messages::{
    self, Chunk, Command, chunk_message, config_message, details_message, error_message,
    status_message,
};
use super::query;
use saltpeter_config::{Config, Role};
use saltpeter_engine::{
    ApiRequest, EngineHandle, JobCursors, OutputCursor, StatusSnapshot, UiRequest, UiSnapshot,
};
use saltpeter_store::TimelineQuery;
use saltpeter_store::output::utf16_len;

/// How often a connection is refreshed, as the original.
pub(crate) const TICK: Duration = Duration::from_secs(2);
/// The shortest time between pings, whatever `ui_idle_timeout` says.
const MIN_PING_EVERY: Duration = Duration::from_secs(1);

/// What a connection needs.
#[derive(Clone, Debug)]
pub struct UiContext {
    pub engine: EngineHandle,
    pub config: watch::Receiver<Arc<Config>>,
}

/// The socket went away.
#[derive(Debug)]
struct Gone;

/// One browser connection.
#[derive(Debug)]
struct Connection {
    socket: WebSocket,
    ctx: UiContext,
    /// Who connected: `run` and the kills need the operator role, and the audit trail names
    /// the caller.
    caller: Caller,
    /// Subscribed jobs and their cursors by machine.
    subs: BTreeMap<String, BTreeMap<String, OutputCursor>>,
    last_serial: Option<u64>,
    /// Instances per job in the last `status` sent.
    shown_running: BTreeMap<String, BTreeSet<String>>,
}

/// How often a connection with idle timeout `idle` is pinged: three times per timeout, so two
/// lost pongs do not close a live browser.
fn ping_every(idle: Duration) -> Duration {
    (idle / 3).max(MIN_PING_EVERY)
}

/// Serves one upgraded connection until it closes.
pub(crate) async fn serve(socket: WebSocket, ctx: UiContext, caller: Caller) {
    let mut conn = Connection {
        socket,
        ctx,
        caller,
        subs: BTreeMap::new(),
        last_serial: None,
        shown_running: BTreeMap::new(),
    };
    let _ = conn.run().await;
}

impl Connection {
    async fn run(&mut self) -> Result<(), Gone> {
        // `config` must be the first message (docs/COMPATIBILITY.md, "The UI protocol"), then a `status`.
        self.refresh(true).await?;
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        let mut last_frame = tokio::time::Instant::now();
        let mut idle_timeout = self.idle_timeout();
        let mut ping = tokio::time::interval(ping_every(idle_timeout));
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ping.tick().await;
        loop {
            // Settings cap the timeout at a week, so this cannot overflow in practice.
            let idle_deadline = last_frame.checked_add(idle_timeout).unwrap_or(last_frame);
            tokio::select! {
                () = tokio::time::sleep_until(idle_deadline) => {
                    self.ctx
                        .engine
                        .metrics()
                        .listeners
                        .ui_idle_closed
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    tracing::debug!(?idle_timeout, "Closing a UI socket that sent nothing.");
                    let _ = self.socket.send(Message::Close(None)).await;
                    return Ok(());
                }
                _ = ping.tick() => {
                    // A reload may have changed the timeout; the new one applies from here.
                    let now = self.idle_timeout();
                    if now != idle_timeout {
                        idle_timeout = now;
                        ping = tokio::time::interval(ping_every(idle_timeout));
                        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                        ping.tick().await;
                    }
                    self.socket
                        .send(Message::Ping(Default::default()))
                        .await
                        .map_err(|_| Gone)?;
                }
                frame = self.socket.recv() => {
                    last_frame = tokio::time::Instant::now();
                    match frame {
                        None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return Ok(()),
                        Some(Ok(Message::Text(text))) => self.on_text(text.as_str()).await?,
                        Some(Ok(Message::Binary(_))) => {
                            self.send(&error_message(None, "binary frames are not commands")).await?;
                        }
                        Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                    }
                }
                _ = tick.tick() => self.refresh(true).await?,
            }
        }
    }

    fn idle_timeout(&self) -> Duration {
        self.ctx.config.borrow().settings.ui_idle_timeout
    }

    async fn send(&mut self, value: &Value) -> Result<(), Gone> {
        self.socket
            .send(Message::Text(value.to_string().into()))
            .await
            .map_err(|_| Gone)
    }

    /// Checks the caller against the current configuration: a token removed since the
    /// socket opened ends it, and a changed role applies to the next command.
    async fn recheck(&mut self) -> Result<(), Gone> {
        let role = {
            let config = self.ctx.config.borrow();
            super::auth::current_role(&config.settings, &self.caller)
        };
        match role {
            Some(role) => {
                self.caller.role = role;
                Ok(())
            }
            None => {
                tracing::info!(token = %self.caller.name, "Closing a UI socket whose token is no longer configured.");
                let _ = self
                    .send(&error_message(None, "the token is no longer valid"))
                    .await;
                let _ = self.socket.send(Message::Close(None)).await;
                Err(Gone)
            }
        }
    }

    async fn on_text(&mut self, text: &str) -> Result<(), Gone> {
        self.recheck().await?;
        let command = match messages::parse_command(text) {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(error = %e, "Malformed UI command.");
                return self.send(&error_message(e.command, &e.message)).await;
            }
        };
        let name = command.name();
        match self.execute(command).await {
            Ok(refresh) => {
                if refresh {
                    self.refresh(false).await?;
                }
                Ok(())
            }
            Err(Failure::Gone) => Err(Gone),
            Err(Failure::Refused(message)) => self.send(&error_message(Some(name), &message)).await,
        }
    }

    /// Carries out a command; `Ok(true)` asks for an immediate refresh.
    async fn execute(&mut self, command: Command) -> Result<bool, Failure> {
        let engine = self.ctx.engine.clone();
        let acts = matches!(
            command,
            Command::Run(_) | Command::KillCron(_) | Command::KillMachine { .. }
        );
        if acts && !self.caller.may(Role::Operator) {
            let what = command.name();
            return Err(Failure::Refused(self.caller.refusal(Role::Operator, what)));
        }
        let by = self.caller.actor();
        match command {
            Command::Subscribe(jobs) => {
                let limits = self.ctx.config.borrow().settings.limits;
                query::admit_subscriptions(&self.subs, &jobs, &limits)
                    .map_err(|e| Failure::Refused(e.0))?;
                for job in jobs {
                    self.subs.entry(job).or_default();
                }
                Ok(true)
            }
            Command::Unsubscribe(jobs) => {
                let limits = self.ctx.config.borrow().settings.limits;
                query::check_names(&jobs, &limits).map_err(|e| Failure::Refused(e.0))?;
                for job in jobs {
                    self.subs.remove(&job);
                }
                Ok(false)
            }
            Command::Ack {
                cron,
                machine,
                position,
            } => {
                tracing::trace!(%cron, %machine, position, "UI ack.");
                Ok(false)
            }
            Command::Run(job) => {
                let instance = engine
                    .ask(|reply| ApiRequest::RunNow { job, by, reply })
                    .await
                    .ok_or(Failure::Gone)?
                    .map_err(|e| Failure::Refused(e.to_string()))?;
                tracing::info!(%instance, "Run requested from the UI.");
                Ok(true)
            }
            Command::KillCron(job) => {
                let status = status(&engine).await?;
                let instances: Vec<String> = status
                    .running
                    .iter()
                    .filter(|(_, r)| r.name == job)
                    .map(|(i, _)| i.clone())
                    .collect();
                if instances.is_empty() {
                    return Err(Failure::Refused(format!("{job} is not running")));
                }
                for instance in instances {
                    let by = by.clone();
                    engine
                        .ask(|reply| ApiRequest::KillRun {
                            instance,
                            by,
                            reply,
                        })
                        .await
                        .ok_or(Failure::Gone)?
                        .map_err(|e| Failure::Refused(e.to_string()))?;
                }
                Ok(true)
            }
            Command::KillMachine {
                cron,
                machine,
                job_instance,
            } => {
                let instance = match job_instance {
                    Some(i) => i,
                    None => status(&engine)
                        .await?
                        .running
                        .into_iter()
                        .find(|(_, r)| r.name == cron && r.machines.contains(&machine))
                        .map(|(i, _)| i)
                        .ok_or_else(|| {
                            Failure::Refused(format!("{machine} is not running {cron}"))
                        })?,
                };
                engine
                    .ask(|reply| ApiRequest::KillMachine {
                        instance,
                        machine,
                        by,
                        reply,
                    })
                    .await
                    .ok_or(Failure::Gone)?
                    .map_err(|e| Failure::Refused(e.to_string()))?;
                Ok(true)
            }
            Command::GetTimeline {
                start_date,
                end_date,
                id,
            } => {
                let now = time::OffsetDateTime::now_utc();
                let limits = self.ctx.config.borrow().settings.limits;
                let (start, end) = query::timeline_window(&start_date, &end_date, now, &limits)
                    .map_err(|e| Failure::Refused(e.0))?;
                let query = TimelineQuery {
                    start,
                    end,
                    job: None,
                    limit: limits.timeline_max_rows,
                };
                let mut content = engine
                    .ask(|reply| ApiRequest::Ui(UiRequest::Timeline { query, reply }))
                    .await
                    .ok_or(Failure::Gone)?;
                // Missed slots: the original UI protocol's timeline holds runs only.
                content.retain(|e| e.missed.is_none());
                let serial = now.unix_timestamp_nanos() as f64 / 1e9;
                self.send(&messages::timeline_message(&id, &content, serial))
                    .await
                    .map_err(|_| Failure::Gone)?;
                Ok(false)
            }
        }
    }
}

/// The current `status`, for the kill commands.
async fn status(engine: &EngineHandle) -> Result<StatusSnapshot, Failure> {
    engine
        .ask(|reply| {
            ApiRequest::Ui(UiRequest::Snapshot {
                jobs: Vec::new(),
                reply,
            })
        })
        .await
        .map(|s| s.status)
        .ok_or(Failure::Gone)
}

impl Connection {
    /// Sends what changed: maybe `config`, then `status`, then per job chunks and `details`.
    async fn refresh(&mut self, with_config: bool) -> Result<(), Gone> {
        self.recheck().await?;
        if with_config {
            let config = self.ctx.config.borrow().clone();
            if self.last_serial != Some(config.serial) {
                self.last_serial = Some(config.serial);
                self.send(&config_message(&config)).await?;
            }
        }
        let jobs: Vec<JobCursors> = self
            .subs
            .iter()
            .map(|(job, cursors)| JobCursors {
                job: job.clone(),
                cursors: cursors.clone(),
            })
            .collect();
        let Some(snapshot) = self
            .ctx
            .engine
            .ask(|reply| ApiRequest::Ui(UiRequest::Snapshot { jobs, reply }))
            .await
        else {
            return Err(Gone);
        };
        for message in plan(&mut self.subs, &mut self.shown_running, &snapshot) {
            self.send(&message).await?;
        }
        Ok(())
    }
}

/// Why a command failed.
#[derive(Debug)]
enum Failure {
    Gone,
    Refused(String),
}

/// The messages one refresh sends after `config`, updating the cursors and what the browser
/// was shown. Kept free of I/O so the ordering rules can be tested directly.
///
/// - A job whose newest run replaced one the browser saw running in the previous `status` gets
///   an interim `status` without the new run first: the React UI clears a machine's output
///   only when it sees the machine go from not running to running (docs/COMPATIBILITY.md, "The UI protocol").
/// - `status` comes before any `output_chunk`, and a job's chunks before its `details`.
/// - A cursor for another run instance starts at 0; positions are UTF-16 units (docs/COMPATIBILITY.md: output positions).
/// - A reader that fell into the dropped middle of a long output gets a marker, then the tail.
pub fn plan(
    subs: &mut BTreeMap<String, BTreeMap<String, OutputCursor>>,
    shown_running: &mut BTreeMap<String, BTreeSet<String>>,
    snapshot: &UiSnapshot,
) -> Vec<Value> {
    let mut out = Vec::new();
    let status = &snapshot.status;
    let mut now_running: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (instance, run) in &status.running {
        now_running
            .entry(run.name.clone())
            .or_default()
            .insert(instance.clone());
    }
    let replaced: BTreeSet<&String> = now_running
        .iter()
        .flat_map(|(job, instances)| {
            let before = shown_running.get(job);
            instances
                .iter()
                .filter(move |i| before.is_some_and(|b| !b.is_empty() && !b.contains(*i)))
        })
        .collect();
    if !replaced.is_empty() {
        let mut interim = status.clone();
        interim.running.retain(|i, _| !replaced.contains(i));
        out.push(status_message(&interim));
    }
    out.push(status_message(status));
    *shown_running = now_running;
    for job in &snapshot.jobs {
        let Some(cursors) = subs.get_mut(&job.job) else {
            continue;
        };
        for o in &job.outputs {
            let held = cursors
                .get(&o.machine)
                .filter(|c| c.instance == o.instance)
                .map_or(0, |c| c.position);
            let read = &o.read;
            let is_complete = o.complete && read.next == read.total;
            if read.skipped > 0 {
                let marker = format!(
                    "\n[... {} characters omitted here; the full output is in the job log ...]\n",
                    read.skipped
                );
                // The marker must end before the tail starts, or the UI would drop the tail.
                if utf16_len(&marker) < read.skipped {
                    out.push(chunk_message(&Chunk {
                        cron: &job.job,
                        machine: &o.machine,
                        chunk: &marker,
                        position: held,
                        total_length: read.total,
                        is_complete: false,
                    }));
                }
            }
            if !read.text.is_empty() {
                out.push(chunk_message(&Chunk {
                    cron: &job.job,
                    machine: &o.machine,
                    chunk: &read.text,
                    position: read.position,
                    total_length: read.total,
                    is_complete,
                }));
            }
            cursors.insert(
                o.machine.clone(),
                OutputCursor {
                    instance: o.instance.clone(),
                    position: read.next,
                },
            );
        }
        if let Some(details) = &job.details {
            out.push(details_message(&job.job, details));
        }
    }
    out
}
