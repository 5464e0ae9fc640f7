//! The wrapper's configuration: every `SP_*` environment variable, parsed and validated in
//! the invoking process before anything forks, so that a bad value reaches Salt's result as
//! a message on stderr and a non-zero exit instead of a daemon that fails later, unseen.
//!
//! Parsing goes through a lookup function rather than the process environment directly,
//! which keeps it testable without mutating the environment. It is total: any value of any
//! variable gives either a validated [`Config`] or a [`ConfigError`] naming the variable.
//!
//! The masters to deliver to come from `SP_WEBSOCKET_URLS` (every master of a cluster, the one
//! that launched the wrapper first), else from `SP_WEBSOCKET_URL_TLS` or `SP_WEBSOCKET_URL`
//! (one master). `SP_TLS_FINGERPRINT` (one or several pinned certificates) and `SP_TLS_CA` say
//! how a `wss://` master is verified.

use std::ffi::{CString, OsString};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use nix::unistd::{Gid, Uid, User, getgrouplist};
use saltpeter_tls::rustls::ClientConfig;
use saltpeter_tls::{Fingerprint, Trust};

use crate::lock::{self, LockPath};

/// Default directory of the local log and the spool file (the original's default).
pub const DEFAULT_LOGDIR: &str = "/var/log/sp_wrapper";

/// The most URLs `SP_WEBSOCKET_URLS` may list. A cluster has a handful of masters; a longer
/// list is a mistake upstream, and each URL costs a connection attempt per round of failover.
pub const MAX_MASTER_URLS: usize = 16;

/// The most certificates `SP_TLS_FINGERPRINT` may pin: one per master, as many as there may be
/// masters.
pub const MAX_FINGERPRINTS: usize = 16;

/// The longest `SP_TIMEOUT` taken, ten years: a deadline is "now" plus the timeout, and a
/// number of seconds near `u64::MAX` would overflow it and abort the wrapper mid-run.
const MAX_TIMEOUT_SECS: u64 = 10 * 365 * 24 * 3600;

/// A configuration value that is missing or unusable. The message is printed as is.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{0} environment variable not set")]
    Missing(&'static str),
    #[error("invalid {name} value {value:?}: {reason}")]
    Invalid {
        name: &'static str,
        value: String,
        reason: &'static str,
    },
    #[error("{name} lists {count} entries; at most {max} are allowed")]
    TooMany {
        name: &'static str,
        count: usize,
        max: usize,
    },
    #[error("SP_USER is set but empty; unset it to run the job as the wrapper's own user")]
    EmptyUser,
    #[error("SP_USER {0:?}: no such user")]
    UnknownUser(String),
    #[error("SP_USER {user:?}: {reason}")]
    User { user: String, reason: String },
    #[error("SP_CWD {path:?} is not a usable directory: {reason}")]
    Cwd { path: PathBuf, reason: String },
    #[error("SP_IDENTITY=salt_key: {0}")]
    MachineKey(#[from] crate::identity::KeyError),
    #[error("cannot set up TLS for {url} (SP_TLS_FINGERPRINT, SP_TLS_CA): {source}")]
    Tls {
        url: String,
        source: saltpeter_tls::TlsError,
    },
}

/// How much the local log records.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum LogLevel {
    /// Nothing; the log directory is not even created.
    Off,
    /// Start, end, errors and delivery failures.
    Normal,
    /// Everything, including each frame sent and received.
    Debug,
}

/// The account the job runs as, resolved before forking because name-service lookups are
/// not async-signal-safe and so cannot run between `fork` and `exec`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunAs {
    pub name: String,
    pub uid: Uid,
    pub gid: Gid,
    /// Supplementary groups, including the primary one, as `getgrouplist` reports them.
    pub groups: Vec<Gid>,
    pub home: PathBuf,
    pub shell: PathBuf,
}

/// Everything the wrapper needs to know, validated.
#[derive(Clone, Debug)]
pub struct Config {
    /// The masters' machines endpoints in the order the link tries them, without duplicates;
    /// never empty. The first is the master that launched the wrapper.
    pub websocket_urls: Vec<String>,
    pub job_name: String,
    pub job_instance: String,
    pub command: String,
    pub machine: String,
    /// The job's working directory: `SP_CWD`, or the directory the wrapper was started in
    /// (captured before the daemon changes to `/`).
    pub cwd: PathBuf,
    pub run_as: Option<RunAs>,
    /// `None` means no limit (`SP_TIMEOUT` absent, empty or 0).
    pub timeout: Option<Duration>,
    pub output_interval: Duration,
    pub heartbeat_interval: Duration,
    pub log_level: LogLevel,
    pub log_dir: PathBuf,
    /// `None` when overlap is allowed and no lock is taken.
    pub lockfile: Option<LockPath>,
    pub run_token: Option<String>,
    /// With `SP_IDENTITY=salt_key`: the minion's pki directory (`SP_SALT_PKI_DIR`, default
    /// [`crate::identity::DEFAULT_PKI_DIR`]), whose key signs every `connect`.
    pub salt_pki_dir: Option<PathBuf>,
    /// That key, loaded by [`Config::from_lookup`] while the wrapper is still root and has
    /// not forked.
    pub machine_key: Option<std::sync::Arc<crate::identity::MinionKey>>,
    /// What a `wss://` master must present: `SP_TLS_FINGERPRINT` (pinned, one certificate or
    /// any of several), else `SP_TLS_CA` (a CA file), else the system's roots.
    pub trust: Trust,
    /// The TLS client configuration for the `wss://` URLs, built from `trust` by
    /// [`from_lookup`](Self::from_lookup); `None` when every URL is `ws://` (and from
    /// [`parse`](Self::parse)).
    pub tls: Option<Arc<ClientConfig>>,
}

