//! `cargo xtask dist`: the release. It builds `sp-wrapper` and `sp-master` for x86_64 and aarch64
//! Linux against glibc 2.17 with cargo-zigbuild (release profile, stripped, the git commit
//! embedded for `--version`), checks every binary ([`elf`]: architecture, loader, no glibc need
//! newer than 2.17), runs the x86_64 ones, runs a real job with the aarch64 `sp-wrapper` under
//! qemu-user against a local `sp-master` ([`qemu`]), packages them ([`package`]: .deb, .rpm,
//! tarballs, the Salt formula with its wrapper binaries, `SHA256SUMS`) and checks the packages.
//!
//! Everything lands in `target/dist/`. `--quick` (what `cargo xtask ci` runs) does the x86_64
//! part only: the build, the ELF check, `--version`, and the .deb packages with their checks;
//! the release workflow runs the whole thing.
//!
//! Glibc rather than static musl: the wrapper switches to the job's user, and only glibc's NSS
//! resolves users from LDAP or SSSD (see docs/DEPLOY.md).

pub mod elf;
mod package;
mod qemu;
pub mod tools;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};

use crate::ci::step;
use crate::e2e::master::{target_dir, workspace_root};

/// The package version of every crate (the workspace's).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The two binaries, by package.
pub const BINARIES: [(&str, &str); 2] = [
    ("saltpeter-wrapper", "sp-wrapper"),
    ("saltpeter-master", "sp-master"),
];

/// A release target.
#[derive(Debug, Clone, Copy)]
pub struct Target {
    /// Rust's target triple (cargo's output directory).
    pub triple: &'static str,
    /// `uname -m`, Salt's `cpuarch` grain and the rpm architecture.
    pub arch: &'static str,
    /// Debian's name for it.
    pub deb_arch: &'static str,
}

pub const TARGETS: [Target; 2] = [
    Target {
        triple: "x86_64-unknown-linux-gnu",
        arch: "x86_64",
        deb_arch: "amd64",
    },
    Target {
        triple: "aarch64-unknown-linux-gnu",
        arch: "aarch64",
        deb_arch: "arm64",
    },
];

impl Target {
    /// The built binary.
    pub fn binary(&self, name: &str) -> PathBuf {
        target_dir().join(self.triple).join("release").join(name)
    }
}

/// The short commit of HEAD, embedded in the binaries and named in the summary.
pub fn git_commit() -> Result<String> {
    let out = tools::output(
        Command::new("git")
            .args(["rev-parse", "--short=7", "HEAD"])
            .current_dir(workspace_root()),
        "git rev-parse",
    )?;
    Ok(out.trim().to_owned())
}

/// Seconds since the epoch of HEAD's commit: the time stamp of every file in the tarballs, so
/// two builds of one commit give the same archives.
fn commit_time() -> Result<String> {
    let out = tools::output(
        Command::new("git")
            .args(["log", "-1", "--format=%ct"])
            .current_dir(workspace_root()),
        "git log",
    )?;
    Ok(out.trim().to_owned())
}

/// Where the artifacts go.
pub fn out_dir() -> PathBuf {
    target_dir().join("dist")
}

