//! Several masters sharing one database: which jobs this master acts for, and what changes
//! when it gains or loses one (docs/HA.md).
//!
//! The engine does not take part in the coordination itself. A task of the master's runs the
//! leases and tells the engine, as a [`ClusterView`], which jobs it gained and lost and where
//! the other masters are. The engine then:
//! - acts only for jobs it holds and has loaded: it fires their slots, accepts their
//!   wrappers and answers for their runs; a wrapper of any other job is told `NOT_HOLDER`;
//! - claims every slot in the database before firing it ([`SlotClaims`]), so a slot fires once
//!   across masters, also around a takeover;
//! - on a gained job, loads its unfinished runs from the store as after a restart (fresh
//!   deadlines, the durable sequence of every machine) and records the slots nobody fired
//!   while the job had no holder;
//! - on a lost job, forgets its runs at once without writing anything: the new holder owns
//!   them now, and their wrappers are sent on to it.
//!
//! Without a cluster (`Engine::cluster` is `None`) every job is held, as with one master.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use time::OffsetDateTime;
use tokio::sync::oneshot;

use super::{Engine, Event, Outbound};
use saltpeter_proto::{ErrorReply, MasterMessage};
use saltpeter_store::{Query, Restored, StoreError, StoreOp};

/// How late a slot may still fire when a job changes hands: a master gains a job at its next
/// pass after another released it, up to a renewal period (3 s) later.
const HANDOVER_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// A slot claim's answer: `Ok(true)` when this master won it, `Ok(false)` when another master
/// (or an earlier attempt of this one) already had it, `Err` when the database could not say.
pub type ClaimResult = Result<bool, String>;

/// Claims cron slots in the shared database, fenced by this master's lease of the job.
pub trait SlotClaims: Send + Sync + fmt::Debug {
    fn claim(
        &self,
        job: &str,
        slot: OffsetDateTime,
    ) -> Pin<Box<dyn Future<Output = ClaimResult> + Send + 'static>>;
}

/// Another master as the engine needs to know it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct MasterRef {
    pub id: String,
    /// Where wrappers reach it.
    pub machines_url: String,
    /// Where its API answers (for forwarding an operator's request).
    pub api_url: String,
}

/// What the coordination learnt in one pass.
#[derive(Clone, Debug, Default)]
pub struct ClusterView {
    /// Jobs this master holds from now on; their state is loaded before it acts for them.
    pub gained: Vec<String>,
    /// Jobs this master must stop acting for at once.
    pub lost: Vec<String>,
    /// Every live master, this one included.
    pub masters: Vec<MasterRef>,
    /// The certificate fingerprints wrappers may pin, one per live master that has one.
    pub fingerprints: Vec<String>,
    /// Job -> id of the master holding it, for every job with a live lease.
    pub holders: BTreeMap<String, String>,
    /// For each job this master holds: the instant, on this process's monotonic clock, at
    /// which it must stop acting for the job unless a later pass renews the lease. The engine
    /// keeps these deadlines itself, so a coordination pass that hangs on an unreachable
    /// database cannot keep it acting past its lease.
    pub act_until: BTreeMap<String, tokio::time::Instant>,
}

/// The engine's part of the coordination, injected by the master.
#[derive(Clone, Debug)]
pub struct ClusterParts {
    /// This master's id in the `masters` table.
    pub master_id: String,
    pub claims: Arc<dyn SlotClaims>,
}

/// Why a slot is being claimed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SlotKind {
    /// The scheduler found it due.
    OnTime,
    /// A missed slot fired late (`catch_up: last`).
    CatchUp,
}

/// Whether a held job's state is loaded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Held {
    Loading,
    Ready,
}

/// The cluster state the engine keeps.
#[derive(Debug)]
pub(crate) struct Cluster {
    master_id: String,
    claims: Arc<dyn SlotClaims>,
    held: HashMap<String, Held>,
    /// See [`ClusterView::act_until`].
    act_until: HashMap<String, tokio::time::Instant>,
    masters: Vec<MasterRef>,
    fingerprints: Vec<String>,
    holders: BTreeMap<String, String>,
}

impl Cluster {
    pub(crate) fn new(parts: ClusterParts) -> Self {
        Self {
            master_id: parts.master_id,
            claims: parts.claims,
            held: HashMap::new(),
            act_until: HashMap::new(),
            masters: Vec::new(),
            fingerprints: Vec::new(),
            holders: BTreeMap::new(),
        }
    }

    fn ready(&self, job: &str) -> bool {
        self.held.get(job) == Some(&Held::Ready)
    }

