//! The idle-socket flood: 20,000 TCP connections to the machines port that never send a
//! byte, against a real `sp-master` whose open-file limit is 20,000. While they are opened
//! and held, the API must answer and a real run must end with its exact output and exit code;
//! every idle socket must be closed by the master, either at once (over a cap) or at the
//! handshake deadline (2 s here), and none may outlive it.
//!
//! The sockets are opened by [`WORKERS`] worker processes (`xtask flood-worker`, the binary
//! just built; this process's own file may have been replaced by that build), each with its own 20,000 descriptors, so the flood can outnumber the
//! master's descriptors even where the hard limit cannot be raised: without the master's
//! limits it would hold them all and run out.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;

use super::Outcome;
use super::master::{Master, all_ended, machine, target_dir};

/// Idle sockets opened.
const SOCKETS: usize = 20_000;
/// Processes the sockets are spread over.
const WORKERS: usize = 2;
/// Source addresses they come from (127.0.0.2 and up, split between the workers), so the
/// global cap binds before the per-address one; the real wrapper comes from 127.0.0.1.
const SOURCES: usize = 16;
/// Connects in flight at once: more would overflow the accept backlog and measure the
/// kernel's SYN retransmits rather than the master.
const CONNECTS_IN_FLIGHT: usize = 128;
/// The handshake deadline the master is given.
const HANDSHAKE: Duration = Duration::from_secs(2);
/// How long a flood socket may wait for the master to close it before it counts as a failure.
/// Generous: a connect whose last handshake packet the kernel dropped (its listen queue
/// overflowed while the master was busy) reaches the master only at a retransmit, seconds
/// later, while the client already counts it as open.
const CLOSE_LIMIT: Duration = Duration::from_secs(20);
/// How long a probe run may take: a wrapper that is refused while the caps are full retries
/// after 1, 2, 4 and then every 5 s.
const PROBE_LIMIT: Duration = Duration::from_secs(25);
/// The slowest API call allowed while the flood goes on.
const API_LIMIT: Duration = Duration::from_secs(5);
/// The whole flood, connects and closes, must be over by then.
const FLOOD_LIMIT: Duration = Duration::from_secs(120);

const OUTPUT: &str = "flood probe line 1\nline 2 é\n";

fn config() -> Vec<(&'static str, String)> {
    let settings = format!(
        "saltpeter_config:\n  launcher: local\n  logdir: '@DIR@/log'\n  data_dir: '@DIR@/data'\n  \
         default_wrapper_logdir: '@DIR@/wlog'\n  api_ws_bind_addr: 127.0.0.1\n  api_ws_port: 0\n  \
         machines_ws_bind_addr: 127.0.0.1\n  machines_ws_port: 0\n  \
         handshake_timeout: {}\n  http_header_timeout: {}\n",
        HANDSHAKE.as_secs(),
        HANDSHAKE.as_secs()
    );
    let jobs =
        "probe:\n  sec: 0\n  min: 0\n  hour: 0\n  dom: 1\n  mon: 1\n  dow: '*'\n  year: 2099\n  \
                target_type: list\n  targets: [f1]\n  \
                command: \"printf 'flood probe line 1\\\\nline 2 \u{e9}\\\\n'; sleep 1; exit 3\"\n"
            .to_owned();
    vec![("settings.yaml", settings), ("jobs.yaml", jobs)]
}

pub fn scenarios() -> Vec<Outcome> {
    vec![(
        format!(
            "flood: {SOCKETS} idle sockets on the machines port; the API answers, a run ends \
             exact, every idle socket is closed by the handshake deadline"
        ),
        flood(),
    )]
}

/// What happened to one worker's sockets.
#[derive(Debug, Default)]
struct Tally {
    connected: AtomicU64,
    connect_failed: AtomicU64,
    /// Closed by the master within half the deadline of their connect (over a cap).
    closed_at_once: AtomicU64,
    /// Closed by the master between half the deadline and the close limit.
    closed_at_deadline: AtomicU64,
    /// Still open at the close limit.
    outlived: AtomicU64,
    /// How long each socket stayed open, in milliseconds.
    open_ms: parking_lot::Mutex<Vec<u64>>,
    /// Flood sockets open at the moment, and the most at once.
    open_now: AtomicU64,
    peak_open: AtomicU64,
}

