//! The `saltpeter_config` block: master-wide settings with the original's defaults
//! (docs/COMPATIBILITY.md) and this version's additions.
//!
//! Each file's block is validated on its own into a `PartialSettings`; the blocks are then
//! merged key by key in sorted file order, so a later file wins per key, deterministically. A bad
//! value is reported and dropped, so the key keeps the value of an earlier file or the default.

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::access::{Access, PartialAccess};
use super::limits::{Limits, PartialLimits};
use super::problem::{ConfigProblem, Section, Severity};
use super::raw::{Node, Value};
use super::store_url::StoreUrl;

/// How `sp-master` writes its own log (stderr).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum LogFormat {
    /// Lines for people.
    #[default]
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

/// How the master starts wrappers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Launcher {
    /// Every target name is a machine simulated on this host; no Salt needed. Only for
    /// `sp-master demo` and configs that ask for it: pointed at a fleet's job files it would
    /// run every job here.
    Local,
    /// Through the `salt` command line, as the original did (the default).
    #[default]
    Salt,
    /// Start requests go to a file for `cargo xtask bench master`'s simulated wrappers.
    Bench,
}

/// Whether a listener speaks TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum TlsMode {
    /// On unless the listener is bound to a loopback address (the default).
    #[default]
    Auto,
    On,
    Off,
}

