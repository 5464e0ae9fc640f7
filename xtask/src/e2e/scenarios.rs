//! The scenarios of the master core with the local launcher: the seed document's two test
//! procedures (a killed wrapper is marked 253 within 16 s; a 40 s job ends 0 with a heartbeat
//! every 5 s), plus timeout, kill, overlap, maintenance, a broken job file and retried
//! machines (retried until one attempt succeeds, retried until the retries are used up, and a
//! kill from the API that is not retried); and, against a second master that has tokens, the
//! access scenarios of `access.rs`.

use std::path::Path;
use std::process::Command;
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;

use super::Outcome;
use super::access;
use super::master::{Master, all_ended, binary, machine, target_dir};

/// A job block with a schedule that does not fire during a test run; runs are started through
/// the API.
fn job(name: &str, body: &str) -> String {
    format!(
        "{name}:\n  sec: 0\n  min: 0\n  hour: 0\n  dom: 1\n  mon: 1\n  dow: '*'\n  year: 2099\n  target_type: list\n{body}\n"
    )
}

fn settings() -> String {
    "saltpeter_config:\n  launcher: local\n  logdir: '@DIR@/log'\n  data_dir: '@DIR@/data'\n  \
     default_wrapper_logdir: '@DIR@/wlog'\n  default_wrapper_loglevel: debug\n  \
     api_ws_bind_addr: 127.0.0.1\n  api_ws_port: 0\n  machines_ws_bind_addr: 127.0.0.1\n  \
     machines_ws_port: 0\nsaltpeter_maintenance:\n  machines: [e2e-m2]\n"
        .to_owned()
}

/// One scenario against the shared master.
type Scenario = fn(&Master) -> Result<String>;

pub fn local() -> Result<Vec<Outcome>> {
    let dir = target_dir()
        .join("e2e")
        .join(format!("local-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let jobs = [
        job("hb_lost", "  targets: [e2e-a]\n  command: sleep 300\n  timeout: 0"),
        job(
            "long_ok",
            "  targets: [e2e-b]\n  command: 'for i in 1 2 3 4 5 6 7 8; do echo tick $i; sleep 5; done'",
        ),
        job("timeout_124", "  targets: [e2e-c]\n  command: sleep 60\n  timeout: 2"),
        job("kill_143", "  targets: [e2e-k1, e2e-k2]\n  command: sleep 120"),
        job("overlap", "  targets: [e2e-o]\n  command: sleep 30"),
        job("maint", "  targets: [e2e-m1, e2e-m2]\n  command: echo hi from $SP_MACHINE_ID"),
        job(
            "retry",
            "  targets: [e2e-r]\n  command: 'if [ -e @DIR@/retry-marker ]; then echo second try; \
             else touch @DIR@/retry-marker; echo first try; exit 3; fi'\n  retries: 2\n  \
             retry_delay: 1",
        ),
        job(
            "retry_n",
            "  targets: [e2e-rn]\n  command: 'echo try; exit 3'\n  retries: 2\n  retry_delay: 0",
        ),
        // 143 is listed, yet a kill by an operator is never retried.
        job(
            "retry_kill",
            "  targets: [e2e-rk]\n  command: sleep 120\n  retries: 2\n  retry_delay: 0\n  \
             retry_on: [exit, killed]",
        ),
    ]
    .concat();
    let files = [
        ("settings.yaml", settings()),
        ("jobs.yaml", jobs),
        (
            "fragile.yaml",
            job("fragile", "  targets: [e2e-f]\n  command: echo still here"),
        ),
    ];
    let master = Master::start(&dir, &files)?;
    let scenarios: Vec<(&str, Scenario)> = vec![
        (
            "seed (a): kill -9 of the wrapper gives 253 within 16 s",
            heartbeat_lost,
        ),
        (
            "seed (b): a 40 s job ends 0 with a heartbeat every 5 s",
            long_job,
        ),
        ("timeout gives 124", timeout),
        ("kill through the API gives 143 on every machine", kill),
        ("overlap is refused", overlap),
        ("a maintenance machine is skipped", maintenance),
        (
            "a broken job file keeps the last good job running",
            broken_file,
        ),
        (
            "a failed attempt is retried with a fresh wrapper; retries stop at N; a kill (143) is not retried",
            retry,
        ),
    ];
    type AccessScenario = fn(&access::AccessMaster) -> Result<String>;
    let access_scenarios: Vec<(&str, AccessScenario)> = vec![
        (
            "reads without a token are refused when tokens are configured",
            access::reads_refused,
        ),
        (
            "a rebinding Host is refused, with the security headers",
            access::rebinding_refused,
        ),
        (
            "a run and a kill leave audit entries with actor and source",
            access::audit_after_run_and_kill,
        ),
    ];
    let access_master = access::start();
    let master = &master;
    let mut outcomes: Vec<Outcome> = std::thread::scope(|s| {
        let mut handles: Vec<_> = scenarios
            .into_iter()
            .map(|(name, f)| (name, s.spawn(move || f(master))))
            .collect();
        if let Ok(am) = &access_master {
            handles.extend(
                access_scenarios
                    .into_iter()
                    .map(|(name, f)| (name, s.spawn(move || f(am)))),
            );
        }
        handles
            .into_iter()
            .map(|(name, h)| {
                let result = h
                    .join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("scenario panicked")));
                (name.to_owned(), result)
            })
            .collect()
    });
    if let Err(error) = access_master {
        outcomes.push(("access: master with tokens".to_owned(), Err(error)));
    }
    Ok(outcomes)
}

