//! A run's life: fire, resolve targets, launch batch after batch, conclude each machine, and
//! evaluate the run (docs/COMPATIBILITY.md, "Runs and their verdict", with the original's defects fixed: state is per
//! instance, a launch failure fails only its own machine, a kill reaches every machine).

use std::collections::BTreeMap;
use std::sync::Arc;

use rand::seq::SliceRandom;
use saltpeter_proto::{Cause, EXIT_ERROR, EXIT_KILLED, EXIT_NOT_STARTED, EXIT_SUCCESS};

use super::api::ApiError;
use super::{Engine, Event, HISTORY_PER_JOB, new_token};
use crate::identity::{Identity, machine_token};
use crate::launch::{DirectOutcome, Resolution, StartRequest};
use crate::runs::{MachineRun, Run};
use saltpeter_config::JobSpec;
use saltpeter_joblog::LogEntry;
use saltpeter_metrics::RunResult;
use saltpeter_store::StoreOp;
use saltpeter_store::output::FINISHED_CAP;

impl Engine {
    /// Starts a run of `job` now, by hand when `by` names who asked (the job log then says
    /// so in a line after the start line), else for the scheduler. `Err` says why not
    /// (unknown job, maintenance, overlap).
    pub(super) fn fire(
        &mut self,
        job_name: &str,
        by: Option<&saltpeter_store::audit::Actor>,
    ) -> Result<String, ApiError> {
        let job = self
            .config
            .jobs
            .get(job_name)
            .cloned()
            .ok_or_else(|| ApiError::NotFound(format!("no job named {job_name:?}")))?;
        if self.config.maintenance.global {
            tracing::info!(job = %job.name, "Maintenance mode active, no crons will be started.");
            return Err(ApiError::Conflict("global maintenance is active".into()));
        }
        let wall = self.clock.wall();
        let running = self
            .jobs
            .get(&job.name)
            .and_then(|s| s.running.first().cloned());
        if !job.allow_overlap
            && let Some(other) = running
        {
            self.jobs.entry(job.name.clone()).or_default().overlap = true;
            tracing::warn!(job = %job.name, running = %other, "Overlap: the previous run is still going; not starting another.");
            self.joblog.record(
                &self.logdir,
                LogEntry::Overlap {
                    job: job.name.clone(),
                    running: other.clone(),
                    at: wall,
                },
            );
            return Err(ApiError::Conflict(format!(
                "{other} is still running (overlap not allowed)"
            )));
        }
        let instance = self.new_instance_id(&job.name, wall);
        let state = self.jobs.entry(job.name.clone()).or_default();
        state.overlap = false;
        state.last_run = Some(wall);
        state.running.push(instance.clone());
        tracing::info!(job = %job.name, %instance, "Starting run.");
        self.joblog.record(
            &self.logdir,
            LogEntry::Start {
                job: job.name.clone(),
                instance: instance.clone(),
                at: wall,
            },
        );
        if let Some(by) = by {
            self.log_note(&job.name, format!("Started by {by}"));
        }
        let run = Run {
            instance: instance.clone(),
            job: job.clone(),
            started: wall,
            ended: None,
            success: None,
            token: new_token(),
            identity: self.launcher.identity(),
            machines: Default::default(),
            maintenance: Vec::new(),
            pending_batches: Default::default(),
            resolving: true,
            killed: false,
        };
        self.runs.insert(instance.clone(), run);
        self.metrics.run_started(&job.name);
        self.save_run(&instance);
        self.save_job(&job.name);
        self.spawn_resolve(instance.clone(), job);
        Ok(instance)
    }

    /// `<job>_<unix seconds>`, bumped past any id still known so two runs in one second stay
    /// apart while the id keeps the original's shape.
    fn new_instance_id(&self, job: &str, wall: time::OffsetDateTime) -> String {
        let mut secs = wall.unix_timestamp();
        loop {
            let id = format!("{job}_{secs}");
            if !self.runs.contains_key(&id) && !self.finished.contains_key(&id) {
                return id;
            }
            secs += 1;
        }
    }