    /// The earliest instant at which a held job's lease runs out by this process's clock.
    pub(crate) fn next_deadline(&self) -> Option<tokio::time::Instant> {
        self.act_until
            .iter()
            .filter(|(job, _)| self.held.contains_key(*job))
            .map(|(_, at)| *at)
            .min()
    }

    /// The master holding `job`, when it is another one.
    pub(crate) fn other_holder(&self, job: &str) -> Option<&MasterRef> {
        let id = self.holders.get(job)?;
        if *id == self.master_id {
            return None;
        }
        self.masters.iter().find(|m| m.id == *id)
    }

    /// The id of the master that holds `job`, if any does.
    pub(crate) fn holder_id(&self, job: &str) -> Option<&str> {
        if self.held.contains_key(job) {
            return Some(&self.master_id);
        }
        self.holders.get(job).map(String::as_str)
    }

    pub(crate) fn master_id(&self) -> &str {
        &self.master_id
    }

    pub(crate) fn masters(&self) -> &[MasterRef] {
        &self.masters
    }

    pub(crate) fn holders(&self) -> &BTreeMap<String, String> {
        &self.holders
    }
}

/// What a cluster adds to a wrapper's environment: every live master's URL (this one's first)
/// and every certificate a wrapper may meet among them.
pub(crate) fn wrapper_env(cluster: &Cluster, own_url: &str) -> Vec<(String, String)> {
    let mut urls = vec![own_url.to_owned()];
    for m in &cluster.masters {
        if m.id != cluster.master_id && !urls.contains(&m.machines_url) {
            urls.push(m.machines_url.clone());
        }
    }
    let mut env = Vec::new();
    if urls.len() > 1 {
        env.push(("SP_WEBSOCKET_URLS".to_owned(), urls.join(" ")));
    }
    if !cluster.fingerprints.is_empty() {
        env.push((
            "SP_TLS_FINGERPRINT".to_owned(),
            cluster.fingerprints.join(","),
        ));
    }
    env
}

impl Engine {
    /// Whether this master acts for `job` now: always with one master; in a cluster, when it
    /// holds the job's lease and has loaded its state.
    pub(crate) fn acts_for(&self, job: &str) -> bool {
        self.cluster.as_ref().is_none_or(|c| c.ready(job))
    }

    /// Takes in one pass of the coordination: losses first, so a job that moved away and
    /// back is loaded afresh.
    pub(super) fn on_cluster(&mut self, view: ClusterView) {
        let Some(cluster) = self.cluster.as_mut() else {
            return;
        };
        cluster.masters = view.masters;
        cluster.fingerprints = view.fingerprints;
        cluster.holders = view.holders;
        cluster.act_until.extend(view.act_until);
        for job in view.lost {
            self.lose_job(&job);
        }
        for job in view.gained {
            self.gain_job(job);
        }
    }

    /// A held lease ran out by this master's own clock before a pass renewed it (the
    /// database is unreachable, or the pass is slow): stop acting for the job now, before
    /// another master can take it.
    pub(super) fn on_lease_deadlines(&mut self) {
        let now = self.clock.instant();
        let Some(cluster) = self.cluster.as_ref() else {
            return;
        };
        let due: Vec<String> = cluster
            .act_until
            .iter()
            .filter(|(job, at)| **at <= now && cluster.held.contains_key(*job))
            .map(|(job, _)| job.clone())
            .collect();
        for job in due {
            tracing::warn!(%job, "The job's lease runs out by this master's clock and was not renewed; stopping.");
            self.lose_job(&job);
        }
    }

    fn lose_job(&mut self, job: &str) {
        let Some(cluster) = self.cluster.as_mut() else {
            return;
        };
        cluster.act_until.remove(job);
        if cluster.held.remove(job).is_none() {
            return;
        }
        let running = self
            .jobs
            .get_mut(job)
            .map(|s| std::mem::take(&mut s.running))
            .unwrap_or_default();
        let mut wrappers = Vec::new();
        for instance in &running {
            if let Some(run) = self.runs.remove(instance) {
                wrappers.extend(run.machines.values().filter_map(|m| m.conn));
            }
        }
        for conn in wrappers {
            // The wrapper goes on to the new holder; its output stays in its outbox until
            // the new holder has stored it.
            let reply = MasterMessage::Error(ErrorReply::not_holder(job));
            self.send(conn, Outbound::Close(reply));
            if let Some(c) = self.conns.get_mut(&conn) {
                c.bound = None;
            }
        }
        self.store.push(StoreOp::ForgetJob(job.to_owned()));
        self.metrics.lease_lost();
        tracing::warn!(%job, runs = running.len(), "Lost the job's lease; another master acts for it now.");
        self.log_note(
            job,
            "This master lost the job's lease; another master acts for it now".into(),
        );
    }

