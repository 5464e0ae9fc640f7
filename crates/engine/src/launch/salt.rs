//! The Salt launcher (`launcher: salt`): drives the `salt` command line on the Salt master
//! host, as the original drove Salt's `LocalClient` (docs/COMPATIBILITY.md, "Salt invocation and legacy mode").
//!
//! What it owns:
//! - building every `salt` invocation. The command line is only `salt --args-stdin`; every
//!   option and argument goes on stdin, one per line. Two reasons: the wrapper's environment
//!   (the command, the job's `env`, the run token) must never appear in any process's argv,
//!   and Salt's option parser (`salt/utils/parsers.py`, `parse_args`) re-parses the stdin lines
//!   into a fresh set of options and copies *all* of them, defaults included, over the ones
//!   given on the command line — so `-c`, `--out`, timeouts and targeting flags given on the
//!   command line would silently fall back to their defaults.
//! - encoding keyword arguments as one YAML flow mapping tagged `__kwarg__` (Salt's own
//!   convention for keyword arguments passed as data), with every string double-quoted and
//!   escaped to ASCII, so Salt's YAML re-parsing of CLI arguments cannot alter a value,
//!   a `#` cannot start a comment, and no line break can split a stdin line.
//! - reading Salt's replies: JSON documents, one per minion (`--out=json --out-indent=-1`),
//!   among whatever else Salt prints (warnings, "No minions matched", a bare JSON string when
//!   the master cannot be reached), and its exit status (1 when any minion failed or did not
//!   answer, 2 when nothing was sent).
//!
//! Each wrapper learns its Salt minion id on the minion itself: the launch command is rendered
//! by Salt with `template=jinja` as `/usr/bin/env SP_MACHINE_ID={{ grains['id'] }}
//! SP_SALT_PKI_DIR={{ opts['pki_dir'] }} <wrapper>`, so it reports under the id Salt knows even
//! where the host name differs, and finds the minion's own key (`minion.pem`) to sign its
//! `connect` with; the master checks that signature with the key it accepted for that id
//! (`identity.rs`). Neither value in argv is a secret; the environment travels as
//! `cmd.run_all`'s `env` argument, which Salt hands to the process as its environment and never
//! renders as a template.

use std::collections::{BTreeMap, HashSet};
use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use saltpeter_proto::{STARTUP_WINDOW, TIMEOUT_GRACE};
use serde_json::Value;
use tokio::io::AsyncWriteExt;
use tokio::process::Command;

use super::StartRequest;
use super::{BoxFuture, DirectOutcome, DirectResult, Launcher, Resolution, StartOutcome};
use crate::identity::Identity;
use saltpeter_config::{JobSpec, Settings, TargetType};

/// How much longer than its own `-t` a `salt` process may take before we stop waiting: Salt
/// spends its start-up, then up to `gather_job_timeout` (10 s by default) asking silent minions
/// whether they still run the job.
const PROCESS_GRACE: Duration = Duration::from_secs(60);

/// The prefix of the 255 verdict for a minion that did not answer `test.ping`.
pub(crate) const NOT_RESPONDING: &str = "Target did not respond";

/// Why a `salt` invocation gave no usable answer.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SaltError {
    #[error("cannot run {bin}: {source}")]
    Spawn { bin: String, source: std::io::Error },
    #[error("cannot talk to {bin}: {source}")]
    Io { bin: String, source: std::io::Error },
    #[error("{bin} gave no answer within {limit:?}; stopped it")]
    Timeout { bin: String, limit: Duration },
    #[error("{what} contains a line break, which cannot be passed to salt")]
    LineBreak { what: &'static str },
}

/// Runs jobs through the `salt` command line.
#[derive(Debug, Clone)]
pub struct SaltLauncher {
    /// The `salt` command (`salt_bin`).
    pub salt_bin: String,
    /// Salt's configuration directory (`salt_config_dir`), passed as `-c`.
    pub config_dir: Option<PathBuf>,
    /// `-t` for `test.ping` (`ping_timeout`).
    pub ping_timeout: Duration,
    /// The Salt master's pki directory (`salt_pki_dir`), where minions' accepted keys are.
    pub pki_dir: PathBuf,
}

/// The pki directory of the Salt master whose configuration is in `config_dir`: its
/// `pki_dir` (default `/etc/salt/pki/master`) under its `root_dir`, as Salt itself resolves
/// them. Only top-level keys of the `master` file are read; a deployment that sets them
/// elsewhere (an include, `master.d`) sets `salt_pki_dir` instead.
pub(crate) fn master_pki_dir(config_dir: Option<&std::path::Path>) -> PathBuf {
    let default = PathBuf::from("/etc/salt/pki/master");
    let Some(text) = config_dir.and_then(|d| std::fs::read_to_string(d.join("master")).ok()) else {
        return default;
    };
    let value = |key: &str| {
        text.lines().find_map(|line| {
            let rest = line.strip_prefix(key)?.strip_prefix(':')?;
            let v = rest.split(" #").next()?.trim().trim_matches(['"', '\'']);
            (!v.is_empty()).then(|| PathBuf::from(v))
        })
    };
    let pki = value("pki_dir").unwrap_or(default);
    match value("root_dir") {
        Some(root) if root != std::path::Path::new("/") && !pki.starts_with(&root) => {
            root.join(pki.strip_prefix("/").unwrap_or(&pki))
        }
        _ => pki,
    }
}