fn flood() -> Result<String> {
    let dir = target_dir()
        .join("e2e")
        .join(format!("flood-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    // The master inherits this process's hard limit (20,000 on CI) and raises its soft limit
    // to it. Each worker has as many descriptors of its own.
    let master = Master::start(&dir, &config())?;
    let ready: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("ready.json"))?)?;
    let machines: SocketAddr = ready["machines"]
        .as_str()
        .context("no machines address in ready.json")?
        .parse()?;
    let master_pid = ready["pid"].as_u64().context("no pid in ready.json")?;
    let master_limit = fd_limit_of(master_pid)?;

    let overflows_before = listen_overflows();
    let started = Instant::now();
    let mut workers = Vec::new();
    for w in 0..WORKERS {
        workers.push(Worker::spawn(machines, w)?);
    }
    // While the flood is under way: the API answers, and a real run ends exact.
    std::thread::sleep(Duration::from_millis(300));
    let mut api_ms = Vec::new();
    // Read by the probe and by the waits between probes.
    let peak_fds = std::cell::Cell::new(0usize);
    let sample_fds = || peak_fds.set(peak_fds.get().max(open_fds(master_pid)));
    // A probe while the connects go on, and one once they are all made (when, without the
    // master's limits, every one of them would still be open there).
    let mut probe = |label: &str| -> Result<Duration> {
        let began = Instant::now();
        let asked = Instant::now();
        let instance = master.run_job("probe")?;
        api_ms.push(asked.elapsed().as_millis());
        let run = loop {
            let asked = Instant::now();
            let jobs = super::http::get(master.api, "/api/v1/jobs")?;
            api_ms.push(asked.elapsed().as_millis());
            ensure!(jobs.status == 200, "GET /api/v1/jobs: HTTP {}", jobs.status);
            sample_fds();
            let run = master.run(&instance)?;
            if all_ended(&run) {
                break run;
            }
            if began.elapsed() > PROBE_LIMIT {
                bail!("the {label} probe run did not end within {PROBE_LIMIT:?}: {run}");
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        let m = machine(&run, "f1");
        ensure!(
            m["retcode"] == 3,
            "{label} probe: expected exit 3, got {} ({})",
            m["retcode"],
            m["cause"]
        );
        ensure!(
            m["output"].as_str() == Some(OUTPUT),
            "{label} probe: output differs: {}",
            m["output"]
        );
        Ok(began.elapsed())
    };
    let during = probe("first")?;
    while !workers.iter().all(Worker::connects_done) {
        ensure!(
            started.elapsed() < FLOOD_LIMIT,
            "the connects did not end within {FLOOD_LIMIT:?}"
        );
        sample_fds();
        std::thread::sleep(Duration::from_millis(20));
    }
    let after_connects = probe("second")?;
    // Keep measuring until the flood is over.
    let mut summaries = Vec::new();
    for worker in workers {
        while !worker.finished() {
            ensure!(
                started.elapsed() < FLOOD_LIMIT + CLOSE_LIMIT,
                "a flood worker did not end in time"
            );
            sample_fds();
            std::thread::sleep(Duration::from_millis(100));
        }
        summaries.push(worker.summary()?);
    }
    let sum = |key: &str| -> u64 { summaries.iter().filter_map(|v| v[key].as_u64()).sum() };
    ensure!(
        sum("connected") == SOCKETS as u64,
        "only {} of {SOCKETS} sockets connected ({} failed)",
        sum("connected"),
        sum("connect_failed")
    );
    ensure!(
        sum("outlived") == 0,
        "{} idle sockets were still open {CLOSE_LIMIT:?} after their connect",
        sum("outlived")
    );
    ensure!(
        sum("closed_at_deadline") > 0,
        "no idle socket was held until the deadline: the scenario tested nothing"
    );
    let mut open_ms: Vec<u64> = summaries
        .iter()
        .filter_map(|v| v["open_ms"].as_array())
        .flatten()
        .filter_map(Value::as_u64)
        .collect();
    open_ms.sort_unstable();
    let at = |p: usize| {
        let i = (open_ms.len().saturating_sub(1)).saturating_mul(p) / 100;
        Duration::from_millis(open_ms.get(i).copied().unwrap_or(0))
    };
    let (median, p99, longest) = (at(50), at(99), at(100));
    ensure!(
        p99 < HANDSHAKE + Duration::from_secs(2),
        "1% of the idle sockets stayed open {p99:?} or longer with a {HANDSHAKE:?} deadline"
    );
    let metrics = super::http::get_text(master.api, "/metrics")?;
    let refused = metric_sum(
        &metrics,
        "saltpeter_connections_refused_total{listener=\"machines\"",
    );
    let timed_out = metric_sum(
        &metrics,
        "saltpeter_connections_timed_out_total{listener=\"machines\"",
    );
    // After the flood, the master holds no idle socket any more.
    let after = open_fds(master_pid);
    let overflows = listen_overflows().saturating_sub(overflows_before);
    api_ms.sort_unstable();
    let api_max = api_ms.last().copied().unwrap_or(0);
    // An API that answers only once the flood lets go is not serviceable.
    ensure!(
        api_max < API_LIMIT.as_millis(),
        "the slowest of {} API calls took {api_max} ms",
        api_ms.len()
    );
    drop(master);
    let n = |key: &str| sum(key);
    Ok(format!(
        "{SOCKETS} sockets opened by {WORKERS} processes in {:.1} s (master's fd limit \
         {master_limit}; at most {} open at once on the flood's side); {} closed at once, {} at \
         the {}-s deadline (open for median {:.2} s, p99 {:.2} s, longest {:.2} s); /metrics: \
         {refused} refused, {timed_out} timed out; master's open fds peaked at {}, {after} \
         after; kernel listen-queue overflows (host-wide) {overflows}; {} API calls, slowest \
         {api_max} ms; probe runs ended 3 with exact output in {:.1} s (during the connects) \
         and {:.1} s (right after them)",
        Duration::from_millis(
            summaries
                .iter()
                .filter_map(|v| v["connects_ms"].as_u64())
                .max()
                .unwrap_or(0)
        )
        .as_secs_f64(),
        n("peak_open"),
        n("closed_at_once"),
        n("closed_at_deadline"),
        HANDSHAKE.as_secs(),
        median.as_secs_f64(),
        p99.as_secs_f64(),
        longest.as_secs_f64(),
        peak_fds.get(),
        api_ms.len(),
        during.as_secs_f64(),
        after_connects.as_secs_f64(),
    ))
}

/// One worker process, and what it reports on its standard output: `connects-done` once
/// every connect was made, then its [`Tally`] as one JSON line.
struct Worker {
    child: std::process::Child,
    connects_done: Arc<std::sync::atomic::AtomicBool>,
    summary: Arc<parking_lot::Mutex<Option<Value>>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Worker {
    fn spawn(machines: SocketAddr, index: usize) -> Result<Self> {
        use std::io::BufRead;
        let per_worker = SOCKETS / WORKERS;
        let sources = SOURCES / WORKERS;
        let first_octet = 2 + index * sources;
        let mut child = std::process::Command::new(super::master::binary("xtask"))
            .args([
                "flood-worker",
                &machines.to_string(),
                &per_worker.to_string(),
                &first_octet.to_string(),
                &sources.to_string(),
            ])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .context("starting a flood worker")?;
        let stdout = child.stdout.take().context("no stdout of the worker")?;
        let connects_done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let summary = Arc::new(parking_lot::Mutex::new(None));
        let reader = {
            let (done, summary) = (connects_done.clone(), summary.clone());
            std::thread::spawn(move || {
                for line in std::io::BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    if line == "connects-done" {
                        done.store(true, Ordering::Release);
                    } else if let Ok(v) = serde_json::from_str::<Value>(&line) {
                        *summary.lock() = Some(v);
                    }
                }
                done.store(true, Ordering::Release);
            })
        };
        Ok(Self {
            child,
            connects_done,
            summary,
            reader: Some(reader),
        })
    }

    fn connects_done(&self) -> bool {
        self.connects_done.load(Ordering::Acquire)
    }

    fn finished(&self) -> bool {
        self.reader
            .as_ref()
            .is_none_or(std::thread::JoinHandle::is_finished)
    }

    fn summary(mut self) -> Result<Value> {
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
        let status = self.child.wait()?;
        ensure!(status.success(), "a flood worker failed: {status}");
        self.summary
            .lock()
            .take()
            .context("a flood worker reported nothing")
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        // Only the process we started, by PID; a no-op once it has been waited for.
        if matches!(self.child.try_wait(), Ok(None)) {
            crate::process::terminate(&mut self.child, Duration::from_secs(2));
        }
    }
}

/// `cargo xtask flood-worker ADDR COUNT FIRST_OCTET SOURCES`: opens COUNT idle sockets to
/// ADDR from 127.0.0.FIRST_OCTET and the next SOURCES-1 addresses, waits for the master to
/// close each, and reports on standard output (see [`Worker`]).
pub fn worker(args: &[String]) -> Result<()> {
    let [addr, count, first, sources] = args else {
        bail!("usage: flood-worker ADDR COUNT FIRST_OCTET SOURCES");
    };
    let addr: SocketAddr = addr.parse()?;
    let count: usize = count.parse()?;
    let first: u8 = first.parse()?;
    let sources: usize = sources.parse()?;
    ensure!(sources > 0, "no source addresses");
    raise_own_fd_limit()?;
    let tally = Arc::new(Tally::default());
    let connects = run_flood(addr, count, first, sources, &tally)?;
    let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let summary = serde_json::json!({
        "connected": n(&tally.connected),
        "connect_failed": n(&tally.connect_failed),
        "closed_at_once": n(&tally.closed_at_once),
        "closed_at_deadline": n(&tally.closed_at_deadline),
        "outlived": n(&tally.outlived),
        "peak_open": n(&tally.peak_open),
        "connects_ms": u64::try_from(connects.as_millis()).unwrap_or(u64::MAX),
        "open_ms": *tally.open_ms.lock(),
    });
    println!("{summary}");
    Ok(())
}

/// Opens `count` sockets and waits for the master to close each one; returns how long the
/// connects took.
fn run_flood(
    addr: SocketAddr,
    count: usize,
    first_octet: u8,
    sources: usize,
    tally: &Arc<Tally>,
) -> Result<Duration> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let gate = Arc::new(tokio::sync::Semaphore::new(CONNECTS_IN_FLIGHT));
        let began = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..count {
            let permit = gate.clone().acquire_owned().await?;
            let tally = tally.clone();
            let octet = first_octet.saturating_add(u8::try_from(i % sources)?);
            tasks.spawn(async move {
                let Some(mut stream) = connect(addr, octet).await else {
                    tally.connect_failed.fetch_add(1, Ordering::Relaxed);
                    return;
                };
                drop(permit);
                tally.connected.fetch_add(1, Ordering::Relaxed);
                let now = tally.open_now.fetch_add(1, Ordering::Relaxed) + 1;
                tally.peak_open.fetch_max(now, Ordering::Relaxed);
                let opened = Instant::now();
                let closed = tokio::time::timeout(CLOSE_LIMIT, async {
                    use tokio::io::AsyncReadExt;
                    let mut buf = [0u8; 256];
                    loop {
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(_) => {}
                        }
                    }
                })
                .await;
                let open_for = opened.elapsed();
                tally.open_now.fetch_sub(1, Ordering::Relaxed);
                if closed.is_err() {
                    tally.outlived.fetch_add(1, Ordering::Relaxed);
                } else if open_for < HANDSHAKE / 2 {
                    tally.closed_at_once.fetch_add(1, Ordering::Relaxed);
                } else {
                    tally.closed_at_deadline.fetch_add(1, Ordering::Relaxed);
                }
                let ms = u64::try_from(open_for.as_millis()).unwrap_or(u64::MAX);
                tally.open_ms.lock().push(ms);
            });
        }
        // The last tasks' connects are in flight until every permit is back.
        let _all = gate
            .acquire_many(u32::try_from(CONNECTS_IN_FLIGHT)?)
            .await?;
        let connects = began.elapsed();
        println!("connects-done");
        use std::io::Write;
        let _ = std::io::stdout().flush();
        let all = tokio::time::timeout(FLOOD_LIMIT, async {
            while tasks.join_next().await.is_some() {}
        })
        .await;
        ensure!(all.is_ok(), "the flood did not end within {FLOOD_LIMIT:?}");
        Ok(connects)
    })
}

