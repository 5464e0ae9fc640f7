//! The Salt cluster scenario: two `sp-master`s with `launcher: salt` on the one Salt
//! installation of the group, sharing a throwaway PostgreSQL, so they form one cluster.
//!
//! Both masters speak TLS on the machines port with certificates they made themselves, so a
//! wrapper can only fail over if it was given both fingerprints to pin; both check every
//! wrapper's `connect` against its minion's Salt key, as the group's other masters do, so the
//! master that takes the job over must do that check for runs another master launched.
//!
//! A job on all three minions prints numbered lines for about 15 s and exits with a code of
//! its own per minion. The run is started through the master that does not hold the job (the
//! API forwards it to the holder, which launches through Salt); once every minion has sent
//! some output, the holder is killed with `kill -9`. The other master must hold the job within
//! 20 s, and every minion must end with its own exit code and exactly the lines it printed:
//! none may be marked 253, which is what a wrapper that never found the new holder would get.
//!
//! Cost: one run of one job, so one `test.ping` and one `cmd.run_all` through Salt, which is
//! what the group's lanes can afford on two cores.

use std::path::Path;
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;

use super::cluster::cluster_of;
use super::master::{Master, all_ended, expect_exact, machine};
use super::salt_env::SaltEnv;
use super::salt_scenarios::{job, plain_text, settings};

/// The job's name: no other scenario of the group uses it, so its lock files on the minions
/// are its own.
const JOB: &str = "failover";

/// Each minion's exit code.
const CODES: [(&str, i64); 3] = [("minion-a", 0), ("minion-b", 3), ("minion-c", 7)];

/// Lines each minion prints, one every 0.2 s: about 15 s of output, so the run is still going
/// when the holder dies and its wrappers have to find the other master.
const LINES: usize = 75;

/// The line every minion must have sent to the holder before it is killed.
const BEFORE_KILL: usize = 3;

/// How long the other master may take to hold the job after the kill: leases of 10 s, a pass
/// every 3 s, and some slack for two busy cores.
const TAKEOVER_LIMIT: Duration = Duration::from_secs(20);

fn jobs() -> String {
    job(
        JOB,
        &format!(
            "  targets: 'minion-*'\n  command: 'for i in $(seq 1 {LINES}); do echo \"$SP_MACHINE_ID line $i é\"; sleep 0.2; done; \
             case $SP_MACHINE_ID in minion-a) exit 0;; minion-b) exit 3;; *) exit 7;; esac'"
        ),
    )
}

fn expected_output(minion: &str) -> String {
    (1..=LINES)
        .map(|i| format!("{minion} line {i} é\n"))
        .collect()
}

/// Starts a PostgreSQL of its own, runs the scenario against it, and stops it after the
/// masters (which the scenario drops before it returns).
pub fn failover(salt: &SaltEnv, dir: &Path) -> Result<String> {
    let server = crate::postgres::Postgres::start().context("starting a throwaway PostgreSQL")?;
    let said = failover_on(salt, dir, &server.url);
    drop(server);
    said
}

fn failover_on(salt: &SaltEnv, dir: &Path, store: &str) -> Result<String> {
    let _ = std::fs::remove_dir_all(dir);
    let extra = format!("  store: '{store}'\n");
    let mut masters = Vec::new();
    for name in ["ha1", "ha2"] {
        masters.push(Master::start(
            &dir.join(name),
            &[
                ("settings.yaml", settings(salt, &extra)?),
                ("jobs.yaml", jobs()),
            ],
        )?);
    }
    let (h, holder) = wait_settled(&masters, Duration::from_secs(60))?;
    let other = 1 - h;
    let other_id = id_of(&masters[other])?;
    // Through the master that does not hold the job: the API forwards it to the holder.
    let fired = Instant::now();
    let instance = masters[other].run_job(JOB)?;
    let marker = format!(" line {BEFORE_KILL} ");
    let minions: Vec<&str> = CODES.iter().map(|(id, _)| *id).collect();
    masters[h].wait_output(&instance, &minions, &marker, Duration::from_secs(120))?;
    let output_after = fired.elapsed();
    masters[h].kill9()?;
    let killed = Instant::now();
    let took = wait_held(&masters[other], killed, TAKEOVER_LIMIT)?;
    let run = masters[other].wait_run(&instance, Duration::from_secs(120), all_ended)?;
    for (id, _) in CODES {
        let m = machine(&run, id);
        ensure!(
            m["retcode"] != 253,
            "{id}: 253, its wrapper did not reach the new holder (cause {})",
            m["cause"]
        );
    }
    expect_exact(&run, &CODES, expected_output, "the failover")?;
    // The wrappers came back signed with their minions' keys to a master that did not launch
    // them; its log says it bound each of them with that proof.
    let bound = plain_text(&masters[other].log())
        .lines()
        .filter(|l| {
            l.contains("Wrapper connected.")
                && l.contains(&instance)
                && l.contains("authenticated=true")
        })
        .count();
    ensure!(
        bound >= CODES.len(),
        "the new holder's log shows {bound} wrapper(s) connected with their minion key, expected {}",
        CODES.len()
    );
    drop(masters);
    Ok(format!(
        "run started through {other_id}, forwarded to {holder}; output on a, b, c {:.1} s after the request; \
         holder killed with kill -9; {other_id} held the job {:.1} s later; a/b/c ended 0/3/7 with {LINES} exact lines each, none 253",
        output_after.as_secs_f64(),
        took.as_secs_f64()
    ))
}

/// This master's id.
fn id_of(m: &Master) -> Result<String> {
    Ok(cluster_of(m)?["master"]
        .as_str()
        .context("no master id in /api/v1/cluster")?
        .to_owned())
}

/// Whether `c` (one master's `/api/v1/cluster`) says that master acts for the job.
fn acts(c: &Value) -> bool {
    c["held"]
        .as_array()
        .is_some_and(|held| held.iter().any(|j| j == JOB))
}

/// Waits until both masters see each other live, one of them acts for the job and the other
/// knows it as the holder (so a request to the other can be forwarded); returns the holder's
/// index and id.
fn wait_settled(masters: &[Master], limit: Duration) -> Result<(usize, String)> {
    let deadline = Instant::now() + limit;
    loop {
        let views: Vec<Option<Value>> = masters.iter().map(|m| cluster_of(m).ok()).collect();
        let both_live = views.iter().all(|v| {
            v.as_ref()
                .and_then(|v| v["masters"].as_array())
                .map(Vec::len)
                == Some(2)
        });
        if both_live && let [Some(a), Some(b)] = views.as_slice() {
            for (h, (holder, other)) in [(0, (a, b)), (1, (b, a))] {
                if acts(holder) && !acts(other) && other["holders"][JOB] == holder["master"] {
                    let id = holder["master"].as_str().unwrap_or_default().to_owned();
                    return Ok((h, id));
                }
            }
        }
        if Instant::now() > deadline {
            bail!("the two masters did not agree on a holder of {JOB} within {limit:?}: {views:?}");
        }
        sleep(Duration::from_millis(200));
    }
}

/// Waits until `m` acts for the job; returns the time since `since`.
fn wait_held(m: &Master, since: Instant, limit: Duration) -> Result<Duration> {
    loop {
        if cluster_of(m).is_ok_and(|c| acts(&c)) {
            return Ok(since.elapsed());
        }
        ensure!(
            since.elapsed() < limit,
            "the surviving master did not hold {JOB} within {limit:?} of the kill: {}",
            cluster_of(m).map_or_else(|e| e.to_string(), |c| c.to_string())
        );
        sleep(Duration::from_millis(100));
    }
}
