//! The WebSocket link to the masters: connecting to one master of the list at a time, in the
//! failover order of [`crate::masters`] with capped, fully jittered backoff between rounds (see
//! [`crate::backoff`]), one writer task per connection that sends heartbeats on their own
//! timer ahead of anything else, and the loop that drives [`Session`] with the master's
//! replies and the job's output.
//!
//! The link never blocks the job: output arrives over a channel and goes straight into the
//! [`Outbox`] (memory, then spool), whatever the connection state. It ends when `complete`
//! is acknowledged, when the master refuses the run (`JOB_NOT_FOUND`, `UNAUTHORIZED`), when
//! the delivery deadline passes, or when told to abort; it then hands back the outbox so that
//! whatever was not delivered can be written to the local log.
//!
//! Several masters share one database and one run state, so the session does not care which
//! master it talks to: every connection resumes after the `last_seq` its master acknowledges,
//! and output leaves the outbox only once a master acknowledged it. A `NOT_HOLDER` answer
//! (this master does not hold the job) is a failed attempt that moves on to the next master;
//! `JOB_NOT_FOUND` and `UNAUTHORIZED` come only from the holder and stay terminal.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{Sink, SinkExt, StreamExt};
use saltpeter_proto::{
    AckType, Complete, Connect, Envelope, ErrorCode, Heartbeat, Hello, MasterMessage,
    PROTOCOL_VERSION, Start, Timestamp, WrapperMessage, signing_payload,
};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::{Instant, interval_at, sleep_until, timeout};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::backoff;
use crate::encode;
use crate::identity::MinionKey;
use crate::log::Log;
use crate::masters::{Masters, Next};
use crate::outbox::{Chunk, Outbox};
use crate::session::{Completion, Session};

/// How long one connection attempt (TCP plus WebSocket handshake) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the master may take to acknowledge `connect` or `start`.
const HANDSHAKE_ACK_TIMEOUT: Duration = Duration::from_secs(10);
/// How long in-flight outputs may wait for an ack before the connection is presumed dead.
const OUTPUT_ACK_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the master may take to confirm `complete` (the original polls up to 30 s).
const COMPLETE_ACK_TIMEOUT: Duration = Duration::from_secs(40);

/// While connected and the master is acknowledging, output beyond the memory cap is paced
/// (the link stops taking it, so the reader waits) rather than spilled: writing it to disk
/// and reading it back would cost more than the master's own pace. Once acks stall this
/// long, the link takes output again and spills it, so the job is never held up for long by
/// a master that does not keep up.
const PACE_STALL: Duration = Duration::from_millis(500);

/// What the rest of the wrapper feeds the link, in order.
#[derive(Debug)]
pub enum LinkInput {
    /// A batch of output.
    Output(Chunk),
    /// The run is over and every output has been sent before this; deliver `complete`,
    /// giving up after `deliver_within`.
    Complete(Completion, Duration),
}

/// Fixed facts about this run that the link puts on the wire.
#[derive(Clone, Debug)]
pub struct LinkConfig {
    /// The masters to deliver to, the one that launched the wrapper first; never empty.
    pub urls: Vec<String>,
    pub job_name: String,
    pub job_instance: String,
    pub machine: String,
    pub token: Option<String>,
    /// The minion's Salt key: when set, every connection opens with `hello` and its
    /// `connect` carries a signature over the master's challenge.
    pub machine_key: Option<Arc<MinionKey>>,
    pub wrapper_pid: u32,
    /// PID reported in `start`: the job's shell, or the wrapper's own when no job ran.
    pub start_pid: u32,
    /// When the job was spawned; `start` carries it, as the original's does.
    pub started_at: Timestamp,
    pub version: String,
    pub heartbeat: Duration,
    /// The TLS client configuration for a `wss://` URL (see `config.rs`); `None` for `ws://`.
    pub tls: Option<Arc<saltpeter_tls::rustls::ClientConfig>>,
}

