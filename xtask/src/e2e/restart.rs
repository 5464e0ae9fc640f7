//! Restart scenarios: `kill -9` of `sp-master` while three machines stream output, then a
//! restart after 5 s and, on a second master, after 25 s (longer than the heartbeat timeout).
//! Every machine must end with its real exit code and byte-exact output, nobody may be marked
//! 253, and a run killed through the API just before the crash must still end as 143. Beside
//! them, the missed-slot and catch-up scenario of `recovery.rs` stops and restarts a master
//! of its own.
//!
//! The `postgres` group runs the first of these with `store: postgres://...`, against a
//! throwaway PostgreSQL of its own (`xtask/src/postgres.rs`).

use std::net::TcpListener;
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};

use super::Outcome;
use super::master::{Master, all_ended, expect_exact, machine, target_dir};

const MACHINES: [(&str, i64); 3] = [("r1", 0), ("r2", 3), ("r3", 7)];
/// Lines each machine prints, one every 0.25 s: about 20 s of output.
const LINES: usize = 80;

/// A port that was free a moment ago, for a machines endpoint that must keep its address
/// across a restart (wrappers reconnect to the URL they were given).
fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The scenario's configuration; `store` is a PostgreSQL URL, or `None` for SQLite.
fn config(port: u16, store: Option<&str>) -> Vec<(&'static str, String)> {
    let mut settings = format!(
        "saltpeter_config:\n  launcher: local\n  logdir: '@DIR@/log'\n  data_dir: '@DIR@/data'\n  \
         default_wrapper_logdir: '@DIR@/wlog'\n  api_ws_bind_addr: 127.0.0.1\n  api_ws_port: 0\n  \
         machines_ws_bind_addr: 127.0.0.1\n  machines_ws_port: {port}\n"
    );
    if let Some(url) = store {
        settings.push_str(&format!("  store: '{url}'\n"));
    }
    let schedule = "  sec: 0\n  min: 0\n  hour: 0\n  dom: 1\n  mon: 1\n  dow: '*'\n  year: 2099\n  target_type: list\n";
    let stream = format!(
        "stream:\n{schedule}  targets: [r1, r2, r3]\n  command: 'for i in $(seq 1 {LINES}); do echo \"$SP_MACHINE_ID line $i é\"; sleep 0.25; done; case $SP_MACHINE_ID in r1) exit 0;; r2) exit 3;; *) exit 7;; esac'\n"
    );
    let sleepy = format!("sleepy:\n{schedule}  targets: [k1]\n  command: sleep 300\n");
    vec![
        ("settings.yaml", settings),
        ("jobs.yaml", format!("{stream}{sleepy}")),
    ]
}

fn expected_output(machine: &str) -> String {
    (1..=LINES)
        .map(|i| format!("{machine} line {i} é\n"))
        .collect()
}

pub fn scenarios() -> Vec<Outcome> {
    std::thread::scope(|s| {
        let short = s.spawn(|| crash_and_restart(Duration::from_secs(5), true, None));
        let long = s.spawn(|| crash_and_restart(Duration::from_secs(25), false, None));
        let clean = s.spawn(signals_and_clean_stop);
        let missed = s.spawn(super::recovery::missed_and_caught_up);
        let join = |h: std::thread::ScopedJoinHandle<'_, Result<String>>| {
            h.join()
                .unwrap_or_else(|_| Err(anyhow::anyhow!("scenario panicked")))
        };
        vec![
            ("restart: kill -9 of sp-master, back after 5 s, nothing lost; a killed run stays 143".to_owned(), join(short)),
            ("restart: kill -9 of sp-master, back after 25 s, no false 253".to_owned(), join(long)),
            ("restart: SIGHUP rereads the config; SIGTERM stops cleanly with the job log written".to_owned(), join(clean)),
            ("restart: slots missed while stopped are recorded (master_down) and notified; catch_up: last fires one within starting_deadline, not past it".to_owned(), join(missed)),
        ]
    })
}

/// The `postgres` group: the 5 s crash and restart, with the store in PostgreSQL.
pub fn postgres_scenarios() -> Vec<Outcome> {
    let name = "postgres: kill -9 of sp-master with store: postgres://, back after 5 s, nothing lost; a killed run stays 143".to_owned();
    let result = crate::postgres::Postgres::start()
        .context("starting a throwaway PostgreSQL")
        .and_then(|server| {
            let said = crash_and_restart(Duration::from_secs(5), true, Some(&server.url));
            drop(server);
            said
        });
    vec![(name, result)]
}

