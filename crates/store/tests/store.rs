//! The store on a real SQLite file: what goes in comes back after a reopen, output retention
//! keeps head and tail and counts the rest, notices only follow committed writes, and old runs
//! are pruned.

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

use saltpeter_store::MachineStatus;
use saltpeter_store::{
    Backend, Db, JobRecord, MachineRecord, Notice, OutputRange, Query, Retention, RunRecord, Store,
    StoreOp, WalTuning,
};
use time::macros::datetime;
use tokio::sync::oneshot;

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

/// A day ago: inside the default 30-day retention, which the store applies on its own.
fn recent() -> time::OffsetDateTime {
    let now = time::OffsetDateTime::now_utc() - time::Duration::days(1);
    now.replace_nanosecond(0).unwrap()
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

/// Asks the store for a range of a machine's output, as the API does.
fn range_of(
    db: &mut Db,
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

fn open(dir: &std::path::Path, retention: Retention) -> (Db, saltpeter_store::Restored) {
    Store::open(dir, retention).unwrap()
}

#[test]
fn an_unfinished_run_comes_back_after_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (mut db, restored) = open(dir.path(), Retention::default());
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
        assert_eq!(
            notices.len(),
            1,
            "the notice comes back once its batch is committed"
        );
    }
    let (_db, restored) = open(dir.path(), Retention::default());
    assert_eq!(restored.runs.len(), 1, "finished runs are not restored");
    let (r, machines) = &restored.runs[0];
    assert_eq!(r.instance, "j_1");
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
    assert_eq!(m.record.pid, Some(42));
    assert_eq!(
        restored.jobs[0].last_fired,
        Some(datetime!(2026-01-01 00:00 UTC))
    );
}

#[test]
fn retention_keeps_head_and_tail_and_counts_what_it_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let retention = Retention {
        head_bytes: 6,
        tail_bytes: 8,
        ..Retention::default()
    };
    let (mut db, _) = open(dir.path(), retention);
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
    let range = range_of(&mut db, "j_1", "m1", 0, None);
    assert_eq!(range.total_bytes, 22);
    assert_eq!(range.dropped_bytes, 8);
    assert_eq!(
        range.text,
        "head1\n\n[... 8 bytes dropped by retention ...]\nccccdddd"
    );
    // A range inside the kept tail.
    let range = range_of(&mut db, "j_1", "m1", 15, Some(4));
    assert_eq!(range.text, "cccd");
    drop(db);
    let (_, restored) = open(dir.path(), retention);
    let m = &restored.runs[0].1[0];
    assert_eq!(m.output.total_bytes(), 22);
    assert_eq!(m.output.omitted_bytes(), 8);
    assert!(m.output.text().starts_with("head1\n"));
    assert!(m.output.text().ends_with("ccccdddd"));
}

#[test]
fn old_runs_are_pruned_per_job() {
    let dir = tempfile::tempdir().unwrap();
    let retention = Retention {
        runs_per_job: 2,
        ..Retention::default()
    };
    let (mut db, _) = open(dir.path(), retention);
    let mut ops = Vec::new();
    for i in 0..5 {
        let mut r = run(&format!("j_{i}"), true);
        r.started = recent() + time::Duration::minutes(i);
        ops.push(StoreOp::Run(r));
        ops.push(StoreOp::Machine(machine(&format!("j_{i}"), "m1")));
        ops.push(output(&format!("j_{i}"), "m1", 0, "x"));
    }
    ops.push(StoreOp::Prune);
    db.apply(ops);
    let (tx, mut rx) = oneshot::channel();
    db.apply(vec![StoreOp::Query(Query::Runs {
        job: "j".into(),
        before: None,
        limit: 10,
        reply: tx,
    })]);
    let runs = rx.try_recv().unwrap().unwrap();
    let names: Vec<&str> = runs.iter().map(|r| r.instance.as_str()).collect();
    assert_eq!(names, ["j_4", "j_3"], "newest two kept, newest first");
    let (tx, mut rx) = oneshot::channel();
    db.apply(vec![StoreOp::Query(Query::Run {
        instance: "j_0".into(),
        reply: tx,
    })]);
    assert!(rx.try_recv().unwrap().unwrap().is_none());
}

