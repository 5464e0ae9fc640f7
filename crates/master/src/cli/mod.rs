//! The operator's command line: `sp-master status`, `run JOB [--follow]`, `kill JOB|INSTANCE
//! [--machine M]`, `logs INSTANCE [--machine M]` and `audit [--limit N]`, talking to a running
//! master's HTTP API.
//!
//! Output is for people by default and JSON with `--json`. Exit codes (docs/DEPLOY.md has the
//! table): 0 when the master did what was asked (for `run --follow`: every machine returned
//! 0); 1 when the master refused (unknown job, nothing running, a token without the role);
//! 2 when the command line is wrong or the master cannot be reached (from `main` and clap);
//! 3 ([`JOB_FAILED`]) when `run --follow` saw the run fail. The job's own codes are printed
//! per machine and never become the CLI's: a job exiting 1 or 2 must not read as "the
//! master refused" or "unreachable" to a script.

pub mod fleet;

use std::collections::BTreeMap;
use std::io::Write;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

pub use saltpeter_http::Client;

/// The certificate the master in `config_dir` presents, for the CLI to trust as its CA when
/// run on the master's host: the operator's `tls_cert`, else the self-signed one in
/// `data_dir`, if the file exists and is readable.
pub fn masters_certificate(config_dir: &std::path::Path) -> Option<std::path::PathBuf> {
    let config = saltpeter_config::Config::load(config_dir);
    let s = &config.settings;
    let path = s.tls_cert.clone().unwrap_or_else(|| {
        s.data_dir
            .join(saltpeter_web::tls::TLS_DIR)
            .join(saltpeter_web::tls::CERT_FILE)
    });
    std::fs::File::open(&path).is_ok().then_some(path)
}

/// How often `run --follow` asks for new output.
const FOLLOW_POLL: Duration = Duration::from_millis(300);

/// The command's exit code.
pub type Code = u8;

/// `run --follow`: the run failed (a machine's result other than 0, a kill, or no machine
/// ran); each machine's code and cause are printed.
pub const JOB_FAILED: Code = 3;

/// Percent-encodes one path segment.
pub fn enc(segment: &str) -> String {
    let mut out = String::with_capacity(segment.len());
    for b in segment.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn get_json(client: &Client, path: &str) -> Result<Value> {
    let r = client.get(path)?;
    if r.status != 200 {
        bail!("{} (HTTP {})", r.error_text(), r.status);
    }
    Ok(r.json())
}

fn print_json(v: &Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string())
    );
}

fn text<'a>(v: &'a Value, key: &str) -> &'a str {
    v[key].as_str().unwrap_or("-")
}

/// A timestamp shortened for a table: `2026-06-01 12:00:05`.
fn short_time(v: &Value) -> String {
    match v.as_str() {
        Some(t) if t.len() >= 19 => t[..19].replacen('T', " ", 1),
        Some(t) => t.to_owned(),
        None => "-".to_owned(),
    }
}

