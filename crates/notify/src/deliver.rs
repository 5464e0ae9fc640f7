//! The deliverer: one thread that takes due rows from the [`Outbox`], sends them through a
//! [`Sender`], and records what happened.
//!
//! It sleeps until the earliest due row or a poll interval, whichever is sooner, and wakes at
//! once when [`Deliverer::wake`] is called (after an enqueue) or [`Deliverer::stop`] is. A
//! failed attempt is retried with [`Retry`]'s backoff until its attempts run out or the receiver
//! refuses for good; a first attempt over the job's rate limit is dropped, counted and logged.
//! Every outcome is counted in [`DeliveryStats`] for `/metrics`.
//!
//! The clock is injected ([`Clock`]), and [`DeliveryLoop::run_once`] does one round without
//! the thread, so tests drive time by hand.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread::JoinHandle;
use std::time::Duration;

use time::OffsetDateTime;

use crate::config::Delivery;
use crate::outbox::{Outbox, Outcome};
use crate::policy::{RateLimiter, Retry};
use crate::send::Sender;

/// Where the deliverer reads the time.
pub trait Clock: Send + Sync {
    fn now(&self) -> OffsetDateTime;
}

/// The system's wall clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> OffsetDateTime {
        OffsetDateTime::now_utc()
    }
}

/// How the loop runs, beyond the operator's [`Delivery`] settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoopOptions {
    pub delivery: Delivery,
    /// Longest sleep with nothing due; a safety net should a wake-up be missed.
    pub poll: Duration,
    /// Rows claimed per round.
    pub batch: usize,
    /// How long a claimed row is held before another round (or, after a crash, another
    /// master) may take it again. Longer than a send can take.
    pub lease: Duration,
    /// How long finished rows (delivered, given up, dropped) stay in the outbox: their keys
    /// keep a repeated event from being sent twice, and their errors are shown by the API.
    pub keep: Duration,
    /// How often finished rows older than `keep` are deleted.
    pub prune_every: Duration,
}

impl Default for LoopOptions {
    fn default() -> Self {
        LoopOptions {
            delivery: Delivery::default(),
            poll: Duration::from_secs(5),
            batch: 32,
            lease: Duration::from_secs(300),
            keep: Duration::from_secs(7 * 86400),
            prune_every: Duration::from_secs(3600),
        }
    }
}

#[derive(Debug, Default)]
struct Counters {
    delivered: AtomicU64,
    failed_attempts: AtomicU64,
    gave_up: AtomicU64,
    rate_limited: AtomicU64,
    outbox_errors: AtomicU64,
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// What the deliverer has done since it started, for `/metrics`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeliveryStats {
    /// Notifications delivered.
    pub delivered: u64,
    /// Attempts that failed (each retry counts).
    pub failed_attempts: u64,
    /// Notifications given up on (attempts exhausted or refused for good).
    pub gave_up: u64,
    /// Notifications dropped by the per-job rate limit.
    pub rate_limited: u64,
    /// Outbox reads or writes that failed (the round is tried again later).
    pub outbox_errors: u64,
}

impl Counters {
    fn snapshot(&self) -> DeliveryStats {
        DeliveryStats {
            delivered: self.delivered.load(Ordering::Relaxed),
            failed_attempts: self.failed_attempts.load(Ordering::Relaxed),
            gave_up: self.gave_up.load(Ordering::Relaxed),
            rate_limited: self.rate_limited.load(Ordering::Relaxed),
            outbox_errors: self.outbox_errors.load(Ordering::Relaxed),
        }
    }
}

/// The deliverer's state without its thread: one round at a time.
pub struct DeliveryLoop {
    outbox: Arc<dyn Outbox>,
    sender: Box<dyn Sender>,
    clock: Arc<dyn Clock>,
    options: LoopOptions,
    limiter: RateLimiter,
    counters: Arc<Counters>,
    stopping: Arc<AtomicBool>,
    last_prune: Option<OffsetDateTime>,
}

