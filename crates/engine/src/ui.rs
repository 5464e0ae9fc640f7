//! Engine-side queries for the operator's surface: the UI WebSocket (`status`, `details`,
//! output chunks), the dashboard and the CLI (job overview, a run's live output), the timeline
//! and the gauges of `/metrics`.
//!
//! Each answer is built on request from the engine's own state, and its cost follows what was
//! asked: a status walks the running runs and the jobs, details walk the machines of one run,
//! an output read returns only the text after the reader's position (see
//! [`OutputBuffer::read_from`](crate::runs::OutputBuffer::read_from)). Output positions are
//! UTF-16 code units and belong to one run instance: a cursor for another instance reads from 0
//! (docs/COMPATIBILITY.md: output positions).
//!
//! The timeline is a [`TimelineQuery`] over plain [`TimelineEntry`] rows, so a durable store
//! can answer the same query later; today the engine answers from the runs it keeps in memory
//! (the last `HISTORY_PER_JOB` finished runs per job, plus the running ones).

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;
use serde_json::Value;
use time::OffsetDateTime;
use tokio::sync::oneshot;

use super::{Engine, find_run};
use crate::runs::{MachineRun, MachineStatus, Run};
use saltpeter_metrics::Gauges;
use saltpeter_store::output::OutputRead;
use saltpeter_store::{TimelineEntry, TimelineQuery, rfc3339};

/// Largest output text one read returns; a reader further behind catches up over later reads.
pub(crate) const READ_MAX_BYTES: usize = 512 * 1024;

/// A query from the operator's surface, with where to send the answer.
#[derive(Debug)]
pub enum UiRequest {
    /// `status` plus, per subscribed job, `details` and new output: one consistent snapshot,
    /// so a `status` showing a run always reaches the browser before that run's output.
    Snapshot {
        jobs: Vec<JobCursors>,
        reply: oneshot::Sender<UiSnapshot>,
    },
    /// Every job with what the dashboard and `sp-master status` show.
    Overview(oneshot::Sender<Overview>),
    /// One run's machines and their output after the given positions.
    RunOutput {
        query: RunOutputQuery,
        reply: oneshot::Sender<Option<RunOutput>>,
    },
    /// Runs that overlap a time window.
    Timeline {
        query: TimelineQuery,
        reply: oneshot::Sender<Vec<TimelineEntry>>,
    },
    /// The gauges of `/metrics`.
    Gauges(oneshot::Sender<Gauges>),
}

/// A reader's place in one machine's output of one run.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OutputCursor {
    pub instance: String,
    /// UTF-16 code units already held by the reader.
    pub position: u64,
}

/// A subscribed job and the reader's cursors, by machine.
#[derive(Clone, Debug, Default)]
pub struct JobCursors {
    pub job: String,
    pub cursors: BTreeMap<String, OutputCursor>,
}

/// The answer to [`UiRequest::Snapshot`].
#[derive(Clone, Debug)]
pub struct UiSnapshot {
    pub status: StatusSnapshot,
    pub jobs: Vec<JobSnapshot>,
}

/// The body of a `status` message.
#[derive(Clone, Debug, Default, Serialize)]
pub struct StatusSnapshot {
    pub running: BTreeMap<String, RunningEntry>,
    pub last_state: BTreeMap<String, LastState>,
}

/// A run that has not ended, as `status.running[instance]`.
#[derive(Clone, Debug, Serialize)]
pub struct RunningEntry {
    pub started: String,
    pub name: String,
    /// Machines that have not ended (a 253 or 254 leaves this list at once).
    pub machines: Vec<String>,
    pub(crate) stop_signal: bool,
}

/// A job's latest result, as `status.last_state[job]`.
#[derive(Clone, Debug, Serialize)]
pub struct LastState {
    pub last_run: String,
    /// The last run's verdict; always true while the job runs (as the original).
    pub(crate) result_ok: bool,
}

/// One subscribed job in a snapshot.
#[derive(Clone, Debug)]
pub struct JobSnapshot {
    pub job: String,
    /// `None` when the job is neither configured nor remembered.
    pub details: Option<DetailsData>,
    /// New output of the job's latest run, for machines that have some.
    pub outputs: Vec<MachineOutput>,
}

