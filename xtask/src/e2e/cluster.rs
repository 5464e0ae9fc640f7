//! The `cluster` group: three `sp-master`s on one throwaway PostgreSQL, local launcher.
//!
//! - **Failover mid-output.** A job on three machines streams numbered lines; the master
//!   holding it is killed with `kill -9` in the middle. Another master takes the job over; every
//!   machine ends with its real exit code and byte-exact output, none is marked 253, and the
//!   takeover time is measured (kill to the new holder naming itself). The run is started, and a
//!   second run killed, through masters that do not hold the jobs: forwarded to the holder.
//! - **A partition.** Two masters reach the database through relays; the holder's relay is
//!   cut so its calls hang. The holder must stop acting for the job by its own clock before
//!   the other master takes it; the run then ends exact on the other master.
//! - **Slots across crashes.** A job fires every two seconds while the masters holding it are
//!   killed and restarted in turn; afterwards every slot of the window appears exactly once in
//!   the job's history, as a run or as a missed slot, and none twice.

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;

use super::Outcome;
use super::http;
use super::master::{Master, all_ended, expect_exact, machine, target_dir};

const MACHINES: [(&str, i64); 3] = [("c1", 0), ("c2", 3), ("c3", 7)];
/// Lines each machine prints, one every 0.2 s: about 16 s of output.
const LINES: usize = 80;

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn config(port: u16, store: &str, jobs: &str) -> Vec<(&'static str, String)> {
    let settings = format!(
        "saltpeter_config:\n  launcher: local\n  logdir: '@DIR@/log'\n  data_dir: '@DIR@/data'\n  \
         default_wrapper_logdir: '@DIR@/wlog'\n  api_ws_bind_addr: 127.0.0.1\n  api_ws_port: 0\n  \
         machines_ws_bind_addr: 127.0.0.1\n  machines_ws_port: {port}\n  store: '{store}'\n"
    );
    vec![("settings.yaml", settings), ("jobs.yaml", jobs.to_owned())]
}

const NEVER: &str = "  sec: 0\n  min: 0\n  hour: 0\n  dom: 1\n  mon: 1\n  dow: '*'\n  year: 2099\n  target_type: list\n";

fn failover_jobs() -> String {
    let stream = format!(
        "stream:\n{NEVER}  targets: [c1, c2, c3]\n  command: 'for i in $(seq 1 {LINES}); do echo \"$SP_MACHINE_ID line $i é\"; sleep 0.2; done; case $SP_MACHINE_ID in c1) exit 0;; c2) exit 3;; *) exit 7;; esac'\n"
    );
    let sleepy = format!("sleepy:\n{NEVER}  targets: [k1]\n  command: sleep 300\n");
    format!("{stream}{sleepy}")
}

fn ticking_jobs() -> String {
    "tick:\n  sec: '*/2'\n  min: '*'\n  hour: '*'\n  dom: '*'\n  mon: '*'\n  dow: '*'\n  \
     target_type: list\n  targets: [t1]\n  command: 'echo tick'\n"
        .to_owned()
}

/// `store` with its host and port replaced by `addr`.
fn via(store: &str, addr: std::net::SocketAddr) -> Result<String> {
    let (scheme, rest) = store.split_once("://").context("a URL")?;
    let (userinfo, rest) = rest.rsplit_once('@').context("a URL with user")?;
    let path = rest.find('/').map_or("", |i| &rest[i..]);
    Ok(format!("{scheme}://{userinfo}@{addr}{path}"))
}

/// The TCP address of a `postgres://` URL's server.
fn server_addr(store: &str) -> Result<std::net::SocketAddr> {
    let rest = store.split_once("://").context("a URL")?.1;
    let rest = rest.rsplit_once('@').map_or(rest, |(_, r)| r);
    let host_port = rest.split(['/', '?']).next().unwrap_or_default();
    host_port.parse().context("a numeric host:port")
}

