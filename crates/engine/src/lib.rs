//! The engine: the one task that owns every job's and run's state.
//!
//! Architecture invariant: nothing else mutates run state. Wrapper connections, the API, the
//! launcher tasks, the config watcher and the timers all reach the engine as an [`Event`] on one
//! channel, so every change happens in one order that can be read in one place. Readers (the
//! API, the UI) ask for snapshots, which the engine builds on request.
//!
//! Per-message work is O(1) in the size of a run's history: an `output` appends to a bounded
//! buffer and hands the text to the job-log thread; a `heartbeat` stores an instant.
//!
//! Besides the event loop this crate owns what only the engine works with: the live runs
//! (`runs`), the launchers ([`launch`]), machine identity ([`Identity`]: credentials and
//! signature checks) and the clocks ([`Clock`]). It writes durable state through
//! `saltpeter-store` and job logs through `saltpeter-joblog`; it opens no socket.

// What no other crate uses is `pub(crate)`, so the compiler reports it once nothing calls it.
#![warn(unreachable_pub)]

mod api;
mod clock;
mod cluster;
mod identity;
pub mod launch;
mod lifecycle;
mod missed;
mod monitor;
mod outbox;
mod persist;
mod retry;
mod runs;
mod sched;
mod ui;
mod wrapper;

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use saltpeter_proto::{MasterMessage, WrapperMessage};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;

pub use api::{ApiError, ApiRequest, ClusterStatus, JobSummary};
pub use clock::Clock;
pub use cluster::{ClaimResult, ClusterParts, ClusterView, MasterRef, SlotClaims, SlotKind};
pub use identity::Identity;
pub use missed::{EngineEvent, event_channel};
pub use ui::*;

use crate::launch::{DirectOutcome, Launcher, Resolution, StartOutcome};
use crate::runs::Run;
use saltpeter_config::Config;
use saltpeter_joblog::JobLog;
use saltpeter_metrics::Metrics;
use saltpeter_store::audit::Action;
use saltpeter_store::{Notice, Restored, Store};

use monitor::Monitor;
use outbox::Outbox;
use sched::Scheduler;

pub use saltpeter_store::ConnId;

/// A frame for a connection's writer task.
#[derive(Debug)]
pub enum Outbound {
    /// Send this message.
    Message(MasterMessage),
    /// Send this message, then close the socket.
    Close(MasterMessage),
    /// Send this ack of an `output` read off the socket at `received` (for the metrics).
    OutputAck {
        ack: MasterMessage,
        received: Option<Instant>,
    },
    /// Nothing to send: the engine accepted the connection's first message, so it now speaks
    /// for a machine and its handshake deadline no longer applies. Sent once per connection,
    /// before any answer to that message.
    Accepted,
}

/// Everything that can change state.
#[derive(Debug)]
pub enum Event {
    /// A wrapper connected; frames for it go to `tx`.
    Connected {
        conn: ConnId,
        peer: SocketAddr,
        tx: mpsc::Sender<Outbound>,
    },
    /// A decoded message from a wrapper, and when it was read off the socket (for the
    /// output ack latency metric).
    Wrapper {
        conn: ConnId,
        msg: WrapperMessage,
        received: Instant,
    },
    /// A wrapper's socket closed. This alone never fails a machine: it may reconnect.
    Disconnected { conn: ConnId },
    /// A request from the API.
    Api(ApiRequest),
    /// A launcher finished resolving a run's targets.
    Resolved {
        instance: String,
        resolution: Resolution,
    },
    /// A launcher finished starting wrappers for some machines of a run.
    Started {
        instance: String,
        outcome: StartOutcome,
    },
    /// A launcher ran a job's command itself (legacy mode, `use_wrapper: false`) and reports
    /// each machine's exit code and output.
    Finished {
        instance: String,
        outcome: DirectOutcome,
    },
    /// The store committed everything queued before these notices.
    Persisted(Vec<Notice>),
    /// The check of a `connect`'s signature with the minion's Salt key, done off the engine's
    /// thread because it reads the key from disk.
    Verified {
        conn: ConnId,
        connect: saltpeter_proto::Connect,
        result: Result<(), crate::identity::IdentityError>,
    },
    /// A pass of the coordination among masters (only with several masters).
    Cluster(ClusterView),
    /// The store loaded a gained job's state.
    TakenOver {
        job: String,
        result: Result<Restored, saltpeter_store::StoreError>,
    },
    /// The database answered a slot claim.
    SlotClaimed {
        job: String,
        slot: time::OffsetDateTime,
        kind: cluster::SlotKind,
        won: ClaimResult,
    },
}

