//! The UI WebSocket protocol of saltpeter-ui 3.2.0 (docs/COMPATIBILITY.md, "The UI protocol"): the commands a browser
//! sends, parsed strictly (a malformed one is an error reply, never a crash), and the
//! messages it receives, built as JSON with the original's shapes and this version's fixes
//! (RFC 3339 with `T`, `env` redacted, `timeline` typed).
// Input from clients, files or wrappers reaches arithmetic here, so every operation that could
// overflow or index out of bounds is written checked ("Totality" in docs/ARCHITECTURE.md).
#![warn(
    clippy::arithmetic_side_effects,
    clippy::indexing_slicing,
    clippy::string_slice
)]

use std::sync::Arc;

use serde_json::{Map, Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use saltpeter_config::Config;
use saltpeter_engine::{DetailsData, StatusSnapshot};
use saltpeter_store::TimelineEntry;

/// What the React UI shows as the master's version.
pub(crate) const SP_VERSION: &str = env!("CARGO_PKG_VERSION");

/// A command from a browser.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    Subscribe(Vec<String>),
    Unsubscribe(Vec<String>),
    /// Positions are the server's to keep; an ack is only logged.
    Ack {
        cron: String,
        machine: String,
        position: u64,
    },
    Run(String),
    KillCron(String),
    KillMachine {
        cron: String,
        machine: String,
        job_instance: Option<String>,
    },
    GetTimeline {
        start_date: String,
        end_date: String,
        id: String,
    },
}

impl Command {
    /// The command's key, for error replies.
    pub fn name(&self) -> &'static str {
        match self {
            Command::Subscribe(_) => "subscribe",
            Command::Unsubscribe(_) => "unsubscribe",
            Command::Ack { .. } => "ack",
            Command::Run(_) => "run",
            Command::KillCron(_) => "killCron",
            Command::KillMachine { .. } => "killMachine",
            Command::GetTimeline { .. } => "getTimeline",
        }
    }
}

/// Why a command was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct CommandError {
    /// The command key, when one was recognised.
    pub command: Option<&'static str>,
    pub message: String,
}

impl CommandError {
    fn new(command: Option<&'static str>, message: impl Into<String>) -> Self {
        Self {
            command,
            message: message.into(),
        }
    }
}

/// The keys, in the order the original checks them (first match wins).
const KEYS: [&str; 7] = [
    "subscribe",
    "unsubscribe",
    "ack",
    "run",
    "killCron",
    "killMachine",
    "getTimeline",
];

/// Parses one text frame.
pub fn parse_command(text: &str) -> Result<Command, CommandError> {
    let value: Value = serde_json::from_str(text)
        .map_err(|e| CommandError::new(None, format!("not JSON: {e}")))?;
    let Value::Object(map) = value else {
        return Err(CommandError::new(None, "a command is a JSON object"));
    };
    let Some(key) = KEYS.iter().copied().find(|k| map.contains_key(*k)) else {
        let keys: Vec<&str> = map.keys().map(String::as_str).collect();
        return Err(CommandError::new(
            None,
            format!("unknown command {keys:?}; expected one of {KEYS:?}"),
        ));
    };
    let arg = map.get(key).unwrap_or(&Value::Null);
    let err = |m: &str| CommandError::new(Some(key), format!("{key}: {m}"));
    Ok(match key {
        "subscribe" => Command::Subscribe(names(arg).ok_or_else(|| err(NAMES))?),
        "unsubscribe" => Command::Unsubscribe(names(arg).ok_or_else(|| err(NAMES))?),
        "ack" => Command::Ack {
            cron: field_str(arg, "cron").ok_or_else(|| err("needs \"cron\" (text)"))?,
            machine: field_str(arg, "machine").ok_or_else(|| err("needs \"machine\" (text)"))?,
            position: arg
                .get("position")
                .and_then(Value::as_u64)
                .ok_or_else(|| err("needs \"position\" (a whole number)"))?,
        },
        "run" => Command::Run(job_name(arg).ok_or_else(|| err("needs a job name"))?),
        "killCron" => Command::KillCron(job_name(arg).ok_or_else(|| err("needs a job name"))?),
        "killMachine" => Command::KillMachine {
            cron: field_str(arg, "cron").ok_or_else(|| err("needs \"cron\" (text)"))?,
            machine: field_str(arg, "machine").ok_or_else(|| err("needs \"machine\" (text)"))?,
            job_instance: match arg.get("job_instance") {
                None | Some(Value::Null) => None,
                Some(Value::String(s)) if !s.is_empty() => Some(s.clone()),
                Some(Value::String(_)) => None,
                Some(_) => return Err(err("\"job_instance\" must be text")),
            },
        },
        _ => Command::GetTimeline {
            start_date: field_str(arg, "start_date")
                .ok_or_else(|| err("needs \"start_date\" (text)"))?,
            end_date: field_str(arg, "end_date").ok_or_else(|| err("needs \"end_date\" (text)"))?,
            id: match arg.get("id") {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Number(n)) => n.to_string(),
                _ => return Err(err("needs \"id\" (text)")),
            },
        },
    })
}

