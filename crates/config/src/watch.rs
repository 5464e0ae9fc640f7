//! Hot reload: file events trigger a debounced rescan; a slow periodic rescan catches missed
//! events. The effective config is published through a `tokio::sync::watch` channel.
//!
//! The original re-read and re-parsed every file about twenty times a second (docs/COMPATIBILITY.md). Here the
//! file system tells us when to look: `notify` (inotify on Linux) is only a trigger, never a
//! source of truth, because its event semantics differ between platforms and editors (atomic
//! renames, truncate-then-write, Kubernetes' `..data` symlink swap). After an event the watcher
//! waits for a quiet period ([`WatchOptions::debounce`], 250 ms, but never longer than
//! [`WatchOptions::max_delay`], 1 s, while events keep coming) and then rescans the directory,
//! which costs one `stat` per file unless a file changed. Every
//! [`WatchOptions::safety_rescan`] (30 s) it also rereads every file and compares contents, in
//! case an event was lost. An idle master therefore wakes up twice a minute.
//!
//! A new config is published when jobs, settings or maintenance changed (the serial grows) or
//! when the list of problems changed (so the API can show a broken file); receivers that only
//! care about the effective config compare [`Config::serial`]. New problems are logged once with
//! `tracing::warn!`.
//!
//! The watch is on the directory, so files appearing, disappearing or being renamed over are
//! all seen. If the directory itself is deleted and recreated, the kernel watch is gone and
//! changes are picked up by the safety rescan only (within 30 s) until the master restarts.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use notify::event::{AccessKind, AccessMode};
use notify::{EventKind, RecursiveMode, Watcher};
use parking_lot::Mutex;
use tokio::sync::{Notify, watch};
use tokio::time::Instant;

use super::Config;
use super::dir::{DirLoader, LoadOutcome, ScanMode};

/// Timing of the watcher.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WatchOptions {
    /// Quiet period after the last file event before rescanning (editors write in bursts).
    pub debounce: Duration,
    /// Longest wait after the first event, even if events keep coming.
    pub max_delay: Duration,
    /// Period of the full rescan that catches missed events.
    pub safety_rescan: Duration,
    /// Period of the quick rescan used instead of file events when they are unavailable (for
    /// example when the inotify watch limit is reached).
    pub fallback_poll: Duration,
}

impl Default for WatchOptions {
    fn default() -> Self {
        WatchOptions {
            debounce: Duration::from_millis(250),
            max_delay: Duration::from_secs(1),
            safety_rescan: Duration::from_secs(30),
            fallback_poll: Duration::from_secs(1),
        }
    }
}

/// Why the watcher could not start.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    /// The config directory does not exist or is not a directory.
    #[error("the config directory {0} does not exist or is not a directory")]
    NotADirectory(PathBuf),
    /// The first load did not finish.
    #[error("the first load of the config directory failed: {0}")]
    FirstLoad(String),
}

/// Keeps the config of a directory current; dropping it stops watching.
#[derive(Debug)]
pub struct ConfigWatcher {
    rx: watch::Receiver<Arc<Config>>,
    /// Asks for a full rescan at once (a reload on request).
    reload: Arc<Notify>,
    scans: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
    /// Kept alive for as long as we watch; `None` when events are unavailable.
    _events: Option<notify::RecommendedWatcher>,
}

