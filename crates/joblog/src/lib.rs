//! Per-job log files in the original saltpeter format (docs/COMPATIBILITY.md describes it),
//! written by one dedicated thread so the engine never waits on disk, and their shipping to
//! Elasticsearch/OpenSearch ([`ship`]).
//!
//! Output is buffered per (instance, machine) and appended to its run's spool (`spool.rs`) in
//! 64 KiB pieces (and whenever the thread is idle for a second, at least every 30 s, and at
//! shutdown); when the machine's result is known the thread writes the result block with the
//! *full* output, cleaned of carriage-return redraws as the original did, and the spool lets go of it.
//! Memory stays bounded however much a job prints, and the log still holds every byte.
//!
//! When shipping is configured the same thread hands every entry to [`crate::ship`], which
//! queues a search document on disk (never waiting on the network), whether or not the log
//! file could be written (the original skipped shipping then; docs/COMPATIBILITY.md lists the
//! difference).

// What no other crate uses is `pub(crate)`, so the compiler reports it once nothing calls it.
#![warn(unreachable_pub)]

mod entry;
pub mod ship;
mod spool;

use std::collections::HashMap;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use time::OffsetDateTime;

pub use entry::LogEntry;
use entry::{strip_carriage_returns, strip_carriage_returns_str};

/// What reaches the log thread.
#[derive(Debug)]
enum Message {
    /// Record an entry in the log of `<dir>/<job>.log`.
    Entry(Arc<Path>, LogEntry),
    /// Write every buffer, stop shipping (which keeps its queue on disk) and end the thread.
    Close,
}

/// Handle to the log thread. Cheap to clone; sending never blocks.
#[derive(Clone, Debug)]
pub struct JobLog {
    tx: mpsc::Sender<Message>,
    /// The thread, taken by the first [`JobLog::close`].
    thread: Arc<parking_lot::Mutex<Option<std::thread::JoinHandle<()>>>>,
}

impl JobLog {
    /// Starts the log thread. `spool_dir` holds in-flight output; it is created on demand.
    pub fn start(spool_dir: PathBuf) -> io::Result<Self> {
        Self::start_shipping(spool_dir, None)
    }

    /// [`JobLog::start`], also shipping every entry through `ship` when given.
    pub fn start_shipping(
        spool_dir: PathBuf,
        ship: Option<crate::ship::LogShipper>,
    ) -> io::Result<Self> {
        let (tx, rx) = mpsc::channel::<Message>();
        let thread = std::thread::Builder::new().name("joblog".into()).spawn(move || {
            let mut writer = Writer::new(spool_dir, ship);
            loop {
                match rx.recv_timeout(IDLE_FLUSH) {
                    Ok(first) => {
                        // Take what has queued up since, then let the next batch gather: woken
                        // per entry, this thread would switch in thousands of times a second
                        // with a large fleet, and each entry would cost the engine a futex
                        // wake. Nothing here is urgent; job-log lines wait seconds in buffers.
                        let mut entries = 0;
                        let mut close = false;
                        for message in std::iter::once(first).chain(rx.try_iter()) {
                            let (dir, entry) = match message {
                                Message::Entry(dir, entry) => (dir, entry),
                                Message::Close => {
                                    close = true;
                                    break;
                                }
                            };
                            if let Err(error) = writer.write(&dir, entry) {
                                tracing::warn!(%error, dir = %dir.display(), "Could not write the job log.");
                            }
                            entries += 1;
                            if entries == MAX_BATCH {
                                break;
                            }
                        }
                        if close {
                            writer.close();
                            break;
                        }
                        writer.flush_old();
                        if entries > 1 {
                            std::thread::sleep(BATCH_GATHER);
                        }
                    }
                    Err(mpsc::RecvTimeoutError::Timeout) => writer.flush_all(),
                    Err(mpsc::RecvTimeoutError::Disconnected) => {
                        writer.close();
                        break;
                    }
                }
            }
        })?;
        Ok(Self {
            tx,
            thread: Arc::new(parking_lot::Mutex::new(Some(thread))),
        })
    }

    /// Records `entry` in `<logdir>/<job>.log`.
    pub fn record(&self, logdir: &Arc<Path>, entry: LogEntry) {
        // The thread only stops when closed or when every handle is gone, so a failed send
        // means shutdown.
        let _ = self.tx.send(Message::Entry(logdir.clone(), entry));
    }

