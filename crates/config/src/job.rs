//! One job definition: from its YAML mapping to a validated [`JobSpec`].
//!
//! Every key of the original's job blocks keeps its meaning and default, plus `timezone`. A job with any
//! error is skipped as a whole (the other jobs of the file still load); unknown keys are kept for
//! the UI and reported as warnings.
// Input from clients, files or wrappers reaches arithmetic here, so every operation that could
// overflow or index out of bounds is written checked ("Totality" in docs/ARCHITECTURE.md).
#![warn(
    clippy::arithmetic_side_effects,
    clippy::indexing_slicing,
    clippy::string_slice
)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use saltpeter_proto::OVERLAP_MAGIC;
use time::OffsetDateTime;

use super::problem::{ConfigProblem, Section, Severity};
use super::raw::{Node, Value};
use crate::schedule::{Field, Schedule, ScheduleError, ScheduleFields};

/// The timeout the loader applies when a job has no `timeout` key, as the original did.
pub(crate) const DEFAULT_TIMEOUT: Duration = Duration::from_secs(3600);

/// The longest `timeout` a job may have: 365 days. The engine adds the timeout to the instant
/// a machine was launched, and an instant that far out cannot overflow the monotonic clock;
/// anything longer is in practice "no limit", which `0` or `null` already say.
pub const MAX_TIMEOUT_SECS: u64 = 365 * 86_400;

/// Salt's targeting expression for a job.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Targets {
    /// A single expression (`web*`, `G@os:Debian and web*`, `a,b` for `list`).
    Expression(String),
    /// A YAML list of names (for `list` targeting).
    List(Vec<String>),
}

impl Targets {
    /// The machine names the targets spell out literally: the list items, or the expression
    /// split at commas and whitespace. The local launcher treats each as one machine.
    pub fn names(&self) -> Vec<String> {
        match self {
            Targets::List(items) => items.clone(),
            Targets::Expression(text) => text
                .split(|c: char| c == ',' || c.is_whitespace())
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect(),
        }
    }

    /// The form Salt takes on its command line: list items joined with commas.
    pub fn to_salt_arg(&self) -> String {
        match self {
            Targets::Expression(text) => text.clone(),
            Targets::List(items) => items.join(","),
        }
    }
}

/// Salt's `tgt_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum TargetType {
    /// Shell-style glob on minion ids (the default, as the original's README says).
    #[default]
    Glob,
    /// Perl-compatible regular expression on minion ids.
    Pcre,
    /// An explicit list of minion ids.
    List,
    /// A grain value.
    Grain,
    /// A grain value, regular expression.
    GrainPcre,
    /// A pillar value.
    Pillar,
    /// A nodegroup from the Salt master config.
    Nodegroup,
    /// A compound expression.
    Compound,
    /// An IP address or CIDR range.
    Ipcidr,
    /// A SECO range expression.
    Range,
}

impl TargetType {
    /// Every type with its Salt spelling.
    pub const ALL: [(TargetType, &'static str); 10] = [
        (TargetType::Glob, "glob"),
        (TargetType::Pcre, "pcre"),
        (TargetType::List, "list"),
        (TargetType::Grain, "grain"),
        (TargetType::GrainPcre, "grain_pcre"),
        (TargetType::Pillar, "pillar"),
        (TargetType::Nodegroup, "nodegroup"),
        (TargetType::Compound, "compound"),
        (TargetType::Ipcidr, "ipcidr"),
        (TargetType::Range, "range"),
    ];

    /// The Salt spelling (`tgt_type`).
    pub fn as_str(self) -> &'static str {
        Self::ALL
            .iter()
            .find(|(t, _)| *t == self)
            .map_or("glob", |(_, s)| s)
    }

    /// Parses a Salt spelling, case-insensitively.
    pub fn from_name(name: &str) -> Option<TargetType> {
        Self::ALL
            .iter()
            .find(|(_, s)| s.eq_ignore_ascii_case(name))
            .map(|(t, _)| *t)
    }
}

/// Where a job is defined.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct JobSource {
    /// The file, as found in the config directory.
    pub file: PathBuf,
    /// The line of the job's name.
    pub line: u64,
}

