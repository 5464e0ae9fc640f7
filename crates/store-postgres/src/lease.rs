//! Master membership and job leases: which master acts for which job, and the epoch that
//! fences every write it makes for that job.
//!
//! **Membership.** Each master registers a row in `masters` with its id and what it
//! [`Advertised`]: where wrappers reach its machines endpoint, where other masters and API
//! clients reach its HTTP API, and the fingerprint of its certificate when it made that
//! certificate itself (so wrappers sent to it can pin it). It heartbeats the row. A master is
//! live while its heartbeat is younger than a TTL judged by the database's clock. A master id
//! must be unique per process start (host name plus a start nonce, say), so that a restarted
//! master is not mistaken for the one that died.
//!
//! **Leases.** A job is run by the master holding its row in `job_leases`. The row is taken
//! or renewed atomically by [`Database::acquire_or_renew`]: the owner renews it while it is
//! valid; anyone takes it once it has expired. `expires_at` is `now() + ttl` on the database's
//! clock, so the masters' wall clocks never decide anything.
//!
//! **Epochs.** Every acquisition, that is every change of owner and every taking of an expired
//! or released lease, increments the job's epoch; a renewal never does. The row is never
//! deleted, so epochs only grow. A write for a job's runs carries its [`Fence`] (job, owner,
//! epoch) and happens in a transaction that first locks the lease row `FOR SHARE` and checks
//! that the lease is still this one and unexpired ([`begin_fenced`]); otherwise it fails with
//! [`Error::LostLease`] and writes nothing. The share lock makes a concurrent takeover wait
//! for the write to commit, so every write of epoch N is ordered before epoch N+1 begins.
//!
//! **Partitions.** A master cut off from the database cannot renew and, being cut off, cannot
//! learn that it lost the lease either. It must therefore stop acting on its own: a [`Lease`]
//! records, on the master's monotonic clock, when the request that obtained it was sent; the
//! database's expiry is later than that instant plus the TTL, so the master stops at that
//! instant plus the TTL minus a margin ([`Lease::may_act`]) and is quiet before anyone can
//! take over. Its writes would be refused anyway; stopping also stops what the database cannot
//! fence, such as commands sent to wrappers.

use std::fmt;
use std::time::{Duration, Instant};

use time::OffsetDateTime;
use tokio_postgres::{Client, Transaction};

use crate::{Database, Error, Result};

/// How long a lease lasts after each renewal.
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(10);
/// How often a holder renews: three tries within one TTL.
pub const DEFAULT_RENEW_EVERY: Duration = Duration::from_secs(3);
/// How long before its lease's expiry (by its own clock) a master stops acting, for the
/// difference in rate between its clock and the database's and for a write in flight.
pub const DEFAULT_STOP_MARGIN: Duration = Duration::from_secs(2);
/// How long a master counts as live after its last heartbeat.
pub const DEFAULT_MASTER_TTL: Duration = Duration::from_secs(10);

/// A job's fencing token: grows by one at every acquisition of the job's lease.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Epoch(pub i64);

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A held lease, as the master that holds it sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    pub job: String,
    pub master: String,
    pub epoch: Epoch,
    /// When the request that obtained the lease was sent, plus the TTL, on this process's
    /// monotonic clock: the database's expiry is no earlier than this.
    pub valid_until: Instant,
}

impl Lease {
    /// Whether the holder may still act for the job, stopping `margin` before the lease's
    /// expiry.
    pub fn may_act(&self, margin: Duration) -> bool {
        Instant::now()
            .checked_add(margin)
            .is_some_and(|t| t < self.valid_until)
    }

    /// The token that the job's writes carry.
    pub fn fence(&self) -> Fence {
        Fence {
            job: self.job.clone(),
            master: self.master.clone(),
            epoch: self.epoch,
        }
    }
}

/// What a write for a job's runs carries: it is applied only if `master` still holds the
/// job's lease at `epoch`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Fence {
    pub job: String,
    pub master: String,
    pub epoch: Epoch,
}

