//! The project's one HTTP client, for the CLI and the log shipper (`ship`), over ureq:
//! blocking, one agent per client, `http://` and `https://`, optional Basic auth from the URL's
//! `user:pass@`, a bearer token for the API.
//!
//! An `https://` server is verified against a CA file when one is given (`--ca`, `SP_CA`,
//! `ship_ca`; the master's own self-signed `cert.pem` serves as one, which pins it), else
//! against the system's roots.

// What no other crate uses is `pub(crate)`, so the compiler reports it once nothing calls it.
#![warn(unreachable_pub)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("bad URL {0:?}: expected http://HOST:PORT or https://HOST:PORT")]
    Url(String),
    #[error("cannot read the CA file {path}: {reason}")]
    Ca { path: PathBuf, reason: String },
    #[error("talking to {addr}: {source}")]
    Request {
        addr: String,
        source: Box<ureq::Error>,
    },
}

/// An endpoint and its credentials.
#[derive(Clone, Debug)]
pub struct Client {
    /// `scheme://host:port` without userinfo.
    base: String,
    /// `host:port`, for messages.
    addr: String,
    /// Path prefix of the API (usually empty).
    prefix: String,
    token: Option<String>,
    /// `Authorization: Basic` credentials (base64) from the URL's userinfo.
    basic: Option<String>,
    timeout: Duration,
    ca: Option<PathBuf>,
    /// Headers sent with every request besides the credentials.
    extra: Vec<(String, String)>,
    agent: ureq::Agent,
}

/// A response: status and body text.
#[derive(Clone, Debug)]
pub struct Response {
    pub status: u16,
    pub body: String,
}

impl Response {
    /// The body as JSON (`Null` when it is not JSON).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or(serde_json::Value::Null)
    }

    /// The API's `{"error": ...}` message, or the body.
    pub fn error_text(&self) -> String {
        match self.json()["error"].as_str() {
            Some(e) => e.to_owned(),
            None => self.body.trim().to_owned(),
        }
    }
}

/// The largest response body read (the API caps what it sends far below this).
const BODY_LIMIT: u64 = 64 * 1024 * 1024;

impl Client {
    /// A client for `http[s]://[user:pass@]host[:port][/prefix]`, verifying `https://`
    /// against the system's roots.
    pub fn new(url: &str, token: Option<String>) -> Result<Self, HttpError> {
        let (scheme, rest) = if let Some(rest) = url.strip_prefix("http://") {
            ("http", rest)
        } else if let Some(rest) = url.strip_prefix("https://") {
            ("https", rest)
        } else {
            return Err(HttpError::Url(url.to_owned()));
        };
        let (authority, prefix) = match rest.split_once('/') {
            Some((a, p)) => (a, format!("/{}", p.trim_end_matches('/'))),
            None => (rest, String::new()),
        };
        // `user:pass@host`: the last `@` ends the userinfo (a password may hold a raw `@`).
        let (basic, addr) = match authority.rsplit_once('@') {
            Some((userinfo, host)) => {
                let decoded = percent_encoding::percent_decode_str(userinfo).collect::<Vec<u8>>();
                (
                    Some(base64::engine::general_purpose::STANDARD.encode(decoded)),
                    host,
                )
            }
            None => (None, authority),
        };
        if addr.is_empty() {
            return Err(HttpError::Url(url.to_owned()));
        }
        let prefix = if prefix == "/" { String::new() } else { prefix };
        let timeout = Duration::from_secs(30);
        Ok(Self {
            base: format!("{scheme}://{addr}"),
            addr: addr.to_owned(),
            prefix,
            token: token.filter(|t| !t.is_empty()),
            basic,
            timeout,
            ca: None,
            extra: Vec::new(),
            agent: agent(timeout, None)?,
        })
    }

    /// Verifies `https://` against the CA certificates in `path` (PEM) instead of the
    /// system's roots.
    pub fn with_ca(mut self, path: Option<&Path>) -> Result<Self, HttpError> {
        self.ca = path.map(Path::to_owned);
        self.agent = agent(self.timeout, self.ca.as_deref())?;
        Ok(self)
    }

    /// Sends `name: value` with every request.
    pub fn with_header(mut self, name: &str, value: &str) -> Self {
        self.extra.push((name.to_owned(), value.to_owned()));
        self
    }