/// A validated job.
#[derive(Debug, Clone, PartialEq)]
pub struct JobSpec {
    /// The job's name: its key in the file.
    pub name: String,
    /// The file name without `.yaml`/`.yml`; a `group` key in the file is ignored.
    pub group: String,
    /// When it fires (`sec`..`year`, in `timezone`).
    pub schedule: Schedule,
    /// `targets`: whom Salt targets.
    pub targets: Targets,
    /// `target_type`: how `targets` is read; `glob` when absent.
    pub target_type: TargetType,
    /// `command`: the shell command the wrapper runs.
    pub command: String,
    /// `user`: run the command as this user.
    pub user: Option<String>,
    /// `cwd`: run the command in this directory.
    pub cwd: Option<String>,
    /// `env`: extra environment variables; values converted to text as Python's `str()` does.
    pub env: BTreeMap<String, String>,
    /// `timeout`: 3600 s when absent; `0` or `null` mean no limit (`None`); at most
    /// [`MAX_TIMEOUT_SECS`].
    pub timeout: Option<Duration>,
    /// `number_of_targets`: run on a random subset of this size; 0 = all.
    pub number_of_targets: usize,
    /// `batch_size`: run in sequential batches of this size; 0 = all at once.
    pub batch_size: usize,
    /// `allow_overlap`: true only when the value is exactly [`OVERLAP_MAGIC`].
    pub allow_overlap: bool,
    /// `use_wrapper`: false selects the legacy Salt-only mode; true when absent.
    pub use_wrapper: bool,
    /// `wrapper_path`: the wrapper command on the minion; the settings' default when absent.
    pub wrapper_path: Option<String>,
    /// `wrapper_loglevel`: `SP_WRAPPER_LOGLEVEL`; the settings' default when absent.
    pub wrapper_loglevel: Option<String>,
    /// `wrapper_logdir`: `SP_WRAPPER_LOGDIR`; the settings' default when absent.
    pub wrapper_logdir: Option<String>,
    /// `saltpeter_server_host`: host part of the wrapper's WebSocket URL.
    pub saltpeter_server_host: Option<String>,
    /// `lockfile`: `SP_LOCKFILE`.
    pub lockfile: Option<String>,
    /// `timezone`: IANA zone the schedule is evaluated in; UTC when absent.
    pub timezone: Option<String>,
    /// `notify`: the job's own notification rules, replacing the settings' list; `Some` of an
    /// empty list silences the job; `None` (absent) follows the settings.
    pub notify: Option<Vec<saltpeter_notify::Rule>>,
    /// `warn_after`: a run still going this long after it started raises one
    /// `running_too_long` notification; none when absent, `null` or `0`.
    pub warn_after: Option<Duration>,
    /// `catch_up`, `starting_deadline`, `missed_limit`, `retries`, `retry_delay`, `retry_on`:
    /// what happens to missed slots and failed machines (see `recovery.rs`).
    pub recovery: super::recovery::Recovery,
    /// Keys this version does not know, as JSON, kept so the UI can show them.
    pub extra: serde_json::Map<String, serde_json::Value>,
    /// Where the job is defined.
    pub source: JobSource,
    /// The job as the UI's `config` message shows it (see [`JobSpec::ui_json`]).
    ui: serde_json::Map<String, serde_json::Value>,
}

impl JobSpec {
    /// The job as the UI's `config` message shows it: every key as written in the file, `group`
    /// forced to the file stem, `timeout` added with 3600 when absent (as the original loader
    /// does), and every `env` value replaced by `"<redacted>"` so secrets never leave the master.
    pub fn ui_json(&self) -> serde_json::Value {
        serde_json::Value::Object(self.ui.clone())
    }
}

/// Keys of the original's job blocks that have no effect; they are accepted with a warning.
const INERT_KEYS: [(&str, &str); 3] = [
    (
        "utc",
        "has no effect: schedules are evaluated in UTC unless \"timezone\" is set",
    ),
    (
        "hard_timeout",
        "has no effect (as in the original); use \"timeout\"",
    ),
    (
        "soft_timeout",
        "has no effect (as in the original); use \"timeout\"",
    ),
];

/// Every key a job may have.
const KNOWN_KEYS: [&str; 26] = [
    "sec",
    "min",
    "hour",
    "dom",
    "mon",
    "dow",
    "year",
    "utc",
    "timezone",
    "targets",
    "target_type",
    "command",
    "user",
    "cwd",
    "env",
    "timeout",
    "hard_timeout",
    "soft_timeout",
    "number_of_targets",
    "batch_size",
    "allow_overlap",
    "use_wrapper",
    "wrapper_path",
    "wrapper_loglevel",
    "wrapper_logdir",
    "saltpeter_server_host",
];

