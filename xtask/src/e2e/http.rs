//! Requests to the master's JSON API from scenarios and benchmarks, through the project's one
//! HTTP client (ureq, as the CLI and the log shipper use it).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
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

/// Raw, over plain TCP: a scenario that must send a `Host` of its choosing (the rebinding
/// checks) cannot leave the header to the client library.
/// Sends one request with extra header lines (`Name: value`; a `Host` line replaces the
/// default) and returns the response with its header block.
pub fn exchange(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&Value>,
    headers: &[String],
) -> Result<(Response, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .with_context(|| format!("connecting to {addr}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let payload = body.map(Value::to_string).unwrap_or_default();
    let host = headers
        .iter()
        .find(|h| h.to_ascii_lowercase().starts_with("host:"))
        .cloned()
        .unwrap_or_else(|| format!("Host: {addr}"));
    let extra: String = headers
        .iter()
        .filter(|h| !h.to_ascii_lowercase().starts_with("host:"))
        .map(|h| format!("{h}\r\n"))
        .collect();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\n{host}\r\n{extra}Connection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{payload}",
        payload.len()
    )?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw);
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        bail!("malformed HTTP response from {addr}{path}: {text:?}");
    };
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("no status in {head:?}"))?;
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_owned()
    };
    Ok((
        Response {
            status,
            body: serde_json::from_str(&body).unwrap_or(Value::Null),
        },
        head.to_owned(),
    ))
}

/// Joins the pieces of a chunked body.
fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}