    fn gain_job(&mut self, job: String) {
        let Some(cluster) = self.cluster.as_mut() else {
            return;
        };
        if cluster.held.contains_key(&job) {
            return;
        }
        cluster.held.insert(job.clone(), Held::Loading);
        let (reply, answer) = oneshot::channel();
        self.store.push(StoreOp::Query(Query::Takeover {
            job: job.clone(),
            reply,
        }));
        let tx = self.self_tx.clone();
        self.spawner.spawn(async move {
            let result = answer
                .await
                .unwrap_or_else(|_| Err(StoreError::Backend("the store stopped".into())));
            let _ = tx.send(Event::TakenOver { job, result }).await;
        });
    }

    /// The store answered a takeover: the job's unfinished runs join this master's, and the
    /// slots that came due while nobody held the job are recorded (or caught up).
    pub(super) fn on_taken_over(&mut self, job: &str, result: Result<Restored, StoreError>) {
        let loading = self
            .cluster
            .as_ref()
            .is_some_and(|c| c.held.get(job) == Some(&Held::Loading));
        if !loading {
            // Lost again while loading: the store keeps nothing of it for this master.
            self.store.push(StoreOp::ForgetJob(job.to_owned()));
            return;
        }
        let restored = match result {
            Ok(restored) => restored,
            Err(error) => {
                tracing::error!(%job, %error, "Could not load the job's state; will try again at the next pass.");
                if let Some(c) = self.cluster.as_mut() {
                    c.held.remove(job);
                }
                return;
            }
        };
        let runs = restored.runs.len();
        let floor = restored
            .jobs
            .iter()
            .find(|r| r.name == job)
            .and_then(|r| r.last_fired);
        // A run this master still had in memory (held before, lost, gained again) is
        // replaced by the database's state, which is newer.
        for (record, _) in &restored.runs {
            self.runs.remove(&record.instance);
        }
        if let Some(state) = self.jobs.get_mut(job) {
            state.running.clear();
        }
        self.restore(restored);
        if let Some(c) = self.cluster.as_mut() {
            c.held.insert(job.to_owned(), Held::Ready);
        }
        let now = self.clock.wall();
        let config = self.config.clone();
        self.scheduler
            .restart_job(&config, job, floor.map_or(now, |f| f.max(now)));
        if let Some(floor) = floor.filter(|f| *f < now) {
            self.scan_missed_since(job, floor, now, Some(HANDOVER_GRACE));
        }
        self.metrics.takeover();
        tracing::info!(%job, runs, "Took over the job; acting for it now.");
        self.log_note(
            job,
            format!("This master holds the job now ({runs} run(s) in flight taken over)"),
        );
    }

    /// Claims `slot` of `job` in the database; the run starts when the claim is won.
    pub(super) fn claim_then_fire(&mut self, job: &str, slot: OffsetDateTime, kind: SlotKind) {
        let Some(cluster) = &self.cluster else {
            return;
        };
        let claim = cluster.claims.claim(job, slot);
        let tx = self.self_tx.clone();
        let job = job.to_owned();
        self.spawner.spawn(async move {
            let won = claim.await;
            let _ = tx
                .send(Event::SlotClaimed {
                    job,
                    slot,
                    kind,
                    won,
                })
                .await;
        });
    }

    pub(super) fn on_slot_claimed(
        &mut self,
        job: &str,
        slot: OffsetDateTime,
        kind: SlotKind,
        won: ClaimResult,
    ) {
        match won {
            Ok(true) if self.acts_for(job) => {}
            Ok(true) => {
                tracing::warn!(%job, slot = %saltpeter_store::rfc3339(slot), "Won a slot of a job this master no longer holds; not firing it.");
                return;
            }
            Ok(false) => {
                tracing::info!(%job, slot = %saltpeter_store::rfc3339(slot), "Slot already claimed by another master; not firing it.");
                return;
            }
            Err(error) => {
                tracing::warn!(%job, slot = %saltpeter_store::rfc3339(slot), %error, "Could not claim the slot; not firing it.");
                return;
            }
        }
        match kind {
            SlotKind::OnTime => self.fire_slot(job, slot),
            SlotKind::CatchUp => self.fire_catch_up(job, slot),
        }
    }
}
