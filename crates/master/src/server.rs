//! Wiring: binds the listeners, starts the config watcher, the engine, the machines endpoint
//! and the API (each behind the accept loop of `listen.rs`), and hands back their addresses.
//! `main` and the integration tests both start the master through [`start`], so tests
//! exercise the production wiring with their own edges (listeners on port 0, a launcher, a
//! clock).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use saltpeter_config::{Config, ConfigWatcher, Launcher as LauncherKind, WatchOptions};
use saltpeter_engine::Clock;
use saltpeter_engine::launch::Launcher;
use saltpeter_engine::launch::bench::BenchLauncher;
use saltpeter_engine::launch::local::LocalLauncher;
use saltpeter_engine::launch::salt::SaltLauncher;
use saltpeter_engine::{Engine, EngineHandle, EngineParts, StoreParts};
use saltpeter_joblog::JobLog;
use saltpeter_notify::{Deliverer, DeliveryLoop, LoopOptions, NetSender, Outbox, SystemClock};

use crate::notifier::{Notifier, NotifierHandle};
use saltpeter_metrics::ListenerKind;
use saltpeter_web::listen::Gate;

/// How long [`Running::stop`] waits for open HTTP requests once the engine has stopped.
const LISTENER_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// What to start. `None` fields take their value from the configuration.
#[derive(Debug, Default)]
pub struct Options {
    pub config_dir: PathBuf,
    pub machines_listener: Option<TcpListener>,
    pub api_listener: Option<TcpListener>,
    pub launcher: Option<Arc<dyn Launcher>>,
    pub clock: Option<Clock>,
}

/// A started master.
#[derive(Debug)]
pub struct Running {
    pub machines_addr: SocketAddr,
    pub api_addr: SocketAddr,
    pub engine: EngineHandle,
    pub config: watch::Receiver<Arc<Config>>,
    pub shutdown: CancellationToken,
    pub tasks: tokio::task::JoinSet<()>,
    /// Resolves when the engine has stopped (after the store's final commit and the job log's
    /// last write).
    pub engine_stopped: tokio::sync::oneshot::Receiver<()>,
    /// Keeps the configuration current; dropping it stops hot reload.
    pub watcher: ConfigWatcher,
    /// The notification outbox and its deliverer.
    pub notifications: Arc<Notifications>,
    /// A way into the notifier (for missed-slot events).
    pub notifier: NotifierHandle,
    /// The notifier's task; it ends once the job log has stopped and `notifier` is dropped.
    pub notifier_task: tokio::task::JoinHandle<()>,
    /// With several masters: the coordination task and what stops it, after the engine, so
    /// the store's last writes are made under leases still held.
    pub cluster: Option<(CancellationToken, tokio::task::JoinHandle<()>)>,
}

/// The durable outbox and the deliverer thread that sends from it, shared by the notifier
/// (which wakes the deliverer), `/metrics` and the API.
pub struct Notifications {
    pub outbox: Arc<dyn Outbox>,
    deliverer: parking_lot::Mutex<Option<Deliverer>>,
}

impl std::fmt::Debug for Notifications {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Notifications").finish_non_exhaustive()
    }
}

impl Notifications {
    /// Tells the deliverer to look at the outbox now.
    pub fn wake(&self) {
        if let Some(d) = self.deliverer.lock().as_ref() {
            d.wake();
        }
    }

    /// The figures `/metrics` shows.
    pub fn figures(&self) -> saltpeter_metrics::NotifyFigures {
        let stats = self
            .deliverer
            .lock()
            .as_ref()
            .map(Deliverer::stats)
            .unwrap_or_default();
        saltpeter_metrics::NotifyFigures {
            delivered: stats.delivered,
            failed_attempts: stats.failed_attempts,
            gave_up: stats.gave_up,
            rate_limited: stats.rate_limited,
            pending: self.outbox.counts().map(|c| c.pending).unwrap_or_default(),
        }
    }

    /// Stops the deliverer thread (a send in progress finishes first, bounded by the
    /// delivery timeout); rows not yet sent stay in the outbox for the next start.
    pub fn stop(&self) {
        let deliverer = self.deliverer.lock().take();
        if let Some(d) = deliverer {
            d.stop();
        }
    }
}

