//! Prometheus metrics of the master, rendered as the text exposition format for `GET /metrics`.
//!
//! Hand-rolled on purpose: a few atomics, two small label maps and two fixed-bucket histograms
//! cover every series the master exports, with no extra crate to build on CI's two cores.
//!
//! Ownership: the engine is the only writer (one-line increments at the call sites in
//! `engine/`), except for the store's two series, which the store thread writes, the
//! connection series in [`Listeners`], which the listeners (`listen.rs`) and the UI socket
//! tasks write, and the missed-slot and retry series, which the master's consumer of the
//! engine's events writes (`events.rs` in `sp-master`); the API reads at scrape time. Counters only ever grow. Gauges that are cheap for
//! the engine to count on demand (runs and machines running, wrappers connected) are not kept
//! here: the `/metrics` handler asks the engine for a [`Gauges`] snapshot and passes it to
//! [`Metrics::render`].
//!
//! Labels stay bounded: `job` takes values from the job files (plus jobs since removed, which
//! only grow with the number of distinct names ever configured), `code` is an exit code in
//! 0..=255 or `other`, and a missed slot's `reason` is one of three names. No instance id or machine name is ever a label.

// What no other crate uses is `pub(crate)`, so the compiler reports it once nothing calls it.
#![warn(unreachable_pub)]

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;

/// How a run ended, for `saltpeter_runs_finished_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum RunResult {
    Success,
    Failure,
    Killed,
}

impl RunResult {
    /// A run's result from its verdict; a kill takes precedence.
    pub fn of(success: bool, killed: bool) -> Self {
        match (success, killed) {
            (_, true) => RunResult::Killed,
            (true, false) => RunResult::Success,
            (false, false) => RunResult::Failure,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            RunResult::Success => "success",
            RunResult::Failure => "failure",
            RunResult::Killed => "killed",
        }
    }
}

/// Upper bounds (seconds) of the latency histograms' buckets.
const BUCKETS: [f64; 12] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// A histogram with fixed buckets; observing is a few relaxed atomic adds.
#[derive(Debug, Default)]
pub struct Histogram {
    /// Non-cumulative counts per bucket; the last slot is `+Inf`.
    buckets: [AtomicU64; BUCKETS.len() + 1],
    count: AtomicU64,
    /// Sum in microseconds, so it can be an integer atomic.
    sum_micros: AtomicU64,
}

impl Histogram {
    /// Records one observation.
    pub fn observe(&self, value: Duration) {
        let secs = value.as_secs_f64();
        let slot = BUCKETS
            .iter()
            .position(|le| secs <= *le)
            .unwrap_or(BUCKETS.len());
        self.buckets[slot].fetch_add(1, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
        let micros = u64::try_from(value.as_micros()).unwrap_or(u64::MAX);
        self.sum_micros.fetch_add(micros, Ordering::Relaxed);
    }

    /// Records a wall-clock difference; a negative one (the clock stepped back) counts as 0.
    pub fn observe_wall(&self, value: time::Duration) {
        self.observe(Duration::try_from(value).unwrap_or_default());
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} histogram");
        let mut cumulative = 0;
        for (i, le) in BUCKETS.iter().enumerate() {
            cumulative += self.buckets[i].load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {cumulative}");
        }
        cumulative += self.buckets[BUCKETS.len()].load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cumulative}");
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum {sum}");
        let _ = writeln!(out, "{name}_count {cumulative}");
    }
}