/// Master-wide settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// `logdir`: per-job log files; default `/var/log/saltpeter`.
    pub logdir: PathBuf,
    /// `debug`: verbose logging; default false.
    pub debug: bool,
    /// `log_format`: `text` (default) or `json`; read at start.
    pub log_format: LogFormat,
    /// `api_ws`: kept for compatibility (the original started its UI endpoint only when true);
    /// default false.
    pub api_ws: bool,
    /// `api_ws_bind_addr`: the API's address; default 127.0.0.1 (the original used 0.0.0.0, but
    /// the API has no authentication unless `api_token` is set).
    pub api_bind_addr: IpAddr,
    /// `api_ws_port`: the API's port; default 8888.
    pub api_port: u16,
    /// `api_token`: bearer token the API demands when set.
    pub api_token: Option<String>,
    /// `ws_allowed_origins`: Origins allowed on the UI WebSocket (a list or one text).
    pub ws_allowed_origins: Vec<String>,
    /// Caps on what API and UI clients control (`ui_max_subscriptions` and the others of
    /// [`Limits`]).
    pub limits: Limits,
    /// Named tokens with roles, the host names the API answers for, and whether `/metrics`
    /// is public (`api_tokens`, `api_public_names`, `metrics_public`; see [`Access`]).
    pub access: Access,
    /// `machines_ws_bind_addr`: the machines endpoint's address; default 0.0.0.0.
    pub machines_bind_addr: IpAddr,
    /// `machines_ws_port`: the machines endpoint's port; default 8889.
    pub machines_port: u16,
    /// `default_saltpeter_server_host`: host part of the wrappers' WebSocket URL; default this
    /// host's name.
    pub default_saltpeter_server_host: String,
    /// `default_wrapper_path`: the wrapper for jobs that name none; when unset, the
    /// original's [`ORIGINAL_WRAPPER_PATH`] on minions and `sp-wrapper` beside `sp-master`
    /// for the local launcher.
    pub default_wrapper_path: Option<String>,
    /// `default_wrapper_loglevel`: default `normal`.
    pub default_wrapper_loglevel: String,
    /// `default_wrapper_logdir`: default `/var/log/sp_wrapper`.
    pub default_wrapper_logdir: String,
    /// `elasticsearch`: URL, empty = disabled.
    pub elasticsearch: String,
    /// `opensearch`: URL, empty = disabled.
    pub opensearch: String,
    /// `elasticsearch_index`: default `saltpeter`.
    pub elasticsearch_index: String,
    /// `opensearch_index`: default `saltpeter`.
    pub opensearch_index: String,
    /// `launcher`: `salt` (default), `local`, or `bench` (benchmarks only).
    pub launcher: Launcher,
    /// `heartbeat_timeout`: seconds without a heartbeat before a machine is lost; default 15.
    pub heartbeat_timeout: Duration,
    /// `data_dir`: where the master keeps its state; default `/var/lib/saltpeter`.
    pub data_dir: PathBuf,
    /// `store`: a PostgreSQL URL for the run store; default none, SQLite under `data_dir`.
    /// Read at start.
    pub store: Option<StoreUrl>,
    /// `allow_legacy_wrappers`: accept wrappers without a run token (the Python wrapper);
    /// default false.
    pub allow_legacy_wrappers: bool,
    /// `allow_unauthenticated_api`: let the API listen beyond loopback without `api_token`;
    /// default false (the master refuses to start so).
    pub allow_unauthenticated_api: bool,
    /// `salt_bin`: the `salt` command; default `salt`.
    pub salt_bin: String,
    /// `salt_config_dir`: passed to salt as `-c`; default none.
    pub salt_config_dir: Option<PathBuf>,
    /// `salt_pki_dir`: the Salt master's pki directory, whose `minions/<id>` files are the
    /// accepted minion keys that wrappers' signatures are checked against; default: the
    /// `pki_dir` (under `root_dir`) of the master config in `salt_config_dir`, else
    /// `/etc/salt/pki/master`.
    pub salt_pki_dir: Option<PathBuf>,
    /// `ping_timeout`: seconds to wait for `test.ping`; default 20.
    pub ping_timeout: Duration,
    /// `retention_runs_per_job`: finished runs kept in the store per job; default 100.
    pub retention_runs_per_job: u64,
    /// `retention_days`: finished runs older than this are deleted; default 30.
    pub retention_days: u64,
    /// `retention_output_head_bytes`: output kept from the start of each machine's output;
    /// default 64 KiB.
    pub retention_output_head_bytes: u64,
    /// `retention_output_tail_bytes`: output kept from the end of each machine's output;
    /// default 448 KiB.
    pub retention_output_tail_bytes: u64,
    /// `handshake_timeout`: seconds a machines-endpoint connection has, from being accepted,
    /// to send the first message the engine accepts (`connect`, or a legacy wrapper's first
    /// message); default 10.
    pub handshake_timeout: Duration,
    /// `http_header_timeout`: seconds a connection on either listener has to send a request's
    /// headers, the first one and each next one on a kept-alive connection; default 10.
    pub http_header_timeout: Duration,
    /// `max_pending_connections`: connections per listener that have not finished their
    /// handshake (machines: the first accepted message; API: the first request); default 2048.
    pub max_pending_connections: u64,
    /// `max_pending_connections_per_ip`: the same, per source address; default 256.
    pub max_pending_connections_per_ip: u64,
    /// `ui_idle_timeout`: seconds a UI WebSocket may stay without any frame from the browser
    /// (pongs to the master's pings count); default 600.
    pub ui_idle_timeout: Duration,
    /// `fd_reserve`: open files kept free of sockets for the store, job logs and launches;
    /// default (`None`) 10% of the open-file limit, at least 256.
    pub fd_reserve: Option<u64>,
    /// `machines_tls`: `auto` (default: on unless bound to loopback), `on` or `off`.
    pub machines_tls: TlsMode,
    /// `api_tls`: the same for the API.
    pub api_tls: TlsMode,
    /// `tls_cert`: the operator's certificate chain (PEM) for both listeners; default none,
    /// a self-signed certificate in `<data_dir>/tls/`.
    pub tls_cert: Option<PathBuf>,
    /// `tls_key`: the private key (PEM) of `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// `tls_ca`: the CA file wrappers verify an operator's certificate with, as a path on the
    /// minions (`SP_TLS_CA`); default none, the minions' system roots.
    pub tls_ca: Option<String>,
    /// `cluster_api_url`: where the other masters of a cluster reach this master's API to
    /// forward an operator's request (`http://` or `https://`, host and port); default the
    /// API's scheme with the host wrappers are given and the API's port.
    pub cluster_api_url: Option<String>,
    /// `allow_plaintext`: let a listener bound beyond loopback run without TLS; default
    /// false (the master refuses to start so).
    pub allow_plaintext: bool,
    /// `ship_ca`: the CA file to verify `https://` Elasticsearch/OpenSearch with; default
    /// none, the system roots.
    pub ship_ca: Option<PathBuf>,
    /// `notify`: the notification rules of every job without its own list; default none.
    pub notify: Vec<saltpeter_notify::Rule>,
    /// `smtp`: the relay `email` rules send through; default none (mail is not sent).
    pub smtp: Option<saltpeter_notify::config::SmtpSettings>,
    /// `notify_delivery`: retries, rate limit and timeout of notifications.
    pub notify_delivery: saltpeter_notify::config::Delivery,
    /// Keys this version does not know, as JSON (the original accepted anything).
    pub extra: serde_json::Map<String, serde_json::Value>,
}

