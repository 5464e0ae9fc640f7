//! The machines endpoint: the WebSocket server wrappers connect to (default port 8889).
//!
//! Each connection gets a reader (this task) and a writer task. The reader decodes frames and
//! forwards them to the engine; malformed, binary or oversized frames are answered with a
//! `BAD_REQUEST` error and logged here, without the engine ever seeing them. The writer drains
//! a bounded queue the engine fills without waiting. The request path is ignored, as in the
//! original.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::Router;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, State};
use axum::response::Response;
use futures_util::{SinkExt, StreamExt};
use saltpeter_proto::{ErrorCode, ErrorReply, MAX_FRAME_BYTES, MasterMessage, WrapperMessage};
use tokio::sync::mpsc;

use crate::engine::{EngineHandle, Event, Outbound};

/// Bytes read from a wrapper's socket at a time (see `upgrade`).
const READ_BUFFER: usize = 8 * 1024;

/// Frames queued for one connection before the engine gives up on it.
const OUTBOUND_QUEUE: usize = 1024;

#[derive(Clone, Debug)]
struct Shared {
    engine: EngineHandle,
    next_id: Arc<AtomicU64>,
}

/// The endpoint's router. Serve it with `into_make_service_with_connect_info::<SocketAddr>()`.
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
) -> Response {
    ws.max_message_size(MAX_FRAME_BYTES)
        .max_frame_size(MAX_FRAME_BYTES)
        // tungstenite zero-fills up to this much of its input buffer on every read (and keeps
        // it resident): the 128 KiB default cost 10,000 wrappers 1.3 GB and a memset of 128 KiB
        // per 200-byte message (issue 7). Larger frames still arrive whole over several reads.
        .read_buffer_size(READ_BUFFER)
        .on_upgrade(move |socket| serve(socket, peer, shared))
}

async fn serve(socket: WebSocket, peer: SocketAddr, shared: Shared) {
    let conn = shared.next_id.fetch_add(1, Ordering::Relaxed);
    let (mut sink, mut stream) = socket.split();
    let (tx, mut rx) = mpsc::channel::<Outbound>(OUTBOUND_QUEUE);
    if !shared
        .engine
        .send(Event::Connected {
            conn,
            peer,
            tx: tx.clone(),
        })
        .await
    {
        return;
    }
    let writer = tokio::spawn(async move {
        while let Some(out) = rx.recv().await {
            let (msg, close) = match out {
                Outbound::Message(m) => (m, false),
                Outbound::Close(m) => (m, true),
            };
            if sink.send(Message::Text(msg.encode().into())).await.is_err() {
                break;
            }
            if close {
                let _ = sink.close().await;
                break;
            }
        }
    });
    let reject = |tx: &mpsc::Sender<Outbound>, why: String| {
        tracing::warn!(conn, %peer, reason = %why, "Rejected a frame from a wrapper.");
        let reply = MasterMessage::Error(ErrorReply {
            code: ErrorCode::BadRequest,
            message: why,
            timestamp: None,
        });
        let _ = tx.try_send(Outbound::Message(reply));
    };
    while let Some(frame) = stream.next().await {
        match frame {
            Ok(Message::Text(text)) => match WrapperMessage::decode(text.as_str()) {
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
                Err(error) => reject(&tx, error.to_string()),
            },
            Ok(Message::Binary(_)) => {
                reject(&tx, "binary frames are not part of the protocol".into())
            }
            Ok(Message::Close(_)) => break,
            Ok(Message::Ping(_) | Message::Pong(_)) => {}
            Err(error) => {
                // Oversized frames end here too: the socket cannot be read past them.
                reject(&tx, format!("unreadable frame: {error}"));
                break;
            }
        }
    }
    drop(tx);
    let _ = shared.engine.send(Event::Disconnected { conn }).await;
    // Let the writer flush what the engine queued (an error reply, say), but not forever.
    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), writer).await;
}