/// A TCP connection from 127.0.0.`octet`, or `None` if it could not be made in 5 s.
async fn connect(addr: SocketAddr, octet: u8) -> Option<tokio::net::TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4().ok()?;
    socket
        .bind(SocketAddr::new(
            IpAddr::V4(Ipv4Addr::new(127, 0, 0, octet)),
            0,
        ))
        .ok()?;
    tokio::time::timeout(Duration::from_secs(5), socket.connect(addr))
        .await
        .ok()?
        .ok()
}

/// Raises this process's soft open-file limit to its hard limit.
fn raise_own_fd_limit() -> Result<()> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard)
            .with_context(|| format!("raising the open-file limit from {soft} to {hard}"))?;
    }
    Ok(())
}

/// The soft open-file limit of process `pid`, from `/proc`.
fn fd_limit_of(pid: u64) -> Result<u64> {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits"))?;
    limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|v| v.parse().ok())
        .context("no open-file limit in /proc/<pid>/limits")
}

/// The host's count of connects dropped for a full listen queue (`TcpExt ListenOverflows`).
fn listen_overflows() -> u64 {
    let Ok(text) = std::fs::read_to_string("/proc/net/netstat") else {
        return 0;
    };
    let mut lines = text.lines();
    while let (Some(names), Some(values)) = (lines.next(), lines.next()) {
        if !names.starts_with("TcpExt:") {
            continue;
        }
        let at = names
            .split_whitespace()
            .position(|n| n == "ListenOverflows");
        return at
            .and_then(|i| values.split_whitespace().nth(i)?.parse().ok())
            .unwrap_or(0);
    }
    0
}

/// How many descriptors process `pid` has open.
fn open_fds(pid: u64) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, Iterator::count)
}

/// The sum of every series of `/metrics` whose line starts with `prefix`.
fn metric_sum(metrics: &str, prefix: &str) -> u64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}
