//! Job files and master settings: raw YAML in, validated specs out; hot reload.
//!
//! The config directory (`sp-master -c DIR`, default `/etc/saltpeter`) holds `*.yaml` and
//! `*.yml` files (not recursive). Names starting with `.` or `#` are skipped, which covers
//! editor temp files such as `.#x.yaml` and `.x.yaml.swp` (the original also read hidden
//! `*.yaml` files); `x.yaml~` does not end in `.yaml` anyway. Each file is a mapping whose keys are job names, plus the
//! optional `saltpeter_config` and `saltpeter_maintenance` blocks, as docs/COMPATIBILITY.md
//! describes.
//!
//! Layout, lowest level first:
//! - `raw`: YAML text to a tree of values with line and column, and the YAML 1.1 notes;
//! - [`job`], [`settings`], `maintenance`: each section validated into typed values;
//! - [`recovery`]: what a job does about missed slots and failed machines (`catch_up`,
//!   `retries` and their companions);
//! - [`access`]: named tokens and their roles, public host names, `/metrics` exposure;
//! - `limits`: the caps on what API and UI clients control (part of the settings);
//! - `dir`: a directory, file by file, keeping every file's last good version;
//! - `deploy`: checks of the whole configuration (legacy wrappers, an open API, users);
//! - `watch`: hot reload (file events as a trigger, a debounced rescan, a slow safety rescan);
//! - `problem`: errors and warnings with file, line, section and key;
//! - [`schedule`]: cron expressions (seconds and year fields) and their next fire times.
//!
//! Entry points for the binary: [`check_dir`] (`sp-master check`), [`next_fire_times`]
//! (`sp-master next`), [`ConfigWatcher`] (the running master).

// What no other crate uses is `pub(crate)`, so the compiler reports it once nothing calls it.
#![warn(unreachable_pub)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use time::OffsetDateTime;

pub mod access;
mod deploy;
mod dir;
pub mod job;
mod limits;
mod maintenance;
pub mod notify;
mod problem;
mod raw;
pub mod recovery;
pub mod schedule;
pub mod settings;
mod store_url;
mod watch;

pub use access::{Access, Role};
pub use dir::{DirLoader, LoadOutcome, ScanMode};
pub use job::{JobSource, JobSpec, TargetType, Targets};
pub use limits::Limits;
pub use maintenance::Maintenance;
pub use problem::{ConfigProblem, Section, Severity};
pub use settings::{Launcher, Settings, TlsMode};
pub use store_url::StoreUrl;
pub use watch::{ConfigWatcher, WatchError, WatchOptions};

/// The effective configuration at one moment.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The directory it was read from.
    pub dir: PathBuf,
    /// Every job that loaded, by name (a duplicate name: the last file in name order wins).
    pub jobs: BTreeMap<String, Arc<JobSpec>>,
    /// The merged `saltpeter_config` blocks over the defaults.
    pub settings: Settings,
    /// The merged `saltpeter_maintenance` blocks.
    pub maintenance: Maintenance,
    /// Every current problem, errors and warnings, in file order.
    pub problems: Vec<ConfigProblem>,
    /// Increases by one whenever jobs, settings or maintenance change (not for problems alone).
    pub serial: u64,
}

impl Config {
    /// No jobs, default settings, serial 0.
    pub fn empty(dir: PathBuf) -> Config {
        Config {
            dir,
            jobs: BTreeMap::new(),
            settings: Settings::default(),
            maintenance: Maintenance::default(),
            problems: Vec::new(),
            serial: 0,
        }
    }

    /// Loads a directory once.
    pub fn load(dir: &Path) -> Config {
        let mut loader = DirLoader::new(dir);
        loader.scan(ScanMode::Full).config.as_ref().clone()
    }

    /// A job by name.
    pub fn job(&self, name: &str) -> Option<&Arc<JobSpec>> {
        self.jobs.get(name)
    }

    /// Whether any current problem is an error.
    pub fn has_errors(&self) -> bool {
        self.problems.iter().any(ConfigProblem::is_error)
    }
}

/// `sp-master check -c DIR`: every problem in the directory, errors and warnings. The command
/// should exit non-zero when any of them [`is_error`](ConfigProblem::is_error).
pub fn check_dir(dir: &Path) -> Vec<ConfigProblem> {
    let config = Config::load(dir);
    let mut problems = config.problems.clone();
    problems.extend(deploy::start_up_problems(&config));
    problems
}

/// Why `sp-master next` could not answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NextError {
    /// No loaded job has that name; the job's own problems, if it has any, are included.
    #[error("no job named {name:?} is loaded{}", problems_suffix(.problems))]
    UnknownJob {
        /// The name asked for.
        name: String,
        /// Problems that name this job (why it did not load).
        problems: Vec<ConfigProblem>,
    },
}

fn problems_suffix(problems: &[ConfigProblem]) -> String {
    problems.iter().map(|p| format!("\n  {p}")).collect()
}

/// `sp-master next JOB -c DIR`: the job's next `n` fire times after `now`, one per line, in the
/// job's time zone (RFC 3339 with the zone name, e.g. `2026-11-29T02:30:00+01:00[Europe/Berlin]`).
/// Fewer lines when the schedule ends sooner.
pub fn next_fire_times(
    dir: &Path,
    job: &str,
    n: usize,
    now: OffsetDateTime,
) -> Result<Vec<String>, NextError> {
    let config = Config::load(dir);
    let Some(spec) = config.job(job) else {
        return Err(NextError::UnknownJob {
            name: job.to_owned(),
            problems: config
                .problems
                .iter()
                .filter(|p| p.job() == Some(job))
                .cloned()
                .collect(),
        });
    };
    let zone = match spec.schedule.timezone() {
        Some(name) => jiff::tz::TimeZone::get(name).unwrap_or(jiff::tz::TimeZone::UTC),
        None => jiff::tz::TimeZone::UTC,
    };
    Ok(spec
        .schedule
        .upcoming(now, n)
        .into_iter()
        .map(|t| match jiff::Timestamp::from_second(t.unix_timestamp()) {
            Ok(ts) => ts.to_zoned(zone.clone()).to_string(),
            Err(_) => t.to_string(),
        })
        .collect())
}
