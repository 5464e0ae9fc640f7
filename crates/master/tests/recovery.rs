//! Missed slots, catch-up and retries, on tokio's paused clock with the fake launcher. The
//! paused wall clock of every engine starts at 2026-06-01 12:00:00 UTC.

#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use saltpeter_engine::EngineEvent;
use saltpeter_proto::ErrorCode;
use saltpeter_store::MissedReason;
use serde_json::Value;
use support::*;
use time::OffsetDateTime;
use time::macros::datetime;
use tokio::time::sleep;

const SEC: Duration = Duration::from_secs(1);

/// A job file block firing on the given second and minute fields of every hour.
fn cron_job(name: &str, sec: &str, min: &str, extra: &str) -> String {
    format!(
        "{name}:\n  sec: '{sec}'\n  min: '{min}'\n  hour: '*'\n  dom: '*'\n  mon: '*'\n  dow: '*'\n  targets: [m1]\n  target_type: list\n  command: echo hi\n{extra}"
    )
}

fn ts(at: OffsetDateTime) -> String {
    saltpeter_proto::Timestamp::new(at).to_string()
}

/// The history rows that are missed slots, oldest first: (slot, reason, count).
fn missed(history: &[Value]) -> Vec<(String, String, u64)> {
    let mut rows: Vec<(String, String, u64)> = history
        .iter()
        .filter(|r| r.get("missed").is_some())
        .map(|r| {
            (
                r["started"].as_str().unwrap().to_owned(),
                r["missed"].as_str().unwrap().to_owned(),
                r["missed_count"].as_u64().unwrap(),
            )
        })
        .collect();
    rows.sort();
    rows
}

fn missed_events(events: &[EngineEvent]) -> Vec<(OffsetDateTime, MissedReason, u64)> {
    events
        .iter()
        .filter_map(|e| match e {
            EngineEvent::Missed {
                slot,
                reason,
                count,
                ..
            } => Some((*slot, *reason, *count)),
            _ => None,
        })
        .collect()
}

#[tokio::test(start_paused = true)]
async fn a_master_down_across_three_slots_records_three_missed_slots() {
    let data = tempfile::tempdir().unwrap();
    let yaml = cron_job("j", "30", "*/10", "");
    seed_last_fired(data.path(), "j", datetime!(2026-06-01 11:20:30 UTC));
    let h = Harness::restart(&yaml, data.path()).await;
    sleep(Duration::from_millis(10)).await;
    let slots = [
        datetime!(2026-06-01 11:30:30 UTC),
        datetime!(2026-06-01 11:40:30 UTC),
        datetime!(2026-06-01 11:50:30 UTC),
    ];
    assert_eq!(
        missed(&h.history("j").await),
        slots
            .iter()
            .map(|s| (ts(*s), "master_down".to_owned(), 1))
            .collect::<Vec<_>>()
    );
    assert_eq!(
        missed_events(&h.take_events()),
        slots
            .iter()
            .map(|s| (*s, MissedReason::MasterDown, 1))
            .collect::<Vec<_>>()
    );
    assert!(
        h.launcher.take_started().is_empty(),
        "no catch-up by default"
    );
    let query = saltpeter_store::TimelineQuery {
        start: datetime!(2026-06-01 11:00 UTC),
        end: datetime!(2026-06-01 12:00 UTC),
        job: Some("j".into()),
        limit: 100,
    };
    let timeline = h
        .engine
        .ask(|reply| {
            saltpeter_engine::ApiRequest::Ui(saltpeter_engine::UiRequest::Timeline { query, reply })
        })
        .await
        .unwrap();
    let kinds: Vec<(&str, Option<&str>, Option<i64>)> = timeline
        .iter()
        .map(|e| (e.msg_type, e.missed.as_deref(), e.ret_code))
        .collect();
    assert_eq!(kinds, vec![("missed", Some("master_down"), None); 3]);
    // The next slot is on time and fires as usual; nothing more is missed.
    sleep(31 * SEC).await;
    assert_eq!(h.launcher.take_started(), vec!["m1"]);
    assert!(missed_events(&h.take_events()).is_empty());
}

