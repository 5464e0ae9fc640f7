//! Notification scenarios: a real `sp-master` (local launcher) sends to a real mail sink
//! (aiosmtpd, [`SmtpSink`]) and to a webhook receiver that verifies every signature
//! ([`WebhookReceiver`]).
//!
//! - A failing job mails and posts once; the next successful run sends one recovery.
//! - A notification whose first attempt failed (the receiver answered 500) is pending when the
//!   master is killed with -9; the restarted master delivers it, exactly once.
//!
//! Retries are fast (`retry_base: 1`) so each scenario takes seconds.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use serde_json::Value;

use super::Outcome;
use super::master::{Master, all_ended, machine, target_dir};
use super::notify_env::{self, Received, SmtpSink, WebhookReceiver};

const SECRET: &str = "e2e-webhook-secret";

/// How long a notification may take to arrive.
const ARRIVAL: Duration = Duration::from_secs(20);

fn settings(hook: &str, smtp: Option<std::net::SocketAddr>, retry_base: u64) -> String {
    let mut text = format!(
        "saltpeter_config:\n  launcher: local\n  logdir: '@DIR@/log'\n  data_dir: '@DIR@/data'\n  \
         default_wrapper_logdir: '@DIR@/wlog'\n  api_ws_bind_addr: 127.0.0.1\n  api_ws_port: 0\n  \
         machines_ws_bind_addr: 127.0.0.1\n  machines_ws_port: 0\n  \
         notify_delivery:\n    retry_base: {retry_base}\n    retry_max: {retry_base}\n    timeout: 5\n  \
         notify:\n    - webhook: {hook}\n      secret: {SECRET}\n      on: [failure, recovery]\n"
    );
    if let Some(addr) = smtp {
        text.push_str(&format!(
            "    - email: ops@example.org\n      on: [failure, recovery]\n  \
             smtp:\n    host: 127.0.0.1\n    port: {}\n    tls: none\n    from: saltpeter@example.org\n",
            addr.port()
        ));
    }
    text
}

/// A job that fails (exit 5) until `@DIR@/ok` exists.
fn flaky() -> String {
    "flaky:\n  sec: 0\n  min: 0\n  hour: 0\n  dom: 1\n  mon: 1\n  dow: '*'\n  year: 2099\n  \
     target_type: list\n  targets: [n1]\n  \
     command: 'if [ -e @DIR@/ok ]; then exit 0; else exit 5; fi'\n"
        .to_owned()
}

