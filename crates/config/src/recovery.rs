//! What a job does about slots it could not run and machines that failed: the keys
//! `catch_up`, `starting_deadline`, `missed_limit`, `retries`, `retry_delay` and `retry_on`,
//! read into a validated [`Recovery`].
//!
//! Every value is bounded here, so the engine can add the durations to instants and count
//! attempts without any further check failing at run time.
// Input from files reaches arithmetic here, so every operation that could overflow or index
// out of bounds is written checked ("Totality" in docs/ARCHITECTURE.md).
#![warn(
    clippy::arithmetic_side_effects,
    clippy::indexing_slicing,
    clippy::string_slice
)]

use std::collections::BTreeMap;
use std::time::Duration;

use saltpeter_proto::{
    EXIT_ERROR, EXIT_HEARTBEAT_LOST, EXIT_KILLED, EXIT_NOT_STARTED, EXIT_SUCCESS, EXIT_TIMEOUT,
};

use super::raw::{Node, Value};

/// The keys this module reads.
pub(crate) const KEYS: [&str; 6] = [
    "catch_up",
    "starting_deadline",
    "missed_limit",
    "retries",
    "retry_delay",
    "retry_on",
];

/// The most retries a job may ask for.
pub const MAX_RETRIES: u32 = 10;
/// The longest `retry_delay` and `starting_deadline`: one day. Longer waits are better served
/// by the schedule itself.
pub const MAX_DELAY_SECS: u64 = 86_400;
/// `starting_deadline` when `catch_up: last` is set without it.
pub const DEFAULT_STARTING_DEADLINE: Duration = Duration::from_secs(300);
/// `retry_delay` when absent.
pub const DEFAULT_RETRY_DELAY: Duration = Duration::from_secs(60);
/// `missed_limit` when absent: missed slots recorded one by one per job and scan.
pub const DEFAULT_MISSED_LIMIT: u32 = 100;
/// The largest `missed_limit`.
pub const MAX_MISSED_LIMIT: u32 = 10_000;

/// `catch_up`: whether a missed slot is fired late.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CatchUp {
    /// Missed slots are only recorded (the default, and the original's behaviour).
    #[default]
    None,
    /// The most recent missed slot fires once, if it is within `starting_deadline`.
    Last,
}

/// One entry of `retry_on`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RetryCause {
    /// `exit`: any non-zero exit of the command itself.
    Exit,
    /// A named master verdict or an explicit exit code.
    Code(i64),
}

/// `retry_on`: which results of a machine are retried.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RetryOn {
    /// Every failure except a kill (143): the default.
    AnyFailure,
    /// Exactly these.
    Listed(Vec<RetryCause>),
}

impl RetryOn {
    /// Whether a machine that ended with `retcode` (from the command itself when `from_exit`)
    /// is retried. Success never is; 143 only when listed by number.
    pub fn matches(&self, retcode: i64, from_exit: bool) -> bool {
        if retcode == EXIT_SUCCESS {
            return false;
        }
        match self {
            RetryOn::AnyFailure => retcode != EXIT_KILLED,
            RetryOn::Listed(list) => list.iter().any(|c| match c {
                RetryCause::Exit => from_exit && retcode != EXIT_KILLED,
                RetryCause::Code(code) => *code == retcode,
            }),
        }
    }
}

/// A job's policy for missed slots and failed machines.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Recovery {
    pub catch_up: CatchUp,
    /// How late a missed slot may still be fired by `catch_up: last`.
    pub starting_deadline: Duration,
    /// Missed slots recorded one by one per job and scan; the rest are summed up in one record.
    pub missed_limit: u32,
    /// Further attempts per machine after the first (0..=[`MAX_RETRIES`]).
    pub retries: u32,
    pub retry_delay: Duration,
    pub retry_on: RetryOn,
}

impl Default for Recovery {
    fn default() -> Self {
        Self {
            catch_up: CatchUp::None,
            starting_deadline: DEFAULT_STARTING_DEADLINE,
            missed_limit: DEFAULT_MISSED_LIMIT,
            retries: 0,
            retry_delay: DEFAULT_RETRY_DELAY,
            retry_on: RetryOn::AnyFailure,
        }
    }
}

