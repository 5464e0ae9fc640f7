//! The outbox: notifications waiting to be delivered, kept where a restart does not lose them.
//!
//! The [`Outbox`] trait is what the [`Deliverer`](crate::Deliverer) and the engine need; the
//! store implements it on SQLite ([`SQLITE_SCHEMA`] is the proposed table), [`MemoryOutbox`]
//! implements it for tests, and [`conformance::outbox_conformance`] is the one suite every
//! implementation must pass.
//!
//! A row's life: `pending` from [`Outbox::enqueue`]; [`Outbox::claim_due`] hands it out and
//! pushes its due time forward by a lease, so a master that dies mid-delivery sends it again
//! once the lease ends (delivery is at least once; receivers deduplicate on the key); then
//! `delivered`, or back to `pending` with a later due time after a failed attempt, or
//! `gave_up` (attempts exhausted, or a permanent error) or `dropped` (the rate limit). Finished
//! rows are kept until [`Outbox::prune`], so a key enqueued again is still recognised.

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use time::OffsetDateTime;

use crate::{Notification, NotifyOn};

/// An outbox that cannot be read or written.
#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    /// The storage underneath failed (the message is the backend's).
    #[error("notification outbox: {0}")]
    Storage(String),
    /// No row has this id.
    #[error("notification outbox: no row {0}")]
    NoSuchRow(i64),
}

/// A row handed out by [`Outbox::claim_due`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pending {
    pub id: i64,
    pub notification: Notification,
    /// Attempts made before this one.
    pub attempts: u32,
}

/// Where a row stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum State {
    Pending,
    Delivered,
    GaveUp,
    Dropped,
}

impl State {
    /// The name stored in the `state` column and shown by the API.
    pub fn name(self) -> &'static str {
        match self {
            State::Pending => "pending",
            State::Delivered => "delivered",
            State::GaveUp => "gave_up",
            State::Dropped => "dropped",
        }
    }
}

/// What follows a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Try again at this time.
    RetryAt(OffsetDateTime),
    /// Attempts exhausted, or the receiver refused for good.
    GaveUp,
    /// Not sent: the job's rate limit was reached.
    Dropped,
}

/// A row with an error, for the API: never the URL or the secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailureRecord {
    pub id: i64,
    pub key: String,
    pub job: String,
    pub event: NotifyOn,
    /// `webhook`, `slack` or `email`.
    pub channel: &'static str,
    pub state: State,
    pub attempts: u32,
    pub error: String,
    /// When the last attempt failed.
    pub at: OffsetDateTime,
}

/// Rows by state, for `/metrics`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OutboxCounts {
    pub pending: u64,
    pub delivered: u64,
    pub gave_up: u64,
    pub dropped: u64,
}

/// Longest error text kept per row.
pub const MAX_ERROR: usize = 1024;

/// `error` cut to [`MAX_ERROR`] bytes on a character boundary: implementations store this.
pub fn bounded_error(error: &str) -> String {
    let mut end = error.len().min(MAX_ERROR);
    while !error.is_char_boundary(end) {
        end -= 1;
    }
    error.get(..end).unwrap_or_default().to_owned()
}

/// The durable queue of notifications. Shared between the engine (enqueue) and the deliverer
/// (everything else), so every method takes `&self`.
pub trait Outbox: Send + Sync {
    /// Adds `n`, due at `n.created_at`. A row with the same key already there (in any state) makes
    /// this a no-op that returns `false`.
    fn enqueue(&self, n: Notification) -> Result<bool, OutboxError>;

    /// Up to `limit` pending rows due at `now`, earliest due first (then oldest id); each one's
    /// due time moves to `now + lease`, so it is not handed out again meanwhile.
    fn claim_due(
        &self,
        now: OffsetDateTime,
        limit: usize,
        lease: Duration,
    ) -> Result<Vec<Pending>, OutboxError>;

    /// The row was delivered.
    fn delivered(&self, id: i64, now: OffsetDateTime) -> Result<(), OutboxError>;

    /// An attempt failed (or, with [`Outcome::Dropped`], none was made): records the error,
    /// counts the attempt (not for `Dropped`), and retries or finishes the row.
    fn failed(
        &self,
        id: i64,
        error: &str,
        now: OffsetDateTime,
        outcome: Outcome,
    ) -> Result<(), OutboxError>;

    /// Rows with an error (retrying, given up, dropped), most recent failure first.
    fn failures(&self, limit: usize) -> Result<Vec<FailureRecord>, OutboxError>;

    /// Rows by state.
    fn counts(&self) -> Result<OutboxCounts, OutboxError>;