/// Keys beyond [`KNOWN_KEYS`] that are also known.
const MORE_KNOWN_KEYS: [&str; 4] = ["lockfile", "group", "notify", "warn_after"];

/// The outcome of reading one job: the spec or its errors, and warnings either way.
#[derive(Debug)]
pub(crate) struct JobOutcome {
    pub spec: Result<JobSpec, Vec<ConfigProblem>>,
    pub warnings: Vec<ConfigProblem>,
}

/// Collects problems for one job.
struct Ctx<'a> {
    file: &'a Path,
    name: &'a str,
    job_line: u64,
    errors: Vec<ConfigProblem>,
    warnings: Vec<ConfigProblem>,
}

impl Ctx<'_> {
    fn problem(
        &self,
        severity: Severity,
        line: u64,
        key: Option<&str>,
        msg: String,
    ) -> ConfigProblem {
        ConfigProblem::at(
            severity,
            self.file,
            if line > 0 { line } else { self.job_line },
            Section::Job(self.name.to_owned()),
            key,
            msg,
        )
    }

    fn error(&mut self, node: Option<&Node>, key: &str, msg: impl Into<String>) {
        let line = node.map_or(self.job_line, |n| n.pos.line);
        let p = self.problem(Severity::Error, line, Some(key), msg.into());
        self.errors.push(p);
    }

    fn warn(&mut self, node: Option<&Node>, key: Option<&str>, msg: impl Into<String>) {
        let line = node.map_or(self.job_line, |n| n.pos.line);
        let p = self.problem(Severity::Warning, line, key, msg.into());
        self.warnings.push(p);
    }
}

