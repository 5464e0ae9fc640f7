//! Who hears of the engine's [`EngineEvent`]s (missed slots, catch-ups, retries), owned by the
//! wiring.
//!
//! The engine hands each event to one bounded channel without waiting (a full channel drops
//! the event and logs it, so a slow consumer never holds up run state). One task on the main
//! runtime takes the events off that channel and gives each, in order, to every consumer of a
//! [`Fanout`]: today a log line and the `/metrics` counters. A further consumer, such as a
//! notifier, is one more [`Fanout::with`] in `server.rs`. Consumers run on that task, so they
//! must not block: one that has slow work to do queues it for a thread of its own.

use std::sync::Arc;

use saltpeter_engine::EngineEvent;
use saltpeter_metrics::Metrics;
use tokio::sync::mpsc;

/// One consumer of the engine's events.
pub(crate) type Consumer = Box<dyn FnMut(&EngineEvent) + Send>;

/// The consumers every event is given to, in the order they were added.
#[derive(Default)]
pub(crate) struct Fanout {
    consumers: Vec<Consumer>,
}

impl std::fmt::Debug for Fanout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fanout")
            .field("consumers", &self.consumers.len())
            .finish()
    }
}

impl Fanout {
    /// Adds a consumer.
    pub(crate) fn with(mut self, consumer: impl FnMut(&EngineEvent) + Send + 'static) -> Self {
        self.consumers.push(Box::new(consumer));
        self
    }

    /// Gives one event to every consumer.
    pub(crate) fn deliver(&mut self, event: &EngineEvent) {
        for consumer in &mut self.consumers {
            consumer(event);
        }
    }

    /// Delivers events until the engine drops its sender (when it stops).
    pub(crate) async fn run(mut self, mut events: mpsc::Receiver<EngineEvent>) {
        while let Some(event) = events.recv().await {
            self.deliver(&event);
        }
    }
}

/// Logs an event at info level, its fields as structured fields.
pub(crate) fn log(event: &EngineEvent) {
    match event {
        EngineEvent::Missed {
            job,
            slot,
            reason,
            count,
            at_least,
        } => tracing::info!(
            job = %job,
            slot = %saltpeter_store::rfc3339(*slot),
            reason = reason.as_str(),
            count,
            at_least,
            "Missed slot."
        ),
        EngineEvent::CaughtUp {
            job,
            slot,
            instance,
        } => tracing::info!(
            job = %job,
            slot = %saltpeter_store::rfc3339(*slot),
            instance = %instance,
            "Caught up a missed slot."
        ),
        EngineEvent::Retry {
            job,
            instance,
            machine,
            retcode,
            next,
            max,
        } => tracing::info!(
            job = %job,
            instance = %instance,
            machine = %machine,
            retcode,
            next,
            max,
            "Machine failed; retrying."
        ),
    }
}

/// Counts missed slots and retries into `/metrics`.
pub(crate) fn count(metrics: Arc<Metrics>) -> impl FnMut(&EngineEvent) + Send + 'static {
    move |event| match event {
        EngineEvent::Missed {
            job, reason, count, ..
        } => metrics.missed_slots(job, reason.as_str(), *count),
        EngineEvent::Retry { job, .. } => metrics.retry(job),
        EngineEvent::CaughtUp { .. } => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use saltpeter_metrics::Gauges;
    use saltpeter_store::MissedReason;
    use time::macros::datetime;

    #[test]
    fn every_consumer_gets_every_event_in_order() {
        let seen = Arc::new(parking_lot::Mutex::new(Vec::new()));
        let (a, b) = (seen.clone(), seen.clone());
        let mut fanout = Fanout::default()
            .with(move |e: &EngineEvent| a.lock().push(("a", e.clone())))
            .with(move |e: &EngineEvent| b.lock().push(("b", e.clone())));
        let caught = EngineEvent::CaughtUp {
            job: "j".into(),
            slot: datetime!(2026-06-01 12:00 UTC),
            instance: "j_1".into(),
        };
        fanout.deliver(&caught);
        let names: Vec<&str> = seen.lock().iter().map(|(n, _)| *n).collect();
        assert_eq!(names, ["a", "b"]);
    }

    #[test]
    fn missed_slots_and_retries_are_counted_by_job() {
        let metrics = Arc::new(Metrics::default());
        let mut fanout = Fanout::default().with(log).with(count(metrics.clone()));
        let slot = datetime!(2026-06-01 12:00 UTC);
        for (reason, count) in [
            (MissedReason::MasterDown, 1),
            (MissedReason::MasterDown, 40),
            (MissedReason::Overlap, 1),
        ] {
            fanout.deliver(&EngineEvent::Missed {
                job: "backup".into(),
                slot,
                reason,
                count,
                at_least: false,
            });
        }
        for next in [2, 3] {
            fanout.deliver(&EngineEvent::Retry {
                job: "backup".into(),
                instance: "backup_1".into(),
                machine: "m1".into(),
                retcode: 1,
                next,
                max: 3,
            });
        }
        let text = metrics.render(&Gauges::default());
        for line in [
            "saltpeter_missed_slots_total{job_name=\"backup\",reason=\"master_down\"} 41",
            "saltpeter_missed_slots_total{job_name=\"backup\",reason=\"overlap\"} 1",
            "saltpeter_retries_total{job_name=\"backup\"} 2",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?}");
        }
    }
}