const NAMES: &str = "needs a job name or a list of job names";

fn names(v: &Value) -> Option<Vec<String>> {
    match v {
        Value::String(s) => Some(vec![s.clone()]),
        Value::Array(items) => items
            .iter()
            .map(|i| i.as_str().map(str::to_owned))
            .collect(),
        _ => None,
    }
}

fn job_name(v: &Value) -> Option<String> {
    v.as_str().filter(|s| !s.is_empty()).map(str::to_owned)
}

fn field_str(v: &Value, key: &str) -> Option<String> {
    v.get(key).and_then(Value::as_str).map(str::to_owned)
}

/// Parses a timeline bound: RFC 3339 (what `Date.toISOString()` gives), or the date math the
/// original passed to Elasticsearch: `now`, `now-1d`, `now-12h+30m`, with units s m h d w
/// (and an optional trailing `/d` style rounding, which is ignored).
///
/// Total: the arithmetic is checked, so a bound outside the years -9999..=9999 in UTC (which
/// the time library cannot represent, and whose `+` would panic) is an error like any other.
pub fn parse_when(text: &str, now: OffsetDateTime) -> Result<OffsetDateTime, String> {
    let t = text.trim();
    let out_of_range =
        || format!("{text:?} is outside the supported dates (years -9999 to 9999 in UTC)");
    if let Ok(at) = OffsetDateTime::parse(t, &Rfc3339) {
        // Everything downstream compares and prints times in UTC.
        return saltpeter_proto::Timestamp::checked_new(at)
            .map(saltpeter_proto::Timestamp::get)
            .ok_or_else(out_of_range);
    }
    let Some(mut rest) = t.strip_prefix("now") else {
        return Err(format!("{text:?} is neither RFC 3339 nor now[+-]N[smhdw]"));
    };
    if let Some((expr, _rounding)) = rest.split_once('/') {
        rest = expr;
    }
    let mut at = now;
    while !rest.is_empty() {
        let (negative, tail) = match (rest.strip_prefix('+'), rest.strip_prefix('-')) {
            (Some(tail), _) => (false, tail),
            (_, Some(tail)) => (true, tail),
            _ => return Err(format!("{text:?}: expected + or - after now")),
        };
        let digits = tail.bytes().take_while(u8::is_ascii_digit).count();
        let (number, tail) = tail.split_at_checked(digits).unwrap_or((tail, ""));
        let n: i64 = number
            .parse()
            .map_err(|_| format!("{text:?}: expected a number"))?;
        let mut chars = tail.chars();
        let unit = chars.next().ok_or(format!("{text:?}: missing unit"))?;
        rest = chars.as_str();
        let secs: i64 = match unit {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86_400,
            'w' => 7 * 86_400,
            _ => return Err(format!("{text:?}: unknown unit {unit:?}")),
        };
        let step = n
            .checked_mul(secs)
            .and_then(|s| if negative { s.checked_neg() } else { Some(s) })
            .ok_or_else(out_of_range)?;
        at = at
            .checked_add(time::Duration::seconds(step))
            .ok_or_else(out_of_range)?;
    }
    Ok(at)
}