/// How long a master of a cluster waits at start for the jobs of its first coordination pass to
/// load, so that it is ready only once it acts for its share.
const FIRST_PASS_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// How long [`Running::stop`] waits for the notifier to queue the last events it heard.
const NOTIFIER_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

impl Running {
    /// The shutdown protocol: the listeners stop accepting, the engine handles what it
    /// already holds, the store makes its final commit and the job log writes its buffers (and
    /// stops its shippers, whose queues stay on disk); returns when every part has ended.
    /// Running wrappers are left alone: they reconnect to the next master.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if self.engine_stopped.await.is_err() {
            tracing::error!("The engine thread ended without reporting; it may have panicked.");
        }
        if let Some((stop, task)) = self.cluster.take() {
            stop.cancel();
            let _ = task.await;
        }
        // The job log has stopped, so its tap is gone; with this handle dropped too, the
        // notifier queues what it heard last and ends. Then the deliverer stops: after the
        // engine, so every event of the engine's last moments is in the outbox, which has a
        // connection of its own and is closed last, when `notifications` is dropped.
        drop(self.notifier);
        if tokio::time::timeout(NOTIFIER_GRACE, &mut self.notifier_task)
            .await
            .is_err()
        {
            tracing::warn!("The notifier is still busy after {NOTIFIER_GRACE:?}; stopping it.");
            self.notifier_task.abort();
        }
        let notifications = Arc::clone(&self.notifications);
        let _ = tokio::task::spawn_blocking(move || notifications.stop()).await;
        // The listeners end once their open HTTP requests are answered; a client that holds
        // one open is not worth waiting for past this.
        let listeners = async { while self.tasks.join_next().await.is_some() {} };
        if tokio::time::timeout(LISTENER_GRACE, listeners)
            .await
            .is_err()
        {
            tracing::warn!("Listeners still busy after {LISTENER_GRACE:?}; closing them.");
            self.tasks.abort_all();
        }
        drop(self.watcher);
    }
}

/// Why the master could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
    #[error("cannot start the job log: {0}")]
    JobLog(std::io::Error),
    #[error("{0}")]
    Config(String),
    #[error("cannot open the store: {0}")]
    Store(saltpeter_store::StoreError),
    #[error("launcher {0:?} is not available in this build yet")]
    Launcher(&'static str),
    #[error("cannot start the engine thread: {0}")]
    Engine(std::io::Error),
    #[error("{0}")]
    Tls(#[from] saltpeter_web::tls::TlsSetupError),
    #[error("cannot start notifications: {0}")]
    Notify(String),
}

/// Connections the kernel completes and queues for each listener before the master accepts
/// them. tokio's default of 1024 overflowed under bursts of connects (a fleet's wrappers at
/// the same cron second, or a flood the listeners are closing): the kernel then drops the
/// handshake's last packet and the client waits a second or more for a retransmit. The kernel
/// caps it at `net.core.somaxconn`.
const LISTEN_BACKLOG: u32 = 4096;

async fn bind(addr: SocketAddr) -> Result<TcpListener, StartError> {
    let fail = |source| StartError::Bind {
        addr: addr.to_string(),
        source,
    };
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()
    } else {
        tokio::net::TcpSocket::new_v6()
    }
    .map_err(fail)?;
    // As `TcpListener::bind` does: a restarted master can take its port back at once.
    socket.set_reuseaddr(true).map_err(fail)?;
    socket.bind(addr).map_err(fail)?;
    socket.listen(LISTEN_BACKLOG).map_err(fail)
}

