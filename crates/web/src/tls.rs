//! TLS on the master's listeners: which listener speaks it, the certificate it presents, and
//! what wrappers are told to trust.
//!
//! Without an operator's certificate the master makes a self-signed one at first start and
//! keeps it under `<data_dir>/tls/` (`cert.pem`, and `key.pem` readable only by the master's
//! user); its SHA-256 fingerprint goes to every wrapper in `SP_TLS_FINGERPRINT`, and the
//! wrapper accepts exactly that certificate. With an operator's certificate (`tls_cert`,
//! `tls_key`) the files are read again when they change, checked at most every
//! [`RELOAD_CHECK`] during handshakes, and wrappers verify the chain against `tls_ca` (a path
//! on the minions, `SP_TLS_CA`) or the system's roots.
//!
//! This module decides and loads; the accept loop in `listen.rs` runs the handshakes.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use parking_lot::Mutex;
use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use saltpeter_tls::Fingerprint;

use saltpeter_config::{Settings, TlsMode};

/// The least time between two looks at an operator's certificate files.
pub(crate) const RELOAD_CHECK: Duration = Duration::from_secs(3);

/// The directory under `data_dir` that holds the self-signed certificate.
pub const TLS_DIR: &str = "tls";
/// The self-signed certificate's file in [`TLS_DIR`].
pub const CERT_FILE: &str = "cert.pem";
/// Its private key's file in [`TLS_DIR`] (mode 0600).
pub const KEY_FILE: &str = "key.pem";

/// Why TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Pem { path: PathBuf, reason: String },
    #[error("cannot make a self-signed certificate: {0}")]
    Generate(String),
    #[error("the certificate does not fit its key: {0}")]
    Key(String),
    #[error("{0}")]
    Policy(String),
    /// A certificate file that cannot be read or holds no certificate.
    #[error(transparent)]
    Certs(saltpeter_tls::TlsError),
}

/// Whether a listener with `mode` bound to `addr` speaks TLS: `auto` means yes unless bound
/// to a loopback address.
pub(crate) fn is_on(mode: TlsMode, addr: IpAddr) -> bool {
    match mode {
        TlsMode::On => true,
        TlsMode::Off => false,
        TlsMode::Auto => !addr.is_loopback(),
    }
}

/// Refuses a plain listener beyond loopback unless `allow_plaintext` says so.
pub(crate) fn plaintext_problem(
    settings: &Settings,
    key: &str,
    addr: IpAddr,
    tls: bool,
) -> Option<String> {
    (!tls && !addr.is_loopback() && !settings.allow_plaintext).then(|| {
        format!(
            "{key} is off but the listener is bound to {addr}: anything sent to it, run tokens \
             and job output included, would cross the network in clear; turn {key} to auto or \
             on, bind it to 127.0.0.1, or set allow_plaintext: true"
        )
    })
}

/// What each listener of a master speaks, decided once at start.
#[derive(Debug, Default)]
pub struct ListenerTls {
    /// The machines endpoint's TLS configuration; `None`: plain.
    pub machines: Option<Arc<ServerConfig>>,
    /// The API's; `None`: plain.
    pub api: Option<Arc<ServerConfig>>,
    /// Variables every wrapper gets to verify the machines endpoint (empty when it is plain).
    pub wrapper_env: Vec<(String, String)>,
    /// The self-signed certificate's fingerprint, when that is the one in use.
    pub fingerprint: Option<Fingerprint>,
}

impl ListenerTls {
    /// Decides for listeners bound to `machines_ip` and `api_ip`: refuses plain text beyond
    /// loopback unless allowed, warns about what is allowed, and loads (or makes) the
    /// certificate when either listener speaks TLS.
    pub fn decide(
        settings: &Settings,
        machines_ip: IpAddr,
        api_ip: IpAddr,
    ) -> Result<Self, TlsSetupError> {
        let machines_on = is_on(settings.machines_tls, machines_ip);
        let api_on = is_on(settings.api_tls, api_ip);
        for (key, ip, on) in [
            ("machines_tls", machines_ip, machines_on),
            ("api_tls", api_ip, api_on),
        ] {
            if let Some(why) = plaintext_problem(settings, key, ip, on) {
                return Err(TlsSetupError::Policy(why));
            }
            if !on && !ip.is_loopback() {
                tracing::warn!(
                    listener = key,
                    %ip,
                    "allow_plaintext is on: this listener runs without TLS beyond loopback."
                );
            }
        }
        if !(machines_on || api_on) {
            return Ok(Self::default());
        }
        if machines_on && settings.allow_legacy_wrappers {
            tracing::warn!(
                "allow_legacy_wrappers is on: the machines port also accepts plain \
                 (unencrypted) WebSocket connections, which the original wrapper needs; their \
                 run output and messages cross the network in clear."
            );
        }
        let master = prepare(settings)?;
        Ok(Self {
            machines: machines_on.then(|| master.server.clone()),
            api: api_on.then(|| master.server.clone()),
            wrapper_env: if machines_on {
                master.wrapper_env
            } else {
                Vec::new()
            },
            fingerprint: master.fingerprint,
        })
    }
}

