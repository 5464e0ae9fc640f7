//! The shapes of a run that outlive the engine's memory of it: a machine's status, the views
//! the API and the UI show (built by the engine from live runs and by the store from stored
//! ones), and the timeline's query and rows, which either side can answer.

use std::collections::BTreeMap;

use serde::Serialize;
use time::OffsetDateTime;

use crate::{AttemptRecord, AttemptView, MachineRecord, OutputBuffer};

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

impl MachineStatus {
    /// The spelling every backend stores (the API's too).
    pub fn as_str(self) -> &'static str {
        match self {
            MachineStatus::Pending => "pending",
            MachineStatus::Running => "running",
            MachineStatus::Success => "success",
            MachineStatus::Failed => "failed",
        }
    }

    /// Reads a stored spelling; anything else reads as pending, as a row from a newer build
    /// would be safest read.
    pub fn from_stored(text: &str) -> Self {
        match text {
            "running" => MachineStatus::Running,
            "success" => MachineStatus::Success,
            "failed" => MachineStatus::Failed,
            _ => MachineStatus::Pending,
        }
    }
}

/// Reads a stored cause (its wire spelling); one this build does not know reads as
/// [`Cause::Unknown`].
pub fn stored_cause(text: Option<String>) -> Option<saltpeter_proto::Cause> {
    text.and_then(|c| serde_json::from_value(serde_json::Value::String(c)).ok())
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
    pub attempts: Vec<AttemptView>,
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

/// Which runs a timeline shows. Plain data so that a store can answer it as well.
#[derive(Clone, Debug)]
pub struct TimelineQuery {
    pub start: OffsetDateTime,
    pub end: OffsetDateTime,
    pub job: Option<String>,
    /// At most this many rows, the newest kept.
    pub limit: usize,
}

/// One run on the timeline. The legacy field names (`cron`, `job_instance`, `msg_type`,
/// `ret_code`, `timestamp`) are kept; `end`, `success`, `machines` and `failed` are added so a
/// chart needs nothing else.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TimelineEntry {
    pub cron: String,
    pub group: String,
    pub job_instance: String,
    pub msg_type: &'static str,
    /// When the run was fired.
    pub timestamp: String,
    pub end: Option<String>,
    /// 0 for a successful run, else the first non-zero machine code; `None` while running.
    pub ret_code: Option<i64>,
    pub success: Option<bool>,
    pub machines: usize,
    pub failed: usize,
    /// For a missed slot (`msg_type` `missed`): why it did not run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub missed: Option<String>,
}

impl MachineRecord {
    /// The machine as the API shows it, with the output held for it and the attempts a retry
    /// replaced (oldest first).
    pub fn view(&self, output: &OutputBuffer, replaced: &[AttemptRecord]) -> MachineView {
        MachineView {
            status: self.status,
            retcode: self.retcode,
            cause: self.cause.map(saltpeter_proto::Cause::as_str),
            late_retcode: self.late_retcode,
            starttime: self.starttime.map(rfc3339),
            endtime: self.endtime.map(rfc3339),
            last_heartbeat: self.last_heartbeat.map(rfc3339),
            wrapper_version: self.wrapper_version.clone(),
            pid: self.pid,
            wrapper_pid: self.wrapper_pid,
            output: output.text(),
            output_bytes: output.total_bytes(),
            output_omitted_bytes: output.omitted_bytes(),
            attempt: attempt_number(replaced.len()),
            attempts: replaced.iter().map(AttemptRecord::view).collect(),
        }
    }
}

/// The number of the attempt that follows `replaced` earlier ones: 1 for the first launch.
pub fn attempt_number(replaced: usize) -> u32 {
    u32::try_from(replaced)
        .unwrap_or(u32::MAX)
        .saturating_add(1)
}

/// RFC 3339 with `T` and `+00:00`, microsecond precision.
pub fn rfc3339(at: OffsetDateTime) -> String {
    saltpeter_proto::Timestamp::new(at).to_string()
}
