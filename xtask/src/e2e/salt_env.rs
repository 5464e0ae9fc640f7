//! A real Salt installation for the Salt scenarios: Salt from PyPI in a cached virtualenv, one
//! salt-master and three salt-minions on loopback, each with its own root, config directory
//! and log, all ended by PID when dropped.
//!
//! - The venv lives in `target/salt-venv` and is reused while its marker file matches
//!   `xtask/salt-e2e-requirements.txt` and `salt --version` still runs; otherwise it is rebuilt
//!   with `python3 -m venv` and pip (PyPI is the only network it needs). The original Python
//!   wrapper ([`ORIGINAL_WRAPPER`]) goes into the same venv with `--no-deps`.
//! - The master listens on two free loopback ports (never Salt's default 4505/4506, so a Salt
//!   already on the host is not disturbed), runs as root, and accepts the minions' keys with
//!   `salt-key -A -y` once they are pending.
//! - Minion ids are `minion-a`, `minion-b`, `minion-c`, never the host name, so a wrapper that
//!   reported the host name instead of its minion id would be rejected.
//! - The master serves the repository's Salt formula (`salt/saltpeter`) from its `file_roots`,
//!   with the debug `sp-wrapper` of this build as the release file
//!   `saltpeter/files/<version>/<arch>/sp-wrapper` and its `SHA256SUMS`, and a pillar that puts
//!   each minion's wrapper in the minion's own directory ([`SaltEnv::wrapper_install_path`]).
//!   The scenarios deploy it with `state.apply saltpeter.wrapper` before any job runs.
//! - All three minions share this host, where separate machines would each have their own
//!   `/tmp` lock and log directory. The jobs' `wrapper_path` is therefore a two-line shim
//!   ([`SaltEnv::wrapper_shim`]) that points `SP_LOCKFILE` and `SP_WRAPPER_LOGDIR` into the
//!   minion's own directory (by `SP_MACHINE_ID`, which the Salt launcher sets) and then execs
//!   the wrapper the formula installed there. The launcher itself is not told about this: it is
//!   test plumbing only.
//! - Each daemon is started in its own process group; teardown sends SIGTERM to the daemon's
//!   PID, waits, then SIGKILL to that group (Salt forks workers; they are ours too).

use std::fs;
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;

use super::master::{binary, target_dir, workspace_root};
use crate::process::{fresh_venv, pip_install};

/// The minions every Salt scenario may target, with the grain `sp_role` each carries.
pub const MINIONS: [(&str, &str); 3] =
    [("minion-a", "web"), ("minion-b", "web"), ("minion-c", "db")];

/// The original wrapper release the compatibility scenario runs. 0.9.31 (the release docs/COMPATIBILITY.md describes) is not
/// on PyPI. 0.9.32 speaks the same protocol but cannot finish a job: its main loop reads
/// `retcode` before anything assigns it (only its kill path does), so every normal run dies with
/// "cannot access local variable 'retcode'" right after `start` (seen here: 253 after 15 s).
/// 0.9.30 has the same messages and the assignment, so it is the newest usable release.
pub const ORIGINAL_WRAPPER: &str = "saltpeter==0.9.30";

/// The cached virtualenv with Salt.
#[derive(Debug)]
pub struct Venv {
    pub dir: PathBuf,
    /// How long it took to get it ready, and whether it was installed now.
    pub took: Duration,
    pub installed: bool,
}

impl Venv {
    pub fn bin(&self, name: &str) -> PathBuf {
        self.dir.join("bin").join(name)
    }

    /// `<venv>/lib/pythonX.Y/site-packages`.
    pub fn site_packages(&self) -> Result<PathBuf> {
        let lib = self.dir.join("lib");
        for entry in fs::read_dir(&lib).with_context(|| format!("reading {}", lib.display()))? {
            let path = entry?.path().join("site-packages");
            if path.is_dir() {
                return Ok(path);
            }
        }
        bail!("no site-packages under {}", lib.display())
    }
}

