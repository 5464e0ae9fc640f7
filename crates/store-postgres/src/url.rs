//! The database URL from `store:` in `saltpeter_config`, validated before anything connects.
//!
//! Accepted: `postgres://` or `postgresql://` URLs as libpq reads them, with the query
//! parameters `sslmode` (`disable`, `require` or `verify-full`; `require` when absent, since
//! masters usually reach their database over a network) and `sslrootcert` (a PEM file of CAs
//! for `verify-full`; the system's roots without it). Every other parameter
//! (`connect_timeout`, `application_name`, `options`, ...) is left to tokio-postgres.
//!
//! The password never leaves this type in text: `Debug` and [`PostgresUrl::redacted`] print
//! `***` in its place, so a URL can be logged.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use percent_encoding::percent_decode_str;

/// Why a `store:` URL was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UrlError {
    #[error("the store URL must start with postgres:// or postgresql://")]
    Scheme,
    #[error("the store URL names no host")]
    NoHost,
    #[error("sslmode {0:?} is not understood: use disable, require or verify-full")]
    SslMode(String),
    #[error("the store URL is malformed: {0}")]
    Malformed(String),
}

/// How the connection to the database is protected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    /// Plain TCP (loopback, or a network the operator trusts).
    Disable,
    /// TLS without checking who answers, as libpq's `require`: it stops eavesdroppers, not an
    /// attacker who can redirect the connection.
    Require,
    /// TLS with the server's certificate checked against the roots and its name against the
    /// host.
    VerifyFull,
}

/// A validated PostgreSQL URL.
#[derive(Clone)]
pub struct PostgresUrl {
    config: tokio_postgres::Config,
    ssl_mode: SslMode,
    root_cert: Option<PathBuf>,
    /// The URL as given, password removed, for logs.
    redacted: String,
}

impl PostgresUrl {
    /// Parses and validates `text`.
    pub fn parse(text: &str) -> Result<Self, UrlError> {
        let text = text.trim();
        let rest = text
            .strip_prefix("postgres://")
            .or_else(|| text.strip_prefix("postgresql://"))
            .ok_or(UrlError::Scheme)?;
        let (base, query) = match rest.split_once('?') {
            Some((base, query)) => (base, Some(query)),
            None => (rest, None),
        };
        let mut ssl_mode = SslMode::Require;
        let mut root_cert = None;
        let mut passed = Vec::new();
        for pair in query.into_iter().flat_map(|q| q.split('&')) {
            if pair.is_empty() {
                continue;
            }
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let decoded = percent_decode_str(value)
                .decode_utf8()
                .map_err(|_| UrlError::Malformed(format!("parameter {key} is not UTF-8")))?;
            match key {
                "sslmode" => {
                    ssl_mode = match decoded.as_ref() {
                        "disable" => SslMode::Disable,
                        "require" => SslMode::Require,
                        "verify-full" => SslMode::VerifyFull,
                        other => return Err(UrlError::SslMode(other.chars().take(40).collect())),
                    }
                }
                "sslrootcert" => root_cert = Some(PathBuf::from(decoded.as_ref())),
                _ => passed.push(pair),
            }
        }
        let authority = base.split('/').next().unwrap_or("");
        let host_part = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
        if host_part.is_empty() || host_part.starts_with(':') {
            return Err(UrlError::NoHost);
        }
        let mut rebuilt = format!("postgresql://{base}");
        if !passed.is_empty() {
            rebuilt.push('?');
            rebuilt.push_str(&passed.join("&"));
        }
        let mut config = tokio_postgres::Config::from_str(&rebuilt)
            // tokio-postgres's messages name the part that failed, never the password.
            .map_err(|e| UrlError::Malformed(e.to_string()))?;
        if config.get_hosts().is_empty() {
            return Err(UrlError::NoHost);
        }
        config.ssl_mode(match ssl_mode {
            SslMode::Disable => tokio_postgres::config::SslMode::Disable,
            SslMode::Require | SslMode::VerifyFull => tokio_postgres::config::SslMode::Require,
        });
        let redacted = redact(text);
        Ok(Self {
            config,
            ssl_mode,
            root_cert,
            redacted,
        })
    }

