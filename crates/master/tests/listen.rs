//! Connection hygiene of both listeners over real loopback sockets, through the production
//! wiring (`server::start`): handshake and header deadlines, caps on pending connections in
//! all and per source address, the open-file reserve, and idle UI sockets. Deadlines that are
//! tokio timers run on paused time, so a 10 s deadline takes no real time.

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

mod support;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use saltpeter_master::server::Running;
use saltpeter_proto::*;
use support::job;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

fn jobs() -> String {
    job("j", "[m1, m2]", "")
}

/// A TCP connection to `addr` from the loopback address 127.0.0.`octet`.
async fn tcp_from(octet: u8, addr: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket
        .bind(SocketAddr::new(
            IpAddr::V4(Ipv4Addr::new(127, 0, 0, octet)),
            0,
        ))
        .unwrap();
    socket.connect(addr).await.unwrap()
}

/// Reads until the peer closes; true if it did within `limit`.
async fn closed_within(s: &mut TcpStream, limit: Duration) -> bool {
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

/// The value of one line of `/metrics`, such as `name{labels}`.
async fn metric(r: &Running, series: &str) -> u64 {
    let mut s = TcpStream::connect(r.api_addr).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).await.unwrap();
    raw.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {series} in /metrics:\n{raw}"))
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn ws(r: &Running) -> Ws {
    let url = format!("ws://{}/", r.machines_addr);
    tokio_tungstenite::connect_async(url).await.unwrap().0
}

async fn run_now(r: &Running) -> String {
    let mut s = TcpStream::connect(r.api_addr).await.unwrap();
    s.write_all(
        b"POST /api/v1/jobs/j/run HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
    )
    .await
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).await.unwrap();
    let body: serde_json::Value = serde_json::from_str(raw.split_once("\r\n\r\n").unwrap().1)
        .unwrap_or_else(|_| panic!("not JSON: {raw}"));
    // Let the launcher be asked (it records the run's token).
    tokio::time::sleep(Duration::from_millis(50)).await;
    body["instance"].as_str().unwrap().to_owned()
}

fn envelope(instance: &str) -> Envelope {
    envelope_of(instance, "m1")
}

fn envelope_of(instance: &str, machine: &str) -> Envelope {
    Envelope {
        job_name: "j".into(),
        job_instance: instance.into(),
        machine: machine.into(),
        timestamp: Some(Timestamp::now()),
    }
}

#[tokio::test(start_paused = true)]
async fn an_idle_socket_on_the_machines_port_is_closed_at_the_handshake_deadline() {
    let (r, _, _dir) = support::start_server("", &jobs()).await;
    let began = Instant::now();
    let mut s = tcp_from(1, r.machines_addr).await;
    assert!(
        closed_within(&mut s, Duration::from_secs(60)).await,
        "a socket that never sent a request is still open after 60 s"
    );
    let took = began.elapsed();
    assert!(
        took >= Duration::from_secs(10) && took < Duration::from_secs(11),
        "closed after {took:?}, not at the 10 s default"
    );
    assert_eq!(
        metric(
            &r,
            "saltpeter_connections_timed_out_total{listener=\"machines\"}"
        )
        .await,
        1
    );
}

#[tokio::test(start_paused = true)]
async fn a_websocket_that_never_sends_connect_is_closed_at_the_handshake_deadline() {
    let (r, _, _dir) = support::start_server("  handshake_timeout: 4\n", &jobs()).await;
    let began = Instant::now();
    let mut ws = ws(&r).await;
    let end = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await;
    assert!(end.is_ok(), "a silent WebSocket is still open after 60 s");
    let took = began.elapsed();
    assert!(
        took >= Duration::from_secs(4) && took < Duration::from_secs(5),
        "closed after {took:?}, not at the configured 4 s"
    );
}

