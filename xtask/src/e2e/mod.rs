//! `cargo xtask e2e`: end-to-end scenarios with the real binaries: `sp-master` with the local
//! launcher starting real `sp-wrapper` processes, over real sockets, with real signals. The
//! scenarios run concurrently against one master and print what they measured.

mod browser;
mod http;
mod master;
mod scenarios;

pub use master::binary;

use std::time::Instant;

use anyhow::{Result, bail};

use crate::ci::step;

/// A scenario: its name and what it measured, or why it failed.
type Outcome = (String, Result<String>);

pub fn run(_args: &[String]) -> Result<()> {
    let mut cargo = std::process::Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    step("build binaries for e2e", cargo.args(["build", "--workspace", "--bins"]))?;
    let started = Instant::now();
    let mut outcomes: Vec<Outcome> = scenarios::local()?;
    outcomes.extend(browser::scenarios());
    let failed = outcomes.iter().filter(|(_, r)| r.is_err()).count();
    println!("\ne2e results ({:.1} s):", started.elapsed().as_secs_f64());
    for (name, result) in &outcomes {
        match result {
            Ok(measured) => println!("  PASS {name}: {measured}"),
            Err(error) => println!("  FAIL {name}: {error:#}"),
        }
    }
    println!("e2e: {} passed, {} failed", outcomes.len() - failed, failed);
    if failed > 0 {
        bail!("{failed} e2e scenario(s) failed");
    }
    Ok(())
}
