//! The engine's live run and machine state.

use std::collections::BTreeMap;
use std::sync::Arc;

use saltpeter_proto::{Cause, EXIT_SUCCESS};
use time::OffsetDateTime;
use tokio::time::Instant;

use crate::identity::Identity;
use crate::runs::{MachineStatus, MachineView, OutputBuffer, RunView};
use saltpeter_config::JobSpec;
use saltpeter_store::rfc3339;

/// One machine of one run, as the engine works on it. It differs from the store's
/// `MachineRecord` because it carries what must never be stored (the live connection, monotonic
/// deadlines, the in-memory output buffer and the durable-ack watermark), and the store must
/// not depend on the engine; `persist.rs` converts between the two.
#[derive(Debug)]
pub(crate) struct MachineRun {
    pub status: MachineStatus,
    pub retcode: Option<i64>,
    pub cause: Option<Cause>,
    /// A `complete` that arrived after the master had already decided (253, 124, ...).
    pub late_retcode: Option<i64>,
    /// When the master launched the wrapper (or, before that, selected the machine).
    pub starttime: Option<OffsetDateTime>,
    pub endtime: Option<OffsetDateTime>,
    /// When the master last received a heartbeat (master's clock).
    pub last_heartbeat: Option<OffsetDateTime>,
    pub wrapper_version: Option<String>,
    /// PID of the job's `/bin/sh -c` on the machine.
    pub pid: Option<u32>,
    pub wrapper_pid: Option<u32>,
    pub output: OutputBuffer,
    /// The next output seq this machine's wrapper should send; state that survives reconnects.
    pub next_seq: u64,
    /// Output below this seq is durable in the store (and may be acked).
    pub(crate) durable_next_seq: u64,
    /// The connection currently speaking for this machine.
    pub conn: Option<u64>,
    /// Whether that connection's wrapper announced our protocol (2) rather than the original.
    pub modern: bool,
    /// A wrapper proved this machine's credential at least once. From then on a connection
    /// without credentials (a legacy wrapper) can neither take the machine over nor write
    /// for it.
    pub authenticated: bool,
    /// Monotonic bookkeeping for the monitor.
    pub clock: MachineClock,
    /// Earlier attempts that a retry replaced, oldest first; the current attempt's number is
    /// one more than their count (see `retry.rs`).
    pub attempts: Vec<saltpeter_store::AttemptRecord>,
    /// When the next attempt is due, while the machine waits for its retry.
    pub retry_at: Option<Instant>,
}

/// The monotonic instants the monitor judges a machine by. Never derived from wrapper
/// timestamps.
#[derive(Debug, Default)]
pub(crate) struct MachineClock {
    /// Launch time; `None` while the machine waits for its batch.
    pub launched: Option<Instant>,
    /// Why the launcher thinks the wrapper did not start, if it said so.
    pub launch_problem: Option<String>,
    /// Receipt of `start`, which also starts the heartbeat clock.
    pub started: Option<Instant>,
    /// Receipt of the latest heartbeat (or `start`, before the first heartbeat).
    pub last_beat: Option<Instant>,
    /// When a kill was requested for this machine.
    pub kill_requested: Option<Instant>,
    /// When a `kill` frame was last sent.
    pub(crate) kill_sent: Option<Instant>,
    /// The deadline this machine currently has queued in the monitor, if any.
    pub armed: Option<Instant>,
    /// Legacy mode (`use_wrapper: false`): the launcher runs the command itself, so the
    /// start-up and heartbeat rules do not apply; timeouts and kills still do.
    pub(crate) direct: bool,
}

impl MachineRun {
    pub(crate) fn new() -> Self {
        Self {
            status: MachineStatus::Pending,
            retcode: None,
            cause: None,
            late_retcode: None,
            starttime: None,
            endtime: None,
            last_heartbeat: None,
            wrapper_version: None,
            pid: None,
            wrapper_pid: None,
            output: OutputBuffer::default(),
            next_seq: 0,
            durable_next_seq: 0,
            conn: None,
            modern: false,
            authenticated: false,
            clock: MachineClock::default(),
            attempts: Vec::new(),
            retry_at: None,
        }
    }

