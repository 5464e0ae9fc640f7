//! One master among several, engine side, on tokio's paused clock with the fake launcher and
//! fake slot claims: it acts only for the jobs the coordination gives it, claims every slot
//! before firing it, takes over in-flight runs from the shared store without a false 253, and
//! drops a lost job's runs at once. The paused wall clock starts at 2026-06-01 12:00:00 UTC.

#![allow(clippy::unwrap_used)]

mod support;

use std::sync::Arc;
use std::time::Duration;

use saltpeter_engine::{ApiRequest, ClusterView, MasterRef};
use saltpeter_proto::ErrorCode;
use support::*;
use time::macros::datetime;
use tokio::time::sleep;

fn gained(jobs: &[&str]) -> ClusterView {
    ClusterView {
        gained: jobs.iter().map(|j| (*j).to_owned()).collect(),
        masters: vec![
            MasterRef {
                id: "m-self".into(),
                machines_url: "ws://127.0.0.1:1".into(),
                api_url: "http://127.0.0.1:2".into(),
            },
            MasterRef {
                id: "m-other".into(),
                machines_url: "ws://127.0.0.2:1".into(),
                api_url: "http://127.0.0.2:2".into(),
            },
        ],
        fingerprints: vec!["aa".repeat(32), "bb".repeat(32)],
        ..ClusterView::default()
    }
}

fn lost(jobs: &[&str]) -> ClusterView {
    ClusterView {
        lost: jobs.iter().map(|j| (*j).to_owned()).collect(),
        ..gained(&[])
    }
}

/// A job firing every ten seconds.
fn every_ten(name: &str) -> String {
    format!(
        "{name}:\n  sec: '*/10'\n  min: '*'\n  hour: '*'\n  dom: '*'\n  mon: '*'\n  dow: '*'\n  targets: [m1]\n  target_type: list\n  command: echo hi\n"
    )
}

#[tokio::test(start_paused = true)]
async fn a_master_acts_for_no_job_until_it_holds_one() {
    let claims = Arc::new(FakeClaims::default());
    let yaml = every_ten("j");
    let h = Harness::start_cluster(&yaml, None, claims.clone()).await;
    // Slots come and go; another master fires them.
    sleep(Duration::from_secs(25)).await;
    assert!(claims.claimed.lock().is_empty());
    assert!(h.launcher.take_started().is_empty());
    let refused = h.try_run("j").await.unwrap_err();
    assert!(refused.contains("held by master"), "{refused}");
    // A wrapper of one of its runs is sent on, not told that the run is gone.
    let mut w = h.wrapper("j_123", "m1").await;
    w.send_connect().await;
    assert_eq!(w.error_code().await, Some(ErrorCode::NotHolder));

    h.cluster(gained(&["j"])).await;
    assert_eq!(h.job_summary("j").await["master"], "m-self");
    sleep(Duration::from_secs(10)).await;
    let claimed = claims.claimed.lock().clone();
    assert_eq!(claimed.len(), 1, "{claimed:?}");
    assert_eq!(claimed[0].0, "j");
    assert_eq!(h.launcher.take_started(), ["m1"]);
    // Run by hand it is this master's own now: refused only because the slot's run is going.
    let refused = h.try_run("j").await.unwrap_err();
    assert!(refused.contains("still running"), "{refused}");
}

