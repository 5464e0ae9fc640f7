//! Shipping to Elasticsearch/OpenSearch against a local HTTP endpoint that parses every `_bulk`
//! request: the NDJSON shape, index names by UTC date, the document of each `msg_type`,
//! carriage-return clean-up, outages, restarts, partial failures and the queue cap.

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

mod support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use saltpeter_joblog::ship::{Backend, Document, LogShipper, ShipOptions, Shipper};
use saltpeter_joblog::{JobLog, LogEntry};
use serde_json::{Value, json};
use time::OffsetDateTime;
use time::macros::datetime;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// One `_bulk` request as the endpoint saw it, and the status it answered.
#[derive(Clone, Debug)]
struct Request {
    path: String,
    headers: HashMap<String, String>,
    /// (action, document) pairs.
    items: Vec<(Value, Value)>,
    status: u16,
}

type Responder = Box<dyn FnMut(&[(Value, Value)]) -> (u16, Value) + Send>;

/// A fake search backend on loopback.
struct Endpoint {
    addr: SocketAddr,
    requests: Arc<Mutex<Vec<Request>>>,
    responder: Arc<Mutex<Responder>>,
    task: tokio::task::JoinHandle<()>,
}

/// The answer of a healthy backend: every item created.
fn all_created(items: &[(Value, Value)]) -> (u16, Value) {
    let answers: Vec<Value> = items
        .iter()
        .map(|_| json!({"index": {"status": 201}}))
        .collect();
    (200, json!({"errors": false, "items": answers}))
}

impl Endpoint {
    /// Listens on `port` (0: any) of 127.0.0.1.
    async fn start(port: u16) -> Self {
        Self::start_with(port, None).await
    }

    /// Listens on any port of 127.0.0.1 with TLS, presenting the certificate `tls` holds.
    async fn start_tls(tls: Arc<rustls::ServerConfig>) -> Self {
        Self::start_with(0, Some(tokio_rustls::TlsAcceptor::from(tls))).await
    }

