//! TLS on the listeners, through the production wiring: a wrapper's `wss://` connection pinned
//! to the self-signed certificate, the refusal of plain text beyond loopback, the legacy
//! plain path that exists only while `allow_legacy_wrappers` is on, and the API over https.

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

mod support;

use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use saltpeter_master::server::Running;
use saltpeter_proto::*;
use saltpeter_tls::{Fingerprint, Trust};
use support::{FakeLauncher, job};
use tokio_tungstenite::tungstenite::Message;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

fn env_of(launcher: &FakeLauncher, key: &str) -> Option<String> {
    launcher
        .last_env()
        .into_iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v)
}

/// Starts a run of `j` through the API (plain, on loopback) and returns its instance.
async fn run_now(r: &Running, job: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(r.api_addr).await.unwrap();
    let req = format!(
        "POST /api/v1/jobs/{job}/run HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).await.unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap();
    assert!(head.contains(" 202 "), "{raw}");
    tokio::time::sleep(Duration::from_millis(50)).await;
    let body: serde_json::Value = serde_json::from_str(body).unwrap();
    body["instance"].as_str().unwrap().to_owned()
}

async fn wss(r: &Running, trust: &Trust) -> Result<Ws, String> {
    let config = saltpeter_tls::client_config(trust).unwrap();
    let url = format!("wss://127.0.0.1:{}/", r.machines_addr.port());
    tokio_tungstenite::connect_async_tls_with_config(
        url,
        None,
        true,
        Some(tokio_tungstenite::Connector::Rustls(Arc::new(config))),
    )
    .await
    .map(|(ws, _)| ws)
    .map_err(|e| e.to_string())
}

async fn plain(r: &Running) -> Result<Ws, String> {
    let url = format!("ws://{}/", r.machines_addr);
    let attempt = tokio_tungstenite::connect_async(url);
    match tokio::time::timeout(Duration::from_secs(5), attempt).await {
        Ok(result) => result.map(|(ws, _)| ws).map_err(|e| e.to_string()),
        Err(_) => Err("no answer".into()),
    }
}

/// Sends `connect` for `machine` and says whether the master acknowledged it.
async fn connect_acked(ws: &mut Ws, instance: &str, machine: &str, token: Option<String>) -> bool {
    let msg = WrapperMessage::Connect(Connect {
        envelope: Envelope {
            job_name: "j".into(),
            job_instance: instance.into(),
            machine: machine.into(),
            timestamp: Some(Timestamp::now()),
        },
        protocol: Some(PROTOCOL_VERSION),
        token,
        wrapper_pid: Some(1),
        signature: None,
    });
    ws.send(Message::text(msg.encode())).await.unwrap();
    loop {
        let frame = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("no reply within 5 s");
        match frame {
            Some(Ok(Message::Text(t))) => {
                return matches!(
                    MasterMessage::decode(t.as_str()).unwrap(),
                    MasterMessage::Ack(a) if a.ack_type == AckType::Connect
                );
            }
            Some(Ok(_)) => {}
            _ => return false,
        }
    }
}

#[tokio::test]
async fn a_wrapper_connects_over_wss_pinned_to_the_self_signed_certificate() {
    let (r, launcher, dir) =
        support::start_server("  machines_tls: on\n", &job("j", "[m1]", "")).await;
    let instance = run_now(&r, "j").await;
    let url = env_of(&launcher, "SP_WEBSOCKET_URL").unwrap();
    assert!(url.starts_with("wss://"), "{url}");
    let pin = Fingerprint::parse(&env_of(&launcher, "SP_TLS_FINGERPRINT").unwrap()).unwrap();
    // The pin is the certificate the master keeps in its data directory.
    let cert = saltpeter_tls::certs_from_file(&dir.path().join("data/tls/cert.pem")).unwrap();
    assert_eq!(Fingerprint::of(cert[0].as_ref()), pin);

    let mut ws = wss(&r, &Trust::Pinned(pin)).await.unwrap();
    let token = launcher.token_for("m1");
    assert!(connect_acked(&mut ws, &instance, "m1", token).await);

    // Another fingerprint is refused during the handshake, and plain text gets nowhere.
    let wrong = Fingerprint::of(b"another certificate");
    let error = wss(&r, &Trust::Pinned(wrong)).await.unwrap_err();
    assert!(error.contains("certificate"), "{error}");
    assert!(plain(&r).await.is_err());
    r.stop().await;
}

#[tokio::test]
async fn plain_text_beyond_loopback_is_refused_unless_allowed() {
    use saltpeter_master::server::{self, Options};
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("conf");
    std::fs::create_dir_all(&conf).unwrap();
    std::fs::write(
        conf.join("00-settings.yaml"),
        format!(
            "saltpeter_config:\n  logdir: {0}/log\n  data_dir: {0}/data\n  machines_ws_bind_addr: 0.0.0.0\n  machines_tls: off\n",
            dir.path().display()
        ),
    )
    .unwrap();
    let error = server::start(Options {
        config_dir: conf,
        machines_listener: None,
        api_listener: Some(tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap()),
        launcher: Some(Arc::new(FakeLauncher::default())),
        clock: None,
    })
    .await
    .unwrap_err()
    .to_string();
    assert!(error.contains("machines_tls"), "{error}");
    assert!(error.contains("allow_plaintext"), "{error}");
}

#[tokio::test]
async fn the_legacy_plain_path_is_open_only_with_allow_legacy_wrappers() {
    let (r, launcher, _dir) = support::start_server(
        "  machines_tls: on\n  allow_legacy_wrappers: true\n",
        &job("j", "[m1, m2]", ""),
    )
    .await;
    let instance = run_now(&r, "j").await;
    let pin = Fingerprint::parse(&env_of(&launcher, "SP_TLS_FINGERPRINT").unwrap()).unwrap();
    // The original wrapper reads only SP_WEBSOCKET_URL: it names the plain path, and
    // sp-wrapper takes the TLS one.
    let plain_url = env_of(&launcher, "SP_WEBSOCKET_URL").unwrap();
    let tls_url = env_of(&launcher, "SP_WEBSOCKET_URL_TLS").unwrap();
    assert!(plain_url.starts_with("ws://"), "{plain_url}");
    assert_eq!(tls_url.replacen("wss://", "ws://", 1), plain_url);
    // The original wrapper: plain ws://, no token.
    let mut legacy = plain(&r).await.unwrap();
    assert!(connect_acked(&mut legacy, &instance, "m1", None).await);
    // sp-wrapper still gets TLS on the same port.
    let mut ws = wss(&r, &Trust::Pinned(pin)).await.unwrap();
    let token = launcher.token_for("m2");
    assert!(connect_acked(&mut ws, &instance, "m2", token).await);
    r.stop().await;
}

#[tokio::test]
async fn the_api_speaks_https_verified_with_the_masters_certificate_as_ca() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (r, _launcher, dir) = support::start_server("  api_tls: on\n", &job("j", "[m1]", "")).await;
    let ca = dir.path().join("data/tls/cert.pem");
    let config = saltpeter_tls::client_config(&Trust::CaFile(ca)).unwrap();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(r.api_addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let mut tls = connector.connect(name, tcp).await.unwrap();
    tls.write_all(b"GET /api/v1/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut raw = Vec::new();
    let _ = tls.read_to_end(&mut raw).await;
    let raw = String::from_utf8_lossy(&raw);
    assert!(raw.starts_with("HTTP/1.1 200"), "{raw}");
    // The CLI's client: verified with the master's certificate as its CA it gets through;
    // trusting the system's roots only, it does not.
    let url = format!("https://127.0.0.1:{}", r.api_addr.port());
    let ca = dir.path().join("data/tls/cert.pem");
    let (with_ca, without) = tokio::task::spawn_blocking(move || {
        use saltpeter_http::Client;
        let with_ca = Client::new(&url, None)
            .unwrap()
            .with_ca(Some(&ca))
            .unwrap()
            .get("/api/v1/jobs")
            .map(|r| r.status);
        let without = Client::new(&url, None).unwrap().get("/api/v1/jobs");
        (with_ca, without.map(|r| r.status))
    })
    .await
    .unwrap();
    assert_eq!(with_ca.unwrap(), 200);
    assert!(without.is_err());
    // The machines endpoint, on loopback with `auto`, stays plain.
    assert!(plain(&r).await.is_ok());
    r.stop().await;
}

/// A TCP connection to `addr` from the loopback address 127.0.0.`octet`.
async fn tcp_from(octet: u8, addr: std::net::SocketAddr) -> tokio::net::TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket
        .bind(std::net::SocketAddr::from(([127, 0, 0, octet], 0)))
        .unwrap();
    socket.connect(addr).await.unwrap()
}

/// Reads until the peer closes; true if it did within `limit`.
async fn closed_within(s: &mut tokio::net::TcpStream, limit: Duration) -> bool {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 4096];
    tokio::time::timeout(limit, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .is_ok()
}

#[tokio::test(start_paused = true)]
async fn a_connection_mid_tls_handshake_is_pending_and_bounded_by_the_handshake_deadline() {
    use tokio::io::AsyncWriteExt;
    let (r, _, _dir) = support::start_server(
        "  machines_tls: on\n  max_pending_connections_per_ip: 1\n",
        &job("j", "[m1]", ""),
    )
    .await;
    let began = tokio::time::Instant::now();
    // The first byte of a ClientHello, and nothing more: a handshake that never ends.
    let mut stalled = tcp_from(5, r.machines_addr).await;
    stalled.write_all(&[0x16]).await.unwrap();
    // It holds the one pending place of its address.
    let mut second = tcp_from(5, r.machines_addr).await;
    assert!(
        closed_within(&mut second, Duration::from_millis(200)).await,
        "a second pending connection from the same address was kept"
    );
    assert!(
        closed_within(&mut stalled, Duration::from_secs(60)).await,
        "a stalled TLS handshake is still open after 60 s"
    );
    let took = began.elapsed();
    assert!(
        took >= Duration::from_secs(10) && took < Duration::from_secs(11),
        "closed after {took:?}, not at the 10 s handshake deadline"
    );
    r.stop().await;
}
