//! `cargo xtask bench <what>`: benchmarks that print their figures.

mod master;
mod wrapper;

use anyhow::{Result, bail};

pub fn run(args: &[String]) -> Result<()> {
    match args.first().map(String::as_str) {
        Some("wrapper") => wrapper::run(&args[1..]),
        Some("master") => master::run(&args[1..]),
        Some(other) => bail!("unknown benchmark {other:?}; try wrapper or master"),
        None => bail!("usage: cargo xtask bench <wrapper|master>"),
    }
}
