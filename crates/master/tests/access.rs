//! Who may use the API port, over real loopback sockets with a whole master (`server::start`,
//! fake launcher): reads need a token once tokens are configured, each role may do what it
//! should and no more, `?token=` works where browsers and the original UI need it, a Host
//! the master does not know is refused (DNS rebinding), every answer carries the security
//! headers, and the audit trail records acts with their actor and source.

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

mod support;

use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use saltpeter_config::access::{hash_token, hex};
use saltpeter_master::cli;
use saltpeter_master::server::Running;
use serde_json::Value;
use support::raw::{self, Answer, Ws, recv_type};
use support::{FakeLauncher, job};
use tokio_tungstenite::tungstenite::Message;

const VIEWER: &str = "spt_viewer_secret";
const OPERATOR: &str = "spt_operator_secret";
const ADMIN: &str = "spt_admin_secret";
const LEGACY: &str = "legacy-secret";

/// Settings with one token of each role (only hashes in the file) and the old `api_token`.
fn tokens() -> String {
    format!(
        "  api_token: {LEGACY}\n  api_tokens:\n    - {{name: vera, role: viewer, sha256: {}}}\n    \
         - {{name: alice, role: operator, sha256: {}}}\n    - {{name: root, role: admin, sha256: {}}}\n",
        hex(&hash_token(VIEWER)),
        hex(&hash_token(OPERATOR)),
        hex(&hash_token(ADMIN)),
    )
}

async fn start(extra_settings: &str) -> (Running, Arc<FakeLauncher>, tempfile::TempDir) {
    let jobs = job("j", "[m1]", "") + &job("k", "[m1]", "") + &job("o", "[m1]", "");
    support::start_server(extra_settings, &jobs).await
}

/// One raw HTTP/1.1 request with a `Host` (the API's address unless given) and a bearer token.
async fn call(
    r: &Running,
    method: &str,
    path: &str,
    token: Option<&str>,
    host: Option<&str>,
) -> Answer {
    let mut headers = Vec::new();
    if let Some(t) = token {
        headers.push(format!("Authorization: Bearer {t}"));
    }
    if let Some(h) = host {
        headers.push(format!("Host: {h}"));
    }
    let headers: Vec<&str> = headers.iter().map(String::as_str).collect();
    raw::request(r.api_addr, method, path, &headers).await
}

async fn ws(r: &Running, query: &str, host: Option<&str>) -> Result<Ws, u16> {
    let headers: Vec<(&str, &str)> = host.map(|h| ("Host", h)).into_iter().collect();
    raw::ws_with(r.api_addr, query, &headers).await
}

/// Every read path, with one existing run to read about.
fn read_paths(instance: &str) -> Vec<String> {
    [
        "/version",
        "/api/v1/jobs",
        "/api/v1/overview",
        "/api/v1/timeline",
        "/api/v1/jobs/j/runs",
        "/config",
        "/running",
        "/timeline",
        "/metrics",
    ]
    .iter()
    .map(|p| (*p).to_owned())
    .chain([
        format!("/api/v1/runs/{instance}"),
        format!("/api/v1/runs/{instance}/output"),
        format!("/api/v1/runs/{instance}/machines/m1/output"),
    ])
    .collect()
}

#[tokio::test]
async fn reads_need_a_token_once_tokens_are_configured() {
    let (r, _l, _d) = start(&tokens()).await;
    let run = call(&r, "POST", "/api/v1/jobs/j/run", Some(OPERATOR), None).await;
    assert_eq!(run.status, 202, "{}", run.body);
    let instance = run.json()["instance"].as_str().unwrap().to_owned();
    for path in read_paths(&instance) {
        let refused = call(&r, "GET", &path, None, None).await;
        assert_eq!(refused.status, 401, "{path}: {}", refused.body);
        assert!(
            refused.json()["error"].is_string(),
            "{path}: {}",
            refused.body
        );
        assert_eq!(refused.header("www-authenticate"), Some("Bearer"));
        let wrong = call(&r, "GET", &path, Some("spt_nobody"), None).await;
        assert_eq!(wrong.status, 401, "{path}");
        let viewer = call(&r, "GET", &path, Some(VIEWER), None).await;
        assert_eq!(viewer.status, 200, "{path}: {}", viewer.body);
    }
    // What stays open: the health check (whatever the Host) and the dashboard's files, which
    // ask for a token themselves.
    let health = call(&r, "GET", "/healthz", None, Some("anything.example")).await;
    assert_eq!((health.status, health.body.as_str()), (200, "ok"));
    for path in ["/", "/assets/app.js", "/assets/app.css"] {
        assert_eq!(
            call(&r, "GET", path, None, None).await.status,
            200,
            "{path}"
        );
    }
    assert_eq!(ws(&r, "", None).await.err(), Some(401));
    r.stop().await;
}