    /// Sets the overall timeout of a request, connect included (default 30 s).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        // The CA file was readable a moment ago; should it not be now, keep the old agent.
        if let Ok(agent) = agent(timeout, self.ca.as_deref()) {
            self.agent = agent;
        }
        self
    }

    /// `host:port` this client talks to.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    pub fn get(&self, path: &str) -> Result<Response, HttpError> {
        self.request("GET", path)
    }

    pub fn post(&self, path: &str) -> Result<Response, HttpError> {
        self.request("POST", path)
    }

    /// Sends one request and reads the whole response.
    pub(crate) fn request(&self, method: &str, path: &str) -> Result<Response, HttpError> {
        self.send(method, path, None, &[])
    }

    /// Sends one request with a body of `content_type` (when given) and reads the whole
    /// response. Any status is a response; only transport failures are errors.
    pub fn send(
        &self,
        method: &str,
        path: &str,
        content_type: Option<&str>,
        body: &[u8],
    ) -> Result<Response, HttpError> {
        let fail = |source| HttpError::Request {
            addr: self.addr.clone(),
            source: Box::new(source),
        };
        let url = format!("{}{}{path}", self.base, self.prefix);
        let mut request = ureq::http::Request::builder()
            .method(method)
            .uri(&url)
            .header("Accept", "application/json");
        match (&self.token, &self.basic) {
            (Some(t), _) => request = request.header("Authorization", format!("Bearer {t}")),
            (None, Some(b)) => request = request.header("Authorization", format!("Basic {b}")),
            (None, None) => {}
        }
        if let Some(t) = content_type {
            request = request.header("Content-Type", t);
        }
        for (name, value) in &self.extra {
            request = request.header(name.as_str(), value.as_str());
        }
        let request = request
            .body(body)
            .map_err(|_| HttpError::Url(url.clone()))?;
        let mut response = self.agent.run(request).map_err(fail)?;
        let status = response.status().as_u16();
        let bytes = response
            .body_mut()
            .with_config()
            .limit(BODY_LIMIT)
            .read_to_vec()
            .map_err(fail)?;
        Ok(Response {
            status,
            body: String::from_utf8_lossy(&bytes).into_owned(),
        })
    }
}

/// An agent that reports every status as a response, follows no redirect (an API answer is
/// never one) and verifies `https://` against `ca` or the system's roots.
fn agent(timeout: Duration, ca: Option<&Path>) -> Result<ureq::Agent, HttpError> {
    let roots = match ca {
        Some(path) => {
            let certs = saltpeter_tls::certs_from_file(path).map_err(|e| HttpError::Ca {
                path: path.to_owned(),
                reason: e.to_string(),
            })?;
            root_certs(&certs)
        }
        // Without system roots (a minimal container), Mozilla's bundled ones.
        None => match saltpeter_tls::system_root_certs() {
            Ok(certs) => root_certs(&certs),
            Err(_) => ureq::tls::RootCerts::WebPki,
        },
    };
    let tls = ureq::tls::TlsConfig::builder()
        .provider(ureq::tls::TlsProvider::Rustls)
        .root_certs(roots)
        .build();
    let config = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .max_redirects(0)
        .timeout_global(Some(timeout))
        .user_agent("sp-master")
        .tls_config(tls)
        .build();
    Ok(config.into())
}

fn root_certs(
    certs: &[saltpeter_tls::rustls::pki_types::CertificateDer<'static>],
) -> ureq::tls::RootCerts {
    let certs: Vec<ureq::tls::Certificate<'static>> = certs
        .iter()
        .map(|c| ureq::tls::Certificate::from_der(c.as_ref()).to_owned())
        .collect();
    ureq::tls::RootCerts::Specific(Arc::new(certs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_need_http_or_https() {
        let c = Client::new("http://127.0.0.1:8888", None).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            (c.base.as_str(), c.prefix.as_str()),
            ("http://127.0.0.1:8888", "")
        );
        let c = Client::new("https://cron.example/sp/", Some(String::new()))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            (c.base.as_str(), c.prefix.as_str()),
            ("https://cron.example", "/sp")
        );
        assert!(c.token.is_none());
        assert!(Client::new("ftp://x", None).is_err());
        assert!(Client::new("https://", None).is_err());
    }

    #[test]
    fn userinfo_becomes_basic_auth() {
        let c = Client::new("http://elastic:p%40ss@es.example:9200", None)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.addr, "es.example:9200");
        assert_eq!(c.base, "http://es.example:9200");
        // base64("elastic:p@ss")
        assert_eq!(c.basic.as_deref(), Some("ZWxhc3RpYzpwQHNz"));
    }

    #[test]
    fn a_missing_ca_file_is_an_error() {
        let c = Client::new("https://127.0.0.1:1", None).unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(
            c.with_ca(Some(Path::new("/nonexistent/ca.pem"))),
            Err(HttpError::Ca { .. })
        ));
    }
}
