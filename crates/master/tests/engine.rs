//! The engine's rules under tokio's paused clock: fake launcher, fake wrappers speaking to the
//! engine through its event channel, no sockets and no processes. Every monitor rule of the
//! seed document is checked at its exact boundary, including wrappers whose own clocks are an
//! hour off.

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

mod support;

use std::time::Duration;

use saltpeter_proto::{AckType, ErrorCode, MasterMessage};
use support::*;
use tokio::time::sleep;

const SEC: Duration = Duration::from_secs(1);

#[tokio::test(start_paused = true)]
async fn a_silent_wrapper_is_marked_253_exactly_15_s_after_its_last_heartbeat() {
    let h = Harness::start(&job("j", "[m1]", "")).await;
    let instance = h.run("j").await;
    let mut w = h.wrapper(&instance, "m1").await;
    w.connect_and_start().await;
    for _ in 0..4 {
        sleep(5 * SEC).await;
        w.heartbeat().await;
    }
    // Last heartbeat at t=20 s; the verdict is due at t=35 s.
    sleep(Duration::from_millis(14_900)).await;
    assert_eq!(h.machine(&instance, "m1").await["status"], "running");
    sleep(Duration::from_millis(200)).await;
    let m = h.machine(&instance, "m1").await;
    assert_eq!(m["retcode"], 253);
    assert_eq!(m["cause"], "heartbeat_lost");
    assert!(
        m["output"]
            .as_str()
            .unwrap()
            .contains("[SALTPETER ERROR: Job lost connection - no heartbeat for 15 seconds]")
    );
    assert!(
        h.job_summary("j").await["running"]
            .as_array()
            .unwrap()
            .is_empty()
    );
}

#[tokio::test(start_paused = true)]
async fn the_engine_keeps_serving_after_the_config_watcher_stops() {
    let mut h = Harness::start(&job("j", "[m1]", "")).await;
    h.close_config();
    // Give the engine a turn to see the closed channel.
    sleep(SEC).await;
    let instance = tokio::time::timeout(10 * SEC, h.run("j"))
        .await
        .expect("the engine answers after its config channel closed");
    let mut w = h.wrapper(&instance, "m1").await;
    w.connect_and_start().await;
    w.complete(0).await;
    assert_eq!(h.machine(&instance, "m1").await["retcode"], 0);
}

#[tokio::test(start_paused = true)]
async fn heartbeats_keep_a_long_job_alive_without_any_timeout() {
    let h = Harness::start(&job("j", "[m1]", "  timeout: 0\n")).await;
    let instance = h.run("j").await;
    let mut w = h.wrapper(&instance, "m1").await;
    w.connect_and_start().await;
    for _ in 0..(3600 / 5) {
        sleep(5 * SEC).await;
        w.heartbeat().await;
    }
    assert_eq!(h.machine(&instance, "m1").await["status"], "running");
    w.complete(0).await;
    let run = h.run_view(&instance).await;
    assert_eq!(run["machines"]["m1"]["retcode"], 0);
    assert_eq!(run["success"], true);
}

#[tokio::test(start_paused = true)]
async fn a_wrapper_clock_an_hour_off_changes_nothing() {
    for skew in [-3600i64, 3600] {
        let h = Harness::start(&job("j", "[alive, dead]", "")).await;
        let instance = h.run("j").await;
        let mut alive = h.wrapper(&instance, "alive").await;
        let mut dead = h.wrapper(&instance, "dead").await;
        alive.skew = skew;
        dead.skew = skew;
        alive.connect_and_start().await;
        dead.connect_and_start().await;
        for _ in 0..12 {
            sleep(5 * SEC).await;
            alive.heartbeat().await;
        }
        // 60 s in: the beating wrapper is alive whatever its clock says, the silent one was
        // marked at exactly 15 s.
        assert_eq!(
            h.machine(&instance, "alive").await["status"],
            "running",
            "skew {skew}"
        );
        let d = h.machine(&instance, "dead").await;
        assert_eq!(d["retcode"], 253, "skew {skew}");
    }
}