#[tokio::test]
async fn without_tokens_reads_and_metrics_stay_open_and_healthz_answers() {
    let (r, _l, _d) = start("").await;
    for path in ["/api/v1/jobs", "/config", "/metrics", "/api/v1/audit"] {
        assert_eq!(
            call(&r, "GET", path, None, None).await.status,
            200,
            "{path}"
        );
    }
    let health = call(&r, "GET", "/healthz", None, None).await;
    assert_eq!((health.status, health.body.as_str()), (200, "ok"));
    r.stop().await;
}

#[tokio::test]
async fn metrics_follow_metrics_public() {
    let (r, _l, _d) = start(&format!("{}  metrics_public: true\n", tokens())).await;
    assert_eq!(call(&r, "GET", "/metrics", None, None).await.status, 200);
    assert_eq!(
        call(&r, "GET", "/api/v1/jobs", None, None).await.status,
        401
    );
    r.stop().await;
    let (r, _l, _d) = start("  metrics_public: false\n").await;
    // Without tokens there is nothing to ask for; the setting only matters with tokens.
    assert_eq!(call(&r, "GET", "/metrics", None, None).await.status, 200);
    r.stop().await;
}

#[tokio::test]
async fn each_role_may_do_what_it_should_and_no_more() {
    let (r, _l, _d) = start(&tokens()).await;
    let start = |job: &'static str| {
        let r = &r;
        async move {
            let path = format!("/api/v1/jobs/{job}/run");
            let a = call(r, "POST", &path, Some(ADMIN), None).await;
            a.json()["instance"].as_str().unwrap().to_owned()
        }
    };
    let (j, k) = (start("j").await, start("k").await);
    // (token, method, path, expected status); `{j}` and `{k}` are running instances.
    let table: &[(&str, &str, &str, u16)] = &[
        (VIEWER, "GET", "/api/v1/jobs", 200),
        (VIEWER, "POST", "/api/v1/jobs/o/run", 403),
        (VIEWER, "POST", "/api/v1/runs/{j}/kill", 403),
        (VIEWER, "POST", "/api/v1/runs/{k}/machines/m1/kill", 403),
        (VIEWER, "GET", "/api/v1/audit", 403),
        (OPERATOR, "GET", "/api/v1/jobs", 200),
        (OPERATOR, "GET", "/api/v1/audit", 403),
        (OPERATOR, "POST", "/api/v1/runs/{k}/machines/m1/kill", 202),
        (OPERATOR, "POST", "/api/v1/jobs/o/run", 202),
        (ADMIN, "POST", "/api/v1/runs/{j}/kill", 202),
        (ADMIN, "GET", "/api/v1/audit", 200),
        (LEGACY, "GET", "/api/v1/audit", 200),
        (LEGACY, "POST", "/api/v1/jobs/nope/run", 404),
        ("spt_nobody", "POST", "/api/v1/jobs/o/run", 401),
    ];
    for (token, method, path, want) in table {
        let path = path.replace("{j}", &j).replace("{k}", &k);
        let a = call(&r, method, &path, Some(token), None).await;
        assert_eq!(a.status, *want, "{token} {method} {path}: {}", a.body);
        if a.status == 403 {
            let error = a.json()["error"].as_str().unwrap().to_owned();
            assert!(
                error.contains("role viewer") || error.contains("role operator"),
                "{error}"
            );
        }
    }
    r.stop().await;
}

#[tokio::test]
async fn a_token_list_with_only_bad_entries_locks_the_api() {
    let (r, _l, _d) = start("  api_tokens:\n    - {name: x, role: admin, sha256: nothex}\n").await;
    assert_eq!(
        call(&r, "GET", "/api/v1/jobs", None, None).await.status,
        401
    );
    assert_eq!(
        call(&r, "GET", "/api/v1/jobs", Some("nothex"), None)
            .await
            .status,
        401
    );
    r.stop().await;
}