/// Sends events to the engine.
#[derive(Clone, Debug)]
pub struct EngineHandle {
    tx: mpsc::Sender<Event>,
    metrics: Arc<Metrics>,
}

impl EngineHandle {
    /// The counters the engine keeps, for `GET /metrics`.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Delivers an event, waiting while the engine's queue is full (back-pressure on wrappers).
    /// Returns false once the engine has stopped.
    pub async fn send(&self, event: Event) -> bool {
        self.tx.send(event).await.is_ok()
    }

    /// Sends an API request and waits for its answer.
    pub async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> ApiRequest) -> Option<T> {
        let (tx, rx) = oneshot::channel();
        self.send(Event::Api(make(tx))).await.then_some(())?;
        rx.await.ok()
    }
}

/// What the engine needs from the outside world, injected so tests can own every edge.
#[derive(Debug)]
pub struct EngineParts {
    pub config: watch::Receiver<Arc<Config>>,
    pub launcher: Arc<dyn Launcher>,
    pub joblog: JobLog,
    pub clock: Clock,
    /// The URL wrappers connect back to, when the launcher cannot derive a better one.
    pub machines_url: String,
    /// Variables every wrapper gets besides its job's, to verify the master's TLS
    /// certificate (`SP_TLS_FINGERPRINT` or `SP_TLS_CA`); empty when the endpoint is plain.
    pub wrapper_env: Vec<(String, String)>,
    pub shutdown: CancellationToken,
    /// Where durable state goes; see [`Engine::new`] for how it is started.
    pub store: StoreParts,
    /// With several masters on one database: this master's id and its slot claims. The
    /// engine then acts for no job until the coordination gives it one.
    pub cluster: Option<ClusterParts>,
}

/// The store, either still to be started on the engine's channel (production: a thread) or
/// ready (tests: inline), plus what it restored.
#[derive(Debug)]
pub enum StoreParts {
    /// An opened database; the engine starts its thread so notices reach the engine.
    Open(Box<dyn saltpeter_store::Backend>, Restored),
    /// A store that needs no thread.
    Ready(Store, Restored),
}

/// How many finished runs per job stay in memory for the API.
const HISTORY_PER_JOB: usize = 50;
/// Capacity of the event queue.
const EVENT_QUEUE: usize = 16 * 1024;
/// How long the engine's own thread pauses after a batch of events. Woken per event, it
/// switched in 5,600 times a second at 10,000 wrappers, and every wake cost the sender a
/// system call; the pause bounds that to a few hundred and costs an ack at most
/// twice this (its output, then the store's notice).
const GATHER: Duration = Duration::from_micros(500);

/// How many signature checks may run at once.
const VERIFIERS: usize = 2;