#[test]
fn history_pages_follow_each_other() {
    let dir = tempfile::tempdir().unwrap();
    let (mut db, _) = open(dir.path(), Retention::default());
    let mut ops = Vec::new();
    for i in 0..5 {
        let mut r = run(&format!("j_{i}"), true);
        r.started = recent() + time::Duration::minutes(i);
        ops.push(StoreOp::Run(r));
    }
    db.apply(ops);
    let page = |db: &mut Db, before: Option<String>| {
        let (tx, mut rx) = oneshot::channel();
        db.apply(vec![StoreOp::Query(Query::Runs {
            job: "j".into(),
            before,
            limit: 2,
            reply: tx,
        })]);
        rx.try_recv().unwrap().unwrap()
    };
    let first = page(&mut db, None);
    let second = page(&mut db, Some(first[1].started.clone()));
    let all: Vec<String> = first
        .iter()
        .chain(&second)
        .map(|r| r.instance.clone())
        .collect();
    assert_eq!(all, ["j_4", "j_3", "j_2", "j_1"]);
}

#[test]
fn totals_are_kept_when_the_last_output_and_the_end_share_a_batch() {
    let dir = tempfile::tempdir().unwrap();
    let (mut db, _) = open(dir.path(), Retention::default());
    db.apply(vec![
        StoreOp::Run(run("j_1", false)),
        StoreOp::Machine(machine("j_1", "m1")),
        output("j_1", "m1", 0, "one\n"),
        output("j_1", "m1", 1, "two\n"),
        StoreOp::Run(run("j_1", true)),
    ]);
    let range = range_of(&mut db, "j_1", "m1", 0, None);
    assert_eq!((range.total_bytes, range.text.as_str()), (8, "one\ntwo\n"));
}

#[test]
fn the_timeline_comes_from_the_store_oldest_first_within_the_window() {
    let dir = tempfile::tempdir().unwrap();
    let (mut db, _) = open(dir.path(), Retention::default());
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
    let query = saltpeter_store::TimelineQuery {
        start: recent() + time::Duration::minutes(5),
        end: recent() + time::Duration::minutes(25),
        job: None,
        limit: 10,
    };
    db.apply(vec![StoreOp::Query(Query::Timeline { query, reply: tx })]);
    let rows = rx.try_recv().unwrap().unwrap();
    let got: Vec<(&str, Option<i64>)> = rows
        .iter()
        .map(|r| (r.job_instance.as_str(), r.ret_code))
        .collect();
    assert_eq!(got, [("j_1", Some(0)), ("j_2", Some(7))]);
    assert_eq!((rows[1].machines, rows[1].failed), (1, 1));
}

/// Rows in one table of the store's database file, read beside the store.
fn rows(dir: &std::path::Path, table: &str) -> i64 {
    let conn = rusqlite::Connection::open(dir.join("saltpeter.db")).unwrap();
    conn.query_row(&format!("SELECT COUNT(*) FROM {table}"), [], |r| r.get(0))
        .unwrap()
}

fn output_of(db: &mut Db, instance: &str, machine: &str) -> String {
    range_of(db, instance, machine, 0, None).text
}

#[test]
fn output_folded_before_a_restart_is_neither_lost_nor_doubled_after_it() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (mut db, _) = open(dir.path(), Retention::default());
        db.apply(vec![
            StoreOp::Run(run("j_1", false)),
            StoreOp::Machine(machine("j_1", "m1")),
            StoreOp::Machine(machine("j_1", "m2")),
            output("j_1", "m1", 0, "a\n"),
            output("j_1", "m2", 0, "x\n"),
        ]);
        // The query folds m1's journal into its chunks; m2's stays in the journal.
        assert_eq!(output_of(&mut db, "j_1", "m1"), "a\n");
        db.apply(vec![
            output("j_1", "m1", 1, "b\n"),
            output("j_1", "m2", 1, "y\n"),
        ]);
        assert!(rows(dir.path(), "output_journal") > 0, "not folded yet");
    }
    // Killed here, in effect: reopening folds what the journal holds, once.
    let (mut db, restored) = open(dir.path(), Retention::default());
    let texts: Vec<String> = restored.runs[0].1.iter().map(|m| m.output.text()).collect();
    assert_eq!(texts, ["a\nb\n", "x\ny\n"]);
    let next_seqs: Vec<u64> = restored.runs[0].1.iter().map(|m| m.next_seq).collect();
    assert_eq!(next_seqs, [2, 2], "sequences counted from the journal");
    assert_eq!(rows(dir.path(), "output_journal"), 0);
    let range = range_of(&mut db, "j_1", "m2", 0, None);
    assert_eq!((range.total_bytes, range.text.as_str()), (4, "x\ny\n"));
    // Journal ids go on growing after the journal was emptied, so output written after the
    // restart is not mistaken for output folded before it.
    db.apply(vec![output("j_1", "m1", 2, "c\n")]);
    drop(db);
    let (mut db, restored) = open(dir.path(), Retention::default());
    assert_eq!(restored.runs[0].1[0].output.text(), "a\nb\nc\n");
    assert_eq!(output_of(&mut db, "j_1", "m1"), "a\nb\nc\n");
    assert_eq!(output_of(&mut db, "j_1", "m2"), "x\ny\n");
}

