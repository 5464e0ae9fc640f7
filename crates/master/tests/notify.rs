//! Notifications through the production wiring (`server::start`): a failed run becomes an
//! outbox row, the stop protocol ends with the row still there when its receiver is down, and
//! the next master on the same data directory delivers it, with each machine's code and cause.

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use saltpeter_master::server::{self, Options, Running};
use tokio::net::TcpListener;

/// Bodies of the POSTs a tiny HTTP receiver got; it answers 200 to each.
fn receiver(listener: std::net::TcpListener) -> Arc<Mutex<Vec<Vec<u8>>>> {
    let got = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&got);
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            stream
                .set_read_timeout(Some(Duration::from_secs(5)))
                .unwrap();
            let mut reader = BufReader::new(&stream);
            let mut length = 0usize;
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 {
                    break;
                }
                let line = line.trim_end();
                if line.is_empty() {
                    let mut body = vec![0; length];
                    if reader.read_exact(&mut body).is_ok() {
                        seen.lock().push(body);
                    }
                    let _ = (&stream).write_all(
                        b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                    );
                    break;
                }
                if let Some((k, v)) = line.split_once(':')
                    && k.eq_ignore_ascii_case("content-length")
                {
                    length = v.trim().parse().unwrap_or(0);
                }
            }
        }
    });
    got
}

async fn start(conf: &std::path::Path, launcher: Arc<support::FakeLauncher>) -> Running {
    server::start(Options {
        config_dir: conf.to_owned(),
        machines_listener: Some(TcpListener::bind("127.0.0.1:0").await.unwrap()),
        api_listener: Some(TcpListener::bind("127.0.0.1:0").await.unwrap()),
        launcher: Some(launcher),
        clock: None,
    })
    .await
    .unwrap()
}

async fn get(running: &Running, path: &str) -> (u16, String) {
    let api = saltpeter_http::Client::new(&format!("http://{}", running.api_addr), None).unwrap();
    let path = path.to_owned();
    let r = tokio::task::spawn_blocking(move || api.get(&path))
        .await
        .unwrap()
        .unwrap();
    (r.status, r.body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_waits_in_the_outbox_across_a_stop_and_the_next_master_delivers_it() {
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("conf");
    std::fs::create_dir_all(&conf).unwrap();
    // A port nobody listens on yet: the first master's attempts are refused.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let settings = format!(
        "saltpeter_config:\n  logdir: {0}/log\n  data_dir: {0}/data\n  \
         notify_delivery:\n    retry_base: 1\n    retry_max: 1\n    timeout: 2\n  \
         notify:\n    - webhook: http://127.0.0.1:{port}/hook\n      secret: not-in-the-api\n",
        dir.path().display()
    );
    std::fs::write(conf.join("00-settings.yaml"), settings).unwrap();
    std::fs::write(conf.join("jobs.yaml"), support::job("j", "[m1]", "")).unwrap();
    let launcher = Arc::new(support::FakeLauncher::default());
    launcher.fail("m1", "no route to m1");
    let running = start(&conf, Arc::clone(&launcher)).await;
    let api = saltpeter_http::Client::new(&format!("http://{}", running.api_addr), None).unwrap();
    let r = tokio::task::spawn_blocking(move || api.post("/api/v1/jobs/j/run"))
        .await
        .unwrap()
        .unwrap();
    assert!(r.status < 300, "{r:?}");
    let deadline = Instant::now() + Duration::from_secs(20);
    let failed = loop {
        let (status, text) = get(&running, "/api/v1/notifications?state=failed").await;
        assert_eq!(status, 200, "{text}");
        if text.contains("\"event\":\"failure\"") {
            break text;
        }
        assert!(Instant::now() < deadline, "no failed attempt shown: {text}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        !failed.contains("not-in-the-api") && !failed.contains("/hook"),
        "{failed}"
    );
    let (_, metrics) = get(&running, "/metrics").await;
    assert!(
        metrics.contains("saltpeter_notifications_pending 1"),
        "{metrics}"
    );
    tokio::time::timeout(Duration::from_secs(30), running.stop())
        .await
        .expect("the stop protocol ends with a notification pending");

    let got = receiver(std::net::TcpListener::bind(("127.0.0.1", port)).unwrap());
    let running = start(&conf, launcher).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while got.lock().is_empty() {
        assert!(Instant::now() < deadline, "the next master did not deliver");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Time for a duplicate to show.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let bodies = got.lock().clone();
    assert_eq!(bodies.len(), 1, "delivered once");
    let body: serde_json::Value = serde_json::from_slice(&bodies[0]).unwrap();
    assert_eq!(body["event"], "failure");
    assert_eq!(body["job"], "j");
    assert_eq!(body["machines"][0]["machine"], "m1");
    assert_eq!(body["machines"][0]["code"], 254);
    assert_eq!(body["machines"][0]["cause"], "not_started");
    assert!(
        body["link"]
            .as_str()
            .unwrap()
            .contains(&format!("/#/run/{}", body["instance"].as_str().unwrap())),
        "{body}"
    );
    let (_, metrics) = get(&running, "/metrics").await;
    assert!(
        metrics.contains("saltpeter_notifications_delivered_total 1")
            && metrics.contains("saltpeter_notifications_pending 0"),
        "{metrics}"
    );
    running.stop().await;
}
