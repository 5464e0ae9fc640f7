//! The operator's surface over real loopback sockets, started through `server::start` (with a
//! fake launcher): the bearer token and Origin checks, the `/ws` protocol end to end (config
//! first, malformed commands answered with an error while the master carries on), the legacy
//! paths, `/metrics`, the dashboard's files, and the CLI against a running master.

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

mod support;

use std::sync::Arc;

use futures_util::SinkExt;
use saltpeter_master::cli;
use saltpeter_master::server::Running;
use serde_json::{Value, json};
use support::raw::{self, Ws, recv, recv_type, send};
use support::{FakeLauncher, job};
use tokio_tungstenite::tungstenite::Message;

async fn start(extra_settings: &str) -> (Running, Arc<FakeLauncher>, tempfile::TempDir) {
    let jobs = job("j", "[m1]", "  env:\n    SECRET: hunter2\n") + &job("idle", "[m1]", "");
    support::start_server(extra_settings, &jobs).await
}

/// One raw HTTP/1.1 request with extra header lines; returns status and body.
async fn http(r: &Running, method: &str, path: &str, headers: &[&str]) -> (u16, String) {
    let answer = raw::request(r.api_addr, method, path, headers).await;
    (answer.status, answer.body)
}

async fn ws_with(r: &Running, query: &str, headers: &[(&str, &str)]) -> Result<Ws, u16> {
    raw::ws_with(r.api_addr, query, headers).await
}

#[tokio::test]
async fn calls_and_ws_need_the_token_when_one_is_set() {
    let (r, _l, _d) = start("  api_token: s3cret\n").await;
    // Reads need it too (tests/access.rs covers every path and role).
    assert_eq!(http(&r, "GET", "/api/v1/jobs", &[]).await.0, 401);
    let right = ["Authorization: Bearer s3cret"];
    assert_eq!(http(&r, "GET", "/api/v1/overview", &right).await.0, 200);
    let (status, body) = http(&r, "POST", "/api/v1/jobs/j/run", &[]).await;
    assert_eq!(status, 401, "{body}");
    let wrong = ["Authorization: Bearer s3cre7"];
    assert_eq!(http(&r, "POST", "/api/v1/jobs/j/run", &wrong).await.0, 401);
    let right = ["Authorization: Bearer s3cret"];
    let (status, body) = http(&r, "POST", "/api/v1/jobs/j/run", &right).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(ws_with(&r, "", &[]).await.err(), Some(401));
    assert_eq!(ws_with(&r, "?token=nope", &[]).await.err(), Some(401));
    let mut ws = ws_with(&r, "?token=s3cret", &[]).await.unwrap();
    assert_eq!(recv(&mut ws).await["type"], "config");
    let mut ws = ws_with(&r, "", &[("Authorization", "Bearer s3cret")])
        .await
        .unwrap();
    assert_eq!(recv(&mut ws).await["type"], "config");
    // The CLI sends the token too.
    let client =
        cli::Client::new(&format!("http://{}", r.api_addr), Some("s3cret".into())).unwrap();
    let code = tokio::task::spawn_blocking(move || cli::kill(&client, "j", None, true).unwrap())
        .await
        .unwrap();
    assert_eq!(code, 0);
}

#[tokio::test]
async fn browsers_from_foreign_origins_are_refused() {
    let (r, _l, _d) = start("  ws_allowed_origins: [https://ui.example.com]\n").await;
    let own = format!("http://{}", r.api_addr);
    assert_eq!(
        ws_with(&r, "", &[("Origin", "http://evil.example")])
            .await
            .err(),
        Some(403)
    );
    let mut ws = ws_with(&r, "", &[("Origin", &own)]).await.unwrap();
    assert_eq!(recv(&mut ws).await["type"], "config");
    let mut ws = ws_with(&r, "", &[("Origin", "https://ui.example.com")])
        .await
        .unwrap();
    assert_eq!(recv(&mut ws).await["type"], "config");
    // A cross-site form post cannot start a run either; reads stay open.
    let evil = ["Origin: http://evil.example"];
    assert_eq!(http(&r, "POST", "/api/v1/jobs/j/run", &evil).await.0, 403);
    assert_eq!(http(&r, "GET", "/api/v1/jobs", &evil).await.0, 200);
    let own_header = format!("Origin: {own}");
    assert_eq!(
        http(&r, "POST", "/api/v1/jobs/j/run", &[own_header.as_str()])
            .await
            .0,
        202
    );
}

