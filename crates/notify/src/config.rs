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
use std::net::IpAddr;
use std::time::Duration;

use crate::policy::{RateLimitConfig, Retry};

/// A config value with the line it starts on: what the caller's YAML reader produces,
/// reduced to what these parsers need. The master converts its own located tree into this
/// (a few lines of recursion), which keeps this crate free of the master's config types.
#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    /// 1-based line of the value (0 when unknown).
    pub line: u64,
    pub value: Value,
}

/// A YAML value. Mappings keep their entries in file order.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    Bool(bool),
    Int(i128),
    Float(f64),
    Str(String),
    Seq(Vec<Node>),
    Map(Vec<(Node, Node)>),
}

impl Value {
    /// A short name of the value's type, for error messages.
    pub fn kind(&self) -> &'static str {
        match self {
            Value::Null => "nothing (null)",
            Value::Bool(_) => "a boolean",
            Value::Int(_) => "a number",
            Value::Float(_) => "a decimal number",
            Value::Str(_) => "text",
            Value::Seq(_) => "a list",
            Value::Map(_) => "a mapping",
        }
    }
}

impl Node {
    /// A node on `line`.
    pub fn new(line: u64, value: Value) -> Self {
        Node { line, value }
    }

    /// Text from a text or whole-number scalar.
    fn as_text(&self) -> Result<String, String> {
        match &self.value {
            Value::Str(s) => Ok(s.clone()),
            Value::Int(i) => Ok(i.to_string()),
            other => Err(format!("expected text, got {}", other.kind())),
        }
    }

    /// A mapping key as text.
    fn key_text(&self) -> String {
        match &self.value {
            Value::Str(s) => s.clone(),
            Value::Int(i) => i.to_string(),
            other => format!("<{}>", other.kind()),
        }
    }

    /// A boolean; the YAML 1.1 spellings (`yes`, `no`, `on`, `off`) count, as elsewhere in
    /// the settings.
    fn as_bool(&self) -> Result<bool, String> {
        match &self.value {
            Value::Bool(b) => Ok(*b),
            Value::Str(s) => match s.to_ascii_lowercase().as_str() {
                "true" | "yes" | "on" => Ok(true),
                "false" | "no" | "off" => Ok(false),
                _ => Err(format!("expected true or false, got {s:?}")),
            },
            other => Err(format!("expected true or false, got {}", other.kind())),
        }
    }

    /// A whole number in `min..=max`; digit-only text counts.
    fn as_range(&self, min: u64, max: u64) -> Result<u64, String> {
        let n = match &self.value {
            Value::Int(i) => u64::try_from(*i).ok(),
            Value::Str(s) if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) => {
                s.parse::<u64>().ok()
            }
            _ => None,
        };
        match n {
            Some(n) if (min..=max).contains(&n) => Ok(n),
            _ => Err(format!("expected a whole number from {min} to {max}")),
        }
    }
}

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

/// Where a notification goes. Its `Debug` form shows only the kind and the URL's scheme and
/// host: a webhook URL often carries its own token, and the secret must never reach a log.
#[derive(Clone, PartialEq, Eq)]
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

    /// What may be shown of the destination: a URL's scheme and host (never its path, query
    /// or secret), or the mail address.
    pub fn redacted(&self) -> String {
        match self {
            Channel::Webhook { url, .. } | Channel::Slack { url } => redact_url(url),
            Channel::Email { to } => to.clone(),
        }
    }

    /// A short hash of the destination (URL and secret, or address): part of a notification's
    /// key, so one event goes once to each destination, and the limiter's per-destination key.
    pub fn destination_hash(&self) -> String {
        let text = match self {
            Channel::Webhook { url, secret } => {
                format!("webhook\n{url}\n{}", secret.as_deref().unwrap_or_default())
            }
            Channel::Slack { url } => format!("slack\n{url}"),
            Channel::Email { to } => format!("email\n{to}"),
        };
        let digest = ring::digest::digest(&ring::digest::SHA256, text.as_bytes());
        crate::hex(digest.as_ref().get(..6).unwrap_or_default())
    }
}

impl fmt::Debug for Channel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Channel::Webhook { secret, .. } => f
                .debug_struct("Webhook")
                .field("url", &self.redacted())
                .field("secret", &secret.as_ref().map(|_| "<redacted>"))
                .finish(),
            Channel::Slack { .. } => f
                .debug_struct("Slack")
                .field("url", &self.redacted())
                .finish(),
            Channel::Email { to } => f.debug_struct("Email").field("to", to).finish(),
        }
    }
}