/// Starts run `j_1` on `m1` and stores `count` one-line messages, one per batch (as a machine
/// printing once a second is seen); returns the text.
fn one_line_batches(db: &mut Db, count: u64) -> String {
    db.apply(vec![
        StoreOp::Run(run("j_1", false)),
        StoreOp::Machine(machine("j_1", "m1")),
    ]);
    let mut expected = String::new();
    for seq in 0..count {
        let line = format!("line {seq}\n");
        expected.push_str(&line);
        db.apply(vec![output("j_1", "m1", seq, &line)]);
    }
    expected
}

#[test]
fn many_small_messages_become_few_chunks_and_leave_no_journal() {
    let dir = tempfile::tempdir().unwrap();
    let (mut db, _) = open(dir.path(), Retention::default());
    let mut expected = one_line_batches(&mut db, 2000);
    assert_eq!(
        rows(dir.path(), "output"),
        0,
        "small output waits in the journal"
    );
    assert_eq!(rows(dir.path(), "output_journal"), 2000);
    // A large message skips the journal and still comes after what was pending.
    let big = "z".repeat(100 * 1024);
    expected.push_str(&big);
    db.apply(vec![
        output("j_1", "m1", 2000, &big),
        output("j_1", "m1", 2001, "end\n"),
    ]);
    expected.push_str("end\n");
    assert_eq!(
        rows(dir.path(), "output_journal"),
        1,
        "only \"end\" is pending"
    );
    db.apply(vec![StoreOp::Run(run("j_1", true))]);
    assert_eq!(rows(dir.path(), "output_journal"), 0);
    // The head chunk, the pending lines up to the big one, the big one, and "end\n".
    let chunks = rows(dir.path(), "output");
    assert!(chunks <= 4, "{chunks} chunks for 2,002 messages");
    assert_eq!(output_of(&mut db, "j_1", "m1"), expected);
}

#[test]
fn a_long_folded_journal_prefix_is_deleted_a_step_per_batch() {
    let dir = tempfile::tempdir().unwrap();
    let (mut db, _) = open(dir.path(), Retention::default());
    let mut expected = one_line_batches(&mut db, 5000);
    assert_eq!(rows(dir.path(), "output_journal"), 5000);
    // A large message folds everything pending, so the whole journal is behind the floor at
    // once; one batch deletes only part of it (one DELETE of it all held a commit up).
    let big = "z".repeat(100 * 1024);
    let mut seq = 5000;
    db.apply(vec![output("j_1", "m1", seq, &big)]);
    expected.push_str(&big);
    let left = rows(dir.path(), "output_journal");
    assert!(
        0 < left && left < 5000,
        "{left} journal rows after the fold"
    );
    // Later batches (large messages, which skip the journal) delete the rest, step by step.
    let mut batches = 0;
    while rows(dir.path(), "output_journal") > 0 {
        batches += 1;
        assert!(batches <= 5, "the journal is still not empty");
        seq += 1;
        db.apply(vec![output("j_1", "m1", seq, &big)]);
        expected.push_str(&big);
    }
    assert_eq!(output_of(&mut db, "j_1", "m1"), expected);
}

