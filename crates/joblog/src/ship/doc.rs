//! The search document of the original (docs/COMPATIBILITY.md, "Job log and search documents"), built from job-log entries, and the daily index name
//! it goes to.

use std::io::{self, BufReader, Read, Write};

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::entry::{LogEntry, strip_carriage_returns, strip_carriage_returns_str};

/// One log event as Elasticsearch/OpenSearch stores it. The first eight fields are the
/// original's; the last two appear only when the output was cut to its head and tail.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Document {
    pub job_name: String,
    pub group: String,
    pub job_instance: String,
    /// RFC 3339, UTC, microseconds: `2025-12-23T09:31:46.123456Z`.
    #[serde(rename = "@timestamp")]
    pub timestamp: String,
    pub(crate) return_code: i64,
    pub machine: String,
    /// Carriage-return processed.
    pub output: String,
    pub msg_type: String,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub(crate) output_truncated: bool,
    /// The full size of the processed output in bytes, when it was cut.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_bytes: Option<u64>,
}

impl Document {
    /// A document with no output, code 0 and no machine.
    pub fn new(msg_type: &str, job: &str, group: &str, instance: &str, at: OffsetDateTime) -> Self {
        Self {
            job_name: job.to_owned(),
            group: group.to_owned(),
            job_instance: instance.to_owned(),
            timestamp: rfc3339(at),
            return_code: 0,
            machine: String::new(),
            output: String::new(),
            msg_type: msg_type.to_owned(),
            output_truncated: false,
            output_bytes: None,
        }
    }

    /// `<prefix>-YYYY.MM.DD` by the event's UTC date (the original used the master's local date
    /// at write time; docs/COMPATIBILITY.md).
    pub fn index(&self, prefix: &str) -> String {
        // `timestamp` always starts with `YYYY-MM-DD` because `rfc3339` wrote it.
        let date = self.timestamp.get(..10).unwrap_or("1970-01-01");
        format!("{prefix}-{}", date.replace('-', "."))
    }
}

/// RFC 3339 in UTC with fixed microseconds, which both backends' default date mapping accepts.
/// It writes `Z` where the API's times (`saltpeter_store::rfc3339`) write `+00:00`: each form is
/// what its readers have always been given, so the two stay separate.
pub fn rfc3339(at: OffsetDateTime) -> String {
    // Through `Timestamp`, whose conversion to UTC cannot panic at the calendar's edges.
    let at = saltpeter_proto::Timestamp::new(at).get();
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:06}Z",
        at.year(),
        u8::from(at.month()),
        at.day(),
        at.hour(),
        at.minute(),
        at.second(),
        at.microsecond()
    )
}

/// Turns log entries into documents. Lives on the job-log thread.
///
/// `end` carries the run's verdict (0 success, 1 failure) and the `Completed: x/y` text, as in
/// the original; the engine puts both on the job log's `End` entry.
pub(crate) struct DocBuilder {
    group_of: Box<dyn Fn(&str) -> String + Send>,
    output_limit: usize,
}

impl std::fmt::Debug for DocBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DocBuilder")
            .field("output_limit", &self.output_limit)
            .finish_non_exhaustive()
    }
}

impl DocBuilder {
    /// `group_of` maps a job name to its group (`""` when unknown); `output_limit` bounds the
    /// output of one document (head and tail are kept).
    pub(crate) fn new(group_of: Box<dyn Fn(&str) -> String + Send>, output_limit: usize) -> Self {
        Self {
            group_of,
            output_limit,
        }
    }

    /// The document for `entry`, or `None` for entries that are not log events (output
    /// chunks). `output` reads the machine's whole output for a `machine_result`.
    pub(crate) fn document(
        &mut self,
        entry: &LogEntry,
        output: Option<&mut dyn Read>,
    ) -> Option<Document> {
        let now = OffsetDateTime::now_utc();
        let doc = match entry {
            // Who did what is in the audit trail; the shipped documents keep the original's
            // kinds.
            LogEntry::Output { .. } | LogEntry::Note { .. } => return None,
            LogEntry::Start { job, instance, at } => self.doc("start", job, instance, *at),
            LogEntry::MachineStart {
                job,
                instance,
                machine,
                at,
            } => {
                let mut d = self.doc("machine_start", job, instance, *at);
                d.machine = machine.clone();
                d
            }
            // The entry has no time of its own; it is written as the run resolves its targets.
            LogEntry::NoMachines { job, instance } => self.doc("no_machines", job, instance, now),
            LogEntry::Overlap { job, running, at } => self.doc("overlap", job, running, *at),
            LogEntry::Skipped {
                job,
                instance,
                machine,
                why,
                at,
            } => {
                let mut d = self.doc("maintenance", job, instance, *at);
                d.machine = machine.clone();
                d.output = strip_carriage_returns_str(why);
                d
            }
            LogEntry::MachineResult {
                job,
                instance,
                machine,
                code,
                at,
            } => {
                let mut d = self.doc("machine_result", job, instance, *at);
                d.machine = machine.clone();
                d.return_code = *code;
                let mut out = HeadTail::new(self.output_limit);
                if let Some(output) = output
                    && let Err(error) = strip_carriage_returns(BufReader::new(output), &mut out)
                {
                    tracing::warn!(%error, "Could not read the spooled output for shipping.");
                }
                out.finish(&mut d);
                d
            }
            LogEntry::End {
                job,
                instance,
                at,
                total,
                failed,
                success,
            } => {
                let mut d = self.doc("end", job, instance, *at);
                d.return_code = i64::from(!*success);
                d.output = format!("Completed: {}/{total} targets successful", total - failed);
                d
            }
        };
        Some(doc)
    }

