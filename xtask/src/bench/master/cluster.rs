//! `cargo xtask bench master --postgres [--masters M]`: the fleet scenario with its store in a
//! throwaway PostgreSQL, run by one master or shared by several.
//!
//! It owns what the PostgreSQL runs add to the fleet scenario: how the fleet is cut into jobs
//! so that the masters' leases spread it ([`Layout`]), the wait for the cluster to settle
//! ([`wait_split`]), the server's CPU and the database's load over the window ([`DbSample`],
//! [`DbFigures`]), and the report's table.
//!
//! With several masters every job goes to one master by rendezvous hashing of its name
//! against the masters' ids, which are new at every start, so no job list is split evenly
//! by itself. The configuration therefore defines more jobs than run (four times as many),
//! and once the leases have settled each master runs the same number of the jobs it holds:
//! every master carries the same share of the fleet, and the jobs left over are never fired.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::fs;
use std::path::Path;
use std::process::Command;
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use serde_json::Value;

use super::{
    Args, MasterProc, Row, TARGET_P99, TARGET_RSS_KIB, command_text, entry_heading, http,
    manual_job, ms,
};

/// Wrappers per job when several masters share the fleet: enough jobs (20 at 10,000 over two
/// masters) that each master runs several, few enough that every run stays a fleet.
const JOB_WRAPPERS: usize = 500;
/// Jobs defined per job that runs, so that each master holds enough of them.
const POOL: usize = 4;
/// How long the masters' holdings must stay the same before the jobs are fired: longer than
/// one renewal period (3 s), so a pass still moving jobs would have shown.
const SETTLED_FOR: Duration = Duration::from_secs(4);
/// How long the cluster may take to settle: a master joining waits for the others' next pass
/// to release its share, then takes it at its own next pass.
const SETTLE_WITHIN: Duration = Duration::from_secs(90);

/// One job of the fleet scenario and its machines.
pub struct Job {
    pub name: String,
    pub machines: Vec<String>,
}

/// The fleet scenario's jobs, and how many of them each master runs.
pub struct Layout {
    pub jobs: Vec<Job>,
    pub masters: usize,
    pub per_master: usize,
}

impl Layout {
    /// One job of `n` machines for one master (the SQLite scenario's own); for several, `n`
    /// wrappers in jobs of about [`JOB_WRAPPERS`], [`POOL`] times as many defined as run.
    pub fn new(n: usize, masters: usize) -> Result<Self> {
        if masters <= 1 {
            return Ok(Self {
                jobs: vec![Job {
                    name: "fleet".to_owned(),
                    machines: (0..n).map(|i| format!("m{i:05}")).collect(),
                }],
                masters: 1,
                per_master: 1,
            });
        }
        let per_master = n.div_ceil(masters * JOB_WRAPPERS);
        let running = masters * per_master;
        ensure!(
            n.is_multiple_of(running),
            "--wrappers {n} does not split evenly into {running} jobs over {masters} masters"
        );
        let size = n / running;
        let jobs = (0..POOL * running)
            .map(|j| Job {
                name: format!("fleet{j:03}"),
                machines: (0..size).map(|i| format!("f{j:03}m{i:04}")).collect(),
            })
            .collect();
        Ok(Self {
            jobs,
            masters,
            per_master,
        })
    }

    /// The job files every master reads (the same for all of them, as in a real cluster).
    pub fn yaml(&self) -> String {
        self.jobs
            .iter()
            .map(|j| manual_job(&j.name, &j.machines))
            .collect()
    }

    /// The machines of the jobs `plan` runs.
    pub fn running<'a>(&'a self, plan: &'a [Vec<usize>]) -> impl Iterator<Item = &'a str> + 'a {
        plan.iter()
            .flatten()
            .flat_map(|j| self.jobs[*j].machines.iter().map(String::as_str))
    }
}

/// `GET /api/v1/cluster` of a master.
fn cluster_of(master: &MasterProc) -> Result<Value> {
    let r = http::get(master.api, "/api/v1/cluster")?;
    ensure!(r.status == 200, "cluster: HTTP {} {}", r.status, r.body);
    Ok(r.body)
}

