//! The notifier: turns what the engine did to runs into [`Alert`]s, and alerts into rows of the
//! notification outbox, which the deliverer thread sends.
//!
//! It sits outside the engine, as a sibling of the job log: the job-log thread shows it every
//! entry through a tap ([`tap`]), which hands on a run's start and its end (with the verdict)
//! over a bounded channel to [`Notifier::run`], a task on the main runtime. The engine is not
//! changed and never waits for it. What it decides:
//!
//! - **failure**: a run ended with any machine's result other than 0 (a killed run included);
//!   each machine is reported with its code and cause, read from the engine's view of the
//!   finished run;
//! - **recovery**: the first successful run of a job after a failed one. The last outcome per
//!   job is seeded from the store's job records when the master starts, so a failure before a
//!   restart and a success after it still make a recovery;
//! - **running too long**: a run still going `warn_after` after it started, once per run. The
//!   deadline is on tokio's monotonic clock; runs restored after a restart get theirs from their
//!   stored start time;
//! - **missed**: [`alert_for_missed`] builds the alert and [`NotifierHandle::missed`] enqueues
//!   it, for the engine's missed-slot events.
//!
//! Every alert goes through the job's rules (its own `notify:` list, else the settings'),
//! [`notifications_for`] renders one notification per destination, and each is enqueued by its
//! idempotency key, so an event noticed twice (a run concluded again after a restart) is still
//! delivered once. Enqueueing writes SQLite, so it runs on a blocking thread.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use time::OffsetDateTime;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use saltpeter_config::Config;
use saltpeter_engine::{ApiRequest, EngineHandle};
use saltpeter_joblog::LogEntry;
use saltpeter_notify::{Alert, MachineResult, NotifyOn, Outbox, notifications_for};
use saltpeter_store::{JobRecord, RunRecord, RunView};

/// Entries waiting for the notifier. A run's start and end are two entries; a fuller queue
/// means the notifier is stuck (its enqueues wait on the database), and further entries are
/// dropped with a warning rather than held in memory without bound.
pub const QUEUE: usize = 4096;

/// What the notifier hears about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seen {
    /// A run started at `at` (the master's wall clock).
    Started {
        job: String,
        instance: String,
        at: OffsetDateTime,
    },
    /// A run ended with its verdict.
    Ended {
        job: String,
        instance: String,
        at: OffsetDateTime,
        total: usize,
        failed: usize,
        success: bool,
    },
    /// A slot of `job` did not fire, and why.
    Missed {
        job: String,
        slot: OffsetDateTime,
        reason: String,
    },
}

/// The job log's tap: hands run starts and ends to the notifier without waiting.
pub fn tap(tx: mpsc::Sender<Seen>) -> saltpeter_joblog::Tap {
    Box::new(move |entry: &LogEntry| {
        let seen = match entry {
            LogEntry::Start { job, instance, at } => Seen::Started {
                job: job.clone(),
                instance: instance.clone(),
                at: *at,
            },
            LogEntry::End {
                job,
                instance,
                at,
                total,
                failed,
                success,
            } => Seen::Ended {
                job: job.clone(),
                instance: instance.clone(),
                at: *at,
                total: *total,
                failed: *failed,
                success: *success,
            },
            _ => return,
        };
        if let Err(mpsc::error::TrySendError::Full(seen)) = tx.try_send(seen) {
            tracing::warn!(?seen, "Notifier queue full; this event is not notified.");
        }
    })
}

/// A way into the notifier from elsewhere in the master (the engine's missed-slot events).
#[derive(Debug, Clone)]
pub struct NotifierHandle {
    tx: mpsc::Sender<Seen>,
}

impl NotifierHandle {
    pub fn new(tx: mpsc::Sender<Seen>) -> Self {
        NotifierHandle { tx }
    }