impl SaltLauncher {
    /// A launcher configured by the master's settings.
    pub fn from_settings(s: &Settings) -> Self {
        Self {
            salt_bin: s.salt_bin.clone(),
            config_dir: s.salt_config_dir.clone(),
            ping_timeout: s.ping_timeout,
            pki_dir: s
                .salt_pki_dir
                .clone()
                .unwrap_or_else(|| master_pki_dir(s.salt_config_dir.as_deref())),
        }
    }

    /// Options every invocation starts with: config directory, one-line JSON per minion, `-t`.
    fn options(&self, timeout: Duration) -> Vec<String> {
        let mut args = Vec::new();
        if let Some(dir) = &self.config_dir {
            args.push("-c".to_owned());
            args.push(dir.to_string_lossy().into_owned());
        }
        args.push("--out=json".to_owned());
        args.push("--out-indent=-1".to_owned());
        args.push("--timeout".to_owned());
        args.push(timeout.as_secs().max(1).to_string());
        args
    }

    /// The stdin lines of the `test.ping` that resolves a job's targets.
    pub(crate) fn ping_args(&self, job: &JobSpec) -> Result<Vec<String>, SaltError> {
        let mut args = self.options(self.ping_timeout);
        if let Some(flag) = target_flag(job.target_type) {
            args.push(flag.to_owned());
        }
        // `--` so a target that starts with `-` is still a target.
        args.push("--".to_owned());
        args.push(job.targets.to_salt_arg());
        args.push("test.ping".to_owned());
        check_lines(&args, "the job's targets")?;
        Ok(args)
    }

    /// The stdin lines that start the wrapper on the request's machines with `cmd.run_all`.
    pub(crate) fn start_args(&self, request: &StartRequest) -> Result<Vec<String>, SaltError> {
        let program = request
            .wrapper_path
            .as_deref()
            .unwrap_or(saltpeter_config::settings::ORIGINAL_WRAPPER_PATH);
        // Rendered on each minion: its own id becomes SP_MACHINE_ID, and its own pki
        // directory tells the wrapper where the minion's key is to sign its connect with.
        let cmd = format!(
            "/usr/bin/env SP_MACHINE_ID={{{{ grains['id'] | quote }}}} \
             SP_SALT_PKI_DIR={{{{ opts['pki_dir'] | quote }}}} {}",
            shell_word(program)
        );
        let kwargs = [
            ("cmd", Kw::Str(&cmd)),
            ("env", Kw::Map(&request.env)),
            ("python_shell", Kw::Bool(false)),
            ("template", Kw::Str("jinja")),
        ];
        self.run_all_args(STARTUP_WINDOW, &request.machines, &kwargs)
    }

    /// The stdin lines that run the job's command itself with `cmd.run_all` (legacy mode,
    /// `use_wrapper: false`): the job's `env` plus the two variables the
    /// original passed, `cwd`, `runas` and the job's timeout. The command is a `cmd.run_all`
    /// argument, so it travels on stdin and in Salt's payload, never in the master's argv; on
    /// the minion Salt runs it with the shell, as the original did.
    pub(crate) fn direct_args(&self, request: &StartRequest) -> Result<Vec<String>, SaltError> {
        let job = &request.job;
        let mut env: Vec<(String, String)> = job
            .env
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        env.retain(|(k, _)| k != "SP_JOB_NAME" && k != "SP_JOB_INSTANCE_NAME");
        env.push(("SP_JOB_NAME".into(), job.name.clone()));
        env.push(("SP_JOB_INSTANCE_NAME".into(), request.instance.clone()));
        let timeout = job.timeout.map(|t| t.as_secs().max(1));
        let mut kwargs = vec![
            ("cmd", Kw::Str(&job.command)),
            ("env", Kw::Map(&env)),
            ("python_shell", Kw::Bool(true)),
        ];
        if let Some(cwd) = &job.cwd {
            kwargs.push(("cwd", Kw::Str(cwd)));
        }
        if let Some(user) = &job.user {
            kwargs.push(("runas", Kw::Str(user)));
        }
        if let Some(secs) = timeout {
            kwargs.push(("timeout", Kw::Int(secs)));
        }
        // Salt keeps waiting past `-t` while the minions report the job as still running.
        self.run_all_args(STARTUP_WINDOW, &request.machines, &kwargs)
    }

