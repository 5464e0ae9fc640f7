//! The simulated fleet of `cargo xtask bench master`: N wrappers in one process, each a tokio
//! task holding one WebSocket to the machines endpoint of the master that launched it (the
//! URL in its start request; with several masters, one fleet serves them all) and speaking
//! the real protocol (`connect` with the run token, `start`, a heartbeat every 5 s, an output every
//! second, `complete` once asked, each answered as the master answers a real wrapper).
//! When asked to, a wrapper that loses its connection reconnects as `sp-wrapper` does: the
//! wrapper's own backoff (full jitter, [`super::backoff`]), `connect` again, a heartbeat at
//! once, then resend what the master does not hold.
//!
//! It owns: its runtime (one worker thread, so it takes at most one of the two cores from the
//! master it measures), the per-wrapper state machines, and the counters and latency samples
//! the report is made of. Sockets are non-blocking and bound to 127.0.0.2..=9 so 10,000 of
//! them never run short of ephemeral ports; nothing ever leaves loopback.

use std::collections::VecDeque;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, bail};
use futures_util::{SinkExt, StreamExt};
use parking_lot::Mutex;
use saltpeter_proto::{
    Ack, AckType, Cause, Complete, Connect, Envelope, Heartbeat, MasterMessage, Output, Start,
    Timestamp, WrapperMessage,
};
use tokio::net::TcpSocket;
use tokio::sync::{Semaphore, watch};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use super::backoff;
use super::stamped::{Arrival, StampedStream};

/// Source addresses the wrappers' sockets are spread over (127.0.0.2 and up).
const LOOPBACK_SOURCES: usize = 8;
/// Handshakes in flight at once: more would overflow the master's accept backlog and turn
/// dropped SYNs into 1 s retransmits, which measures the kernel rather than the master.
pub const CONNECTS_IN_FLIGHT: usize = 512;
/// Limit for any single wait on the master (an ack, the handshake).
const REPLY_LIMIT: Duration = Duration::from_secs(60);
/// The real wrapper's limits on a reconnect attempt: TCP and WebSocket handshake, then the
/// `connect` ack (`crates/wrapper/src/link.rs`).
const RECONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const CONNECT_ACK_TIMEOUT: Duration = Duration::from_secs(10);
/// A wrapper that has not reattached after this long fails the benchmark.
const REATTACH_LIMIT: Duration = Duration::from_secs(180);
/// The real wrapper's cadence.
const HEARTBEAT_EVERY: Duration = Duration::from_secs(5);
const OUTPUT_EVERY: Duration = Duration::from_secs(1);
/// Size of the steady output: 200 bytes of text per message.
const OUTPUT_BYTES: usize = 200;
/// The streaming wrapper's message size and window, as `sp-wrapper` at full speed (it reads
/// 256 KiB at a time and keeps at most 8 outputs unacknowledged).
pub const STREAM_CHUNK: usize = 256 * 1024;
const STREAM_WINDOW: usize = 8;

/// One start request, as the master's bench launcher wrote it.
#[derive(Clone, Debug)]
pub struct StartRequest {
    pub instance: String,
    pub job: String,
    pub machines: Vec<String>,
    /// Each machine's own token.
    pub tokens: std::collections::HashMap<String, String>,
    pub url: String,
    /// The master's certificate fingerprint when the URL is `wss://` (pinned, as `sp-wrapper`
    /// pins it).
    pub tls_fingerprint: Option<String>,
    /// When the launcher wrote the request (wall clock of this host).
    pub written: SystemTime,
}

/// How a simulated wrapper behaves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Heartbeat every 5 s, 200 bytes of output every second.
    Steady,
    /// Steady until told to stop, then closes its socket without a word.
    Stoppable,
    /// Outputs as fast as acks allow (window of 8 messages of 256 KiB).
    Stream,
}

/// What the fleet is asked to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Run,
    /// Stop the stoppable wrappers abruptly.
    StopSome,
    /// Every remaining wrapper sends `complete` once its output is acked, then leaves.
    Complete,
}