    pub(super) fn on_resolved(&mut self, instance: &str, resolution: Resolution) {
        let wall = self.clock.wall();
        let maintenance = self.config.maintenance.machines.clone();
        let Some(run) = self.runs.get_mut(instance) else {
            return;
        };
        run.resolving = false;
        let job = run.job.clone();
        if let Some(state) = self.jobs.get_mut(&job.name) {
            state.targets = resolution.up.clone();
        }
        if let Some(error) = &resolution.error {
            tracing::error!(job = %job.name, %instance, %error, "Could not resolve targets.");
        }
        let mut selected: Vec<String> = Vec::new();
        for name in resolution.up {
            if maintenance.contains(&name) {
                run.maintenance.push(name.clone());
                self.joblog.record(
                    &self.logdir,
                    LogEntry::Skipped {
                        job: job.name.clone(),
                        instance: instance.into(),
                        machine: name,
                        why: "Target under maintenance".into(),
                        at: wall,
                    },
                );
            } else {
                selected.push(name);
            }
        }
        if job.number_of_targets > 0 || job.batch_size > 0 {
            selected.shuffle(&mut rand::rng());
        }
        if job.number_of_targets > 0 {
            selected.truncate(job.number_of_targets);
        }
        for name in &selected {
            run.machines.insert(name.clone(), MachineRun::new());
        }
        let batch = if job.batch_size > 0 {
            job.batch_size
        } else {
            selected.len().max(1)
        };
        run.pending_batches = selected.chunks(batch).map(<[String]>::to_vec).collect();
        // Machines the launcher expected but that did not answer: 255, and the log says so.
        let mut down = Vec::new();
        for (name, why) in resolution.down {
            if maintenance.contains(&name) {
                continue;
            }
            let mut m = MachineRun::new();
            m.starttime = Some(wall);
            m.output.push(&why);
            run.machines.insert(name.clone(), m);
            down.push((name, why));
        }
        if run.machines.is_empty() && resolution.error.is_none() {
            self.joblog.record(
                &self.logdir,
                LogEntry::NoMachines {
                    job: job.name.clone(),
                    instance: instance.into(),
                },
            );
        }
        if let Some(error) = resolution.error {
            // Keep the reason visible on the run even though no machine can carry it.
            tracing::warn!(%instance, %error, "Run has no machines because resolution failed.");
        }
        self.save_run(instance);
        self.save_machines(instance);
        for (name, why) in down {
            self.store.push(StoreOp::Output {
                instance: instance.into(),
                machine: name.clone(),
                seq: None,
                data: why.clone(),
            });
            self.joblog.record(
                &self.logdir,
                LogEntry::Output {
                    instance: instance.into(),
                    machine: name.clone(),
                    text: why,
                },
            );
            // Quietly, then one `advance` below: advancing after the first down machine would
            // finish a run with no up machine before the others got their 255.
            self.conclude_quietly(instance, &name, EXIT_ERROR, Cause::NoResponse);
        }
        self.advance(instance);
    }

    /// Launches the next batch when the current one is done, or finishes the run.
    pub(super) fn advance(&mut self, instance: &str) {
        let wall = self.clock.wall();
        let Some(run) = self.runs.get_mut(instance) else {
            return;
        };
        if run.resolving {
            return;
        }
        let launched_unfinished = run
            .machines
            .values()
            .any(|m| !m.ended() && (m.clock.launched.is_some() || m.retry_at.is_some()));
        if launched_unfinished {
            return;
        }
        if run.killed {
            let waiting: Vec<String> = run.pending_batches.drain(..).flatten().collect();
            for name in waiting {
                self.append_output(instance, &name, "[Job killed before execution]\n".into());
                self.conclude_quietly(instance, &name, EXIT_KILLED, Cause::KilledBeforeStart);
            }
            self.finish_run(instance);
            return;
        }
        let Some(batch) = run.pending_batches.pop_front() else {
            self.finish_run(instance);
            return;
        };
        let job = run.job.clone();
        let now = self.clock.instant();
        for name in &batch {
            if let Some(m) = run.machines.get_mut(name) {
                m.clock.launched = Some(now);
                m.starttime = Some(wall);
                // Legacy mode: no wrapper will say `start`; the command runs from launch on.
                if !job.use_wrapper {
                    m.clock.direct = true;
                    m.status = crate::runs::MachineStatus::Running;
                }
            }
        }
        // Where each machine has a token of its own, the run's secret stays here.
        let (shared_token, tokens) = match run.identity {
            Identity::MachineToken => {
                let tokens = batch
                    .iter()
                    .map(|m| (m.clone(), machine_token(&run.token, instance, m)))
                    .collect();
                (None, tokens)
            }
            Identity::RunToken | Identity::SaltKey => (Some(run.token.clone()), BTreeMap::new()),
        };
        let identity = run.identity;
        let env = self.wrapper_env(&job, instance, shared_token.as_deref(), identity);
        for name in &batch {
            self.joblog.record(
                &self.logdir,
                LogEntry::MachineStart {
                    job: job.name.clone(),
                    instance: instance.into(),
                    machine: name.clone(),
                    at: wall,
                },
            );
            self.rearm(instance, name);
            self.save_machine(instance, name);
        }
        self.save_run(instance);
        let request = StartRequest {
            job: job.clone(),
            instance: instance.into(),
            machines: batch,
            env,
            tokens,
            wrapper_path: job
                .wrapper_path
                .clone()
                .or_else(|| self.config.settings.default_wrapper_path.clone()),
        };
        let instance = instance.to_owned();
        if !job.use_wrapper {
            // Legacy mode (docs/COMPATIBILITY.md): the launcher runs the command itself and reports
            // its result at the end; see `on_direct`.
            let run = self.launcher.run_direct(request);
            self.report(run, move |outcome| Event::Finished { instance, outcome });
            return;
        }
        let start = self.launcher.start(request);
        self.report(start, move |outcome| Event::Started { instance, outcome });
    }