fn alive(pid: u64) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
            s.rsplit(')')
                .next()
                .is_some_and(|r| r.trim_start().starts_with('Z'))
        })
}

fn heartbeat_lost(m: &Master) -> Result<String> {
    let instance = m.run_job("hb_lost")?;
    let run = m.wait_run(&instance, Duration::from_secs(20), |r| {
        machine(r, "e2e-a")["status"] == "running" && machine(r, "e2e-a")["wrapper_pid"].is_u64()
    })?;
    let wrapper_pid = machine(&run, "e2e-a")["wrapper_pid"]
        .as_u64()
        .context("wrapper pid")?;
    let job_pid = machine(&run, "e2e-a")["pid"].as_u64().context("job pid")?;
    let status = Command::new("kill")
        .args(["-KILL", &wrapper_pid.to_string()])
        .status()?;
    ensure!(status.success(), "kill -9 {wrapper_pid} failed");
    let killed = Instant::now();
    let run = m.wait_run(&instance, Duration::from_secs(25), |r| {
        machine(r, "e2e-a")["retcode"].is_i64()
    })?;
    let verdict = killed.elapsed();
    let mach = machine(&run, "e2e-a");
    ensure!(
        mach["retcode"] == 253,
        "expected 253, got {}",
        mach["retcode"]
    );
    ensure!(
        verdict <= Duration::from_secs(16),
        "253 came {verdict:?} after the kill (limit 16 s)"
    );
    ensure!(
        verdict >= Duration::from_secs(9),
        "253 came too early: {verdict:?} (heartbeats every 5 s, timeout 15 s)"
    );
    let output = mach["output"].as_str().unwrap_or_default();
    ensure!(
        output.contains("[SALTPETER ERROR: Job lost connection - no heartbeat for 15 seconds]"),
        "lost-connection line missing from {output:?}"
    );
    let jobs = m.jobs()?;
    let still =
        jobs["jobs"].as_array().into_iter().flatten().any(|j| {
            j["name"] == "hb_lost" && j["running"].as_array().is_some_and(|r| !r.is_empty())
        });
    ensure!(!still, "hb_lost still listed as running");
    // The job lost its wrapper; the parent-death signal must have ended it.
    let deadline = Instant::now() + Duration::from_secs(5);
    while alive(job_pid) && Instant::now() < deadline {
        sleep(Duration::from_millis(100));
    }
    ensure!(
        !alive(job_pid),
        "job process {job_pid} outlived its SIGKILLed wrapper"
    );
    Ok(format!("253 {:.2} s after kill -9", verdict.as_secs_f64()))
}

