//! Run and machine records, and the views the API serialises.

use std::collections::BTreeMap;
use std::sync::Arc;

use saltpeter_proto::{Cause, EXIT_SUCCESS};
use serde::Serialize;
use time::OffsetDateTime;
use tokio::time::Instant;

use crate::config::JobSpec;
use crate::identity::Identity;
use crate::runs::OutputBuffer;

/// Where a machine is in its run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MachineStatus {
    /// Selected, waiting for its batch, its launch, or its wrapper's `start`.
    Pending,
    /// The wrapper reported `start`.
    Running,
    /// Ended with exit code 0.
    Success,
    /// Ended with any other code, or a master verdict.
    Failed,
}

/// One machine of one run.
#[derive(Debug)]
pub struct MachineRun {
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
    pub durable_next_seq: u64,
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
    /// one more than their count (see `engine/retry.rs`).
    pub attempts: Vec<crate::store::AttemptRecord>,
    /// When the next attempt is due, while the machine waits for its retry.
    pub retry_at: Option<Instant>,
}

/// The monotonic instants the monitor judges a machine by. Never derived from wrapper
/// timestamps.
#[derive(Debug, Default)]
pub struct MachineClock {
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
    pub kill_sent: Option<Instant>,
    /// The deadline this machine currently has queued in the monitor, if any.
    pub armed: Option<Instant>,
    /// Legacy mode (`use_wrapper: false`): the launcher runs the command itself, so the
    /// start-up and heartbeat rules do not apply; timeouts and kills still do.
    pub direct: bool,
}

impl MachineRun {
    pub fn new() -> Self {
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
    pub fn attempt(&self) -> u32 {
        u32::try_from(self.attempts.len())
            .unwrap_or(u32::MAX)
            .saturating_add(1)
    }

    /// Whether the machine has a final result.
    pub fn ended(&self) -> bool {
        self.endtime.is_some()
    }

    /// Records the final result. Returns false (and records nothing) if it already ended.
    pub fn finish(&mut self, retcode: i64, cause: Cause, at: OffsetDateTime) -> bool {
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

    pub fn view(&self) -> MachineView {
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
                .map(crate::store::AttemptRecord::view)
                .collect(),
        }
    }
}

impl Default for MachineRun {
    fn default() -> Self {
        Self::new()
    }
}

/// One fired instance of a job.
#[derive(Debug)]
pub struct Run {
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
    pub fn view(&self) -> RunView {
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
    pub fn unfinished(&self) -> impl Iterator<Item = (&String, &MachineRun)> {
        self.machines.iter().filter(|(_, m)| !m.ended())
    }
}

/// A machine as the API shows it; `null` where unknown.
#[derive(Clone, Debug, Serialize)]
pub struct MachineView {
    pub status: MachineStatus,
    pub retcode: Option<i64>,
    pub cause: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub late_retcode: Option<i64>,
    pub starttime: Option<String>,
    pub endtime: Option<String>,
    pub last_heartbeat: Option<String>,
    pub wrapper_version: Option<String>,
    pub pid: Option<u32>,
    pub wrapper_pid: Option<u32>,
    pub output: String,
    pub output_bytes: u64,
    pub output_omitted_bytes: u64,
    /// The current (or final) attempt, 1 unless the job retried this machine.
    pub attempt: u32,
    /// The attempts a retry replaced, oldest first; absent when there were none.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub attempts: Vec<crate::store::AttemptView>,
}

/// A run as the API shows it.
#[derive(Clone, Debug, Serialize)]
pub struct RunView {
    pub instance: String,
    pub job: String,
    pub group: String,
    pub started: String,
    pub ended: Option<String>,
    pub success: Option<bool>,
    pub killed: bool,
    pub maintenance: Vec<String>,
    pub machines: BTreeMap<String, MachineView>,
    /// For a missed slot: why it did not run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub missed: Option<String>,
}

/// RFC 3339 with `T` and `+00:00`, microsecond precision.
pub fn rfc3339(at: OffsetDateTime) -> String {
    saltpeter_proto::Timestamp::new(at).to_string()
}