    /// `job`'s slot `slot` was missed for `reason`: a `missed` alert, enqueued by the notifier.
    /// Never waits; a full queue drops it with a warning.
    pub fn missed(&self, job: &str, slot: OffsetDateTime, reason: &str) {
        let seen = Seen::Missed {
            job: job.to_owned(),
            slot,
            reason: reason.to_owned(),
        };
        if let Err(mpsc::error::TrySendError::Full(seen)) = self.tx.try_send(seen) {
            tracing::warn!(?seen, "Notifier queue full; this event is not notified.");
        }
    }
}

/// The cause an alert names for a machine's result: the command's own exit, or the master's
/// verdict by its code (253 no heartbeat, 254 never started, 124 timeout, 143 killed, 255
/// error). A command that itself exits 124 is an `exit` when the engine knows so.
pub fn cause_of(code: i64, engine_cause: Option<&str>) -> &'static str {
    if matches!(engine_cause, Some("exit" | "signal")) {
        return "exit";
    }
    match code {
        253 => "heartbeat_lost",
        254 => "not_started",
        124 => "timeout",
        143 => "killed",
        255 => "error",
        _ => "exit",
    }
}

/// The machines of a finished run, as an alert lists them (machines without a result are
/// left out: the run ended without them).
pub fn machines_of(view: &RunView) -> Vec<MachineResult> {
    view.machines
        .iter()
        .filter_map(|(name, m)| {
            m.retcode.map(|code| MachineResult {
                machine: name.clone(),
                code,
                cause: cause_of(code, m.cause).to_owned(),
            })
        })
        .collect()
}

/// Percent-encodes what is not safe in a URL fragment.
fn fragment(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Where a person looks at a run: the dashboard's page of it.
pub fn run_link(base: &str, instance: &str) -> String {
    format!(
        "{}/#/run/{}",
        base.trim_end_matches('/'),
        fragment(instance)
    )
}

/// The alert for a missed slot of `job`, noticed at `at`.
pub fn alert_for_missed(
    job: &str,
    slot: OffsetDateTime,
    reason: &str,
    at: OffsetDateTime,
    base: &str,
) -> Alert {
    Alert {
        event: NotifyOn::Missed,
        job: job.to_owned(),
        instance: None,
        at,
        slot: Some(slot),
        machines: Vec::new(),
        detail: Some(reason.to_owned()),
        link: Some(format!("{}/", base.trim_end_matches('/'))),
    }
}

/// The alert for a run that is still going `after` its start.
pub fn alert_for_overdue(
    job: &str,
    instance: &str,
    started: OffsetDateTime,
    after: Duration,
    base: &str,
) -> Alert {
    Alert {
        event: NotifyOn::RunningTooLong,
        job: job.to_owned(),
        instance: Some(instance.to_owned()),
        at: saltpeter_notify::shift(started, after, false),
        slot: None,
        machines: Vec::new(),
        detail: Some(format!(
            "still running {} s after it started (warn_after)",
            after.as_secs()
        )),
        link: Some(run_link(base, instance)),
    }
}

/// A run's live state the notifier keeps: its job, start, and its `warn_after` deadline.
#[derive(Debug)]
struct Running {
    job: String,
    started: OffsetDateTime,
    deadline: Option<(Instant, Duration)>,
}

/// What is decided from what was seen.
pub struct Notifier {
    config: watch::Receiver<Arc<Config>>,
    outbox: Arc<dyn Outbox>,
    wake: Arc<dyn Fn() + Send + Sync>,
    engine: Option<EngineHandle>,
    /// The dashboard's address, for links.
    base: String,
    /// Whether each job's latest finished run succeeded.
    last_success: HashMap<String, bool>,
    running: HashMap<String, Running>,
    /// `warn_after` deadlines of running runs, earliest first.
    deadlines: BTreeMap<(Instant, String), ()>,
}

impl std::fmt::Debug for Notifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Notifier")
            .field("base", &self.base)
            .field("running", &self.running.len())
            .finish_non_exhaustive()
    }
}

