//! Requests the API makes of the engine, and the snapshots it answers with. The engine builds
//! each answer on request; nothing is shared between the engine and the API but messages.

use serde::Serialize;
use tokio::sync::oneshot;

use super::{Engine, find_run};
use crate::runs::RunView;
use crate::runs::model::rfc3339;

/// Why an API request could not be carried out.
#[derive(Clone, Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
}

/// A request from the API, with where to send the answer.
#[derive(Debug)]
pub enum ApiRequest {
    ListJobs(oneshot::Sender<Vec<JobSummary>>),
    RunNow {
        job: String,
        reply: oneshot::Sender<Result<String, ApiError>>,
    },
    GetRun {
        instance: String,
        reply: oneshot::Sender<Option<RunView>>,
    },
    KillRun {
        instance: String,
        reply: oneshot::Sender<Result<(), ApiError>>,
    },
    KillMachine {
        instance: String,
        machine: String,
        reply: oneshot::Sender<Result<(), ApiError>>,
    },
    /// Queries of the UI, the dashboard, the CLI and `/metrics` (see `engine/ui.rs`).
    Ui(super::UiRequest),
    /// A history query, forwarded to the store behind every write queued before it.
    Store(crate::store::Query),
}

/// A job as `GET /api/v1/jobs` shows it.
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
}

impl Engine {
    pub(super) fn on_api(&mut self, request: ApiRequest) {
        // A dropped receiver only means the client went away; nothing to do about it.
        match request {
            ApiRequest::ListJobs(reply) => {
                let _ = reply.send(self.job_summaries());
            }
            ApiRequest::RunNow { job, reply } => {
                let _ = reply.send(self.fire(&job));
            }
            ApiRequest::GetRun { instance, reply } => {
                let _ = reply.send(find_run(self, &instance).map(|r| r.view()));
            }
            ApiRequest::KillRun { instance, reply } => {
                let _ = reply.send(self.kill_run(&instance));
            }
            ApiRequest::KillMachine {
                instance,
                machine,
                reply,
            } => {
                let _ = reply.send(self.kill_machine(&instance, &machine));
            }
            ApiRequest::Ui(request) => self.on_ui(request),
            ApiRequest::Store(query) => self.store.push(crate::store::StoreOp::Query(query)),
        }
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
                }
            })
            .collect()
    }
}