/// `scheme://host/…`: the part of a URL that identifies the receiver without its tokens. A
/// user-info part (`user:password@`) is dropped too.
pub fn redact_url(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("?", url));
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let host = authority.rsplit('@').next().unwrap_or_default();
    format!("{scheme}://{host}/…")
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
        line: node.line,
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

/// An `http` or `https` URL with a host, parsed as the HTTP client will parse it. The text is
/// never quoted back: a webhook URL often carries its own secret.
fn url(node: &Node) -> Result<String, NotifyError> {
    let text = bounded_text(node)?;
    let rest = text
        .strip_prefix("https://")
        .or_else(|| text.strip_prefix("http://"))
        .ok_or_else(|| error(node, "expected an http:// or https:// URL"))?;
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    if authority.is_empty() || text.contains(char::is_whitespace) {
        return Err(error(node, "expected a URL with a host and no spaces"));
    }
    // Credentials in the URL would be sent as basic authentication to whoever the host is;
    // a token belongs in the path or in the signature's secret.
    if authority.contains('@') {
        return Err(error(node, "a URL must not carry user:password@"));
    }
    let parsed = ureq::http::Uri::try_from(text.as_str())
        .map_err(|_| error(node, "expected a well-formed http:// or https:// URL"))?;
    // The parser leaves a port it cannot read out rather than refusing it; refuse it here.
    let after_host = authority
        .rsplit_once(']')
        .map_or(authority, |(_, rest)| rest);
    if after_host.contains(':') && parsed.port_u16().is_none_or(|p| p == 0) {
        return Err(error(
            node,
            "expected a well-formed http:// or https:// URL",
        ));
    }
    if parsed.host().is_none_or(str::is_empty) {
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

/// How the mail relay is reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SmtpTls {
    /// Plain connection upgraded with STARTTLS, which must succeed (the default; port 587).
    StartTls,
    /// TLS from the first byte (port 465).
    Tls,
    /// No TLS at all: only for a relay on a loopback address, or with `allow_plaintext: true`.
    None,
}

/// The `smtp:` block under `saltpeter_config`: the relay every `email:` rule sends through.
#[derive(Clone, PartialEq, Eq)]
pub struct SmtpSettings {
    pub host: String,
    pub port: u16,
    pub tls: SmtpTls,
    /// Both or neither.
    pub username: Option<String>,
    pub password: Option<String>,
    /// The sender address, `From:` and the envelope's.
    pub from: String,
    /// The name given in `EHLO`; the system's host name when unset.
    pub hello_name: Option<String>,
}

impl fmt::Debug for SmtpSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SmtpSettings")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("tls", &self.tls)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("from", &self.from)
            .field("hello_name", &self.hello_name)
            .finish()
    }
}

/// Whether `host` names this machine's loopback, where a plain SMTP connection leaves no
/// machine.
pub fn is_loopback_host(host: &str) -> bool {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    bare.eq_ignore_ascii_case("localhost")
        || bare.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

fn map_entries<'a>(node: &'a Node, what: &str) -> Result<&'a [(Node, Node)], NotifyError> {
    match &node.value {
        Value::Map(entries) => Ok(entries),
        other => Err(error(
            node,
            format!("expected a mapping for {what}, got {}", other.kind()),
        )),
    }
}

fn host_name(node: &Node) -> Result<String, NotifyError> {
    let text = bounded_text(node)?;
    let valid = text.len() <= 253
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '[' | ']'));
    if valid {
        Ok(text)
    } else {
        Err(error(node, "expected a host name or an IP address"))
    }
}