impl Config {
    /// Reads the configuration from the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/"));
        Self::from_lookup(|name| std::env::var_os(name), &cwd, default_machine_id)
    }

    /// The whole configuration from `lookup`: [`parse`](Self::parse), then the user account
    /// and the working directory, which consult the system.
    pub fn from_lookup(
        lookup: impl Fn(&str) -> Option<OsString>,
        cwd: &Path,
        default_machine: impl FnOnce() -> Option<String>,
    ) -> Result<Self, ConfigError> {
        let user = lookup("SP_USER");
        let mut cfg = Self::parse(lookup, cwd, default_machine)?;
        match user {
            None => {}
            // Set but empty is a mistake somewhere upstream; running the job as root
            // instead of as the intended user would be the worst way to handle it.
            Some(user) if user.is_empty() => return Err(ConfigError::EmptyUser),
            Some(user) => {
                let user = user.into_string().map_err(|v| ConfigError::Invalid {
                    name: "SP_USER",
                    value: v.to_string_lossy().into_owned(),
                    reason: "not valid UTF-8",
                })?;
                cfg.run_as = resolve_user(&user)?;
            }
        }
        check_cwd(&cfg.cwd)?;
        if let Some(dir) = &cfg.salt_pki_dir {
            let key = crate::identity::MinionKey::load(dir)?;
            cfg.machine_key = Some(std::sync::Arc::new(key));
        }
        if let Some(url) = cfg.websocket_urls.iter().find(|u| u.starts_with("wss://")) {
            // Read the CA file or the system roots now, before the fork, so a minion that
            // lacks them says so to Salt at once instead of retrying in the background.
            let tls =
                saltpeter_tls::client_config(&cfg.trust).map_err(|source| ConfigError::Tls {
                    url: url.clone(),
                    source,
                })?;
            cfg.tls = Some(Arc::new(tls));
        }
        Ok(cfg)
    }

    /// Parses the pure part of the configuration (everything but the user account and the
    /// directory check, which consult the system).
    pub fn parse(
        lookup: impl Fn(&str) -> Option<OsString>,
        cwd: &Path,
        default_machine: impl FnOnce() -> Option<String>,
    ) -> Result<Self, ConfigError> {
        let get = |name: &'static str| -> Result<Option<String>, ConfigError> {
            match lookup(name) {
                None => Ok(None),
                Some(v) => match v.into_string() {
                    Ok(s) => Ok(Some(s)),
                    Err(v) => Err(ConfigError::Invalid {
                        name,
                        value: v.to_string_lossy().into_owned(),
                        reason: "not valid UTF-8",
                    }),
                },
            }
        };
        let required = |name: &'static str| -> Result<String, ConfigError> {
            get(name)?
                .filter(|v| !v.is_empty())
                .ok_or(ConfigError::Missing(name))
        };

        // A master of a cluster names every master here, itself first. Only this wrapper
        // reads the list; the original wrapper reads SP_WEBSOCKET_URL alone.
        let listed = match get("SP_WEBSOCKET_URLS")? {
            Some(list) => master_urls(&list)?,
            None => Vec::new(),
        };
        let websocket_urls = if listed.is_empty() {
            // A master that also serves the original wrapper names its plain path in
            // SP_WEBSOCKET_URL and its TLS one here; sp-wrapper always takes TLS when offered.
            let url = match get("SP_WEBSOCKET_URL_TLS")?.filter(|v| !v.is_empty()) {
                Some(url) => url,
                None => required("SP_WEBSOCKET_URL")?,
            };
            check_url("SP_WEBSOCKET_URL", &url)?;
            vec![url]
        } else {
            listed
        };
        let job_name = required("SP_JOB_NAME")?;
        let job_instance = required("SP_JOB_INSTANCE")?;
        let command = required("SP_COMMAND")?;

        let trust = match (
            get(saltpeter_tls::FINGERPRINT_ENV)?.filter(|v| !v.trim().is_empty()),
            get(saltpeter_tls::CA_ENV)?.filter(|v| !v.is_empty()),
        ) {
            (Some(pins), _) => pinned(&pins)?,
            (None, Some(ca)) => Trust::CaFile(PathBuf::from(ca)),
            (None, None) => Trust::SystemRoots,
        };
        // The job name becomes part of file names (lock and log), so it must be one.
        if job_name.contains('/') || job_name.contains('\0') || job_name == "." || job_name == ".."
        {
            return Err(ConfigError::Invalid {
                name: "SP_JOB_NAME",
                value: job_name,
                reason: "must be usable as a file name",
            });
        }

        let machine = match get("SP_MACHINE_ID")?.filter(|v| !v.is_empty()) {
            Some(m) => m,
            None => default_machine()
                .filter(|m| !m.is_empty())
                .ok_or(ConfigError::Missing("SP_MACHINE_ID"))?,
        };
        let cwd = match get("SP_CWD")?.filter(|v| !v.is_empty()) {
            Some(dir) => PathBuf::from(dir),
            None => cwd.to_path_buf(),
        };

        let timeout = match get("SP_TIMEOUT")?.map(|v| v.trim().to_owned()) {
            None => None,
            Some(v) if v.is_empty() => None,
            Some(v) => match v.parse::<u64>() {
                Ok(0) => None,
                Ok(secs) if secs <= MAX_TIMEOUT_SECS => Some(Duration::from_secs(secs)),
                _ => {
                    return Err(ConfigError::Invalid {
                        name: "SP_TIMEOUT",
                        value: v,
                        reason: "expected whole seconds up to ten years (0 or absent for no limit)",
                    });
                }
            },
        };
        let output_interval = Duration::from_millis(positive(
            "SP_OUTPUT_INTERVAL_MS",
            get("SP_OUTPUT_INTERVAL_MS")?,
            1000,
            3_600_000,
        )?);
        let heartbeat_interval = Duration::from_secs(positive(
            "SP_HEARTBEAT_INTERVAL",
            get("SP_HEARTBEAT_INTERVAL")?,
            saltpeter_proto::HEARTBEAT_INTERVAL.as_secs(),
            3600,
        )?);

        let log_level = match get("SP_WRAPPER_LOGLEVEL")?.as_deref().map(str::trim) {
            None | Some("") => LogLevel::Normal,
            Some(v) if v.eq_ignore_ascii_case("normal") => LogLevel::Normal,
            Some(v) if v.eq_ignore_ascii_case("debug") => LogLevel::Debug,
            Some(v) if v.eq_ignore_ascii_case("off") => LogLevel::Off,
            Some(v) => {
                return Err(ConfigError::Invalid {
                    name: "SP_WRAPPER_LOGLEVEL",
                    value: v.to_owned(),
                    reason: "expected normal, debug or off",
                });
            }
        };
        let log_dir = get("SP_WRAPPER_LOGDIR")?
            .filter(|v| !v.is_empty())
            .map_or_else(|| PathBuf::from(DEFAULT_LOGDIR), PathBuf::from);

        // The original treats an absent SP_ALLOW_OVERLAP as "true"; the master always sends
        // it explicitly, so keeping that default changes nothing for scheduled runs.
        let allow_overlap = match get("SP_ALLOW_OVERLAP")?.as_deref().map(str::trim) {
            None | Some("") => true,
            Some(v)
                if ["true", "1", "yes"]
                    .iter()
                    .any(|t| v.eq_ignore_ascii_case(t)) =>
            {
                true
            }
            Some(v)
                if ["false", "0", "no"]
                    .iter()
                    .any(|t| v.eq_ignore_ascii_case(t)) =>
            {
                false
            }
            Some(v) => {
                return Err(ConfigError::Invalid {
                    name: "SP_ALLOW_OVERLAP",
                    value: v.to_owned(),
                    reason: "expected true or false",
                });
            }
        };
        let lockfile = if allow_overlap {
            None
        } else {
            Some(match get("SP_LOCKFILE")?.filter(|v| !v.is_empty()) {
                Some(path) => LockPath::given(PathBuf::from(path)),
                None => LockPath::in_private_dir(
                    lock::default_lock_dir(Uid::effective(), lookup("XDG_RUNTIME_DIR").as_deref()),
                    &job_name,
                ),
            })
        };
        let run_token = get("SP_RUN_TOKEN")?.filter(|v| !v.is_empty());
        let salt_pki_dir = match get("SP_IDENTITY")?.as_deref() {
            None | Some("") => None,
            Some("salt_key") => Some(PathBuf::from(
                get("SP_SALT_PKI_DIR")?
                    .filter(|v| !v.is_empty())
                    .unwrap_or_else(|| crate::identity::DEFAULT_PKI_DIR.to_owned()),
            )),
            Some(other) => {
                return Err(ConfigError::Invalid {
                    name: "SP_IDENTITY",
                    value: other.to_owned(),
                    reason: "expected salt_key",
                });
            }
        };

        Ok(Self {
            websocket_urls,
            job_name,
            job_instance,
            command,
            machine,
            cwd,
            run_as: None,
            timeout,
            output_interval,
            heartbeat_interval,
            log_level,
            log_dir,
            lockfile,
            run_token,
            salt_pki_dir,
            machine_key: None,
            trust,
            tls: None,
        })
    }
}

