//! The saltpeter wire protocol: every message exchanged between `sp-wrapper` and the machines
//! endpoint of `sp-master`, plus the protocol constants and exit codes both sides agree on.
//!
//! Architecture invariant: this crate does no I/O. It knows JSON and time stamps, nothing about
//! sockets, files or clocks; callers pass "now" in. That keeps it usable from the wrapper's
//! synchronous start-up code, from the master's actor, and from tests alike.
//!
//! Compatibility: the message names, fields and types are those of the original Python
//! saltpeter 0.9.31, so an old wrapper talks to a new master and vice versa. Our additions
//! (`connect.protocol`, `connect.token`, `connect.wrapper_pid`, `connect.signature`, `hello`,
//! `challenge`, `ack.last_seq`, `complete.cause`, `complete.signal`, the `UNAUTHORIZED`, `BAD_REQUEST`
//! and `NOT_HOLDER` error codes) are optional on the wire and ignored by the original. Unknown
//! fields are ignored on decode, and an unknown error code decodes as `ErrorCode::Unknown`, so
//! both sides can grow.

#![forbid(unsafe_code)]

pub mod consts;
mod master;
mod timestamp;
mod wrapper;

pub use consts::*;
pub use master::{
    Ack, AckType, Challenge, ErrorCode, ErrorReply, Kill, MasterMessage, Nack, NackType,
    SyncResponse,
};
pub use timestamp::{Timestamp, TimestampError};
pub use wrapper::{
    Cause, Complete, Connect, Envelope, Heartbeat, Hello, Killed, Output, Start, SyncRequest,
    WrapperError, WrapperMessage,
};

/// The bytes a wrapper signs with its machine's key to prove which machine it speaks for:
/// the challenge's nonce, the run instance and the machine, each length-prefixed so no choice
/// of names can make two different triples sign the same bytes, behind a fixed label so the
/// signature means nothing in any other protocol.
pub fn signing_payload(nonce: &str, job_instance: &str, machine: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(64 + nonce.len() + job_instance.len() + machine.len());
    out.extend_from_slice(SIGNING_LABEL.as_bytes());
    for field in [nonce, job_instance, machine] {
        out.extend_from_slice(field.len().to_string().as_bytes());
        out.push(b':');
        out.extend_from_slice(field.as_bytes());
        out.push(b'\n');
    }
    out
}

/// Why a frame could not be decoded. Carries serde's message, which names the offending field
/// and column, so a rejected message can be logged and answered with `BAD_REQUEST`.
#[derive(Debug, thiserror::Error)]
#[error("malformed message: {0}")]
pub struct DecodeError(#[from] serde_json::Error);

impl WrapperMessage {
    /// Decodes one text frame sent by a wrapper.
    pub fn decode(text: &str) -> Result<Self, DecodeError> {
        Ok(serde_json::from_str(text)?)
    }

    /// Encodes this message as one JSON text frame.
    pub fn encode(&self) -> String {
        // Serialising these plain structs cannot fail: every key is a string and no map has
        // non-string keys. Falling back to an empty object keeps the function total anyway.
        serde_json::to_string(self).unwrap_or_else(|_| String::from("{}"))
    }
}

impl MasterMessage {
    /// Decodes one text frame sent by a master.
    pub fn decode(text: &str) -> Result<Self, DecodeError> {
        Ok(serde_json::from_str(text)?)
    }

    /// Encodes this message as one JSON text frame.
    pub fn encode(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|_| String::from("{}"))
    }
}
