//! The operator's surface, engine side, under tokio's paused clock: the UI protocol's message
//! shapes (insta snapshots of `config`, `status`, `details`, `output_chunk`, `timeline`), the
//! UTF-16 output positions with their per-instance reset, the interim `status` the React UI
//! needs between two runs, the job overview and the metrics the engine counts.

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use saltpeter_config::Config;
use saltpeter_engine::{
    ApiRequest, JobCursors, OutputCursor, RunOutputQuery, UiRequest, UiSnapshot,
};
use saltpeter_store::TimelineQuery;
use saltpeter_web::ui::messages::{config_message, timeline_message};
use saltpeter_web::ui::ws::plan;
use serde_json::Value;
use support::*;

/// A browser connection's state, driven without a socket.
#[derive(Default)]
struct Browser {
    subs: BTreeMap<String, BTreeMap<String, OutputCursor>>,
    shown: BTreeMap<String, BTreeSet<String>>,
}

impl Browser {
    fn subscribe(&mut self, job: &str) {
        self.subs.entry(job.into()).or_default();
    }

    /// One refresh: the messages a tick sends after `config`.
    async fn tick(&mut self, h: &Harness) -> Vec<Value> {
        let jobs: Vec<JobCursors> = self
            .subs
            .iter()
            .map(|(job, cursors)| JobCursors {
                job: job.clone(),
                cursors: cursors.clone(),
            })
            .collect();
        let snapshot: UiSnapshot = h
            .engine
            .ask(|reply| ApiRequest::Ui(UiRequest::Snapshot { jobs, reply }))
            .await
            .unwrap();
        plan(&mut self.subs, &mut self.shown, &snapshot)
    }
}

fn kinds(messages: &[Value]) -> Vec<String> {
    messages
        .iter()
        .map(|m| m["type"].as_str().unwrap().to_owned())
        .collect()
}

fn chunks(messages: &[Value]) -> Vec<(String, String, u64)> {
    messages
        .iter()
        .filter(|m| m["type"] == "output_chunk")
        .map(|m| {
            (
                m["machine"].as_str().unwrap().to_owned(),
                m["chunk"].as_str().unwrap().to_owned(),
                m["position"].as_u64().unwrap(),
            )
        })
        .collect()
}

#[tokio::test(start_paused = true)]
async fn a_run_streams_status_then_chunks_then_details_with_utf16_positions() {
    let h = Harness::start(&job("j", "[m1, m2]", "")).await;
    let mut b = Browser::default();
    b.subscribe("j");
    let idle = b.tick(&h).await;
    insta::assert_json_snapshot!("idle_status_and_details", idle, { "[].sp_version" => "[version]" });

    let instance = h.run("j").await;
    let mut w1 = h.wrapper(&instance, "m1").await;
    let mut w2 = h.wrapper(&instance, "m2").await;
    w1.connect_and_start().await;
    w2.connect_and_start().await;
    w1.heartbeat().await;
    w1.output(0, "héllo 🚀\n").await;
    let first = b.tick(&h).await;
    assert_eq!(kinds(&first), ["status", "output_chunk", "details"]);
    insta::assert_json_snapshot!("running_status_chunk_details", first, { "[].sp_version" => "[version]" });

    // The rocket is two UTF-16 units: the next chunk starts at 9, where the browser is.
    w1.output(1, "progress 50%\rprogress 100%\n").await;
    w2.output(0, "𝄞").await;
    let second = b.tick(&h).await;
    assert_eq!(
        chunks(&second),
        [
            ("m1".into(), "progress 50%\rprogress 100%\n".into(), 9),
            ("m2".into(), "𝄞".into(), 0),
        ]
    );
    // Nothing new, no chunk; status and details still come every tick.
    assert_eq!(kinds(&b.tick(&h).await), ["status", "details"]);

    w1.complete(0).await;
    w2.complete(3).await;
    let done = b.tick(&h).await;
    insta::assert_json_snapshot!("finished_status_and_details", done, { "[].sp_version" => "[version]" });

    // A new run of the same job starts over at position 0 (docs/COMPATIBILITY.md: output positions).
    let second_instance = h.run("j").await;
    assert_ne!(second_instance, instance);
    let mut w = h.wrapper(&second_instance, "m1").await;
    w.connect_and_start().await;
    w.output(0, "again\n").await;
    let rerun = b.tick(&h).await;
    assert_eq!(kinds(&rerun), ["status", "output_chunk", "details"]);
    assert_eq!(chunks(&rerun), [("m1".into(), "again\n".into(), 0)]);
    assert_eq!(
        rerun[2]["data"]["instance"].as_str(),
        Some(second_instance.as_str())
    );
}

