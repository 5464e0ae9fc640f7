//! Missed slots and catch-up across a real stop: `sp-master` is stopped with SIGTERM just
//! after its jobs fired, stays down over one slot of each, and is started again. Three jobs
//! fire every 6 s: `plain` (no recovery keys) and `late` (`catch_up: last`,
//! `starting_deadline: 3`) on seconds 0, 6, ...; `soon` (the same keys) on seconds 3, 9, ....
//! The master comes back 3.2 s after `late`'s missed slot, past its deadline, and 0.2 s after
//! `soon`'s, within it: `soon` fires its slot late, `late` and `plain` record theirs as missed
//! (`master_down`) in the API's history and in `/metrics`, and a webhook that verifies every
//! signature hears one `missed` notification for each of them (none for `soon`).

use std::thread::sleep;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;

use super::http;
use super::master::{Master, target_dir};
use super::notify_env::WebhookReceiver;

/// Seconds between two slots of a job.
const PERIOD: i64 = 6;
/// How long after `late`'s missed slot the master is started again: beyond its 3 s deadline,
/// while `soon`'s missed slot (3 s later) is still within its own.
const BACK_AFTER: f64 = 3.2;

/// The webhook's shared secret.
const SECRET: &str = "e2e-missed-secret";

fn config(hook: &str) -> Vec<(&'static str, String)> {
    let settings = format!(
        "saltpeter_config:\n  launcher: local\n  logdir: '@DIR@/log'\n  \
         data_dir: '@DIR@/data'\n  default_wrapper_logdir: '@DIR@/wlog'\n  \
         api_ws_bind_addr: 127.0.0.1\n  api_ws_port: 0\n  machines_ws_bind_addr: 127.0.0.1\n  \
         machines_ws_port: 0\n  notify:\n    - webhook: {hook}\n      secret: {SECRET}\n      \
         on: [missed]\n"
    );
    let job = |name: &str, sec: &str, extra: &str| {
        format!(
            "{name}:\n  sec: '{sec}'\n  min: '*'\n  hour: '*'\n  dom: '*'\n  mon: '*'\n  \
             dow: '*'\n  target_type: list\n  targets: [mr-{name}]\n  command: 'true'\n{extra}"
        )
    };
    let catch_up = "  catch_up: last\n  starting_deadline: 3\n";
    let jobs = [
        job("plain", "*/6", ""),
        job("late", "*/6", catch_up),
        job("soon", "3,9,15,21,27,33,39,45,51,57", catch_up),
    ]
    .concat();
    vec![("settings.yaml", settings), ("jobs.yaml", jobs)]
}

/// Seconds since the epoch, with a fraction.
fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// A job's history rows, newest first.
fn history(m: &Master, job: &str) -> Result<Vec<Value>> {
    let r = http::get(m.api, &format!("/api/v1/jobs/{job}/runs?limit=100"))?;
    ensure!(r.status == 200, "history of {job}: HTTP {}", r.status);
    Ok(r.body["runs"].as_array().cloned().unwrap_or_default())
}

/// A history row's `started`, in whole seconds since the epoch.
fn started(row: &Value) -> Option<i64> {
    let text = row["started"].as_str()?;
    Some(
        saltpeter_proto::Timestamp::parse(text)
            .ok()?
            .get()
            .unix_timestamp(),
    )
}

/// Runs (not missed slots) that started in `from..until`, in seconds since the epoch.
fn runs_within(rows: &[Value], from: i64, until: i64) -> Vec<String> {
    rows.iter()
        .filter(|r| r.get("missed").is_none())
        .filter(|r| started(r).is_some_and(|s| (from..until).contains(&s)))
        .filter_map(|r| r["instance"].as_str().map(str::to_owned))
        .collect()
}

/// The missed rows of a history: (slot, reason, count).
fn missed(rows: &[Value]) -> Vec<(i64, String, u64)> {
    rows.iter()
        .filter(|r| r.get("missed").is_some())
        .map(|r| {
            (
                started(r).unwrap_or_default(),
                r["missed"].as_str().unwrap_or_default().to_owned(),
                r["missed_count"].as_u64().unwrap_or_default(),
            )
        })
        .collect()
}

