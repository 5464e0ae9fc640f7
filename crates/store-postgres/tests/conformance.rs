//! One suite of store behaviour, run against both backends: SQLite (a file in a temporary
//! directory) and PostgreSQL (a schema of its own per case in the server named by
//! `SALTPETER_TEST_POSTGRES`). Whatever the engine and the API rely on (restore after a
//! restart, output appended and read back, retention of output, runs and audit entries, history
//! pages, the timeline, a takeover of one job's unfinished runs) must hold for both;
//! [`backend_suite`] takes a way to make a fresh store and runs every case on it. Two more
//! tests hand a job back and forth between two PostgreSQL backends on one database, as two
//! masters do; a SQLite store has one master, so they have no SQLite twin.
//!
//! Without `SALTPETER_TEST_POSTGRES` the PostgreSQL run skips with a message, except under CI,
//! where it fails.

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

use saltpeter_store::audit::{Action, Actor, AuditEntry, AuditRecord};
use saltpeter_store::{
    AttemptRecord, Backend, JobRecord, MachineRecord, MachineStatus, MissedReason, MissedRecord,
    Notice, OutputRange, Query, Restored, Retention, RunRecord, RunSummary, Store, StoreOp,
    TimelineEntry, TimelineQuery,
};
use saltpeter_store_postgres::{Database, PgBackend, PostgresUrl};
use time::OffsetDateTime;
use time::macros::datetime;
use tokio::sync::oneshot;

const URL_ENV: &str = "SALTPETER_TEST_POSTGRES";

/// Opens the store of one case (again, for a restart) with a retention policy.
type Opener = dyn Fn(Retention) -> (Box<dyn Backend>, Restored);
type Open<'a> = &'a Opener;
/// A case of the suite.
type Case = fn(Open<'_>);

/// A fresh, empty store: how to open it, and what to keep alive (and clean up) until the case
/// is over.
struct Fresh {
    open: Box<Opener>,
    _cleanup: Box<dyn std::any::Any>,
}

/// Every case, each on a store of its own from `make`.
fn backend_suite(make: impl Fn(&str) -> Fresh) {
    let cases: [(&str, Case); 14] = [
        ("restore", an_unfinished_run_comes_back_after_a_reopen),
        (
            "retention",
            retention_keeps_head_and_tail_and_counts_what_it_dropped,
        ),
        (
            "output",
            output_continues_after_a_restart_neither_lost_nor_doubled,
        ),
        (
            "same_batch",
            totals_are_kept_when_the_last_output_and_the_end_share_a_batch,
        ),
        (
            "interleaved",
            interleaved_outputs_of_many_machines_in_one_batch_each_land_in_order,
        ),
        ("results", results_and_job_state_come_back_as_written),
        ("prune", old_runs_are_pruned_per_job),
        ("pages", history_pages_follow_each_other),
        (
            "timeline",
            the_timeline_comes_from_the_store_oldest_first_within_the_window,
        ),
        ("audit", the_audit_trail_pages_newest_first_and_ages),
        (
            "bad_op",
            an_op_the_database_refuses_does_not_take_its_batch_with_it,
        ),
        (
            "recovery",
            missed_slots_and_replaced_attempts_are_history_and_come_back,
        ),
        (
            "takeover",
            a_takeover_returns_only_the_jobs_unfinished_runs_as_written,
        ),
        ("takeover_output", output_continues_after_a_takeover),
    ];
    for (name, case) in cases {
        let fresh = make(name);
        eprintln!("case {name}");
        case(&*fresh.open);
    }
}

#[test]
fn sqlite_conforms() {
    backend_suite(|_| {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_owned();
        Fresh {
            open: Box::new(move |retention| {
                let (db, restored) = Store::open(&path, retention).unwrap();
                (Box::new(db), restored)
            }),
            _cleanup: Box::new(dir),
        }
    });
}

#[test]
fn postgres_conforms() {
    let Some(url) = postgres_url() else { return };
    backend_suite(|case| {
        let schema = format!("conf_{case}_{}_{}", std::process::id(), nonce());
        let scoped = Schema::create(&url, &schema);
        let sep = if url.contains('?') { '&' } else { '?' };
        let scoped_url =
            PostgresUrl::parse(&format!("{url}{sep}options=-c%20search_path%3D{schema}")).unwrap();
        Fresh {
            open: Box::new(move |retention| {
                let (db, restored) = PgBackend::open(&scoped_url, retention).unwrap();
                (Box::new(db), restored)
            }),
            _cleanup: Box::new(scoped),
        }
    });
}

/// A start-up that fails after the store opened drops the backend inside the master's async
/// main; that must end the backend's runtime quietly, not panic.
#[test]
fn a_backend_dropped_inside_an_async_context_ends_quietly() {
    let Some(url) = postgres_url() else { return };
    let schema = format!("conf_drop_{}_{}", std::process::id(), nonce());
    let _scoped = Schema::create(&url, &schema);
    let sep = if url.contains('?') { '&' } else { '?' };
    let scoped_url =
        PostgresUrl::parse(&format!("{url}{sep}options=-c%20search_path%3D{schema}")).unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let (db, _) = PgBackend::open(&scoped_url, Retention::default()).unwrap();
        drop(db);
    });
}