/// The state the engine owns.
#[derive(Debug)]
pub struct Engine {
    config: Arc<Config>,
    config_rx: watch::Receiver<Arc<Config>>,
    launcher: Arc<dyn Launcher>,
    joblog: JobLog,
    logdir: Arc<Path>,
    clock: Clock,
    machines_url: String,
    /// See [`EngineParts::wrapper_env`].
    wrapper_env: Vec<(String, String)>,
    /// For tasks the engine spawns (launchers) to report back.
    self_tx: mpsc::Sender<Event>,
    rx: mpsc::Receiver<Event>,
    shutdown: CancellationToken,
    jobs: HashMap<String, JobState>,
    /// Runs that have not ended.
    runs: HashMap<String, Run>,
    /// Recently finished runs, oldest first per job.
    finished: HashMap<String, Run>,
    history: HashMap<String, VecDeque<String>>,
    conns: HashMap<ConnId, Conn>,
    /// Frames for connections, handed to the runtime once per batch of events.
    outbox: Outbox,
    monitor: Monitor,
    scheduler: Scheduler,
    store: Store,
    /// Counters for `GET /metrics`; the engine is their only writer.
    metrics: Arc<Metrics>,
    /// Where launcher work and other waiting goes: the runtime that created the engine, which
    /// need not be the one that runs it (see [`Engine::run_on_own_thread`]).
    spawner: tokio::runtime::Handle,
    /// Signature checks running at once (each reads a key file and does an RSA verification
    /// on a blocking thread): a reconnecting fleet waits in line instead of starting a
    /// blocking thread per wrapper.
    verifiers: Arc<tokio::sync::Semaphore>,
    /// The latest configuration the engine took in: when, and whether it loaded without
    /// errors (the reload signals of `/metrics`).
    config_taken: Option<(time::OffsetDateTime, bool)>,
    /// Where [`EngineEvent`]s go, once someone subscribed (see `missed.rs`).
    events: Option<mpsc::Sender<EngineEvent>>,
    /// The jobs this master holds among several; `None` with one master (see `cluster.rs`).
    cluster: Option<cluster::Cluster>,
}

/// What the engine remembers about a job between runs. It differs from the store's
/// `JobRecord` because it also holds what is only true while the master runs (running
/// instances, the latest targets, a refused overlap); the record is its durable subset.
#[derive(Debug, Default)]
pub(crate) struct JobState {
    pub last_run: Option<time::OffsetDateTime>,
    pub last_success: Option<bool>,
    /// When the latest successful run ended.
    pub last_success_at: Option<time::OffsetDateTime>,
    pub(crate) last_failed_count: usize,
    pub(crate) last_total_count: usize,
    /// The latest attempt was refused because a run was still going.
    pub overlap: bool,
    /// Instances of this job that have not ended.
    pub running: Vec<String>,
    /// Machines of the latest resolution (before maintenance filtering).
    pub targets: Vec<String>,
    /// The latest cron slot fired, kept across restarts so no slot fires twice.
    pub last_fired: Option<time::OffsetDateTime>,
}

/// A wrapper connection.
#[derive(Debug)]
struct Conn {
    tx: mpsc::Sender<Outbound>,
    peer: SocketAddr,
    /// The (instance, machine) this connection speaks for, once accepted.
    bound: Option<(String, String)>,
    /// [`Outbound::Accepted`] was sent.
    accepted: bool,
    /// The challenge sent in answer to this connection's `hello`, until a `connect` uses it.
    nonce: Option<String>,
    /// A signed `connect` is being checked; other messages wait for the verdict.
    verifying: bool,
}