    fn run_all_args(
        &self,
        timeout: Duration,
        machines: &[String],
        kwargs: &[(&str, Kw<'_>)],
    ) -> Result<Vec<String>, SaltError> {
        let mut args = self.options(timeout);
        args.push("-L".to_owned());
        args.push("--".to_owned());
        args.push(machines.join(","));
        args.push("cmd.run_all".to_owned());
        args.push(kwarg_map(kwargs));
        check_lines(&args, "a machine name")?;
        Ok(args)
    }

    /// Runs `salt --args-stdin` with `args` on stdin; stops it after `limit`.
    async fn call(&self, args: Vec<String>, limit: Duration) -> Result<SaltOutput, SaltError> {
        let bin = self.salt_bin.clone();
        let began = std::time::Instant::now();
        let mut child = Command::new(&bin)
            .arg("--args-stdin")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| SaltError::Spawn {
                bin: bin.clone(),
                source,
            })?;
        let mut input = args.join("\n");
        input.push('\n');
        let io = |source| SaltError::Io {
            bin: bin.clone(),
            source,
        };
        if let Some(mut stdin) = child.stdin.take() {
            // Salt reads stdin to the end before anything else; the input is small.
            stdin.write_all(input.as_bytes()).await.map_err(io)?;
            stdin.shutdown().await.map_err(io)?;
        }
        let output = tokio::time::timeout(limit, child.wait_with_output())
            .await
            .map_err(|_| SaltError::Timeout {
                bin: bin.clone(),
                limit,
            })?
            .map_err(io)?;
        tracing::debug!(took = ?began.elapsed(), status = %output.status, "salt answered.");
        Ok(SaltOutput {
            code: output.status.code(),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        })
    }
}

impl Launcher for SaltLauncher {
    /// One `cmd.run_all` carries one environment to every minion, so no minion can get a
    /// secret of its own that way; each proves its id with its own Salt key instead.
    fn identity(&self) -> Identity {
        Identity::SaltKey
    }

    fn salt_pki_dir(&self) -> Option<PathBuf> {
        Some(self.pki_dir.clone())
    }

    fn resolve(&self, job: Arc<JobSpec>) -> BoxFuture<Resolution> {
        let me = self.clone();
        Box::pin(async move {
            let limit = me.ping_timeout.saturating_add(PROCESS_GRACE);
            let result = match me.ping_args(&job) {
                Ok(args) => me.call(args, limit).await,
                Err(e) => Err(e),
            };
            let resolution = match result {
                Ok(out) => ping_resolution(&job, &out),
                Err(e) => failed_resolution(&job, &e.to_string()),
            };
            for (machine, why) in &resolution.down {
                tracing::warn!(job = %job.name, %machine, %why, "Target did not respond to test.ping.");
            }
            if let Some(error) = &resolution.error {
                tracing::error!(job = %job.name, %error, "test.ping through Salt failed.");
            }
            resolution
        })
    }

    fn start(&self, request: StartRequest) -> BoxFuture<StartOutcome> {
        let me = self.clone();
        Box::pin(async move {
            let result = match me.start_args(&request) {
                Ok(args) => me.call(args, STARTUP_WINDOW + PROCESS_GRACE).await,
                Err(e) => Err(e),
            };
            let outcome = match result {
                Ok(out) => start_outcome(&request.machines, &out),
                Err(e) => all_failed(&request.machines, &e.to_string()),
            };
            for (machine, result) in &outcome {
                if let Err(why) = result {
                    tracing::warn!(instance = %request.instance, %machine, %why, "Salt could not start the wrapper.");
                }
            }
            outcome
        })
    }

    fn run_direct(&self, request: StartRequest) -> BoxFuture<DirectOutcome> {
        let me = self.clone();
        Box::pin(async move {
            let limit = request
                .job
                .timeout
                .map_or(Duration::from_secs(u64::from(u32::MAX)), |t| {
                    // Saturating: `Duration + Duration` panics on overflow, and a limit this
                    // long is no limit anyway (tokio treats it as "never").
                    t.saturating_add(TIMEOUT_GRACE)
                        .saturating_add(PROCESS_GRACE)
                });
            let result = match me.direct_args(&request) {
                Ok(args) => me.call(args, limit).await,
                Err(e) => Err(e),
            };
            let outcome = match result {
                Ok(out) => direct_outcome(&request.machines, &out),
                Err(e) => request
                    .machines
                    .iter()
                    .map(|m| (m.clone(), Err(e.to_string())))
                    .collect(),
            };
            for (machine, result) in &outcome {
                if let Err(why) = result {
                    tracing::warn!(instance = %request.instance, %machine, %why, "Salt returned no result for the command.");
                }
            }
            outcome
        })
    }
}

/// The salt CLI flag for a target type; glob is Salt's default and has none.
pub(crate) fn target_flag(t: TargetType) -> Option<&'static str> {
    match t {
        TargetType::Glob => None,
        TargetType::Pcre => Some("-E"),
        TargetType::List => Some("-L"),
        TargetType::Grain => Some("-G"),
        TargetType::GrainPcre => Some("-P"),
        TargetType::Pillar => Some("-I"),
        TargetType::Nodegroup => Some("-N"),
        TargetType::Compound => Some("-C"),
        TargetType::Ipcidr => Some("-S"),
        TargetType::Range => Some("-R"),
    }
}

fn check_lines(args: &[String], what: &'static str) -> Result<(), SaltError> {
    if args.iter().any(|a| a.contains(['\n', '\r'])) {
        return Err(SaltError::LineBreak { what });
    }
    Ok(())
}