/// Reads the keys of [`KEYS`] from a job's mapping. Each bad value is reported through
/// `error(node, key, message)` (the caller turns it into a `file:line` problem) and replaced by
/// its default.
pub(crate) fn parse(
    keys: &BTreeMap<String, &Node>,
    mut error: impl FnMut(&Node, &str, String),
) -> Recovery {
    let mut out = Recovery::default();
    let present = |key: &str| keys.get(key).copied().filter(|n| n.value != Value::Null);
    if let Some(node) = present("catch_up") {
        match node.scalar_text().as_deref() {
            Some("none") => out.catch_up = CatchUp::None,
            Some("last") => out.catch_up = CatchUp::Last,
            _ => error(
                node,
                "catch_up",
                format!("expected none or last, got {}", shown(node)),
            ),
        }
    }
    if let Some(node) = present("starting_deadline") {
        match seconds(node, 1, MAX_DELAY_SECS) {
            Ok(d) => out.starting_deadline = d,
            Err(e) => error(node, "starting_deadline", e),
        }
    }
    if let Some(node) = present("missed_limit") {
        match node.as_count("a whole number") {
            Ok(n) if (1..=u64::from(MAX_MISSED_LIMIT)).contains(&n) => {
                out.missed_limit = u32::try_from(n).unwrap_or(MAX_MISSED_LIMIT);
            }
            Ok(n) => error(
                node,
                "missed_limit",
                format!("expected 1 to {MAX_MISSED_LIMIT}, got {n}"),
            ),
            Err(e) => error(node, "missed_limit", e),
        }
    }
    if let Some(node) = present("retries") {
        match node.as_count("a whole number of retries") {
            Ok(n) if n <= u64::from(MAX_RETRIES) => {
                out.retries = u32::try_from(n).unwrap_or(MAX_RETRIES);
            }
            Ok(n) => error(
                node,
                "retries",
                format!("expected 0 to {MAX_RETRIES}, got {n}"),
            ),
            Err(e) => error(node, "retries", e),
        }
    }
    if let Some(node) = present("retry_delay") {
        match seconds(node, 0, MAX_DELAY_SECS) {
            Ok(d) => out.retry_delay = d,
            Err(e) => error(node, "retry_delay", e),
        }
    }
    if let Some(node) = present("retry_on") {
        let items: Vec<&Node> = match &node.value {
            Value::Seq(items) => items.iter().collect(),
            _ => vec![node],
        };
        let mut list = Vec::new();
        for item in items {
            match retry_cause(item) {
                Ok(c) => list.push(c),
                Err(e) => error(item, "retry_on", e),
            }
        }
        list.sort();
        list.dedup();
        if list.is_empty() {
            error(
                node,
                "retry_on",
                "the list is empty; leave the key out to retry every failure but a kill".into(),
            );
        } else {
            out.retry_on = RetryOn::Listed(list);
        }
    }
    out
}

/// A whole number of seconds within `min..=max`.
fn seconds(node: &Node, min: u64, max: u64) -> Result<Duration, String> {
    let n = node.as_count("a whole number of seconds")?;
    if n < min || n > max {
        return Err(format!("expected {min} to {max} seconds, got {n}"));
    }
    Ok(Duration::from_secs(n))
}

/// One `retry_on` entry: a cause's name or an exit code from 1 to 255.
fn retry_cause(node: &Node) -> Result<RetryCause, String> {
    let named = match node.scalar_text().as_deref() {
        Some("exit") => Some(RetryCause::Exit),
        Some("no_heartbeat") => Some(RetryCause::Code(EXIT_HEARTBEAT_LOST)),
        Some("not_started") => Some(RetryCause::Code(EXIT_NOT_STARTED)),
        Some("timeout") => Some(RetryCause::Code(EXIT_TIMEOUT)),
        Some("error") => Some(RetryCause::Code(EXIT_ERROR)),
        Some("killed") => Some(RetryCause::Code(EXIT_KILLED)),
        _ => None,
    };
    if let Some(c) = named {
        return Ok(c);
    }
    match node.as_count("a cause or an exit code") {
        Ok(n) if (1..=255).contains(&n) => Ok(RetryCause::Code(i64::try_from(n).unwrap_or(255))),
        _ => Err(format!(
            "expected exit, no_heartbeat, not_started, timeout, error, killed or an exit code \
             from 1 to 255, got {}",
            shown(node)
        )),
    }
}