#[tokio::test(start_paused = true)]
async fn a_websocket_sending_only_rejected_messages_is_closed_at_the_handshake_deadline() {
    // Frames that are answered with an error but leave the socket open (undecodable ones)
    // are no handshake: the deadline still applies.
    let (r, _, _dir) = support::start_server("  handshake_timeout: 4\n", &jobs()).await;
    let mut ws = ws(&r).await;
    let began = Instant::now();
    // A frame every 100 ms for at most 10 s; the pauses let the paused clock move.
    let mut closed = false;
    for _ in 0..100 {
        if ws
            .send(Message::text("{\"type\": \"hello\"}"))
            .await
            .is_err()
        {
            closed = true;
            break;
        }
        if let Ok(None | Some(Err(_))) =
            tokio::time::timeout(Duration::from_millis(100), ws.next()).await
        {
            closed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(closed, "still open after 10 s of rejected frames");
    let took = began.elapsed();
    assert!(
        took >= Duration::from_secs(4) && took < Duration::from_secs(5),
        "closed after {took:?}"
    );
}

/// A wrapper that finished its handshake (a `connect` with the run's token, or a legacy
/// wrapper's first message) keeps its connection past the deadline. Real time: the engine runs
/// on its own thread, and a paused clock could jump past the deadline while it answers.
#[tokio::test]
async fn a_wrapper_that_finished_its_handshake_outlives_the_deadline() {
    let settings = "  handshake_timeout: 2\n  allow_legacy_wrappers: true\n";
    let (r, launcher, _dir) = support::start_server(settings, &jobs()).await;
    let instance = run_now(&r).await;
    let token = launcher.token_for("m1").unwrap();
    let mut ws = ws(&r).await;
    let connect = WrapperMessage::Connect(Connect {
        envelope: envelope(&instance),
        protocol: Some(PROTOCOL_VERSION),
        token: Some(token),
        wrapper_pid: Some(1),
        signature: None,
    });
    ws.send(Message::text(connect.encode())).await.unwrap();
    let reply = tokio::time::timeout(Duration::from_secs(5), ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(reply.to_text().unwrap().contains("\"ack\""), "{reply:?}");
    // A legacy wrapper of another machine (one that proved nothing may not speak for an
    // authenticated machine): its first message, a heartbeat, binds the connection.
    let mut legacy = self::ws(&r).await;
    let beat = WrapperMessage::Heartbeat(Heartbeat {
        envelope: envelope_of(&instance, "m2"),
    });
    legacy.send(Message::text(beat.encode())).await.unwrap();
    tokio::time::sleep(Duration::from_millis(3000)).await;
    for (socket, machine) in [(&mut ws, "m1"), (&mut legacy, "m2")] {
        let sync = WrapperMessage::SyncRequest(SyncRequest {
            envelope: envelope_of(&instance, machine),
            last_acked_seq: -1,
            next_seq: 0,
        });
        socket.send(Message::text(sync.encode())).await.unwrap();
        let reply = tokio::time::timeout(Duration::from_secs(5), socket.next())
            .await
            .expect("no answer")
            .expect("closed")
            .unwrap();
        assert!(
            reply.to_text().unwrap().contains("sync_response"),
            "{reply:?}"
        );
    }
    assert_eq!(
        metric(
            &r,
            "saltpeter_connections_timed_out_total{listener=\"machines\"}"
        )
        .await,
        0
    );
}

#[tokio::test(start_paused = true)]
async fn request_headers_must_arrive_within_the_header_deadline_on_the_api() {
    let (r, _, _dir) = support::start_server("  http_header_timeout: 3\n", &jobs()).await;
    let began = Instant::now();
    let mut s = tcp_from(1, r.api_addr).await;
    s.write_all(b"GET /api/v1/jobs HTTP/1.1\r\nHost: localhost\r\n")
        .await
        .unwrap();
    assert!(
        closed_within(&mut s, Duration::from_secs(60)).await,
        "half a request head still holds the socket after 60 s"
    );
    let took = began.elapsed();
    assert!(
        took >= Duration::from_secs(3) && took < Duration::from_secs(4),
        "closed after {took:?}"
    );
    // An idle socket that never sends a byte is bounded the same way.
    let began = Instant::now();
    let mut idle = tcp_from(1, r.api_addr).await;
    assert!(closed_within(&mut idle, Duration::from_secs(60)).await);
    assert!(began.elapsed() < Duration::from_secs(4));
}

#[tokio::test(start_paused = true)]
async fn the_machines_upgrade_request_must_arrive_within_the_handshake_deadline() {
    // A long header deadline, so the handshake deadline is what closes the socket.
    let settings = "  handshake_timeout: 2\n  http_header_timeout: 30\n";
    let (r, _, _dir) = support::start_server(settings, &jobs()).await;
    let began = Instant::now();
    let mut s = tcp_from(1, r.machines_addr).await;
    s.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n")
        .await
        .unwrap();
    assert!(closed_within(&mut s, Duration::from_secs(60)).await);
    let took = began.elapsed();
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(3),
        "closed after {took:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn pending_connections_are_capped_per_address_and_in_all() {
    // A long handshake deadline: a scrape waits for the engine's thread, and meanwhile the
    // paused clock may jump to the next timer.
    let settings = "  max_pending_connections: 3\n  max_pending_connections_per_ip: 2\n  \
                    handshake_timeout: 3600\n  http_header_timeout: 3600\n";
    let (r, _, _dir) = support::start_server(settings, &jobs()).await;
    let addr = r.machines_addr;
    let quick = Duration::from_millis(200);
    let mut a1 = tcp_from(2, addr).await;
    let mut a2 = tcp_from(2, addr).await;
    let mut a3 = tcp_from(2, addr).await;
    assert!(
        closed_within(&mut a3, quick).await,
        "a third pending socket from 127.0.0.2 was kept"
    );
    let mut b1 = tcp_from(3, addr).await;
    let mut c1 = tcp_from(4, addr).await;
    assert!(
        closed_within(&mut c1, quick).await,
        "a fourth pending socket in all was kept"
    );
    for s in [&mut a1, &mut a2, &mut b1] {
        assert!(
            !closed_within(s, quick).await,
            "an admitted socket was closed"
        );
    }
    let series = |reason: &str| {
        format!("saltpeter_connections_refused_total{{listener=\"machines\",reason=\"{reason}\"}}")
    };
    assert_eq!(metric(&r, &series("pending_per_ip")).await, 1);
    assert_eq!(metric(&r, &series("pending")).await, 1);
    assert_eq!(
        metric(&r, "saltpeter_connections_pending{listener=\"machines\"}").await,
        3
    );
    // A closed pending socket gives its places back.
    drop(a1);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut a4 = tcp_from(2, addr).await;
    assert!(
        !closed_within(&mut a4, quick).await,
        "a freed place was not reused"
    );
    // The API listener has caps of its own: the machines' pending sockets do not count.
    let mut api1 = tcp_from(2, r.api_addr).await;
    let mut api2 = tcp_from(2, r.api_addr).await;
    let mut api3 = tcp_from(2, r.api_addr).await;
    assert!(!closed_within(&mut api1, quick).await);
    assert!(!closed_within(&mut api2, quick).await);
    assert!(closed_within(&mut api3, quick).await);
    // A request's headers end an API connection's handshake: the kept-alive connection stays
    // open but no longer takes a pending place.
    api1.write_all(b"GET /version HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut head = [0u8; 12];
    api1.read_exact(&mut head).await.unwrap();
    assert_eq!(&head, b"HTTP/1.1 200");
    let mut api4 = tcp_from(2, r.api_addr).await;
    assert!(
        !closed_within(&mut api4, quick).await,
        "a connection that sent a request still counts as pending"
    );
}

#[tokio::test(start_paused = true)]
async fn sockets_beyond_the_open_file_limit_less_the_reserve_are_refused() {
    let limit = saltpeter_web::listen::fd_limit();
    assert!(limit > 16 && limit < u64::MAX, "open-file limit {limit}");
    // Room for four sockets on both listeners together.
    let settings = format!(
        "  fd_reserve: {}\n  handshake_timeout: 3600\n  http_header_timeout: 3600\n",
        limit - 4
    );
    let (r, _, _dir) = support::start_server(&settings, &jobs()).await;
    let quick = Duration::from_millis(200);
    let mut held = Vec::new();
    for octet in 2..6 {
        held.push(tcp_from(octet, r.machines_addr).await);
    }
    let mut over = tcp_from(6, r.machines_addr).await;
    assert!(
        closed_within(&mut over, quick).await,
        "a fifth socket was kept"
    );
    for s in &mut held {
        assert!(!closed_within(s, quick).await);
    }
    let mut api = tcp_from(7, r.api_addr).await;
    assert!(
        closed_within(&mut api, quick).await,
        "the API took a socket beyond the budget"
    );
    // Freeing sockets makes room again; the scrape needs one.
    drop(held);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(
        metric(
            &r,
            "saltpeter_connections_refused_total{listener=\"machines\",reason=\"fd_reserve\"}"
        )
        .await,
        1
    );
    assert_eq!(
        metric(
            &r,
            "saltpeter_connections_refused_total{listener=\"api\",reason=\"fd_reserve\"}"
        )
        .await,
        1
    );
}

/// Opens `/ws` by hand and never answers anything, as a browser that vanished.
async fn silent_ui_socket(r: &Running) -> TcpStream {
    let mut s = TcpStream::connect(r.api_addr).await.unwrap();
    s.write_all(
        b"GET /ws HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
          Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    )
    .await
    .unwrap();
    let mut head = [0u8; 12];
    s.read_exact(&mut head).await.unwrap();
    assert_eq!(&head, b"HTTP/1.1 101", "no upgrade");
    s
}

/// Real time: the UI socket task asks the engine (on its own thread) every tick.
#[tokio::test]
async fn a_ui_socket_that_sends_nothing_is_closed_after_ui_idle_timeout() {
    let (r, _, _dir) = support::start_server("  ui_idle_timeout: 2\n", &jobs()).await;
    let began = std::time::Instant::now();
    let mut s = silent_ui_socket(&r).await;
    assert!(
        closed_within(&mut s, Duration::from_secs(10)).await,
        "a silent UI socket is still open after 10 s"
    );
    let took = began.elapsed();
    assert!(took >= Duration::from_millis(1900), "closed after {took:?}");
    assert_eq!(metric(&r, "saltpeter_ui_idle_closed_total").await, 1);
}

#[tokio::test]
async fn a_ui_socket_that_answers_pings_stays_open() {
    let (r, _, _dir) = support::start_server("  ui_idle_timeout: 2\n", &jobs()).await;
    let url = format!("ws://{}/ws", r.api_addr);
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    // Reading answers the master's pings (tungstenite replies on its own); no command is sent.
    let watched = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(frame) = ws.next().await {
            frame.unwrap();
        }
    })
    .await;
    assert!(watched.is_err(), "a live, watching UI socket was closed");
    assert_eq!(metric(&r, "saltpeter_ui_idle_closed_total").await, 0);
}