/// The `data` of a `details` message (docs/COMPATIBILITY.md, "The UI protocol"), with RFC 3339 times everywhere.
#[derive(Clone, Debug, Serialize)]
pub struct DetailsData {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_run: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_run: Option<String>,
    pub overlap: bool,
    pub group: String,
    /// The machines of the latest resolution and of the shown run, sorted.
    pub targets: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_success: Option<bool>,
    pub(crate) last_failed_count: usize,
    pub(crate) last_total_count: usize,
    /// The run `results` belong to (an addition; the original had one run per job).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
    pub results: BTreeMap<String, ResultEntry>,
}

/// One machine in `details.data.results`. Unknown times and a running machine's `retcode` are
/// `""`, which is what the React UI tests for (docs/COMPATIBILITY.md, "The UI protocol").
#[derive(Clone, Debug, Serialize)]
pub struct ResultEntry {
    /// Always empty: output travels in `output_chunk` messages.
    pub ret: &'static str,
    /// UTF-16 length of the machine's whole output.
    pub(crate) output_length: u64,
    pub starttime: String,
    pub endtime: String,
    /// A number once ended, `""` before.
    pub retcode: Value,
    pub last_heartbeat: String,
    pub wrapper_version: String,
    /// Additions for the dashboard: where the machine is and why it ended.
    pub status: MachineStatus,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cause: Option<&'static str>,
}

/// New output of one machine.
#[derive(Clone, Debug)]
pub struct MachineOutput {
    pub machine: String,
    pub instance: String,
    pub read: OutputRead,
    /// The machine has ended: no more output is expected.
    pub complete: bool,
}

/// The answer to [`UiRequest::Overview`].
#[derive(Clone, Debug, Serialize)]
pub struct Overview {
    pub version: &'static str,
    pub serial: u64,
    pub maintenance: MaintenanceView,
    pub jobs: Vec<JobRow>,
}

/// Maintenance as configured.
#[derive(Clone, Debug, Serialize)]
pub struct MaintenanceView {
    pub global: bool,
    pub machines: Vec<String>,
}

/// A job as the dashboard's table and `sp-master status` show it; see [`crate::JobSummary`] for
/// why the API's job shape is a separate type.
#[derive(Clone, Debug, Serialize)]
pub struct JobRow {
    pub name: String,
    pub group: String,
    /// The seven cron fields as written.
    pub schedule: String,
    /// The schedule in words.
    pub schedule_text: String,
    pub timezone: Option<String>,
    pub next_run: Option<String>,
    pub last_run: Option<String>,
    pub last_success: Option<bool>,
    /// The most recent run, running or finished.
    pub last_instance: Option<String>,
    pub running: Vec<String>,
    pub overlap: bool,
    /// Machines of this job currently under maintenance.
    pub maintenance: Vec<String>,
    /// With several masters: the id of the master that holds the job (absent with one).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub master: Option<String>,
}

/// Which run and from where.
#[derive(Clone, Debug, Default)]
pub struct RunOutputQuery {
    pub instance: String,
    /// UTF-16 positions already held, by machine; absent machines read from 0.
    pub from: BTreeMap<String, u64>,
    /// Only this machine, if set.
    pub machine: Option<String>,
    pub max_bytes: usize,
}

/// The answer to [`UiRequest::RunOutput`].
#[derive(Clone, Debug, Serialize)]
pub struct RunOutput {
    pub instance: String,
    pub job: String,
    pub started: String,
    pub ended: Option<String>,
    pub success: Option<bool>,
    pub killed: bool,
    pub machines: BTreeMap<String, MachineLive>,
}

/// A machine with its new output.
#[derive(Clone, Debug, Serialize)]
pub struct MachineLive {
    pub status: MachineStatus,
    pub retcode: Option<i64>,
    pub cause: Option<&'static str>,
    pub starttime: Option<String>,
    pub endtime: Option<String>,
    pub last_heartbeat: Option<String>,
    /// Seconds since the last heartbeat, on the master's monotonic clock.
    pub heartbeat_age: Option<f64>,
    /// Seconds from start to end (or to now while running).
    pub(crate) duration: Option<f64>,
    pub wrapper_version: Option<String>,
    pub output: OutputRead,
    /// The current (or final) attempt, when the job retries (`retries` above 0).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attempt: Option<u32>,
    /// How many attempts the job allows, when it retries.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
}

