//! Ending processes this tool started (by PID only, SIGTERM first, SIGKILL after a grace), and
//! running installers with their output in a log (Python venvs from PyPI, apt-get).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use anyhow::{Context, Result, bail};
use std::thread::sleep;
use std::time::{Duration, Instant};

/// Sends SIGTERM to `child`, waits up to `grace` for it to exit, then kills it. Returns whether
/// it left on its own within the grace.
pub fn terminate(child: &mut Child, grace: Duration) -> bool {
    // A child already reaped (a master killed with `kill -9` and waited for) has given up its
    // PID, which the kernel may have handed to a process that is not ours.
    if matches!(child.try_wait(), Ok(Some(_))) {
        return true;
    }
    let pid = child.id().to_string();
    let _ = Command::new("kill").args(["-TERM", &pid]).status();
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if matches!(child.try_wait(), Ok(Some(_))) {
            return true;
        }
        sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    false
}

/// Runs `cmd` with its output in `log`; on failure, shows the end of the log.
pub fn run_logged(cmd: &mut Command, log: &Path, what: &str) -> Result<()> {
    let out = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("opening {}", log.display()))?;
    let status = cmd
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .status()
        .with_context(|| format!("could not run {what}"))?;
    if !status.success() {
        let text = fs::read_to_string(log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(30)..].join("\n");
        bail!(
            "{what} failed ({status}); end of {}:\n{tail}",
            log.display()
        );
    }
    Ok(())
}

/// Makes a new Python venv at `dir` (removing what was there); returns its `pip`.
pub fn fresh_venv(dir: &Path, log: &Path) -> Result<PathBuf> {
    if dir.exists() {
        fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    if let Some(parent) = dir.parent() {
        fs::create_dir_all(parent)?;
    }
    let _ = fs::remove_file(log);
    run_logged(
        Command::new("python3").args(["-m", "venv"]).arg(dir),
        log,
        "python3 -m venv",
    )?;
    Ok(dir.join("bin").join("pip"))
}

/// `pip install` with `args`, quietly, its output in `log`.
pub fn pip_install(pip: &Path, args: &[&std::ffi::OsStr], log: &Path, what: &str) -> Result<()> {
    run_logged(
        Command::new(pip)
            .args(["install", "--disable-pip-version-check", "--no-input"])
            .args(["--progress-bar", "off"])
            .args(args),
        log,
        what,
    )
}