impl LinkConfig {
    fn envelope(&self) -> Envelope {
        Envelope {
            job_name: self.job_name.clone(),
            job_instance: self.job_instance.clone(),
            machine: self.machine.clone(),
            timestamp: Some(Timestamp::now()),
        }
    }
}

/// How delivery ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Delivery {
    /// The master acknowledged `complete`.
    Delivered,
    /// The master refused the run; terminal.
    Rejected(ErrorCode, String),
    /// The delivery deadline passed.
    GaveUp,
    /// Told to stop (a second termination signal).
    Aborted,
}

/// The link's result: how it ended and what it could not deliver.
#[derive(Debug)]
pub struct LinkEnd {
    pub delivery: Delivery,
    pub outbox: Outbox,
}

type WsStream = WebSocketStream<MaybeTlsStream<TcpStream>>;
type Connecting = Pin<Box<dyn Future<Output = Result<WsStream, String>> + Send>>;

/// One open connection.
struct Conn {
    tx: mpsc::UnboundedSender<Message>,
    rx: futures_util::stream::SplitStream<WsStream>,
    writer: JoinHandle<()>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.writer.abort();
    }
}

enum ConnEvent {
    Frame(Option<Result<Message, tokio_tungstenite::tungstenite::Error>>),
    WriterEnded,
}