    /// The earliest due time of a pending row, so the deliverer sleeps until then.
    fn next_due(&self) -> Result<Option<OffsetDateTime>, OutboxError>;

    /// Deletes finished rows (delivered, gave up, dropped) last touched before `before`;
    /// returns how many.
    fn prune(&self, before: OffsetDateTime) -> Result<u64, OutboxError>;
}

/// The table the SQLite store is proposed to keep the outbox in. Times are Unix milliseconds
/// (UTC). `secret` is the webhook's HMAC key: the database is the master's own 0600 file,
/// which already holds run tokens.
pub const SQLITE_SCHEMA: &str = "\
CREATE TABLE IF NOT EXISTS notify_outbox (
    id              INTEGER PRIMARY KEY,
    key             TEXT    NOT NULL UNIQUE,     -- idempotency key; INSERT OR IGNORE
    job             TEXT    NOT NULL,
    event           TEXT    NOT NULL,            -- failure | recovery | missed | running_too_long
    channel         TEXT    NOT NULL,            -- webhook | slack | email
    target          TEXT    NOT NULL,            -- URL or mail address
    secret          TEXT,                        -- webhook HMAC key, NULL when unsigned
    subject         TEXT    NOT NULL,
    body            BLOB    NOT NULL,            -- the exact bytes sent
    created_at      INTEGER NOT NULL,
    state           TEXT    NOT NULL DEFAULT 'pending'
                    CHECK (state IN ('pending', 'delivered', 'gave_up', 'dropped')),
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at INTEGER NOT NULL,            -- due time; a claim moves it by the lease
    last_error      TEXT,
    updated_at      INTEGER NOT NULL
);
-- claim_due and next_due: pending rows by due time.
CREATE INDEX IF NOT EXISTS notify_outbox_due
    ON notify_outbox (next_attempt_at, id) WHERE state = 'pending';
-- failures: rows with an error, newest first; prune: finished rows by age.
CREATE INDEX IF NOT EXISTS notify_outbox_updated ON notify_outbox (updated_at);
";

#[derive(Debug)]
struct Row {
    id: i64,
    n: Notification,
    state: State,
    attempts: u32,
    due: OffsetDateTime,
    error: Option<String>,
    updated: OffsetDateTime,
}

/// An outbox in memory: for tests, and the reference the conformance suite is written against.
/// Linear scans: it is not meant for more than a few thousand rows.
#[derive(Debug, Default)]
pub struct MemoryOutbox {
    rows: Mutex<Vec<Row>>,
    /// The last id handed out: ids are never reused, even after a prune.
    last_id: AtomicI64,
}

impl MemoryOutbox {
    pub fn new() -> Self {
        Self::default()
    }
}

impl Outbox for MemoryOutbox {
    fn enqueue(&self, n: Notification) -> Result<bool, OutboxError> {
        let mut rows = self.rows.lock();
        if rows.iter().any(|r| r.n.key == n.key) {
            return Ok(false);
        }
        let id = self
            .last_id
            .fetch_add(1, Ordering::Relaxed)
            .saturating_add(1);
        rows.push(Row {
            id,
            due: n.created_at,
            updated: n.created_at,
            n,
            state: State::Pending,
            attempts: 0,
            error: None,
        });
        Ok(true)
    }

    fn claim_due(
        &self,
        now: OffsetDateTime,
        limit: usize,
        lease: Duration,
    ) -> Result<Vec<Pending>, OutboxError> {
        let mut rows = self.rows.lock();
        let mut due: Vec<&mut Row> = rows
            .iter_mut()
            .filter(|r| r.state == State::Pending && r.due <= now)
            .collect();
        due.sort_by_key(|r| (r.due, r.id));
        Ok(due
            .into_iter()
            .take(limit)
            .map(|r| {
                r.due = crate::shift(now, lease, false);
                Pending {
                    id: r.id,
                    notification: r.n.clone(),
                    attempts: r.attempts,
                }
            })
            .collect())
    }

    fn delivered(&self, id: i64, now: OffsetDateTime) -> Result<(), OutboxError> {
        let mut rows = self.rows.lock();
        let row = rows
            .iter_mut()
            .find(|r| r.id == id)
            .ok_or(OutboxError::NoSuchRow(id))?;
        row.state = State::Delivered;
        row.attempts = row.attempts.saturating_add(1);
        row.updated = now;
        Ok(())
    }