impl Drop for ConfigWatcher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Whether a file event can mean a changed file. Opening and reading files (our own rescans
/// included) cannot; a write that is closed can.
fn relevant(kind: &EventKind) -> bool {
    !matches!(
        kind,
        EventKind::Access(
            AccessKind::Open(_) | AccessKind::Read | AccessKind::Close(AccessMode::Read)
        )
    )
}

impl ConfigWatcher {
    /// Loads `dir` once (problems are logged), then keeps watching it from a tokio task.
    /// Must be called inside a tokio runtime.
    pub async fn start(dir: PathBuf, options: WatchOptions) -> Result<ConfigWatcher, WatchError> {
        if !dir.is_dir() {
            return Err(WatchError::NotADirectory(dir));
        }
        let loader = Arc::new(Mutex::new(DirLoader::new(dir.clone())));
        let scans = Arc::new(AtomicU64::new(0));
        let first = rescan(&loader, ScanMode::Full, &scans)
            .await
            .ok_or_else(|| WatchError::FirstLoad("the loading task failed".to_owned()))?;
        log_outcome(&first);
        // The first load is not counted: `scans` reports rescans after start-up.
        scans.store(0, Ordering::Relaxed);
        let (tx, rx) = watch::channel(Arc::clone(&first.config));

        let trigger = Arc::new(Notify::new());
        let reload = Arc::new(Notify::new());
        let events = {
            let trigger = Arc::clone(&trigger);
            notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                // An error from the backend may mean lost events: rescan to be safe.
                if event.as_ref().map_or(true, |e| relevant(&e.kind)) {
                    trigger.notify_one();
                }
            })
            .and_then(|mut w| w.watch(&dir, RecursiveMode::NonRecursive).map(|()| w))
        };
        let (events, poll) = match events {
            Ok(w) => (Some(w), None),
            Err(error) => {
                tracing::warn!(
                    dir = %dir.display(),
                    %error,
                    "Cannot watch the config directory for changes; checking it every {:?} instead.",
                    options.fallback_poll
                );
                (None, Some(options.fallback_poll))
            }
        };

        let task = tokio::spawn(run(
            loader,
            tx,
            Triggers {
                events: trigger,
                reload: Arc::clone(&reload),
            },
            Arc::clone(&scans),
            options,
            poll,
        ));
        Ok(ConfigWatcher {
            rx,
            reload,
            scans,
            task,
            _events: events,
        })
    }

    /// A receiver of every published config (the current one is marked seen).
    pub fn subscribe(&self) -> watch::Receiver<Arc<Config>> {
        let mut rx = self.rx.clone();
        rx.mark_unchanged();
        rx
    }

    /// The config published last.
    pub fn current(&self) -> Arc<Config> {
        Arc::clone(&self.rx.borrow())
    }

    /// Rereads every file now, without waiting for a debounce period (SIGHUP). What the
    /// reload found is logged like any other rescan.
    pub fn reload_now(&self) {
        self.reload.notify_one();
    }

    /// How many rescans ran since start-up (events, safety rescans and polls).
    pub fn scans(&self) -> u64 {
        self.scans.load(Ordering::Relaxed)
    }
}

/// Runs one scan off the async threads. `None` if the scan panicked (it should not; the loader
/// survives because parking_lot's mutex does not poison).
async fn rescan(
    loader: &Arc<Mutex<DirLoader>>,
    mode: ScanMode,
    scans: &AtomicU64,
) -> Option<LoadOutcome> {
    scans.fetch_add(1, Ordering::Relaxed);
    let loader = Arc::clone(loader);
    tokio::task::spawn_blocking(move || loader.lock().scan(mode))
        .await
        .ok()
}

fn log_outcome(outcome: &LoadOutcome) {
    for problem in &outcome.new_problems {
        tracing::warn!(%problem, "Config problem.");
    }
    if outcome.changed {
        tracing::info!(
            serial = outcome.config.serial,
            jobs = outcome.config.jobs.len(),
            "Config loaded."
        );
    }
}

/// What wakes the watcher besides its timers.
struct Triggers {
    /// File events (debounced, then a quick rescan).
    events: Arc<Notify>,
    /// Reloads on request (a full rescan at once).
    reload: Arc<Notify>,
}

async fn run(
    loader: Arc<Mutex<DirLoader>>,
    tx: watch::Sender<Arc<Config>>,
    triggers: Triggers,
    scans: Arc<AtomicU64>,
    options: WatchOptions,
    poll: Option<Duration>,
) {
    let mut next_safety = Instant::now() + options.safety_rescan;
    loop {
        let poll_sleep = async {
            match poll {
                Some(period) => tokio::time::sleep(period).await,
                None => std::future::pending().await,
            }
        };
        let mut requested = false;
        let mode = tokio::select! {
            () = triggers.reload.notified() => {
                requested = true;
                ScanMode::Full
            }
            () = triggers.events.notified() => {
                debounce(&triggers.events, options).await;
                ScanMode::Quick
            }
            () = poll_sleep => ScanMode::Quick,
            () = tokio::time::sleep_until(next_safety) => {
                next_safety = Instant::now() + options.safety_rescan;
                ScanMode::Full
            }
            () = tx.closed() => return,
        };
        let Some(outcome) = rescan(&loader, mode, &scans).await else {
            tracing::error!("A config rescan failed unexpectedly; the previous config stays.");
            continue;
        };
        log_outcome(&outcome);
        if requested {
            tracing::info!(
                serial = outcome.config.serial,
                jobs = outcome.config.jobs.len(),
                changed = outcome.changed,
                errors = outcome
                    .config
                    .problems
                    .iter()
                    .filter(|p| p.is_error())
                    .count(),
                "Config reread on request."
            );
        }
        if outcome.changed || outcome.problems_changed {
            tx.send_replace(outcome.config);
        }
    }
}

/// Waits until no event came for `debounce`, or `max_delay` passed since the first one.
async fn debounce(trigger: &Notify, options: WatchOptions) {
    let deadline = Instant::now() + options.max_delay;
    loop {
        let quiet_until = (Instant::now() + options.debounce).min(deadline);
        tokio::select! {
            () = trigger.notified() => {
                if Instant::now() >= deadline {
                    return;
                }
            }
            () = tokio::time::sleep_until(quiet_until) => return,
        }
    }
}