/// Counters shared by every simulated wrapper.
#[derive(Debug, Default)]
pub struct Stats {
    /// Frames sent to the master / received from it.
    pub sent: AtomicU64,
    pub received: AtomicU64,
    pub started: AtomicU64,
    pub completed: AtomicU64,
    pub failed: AtomicU64,
    /// Output bytes the master acknowledged (acks come only once durable).
    pub bytes_acked: AtomicU64,
    /// Whether ack latencies are being sampled.
    pub measuring: AtomicBool,
    /// From just before an output is written to when the kernel received the ack that
    /// covers it (see [`stamped`](super::stamped)), in microseconds, while measuring.
    pub latencies: Samples,
    /// The same, but to when the wrapper's task handled the ack: includes the generator's
    /// own scheduling delay.
    pub task_latencies: Samples,
    /// How late each output timer fired, in microseconds, while measuring: the generator's
    /// own delay, which every ack latency it measures also carries.
    pub lateness: Samples,
    /// The latest `start` ack received.
    pub last_start_ack: Mutex<Option<SystemTime>>,
    /// The first few errors, for the report.
    pub errors: Mutex<Vec<String>>,
    /// Stopped wrappers and when each sent its last heartbeat (or `start`, which counts as one).
    pub stopped: Mutex<Vec<(String, SystemTime)>>,
    /// Connections lost by reconnecting wrappers.
    pub disconnects: AtomicU64,
    /// When each reconnect attempt began, and how many of them failed.
    pub reconnect_attempts: Mutex<Vec<SystemTime>>,
    pub reconnect_failures: AtomicU64,
    /// When each reconnect was complete (the new `connect` acked).
    pub reattached: Mutex<Vec<SystemTime>>,
    /// TLS handshakes completed (`wss://` only), with when the first and the last ended, and
    /// how long each took from the first byte sent, in microseconds.
    pub tls_handshakes: AtomicU64,
    pub tls_window: Mutex<Option<(Instant, Instant)>>,
    pub tls_times: Samples,
}

/// Latency samples in microseconds. A mutex taken once per ack is cheap next to a WebSocket
/// frame, and the fleet runs on one worker, so it is never contended.
#[derive(Debug, Default)]
pub struct Samples(Mutex<Vec<u32>>);

impl Samples {
    pub fn push(&self, micros: u32) {
        self.0.lock().push(micros);
    }

    /// Records the time from `from` to `to` (zero if the wall clock stepped back).
    pub fn push_between(&self, from: SystemTime, to: SystemTime) {
        let micros = to.duration_since(from).unwrap_or_default().as_micros();
        self.push(u32::try_from(micros).unwrap_or(u32::MAX));
    }

    /// The samples so far, sorted, leaving none.
    pub fn take_sorted(&self) -> Vec<u32> {
        let mut samples = std::mem::take(&mut *self.0.lock());
        samples.sort_unstable();
        samples
    }
}

impl Stats {
    fn tls_handshake(&self, took: Duration) {
        self.tls_handshakes.fetch_add(1, Ordering::Relaxed);
        self.tls_times
            .push(u32::try_from(took.as_micros()).unwrap_or(u32::MAX));
        let now = Instant::now();
        let mut window = self.tls_window.lock();
        let first = window.map_or(now, |(first, _)| first);
        *window = Some((first, now));
    }

    fn error(&self, what: String) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        let mut e = self.errors.lock();
        if e.len() < 5 {
            e.push(what);
        }
    }
}

/// The fleet's runtime and controls.
#[derive(Debug)]
pub struct Fleet {
    runtime: Option<tokio::runtime::Runtime>,
    phase: watch::Sender<Phase>,
    pub stats: Arc<Stats>,
    gate: Arc<Semaphore>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// Whether wrappers launched from now on reconnect when their connection is lost, and
    /// whether their backoff is jittered.
    reconnect: bool,
    jitter: bool,
}