#[tokio::test(start_paused = true)]
async fn catch_up_last_fires_the_latest_missed_slot_within_the_starting_deadline() {
    let data = tempfile::tempdir().unwrap();
    // Slots at minute 50: 09:50, 10:50 and 11:50 were missed; 11:50 is 600 s old.
    let yaml = cron_job(
        "j",
        "0",
        "50",
        "  catch_up: last\n  starting_deadline: 900\n",
    );
    seed_last_fired(data.path(), "j", datetime!(2026-06-01 08:50 UTC));
    let h = Harness::restart(&yaml, data.path()).await;
    sleep(Duration::from_millis(10)).await;
    assert_eq!(h.launcher.take_started(), vec!["m1"], "11:50 is caught up");
    let history = h.history("j").await;
    assert_eq!(
        missed(&history),
        vec![
            (
                ts(datetime!(2026-06-01 09:50 UTC)),
                "master_down".to_owned(),
                1
            ),
            (
                ts(datetime!(2026-06-01 10:50 UTC)),
                "master_down".to_owned(),
                1
            ),
        ]
    );
    assert_eq!(history.len(), 3, "two missed slots and the caught-up run");
    assert!(
        h.take_events()
            .iter()
            .any(|e| matches!(e, EngineEvent::CaughtUp { slot, .. } if *slot == datetime!(2026-06-01 11:50 UTC)))
    );
}

#[tokio::test(start_paused = true)]
async fn catch_up_last_does_not_fire_a_slot_past_the_starting_deadline() {
    let data = tempfile::tempdir().unwrap();
    let yaml = cron_job(
        "j",
        "0",
        "50",
        "  catch_up: last\n  starting_deadline: 300\n",
    );
    seed_last_fired(data.path(), "j", datetime!(2026-06-01 08:50 UTC));
    let h = Harness::restart(&yaml, data.path()).await;
    sleep(Duration::from_millis(10)).await;
    assert!(h.launcher.take_started().is_empty(), "11:50 is 600 s old");
    assert_eq!(missed(&h.history("j").await).len(), 3);
}

#[tokio::test(start_paused = true)]
async fn recorded_missed_slots_are_capped_and_the_rest_summed_up() {
    let data = tempfile::tempdir().unwrap();
    // Every minute, down for twelve hours: 720 slots from 00:01 to 12:00.
    let yaml = cron_job("j", "0", "*", "  missed_limit: 5\n");
    seed_last_fired(data.path(), "j", datetime!(2026-06-01 00:00 UTC));
    let h = Harness::restart(&yaml, data.path()).await;
    sleep(Duration::from_millis(10)).await;
    let rows = missed(&h.history("j").await);
    assert_eq!(rows.len(), 6, "five slots and one summary: {rows:?}");
    assert_eq!(
        rows[0],
        (ts(datetime!(2026-06-01 00:01 UTC)), "master_down".into(), 1)
    );
    assert_eq!(
        rows[4],
        (ts(datetime!(2026-06-01 00:05 UTC)), "master_down".into(), 1)
    );
    assert_eq!(
        rows[5],
        (
            ts(datetime!(2026-06-01 00:06 UTC)),
            "master_down".into(),
            715
        )
    );
    let events = missed_events(&h.take_events());
    assert_eq!(events.len(), 6);
    assert_eq!(events.iter().map(|e| e.2).sum::<u64>(), 720);
}

