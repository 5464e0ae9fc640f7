//! `cargo xtask bench master --restart`: the master restarted under N connected wrappers.
//!
//! It owns the scenario and its report. One job runs on N simulated wrappers that reconnect
//! as `sp-wrapper` does (its own full-jitter backoff, see [`super::backoff`]); once all have
//! started and sent heartbeats for a while, the master is stopped with SIGTERM and started
//! again on the same directories and machines port. Measured: how long the master was away,
//! how long until every wrapper was attached again (its new `connect` acknowledged), the
//! busiest second of reattaches and of connection attempts, and how many machines the new
//! master judged lost (253), which must be none: a restart is not a lost heartbeat.

use std::fmt::Write as _;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::thread::sleep;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, ensure};

use super::fleet::{Fleet, Kind, Phase, StartFile};
use super::{
    MasterProc, WARM_UP, backoff, command_text, machine_busy, manual_job, own_cpu, wait_started,
};

/// The master's heartbeat timeout, which after a restart runs from the new master's start.
const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(15);
/// The real wrapper's heartbeat interval. It sends one as soon as a new connection is
/// acknowledged; waiting a whole interval past the last reattach is a margin on top.
const HEARTBEAT_EVERY: Duration = Duration::from_secs(5);
/// Added to every wait for a verdict, for the master's monitor and the API round trip.
const MARGIN: Duration = Duration::from_secs(3);

/// One fleet size's figures.
pub struct Row {
    n: usize,
    fanout: Duration,
    /// SIGTERM to the old process's exit, and its exit to the new one's readiness.
    stopping: Duration,
    starting: Duration,
    /// From the new master's readiness to the last reattach, the median, and from SIGTERM.
    all_back: Duration,
    median_back: Duration,
    all_back_from_stop: Duration,
    /// The most reattaches and attempts in any second, and in any 100 ms.
    peak_reattach: (usize, usize),
    peak_attempts: (usize, usize),
    attempts: usize,
    failed_attempts: u64,
    disconnects: u64,
    /// Machines at 253 once the heartbeat timeout had passed for everyone, and at the end.
    lost: usize,
    lost_at_end: usize,
    loadgen_cpu_pct: f64,
    machine_busy_pct: f64,
    errors: u64,
}

impl Row {
    fn line(&self) -> String {
        format!(
            "| {} | {:.2} | {:.2} + {:.2} | {:.2} / {:.2} ({:.2}) | {} ({}) | {} / {} / {} | {} ({}) | {} / {} | {:.0} / {:.0} | {} |",
            self.n,
            self.fanout.as_secs_f64(),
            self.stopping.as_secs_f64(),
            self.starting.as_secs_f64(),
            self.median_back.as_secs_f64(),
            self.all_back.as_secs_f64(),
            self.all_back_from_stop.as_secs_f64(),
            self.peak_reattach.0,
            self.peak_reattach.1,
            self.attempts,
            self.failed_attempts,
            self.disconnects,
            self.peak_attempts.0,
            self.peak_attempts.1,
            self.lost,
            self.lost_at_end,
            self.loadgen_cpu_pct,
            self.machine_busy_pct,
            self.errors,
        )
    }
}

/// The most timestamps in any one second and in any 100 ms, in whole periods from `from`.
fn peaks(times: &[SystemTime], from: SystemTime) -> (usize, usize) {
    (
        peak_in(times, from, Duration::from_secs(1)),
        peak_in(times, from, Duration::from_millis(100)),
    )
}

fn peak_in(times: &[SystemTime], from: SystemTime, period: Duration) -> usize {
    let mut bins: Vec<usize> = Vec::new();
    for t in times {
        let since = t.duration_since(from).unwrap_or_default();
        let at = (since.as_nanos() / period.as_nanos()) as usize;
        if bins.len() <= at {
            bins.resize(at + 1, 0);
        }
        bins[at] += 1;
    }
    bins.into_iter().max().unwrap_or(0)
}

/// A free loopback port for the machines endpoint, kept across the restart.
fn free_port() -> Result<u16> {
    let probe = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(probe.local_addr()?.port())
}

