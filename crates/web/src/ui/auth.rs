//! Who may use the API port, and the headers every answer carries: one middleware over the
//! whole API router ([`guard`]).
//!
//! In order, for every request:
//!
//! 1. **Host.** The API answers only for host names it knows: loopback (`localhost`,
//!    `127.0.0.0/8`, `[::1]`), the address it is bound to (any IP address when it is bound to
//!    `0.0.0.0` or `[::]`), and the names in `api_public_names`. Anything else gets 421: a page
//!    of a site whose name was rebound to this host (DNS rebinding) sends that site's name, so
//!    it is refused before anything is read or done. The port is not compared, because a
//!    proxy in front may present another one; an IP address cannot be rebound, so it is safe
//!    to accept. `/healthz` is exempt (health checks often send no useful `Host`).
//! 2. **Origin.** A state-changing request or `/ws` that carries an `Origin` (that is, comes
//!    from a browser page) must come from the API's own host or an origin in
//!    `ws_allowed_origins`; this blocks cross-site WebSocket hijacking and form posts.
//! 3. **Token and role.** When tokens are configured (`api_token`, `api_tokens`), every
//!    request except `/healthz`, the dashboard's page and its two assets (and `/metrics` while
//!    `metrics_public`) needs `Authorization: Bearer <token>`. A browser cannot set headers on
//!    a WebSocket and the original UI reads the legacy paths with plain requests, so `/ws`,
//!    `/config`, `/running` and `/timeline` also take `?token=<token>`. Reads need the viewer
//!    role, state changes (run, kill) operator, the audit trail admin. No token, or one that
//!    matches none: 401; a token whose role is too low: 403. Without configured tokens every
//!    caller acts as `anonymous` with every role (the API is then on loopback, or the operator
//!    said `allow_unauthenticated_api`).
//! 4. **Headers.** Every answer, refusals included, carries a Content-Security-Policy that
//!    allows only this origin's own scripts, styles and connections and no framing,
//!    `X-Content-Type-Options: nosniff`, `Referrer-Policy: no-referrer` and
//!    `X-Frame-Options: DENY`.
//!
//! The caller that passed is put in the request's extensions as a [`Caller`], for the audit
//! trail and for `/ws`, whose commands are checked per command. Tokens are compared as
//! SHA-256 hashes in constant time (`subtle`). Settings are read from the current
//! configuration on every request, so a hot reload applies at once.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use axum::extract::connect_info::ConnectInfo;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde_json::json;
use subtle::ConstantTimeEq;
use tokio::sync::watch;

use saltpeter_config::access::{LEGACY_TOKEN_NAME, hash_token};
use saltpeter_config::{Config, Role, Settings};
use saltpeter_store::audit::Actor;

/// The name of callers when no token is configured.
pub(crate) const ANONYMOUS: &str = "anonymous";

/// Who is calling: the token's name and role, and the peer's address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    pub name: String,
    pub role: Role,
    pub source: Option<IpAddr>,
    /// The SHA-256 of the token presented, so a long-lived connection can be checked again
    /// against the current configuration; `None` for anonymous callers.
    pub(crate) token_hash: Option<[u8; 32]>,
}

impl Caller {
    /// A caller of an API that demands no token.
    pub(crate) fn anonymous(source: Option<IpAddr>) -> Caller {
        Caller {
            name: ANONYMOUS.to_owned(),
            role: Role::Admin,
            source,
            token_hash: None,
        }
    }

    /// A caller the guard did not see (a router without it): may only read.
    pub(crate) fn unknown() -> Caller {
        Caller {
            name: "unknown".to_owned(),
            role: Role::Viewer,
            source: None,
            token_hash: None,
        }
    }

    /// Whether the caller's role includes `role`.
    pub(crate) fn may(&self, role: Role) -> bool {
        self.role >= role
    }

    /// The caller as the audit trail names it.
    pub fn actor(&self) -> Actor {
        Actor::remote(self.name.clone(), self.source)
    }

