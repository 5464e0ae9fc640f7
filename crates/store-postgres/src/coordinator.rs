//! One master's side of the coordination, as a pass to run every few seconds: heartbeat,
//! read the live masters, compute the jobs this master should hold, release the others, take
//! or renew its own, and forget every lease it can no longer act on.
//!
//! The coordinator owns no task and no timer: the master calls [`Coordinator::tick`] on its
//! renewal period and reads [`Coordinator::held`] (or [`Coordinator::fence`], the token its
//! writes for a job carry) before acting for a job. A tick that fails (the database is
//! unreachable) changes nothing, but leases still run out by the master's own monotonic clock:
//! [`Coordinator::expire`] drops them, so a partitioned master goes quiet before another can
//! take over, with or without a successful tick.
//!
//! Each successful pass also keeps what the master tells wrappers and API clients about the
//! others: the live masters with what each advertises ([`Coordinator::masters`]) and who holds
//! every job ([`Coordinator::holders`], read in one query per pass). Both are as of the last
//! successful pass, so they can be a few seconds old; the lease, not this view, decides who
//! acts.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use crate::assign::jobs_for;
use crate::lease::{
    Advertised, DEFAULT_LEASE_TTL, DEFAULT_MASTER_TTL, DEFAULT_RENEW_EVERY, DEFAULT_STOP_MARGIN,
    Fence, Lease, MasterInfo,
};
use crate::{Database, Result};

/// The timings of the coordination. The defaults take a dead master's jobs over within the
/// lease TTL plus one renewal period (13 s).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    /// This master's id, unique per process start.
    pub master_id: String,
    /// Where wrappers, other masters and API clients reach this master.
    pub advertised: Advertised,
    pub lease_ttl: Duration,
    /// How often the master should call [`Coordinator::tick`].
    pub renew_every: Duration,
    pub stop_margin: Duration,
    pub master_ttl: Duration,
}

impl Settings {
    /// The default timings for `master_id`, reached where `advertised` says.
    pub fn new(master_id: impl Into<String>, advertised: Advertised) -> Self {
        Self {
            master_id: master_id.into(),
            advertised,
            lease_ttl: DEFAULT_LEASE_TTL,
            renew_every: DEFAULT_RENEW_EVERY,
            stop_margin: DEFAULT_STOP_MARGIN,
            master_ttl: DEFAULT_MASTER_TTL,
        }
    }
}

/// What a pass changed for this master.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Changes {
    /// Leases newly acquired: the master loads these jobs' state (their unfinished runs) from
    /// the database before acting, as after a takeover.
    pub gained: Vec<Lease>,
    /// Jobs this master must stop acting for at once: released, taken by another master, or
    /// past their acting deadline.
    pub lost: Vec<String>,
}

/// One master's membership and leases.
#[derive(Debug)]
pub struct Coordinator {
    db: Database,
    settings: Settings,
    jobs: Vec<String>,
    /// Whether `jobs` is recorded in this master's row (written once per change, not every
    /// pass).
    jobs_said: bool,
    held: BTreeMap<String, Lease>,
    /// The live masters as of the last successful pass, by id.
    masters: Vec<MasterInfo>,
    /// Job to the id of the master holding its lease, as of the last successful pass.
    holders: BTreeMap<String, String>,
}

impl Coordinator {
    /// Registers this master and returns its coordinator, holding nothing yet.
    pub async fn start(db: Database, settings: Settings) -> Result<Self> {
        db.register_master(&settings.master_id, &settings.advertised)
            .await?;
        Ok(Self {
            db,
            settings,
            jobs: Vec::new(),
            jobs_said: false,
            held: BTreeMap::new(),
            masters: Vec::new(),
            holders: BTreeMap::new(),
        })
    }

    /// The jobs of the configuration, after a load or a reload. Jobs that are gone are
    /// released at the next pass.
    pub fn set_jobs(&mut self, jobs: impl IntoIterator<Item = String>) {
        let mut jobs: Vec<String> = jobs.into_iter().collect();
        jobs.sort();
        jobs.dedup();
        if jobs != self.jobs {
            self.jobs = jobs;
            self.jobs_said = false;
        }
    }

    /// The settings this coordinator runs with.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// The leases this master may act on now.
    pub fn held(&self) -> impl Iterator<Item = &Lease> {
        let margin = self.settings.stop_margin;
        self.held.values().filter(move |l| l.may_act(margin))
    }