pub fn scenario(bin: &Path, dir: &Path, n: usize, jitter: bool) -> Result<Row> {
    let names: Vec<String> = (0..n).map(|i| format!("m{i:05}")).collect();
    let port = free_port()?;
    let mut master = MasterProc::start_on(
        bin,
        dir,
        &[("jobs.yaml", manual_job("fleet", &names))],
        port,
    )?;
    let mut starts = StartFile::new(master.data.join("bench-starts.jsonl"));
    let mut fleet = Fleet::new()?.reconnecting(jitter);
    let stats = fleet.stats.clone();

    let instance = master.run_job("fleet")?;
    let request = starts.next(Duration::from_secs(60))?;
    ensure!(
        request.instance == instance && request.machines.len() == n,
        "unexpected start request for {} ({} machines)",
        request.instance,
        request.machines.len()
    );
    fleet.launch(&request, |_| Kind::Steady)?;
    let fanout = wait_started(&stats, n, request.written)?;
    eprintln!("  fan-out: {n} started in {:.2} s", fanout.as_secs_f64());
    sleep(WARM_UP);

    let (self0, busy0) = (own_cpu()?, machine_busy()?);
    let (asked, gone, ready) = master.restart()?;
    let stopping = gone.duration_since(asked).unwrap_or_default();
    let starting = ready.duration_since(gone).unwrap_or_default();
    eprintln!(
        "  restart: stopped in {:.2} s, ready {:.2} s later",
        stopping.as_secs_f64(),
        starting.as_secs_f64()
    );

    // Every lost connection is reattached once; the new master must have them all.
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let back = stats.reattached.lock().len() as u64;
        let lost = stats.disconnects.load(Ordering::Relaxed);
        if back >= n as u64 && back == lost {
            break;
        }
        ensure!(
            stats.failed.load(Ordering::Relaxed) == 0,
            "wrappers failed: {:?}",
            stats.errors.lock().clone()
        );
        ensure!(
            Instant::now() < deadline,
            "only {back} of {lost} lost connections reattached within 180 s"
        );
        sleep(Duration::from_millis(5));
    }
    let window = SystemTime::now().duration_since(asked).unwrap_or_default();
    let (self1, busy1) = (own_cpu()?, machine_busy()?);
    let mut back = stats.reattached.lock().clone();
    back.sort_unstable();
    let attempts = stats.reconnect_attempts.lock().clone();
    let last = *back.last().context("no reattach")?;
    let since_ready = |t: SystemTime| t.duration_since(ready).unwrap_or_default();
    let all_back = since_ready(last);
    let median_back = since_ready(back[back.len() / 2]);
    eprintln!(
        "  all {n} reattached {:.2} s after the new master was ready (median {:.2} s)",
        all_back.as_secs_f64(),
        median_back.as_secs_f64()
    );

    // The new master gives every machine a fresh heartbeat deadline when it starts; wait past
    // it, and past an interval after the last reattach.
    let judge_at = (ready + HEARTBEAT_TIMEOUT).max(last + HEARTBEAT_EVERY) + MARGIN;
    if let Ok(wait) = judge_at.duration_since(SystemTime::now()) {
        sleep(wait);
    }
    let lost_count = |view: &serde_json::Value| {
        names
            .iter()
            .filter(|m| view["machines"][m.as_str()]["retcode"].as_i64() == Some(253))
            .count()
    };
    let lost = lost_count(&master.run_status(&instance)?);
    eprintln!("  machines judged lost (253) after the restart: {lost}");

    fleet.set_phase(Phase::Complete);
    let done_by = Instant::now() + Duration::from_secs(120);
    while (stats.completed.load(Ordering::Relaxed) as usize) + lost < n && Instant::now() < done_by
    {
        sleep(Duration::from_millis(20));
    }
    let ended = master.wait_ended(&instance, Duration::from_secs(60))?;
    let lost_at_end = lost_count(&ended);
    let not_zero = names
        .iter()
        .filter(|m| ended["machines"][m.as_str()]["retcode"].as_i64() != Some(0))
        .count();
    ensure!(
        not_zero == lost_at_end,
        "{not_zero} machines ended other than 0 (253: {lost_at_end})"
    );
    fleet.wait_all(Duration::from_secs(10));
    let wall = window.as_secs_f64();
    Ok(Row {
        n,
        fanout,
        stopping,
        starting,
        all_back,
        median_back,
        all_back_from_stop: last.duration_since(asked).unwrap_or_default(),
        peak_reattach: peaks(&back, asked),
        peak_attempts: peaks(&attempts, asked),
        attempts: attempts.len(),
        failed_attempts: stats.reconnect_failures.load(Ordering::Relaxed),
        disconnects: stats.disconnects.load(Ordering::Relaxed),
        lost,
        lost_at_end,
        loadgen_cpu_pct: (self1 - self0).as_secs_f64() / wall * 100.0,
        machine_busy_pct: (busy1 - busy0).as_secs_f64() / wall * 100.0,
        errors: stats.failed.load(Ordering::Relaxed),
    })
}

