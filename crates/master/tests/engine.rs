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
    // The healthy machine is untouched (docs/COMPATIBILITY.md: one failed launch failing every machine) and can still start late.
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

fn unauthorized(reply: Option<MasterMessage>) -> bool {
    matches!(reply, Some(MasterMessage::Error(e)) if e.code == ErrorCode::Unauthorized)
}

fn connect_acked(reply: &Option<MasterMessage>) -> bool {
    matches!(reply, Some(MasterMessage::Ack(a)) if a.ack_type == AckType::Connect)
}

#[tokio::test(start_paused = true)]
async fn one_machines_token_is_refused_for_another_machine() {
    let h = Harness::start(&job("j", "[a, b]", "")).await;
    let instance = h.run("j").await;
    let token_b = h.launcher.token_for("b");
    assert_ne!(
        token_b,
        h.launcher.token_for("a"),
        "each machine has its own"
    );
    // Machine b's wrapper (or anyone who read b's environment) claims to be a.
    let mut forger = h.wrapper(&instance, "a").await;
    forger.token = token_b;
    assert!(unauthorized(forger.connect_reply().await));
    let complete = saltpeter_proto::WrapperMessage::Complete(saltpeter_proto::Complete {
        envelope: forger.envelope_now(),
        retcode: Some(0),
        seq: None,
        cause: None,
        signal: None,
    });
    assert!(unauthorized(forger.send_raw(complete).await));
    assert_eq!(h.machine(&instance, "a").await["status"], "pending");
    // The real wrapper of a is not hindered, and b's own token still works for b.
    let mut a = h.wrapper(&instance, "a").await;
    a.connect_and_start().await;
    let mut b = h.wrapper(&instance, "b").await;
    b.connect_and_start().await;
    a.complete(3).await;
    b.complete(0).await;
    assert_eq!(h.machine(&instance, "a").await["retcode"], 3);
}

#[tokio::test(start_paused = true)]
async fn once_a_result_is_stored_the_machines_credential_is_spent() {
    let h = Harness::start(&job("j", "[a, b]", "")).await;
    let instance = h.run("j").await;
    let mut a = h.wrapper(&instance, "a").await;
    a.connect_and_start().await;
    assert_eq!(a.output(0, "real\n").await, Reply::Ack(0));
    a.complete(0).await;
    // The same connection may not add output after its result.
    assert!(matches!(a.output(1, "more\n").await, Reply::Other(t) if t.contains("Unauthorized")));
    // A replay with a's credential on a new connection, while the run is still going (b is
    // not done) and after the run ended.
    for phase in ["running", "finished"] {
        let mut replay = h.wrapper(&instance, "a").await;
        assert!(unauthorized(replay.connect_reply().await), "{phase}");
        let mut legacy = h.wrapper(&instance, "a").await;
        legacy.token = None;
        assert_eq!(
            legacy.output(1, "forged\n").await,
            Reply::Other(format!("{:?}", legacy_refusal())),
            "{phase}"
        );
        if phase == "running" {
            let mut b = h.wrapper(&instance, "b").await;
            b.connect_and_start().await;
            b.complete(0).await;
            assert_eq!(h.run_view(&instance).await["success"], true);
        }
    }
    let m = h.machine(&instance, "a").await;
    assert_eq!(m["retcode"], 0);
    assert_eq!(m["late_retcode"], serde_json::Value::Null);
    assert_eq!(m["output"], "real\n");
}

/// What a connection without `connect` gets when legacy wrappers are not allowed.
fn legacy_refusal() -> Option<MasterMessage> {
    Some(MasterMessage::Error(saltpeter_proto::ErrorReply {
        code: ErrorCode::Unauthorized,
        message: "send connect with the run token first".into(),
        timestamp: None,
    }))
}

#[tokio::test(start_paused = true)]
async fn a_late_complete_from_the_same_connection_is_still_kept_beside_the_verdict() {
    let h = Harness::start(&job("j", "[a]", "")).await;
    let instance = h.run("j").await;
    let mut a = h.wrapper(&instance, "a").await;
    a.connect_and_start().await;
    // Silent past the heartbeat timeout: the master decides 253 while a stays connected.
    sleep(16 * SEC).await;
    assert_eq!(h.machine(&instance, "a").await["retcode"], 253);
    a.complete(7).await;
    let m = h.machine(&instance, "a").await;
    assert_eq!(m["retcode"], 253);
    assert_eq!(m["late_retcode"], 7);
}

#[tokio::test(start_paused = true)]
async fn a_legacy_client_cannot_displace_or_write_for_an_authenticated_machine() {
    let yaml = format!("{}{}", legacy_settings(), job("j", "[a]", ""));
    let h = Harness::start(&yaml).await;
    let instance = h.run("j").await;
    let mut a = h.wrapper(&instance, "a").await;
    a.connect_and_start().await;
    assert_eq!(a.output(0, "real\n").await, Reply::Ack(0));
    // A token-less `connect` naming a: refused, and a keeps its connection.
    let mut legacy = h.wrapper(&instance, "a").await;
    legacy.token = None;
    assert!(unauthorized(legacy.connect_reply().await));
    // A token-less client that skips `connect` (as the original wrapper does on reconnect).
    let mut sneaky = h.wrapper(&instance, "a").await;
    sneaky.token = None;
    assert!(
        matches!(sneaky.output(1, "forged\n").await, Reply::Other(t) if t.contains("Unauthorized"))
    );
    // Still a's connection: its output is acked and a kill reaches it.
    assert_eq!(a.output(1, "more\n").await, Reply::Ack(1));
    h.kill_machine(&instance, "a").await;
    assert!(a.saw_kill());
    a.complete_with(143, "killed").await;
    let m = h.machine(&instance, "a").await;
    assert_eq!(m["output"], "real\nmore\n");
    assert_eq!(m["retcode"], 143);
}