/// Checks that `url` is a WebSocket URL. Anything more is left to the connection attempt,
/// which reports a bad host or port in the log like an unreachable master.
fn check_url(name: &'static str, url: &str) -> Result<(), ConfigError> {
    if url.starts_with("ws://") || url.starts_with("wss://") {
        Ok(())
    } else {
        Err(ConfigError::Invalid {
            name,
            value: url.to_owned(),
            reason: "expected a ws:// or wss:// URL",
        })
    }
}

/// Parses `SP_WEBSOCKET_URLS`: URLs separated by commas, whitespace or both, each checked as
/// `SP_WEBSOCKET_URL` is, at most [`MAX_MASTER_URLS`] of them, duplicates dropped (the first
/// place kept, since the order is the order of trial). No entries at all gives an empty list,
/// which the caller takes as "not set".
fn master_urls(list: &str) -> Result<Vec<String>, ConfigError> {
    let entries = list
        .split(|c: char| c == ',' || c.is_whitespace())
        .filter(|entry| !entry.is_empty());
    let count = entries.clone().count();
    if count > MAX_MASTER_URLS {
        return Err(ConfigError::TooMany {
            name: "SP_WEBSOCKET_URLS",
            count,
            max: MAX_MASTER_URLS,
        });
    }
    let mut urls: Vec<String> = Vec::with_capacity(count);
    for entry in entries {
        check_url("SP_WEBSOCKET_URLS", entry)?;
        if !urls.iter().any(|url| url == entry) {
            urls.push(entry.to_owned());
        }
    }
    Ok(urls)
}

/// Parses `SP_TLS_FINGERPRINT`: one SHA-256 fingerprint, or several separated by commas (each
/// master of a cluster may have its own self-signed certificate), at most
/// [`MAX_FINGERPRINTS`]. One gives [`Trust::Pinned`], as it always has; several give
/// [`Trust::PinnedAny`]. Empty entries (a trailing comma) are skipped, but a value with no
/// fingerprint at all is refused rather than taken for "trust the system's roots".
fn pinned(value: &str) -> Result<Trust, ConfigError> {
    let entries = value
        .split(',')
        .map(str::trim)
        .filter(|entry| !entry.is_empty());
    let count = entries.clone().count();
    if count > MAX_FINGERPRINTS {
        return Err(ConfigError::TooMany {
            name: "SP_TLS_FINGERPRINT",
            count,
            max: MAX_FINGERPRINTS,
        });
    }
    let mut pins: Vec<Fingerprint> = Vec::with_capacity(count);
    for entry in entries {
        let pin = Fingerprint::parse(entry).map_err(|_| ConfigError::Invalid {
            name: "SP_TLS_FINGERPRINT",
            value: entry.to_owned(),
            reason: "expected the SHA-256 of a certificate, 64 hexadecimal digits (several \
                     separated by commas)",
        })?;
        if !pins.contains(&pin) {
            pins.push(pin);
        }
    }
    match pins.as_slice() {
        [] => Err(ConfigError::Invalid {
            name: "SP_TLS_FINGERPRINT",
            value: value.to_owned(),
            reason: "expected the SHA-256 of a certificate, 64 hexadecimal digits",
        }),
        [one] => Ok(Trust::Pinned(*one)),
        _ => Ok(Trust::PinnedAny(pins)),
    }
}