    /// The lease on `job` if this master may act on it now.
    pub fn lease(&self, job: &str) -> Option<&Lease> {
        self.held
            .get(job)
            .filter(|l| l.may_act(self.settings.stop_margin))
    }

    /// The fence this master's writes for `job` carry, if it holds the job's lease and may
    /// still act on it; `None` otherwise.
    pub fn fence(&self, job: &str) -> Option<Fence> {
        self.lease(job).map(Lease::fence)
    }

    /// The live masters (this one included), by id, with what each advertises, as of the last
    /// successful pass; empty before the first.
    pub fn masters(&self) -> &[MasterInfo] {
        &self.masters
    }

    /// Who holds each job (job to master id), for every job with an unexpired lease, as of the
    /// last successful pass; empty before the first. A job absent here has no holder: it is
    /// between masters, or no master has it in its configuration.
    pub fn holders(&self) -> &BTreeMap<String, String> {
        &self.holders
    }

    /// Drops the leases past their acting deadline by this master's clock.
    pub fn expire(&mut self) -> Vec<String> {
        let margin = self.settings.stop_margin;
        let gone: Vec<String> = self
            .held
            .iter()
            .filter(|(_, l)| !l.may_act(margin))
            .map(|(job, _)| job.clone())
            .collect();
        for job in &gone {
            self.held.remove(job);
        }
        gone
    }

    /// One pass. On an error the held leases stay until their deadlines, which
    /// [`Coordinator::expire`] (called by every pass) enforces.
    pub async fn tick(&mut self) -> Result<Changes> {
        let mut changes = Changes {
            lost: self.expire(),
            ..Changes::default()
        };
        let s = &self.settings;
        if !self.db.heartbeat(&s.master_id).await? {
            // Another master found this one dead and removed it: join again.
            self.db.register_master(&s.master_id, &s.advertised).await?;
            self.jobs_said = false;
        }
        if !self.jobs_said {
            self.db.set_master_jobs(&s.master_id, &self.jobs).await?;
            self.jobs_said = true;
        }
        let masters = self.db.live_masters(s.master_ttl).await?;
        let known: Vec<Option<HashSet<&str>>> = masters
            .iter()
            .map(|m| {
                m.jobs
                    .as_ref()
                    .map(|jobs| jobs.iter().map(String::as_str).collect())
            })
            .collect();
        let live: Vec<(&str, Option<&HashSet<&str>>)> = masters
            .iter()
            .zip(&known)
            .map(|(m, k)| (m.id.as_str(), k.as_ref()))
            .collect();
        let mine: HashSet<&str> =
            jobs_for(&s.master_id, self.jobs.iter().map(String::as_str), &live)
                .into_iter()
                .collect();
        let to_release: Vec<String> = self
            .held
            .keys()
            .filter(|job| !mine.contains(job.as_str()))
            .cloned()
            .collect();
        for job in to_release {
            self.held.remove(&job);
            changes.lost.push(job.clone());
            self.db.release(&job, &s.master_id).await?;
        }
        for job in mine {
            let got = self
                .db
                .acquire_or_renew(job, &s.master_id, s.lease_ttl)
                .await?;
            let before = self.held.get(job).map(|l| l.epoch);
            match got {
                Some(lease) if before == Some(lease.epoch) => {
                    self.held.insert(job.to_owned(), lease);
                }
                Some(lease) => {
                    if before.is_some() {
                        // The lease lapsed and was taken again: the old epoch's work is over.
                        changes.lost.push(job.to_owned());
                    }
                    changes.gained.push(lease.clone());
                    self.held.insert(job.to_owned(), lease);
                }
                None => {
                    // Another master still holds it (the one it moves from, until it lets go
                    // or its lease runs out).
                    if self.held.remove(job).is_some() {
                        changes.lost.push(job.to_owned());
                    }
                }
            }
        }
        // Read after this pass's own acquisitions and releases, so this master's part is
        // current; the others' is as of their last pass.
        let holders = self
            .db
            .leases()
            .await?
            .into_iter()
            .map(|l| (l.job, l.owner))
            .collect();
        self.masters = masters;
        self.holders = holders;
        Ok(changes)
    }

    /// Leaves cleanly: releases every lease and removes this master, so the others take its
    /// jobs at their next pass.
    pub async fn shutdown(self) -> Result<()> {
        self.db.deregister_master(&self.settings.master_id).await
    }
}