fn crash_and_restart(down: Duration, with_kill: bool, store: Option<&str>) -> Result<String> {
    let kind = if store.is_some() { "pg" } else { "sqlite" };
    let dir = target_dir().join("e2e").join(format!(
        "restart-{kind}-{}-{}",
        down.as_secs(),
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let port = free_port()?;
    let mut master = Master::start(&dir, &config(port, store))?;
    let instance = master.run_job("stream")?;
    master.wait_run(&instance, Duration::from_secs(20), |r| {
        MACHINES.iter().all(|(m, _)| {
            machine(r, m)["output"]
                .as_str()
                .is_some_and(|o| o.contains("line 5 "))
        })
    })?;
    let killed = if with_kill {
        let sleepy = master.run_job("sleepy")?;
        master.wait_run(&sleepy, Duration::from_secs(20), |r| {
            machine(r, "k1")["status"] == "running"
        })?;
        let r = super::http::post(master.api, &format!("/api/v1/runs/{sleepy}/kill"))?;
        ensure!(r.status == 202, "kill: HTTP {}", r.status);
        Some(sleepy)
    } else {
        None
    };
    master.kill9()?;
    let crashed = Instant::now();
    sleep(down);
    master.relaunch().context("restarting sp-master")?;
    let back = crashed.elapsed();
    let run = master.wait_run(&instance, Duration::from_secs(90), all_ended)?;
    expect_exact(&run, &MACHINES, expected_output, "the restart")?;
    for (name, _) in MACHINES {
        // The store holds the same bytes.
        let stored = super::http::get_text(
            master.api,
            &format!("/api/v1/runs/{instance}/machines/{name}/output"),
        )?;
        ensure!(
            stored == expected_output(name),
            "{name}: stored output differs"
        );
    }
    let mut said = format!(
        "down {:.1} s; all 3 machines ended with 0/3/7 and {} exact lines each",
        back.as_secs_f64(),
        LINES
    );
    if let Some(sleepy) = killed {
        let run = master.wait_run(&sleepy, Duration::from_secs(60), all_ended)?;
        let m = machine(&run, "k1");
        ensure!(
            m["retcode"] == 143,
            "killed run ended {} ({}) after the restart",
            m["retcode"],
            m["cause"]
        );
        said.push_str("; the run killed before the crash ended 143");
    }
    if let Some(url) = store {
        // The password is in the URL the configuration holds, and nowhere the master writes.
        let password = url
            .split_once("://")
            .and_then(|(_, rest)| rest.split_once('@'))
            .and_then(|(user_info, _)| user_info.split_once(':'))
            .map(|(_, password)| password.to_owned())
            .unwrap_or_default();
        ensure!(!password.is_empty(), "the test URL has no password");
        ensure!(
            master.log().contains("Store: PostgreSQL."),
            "the master did not say it opened PostgreSQL"
        );
        ensure!(
            !dir.join("data/saltpeter.db").exists(),
            "a SQLite store was created beside PostgreSQL"
        );
        ensure!(
            !master.log().contains(&password),
            "the master's log holds the store's password"
        );
        let check = std::process::Command::new(super::master::binary("sp-master"))
            .arg("check")
            .arg("-c")
            .arg(&master.conf)
            .output()?;
        let out = String::from_utf8_lossy(&check.stdout);
        ensure!(
            check.status.success() && out.contains("store: PostgreSQL, postgres://saltpeter:***@"),
            "sp-master check: {out}"
        );
        ensure!(
            !out.contains(&password),
            "sp-master check printed the password"
        );
        said.push_str("; the password is in neither the log nor `sp-master check`");
    }
    Ok(said)
}

/// SIGHUP while a machine streams output: the master stays up and rereads its config. Then
/// SIGTERM: it exits 0 after its final commit and job-log write, the wrapper goes on, and once
/// a new master has seen the run end, the job log's result block holds every line, those
/// buffered in the log at the moment of the SIGTERM included.
fn signals_and_clean_stop() -> Result<String> {
    let dir = target_dir()
        .join("e2e")
        .join(format!("signals-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let port = free_port()?;
    let mut master = Master::start(&dir, &config(port, None))?;
    let instance = master.run_job("stream")?;
    master.wait_run(&instance, Duration::from_secs(20), |r| {
        machine(r, "r1")["output"]
            .as_str()
            .is_some_and(|o| o.contains("line 5 "))
    })?;
    master.signal("HUP")?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !master.log().contains("Config reread on request.") {
        ensure!(master.alive(), "sp-master died of SIGHUP");
        ensure!(
            Instant::now() < deadline,
            "no reload logged within 10 s of SIGHUP"
        );
        sleep(Duration::from_millis(50));
    }
    ensure!(master.alive(), "sp-master died of SIGHUP");
    master.run(&instance).context("the API after SIGHUP")?;
    master.signal("TERM")?;
    let asked = Instant::now();
    let status = master.wait_exit(Duration::from_secs(20))?;
    let took = asked.elapsed();
    ensure!(
        status.success(),
        "sp-master exited with {status} on SIGTERM"
    );
    ensure!(
        master
            .log()
            .contains("Engine stopped; store committed, job log written."),
        "no clean-stop line in the master's log"
    );
    master.relaunch().context("starting sp-master again")?;
    let run = master.wait_run(&instance, Duration::from_secs(90), all_ended)?;
    for (name, code) in MACHINES {
        let m = machine(&run, name);
        ensure!(
            m["retcode"] == code,
            "{name}: expected {code}, got {} ({})",
            m["retcode"],
            m["cause"]
        );
    }
    let log = std::fs::read_to_string(dir.join("log").join("stream.log"))
        .context("reading the job log")?;
    for (name, _) in MACHINES {
        for line in expected_output(name).lines() {
            ensure!(
                log.contains(line),
                "the job log lacks {line:?} after the SIGTERM and restart"
            );
        }
    }
    Ok(format!(
        "SIGHUP reread the config; SIGTERM exit 0 after {:.2} s; {} lines of 3 machines all in the job log",
        took.as_secs_f64(),
        LINES
    ))
}