/// Polls until exactly one of `masters` (other than `not`) acts for `job` (its engine's `held`
/// list has it), and returns which; dead masters are skipped.
fn wait_acting(
    masters: &mut [Master],
    job: &str,
    not: Option<usize>,
    limit: Duration,
) -> Result<usize> {
    let started = Instant::now();
    loop {
        let alive: Vec<usize> = (0..masters.len())
            .filter(|i| Some(*i) != not && masters[*i].alive())
            .collect();
        let acting: Vec<usize> = alive
            .into_iter()
            .filter(|i| {
                cluster_of(&masters[*i]).is_ok_and(|c| {
                    c["held"]
                        .as_array()
                        .is_some_and(|h| h.iter().any(|j| j == job))
                })
            })
            .collect();
        if let [one] = acting[..] {
            return Ok(one);
        }
        ensure!(
            started.elapsed() < limit,
            "no single master acts for {job} within {limit:?} (acting: {acting:?})"
        );
        sleep(Duration::from_millis(100));
    }
}

/// Polls until `m`'s engine no longer acts for `job` (its `held` list lacks it).
fn wait_not_acting(m: &Master, job: &str, limit: Duration) -> Result<Duration> {
    let started = Instant::now();
    loop {
        if let Ok(c) = cluster_of(m)
            && !c["held"]
                .as_array()
                .is_some_and(|h| h.iter().any(|j| j == job))
        {
            return Ok(started.elapsed());
        }
        ensure!(
            started.elapsed() < limit,
            "{} still acts for {job} after {limit:?}",
            m.api
        );
        sleep(Duration::from_millis(100));
    }
}

