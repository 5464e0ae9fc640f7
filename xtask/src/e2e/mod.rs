//! `cargo xtask e2e`: end-to-end scenarios with the real binaries: `sp-master` with the local
//! launcher starting real `sp-wrapper` processes, over real sockets, with real signals. The
//! scenarios run concurrently against one master and print what they measured.

mod access;
mod browser;
mod cluster;
mod flood;
mod http;
pub mod master;
mod notify;
mod notify_env;
mod partition;
mod recovery;
mod restart;
mod salt_cluster;
mod salt_env;
mod salt_identity;
mod salt_scenarios;
mod scenarios;

pub use flood::worker as flood_worker;
pub use master::binary;

use std::time::Instant;

use anyhow::{Result, bail};

use crate::ci::step;

/// A scenario: its name and what it measured, or why it failed.
type Outcome = (String, Result<String>);

pub fn run(args: &[String]) -> Result<()> {
    let mut cargo =
        std::process::Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    step(
        "build binaries for e2e",
        cargo.args(["build", "--workspace", "--bins"]),
    )?;
    let started = Instant::now();
    // The Salt group (real salt-master and minions, its own sp-masters) runs beside the local
    // group; `--no-salt` leaves it out on a machine without PyPI.
    let with_salt = !args.iter().any(|a| a == "--no-salt");
    // The notification group's mail sink comes from PyPI too.
    let with_pypi = with_salt;
    // `--only GROUP` (local, salt, restart, postgres, cluster, browser, flood, notify,
    // notify-env) runs one group, for quick iteration; `local` includes the flood, which runs
    // alone after the other groups.
    let only = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1))
        .cloned();
    let wanted = |group: &str| only.as_deref().is_none_or(|o| o == group);
    let with_salt = with_salt && wanted("salt");
    let (local, salt, restart, postgres, cluster) = std::thread::scope(|s| {
        let salt = with_salt.then(|| s.spawn(salt_scenarios::salt));
        let restart = wanted("restart").then(|| s.spawn(restart::scenarios));
        let postgres = wanted("postgres").then(|| s.spawn(restart::postgres_scenarios));
        let cluster = wanted("cluster").then(|| s.spawn(cluster::scenarios));
        let local = if wanted("local") {
            scenarios::local()
        } else {
            Ok(Vec::new())
        };
        (
            local,
            salt.map(|h| h.join()),
            restart.map(|h| h.join()),
            postgres.map(|h| h.join()),
            cluster.map(|h| h.join()),
        )
    });
    let mut outcomes: Vec<Outcome> = local?;
    match restart {
        None => {}
        Some(Ok(restart)) => outcomes.extend(restart),
        Some(Err(_)) => outcomes.push((
            "restart".into(),
            Err(anyhow::anyhow!("the restart group panicked")),
        )),
    }
    match postgres {
        None => {}
        Some(Ok(postgres)) => outcomes.extend(postgres),
        Some(Err(_)) => outcomes.push((
            "postgres".into(),
            Err(anyhow::anyhow!("the postgres group panicked")),
        )),
    }
    match cluster {
        None => {}
        Some(Ok(cluster)) => outcomes.extend(cluster),
        Some(Err(_)) => outcomes.push((
            "cluster".into(),
            Err(anyhow::anyhow!("the cluster group panicked")),
        )),
    }
    match salt {
        None => {}
        Some(Ok(Ok(salt))) => outcomes.extend(salt),
        Some(Ok(Err(error))) => outcomes.push(("salt: set-up".into(), Err(error))),
        Some(Err(_)) => outcomes.push((
            "salt".into(),
            Err(anyhow::anyhow!("the Salt group panicked")),
        )),
    }
    if wanted("browser") {
        outcomes.extend(browser::scenarios());
    }
    if wanted("notify") && with_pypi {
        outcomes.extend(notify::scenarios());
    }
    // Only on request: the receivers the notification scenarios use, checked alone.
    if only.as_deref() == Some("notify-env") {
        outcomes.push(("notify-env: receivers".into(), notify_env::self_test()));
    }
    // After everything else: 20,000 connects would slow the other groups' scenarios.
    if wanted("local") || wanted("flood") {
        outcomes.extend(flood::scenarios());
    }
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
