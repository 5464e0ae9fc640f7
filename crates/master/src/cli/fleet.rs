//! `sp-master fleet`: what every minion Salt knows has of saltpeter, asked through the same
//! `salt` command line the launcher uses (every argument on stdin, JSON per minion).
//!
//! Three Salt calls, run at once on every minion (`*`, or `--target`):
//! - `grains.item cpuarch osarch`: the minion's architecture, and whether it answers at all;
//! - `cmd.run_all` of `<wrapper> --version`, rendered on the minion as the launcher renders a
//!   launch (`/usr/bin/env SP_MACHINE_ID={{ grains['id'] }} <wrapper>`), so it runs exactly the
//!   program a job would run;
//! - `network.connect <server host> <machines port>`: whether the minion can open a TCP
//!   connection to this master's machines endpoint, under the name the wrappers are given.
//!
//! Each minion is then `current`, or has problems: `not answering` (Salt got no reply),
//! `missing` (no wrapper ran), `outdated` (its version is not this master's) or `cut off` (the
//! machines port is not reachable from it). The command exits 0 when every minion is current
//! and 1 otherwise, so it can run from monitoring.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use super::Code;
use saltpeter_config::Config;
use saltpeter_config::settings::ORIGINAL_WRAPPER_PATH;
use saltpeter_engine::launch::salt::{Kw, kwarg_map, parse_reply, shell_word};

/// This master's version and build, as `sp-master --version` prints them.
#[derive(Debug, Clone)]
pub struct MasterVersion {
    pub version: String,
    pub commit: String,
}

/// What the command is asked.
#[derive(Debug, Clone)]
pub struct FleetOptions {
    /// Salt's target (a glob): which minions to look at.
    pub target: String,
    /// Salt's `-t` for each call.
    pub timeout: Duration,
    pub json: bool,
}

/// How much longer than its own `-t` a `salt` process may take before it is stopped.
const PROCESS_GRACE: Duration = Duration::from_secs(60);

/// What `network.connect` may take per minion.
const CONNECT_TIMEOUT_SECS: u64 = 5;

/// One minion, as found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Minion {
    pub id: String,
    /// Salt's answer to `grains.item` was a dict.
    pub answered: bool,
    /// `x86_64`, `aarch64`, or what the minion said; `None` when it did not answer.
    pub arch: Option<String>,
    /// The installed wrapper's version and build (`None`: none ran).
    pub wrapper: Option<WrapperVersion>,
    /// Why no wrapper version was read (Salt's or the shell's words).
    pub wrapper_error: Option<String>,
    /// `Some(true)` when the minion connected to the machines port.
    pub reachable: Option<bool>,
    /// `network.connect`'s comment.
    pub reach_comment: String,
}

/// A wrapper's `--version`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WrapperVersion {
    pub version: String,
    /// The commit in parentheses, absent from wrappers before this release and the original.
    pub commit: Option<String>,
}

impl Minion {
    /// The minion's problems, worst first; empty when it is current.
    pub fn problems(&self, master: &MasterVersion) -> Vec<&'static str> {
        if !self.answered {
            return vec!["not answering"];
        }
        let mut problems = Vec::new();
        match &self.wrapper {
            None => problems.push("missing"),
            Some(w) if w.version != master.version => problems.push("outdated"),
            Some(_) => {}
        }
        if self.reachable != Some(true) {
            problems.push("cut off");
        }
        problems
    }
}

/// Reads the first line of `--version`: `Saltpeter Wrapper version 0.1.0 (abc1234)` (this
/// wrapper and the original, without the commit), or `sp-wrapper 0.1.0` (early builds).
pub fn parse_wrapper_version(stdout: &str) -> Option<WrapperVersion> {
    let line = stdout.lines().next()?.trim();
    let rest = line
        .strip_prefix("Saltpeter Wrapper version ")
        .or_else(|| line.strip_prefix("sp-wrapper "))?;
    let mut words = rest.split_whitespace();
    let version = words.next()?.to_owned();
    let commit = words
        .next()
        .and_then(|c| c.strip_prefix('('))
        .and_then(|c| c.strip_suffix(')'))
        .map(str::to_owned);
    Some(WrapperVersion { version, commit })
}