#[tokio::test(start_paused = true)]
async fn a_slot_refused_for_overlap_is_recorded_as_missed() {
    let data = tempfile::tempdir().unwrap();
    let h = Harness::restart(&cron_job("j", "0", "*", ""), data.path()).await;
    // 12:01:00 fires; its wrapper keeps the run going past 12:02:00.
    sleep(Duration::from_millis(60_500)).await;
    assert_eq!(h.launcher.take_started(), vec!["m1"]);
    let instance = format!("j_{}", datetime!(2026-06-01 12:01 UTC).unix_timestamp());
    let mut w = h.wrapper(&instance, "m1").await;
    w.connect_and_start().await;
    for _ in 0..13 {
        sleep(5 * SEC).await;
        w.heartbeat().await;
    }
    assert!(h.launcher.take_started().is_empty());
    assert_eq!(
        missed(&h.history("j").await),
        vec![(ts(datetime!(2026-06-01 12:02 UTC)), "overlap".into(), 1)]
    );
    assert_eq!(
        missed_events(&h.take_events()),
        vec![(datetime!(2026-06-01 12:02 UTC), MissedReason::Overlap, 1)]
    );
}

#[tokio::test(start_paused = true)]
async fn a_stalled_master_records_the_slots_it_slept_through() {
    // Slots every ten minutes; the master is suspended from 12:00 to 12:35, so the scheduler
    // wakes to find 12:10 overdue, and 12:20 and 12:30 passed as well.
    let data = tempfile::tempdir().unwrap();
    let h = Harness::restart(&cron_job("j", "0", "*/10", ""), data.path()).await;
    sleep(Duration::from_millis(10)).await;
    tokio::time::advance(35 * 60 * SEC).await;
    sleep(Duration::from_millis(10)).await;
    assert!(
        h.launcher.take_started().is_empty(),
        "12:30 is five minutes old"
    );
    assert_eq!(
        missed(&h.history("j").await),
        ["12:10", "12:20", "12:30"]
            .iter()
            .map(|t| (
                format!("2026-06-01T{t}:00.000000+00:00"),
                "master_down".to_owned(),
                1
            ))
            .collect::<Vec<_>>()
    );
    // 12:40 is on time again.
    sleep(5 * 60 * SEC).await;
    assert_eq!(h.launcher.take_started(), vec!["m1"]);
}

#[tokio::test(start_paused = true)]
async fn after_a_stall_catch_up_last_fires_the_latest_slot() {
    let data = tempfile::tempdir().unwrap();
    let yaml = cron_job(
        "j",
        "0",
        "*/10",
        "  catch_up: last\n  starting_deadline: 600\n",
    );
    let h = Harness::restart(&yaml, data.path()).await;
    sleep(Duration::from_millis(10)).await;
    tokio::time::advance(35 * 60 * SEC).await;
    sleep(Duration::from_millis(10)).await;
    assert_eq!(h.launcher.take_started(), vec!["m1"], "12:30 is caught up");
    assert_eq!(missed(&h.history("j").await).len(), 2, "12:10 and 12:20");
}

/// Starts `job`'s run, and returns its instance.
async fn fire(h: &Harness) -> String {
    let instance = h.run("j").await;
    assert_eq!(h.launcher.take_started(), vec!["m1"]);
    instance
}

/// Waits out a 10 s retry delay and checks that the machine was launched again.
async fn next_attempt(h: &Harness, instance: &str) -> FakeWrapper {
    sleep(10 * SEC + Duration::from_millis(1)).await;
    assert_eq!(h.launcher.take_started(), vec!["m1"], "relaunched");
    let mut w = h.wrapper(instance, "m1").await;
    w.connect_and_start().await;
    w
}

/// `retry_delay: 0` launches the next attempt at once: the retry is due when it is armed.
#[tokio::test(start_paused = true)]
async fn a_zero_retry_delay_relaunches_at_once() {
    let h = Harness::start(&job("j", "[m1]", "  retries: 1\n  retry_delay: 0\n")).await;
    let instance = fire(&h).await;
    let mut w = h.wrapper(&instance, "m1").await;
    w.connect_and_start().await;
    w.complete(3).await;
    sleep(Duration::from_millis(1)).await;
    assert_eq!(h.launcher.take_started(), vec!["m1"], "relaunched at once");
    let mut w = h.wrapper(&instance, "m1").await;
    w.connect_and_start().await;
    w.complete(3).await;
    let m = h.machine(&instance, "m1").await;
    assert_eq!(
        (m["attempt"].as_u64(), m["retcode"].as_i64()),
        (Some(2), Some(3))
    );
    assert_eq!(h.run_view(&instance).await["success"], false);
}