    async fn start_with(port: u16, tls: Option<tokio_rustls::TlsAcceptor>) -> Self {
        let listener = TcpListener::bind(("127.0.0.1", port)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let responder: Arc<Mutex<Responder>> = Arc::new(Mutex::new(Box::new(all_created)));
        let task = {
            let requests = requests.clone();
            let responder = responder.clone();
            tokio::spawn(async move {
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        return;
                    };
                    let requests = requests.clone();
                    let responder = responder.clone();
                    match tls.clone() {
                        None => drop(tokio::spawn(serve(stream, requests, responder))),
                        Some(acceptor) => drop(tokio::spawn(async move {
                            if let Ok(stream) = acceptor.accept(stream).await {
                                serve(stream, requests, responder).await;
                            }
                        })),
                    }
                }
            })
        };
        Self {
            addr,
            requests,
            responder,
            task,
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn respond(&self, f: impl FnMut(&[(Value, Value)]) -> (u16, Value) + Send + 'static) {
        *self.responder.lock() = Box::new(f);
    }

    fn requests(&self) -> Vec<Request> {
        self.requests.lock().clone()
    }
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(
    mut stream: impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    requests: Arc<Mutex<Vec<Request>>>,
    responder: Arc<Mutex<Responder>>,
) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        let n = stream.read(&mut chunk).await.unwrap();
        assert!(n > 0, "connection closed inside the request head");
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8(buf[..head_end].to_vec()).unwrap();
    let mut lines = head.split("\r\n");
    let request_line = lines.next().unwrap().to_owned();
    let headers: HashMap<String, String> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let length: usize = headers["content-length"].parse().unwrap();
    let mut body = buf[head_end + 4..].to_vec();
    while body.len() < length {
        let n = stream.read(&mut chunk).await.unwrap();
        assert!(n > 0, "connection closed inside the body");
        body.extend_from_slice(&chunk[..n]);
    }
    let (method, path) = request_line.split_once(' ').unwrap();
    assert_eq!(method, "POST");
    let path = path.trim_end_matches(" HTTP/1.1").to_owned();
    let items = parse_bulk(&String::from_utf8(body).unwrap());
    let (status, answer) = (responder.lock())(&items);
    requests.lock().push(Request {
        path,
        headers,
        items,
        status,
    });
    let answer = answer.to_string();
    let response = format!(
        "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{answer}",
        answer.len()
    );
    stream.write_all(response.as_bytes()).await.unwrap();
    let _ = stream.shutdown().await;
}

/// Checks the NDJSON framing of a `_bulk` body and splits it into (action, document) pairs.
fn parse_bulk(body: &str) -> Vec<(Value, Value)> {
    assert!(body.ends_with('\n'), "NDJSON must end with a newline");
    let lines: Vec<&str> = body.trim_end_matches('\n').split('\n').collect();
    assert_eq!(
        lines.len() % 2,
        0,
        "action and document lines come in pairs"
    );
    lines
        .chunks(2)
        .map(|pair| {
            let action: Value = serde_json::from_str(pair[0]).unwrap();
            let doc: Value = serde_json::from_str(pair[1]).unwrap();
            let obj = action.as_object().unwrap();
            assert_eq!(obj.len(), 1, "one action per item: {action}");
            let meta = action["index"].as_object().unwrap();
            assert!(meta.contains_key("_index") && meta.contains_key("_id"));
            assert!(!meta.contains_key("_type"), "no mapping types (ES 8, OS 2)");
            (action, doc)
        })
        .collect()
}

/// The documents the backend accepted (from requests it answered 200, item by item).
fn accepted(requests: &[Request], answered_ok: impl Fn(&Value) -> bool) -> Vec<Value> {
    requests
        .iter()
        .filter(|r| r.status == 200)
        .flat_map(|r| r.items.iter())
        .filter(|(_, doc)| answered_ok(doc))
        .map(|(_, doc)| doc.clone())
        .collect()
}

fn instances(docs: &[Value]) -> Vec<String> {
    docs.iter()
        .map(|d| d["job_instance"].as_str().unwrap().to_owned())
        .collect()
}

fn options(dir: &Path) -> ShipOptions {
    let mut o = ShipOptions::new(dir.join("ship"));
    o.timeout = Duration::from_secs(2);
    o.backoff_base = Duration::from_millis(20);
    o.backoff_cap = Duration::from_millis(200);
    o
}

fn backend(name: &str, url: &str, prefix: &str) -> Backend {
    Backend {
        name: name.into(),
        url: url.into(),
        index_prefix: prefix.into(),
        ca: None,
    }
}

fn doc(n: usize) -> Document {
    let at = datetime!(2025-06-01 12:00 UTC) + time::Duration::seconds(n as i64);
    let mut d = Document::new("start", "j", "g", &format!("j_{n}"), at);
    d.output = format!("document {n}");
    d
}

/// Polls `cond` for up to `secs` seconds.
async fn wait_for(secs: u64, what: &str, mut cond: impl FnMut() -> bool) {
    for _ in 0..secs * 50 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out waiting for {what}");
}

/// Dropping a shipper joins its threads; keep that off the runtime's workers.
async fn stop(shipper: Shipper) {
    tokio::task::spawn_blocking(move || drop(shipper))
        .await
        .unwrap();
}

/// A port nothing listens on (bound, then released).
async fn closed_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap().port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_log_event_becomes_a_document_of_the_original_shape_in_both_backends() {
    let dir = tempfile::tempdir().unwrap();
    let es = Endpoint::start(0).await;
    let os = Endpoint::start(0).await;
    let es_url = format!("http://elastic:s%40cret@{}", es.addr);
    let shipper = Shipper::start(
        vec![
            backend("elasticsearch", &es_url, "saltpeter"),
            backend("opensearch", &os.url(), "sp-os"),
        ],
        options(dir.path()),
    )
    .unwrap();
    let group_of = Box::new(|job: &str| format!("group-of-{job}"));
    let log = JobLog::start_shipping(
        dir.path().join("spool"),
        Some(LogShipper::new(shipper, group_of, 1 << 20)),
    )
    .unwrap();
    let logdir: Arc<Path> = dir.path().join("logs").into();
    // 23:30 at UTC-2 is 01:30 the next day in UTC: the index takes the UTC date (docs/COMPATIBILITY.md: index dates).
    let at = datetime!(2025-12-31 23:30 -2);
    let (job, inst) = ("backup".to_owned(), "backup_1767231000".to_owned());
    let entries = vec![
        LogEntry::Start {
            job: job.clone(),
            instance: inst.clone(),
            at,
        },
        LogEntry::Skipped {
            job: job.clone(),
            instance: inst.clone(),
            machine: "m9".into(),
            why: "Target under maintenance".into(),
            at,
        },
        LogEntry::MachineStart {
            job: job.clone(),
            instance: inst.clone(),
            machine: "m1".into(),
            at,
        },
        LogEntry::Output {
            instance: inst.clone(),
            machine: "m1".into(),
            text: "progress 10%\rprogress 100%\nline two\r\n".into(),
        },
        LogEntry::Output {
            instance: inst.clone(),
            machine: "m1".into(),
            text: "tail\r".into(),
        },
        LogEntry::MachineResult {
            job: job.clone(),
            instance: inst.clone(),
            machine: "m1".into(),
            code: 0,
            at,
        },
        LogEntry::MachineResult {
            job: job.clone(),
            instance: inst.clone(),
            machine: "m2".into(),
            code: 253,
            at,
        },
        LogEntry::End {
            job: job.clone(),
            instance: inst.clone(),
            at,
            total: 2,
            failed: 1,
            success: false,
        },
        LogEntry::Overlap {
            job: job.clone(),
            running: inst.clone(),
            at,
        },
        LogEntry::NoMachines {
            job: job.clone(),
            instance: "backup_2".into(),
        },
    ];
    for entry in entries {
        log.record(&logdir, entry);
    }
    let count = |e: &Endpoint| accepted(&e.requests(), |_| true).len();
    wait_for(10, "eight documents in each backend", || {
        count(&es) >= 8 && count(&os) >= 8
    })
    .await;

    for (endpoint, prefix) in [(&es, "saltpeter"), (&os, "sp-os")] {
        let requests = endpoint.requests();
        for r in &requests {
            assert!(r.path.starts_with("/_bulk"), "{}", r.path);
            assert_eq!(r.headers["content-type"], "application/x-ndjson");
            for (action, doc) in &r.items {
                // The event's UTC date; `no_machines` has no time of its own and takes now.
                let want = match doc["msg_type"].as_str() {
                    Some("no_machines") => {
                        let ts = doc["@timestamp"].as_str().unwrap();
                        format!("{prefix}-{}", ts[..10].replace('-', "."))
                    }
                    _ => format!("{prefix}-2026.01.01"),
                };
                assert_eq!(action["index"]["_index"], want);
            }
        }
        let docs = accepted(&requests, |_| true);
        assert_eq!(docs.len(), 8, "every event exactly once, no output chunks");
        let by_type =
            |t: &str| -> Vec<&Value> { docs.iter().filter(|d| d["msg_type"] == t).collect() };
        for d in &docs {
            let keys: Vec<&str> = d.as_object().unwrap().keys().map(|k| k.as_str()).collect();
            for key in [
                "job_name",
                "group",
                "job_instance",
                "@timestamp",
                "return_code",
                "machine",
                "output",
                "msg_type",
            ] {
                assert!(keys.contains(&key), "{key} missing in {d}");
            }
            assert_eq!(d["job_name"], "backup");
            assert_eq!(d["group"], "group-of-backup");
            if d["msg_type"] != "no_machines" {
                assert_eq!(d["@timestamp"], "2026-01-01T01:30:00.000000Z", "{d}");
            }
            assert!(d.get("output_truncated").is_none());
        }
        let start = by_type("start");
        assert_eq!(start.len(), 1);
        assert_eq!(
            (
                start[0]["job_instance"].as_str(),
                start[0]["machine"].as_str()
            ),
            (Some(inst.as_str()), Some(""))
        );
        let maintenance = by_type("maintenance");
        assert_eq!(maintenance[0]["machine"], "m9");
        assert_eq!(maintenance[0]["return_code"], 0);
        assert_eq!(maintenance[0]["output"], "Target under maintenance");
        assert_eq!(by_type("machine_start")[0]["machine"], "m1");
        let results = by_type("machine_result");
        assert_eq!(results.len(), 2);
        let m1 = results.iter().find(|d| d["machine"] == "m1").unwrap();
        assert_eq!(m1["return_code"], 0);
        // The full output, carriage returns processed.
        assert_eq!(m1["output"], "progress 100%\nline two\ntail");
        let m2 = results.iter().find(|d| d["machine"] == "m2").unwrap();
        assert_eq!(
            (m2["return_code"].as_i64(), m2["output"].as_str()),
            (Some(253), Some(""))
        );
        let end = by_type("end");
        assert_eq!(end[0]["return_code"], 1, "one machine failed");
        assert_eq!(end[0]["output"], "Completed: 1/2 targets successful");
        assert_eq!(by_type("overlap")[0]["job_instance"], inst.as_str());
        let none = by_type("no_machines");
        assert_eq!(none[0]["job_instance"], "backup_2");
        let ts = none[0]["@timestamp"].as_str().unwrap();
        let parsed =
            OffsetDateTime::parse(ts, &time::format_description::well_known::Rfc3339).unwrap();
        assert!((OffsetDateTime::now_utc() - parsed).abs() < time::Duration::minutes(5));
    }
    // Basic auth from the URL's userinfo (percent-decoded): elastic:s@cret.
    assert!(
        es.requests()
            .iter()
            .all(|r| r.headers["authorization"] == "Basic ZWxhc3RpYzpzQGNyZXQ=")
    );
    assert!(
        os.requests()
            .iter()
            .all(|r| !r.headers.contains_key("authorization"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_output_keeps_head_and_tail_and_records_the_cut() {
    let dir = tempfile::tempdir().unwrap();
    let es = Endpoint::start(0).await;
    let shipper = Shipper::start(
        vec![backend("elasticsearch", &es.url(), "saltpeter")],
        options(dir.path()),
    )
    .unwrap();
    let log = JobLog::start_shipping(
        dir.path().join("spool"),
        Some(LogShipper::new(shipper, Box::new(|_: &str| "g".into()), 20)),
    )
    .unwrap();
    let logdir: Arc<Path> = dir.path().join("logs").into();
    let at = datetime!(2025-06-01 12:00 UTC);
    let text = format!("HEAD-{}-TAIL\n", "x".repeat(1000));
    log.record(
        &logdir,
        LogEntry::Output {
            instance: "j_1".into(),
            machine: "m".into(),
            text: text.clone(),
        },
    );
    log.record(
        &logdir,
        LogEntry::MachineResult {
            job: "j".into(),
            instance: "j_1".into(),
            machine: "m".into(),
            code: 0,
            at,
        },
    );
    wait_for(10, "the machine_result document", || {
        !accepted(&es.requests(), |_| true).is_empty()
    })
    .await;
    let docs = accepted(&es.requests(), |_| true);
    let d = &docs[0];
    assert_eq!(d["output_truncated"], true);
    assert_eq!(d["output_bytes"], text.len());
    let out = d["output"].as_str().unwrap();
    assert!(out.starts_with("HEAD-xxxxx\n[... "), "{out}");
    assert!(out.ends_with("xxxx-TAIL\n"), "{out}");
    assert!(out.contains(&format!("{} bytes omitted", text.len() - 20)));
    // The log file still has every byte.
    let logfile = dir.path().join("logs/j.log");
    wait_for(5, "the log file", || {
        std::fs::read_to_string(&logfile).is_ok_and(|t| t.contains(&text))
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let port = closed_port().await;
    let shipper = Shipper::start(
        vec![backend(
            "elasticsearch",
            &format!("127.0.0.1:{port}"),
            "saltpeter",
        )],
        options(dir.path()),
    )
    .unwrap();
    for n in 0..50 {
        shipper.ship(&doc(n));
    }
    wait_for(10, "a few failed attempts", || {
        shipper.stats("elasticsearch").unwrap().failed_requests >= 3
    })
    .await;
    assert_eq!(shipper.stats("elasticsearch").unwrap().delivered, 0);
    let es = Endpoint::start(port).await;
    wait_for(10, "delivery after the outage", || shipper.drained()).await;
    let stats = shipper.stats("elasticsearch").unwrap();
    assert_eq!((stats.queued, stats.delivered), (50, 50));
    let mut got = instances(&accepted(&es.requests(), |_| true));
    got.sort_by_key(|i| i[2..].parse::<usize>().unwrap());
    let want: Vec<String> = (0..50).map(|n| format!("j_{n}")).collect();
    assert_eq!(got, want, "every document exactly once");
    stop(shipper).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_resumes_from_the_disk_queue_without_resending_acknowledged_batches() {
    let dir = tempfile::tempdir().unwrap();
    let es = Endpoint::start(0).await;
    let backends = || vec![backend("elasticsearch", &es.url(), "saltpeter")];
    let shipper = Shipper::start(backends(), options(dir.path())).unwrap();
    for n in 0..3 {
        shipper.ship(&doc(n));
    }
    wait_for(10, "the first documents", || {
        shipper.stats("elasticsearch").unwrap().delivered == 3
    })
    .await;
    // The backend goes bad; what is shipped now stays queued.
    es.respond(|_| (503, json!({"error": "unavailable"})));
    for n in 3..6 {
        shipper.ship(&doc(n));
    }
    wait_for(10, "a failed attempt", || {
        shipper.stats("elasticsearch").unwrap().failed_requests >= 1
    })
    .await;
    stop(shipper).await;

    es.respond(all_created);
    let shipper = Shipper::start(backends(), options(dir.path())).unwrap();
    wait_for(10, "the queued documents after the restart", || {
        shipper.stats("elasticsearch").unwrap().delivered == 3 && shipper.drained()
    })
    .await;
    // Nothing more is coming: give a stray resend the chance to show up.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let got = instances(&accepted(&es.requests(), |_| true));
    assert_eq!(got, ["j_0", "j_1", "j_2", "j_3", "j_4", "j_5"]);
    let stats = shipper.stats("elasticsearch").unwrap();
    assert_eq!((stats.queued, stats.delivered), (0, 3));
    stop(shipper).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partial_failure_retries_only_the_failed_items_and_drops_mapping_errors() {
    let dir = tempfile::tempdir().unwrap();
    let es = Endpoint::start(0).await;
    let seen: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
    {
        let seen = seen.clone();
        // Per document, whatever batch it is in: j_1 is rate limited once, j_3 meets a shard
        // failure once, j_2 never fits the mapping.
        es.respond(move |items| {
            let mut seen = seen.lock();
            let answers: Vec<Value> = items
                .iter()
                .map(|(_, d)| {
                    let inst = d["job_instance"].as_str().unwrap().to_owned();
                    let times = seen.entry(inst.clone()).or_default();
                    *times += 1;
                    let status = match (inst.as_str(), *times) {
                        ("j_1", 1) => 429,
                        ("j_3", 1) => 503,
                        ("j_2", _) => 400,
                        _ => 201,
                    };
                    let error = (status >= 300).then(
                        || json!({"type": "mapper_parsing_exception", "reason": "failed to parse"}),
                    );
                    json!({"index": {"status": status, "error": error}})
                })
                .collect();
            (200, json!({"errors": true, "items": answers}))
        });
    }
    let shipper = Shipper::start(
        vec![backend("elasticsearch", &es.url(), "saltpeter")],
        options(dir.path()),
    )
    .unwrap();
    for n in 0..5 {
        shipper.ship(&doc(n));
    }
    wait_for(10, "all but the refused document", || {
        shipper.stats("elasticsearch").unwrap().delivered == 4 && shipper.drained()
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let sent = seen.lock().clone();
    let want: HashMap<String, usize> = [("j_0", 1), ("j_1", 2), ("j_2", 1), ("j_3", 2), ("j_4", 1)]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
    assert_eq!(
        sent, want,
        "only failed items go again; a 400 is not retried"
    );
    let stats = shipper.stats("elasticsearch").unwrap();
    assert_eq!((stats.delivered, stats.rejected, stats.requeued), (4, 1, 2));
    // A retried item keeps its id, so a resend can only overwrite.
    let ids: Vec<(String, String)> = es
        .requests()
        .iter()
        .flat_map(|r| r.items.iter())
        .map(|(a, d)| {
            (
                d["job_instance"].as_str().unwrap().to_owned(),
                a["index"]["_id"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    for (inst, id) in &ids {
        assert!(ids.iter().all(|(i, other)| i != inst || other == id));
    }
    stop(shipper).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_drops_the_oldest_documents_and_counts_them() {
    let dir = tempfile::tempdir().unwrap();
    let port = closed_port().await;
    let mut opts = options(dir.path());
    let line = serde_json::to_string(&doc(99)).unwrap().len() as u64 + 100;
    opts.segment_bytes = line * 4;
    opts.queue_bytes = line * 20;
    let cap = opts.queue_bytes;
    let shipper = Shipper::start(
        vec![backend(
            "elasticsearch",
            &format!("http://127.0.0.1:{port}"),
            "saltpeter",
        )],
        opts,
    )
    .unwrap();
    for n in 0..100 {
        shipper.ship(&doc(n));
    }
    let stats = shipper.stats("elasticsearch").unwrap();
    assert!(stats.dropped_full >= 70, "{stats:?}");
    assert!(queue_bytes(&dir.path().join("ship/elasticsearch")) <= cap);
    let es = Endpoint::start(port).await;
    wait_for(10, "the rest of the queue", || shipper.drained()).await;
    let stats = shipper.stats("elasticsearch").unwrap();
    let got = instances(&accepted(&es.requests(), |_| true));
    // Every document is counted once: delivered, or dropped for space. A batch the sender
    // had taken before its segment was dropped may still go out (it was not lost after all),
    // so besides the newest documents the backend may get one older batch, in order.
    assert_eq!(stats.delivered + stats.dropped_full, 100, "{stats:?}");
    assert_eq!(got.len() as u64, stats.delivered);
    let numbers: Vec<usize> = got
        .iter()
        .map(|i| i.trim_start_matches("j_").parse().unwrap())
        .collect();
    assert!(numbers.windows(2).all(|w| w[0] < w[1]), "{got:?}");
    let newest: Vec<usize> = (84..100).collect();
    assert!(numbers.ends_with(&newest), "{got:?}");
    stop(shipper).await;
}

/// A server configuration for a certificate made for 127.0.0.1 and a CA file (the
/// certificate itself, self-signed) to verify it with.
fn tls_endpoint(dir: &Path) -> (Arc<rustls::ServerConfig>, std::path::PathBuf) {
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let ca = dir.join("es-ca.pem");
    std::fs::write(&ca, cert.pem()).unwrap();
    let der = rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(saltpeter_tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.der().clone()], der)
        .unwrap();
    (Arc::new(config), ca)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn documents_go_over_https_verified_with_ship_ca() {
    let dir = tempfile::tempdir().unwrap();
    let (tls, ca) = tls_endpoint(dir.path());
    let es = Endpoint::start_tls(tls).await;
    let url = format!("https://elastic:secret@{}", es.addr);
    let mut verified = backend("elasticsearch", &url, "saltpeter");
    verified.ca = Some(ca);
    // Another backend on the same server that trusts only the system's roots, which never
    // signed this certificate, delivers nothing.
    let unverified = backend("opensearch", &format!("https://{}", es.addr), "os");
    let shipper = Shipper::start(vec![verified, unverified], options(dir.path())).unwrap();
    for n in 0..3 {
        shipper.ship(&doc(n));
    }
    wait_for(10, "three documents over https", || {
        accepted(&es.requests(), |_| true).len() >= 3
    })
    .await;
    let requests = es.requests();
    assert!(requests.iter().all(|r| r.path.starts_with("/_bulk")));
    assert!(
        requests
            .iter()
            .all(|r| r.headers.get("authorization").map(String::as_str)
                == Some("Basic ZWxhc3RpYzpzZWNyZXQ="))
    );
    let indices: Vec<String> = requests
        .iter()
        .flat_map(|r| r.items.iter())
        .map(|(action, _)| action["index"]["_index"].as_str().unwrap().to_owned())
        .collect();
    assert!(
        indices.iter().all(|i| i.starts_with("saltpeter-")),
        "{indices:?}"
    );
    stop(shipper).await;
}

#[test]
fn an_unreadable_ca_file_is_refused_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let mut os = backend("opensearch", "https://os:9200", "saltpeter");
    os.ca = Some(dir.path().join("missing-ca.pem"));
    let err = Shipper::start(vec![os], options(dir.path())).unwrap_err();
    assert!(err.to_string().contains("CA file"), "{err}");
}

fn queue_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".ndjson"))
        .map(|e| e.metadata().unwrap().len())
        .sum()
}

/// The production wiring: `server::start` ships when a URL is configured, with the job file's
/// name as the group.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_master_ships_when_a_url_is_configured() {
    use saltpeter_master::server::{self, Options};
    let es = Endpoint::start(0).await;
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("conf");
    std::fs::create_dir_all(&conf).unwrap();
    let settings = format!(
        "saltpeter_config:\n  logdir: {0}/log\n  data_dir: {0}/data\n  elasticsearch: {1}\n  elasticsearch_index: sp\n",
        dir.path().display(),
        es.url()
    );
    std::fs::write(conf.join("00-settings.yaml"), settings).unwrap();
    std::fs::write(conf.join("nightly.yaml"), support::job("j", "[m1]", "")).unwrap();
    let running = server::start(Options {
        config_dir: conf,
        machines_listener: Some(TcpListener::bind("127.0.0.1:0").await.unwrap()),
        api_listener: Some(TcpListener::bind("127.0.0.1:0").await.unwrap()),
        launcher: Some(Arc::new(support::FakeLauncher::default())),
        clock: None,
    })
    .await
    .unwrap();
    let api = saltpeter_http::Client::new(&format!("http://{}", running.api_addr), None).unwrap();
    let response = tokio::task::spawn_blocking(move || api.post("/api/v1/jobs/j/run"))
        .await
        .unwrap()
        .unwrap();
    assert!(response.status < 300, "{response:?}");
    wait_for(10, "start and machine_start", || {
        let docs = accepted(&es.requests(), |_| true);
        ["start", "machine_start"]
            .iter()
            .all(|t| docs.iter().any(|d| d["msg_type"] == *t))
    })
    .await;
    for (action, doc) in es.requests().iter().flat_map(|r| r.items.iter()) {
        assert_eq!(doc["group"], "nightly");
        assert_eq!(doc["job_name"], "j");
        assert!(
            action["index"]["_index"]
                .as_str()
                .unwrap()
                .starts_with("sp-")
        );
    }
    assert!(dir.path().join("data/ship/elasticsearch").is_dir());
    running.shutdown.cancel();
}