/// The release's name for a CPU: `cpuarch` as the kernel says it, else `osarch` mapped from
/// the package manager's name.
fn arch_of(grains: &Value) -> Option<String> {
    let pick = |key: &str| grains[key].as_str().filter(|s| !s.is_empty());
    let raw = pick("cpuarch").or_else(|| pick("osarch"))?;
    Some(
        match raw {
            "amd64" => "x86_64",
            "arm64" => "aarch64",
            other => other,
        }
        .to_owned(),
    )
}

fn first_line(v: &Value) -> String {
    match v {
        Value::String(s) => s.lines().next().unwrap_or_default().trim().to_owned(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// Puts the three replies together, one [`Minion`] per id any of them names.
pub fn assemble(grains: &Value, versions: &Value, connects: &Value) -> Vec<Minion> {
    let mut ids: Vec<String> = Vec::new();
    for reply in [grains, versions, connects] {
        if let Some(map) = reply.as_object() {
            ids.extend(map.keys().cloned());
        }
    }
    ids.sort();
    ids.dedup();
    ids.into_iter()
        .map(|id| {
            let g = &grains[&id];
            let answered = g.is_object();
            let v = &versions[&id];
            let (wrapper, wrapper_error) = if v.is_object() {
                let stdout = v["stdout"].as_str().unwrap_or_default();
                match parse_wrapper_version(stdout) {
                    Some(w) => (Some(w), None),
                    None => {
                        let stderr = first_line(&v["stderr"]);
                        let why = if stderr.is_empty() {
                            format!("exit code {}", v["retcode"])
                        } else {
                            stderr
                        };
                        (None, Some(why))
                    }
                }
            } else {
                (None, Some(first_line(v)))
            };
            let c = &connects[&id];
            let reachable = c["result"].as_bool();
            let reach_comment = if c.is_object() {
                first_line(&c["comment"])
            } else {
                first_line(c)
            };
            Minion {
                answered,
                arch: answered.then(|| arch_of(g)).flatten(),
                wrapper,
                wrapper_error,
                reachable,
                reach_comment,
                id,
            }
        })
        .collect()
}

/// `salt --args-stdin` with `args` on stdin; the per-minion replies, merged.
fn salt(bin: &str, args: &[String], limit: Duration) -> Result<Value> {
    let mut child = Command::new(bin)
        .arg("--args-stdin")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run {bin}"))?;
    let mut input = args.join("\n");
    input.push('\n');
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(input.as_bytes())?;
    }
    let mut stdout = child.stdout.take().context("salt's stdout")?;
    let mut stderr = child.stderr.take().context("salt's stderr")?;
    let reader = std::thread::spawn(move || {
        let mut out = String::new();
        let _ = stdout.read_to_string(&mut out);
        out
    });
    let err_reader = std::thread::spawn(move || {
        let mut err = String::new();
        let _ = stderr.read_to_string(&mut err);
        err
    });
    let started = Instant::now();
    loop {
        if child.try_wait()?.is_some() {
            break;
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{bin} gave no answer within {limit:?}; stopped it");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = reader.join().unwrap_or_default();
    let err = err_reader.join().unwrap_or_default();
    let reply = parse_reply(&out);
    if reply.returns.is_empty() {
        let said: Vec<String> = reply
            .messages
            .into_iter()
            .chain(reply.noise)
            .chain(std::iter::once(err.trim().to_owned()))
            .filter(|s| !s.is_empty())
            .collect();
        let said = said.join(" ");
        if said.contains("No minions matched") {
            return Ok(json!({}));
        }
        bail!("salt answered nothing: {said}");
    }
    Ok(Value::Object(reply.returns.into_iter().collect()))
}

/// The stdin lines of one call: the launcher's options, the target, the function, its arguments.
fn call_args(
    config_dir: Option<&Path>,
    target: &str,
    timeout: Duration,
    function: &str,
    args: &[String],
) -> Vec<String> {
    let mut all = Vec::new();
    if let Some(dir) = config_dir {
        all.push("-c".to_owned());
        all.push(dir.to_string_lossy().into_owned());
    }
    all.extend(
        [
            "--out=json",
            "--out-indent=-1",
            "--timeout",
            &timeout.as_secs().max(1).to_string(),
            "--",
            target,
            function,
        ]
        .map(str::to_owned),
    );
    all.extend(args.iter().cloned());
    all
}

/// `sp-master fleet`.
pub fn fleet(config_dir: &Path, master: &MasterVersion, opts: &FleetOptions) -> Result<Code> {
    let config = Config::load(config_dir);
    if config.has_errors() {
        bail!(
            "{} has errors; see sp-master check -c {}",
            config_dir.display(),
            config_dir.display()
        );
    }
    let s = &config.settings;
    let wrapper = s
        .default_wrapper_path
        .clone()
        .unwrap_or_else(|| ORIGINAL_WRAPPER_PATH.to_owned());
    let host = s.default_saltpeter_server_host.clone();
    let port = s.machines_port;
    if opts.target.contains(['\n', '\r']) || wrapper.contains(['\n', '\r']) {
        bail!("the target and the wrapper path must be one line");
    }
    let salt_dir = s.salt_config_dir.as_deref();
    let limit = opts.timeout.saturating_add(PROCESS_GRACE);
    let version_cmd = format!(
        "/usr/bin/env SP_MACHINE_ID={{{{ grains['id'] | quote }}}} {} --version",
        shell_word(&wrapper)
    );
    let grains_args = call_args(
        salt_dir,
        &opts.target,
        opts.timeout,
        "grains.item",
        &["cpuarch".to_owned(), "osarch".to_owned()],
    );
    let version_args = call_args(
        salt_dir,
        &opts.target,
        opts.timeout,
        "cmd.run_all",
        &[kwarg_map(&[
            ("cmd", Kw::Str(&version_cmd)),
            ("python_shell", Kw::Bool(false)),
            ("template", Kw::Str("jinja")),
        ])],
    );
    let connect_args = call_args(
        salt_dir,
        &opts.target,
        opts.timeout,
        "network.connect",
        &[kwarg_map(&[
            ("host", Kw::Str(&host)),
            ("port", Kw::Int(u64::from(port))),
            ("timeout", Kw::Int(CONNECT_TIMEOUT_SECS)),
        ])],
    );
    let bin = s.salt_bin.as_str();
    let (grains, versions, connects) = std::thread::scope(|scope| {
        let g = scope.spawn(|| salt(bin, &grains_args, limit));
        let v = scope.spawn(|| salt(bin, &version_args, limit));
        let c = scope.spawn(|| salt(bin, &connect_args, limit));
        let join = |h: std::thread::ScopedJoinHandle<'_, Result<Value>>| {
            h.join()
                .unwrap_or_else(|_| Err(anyhow::anyhow!("a salt call panicked")))
        };
        (join(g), join(v), join(c))
    });
    let grains = grains.context("grains.item through Salt")?;
    let versions = versions.context("cmd.run_all <wrapper> --version through Salt")?;
    let connects = connects.context("network.connect through Salt")?;
    let minions = assemble(&grains, &versions, &connects);
    let report = Report {
        master,
        wrapper: &wrapper,
        host: &host,
        port,
        minions: &minions,
    };
    if opts.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report.json()).unwrap_or_default()
        );
    } else {
        print!("{}", report.text());
    }
    let all_current = minions.iter().all(|m| m.problems(master).is_empty());
    Ok(if all_current { 0 } else { 1 })
}