#[tokio::test(start_paused = true)]
async fn output_alone_does_not_count_as_a_heartbeat() {
    let h = Harness::start(&job("j", "[m1]", "")).await;
    let instance = h.run("j").await;
    let mut w = h.wrapper(&instance, "m1").await;
    w.connect_and_start().await;
    for seq in 0..20 {
        sleep(SEC).await;
        w.output(seq, "still printing\n").await;
    }
    assert_eq!(h.machine(&instance, "m1").await["retcode"], 253);
}

#[tokio::test(start_paused = true)]
async fn no_start_within_30_s_gives_254() {
    let h = Harness::start(&job("j", "[m1]", "")).await;
    let instance = h.run("j").await;
    sleep(Duration::from_millis(29_900)).await;
    assert_eq!(h.machine(&instance, "m1").await["status"], "pending");
    sleep(Duration::from_millis(200)).await;
    let m = h.machine(&instance, "m1").await;
    assert_eq!(m["retcode"], 254);
    assert!(
        m["output"]
            .as_str()
            .unwrap()
            .contains("Wrapper failed to connect within 30s")
    );
}

#[tokio::test(start_paused = true)]
async fn a_failed_launch_fails_only_its_own_machine_at_once() {
    let h = Harness::start(&job("j", "[good, broken]", "")).await;
    h.launcher
        .fail("broken", "Exit code 1\nSTDERR: no such user: ghost");
    let instance = h.run("j").await;
    let mut w = h.wrapper(&instance, "good").await;
    sleep(Duration::from_millis(100)).await;
    let b = h.machine(&instance, "broken").await;
    assert_eq!(b["retcode"], 254);
    assert!(
        b["output"]
            .as_str()
            .unwrap()
            .contains("no such user: ghost"),
        "{b}"
    );
    // The healthy machine is untouched (D-33) and can still start late.
    sleep(10 * SEC).await;
    w.connect_and_start().await;
    w.complete(0).await;
    assert_eq!(h.machine(&instance, "good").await["retcode"], 0);
}

#[tokio::test(start_paused = true)]
async fn no_complete_by_timeout_plus_30_s_gives_124() {
    let h = Harness::start(&job("j", "[m1]", "  timeout: 10\n")).await;
    let instance = h.run("j").await;
    let mut w = h.wrapper(&instance, "m1").await;
    w.connect_and_start().await;
    for _ in 0..7 {
        sleep(5 * SEC).await;
        w.heartbeat().await;
    }
    // t = 35 s; 124 is due at launch + 10 + 30 = 40 s.
    sleep(4 * SEC).await;
    assert_eq!(h.machine(&instance, "m1").await["status"], "running");
    w.heartbeat().await;
    sleep(2 * SEC).await;
    let m = h.machine(&instance, "m1").await;
    assert_eq!(m["retcode"], 124);
    assert_eq!(m["cause"], "master_timeout");
    // The wrapper is told to stop the job as well.
    assert!(w.saw_kill(), "no kill sent on the master's timeout");
}

#[tokio::test(start_paused = true)]
async fn a_kill_is_repeated_and_becomes_143_after_30_s_without_complete() {
    let h = Harness::start(&job("j", "[m1]", "")).await;
    let instance = h.run("j").await;
    let mut w = h.wrapper(&instance, "m1").await;
    w.connect_and_start().await;
    h.kill(&instance).await;
    for _ in 0..6 {
        sleep(5 * SEC).await;
        w.heartbeat().await;
    }
    assert!(w.kills() >= 10, "kill sent {} times in 30 s", w.kills());
    sleep(SEC).await;
    let run = h.run_view(&instance).await;
    let m = &run["machines"]["m1"];
    assert_eq!(m["retcode"], 143);
    assert_eq!(m["cause"], "kill_unconfirmed");
    assert!(
        m["output"]
            .as_str()
            .unwrap()
            .contains("grace period expired after 30s")
    );
    assert_eq!(run["success"], false);
}

#[tokio::test(start_paused = true)]
async fn a_confirmed_kill_reaches_every_machine_even_unconnected_ones() {
    let h = Harness::start(&job("j", "[m1, m2]", "")).await;
    let instance = h.run("j").await;
    let mut w1 = h.wrapper(&instance, "m1").await;
    w1.connect_and_start().await;
    h.kill(&instance).await;
    assert!(w1.saw_kill());
    w1.complete_with(143, "killed").await;
    // m2 connects only now: it is told to stop straight away.
    let mut w2 = h.wrapper(&instance, "m2").await;
    w2.connect().await;
    assert!(
        w2.saw_kill(),
        "a machine that connects after the kill must be told"
    );
    w2.complete_with(143, "killed").await;
    let run = h.run_view(&instance).await;
    assert_eq!(run["machines"]["m1"]["retcode"], 143);
    assert_eq!(run["machines"]["m2"]["retcode"], 143);
    assert_eq!(
        run["success"], false,
        "a killed run never counts as a success"
    );
}