/// A schema of its own for one test, and the URL that works in it.
fn scoped(url: &str, test: &str) -> (Schema, PostgresUrl) {
    let schema = format!("conf_{test}_{}_{}", std::process::id(), nonce());
    let scoped = Schema::create(url, &schema);
    let sep = if url.contains('?') { '&' } else { '?' };
    let scoped_url =
        PostgresUrl::parse(&format!("{url}{sep}options=-c%20search_path%3D{schema}")).unwrap();
    (scoped, scoped_url)
}

/// Writes output lines `seqs` of machine m1 of `instance`, one batch each (as wrappers send
/// them), and appends them to `expected`; returns whether every batch's notice came back.
fn write_lines(
    db: &mut dyn Backend,
    instance: &str,
    seqs: std::ops::Range<u64>,
    expected: &mut String,
) -> bool {
    let mut acked = true;
    for seq in seqs {
        let text = format!("line {seq}\n");
        expected.push_str(&text);
        let notices = db.apply(vec![
            output(instance, "m1", seq, &text),
            StoreOp::Notify(Notice::Output {
                instance: instance.into(),
                machine: "m1".into(),
                seq: Some(seq),
                conn: 1,
                received: None,
            }),
        ]);
        acked &= notices.len() == 1;
    }
    acked
}

/// Two masters on one database hand a job back and forth under its lease: after a takeover the
/// new holder's output continues exactly after what the previous holder committed, its writes
/// for the taken-over run carry its fence, and a holder cut off from the job writes nothing.
#[test]
fn postgres_output_continues_across_masters_that_take_a_job_over() {
    use saltpeter_store_postgres::Fence;
    use std::collections::HashMap;
    use std::sync::Arc;

    let Some(url) = postgres_url() else { return };
    let (_scoped, url) = scoped(&url, "handover");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    // Each master's current fence on job `j`, as its lease coordination would hand it over.
    let fences: Arc<parking_lot::Mutex<HashMap<&str, Fence>>> = Arc::default();
    let hook = |master: &'static str| {
        let fences = fences.clone();
        Arc::new(move |job: &str| {
            (job == "j")
                .then(|| fences.lock().get(master).cloned())
                .flatten()
        })
    };
    // b opens while the database is empty, so only the takeover tells it about the run.
    let (a, _) = PgBackend::open(&url, Retention::default()).unwrap();
    let (b, _) = PgBackend::open(&url, Retention::default()).unwrap();
    let mut a = a.with_fences(hook("a"));
    let mut b = b.with_fences(hook("b"));
    let db = runtime.block_on(Database::connect(&url, 1)).unwrap();
    let ttl = std::time::Duration::from_secs(60);
    let hand_to = |from: &str, to: &'static str| {
        if !from.is_empty() {
            assert!(runtime.block_on(db.release("j", from)).unwrap());
        }
        let lease = runtime
            .block_on(db.acquire_or_renew("j", to, ttl))
            .unwrap()
            .unwrap();
        fences.lock().insert(to, lease.fence());
    };

    hand_to("", "a");
    let mut expected = String::new();
    a.apply(vec![
        StoreOp::Run(run("j_1", false)),
        StoreOp::Machine(machine("j_1", "m1")),
        StoreOp::Run(run_of("k", "k_1")),
        StoreOp::Machine(machine("k_1", "m1")),
        output("k_1", "m1", 0, "k0\n"),
    ]);
    assert!(write_lines(&mut a, "j_1", 0..3, &mut expected));

    // b takes the job over from a, which is cut off and learns nothing.
    hand_to("a", "b");
    let restored = takeover(&mut b, "j");
    let runs: Vec<&str> = restored
        .runs
        .iter()
        .map(|(r, _)| r.instance.as_str())
        .collect();
    assert_eq!(runs, ["j_1"]);
    let m = &restored.runs[0].1[0];
    assert_eq!((m.next_seq, m.output.text()), (3, expected.clone()));
    assert!(write_lines(&mut b, "j_1", 3..6, &mut expected));
    assert!(
        !write_lines(&mut a, "j_1", 3..4, &mut String::new()),
        "a's lease is gone: nothing of it is stored or acked"
    );

    // And back to a, which counted this machine's output before: the takeover alone must set
    // that right. b is cut off in turn, its fence stale.
    hand_to("b", "a");
    let restored = takeover(&mut a, "j");
    let m = &restored.runs[0].1[0];
    assert_eq!((m.next_seq, m.output.text()), (6, expected.clone()));
    assert!(write_lines(&mut a, "j_1", 6..9, &mut expected));
    assert!(
        !write_lines(&mut b, "j_1", 6..7, &mut String::new()),
        "b's writes for the run it took over carry its fence, which is stale now"
    );
    // The takeover left a's other job as it was.
    a.apply(vec![output("k_1", "m1", 1, "k1\n")]);

    for db in [&mut a, &mut b] {
        let range = range_of(db, "j_1", "m1", 0, None);
        assert_eq!(range.total_bytes, expected.len() as u64);
        assert_eq!(range.text, expected);
        assert_eq!(range_of(db, "k_1", "m1", 0, None).text, "k0\nk1\n");
    }
    let m = &takeover(&mut b, "j").runs[0].1[0];
    assert_eq!((m.next_seq, m.output.text()), (9, expected));
}