/// Parses the `smtp:` block.
///
/// ```yaml
/// smtp:
///   host: mail.example.org
///   port: 587             # default: 587, 465 with tls: tls, 25 with tls: none
///   tls: starttls         # starttls (default) | tls | none
///   username: saltpeter
///   password: "..."
///   from: saltpeter@example.org
/// ```
pub fn parse_smtp(node: &Node) -> Result<SmtpSettings, NotifyError> {
    let entries = map_entries(node, "smtp")?;
    let mut host = None;
    let mut port = None;
    let mut tls = SmtpTls::StartTls;
    let mut username = None;
    let mut password = None;
    let mut from = None;
    let mut hello_name = None;
    let mut allow_plaintext = false;
    for (key, value) in entries {
        let name = key.key_text();
        let to_err = |e: String| error(value, format!("smtp {name}: {e}"));
        match name.as_str() {
            "host" => host = Some(host_name(value)?),
            "port" => {
                let n = value.as_range(1, 65535).map_err(to_err)?;
                port = Some(u16::try_from(n).unwrap_or(587));
            }
            "tls" => {
                tls = match value.as_text().map_err(to_err)?.as_str() {
                    "starttls" => SmtpTls::StartTls,
                    "tls" => SmtpTls::Tls,
                    "none" => SmtpTls::None,
                    _ => return Err(error(value, "smtp tls: expected starttls, tls or none")),
                }
            }
            "username" => username = Some(bounded_text(value)?),
            "password" => password = Some(bounded_text(value)?),
            "from" => from = Some(address(value)?),
            "hello_name" => hello_name = Some(host_name(value)?),
            "allow_plaintext" => allow_plaintext = value.as_bool().map_err(to_err)?,
            _ => {
                return Err(error(
                    key,
                    format!(
                        "unknown key {name:?} in smtp (expected host, port, tls, username, \
                         password, from, hello_name, allow_plaintext)"
                    ),
                ));
            }
        }
    }
    let host = host.ok_or_else(|| error(node, "smtp needs a host"))?;
    let from = from.ok_or_else(|| error(node, "smtp needs a from address"))?;
    if username.is_some() != password.is_some() {
        return Err(error(
            node,
            "smtp: set both username and password, or neither",
        ));
    }
    if tls == SmtpTls::None && !is_loopback_host(&host) && !allow_plaintext {
        return Err(error(
            node,
            "smtp tls: none sends mail (and any password) in clear; it is allowed for a \
             loopback relay, or with allow_plaintext: true",
        ));
    }
    let port = port.unwrap_or(match tls {
        SmtpTls::StartTls => 587,
        SmtpTls::Tls => 465,
        SmtpTls::None => 25,
    });
    Ok(SmtpSettings {
        host,
        port,
        tls,
        username,
        password,
        from,
        hello_name,
    })
}

/// How deliveries are made: the `notify_delivery:` block under `saltpeter_config`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delivery {
    pub retry: Retry,
    pub rate: RateLimitConfig,
    /// Limit on each network call, connection to last byte.
    pub timeout: Duration,
}

impl Default for Delivery {
    fn default() -> Self {
        Delivery {
            retry: Retry::default(),
            rate: RateLimitConfig::default(),
            timeout: Duration::from_secs(10),
        }
    }
}