#[tokio::test(start_paused = true)]
async fn retries_stop_after_n_with_attempts_numbered_in_the_history() {
    let h = Harness::start(&job("j", "[m1]", "  retries: 2\n  retry_delay: 10\n")).await;
    let instance = fire(&h).await;
    let mut w = h.wrapper(&instance, "m1").await;
    w.connect_and_start().await;
    w.complete(1).await;
    assert_eq!(h.machine(&instance, "m1").await["attempt"], 2);
    assert_eq!(h.run_view(&instance).await["ended"], Value::Null);
    let mut w = next_attempt(&h, &instance).await;
    w.complete(1).await;
    let mut w = next_attempt(&h, &instance).await;
    w.complete(1).await;
    sleep(60 * SEC).await;
    assert!(
        h.launcher.take_started().is_empty(),
        "exactly three attempts"
    );
    for run in [h.run_view(&instance).await, h.stored_run(&instance).await] {
        assert_eq!(run["success"], false);
        let m = &run["machines"]["m1"];
        assert_eq!(m["attempt"], 3);
        assert_eq!(m["retcode"], 1);
        let earlier: Vec<(u64, i64)> = m["attempts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| {
                (
                    a["attempt"].as_u64().unwrap(),
                    a["retcode"].as_i64().unwrap(),
                )
            })
            .collect();
        assert_eq!(earlier, vec![(1, 1), (2, 1)]);
    }
    let retries: Vec<u32> = h
        .take_events()
        .iter()
        .filter_map(|e| match e {
            EngineEvent::Retry { next, max, .. } => Some(*next * 10 + *max),
            _ => None,
        })
        .collect();
    assert_eq!(retries, vec![23, 33]);
    // The dashboard's view says "attempt 3/3".
    let query = saltpeter_engine::RunOutputQuery {
        instance: instance.clone(),
        from: Default::default(),
        machine: None,
        max_bytes: 0,
    };
    let live = h
        .engine
        .ask(|reply| {
            saltpeter_engine::ApiRequest::Ui(saltpeter_engine::UiRequest::RunOutput {
                query,
                reply,
            })
        })
        .await
        .unwrap()
        .unwrap();
    let live = serde_json::to_value(live).unwrap();
    assert_eq!(live["machines"]["m1"]["attempt"], 3);
    assert_eq!(live["machines"]["m1"]["max_attempts"], 3);
}

#[tokio::test(start_paused = true)]
async fn a_kill_143_is_never_retried_by_default() {
    let h = Harness::start(&job("j", "[m1, m2]", "  retries: 2\n  retry_delay: 10\n")).await;
    let instance = h.run("j").await;
    let mut started = h.launcher.take_started();
    started.sort();
    assert_eq!(started, vec!["m1", "m2"]);
    let mut w1 = h.wrapper(&instance, "m1").await;
    let mut w2 = h.wrapper(&instance, "m2").await;
    w1.connect_and_start().await;
    w2.connect_and_start().await;
    w1.complete(1).await;
    w2.complete_with(143, "killed").await;
    sleep(10 * SEC + Duration::from_millis(1)).await;
    assert_eq!(
        h.launcher.take_started(),
        vec!["m1"],
        "only the exit 1 is retried"
    );
    let run = h.run_view(&instance).await;
    assert_eq!(run["machines"]["m2"]["retcode"], 143);
    assert_eq!(run["machines"]["m2"]["attempt"], 1);
    assert_eq!(run["machines"]["m1"]["attempt"], 2);
}

