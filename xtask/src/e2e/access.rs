//! Access scenarios of the local group, against a master of their own that has tokens (made
//! with `sp-master token new`, so the config holds only their hashes): reads without a token
//! are refused, a rebinding Host is refused, and a run and a kill leave audit entries that
//! name their actor and source, read back with `sp-master audit --json`.

use std::path::Path;
use std::process::{Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;

use super::http::{self, Response};
use super::master::{Master, binary, target_dir};

/// The access master and a token of each role.
pub struct AccessMaster {
    pub master: Master,
    viewer: String,
    operator: String,
    admin: String,
}

/// `sp-master token new --json`: the token and its `api_tokens` entry.
pub(super) fn new_token(name: &str, role: &str) -> Result<(String, String)> {
    let out = Command::new(binary("sp-master"))
        .args(["token", "new", "--name", name, "--role", role, "--json"])
        .stdin(Stdio::null())
        .output()
        .context("running sp-master token new")?;
    ensure!(
        out.status.success(),
        "sp-master token new: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).context("token new --json output")?;
    let token = v["token"].as_str().context("no token")?.to_owned();
    let hash = v["sha256"].as_str().context("no sha256")?;
    ensure!(hash.len() == 64, "sha256 {hash:?} is not 64 hex digits");
    Ok((
        token,
        format!("    - {{name: {name}, role: {role}, sha256: {hash}}}\n"),
    ))
}

pub fn start() -> Result<AccessMaster> {
    let dir = target_dir()
        .join("e2e")
        .join(format!("access-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let (viewer, v_entry) = new_token("e2e-viewer", "viewer")?;
    let (operator, o_entry) = new_token("e2e-operator", "operator")?;
    let (admin, a_entry) = new_token("e2e-admin", "admin")?;
    let settings = format!(
        "saltpeter_config:\n  launcher: local\n  logdir: '@DIR@/log'\n  data_dir: '@DIR@/data'\n  \
         default_wrapper_logdir: '@DIR@/wlog'\n  api_ws_bind_addr: 127.0.0.1\n  api_ws_port: 0\n  \
         machines_ws_bind_addr: 127.0.0.1\n  machines_ws_port: 0\n  api_tokens:\n{v_entry}{o_entry}{a_entry}"
    );
    let job = "acc_sleep:\n  sec: 0\n  min: 0\n  hour: 0\n  dom: 1\n  mon: 1\n  dow: '*'\n  \
               year: 2099\n  target_type: list\n  targets: [e2e-acc]\n  command: sleep 120\n"
        .to_owned();
    let master = Master::start(&dir, &[("settings.yaml", settings), ("jobs.yaml", job)])?;
    Ok(AccessMaster {
        master,
        viewer,
        operator,
        admin,
    })
}

fn call(
    m: &AccessMaster,
    method: &str,
    path: &str,
    token: Option<&str>,
    host: Option<&str>,
) -> Result<(Response, String)> {
    let mut headers = Vec::new();
    if let Some(t) = token {
        headers.push(format!("Authorization: Bearer {t}"));
    }
    if let Some(h) = host {
        headers.push(format!("Host: {h}"));
    }
    http::exchange(m.master.api, method, path, None, &headers)
}

/// Reads without a token get 401 on every read path; a viewer reads, and may not act.
pub fn reads_refused(m: &AccessMaster) -> Result<String> {
    let paths = [
        "/api/v1/jobs",
        "/api/v1/overview",
        "/api/v1/timeline",
        "/config",
        "/running",
        "/timeline",
        "/metrics",
        "/version",
    ];
    for path in paths {
        let (r, _) = call(m, "GET", path, None, None)?;
        ensure!(
            r.status == 401 && r.body["error"].is_string(),
            "GET {path} without a token: {} {}",
            r.status,
            r.body
        );
        let (r, _) = call(m, "GET", path, Some(&m.viewer), None)?;
        ensure!(
            r.status == 200,
            "GET {path} as viewer: {} {}",
            r.status,
            r.body
        );
    }
    let (r, _) = call(
        m,
        "POST",
        "/api/v1/jobs/acc_sleep/run",
        Some(&m.viewer),
        None,
    )?;
    ensure!(r.status == 403, "a viewer's run: {} {}", r.status, r.body);
    let (r, _) = call(m, "GET", "/api/v1/audit", Some(&m.operator), None)?;
    ensure!(r.status == 403, "an operator's audit read: {}", r.status);
    let health = http::get_text(m.master.api, "/healthz")?;
    ensure!(health == "ok", "/healthz said {health:?}");
    Ok(format!(
        "{} read paths answer 401 without a token and 200 to a viewer; a viewer's run is 403, \
         an operator's audit read 403, /healthz open",
        paths.len()
    ))
}

/// A page whose name was rebound to this host sends its own name as Host: refused.
pub fn rebinding_refused(m: &AccessMaster) -> Result<String> {
    let port = m.master.api.port();
    let mut seen = Vec::new();
    for host in [
        format!("rebind.attacker.example:{port}"),
        "attacker.example".to_owned(),
    ] {
        for (path, token) in [("/", None), ("/api/v1/jobs", Some(m.viewer.as_str()))] {
            let (r, head) = call(m, "GET", path, token, Some(&host))?;
            ensure!(
                r.status == 421,
                "GET {path} for Host {host}: {} {}",
                r.status,
                r.body
            );
            let head = head.to_ascii_lowercase();
            ensure!(
                head.contains("content-security-policy:")
                    && head.contains("frame-ancestors 'none'"),
                "no CSP on the refusal: {head}"
            );
            seen.push(r.status);
        }
    }
    let (r, head) = call(m, "GET", "/", None, Some(&format!("localhost:{port}")))?;
    ensure!(r.status == 200, "the page for localhost: {}", r.status);
    let head = head.to_ascii_lowercase();
    for h in [
        "x-content-type-options: nosniff",
        "referrer-policy: no-referrer",
        "frame-ancestors 'none'",
    ] {
        ensure!(head.contains(h), "the page lacks {h:?}: {head}");
    }
    Ok(format!(
        "{} requests for rebound names answered 421 (with CSP); localhost gets the page with \
         CSP, nosniff and no-referrer",
        seen.len()
    ))
}

/// A run and a kill by the operator, then `sp-master audit --json` as admin.
pub fn audit_after_run_and_kill(m: &AccessMaster) -> Result<String> {
    let (r, _) = call(
        m,
        "POST",
        "/api/v1/jobs/acc_sleep/run",
        Some(&m.operator),
        None,
    )?;
    ensure!(r.status == 202, "run: {} {}", r.status, r.body);
    let instance = r.body["instance"]
        .as_str()
        .context("no instance")?
        .to_owned();
    // Let the wrapper start, so the kill reaches a running command.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (r, _) = call(
            m,
            "GET",
            &format!("/api/v1/runs/{instance}"),
            Some(&m.viewer),
            None,
        )?;
        if r.body["machines"]["e2e-acc"]["status"] == "running" {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "the run did not start: {}",
            r.body
        );
        sleep(Duration::from_millis(100));
    }
    let kill = Command::new(binary("sp-master"))
        .args(["kill", &instance, "--api"])
        .arg(format!("http://{}", m.master.api))
        .env("SP_API_TOKEN", &m.operator)
        .output()?;
    ensure!(
        kill.status.success(),
        "sp-master kill: {}",
        String::from_utf8_lossy(&kill.stderr)
    );
    let audit = |token: &str| {
        Command::new(binary("sp-master"))
            .args(["audit", "--json", "--api"])
            .arg(format!("http://{}", m.master.api))
            .args(["--token", token])
            .output()
    };
    let refused = audit(&m.viewer)?;
    ensure!(
        refused.status.code() == Some(1),
        "a viewer read the audit trail"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let (run, kill) = loop {
        let out = audit(&m.admin)?;
        ensure!(
            out.status.success(),
            "sp-master audit: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: Value = serde_json::from_slice(&out.stdout).context("audit --json")?;
        let entries = v["entries"].as_array().cloned().unwrap_or_default();
        let find = |action: &str| {
            entries
                .iter()
                .find(|e| e["action"] == action && e["instance"] == instance.as_str())
                .cloned()
        };
        if let (Some(run), Some(kill)) = (find("run"), find("kill")) {
            break (run, kill);
        }
        if Instant::now() > deadline {
            bail!("no run and kill entries for {instance} in {v}");
        }
        sleep(Duration::from_millis(100));
    };
    for e in [&run, &kill] {
        ensure!(
            e["actor"] == "e2e-operator" && e["source"] == "127.0.0.1" && e["ok"] == true,
            "entry {e}"
        );
    }
    let log = read_log(&m.master.dir.join("log").join("acc_sleep.log"), "Kill of")?;
    ensure!(
        log.contains("###### Started by e2e-operator from 127.0.0.1 at "),
        "the job log does not name the actor: {log}"
    );
    Ok(format!(
        "audit entries {} (run) and {} (kill) by e2e-operator from 127.0.0.1; the job log names \
         who started and who killed {instance}; a viewer's sp-master audit exits 1",
        run["id"], kill["id"]
    ))
}

fn read_log(path: &Path, until: &str) -> Result<String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let log = std::fs::read_to_string(path).unwrap_or_default();
        if log.contains(until) || Instant::now() > deadline {
            return Ok(log);
        }
        sleep(Duration::from_millis(100));
    }
}
