//! A test master for the wrapper's integration tests: a real WebSocket server on loopback
//! that speaks the protocol the way `sp-master` does (per-run seq state kept across sockets,
//! `last_seq` in the connect ack, cumulative acks, nack on a gap), records everything it
//! sees, and can misbehave on request (drop the socket mid-stream, accept late, kill). For
//! failover between masters it can also refuse a job it does not hold (`NOT_HOLDER`), die
//! mid-run for good, or start out holding the output another master made durable.
//!
//! Also helpers to launch the real `sp-wrapper` binary and to inspect processes.

#![allow(dead_code)] // Each test binary uses a different subset of the helpers.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use saltpeter_proto::{
    Ack, AckType, Complete, Connect, ErrorReply, Hello, Kill, MasterMessage, Nack, NackType, Start,
    WrapperMessage,
};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

/// How the test master behaves.
#[derive(Clone, Debug, Default)]
pub struct Behaviour {
    /// Close the socket abruptly right after applying the output with each of these seqs,
    /// before acking it. Each entry fires once.
    pub drop_after: Vec<u64>,
    /// Bind but do not accept until [`TestMaster::start_accepting`].
    pub accept_later: bool,
    /// Answer `complete` with `JOB_NOT_FOUND`.
    pub reject_complete: bool,
    /// Answer `start` with `JOB_NOT_FOUND`.
    pub reject_start: bool,
    /// Record `complete` but never answer it, so the wrapper stays in delivery.
    pub silent_on_complete: bool,
    /// Speak TLS (`wss://`) with this configuration.
    pub tls: Option<std::sync::Arc<saltpeter_tls::rustls::ServerConfig>>,
    /// Answer `hello` and `connect` with `NOT_HOLDER` and close, as a master of a cluster
    /// that does not hold the job does.
    pub not_holder: bool,
    /// Apply the output with this seq without acking it, then close the socket and stop
    /// listening for good, as a master that dies does (later connections are refused).
    pub vanish_after: Option<u64>,
    /// Start out holding every output up to and including this seq, as a master that took
    /// the job over finds what its predecessor made durable in the shared database.
    pub held_through: Option<u64>,
}

/// Any stream the test master serves WebSocket on: plain TCP or TLS.
trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}

enum Cmd {
    Kill(MasterMessage),
    StartAccepting,
}

/// What the test master observed.
#[derive(Debug)]
pub enum Event {
    Accepted,
    /// A client gave up in the TLS handshake (a wrapper that refused the certificate).
    TlsRefused,
    Received(Instant, WrapperMessage),
    /// An output with a seq the master already held.
    Duplicate(u64),
    /// An output beyond the next expected seq.
    Gap(u64),
    /// The master acknowledged the output with this seq.
    Acked(u64),
    Closed,
}

/// Everything observed so far, accumulated from the events.
#[derive(Debug, Default)]
pub struct Seen {
    pub accepted: usize,
    /// TLS handshakes the client broke off.
    pub tls_refused: usize,
    pub closed: usize,
    pub connects: Vec<Connect>,
    /// When each `connect` arrived.
    pub connect_times: Vec<Instant>,
    pub starts: Vec<(Instant, Start)>,
    pub heartbeats: Vec<Instant>,
    /// Applied outputs in order: (seq, stream, data).
    pub outputs: Vec<(u64, String, String)>,
    pub duplicates: Vec<u64>,
    pub gaps: Vec<u64>,
    /// Output seqs acknowledged, in the order the acks were sent.
    pub acked: Vec<u64>,
    /// `hello` messages received.
    pub hellos: usize,
    pub complete: Option<(Instant, Complete)>,
}

impl Seen {
    /// The applied output text, in seq order.
    pub fn text(&self) -> String {
        self.outputs.iter().map(|(_, _, d)| d.as_str()).collect()
    }

