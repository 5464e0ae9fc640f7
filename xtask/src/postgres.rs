//! A real PostgreSQL on loopback for tests and developers: `cargo xtask postgres` starts one
//! and prints its URL; `cargo xtask ci` starts one for the test run and passes the URL in
//! [`URL_ENV`].
//!
//! Debian's `postgresql` package is installed with apt-get when no `initdb` is found (CI runs
//! as root on a fresh machine). The cluster lives in a new temporary directory owned by an
//! unprivileged system user, `sp-postgres` (created when missing), because `initdb` and
//! `postgres` refuse to run as root; run by an ordinary user, both run as that user. The
//! server listens on 127.0.0.1 on a free port and on a Unix socket in the cluster directory,
//! through which the superuser (trusted locally) creates the test role and database. TCP
//! connections need the role's password (SCRAM), and may use TLS with a certificate for
//! 127.0.0.1 from a throwaway CA, whose file is passed in [`CA_ENV`].
//!
//! The server is ended by its PID when the [`Postgres`] value is dropped, and its directory
//! removed. It runs in its own process group, so a Ctrl-C at the terminal reaches only this
//! tool, which then shuts the server down in order.

use std::fs;
use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::{Pid, User, chown};

/// The environment variable through which tests receive the database URL.
pub const URL_ENV: &str = "SALTPETER_TEST_POSTGRES";
/// The environment variable naming the CA file that signed the server's certificate.
pub const CA_ENV: &str = "SALTPETER_TEST_POSTGRES_CA";

/// The unprivileged user the server runs as when this tool runs as root.
const SYSTEM_USER: &str = "sp-postgres";
/// The role and database the tests use.
const ROLE: &str = "saltpeter";
const DATABASE: &str = "saltpeter";
/// How long the server may take to accept connections after it is started.
const READY_WITHIN: Duration = Duration::from_secs(60);
/// How long a fast shutdown may take before the server is killed.
const STOP_WITHIN: Duration = Duration::from_secs(15);

/// A running PostgreSQL server, stopped on drop.
#[derive(Debug)]
pub struct Postgres {
    child: Child,
    dir: PathBuf,
    /// The server's binaries (`psql` among them) and its TCP port.
    bin: PathBuf,
    port: u16,
    /// `postgres://saltpeter:PASSWORD@127.0.0.1:PORT/saltpeter?sslmode=disable`.
    pub url: String,
    /// The CA of the server's certificate, for tests of `sslmode=verify-full`.
    pub ca: PathBuf,
}

