//! Connection hygiene of both listeners (the machines endpoint and the API): the accept loop,
//! the HTTP header deadline, the caps on connections that have not finished their handshake
//! (in all and per source address), and the share of the open-file limit kept free of sockets.
//!
//! A connection is *pending* from its accept until its handshake: on the machines endpoint
//! until the engine accepts its first message (`connect`, or a legacy wrapper's first message;
//! see [`saltpeter_engine::Outbound::Accepted`]), on the API until the headers of its first
//! request have arrived. Pending connections are what an idle-socket flood is made of, so only
//! they are capped; a connection over a cap, or one that would eat into `fd_reserve`, is closed
//! the moment it is accepted, counted in `/metrics` and logged at most every
//! [`WARN_EVERY`]. On the machines endpoint the whole handshake, HTTP upgrade included, must
//! end within `handshake_timeout` of the accept; on both listeners every request's headers must
//! arrive within `http_header_timeout` (hyper's header timer, which also bounds the wait for the
//! next request on a kept-alive connection).
//!
//! Every accepted socket is represented by one [`Admission`], shared by the connection's HTTP
//! task and, after a WebSocket upgrade, by its socket task; the last one dropped gives back the
//! socket's place in the open count (and its pending place, if it never finished).
//!
//! The limits are read from the configuration at each accept, so a reload applies to new
//! connections.
//!
//! A listener with TLS (see [`crate::tls`]) runs the TLS handshake first, inside the same
//! handshake deadline and while the connection still counts as pending, so a flood of
//! half-open TLS handshakes is capped like any other. While `allow_legacy_wrappers` is on, the
//! machines listener also serves plain HTTP for the original wrapper, which speaks only
//! `ws://`: it looks at a connection's first byte, and a TLS handshake always starts with
//! 0x16 (a handshake record) while an HTTP request starts with a letter.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use parking_lot::Mutex;
use rustls::ServerConfig;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use saltpeter_config::Config;
use saltpeter_metrics::{ListenerKind, Metrics, Refusal};

/// The least time between two warnings about refused connections (per listener); the ones
/// in between are counted and their number goes into the next warning.
pub(crate) const WARN_EVERY: Duration = Duration::from_secs(10);

/// The pause after an accept that failed for want of a descriptor (or another resource):
/// retrying at once would spin while nothing is freed.
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);

/// How long a connection may take to end after shutdown began.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// The default reserve: this share of the open-file limit ...
const RESERVE_SHARE: u64 = 10;
/// ... but at least this many descriptors ...
const RESERVE_MIN: u64 = 256;

/// The soft limit on open files of this process (`RLIMIT_NOFILE`); `u64::MAX` when it cannot
/// be read or is unlimited.
pub fn fd_limit() -> u64 {
    use nix::sys::resource::{Resource, getrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, _)) => soft,
        Err(error) => {
            tracing::warn!(%error, "Could not read the open-file limit; sockets are not capped by it.");
            u64::MAX
        }
    }
}

/// How many sockets both listeners may hold at once under an open-file limit of `limit` with
/// `reserve` descriptors kept free. Without a configured reserve, 10% of the limit is kept, at
/// least 256 but never more than half the limit (so a small limit still serves).
pub(crate) fn socket_cap(limit: u64, reserve: Option<u64>) -> u64 {
    let reserve =
        reserve.unwrap_or_else(|| (limit / RESERVE_SHARE).max(RESERVE_MIN).min(limit / 2));
    limit.saturating_sub(reserve)
}

/// The moment `d` from now; settings cap deadlines at a week, so this only guards against a
/// clock near its end.
fn after(d: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(d).unwrap_or(now)
}

/// Counts of pending connections.
#[derive(Debug, Default)]
struct Pending {
    total: u64,
    per_ip: HashMap<IpAddr, u64>,
}

/// Warnings about refused connections, rate-limited.
#[derive(Debug, Default)]
struct Warned {
    last: Option<std::time::Instant>,
    suppressed: u64,
}

/// The admission rules of one listener.
#[derive(Debug)]
pub struct Gate {
    kind: ListenerKind,
    config: watch::Receiver<Arc<Config>>,
    metrics: Arc<Metrics>,
    /// The process's open-file limit, read once at start.
    fd_limit: u64,
    pending: Mutex<Pending>,
    /// Warnings about refused connections and about failed accepts, each rate-limited.
    warned: Mutex<Warned>,
    accept_warned: Mutex<Warned>,
}