/// Output bookkeeping left stale by another master's writes must not be used: with a small
/// retention, the chunks a stale writer would number and trim are gone already, so nothing
/// in the database refuses its writes. After a takeover, or after forgetting the job, a
/// master's output must be stored exactly as one master writing it all would have stored it.
#[test]
fn postgres_retention_counts_from_what_the_previous_holder_kept() {
    let Some(url) = postgres_url() else { return };
    let (_scoped, url) = scoped(&url, "handover_retention");
    // Each line is 7 bytes: the first fills the head, and the tail keeps one line.
    let retention = Retention {
        head_bytes: 7,
        tail_bytes: 8,
        ..Retention::default()
    };
    let (mut a, _) = PgBackend::open(&url, retention).unwrap();
    a.apply(vec![
        StoreOp::Run(run("j_1", false)),
        StoreOp::Machine(machine("j_1", "m1")),
        // The same lines from one master that never hands its job over, to compare with.
        StoreOp::Run(run_of("r", "r_1")),
        StoreOp::Machine(machine("r_1", "m1")),
    ]);
    let (mut b, _) = PgBackend::open(&url, retention).unwrap();
    let mut expected = String::new();
    write_lines(&mut a, "j_1", 0..3, &mut expected);
    // b takes the job over from a cut-off a; later a takes it back, told nothing in between.
    takeover(&mut b, "j");
    write_lines(&mut b, "j_1", 3..6, &mut expected);
    b.apply(vec![StoreOp::ForgetJob("j".into())]);
    takeover(&mut a, "j");
    write_lines(&mut a, "j_1", 6..9, &mut expected);
    // b forgot the job: even a write it makes without taking the job over again counts from
    // what the database holds, not from what b counted before.
    write_lines(&mut b, "j_1", 9..10, &mut expected);
    write_lines(&mut a, "r_1", 0..10, &mut String::new());

    for db in [&mut a, &mut b] {
        let got = range_of(db, "j_1", "m1", 0, None);
        let want = range_of(db, "r_1", "m1", 0, None);
        assert_eq!(
            (got.text, got.total_bytes, got.dropped_bytes),
            (want.text, want.total_bytes, want.dropped_bytes)
        );
    }
    let want = range_of(&mut a, "r_1", "m1", 0, None);
    assert_eq!(want.total_bytes, expected.len() as u64);
    assert_eq!(
        want.text,
        "line 0\n\n[... 56 bytes dropped by retention ...]\nline 9\n"
    );
}

/// The server's URL, `None` (after saying so) when there is none and CI is not set.
fn postgres_url() -> Option<String> {
    match std::env::var(URL_ENV) {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            let ci = std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false");
            assert!(
                !ci,
                "CI is set but {URL_ENV} is not: `cargo xtask ci` starts PostgreSQL and sets it"
            );
            eprintln!("skipped: {URL_ENV} is not set (start one with `cargo xtask postgres`)");
            None
        }
    }
}

/// A few random hex digits, so that two runs of the suite never share a schema.
fn nonce() -> String {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    format!("{:x}", t.subsec_nanos())
}

/// A schema of one case, dropped with everything in it when the case is over.
struct Schema {
    url: String,
    name: String,
}

impl Schema {
    fn create(url: &str, name: &str) -> Schema {
        admin(url, &format!("CREATE SCHEMA {name}"));
        Schema {
            url: url.to_owned(),
            name: name.to_owned(),
        }
    }
}

impl Drop for Schema {
    fn drop(&mut self) {
        admin(
            &self.url,
            &format!("DROP SCHEMA IF EXISTS {} CASCADE", self.name),
        );
    }
}

fn admin(url: &str, sql: &str) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let db = Database::connect(&PostgresUrl::parse(url).unwrap(), 1)
            .await
            .unwrap();
        db.client().await.unwrap().batch_execute(sql).await.unwrap();
    });
}

// ---- The records the cases write ----

/// A day before the suite started: inside the default 30-day retention, which a store applies
/// on its own. Fixed once, so two calls in a case never straddle a second.
fn recent() -> OffsetDateTime {
    static AT: std::sync::OnceLock<OffsetDateTime> = std::sync::OnceLock::new();
    *AT.get_or_init(|| {
        let now = OffsetDateTime::now_utc() - time::Duration::days(1);
        now.replace_nanosecond(0).unwrap()
    })
}

fn run(instance: &str, ended: bool) -> RunRecord {
    RunRecord {
        instance: instance.into(),
        job: "j".into(),
        group: "g".into(),
        started: recent(),
        ended: ended.then_some(recent() + time::Duration::minutes(1)),
        success: ended.then_some(true),
        killed: false,
        token: "secret".into(),
        identity: "salt_key".into(),
        resolving: false,
        maintenance: vec!["m9".into()],
        pending_batches: vec![vec!["m3".into()]],
    }
}

fn machine(instance: &str, name: &str) -> MachineRecord {
    MachineRecord {
        instance: instance.into(),
        machine: name.into(),
        status: MachineStatus::Running,
        retcode: None,
        cause: None,
        late_retcode: None,
        starttime: Some(datetime!(2026-01-01 00:00:01 UTC)),
        endtime: None,
        last_heartbeat: None,
        wrapper_version: Some("1.0".into()),
        pid: Some(42),
        wrapper_pid: Some(41),
        launched: true,
        started: true,
        kill_requested: true,
        launch_problem: None,
        modern: true,
        authenticated: true,
    }
}

