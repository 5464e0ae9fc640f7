//! `cargo xtask demo`: builds both binaries and runs `sp-master demo`, the embedded default
//! configuration with the local launcher. Stops with Ctrl-C.

use std::process::Command;

use anyhow::Result;

use crate::ci::step;

pub fn run(_args: &[String]) -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    step(
        "build binaries",
        Command::new(&cargo).args(["build", "--workspace", "--bins"]),
    )?;
    step(
        "sp-master demo",
        Command::new(crate::e2e::binary("sp-master")).arg("demo"),
    )
}
