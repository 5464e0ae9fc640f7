//! Several masters on one PostgreSQL: the task that keeps this master's membership and leases
//! (docs/HA.md) and tells the engine what changed.
//!
//! Every renewal period the task runs one pass of the coordinator: heartbeat, the live
//! masters, the jobs this master should hold, leases taken, renewed and released. Before the
//! engine hears of a gained job, the job's fence is in place, so the store's first write for
//! it already carries the new epoch; a lost job's fence stays as it was, so a write that was
//! still queued for it is refused by the database rather than written plainly. Between passes
//! the task also watches the leases run out on this process's own clock: a master cut off
//! from the database stops acting before any other master can take its jobs.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::RwLock;
use time::OffsetDateTime;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use saltpeter_config::Config;
use saltpeter_engine::{ClaimResult, ClusterParts, ClusterView, EngineHandle, Event, MasterRef};
use saltpeter_store_postgres::coordinator::{Coordinator, Settings};
use saltpeter_store_postgres::{Advertised, Database, Epoch, Fence, FenceHook, PostgresUrl};

/// Connections the coordination may open: the pass and a slot claim at the same time.
const CONNECTIONS: usize = 2;

/// The fences of the jobs this master holds or held, shared by the store thread (its writes),
/// the slot claims and the coordination task.
#[derive(Clone, Debug, Default)]
struct Fences {
    master_id: String,
    by_job: Arc<RwLock<HashMap<String, Fence>>>,
}

impl Fences {
    /// The fence a write for `job` carries. A job this master never held gets one no lease
    /// matches (epochs start at 1), so in a cluster no write is ever made unfenced.
    fn of(&self, job: &str) -> Fence {
        self.by_job
            .read()
            .get(job)
            .cloned()
            .unwrap_or_else(|| Fence {
                job: job.to_owned(),
                master: self.master_id.clone(),
                epoch: Epoch(0),
            })
    }

    fn set(&self, fence: Fence) {
        self.by_job.write().insert(fence.job.clone(), fence);
    }
}

/// Slot claims in the shared database, under this master's fence of the job.
#[derive(Debug)]
struct PgClaims {
    db: Database,
    fences: Fences,
}

impl saltpeter_engine::SlotClaims for PgClaims {
    fn claim(
        &self,
        job: &str,
        slot: OffsetDateTime,
    ) -> Pin<Box<dyn Future<Output = ClaimResult> + Send + 'static>> {
        let db = self.db.clone();
        let fence = self.fences.of(job);
        Box::pin(async move { db.claim_slot(&fence, slot).await.map_err(|e| e.to_string()) })
    }
}

/// What the master needs to join a cluster, made before the engine exists.
pub(crate) struct Joining {
    /// For the engine.
    pub(crate) parts: ClusterParts,
    /// For the PostgreSQL backend.
    pub(crate) hook: FenceHook,
    coordinator: Coordinator,
    fences: Fences,
}

/// This master's id: unique per process start, readable in logs and the dashboard.
fn new_master_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "master".into());
    format!(
        "{host}-{}-{:04x}",
        std::process::id(),
        rand::random::<u16>()
    )
}

/// Registers this master in the database's `masters` table.
pub(crate) async fn join(url: &PostgresUrl, advertised: Advertised) -> Result<Joining, String> {
    let db = Database::connect(url, CONNECTIONS)
        .await
        .map_err(|e| e.to_string())?;
    // The `masters` table may not exist yet on a fresh database; migrating is idempotent and
    // serialised by an advisory lock, so every master may try.
    saltpeter_store_postgres::schema::migrate(&db)
        .await
        .map_err(|e| e.to_string())?;
    let master_id = new_master_id();
    let coordinator = Coordinator::start(db.clone(), Settings::new(master_id.clone(), advertised))
        .await
        .map_err(|e| e.to_string())?;
    let fences = Fences {
        master_id: master_id.clone(),
        by_job: Arc::default(),
    };
    let hook_fences = fences.clone();
    let hook: FenceHook = Arc::new(move |job: &str| Some(hook_fences.of(job)));
    tracing::info!(master = %master_id, "Joined the cluster; jobs are spread over the live masters.");
    Ok(Joining {
        parts: ClusterParts {
            master_id,
            claims: Arc::new(PgClaims {
                db,
                fences: fences.clone(),
            }),
        },
        hook,
        coordinator,
        fences,
    })
}

