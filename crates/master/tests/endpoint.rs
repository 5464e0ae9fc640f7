//! The machines endpoint and the HTTP API over real loopback sockets, started through the same
//! wiring as `sp-master` (with a fake launcher): bad frames and bad tokens are rejected with an
//! error and never disturb another run.

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

mod support;

use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use saltpeter_master::server::Running;
use saltpeter_proto::*;
use serde_json::Value;
use support::{FakeLauncher, job};
use tokio_tungstenite::tungstenite::Message;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn start(yaml: &str) -> (Running, Arc<FakeLauncher>, tempfile::TempDir) {
    support::start_server("", yaml).await
}

async fn ws(r: &Running) -> Ws {
    let url = format!("ws://{}/", r.machines_addr);
    tokio_tungstenite::connect_async(url).await.unwrap().0
}

async fn send(ws: &mut Ws, msg: &WrapperMessage) {
    ws.send(Message::text(msg.encode())).await.unwrap();
}

async fn recv(ws: &mut Ws) -> MasterMessage {
    loop {
        let frame = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("no reply within 5 s")
            .expect("socket closed")
            .unwrap();
        if let Message::Text(t) = frame {
            return MasterMessage::decode(t.as_str()).unwrap();
        }
    }
}

fn envelope(instance: &str, machine: &str) -> Envelope {
    Envelope {
        job_name: "j".into(),
        job_instance: instance.into(),
        machine: machine.into(),
        timestamp: Some(Timestamp::now()),
    }
}

fn connect(instance: &str, machine: &str, token: Option<String>) -> WrapperMessage {
    WrapperMessage::Connect(Connect {
        envelope: envelope(instance, machine),
        protocol: Some(PROTOCOL_VERSION),
        token,
        signature: None,
        wrapper_pid: Some(1),
    })
}

fn output(instance: &str, machine: &str, seq: u64, data: &str) -> WrapperMessage {
    WrapperMessage::Output(Output {
        envelope: envelope(instance, machine),
        stream: "stdout".into(),
        data: data.into(),
        seq: Some(seq),
    })
}

async fn http(r: &Running, method: &str, path: &str) -> (u16, Value) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(r.api_addr).await.unwrap();
    // The API answers only for Host names it knows (loopback, its address).
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
        r.api_addr
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).await.unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

async fn run_now(r: &Running, job: &str) -> String {
    let (status, body) = http(r, "POST", &format!("/api/v1/jobs/{job}/run")).await;
    assert_eq!(status, 202, "{body}");
    tokio::time::sleep(Duration::from_millis(50)).await;
    body["instance"].as_str().unwrap().to_owned()
}

fn token_of(launcher: &FakeLauncher, machine: &str) -> String {
    launcher.token_for(machine).unwrap()
}

#[tokio::test]
async fn bad_frames_and_bad_tokens_are_rejected_without_disturbing_other_runs() {
    let (r, launcher, _dir) = start(&job("j", "[good, other]", "")).await;
    let instance = run_now(&r, "j").await;
    let token = token_of(&launcher, "good");

    let mut good = ws(&r).await;
    send(&mut good, &connect(&instance, "good", Some(token.clone()))).await;
    assert!(
        matches!(recv(&mut good).await, MasterMessage::Ack(a) if a.ack_type == AckType::Connect)
    );

    // Malformed JSON: an error reply, and the socket stays usable.
    let mut noisy = ws(&r).await;
    noisy.send(Message::text("{not json")).await.unwrap();
    let MasterMessage::Error(e) = recv(&mut noisy).await else {
        panic!("no error reply")
    };
    assert_eq!(e.code, ErrorCode::BadRequest);
    send(&mut noisy, &connect("nope_1", "x", None)).await;
    let MasterMessage::Error(e) = recv(&mut noisy).await else {
        panic!("no error reply")
    };
    assert_eq!(e.code, ErrorCode::JobNotFound);

    // A wrong token for a real run: unauthorized, and nothing is applied.
    let mut forger = ws(&r).await;
    send(
        &mut forger,
        &connect(&instance, "other", Some("forged".into())),
    )
    .await;
    let MasterMessage::Error(e) = recv(&mut forger).await else {
        panic!("no error reply")
    };
    assert_eq!(e.code, ErrorCode::Unauthorized);

    // An oversized frame: rejected and logged; the socket is closed.
    let mut big = ws(&r).await;
    let huge = "x".repeat(MAX_FRAME_BYTES + 1);
    let _ = big.send(Message::text(huge)).await;
    let reply = tokio::time::timeout(Duration::from_secs(5), big.next())
        .await
        .unwrap();
    match reply {
        Some(Ok(Message::Text(t))) => {
            let MasterMessage::Error(e) = MasterMessage::decode(t.as_str()).unwrap() else {
                panic!("expected an error, got {t}")
            };
            assert_eq!(e.code, ErrorCode::BadRequest);
        }
        other => assert!(
            matches!(other, None | Some(Err(_)) | Some(Ok(Message::Close(_)))),
            "unexpected {other:?}"
        ),
    }

    // The good wrapper never noticed.
    send(&mut good, &output(&instance, "good", 0, "fine\n")).await;
    assert!(matches!(recv(&mut good).await, MasterMessage::Ack(a) if a.seq == Some(0)));
    let (status, run) = http(&r, "GET", &format!("/api/v1/runs/{instance}")).await;
    assert_eq!(status, 200);
    assert_eq!(run["machines"]["good"]["output"], "fine\n");
    assert_eq!(run["machines"]["other"]["output"], "");
    r.shutdown.cancel();
}