impl std::fmt::Debug for DeliveryLoop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeliveryLoop")
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl DeliveryLoop {
    pub fn new(
        outbox: Arc<dyn Outbox>,
        sender: Box<dyn Sender>,
        clock: Arc<dyn Clock>,
        options: LoopOptions,
    ) -> Self {
        DeliveryLoop {
            outbox,
            sender,
            clock,
            limiter: RateLimiter::new(options.delivery.rate),
            options,
            counters: Arc::default(),
            stopping: Arc::default(),
            last_prune: None,
        }
    }

    /// What has been counted so far.
    pub fn stats(&self) -> DeliveryStats {
        self.counters.snapshot()
    }

    /// Claims the rows due now and handles each; returns how many it handled.
    pub fn run_once(&mut self) -> usize {
        let now = self.clock.now();
        let claimed =
            match self
                .outbox
                .claim_due(now, self.options.batch.max(1), self.options.lease)
            {
                Ok(claimed) => claimed,
                Err(e) => {
                    bump(&self.counters.outbox_errors);
                    tracing::warn!(error = %e, "notifications: claiming due rows failed");
                    return 0;
                }
            };
        let mut handled = 0;
        for pending in claimed {
            // A stop request leaves the rest claimed; their lease ends and they go next time.
            if self.stopping.load(Ordering::Relaxed) {
                break;
            }
            handled += 1;
            let n = &pending.notification;
            let kind = n.channel.kind();
            let destination = n.channel.destination_hash();
            if pending.attempts == 0 && !self.limiter.admit(&n.job, &destination, now) {
                bump(&self.counters.rate_limited);
                let rate = self.options.delivery.rate;
                let reason = format!(
                    "rate limited: more than {} notifications of this job to this {kind} in {} s",
                    rate.max,
                    rate.window.as_secs()
                );
                tracing::warn!(job = %n.job, event = %n.event, channel = kind, key = %n.key, "notification dropped: {reason}");
                self.record(
                    self.outbox
                        .failed(pending.id, &reason, now, Outcome::Dropped),
                );
                continue;
            }
            let result = self.sender.send(n);
            let after = self.clock.now();
            match result {
                Ok(()) => {
                    bump(&self.counters.delivered);
                    tracing::debug!(job = %n.job, event = %n.event, channel = kind, key = %n.key, "notification delivered");
                    self.record(self.outbox.delivered(pending.id, after));
                }
                Err(e) => {
                    bump(&self.counters.failed_attempts);
                    let failed = pending.attempts.saturating_add(1);
                    let retry: Retry = self.options.delivery.retry;
                    let wait = if e.permanent {
                        None
                    } else {
                        retry.after(failed, Retry::jitter(&n.key, failed))
                    };
                    let outcome = match wait {
                        Some(wait) => {
                            tracing::info!(job = %n.job, event = %n.event, channel = kind, key = %n.key, attempt = failed, error = %e, retry_in_ms = wait.as_millis(), "notification attempt failed");
                            Outcome::RetryAt(crate::shift(after, wait, false))
                        }
                        None => {
                            bump(&self.counters.gave_up);
                            tracing::warn!(job = %n.job, event = %n.event, channel = kind, key = %n.key, attempts = failed, error = %e, "notification given up");
                            Outcome::GaveUp
                        }
                    };
                    self.record(self.outbox.failed(pending.id, &e.message, after, outcome));
                }
            }
        }
        handled
    }

    /// Deletes finished rows older than `keep`, at most once per `prune_every`; returns how
    /// many went.
    pub fn prune_if_due(&mut self) -> u64 {
        let now = self.clock.now();
        if self
            .last_prune
            .is_some_and(|last| now - last < self.options.prune_every && now >= last)
        {
            return 0;
        }
        self.last_prune = Some(now);
        match self
            .outbox
            .prune(crate::shift(now, self.options.keep, true))
        {
            Ok(n) => n,
            Err(e) => {
                bump(&self.counters.outbox_errors);
                tracing::warn!(error = %e, "notifications: pruning the outbox failed");
                0
            }
        }
    }

    fn record(&self, result: Result<(), crate::OutboxError>) {
        if let Err(e) = result {
            bump(&self.counters.outbox_errors);
            tracing::warn!(error = %e, "notifications: recording an outcome failed");
        }
    }

    /// How long to sleep before the next round: until the earliest due row, at most `poll`.
    pub fn idle_for(&self) -> Duration {
        let poll = self.options.poll;
        match self.outbox.next_due() {
            Ok(Some(due)) => {
                let wait = due - self.clock.now();
                if wait.is_negative() {
                    Duration::ZERO
                } else {
                    Duration::try_from(wait).map_or(poll, |w| w.min(poll))
                }
            }
            Ok(None) => poll,
            Err(e) => {
                bump(&self.counters.outbox_errors);
                tracing::warn!(error = %e, "notifications: reading the next due time failed");
                poll
            }
        }
    }
}

/// The running deliverer. Dropping it without [`stop`](Self::stop) also stops the thread,
/// without waiting for it.
#[derive(Debug)]
pub struct Deliverer {
    wake: mpsc::SyncSender<()>,
    stopping: Arc<AtomicBool>,
    counters: Arc<Counters>,
    thread: Option<JoinHandle<()>>,
}