/// A word for the shell-like splitting `cmd.run_all` does with `python_shell=False`.
pub fn shell_word(s: &str) -> String {
    let plain = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "/._-+:@%,=".contains(c));
    if plain {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// A keyword argument's value.
#[derive(Debug, Clone, Copy)]
pub enum Kw<'a> {
    Str(&'a str),
    Map(&'a [(String, String)]),
    Bool(bool),
    Int(u64),
}

/// One YAML flow mapping with every keyword argument and `__kwarg__: true`, which Salt's CLI
/// turns into a dict and the minion's loader into keyword arguments. Pure ASCII, one line.
pub fn kwarg_map(kwargs: &[(&str, Kw<'_>)]) -> String {
    let mut out = String::from("{");
    for (name, value) in kwargs {
        yaml_str(&mut out, name);
        out.push_str(": ");
        match value {
            Kw::Str(s) => yaml_str(&mut out, s),
            Kw::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            Kw::Int(n) => {
                let _ = write!(out, "{n}");
            }
            Kw::Map(pairs) => {
                out.push('{');
                for (i, (k, v)) in pairs.iter().enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    yaml_str(&mut out, k);
                    out.push_str(": ");
                    yaml_str(&mut out, v);
                }
                out.push('}');
            }
        }
        out.push_str(", ");
    }
    out.push_str("\"__kwarg__\": true}");
    out
}

/// A YAML double-quoted scalar: the only YAML string form with no implicit typing and no
/// comments; anything outside printable ASCII is escaped, so the line is plain ASCII.
fn yaml_str(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            ' '..='~' => out.push(c),
            c if (c as u32) < 0x100 => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c if (c as u32) < 0x1_0000 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => {
                let _ = write!(out, "\\U{:08x}", c as u32);
            }
        }
    }
    out.push('"');
}

/// What a `salt` process left behind.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct SaltOutput {
    /// Exit status; `None` when a signal ended it.
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

/// Salt's stdout, read.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Reply {
    /// Per-minion return values, from every JSON object printed.
    pub returns: BTreeMap<String, Value>,
    /// Bare JSON strings: how Salt reports a failure of the whole call with `--out=json`
    /// ("The salt master could not be contacted. Is master running?").
    pub messages: Vec<String>,
    /// Everything else: warnings and notices printed before or between the JSON documents.
    pub noise: Vec<String>,
}

/// Reads Salt's stdout: JSON documents (one line each with `--out-indent=-1`, but indented
/// ones are read too) among any other text.
pub fn parse_reply(stdout: &str) -> Reply {
    let mut reply = Reply::default();
    let mut rest = stdout;
    while !rest.is_empty() {
        let trimmed = rest.trim_start();
        if trimmed.is_empty() {
            break;
        }
        if trimmed.starts_with(['{', '"']) {
            let mut stream = serde_json::Deserializer::from_str(trimmed).into_iter::<Value>();
            if let Some(Ok(value)) = stream.next() {
                let used = stream.byte_offset();
                match value {
                    Value::Object(map) => reply.returns.extend(map),
                    Value::String(s) => reply.messages.push(s),
                    other => reply.noise.push(other.to_string()),
                }
                rest = &trimmed[used..];
                continue;
            }
        }
        let (line, after) = trimmed.split_once('\n').unwrap_or((trimmed, ""));
        let line = line.trim_end();
        if !line.is_empty() {
            reply.noise.push(line.to_owned());
        }
        rest = after;
    }
    reply
}

/// Everything Salt said besides per-minion returns, for the output and the log.
fn salt_said(out: &SaltOutput, reply: &Reply) -> String {
    let mut parts: Vec<String> = reply.messages.clone();
    parts.extend(reply.noise.iter().cloned());
    let stderr = out.stderr.trim();
    if !stderr.is_empty() {
        parts.push(stderr.to_owned());
    }
    let mut said = parts.join("\n");
    match out.code {
        Some(0) => {}
        Some(code) => {
            let _ = write!(said, "{}(salt exit code {code})", sep(&said));
        }
        None => {
            let _ = write!(said, "{}(salt ended by a signal)", sep(&said));
        }
    }
    if said.is_empty() {
        said = "salt printed nothing".to_owned();
    }
    said
}

fn sep(s: &str) -> &'static str {
    if s.is_empty() { "" } else { " " }
}

/// The first line of a minion's non-`True` answer, such as
/// "Minion did not return. [No response]".
fn first_line(v: &Value) -> String {
    match v {
        Value::String(s) => s.lines().next().unwrap_or_default().trim().to_owned(),
        other => other.to_string(),
    }
}

/// Up/down from a `test.ping` reply: `true` is up; any other answer, including Salt's
/// "Minion did not return" for a minion it expected, is down with 255.
pub(crate) fn ping_resolution(job: &JobSpec, out: &SaltOutput) -> Resolution {
    let reply = parse_reply(&out.stdout);
    if reply.returns.is_empty() {
        let said = salt_said(out, &reply);
        if said.contains("No minions matched the target") {
            tracing::info!(job = %job.name, %said, "Salt matched no minions.");
            return Resolution::default();
        }
        return failed_resolution(job, &format!("Salt: {said}"));
    }
    let mut resolution = Resolution::default();
    for (minion, answer) in reply.returns {
        if answer == Value::Bool(true) {
            resolution.up.push(minion);
        } else {
            let why = format!("{NOT_RESPONDING} (Salt: {})\n", first_line(&answer));
            resolution.down.push((minion, why));
        }
    }
    resolution
}

