//! The master's only `unsafe` code: lowering the scheduling priority of the thread that calls
//! it. Kept here, away from the server, so the rest of the binary stays free of `unsafe`.

#![allow(unsafe_code)]

/// Raises the calling thread's nice value by `by` (lower priority). On Linux the nice value
/// belongs to a thread, and `PRIO_PROCESS` with id 0 means the calling thread. Lowering one's
/// own priority needs no privilege; if it fails anyway the thread simply keeps its priority.
pub fn lower_this_thread_priority(by: i32) {
    nix::errno::Errno::clear();
    // SAFETY: getpriority takes two integers and reads no memory of ours.
    let now = unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) };
    if now == -1 && nix::errno::Errno::last_raw() != 0 {
        return;
    }
    // SAFETY: setpriority takes three integers and reads no memory of ours.
    let _ = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, now + by) };
}
