//! The daemon's life after the double fork: build the runtime, spawn the job, report
//! readiness to the invoking process, supervise the job, drain its output, and deliver the
//! result; whatever cannot be delivered goes to the local log in full.
//!
//! Everything runs on one thread (a current-thread runtime): the wrapper's work is I/O bound,
//! one thread keeps it lean, and the job is spawned from the thread that lives as long as the
//! wrapper, which the parent-death signal requires.

use std::io::{PipeWriter, Write};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use saltpeter_proto::{Cause, EXIT_NOT_STARTED, KILLED_LINE, Timestamp, timeout_line};
use tokio::sync::{mpsc, oneshot, watch};

use crate::config::Config;
use crate::job::{self, Ended, Reaper, Stop, StopSignals};
use crate::link::{self, Delivery, LinkConfig, LinkInput};
use crate::lock::LockState;
use crate::log::Log;
use crate::outbox::{Chunk, MEMORY_CAP, Outbox, Stream};
use crate::output::{self, PumpEnd};
use crate::session::Completion;

/// How long the output pipe is still read after the job's shell exited, for processes it
/// left in the background that keep the pipe open (docs/COMPATIBILITY.md: background children holding the pipe).
const DRAIN_GRACE: Duration = Duration::from_secs(2);
/// How long delivery of `complete` is retried (the run's result matters more than a quick
/// exit).
const DELIVER_WITHIN: Duration = Duration::from_secs(600);
/// Delivery time when the wrapper itself was told to stop: whoever sent SIGTERM (a shutdown)
/// will not wait ten minutes.
const DELIVER_WITHIN_STOPPING: Duration = Duration::from_secs(20);
/// The notice appended when the wrapper itself was stopped.
const WRAPPER_STOPPED_LINE: &str = "\n[Job terminated because the wrapper was stopped]\n";

/// The wrapper's version, as reported to Salt and in `start`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The git commit this binary was built from (`build.rs`), shown by `--version`.
pub const COMMIT: &str = env!("SP_GIT_COMMIT");

/// Runs the daemon to the end. `ready` is the write end of the readiness pipe.
pub fn daemon(cfg: Config, lock: LockState, mut ready: PipeWriter) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            let _ = writeln!(ready, "error cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(controller(cfg, lock, ready))
}

/// Why the job did not run.
enum NotRun {
    Lock(String),
    Spawn(String),
}