#[tokio::test(start_paused = true)]
async fn an_operators_kill_stops_retries_even_when_143_is_listed() {
    let h = Harness::start(&job(
        "j",
        "[m1]",
        "  retries: 3\n  retry_delay: 10\n  retry_on: [exit, 143]\n",
    ))
    .await;
    let instance = fire(&h).await;
    let mut w = h.wrapper(&instance, "m1").await;
    w.connect_and_start().await;
    // Killed on the machine, not by an operator: 143 is listed, so it is retried.
    w.complete_with(143, "killed").await;
    let mut w = next_attempt(&h, &instance).await;
    h.kill(&instance).await;
    assert!(w.saw_kill());
    w.complete_with(143, "killed").await;
    sleep(30 * SEC).await;
    assert!(
        h.launcher.take_started().is_empty(),
        "no attempt after the kill"
    );
    let run = h.run_view(&instance).await;
    assert_eq!(run["machines"]["m1"]["retcode"], 143);
    assert_eq!(run["machines"]["m1"]["attempt"], 2);
    assert_ne!(run["ended"], Value::Null);
}

#[tokio::test(start_paused = true)]
async fn a_machine_that_succeeds_on_its_second_attempt_ends_the_run_with_0() {
    let h = Harness::start(&job("j", "[m1]", "  retries: 3\n  retry_delay: 10\n")).await;
    let instance = fire(&h).await;
    let mut w = h.wrapper(&instance, "m1").await;
    w.connect_and_start().await;
    w.complete(1).await;
    let mut w = next_attempt(&h, &instance).await;
    w.complete(0).await;
    sleep(60 * SEC).await;
    assert!(h.launcher.take_started().is_empty());
    let run = h.run_view(&instance).await;
    assert_eq!(run["success"], true);
    assert_eq!(run["machines"]["m1"]["retcode"], 0);
    assert_eq!(run["machines"]["m1"]["attempt"], 2);
}

#[tokio::test(start_paused = true)]
async fn the_final_result_is_the_last_attempts_and_a_late_wrapper_cannot_change_it() {
    let h = Harness::start(&job("j", "[m1]", "  retries: 1\n  retry_delay: 10\n")).await;
    let instance = fire(&h).await;
    let mut first = h.wrapper(&instance, "m1").await;
    first.connect_and_start().await;
    let first_token = first.token.clone();
    first.complete(1).await;
    let mut second = next_attempt(&h, &instance).await;
    // The first attempt's wrapper speaks again: on its old connection, and on a new one with
    // its old credential. Neither is heard.
    first.send_connect().await;
    assert_eq!(first.error_code().await, Some(ErrorCode::Unauthorized));
    let mut stale = h.wrapper(&instance, "m1").await;
    stale.token = first_token;
    stale.send_connect().await;
    assert_eq!(stale.error_code().await, Some(ErrorCode::Unauthorized));
    second.complete(3).await;
    let run = h.run_view(&instance).await;
    assert_eq!(run["machines"]["m1"]["retcode"], 3);
    assert_eq!(run["machines"]["m1"]["attempt"], 2);
    assert_eq!(run["success"], false);
}

#[tokio::test(start_paused = true)]
async fn a_machine_waiting_for_its_retry_is_killed_before_it_starts() {
    let h = Harness::start(&job("j", "[m1]", "  retries: 2\n  retry_delay: 10\n")).await;
    let instance = fire(&h).await;
    let mut w = h.wrapper(&instance, "m1").await;
    w.connect_and_start().await;
    w.complete(1).await;
    h.kill(&instance).await;
    sleep(30 * SEC).await;
    assert!(h.launcher.take_started().is_empty());
    let run = h.run_view(&instance).await;
    assert_eq!(run["machines"]["m1"]["retcode"], 143);
    assert_ne!(run["ended"], Value::Null);
}

const MINIMAL: &str = "  min: 0\n  hour: '*'\n  dom: '*'\n  mon: '*'\n  dow: '*'\n  targets: 'web*'\n  command: 'true'\n  wrapper_path: /usr/local/bin/sp-wrapper\n";

/// Loads a directory holding one `jobs.yaml`; returns the config and its error lines.
fn load_jobs(text: &str) -> (saltpeter_config::Config, Vec<String>, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("jobs.yaml");
    std::fs::write(&path, text).unwrap();
    let config = saltpeter_config::Config::load(dir.path());
    let errors = config
        .problems
        .iter()
        .filter(|p| p.is_error())
        .map(ToString::to_string)
        .collect();
    (config, errors, path)
}