fn long_job(m: &Master) -> Result<String> {
    let started = Instant::now();
    let instance = m.run_job("long_ok")?;
    let run = m.wait_run(&instance, Duration::from_secs(80), all_ended)?;
    let took = started.elapsed();
    let mach = machine(&run, "e2e-b");
    ensure!(
        mach["retcode"] == 0,
        "expected 0, got {} ({})",
        mach["retcode"],
        mach["output"]
    );
    let output = mach["output"].as_str().unwrap_or_default();
    for i in 1..=8 {
        ensure!(
            output.contains(&format!("tick {i}\n")),
            "tick {i} missing from {output:?}"
        );
    }
    // Heartbeats as the master logged them: debug lines with the master's timestamps.
    let beats: Vec<f64> = m
        .log()
        .lines()
        .filter(|l| l.contains("Heartbeat.") && l.contains(&instance))
        .filter_map(seconds_of_day)
        .collect();
    ensure!(
        beats.len() >= 7,
        "only {} heartbeats logged for a 40 s job",
        beats.len()
    );
    let gaps: Vec<f64> = beats
        .windows(2)
        .map(|w| (w[1] - w[0]).rem_euclid(86_400.0))
        .collect();
    let (min, max) = gaps
        .iter()
        .fold((f64::MAX, 0f64), |(a, b), g| (a.min(*g), b.max(*g)));
    ensure!(
        min >= 4.0 && max <= 6.0,
        "heartbeat gaps outside 4-6 s: {gaps:?}"
    );
    Ok(format!(
        "0 after {:.1} s; {} heartbeats, gaps {min:.2}-{max:.2} s",
        took.as_secs_f64(),
        beats.len()
    ))
}

/// Seconds since midnight from a log line starting with an RFC 3339 time.
fn seconds_of_day(line: &str) -> Option<f64> {
    let t = line.get(11..26)?;
    let h: f64 = t.get(0..2)?.parse().ok()?;
    let m: f64 = t.get(3..5)?.parse().ok()?;
    let s: f64 = t.get(6..)?.trim_end_matches('Z').parse().ok()?;
    Some(h * 3600.0 + m * 60.0 + s)
}

fn timeout(m: &Master) -> Result<String> {
    let started = Instant::now();
    let instance = m.run_job("timeout_124")?;
    let run = m.wait_run(&instance, Duration::from_secs(30), all_ended)?;
    let mach = machine(&run, "e2e-c");
    ensure!(
        mach["retcode"] == 124,
        "expected 124, got {} ({})",
        mach["retcode"],
        mach["output"]
    );
    ensure!(
        mach["cause"] == "timeout",
        "expected cause timeout, got {}",
        mach["cause"]
    );
    let output = mach["output"].as_str().unwrap_or_default();
    ensure!(
        output.contains("[Job exceeded timeout of 2 seconds]"),
        "timeout line missing: {output:?}"
    );
    Ok(format!(
        "124 after {:.2} s (timeout 2 s)",
        started.elapsed().as_secs_f64()
    ))
}

fn kill(m: &Master) -> Result<String> {
    let instance = m.run_job("kill_143")?;
    let run = m.wait_run(&instance, Duration::from_secs(20), |r| {
        ["e2e-k1", "e2e-k2"]
            .iter()
            .all(|n| machine(r, n)["status"] == "running")
    })?;
    let pids: Vec<u64> = ["e2e-k1", "e2e-k2"]
        .iter()
        .filter_map(|n| machine(&run, n)["pid"].as_u64())
        .collect();
    let asked = Instant::now();
    let r = super::http::post(m.api, &format!("/api/v1/runs/{instance}/kill"))?;
    ensure!(r.status == 202, "kill: HTTP {} {}", r.status, r.body);
    let run = m.wait_run(&instance, Duration::from_secs(40), all_ended)?;
    let took = asked.elapsed();
    for n in ["e2e-k1", "e2e-k2"] {
        let mach = machine(&run, n);
        ensure!(
            mach["retcode"] == 143,
            "{n}: expected 143, got {}",
            mach["retcode"]
        );
        let output = mach["output"].as_str().unwrap_or_default();
        ensure!(
            output.contains("[Job terminated by user request]"),
            "{n}: kill line missing"
        );
    }
    ensure!(
        run["success"] == false,
        "a killed run must not count as a success"
    );
    for pid in pids {
        ensure!(!alive(pid), "job process {pid} survived the kill");
    }
    Ok(format!(
        "143 on both machines {:.2} s after the request",
        took.as_secs_f64()
    ))
}