async fn controller(cfg: Config, mut lock: LockState, mut ready: PipeWriter) -> ExitCode {
    let wrapper_pid = std::process::id();
    if let LockState::Held(held) = &mut lock {
        // The PID in the file is informational; failing to write it changes nothing.
        let _ = held.record_pid(wrapper_pid);
    }
    let (log, log_error) = Log::open(
        cfg.log_level,
        &cfg.log_dir,
        &cfg.job_name,
        &cfg.job_instance,
    );
    let log = Arc::new(log);
    if let LockState::Held(held) = &lock {
        log.debug(format!(
            "Holding the overlap lock {}",
            held.path().display()
        ));
    }

    // Signal handlers are installed before the job exists, so no exit and no stop request
    // can slip by unnoticed.
    let setup = (|| -> std::io::Result<(Reaper, StopSignals)> {
        if !job::become_subreaper()? {
            log.info("Cannot become the reaper of the job's orphans here (no PR_SET_CHILD_SUBREAPER); background processes the job leaves go to init.");
        }
        Ok((Reaper::new()?, StopSignals::new()?))
    })();
    let (mut reaper, mut signals) = match setup {
        Ok(pair) => pair,
        Err(e) => {
            let _ = writeln!(ready, "error cannot set up signal handling: {e}");
            log.info(format!("Cannot set up signal handling: {e}"));
            return ExitCode::FAILURE;
        }
    };

    let started_at = Timestamp::now();
    let spawned = match &lock {
        LockState::Refused(msg) => Err(NotRun::Lock(msg.clone())),
        _ => job::spawn(&cfg).map_err(|e| NotRun::Spawn(e.to_string())),
    };
    // Tell the invoking process, which is waiting to return to Salt.
    let verdict = match &spawned {
        Ok(job) => format!("ok {}", job.pid),
        Err(NotRun::Lock(_)) => String::from("locked"),
        Err(NotRun::Spawn(e)) => format!("error cannot start the job: {e}"),
    };
    let _ = writeln!(ready, "{verdict}");
    drop(ready);

    let start_pid = match &spawned {
        Ok(job) => job.pid.as_raw().unsigned_abs(),
        Err(_) => wrapper_pid,
    };
    let link_cfg = LinkConfig {
        urls: cfg.websocket_urls.clone(),
        job_name: cfg.job_name.clone(),
        job_instance: cfg.job_instance.clone(),
        machine: cfg.machine.clone(),
        token: cfg.run_token.clone(),
        machine_key: cfg.machine_key.clone(),
        wrapper_pid,
        start_pid,
        started_at,
        version: VERSION.to_owned(),
        heartbeat: cfg.heartbeat_interval,
        tls: cfg.tls.clone(),
    };
    let spool_dirs = vec![cfg.log_dir.clone(), std::env::temp_dir()];
    let outbox = Outbox::new(
        MEMORY_CAP,
        spool_dirs,
        &format!("sp_wrapper_{}", cfg.job_name),
    );
    let (input, input_rx) = mpsc::channel(4);
    let (kill_tx, mut kills) = mpsc::channel(1);
    let (abort_tx, abort_rx) = oneshot::channel();
    let mut link = tokio::spawn(link::run(
        link_cfg,
        input_rx,
        kill_tx,
        abort_rx,
        outbox,
        log.clone(),
    ));

    if let Some(msg) = log_error {
        emit(&input, Stream::Stdout, msg).await;
    }
    let completion = match spawned {
        Err(NotRun::Lock(msg)) => {
            log.info(format!("LOCKFILE ERROR: {msg}"));
            emit(&input, Stream::Stdout, format!("LOCKFILE ERROR: {msg}\n")).await;
            Completion {
                retcode: EXIT_NOT_STARTED,
                cause: Cause::Lock,
                signal: None,
            }
        }
        Err(NotRun::Spawn(e)) => {
            log.info(format!("Cannot start job: {e}"));
            emit(
                &input,
                Stream::Stdout,
                format!("SPAWN ERROR: cannot start the job: {e}\n"),
            )
            .await;
            Completion {
                retcode: EXIT_NOT_STARTED,
                cause: Cause::SpawnError,
                signal: None,
            }
        }
        Ok(job) => {
            log.info(format!(
                "Starting job (pid {}, wrapper pid {wrapper_pid}): {}",
                job.pid, cfg.command
            ));
            let (deadline_tx, deadline_rx) = watch::channel(None);
            let pump = tokio::spawn(output::pump(
                job.pipe,
                input.clone(),
                cfg.output_interval,
                deadline_rx,
            ));
            let ended: Ended = job::supervise(
                job.pid,
                &mut reaper,
                cfg.timeout,
                &mut kills,
                &mut signals,
                &log,
            )
            .await;
            let _ = deadline_tx.send(Some(ended.exited_at + DRAIN_GRACE));
            match pump.await {
                Ok(PumpEnd::Deadline) => {
                    log.info("Background processes still hold the job's output; stopped reading it")
                }
                Ok(PumpEnd::ReadError) => log.info("Reading the job's output failed"),
                Ok(PumpEnd::LinkGone) => {
                    log.info("The link to the master failed; later output was dropped");
                }
                Ok(PumpEnd::Eof) | Err(_) => {}
            }
            let notice = match ended.stop {
                Some(Stop::Timeout(t)) => Some(timeout_line(t.as_secs())),
                Some(Stop::Killed) => Some(KILLED_LINE.to_owned()),
                Some(Stop::WrapperTerminated) => Some(WRAPPER_STOPPED_LINE.to_owned()),
                None => None,
            };
            if let Some(notice) = notice {
                emit(&input, Stream::Stderr, notice).await;
            }
            ended.completion
        }
    };
    log.info(describe(&completion));
    // The job is over, so the overlap lock goes before the master hears of it: a master that
    // retries or starts the next run the moment `complete` arrives must find the lock free.
    drop(lock);

    let stopping = completion.cause == Cause::WrapperTerminated;
    let within = if stopping {
        DELIVER_WITHIN_STOPPING
    } else {
        DELIVER_WITHIN
    };
    let _ = input.send(LinkInput::Complete(completion, within)).await;
    drop(input);

    // While delivering, keep reaping the job's orphans, and let another stop signal cut
    // delivery short.
    let mut abort = Some(abort_tx);
    let end = loop {
        tokio::select! {
            end = &mut link => break end,
            () = signals.recv() => {
                if let Some(tx) = abort.take() {
                    let _ = tx.send(());
                }
            }
            () = reaper.tick() => {}
        }
    };
    match end {
        Ok(mut end) => {
            match &end.delivery {
                Delivery::Delivered => log.info("Completion delivered to the master"),
                Delivery::Rejected(code, msg) => {
                    log.info(format!("Master rejected the run ({code:?}: {msg})"));
                }
                Delivery::GaveUp => log.info(format!(
                    "CRITICAL: Failed to deliver the completion within {}s",
                    within.as_secs()
                )),
                Delivery::Aborted => log.info("Delivery abandoned: the wrapper was told to stop"),
            }
            if end.delivery != Delivery::Delivered || !end.outbox.is_empty() {
                log.info(describe(&completion));
                log.dump("UNDELIVERED OUTPUT", &mut |w| end.outbox.drain_to(w));
            }
            if let Some(e) = end.outbox.spool_error() {
                log.info(format!(
                    "Spooling output to disk failed ({e}); memory was used instead"
                ));
            }
        }
        Err(e) => log.info(format!("The link task failed: {e}")),
    }
    ExitCode::SUCCESS
}

async fn emit(input: &mpsc::Sender<LinkInput>, stream: Stream, data: String) {
    let _ = input.send(LinkInput::Output(Chunk { stream, data })).await;
}

fn describe(c: &Completion) -> String {
    match c.cause {
        Cause::Exit if c.retcode == 0 => String::from("Job completed: SUCCESS"),
        Cause::Exit => format!("Job completed: FAILED (exit code: {})", c.retcode),
        Cause::Timeout => format!("Job completed: TIMEOUT (exit code: {})", c.retcode),
        Cause::Killed => format!("Job completed: KILLED (exit code: {})", c.retcode),
        other => format!(
            "Job completed: {} (exit code: {})",
            other.as_str(),
            c.retcode
        ),
    }
}