/// Makes sure the venv exists and works; installs it when it does not.
pub fn ensure_venv() -> Result<Venv> {
    let started = Instant::now();
    let dir = target_dir().join("salt-venv");
    let requirements = workspace_root()
        .join("xtask")
        .join("salt-e2e-requirements.txt");
    let wanted = format!(
        "{}\n{ORIGINAL_WRAPPER}\n",
        fs::read_to_string(&requirements)
            .with_context(|| format!("reading {}", requirements.display()))?
    );
    let marker = dir.join(".sp-e2e-ready");
    let venv = |installed| Venv {
        dir: dir.clone(),
        took: started.elapsed(),
        installed,
    };
    if fs::read_to_string(&marker).is_ok_and(|m| m == wanted) {
        let works = Command::new(dir.join("bin/salt"))
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if works {
            return Ok(venv(false));
        }
    }
    eprintln!(
        "==> installing Salt into {} (PyPI; a few minutes the first time)",
        dir.display()
    );
    let log = target_dir().join("salt-venv-install.log");
    let pip = fresh_venv(&dir, &log)?;
    pip_install(
        &pip,
        &["-r".as_ref(), requirements.as_os_str()],
        &log,
        "pip install -r xtask/salt-e2e-requirements.txt",
    )?;
    pip_install(
        &pip,
        &["--no-deps".as_ref(), ORIGINAL_WRAPPER.as_ref()],
        &log,
        "pip install --no-deps saltpeter",
    )?;
    fs::write(&marker, wanted)?;
    Ok(venv(true))
}

/// A daemon we started: SIGTERM by PID, then SIGKILL to its process group.
#[derive(Debug)]
pub(super) struct Daemon {
    name: String,
    child: Child,
    stopped: bool,
}

impl Daemon {
    pub(super) fn spawn(name: &str, cmd: &mut Command, log: &Path) -> Result<Self> {
        let out = fs::File::create(log)?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .process_group(0)
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        Ok(Self {
            name: name.to_owned(),
            child,
            stopped: false,
        })
    }

    pub(super) fn stop(&mut self) {
        if self.stopped {
            return;
        }
        self.stopped = true;
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                break;
            }
            sleep(Duration::from_millis(100));
        }
        // Salt's forked workers live in the group we gave the daemon; end any that linger.
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{pid}")])
            .stderr(Stdio::null())
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A running salt-master with its minions.
#[derive(Debug)]
pub struct SaltEnv {
    pub dir: PathBuf,
    /// The directory holding the master's config file `master`: `salt -c` and `salt_config_dir`.
    pub master_conf: PathBuf,
    pub salt_bin: PathBuf,
    venv_dir: PathBuf,
    master: Daemon,
    minions: Vec<Daemon>,
    /// Time from the first daemon start to every minion answering `test.ping`.
    pub ready_after: Duration,
    /// The daemons' short `root_dir` parent (see [`socket_dir`]), where their logs are.
    pub roots: PathBuf,
}

/// Salt puts its Unix sockets under `root_dir` (it prefixes even an absolute `sock_dir` with
/// it); a deep checkout (CI clones anywhere) pushes those paths past the kernel's 108-byte
/// limit for `AF_UNIX` addresses ("AF_UNIX path too long"), and the minions then never return
/// a job. So each daemon's `root_dir` (keys, cache, sockets, logs) is a short directory in
/// /tmp, unique to this run; the config files stay under `target/`.
pub fn socket_dir() -> PathBuf {
    PathBuf::from(format!("/tmp/sps-{}", std::process::id()))
}