    /// Writes everything recorded so far, stops shipping and waits for the thread to end.
    /// Entries recorded after this are dropped.
    pub fn close(&self) {
        let _ = self.tx.send(Message::Close);
        let thread = self.thread.lock().take();
        if let Some(thread) = thread
            && thread.join().is_err()
        {
            tracing::error!("The job-log thread panicked.");
        }
    }
}

/// A machine's output is written to its spool once this much is buffered.
const SPOOL_BUFFER: usize = 64 * 1024;
/// Buffered output of all machines beyond which the largest buffers are written, down to half.
const BUFFER_BUDGET: usize = 64 * 1024 * 1024;
/// Entries handled per batch at most, so old buffers are still checked during a flood.
const MAX_BATCH: usize = 4096;
/// How long the thread lets entries gather after a batch of more than one: a busy fleet is
/// then handled in up to 100 batches a second instead of a wake-up per entry.
const BATCH_GATHER: Duration = Duration::from_millis(10);
/// Every buffer is written when no entry came for this long...
const IDLE_FLUSH: Duration = Duration::from_secs(1);
/// ...and each once it is this old, so a crash of the master loses little of the job logs
/// (the store holds the output either way).
const MAX_BUFFER_AGE: Duration = Duration::from_secs(30);

type Key = (String, String);

/// Output is buffered per machine before it reaches the spool: written as it came, 10,000
/// machines printing once a second cost a write each, most of the log thread's time
/// (docs/PERFORMANCE.md). A machine whose output stays small and short-lived never reaches the spool:
/// its result block comes from the buffer.
struct Writer {
    spools: spool::RunSpools,
    buffers: HashMap<Key, Buffer>,
    buffered: usize,
    last_age_check: Instant,
    ship: Option<crate::ship::LogShipper>,
}

/// A machine's output not yet in its spool, and when the oldest of it arrived.
struct Buffer {
    data: Vec<u8>,
    since: Instant,
}

impl Writer {
    fn new(spool_dir: PathBuf, ship: Option<crate::ship::LogShipper>) -> Self {
        Self {
            spools: spool::RunSpools::new(spool_dir),
            buffers: HashMap::new(),
            buffered: 0,
            last_age_check: Instant::now(),
            ship,
        }
    }

    fn write(&mut self, dir: &Path, entry: LogEntry) -> io::Result<()> {
        // Shipped before the file is written, whether or not that works (docs/COMPATIBILITY.md);
        // a machine's result is shipped with its output, below.
        if let Some(ship) = &mut self.ship
            && !matches!(
                entry,
                LogEntry::Output { .. } | LogEntry::MachineResult { .. }
            )
        {
            ship.record(&entry, None);
        }
        match entry {
            LogEntry::Output {
                instance,
                machine,
                text,
            } => {
                let key = (instance, machine);
                let len = text.len();
                let held = match self.buffers.get_mut(&key) {
                    Some(buffer) => {
                        buffer.data.extend_from_slice(text.as_bytes());
                        buffer.data.len()
                    }
                    None => {
                        let held = text.len();
                        let buffer = Buffer {
                            data: text.into_bytes(),
                            since: Instant::now(),
                        };
                        self.buffers.insert(key.clone(), buffer);
                        held
                    }
                };
                self.buffered += len;
                if held >= SPOOL_BUFFER {
                    self.flush_spool(&key)?;
                }
                if self.buffered > BUFFER_BUDGET {
                    self.flush_largest();
                }
                Ok(())
            }
            LogEntry::Start { job, instance, at } => append(
                dir,
                &job,
                &format!(
                    "###### Starting {instance} at {} ################\n",
                    py_time(at)
                ),
            ),
            LogEntry::Note { job, text, at } => append(
                dir,
                &job,
                &format!("###### {text} at {} ################\n", py_time(at)),
            ),
            LogEntry::MachineStart {
                job,
                instance,
                machine,
                at,
            } => append(
                dir,
                &job,
                &format!(
                    "###### Starting {instance} on {machine} at {} ################\n",
                    py_time(at)
                ),
            ),
            LogEntry::NoMachines { job, instance } => append(
                dir,
                &job,
                &format!("!!!!!! No targets matched for {instance} !!!!!!\n"),
            ),
            LogEntry::Overlap { job, running, at } => append(
                dir,
                &job,
                &format!(
                    "###### Overlap detected on {running} at {} ################\n",
                    py_time(at)
                ),
            ),
            LogEntry::Skipped {
                job,
                instance,
                machine,
                why,
                at,
            } => append(dir, &job, &result_block(&machine, &instance, 0, &why, at)),
            LogEntry::End {
                job, instance, at, ..
            } => append(
                dir,
                &job,
                &format!(
                    "###### Finished {instance} at {} ################\n",
                    py_time(at)
                ),
            ),
            LogEntry::MachineResult { .. } => self.machine_result(dir, &entry),
        }
    }