/// Every counter and histogram of the master.
#[derive(Debug, Default)]
pub struct Metrics {
    runs_started: Mutex<BTreeMap<String, u64>>,
    runs_finished: Mutex<BTreeMap<(String, RunResult), u64>>,
    machine_results: Mutex<BTreeMap<(String, String), u64>>,
    /// Keyed by job and reason (`master_down`, `overlap`, `maintenance`).
    missed_slots: Mutex<BTreeMap<(String, &'static str), u64>>,
    retries: Mutex<BTreeMap<String, u64>>,
    heartbeat_timeouts: AtomicU64,
    launch_failures: AtomicU64,
    output_bytes: AtomicU64,
    /// Among several masters: jobs this master took over, and jobs it stopped acting for.
    takeovers: AtomicU64,
    leases_lost: AtomicU64,
    /// From a run's fire to each machine's `start`.
    pub fire_to_start: Histogram,
    /// How late the engine acted on its scheduler timer.
    pub scheduler_lag: Histogram,
    /// From reading an `output` off the socket to queueing its ack (after the store commit).
    pub output_ack: Histogram,
    /// From reading an `output` off the socket to writing its ack to the socket: the above
    /// plus the wait for the connection's task (written by connection tasks).
    pub output_ack_written: Histogram,
    /// How long the store took to apply and commit each batch (written by the store thread).
    pub store_commit: Histogram,
    /// Writes the store has applied (written by the store thread).
    store_ops: AtomicU64,
    /// Connections of both listeners (written by `listen.rs` and the UI socket tasks).
    pub listeners: Listeners,
    /// Where the notification series are read when scraped (set by the master's wiring).
    notifications: Mutex<Option<NotifySource>>,
}

/// What the notification outbox and its deliverer report for `/metrics`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NotifyFigures {
    /// Notifications delivered since the master started.
    pub delivered: u64,
    /// Attempts that failed (each retry counts) since the master started.
    pub failed_attempts: u64,
    /// Notifications given up on since the master started.
    pub gave_up: u64,
    /// Notifications dropped by the per-job rate limit since the master started.
    pub rate_limited: u64,
    /// Rows waiting in the outbox now.
    pub pending: u64,
}

/// A reader of [`NotifyFigures`]; it is called on the scraping task, so it must be quick (a
/// few atomics and one indexed count).
#[derive(Clone)]
pub struct NotifySource(pub std::sync::Arc<dyn Fn() -> NotifyFigures + Send + Sync>);

impl std::fmt::Debug for NotifySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NotifySource")
    }
}

/// Which listener a connection came in on, for the connection series' `listener` label.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ListenerKind {
    /// The machines endpoint (wrappers).
    Machines,
    /// The HTTP API and the UI WebSocket.
    Api,
}

impl ListenerKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ListenerKind::Machines => "machines",
            ListenerKind::Api => "api",
        }
    }

    fn index(self) -> usize {
        match self {
            ListenerKind::Machines => 0,
            ListenerKind::Api => 1,
        }
    }
}

/// Why a listener closed a connection the moment it accepted it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Refusal {
    /// `max_pending_connections` connections were already pending.
    Pending,
    /// `max_pending_connections_per_ip` connections from the same address were pending.
    PendingPerIp,
    /// Open sockets had reached the open-file limit less `fd_reserve`.
    FdReserve,
}

impl Refusal {
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::Pending => "pending",
            Refusal::PendingPerIp => "pending_per_ip",
            Refusal::FdReserve => "fd_reserve",
        }
    }

    fn index(self) -> usize {
        match self {
            Refusal::Pending => 0,
            Refusal::PendingPerIp => 1,
            Refusal::FdReserve => 2,
        }
    }
}

/// Connection counters and gauges of both listeners; every label set is fixed, so these are
/// plain atomics.
#[derive(Debug, Default)]
pub struct Listeners {
    /// Sockets open on either listener (a gauge).
    pub open: AtomicU64,
    /// Connections that have not finished their handshake, by listener (gauges).
    pending: [AtomicU64; 2],
    /// Connections closed at once, by listener and reason.
    refused: [[AtomicU64; 3]; 2],
    /// Connections closed for missing their handshake or header deadline, by listener.
    timed_out: [AtomicU64; 2],
    /// UI sockets closed for want of any frame from the browser.
    pub ui_idle_closed: AtomicU64,
}