#[tokio::test]
async fn the_ws_protocol_answers_commands_and_survives_malformed_ones() {
    let (r, _l, _d) = start("").await;
    let mut ws = ws_with(&r, "", &[]).await.unwrap();
    let config = recv(&mut ws).await;
    assert_eq!(config["type"], "config");
    assert_eq!(
        config["config"]["crons"]["j"]["env"]["SECRET"],
        "<redacted>"
    );
    assert_eq!(recv(&mut ws).await["type"], "status");
    for bad in [
        "garbage",
        "[]",
        r#"{"getTimeline":{}}"#,
        r#"{"subscribe":42}"#,
    ] {
        send(&mut ws, bad).await;
        let reply = recv_type(&mut ws, "error").await;
        assert!(reply["error"].as_str().unwrap().len() > 3, "{reply}");
    }
    ws.send(Message::binary(vec![1u8, 2, 3])).await.unwrap();
    recv_type(&mut ws, "error").await;
    send(&mut ws, r#"{"run":"nope"}"#).await;
    let reply = recv_type(&mut ws, "error").await;
    assert_eq!(reply["command"], "run");
    // Still serving: subscribe, run, see the run, kill it.
    send(&mut ws, r#"{"subscribe":["j"]}"#).await;
    let status = recv_type(&mut ws, "status").await;
    assert!(status["running"].as_object().unwrap().is_empty());
    let details = recv_type(&mut ws, "details").await;
    assert_eq!(details["cron"], "j");
    send(&mut ws, r#"{"run":"j"}"#).await;
    let status = recv_type(&mut ws, "status").await;
    let (instance, entry) = status["running"]
        .as_object()
        .unwrap()
        .iter()
        .next()
        .unwrap();
    assert_eq!(entry["name"], "j");
    assert!(entry["started"].as_str().unwrap().contains('T'));
    send(
        &mut ws,
        r#"{"getTimeline":{"start_date":"now-1h","end_date":"now+1h","id":"42"}}"#,
    )
    .await;
    let timeline = recv_type(&mut ws, "timeline").await;
    assert_eq!(timeline["timeline"]["id"], "42");
    assert_eq!(
        timeline["timeline"]["content"][0]["job_instance"],
        *instance
    );
    send(&mut ws, r#"{"killCron":"j"}"#).await;
    let status = recv_type(&mut ws, "status").await;
    assert_eq!(status["running"][instance]["stop_signal"], true);
    send(&mut ws, r#"{"killCron":"idle"}"#).await;
    assert_eq!(recv_type(&mut ws, "error").await["command"], "killCron");
    assert_eq!(http(&r, "GET", "/version", &[]).await.0, 200);
}

#[tokio::test]
async fn legacy_paths_metrics_and_the_dashboard_are_served() {
    let (r, _l, _d) = start("").await;
    let (status, body) = http(&r, "GET", "/version", &[]).await;
    assert_eq!(status, 200);
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["version"], env!("CARGO_PKG_VERSION"));
    let (status, body) = http(&r, "GET", "/config", &[]).await;
    assert_eq!(status, 200);
    assert!(!body.contains("hunter2"), "{body}");
    assert_eq!(http(&r, "GET", "/running", &[]).await, (200, "{}".into()));
    let (_, body) = http(&r, "POST", "/api/v1/jobs/j/run", &[]).await;
    let instance = serde_json::from_str::<Value>(&body).unwrap()["instance"]
        .as_str()
        .unwrap()
        .to_owned();
    // A running instance never makes /running fail (docs/COMPATIBILITY.md).
    let (status, body) = http(&r, "GET", "/running", &[]).await;
    assert_eq!(status, 200);
    let running: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(running[&instance]["name"], "j");
    let (status, body) = http(&r, "GET", "/timeline?start_date=now-1h&id=7", &[]).await;
    assert_eq!(status, 200);
    let timeline: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(timeline["id"], "7");
    assert_eq!(timeline["content"][0]["job_instance"], instance.as_str());
    assert_eq!(
        http(&r, "GET", "/timeline?start_date=soon", &[]).await.0,
        400
    );
    let (status, body) = http(&r, "GET", "/metrics", &[]).await;
    assert_eq!(status, 200);
    assert!(
        body.lines()
            .any(|l| l == "saltpeter_runs_started_total{job_name=\"j\"} 1"),
        "{body}"
    );
    assert!(body.contains("# TYPE saltpeter_scheduler_lag_seconds histogram"));
    let (status, body) = http(&r, "GET", "/", &[]).await;
    assert_eq!(status, 200);
    assert!(body.contains("<html") && body.contains("app.js"), "{body}");
    assert_eq!(http(&r, "GET", "/assets/app.js", &[]).await.0, 200);
    assert_eq!(http(&r, "GET", "/assets/app.css", &[]).await.0, 200);
    let (status, body) = http(
        &r,
        "GET",
        &format!("/api/v1/runs/{instance}/output?from=m1:0"),
        &[],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let out: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(out["machines"]["m1"]["output"]["next"], 0);
    assert_eq!(
        http(
            &r,
            "GET",
            &format!("/api/v1/runs/{instance}/output?from=m1"),
            &[]
        )
        .await
        .0,
        400
    );
    assert_eq!(
        http(&r, "GET", "/api/v1/runs/nope/output", &[]).await.0,
        404
    );
}

#[tokio::test]
async fn the_cli_talks_to_a_running_master() {
    let (r, _l, _d) = start("").await;
    let url = format!("http://{}", r.api_addr);
    let codes = tokio::task::spawn_blocking(move || {
        let c = cli::Client::new(&url, None).unwrap();
        let status = cli::status(&c, false).unwrap();
        let status_json = cli::status(&c, true).unwrap();
        let run = cli::run(&c, "j", false, true).unwrap();
        let run_unknown = cli::run(&c, "nope", false, false).unwrap();
        let kill_idle = cli::kill(&c, "idle", None, false).unwrap();
        let overview = c.get("/api/v1/overview").unwrap().json();
        let instance = overview["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .find(|j| j["name"] == "j")
            .unwrap()["running"][0]
            .as_str()
            .unwrap()
            .to_owned();
        let logs = cli::logs(&c, &instance, None, false).unwrap();
        let logs_other = cli::logs(&c, &instance, Some("m9"), false).unwrap();
        let logs_unknown = cli::logs(&c, "nope_1", None, true).unwrap();
        let kill_machine = cli::kill(&c, &instance, Some("m1"), true).unwrap();
        json!([
            status,
            status_json,
            run,
            run_unknown,
            kill_idle,
            logs,
            logs_other,
            logs_unknown,
            kill_machine
        ])
    })
    .await
    .unwrap();
    assert_eq!(codes, json!([0, 0, 0, 1, 1, 0, 1, 1, 0]));
    // A master that is not there is an error, not a code.
    let c = cli::Client::new("http://127.0.0.1:1", None).unwrap();
    assert!(
        tokio::task::spawn_blocking(move || cli::status(&c, false))
            .await
            .unwrap()
            .is_err()
    );
}
