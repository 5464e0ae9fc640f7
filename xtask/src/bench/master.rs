//! `cargo xtask bench master [--wrappers N,...] [--seconds S] [--restart [--no-jitter]] [--tls]
//! [--postgres [--masters M]] [--no-append]`: one
//! release `sp-master` (or several) against up to ten thousand simulated wrappers on this
//! machine.
//!
//! It owns the scenarios, the measurements and the report. The master runs with `launcher:
//! bench` (see `crates/engine/src/launch/bench.rs`): its start requests go to a file that
//! [`fleet`] tails, and the simulated wrappers speak the real protocol over loopback, so the
//! machines endpoint, engine, monitor, store, API and metrics are the production code.
//!
//! Per fleet size N (a fresh master each): fire one job on N machines and time the fan-out
//! (fire to the last `start` ack); after a 5 s warm-up, measure S seconds of steady state
//! (master CPU from `/proc/<pid>/stat`, messages, ack latency to the kernel's receive time of
//! the ack, see [`stamped`]); stop 1% of the wrappers abruptly
//! and check each is marked 253 between 15.0 and 16.0 s after its last heartbeat while no live
//! one is; complete the rest; read the master's VmHWM. Then, on a master with 1,000 jobs and
//! nothing running, idle CPU over S seconds and one wrapper streaming as fast as acks allow.
//!
//! With `--restart`, only the restart scenario runs instead (see [`restart`]): the master is
//! restarted under N connected wrappers that reconnect with `sp-wrapper`'s own backoff.
//!
//! With `--tls`, every master speaks TLS on its machines endpoint and the simulated wrappers
//! pin its self-signed certificate as `sp-wrapper` does; the report adds the handshake rate
//! at fan-out.
//!
//! With `--postgres`, only the fleet scenario runs, with the store in a throwaway PostgreSQL
//! that xtask starts for each fleet size and stops by PID afterwards; `--masters M` runs M
//! masters on that database, the fleet's jobs spread over them by their leases (see
//! [`cluster`]). The report adds the PostgreSQL server's CPU and the database's load.
//!
//! xtask normally runs unoptimised; a debug load generator would take CPU from the master it
//! measures, so the benchmark re-runs itself from a release build of xtask.

// The wrapper's reconnect backoff, by path: the simulated wrappers must back off exactly as
// `sp-wrapper` does, and the file needs nothing but std.
#[path = "../../../crates/wrapper/src/backoff.rs"]
mod backoff;
mod cluster;
mod fleet;
mod restart;
mod stamped;
// The e2e scenarios' small HTTP client, shared by path: e2e keeps it private.
#[allow(dead_code, clippy::duplicate_mod)]
#[path = "../e2e/http.rs"]
mod http;

use std::fmt::Write as _;
use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::thread::sleep;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;

use fleet::{Fleet, Kind, Phase, StartFile};

/// The project's targets for a 10,000-machine fleet.
const TARGET_P99: Duration = Duration::from_millis(100);
const TARGET_RSS_KIB: u64 = 1024 * 1024;
const TARGET_IDLE_CPU: f64 = 1.0;
/// Jobs configured on the idle master.
const IDLE_JOBS: usize = 1000;
/// How often the steady-state window samples the master's injection-queue gauge.
const QUEUE_SAMPLE: Duration = Duration::from_millis(250);
/// Warm-up before the steady-state window: every wrapper has sent a heartbeat or so.
const WARM_UP: Duration = Duration::from_secs(5);
/// The master's heartbeat timeout and the window the verdict must fall in.
const VERDICT_WINDOW: (f64, f64) = (15.0, 16.0);
/// How long the streaming wrapper streams, at most.
const STREAM_SECONDS: u64 = 20;

struct Args {
    sizes: Vec<usize>,
    seconds: u64,
    append: bool,
    /// Run the restart scenario instead of the others, with jittered backoff or not.
    restart: bool,
    jitter: bool,
    /// The machines endpoint speaks TLS and the simulated wrappers pin its certificate.
    tls: bool,
    /// The fleet scenario's store is a throwaway PostgreSQL, shared by `masters` masters.
    postgres: bool,
    masters: usize,
}

/// Whether benchmark masters get `machines_tls: on` (set once from `--tls` before any master
/// starts; a flag rather than a parameter so every scenario's settings follow it).
static TLS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn parse_args(args: &[String]) -> Result<Args> {
    let mut out = Args {
        sizes: vec![1000, 5000, 10_000],
        seconds: 60,
        append: true,
        restart: false,
        jitter: true,
        tls: false,
        postgres: false,
        masters: 1,
    };
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--wrappers" => {
                let list = it.next().context("--wrappers needs N[,N...]")?;
                out.sizes = list
                    .split(',')
                    .map(|n| n.trim().parse::<usize>().context("--wrappers: a number"))
                    .collect::<Result<_>>()?;
                ensure!(
                    out.sizes.iter().all(|n| (100..=10_000).contains(n)),
                    "--wrappers: each N must be 100..=10000 (1% of N is stopped)"
                );
            }
            "--seconds" => {
                out.seconds = it.next().context("--seconds needs S")?.parse()?;
                ensure!((5..=600).contains(&out.seconds), "--seconds: 5..=600");
            }
            "--no-append" => out.append = false,
            "--restart" => out.restart = true,
            // The wrapper's schedule before jitter, to compare against.
            "--no-jitter" => out.jitter = false,
            "--tls" => out.tls = true,
            "--postgres" => out.postgres = true,
            "--masters" => {
                out.masters = it.next().context("--masters needs M")?.parse()?;
                ensure!((1..=4).contains(&out.masters), "--masters: 1..=4");
            }
            other => bail!(
                "unexpected argument {other:?}; usage: cargo xtask bench master [--wrappers N,...] [--seconds S] [--restart [--no-jitter]] [--tls] [--postgres [--masters M]] [--no-append]"
            ),
        }
    }
    ensure!(
        out.masters == 1 || out.postgres,
        "--masters needs --postgres: several masters share one PostgreSQL"
    );
    ensure!(
        !(out.postgres && out.restart),
        "--restart runs on SQLite only"
    );
    Ok(out)
}