/// The jobs each master holds and has loaded, if every master sees all of them live, no job
/// is held twice, every job is held, and each master holds at least `layout.per_master`.
fn settled(views: &[Value], layout: &Layout) -> Option<Vec<Vec<String>>> {
    let mut held = Vec::new();
    let mut all = BTreeSet::new();
    for view in views {
        if view["masters"].as_array().map(Vec::len) != Some(views.len()) {
            return None;
        }
        let mine: Vec<String> = view["held"]
            .as_array()?
            .iter()
            .filter_map(|j| j.as_str().map(str::to_owned))
            .collect();
        if mine.len() < layout.per_master {
            return None;
        }
        for job in &mine {
            if !all.insert(job.clone()) {
                return None;
            }
        }
        held.push(mine);
    }
    (all.len() == layout.jobs.len()).then_some(held)
}

/// Waits until the masters' leases have settled (see [`settled`]) and stayed so for
/// [`SETTLED_FOR`]; returns, per master, the jobs (indices into `layout.jobs`) it is to run:
/// the first `per_master` of those it holds.
pub fn wait_split(masters: &[MasterProc], layout: &Layout) -> Result<Vec<Vec<usize>>> {
    let deadline = Instant::now() + SETTLE_WITHIN;
    let mut last: Option<(Vec<Vec<String>>, Instant)> = None;
    loop {
        let views: Result<Vec<Value>> = masters.iter().map(cluster_of).collect();
        let now = views.ok().and_then(|v| settled(&v, layout));
        match (now, &last) {
            (Some(held), Some((before, since)))
                if *before == held && since.elapsed() >= SETTLED_FOR =>
            {
                let counts: Vec<String> = held.iter().map(|h| h.len().to_string()).collect();
                eprintln!(
                    "  cluster: {} master(s) hold {} of {} jobs; each runs {} of {} wrappers",
                    masters.len(),
                    counts.join(" and "),
                    layout.jobs.len(),
                    layout.per_master,
                    layout.jobs[0].machines.len(),
                );
                return held
                    .iter()
                    .map(|jobs| {
                        jobs.iter()
                            .take(layout.per_master)
                            .map(|name| {
                                layout
                                    .jobs
                                    .iter()
                                    .position(|j| j.name == *name)
                                    .with_context(|| format!("a master holds {name}"))
                            })
                            .collect()
                    })
                    .collect();
            }
            (Some(held), Some((before, _))) if *before == held => {}
            (Some(held), _) => last = Some((held, Instant::now())),
            (None, _) => last = None,
        }
        ensure!(
            Instant::now() < deadline,
            "the masters' leases did not settle within {SETTLE_WITHIN:?}"
        );
        sleep(Duration::from_millis(250));
    }
}

/// The database's counters and the server's CPU at one instant.
#[derive(Clone, Debug)]
pub struct DbSample {
    at: Instant,
    /// xact_commit, tup_inserted, tup_updated, tup_deleted, blks_hit, blks_read of the bench
    /// database, and wal_bytes of the whole server.
    counters: [f64; 7],
    cpu: Duration,
    version: String,
}

impl DbSample {
    pub fn take(pg: &crate::postgres::Postgres) -> Result<Self> {
        let cpu = server_cpu(pg.pid())?;
        let text = pg.query(&format!(
            "SELECT d.xact_commit, d.tup_inserted, d.tup_updated, d.tup_deleted, d.blks_hit, \
             d.blks_read, w.wal_bytes, current_setting('server_version') \
             FROM pg_stat_database d, pg_stat_wal w WHERE d.datname = '{}'",
            pg.database()
        ))?;
        // The version comes last: it may hold spaces ("15.18 (Debian ...)").
        let fields: Vec<&str> = text.splitn(8, ' ').collect();
        ensure!(fields.len() == 8, "pg_stat_database: {text:?}");
        let mut counters = [0.0; 7];
        for (c, f) in counters.iter_mut().zip(&fields) {
            *c = f
                .parse()
                .with_context(|| format!("pg_stat_database: {text:?}"))?;
        }
        Ok(Self {
            at: Instant::now(),
            counters,
            cpu,
            version: fields[7].split(' ').next().unwrap_or_default().to_owned(),
        })
    }
}

