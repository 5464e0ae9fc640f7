//! The notification keys: `notify:`, `smtp:` and `notify_delivery:` under `saltpeter_config`,
//! and a job's own `notify:` and `warn_after`.
//!
//! The parsers themselves live in `saltpeter-notify`, over its small located value tree; this
//! module converts the config's YAML node into that tree (keeping each value's line, so an
//! error names `file:line`) and bounds `warn_after`.

use std::time::Duration;

use saltpeter_notify::config::{Node as NNode, Value as NValue};

use super::raw::{Node, Value};

/// The longest `warn_after`: the same bound as a job's `timeout`, since the deadline is added
/// to the monotonic clock.
pub const MAX_WARN_AFTER_SECS: u64 = crate::job::MAX_TIMEOUT_SECS;

/// `node` as the notify crate's located tree. The YAML reader already capped the nesting, so
/// this recursion is bounded.
pub(crate) fn to_notify_node(node: &Node) -> NNode {
    let value = match &node.value {
        Value::Null => NValue::Null,
        Value::Bool(b) => NValue::Bool(*b),
        Value::Int(i) => NValue::Int(*i),
        Value::Float(x) => NValue::Float(*x),
        Value::Str(s) => NValue::Str(s.clone()),
        Value::Seq(items) => NValue::Seq(items.iter().map(to_notify_node).collect()),
        Value::Map(entries) => NValue::Map(
            entries
                .iter()
                .map(|(k, v)| (to_notify_node(k), to_notify_node(v)))
                .collect(),
        ),
    };
    NNode::new(node.pos.line, value)
}

/// An error of the notify parsers with the line it names, or the node's own line when the
/// parser did not know one.
pub(crate) fn located(node: &Node, e: saltpeter_notify::config::NotifyError) -> (u64, String) {
    let line = if e.line > 0 { e.line } else { node.pos.line };
    (line, e.message)
}

/// A `notify:` list.
pub(crate) fn rules(node: &Node) -> Result<Vec<saltpeter_notify::Rule>, (u64, String)> {
    saltpeter_notify::config::parse_rules(&to_notify_node(node)).map_err(|e| located(node, e))
}

/// The `smtp:` block; `null` is none.
pub(crate) fn smtp(
    node: &Node,
) -> Result<Option<saltpeter_notify::config::SmtpSettings>, (u64, String)> {
    if matches!(node.value, Value::Null) {
        return Ok(None);
    }
    saltpeter_notify::config::parse_smtp(&to_notify_node(node))
        .map(Some)
        .map_err(|e| located(node, e))
}

/// The `notify_delivery:` block.
pub(crate) fn delivery(node: &Node) -> Result<saltpeter_notify::config::Delivery, (u64, String)> {
    saltpeter_notify::config::parse_delivery(&to_notify_node(node)).map_err(|e| located(node, e))
}

/// A job's `warn_after`: whole seconds from 1 to [`MAX_WARN_AFTER_SECS`]; `null` or `0` is
/// none.
pub(crate) fn warn_after(node: &Node) -> Result<Option<Duration>, String> {
    if matches!(node.value, Value::Null) {
        return Ok(None);
    }
    match node.as_count("a whole number of seconds")? {
        0 => Ok(None),
        s if s > MAX_WARN_AFTER_SECS => Err(format!(
            "expected at most {MAX_WARN_AFTER_SECS} seconds (365 days), got {s}"
        )),
        s => Ok(Some(Duration::from_secs(s))),
    }
}

/// A rule list as the UI's `config` message shows it: the channel's kind, its destination
/// with the URL's path and any secret left out, and the events.
pub(crate) fn redacted_json(rules: &[saltpeter_notify::Rule]) -> serde_json::Value {
    serde_json::Value::Array(
        rules
            .iter()
            .map(|r| {
                serde_json::json!({
                    "channel": r.channel.kind(),
                    "to": r.channel.redacted(),
                    "on": r.on.iter().map(|e| e.name()).collect::<Vec<_>>(),
                })
            })
            .collect(),
    )
}