/// Starts every part of the master.
pub async fn start(options: Options) -> Result<Running, StartError> {
    let shutdown = CancellationToken::new();
    let watcher = ConfigWatcher::start(options.config_dir.clone(), WatchOptions::default())
        .await
        .map_err(|e| StartError::Config(e.to_string()))?;
    let config_rx = watcher.subscribe();
    let config = watcher.current();
    let s = &config.settings;
    if let Some(why) = s.exposure_problem() {
        return Err(StartError::Config(why));
    }
    if s.allow_legacy_wrappers {
        tracing::warn!(
            "allow_legacy_wrappers is on: wrappers that present no run token (the original \
             Python wrapper) are accepted, and anyone who can reach the machines port can \
             report for a machine that has no authenticated wrapper. Turn it off once every \
             minion runs sp-wrapper."
        );
    }
    // Which listener speaks TLS depends on where it is bound: the injected listener's address,
    // else the configured one (decided before binding, so a refused start binds nothing).
    let bound_ip = |l: &Option<TcpListener>, configured| {
        l.as_ref()
            .and_then(|l| l.local_addr().ok())
            .map_or(configured, |a| a.ip())
    };
    let tls = saltpeter_web::tls::ListenerTls::decide(
        s,
        bound_ip(&options.machines_listener, s.machines_bind_addr),
        bound_ip(&options.api_listener, s.api_bind_addr),
    )?;
    let machines_listener = match options.machines_listener {
        Some(l) => l,
        None => bind(SocketAddr::new(s.machines_bind_addr, s.machines_port)).await?,
    };
    let api_listener = match options.api_listener {
        Some(l) => l,
        None => bind(SocketAddr::new(s.api_bind_addr, s.api_port)).await?,
    };
    let machines_addr = machines_listener
        .local_addr()
        .map_err(|source| StartError::Bind {
            addr: "machines listener".into(),
            source,
        })?;
    let api_addr = api_listener
        .local_addr()
        .map_err(|source| StartError::Bind {
            addr: "API listener".into(),
            source,
        })?;
    let launcher: Arc<dyn Launcher> = match (options.launcher, s.launcher) {
        (Some(l), _) => l,
        (None, LauncherKind::Local) => {
            Arc::new(LocalLauncher::beside_current_exe().with_lock_dir(s.data_dir.join("locks")))
        }
        (None, LauncherKind::Salt) => Arc::new(SaltLauncher::from_settings(s)),
        (None, LauncherKind::Bench) => Arc::new(BenchLauncher::new(&s.data_dir)),
    };
    // Wrappers started by the local launcher run here, so loopback always reaches us; a
    // launcher for other hosts uses the configured host name.
    let host = match s.launcher {
        LauncherKind::Local | LauncherKind::Bench => "127.0.0.1".to_owned(),
        LauncherKind::Salt => s.default_saltpeter_server_host.clone(),
    };
    let scheme = if tls.machines.is_some() { "wss" } else { "ws" };
    let machines_url = format!("{scheme}://{host}:{}", machines_addr.port());
    // Shipping to Elasticsearch/OpenSearch only when a URL is configured.
    let ship = saltpeter_joblog::ship::start_for(s, config_rx.clone());
    let (seen_tx, seen_rx) = tokio::sync::mpsc::channel(crate::notifier::QUEUE);
    let joblog = JobLog::start_with_tap(
        s.data_dir.join("spool"),
        ship,
        Some(crate::notifier::tap(seen_tx.clone())),
    )
    .map_err(StartError::JobLog)?;
    let retention = saltpeter_store::Retention {
        runs_per_job: usize::try_from(s.retention_runs_per_job).unwrap_or(usize::MAX),
        max_age_days: u32::try_from(s.retention_days).unwrap_or(u32::MAX),
        head_bytes: s.retention_output_head_bytes,
        tail_bytes: s.retention_output_tail_bytes,
    };
    let api_base = {
        let scheme = if tls.api.is_some() { "https" } else { "http" };
        let host = if api_addr.ip().is_unspecified() {
            s.default_saltpeter_server_host.clone()
        } else {
            match api_addr.ip() {
                std::net::IpAddr::V6(ip) => format!("[{ip}]"),
                ip => ip.to_string(),
            }
        };
        format!("{scheme}://{host}:{}", api_addr.port())
    };
    // With PostgreSQL this master joins the others on the database before its store opens, so
    // every write the store makes is fenced by a lease.
    let joining =
        match &s.store {
            Some(url) => {
                let url = saltpeter_store_postgres::PostgresUrl::parse(url.expose())
                    .map_err(|e| StartError::Config(format!("store: {e}")))?;
                let advertised = saltpeter_store_postgres::Advertised {
                    machines_url: machines_url.clone(),
                    api_url: s
                        .cluster_api_url
                        .clone()
                        .unwrap_or_else(|| api_base.clone()),
                    tls_fingerprint: tls.fingerprint.map(|f| f.to_string()),
                };
                Some(crate::cluster::join(&url, advertised).await.map_err(|e| {
                    StartError::Config(format!("store: cannot join the cluster: {e}"))
                })?)
            }
            None => None,
        };
    let (db, restored) = open_store(s, retention, joining.as_ref().map(|j| j.hook.clone()))?;
    // What the notifier needs of the restored state: each job's last outcome and the runs
    // still going.
    let seed_jobs = restored.jobs.clone();
    let seed_runs: Vec<saltpeter_store::RunRecord> =
        restored.runs.iter().map(|(r, _)| r.clone()).collect();
    // In a cluster the engine starts with no job: each one's state comes with its lease.
    let restored = if joining.is_some() {
        saltpeter_store::Restored::default()
    } else {
        restored
    };
    let outbox: Arc<dyn Outbox> = Arc::new(
        saltpeter_store::SqliteOutbox::open(&outbox_path(s))
            .map_err(|e| StartError::Notify(e.to_string()))?,
    );
    let delivery = s.notify_delivery;
    let sender = NetSender::new(delivery.timeout, s.smtp.clone())
        .map_err(|e| StartError::Notify(e.to_string()))?;
    let deliverer = Deliverer::start(DeliveryLoop::new(
        Arc::clone(&outbox),
        Box::new(sender),
        Arc::new(SystemClock),
        LoopOptions {
            delivery,
            ..LoopOptions::default()
        },
    ))
    .map_err(|e| StartError::Notify(e.to_string()))?;
    let notifications = Arc::new(Notifications {
        outbox: Arc::clone(&outbox),
        deliverer: parking_lot::Mutex::new(Some(deliverer)),
    });
    let (mut engine, handle) = Engine::new(EngineParts {
        config: config_rx.clone(),
        launcher,
        joblog,
        clock: options.clock.unwrap_or_else(Clock::system),
        machines_url,
        wrapper_env: tls.wrapper_env.clone(),
        shutdown: shutdown.clone(),
        store: StoreParts::Open(db, restored),
        cluster: joining.as_ref().map(|j| j.parts.clone()),
    })
    .map_err(StartError::Store)?;
    let mut tasks = tokio::task::JoinSet::new();
    // The engine's events (missed slots, catch-ups, retries) go to every consumer of this
    // fan-out; another consumer is one more `.with(...)`. Subscribed before the engine starts,
    // so the slots its start-up scan finds missed are heard as well.
    let (events_tx, events_rx) = saltpeter_engine::event_channel();
    engine.set_event_sink(events_tx);
    let missed_to_notifier = NotifierHandle::new(seen_tx.clone());
    let events = crate::events::Fanout::default()
        .with(crate::events::log)
        .with(crate::events::count(handle.metrics().clone()))
        .with(move |event| {
            if let saltpeter_engine::EngineEvent::Missed {
                job, slot, reason, ..
            } = event
            {
                missed_to_notifier.missed(job, *slot, reason.as_str());
            }
        });
    tasks.spawn(events.run(events_rx));
    let engine_stopped = engine.run_on_own_thread().map_err(StartError::Engine)?;
    let cluster = match joining {
        Some(mut joining) => {
            joining
                .first_pass(&handle, &config_rx, FIRST_PASS_WAIT)
                .await;
            let stop = CancellationToken::new();
            let task = tokio::spawn(joining.run(handle.clone(), config_rx.clone(), stop.clone()));
            Some((stop, task))
        }
        None => None,
    };
    let mut notifier = Notifier::new(
        config_rx.clone(),
        Arc::clone(&outbox),
        {
            let n = Arc::clone(&notifications);
            Arc::new(move || n.wake())
        },
        Some(handle.clone()),
        api_base,
    );
    notifier.seed(&seed_jobs, &seed_runs, time::OffsetDateTime::now_utc());
    let notifier_task = tokio::spawn(notifier.run(seen_rx));
    {
        let n = Arc::clone(&notifications);
        handle
            .metrics()
            .set_notify_source(saltpeter_metrics::NotifySource(Arc::new(move || {
                n.figures()
            })));
    }
    // Both listeners share one open-file budget (the open count in the metrics); each has its
    // own caps on pending connections.
    let fd_limit = saltpeter_web::listen::fd_limit();
    let metrics = handle.metrics().clone();
    let machines_gate = Gate::new(
        ListenerKind::Machines,
        config_rx.clone(),
        metrics.clone(),
        fd_limit,
    );
    let api_gate = Gate::new(ListenerKind::Api, config_rx.clone(), metrics, fd_limit);
    let endpoint = saltpeter_web::endpoint::router(handle.clone());
    tasks.spawn(saltpeter_web::listen::serve_tls(
        machines_listener,
        machines_gate,
        endpoint,
        shutdown.clone(),
        tls.machines.clone(),
    ));
    let ui = saltpeter_web::ui::router(handle.clone(), config_rx.clone());
    let api = saltpeter_web::ui::protect(
        saltpeter_web::api::router(handle.clone(), config_rx.clone())
            .merge(ui)
            .merge(saltpeter_web::notifications::router(Arc::clone(&outbox))),
        config_rx.clone(),
        api_addr,
    );
    tasks.spawn(saltpeter_web::listen::serve_tls(
        api_listener,
        api_gate,
        api,
        shutdown.clone(),
        tls.api.clone(),
    ));
    tracing::info!(
        %machines_addr,
        %api_addr,
        machines_tls = tls.machines.is_some(),
        api_tls = tls.api.is_some(),
        tls_fingerprint = tls.fingerprint.map_or_else(|| "-".to_owned(), |f| f.to_string()),
        "Saltpeter master ready."
    );
    Ok(Running {
        machines_addr,
        api_addr,
        engine: handle,
        config: config_rx,
        shutdown,
        tasks,
        engine_stopped,
        watcher,
        notifications,
        notifier: NotifierHandle::new(seen_tx),
        notifier_task,
        cluster,
    })
}