fn partition(store: &str) -> Result<String> {
    let upstream = server_addr(store)?;
    let relays = [
        super::partition::Relay::start(upstream)?,
        super::partition::Relay::start(upstream)?,
    ];
    let base = target_dir()
        .join("e2e")
        .join(format!("cluster-partition-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    let mut masters = Vec::new();
    for (i, relay) in relays.iter().enumerate() {
        let dir = base.join(format!("m{i}"));
        std::fs::create_dir_all(&dir)?;
        let url = via(store, relay.addr)?;
        masters.push(Master::start(
            &dir,
            &config(free_port()?, &url, &failover_jobs()),
        )?);
    }
    let holder = wait_holder(&masters[0], "stream", 2, None, Duration::from_secs(30))?;
    let h = index_of(&masters, &holder)?;
    let other = 1 - h;
    let instance = masters[h].run_job("stream")?;
    let names: Vec<&str> = MACHINES.iter().map(|(m, _)| *m).collect();
    masters[h].wait_output(&instance, &names, "line 10 ", Duration::from_secs(30))?;
    relays[h].cut();
    let cut_at = Instant::now();
    let stopped = wait_not_acting(&masters[h], "stream", Duration::from_secs(20))?;
    let new_holder = wait_holder(
        &masters[other],
        "stream",
        1,
        Some(&holder),
        Duration::from_secs(40),
    )?;
    let took_over = cut_at.elapsed();
    ensure!(
        stopped < took_over,
        "the cut-off master stopped acting {:.1} s after the cut, after the other took over at {:.1} s",
        stopped.as_secs_f64(),
        took_over.as_secs_f64()
    );
    let run = masters[other].wait_run(&instance, Duration::from_secs(90), all_ended)?;
    expect_exact(&run, &MACHINES, expected_output, "the partition")?;
    // Healed, the cut-off master comes back as a member.
    relays[h].heal();
    wait_holder(&masters[h], "stream", 2, None, Duration::from_secs(30))
        .context("the healed master did not rejoin")?;
    Ok(format!(
        "holder {holder} cut off after line 10: it stopped acting {:.1} s after the cut, {new_holder} held the job {:.1} s after the cut; c1/c2/c3 ended 0/3/7 with {LINES} exact lines each; healed, it rejoined",
        stopped.as_secs_f64(),
        took_over.as_secs_f64()
    ))
}

/// Three masters on `store`, each with its own directories and machines port.
fn three_masters(name: &str, store: &str, jobs: &str) -> Result<Vec<Master>> {
    let base = target_dir()
        .join("e2e")
        .join(format!("cluster-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    (1..=3)
        .map(|i| {
            let dir = base.join(format!("m{i}"));
            std::fs::create_dir_all(&dir)?;
            Master::start(&dir, &config(free_port()?, store, jobs))
        })
        .collect()
}

/// `GET /api/v1/cluster` of a master.
pub(super) fn cluster_of(m: &Master) -> Result<Value> {
    let r = http::get(m.api, "/api/v1/cluster")?;
    ensure!(r.status == 200, "cluster: HTTP {} {}", r.status, r.body);
    Ok(r.body)
}

/// Waits until `m` sees `count` live masters and some master holds `job`; returns the
/// holder's id.
fn wait_holder(
    m: &Master,
    job: &str,
    count: usize,
    not: Option<&str>,
    limit: Duration,
) -> Result<String> {
    let deadline = Instant::now() + limit;
    loop {
        if let Ok(c) = cluster_of(m)
            && c["masters"].as_array().map_or(0, Vec::len) >= count
            && let Some(holder) = c["holders"][job].as_str()
            && Some(holder) != not
        {
            return Ok(holder.to_owned());
        }
        ensure!(
            Instant::now() < deadline,
            "no holder of {job} (other than {not:?}) seen by {} within {limit:?}",
            m.api
        );
        sleep(Duration::from_millis(100));
    }
}

/// Which of `masters` has the id `id`.
fn index_of(masters: &[Master], id: &str) -> Result<usize> {
    for (i, m) in masters.iter().enumerate() {
        if cluster_of(m)
            .ok()
            .and_then(|c| c["master"].as_str().map(str::to_owned))
            .as_deref()
            == Some(id)
        {
            return Ok(i);
        }
    }
    bail!("no live master has the id {id}")
}

fn expected_output(machine: &str) -> String {
    (1..=LINES)
        .map(|i| format!("{machine} line {i} é\n"))
        .collect()
}

pub fn scenarios() -> Vec<Outcome> {
    // Each scenario has a server of its own: masters on one database form one cluster, and a
    // master without a job in its files would be given a share of the other scenario's jobs.
    let on_own_server = |scenario: fn(&str) -> Result<String>| {
        let server =
            crate::postgres::Postgres::start().context("starting a throwaway PostgreSQL")?;
        let said = scenario(&server.url);
        drop(server);
        said
    };
    std::thread::scope(|s| {
        let failover = s.spawn(|| on_own_server(failover));
        let slots = s.spawn(|| on_own_server(slots_across_crashes));
        let partition = s.spawn(|| on_own_server(partition));
        let join = |h: std::thread::ScopedJoinHandle<'_, Result<String>>| {
            h.join()
                .unwrap_or_else(|_| Err(anyhow::anyhow!("scenario panicked")))
        };
        vec![
            ("cluster: three masters; kill -9 of the holder mid-output; the new holder ends every machine exact, no 253; run and kill forwarded".to_owned(), join(failover)),
            ("cluster: a slot every 2 s while holders are killed (or stopped) and restarted in turn: each slot once (run or missed), none twice".to_owned(), join(slots)),
            ("cluster: the holder cut off from the database stops acting before the other master takes over; the run ends exact there".to_owned(), join(partition)),
        ]
    })
}

fn failover(store: &str) -> Result<String> {
    let mut masters = three_masters("failover", store, &failover_jobs())?;
    let holder = wait_holder(&masters[0], "stream", 3, None, Duration::from_secs(30))?;
    let h = index_of(&masters, &holder)?;
    let other = (h + 1) % 3;
    // Started through a master that does not hold the job: forwarded to the holder.
    let instance = masters[other].run_job("stream")?;
    let names: Vec<&str> = MACHINES.iter().map(|(m, _)| *m).collect();
    masters[h].wait_output(&instance, &names, "line 10 ", Duration::from_secs(30))?;
    masters[h].kill9()?;
    let killed_at = Instant::now();
    let new_holder = wait_holder(
        &masters[other],
        "stream",
        1,
        Some(&holder),
        Duration::from_secs(40),
    )?;
    let takeover = killed_at.elapsed();
    let n = index_of(&masters, &new_holder)?;
    let run = masters[n].wait_run(&instance, Duration::from_secs(90), all_ended)?;
    expect_exact(&run, &MACHINES, expected_output, "the failover")?;
    // A kill through a master that does not hold the job reaches the one that does.
    let sleepy_holder = wait_holder(&masters[n], "sleepy", 2, None, Duration::from_secs(20))?;
    let s = index_of(&masters, &sleepy_holder)?;
    let via = (0..3)
        .find(|i| *i != s && masters[*i].alive())
        .context("no second live master")?;
    let sleepy = masters[via].run_job("sleepy")?;
    masters[s].wait_run(&sleepy, Duration::from_secs(20), |r| {
        machine(r, "k1")["status"] == "running"
    })?;
    let r = http::post(masters[via].api, &format!("/api/v1/runs/{sleepy}/kill"))?;
    ensure!(
        r.status == 202,
        "forwarded kill: HTTP {} {}",
        r.status,
        r.body
    );
    let run = masters[s].wait_run(&sleepy, Duration::from_secs(40), all_ended)?;
    ensure!(
        machine(&run, "k1")["retcode"] == 143,
        "the forwarded kill ended {}",
        machine(&run, "k1")["retcode"]
    );
    Ok(format!(
        "holder {holder} killed after line 10; {new_holder} held the job {:.1} s later; c1/c2/c3 ended 0/3/7 with {LINES} exact lines each; a run started and a run killed (143) through a master that did not hold them",
        takeover.as_secs_f64()
    ))
}

fn slots_across_crashes(store: &str) -> Result<String> {
    let mut masters = three_masters("slots", store, &ticking_jobs())?;
    wait_holder(&masters[0], "tick", 3, None, Duration::from_secs(30))?;
    let began = time::OffsetDateTime::now_utc();
    let mut kills = Vec::new();
    // Two crashes, then a clean stop, which hands the job over at once.
    for clean in [false, false, true] {
        sleep(Duration::from_secs(8));
        // A restarted master may have taken the job back since: stop whoever acts for it now.
        let h = wait_acting(&mut masters, "tick", None, Duration::from_secs(30))?;
        if clean {
            masters[h].signal("TERM")?;
            masters[h].wait_exit(Duration::from_secs(30))?;
        } else {
            masters[h].kill9()?;
        }
        let at = Instant::now();
        wait_acting(&mut masters, "tick", Some(h), Duration::from_secs(40))?;
        kills.push(at.elapsed().as_secs_f64());
        masters[h]
            .relaunch()
            .context("restarting the stopped master")?;
    }
    sleep(Duration::from_secs(8));
    let ended = time::OffsetDateTime::now_utc();
    // Let the last fired run's rows reach the database.
    sleep(Duration::from_secs(2));
    let live = masters
        .iter_mut()
        .position(Master::alive)
        .context("no live master")?;
    let r = http::get(masters[live].api, "/api/v1/jobs/tick/runs?limit=200")?;
    ensure!(r.status == 200, "history: HTTP {} {}", r.status, r.body);
    // Every slot of the window, by its unix second: how often it appears.
    let mut seen: BTreeMap<i64, u64> = BTreeMap::new();
    let (mut fired, mut missed) = (0u64, 0u64);
    for row in r.body["runs"].as_array().into_iter().flatten() {
        let started = row["started"].as_str().unwrap_or_default();
        let at =
            time::OffsetDateTime::parse(started, &time::format_description::well_known::Rfc3339)
                .with_context(|| format!("bad time {started:?}"))?;
        // A run starts a moment after its slot; its slot is the even second at or before.
        let unix = at.unix_timestamp();
        let slot = unix - unix.rem_euclid(2);
        let count = row["missed_count"].as_u64().unwrap_or(1);
        if row.get("missed").is_some_and(|m| !m.is_null()) {
            missed += count;
            for k in 0..count {
                *seen.entry(slot + 2 * i64::try_from(k)?).or_default() += 1;
            }
        } else {
            fired += 1;
            *seen.entry(slot).or_default() += 1;
        }
    }
    let from = began.unix_timestamp() + 2 - began.unix_timestamp().rem_euclid(2);
    let to = ended.unix_timestamp() - ended.unix_timestamp().rem_euclid(2) - 2;
    let twice: Vec<i64> = seen
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(s, _)| *s)
        .collect();
    ensure!(twice.is_empty(), "slots that appear twice: {twice:?}");
    let lost: Vec<i64> = (from..=to)
        .step_by(2)
        .filter(|s| !seen.contains_key(s))
        .collect();
    ensure!(
        lost.is_empty(),
        "slots neither fired nor recorded missed: {lost:?} (window {from}..{to})"
    );
    Ok(format!(
        "{} slots over {:.0} s with 2 kill -9 of the holder (taken over after {:.1} s and {:.1} s) and a SIGTERM (handed over after {:.1} s): {fired} fired once, {missed} recorded missed, none twice, none lost",
        (to - from) / 2 + 1,
        (ended - began).as_seconds_f64(),
        kills.first().copied().unwrap_or_default(),
        kills.get(1).copied().unwrap_or_default(),
        kills.get(2).copied().unwrap_or_default(),
    ))
}