/// The server's CPU and the database's load between two samples, per second.
#[derive(Clone, Debug)]
pub struct DbFigures {
    pub cpu_pct: f64,
    pub commits: f64,
    pub inserted: f64,
    pub updated: f64,
    pub deleted: f64,
    pub blks_hit: f64,
    pub blks_read: f64,
    pub wal_mb: f64,
    pub version: String,
}

impl DbFigures {
    pub fn between(a: &DbSample, b: &DbSample) -> Result<Self> {
        let wall = b.at.duration_since(a.at).as_secs_f64();
        ensure!(wall > 0.0, "no time between the database samples");
        let rate = |i: usize| (b.counters[i] - a.counters[i]) / wall;
        Ok(Self {
            cpu_pct: b.cpu.saturating_sub(a.cpu).as_secs_f64() / wall * 100.0,
            commits: rate(0),
            inserted: rate(1),
            updated: rate(2),
            deleted: rate(3),
            blks_hit: rate(4),
            blks_read: rate(5),
            wal_mb: rate(6) / 1e6,
            version: b.version.clone(),
        })
    }

    /// One line for the console.
    pub fn summary(&self, master_cpu: &[f64]) -> String {
        format!(
            "PostgreSQL {}: server CPU {:.1}% (masters {}), {:.0} commits/s, rows {:.0} inserted/s, \
             {:.0} updated/s, {:.0} deleted/s, blocks {:.0} hit/s, {:.0} read/s, WAL {:.1} MB/s",
            self.version,
            self.cpu_pct,
            each(master_cpu.iter().map(|c| format!("{c:.1}%"))),
            self.commits,
            self.inserted,
            self.updated,
            self.deleted,
            self.blks_hit,
            self.blks_read,
            self.wal_mb,
        )
    }
}

/// CPU time of the PostgreSQL server: the postmaster, every process it forked that still runs
/// (backends, the checkpointer, the WAL writer...), and through the postmaster's cutime and
/// cstime every one that has exited, since the postmaster reaps them all.
pub fn server_cpu(postmaster: u32) -> Result<Duration> {
    let (_, own, reaped) = proc_stat(postmaster)?;
    let mut ticks = own + reaped;
    for entry in fs::read_dir("/proc")?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        // A process may be gone between the listing and the read.
        if let Ok((parent, own, reaped)) = proc_stat(pid)
            && parent == postmaster
        {
            ticks += own + reaped;
        }
    }
    // USER_HZ is 100 on every Linux architecture.
    Ok(Duration::from_millis(ticks * 10))
}

/// A process's parent, its own CPU ticks (utime + stime) and those of its reaped children
/// (cutime + cstime), from /proc/<pid>/stat.
fn proc_stat(pid: u32) -> Result<(u32, u64, u64)> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after = stat.rfind(')').context("odd /proc stat")? + 2;
    let fields: Vec<&str> = stat
        .get(after..)
        .context("odd /proc stat")?
        .split(' ')
        .collect();
    let field = |i: usize| -> Result<u64> {
        Ok(fields
            .get(i)
            .with_context(|| format!("/proc/{pid}/stat: field {i}"))?
            .parse()?)
    };
    Ok((
        u32::try_from(field(1)?)?,
        field(11)? + field(12)?,
        field(13)? + field(14)?,
    ))
}

/// Values joined as the report shows one figure per master.
fn each(values: impl Iterator<Item = String>) -> String {
    values.collect::<Vec<_>>().join(" + ")
}

