//! Notifications: what happened to a job, said to the people and tools that asked to hear it.
//!
//! This module owns the pure parts, which need no network and no clock of their own:
//! - [`Alert`]: one event of one job (a failure with its causes, a recovery, a missed slot, a
//!   run going too long), with the idempotency key that makes a delivery happen once;
//! - [`payload`]: the bodies each channel receives (webhook JSON, Slack text, a mail);
//! - [`sign`]: the `X-Saltpeter-Signature` header over a webhook's raw body;
//! - [`policy`]: when a failed delivery is tried again, and how many alerts a job may send in
//!   a window.
//!
//! Which rules apply to a job comes from `config::notify`.

pub mod payload;
pub mod policy;
pub mod sign;

use time::OffsetDateTime;

pub use crate::config::notify::NotifyOn;

/// One machine's result, as an alert reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MachineResult {
    pub machine: String,
    /// The exit code the master recorded (253, 254, 124, 143 and 255 are its own verdicts).
    pub code: i64,
    /// Why: `exit`, `heartbeat_lost`, `not_started`, `timeout`, `killed`, ...
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
        digest.as_ref()[..16]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    /// Machines whose result was not 0.
    pub fn failed(&self) -> impl Iterator<Item = &MachineResult> {
        self.machines.iter().filter(|m| m.code != 0)
    }
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
}
