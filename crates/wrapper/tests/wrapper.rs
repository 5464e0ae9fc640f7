//! Integration tests of `sp-wrapper` (issue 2 §4): the real binary, real processes and a real
//! WebSocket test master on loopback. Every wait is bounded; every process a test starts is
//! ended by PID if it outlives the test.

mod common;

use std::time::Duration;

use common::{Behaviour, Run, TestMaster, XorShift, hash, wait_wrapper_exit};
use saltpeter_proto::{Cause, PROTOCOL_VERSION};

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
            gap >= Duration::from_millis(800) && gap <= Duration::from_millis(1300),
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
