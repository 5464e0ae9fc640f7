//! The real senders against receivers on 127.0.0.1 written here: an HTTP server that records
//! requests and answers from a script, and a minimal SMTP server. Every server thread ends by
//! itself (a deadline, or the number of connections it was built for).
#![allow(clippy::unwrap_used)]

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use saltpeter_notify::config::{SmtpSettings, SmtpTls};
use saltpeter_notify::deliver::LoopOptions;
use saltpeter_notify::outbox::State;
use saltpeter_notify::policy::Retry;
use saltpeter_notify::{
    Alert, Channel, Deliverer, DeliveryLoop, MachineResult, MemoryOutbox, NetSender, NotifyOn,
    Outbox, Rule, Sender, SystemClock, notifications_for, sign,
};
use serde_json::Value;

#[derive(Debug, Clone)]
struct Request {
    path: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Request {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// An HTTP receiver: answers each request with the next status of its script (200 once the
/// script is empty), or not at all for status 0, and stops after `lifetime`.
struct Receiver {
    addr: SocketAddr,
    requests: Arc<Mutex<Vec<Request>>>,
    thread: Option<JoinHandle<()>>,
}

fn read_request(stream: &mut TcpStream) -> Option<Request> {
    let mut reader = BufReader::new(stream.try_clone().ok()?);
    let mut line = String::new();
    reader.read_line(&mut line).ok()?;
    let path = line.split_whitespace().nth(1)?.to_owned();
    let mut headers = Vec::new();
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).ok()?;
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        let (k, v) = line.split_once(':')?;
        headers.push((k.trim().to_owned(), v.trim().to_owned()));
    }
    let length: usize = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0; length.min(4 * 1024 * 1024)];
    reader.read_exact(&mut body).ok()?;
    Some(Request {
        path,
        headers,
        body,
    })
}