/// Runs the link until delivery ends. `kill` is told when the master asks to kill the job.
pub async fn run(
    cfg: LinkConfig,
    mut input: mpsc::Receiver<LinkInput>,
    kill: mpsc::Sender<()>,
    mut abort: oneshot::Receiver<()>,
    mut outbox: Outbox,
    log: Arc<Log>,
) -> LinkEnd {
    let mut session = Session::new();
    let mut conn: Option<Conn> = None;
    let mut connecting: Option<Connecting> = None;
    let mut retry_at: Option<Instant> = Some(Instant::now());
    let mut masters = Masters::new(cfg.urls.len());
    // Whether the current connection's `connect` was acknowledged: a connection that worked
    // is retried at the same master when it drops; one that never did counts as a failed
    // attempt and moves on to the next.
    let mut conn_worked = false;
    // The master whose connection last worked, to log when delivery moves to another.
    let mut last_worked: Option<usize> = None;
    let mut ack_deadline: Option<Instant> = None;
    let mut give_up_at: Option<Instant> = None;
    let mut input_open = true;
    let mut abort_open = true;
    // When an ack last advanced the session (for pacing).
    let mut last_progress = Instant::now();
    // Set once the master refused the run.
    let mut rejected: Option<(ErrorCode, String)> = None;

    let end = loop {
        // Send whatever the session allows, then re-arm the ack timeout.
        if let Some(c) = conn.as_ref() {
            pump_sends(&cfg, &mut session, &outbox, c, &log);
        }
        if session.is_done() {
            break Delivery::Delivered;
        }
        if let Some((code, message)) = rejected.as_ref().filter(|_| !input_open) {
            break Delivery::Rejected(*code, message.clone());
        }
        if session.awaiting_ack() {
            if ack_deadline.is_none() {
                let wait = match session.phase() {
                    crate::session::Phase::Streaming if session.in_flight() == 0 => {
                        COMPLETE_ACK_TIMEOUT
                    }
                    crate::session::Phase::Streaming => OUTPUT_ACK_TIMEOUT,
                    _ => HANDSHAKE_ACK_TIMEOUT,
                };
                ack_deadline = Some(Instant::now() + wait);
            }
        } else {
            ack_deadline = None;
        }
        let pacing = !outbox.has_room()
            && session.phase() == crate::session::Phase::Streaming
            && session.in_flight() > 0;
        let pace_until = last_progress + PACE_STALL;
        let accepting = input_open && (!pacing || Instant::now() >= pace_until);

        tokio::select! {
            biased;
            res = &mut abort, if abort_open => {
                if res.is_ok() {
                    break Delivery::Aborted;
                }
                abort_open = false;
            }
            () = sleep_until(pace_until), if input_open && !accepting => {}
            event = next_event(&mut conn) => {
                let lost = match event {
                    ConnEvent::WriterEnded => Some(String::from("send failed")),
                    ConnEvent::Frame(None) => Some(String::from("connection closed by the master")),
                    ConnEvent::Frame(Some(Err(e))) => Some(format!("connection error: {e}")),
                    ConnEvent::Frame(Some(Ok(Message::Close(_)))) => Some(String::from("master closed the connection")),
                    ConnEvent::Frame(Some(Ok(Message::Text(text)))) => {
                        match handle_frame(&cfg, &mut session, &mut outbox, &kill, &log, &text) {
                            Frame::Continue { progress } => {
                                if progress {
                                    ack_deadline = None;
                                    last_progress = Instant::now();
                                }
                                None
                            }
                            Frame::Connected { send_start } => {
                                let current = masters.current();
                                let moved = last_worked.map_or(current != 0, |m| m != current);
                                if moved {
                                    let url = url_of(&cfg, current);
                                    log.info(format!("Delivering to master {url}"));
                                }
                                masters.connected();
                                conn_worked = true;
                                last_worked = Some(current);
                                ack_deadline = None;
                                last_progress = Instant::now();
                                if let Some(c) = conn.as_ref() {
                                    if send_start {
                                        send(c, &start_message(&cfg), &log);
                                    }
                                    // A heartbeat at once, not one interval later: after a
                                    // restart the master gives each machine 15 s from its own
                                    // start, and a wrapper that got back late in a reconnect
                                    // storm must not spend five of them silent.
                                    send(c, &heartbeat_message(&cfg), &log);
                                }
                                None
                            }
                            Frame::Challenge(nonce) => {
                                if let Some(c) = conn.as_ref() {
                                    match connect_message(&cfg, Some(&nonce)) {
                                        Ok(msg) => send(c, &msg, &log),
                                        Err(e) => log.info(format!("Cannot answer the master's challenge: {e}")),
                                    }
                                }
                                None
                            }
                            Frame::NotHolder => {
                                // The master closes the connection after saying this; moving on
                                // at once does not wait for that.
                                conn = None;
                                session.disconnected();
                                ack_deadline = None;
                                let why = "it does not hold the job";
                                retry_at = Some(fail_over(&mut masters, &cfg, &log, why));
                                None
                            }
                            Frame::Rejected(code, message) => {
                                // Terminal: no more connections. Output still arriving is
                                // kept (spooled) until the run ends, so the local log gets
                                // all of it, in order.
                                rejected = Some((code, message));
                                conn = None;
                                connecting = None;
                                retry_at = None;
                                session.disconnected();
                                None
                            }
                        }
                    }
                    ConnEvent::Frame(Some(Ok(_))) => None,
                };
                if let Some(reason) = lost {
                    log.info(format!("Disconnected from master: {reason}"));
                    conn = None;
                    session.disconnected();
                    ack_deadline = None;
                    retry_at = Some(if conn_worked {
                        Instant::now() + backoff(masters.dropped())
                    } else {
                        let why = format!("{reason} before acknowledging connect");
                        fail_over(&mut masters, &cfg, &log, &why)
                    });
                }
            }
            item = input.recv(), if accepting => match item {
                Some(LinkInput::Output(chunk)) => {
                    let seq = outbox.push(chunk);
                    if log.debug_enabled() {
                        log.debug(format!("Queued output seq {seq}"));
                    }
                }
                Some(LinkInput::Complete(completion, within)) => {
                    log.debug(format!("Run ended: {completion:?}"));
                    session.set_completion(completion);
                    give_up_at = Some(Instant::now() + within);
                }
                None => {
                    input_open = false;
                    if session.completion().is_none() {
                        // The controller went away without an outcome; nothing will ever
                        // complete, so only keep delivering output for a bounded time.
                        give_up_at.get_or_insert(Instant::now() + Duration::from_secs(60));
                    }
                }
            },
            res = maybe(&mut connecting) => {
                connecting = None;
                match res {
                    Ok(ws) => {
                        log.debug(format!("Connected to {}", url_of(&cfg, masters.current())));
                        conn_worked = false;
                        let c = open_conn(ws, &cfg);
                        session.connected();
                        // With a machine key, `connect` waits for the challenge `hello` asks
                        // for; the connect-ack timeout covers both round trips.
                        let first = match cfg.machine_key {
                            Some(_) => Ok(WrapperMessage::Hello(Hello {
                                envelope: cfg.envelope(),
                                protocol: Some(PROTOCOL_VERSION),
                            })),
                            None => connect_message(&cfg, None),
                        };
                        match first {
                            Ok(msg) => send(&c, &msg, &log),
                            Err(e) => log.info(format!("Cannot build connect: {e}")),
                        }
                        conn = Some(c);
                    }
                    Err(e) => {
                        // With one master, only the first failure in a row is worth a line: the
                        // rest repeat it every few seconds for as long as the master is away.
                        // With several, the switch to the next master is logged with the reason.
                        let single = masters.count() == 1;
                        if single && (masters.first_failure() || log.debug_enabled()) {
                            let url = url_of(&cfg, masters.current());
                            log.info(format!("Cannot reach master at {url}: {e}"));
                        }
                        let why = format!("cannot reach it: {e}");
                        retry_at = Some(fail_over(&mut masters, &cfg, &log, &why));
                    }
                }
            }
            () = sleep_until(retry_at.unwrap_or_else(Instant::now)),
                if retry_at.is_some() && conn.is_none() && connecting.is_none()
                    && rejected.is_none() => {
                retry_at = None;
                let url = url_of(&cfg, masters.current()).to_owned();
                connecting = Some(Box::pin(connect(url, cfg.tls.clone())));
            }
            () = sleep_until(ack_deadline.unwrap_or_else(Instant::now)), if ack_deadline.is_some() => {
                log.info(format!("No ack from master in time ({:?}); reconnecting", session.phase()));
                conn = None;
                session.disconnected();
                ack_deadline = None;
                retry_at = Some(if conn_worked {
                    Instant::now() + backoff(masters.dropped())
                } else {
                    fail_over(&mut masters, &cfg, &log, "no answer to connect in time")
                });
            }
            () = sleep_until(give_up_at.unwrap_or_else(Instant::now)), if give_up_at.is_some() => {
                break Delivery::GaveUp;
            }
        }
    };
    if let Some(c) = conn.take() {
        close_politely(c).await;
    }
    LinkEnd {
        delivery: end,
        outbox,
    }
}