/// The `config` body (also `GET /config`): jobs as `JobSpec::ui_json` renders them (env values
/// redacted), maintenance, serial, and only the settings that are safe to show.
pub(crate) fn config_body(config: &Config) -> Value {
    let crons: Map<String, Value> = config
        .jobs
        .iter()
        .map(|(name, job)| (name.clone(), job.ui_json()))
        .collect();
    let s = &config.settings;
    json!({
        "crons": crons,
        "maintenance": {
            "global": config.maintenance.global,
            "machines": config.maintenance.machines.iter().collect::<Vec<_>>(),
        },
        "serial": config.serial,
        // Search URLs may carry credentials and the token is a secret: not shown.
        "saltpeter_config": {
            "launcher": match s.launcher {
                saltpeter_config::Launcher::Local => "local",
                saltpeter_config::Launcher::Salt => "salt",
                saltpeter_config::Launcher::Bench => "bench",
            },
            "heartbeat_timeout": s.heartbeat_timeout.as_secs(),
            "allow_legacy_wrappers": s.allow_legacy_wrappers,
            "api_token_required": s.api_token.is_some(),
        },
    })
}

/// `{"type":"config", ...}`: the first message of every connection.
pub fn config_message(config: &Arc<Config>) -> Value {
    json!({ "type": "config", "config": config_body(config), "sp_version": SP_VERSION })
}

/// `{"type":"status", ...}`.
pub(crate) fn status_message(status: &StatusSnapshot) -> Value {
    json!({
        "type": "status",
        "running": status.running,
        "last_state": status.last_state,
        "sp_version": SP_VERSION,
    })
}

/// `{"type":"details", ...}`.
pub(crate) fn details_message(job: &str, data: &DetailsData) -> Value {
    json!({ "type": "details", "cron": job, "data": data })
}

/// One `output_chunk`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chunk<'a> {
    pub cron: &'a str,
    pub machine: &'a str,
    pub chunk: &'a str,
    /// UTF-16 position of the chunk's first unit in the run instance's output.
    pub position: u64,
    pub(crate) total_length: u64,
    pub(crate) is_complete: bool,
}

/// `{"type":"output_chunk", ...}`.
pub(crate) fn chunk_message(c: &Chunk<'_>) -> Value {
    json!({
        "type": "output_chunk",
        "cron": c.cron,
        "machine": c.machine,
        "chunk": c.chunk,
        "position": c.position,
        "total_length": c.total_length,
        "is_complete": c.is_complete,
    })
}

/// `{"type":"timeline","timeline":{"id","content","serial"}}`, answered for every request id
/// (docs/COMPATIBILITY.md: the timeline answer).
pub fn timeline_message(id: &str, content: &[TimelineEntry], serial: f64) -> Value {
    json!({ "type": "timeline", "timeline": timeline_body(id, content, serial) })
}

/// The body of a timeline, also `GET /timeline`.
pub(crate) fn timeline_body(id: &str, content: &[TimelineEntry], serial: f64) -> Value {
    json!({ "id": id, "content": content, "serial": serial })
}