/// This host's name, as the original's `os.uname().nodename`.
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".to_owned())
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            logdir: PathBuf::from("/var/log/saltpeter"),
            debug: false,
            log_format: LogFormat::Text,
            api_ws: false,
            api_bind_addr: IpAddr::V4(Ipv4Addr::LOCALHOST),
            api_port: 8888,
            api_token: None,
            ws_allowed_origins: Vec::new(),
            limits: Limits::default(),
            access: Access::default(),
            machines_bind_addr: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            machines_port: 8889,
            default_saltpeter_server_host: host_name(),
            default_wrapper_path: None,
            default_wrapper_loglevel: "normal".to_owned(),
            default_wrapper_logdir: "/var/log/sp_wrapper".to_owned(),
            elasticsearch: String::new(),
            opensearch: String::new(),
            elasticsearch_index: "saltpeter".to_owned(),
            opensearch_index: "saltpeter".to_owned(),
            launcher: Launcher::Salt,
            heartbeat_timeout: saltpeter_proto::HEARTBEAT_TIMEOUT,
            data_dir: PathBuf::from("/var/lib/saltpeter"),
            store: None,
            allow_legacy_wrappers: false,
            allow_unauthenticated_api: false,
            salt_bin: "salt".to_owned(),
            salt_config_dir: None,
            salt_pki_dir: None,
            ping_timeout: Duration::from_secs(20),
            retention_runs_per_job: 100,
            retention_days: 30,
            retention_output_head_bytes: 64 * 1024,
            retention_output_tail_bytes: 448 * 1024,
            handshake_timeout: Duration::from_secs(10),
            http_header_timeout: Duration::from_secs(10),
            max_pending_connections: 2048,
            max_pending_connections_per_ip: 256,
            ui_idle_timeout: Duration::from_secs(600),
            fd_reserve: None,
            machines_tls: TlsMode::Auto,
            api_tls: TlsMode::Auto,
            tls_cert: None,
            tls_key: None,
            tls_ca: None,
            cluster_api_url: None,
            allow_plaintext: false,
            ship_ca: None,
            notify: Vec::new(),
            smtp: None,
            notify_delivery: saltpeter_notify::config::Delivery::default(),
            extra: serde_json::Map::new(),
        }
    }
}