/// `sp-master status`.
pub fn status(client: &Client, json_out: bool) -> Result<Code> {
    let overview = get_json(client, "/api/v1/overview")?;
    if json_out {
        print_json(&overview);
        return Ok(0);
    }
    let mut rows = vec![[
        "JOB".to_owned(),
        "GROUP".to_owned(),
        "SCHEDULE".to_owned(),
        "NEXT RUN".to_owned(),
        "LAST RUN".to_owned(),
        "RESULT".to_owned(),
        "RUNNING".to_owned(),
    ]];
    for job in overview["jobs"].as_array().into_iter().flatten() {
        let running: Vec<&str> = job["running"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        let result = match (running.is_empty(), job["last_success"].as_bool()) {
            (false, _) => "running",
            (true, Some(true)) => "ok",
            (true, Some(false)) => "FAILED",
            (true, None) => "-",
        };
        let mut name = text(job, "name").to_owned();
        if job["maintenance"].as_array().is_some_and(|m| !m.is_empty()) {
            name.push_str(" (maint.)");
        }
        // Among several masters, the one that runs the job.
        if let Some(master) = job["master"].as_str() {
            name.push_str(&format!(" @{master}"));
        }
        rows.push([
            name,
            text(job, "group").to_owned(),
            format!("{} [{}]", text(job, "schedule_text"), text(job, "schedule")),
            short_time(&job["next_run"]),
            short_time(&job["last_run"]),
            result.to_owned(),
            running.join(" "),
        ]);
    }
    let widths: Vec<usize> = (0..7)
        .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
        .collect();
    for row in &rows {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        println!("{}", line.join("  ").trim_end());
    }
    if overview["maintenance"]["global"].as_bool() == Some(true) {
        println!("\nGlobal maintenance is ON: no job will be started.");
    }
    let machines: Vec<&str> = overview["maintenance"]["machines"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    if !machines.is_empty() {
        println!("Machines under maintenance: {}", machines.join(", "));
    }
    Ok(0)
}

/// `sp-master run JOB [--follow]`.
pub fn run(client: &Client, job: &str, follow: bool, json_out: bool) -> Result<Code> {
    let r = client.post(&format!("/api/v1/jobs/{}/run", enc(job)))?;
    if r.status != 202 {
        eprintln!("sp-master: cannot run {job}: {}", r.error_text());
        return Ok(1);
    }
    let instance = r.json()["instance"]
        .as_str()
        .context("the master did not say which instance it started")?
        .to_owned();
    if json_out && !follow {
        print_json(&json!({ "instance": instance }));
        return Ok(0);
    }
    if !follow {
        println!("{instance}");
        return Ok(0);
    }
    if !json_out {
        eprintln!("Started {instance}.");
    }
    follow_run(client, &instance, json_out)
}

/// Streams a run's output until it ends; the exit code reflects the result.
pub fn follow_run(client: &Client, instance: &str, json_out: bool) -> Result<Code> {
    let mut from: BTreeMap<String, u64> = BTreeMap::new();
    let mut partial: BTreeMap<String, String> = BTreeMap::new();
    let stdout = std::io::stdout();
    loop {
        let query: Vec<String> = from
            .iter()
            .map(|(m, p)| format!("{}:{p}", enc(m)))
            .collect();
        let path = format!(
            "/api/v1/runs/{}/output?from={}",
            enc(instance),
            query.join(",")
        );
        let run = get_json(client, &path)?;
        let machines = run["machines"].as_object().cloned().unwrap_or_default();
        let many = machines.len() > 1;
        let mut out = stdout.lock();
        for (name, m) in &machines {
            let o = &m["output"];
            let piece = o["text"].as_str().unwrap_or("");
            let skipped = o["skipped"].as_u64().unwrap_or(0);
            if let Some(next) = o["next"].as_u64() {
                from.insert(name.clone(), next);
            }
            if json_out {
                if !piece.is_empty() || skipped > 0 {
                    let line = json!({ "machine": name, "text": piece, "skipped": skipped });
                    writeln!(out, "{line}")?;
                }
                continue;
            }
            if skipped > 0 {
                writeln!(
                    out,
                    "[... {skipped} characters omitted; see the job log ...]"
                )?;
            }
            if !many {
                write!(out, "{piece}")?;
                continue;
            }
            // Several machines: whole lines, each prefixed with its machine.
            let buf = partial.entry(name.clone()).or_default();
            buf.push_str(piece);
            while let Some(nl) = buf.find('\n') {
                let line: String = buf.drain(..=nl).collect();
                write!(out, "[{name}] {line}")?;
            }
        }
        out.flush()?;
        drop(out);
        if run["ended"].is_string() {
            for (name, rest) in &partial {
                if !rest.is_empty() {
                    println!("[{name}] {rest}");
                }
            }
            return Ok(summarize(&run, json_out));
        }
        std::thread::sleep(FOLLOW_POLL);
    }
}

/// Prints how a finished run went and returns the exit code for it: 0 when it succeeded,
/// [`JOB_FAILED`] otherwise.
fn summarize(run: &Value, json_out: bool) -> Code {
    let machines = run["machines"].as_object().cloned().unwrap_or_default();
    for (name, m) in &machines {
        let retcode = m["retcode"].as_i64();
        if !json_out {
            eprintln!(
                "{name}: exit {} ({}){}",
                retcode.map_or("-".into(), |c| c.to_string()),
                m["cause"].as_str().unwrap_or("-"),
                m["duration"]
                    .as_f64()
                    .map_or(String::new(), |d| format!(", {d:.1} s")),
            );
        }
    }
    let success = run["success"].as_bool() == Some(true);
    if json_out {
        print_json(&json!({
            "instance": run["instance"],
            "success": success,
            "killed": run["killed"],
            "machines": machines.iter().map(|(k, m)| (k.clone(), json!({
                "retcode": m["retcode"], "cause": m["cause"], "duration": m["duration"],
            }))).collect::<serde_json::Map<_, _>>(),
        }));
    }
    if success { 0 } else { JOB_FAILED }
}

/// `sp-master kill JOB|INSTANCE [--machine M]`: a job name kills each of its running
/// instances.
pub fn kill(client: &Client, target: &str, machine: Option<&str>, json_out: bool) -> Result<Code> {
    let overview = get_json(client, "/api/v1/overview")?;
    let job = overview["jobs"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|j| j["name"] == target);
    let instances: Vec<String> = match job {
        Some(j) => {
            let running: Vec<String> = j["running"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect();
            if running.is_empty() {
                eprintln!("sp-master: {target} is not running");
                return Ok(1);
            }
            running
        }
        None => vec![target.to_owned()],
    };
    let mut code = 0;
    let mut killed = Vec::new();
    for instance in &instances {
        let path = match machine {
            Some(m) => format!("/api/v1/runs/{}/machines/{}/kill", enc(instance), enc(m)),
            None => format!("/api/v1/runs/{}/kill", enc(instance)),
        };
        let r = client.post(&path)?;
        if r.status == 202 {
            killed.push(instance.clone());
            if !json_out {
                match machine {
                    Some(m) => println!("Killing {m} of {instance}."),
                    None => println!("Killing {instance}."),
                }
            }
        } else {
            eprintln!("sp-master: cannot kill {instance}: {}", r.error_text());
            code = 1;
        }
    }
    if json_out {
        print_json(&json!({ "killing": killed, "machine": machine }));
    }
    Ok(code)
}

/// `sp-master logs INSTANCE [--machine M]`: the output the master holds for a run (the head
/// and tail of long outputs; the job log has everything).
pub fn logs(
    client: &Client,
    instance: &str,
    machine: Option<&str>,
    json_out: bool,
) -> Result<Code> {
    let r = client.get(&format!("/api/v1/runs/{}", enc(instance)))?;
    if r.status != 200 {
        eprintln!("sp-master: {}", r.error_text());
        return Ok(1);
    }
    let mut run = r.json();
    if let Some(m) = machine {
        let Some(one) = run["machines"].get(m).cloned() else {
            eprintln!("sp-master: {m} is not part of {instance}");
            return Ok(1);
        };
        run["machines"] = json!({ m: one });
    }
    if json_out {
        print_json(&run);
        return Ok(0);
    }
    let machines = run["machines"].as_object().cloned().unwrap_or_default();
    for (name, m) in &machines {
        println!(
            "== {name}: {} exit {} ({}) ==",
            text(m, "status"),
            m["retcode"].as_i64().map_or("-".into(), |c| c.to_string()),
            m["cause"].as_str().unwrap_or("-"),
        );
        let output = m["output"].as_str().unwrap_or("");
        print!("{output}");
        if !output.is_empty() && !output.ends_with('\n') {
            println!();
        }
    }
    Ok(0)
}

/// `sp-master audit [--limit N]`: the audit trail, newest first (needs an admin token when
/// the master has tokens).
pub fn audit(client: &Client, limit: Option<usize>, json_out: bool) -> Result<Code> {
    let path = match limit {
        Some(n) => format!("/api/v1/audit?limit={n}"),
        None => "/api/v1/audit".to_owned(),
    };
    let r = client.get(&path)?;
    if r.status != 200 {
        eprintln!("sp-master: cannot read the audit trail: {}", r.error_text());
        return Ok(1);
    }
    let body = r.json();
    if json_out {
        print_json(&body);
        return Ok(0);
    }
    let mut rows = vec![[
        "TIME".to_owned(),
        "ACTOR".to_owned(),
        "SOURCE".to_owned(),
        "ACTION".to_owned(),
        "TARGET".to_owned(),
        "RESULT".to_owned(),
    ]];
    for e in body["entries"].as_array().into_iter().flatten() {
        let target: Vec<&str> = ["job", "instance", "machine"]
            .iter()
            .filter_map(|k| e[*k].as_str())
            .collect();
        let result = match (e["ok"].as_bool(), e["detail"].as_str()) {
            (Some(true), Some(d)) => d.to_owned(),
            (Some(true), None) => "ok".to_owned(),
            (_, Some(d)) => format!("refused: {d}"),
            (_, None) => "refused".to_owned(),
        };
        rows.push([
            short_time(&e["at"]),
            text(e, "actor").to_owned(),
            text(e, "source").to_owned(),
            text(e, "action").to_owned(),
            if target.is_empty() {
                "-".to_owned()
            } else {
                target.join(" ")
            },
            result,
        ]);
    }
    let widths: Vec<usize> = (0..6)
        .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
        .collect();
    for row in &rows {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        println!("{}", line.join("  ").trim_end());
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_segments_are_percent_encoded() {
        assert_eq!(enc("backup_17"), "backup_17");
        assert_eq!(enc("a b/ü"), "a%20b%2F%C3%BC");
    }

    #[test]
    fn a_failed_run_exits_3_whatever_the_jobs_own_codes() {
        let run = json!({"success": false, "machines": {
            "a": {"retcode": 0}, "b": {"retcode": 143}, "c": {"retcode": 1}}});
        assert_eq!(summarize(&run, true), JOB_FAILED);
        // A job exiting 1 or 2 must not look like a refusal or an unreachable master.
        for code in [1, 2, 255] {
            let run = json!({"success": false, "machines": {"a": {"retcode": code}}});
            assert_eq!(summarize(&run, true), JOB_FAILED);
        }
        let run = json!({"success": true, "machines": {"a": {"retcode": 0}}});
        assert_eq!(summarize(&run, true), 0);
        let run = json!({"success": false, "machines": {}});
        assert_eq!(summarize(&run, true), JOB_FAILED);
    }
}
