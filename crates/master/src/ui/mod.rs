//! The operator's surface on the API port: the saltpeter-ui WebSocket protocol (`/ws`), the
//! legacy HTTP paths, the JSON the dashboard and CLI read, `/metrics`, the embedded dashboard
//! at `/`, and the token and Origin checks that guard all of it.
//!
//! - [`messages`]: commands and message shapes of the UI protocol (reference 6.1-6.5);
//! - [`query`]: what clients ask for (query parameters, subscriptions), checked against the
//!   configured caps;
//! - [`ws`]: one task per browser connection;
//! - [`http`]: the HTTP handlers and the dashboard's assets;
//! - [`auth`]: the bearer token and Origin checks.
//!
//! Everything here asks the engine through [`EngineHandle`] and holds no run state of its own
//! beyond each connection's output cursors.

pub mod auth;
pub mod http;
pub mod messages;
pub mod query;
pub mod ws;

use std::sync::Arc;

use axum::Router;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{Extension, State};
use axum::response::Response;
use axum::routing::get;
use tokio::sync::watch;

use crate::config::Config;
use crate::engine::EngineHandle;
use crate::listen::Admission;
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

/// Puts the token and Origin checks in front of every route of `router`.
pub fn protect(router: Router, config: watch::Receiver<Arc<Config>>) -> Router {
    router.layer(axum::middleware::from_fn_with_state(config, auth::guard))
}

async fn upgrade(
    ws: WebSocketUpgrade,
    State(ctx): State<UiContext>,
    admission: Option<Extension<Arc<Admission>>>,
) -> Response {
    // The socket task keeps the connection's admission, so the socket counts as open (for
    // the open-file budget) for as long as it is.
    let admission = admission.map(|Extension(a)| a);
    ws.on_upgrade(move |socket| async move {
        ws::serve(socket, ctx).await;
        drop(admission);
    })
}