#[test]
fn retention_over_folded_chunks_keeps_head_and_newest_tail() {
    let dir = tempfile::tempdir().unwrap();
    let retention = Retention {
        head_bytes: 4,
        tail_bytes: 6,
        ..Retention::default()
    };
    let (mut db, _) = open(dir.path(), retention);
    db.apply(vec![
        StoreOp::Run(run("j_1", false)),
        StoreOp::Machine(machine("j_1", "m1")),
        output("j_1", "m1", 0, "hhhh"),
        output("j_1", "m1", 1, "111"),
        output("j_1", "m1", 2, "222"),
    ]);
    // Folded: head "hhhh", tail "111222" (exactly the cap).
    assert_eq!(output_of(&mut db, "j_1", "m1"), "hhhh111222");
    db.apply(vec![
        output("j_1", "m1", 3, "333"),
        output("j_1", "m1", 4, "444"),
        output("j_1", "m1", 5, "555"),
    ]);
    // The stored tail chunk goes first, then pending "333"; "444555" is kept.
    let range = range_of(&mut db, "j_1", "m1", 0, None);
    assert_eq!(
        (range.total_bytes, range.dropped_bytes, range.text.as_str()),
        (
            19,
            9,
            "hhhh\n[... 9 bytes dropped by retention ...]\n444555"
        )
    );
    drop(db);
    let (_, restored) = open(dir.path(), retention);
    let m = &restored.runs[0].1[0];
    assert_eq!((m.output.total_bytes(), m.output.omitted_bytes()), (19, 9));
    assert!(m.output.text().ends_with("444555"));
}

#[test]
fn output_after_a_fold_in_the_same_batch_is_counted_once_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let big_piece = "p".repeat(40 * 1024);
    {
        let (mut db, _) = open(dir.path(), Retention::default());
        // The second piece fills 64 KiB and folds; "tail\n" is journalled after it in the
        // same batch, whose totals are then written.
        db.apply(vec![
            StoreOp::Run(run("j_1", false)),
            StoreOp::Machine(machine("j_1", "m1")),
            output("j_1", "m1", 0, &big_piece),
            output("j_1", "m1", 1, &big_piece),
            output("j_1", "m1", 2, "tail\n"),
        ]);
    }
    let (mut db, restored) = open(dir.path(), Retention::default());
    let total = 2 * big_piece.len() as u64 + 5;
    assert_eq!(restored.runs[0].1[0].next_seq, 3);
    let range = range_of(&mut db, "j_1", "m1", 0, Some(0));
    assert_eq!(range.total_bytes, total, "pending bytes counted once");
    assert_eq!(output_of(&mut db, "j_1", "m1").len() as u64, total);
}

#[test]
fn the_wal_starts_over_while_commits_keep_coming() {
    // SQLite only reuses the WAL from its start when a write begins with every frame copied
    // back; under back-to-back commits that never happens by itself, and the WAL grows by
    // everything written. The checkpoint thread must start it over past `restart_frames`.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("saltpeter.db");
    let tuning = WalTuning {
        checkpoint_every: std::time::Duration::from_millis(5),
        restart_frames: 256,
        writer_frames: 1 << 30,
    };
    let mut db = Db::open_tuned(&path, Retention::default(), tuning).unwrap();
    db.apply(vec![
        StoreOp::Run(run("r1", false)),
        StoreOp::Machine(machine("r1", "m1")),
    ]);
    // Up to 256 MiB in 64 KiB messages, back to back: each is its own chunk, and retention
    // deletes the old ones, so the database stays small while the WAL sees every page. The
    // WAL header's checkpoint sequence number (bytes 12..16) goes up each time the WAL starts
    // over; how soon depends on how busy the machine is, so the test counts restarts rather
    // than bounding the file's size (22 to 114 MB seen on a busy machine). Without the
    // thread's restarts it counts none in 128 MiB, and the WAL ends larger than that.
    let wal_path = dir.path().join("saltpeter.db-wal");
    let sequence = || {
        use std::io::Read;
        let mut header = [0u8; 16];
        std::fs::File::open(&wal_path)
            .and_then(|mut f| f.read_exact(&mut header))
            .map_or(0, |()| {
                u32::from_be_bytes([header[12], header[13], header[14], header[15]])
            })
    };
    let chunk = "x".repeat(64 * 1024);
    let first = sequence();
    let mut written = 0u64;
    while sequence().wrapping_sub(first) < 2 && written < 256 * 1024 * 1024 {
        db.apply(vec![output(
            "r1",
            "m1",
            written / chunk.len() as u64,
            &chunk,
        )]);
        written += chunk.len() as u64;
    }
    let restarts = sequence().wrapping_sub(first);
    let wal = std::fs::metadata(&wal_path).unwrap().len();
    assert!(
        restarts >= 2,
        "the WAL started over {restarts} times in {written} bytes of commits; it is {wal} bytes"
    );
    let range = range_of(&mut db, "r1", "m1", 0, Some(10));
    assert_eq!(range.text, "xxxxxxxxxx");
    assert_eq!(range.total_bytes, written);
}