impl Fleet {
    pub fn new() -> Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("bench-fleet")
            .enable_all()
            .build()
            .context("starting the fleet's runtime")?;
        Ok(Self {
            runtime: Some(runtime),
            phase: watch::channel(Phase::Run).0,
            stats: Arc::default(),
            gate: Arc::new(Semaphore::new(CONNECTS_IN_FLIGHT)),
            tasks: Vec::new(),
            reconnect: false,
            jitter: true,
        })
    }

    /// Makes wrappers launched from now on reconnect, as `sp-wrapper` does, when their
    /// connection is lost (otherwise that is an error). Without `jitter` each pause is the
    /// backoff's ceiling itself (1, 2, 4, then 5 s: the wrapper's schedule before jitter), for
    /// comparison.
    pub fn reconnecting(mut self, jitter: bool) -> Self {
        self.reconnect = true;
        self.jitter = jitter;
        self
    }

    /// Starts one simulated wrapper per machine of the request; `kind` picks each one's part.
    pub fn launch(&mut self, request: &StartRequest, kind: impl Fn(usize) -> Kind) -> Result<()> {
        self.launch_from(request, 0, kind)
    }

    /// As [`Fleet::launch`], for a request whose machines are numbered from `offset` in the
    /// whole fleet: several start requests (several jobs, several masters) make one fleet, so
    /// `kind`, the source address and the timers' spread follow the fleet-wide number.
    pub fn launch_from(
        &mut self,
        request: &StartRequest,
        offset: usize,
        kind: impl Fn(usize) -> Kind,
    ) -> Result<()> {
        let addr = master_addr(&request.url)?;
        // `wss://`: the wrapper's own trust, the master's certificate pinned by fingerprint; one
        // configuration for the whole fleet, as each real wrapper builds one for itself. In a
        // cluster the list names every master's certificate, as `SP_TLS_FINGERPRINT` does.
        let tls = if request.url.starts_with("wss://") {
            let pins = request
                .tls_fingerprint
                .as_deref()
                .context("a wss:// start request without the certificate's fingerprint")?
                .split(',')
                .map(saltpeter_tls::Fingerprint::parse)
                .collect::<Result<Vec<_>, _>>()?;
            let trust = match <[_; 1]>::try_from(pins) {
                Ok([one]) => saltpeter_tls::Trust::Pinned(one),
                Err(several) => saltpeter_tls::Trust::PinnedAny(several),
            };
            Some(Arc::new(saltpeter_tls::client_config(&trust)?))
        } else {
            None
        };
        let runtime = self.runtime.as_ref().context("fleet stopped")?;
        // One seed per fleet, so the wrappers' jitter differs from run to run, as real
        // wrappers' does.
        let seed = {
            use std::hash::{BuildHasher, Hasher};
            std::collections::hash_map::RandomState::new()
                .build_hasher()
                .finish()
        };
        for (i, machine) in request.machines.iter().enumerate() {
            let index = offset + i;
            let sim = Sim {
                index,
                kind: kind(index),
                reconnect: self.reconnect,
                jitter: self.jitter,
                seed: (seed ^ (index as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15)) | 1,
                addr,
                url: request.url.clone(),
                tls: tls.clone(),
                envelope: Envelope {
                    job_name: request.job.clone(),
                    job_instance: request.instance.clone(),
                    machine: machine.clone(),
                    timestamp: None,
                },
                token: request.tokens.get(machine).cloned().unwrap_or_default(),
            };
            let stats = self.stats.clone();
            let phase = self.phase.subscribe();
            let gate = self.gate.clone();
            self.tasks.push(runtime.spawn(async move {
                let name = sim.envelope.machine.clone();
                if let Err(error) = sim.run(&stats, phase, gate).await {
                    stats.error(format!("{name}: {error:#}"));
                }
            }));
        }
        Ok(())
    }

    pub fn set_phase(&self, phase: Phase) {
        self.phase.send_replace(phase);
    }

    /// Waits until every wrapper task has ended, for at most `limit`; returns how many did.
    pub fn wait_all(&mut self, limit: Duration) -> usize {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline && self.tasks.iter().any(|t| !t.is_finished()) {
            std::thread::sleep(Duration::from_millis(50));
        }
        self.tasks.iter().filter(|t| t.is_finished()).count()
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_timeout(Duration::from_secs(5));
        }
    }
}

