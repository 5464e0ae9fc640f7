//! Requests to the master's JSON API from scenarios and benchmarks, through the project's one
//! HTTP client (ureq, as the CLI and the log shipper use it).

use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::Value;

/// A response: status code and parsed JSON body (`Value::Null` when the body is not JSON).
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub body: Value,
}

/// One agent for the whole run: every status is a response, not an error.
fn agent() -> &'static ureq::Agent {
    static AGENT: OnceLock<ureq::Agent> = OnceLock::new();
    AGENT.get_or_init(|| {
        ureq::Agent::config_builder()
            .http_status_as_error(false)
            .max_redirects(0)
            .timeout_connect(Some(Duration::from_secs(5)))
            .timeout_global(Some(Duration::from_secs(30)))
            .build()
            .into()
    })
}

/// Sends one request and reads the whole response as text.
fn call(addr: SocketAddr, method: &str, path: &str, body: Option<&Value>) -> Result<(u16, String)> {
    let url = format!("http://{addr}{path}");
    let payload = body.map(Value::to_string).unwrap_or_default();
    let request = ureq::http::Request::builder()
        .method(method)
        .uri(&url)
        .header("Content-Type", "application/json")
        .body(payload)
        .with_context(|| format!("building {method} {url}"))?;
    let mut response = agent()
        .run(request)
        .with_context(|| format!("{method} {url}"))?;
    let status = response.status().as_u16();
    let text = response
        .body_mut()
        .with_config()
        .limit(256 * 1024 * 1024)
        .read_to_string()
        .with_context(|| format!("reading the answer to {method} {url}"))?;
    Ok((status, text))
}

/// Sends one request and reads the whole response.
pub fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> Result<Response> {
    let (status, text) = call(addr, method, path, body)?;
    Ok(Response {
        status,
        body: serde_json::from_str(&text).unwrap_or(Value::Null),
    })
}

/// GET returning the body as text (for plain-text endpoints); any status but 200 is an error.
pub fn get_text(addr: SocketAddr, path: &str) -> Result<String> {
    let (status, text) = call(addr, "GET", path, None)?;
    if status != 200 {
        bail!("GET {path}: status {status}");
    }
    Ok(text)
}

pub fn get(addr: SocketAddr, path: &str) -> Result<Response> {
    request(addr, "GET", path, None)
}

pub fn post(addr: SocketAddr, path: &str) -> Result<Response> {
    request(addr, "POST", path, None)
}

/// Sends one request with extra header lines (`Name: value`) and returns the response with
/// its header block (`HTTP/1.1 status` and `name: value` lines). A `Host` line replaces the
/// default: the rebinding checks send a `Host` of their choosing, and the client keeps it.
pub fn exchange(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&Value>,
    headers: &[String],
) -> Result<(Response, String)> {
    let url = format!("http://{addr}{path}");
    let mut builder = ureq::http::Request::builder()
        .method(method)
        .uri(&url)
        .header("Content-Type", "application/json");
    for line in headers {
        let (name, value) = line
            .split_once(':')
            .with_context(|| format!("not a header line: {line:?}"))?;
        builder = builder.header(name.trim(), value.trim());
    }
    let request = builder
        .body(body.map(Value::to_string).unwrap_or_default())
        .with_context(|| format!("building {method} {url}"))?;
    let mut response = agent()
        .run(request)
        .with_context(|| format!("{method} {url}"))?;
    let status = response.status().as_u16();
    let mut head = format!("HTTP/1.1 {status}");
    for (name, value) in response.headers() {
        head.push_str(&format!(
            "\r\n{name}: {}",
            String::from_utf8_lossy(value.as_bytes())
        ));
    }
    let text = response
        .body_mut()
        .read_to_string()
        .with_context(|| format!("reading the answer to {method} {url}"))?;
    Ok((
        Response {
            status,
            body: serde_json::from_str(&text).unwrap_or(Value::Null),
        },
        head,
    ))
}
