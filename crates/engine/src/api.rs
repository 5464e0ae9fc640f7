//! Requests the API makes of the engine, and the snapshots it answers with. The engine builds
//! each answer on request; nothing is shared between the engine and the API but messages.

use serde::Serialize;
use tokio::sync::oneshot;

use super::{Engine, find_run};
use crate::runs::RunView;
use saltpeter_store::audit::{Action, Actor, AuditRecord};
use saltpeter_store::rfc3339;

/// Why an API request could not be carried out.
#[derive(Clone, Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    /// Another master acts for the job (with several masters): the request belongs there.
    #[error("job {job} is held by master {}", holder.as_ref().map_or("(none at the moment)", |h| h.id.as_str()))]
    Elsewhere {
        job: String,
        holder: Option<crate::MasterRef>,
    },
}

/// A request from the API, with where to send the answer.
#[derive(Debug)]
pub enum ApiRequest {
    ListJobs(oneshot::Sender<Vec<JobSummary>>),
    /// A run started by hand, by `by` (recorded in the audit trail and the job log).
    RunNow {
        job: String,
        by: Actor,
        reply: oneshot::Sender<Result<String, ApiError>>,
    },
    GetRun {
        instance: String,
        reply: oneshot::Sender<Option<RunView>>,
    },
    KillRun {
        instance: String,
        by: Actor,
        reply: oneshot::Sender<Result<(), ApiError>>,
    },
    KillMachine {
        instance: String,
        machine: String,
        by: Actor,
        reply: oneshot::Sender<Result<(), ApiError>>,
    },
    /// An act the engine does not carry out itself but records in the audit trail (a SIGHUP
    /// asking for the configuration to be reread).
    Note {
        by: Actor,
        action: Action,
        detail: Option<String>,
    },
    /// The master that acts for `job` when it is another one (with several masters).
    HolderOf {
        job: String,
        reply: oneshot::Sender<Option<crate::MasterRef>>,
    },
    /// Who this master is among several, and who holds which job.
    Cluster(oneshot::Sender<Option<ClusterStatus>>),
    /// Queries of the UI, the dashboard, the CLI and `/metrics` (see `engine/ui.rs`).
    Ui(super::UiRequest),
    /// A history query, forwarded to the store behind every write queued before it.
    Store(saltpeter_store::Query),
}

/// A job as `GET /api/v1/jobs` shows it. It stays apart from [`crate::JobRow`] (the dashboard's
/// and `sp-master status`'s richer row) so the API's documented shape never changes with the UI.
#[derive(Clone, Debug, Serialize)]
pub struct JobSummary {
    pub name: String,
    pub group: String,
    /// The seven-field cron line.
    pub schedule: String,
    pub next_run: Option<String>,
    pub last_run: Option<String>,
    pub last_success: Option<bool>,
    pub running: Vec<String>,
    pub overlap: bool,
    /// With several masters: the id of the master that holds the job (absent with one).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub master: Option<String>,
}

/// `GET /api/v1/cluster`: this master, the live ones, and who holds each job.
#[derive(Clone, Debug, Serialize)]
pub struct ClusterStatus {
    pub master: String,
    pub masters: Vec<crate::MasterRef>,
    pub holders: std::collections::BTreeMap<String, String>,
    /// The jobs this master acts for now.
    pub held: Vec<String>,
}