pub fn run(args: &[String]) -> Result<()> {
    let quick = args.iter().any(|a| a == "--quick");
    let started = Instant::now();
    let targets: &[Target] = if quick { &TARGETS[..1] } else { &TARGETS };
    let commit = git_commit()?;
    let mut timings: Vec<(String, Duration)> = Vec::new();
    let mut time = |what: &str, since: Instant| timings.push((what.to_owned(), since.elapsed()));

    let t = Instant::now();
    let venv = tools::zig_venv()?;
    let deb_bin = tools::cargo_tool(tools::CARGO_DEB)?;
    let rpm_bin = if quick {
        None
    } else {
        tools::apt_packages(&["qemu-user", "libc6-arm64-cross", "rpm"])?;
        Some(tools::cargo_tool(tools::CARGO_GENERATE_RPM)?)
    };
    time("tools", t);

    for target in targets {
        let t = Instant::now();
        build(target, &venv, &commit)?;
        time(&format!("build {}", target.arch), t);
    }

    let t = Instant::now();
    let mut sizes = Vec::new();
    for target in targets {
        for (_, name) in BINARIES {
            let path = target.binary(name);
            let data = fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
            let report = elf::inspect(&data).with_context(|| format!("{}", path.display()))?;
            let summary =
                elf::check(&report, target.arch).with_context(|| format!("{}", path.display()))?;
            eprintln!("    {name} {}: {summary}", target.arch);
            sizes.push((format!("{name} {}", target.arch), data.len() as u64));
            if name == "sp-wrapper" {
                ensure!(
                    data.len() < WRAPPER_SIZE_LIMIT,
                    "{name} for {} is {} bytes, over the {WRAPPER_SIZE_LIMIT}-byte limit",
                    target.arch,
                    data.len()
                );
            }
        }
    }
    version_check(&TARGETS[0], &commit)?;
    time("ELF and --version checks", t);

    if !quick {
        let t = Instant::now();
        let summary = qemu::aarch64_job(&TARGETS[1], &TARGETS[0])?;
        eprintln!("    {summary}");
        time("aarch64 job under qemu", t);
    }

    let t = Instant::now();
    let out = out_dir();
    if out.exists() {
        fs::remove_dir_all(&out).with_context(|| format!("removing {}", out.display()))?;
    }
    fs::create_dir_all(&out)?;
    let stamp = commit_time()?;
    let mut artifacts = Vec::new();
    for target in targets {
        artifacts.extend(package::debs(target, &deb_bin, &out)?);
        if let Some(rpm_bin) = &rpm_bin {
            artifacts.extend(package::rpms(target, rpm_bin, &out)?);
        }
        artifacts.extend(package::tarballs(target, &out, &stamp)?);
    }
    artifacts.push(package::formula(targets, &out, &stamp)?);
    package::checksums(&out, &artifacts)?;
    time("packages", t);

    let t = Instant::now();
    for target in targets {
        for line in package::check_debs(target, &out, &commit)? {
            eprintln!("    {line}");
        }
        if rpm_bin.is_some() {
            for line in package::check_rpms(target, &out)? {
                eprintln!("    {line}");
            }
        }
    }
    for line in package::check_formula(targets, &out)? {
        eprintln!("    {line}");
    }
    time("package checks", t);

    println!(
        "\ndist {VERSION} ({commit}){} in {:.1} s:",
        if quick { ", quick" } else { "" },
        started.elapsed().as_secs_f64()
    );
    for (what, took) in &timings {
        println!("  {what:<28} {:>7.1} s", took.as_secs_f64());
    }
    println!("stripped sizes:");
    for (what, bytes) in &sizes {
        println!(
            "  {what:<28} {bytes:>9} bytes ({:.2} MiB)",
            *bytes as f64 / 1_048_576.0
        );
    }
    println!("artifacts in {}:", out.display());
    for name in &artifacts {
        println!("  {name}");
    }
    println!("  SHA256SUMS");
    Ok(())
}

/// `sp-wrapper` must stay under 4 MB (stripped): it is copied to every minion.
const WRAPPER_SIZE_LIMIT: usize = 4_000_000;

/// `cargo zigbuild --release` of both binaries for `target` at glibc 2.17, stripped, with the
/// commit embedded. Both packages in one build share their dependencies' compilation.
fn build(target: &Target, venv_bin: &Path, commit: &str) -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(["zigbuild", "--release", "--locked"])
        .args(BINARIES.iter().flat_map(|(pkg, _)| ["-p", pkg]))
        .args(["--target", &format!("{}.2.17", target.triple)])
        .current_dir(workspace_root())
        .env("PATH", tools::path_with(&[venv_bin])?)
        .env("SP_GIT_COMMIT", commit)
        // The release profile keeps line tables for local profiling; the shipped binaries do
        // not need them (panics abort, and a symbolised backtrace is not printed anyway).
        .env("CARGO_PROFILE_RELEASE_STRIP", "symbols");
    step(
        &format!("cargo zigbuild --release --target {}.2.17", target.triple),
        &mut cmd,
    )
}

/// The x86_64 binaries run here: each prints its version and this commit.
fn version_check(target: &Target, commit: &str) -> Result<()> {
    let wrapper = run_version(&target.binary("sp-wrapper"))?;
    let want = format!("Saltpeter Wrapper version {VERSION} ({commit})");
    ensure!(
        wrapper == want,
        "sp-wrapper --version: {wrapper:?}, expected {want:?}"
    );
    let master = run_version(&target.binary("sp-master"))?;
    let want = format!("sp-master {VERSION} ({commit})");
    ensure!(
        master == want,
        "sp-master --version: {master:?}, expected {want:?}"
    );
    eprintln!("    {wrapper} / {master}");
    Ok(())
}

/// The first line of `<bin> --version`.
pub fn run_version(bin: &Path) -> Result<String> {
    run_version_with(bin, &[], Path::new(""))
}

/// The first line of `<runner> <args> [<bin>] --version` (`bin` empty: none), e.g. a binary under
/// qemu.
pub fn run_version_with(runner: &Path, args: &[&str], bin: &Path) -> Result<String> {
    let mut cmd = Command::new(runner);
    cmd.args(args);
    if !bin.as_os_str().is_empty() {
        cmd.arg(bin);
    }
    let bin = runner;
    let out = cmd
        .arg("--version")
        .env_clear()
        .output()
        .with_context(|| format!("running {} --version", bin.display()))?;
    if !out.status.success() {
        bail!("{} --version failed ({})", bin.display(), out.status);
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned())
}