/// Where the notification outbox lives: beside the SQLite store, in its file (on a connection
/// of its own), or with PostgreSQL in a private file of its own under `data_dir`, so each
/// master delivers what it queued even while the database is away.
fn outbox_path(s: &saltpeter_config::Settings) -> std::path::PathBuf {
    match &s.store {
        None => s.data_dir.join("saltpeter.db"),
        Some(_) => s.data_dir.join("notify-outbox.db"),
    }
}

/// Opens the store `s` names: PostgreSQL when `store:` is set, else SQLite under `data_dir`.
/// Logs which one, never with the password.
fn open_store(
    s: &saltpeter_config::Settings,
    retention: saltpeter_store::Retention,
    fences: Option<saltpeter_store_postgres::FenceHook>,
) -> Result<(Box<dyn saltpeter_store::Backend>, saltpeter_store::Restored), StartError> {
    match &s.store {
        None => {
            let (db, restored) =
                saltpeter_store::Store::open(&s.data_dir, retention).map_err(StartError::Store)?;
            tracing::info!(path = %s.data_dir.join("saltpeter.db").display(), "Store: SQLite.");
            Ok((Box::new(db), restored))
        }
        Some(url) => {
            let url = saltpeter_store_postgres::PostgresUrl::parse(url.expose())
                .map_err(|e| StartError::Config(format!("store: {e}")))?;
            let (mut db, restored) = saltpeter_store_postgres::PgBackend::open(&url, retention)
                .map_err(StartError::Store)?;
            if let Some(hook) = fences {
                db = db.with_fences(hook);
            }
            tracing::info!(url = %url.redacted(), "Store: PostgreSQL.");
            Ok((Box::new(db), restored))
        }
    }
}