pub fn run(args: &[String]) -> Result<()> {
    let parsed = parse_args(args)?;
    let root = workspace_root();
    if cfg!(debug_assertions) {
        return rerun_optimised(&root, args);
    }
    raise_fd_limit();
    TLS.store(parsed.tls, std::sync::atomic::Ordering::Relaxed);
    // SP_BENCH_MASTER_BIN measures a given build (a before/after comparison) as it is.
    let bin = match std::env::var_os("SP_BENCH_MASTER_BIN") {
        Some(bin) => PathBuf::from(bin),
        None => {
            eprintln!("Building sp-master (release)...");
            cargo(&root, &["build", "--release", "-p", "saltpeter-master"])?;
            target_dir(&root).join("release/sp-master")
        }
    };
    let scratch = target_dir(&root).join("bench-master");
    if parsed.restart {
        let mut rows = Vec::new();
        for &n in &parsed.sizes {
            eprintln!("\n== {n} wrappers, master restarted under them ==");
            rows.push(restart::scenario(
                &bin,
                &scratch.join(format!("restart-{n}")),
                n,
                parsed.jitter,
            )?);
        }
        let report = restart::report(
            &restart::heading(&root),
            &parsed.sizes,
            parsed.jitter,
            &rows,
        );
        return publish(&root, &parsed, &report);
    }
    if parsed.postgres {
        let store = Store::Postgres {
            masters: parsed.masters,
        };
        let mut rows = Vec::new();
        for &n in &parsed.sizes {
            eprintln!(
                "\n== {n} wrappers, {} s steady state, PostgreSQL, {} master(s) ==",
                parsed.seconds, parsed.masters
            );
            let dir = scratch.join(format!("fleet-pg{}-{n}", parsed.masters));
            let row = fleet_scenario(&bin, &dir, n, parsed.seconds, store)?;
            eprintln!("{}", cluster::line(&row));
            rows.push(row);
        }
        let report = cluster::report(&root, &parsed, &rows)?;
        return publish(&root, &parsed, &report);
    }
    let mut rows = Vec::new();
    for &n in &parsed.sizes {
        eprintln!("\n== {n} wrappers, {} s steady state ==", parsed.seconds);
        let row = fleet_scenario(
            &bin,
            &scratch.join(format!("fleet-{n}")),
            n,
            parsed.seconds,
            Store::Sqlite,
        )?;
        eprintln!("{}", row.line());
        rows.push(row);
    }
    eprintln!(
        "\n== idle: {IDLE_JOBS} jobs, {} s; then one streaming wrapper ==",
        parsed.seconds
    );
    let idle = idle_and_stream(&bin, &scratch.join("idle"), parsed.seconds)?;
    let report = report(&root, &parsed, &rows, &idle)?;
    publish(&root, &parsed, &report)
}

/// Prints a report and, unless told not to, appends it to docs/PERFORMANCE.md.
fn publish(root: &Path, args: &Args, report: &str) -> Result<()> {
    println!("\n{report}");
    if args.append {
        let doc = root.join("docs/PERFORMANCE.md");
        let mut text = fs::read_to_string(&doc).unwrap_or_else(|_| PERFORMANCE_HEADER.to_owned());
        text.push('\n');
        text.push_str(report);
        fs::write(&doc, text).with_context(|| format!("writing {}", doc.display()))?;
        eprintln!("Appended to {}", doc.display());
    }
    Ok(())
}

const PERFORMANCE_HEADER: &str = "# Performance\n\nFigures from `cargo xtask bench master` \
newest last. Each entry says when, on which CPU and at which commit it was measured; \
see `xtask/src/bench/master.rs` for how each figure is taken.\n";

/// Builds xtask in release and runs this benchmark from it, passing the arguments on.
fn rerun_optimised(root: &Path, args: &[String]) -> Result<()> {
    eprintln!("Building xtask (release) so the load generator does not starve the master...");
    cargo(root, &["build", "--release", "-p", "xtask"])?;
    let exe = target_dir(root).join("release/xtask");
    let status = Command::new(exe)
        .args(["bench", "master"])
        .args(args)
        .current_dir(root)
        .status()
        .context("running the release xtask")?;
    ensure!(status.success(), "the benchmark failed ({status})");
    Ok(())
}

fn cargo(root: &Path, args: &[&str]) -> Result<()> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(cargo)
        .args(args)
        .current_dir(root)
        .status()
        .context("running cargo")?;
    ensure!(status.success(), "cargo {} failed", args.join(" "));
    Ok(())
}

/// 10,000 sockets need more than the usual 1024 descriptors: soft limit up to the hard one.
fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE)
        && soft < hard
        && let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard)
    {
        eprintln!("warning: could not raise the open-file limit: {e}");
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

fn target_dir(root: &Path) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), PathBuf::from)
}

/// One fleet size's figures.
struct Row {
    n: usize,
    cpu_pct: f64,
    loadgen_cpu_pct: f64,
    /// CPU the rest of the machine used in the window (other processes, steal): on a shared
    /// two-core machine this says how much of it the master really had.
    other_cpu_pct: f64,
    hwm_kib: u64,
    msgs_in: f64,
    msgs_out: f64,
    /// Store group commits per second in the window, and their mean duration.
    commits_per_s: f64,
    commit_ms: f64,
    /// Commits in the window that took over 50 ms.
    slow_commits: f64,
    master_acks: MasterAcks,
    /// The same, to the ack's write to the socket.
    master_written: MasterAcks,
    /// The master runtime's injection queue, sampled through the window.
    injection_queue: QueueDepth,
    p50: Duration,
    p99: Duration,
    max: Duration,
    samples: usize,
    /// Ack latency p99 to when the generator's task handled the ack (not the socket).
    task_p99: Duration,
    /// The load generator's own timer lateness, p99.
    lateness_p99: Duration,
    fanout: Duration,
    launcher: Duration,
    stopped: usize,
    verdicts_ok: usize,
    verdict_delay: (f64, f64),
    false_verdicts: usize,
    failed: u64,
    /// With `--tls`: the fan-out's TLS handshakes.
    tls: Option<TlsFigures>,
    /// Each master's share, in the order they started (one with SQLite). `cpu_pct` and
    /// `hwm_kib` above are their sum and their largest.
    masters: Vec<MasterShare>,
    /// With `--postgres`: the server's CPU and the database's load over the window.
    postgres: Option<cluster::DbFigures>,
}

/// One master's part of a fleet scenario.
#[derive(Clone, Debug)]
struct MasterShare {
    cpu_pct: f64,
    hwm_kib: u64,
    /// The jobs it ran, and their wrappers.
    jobs: usize,
    wrappers: usize,
}

/// The TLS handshakes of a fan-out: how many, over how long (first to last completed), and
/// how long each took (client side, from the ClientHello to the handshake's end).
#[derive(Clone, Copy, Debug)]
struct TlsFigures {
    handshakes: u64,
    seconds: f64,
    p50: Duration,
    p99: Duration,
}

impl TlsFigures {
    fn take(stats: &fleet::Stats) -> Option<Self> {
        let handshakes = stats.tls_handshakes.load(Ordering::Relaxed);
        let (first, last) = (*stats.tls_window.lock())?;
        let times = stats.tls_times.take_sorted();
        let at = |q: f64| {
            let i = ((times.len() as f64 * q).ceil() as usize).saturating_sub(1);
            Duration::from_micros(u64::from(times.get(i).copied().unwrap_or(0)))
        };
        Some(Self {
            handshakes,
            seconds: last.duration_since(first).as_secs_f64(),
            p50: at(0.50),
            p99: at(0.99),
        })
    }

    fn rate(&self) -> f64 {
        if self.seconds > 0.0 {
            self.handshakes as f64 / self.seconds
        } else {
            f64::NAN
        }
    }
}