fn output(instance: &str, name: &str, seq: u64, data: &str) -> StoreOp {
    StoreOp::Output {
        instance: instance.into(),
        machine: name.into(),
        seq: Some(seq),
        data: data.into(),
    }
}

fn range_of(
    db: &mut dyn Backend,
    instance: &str,
    machine: &str,
    offset: u64,
    length: Option<u64>,
) -> OutputRange {
    let (tx, mut rx) = oneshot::channel();
    db.apply(vec![StoreOp::Query(Query::Output {
        instance: instance.into(),
        machine: machine.into(),
        offset,
        length,
        reply: tx,
    })]);
    rx.try_recv().unwrap().unwrap().unwrap()
}

fn takeover(db: &mut dyn Backend, job: &str) -> Restored {
    let (tx, mut rx) = oneshot::channel();
    db.apply(vec![StoreOp::Query(Query::Takeover {
        job: job.into(),
        reply: tx,
    })]);
    rx.try_recv().unwrap().unwrap()
}

fn runs_page(db: &mut dyn Backend, before: Option<String>, limit: usize) -> Vec<RunSummary> {
    let (tx, mut rx) = oneshot::channel();
    db.apply(vec![StoreOp::Query(Query::Runs {
        job: "j".into(),
        before,
        limit,
        reply: tx,
    })]);
    rx.try_recv().unwrap().unwrap()
}

fn audit_page(db: &mut dyn Backend, before: Option<i64>, limit: usize) -> Vec<AuditEntry> {
    let (tx, mut rx) = oneshot::channel();
    db.apply(vec![StoreOp::Query(Query::Audit {
        before,
        limit,
        reply: tx,
    })]);
    rx.try_recv().unwrap().unwrap()
}

// ---- The cases ----

fn an_unfinished_run_comes_back_after_a_reopen(open: Open<'_>) {
    {
        let (mut db, restored) = open(Retention::default());
        assert!(restored.runs.is_empty());
        let notices = db.apply(vec![
            StoreOp::Run(run("j_1", false)),
            StoreOp::Run(run("j_0", true)),
            StoreOp::Machine(machine("j_1", "m1")),
            output("j_1", "m1", 0, "one\n"),
            output("j_1", "m1", 1, "two é\n"),
            StoreOp::Job(JobRecord {
                name: "j".into(),
                last_fired: Some(datetime!(2026-01-01 00:00 UTC)),
                ..JobRecord::default()
            }),
            StoreOp::Notify(Notice::Output {
                instance: "j_1".into(),
                machine: "m1".into(),
                seq: Some(1),
                conn: 7,
                received: None,
            }),
        ]);
        assert_eq!(notices.len(), 1, "the notice comes back once committed");
    }
    let (_db, restored) = open(Retention::default());
    assert_eq!(restored.runs.len(), 1, "finished runs are not restored");
    let (r, machines) = &restored.runs[0];
    assert_eq!(r.instance, "j_1");
    assert_eq!(r.started, recent());
    assert_eq!(r.token, "secret");
    assert_eq!(r.identity, "salt_key");
    assert_eq!(r.maintenance, ["m9"]);
    assert_eq!(r.pending_batches, [vec!["m3".to_owned()]]);
    assert_eq!(machines.len(), 1);
    let m = &machines[0];
    assert_eq!(m.next_seq, 2);
    assert_eq!(m.output.text(), "one\ntwo é\n");
    assert!(m.record.kill_requested && m.record.started && m.record.modern);
    assert!(m.record.authenticated);
    assert_eq!((m.record.pid, m.record.wrapper_pid), (Some(42), Some(41)));
    assert_eq!(m.record.starttime, Some(datetime!(2026-01-01 00:00:01 UTC)));
    assert_eq!(
        restored.jobs[0].last_fired,
        Some(datetime!(2026-01-01 00:00 UTC))
    );
}

fn retention_keeps_head_and_tail_and_counts_what_it_dropped(open: Open<'_>) {
    let retention = Retention {
        head_bytes: 6,
        tail_bytes: 8,
        ..Retention::default()
    };
    {
        let (mut db, _) = open(retention);
        let mut ops = vec![
            StoreOp::Run(run("j_1", false)),
            StoreOp::Machine(machine("j_1", "m1")),
        ];
        for (i, chunk) in ["head1\n", "aaaa", "bbbb", "cccc", "dddd"]
            .iter()
            .enumerate()
        {
            ops.push(output("j_1", "m1", i as u64, chunk));
        }
        db.apply(ops);
        let range = range_of(&mut *db, "j_1", "m1", 0, None);
        assert_eq!(range.total_bytes, 22);
        assert_eq!(range.dropped_bytes, 8);
        assert_eq!(
            range.text,
            "head1\n\n[... 8 bytes dropped by retention ...]\nccccdddd"
        );
        let range = range_of(&mut *db, "j_1", "m1", 15, Some(4));
        assert_eq!(range.text, "cccd");
    }
    let (_, restored) = open(retention);
    let m = &restored.runs[0].1[0];
    assert_eq!(m.output.total_bytes(), 22);
    assert_eq!(m.output.omitted_bytes(), 8);
    assert!(m.output.text().starts_with("head1\n"));
    assert!(m.output.text().ends_with("ccccdddd"));
}