impl Receiver {
    fn start(script: Vec<u16>, lifetime: Duration) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::clone(&requests);
        let thread = std::thread::spawn(move || {
            let mut script: VecDeque<u16> = script.into();
            let deadline = Instant::now() + lifetime;
            let mut silent = Vec::new();
            while Instant::now() < deadline {
                let Ok((mut stream, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                };
                stream.set_nonblocking(false).unwrap();
                stream
                    .set_read_timeout(Some(Duration::from_secs(5)))
                    .unwrap();
                let Some(request) = read_request(&mut stream) else {
                    continue;
                };
                seen.lock().push(request);
                let status = script.pop_front().unwrap_or(200);
                if status == 0 {
                    // Never answer: keep the socket open until the receiver ends.
                    silent.push(stream);
                    continue;
                }
                let reply = format!(
                    "HTTP/1.1 {status} X\r\nContent-Length: 2\r\nLocation: http://127.0.0.1:9/\r\nConnection: close\r\n\r\nok"
                );
                let _ = stream.write_all(reply.as_bytes());
            }
        });
        Receiver {
            addr,
            requests,
            thread: Some(thread),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Waits (bounded) until `n` requests arrived; returns them.
    fn wait_for(&self, n: usize, limit: Duration) -> Vec<Request> {
        let deadline = Instant::now() + limit;
        while self.requests.lock().len() < n && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        self.requests.lock().clone()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        // The thread ends at its deadline; tests keep lifetimes short.
        if let Some(thread) = self.thread.take()
            && thread.is_finished()
        {
            let _ = thread.join();
        }
    }
}

fn alert() -> Alert {
    Alert {
        event: NotifyOn::Failure,
        job: "backup".into(),
        instance: Some("backup_1796522311".into()),
        at: time::OffsetDateTime::now_utc(),
        slot: None,
        machines: vec![
            MachineResult {
                machine: "db1".into(),
                code: 0,
                cause: "exit".into(),
            },
            MachineResult {
                machine: "db2".into(),
                code: 253,
                cause: "heartbeat_lost".into(),
            },
        ],
        detail: None,
        link: Some("https://cron.example.net/#run=backup_1796522311".into()),
    }
}

fn options(base_ms: u64) -> LoopOptions {
    let mut options = LoopOptions {
        poll: Duration::from_millis(200),
        ..LoopOptions::default()
    };
    options.delivery.retry = Retry {
        base: Duration::from_millis(base_ms),
        cap: Duration::from_millis(base_ms * 4),
        attempts: 5,
    };
    options
}

fn start(outbox: &Arc<MemoryOutbox>, sender: NetSender, options: LoopOptions) -> Deliverer {
    let state = DeliveryLoop::new(
        outbox.clone(),
        Box::new(sender),
        Arc::new(SystemClock),
        options,
    );
    Deliverer::start(state).unwrap()
}

fn hmac_hex(secret: &str, body: &[u8]) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    ring::hmac::sign(&key, body)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[test]
fn a_signed_webhook_and_a_slack_message_arrive_as_documented() {
    let receiver = Receiver::start(vec![], Duration::from_secs(20));
    let secret = "s3cret-for-the-test";
    let rules = [
        Rule {
            channel: Channel::Webhook {
                url: receiver.url("/hook?token=abc"),
                secret: Some(secret.into()),
            },
            on: [NotifyOn::Failure].into(),
        },
        Rule {
            channel: Channel::Slack {
                url: receiver.url("/services/T0/B0/xyz"),
            },
            on: [NotifyOn::Failure].into(),
        },
    ];
    let outbox = Arc::new(MemoryOutbox::new());
    for n in notifications_for(&alert(), &rules) {
        assert!(outbox.enqueue(n).unwrap());
    }
    let sender = NetSender::new(Duration::from_secs(5), None).unwrap();
    let deliverer = start(&outbox, sender, options(50));
    deliverer.wake();
    let got = receiver.wait_for(2, Duration::from_secs(15));
    deliverer.stop();
    assert_eq!(got.len(), 2, "{got:?}");
    let hook = got.iter().find(|r| r.path.starts_with("/hook")).unwrap();
    let header = hook.header("X-Saltpeter-Signature").unwrap();
    assert_eq!(header, format!("sha256={}", hmac_hex(secret, &hook.body)));
    assert!(sign::verify(secret, &hook.body, header));
    assert!(!sign::verify("another secret", &hook.body, header));
    assert_eq!(hook.header("Content-Type"), Some("application/json"));
    assert_eq!(hook.header("X-Saltpeter-Event"), Some("failure"));
    let body: Value = serde_json::from_slice(&hook.body).unwrap();
    assert_eq!(body["event"], "failure");
    assert_eq!(body["job"], "backup");
    assert_eq!(body["instance"], "backup_1796522311");
    assert_eq!(body["machines"][1]["code"], 253);
    assert_eq!(body["machines"][1]["cause"], "heartbeat_lost");
    assert_eq!(
        body["link"],
        "https://cron.example.net/#run=backup_1796522311"
    );
    assert_eq!(
        hook.header("X-Saltpeter-Delivery")
            .map(|k| k.starts_with(body["id"].as_str().unwrap())),
        Some(true)
    );
    let slack = got
        .iter()
        .find(|r| r.path.starts_with("/services"))
        .unwrap();
    assert_eq!(
        slack.header("X-Saltpeter-Signature"),
        None,
        "Slack is not signed"
    );
    let text: Value = serde_json::from_slice(&slack.body).unwrap();
    let text = text["text"].as_str().unwrap();
    assert!(text.contains("backup failed on 1 of 2 machines"), "{text}");
    assert!(text.contains("db2: 253 (heartbeat_lost)"), "{text}");
    assert_eq!(outbox.counts().unwrap().delivered, 2);
}

#[test]
fn a_receiver_failing_twice_gets_the_same_bytes_three_times_and_one_delivery() {
    let receiver = Receiver::start(vec![500, 503], Duration::from_secs(20));
    let rules = [Rule {
        channel: Channel::Webhook {
            url: receiver.url("/flaky"),
            secret: Some("k".into()),
        },
        on: [NotifyOn::Failure].into(),
    }];
    let outbox = Arc::new(MemoryOutbox::new());
    for n in notifications_for(&alert(), &rules) {
        outbox.enqueue(n).unwrap();
    }
    let sender = NetSender::new(Duration::from_secs(5), None).unwrap();
    let deliverer = start(&outbox, sender, options(100));
    deliverer.wake();
    let got = receiver.wait_for(3, Duration::from_secs(15));
    // Long enough for a fourth request to show up if the success were not recorded.
    std::thread::sleep(Duration::from_millis(800));
    let stats = deliverer.stats();
    deliverer.stop();
    let got_after = receiver.requests.lock().len();
    assert_eq!(got.len(), 3);
    assert_eq!(got_after, 3, "delivered once, then left alone");
    assert!(got.windows(2).all(|w| w[0].body == w[1].body));
    assert!(
        got.windows(2).all(|w| {
            w[0].header("X-Saltpeter-Signature") == w[1].header("X-Saltpeter-Signature")
        })
    );
    assert_eq!(
        (stats.delivered, stats.failed_attempts, stats.gave_up),
        (1, 2, 0)
    );
    assert_eq!(outbox.counts().unwrap().delivered, 1);
}

#[test]
fn refusals_and_redirects_give_up_without_retrying_and_errors_hide_the_path() {
    let receiver = Receiver::start(vec![404, 302], Duration::from_secs(20));
    let outbox = Arc::new(MemoryOutbox::new());
    for path in ["/gone/secret-token", "/moved/secret-token"] {
        let rules = [Rule {
            channel: Channel::Slack {
                url: receiver.url(path),
            },
            on: [NotifyOn::Failure].into(),
        }];
        let mut alert = alert();
        alert.instance = Some(path.into());
        for n in notifications_for(&alert, &rules) {
            outbox.enqueue(n).unwrap();
        }
    }
    let sender = NetSender::new(Duration::from_secs(5), None).unwrap();
    let deliverer = start(&outbox, sender, options(50));
    deliverer.wake();
    let got = receiver.wait_for(2, Duration::from_secs(15));
    std::thread::sleep(Duration::from_millis(500));
    let stats = deliverer.stats();
    deliverer.stop();
    assert_eq!(got.len(), 2);
    assert_eq!(
        receiver.requests.lock().len(),
        2,
        "neither retried nor followed"
    );
    assert_eq!(stats.gave_up, 2);
    let failures = outbox.failures(10).unwrap();
    assert!(failures.iter().all(|f| f.state == State::GaveUp));
    for f in &failures {
        assert!(!f.error.contains("secret-token"), "{}", f.error);
        assert!(
            f.error.contains("HTTP 404") || f.error.contains("HTTP 302"),
            "{}",
            f.error
        );
    }
}

#[test]
fn a_receiver_that_never_answers_times_out() {
    let receiver = Receiver::start(vec![0], Duration::from_secs(10));
    let sender = NetSender::new(Duration::from_millis(500), None).unwrap();
    let rules = [Rule {
        channel: Channel::Webhook {
            url: receiver.url("/slow"),
            secret: None,
        },
        on: [NotifyOn::Failure].into(),
    }];
    let n = notifications_for(&alert(), &rules).remove(0);
    let started = Instant::now();
    let e = sender.send(&n).unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(!e.permanent, "{e}");
    assert!(e.message.contains("timed out"), "{e}");
    let refused = NetSender::new(Duration::from_millis(500), None).unwrap();
    let mut closed = n.clone();
    // A port nothing listens on: bind one, note it, close it.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    closed.channel = Channel::Webhook {
        url: format!("http://127.0.0.1:{port}/x"),
        secret: None,
    };
    let e = refused.send(&closed).unwrap_err();
    assert!(!e.permanent, "{e}");
}

/// A minimal SMTP server for one session: no STARTTLS offered; records the envelope and the
/// message.
#[derive(Debug, Default, Clone)]
struct Mail {
    commands: Vec<String>,
    data: String,
}

fn smtp_server() -> (SocketAddr, JoinHandle<Mail>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let thread = std::thread::spawn(move || {
        let mut mail = Mail::default();
        listener.set_nonblocking(true).unwrap();
        let deadline = Instant::now() + Duration::from_secs(15);
        let mut stream = loop {
            if let Ok((stream, _)) = listener.accept() {
                break stream;
            }
            if Instant::now() > deadline {
                return mail;
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        stream.set_nonblocking(false).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let _ = stream.write_all(b"220 localhost ESMTP test\r\n");
        let mut in_data = false;
        loop {
            let mut line = String::new();
            match reader.read_line(&mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
            if in_data {
                if line == ".\r\n" {
                    in_data = false;
                    let _ = stream.write_all(b"250 2.0.0 queued\r\n");
                } else {
                    mail.data.push_str(&line);
                }
                continue;
            }
            let command = line.trim_end().to_owned();
            let upper = command.to_ascii_uppercase();
            mail.commands.push(command);
            let reply: &[u8] = if upper.starts_with("EHLO") {
                b"250-localhost\r\n250 8BITMIME\r\n"
            } else if upper.starts_with("DATA") {
                in_data = true;
                b"354 go ahead\r\n"
            } else if upper.starts_with("QUIT") {
                let _ = stream.write_all(b"221 bye\r\n");
                break;
            } else {
                b"250 ok\r\n"
            };
            let _ = stream.write_all(reply);
        }
        mail
    });
    (addr, thread)
}

fn smtp_settings(addr: SocketAddr, tls: SmtpTls) -> SmtpSettings {
    SmtpSettings {
        host: addr.ip().to_string(),
        port: addr.port(),
        tls,
        username: None,
        password: None,
        from: "saltpeter@example.org".into(),
        hello_name: Some("sp-master.test".into()),
    }
}

fn mail_rule() -> [Rule; 1] {
    [Rule {
        channel: Channel::Email {
            to: "ops@example.org".into(),
        },
        on: [NotifyOn::Failure].into(),
    }]
}

#[test]
fn a_mail_goes_through_a_plain_loopback_relay() {
    let (addr, server) = smtp_server();
    let sender = NetSender::new(
        Duration::from_secs(5),
        Some(smtp_settings(addr, SmtpTls::None)),
    )
    .unwrap();
    let n = notifications_for(&alert(), &mail_rule()).remove(0);
    sender.send(&n).unwrap();
    let mail = server.join().unwrap();
    assert_eq!(mail.commands[0], "EHLO sp-master.test");
    assert!(
        mail.commands
            .contains(&"MAIL FROM:<saltpeter@example.org>".to_owned()),
        "{mail:?}"
    );
    assert!(
        mail.commands
            .contains(&"RCPT TO:<ops@example.org>".to_owned()),
        "{mail:?}"
    );
    assert!(
        mail.data
            .contains("Subject: saltpeter: backup failed on 1 of 2 machines"),
        "{}",
        mail.data
    );
    assert!(mail.data.contains("To: ops@example.org"), "{}", mail.data);
    assert!(
        mail.data
            .contains(&format!("Message-ID: <{}@saltpeter.invalid>", n.key)),
        "{}",
        mail.data
    );
    assert!(
        mail.data.contains("db2: 253 (heartbeat_lost)"),
        "{}",
        mail.data
    );
}

#[test]
fn starttls_required_means_no_mail_to_a_relay_that_cannot_do_it() {
    let (addr, server) = smtp_server();
    let sender = NetSender::new(
        Duration::from_secs(5),
        Some(smtp_settings(addr, SmtpTls::StartTls)),
    )
    .unwrap();
    let n = notifications_for(&alert(), &mail_rule()).remove(0);
    let e = sender.send(&n).unwrap_err();
    let mail = server.join().unwrap();
    assert!(mail.data.is_empty(), "nothing sent in clear: {mail:?}");
    assert!(
        !mail.commands.iter().any(|c| c.starts_with("MAIL")),
        "{mail:?}"
    );
    assert!(e.message.contains("email"), "{e}");
    let no_smtp = NetSender::new(Duration::from_secs(5), None).unwrap();
    assert!(no_smtp.send(&n).unwrap_err().permanent);
}
