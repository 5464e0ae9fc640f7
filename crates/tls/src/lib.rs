//! TLS trust shared by the master, the wrapper and the tools: the SHA-256 fingerprint of a
//! certificate, the verifier that pins one (or any of a few, one per master of a cluster), and
//! the client configurations built from what a client was told to trust (fingerprints, a CA
//! file, or the system's roots).
//!
//! Everything here uses rustls with the ring provider, passed explicitly rather than installed
//! process-wide, so no part of a process depends on which one called first. This crate does no
//! network I/O; it reads PEM files only when asked to build a configuration from one. It also
//! decodes a single PEM block ([`pem_decode`]) for the Salt keys both binaries read.

/// The rustls this crate builds on, so users name its types without depending on it twice.
pub use rustls;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use base64::Engine as _;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};

/// The environment variable that carries the master's certificate fingerprint to wrappers.
pub const FINGERPRINT_ENV: &str = "SP_TLS_FINGERPRINT";
/// The environment variable that names a CA file on the minion for wrappers to verify with.
pub const CA_ENV: &str = "SP_TLS_CA";

/// Why a TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("bad certificate fingerprint {0:?}: expected 64 hexadecimal digits (SHA-256)")]
    Fingerprint(String),
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Pem { path: PathBuf, reason: String },
    #[error("no usable root certificate: {0}")]
    NoRoots(String),
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

/// The crypto provider every configuration here uses.
// ring is deprecated in rustls for lacking post-quantum key exchange; it is kept for the cold
// build on two cores, and a master and its wrappers agree on the classical groups.
#[allow(deprecated)]
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A certificate's SHA-256 fingerprint.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    /// The fingerprint of a DER-encoded certificate.
    pub fn of(der: &[u8]) -> Self {
        let digest = ring_digest(der);
        Self(digest)
    }

    /// Parses 64 hexadecimal digits; colons between byte pairs (as `openssl x509 -fingerprint`
    /// prints them) and either case are accepted.
    pub fn parse(text: &str) -> Result<Self, TlsError> {
        let bad = || TlsError::Fingerprint(text.chars().take(120).collect());
        let digits: Vec<u8> = text
            .trim()
            .bytes()
            .filter(|b| *b != b':')
            .map(|b| (b as char).to_digit(16).and_then(|d| u8::try_from(d).ok()))
            .collect::<Option<_>>()
            .ok_or_else(bad)?;
        if digits.len() != 64 {
            return Err(bad());
        }
        let mut out = [0u8; 32];
        for (byte, pair) in out.iter_mut().zip(digits.chunks_exact(2)) {
            *byte = (pair[0] << 4) | pair[1];
        }
        Ok(Self(out))
    }
}

impl std::fmt::Display for Fingerprint {
    /// Lowercase hexadecimal without separators, the form passed to wrappers.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

fn ring_digest(data: &[u8]) -> [u8; 32] {
    let digest = ring::digest::digest(&ring::digest::SHA256, data);
    // SHA-256 always has 32 bytes; the fallback only keeps this total.
    <[u8; 32]>::try_from(digest.as_ref()).unwrap_or([0; 32])
}

/// What a client trusts when it connects to a `wss://` or `https://` URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Trust {
    /// Exactly the certificate with this fingerprint (the master's self-signed one); its name
    /// and dates are not checked, its handshake signature is.
    Pinned(Fingerprint),
    /// Any certificate with one of these fingerprints, checked as [`Trust::Pinned`] checks
    /// one: several masters sharing a database may each have a self-signed certificate of
    /// their own, and a wrapper that fails over from one to another must accept each of them.
    /// An empty list accepts nothing.
    PinnedAny(Vec<Fingerprint>),
    /// Certificates issued by the CAs in this PEM file.
    CaFile(PathBuf),
    /// The system's root certificates.
    SystemRoots,
}

/// A client configuration for `trust`.
pub fn client_config(trust: &Trust) -> Result<ClientConfig, TlsError> {
    let builder =
        ClientConfig::builder_with_provider(provider()).with_safe_default_protocol_versions()?;
    let config = match trust {
        Trust::Pinned(fingerprint) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PinnedVerifier::new(*fingerprint)))
            .with_no_client_auth(),
        Trust::PinnedAny(fingerprints) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PinnedVerifier::any_of(
                fingerprints.clone(),
            )))
            .with_no_client_auth(),
        Trust::CaFile(path) => builder
            .with_root_certificates(roots_from_file(path)?)
            .with_no_client_auth(),
        Trust::SystemRoots => builder
            .with_root_certificates(system_roots()?)
            .with_no_client_auth(),
    };
    Ok(config)
}