#[tokio::test(start_paused = true)]
async fn a_late_complete_is_kept_beside_the_verdict() {
    let h = Harness::start(&job("j", "[m1]", "")).await;
    let instance = h.run("j").await;
    let mut w = h.wrapper(&instance, "m1").await;
    w.connect_and_start().await;
    sleep(16 * SEC).await;
    assert_eq!(h.machine(&instance, "m1").await["retcode"], 253);
    w.complete(0).await;
    let m = h.machine(&instance, "m1").await;
    assert_eq!(m["retcode"], 253);
    assert_eq!(m["late_retcode"], 0);
}

#[tokio::test(start_paused = true)]
async fn sequence_state_survives_reconnects() {
    let h = Harness::start(&job("j", "[m1]", "")).await;
    let instance = h.run("j").await;
    let mut w = h.wrapper(&instance, "m1").await;
    w.connect_and_start().await;
    assert_eq!(w.output(0, "a").await, Reply::Ack(0));
    assert_eq!(w.output(1, "b").await, Reply::Ack(1));
    assert_eq!(
        w.output(1, "b").await,
        Reply::Ack(1),
        "a duplicate is acked again"
    );
    assert_eq!(
        w.output(5, "x").await,
        Reply::Nack {
            expected: 2,
            received: 5
        }
    );
    // A new socket: the connect ack says where to resume.
    let mut again = h.wrapper(&instance, "m1").await;
    assert_eq!(again.connect().await, Some(1));
    assert_eq!(again.output(2, "c").await, Reply::Ack(2));
    again.complete(0).await;
    assert_eq!(h.machine(&instance, "m1").await["output"], "abc");
}

#[tokio::test(start_paused = true)]
async fn a_disconnect_alone_does_not_fail_a_machine() {
    let h = Harness::start(&job("j", "[m1]", "")).await;
    let instance = h.run("j").await;
    let mut w = h.wrapper(&instance, "m1").await;
    w.connect_and_start().await;
    w.disconnect().await;
    sleep(10 * SEC).await;
    let mut back = h.wrapper(&instance, "m1").await;
    back.connect().await;
    back.heartbeat().await;
    sleep(10 * SEC).await;
    assert_eq!(h.machine(&instance, "m1").await["status"], "running");
}

#[tokio::test(start_paused = true)]
async fn tokens_are_checked_and_legacy_wrappers_need_permission() {
    let h = Harness::start(&job("j", "[m1]", "")).await;
    let instance = h.run("j").await;
    let mut w = h.wrapper(&instance, "m1").await;
    w.token = Some("not-the-token".into());
    w.send_connect().await;
    assert_eq!(w.error_code().await, Some(ErrorCode::Unauthorized));
    let mut legacy = h.wrapper(&instance, "m1").await;
    legacy.token = None;
    legacy.send_connect().await;
    assert_eq!(legacy.error_code().await, Some(ErrorCode::Unauthorized));
    // A legacy wrapper that skips connect (as the original does after a reconnect) too.
    let mut skipper = h.wrapper(&instance, "m1").await;
    skipper.send_heartbeat().await;
    assert_eq!(skipper.error_code().await, Some(ErrorCode::Unauthorized));

    let h = Harness::start(&format!("{}{}", legacy_settings(), job("j", "[m1]", ""))).await;
    let instance = h.run("j").await;
    let mut legacy = h.wrapper(&instance, "m1").await;
    legacy.token = None;
    assert_eq!(legacy.connect().await, Some(-1));
    legacy.start().await;
    assert_eq!(legacy.output(0, "old wrapper\n").await, Reply::Ack(0));
    legacy.complete(0).await;
    assert_eq!(h.machine(&instance, "m1").await["retcode"], 0);
}