/// `ws://127.0.0.1:PORT` or `wss://...` to a socket address; anything but loopback is
/// refused.
fn master_addr(url: &str) -> Result<SocketAddr> {
    let hostport = url
        .strip_prefix("ws://")
        .or_else(|| url.strip_prefix("wss://"))
        .context("the machines URL is neither ws:// nor wss://")?
        .trim_end_matches('/');
    let addr: SocketAddr = hostport
        .parse()
        .with_context(|| format!("machines URL {url:?}"))?;
    if !addr.ip().is_loopback() {
        bail!("the machines endpoint {addr} is not on loopback");
    }
    Ok(addr)
}

/// One simulated wrapper.
struct Sim {
    index: usize,
    kind: Kind,
    /// Whether a lost connection is reopened (else it is an error), and whether the pause
    /// before each attempt is jittered or the ceiling itself.
    reconnect: bool,
    jitter: bool,
    /// Seeds this wrapper's generator for its backoff's jitter (never zero).
    seed: u64,
    addr: SocketAddr,
    url: String,
    /// The TLS client configuration for a `wss://` URL.
    tls: Option<Arc<saltpeter_tls::rustls::ClientConfig>>,
    envelope: Envelope,
    token: String,
}

/// The stream a simulated wrapper's WebSocket runs on: the stamped TCP stream itself, or TLS
/// over it (so arrival stamps are still taken where the kernel hands over the bytes).
trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}

type Ws = tokio_tungstenite::WebSocketStream<Box<dyn Io>>;

/// One open connection of a simulated wrapper.
struct Conn {
    tx: futures_util::stream::SplitSink<Ws, Message>,
    rx: futures_util::stream::SplitStream<Ws>,
    arrival: Arrival,
}

impl Sim {
    fn envelope(&self) -> Envelope {
        Envelope {
            timestamp: Some(Timestamp::now()),
            ..self.envelope.clone()
        }
    }

    async fn connect(&self, stats: &Stats) -> Result<(Ws, Arrival)> {
        let octet = 2 + (self.index % LOOPBACK_SOURCES) as u8;
        let local = SocketAddrV4::new(Ipv4Addr::new(127, 0, 0, octet), 0);
        let socket = TcpSocket::new_v4()?;
        socket.bind(local.into())?;
        let tcp = tokio::time::timeout(REPLY_LIMIT, socket.connect(self.addr))
            .await
            .context("TCP connect timed out")??;
        tcp.set_nodelay(true)?;
        let (tcp, arrival) = StampedStream::new(tcp)?;
        let stream: Box<dyn Io> = match &self.tls {
            None => Box::new(tcp),
            Some(tls) => {
                let connector = tokio_rustls::TlsConnector::from(tls.clone());
                let name = saltpeter_tls::rustls::pki_types::ServerName::from(self.addr.ip());
                let started = Instant::now();
                let tls = tokio::time::timeout(REPLY_LIMIT, connector.connect(name, tcp))
                    .await
                    .context("TLS handshake timed out")??;
                stats.tls_handshake(started.elapsed());
                Box::new(tls)
            }
        };
        // The real wrapper reads with an 8 KiB buffer too; tungstenite's 128 KiB default is
        // zero-filled on every read and would cost the load generator a gigabyte at 10,000.
        let config = WebSocketConfig::default().read_buffer_size(8 * 1024);
        let (ws, _) = tokio::time::timeout(
            REPLY_LIMIT,
            tokio_tungstenite::client_async_with_config(self.url.as_str(), stream, Some(config)),
        )
        .await
        .context("WebSocket handshake timed out")??;
        Ok((ws, arrival))
    }

    /// Opens a connection within `connect_limit` and has `connect` acknowledged within
    /// `ack_limit`; returns the master's `last_seq`.
    async fn attach(
        &self,
        stats: &Stats,
        connect_limit: Duration,
        ack_limit: Duration,
    ) -> Result<(Conn, Option<i64>)> {
        let (ws, arrival) = tokio::time::timeout(connect_limit, self.connect(stats))
            .await
            .with_context(|| format!("no connection within {connect_limit:?}"))??;
        let (tx, rx) = ws.split();
        let mut conn = Conn { tx, rx, arrival };
        self.send_connect(&mut conn, stats).await?;
        let ack = expect_ack(&mut conn.rx, stats, AckType::Connect, ack_limit).await?;
        Ok((conn, ack.last_seq))
    }

