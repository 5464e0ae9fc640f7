//! Protocol constants and exit codes. Both binaries take their timings from here so the
//! wrapper's cadence and the master's verdicts can never drift apart.

use std::time::Duration;

/// Protocol version announced in `connect.protocol` by our wrapper. The original Python
/// wrapper sends no version; the master treats that as version 1.
pub const PROTOCOL_VERSION: u32 = 2;

/// The first line of every [`crate::signing_payload`].
pub const SIGNING_LABEL: &str = "saltpeter connect signature v1\n";

/// How often a connected wrapper sends `heartbeat`.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(5);
/// How long the master waits for a heartbeat before it marks the machine 253.
pub const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(15);
/// How long the master waits for `start` after launching a wrapper before it marks 254.
pub const STARTUP_WINDOW: Duration = Duration::from_secs(30);
/// Extra time the master grants past a job's `timeout` before it marks 124 itself.
pub const TIMEOUT_GRACE: Duration = Duration::from_secs(30);
/// How long the master waits for `complete` after a kill before it marks 143 itself.
pub const KILL_GRACE: Duration = Duration::from_secs(30);
/// How long the wrapper waits between SIGTERM and SIGKILL to the job's process group.
pub const TERM_GRACE: Duration = Duration::from_secs(5);

/// Largest payload the wrapper puts in one `output` message, in bytes of UTF-8.
pub const OUTPUT_CHUNK_BYTES: usize = 512_000;
/// Largest text frame the master accepts from a wrapper. An output chunk of
/// [`OUTPUT_CHUNK_BYTES`] can grow up to six-fold when every byte needs a `\u00XX` escape.
pub const MAX_FRAME_BYTES: usize = 4 * 1024 * 1024;

/// The job's own exit status 0.
pub const EXIT_SUCCESS: i64 = 0;
/// The job exceeded its timeout.
pub const EXIT_TIMEOUT: i64 = 124;
/// The job was killed on request (API, UI or CLI).
pub const EXIT_KILLED: i64 = 143;
/// No heartbeat reached the master for [`HEARTBEAT_TIMEOUT`].
pub const EXIT_HEARTBEAT_LOST: i64 = 253;
/// The wrapper never started the job (start-up window passed, launch failed, lock held).
pub const EXIT_NOT_STARTED: i64 = 254;
/// Any other error: target unreachable, wrapper error.
pub const EXIT_ERROR: i64 = 255;
/// Recorded when a `complete` carries no `retcode` (the original's behaviour).
pub const EXIT_UNKNOWN: i64 = -1;

/// The value of a job's `allow_overlap` key that lifts overlap prevention. Any other value
/// keeps it; this mirrors the original, where the phrase is a deliberate speed bump.
pub const OVERLAP_MAGIC: &str = "i know what i am doing!";

/// Default TCP port of the machines endpoint (wrappers connect here).
pub const DEFAULT_MACHINES_PORT: u16 = 8889;
/// Default TCP port of the HTTP API and UI.
pub const DEFAULT_API_PORT: u16 = 8888;

/// The text of the 253 verdict, as the original writes it.
pub fn heartbeat_lost_line(seconds: u64) -> String {
    format!("\n[SALTPETER ERROR: Job lost connection - no heartbeat for {seconds} seconds]\n")
}

/// The text the wrapper appends after a timeout kill.
pub fn timeout_line(seconds: u64) -> String {
    format!("\n[Job exceeded timeout of {seconds} seconds]\n")
}

/// The text the wrapper appends after a kill on request.
pub const KILLED_LINE: &str = "\n[Job terminated by user request]\n";
/// The text the master appends when a killed machine never confirmed.
pub const KILL_GRACE_EXPIRED_LINE: &str =
    "\n[Job terminated by user request - grace period expired after 30s]\n";
/// The text the master appends when a machine passed timeout + grace without `complete`.
pub const MASTER_TIMEOUT_LINE: &str = "\n[SALTPETER ERROR: Job exceeded timeout]\n";
