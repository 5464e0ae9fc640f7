//! What the job log and the shipper both take in: the [`LogEntry`] the engine sends, and the
//! original's carriage-return clean-up that both apply to output. Both sides import this
//! module and neither imports the other's internals.

use std::io::{self, BufRead, Write};

use time::OffsetDateTime;

/// One thing to record. Times are the master's wall clock.
#[derive(Debug)]
pub enum LogEntry {
    /// A run started.
    Start {
        job: String,
        instance: String,
        at: OffsetDateTime,
    },
    /// A machine's wrapper is being launched.
    MachineStart {
        job: String,
        instance: String,
        machine: String,
        at: OffsetDateTime,
    },
    /// Nothing was left to run on after filtering.
    NoMachines { job: String, instance: String },
    /// A run was refused because `running` is still going.
    Overlap {
        job: String,
        running: String,
        at: OffsetDateTime,
    },
    /// A machine was skipped, with why (maintenance).
    Skipped {
        job: String,
        instance: String,
        machine: String,
        why: String,
        at: OffsetDateTime,
    },
    /// A line naming who did something to a run (started it by hand, asked for a kill). It
    /// is a line of its own so that the original lines keep their format.
    Note {
        job: String,
        text: String,
        at: OffsetDateTime,
    },
    /// Text from a machine, in arrival order.
    Output {
        instance: String,
        machine: String,
        text: String,
    },
    /// A machine's outcome; the block includes everything spooled for it.
    MachineResult {
        job: String,
        instance: String,
        machine: String,
        code: i64,
        at: OffsetDateTime,
    },
    /// A run ended, with its verdict (docs/COMPATIBILITY.md, "Runs and their verdict"): machines with a result, how many of
    /// them failed, and whether the run counts as a success (a killed run never does).
    End {
        job: String,
        instance: String,
        at: OffsetDateTime,
        total: usize,
        failed: usize,
        success: bool,
    },
}

/// The original's carriage-return clean-up (docs/COMPATIBILITY.md), streaming line by line: in every line that
/// contains `\r`, keep only the last non-empty `\r`-separated segment.
pub(crate) fn strip_carriage_returns(
    mut input: impl BufRead,
    out: &mut impl Write,
) -> io::Result<()> {
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = input.read_until(b'\n', &mut line)?;
        if n == 0 {
            return Ok(());
        }
        let had_newline = line.last() == Some(&b'\n');
        if had_newline {
            line.pop();
        }
        let kept: &[u8] = if line.contains(&b'\r') {
            line.split(|b| *b == b'\r')
                .rev()
                .find(|seg| !seg.is_empty())
                .unwrap_or(&[])
        } else {
            &line
        };
        out.write_all(kept)?;
        if had_newline {
            out.write_all(b"\n")?;
        }
    }
}

/// [`strip_carriage_returns`] for a string in memory.
pub(crate) fn strip_carriage_returns_str(text: &str) -> String {
    let mut out = Vec::with_capacity(text.len());
    // Reading from a slice and writing to a Vec cannot fail.
    let _ = strip_carriage_returns(text.as_bytes(), &mut out);
    String::from_utf8_lossy(&out).into_owned()
}