impl Engine {
    /// Creates the engine and the handle others use to reach it, restoring what the store
    /// held. Must be called inside a tokio runtime.
    pub fn new(parts: EngineParts) -> Result<(Self, EngineHandle), saltpeter_store::StoreError> {
        let (tx, rx) = mpsc::channel(EVENT_QUEUE);
        let metrics = Arc::<Metrics>::default();
        let (store, restored) = match parts.store {
            StoreParts::Open(db, restored) => {
                let engine = tx.clone();
                let deliver =
                    move |notices| engine.blocking_send(Event::Persisted(notices)).is_ok();
                (Store::start(db, deliver, metrics.clone())?, restored)
            }
            StoreParts::Ready(store, restored) => (store, restored),
        };
        let config = parts.config.borrow().clone();
        let logdir: Arc<Path> = config.settings.logdir.clone().into();
        let mut engine = Self {
            config: config.clone(),
            config_rx: parts.config,
            launcher: parts.launcher,
            joblog: parts.joblog,
            logdir,
            clock: parts.clock,
            machines_url: parts.machines_url,
            wrapper_env: parts.wrapper_env,
            self_tx: tx.clone(),
            rx,
            shutdown: parts.shutdown,
            jobs: HashMap::new(),
            runs: HashMap::new(),
            finished: HashMap::new(),
            history: HashMap::new(),
            conns: HashMap::new(),
            outbox: Outbox::start(&tokio::runtime::Handle::current()),
            monitor: Monitor::default(),
            scheduler: Scheduler::default(),
            store,
            metrics,
            spawner: tokio::runtime::Handle::current(),
            verifiers: Arc::new(tokio::sync::Semaphore::new(VERIFIERS)),
            config_taken: None,
            events: None,
            cluster: parts.cluster.map(cluster::Cluster::new),
        };
        for name in config.jobs.keys() {
            engine.jobs.entry(name.clone()).or_default();
        }
        engine.restore(restored);
        engine.apply_config(config);
        let metrics = engine.metrics.clone();
        Ok((engine, EngineHandle { tx, metrics }))
    }