/// The settings one file gives, each key validated; `None` where the file says nothing (or
/// something invalid).
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct PartialSettings {
    logdir: Option<PathBuf>,
    debug: Option<bool>,
    log_format: Option<LogFormat>,
    api_ws: Option<bool>,
    api_bind_addr: Option<IpAddr>,
    api_port: Option<u16>,
    api_token: Option<Option<String>>,
    ws_allowed_origins: Option<Vec<String>>,
    limits: PartialLimits,
    access: PartialAccess,
    machines_bind_addr: Option<IpAddr>,
    machines_port: Option<u16>,
    default_saltpeter_server_host: Option<String>,
    default_wrapper_path: Option<Option<String>>,
    default_wrapper_loglevel: Option<String>,
    default_wrapper_logdir: Option<String>,
    elasticsearch: Option<String>,
    opensearch: Option<String>,
    elasticsearch_index: Option<String>,
    opensearch_index: Option<String>,
    launcher: Option<Launcher>,
    heartbeat_timeout: Option<Duration>,
    data_dir: Option<PathBuf>,
    store: Option<Option<StoreUrl>>,
    allow_legacy_wrappers: Option<bool>,
    allow_unauthenticated_api: Option<bool>,
    salt_bin: Option<String>,
    salt_config_dir: Option<Option<PathBuf>>,
    salt_pki_dir: Option<Option<PathBuf>>,
    ping_timeout: Option<Duration>,
    retention_runs_per_job: Option<u64>,
    retention_days: Option<u64>,
    retention_output_head_bytes: Option<u64>,
    retention_output_tail_bytes: Option<u64>,
    handshake_timeout: Option<Duration>,
    http_header_timeout: Option<Duration>,
    max_pending_connections: Option<u64>,
    max_pending_connections_per_ip: Option<u64>,
    ui_idle_timeout: Option<Duration>,
    fd_reserve: Option<Option<u64>>,
    machines_tls: Option<TlsMode>,
    api_tls: Option<TlsMode>,
    tls_cert: Option<Option<PathBuf>>,
    tls_key: Option<Option<PathBuf>>,
    tls_ca: Option<Option<String>>,
    cluster_api_url: Option<Option<String>>,
    allow_plaintext: Option<bool>,
    ship_ca: Option<Option<PathBuf>>,
    notify: Option<Vec<saltpeter_notify::Rule>>,
    smtp: Option<Option<saltpeter_notify::config::SmtpSettings>>,
    notify_delivery: Option<saltpeter_notify::config::Delivery>,
    extra: serde_json::Map<String, serde_json::Value>,
}

fn text(node: &Node) -> Result<String, String> {
    node.as_text()
}

/// An `http://` or `https://` URL with a host.
fn http_url(node: &Node) -> Result<String, String> {
    let t = node.as_text()?;
    let rest = t
        .strip_prefix("http://")
        .or_else(|| t.strip_prefix("https://"))
        .ok_or_else(|| format!("{t:?} must start with http:// or https://"))?;
    if rest.trim_end_matches('/').is_empty() || rest.contains(char::is_whitespace) {
        return Err(format!("{t:?} needs a host (and port) after the scheme"));
    }
    Ok(t.trim_end_matches('/').to_owned())
}

fn non_empty(node: &Node) -> Result<String, String> {
    let t = node.as_text()?;
    if t.trim().is_empty() {
        Err("must not be empty".to_owned())
    } else {
        Ok(t)
    }
}

/// A TCP port. 0 asks the kernel for a free one (the bound address is logged and written to
/// `--ready-file`), which tests and side-by-side instances use.
fn port(node: &Node) -> Result<u16, String> {
    let n = node.as_count("a port number")?;
    u16::try_from(n).map_err(|_| format!("expected a port number 0-65535, got {n}"))
}

fn address(node: &Node) -> Result<IpAddr, String> {
    let t = node.as_text()?;
    match t.as_str() {
        "localhost" => Ok(IpAddr::V4(Ipv4Addr::LOCALHOST)),
        _ => t
            .parse()
            .map_err(|_| format!("expected an IP address such as 127.0.0.1, got {t:?}")),
    }
}

/// The longest `heartbeat_timeout` or `ping_timeout`. Liveness deadlines are instants on the
/// monotonic clock, and adding a longer span than the clock can hold would panic; a day is
/// already far beyond any useful wait.
const MAX_SETTING_SECONDS: u64 = 86_400;

fn seconds(node: &Node) -> Result<Duration, String> {
    match node.as_count("a whole number of seconds")? {
        0 => Err("must be at least 1 second".to_owned()),
        s if s > MAX_SETTING_SECONDS => Err(format!(
            "must be at most {MAX_SETTING_SECONDS} seconds (one day), got {s}"
        )),
        s => Ok(Duration::from_secs(s)),
    }
}

/// The largest `retention_runs_per_job`: the store hands it to SQLite as a signed integer.
const MAX_RETENTION_RUNS: u64 = 1_000_000_000;
/// The largest `retention_days` (a century): the age cut-off is computed as a date, which
/// must stay within the calendar the time library represents.
const MAX_RETENTION_DAYS: u64 = 36_500;