#[tokio::test(start_paused = true)]
async fn unknown_instances_get_job_not_found() {
    let h = Harness::start(&job("j", "[m1]", "")).await;
    let mut w = h.wrapper("j_1", "m1").await;
    w.send_connect().await;
    assert_eq!(w.error_code().await, Some(ErrorCode::JobNotFound));
}

#[tokio::test(start_paused = true)]
async fn overlap_is_refused_unless_the_magic_words_are_given() {
    let h = Harness::start(&job("j", "[m1]", "")).await;
    h.run("j").await;
    assert!(h.try_run("j").await.is_err());
    assert_eq!(h.job_summary("j").await["overlap"], true);
    let h = Harness::start(&job(
        "j",
        "[m1]",
        "  allow_overlap: i know what i am doing!\n",
    ))
    .await;
    let a = h.run("j").await;
    let b = h.run("j").await;
    assert_ne!(a, b, "two runs in the same second get distinct ids");
}

#[tokio::test(start_paused = true)]
async fn batches_run_one_after_another() {
    let h = Harness::start(&job("j", "[m1, m2, m3]", "  batch_size: 1\n")).await;
    let instance = h.run("j").await;
    let mut order = Vec::new();
    for _ in 0..3 {
        sleep(Duration::from_millis(10)).await;
        let launched = h.launcher.take_started();
        assert_eq!(launched.len(), 1, "one machine per batch: {launched:?}");
        let name = launched[0].clone();
        let mut w = h.wrapper(&instance, &name).await;
        w.connect_and_start().await;
        sleep(3 * SEC).await;
        w.complete(0).await;
        order.push(name);
    }
    order.sort();
    assert_eq!(order, ["m1", "m2", "m3"]);
    assert_eq!(h.run_view(&instance).await["success"], true);
}

#[tokio::test(start_paused = true)]
async fn number_of_targets_picks_that_many() {
    let h = Harness::start(&job("j", "[m1, m2, m3, m4]", "  number_of_targets: 2\n")).await;
    let instance = h.run("j").await;
    sleep(Duration::from_millis(10)).await;
    let run = h.run_view(&instance).await;
    assert_eq!(run["machines"].as_object().unwrap().len(), 2);
}

#[tokio::test(start_paused = true)]
async fn maintenance_machines_are_skipped_and_global_maintenance_blocks_runs() {
    let cfg = format!(
        "saltpeter_maintenance:\n  machines: [m2]\n{}",
        job("j", "[m1, m2]", "")
    );
    let h = Harness::start(&cfg).await;
    let instance = h.run("j").await;
    sleep(Duration::from_millis(10)).await;
    let run = h.run_view(&instance).await;
    assert!(run["machines"]["m2"].is_null());
    assert_eq!(run["maintenance"][0], "m2");
    let cfg = format!(
        "saltpeter_maintenance:\n  global: true\n{}",
        job("j", "[m1]", "")
    );
    let h = Harness::start(&cfg).await;
    assert!(h.try_run("j").await.is_err());
}

#[tokio::test(start_paused = true)]
async fn the_wrapper_gets_the_environment_salt_would_pass() {
    let h = Harness::start(&job(
        "j",
        "[m1]",
        "  user: nobody\n  cwd: /tmp\n  timeout: 77\n  env:\n    FOO: bar\n    SP_COMMAND: hijack\n",
    ))
    .await;
    let instance = h.run("j").await;
    sleep(Duration::from_millis(10)).await;
    let env = h.launcher.last_env();
    let get = |k: &str| env.iter().find(|(key, _)| key == k).map(|(_, v)| v.clone());
    assert_eq!(get("SP_JOB_NAME").as_deref(), Some("j"));
    assert_eq!(get("SP_JOB_INSTANCE").as_deref(), Some(instance.as_str()));
    assert_eq!(
        get("SP_COMMAND").as_deref(),
        Some("echo hi"),
        "job env must not override SP_COMMAND"
    );
    assert_eq!(get("SP_USER").as_deref(), Some("nobody"));
    assert_eq!(get("SP_CWD").as_deref(), Some("/tmp"));
    assert_eq!(get("SP_TIMEOUT").as_deref(), Some("77"));
    assert_eq!(get("FOO").as_deref(), Some("bar"));
    // The local launcher's machines each get their own token, never the run's secret.
    assert_eq!(get("SP_RUN_TOKEN"), None);
    assert_eq!(h.launcher.token_for("m1").map(|t| t.len()), Some(64));
    let _ = AckType::Connect;
    let _: Option<MasterMessage> = None;
}

