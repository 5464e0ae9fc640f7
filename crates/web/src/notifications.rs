//! `GET /api/v1/notifications`: notifications that failed, for people and monitoring to see
//! why a webhook or a mail did not arrive.
//!
//! It reads the outbox the master wires in (the store's SQLite outbox) on a blocking thread.
//! What it shows never includes a destination's URL, a webhook secret or an SMTP password: a
//! failure names its channel kind, and its error text was written without the URL's path (the
//! senders say only the scheme and host). Reads need the viewer role, as every read does.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;

use saltpeter_notify::Outbox;
use saltpeter_store::rfc3339;

/// Rows one request returns when it does not say.
const DEFAULT_LIMIT: usize = 50;
/// The most rows one request may ask for.
const MAX_LIMIT: usize = 500;

/// The route, over `outbox`.
pub fn router(outbox: Arc<dyn Outbox>) -> Router {
    Router::new()
        .route("/api/v1/notifications", get(failures))
        .with_state(outbox)
}

fn bad(message: impl Into<String>) -> Response {
    (
        StatusCode::BAD_REQUEST,
        Json(json!({ "error": message.into() })),
    )
        .into_response()
}

/// The query's `state` (only `failed`: given up, dropped, or pending after a failed attempt)
/// and `limit` (1 to 500, default 50).
fn parse(params: &HashMap<String, String>) -> Result<usize, String> {
    for key in params.keys() {
        if key != "state" && key != "limit" {
            return Err(format!(
                "unknown parameter {key:?}; expected state or limit"
            ));
        }
    }
    match params.get("state").map(String::as_str) {
        None | Some("failed") => {}
        Some(_) => return Err("state must be \"failed\"".to_owned()),
    }
    match params.get("limit") {
        None => Ok(DEFAULT_LIMIT),
        Some(text) => match text.parse::<usize>() {
            Ok(n) if (1..=MAX_LIMIT).contains(&n) => Ok(n),
            _ => Err(format!(
                "limit must be a whole number from 1 to {MAX_LIMIT}"
            )),
        },
    }
}

async fn failures(
    State(outbox): State<Arc<dyn Outbox>>,
    Query(params): Query<HashMap<String, String>>,
) -> Response {
    let limit = match parse(&params) {
        Ok(limit) => limit,
        Err(message) => return bad(message),
    };
    let read = tokio::task::spawn_blocking(move || {
        Ok::<_, saltpeter_notify::OutboxError>((outbox.failures(limit)?, outbox.counts()?))
    })
    .await;
    let (rows, counts) = match read {
        Ok(Ok(read)) => read,
        Ok(Err(error)) => {
            tracing::warn!(%error, "Could not read the notification outbox.");
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(json!({ "error": "the notification outbox cannot be read" })),
            )
                .into_response();
        }
        Err(_) => {
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(json!({ "error": "shutting down" })),
            )
                .into_response();
        }
    };
    let rows: Vec<serde_json::Value> = rows
        .into_iter()
        .map(|f| {
            json!({
                "id": f.id,
                "key": f.key,
                "job": f.job,
                "event": f.event.name(),
                "channel": f.channel,
                "state": f.state.name(),
                "attempts": f.attempts,
                "error": f.error,
                "at": rfc3339(f.at),
            })
        })
        .collect();
    Json(json!({
        "notifications": rows,
        "counts": {
            "pending": counts.pending,
            "delivered": counts.delivered,
            "gave_up": counts.gave_up,
            "dropped": counts.dropped,
        },
    }))
    .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn the_query_is_checked_and_capped() {
        assert_eq!(parse(&params(&[])), Ok(DEFAULT_LIMIT));
        assert_eq!(
            parse(&params(&[("state", "failed"), ("limit", "7")])),
            Ok(7)
        );
        assert!(parse(&params(&[("state", "pending")])).is_err());
        assert!(parse(&params(&[("limit", "0")])).is_err());
        assert!(parse(&params(&[("limit", "501")])).is_err());
        assert!(parse(&params(&[("limit", "99999999999999999999999")])).is_err());
        assert!(parse(&params(&[("secret", "x")])).is_err());
    }
}