impl Notifier {
    /// A notifier over `outbox`; `wake` tells the deliverer to look, `engine` (when given)
    /// answers which machines a finished run had.
    pub fn new(
        config: watch::Receiver<Arc<Config>>,
        outbox: Arc<dyn Outbox>,
        wake: Arc<dyn Fn() + Send + Sync>,
        engine: Option<EngineHandle>,
        base: String,
    ) -> Self {
        Notifier {
            config,
            outbox,
            wake,
            engine,
            base,
            last_success: HashMap::new(),
            running: HashMap::new(),
            deadlines: BTreeMap::new(),
        }
    }

    /// Takes in what the store restored: each job's last outcome (for recoveries across a
    /// restart) and the runs still going (for their `warn_after`). `now` is the wall clock.
    pub fn seed<'a>(
        &mut self,
        jobs: &[JobRecord],
        runs: impl IntoIterator<Item = &'a RunRecord>,
        now: OffsetDateTime,
    ) {
        for job in jobs {
            if let Some(success) = job.last_success {
                self.last_success.insert(job.name.clone(), success);
            }
        }
        for run in runs {
            if run.ended.is_none() {
                let elapsed = Duration::try_from(now - run.started).unwrap_or(Duration::ZERO);
                self.started(&run.job, &run.instance, run.started, elapsed);
            }
        }
    }

    fn warn_after(&self, job: &str) -> Option<Duration> {
        self.config
            .borrow()
            .jobs
            .get(job)
            .and_then(|j| j.warn_after)
    }

    /// A run began `elapsed` ago.
    fn started(&mut self, job: &str, instance: &str, at: OffsetDateTime, elapsed: Duration) {
        let deadline = self.warn_after(job).map(|after| {
            let left = after.saturating_sub(elapsed);
            // A deadline past the clock's range never comes, like the monitor's.
            let when = Instant::now()
                .checked_add(left)
                .unwrap_or_else(|| Instant::now() + Duration::from_secs(365 * 86_400));
            (when, after)
        });
        if let Some((when, _)) = deadline {
            self.deadlines.insert((when, instance.to_owned()), ());
        }
        if let Some(old) = self.running.insert(
            instance.to_owned(),
            Running {
                job: job.to_owned(),
                started: at,
                deadline,
            },
        ) && let Some((when, _)) = old.deadline
        {
            self.deadlines.remove(&(when, instance.to_owned()));
        }
    }

    /// Handles entries until the channel closes (the job log stopped). `warn_after` deadlines
    /// are served in between.
    pub async fn run(mut self, mut rx: mpsc::Receiver<Seen>) {
        loop {
            let next = self.deadlines.keys().next().map(|(when, _)| *when);
            tokio::select! {
                seen = rx.recv() => match seen {
                    Some(seen) => self.handle(seen).await,
                    None => break,
                },
                () = async {
                    match next {
                        Some(when) => tokio::time::sleep_until(when).await,
                        None => std::future::pending().await,
                    }
                } => self.overdue().await,
            }
        }
    }

    /// One entry.
    pub async fn handle(&mut self, seen: Seen) {
        match seen {
            Seen::Started { job, instance, at } => {
                self.started(&job, &instance, at, Duration::ZERO);
            }
            Seen::Ended {
                job,
                instance,
                at,
                total,
                failed,
                success,
            } => {
                if let Some(run) = self.running.remove(&instance)
                    && let Some((when, _)) = run.deadline
                {
                    self.deadlines.remove(&(when, instance.clone()));
                }
                self.ended(job, instance, at, total, failed, success).await;
            }
            Seen::Missed { job, slot, reason } => {
                let alert =
                    alert_for_missed(&job, slot, &reason, OffsetDateTime::now_utc(), &self.base);
                self.enqueue(alert).await;
            }
        }
    }

    async fn ended(
        &mut self,
        job: String,
        instance: String,
        at: OffsetDateTime,
        total: usize,
        failed: usize,
        success: bool,
    ) {
        if total == 0 {
            // Nothing ran (no target matched, or every one was in maintenance): neither a
            // failure of the job nor a recovery.
            return;
        }
        let was = self.last_success.insert(job.clone(), success);
        let event = if !success {
            NotifyOn::Failure
        } else if was == Some(false) {
            NotifyOn::Recovery
        } else {
            return;
        };
        let machines = match &self.engine {
            Some(engine) => {
                let asked = instance.clone();
                engine
                    .ask(|reply| ApiRequest::GetRun {
                        instance: asked,
                        reply,
                    })
                    .await
                    .flatten()
                    .map(|view| machines_of(&view))
                    .unwrap_or_default()
            }
            None => Vec::new(),
        };
        let detail = (machines.is_empty() && failed > 0)
            .then(|| format!("{failed} of {total} machines failed"));
        let link = Some(run_link(&self.base, &instance));
        let alert = Alert {
            event,
            job,
            instance: Some(instance),
            at,
            slot: None,
            machines,
            detail,
            link,
        };
        self.enqueue(alert).await;
    }

    /// Raises `running_too_long` for every run whose deadline has come.
    async fn overdue(&mut self) {
        let now = Instant::now();
        while let Some(((when, instance), ())) = self.deadlines.pop_first() {
            if when > now {
                self.deadlines.insert((when, instance), ());
                break;
            }
            let Some(run) = self.running.get_mut(&instance) else {
                continue;
            };
            let Some((_, after)) = run.deadline.take() else {
                continue;
            };
            let alert = alert_for_overdue(&run.job, &instance, run.started, after, &self.base);
            self.enqueue(alert).await;
        }
    }

    /// The job's rules: its own list, else the settings'.
    fn rules_for(&self, job: &str) -> Vec<saltpeter_notify::Rule> {
        let config = self.config.borrow();
        match config.jobs.get(job).and_then(|j| j.notify.clone()) {
            Some(own) => own,
            None => config.settings.notify.clone(),
        }
    }

    /// Renders `alert` for each destination that wants it, enqueues them (a key already there
    /// is a no-op) and wakes the deliverer. Returns how many rows were added.
    pub async fn enqueue(&self, alert: Alert) -> usize {
        let rules = self.rules_for(&alert.job);
        let notifications = notifications_for(&alert, &rules);
        if notifications.is_empty() {
            return 0;
        }
        let outbox = Arc::clone(&self.outbox);
        let job = alert.job.clone();
        let event = alert.event;
        let added = tokio::task::spawn_blocking(move || {
            let mut added = 0usize;
            for n in notifications {
                match outbox.enqueue(n) {
                    Ok(true) => added += 1,
                    Ok(false) => {}
                    Err(error) => {
                        tracing::error!(%job, %event, %error, "Could not queue a notification.");
                    }
                }
            }
            added
        })
        .await
        .unwrap_or(0);
        if added > 0 {
            tracing::info!(job = %alert.job, event = %alert.event, added, "Notifications queued.");
            (self.wake)();
        }
        added
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use saltpeter_notify::MemoryOutbox;
    use saltpeter_store::{MachineStatus, MachineView};
    use std::sync::atomic::{AtomicUsize, Ordering};

    const T0: OffsetDateTime = time::macros::datetime!(2026-12-06 02:00:00 UTC);

    fn config(text: &str) -> watch::Receiver<Arc<Config>> {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("jobs.yaml"), text).expect("write");
        let config = Config::load(dir.path());
        assert!(!config.has_errors(), "{:?}", config.problems);
        let (_tx, rx) = watch::channel(Arc::new(config));
        rx
    }

    struct Scene {
        notifier: Notifier,
        outbox: Arc<MemoryOutbox>,
        wakes: Arc<AtomicUsize>,
    }

    fn scene(text: &str) -> Scene {
        let outbox = Arc::new(MemoryOutbox::new());
        let wakes = Arc::new(AtomicUsize::new(0));
        let w = Arc::clone(&wakes);
        let notifier = Notifier::new(
            config(text),
            outbox.clone(),
            Arc::new(move || {
                w.fetch_add(1, Ordering::Relaxed);
            }),
            None,
            "https://cron.example.net:8888".into(),
        );
        Scene {
            notifier,
            outbox,
            wakes,
        }
    }

    const JOBS: &str = "\
saltpeter_config:
  notify:
    - webhook: https://hooks.example/all
      on: [failure, recovery, missed, running_too_long]
