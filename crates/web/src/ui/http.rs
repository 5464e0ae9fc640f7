//! HTTP endpoints of the operator's surface: the legacy paths the original served (`/config`,
//! `/running`, `/timeline`), the JSON the dashboard and the CLI read (`/api/v1/overview`,
//! `/api/v1/runs/{instance}/output`, `/api/v1/timeline`), `/metrics`, and the dashboard's
//! embedded assets.
// Input from clients, files or wrappers reaches arithmetic here, so every operation that could
// overflow or index out of bounds is written checked ("Totality" in docs/ARCHITECTURE.md).
#![warn(
    clippy::arithmetic_side_effects,
    clippy::indexing_slicing,
    clippy::string_slice
)]

use std::collections::HashMap;

use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::messages::{self, config_body};
use super::query;
use super::ws::UiContext;
use saltpeter_engine::{ApiRequest, UiRequest};

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, axum::Json(json!({ "error": message.into() }))).into_response()
}

fn engine_gone() -> Response {
    error(
        StatusCode::SERVICE_UNAVAILABLE,
        "the master is shutting down",
    )
}

/// `GET /config`: as the `config` message, with `env` values redacted.
pub(super) async fn config(State(ctx): State<UiContext>) -> Response {
    let config = ctx.config.borrow().clone();
    axum::Json(config_body(&config)).into_response()
}

/// `GET /running`: the `running` map of `status`, RFC 3339 times (never a 500; docs/COMPATIBILITY.md).
pub(super) async fn running(State(ctx): State<UiContext>) -> Response {
    let snapshot = ctx
        .engine
        .ask(|reply| {
            ApiRequest::Ui(UiRequest::Snapshot {
                jobs: Vec::new(),
                reply,
            })
        })
        .await;
    match snapshot {
        Some(s) => axum::Json(s.status.running).into_response(),
        None => engine_gone(),
    }
}

/// `GET /timeline` and `GET /api/v1/timeline`: `{id, content, serial}` for runs overlapping
/// `start_date`..`end_date` (default: the last day), optionally of one `job`.
pub(super) async fn timeline(
    State(ctx): State<UiContext>,
    uri: axum::http::Uri,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let now = time::OffsetDateTime::now_utc();
    let limits = ctx.config.borrow().settings.limits;
    let query = match query::timeline_query(&q, now, &limits) {
        Ok(query) => query,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.0),
    };
    let Some(mut content) = ctx
        .engine
        .ask(|reply| ApiRequest::Ui(UiRequest::Timeline { query, reply }))
        .await
    else {
        return engine_gone();
    };
    // Missed slots: only the new API shows them; the original UI's `/timeline` knows runs only.
    if !uri.path().starts_with("/api/") {
        content.retain(|e| e.missed.is_none());
    }
    let id = q.get("id").map_or("", String::as_str);
    let serial = now.unix_timestamp_nanos() as f64 / 1e9;
    axum::Json(messages::timeline_body(id, &content, serial)).into_response()
}

/// `GET /api/v1/overview`: every job with schedule, next and last run, running instances and
/// maintenance, for the dashboard and `sp-master status`.
pub(super) async fn overview(State(ctx): State<UiContext>) -> Response {
    match ctx
        .engine
        .ask(|reply| ApiRequest::Ui(UiRequest::Overview(reply)))
        .await
    {
        Some(o) => axum::Json(o).into_response(),
        None => engine_gone(),
    }
}

/// `GET /api/v1/runs/{instance}/output?from=m1:120,m2:0&machine=m1&max_bytes=N`: the run's
/// machines and their output after the given UTF-16 positions (absent machines from 0). A
/// reader follows a run by passing back each machine's `output.next`.
pub(super) async fn run_output(
    State(ctx): State<UiContext>,
    Path(instance): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let query = match query::run_output_query(&instance, &q) {
        Ok(query) => query,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.0),
    };
    match ctx
        .engine
        .ask(|reply| ApiRequest::Ui(UiRequest::RunOutput { query, reply }))
        .await
    {
        None => engine_gone(),
        Some(None) => error(StatusCode::NOT_FOUND, format!("no run {instance:?}")),
        Some(Some(run)) => axum::Json(run).into_response(),
    }
}

/// `GET /metrics`: Prometheus text format.
pub(super) async fn metrics(State(ctx): State<UiContext>) -> Response {
    let Some(gauges) = ctx
        .engine
        .ask(|reply| ApiRequest::Ui(UiRequest::Gauges(reply)))
        .await
    else {
        return engine_gone();
    };
    let text = ctx.engine.metrics().render(&gauges);
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

/// The dashboard's files, embedded in the binary.
const INDEX_HTML: &str = include_str!("../../assets/index.html");
const APP_JS: &str = include_str!("../../assets/app.js");
const APP_CSS: &str = include_str!("../../assets/app.css");

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

/// `GET /`.
pub(super) async fn index() -> Response {
    asset("text/html; charset=utf-8", INDEX_HTML)
}

/// `GET /assets/app.js`.
pub(super) async fn app_js() -> Response {
    asset("text/javascript; charset=utf-8", APP_JS)
}

/// `GET /assets/app.css`.
pub(super) async fn app_css() -> Response {
    asset("text/css; charset=utf-8", APP_CSS)
}
