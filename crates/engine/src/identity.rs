//! Machine identity: the credentials that let one wrapper connection speak for one machine of
//! one run, and nothing else.
//!
//! What it owns:
//! - [`Identity`], how a run's machines prove who they are, fixed when the run fires;
//! - the per-machine secret of a run launched by the local launcher ([`machine_token`]): an
//!   HMAC of the run's secret, so the engine keeps one secret per run and still hands each
//!   machine a credential that is worthless for any other machine;
//! - challenges ([`new_nonce`]) and the check of a signature made with a minion's Salt key
//!   against the public key the Salt master accepted for that minion
//!   ([`verify_minion_signature`]): `<salt_pki_dir>/minions/<minion id>`;
//! - comparing secrets in constant time ([`same_secret`]).
//!
//! Salt writes a minion's accepted public key as PEM: `PUBLIC KEY` (SubjectPublicKeyInfo; what
//! Salt 3007 writes, as the end-to-end suite shows) or `RSA PUBLIC KEY` (PKCS#1, which some
//! older builds wrote). Both are read; ring verifies PKCS#1, so the SPKI wrapper is taken off.

use std::path::{Path, PathBuf};

use base64::Engine as _;
use ring::signature::{RSA_PKCS1_2048_8192_SHA256, UnparsedPublicKey};
use subtle::ConstantTimeEq;

/// How the machines of a run prove which machine they are. Chosen from the launcher when the
/// run fires and stored with the run, so a restart or a changed `launcher` setting does not
/// change what an in-flight run's wrappers must present.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Identity {
    /// Runs stored before machine credentials existed: one token for every machine. Only
    /// such runs (still in flight across an upgrade) use it; no new run does.
    RunToken,
    /// Each machine has its own token, derived from the run's secret ([`machine_token`]);
    /// launchers that start each machine's wrapper themselves (local, bench).
    MachineToken,
    /// The run's token (proof of having received this run's Salt job) plus a signature with
    /// the minion's own Salt key over a challenge naming the machine.
    SaltKey,
}

impl Identity {
    /// The spelling stored in the database.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::RunToken => "run_token",
            Self::MachineToken => "machine_token",
            Self::SaltKey => "salt_key",
        }
    }

    /// Reads a stored spelling; anything unknown is the most restrictive mode that a wrapper
    /// of this build can satisfy with what it was given.
    pub fn parse(text: &str) -> Self {
        match text {
            "run_token" => Self::RunToken,
            "salt_key" => Self::SaltKey,
            _ => Self::MachineToken,
        }
    }
}

/// Why a signature was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("{0:?} cannot be a Salt minion id (it would name a path outside the key directory)")]
    BadMinionId(String),
    #[error("cannot read the accepted key of minion {minion:?} at {path}: {source}")]
    NoKey {
        minion: String,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the accepted key of minion {minion:?} at {path} is not an RSA public key: {why}")]
    BadKey {
        minion: String,
        path: PathBuf,
        why: String,
    },
    #[error("the signature is not valid base64")]
    SignatureEncoding,
    #[error("the signature does not verify with the accepted key of minion {minion:?}")]
    BadSignature { minion: String },
    #[error("{0}")]
    Unavailable(String),
}

/// The secret a machine of a [`Identity::MachineToken`] run presents: HMAC-SHA256 of the
/// instance and machine under the run's secret, hex-encoded. The run's secret itself never
/// leaves the master.
pub(crate) fn machine_token(run_secret: &str, instance: &str, machine: &str) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, run_secret.as_bytes());
    let mut ctx = ring::hmac::Context::with_key(&key);
    ctx.update(b"saltpeter machine token v1\n");
    for field in [instance, machine] {
        ctx.update(field.len().to_string().as_bytes());
        ctx.update(b":");
        ctx.update(field.as_bytes());
        ctx.update(b"\n");
    }
    hex(ctx.sign().as_ref())
}

/// A fresh random challenge, hex-encoded (256 bits).
pub(crate) fn new_nonce() -> String {
    use rand::RngCore;
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    hex(&bytes)
}

/// Compares secrets in time independent of their contents (the length may show).
pub(crate) fn same_secret(a: &str, b: &str) -> bool {
    a.as_bytes().ct_eq(b.as_bytes()).into()
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(out, "{b:02x}");
    }
    out
}

/// Where the Salt master keeps the accepted public key of `minion`. Refuses ids that would
/// name anything but a file directly in `minions/`, as Salt itself does.
pub(crate) fn minion_key_path(pki_dir: &Path, minion: &str) -> Result<PathBuf, IdentityError> {
    let bad =
        minion.is_empty() || minion == "." || minion == ".." || minion.contains(['/', '\\', '\0']);
    if bad {
        return Err(IdentityError::BadMinionId(minion.to_owned()));
    }
    Ok(pki_dir.join("minions").join(minion))
}

/// Checks `signature` (base64) over `payload` with the public key the Salt master accepted
/// for `minion`. Reads one small file: call it off the engine's thread.
pub(crate) fn verify_minion_signature(
    pki_dir: &Path,
    minion: &str,
    payload: &[u8],
    signature: &str,
) -> Result<(), IdentityError> {
    let path = minion_key_path(pki_dir, minion)?;
    let text = std::fs::read_to_string(&path).map_err(|source| IdentityError::NoKey {
        minion: minion.to_owned(),
        path: path.clone(),
        source,
    })?;
    let key = rsa_public_key(&text).map_err(|why| IdentityError::BadKey {
        minion: minion.to_owned(),
        path,
        why,
    })?;
    verify_signature(&key, minion, payload, signature)
}