/// Parses the `notify_delivery:` block; absent keys keep their defaults.
///
/// ```yaml
/// notify_delivery:
///   max_attempts: 12    # 1-100
///   retry_base: 5       # seconds, 1-3600: the wait after the first failure, doubled after each
///   retry_max: 600      # seconds, 1-86400: the longest wait
///   timeout: 10         # seconds, 1-300: each HTTP request or SMTP session
///   rate_limit: 10      # 1-10000 notifications per job and destination...
///   rate_window: 600    # ...in this many seconds, 1-86400
/// ```
pub fn parse_delivery(node: &Node) -> Result<Delivery, NotifyError> {
    let mut d = Delivery::default();
    if node.value == Value::Null {
        return Ok(d);
    }
    for (key, value) in map_entries(node, "notify_delivery")? {
        let name = key.key_text();
        let range = |min, max| {
            value
                .as_range(min, max)
                .map_err(|e| error(value, format!("notify_delivery {name}: {e}")))
        };
        match name.as_str() {
            "max_attempts" => d.retry.attempts = u32::try_from(range(1, 100)?).unwrap_or(12),
            "retry_base" => d.retry.base = Duration::from_secs(range(1, 3600)?),
            "retry_max" => d.retry.cap = Duration::from_secs(range(1, 86400)?),
            "timeout" => d.timeout = Duration::from_secs(range(1, 300)?),
            "rate_limit" => d.rate.max = u32::try_from(range(1, 10000)?).unwrap_or(10),
            "rate_window" => d.rate.window = Duration::from_secs(range(1, 86400)?),
            _ => {
                return Err(error(
                    key,
                    format!(
                        "unknown key {name:?} in notify_delivery (expected max_attempts, \
                         retry_base, retry_max, timeout, rate_limit, rate_window)"
                    ),
                ));
            }
        }
    }
    if d.retry.cap < d.retry.base {
        return Err(error(
            node,
            "notify_delivery: retry_max is below retry_base",
        ));
    }
    Ok(d)
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

    fn s(line: u64, text: &str) -> Node {
        Node::new(line, Value::Str(text.into()))
    }

    fn seq(line: u64, items: Vec<Node>) -> Node {
        Node::new(line, Value::Seq(items))
    }

    /// A mapping whose keys sit on the lines given with them.
    fn map(line: u64, entries: Vec<(u64, &str, Node)>) -> Node {
        let entries = entries.into_iter().map(|(l, k, v)| (s(l, k), v)).collect();
        Node::new(line, Value::Map(entries))
    }

    #[test]
    fn the_three_channels_parse_with_their_events() {
        let list = seq(
            2,
            vec![
                map(
                    2,
                    vec![
                        (2, "webhook", s(2, "https://hooks.example/x")),
                        (3, "secret", s(3, "s3")),
                        (
                            4,
                            "on",
                            seq(4, vec![s(4, "failure"), s(4, "recovery"), s(4, "missed")]),
                        ),
                    ],
                ),
                map(
                    5,
                    vec![
                        (5, "slack", s(5, "https://hooks.slack.example/T/B")),
                        (6, "on", s(6, "failure")),
                    ],
                ),
                map(7, vec![(7, "email", s(7, "ops@example.org"))]),
            ],
        );
        let got = parse_rules(&list).unwrap();
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
        let rule = |entries: Vec<(u64, &str, Node)>| seq(2, vec![map(2, entries)]);
        let slack = || (2, "slack", s(2, "https://x"));
        let cases = [
            (Node::new(1, Value::Bool(true)), 1, "expected a list"),
            (
                rule(vec![(2, "webhook", s(2, "ftp://x"))]),
                2,
                "http:// or https://",
            ),
            (
                rule(vec![(2, "webhook", s(2, "https:// spaced"))]),
                2,
                "with a host",
            ),
            (
                rule(vec![(2, "webhook", s(2, "https://u:p@h/x"))]),
                2,
                "user:password@",
            ),
            (
                rule(vec![(2, "webhook", s(2, "https://h:99999/x"))]),
                2,
                "well-formed",
            ),
            (
                rule(vec![(2, "email", s(2, "a@b.c\nBcc: x@y.z"))]),
                2,
                "control characters",
            ),
            (rule(vec![(2, "email", s(2, "a@b"))]), 2, "one mail address"),
            (
                rule(vec![(2, "email", s(2, "a@b.c, d@e.f"))]),
                2,
                "one mail address",
            ),
            (
                rule(vec![slack(), (3, "secret", s(3, "s"))]),
                2,
                "only a webhook",
            ),
            (
                rule(vec![slack(), (3, "on", seq(3, vec![s(3, "fire")]))]),
                3,
                "unknown event",
            ),
            (
                rule(vec![slack(), (3, "on", seq(3, vec![]))]),
                3,
                "at least one event",
            ),
            (
                rule(vec![slack(), (3, "email", s(3, "a@b.c"))]),
                3,
                "exactly one",
            ),
            (rule(vec![(2, "on", s(2, "failure"))]), 2, "needs one of"),
            (
                rule(vec![slack(), (3, "colour", s(3, "red"))]),
                3,
                "unknown key",
            ),
        ];
        for (node, line, text) in cases {
            let e = parse_rules(&node).unwrap_err();
            assert_eq!(e.line, line, "{node:?}: {e}");
            assert!(e.message.contains(text), "{node:?}: {e}");
        }
    }

    #[test]
    fn a_list_is_bounded() {
        let many = (0..=MAX_RULES as u64)
            .map(|i| map(i + 2, vec![(i + 2, "slack", s(i + 2, "https://x"))]))
            .collect();
        let e = parse_rules(&seq(2, many)).unwrap_err();
        assert!(e.message.contains("at most"));
        assert!(parse_rules(&Node::new(1, Value::Null)).unwrap().is_empty());
    }

    #[test]
    fn debug_output_hides_urls_and_secrets() {
        let hook = Channel::Webhook {
            url: "https://hooks.example:8443/T0/B1/tok3n?x=1".into(),
            secret: Some("s3cr3t".into()),
        };
        let shown = format!("{hook:?}");
        assert!(shown.contains("https://hooks.example:8443/…"), "{shown}");
        assert!(
            !shown.contains("tok3n") && !shown.contains("s3cr3t"),
            "{shown}"
        );
        let slack = Channel::Slack {
            url: "https://chat.example/hooks/tok3n".into(),
        };
        assert!(!format!("{slack:?}").contains("tok3n"));
        assert_ne!(hook.destination_hash(), slack.destination_hash());
        let mut smtp = parse_smtp(&map(
            1,
            vec![
                (2, "host", s(2, "mail.example.org")),
                (3, "username", s(3, "sp")),
                (4, "password", s(4, "hunter2")),
                (5, "from", s(5, "sp@example.org")),
            ],
        ))
        .unwrap();
        assert!(!format!("{smtp:?}").contains("hunter2"));
        assert_eq!((smtp.port, smtp.tls), (587, SmtpTls::StartTls));
        smtp.password = None;
        assert!(format!("{smtp:?}").contains("password: None"));
    }

    #[test]
    fn smtp_refuses_clear_text_beyond_loopback_unless_told() {
        let smtp = |host: &str, extra: Vec<(u64, &str, Node)>| {
            let mut entries = vec![
                (2, "host", s(2, host)),
                (3, "tls", s(3, "none")),
                (4, "from", s(4, "sp@example.org")),
            ];
            entries.extend(extra);
            parse_smtp(&map(1, entries))
        };
        let local = smtp("127.0.0.1", vec![]).unwrap();
        assert_eq!((local.port, local.tls), (25, SmtpTls::None));
        assert!(smtp("localhost", vec![]).is_ok());
        assert!(smtp("[::1]", vec![]).is_ok());
        let e = smtp("mail.example.org", vec![]).unwrap_err();
        assert!(e.message.contains("allow_plaintext"), "{e}");
        let told = smtp(
            "mail.example.org",
            vec![(5, "allow_plaintext", Node::new(5, Value::Bool(true)))],
        );
        assert!(told.is_ok());
        let e = smtp("127.0.0.1", vec![(5, "username", s(5, "u"))]).unwrap_err();
        assert!(e.message.contains("both"), "{e}");
        let e = smtp(
            "127.0.0.1",
            vec![(5, "port", Node::new(5, Value::Int(70000)))],
        )
        .unwrap_err();
        assert_eq!(e.line, 5);
        let e = smtp("mail\nRCPT", vec![]).unwrap_err();
        assert_eq!(e.line, 2);
        let e = parse_smtp(&map(1, vec![(2, "host", s(2, "m.example"))])).unwrap_err();
        assert!(e.message.contains("from"), "{e}");
    }

    #[test]
    fn delivery_keys_have_defaults_and_ranges() {
        assert_eq!(
            parse_delivery(&Node::new(1, Value::Null)).unwrap(),
            Delivery::default()
        );
        let d = parse_delivery(&map(
            1,
            vec![
                (2, "max_attempts", Node::new(2, Value::Int(3))),
                (3, "retry_base", s(3, "2")),
                (4, "retry_max", Node::new(4, Value::Int(60))),
                (5, "timeout", Node::new(5, Value::Int(4))),
                (6, "rate_limit", Node::new(6, Value::Int(2))),
                (7, "rate_window", Node::new(7, Value::Int(30))),
            ],
        ))
        .unwrap();
        assert_eq!(d.retry.attempts, 3);
        assert_eq!(d.retry.base, Duration::from_secs(2));
        assert_eq!(d.retry.cap, Duration::from_secs(60));
        assert_eq!(d.timeout, Duration::from_secs(4));
        assert_eq!((d.rate.max, d.rate.window), (2, Duration::from_secs(30)));
        for (key, value) in [
            ("max_attempts", Value::Int(0)),
            ("timeout", Value::Int(301)),
            ("retry_base", Value::Int(-1)),
            ("rate_window", Value::Str("1h".into())),
            ("colour", Value::Int(1)),
        ] {
            let e = parse_delivery(&map(1, vec![(2, key, Node::new(2, value))])).unwrap_err();
            assert_eq!(e.line, 2, "{key}: {e}");
        }
        let e = parse_delivery(&map(
            1,
            vec![
                (2, "retry_base", Node::new(2, Value::Int(100))),
                (3, "retry_max", Node::new(3, Value::Int(10))),
            ],
        ))
        .unwrap_err();
        assert!(e.message.contains("below"), "{e}");
    }
}