#[tokio::test]
async fn query_tokens_work_on_ws_and_the_legacy_paths_only() {
    let (r, _l, _d) = start(&tokens()).await;
    for path in ["/config", "/running", "/timeline"] {
        let a = call(&r, "GET", &format!("{path}?token={VIEWER}"), None, None).await;
        assert_eq!(a.status, 200, "{path}: {}", a.body);
    }
    // Tokens in URLs end up in logs and histories; the JSON API takes only the header.
    let a = call(
        &r,
        "GET",
        &format!("/api/v1/jobs?token={VIEWER}"),
        None,
        None,
    )
    .await;
    assert_eq!(a.status, 401);
    assert_eq!(ws(&r, "?token=spt_nobody", None).await.err(), Some(401));
    // A viewer's socket reads but may not act.
    let mut viewer = ws(&r, &format!("?token={VIEWER}"), None).await.unwrap();
    recv_type(&mut viewer, "config").await;
    viewer.send(Message::text(r#"{"run":"j"}"#)).await.unwrap();
    let error = recv_type(&mut viewer, "error").await;
    assert_eq!(error["command"], "run");
    assert!(
        error["error"].as_str().unwrap().contains("operator"),
        "{error}"
    );
    viewer
        .send(Message::text(r#"{"killCron":"j"}"#))
        .await
        .unwrap();
    assert_eq!(recv_type(&mut viewer, "error").await["command"], "killCron");
    // An operator's socket acts.
    let mut op = ws(&r, &format!("?token={OPERATOR}"), None).await.unwrap();
    recv_type(&mut op, "config").await;
    op.send(Message::text(r#"{"subscribe":["j"]}"#))
        .await
        .unwrap();
    op.send(Message::text(r#"{"run":"j"}"#)).await.unwrap();
    let mut started = false;
    for _ in 0..5 {
        let status = recv_type(&mut op, "status").await;
        if status["running"].as_object().is_some_and(|m| !m.is_empty()) {
            started = true;
            break;
        }
    }
    assert!(started, "the operator's run did not start");
    r.stop().await;
}

#[tokio::test]
async fn a_host_the_master_does_not_know_is_refused() {
    let (r, _l, _d) = start(&format!(
        "{}  api_public_names: [cron.example.net]\n",
        tokens()
    ))
    .await;
    let port = r.api_addr.port();
    // (Host, expected status) for a viewer reading the job list.
    let table: &[(String, u16)] = &[
        (format!("127.0.0.1:{port}"), 200),
        (format!("localhost:{port}"), 200),
        (format!("[::1]:{port}"), 200),
        ("cron.example.net".to_owned(), 200),
        (format!("CRON.example.net:{port}"), 200),
        (format!("rebind.attacker.example:{port}"), 421),
        ("attacker.example".to_owned(), 421),
        (format!("10.1.2.3:{port}"), 421),
        (format!("localhost.attacker.example:{port}"), 421),
    ];
    for (host, want) in table {
        let a = call(&r, "GET", "/api/v1/jobs", Some(VIEWER), Some(host)).await;
        assert_eq!(a.status, *want, "{host}: {}", a.body);
        if *want == 421 {
            assert!(
                a.json()["error"]
                    .as_str()
                    .unwrap()
                    .contains("api_public_names"),
                "{}",
                a.body
            );
        }
    }
    // The dashboard's page and the socket are refused the same way.
    let evil = Some("attacker.example");
    assert_eq!(call(&r, "GET", "/", None, evil).await.status, 421);
    assert_eq!(
        call(&r, "POST", "/api/v1/jobs/j/run", Some(ADMIN), evil)
            .await
            .status,
        421
    );
    assert_eq!(
        ws(&r, &format!("?token={VIEWER}"), evil).await.err(),
        Some(421)
    );
    r.stop().await;
}

#[tokio::test]
async fn every_answer_carries_the_security_headers() {
    let (r, _l, _d) = start(&tokens()).await;
    let answers = [
        call(&r, "GET", "/", None, None).await,
        call(&r, "GET", "/assets/app.js", None, None).await,
        call(&r, "GET", "/api/v1/jobs", Some(VIEWER), None).await,
        call(&r, "GET", "/api/v1/jobs", None, None).await,
        call(&r, "GET", "/api/v1/audit", Some(VIEWER), None).await,
        call(&r, "GET", "/", None, Some("attacker.example")).await,
        call(&r, "GET", "/nope", Some(VIEWER), None).await,
    ];
    for a in &answers {
        let csp = a.header("content-security-policy").unwrap_or_else(|| {
            panic!("no CSP on {} {}", a.status, a.head);
        });
        assert!(csp.contains("frame-ancestors 'none'"), "{csp}");
        assert!(csp.contains("script-src 'self'"), "{csp}");
        assert!(!csp.contains("unsafe-inline"), "{csp}");
        assert_eq!(a.header("x-content-type-options"), Some("nosniff"));
        assert_eq!(a.header("referrer-policy"), Some("no-referrer"));
    }
    // The policy forbids inline script and style, so the page must have none.
    let page = &answers[0].body;
    assert!(page.contains("<script src="), "{page}");
    for inline in ["<script>", "<style", "style=", "onclick=", "onload="] {
        assert!(!page.contains(inline), "inline {inline:?} in the page");
    }
    r.stop().await;
}

/// The audit trail as the admin reads it.
async fn audit(r: &Running) -> Vec<Value> {
    let a = call(r, "GET", "/api/v1/audit?limit=50", Some(ADMIN), None).await;
    assert_eq!(a.status, 200, "{}", a.body);
    a.json()["entries"].as_array().unwrap().clone()
}

fn find<'a>(entries: &'a [Value], action: &str, actor: &str) -> Option<&'a Value> {
    entries
        .iter()
        .find(|e| e["action"] == action && e["actor"] == actor)
}

#[tokio::test]
async fn acts_are_audited_with_their_actor_and_source() {
    let (r, _l, dir) = start(&tokens()).await;
    let run = call(&r, "POST", "/api/v1/jobs/j/run", Some(OPERATOR), None).await;
    let instance = run.json()["instance"].as_str().unwrap().to_owned();
    let kill_path = format!("/api/v1/runs/{instance}/kill");
    assert_eq!(
        call(&r, "POST", &kill_path, Some(OPERATOR), None)
            .await
            .status,
        202
    );
    // A refused act is recorded as refused.
    let again = call(&r, "POST", "/api/v1/jobs/nope/run", Some(ADMIN), None).await;
    assert_eq!(again.status, 404);
    // Through the socket, under the name of the socket's token.
    let mut op = ws(&r, &format!("?token={ADMIN}"), None).await.unwrap();
    recv_type(&mut op, "config").await;
    op.send(Message::text(r#"{"run":"k"}"#)).await.unwrap();
    recv_type(&mut op, "status").await;
    // A configuration change with maintenance.
    let conf = dir.path().join("conf");
    let before = r.config.borrow().serial;
    std::fs::write(
        conf.join("maint.yaml"),
        "saltpeter_maintenance:\n  global: false\n  machines: [m9]\n",
    )
    .unwrap();
    let mut config = r.config.clone();
    tokio::time::timeout(Duration::from_secs(10), async {
        while config.borrow_and_update().serial == before {
            config.changed().await.unwrap();
        }
    })
    .await
    .expect("the configuration was not reloaded");
    // The engine records what it took in; give it a moment to see the change.
    let mut entries = Vec::new();
    for _ in 0..100 {
        entries = audit(&r).await;
        if find(&entries, "maintenance", "config").is_some()
            && find(&entries, "run", "root").is_some()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let run = find(&entries, "run", "alice").expect("alice's run");
    assert_eq!(run["source"], "127.0.0.1");
    assert_eq!(run["job"], "j");
    assert_eq!(run["instance"], instance.as_str());
    assert_eq!(run["ok"], true);
    let kill = find(&entries, "kill", "alice").expect("alice's kill");
    assert_eq!(kill["instance"], instance.as_str());
    assert_eq!(kill["source"], "127.0.0.1");
    let refused = find(&entries, "run", "root").expect("root's runs");
    let refused = entries
        .iter()
        .find(|e| e["action"] == "run" && e["actor"] == "root" && e["job"] == "nope")
        .unwrap_or(refused);
    assert_eq!(refused["ok"], false, "{refused}");
    assert!(
        entries
            .iter()
            .any(|e| e["action"] == "run" && e["actor"] == "root" && e["job"] == "k"),
        "the socket's run: {entries:?}"
    );
    let reload = find(&entries, "config_reload", "config").expect("the reload");
    assert!(reload["source"].is_null());
    let maint = find(&entries, "maintenance", "config").expect("the maintenance change");
    assert!(maint["detail"].as_str().unwrap().contains("m9"), "{maint}");
    // Newest first, ids growing.
    let ids: Vec<i64> = entries.iter().map(|e| e["id"].as_i64().unwrap()).collect();
    assert!(ids.windows(2).all(|w| w[0] > w[1]), "{ids:?}");
    // Pages.
    let page = call(&r, "GET", "/api/v1/audit?limit=1", Some(ADMIN), None)
        .await
        .json();
    assert_eq!(page["entries"].as_array().unwrap().len(), 1);
    let next = page["next_before"].as_i64().unwrap();
    let page2 = call(
        &r,
        "GET",
        &format!("/api/v1/audit?limit=1&before={next}"),
        Some(ADMIN),
        None,
    )
    .await
    .json();
    assert!(page2["entries"][0]["id"].as_i64().unwrap() < next);
    for bad in ["limit=0", "limit=100001", "before=x"] {
        let a = call(
            &r,
            "GET",
            &format!("/api/v1/audit?{bad}"),
            Some(ADMIN),
            None,
        )
        .await;
        assert_eq!(a.status, 400, "{bad}");
    }
    // The job log names who started the run and who asked for the kill, each on a line of
    // its own after the original's lines.
    let log_path = dir.path().join("log").join("j.log");
    let mut log = String::new();
    for _ in 0..100 {
        log = std::fs::read_to_string(&log_path).unwrap_or_default();
        if log.contains("Kill of") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let lines: Vec<&str> = log.lines().collect();
    let start = lines
        .iter()
        .position(|l| l.starts_with(&format!("###### Starting {instance} at ")))
        .expect("the start line");
    assert!(
        lines[start + 1].starts_with("###### Started by alice from 127.0.0.1 at "),
        "{log}"
    );
    assert!(
        log.contains(&format!(
            "###### Kill of {instance} requested by alice from 127.0.0.1 at "
        )),
        "{log}"
    );
    // The CLI reads it too, as admin only.
    let url = format!("http://{}", r.api_addr);
    let codes = tokio::task::spawn_blocking(move || {
        let admin = cli::Client::new(&url, Some(ADMIN.into())).unwrap();
        let viewer = cli::Client::new(&url, Some(VIEWER.into())).unwrap();
        [
            cli::audit(&admin, Some(5), true).unwrap(),
            cli::audit(&admin, None, false).unwrap(),
            cli::audit(&viewer, None, false).unwrap(),
        ]
    })
    .await
    .unwrap();
    assert_eq!(codes, [0, 0, 1]);
    r.stop().await;
}

#[tokio::test]
async fn removing_a_token_closes_its_open_socket() {
    let (r, _l, dir) = start(&tokens()).await;
    let mut viewer = ws(&r, &format!("?token={VIEWER}"), None).await.unwrap();
    recv_type(&mut viewer, "config").await;
    let mut admin = ws(&r, &format!("?token={ADMIN}"), None).await.unwrap();
    recv_type(&mut admin, "config").await;
    let settings = dir.path().join("conf").join("00-settings.yaml");
    let text = std::fs::read_to_string(&settings).unwrap();
    let without: String = text
        .lines()
        .filter(|l| !l.contains("name: vera"))
        .map(|l| format!("{l}\n"))
        .collect();
    assert_ne!(text, without);
    let before = r.config.borrow().serial;
    std::fs::write(&settings, without).unwrap();
    let mut config = r.config.clone();
    tokio::time::timeout(Duration::from_secs(10), async {
        while config.borrow_and_update().serial == before {
            config.changed().await.unwrap();
        }
    })
    .await
    .expect("the configuration was not reloaded");
    let error = recv_type(&mut viewer, "error").await;
    assert!(
        error["error"].as_str().unwrap().contains("no longer valid"),
        "{error}"
    );
    let end = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match viewer.next().await {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return,
                Some(Ok(_)) => {}
            }
        }
    })
    .await;
    assert!(end.is_ok(), "the revoked socket stayed open");
    assert_eq!(
        ws(&r, &format!("?token={VIEWER}"), None).await.err(),
        Some(401)
    );
    // Other tokens' sockets carry on.
    admin
        .send(Message::text(r#"{"subscribe":["j"]}"#))
        .await
        .unwrap();
    recv_type(&mut admin, "details").await;
    r.stop().await;
}