    fn failed(
        &self,
        id: i64,
        error: &str,
        now: OffsetDateTime,
        outcome: Outcome,
    ) -> Result<(), OutboxError> {
        let mut rows = self.rows.lock();
        let row = rows
            .iter_mut()
            .find(|r| r.id == id)
            .ok_or(OutboxError::NoSuchRow(id))?;
        row.error = Some(bounded_error(error));
        row.updated = now;
        match outcome {
            Outcome::RetryAt(at) => {
                row.attempts = row.attempts.saturating_add(1);
                row.due = at;
            }
            Outcome::GaveUp => {
                row.attempts = row.attempts.saturating_add(1);
                row.state = State::GaveUp;
            }
            Outcome::Dropped => row.state = State::Dropped,
        }
        Ok(())
    }

    fn failures(&self, limit: usize) -> Result<Vec<FailureRecord>, OutboxError> {
        let rows = self.rows.lock();
        let mut failed: Vec<&Row> = rows
            .iter()
            .filter(|r| r.error.is_some() && r.state != State::Delivered)
            .collect();
        failed.sort_by_key(|r| std::cmp::Reverse((r.updated, r.id)));
        Ok(failed
            .into_iter()
            .take(limit)
            .map(|r| FailureRecord {
                id: r.id,
                key: r.n.key.clone(),
                job: r.n.job.clone(),
                event: r.n.event,
                channel: r.n.channel.kind(),
                state: r.state,
                attempts: r.attempts,
                error: r.error.clone().unwrap_or_default(),
                at: r.updated,
            })
            .collect())
    }

    fn counts(&self) -> Result<OutboxCounts, OutboxError> {
        let mut c = OutboxCounts::default();
        for r in self.rows.lock().iter() {
            let slot = match r.state {
                State::Pending => &mut c.pending,
                State::Delivered => &mut c.delivered,
                State::GaveUp => &mut c.gave_up,
                State::Dropped => &mut c.dropped,
            };
            *slot = slot.saturating_add(1);
        }
        Ok(c)
    }

    fn next_due(&self) -> Result<Option<OffsetDateTime>, OutboxError> {
        Ok(self
            .rows
            .lock()
            .iter()
            .filter(|r| r.state == State::Pending)
            .map(|r| r.due)
            .min())
    }

    fn prune(&self, before: OffsetDateTime) -> Result<u64, OutboxError> {
        let mut rows = self.rows.lock();
        let was = rows.len();
        rows.retain(|r| r.state == State::Pending || r.updated >= before);
        Ok(u64::try_from(was.saturating_sub(rows.len())).unwrap_or(u64::MAX))
    }
}

pub mod conformance {
    //! The behaviour every [`Outbox`] implementation must show, as one function a backend's
    //! test calls with a factory of empty outboxes (the SQLite store's tests call it with
    //! fresh temporary databases). It panics on the first difference, like any test.
    #![allow(clippy::unwrap_used, clippy::panic)]

    use std::time::Duration;

    use time::OffsetDateTime;
    use time::macros::datetime;

    use super::{MAX_ERROR, Outbox, Outcome, State};
    use crate::{Channel, Notification, NotifyOn};

    const T0: OffsetDateTime = datetime!(2026-12-06 02:00:00 UTC);

    fn at(seconds: i64) -> OffsetDateTime {
        T0 + time::Duration::seconds(seconds)
    }

    /// A notification with key `key`, due `due` seconds after the suite's epoch.
    pub fn sample(key: &str, due: i64) -> Notification {
        Notification {
            key: key.to_owned(),
            job: "backup".into(),
            event: NotifyOn::Failure,
            channel: Channel::Webhook {
                url: "https://hooks.example/x".into(),
                secret: Some("s3cret".into()),
            },
            subject: "saltpeter: backup failed".into(),
            body: br#"{"event":"failure"}"#.to_vec(),
            created_at: at(due),
        }
    }

    /// Runs the suite; `make` returns a new, empty outbox each call.
    pub fn outbox_conformance(make: impl Fn() -> Box<dyn Outbox>) {
        enqueue_is_idempotent(make().as_ref());
        claims_respect_due_time_order_limit_and_lease(make().as_ref());
        failures_retry_give_up_and_drop(make().as_ref());
        delivered_rows_stay_known_until_pruned(make().as_ref());
        rows_round_trip_every_field(make().as_ref());
    }

    fn enqueue_is_idempotent(o: &dyn Outbox) {
        assert!(o.enqueue(sample("a", 0)).unwrap());
        assert!(!o.enqueue(sample("a", 5)).unwrap(), "same key: a no-op");
        assert!(o.enqueue(sample("b", 0)).unwrap());
        assert_eq!(o.counts().unwrap().pending, 2);
        let claimed = o.claim_due(at(10), 10, Duration::from_secs(60)).unwrap();
        assert_eq!(claimed.len(), 2);
        assert_eq!(
            claimed[0].notification.created_at,
            at(0),
            "the first one kept"
        );
    }