    fn apply(&mut self, event: Event) {
        match event {
            Event::Accepted => self.accepted += 1,
            Event::TlsRefused => self.tls_refused += 1,
            Event::Closed => self.closed += 1,
            Event::Duplicate(seq) => self.duplicates.push(seq),
            Event::Gap(seq) => self.gaps.push(seq),
            Event::Acked(seq) => self.acked.push(seq),
            Event::Received(at, msg) => match msg {
                WrapperMessage::Connect(c) => {
                    self.connects.push(c);
                    self.connect_times.push(at);
                }
                WrapperMessage::Start(s) => self.starts.push((at, s)),
                WrapperMessage::Hello(_) => self.hellos += 1,
                WrapperMessage::Heartbeat(_) => self.heartbeats.push(at),
                WrapperMessage::Output(o) => {
                    self.outputs
                        .push((o.seq.unwrap_or(u64::MAX), o.stream, o.data));
                }
                WrapperMessage::Complete(c) => {
                    self.complete.get_or_insert((at, c));
                }
                _ => {}
            },
        }
    }
}

/// A running test master.
pub struct TestMaster {
    pub addr: SocketAddr,
    pub seen: Seen,
    events: mpsc::UnboundedReceiver<Event>,
    cmds: mpsc::UnboundedSender<Cmd>,
}

impl TestMaster {
    pub async fn start(behaviour: Behaviour) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind loopback");
        let addr = listener.local_addr().expect("local addr");
        let (events_tx, events) = mpsc::unbounded_channel();
        let (cmds, cmds_rx) = mpsc::unbounded_channel();
        tokio::spawn(serve(listener, behaviour, events_tx, cmds_rx));
        Self {
            addr,
            seen: Seen::default(),
            events,
            cmds,
        }
    }

    pub fn url(&self) -> String {
        format!("ws://{}", self.addr)
    }

    /// The `wss://` URL of a master started with [`Behaviour::tls`].
    pub fn tls_url(&self) -> String {
        format!("wss://{}", self.addr)
    }

    /// Sends `kill` for `run` on the current connection (as soon as there is one).
    pub fn kill(&self, run: &Run) {
        let _ = self.cmds.send(Cmd::Kill(MasterMessage::Kill(Kill {
            job_name: run.job.clone(),
            job_instance: run.instance.clone(),
            machine: MACHINE.to_owned(),
            timestamp: None,
        })));
    }

    pub fn start_accepting(&self) {
        let _ = self.cmds.send(Cmd::StartAccepting);
    }

    /// Processes events until `done(seen)` holds; panics after `limit`.
    pub async fn wait_for(&mut self, limit: Duration, what: &str, done: impl Fn(&Seen) -> bool) {
        let deadline = Instant::now() + limit;
        while !done(&self.seen) {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Ok(Some(event)) => self.seen.apply(event),
                Ok(None) => panic!("test master stopped while waiting for {what}"),
                Err(_) => panic!(
                    "timed out after {limit:?} waiting for {what}; seen so far: {}",
                    self.summary()
                ),
            }
        }
    }

    /// Waits for `complete` and returns it.
    pub async fn wait_complete(&mut self, limit: Duration) -> Complete {
        self.wait_for(limit, "complete", |s| s.complete.is_some())
            .await;
        self.seen
            .complete
            .as_ref()
            .map(|(_, c)| c.clone())
            .expect("complete")
    }

    /// Collects events for `period` more.
    pub async fn idle(&mut self, period: Duration) {
        let deadline = Instant::now() + period;
        while let Ok(Some(event)) = tokio::time::timeout_at(deadline, self.events.recv()).await {
            self.seen.apply(event);
        }
    }

    fn summary(&self) -> String {
        let s = &self.seen;
        format!(
            "accepted {} closed {} connects {} starts {} heartbeats {} outputs {} ({} bytes) dups {:?} gaps {:?} complete {:?}",
            s.accepted,
            s.closed,
            s.connects.len(),
            s.starts.len(),
            s.heartbeats.len(),
            s.outputs.len(),
            s.outputs.iter().map(|o| o.2.len()).sum::<usize>(),
            s.duplicates,
            s.gaps,
            s.complete.as_ref().map(|c| &c.1)
        )
    }
}