impl Row {
    fn line(&self) -> String {
        format!(
            "| {} | {:.1} | {} | {:.0} | {:.0} | {:.1} / {:.1} / {:.1} | {:.1} / {:.1} / {} | {} / {:.2}; {} / {:.2} | {:.0} / {:.0} | {:.2} (+{:.3}) | {}/{} in [{:.2}, {:.2}] s | {} | {:.1} | {:.0} |",
            self.n,
            self.cpu_pct,
            self.hwm_kib / 1024,
            self.msgs_in,
            self.msgs_out,
            ms(self.p50),
            ms(self.p99),
            ms(self.max),
            self.commits_per_s,
            self.commit_ms,
            self.slow_commits,
            self.master_acks.p99_bound_ms,
            self.master_acks.over_100ms_pct,
            self.master_written.p99_bound_ms,
            self.master_written.over_100ms_pct,
            self.injection_queue.mean,
            self.injection_queue.max,
            self.fanout.as_secs_f64(),
            self.launcher.as_secs_f64(),
            self.verdicts_ok,
            self.stopped,
            self.verdict_delay.0,
            self.verdict_delay.1,
            self.false_verdicts,
            self.loadgen_cpu_pct,
            self.other_cpu_pct,
        )
    }
}

/// Tasks in the master runtime's injection queue, from samples of its gauge.
#[derive(Clone, Copy, Debug)]
struct QueueDepth {
    mean: f64,
    max: f64,
}

impl QueueDepth {
    fn of(samples: &[f64]) -> Self {
        Self {
            mean: samples.iter().sum::<f64>() / samples.len().max(1) as f64,
            max: samples.iter().copied().fold(0.0, f64::max),
        }
    }
}

/// The master's own view of output ack latency over the window.
#[derive(Clone, Copy, Debug)]
struct MasterAcks {
    /// The upper bound of the bucket the 99th percentile falls in.
    p99_bound_ms: f64,
    over_100ms_pct: f64,
}

impl MasterAcks {
    fn between(before: &[(f64, f64)], after: &[(f64, f64)]) -> Self {
        let window: Vec<(f64, f64)> = after
            .iter()
            .zip(before)
            .map(|((le, a), (_, b))| (*le, a - b))
            .collect();
        let total = window.last().map_or(0.0, |(_, n)| *n);
        let p99_bound_ms = window
            .iter()
            .find(|(_, n)| *n >= 0.99 * total)
            .map_or(f64::NAN, |(le, _)| le * 1000.0);
        let within_100ms = window
            .iter()
            .find(|(le, _)| (*le - 0.1).abs() < 1e-9)
            .map_or(0.0, |(_, n)| *n);
        let over_100ms_pct = if total > 0.0 {
            (total - within_100ms) / total * 100.0
        } else {
            f64::NAN
        };
        Self {
            p99_bound_ms,
            over_100ms_pct,
        }
    }
}

struct Idle {
    cpu_pct: f64,
    seconds: f64,
    stream_mb_s: f64,
    stream_cpu_pct: f64,
    stream_p99: Duration,
}

/// The `p` quantile (0..=1) of sorted microsecond samples, zero when there are none.
fn percentile(sorted: &[u32], p: f64) -> Duration {
    let at = ((sorted.len().max(1) - 1) as f64 * p).round() as usize;
    Duration::from_micros(u64::from(sorted.get(at).copied().unwrap_or(0)))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The settings every benchmark master gets: loopback, its own dirs, a kernel-chosen API
/// port, the machines port given (0: kernel-chosen too), and the store (`None`: SQLite under
/// its data dir).
fn settings(dir: &Path, machines_port: u16, store: Option<&str>) -> String {
    format!(
        "saltpeter_config:\n  launcher: bench\n  logdir: '{d}/log'\n  data_dir: '{d}/data'\n  \
         api_ws_bind_addr: 127.0.0.1\n  api_ws_port: 0\n  \
         machines_ws_bind_addr: 127.0.0.1\n  machines_ws_port: {machines_port}\n{tls}{store}",
        d = dir.display(),
        tls = if TLS.load(std::sync::atomic::Ordering::Relaxed) {
            "  machines_tls: on\n"
        } else {
            ""
        },
        store = store.map_or_else(String::new, |url| format!("  store: '{url}'\n")),
    )
}

/// A job that never fires by itself (it is started through the API).
fn manual_job(name: &str, targets: &[String]) -> String {
    let mut s = format!(
        "{name}:\n  sec: 0\n  min: 0\n  hour: 0\n  dom: 1\n  mon: 1\n  dow: '*'\n  year: 2099\n  \
         target_type: list\n  command: 'true'\n  targets:\n"
    );
    for t in targets {
        let _ = writeln!(s, "    - {t}");
    }
    s
}

/// Where the fleet scenario's masters keep their runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Store {
    /// One master, SQLite under its data dir.
    Sqlite,
    /// `masters` masters on one throwaway PostgreSQL, which xtask starts and stops.
    Postgres { masters: usize },
}

/// One run of the fleet scenario: which master fired it, and its instance.
struct FleetRun {
    master: usize,
    instance: String,
}

