//! `cargo xtask bench wrapper`: RSS, throughput and start-up latency of `sp-wrapper`.

use anyhow::{Result, bail};

pub fn run(_args: &[String]) -> Result<()> {
    bail!("not implemented yet")
}
