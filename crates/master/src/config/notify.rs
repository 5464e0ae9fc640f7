//! The `notify:` lists: who is told about which events of a job, and through which channel.
//! A list under `saltpeter_config` applies to every job; a job's own list replaces it.
//!
//! ```yaml
//! notify:
//!   - webhook: https://hooks.example/x
//!     secret: "..."          # signs the body: X-Saltpeter-Signature: sha256=<hex HMAC>
//!     on: [failure, recovery, missed]
//!   - slack: https://hooks.slack.com/services/...
//!     on: [failure]
//!   - email: ops@example.org  # needs `smtp:` under saltpeter_config
//! ```
//!
//! Every value is validated here, so a delivery never meets a malformed address: URLs are
//! `http` or `https` with a host, e-mail addresses are one `local@domain` without white space
//! or control characters (a line break would inject mail headers).

use std::collections::BTreeSet;
use std::fmt;

use super::raw::{Node, Value};

/// Most rules one list may hold; each event is delivered once per rule.
pub const MAX_RULES: usize = 32;
/// Longest URL, address or secret accepted.
const MAX_TEXT: usize = 2048;

/// What a rule can be told about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum NotifyOn {
    /// A run ended with any machine's result other than 0.
    Failure,
    /// The first successful run after a failed one.
    Recovery,
    /// A slot that should have fired did not (master down, overlap refused, maintenance).
    Missed,
    /// A run is still going `warn_after` seconds after it started.
    RunningTooLong,
}

impl NotifyOn {
    /// Every event, in the order the docs list them.
    pub const ALL: [NotifyOn; 4] = [
        NotifyOn::Failure,
        NotifyOn::Recovery,
        NotifyOn::Missed,
        NotifyOn::RunningTooLong,
    ];

    /// The name used in config files and payloads.
    pub fn name(self) -> &'static str {
        match self {
            NotifyOn::Failure => "failure",
            NotifyOn::Recovery => "recovery",
            NotifyOn::Missed => "missed",
            NotifyOn::RunningTooLong => "running_too_long",
        }
    }

    fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|e| e.name() == text)
    }

    /// What a rule without `on:` is told about: everything that needs no extra key.
    fn default_set() -> BTreeSet<NotifyOn> {
        [NotifyOn::Failure, NotifyOn::Recovery, NotifyOn::Missed].into()
    }
}

impl fmt::Display for NotifyOn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Where a notification goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Channel {
    /// A JSON POST, signed with HMAC-SHA256 of the raw body when a secret is set.
    Webhook { url: String, secret: Option<String> },
    /// A Slack or Mattermost incoming webhook (`{"text": ...}`).
    Slack { url: String },
    /// A mail through the `smtp:` relay.
    Email { to: String },
}

impl Channel {
    /// The channel's kind, for metrics and logs (never the URL: it may hold a secret).
    pub fn kind(&self) -> &'static str {
        match self {
            Channel::Webhook { .. } => "webhook",
            Channel::Slack { .. } => "slack",
            Channel::Email { .. } => "email",
        }
    }
}

/// One entry of a `notify:` list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub channel: Channel,
    pub on: BTreeSet<NotifyOn>,
}

impl Rule {
    /// Whether this rule wants `event`.
    pub fn wants(&self, event: NotifyOn) -> bool {
        self.on.contains(&event)
    }
}

/// A `notify:` value that cannot be used, with the line it is on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct NotifyError {
    /// 1-based line of the offending value.
    pub line: u64,
    pub message: String,
}

fn error(node: &Node, message: impl Into<String>) -> NotifyError {
    NotifyError {
        line: node.pos.line,
        message: message.into(),
    }
}

/// Parses a `notify:` value: a list of rules, or null for none.
pub fn parse_rules(node: &Node) -> Result<Vec<Rule>, NotifyError> {
    let items = match &node.value {
        Value::Null => return Ok(Vec::new()),
        Value::Seq(items) => items,
        other => {
            return Err(error(
                node,
                format!("expected a list of rules, got {}", other.kind()),
            ));
        }
    };
    if items.len() > MAX_RULES {
        return Err(error(node, format!("at most {MAX_RULES} rules")));
    }
    items.iter().map(parse_rule).collect()
}

fn parse_rule(node: &Node) -> Result<Rule, NotifyError> {
    let Value::Map(entries) = &node.value else {
        return Err(error(
            node,
            format!(
                "expected a rule such as {{webhook: URL, on: [failure]}}, got {}",
                node.value.kind()
            ),
        ));
    };
    let mut channel = None;
    let mut secret = None;
    let mut on = None;
    for (key, value) in entries {
        let name = key.key_text();
        match name.as_str() {
            "webhook" | "slack" | "email" => {
                if channel.is_some() {
                    return Err(error(
                        key,
                        "a rule has exactly one of webhook, slack, email",
                    ));
                }
                channel = Some((name, value));
            }
            "secret" => secret = Some(bounded_text(value)?),
            "on" => on = Some(parse_on(value)?),
            _ => {
                return Err(error(
                    key,
                    format!("unknown key {name:?} (expected webhook, slack, email, secret, on)"),
                ));
            }
        }
    }
    let Some((kind, value)) = channel else {
        return Err(error(node, "a rule needs one of webhook, slack or email"));
    };
    let channel = match kind.as_str() {
        "webhook" => Channel::Webhook {
            url: url(value)?,
            secret,
        },
        "slack" if secret.is_none() => Channel::Slack { url: url(value)? },
        "email" if secret.is_none() => Channel::Email {
            to: address(value)?,
        },
        _ => return Err(error(node, "only a webhook rule takes a secret")),
    };
    Ok(Rule {
        channel,
        on: on.unwrap_or_else(NotifyOn::default_set),
    })
}

