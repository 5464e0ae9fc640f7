//! Sending one notification: the [`Sender`] trait the deliverer calls, and [`NetSender`], the
//! real one (HTTP POST with ureq for webhooks and Slack, SMTP with lettre for mail).
//!
//! Every call is bounded: one timeout covers a whole HTTP request or SMTP session, bodies
//! larger than [`MAX_BODY`] are refused, redirects are not followed (a redirect could carry
//! the body to another host), and response bodies are not read. Errors name the channel kind
//! and the receiver's scheme and host, never a URL's path or a secret.

use std::time::Duration;

use lettre::message::Mailbox;
use lettre::message::header::ContentType;
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Tls, TlsParameters};
use lettre::transport::smtp::extension::ClientId;
use lettre::{SmtpTransport, Transport};

use crate::config::{SmtpSettings, SmtpTls, redact_url};
use crate::{Channel, Notification, sign};

/// Largest body sent; the payloads stay far below it, so this only stops a corrupt row.
pub const MAX_BODY: usize = 1024 * 1024;

/// Why a send failed, and whether trying again can help.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct SendError {
    /// The receiver refused for good (a 4xx other than 408 and 429, a 5xx SMTP reply, a
    /// malformed address): retrying would fail the same way.
    pub permanent: bool,
    pub message: String,
}

impl SendError {
    pub fn retry(message: impl Into<String>) -> Self {
        SendError {
            permanent: false,
            message: message.into(),
        }
    }

    pub fn permanent(message: impl Into<String>) -> Self {
        SendError {
            permanent: true,
            message: message.into(),
        }
    }
}

/// Delivers one notification. Implementations block until the receiver answered or the
/// timeout passed; the deliverer calls them from its own thread.
pub trait Sender: Send {
    fn send(&self, n: &Notification) -> Result<(), SendError>;
}

/// The real sender.
pub struct NetSender {
    http: ureq::Agent,
    smtp: Option<(SmtpSettings, SmtpTransport)>,
}

impl std::fmt::Debug for NetSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetSender")
            .field("smtp", &self.smtp.as_ref().map(|(s, _)| s))
            .finish_non_exhaustive()
    }
}

/// The host name given in SMTP's `EHLO`: the configured one, else the kernel's.
fn hello_name(settings: &SmtpSettings) -> ClientId {
    let name = settings.hello_name.clone().or_else(|| {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .map(|s| s.trim().to_owned())
            .filter(|s| {
                !s.is_empty()
                    && s.chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-')
            })
    });
    name.map_or_else(|| ClientId::Domain("localhost".into()), ClientId::Domain)
}

impl NetSender {
    /// A sender whose every request or mail session ends within `timeout`. Without `smtp`,
    /// mail rules fail permanently with a message that says so.
    pub fn new(timeout: Duration, smtp: Option<SmtpSettings>) -> Result<Self, SendError> {
        let http: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .max_redirects(0)
            .timeout_global(Some(timeout))
            .user_agent(concat!("saltpeter/", env!("CARGO_PKG_VERSION")))
            .build()
            .into();
        let smtp = match smtp {
            None => None,
            Some(settings) => {
                let mut builder = SmtpTransport::builder_dangerous(settings.host.clone())
                    .port(settings.port)
                    .timeout(Some(timeout))
                    .hello_name(hello_name(&settings));
                let tls = || {
                    TlsParameters::new(settings.host.clone())
                        .map_err(|e| SendError::permanent(format!("smtp TLS setup: {e}")))
                };
                builder = match settings.tls {
                    SmtpTls::StartTls => builder.tls(Tls::Required(tls()?)),
                    SmtpTls::Tls => builder.tls(Tls::Wrapper(tls()?)),
                    SmtpTls::None => builder.tls(Tls::None),
                };
                if let (Some(user), Some(password)) = (&settings.username, &settings.password) {
                    builder = builder.credentials(Credentials::new(user.clone(), password.clone()));
                }
                let transport = builder.build();
                Some((settings, transport))
            }
        };
        Ok(NetSender { http, smtp })
    }

