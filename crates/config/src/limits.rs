//! Caps on what API and UI clients control: how many jobs one UI connection may follow, how
//! many names one command may carry, how large a page or a timeline may be, and how long a
//! timeline's window may span.
//!
//! Each cap is a `saltpeter_config` key. A request over a cap gets an error reply that names
//! the key; it is never served partly and never crashes the master. Every key has its own hard
//! ceiling as well, so that no configuration can bring back unbounded behaviour.
// Input from clients, files or wrappers reaches arithmetic here, so every operation that could
// overflow or index out of bounds is written checked ("Totality" in docs/ARCHITECTURE.md).
#![warn(
    clippy::arithmetic_side_effects,
    clippy::indexing_slicing,
    clippy::string_slice
)]

use super::raw::Node;

/// The caps on client-controlled counts, with their defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// `ui_max_subscriptions`: jobs one `/ws` connection may be subscribed to at once.
    pub ui_max_subscriptions: usize,
    /// `ui_max_names_per_command`: job names one `subscribe` or `unsubscribe` may carry.
    pub ui_max_names_per_command: usize,
    /// `api_max_runs_page`: the largest `limit` of `GET /api/v1/jobs/{job}/runs`.
    pub api_max_runs_page: usize,
    /// `timeline_max_rows`: the largest `limit` of `/timeline` and `/api/v1/timeline`, and the
    /// rows of a `getTimeline` answer.
    pub timeline_max_rows: usize,
    /// `timeline_max_days`: the longest window (`end_date` minus `start_date`) a timeline
    /// query may ask for, in days.
    pub timeline_max_days: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            ui_max_subscriptions: 256,
            ui_max_names_per_command: 256,
            api_max_runs_page: 500,
            timeline_max_rows: 5000,
            timeline_max_days: 400,
        }
    }
}

/// One key: its name and the largest value a configuration may give it.
struct Key {
    name: &'static str,
    ceiling: u64,
}

/// The keys, each with a ceiling far above any sensible setting but low enough that the
/// memory or work it allows stays bounded (and that `days * 86_400` fits any integer type).
const KEYS: [Key; 5] = [
    Key {
        name: "ui_max_subscriptions",
        ceiling: 65_536,
    },
    Key {
        name: "ui_max_names_per_command",
        ceiling: 65_536,
    },
    Key {
        name: "api_max_runs_page",
        ceiling: 100_000,
    },
    Key {
        name: "timeline_max_rows",
        ceiling: 1_000_000,
    },
    Key {
        name: "timeline_max_days",
        ceiling: 36_500,
    },
];

/// The caps one file sets; `None` where it says nothing (or something invalid).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct PartialLimits {
    values: [Option<u64>; KEYS.len()],
}

impl PartialLimits {
    /// Reads `key` if it is one of the caps: `None` when it is not (the caller handles it),
    /// otherwise whether its value was valid (an invalid value is not recorded).
    pub(crate) fn parse(&mut self, key: &str, node: &Node) -> Option<Result<(), String>> {
        let (k, slot) = KEYS
            .iter()
            .zip(self.values.iter_mut())
            .find(|(k, _)| k.name == key)?;
        let result = node
            .as_count("a whole number")
            .and_then(|n| match n {
                0 => Err("must be at least 1".to_owned()),
                n if n > k.ceiling => Err(format!("must be at most {}, got {n}", k.ceiling)),
                n => Ok(n),
            })
            .map(|n| *slot = Some(n));
        Some(result)
    }
}

impl Limits {
    /// Applies one file's caps on top of these: every key the file sets wins.
    pub(crate) fn apply(&mut self, p: &PartialLimits) {
        // The ceilings are far below `u32::MAX`, so these conversions never saturate.
        let count = |v: u64| usize::try_from(v).unwrap_or(usize::MAX);
        let [subs, names, page, rows, days] = p.values;
        if let Some(v) = subs {
            self.ui_max_subscriptions = count(v);
        }
        if let Some(v) = names {
            self.ui_max_names_per_command = count(v);
        }
        if let Some(v) = page {
            self.api_max_runs_page = count(v);
        }
        if let Some(v) = rows {
            self.timeline_max_rows = count(v);
        }
        if let Some(v) = days {
            self.timeline_max_days = u32::try_from(v).unwrap_or(u32::MAX);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raw::{Pos, Value};

    fn node(value: Value) -> Node {
        Node {
            value,
            pos: Pos::default(),
        }
    }

    #[test]
    fn each_key_is_parsed_within_its_bounds() {
        let mut p = PartialLimits::default();
        assert_eq!(p.parse("debug", &node(Value::Int(1))), None);
        assert_eq!(
            p.parse("ui_max_subscriptions", &node(Value::Int(8))),
            Some(Ok(()))
        );
        assert_eq!(
            p.parse("timeline_max_days", &node(Value::Str("31".into()))),
            Some(Ok(()))
        );
        for bad in [
            Value::Int(0),
            Value::Int(-1),
            Value::Int(65_537),
            Value::Int(i128::MAX),
            Value::Float(2.5),
            Value::Str("many".into()),
            Value::Null,
        ] {
            let r = p.parse("ui_max_subscriptions", &node(bad.clone()));
            assert!(matches!(r, Some(Err(_))), "{bad:?}");
        }
        let mut limits = Limits::default();
        limits.apply(&p);
        assert_eq!(limits.ui_max_subscriptions, 8);
        assert_eq!(limits.timeline_max_days, 31);
        assert_eq!(
            limits.timeline_max_rows,
            Limits::default().timeline_max_rows
        );
    }
}