impl Engine {
    pub(super) fn on_ui(&mut self, request: UiRequest) {
        // A dropped receiver only means the asker went away.
        match request {
            UiRequest::Snapshot { jobs, reply } => {
                let _ = reply.send(self.ui_snapshot(&jobs));
            }
            UiRequest::Overview(reply) => {
                let _ = reply.send(self.overview());
            }
            UiRequest::RunOutput { query, reply } => {
                let _ = reply.send(self.run_output(&query));
            }
            UiRequest::Timeline { query, reply } => {
                // Answered from the store, so the timeline reaches past what memory holds; the
                // in-memory view stands in if the store cannot answer.
                let fallback = self.timeline(&query);
                let (tx, rx) = oneshot::channel();
                self.store.push(saltpeter_store::StoreOp::Query(
                    saltpeter_store::Query::Timeline { query, reply: tx },
                ));
                self.spawner.spawn(async move {
                    let rows = match rx.await {
                        Ok(Ok(rows)) => rows,
                        Ok(Err(error)) => {
                            tracing::warn!(%error, "Timeline from the store failed; using memory.");
                            fallback
                        }
                        Err(_) => fallback,
                    };
                    let _ = reply.send(rows);
                });
            }
            UiRequest::Gauges(reply) => {
                let _ = reply.send(self.gauges());
            }
        }
    }

    fn ui_snapshot(&self, jobs: &[JobCursors]) -> UiSnapshot {
        UiSnapshot {
            status: self.status_snapshot(),
            jobs: jobs.iter().map(|j| self.job_snapshot(j)).collect(),
        }
    }

    fn status_snapshot(&self) -> StatusSnapshot {
        let running = self
            .runs
            .values()
            .map(|run| {
                let entry = RunningEntry {
                    started: rfc3339(run.started),
                    name: run.job.name.clone(),
                    machines: run.unfinished().map(|(name, _)| name.clone()).collect(),
                    stop_signal: run.killed,
                };
                (run.instance.clone(), entry)
            })
            .collect();
        let last_state = self
            .jobs
            .iter()
            .filter_map(|(name, state)| {
                let last_run = state.last_run?;
                let result_ok = !state.running.is_empty() || state.last_success.unwrap_or(false);
                Some((
                    name.clone(),
                    LastState {
                        last_run: rfc3339(last_run),
                        result_ok,
                    },
                ))
            })
            .collect();
        StatusSnapshot {
            running,
            last_state,
        }
    }

    /// The run a job's details show: its newest running instance, else its newest finished one.
    fn latest_run(&self, job: &str) -> Option<&Run> {
        let state = self.jobs.get(job);
        state
            .and_then(|s| s.running.last())
            .and_then(|i| self.runs.get(i))
            .or_else(|| {
                self.history
                    .get(job)
                    .and_then(|h| h.back())
                    .and_then(|i| self.finished.get(i))
            })
    }

