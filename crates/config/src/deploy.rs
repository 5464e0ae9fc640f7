//! Checks of a whole configuration that no single file can make: settings and jobs that would
//! run the original Python wrapper where it would be refused, an API open to the network
//! without a token, users the local launcher cannot run as. They guard an operator who points
//! this master at the original's config directory (see docs/COMPATIBILITY.md).

use std::path::Path;

use super::problem::{ConfigProblem, Section, Severity};
use super::settings::{Launcher, ORIGINAL_WRAPPER_PATH, Settings};
use super::{Config, JobSpec};

/// Whether a wrapper command looks like the original Python wrapper: its program or any word
/// ends in `.py`, or it is run through a Python interpreter.
pub(crate) fn looks_like_python_wrapper(command: &str) -> bool {
    command.split_whitespace().any(|word| {
        let name = word.rsplit('/').next().unwrap_or(word);
        name.ends_with(".py") || name == "python" || name.starts_with("python3")
    })
}

/// Warnings for wrappers that look like the Python one while legacy wrappers are refused.
/// `settings_file` is the file that set `default_wrapper_path`, if any did.
pub(crate) fn legacy_wrapper_warnings<'a>(
    dir: &Path,
    settings: &Settings,
    settings_file: Option<&Path>,
    jobs: impl IntoIterator<Item = &'a JobSpec>,
) -> Vec<ConfigProblem> {
    if settings.allow_legacy_wrappers {
        return Vec::new();
    }
    let mut out = Vec::new();
    let default = match (&settings.default_wrapper_path, settings.launcher) {
        (Some(path), _) => Some(path.as_str()),
        // The local launcher runs sp-wrapper beside sp-master when nothing is set.
        (None, Launcher::Salt) => Some(ORIGINAL_WRAPPER_PATH),
        (None, _) => None,
    };
    if let Some(path) = default.filter(|p| looks_like_python_wrapper(p)) {
        out.push(ConfigProblem::at(
            Severity::Warning,
            settings_file.unwrap_or(dir),
            0,
            Section::Settings,
            Some("default_wrapper_path"),
            format!(
                "jobs without wrapper_path start {path:?}, which looks like the original Python \
                 wrapper; this master refuses its results unless allow_legacy_wrappers: true. \
                 Install sp-wrapper and point default_wrapper_path at it"
            ),
        ));
    }
    for job in jobs {
        if let Some(path) = job
            .wrapper_path
            .as_deref()
            .filter(|p| looks_like_python_wrapper(p))
        {
            out.push(ConfigProblem::at(
                Severity::Warning,
                &job.source.file,
                job.source.line,
                Section::Job(job.name.clone()),
                Some("wrapper_path"),
                format!(
                    "{path:?} looks like the original Python wrapper; this master refuses its \
                     results unless allow_legacy_wrappers: true"
                ),
            ));
        }
    }
    out
}

/// What `sp-master check` reports beyond the loader's problems: reasons the master would
/// refuse to start, and users the local launcher cannot run jobs as on this host.
pub(crate) fn start_up_problems(config: &Config) -> Vec<ConfigProblem> {
    let mut out = Vec::new();
    if let Some(why) = config.settings.exposure_problem() {
        out.push(ConfigProblem::at(
            Severity::Error,
            &config.dir,
            0,
            Section::Settings,
            Some("api_ws_bind_addr"),
            why,
        ));
    }
    out.extend(super::notify::mail_without_relay(config));
    if config.settings.launcher == Launcher::Local {
        for job in config.jobs.values() {
            let Some(user) = &job.user else { continue };
            if !user_exists(user) {
                out.push(ConfigProblem::at(
                    Severity::Error,
                    &job.source.file,
                    job.source.line,
                    Section::Job(job.name.clone()),
                    Some("user"),
                    format!(
                        "no user {user:?} on this host, where the local launcher runs the job; \
                         its runs would fail before the command starts"
                    ),
                ));
            }
        }
    }
    out
}

fn user_exists(name: &str) -> bool {
    matches!(nix::unistd::User::from_name(name), Ok(Some(_)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_wrappers_are_recognised() {
        for yes in [
            "/usr/local/bin/sp_wrapper.py",
            "python3 /opt/sp/wrapper",
            "/usr/bin/python /x",
            "sp_wrapper.py",
        ] {
            assert!(looks_like_python_wrapper(yes), "{yes}");
        }
        for no in [
            "/usr/local/bin/sp-wrapper",
            "/opt/py/sp-wrapper",
            "sp-wrapper",
        ] {
            assert!(!looks_like_python_wrapper(no), "{no}");
        }
    }
}