/// The TLS of a started master: the server configuration both listeners share and what
/// wrappers must be told.
#[derive(Debug)]
pub struct MasterTls {
    pub server: Arc<ServerConfig>,
    /// The self-signed certificate's fingerprint; `None` with an operator's certificate.
    pub fingerprint: Option<Fingerprint>,
    /// Variables every wrapper gets so it can verify the master (`SP_TLS_FINGERPRINT` or
    /// `SP_TLS_CA`).
    pub wrapper_env: Vec<(String, String)>,
}

/// Sets up the certificate: the operator's when `tls_cert` and `tls_key` are set, else the
/// self-signed one in `data_dir` (made now if missing).
pub fn prepare(settings: &Settings) -> Result<MasterTls, TlsSetupError> {
    let (resolver, fingerprint) = match (&settings.tls_cert, &settings.tls_key) {
        (Some(cert), Some(key)) => (ReloadingCert::new(cert.clone(), key.clone())?, None),
        (None, None) => {
            let (cert, key, fingerprint) = self_signed(&settings.data_dir, &hosts_for(settings))?;
            (ReloadingCert::new(cert, key)?, Some(fingerprint))
        }
        _ => {
            return Err(TlsSetupError::Policy(
                "tls_cert and tls_key go together: set both, or neither for the self-signed \
                 certificate"
                    .to_owned(),
            ));
        }
    };
    let mut server = ServerConfig::builder_with_provider(saltpeter_tls::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsSetupError::Key(e.to_string()))?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(resolver));
    // No session tickets: each run's wrapper is a new process with no session cache, so a
    // ticket would almost never be used, while making and sending two of them after every
    // handshake costs the master work at the worst moment (a fleet connecting at once).
    server.send_tls13_tickets = 0;
    let mut wrapper_env = Vec::new();
    match (&fingerprint, &settings.tls_ca) {
        (Some(f), _) => {
            wrapper_env.push((saltpeter_tls::FINGERPRINT_ENV.to_owned(), f.to_string()))
        }
        (None, Some(ca)) => wrapper_env.push((saltpeter_tls::CA_ENV.to_owned(), ca.clone())),
        (None, None) => {}
    }
    Ok(MasterTls {
        server: Arc::new(server),
        fingerprint,
        wrapper_env,
    })
}

/// The names the self-signed certificate is made for: the host wrappers are given, this
/// host's name, and the loopback names.
fn hosts_for(settings: &Settings) -> Vec<String> {
    let mut hosts = vec![settings.default_saltpeter_server_host.clone()];
    if let Ok(name) = std::fs::read_to_string("/proc/sys/kernel/hostname") {
        hosts.push(name.trim().to_owned());
    }
    hosts.extend(["localhost", "127.0.0.1", "::1"].map(str::to_owned));
    hosts.retain(|h| !h.is_empty());
    let mut seen = std::collections::HashSet::new();
    hosts.retain(|h| seen.insert(h.clone()));
    hosts
}