    /// Reconnects after a lost connection the way `sp-wrapper` does: each attempt after the
    /// wrapper's own jittered backoff, each bounded by the wrapper's timeouts.
    async fn reattach(&self, stats: &Stats, rng: &mut u64) -> Result<(Conn, Option<i64>)> {
        let deadline = tokio::time::Instant::now() + REATTACH_LIMIT;
        let mut failures = 0u32;
        loop {
            let pause = if self.jitter {
                backoff::delay(failures, unit(rng))
            } else {
                backoff::ceiling(failures)
            };
            tokio::time::sleep(pause).await;
            if tokio::time::Instant::now() > deadline {
                bail!("not reattached within {REATTACH_LIMIT:?}");
            }
            stats.reconnect_attempts.lock().push(SystemTime::now());
            match self
                .attach(stats, RECONNECT_TIMEOUT, CONNECT_ACK_TIMEOUT)
                .await
            {
                Ok(done) => {
                    stats.reattached.lock().push(SystemTime::now());
                    return Ok(done);
                }
                Err(_) => {
                    stats.reconnect_failures.fetch_add(1, Ordering::Relaxed);
                    failures += 1;
                }
            }
        }
    }

    async fn send_connect(&self, conn: &mut Conn, stats: &Stats) -> Result<()> {
        stats.sent.fetch_add(1, Ordering::Relaxed);
        conn.tx
            .send(Message::text(
                WrapperMessage::Connect(Connect {
                    envelope: self.envelope(),
                    protocol: Some(2),
                    token: Some(self.token.clone()),
                    signature: None,
                    wrapper_pid: Some(std::process::id()),
                })
                .encode(),
            ))
            .await?;
        Ok(())
    }

