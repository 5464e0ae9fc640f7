//! A minimal HTTP/1.1 client over `std::net::TcpStream`, enough to drive the master's JSON API
//! from scenarios without pulling an HTTP stack into xtask.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::Value;

/// A response: status code and parsed JSON body (`Value::Null` when the body is not JSON).
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub body: Value,
}

/// Sends one request with `Connection: close` and reads the whole response.
pub fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> Result<Response> {
    Ok(exchange(addr, method, path, body, &[])?.0)
}

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

/// GET returning the body as text (for plain-text endpoints).
pub fn get_text(addr: SocketAddr, path: &str) -> Result<String> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        bail!("malformed HTTP response from {path}");
    };
    if !head.starts_with("HTTP/1.1 200") {
        bail!("GET {path}: {}", head.lines().next().unwrap_or_default());
    }
    Ok(
        if head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked")
        {
            dechunk(body)
        } else {
            body.to_owned()
        },
    )
}

pub fn get(addr: SocketAddr, path: &str) -> Result<Response> {
    request(addr, "GET", path, None)
}

pub fn post(addr: SocketAddr, path: &str) -> Result<Response> {
    request(addr, "POST", path, None)
}