    /// Why the caller may not do something that needs `role`, for a 403 or a `/ws` error.
    pub(crate) fn refusal(&self, role: Role, what: &str) -> String {
        format!(
            "the token {:?} has the role {}; {what} needs {role}",
            self.name, self.role
        )
    }
}

/// What the middleware needs: the configuration and the address the listener is bound to.
#[derive(Clone, Debug)]
pub struct GuardState {
    pub config: watch::Receiver<Arc<Config>>,
    pub local: SocketAddr,
}

/// What a path needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Need {
    /// Nothing, not even a known Host.
    Nothing,
    /// A known Host, no token.
    Host,
    /// A token with this role.
    Role(Role),
}

/// The middleware.
pub(crate) async fn guard(
    State(state): State<GuardState>,
    mut request: Request,
    next: Next,
) -> Response {
    let host = request_host(&request).map(str::to_owned);
    let mut response = match admit(&state, &request, host.as_deref()) {
        Ok(caller) => {
            request.extensions_mut().insert(caller);
            next.run(request).await
        }
        Err(refusal) => *refusal,
    };
    security_headers(response.headers_mut(), host.as_deref());
    response
}

/// Decides on one request: the caller, or the refusal to send.
/// A refusal is boxed: a `Response` is large, and the common path is the caller.
fn admit(
    state: &GuardState,
    request: &Request,
    host: Option<&str>,
) -> Result<Caller, Box<Response>> {
    // The configuration is shared, not copied: one `Arc` clone per request.
    let config = state.config.borrow().clone();
    let settings = &config.settings;
    let path = request.uri().path();
    let source = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip());
    let need = need(request.method(), path, settings);
    if need == Need::Nothing {
        return Ok(Caller::anonymous(source));
    }
    if !host.is_some_and(|h| host_allowed(h, state.local, &settings.access.public_names)) {
        tracing::warn!(host = host.unwrap_or(""), %path, "Refused a request for an unknown host name.");
        return Err(Box::new(refuse(
            StatusCode::MISDIRECTED_REQUEST,
            format!(
                "this API does not answer for the host {:?}; add it to api_public_names if it \
                 is a name of this master",
                host.unwrap_or("")
            ),
        )));
    }
    let is_ws = path == "/ws";
    let changes_state = !matches!(
        *request.method(),
        Method::GET | Method::HEAD | Method::OPTIONS
    );
    let headers = request.headers();
    if (is_ws || changes_state)
        && let Some(origin) = headers.get(header::ORIGIN)
    {
        let origin = origin.to_str().unwrap_or("");
        if !origin_allowed(origin, host, &settings.ws_allowed_origins) {
            tracing::warn!(%origin, %path, "Refused a request from a foreign origin.");
            return Err(Box::new(refuse(
                StatusCode::FORBIDDEN,
                format!("origin {origin:?} is not allowed (see ws_allowed_origins)"),
            )));
        }
    }
    let Need::Role(role) = need else {
        return Ok(Caller::anonymous(source));
    };
    if !settings.tokens_required() {
        return Ok(Caller::anonymous(source));
    }
    let query = takes_query_token(path)
        .then(|| request.uri().query())
        .flatten();
    let Some(caller) = presented(headers, query).and_then(|t| identify(settings, &t, source))
    else {
        let mut r = refuse(StatusCode::UNAUTHORIZED, "a valid bearer token is required");
        r.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        return Err(Box::new(r));
    };
    if !caller.may(role) {
        tracing::warn!(token = %caller.name, %path, "Refused a request beyond the token's role.");
        return Err(Box::new(refuse(
            StatusCode::FORBIDDEN,
            caller.refusal(role, &format!("{} {path}", request.method())),
        )));
    }
    Ok(caller)
}

/// What a request for `path` needs.
fn need(method: &Method, path: &str, settings: &Settings) -> Need {
    let read = matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS);
    match path {
        "/healthz" => Need::Nothing,
        // The dashboard's page asks for a token itself, so it must load without one.
        "/" | "/assets/app.js" | "/assets/app.css" if read => Need::Host,
        "/metrics" if read && settings.metrics_public() => Need::Host,
        "/api/v1/audit" => Need::Role(Role::Admin),
        _ if read => Need::Role(Role::Viewer),
        _ => Need::Role(Role::Operator),
    }
}

