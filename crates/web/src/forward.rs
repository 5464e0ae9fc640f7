//! Forwarding an operator's request to the master that acts for its job, when several
//! masters share the work (docs/HA.md): an operator may reach any of them, and a run or a
//! kill must happen on the one holding the job's lease.
//!
//! A forwarded request carries the caller's own bearer token, so the holder checks and
//! audits it as if it came directly, and a header that stops it from being forwarded again:
//! two masters that disagree for a moment about the holder answer 503 rather than bounce the
//! request between them.

use std::path::PathBuf;
use std::time::Duration;

use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};

use saltpeter_engine::MasterRef;

/// Marks a request one master forwarded to another.
pub(crate) const FORWARDED_HEADER: &str = "x-saltpeter-forwarded-by";

/// How long the holder has to answer a forwarded request.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(5);

/// Whether this request was already forwarded once.
pub(crate) fn was_forwarded(headers: &HeaderMap) -> bool {
    headers.contains_key(FORWARDED_HEADER)
}

/// Sends `POST path` to `holder` with the caller's token and returns its answer as this
/// master's. `ca` verifies an `https://` holder (the masters' shared certificate).
pub(crate) async fn post(
    holder: &MasterRef,
    path: String,
    headers: &HeaderMap,
    ca: Option<PathBuf>,
) -> Response {
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_owned);
    let url = holder.api_url.clone();
    let holder_id = holder.id.clone();
    let answer = tokio::task::spawn_blocking(move || {
        let client = saltpeter_http::Client::new(&url, token)?
            .with_ca(ca.as_deref())?
            .with_timeout(FORWARD_TIMEOUT)
            .with_header(FORWARDED_HEADER, "1");
        client.post(&path)
    })
    .await;
    match answer {
        Ok(Ok(r)) => {
            let status = StatusCode::from_u16(r.status).unwrap_or(StatusCode::BAD_GATEWAY);
            (
                status,
                [
                    (header::CONTENT_TYPE, "application/json".to_owned()),
                    (
                        header::HeaderName::from_static("x-saltpeter-master"),
                        holder_id,
                    ),
                ],
                r.body,
            )
                .into_response()
        }
        Ok(Err(error)) => {
            tracing::warn!(%error, holder = %holder_id, "Could not forward a request to the holder.");
            unavailable(format!(
                "the job is held by master {holder_id}, which did not answer: {error}"
            ))
        }
        Err(error) => unavailable(format!("forwarding failed: {error}")),
    }
}

/// 503 with a message, for a job that no reachable master holds right now.
pub(crate) fn unavailable(message: String) -> Response {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        axum::Json(serde_json::json!({ "error": message })),
    )
        .into_response()
}