    async fn run(
        self,
        stats: &Stats,
        mut phase: watch::Receiver<Phase>,
        gate: Arc<Semaphore>,
    ) -> Result<()> {
        let permit = gate.acquire_owned().await?;
        let (mut conn, _) = self.attach(stats, REPLY_LIMIT, REPLY_LIMIT).await?;
        let send = |msg: WrapperMessage| {
            stats.sent.fetch_add(1, Ordering::Relaxed);
            Message::text(msg.encode())
        };
        conn.tx
            .send(send(WrapperMessage::Start(Start {
                envelope: self.envelope(),
                pid: std::process::id(),
                version: "bench".into(),
            })))
            .await?;
        expect_ack(&mut conn.rx, stats, AckType::Start, REPLY_LIMIT).await?;
        let mut last_beat = SystemTime::now();
        stats.started.fetch_add(1, Ordering::Relaxed);
        {
            let mut at = stats.last_start_ack.lock();
            *at = Some(at.map_or(last_beat, |t| t.max(last_beat)));
        }
        drop(permit);
        let mut rng = self.seed;

        // Spread the fleet's timers evenly over their periods, as independent machines are.
        let now = tokio::time::Instant::now();
        let spread = |period: Duration, salt: usize| {
            let ms = period.as_millis() as usize;
            now + Duration::from_millis(((self.index.wrapping_mul(salt)) % ms) as u64)
        };
        let mut beat = tokio::time::interval_at(spread(HEARTBEAT_EVERY, 7919), HEARTBEAT_EVERY);
        let mut tick = tokio::time::interval_at(spread(OUTPUT_EVERY, 104_729), OUTPUT_EVERY);
        beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let payload: Arc<str> = match self.kind {
            Kind::Stream => "s".repeat(STREAM_CHUNK - 1).into(),
            _ => "o".repeat(OUTPUT_BYTES - 1).into(),
        };
        let mut next_seq = 0u64;
        // Unacked outputs: (seq, bytes, when sent).
        let mut pending: VecDeque<(u64, usize, SystemTime)> = VecDeque::new();
        let mut completing = false;
        let mut complete_sent = false;
        // Bounded: a wrapper lives at most as long as the longest scenario allows.
        // One timer for the whole life: a fresh `sleep_until` per turn of the loop cost the
        // generator a timer-wheel insert and removal per message.
        let give_up = tokio::time::sleep(Duration::from_secs(3600));
        tokio::pin!(give_up);
        loop {
            // Why the connection was lost, if it was.
            let mut lost: Option<String> = None;
            if self.kind == Kind::Stream && !completing {
                while pending.len() < STREAM_WINDOW {
                    let data = format!("{payload}\n");
                    pending.push_back((next_seq, data.len(), SystemTime::now()));
                    conn.tx.feed(send(self.output(next_seq, data))).await?;
                    next_seq += 1;
                }
                conn.tx.flush().await?;
            }
            if completing && !complete_sent && pending.is_empty() {
                conn.tx
                    .send(send(WrapperMessage::Complete(Complete {
                        envelope: self.envelope(),
                        retcode: Some(0),
                        seq: Some(next_seq),
                        cause: Some(Cause::Exit),
                        signal: None,
                    })))
                    .await?;
                complete_sent = true;
            }
            tokio::select! {
                () = &mut give_up => bail!("still running after an hour"),
                _ = beat.tick() => {
                    // Stamped before the write: the master cannot have it earlier, while a
                    // stamp after it would include however long this task waited for a core.
                    let sent = SystemTime::now();
                    match conn.tx.send(send(WrapperMessage::Heartbeat(Heartbeat { envelope: self.envelope() }))).await {
                        Ok(()) => last_beat = sent,
                        Err(e) => lost = Some(format!("heartbeat: {e}")),
                    }
                }
                due = tick.tick(), if self.kind != Kind::Stream && !completing => {
                    if stats.measuring.load(Ordering::Relaxed) {
                        let late = tokio::time::Instant::now().saturating_duration_since(due);
                        stats.lateness.push(u32::try_from(late.as_micros()).unwrap_or(u32::MAX));
                    }
                    let data = format!("{payload}\n");
                    pending.push_back((next_seq, data.len(), SystemTime::now()));
                    next_seq += 1;
                    if let Err(e) = conn.tx.send(send(self.output(next_seq - 1, data))).await {
                        lost = Some(format!("output: {e}"));
                    }
                }
                changed = phase.changed() => {
                    let now = if changed.is_ok() { *phase.borrow_and_update() } else { Phase::Complete };
                    match now {
                        Phase::Run => {}
                        Phase::StopSome if self.kind == Kind::Stoppable => {
                            // Abruptly: no close frame, no complete, just the socket gone.
                            stats.stopped.lock().push((self.envelope.machine.clone(), last_beat));
                            return Ok(());
                        }
                        Phase::StopSome => {}
                        Phase::Complete => completing = true,
                    }
                }
                frame = conn.rx.next() => match frame {
                    None => lost = Some("the master closed the connection".into()),
                    Some(Err(e)) => lost = Some(e.to_string()),
                    Some(Ok(Message::Text(text))) => {
                        stats.received.fetch_add(1, Ordering::Relaxed);
                        match MasterMessage::decode(text.as_str())? {
                            MasterMessage::Ack(ack) if ack.ack_type == AckType::Output => {
                                let seq = ack.seq.context("output ack without seq")?;
                                let measuring = stats.measuring.load(Ordering::Relaxed);
                                let seen = SystemTime::now();
                                let arrived = conn.arrival.last().unwrap_or(seen);
                                while pending.front().is_some_and(|(s, _, _)| *s <= seq) {
                                    if let Some((_, bytes, sent)) = pending.pop_front() {
                                        stats.bytes_acked.fetch_add(bytes as u64, Ordering::Relaxed);
                                        if measuring {
                                            stats.latencies.push_between(sent, arrived);
                                            stats.task_latencies.push_between(sent, seen);
                                        }
                                    }
                                }
                            }
                            MasterMessage::Ack(ack) if ack.ack_type == AckType::Complete => {
                                stats.completed.fetch_add(1, Ordering::Relaxed);
                                let _ = conn.tx.send(Message::Close(None)).await;
                                return Ok(());
                            }
                            other => bail!("unexpected reply {other:?}"),
                        }
                    }
                    Some(Ok(_)) => {}
                },
            }
            let Some(reason) = lost else { continue };
            if !self.reconnect {
                bail!("connection lost: {reason}");
            }
            stats.disconnects.fetch_add(1, Ordering::Relaxed);
            let (fresh, last_seq) = self.reattach(stats, &mut rng).await?;
            conn = fresh;
            // What the master holds is acknowledged; the rest goes again, in order, and
            // `complete` too if it was sent but not acknowledged.
            let held = last_seq.and_then(|s| u64::try_from(s).ok());
            while pending
                .front()
                .is_some_and(|(s, _, _)| held.is_some_and(|h| *s <= h))
            {
                pending.pop_front();
            }
            for (seq, _, _) in &pending {
                conn.tx
                    .feed(send(self.output(*seq, format!("{payload}\n"))))
                    .await?;
            }
            conn.tx.flush().await?;
            complete_sent = false;
            // The real wrapper sends a heartbeat as soon as `connect` is acknowledged, then
            // one every interval. (On the first connection `start` does that job.)
            beat.reset_immediately();
        }
    }

