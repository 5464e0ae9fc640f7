//! The `store:` setting: where the master keeps its state when not in SQLite under
//! `data_dir`.
//!
//! Config stays a leaf over proto, so the full parser of a PostgreSQL URL (with its driver
//! and TLS settings) lives in `saltpeter-store-postgres`, which the master runs at start and
//! `sp-master check` runs too. Here the value is checked as far as a file can be judged without
//! that crate: the scheme, a host, and an `sslmode` the store understands; and it is held so
//! that no `Debug` or `Display` of the settings prints its password.

use std::fmt;

/// A `store:` URL that passed the checks of this crate. The text is only reachable through
/// [`StoreUrl::expose`], which the store's own parser calls.
#[derive(Clone, PartialEq, Eq)]
pub struct StoreUrl {
    text: String,
}

/// The `sslmode` values the PostgreSQL store understands.
const SSL_MODES: [&str; 3] = ["disable", "require", "verify-full"];

impl StoreUrl {
    /// Checks `text`: `postgres://` or `postgresql://`, a host, and a known `sslmode`.
    pub fn parse(text: &str) -> Result<StoreUrl, String> {
        let text = text.trim();
        let rest = text
            .strip_prefix("postgres://")
            .or_else(|| text.strip_prefix("postgresql://"))
            .ok_or_else(|| {
                "expected a postgres:// or postgresql:// URL (leave store unset for SQLite)"
                    .to_owned()
            })?;
        let (base, query) = rest.split_once('?').unwrap_or((rest, ""));
        let authority = base.split('/').next().unwrap_or("");
        let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
        if host.is_empty() || host.starts_with(':') {
            return Err("the store URL names no host".to_owned());
        }
        for pair in query.split('&') {
            if let Some(mode) = pair.strip_prefix("sslmode=")
                && !SSL_MODES.contains(&mode)
            {
                let shown: String = mode.chars().take(40).collect();
                return Err(format!(
                    "sslmode {shown:?} is not understood: use disable, require or verify-full"
                ));
            }
        }
        Ok(StoreUrl {
            text: text.to_owned(),
        })
    }

    /// The URL with its password, for the store's parser only: never log it.
    pub fn expose(&self) -> &str {
        &self.text
    }

    /// The URL with `***` in place of a password.
    pub fn redacted(&self) -> String {
        let Some((scheme, rest)) = self.text.split_once("://") else {
            return "***".to_owned();
        };
        let end = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, tail) = rest.split_at(end);
        match authority.rsplit_once('@') {
            Some((user_info, host)) => {
                let user = user_info.split_once(':').map_or(user_info, |(u, _)| u);
                let password = if user_info.contains(':') { ":***" } else { "" };
                format!("{scheme}://{user}{password}@{host}{tail}")
            }
            None => self.text.clone(),
        }
    }
}

impl fmt::Debug for StoreUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("StoreUrl").field(&self.redacted()).finish()
    }
}

impl fmt::Display for StoreUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_password_never_shows() {
        let url = StoreUrl::parse("postgres://sp:s3cret@db.example:5432/sp?sslmode=verify-full")
            .expect("valid");
        assert_eq!(
            url.redacted(),
            "postgres://sp:***@db.example:5432/sp?sslmode=verify-full"
        );
        assert!(!format!("{url:?} {url}").contains("s3cret"));
        assert!(url.expose().contains("s3cret"));
        let plain = StoreUrl::parse("postgresql://db/sp").expect("valid");
        assert_eq!(plain.redacted(), "postgresql://db/sp");
    }

    #[test]
    fn other_schemes_hostless_urls_and_unknown_ssl_modes_are_refused() {
        assert!(StoreUrl::parse("sqlite:///var/lib/saltpeter").is_err());
        assert!(StoreUrl::parse("postgres:///sp").is_err());
        assert!(StoreUrl::parse("postgres://u:p@:5432/sp").is_err());
        let e = StoreUrl::parse("postgres://db/sp?sslmode=prefer").expect_err("refused");
        assert!(e.contains("prefer"));
    }
}