fn output_continues_after_a_restart_neither_lost_nor_doubled(open: Open<'_>) {
    let mut expected = String::new();
    {
        let (mut db, _) = open(Retention::default());
        db.apply(vec![
            StoreOp::Run(run("j_1", false)),
            StoreOp::Machine(machine("j_1", "m1")),
        ]);
        for seq in 0..300u64 {
            let line = format!("line {seq}\n");
            expected.push_str(&line);
            db.apply(vec![output("j_1", "m1", seq, &line)]);
        }
    }
    let (mut db, restored) = open(Retention::default());
    let m = &restored.runs[0].1[0];
    assert_eq!(m.next_seq, 300);
    assert_eq!(m.output.text(), expected);
    for seq in 300..310u64 {
        let line = format!("line {seq}\n");
        expected.push_str(&line);
        db.apply(vec![output("j_1", "m1", seq, &line)]);
    }
    let mut ended = run("j_1", true);
    ended.started = recent();
    db.apply(vec![StoreOp::Run(ended)]);
    let range = range_of(&mut *db, "j_1", "m1", 0, None);
    assert_eq!(range.total_bytes, expected.len() as u64);
    assert_eq!(range.text, expected);
    drop(db);
    let (mut db, restored) = open(Retention::default());
    assert!(restored.runs.is_empty());
    assert_eq!(range_of(&mut *db, "j_1", "m1", 0, None).text, expected);
}

fn totals_are_kept_when_the_last_output_and_the_end_share_a_batch(open: Open<'_>) {
    let (mut db, _) = open(Retention::default());
    db.apply(vec![
        StoreOp::Run(run("j_1", false)),
        StoreOp::Machine(machine("j_1", "m1")),
        output("j_1", "m1", 0, "one\n"),
        output("j_1", "m1", 1, "two\n"),
        StoreOp::Run(run("j_1", true)),
    ]);
    let range = range_of(&mut *db, "j_1", "m1", 0, None);
    assert_eq!((range.total_bytes, range.text.as_str()), (8, "one\ntwo\n"));
}

/// One batch carrying the messages of several machines in turn, with another op between them
/// and more messages than one statement carries (the PostgreSQL backend inserts a batch's
/// chunks together): each machine's output, total and sequence are its own, in order.
fn interleaved_outputs_of_many_machines_in_one_batch_each_land_in_order(open: Open<'_>) {
    const LINES: u64 = 4_100;
    let names = ["m1", "m2", "m3"];
    let mut expected: Vec<String> = vec![String::new(); names.len()];
    {
        let (mut db, _) = open(Retention::default());
        let mut ops = vec![StoreOp::Run(run("j_1", false))];
        ops.extend(names.iter().map(|m| StoreOp::Machine(machine("j_1", m))));
        for seq in 0..LINES {
            for (i, name) in names.iter().enumerate() {
                let line = format!("{name} {seq}\n");
                expected[i].push_str(&line);
                ops.push(output("j_1", name, seq, &line));
            }
            if seq == LINES / 2 {
                let mut m2 = machine("j_1", "m2");
                m2.last_heartbeat = Some(datetime!(2026-01-01 00:00:02 UTC));
                ops.push(StoreOp::Machine(m2));
            }
        }
        db.apply(ops);
        for (i, name) in names.iter().enumerate() {
            let range = range_of(&mut *db, "j_1", name, 0, None);
            assert_eq!(range.total_bytes, expected[i].len() as u64, "{name}");
            assert_eq!(range.text, expected[i], "{name}");
        }
    }
    let (_, restored) = open(Retention::default());
    let machines = &restored.runs[0].1;
    for (i, name) in names.iter().enumerate() {
        let m = machines
            .iter()
            .find(|m| m.record.machine == *name)
            .unwrap_or_else(|| panic!("{name} restored"));
        assert_eq!(m.next_seq, LINES, "{name}");
        assert_eq!(m.output.text(), expected[i], "{name}");
    }
}

fn results_and_job_state_come_back_as_written(open: Open<'_>) {
    let ended_at = recent() + time::Duration::minutes(2);
    {
        let (mut db, _) = open(Retention::default());
        let mut m = machine("j_1", "m1");
        m.status = MachineStatus::Failed;
        m.retcode = Some(253);
        m.cause = Some(saltpeter_proto::Cause::HeartbeatLost);
        m.endtime = Some(ended_at);
        m.late_retcode = Some(3);
        let mut ok = machine("j_1", "m2");
        ok.status = MachineStatus::Success;
        ok.retcode = Some(0);
        let mut r = run("j_1", true);
        r.success = Some(false);
        db.apply(vec![
            StoreOp::Run(run("j_1", false)),
            StoreOp::Machine(m),
            StoreOp::Machine(ok),
            StoreOp::Run(r),
            StoreOp::Job(JobRecord {
                name: "j".into(),
                last_run: Some(recent()),
                last_success: Some(false),
                last_success_at: Some(recent() - time::Duration::hours(1)),
                last_failed: 1,
                last_total: 2,
                last_fired: Some(recent()),
            }),
        ]);
    }
    let (mut db, restored) = open(Retention::default());
    assert!(restored.runs.is_empty());
    let job = &restored.jobs[0];
    assert_eq!((job.last_failed, job.last_total), (1, 2));
    assert_eq!(job.last_success, Some(false));
    assert_eq!(
        job.last_success_at,
        Some(recent() - time::Duration::hours(1))
    );
    let (tx, mut rx) = oneshot::channel();
    db.apply(vec![StoreOp::Query(Query::Run {
        instance: "j_1".into(),
        reply: tx,
    })]);
    let view = rx.try_recv().unwrap().unwrap().unwrap();
    assert_eq!(view.success, Some(false));
    let m1 = &view.machines["m1"];
    assert_eq!(m1.retcode, Some(253));
    assert_eq!(m1.late_retcode, Some(3));
    assert_eq!(m1.status, MachineStatus::Failed);
    assert_eq!(
        m1.cause,
        Some(saltpeter_proto::Cause::HeartbeatLost.as_str())
    );
    assert_eq!(
        m1.endtime.as_deref(),
        Some(ended_at_text(ended_at).as_str())
    );
    let page = runs_page(&mut *db, None, 10);
    assert_eq!(page[0].machines["m1"], Some(253));
    assert_eq!(page[0].machines["m2"], Some(0));
}