    /// The connection settings for tokio-postgres.
    pub fn config(&self) -> &tokio_postgres::Config {
        &self.config
    }

    /// How the connection is protected.
    pub fn ssl_mode(&self) -> SslMode {
        self.ssl_mode
    }

    /// The CA file for `verify-full`, if one was named.
    pub fn root_cert(&self) -> Option<&PathBuf> {
        self.root_cert.as_ref()
    }

    /// The URL with its password replaced by `***`, for logs and error messages.
    pub fn redacted(&self) -> &str {
        &self.redacted
    }
}

impl FromStr for PostgresUrl {
    type Err = UrlError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl fmt::Debug for PostgresUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("PostgresUrl").field(&self.redacted).finish()
    }
}

impl fmt::Display for PostgresUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted)
    }
}

/// `text` with the password of its user information replaced by `***`. The user information
/// ends at the last `@` before the path, since a password may itself hold an encoded `@`
/// but never a raw `/`.
fn redact(text: &str) -> String {
    let Some((scheme, rest)) = text.split_once("://") else {
        return "***".to_owned();
    };
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _password)) => format!("{scheme}://{user}:***@{host}{tail}"),
            None => format!("{scheme}://{userinfo}@{host}{tail}"),
        },
        None => text.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_postgres_urls_and_hides_the_password() {
        let url = PostgresUrl::parse("postgres://sp:s3cret@db.example:5433/saltpeter").unwrap();
        assert_eq!(url.ssl_mode(), SslMode::Require);
        assert_eq!(url.config().get_dbname(), Some("saltpeter"));
        assert_eq!(url.config().get_ports(), &[5433]);
        assert_eq!(url.config().get_password(), Some(&b"s3cret"[..]));
        for shown in [
            format!("{url:?}"),
            url.to_string(),
            url.redacted().to_owned(),
        ] {
            assert!(!shown.contains("s3cret"), "{shown}");
            assert!(shown.contains("sp:***@db.example:5433"), "{shown}");
        }
    }

    #[test]
    fn understands_sslmode_and_passes_other_parameters_on() {
        let url = PostgresUrl::parse(
            "postgresql://sp@127.0.0.1:5432/db?sslmode=disable&application_name=sp-master",
        )
        .unwrap();
        assert_eq!(url.ssl_mode(), SslMode::Disable);
        assert_eq!(url.config().get_application_name(), Some("sp-master"));
        let url = PostgresUrl::parse(
            "postgres://sp@db/db?sslmode=verify-full&sslrootcert=%2Fetc%2Fca.pem",
        )
        .unwrap();
        assert_eq!(url.ssl_mode(), SslMode::VerifyFull);
        assert_eq!(url.root_cert(), Some(&PathBuf::from("/etc/ca.pem")));
    }

    #[test]
    fn refuses_what_is_not_a_postgres_url() {
        assert_eq!(
            PostgresUrl::parse("sqlite:///x.db").unwrap_err(),
            UrlError::Scheme
        );
        assert_eq!(
            PostgresUrl::parse("/var/lib/x.db").unwrap_err(),
            UrlError::Scheme
        );
        assert_eq!(
            PostgresUrl::parse("postgres:///db").unwrap_err(),
            UrlError::NoHost
        );
        assert_eq!(
            PostgresUrl::parse("postgres://u:p@/db").unwrap_err(),
            UrlError::NoHost
        );
        assert!(matches!(
            PostgresUrl::parse("postgres://h/db?sslmode=prefer"),
            Err(UrlError::SslMode(_))
        ));
        assert!(matches!(
            PostgresUrl::parse("postgres://h:notaport/db"),
            Err(UrlError::Malformed(_))
        ));
    }

    #[test]
    fn a_malformed_url_does_not_echo_the_password() {
        let err = PostgresUrl::parse("postgres://u:hunter2@h:x/db").unwrap_err();
        assert!(!err.to_string().contains("hunter2"), "{err}");
    }
}
