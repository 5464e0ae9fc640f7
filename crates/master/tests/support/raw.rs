//! Raw HTTP/1.1 and UI WebSocket clients for tests that must choose every header (the Host
//! and Origin checks) or read the UI protocol frame by frame.

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{self, Message};

/// An answer: status, header block and body (chunked bodies joined).
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub head: String,
    pub body: String,
}

/// One request with extra header lines (`Name: value`); a `Host` line replaces the default
/// (the API's address). The connection closes after the answer, which must come within 10 s.
pub async fn request(addr: SocketAddr, method: &str, path: &str, headers: &[&str]) -> Answer {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let host = headers
        .iter()
        .find(|h| h.to_ascii_lowercase().starts_with("host:"))
        .map_or_else(|| format!("Host: {addr}"), |h| (*h).to_owned());
    let extra: String = headers
        .iter()
        .filter(|h| !h.to_ascii_lowercase().starts_with("host:"))
        .map(|h| format!("{h}\r\n"))
        .collect();
    let req = format!(
        "{method} {path} HTTP/1.1\r\n{host}\r\n{extra}Content-Length: 0\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut raw))
        .await
        .unwrap_or_else(|_| panic!("no answer to {method} {path} within 10 s"))
        .unwrap();
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no answer to {path}: {text:?}"));
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    Answer {
        status,
        head: head.to_owned(),
        body: if chunked {
            dechunk(body)
        } else {
            body.to_owned()
        },
    }
}

impl Answer {
    /// A header's value, by case-insensitive name.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }

    /// The body as JSON (`Null` when it is not JSON).
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or(Value::Null)
    }
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}

pub type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Opens the UI socket with a query string and extra headers; a refusal gives its status.
pub async fn ws_with(addr: SocketAddr, query: &str, headers: &[(&str, &str)]) -> Result<Ws, u16> {
    let mut req = format!("ws://{addr}/ws{query}")
        .into_client_request()
        .unwrap();
    for (k, v) in headers {
        req.headers_mut().insert(
            tungstenite::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            tungstenite::http::HeaderValue::from_str(v).unwrap(),
        );
    }
    match tokio_tungstenite::connect_async(req).await {
        Ok((ws, _)) => Ok(ws),
        Err(tungstenite::Error::Http(resp)) => Err(resp.status().as_u16()),
        Err(e) => panic!("unexpected WebSocket error {e}"),
    }
}

/// The next text frame as JSON, within 10 s.
pub async fn recv(ws: &mut Ws) -> Value {
    loop {
        let frame = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("no message within 10 s")
            .expect("socket closed")
            .unwrap();
        if let Message::Text(t) = frame {
            return serde_json::from_str(t.as_str()).unwrap();
        }
    }
}

/// The next message of `kind`, skipping others (bounded).
pub async fn recv_type(ws: &mut Ws, kind: &str) -> Value {
    for _ in 0..50 {
        let m = recv(ws).await;
        if m["type"] == kind {
            return m;
        }
    }
    panic!("no {kind} message among the next 50");
}

pub async fn send(ws: &mut Ws, text: &str) {
    ws.send(Message::text(text)).await.unwrap();
}