fn shown(node: &Node) -> String {
    node.scalar_text()
        .map_or_else(|| node.value.kind().to_owned(), |t| format!("{t:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raw::parse_yaml;

    fn read(yaml: &str) -> (Recovery, Vec<(u64, String, String)>) {
        let root = parse_yaml(yaml).expect("yaml");
        let Value::Map(pairs) = &root.value else {
            panic!("not a map")
        };
        let keys: BTreeMap<String, &Node> = pairs.iter().map(|(k, v)| (k.key_text(), v)).collect();
        let mut errors = Vec::new();
        let r = parse(&keys, |n, k, m| errors.push((n.pos.line, k.to_owned(), m)));
        (r, errors)
    }

    #[test]
    fn absent_keys_give_the_defaults() {
        let (r, errors) = read("a: 1\n");
        assert!(errors.is_empty());
        assert_eq!(r, Recovery::default());
        assert_eq!(r.catch_up, CatchUp::None);
        assert_eq!(r.retries, 0);
    }

    #[test]
    fn every_key_is_read() {
        let (r, errors) = read(
            "catch_up: last\nstarting_deadline: 30\nmissed_limit: 5\nretries: 2\n\
             retry_delay: 0\nretry_on: [exit, timeout, 143, 7, exit]\n",
        );
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(r.catch_up, CatchUp::Last);
        assert_eq!(r.starting_deadline, Duration::from_secs(30));
        assert_eq!(r.missed_limit, 5);
        assert_eq!(r.retries, 2);
        assert_eq!(r.retry_delay, Duration::ZERO);
        assert_eq!(
            r.retry_on,
            RetryOn::Listed(vec![
                RetryCause::Exit,
                RetryCause::Code(7),
                RetryCause::Code(124),
                RetryCause::Code(143)
            ])
        );
    }

    #[test]
    fn bad_values_name_their_line_and_key() {
        let (r, errors) = read(
            "catch_up: all\nstarting_deadline: 0\nretries: 11\nretry_delay: 86401\n\
             retry_on: [exit, 0, bogus]\nmissed_limit: -1\n",
        );
        let lines: Vec<(u64, &str)> = errors.iter().map(|(l, k, _)| (*l, k.as_str())).collect();
        assert_eq!(
            lines,
            vec![
                (1, "catch_up"),
                (2, "starting_deadline"),
                (6, "missed_limit"),
                (3, "retries"),
                (4, "retry_delay"),
                (5, "retry_on"),
                (5, "retry_on"),
            ]
        );
        // Bad values fall back to the defaults; the job is refused by its caller anyway.
        assert_eq!(r.retries, 0);
        assert_eq!(r.retry_on, RetryOn::Listed(vec![RetryCause::Exit]));
    }

    #[test]
    fn the_default_retries_every_failure_but_a_kill() {
        let any = RetryOn::AnyFailure;
        assert!(any.matches(1, true));
        assert!(any.matches(EXIT_HEARTBEAT_LOST, false));
        assert!(!any.matches(EXIT_SUCCESS, true));
        assert!(!any.matches(EXIT_KILLED, false));
        assert!(!any.matches(EXIT_KILLED, true));
        let exit = RetryOn::Listed(vec![RetryCause::Exit]);
        assert!(exit.matches(3, true));
        assert!(!exit.matches(EXIT_TIMEOUT, false));
        assert!(!exit.matches(EXIT_KILLED, true));
        let killed = RetryOn::Listed(vec![RetryCause::Code(EXIT_KILLED)]);
        assert!(killed.matches(EXIT_KILLED, true));
    }

    proptest::proptest! {
        #[test]
        fn any_scalar_value_parses_without_panicking(key in 0usize..6, value in ".{0,12}") {
            let Some(key) = KEYS.get(key) else { return Ok(()) };
            let yaml = format!("{key}: {value:?}\n");
            if let Ok(root) = parse_yaml(&yaml)
                && let Value::Map(pairs) = &root.value
            {
                let keys: BTreeMap<String, &Node> =
                    pairs.iter().map(|(k, v)| (k.key_text(), v)).collect();
                let r = parse(&keys, |_, _, _| {});
                proptest::prop_assert!(r.retries <= MAX_RETRIES);
                proptest::prop_assert!(r.starting_deadline.as_secs() <= MAX_DELAY_SECS);
                proptest::prop_assert!(r.retry_delay.as_secs() <= MAX_DELAY_SECS);
            }
        }
    }
}
