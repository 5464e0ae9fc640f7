//! When a failed delivery is tried again, and how many alerts one job may send.
//!
//! Retries back off exponentially with full jitter up to a cap, and give up after a fixed
//! number of attempts: a receiver that is down for an hour is not hammered, and one that is
//! gone for good does not hold its outbox row forever. The per-job limit keeps a job that fails
//! every second from flooding a channel; what it holds back is counted, not queued.

use std::collections::VecDeque;
use std::time::Duration;

/// How deliveries are retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retry {
    /// Delay before the second attempt, doubled after each failure...
    pub base: Duration,
    /// ...up to this.
    pub cap: Duration,
    /// Attempts in all, the first included.
    pub attempts: u32,
}

impl Default for Retry {
    fn default() -> Self {
        Retry {
            base: Duration::from_secs(5),
            cap: Duration::from_secs(600),
            attempts: 12,
        }
    }
}

impl Retry {
    /// The wait after `failed` failed attempts, or `None` when it is time to give up. `unit`
    /// is a random number in [0, 1) (the jitter), passed in so tests choose it.
    pub fn after(&self, failed: u32, unit: f64) -> Option<Duration> {
        if failed >= self.attempts {
            return None;
        }
        let exponent = failed.saturating_sub(1).min(30);
        let ceiling = self.base.saturating_mul(1u32 << exponent).min(self.cap);
        Some(ceiling.mul_f64(unit.clamp(0.0, 1.0)))
    }
}

/// At most `max` alerts in any `window` for one job.
#[derive(Debug)]
pub struct RateLimit {
    max: usize,
    window: Duration,
    sent: VecDeque<tokio::time::Instant>,
    /// Alerts held back since the last one that went out.
    pub suppressed: u64,
}

impl RateLimit {
    pub fn new(max: usize, window: Duration) -> Self {
        RateLimit {
            max: max.max(1),
            window,
            sent: VecDeque::new(),
            suppressed: 0,
        }
    }

    /// Whether an alert may go out at `now`; counts it when it may.
    pub fn admit(&mut self, now: tokio::time::Instant) -> bool {
        while self
            .sent
            .front()
            .is_some_and(|t| now.saturating_duration_since(*t) >= self.window)
        {
            self.sent.pop_front();
        }
        if self.sent.len() >= self.max {
            self.suppressed = self.suppressed.saturating_add(1);
            return false;
        }
        self.sent.push_back(now);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_double_up_to_the_cap_and_then_stop() {
        let r = Retry::default();
        let full: Vec<u64> = (1..r.attempts)
            .map(|n| r.after(n, 0.999_999).map_or(0, |d| d.as_secs()))
            .collect();
        assert_eq!(&full[..8], [4, 9, 19, 39, 79, 159, 319, 599]);
        assert!(full.iter().all(|s| *s < 600));
        assert_eq!(r.after(r.attempts, 0.5), None);
        assert_eq!(r.after(3, 0.0), Some(Duration::ZERO));
        assert_eq!(r.after(40, 0.5), None);
        let long = Retry {
            attempts: u32::MAX,
            ..r
        };
        assert_eq!(long.after(1000, 1.0), Some(long.cap));
    }

    #[test]
    fn a_job_may_send_max_alerts_per_window() {
        let start = tokio::time::Instant::now();
        let mut limit = RateLimit::new(3, Duration::from_secs(60));
        let at = |s: u64| start + Duration::from_secs(s);
        assert!(limit.admit(at(0)) && limit.admit(at(1)) && limit.admit(at(2)));
        assert!(!limit.admit(at(30)));
        assert_eq!(limit.suppressed, 1);
        assert!(limit.admit(at(60)), "the first one left the window");
        assert!(!limit.admit(at(60)), "two of the three are still in it");
    }
}