/// The pause after `failures` earlier pauses: uniformly random up to 1 s, 2 s, 4 s, then 5 s,
/// drawn anew each time so a fleet that lost its master at one instant does not come back at
/// one instant.
fn backoff(failures: u32) -> Duration {
    backoff::delay(failures, rand::random::<f64>())
}

/// The URL of master `index`; the list is never empty, and the fallback only keeps this total.
fn url_of(cfg: &LinkConfig, index: usize) -> &str {
    cfg.urls.get(index).map_or("", String::as_str)
}

/// After a failed attempt at the current master: moves on to the next one and says when to
/// try it. A switch to another master is logged with its reason, so the log shows where the
/// wrapper looked for the job's holder and why it left each master.
///
/// Once a whole round has failed, later switches go to the debug level until a master
/// acknowledges `connect`: while every master is away the same lines would otherwise repeat
/// every few seconds for as long as the job runs, burying the events that matter, as the
/// single master's "cannot reach" line is logged once for the same reason.
fn fail_over(masters: &mut Masters, cfg: &LinkConfig, log: &Log, why: &str) -> Instant {
    let from = masters.current();
    let quiet = masters.rounds_failed() > 0;
    let next = masters.attempt_failed();
    let to = masters.current();
    let pause = match next {
        Next::Now => Duration::ZERO,
        Next::Pause(pauses) => backoff(pauses),
    };
    if to != from {
        let when = match next {
            Next::Now => String::from("at once"),
            Next::Pause(_) if quiet => format!("in {:.1} s", pause.as_secs_f64()),
            Next::Pause(_) => format!(
                "in {:.1} s, as every master of the list failed in this round (further switches \
                 are logged at debug level until a master accepts the run)",
                pause.as_secs_f64()
            ),
        };
        let line = format!(
            "Switching from master {} ({why}) to master {} {when}",
            url_of(cfg, from),
            url_of(cfg, to)
        );
        if quiet {
            log.debug(line);
        } else {
            log.info(line);
        }
    }
    Instant::now() + pause
}