fn retry(m: &Master) -> Result<String> {
    let started = Instant::now();
    let used_up = m.run_job("retry_n")?;
    let killed = m.run_job("retry_kill")?;
    let instance = m.run_job("retry")?;
    // The kill first: a check that fails later must not leave its `sleep 120` behind.
    let killed = kill_not_retried(m, &killed)?;
    let run = m.wait_run(&instance, Duration::from_secs(60), all_ended)?;
    let mach = machine(&run, "e2e-r");
    ensure!(
        mach["retcode"] == 0 && mach["attempt"] == 2,
        "expected 0 on attempt 2, got {} on attempt {} ({})",
        mach["retcode"],
        mach["attempt"],
        mach["output"]
    );
    ensure!(
        mach["attempts"][0]["retcode"] == 3,
        "the first attempt's 3 is not kept: {}",
        mach["attempts"]
    );
    let output = mach["output"].as_str().unwrap_or_default();
    ensure!(
        output.contains("first try")
            && output.contains("[Attempt 2/3]")
            && output.contains("second try"),
        "both attempts' output expected: {output:?}"
    );
    ensure!(run["success"] == true, "the run must count as a success");
    let path = m.dir.join("log/retry.log");
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut log = String::new();
    while Instant::now() < deadline && !log.contains("starting attempt 2/3") {
        log = std::fs::read_to_string(&path).unwrap_or_default();
        sleep(Duration::from_millis(50));
    }
    ensure!(
        log.contains("attempt 1/3") && log.contains("starting attempt 2/3"),
        "attempts not in the job log: {log:?}"
    );
    let used_up = retries_used_up(m, &used_up)?;
    Ok(format!(
        "exit 3, then 0 on attempt 2; {used_up}; {killed}; {:.2} s in all",
        started.elapsed().as_secs_f64()
    ))
}

/// A machine that always fails ends with its last attempt's code once `retries: 2` are used.
fn retries_used_up(m: &Master, instance: &str) -> Result<String> {
    let run = m.wait_run(instance, Duration::from_secs(60), all_ended)?;
    let mach = machine(&run, "e2e-rn");
    let earlier: Vec<&Value> = mach["attempts"]
        .as_array()
        .map(|a| a.iter().map(|x| &x["retcode"]).collect())
        .unwrap_or_default();
    ensure!(
        mach["retcode"] == 3 && mach["attempt"] == 3 && earlier == [3, 3],
        "expected 3 on attempt 3 after two 3s, got {} on attempt {} after {:?}",
        mach["retcode"],
        mach["attempt"],
        earlier
    );
    let output = mach["output"].as_str().unwrap_or_default();
    ensure!(
        output.contains("[Attempt 3/3]") && !output.contains("[Attempt 4/"),
        "attempt 3 of 3 expected to be the last: {output:?}"
    );
    ensure!(run["success"] == false, "the run must count as a failure");
    Ok("3 on all 3 attempts, then no more".into())
}