pub fn missed_and_caught_up() -> Result<String> {
    let began = Instant::now();
    let dir = target_dir()
        .join("e2e")
        .join(format!("missed-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let hook = WebhookReceiver::start(Some(SECRET.to_owned()), Vec::new())?;
    let mut master = Master::start(&dir, &config(&hook.url("/missed")))?;

    // Wait for a slot of `soon` (second 3 mod 6) whose run has ended, after `plain` and
    // `late` have fired once, and early enough in its period to stop before the next slot.
    let deadline = Instant::now() + Duration::from_secs(25);
    let soon_slot = loop {
        ensure!(
            Instant::now() < deadline,
            "the jobs did not fire as scheduled within 25 s"
        );
        let soon = history(&master, "soon")?;
        let first_plain = history(&master, "plain")?.iter().filter_map(started).min();
        let first_late = history(&master, "late")?.iter().filter_map(started).min();
        let ready = soon.iter().find(|r| {
            r["ended"].is_string()
                && started(r).is_some_and(|s| {
                    first_plain.is_some_and(|p| p < s) && first_late.is_some_and(|l| l < s)
                })
        });
        if let Some(slot) = ready.and_then(started)
            && now() < (slot as f64) + 2.0
        {
            break slot;
        }
        sleep(Duration::from_millis(100));
    };
    ensure!(
        soon_slot.rem_euclid(PERIOD) == 3,
        "soon fired at second {} of its period",
        soon_slot.rem_euclid(PERIOD)
    );
    let missed_slot = soon_slot + 3; // `plain` and `late`
    let soon_missed = soon_slot + PERIOD;

    master.signal("TERM")?;
    let status = master.wait_exit(Duration::from_secs(20))?;
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
    // Only the engine must have stopped before the slot (the listeners may close after it);
    // a slot it fired anyway shows in the history checks below.
    let stopped_after = now() - soon_slot as f64;
    let back_at = missed_slot as f64 + BACK_AFTER;
    let wait = back_at - now();
    if wait > 0.0 {
        sleep(Duration::from_secs_f64(wait));
    }
    let relaunched = now();
    master.relaunch().context("starting sp-master again")?;
    let ready_after = now() - relaunched;

    // The start-up scan runs as the engine starts: poll its results within a bound.
    let deadline = Instant::now() + Duration::from_secs(10);
    let caught_up = loop {
        let soon = history(&master, "soon")?;
        let found = runs_within(&soon, soon_missed, soon_missed + PERIOD);
        if let Some(instance) = found.first() {
            ensure!(
                missed(&soon)
                    .iter()
                    .all(|(slot, _, _)| *slot != soon_missed),
                "soon's caught-up slot is also recorded as missed: {:?}",
                missed(&soon)
            );
            break instance.clone();
        }
        if Instant::now() > deadline {
            bail!(
                "soon's missed slot was not caught up (back {:.1} s after it); history {soon:?}",
                relaunched - soon_missed as f64
            );
        }
        sleep(Duration::from_millis(100));
    };
    for job in ["plain", "late"] {
        let rows = history(&master, job)?;
        ensure!(
            missed(&rows).contains(&(missed_slot, "master_down".to_owned(), 1)),
            "{job}: the slot the master was down for is not recorded as missed: {:?}",
            missed(&rows)
        );
        let late_runs = runs_within(&rows, missed_slot, missed_slot + PERIOD);
        ensure!(
            late_runs.is_empty(),
            "{job}: the missed slot was fired late: {late_runs:?}"
        );
    }
    let metrics = http::get_text(master.api, "/metrics")?;
    for job in ["plain", "late"] {
        let line =
            format!("saltpeter_missed_slots_total{{job_name=\"{job}\",reason=\"master_down\"}} 1");
        ensure!(
            metrics.lines().any(|l| l == line),
            "/metrics lacks {line:?}"
        );
    }
    ensure!(
        master.log().contains("Caught up a missed slot."),
        "the catch-up is not in the master's log"
    );
    // One signed `missed` notification for each of `plain` and `late`, none for `soon`.
    let got = hook.wait_for(2, Duration::from_secs(20));
    sleep(Duration::from_secs(1));
    let got = if hook.received().len() > got.len() {
        hook.received()
    } else {
        got
    };
    let mut heard: Vec<(String, String)> = got
        .iter()
        .map(|r| {
            let body: Value = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
            (
                body["event"].as_str().unwrap_or_default().to_owned(),
                body["job"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    heard.sort();
    ensure!(
        heard
            == [
                ("missed".to_owned(), "late".to_owned()),
                ("missed".to_owned(), "plain".to_owned())
            ],
        "webhook heard {heard:?}"
    );
    ensure!(
        got.iter().all(|r| r.signature_valid == Some(true)),
        "a missed notification's signature does not verify"
    );
    hook.stop();
    Ok(format!(
        "stopped {stopped_after:.1} s after soon's slot, down over one slot of each job; back {:.1} s after soon's slot (ready in {:.2} s): \
         soon caught it up as {caught_up}, late ({:.1} s, past its 3 s deadline) and plain \
         recorded it as missed (master_down) in the history and /metrics, and one signed \
         `missed` notification each; {:.1} s in all",
        relaunched - soon_missed as f64,
        ready_after,
        relaunched - missed_slot as f64,
        began.elapsed().as_secs_f64()
    ))
}