async fn connect(
    url: String,
    tls: Option<Arc<saltpeter_tls::rustls::ClientConfig>>,
) -> Result<WsStream, String> {
    // Server-to-wrapper frames are tiny; a small read buffer keeps the wrapper lean.
    let config = WebSocketConfig::default().read_buffer_size(8 * 1024);
    // A `wss://` URL is verified with the configuration built from SP_TLS_* (a pinned
    // fingerprint, a CA file or the system roots); `ws://` ignores the connector.
    let connector = tls.map(tokio_tungstenite::Connector::Rustls);
    match timeout(
        CONNECT_TIMEOUT,
        tokio_tungstenite::connect_async_tls_with_config(url, Some(config), true, connector),
    )
    .await
    {
        Ok(Ok((ws, _response))) => Ok(ws),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer within {CONNECT_TIMEOUT:?}")),
    }
}

fn open_conn(ws: WsStream, cfg: &LinkConfig) -> Conn {
    let (sink, rx) = ws.split();
    let (tx, data) = mpsc::unbounded_channel();
    let beat = Beat {
        cfg: cfg.clone(),
        every: cfg.heartbeat,
    };
    let writer = tokio::spawn(async move {
        let _ = writer(sink, data, beat).await;
    });
    Conn { tx, rx, writer }
}

/// Ends a connection after delivery: lets the writer flush and send a close frame, briefly.
async fn close_politely(mut conn: Conn) {
    let (tx, _) = mpsc::unbounded_channel();
    drop(std::mem::replace(&mut conn.tx, tx));
    let _ = timeout(Duration::from_secs(1), &mut conn.writer).await;
}

async fn next_event(conn: &mut Option<Conn>) -> ConnEvent {
    let Some(c) = conn.as_mut() else {
        return std::future::pending().await;
    };
    tokio::select! {
        frame = c.rx.next() => ConnEvent::Frame(frame),
        _ = &mut c.writer => ConnEvent::WriterEnded,
    }
}

async fn maybe<F: Future + Unpin>(fut: &mut Option<F>) -> F::Output {
    match fut.as_mut() {
        Some(f) => f.await,
        None => std::future::pending().await,
    }
}

/// What the heartbeats of one connection look like and how often they go out.
#[derive(Debug)]
pub struct Beat {
    cfg: LinkConfig,
    every: Duration,
}

impl Beat {
    fn frame(&self) -> Message {
        Message::text(
            WrapperMessage::Heartbeat(Heartbeat {
                envelope: self.cfg.envelope(),
            })
            .encode(),
        )
    }
}

/// Writes one connection's frames: heartbeats every `beat.every` (first one after one
/// period), and the link's frames in order. Heartbeats win every race, so they are delayed at
/// most by the one frame being written, whose size is bounded by the output chunk size.
/// Returns when the link drops its sender (after closing the socket) or a write fails.
pub async fn writer<S>(
    mut sink: S,
    mut frames: mpsc::UnboundedReceiver<Message>,
    beat: Beat,
) -> Result<(), S::Error>
where
    S: Sink<Message> + Unpin,
{
    let mut ticks = interval_at(Instant::now() + beat.every, beat.every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            _ = ticks.tick() => sink.send(beat.frame()).await?,
            frame = frames.recv() => match frame {
                Some(frame) => sink.send(frame).await?,
                None => {
                    sink.send(Message::Close(None)).await?;
                    return sink.close().await;
                }
            },
        }
    }
}