impl Postgres {
    /// Installs PostgreSQL if needed, then creates, starts and prepares a throwaway cluster.
    pub fn start() -> Result<Self> {
        let started = Instant::now();
        let bin = bin_dir()?;
        let installed = started.elapsed();
        let owner = run_as()?;
        let dir = temp_dir()?;
        let data = dir.join("data");
        if let Some((uid, gid)) = owner {
            chown(&dir, Some(uid), Some(gid))
                .with_context(|| format!("cannot give {} to {SYSTEM_USER}", dir.display()))?;
        }
        let mut guard = DirGuard(Some(dir.clone()));

        let t = Instant::now();
        let mut initdb = Command::new(bin.join("initdb"));
        initdb
            .args(["-D"])
            .arg(&data)
            .args([
                "-U",
                "postgres",
                "-E",
                "UTF8",
                "--locale=C",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "--no-sync",
            ])
            .stdout(Stdio::null());
        as_owner(&mut initdb, owner);
        let out = initdb.output().context("cannot run initdb")?;
        if !out.status.success() {
            bail!(
                "initdb failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let initdb_took = t.elapsed();

        write_pki(&dir, owner)?;
        let t = Instant::now();
        let (child, port) = spawn_server(&bin, &dir, &data, owner)?;
        let mut server = Self {
            child,
            dir: dir.clone(),
            bin: bin.clone(),
            port,
            url: String::new(),
            ca: dir.join("ca.pem"),
        };
        // From here on the server's own drop removes the directory.
        guard.0 = None;
        server.wait_ready()?;
        let ready_took = t.elapsed();

        let password = random_hex(16)?;
        server.psql(&format!("CREATE ROLE {ROLE} LOGIN PASSWORD '{password}'"))?;
        // A statement of its own: CREATE DATABASE refuses to run inside a transaction block.
        server.psql(&format!("CREATE DATABASE {DATABASE} OWNER {ROLE}"))?;
        server.url =
            format!("postgres://{ROLE}:{password}@127.0.0.1:{port}/{DATABASE}?sslmode=disable");
        eprintln!(
            "==> PostgreSQL on 127.0.0.1:{port} (install check {:.1?}, initdb {:.1?}, start {:.1?}, total {:.1?})",
            installed,
            initdb_took,
            ready_took,
            started.elapsed()
        );
        Ok(server)
    }

    /// Waits, bounded, until the server answers a query over its Unix socket.
    fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + READY_WITHIN;
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "PostgreSQL exited at start ({status}); its log:\n{}",
                    fs::read_to_string(self.dir.join("postgres.log")).unwrap_or_default()
                );
            }
            let listening = TcpStream::connect(("127.0.0.1", self.port)).is_ok();
            if listening && self.psql("SELECT 1").is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("PostgreSQL did not accept connections within {READY_WITHIN:?}");
            }
            sleep(Duration::from_millis(50));
        }
    }

    /// Runs SQL as the superuser over the Unix socket.
    fn psql(&self, sql: &str) -> Result<()> {
        self.query(sql).map(drop)
    }

    /// Runs SQL as the superuser over the Unix socket and returns what it printed, unaligned
    /// and without headers: one line per row, columns separated by a space. For figures about
    /// the server (the statistics views), which the test role may not read in full.
    pub fn query(&self, sql: &str) -> Result<String> {
        let out = Command::new(self.bin.join("psql"))
            .arg("-h")
            .arg(&self.dir)
            .args([
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                "-d",
                "postgres",
            ])
            .args(["-v", "ON_ERROR_STOP=1", "-q", "-At", "-F", " ", "-c", sql])
            .stdin(Stdio::null())
            .output()
            .context("cannot run psql")?;
        if !out.status.success() {
            bail!("psql failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    /// The postmaster's process id: every other server process is its child.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The name of the database [`Postgres::url`] points at.
    pub fn database(&self) -> &'static str {
        DATABASE
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        // SIGINT is PostgreSQL's fast shutdown: it disconnects clients and stops at once.
        // SIGTERM (smart shutdown) would wait for every client, which a stray test
        // connection could make last forever.
        if let Ok(raw) = i32::try_from(self.child.id()) {
            let _ = kill(Pid::from_raw(raw), Signal::SIGINT);
        }
        let deadline = Instant::now() + STOP_WITHIN;
        let mut exited = false;
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                exited = true;
                break;
            }
            sleep(Duration::from_millis(50));
        }
        if !exited {
            eprintln!("PostgreSQL did not stop within {STOP_WITHIN:?}; killing it");
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Removes the cluster directory if the start fails before a [`Postgres`] owns it.
struct DirGuard(Option<PathBuf>);

impl Drop for DirGuard {
    fn drop(&mut self) {
        if let Some(dir) = self.0.take() {
            let _ = fs::remove_dir_all(dir);
        }
    }
}

/// Starts `postgres` on a free loopback port; a port taken between the probe and the
/// server's bind is retried with another.
fn spawn_server(
    bin: &Path,
    dir: &Path,
    data: &Path,
    owner: Option<(nix::unistd::Uid, nix::unistd::Gid)>,
) -> Result<(Child, u16)> {
    for _attempt in 0..3 {
        let port = TcpListener::bind(("127.0.0.1", 0))?.local_addr()?.port();
        let log = fs::File::create(dir.join("postgres.log"))?;
        let mut cmd = Command::new(bin.join("postgres"));
        cmd.arg("-D")
            .arg(data)
            .arg("-k")
            .arg(dir)
            .args(["-h", "127.0.0.1", "-p", &port.to_string()])
            // A throwaway cluster: durability buys nothing and costs the tests time.
            .args(["-c", "fsync=off", "-c", "synchronous_commit=off"])
            .args(["-c", "full_page_writes=off", "-c", "max_connections=200"])
            .args(["-c", "ssl=on", "-c"])
            .arg(format!(
                "ssl_cert_file={}",
                dir.join("server.pem").display()
            ))
            .arg("-c")
            .arg(format!(
                "ssl_key_file={}",
                dir.join("server-key.pem").display()
            ))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0);
        as_owner(&mut cmd, owner);
        let mut child = cmd.spawn().context("cannot start postgres")?;
        // A port lost to a race shows as an exit within moments; anything else is waited for
        // by the caller.
        let settle = Instant::now() + Duration::from_millis(300);
        let mut exited = None;
        while Instant::now() < settle {
            if let Some(status) = child.try_wait()? {
                exited = Some(status);
                break;
            }
            if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                break;
            }
            sleep(Duration::from_millis(20));
        }
        match exited {
            None => return Ok((child, port)),
            Some(status) => {
                let log = fs::read_to_string(dir.join("postgres.log")).unwrap_or_default();
                if !log.contains("could not bind") {
                    bail!("PostgreSQL exited at start ({status}); its log:\n{log}");
                }
            }
        }
    }
    bail!("PostgreSQL could not bind a free port in 3 attempts")
}

/// Writes a throwaway CA (`ca.pem`) and a certificate for 127.0.0.1 and localhost signed by
/// it (`server.pem`, `server-key.pem`). PostgreSQL refuses a key that others can read, so the
/// key is the server user's, mode 0600.
fn write_pki(dir: &Path, owner: Option<(nix::unistd::Uid, nix::unistd::Gid)>) -> Result<()> {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "saltpeter test PostgreSQL CA");
    let ca = ca_params.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate()?;
    let cert = CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])?
        .signed_by(&key, &issuer)?;
    fs::write(dir.join("ca.pem"), ca.pem())?;
    fs::write(dir.join("server.pem"), cert.pem())?;
    let key_path = dir.join("server-key.pem");
    fs::write(&key_path, key.serialize_pem())?;
    fs::set_permissions(&key_path, fs::Permissions::from_mode(0o600))?;
    if let Some((uid, gid)) = owner {
        chown(&key_path, Some(uid), Some(gid))?;
    }
    Ok(())
}

