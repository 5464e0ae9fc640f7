//! The operator's surface end to end: the dashboard in a real headless Chromium driven through
//! chromedriver's WebDriver API (open the page, give it the API token it asks for, run a job,
//! watch its output, kill it, see 143, save a screenshot under `target/e2e/`), and
//! `sp-master run --follow` against a real master. The master has an operator token (made
//! with `sp-master token new`), so the page works under the Content-Security-Policy and with
//! authenticated reads, as in production.
//!
//! Chromium and chromedriver are Debian's packages (`chromium`, `chromium-driver`); when they
//! are missing and we are root they are installed with apt-get first.

use std::fs;
use std::net::{SocketAddr, TcpListener};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use base64::Engine as _;
use serde_json::{Value, json};

use super::master::{Master, binary, target_dir};

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
/// The W3C WebDriver element key.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

fn job(name: &str, body: &str) -> String {
    format!(
        "{name}:\n  sec: 0\n  min: 0\n  hour: 0\n  dom: 1\n  mon: 1\n  dow: '*'\n  year: 2099\n  target_type: list\n{body}\n"
    )
}

fn settings(token_entry: &str) -> String {
    format!(
        "saltpeter_config:\n  launcher: local\n  logdir: '@DIR@/log'\n  data_dir: '@DIR@/data'\n  \
         default_wrapper_logdir: '@DIR@/wlog'\n  api_ws_bind_addr: 127.0.0.1\n  api_ws_port: 0\n  \
         machines_ws_bind_addr: 127.0.0.1\n  machines_ws_port: 0\n  api_tokens:\n{token_entry}"
    )
}