fn bounded_text(node: &Node) -> Result<String, NotifyError> {
    let text = node.as_text().map_err(|e| error(node, e))?;
    if text.is_empty() || text.len() > MAX_TEXT {
        return Err(error(node, format!("expected 1 to {MAX_TEXT} characters")));
    }
    if text.chars().any(char::is_control) {
        return Err(error(node, "control characters are not allowed"));
    }
    Ok(text)
}

/// An `http` or `https` URL with a host. The text is never quoted back: a webhook URL often
/// carries its own secret.
fn url(node: &Node) -> Result<String, NotifyError> {
    let text = bounded_text(node)?;
    let rest = text
        .strip_prefix("https://")
        .or_else(|| text.strip_prefix("http://"))
        .ok_or_else(|| error(node, "expected an http:// or https:// URL"))?;
    let host = rest.split(['/', '?', '#']).next().unwrap_or_default();
    if host.is_empty() || text.contains(char::is_whitespace) {
        return Err(error(node, "expected a URL with a host and no spaces"));
    }
    Ok(text)
}

/// One mail address, `local@domain`.
pub fn address(node: &Node) -> Result<String, NotifyError> {
    let text = bounded_text(node)?;
    let valid = match text.split_once('@') {
        Some((local, domain)) => {
            !local.is_empty()
                && domain.contains('.')
                && !domain.starts_with('.')
                && !domain.ends_with('.')
                && !domain.contains('@')
                && !text.contains(|c: char| c.is_whitespace() || matches!(c, '<' | '>' | ','))
        }
        None => false,
    };
    if valid {
        Ok(text)
    } else {
        Err(error(
            node,
            format!("expected one mail address such as ops@example.org, got {text:?}"),
        ))
    }
}

fn parse_on(node: &Node) -> Result<BTreeSet<NotifyOn>, NotifyError> {
    let names: Vec<&Node> = match &node.value {
        Value::Seq(items) => items.iter().collect(),
        _ => vec![node],
    };
    if names.len() > NotifyOn::ALL.len() * 2 {
        return Err(error(node, "too many events"));
    }
    let mut set = BTreeSet::new();
    for name in names {
        let text = name.as_text().map_err(|e| error(name, e))?;
        let event = NotifyOn::parse(&text).ok_or_else(|| {
            let known: Vec<_> = NotifyOn::ALL.iter().map(|e| e.name()).collect();
            error(
                name,
                format!("unknown event {text:?} (expected {})", known.join(", ")),
            )
        })?;
        set.insert(event);
    }
    if set.is_empty() {
        return Err(error(node, "a rule must name at least one event"));
    }
    Ok(set)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::config::raw::parse_yaml;

    fn rules(yaml: &str) -> Result<Vec<Rule>, NotifyError> {
        let doc = parse_yaml(yaml).unwrap();
        let Value::Map(entries) = &doc.value else {
            panic!("test YAML must be a mapping")
        };
        parse_rules(&entries[0].1)
    }

    #[test]
    fn the_three_channels_parse_with_their_events() {
        let got = rules(
            "notify:\n  - webhook: https://hooks.example/x\n    secret: s3\n    on: [failure, recovery, missed]\n  - slack: https://hooks.slack.example/T/B\n    on: failure\n  - email: ops@example.org\n",
        )
        .unwrap();
        assert_eq!(
            got[0].channel,
            Channel::Webhook {
                url: "https://hooks.example/x".into(),
                secret: Some("s3".into())
            }
        );
        assert_eq!(got[1].on, [NotifyOn::Failure].into());
        assert_eq!(
            got[2],
            Rule {
                channel: Channel::Email {
                    to: "ops@example.org".into()
                },
                on: NotifyOn::default_set(),
            }
        );
        assert!(got[2].wants(NotifyOn::Missed) && !got[2].wants(NotifyOn::RunningTooLong));
    }

    #[test]
    fn bad_rules_are_errors_on_their_line() {
        let cases = [
            ("notify: yes\n", 1, "expected a list"),
            ("notify:\n  - webhook: ftp://x\n", 2, "http:// or https://"),
            (
                "notify:\n  - webhook: 'https:// spaced'\n",
                2,
                "with a host",
            ),
            (
                "notify:\n  - email: \"a@b.c\\nBcc: x@y.z\"\n",
                2,
                "control characters",
            ),
            ("notify:\n  - email: 'a@b'\n", 2, "one mail address"),
            (
                "notify:\n  - email: 'a@b.c, d@e.f'\n",
                2,
                "one mail address",
            ),
            (
                "notify:\n  - slack: https://x\n    secret: s\n",
                2,
                "only a webhook",
            ),
            (
                "notify:\n  - slack: https://x\n    on: [fire]\n",
                3,
                "unknown event",
            ),
            (
                "notify:\n  - slack: https://x\n    on: []\n",
                3,
                "at least one event",
            ),
            (
                "notify:\n  - slack: https://x\n    email: a@b.c\n",
                3,
                "exactly one",
            ),
            ("notify:\n  - on: [failure]\n", 2, "needs one of"),
            (
                "notify:\n  - slack: https://x\n    colour: red\n",
                3,
                "unknown key",
            ),
        ];
        for (yaml, line, text) in cases {
            let e = rules(yaml).unwrap_err();
            assert_eq!(e.line, line, "{yaml}: {e}");
            assert!(e.message.contains(text), "{yaml}: {e}");
        }
    }

    #[test]
    fn a_list_is_bounded() {
        let many = "  - slack: https://x\n".repeat(MAX_RULES + 1);
        let e = rules(&format!("notify:\n{many}")).unwrap_err();
        assert!(e.message.contains("at most"));
        assert!(rules("notify: ~\n").unwrap().is_empty());
    }
}