/// The certificates of a PEM file (a CA bundle, or a server's chain).
pub fn certs_from_file(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            path: path.to_owned(),
            reason: "no certificate in the file".to_owned(),
        });
    }
    Ok(certs)
}

/// A root store of the CA certificates in a PEM file.
pub fn roots_from_file(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in certs_from_file(path)? {
        roots.add(cert).map_err(|e| TlsError::Pem {
            path: path.to_owned(),
            reason: format!("not a usable CA certificate: {e}"),
        })?;
    }
    Ok(roots)
}

/// The system's root certificates (as OpenSSL would find them: `SSL_CERT_FILE`,
/// `SSL_CERT_DIR`, or the distribution's bundle).
pub fn system_roots() -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    let (added, _ignored) = roots.add_parsable_certificates(system_root_certs()?);
    if added == 0 {
        return Err(TlsError::NoRoots(
            "none of the system's certificates parses".to_owned(),
        ));
    }
    Ok(roots)
}

/// The system's root certificates as they are stored (DER), for clients that build their own
/// root store.
pub fn system_root_certs() -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let found = rustls_native_certs::load_native_certs();
    if found.certs.is_empty() {
        let why = found
            .errors
            .first()
            .map_or_else(|| "the system has none".to_owned(), ToString::to_string);
        return Err(TlsError::NoRoots(why));
    }
    Ok(found.certs)
}