/// A resolution that failed as a whole. With list targeting the machines are known, so each
/// gets the 255 with Salt's words; otherwise the run has no machines and the error is logged.
fn failed_resolution(job: &JobSpec, error: &str) -> Resolution {
    let mut resolution = Resolution {
        error: Some(error.to_owned()),
        ..Resolution::default()
    };
    if job.target_type == TargetType::List {
        let mut seen = HashSet::new();
        for name in job.targets.names() {
            if seen.insert(name.clone()) {
                resolution
                    .down
                    .push((name, format!("{NOT_RESPONDING} - {error}\n")));
            }
        }
    }
    resolution
}

fn all_failed<T>(machines: &[String], why: &str) -> Vec<(String, Result<T, String>)> {
    machines
        .iter()
        .map(|m| (m.clone(), Err(why.to_owned())))
        .collect()
}

/// What one minion's `cmd.run_all` return says, as (retcode, stdout, stderr); `Err` carries
/// Salt's explanation when the minion gave no such return.
fn run_all_return(answer: Option<&Value>, said: &str) -> Result<(i64, String, String), String> {
    match answer {
        Some(Value::Object(ret)) => {
            let text = |k: &str| ret.get(k).and_then(Value::as_str).unwrap_or("").to_owned();
            let retcode = ret.get("retcode").and_then(Value::as_i64).unwrap_or(-1);
            Ok((retcode, text("stdout"), text("stderr")))
        }
        Some(Value::String(s)) => Err(format!("Salt: {}", s.trim())),
        Some(other) => Err(format!("Salt: {other}")),
        None => Err(format!(
            "Salt returned nothing for this minion. Salt: {said}"
        )),
    }
}

/// Per-machine launch results from the `cmd.run_all` reply: exit 0 is a launch; anything
/// else fails that machine only (docs/COMPATIBILITY.md), with Salt's or the wrapper's own words.
pub(crate) fn start_outcome(machines: &[String], out: &SaltOutput) -> StartOutcome {
    let reply = parse_reply(&out.stdout);
    let said = salt_said(out, &reply);
    machines
        .iter()
        .map(|m| {
            let result = run_all_return(reply.returns.get(m), &said).and_then(
                |(retcode, stdout, stderr)| {
                    if retcode == 0 {
                        return Ok(());
                    }
                    let mut why = format!("Exit code {retcode}");
                    if !stderr.trim().is_empty() {
                        let _ = write!(why, "\nSTDERR: {}", stderr.trim_end());
                    }
                    if !stdout.trim().is_empty() {
                        let _ = write!(why, "\nSTDOUT: {}", stdout.trim_end());
                    }
                    Err(why)
                },
            );
            (m.clone(), result)
        })
        .collect()
}