    /// Results of a legacy-mode run (`use_wrapper: false`): the command's exit code and output,
    /// reported by the launcher once the command ended. A machine with no result gets 255
    /// "Target did not return anything" (the original's words) with the launcher's reason. A
    /// machine the master already decided (killed, timed out) keeps its verdict.
    pub(super) fn on_direct(&mut self, instance: &str, outcome: DirectOutcome) {
        for (machine, result) in outcome {
            let open = self
                .runs
                .get(instance)
                .and_then(|r| r.machines.get(&machine))
                .is_some_and(|m| !m.ended());
            if !open {
                continue;
            }
            match result {
                Ok(done) => {
                    if !done.output.is_empty() {
                        self.append_output(instance, &machine, done.output);
                    }
                    self.conclude(instance, &machine, done.retcode, Cause::Exit, None);
                }
                Err(reason) => {
                    let text = format!("Target did not return anything - {reason}\n");
                    self.append_output(instance, &machine, text);
                    self.conclude(instance, &machine, EXIT_ERROR, Cause::NoResponse, None);
                }
            }
        }
    }

    pub(super) fn on_started(&mut self, instance: &str, outcome: crate::launch::StartOutcome) {
        for (machine, result) in outcome {
            let Err(reason) = result else { continue };
            self.metrics.launch_failure();
            let Some(m) = self
                .runs
                .get_mut(instance)
                .and_then(|r| r.machines.get_mut(&machine))
            else {
                continue;
            };
            m.clock.launch_problem = Some(reason.clone());
            // Only this machine fails (docs/COMPATIBILITY.md), and only if its wrapper has not started anyway.
            if m.clock.started.is_none() && !m.ended() {
                let text = format!("Wrapper failed to start - {reason}\n");
                self.append_output(instance, &machine, text);
                self.conclude(
                    instance,
                    &machine,
                    EXIT_NOT_STARTED,
                    Cause::NotStarted,
                    None,
                );
            }
        }
    }

    /// Appends master-made text to a machine's output (and its log spool).
    pub(super) fn append_output(&mut self, instance: &str, machine: &str, text: String) {
        let Some(m) = self
            .runs
            .get_mut(instance)
            .and_then(|r| r.machines.get_mut(machine))
        else {
            return;
        };
        m.output.push(&text);
        self.store.push(StoreOp::Output {
            instance: instance.into(),
            machine: machine.into(),
            seq: None,
            data: text.clone(),
        });
        self.joblog.record(
            &self.logdir,
            LogEntry::Output {
                instance: instance.into(),
                machine: machine.into(),
                text,
            },
        );
    }

    /// Records a machine's final result, logs it, and moves the run along.
    pub(super) fn conclude(
        &mut self,
        instance: &str,
        machine: &str,
        retcode: i64,
        cause: Cause,
        _seq: Option<i64>,
    ) {
        if self.conclude_quietly(instance, machine, retcode, cause) {
            self.advance(instance);
        }
    }