/// A connection deadline: at least a second and at most a week (a longer one is no deadline,
/// and deadlines are added to the clock's readings, which must not overflow).
fn deadline(node: &Node) -> Result<Duration, String> {
    const WEEK: u64 = 7 * 24 * 3600;
    let d = seconds(node)?;
    if d.as_secs() > WEEK {
        return Err(format!("must be at most {WEEK} seconds (a week)"));
    }
    Ok(d)
}

fn at_least_one(node: &Node) -> Result<u64, String> {
    match node.as_count("a whole number")? {
        0 => Err("must be at least 1".to_owned()),
        n => Ok(n),
    }
}

/// A whole number in `1..=max`.
fn between_one_and(max: u64) -> impl Fn(&Node) -> Result<u64, String> {
    move |node| match at_least_one(node)? {
        n if n > max => Err(format!("must be at most {max}, got {n}")),
        n => Ok(n),
    }
}

fn optional<T>(node: &Node, f: impl Fn(&Node) -> Result<T, String>) -> Result<Option<T>, String> {
    if matches!(node.value, Value::Null) {
        Ok(None)
    } else {
        f(node).map(Some)
    }
}

fn origins(node: &Node) -> Result<Vec<String>, String> {
    match &node.value {
        Value::Null => Ok(Vec::new()),
        Value::Seq(items) => items.iter().map(Node::as_text).collect(),
        _ => Ok(vec![node.as_text()?]),
    }
}

fn log_format(node: &Node) -> Result<LogFormat, String> {
    let t = node.as_text()?;
    match t.to_ascii_lowercase().as_str() {
        "text" => Ok(LogFormat::Text),
        "json" => Ok(LogFormat::Json),
        _ => Err(format!("expected \"text\" or \"json\", got {t:?}")),
    }
}

fn tls_mode(node: &Node) -> Result<TlsMode, String> {
    // YAML reads a bare on/off as a boolean in some loaders; accept both spellings.
    if let Ok(b) = node.as_bool() {
        return Ok(if b { TlsMode::On } else { TlsMode::Off });
    }
    let t = node.as_text()?;
    match t.to_ascii_lowercase().as_str() {
        "auto" => Ok(TlsMode::Auto),
        "on" | "true" => Ok(TlsMode::On),
        "off" | "false" => Ok(TlsMode::Off),
        _ => Err(format!("expected auto, on or off, got {t:?}")),
    }
}

fn path(node: &Node) -> Result<Option<PathBuf>, String> {
    optional(node, |n: &Node| non_empty(n).map(PathBuf::from))
}

fn launcher(node: &Node) -> Result<Launcher, String> {
    let t = node.as_text()?;
    match t.to_ascii_lowercase().as_str() {
        "local" => Ok(Launcher::Local),
        "salt" => Ok(Launcher::Salt),
        "bench" => Ok(Launcher::Bench),
        _ => Err(format!("expected \"salt\" or \"local\", got {t:?}")),
    }
}

