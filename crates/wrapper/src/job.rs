//! The job's process: spawning `/bin/sh -c 'eval "$SP_COMMAND"'` in its own process group with its
//! output on one pipe, reaping (the wrapper is a child subreaper, so orphans of the job end
//! up here), and the termination sequence: SIGTERM to the whole group, a grace period,
//! SIGKILL to the group (docs/COMPATIBILITY.md: kills that missed the process group).
//!
//! Processes are reaped with `waitpid(-1)`, not through `std::process::Child`, because as a
//! subreaper the wrapper also inherits the job's orphans and must reap those too.

use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use nix::errno::Errno;
use nix::fcntl::{FcntlArg, fcntl};
use nix::sys::signal::{Signal, killpg};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::{Pid, getpid};
use saltpeter_proto::{Cause, EXIT_KILLED, EXIT_TIMEOUT, TERM_GRACE};
use tokio::net::unix::pipe;
use tokio::signal::unix::{Signal as SignalStream, SignalKind, signal};
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep, sleep_until};

use crate::config::Config;
use crate::log::Log;
use crate::session::Completion;

/// Pipe capacity requested for the job's output. A larger pipe lets a bursty job run ahead
/// of the reader and cuts the number of reads at high rates.
const PIPE_BYTES: i32 = 1024 * 1024;
/// How long to wait for the group to vanish after SIGKILL before reporting anyway (a process
/// stuck in uninterruptible sleep cannot be waited for).
const KILL_WAIT: Duration = Duration::from_secs(2);

/// A spawned job.
#[derive(Debug)]
pub struct Job {
    /// PID of the shell, which is also the process group id.
    pub pid: Pid,
    /// The read end of the merged stdout/stderr pipe.
    pub pipe: pipe::Receiver,
}

/// Spawns the job. Must run on the thread that outlives the job (the runtime's main thread):
/// the parent-death signal fires when the spawning *thread* exits.
pub fn spawn(cfg: &Config) -> io::Result<Job> {
    let (reader, writer) = io::pipe()?;
    let writer_too = writer.try_clone()?;
    let mut cmd = Command::new("/bin/sh");
    // The shell reads the command from its environment rather than its argv: argv is world
    // readable in /proc, and a job's command line can carry secrets. `eval` runs the text
    // exactly as `sh -c "$SP_COMMAND"` would.
    cmd.arg("-c")
        .arg("eval \"$SP_COMMAND\"")
        .env("SP_COMMAND", &cfg.command)
        .stdin(Stdio::null())
        .stdout(writer)
        .stderr(writer_too)
        .current_dir(&cfg.cwd)
        .process_group(0)
        // The run token authenticates this wrapper to the master; the job has no use for it
        // and should not be able to speak for the run.
        .env_remove("SP_RUN_TOKEN");
    if let Some(user) = &cfg.run_as {
        cmd.env("HOME", &user.home)
            .env("USER", &user.name)
            .env("LOGNAME", &user.name)
            .env("SHELL", &user.shell);
    }
    crate::sys::prepare_child(&mut cmd, cfg.run_as.as_ref(), getpid());
    let child = cmd.spawn()?;
    // `cmd` holds our copies of the write end; the reader sees EOF only once they are gone.
    drop(cmd);
    // Best effort: the default 64 KiB pipe works too, only with more wake-ups.
    let _ = fcntl(&reader, FcntlArg::F_SETPIPE_SZ(PIPE_BYTES));
    let pid = Pid::from_raw(i32::try_from(child.id()).map_err(io::Error::other)?);
    let pipe = pipe::Receiver::from_owned_fd(OwnedFd::from(reader))?;
    Ok(Job { pid, pipe })
}

/// Makes the wrapper the reaper of its descendants' orphans, so background processes of the
/// job can still be found, signalled and reaped. Returns `false` where the option does not
/// exist (EINVAL): qemu-user, which runs the aarch64 build in the release checks, does not
/// emulate it. The job then runs as under the original wrapper, whose orphans went to init.
pub fn become_subreaper() -> io::Result<bool> {
    match nix::sys::prctl::set_child_subreaper(true) {
        Ok(()) => Ok(true),
        Err(nix::errno::Errno::EINVAL) => Ok(false),
        Err(e) => Err(io::Error::from(e)),
    }
}

