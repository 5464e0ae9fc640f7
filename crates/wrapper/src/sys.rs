//! The only module with `unsafe` code: forking the daemon and preparing the job's process
//! between `fork` and `exec`. Everything here is a thin layer over `nix`; the policy (what to
//! run, when to signal) lives in `main.rs` and `job.rs`.
//!
//! Two rules keep the unsafe code sound:
//! - The double fork happens while the process has no thread besides the main one that it did
//!   not have when `main` began, which [`daemonize`] checks, so the children inherit no lock
//!   held by a vanished thread. Natively that is exactly one thread; under qemu-user the
//!   emulator's own thread is there from the start, and qemu's fork emulation takes care of it.
//! - The `pre_exec` closure calls only async-signal-safe system calls (setgroups, setgid,
//!   setuid, prctl, getppid) and allocates nothing; the user and group list are resolved
//!   beforehand in the parent: after `fork` only async-signal-safe calls are allowed.

#![allow(unsafe_code)]

use std::io::{self, Write};
use std::os::fd::{AsFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::Command;

use nix::errno::Errno;
use nix::sys::prctl;
use nix::sys::signal::Signal;
use nix::unistd::{ForkResult, Pid, fork, getppid, setgid, setgroups, setsid, setuid};

use crate::config::RunAs;

/// Which side of the double fork this process is on.
#[derive(Debug)]
pub enum Forked {
    /// The process Salt started. It waits on `ready` for the daemon's verdict.
    Invoker {
        ready: io::PipeReader,
        intermediate: Pid,
    },
    /// The long-lived daemon (the grandchild). It reports on `ready` once the job is spawned.
    Daemon { ready: io::PipeWriter },
}

/// The threads of this process, from `/proc/self/task` (1 when it cannot be read).
pub fn thread_count() -> usize {
    std::fs::read_dir("/proc/self/task")
        .map(Iterator::count)
        .unwrap_or(1)
}

/// Detaches from the caller with the classic double fork: fork, `setsid` in the child, fork
/// again so the daemon is not a session leader and can never reacquire a terminal, then
/// `chdir("/")` and stdio on `/dev/null`. A pipe opened first lets the daemon tell the
/// invoking process whether the job really started (a failed `exec` must not look like a started job).
///
/// Must be called before the wrapper starts any thread: `threads_at_start` is
/// [`thread_count`] read first thing in `main`, and more threads than that are refused.
pub fn daemonize(threads_at_start: usize) -> io::Result<Forked> {
    let threads = thread_count();
    if threads > threads_at_start {
        return Err(io::Error::other(format!(
            "refusing to fork with {threads} threads running ({threads_at_start} at start)"
        )));
    }
    // Both ends are close-on-exec, so the job never inherits the write end and the invoking
    // process sees EOF as soon as the daemon has spoken or died.
    let (reader, writer) = io::pipe()?;
    // Anything still buffered would be written twice, once by each process.
    io::stdout().flush()?;
    io::stderr().flush()?;

    // SAFETY: the process has no thread of its own besides this one (checked above), so the
    // child starts with a consistent heap and no lock held by another thread; it only makes system calls and
    // then either exits or carries on as the sole thread of the new process.
    match unsafe { fork() }? {
        ForkResult::Parent { child } => {
            drop(writer);
            return Ok(Forked::Invoker {
                ready: reader,
                intermediate: child,
            });
        }
        ForkResult::Child => {}
    }
    drop(reader);
    // Any failure from here on can only be reported through the pipe.
    let detach = || -> io::Result<()> {
        setsid()?;
        Ok(())
    };
    if let Err(e) = detach() {
        report_and_exit(writer, &e);
    }
    // SAFETY: still no thread besides this one; see the first fork.
    match unsafe { fork() } {
        Err(e) => report_and_exit(writer, &io::Error::from(e)),
        // The intermediate child's only job was to make the daemon an orphan outside the
        // caller's session; it leaves at once.
        Ok(ForkResult::Parent { .. }) => std::process::exit(0),
        Ok(ForkResult::Child) => {}
    }
    let settle = || -> io::Result<()> {
        nix::unistd::chdir("/")?;
        let null = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/null")?;
        nix::unistd::dup2_stdin(null.as_fd())?;
        nix::unistd::dup2_stdout(null.as_fd())?;
        nix::unistd::dup2_stderr(null.as_fd())?;
        Ok(())
    };
    if let Err(e) = settle() {
        report_and_exit(writer, &e);
    }
    Ok(Forked::Daemon { ready: writer })
}

/// Closes every descriptor above stderr that the daemon inherited, except `keep`. Salt (or a
/// test harness) may hand the wrapper extra descriptors without close-on-exec, such as its
/// own output pipes or a jobserver; a daemon holding them could keep the caller waiting for
/// EOF, and the job would inherit them. Called in the daemon before any thread exists, so no
/// descriptor is in use by anyone else.
pub fn close_inherited_fds(keep: &[RawFd]) {
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return;
    };
    let fds: Vec<RawFd> = dir
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    for fd in fds {
        if fd > 2 && !keep.contains(&fd) {
            // EBADF for the directory's own descriptor, already closed, is expected.
            let _ = nix::unistd::close(fd);
        }
    }
}

/// Reports a failure in a forked child through the readiness pipe and exits.
fn report_and_exit(mut ready: io::PipeWriter, error: &io::Error) -> ! {
    let _ = writeln!(ready, "error could not detach: {error}");
    std::process::exit(1)
}

/// Prepares `cmd` so that, in the child between `fork` and `exec`, it drops privileges to
/// `run_as` (supplementary groups, then gid, then uid: after `setuid` the others would fail)
/// and asks for SIGKILL should the spawning thread die, so a wrapper killed with SIGKILL
/// leaves no unmonitored job behind. `parent` is the wrapper's pid; if it is already gone
/// when the death signal is armed, the child gives up instead of running unmonitored.
pub fn prepare_child(cmd: &mut Command, run_as: Option<&RunAs>, parent: Pid) {
    let creds = run_as.map(|r| (r.groups.clone(), r.gid, r.uid));
    let hook = move || -> io::Result<()> {
        if let Some((groups, gid, uid)) = &creds {
            setgroups(groups)?;
            setgid(*gid)?;
            setuid(*uid)?;
        }
        // Armed after setuid, because a change of credentials clears the death signal.
        prctl::set_pdeathsig(Signal::SIGKILL)?;
        if getppid() != parent {
            return Err(io::Error::from(Errno::ESRCH));
        }
        Ok(())
    };
    // SAFETY: the closure runs in the forked child of a multi-threaded process, where only
    // async-signal-safe functions may be called. It calls setgroups, setgid, setuid, prctl
    // and getppid, all plain system calls; nix's wrappers do not allocate (the group list
    // was allocated in the parent and is only borrowed), and errors are raw errno values.
    unsafe {
        cmd.pre_exec(hook);
    }
}
