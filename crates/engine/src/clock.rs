//! The master's two clocks. Liveness, timeouts and kill grace are judged on tokio's monotonic
//! [`Instant`], so a wall-clock step (NTP, an operator's `date -s`) can never fire or delay a
//! verdict, and tests can pause time. Wall-clock time is only used to decide when cron slots
//! fall due and to stamp records for people.
//!
//! [`Clock`] derives wall time from the monotonic clock plus an anchor, re-anchored on every
//! read in production. In tests built with a paused tokio clock, [`Clock::paused`] keeps the
//! anchor fixed so wall time advances exactly with the paused monotonic clock.

use time::OffsetDateTime;
use tokio::time::Instant;

/// Source of "now" for the engine.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    mode: Mode,
}

#[derive(Clone, Copy, Debug)]
enum Mode {
    /// The system's wall clock.
    System,
    /// Wall time = `wall_at_anchor + (Instant::now() - anchor)`.
    Anchored {
        anchor: Instant,
        wall_at_anchor: OffsetDateTime,
    },
}

impl Clock {
    /// The real clock.
    pub fn system() -> Self {
        Self { mode: Mode::System }
    }

    /// A clock whose wall time starts at `wall` and follows tokio's (possibly paused) clock.
    pub fn paused(wall: OffsetDateTime) -> Self {
        Self {
            mode: Mode::Anchored {
                anchor: Instant::now(),
                wall_at_anchor: wall,
            },
        }
    }

    /// The monotonic now.
    pub(crate) fn instant(&self) -> Instant {
        Instant::now()
    }

    /// The wall-clock now, in UTC.
    pub(crate) fn wall(&self) -> OffsetDateTime {
        match self.mode {
            Mode::System => OffsetDateTime::now_utc(),
            Mode::Anchored {
                anchor,
                wall_at_anchor,
            } => wall_at_anchor + (Instant::now() - anchor),
        }
    }
}