/// Reads one job. `name_node` is the job's key (its line is the job's line), `body` its value.
/// `now` is used to reject schedules that can never fire again.
pub(crate) fn parse_job(
    file: &Path,
    group: &str,
    name: &str,
    name_node: &Node,
    body: &Node,
    now: OffsetDateTime,
) -> JobOutcome {
    let mut ctx = Ctx {
        file,
        name,
        job_line: name_node.pos.line,
        errors: Vec::new(),
        warnings: Vec::new(),
    };
    let entries: &[(Node, Node)] = match &body.value {
        Value::Map(entries) => entries,
        other => {
            let msg = format!("a job must be a mapping of keys, got {}", other.kind());
            let p = ctx.problem(Severity::Error, ctx.job_line, None, msg);
            return JobOutcome {
                spec: Err(vec![p]),
                warnings: Vec::new(),
            };
        }
    };

    // Last duplicate wins, as in PyYAML; say so.
    let mut keys: BTreeMap<String, &Node> = BTreeMap::new();
    let mut ui = serde_json::Map::new();
    let mut extra = serde_json::Map::new();
    for (k, v) in entries {
        let key = k.key_text();
        if keys.insert(key.clone(), v).is_some() {
            ctx.warn(
                Some(k),
                Some(&key),
                "defined more than once; the last one is used",
            );
        }
        let known = KNOWN_KEYS.contains(&key.as_str())
            || MORE_KNOWN_KEYS.contains(&key.as_str())
            || super::recovery::KEYS.contains(&key.as_str());
        if !known {
            ctx.warn(
                Some(k),
                Some(&key),
                "unknown key (kept and shown in the UI, otherwise ignored)",
            );
            extra.insert(key.clone(), v.to_json());
        }
        if let Some((_, why)) = INERT_KEYS.iter().find(|(inert, _)| *inert == key) {
            ctx.warn(Some(k), Some(&key), *why);
        }
        ui.insert(key, v.to_json());
    }

    // The schedule.
    let text_field = |ctx: &mut Ctx<'_>, key: &str, default: Option<&str>| -> Option<String> {
        match keys.get(key) {
            None => match default {
                Some(d) => Some(d.to_owned()),
                None => {
                    ctx.error(None, key, "required key is missing");
                    None
                }
            },
            Some(node) => match &node.value {
                Value::Str(s) => Some(s.clone()),
                Value::Int(i) => Some(i.to_string()),
                other => {
                    ctx.error(
                        Some(node),
                        key,
                        format!(
                            "expected a cron field (text or a number), got {}",
                            other.kind()
                        ),
                    );
                    None
                }
            },
        }
    };
    let sec = text_field(&mut ctx, "sec", Some("0"));
    let min = text_field(&mut ctx, "min", None);
    let hour = text_field(&mut ctx, "hour", None);
    let dom = text_field(&mut ctx, "dom", None);
    let mon = text_field(&mut ctx, "mon", None);
    let dow = text_field(&mut ctx, "dow", None);
    let year = text_field(&mut ctx, "year", Some("*"));
    let timezone = optional_text(&mut ctx, &keys, "timezone");
    if let Some(node) = keys.get("utc")
        && !matches!(node.value, Value::Null)
        && let Err(e) = node.as_bool()
    {
        ctx.error(Some(node), "utc", e);
    }

    let schedule = match (sec, min, hour, dom, mon, dow, year) {
        (Some(sec), Some(min), Some(hour), Some(dom), Some(mon), Some(dow), Some(year)) => {
            let fields = ScheduleFields {
                sec,
                min,
                hour,
                dom,
                mon,
                dow,
                year,
            };
            match Schedule::parse(&fields, timezone.as_deref())
                .and_then(|s| s.ensure_fires_after(now).map(|()| s))
            {
                Ok(s) => Some(s),
                Err(e) => {
                    schedule_error(&mut ctx, &keys, &e);
                    None
                }
            }
        }
        _ => None,
    };

    // Targeting and the command.
    let targets = match keys.get("targets") {
        None => {
            ctx.error(None, "targets", "required key is missing");
            None
        }
        Some(node) => match &node.value {
            Value::Seq(items) => {
                let mut names = Vec::new();
                for item in items {
                    match item.as_text() {
                        Ok(t) if !t.trim().is_empty() => names.push(t),
                        Ok(_) => ctx.error(Some(item), "targets", "empty target name"),
                        Err(e) => ctx.error(Some(item), "targets", e),
                    }
                }
                if names.is_empty() && items.is_empty() {
                    ctx.error(Some(node), "targets", "the list of targets is empty");
                }
                Some(Targets::List(names))
            }
            _ => match node.as_text() {
                Ok(t) if !t.trim().is_empty() => Some(Targets::Expression(t)),
                Ok(_) => {
                    ctx.error(Some(node), "targets", "empty target expression");
                    None
                }
                Err(e) => {
                    ctx.error(Some(node), "targets", format!("{e} or a list"));
                    None
                }
            },
        },
    };
    let target_type = match keys.get("target_type") {
        None => TargetType::Glob,
        Some(node) if matches!(node.value, Value::Null) => TargetType::Glob,
        Some(node) => match node.as_text().ok().and_then(|t| TargetType::from_name(&t)) {
            Some(t) => t,
            None => {
                let names: Vec<&str> = TargetType::ALL.iter().map(|(_, s)| *s).collect();
                ctx.error(
                    Some(node),
                    "target_type",
                    format!(
                        "expected one of {}, got {:?}",
                        names.join(", "),
                        node.scalar_text()
                            .unwrap_or_else(|| node.value.kind().to_owned())
                    ),
                );
                TargetType::Glob
            }
        },
    };
    let command = match keys.get("command") {
        None => {
            ctx.error(None, "command", "required key is missing");
            None
        }
        Some(node) => match node.as_text() {
            Ok(c) if !c.trim().is_empty() => Some(c),
            Ok(_) => {
                ctx.error(Some(node), "command", "the command is empty");
                None
            }
            Err(e) => {
                ctx.error(Some(node), "command", e);
                None
            }
        },
    };

    let user = optional_text(&mut ctx, &keys, "user");
    // An empty name would reach the wrapper as "no user" and run the command as root.
    if let Some(name) = &user
        && let Err(why) = check_user_name(name)
    {
        ctx.error(keys.get("user").copied(), "user", why);
    }
    let cwd = optional_text(&mut ctx, &keys, "cwd");
    let wrapper_path = optional_text(&mut ctx, &keys, "wrapper_path");
    let wrapper_loglevel = optional_text(&mut ctx, &keys, "wrapper_loglevel");
    let wrapper_logdir = optional_text(&mut ctx, &keys, "wrapper_logdir");
    let saltpeter_server_host = optional_text(&mut ctx, &keys, "saltpeter_server_host");
    let lockfile = optional_text(&mut ctx, &keys, "lockfile");

    // The environment: values become text the way Python's str() did.
    let mut env = BTreeMap::new();
    if let Some(node) = keys.get("env") {
        match &node.value {
            Value::Null => {}
            Value::Map(pairs) => {
                for (k, v) in pairs {
                    match v.scalar_text() {
                        Some(text) => {
                            env.insert(k.key_text(), text);
                        }
                        None => ctx.error(
                            Some(v),
                            "env",
                            format!(
                                "the value of {:?} must be a single value, got {}",
                                k.key_text(),
                                v.value.kind()
                            ),
                        ),
                    }
                }
            }
            other => ctx.error(
                Some(node),
                "env",
                format!(
                    "expected a mapping of names to values, got {}",
                    other.kind()
                ),
            ),
        }
    }

    let timeout = match keys.get("timeout") {
        None => Some(DEFAULT_TIMEOUT),
        Some(node) if matches!(node.value, Value::Null) => None,
        Some(node) => match node.as_count("a whole number of seconds") {
            Ok(0) => None,
            Ok(s) if s > MAX_TIMEOUT_SECS => {
                ctx.error(
                    Some(node),
                    "timeout",
                    format!(
                        "expected at most {MAX_TIMEOUT_SECS} seconds (365 days), got {s}; \
                         use 0 or null for no limit"
                    ),
                );
                None
            }
            Ok(s) => Some(Duration::from_secs(s)),
            Err(e) => {
                ctx.error(Some(node), "timeout", e);
                None
            }
        },
    };
    let count = |ctx: &mut Ctx<'_>, key: &str| -> usize {
        match keys.get(key) {
            None => 0,
            Some(node) if matches!(node.value, Value::Null) => 0,
            Some(node) => match node.as_count("a whole number (0 = all)") {
                Ok(n) => usize::try_from(n).unwrap_or(usize::MAX),
                Err(e) => {
                    ctx.error(Some(node), key, e);
                    0
                }
            },
        }
    };
    let number_of_targets = count(&mut ctx, "number_of_targets");
    let batch_size = count(&mut ctx, "batch_size");

    let allow_overlap = match keys.get("allow_overlap") {
        None => false,
        Some(node) => {
            let magic = matches!(&node.value, Value::Str(s) if s == OVERLAP_MAGIC);
            if !magic && !matches!(node.value, Value::Null | Value::Bool(false)) {
                ctx.warn(
                    Some(node),
                    Some("allow_overlap"),
                    format!(
                        "overlap stays forbidden: only the exact text {OVERLAP_MAGIC:?} allows it"
                    ),
                );
            }
            magic
        }
    };
    let use_wrapper = match keys.get("use_wrapper") {
        None => true,
        Some(node) if matches!(node.value, Value::Null) => true,
        Some(node) => node.as_bool().unwrap_or_else(|e| {
            ctx.error(Some(node), "use_wrapper", e);
            true
        }),
    };

    let notify = match keys.get("notify") {
        None => None,
        Some(node) => match crate::notify::rules(node) {
            Ok(rules) => {
                // The file's rules may carry webhook secrets and tokens in URL paths: the UI
                // sees only what the API may show.
                ui.insert("notify".to_owned(), crate::notify::redacted_json(&rules));
                Some(rules)
            }
            Err((line, message)) => {
                ui.insert("notify".to_owned(), serde_json::Value::Null);
                let p = ctx.problem(Severity::Error, line, Some("notify"), message);
                ctx.errors.push(p);
                None
            }
        },
    };
    let warn_after = match keys.get("warn_after") {
        None => None,
        Some(node) => crate::notify::warn_after(node).unwrap_or_else(|e| {
            ctx.error(Some(node), "warn_after", e);
            None
        }),
    };
    let recovery = super::recovery::parse(&keys, |node, key, msg| {
        ctx.error(Some(node), key, msg);
    });

    if let Some(node) = keys.get("group") {
        let given = node.scalar_text().unwrap_or_default();
        if given != group {
            ctx.warn(
                Some(node),
                Some("group"),
                format!("the group is always the file name {group:?}; {given:?} is ignored"),
            );
        }
    }

    // What the UI sees: the file's keys, forced group, default timeout, redacted env.
    ui.insert(
        "group".to_owned(),
        serde_json::Value::String(group.to_owned()),
    );
    if !keys.contains_key("timeout") {
        ui.insert(
            "timeout".to_owned(),
            serde_json::Value::from(DEFAULT_TIMEOUT.as_secs()),
        );
    }
    if let Some(serde_json::Value::Object(env_json)) = ui.get_mut("env") {
        for value in env_json.values_mut() {
            *value = serde_json::Value::String("<redacted>".to_owned());
        }
    }

    let Ctx {
        errors, warnings, ..
    } = ctx;
    let spec = match (schedule, targets, command) {
        (Some(schedule), Some(targets), Some(command)) if errors.is_empty() => Ok(JobSpec {
            name: name.to_owned(),
            group: group.to_owned(),
            schedule,
            targets,
            target_type,
            command,
            user,
            cwd,
            env,
            timeout,
            number_of_targets,
            batch_size,
            allow_overlap,
            use_wrapper,
            wrapper_path,
            wrapper_loglevel,
            wrapper_logdir,
            saltpeter_server_host,
            lockfile,
            timezone,
            notify,
            warn_after,
            recovery,
            extra,
            source: JobSource {
                file: file.to_owned(),
                line: name_node.pos.line,
            },
            ui,
        }),
        _ => Err(errors),
    };
    JobOutcome { spec, warnings }
}

