//! Messages a wrapper sends to the master (docs/PROTOCOL.md), with our additive extensions.

use serde::{Deserialize, Serialize};

use crate::Timestamp;

/// One wrapper-to-master frame. Serialised as a JSON object with a `type` tag.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum WrapperMessage {
    /// Asks for a challenge before `connect`, when the wrapper proves its machine with a key
    /// (v2).
    Hello(Hello),
    /// Opens (or re-opens, after a reconnect) the session for one (instance, machine).
    Connect(Connect),
    /// The job's command has been spawned.
    Start(Start),
    /// The wrapper is alive. Only these reset the master's liveness deadline.
    Heartbeat(Heartbeat),
    /// A batch of the job's merged stdout/stderr.
    Output(Output),
    /// "Which of my outputs do you hold?" after an ack is overdue.
    SyncRequest(SyncRequest),
    /// The job has ended.
    Complete(Complete),
    /// The wrapper failed (the original defines it; ours reports failures via `complete`).
    Error(WrapperError),
    /// Informational; the original master only logs it.
    Killed(Killed),
}

impl WrapperMessage {
    /// The fields every wrapper message carries.
    pub fn envelope(&self) -> &Envelope {
        match self {
            Self::Hello(m) => &m.envelope,
            Self::Connect(m) => &m.envelope,
            Self::Start(m) => &m.envelope,
            Self::Heartbeat(m) => &m.envelope,
            Self::Output(m) => &m.envelope,
            Self::SyncRequest(m) => &m.envelope,
            Self::Complete(m) => &m.envelope,
            Self::Error(m) => &m.envelope,
            Self::Killed(m) => &m.envelope,
        }
    }

    /// The `type` tag, for logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Hello(_) => "hello",
            Self::Connect(_) => "connect",
            Self::Start(_) => "start",
            Self::Heartbeat(_) => "heartbeat",
            Self::Output(_) => "output",
            Self::SyncRequest(_) => "sync_request",
            Self::Complete(_) => "complete",
            Self::Error(_) => "error",
            Self::Killed(_) => "killed",
        }
    }
}

/// Fields common to every wrapper message (docs/PROTOCOL.md).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    /// `SP_JOB_NAME`.
    pub job_name: String,
    /// `SP_JOB_INSTANCE`, `<job>_<unix seconds>` as the master made it.
    pub job_instance: String,
    /// The minion id the wrapper reports under.
    pub machine: String,
    /// The wrapper's wall clock. Informational only; absent means "use the receive time".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestamp: Option<Timestamp>,
}

/// `hello` (v2): the first message of a connection whose wrapper signs `connect` with its
/// machine's key. The master answers with a fresh `challenge`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    #[serde(flatten)]
    pub envelope: Envelope,
    /// Protocol version of the wrapper.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<u32>,
}

/// `connect`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Connect {
    #[serde(flatten)]
    pub envelope: Envelope,
    /// Protocol version; absent for the original wrapper (version 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<u32>,
    /// The secret the master handed out as `SP_RUN_TOKEN`: one per machine with the local
    /// launcher, one per run (and a signature besides) with Salt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// Base64 RSA-SHA256 (PKCS#1 v1.5) signature by the machine's Salt key over
    /// [`crate::signing_payload`] of the connection's challenge (v2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<String>,
    /// PID of the long-lived wrapper process (not the job).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wrapper_pid: Option<u32>,
}

/// `start`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Start {
    #[serde(flatten)]
    pub envelope: Envelope,
    /// PID of the `/bin/sh -c` child (also its process group id).
    pub pid: u32,
    /// The wrapper's version string.
    pub version: String,
}

/// `heartbeat`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    #[serde(flatten)]
    pub envelope: Envelope,
}

/// `output`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Output {
    #[serde(flatten)]
    pub envelope: Envelope,
    /// `stdout` for the job's output, `stderr` for the wrapper's own kill/timeout notice.
    /// The master does not interpret it.
    #[serde(default = "default_stream")]
    pub stream: String,
    /// The text. Our wrapper decodes UTF-8 incrementally; invalid bytes become U+FFFD.
    pub data: String,
    /// Sequence number, from 0, one per message. Absent from some original messages.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
}

fn default_stream() -> String {
    String::from("stdout")
}

/// `sync_request`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncRequest {
    #[serde(flatten)]
    pub envelope: Envelope,
    /// Highest seq the wrapper has seen acked, -1 if none.
    pub last_acked_seq: i64,
    /// The next seq the wrapper will use.
    pub next_seq: u64,
}

/// Why a machine's run ended. The wrapper reports the first seven; the master decides the
/// rest itself. Unknown values from a newer peer decode as [`Cause::Unknown`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Cause {
    /// The command exited on its own; retcode is its status.
    Exit,
    /// The wrapper killed the job after `SP_TIMEOUT` (124).
    Timeout,
    /// The wrapper killed the job on the master's request (143).
    Killed,
    /// The command died from a signal nobody asked for (retcode 128 + signal).
    Signal,
    /// Another run of the job held the lock on this minion (254).
    Lock,
    /// The command could not be spawned.
    SpawnError,
    /// The wrapper itself was told to stop (SIGTERM) and took the job down with it.
    WrapperTerminated,
    /// Master: no heartbeat within the heartbeat timeout (253).
    HeartbeatLost,
    /// Master: no `start` within the start-up window, or the launcher failed (254).
    NotStarted,
    /// Master: no `complete` within timeout + grace (124).
    MasterTimeout,
    /// Master: killed, but the wrapper never confirmed within the grace (143).
    KillUnconfirmed,
    /// Master: killed before the wrapper was launched (143).
    KilledBeforeStart,
    /// Master: the target did not answer the launcher's ping (255).
    NoResponse,
    /// Master: the wrapper sent an `error` message (255).
    WrapperError,
    /// A cause this build does not know.
    #[serde(other)]
    Unknown,
}

impl Cause {
    /// The wire spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Exit => "exit",
            Self::Timeout => "timeout",
            Self::Killed => "killed",
            Self::Signal => "signal",
            Self::Lock => "lock",
            Self::SpawnError => "spawn_error",
            Self::WrapperTerminated => "wrapper_terminated",
            Self::HeartbeatLost => "heartbeat_lost",
            Self::NotStarted => "not_started",
            Self::MasterTimeout => "master_timeout",
            Self::KillUnconfirmed => "kill_unconfirmed",
            Self::KilledBeforeStart => "killed_before_start",
            Self::NoResponse => "no_response",
            Self::WrapperError => "wrapper_error",
            Self::Unknown => "unknown",
        }
    }
}

/// `complete`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Complete {
    #[serde(flatten)]
    pub envelope: Envelope,
    /// Exit code; may be negative from the original wrapper (killed by signal). Absent means
    /// unknown and is recorded as -1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retcode: Option<i64>,
    /// The next unused output seq: everything below it belongs to this run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
    /// Why the job ended (our extension).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cause: Option<Cause>,
    /// The signal that ended the command, when one did (our extension).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
}

/// `error` from a wrapper.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WrapperError {
    #[serde(flatten)]
    pub envelope: Envelope,
    pub error: String,
}

/// `killed`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Killed {
    #[serde(flatten)]
    pub envelope: Envelope,
}