    fn post(
        &self,
        url: &str,
        n: &Notification,
        signature: Option<String>,
    ) -> Result<(), SendError> {
        let shown = redact_url(url);
        let mut request = self
            .http
            .post(url)
            .header("Content-Type", "application/json")
            .header("X-Saltpeter-Event", n.event.name())
            .header("X-Saltpeter-Delivery", n.key.as_str());
        if let Some(signature) = signature {
            request = request.header(sign::HEADER, signature);
        }
        let response = request.send(&n.body[..]).map_err(|e| {
            // ureq's messages may quote the URL; say only what went wrong, and where.
            let kind = match e {
                ureq::Error::Timeout(_) => "timed out".to_owned(),
                ureq::Error::Io(io) => format!("connection failed ({})", io.kind()),
                ureq::Error::HostNotFound => "host not found".to_owned(),
                ureq::Error::ConnectionFailed => "connection failed".to_owned(),
                ureq::Error::Tls(t) => format!("TLS failed ({t})"),
                ureq::Error::Rustls(t) => format!("TLS failed ({t})"),
                other => format!("request failed ({})", error_name(&other)),
            };
            SendError::retry(format!("{} {shown}: {kind}", n.channel.kind()))
        })?;
        let status = response.status().as_u16();
        match status {
            200..=299 => Ok(()),
            408 | 429 | 500..=599 => Err(SendError::retry(format!(
                "{} {shown}: HTTP {status}",
                n.channel.kind()
            ))),
            _ => Err(SendError::permanent(format!(
                "{} {shown}: HTTP {status}",
                n.channel.kind()
            ))),
        }
    }

    fn mail(&self, to: &str, n: &Notification) -> Result<(), SendError> {
        let Some((settings, transport)) = &self.smtp else {
            return Err(SendError::permanent(
                "email: no smtp: settings under saltpeter_config",
            ));
        };
        let from: Mailbox = settings
            .from
            .parse()
            .map_err(|e| SendError::permanent(format!("email: from address: {e}")))?;
        let to: Mailbox = to
            .parse()
            .map_err(|e| SendError::permanent(format!("email: to address: {e}")))?;
        let message = lettre::Message::builder()
            .from(from)
            .to(to)
            .subject(n.subject.clone())
            // The key as Message-ID lets a mailbox recognise a repeated delivery.
            .message_id(Some(format!("<{}@saltpeter.invalid>", n.key)))
            .header(ContentType::TEXT_PLAIN)
            .body(String::from_utf8_lossy(&n.body).into_owned())
            .map_err(|e| SendError::permanent(format!("email: building the message: {e}")))?;
        transport.send(&message).map(|_| ()).map_err(|e| {
            let message = format!("email via {}:{}: {e}", settings.host, settings.port);
            if e.is_permanent() {
                SendError::permanent(message)
            } else {
                SendError::retry(message)
            }
        })
    }
}

/// The variant name of a ureq error, which carries no URL.
fn error_name(e: &ureq::Error) -> String {
    let text = format!("{e:?}");
    text.split(['(', ' ', '{'])
        .next()
        .unwrap_or("error")
        .to_owned()
}

impl Sender for NetSender {
    fn send(&self, n: &Notification) -> Result<(), SendError> {
        if n.body.len() > MAX_BODY {
            return Err(SendError::permanent(format!(
                "{}: body of {} bytes exceeds {MAX_BODY}",
                n.channel.kind(),
                n.body.len()
            )));
        }
        match &n.channel {
            Channel::Webhook { url, secret } => {
                let signature = secret.as_deref().map(|s| sign::signature(s, &n.body));
                self.post(url, n, signature)
            }
            Channel::Slack { url } => self.post(url, n, None),
            Channel::Email { to } => self.mail(to, n),
        }
    }
}