/// A run of `n` machines that each printed one line, then ended in a batch of its own.
fn end_a_run_of(db: &mut Db, instance: &str, n: usize) {
    let mut ops = vec![StoreOp::Run(run(instance, false))];
    for i in 0..n {
        let name = format!("m{i}");
        ops.push(StoreOp::Machine(machine(instance, &name)));
        ops.push(output(instance, &name, 0, &format!("hello from {name}\n")));
    }
    db.apply(ops);
    db.apply(vec![StoreOp::Run(run(instance, true))]);
}

fn assert_each_machine_printed_once(db: &mut Db, instance: &str, n: usize) {
    for i in 0..n {
        let name = format!("m{i}");
        let range = range_of(db, instance, &name, 0, None);
        let line = format!("hello from {name}\n");
        assert_eq!(range.text, line);
        assert_eq!(range.total_bytes, line.len() as u64);
    }
}

#[test]
fn a_large_run_that_ends_is_folded_over_the_next_batches() {
    // Folding 10,000 machines in the batch that ends their run held that commit for seconds.
    let dir = tempfile::tempdir().unwrap();
    let (mut db, _) = open(dir.path(), Retention::default());
    end_a_run_of(&mut db, "j_1", 200);
    let folded = rows(dir.path(), "output");
    assert!(folded > 0 && folded < 200, "{folded} of 200 folded at once");
    for _ in 0..10 {
        db.apply(Vec::new());
    }
    assert_eq!(rows(dir.path(), "output_journal"), 0);
    assert_each_machine_printed_once(&mut db, "j_1", 200);
}

#[test]
fn a_run_ended_but_not_yet_folded_loses_and_doubles_nothing_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (mut db, _) = open(dir.path(), Retention::default());
    end_a_run_of(&mut db, "j_1", 200);
    assert!(rows(dir.path(), "output") < 200);
    // A query folds what it reads, even for a run that is waiting to be folded.
    assert_eq!(output_of(&mut db, "j_1", "m7"), "hello from m7\n");
    drop(db);
    let (mut db, _) = open(dir.path(), Retention::default());
    assert_eq!(rows(dir.path(), "output_journal"), 0);
    assert_each_machine_printed_once(&mut db, "j_1", 200);
}

#[test]
fn close_commits_everything_queued_even_when_the_engine_stopped_listening() {
    let dir = tempfile::tempdir().unwrap();
    let (db, _) = open(dir.path(), Retention::default());
    // A queue of one that nobody reads: the store thread soon waits to hand over a notice.
    let (tx, mut rx) = tokio::sync::mpsc::channel(1);
    let deliver = move |notices| tx.blocking_send(notices).is_ok();
    let mut store = Store::start(db, deliver, Default::default()).unwrap();
    let notify = |i: u64| {
        StoreOp::Notify(Notice::Output {
            instance: format!("j_{i}"),
            machine: "m1".into(),
            seq: Some(0),
            conn: i,
            received: None,
        })
    };
    for i in 0..3 {
        store.push(StoreOp::Run(run(&format!("j_{i}"), false)));
        store.push(notify(i));
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    // The engine stops listening, as at shutdown; what is queued after that still counts.
    rx.close();
    for i in 3..10 {
        store.push(StoreOp::Run(run(&format!("j_{i}"), false)));
        store.push(notify(i));
    }
    store.close();
    let (_db, restored) = open(dir.path(), Retention::default());
    let mut instances: Vec<String> = restored
        .runs
        .iter()
        .map(|(r, _)| r.instance.clone())
        .collect();
    instances.sort();
    let want: Vec<String> = (0..10).map(|i| format!("j_{i}")).collect();
    assert_eq!(instances, want);
}

#[test]
fn the_data_directory_and_the_database_are_private() {
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    {
        let (mut db, _) = open(&data, Retention::default());
        db.apply(vec![StoreOp::Run(run("j_1", false))]);
        assert_eq!(mode(&data), 0o700);
        for file in ["saltpeter.db", "saltpeter.db-wal", "saltpeter.db-shm"] {
            assert_eq!(mode(&data.join(file)), 0o600, "{file}");
        }
    }
    // A database left readable by an earlier build is made private at the next open.
    std::fs::set_permissions(
        data.join("saltpeter.db"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let _ = open(&data, Retention::default());
    assert_eq!(mode(&data.join("saltpeter.db")), 0o600);
}