/// Paths whose clients cannot send a header: the WebSocket (browsers) and the legacy paths
/// the original UI reads.
fn takes_query_token(path: &str) -> bool {
    matches!(path, "/ws" | "/config" | "/running" | "/timeline")
}

/// The `Host` header, or the authority of an absolute request target.
fn request_host(request: &Request) -> Option<&str> {
    request
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| request.uri().authority().map(|a| a.as_str()))
}

fn refuse(status: StatusCode, message: impl Into<String>) -> Response {
    (status, axum::Json(json!({ "error": message.into() }))).into_response()
}

/// The token the request presents: `Authorization: Bearer`, else (where allowed) the `token`
/// query parameter.
pub(crate) fn presented(headers: &HeaderMap, query: Option<&str>) -> Option<String> {
    let from_header = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, rest) = v.trim().split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
        })
        .filter(|t| !t.is_empty());
    if let Some(t) = from_header {
        return Some(t.to_owned());
    }
    query?
        .split('&')
        .find_map(|kv| kv.strip_prefix("token="))
        .map(|t| {
            percent_encoding::percent_decode_str(&t.replace('+', " "))
                .decode_utf8_lossy()
                .into_owned()
        })
        .filter(|t| !t.is_empty())
}

/// The configured token that `token` is, as a caller; `None` when it is none of them. Every
/// configured hash is compared, each in constant time, so the time taken does not depend on
/// which token (if any) matched or where a hash differs.
pub(crate) fn identify(settings: &Settings, token: &str, source: Option<IpAddr>) -> Option<Caller> {
    let hash = hash_token(token);
    let (name, role) = lookup(settings, &hash)?;
    Some(Caller {
        name,
        role,
        source,
        token_hash: Some(hash),
    })
}

/// The name and role of the token whose hash is `presented`.
fn lookup(settings: &Settings, presented: &[u8; 32]) -> Option<(String, Role)> {
    let legacy = settings
        .api_token
        .as_deref()
        .map(|t| (LEGACY_TOKEN_NAME, Role::Admin, hash_token(t)));
    let listed = settings
        .access
        .tokens
        .iter()
        .map(|t| (t.name.as_str(), t.role, t.sha256));
    let mut found = None;
    for (name, role, hash) in legacy.into_iter().chain(listed) {
        let same: bool = presented.ct_eq(&hash).into();
        if same && found.is_none() {
            found = Some((name.to_owned(), role));
        }
    }
    found
}

/// The role `caller` has under the current `settings`, for connections that outlive a
/// request (`/ws`): `None` when its token was removed (or tokens were configured since an
/// anonymous caller connected), and the connection must end.
pub(crate) fn current_role(settings: &Settings, caller: &Caller) -> Option<Role> {
    match &caller.token_hash {
        None if settings.tokens_required() => None,
        None => Some(caller.role),
        Some(hash) => lookup(settings, hash).map(|(_, role)| role),
    }
}

/// Whether the API answers for `host` (a `Host` header: a name or an IP address, with or
/// without a port).
pub fn host_allowed(host: &str, local: SocketAddr, public_names: &[String]) -> bool {
    let host = host.trim();
    // `[v6]:port`, `[v6]`, `name:port`, `v4:port`, `name`.
    let name = if let Some(rest) = host.strip_prefix('[') {
        match rest.split_once(']') {
            Some((inside, _)) => inside,
            None => return false,
        }
    } else {
        match host.rsplit_once(':') {
            Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
            Some(_) => return false,
            None => host,
        }
    };
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    if name.is_empty() {
        return false;
    }
    if let Ok(ip) = name.parse::<IpAddr>() {
        return ip.is_loopback() || ip == local.ip() || local.ip().is_unspecified();
    }
    name == "localhost"
        || public_names
            .iter()
            .any(|p| p.trim_end_matches('.').eq_ignore_ascii_case(&name))
}

