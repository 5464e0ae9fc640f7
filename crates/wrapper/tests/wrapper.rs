//! Integration tests of `sp-wrapper`: the real binary, real processes and a real
//! WebSocket test master on loopback. Every wait is bounded; every process a test starts is
//! ended by PID if it outlives the test.

mod common;

use std::time::Duration;

use common::{Behaviour, Run, TestMaster, XorShift, group_members, hash, wait_wrapper_exit};
use saltpeter_proto::{Cause, KILLED_LINE, PROTOCOL_VERSION, timeout_line};

const LIMIT: Duration = Duration::from_secs(20);

/// Checks the bookkeeping every run must satisfy: consecutive seqs from 0, no duplicate,
/// no gap, and `complete.seq` = number of outputs.
fn assert_clean_stream(master: &TestMaster) {
    let seen = &master.seen;
    let seqs: Vec<u64> = seen.outputs.iter().map(|o| o.0).collect();
    assert_eq!(
        seqs,
        (0..seqs.len() as u64).collect::<Vec<_>>(),
        "outputs out of order"
    );
    assert!(
        seen.duplicates.is_empty(),
        "duplicates: {:?}",
        seen.duplicates
    );
    assert!(seen.gaps.is_empty(), "gaps: {:?}", seen.gaps);
    let complete = &seen.complete.as_ref().expect("complete").1;
    assert_eq!(complete.seq, Some(seqs.len() as u64));
}

