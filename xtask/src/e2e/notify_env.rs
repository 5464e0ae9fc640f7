//! Receivers for the notification scenarios: a mail sink and a webhook receiver on loopback.
//!
//! - [`SmtpSink`]: `aiosmtpd` (from PyPI, pinned in [`AIOSMTPD`]) installed into the Salt
//!   scenarios' cached venv (`target/salt-venv`, made by [`salt_env::ensure_venv`]) and run as
//!   `python -m aiosmtpd -n -l 127.0.0.1:PORT -c aiosmtpd.handlers.Mailbox DIR`: plain SMTP
//!   without STARTTLS (the master's `smtp:` then needs `tls: none`, allowed for loopback), every
//!   message a file in the Maildir `DIR`. It is its own process group, ended by PID when the sink
//!   is stopped or dropped.
//! - [`WebhookReceiver`]: a thread serving HTTP/1.1 on 127.0.0.1 that records each request and
//!   checks its `X-Saltpeter-Signature` (HMAC-SHA256 of the raw body, compared in constant
//!   time) against the secret it was given; it answers from a script of status codes, then 200.
//!
//! `cargo xtask e2e --only notify-env` checks both (it installs Salt's venv if missing).

use std::collections::VecDeque;
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use parking_lot::Mutex;

use super::master::target_dir;
use super::salt_env::{self, Daemon, Venv, free_port};

/// The mail sink's packages, pinned like the Salt venv's (attrs, its other dependency, is
/// already there).
pub const AIOSMTPD: [&str; 2] = ["aiosmtpd==1.4.6", "atpublic==9.0.0"];

