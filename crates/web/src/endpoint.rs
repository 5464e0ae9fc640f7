//! The machines endpoint: the WebSocket server wrappers connect to (default port 8889).
//!
//! Each connection is one task that reads and writes. It decodes frames and forwards them to
//! the engine; malformed, binary or oversized frames are answered with a `BAD_REQUEST` error
//! and logged here, without the engine ever seeing them. Between frames it drains a bounded
//! queue in which the engine reserves slots without waiting and the engine's delivery task
//! fills them (see `engine/outbox.rs`). The request path is ignored, as in the original.
//!
//! A connection whose first accepted message (the engine's [`Outbound::Accepted`]) has not
//! come by the handshake deadline its [`Admission`] carries (`handshake_timeout` from the
//! accept, see `listen.rs`) is closed, so idle sockets cannot pile up.

use std::net::SocketAddr;
use std::ops::ControlFlow;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::Router;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, Extension, State};
use axum::response::Response;
use saltpeter_proto::{ErrorCode, ErrorReply, MAX_FRAME_BYTES, MasterMessage, WrapperMessage};
use tokio::sync::mpsc;

use crate::listen::Admission;
use saltpeter_engine::{EngineHandle, Event, Outbound};

/// Bytes read from a wrapper's socket at a time (see `upgrade`).
const READ_BUFFER: usize = 8 * 1024;

/// Frames queued for one connection before the engine gives up on it.
const OUTBOUND_QUEUE: usize = 1024;

#[derive(Clone, Debug)]
struct Shared {
    engine: EngineHandle,
    next_id: Arc<AtomicU64>,
}

/// The endpoint's router. Serve it with `listen::serve`, which gives each request its peer's
/// `ConnectInfo<SocketAddr>` and the connection's `Arc<Admission>`.
pub fn router(engine: EngineHandle) -> Router {
    Router::new().fallback(upgrade).with_state(Shared {
        engine,
        next_id: Arc::new(AtomicU64::new(1)),
    })
}

async fn upgrade(
    ws: WebSocketUpgrade,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    State(shared): State<Shared>,
    admission: Option<Extension<Arc<Admission>>>,
) -> Response {
    let admission = admission.map(|Extension(a)| a);
    ws.max_message_size(MAX_FRAME_BYTES)
        .max_frame_size(MAX_FRAME_BYTES)
        // tungstenite zero-fills up to this much of its input buffer on every read (and keeps
        // it resident): the 128 KiB default cost 10,000 wrappers 1.3 GB and a memset of 128 KiB
        // per 200-byte message (docs/PERFORMANCE.md). Larger frames still arrive whole over several reads.
        .read_buffer_size(READ_BUFFER)
        .on_upgrade(move |socket| serve(socket, peer, shared, admission))
}

async fn serve(
    mut socket: WebSocket,
    peer: SocketAddr,
    shared: Shared,
    admission: Option<Arc<Admission>>,
) {
    let conn = shared.next_id.fetch_add(1, Ordering::Relaxed);
    let (tx, mut rx) = mpsc::channel::<Outbound>(OUTBOUND_QUEUE);
    if !shared
        .engine
        .send(Event::Connected { conn, peer, tx })
        .await
    {
        return;
    }
    // One task reads and writes: a second task per connection (and the lock a split socket
    // shares) cost a wake-up and a run-queue wait per ack with ten thousand wrappers (docs/PERFORMANCE.md).
    // Reading the next frame is cancel-safe, so writing an ack in between loses nothing.
    // The handshake deadline is one timer for the connection, polled only while it matters.
    let mut handshaking = admission.as_ref().is_some_and(|a| a.is_pending());
    let deadline = admission
        .as_ref()
        .map_or_else(tokio::time::Instant::now, |a| a.handshake_deadline());
    let deadline = tokio::time::sleep_until(deadline);
    let mut deadline = std::pin::pin!(deadline);
    let mut timed_out = false;
    loop {
        tokio::select! {
            () = deadline.as_mut(), if handshaking => {
                if let Some(admission) = &admission {
                    admission.timed_out();
                }
                timed_out = true;
                break;
            }
            out = rx.recv() => {
                // `None`: the engine let go of this connection.
                let Some(out) = out else { break };
                if matches!(out, Outbound::Accepted) {
                    handshaking = false;
                    if let Some(admission) = &admission {
                        admission.settle();
                    }
                    continue;
                }
                if write(&mut socket, out, &shared).await.is_break() {
                    break;
                }
            }
            frame = socket.recv() => match frame {
                None | Some(Ok(Message::Close(_))) => break,
                Some(Ok(Message::Text(text))) => match WrapperMessage::decode(text.as_str()) {
                    Ok(msg) => {
                        let received = tokio::time::Instant::now();
                        let event = Event::Wrapper {
                            conn,
                            msg,
                            received,
                        };
                        if !shared.engine.send(event).await {
                            break;
                        }
                    }
                    Err(error) => reject(&mut socket, conn, peer, error.to_string()).await,
                },
                Some(Ok(Message::Binary(_))) => {
                    let why = "binary frames are not part of the protocol".to_owned();
                    reject(&mut socket, conn, peer, why).await;
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                Some(Err(error)) => {
                    // Oversized frames end here too: the socket cannot be read past them.
                    reject(&mut socket, conn, peer, format!("unreadable frame: {error}")).await;
                    break;
                }
            },
        }
    }
    let _ = shared.engine.send(Event::Disconnected { conn }).await;
    if timed_out {
        // Nothing the engine queued matters to a peer that never spoke for a machine; the
        // socket closes now rather than after the flush below.
        return;
    }
    // Flush what the engine queued before it heard of the disconnect, but not forever; the
    // channel ends once the engine drops its sender.
    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), async {
        while let Some(out) = rx.recv().await {
            if write(&mut socket, out, &shared).await.is_break() {
                break;
            }
        }
    })
    .await;
}

/// Sends one frame the engine queued; breaks when the socket is done.
async fn write(socket: &mut WebSocket, out: Outbound, shared: &Shared) -> ControlFlow<()> {
    let (msg, close, received) = match out {
        Outbound::Message(m) => (m, false, None),
        Outbound::Close(m) => (m, true, None),
        Outbound::OutputAck { ack, received } => (ack, false, received),
        Outbound::Accepted => return ControlFlow::Continue(()),
    };
    if socket
        .send(Message::Text(msg.encode().into()))
        .await
        .is_err()
    {
        return ControlFlow::Break(());
    }
    if let Some(received) = received {
        let took = tokio::time::Instant::now().saturating_duration_since(received);
        shared.engine.metrics().output_ack_written.observe(took);
    }
    if close {
        let _ = socket.send(Message::Close(None)).await;
        return ControlFlow::Break(());
    }
    ControlFlow::Continue(())
}

/// Answers a frame the engine never sees with `BAD_REQUEST`, and logs it.
async fn reject(socket: &mut WebSocket, conn: u64, peer: SocketAddr, why: String) {
    tracing::warn!(conn, %peer, reason = %why, "Rejected a frame from a wrapper.");
    let reply = MasterMessage::Error(ErrorReply {
        code: ErrorCode::BadRequest,
        message: why,
        timestamp: None,
    });
    let _ = socket.send(Message::Text(reply.encode().into())).await;
}
