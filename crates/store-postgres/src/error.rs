//! The one error type of the crate: what a caller can tell apart (a lost lease, a database
//! too new, a refused URL) is its own variant; the rest carries the driver's error.

use crate::lease::Epoch;
use crate::url::UrlError;

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Url(#[from] UrlError),
    #[error("TLS to the database: {0}")]
    Tls(#[from] saltpeter_tls::TlsError),
    #[error("cannot set up the database connection pool: {0}")]
    Build(#[from] deadpool_postgres::BuildError),
    #[error("no database connection: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error("database error: {}", db_detail(.0))]
    Db(#[from] tokio_postgres::Error),
    /// The database did not answer within the store's bound, as during a network partition.
    #[error("the database did not answer within {0:?}")]
    Timeout(std::time::Duration),
    /// The writer no longer holds the job's lease at this epoch: another master took the job
    /// over (or the lease expired), and nothing was written.
    #[error("master {master} no longer holds the lease on job {job} at epoch {epoch}")]
    LostLease {
        job: String,
        master: String,
        epoch: Epoch,
    },
    #[error("the database was migrated by a newer saltpeter (PostgreSQL schema {0})")]
    TooNew(i64),
    /// A duration that does not fit the database's arithmetic (lease lengths are milliseconds
    /// in a BIGINT).
    #[error("{0} is out of range")]
    OutOfRange(&'static str),
}

impl Error {
    /// Whether this is [`Error::LostLease`], which a caller answers by stopping work on the job
    /// rather than by retrying.
    pub fn is_lost_lease(&self) -> bool {
        matches!(self, Self::LostLease { .. })
    }
}

/// The driver's own text says only "db error" for what the server refused; the server's
/// message (and its SQLSTATE) is what an operator needs.
fn db_detail(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} ({})", db.message(), db.code().code()),
        None => e.to_string(),
    }
}

/// The crate's result.
pub type Result<T, E = Error> = std::result::Result<T, E>;