/// `{"type":"error", ...}`: the reply to a command that could not be carried out.
pub(crate) fn error_message(command: Option<&str>, error: &str) -> Value {
    json!({ "type": "error", "command": command, "error": error })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_parse_in_the_original_key_order() {
        assert_eq!(
            parse_command(r#"{"subscribe":"a"}"#),
            Ok(Command::Subscribe(vec!["a".into()]))
        );
        assert_eq!(
            parse_command(r#"{"subscribe":["a","b"]}"#),
            Ok(Command::Subscribe(vec!["a".into(), "b".into()]))
        );
        // First match wins, as in the original.
        assert_eq!(
            parse_command(r#"{"run":"x","subscribe":"a"}"#),
            Ok(Command::Subscribe(vec!["a".into()]))
        );
        assert_eq!(
            parse_command(r#"{"killMachine":{"cron":"j","machine":"m"}}"#),
            Ok(Command::KillMachine {
                cron: "j".into(),
                machine: "m".into(),
                job_instance: None
            })
        );
        assert_eq!(
            parse_command(r#"{"getTimeline":{"start_date":"now-1d","end_date":"now","id":"17"}}"#)
                .map(|c| c.name()),
            Ok("getTimeline")
        );
        assert_eq!(
            parse_command(r#"{"ack":{"cron":"j","machine":"m","position":3}}"#),
            Ok(Command::Ack {
                cron: "j".into(),
                machine: "m".into(),
                position: 3
            })
        );
    }

    #[test]
    fn malformed_commands_are_errors_that_name_the_problem() {
        for (text, command, needle) in [
            ("not json", None, "not JSON"),
            ("[1,2]", None, "JSON object"),
            (r#"{"hello":1}"#, None, "unknown command"),
            (r#"{"subscribe":5}"#, Some("subscribe"), "job name"),
            (r#"{"subscribe":[1]}"#, Some("subscribe"), "job name"),
            (r#"{"run":""}"#, Some("run"), "job name"),
            (r#"{"run":null}"#, Some("run"), "job name"),
            (r#"{"killMachine":"j"}"#, Some("killMachine"), "cron"),
            (
                r#"{"killMachine":{"cron":"j","machine":"m","job_instance":3}}"#,
                Some("killMachine"),
                "job_instance",
            ),
            (r#"{"getTimeline":{}}"#, Some("getTimeline"), "start_date"),
            (r#"{"getTimeline":"x"}"#, Some("getTimeline"), "start_date"),
            (
                r#"{"getTimeline":{"start_date":"now","end_date":"now"}}"#,
                Some("getTimeline"),
                "id",
            ),
            (
                r#"{"ack":{"cron":"j","machine":"m","position":-1}}"#,
                Some("ack"),
                "position",
            ),
        ] {
            let e = parse_command(text).expect_err(text);
            assert_eq!(e.command, command, "{text}");
            assert!(e.message.contains(needle), "{text}: {}", e.message);
        }
    }

    #[test]
    fn timeline_bounds_accept_iso_and_date_math() {
        let now = time::macros::datetime!(2026-06-01 12:00 UTC);
        assert_eq!(parse_when("now", now), Ok(now));
        assert_eq!(
            parse_when("now-1d", now),
            Ok(time::macros::datetime!(2026-05-31 12:00 UTC))
        );
        assert_eq!(
            parse_when("now-2h+30m/d", now),
            Ok(time::macros::datetime!(2026-06-01 10:30 UTC))
        );
        assert_eq!(
            parse_when("2026-06-01T10:00:00.000Z", now),
            Ok(time::macros::datetime!(2026-06-01 10:00 UTC))
        );
        for bad in ["yesterday", "now-", "now-1y", "now*2d", "now-xd"] {
            assert!(parse_when(bad, now).is_err(), "{bad}");
        }
    }

    #[test]
    fn timeline_bounds_beyond_the_calendar_are_errors_not_panics() {
        let now = time::macros::datetime!(2026-06-01 12:00 UTC);
        for bad in [
            "now-99999999999d",
            "now+3000000d",
            "now-9223372036854775807s",
            "now+9223372036854775807w",
            "now+400000w+400000w",
            "9999-12-31T23:59:59-00:01",
        ] {
            let e = parse_when(bad, now).expect_err(bad);
            assert!(e.contains("outside the supported dates"), "{bad}: {e}");
        }
        assert_eq!(
            parse_when("0001-01-01T00:00:00+00:00", now).map(|t| t.year()),
            Ok(1)
        );
    }
}