/// A machine killed through the API ends 143 on its first attempt even though its job lists
/// 143 in `retry_on`.
fn kill_not_retried(m: &Master, instance: &str) -> Result<String> {
    m.wait_run(instance, Duration::from_secs(20), |r| {
        machine(r, "e2e-rk")["status"] == "running"
    })?;
    let r = super::http::post(
        m.api,
        &format!("/api/v1/runs/{instance}/machines/e2e-rk/kill"),
    )?;
    ensure!(r.status == 202, "kill: HTTP {} {}", r.status, r.body);
    let run = m.wait_run(instance, Duration::from_secs(40), all_ended)?;
    let mach = machine(&run, "e2e-rk");
    ensure!(
        mach["retcode"] == 143 && mach["attempt"] == 1 && mach.get("attempts").is_none(),
        "expected 143 on attempt 1 with no earlier attempt, got {} on attempt {} after {}",
        mach["retcode"],
        mach["attempt"],
        mach["attempts"]
    );
    Ok("the machine killed through the API ended 143 on attempt 1, not retried".into())
}

fn overlap(m: &Master) -> Result<String> {
    let first = m.run_job("overlap")?;
    let r = super::http::post(m.api, "/api/v1/jobs/overlap/run")?;
    ensure!(
        r.status == 409,
        "second run: expected 409, got {} {}",
        r.status,
        r.body
    );
    // The job log is written by its own thread, so the line may land a moment after the 409.
    let wanted = format!("Overlap detected on {first}");
    let path = m.dir.join("log/overlap.log");
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut log = String::new();
    while Instant::now() < deadline {
        log = std::fs::read_to_string(&path).unwrap_or_default();
        if log.contains(&wanted) {
            break;
        }
        sleep(Duration::from_millis(50));
    }
    ensure!(
        log.contains(&format!("Overlap detected on {first}")),
        "overlap not logged: {log:?}"
    );
    let _ = super::http::post(m.api, &format!("/api/v1/runs/{first}/kill"))?;
    m.wait_run(&first, Duration::from_secs(40), all_ended)?;
    Ok(format!("second run refused with 409 ({})", r.body["error"]))
}

fn maintenance(m: &Master) -> Result<String> {
    let instance = m.run_job("maint")?;
    let run = m.wait_run(&instance, Duration::from_secs(20), all_ended)?;
    ensure!(
        machine(&run, "e2e-m1")["retcode"] == 0,
        "e2e-m1 did not succeed: {run}"
    );
    ensure!(
        machine(&run, "e2e-m2").is_null(),
        "e2e-m2 ran despite maintenance"
    );
    ensure!(
        run["maintenance"] == serde_json::json!(["e2e-m2"]),
        "maintenance list: {}",
        run["maintenance"]
    );
    ensure!(run["success"] == true, "run should succeed");
    Ok("e2e-m2 skipped, e2e-m1 ran".into())
}

fn broken_file(m: &Master) -> Result<String> {
    let path = m.conf.join("fragile.yaml");
    std::fs::write(&path, "fragile:\n  sec: 0\n  min: [unclosed\n")?;
    // Hot reload reacts within about a second; give it two.
    sleep(Duration::from_secs(2));
    let listed = m.jobs()?["jobs"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|j| j["name"] == "fragile");
    ensure!(listed, "the broken file's job disappeared");
    let instance = m.run_job("fragile")?;
    let run = m.wait_run(&instance, Duration::from_secs(20), all_ended)?;
    ensure!(
        machine(&run, "e2e-f")["retcode"] == 0,
        "fragile did not run: {run}"
    );
    let log = m.log();
    let named = log
        .lines()
        .any(|l| l.contains("fragile.yaml:") && l.to_lowercase().contains("error"));
    ensure!(named, "the master log does not name fragile.yaml:<line>");
    let check = Command::new(binary("sp-master"))
        .arg("check")
        .arg("-c")
        .arg(&m.conf)
        .output()?;
    let said = String::from_utf8_lossy(&check.stderr);
    ensure!(!check.status.success(), "check passed a broken directory");
    ensure!(
        said.contains("fragile.yaml:"),
        "check did not name the file: {said}"
    );
    if !said
        .lines()
        .any(|l| l.contains("fragile.yaml:3") || l.contains("fragile.yaml:2"))
    {
        bail!("check did not name the line: {said}");
    }
    Ok(format!(
        "last good job kept; check says: {}",
        said.lines().next().unwrap_or("").trim()
    ))
}