/// A PostgreSQL row of the report's table.
pub fn line(row: &Row) -> String {
    let db = row.postgres.as_ref();
    let per_master = row.masters.first().map_or(0, |m| m.jobs);
    let job_size = row
        .masters
        .first()
        .map_or(0, |m| m.wrappers / m.jobs.max(1));
    format!(
        "| {} | {} × {} of {} | {} | {:.1} | {} | {:.0} / {:.0} | {:.1} / {:.1} / {:.1} | {} / {:.2}; {} / {:.2} | {:.1} / {:.1} / {} | {:.0} | {:.0} / {:.0} / {:.0} | {:.0} / {:.0} | {:.1} | {:.2} (+{:.3}) | {}/{} in [{:.2}, {:.2}] s | {} | {:.1} | {:.0} |",
        row.n,
        row.masters.len(),
        per_master,
        job_size,
        each(row.masters.iter().map(|m| format!("{:.1}", m.cpu_pct))),
        db.map_or(f64::NAN, |d| d.cpu_pct),
        each(row.masters.iter().map(|m| (m.hwm_kib / 1024).to_string())),
        row.msgs_in,
        row.msgs_out,
        ms(row.p50),
        ms(row.p99),
        ms(row.max),
        row.master_acks.p99_bound_ms,
        row.master_acks.over_100ms_pct,
        row.master_written.p99_bound_ms,
        row.master_written.over_100ms_pct,
        row.commits_per_s,
        row.commit_ms,
        row.slow_commits,
        db.map_or(f64::NAN, |d| d.commits),
        db.map_or(f64::NAN, |d| d.inserted),
        db.map_or(f64::NAN, |d| d.updated),
        db.map_or(f64::NAN, |d| d.deleted),
        db.map_or(f64::NAN, |d| d.blks_hit),
        db.map_or(f64::NAN, |d| d.blks_read),
        db.map_or(f64::NAN, |d| d.wal_mb),
        row.fanout.as_secs_f64(),
        row.launcher.as_secs_f64(),
        row.verdicts_ok,
        row.stopped,
        row.verdict_delay.0,
        row.verdict_delay.1,
        row.false_verdicts,
        row.loadgen_cpu_pct,
        row.other_cpu_pct,
    )
}