/// The limits in force for one accept, copied out of the configuration.
#[derive(Clone, Copy, Debug)]
struct Limits {
    handshake: Duration,
    header: Duration,
    max_pending: u64,
    max_pending_per_ip: u64,
    socket_cap: u64,
}

impl Gate {
    /// The gate of the `kind` listener; both gates of a process share `metrics`, whose open
    /// count is the one the open-file budget is checked against.
    pub fn new(
        kind: ListenerKind,
        config: watch::Receiver<Arc<Config>>,
        metrics: Arc<Metrics>,
        fd_limit: u64,
    ) -> Arc<Self> {
        let gate = Self {
            kind,
            config,
            metrics,
            fd_limit,
            pending: Mutex::default(),
            warned: Mutex::default(),
            accept_warned: Mutex::default(),
        };
        let limits = gate.limits();
        tracing::info!(
            listener = kind.as_str(),
            fd_limit,
            socket_cap = limits.socket_cap,
            max_pending = limits.max_pending,
            max_pending_per_ip = limits.max_pending_per_ip,
            "Listener limits."
        );
        if limits.socket_cap == 0 {
            tracing::error!(
                fd_limit,
                "fd_reserve leaves no descriptor for sockets; every connection will be refused."
            );
        }
        Arc::new(gate)
    }

    fn limits(&self) -> Limits {
        let config = self.config.borrow();
        let s = &config.settings;
        Limits {
            handshake: s.handshake_timeout,
            header: s.http_header_timeout,
            max_pending: s.max_pending_connections,
            max_pending_per_ip: s.max_pending_connections_per_ip,
            socket_cap: socket_cap(self.fd_limit, s.fd_reserve),
        }
    }

    /// Admits a connection from `ip`, or says why it must be closed at once.
    pub(crate) fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Admission, Refusal> {
        let limits = self.limits();
        let stats = &self.metrics.listeners;
        // Take the socket's place first and give it back if refused, so two accepts racing
        // for the last place cannot both have it.
        let open_before = stats.open.fetch_add(1, Ordering::AcqRel);
        if open_before >= limits.socket_cap {
            stats.open.fetch_sub(1, Ordering::AcqRel);
            return Err(Refusal::FdReserve);
        }
        {
            let mut pending = self.pending.lock();
            let from_ip = pending.per_ip.get(&ip).copied().unwrap_or(0);
            let refusal = if from_ip >= limits.max_pending_per_ip {
                Some(Refusal::PendingPerIp)
            } else if pending.total >= limits.max_pending {
                Some(Refusal::Pending)
            } else {
                None
            };
            if let Some(why) = refusal {
                drop(pending);
                stats.open.fetch_sub(1, Ordering::AcqRel);
                return Err(why);
            }
            pending.total = pending.total.saturating_add(1);
            pending.per_ip.insert(ip, from_ip.saturating_add(1));
        }
        stats.pending(self.kind).fetch_add(1, Ordering::Relaxed);
        Ok(Admission {
            gate: self.clone(),
            ip,
            pending: AtomicBool::new(true),
            handshake_deadline: after(limits.handshake),
            header_timeout: limits.header,
        })
    }

