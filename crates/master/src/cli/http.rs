//! A tiny blocking HTTP/1.1 client for the CLI and the log shipper (`ship`): one request per
//! connection (`Connection: close`), `Content-Length` or chunked bodies, plain `http://` only,
//! optional Basic auth from the URL's `user:pass@`.
//!
//! Hand-written rather than reqwest: the CLI makes a handful of loopback requests to the
//! master's own API, and reqwest with its TLS and HTTP/2 stack would add minutes to CI's cold
//! build on two cores for no gain here.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("bad API URL {0:?}: expected http://HOST:PORT")]
    Url(String),
    #[error("cannot reach the master at {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("talking to the master at {addr}: {source}")]
    Io {
        addr: String,
        source: std::io::Error,
    },
    #[error("malformed HTTP response from {0}")]
    Malformed(String),
}

/// An API endpoint and its credentials.
#[derive(Clone, Debug)]
pub struct Client {
    /// `host:port`.
    addr: String,
    /// Path prefix of the API (usually empty).
    prefix: String,
    token: Option<String>,
    /// `Authorization: Basic` credentials (base64) from the URL's userinfo.
    basic: Option<String>,
    timeout: Duration,
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

impl Client {
    /// A client for `http://host:port[/prefix]`.
    pub fn new(url: &str, token: Option<String>) -> Result<Self, HttpError> {
        let rest = url
            .strip_prefix("http://")
            .ok_or_else(|| HttpError::Url(url.to_owned()))?;
        let (addr, prefix) = match rest.split_once('/') {
            Some((a, p)) => (a, format!("/{}", p.trim_end_matches('/'))),
            None => (rest, String::new()),
        };
        // `user:pass@host`: the last `@` ends the userinfo (a password may hold a raw `@`).
        let (basic, addr) = match addr.rsplit_once('@') {
            Some((userinfo, host)) => (Some(base64(percent_decode(userinfo).as_bytes())), host),
            None => (None, addr),
        };
        if addr.is_empty() {
            return Err(HttpError::Url(url.to_owned()));
        }
        let addr = if addr.contains(':') && !addr.ends_with(']') {
            addr.to_owned()
        } else {
            format!("{addr}:80")
        };
        let prefix = if prefix == "/" { String::new() } else { prefix };
        Ok(Self {
            addr,
            prefix,
            token: token.filter(|t| !t.is_empty()),
            basic,
            timeout: Duration::from_secs(30),
        })
    }

    /// Sets the connect, read and write timeout (default 30 s).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
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
    pub fn request(&self, method: &str, path: &str) -> Result<Response, HttpError> {
        self.send(method, path, None, &[])
    }

    /// Sends one request with a body of `content_type` (when given) and reads the whole response.
    pub fn send(
        &self,
        method: &str,
        path: &str,
        content_type: Option<&str>,
        body: &[u8],
    ) -> Result<Response, HttpError> {
        let io = |source| HttpError::Io {
            addr: self.addr.clone(),
            source,
        };
        let mut stream = self.connect()?;
        stream.set_read_timeout(Some(self.timeout)).map_err(io)?;
        stream.set_write_timeout(Some(self.timeout)).map_err(io)?;
        let auth = match (&self.token, &self.basic) {
            (Some(t), _) => format!("Authorization: Bearer {t}\r\n"),
            (None, Some(b)) => format!("Authorization: Basic {b}\r\n"),
            (None, None) => String::new(),
        };
        let content_type = content_type
            .map(|t| format!("Content-Type: {t}\r\n"))
            .unwrap_or_default();
        let head = format!(
            "{method} {}{path} HTTP/1.1\r\nHost: {}\r\nUser-Agent: sp-master-cli\r\nAccept: application/json\r\n{auth}{content_type}Content-Length: {}\r\nConnection: close\r\n\r\n",
            self.prefix,
            self.addr,
            body.len()
        );
        stream.write_all(head.as_bytes()).map_err(io)?;
        stream.write_all(body).map_err(io)?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).map_err(io)?;
        parse_response(&raw).ok_or_else(|| HttpError::Malformed(self.addr.clone()))
    }

    /// Connects with the timeout: a plain `connect` to an unreachable host can hang for minutes,
    /// which would stall the log shipper's shutdown.
    fn connect(&self) -> Result<TcpStream, HttpError> {
        let error = |source| HttpError::Connect {
            addr: self.addr.clone(),
            source,
        };
        let mut last = None;
        for addr in self.addr.to_socket_addrs().map_err(error)? {
            match TcpStream::connect_timeout(&addr, self.timeout) {
                Ok(stream) => return Ok(stream),
                Err(e) => last = Some(e),
            }
        }
        Err(error(last.unwrap_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::NotFound, "no address")
        })))
    }
}

/// `%XX` escapes in URL userinfo (RFC 3986); anything malformed is kept as written.
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Standard base64 with padding, for `Authorization: Basic` (not worth a dependency).
fn base64(input: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(input.len().div_ceil(3) * 4);
    for chunk in input.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for (i, shift) in [18, 12, 6, 0].into_iter().enumerate() {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> shift) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Splits a full HTTP/1.1 response into status and body.
fn parse_response(raw: &[u8]) -> Option<Response> {
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&raw[..split]).ok()?;
    let body = &raw[split + 4..];
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    let chunked = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    let body = if chunked {
        dechunk(body)?
    } else {
        body.to_vec()
    };
    Some(Response {
        status,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

fn dechunk(mut body: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = body.windows(2).position(|w| w == b"\r\n")?;
        let size_text = std::str::from_utf8(&body[..line_end]).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        body = &body[line_end + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(body.get(..size)?);
        body = body.get(size + 2..)?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_plain_and_chunked_responses() {
        let r = parse_response(b"HTTP/1.1 202 Accepted\r\nContent-Length: 2\r\n\r\n{}")
            .unwrap_or_else(|| panic!("no parse"));
        assert_eq!((r.status, r.body.as_str()), (202, "{}"));
        let r = parse_response(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nh\xc3\xa9l\r\n2\r\nlo\r\n0\r\n\r\n",
        )
        .unwrap_or_else(|| panic!("no parse"));
        assert_eq!((r.status, r.body.as_str()), (200, "héllo"));
        assert!(parse_response(b"garbage").is_none());
    }

    #[test]
    fn urls_need_http_and_get_a_default_port() {
        let c = Client::new("http://127.0.0.1:8888", None).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((c.addr.as_str(), c.prefix.as_str()), ("127.0.0.1:8888", ""));
        let c = Client::new("http://cron.example/sp/", Some(String::new()))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            (c.addr.as_str(), c.prefix.as_str()),
            ("cron.example:80", "/sp")
        );
        assert!(c.token.is_none());
        assert!(Client::new("https://x", None).is_err());
    }

    #[test]
    fn userinfo_becomes_basic_auth() {
        let c = Client::new("http://elastic:p%40ss@es.example:9200", None)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.addr, "es.example:9200");
        // base64("elastic:p@ss")
        assert_eq!(c.basic.as_deref(), Some("ZWxhc3RpYzpwQHNz"));
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(percent_decode("a%2"), "a%2");
    }
}