/// Accepts exactly the certificates it was given, by their SHA-256 fingerprints (usually one),
/// and checks the handshake's signatures as any verifier does, so a peer must hold that
/// certificate's key and not just a copy of the certificate.
///
/// The certificate's names and validity dates are not checked: the fingerprint already says
/// which certificate the master has, whatever host name a wrapper was given for it, and the
/// self-signed certificate is meant to stay in use for as long as its key does.
#[derive(Debug)]
pub struct PinnedVerifier {
    fingerprints: Vec<Fingerprint>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl PinnedVerifier {
    /// Accepts the one certificate with `fingerprint`.
    pub fn new(fingerprint: Fingerprint) -> Self {
        Self::any_of(vec![fingerprint])
    }

    /// Accepts a certificate with any of `fingerprints`; none if the list is empty.
    pub fn any_of(fingerprints: Vec<Fingerprint>) -> Self {
        Self {
            fingerprints,
            algorithms: provider().signature_verification_algorithms,
        }
    }
}

impl ServerCertVerifier for PinnedVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let seen = Fingerprint::of(end_entity.as_ref());
        // A fingerprint is public; comparing it in constant time protects nothing.
        if self.fingerprints.contains(&seen) {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// The label and contents of the first PEM block in `text`: the master reads minions' Salt
/// public keys with it and the wrapper its minion's private key, neither of which rustls's PEM
/// reader covers (PKCS#1 public keys) or needs a dependency for.
pub fn pem_decode(text: &str) -> Result<(String, Vec<u8>), String> {
    let mut lines = text.lines().map(str::trim);
    let label = lines
        .by_ref()
        .find_map(|l| l.strip_prefix("-----BEGIN ")?.strip_suffix("-----"))
        .ok_or("no PEM block")?
        .to_owned();
    let end = format!("-----END {label}-----");
    let mut body = String::new();
    for line in lines.by_ref() {
        if line == end {
            return base64::engine::general_purpose::STANDARD
                .decode(body.as_bytes())
                .map(|der| (label, der))
                .map_err(|e| format!("bad base64 in the PEM block: {e}"));
        }
        if line.contains(':') {
            return Err("an encrypted PEM block (headers are not supported)".into());
        }
        body.push_str(line);
    }
    Err(format!("no line {end:?}"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn fingerprints_round_trip_in_both_spellings() {
        let f = Fingerprint::of(b"certificate");
        let text = f.to_string();
        assert_eq!(text.len(), 64);
        assert_eq!(Fingerprint::parse(&text).unwrap(), f);
        let colons: Vec<String> = f.0.iter().map(|b| format!("{b:02X}")).collect();
        assert_eq!(Fingerprint::parse(&colons.join(":")).unwrap(), f);
        assert!(Fingerprint::parse("abc").is_err());
        assert!(Fingerprint::parse(&"g".repeat(64)).is_err());
        assert!(Fingerprint::parse("ä").is_err());
    }

    #[test]
    fn the_fingerprint_is_the_sha256_of_the_bytes() {
        // SHA-256 of the empty string.
        assert_eq!(
            Fingerprint::of(b"").to_string(),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    /// A self-signed certificate for `localhost` and its key, as the master makes them.
    fn self_signed() -> (
        CertificateDer<'static>,
        rustls::pki_types::PrivateKeyDer<'static>,
    ) {
        let (cert, key, _) = self_signed_pem();
        (cert, key)
    }

    fn self_signed_pem() -> (
        CertificateDer<'static>,
        rustls::pki_types::PrivateKeyDer<'static>,
        String,
    ) {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let der = rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap();
        (cert.der().clone(), der, cert.pem())
    }

    /// Runs one TLS handshake between a server presenting `cert` and a client trusting
    /// `trust`; the client connects to `name`.
    async fn handshake(
        cert: CertificateDer<'static>,
        key: rustls::pki_types::PrivateKeyDer<'static>,
        trust: &Trust,
        name: &str,
    ) -> Result<(), String> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let server = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert], key)
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let serving = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            if let Ok(mut tls) = acceptor.accept(tcp).await {
                let _ = tls.write_all(b"hi").await;
                let _ = tls.shutdown().await;
            }
        });
        let connector = tokio_rustls::TlsConnector::from(Arc::new(client_config(trust).unwrap()));
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let name = ServerName::try_from(name.to_owned()).unwrap();
        let result = match connector.connect(name, tcp).await {
            Ok(mut tls) => {
                let mut got = Vec::new();
                tls.read_to_end(&mut got).await.map_err(|e| e.to_string())?;
                assert_eq!(got, b"hi");
                Ok(())
            }
            Err(e) => Err(e.to_string()),
        };
        serving.await.unwrap();
        result
    }

    #[tokio::test]
    async fn the_pinned_certificate_is_accepted_whatever_name_was_dialled() {
        let (cert, key) = self_signed();
        let pin = Trust::Pinned(Fingerprint::of(cert.as_ref()));
        handshake(cert, key, &pin, "some-other-name").await.unwrap();
    }

    #[tokio::test]
    async fn a_certificate_with_another_fingerprint_is_refused() {
        let (cert, key) = self_signed();
        let (other, _) = self_signed();
        let pin = Trust::Pinned(Fingerprint::of(other.as_ref()));
        let error = handshake(cert, key, &pin, "localhost").await.unwrap_err();
        assert!(error.contains("invalid peer certificate"), "{error}");
    }

    #[tokio::test]
    async fn a_certificate_matching_any_pin_of_a_list_is_accepted_and_none_other() {
        let (cert, key) = self_signed();
        let (other, _) = self_signed();
        let (third, _) = self_signed();
        let mine = Fingerprint::of(cert.as_ref());
        let theirs = Fingerprint::of(other.as_ref());
        let pins = Trust::PinnedAny(vec![theirs, mine]);
        handshake(cert.clone(), key.clone_key(), &pins, "localhost")
            .await
            .unwrap();
        let pins = Trust::PinnedAny(vec![theirs, Fingerprint::of(third.as_ref())]);
        let error = handshake(cert.clone(), key.clone_key(), &pins, "localhost")
            .await
            .unwrap_err();
        assert!(error.contains("invalid peer certificate"), "{error}");
        let error = handshake(cert, key, &Trust::PinnedAny(Vec::new()), "localhost")
            .await
            .unwrap_err();
        assert!(error.contains("invalid peer certificate"), "{error}");
    }

    #[tokio::test]
    async fn a_self_signed_certificate_serves_as_its_own_ca_file() {
        let (cert, key, pem) = self_signed_pem();
        let dir = std::env::temp_dir().join(format!("sp-tls-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("ca.pem");
        std::fs::write(&path, pem).unwrap();
        let result = handshake(cert, key, &Trust::CaFile(path.clone()), "localhost").await;
        let _ = std::fs::remove_dir_all(&dir);
        result.unwrap();
    }
}