/// Starts a master with the jobs these scenarios use; returns it with its operator token.
pub fn start_master() -> Result<(Master, String)> {
    let dir = target_dir()
        .join("e2e")
        .join(format!("operator-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir)?;
    let jobs = [
        job(
            "dashboard_job",
            "  targets: [e2e-web]\n  command: 'for i in $(seq 1 600); do for p in 25 50 75 100; \
             do printf \"step $i: %3d%%\\r\" $p; sleep 0.05; done; echo; echo \"tick $i\"; done'",
        ),
        job(
            "cli_job",
            "  targets: [e2e-cli]\n  command: 'echo first; echo \"second é🚀\"; sleep 1; exit 7'",
        ),
    ]
    .concat();
    let (token, entry) = super::access::new_token("e2e-browser", "operator")?;
    let master = Master::start(
        &dir,
        &[("settings.yaml", settings(&entry)), ("jobs.yaml", jobs)],
    )?;
    Ok((master, token))
}

/// `sp-master run cli_job --follow` prints the output and exits with the job's code.
pub fn cli_follow(master: &Master, token: &str) -> Result<String> {
    let started = Instant::now();
    let out = Command::new(binary("sp-master"))
        .args(["run", "cli_job", "--follow", "--api"])
        .arg(format!("http://{}", master.api))
        .env("SP_API_TOKEN", token)
        .stdin(Stdio::null())
        .output()
        .context("running sp-master run --follow")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    // The job exits 7; the CLI says "the job failed" with its own 3 and prints the job's code.
    ensure!(
        out.status.code() == Some(3),
        "expected exit 3, got {:?}; stdout {stdout:?} stderr {stderr:?}",
        out.status.code()
    );
    ensure!(stdout.contains("first\nsecond é🚀\n"), "stdout {stdout:?}");
    ensure!(stderr.contains("e2e-cli: exit 7"), "stderr {stderr:?}");
    let status = Command::new(binary("sp-master"))
        .args(["status", "--api"])
        .arg(format!("http://{}", master.api))
        .args(["--token", token])
        .output()?;
    let table = String::from_utf8_lossy(&status.stdout);
    ensure!(
        status.status.success() && table.contains("cli_job") && table.contains("FAILED"),
        "status: {table}"
    );
    Ok(format!(
        "run --follow streamed the output, printed the job's exit 7 and exited 3 after {:.1} s; status shows FAILED",
        started.elapsed().as_secs_f64()
    ))
}

/// Installs Debian's chromium and chromedriver when missing (as root).
fn ensure_chromium() -> Result<()> {
    if Path::new(CHROMIUM).exists() && Path::new(CHROMEDRIVER).exists() {
        return Ok(());
    }
    let uid = Command::new("id").arg("-u").output()?;
    ensure!(
        String::from_utf8_lossy(&uid.stdout).trim() == "0",
        "chromium and chromedriver are missing and we are not root to install them \
         (apt-get install chromium chromium-driver)"
    );
    println!("e2e: installing chromium and chromium-driver with apt-get");
    let ok = Command::new("apt-get").arg("update").status()?.success()
        && Command::new("apt-get")
            .args([
                "install",
                "-y",
                "--no-install-recommends",
                "chromium",
                "chromium-driver",
            ])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()?
            .success();
    ensure!(ok, "apt-get could not install chromium and chromium-driver");
    Ok(())
}

/// A chromedriver process, ended by PID when dropped.
struct Driver {
    child: Child,
    addr: SocketAddr,
    session: String,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = wd_request(
            self.addr,
            "DELETE",
            &format!("/session/{}", self.session),
            None,
        );
        // chromedriver leads its own process group, which the browser it starts inherits:
        // ending the group ends a browser that no longer answers WebDriver too, instead of
        // leaving it behind after a failed scenario.
        if let Ok(pid) = i32::try_from(self.child.id()) {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Driver {
    fn start(profile: &Path, log: &Path) -> Result<Self> {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
        let child = Command::new(CHROMEDRIVER)
            .process_group(0)
            .arg(format!("--port={port}"))
            .arg(format!("--log-path={}", log.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting chromedriver")?;
        let mut driver = Self {
            child,
            addr,
            session: String::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while wd_request(addr, "GET", "/status", None)
            .map(|r| r.1["value"]["ready"] != true)
            .unwrap_or(true)
        {
            ensure!(
                Instant::now() < deadline,
                "chromedriver not ready within 20 s"
            );
            sleep(Duration::from_millis(100));
        }
        let args = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            "--window-size=1280,1000",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .chain([format!("--user-data-dir={}", profile.display())])
        .collect::<Vec<_>>();
        let caps = json!({ "capabilities": { "alwaysMatch": {
            "browserName": "chrome",
            // Navigation returns at once and the scenario polls for what it needs: the page
            // opens a prompt while it loads, and waiting for a load that a prompt holds up
            // has left chromedriver without an answer on a busy machine.
            "pageLoadStrategy": "none",
            "unhandledPromptBehavior": "ignore",
            "goog:chromeOptions": { "binary": CHROMIUM, "args": args },
        }}});
        let (_, r) = wd_request(addr, "POST", "/session", Some(&caps))?;
        driver.session = r["value"]["sessionId"]
            .as_str()
            .with_context(|| format!("no WebDriver session: {r}"))?
            .to_owned();
        Ok(driver)
    }

    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value> {
        let body = (method != "GET").then(|| body.unwrap_or_else(|| json!({})));
        let (status, r) = wd_request(
            self.addr,
            method,
            &format!("/session/{}{path}", self.session),
            body.as_ref(),
        )?;
        if status != 200 {
            bail!(
                "WebDriver {method} {path}: HTTP {status} {}",
                r["value"]["message"]
            );
        }
        Ok(r["value"].clone())
    }

    fn js(&self, script: &str) -> Result<Value> {
        self.call(
            "POST",
            "/execute/sync",
            Some(json!({ "script": script, "args": [] })),
        )
    }

    fn click(&self, css: &str) -> Result<()> {
        let found = self.call(
            "POST",
            "/element",
            Some(json!({ "using": "css selector", "value": css })),
        )?;
        let id = found[ELEMENT]
            .as_str()
            .with_context(|| format!("no element {css}"))?
            .to_owned();
        self.call("POST", &format!("/element/{id}/click"), None)?;
        Ok(())
    }

    /// Accepts the `confirm()` dialog the last click opened; returns its text.
    fn accept_dialog(&self) -> Result<String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(text) = self.call("GET", "/alert/text", None) {
                self.call("POST", "/alert/accept", None)?;
                return Ok(text.as_str().unwrap_or_default().to_owned());
            }
            ensure!(
                Instant::now() < deadline,
                "no confirmation dialog within 10 s"
            );
            sleep(Duration::from_millis(50));
        }
    }

    /// Types `text` into the `prompt()` dialog the page opened and accepts it.
    fn answer_prompt(&self, text: &str) -> Result<String> {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Ok(asked) = self.call("GET", "/alert/text", None) {
                self.call("POST", "/alert/text", Some(json!({ "text": text })))?;
                self.call("POST", "/alert/accept", None)?;
                return Ok(asked.as_str().unwrap_or_default().to_owned());
            }
            ensure!(Instant::now() < deadline, "no prompt within 15 s");
            sleep(Duration::from_millis(50));
        }
    }

    /// Polls a script until it returns something truthy; returns it and how long it took.
    fn wait_for(&self, what: &str, limit: Duration, script: &str) -> Result<(Value, Duration)> {
        let started = Instant::now();
        loop {
            let v = self.js(script)?;
            let truthy = !matches!(&v, Value::Null | Value::Bool(false)) && v.as_str() != Some("");
            if truthy {
                return Ok((v, started.elapsed()));
            }
            if started.elapsed() > limit {
                let body = self.js("return document.body.innerText.slice(0, 2000)")?;
                bail!("{what}: not seen within {limit:?}; page says {body}");
            }
            sleep(Duration::from_millis(50));
        }
    }

    fn screenshot(&self, path: &Path) -> Result<usize> {
        let b64 = self.call("GET", "/screenshot", None)?;
        let png = base64::engine::general_purpose::STANDARD
            .decode(b64.as_str().context("no screenshot")?)
            .context("a screenshot that is not base64")?;
        fs::write(path, &png)?;
        Ok(png.len())
    }
}

/// Both scenarios against one master of their own: the dashboard first, then the CLI.
pub fn scenarios() -> Vec<super::Outcome> {
    let (master, token) = match start_master() {
        Ok(m) => m,
        Err(e) => return vec![("operator surface: master".to_owned(), Err(e))],
    };
    vec![
        (
            "dashboard in headless Chromium with a token: run, live output, kill, 143".to_owned(),
            dashboard_with_one_retry(&master, &token),
        ),
        (
            "sp-master run --follow prints the job's code and exits 3 when it failed".to_owned(),
            cli_follow(&master, &token),
        ),
    ]
}

/// The browser scenario, tried a second time with a fresh browser when the first browser
/// stopped answering WebDriver: that is the browser's trouble on a loaded machine, not the
/// dashboard's, and the result says so. Any other failure stands.
fn dashboard_with_one_retry(master: &Master, token: &str) -> Result<String> {
    match dashboard(master, token) {
        Err(first) if format!("{first:#}").contains(NO_ANSWER) => {
            let second = dashboard(master, token)?;
            Ok(format!(
                "{second} (second browser; the first stopped answering: {first:#})"
            ))
        }
        other => other,
    }
}

const NO_ANSWER: &str = "no answer within 60 s";

/// The browser scenario.
pub fn dashboard(master: &Master, token: &str) -> Result<String> {
    ensure_chromium()?;
    let dir = master.dir.join("browser");
    fs::create_dir_all(&dir)?;
    let profile = dir.join("profile");
    let _ = fs::remove_dir_all(&profile);
    fs::create_dir_all(&profile)?;
    let driver = Driver::start(&profile, &dir.join("chromedriver.log"))?;
    let base = format!("http://{}/", master.api);
    let t0 = Instant::now();
    // The page asks for the token once its first read is refused; the navigation itself may
    // report the open prompt, which is what comes next anyway.
    if let Err(error) = driver.call("POST", "/url", Some(json!({ "url": base }))) {
        ensure!(
            format!("{error:#}").to_ascii_lowercase().contains("alert"),
            "{error:#}"
        );
    }
    let asked = driver.answer_prompt(token)?;
    ensure!(asked.contains("token"), "the page asked {asked:?}");
    let kept = driver.js("return sessionStorage.getItem('sp_api_token')")?;
    ensure!(
        kept.as_str() == Some(token),
        "the token is not kept for the tab: {kept}"
    );
    let stored = driver.js("return localStorage.getItem('sp_api_token')")?;
    ensure!(stored.is_null(), "the token leaked into localStorage");
    let (_, table) = driver.wait_for(
        "the jobs table",
        Duration::from_secs(15),
        "return document.querySelector('tr[data-job=dashboard_job]') !== null",
    )?;
    let page_load = t0.elapsed();
    driver.click("button.run[data-job=dashboard_job]")?;
    let asked = driver.accept_dialog()?;
    ensure!(asked.contains("dashboard_job"), "dialog said {asked:?}");
    let clicked = Instant::now();
    let out = "document.querySelector('pre.output[data-machine=e2e-web]')";
    driver.wait_for(
        "first output",
        Duration::from_secs(30),
        &format!("const p = {out}; return p && p.textContent.includes('tick 1\\n')"),
    )?;
    let first_output = clicked.elapsed();
    let (text, _) = driver.wait_for(
        "more output",
        Duration::from_secs(30),
        &format!(
            "const p = {out}; return p && p.textContent.includes('tick 8\\n') && p.textContent"
        ),
    )?;
    let text = text.as_str().unwrap_or_default();
    // Carriage returns are rendered, not shown: each finished progress line was overwritten in
    // place until it read 100%, as in a terminal.
    ensure!(!text.contains('\r'), "a carriage return reached the page");
    let lines: Vec<&str> = text.lines().collect();
    let finished = &lines[..lines.len().saturating_sub(1)];
    let steps: Vec<&&str> = finished.iter().filter(|l| l.starts_with("step ")).collect();
    ensure!(steps.len() >= 8, "too few progress lines in {text:?}");
    ensure!(
        steps.iter().all(|l| l.ends_with(": 100%")),
        "progress lines not overwritten in place: {steps:?}"
    );
    driver.click("#kill-run")?;
    driver.accept_dialog()?;
    let kill_at = Instant::now();
    let (code, _) = driver.wait_for(
        "exit code 143",
        Duration::from_secs(45),
        "const c = document.querySelector('.retcode[data-machine=e2e-web]'); \
         return c && c.textContent === '143' && c.textContent",
    )?;
    ensure!(code == "143");
    let killed_in = kill_at.elapsed();
    driver.wait_for(
        "the run state",
        Duration::from_secs(10),
        "return document.querySelector('#run-state').textContent === 'killed'",
    )?;
    // Let the timeline show the run too before the picture is taken.
    driver.call(
        "POST",
        "/url",
        Some(json!({ "url": format!("{base}#/timeline") })),
    )?;
    driver.wait_for(
        "the timeline bar",
        Duration::from_secs(15),
        "return document.querySelector('#timeline rect.bar') !== null",
    )?;
    fs::create_dir_all(target_dir().join("e2e"))?;
    let timeline_png = target_dir().join("e2e").join("dashboard-timeline.png");
    driver.screenshot(&timeline_png)?;
    let instance = driver.js(
        "return fetch('/api/v1/overview', { headers: { Authorization: 'Bearer ' + \
         sessionStorage.getItem('sp_api_token') } }).then(r => r.json()).then(o => \
         o.jobs.find(j => j.name === 'dashboard_job').last_instance)",
    )?;
    let instance = instance.as_str().context("no last instance")?.to_owned();
    driver.call(
        "POST",
        "/url",
        Some(json!({ "url": format!("{base}#/run/{instance}") })),
    )?;
    driver.wait_for(
        "the killed run",
        Duration::from_secs(10),
        "const c = document.querySelector('.retcode[data-machine=e2e-web]'); return c && c.textContent === '143'",
    )?;
    sleep(Duration::from_millis(300));
    let run_png = shot_path();
    let bytes = driver.screenshot(&run_png)?;
    Ok(format!(
        "page load {} ms (jobs table after {} ms of polling), first output {} ms after Run, \
         143 shown {:.1} s after Kill; screenshots {} ({} KiB) and {}",
        page_load.as_millis(),
        table.as_millis(),
        first_output.as_millis(),
        killed_in.as_secs_f64(),
        run_png.display(),
        bytes / 1024,
        timeline_png.display()
    ))
}

fn shot_path() -> PathBuf {
    target_dir().join("e2e").join("dashboard-run.png")
}

/// One WebDriver request through the project's HTTP client; every status is an answer.
fn wd_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> Result<(u16, Value)> {
    static AGENT: std::sync::OnceLock<ureq::Agent> = std::sync::OnceLock::new();
    let agent = AGENT.get_or_init(|| {
        ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(Duration::from_secs(5)))
            .timeout_global(Some(Duration::from_secs(60)))
            .build()
            .into()
    });
    let url = format!("http://{addr}{path}");
    let request = ureq::http::Request::builder()
        .method(method)
        .uri(&url)
        .header("Content-Type", "application/json")
        .body(body.map(Value::to_string).unwrap_or_default())
        .with_context(|| format!("building WebDriver {method} {path}"))?;
    let mut response = agent
        .run(request)
        .with_context(|| format!("WebDriver {method} {path}: {NO_ANSWER}"))?;
    let status = response.status().as_u16();
    let text = response
        .body_mut()
        .with_config()
        .limit(64 * 1024 * 1024)
        .read_to_string()
        .with_context(|| format!("WebDriver {method} {path}: {NO_ANSWER}"))?;
    Ok((status, serde_json::from_str(&text).unwrap_or(Value::Null)))
}
