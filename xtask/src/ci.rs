//! `cargo xtask ci`: everything CI checks, in the order a developer would want to hear about
//! failures: formatting, the crate graph, lints, unit and integration tests (with a throwaway
//! PostgreSQL on loopback for the shared store's), end-to-end scenarios, then the
//! x86_64 part of the release (`cargo xtask dist --quick`: the glibc 2.17 build, its ELF check
//! and the .deb packages installed in a throwaway root). The full release (aarch64 under qemu,
//! the .rpm packages) runs in the release workflow and on demand with `cargo xtask dist`.

use std::process::Command;

use anyhow::{Context, Result, bail};

/// Runs a command, streaming its output, and fails with its name if it fails.
pub fn step(name: &str, cmd: &mut Command) -> Result<()> {
    eprintln!("==> {name}");
    let status = cmd
        .status()
        .with_context(|| format!("could not run {name}"))?;
    if !status.success() {
        bail!("{name} failed ({status})");
    }
    Ok(())
}

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

fn has_nextest() -> bool {
    cargo()
        .args(["nextest", "--version"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

pub fn run(_args: &[String]) -> Result<()> {
    step(
        "cargo fmt --check",
        cargo().args(["fmt", "--all", "--", "--check"]),
    )?;
    eprintln!("==> cargo xtask deps");
    crate::deps::run(&[])?;
    step(
        "cargo clippy",
        cargo().args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]),
    )?;
    // Build the binaries once so integration tests and e2e share them.
    step(
        "cargo build",
        cargo().args(["build", "--workspace", "--bins"]),
    )?;
    // The PostgreSQL store's tests run against a real server, which lives for the test run
    // only; with `CI` set they fail rather than skip when its URL is missing.
    let postgres = crate::postgres::Postgres::start()?;
    if has_nextest() {
        step(
            "cargo nextest run",
            cargo()
                .args(["nextest", "run", "--workspace", "--no-fail-fast"])
                .env("CI", "true")
                .env(crate::postgres::URL_ENV, &postgres.url)
                .env(crate::postgres::CA_ENV, &postgres.ca),
        )?;
    } else {
        step(
            "cargo test",
            cargo()
                .args(["test", "--workspace", "--no-fail-fast"])
                .env("CI", "true")
                .env(crate::postgres::URL_ENV, &postgres.url)
                .env(crate::postgres::CA_ENV, &postgres.ca),
        )?;
    }
    drop(postgres);
    crate::e2e::run(&[])?;
    crate::dist::run(&["--quick".to_owned()])
}