#[tokio::test(start_paused = true)]
async fn a_run_that_replaces_a_shown_run_gets_an_interim_status_without_it() {
    let h = Harness::start(&job("j", "[m1]", "")).await;
    let mut b = Browser::default();
    b.subscribe("j");
    let first = h.run("j").await;
    let mut w = h.wrapper(&first, "m1").await;
    w.connect_and_start().await;
    w.output(0, "one\n").await;
    b.tick(&h).await;
    // The first run ends and the next starts between two ticks.
    w.complete(0).await;
    let second = h.run("j").await;
    let mut w = h.wrapper(&second, "m1").await;
    w.connect_and_start().await;
    w.output(0, "two\n").await;
    let messages = b.tick(&h).await;
    assert_eq!(
        kinds(&messages),
        ["status", "status", "output_chunk", "details"]
    );
    assert!(messages[0]["running"].as_object().unwrap().is_empty());
    assert!(messages[1]["running"][&second].is_object());
    assert_eq!(chunks(&messages), [("m1".into(), "two\n".into(), 0)]);
}

#[tokio::test(start_paused = true)]
async fn status_lists_unfinished_machines_and_result_ok_follows_the_last_run() {
    let h = Harness::start(&job("j", "[ok, lost]", "")).await;
    let mut b = Browser::default();
    let instance = h.run("j").await;
    let mut ok = h.wrapper(&instance, "ok").await;
    ok.connect_and_start().await;
    let status = &b.tick(&h).await[0];
    assert_eq!(
        status["running"][&instance]["machines"],
        serde_json::json!(["lost", "ok"])
    );
    assert_eq!(status["last_state"]["j"]["result_ok"], true);
    ok.complete(0).await;
    h.kill(&instance).await;
    let status = &b.tick(&h).await[0];
    // The finished machine left the list at once; the killed one waits for its kill grace.
    assert_eq!(
        status["running"][&instance]["machines"],
        serde_json::json!(["lost"])
    );
    assert_eq!(status["running"][&instance]["stop_signal"], true);
    tokio::time::sleep(saltpeter_proto::KILL_GRACE * 2).await;
    let status = &b.tick(&h).await[0];
    assert!(
        status["running"].as_object().unwrap().is_empty(),
        "{status}"
    );
    assert_eq!(status["last_state"]["j"]["result_ok"], false);
}

#[test]
fn config_redacts_env_and_keeps_the_ui_fields() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("jobs.yaml"),
        job(
            "j",
            "[m1]",
            "  env:\n    DB_PASSWORD: hunter2\n    PORT: 5432\n",
        ) + "saltpeter_config:\n  api_token: s3cret\nsaltpeter_maintenance:\n  machines: [m9]\n",
    )
    .unwrap();
    let config = Arc::new(Config::load(dir.path()));
    let message = config_message(&config);
    let text = message.to_string();
    assert!(
        !text.contains("hunter2") && !text.contains("s3cret"),
        "{text}"
    );
    assert!(message["config"]["crons"]["j"]["command"].is_string());
    assert!(message["config"]["crons"]["j"]["group"].is_string());
    insta::assert_json_snapshot!("config_message", message, {
        ".sp_version" => "[version]",
    });
}

#[tokio::test(start_paused = true)]
async fn the_timeline_comes_from_the_engines_own_history() {
    let h = Harness::start(&(job("a", "[m1]", "") + &job("b", "[m1]", ""))).await;
    let first = h.run("a").await;
    let mut w = h.wrapper(&first, "m1").await;
    w.connect_and_start().await;
    tokio::time::sleep(std::time::Duration::from_secs(90)).await;
    w.complete(0).await;
    let second = h.run("b").await;
    let mut w = h.wrapper(&second, "m1").await;
    w.connect_and_start().await;
    w.complete(2).await;
    let third = h.run("a").await;
    let _running = h.wrapper(&third, "m1").await;
    let now = time::macros::datetime!(2026-06-01 12:00 UTC) + time::Duration::hours(1);
    let query = |start, limit| TimelineQuery {
        start,
        end: now,
        job: None,
        limit,
    };
    let ask = |q: TimelineQuery| {
        h.engine
            .ask(|reply| ApiRequest::Ui(UiRequest::Timeline { query: q, reply }))
    };
    let all = ask(query(now - time::Duration::days(1), 100))
        .await
        .unwrap();
    let message = timeline_message("1717243200000", &all, 1.5);
    insta::assert_json_snapshot!("timeline_message", message);
    // The newest rows are kept when a limit applies; a window after every run is empty.
    let last = ask(query(now - time::Duration::days(1), 1)).await.unwrap();
    assert_eq!(last.len(), 1);
    assert_eq!(last[0].job_instance, third);
    let later = TimelineQuery {
        start: now + time::Duration::hours(1),
        end: now + time::Duration::hours(2),
        job: Some("b".into()),
        limit: 10,
    };
    assert!(ask(later).await.unwrap().is_empty());
}