    /// The current attempt's number, 1 for the first launch.
    pub(crate) fn attempt(&self) -> u32 {
        saltpeter_store::attempt_number(self.attempts.len())
    }

    /// Whether the machine has a final result.
    pub(crate) fn ended(&self) -> bool {
        self.endtime.is_some()
    }

    /// Records the final result. Returns false (and records nothing) if it already ended.
    pub(crate) fn finish(&mut self, retcode: i64, cause: Cause, at: OffsetDateTime) -> bool {
        if self.ended() {
            return false;
        }
        self.retcode = Some(retcode);
        self.cause = Some(cause);
        self.endtime = Some(at);
        self.status = if retcode == EXIT_SUCCESS {
            MachineStatus::Success
        } else {
            MachineStatus::Failed
        };
        self.conn = None;
        self.retry_at = None;
        true
    }

    pub(crate) fn view(&self) -> MachineView {
        MachineView {
            status: self.status,
            retcode: self.retcode,
            cause: self.cause.map(Cause::as_str),
            late_retcode: self.late_retcode,
            starttime: self.starttime.map(rfc3339),
            endtime: self.endtime.map(rfc3339),
            last_heartbeat: self.last_heartbeat.map(rfc3339),
            wrapper_version: self.wrapper_version.clone(),
            pid: self.pid,
            wrapper_pid: self.wrapper_pid,
            output: self.output.text(),
            output_bytes: self.output.total_bytes(),
            output_omitted_bytes: self.output.omitted_bytes(),
            attempt: self.attempt(),
            attempts: self
                .attempts
                .iter()
                .map(saltpeter_store::AttemptRecord::view)
                .collect(),
        }
    }
}

impl Default for MachineRun {
    fn default() -> Self {
        Self::new()
    }
}

/// One fired instance of a job, as the engine works on it. It differs from the store's
/// `RunRecord` because it holds the job's live spec, its parsed identity and its machines,
/// where the record holds only plain durable fields; `persist.rs` converts between the two.
#[derive(Debug)]
pub(crate) struct Run {
    /// `<job>_<unix seconds>`, unique.
    pub instance: String,
    pub job: Arc<JobSpec>,
    pub started: OffsetDateTime,
    pub ended: Option<OffsetDateTime>,
    pub success: Option<bool>,
    /// The run's secret. With [`Identity::SaltKey`] (and runs stored before machine
    /// credentials) it is handed to every wrapper as `SP_RUN_TOKEN`; otherwise it never leaves
    /// the master and each machine gets its own token derived from it.
    pub token: String,
    /// How this run's machines prove which machine they are.
    pub identity: Identity,
    /// Every selected machine, including those whose batch has not come yet.
    pub machines: BTreeMap<String, MachineRun>,
    /// Machines left out because they are under maintenance.
    pub maintenance: Vec<String>,
    /// Batches not launched yet, in order.
    pub pending_batches: std::collections::VecDeque<Vec<String>>,
    /// Targets are still being resolved (the launcher's ping is in flight).
    pub resolving: bool,
    /// A kill was requested for the whole run.
    pub killed: bool,
}

impl Run {
    pub(crate) fn view(&self) -> RunView {
        RunView {
            instance: self.instance.clone(),
            job: self.job.name.clone(),
            group: self.job.group.clone(),
            started: rfc3339(self.started),
            ended: self.ended.map(rfc3339),
            success: self.success,
            killed: self.killed,
            maintenance: self.maintenance.clone(),
            machines: self
                .machines
                .iter()
                .map(|(k, m)| (k.clone(), m.view()))
                .collect(),
            missed: None,
        }
    }

    /// Machines not ended yet.
    pub(crate) fn unfinished(&self) -> impl Iterator<Item = (&String, &MachineRun)> {
        self.machines.iter().filter(|(_, m)| !m.ended())
    }
}
