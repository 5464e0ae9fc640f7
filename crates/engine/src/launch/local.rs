//! The local launcher: every name in a job's `targets` is a machine simulated on this host.
//! The master runs `sp-wrapper` directly with the environment Salt would pass and
//! `SP_MACHINE_ID` set to the machine's name and `SP_RUN_TOKEN` to that machine's own token
//! (so one simulated machine cannot speak for another), then judges the launch by the invoking process's
//! exit status, exactly as it would judge Salt's `cmd.run_all` result.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use tokio::process::Command;

use super::{BoxFuture, Launcher, Resolution, StartOutcome, StartRequest};
use saltpeter_config::JobSpec;

/// How long the invoking wrapper process may take to report readiness.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs wrappers on this host.
#[derive(Debug, Default)]
pub struct LocalLauncher {
    /// Used when neither the job nor the settings name a wrapper: by default `sp-wrapper`
    /// beside `sp-master`.
    pub default_wrapper: Option<PathBuf>,
    /// Where the simulated machines keep their per-job locks (the temp dir when unset).
    pub lock_dir: Option<PathBuf>,
}

impl LocalLauncher {
    /// A launcher that uses `sp-wrapper` from the directory of the running executable, or
    /// from `PATH` when there is none there.
    pub fn beside_current_exe() -> Self {
        let sibling = std::env::current_exe()
            .ok()
            .and_then(|exe| exe.parent().map(|d| d.join("sp-wrapper")))
            .filter(|p| p.exists());
        Self {
            default_wrapper: sibling,
            lock_dir: None,
        }
    }

    /// Keeps the simulated machines' locks in `dir`.
    pub fn with_lock_dir(mut self, dir: PathBuf) -> Self {
        self.lock_dir = Some(dir);
        self
    }
}

/// The names in a target expression: a list, or a string of names separated by commas or
/// white space. The local launcher has no minions to match globs against.
pub(crate) fn target_names(job: &JobSpec) -> Vec<String> {
    let mut names: Vec<String> = job.targets.names();
    names.sort();
    names.dedup();
    names
}

impl Launcher for LocalLauncher {
    fn resolve(&self, job: Arc<JobSpec>) -> BoxFuture<Resolution> {
        let up = target_names(&job);
        Box::pin(async move {
            Resolution {
                up,
                ..Resolution::default()
            }
        })
    }

    fn start(&self, request: StartRequest) -> BoxFuture<StartOutcome> {
        let program = match (&request.wrapper_path, &self.default_wrapper) {
            (Some(path), _) => PathBuf::from(path),
            (None, Some(default)) => default.clone(),
            (None, None) => PathBuf::from("sp-wrapper"),
        };
        let lock_dir = self.lock_dir.clone();
        Box::pin(async move {
            let starts = request.machines.iter().map(|machine| {
                let mut cmd = Command::new(&program);
                cmd.envs(request.env.iter().map(|(k, v)| (k, v)))
                    .env("SP_MACHINE_ID", machine);
                // Each machine's wrapper gets only its own credential.
                if let Some(token) = request.tokens.get(machine) {
                    cmd.env("SP_RUN_TOKEN", token);
                }
                // Simulated machines share this host's /tmp, where each would otherwise take the
                // same per-job lock; give each its own unless the job names one.
                if request.job.lockfile.is_none() {
                    // Under the master's own data dir, so two masters simulating machines of
                    // the same name on one host do not take each other's locks.
                    let dir = lock_dir.clone().unwrap_or_else(std::env::temp_dir);
                    let lock = dir.join(format!("sp_wrapper_{}@{machine}.lock", request.job.name));
                    cmd.env("SP_LOCKFILE", lock);
                }
                cmd.stdin(Stdio::null())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .kill_on_drop(true);
                let machine = machine.clone();
                async move { (machine, run_invoker(cmd).await) }
            });
            futures_util::future::join_all(starts).await
        })
    }
}

/// Runs the invoking wrapper process and turns its exit into a launch result.
async fn run_invoker(mut cmd: Command) -> Result<(), String> {
    let child = cmd
        .spawn()
        .map_err(|e| format!("Could not run the wrapper: {e}"))?;
    let output = tokio::time::timeout(START_TIMEOUT, child.wait_with_output())
        .await
        .map_err(|_| format!("The wrapper did not report readiness within {START_TIMEOUT:?}"))?
        .map_err(|e| format!("Could not wait for the wrapper: {e}"))?;
    if output.status.success() {
        return Ok(());
    }
    let mut reason = match output.status.code() {
        Some(code) => format!("Exit code {code}"),
        None => format!("Wrapper ended by {}", output.status),
    };
    let stderr = String::from_utf8_lossy(&output.stderr);
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !stderr.trim().is_empty() {
        reason.push_str(&format!("\nSTDERR: {}", stderr.trim_end()));
    }
    if !stdout.trim().is_empty() {
        reason.push_str(&format!("\nSTDOUT: {}", stdout.trim_end()));
    }
    Err(reason)
}
