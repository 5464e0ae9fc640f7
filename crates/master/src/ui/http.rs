//! HTTP endpoints of the operator's surface: the legacy paths the original served (`/config`,
//! `/running`, `/timeline`), the JSON the dashboard and the CLI read (`/api/v1/overview`,
//! `/api/v1/runs/{instance}/output`, `/api/v1/timeline`), `/metrics`, and the dashboard's
//! embedded assets.

use std::collections::{BTreeMap, HashMap};

use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::messages::{self, config_body};
use super::ws::UiContext;
use crate::engine::{ApiRequest, RunOutputQuery, TimelineQuery, UiRequest};

/// Default rows of `/timeline` and `/api/v1/timeline`.
const TIMELINE_LIMIT: usize = 2000;

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, axum::Json(json!({ "error": message.into() }))).into_response()
}

fn engine_gone() -> Response {
    error(
        StatusCode::SERVICE_UNAVAILABLE,
        "the master is shutting down",
    )
}

/// `GET /config`: as the `config` message, with `env` values redacted (D-02).
pub async fn config(State(ctx): State<UiContext>) -> Response {
    let config = ctx.config.borrow().clone();
    axum::Json(config_body(&config)).into_response()
}

/// `GET /running`: the `running` map of `status`, RFC 3339 times (never a 500, D-44).
pub async fn running(State(ctx): State<UiContext>) -> Response {
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
pub async fn timeline(
    State(ctx): State<UiContext>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let now = time::OffsetDateTime::now_utc();
    let bound = |key: &str, default: &str| {
        messages::parse_when(q.get(key).map_or(default, String::as_str), now)
    };
    let (start, end) = match (bound("start_date", "now-1d"), bound("end_date", "now")) {
        (Ok(s), Ok(e)) => (s, e),
        (Err(e), _) | (_, Err(e)) => return error(StatusCode::BAD_REQUEST, e),
    };
    let limit = match q.get("limit").map(|l| l.parse::<usize>()) {
        None => TIMELINE_LIMIT,
        Some(Ok(n)) => n,
        Some(Err(_)) => return error(StatusCode::BAD_REQUEST, "limit must be a whole number"),
    };
    let query = TimelineQuery {
        start,
        end,
        job: q.get("job").cloned(),
        limit,
    };
    let Some(content) = ctx
        .engine
        .ask(|reply| ApiRequest::Ui(UiRequest::Timeline { query, reply }))
        .await
    else {
        return engine_gone();
    };
    let id = q.get("id").map_or("", String::as_str);
    let serial = now.unix_timestamp_nanos() as f64 / 1e9;
    axum::Json(messages::timeline_body(id, &content, serial)).into_response()
}

/// `GET /api/v1/overview`: every job with schedule, next and last run, running instances and
/// maintenance, for the dashboard and `sp-master status`.
pub async fn overview(State(ctx): State<UiContext>) -> Response {
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
pub async fn run_output(
    State(ctx): State<UiContext>,
    Path(instance): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let mut from = BTreeMap::new();
    for part in q.get("from").into_iter().flat_map(|f| f.split(',')) {
        if part.is_empty() {
            continue;
        }
        let parsed = part
            .rsplit_once(':')
            .and_then(|(m, p)| Some((m.to_owned(), p.parse::<u64>().ok()?)));
        match parsed {
            Some((m, p)) => {
                from.insert(m, p);
            }
            None => {
                return error(
                    StatusCode::BAD_REQUEST,
                    format!("from: expected machine:position, got {part:?}"),
                );
            }
        }
    }
    let max_bytes = match q.get("max_bytes").map(|v| v.parse::<usize>()) {
        None => 0,
        Some(Ok(n)) => n,
        Some(Err(_)) => {
            return error(StatusCode::BAD_REQUEST, "max_bytes must be a whole number");
        }
    };
    let query = RunOutputQuery {
        instance: instance.clone(),
        from,
        machine: q.get("machine").cloned(),
        max_bytes,
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
pub async fn metrics(State(ctx): State<UiContext>) -> Response {
    let Some(gauges) = ctx
        .engine
        .ask(|reply| ApiRequest::Ui(UiRequest::Gauges(reply)))
        .await
    else {
        return engine_gone();
    };
    let text = ctx.engine.metrics().render(gauges);
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
pub async fn index() -> Response {
    asset("text/html; charset=utf-8", INDEX_HTML)
}

/// `GET /assets/app.js`.
pub async fn app_js() -> Response {
    asset("text/javascript; charset=utf-8", APP_JS)
}

/// `GET /assets/app.css`.
pub async fn app_css() -> Response {
    asset("text/css; charset=utf-8", APP_CSS)
}