    fn release_pending(&self, ip: IpAddr) {
        {
            let mut pending = self.pending.lock();
            pending.total = pending.total.saturating_sub(1);
            if let Some(n) = pending.per_ip.get_mut(&ip) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    pending.per_ip.remove(&ip);
                }
            }
        }
        let gauge = self.metrics.listeners.pending(self.kind);
        // Never below zero, even if a release were ever counted twice.
        let _ = gauge.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
    }

    /// Counts a refused connection and warns, at most every [`WARN_EVERY`].
    fn refused(&self, peer: SocketAddr, why: Refusal) {
        self.metrics.listeners.refused(self.kind, why);
        let mut warned = self.warned.lock();
        let now = std::time::Instant::now();
        if warned
            .last
            .is_some_and(|last| now.saturating_duration_since(last) < WARN_EVERY)
        {
            warned.suppressed = warned.suppressed.saturating_add(1);
            return;
        }
        let suppressed = std::mem::take(&mut warned.suppressed);
        warned.last = Some(now);
        drop(warned);
        tracing::warn!(
            listener = self.kind.as_str(),
            %peer,
            reason = why.as_str(),
            refused_since_last_warning = suppressed,
            "Closed a connection as soon as it was accepted: too many connections are open or \
             have not finished their handshake."
        );
    }

    /// Logs a failed accept, at most every [`WARN_EVERY`] (it can repeat as fast as the loop).
    fn accept_failed(&self, error: &std::io::Error) {
        let mut warned = self.accept_warned.lock();
        let now = std::time::Instant::now();
        if warned
            .last
            .is_some_and(|last| now.saturating_duration_since(last) < WARN_EVERY)
        {
            return;
        }
        warned.last = Some(now);
        drop(warned);
        tracing::warn!(listener = self.kind.as_str(), %error, "Could not accept a connection.");
    }
}

/// One accepted socket: its place in the open count and, until its handshake, in the pending
/// counts. Shared by the tasks that use the socket; the last one dropped releases both.
#[derive(Debug)]
pub(crate) struct Admission {
    gate: Arc<Gate>,
    ip: IpAddr,
    pending: AtomicBool,
    handshake_deadline: Instant,
    header_timeout: Duration,
}

impl Admission {
    /// The connection finished its handshake: it no longer counts as pending.
    pub(crate) fn settle(&self) {
        if self.pending.swap(false, Ordering::AcqRel) {
            self.gate.release_pending(self.ip);
        }
    }

    /// The connection has not finished its handshake.
    pub(crate) fn is_pending(&self) -> bool {
        self.pending.load(Ordering::Acquire)
    }

    /// When a machines-endpoint connection that is still pending gets closed.
    pub(crate) fn handshake_deadline(&self) -> Instant {
        self.handshake_deadline
    }

    /// Counts a connection closed for missing its deadline.
    pub(crate) fn timed_out(&self) {
        self.gate.metrics.listeners.timed_out(self.gate.kind);
        tracing::debug!(
            listener = self.gate.kind.as_str(),
            ip = %self.ip,
            "Closed a connection that missed its handshake deadline."
        );
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.settle();
        self.gate
            .metrics
            .listeners
            .open
            .fetch_sub(1, Ordering::AcqRel);
    }
}

/// Accepts connections on `listener` and serves `router` on each (HTTP/1.1 with upgrades)
/// until `shutdown`, with TLS on every connection when `tls` is given. Requests carry
/// `ConnectInfo<SocketAddr>` and the connection's `Arc<Admission>` as extensions.
pub async fn serve_tls(
    listener: TcpListener,
    gate: Arc<Gate>,
    router: Router,
    shutdown: CancellationToken,
    tls: Option<Arc<ServerConfig>>,
) {
    let service = TowerToHyperService::new(router);
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                if !is_connection_error(&error) {
                    gate.accept_failed(&error);
                    tokio::time::sleep(ACCEPT_PAUSE).await;
                }
                continue;
            }
        };
        match gate.admit(peer.ip()) {
            Ok(admission) => {
                tokio::spawn(connection(
                    stream,
                    peer,
                    Arc::new(admission),
                    service.clone(),
                    shutdown.clone(),
                    tls.clone(),
                ));
            }
            Err(why) => {
                // Dropping the stream closes it; nothing was read, so the peer sees a clean
                // end of stream.
                drop(stream);
                gate.refused(peer, why);
            }
        }
    }
}

/// Errors that concern one connection only (it went away before being accepted).
fn is_connection_error(error: &std::io::Error) -> bool {
    use std::io::ErrorKind;
    matches!(
        error.kind(),
        ErrorKind::ConnectionRefused | ErrorKind::ConnectionAborted | ErrorKind::ConnectionReset
    )
}

/// The first byte of every TLS connection: the content type of a handshake record.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// A connection after its TLS handshake, or a legacy wrapper's plain one.
enum Opened {
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
    Plain(TcpStream),
}