fn as_owner(cmd: &mut Command, owner: Option<(nix::unistd::Uid, nix::unistd::Gid)>) {
    if let Some((uid, gid)) = owner {
        cmd.uid(uid.as_raw()).gid(gid.as_raw());
    }
}

/// The user and group to run PostgreSQL as: `sp-postgres` (created if missing) when this
/// tool runs as root, else the current user (`None`).
fn run_as() -> Result<Option<(nix::unistd::Uid, nix::unistd::Gid)>> {
    if !nix::unistd::geteuid().is_root() {
        return Ok(None);
    }
    if User::from_name(SYSTEM_USER)?.is_none() {
        let status = Command::new("useradd")
            .args([
                "--system",
                "--no-create-home",
                "--home-dir",
                "/nonexistent",
                "--shell",
                "/usr/sbin/nologin",
                SYSTEM_USER,
            ])
            .status()
            .context("cannot run useradd")?;
        if !status.success() {
            bail!("useradd {SYSTEM_USER} failed ({status})");
        }
    }
    let user = User::from_name(SYSTEM_USER)?
        .with_context(|| format!("user {SYSTEM_USER} is missing after useradd"))?;
    Ok(Some((user.uid, user.gid)))
}

/// The directory of PostgreSQL's server binaries, installing Debian's package if there is
/// none.
fn bin_dir() -> Result<PathBuf> {
    if let Some(dir) = find_bin_dir() {
        return Ok(dir);
    }
    if !nix::unistd::geteuid().is_root() {
        bail!("PostgreSQL's initdb was not found; install the postgresql package");
    }
    eprintln!("==> apt-get install postgresql");
    let t = Instant::now();
    let apt = |args: &[&str]| -> Result<()> {
        let status = Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(Stdio::null())
            .status()
            .context("cannot run apt-get")?;
        if !status.success() {
            bail!("apt-get {} failed ({status})", args.join(" "));
        }
        Ok(())
    };
    // A fresh machine may have no package lists yet; a failed install is retried after an
    // update rather than updating every time.
    if apt(&[
        "install",
        "-y",
        "-q",
        "--no-install-recommends",
        "postgresql",
    ])
    .is_err()
    {
        apt(&["update", "-q"])?;
        apt(&[
            "install",
            "-y",
            "-q",
            "--no-install-recommends",
            "postgresql",
        ])?;
    }
    eprintln!("==> installed PostgreSQL in {:.1?}", t.elapsed());
    find_bin_dir().context("PostgreSQL was installed but no initdb was found")
}

/// `/usr/lib/postgresql/<newest version>/bin` if it holds `initdb`, else the directory of an
/// `initdb` found on the PATH.
fn find_bin_dir() -> Option<PathBuf> {
    let mut versions: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return Some(bin);
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|p| p.join("initdb"))
        .find(|p| p.exists())
        .and_then(|p| fs::canonicalize(p).ok())
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .filter(|dir| dir.join("postgres").exists())
}

/// A new private directory under the system's temporary directory.
fn temp_dir() -> Result<PathBuf> {
    let base = std::env::temp_dir();
    for _ in 0..10 {
        let dir = base.join(format!(
            "saltpeter-pg-{}-{}",
            std::process::id(),
            random_hex(4)?
        ));
        match fs::create_dir(&dir) {
            Ok(()) => {
                fs::set_permissions(&dir, fs::Permissions::from_mode(0o700))?;
                return Ok(dir);
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e).with_context(|| format!("cannot create {}", dir.display())),
        }
    }
    bail!("no free temporary directory name under {}", base.display())
}

fn random_hex(bytes: usize) -> Result<String> {
    let mut buf = vec![0u8; bytes];
    fs::File::open("/dev/urandom")?.read_exact(&mut buf)?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

/// `cargo xtask postgres`: starts a server, prints its URL on stdout, and stops it when
/// standard input closes or on Ctrl-C.
pub fn run(_args: &[String]) -> Result<()> {
    let server = Postgres::start()?;
    println!("{}", server.url);
    eprintln!("export {URL_ENV}='{}'", server.url);
    eprintln!("export {CA_ENV}='{}'", server.ca.display());
    eprintln!("PostgreSQL runs until Ctrl-C or end of input (Ctrl-D).");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (closed_tx, closed_rx) = tokio::sync::oneshot::channel::<()>();
    // Standard input is read on a thread of its own: the runtime here has no stdin support,
    // and a blocked read must not hold up the Ctrl-C branch.
    std::thread::spawn(move || {
        let mut sink = [0u8; 1024];
        let mut stdin = std::io::stdin();
        while matches!(stdin.read(&mut sink), Ok(n) if n > 0) {}
        let _ = closed_tx.send(());
    });
    runtime.block_on(async {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => eprintln!("Ctrl-C: stopping PostgreSQL."),
            _ = closed_rx => eprintln!("Input closed: stopping PostgreSQL."),
        }
    });
    drop(server);
    Ok(())
}