/// The self-signed certificate under `<data_dir>/tls/`, made for `hosts` if it does not exist
/// yet; returns the paths of the certificate and key and the certificate's fingerprint. An
/// existing one is kept as it is, so wrappers already told its fingerprint keep connecting
/// after a restart.
pub fn self_signed(
    data_dir: &Path,
    hosts: &[String],
) -> Result<(PathBuf, PathBuf, Fingerprint), TlsSetupError> {
    let dir = data_dir.join(TLS_DIR);
    let cert_path = dir.join(CERT_FILE);
    let key_path = dir.join(KEY_FILE);
    if !(cert_path.exists() && key_path.exists()) {
        saltpeter_files::create_dir(&dir).map_err(|source| TlsSetupError::Write {
            path: dir.clone(),
            source,
        })?;
        let key = rcgen::KeyPair::generate().map_err(|e| TlsSetupError::Generate(e.to_string()))?;
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new())
            .map_err(|e| TlsSetupError::Generate(e.to_string()))?;
        params.subject_alt_names = hosts.iter().filter_map(|h| san(h)).collect();
        let mut name = rcgen::DistinguishedName::new();
        name.push(rcgen::DnType::CommonName, "saltpeter master");
        params.distinguished_name = name;
        // The certificate is pinned by fingerprint, not trusted for its dates; a long life
        // keeps the pin valid for as long as the key is kept.
        params.not_before = rcgen::date_time_ymd(2025, 1, 1);
        params.not_after = rcgen::date_time_ymd(2125, 1, 1);
        let cert = params
            .self_signed(&key)
            .map_err(|e| TlsSetupError::Generate(e.to_string()))?;
        // The key first: a certificate without its key is of no use, and the next start
        // would make both again.
        let write = |path: &Path, contents: &str| {
            saltpeter_files::write(path, contents.as_bytes()).map_err(|source| {
                TlsSetupError::Write {
                    path: path.to_owned(),
                    source,
                }
            })
        };
        write(&key_path, &key.serialize_pem())?;
        write(&cert_path, &cert.pem())?;
        tracing::info!(path = %cert_path.display(), "Made a self-signed TLS certificate.");
    }
    let certs = read_certs(&cert_path)?;
    let fingerprint = certs
        .first()
        .map(|c| Fingerprint::of(c.as_ref()))
        .ok_or_else(|| TlsSetupError::Pem {
            path: cert_path.clone(),
            reason: "no certificate in the file".to_owned(),
        })?;
    Ok((cert_path, key_path, fingerprint))
}

fn san(host: &str) -> Option<rcgen::SanType> {
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Some(rcgen::SanType::IpAddress(ip));
    }
    rcgen::string::Ia5String::try_from(host.to_owned())
        .ok()
        .map(rcgen::SanType::DnsName)
}

fn read_file(path: &Path) -> Result<Vec<u8>, TlsSetupError> {
    std::fs::read(path).map_err(|source| TlsSetupError::Read {
        path: path.to_owned(),
        source,
    })
}

/// The certificates of a PEM file, through the reader the clients use too.
fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsSetupError> {
    saltpeter_tls::certs_from_file(path).map_err(TlsSetupError::Certs)
}

/// A certificate chain and its key, read from PEM files and checked to belong together.
fn load(cert: &Path, key: &Path) -> Result<Arc<CertifiedKey>, TlsSetupError> {
    let chain = read_certs(cert)?;
    let key_bytes = read_file(key)?;
    let key_der = PrivateKeyDer::from_pem_slice(&key_bytes).map_err(|e| TlsSetupError::Pem {
        path: key.to_owned(),
        reason: format!("no usable private key: {e}"),
    })?;
    let certified = CertifiedKey::from_der(chain, key_der, &saltpeter_tls::provider())
        .map_err(|e| TlsSetupError::Key(e.to_string()))?;
    Ok(Arc::new(certified))
}

/// What identifies a version of a file cheaply: its modification time and length.
type Stamp = Option<(SystemTime, u64)>;

fn stamp(path: &Path) -> Stamp {
    std::fs::metadata(path)
        .ok()
        .map(|m| (m.modified().unwrap_or(SystemTime::UNIX_EPOCH), m.len()))
}

/// The certificate the listeners present, read again from its files when they change.
#[derive(Debug)]
pub(crate) struct ReloadingCert {
    cert_path: PathBuf,
    key_path: PathBuf,
    state: Mutex<Loaded>,
}

#[derive(Debug)]
struct Loaded {
    key: Arc<CertifiedKey>,
    stamps: (Stamp, Stamp),
    checked: std::time::Instant,
}

impl ReloadingCert {
    /// Loads the pair now; a pair that cannot be loaded at start is an error.
    pub(crate) fn new(cert_path: PathBuf, key_path: PathBuf) -> Result<Self, TlsSetupError> {
        let stamps = (stamp(&cert_path), stamp(&key_path));
        let key = load(&cert_path, &key_path)?;
        Ok(Self {
            cert_path,
            key_path,
            state: Mutex::new(Loaded {
                key,
                stamps,
                checked: std::time::Instant::now(),
            }),
        })
    }

