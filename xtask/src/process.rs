//! Ending processes this tool started: by PID only, SIGTERM first, SIGKILL after a grace.

use std::process::{Child, Command};
use std::thread::sleep;
use std::time::{Duration, Instant};

/// Sends SIGTERM to `child`, waits up to `grace` for it to exit, then kills it. Returns whether
/// it left on its own within the grace.
pub fn terminate(child: &mut Child, grace: Duration) -> bool {
    let pid = child.id().to_string();
    let _ = Command::new("kill").args(["-TERM", &pid]).status();
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if matches!(child.try_wait(), Ok(Some(_))) {
            return true;
        }
        sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    false
}
