//! The aarch64 `sp-wrapper` runs a real job: a local `sp-master` (the x86_64 release build) with
//! the local launcher starts the wrapper through a shim that execs it under
//! `qemu-aarch64 -L /usr/aarch64-linux-gnu` (Debian's qemu-user and the aarch64 glibc of
//! libc6-arm64-cross). The job's own shell is a host program, so the job's output says nothing
//! of the architecture; what proves the emulated wrapper ran is the wrapper process itself
//! (`/proc/<pid>/exe` is qemu) and the version it reported in `start`.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};

use super::{Target, VERSION};
use crate::e2e::master::{Master, machine, target_dir};

/// The aarch64 glibc the emulated wrapper loads.
const SYSROOT: &str = "/usr/aarch64-linux-gnu";

pub fn aarch64_job(wrapper: &Target, master: &Target) -> Result<String> {
    let dir = target_dir().join("dist-check").join("qemu");
    if dir.exists() {
        fs::remove_dir_all(&dir)?;
    }
    fs::create_dir_all(&dir)?;
    let qemu = which("qemu-aarch64").context("qemu-aarch64 not found (Debian's qemu-user)")?;
    let bin = wrapper.binary("sp-wrapper");
    let version = super::run_version_with(&qemu, &["-L", SYSROOT], &bin)?;
    let want = format!("Saltpeter Wrapper version {VERSION} (");
    ensure!(
        version.starts_with(&want),
        "qemu sp-wrapper --version: {version:?}"
    );
    let shim = dir.join("sp-wrapper-aarch64");
    fs::write(
        &shim,
        format!(
            "#!/bin/sh\n# The aarch64 wrapper under qemu-user, with the aarch64 glibc.\nexec {} -L {SYSROOT} {} \"$@\"\n",
            qemu.display(),
            bin.display()
        ),
    )?;
    fs::set_permissions(&shim, fs::Permissions::from_mode(0o755))?;
    let settings = format!(
        "saltpeter_config:\n  launcher: local\n  default_wrapper_path: '{}'\n  logdir: '@DIR@/log'\n  \
         data_dir: '@DIR@/data'\n  default_wrapper_logdir: '@DIR@/wlog'\n  api_ws_bind_addr: 127.0.0.1\n  \
         api_ws_port: {}\n  machines_ws_bind_addr: 127.0.0.1\n  machines_ws_port: {}\n",
        shim.display(),
        free_port()?,
        free_port()?
    );
    let job =
        "arm:\n  sec: 0\n  min: 0\n  hour: 0\n  dom: 1\n  mon: 1\n  dow: '*'\n  year: 2099\n  \
               targets: [arm-1]\n  target_type: list\n  \
               command: \"echo begin on $SP_MACHINE_ID; sleep 3; echo end; exit 3\"\n"
            .to_owned();
    let m = Master::start_binary(
        &master.binary("sp-master"),
        &dir,
        &[("settings.yaml", settings), ("jobs.yaml", job)],
    )?;
    let fired = Instant::now();
    let instance = m.run_job("arm")?;
    let running = m.wait_run(&instance, Duration::from_secs(60), |r| {
        machine(r, "arm-1")["wrapper_pid"].is_u64()
    })?;
    let pid = machine(&running, "arm-1")["wrapper_pid"]
        .as_u64()
        .context("wrapper pid")?;
    let exe = fs::read_link(format!("/proc/{pid}/exe"))
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| "(gone)".to_owned());
    ensure!(
        exe.contains("qemu-aarch64"),
        "the wrapper process {pid} runs {exe}, not qemu-aarch64"
    );
    let run = m.wait_run(&instance, Duration::from_secs(90), |r| {
        r["ended"].is_string()
    })?;
    let mach = machine(&run, "arm-1");
    ensure!(mach["retcode"] == 3, "retcode {}: {run}", mach["retcode"]);
    ensure!(
        mach["output"] == "begin on arm-1\nend\n",
        "output {}",
        mach["output"]
    );
    ensure!(
        mach["wrapper_version"] == VERSION,
        "wrapper_version {}",
        mach["wrapper_version"]
    );
    Ok(format!(
        "aarch64 sp-wrapper under qemu ({exe}, pid {pid}): {version:?}; job exit 3 with its output, \
         wrapper_version {VERSION}, {:.1} s from fire to end",
        fired.elapsed().as_secs_f64()
    ))
}

fn which(name: &str) -> Option<std::path::PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}