    /// [`Self::conclude`] without advancing the run; returns whether anything changed.
    fn conclude_quietly(
        &mut self,
        instance: &str,
        machine: &str,
        retcode: i64,
        cause: Cause,
    ) -> bool {
        // Retries: a result the job retries is kept as an attempt instead (see `retry.rs`).
        if self.retry_instead(instance, machine, retcode, cause) {
            return true;
        }
        let wall = self.clock.wall();
        let Some(run) = self.runs.get_mut(instance) else {
            return false;
        };
        let job = run.job.name.clone();
        let Some(m) = run.machines.get_mut(machine) else {
            return false;
        };
        if !m.finish(retcode, cause, wall) {
            return false;
        }
        self.metrics.machine_result(&job, retcode);
        tracing::info!(%job, %instance, %machine, retcode, cause = cause.as_str(), "Machine finished.");
        self.joblog.record(
            &self.logdir,
            LogEntry::MachineResult {
                job,
                instance: instance.into(),
                machine: machine.into(),
                code: retcode,
                at: wall,
            },
        );
        self.save_machine(instance, machine);
        true
    }

    fn finish_run(&mut self, instance: &str) {
        let wall = self.clock.wall();
        let Some(mut run) = self.runs.remove(instance) else {
            return;
        };
        let total = run
            .machines
            .values()
            .filter(|m| m.retcode.is_some())
            .count();
        let failed = run
            .machines
            .values()
            .filter(|m| m.retcode.is_some_and(|c| c != EXIT_SUCCESS))
            .count();
        let success = failed == 0 && total > 0 && !run.killed;
        self.metrics
            .run_finished(&run.job.name, RunResult::of(success, run.killed));
        run.ended = Some(wall);
        run.success = Some(success);
        for m in run.machines.values_mut() {
            m.output.shrink(FINISHED_CAP, FINISHED_CAP);
        }
        let job = run.job.name.clone();
        if let Some(state) = self.jobs.get_mut(&job) {
            state.running.retain(|i| i != instance);
            state.last_success = Some(success);
            if success {
                state.last_success_at = Some(wall);
            }
            state.last_failed_count = failed;
            state.last_total_count = total;
        }
        tracing::info!(%job, %instance, success, "Completed: {}/{} targets successful.", total - failed, total);
        self.joblog.record(
            &self.logdir,
            LogEntry::End {
                job: job.clone(),
                instance: instance.into(),
                at: wall,
                total,
                failed,
                success,
            },
        );
        let history = self.history.entry(job).or_default();
        history.push_back(instance.to_owned());
        while history.len() > HISTORY_PER_JOB {
            if let Some(old) = history.pop_front() {
                self.finished.remove(&old);
            }
        }
        self.finished.insert(instance.to_owned(), run);
        self.save_run(instance);
        if let Some(job) = self.finished.get(instance).map(|r| r.job.name.clone()) {
            self.save_job(&job);
        }
    }

    /// Kills every machine of a run that has not ended (all of them, connected or not).
    pub(super) fn kill_run(&mut self, instance: &str) -> Result<(), ApiError> {
        let run = self
            .runs
            .get_mut(instance)
            .ok_or_else(|| ApiError::NotFound(format!("no running instance {instance:?}")))?;
        run.killed = true;
        let machines: Vec<String> = run.unfinished().map(|(name, _)| name.clone()).collect();
        tracing::info!(%instance, machines = machines.len(), "Kill requested.");
        self.save_run(instance);
        for machine in machines {
            self.kill_machine_inner(instance, &machine);
        }
        self.advance(instance);
        Ok(())
    }

    /// Kills one machine of a run.
    pub(super) fn kill_machine(&mut self, instance: &str, machine: &str) -> Result<(), ApiError> {
        let run = self
            .runs
            .get(instance)
            .ok_or_else(|| ApiError::NotFound(format!("no running instance {instance:?}")))?;
        let m = run
            .machines
            .get(machine)
            .ok_or_else(|| ApiError::NotFound(format!("{machine:?} is not part of {instance}")))?;
        if m.ended() {
            return Err(ApiError::Conflict(format!(
                "{machine} has already finished"
            )));
        }
        self.kill_machine_inner(instance, machine);
        self.advance(instance);
        Ok(())
    }

    fn kill_machine_inner(&mut self, instance: &str, machine: &str) {
        let now = self.clock.instant();
        let Some(m) = self
            .runs
            .get_mut(instance)
            .and_then(|r| r.machines.get_mut(machine))
        else {
            return;
        };
        if m.ended() {
            return;
        }
        if m.clock.launched.is_none() {
            // Its batch never came: nothing runs, so nothing to wait for.
            self.append_output(instance, machine, "[Job killed before execution]\n".into());
            self.conclude_quietly(instance, machine, EXIT_KILLED, Cause::KilledBeforeStart);
            return;
        }
        if m.clock.kill_requested.is_none() {
            m.clock.kill_requested = Some(now);
        }
        self.send_kill(instance, machine);
        self.rearm(instance, machine);
        self.save_machine(instance, machine);
    }