#[tokio::test(start_paused = true)]
async fn every_slot_fires_exactly_once() {
    let every_second = "every:\n  sec: '*'\n  min: '*'\n  hour: '*'\n  dom: '*'\n  mon: '*'\n  dow: '*'\n  targets: [m1]\n  target_type: list\n  command: echo hi\n  allow_overlap: i know what i am doing!\n";
    let h = Harness::start(every_second).await;
    // The paused wall clock starts at 12:00:00.000; slots at 12:00:01 .. 12:00:10 fall due.
    sleep(Duration::from_millis(10_500)).await;
    let fired = h.launcher.take_started().len();
    assert_eq!(fired, 10, "ten one-second slots must fire ten times");
}

#[tokio::test(start_paused = true)]
async fn after_a_restart_machines_get_fresh_deadlines_and_kills_survive() {
    let data = tempfile::tempdir().unwrap();
    let yaml = job("j", "[m1, m2]", "");
    let (instance, tokens) = {
        let h = Harness::restart(&yaml, data.path()).await;
        let instance = h.run("j").await;
        let mut w1 = h.wrapper(&instance, "m1").await;
        let mut w2 = h.wrapper(&instance, "m2").await;
        w1.connect_and_start().await;
        w2.connect_and_start().await;
        assert_eq!(w1.output(0, "before ").await, Reply::Ack(0));
        h.kill_machine(&instance, "m2").await;
        let tokens = (w1.token.clone(), w2.token.clone());
        (instance, tokens)
        // The engine is dropped here: the "crash".
    };
    // Down far longer than the heartbeat timeout.
    sleep(60 * SEC).await;
    let h = Harness::restart(&yaml, data.path()).await;
    sleep(14 * SEC).await;
    assert_eq!(
        h.machine(&instance, "m1").await["status"],
        "running",
        "no 253 for downtime"
    );
    let mut w1 = h.wrapper(&instance, "m1").await;
    w1.token = tokens.0.clone();
    assert_eq!(
        w1.connect().await,
        Some(0),
        "resumes after the durable output"
    );
    assert_eq!(w1.output(1, "after").await, Reply::Ack(1));
    let mut w2 = h.wrapper(&instance, "m2").await;
    w2.token = tokens.1;
    w2.connect().await;
    assert!(
        w2.saw_kill(),
        "the kill requested before the crash is sent again"
    );
    w2.complete_with(143, "killed").await;
    w1.complete(0).await;
    let run = h.run_view(&instance).await;
    assert_eq!(run["machines"]["m1"]["output"], "before after");
    assert_eq!(run["machines"]["m1"]["retcode"], 0);
    assert_eq!(run["machines"]["m2"]["retcode"], 143);
    assert!(
        h.try_run("j").await.is_ok(),
        "the run ended, so the job may run again"
    );
}

#[tokio::test(start_paused = true)]
async fn a_slot_fired_before_a_restart_never_fires_again() {
    let data = tempfile::tempdir().unwrap();
    let every_second = "every:\n  sec: '*'\n  min: '*'\n  hour: '*'\n  dom: '*'\n  mon: '*'\n  dow: '*'\n  targets: [m1]\n  target_type: list\n  command: echo hi\n  allow_overlap: i know what i am doing!\n";
    {
        let h = Harness::restart(every_second, data.path()).await;
        sleep(Duration::from_millis(5_500)).await;
        assert_eq!(
            h.launcher.take_started().len(),
            5,
            "12:00:01 .. 12:00:05 fired"
        );
    }
    // The restarted master's wall clock starts at 12:00:00 again (as after a clock step
    // back): the slots up to 12:00:05 already fired and must not fire a second time.
    let h = Harness::restart(every_second, data.path()).await;
    sleep(Duration::from_millis(5_500)).await;
    assert_eq!(
        h.launcher.take_started().len(),
        0,
        "no slot fires twice across a restart"
    );
    sleep(SEC).await;
    assert_eq!(
        h.launcher.take_started().len(),
        1,
        "12:00:06 is new and fires"
    );
}