pub(super) fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl SaltEnv {
    /// Starts the master and the minions under `dir` and waits until all of them answer.
    pub fn start(venv: &Venv, dir: &Path) -> Result<Self> {
        let started = Instant::now();
        let _ = fs::remove_dir_all(dir);
        fs::create_dir_all(dir)?;
        let publish = free_port()?;
        let mut ret = free_port()?;
        while ret == publish {
            ret = free_port()?;
        }
        let master_conf = dir.join("master/conf");
        fs::create_dir_all(&master_conf)?;
        write_file_roots(dir)?;
        let d = dir.display();
        let sockets = socket_dir();
        let _ = fs::remove_dir_all(&sockets);
        fs::create_dir_all(&sockets)?;
        let socks = sockets.display();
        // gather_job_timeout: how long Salt asks a silent minion whether it still runs the
        // job before calling it absent; 3 s keeps the stopped-minion scenario short.
        fs::write(
            master_conf.join("master"),
            format!(
                "root_dir: {socks}/master\nconf_file: {d}/master/conf/master\ninterface: 127.0.0.1\n\
                 publish_port: {publish}\nret_port: {ret}\nuser: root\nauto_accept: false\n\
                 worker_threads: 3\ngather_job_timeout: 3\nlog_file: {d}/master/master.log\n\
                 log_level_logfile: info\n\
                 file_roots:\n  base:\n    - {d}/file_roots\npillar_roots:\n  base:\n    - {d}/pillar\n"
            ),
        )?;
        let master = Daemon::spawn(
            "salt-master",
            Command::new(venv.bin("salt-master"))
                .arg("-c")
                .arg(&master_conf)
                .args(["-l", "warning"]),
            &dir.join("master/stdout.log"),
        )?;
        let mut env = Self {
            dir: dir.to_owned(),
            master_conf,
            salt_bin: venv.bin("salt"),
            venv_dir: venv.dir.clone(),
            master,
            minions: Vec::new(),
            ready_after: Duration::ZERO,
            roots: sockets.clone(),
        };
        for (id, role) in MINIONS {
            let conf = dir.join(id).join("conf");
            fs::create_dir_all(&conf)?;
            // Fast re-authentication once the key is accepted, and no grains that look up DNS
            // or GPUs (slow or absent on CI machines).
            fs::write(
                conf.join("minion"),
                format!(
                    "id: {id}\nmaster: 127.0.0.1\nmaster_port: {ret}\npublish_port: {publish}\n\
                     root_dir: {socks}/{id}\nuser: root\nlog_file: {d}/{id}/minion.log\n\
                     log_level_logfile: info\n\
                     acceptance_wait_time: 1\nrandom_reauth_delay: 0\n\
                     enable_fqdns_grains: false\nenable_gpu_grains: false\n\
                     grains:\n  sp_role: {role}\n"
                ),
            )?;
            env.minions.push(Daemon::spawn(
                id,
                Command::new(venv.bin("salt-minion"))
                    .arg("-c")
                    .arg(&conf)
                    .args(["-l", "warning"]),
                &dir.join(id).join("stdout.log"),
            )?);
        }
        env.accept_keys()?;
        env.wait_for_pings(Duration::from_secs(120))?;
        env.ready_after = started.elapsed();
        Ok(env)
    }

    fn check_daemons(&mut self) -> Result<()> {
        for d in std::iter::once(&mut self.master).chain(self.minions.iter_mut()) {
            if !d.stopped
                && let Some(status) = d.child.try_wait()?
            {
                bail!(
                    "{} exited early ({status}); see {}",
                    d.name,
                    self.dir.display()
                );
            }
        }
        Ok(())
    }

    /// Waits for the three keys to be pending, then accepts them.
    fn accept_keys(&mut self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            self.check_daemons()?;
            let out = Command::new(self.venv_dir.join("bin/salt-key"))
                .arg("-c")
                .arg(&self.master_conf)
                .args(["-L", "--out=json"])
                .stdin(Stdio::null())
                .output()?;
            let keys: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
            let listed = |field: &str, id: &str| {
                keys[field]
                    .as_array()
                    .is_some_and(|a| a.iter().any(|k| k == id))
            };
            if MINIONS.iter().all(|(id, _)| listed("minions", id)) {
                return Ok(());
            }
            if MINIONS
                .iter()
                .all(|(id, _)| listed("minions", id) || listed("minions_pre", id))
            {
                let accepted = Command::new(self.venv_dir.join("bin/salt-key"))
                    .arg("-c")
                    .arg(&self.master_conf)
                    .args(["-A", "-y"])
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .status()?;
                ensure!(accepted.success(), "salt-key -A -y failed ({accepted})");
                continue;
            }
            if Instant::now() > deadline {
                bail!("minion keys not all pending within 60 s: {keys}");
            }
            sleep(Duration::from_millis(300));
        }
    }

    /// `salt` with plain arguments (the harness has no secrets), JSON per minion.
    pub fn salt(&self, args: &[&str]) -> Result<(Value, String)> {
        let out = Command::new(&self.salt_bin)
            .arg("-c")
            .arg(&self.master_conf)
            .args(["--out=json", "--out-indent=-1"])
            .args(args)
            .stdin(Stdio::null())
            .output()?;
        let mut merged = serde_json::Map::new();
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            if let Ok(Value::Object(map)) = serde_json::from_str(line) {
                merged.extend(map);
            }
        }
        Ok((
            Value::Object(merged),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    }

    fn wait_for_pings(&mut self, limit: Duration) -> Result<()> {
        let deadline = Instant::now() + limit;
        loop {
            self.check_daemons()?;
            let (answers, _) = self.salt(&["-t", "5", "minion-*", "test.ping"])?;
            if MINIONS.iter().all(|(id, _)| answers[id] == true) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("not every minion answered test.ping within {limit:?}: {answers}");
            }
            sleep(Duration::from_millis(500));
        }
    }

    /// Stops one minion's daemon (for the stopped-minion scenario).
    pub fn stop_minion(&mut self, id: &str) -> Result<()> {
        let d = self
            .minions
            .iter_mut()
            .find(|d| d.name == id)
            .context("no such minion")?;
        d.stop();
        Ok(())
    }

    /// Writes the wrapper shim for jobs on these minions and returns its path: it gives each
    /// minion its own lock and log directory, then runs `program` (by default `sp-wrapper`).
    pub fn wrapper_shim(&self, name: &str, program: &str) -> Result<PathBuf> {
        let path = self.dir.join(name);
        let d = self.dir.display();
        fs::write(
            &path,
            format!(
                "#!/bin/sh\n# The e2e minions share one host: give each its own lock and wrapper log.\n\
                 mine={d}/$SP_MACHINE_ID\n\
                 export SP_LOCKFILE=\"$mine/lock/$(basename \"${{SP_LOCKFILE:-sp_wrapper_$SP_JOB_NAME.lock}}\")\"\n\
                 export SP_WRAPPER_LOGDIR=\"$mine/wlog\"\n\
                 exec {program} \"$@\"\n"
            ),
        )?;
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755))?;
        Ok(path)
    }

    /// The shim for our own wrapper: the one `state.apply saltpeter.wrapper` installed for the
    /// minion (until then, the shim fails as a missing wrapper would).
    pub fn sp_wrapper_shim(&self) -> Result<PathBuf> {
        let installed = self
            .dir
            .join("$SP_MACHINE_ID/bin/sp-wrapper")
            .to_string_lossy()
            .into_owned();
        self.wrapper_shim("sp-wrapper-shim", &installed)
    }

    /// Where the formula installs `id`'s wrapper (the pillar's `saltpeter:wrapper:path`).
    pub fn wrapper_install_path(&self, id: &str) -> PathBuf {
        self.dir.join(id).join("bin/sp-wrapper")
    }
}