#[tokio::test(start_paused = true)]
async fn a_slot_another_master_claimed_is_not_fired() {
    let claims = Arc::new(FakeClaims::default());
    let h = Harness::start_cluster(&every_ten("j"), None, claims.clone()).await;
    h.cluster(gained(&["j"])).await;
    // Every slot of the next minute is already someone else's.
    for s in (10..=60).step_by(10) {
        let slot = datetime!(2026-06-01 12:00 UTC) + time::Duration::seconds(s);
        claims.taken.lock().push(("j".into(), slot));
    }
    sleep(Duration::from_secs(35)).await;
    assert!(h.launcher.take_started().is_empty());
    assert!(claims.claimed.lock().is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_taken_over_run_resumes_from_its_durable_sequence_without_a_253() {
    let data = tempfile::tempdir().unwrap();
    let yaml = job("j", "[m1]", "");
    // The first holder: a run with two outputs stored, then it dies.
    let (instance, token) = {
        let first = Harness::restart(&yaml, data.path()).await;
        let instance = first.run("j").await;
        let mut w = first.wrapper(&instance, "m1").await;
        w.connect_and_start().await;
        assert_eq!(w.output(0, "one\n").await, Reply::Ack(0));
        assert_eq!(w.output(1, "two\n").await, Reply::Ack(1));
        (instance, w.token.clone())
    };
    let claims = Arc::new(FakeClaims::default());
    let h = Harness::start_cluster(&yaml, Some(data.path()), claims).await;
    let mut w = h.wrapper(&instance, "m1").await;
    w.send_connect().await;
    assert_eq!(w.error_code().await, Some(ErrorCode::NotHolder));

    h.cluster(gained(&["j"])).await;
    // Fourteen seconds without a word after the takeover: the heartbeat clock started at the
    // takeover, not at the last heartbeat the dead master saw.
    sleep(Duration::from_secs(14)).await;
    let mut w = h.wrapper(&instance, "m1").await;
    w.token = token;
    assert_eq!(w.connect().await, Some(1));
    assert_eq!(w.output(2, "three\n").await, Reply::Ack(2));
    w.complete(7).await;
    sleep(Duration::from_millis(10)).await;
    let m = h.machine(&instance, "m1").await;
    assert_eq!(m["retcode"], 7, "{m}");
    assert_eq!(m["output"], "one\ntwo\nthree\n");
}

#[tokio::test(start_paused = true)]
async fn a_lost_job_s_runs_are_dropped_and_their_wrappers_sent_on() {
    let claims = Arc::new(FakeClaims::default());
    let h = Harness::start_cluster(&job("j", "[m1]", ""), None, claims).await;
    h.cluster(gained(&["j"])).await;
    let instance = h.run("j").await;
    let env = h.launcher.last_env();
    let var = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    assert_eq!(
        var("SP_WEBSOCKET_URLS").as_deref(),
        Some("ws://127.0.0.1:1 ws://127.0.0.2:1"),
        "every master's address, this one's first"
    );
    assert_eq!(
        var("SP_TLS_FINGERPRINT"),
        Some(format!("{},{}", "aa".repeat(32), "bb".repeat(32)))
    );
    let mut w = h.wrapper(&instance, "m1").await;
    w.connect_and_start().await;
    assert_eq!(w.output(0, "one\n").await, Reply::Ack(0));

    h.cluster(lost(&["j"])).await;
    assert_eq!(w.error_code().await, Some(ErrorCode::NotHolder));
    let gone = h
        .engine
        .ask(|reply| ApiRequest::GetRun {
            instance: instance.clone(),
            reply,
        })
        .await
        .unwrap();
    assert!(gone.is_none(), "the lost job's run is still held");
    // Nothing more is judged here: no 253 for a run another master now holds.
    sleep(Duration::from_secs(30)).await;
    assert!(h.take_events().is_empty());
    assert!(h.try_run("j").await.is_err());
}

#[tokio::test(start_paused = true)]
async fn a_lease_not_renewed_in_time_stops_the_master_by_its_own_clock() {
    let claims = Arc::new(FakeClaims::default());
    let h = Harness::start_cluster(&job("j", "[m1]", ""), None, claims).await;
    let until = |secs| {
        [(
            "j".to_owned(),
            tokio::time::Instant::now() + Duration::from_secs(secs),
        )]
        .into_iter()
        .collect()
    };
    h.cluster(ClusterView {
        act_until: until(8),
        ..gained(&["j"])
    })
    .await;
    let instance = h.run("j").await;
    let mut w = h.wrapper(&instance, "m1").await;
    w.connect_and_start().await;
    // A pass renews the lease: the deadline moves on.
    sleep(Duration::from_secs(5)).await;
    h.cluster(ClusterView {
        act_until: until(8),
        ..gained(&[])
    })
    .await;
    sleep(Duration::from_secs(5)).await;
    w.heartbeat().await;
    assert_eq!(h.machine(&instance, "m1").await["status"], "running");
    // No pass comes any more (the database is unreachable): the master stops acting at its
    // deadline without being told.
    sleep(Duration::from_secs(4)).await;
    assert_eq!(w.error_code().await, Some(ErrorCode::NotHolder));
    assert!(h.try_run("j").await.is_err());
    // What `/metrics` says of it.
    let gauges = h
        .engine
        .ask(|reply| ApiRequest::Ui(saltpeter_engine::UiRequest::Gauges(reply)))
        .await
        .unwrap();
    let text = h.engine.metrics().render(&gauges);
    for line in [
        "saltpeter_cluster_jobs_held 0",
        "saltpeter_cluster_masters_live 2",
        "saltpeter_cluster_takeovers_total 1",
        "saltpeter_cluster_leases_lost_total 1",
    ] {
        assert!(text.contains(line), "{line} missing from:\n{text}");
    }
}
