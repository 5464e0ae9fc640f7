//! Notifications: what happened to a job, said to the people and tools that asked to hear it,
//! delivered at least once through a durable outbox.
//!
//! The crate owns everything between "the engine saw an event" and "a receiver got it":
//! - [`Alert`]: one event of one job (a failure with its causes, a recovery, a missed slot, a
//!   run going too long), with the idempotency key that makes a delivery happen once;
//! - [`config`]: the `notify:` lists, the `smtp:` relay and the `notify_delivery:` tuning, parsed
//!   from a small located value tree the caller converts its YAML into;
//! - [`payload`]: the bodies each channel receives (webhook JSON, Slack text, a mail);
//! - [`sign`]: the `X-Saltpeter-Signature` header over a webhook's raw body;
//! - [`policy`]: when a failed delivery is tried again, and how many notifications one job may
//!   send to one destination in a window;
//! - [`outbox`]: the [`Outbox`] trait (durable queue of [`Notification`]s), an in-memory
//!   implementation, the SQL table a store implements it with, and the conformance suite every
//!   implementation runs;
//! - [`send`]: the [`Sender`] trait and the real one (HTTP with ureq, SMTP with lettre);
//! - [`deliver`]: the [`Deliverer`] thread that claims due rows, sends them, and records the
//!   outcome with backoff, rate limits and counters.
//!
//! The engine's part (deciding which events happened, building alerts, enqueueing them and
//! waking the deliverer) lives in the master.

pub mod config;
pub mod deliver;
pub mod outbox;
pub mod payload;
pub mod policy;
pub mod send;
pub mod sign;

use time::OffsetDateTime;

pub use config::{Channel, NotifyOn, Rule};
pub use deliver::{Clock, Deliverer, DeliveryLoop, DeliveryStats, LoopOptions, SystemClock};
pub use outbox::{MemoryOutbox, Outbox, OutboxError, Pending};
pub use send::{NetSender, SendError, Sender};

/// One machine's result, as an alert reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MachineResult {
    pub machine: String,
    /// The exit code the master recorded (253, 254, 124, 143 and 255 are its own verdicts).
    pub code: i64,
    /// Why: `exit`, `heartbeat_lost`, `not_started`, `timeout`, `killed`, `error`.
    pub cause: String,
}

/// Something a job's notify rules may want to hear about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Alert {
    pub event: NotifyOn,
    pub job: String,
    /// The run, when there is one (a missed slot has none).
    pub instance: Option<String>,
    /// When it happened, on the master's wall clock.
    pub at: OffsetDateTime,
    /// The slot a missed alert is about.
    pub slot: Option<OffsetDateTime>,
    /// Per machine results (failures and recoveries).
    pub machines: Vec<MachineResult>,
    /// Free text: why a slot was missed, how long a run has been going.
    pub detail: Option<String>,
    /// Where a person can look at the run (the dashboard or the API).
    pub link: Option<String>,
}