fn fleet_scenario(bin: &Path, dir: &Path, n: usize, seconds: u64, store: Store) -> Result<Row> {
    // Declared before the masters, so that it is dropped after them: a master that stops
    // releases its leases in the database first.
    let postgres = match store {
        Store::Sqlite => None,
        Store::Postgres { .. } => {
            if dir.exists() {
                fs::remove_dir_all(dir).with_context(|| format!("clearing {}", dir.display()))?;
            }
            Some(crate::postgres::Postgres::start().context("starting a throwaway PostgreSQL")?)
        }
    };
    let layout = cluster::Layout::new(
        n,
        match store {
            Store::Sqlite => 1,
            Store::Postgres { masters } => masters,
        },
    )?;
    let masters: Vec<MasterProc> = match &postgres {
        None => vec![MasterProc::start(
            bin,
            dir,
            &[("jobs.yaml", layout.yaml())],
        )?],
        Some(pg) => (0..layout.masters)
            .map(|i| {
                MasterProc::start_with_store(
                    bin,
                    &dir.join(format!("master{i}")),
                    &[("jobs.yaml", layout.yaml())],
                    &pg.url,
                )
            })
            .collect::<Result<_>>()?,
    };
    // Which jobs each master runs: with PostgreSQL, some of those its leases gave it.
    let plan: Vec<Vec<usize>> = match &postgres {
        None => vec![vec![0]],
        Some(_) => cluster::wait_split(&masters, &layout)?,
    };
    let mut starts: Vec<StartFile> = masters
        .iter()
        .map(|m| StartFile::new(m.data.join("bench-starts.jsonl")))
        .collect();
    let mut fleet = Fleet::new()?;
    let stats = fleet.stats.clone();

    // Fan-out: fire each job through the master that holds it, then every wrapper connects to
    // the master that launched it, is accepted and has `start` acked.
    let mut fired = Vec::new();
    for (master, jobs) in plan.iter().enumerate() {
        for &job in jobs {
            let at = SystemTime::now();
            let instance = masters[master].run_job(&layout.jobs[job].name)?;
            fired.push((master, job, instance, at));
        }
    }
    let mut runs = Vec::new();
    let mut offset = 0;
    let mut first_written: Option<SystemTime> = None;
    let mut launcher = Duration::ZERO;
    for (master, file) in starts.iter_mut().enumerate() {
        let mine = fired.iter().filter(|f| f.0 == master).count();
        for _ in 0..mine {
            let request = file.next(Duration::from_secs(60))?;
            let (_, job, _, at) = fired
                .iter()
                .find(|f| f.0 == master && f.2 == request.instance)
                .with_context(|| format!("start request for {}", request.instance))?;
            let expected = layout.jobs[*job].machines.len();
            ensure!(
                request.machines.len() == expected,
                "{} machines in the request",
                request.machines.len()
            );
            // Every 100th wrapper of the fleet (offset by 50, so not the first to connect)
            // will be stopped.
            fleet.launch_from(&request, offset, |i| {
                if i % 100 == 50 {
                    Kind::Stoppable
                } else {
                    Kind::Steady
                }
            })?;
            offset += expected;
            launcher = launcher.max(request.written.duration_since(*at).unwrap_or_default());
            first_written = Some(first_written.map_or(request.written, |w| w.min(request.written)));
            runs.push(FleetRun {
                master,
                instance: request.instance,
            });
        }
    }
    ensure!(offset == n, "{offset} machines in the start requests");
    let fanout = wait_started(&stats, n, first_written.context("no start request")?)?;
    eprintln!(
        "  fan-out: {n} started {:.2} s after the start request (launcher {:.3} s)",
        fanout.as_secs_f64(),
        launcher.as_secs_f64()
    );
    let tls = TlsFigures::take(&stats);
    if let Some(t) = &tls {
        eprintln!(
            "  TLS: {} handshakes in {:.2} s ({:.0}/s), each p50 {:.1} ms / p99 {:.1} ms",
            t.handshakes,
            t.seconds,
            t.rate(),
            ms(t.p50),
            ms(t.p99)
        );
    }

    // Steady state. With several masters the store commits and ack histograms are summed over
    // them: each one's figures cover its own wrappers.
    sleep(WARM_UP);
    let cpu_all = |ms: &[MasterProc]| ms.iter().map(MasterProc::cpu).collect::<Result<Vec<_>>>();
    let (cpu0, self0, busy0) = (cpu_all(&masters)?, own_cpu()?, machine_busy()?);
    let db0 = postgres.as_ref().map(cluster::DbSample::take).transpose()?;
    let commits0 = sum_commits(&masters)?;
    let acks0 = sum_histograms(&masters, "saltpeter_output_ack_seconds")?;
    let written0 = sum_histograms(&masters, "saltpeter_output_ack_written_seconds")?;
    let (sent0, recv0) = (
        stats.sent.load(Ordering::Relaxed),
        stats.received.load(Ordering::Relaxed),
    );
    stats.measuring.store(true, Ordering::Relaxed);
    let t0 = Instant::now();
    let window = Duration::from_secs(seconds);
    let mut queue_depths = Vec::new();
    while let Some(left) = window.checked_sub(t0.elapsed()).filter(|d| !d.is_zero()) {
        sleep(QUEUE_SAMPLE.min(left));
        let mut depth = 0.0;
        for master in &masters {
            depth += master.gauge("saltpeter_runtime_injection_queue_depth")?;
        }
        queue_depths.push(depth);
    }
    stats.measuring.store(false, Ordering::Relaxed);
    let injection_queue = QueueDepth::of(&queue_depths);
    let wall = t0.elapsed().as_secs_f64();
    let (cpu1, self1, busy1) = (cpu_all(&masters)?, own_cpu()?, machine_busy()?);
    let db1 = postgres.as_ref().map(cluster::DbSample::take).transpose()?;
    let commits1 = sum_commits(&masters)?;
    let acks1 = sum_histograms(&masters, "saltpeter_output_ack_seconds")?;
    let written1 = sum_histograms(&masters, "saltpeter_output_ack_written_seconds")?;
    let master_acks = MasterAcks::between(&acks0, &acks1);
    let master_written = MasterAcks::between(&written0, &written1);
    let commits = commits1.0 - commits0.0;
    let slow_commits = commits1.2 - commits0.2;
    let commit_ms = if commits > 0.0 {
        (commits1.1 - commits0.1) / commits * 1000.0
    } else {
        f64::NAN
    };
    let (sent1, recv1) = (
        stats.sent.load(Ordering::Relaxed),
        stats.received.load(Ordering::Relaxed),
    );
    let lat = stats.latencies.take_sorted();
    ensure!(!lat.is_empty(), "no ack latency samples");
    let pct = |p: f64| percentile(&lat, p);
    let task_p99 = percentile(&stats.task_latencies.take_sorted(), 0.99);
    let lateness_p99 = percentile(&stats.lateness.take_sorted(), 0.99);
    let cpu_pcts: Vec<f64> = cpu1
        .iter()
        .zip(&cpu0)
        .map(|(b, a)| (*b - *a).as_secs_f64() / wall * 100.0)
        .collect();
    let cpu_pct: f64 = cpu_pcts.iter().sum();
    let loadgen_cpu_pct = (self1 - self0).as_secs_f64() / wall * 100.0;
    let postgres_figures = match (db0, db1) {
        (Some(a), Some(b)) => Some(cluster::DbFigures::between(&a, &b)?),
        _ => None,
    };
    let server_cpu_pct = postgres_figures.as_ref().map_or(0.0, |f| f.cpu_pct);
    let other_cpu_pct =
        ((busy1 - busy0).as_secs_f64() / wall * 100.0 - cpu_pct - loadgen_cpu_pct - server_cpu_pct)
            .max(0.0);
    eprintln!(
        "  steady: master CPU {cpu_pct:.1}%, in {:.0}/s, out {:.0}/s, p99 {:.1} ms, \
         store {:.1} commits/s of {commit_ms:.1} ms ({slow_commits} over 50 ms), \
         master-side acks: queued p99 <= {} ms, {:.2}% over 100 ms, written p99 <= {} ms, {:.2}% over 100 ms; \
         as the generator's tasks saw acks: \
         p99 {:.1} ms, its timers late p99 {:.1} ms; runtime injection queue mean {:.0}, max {:.0}",
        (sent1 - sent0) as f64 / wall,
        (recv1 - recv0) as f64 / wall,
        ms(pct(0.99)),
        commits / wall,
        master_acks.p99_bound_ms,
        master_acks.over_100ms_pct,
        master_written.p99_bound_ms,
        master_written.over_100ms_pct,
        ms(task_p99),
        ms(lateness_p99),
        injection_queue.mean,
        injection_queue.max,
    );
    if let Some(f) = &postgres_figures {
        eprintln!("  {}", f.summary(&cpu_pcts));
    }

    // Heartbeat verdicts: 1% go silent; wait past the timeout; nobody else may be judged.
    fleet.set_phase(Phase::StopSome);
    let stop_deadline = Instant::now() + Duration::from_secs(10);
    let expected_stops = (0..n).filter(|i| i % 100 == 50).count();
    while stats.stopped.lock().len() < expected_stops {
        ensure!(
            Instant::now() < stop_deadline,
            "the stoppable wrappers did not stop"
        );
        sleep(Duration::from_millis(10));
    }
    let stopped: Vec<(String, SystemTime)> = stats.stopped.lock().clone();
    // The last stopped wrapper's heartbeat is at most 5 s old; 16 s after it plus a margin.
    sleep(Duration::from_secs(VERDICT_WINDOW.1 as u64 + 3));
    let view = runs_status(&masters, &runs)?;
    let mut delays = Vec::new();
    let mut verdicts_ok = 0;
    for (name, beat) in &stopped {
        let m = &view["machines"][name];
        let end = m["endtime"].as_str().and_then(unix_seconds);
        let beat = beat.duration_since(SystemTime::UNIX_EPOCH)?.as_secs_f64();
        if m["retcode"].as_i64() == Some(253)
            && let Some(end) = end
        {
            let d = end - beat;
            delays.push(d);
            if (VERDICT_WINDOW.0..=VERDICT_WINDOW.1).contains(&d) {
                verdicts_ok += 1;
            } else {
                eprintln!("  {name}: 253 after {d:.3} s");
            }
        } else {
            eprintln!("  {name}: not 253 in time: {m}");
        }
    }
    let names: Vec<&str> = layout.running(&plan).collect();
    let stopped_names: std::collections::HashSet<&str> =
        stopped.iter().map(|(n, _)| n.as_str()).collect();
    let judged_live = |view: &Value| {
        names
            .iter()
            .filter(|n| !stopped_names.contains(*n))
            .filter(|n| view["machines"][**n]["retcode"].as_i64() == Some(253))
            .count()
    };
    let mut false_verdicts = judged_live(&view) + (stopped.len() - verdicts_ok);

    // The rest complete; every run must end with every live machine at 0.
    fleet.set_phase(Phase::Complete);
    let live = n - stopped.len();
    let done_by = Instant::now() + Duration::from_secs(120);
    while (stats.completed.load(Ordering::Relaxed) as usize) < live && Instant::now() < done_by {
        sleep(Duration::from_millis(20));
    }
    ensure!(
        stats.completed.load(Ordering::Relaxed) as usize == live,
        "only {} of {live} completions acked; errors {:?}",
        stats.completed.load(Ordering::Relaxed),
        stats.errors.lock().clone()
    );
    let ended = runs_ended(&masters, &runs, Duration::from_secs(60))?;
    let after = judged_live(&ended);
    false_verdicts = false_verdicts.max(after + (stopped.len() - verdicts_ok));
    let not_zero = names
        .iter()
        .filter(|n| !stopped_names.contains(*n))
        .filter(|n| ended["machines"][**n]["retcode"].as_i64() != Some(0))
        .count();
    ensure!(
        not_zero == after,
        "{not_zero} live machines ended other than 0 (253: {after})"
    );
    let mut shares = Vec::new();
    for (i, master) in masters.iter().enumerate() {
        let jobs = plan.get(i).map_or(&[][..], Vec::as_slice);
        shares.push(MasterShare {
            cpu_pct: cpu_pcts.get(i).copied().unwrap_or(f64::NAN),
            hwm_kib: master.vm_kib("VmHWM")?,
            jobs: jobs.len(),
            wrappers: jobs.iter().map(|j| layout.jobs[*j].machines.len()).sum(),
        });
    }
    let hwm_kib = shares.iter().map(|s| s.hwm_kib).max().unwrap_or(0);
    fleet.wait_all(Duration::from_secs(10));
    let failed = stats.failed.load(Ordering::Relaxed);
    delays.sort_by(f64::total_cmp);
    Ok(Row {
        n,
        cpu_pct,
        loadgen_cpu_pct,
        other_cpu_pct,
        hwm_kib,
        msgs_in: (sent1 - sent0) as f64 / wall,
        msgs_out: (recv1 - recv0) as f64 / wall,
        commits_per_s: commits / wall,
        commit_ms,
        slow_commits,
        master_acks,
        master_written,
        injection_queue,
        p50: pct(0.50),
        p99: pct(0.99),
        max: pct(1.0),
        samples: lat.len(),
        task_p99,
        lateness_p99,
        fanout,
        launcher,
        stopped: stopped.len(),
        verdicts_ok,
        verdict_delay: (
            delays.first().copied().unwrap_or(f64::NAN),
            delays.last().copied().unwrap_or(f64::NAN),
        ),
        false_verdicts,
        failed,
        tls,
        masters: shares,
        postgres: postgres_figures,
    })
}