backup:
  min: '*'
  hour: '*'
  dom: '*'
  mon: '*'
  dow: '*'
  targets: db1
  command: 'true'
  warn_after: 60
quiet:
  min: '*'
  hour: '*'
  dom: '*'
  mon: '*'
  dow: '*'
  targets: db1
  command: 'false'
  notify: []
own:
  min: '*'
  hour: '*'
  dom: '*'
  mon: '*'
  dow: '*'
  targets: db1
  command: 'false'
  notify:
    - email: dba@example.org
      on: failure
";

    fn pending(outbox: &MemoryOutbox) -> Vec<saltpeter_notify::Notification> {
        outbox
            .claim_due(T0 + time::Duration::days(1), 100, Duration::ZERO)
            .expect("claim")
            .into_iter()
            .map(|p| p.notification)
            .collect()
    }

    fn ended(job: &str, instance: &str, success: bool) -> Seen {
        Seen::Ended {
            job: job.into(),
            instance: instance.into(),
            at: T0,
            total: 2,
            failed: usize::from(!success),
            success,
        }
    }

    #[test]
    fn causes_follow_the_code_unless_the_command_exited_itself() {
        assert_eq!(cause_of(1, Some("exit")), "exit");
        assert_eq!(cause_of(124, Some("exit")), "exit");
        assert_eq!(cause_of(124, Some("timeout")), "timeout");
        assert_eq!(cause_of(124, Some("master_timeout")), "timeout");
        assert_eq!(cause_of(253, Some("heartbeat_lost")), "heartbeat_lost");
        assert_eq!(cause_of(254, Some("not_started")), "not_started");
        assert_eq!(cause_of(254, None), "not_started");
        assert_eq!(cause_of(143, Some("kill_unconfirmed")), "killed");
        assert_eq!(cause_of(143, Some("killed")), "killed");
        assert_eq!(cause_of(255, Some("no_response")), "error");
        assert_eq!(cause_of(137, Some("signal")), "exit");
    }

    #[test]
    fn a_finished_runs_machines_carry_their_codes_and_causes() {
        let machine = |code: Option<i64>, cause: Option<&'static str>| MachineView {
            status: MachineStatus::Failed,
            retcode: code,
            cause,
            late_retcode: None,
            starttime: None,
            endtime: None,
            last_heartbeat: None,
            wrapper_version: None,
            pid: None,
            wrapper_pid: None,
            output: String::new(),
            output_bytes: 0,
            output_omitted_bytes: 0,
            attempt: 1,
            attempts: Vec::new(),
        };
        let view = RunView {
            instance: "backup_1".into(),
            job: "backup".into(),
            group: "g".into(),
            started: String::new(),
            ended: None,
            success: Some(false),
            killed: false,
            maintenance: Vec::new(),
            missed: None,
            machines: [
                ("a", machine(Some(0), Some("exit"))),
                ("b", machine(Some(253), Some("heartbeat_lost"))),
                ("c", machine(Some(254), Some("not_started"))),
                ("d", machine(Some(124), Some("timeout"))),
                ("e", machine(Some(143), Some("killed"))),
                ("f", machine(Some(255), Some("wrapper_error"))),
                ("g", machine(Some(3), Some("exit"))),
                ("h", machine(None, None)),
            ]
            .into_iter()
            .map(|(n, m)| (n.to_owned(), m))
            .collect(),
        };
        let got: Vec<(String, i64, String)> = machines_of(&view)
            .into_iter()
            .map(|m| (m.machine, m.code, m.cause))
            .collect();
        let want: Vec<(String, i64, String)> = [
            ("a", 0, "exit"),
            ("b", 253, "heartbeat_lost"),
            ("c", 254, "not_started"),
            ("d", 124, "timeout"),
            ("e", 143, "killed"),
            ("f", 255, "error"),
            ("g", 3, "exit"),
        ]
        .into_iter()
        .map(|(a, b, c)| (a.to_owned(), b, c.to_owned()))
        .collect();
        assert_eq!(got, want, "a machine without a result is left out");
    }

    #[test]
    fn missed_and_overdue_alerts_name_their_slot_run_and_link() {
        let slot = T0 - time::Duration::minutes(5);
        let a = alert_for_missed("backup", slot, "master down", T0, "https://x:8888/");
        assert_eq!(a.event, NotifyOn::Missed);
        assert_eq!(a.slot, Some(slot));
        assert_eq!(a.instance, None);
        assert_eq!(a.detail.as_deref(), Some("master down"));
        assert_eq!(a.link.as_deref(), Some("https://x:8888/"));
        let b = alert_for_missed("backup", slot, "again", T0 + time::Duration::hours(1), "x");
        assert_eq!(
            a.idempotency_key(),
            b.idempotency_key(),
            "one slot, one key"
        );
        let o = alert_for_overdue(
            "job a",
            "job a_1",
            T0,
            Duration::from_secs(90),
            "http://h:1",
        );
        assert_eq!(o.event, NotifyOn::RunningTooLong);
        assert_eq!(o.at, T0 + time::Duration::seconds(90));
        assert_eq!(o.link.as_deref(), Some("http://h:1/#/run/job%20a_1"));
    }

    #[tokio::test]
    async fn a_failure_then_a_success_notify_failure_and_one_recovery() {
        let mut s = scene(JOBS);
        s.notifier.handle(ended("backup", "backup_1", true)).await;
        assert!(
            pending(&s.outbox).is_empty(),
            "a success after nothing says nothing"
        );
        s.notifier.handle(ended("backup", "backup_2", false)).await;
        s.notifier.handle(ended("backup", "backup_2", false)).await;
        s.notifier.handle(ended("backup", "backup_3", true)).await;
        s.notifier.handle(ended("backup", "backup_4", true)).await;
        let got = pending(&s.outbox);
        let events: Vec<NotifyOn> = got.iter().map(|n| n.event).collect();
        assert_eq!(events, [NotifyOn::Failure, NotifyOn::Recovery]);
        let body: serde_json::Value = serde_json::from_slice(&got[0].body).expect("json");
        assert_eq!(body["instance"], "backup_2");
        assert_eq!(body["detail"], "1 of 2 machines failed");
        assert_eq!(body["link"], "https://cron.example.net:8888/#/run/backup_2");
        assert_eq!(s.wakes.load(Ordering::Relaxed), 2);
    }

    #[tokio::test]
    async fn a_jobs_own_list_replaces_the_global_one_and_an_empty_list_silences() {
        let mut s = scene(JOBS);
        s.notifier.handle(ended("quiet", "quiet_1", false)).await;
        assert!(pending(&s.outbox).is_empty(), "notify: [] silences the job");
        s.notifier.handle(ended("own", "own_1", false)).await;
        let got = pending(&s.outbox);
        assert_eq!(got.len(), 1);
        assert!(
            matches!(&got[0].channel, saltpeter_notify::Channel::Email { to } if to == "dba@example.org"),
            "the job's own list, not the global webhook"
        );
        s.notifier.handle(ended("gone", "gone_1", false)).await;
        let got = pending(&s.outbox);
        assert_eq!(got.len(), 2, "claims here do not lease: both rows again");
        assert!(
            got.iter()
                .any(|n| n.job == "gone" && n.channel.kind() == "webhook"),
            "a job no longer configured uses the global list"
        );
    }

    #[tokio::test]
    async fn a_recovery_is_noticed_across_a_restart() {
        let mut s = scene(JOBS);
        let failed = JobRecord {
            name: "backup".into(),
            last_success: Some(false),
            ..JobRecord::default()
        };
        s.notifier.seed(&[failed], [], T0);
        s.notifier.handle(ended("backup", "backup_9", true)).await;
        let got = pending(&s.outbox);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].event, NotifyOn::Recovery);
    }

    #[tokio::test]
    async fn the_missed_path_enqueues_once_per_slot() {
        let s = scene(JOBS);
        let (tx, rx) = mpsc::channel(8);
        let handle = NotifierHandle::new(tx);
        let task = tokio::spawn(s.notifier.run(rx));
        handle.missed("backup", T0, "the master was down");
        handle.missed("backup", T0, "the master was down");
        drop(handle);
        task.await.expect("notifier");
        let got = pending(&s.outbox);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].event, NotifyOn::Missed);
    }

    #[tokio::test(start_paused = true)]
    async fn warn_after_raises_running_too_long_once_on_the_paused_clock() {
        let s = scene(JOBS);
        let outbox = s.outbox.clone();
        let (tx, rx) = mpsc::channel(8);
        let task = tokio::spawn(s.notifier.run(rx));
        let start = |instance: &str| Seen::Started {
            job: "backup".into(),
            instance: instance.into(),
            at: T0,
        };
        tx.send(start("backup_1")).await.expect("send");
        tx.send(start("backup_2")).await.expect("send");
        tokio::time::sleep(Duration::from_secs(30)).await;
        // backup_2 ends in time; backup_1 keeps going.
        tx.send(ended("backup", "backup_2", true))
            .await
            .expect("send");
        tokio::time::sleep(Duration::from_secs(29)).await;
        assert_eq!(outbox.counts().expect("counts").pending, 0, "not yet");
        tokio::time::sleep(Duration::from_secs(2)).await;
        tokio::time::sleep(Duration::from_secs(600)).await;
        drop(tx);
        task.await.expect("notifier");
        let got = pending(&outbox);
        assert_eq!(got.len(), 1, "once, and only for the run still going");
        assert_eq!(got[0].event, NotifyOn::RunningTooLong);
        let body: serde_json::Value = serde_json::from_slice(&got[0].body).expect("json");
        assert_eq!(body["instance"], "backup_1");
    }

    #[tokio::test(start_paused = true)]
    async fn a_restored_run_keeps_its_warn_after_from_its_start() {
        let mut s = scene(JOBS);
        let run = RunRecord {
            instance: "backup_7".into(),
            job: "backup".into(),
            group: "jobs".into(),
            started: T0,
            ended: None,
            success: None,
            killed: false,
            token: String::new(),
            identity: String::new(),
            resolving: false,
            maintenance: Vec::new(),
            pending_batches: Vec::new(),
        };
        // The master comes back 50 s into the run: 10 s are left.
        s.notifier
            .seed(&[], [&run], T0 + time::Duration::seconds(50));
        let outbox = s.outbox.clone();
        let (tx, rx) = mpsc::channel(8);
        let task = tokio::spawn(s.notifier.run(rx));
        tokio::time::sleep(Duration::from_secs(9)).await;
        assert_eq!(outbox.counts().expect("counts").pending, 0);
        tokio::time::sleep(Duration::from_secs(2)).await;
        drop(tx);
        task.await.expect("notifier");
        assert_eq!(pending(&outbox).len(), 1);
    }
}