    /// Runs the engine on a thread of its own with a single-threaded runtime, until shutdown.
    ///
    /// Why: on the shared runtime the engine task waits in the same run queue as ten thousand
    /// connection tasks, and every ack waits for the engine twice (the output, then the store's
    /// notice). Its own thread lets the OS schedule it as soon as an event arrives.
    /// The receiver resolves when the engine has stopped.
    pub fn run_on_own_thread(self) -> std::io::Result<oneshot::Receiver<()>> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let (stopped, on_stop) = oneshot::channel();
        std::thread::Builder::new()
            .name("engine".into())
            .spawn(move || {
                runtime.block_on(self.run_gathering(GATHER));
                let _ = stopped.send(());
            })?;
        Ok(on_stop)
    }

    /// Runs until shutdown.
    pub async fn run(self) {
        self.run_gathering(Duration::ZERO).await;
    }

    /// Runs until shutdown, pausing `gather` after each batch of more than one event so the
    /// next batch can build up without waking this thread (zero: no pause).
    async fn run_gathering(mut self, gather: Duration) {
        let mut monitor_sleep: Pin<Box<Sleep>> = Box::pin(tokio::time::sleep_until(far_future()));
        let mut monitor_at = None;
        let mut fire_sleep: Pin<Box<Sleep>> = Box::pin(tokio::time::sleep_until(far_future()));
        let mut fire_at = None;
        let mut lease_sleep: Pin<Box<Sleep>> = Box::pin(tokio::time::sleep_until(far_future()));
        let mut lease_at = None;
        // Once the watcher is gone the engine keeps serving on the last config it had.
        let mut config_open = true;
        // Missed slots: what the master missed while it was down, now that a subscriber may
        // have been set.
        self.scan_missed_at_start();
        loop {
            // Whatever the last turn sent goes out before this thread waits again.
            self.outbox.flush();
            // Re-arm the two timers only when their targets moved; resetting a tokio timer
            // per event would be needless work at thousands of messages per second.
            let want = self.monitor.next_deadline();
            if want != monitor_at {
                monitor_at = want;
                monitor_sleep
                    .as_mut()
                    .reset(want.unwrap_or_else(far_future));
            }
            let want = self.scheduler.next_wake(&self.clock);
            if want != fire_at {
                fire_at = want;
                fire_sleep.as_mut().reset(want.unwrap_or_else(far_future));
            }
            let want = self
                .cluster
                .as_ref()
                .and_then(cluster::Cluster::next_deadline);
            if want != lease_at {
                lease_at = want;
                lease_sleep.as_mut().reset(want.unwrap_or_else(far_future));
            }
            tokio::select! {
                biased;
                () = self.shutdown.cancelled() => break,
                event = self.rx.recv() => {
                    let Some(event) = event else { break };
                    self.handle(event);
                    // Drain what is already queued before looking at timers again.
                    let mut batch = 1;
                    for _ in 0..256 {
                        match self.rx.try_recv() {
                            Ok(event) => self.handle(event),
                            Err(_) => break,
                        }
                        batch += 1;
                    }
                    if batch > 1 && !gather.is_zero() {
                        self.outbox.flush();
                        // While this thread sleeps no waker is registered, so senders queue
                        // events without a wake-up each; see `GATHER`.
                        std::thread::sleep(gather);
                    }
                }
                () = &mut monitor_sleep, if monitor_at.is_some() => {
                    monitor_at = None;
                    self.on_deadlines();
                }
                () = &mut lease_sleep, if lease_at.is_some() => {
                    lease_at = None;
                    self.on_lease_deadlines();
                }
                () = &mut fire_sleep, if fire_at.is_some() => {
                    if let Some(at) = fire_at {
                        let late = self.clock.instant().saturating_duration_since(at);
                        self.metrics.scheduler_lag.observe(late);
                    }
                    fire_at = None;
                    self.on_schedule();
                }
                changed = self.config_rx.changed(), if config_open => {
                    if changed.is_err() {
                        tracing::warn!("The config watcher stopped; running on the last config.");
                        config_open = false;
                        continue;
                    }
                    let config = self.config_rx.borrow_and_update().clone();
                    self.apply_config(config);
                }
            }
        }
        self.stop();
    }

    /// The end of the shutdown protocol: no more events are taken in, those already queued
    /// are handled, then the store makes its final commit and the job log writes its buffers,
    /// each thread joined before the engine reports that it stopped.
    fn stop(mut self) {
        self.rx.close();
        let mut handled = 0usize;
        while let Ok(event) = self.rx.try_recv() {
            self.handle(event);
            handled += 1;
        }
        self.outbox.flush();
        // The store thread may be waiting to hand this engine a notice; with the receiver
        // closed that send fails at once and the thread goes on committing.
        self.store.close();
        self.joblog.close();
        tracing::info!(handled, "Engine stopped; store committed, job log written.");
    }

    fn handle(&mut self, event: Event) {
        match event {
            Event::Connected { conn, peer, tx } => {
                self.conns.insert(
                    conn,
                    Conn {
                        tx,
                        peer,
                        bound: None,
                        accepted: false,
                        nonce: None,
                        verifying: false,
                    },
                );
            }
            Event::Disconnected { conn } => self.on_disconnect(conn),
            Event::Wrapper {
                conn,
                msg,
                received,
            } => self.on_wrapper(conn, msg, received),
            Event::Api(request) => self.on_api(request),
            Event::Resolved {
                instance,
                resolution,
            } => self.on_resolved(&instance, resolution),
            Event::Started { instance, outcome } => self.on_started(&instance, outcome),
            Event::Finished { instance, outcome } => self.on_direct(&instance, outcome),
            Event::Persisted(notices) => self.on_persisted(notices),
            Event::Verified {
                conn,
                connect,
                result,
            } => self.on_verified(conn, connect, result),
            Event::Cluster(view) => self.on_cluster(view),
            Event::TakenOver { job, result } => self.on_taken_over(&job, result),
            Event::SlotClaimed {
                job,
                slot,
                kind,
                won,
            } => self.on_slot_claimed(&job, slot, kind, won),
        }
        self.drain_inline_notices();
    }

    fn apply_config(&mut self, config: Arc<Config>) {
        self.config_taken = Some((self.clock.wall(), !config.has_errors()));
        self.audit_config(&config);
        self.logdir = config.settings.logdir.clone().into();
        for name in config.jobs.keys() {
            self.jobs.entry(name.clone()).or_default();
        }
        let floors = self
            .jobs
            .iter()
            .filter_map(|(k, s)| Some((k.clone(), s.last_fired?)))
            .collect();
        self.scheduler.reload(&config, self.clock.wall(), &floors);
        self.config = config;
    }

    /// Records a configuration change (its serial moved) and a change of maintenance in the
    /// audit trail. The watcher only publishes what it read, so the actor is `config`; a
    /// SIGHUP that asked for the reread is recorded on its own, as `signal`.
    fn audit_config(&mut self, new: &Config) {
        let old = self.config.clone();
        if new.serial == old.serial {
            return;
        }
        let detail = format!("serial {} -> {}", old.serial, new.serial);
        self.audit_config_change(Action::ConfigReload, detail);
        if new.maintenance != old.maintenance {
            let m = &new.maintenance;
            // A fleet may list thousands of machines; the entry names the first few.
            let shown: Vec<&str> = m.machines.iter().take(20).map(String::as_str).collect();
            let more = m.machines.len().saturating_sub(shown.len());
            let detail = format!(
                "global {}, {} machine(s): {}{}",
                if m.global { "on" } else { "off" },
                m.machines.len(),
                shown.join(", "),
                if more > 0 {
                    format!(" and {more} more")
                } else {
                    String::new()
                }
            );
            self.audit_config_change(Action::Maintenance, detail);
        }
    }

    fn audit_config_change(&mut self, action: Action, detail: String) {
        tracing::info!(action = action.as_str(), %detail, "Audit.");
        let at = self.clock.wall();
        self.store.push(saltpeter_store::StoreOp::Audit(
            saltpeter_store::audit::AuditRecord {
                at,
                actor: saltpeter_store::audit::Actor::config(),
                action,
                job: None,
                instance: None,
                machine: None,
                ok: true,
                detail: Some(detail),
            },
        ));
    }

    /// Sends a frame to a connection without ever waiting: a wrapper that does not read its
    /// socket loses the connection rather than stalling every other run.
    fn send(&mut self, conn: ConnId, out: Outbound) {
        let Some(c) = self.conns.get(&conn) else {
            return;
        };
        if let Err(error) = self.outbox.reserve(&c.tx, out) {
            tracing::warn!(conn, peer = %c.peer, %error, "Dropping a wrapper connection that is not reading.");
            self.on_disconnect(conn);
        }
    }

    /// Records that `conn` speaks for (instance, machine); the first time, tells its task the
    /// handshake is done.
    fn bind_conn(&mut self, conn: ConnId, key: (String, String)) {
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        c.bound = Some(key);
        if !c.accepted {
            c.accepted = true;
            self.send(conn, Outbound::Accepted);
        }
    }

    fn on_disconnect(&mut self, conn: ConnId) {
        let Some(c) = self.conns.remove(&conn) else {
            return;
        };
        if let Some((instance, machine)) = c.bound
            && let Some(m) = self
                .runs
                .get_mut(&instance)
                .and_then(|r| r.machines.get_mut(&machine))
            && m.conn == Some(conn)
        {
            m.conn = None;
            tracing::debug!(%instance, %machine, "Wrapper disconnected; it may reconnect.");
        }
    }
}

/// A deadline that never comes, for disarmed timers.
fn far_future() -> Instant {
    Instant::now() + std::time::Duration::from_secs(86_400 * 365)
}

/// A short random secret, hex-encoded.
fn new_token() -> String {
    use rand::RngCore;
    let mut bytes = [0u8; 24];
    rand::rng().fill_bytes(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl Engine {
    /// A run by instance, running or recently finished: late messages for a finished run
    /// (a `complete` after a verdict, say) still find it.
    fn run_mut(&mut self, instance: &str) -> Option<&mut Run> {
        match self.runs.get_mut(instance) {
            Some(run) => Some(run),
            None => self.finished.get_mut(instance),
        }
    }
}

/// For API views of finished and running runs alike.
fn find_run<'a>(engine: &'a Engine, instance: &str) -> Option<&'a Run> {
    engine
        .runs
        .get(instance)
        .or_else(|| engine.finished.get(instance))
}