impl Joining {
    /// Runs the coordination until `shutdown`, then releases this master's leases so the
    /// others take its jobs at once rather than after the TTL.
    /// Runs the first pass and waits (within `limit`) until the engine has loaded the jobs it
    /// gained, so that a master reports itself ready only once it acts for its share.
    pub(crate) async fn first_pass(
        &mut self,
        engine: &EngineHandle,
        config: &watch::Receiver<Arc<Config>>,
        limit: Duration,
    ) {
        let view = self.one_pass(config).await;
        let mut wanted = view.gained.clone();
        if !engine.send(Event::Cluster(view)).await {
            return;
        }
        wanted.sort();
        let loaded = async {
            loop {
                let held = engine
                    .ask(saltpeter_engine::ApiRequest::Cluster)
                    .await
                    .flatten()
                    .map(|status| status.held)
                    .unwrap_or_default();
                if wanted.iter().all(|job| held.binary_search(job).is_ok()) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        if tokio::time::timeout(limit, loaded).await.is_err() {
            tracing::warn!(
                "The jobs of the first coordination pass are still loading; starting anyway."
            );
        }
    }

    async fn one_pass(&mut self, config: &watch::Receiver<Arc<Config>>) -> ClusterView {
        let jobs: Vec<String> = config.borrow().jobs.keys().cloned().collect();
        self.coordinator.set_jobs(jobs);
        match pass(&mut self.coordinator, &self.fences).await {
            Ok(view) => view,
            Err(error) => {
                tracing::warn!(%error, "The coordination pass failed; leases run out on their own.");
                ClusterView {
                    lost: self.coordinator.expire(),
                    ..view_of(&self.coordinator)
                }
            }
        }
    }

    pub(crate) async fn run(
        mut self,
        engine: EngineHandle,
        config: watch::Receiver<Arc<Config>>,
        shutdown: CancellationToken,
    ) {
        let every = self.coordinator.settings().renew_every;
        // The first pass was made at start (`first_pass`): the next is one period later.
        let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                _ = ticker.tick() => {}
            }
            let view = self.one_pass(&config).await;
            if !engine.send(Event::Cluster(view)).await {
                break;
            }
        }
        let coordinator = self.coordinator;
        // Bounded: every database call has its own deadline.
        match tokio::time::timeout(Duration::from_secs(10), coordinator.shutdown()).await {
            Ok(Ok(())) => tracing::info!("Left the cluster; leases released."),
            Ok(Err(error)) => {
                tracing::warn!(%error, "Could not release the leases; they run out on their own.");
            }
            Err(_) => tracing::warn!("Releasing the leases timed out; they run out on their own."),
        }
    }
}

/// One pass: fences first, so the engine never acts for a gained job before its writes carry
/// the new epoch.
async fn pass(
    coordinator: &mut Coordinator,
    fences: &Fences,
) -> Result<ClusterView, saltpeter_store_postgres::Error> {
    let changes = coordinator.tick().await?;
    let mut lost = changes.lost;
    lost.extend(coordinator.expire());
    let margin = coordinator.settings().stop_margin;
    let mut act_until = std::collections::BTreeMap::new();
    for lease in coordinator.held() {
        fences.set(lease.fence());
        // The same deadline the coordinator's own `expire` keeps, on the engine's clock.
        let at = lease
            .valid_until
            .checked_sub(margin)
            .unwrap_or_else(std::time::Instant::now);
        act_until.insert(lease.job.clone(), tokio::time::Instant::from_std(at));
    }
    let gained = changes.gained.into_iter().map(|l| l.job).collect();
    Ok(ClusterView {
        gained,
        lost,
        act_until,
        ..view_of(coordinator)
    })
}

/// The masters and holders as the coordinator last saw them.
fn view_of(coordinator: &Coordinator) -> ClusterView {
    let masters: Vec<MasterRef> = coordinator
        .masters()
        .iter()
        .map(|m| MasterRef {
            id: m.id.clone(),
            machines_url: m.machines_url.clone(),
            api_url: m.api_url.clone(),
        })
        .collect();
    let fingerprints = coordinator
        .masters()
        .iter()
        .filter_map(|m| m.tls_fingerprint.clone())
        .collect();
    ClusterView {
        masters,
        fingerprints,
        holders: coordinator.holders().clone(),
        ..ClusterView::default()
    }
}