/// Parses a positive integer of at most `max` (an hour's worth for the intervals: anything
/// longer is a mistake, and an unbounded one would overflow the timers' deadlines).
fn positive(
    name: &'static str,
    value: Option<String>,
    default: u64,
    max: u64,
) -> Result<u64, ConfigError> {
    match value.as_deref().map(str::trim) {
        None | Some("") => Ok(default),
        Some(v) => match v.parse::<u64>() {
            Ok(n) if n > 0 && n <= max => Ok(n),
            _ => Err(ConfigError::Invalid {
                name,
                value: v.to_owned(),
                reason: "expected a positive whole number up to an hour",
            }),
        },
    }
}

/// The Salt minion id if this host has one, else the kernel's host name. The master names
/// machines by minion id, so that is the right default.
pub fn default_machine_id() -> Option<String> {
    [
        "/etc/salt/minion_id",
        "/proc/sys/kernel/hostname",
        "/etc/hostname",
    ]
    .iter()
    .filter_map(|path| std::fs::read_to_string(path).ok())
    .map(|text| text.trim().to_owned())
    .find(|id| !id.is_empty())
}

/// Resolves `SP_USER`. Running as the current user is a no-op; switching to another user
/// needs root, and rather than ignore the request silently (and run the job as the wrong
/// user) we refuse.
fn resolve_user(name: &str) -> Result<Option<RunAs>, ConfigError> {
    let err = |reason: String| ConfigError::User {
        user: name.to_owned(),
        reason,
    };
    let user = User::from_name(name)
        .map_err(|e| err(e.to_string()))?
        .ok_or_else(|| ConfigError::UnknownUser(name.to_owned()))?;
    let me = Uid::effective();
    if !me.is_root() {
        if user.uid == me {
            return Ok(None);
        }
        return Err(err(String::from(
            "switching users requires running the wrapper as root",
        )));
    }
    let cname = CString::new(name).map_err(|e| err(e.to_string()))?;
    let groups = getgrouplist(&cname, user.gid).map_err(|e| err(e.to_string()))?;
    Ok(Some(RunAs {
        name: user.name,
        uid: user.uid,
        gid: user.gid,
        groups,
        home: user.dir,
        shell: user.shell,
    }))
}

