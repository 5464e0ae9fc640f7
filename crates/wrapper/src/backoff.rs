//! The pause before reconnecting to the master: exponential with full jitter and a cap.
//!
//! After a master restart every wrapper of the fleet loses its connection at the same instant.
//! A fixed schedule (1, 2, 4, 5 s) would bring all of them back in the same few milliseconds,
//! again and again while the master is still starting, and the master would face tens of
//! thousands of handshakes at once. With full jitter each attempt waits a uniformly random
//! time in `[0, min(CAP, BASE * 2^failures)]`, so the fleet arrives spread over that window.
//!
//! The cap is kept short because the master judges liveness by heartbeats only: after a
//! restart it gives every running machine a fresh 15 s deadline, and a wrapper sends its
//! first heartbeat one interval (5 s) after it reconnects. Five seconds of backoff plus five
//! of heartbeat interval leave five for the handshake itself.
//!
//! This file has no dependency but std, so that `cargo xtask bench master` includes it by
//! path and its simulated wrappers back off exactly as `sp-wrapper` does; callers bring the
//! randomness.

use std::time::Duration;

/// The ceiling after the first failure.
pub const BASE: Duration = Duration::from_secs(1);
/// The longest pause, however many attempts failed.
pub const CAP: Duration = Duration::from_secs(5);

/// The upper bound of the pause after `failures` consecutive failures:
/// `min(CAP, BASE * 2^failures)`.
pub fn ceiling(failures: u32) -> Duration {
    let factor = 1u32.checked_shl(failures).unwrap_or(u32::MAX);
    BASE.saturating_mul(factor).min(CAP)
}

/// The pause after `failures` consecutive failures, given `unit`, a uniformly random number
/// in `[0, 1]` (values outside are clamped, NaN counts as 0).
pub fn delay(failures: u32, unit: f64) -> Duration {
    let unit = if unit.is_nan() {
        0.0
    } else {
        unit.clamp(0.0, 1.0)
    };
    ceiling(failures).mul_f64(unit)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ceiling_doubles_up_to_the_cap() {
        let steps: Vec<Duration> = [0, 1, 2, 3, 4, 31, 32, u32::MAX]
            .into_iter()
            .map(ceiling)
            .collect();
        let secs = |s: u64| Duration::from_secs(s);
        assert_eq!(
            steps,
            [
                secs(1),
                secs(2),
                secs(4),
                secs(5),
                secs(5),
                secs(5),
                secs(5),
                secs(5)
            ]
        );
    }

    #[test]
    fn the_unit_maps_onto_the_whole_window_and_nothing_beyond() {
        assert_eq!(delay(0, 0.0), Duration::ZERO);
        assert_eq!(delay(0, 1.0), BASE);
        assert_eq!(delay(1, 0.5), BASE);
        assert_eq!(delay(9, 1.0), CAP);
        for odd in [-1.0, 2.0, f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            assert!(delay(9, odd) <= CAP, "{odd}");
        }
    }
}
