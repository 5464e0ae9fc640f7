//! Per-job log files in the original saltpeter format (reference §5.1), written by one
//! dedicated thread so the engine never waits on disk.
//!
//! Output is streamed to a spool file per (instance, machine) as it arrives; when the machine's
//! result is known the thread writes the result block with the *full* output, cleaned of
//! carriage-return redraws (§5.2), and removes the spool. Memory stays bounded however much a
//! job prints, and the log still holds every byte.
//!
//! When shipping is configured the same thread hands every entry to [`crate::ship`], which
//! queues a search document on disk (never waiting on the network), whether or not the log
//! file could be written (the original skipped shipping then, reference D-35).

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc;

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
    /// A run ended, with its verdict (reference §4.13): machines with a result, how many of
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

/// Handle to the log thread. Cheap to clone; sending never blocks.
#[derive(Clone, Debug)]
pub struct JobLog {
    tx: mpsc::Sender<(Arc<Path>, LogEntry)>,
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
        let (tx, rx) = mpsc::channel::<(Arc<Path>, LogEntry)>();
        std::thread::Builder::new().name("joblog".into()).spawn(move || {
            let mut writer = Writer { spool_dir, spools: HashMap::new(), ship };
            while let Ok((dir, entry)) = rx.recv() {
                if let Err(error) = writer.write(&dir, entry) {
                    tracing::warn!(%error, dir = %dir.display(), "Could not write the job log.");
                }
            }
        })?;
        Ok(Self { tx })
    }

    /// Records `entry` in `<logdir>/<job>.log`.
    pub fn record(&self, logdir: &Arc<Path>, entry: LogEntry) {
        // The thread only stops when every handle is gone, so a failed send means shutdown.
        let _ = self.tx.send((logdir.clone(), entry));
    }
}

/// Spool files kept open at once (see the eviction in [`Writer::write`]).
const MAX_OPEN_SPOOLS: usize = 1024;

struct Writer {
    spool_dir: PathBuf,
    spools: HashMap<(String, String), File>,
    ship: Option<crate::ship::LogShipper>,
}

impl Writer {
    fn write(&mut self, dir: &Path, entry: LogEntry) -> io::Result<()> {
        if self.ship.is_some() && !matches!(entry, LogEntry::Output { .. }) {
            let spool = match &entry {
                LogEntry::MachineResult {
                    instance, machine, ..
                } => {
                    // Close our handle so the shipper reads everything written.
                    self.spools.remove(&(instance.clone(), machine.clone()));
                    Some(self.spool_path(instance, machine))
                }
                _ => None,
            };
            if let Some(ship) = &mut self.ship {
                ship.record(&entry, spool.as_deref());
            }
        }
        match entry {
            LogEntry::Output {
                instance,
                machine,
                text,
            } => {
                let key = (instance, machine);
                if !self.spools.contains_key(&key) {
                    let path = self.spool_path(&key.0, &key.1);
                    if let Some(parent) = path.parent() {
                        fs::create_dir_all(parent)?;
                    }
                    let file = OpenOptions::new().create(true).append(true).open(path)?;
                    // One handle per running machine would need as many descriptors as the
                    // fleet has sockets (10,000 wrappers: 20,000 in all, past common limits).
                    // Keep a bounded set; an evicted spool is simply reopened in append mode.
                    // Evict an arbitrary one, not the least recently used: machines write in
                    // turn, a pattern in which LRU would always evict the next writer.
                    if self.spools.len() >= MAX_OPEN_SPOOLS
                        && let Some(evict) = self.spools.keys().next().cloned()
                    {
                        self.spools.remove(&evict);
                    }
                    self.spools.insert(key.clone(), file);
                }
                if let Some(file) = self.spools.get_mut(&key) {
                    file.write_all(text.as_bytes())?;
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
            LogEntry::MachineResult {
                job,
                instance,
                machine,
                code,
                at,
            } => {
                let key = (instance, machine);
                // Close our handle before reading the spool back.
                self.spools.remove(&key);
                let spool = self.spool_path(&key.0, &key.1);
                let result = self.write_result(dir, &job, &key.0, &key.1, code, at, &spool);
                let _ = fs::remove_file(&spool);
                if let Some(parent) = spool.parent() {
                    // Succeeds only once the instance's last machine is done.
                    let _ = fs::remove_dir(parent);
                }
                result
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn write_result(
        &self,
        dir: &Path,
        job: &str,
        instance: &str,
        machine: &str,
        code: i64,
        at: OffsetDateTime,
        spool: &Path,
    ) -> io::Result<()> {
        fs::create_dir_all(dir)?;
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(log_path(dir, job))?;
        let mut out = BufWriter::new(file);
        write!(
            out,
            "########## {machine} from {instance} ################\n**** Exit Code {code} ******\n"
        )?;
        match File::open(spool) {
            Ok(f) => strip_carriage_returns(BufReader::new(f), &mut out)?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        write!(
            out,
            "\n####### END {machine} from {instance} at {} #########\n",
            py_time(at)
        )?;
        out.flush()
    }

    fn spool_path(&self, instance: &str, machine: &str) -> PathBuf {
        self.spool_dir
            .join(safe_name(instance))
            .join(format!("{}.out", safe_name(machine)))
    }
}

fn log_path(dir: &Path, job: &str) -> PathBuf {
    dir.join(format!("{}.log", safe_name(job)))
}

fn append(dir: &Path, job: &str, text: &str) -> io::Result<()> {
    fs::create_dir_all(dir)?;
    let mut f = OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_path(dir, job))?;
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
pub fn py_time(at: OffsetDateTime) -> String {
    let at = at.to_offset(time::UtcOffset::UTC);
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

/// The original's carriage-return clean-up (§5.2), streaming line by line: in every line that
/// contains `\r`, keep only the last non-empty `\r`-separated segment.
pub fn strip_carriage_returns(mut input: impl BufRead, out: &mut impl Write) -> io::Result<()> {
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
pub fn strip_carriage_returns_str(text: &str) -> String {
    let mut out = Vec::with_capacity(text.len());
    // Reading from a slice and writing to a Vec cannot fail.
    let _ = strip_carriage_returns(text.as_bytes(), &mut out);
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert!(
            !dir.path().join("spool/j_1").exists(),
            "spool must be cleaned up"
        );
    }
}