/// The store's commits, their seconds and the slow ones, summed over `masters`.
fn sum_commits(masters: &[MasterProc]) -> Result<(f64, f64, f64)> {
    let mut sum = (0.0, 0.0, 0.0);
    for master in masters {
        let (count, seconds, slow) = master.store_commits()?;
        sum = (sum.0 + count, sum.1 + seconds, sum.2 + slow);
    }
    Ok(sum)
}

/// A histogram's cumulative buckets summed over `masters` (they all have the same bounds).
fn sum_histograms(masters: &[MasterProc], name: &str) -> Result<Vec<(f64, f64)>> {
    let mut sum: Vec<(f64, f64)> = Vec::new();
    for master in masters {
        let buckets = master.histogram(name)?;
        if sum.is_empty() {
            sum = buckets;
        } else {
            ensure!(
                sum.len() == buckets.len(),
                "{name}: the masters' buckets differ"
            );
            for ((_, total), (_, n)) in sum.iter_mut().zip(buckets) {
                *total += n;
            }
        }
    }
    Ok(sum)
}

/// Every machine of `runs`, each asked of the master that runs it, as one view
/// (`{"machines": {name: status}}`; machine names are unique across the fleet's jobs).
fn runs_status(masters: &[MasterProc], runs: &[FleetRun]) -> Result<Value> {
    merge_machines(
        runs.iter()
            .map(|r| masters[r.master].run_status(&r.instance)),
    )
}

/// As [`runs_status`], once every run has ended (each waited for at most `limit`).
fn runs_ended(masters: &[MasterProc], runs: &[FleetRun], limit: Duration) -> Result<Value> {
    merge_machines(
        runs.iter()
            .map(|r| masters[r.master].wait_ended(&r.instance, limit)),
    )
}

fn merge_machines(views: impl Iterator<Item = Result<Value>>) -> Result<Value> {
    let mut machines = serde_json::Map::new();
    for view in views {
        if let Value::Object(m) = view?["machines"].take() {
            machines.extend(m);
        }
    }
    Ok(serde_json::json!({ "machines": machines }))
}