    /// Writes (and ships) a machine's result block with its whole output: what its run's
    /// spool holds, then what is still buffered.
    fn machine_result(&mut self, dir: &Path, entry: &LogEntry) -> io::Result<()> {
        let LogEntry::MachineResult {
            job,
            instance,
            machine,
            code,
            at,
        } = entry
        else {
            return Ok(());
        };
        let key = (instance.clone(), machine.clone());
        let held = self
            .buffers
            .remove(&key)
            .map(|b| b.data)
            .unwrap_or_default();
        self.buffered -= held.len();
        if let Some(ship) = &mut self.ship {
            match self.spools.output(instance, machine) {
                Ok(spooled) => ship.record(entry, Some(&mut spooled.chain(&held[..]))),
                Err(error) => {
                    tracing::warn!(%error, "Could not read the spooled output for shipping.");
                    ship.record(entry, Some(&mut &held[..]));
                }
            }
        }
        let result = self
            .spools
            .output(instance, machine)
            .and_then(|spooled| write_result(dir, job, &key, *code, *at, spooled, &held));
        self.spools.release(instance, machine);
        result
    }

    /// Writes a machine's buffered output to its spool.
    fn flush_spool(&mut self, key: &Key) -> io::Result<()> {
        let Some(buffer) = self.buffers.remove(key) else {
            return Ok(());
        };
        self.buffered -= buffer.data.len();
        self.spools.append(&key.0, &key.1, &buffer.data)
    }

    /// Writes the given buffers; a failure is logged and loses only that machine's buffer.
    fn flush_each(&mut self, keys: Vec<Key>) {
        for key in keys {
            if let Err(error) = self.flush_spool(&key) {
                tracing::warn!(%error, instance = %key.0, machine = %key.1, "Could not write a job log spool.");
            }
        }
    }

    fn flush_all(&mut self) {
        let keys = self.buffers.keys().cloned().collect();
        self.flush_each(keys);
    }

    /// At shutdown: every buffer to its spool, then the shipper stops (its sender threads
    /// are joined; what they did not send stays in their queues on disk).
    fn close(&mut self) {
        self.flush_all();
        self.ship = None;
    }

    /// Writes the buffers that have waited `MAX_BUFFER_AGE`, looking at most once a second.
    fn flush_old(&mut self) {
        if self.last_age_check.elapsed() < Duration::from_secs(1) {
            return;
        }
        self.last_age_check = Instant::now();
        let keys = self
            .buffers
            .iter()
            .filter(|(_, b)| b.since.elapsed() >= MAX_BUFFER_AGE)
            .map(|(k, _)| k.clone())
            .collect();
        self.flush_each(keys);
    }

    /// Over the budget: writes the largest buffers until half of it is left.
    fn flush_largest(&mut self) {
        let mut sizes: Vec<(usize, Key)> = self
            .buffers
            .iter()
            .map(|(k, b)| (b.data.len(), k.clone()))
            .collect();
        sizes.sort_unstable_by_key(|(n, _)| std::cmp::Reverse(*n));
        let mut left = self.buffered;
        let keys = sizes
            .into_iter()
            .take_while(|(n, _)| {
                let go = left > BUFFER_BUDGET / 2;
                left -= n;
                go
            })
            .map(|(_, k)| k)
            .collect();
        self.flush_each(keys);
    }
}

/// Writes a machine's result block: its spooled output, then what is still buffered.
fn write_result(
    dir: &Path,
    job: &str,
    (instance, machine): &Key,
    code: i64,
    at: OffsetDateTime,
    spooled: impl Read,
    held: &[u8],
) -> io::Result<()> {
    saltpeter_files::create_dir(dir)?;
    let file = saltpeter_files::open_append(&log_path(dir, job))?;
    let mut out = BufWriter::new(file);
    write!(
        out,
        "########## {machine} from {instance} ################\n**** Exit Code {code} ******\n"
    )?;
    // One stream, so a carriage-return redraw that spans the two parts still collapses.
    strip_carriage_returns(BufReader::new(spooled.chain(held)), &mut out)?;
    write!(
        out,
        "\n####### END {machine} from {instance} at {} #########\n",
        py_time(at)
    )?;
    out.flush()
}

