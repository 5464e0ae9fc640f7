//! Raw HTTP/1.1 and UI WebSocket clients for tests that must choose every header (the Host
//! and Origin checks) or read the UI protocol frame by frame.

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{self, Message};

/// An answer: status, header block and body (chunked bodies joined).
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub head: String,
    pub body: String,
}

/// One request with extra header lines (`Name: value`) through the project's HTTP client; a
/// `Host` line replaces the default (the API's address), which the client keeps as given. The
/// answer must come within 10 s; every status is an answer.
pub async fn request(addr: SocketAddr, method: &str, path: &str, headers: &[&str]) -> Answer {
    let url = format!("http://{addr}{path}");
    let method = method.to_owned();
    let headers: Vec<(String, String)> = headers
        .iter()
        .map(|h| {
            let (k, v) = h.split_once(':').expect("a header line");
            (k.trim().to_owned(), v.trim().to_owned())
        })
        .collect();
    tokio::task::spawn_blocking(move || {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .max_redirects(0)
            .timeout_global(Some(Duration::from_secs(10)))
            .build()
            .into();
        let mut builder = ureq::http::Request::builder()
            .method(method.as_str())
            .uri(&url);
        for (k, v) in &headers {
            builder = builder.header(k, v);
        }
        let mut response = agent
            .run(builder.body(Vec::new()).unwrap())
            .unwrap_or_else(|e| panic!("no answer to {method} {url}: {e}"));
        let status = response.status().as_u16();
        let mut head = format!("HTTP/1.1 {status}");
        for (name, value) in response.headers() {
            head.push_str(&format!(
                "\r\n{name}: {}",
                String::from_utf8_lossy(value.as_bytes())
            ));
        }
        let body = response.body_mut().read_to_string().unwrap_or_default();
        Answer { status, head, body }
    })
    .await
    .unwrap()
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