fn ended_at_text(at: OffsetDateTime) -> String {
    saltpeter_store::rfc3339(at)
}

fn old_runs_are_pruned_per_job(open: Open<'_>) {
    let retention = Retention {
        runs_per_job: 2,
        ..Retention::default()
    };
    let (mut db, _) = open(retention);
    let mut ops = Vec::new();
    for i in 0..5 {
        let mut r = run(&format!("j_{i}"), true);
        r.started = recent() + time::Duration::minutes(i);
        ops.push(StoreOp::Run(r));
        ops.push(StoreOp::Machine(machine(&format!("j_{i}"), "m1")));
        ops.push(output(&format!("j_{i}"), "m1", 0, "x"));
    }
    // A run that has not ended is never pruned, however old.
    let mut active = run("j_active", false);
    active.started = recent() - time::Duration::days(400);
    ops.push(StoreOp::Run(active));
    ops.push(StoreOp::Prune);
    db.apply(ops);
    let names: Vec<String> = runs_page(&mut *db, None, 10)
        .into_iter()
        .map(|r| r.instance)
        .collect();
    assert_eq!(names, ["j_4", "j_3", "j_active"], "newest two kept");
    let (tx, mut rx) = oneshot::channel();
    db.apply(vec![StoreOp::Query(Query::Run {
        instance: "j_0".into(),
        reply: tx,
    })]);
    assert!(rx.try_recv().unwrap().unwrap().is_none());
}

fn history_pages_follow_each_other(open: Open<'_>) {
    let (mut db, _) = open(Retention::default());
    let mut ops = Vec::new();
    for i in 0..5 {
        let mut r = run(&format!("j_{i}"), true);
        r.started = recent() + time::Duration::minutes(i);
        ops.push(StoreOp::Run(r));
    }
    db.apply(ops);
    let first = runs_page(&mut *db, None, 2);
    let second = runs_page(&mut *db, Some(first[1].started.clone()), 2);
    let all: Vec<String> = first
        .iter()
        .chain(&second)
        .map(|r| r.instance.clone())
        .collect();
    assert_eq!(all, ["j_4", "j_3", "j_2", "j_1"]);
    assert_eq!(
        first[0].started,
        saltpeter_store::rfc3339(recent() + time::Duration::minutes(4))
    );
}

fn the_timeline_comes_from_the_store_oldest_first_within_the_window(open: Open<'_>) {
    let (mut db, _) = open(Retention::default());
    let mut ops = Vec::new();
    for i in 0..4 {
        let mut r = run(&format!("j_{i}"), true);
        r.started = recent() + time::Duration::minutes(i * 10);
        r.ended = Some(r.started + time::Duration::minutes(1));
        r.success = Some(i != 2);
        ops.push(StoreOp::Run(r));
        let mut m = machine(&format!("j_{i}"), "m1");
        m.retcode = Some(if i == 2 { 7 } else { 0 });
        ops.push(StoreOp::Machine(m));
    }
    db.apply(ops);
    let (tx, mut rx) = oneshot::channel();
    let query = TimelineQuery {
        start: recent() + time::Duration::minutes(5),
        end: recent() + time::Duration::minutes(25),
        job: None,
        limit: 10,
    };
    db.apply(vec![StoreOp::Query(Query::Timeline { query, reply: tx })]);
    let rows: Vec<TimelineEntry> = rx.try_recv().unwrap().unwrap();
    let got: Vec<(&str, Option<i64>)> = rows
        .iter()
        .map(|r| (r.job_instance.as_str(), r.ret_code))
        .collect();
    assert_eq!(got, [("j_1", Some(0)), ("j_2", Some(7))]);
    assert_eq!((rows[1].machines, rows[1].failed), (1, 1));
    assert_eq!(
        rows[0].timestamp,
        saltpeter_store::rfc3339(recent() + time::Duration::minutes(10))
    );
}

fn audit_record(at: OffsetDateTime, n: usize) -> AuditRecord {
    AuditRecord {
        at,
        actor: Actor::remote(format!("a{n}"), "10.0.0.5".parse().ok()),
        action: Action::Run,
        job: Some("j".into()),
        instance: None,
        machine: None,
        ok: true,
        detail: Some(format!("detail {n}")),
    }
}