impl Listeners {
    pub fn refused(&self, listener: ListenerKind, why: Refusal) {
        self.refused[listener.index()][why.index()].fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn refused_count(&self, listener: ListenerKind, why: Refusal) -> u64 {
        self.refused[listener.index()][why.index()].load(Ordering::Relaxed)
    }

    pub fn timed_out(&self, listener: ListenerKind) {
        self.timed_out[listener.index()].fetch_add(1, Ordering::Relaxed);
    }

    pub fn pending(&self, listener: ListenerKind) -> &AtomicU64 {
        &self.pending[listener.index()]
    }

    fn render(&self, out: &mut String) {
        const KINDS: [ListenerKind; 2] = [ListenerKind::Machines, ListenerKind::Api];
        const WHYS: [Refusal; 3] = [Refusal::Pending, Refusal::PendingPerIp, Refusal::FdReserve];
        scalar(
            out,
            "saltpeter_connections_open",
            "gauge",
            "Sockets open on the machines and API listeners.",
            self.open.load(Ordering::Relaxed),
        );
        counter_map_typed(
            out,
            "saltpeter_connections_pending",
            "gauge",
            "Connections that have not finished their handshake, by listener.",
            KINDS.iter().map(|k| {
                let n = self.pending(*k).load(Ordering::Relaxed);
                (vec![("listener", k.as_str())], n)
            }),
        );
        counter_map(
            out,
            "saltpeter_connections_refused_total",
            "Connections closed as soon as accepted, by listener and reason (pending, pending_per_ip, fd_reserve).",
            KINDS.iter().flat_map(|k| {
                WHYS.iter().map(move |w| {
                    let n = self.refused_count(*k, *w);
                    (vec![("listener", k.as_str()), ("reason", w.as_str())], n)
                })
            }),
        );
        counter_map(
            out,
            "saltpeter_connections_timed_out_total",
            "Connections closed for missing the handshake or header deadline, by listener.",
            KINDS.iter().map(|k| {
                let n = self.timed_out[k.index()].load(Ordering::Relaxed);
                (vec![("listener", k.as_str())], n)
            }),
        );
        scalar(
            out,
            "saltpeter_ui_idle_closed_total",
            "counter",
            "UI WebSockets closed after ui_idle_timeout without a frame from the browser.",
            self.ui_idle_closed.load(Ordering::Relaxed),
        );
    }
}

/// One job's times for the monitoring stack's staleness alerts, as Unix seconds.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct JobTimes {
    pub job: String,
    pub last_success: Option<i64>,
    pub last_run: Option<i64>,
    pub next_run: Option<i64>,
}

/// Gauges the engine counts when scraped.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Gauges {
    pub runs_running: u64,
    pub machines_running: u64,
    pub wrappers_connected: u64,
    /// Tasks waiting in the main runtime's shared (injection) queue: woken from outside its
    /// workers, or spilled from a worker's full run queue. A standing backlog here means
    /// connection tasks wait their turn far longer than the work they do (docs/PERFORMANCE.md).
    pub runtime_injection_queue: u64,
    /// Every configured job's times.
    pub jobs: Vec<JobTimes>,
    /// When the engine last took in a configuration, and whether it had no errors.
    pub config_reload: Option<(i64, bool)>,
    /// Among several masters: the jobs this master acts for and the live masters it knows.
    pub cluster: Option<ClusterGauges>,
}

/// What `/metrics` says of a master among several.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClusterGauges {
    pub jobs_held: u64,
    pub masters_live: u64,
}

impl Metrics {
    /// A run was fired.
    pub fn run_started(&self, job: &str) {
        *self.runs_started.lock().entry(job.to_owned()).or_default() += 1;
    }

    /// A run ended.
    pub fn run_finished(&self, job: &str, result: RunResult) {
        *self
            .runs_finished
            .lock()
            .entry((job.to_owned(), result))
            .or_default() += 1;
    }

    /// A machine got its final exit code.
    pub fn machine_result(&self, job: &str, code: i64) {
        let code = if (0..=255).contains(&code) {
            code.to_string()
        } else {
            "other".to_owned()
        };
        *self
            .machine_results
            .lock()
            .entry((job.to_owned(), code))
            .or_default() += 1;
    }

    /// `count` cron slots of a job did not run, for `reason`. The reason is one of a fixed set
    /// of names, so the label stays bounded.
    pub fn missed_slots(&self, job: &str, reason: &'static str, count: u64) {
        let mut map = self.missed_slots.lock();
        let n = map.entry((job.to_owned(), reason)).or_default();
        *n = n.saturating_add(count);
    }

