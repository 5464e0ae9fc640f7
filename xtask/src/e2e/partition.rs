//! A TCP relay on loopback that can cut one master off from the database the way a network
//! partition does: bytes stop flowing but no connection is closed, so the master's calls hang
//! until its own bounds give up, rather than failing at once on a reset.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::{JoinHandle, sleep};
use std::time::Duration;

use anyhow::Result;

/// How often a relay thread looks at its flags while no bytes come.
const TICK: Duration = Duration::from_millis(50);

/// The relay; dropping it stops its threads (each ends within [`TICK`]).
pub struct Relay {
    pub addr: SocketAddr,
    cut: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    acceptor: Option<JoinHandle<()>>,
}

impl Relay {
    /// Relays every connection to `upstream`.
    pub fn start(upstream: SocketAddr) -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let cut = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let acceptor = {
            let (cut, stop) = (cut.clone(), stop.clone());
            std::thread::spawn(move || accept(&listener, upstream, &cut, &stop))
        };
        Ok(Self {
            addr,
            cut,
            stop,
            acceptor: Some(acceptor),
        })
    }

    /// Stops every byte in both directions, on open and new connections alike.
    pub fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
    }

    /// Lets bytes flow again.
    pub fn heal(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.acceptor.take() {
            let _ = t.join();
        }
    }
}

fn accept(
    listener: &TcpListener,
    upstream: SocketAddr,
    cut: &Arc<AtomicBool>,
    stop: &Arc<AtomicBool>,
) {
    let mut pipes = Vec::new();
    while !stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((client, _)) => {
                let Ok(server) = TcpStream::connect(upstream) else {
                    continue;
                };
                for (from, to) in [(&client, &server), (&server, &client)] {
                    let (Ok(from), Ok(to)) = (from.try_clone(), to.try_clone()) else {
                        continue;
                    };
                    let (cut, stop) = (cut.clone(), stop.clone());
                    pipes.push(std::thread::spawn(move || pipe(from, to, &cut, &stop)));
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => sleep(TICK),
            Err(_) => sleep(TICK),
        }
    }
    for p in pipes {
        let _ = p.join();
    }
}

/// Copies `from` to `to` while not cut; while cut, reads nothing, so the sender's data waits
/// in the kernel as on a dead link.
fn pipe(mut from: TcpStream, mut to: TcpStream, cut: &AtomicBool, stop: &AtomicBool) {
    let _ = from.set_read_timeout(Some(TICK));
    let mut buf = [0u8; 16 * 1024];
    while !stop.load(Ordering::SeqCst) {
        if cut.load(Ordering::SeqCst) {
            sleep(TICK);
            continue;
        }
        match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => break,
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}
