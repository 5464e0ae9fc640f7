//! When a failed delivery is tried again, and how many notifications one job may send.
//!
//! Retries back off exponentially up to a cap, with "equal jitter" (a wait between half and
//! all of the current step), and give up after a fixed number of attempts: a receiver that is
//! down for an hour is not hammered, one that is gone for good does not hold its outbox row
//! forever, and many rows failing together do not retry in lockstep.
//!
//! The per-job limit keeps a job that fails every second from flooding a channel. It counts
//! first attempts per job and destination; what it holds back is dropped, counted and logged,
//! not queued (a queue would deliver the flood later, which is what the limit prevents).

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use time::OffsetDateTime;

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
    /// is a number in [0, 1) (the jitter), passed in so tests choose it; the wait is between
    /// half and all of `base * 2^(failed-1)`, capped.
    pub fn after(&self, failed: u32, unit: f64) -> Option<Duration> {
        if failed >= self.attempts {
            return None;
        }
        let exponent = failed.saturating_sub(1).min(30);
        let ceiling = self.base.saturating_mul(1u32 << exponent).min(self.cap);
        let unit = if unit.is_finite() {
            unit.clamp(0.0, 1.0)
        } else {
            0.0
        };
        Some(ceiling / 2 + (ceiling / 2).mul_f64(unit))
    }

    /// A jitter unit in [0, 1) derived from a notification's key and attempt: spread over
    /// rows, yet the same on every run, so tests and logs are reproducible.
    pub fn jitter(key: &str, attempt: u32) -> f64 {
        let text = format!("{key}\n{attempt}");
        let digest = ring::digest::digest(&ring::digest::SHA256, text.as_bytes());
        let mut bytes = [0u8; 8];
        for (b, d) in bytes.iter_mut().zip(digest.as_ref()) {
            *b = *d;
        }
        // 53 random bits over 2^53: uniform in [0, 1).
        (u64::from_be_bytes(bytes) >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// At most `max` notifications per job and destination in any `window`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimitConfig {
    pub max: u32,
    pub window: Duration,
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        RateLimitConfig {
            max: 10,
            window: Duration::from_secs(600),
        }
    }
}

/// At most `max` admissions in any `window` for one key.
#[derive(Debug)]
pub struct RateLimit {
    max: usize,
    window: Duration,
    sent: VecDeque<OffsetDateTime>,
    /// Admissions refused since this limiter was made.
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

    /// Whether one more may go out at `now`; counts it when it may. A clock that steps back
    /// keeps earlier admissions in the window rather than freeing them.
    pub fn admit(&mut self, now: OffsetDateTime) -> bool {
        while self.sent.front().is_some_and(|t| now - *t >= self.window) {
            self.sent.pop_front();
        }
        if self.sent.len() >= self.max {
            self.suppressed = self.suppressed.saturating_add(1);
            return false;
        }
        self.sent.push_back(now);
        true
    }

    /// Whether nothing admitted is still inside the window at `now` (the limiter can go).
    fn idle(&self, now: OffsetDateTime) -> bool {
        self.sent.back().is_none_or(|t| now - *t >= self.window)
    }
}

/// One [`RateLimit`] per job and destination, forgotten once idle so the map stays as small
/// as the set of recently active jobs.
#[derive(Debug)]
pub struct RateLimiter {
    config: RateLimitConfig,
    limits: HashMap<(String, String), RateLimit>,
}

impl RateLimiter {
    pub fn new(config: RateLimitConfig) -> Self {
        RateLimiter {
            config,
            limits: HashMap::new(),
        }
    }

    /// Whether a notification of `job` to `destination` may go out at `now`.
    pub fn admit(&mut self, job: &str, destination: &str, now: OffsetDateTime) -> bool {
        // Bound the map: a burst over many jobs leaves idle limiters behind.
        if self.limits.len() > 4096 {
            self.limits.retain(|_, l| !l.idle(now));
        }
        let max = usize::try_from(self.config.max).unwrap_or(usize::MAX);
        self.limits
            .entry((job.to_owned(), destination.to_owned()))
            .or_insert_with(|| RateLimit::new(max, self.config.window))
            .admit(now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    #[test]
    fn retries_double_up_to_the_cap_and_then_stop() {
        let r = Retry::default();
        let full: Vec<u64> = (1..r.attempts)
            .map(|n| r.after(n, 0.999_999).map_or(0, |d| d.as_secs()))
            .collect();
        assert_eq!(&full[..8], [4, 9, 19, 39, 79, 159, 319, 599]);
        assert!(full.iter().all(|s| *s < 600));
        assert_eq!(r.after(r.attempts, 0.5), None);
        assert_eq!(
            r.after(3, 0.0),
            Some(Duration::from_secs(10)),
            "half the step"
        );
        assert_eq!(r.after(1, f64::NAN), Some(Duration::from_millis(2500)));
        assert_eq!(r.after(40, 0.5), None);
        let long = Retry {
            attempts: u32::MAX,
            ..r
        };
        assert_eq!(long.after(1000, 1.0), Some(long.cap));
    }

    #[test]
    fn jitter_is_a_unit_spread_over_keys_and_stable() {
        let units: Vec<f64> = (0..200)
            .map(|i| Retry::jitter(&format!("k{i}"), 1))
            .collect();
        assert!(units.iter().all(|u| (0.0..1.0).contains(u)));
        assert!(units.iter().any(|u| *u < 0.25) && units.iter().any(|u| *u > 0.75));
        assert_eq!(Retry::jitter("k", 3), Retry::jitter("k", 3));
        assert_ne!(Retry::jitter("k", 3), Retry::jitter("k", 4));
    }

    #[test]
    fn a_key_may_send_max_per_window() {
        let start = datetime!(2026-12-06 02:00:00 UTC);
        let mut limit = RateLimit::new(3, Duration::from_secs(60));
        let at = |s: i64| start + time::Duration::seconds(s);
        assert!(limit.admit(at(0)) && limit.admit(at(1)) && limit.admit(at(2)));
        assert!(!limit.admit(at(30)));
        assert_eq!(limit.suppressed, 1);
        assert!(limit.admit(at(60)), "the first one left the window");
        assert!(!limit.admit(at(60)), "two of the three are still in it");
        assert!(
            !limit.admit(at(-100)),
            "a clock stepping back frees nothing"
        );
    }

    #[test]
    fn the_limiter_counts_each_job_and_destination_apart() {
        let now = datetime!(2026-12-06 02:00:00 UTC);
        let mut limiter = RateLimiter::new(RateLimitConfig {
            max: 1,
            window: Duration::from_secs(60),
        });
        assert!(limiter.admit("a", "hook", now));
        assert!(!limiter.admit("a", "hook", now));
        assert!(limiter.admit("a", "mail", now));
        assert!(limiter.admit("b", "hook", now));
        for i in 0..5000 {
            limiter.admit(&format!("j{i}"), "hook", now);
        }
        let later = now + time::Duration::minutes(2);
        assert!(limiter.admit("x", "hook", later));
        assert!(limiter.limits.len() < 10, "idle limiters were forgotten");
    }
}