/// Installs [`AIOSMTPD`] into `venv` unless a marker says it is there and it imports.
pub fn ensure_aiosmtpd(venv: &Venv) -> Result<()> {
    let marker = venv.dir.join(".sp-aiosmtpd-ready");
    let wanted = AIOSMTPD.join("\n");
    if fs::read_to_string(&marker).is_ok_and(|m| m == wanted) {
        let imports = Command::new(venv.bin("python"))
            .args(["-c", "import aiosmtpd"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if imports {
            return Ok(());
        }
    }
    let log = target_dir().join("aiosmtpd-install.log");
    let _ = fs::remove_file(&log);
    let pins: Vec<&std::ffi::OsStr> = AIOSMTPD.iter().map(std::ffi::OsStr::new).collect();
    crate::process::pip_install(&venv.bin("pip"), &pins, &log, "pip install aiosmtpd")?;
    fs::write(&marker, wanted)?;
    Ok(())
}

/// The Salt venv with aiosmtpd in it.
pub fn ensure_venv() -> Result<Venv> {
    let venv = salt_env::ensure_venv()?;
    ensure_aiosmtpd(&venv)?;
    Ok(venv)
}

/// A running aiosmtpd that files every message it receives into a Maildir.
#[derive(Debug)]
pub struct SmtpSink {
    pub addr: SocketAddr,
    pub maildir: PathBuf,
    daemon: Daemon,
}

impl SmtpSink {
    /// Starts the sink under `dir` (the Maildir and its log go there) and waits, at most 20 s,
    /// for its greeting.
    pub fn start(venv: &Venv, dir: &Path) -> Result<Self> {
        fs::create_dir_all(dir)?;
        let maildir = dir.join("maildir");
        let port = free_port()?;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let mut daemon = Daemon::spawn(
            "aiosmtpd",
            Command::new(venv.bin("python"))
                .args(["-m", "aiosmtpd", "-n", "-l"])
                .arg(addr.to_string())
                .args(["-c", "aiosmtpd.handlers.Mailbox"])
                .arg(&maildir),
            &dir.join("aiosmtpd.log"),
        )?;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if greets(addr) {
                break;
            }
            if Instant::now() > deadline {
                daemon.stop();
                let log = fs::read_to_string(dir.join("aiosmtpd.log")).unwrap_or_default();
                bail!("aiosmtpd did not greet on {addr} within 20 s; its log:\n{log}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(SmtpSink {
            addr,
            maildir,
            daemon,
        })
    }

    /// Every message received so far, as raw text, oldest first.
    pub fn messages(&self) -> Result<Vec<String>> {
        let mut files = Vec::new();
        for sub in ["new", "cur"] {
            let Ok(entries) = fs::read_dir(self.maildir.join(sub)) else {
                continue;
            };
            for entry in entries {
                let entry = entry?;
                let modified = entry.metadata()?.modified()?;
                files.push((modified, entry.path()));
            }
        }
        files.sort();
        files
            .into_iter()
            .map(|(_, path)| {
                fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
            })
            .collect()
    }

    /// Waits (at most `limit`) until `n` messages arrived; returns what there is then.
    pub fn wait_for(&self, n: usize, limit: Duration) -> Result<Vec<String>> {
        let deadline = Instant::now() + limit;
        loop {
            let messages = self.messages()?;
            if messages.len() >= n || Instant::now() > deadline {
                return Ok(messages);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Ends aiosmtpd (SIGTERM to its PID, then SIGKILL to its group).
    pub fn stop(mut self) {
        self.daemon.stop();
    }
}

/// Whether an SMTP server on `addr` sends its 220 greeting.
fn greets(addr: SocketAddr) -> bool {
    let Ok(stream) = TcpStream::connect_timeout(&addr, Duration::from_millis(500)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let mut line = String::new();
    let ok = BufReader::new(&stream).read_line(&mut line).is_ok() && line.starts_with("220");
    let _ = (&stream).write_all(b"QUIT\r\n");
    ok
}

/// One request a [`WebhookReceiver`] received.
#[derive(Debug, Clone)]
pub struct Received {
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// Whether `X-Saltpeter-Signature` matched the receiver's secret; `None` without a secret.
    pub signature_valid: Option<bool>,
}

impl Received {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Largest request body the receiver reads.
const MAX_BODY: usize = 4 * 1024 * 1024;

/// An HTTP receiver on 127.0.0.1 for webhook and Slack notifications.
#[derive(Debug)]
pub struct WebhookReceiver {
    pub addr: SocketAddr,
    received: Arc<Mutex<Vec<Received>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// `sha256=<hex>` checked against the HMAC-SHA256 of `body` under `secret`.
pub fn signature_valid(secret: &str, body: &[u8], header: Option<&str>) -> bool {
    let Some(hex) = header.and_then(|h| h.strip_prefix("sha256=")) else {
        return false;
    };
    let tag: Option<Vec<u8>> = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect();
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    tag.is_some_and(|tag| ring::hmac::verify(&key, body, &tag).is_ok())
}

fn read_request(stream: &TcpStream) -> Option<Received> {
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line).ok()?;
    let path = line.split_whitespace().nth(1)?.to_owned();
    let mut headers = Vec::new();
    for _ in 0..200 {
        let mut line = String::new();
        reader.read_line(&mut line).ok()?;
        let line = line.trim_end();
        if line.is_empty() {
            let length: usize = headers
                .iter()
                .find(|(k, _): &&(String, String)| k.eq_ignore_ascii_case("content-length"))
                .and_then(|(_, v)| v.parse().ok())
                .unwrap_or(0);
            let mut body = vec![0; length.min(MAX_BODY)];
            reader.read_exact(&mut body).ok()?;
            return Some(Received {
                path,
                headers,
                body,
                signature_valid: None,
            });
        }
        let (k, v) = line.split_once(':')?;
        headers.push((k.trim().to_owned(), v.trim().to_owned()));
    }
    None
}

impl WebhookReceiver {
    /// Starts the receiver. Requests get the statuses of `script` in turn, then 200.
    pub fn start(secret: Option<String>, script: Vec<u16>) -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let received = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (seen, stopping) = (Arc::clone(&received), Arc::clone(&stop));
        let thread = std::thread::Builder::new()
            .name("webhook-receiver".into())
            .spawn(move || {
                let mut script: VecDeque<u16> = script.into();
                while !stopping.load(Ordering::Relaxed) {
                    let Ok((stream, _)) = listener.accept() else {
                        std::thread::sleep(Duration::from_millis(10));
                        continue;
                    };
                    let _ = stream.set_nonblocking(false);
                    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
                    let Some(mut request) = read_request(&stream) else {
                        continue;
                    };
                    request.signature_valid = secret.as_deref().map(|s| {
                        let header = request.header("X-Saltpeter-Signature");
                        signature_valid(s, &request.body, header)
                    });
                    seen.lock().push(request);
                    let status = script.pop_front().unwrap_or(200);
                    let reply = format!(
                        "HTTP/1.1 {status} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                    );
                    let _ = (&stream).write_all(reply.as_bytes());
                }
            })?;
        Ok(WebhookReceiver {
            addr,
            received,
            stop,
            thread: Some(thread),
        })
    }

    /// `http://127.0.0.1:PORT{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Everything received so far.
    pub fn received(&self) -> Vec<Received> {
        self.received.lock().clone()
    }

    /// Waits (at most `limit`) until `n` requests arrived; returns what there is then.
    pub fn wait_for(&self, n: usize, limit: Duration) -> Vec<Received> {
        let deadline = Instant::now() + limit;
        while self.received.lock().len() < n && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        self.received()
    }

    /// Stops the thread and waits for it.
    pub fn stop(mut self) {
        self.halt();
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for WebhookReceiver {
    fn drop(&mut self) {
        self.halt();
    }
}

/// One SMTP session by hand, enough for the sink's self-check.
fn send_test_mail(addr: SocketAddr, subject: &str) -> Result<()> {
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut reader = BufReader::new(&stream);
    let mut expect = |code: &str| -> Result<()> {
        loop {
            let mut line = String::new();
            reader.read_line(&mut line)?;
            ensure!(line.starts_with(code), "expected {code}, got {line:?}");
            // A multi-line reply continues with "250-".
            if line.as_bytes().get(3) != Some(&b'-') {
                return Ok(());
            }
        }
    };
    expect("220")?;
    let say = |text: &str| (&stream).write_all(text.as_bytes());
    say("EHLO xtask\r\n")?;
    expect("250")?;
    say("MAIL FROM:<saltpeter@example.org>\r\n")?;
    expect("250")?;
    say("RCPT TO:<ops@example.org>\r\n")?;
    expect("250")?;
    say("DATA\r\n")?;
    expect("354")?;
    say(&format!(
        "From: saltpeter@example.org\r\nTo: ops@example.org\r\nSubject: {subject}\r\n\r\nbody\r\n.\r\n"
    ))?;
    expect("250")?;
    say("QUIT\r\n")?;
    Ok(())
}

/// `cargo xtask e2e --only notify-env`: the mail sink receives a message, the webhook receiver
/// tells a good signature from a bad one.
pub fn self_test() -> Result<String> {
    let started = Instant::now();
    let receiver = WebhookReceiver::start(Some("s3cret".into()), vec![500])?;
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(10)))
        .build()
        .into();
    let body = br#"{"event":"failure"}"#;
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, b"s3cret");
    let hex: String = ring::hmac::sign(&key, body)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let mut statuses = Vec::new();
    for signature in [format!("sha256={hex}"), "sha256=00".to_owned()] {
        let response = agent
            .post(receiver.url("/hook"))
            .header("X-Saltpeter-Signature", signature)
            .send(&body[..])?;
        statuses.push(response.status().as_u16());
    }
    let got = receiver.wait_for(2, Duration::from_secs(5));
    receiver.stop();
    ensure!(statuses == [500, 200], "statuses {statuses:?}");
    let valid: Vec<Option<bool>> = got.iter().map(|r| r.signature_valid).collect();
    ensure!(
        valid == [Some(true), Some(false)],
        "signature checks {valid:?}"
    );
    ensure!(
        got.iter().all(|r| r.path == "/hook" && r.body == body),
        "requests {got:?}"
    );

    let venv = ensure_venv()?;
    let dir = target_dir().join("e2e").join("notify-env");
    let _ = fs::remove_dir_all(&dir);
    let sink = SmtpSink::start(&venv, &dir)?;
    let sent = send_test_mail(sink.addr, "saltpeter: self-test");
    let messages = sink.wait_for(1, Duration::from_secs(10));
    sink.stop();
    sent?;
    let messages = messages?;
    ensure!(
        messages.len() == 1 && messages[0].contains("Subject: saltpeter: self-test"),
        "the sink holds {messages:?}"
    );
    Ok(format!(
        "webhook receiver and aiosmtpd sink work ({:.1} s)",
        started.elapsed().as_secs_f64()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_are_checked_against_the_raw_body() {
        // RFC 4231, test case 2.
        let good = "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843";
        assert!(signature_valid(
            "Jefe",
            b"what do ya want for nothing?",
            Some(good)
        ));
        assert!(!signature_valid(
            "Jefe",
            b"what do ya want for nothing!",
            Some(good)
        ));
        assert!(!signature_valid(
            "jefe",
            b"what do ya want for nothing?",
            Some(good)
        ));
        assert!(!signature_valid("Jefe", b"x", None));
        assert!(!signature_valid("Jefe", b"x", Some("sha256=zz")));
        assert!(!signature_valid("Jefe", b"x", Some("sha1=00")));
    }
}