fn fresh_dir(name: &str) -> Result<std::path::PathBuf> {
    let dir = target_dir()
        .join("e2e")
        .join(format!("notify-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

fn run_to_end(master: &Master, job: &str) -> Result<Value> {
    let instance = master.run_job(job)?;
    master.wait_run(&instance, Duration::from_secs(30), all_ended)
}

fn event_of(r: &Received) -> String {
    serde_json::from_slice::<Value>(&r.body)
        .ok()
        .and_then(|v| v["event"].as_str().map(str::to_owned))
        .unwrap_or_default()
}

fn body(r: &Received) -> Value {
    serde_json::from_slice(&r.body).unwrap_or(Value::Null)
}

pub fn scenarios() -> Vec<Outcome> {
    let venv = notify_env::ensure_venv();
    std::thread::scope(|s| {
        let mail = s.spawn(|| match &venv {
            Ok(venv) => failure_then_recovery(venv),
            Err(e) => Err(anyhow::anyhow!("the e2e venv with aiosmtpd: {e:#}")),
        });
        let crash = s.spawn(pending_across_kill9);
        let join = |h: std::thread::ScopedJoinHandle<'_, Result<String>>| {
            h.join()
                .unwrap_or_else(|_| Err(anyhow::anyhow!("scenario panicked")))
        };
        vec![
            (
                "notify: a failing job mails and posts once; the next success sends one recovery"
                    .to_owned(),
                join(mail),
            ),
            (
                "notify: kill -9 with a notification pending; the restarted master delivers it once"
                    .to_owned(),
                join(crash),
            ),
        ]
    })
}

fn failure_then_recovery(venv: &super::salt_env::Venv) -> Result<String> {
    let started = Instant::now();
    let dir = fresh_dir("mail")?;
    let sink = SmtpSink::start(venv, &dir.join("smtp"))?;
    let hook = WebhookReceiver::start(Some(SECRET.to_owned()), Vec::new())?;
    let result = (|| {
        let mut master = Master::start(
            &dir,
            &[
                (
                    "settings.yaml",
                    settings(&hook.url("/hook/TOKEN"), Some(sink.addr), 1),
                ),
                ("jobs.yaml", flaky()),
            ],
        )?;
        let run = run_to_end(&master, "flaky")?;
        ensure!(machine(&run, "n1")["retcode"] == 5, "first run: {run}");
        let posts = hook.wait_for(1, ARRIVAL);
        let mails = sink.wait_for(1, ARRIVAL)?;
        ensure!(
            posts.len() == 1 && mails.len() == 1,
            "after the failure: {} posts, {} mails",
            posts.len(),
            mails.len()
        );
        let failure = body(&posts[0]);
        ensure!(
            failure["event"] == "failure"
                && failure["machines"][0]["code"] == 5
                && failure["machines"][0]["cause"] == "exit"
                && failure["failed"] == 1,
            "failure body {failure}"
        );
        ensure!(
            posts[0].signature_valid == Some(true),
            "the failure's signature does not verify"
        );
        ensure!(mails[0].contains("flaky"), "mail: {}", mails[0]);

        std::fs::write(Path::new(&dir).join("ok"), b"")?;
        let run = run_to_end(&master, "flaky")?;
        ensure!(machine(&run, "n1")["retcode"] == 0, "second run: {run}");
        let posts = hook.wait_for(2, ARRIVAL);
        let mails = sink.wait_for(2, ARRIVAL)?;
        // A third success must say nothing; give a duplicate time to show.
        let run = run_to_end(&master, "flaky")?;
        ensure!(machine(&run, "n1")["retcode"] == 0, "third run: {run}");
        std::thread::sleep(Duration::from_secs(3));
        let posts_after = hook.received();
        let mails_after = sink.messages()?;
        let events: Vec<String> = posts_after.iter().map(event_of).collect();
        ensure!(
            events == ["failure", "recovery"],
            "webhook events {events:?}"
        );
        ensure!(
            posts.len() == 2 && mails.len() == 2 && mails_after.len() == 2,
            "{} posts, {} mails (then {} mails)",
            posts.len(),
            mails.len(),
            mails_after.len()
        );
        ensure!(
            posts_after.iter().all(|r| r.signature_valid == Some(true)),
            "a signature does not verify"
        );
        ensure!(
            posts_after
                .iter()
                .all(|r| r.header("X-Saltpeter-Event").is_some()
                    && r.header("X-Saltpeter-Delivery").is_some()),
            "headers missing"
        );
        let metrics = super::http::get_text(master.api, "/metrics")?;
        ensure!(
            metrics.contains("saltpeter_notifications_delivered_total 4"),
            "metrics:\n{metrics}"
        );
        master.signal("TERM")?;
        master.wait_exit(Duration::from_secs(30))?;
        Ok(format!(
            "failure: 1 signed POST + 1 mail (code 5, cause exit); recovery: 1 + 1; a third run \
             said nothing ({:.1} s)",
            started.elapsed().as_secs_f64()
        ))
    })();
    hook.stop();
    sink.stop();
    result
}

fn pending_across_kill9() -> Result<String> {
    let started = Instant::now();
    let dir = fresh_dir("crash")?;
    // The first attempt gets a 500; everything after it a 200.
    let hook = WebhookReceiver::start(Some(SECRET.to_owned()), vec![500])?;
    let mut master = Master::start(
        &dir,
        &[
            ("settings.yaml", settings(&hook.url("/hook"), None, 4)),
            ("jobs.yaml", flaky()),
        ],
    )?;
    let run = run_to_end(&master, "flaky")?;
    ensure!(machine(&run, "n1")["retcode"] == 5, "run: {run}");
    let first = hook.wait_for(1, ARRIVAL);
    ensure!(first.len() == 1, "no first attempt arrived");
    // Wait until the master has recorded the failed attempt (the API shows it), so the row is
    // pending with a retry time rather than claimed.
    let deadline = Instant::now() + ARRIVAL;
    let shown = loop {
        let r = super::http::get(master.api, "/api/v1/notifications?state=failed")?;
        let rows = r.body["notifications"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        if let Some(row) = rows.first() {
            break row.clone();
        }
        ensure!(
            Instant::now() < deadline,
            "the failure never showed in the API"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    ensure!(
        shown["state"] == "pending"
            && shown["attempts"] == 1
            && shown["channel"] == "webhook"
            && shown["error"]
                .as_str()
                .is_some_and(|e| e.contains("HTTP 500")),
        "API row {shown}"
    );
    let shown_text = shown.to_string();
    ensure!(
        !shown_text.contains(SECRET) && !shown_text.contains("/hook"),
        "the API showed a secret or a path: {shown_text}"
    );
    master.kill9()?;
    ensure!(
        hook.received().len() == 1,
        "a second attempt before the crash"
    );
    master.relaunch().context("restarting sp-master")?;
    let got = hook.wait_for(2, ARRIVAL);
    ensure!(got.len() == 2, "after the restart: {} requests", got.len());
    // Time for a duplicate to show (retries are 2-4 s apart).
    std::thread::sleep(Duration::from_secs(6));
    let all = hook.received();
    ensure!(all.len() == 2, "{} requests in all", all.len());
    let keys: Vec<Option<&str>> = all
        .iter()
        .map(|r| r.header("X-Saltpeter-Delivery"))
        .collect();
    ensure!(
        keys[0].is_some() && keys[0] == keys[1],
        "delivery keys {keys:?}"
    );
    ensure!(
        all[0].body == all[1].body && all.iter().all(|r| r.signature_valid == Some(true)),
        "the retry sent other bytes, or a signature does not verify"
    );
    let r = super::http::get(master.api, "/api/v1/notifications?state=failed")?;
    ensure!(
        r.body["notifications"]
            .as_array()
            .is_some_and(Vec::is_empty)
            && r.body["counts"]["delivered"] == 1,
        "after delivery: {}",
        r.body
    );
    master.signal("TERM")?;
    master.wait_exit(Duration::from_secs(30))?;
    hook.stop();
    Ok(format!(
        "500, kill -9 with the row pending, restart: delivered once with the same key and bytes \
         ({:.1} s)",
        started.elapsed().as_secs_f64()
    ))
}
