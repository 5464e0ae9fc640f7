//! A real `sp-master` process for scenarios: its own config directory, ports chosen by the
//! kernel (reported through `--ready-file`), logs in a file, and ended by PID when dropped.

use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use super::http;

/// A running master.
#[derive(Debug)]
pub struct Master {
    child: Child,
    /// The `sp-master` binary: the debug build, or a release build under test (`dist`).
    bin: PathBuf,
    pub api: SocketAddr,
    /// The machines endpoint as bound.
    pub machines: SocketAddr,
    pub dir: PathBuf,
    pub conf: PathBuf,
}

/// Where cargo puts binaries.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

pub fn binary(name: &str) -> PathBuf {
    target_dir().join("debug").join(name)
}

impl Master {
    /// Writes `files` (name, YAML) into a fresh config directory under `dir` and starts a master.
    pub fn start(dir: &Path, files: &[(&str, String)]) -> Result<Self> {
        Self::start_binary(&binary("sp-master"), dir, files)
    }

    /// [`Master::start`] with another `sp-master` binary.
    pub fn start_binary(bin: &Path, dir: &Path, files: &[(&str, String)]) -> Result<Self> {
        let conf = dir.join("conf");
        fs::create_dir_all(&conf)?;
        for (name, text) in files {
            fs::write(
                conf.join(name),
                text.replace("@DIR@", &dir.to_string_lossy()),
            )?;
        }
        let child = spawn(bin, dir, &conf)?;
        let mut master = Self {
            child,
            bin: bin.to_owned(),
            api: "127.0.0.1:1".parse()?,
            machines: "127.0.0.1:1".parse()?,
            dir: dir.to_owned(),
            conf,
        };
        master.wait_ready()?;
        Ok(master)
    }

    fn wait_ready(&mut self) -> Result<()> {
        let ready = self.dir.join("ready.json");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(text) = fs::read_to_string(&ready)
                && let Ok(v) = serde_json::from_str::<Value>(&text)
                && let Some(api) = v["api"].as_str()
                && let Some(machines) = v["machines"].as_str()
            {
                self.api = api.parse()?;
                self.machines = machines.parse()?;
                return Ok(());
            }
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "sp-master exited early ({status}); see {}",
                    self.dir.join("master.log").display()
                );
            }
            if Instant::now() > deadline {
                bail!("sp-master not ready within 30 s");
            }
            sleep(Duration::from_millis(50));
        }
    }

    /// `kill -9` of the master process: no chance to save anything.
    pub fn kill9(&mut self) -> Result<()> {
        let status = Command::new("kill")
            .args(["-KILL", &self.child.id().to_string()])
            .status()?;
        anyhow::ensure!(status.success(), "kill -9 of sp-master failed");
        self.child.wait()?;
        Ok(())
    }

    /// Sends `signal` (a name `kill` knows, such as `HUP`) to the master process.
    pub fn signal(&self, signal: &str) -> Result<()> {
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &self.child.id().to_string()])
            .status()?;
        anyhow::ensure!(status.success(), "kill -{signal} of sp-master failed");
        Ok(())
    }

    /// Waits up to `limit` for the master to exit on its own.
    pub fn wait_exit(&mut self, limit: Duration) -> Result<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!("sp-master still running {limit:?} after it was told to stop");
            }
            sleep(Duration::from_millis(20));
        }
    }

    /// Whether the master process is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Starts the master again on the same directories (after [`Master::kill9`]).
    pub fn relaunch(&mut self) -> Result<()> {
        let _ = fs::remove_file(self.dir.join("ready.json"));
        self.child = spawn(&self.bin, &self.dir, &self.conf)?;
        self.wait_ready()
    }

    /// Starts a run now and returns its instance id.
    pub fn run_job(&self, job: &str) -> Result<String> {
        let r = http::post(self.api, &format!("/api/v1/jobs/{job}/run"))?;
        if r.status != 202 {
            bail!("run {job}: HTTP {} {}", r.status, r.body);
        }
        Ok(r.body["instance"]
            .as_str()
            .context("no instance in reply")?
            .to_owned())
    }

    pub fn run(&self, instance: &str) -> Result<Value> {
        let r = http::get(self.api, &format!("/api/v1/runs/{instance}"))?;
        if r.status != 200 {
            bail!("run {instance}: HTTP {} {}", r.status, r.body);
        }
        Ok(r.body)
    }

    /// Polls a run until `done` holds, for at most `limit`.
    pub fn wait_run(
        &self,
        instance: &str,
        limit: Duration,
        done: impl Fn(&Value) -> bool,
    ) -> Result<Value> {
        let deadline = Instant::now() + limit;
        loop {
            let run = self.run(instance)?;
            if done(&run) {
                return Ok(run);
            }
            if Instant::now() > deadline {
                bail!("{instance} did not reach the expected state within {limit:?}: {run}");
            }
            sleep(Duration::from_millis(100));
        }
    }

    pub fn jobs(&self) -> Result<Value> {
        Ok(http::get(self.api, "/api/v1/jobs")?.body)
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("master.log")).unwrap_or_default()
    }
}

impl Drop for Master {
    fn drop(&mut self) {
        // Only the process we started, by PID.
        crate::process::terminate(&mut self.child, Duration::from_secs(5));
    }
}

/// Starts `sp-master` on `conf`, appending its output to `<dir>/master.log`.
fn spawn(bin: &Path, dir: &Path, conf: &Path) -> Result<Child> {
    let log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("master.log"))?;
    Command::new(bin)
        .arg("-c")
        .arg(conf)
        .arg("--ready-file")
        .arg(dir.join("ready.json"))
        .env(
            "RUST_LOG",
            "info,saltpeter_master=debug,saltpeter_engine=debug,saltpeter_web=debug,\
             saltpeter_store=debug,saltpeter_joblog=debug,saltpeter_config=debug",
        )
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("starting sp-master")
}

/// A run's machine as JSON.
pub fn machine<'a>(run: &'a Value, name: &str) -> &'a Value {
    &run["machines"][name]
}

/// Whether every machine of a run has a retcode.
pub fn all_ended(run: &Value) -> bool {
    run["ended"].is_string()
}

/// Checks that every machine of `run` ended with its code in `want` and printed exactly what
/// `expected` says; `after` names what happened to the run, for the message.
pub fn expect_exact(
    run: &Value,
    want: &[(&str, i64)],
    expected: impl Fn(&str) -> String,
    after: &str,
) -> Result<()> {
    for (name, code) in want {
        let m = machine(run, name);
        anyhow::ensure!(
            m["retcode"] == *code,
            "{name}: expected {code}, got {} (cause {})",
            m["retcode"],
            m["cause"]
        );
        let got = m["output"].as_str().unwrap_or_default();
        anyhow::ensure!(
            got == expected(name),
            "{name}: output differs after {after}:\n{got}"
        );
    }
    Ok(())
}

impl Master {
    /// Polls until every one of `machines` has printed a line containing `marker`.
    pub fn wait_output(
        &self,
        instance: &str,
        machines: &[&str],
        marker: &str,
        limit: Duration,
    ) -> Result<Value> {
        self.wait_run(instance, limit, |r| {
            machines.iter().all(|m| {
                machine(r, m)["output"]
                    .as_str()
                    .is_some_and(|o| o.contains(marker))
            })
        })
    }
}