#[tokio::test]
async fn a_full_session_over_a_socket_with_a_reconnect() {
    let (r, launcher, _dir) = start(&job("j", "[m1]", "")).await;
    let instance = run_now(&r, "j").await;
    let token = token_of(&launcher, "m1");
    let mut w = ws(&r).await;
    send(&mut w, &connect(&instance, "m1", Some(token.clone()))).await;
    recv(&mut w).await;
    send(
        &mut w,
        &WrapperMessage::Start(Start {
            envelope: envelope(&instance, "m1"),
            pid: 7,
            version: "t".into(),
        }),
    )
    .await;
    assert!(matches!(recv(&mut w).await, MasterMessage::Ack(a) if a.ack_type == AckType::Start));
    send(&mut w, &output(&instance, "m1", 0, "one\n")).await;
    recv(&mut w).await;
    drop(w);
    let mut w = ws(&r).await;
    send(&mut w, &connect(&instance, "m1", Some(token))).await;
    let MasterMessage::Ack(a) = recv(&mut w).await else {
        panic!("no ack")
    };
    assert_eq!(
        a.last_seq,
        Some(0),
        "resume right after what the master holds"
    );
    send(&mut w, &output(&instance, "m1", 1, "two\n")).await;
    recv(&mut w).await;
    send(
        &mut w,
        &WrapperMessage::Complete(Complete {
            envelope: envelope(&instance, "m1"),
            retcode: Some(3),
            seq: Some(2),
            cause: Some(Cause::Exit),
            signal: None,
        }),
    )
    .await;
    assert!(matches!(recv(&mut w).await, MasterMessage::Ack(a) if a.ack_type == AckType::Complete));
    let (_, run) = http(&r, "GET", &format!("/api/v1/runs/{instance}")).await;
    let m = &run["machines"]["m1"];
    assert_eq!(m["output"], "one\ntwo\n");
    assert_eq!(m["retcode"], 3);
    assert_eq!(m["status"], "failed");
    assert_eq!(m["pid"], 7);
    assert_eq!(m["wrapper_version"], "t");
    assert!(m["starttime"].as_str().unwrap().contains('T'));
    assert_eq!(run["success"], false);
    // Both output acks were timed from the read of the output to the write of the ack (the
    // connection's task observes right after its write, before it takes the next frame).
    let text = r.engine.metrics().render(&Default::default());
    assert!(
        text.lines()
            .any(|l| l == "saltpeter_output_ack_written_seconds_count 2"),
        "{text}"
    );
    r.shutdown.cancel();
}

#[tokio::test]
async fn api_errors_are_json_with_a_status() {
    let (r, _launcher, _dir) = start(&job("j", "[m1]", "")).await;
    let (status, body) = http(&r, "POST", "/api/v1/jobs/nope/run").await;
    assert_eq!(status, 404);
    assert!(body["error"].as_str().unwrap().contains("nope"));
    let (status, body) = http(&r, "GET", "/api/v1/runs/nope_1").await;
    assert_eq!(status, 404);
    assert!(body["error"].is_string());
    let (status, _) = http(&r, "POST", "/api/v1/runs/nope_1/kill").await;
    assert_eq!(status, 404);
    let instance = run_now(&r, "j").await;
    let (status, body) = http(&r, "POST", "/api/v1/jobs/j/run").await;
    assert_eq!(status, 409, "overlap: {body}");
    let (status, _) = http(
        &r,
        "POST",
        &format!("/api/v1/runs/{instance}/machines/ghost/kill"),
    )
    .await;
    assert_eq!(status, 404);
    let (status, _) = http(
        &r,
        "POST",
        &format!("/api/v1/runs/{instance}/machines/m1/kill"),
    )
    .await;
    assert_eq!(status, 202);
    let (status, jobs) = http(&r, "GET", "/api/v1/jobs").await;
    assert_eq!(status, 200);
    let j = &jobs["jobs"][0];
    assert_eq!(j["name"], "j");
    assert_eq!(j["group"], "jobs");
    assert_eq!(j["running"][0], instance.as_str());
    assert!(
        j["next_run"]
            .as_str()
            .unwrap()
            .starts_with("2099-01-01T00:00:00")
    );
    r.shutdown.cancel();
}