impl Engine {
    pub(super) fn on_api(&mut self, request: ApiRequest) {
        // A dropped receiver only means the client went away; nothing to do about it.
        match request {
            ApiRequest::ListJobs(reply) => {
                let _ = reply.send(self.job_summaries());
            }
            ApiRequest::RunNow { job, by, reply } => {
                if !self.acts_for(&job) && self.config.jobs.contains_key(&job) {
                    let holder = self
                        .cluster
                        .as_ref()
                        .and_then(|c| c.other_holder(&job))
                        .cloned();
                    let _ = reply.send(Err(ApiError::Elsewhere { job, holder }));
                    return;
                }
                let result = self.fire(&job, Some(&by));
                let instance = result.as_ref().ok().cloned();
                self.audit(Action::Run, by, Some(job), instance, None, &result);
                let _ = reply.send(result);
            }
            ApiRequest::GetRun { instance, reply } => {
                let _ = reply.send(find_run(self, &instance).map(|r| r.view()));
            }
            ApiRequest::KillRun {
                instance,
                by,
                reply,
            } => {
                let result = self.kill_run(&instance);
                let job = self.job_of(&instance);
                if result.is_ok()
                    && let Some(job) = &job
                {
                    self.log_note(job, format!("Kill of {instance} requested by {by}"));
                }
                self.audit(Action::Kill, by, job, Some(instance), None, &result);
                let _ = reply.send(result);
            }
            ApiRequest::KillMachine {
                instance,
                machine,
                by,
                reply,
            } => {
                let result = self.kill_machine(&instance, &machine);
                let job = self.job_of(&instance);
                if result.is_ok()
                    && let Some(job) = &job
                {
                    self.log_note(
                        job,
                        format!("Kill of {machine} in {instance} requested by {by}"),
                    );
                }
                self.audit(
                    Action::KillMachine,
                    by,
                    job,
                    Some(instance),
                    Some(machine),
                    &result,
                );
                let _ = reply.send(result);
            }
            ApiRequest::HolderOf { job, reply } => {
                let holder = self
                    .cluster
                    .as_ref()
                    .and_then(|c| c.other_holder(&job))
                    .cloned();
                let _ = reply.send(holder);
            }
            ApiRequest::Cluster(reply) => {
                let _ = reply.send(self.cluster_status());
            }
            ApiRequest::Note { by, action, detail } => {
                tracing::info!(actor = %by, action = action.as_str(), "Recorded in the audit trail.");
                let at = self.clock.wall();
                self.store
                    .push(saltpeter_store::StoreOp::Audit(AuditRecord {
                        at,
                        actor: by,
                        action,
                        job: None,
                        instance: None,
                        machine: None,
                        ok: true,
                        detail,
                    }));
            }
            ApiRequest::Ui(request) => self.on_ui(request),
            ApiRequest::Store(query) => self.store.push(saltpeter_store::StoreOp::Query(query)),
        }
    }

    /// Records an act and its outcome in the audit trail.
    pub(super) fn audit<T>(
        &mut self,
        action: Action,
        by: Actor,
        job: Option<String>,
        instance: Option<String>,
        machine: Option<String>,
        result: &Result<T, ApiError>,
    ) {
        let detail = result.as_ref().err().map(ToString::to_string);
        tracing::info!(
            actor = %by,
            action = action.as_str(),
            job = job.as_deref().unwrap_or("-"),
            instance = instance.as_deref().unwrap_or("-"),
            ok = result.is_ok(),
            "Audit."
        );
        let at = self.clock.wall();
        self.store
            .push(saltpeter_store::StoreOp::Audit(AuditRecord {
                at,
                actor: by,
                action,
                job,
                instance,
                machine,
                ok: result.is_ok(),
                detail,
            }));
    }

    /// The job of a run the engine still knows.
    fn job_of(&self, instance: &str) -> Option<String> {
        find_run(self, instance).map(|r| r.job.name.clone())
    }

    /// A line in a job's log naming who did something to one of its runs.
    pub(super) fn log_note(&self, job: &str, text: String) {
        let at = self.clock.wall();
        self.joblog.record(
            &self.logdir,
            saltpeter_joblog::LogEntry::Note {
                job: job.to_owned(),
                text,
                at,
            },
        );
    }

    fn job_summaries(&self) -> Vec<JobSummary> {
        self.config
            .jobs
            .values()
            .map(|job| {
                let state = self.jobs.get(&job.name);
                JobSummary {
                    name: job.name.clone(),
                    group: job.group.clone(),
                    schedule: job.schedule.cron_line(),
                    next_run: self.scheduler.next_of(&job.name).map(rfc3339),
                    last_run: state.and_then(|s| s.last_run).map(rfc3339),
                    last_success: state.and_then(|s| s.last_success),
                    running: state.map(|s| s.running.clone()).unwrap_or_default(),
                    overlap: state.is_some_and(|s| s.overlap),
                    master: self
                        .cluster
                        .as_ref()
                        .and_then(|c| c.holder_id(&job.name))
                        .map(str::to_owned),
                }
            })
            .collect()
    }

    fn cluster_status(&self) -> Option<ClusterStatus> {
        let c = self.cluster.as_ref()?;
        let mut held: Vec<String> = self
            .config
            .jobs
            .keys()
            .filter(|j| self.acts_for(j))
            .cloned()
            .collect();
        held.sort();
        let mut holders = c.holders().clone();
        for job in &held {
            holders.insert(job.clone(), c.master_id().to_owned());
        }
        Some(ClusterStatus {
            master: c.master_id().to_owned(),
            masters: c.masters().to_vec(),
            holders,
            held,
        })
    }
}
