//! The operator's surface on the API port: the saltpeter-ui WebSocket protocol (`/ws`), the
//! legacy HTTP paths, the JSON the dashboard and CLI read, `/metrics`, the embedded dashboard
//! at `/`, and the Host, token, role and Origin checks and security headers that guard all
//! of it.
//!
//! - [`messages`]: commands and message shapes of the UI protocol (docs/COMPATIBILITY.md);
//! - [`query`]: what clients ask for (query parameters, subscriptions), checked against the
//!   configured caps;
//! - [`ws`]: one task per browser connection;
//! - [`http`]: the HTTP handlers and the dashboard's assets;
//! - [`auth`]: the Host, token, role and Origin checks, and the security headers.
//!
//! Everything here asks the engine through [`EngineHandle`] and holds no run state of its own
//! beyond each connection's output cursors.

pub mod auth;
mod http;
pub mod messages;
pub mod query;
pub mod ws;

use std::sync::Arc;

use axum::extract::State;
use axum::extract::ws::WebSocketUpgrade;
use axum::response::Response;
use axum::routing::get;
use axum::{Extension, Router};
use tokio::sync::watch;

use crate::listen::Admission;
use saltpeter_config::Config;
use saltpeter_engine::EngineHandle;
pub use ws::UiContext;

/// The routes of the operator's surface (to merge with `api::router`).
pub fn router(engine: EngineHandle, config: watch::Receiver<Arc<Config>>) -> Router {
    Router::new()
        .route("/", get(http::index))
        .route("/assets/app.js", get(http::app_js))
        .route("/assets/app.css", get(http::app_css))
        .route("/ws", get(upgrade))
        .route("/config", get(http::config))
        .route("/running", get(http::running))
        .route("/timeline", get(http::timeline))
        .route("/metrics", get(http::metrics))
        .route("/api/v1/overview", get(http::overview))
        .route("/api/v1/timeline", get(http::timeline))
        .route("/api/v1/runs/{instance}/output", get(http::run_output))
        .with_state(UiContext { engine, config })
}

/// Puts the Host, token, role and Origin checks and the security headers in front of every
/// route of `router`, served on `local`.
pub fn protect(
    router: Router,
    config: watch::Receiver<Arc<Config>>,
    local: std::net::SocketAddr,
) -> Router {
    let state = auth::GuardState { config, local };
    router.layer(axum::middleware::from_fn_with_state(state, auth::guard))
}

async fn upgrade(
    ws: WebSocketUpgrade,
    State(ctx): State<UiContext>,
    admission: Option<Extension<Arc<Admission>>>,
    caller: Option<Extension<auth::Caller>>,
) -> Response {
    // The socket task keeps the connection's admission, so the socket counts as open (for
    // the open-file budget) for as long as it is.
    let admission = admission.map(|Extension(a)| a);
    // Without the guard in front (it always is, in the master) the caller is unknown and may
    // only read.
    let caller = caller.map_or_else(auth::Caller::unknown, |c| c.0);
    ws.on_upgrade(move |socket| async move {
        ws::serve(socket, ctx, caller).await;
        drop(admission);
    })
}