/// The version directory of the release files: the workspace's version, as in a release.
pub const RELEASE_VERSION: &str = env!("CARGO_PKG_VERSION");

/// The master's `file_roots` (the formula, with this build's `sp-wrapper` as the release file
/// for this host's architecture and its `SHA256SUMS`) and `pillar_roots` (each minion's wrapper
/// and wrapper log in its own directory, at [`RELEASE_VERSION`]).
fn write_file_roots(dir: &Path) -> Result<()> {
    let roots = dir.join("file_roots");
    copy_tree(
        &workspace_root().join("salt/saltpeter"),
        &roots.join("saltpeter"),
    )?;
    let files = roots.join("saltpeter/files").join(RELEASE_VERSION);
    let arch = std::env::consts::ARCH;
    fs::create_dir_all(files.join(arch))?;
    fs::copy(binary("sp-wrapper"), files.join(arch).join("sp-wrapper"))
        .context("copying sp-wrapper into file_roots")?;
    let sums = Command::new("sha256sum")
        .arg(format!("{arch}/sp-wrapper"))
        .current_dir(&files)
        .output()
        .context("sha256sum")?;
    ensure!(sums.status.success(), "sha256sum failed");
    fs::write(files.join("SHA256SUMS"), &sums.stdout)?;
    let pillar = dir.join("pillar");
    fs::create_dir_all(&pillar)?;
    fs::write(pillar.join("top.sls"), "base:\n  '*':\n    - saltpeter\n")?;
    let d = dir.display();
    fs::write(
        pillar.join("saltpeter.sls"),
        format!(
            "saltpeter:\n  version: '{RELEASE_VERSION}'\n  wrapper:\n    \
             path: {d}/{{{{ grains['id'] }}}}/bin/sp-wrapper\n    \
             logdir: {d}/{{{{ grains['id'] }}}}/wlog\n"
        ),
    )?;
    Ok(())
}

fn copy_tree(from: &Path, to: &Path) -> Result<()> {
    fs::create_dir_all(to)?;
    for entry in fs::read_dir(from).with_context(|| format!("reading {}", from.display()))? {
        let entry = entry?;
        let dest = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_tree(&entry.path(), &dest)?;
        } else {
            fs::copy(entry.path(), &dest)?;
        }
    }
    Ok(())
}

impl Drop for SaltEnv {
    fn drop(&mut self) {
        for m in &mut self.minions {
            m.stop();
        }
        self.master.stop();
        // The daemons' logs stay in `roots` for a look after a failure; it is small.
    }
}
