//! Safety of the operator surface (issue 5 §5, D-02): the optional bearer token and the Origin
//! check, applied as one middleware over the whole API router.
//!
//! - Reads (`GET`, `HEAD`, `OPTIONS`) other than `/ws` are open: the API binds 127.0.0.1 by
//!   default and the views carry no secrets (`env` is redacted).
//! - Every state-changing request and `/ws` needs `Authorization: Bearer <api_token>` when a
//!   token is configured. A browser cannot set headers on a WebSocket, so `/ws` also takes
//!   `?token=<api_token>`.
//! - Every state-changing request and `/ws` that carries an `Origin` (that is, comes from a
//!   browser page) must come from the API's own host or an origin in `ws_allowed_origins`;
//!   this blocks cross-site WebSocket hijacking and cross-site form posts. Clients without an
//!   `Origin` (the CLI, curl, scripts) are not browsers and pass this check.
//!
//! The token and the allow-list are read from the current configuration on every request, so
//! a hot reload applies at once.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde_json::json;
use tokio::sync::watch;

use crate::config::Config;

/// The middleware.
pub async fn guard(
    State(config): State<watch::Receiver<Arc<Config>>>,
    request: Request,
    next: Next,
) -> Response {
    let (token, allowed) = {
        let c = config.borrow();
        (
            c.settings.api_token.clone(),
            c.settings.ws_allowed_origins.clone(),
        )
    };
    let is_ws = request.uri().path() == "/ws";
    let changes_state = !matches!(
        *request.method(),
        Method::GET | Method::HEAD | Method::OPTIONS
    );
    if is_ws || changes_state {
        let headers = request.headers();
        if let Some(origin) = headers.get(header::ORIGIN) {
            let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
            let origin = origin.to_str().unwrap_or("");
            if !origin_allowed(origin, host, &allowed) {
                tracing::warn!(%origin, path = %request.uri().path(), "Refused a request from a foreign origin.");
                return refuse(
                    StatusCode::FORBIDDEN,
                    format!("origin {origin:?} is not allowed (see ws_allowed_origins)"),
                );
            }
        }
        if let Some(token) = token.filter(|t| !t.is_empty()) {
            let query = if is_ws { request.uri().query() } else { None };
            if !token_ok(headers, query, &token) {
                let mut r = refuse(StatusCode::UNAUTHORIZED, "a valid bearer token is required");
                r.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    header::HeaderValue::from_static("Bearer"),
                );
                return r;
            }
        }
    }
    next.run(request).await
}

fn refuse(status: StatusCode, message: impl Into<String>) -> Response {
    (status, axum::Json(json!({ "error": message.into() }))).into_response()
}

/// Whether the request carries the token, in the `Authorization` header or (for `/ws`) as the
/// `token` query parameter.
pub fn token_ok(headers: &HeaderMap, query: Option<&str>, token: &str) -> bool {
    let from_header = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim);
    if from_header.is_some_and(|t| same_secret(t, token)) {
        return true;
    }
    query
        .into_iter()
        .flat_map(|q| q.split('&'))
        .filter_map(|kv| kv.strip_prefix("token="))
        .any(|t| same_secret(&percent_decode(t), token))
}

/// Whether a browser page at `origin` may use the API at `host` (the `Host` header).
pub fn origin_allowed(origin: &str, host: Option<&str>, allowed: &[String]) -> bool {
    let norm = |s: &str| s.trim().trim_end_matches('/').to_ascii_lowercase();
    let origin_n = norm(origin);
    if allowed.iter().any(|a| a == "*" || norm(a) == origin_n) {
        return true;
    }
    let (Some(host), Some((scheme, authority))) = (host, origin_n.split_once("://")) else {
        return false;
    };
    if scheme != "http" && scheme != "https" {
        return false;
    }
    let default_port = if scheme == "https" { ":443" } else { ":80" };
    let strip = |s: String| s.strip_suffix(default_port).map(str::to_owned).unwrap_or(s);
    strip(authority.to_owned()) == strip(host.to_ascii_lowercase())
}

/// Compares secrets in time independent of where they differ.
fn same_secret(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// `%XX` and `+` decoding of a query value.
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(v) => {
                        out.push(v);
                        i += 3;
                        continue;
                    }
                    None => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_host_and_listed_origins_pass_others_do_not() {
        let none: Vec<String> = Vec::new();
        assert!(origin_allowed(
            "http://127.0.0.1:8888",
            Some("127.0.0.1:8888"),
            &none
        ));
        assert!(origin_allowed(
            "https://cron.example.com",
            Some("cron.example.com"),
            &none
        ));
        assert!(origin_allowed(
            "https://cron.example.com:443",
            Some("cron.example.com"),
            &none
        ));
        assert!(!origin_allowed(
            "http://evil.example",
            Some("127.0.0.1:8888"),
            &none
        ));
        assert!(!origin_allowed(
            "http://127.0.0.1:9999",
            Some("127.0.0.1:8888"),
            &none
        ));
        assert!(!origin_allowed("null", Some("127.0.0.1:8888"), &none));
        assert!(!origin_allowed("http://127.0.0.1:8888", None, &none));
        let list = vec!["https://ui.example.com/".to_owned()];
        assert!(origin_allowed(
            "https://UI.example.com",
            Some("10.0.0.1:8888"),
            &list
        ));
        assert!(origin_allowed("http://x", None, &["*".to_owned()]));
    }

    #[test]
    fn tokens_come_from_the_header_or_the_ws_query() {
        let mut h = HeaderMap::new();
        assert!(!token_ok(&h, None, "s3cret"));
        h.insert(
            header::AUTHORIZATION,
            header::HeaderValue::from_static("Bearer s3cret"),
        );
        assert!(token_ok(&h, None, "s3cret"));
        assert!(!token_ok(&h, None, "s3cre"));
        let empty = HeaderMap::new();
        assert!(token_ok(&empty, Some("a=1&token=s3%2Bcret"), "s3+cret"));
        assert!(!token_ok(&empty, Some("token=wrong"), "s3cret"));
    }
}
