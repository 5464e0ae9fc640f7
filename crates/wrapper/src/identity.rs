//! The minion's proof of identity: its own Salt private key, read once at start-up (as root,
//! before anything forks or drops privileges) and used to sign the master's challenge into
//! each `connect`, so the master knows the connection speaks for this minion id and no other.
//!
//! Salt writes the minion's key as `<pki_dir>/minion.pem`, a PEM `RSA PRIVATE KEY` (PKCS#1;
//! Salt 3007 does, as the end-to-end suite shows); a PKCS#8 `PRIVATE KEY` is read too. Encrypted keys are refused: Salt's minion keys have no
//! passphrase.

use std::path::{Path, PathBuf};

use base64::Engine as _;
use ring::rand::SystemRandom;
use ring::signature::{RSA_PKCS1_SHA256, RsaKeyPair};

/// The minion's pki directory when `SP_SALT_PKI_DIR` does not name one (Salt's default).
pub const DEFAULT_PKI_DIR: &str = "/etc/salt/pki/minion";

/// The file name of the minion's private key in its pki directory.
pub const KEY_FILE: &str = "minion.pem";

/// Why the minion key cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read the minion key {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the minion key {path} is not a usable RSA private key: {why}")]
    Parse { path: PathBuf, why: String },
    #[error("signing with the minion key failed")]
    Sign,
}

/// A loaded minion key. Its `Debug` shows only where it came from.
pub struct MinionKey {
    key: RsaKeyPair,
    path: PathBuf,
}

impl std::fmt::Debug for MinionKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MinionKey")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl MinionKey {
    /// Reads `<pki_dir>/minion.pem`.
    pub fn load(pki_dir: &Path) -> Result<Self, KeyError> {
        let path = pki_dir.join(KEY_FILE);
        let text = std::fs::read_to_string(&path).map_err(|source| KeyError::Read {
            path: path.clone(),
            source,
        })?;
        Self::from_pem(&text, path)
    }

    /// Parses a PEM private key; `path` is only for messages.
    pub fn from_pem(text: &str, path: PathBuf) -> Result<Self, KeyError> {
        let parse = |why: String| KeyError::Parse {
            path: path.clone(),
            why,
        };
        let (label, der) = saltpeter_tls::pem_decode(text).map_err(parse)?;
        let key = match label.as_str() {
            "RSA PRIVATE KEY" => RsaKeyPair::from_der(&der),
            "PRIVATE KEY" => RsaKeyPair::from_pkcs8(&der),
            other => return Err(parse(format!("a PEM block labelled {other:?}"))),
        }
        .map_err(|e| parse(e.to_string()))?;
        Ok(Self { key, path })
    }

    /// Signs `payload` (RSA PKCS#1 v1.5 with SHA-256) and returns the signature in base64.
    pub fn sign(&self, payload: &[u8]) -> Result<String, KeyError> {
        let mut signature = vec![0u8; self.key.public().modulus_len()];
        self.key
            .sign(
                &RSA_PKCS1_SHA256,
                &SystemRandom::new(),
                payload,
                &mut signature,
            )
            .map_err(|_| KeyError::Sign)?;
        Ok(base64::engine::general_purpose::STANDARD.encode(signature))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unusable_keys_are_errors_that_name_the_file() {
        let path = PathBuf::from("/pki/minion.pem");
        for text in [
            "",
            "-----BEGIN RSA PRIVATE KEY-----\nMAA=\n-----END RSA PRIVATE KEY-----\n",
            "-----BEGIN RSA PRIVATE KEY-----\nProc-Type: 4,ENCRYPTED\n-----END RSA PRIVATE KEY-----\n",
            "-----BEGIN PUBLIC KEY-----\nMAA=\n-----END PUBLIC KEY-----\n",
        ] {
            let e = MinionKey::from_pem(text, path.clone()).unwrap_err();
            assert!(e.to_string().contains("/pki/minion.pem"), "{e}");
        }
    }

    /// The test-only keys kept beside the master's tests.
    fn test_key(name: &str) -> String {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../master/tests/fixtures/test-keys")
            .join(name);
        std::fs::read_to_string(path).expect("test key")
    }

    #[test]
    fn both_private_key_forms_sign_what_their_public_key_verifies() {
        use ring::signature::{RSA_PKCS1_2048_8192_SHA256, UnparsedPublicKey};
        for name in ["minion-a.pem", "minion-b.pem"] {
            let key = MinionKey::from_pem(&test_key(name), PathBuf::from(name)).expect(name);
            let payload = saltpeter_proto::signing_payload("nonce", "j_1", "minion-a");
            let signature = base64::engine::general_purpose::STANDARD
                .decode(key.sign(&payload).expect("sign"))
                .expect("base64");
            let public = UnparsedPublicKey::new(
                &RSA_PKCS1_2048_8192_SHA256,
                key.key.public().as_ref().to_vec(),
            );
            assert!(public.verify(&payload, &signature).is_ok(), "{name}");
            assert!(public.verify(b"other", &signature).is_err(), "{name}");
            assert!(
                !format!("{key:?}").contains("MII"),
                "Debug shows no key material"
            );
        }
    }

    #[test]
    fn a_missing_key_says_where_it_was_looked_for() {
        let dir = tempfile::tempdir().expect("tempdir");
        let e = MinionKey::load(dir.path()).unwrap_err();
        assert!(e.to_string().contains("minion.pem"), "{e}");
    }
}