    fn claims_respect_due_time_order_limit_and_lease(o: &dyn Outbox) {
        assert_eq!(o.next_due().unwrap(), None);
        assert!(o.claim_due(at(0), 10, Duration::ZERO).unwrap().is_empty());
        o.enqueue(sample("late", 30)).unwrap();
        o.enqueue(sample("early", 10)).unwrap();
        o.enqueue(sample("first", 10)).unwrap();
        o.enqueue(sample("future", 1000)).unwrap();
        assert_eq!(o.next_due().unwrap(), Some(at(10)));
        assert!(
            o.claim_due(at(9), 10, Duration::from_secs(60))
                .unwrap()
                .is_empty()
        );
        let got = o.claim_due(at(30), 2, Duration::from_secs(60)).unwrap();
        let keys: Vec<&str> = got.iter().map(|p| p.notification.key.as_str()).collect();
        assert_eq!(keys, ["early", "first"], "earliest due first, then oldest");
        assert!(got.iter().all(|p| p.attempts == 0));
        let got = o.claim_due(at(30), 10, Duration::from_secs(60)).unwrap();
        let keys: Vec<&str> = got.iter().map(|p| p.notification.key.as_str()).collect();
        assert_eq!(keys, ["late"], "claimed rows are leased");
        assert!(
            o.claim_due(at(89), 10, Duration::from_secs(60))
                .unwrap()
                .is_empty()
        );
        let got = o.claim_due(at(90), 10, Duration::from_secs(60)).unwrap();
        assert_eq!(
            got.len(),
            3,
            "the lease ended: handed out again (at least once)"
        );
        assert_eq!(o.next_due().unwrap(), Some(at(150)));
        assert_eq!(o.claim_due(at(2000), 0, Duration::ZERO).unwrap().len(), 0);
    }

    fn failures_retry_give_up_and_drop(o: &dyn Outbox) {
        for key in ["retry", "give-up", "drop"] {
            o.enqueue(sample(key, 0)).unwrap();
        }
        let got = o.claim_due(at(0), 10, Duration::from_secs(60)).unwrap();
        let id = |key: &str| {
            got.iter()
                .find(|p| p.notification.key == key)
                .map(|p| p.id)
                .unwrap()
        };
        o.failed(id("retry"), "HTTP 500", at(1), Outcome::RetryAt(at(20)))
            .unwrap();
        o.failed(id("give-up"), "HTTP 404", at(2), Outcome::GaveUp)
            .unwrap();
        let long = "é".repeat(MAX_ERROR);
        o.failed(id("drop"), &long, at(3), Outcome::Dropped)
            .unwrap();
        assert!(o.claim_due(at(19), 10, Duration::ZERO).unwrap().is_empty());
        let again = o.claim_due(at(20), 10, Duration::from_secs(60)).unwrap();
        assert_eq!(again.len(), 1);
        assert_eq!(again[0].notification.key, "retry");
        assert_eq!(again[0].attempts, 1, "the failed attempt counted");
        let counts = o.counts().unwrap();
        assert_eq!(
            (
                counts.pending,
                counts.gave_up,
                counts.dropped,
                counts.delivered
            ),
            (1, 1, 1, 0)
        );
        let failures = o.failures(10).unwrap();
        let keys: Vec<&str> = failures.iter().map(|f| f.key.as_str()).collect();
        assert_eq!(keys, ["drop", "give-up", "retry"], "most recent first");
        assert_eq!(failures[0].state, State::Dropped);
        assert_eq!(failures[0].attempts, 0, "a dropped row was never attempted");
        assert!(failures[0].error.len() <= MAX_ERROR && failures[0].error.starts_with('é'));
        assert_eq!(failures[1].state, State::GaveUp);
        assert_eq!(failures[1].error, "HTTP 404");
        assert_eq!(failures[1].channel, "webhook");
        assert_eq!(failures[1].at, at(2));
        assert_eq!(failures[2].state, State::Pending);
        assert_eq!(o.failures(1).unwrap().len(), 1);
        o.delivered(again[0].id, at(21)).unwrap();
        assert_eq!(
            o.failures(10).unwrap().len(),
            2,
            "a delivered row is no failure"
        );
        assert!(
            o.delivered(9_999_999, at(22)).is_err(),
            "an unknown id is an error"
        );
    }