/// Per-machine results of a legacy-mode run: the command's retcode with stdout then stderr.
pub(crate) fn direct_outcome(machines: &[String], out: &SaltOutput) -> DirectOutcome {
    let reply = parse_reply(&out.stdout);
    let said = salt_said(out, &reply);
    machines
        .iter()
        .map(|m| {
            let result =
                run_all_return(reply.returns.get(m), &said).map(|(retcode, stdout, stderr)| {
                    let mut output = stdout;
                    if !stderr.is_empty() {
                        if !output.is_empty() && !output.ends_with('\n') {
                            output.push('\n');
                        }
                        output.push_str(&stderr);
                    }
                    if !output.is_empty() && !output.ends_with('\n') {
                        output.push('\n');
                    }
                    DirectResult { retcode, output }
                });
            (m.clone(), result)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use saltpeter_config::Config;

    /// Jobs from YAML, as the loader reads them.
    fn job(body: &str) -> Arc<JobSpec> {
        let dir = tempfile::tempdir().unwrap();
        let text = format!(
            "j:\n  sec: 0\n  min: 0\n  hour: 0\n  dom: 1\n  mon: 1\n  dow: '*'\n  year: 2099\n{body}\n"
        );
        std::fs::write(dir.path().join("jobs.yaml"), text).unwrap();
        let config = Config::load(dir.path());
        config
            .job("j")
            .cloned()
            .unwrap_or_else(|| panic!("job did not load: {:?}", config.problems))
    }

    fn launcher() -> SaltLauncher {
        SaltLauncher {
            salt_bin: "salt".into(),
            config_dir: Some(PathBuf::from("/etc/salt-e2e")),
            ping_timeout: Duration::from_secs(7),
            pki_dir: PathBuf::from("/etc/salt-e2e/pki/master"),
        }
    }

    fn request(job: Arc<JobSpec>, env: &[(&str, &str)]) -> StartRequest {
        // As the engine builds it: the job's wrapper, else the configured default.
        let wrapper_path = job
            .wrapper_path
            .clone()
            .or_else(|| Some("/usr/local/bin/sp-wrapper".into()));
        StartRequest {
            job,
            instance: "j_1700000000".into(),
            machines: vec!["minion-a".into(), "minion-b".into()],
            env: env
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            tokens: Default::default(),
            wrapper_path,
        }
    }

    fn out(code: i32, stdout: &str, stderr: &str) -> SaltOutput {
        SaltOutput {
            code: Some(code),
            stdout: stdout.into(),
            stderr: stderr.into(),
        }
    }

    const NO_RESPONSE: &str = "Minion did not return. [No response]\nThe minions may not have all finished running and any remaining minions will return upon completion. To look up the return data for this job later, run the following command:\n\nsalt-run jobs.lookup_jid 20261128033913219581";

    #[test]
    fn ping_repeats_every_option_on_stdin_with_the_target_type() {
        let j =
            job("  targets: 'G@role:web and minion-*'\n  target_type: compound\n  command: 'true'");
        assert_eq!(
            launcher().ping_args(&j).unwrap(),
            [
                "-c",
                "/etc/salt-e2e",
                "--out=json",
                "--out-indent=-1",
                "--timeout",
                "7",
                "-C",
                "--",
                "G@role:web and minion-*",
                "test.ping"
            ]
        );
        let j = job("  targets: 'minion-*'\n  command: 'true'");
        let args = launcher().ping_args(&j).unwrap();
        assert_eq!(
            &args[6..],
            ["--", "minion-*", "test.ping"],
            "glob has no flag"
        );
        let j = job("  targets: [minion-a, minion-c]\n  target_type: list\n  command: 'true'");
        let args = launcher().ping_args(&j).unwrap();
        assert_eq!(&args[6..], ["-L", "--", "minion-a,minion-c", "test.ping"]);
    }

    #[test]
    fn every_target_type_has_its_salt_flag() {
        let flags: Vec<_> = TargetType::ALL
            .iter()
            .map(|(t, _)| target_flag(*t))
            .collect();
        assert_eq!(
            flags,
            [
                None,
                Some("-E"),
                Some("-L"),
                Some("-G"),
                Some("-P"),
                Some("-I"),
                Some("-N"),
                Some("-C"),
                Some("-S"),
                Some("-R")
            ]
        );
    }

    #[test]
    fn start_renders_the_minion_id_and_passes_env_as_one_ascii_line() {
        let j = job("  targets: 'minion-*'\n  command: echo hi");
        let env = [
            ("SP_COMMAND", "echo \"a # b\" 'c'\nprintf '%s\\t' é 😀"),
            ("SP_RUN_TOKEN", "t0k3n"),
        ];
        let args = launcher().start_args(&request(j, &env)).unwrap();
        assert_eq!(
            &args[..10],
            [
                "-c",
                "/etc/salt-e2e",
                "--out=json",
                "--out-indent=-1",
                "--timeout",
                "30",
                "-L",
                "--",
                "minion-a,minion-b",
                "cmd.run_all"
            ]
        );
        assert_eq!(args.len(), 11);
        let kwargs = &args[10];
        assert_eq!(
            kwargs,
            "{\"cmd\": \"/usr/bin/env SP_MACHINE_ID={{ grains['id'] | quote }} \
             SP_SALT_PKI_DIR={{ opts['pki_dir'] | quote }} /usr/local/bin/sp-wrapper\", \"env\": {\"SP_COMMAND\": \"echo \\\"a # b\\\" 'c'\\x0a\
             printf '%s\\\\t' \\xe9 \\U0001f600\", \"SP_RUN_TOKEN\": \"t0k3n\"}, \
             \"python_shell\": false, \"template\": \"jinja\", \"__kwarg__\": true}"
        );
        assert!(kwargs.is_ascii() && !kwargs.contains(['\n', '\r', '\t']));
    }

    #[test]
    fn the_pki_dir_comes_from_the_salt_master_config_under_its_root_dir() {
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path();
        assert_eq!(master_pki_dir(None), PathBuf::from("/etc/salt/pki/master"));
        assert_eq!(
            master_pki_dir(Some(conf)),
            PathBuf::from("/etc/salt/pki/master"),
            "no master file"
        );
        let case = |text: &str| {
            std::fs::write(conf.join("master"), text).unwrap();
            master_pki_dir(Some(conf))
        };
        assert_eq!(
            case("root_dir: /srv/salt\ninterface: 127.0.0.1\n"),
            PathBuf::from("/srv/salt/etc/salt/pki/master")
        );
        assert_eq!(case("pki_dir: /keys # ours\n"), PathBuf::from("/keys"));
        assert_eq!(
            case("root_dir: '/srv/salt'\npki_dir: /srv/salt/pki\n"),
            PathBuf::from("/srv/salt/pki"),
            "already under root_dir"
        );
        assert_eq!(
            case("root_dir: /\n  pki_dir: /nested/not/top/level\n"),
            PathBuf::from("/etc/salt/pki/master")
        );
    }

    #[test]
    fn odd_wrapper_paths_are_quoted_and_line_breaks_refused() {
        let mut j = (*job("  targets: 'minion-*'\n  command: 'true'")).clone();
        j.wrapper_path = Some("/opt/my tools/it's".into());
        let args = launcher()
            .start_args(&request(Arc::new(j.clone()), &[]))
            .unwrap();
        assert!(
            args[10].contains(r"}} '/opt/my tools/it'\\''s'"),
            "{}",
            args[10]
        );
        // A line break inside the path is escaped, so it cannot become a stdin line of its own.
        j.wrapper_path = Some("/bin/x\n-c /tmp".into());
        let args = launcher().start_args(&request(Arc::new(j), &[])).unwrap();
        assert_eq!(args.len(), 11);
        assert!(args[10].contains(r"}} '/bin/x\x0a-c /tmp'"), "{}", args[10]);
        // Targets are lines of their own: a line break there is refused.
        let t = job("  targets: \"minion-a\\n-c\\n/tmp\"\n  command: 'true'");
        let err = launcher().ping_args(&t).unwrap_err();
        assert!(matches!(err, SaltError::LineBreak { .. }), "{err}");
    }

    #[test]
    fn legacy_mode_runs_the_command_with_its_env_cwd_user_and_timeout() {
        let j = job(
            "  targets: 'minion-*'\n  command: |\n    echo one\n    echo two\n  use_wrapper: false\n  \
             cwd: /srv\n  user: nobody\n  timeout: 90\n  env:\n    SECRET: s3\n    SP_JOB_NAME: mine",
        );
        let args = launcher()
            .direct_args(&request(j, &[("SP_RUN_TOKEN", "not for the command")]))
            .unwrap();
        assert_eq!(
            args[10],
            "{\"cmd\": \"echo one\\x0aecho two\\x0a\", \"env\": {\"SECRET\": \"s3\", \
             \"SP_JOB_NAME\": \"j\", \"SP_JOB_INSTANCE_NAME\": \"j_1700000000\"}, \
             \"python_shell\": true, \"cwd\": \"/srv\", \"runas\": \"nobody\", \"timeout\": 90, \
             \"__kwarg__\": true}"
        );
    }

    #[test]
    fn replies_are_read_among_noise_and_indented_json() {
        let stdout = "[WARNING ] Something about grains\n{\"minion-a\": true}\n{\"minion-b\": {\"retcode\": 0}}\nNo minions matched\n{\n    \"minion-c\": \"Minion did not return. [No response]\"\n}\n\"The salt master could not be contacted. Is master running?\"\n{broken\n";
        let reply = parse_reply(stdout);
        assert_eq!(
            reply.returns.keys().collect::<Vec<_>>(),
            ["minion-a", "minion-b", "minion-c"]
        );
        assert_eq!(reply.returns["minion-a"], Value::Bool(true));
        assert_eq!(
            reply.messages,
            ["The salt master could not be contacted. Is master running?"]
        );
        assert_eq!(
            reply.noise,
            [
                "[WARNING ] Something about grains",
                "No minions matched",
                "{broken"
            ]
        );
        assert_eq!(parse_reply(""), Reply::default());
    }

    #[test]
    fn silent_minions_are_down_with_255_and_salts_words() {
        let j = job("  targets: 'minion-*'\n  command: 'true'");
        let stdout = format!(
            "{{\"minion-a\": true}}\n{{\"minion-c\": {}}}\n{{\"minion-b\": false}}\n",
            serde_json::to_string(NO_RESPONSE).unwrap()
        );
        let r = ping_resolution(
            &j,
            &out(
                1,
                &stdout,
                "ERROR: Minions returned with non-zero exit code\n",
            ),
        );
        assert_eq!(r.up, ["minion-a"]);
        assert_eq!(
            r.down,
            [
                (
                    "minion-b".to_owned(),
                    "Target did not respond (Salt: false)\n".to_owned()
                ),
                (
                    "minion-c".to_owned(),
                    "Target did not respond (Salt: Minion did not return. [No response])\n"
                        .to_owned()
                )
            ]
        );
        assert!(r.error.is_none());
    }

    #[test]
    fn an_unreachable_salt_master_is_an_error_with_salts_message() {
        let glob = job("  targets: 'minion-*'\n  command: 'true'");
        let o = out(
            0,
            "\"The salt master could not be contacted. Is master running?\"\n",
            "[ERROR   ] Unable to connect to the salt master publisher at /var/run/salt/master\n",
        );
        let r = ping_resolution(&glob, &o);
        assert!(r.up.is_empty() && r.down.is_empty());
        let error = r.error.unwrap();
        assert!(
            error.starts_with("Salt: The salt master could not be contacted."),
            "{error}"
        );
        assert!(error.contains("Unable to connect"), "{error}");
        // With a list, the machines are known: each gets the 255 with the reason.
        let list = job("  targets: [minion-a, minion-b]\n  target_type: list\n  command: 'true'");
        let r = ping_resolution(&list, &o);
        assert_eq!(r.down.len(), 2);
        assert!(
            r.down[0]
                .1
                .starts_with("Target did not respond - Salt: The salt master")
        );
        // Authentication refused: Salt says so on stderr, exit 2, no JSON.
        let r = ping_resolution(&glob, &out(2, "", "Authentication error occurred.\n"));
        assert_eq!(
            r.error.as_deref(),
            Some("Salt: Authentication error occurred. (salt exit code 2)")
        );
    }

    #[test]
    fn no_matching_minion_is_no_machine_not_an_error() {
        let j = job("  targets: 'zzz*'\n  command: 'true'");
        let r = ping_resolution(
            &j,
            &out(
                2,
                "No minions matched the target. No command was sent, no jid was assigned.\n{}\n",
                "ERROR: No return received\n",
            ),
        );
        assert!(
            r.up.is_empty() && r.down.is_empty() && r.error.is_none(),
            "{r:?}"
        );
    }

    #[test]
    fn a_failed_launch_fails_only_its_machine_with_salts_output() {
        let machines: Vec<String> = ["minion-a", "minion-b", "minion-c", "minion-d"]
            .map(String::from)
            .to_vec();
        let stdout = format!(
            "{{\"minion-a\": {{\"pid\": 10, \"retcode\": 0, \"stdout\": \"Saltpeter Wrapper version 1\", \"stderr\": \"\"}}}}\n\
             {{\"minion-b\": {{\"pid\": 11, \"retcode\": 1, \"stdout\": \"Saltpeter Wrapper version 1\", \"stderr\": \"Error: SP_COMMAND environment variable not set\"}}}}\n\
             {{\"minion-c\": {}}}\n",
            serde_json::to_string(NO_RESPONSE).unwrap()
        );
        let o = start_outcome(
            &machines,
            &out(
                1,
                &stdout,
                "ERROR: Minions returned with non-zero exit code\n",
            ),
        );
        assert_eq!(o[0], ("minion-a".to_owned(), Ok(())));
        assert_eq!(
            o[1].1,
            Err("Exit code 1\nSTDERR: Error: SP_COMMAND environment variable not set\nSTDOUT: Saltpeter Wrapper version 1".to_owned())
        );
        let c = o[2].1.clone().unwrap_err();
        assert!(
            c.starts_with("Salt: Minion did not return. [No response]"),
            "{c}"
        );
        let d = o[3].1.clone().unwrap_err();
        assert!(
            d.starts_with("Salt returned nothing for this minion."),
            "{d}"
        );
        assert!(d.contains("non-zero exit code (salt exit code 1)"), "{d}");
    }

    #[test]
    fn legacy_results_carry_retcode_and_output() {
        let machines: Vec<String> = ["minion-a", "minion-b"].map(String::from).to_vec();
        let stdout = "{\"minion-a\": {\"pid\": 1, \"retcode\": 3, \"stdout\": \"out\", \"stderr\": \"err\"}}\n{\"minion-b\": \"ERROR: User 'nobodyx' is not available\"}\n";
        let o = direct_outcome(&machines, &out(1, stdout, ""));
        assert_eq!(
            o[0].1,
            Ok(DirectResult {
                retcode: 3,
                output: "out\nerr\n".into()
            })
        );
        assert_eq!(
            o[1].1,
            Err("Salt: ERROR: User 'nobodyx' is not available".into())
        );
    }

    /// A stand-in `salt` that records its argv and stdin, then answers like Salt.
    #[cfg(unix)]
    #[tokio::test]
    async fn salt_sees_only_args_stdin_on_its_command_line() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("salt");
        let argv = dir.path().join("argv");
        let stdin = dir.path().join("stdin");
        std::fs::write(
            &bin,
            format!(
                "#!/bin/sh\necho \"$@\" > {}\ncat > {}\necho '[WARNING ] noise'\necho '{{\"minion-a\": {{\"retcode\": 0}}}}'\necho '{{\"minion-b\": {{\"retcode\": 0}}}}'\n",
                argv.display(),
                stdin.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
        let l = SaltLauncher {
            salt_bin: bin.to_string_lossy().into_owned(),
            ..launcher()
        };
        let j = job("  targets: 'minion-*'\n  command: echo top-secret-command");
        let outcome = l
            .start(request(
                j,
                &[
                    ("SP_COMMAND", "echo top-secret-command"),
                    ("SP_RUN_TOKEN", "tok-123"),
                ],
            ))
            .await;
        assert_eq!(
            outcome,
            [
                ("minion-a".to_owned(), Ok(())),
                ("minion-b".to_owned(), Ok(()))
            ]
        );
        assert_eq!(std::fs::read_to_string(&argv).unwrap(), "--args-stdin\n");
        let given = std::fs::read_to_string(&stdin).unwrap();
        assert!(
            given.starts_with("-c\n/etc/salt-e2e\n--out=json\n"),
            "{given}"
        );
        assert!(given.contains("top-secret-command") && given.contains("tok-123"));
        assert_eq!(given.lines().count(), 11);
    }

    #[tokio::test]
    async fn a_missing_salt_binary_fails_every_machine_with_the_reason() {
        let l = SaltLauncher {
            salt_bin: "/nonexistent/salt".into(),
            ..launcher()
        };
        let j = job("  targets: [minion-a]\n  target_type: list\n  command: 'true'");
        let r = l.resolve(j.clone()).await;
        assert!(
            r.error
                .as_deref()
                .unwrap()
                .starts_with("cannot run /nonexistent/salt")
        );
        assert_eq!(r.down.len(), 1);
        let o = l.start(request(j, &[])).await;
        assert!(
            o.iter()
                .all(|(_, r)| r.as_ref().is_err_and(|e| e.contains("cannot run")))
        );
    }
}