fn idle_and_stream(bin: &Path, dir: &Path, seconds: u64) -> Result<Idle> {
    // 1,000 daily jobs, due half a day from now so none fires during the measurement.
    let hour = (SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)?
        .as_secs()
        / 3600
        + 12)
        % 24;
    let mut jobs = String::new();
    for i in 0..IDLE_JOBS {
        let _ = write!(
            jobs,
            "idle{i:04}:\n  sec: {}\n  min: {}\n  hour: {hour}\n  dom: '*'\n  mon: '*'\n  dow: '*'\n  \
             target_type: list\n  targets: [i{i:04}]\n  command: 'true'\n",
            i % 60,
            (i / 60) % 60
        );
    }
    jobs.push_str(&manual_job("stream", &["s0".to_owned()]));
    let master = MasterProc::start(bin, dir, &[("jobs.yaml", jobs)])?;
    let listed = http::get(master.api, "/api/v1/jobs")?;
    let count = listed.body["jobs"].as_array().map_or(0, Vec::len);
    ensure!(count == IDLE_JOBS + 1, "the master lists {count} jobs");
    sleep(WARM_UP);
    let cpu0 = master.cpu()?;
    let t0 = Instant::now();
    sleep(Duration::from_secs(seconds));
    let idle_wall = t0.elapsed().as_secs_f64();
    let cpu_pct = (master.cpu()? - cpu0).as_secs_f64() / idle_wall * 100.0;
    eprintln!("  idle: {cpu_pct:.2}% of a core");

    let mut starts = StartFile::new(master.data.join("bench-starts.jsonl"));
    let mut fleet = Fleet::new()?;
    let stats = fleet.stats.clone();
    let instance = master.run_job("stream")?;
    let request = starts.next(Duration::from_secs(30))?;
    fleet.launch(&request, |_| Kind::Stream)?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while stats.started.load(Ordering::Relaxed) < 1 {
        ensure!(
            Instant::now() < deadline,
            "the streaming wrapper did not start"
        );
        sleep(Duration::from_millis(5));
    }
    sleep(Duration::from_secs(1));
    let stream_for = Duration::from_secs(seconds.min(STREAM_SECONDS));
    let (b0, c0) = (stats.bytes_acked.load(Ordering::Relaxed), master.cpu()?);
    stats.measuring.store(true, Ordering::Relaxed);
    let t0 = Instant::now();
    sleep(stream_for);
    stats.measuring.store(false, Ordering::Relaxed);
    let wall = t0.elapsed().as_secs_f64();
    let (b1, c1) = (stats.bytes_acked.load(Ordering::Relaxed), master.cpu()?);
    let p99 = percentile(&stats.latencies.take_sorted(), 0.99);
    fleet.set_phase(Phase::Complete);
    master.wait_ended(&instance, Duration::from_secs(120))?;
    let stream_mb_s = (b1 - b0) as f64 / 1e6 / wall;
    eprintln!("  stream: {stream_mb_s:.1} MB/s made durable");
    Ok(Idle {
        cpu_pct,
        seconds: idle_wall,
        stream_mb_s,
        stream_cpu_pct: (c1 - c0).as_secs_f64() / wall * 100.0,
        stream_p99: p99,
    })
}

/// Waits (at most 180 s) until `n` wrappers have had `start` acknowledged; returns the
/// fan-out, from the launcher writing the (first) start request, at `written`, to the last
/// `start` ack.
fn wait_started(stats: &fleet::Stats, n: usize, written: SystemTime) -> Result<Duration> {
    let deadline = Instant::now() + Duration::from_secs(180);
    while (stats.started.load(Ordering::Relaxed) as usize) < n {
        ensure!(
            stats.failed.load(Ordering::Relaxed) == 0,
            "wrappers failed: {:?}",
            stats.errors.lock().clone()
        );
        ensure!(
            Instant::now() < deadline,
            "only {} of {n} started within 180 s",
            stats.started.load(Ordering::Relaxed)
        );
        sleep(Duration::from_millis(5));
    }
    let last_ack = (*stats.last_start_ack.lock()).context("no start ack")?;
    Ok(last_ack.duration_since(written).unwrap_or_default())
}

/// An entry's heading: when, at which commit (and whether the tree had changes), on which CPU.
fn entry_heading(root: &Path, date: &str) -> String {
    let commit = command_text(
        Command::new("git")
            .args(["rev-parse", "--short", "HEAD"])
            .current_dir(root),
    )
    .unwrap_or_else(|_| "unknown".into());
    let dirty = command_text(
        Command::new("git")
            .args(["status", "--porcelain", "--", "crates", "xtask"])
            .current_dir(root),
    )
    .map(|s| !s.is_empty())
    .unwrap_or(false);
    let cpu = fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    format!(
        "## {date}, commit {commit}{}, {cpu} ({cores} cores)\n\n",
        if dirty {
            " (with uncommitted changes)"
        } else {
            ""
        }
    )
}