/// The master's per-run state, kept across sockets like the real master's.
struct RunState {
    next_seq: u64,
    behaviour: Behaviour,
}

async fn serve(
    listener: TcpListener,
    behaviour: Behaviour,
    events: mpsc::UnboundedSender<Event>,
    mut cmds: mpsc::UnboundedReceiver<Cmd>,
) {
    let mut state = RunState {
        next_seq: behaviour.held_through.map_or(0, |seq| seq + 1),
        behaviour,
    };
    let mut pending_kill: Option<MasterMessage> = None;
    if state.behaviour.accept_later {
        loop {
            match cmds.recv().await {
                Some(Cmd::StartAccepting) => break,
                Some(Cmd::Kill(kill)) => pending_kill = Some(kill),
                None => return,
            }
        }
    }
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            return;
        };
        let stream: Box<dyn Io> = match &state.behaviour.tls {
            None => Box::new(tcp),
            Some(config) => {
                let acceptor = tokio_rustls::TlsAcceptor::from(config.clone());
                let Ok(tls) = acceptor.accept(tcp).await else {
                    let _ = events.send(Event::TlsRefused);
                    continue;
                };
                Box::new(tls)
            }
        };
        let Ok(ws) = tokio_tungstenite::accept_async(stream).await else {
            continue;
        };
        let _ = events.send(Event::Accepted);
        let (mut tx, mut rx) = ws.split();
        if let Some(kill) = pending_kill.take()
            && !send(&mut tx, &kill).await
        {
            pending_kill = Some(kill);
        }
        loop {
            tokio::select! {
                cmd = cmds.recv() => match cmd {
                    Some(Cmd::Kill(kill)) => {
                        if !send(&mut tx, &kill).await {
                            pending_kill = Some(kill);
                        }
                    }
                    Some(Cmd::StartAccepting) => {}
                    None => return,
                },
                frame = rx.next() => {
                    let Some(Ok(frame)) = frame else { break };
                    let Message::Text(text) = frame else { continue };
                    let msg = WrapperMessage::decode(&text).expect("wrapper sent undecodable JSON");
                    match handle(&mut state, &events, msg) {
                        Reply::None => {}
                        Reply::Send(reply) => {
                            if !send(&mut tx, &reply).await {
                                break;
                            }
                        }
                        Reply::SendAndClose(reply) => {
                            if send(&mut tx, &reply).await {
                                let _ = tx.send(Message::Close(None)).await;
                            }
                            break;
                        }
                        Reply::Drop => break,
                        Reply::Vanish => {
                            let _ = events.send(Event::Closed);
                            // Dropping the listener with the socket: later connections are
                            // refused, as by a host whose master died.
                            return;
                        }
                    }
                }
            }
        }
        let _ = events.send(Event::Closed);
    }
}

enum Reply {
    None,
    Send(MasterMessage),
    /// Send, then close the connection.
    SendAndClose(MasterMessage),
    Drop,
    /// Close the socket and stop listening for good.
    Vanish,
}