fn heartbeat_message(cfg: &LinkConfig) -> WrapperMessage {
    WrapperMessage::Heartbeat(Heartbeat {
        envelope: cfg.envelope(),
    })
}

fn start_message(cfg: &LinkConfig) -> WrapperMessage {
    WrapperMessage::Start(Start {
        envelope: Envelope {
            timestamp: Some(cfg.started_at),
            ..cfg.envelope()
        },
        pid: cfg.start_pid,
        version: cfg.version.clone(),
    })
}

fn send(conn: &Conn, msg: &WrapperMessage, log: &Log) {
    if log.debug_enabled() {
        log.debug(format!("Sending {}", describe(msg)));
    }
    // A closed channel means the writer ended; the link notices through `WriterEnded`.
    let _ = conn.tx.send(Message::text(msg.encode()));
}

fn describe(msg: &WrapperMessage) -> String {
    match msg {
        WrapperMessage::Output(o) => format!("output seq {:?} ({} bytes)", o.seq, o.data.len()),
        WrapperMessage::Complete(c) => {
            format!(
                "complete retcode {:?} cause {:?} seq {:?}",
                c.retcode, c.cause, c.seq
            )
        }
        other => other.kind().to_owned(),
    }
}

/// Sends every output the window allows, then `complete` if it is due.
fn pump_sends(cfg: &LinkConfig, session: &mut Session, outbox: &Outbox, conn: &Conn, log: &Log) {
    let produced = outbox.next_seq();
    while let Some(seq) = session.take_next(produced) {
        let Some(chunk) = outbox.get(seq) else {
            // Cannot happen: in-flight messages are always held in memory. Stop rather
            // than send a gap.
            log.info(format!("Output seq {seq} is not in memory; holding back"));
            break;
        };
        if log.debug_enabled() {
            log.debug(format!(
                "Sending output seq {seq} ({} bytes)",
                chunk.data.len()
            ));
        }
        let frame = encode::output_frame(cfg.envelope(), chunk.stream.as_str(), &chunk.data, seq);
        let _ = conn.tx.send(Message::text(frame));
    }
    if let Some(done) = session.take_complete(produced) {
        let msg = WrapperMessage::Complete(Complete {
            envelope: cfg.envelope(),
            retcode: Some(done.retcode),
            seq: Some(produced),
            cause: Some(done.cause),
            signal: done.signal,
        });
        send(conn, &msg, log);
    }
}

/// `connect`, signed over `nonce` with the machine key when there is one.
fn connect_message(
    cfg: &LinkConfig,
    nonce: Option<&str>,
) -> Result<WrapperMessage, crate::identity::KeyError> {
    let envelope = cfg.envelope();
    let signature = match (&cfg.machine_key, nonce) {
        (Some(key), Some(nonce)) => Some(key.sign(&signing_payload(
            nonce,
            &envelope.job_instance,
            &envelope.machine,
        ))?),
        _ => None,
    };
    Ok(WrapperMessage::Connect(Connect {
        envelope,
        protocol: Some(PROTOCOL_VERSION),
        token: cfg.token.clone(),
        signature,
        wrapper_pid: Some(cfg.wrapper_pid),
    }))
}

enum Frame {
    /// Carry on; `progress` if something was acknowledged.
    Continue { progress: bool },
    /// The master's challenge: `connect` is due, signed over this nonce.
    Challenge(String),
    /// The connect ack arrived: the connection is good; `start` is due if never acked.
    Connected { send_start: bool },
    /// The master does not hold the job (`NOT_HOLDER`): try the next master.
    NotHolder,
    /// The master refused the run.
    Rejected(ErrorCode, String),
}

