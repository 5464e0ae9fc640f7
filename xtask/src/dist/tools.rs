//! The tools `cargo xtask dist` needs, installed by the project itself and cached under
//! `target/` so a fresh machine (or CI runner) gets the same versions as this one:
//!
//! - Zig and cargo-zigbuild from PyPI in the virtualenv `target/dist-venv` ([`zig_venv`]); Zig is
//!   the C toolchain and linker that targets glibc 2.17 on any host.
//! - cargo-deb and cargo-generate-rpm from crates.io, `cargo install --locked` into
//!   `target/dist-tools` ([`cargo_tool`]).
//! - Debian packages ([`apt_packages`]): `qemu-user` (runs the aarch64 build), `libc6-arm64-cross`
//!   (the aarch64 glibc that `qemu-aarch64 -L` loads) and `rpm` (rpm's own query of the .rpm).
//!
//! Each is reused while it answers `--version` with the pinned version, and installed again
//! otherwise.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

use crate::e2e::master::target_dir;
use crate::process::run_logged;
use crate::process::{fresh_venv, pip_install};

/// PyPI pins for the cross toolchain (its marker in the venv must match).
const ZIG_PINS: [&str; 2] = ["ziglang==0.17.1", "cargo-zigbuild==0.24.1"];

/// crates.io pins: (crate, version, the `--version` output that proves it is installed).
pub const CARGO_DEB: (&str, &str) = ("cargo-deb", "3.8.0");
pub const CARGO_GENERATE_RPM: (&str, &str) = ("cargo-generate-rpm", "0.21.1");

/// Stdout of a command that must succeed.
pub fn output(cmd: &mut Command, what: &str) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("could not run {what}"))?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn answers(cmd: &mut Command, wanted: &str) -> bool {
    cmd.stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .is_ok_and(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).contains(wanted))
}

/// The virtualenv with Zig and cargo-zigbuild; returns its `bin` directory, which goes first on
/// `PATH` so cargo-zigbuild finds `python3 -m ziglang` there.
pub fn zig_venv() -> Result<PathBuf> {
    let dir = target_dir().join("dist-venv");
    let bin = dir.join("bin");
    let marker = dir.join(".sp-dist-ready");
    let wanted = ZIG_PINS.join("\n");
    if fs::read_to_string(&marker).is_ok_and(|m| m == wanted)
        && answers(
            Command::new(bin.join("cargo-zigbuild")).arg("--version"),
            "0.24",
        )
    {
        return Ok(bin);
    }
    eprintln!(
        "==> installing Zig and cargo-zigbuild into {} (PyPI)",
        dir.display()
    );
    let log = target_dir().join("dist-venv-install.log");
    let pip = fresh_venv(&dir, &log)?;
    let pins: Vec<&std::ffi::OsStr> = ZIG_PINS.iter().map(std::ffi::OsStr::new).collect();
    pip_install(&pip, &pins, &log, "pip install ziglang cargo-zigbuild")?;
    fs::write(&marker, wanted)?;
    Ok(bin)
}

/// A cargo subcommand from crates.io at a pinned version, installed into `target/dist-tools`;
/// returns the directory to put first on `PATH` (cargo finds `cargo-<name>` there).
pub fn cargo_tool((name, version): (&str, &str)) -> Result<PathBuf> {
    let root = target_dir().join("dist-tools");
    let bin = root.join("bin");
    if answers(Command::new(bin.join(name)).arg("--version"), version) {
        return Ok(bin);
    }
    eprintln!(
        "==> installing {name} {version} into {} (crates.io)",
        root.display()
    );
    let log = target_dir().join(format!("{name}-install.log"));
    let _ = fs::remove_file(&log);
    run_logged(
        Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args(["install", "--locked", "--force", "--root"])
            .arg(&root)
            .args([name, "--version", &format!("={version}")]),
        &log,
        &format!("cargo install {name}"),
    )?;
    Ok(bin)
}

/// Makes sure the Debian packages are installed: `apt-get install` (as root, or through
/// `sudo -n` on a CI runner) only when `dpkg-query` says one is missing.
pub fn apt_packages(packages: &[&str]) -> Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|p| {
            !answers(
                Command::new("dpkg-query").args(["-W", "-f=${Status}", p]),
                "install ok installed",
            )
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("==> installing Debian packages: {}", missing.join(" "));
    let root = nix::unistd::Uid::effective().is_root();
    let apt = |args: &[&str]| {
        let mut cmd = if root {
            Command::new("apt-get")
        } else {
            let mut c = Command::new("sudo");
            c.args(["-n", "apt-get"]);
            c
        };
        cmd.args(args).env("DEBIAN_FRONTEND", "noninteractive");
        cmd
    };
    let log = target_dir().join("dist-apt.log");
    run_logged(&mut apt(&["update", "-qq"]), &log, "apt-get update")?;
    let mut install = apt(&["install", "-y", "-qq", "--no-install-recommends"]);
    install.args(&missing);
    run_logged(&mut install, &log, "apt-get install")
}

/// `PATH` with `dirs` in front.
pub fn path_with(dirs: &[&Path]) -> Result<std::ffi::OsString> {
    let mut all: Vec<PathBuf> = dirs.iter().map(|d| d.to_path_buf()).collect();
    if let Some(path) = std::env::var_os("PATH") {
        all.extend(std::env::split_paths(&path));
    }
    std::env::join_paths(all).context("building PATH")
}