#[test]
fn the_recovery_keys_are_read_and_default_to_the_original_behaviour() {
    use saltpeter_config::recovery::{CatchUp, RetryCause, RetryOn};
    let (config, errors, _) = load_jobs(&format!(
        "plain:\n{MINIMAL}tuned:\n{MINIMAL}  catch_up: last\n  starting_deadline: 120\n  \
         missed_limit: 7\n  retries: 3\n  retry_delay: 5\n  retry_on: [timeout, exit, 42]\n"
    ));
    assert!(errors.is_empty(), "{errors:?}");
    let plain = &config.job("plain").unwrap().recovery;
    assert_eq!(plain.catch_up, CatchUp::None);
    assert_eq!(plain.retries, 0);
    assert_eq!(plain.retry_on, RetryOn::AnyFailure);
    assert_eq!(plain.missed_limit, 100);
    let tuned = &config.job("tuned").unwrap().recovery;
    assert_eq!(tuned.catch_up, CatchUp::Last);
    assert_eq!(tuned.starting_deadline, Duration::from_secs(120));
    assert_eq!(tuned.missed_limit, 7);
    assert_eq!(tuned.retries, 3);
    assert_eq!(tuned.retry_delay, Duration::from_secs(5));
    assert_eq!(
        tuned.retry_on,
        RetryOn::Listed(vec![
            RetryCause::Exit,
            RetryCause::Code(42),
            RetryCause::Code(124)
        ])
    );
    // No "unknown key" warnings for the new keys.
    assert!(
        config
            .problems
            .iter()
            .all(|p| p.key.as_deref() != Some("retries"))
    );
}

#[test]
fn bad_recovery_values_skip_the_job_with_file_and_line() {
    let (config, errors, path) = load_jobs(&format!(
        "a:\n{MINIMAL}  retries: 11\nb:\n{MINIMAL}  catch_up: always\nc:\n{MINIMAL}  \
         retry_on: [exit, sometimes]\nd:\n{MINIMAL}  starting_deadline: 0\n"
    ));
    for job in ["a", "b", "c", "d"] {
        assert!(config.job(job).is_none(), "{job} must be skipped");
    }
    let p = path.display();
    for expected in [
        format!("{p}:10: job \"a\": key \"retries\": expected 0 to 10, got 11"),
        format!("{p}:20: job \"b\": key \"catch_up\": expected none or last, got \"always\""),
        format!(
            "{p}:30: job \"c\": key \"retry_on\": expected exit, no_heartbeat, not_started, timeout, error, killed or an exit code from 1 to 255, got \"sometimes\""
        ),
        format!("{p}:40: job \"d\": key \"starting_deadline\": expected 1 to 86400 seconds, got 0"),
    ] {
        assert!(errors.contains(&expected), "{expected}\nnot in {errors:?}");
    }
}

proptest::proptest! {
    #[test]
    fn any_retries_value_loads_without_panicking(n in proptest::prelude::any::<i64>()) {
        let (config, errors, _) = load_jobs(&format!("a:\n{MINIMAL}  retries: {n}\n"));
        let loaded = config.job("a").map(|j| j.recovery.retries);
        if (0..=10).contains(&n) {
            proptest::prop_assert_eq!(loaded, Some(n as u32));
        } else {
            proptest::prop_assert_eq!(loaded, None);
            proptest::prop_assert!(
                errors.iter().any(|e| e.contains("key \"retries\"")),
                "{:?}",
                errors
            );
        }
    }
}