    fn output(&self, seq: u64, data: String) -> WrapperMessage {
        WrapperMessage::Output(Output {
            envelope: self.envelope(),
            stream: "stdout".into(),
            data,
            seq: Some(seq),
        })
    }
}

/// Waits up to `limit` for the ack of `kind`, failing on anything else.
async fn expect_ack(
    rx: &mut futures_util::stream::SplitStream<Ws>,
    stats: &Stats,
    kind: AckType,
    limit: Duration,
) -> Result<Ack> {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let frame = tokio::time::timeout_at(deadline, rx.next())
            .await
            .with_context(|| format!("no {kind:?} ack within {limit:?}"))?
            .context("the master closed the connection")??;
        let Message::Text(text) = frame else { continue };
        stats.received.fetch_add(1, Ordering::Relaxed);
        match MasterMessage::decode(text.as_str())? {
            MasterMessage::Ack(ack) if ack.ack_type == kind => return Ok(ack),
            other => bail!("expected a {kind:?} ack, got {other:?}"),
        }
    }
}

/// A uniformly random number in [0, 1) from a xorshift state (the bench has no `rand`).
fn unit(state: &mut u64) -> f64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    (*state >> 11) as f64 / (1u64 << 53) as f64
}

/// Reads start requests the bench launcher appends to its file.
#[derive(Debug)]
pub struct StartFile {
    path: std::path::PathBuf,
    seen: usize,
}

impl StartFile {
    pub fn new(path: std::path::PathBuf) -> Self {
        Self { path, seen: 0 }
    }

    /// Waits for the next request (polling every 2 ms), for at most `limit`.
    pub fn next(&mut self, limit: Duration) -> Result<StartRequest> {
        let deadline = Instant::now() + limit;
        loop {
            if let Ok(text) = std::fs::read_to_string(&self.path) {
                // Only whole lines: the launcher writes each with its newline in one call.
                let lines: Vec<&str> = text
                    .split_inclusive('\n')
                    .filter(|l| l.ends_with('\n'))
                    .collect();
                if let Some(line) = lines.get(self.seen) {
                    self.seen += 1;
                    return parse_request(line);
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "no start request in {} within {limit:?}",
                    self.path.display()
                );
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

fn parse_request(line: &str) -> Result<StartRequest> {
    let v: serde_json::Value = serde_json::from_str(line).context("start request")?;
    let text = |k: &str| -> Result<String> {
        Ok(v[k]
            .as_str()
            .with_context(|| format!("start request without {k}"))?
            .to_owned())
    };
    let nanos: u64 = text("written_unix_ns")?.parse()?;
    Ok(StartRequest {
        instance: text("instance")?,
        job: text("job")?,
        machines: v["machines"]
            .as_array()
            .context("start request without machines")?
            .iter()
            .filter_map(|m| m.as_str().map(str::to_owned))
            .collect(),
        tokens: v["tokens"]
            .as_object()
            .context("start request without tokens")?
            .iter()
            .filter_map(|(m, t)| Some((m.clone(), t.as_str()?.to_owned())))
            .collect(),
        url: text("url")?,
        tls_fingerprint: v["tls_fingerprint"]
            .as_str()
            .filter(|f| !f.is_empty())
            .map(str::to_owned),
        written: SystemTime::UNIX_EPOCH + Duration::from_nanos(nanos),
    })
}