    fn job_snapshot(&self, cursors: &JobCursors) -> JobSnapshot {
        let name = cursors.job.as_str();
        let spec = self.config.jobs.get(name);
        let state = self.jobs.get(name);
        if spec.is_none() && state.is_none() {
            return JobSnapshot {
                job: name.to_owned(),
                details: None,
                outputs: Vec::new(),
            };
        }
        let run = self.latest_run(name);
        let mut targets: BTreeSet<String> = state
            .map(|s| s.targets.iter().cloned().collect())
            .unwrap_or_default();
        let mut results = BTreeMap::new();
        let mut outputs = Vec::new();
        if let Some(run) = run {
            for (machine, m) in &run.machines {
                targets.insert(machine.clone());
                let view = times(m);
                results.insert(
                    machine.clone(),
                    ResultEntry {
                        ret: "",
                        output_length: m.output.total_utf16(),
                        starttime: view.0.unwrap_or_default(),
                        endtime: view.1.unwrap_or_default(),
                        retcode: m.retcode.map_or(Value::String(String::new()), Value::from),
                        last_heartbeat: view.2.unwrap_or_default(),
                        wrapper_version: m.wrapper_version.clone().unwrap_or_default(),
                        status: m.status,
                        cause: m.cause.map(saltpeter_proto::Cause::as_str),
                    },
                );
                let from = cursors
                    .cursors
                    .get(machine)
                    .filter(|c| c.instance == run.instance)
                    .map_or(0, |c| c.position);
                let read = m.output.read_from(from, READ_MAX_BYTES);
                if !read.text.is_empty() || read.skipped > 0 {
                    outputs.push(MachineOutput {
                        machine: machine.clone(),
                        instance: run.instance.clone(),
                        read,
                        complete: m.ended(),
                    });
                }
            }
        }
        let details = DetailsData {
            next_run: self.scheduler.next_of(name).map(rfc3339),
            last_run: state.and_then(|s| s.last_run).map(rfc3339),
            overlap: state.is_some_and(|s| s.overlap),
            group: spec
                .map(|s| s.group.clone())
                .or_else(|| run.map(|r| r.job.group.clone()))
                .unwrap_or_default(),
            targets: targets.into_iter().collect(),
            last_success: state.and_then(|s| s.last_success),
            last_failed_count: state.map_or(0, |s| s.last_failed_count),
            last_total_count: state.map_or(0, |s| s.last_total_count),
            instance: run.map(|r| r.instance.clone()),
            results,
        };
        JobSnapshot {
            job: name.to_owned(),
            details: Some(details),
            outputs,
        }
    }

    fn overview(&self) -> Overview {
        let maintenance = &self.config.maintenance;
        let jobs = self
            .config
            .jobs
            .values()
            .map(|job| {
                let state = self.jobs.get(&job.name);
                let mut names: BTreeSet<String> = job.targets.names().into_iter().collect();
                if let Some(s) = state {
                    names.extend(s.targets.iter().cloned());
                }
                JobRow {
                    name: job.name.clone(),
                    group: job.group.clone(),
                    schedule: job.schedule.cron_line(),
                    schedule_text: job.schedule.describe(),
                    timezone: job.schedule.timezone().map(str::to_owned),
                    next_run: self.scheduler.next_of(&job.name).map(rfc3339),
                    last_run: state.and_then(|s| s.last_run).map(rfc3339),
                    last_success: state.and_then(|s| s.last_success),
                    last_instance: self.latest_run(&job.name).map(|r| r.instance.clone()),
                    running: state.map(|s| s.running.clone()).unwrap_or_default(),
                    overlap: state.is_some_and(|s| s.overlap),
                    maintenance: names
                        .into_iter()
                        .filter(|n| maintenance.machines.contains(n))
                        .collect(),
                    master: self
                        .cluster
                        .as_ref()
                        .and_then(|c| c.holder_id(&job.name))
                        .map(str::to_owned),
                }
            })
            .collect();
        Overview {
            version: env!("CARGO_PKG_VERSION"),
            serial: self.config.serial,
            maintenance: MaintenanceView {
                global: maintenance.global,
                machines: maintenance.machines.iter().cloned().collect(),
            },
            jobs,
        }
    }

    fn run_output(&self, query: &RunOutputQuery) -> Option<RunOutput> {
        let run = find_run(self, &query.instance)?;
        let now = self.clock.instant();
        let wall = self.clock.wall();
        let max = if query.max_bytes == 0 {
            READ_MAX_BYTES
        } else {
            query.max_bytes
        };
        let retries = run.job.recovery.retries;
        let machines = run
            .machines
            .iter()
            .filter(|(name, _)| query.machine.as_ref().is_none_or(|m| m == *name))
            .map(|(name, m)| {
                let from = query.from.get(name).copied().unwrap_or(0);
                let (starttime, endtime, last_heartbeat) = times(m);
                let duration = m
                    .starttime
                    .map(|s| (m.endtime.unwrap_or(wall) - s).as_seconds_f64().max(0.0));
                let live = MachineLive {
                    status: m.status,
                    retcode: m.retcode,
                    cause: m.cause.map(saltpeter_proto::Cause::as_str),
                    starttime,
                    endtime,
                    last_heartbeat,
                    heartbeat_age: m
                        .clock
                        .last_beat
                        .filter(|_| !m.ended())
                        .map(|b| now.saturating_duration_since(b).as_secs_f64()),
                    duration,
                    wrapper_version: m.wrapper_version.clone(),
                    output: m.output.read_from(from, max),
                    attempt: (retries > 0).then(|| m.attempt()),
                    max_attempts: (retries > 0).then(|| retries.saturating_add(1)),
                };
                (name.clone(), live)
            })
            .collect();
        Some(RunOutput {
            instance: run.instance.clone(),
            job: run.job.name.clone(),
            started: rfc3339(run.started),
            ended: run.ended.map(rfc3339),
            success: run.success,
            killed: run.killed,
            machines,
        })
    }

