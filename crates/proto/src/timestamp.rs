//! Wire timestamps. The original emits Python `isoformat()` in UTC
//! (`2025-12-23T09:31:46.123456+00:00`, fraction omitted when it is zero); newer Pythons and
//! other clients may send `Z`. We accept RFC 3339 with either offset, with or without a
//! fraction (and, leniently, Python's `str()` form with a space), and always emit `+00:00` with
//! exactly six fractional digits, which every Python `fromisoformat` accepts.
//!
//! These times are informational only: liveness and timeouts are judged on the master's
//! monotonic clock, never on a timestamp a wrapper sent.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use time::format_description::well_known::Rfc3339;
use time::{OffsetDateTime, UtcOffset};

/// A point in time as carried on the wire, normalised to UTC.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(OffsetDateTime);

/// A timestamp string that is not RFC 3339.
#[derive(Debug, thiserror::Error)]
#[error("invalid timestamp {input:?}: expected RFC 3339 such as 2025-12-23T09:31:46.123456+00:00")]
pub struct TimestampError {
    input: String,
}

impl Timestamp {
    /// Wraps a time, converting it to UTC.
    ///
    /// A time whose UTC equivalent falls outside the years RFC 3339 can spell (0000..=9999,
    /// such as `9999-12-31T23:59:59-01:00`) is clamped to the nearest spellable instant:
    /// `OffsetDateTime::to_offset` would panic on some of them, and what is printed must
    /// parse back. [`Timestamp::parse`] rejects such input instead of clamping it.
    pub fn new(at: OffsetDateTime) -> Self {
        Self::checked_new(at).unwrap_or(if at.year() > 0 { LATEST } else { EARLIEST })
    }

    /// Wraps a time if its UTC equivalent is within the years RFC 3339 can spell.
    pub fn checked_new(at: OffsetDateTime) -> Option<Self> {
        at.checked_to_offset(UtcOffset::UTC)
            .filter(|utc| (0..=9999).contains(&utc.year()))
            .map(Self)
    }

    /// The current wall-clock time. Only for stamping outgoing messages.
    pub fn now() -> Self {
        Self(OffsetDateTime::now_utc())
    }

    /// The wrapped UTC time.
    pub fn get(self) -> OffsetDateTime {
        self.0
    }

    /// Parses the accepted input forms.
    pub fn parse(input: &str) -> Result<Self, TimestampError> {
        let err = || TimestampError {
            input: input.chars().take(64).collect(),
        };
        // Python's str(datetime) uses a space where RFC 3339 has `T`; accept it. Byte 10 being
        // an ASCII space guarantees that slicing around it stays on char boundaries.
        let text: std::borrow::Cow<'_, str> = if input.len() > 10 && input.as_bytes()[10] == b' ' {
            format!("{}T{}", &input[..10], &input[11..]).into()
        } else {
            input.into()
        };
        OffsetDateTime::parse(&text, &Rfc3339)
            .ok()
            .and_then(Self::checked_new)
            .ok_or_else(err)
    }
}

/// The first and last instants RFC 3339 can spell, in UTC.
const EARLIEST: Timestamp = Timestamp(time::macros::datetime!(0000-01-01 00:00:00 UTC));
const LATEST: Timestamp = Timestamp(time::macros::datetime!(9999-12-31 23:59:59.999_999 UTC));

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let t = self.0;
        write!(
            f,
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:06}+00:00",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute(),
            t.second(),
            t.microsecond()
        )
    }
}

impl fmt::Debug for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl From<OffsetDateTime> for Timestamp {
    fn from(at: OffsetDateTime) -> Self {
        Self::new(at)
    }
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = std::borrow::Cow::<'de, str>::deserialize(d)?;
        Timestamp::parse(&text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_whose_utc_year_rfc_3339_cannot_spell_are_refused_or_clamped() {
        // Each parses as RFC 3339, but its UTC instant falls before year 0 or after 9999,
        // where the printed form would not parse back.
        for text in ["0000-01-01T00:00:00.5+00:01", "9999-12-31T23:59:59-01:00"] {
            assert!(Timestamp::parse(text).is_err(), "{text}");
        }
        let early = OffsetDateTime::parse("0000-01-01T00:00:00+00:01", &Rfc3339).unwrap();
        let late = OffsetDateTime::parse("9999-12-31T23:59:59-01:00", &Rfc3339).unwrap();
        for at in [early, late] {
            let clamped = Timestamp::new(at).to_string();
            assert!(Timestamp::parse(&clamped).is_ok(), "{clamped}");
        }
        assert_eq!(
            Timestamp::new(early).to_string(),
            "0000-01-01T00:00:00.000000+00:00"
        );
        assert_eq!(
            Timestamp::new(late).to_string(),
            "9999-12-31T23:59:59.999999+00:00"
        );
    }

    #[test]
    fn accepts_every_spelling_the_original_and_newer_pythons_emit() {
        let cases = [
            (
                "2025-12-23T09:31:46.123456+00:00",
                "2025-12-23T09:31:46.123456+00:00",
            ),
            (
                "2025-12-23T09:31:46.123456Z",
                "2025-12-23T09:31:46.123456+00:00",
            ),
            (
                "2025-12-23T09:31:49+00:00",
                "2025-12-23T09:31:49.000000+00:00",
            ),
            (
                "2025-12-23T09:31:50.5+00:00",
                "2025-12-23T09:31:50.500000+00:00",
            ),
            (
                "2025-12-23 09:31:46.123456+00:00",
                "2025-12-23T09:31:46.123456+00:00",
            ),
            (
                "2025-12-23T11:31:46+02:00",
                "2025-12-23T09:31:46.000000+00:00",
            ),
        ];
        for (input, want) in cases {
            let ts = Timestamp::parse(input).unwrap_or_else(|e| panic!("{input}: {e}"));
            assert_eq!(ts.to_string(), want, "{input}");
        }
    }

    #[test]
    fn rejects_what_is_not_a_time() {
        for input in [
            "",
            "yesterday",
            "2025-12-23",
            "2025-13-01T00:00:00Z",
            "2025-12-23T09:31:46",
        ] {
            assert!(
                Timestamp::parse(input).is_err(),
                "{input} should be rejected"
            );
        }
    }

    #[test]
    fn times_beyond_the_representable_range_in_utc_are_errors() {
        // Each is valid RFC 3339 whose UTC equivalent lies in year 10000 or -10000, where
        // `to_offset` panics.
        for input in [
            "9999-12-31T23:59:59-00:01",
            "9999-12-31T23:00:00-23:59",
            "-9999-01-01T00:00:00+00:01",
        ] {
            assert!(Timestamp::parse(input).is_err(), "{input}");
        }
        let edge = OffsetDateTime::parse("9999-12-31T23:59:59-01:00", &Rfc3339);
        if let Ok(edge) = edge {
            assert_eq!(Timestamp::new(edge).get().year(), 9999);
        }
        assert_eq!(
            Timestamp::parse("9999-12-31T22:59:59-01:00")
                .map(|t| t.to_string())
                .ok(),
            Some("9999-12-31T23:59:59.000000+00:00".to_owned())
        );
    }

    #[test]
    fn non_ascii_input_does_not_panic() {
        assert!(Timestamp::parse("2025-12-2é 09:31:46Z").is_err());
        assert!(Timestamp::parse("2025-12-23é09:31:46Z").is_err());
    }
}