fn report(root: &Path, args: &Args, rows: &[Row], idle: &Idle) -> Result<String> {
    let verdict = |ok: bool| if ok { "ok" } else { "MISSED" };
    let date = command_text(Command::new("date").args(["-u", "+%Y-%m-%d %H:%M UTC"]))
        .unwrap_or_else(|_| "unknown date".into());
    let mut s = entry_heading(root, &date);
    let _ = writeln!(
        s,
        "`cargo xtask bench master --wrappers {} --seconds {}{}`: release `sp-master` with `launcher: bench`; \
         each wrapper heartbeats every 5 s and sends 200 bytes of output every second; {} s steady state after a 5 s warm-up.\n",
        args.sizes
            .iter()
            .map(usize::to_string)
            .collect::<Vec<_>>()
            .join(","),
        args.seconds,
        if args.tls { " --tls" } else { "" },
        args.seconds
    );
    let _ = writeln!(
        s,
        "| wrappers | master CPU % of a core | peak RSS MiB | msgs/s in | msgs/s out | ack ms p50 / p99 / max | store commits/s / mean ms / over 50 ms | master-side ack p99 ≤ ms / % over 100 ms, queued; written | runtime injection queue mean / max | fan-out s (+launcher) | 253 verdicts in window | false verdicts | load generator CPU % | rest of machine CPU % |"
    );
    let _ = writeln!(
        s,
        "|---:|---:|---:|---:|---:|---|---|---|---|---|---|---:|---:|---:|"
    );
    for row in rows {
        let _ = writeln!(s, "{}", row.line());
    }
    let _ = writeln!(s);
    for row in rows {
        let _ = writeln!(
            s,
            "- {} wrappers: p99 {:.1} ms (target < {} ms: {}), RSS {} MiB (target < 1 GiB: {}), false verdicts {} (target 0: {}); {} latency samples; {} wrapper errors; as the load generator's tasks saw the acks, p99 {:.1} ms, with its own timers firing up to {:.1} ms late (p99).",
            row.n,
            ms(row.p99),
            TARGET_P99.as_millis(),
            verdict(row.p99 < TARGET_P99),
            row.hwm_kib / 1024,
            verdict(row.hwm_kib < TARGET_RSS_KIB),
            row.false_verdicts,
            verdict(row.false_verdicts == 0),
            row.samples,
            row.failed,
            ms(row.task_p99),
            ms(row.lateness_p99),
        );
    }
    for row in rows {
        if let Some(t) = &row.tls {
            let _ = writeln!(
                s,
                "- {} wrappers over TLS (`--tls`: `machines_tls: on`, the self-signed certificate pinned by fingerprint, rustls with ring on both sides): {} handshakes during the fan-out, first to last done in {:.2} s = {:.0} handshakes/s; each took p50 {:.1} ms / p99 {:.1} ms on the client (at most {} in flight).",
                row.n,
                t.handshakes,
                t.seconds,
                t.rate(),
                ms(t.p50),
                ms(t.p99),
                fleet::CONNECTS_IN_FLIGHT,
            );
        }
    }
    let _ = writeln!(
        s,
        "- Idle, {IDLE_JOBS} jobs configured, nothing running: {:.2}% of a core over {:.0} s (target < {TARGET_IDLE_CPU}%: {}).",
        idle.cpu_pct,
        idle.seconds,
        verdict(idle.cpu_pct < TARGET_IDLE_CPU)
    );
    let _ = writeln!(
        s,
        "- One wrapper streaming as fast as acks allow (256 KiB messages, 8 in flight): {:.1} MB/s made durable (acked), master CPU {:.0}%, ack p99 {:.1} ms.",
        idle.stream_mb_s,
        idle.stream_cpu_pct,
        ms(idle.stream_p99)
    );
    let _ = writeln!(
        s,
        "\nHow measured: CPU is utime+stime from /proc/<pid>/stat over the window (100% = one core); peak RSS is the master's VmHWM at the end of the scenario; \
         msgs/s count WebSocket frames wrapper→master (in) and master→wrapper (out) in the window; ack latency runs from just before the load generator writes an `output` to the time the kernel received the (cumulative) ack that covers it on the wrapper's socket \
         (`SO_TIMESTAMPNS`, wall clock), which leaves out how long the generator's one tokio worker, on the same two cores, took to get to it; the same latency to when the wrapper's task handled the ack \
         is given too, with how late the generator's 1 s output timers fired; \
         store commits are the master's group commits in the window and their mean apply-and-commit time and how many took over 50 ms (from `/metrics`), since an ack waits for the commit that holds its output; \
         master-side acks are the master's own `saltpeter_output_ack_seconds` histogram over the window (socket read to ack queued, after the commit; the p99 is the histogram bucket it falls in) \
         and its `saltpeter_output_ack_written_seconds` (socket read to the ack written to the socket, which adds the wait for the connection's task), \
         which leaves out the load generator's delays; the runtime injection queue is the master's `saltpeter_runtime_injection_queue_depth` gauge \
         (tasks waiting in tokio's shared queue rather than a worker's own) sampled every {} ms through the window; \
         'rest of machine' is every other process plus steal time in the window (from /proc/stat), since other work on a shared machine takes cores from the master; fan-out is from the launcher writing the start request to the last \
         `start` ack (connect, handshake, `connect`, `start`; at most {} handshakes in flight), the launcher's own time after the POST in parentheses; verdicts: every 100th wrapper closes its \
         socket abruptly and must be 253 with `endtime` 15.0-16.0 s after the last heartbeat it sent (read from `GET /api/v1/runs/{{instance}}/output?max_bytes=1`, the per-machine status \
         without the output), and no other wrapper may ever be 253.",
        QUEUE_SAMPLE.as_millis(),
        512
    );
    Ok(s)
}

/// The value of the unlabelled sample `name` in a Prometheus text exposition.
fn sample(text: &str, name: &str) -> Result<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse::<f64>().ok())
        .with_context(|| format!("no {name} in /metrics"))
}

fn command_text(cmd: &mut Command) -> Result<String> {
    let out = cmd.output()?;
    ensure!(out.status.success(), "command failed");
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// `YYYY-MM-DDTHH:MM:SS[.frac](+00:00|Z)` (the master always writes UTC) to Unix seconds.
fn unix_seconds(t: &str) -> Option<f64> {
    let body = t.strip_suffix("+00:00").or_else(|| t.strip_suffix('Z'))?;
    let (date, time) = body.split_once('T')?;
    let mut d = date.splitn(3, '-').map(|x| x.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let mut tp = time.splitn(3, ':');
    let (h, min) = (
        tp.next()?.parse::<i64>().ok()?,
        tp.next()?.parse::<i64>().ok()?,
    );
    let sec: f64 = tp.next()?.parse().ok()?;
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some((days * 86_400 + h * 3600 + min * 60) as f64 + sec)
}

/// CPU time every core spent busy (all but idle and iowait, steal included), from /proc/stat.
fn machine_busy() -> Result<Duration> {
    let stat = fs::read_to_string("/proc/stat")?;
    let line = stat.lines().next().context("empty /proc/stat")?;
    let ticks: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().unwrap_or(0))
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is inside user).
    let busy: u64 = ticks
        .iter()
        .take(8)
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4)
        .map(|(_, v)| v)
        .sum();
    Ok(Duration::from_millis(busy * 10))
}

/// CPU time (user + system) of this process.
fn own_cpu() -> Result<Duration> {
    cpu_of(std::process::id())
}

fn cpu_of(pid: u32) -> Result<Duration> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after = stat.rfind(')').context("odd /proc stat")? + 2;
    let fields: Vec<&str> = stat[after..].split(' ').collect();
    let ticks: u64 = fields.get(11).context("utime")?.parse::<u64>()?
        + fields.get(12).context("stime")?.parse::<u64>()?;
    // USER_HZ is 100 on every Linux architecture.
    Ok(Duration::from_millis(ticks * 10))
}

/// A release `sp-master` on its own directory, ended by PID when dropped.
struct MasterProc {
    child: Child,
    bin: PathBuf,
    api: SocketAddr,
    data: PathBuf,
    dir: PathBuf,
}

impl MasterProc {
    fn start(bin: &Path, dir: &Path, files: &[(&str, String)]) -> Result<Self> {
        Self::start_on(bin, dir, files, 0)
    }

    /// A master whose store is the PostgreSQL database at `url`.
    fn start_with_store(
        bin: &Path,
        dir: &Path,
        files: &[(&str, String)],
        url: &str,
    ) -> Result<Self> {
        Self::start_in(bin, dir, files, 0, Some(url))
    }

    /// A master whose machines endpoint listens on `machines_port` (0: the kernel's choice).
    /// A fixed port lets wrappers find a restarted master where they left the old one.
    fn start_on(
        bin: &Path,
        dir: &Path,
        files: &[(&str, String)],
        machines_port: u16,
    ) -> Result<Self> {
        Self::start_in(bin, dir, files, machines_port, None)
    }