/// Opens a socket, asks for a challenge and sends `connect` for `machine` signed with
/// `key_owner`'s key; returns the socket and the master's answer.
async fn signed_connect(
    r: &Running,
    instance: &str,
    machine: &str,
    key_owner: &str,
    token: &str,
) -> (Ws, MasterMessage) {
    let mut w = ws(r).await;
    send(
        &mut w,
        &WrapperMessage::Hello(Hello {
            envelope: envelope(instance, machine),
            protocol: Some(PROTOCOL_VERSION),
        }),
    )
    .await;
    let MasterMessage::Challenge(challenge) = recv(&mut w).await else {
        panic!("no challenge")
    };
    let WrapperMessage::Connect(mut c) = connect(instance, machine, Some(token.to_owned())) else {
        unreachable!()
    };
    c.signature = Some(support::sign_as(
        key_owner,
        &challenge.nonce,
        instance,
        machine,
    ));
    send(&mut w, &WrapperMessage::Connect(c)).await;
    let answer = recv(&mut w).await;
    (w, answer)
}

fn complete(instance: &str, machine: &str, retcode: i64) -> WrapperMessage {
    WrapperMessage::Complete(Complete {
        envelope: envelope(instance, machine),
        retcode: Some(retcode),
        seq: None,
        cause: Some(Cause::Exit),
        signal: None,
    })
}

fn is_unauthorized(m: &MasterMessage) -> bool {
    matches!(m, MasterMessage::Error(e) if e.code == ErrorCode::Unauthorized)
}

#[tokio::test]
async fn over_sockets_a_minion_key_speaks_only_for_its_own_minion_and_only_until_its_result() {
    let (r, launcher, dir) = start(&job("j", "[minion-a, minion-b]", "")).await;
    launcher.use_salt_keys(&support::salt_pki_dir(dir.path()));
    let instance = run_now(&r, "j").await;
    let token = token_of(&launcher, "minion-a");

    // minion-b, with its real key and the run's token, claims minion-a's result.
    let (mut forger, answer) = signed_connect(&r, &instance, "minion-a", "minion-b", &token).await;
    assert!(is_unauthorized(&answer), "{answer:?}");
    // The socket is closed after the refusal; nothing it sent counts.
    let _ = forger
        .send(Message::text(complete(&instance, "minion-a", 0).encode()))
        .await;

    let (mut a, answer) = signed_connect(&r, &instance, "minion-a", "minion-a", &token).await;
    assert!(
        matches!(answer, MasterMessage::Ack(ref x) if x.ack_type == AckType::Connect),
        "{answer:?}"
    );
    send(&mut a, &output(&instance, "minion-a", 0, "real\n")).await;
    recv(&mut a).await;
    send(&mut a, &complete(&instance, "minion-a", 5)).await;
    assert!(matches!(recv(&mut a).await, MasterMessage::Ack(x) if x.ack_type == AckType::Complete));

    // A replay after the result, even with minion-a's own key on a new challenge.
    let (_again, answer) = signed_connect(&r, &instance, "minion-a", "minion-a", &token).await;
    assert!(is_unauthorized(&answer), "{answer:?}");
    // And nothing more from the connection that reported it.
    send(&mut a, &output(&instance, "minion-a", 1, "forged\n")).await;
    assert!(is_unauthorized(&recv(&mut a).await));

    let (_, run) = http(&r, "GET", &format!("/api/v1/runs/{instance}")).await;
    let m = &run["machines"]["minion-a"];
    assert_eq!(m["retcode"], 5);
    assert_eq!(m["output"], "real\n");
    assert_eq!(m["late_retcode"], Value::Null);
    r.shutdown.cancel();
}