/// Runs the TLS handshake on `stream`; when `legacy_plain`, a connection whose first byte does
/// not start a TLS handshake is handed back as it is. `None` when the peer left or failed the
/// handshake.
async fn open_tls(
    stream: TcpStream,
    config: Arc<ServerConfig>,
    legacy_plain: bool,
    peer: SocketAddr,
) -> Option<Opened> {
    if legacy_plain {
        let mut first = [0u8; 1];
        match stream.peek(&mut first).await {
            Ok(0) | Err(_) => return None,
            Ok(_) if first[0] != TLS_HANDSHAKE_RECORD => return Some(Opened::Plain(stream)),
            Ok(_) => {}
        }
    }
    match tokio_rustls::TlsAcceptor::from(config).accept(stream).await {
        Ok(tls) => Some(Opened::Tls(Box::new(tls))),
        Err(error) => {
            tracing::debug!(%peer, %error, "TLS handshake failed.");
            None
        }
    }
}

/// Serves one connection until it ends, is upgraded, misses a deadline or shutdown: the TLS
/// handshake first when the listener has TLS, then HTTP.
async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    admission: Arc<Admission>,
    service: TowerToHyperService<Router>,
    shutdown: CancellationToken,
    tls: Option<Arc<ServerConfig>>,
) {
    let Some(config) = tls else {
        serve_http(stream, peer, admission, service, shutdown).await;
        return;
    };
    let kind = admission.gate.kind;
    let legacy_plain = kind == ListenerKind::Machines
        && admission
            .gate
            .config
            .borrow()
            .settings
            .allow_legacy_wrappers;
    // The TLS handshake is part of the connection's handshake on both listeners: it must end
    // by the deadline, and the connection stays pending meanwhile.
    let opened = tokio::select! {
        opened = open_tls(stream, config, legacy_plain, peer) => opened,
        () = tokio::time::sleep_until(admission.handshake_deadline()) => {
            admission.timed_out();
            return;
        }
        () = shutdown.cancelled() => return,
    };
    match opened {
        Some(Opened::Tls(tls)) => serve_http(tls, peer, admission, service, shutdown).await,
        Some(Opened::Plain(plain)) => {
            tracing::debug!(%peer, "Plain connection on the machines port (a legacy wrapper).");
            serve_http(plain, peer, admission, service, shutdown).await;
        }
        None => {}
    }
}

/// Serves HTTP on one connection until it ends, is upgraded, misses a deadline or shutdown.
async fn serve_http<S>(
    stream: S,
    peer: SocketAddr,
    admission: Arc<Admission>,
    service: TowerToHyperService<Router>,
    shutdown: CancellationToken,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let kind = admission.gate.kind;
    let for_requests = admission.clone();
    let service = hyper::service::service_fn(move |mut request| {
        if kind == ListenerKind::Api {
            // The headers of an API connection's first request arrived: its handshake.
            for_requests.settle();
        }
        request.extensions_mut().insert(ConnectInfo(peer));
        request.extensions_mut().insert(for_requests.clone());
        hyper::service::Service::call(&service, request)
    });
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(admission.header_timeout);
    let conn = builder
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades();
    let mut conn = std::pin::pin!(conn);
    // On the machines endpoint the upgrade is part of the handshake and must end by its
    // deadline; the socket task enforces the rest.
    let bounded = kind == ListenerKind::Machines;
    let deadline = tokio::time::sleep_until(admission.handshake_deadline());
    let mut deadline = std::pin::pin!(deadline);
    tokio::select! {
        served = conn.as_mut() => {
            if let Err(error) = served {
                if error.is_timeout() {
                    admission.timed_out();
                } else {
                    tracing::debug!(listener = kind.as_str(), %peer, %error, "HTTP connection ended with an error.");
                }
            }
        }
        () = deadline.as_mut(), if bounded => admission.timed_out(),
        () = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(SHUTDOWN_GRACE, conn).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_reserve_is_a_tenth_at_least_256_at_most_half() {
        assert_eq!(socket_cap(20_000, None), 18_000);
        assert_eq!(socket_cap(1024, None), 768);
        assert_eq!(socket_cap(256, None), 128);
        assert_eq!(socket_cap(1_000_000, None), 900_000);
        assert_eq!(socket_cap(1024, Some(24)), 1000);
        assert_eq!(socket_cap(1024, Some(5000)), 0);
        assert_eq!(socket_cap(u64::MAX, None), u64::MAX - u64::MAX / 10);
    }
}