/// An optional text key: absent or `null` is `None`; numbers become their text.
/// A user name the wrapper can look up: not empty, no white space or control characters, no
/// `:` (the separator of the passwd database).
fn check_user_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("the user is empty; leave the key out to run as the wrapper's own user".into());
    }
    if name
        .chars()
        .any(|c| c.is_whitespace() || c.is_control() || c == ':')
    {
        return Err(format!("{name:?} is not a user name"));
    }
    Ok(())
}

fn optional_text(ctx: &mut Ctx<'_>, keys: &BTreeMap<String, &Node>, key: &str) -> Option<String> {
    let node = keys.get(key)?;
    if matches!(node.value, Value::Null) {
        return None;
    }
    match node.as_text() {
        Ok(t) => Some(t),
        Err(e) => {
            ctx.error(Some(node), key, e);
            None
        }
    }
}

/// Reports a schedule error on the key it is about (the job's line when the key is absent).
fn schedule_error(ctx: &mut Ctx<'_>, keys: &BTreeMap<String, &Node>, error: &ScheduleError) {
    let (key, message) = match error {
        ScheduleError::Field { field, .. } => (field.key(), format!("bad schedule: {error}")),
        ScheduleError::TimeZone { .. } => ("timezone", error.to_string()),
        ScheduleError::NeverFires { .. } => {
            let key = if keys.contains_key(Field::Year.key()) {
                Field::Year.key()
            } else {
                "schedule"
            };
            (key, error.to_string())
        }
        ScheduleError::FieldCount { .. } | ScheduleError::Engine { .. } => {
            ("schedule", format!("bad schedule: {error}"))
        }
    };
    let node = keys.get(key).copied();
    ctx.error(node, key, message);
}

