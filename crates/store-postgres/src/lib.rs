//! The PostgreSQL store that lets several sp-masters share one database.
//!
//! SQLite under `data_dir` stays the default store of a single master. With
//! `store: "postgres://..."` in `saltpeter_config`, masters share this database, and it is
//! also the only engine of their coordination: there is no consensus protocol among the
//! masters themselves.
//!
//! - [`backend`]: the store's `Backend` (runs, machines, output, jobs, audit, retention,
//!   history queries), which the master selects with `store:` in place of SQLite.
//! - [`url`]: the validated `store:` URL (`sslmode`, a password that never reaches a log).
//! - [`schema`]: migrations, run under an advisory lock so masters starting together do not
//!   race; the tables are those of the SQLite store, translated, plus the coordination tables.
//! - [`lease`]: master membership (`masters`, with the URLs and certificate fingerprint each
//!   master [`Advertised`]) and job leases (`job_leases`) with an epoch, the fencing token that
//!   every write for a job's runs carries.
//! - [`assign`]: which jobs each live master should try to hold (rendezvous hashing).
//! - [`slots`]: one row per fired cron slot, so a slot fires once across all masters.
//! - [`coordinator`]: one master's pass over the above (heartbeat, leases to take, renew and
//!   release), to run on the renewal period; it keeps the live masters and who holds each job
//!   as of its last pass, and the fence of each job it may act on.
//!
//! Expiry is always judged by the database's clock (`now()`), never by a master's wall
//! clock; a master bounds its own acting time with its monotonic clock (see [`lease`]).

#![forbid(unsafe_code)]

pub mod assign;
pub mod backend;
pub mod coordinator;
mod error;
pub mod lease;
pub mod schema;
pub mod slots;
mod tls;
pub mod url;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};

pub use backend::{FenceHook, PgBackend};
pub use error::{Error, Result};
pub use lease::{Advertised, Epoch, Fence, Lease, MasterInfo};
pub use url::{PostgresUrl, SslMode, UrlError};

/// How long one round trip to the database may take before the store gives up on it. A
/// partition shows up as a connection that neither answers nor fails; this bound turns it
/// into [`Error::Timeout`] well within a lease's length.
pub const DEFAULT_OP_TIMEOUT: Duration = Duration::from_secs(5);

/// A pool of connections to the shared database.
#[derive(Clone, Debug)]
pub struct Database {
    pool: Pool,
    url: Arc<PostgresUrl>,
    op_timeout: Duration,
}

impl Database {
    /// Connects with up to `max_connections` connections and checks that one can be opened,
    /// so a wrong URL or password fails at start and not at the first write. Does not
    /// migrate: see [`schema::migrate`].
    pub async fn connect(url: &PostgresUrl, max_connections: usize) -> Result<Self> {
        Self::connect_bounded(url, max_connections, DEFAULT_OP_TIMEOUT).await
    }

    /// [`Database::connect`] with another bound on each operation, including the opening of
    /// a connection (tests shorten it).
    pub async fn connect_bounded(
        url: &PostgresUrl,
        max_connections: usize,
        op_timeout: Duration,
    ) -> Result<Self> {
        let mut config = url.config().clone();
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(op_timeout);
        }
        // A master cut off in the middle of a transaction leaves it open on the server, which
        // does not notice a silent peer for hours, and the lease row that transaction locked
        // `FOR SHARE` would keep every other master from taking the job over. The server ends
        // such a session itself once it has waited this long inside a transaction.
        let idle = format!(
            "-c idle_in_transaction_session_timeout={}",
            op_timeout.as_millis().max(1)
        );
        let options = match config.get_options() {
            Some(given) if !given.is_empty() => format!("{given} {idle}"),
            _ => idle,
        };
        config.options(&options);
        let manager_config = ManagerConfig {
            // A connection that broke is found by its next query; checking each one out
            // with a round trip would double the latency of every lease renewal.
            recycling_method: RecyclingMethod::Fast,
        };
        let manager = match tls::client_config(url)? {
            None => Manager::from_config(config, tokio_postgres::NoTls, manager_config),
            Some(tls) => {
                Manager::from_config(config, tls::MakeRustls(Arc::new(tls)), manager_config)
            }
        };
        let pool = Pool::builder(manager)
            .max_size(max_connections.max(1))
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(op_timeout))
            // tokio-postgres's connect timeout covers the TCP connection only; this bounds the
            // TLS handshake and the authentication too.
            .create_timeout(Some(op_timeout))
            .recycle_timeout(Some(op_timeout))
            .build()?;
        let db = Self {
            pool,
            url: Arc::new(url.clone()),
            op_timeout,
        };
        drop(db.client().await?);
        tracing::debug!(url = %db.url, "Connected to the PostgreSQL store.");
        Ok(db)
    }

    /// The same pool with another bound on each operation (tests shorten it).
    pub fn with_op_timeout(mut self, op_timeout: Duration) -> Self {
        self.op_timeout = op_timeout;
        self
    }

    /// A connection from the pool.
    pub async fn client(&self) -> Result<deadpool_postgres::Object> {
        Ok(self.pool.get().await?)
    }

    /// The URL this pool connects to.
    pub fn url(&self) -> &PostgresUrl {
        &self.url
    }

    /// Runs `op` within the store's bound on one operation.
    pub(crate) async fn timed<T>(&self, op: impl Future<Output = Result<T>>) -> Result<T> {
        tokio::time::timeout(self.op_timeout, op)
            .await
            .unwrap_or(Err(Error::Timeout(self.op_timeout)))
    }
}