fn handle(
    state: &mut RunState,
    events: &mpsc::UnboundedSender<Event>,
    msg: WrapperMessage,
) -> Reply {
    let now = Instant::now();
    let reply = match &msg {
        WrapperMessage::Hello(Hello { envelope: h, .. })
        | WrapperMessage::Connect(Connect { envelope: h, .. })
            if state.behaviour.not_holder =>
        {
            Reply::SendAndClose(MasterMessage::Error(ErrorReply::not_holder(&h.job_name)))
        }
        WrapperMessage::Connect(_) => {
            Reply::Send(ack(AckType::Connect, None, Some(state.next_seq as i64 - 1)))
        }
        WrapperMessage::Start(_) if state.behaviour.reject_start => {
            Reply::Send(MasterMessage::Error(ErrorReply::job_not_found()))
        }
        WrapperMessage::Start(_) => Reply::Send(ack(AckType::Start, None, None)),
        WrapperMessage::Heartbeat(_) => Reply::None,
        WrapperMessage::Output(out) => {
            let seq = out.seq.expect("our wrapper always numbers outputs");
            if seq < state.next_seq {
                let _ = events.send(Event::Duplicate(seq));
                let _ = events.send(Event::Acked(seq));
                return Reply::Send(ack(AckType::Output, Some(seq), None));
            }
            if seq > state.next_seq {
                let _ = events.send(Event::Gap(seq));
                return Reply::Send(MasterMessage::Nack(Nack {
                    nack_type: NackType::OutOfOrder,
                    expected_seq: state.next_seq,
                    received_seq: seq,
                    timestamp: None,
                }));
            }
            state.next_seq += 1;
            if let Some(pos) = state.behaviour.drop_after.iter().position(|&s| s == seq) {
                state.behaviour.drop_after.remove(pos);
                let _ = events.send(Event::Received(now, msg));
                return Reply::Drop;
            }
            if state.behaviour.vanish_after == Some(seq) {
                let _ = events.send(Event::Received(now, msg));
                return Reply::Vanish;
            }
            let _ = events.send(Event::Acked(seq));
            Reply::Send(ack(AckType::Output, Some(seq), None))
        }
        WrapperMessage::Complete(c) => {
            if state.behaviour.reject_complete {
                Reply::Send(MasterMessage::Error(ErrorReply::job_not_found()))
            } else if state.behaviour.silent_on_complete {
                Reply::None
            } else {
                Reply::Send(ack(AckType::Complete, c.seq, None))
            }
        }
        _ => Reply::None,
    };
    let _ = events.send(Event::Received(now, msg));
    reply
}

fn ack(ack_type: AckType, seq: Option<u64>, last_seq: Option<i64>) -> MasterMessage {
    MasterMessage::Ack(Ack {
        ack_type,
        seq,
        last_seq,
        timestamp: None,
    })
}

async fn send<S>(tx: &mut S, msg: &MasterMessage) -> bool
where
    S: futures_util::Sink<Message> + Unpin,
{
    tx.send(Message::text(msg.encode())).await.is_ok()
}

/// The machine id every test wrapper reports.
pub const MACHINE: &str = "test-minion";

/// A wrapper run's environment and scratch directory.
pub struct Run {
    pub job: String,
    pub instance: String,
    pub dir: tempfile::TempDir,
    pub env: Vec<(String, String)>,
}

impl Run {
    /// A run of `command` against `master`, named after the test.
    pub fn new(name: &str, master_url: &str, command: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let job = format!("{name}_{}", std::process::id());
        let instance = format!("{job}_1766482300");
        let env = vec![
            ("SP_WEBSOCKET_URL", master_url.to_owned()),
            ("SP_JOB_NAME", job.clone()),
            ("SP_JOB_INSTANCE", instance.clone()),
            ("SP_COMMAND", command.to_owned()),
            ("SP_MACHINE_ID", MACHINE.to_owned()),
            (
                "SP_WRAPPER_LOGDIR",
                dir.path().join("log").display().to_string(),
            ),
            ("SP_WRAPPER_LOGLEVEL", String::from("debug")),
            ("SP_OUTPUT_INTERVAL_MS", String::from("50")),
            ("SP_RUN_TOKEN", String::from("test-token")),
        ];
        let env = env.into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
        Self {
            job,
            instance,
            dir,
            env,
        }
    }

    pub fn set(&mut self, key: &str, value: &str) -> &mut Self {
        self.env.retain(|(k, _)| k != key);
        self.env.push((key.to_owned(), value.to_owned()));
        self
    }