/// The report of `--postgres` runs.
pub fn report(root: &Path, args: &Args, rows: &[Row]) -> Result<String> {
    let verdict = |ok: bool| if ok { "ok" } else { "MISSED" };
    let date = command_text(Command::new("date").args(["-u", "+%Y-%m-%d %H:%M UTC"]))
        .unwrap_or_else(|_| "unknown date".into());
    let version = rows
        .iter()
        .find_map(|r| r.postgres.as_ref().map(|d| d.version.clone()))
        .unwrap_or_else(|| "?".into());
    let mut s = entry_heading(root, &date);
    let _ = writeln!(
        s,
        "`cargo xtask bench master --wrappers {} --seconds {}{} --postgres{}`: release `sp-master` with `launcher: bench` and \
         `store:` a throwaway PostgreSQL {version} on loopback started by xtask (`fsync`, `synchronous_commit` and `full_page_writes` off, \
         as for the tests), {}; each wrapper heartbeats every 5 s and sends 200 bytes of output every second; {} s steady state after a 5 s warm-up.\n",
        args.sizes
            .iter()
            .map(usize::to_string)
            .collect::<Vec<_>>()
            .join(","),
        args.seconds,
        if args.tls { " --tls" } else { "" },
        if args.masters > 1 {
            format!(" --masters {}", args.masters)
        } else {
            String::new()
        },
        if args.masters > 1 {
            format!(
                "{} masters on that database, each running an equal share of the fleet's jobs, the ones its leases gave it, \
                 each job fired through its holder and each wrapper connected to the master that launched it",
                args.masters
            )
        } else {
            "one master, one job on every wrapper as in the SQLite entries".to_owned()
        },
        args.seconds
    );
    let _ = writeln!(
        s,
        "| wrappers | masters × jobs of wrappers | master CPU % of a core, each | PostgreSQL CPU % of a core | peak RSS MiB, each | msgs/s in / out | ack ms p50 / p99 / max | master-side ack p99 ≤ ms / % over 100 ms, queued; written | store commits/s / mean ms / over 50 ms | DB commits/s | DB rows inserted / updated / deleted per s | DB blocks hit / read per s | WAL MB/s | fan-out s (+launcher) | 253 verdicts in window | false verdicts | load generator CPU % | rest of machine CPU % |"
    );
    let _ = writeln!(
        s,
        "|---:|---|---|---:|---|---|---|---|---|---:|---|---|---:|---|---|---:|---:|---:|"
    );
    for row in rows {
        let _ = writeln!(s, "{}", line(row));
    }
    let _ = writeln!(s);
    for row in rows {
        let _ = writeln!(
            s,
            "- {} wrappers: p99 {:.1} ms (target < {} ms: {}), largest RSS {} MiB (target < 1 GiB: {}), false verdicts {} (target 0: {}); {} latency samples; {} wrapper errors; as the load generator's tasks saw the acks, p99 {:.1} ms, with its own timers firing up to {:.1} ms late (p99); masters, PostgreSQL and load generator together {:.0}% of the machine's {}%.",
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
            row.cpu_pct + row.postgres.as_ref().map_or(0.0, |d| d.cpu_pct) + row.loadgen_cpu_pct,
            std::thread::available_parallelism().map_or(1, usize::from) * 100,
        );
    }
    let _ = writeln!(
        s,
        "\nHow measured: as in the SQLite entries (ack latency to the kernel's receive time of the ack, master-side histograms, fan-out, verdicts), with these differences. \
         Each master's CPU is utime+stime from /proc/<pid>/stat over the window (100% = one core), its peak RSS its VmHWM at the end. \
         PostgreSQL's CPU is that of the postmaster and every process it forked, the live ones from their own /proc/<pid>/stat and those that exited through the postmaster's cutime+cstime. \
         DB figures are the deltas of `pg_stat_database` for the bench database (xact_commit; tup_inserted, tup_updated, tup_deleted; blks_hit, blks_read) and of \
         `pg_stat_wal.wal_bytes` over the window, per second (backends report their counters about once a second, so the edges of the window are blurred by that much). \
         Store commits, master-side ack histograms and msgs/s are summed over the masters (each covers its own wrappers). \
         With several masters the configuration defines {POOL} times as many jobs as run, of {JOB_WRAPPERS} wrappers or fewer each, and each master runs the same number of those its leases gave it once the holdings have stayed the same for {} s, \
         since rendezvous hashing over masters' ids that change at every start splits a handful of jobs unevenly. \
         'rest of machine' is every process but the masters, PostgreSQL and the load generator, plus steal time, from /proc/stat.",
        SETTLED_FOR.as_secs()
    );
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_master_keeps_the_sqlite_scenarios_job() {
        let l = Layout::new(1000, 1).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(l.jobs.len(), 1);
        assert_eq!(l.jobs[0].name, "fleet");
        assert_eq!(l.jobs[0].machines.len(), 1000);
        assert_eq!(l.jobs[0].machines[999], "m00999");
    }

    #[test]
    fn several_masters_get_equal_jobs_from_a_larger_pool() {
        let l = Layout::new(10_000, 2).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(l.per_master, 10);
        assert_eq!(l.jobs.len(), POOL * 20);
        assert!(l.jobs.iter().all(|j| j.machines.len() == 500));
        let plan = vec![vec![0, 1], vec![5]];
        assert_eq!(l.running(&plan).count(), 1500);
        assert!(Layout::new(1001, 2).is_err());
    }

    #[test]
    fn holdings_settle_only_when_every_job_is_held_once_and_shared() {
        let l = Layout::new(1000, 2).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(l.per_master, 1);
        let names: Vec<String> = l.jobs.iter().map(|j| j.name.clone()).collect();
        let view = |held: &[String]| serde_json::json!({ "masters": [{}, {}], "held": held });
        // The first master still holds everything while the second has joined.
        assert!(settled(&[view(&names), view(&[])], &l).is_none());
        let (a, b) = names.split_at(3);
        let got = settled(&[view(a), view(b)], &l);
        assert_eq!(got, Some(vec![a.to_vec(), b.to_vec()]));
        // A job held twice, or one master not yet seeing the other.
        assert!(settled(&[view(&names[..4]), view(&names[3..])], &l).is_none());
        let alone = serde_json::json!({ "masters": [{}], "held": a });
        assert!(settled(&[alone, view(b)], &l).is_none());
    }
}