    fn start_in(
        bin: &Path,
        dir: &Path,
        files: &[(&str, String)],
        machines_port: u16,
        store: Option<&str>,
    ) -> Result<Self> {
        if dir.exists() {
            fs::remove_dir_all(dir).with_context(|| format!("clearing {}", dir.display()))?;
        }
        let conf = dir.join("conf");
        fs::create_dir_all(&conf)?;
        fs::create_dir_all(dir.join("log"))?;
        fs::create_dir_all(dir.join("data"))?;
        fs::write(
            conf.join("settings.yaml"),
            settings(dir, machines_port, store),
        )?;
        for (name, text) in files {
            fs::write(conf.join(name), text)?;
        }
        let mut master = Self {
            child: Self::spawn(bin, dir)?,
            bin: bin.to_owned(),
            api: "127.0.0.1:1".parse()?,
            data: dir.join("data"),
            dir: dir.to_owned(),
        };
        master.wait_ready()?;
        Ok(master)
    }

    /// Starts `sp-master` on the configuration under `dir`, appending to its log.
    fn spawn(bin: &Path, dir: &Path) -> Result<Child> {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("master.log"))?;
        Command::new(bin)
            .arg("-c")
            .arg(dir.join("conf"))
            .arg("--ready-file")
            .arg(dir.join("ready.json"))
            .env("NO_COLOR", "1")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting sp-master")
    }

    /// Waits for the ready file and takes the API's address from it.
    fn wait_ready(&mut self) -> Result<()> {
        let ready = self.dir.join("ready.json");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(text) = fs::read_to_string(&ready)
                && let Ok(v) = serde_json::from_str::<Value>(&text)
                && let Some(api) = v["api"].as_str()
            {
                self.api = api.parse()?;
                return Ok(());
            }
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "sp-master exited ({status}); see {}/master.log",
                    self.dir.display()
                );
            }
            ensure!(Instant::now() < deadline, "sp-master not ready within 60 s");
            sleep(Duration::from_millis(10));
        }
    }

    /// Stops the master as a service manager does (SIGTERM) and starts it again on the same
    /// directories. Returns when the stop was asked, when the old process had exited, and
    /// when the new one was ready.
    fn restart(&mut self) -> Result<(SystemTime, SystemTime, SystemTime)> {
        let asked = SystemTime::now();
        let clean = crate::process::terminate(&mut self.child, Duration::from_secs(30));
        let gone = SystemTime::now();
        ensure!(clean, "sp-master did not stop within 30 s of SIGTERM");
        match fs::remove_file(self.dir.join("ready.json")) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
            _ => {}
        }
        self.child = Self::spawn(&self.bin, &self.dir)?;
        self.wait_ready()?;
        Ok((asked, gone, SystemTime::now()))
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn cpu(&self) -> Result<Duration> {
        cpu_of(self.pid())
    }

    fn vm_kib(&self, field: &str) -> Result<u64> {
        let status = fs::read_to_string(format!("/proc/{}/status", self.pid()))?;
        status
            .lines()
            .find(|l| l.starts_with(field))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("no {field}"))
    }

    /// A histogram's cumulative bucket counts by upper bound (seconds; `+Inf` last), from
    /// `GET /metrics`.
    fn histogram(&self, name: &str) -> Result<Vec<(f64, f64)>> {
        let text = http::get_text(self.api, "/metrics")?;
        let prefix = format!("{name}_bucket{{le=\"");
        let buckets: Vec<(f64, f64)> = text
            .lines()
            .filter_map(|l| {
                let (le, count) = l.strip_prefix(&prefix)?.split_once("\"} ")?;
                let le = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().ok()?
                };
                Some((le, count.parse().ok()?))
            })
            .collect();
        ensure!(!buckets.is_empty(), "no {name} in /metrics");
        Ok(buckets)
    }

    /// The store's commits, the seconds they took and how many took over 50 ms, so far, from
    /// `GET /metrics`.
    fn store_commits(&self) -> Result<(f64, f64, f64)> {
        let text = http::get_text(self.api, "/metrics")?;
        let value = |name: &str| sample(&text, name);
        let count = value("saltpeter_store_commit_seconds_count")?;
        Ok((
            count,
            value("saltpeter_store_commit_seconds_sum")?,
            count - value("saltpeter_store_commit_seconds_bucket{le=\"0.05\"}")?,
        ))
    }

    /// One unlabelled sample (a gauge or counter) from `GET /metrics`.
    fn gauge(&self, name: &str) -> Result<f64> {
        sample(&http::get_text(self.api, "/metrics")?, name)
    }

    fn run_job(&self, job: &str) -> Result<String> {
        let r = http::post(self.api, &format!("/api/v1/jobs/{job}/run"))?;
        ensure!(r.status == 202, "run {job}: HTTP {} {}", r.status, r.body);
        Ok(r.body["instance"]
            .as_str()
            .context("no instance")?
            .to_owned())
    }

    /// Every machine's status, end time and last heartbeat, without the output (the plain
    /// `GET /api/v1/runs/{instance}` embeds every machine's output: ~100 MB at 10,000).
    fn run_status(&self, instance: &str) -> Result<Value> {
        let r = http::get(
            self.api,
            &format!("/api/v1/runs/{instance}/output?max_bytes=1"),
        )?;
        ensure!(
            r.status == 200,
            "run {instance}: HTTP {} {}",
            r.status,
            r.body
        );
        Ok(r.body)
    }

    fn wait_ended(&self, instance: &str, limit: Duration) -> Result<Value> {
        let deadline = Instant::now() + limit;
        loop {
            let view = self.run_status(instance)?;
            if view["ended"].is_string() {
                return Ok(view);
            }
            ensure!(
                Instant::now() < deadline,
                "{instance} did not end within {limit:?}"
            );
            sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for MasterProc {
    fn drop(&mut self) {
        // Only the process we started, by PID.
        crate::process::terminate(&mut self.child, Duration::from_secs(10));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn master_side_ack_percentiles_come_from_bucket_differences() {
        let before = [
            (0.05, 10.0),
            (0.1, 10.0),
            (0.25, 10.0),
            (f64::INFINITY, 10.0),
        ];
        let after = [
            (0.05, 900.0),
            (0.1, 1080.0),
            (0.25, 1110.0),
            (f64::INFINITY, 1110.0),
        ];
        let acks = MasterAcks::between(&before, &after);
        // 1,100 in the window: 890 within 50 ms, 1,070 (97%) within 100 ms, all within 250.
        assert_eq!(acks.p99_bound_ms, 250.0);
        assert!((acks.over_100ms_pct - 30.0 / 1100.0 * 100.0).abs() < 1e-9);
        let after = [
            (0.05, 900.0),
            (0.1, 1099.0),
            (0.25, 1110.0),
            (f64::INFINITY, 1110.0),
        ];
        assert_eq!(MasterAcks::between(&before, &after).p99_bound_ms, 100.0);
    }

    #[test]
    fn rfc3339_to_unix_seconds() {
        assert_eq!(unix_seconds("1970-01-01T00:00:00+00:00"), Some(0.0));
        let t = unix_seconds("2024-02-29T12:34:56.250000+00:00").unwrap_or_default();
        assert!((t - 1_709_210_096.25).abs() < 1e-6, "{t}");
        assert_eq!(unix_seconds("2024-02-29T12:34:56+02:00"), None);
    }
}