/// Validates one file's `saltpeter_config` mapping. Problems are returned; the caller decides
/// which of them are new.
pub(crate) fn parse_settings(
    file: &Path,
    entries: &[(Node, Node)],
) -> (PartialSettings, Vec<ConfigProblem>) {
    let mut out = PartialSettings::default();
    let mut problems = Vec::new();
    for (k, v) in entries {
        let key = k.key_text();
        let mut put_error = |message: String| {
            problems.push(ConfigProblem::at(
                Severity::Error,
                file,
                v.pos.line,
                Section::Settings,
                Some(&key),
                format!("{message}; this value is ignored"),
            ));
        };
        macro_rules! set {
            ($field:ident, $parse:expr) => {
                match $parse(v) {
                    Ok(value) => out.$field = Some(value),
                    Err(e) => put_error(e),
                }
            };
        }
        if let Some(result) = out.limits.parse(&key, v) {
            if let Err(e) = result {
                put_error(e);
            }
            continue;
        }
        if let Some(errors) = out.access.parse(&key, v) {
            for e in errors {
                put_error(e);
            }
            continue;
        }
        match key.as_str() {
            "logdir" => set!(logdir, |n: &Node| non_empty(n).map(PathBuf::from)),
            "debug" => set!(debug, Node::as_bool),
            "log_format" => set!(log_format, log_format),
            "api_ws" => set!(api_ws, Node::as_bool),
            "api_ws_bind_addr" => set!(api_bind_addr, address),
            "api_ws_port" => set!(api_port, port),
            "api_token" => set!(api_token, |n: &Node| optional(n, non_empty)),
            "ws_allowed_origins" => set!(ws_allowed_origins, origins),
            "machines_ws_bind_addr" => set!(machines_bind_addr, address),
            "machines_ws_port" => set!(machines_port, port),
            "default_saltpeter_server_host" => set!(default_saltpeter_server_host, non_empty),
            "default_wrapper_path" => {
                set!(default_wrapper_path, |n: &Node| non_empty(n).map(Some))
            }
            "default_wrapper_loglevel" => set!(default_wrapper_loglevel, non_empty),
            "default_wrapper_logdir" => set!(default_wrapper_logdir, non_empty),
            "elasticsearch" => set!(elasticsearch, |n: &Node| optional(n, text)
                .map(Option::unwrap_or_default)),
            "opensearch" => set!(opensearch, |n: &Node| optional(n, text)
                .map(Option::unwrap_or_default)),
            "elasticsearch_index" => set!(elasticsearch_index, non_empty),
            "opensearch_index" => set!(opensearch_index, non_empty),
            "launcher" => set!(launcher, launcher),
            "heartbeat_timeout" => set!(heartbeat_timeout, seconds),
            "data_dir" => set!(data_dir, |n: &Node| non_empty(n).map(PathBuf::from)),
            "store" => set!(store, |n: &Node| optional(n, |n: &Node| StoreUrl::parse(
                &n.as_text()?
            ))),
            "allow_legacy_wrappers" => set!(allow_legacy_wrappers, Node::as_bool),
            "allow_unauthenticated_api" => set!(allow_unauthenticated_api, Node::as_bool),
            "salt_bin" => set!(salt_bin, non_empty),
            "salt_config_dir" => set!(salt_config_dir, |n: &Node| optional(n, non_empty)
                .map(|o| o.map(PathBuf::from))),
            "salt_pki_dir" => set!(salt_pki_dir, |n: &Node| optional(n, non_empty)
                .map(|o| o.map(PathBuf::from))),
            "ping_timeout" => set!(ping_timeout, seconds),
            "retention_runs_per_job" => {
                set!(retention_runs_per_job, between_one_and(MAX_RETENTION_RUNS))
            }
            "retention_days" => set!(retention_days, between_one_and(MAX_RETENTION_DAYS)),
            "retention_output_head_bytes" => {
                set!(retention_output_head_bytes, |n: &Node| n
                    .as_count("a number of bytes"))
            }
            "retention_output_tail_bytes" => set!(retention_output_tail_bytes, at_least_one),
            "handshake_timeout" => set!(handshake_timeout, deadline),
            "http_header_timeout" => set!(http_header_timeout, deadline),
            "max_pending_connections" => set!(max_pending_connections, at_least_one),
            "max_pending_connections_per_ip" => set!(max_pending_connections_per_ip, at_least_one),
            "ui_idle_timeout" => set!(ui_idle_timeout, deadline),
            "machines_tls" => set!(machines_tls, tls_mode),
            "api_tls" => set!(api_tls, tls_mode),
            "tls_cert" => set!(tls_cert, path),
            "tls_key" => set!(tls_key, path),
            "tls_ca" => set!(tls_ca, |n: &Node| optional(n, non_empty)),
            "cluster_api_url" => set!(cluster_api_url, |n: &Node| optional(n, http_url)),
            "allow_plaintext" => set!(allow_plaintext, Node::as_bool),
            "ship_ca" => set!(ship_ca, path),
            "notify" | "smtp" | "notify_delivery" => {
                // The notify parsers name the line of the offending value inside the block.
                let result = match key.as_str() {
                    "notify" => super::notify::rules(v).map(|r| out.notify = Some(r)),
                    "smtp" => super::notify::smtp(v).map(|r| out.smtp = Some(r)),
                    _ => super::notify::delivery(v).map(|r| out.notify_delivery = Some(r)),
                };
                if let Err((line, message)) = result {
                    problems.push(ConfigProblem::at(
                        Severity::Error,
                        file,
                        line,
                        Section::Settings,
                        Some(&key),
                        format!("{message}; this value is ignored"),
                    ));
                }
            }
            "fd_reserve" => set!(fd_reserve, |n: &Node| optional(n, |n: &Node| n
                .as_count("a number of open files"))),
            _ => {
                problems.push(ConfigProblem::at(
                    Severity::Warning,
                    file,
                    k.pos.line,
                    Section::Settings,
                    Some(&key),
                    "unknown setting (kept, otherwise ignored)",
                ));
                out.extra.insert(key.clone(), v.to_json());
            }
        }
    }
    (out, problems)
}