/// Whether a browser page at `origin` may use the API at `host` (the `Host` header).
pub(crate) fn origin_allowed(origin: &str, host: Option<&str>, allowed: &[String]) -> bool {
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

/// Adds the browser-safety headers. `host` was checked (or the request was refused, and then
/// it only matters that the policy is valid), so it can name the WebSocket origin.
fn security_headers(headers: &mut HeaderMap, host: Option<&str>) {
    // `connect-src 'self'` covers ws: and wss: to the same host only in newer browsers, so the
    // WebSocket origins are named as well when the host is a plain authority.
    let ws = host
        .filter(|h| {
            h.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b))
        })
        .map(|h| format!(" ws://{h} wss://{h}"))
        .unwrap_or_default();
    let csp = format!(
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
         connect-src 'self'{ws}; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    );
    if let Ok(v) = HeaderValue::from_str(&csp) {
        headers.insert(header::CONTENT_SECURITY_POLICY, v);
    }
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
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
    fn tokens_come_from_the_header_or_the_query() {
        let mut h = HeaderMap::new();
        assert_eq!(presented(&h, None), None);
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("bearer  s3cret "),
        );
        assert_eq!(presented(&h, None).as_deref(), Some("s3cret"));
        let empty = HeaderMap::new();
        assert_eq!(
            presented(&empty, Some("a=1&token=s3%2Bcret")).as_deref(),
            Some("s3+cret")
        );
        assert_eq!(presented(&empty, Some("token=")), None);
        assert_eq!(
            presented(&empty, Some("token=%ff%fe")).as_deref(),
            Some("\u{fffd}\u{fffd}")
        );
    }

    #[test]
    fn known_hosts_pass_and_rebound_names_do_not() {
        let local: SocketAddr = "127.0.0.1:8888".parse().expect("addr");
        let names = vec!["cron.example.net".to_owned()];
        for ok in [
            "127.0.0.1:8888",
            "127.0.0.1",
            "localhost:8888",
            "LOCALHOST",
            "[::1]:8888",
            "127.0.0.2",
            "cron.example.net",
            "Cron.Example.Net.:443",
        ] {
            assert!(host_allowed(ok, local, &names), "{ok}");
        }
        for bad in [
            "evil.example:8888",
            "10.0.0.5:8888",
            "localhost.evil.example",
            "",
            ":8888",
            "[::1",
            "127.0.0.1:88x",
            "cron.example.net.evil",
        ] {
            assert!(!host_allowed(bad, local, &names), "{bad}");
        }
        let any: SocketAddr = "0.0.0.0:8888".parse().expect("addr");
        assert!(host_allowed("10.0.0.5:8888", any, &[]));
        assert!(!host_allowed("evil.example", any, &[]));
        let bound: SocketAddr = "10.0.0.5:8888".parse().expect("addr");
        assert!(host_allowed("10.0.0.5:8888", bound, &[]));
        assert!(!host_allowed("10.0.0.6:8888", bound, &[]));
    }

    #[test]
    fn tokens_are_identified_with_their_role() {
        use saltpeter_config::access::{TokenEntry, hash_token};
        let mut s = Settings::default();
        assert_eq!(identify(&s, "x", None), None);
        s.api_token = Some("legacy".into());
        s.access.tokens = vec![TokenEntry {
            name: "bob".into(),
            role: Role::Viewer,
            sha256: hash_token("bobs"),
        }];
        let legacy = identify(&s, "legacy", None).expect("legacy token");
        assert_eq!(
            (legacy.name.as_str(), legacy.role),
            ("api_token", Role::Admin)
        );
        let bob = identify(&s, "bobs", None).expect("bob");
        assert_eq!((bob.name.as_str(), bob.role), ("bob", Role::Viewer));
        assert!(!bob.may(Role::Operator) && bob.may(Role::Viewer));
        assert_eq!(identify(&s, "bob", None), None);
    }
}