fn wrapper_pid(master: &TestMaster) -> u32 {
    master.seen.connects[0]
        .wrapper_pid
        .expect("connect carries wrapper_pid")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn happy_path_delivers_exact_output_and_exit_status() {
    let mut master = TestMaster::start(Behaviour::default()).await;
    let cmd = r"printf 'hello\n'; printf 'to stderr\n' >&2; printf 'caf\303\251 \342\202\254 \360\237\230\200\r\n'; exit 3";
    let run = Run::new("happy", &master.url(), cmd);
    let out = run.launch_ok();
    let version = env!("CARGO_PKG_VERSION");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("Saltpeter Wrapper version {version}\nWrapper started successfully\n")
    );
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let complete = master.wait_complete(LIMIT).await;
    assert_eq!(master.seen.text(), "hello\nto stderr\ncafé € 😀\r\n");
    assert_eq!(
        (complete.retcode, complete.cause, complete.signal),
        (Some(3), Some(Cause::Exit), None)
    );
    assert_clean_stream(&master);
    assert!(master.seen.outputs.iter().all(|o| o.1 == "stdout"));

    let connect = &master.seen.connects[0];
    assert_eq!(connect.protocol, Some(PROTOCOL_VERSION));
    assert_eq!(connect.token.as_deref(), Some("test-token"));
    assert_eq!(connect.envelope.machine, common::MACHINE);
    assert_eq!(connect.envelope.job_name, run.job);
    assert_eq!(connect.envelope.job_instance, run.instance);
    let start = &master.seen.starts[0].1;
    assert_eq!(start.version, version);
    assert_ne!(start.pid, connect.wrapper_pid.unwrap());
    assert_eq!(master.seen.starts.len(), 1);
    wait_wrapper_exit(wrapper_pid(&master), Duration::from_secs(5)).await;
    let log = run.log_text();
    assert!(
        log.contains("Job completed: FAILED (exit code: 3)"),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn death_by_signal_reports_128_plus_n() {
    let mut master = TestMaster::start(Behaviour::default()).await;
    let run = Run::new("signal", &master.url(), "echo before; kill -9 $$");
    run.launch_ok();
    let complete = master.wait_complete(LIMIT).await;
    assert_eq!(master.seen.text(), "before\n");
    assert_eq!(
        (complete.retcode, complete.cause, complete.signal),
        (Some(137), Some(Cause::Signal), Some(9))
    );
    wait_wrapper_exit(wrapper_pid(&master), Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_arrive_every_interval_in_real_time() {
    let mut master = TestMaster::start(Behaviour::default()).await;
    let mut run = Run::new("heartbeat", &master.url(), "sleep 3.6");
    run.set("SP_HEARTBEAT_INTERVAL", "1");
    run.launch_ok();
    master.wait_complete(LIMIT).await;
    let beats = &master.seen.heartbeats;
    assert!(beats.len() >= 3, "only {} heartbeats", beats.len());
    for pair in beats.windows(2) {
        let gap = pair[1] - pair[0];
        assert!(
            gap >= Duration::from_millis(700) && gap <= Duration::from_millis(1600),
            "gap {gap:?}"
        );
    }
    wait_wrapper_exit(wrapper_pid(&master), Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_megabytes_of_random_bytes_arrive_identical() {
    let mut master = TestMaster::start(Behaviour::default()).await;
    let run = Run::new("random", &master.url(), "cat data.bin");
    // Random bytes biased towards what breaks naive decoders: multibyte characters (which
    // reads will split), carriage returns, and invalid or truncated sequences.
    let pieces: [&[u8]; 12] = [
        b"a",
        b"Z",
        b"\n",
        b"\r",
        b"\r\n",
        "é".as_bytes(),
        "€".as_bytes(),
        "😀".as_bytes(),
        b"\xff",
        b"\xe2\x82",
        b"\xf0\x9f\x98",
        b"\"\\\t",
    ];
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
    let mut data = Vec::with_capacity(10 * 1024 * 1024 + 8);
    while data.len() < 10 * 1024 * 1024 {
        data.extend_from_slice(pieces[(rng.next() % pieces.len() as u64) as usize]);
    }
    common::write_file(&run.path("data.bin"), &data);
    run.launch_ok();
    let complete = master.wait_complete(Duration::from_secs(60)).await;
    assert_eq!(complete.retcode, Some(0));
    let expected = String::from_utf8_lossy(&data);
    let got = master.seen.text();
    assert_eq!(got.len(), expected.len());
    assert_eq!(hash(&got), hash(&expected), "decoded text differs");
    assert!(
        master
            .seen
            .outputs
            .iter()
            .all(|o| o.2.len() <= saltpeter_proto::OUTPUT_CHUNK_BYTES)
    );
    assert_clean_stream(&master);
    wait_wrapper_exit(wrapper_pid(&master), Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_dropped_sockets_lose_and_duplicate_nothing() {
    // The master applies outputs 3, 9 and 15, then drops the socket before acking them
    // (with more outputs in flight behind them).
    let mut master = TestMaster::start(Behaviour {
        drop_after: vec![3, 9, 15],
        ..Behaviour::default()
    })
    .await;
    let cmd = "i=0; while [ $i -lt 400 ]; do echo \"line $i\"; i=$((i+1)); \
               [ $((i % 20)) -eq 0 ] && sleep 0.05; done";
    let mut run = Run::new("drops", &master.url(), cmd);
    run.set("SP_OUTPUT_INTERVAL_MS", "10");
    run.launch_ok();
    master.wait_complete(Duration::from_secs(40)).await;
    let expected: String = (0..400).map(|i| format!("line {i}\n")).collect();
    assert_eq!(master.seen.text(), expected);
    assert!(
        master.seen.outputs.len() > 16,
        "only {} outputs",
        master.seen.outputs.len()
    );
    assert_eq!(master.seen.connects.len(), 4, "one connect per socket");
    assert_eq!(
        master.seen.starts.len(),
        1,
        "start is acked once and never resent"
    );
    assert_clean_stream(&master);
    wait_wrapper_exit(wrapper_pid(&master), Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnected_wrapper_heartbeats_at_once_after_a_jittered_pause() {
    // The master drops the socket after the first output; the job stays quiet for 3 s, less
    // than the 5 s heartbeat interval, so only an immediate heartbeat can arrive in between.
    let mut master = TestMaster::start(Behaviour {
        drop_after: vec![0],
        ..Behaviour::default()
    })
    .await;
    let run = Run::new("rebeat", &master.url(), "echo first; sleep 3; echo last");
    run.launch_ok();
    master.wait_complete(LIMIT).await;
    assert_eq!(master.seen.text(), "first\nlast\n");
    let seen = &master.seen;
    assert_eq!(seen.connect_times.len(), 2, "one reconnect");
    let (first, again) = (seen.connect_times[0], seen.connect_times[1]);
    // The pause before reconnecting is at most the first backoff window (1 s), plus the
    // time the job took to write its first line after connecting.
    assert!(
        again - first <= Duration::from_millis(2_500),
        "reconnected {:?} after the first connect",
        again - first
    );
    let first_beat = seen.heartbeats.iter().find(|t| **t >= again);
    assert!(
        first_beat.is_some_and(|t| *t - again < Duration::from_millis(500)),
        "no heartbeat right after the reconnect: connect at {again:?}, heartbeats {:?}",
        seen.heartbeats
    );
    assert_clean_stream(&master);
    wait_wrapper_exit(wrapper_pid(&master), Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_megabytes_while_the_master_is_unreachable_arrive_after_it_returns() {
    let mut master = TestMaster::start(Behaviour {
        accept_later: true,
        ..Behaviour::default()
    })
    .await;
    let run = Run::new("unreachable", &master.url(), "cat data.txt; touch written");
    // Printable text in lines of varying length.
    let mut rng = XorShift(0x1234_5678_9abc_def1);
    let mut data = String::with_capacity(50 * 1024 * 1024 + 200);
    while data.len() < 50 * 1024 * 1024 {
        let len = 20 + rng.next() % 150;
        data.extend((0..len).map(|i| (b'!' + ((rng.next() >> (i % 8)) % 94) as u8) as char));
        data.push('\n');
    }
    common::write_file(&run.path("data.txt"), data.as_bytes());
    let launched = std::time::Instant::now();
    run.launch_ok();

    // The job must finish writing while the master is still unreachable: its pipe is
    // drained into the spool whatever the connection state.
    let marker = run.path("written");
    while !marker.exists() {
        assert!(
            launched.elapsed() < Duration::from_secs(15),
            "the job was held up writing"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let write_time = launched.elapsed();
    assert!(master.seen.connects.is_empty());
    master.idle(Duration::from_millis(100)).await;
    assert!(
        master.seen.connects.is_empty(),
        "the master was not accepting yet"
    );

    // The wrapper's memory stayed bounded although 50 MB waited for the master.
    let wrapper = run.daemon_pid().expect("wrapper pid in its log");
    let hwm = vm_kib(wrapper, "VmHWM").expect("wrapper still running");
    assert!(hwm < 40 * 1024, "wrapper peak RSS {hwm} KiB");

    master.start_accepting();
    let complete = master.wait_complete(Duration::from_secs(60)).await;
    assert_eq!(complete.retcode, Some(0));
    let got = master.seen.text();
    assert_eq!(got.len(), data.len());
    assert_eq!(hash(&got), hash(&data), "output differs");
    assert_clean_stream(&master);
    wait_wrapper_exit(wrapper_pid(&master), Duration::from_secs(5)).await;
    eprintln!(
        "50 MB written in {write_time:?} while the master was unreachable; peak RSS {hwm} KiB"
    );
}

fn vm_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_reports_143_and_leaves_no_process_of_the_group() {
    let mut master = TestMaster::start(Behaviour::default()).await;
    // A grandchild that ignores SIGTERM, so only the SIGKILL after the grace ends it.
    let cmd = "sh -c 'trap \"\" TERM; echo grandchild $$; exec sleep 300' & echo ready; wait";
    let run = Run::new("kill", &master.url(), cmd);
    run.launch_ok();
    master
        .wait_for(LIMIT, "both processes running", |s| {
            let text = s.text();
            text.contains("ready") && text.contains("grandchild")
        })
        .await;
    let pgid = master.seen.starts[0].1.pid;
    let grandchild: u32 = master
        .seen
        .text()
        .split("grandchild ")
        .nth(1)
        .and_then(|t| t.split('\n').next())
        .and_then(|p| p.trim().parse().ok())
        .expect("grandchild pid");
    assert!(group_members(pgid).contains(&grandchild));
    let killed_at = tokio::time::Instant::now();
    master.kill(&run);
    let complete = master.wait_complete(LIMIT).await;
    let took = killed_at.elapsed();
    assert_eq!(
        (complete.retcode, complete.cause),
        (Some(143), Some(Cause::Killed))
    );
    assert!(
        master.seen.text().ends_with(KILLED_LINE),
        "{:?}",
        master.seen.text()
    );
    assert_eq!(master.seen.outputs.last().unwrap().1, "stderr");
    assert!(
        group_members(pgid).is_empty(),
        "survivors: {:?}",
        group_members(pgid)
    );
    assert!(!common::alive(grandchild));
    // SIGTERM was ignored by the grandchild, so SIGKILL came after the grace period.
    assert!(
        took >= Duration::from_millis(4500),
        "complete after {took:?}"
    );
    assert_clean_stream(&master);
    wait_wrapper_exit(wrapper_pid(&master), Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeout_reports_124() {
    let mut master = TestMaster::start(Behaviour::default()).await;
    let mut run = Run::new("timeout", &master.url(), "echo before; sleep 30");
    run.set("SP_TIMEOUT", "1");
    run.launch_ok();
    let complete = master.wait_complete(LIMIT).await;
    assert_eq!(
        (complete.retcode, complete.cause),
        (Some(124), Some(Cause::Timeout))
    );
    assert_eq!(master.seen.text(), format!("before\n{}", timeout_line(1)));
    let started = master.seen.starts[0].0;
    let took = master.seen.complete.as_ref().unwrap().0 - started;
    assert!(took < Duration::from_secs(4), "timeout took {took:?}");
    assert!(group_members(master.seen.starts[0].1.pid).is_empty());
    wait_wrapper_exit(wrapper_pid(&master), Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_conflict_reports_254_through_the_protocol() {
    let mut master = TestMaster::start(Behaviour::default()).await;
    let mut run = Run::new("lock", &master.url(), "touch ran");
    let lockfile = run.path("job.lock");
    run.set("SP_ALLOW_OVERLAP", "false")
        .set("SP_LOCKFILE", lockfile.to_str().unwrap());
    // Another run holds the lock: this test process, with its PID in the file.
    let holder = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&lockfile)
        .unwrap();
    holder.try_lock().unwrap();
    std::fs::write(&lockfile, format!("{}\n", std::process::id())).unwrap();

    let out = run.launch_ok();
    let msg = format!(
        "LOCKFILE ERROR: Job {} already running (PID {}), overlap not allowed\n",
        run.job,
        std::process::id()
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains(msg.trim_end()));
    let complete = master.wait_complete(LIMIT).await;
    assert_eq!(
        (complete.retcode, complete.cause),
        (Some(254), Some(Cause::Lock))
    );
    assert_eq!(master.seen.text(), msg);
    assert_eq!(
        Some(master.seen.starts[0].1.pid),
        master.seen.connects[0].wrapper_pid
    );
    assert!(!run.path("ran").exists(), "the job must not run");
    wait_wrapper_exit(wrapper_pid(&master), Duration::from_secs(5)).await;

    // Once released, the next run takes the lock and records its own PID while it runs.
    drop(holder);
    let mut master = TestMaster::start(Behaviour::default()).await;
    run.set("SP_WEBSOCKET_URL", &master.url())
        .set("SP_COMMAND", "cat job.lock");
    run.launch_ok();
    let complete = master.wait_complete(LIMIT).await;
    assert_eq!(complete.retcode, Some(0));
    assert_eq!(master.seen.text(), format!("{}\n", wrapper_pid(&master)));
    wait_wrapper_exit(wrapper_pid(&master), Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lock_is_free_once_complete_is_sent() {
    // A master may launch the next attempt the moment `complete` arrives; that attempt must
    // not find the lock still held by a wrapper that is waiting for its ack.
    let mut master = TestMaster::start(Behaviour {
        silent_on_complete: true,
        ..Behaviour::default()
    })
    .await;
    let mut run = Run::new("lockfree", &master.url(), "exit 3");
    let lockfile = run.path("job.lock");
    run.set("SP_ALLOW_OVERLAP", "false")
        .set("SP_LOCKFILE", lockfile.to_str().unwrap());
    run.launch_ok();
    let complete = master.wait_complete(LIMIT).await;
    assert_eq!(complete.retcode, Some(3));
    let pid = wrapper_pid(&master);
    assert!(common::alive(pid), "the wrapper must still be delivering");
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&lockfile)
        .unwrap();
    let taken = file.try_lock();
    common::kill_started(pid, "sp-wrapper");
    assert!(taken.is_ok(), "the lock is still held: {taken:?}");
    wait_wrapper_exit(pid, Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_planted_at_the_lock_path_is_refused_and_its_target_untouched() {
    let mut master = TestMaster::start(Behaviour::default()).await;
    let mut run = Run::new("locklink", &master.url(), "touch ran");
    let victim = run.path("victim");
    std::fs::write(&victim, "precious\n").unwrap();
    let lockfile = run.path("job.lock");
    std::os::unix::fs::symlink(&victim, &lockfile).unwrap();
    run.set("SP_ALLOW_OVERLAP", "false")
        .set("SP_LOCKFILE", lockfile.to_str().unwrap());

    let out = run.launch_ok();
    let msg = format!(
        "LOCKFILE ERROR: Refusing to use the lockfile: {} is a symbolic link\n",
        lockfile.display()
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains(msg.trim_end()), "{stdout}");
    let complete = master.wait_complete(LIMIT).await;
    assert_eq!(
        (complete.retcode, complete.cause),
        (Some(254), Some(Cause::Lock))
    );
    assert_eq!(master.seen.text(), msg);
    assert!(!run.path("ran").exists(), "the job must not run");
    wait_wrapper_exit(wrapper_pid(&master), Duration::from_secs(5)).await;
    // Neither the open nor the daemon's exit (which empties a lock it held) touched it.
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious\n");
    assert!(
        std::fs::symlink_metadata(&lockfile)
            .unwrap()
            .file_type()
            .is_symlink()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_lock_is_private_and_not_inherited_by_the_job() {
    let mut master = TestMaster::start(Behaviour::default()).await;
    let uid = nix::unistd::Uid::effective();
    // The tests clear the environment, so a non-root run has no XDG_RUNTIME_DIR.
    let dir = if uid.is_root() {
        std::path::PathBuf::from("/run/saltpeter")
    } else {
        eprintln!("note: not root; checking the per-user lock directory instead of /run");
        std::path::PathBuf::from(format!("/tmp/saltpeter-{uid}"))
    };
    let mut run = Run::new("lockdefault", &master.url(), "");
    let lockfile = dir.join(format!("{}.lock", run.job));
    let cmd = format!(
        "stat -c '%a %u %F' {d} {l}; cat {l}; ls -l /proc/self/fd",
        d = dir.display(),
        l = lockfile.display()
    );
    run.set("SP_ALLOW_OVERLAP", "false").set("SP_COMMAND", &cmd);
    run.launch_ok();
    let complete = master.wait_complete(LIMIT).await;
    let text = master.seen.text();
    assert_eq!(complete.retcode, Some(0), "{text}");
    let lines: Vec<&str> = text.lines().collect();
    let dir_mode = lines[0].split(' ').next().unwrap_or_default();
    assert!(
        ["700", "755"].contains(&dir_mode) && lines[0].ends_with(&format!(" {uid} directory")),
        "{text}"
    );
    assert_eq!(lines[1], format!("600 {uid} regular file"), "{text}");
    assert_eq!(lines[2], wrapper_pid(&master).to_string(), "{text}");
    assert!(!lockfile.starts_with("/tmp") || !uid.is_root());
    // The job sees its three standard descriptors and the one `ls` opens, never the lock.
    assert!(
        !text.contains(".lock"),
        "the job inherited the lock: {text}"
    );
    wait_wrapper_exit(wrapper_pid(&master), Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn background_process_holding_stdout_does_not_delay_complete() {
    let mut master = TestMaster::start(Behaviour::default()).await;
    let run = Run::new("background", &master.url(), "sleep 600 & echo $!");
    run.launch_ok();
    let complete = master.wait_complete(LIMIT).await;
    let sleeper: u32 = master.seen.text().trim().parse().expect("pid of sleep");
    let took = master.seen.complete.as_ref().unwrap().0 - master.seen.starts[0].0;
    common::kill_started(sleeper, "sleep");
    assert_eq!(complete.retcode, Some(0));
    assert!(
        took <= Duration::from_secs(3),
        "complete came {took:?} after start"
    );
    wait_wrapper_exit(wrapper_pid(&master), Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_to_the_wrapper_ends_the_job_and_reports_it() {
    let mut master = TestMaster::start(Behaviour::default()).await;
    let run = Run::new("sigterm", &master.url(), "echo up; sleep 300");
    run.launch_ok();
    master
        .wait_for(LIMIT, "output", |s| s.text().contains("up"))
        .await;
    let wrapper = wrapper_pid(&master);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(wrapper as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let complete = master.wait_complete(LIMIT).await;
    assert_eq!(
        (complete.retcode, complete.cause),
        (Some(143), Some(Cause::WrapperTerminated))
    );
    assert!(group_members(master.seen.starts[0].1.pid).is_empty());
    wait_wrapper_exit(wrapper, Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_not_found_ends_delivery_at_once_and_keeps_the_output_locally() {
    let mut master = TestMaster::start(Behaviour {
        reject_complete: true,
        ..Behaviour::default()
    })
    .await;
    let run = Run::new("rejected", &master.url(), "echo kept");
    run.launch_ok();
    master.wait_complete(LIMIT).await;
    wait_wrapper_exit(wrapper_pid(&master), Duration::from_secs(5)).await;
    let log = run.log_text();
    assert!(
        log.contains("Master rejected the run (JobNotFound"),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_during_the_run_keeps_all_output_locally_and_never_reconnects() {
    let mut master = TestMaster::start(Behaviour {
        reject_start: true,
        ..Behaviour::default()
    })
    .await;
    let run = Run::new("refused", &master.url(), "echo one; sleep 0.3; echo two");
    run.launch_ok();
    master
        .wait_for(LIMIT, "start", |s| !s.starts.is_empty())
        .await;
    wait_wrapper_exit(wrapper_pid(&master), Duration::from_secs(5)).await;
    master.idle(Duration::from_millis(50)).await;
    assert_eq!(master.seen.accepted, 1, "a refused run must not reconnect");
    assert!(master.seen.outputs.is_empty());
    let log = run.log_text();
    assert!(
        log.contains("--- UNDELIVERED OUTPUT START ---\none\ntwo\n\n"),
        "{log}"
    );
    assert!(log.contains("Job completed: SUCCESS"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_as_sp_user_with_its_uid_gid_groups_and_environment() {
    if !nix::unistd::Uid::effective().is_root() {
        // CI runs as root, so there the privilege drop is always exercised; a developer's
        // unprivileged run can only say it did not.
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must run this test as root: it is the proof that the privilege drop works"
        );
        eprintln!("skipped: needs root to switch users");
        return;
    }
    let nobody = nix::unistd::User::from_name("nobody")
        .unwrap()
        .expect("user nobody");
    let name = std::ffi::CString::new("nobody").unwrap();
    let groups = nix::unistd::getgrouplist(&name, nobody.gid).unwrap();
    let mut master = TestMaster::start(Behaviour::default()).await;
    let cmd = "id -u; id -g; id -G; echo \"$HOME $USER $LOGNAME $SHELL\"";
    let mut run = Run::new("runas", &master.url(), cmd);
    run.set("SP_USER", "nobody").set("SP_CWD", "/");
    run.launch_ok();
    let complete = master.wait_complete(LIMIT).await;
    assert_eq!(complete.retcode, Some(0), "{}", master.seen.text());
    let mut want_groups: Vec<u32> = groups.iter().map(|g| g.as_raw()).collect();
    want_groups.sort_unstable();
    let text = master.seen.text();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], nobody.uid.to_string());
    assert_eq!(lines[1], nobody.gid.to_string());
    let mut got_groups: Vec<u32> = lines[2].split(' ').map(|g| g.parse().unwrap()).collect();
    got_groups.sort_unstable();
    assert_eq!(got_groups, want_groups, "supplementary groups");
    assert_eq!(
        lines[3],
        format!(
            "{} nobody nobody {}",
            nobody.dir.display(),
            nobody.shell.display()
        )
    );
    wait_wrapper_exit(wrapper_pid(&master), Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_or_invalid_configuration_fails_before_forking() {
    let master = TestMaster::start(Behaviour::default()).await;
    let cases: [(&str, Option<&str>, &str); 7] = [
        (
            "SP_COMMAND",
            None,
            "Error: SP_COMMAND environment variable not set",
        ),
        (
            "SP_WEBSOCKET_URL",
            None,
            "Error: SP_WEBSOCKET_URL environment variable not set",
        ),
        ("SP_TIMEOUT", Some("soon"), "SP_TIMEOUT"),
        ("SP_CWD", Some("/nonexistent/sp-test"), "SP_CWD"),
        ("SP_USER", Some("no-such-user-sp-test"), "SP_USER"),
        // Set but empty: refused rather than taken to mean the wrapper's own user (root).
        ("SP_USER", Some(""), "Error: SP_USER is set but empty"),
        // A timeout this large would overflow the job's deadline once it ran.
        ("SP_TIMEOUT", Some("18446744073709551615"), "SP_TIMEOUT"),
    ];
    for (var, value, want) in cases {
        let mut run = Run::new("config", &master.url(), "touch ran");
        match value {
            Some(v) => run.set(var, v),
            None => run.unset(var),
        };
        let (out, took) = run.launch();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{var}: {stderr}");
        assert!(stderr.contains(want), "{var}: {stderr}");
        assert!(!String::from_utf8_lossy(&out.stdout).contains("started"));
        assert!(took < Duration::from_secs(2));
        // No daemon ever ran: it would have created the log directory and run the job.
        assert!(!run.path("log").exists(), "{var}: a daemon started");
        assert!(!run.path("ran").exists());
    }
}

#[test]
fn version_flag_prints_the_version() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sp-wrapper"))
        .arg("--version")
        .env_clear()
        .output()
        .unwrap();
    assert!(out.status.success());
    // The original's first line, then the commit in parentheses (`unknown` without git).
    let stdout = String::from_utf8_lossy(&out.stdout);
    let prefix = format!("Saltpeter Wrapper version {} (", env!("CARGO_PKG_VERSION"));
    assert!(
        stdout.starts_with(&prefix) && stdout.ends_with(")\n") && stdout.lines().count() == 1,
        "{stdout:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_inherits_only_its_standard_descriptors_and_not_the_run_token() {
    let mut master = TestMaster::start(Behaviour::default()).await;
    // `ls` itself opens the directory as descriptor 3; anything beyond would be a leak of
    // the wrapper's lock, log, socket or readiness pipe.
    let cmd = "ls /proc/self/fd; echo \"token=${SP_RUN_TOKEN:-unset} job=$SP_JOB_NAME\"";
    let run = Run::new("fds", &master.url(), cmd);
    run.launch_ok();
    master.wait_complete(LIMIT).await;
    assert_eq!(
        master.seen.text(),
        format!("0\n1\n2\n3\ntoken=unset job={}\n", run.job)
    );
    wait_wrapper_exit(wrapper_pid(&master), Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrapper_killed_with_sigkill_takes_its_job_along() {
    let mut master = TestMaster::start(Behaviour::default()).await;
    let run = Run::new("pdeathsig", &master.url(), "echo up; exec sleep 300");
    run.launch_ok();
    master
        .wait_for(LIMIT, "output", |s| s.text().contains("up"))
        .await;
    let job = master.seen.starts[0].1.pid;
    let wrapper = wrapper_pid(&master);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(wrapper as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    while common::alive(job) {
        if std::time::Instant::now() > deadline {
            common::kill_started(job, "sleep");
            panic!("the job outlived its wrapper");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A server configuration with a fresh self-signed certificate, and its fingerprint.
fn self_signed_tls() -> (
    std::sync::Arc<saltpeter_tls::rustls::ServerConfig>,
    saltpeter_tls::Fingerprint,
) {
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
        .expect("params")
        .self_signed(&key)
        .expect("certificate");
    let der = saltpeter_tls::rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der())
        .expect("key der");
    let config =
        saltpeter_tls::rustls::ServerConfig::builder_with_provider(saltpeter_tls::provider())
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(vec![cert.der().clone()], der)
            .expect("server config");
    (
        std::sync::Arc::new(config),
        saltpeter_tls::Fingerprint::of(cert.der().as_ref()),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_wss_the_wrapper_delivers_to_the_pinned_certificate_only() {
    let (tls, pin) = self_signed_tls();
    let mut master = TestMaster::start(Behaviour {
        tls: Some(tls.clone()),
        ..Behaviour::default()
    })
    .await;
    let mut run = Run::new(
        "pinned",
        &master.tls_url(),
        "printf 'secret output\\n'; exit 4",
    );
    run.set("SP_TLS_FINGERPRINT", &pin.to_string());
    run.launch_ok();
    let complete = master.wait_complete(LIMIT).await;
    assert_eq!(master.seen.text(), "secret output\n");
    assert_eq!(complete.retcode, Some(4));
    assert_clean_stream(&master);

    // A master whose certificate has another fingerprint gets no message: the wrapper breaks
    // off every handshake.
    let (_, other_pin) = self_signed_tls();
    let mut impostor = TestMaster::start(Behaviour {
        tls: Some(tls),
        ..Behaviour::default()
    })
    .await;
    // The job records its parent, the wrapper daemon, which would otherwise keep trying to
    // deliver for minutes.
    let mut run = Run::new("impostor", &impostor.tls_url(), "true");
    let pid_file = run.path("daemon.pid");
    run.set(
        "SP_COMMAND",
        &format!("echo $PPID > '{}'", pid_file.display()),
    );
    run.set("SP_TLS_FINGERPRINT", &other_pin.to_string());
    run.launch_ok();
    impostor
        .wait_for(LIMIT, "a refused handshake", |seen| seen.tls_refused >= 1)
        .await;
    impostor.idle(Duration::from_millis(500)).await;
    assert_eq!(impostor.seen.accepted, 0);
    assert!(impostor.seen.connects.is_empty());
    if let Ok(pid) = std::fs::read_to_string(&pid_file)
        && let Ok(pid) = pid.trim().parse()
    {
        common::kill_started(pid, "sp-wrapper");
    }
}

/// A `ws://` URL of a loopback port nothing listens on: connections to it are refused.
fn closed_port_url() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind loopback");
    let addr = listener.local_addr().expect("local addr");
    drop(listener);
    format!("ws://{addr}")
}

/// The lines the failover tests' jobs print, with pauses so that the run outlasts a switch.
fn numbered_lines(count: usize, pause: &str) -> (String, String) {
    let cmd = format!(
        "i=0; while [ $i -lt {count} ]; do echo \"line $i\"; i=$((i+1)); sleep {pause}; done"
    );
    let expected = (0..count).map(|i| format!("line {i}\n")).collect();
    (cmd, expected)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_that_does_not_hold_the_job_sends_the_wrapper_to_the_next_one() {
    let mut elsewhere = TestMaster::start(Behaviour {
        not_holder: true,
        ..Behaviour::default()
    })
    .await;
    // The holder drops a connection that worked mid-run: the wrapper must come back to it
    // first, not start over at the master that does not hold the job.
    let mut holder = TestMaster::start(Behaviour {
        drop_after: vec![3],
        ..Behaviour::default()
    })
    .await;
    let (cmd, expected) = numbered_lines(40, "0.03");
    let mut run = Run::new("notholder", &elsewhere.url(), &cmd);
    let urls = format!("{}, {}", elsewhere.url(), holder.url());
    run.set("SP_WEBSOCKET_URLS", &urls);
    run.launch_ok();
    holder.wait_complete(LIMIT).await;
    assert_eq!(holder.seen.text(), expected);
    assert_clean_stream(&holder);
    assert_eq!(
        holder.seen.connects.len(),
        2,
        "one reconnect after the drop"
    );
    assert_eq!(holder.seen.starts.len(), 1);
    wait_wrapper_exit(wrapper_pid(&holder), Duration::from_secs(5)).await;
    elsewhere.idle(Duration::from_millis(100)).await;
    assert_eq!(
        elsewhere.seen.connects.len(),
        1,
        "the master that does not hold the job is asked once"
    );
    assert!(elsewhere.seen.outputs.is_empty() && elsewhere.seen.starts.is_empty());
    let log = run.log_text();
    let switch = format!(
        "Switching from master {} (it does not hold the job) to master {} at once",
        elsewhere.url(),
        holder.url()
    );
    assert!(log.contains(&switch), "{log}");
    assert!(
        log.contains(&format!("Delivering to master {}", holder.url())),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_first_master_sends_the_wrapper_to_the_next_one() {
    let mut second = TestMaster::start(Behaviour::default()).await;
    let dead = closed_port_url();
    let run = {
        let mut run = Run::new("firstdead", &dead, "printf 'one\\ntwo\\n'; exit 7");
        run.set("SP_WEBSOCKET_URLS", &format!("{dead}\n{}", second.url()));
        run
    };
    run.launch_ok();
    let complete = second.wait_complete(LIMIT).await;
    assert_eq!(second.seen.text(), "one\ntwo\n");
    assert_eq!(complete.retcode, Some(7));
    assert_clean_stream(&second);
    assert_eq!(second.seen.connects.len(), 1);
    wait_wrapper_exit(wrapper_pid(&second), Duration::from_secs(5)).await;
    let log = run.log_text();
    let switch = format!("Switching from master {dead} (cannot reach it: ");
    assert!(log.contains(&switch), "{log}");
    assert!(
        log.contains(&format!("to master {} at once", second.url())),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_that_dies_mid_run_leaves_the_rest_to_the_next_one_without_loss() {
    // The first master applies output 5 and dies before making it durable: it acked 0..=4
    // only. The next master took the job over and holds what was durable, 0..=4, so the
    // wrapper must resend 5, which it kept because no master acknowledged it.
    let mut first = TestMaster::start(Behaviour {
        vanish_after: Some(5),
        ..Behaviour::default()
    })
    .await;
    let mut next = TestMaster::start(Behaviour {
        held_through: Some(4),
        ..Behaviour::default()
    })
    .await;
    let (cmd, expected) = numbered_lines(60, "0.03");
    let mut run = Run::new("failover", &first.url(), &cmd);
    run.set(
        "SP_WEBSOCKET_URLS",
        &format!("{},{}", first.url(), next.url()),
    );
    run.launch_ok();
    let complete = next.wait_complete(LIMIT).await;
    assert_eq!(complete.retcode, Some(0));
    first.idle(Duration::from_millis(100)).await;

    assert_eq!(first.seen.acked, [0, 1, 2, 3, 4]);
    let resent: Vec<u64> = next.seen.outputs.iter().map(|o| o.0).collect();
    let total = complete.seq.expect("complete carries its seq");
    assert_eq!(
        resent,
        (5..total).collect::<Vec<_>>(),
        "no gap, no duplicate"
    );
    assert!(next.seen.duplicates.is_empty() && next.seen.gaps.is_empty());
    // What the two masters acknowledged is the whole output, each seq once.
    let mut acked = first.seen.acked.clone();
    acked.extend(&next.seen.acked);
    assert_eq!(acked, (0..total).collect::<Vec<_>>());
    let durable_first: String = first
        .seen
        .outputs
        .iter()
        .filter(|o| first.seen.acked.contains(&o.0))
        .map(|o| o.2.as_str())
        .collect();
    assert_eq!(format!("{durable_first}{}", next.seen.text()), expected);
    // `start` was acked by the first master and is not sent again.
    assert_eq!((first.seen.starts.len(), next.seen.starts.len()), (1, 0));
    wait_wrapper_exit(wrapper_pid(&first), Duration::from_secs(5)).await;
    let log = run.log_text();
    assert!(
        log.contains(&format!(
            "Switching from master {} (cannot reach it: ",
            first.url()
        )),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_wss_each_master_of_a_cluster_is_pinned_by_its_own_fingerprint() {
    let (tls_a, pin_a) = self_signed_tls();
    let (tls_b, pin_b) = self_signed_tls();
    let mut elsewhere = TestMaster::start(Behaviour {
        tls: Some(tls_a),
        not_holder: true,
        ..Behaviour::default()
    })
    .await;
    let mut holder = TestMaster::start(Behaviour {
        tls: Some(tls_b),
        ..Behaviour::default()
    })
    .await;
    let mut run = Run::new("pins", &elsewhere.tls_url(), "echo pinned twice");
    run.set(
        "SP_WEBSOCKET_URLS",
        &format!("{} {}", elsewhere.tls_url(), holder.tls_url()),
    )
    .set("SP_TLS_FINGERPRINT", &format!("{pin_b}, {pin_a}"));
    run.launch_ok();
    holder.wait_complete(LIMIT).await;
    assert_eq!(holder.seen.text(), "pinned twice\n");
    assert_clean_stream(&holder);
    wait_wrapper_exit(wrapper_pid(&holder), Duration::from_secs(5)).await;
    elsewhere.idle(Duration::from_millis(100)).await;
    // Both certificates were accepted: the first master got as far as `connect`.
    assert_eq!(elsewhere.seen.connects.len(), 1);
    assert_eq!(elsewhere.seen.tls_refused + holder.seen.tls_refused, 0);
}