    /// The wrapper's environment (docs/COMPATIBILITY.md, "Salt invocation and legacy mode"). The job's `env` comes first so that it can
    /// never override the variables saltpeter itself relies on.
    pub(super) fn wrapper_env(
        &self,
        job: &Arc<JobSpec>,
        instance: &str,
        token: Option<&str>,
        identity: Identity,
    ) -> Vec<(String, String)> {
        let s = &self.config.settings;
        let mut env: Vec<(String, String)> = job
            .env
            .iter()
            .filter(|(k, _)| !RESERVED.contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let url = match &job.saltpeter_server_host {
            Some(host) => format!(
                "{}://{host}:{}",
                self.machines_scheme(),
                self.machines_port()
            ),
            None => self.machines_url.clone(),
        };
        let cluster = self
            .cluster
            .as_ref()
            .map(|c| crate::cluster::wrapper_env(c, &url))
            .unwrap_or_default();
        let mut put = |k: &str, v: String| env.push((k.to_owned(), v));
        match url.strip_prefix("wss://") {
            // The original wrapper reads only SP_WEBSOCKET_URL and speaks only ws://; while it
            // is allowed, that variable names the plain path of the same port and sp-wrapper
            // takes the TLS one from SP_WEBSOCKET_URL_TLS.
            Some(rest) if s.allow_legacy_wrappers => {
                put("SP_WEBSOCKET_URL", format!("ws://{rest}"));
                put("SP_WEBSOCKET_URL_TLS", url);
            }
            _ => put("SP_WEBSOCKET_URL", url),
        }
        put("SP_JOB_NAME", job.name.clone());
        put("SP_JOB_INSTANCE", instance.to_owned());
        put("SP_JOB_INSTANCE_NAME", instance.to_owned());
        put("SP_COMMAND", job.command.clone());
        put(
            "SP_WRAPPER_LOGLEVEL",
            job.wrapper_loglevel
                .clone()
                .unwrap_or_else(|| s.default_wrapper_loglevel.clone()),
        );
        put(
            "SP_WRAPPER_LOGDIR",
            job.wrapper_logdir
                .clone()
                .unwrap_or_else(|| s.default_wrapper_logdir.clone()),
        );
        put("SP_ALLOW_OVERLAP", job.allow_overlap.to_string());
        put("PYTHONUNBUFFERED", "1".into());
        put(
            "SP_TIMEOUT",
            job.timeout.map_or(0, |t| t.as_secs()).to_string(),
        );
        if let Some(token) = token {
            put("SP_RUN_TOKEN", token.to_owned());
        }
        if identity == Identity::SaltKey {
            // The wrapper signs its connect with the minion's Salt key (`SP_SALT_PKI_DIR`).
            put("SP_IDENTITY", identity.as_str().to_owned());
        }
        if let Some(v) = &job.lockfile {
            put("SP_LOCKFILE", v.clone());
        }
        if let Some(v) = &job.cwd {
            put("SP_CWD", v.clone());
        }
        if let Some(v) = &job.user {
            put("SP_USER", v.clone());
        }
        for (k, v) in &self.wrapper_env {
            // A cluster's list of certificates replaces this master's own one.
            if !cluster.iter().any(|(ck, _)| ck == k) {
                put(k, v.clone());
            }
        }
        for (k, v) in cluster {
            put(&k, v);
        }
        env
    }

    /// `wss` when the machines endpoint speaks TLS, else `ws`.
    fn machines_scheme(&self) -> &str {
        self.machines_url.split("://").next().unwrap_or("ws")
    }

    fn machines_port(&self) -> u16 {
        self.machines_url
            .rsplit(':')
            .next()
            .and_then(|p| p.trim_end_matches('/').parse().ok())
            .unwrap_or(self.config.settings.machines_port)
    }
}

/// Variables a job's `env` may not override.
const RESERVED: &[&str] = &[
    "SP_WEBSOCKET_URL",
    "SP_JOB_NAME",
    "SP_JOB_INSTANCE",
    "SP_JOB_INSTANCE_NAME",
    "SP_COMMAND",
    "SP_RUN_TOKEN",
    "SP_IDENTITY",
    "SP_SALT_PKI_DIR",
    "SP_MACHINE_ID",
    "SP_TIMEOUT",
    "SP_ALLOW_OVERLAP",
    "SP_WEBSOCKET_URL_TLS",
    "SP_TLS_FINGERPRINT",
    "SP_TLS_CA",
    "SP_WEBSOCKET_URLS",
];