#[tokio::test(start_paused = true)]
async fn a_legacy_wrapper_still_works_where_no_wrapper_authenticated() {
    let yaml = format!("{}{}", legacy_settings(), job("j", "[a]", ""));
    let h = Harness::start(&yaml).await;
    let instance = h.run("j").await;
    let mut legacy = h.wrapper(&instance, "a").await;
    legacy.token = None;
    legacy.connect_and_start().await;
    assert_eq!(legacy.output(0, "old\n").await, Reply::Ack(0));
    // The modern wrapper with a's credential may take over from it.
    let mut a = h.wrapper(&instance, "a").await;
    a.connect().await;
    a.complete(0).await;
    assert_eq!(h.machine(&instance, "a").await["retcode"], 0);
}

#[tokio::test(start_paused = true)]
async fn after_a_restart_a_legacy_client_still_cannot_take_an_authenticated_machine() {
    let data = tempfile::tempdir().unwrap();
    let yaml = format!("{}{}", legacy_settings(), job("j", "[a]", ""));
    let (instance, token) = {
        let h = Harness::restart(&yaml, data.path()).await;
        let instance = h.run("j").await;
        let mut a = h.wrapper(&instance, "a").await;
        a.connect_and_start().await;
        (instance, a.token.clone())
    };
    let h = Harness::restart(&yaml, data.path()).await;
    let mut legacy = h.wrapper(&instance, "a").await;
    legacy.token = None;
    assert!(unauthorized(legacy.connect_reply().await));
    let mut a = h.wrapper(&instance, "a").await;
    a.token = token;
    a.connect().await;
    a.complete(0).await;
    assert_eq!(h.machine(&instance, "a").await["retcode"], 0);
}

#[tokio::test(start_paused = true)]
async fn salt_runs_need_a_signature_by_the_minions_own_key() {
    let h = Harness::start(&job("j", "[minion-a, minion-b, minion-c]", "")).await;
    let keys = tempfile::tempdir().unwrap();
    h.launcher.use_salt_keys(&salt_pki_dir(keys.path()));
    let instance = h.run("j").await;
    let env = h.launcher.last_env();
    assert!(env.contains(&("SP_IDENTITY".into(), "salt_key".into())));
    let run_token = h.launcher.token_for("minion-a");
    assert!(
        run_token.is_some(),
        "Salt runs hand every minion the run's token"
    );

    // The run's token alone is not enough.
    let mut bare = h.wrapper(&instance, "minion-a").await;
    assert!(unauthorized(bare.connect_reply().await));
    // minion-b signs with its own key but claims to be minion-a.
    let mut forger = h.wrapper(&instance, "minion-a").await;
    let nonce = forger.hello().await;
    forger.signature = Some(sign_as("minion-b", &nonce, &instance, "minion-a"));
    assert!(unauthorized(forger.connect_reply().await));
    // A signature minion-a made for another connection's challenge is no good here.
    let mut a = h.wrapper(&instance, "minion-a").await;
    let nonce_a = a.hello().await;
    let signature_a = sign_as("minion-a", &nonce_a, &instance, "minion-a");
    let mut replay = h.wrapper(&instance, "minion-a").await;
    let _ = replay.hello().await;
    replay.signature = Some(signature_a.clone());
    assert!(unauthorized(replay.connect_reply().await));
    // A minion whose key the Salt master never accepted cannot connect at all.
    let mut c = h.wrapper(&instance, "minion-c").await;
    let nonce_c = c.hello().await;
    c.signature = Some(sign_as("minion-a", &nonce_c, &instance, "minion-c"));
    assert!(unauthorized(c.connect_reply().await));
    assert_eq!(h.machine(&instance, "minion-a").await["status"], "pending");

    // minion-a itself, and minion-b for itself (the PKCS#1 public key form).
    a.signature = Some(signature_a);
    assert!(connect_acked(&a.connect_reply().await));
    a.start().await;
    let mut b = h.wrapper(&instance, "minion-b").await;
    let nonce_b = b.hello().await;
    b.signature = Some(sign_as("minion-b", &nonce_b, &instance, "minion-b"));
    assert!(connect_acked(&b.connect_reply().await));
    b.start().await;
    a.complete(0).await;
    // Once a's result is stored, even a fresh, valid signature does not reopen it.
    let mut again = h.wrapper(&instance, "minion-a").await;
    let nonce = again.hello().await;
    again.signature = Some(sign_as("minion-a", &nonce, &instance, "minion-a"));
    assert!(unauthorized(again.connect_reply().await));
    assert_eq!(h.machine(&instance, "minion-a").await["retcode"], 0);
}