#[tokio::test(start_paused = true)]
async fn run_output_follows_a_reader_and_the_overview_lists_jobs() {
    let h = Harness::start(&job("j", "[m1]", "")).await;
    let instance = h.run("j").await;
    let mut w = h.wrapper(&instance, "m1").await;
    w.connect_and_start().await;
    w.output(0, "a🚀").await;
    let ask = |from: u64| {
        let query = RunOutputQuery {
            instance: instance.clone(),
            from: [("m1".to_owned(), from)].into(),
            machine: None,
            max_bytes: 0,
        };
        h.engine
            .ask(|reply| ApiRequest::Ui(UiRequest::RunOutput { query, reply }))
    };
    let r = ask(0).await.unwrap().unwrap();
    let m = &r.machines["m1"];
    assert_eq!((m.output.text.as_str(), m.output.next), ("a🚀", 3));
    assert_eq!(m.heartbeat_age, Some(0.0));
    w.output(1, "b").await;
    let r = ask(3).await.unwrap().unwrap();
    assert_eq!(r.machines["m1"].output.text, "b");
    let overview = h
        .engine
        .ask(|reply| ApiRequest::Ui(UiRequest::Overview(reply)))
        .await
        .unwrap();
    let row = &overview.jobs[0];
    assert_eq!(row.name, "j");
    assert_eq!(row.running, std::slice::from_ref(&instance));
    assert_eq!(row.last_instance.as_deref(), Some(instance.as_str()));
    assert_eq!(row.schedule, "0 0 0 1 1 * 2099");
    assert!(!row.schedule_text.is_empty());
}

#[tokio::test(start_paused = true)]
async fn the_engine_counts_runs_results_output_and_timeouts() {
    let h = Harness::start(&job("j", "[m1, m2]", "")).await;
    h.launcher.fail("m2", "ssh: no route");
    let instance = h.run("j").await;
    let mut w = h.wrapper(&instance, "m1").await;
    w.connect_and_start().await;
    w.output(0, "12345").await;
    tokio::time::sleep(std::time::Duration::from_secs(16)).await;
    let gauges = h
        .engine
        .ask(|reply| ApiRequest::Ui(UiRequest::Gauges(reply)))
        .await
        .unwrap();
    let text = h.engine.metrics().render(&gauges);
    for line in [
        "saltpeter_runs_started_total{job_name=\"j\"} 1",
        "saltpeter_runs_finished_total{job_name=\"j\",result=\"failure\"} 1",
        "saltpeter_machine_results_total{job_name=\"j\",code=\"253\"} 1",
        "saltpeter_machine_results_total{job_name=\"j\",code=\"254\"} 1",
        "saltpeter_heartbeat_timeouts_total 1",
        "saltpeter_launch_failures_total 1",
        "saltpeter_output_bytes_total 5",
        "saltpeter_fire_to_start_seconds_count 1",
        // The inline store commits at once and the clock is paused: acked in no time.
        "saltpeter_output_ack_seconds_bucket{le=\"0.005\"} 1",
        "saltpeter_output_ack_seconds_count 1",
        "saltpeter_runs_running 0",
        "saltpeter_wrappers_connected 1",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "missing {line:?} in\n{text}"
        );
    }
    // The run failed: it counts as the last run, not as a success.
    let has = |prefix: &str| text.lines().any(|l| l.starts_with(prefix));
    assert!(has(
        "saltpeter_job_last_run_timestamp_seconds{job_name=\"j\"} "
    ));
    assert!(has(
        "saltpeter_job_next_run_timestamp_seconds{job_name=\"j\"} "
    ));
    assert!(!has(
        "saltpeter_job_last_success_timestamp_seconds{job_name=\"j\"}"
    ));
    assert!(
        text.lines()
            .any(|l| l == "saltpeter_config_last_reload_successful 1")
    );
}

#[tokio::test(start_paused = true)]
async fn the_last_success_time_is_kept_across_a_restart() {
    let data = tempfile::tempdir().unwrap();
    let yaml = job("j", "[m1]", "");
    let success = {
        let h = Harness::restart(&yaml, data.path()).await;
        let instance = h.run("j").await;
        let mut w = h.wrapper(&instance, "m1").await;
        w.connect_and_start().await;
        w.complete(0).await;
        let gauges = h
            .engine
            .ask(|reply| ApiRequest::Ui(UiRequest::Gauges(reply)))
            .await
            .unwrap();
        let times = gauges.jobs.iter().find(|j| j.job == "j").cloned().unwrap();
        assert!(times.last_success.is_some() && times.last_run.is_some());
        times.last_success
    };
    let h = Harness::restart(&yaml, data.path()).await;
    let gauges = h
        .engine
        .ask(|reply| ApiRequest::Ui(UiRequest::Gauges(reply)))
        .await
        .unwrap();
    let times = gauges.jobs.iter().find(|j| j.job == "j").cloned().unwrap();
    assert_eq!(times.last_success, success);
}