/// Checks `signature` (base64) over `payload` with a PKCS#1 RSA public key.
pub(crate) fn verify_signature(
    pkcs1_public_key: &[u8],
    minion: &str,
    payload: &[u8],
    signature: &str,
) -> Result<(), IdentityError> {
    let signature = base64::engine::general_purpose::STANDARD
        .decode(signature.trim())
        .map_err(|_| IdentityError::SignatureEncoding)?;
    UnparsedPublicKey::new(&RSA_PKCS1_2048_8192_SHA256, pkcs1_public_key)
        .verify(payload, &signature)
        .map_err(|_| IdentityError::BadSignature {
            minion: minion.to_owned(),
        })
}

/// The PKCS#1 `RSAPublicKey` in a PEM text, from either form Salt writes.
pub(crate) fn rsa_public_key(pem_text: &str) -> Result<Vec<u8>, String> {
    let (label, der) = saltpeter_tls::pem_decode(pem_text)?;
    match label.as_str() {
        "RSA PUBLIC KEY" => Ok(der),
        "PUBLIC KEY" => spki_rsa_key(&der),
        other => Err(format!("a PEM block labelled {other:?}")),
    }
}

/// The DER object identifier of rsaEncryption (1.2.840.113549.1.1.1).
const RSA_ENCRYPTION: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01];

/// Takes the PKCS#1 key out of a SubjectPublicKeyInfo:
/// `SEQUENCE { SEQUENCE { OID rsaEncryption, NULL }, BIT STRING { 0, RSAPublicKey } }`.
fn spki_rsa_key(der: &[u8]) -> Result<Vec<u8>, String> {
    let (spki, rest) = der_take(der, 0x30)?;
    if !rest.is_empty() {
        return Err("bytes after the key".into());
    }
    let (algorithm, rest) = der_take(spki, 0x30)?;
    let (oid, _) = der_take(algorithm, 0x06)?;
    if oid != RSA_ENCRYPTION {
        return Err("not an RSA key".into());
    }
    let (bits, _) = der_take(rest, 0x03)?;
    match bits.split_first() {
        Some((0, key)) => Ok(key.to_vec()),
        _ => Err("a bit string with unused bits".into()),
    }
}

/// One DER element with tag `tag` at the start of `input`: its contents and what follows.
fn der_take(input: &[u8], tag: u8) -> Result<(&[u8], &[u8]), String> {
    let [found, first, rest @ ..] = input else {
        return Err("truncated DER".into());
    };
    if *found != tag {
        return Err(format!(
            "DER tag {found:#04x} where {tag:#04x} was expected"
        ));
    }
    let (len, rest) = match *first {
        n if n < 0x80 => (usize::from(n), rest),
        0x81..=0x83 => {
            let count = usize::from(first & 0x7f);
            let (digits, rest) = rest
                .split_at_checked(count)
                .ok_or_else(|| "truncated DER length".to_owned())?;
            let len = digits
                .iter()
                .fold(0usize, |acc, d| (acc << 8) | usize::from(*d));
            (len, rest)
        }
        _ => return Err("unsupported DER length".into()),
    };
    rest.split_at_checked(len)
        .ok_or_else(|| "truncated DER contents".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn machine_tokens_differ_per_machine_and_run() {
        let a = machine_token("secret", "j_1", "a");
        assert_eq!(a.len(), 64);
        assert_eq!(a, machine_token("secret", "j_1", "a"));
        assert_ne!(a, machine_token("secret", "j_1", "b"));
        assert_ne!(a, machine_token("secret", "j_2", "a"));
        assert_ne!(a, machine_token("other", "j_1", "a"));
        // Length prefixes keep ("j_1", "ab") and ("j_1a", "b") apart.
        assert_ne!(
            machine_token("s", "j_1", "ab"),
            machine_token("s", "j_1a", "b")
        );
    }

    #[test]
    fn minion_ids_cannot_leave_the_key_directory() {
        let dir = Path::new("/pki");
        for bad in ["", ".", "..", "../master", "a/b", "a\\b", "a\0b"] {
            assert!(minion_key_path(dir, bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            minion_key_path(dir, "web-01.example.com").unwrap_or_default(),
            Path::new("/pki/minions/web-01.example.com")
        );
    }

    #[test]
    fn malformed_pem_and_der_are_errors_not_panics() {
        for text in [
            "",
            "-----BEGIN PUBLIC KEY-----\n",
            "-----BEGIN PUBLIC KEY-----\n!!!\n-----END PUBLIC KEY-----\n",
            "-----BEGIN PUBLIC KEY-----\nMAA=\n-----END PUBLIC KEY-----\n",
            "-----BEGIN PUBLIC KEY-----\nMIIBIjAN\n-----END PUBLIC KEY-----\n",
            "-----BEGIN CERTIFICATE-----\nMAA=\n-----END CERTIFICATE-----\n",
        ] {
            assert!(rsa_public_key(text).is_err(), "{text:?}");
        }
        for der in [
            &[][..],
            &[0x30],
            &[0x30, 0x84, 0, 0, 0, 1],
            &[0x30, 0x05, 0],
        ] {
            assert!(spki_rsa_key(der).is_err());
        }
    }

    #[test]
    fn secrets_compare_by_content() {
        assert!(same_secret("abc", "abc"));
        assert!(!same_secret("abc", "abd"));
        assert!(!same_secret("abc", "ab"));
    }
}