impl Deliverer {
    /// Starts the thread.
    pub fn start(mut state: DeliveryLoop) -> std::io::Result<Self> {
        // One slot is enough: a pending wake-up already means "look again".
        let (wake, woken) = mpsc::sync_channel::<()>(1);
        let stopping = Arc::clone(&state.stopping);
        let counters = Arc::clone(&state.counters);
        let thread = std::thread::Builder::new()
            .name("sp-notify".into())
            .spawn(move || {
                loop {
                    if state.stopping.load(Ordering::Relaxed) {
                        break;
                    }
                    state.prune_if_due();
                    // A full batch may mean more is due: go again without sleeping.
                    if state.run_once() >= state.options.batch.max(1) {
                        continue;
                    }
                    let wait = state.idle_for();
                    match woken.recv_timeout(wait) {
                        Ok(()) | Err(RecvTimeoutError::Timeout) => {}
                        Err(RecvTimeoutError::Disconnected) => break,
                    }
                }
            })?;
        Ok(Deliverer {
            wake,
            stopping,
            counters,
            thread: Some(thread),
        })
    }

    /// Makes the thread look at the outbox now (call after enqueueing).
    pub fn wake(&self) {
        let _ = self.wake.try_send(());
    }

    /// What has been counted so far.
    pub fn stats(&self) -> DeliveryStats {
        self.counters.snapshot()
    }

    /// Stops the thread and returns once it has ended. A send in progress finishes first
    /// (it is bounded by the timeout); rows not yet handled stay in the outbox.
    pub fn stop(mut self) {
        self.stopping.store(true, Ordering::Relaxed);
        self.wake();
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            tracing::error!("notifications: the deliverer thread panicked");
        }
    }
}