/// The original's wrapper path, used on minions when `default_wrapper_path` is unset.
pub const ORIGINAL_WRAPPER_PATH: &str = "/usr/local/bin/sp_wrapper.py";

impl PartialSettings {
    /// Whether this block sets `default_wrapper_path`.
    pub(crate) fn sets_default_wrapper_path(&self) -> bool {
        self.default_wrapper_path.is_some()
    }
}

impl Settings {
    /// Why the master must not start with these settings: an API anyone on the network can
    /// reach and nobody has to authenticate to, unless the operator said so.
    pub fn exposure_problem(&self) -> Option<String> {
        let open = !self.api_bind_addr.is_loopback()
            && !self.tokens_required()
            && !self.allow_unauthenticated_api;
        open.then(|| {
            format!(
                "the API listens on {} without api_token or api_tokens: anyone who can reach \
                 it can start and kill jobs; configure tokens, bind it to 127.0.0.1, or set \
                 allow_unauthenticated_api: true",
                self.api_bind_addr
            )
        })
    }

    /// Whether the API demands a token: `api_token` is set or `api_tokens` lists any entry.
    pub fn tokens_required(&self) -> bool {
        self.api_token.is_some() || self.access.tokens_listed
    }

    /// Whether `/metrics` is served without a token: as `metrics_public` says, and when it
    /// is unset, exactly when no token is configured.
    pub fn metrics_public(&self) -> bool {
        self.access
            .metrics_public
            .unwrap_or(!self.tokens_required())
    }

    /// Applies one file's block on top of these settings: every key the block sets wins.
    pub(crate) fn apply(&mut self, p: &PartialSettings) {
        macro_rules! take {
            ($($field:ident),*) => {
                $(if let Some(v) = &p.$field { self.$field = v.clone(); })*
            };
        }
        take!(
            logdir,
            debug,
            log_format,
            api_ws,
            api_bind_addr,
            api_port,
            api_token,
            ws_allowed_origins,
            machines_bind_addr,
            machines_port,
            default_saltpeter_server_host,
            default_wrapper_path,
            default_wrapper_loglevel,
            default_wrapper_logdir,
            elasticsearch,
            opensearch,
            elasticsearch_index,
            opensearch_index,
            launcher,
            heartbeat_timeout,
            data_dir,
            store,
            allow_legacy_wrappers,
            allow_unauthenticated_api,
            salt_bin,
            salt_config_dir,
            salt_pki_dir,
            ping_timeout,
            retention_runs_per_job,
            retention_days,
            retention_output_head_bytes,
            retention_output_tail_bytes,
            handshake_timeout,
            http_header_timeout,
            max_pending_connections,
            max_pending_connections_per_ip,
            ui_idle_timeout,
            fd_reserve,
            machines_tls,
            api_tls,
            tls_cert,
            tls_key,
            tls_ca,
            cluster_api_url,
            allow_plaintext,
            ship_ca,
            notify,
            smtp,
            notify_delivery
        );
        self.limits.apply(&p.limits);
        self.access.apply(&p.access);
        for (k, v) in &p.extra {
            self.extra.insert(k.clone(), v.clone());
        }
    }
}