/// How the job's shell ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitStatus {
    Exited(i32),
    Signaled(i32),
}

/// Reaps exited children on SIGCHLD. Created before the job is spawned, so no exit can be
/// missed.
#[derive(Debug)]
pub struct Reaper {
    sigchld: SignalStream,
    main: Option<(Pid, Option<ExitStatus>)>,
}

impl Reaper {
    pub fn new() -> io::Result<Self> {
        Ok(Self {
            sigchld: signal(SignalKind::child())?,
            main: None,
        })
    }

    /// Watches for the exit of `pid`.
    pub fn watch(&mut self, pid: Pid) {
        self.main = Some((pid, None));
    }

    /// Reaps every child that has exited; returns the watched one's status once known.
    pub fn reap(&mut self) -> Option<ExitStatus> {
        loop {
            let (pid, status) = match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) => (pid, ExitStatus::Exited(code)),
                Ok(WaitStatus::Signaled(pid, sig, _)) => (pid, ExitStatus::Signaled(sig as i32)),
                Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => break,
                Err(Errno::EINTR) | Ok(_) => continue,
                Err(_) => break,
            };
            if let Some((main, slot @ None)) = self.main.as_mut()
                && *main == pid
            {
                *slot = Some(status);
            }
        }
        self.main.and_then(|(_, status)| status)
    }

    /// Waits for the watched child to exit.
    pub async fn wait(&mut self) -> ExitStatus {
        loop {
            if let Some(status) = self.reap() {
                return status;
            }
            // The periodic wake-up is a safety net only; SIGCHLD is the normal path.
            tokio::select! {
                _ = self.sigchld.recv() => {}
                () = sleep(Duration::from_secs(1)) => {}
            }
        }
    }

    /// Waits for the next SIGCHLD (or a second) and reaps.
    pub async fn tick(&mut self) {
        tokio::select! {
            _ = self.sigchld.recv() => {}
            () = sleep(Duration::from_secs(1)) => {}
        }
        self.reap();
    }
}

/// The signals that tell the wrapper itself to stop: SIGTERM, SIGINT and SIGHUP.
#[derive(Debug)]
pub struct StopSignals {
    term: SignalStream,
    int: SignalStream,
    hup: SignalStream,
}

impl StopSignals {
    pub fn new() -> io::Result<Self> {
        Ok(Self {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
        })
    }

    /// Waits for any of them.
    pub async fn recv(&mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
            _ = self.hup.recv() => {}
        }
    }
}

/// Why the wrapper ended the job, if it did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    Timeout(Duration),
    Killed,
    WrapperTerminated,
}

/// How the job ended.
#[derive(Clone, Copy, Debug)]
pub struct Ended {
    pub completion: Completion,
    pub stop: Option<Stop>,
    /// When the shell's exit was seen (the output drain deadline counts from here).
    pub exited_at: Instant,
}