impl Drop for Deliverer {
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::Relaxed);
        let _ = self.wake.try_send(());
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::sync::atomic::AtomicUsize;
    use std::time::Instant;

    use parking_lot::Mutex;
    use time::macros::datetime;

    use super::*;
    use crate::outbox::conformance::sample;
    use crate::outbox::{MemoryOutbox, OutboxCounts, State};
    use crate::policy::RateLimitConfig;
    use crate::send::SendError;
    use crate::{Notification, NotifyOn};

    const T0: OffsetDateTime = datetime!(2026-12-06 02:00:00 UTC);

    #[derive(Debug)]
    struct FakeClock(Mutex<OffsetDateTime>);

    impl FakeClock {
        fn set(&self, at: OffsetDateTime) {
            *self.0.lock() = at;
        }
    }

    impl Clock for FakeClock {
        fn now(&self) -> OffsetDateTime {
            *self.0.lock()
        }
    }

    /// Answers from a script (then success), and records what it was asked to send.
    #[derive(Debug, Default)]
    struct FakeSender {
        script: Arc<Mutex<VecDeque<Result<(), SendError>>>>,
        sent: Arc<Mutex<Vec<String>>>,
    }

    impl Sender for FakeSender {
        fn send(&self, n: &Notification) -> Result<(), SendError> {
            self.sent.lock().push(n.key.clone());
            self.script.lock().pop_front().unwrap_or(Ok(()))
        }
    }

    struct Rig {
        outbox: Arc<MemoryOutbox>,
        clock: Arc<FakeClock>,
        sent: Arc<Mutex<Vec<String>>>,
        state: DeliveryLoop,
    }

    fn rig(script: Vec<Result<(), SendError>>, delivery: Delivery) -> Rig {
        let outbox = Arc::new(MemoryOutbox::new());
        let clock = Arc::new(FakeClock(Mutex::new(T0)));
        let sender = FakeSender {
            script: Arc::new(Mutex::new(script.into())),
            sent: Arc::default(),
        };
        let sent = Arc::clone(&sender.sent);
        let state = DeliveryLoop::new(
            outbox.clone(),
            Box::new(sender),
            clock.clone(),
            LoopOptions {
                delivery,
                ..LoopOptions::default()
            },
        );
        Rig {
            outbox,
            clock,
            sent,
            state,
        }
    }

    fn retry(base: u64, attempts: u32) -> Delivery {
        Delivery {
            retry: Retry {
                base: Duration::from_secs(base),
                cap: Duration::from_secs(base * 4),
                attempts,
            },
            ..Delivery::default()
        }
    }

    #[test]
    fn failed_attempts_back_off_then_deliver_once() {
        let down = || Err(SendError::retry("HTTP 500"));
        let mut r = rig(vec![down(), down(), down()], retry(10, 12));
        r.outbox.enqueue(sample("k", 0)).unwrap();
        let mut waits = Vec::new();
        for _ in 0..3 {
            assert_eq!(r.state.run_once(), 1);
            let due = r.outbox.next_due().unwrap().unwrap();
            let wait = due - r.clock.now();
            waits.push(wait.whole_milliseconds());
            r.clock.set(due - time::Duration::milliseconds(1));
            assert_eq!(r.state.run_once(), 0, "nothing before its time");
            r.clock.set(due);
        }
        // Steps of 10, 20 and 40 s, each waited between half and all of it.
        for (wait, step) in waits.iter().zip([10_000, 20_000, 40_000]) {
            assert!((step / 2..=step).contains(wait), "{waits:?}");
        }
        assert_eq!(r.state.run_once(), 1);
        assert_eq!(r.sent.lock().len(), 4);
        assert_eq!(r.outbox.counts().unwrap().delivered, 1);
        r.clock.set(T0 + time::Duration::hours(1));
        assert_eq!(r.state.run_once(), 0, "delivered once");
        let stats = r.state.stats();
        assert_eq!(
            (stats.delivered, stats.failed_attempts, stats.gave_up),
            (1, 3, 0)
        );
    }

    #[test]
    fn attempts_run_out_and_permanent_refusals_give_up_at_once() {
        let down = || Err(SendError::retry("timed out"));
        let mut r = rig(
            vec![
                down(),
                down(),
                down(),
                Err(SendError::permanent("HTTP 404")),
            ],
            retry(1, 3),
        );
        r.outbox.enqueue(sample("a", 0)).unwrap();
        for _ in 0..3 {
            r.state.run_once();
            let next = r.outbox.next_due().unwrap();
            r.clock.set(next.unwrap_or(r.clock.now()));
        }
        assert_eq!(r.sent.lock().len(), 3, "three attempts in all");
        assert_eq!(r.outbox.next_due().unwrap(), None);
        r.outbox.enqueue(sample("b", 0)).unwrap();
        r.state.run_once();
        let failures = r.outbox.failures(10).unwrap();
        assert_eq!(failures.len(), 2);
        assert!(failures.iter().all(|f| f.state == State::GaveUp));
        assert_eq!((failures[0].key.as_str(), failures[0].attempts), ("b", 1));
        assert_eq!(failures[0].error, "HTTP 404");
        assert_eq!((failures[1].key.as_str(), failures[1].attempts), ("a", 3));
        let stats = r.state.stats();
        assert_eq!(
            (stats.gave_up, stats.failed_attempts, stats.delivered),
            (2, 4, 0)
        );
    }

    #[test]
    fn a_job_over_its_rate_limit_is_dropped_and_counted_but_retries_pass() {
        let delivery = Delivery {
            rate: RateLimitConfig {
                max: 2,
                window: Duration::from_secs(60),
            },
            ..retry(1, 5)
        };
        let mut r = rig(vec![Err(SendError::retry("HTTP 503"))], delivery);
        for key in ["1", "2", "3", "4"] {
            r.outbox.enqueue(sample(key, 0)).unwrap();
        }
        let mut other = sample("other-job", 0);
        other.job = "other".into();
        r.outbox.enqueue(other).unwrap();
        r.state.run_once();
        assert_eq!(*r.sent.lock(), ["1", "2", "other-job"]);
        assert_eq!(r.state.stats().rate_limited, 2);
        let dropped: Vec<String> = r
            .outbox
            .failures(10)
            .unwrap()
            .into_iter()
            .filter(|f| f.state == State::Dropped)
            .map(|f| {
                assert!(f.error.starts_with("rate limited"), "{}", f.error);
                f.key
            })
            .collect();
        assert_eq!(dropped.len(), 2);
        // "1" failed once; its retry is not a new notification and is not limited.
        r.clock.set(r.outbox.next_due().unwrap().unwrap());
        r.state.run_once();
        assert_eq!(r.sent.lock().len(), 4);
        assert_eq!(
            r.outbox.counts().unwrap(),
            OutboxCounts {
                pending: 0,
                delivered: 3,
                gave_up: 0,
                dropped: 2
            }
        );
        // A minute later the window has room again.
        r.clock.set(T0 + time::Duration::seconds(61));
        let mut n = sample("5", 61);
        n.event = NotifyOn::Recovery;
        r.outbox.enqueue(n).unwrap();
        r.state.run_once();
        assert_eq!(r.sent.lock().last().map(String::as_str), Some("5"));
    }

    #[test]
    fn the_same_event_enqueued_twice_is_sent_once() {
        let mut r = rig(vec![], Delivery::default());
        let alert = crate::tests::failure();
        let rules = [crate::Rule {
            channel: crate::Channel::Slack {
                url: "https://chat.example/hooks/x".into(),
            },
            on: [NotifyOn::Failure].into(),
        }];
        for n in crate::notifications_for(&alert, &rules) {
            assert!(r.outbox.enqueue(n).unwrap());
        }
        r.state.run_once();
        // The engine notices the same failure again after a restart.
        for n in crate::notifications_for(&alert, &rules) {
            assert!(!r.outbox.enqueue(n).unwrap());
        }
        r.clock.set(T0 + time::Duration::hours(2));
        r.state.run_once();
        assert_eq!(r.sent.lock().len(), 1);
    }

    #[test]
    fn finished_rows_are_pruned_after_keep_at_most_hourly() {
        let mut r = rig(vec![], Delivery::default());
        r.state.options.keep = Duration::from_secs(600);
        r.outbox.enqueue(sample("old", 0)).unwrap();
        r.outbox.enqueue(sample("waiting", 86_400)).unwrap();
        r.state.run_once();
        assert_eq!(r.state.prune_if_due(), 0, "delivered just now");
        r.clock.set(T0 + time::Duration::minutes(30));
        assert_eq!(r.state.prune_if_due(), 0, "pruned less than an hour ago");
        r.clock.set(T0 + time::Duration::minutes(61));
        assert_eq!(r.state.prune_if_due(), 1);
        assert_eq!(r.outbox.counts().unwrap().pending, 1, "pending rows stay");
    }

    /// Counts claims, to see the thread sleep rather than spin.
    #[derive(Debug, Default)]
    struct Counting {
        inner: MemoryOutbox,
        claims: AtomicUsize,
    }

    impl Outbox for Counting {
        fn enqueue(&self, n: Notification) -> Result<bool, crate::OutboxError> {
            self.inner.enqueue(n)
        }
        fn claim_due(
            &self,
            now: OffsetDateTime,
            limit: usize,
            lease: Duration,
        ) -> Result<Vec<crate::Pending>, crate::OutboxError> {
            self.claims.fetch_add(1, Ordering::Relaxed);
            self.inner.claim_due(now, limit, lease)
        }
        fn delivered(&self, id: i64, now: OffsetDateTime) -> Result<(), crate::OutboxError> {
            self.inner.delivered(id, now)
        }
        fn failed(
            &self,
            id: i64,
            error: &str,
            now: OffsetDateTime,
            outcome: Outcome,
        ) -> Result<(), crate::OutboxError> {
            self.inner.failed(id, error, now, outcome)
        }
        fn failures(
            &self,
            limit: usize,
        ) -> Result<Vec<crate::outbox::FailureRecord>, crate::OutboxError> {
            self.inner.failures(limit)
        }
        fn counts(&self) -> Result<OutboxCounts, crate::OutboxError> {
            self.inner.counts()
        }
        fn next_due(&self) -> Result<Option<OffsetDateTime>, crate::OutboxError> {
            self.inner.next_due()
        }
        fn prune(&self, before: OffsetDateTime) -> Result<u64, crate::OutboxError> {
            self.inner.prune(before)
        }
    }

    #[test]
    fn the_thread_sleeps_wakes_on_demand_and_stops() {
        let outbox = Arc::new(Counting::default());
        let sender = FakeSender::default();
        let sent = Arc::clone(&sender.sent);
        let state = DeliveryLoop::new(
            outbox.clone(),
            Box::new(sender),
            Arc::new(SystemClock),
            LoopOptions {
                poll: Duration::from_secs(30),
                ..LoopOptions::default()
            },
        );
        let deliverer = Deliverer::start(state).unwrap();
        std::thread::sleep(Duration::from_millis(300));
        assert!(
            outbox.claims.load(Ordering::Relaxed) <= 2,
            "no busy polling"
        );
        outbox.enqueue(sample("now", 0)).unwrap();
        deliverer.wake();
        let deadline = Instant::now() + Duration::from_secs(10);
        while sent.lock().is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(*sent.lock(), ["now"]);
        assert_eq!(deliverer.stats().delivered, 1);
        let stopping = Instant::now();
        deliverer.stop();
        assert!(
            stopping.elapsed() < Duration::from_secs(5),
            "stop does not wait for the poll"
        );
    }
}