/// Where a master can be reached, as it registers itself in `masters`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Advertised {
    /// Where wrappers reach this master's machines endpoint (`ws://` or `wss://`).
    pub machines_url: String,
    /// Where other masters and API clients reach this master's HTTP API.
    pub api_url: String,
    /// The SHA-256 fingerprint of this master's certificate when the master generated it
    /// itself, for wrappers to pin; `None` when its certificate is signed by a CA the
    /// wrappers trust, or when it does not speak TLS.
    pub tls_fingerprint: Option<String>,
}

/// A master as the `masters` table knows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MasterInfo {
    pub id: String,
    /// Where wrappers reach this master (the table's `address` column, named before the API's
    /// URL was stored beside it).
    pub machines_url: String,
    /// Where other masters and API clients reach this master's HTTP API; empty for a master
    /// that registered before schema version 4 recorded it.
    pub api_url: String,
    /// The fingerprint wrappers pin to reach this master, if its certificate is its own.
    pub tls_fingerprint: Option<String>,
    /// The jobs of this master's configuration; `None` for a master that has not said (one of
    /// a release before the column existed), taken as knowing every job.
    pub jobs: Option<Vec<String>>,
    pub started_at: OffsetDateTime,
    pub heartbeat_at: OffsetDateTime,
}

/// The lease row of a job, whoever holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseRow {
    pub job: String,
    pub owner: String,
    pub epoch: Epoch,
    pub expires_at: OffsetDateTime,
    /// Whether `expires_at` is still ahead of the database's clock.
    pub valid: bool,
}

/// A duration in whole milliseconds for the database's interval arithmetic.
fn millis(what: &'static str, d: Duration) -> Result<i64> {
    i64::try_from(d.as_millis()).map_err(|_| Error::OutOfRange(what))
}

impl Database {
    /// Adds this master to `masters`, or refreshes its row, with a fresh heartbeat and what it
    /// advertises now.
    pub async fn register_master(&self, id: &str, advertised: &Advertised) -> Result<()> {
        self.timed(async {
            self.client()
                .await?
                .execute(
                    "INSERT INTO masters (id, address, api_url, tls_fingerprint)
                     VALUES ($1, $2, $3, $4)
                     ON CONFLICT (id) DO UPDATE
                     SET address = EXCLUDED.address, api_url = EXCLUDED.api_url,
                         tls_fingerprint = EXCLUDED.tls_fingerprint, heartbeat_at = now()",
                    &[
                        &id,
                        &advertised.machines_url,
                        &advertised.api_url,
                        &advertised.tls_fingerprint,
                    ],
                )
                .await?;
            Ok(())
        })
        .await
    }

    /// Refreshes this master's heartbeat. `false` means the row is gone (another master
    /// removed it as dead): register again.
    pub async fn heartbeat(&self, id: &str) -> Result<bool> {
        self.timed(async {
            let n = self
                .client()
                .await?
                .execute(
                    "UPDATE masters SET heartbeat_at = now() WHERE id = $1",
                    &[&id],
                )
                .await?;
            Ok(n == 1)
        })
        .await
    }

    /// Records the jobs of this master's configuration, which the others read to assign each
    /// job only among the masters that have it.
    pub async fn set_master_jobs(&self, id: &str, jobs: &[String]) -> Result<()> {
        self.timed(async {
            self.client()
                .await?
                .execute("UPDATE masters SET jobs = $2 WHERE id = $1", &[&id, &jobs])
                .await?;
            Ok(())
        })
        .await
    }

    /// Removes this master and lets go of all its leases at once, for a clean shutdown: the
    /// others can take its jobs at their next pass instead of after the leases expire.
    pub async fn deregister_master(&self, id: &str) -> Result<()> {
        self.timed(async {
            let mut client = self.client().await?;
            let tx = client.transaction().await?;
            tx.execute(
                "UPDATE job_leases SET expires_at = now()
                 WHERE owner = $1 AND expires_at > now()",
                &[&id],
            )
            .await?;
            tx.execute("DELETE FROM masters WHERE id = $1", &[&id])
                .await?;
            tx.commit().await?;
            Ok(())
        })
        .await
    }