    fn timeline(&self, query: &TimelineQuery) -> Vec<TimelineEntry> {
        let wanted = |run: &&Run| {
            query.job.as_ref().is_none_or(|j| *j == run.job.name)
                && run.started <= query.end
                && run.ended.unwrap_or(query.end) >= query.start
        };
        let mut rows: Vec<(OffsetDateTime, TimelineEntry)> = self
            .runs
            .values()
            .chain(self.finished.values())
            .filter(wanted)
            .map(|run| (run.started, timeline_entry(run)))
            .collect();
        rows.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.job_instance.cmp(&b.1.job_instance)));
        let skip = rows.len().saturating_sub(query.limit.max(1));
        rows.into_iter().skip(skip).map(|(_, e)| e).collect()
    }

    fn gauges(&self) -> Gauges {
        let machines_running = self
            .runs
            .values()
            .flat_map(|r| r.machines.values())
            .filter(|m| m.status == MachineStatus::Running)
            .count();
        let jobs = self
            .config
            .jobs
            .keys()
            .map(|name| {
                let state = self.jobs.get(name);
                saltpeter_metrics::JobTimes {
                    job: name.clone(),
                    last_success: state
                        .and_then(|s| s.last_success_at)
                        .map(|t| t.unix_timestamp()),
                    last_run: state.and_then(|s| s.last_run).map(|t| t.unix_timestamp()),
                    next_run: self.scheduler.next_of(name).map(|t| t.unix_timestamp()),
                }
            })
            .collect();
        Gauges {
            runs_running: self.runs.len() as u64,
            machines_running: machines_running as u64,
            wrappers_connected: self.conns.len() as u64,
            runtime_injection_queue: self.spawner.metrics().global_queue_depth() as u64,
            jobs,
            config_reload: self.config_taken.map(|(at, ok)| (at.unix_timestamp(), ok)),
            cluster: self
                .cluster
                .as_ref()
                .map(|c| saltpeter_metrics::ClusterGauges {
                    jobs_held: self.config.jobs.keys().filter(|j| self.acts_for(j)).count() as u64,
                    masters_live: c.masters().len() as u64,
                }),
        }
    }
}

fn timeline_entry(run: &Run) -> TimelineEntry {
    let codes: Vec<i64> = run.machines.values().filter_map(|m| m.retcode).collect();
    let failed = codes.iter().filter(|c| **c != 0).count();
    let ret_code = run.ended.map(|_| {
        codes
            .iter()
            .copied()
            .find(|c| *c != 0)
            .unwrap_or(if run.success == Some(false) { 1 } else { 0 })
    });
    TimelineEntry {
        cron: run.job.name.clone(),
        group: run.job.group.clone(),
        job_instance: run.instance.clone(),
        msg_type: "run",
        timestamp: rfc3339(run.started),
        end: run.ended.map(rfc3339),
        ret_code,
        success: run.success,
        machines: run.machines.len(),
        failed,
        missed: None,
    }
}

/// A machine's start, end and last heartbeat in RFC 3339.
fn times(m: &MachineRun) -> (Option<String>, Option<String>, Option<String>) {
    (
        m.starttime.map(rfc3339),
        m.endtime.map(rfc3339),
        m.last_heartbeat.map(rfc3339),
    )
}