/// Waits for the job to end, enforcing the timeout and obeying kill requests and the
/// wrapper's own stop signals. When the wrapper stops the job it signals the whole group
/// and returns only once the group is gone (or SIGKILL was sent and [`KILL_WAIT`] passed).
pub async fn supervise(
    job_pid: Pid,
    reaper: &mut Reaper,
    timeout: Option<Duration>,
    kills: &mut mpsc::Receiver<()>,
    signals: &mut StopSignals,
    log: &Log,
) -> Ended {
    reaper.watch(job_pid);
    let deadline = timeout.map(|t| Instant::now() + t);
    let mut stop: Option<Stop> = None;
    let mut term_at: Option<Instant> = None;
    let mut kill_at: Option<Instant> = None;
    let mut status: Option<(ExitStatus, Instant)> = None;
    let begin = |why: Stop, stop: &mut Option<Stop>, term_at: &mut Option<Instant>| {
        log.info(match why {
            Stop::Timeout(t) => format!("Job exceeded timeout of {}s; terminating", t.as_secs()),
            Stop::Killed => String::from("Terminating the job on the master's request"),
            Stop::WrapperTerminated => String::from("Wrapper told to stop; terminating the job"),
        });
        *stop = Some(why);
        signal_group(job_pid, Signal::SIGTERM);
        *term_at = Some(Instant::now());
    };
    let (exit, exited_at) = loop {
        if let Some(done) = status {
            if stop.is_none() {
                break done;
            }
            // The shell is gone; when the wrapper is stopping the job, wait for its whole
            // group too, so that `complete` means nothing of the job is left.
            reaper.reap();
            if !group_alive(job_pid) || kill_at.is_some_and(|k| k.elapsed() >= KILL_WAIT) {
                break done;
            }
        }
        let grace_end = term_at.map(|t| t + TERM_GRACE);
        tokio::select! {
            st = reaper.wait(), if status.is_none() => status = Some((st, Instant::now())),
            Some(()) = kills.recv(), if stop.is_none() => begin(Stop::Killed, &mut stop, &mut term_at),
            () = signals.recv(), if stop.is_none() => {
                begin(Stop::WrapperTerminated, &mut stop, &mut term_at);
            }
            () = sleep_until(deadline.unwrap_or_else(Instant::now)),
                if stop.is_none() && status.is_none() && deadline.is_some() => {
                begin(Stop::Timeout(timeout.unwrap_or_default()), &mut stop, &mut term_at);
            }
            () = sleep_until(grace_end.unwrap_or_else(Instant::now)),
                if grace_end.is_some() && kill_at.is_none() => {
                log.info("Grace period over; sending SIGKILL to the job's process group");
                signal_group(job_pid, Signal::SIGKILL);
                kill_at = Some(Instant::now());
            }
            () = sleep(Duration::from_millis(20)), if status.is_some() => {}
        }
    };
    Ended {
        completion: completion(exit, stop),
        stop,
        exited_at,
    }
}

/// Maps an exit and the wrapper's reason for stopping to what `complete` reports.
pub fn completion(exit: ExitStatus, stop: Option<Stop>) -> Completion {
    let signal = match exit {
        ExitStatus::Signaled(sig) => Some(sig),
        ExitStatus::Exited(_) => None,
    };
    match (stop, exit) {
        (Some(Stop::Timeout(_)), _) => Completion {
            retcode: EXIT_TIMEOUT,
            cause: Cause::Timeout,
            signal,
        },
        (Some(Stop::Killed), _) => Completion {
            retcode: EXIT_KILLED,
            cause: Cause::Killed,
            signal,
        },
        (Some(Stop::WrapperTerminated), _) => Completion {
            retcode: EXIT_KILLED,
            cause: Cause::WrapperTerminated,
            signal,
        },
        (None, ExitStatus::Exited(code)) => Completion {
            retcode: i64::from(code),
            cause: Cause::Exit,
            signal: None,
        },
        (None, ExitStatus::Signaled(sig)) => Completion {
            retcode: 128 + i64::from(sig),
            cause: Cause::Signal,
            signal,
        },
    }
}

/// Sends `sig` to the job's process group. ESRCH (the group is already gone) is fine.
fn signal_group(pgid: Pid, sig: Signal) {
    let _ = killpg(pgid, sig);
}

/// Whether any process (zombies included, until reaped) is left in the group.
fn group_alive(pgid: Pid) -> bool {
    !matches!(killpg(pgid, None), Err(Errno::ESRCH))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retcodes_follow_the_protocol() {
        let c = completion(ExitStatus::Exited(3), None);
        assert_eq!((c.retcode, c.cause, c.signal), (3, Cause::Exit, None));
        let c = completion(ExitStatus::Signaled(9), None);
        assert_eq!(
            (c.retcode, c.cause, c.signal),
            (137, Cause::Signal, Some(9))
        );
        let t = Some(Stop::Timeout(Duration::from_secs(1)));
        let c = completion(ExitStatus::Signaled(15), t);
        assert_eq!((c.retcode, c.cause), (124, Cause::Timeout));
        let c = completion(ExitStatus::Exited(0), Some(Stop::Killed));
        assert_eq!((c.retcode, c.cause), (143, Cause::Killed));
        let c = completion(ExitStatus::Signaled(15), Some(Stop::WrapperTerminated));
        assert_eq!((c.retcode, c.cause), (143, Cause::WrapperTerminated));
    }
}