    pub fn unset(&mut self, key: &str) -> &mut Self {
        self.env.retain(|(k, _)| k != key);
        self
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(
            self.dir
                .path()
                .join("log")
                .join(format!("{}.log", self.job)),
        )
        .unwrap_or_default()
    }

    /// Runs the invoking `sp-wrapper` process to its end (it returns once the daemon has
    /// spawned the job) and returns its output and how long it took.
    pub fn launch(&self) -> (std::process::Output, Duration) {
        let started = std::time::Instant::now();
        let out = Command::new(env!("CARGO_BIN_EXE_sp-wrapper"))
            .env_clear()
            .env(
                "PATH",
                std::env::var_os("PATH").unwrap_or_else(|| "/usr/bin:/bin".into()),
            )
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .current_dir(self.dir.path())
            .output()
            .expect("run sp-wrapper");
        (out, started.elapsed())
    }

    /// The wrapper daemon's PID, from the `Starting job` line of its log.
    pub fn daemon_pid(&self) -> Option<u32> {
        let log = self.log_text();
        log.split("wrapper pid ")
            .nth(1)?
            .split(')')
            .next()?
            .parse()
            .ok()
    }

    /// Launches and asserts the invoking process reported a successful start.
    pub fn launch_ok(&self) -> std::process::Output {
        let (out, _) = self.launch();
        assert!(
            out.status.success(),
            "sp-wrapper failed: {:?}\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }
}

impl Drop for Run {
    /// Ends a wrapper daemon that outlived its test (one that failed before the daemon
    /// exited), by the PID its log names: it would otherwise go on looking for its master for
    /// minutes after the test is gone.
    fn drop(&mut self) {
        if let Some(pid) = self.daemon_pid()
            && alive(pid)
        {
            kill_started(pid, "sp-wrapper");
        }
    }
}

/// Whether a process with this PID exists (zombies count as gone).
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat_field(&stat, 0).is_some_and(|state| state != "Z"),
        Err(_) => false,
    }
}

/// Field `n` after the command name of a /proc/<pid>/stat line (0 = state, 2 = pgrp).
fn stat_field(stat: &str, n: usize) -> Option<String> {
    let after = &stat[stat.rfind(')')? + 2..];
    after.split(' ').nth(n).map(str::to_owned)
}

/// PIDs of live (non-zombie) processes in process group `pgid`.
pub fn group_members(pgid: u32) -> Vec<u32> {
    let mut pids = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return pids;
    };
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let state = stat_field(&stat, 0);
        let pgrp = stat_field(&stat, 2).and_then(|p| p.parse::<u32>().ok());
        if pgrp == Some(pgid) && state.as_deref() != Some("Z") {
            pids.push(pid);
        }
    }
    pids
}

/// Waits (bounded) for the wrapper daemon to exit; if it does not, kills it (we started it)
/// and fails the test.
pub async fn wait_wrapper_exit(pid: u32, limit: Duration) {
    let deadline = Instant::now() + limit;
    while alive(pid) {
        if Instant::now() > deadline {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
            panic!("wrapper {pid} still running {limit:?} after it should have exited");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Kills a process this test started (directly or through its job), after checking its name.
pub fn kill_started(pid: u32, expected_comm: &str) {
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    if comm.trim() == expected_comm {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

/// The lossy UTF-8 decoding the master should end up with, and a short hash for messages.
pub fn hash(text: &str) -> u64 {
    use std::hash::{DefaultHasher, Hash, Hasher};
    let mut h = DefaultHasher::new();
    text.hash(&mut h);
    h.finish()
}

/// A small deterministic generator, so test data needs no extra crates.
pub struct XorShift(pub u64);

impl XorShift {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

pub fn write_file(path: &Path, bytes: &[u8]) {
    std::fs::write(path, bytes).expect("write test data");
}
