//! Messages the master sends to a wrapper (docs/PROTOCOL.md), with our additive extensions.

use serde::{Deserialize, Serialize};

use crate::Timestamp;

/// One master-to-wrapper frame. Serialised as a JSON object with a `type` tag.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum MasterMessage {
    Ack(Ack),
    Nack(Nack),
    SyncResponse(SyncResponse),
    Kill(Kill),
    Error(ErrorReply),
    /// The answer to `hello` (v2).
    Challenge(Challenge),
}

/// `challenge` (v2): a random nonce, fresh for each `hello`, that the wrapper signs into its
/// `connect`. It is good for that one connection only.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Challenge {
    pub nonce: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestamp: Option<Timestamp>,
}

/// What an `ack` confirms.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AckType {
    Connect,
    Start,
    Output,
    Complete,
    /// An ack type this build does not know.
    #[serde(other)]
    Unknown,
}

/// `ack`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {
    pub ack_type: AckType,
    /// Output acks: the seq confirmed; cumulative (everything at or below it is held).
    /// Complete acks: the `complete.seq` echoed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
    /// Connect acks (our extension): the highest output seq the master already holds for
    /// this (instance, machine), -1 for none. A reconnecting wrapper resumes right after it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seq: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestamp: Option<Timestamp>,
}

/// Why a `nack` was sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NackType {
    OutOfOrder,
    #[serde(other)]
    Unknown,
}

/// `nack`: an output arrived with a seq beyond the next expected one.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Nack {
    pub nack_type: NackType,
    pub expected_seq: u64,
    pub received_seq: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestamp: Option<Timestamp>,
}

/// `sync_response`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncResponse {
    /// The highest output seq the master holds for this (instance, machine), -1 for none.
    pub last_seq: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestamp: Option<Timestamp>,
}

/// `kill`: stop the job (SIGTERM to its group, grace, SIGKILL) and report 143.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Kill {
    pub job_name: String,
    pub job_instance: String,
    pub machine: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestamp: Option<Timestamp>,
}

/// Error codes of an `error` reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ErrorCode {
    /// The instance is unknown to the master; terminal for the wrapper.
    JobNotFound,
    /// The run token is missing or wrong (our extension).
    Unauthorized,
    /// The frame could not be decoded or is too large (our extension).
    BadRequest,
    /// This master does not hold the job's lease now (our extension, for several masters on
    /// one database): the wrapper should try another master. Sent in answer to `hello` or
    /// `connect`, then the master closes the connection. Not terminal, unlike the codes
    /// above: another master of the cluster holds the run, or will within a takeover.
    NotHolder,
    #[serde(other)]
    Unknown,
}

/// `error`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorReply {
    pub code: ErrorCode,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestamp: Option<Timestamp>,
}

impl ErrorReply {
    /// The original's `JOB_NOT_FOUND` reply, word for word.
    pub fn job_not_found() -> Self {
        Self {
            code: ErrorCode::JobNotFound,
            message: String::from("Job no longer exists on server (stopped or restarted)"),
            timestamp: None,
        }
    }

    /// `NOT_HOLDER` for `job`: this master does not hold the job now, so the wrapper should
    /// try another master.
    pub fn not_holder(job: &str) -> Self {
        Self {
            code: ErrorCode::NotHolder,
            message: format!(
                "This master does not hold job {job:?} now; try another master of the cluster"
            ),
            timestamp: None,
        }
    }
}
