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

/// Warnings for `email` rules while no `smtp:` relay is configured: each such mail would be
/// given up on at its first attempt (`sp-master check` reports them).
pub(crate) fn mail_without_relay(config: &crate::Config) -> Vec<crate::ConfigProblem> {
    use crate::{ConfigProblem, Section, Severity};
    if config.settings.smtp.is_some() {
        return Vec::new();
    }
    let has_mail =
        |rules: &[saltpeter_notify::Rule]| rules.iter().any(|r| r.channel.kind() == "email");
    let message = "an email rule without smtp: under saltpeter_config; these mails are not sent";
    let mut out = Vec::new();
    if has_mail(&config.settings.notify) {
        out.push(ConfigProblem::at(
            Severity::Warning,
            &config.dir,
            0,
            Section::Settings,
            Some("notify"),
            message,
        ));
    }
    for job in config.jobs.values() {
        if job.notify.as_deref().is_some_and(has_mail) {
            out.push(ConfigProblem::at(
                Severity::Warning,
                &job.source.file,
                job.source.line,
                Section::Job(job.name.clone()),
                Some("notify"),
                message,
            ));
        }
    }
    out
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use crate::{Config, Section, Severity};

    fn load(text: &str) -> Config {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("jobs.yaml"), text).expect("write");
        Config::load(dir.path())
    }

    const SCHEDULE: &str =
        "  min: '*'\n  hour: '*'\n  dom: '*'\n  mon: '*'\n  dow: '*'\n  targets: a\n";

    #[test]
    fn settings_and_jobs_read_their_notification_keys() {
        let text = format!(
            "saltpeter_config:
  notify:
    - webhook: https://hooks.example/all
      secret: s3cret-value
  smtp:
    host: 127.0.0.1
    port: 2525
    tls: none
    from: sp@example.org
  notify_delivery:
    retry_base: 1
    max_attempts: 3
inherits:
{SCHEDULE}  command: 'true'
own:
{SCHEDULE}  command: 'true'
  warn_after: 90
  notify:
    - email: dba@example.org
      on: [failure, recovery]
silent:
{SCHEDULE}  command: 'true'
  warn_after: 0
  notify: []
"
        );
        let config = load(&text);
        assert!(!config.has_errors(), "{:?}", config.problems);
        let s = &config.settings;
        assert_eq!(s.notify.len(), 1);
        assert_eq!(s.smtp.as_ref().map(|m| m.port), Some(2525));
        assert_eq!(s.notify_delivery.retry.base, Duration::from_secs(1));
        assert_eq!(s.notify_delivery.retry.attempts, 3);
        let job = |name: &str| config.jobs.get(name).expect("job");
        assert_eq!(
            job("inherits").notify,
            None,
            "absent: the settings' list applies"
        );
        assert_eq!(job("inherits").warn_after, None);
        let own = job("own").notify.clone().expect("own list");
        assert_eq!(own.len(), 1, "the job's list replaces the global one");
        assert_eq!(own[0].channel.kind(), "email");
        assert_eq!(job("own").warn_after, Some(Duration::from_secs(90)));
        assert_eq!(
            job("silent").notify,
            Some(Vec::new()),
            "an empty list silences"
        );
        assert_eq!(job("silent").warn_after, None);
        let ui = job("own").ui_json().to_string();
        assert!(ui.contains("\"channel\":\"email\""), "{ui}");
        let settings_debug = format!("{s:?}");
        assert!(
            !settings_debug.contains("s3cret-value"),
            "secrets never in Debug"
        );
    }

    #[test]
    fn errors_name_the_line_of_the_bad_value() {
        let text = format!(
            "saltpeter_config:
  notify:
    - webhook: https://hooks.example/ok
    - webhook: ftp://nope.example/x
bad:
{SCHEDULE}  command: 'true'
  warn_after: 999999999
worse:
{SCHEDULE}  command: 'true'
  notify:
    - slack: not a url
"
        );
        let config = load(&text);
        let errors: Vec<_> = config
            .problems
            .iter()
            .filter(|p| p.severity == Severity::Error)
            .collect();
        let line_of = |section: Section, key: &str| {
            errors
                .iter()
                .find(|p| p.section == section && p.key.as_deref() == Some(key))
                .and_then(|p| p.line)
        };
        assert_eq!(line_of(Section::Settings, "notify"), Some(4));
        assert_eq!(line_of(Section::Job("bad".into()), "warn_after"), Some(13));
        assert_eq!(line_of(Section::Job("worse".into()), "notify"), Some(23));
        assert!(
            config.settings.notify.is_empty(),
            "a bad list is ignored whole"
        );
        assert!(!config.jobs.contains_key("bad") && !config.jobs.contains_key("worse"));
    }

    #[test]
    fn mail_rules_without_a_relay_are_reported_by_check() {
        let dir = tempfile::tempdir().expect("tempdir");
        let text =
            format!("j:\n{SCHEDULE}  command: 'true'\n  notify:\n    - email: a@example.org\n");
        std::fs::write(dir.path().join("jobs.yaml"), text).expect("write");
        let problems = crate::check_dir(dir.path());
        assert!(
            problems
                .iter()
                .any(|p| p.key.as_deref() == Some("notify") && p.message.contains("smtp")),
            "{problems:?}"
        );
    }

    #[test]
    fn a_secret_in_a_jobs_rules_never_reaches_the_ui() {
        let text = format!(
            "j:
{SCHEDULE}  command: 'true'
  notify:
    - webhook: https://hooks.example/path/TOKEN123
      secret: hush-hush
"
        );
        let config = load(&text);
        let ui = config.jobs.get("j").expect("job").ui_json().to_string();
        assert!(
            !ui.contains("hush-hush") && !ui.contains("TOKEN123"),
            "{ui}"
        );
        assert!(ui.contains("hooks.example"), "{ui}");
    }
}