    /// A machine's attempt failed and the machine will be launched again.
    pub fn retry(&self, job: &str) {
        *self.retries.lock().entry(job.to_owned()).or_default() += 1;
    }

    /// The monitor marked a machine 253.
    pub fn heartbeat_timeout(&self) {
        self.heartbeat_timeouts.fetch_add(1, Ordering::Relaxed);
    }

    /// This master took a job over (gained its lease and loaded its runs).
    pub fn takeover(&self) {
        self.takeovers.fetch_add(1, Ordering::Relaxed);
    }

    /// This master stopped acting for a job (released, taken by another master, or run out
    /// by its own clock).
    pub fn lease_lost(&self) {
        self.leases_lost.fetch_add(1, Ordering::Relaxed);
    }

    /// A launcher reported that a wrapper could not be started.
    pub fn launch_failure(&self) {
        self.launch_failures.fetch_add(1, Ordering::Relaxed);
    }

    /// Output text received from wrappers.
    pub fn output(&self, bytes: usize) {
        self.output_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    /// The store applied a batch of `ops` writes.
    pub fn store_ops(&self, ops: usize) {
        self.store_ops.fetch_add(ops as u64, Ordering::Relaxed);
    }

    /// Where the notification series come from; without a source they are not rendered.
    pub fn set_notify_source(&self, source: NotifySource) {
        *self.notifications.lock() = Some(source);
    }

    fn render_notifications(&self, out: &mut String) {
        let Some(source) = self.notifications.lock().clone() else {
            return;
        };
        let f = (source.0)();
        for (name, kind, help, value) in [
            (
                "saltpeter_notifications_delivered_total",
                "counter",
                "Notifications delivered.",
                f.delivered,
            ),
            (
                "saltpeter_notifications_failed_attempts_total",
                "counter",
                "Notification attempts that failed (each retry counts).",
                f.failed_attempts,
            ),
            (
                "saltpeter_notifications_gave_up_total",
                "counter",
                "Notifications given up on (attempts exhausted or refused for good).",
                f.gave_up,
            ),
            (
                "saltpeter_notifications_rate_limited_total",
                "counter",
                "Notifications dropped by the per-job rate limit.",
                f.rate_limited,
            ),
            (
                "saltpeter_notifications_pending",
                "gauge",
                "Notifications waiting in the outbox.",
                f.pending,
            ),
        ] {
            scalar(out, name, kind, help, value);
        }
    }

    /// The whole exposition text.
    pub fn render(&self, gauges: &Gauges) -> String {
        let mut out = String::with_capacity(4096);
        // Per-job labels are `job_name`: Prometheus attaches its own `job` label to every
        // series it scrapes (the scrape job), and the two would collide.
        let _ = writeln!(
            out,
            "# HELP saltpeter_build_info The running sp-master's version.\n# TYPE saltpeter_build_info gauge\nsaltpeter_build_info{{version=\"{}\"}} 1",
            escape_label(env!("CARGO_PKG_VERSION"))
        );
        if let Some((at, ok)) = gauges.config_reload {
            scalar(
                &mut out,
                "saltpeter_config_last_reload_successful",
                "gauge",
                "Whether the configuration taken in last loaded without errors (1) or not (0).",
                u64::from(ok),
            );
            let _ = writeln!(
                out,
                "# HELP saltpeter_config_last_reload_timestamp_seconds When the engine last took in a configuration.\n# TYPE saltpeter_config_last_reload_timestamp_seconds gauge\nsaltpeter_config_last_reload_timestamp_seconds {at}"
            );
        }
        job_times(&mut out, &gauges.jobs);
        counter_map(
            &mut out,
            "saltpeter_runs_started_total",
            "Runs fired, by job.",
            self.runs_started
                .lock()
                .iter()
                .map(|(job, n)| (vec![("job_name", job.as_str())], *n)),
        );
        counter_map(
            &mut out,
            "saltpeter_runs_finished_total",
            "Runs ended, by job and result (success, failure, killed).",
            self.runs_finished.lock().iter().map(|((job, r), n)| {
                (vec![("job_name", job.as_str()), ("result", r.as_str())], *n)
            }),
        );
        counter_map(
            &mut out,
            "saltpeter_machine_results_total",
            "Machines that got a final exit code, by job and code.",
            self.machine_results.lock().iter().map(|((job, code), n)| {
                (
                    vec![("job_name", job.as_str()), ("code", code.as_str())],
                    *n,
                )
            }),
        );
        counter_map(
            &mut out,
            "saltpeter_missed_slots_total",
            "Cron slots that did not run, by job and reason (master_down, overlap, maintenance).",
            self.missed_slots.lock().iter().map(|((job, reason), n)| {
                (vec![("job_name", job.as_str()), ("reason", *reason)], *n)
            }),
        );
        counter_map(
            &mut out,
            "saltpeter_retries_total",
            "Failed machine attempts that were retried, by job.",
            self.retries
                .lock()
                .iter()
                .map(|(job, n)| (vec![("job_name", job.as_str())], *n)),
        );
        scalar(
            &mut out,
            "saltpeter_heartbeat_timeouts_total",
            "counter",
            "Machines marked 253 for want of a heartbeat.",
            self.heartbeat_timeouts.load(Ordering::Relaxed),
        );
        if let Some(c) = gauges.cluster {
            for (name, kind, help, value) in [
                (
                    "saltpeter_cluster_jobs_held",
                    "gauge",
                    "Jobs this master acts for (holds the lease of and has loaded).",
                    c.jobs_held,
                ),
                (
                    "saltpeter_cluster_masters_live",
                    "gauge",
                    "Live masters this one saw at its last coordination pass, itself included.",
                    c.masters_live,
                ),
                (
                    "saltpeter_cluster_takeovers_total",
                    "counter",
                    "Jobs this master took over from the database.",
                    self.takeovers.load(Ordering::Relaxed),
                ),
                (
                    "saltpeter_cluster_leases_lost_total",
                    "counter",
                    "Jobs this master stopped acting for (released, taken by another master, or run out by its own clock).",
                    self.leases_lost.load(Ordering::Relaxed),
                ),
            ] {
                scalar(&mut out, name, kind, help, value);
            }
        }
        scalar(
            &mut out,
            "saltpeter_launch_failures_total",
            "counter",
            "Wrappers the launcher could not start.",
            self.launch_failures.load(Ordering::Relaxed),
        );
        scalar(
            &mut out,
            "saltpeter_output_bytes_total",
            "counter",
            "Bytes of job output received from wrappers.",
            self.output_bytes.load(Ordering::Relaxed),
        );
        scalar(
            &mut out,
            "saltpeter_store_ops_total",
            "counter",
            "Writes applied to the store (outputs, run and machine updates).",
            self.store_ops.load(Ordering::Relaxed),
        );
        scalar(
            &mut out,
            "saltpeter_runs_running",
            "gauge",
            "Runs that have not ended.",
            gauges.runs_running,
        );
        scalar(
            &mut out,
            "saltpeter_machines_running",
            "gauge",
            "Machines whose wrapper reported start and that have not ended.",
            gauges.machines_running,
        );
        scalar(
            &mut out,
            "saltpeter_wrappers_connected",
            "gauge",
            "Open wrapper connections on the machines endpoint.",
            gauges.wrappers_connected,
        );
        scalar(
            &mut out,
            "saltpeter_runtime_injection_queue_depth",
            "gauge",
            "Tasks waiting in the runtime's shared queue when scraped.",
            gauges.runtime_injection_queue,
        );
        self.listeners.render(&mut out);
        self.render_notifications(&mut out);
        self.fire_to_start.render(
            &mut out,
            "saltpeter_fire_to_start_seconds",
            "Time from a run's fire to each machine's start message.",
        );
        self.scheduler_lag.render(
            &mut out,
            "saltpeter_scheduler_lag_seconds",
            "How late the engine woke for a scheduler deadline.",
        );
        self.output_ack.render(
            &mut out,
            "saltpeter_output_ack_seconds",
            "Time from reading an output message to queueing its ack, which waits for the store.",
        );
        self.output_ack_written.render(
            &mut out,
            "saltpeter_output_ack_written_seconds",
            "Time from reading an output message to writing its ack to the wrapper's socket.",
        );
        self.store_commit.render(
            &mut out,
            "saltpeter_store_commit_seconds",
            "Time the store took to apply and commit one batch (group commit).",
        );
        out
    }
}

/// The three per-job timestamps; a job without a value (never ran, no next slot) has no
/// sample, so an alert on `time() - x` sees it absent rather than at the epoch.
fn job_times(out: &mut String, jobs: &[JobTimes]) {
    type Pick = fn(&JobTimes) -> Option<i64>;
    let series: [(&str, &str, Pick); 3] = [
        (
            "saltpeter_job_last_success_timestamp_seconds",
            "When the job's latest successful run ended.",
            |j| j.last_success,
        ),
        (
            "saltpeter_job_last_run_timestamp_seconds",
            "When the job's latest run started.",
            |j| j.last_run,
        ),
        (
            "saltpeter_job_next_run_timestamp_seconds",
            "When the job's next scheduled slot is.",
            |j| j.next_run,
        ),
    ];
    for (name, help, pick) in series {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} gauge");
        for job in jobs {
            if let Some(value) = pick(job) {
                let _ = writeln!(
                    out,
                    "{name}{{job_name=\"{}\"}} {value}",
                    escape_label(&job.job)
                );
            }
        }
    }
}