    fn delivered_rows_stay_known_until_pruned(o: &dyn Outbox) {
        o.enqueue(sample("done", 0)).unwrap();
        o.enqueue(sample("waiting", 500)).unwrap();
        let got = o.claim_due(at(0), 10, Duration::from_secs(60)).unwrap();
        o.delivered(got[0].id, at(5)).unwrap();
        assert!(o.claim_due(at(100), 10, Duration::ZERO).unwrap().is_empty());
        assert!(
            !o.enqueue(sample("done", 0)).unwrap(),
            "delivered keys are remembered"
        );
        assert_eq!(o.counts().unwrap().delivered, 1);
        assert_eq!(o.prune(at(5)).unwrap(), 0, "touched at the cut-off: kept");
        assert_eq!(o.prune(at(6)).unwrap(), 1);
        assert_eq!(
            o.prune(at(100_000)).unwrap(),
            0,
            "pending rows are never pruned"
        );
        assert!(
            o.enqueue(sample("done", 0)).unwrap(),
            "a pruned key is new again"
        );
        assert_eq!(o.counts().unwrap().pending, 2);
    }

    fn rows_round_trip_every_field(o: &dyn Outbox) {
        let mut n = sample("fields", 0);
        n.event = NotifyOn::RunningTooLong;
        n.job = "jöb with spaces".into();
        n.body = vec![0, 159, 146, 150, 255];
        n.subject = "subject ✓".into();
        o.enqueue(n.clone()).unwrap();
        let mut mail = sample("mail", 0);
        mail.channel = Channel::Email {
            to: "ops@example.org".into(),
        };
        mail.event = NotifyOn::Missed;
        o.enqueue(mail.clone()).unwrap();
        let mut slack = sample("slack", 0);
        slack.channel = Channel::Slack {
            url: "https://chat.example/hooks/t".into(),
        };
        slack.event = NotifyOn::Recovery;
        o.enqueue(slack.clone()).unwrap();
        let mut unsigned = sample("unsigned", 0);
        unsigned.channel = Channel::Webhook {
            url: "http://10.0.0.1:8080/in".into(),
            secret: None,
        };
        o.enqueue(unsigned.clone()).unwrap();
        let got = o.claim_due(at(0), 10, Duration::from_secs(1)).unwrap();
        let back: Vec<&Notification> = got.iter().map(|p| &p.notification).collect();
        assert_eq!(back, [&n, &mail, &slack, &unsigned]);
        let ids: Vec<i64> = got.iter().map(|p| p.id).collect();
        let mut unique = ids.clone();
        unique.dedup();
        assert_eq!(ids, unique, "ids are distinct");
    }
}

#[cfg(test)]
mod tests {
    use super::conformance::outbox_conformance;
    use super::*;

    #[test]
    fn the_memory_outbox_passes_the_conformance_suite() {
        outbox_conformance(|| Box::new(MemoryOutbox::new()));
    }

    /// The suite must be able to fail: an outbox that forgets keys once delivered is caught.
    #[test]
    fn the_suite_catches_an_outbox_that_forgets_delivered_keys() {
        #[derive(Debug, Default)]
        struct Forgetful(MemoryOutbox);
        impl Outbox for Forgetful {
            fn enqueue(&self, n: Notification) -> Result<bool, OutboxError> {
                self.0.enqueue(n)
            }
            fn claim_due(
                &self,
                now: OffsetDateTime,
                limit: usize,
                lease: Duration,
            ) -> Result<Vec<Pending>, OutboxError> {
                self.0.claim_due(now, limit, lease)
            }
            fn delivered(&self, id: i64, now: OffsetDateTime) -> Result<(), OutboxError> {
                self.0.delivered(id, now)?;
                self.0.rows.lock().retain(|r| r.id != id);
                Ok(())
            }
            fn failed(
                &self,
                id: i64,
                error: &str,
                now: OffsetDateTime,
                outcome: Outcome,
            ) -> Result<(), OutboxError> {
                self.0.failed(id, error, now, outcome)
            }
            fn failures(&self, limit: usize) -> Result<Vec<FailureRecord>, OutboxError> {
                self.0.failures(limit)
            }
            fn counts(&self) -> Result<OutboxCounts, OutboxError> {
                self.0.counts()
            }
            fn next_due(&self) -> Result<Option<OffsetDateTime>, OutboxError> {
                self.0.next_due()
            }
            fn prune(&self, before: OffsetDateTime) -> Result<u64, OutboxError> {
                self.0.prune(before)
            }
        }
        let caught = std::panic::catch_unwind(|| {
            outbox_conformance(|| Box::new(Forgetful::default()));
        });
        assert!(caught.is_err());
    }
}