#[tokio::test(start_paused = true)]
async fn after_a_restart_the_current_attempt_resumes_with_its_own_sequence() {
    let data = tempfile::tempdir().unwrap();
    let yaml = job("j", "[m1]", "  retries: 1\n  retry_delay: 10\n");
    let (instance, token) = {
        let h = Harness::restart(&yaml, data.path()).await;
        let instance = fire(&h).await;
        let mut first = h.wrapper(&instance, "m1").await;
        first.connect_and_start().await;
        assert_eq!(first.output(0, "one ").await, Reply::Ack(0));
        assert_eq!(first.output(1, "two ").await, Reply::Ack(1));
        first.complete(1).await;
        sleep(10 * SEC + Duration::from_millis(1)).await;
        assert_eq!(h.launcher.take_started(), vec!["m1"]);
        let mut second = h.wrapper(&instance, "m1").await;
        assert_eq!(
            second.connect().await,
            Some(-1),
            "a new attempt holds nothing yet"
        );
        second.start().await;
        assert_eq!(second.output(0, "three").await, Reply::Ack(0));
        (instance, second.token.clone())
        // The engine is dropped here: the "crash".
    };
    let h = Harness::restart(&yaml, data.path()).await;
    let mut second = h.wrapper(&instance, "m1").await;
    second.token = token;
    assert_eq!(
        second.connect().await,
        Some(0),
        "the second attempt's own sequence, not the first's"
    );
    assert_eq!(second.output(1, " four").await, Reply::Ack(1));
    second.complete(0).await;
    let run = h.run_view(&instance).await;
    assert_eq!(run["machines"]["m1"]["attempt"], 2);
    assert_eq!(run["machines"]["m1"]["retcode"], 0);
    let output = run["machines"]["m1"]["output"].as_str().unwrap();
    assert!(output.ends_with("three four"), "{output:?}");
}

/// A machine that was waiting for its next attempt when the master stopped gets it as soon as
/// the master is back.
#[tokio::test(start_paused = true)]
async fn a_retry_pending_at_a_restart_is_launched_when_the_master_is_back() {
    let data = tempfile::tempdir().unwrap();
    let yaml = job("j", "[m1]", "  retries: 1\n  retry_delay: 600\n");
    let instance = {
        let h = Harness::restart(&yaml, data.path()).await;
        let instance = fire(&h).await;
        let mut first = h.wrapper(&instance, "m1").await;
        first.connect_and_start().await;
        first.complete(1).await;
        assert_eq!(h.machine(&instance, "m1").await["attempt"], 2);
        instance
        // The engine is dropped here, long before the retry is due.
    };
    let h = Harness::restart(&yaml, data.path()).await;
    sleep(Duration::from_millis(1)).await;
    assert_eq!(
        h.launcher.take_started(),
        vec!["m1"],
        "relaunched on restart"
    );
    let mut second = h.wrapper(&instance, "m1").await;
    second.connect_and_start().await;
    second.complete(0).await;
    let m = h.machine(&instance, "m1").await;
    assert_eq!(
        (m["attempt"].as_u64(), m["retcode"].as_i64()),
        (Some(2), Some(0))
    );
}

/// The whole wiring (`server::start`, real clock): the slots a stopped master passed over are
/// counted into `/metrics` by the consumer of the engine's events.
#[tokio::test]
async fn the_server_counts_missed_slots_into_metrics() {
    let yaml = cron_job("j", "0", "*", "");
    let ten_minutes_ago = OffsetDateTime::now_utc() - time::Duration::minutes(10);
    let (r, _launcher, _dir) = start_server_after("", &yaml, |data| {
        seed_last_fired(data, "j", ten_minutes_ago);
    })
    .await;
    let prefix = "saltpeter_missed_slots_total{job_name=\"j\",reason=\"master_down\"} ";
    let mut counted = None;
    // The start-up scan runs on the engine's thread just after start: poll, within a bound.
    for _ in 0..100 {
        let text = raw::request(r.api_addr, "GET", "/metrics", &[]).await.body;
        counted = text
            .lines()
            .find_map(|l| l.strip_prefix(prefix))
            .and_then(|n| n.parse::<u64>().ok());
        if counted.is_some() {
            break;
        }
        sleep(Duration::from_millis(50)).await;
    }
    // The ten minutes before the test's clock reading hold ten slots at second 0; one more
    // passes if a minute turns before the engine's scan reads the clock.
    let counted = counted.expect("the missed slots are counted");
    assert!((10..=11).contains(&counted), "{counted}");
    r.stop().await;
}