    /// The masters whose heartbeat is younger than `ttl` on the database's clock, by id.
    pub async fn live_masters(&self, ttl: Duration) -> Result<Vec<MasterInfo>> {
        let ttl = millis("master TTL", ttl)?;
        self.timed(async {
            let rows = self
                .client()
                .await?
                .query(
                    "SELECT id, address, api_url, tls_fingerprint, started_at, heartbeat_at, jobs
                     FROM masters
                     WHERE heartbeat_at > now() - $1::BIGINT * INTERVAL '1 millisecond'
                     ORDER BY id",
                    &[&ttl],
                )
                .await?;
            rows.iter()
                .map(|r| {
                    Ok(MasterInfo {
                        id: r.try_get(0)?,
                        machines_url: r.try_get(1)?,
                        api_url: r.try_get(2)?,
                        tls_fingerprint: r.try_get(3)?,
                        started_at: r.try_get(4)?,
                        heartbeat_at: r.try_get(5)?,
                        jobs: r.try_get(6)?,
                    })
                })
                .collect()
        })
        .await
    }

    /// Takes `job`'s lease for `master`, or renews it if `master` holds it, for `ttl` from the
    /// database's `now()`. `None` when another master holds a valid lease. The epoch grows by
    /// one when the lease is acquired (it was someone else's, or expired, or released) and
    /// stays when it is renewed.
    ///
    /// A holder whose renewal comes back with another epoch than the one it held lost the
    /// lease in between (it expired, and it took it again): its earlier fence is refused, and
    /// it reloads the job's state as after a takeover.
    pub async fn acquire_or_renew(
        &self,
        job: &str,
        master: &str,
        ttl: Duration,
    ) -> Result<Option<Lease>> {
        let ttl_ms = millis("lease TTL", ttl)?;
        let sent = Instant::now();
        let epoch: Option<i64> = self
            .timed(async {
                let row = self
                    .client()
                    .await?
                    .query_opt(
                        "INSERT INTO job_leases (job, owner, epoch, expires_at)
                         VALUES ($1, $2, 1, now() + $3::BIGINT * INTERVAL '1 millisecond')
                         ON CONFLICT (job) DO UPDATE SET
                             epoch = CASE
                                 WHEN job_leases.owner = EXCLUDED.owner
                                      AND job_leases.expires_at > now()
                                 THEN job_leases.epoch
                                 ELSE job_leases.epoch + 1
                             END,
                             acquired_at = CASE
                                 WHEN job_leases.owner = EXCLUDED.owner
                                      AND job_leases.expires_at > now()
                                 THEN job_leases.acquired_at
                                 ELSE now()
                             END,
                             owner = EXCLUDED.owner,
                             expires_at = EXCLUDED.expires_at
                         WHERE job_leases.owner = EXCLUDED.owner
                            OR job_leases.expires_at <= now()
                         RETURNING epoch",
                        &[&job, &master, &ttl_ms],
                    )
                    .await?;
                Ok(row.map(|r| r.try_get(0)).transpose()?)
            })
            .await?;
        Ok(epoch.map(|epoch| Lease {
            job: job.to_owned(),
            master: master.to_owned(),
            epoch: Epoch(epoch),
            // A TTL too long for the monotonic clock counts as already over: the holder then
            // acts on nothing it cannot bound, and renews.
            valid_until: sent.checked_add(ttl).unwrap_or(sent),
        }))
    }