fn handle_frame(
    cfg: &LinkConfig,
    session: &mut Session,
    outbox: &mut Outbox,
    kill: &mpsc::Sender<()>,
    log: &Log,
    text: &str,
) -> Frame {
    let msg = match MasterMessage::decode(text) {
        Ok(msg) => msg,
        Err(e) => {
            log.info(format!("Ignoring a message from the master: {e}"));
            return Frame::Continue { progress: false };
        }
    };
    if log.debug_enabled() {
        log.debug(format!("Received {msg:?}"));
    }
    let produced = outbox.next_seq();
    match msg {
        MasterMessage::Ack(ack) => match ack.ack_type {
            AckType::Connect => {
                let resumed = session.connect_acked(ack.last_seq, produced);
                if resumed.regressed {
                    log.info(format!(
                        "Master holds output only up to seq {:?}; what it lost after that was \
                         already acknowledged and cannot be resent",
                        ack.last_seq
                    ));
                }
                if let Some(seq) = resumed.ack_through {
                    outbox.ack_through(seq);
                }
                Frame::Connected {
                    send_start: resumed.send_start,
                }
            }
            AckType::Start => {
                session.start_acked();
                Frame::Continue { progress: true }
            }
            AckType::Output => {
                if let Some(seq) = ack.seq.and_then(|s| session.output_acked(s, produced)) {
                    outbox.ack_through(seq);
                }
                Frame::Continue { progress: true }
            }
            AckType::Complete => {
                session.complete_acked();
                Frame::Continue { progress: true }
            }
            AckType::Unknown => Frame::Continue { progress: false },
        },
        MasterMessage::Nack(nack) => {
            log.info(format!(
                "Master expects output seq {} (received {})",
                nack.expected_seq, nack.received_seq
            ));
            if let Some(seq) = session.nacked(nack.expected_seq, produced) {
                outbox.ack_through(seq);
            }
            Frame::Continue { progress: true }
        }
        MasterMessage::SyncResponse(sync) => {
            // Only a positive answer is informative: the original master answers -1 both for
            // "nothing acked" and for "no record of this connection".
            if let Ok(seq) = u64::try_from(sync.last_seq)
                && let Some(seq) = session.output_acked(seq, produced)
            {
                outbox.ack_through(seq);
            }
            Frame::Continue { progress: false }
        }
        MasterMessage::Kill(k) => {
            if k.job_instance == cfg.job_instance && k.machine == cfg.machine {
                log.info("KILL message received from server");
                // A full channel means a kill is already pending.
                let _ = kill.try_send(());
            } else {
                log.info(format!(
                    "Ignoring a kill for {}:{} (this is {}:{})",
                    k.job_instance, k.machine, cfg.job_instance, cfg.machine
                ));
            }
            Frame::Continue { progress: false }
        }
        MasterMessage::Challenge(challenge) if cfg.machine_key.is_some() => {
            Frame::Challenge(challenge.nonce)
        }
        MasterMessage::Challenge(_) => Frame::Continue { progress: false },
        MasterMessage::Error(err) => {
            log.info(format!("Master reports {:?}: {}", err.code, err.message));
            match err.code {
                // A master that does not hold the job answers NOT_HOLDER and never these two,
                // and one that just took the job over answers NOT_HOLDER until it has loaded
                // the job's runs. So these come from the holder, which knows the run: the run
                // is gone, or this wrapper may not speak for it, whichever master is asked.
                ErrorCode::JobNotFound | ErrorCode::Unauthorized => {
                    Frame::Rejected(err.code, err.message)
                }
                ErrorCode::NotHolder => Frame::NotHolder,
                ErrorCode::BadRequest | ErrorCode::Unknown => Frame::Continue { progress: false },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn beat(every: Duration) -> Beat {
        let cfg = LinkConfig {
            urls: vec![String::from("ws://127.0.0.1:1")],
            job_name: String::from("job"),
            job_instance: String::from("job_1"),
            machine: String::from("m1"),
            token: None,
            machine_key: None,
            wrapper_pid: 1,
            start_pid: 2,
            started_at: Timestamp::now(),
            version: String::from("test"),
            heartbeat: every,
            tls: None,
        };
        Beat { cfg, every }
    }

    /// Runs the writer against a sink that takes `write_time` per frame, with `backlog`
    /// output frames queued up front, and returns when each heartbeat finished writing,
    /// relative to the start.
    async fn heartbeat_times(backlog: usize, write_time: Duration, run: Duration) -> Vec<Duration> {
        let start = Instant::now();
        let (seen_tx, mut seen) = mpsc::unbounded_channel::<(Duration, Message)>();
        let sink = futures_util::sink::unfold(seen_tx, move |tx, frame: Message| async move {
            tokio::time::sleep(write_time).await;
            tx.send((start.elapsed(), frame)).map_err(|_| ())?;
            Ok::<_, ()>(tx)
        });
        let (frames, rx) = mpsc::unbounded_channel();
        for seq in 0..backlog {
            let _ = frames.send(Message::text(format!(
                "{{\"type\":\"output\",\"seq\":{seq}}}"
            )));
        }
        let task = tokio::spawn(writer(Box::pin(sink), rx, beat(Duration::from_secs(5))));
        tokio::time::sleep(run).await;
        task.abort();
        let mut beats = Vec::new();
        while let Ok((at, frame)) = seen.try_recv() {
            let Message::Text(text) = frame else {
                panic!("unexpected frame {frame:?}")
            };
            if let Ok(WrapperMessage::Heartbeat(hb)) = WrapperMessage::decode(&text) {
                assert_eq!(hb.envelope.job_instance, "job_1");
                beats.push(at);
            }
        }
        beats
    }

    #[tokio::test(start_paused = true)]
    async fn idle_connection_heartbeats_every_interval() {
        let beats = heartbeat_times(0, Duration::ZERO, Duration::from_millis(21_500)).await;
        let secs: Vec<u64> = beats.iter().map(Duration::as_secs).collect();
        assert_eq!(secs, vec![5, 10, 15, 20]);
        assert!(beats.iter().all(|b| b.subsec_millis() == 0), "{beats:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn heartbeats_are_not_delayed_by_a_backlog_on_a_slow_socket() {
        // 1000 frames at 100 ms each would take 100 s; heartbeats must still go out on time,
        // late by at most the frame being written when the tick fired.
        let beats =
            heartbeat_times(1000, Duration::from_millis(100), Duration::from_secs(31)).await;
        assert_eq!(beats.len(), 6, "{beats:?}");
        for (k, at) in beats.iter().enumerate() {
            let due = Duration::from_secs(5 * (k as u64 + 1));
            assert!(
                *at >= due && *at <= due + Duration::from_millis(200),
                "beat {k} at {at:?}"
            );
        }
    }

    #[test]
    fn backoff_is_spread_over_a_window_that_rises_to_the_cap() {
        for failures in 0..8 {
            let ceiling = backoff::ceiling(failures);
            assert!(ceiling <= backoff::CAP);
            let delays: Vec<Duration> = (0..10_000).map(|_| backoff(failures)).collect();
            assert!(
                delays.iter().all(|d| *d <= ceiling),
                "{failures}: over {ceiling:?}"
            );
            // Uniform over the window: about half below its middle, and hardly two alike.
            let low = delays.iter().filter(|d| **d < ceiling / 2).count();
            assert!(
                (4_000..=6_000).contains(&low),
                "{failures}: {low} of 10,000 low"
            );
            let mut distinct = delays.clone();
            distinct.sort_unstable();
            distinct.dedup();
            assert!(
                distinct.len() > 9_000,
                "{failures}: {} distinct",
                distinct.len()
            );
        }
        // The first reconnect after a drop comes within a second, not at a fixed instant.
        assert!((0..100).all(|_| backoff(0) <= Duration::from_secs(1)));
    }
}