    fn doc(&self, msg_type: &str, job: &str, instance: &str, at: OffsetDateTime) -> Document {
        Document::new(msg_type, job, &(self.group_of)(job), instance, at)
    }
}

/// A sink that keeps the first and last `limit / 2` bytes of what is written to it.
#[derive(Debug)]
pub(crate) struct HeadTail {
    half: usize,
    head: Vec<u8>,
    tail: std::collections::VecDeque<u8>,
    total: u64,
}

impl HeadTail {
    pub(crate) fn new(limit: usize) -> Self {
        Self {
            half: limit / 2,
            head: Vec::new(),
            tail: std::collections::VecDeque::new(),
            total: 0,
        }
    }

    /// Puts the kept text into `doc`, with a marker where bytes were left out.
    pub(crate) fn finish(self, doc: &mut Document) {
        let kept = self.head.len() + self.tail.len();
        let mut bytes = self.head;
        if self.total > kept as u64 {
            let omitted = self.total - kept as u64;
            bytes.extend_from_slice(
                format!("\n[... {omitted} bytes omitted by sp-master ...]\n").as_bytes(),
            );
            doc.output_truncated = true;
            doc.output_bytes = Some(self.total);
        }
        bytes.extend(self.tail);
        // A cut can split a UTF-8 sequence; the replacement character marks it.
        doc.output = String::from_utf8_lossy(&bytes).into_owned();
    }
}

impl Write for HeadTail {
    fn write(&mut self, mut buf: &[u8]) -> io::Result<usize> {
        let n = buf.len();
        self.total += n as u64;
        let room = self.half.saturating_sub(self.head.len());
        let into_head = room.min(buf.len());
        self.head.extend_from_slice(&buf[..into_head]);
        buf = &buf[into_head..];
        if buf.len() >= self.half {
            self.tail.clear();
            self.tail.extend(&buf[buf.len() - self.half..]);
        } else {
            let excess = (self.tail.len() + buf.len()).saturating_sub(self.half);
            self.tail.drain(..excess);
            self.tail.extend(buf);
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_uses_the_events_utc_date() {
        // 23:30 at UTC-2 is already the next day in UTC.
        let at = time::macros::datetime!(2025-12-31 23:30 -2);
        let d = Document::new("start", "j", "g", "j_1", at);
        assert_eq!(d.timestamp, "2026-01-01T01:30:00.000000Z");
        assert_eq!(d.index("saltpeter"), "saltpeter-2026.01.01");
    }

    #[test]
    fn head_and_tail_are_kept_and_the_cut_recorded() {
        let mut h = HeadTail::new(8);
        for chunk in [&b"abc"[..], b"defgh", b"ijklmnop"] {
            h.write_all(chunk).unwrap();
        }
        let mut d = Document::new(
            "machine_result",
            "j",
            "g",
            "j_1",
            OffsetDateTime::UNIX_EPOCH,
        );
        h.finish(&mut d);
        assert_eq!(
            d.output,
            "abcd\n[... 8 bytes omitted by sp-master ...]\nmnop"
        );
        assert!(d.output_truncated);
        assert_eq!(d.output_bytes, Some(16));

        let mut h = HeadTail::new(8);
        h.write_all(b"short").unwrap();
        let mut d = Document::new(
            "machine_result",
            "j",
            "g",
            "j_1",
            OffsetDateTime::UNIX_EPOCH,
        );
        h.finish(&mut d);
        assert_eq!((d.output.as_str(), d.output_truncated), ("short", false));
        let json = serde_json::to_value(&d).unwrap();
        assert!(json.get("output_truncated").is_none());
    }
}