    /// The certificate to present now. At most every [`RELOAD_CHECK`] the files' stamps are
    /// compared with the loaded ones; a changed pair that loads replaces the current one, a
    /// broken one (a half-written file, a key that does not fit) is logged and the current
    /// one stays.
    pub(crate) fn current(&self) -> Arc<CertifiedKey> {
        let mut state = self.state.lock();
        let now = std::time::Instant::now();
        if now.saturating_duration_since(state.checked) < RELOAD_CHECK {
            return state.key.clone();
        }
        state.checked = now;
        let stamps = (stamp(&self.cert_path), stamp(&self.key_path));
        if stamps == state.stamps {
            return state.key.clone();
        }
        match load(&self.cert_path, &self.key_path) {
            Ok(key) => {
                tracing::info!(path = %self.cert_path.display(), "TLS certificate reloaded.");
                state.key = key;
                state.stamps = stamps;
            }
            Err(error) => {
                // Keep the stamps old so the next check tries again.
                tracing::warn!(%error, "The changed TLS certificate cannot be used; keeping the current one.");
            }
        }
        state.key.clone()
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn hosts() -> Vec<String> {
        ["master.example", "localhost", "127.0.0.1", "::1"]
            .map(str::to_owned)
            .to_vec()
    }

    #[test]
    fn the_self_signed_certificate_is_kept_across_restarts_with_a_private_key() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key, first) = self_signed(dir.path(), &hosts()).unwrap();
        let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let dir_mode = std::fs::metadata(dir.path().join(TLS_DIR))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(dir_mode, 0o700);
        let (_, _, again) = self_signed(dir.path(), &hosts()).unwrap();
        assert_eq!(first, again);
        // What wrappers are told is the fingerprint of the certificate file's DER.
        let der = read_certs(&cert).unwrap();
        assert_eq!(Fingerprint::of(der[0].as_ref()), first);
        ReloadingCert::new(cert, key).unwrap();
    }

    #[test]
    fn auto_is_on_beyond_loopback_only() {
        let any: IpAddr = "0.0.0.0".parse().unwrap();
        let lo: IpAddr = "127.0.0.1".parse().unwrap();
        assert!(is_on(TlsMode::Auto, any));
        assert!(!is_on(TlsMode::Auto, lo));
        assert!(!is_on(TlsMode::Auto, "::1".parse().unwrap()));
        assert!(is_on(TlsMode::On, lo));
        assert!(!is_on(TlsMode::Off, any));
        let mut s = Settings::default();
        assert!(plaintext_problem(&s, "machines_tls", any, false).is_some());
        assert!(plaintext_problem(&s, "machines_tls", lo, false).is_none());
        assert!(plaintext_problem(&s, "machines_tls", any, true).is_none());
        s.allow_plaintext = true;
        assert!(plaintext_problem(&s, "machines_tls", any, false).is_none());
    }

    /// Writes a fresh self-signed pair for `name` over `cert` and `key`.
    fn write_pair(cert: &Path, key: &Path, name: &str) -> Fingerprint {
        let pair = rcgen::KeyPair::generate().unwrap();
        let c = rcgen::CertificateParams::new(vec![name.to_owned()])
            .unwrap()
            .self_signed(&pair)
            .unwrap();
        std::fs::write(key, pair.serialize_pem()).unwrap();
        std::fs::write(cert, c.pem()).unwrap();
        Fingerprint::of(c.der().as_ref())
    }

    fn presented(r: &ReloadingCert) -> Fingerprint {
        Fingerprint::of(r.current().cert[0].as_ref())
    }

    #[test]
    fn an_operator_certificate_is_reloaded_when_its_files_change() {
        let dir = tempfile::tempdir().unwrap();
        let cert = dir.path().join("cert.pem");
        let key = dir.path().join("key.pem");
        let first = write_pair(&cert, &key, "one.example");
        let r = ReloadingCert::new(cert.clone(), key.clone()).unwrap();
        assert_eq!(presented(&r), first);
        let second = write_pair(&cert, &key, "second-longer.example");
        // Within the check interval the loaded pair stays.
        assert_eq!(presented(&r), first);
        r.state.lock().checked = std::time::Instant::now().checked_sub(RELOAD_CHECK).unwrap();
        assert_eq!(presented(&r), second);
        // A broken replacement is refused and the good pair stays in use.
        std::fs::write(
            &key,
            "not a key, and longer than before to change the stamp",
        )
        .unwrap();
        r.state.lock().checked = std::time::Instant::now().checked_sub(RELOAD_CHECK).unwrap();
        assert_eq!(presented(&r), second);
    }
}