/// The report's text for PERFORMANCE.md.
pub fn report(heading: &str, sizes: &[usize], jitter: bool, rows: &[Row]) -> String {
    let mut s = String::from(heading);
    let sizes: Vec<String> = sizes.iter().map(usize::to_string).collect();
    let schedule = if jitter {
        format!(
            "`sp-wrapper`'s own backoff (uniform in [0, min({} s, {} s × 2^failures)])",
            backoff::CAP.as_secs(),
            backoff::BASE.as_secs()
        )
    } else {
        String::from(
            "the wrapper's schedule before jitter, for comparison (exactly 1, 2, 4, then 5 s)",
        )
    };
    let _ = writeln!(
        s,
        "`cargo xtask bench master --restart{} --wrappers {}`: release `sp-master` with `launcher: bench`; \
         one job on N simulated wrappers (heartbeat every 5 s, 200 bytes of output every second) that reconnect \
         with {schedule}; after a {} s warm-up \
         the master is stopped with SIGTERM and started again on the same data and machines port.\n",
        if jitter { "" } else { " --no-jitter" },
        sizes.join(","),
        WARM_UP.as_secs(),
    );
    let _ = writeln!(
        s,
        "| wrappers | fan-out s | stop + start s | reattached s after ready: median / all (after SIGTERM) | peak reattaches per s (per 100 ms) | reconnect attempts / failed / connections lost | peak attempts per s (per 100 ms) | 253 after the timeout / at the end | load generator / whole machine CPU % | wrapper errors |"
    );
    let _ = writeln!(s, "|---:|---:|---|---|---:|---|---:|---|---|---:|");
    for row in rows {
        let _ = writeln!(s, "{}", row.line());
    }
    let _ = writeln!(s);
    for row in rows {
        let _ = writeln!(
            s,
            "- {} wrappers: every one attached again {:.2} s after the new master was ready; machines judged lost: {} (target 0: {}).",
            row.n,
            row.all_back.as_secs_f64(),
            row.lost_at_end.max(row.lost),
            if row.lost == 0 && row.lost_at_end == 0 {
                "ok"
            } else {
                "MISSED"
            }
        );
    }
    let _ = writeln!(
        s,
        "\nHow measured: stop + start is SIGTERM to the old process's exit, then its exit to the new \
         master's ready file; a reattach is a simulated wrapper's new `connect` acknowledged (each wrapper \
         loses its connection once and reattaches once); peaks count reattaches and connection attempts \
         (refused, timed out or successful) in whole seconds, and in 100 ms steps, from the SIGTERM; a wrapper's attempt is bounded \
         as `sp-wrapper`'s is (5 s to connect, 10 s for the ack). 253s are read from \
         `GET /api/v1/runs/{{instance}}/output?max_bytes=1` once {} s had passed since the new master was ready \
         and {} s since the last reattach (plus {} s), then again when the run had ended after every wrapper \
         completed. CPU is over the window from the SIGTERM to the last reattach (100% = one core; whole \
         machine = every process plus steal, from /proc/stat).",
        HEARTBEAT_TIMEOUT.as_secs(),
        HEARTBEAT_EVERY.as_secs(),
        MARGIN.as_secs(),
    );
    s
}

/// The heading line of an entry: date, commit, CPU.
pub fn heading(root: &Path) -> String {
    let date = command_text(std::process::Command::new("date").args(["-u", "+%Y-%m-%d %H:%M UTC"]))
        .unwrap_or_else(|_| "unknown date".into());
    super::entry_heading(root, &date)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peaks_count_the_busiest_period() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        // Three in the first 100 ms, five in the second second, one before the start.
        let times = [
            at(0),
            at(50),
            at(99),
            at(1_000),
            at(1_150),
            at(1_300),
            at(1_450),
            at(1_999),
        ];
        assert_eq!(peaks(&times, t0), (5, 3));
        let mut early = times.to_vec();
        early.push(t0 - Duration::from_secs(1));
        assert_eq!(peaks(&early, t0), (5, 4));
        assert_eq!(peaks(&[], t0), (0, 0));
    }
}