fn the_audit_trail_pages_newest_first_and_ages(open: Open<'_>) {
    let retention = Retention {
        max_age_days: 30,
        ..Retention::default()
    };
    let (mut db, _) = open(retention);
    // Whole microseconds, as both stores keep times.
    let now = OffsetDateTime::now_utc();
    let now = now
        .replace_nanosecond(now.nanosecond() / 1000 * 1000)
        .unwrap();
    db.apply(vec![
        StoreOp::Audit(audit_record(now, 1)),
        StoreOp::Audit(audit_record(now, 2)),
    ]);
    // An entry past the age limit goes at the next prune.
    db.apply(vec![
        StoreOp::Audit(audit_record(now - time::Duration::days(31), 0)),
        StoreOp::Prune,
    ]);
    let page = audit_page(&mut *db, None, 10);
    let actors: Vec<&str> = page.iter().map(|e| e.actor.as_str()).collect();
    assert_eq!(actors, ["a2", "a1"]);
    let newest = &page[0];
    assert_eq!(newest.source.as_deref(), Some("10.0.0.5"));
    assert_eq!(newest.action, "run");
    assert_eq!(newest.detail.as_deref(), Some("detail 2"));
    assert_eq!(newest.at, saltpeter_store::rfc3339(now));
    let older = audit_page(&mut *db, Some(newest.id), 1);
    let actors: Vec<&str> = older.iter().map(|e| e.actor.as_str()).collect();
    assert_eq!(actors, ["a1"]);
}

fn an_op_the_database_refuses_does_not_take_its_batch_with_it(open: Open<'_>) {
    {
        let (mut db, _) = open(Retention::default());
        // PostgreSQL's text refuses NUL, which SQLite stores: on PostgreSQL this op fails, and
        // the others of its batch must still commit and their notice come back.
        let mut refused = audit_record(OffsetDateTime::now_utc(), 0);
        refused.detail = Some("nul \0 inside".into());
        let notices = db.apply(vec![
            StoreOp::Run(run("j_1", false)),
            StoreOp::Audit(refused),
            StoreOp::Machine(machine("j_1", "m1")),
            output("j_1", "m1", 0, "kept\n"),
            StoreOp::Notify(Notice::Complete {
                instance: "j_1".into(),
                machine: "m1".into(),
                seq: Some(0),
                conn: 1,
            }),
        ]);
        assert_eq!(notices.len(), 1);
        db.apply(vec![output("j_1", "m1", 1, "after\n")]);
    }
    let (_, restored) = open(Retention::default());
    let m = &restored.runs[0].1[0];
    assert_eq!(m.output.text(), "kept\nafter\n");
    assert_eq!(m.next_seq, 2);
}

fn missed_slots_and_replaced_attempts_are_history_and_come_back(open: Open<'_>) {
    let slot = recent() - time::Duration::minutes(5);
    {
        let (mut db, _) = open(Retention::default());
        db.apply(vec![
            StoreOp::Missed(MissedRecord::one("j", "g", slot, MissedReason::MasterDown)),
            // The same slot again (a second scan) leaves the first record as it was.
            StoreOp::Missed(MissedRecord::one("j", "g", slot, MissedReason::Overlap)),
            StoreOp::Run(run("j_1", false)),
            StoreOp::Machine(machine("j_1", "m1")),
            output("j_1", "m1", 0, "first try\n"),
            StoreOp::Attempt(AttemptRecord {
                instance: "j_1".into(),
                machine: "m1".into(),
                attempt: 1,
                retcode: Some(3),
                cause: None,
                starttime: Some(datetime!(2026-01-01 00:00:01 UTC)),
                endtime: Some(datetime!(2026-01-01 00:00:02 UTC)),
            }),
        ]);
        // The second attempt numbers its output from 0 again.
        db.apply(vec![output("j_1", "m1", 0, "second try\n")]);
        let page = runs_page(&mut *db, None, 10);
        let missed: Vec<_> = page
            .iter()
            .filter(|r| r.missed.is_some())
            .map(|r| (r.missed.as_deref(), r.missed_count))
            .collect();
        assert_eq!(missed, [(Some("master_down"), Some(1))]);
    }
    let (_db, restored) = open(Retention::default());
    let (r, machines) = &restored.runs[0];
    assert_eq!(r.instance, "j_1");
    let m = &machines[0];
    assert_eq!(m.attempts.len(), 1, "the replaced attempt comes back");
    assert_eq!((m.attempts[0].attempt, m.attempts[0].retcode), (1, Some(3)));
    assert_eq!(m.next_seq, 1, "the sequence of the second attempt");
    assert_eq!(m.output.text(), "first try\nsecond try\n");
}

/// A run of another job than `j`.
fn run_of(job: &str, instance: &str) -> RunRecord {
    RunRecord {
        job: job.into(),
        ..run(instance, false)
    }
}