#[cfg(test)]
#[allow(clippy::indexing_slicing)] // A test that indexes out of bounds fails, as it should.
mod tests {
    use super::*;
    use crate::raw::parse_yaml;

    fn job(yaml: &str) -> JobOutcome {
        let doc = parse_yaml(yaml).unwrap();
        let Value::Map(entries) = &doc.value else {
            panic!("not a mapping")
        };
        let (k, v) = &entries[0];
        parse_job(
            Path::new("jobs.yaml"),
            "jobs",
            &k.key_text(),
            k,
            v,
            time::macros::datetime!(2026-11-28 00:00 UTC),
        )
    }

    #[test]
    fn minimal_job_gets_every_default() {
        let out = job(
            "j:\n  min: 5\n  hour: '*'\n  dom: '*'\n  mon: '*'\n  dow: '*'\n  targets: 'web*'\n  command: 'true'\n",
        );
        let spec = out.spec.unwrap();
        assert!(out.warnings.is_empty(), "{:?}", out.warnings);
        assert_eq!(spec.schedule.cron_line(), "0 5 * * * * *");
        assert_eq!(spec.target_type, TargetType::Glob);
        assert_eq!(spec.timeout, Some(DEFAULT_TIMEOUT));
        assert!(spec.use_wrapper);
        assert!(!spec.allow_overlap);
        assert_eq!(spec.number_of_targets, 0);
        assert_eq!(spec.batch_size, 0);
        assert!(spec.env.is_empty());
        assert_eq!(spec.source.line, 1);
        assert_eq!(spec.ui_json()["timeout"], 3600);
        assert_eq!(spec.ui_json()["group"], "jobs");
    }

    #[test]
    fn missing_required_keys_name_the_job_line() {
        let out = job("# x\nj:\n  min: 5\n");
        let errors = out.spec.unwrap_err();
        let keys: Vec<_> = errors.iter().map(|e| e.key.clone().unwrap()).collect();
        assert_eq!(keys, ["hour", "dom", "mon", "dow", "targets", "command"]);
        assert!(errors.iter().all(|e| e.line == Some(2)));
    }
}