/// Checks that the working directory exists and is a directory, so a typo is reported to
/// Salt before forking instead of as a failed spawn.
fn check_cwd(path: &Path) -> Result<(), ConfigError> {
    match std::fs::metadata(path) {
        Ok(meta) if meta.is_dir() => Ok(()),
        Ok(_) => Err(ConfigError::Cwd {
            path: path.to_owned(),
            reason: "not a directory".into(),
        }),
        Err(e) => Err(ConfigError::Cwd {
            path: path.to_owned(),
            reason: e.to_string(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn parse(vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let map: HashMap<String, OsString> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), OsString::from(v)))
            .collect();
        Config::parse(
            |k| map.get(k).cloned(),
            Path::new("/srv"),
            || Some("host1".into()),
        )
    }

    const BASE: [(&str, &str); 4] = [
        ("SP_WEBSOCKET_URL", "ws://master:8889"),
        ("SP_JOB_NAME", "backup"),
        ("SP_JOB_INSTANCE", "backup_1766482300"),
        ("SP_COMMAND", "echo hi"),
    ];

    fn with(extra: &[(&'static str, &'static str)]) -> Result<Config, ConfigError> {
        let mut vars = BASE.to_vec();
        vars.extend_from_slice(extra);
        parse(&vars)
    }

    /// [`with`] for values built at run time.
    fn parse_owned(extra: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let mut vars: Vec<(&str, &str)> = BASE.to_vec();
        vars.extend_from_slice(extra);
        parse(&vars)
    }

    #[test]
    fn tls_trust_comes_from_the_fingerprint_then_the_ca_then_the_system() {
        let pin = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
        let cfg = with(&[
            ("SP_WEBSOCKET_URL_TLS", "wss://master:8889"),
            ("SP_TLS_FINGERPRINT", pin),
            ("SP_TLS_CA", "/etc/ca.pem"),
        ])
        .unwrap();
        // The TLS URL wins over the plain one a master offers the original wrapper.
        assert_eq!(cfg.websocket_urls, ["wss://master:8889"]);
        assert_eq!(cfg.trust, Trust::Pinned(Fingerprint::parse(pin).unwrap()));
        let cfg = with(&[("SP_TLS_CA", "/etc/ca.pem")]).unwrap();
        assert_eq!(cfg.trust, Trust::CaFile(PathBuf::from("/etc/ca.pem")));
        assert_eq!(with(&[]).unwrap().trust, Trust::SystemRoots);
        assert!(with(&[("SP_TLS_FINGERPRINT", "abc")]).is_err());
    }

    #[test]
    fn the_master_list_splits_on_commas_and_whitespace_and_keeps_the_first_of_duplicates() {
        let cfg = with(&[(
            "SP_WEBSOCKET_URLS",
            " wss://m1:8889,wss://m2:8889 , ws://m3:8889\twss://m1:8889\n,,wss://m4:8889,",
        )])
        .unwrap();
        assert_eq!(
            cfg.websocket_urls,
            [
                "wss://m1:8889",
                "wss://m2:8889",
                "ws://m3:8889",
                "wss://m4:8889"
            ]
        );
        // The list replaces the single URL, whichever of the two variables holds it.
        let cfg = with(&[
            ("SP_WEBSOCKET_URLS", "ws://m2:8889 ws://m1:8889"),
            ("SP_WEBSOCKET_URL_TLS", "wss://m9:8889"),
        ])
        .unwrap();
        assert_eq!(cfg.websocket_urls, ["ws://m2:8889", "ws://m1:8889"]);
        // Set but listing nothing is as if unset: the single URL, with today's precedence.
        for nothing in ["", " ", ", ,\n"] {
            let cfg = with(&[("SP_WEBSOCKET_URLS", nothing)]).unwrap();
            assert_eq!(cfg.websocket_urls, ["ws://master:8889"], "{nothing:?}");
            let cfg = with(&[
                ("SP_WEBSOCKET_URLS", nothing),
                ("SP_WEBSOCKET_URL_TLS", "wss://master:8889"),
            ])
            .unwrap();
            assert_eq!(cfg.websocket_urls, ["wss://master:8889"], "{nothing:?}");
        }
        // Without SP_WEBSOCKET_URL, the list alone is enough.
        let vars: Vec<_> = BASE
            .iter()
            .filter(|(n, _)| *n != "SP_WEBSOCKET_URL")
            .copied()
            .chain([("SP_WEBSOCKET_URLS", "ws://m1:8889")])
            .collect();
        assert_eq!(parse(&vars).unwrap().websocket_urls, ["ws://m1:8889"]);
    }

    #[test]
    fn the_master_list_refuses_a_bad_url_and_more_than_sixteen() {
        for bad in [
            "ws://m1:8889,http://m2:8889",
            "m1:8889",
            "wss://m1 ftp://m2",
        ] {
            let err = with(&[("SP_WEBSOCKET_URLS", bad)]).unwrap_err();
            assert!(
                matches!(
                    err,
                    ConfigError::Invalid {
                        name: "SP_WEBSOCKET_URLS",
                        ..
                    }
                ),
                "{bad}: {err}"
            );
            assert!(err.to_string().contains("ws:// or wss://"), "{err}");
        }
        let urls = |n: usize| -> String {
            (0..n)
                .map(|i| format!("wss://m{i}:8889"))
                .collect::<Vec<_>>()
                .join(",")
        };
        let sixteen = urls(16);
        let cfg = parse_owned(&[("SP_WEBSOCKET_URLS", &sixteen)]).unwrap();
        assert_eq!(cfg.websocket_urls.len(), 16);
        let seventeen = urls(17);
        let err = parse_owned(&[("SP_WEBSOCKET_URLS", &seventeen)]).unwrap_err();
        assert!(
            matches!(
                err,
                ConfigError::TooMany {
                    name: "SP_WEBSOCKET_URLS",
                    count: 17,
                    max: 16
                }
            ),
            "{err}"
        );
        assert_eq!(
            err.to_string(),
            "SP_WEBSOCKET_URLS lists 17 entries; at most 16 are allowed"
        );
    }

    #[test]
    fn the_fingerprint_may_be_a_list_of_up_to_sixteen() {
        let pins: Vec<String> = (0..17u8)
            .map(|i| Fingerprint([i; 32]).to_string())
            .collect();
        let one = pins[0].clone();
        let cfg = parse_owned(&[("SP_TLS_FINGERPRINT", &one)]).unwrap();
        assert_eq!(cfg.trust, Trust::Pinned(Fingerprint([0; 32])));
        // Several, with spaces and a duplicate, in either of the spellings one accepts.
        let colons: Vec<String> = [2u8; 32].iter().map(|b| format!("{b:02X}")).collect();
        let list = format!(
            " {} ,{},{}, {},",
            pins[0],
            pins[1],
            colons.join(":"),
            pins[1]
        );
        let cfg = parse_owned(&[("SP_TLS_FINGERPRINT", &list)]).unwrap();
        assert_eq!(
            cfg.trust,
            Trust::PinnedAny(vec![
                Fingerprint([0; 32]),
                Fingerprint([1; 32]),
                Fingerprint([2; 32])
            ])
        );
        // A list that names one certificate twice pins that one, as a single value does.
        let twice = format!("{one},{one}");
        let cfg = parse_owned(&[("SP_TLS_FINGERPRINT", &twice)]).unwrap();
        assert_eq!(cfg.trust, Trust::Pinned(Fingerprint([0; 32])));
        let sixteen = pins[..16].join(",");
        let cfg = parse_owned(&[("SP_TLS_FINGERPRINT", &sixteen)]).unwrap();
        assert!(matches!(cfg.trust, Trust::PinnedAny(ref p) if p.len() == 16));
        let seventeen = pins.join(",");
        let err = parse_owned(&[("SP_TLS_FINGERPRINT", &seventeen)]).unwrap_err();
        assert!(
            matches!(
                err,
                ConfigError::TooMany {
                    name: "SP_TLS_FINGERPRINT",
                    count: 17,
                    max: 16
                }
            ),
            "{err}"
        );
        // One bad entry spoils the list, and the message names it.
        let bad = format!("{one},abc");
        let err = parse_owned(&[("SP_TLS_FINGERPRINT", &bad)]).unwrap_err();
        assert!(err.to_string().contains("SP_TLS_FINGERPRINT"), "{err}");
        assert!(err.to_string().contains("\"abc\""), "{err}");
        // Only separators: not a silent fallback to the system's roots.
        assert!(with(&[("SP_TLS_FINGERPRINT", ",")]).is_err());
        assert!(with(&[("SP_TLS_FINGERPRINT", " , ")]).is_err());
    }

    #[test]
    fn a_wss_url_with_an_unreadable_ca_fails_before_the_fork() {
        let vars: HashMap<&str, &str> = [
            ("SP_WEBSOCKET_URL", "wss://master:8889"),
            ("SP_JOB_NAME", "backup"),
            ("SP_JOB_INSTANCE", "backup_1"),
            ("SP_COMMAND", "true"),
            ("SP_TLS_CA", "/nonexistent/ca.pem"),
        ]
        .into_iter()
        .collect();
        let result = Config::from_lookup(
            |k| vars.get(k).map(OsString::from),
            Path::new("/"),
            || Some("host1".into()),
        );
        assert!(matches!(result, Err(ConfigError::Tls { .. })));
    }

    #[test]
    fn defaults_match_the_original() {
        let cfg = with(&[]).unwrap();
        assert_eq!(cfg.machine, "host1");
        assert_eq!(cfg.cwd, Path::new("/srv"));
        assert_eq!(cfg.timeout, None);
        assert_eq!(cfg.output_interval, Duration::from_millis(1000));
        assert_eq!(cfg.heartbeat_interval, Duration::from_secs(5));
        assert_eq!(cfg.log_level, LogLevel::Normal);
        assert_eq!(cfg.log_dir, Path::new(DEFAULT_LOGDIR));
        assert_eq!(cfg.lockfile, None);
        assert_eq!(cfg.run_token, None);
    }

    #[test]
    fn each_required_variable_is_named_when_missing() {
        for (name, _) in BASE {
            let vars: Vec<_> = BASE.iter().filter(|(n, _)| *n != name).copied().collect();
            let err = parse(&vars).unwrap_err().to_string();
            assert!(err.contains(name), "{err}");
        }
        let mut vars = BASE.to_vec();
        vars[3].1 = "";
        assert!(parse(&vars).unwrap_err().to_string().contains("SP_COMMAND"));
    }

    #[test]
    fn timeout_zero_or_empty_means_no_limit() {
        assert_eq!(with(&[("SP_TIMEOUT", "0")]).unwrap().timeout, None);
        assert_eq!(with(&[("SP_TIMEOUT", "")]).unwrap().timeout, None);
        assert_eq!(
            with(&[("SP_TIMEOUT", "30")]).unwrap().timeout,
            Some(Duration::from_secs(30))
        );
        assert!(with(&[("SP_TIMEOUT", "ten")]).is_err());
        assert!(with(&[("SP_TIMEOUT", "315360000")]).is_ok());
        assert!(with(&[("SP_TIMEOUT", "315360001")]).is_err());
        assert!(with(&[("SP_TIMEOUT", "18446744073709551615")]).is_err());
        assert!(with(&[("SP_TIMEOUT", "-1")]).is_err());
    }

    #[test]
    fn invalid_values_are_rejected_not_ignored() {
        for (name, value) in [
            ("SP_OUTPUT_INTERVAL_MS", "fast"),
            ("SP_OUTPUT_INTERVAL_MS", "0"),
            ("SP_HEARTBEAT_INTERVAL", "0"),
            ("SP_HEARTBEAT_INTERVAL", "18446744073709551615"),
            ("SP_OUTPUT_INTERVAL_MS", "3600001"),
            ("SP_WRAPPER_LOGLEVEL", "verbose"),
            ("SP_ALLOW_OVERLAP", "maybe"),
            ("SP_WEBSOCKET_URL", "http://master"),
            ("SP_JOB_NAME", "../etc"),
        ] {
            let err = with(&[(name, value)]).unwrap_err().to_string();
            assert!(err.contains(name), "{name}={value}: {err}");
        }
    }

    #[test]
    fn overlap_lock_defaults_to_a_path_per_job() {
        let cfg = with(&[("SP_ALLOW_OVERLAP", "False")]).unwrap();
        let lock = cfg.lockfile.unwrap();
        let dir = lock::default_lock_dir(Uid::effective(), None);
        assert_eq!(lock.path, dir.join("backup.lock"));
        assert_eq!(lock.private_dir, Some(dir));
        // The shared temporary directory is never the lock's home for root.
        if Uid::effective().is_root() {
            assert_eq!(lock.path, Path::new("/run/saltpeter/backup.lock"));
        }
        let cfg = with(&[("SP_ALLOW_OVERLAP", "no"), ("SP_LOCKFILE", "/run/x.lock")]).unwrap();
        assert_eq!(
            cfg.lockfile,
            Some(LockPath::given(PathBuf::from("/run/x.lock")))
        );
        assert_eq!(with(&[("SP_ALLOW_OVERLAP", "yes")]).unwrap().lockfile, None);
    }

    #[test]
    fn explicit_values_win() {
        let cfg = with(&[
            ("SP_MACHINE_ID", "db01"),
            ("SP_CWD", "/tmp"),
            ("SP_RUN_TOKEN", "s3cret"),
            ("SP_HEARTBEAT_INTERVAL", "1"),
            ("SP_WRAPPER_LOGLEVEL", "DEBUG"),
        ])
        .unwrap();
        assert_eq!(cfg.machine, "db01");
        assert_eq!(cfg.cwd, Path::new("/tmp"));
        assert_eq!(cfg.run_token.as_deref(), Some("s3cret"));
        assert_eq!(cfg.heartbeat_interval, Duration::from_secs(1));
        assert_eq!(cfg.log_level, LogLevel::Debug);
    }

    #[test]
    fn salt_key_identity_loads_the_minion_key_before_anything_runs() {
        let from = |vars: &[(&str, &str)]| {
            let mut all = BASE.to_vec();
            all.extend_from_slice(vars);
            let map: HashMap<String, OsString> = all
                .iter()
                .map(|(k, v)| ((*k).to_owned(), OsString::from(v)))
                .collect();
            Config::from_lookup(|k| map.get(k).cloned(), Path::new("/"), || Some("h".into()))
        };
        let cfg = with(&[("SP_IDENTITY", "salt_key")]).unwrap();
        assert_eq!(
            cfg.salt_pki_dir.as_deref(),
            Some(Path::new("/etc/salt/pki/minion"))
        );
        assert!(with(&[("SP_IDENTITY", "ssh")]).is_err());
        assert_eq!(with(&[("SP_IDENTITY", "")]).unwrap().salt_pki_dir, None);
        // A key that cannot be read stops the wrapper at once, with the path in the message.
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().to_string_lossy().into_owned();
        let e = from(&[("SP_IDENTITY", "salt_key"), ("SP_SALT_PKI_DIR", &missing)]).unwrap_err();
        assert!(e.to_string().contains("minion.pem"), "{e}");
        let key = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../master/tests/fixtures/test-keys/minion-a.pem");
        std::fs::copy(key, dir.path().join("minion.pem")).unwrap();
        let cfg = from(&[("SP_IDENTITY", "salt_key"), ("SP_SALT_PKI_DIR", &missing)]).unwrap();
        assert!(cfg.machine_key.is_some());
    }

    #[test]
    fn unknown_user_and_bad_cwd_are_reported() {
        assert!(matches!(
            resolve_user("no-such-user-sp-test"),
            Err(ConfigError::UnknownUser(_))
        ));
        assert!(check_cwd(Path::new("/nonexistent/sp-test")).is_err());
        assert!(
            check_cwd(Path::new("/etc/hostname")).is_err() || !Path::new("/etc/hostname").exists()
        );
        assert!(check_cwd(Path::new("/")).is_ok());
    }

    #[test]
    fn an_empty_user_is_refused_not_taken_for_root() {
        let mut vars = BASE.to_vec();
        vars.push(("SP_USER", ""));
        let map: HashMap<String, OsString> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), OsString::from(v)))
            .collect();
        let result = Config::from_lookup(
            |k| map.get(k).cloned(),
            Path::new("/"),
            || Some("host1".into()),
        );
        assert!(matches!(result, Err(ConfigError::EmptyUser)), "{result:?}");
    }

    /// Arbitrary values for every variable the wrapper reads: the parser must never panic,
    /// and must give either a configuration the rest of the wrapper can use as it is (no
    /// duration that overflows a deadline, no file name that is not one) or an error naming
    /// the variable.
    mod totality {
        use std::os::unix::ffi::OsStringExt;

        use proptest::prelude::*;

        use super::*;

        /// Every variable `Config::from_lookup` asks for, with a valid value.
        const VARS: [(&str, &str); 22] = [
            ("SP_WEBSOCKET_URL", "ws://127.0.0.1:8889"),
            ("SP_JOB_NAME", "backup"),
            ("SP_JOB_INSTANCE", "backup_1766482300"),
            ("SP_COMMAND", "echo hi"),
            ("SP_MACHINE_ID", "db01"),
            ("SP_RUN_TOKEN", "s3cret"),
            ("SP_CWD", "/"),
            ("SP_USER", "root"),
            ("SP_TIMEOUT", "30"),
            ("SP_OUTPUT_INTERVAL_MS", "1000"),
            ("SP_HEARTBEAT_INTERVAL", "5"),
            ("SP_ALLOW_OVERLAP", "false"),
            ("SP_LOCKFILE", "/run/saltpeter/x.lock"),
            ("SP_WRAPPER_LOGDIR", "/var/log/sp_wrapper"),
            ("SP_WRAPPER_LOGLEVEL", "debug"),
            ("XDG_RUNTIME_DIR", "/run/user/1000"),
            // Empty: most generated environments should get past the key, which the test
            // machine does not have; the coverage test below sets it.
            ("SP_IDENTITY", ""),
            ("SP_SALT_PKI_DIR", "/nonexistent/sp-test/pki"),
            ("SP_WEBSOCKET_URL_TLS", "wss://127.0.0.1:8889"),
            (
                "SP_WEBSOCKET_URLS",
                "wss://127.0.0.1:8889, ws://127.0.0.1:8890 wss://[::1]:8889,wss://127.0.0.1:8889",
            ),
            (
                "SP_TLS_FINGERPRINT",
                "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855, \
                 E3:B0:C4:42:98:FC:1C:14:9A:FB:F4:C8:99:6F:B9:24:27:AE:41:E4:64:9B:93:4C:A4:95:99:1B:78:52:B8:55,\
                 0000000000000000000000000000000000000000000000000000000000000000",
            ),
            ("SP_TLS_CA", "/nonexistent/sp-test-ca.pem"),
        ];

        /// Sixteen and seventeen URLs and fingerprints: the edges of the two lists' caps.
        fn long_lists() -> Vec<String> {
            let urls = |n: usize| {
                (0..n)
                    .map(|i| format!("ws://127.0.0.1:{}", 9000 + i))
                    .collect::<Vec<_>>()
                    .join(" ")
            };
            let pins = |n: u8| {
                (0..n)
                    .map(|i| Fingerprint([i; 32]).to_string())
                    .collect::<Vec<_>>()
                    .join(",")
            };
            vec![urls(16), urls(17), pins(16), pins(17)]
        }

        /// Values that sit on the parser's edges, then arbitrary text and bytes.
        fn value() -> impl Strategy<Value = OsString> {
            let lists = prop::sample::select(long_lists()).prop_map(OsString::from);
            let edges = prop::sample::select(vec![
                "",
                " ",
                "0",
                "1",
                "-1",
                "+5",
                " 30 ",
                "0x10",
                "1e3",
                "4294967296",
                "18446744073709551615",
                "18446744073709551616",
                "true",
                "FALSE",
                "Yes",
                "maybe",
                "ws://",
                "ws://[::1]:1",
                "wss://[::1]:1",
                "http://master",
                ".",
                "..",
                "a/b",
                "/",
                "/nonexistent/sp-test",
                "relative",
                "root",
                "nobody",
                "no-such-user-sp-test",
                "OFF",
                "normal",
                "\u{0}",
                "a\u{0}b",
                "é€😀",
                "salt_key",
                ",",
                " , \n",
                "ws://a,ws://a",
                "ws://a wss://b",
                "wss://a,,http://b",
                "ws://a\u{0}",
                "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855,",
                "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855,xyz",
            ])
            .prop_map(OsString::from);
            let text = prop::collection::vec(any::<char>(), 0..24)
                .prop_map(|c| OsString::from(c.into_iter().collect::<String>()));
            let bytes = prop::collection::vec(any::<u8>(), 0..24).prop_map(OsString::from_vec);
            prop_oneof![3 => edges, 1 => lists, 1 => text, 1 => bytes]
        }

        /// Each variable: its valid value, absent, or anything.
        fn environment() -> impl Strategy<Value = Vec<Option<OsString>>> {
            VARS.iter()
                .map(|(_, valid)| {
                    prop_oneof![
                        5 => Just(Some(OsString::from(valid))),
                        1 => Just(None),
                        2 => value().prop_map(Some),
                    ]
                    .boxed()
                })
                .collect::<Vec<_>>()
        }

        fn lookup(env: &[Option<OsString>]) -> impl Fn(&str) -> Option<OsString> + '_ {
            move |name| {
                let index = VARS.iter().position(|(n, _)| *n == name);
                assert!(
                    index.is_some(),
                    "the parser reads {name}, which the test omits"
                );
                index.and_then(|i| env[i].clone())
            }
        }

        /// Whether `d` can be added to a deadline without overflowing, as the timers do.
        fn usable(d: Duration) -> bool {
            tokio::time::Instant::now().checked_add(d).is_some()
                && std::time::Instant::now().checked_add(d).is_some()
        }

        #[test]
        fn the_test_covers_every_variable_read() {
            let asked = std::cell::RefCell::new(Vec::new());
            // With and without SP_LOCKFILE: the runtime directory matters only without; and
            // without the list of URLs, which hides the single ones, and without the TLS URL,
            // which hides the plain one.
            let withouts: [&[&str]; 4] = [
                &[],
                &["SP_LOCKFILE"],
                &["SP_WEBSOCKET_URLS"],
                &["SP_WEBSOCKET_URLS", "SP_WEBSOCKET_URL_TLS"],
            ];
            for without in withouts {
                let env: Vec<Option<OsString>> = VARS
                    .iter()
                    .map(|(n, v)| match *n {
                        "SP_IDENTITY" => Some(OsString::from("salt_key")),
                        _ => (!without.contains(n)).then(|| OsString::from(v)),
                    })
                    .collect();
                // `root` resolves on any Unix; as a non-root user it is a refusal, also fine.
                let _ = Config::from_lookup(
                    |name| {
                        asked.borrow_mut().push(name.to_owned());
                        lookup(&env)(name)
                    },
                    Path::new("/"),
                    || None,
                );
            }
            let asked = asked.into_inner();
            for (name, _) in VARS {
                assert!(asked.iter().any(|a| a == name), "{name} is never read");
            }
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(4000))]

            #[test]
            fn any_environment_gives_a_usable_config_or_a_named_error(
                env in environment(),
                machine in prop::option::of(prop::collection::vec(any::<char>(), 0..8)),
            ) {
                let user = env[7].clone();
                let default_machine = machine.map(|c| c.into_iter().collect::<String>());
                let result = Config::from_lookup(
                    lookup(&env),
                    Path::new("/"),
                    || default_machine.clone(),
                );
                match result {
                    Err(e) => {
                        let text = e.to_string();
                        prop_assert!(text.contains("SP_"), "{}", text);
                    }
                    Ok(cfg) => {
                        let urls = &cfg.websocket_urls;
                        prop_assert!(!urls.is_empty() && urls.len() <= MAX_MASTER_URLS);
                        for (i, url) in urls.iter().enumerate() {
                            prop_assert!(url.starts_with("ws://") || url.starts_with("wss://"));
                            // Only the single-URL variables may hold a separator, as before.
                            let separator = url.contains(|c: char| c == ',' || c.is_whitespace());
                            prop_assert!(urls.len() == 1 || !separator);
                            prop_assert!(!urls[..i].contains(url), "{} twice", url);
                        }
                        // A wss:// URL always comes with the TLS configuration to verify it.
                        let any_wss = urls.iter().any(|u| u.starts_with("wss://"));
                        prop_assert_eq!(any_wss, cfg.tls.is_some());
                        if let Trust::PinnedAny(pins) = &cfg.trust {
                            prop_assert!(pins.len() >= 2 && pins.len() <= MAX_FINGERPRINTS);
                        }
                        for field in [&cfg.job_name, &cfg.job_instance, &cfg.command, &cfg.machine] {
                            prop_assert!(!field.is_empty());
                        }
                        let name = Path::new(&cfg.job_name);
                        prop_assert_eq!(name.file_name(), Some(name.as_os_str()));
                        prop_assert!(!cfg.job_name.contains('\0'));
                        prop_assert!(cfg.timeout.is_none_or(|t| !t.is_zero() && usable(t)));
                        for every in [cfg.output_interval, cfg.heartbeat_interval] {
                            prop_assert!(!every.is_zero() && usable(every));
                        }
                        if let Some(lock) = &cfg.lockfile {
                            prop_assert!(!lock.path.as_os_str().is_empty());
                            if let Some(dir) = &lock.private_dir {
                                prop_assert_eq!(lock.path.parent(), Some(dir.as_path()));
                            }
                        }
                        // An empty SP_USER never falls through to "run as whoever I am".
                        prop_assert!(user.as_ref().is_none_or(|u| !u.is_empty()));
                    }
                }
            }
        }
    }
}