fn a_takeover_returns_only_the_jobs_unfinished_runs_as_written(open: Open<'_>) {
    let (mut db, _) = open(Retention::default());
    db.apply(vec![
        StoreOp::Run(run("j_0", true)),
        StoreOp::Run(run("j_1", false)),
        StoreOp::Run(run_of("k", "k_1")),
        StoreOp::Machine(machine("j_1", "m1")),
        StoreOp::Machine(machine("j_1", "m2")),
        StoreOp::Machine(machine("k_1", "m1")),
        output("k_1", "m1", 0, "other job\n"),
        StoreOp::Job(JobRecord {
            name: "j".into(),
            last_total: 2,
            last_fired: Some(recent()),
            ..JobRecord::default()
        }),
        StoreOp::Job(JobRecord {
            name: "k".into(),
            ..JobRecord::default()
        }),
    ]);
    // Output in batches of its own, as wrappers send it; m2 is retried, and its second
    // attempt numbers its output from 0 again.
    for (seq, line) in ["one\n", "two é\n", "three\n"].iter().enumerate() {
        db.apply(vec![output("j_1", "m1", seq as u64, line)]);
    }
    db.apply(vec![output("j_1", "m2", 0, "first try\n")]);
    db.apply(vec![StoreOp::Attempt(AttemptRecord {
        instance: "j_1".into(),
        machine: "m2".into(),
        attempt: 1,
        retcode: Some(3),
        cause: None,
        starttime: Some(datetime!(2026-01-01 00:00:01 UTC)),
        endtime: Some(datetime!(2026-01-01 00:00:02 UTC)),
    })]);
    db.apply(vec![output("j_1", "m2", 0, "second try\n")]);

    let restored = takeover(&mut *db, "j");
    let runs: Vec<&str> = restored
        .runs
        .iter()
        .map(|(r, _)| r.instance.as_str())
        .collect();
    assert_eq!(runs, ["j_1"], "only the job's unfinished runs");
    let (r, machines) = &restored.runs[0];
    assert_eq!((r.job.as_str(), r.token.as_str()), ("j", "secret"));
    let got: Vec<(&str, String, u64, usize)> = machines
        .iter()
        .map(|m| {
            (
                m.record.machine.as_str(),
                m.output.text(),
                m.next_seq,
                m.attempts.len(),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            ("m1", "one\ntwo é\nthree\n".to_owned(), 3, 0),
            ("m2", "first try\nsecond try\n".to_owned(), 1, 1),
        ]
    );
    assert!(machines[0].record.kill_requested && machines[0].record.authenticated);
    let jobs: Vec<(&str, usize)> = restored
        .jobs
        .iter()
        .map(|j| (j.name.as_str(), j.last_total))
        .collect();
    assert_eq!(jobs, [("j", 2)], "the job's record and no other");
    assert_eq!(restored.jobs[0].last_fired, Some(recent()));

    // A job with nothing stored: no runs, no record.
    let nothing = takeover(&mut *db, "never");
    assert!(nothing.runs.is_empty() && nothing.jobs.is_empty());
    // The other job is as it was, and so is the taken-over job's history.
    let restored = takeover(&mut *db, "k");
    assert_eq!(restored.runs.len(), 1);
    assert_eq!(restored.runs[0].1[0].output.text(), "other job\n");
    assert_eq!(runs_page(&mut *db, None, 10).len(), 2);
}

fn output_continues_after_a_takeover(open: Open<'_>) {
    let (mut db, _) = open(Retention::default());
    db.apply(vec![
        StoreOp::Run(run("j_1", false)),
        StoreOp::Machine(machine("j_1", "m1")),
        StoreOp::Run(run_of("k", "k_1")),
        StoreOp::Machine(machine("k_1", "m1")),
    ]);
    let mut expected = String::new();
    let mut other = String::new();
    fn line(seq: u64, expected: &mut String) -> String {
        let text = format!("line {seq}\n");
        expected.push_str(&text);
        text
    }
    for seq in 0..5 {
        let j = line(seq, &mut expected);
        let k = line(seq, &mut other);
        db.apply(vec![
            output("j_1", "m1", seq, &j),
            output("k_1", "m1", seq, &k),
        ]);
    }
    // This master lost the job and gained it back; the other job's output goes on meanwhile,
    // and the ops of the takeover's own batch go before and after it in order.
    db.apply(vec![StoreOp::ForgetJob("j".into())]);
    let k = line(5, &mut other);
    db.apply(vec![output("k_1", "m1", 5, &k)]);
    let j = line(5, &mut expected);
    let (tx, mut rx) = oneshot::channel();
    db.apply(vec![
        output("j_1", "m1", 5, &j),
        StoreOp::Query(Query::Takeover {
            job: "j".into(),
            reply: tx,
        }),
        output("j_1", "m1", 6, &line(6, &mut expected)),
    ]);
    let restored = rx.try_recv().unwrap().unwrap();
    let m = &restored.runs[0].1[0];
    assert_eq!(m.next_seq, 6, "the takeover saw the write before it");
    assert_eq!(m.output.text(), expected.strip_suffix("line 6\n").unwrap());
    for seq in 7..10 {
        let j = line(seq, &mut expected);
        let k = line(seq, &mut other);
        db.apply(vec![
            output("j_1", "m1", seq, &j),
            output("k_1", "m1", seq, &k),
        ]);
    }
    let range = range_of(&mut *db, "j_1", "m1", 0, None);
    assert_eq!(range.total_bytes, expected.len() as u64);
    assert_eq!(range.text, expected);
    assert_eq!(range_of(&mut *db, "k_1", "m1", 0, None).text, other);
    drop(db);
    let (_, restored) = open(Retention::default());
    let j = restored
        .runs
        .iter()
        .find(|(r, _)| r.instance == "j_1")
        .unwrap();
    assert_eq!((j.1[0].next_seq, j.1[0].output.text()), (10, expected));
}