fn scalar(out: &mut String, name: &str, kind: &str, help: &str, value: u64) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
    let _ = writeln!(out, "{name} {value}");
}

fn counter_map<'a>(
    out: &mut String,
    name: &str,
    help: &str,
    rows: impl Iterator<Item = (Vec<(&'a str, &'a str)>, u64)>,
) {
    counter_map_typed(out, name, "counter", help, rows);
}

/// A labelled series of any type (`counter` or `gauge`).
fn counter_map_typed<'a>(
    out: &mut String,
    name: &str,
    kind: &str,
    help: &str,
    rows: impl Iterator<Item = (Vec<(&'a str, &'a str)>, u64)>,
) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
    for (labels, value) in rows {
        let labels: Vec<String> = labels
            .iter()
            .map(|(k, v)| format!("{k}=\"{}\"", escape_label(v)))
            .collect();
        let _ = writeln!(out, "{name}{{{}}} {value}", labels.join(","));
    }
}

/// Escapes a label value as the exposition format requires.
fn escape_label(v: &str) -> String {
    let mut s = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '"' => s.push_str("\\\""),
            '\n' => s.push_str("\\n"),
            c => s.push(c),
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_gauges_and_histograms() {
        let m = Metrics::default();
        m.run_started("backup");
        m.run_started("backup");
        m.run_finished("backup", RunResult::Killed);
        m.machine_result("backup", 143);
        m.machine_result("backup", -9);
        m.missed_slots("backup", "master_down", 1);
        m.missed_slots("backup", "master_down", 3);
        m.retry("backup");
        m.heartbeat_timeout();
        m.launch_failure();
        m.output(10);
        m.output(5);
        m.fire_to_start.observe(Duration::from_millis(30));
        m.fire_to_start.observe(Duration::from_secs(100));
        m.store_ops(7);
        m.store_commit.observe(Duration::from_millis(3));
        m.takeover();
        m.lease_lost();
        m.lease_lost();
        let text = m.render(&Gauges {
            runs_running: 1,
            machines_running: 2,
            wrappers_connected: 3,
            runtime_injection_queue: 4,
            jobs: vec![
                JobTimes {
                    job: "backup".into(),
                    last_success: Some(1_796_500_000),
                    last_run: Some(1_796_520_000),
                    next_run: Some(1_796_523_600),
                },
                JobTimes {
                    job: "never".into(),
                    next_run: Some(1_796_600_000),
                    ..JobTimes::default()
                },
            ],
            config_reload: Some((1_796_510_000, false)),
            cluster: Some(ClusterGauges {
                jobs_held: 5,
                masters_live: 3,
            }),
        });
        for line in [
            "saltpeter_runs_started_total{job_name=\"backup\"} 2",
            "saltpeter_runs_finished_total{job_name=\"backup\",result=\"killed\"} 1",
            "saltpeter_machine_results_total{job_name=\"backup\",code=\"143\"} 1",
            "saltpeter_machine_results_total{job_name=\"backup\",code=\"other\"} 1",
            "saltpeter_missed_slots_total{job_name=\"backup\",reason=\"master_down\"} 4",
            "saltpeter_retries_total{job_name=\"backup\"} 1",
            "saltpeter_job_last_success_timestamp_seconds{job_name=\"backup\"} 1796500000",
            "saltpeter_job_last_run_timestamp_seconds{job_name=\"backup\"} 1796520000",
            "saltpeter_job_next_run_timestamp_seconds{job_name=\"backup\"} 1796523600",
            "saltpeter_job_next_run_timestamp_seconds{job_name=\"never\"} 1796600000",
            "saltpeter_config_last_reload_successful 0",
            "saltpeter_config_last_reload_timestamp_seconds 1796510000",
            "# TYPE saltpeter_job_last_success_timestamp_seconds gauge",
            "saltpeter_heartbeat_timeouts_total 1",
            "saltpeter_cluster_jobs_held 5",
            "saltpeter_cluster_masters_live 3",
            "saltpeter_cluster_takeovers_total 1",
            "saltpeter_cluster_leases_lost_total 2",
            "saltpeter_launch_failures_total 1",
            "saltpeter_output_bytes_total 15",
            "saltpeter_machines_running 2",
            "saltpeter_wrappers_connected 3",
            "saltpeter_runtime_injection_queue_depth 4",
            "saltpeter_fire_to_start_seconds_bucket{le=\"0.025\"} 0",
            "saltpeter_fire_to_start_seconds_bucket{le=\"0.05\"} 1",
            "saltpeter_fire_to_start_seconds_bucket{le=\"30\"} 1",
            "saltpeter_fire_to_start_seconds_bucket{le=\"+Inf\"} 2",
            "saltpeter_fire_to_start_seconds_count 2",
            "saltpeter_fire_to_start_seconds_sum 100.03",
            "saltpeter_scheduler_lag_seconds_count 0",
            "saltpeter_store_ops_total 7",
            "saltpeter_store_commit_seconds_bucket{le=\"0.005\"} 1",
            "# TYPE saltpeter_runs_running gauge",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
        assert!(
            text.lines()
                .any(|l| l.starts_with("saltpeter_build_info{version=\"") && l.ends_with("} 1"))
        );
        // A job that never succeeded has no sample, not one at the epoch.
        assert!(!text.contains("last_success_timestamp_seconds{job_name=\"never\"}"));
        assert!(!text.contains("{job=\""), "the per-job label is job_name");
        // Every sample line is `name{labels} value` or `name value`.
        for l in text.lines().filter(|l| !l.starts_with('#')) {
            let value = l.rsplit(' ').next().unwrap_or_default();
            assert!(value.parse::<f64>().is_ok(), "bad sample {l:?}");
        }
    }

    #[test]
    fn notification_series_are_read_from_their_source_when_scraped() {
        let m = Metrics::default();
        let gauges = Gauges::default();
        assert!(!m.render(&gauges).contains("saltpeter_notifications_"));
        m.set_notify_source(NotifySource(std::sync::Arc::new(|| NotifyFigures {
            delivered: 3,
            failed_attempts: 2,
            gave_up: 1,
            rate_limited: 4,
            pending: 5,
        })));
        let text = m.render(&gauges);
        for line in [
            "saltpeter_notifications_delivered_total 3",
            "saltpeter_notifications_failed_attempts_total 2",
            "saltpeter_notifications_gave_up_total 1",
            "saltpeter_notifications_rate_limited_total 4",
            "saltpeter_notifications_pending 5",
            "# TYPE saltpeter_notifications_pending gauge",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?}");
        }
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape_label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
