//! Project automation, run as `cargo xtask <command>`. See <https://github.com/matklad/cargo-xtask/>.
//!
//! - `ci`: everything CI runs (format, lints, the crate graph, unit and integration tests, e2e).
//! - `deps`: checks that no crate depends on one the drawn crate graph forbids.
//! - `e2e`: end-to-end scenarios with the real binaries.
//! - `bench wrapper|master`: benchmarks that print figures.
//! - `demo`: run the master on its embedded default configuration.
//! - `postgres`: a throwaway PostgreSQL on loopback for the store's tests; prints its URL.
//! - `dist [--quick]`: release binaries for x86_64 and aarch64 (glibc 2.17), packages, checks.

mod bench;
mod ci;
mod demo;
mod deps;
mod dist;
mod e2e;
mod postgres;
mod process;

use anyhow::{Result, bail};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("bench") => bench::run(&args[1..]),
        Some("ci") => ci::run(&args[1..]),
        Some("deps") => deps::run(&args[1..]),
        Some("e2e") => e2e::run(&args[1..]),
        Some("demo") => demo::run(&args[1..]),
        Some("dist") => dist::run(&args[1..]),
        Some("postgres") => postgres::run(&args[1..]),
        // Internal: one process of the e2e flood scenario's idle sockets.
        Some("flood-worker") => e2e::flood_worker(&args[1..]),
        Some(other) => {
            bail!(
                "unknown xtask command {other:?}; try ci, deps, e2e, bench, demo, dist or postgres"
            )
        }
        None => bail!("usage: cargo xtask <ci|deps|e2e|bench|demo|dist|postgres>"),
    }
}