/// `at` moved by `by` (negative when `back`), stopping at the calendar's ends: adding a
/// `std::time::Duration` to a date panics when it overflows, and a configured duration or a
/// wrong clock must not bring the deliverer down.
pub fn shift(at: OffsetDateTime, by: std::time::Duration, back: bool) -> OffsetDateTime {
    let by = time::Duration::try_from(by).unwrap_or(time::Duration::MAX);
    if back {
        at.saturating_sub(by)
    } else {
        at.saturating_add(by)
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl Alert {
    /// The key that makes a delivery happen at most once per rule: the same event of the same
    /// run (or slot) always has the same key, whichever master process made it.
    pub fn idempotency_key(&self) -> String {
        let subject = match (&self.instance, self.slot) {
            (Some(instance), _) => instance.clone(),
            (None, Some(slot)) => slot.unix_timestamp().to_string(),
            (None, None) => self.at.unix_timestamp().to_string(),
        };
        let text = format!("{}\n{}\n{}", self.event.name(), self.job, subject);
        let digest = ring::digest::digest(&ring::digest::SHA256, text.as_bytes());
        hex(digest.as_ref().get(..16).unwrap_or_default())
    }

    /// Machines whose result was not 0.
    pub fn failed(&self) -> impl Iterator<Item = &MachineResult> {
        self.machines.iter().filter(|m| m.code != 0)
    }
}

/// One delivery to one destination: what the outbox stores and a [`Sender`] sends. The body is
/// rendered when the event happens, so a retry an hour later sends the same bytes (and the same
/// signature) as the first attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notification {
    /// Unique per event and destination: `<alert key>:<channel kind>:<destination hash>`. A
    /// second enqueue with the same key is a no-op, so an event that is noticed twice (after a
    /// restart, say) is still delivered once.
    pub key: String,
    pub job: String,
    pub event: NotifyOn,
    /// Where it goes (its `Debug` form hides URLs and secrets).
    pub channel: Channel,
    /// The one-line headline: a mail's subject, and what logs say about it.
    pub subject: String,
    /// The exact bytes sent: the webhook JSON, the Slack JSON, or the mail's text.
    pub body: Vec<u8>,
    /// When it was enqueued; also when it is first due.
    pub created_at: OffsetDateTime,
}

/// The notifications `alert` causes under `rules`: one per rule that wants the event, a
/// destination named twice counting once.
pub fn notifications_for(alert: &Alert, rules: &[Rule]) -> Vec<Notification> {
    let base = alert.idempotency_key();
    let mut out: Vec<Notification> = Vec::new();
    for rule in rules.iter().filter(|r| r.wants(alert.event)) {
        let key = format!(
            "{base}:{}:{}",
            rule.channel.kind(),
            rule.channel.destination_hash()
        );
        if out.iter().any(|n| n.key == key) {
            continue;
        }
        let (subject, body) = match &rule.channel {
            Channel::Webhook { .. } => (payload::headline(alert), payload::webhook_body(alert)),
            Channel::Slack { .. } => (payload::headline(alert), payload::slack_body(alert)),
            Channel::Email { .. } => {
                let (subject, text) = payload::mail(alert);
                (subject, text.into_bytes())
            }
        };
        out.push(Notification {
            key,
            job: alert.job.clone(),
            event: alert.event,
            channel: rule.channel.clone(),
            subject,
            body,
            created_at: alert.at,
        });
    }
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn failure() -> Alert {
        Alert {
            event: NotifyOn::Failure,
            job: "backup".into(),
            instance: Some("backup_1796522311".into()),
            at: time::macros::datetime!(2026-12-06 02:00:00 UTC),
            slot: None,
            machines: vec![
                MachineResult {
                    machine: "db1".into(),
                    code: 0,
                    cause: "exit".into(),
                },
                MachineResult {
                    machine: "db2".into(),
                    code: 253,
                    cause: "heartbeat_lost".into(),
                },
            ],
            detail: None,
            link: Some("https://cron.example.net/#run=backup_1796522311".into()),
        }
    }

    #[test]
    fn the_idempotency_key_names_the_event_and_its_run_not_the_moment() {
        let a = failure();
        let mut later = a.clone();
        later.at += time::Duration::minutes(5);
        assert_eq!(a.idempotency_key(), later.idempotency_key());
        assert_eq!(a.idempotency_key().len(), 32);
        let mut recovery = a.clone();
        recovery.event = NotifyOn::Recovery;
        assert_ne!(a.idempotency_key(), recovery.idempotency_key());
        let mut other_run = a.clone();
        other_run.instance = Some("backup_1796522312".into());
        assert_ne!(a.idempotency_key(), other_run.idempotency_key());
        assert_eq!(a.failed().count(), 1);
    }

    #[test]
    fn one_notification_per_wanting_rule_and_destination() {
        let rule = |channel: Channel, on: &[NotifyOn]| Rule {
            channel,
            on: on.iter().copied().collect(),
        };
        let hook = Channel::Webhook {
            url: "https://hooks.example/x".into(),
            secret: Some("s".into()),
        };
        let rules = [
            rule(hook.clone(), &[NotifyOn::Failure]),
            rule(hook, &[NotifyOn::Failure, NotifyOn::Recovery]),
            rule(
                Channel::Slack {
                    url: "https://chat.example/hooks/abc".into(),
                },
                &[NotifyOn::Failure],
            ),
            rule(
                Channel::Email {
                    to: "ops@example.org".into(),
                },
                &[NotifyOn::Recovery],
            ),
        ];
        let got = notifications_for(&failure(), &rules);
        assert_eq!(
            got.len(),
            2,
            "the same webhook twice counts once; mail wants recovery"
        );
        assert_ne!(got[0].key, got[1].key);
        assert!(got[0].key.starts_with(&failure().idempotency_key()));
        assert_eq!(got[0].body, payload::webhook_body(&failure()));
        assert_eq!(got[1].body, payload::slack_body(&failure()));
        let again = notifications_for(&failure(), &rules);
        assert_eq!(got, again, "the same event gives the same keys and bytes");
        let mut recovery = failure();
        recovery.event = NotifyOn::Recovery;
        let got = notifications_for(&recovery, &rules);
        assert_eq!(got.len(), 2);
        assert!(matches!(got[1].channel, Channel::Email { .. }));
        assert!(String::from_utf8_lossy(&got[1].body).contains("id "));
    }

    #[test]
    fn shifting_a_date_stops_at_the_calendars_ends() {
        let at = failure().at;
        let hour = std::time::Duration::from_secs(3600);
        assert_eq!(shift(at, hour, false), at + time::Duration::hours(1));
        assert_eq!(shift(at, hour, true), at - time::Duration::hours(1));
        let huge = std::time::Duration::MAX;
        assert!(shift(at, huge, false) > at);
        assert!(shift(at, huge, true) < at);
    }
}