    /// Lets go of `job`'s lease if `master` holds it, so another master may take it at once.
    /// The row stays, with its epoch, so the next holder's epoch is higher.
    pub async fn release(&self, job: &str, master: &str) -> Result<bool> {
        self.timed(async {
            let n = self
                .client()
                .await?
                .execute(
                    "UPDATE job_leases SET expires_at = now()
                     WHERE job = $1 AND owner = $2 AND expires_at > now()",
                    &[&job, &master],
                )
                .await?;
            Ok(n == 1)
        })
        .await
    }

    /// Every lease that has not expired by the database's clock, by job, in one query: who
    /// holds which job, for a coordinator's pass. Released leases are expired, so they are
    /// not among them.
    pub async fn leases(&self) -> Result<Vec<LeaseRow>> {
        self.timed(async {
            let rows = self
                .client()
                .await?
                .query(
                    "SELECT job, owner, epoch, expires_at FROM job_leases
                     WHERE expires_at > now() ORDER BY job",
                    &[],
                )
                .await?;
            rows.iter()
                .map(|r| {
                    Ok(LeaseRow {
                        job: r.try_get(0)?,
                        owner: r.try_get(1)?,
                        epoch: Epoch(r.try_get(2)?),
                        expires_at: r.try_get(3)?,
                        valid: true,
                    })
                })
                .collect()
        })
        .await
    }

    /// The lease row of `job`, if it was ever leased.
    pub async fn lease_of(&self, job: &str) -> Result<Option<LeaseRow>> {
        self.timed(async {
            let row = self
                .client()
                .await?
                .query_opt(
                    "SELECT job, owner, epoch, expires_at, expires_at > now()
                     FROM job_leases WHERE job = $1",
                    &[&job],
                )
                .await?;
            row.map(|r| {
                Ok(LeaseRow {
                    job: r.try_get(0)?,
                    owner: r.try_get(1)?,
                    epoch: Epoch(r.try_get(2)?),
                    expires_at: r.try_get(3)?,
                    valid: r.try_get(4)?,
                })
            })
            .transpose()
        })
        .await
    }
}

/// Opens a transaction for a write under `fence`: the lease row is locked `FOR SHARE` and
/// checked to be held by the fence's master, at its epoch, unexpired by the database's clock.
/// Otherwise nothing is written and the result is [`Error::LostLease`].
///
/// The share lock lasts until the transaction ends, so keep fenced transactions short: a
/// takeover of the job waits for them.
pub async fn begin_fenced<'c>(client: &'c mut Client, fence: &Fence) -> Result<Transaction<'c>> {
    let tx = client.transaction().await?;
    // On an error, dropping the transaction rolls it back.
    check_fence(&tx, fence).await?;
    Ok(tx)
}

/// Locks the fence's lease row `FOR SHARE` inside `tx` and checks that `fence.master` holds
/// it, unexpired, at `fence.epoch`; [`Error::LostLease`] otherwise. The one check every
/// fenced write makes, whether it opens its own transaction or joins a store batch.
pub(crate) async fn check_fence(tx: &Transaction<'_>, fence: &Fence) -> Result<()> {
    let row = tx
        .query_opt(
            "SELECT epoch FROM job_leases
             WHERE job = $1 AND owner = $2 AND expires_at > now()
             FOR SHARE",
            &[&fence.job, &fence.master],
        )
        .await?;
    let held = match row {
        Some(row) => row.try_get::<_, i64>(0)? == fence.epoch.0,
        None => false,
    };
    if held {
        Ok(())
    } else {
        Err(Error::LostLease {
            job: fence.job.clone(),
            master: fence.master.clone(),
            epoch: fence.epoch,
        })
    }
}

impl Database {
    /// Runs `statement` with `params` under `fence` and commits: a single fenced write, for
    /// callers with nothing else to put in the transaction. Returns the rows it changed.
    pub async fn fenced_execute(
        &self,
        fence: &Fence,
        statement: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<u64> {
        self.timed(async {
            let mut client = self.client().await?;
            let tx = begin_fenced(&mut client, fence).await?;
            let n = tx.execute(statement, params).await?;
            tx.commit().await?;
            Ok(n)
        })
        .await
    }
}