fn log_path(dir: &Path, job: &str) -> PathBuf {
    dir.join(format!("{}.log", safe_name(job)))
}

fn append(dir: &Path, job: &str, text: &str) -> io::Result<()> {
    saltpeter_files::create_dir(dir)?;
    let mut f = saltpeter_files::open_append(&log_path(dir, job))?;
    f.write_all(text.as_bytes())
}

fn result_block(machine: &str, instance: &str, code: i64, out: &str, at: OffsetDateTime) -> String {
    format!(
        "########## {machine} from {instance} ################\n**** Exit Code {code} ******\n{}\n####### END {machine} from {instance} at {} #########\n",
        strip_carriage_returns_str(out),
        py_time(at)
    )
}

/// Names come from job files and wrappers; keep them from escaping the directory.
fn safe_name(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-@+".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect::<String>()
        .trim_start_matches('.')
        .to_owned()
}

/// Python's `str(datetime)` for an aware UTC time: space separator, microseconds only when
/// non-zero, `+00:00`. The original's log lines use it, and log readers may parse it.
pub(crate) fn py_time(at: OffsetDateTime) -> String {
    // Through `Timestamp`, whose conversion to UTC cannot panic at the calendar's edges.
    let at = saltpeter_proto::Timestamp::new(at).get();
    let base = format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}",
        at.year(),
        u8::from(at.month()),
        at.day(),
        at.hour(),
        at.minute(),
        at.second()
    );
    match at.microsecond() {
        0 => format!("{base}+00:00"),
        us => format!("{base}.{us:06}+00:00"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    #[test]
    fn carriage_return_redraws_collapse_like_the_original() {
        let cases = [
            (
                "progress 10%\rprogress 20%\rprogress 100%\n",
                "progress 100%\n",
            ),
            ("a\r\nb\r\n", "a\nb\n"),
            ("x\r\r\n", "x\n"),
            ("\r\n", "\n"),
            ("plain\nlines\n", "plain\nlines\n"),
            ("no newline at end\rdone", "done"),
        ];
        for (input, want) in cases {
            assert_eq!(strip_carriage_returns_str(input), want, "{input:?}");
        }
    }

    #[test]
    fn python_time_format() {
        let t = time::macros::datetime!(2025-12-23 09:31:46.123456 UTC);
        assert_eq!(py_time(t), "2025-12-23 09:31:46.123456+00:00");
        let t = time::macros::datetime!(2025-12-23 09:31:46 UTC);
        assert_eq!(py_time(t), "2025-12-23 09:31:46+00:00");
    }

    #[test]
    fn unsafe_names_stay_inside_the_directory() {
        assert_eq!(safe_name("../../etc/passwd"), "_.._etc_passwd");
        assert_eq!(safe_name("web-01.example.com"), "web-01.example.com");
    }

    #[test]
    fn output_is_buffered_per_machine_until_a_piece_is_full_or_a_flush() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = Writer::new(dir.path().to_owned(), None);
        let output = |machine: &str, text: String| LogEntry::Output {
            instance: "j_1".into(),
            machine: machine.into(),
            text,
        };
        let spool = |w: &mut Writer, machine: &str| {
            let mut text = String::new();
            w.spools
                .output("j_1", machine)
                .unwrap()
                .read_to_string(&mut text)
                .unwrap();
            text
        };
        let logdir = dir.path().join("logs");
        w.write(&logdir, output("quiet", "one line\n".into()))
            .unwrap();
        let big = "x".repeat(SPOOL_BUFFER / 2);
        w.write(&logdir, output("busy", big.clone())).unwrap();
        assert_eq!(
            (spool(&mut w, "quiet"), spool(&mut w, "busy")),
            (String::new(), String::new())
        );
        assert_eq!(w.buffered, 9 + big.len());
        // The second half fills busy's piece: written at once, in order.
        w.write(&logdir, output("busy", big.clone())).unwrap();
        assert_eq!(spool(&mut w, "busy"), big.repeat(2));
        assert_eq!(spool(&mut w, "quiet"), "");
        w.flush_all();
        assert_eq!(spool(&mut w, "quiet"), "one line\n");
        assert_eq!(w.buffered, 0);
        assert!(w.buffers.is_empty(), "no empty buffers are kept");
        // A result reads the spool, then the buffer, as one stream.
        w.write(&logdir, output("quiet", "two\rthree\n".into()))
            .unwrap();
        let at = time::macros::datetime!(2025-12-23 09:31:46 UTC);
        w.write(
            &logdir,
            LogEntry::MachineResult {
                job: "j".into(),
                instance: "j_1".into(),
                machine: "quiet".into(),
                code: 3,
                at,
            },
        )
        .unwrap();
        let log = fs::read_to_string(logdir.join("j.log")).unwrap();
        assert!(
            log.contains("**** Exit Code 3 ******\none line\nthree\n\n####### END"),
            "{log}"
        );
        assert_eq!((w.buffered, spool(&mut w, "quiet")), (0, String::new()));
        // The busy machine still has pieces, so the run's spool stays until it is done too.
        assert_eq!(spool(&mut w, "busy"), big.repeat(2));
        assert!(dir.path().join("j_1.spool").exists());
        w.write(
            &logdir,
            LogEntry::MachineResult {
                job: "j".into(),
                instance: "j_1".into(),
                machine: "busy".into(),
                code: 0,
                at,
            },
        )
        .unwrap();
        let log = fs::read_to_string(logdir.join("j.log")).unwrap();
        assert!(log.contains(&format!("**** Exit Code 0 ******\n{}\n", big.repeat(2))));
        assert!(!dir.path().join("j_1.spool").exists());
    }

    #[test]
    fn result_block_carries_the_full_spooled_output() {
        let dir = tempfile::tempdir().unwrap();
        let logdir: Arc<Path> = dir.path().join("logs").into();
        let log = JobLog::start(dir.path().join("spool")).unwrap();
        let at = time::macros::datetime!(2025-12-23 09:31:46 UTC);
        log.record(
            &logdir,
            LogEntry::Start {
                job: "j".into(),
                instance: "j_1".into(),
                at,
            },
        );
        for chunk in ["step 1\r", "step 2\n", "done\n"] {
            log.record(
                &logdir,
                LogEntry::Output {
                    instance: "j_1".into(),
                    machine: "m1".into(),
                    text: chunk.into(),
                },
            );
        }
        log.record(
            &logdir,
            LogEntry::MachineResult {
                job: "j".into(),
                instance: "j_1".into(),
                machine: "m1".into(),
                code: 0,
                at,
            },
        );
        log.record(
            &logdir,
            LogEntry::End {
                job: "j".into(),
                instance: "j_1".into(),
                at,
                total: 1,
                failed: 0,
                success: true,
            },
        );
        let path = logdir.join("j.log");
        let want = "###### Starting j_1 at 2025-12-23 09:31:46+00:00 ################\n\
                    ########## m1 from j_1 ################\n\
                    **** Exit Code 0 ******\n\
                    step 2\ndone\n\n\
                    ####### END m1 from j_1 at 2025-12-23 09:31:46+00:00 #########\n\
                    ###### Finished j_1 at 2025-12-23 09:31:46+00:00 ################\n";
        // The writer is asynchronous; wait a bounded time for the last line.
        for _ in 0..200 {
            if fs::read_to_string(&path).is_ok_and(|t| t.contains("Finished")) {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert_eq!(fs::read_to_string(&path).unwrap(), want);
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "job logs hold job output");
        assert!(
            !dir.path().join("spool/j_1.spool").exists(),
            "spool must be cleaned up"
        );
    }

    #[test]
    fn close_writes_buffered_output_before_it_returns() {
        let dir = tempfile::tempdir().unwrap();
        let logdir: Arc<Path> = dir.path().join("logs").into();
        let log = JobLog::start(dir.path().join("spool")).unwrap();
        // Another handle stays alive, so only `close` can make the thread write now.
        let other = log.clone();
        for text in ["before the stop\n", "second line\n"] {
            log.record(
                &logdir,
                LogEntry::Output {
                    instance: "j_1".into(),
                    machine: "m1".into(),
                    text: text.into(),
                },
            );
        }
        log.close();
        let spool_path = dir.path().join("spool/j_1.spool");
        let spooled = fs::read(&spool_path).unwrap_or_default();
        let spooled = String::from_utf8_lossy(&spooled);
        assert!(
            spooled.contains("before the stop\nsecond line\n"),
            "buffered output must be in the spool once close returns: {spooled:?}"
        );
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&spool_path), 0o600, "spools hold job output");
        assert_eq!(mode(&dir.path().join("spool")), 0o700);
        // Entries after the close are dropped without a panic.
        other.record(
            &logdir,
            LogEntry::NoMachines {
                job: "j".into(),
                instance: "j_2".into(),
            },
        );
        other.close();
    }
}
