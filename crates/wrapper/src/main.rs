//! `sp-wrapper`: runs one saltpeter job on a minion and reports it to `sp-master`.
//!
//! This file is the synchronous start-up, in the order the Salt-visible contract needs:
//! print the version line, validate the `SP_*` environment (errors go to stderr with exit 1,
//! before anything forks), take the overlap lock, double fork, and then either wait for the
//! daemon's readiness verdict (the invoking process) or run the job (the daemon, see
//! [`run`]). No thread exists before the fork; the async runtime is built afterwards.

mod backoff;
mod config;
mod encode;
mod files;
mod identity;
mod job;
mod link;
mod lock;
mod log;
mod masters;
mod outbox;
mod output;
mod run;
mod session;
mod sys;

use std::io::{BufRead, BufReader, PipeReader};
use std::os::fd::AsRawFd;
use std::process::ExitCode;

use nix::sys::wait::waitpid;
use nix::unistd::Pid;

use crate::config::Config;
use crate::lock::LockState;
use crate::sys::Forked;

fn main() -> ExitCode {
    // Threads the process has before the wrapper does anything: one natively, two under
    // qemu-user (the emulator's own). `daemonize` refuses to fork with more.
    let threads_at_start = sys::thread_count();
    // The original accepts and ignores any argument; only these two are ours.
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--version" || a == "-V") {
        // The original's first line, with the commit this binary was built from.
        println!(
            "Saltpeter Wrapper version {} ({})",
            run::VERSION,
            run::COMMIT
        );
        return ExitCode::SUCCESS;
    }
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!(
            "sp-wrapper {}: runs $SP_COMMAND as a saltpeter job and reports it to the master.\n\
             Configured by SP_* environment variables; see docs/PROTOCOL.md.",
            run::VERSION
        );
        return ExitCode::SUCCESS;
    }

    println!("Saltpeter Wrapper version {}", run::VERSION);
    let cfg = match Config::from_env() {
        Ok(cfg) => cfg,
        Err(e) => {
            eprintln!("Error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let lock = match &cfg.lockfile {
        Some(path) => lock::acquire(path, &cfg.job_name),
        None => LockState::NotUsed,
    };
    match sys::daemonize(threads_at_start) {
        Err(e) => {
            eprintln!("Error: cannot start the wrapper daemon: {e}");
            ExitCode::FAILURE
        }
        Ok(Forked::Daemon { ready }) => {
            let mut keep = vec![ready.as_raw_fd()];
            if let LockState::Held(held) = &lock {
                keep.extend(held.raw_fd());
            }
            sys::close_inherited_fds(&keep);
            run::daemon(cfg, lock, ready)
        }
        Ok(Forked::Invoker {
            ready,
            intermediate,
        }) => invoker(ready, intermediate, lock),
    }
}

/// The invoking process: waits for the daemon's verdict and reports it to Salt.
fn invoker(ready: PipeReader, intermediate: Pid, lock: LockState) -> ExitCode {
    let refused = match lock {
        // The daemon's descriptor holds the lock now; ours must close without clearing it.
        LockState::Held(held) => {
            held.leave();
            None
        }
        LockState::Refused(msg) => Some(msg),
        LockState::NotUsed => None,
    };
    // The intermediate child exits right after forking the daemon; reap it.
    let _ = waitpid(intermediate, None);
    let mut line = String::new();
    let _ = BufReader::new(ready).read_line(&mut line);
    let line = line.trim_end();
    if line.starts_with("ok ") {
        println!("Wrapper started successfully");
        ExitCode::SUCCESS
    } else if line == "locked" {
        // The conflict is this run's result and is reported to the master as retcode 254
        // with the same text, like every other result.
        println!("LOCKFILE ERROR: {}", refused.unwrap_or_default());
        println!("Wrapper started successfully (reporting the lock conflict to the master)");
        ExitCode::SUCCESS
    } else if let Some(reason) = line.strip_prefix("error ") {
        eprintln!("Error: {reason}");
        ExitCode::FAILURE
    } else {
        eprintln!("Error: the wrapper daemon exited before starting the job");
        ExitCode::FAILURE
    }
}
