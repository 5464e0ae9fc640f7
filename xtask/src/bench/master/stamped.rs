//! A TCP stream that remembers when the kernel received the bytes it last read.
//!
//! Why: the load generator runs its ten thousand wrappers on one thread that shares two cores
//! with the master it measures. When that thread is late to read an ack, the delay is the
//! generator's, not the master's, and a wrapper on its own machine would not see it. With
//! `SO_TIMESTAMPNS`, every `recvmsg` on a TCP socket also returns the wall-clock time the
//! kernel took in the last segment it hands over (on loopback: moments after the master's
//! write). Acks are measured to that time; the time the generator's task saw them is kept too,
//! so the report shows both.

use std::io;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
use std::time::{Duration, SystemTime};

use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg, setsockopt, sockopt};
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;

/// Wall-clock arrival time of the last bytes read, shared with the task that reads frames.
#[derive(Clone, Debug, Default)]
pub struct Arrival(Arc<AtomicU64>);

impl Arrival {
    /// When the kernel received the bytes of the last read, if it said.
    pub fn last(&self) -> Option<SystemTime> {
        match self.0.load(Ordering::Relaxed) {
            0 => None,
            nanos => Some(SystemTime::UNIX_EPOCH + Duration::from_nanos(nanos)),
        }
    }
}

/// `TcpStream` whose reads record their kernel arrival time in an [`Arrival`].
#[derive(Debug)]
pub struct StampedStream {
    tcp: TcpStream,
    arrival: Arrival,
    /// Room for one `SCM_TIMESTAMPNS` control message, reused by every read.
    control: Vec<u8>,
}

impl StampedStream {
    /// Turns on receive timestamps for `tcp`.
    pub fn new(tcp: TcpStream) -> io::Result<(Self, Arrival)> {
        setsockopt(&tcp.as_fd(), sockopt::ReceiveTimestampns, &true)?;
        let arrival = Arrival::default();
        let stream = Self {
            tcp,
            arrival: arrival.clone(),
            control: nix::cmsg_space!(nix::sys::time::TimeSpec),
        };
        Ok((stream, arrival))
    }
}

/// One `recvmsg` on `fd` into `into`: bytes read and, when the kernel gave one, the arrival
/// time in nanoseconds since the Unix epoch.
fn receive(fd: RawFd, into: &mut [u8], control: &mut [u8]) -> io::Result<(usize, Option<u64>)> {
    let mut iov = [io::IoSliceMut::new(into)];
    let msg = recvmsg::<()>(fd, &mut iov, Some(control), MsgFlags::empty())?;
    let mut stamp = None;
    for cmsg in msg.cmsgs()? {
        if let ControlMessageOwned::ScmTimestampns(ts) = cmsg {
            let secs = u64::try_from(ts.tv_sec()).unwrap_or(0);
            let nanos = u64::try_from(ts.tv_nsec()).unwrap_or(0);
            stamp = Some(secs * 1_000_000_000 + nanos);
        }
    }
    Ok((msg.bytes, stamp))
}

impl AsyncRead for StampedStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            ready!(this.tcp.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            // `try_io` clears the readiness on WouldBlock, so the next poll waits for the
            // kernel again instead of spinning.
            let fd = this.tcp.as_raw_fd();
            let control = &mut this.control;
            let result = this
                .tcp
                .try_io(Interest::READABLE, || receive(fd, unfilled, control));
            match result {
                Ok((read, stamp)) => {
                    // A read without a stamp clears the last one rather than leave an older
                    // time to be taken for these bytes'.
                    this.arrival.0.store(stamp.unwrap_or(0), Ordering::Relaxed);
                    buf.advance(read);
                    return Poll::Ready(Ok(()));
                }
                Err(error)
                    if matches!(
                        error.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                    ) => {}
                Err(error) => return Poll::Ready(Err(error)),
            }
        }
    }
}

impl AsyncWrite for StampedStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tcp).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    #[tokio::test]
    async fn a_read_carries_the_time_the_kernel_received_its_bytes() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (mut server, _) = listener.accept().await.unwrap();
        let (mut stamped, arrival) = StampedStream::new(client).unwrap();
        assert_eq!(arrival.last(), None, "nothing read yet");
        // The kernel turns receive timestamps on for the whole system a moment after the first
        // socket asks (deferred work), so bytes may arrive unstamped at first: warm up.
        let mut buf = [0u8; 16];
        for _ in 0..200 {
            server.write_all(b"w").await.unwrap();
            let read = stamped.read(&mut buf).await.unwrap();
            assert_eq!(&buf[..read], b"w");
            if arrival.last().is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }

        let before = SystemTime::now();
        server.write_all(b"ack").await.unwrap();
        // Read late on purpose: the stamp must say when the bytes came, not when they were read.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let read = stamped.read(&mut buf).await.unwrap();
        let read_at = SystemTime::now();

        assert_eq!(&buf[..read], b"ack");
        let at = arrival.last().expect("the kernel gave a receive time");
        assert!(before <= at, "{at:?} before the write at {before:?}");
        let lag = read_at.duration_since(at).unwrap();
        assert!(
            lag >= Duration::from_millis(40),
            "stamped at the read, {lag:?} before it"
        );

        // Writes pass through.
        stamped.write_all(b"out").await.unwrap();
        let read = server.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..read], b"out");
    }
}