/// The findings with what they were measured against.
#[derive(Debug)]
pub struct Report<'a> {
    pub master: &'a MasterVersion,
    pub wrapper: &'a str,
    pub host: &'a str,
    pub port: u16,
    pub minions: &'a [Minion],
}

impl Report<'_> {
    /// Minion ids with `problem`.
    fn with(&self, problem: &str) -> Vec<&str> {
        self.minions
            .iter()
            .filter(|m| m.problems(self.master).contains(&problem))
            .map(|m| m.id.as_str())
            .collect()
    }

    pub fn json(&self) -> Value {
        let minions: BTreeMap<&str, Value> = self
            .minions
            .iter()
            .map(|m| {
                (
                    m.id.as_str(),
                    json!({
                        "answered": m.answered,
                        "arch": m.arch,
                        "wrapper_version": m.wrapper.as_ref().map(|w| &w.version),
                        "wrapper_commit": m.wrapper.as_ref().and_then(|w| w.commit.as_ref()),
                        "wrapper_error": m.wrapper_error,
                        "reachable": m.reachable,
                        "reach_comment": m.reach_comment,
                        "problems": m.problems(self.master),
                    }),
                )
            })
            .collect();
        let current: Vec<&str> = self
            .minions
            .iter()
            .filter(|m| m.problems(self.master).is_empty())
            .map(|m| m.id.as_str())
            .collect();
        json!({
            "master": {
                "version": self.master.version,
                "commit": self.master.commit,
                "wrapper_path": self.wrapper,
                "machines_endpoint": format!("{}:{}", self.host, self.port),
            },
            "minions": minions,
            "summary": {
                "total": self.minions.len(),
                "current": current,
                "outdated": self.with("outdated"),
                "missing": self.with("missing"),
                "cut_off": self.with("cut off"),
                "not_answering": self.with("not answering"),
            },
        })
    }

    pub fn text(&self) -> String {
        use std::fmt::Write as _;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "sp-master {} ({}); wrapper {}; machines endpoint {}:{}\n",
            self.master.version, self.master.commit, self.wrapper, self.host, self.port
        );
        let width = self
            .minions
            .iter()
            .map(|m| m.id.len())
            .max()
            .unwrap_or(6)
            .max(6);
        let _ = writeln!(
            out,
            "{:<width$}  {:<8}  {:<24}  {:<11}  STATUS",
            "MINION", "ARCH", "WRAPPER", "MASTER PORT"
        );
        for m in self.minions {
            let wrapper = match (&m.wrapper, &m.wrapper_error) {
                (Some(w), _) => match &w.commit {
                    Some(c) => format!("{} ({c})", w.version),
                    None => w.version.clone(),
                },
                (None, _) if !m.answered => "-".to_owned(),
                (None, _) => "missing".to_owned(),
            };
            let reach = match m.reachable {
                Some(true) => "reachable",
                Some(false) => "cut off",
                None => "-",
            };
            let problems = m.problems(self.master);
            let status = if problems.is_empty() {
                "current".to_owned()
            } else {
                problems.join(", ")
            };
            let _ = writeln!(
                out,
                "{:<width$}  {:<8}  {:<24}  {:<11}  {status}",
                m.id,
                m.arch.as_deref().unwrap_or("-"),
                wrapper,
                reach
            );
        }
        let current = self
            .minions
            .iter()
            .filter(|m| m.problems(self.master).is_empty())
            .count();
        let _ = writeln!(out, "\n{} minion(s): {current} current", self.minions.len());
        for (label, problem) in [
            ("outdated", "outdated"),
            ("missing the wrapper", "missing"),
            ("cut off from the machines port", "cut off"),
            ("not answering Salt", "not answering"),
        ] {
            let ids = self.with(problem);
            if !ids.is_empty() {
                let _ = writeln!(out, "{label}: {}", ids.join(", "));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn master() -> MasterVersion {
        MasterVersion {
            version: "0.2.0".into(),
            commit: "abc1234".into(),
        }
    }

    #[test]
    fn wrapper_versions_of_every_generation_parse() {
        let v = parse_wrapper_version("Saltpeter Wrapper version 0.2.0 (abc1234)\n").unwrap();
        assert_eq!(v.version, "0.2.0");
        assert_eq!(v.commit.as_deref(), Some("abc1234"));
        let old = parse_wrapper_version("sp-wrapper 0.1.0").unwrap();
        assert_eq!((old.version.as_str(), old.commit), ("0.1.0", None));
        // The Python wrapper prints its first line, then fails on the missing SP_* variables.
        let py = parse_wrapper_version("Saltpeter Wrapper version 0.9.30\nError").unwrap();
        assert_eq!(py.version, "0.9.30");
        assert!(parse_wrapper_version("sh: 1: /usr/local/bin/sp-wrapper: not found").is_none());
        assert!(parse_wrapper_version("").is_none());
    }

    #[test]
    fn minions_are_current_missing_outdated_cut_off_or_silent() {
        let grains = json!({
            "a": {"cpuarch": "x86_64", "osarch": "amd64"},
            "b": {"cpuarch": "aarch64", "osarch": "arm64"},
            "c": {"cpuarch": "", "osarch": "amd64"},
            "d": "Minion did not return. [No response]\nThe minions may not have all finished.",
            "e": {"cpuarch": "x86_64"},
        });
        let versions = json!({
            "a": {"retcode": 0, "stdout": "Saltpeter Wrapper version 0.2.0 (abc1234)", "stderr": ""},
            "b": {"retcode": 0, "stdout": "sp-wrapper 0.1.0", "stderr": ""},
            "c": {"retcode": 127, "stdout": "", "stderr": "/usr/bin/env: '/usr/local/bin/sp-wrapper': No such file or directory"},
            "d": "Minion did not return. [No response]",
            "e": {"retcode": 0, "stdout": "Saltpeter Wrapper version 0.2.0 (fff0000)", "stderr": ""},
        });
        let connects = json!({
            "a": {"result": true, "comment": "Successfully connected to cron (10.0.0.1) on tcp port 8889"},
            "b": {"result": true, "comment": "ok"},
            "c": {"result": true, "comment": "ok"},
            "d": "Minion did not return. [No response]",
            "e": {"result": false, "comment": "Unable to connect to cron (10.0.0.1) on tcp port 8889"},
        });
        let minions = assemble(&grains, &versions, &connects);
        let m = master();
        let problems: Vec<(&str, Vec<&str>)> = minions
            .iter()
            .map(|x| (x.id.as_str(), x.problems(&m)))
            .collect();
        assert_eq!(
            problems,
            vec![
                ("a", vec![]),
                ("b", vec!["outdated"]),
                ("c", vec!["missing"]),
                ("d", vec!["not answering"]),
                ("e", vec!["cut off"]),
            ]
        );
        assert_eq!(minions[1].arch.as_deref(), Some("aarch64"));
        assert_eq!(minions[2].arch.as_deref(), Some("x86_64"));
        assert!(
            minions[2]
                .wrapper_error
                .as_deref()
                .unwrap()
                .contains("No such file")
        );
        let report = Report {
            master: &m,
            wrapper: "/usr/local/bin/sp-wrapper",
            host: "cron",
            port: 8889,
            minions: &minions,
        };
        let j = report.json();
        assert_eq!(j["summary"]["current"], json!(["a"]));
        assert_eq!(j["summary"]["outdated"], json!(["b"]));
        assert_eq!(j["summary"]["missing"], json!(["c"]));
        assert_eq!(j["summary"]["cut_off"], json!(["e"]));
        assert_eq!(j["summary"]["not_answering"], json!(["d"]));
        assert_eq!(j["minions"]["e"]["wrapper_commit"], "fff0000");
        let text = report.text();
        assert!(text.contains("missing the wrapper: c"), "{text}");
        assert!(text.contains("5 minion(s): 1 current"), "{text}");
    }

    #[test]
    fn every_call_repeats_the_options_and_ends_the_target_list() {
        let args = call_args(
            Some(Path::new("/etc/salt")),
            "web*",
            Duration::from_secs(10),
            "grains.item",
            &["cpuarch".into()],
        );
        assert_eq!(
            args,
            [
                "-c",
                "/etc/salt",
                "--out=json",
                "--out-indent=-1",
                "--timeout",
                "10",
                "--",
                "web*",
                "grains.item",
                "cpuarch"
            ]
        );
    }
}
