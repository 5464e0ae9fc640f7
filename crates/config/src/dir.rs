//! Loading a config directory, file by file, keeping each file's last good version.
//!
//! [`DirLoader`] remembers, per file, what it last read (size, modification time, inode and a
//! content hash) and the last version that parsed. A rescan only re-reads files whose stamp
//! changed (or, in a full rescan, whose content changed), so an idle directory costs a few
//! `stat` calls. A file that breaks keeps its last good jobs, settings and maintenance in
//! force, and the breakage is reported; a deleted file takes its jobs with it.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::hash::{Hash, Hasher};
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use time::OffsetDateTime;

use super::Config;
use super::job::{JobSpec, parse_job};
use super::maintenance::{Maintenance, PartialMaintenance, parse_maintenance};
use super::problem::{ConfigProblem, Section, Severity};
use super::raw::{Node, Value, parse_yaml};
use super::settings::{PartialSettings, Settings, parse_settings};

/// Files larger than this are refused: a job file is a few kilobytes.
const MAX_FILE_BYTES: u64 = 16 * 1024 * 1024;

/// The top-level key of the settings block.
pub(crate) const SETTINGS_KEY: &str = "saltpeter_config";
/// The top-level key of the maintenance block.
pub(crate) const MAINTENANCE_KEY: &str = "saltpeter_maintenance";

/// How thoroughly [`DirLoader::scan`] looks at files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScanMode {
    /// Re-read only files whose size, modification time or inode changed.
    Quick,
    /// Re-read every file and compare contents (catches edits that keep size and mtime).
    Full,
}

/// What a scan found.
#[derive(Debug, Clone)]
pub struct LoadOutcome {
    /// The effective config after the scan (the same `Arc` as before when nothing changed).
    pub config: Arc<Config>,
    /// Whether jobs, settings or maintenance changed (the serial was bumped).
    pub changed: bool,
    /// Whether the list of current problems changed.
    pub problems_changed: bool,
    /// Problems not present in the previous scan: log these once.
    pub new_problems: Vec<ConfigProblem>,
}

/// A file's identity on disk, cheap to compare.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    len: u64,
    mtime: i64,
    mtime_nsec: i64,
    ino: u64,
    dev: u64,
}

impl Stamp {
    fn of(meta: &fs::Metadata) -> Stamp {
        Stamp {
            len: meta.len(),
            mtime: meta.mtime(),
            mtime_nsec: meta.mtime_nsec(),
            ino: meta.ino(),
            dev: meta.dev(),
        }
    }
}

/// One file's parsed content.
#[derive(Debug)]
struct ParsedFile {
    jobs: Vec<Arc<JobSpec>>,
    settings: Option<PartialSettings>,
    maintenance: Option<PartialMaintenance>,
    /// Job errors and warnings found while parsing.
    problems: Vec<ConfigProblem>,
}

#[derive(Debug, Default)]
struct FileEntry {
    stamp: Option<Stamp>,
    hash: Option<u64>,
    /// The last version that parsed.
    good: Option<Arc<ParsedFile>>,
    /// Why the current version does not parse.
    error: Option<ConfigProblem>,
}

/// Loads a config directory repeatedly, re-parsing only what changed.
#[derive(Debug)]
pub struct DirLoader {
    dir: PathBuf,
    files: BTreeMap<String, FileEntry>,
    dir_problem: Option<ConfigProblem>,
    current: Arc<Config>,
    /// Identities of the problems reported by the previous scan.
    reported: BTreeSet<ProblemId>,
}

/// A problem without its position: editing lines above a problem must not report it again.
type ProblemId = (Severity, PathBuf, Section, Option<String>, String);

fn problem_id(p: &ConfigProblem) -> ProblemId {
    (
        p.severity,
        p.file.clone(),
        p.section.clone(),
        p.key.clone(),
        p.message.clone(),
    )
}

/// Whether a directory entry is a config file: `*.yaml` or `*.yml`, not an editor's hidden,
/// backup or swap file.
pub(crate) fn is_config_file_name(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    let has_ext = lower.ends_with(".yaml") || lower.ends_with(".yml");
    let stem_len = lower.rfind('.').unwrap_or(0);
    has_ext && stem_len > 0 && !name.starts_with('.') && !name.starts_with('#')
}

/// The group of a job file: its name without `.yaml`/`.yml`.
pub(crate) fn group_of(name: &str) -> &str {
    name.rfind('.').map_or(name, |i| &name[..i])
}

impl DirLoader {
    /// A loader for `dir`; nothing is read until [`DirLoader::scan`].
    pub fn new(dir: impl Into<PathBuf>) -> DirLoader {
        let dir = dir.into();
        DirLoader {
            current: Arc::new(Config::empty(dir.clone())),
            dir,
            files: BTreeMap::new(),
            dir_problem: None,
            reported: BTreeSet::new(),
        }
    }

    /// The directory being loaded.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The config of the last scan.
    pub fn current(&self) -> Arc<Config> {
        Arc::clone(&self.current)
    }

    /// Rescans the directory, judging "never fires again" against the current time.
    pub fn scan(&mut self, mode: ScanMode) -> LoadOutcome {
        self.scan_at(mode, OffsetDateTime::now_utc())
    }

    /// Rescans the directory; schedules that cannot fire after `now` are errors.
    pub(crate) fn scan_at(&mut self, mode: ScanMode, now: OffsetDateTime) -> LoadOutcome {
        match self.list_files() {
            Ok(names) => {
                self.dir_problem = None;
                self.files.retain(|name, _| names.contains(name));
                for name in &names {
                    self.refresh_file(name, mode, now);
                }
            }
            Err(problem) => {
                // A directory we cannot read keeps everything loaded so far: a transient
                // error must not stop every job.
                self.dir_problem = Some(*problem);
            }
        }
        self.rebuild()
    }

    fn list_files(&self) -> Result<BTreeSet<String>, Box<ConfigProblem>> {
        let read = fs::read_dir(&self.dir).map_err(|e| {
            broken(
                &self.dir,
                None,
                format!("cannot read the config directory: {e}"),
            )
        })?;
        let mut names = BTreeSet::new();
        for entry in read.flatten() {
            let Ok(name) = entry.file_name().into_string() else {
                continue;
            };
            if is_config_file_name(&name) {
                names.insert(name);
            }
        }
        Ok(names)
    }

    fn refresh_file(&mut self, name: &str, mode: ScanMode, now: OffsetDateTime) {
        let path = self.dir.join(name);
        let entry = self.files.entry(name.to_owned()).or_default();
        let meta = match fs::metadata(&path) {
            Ok(m) => m,
            Err(e) => {
                entry.stamp = None;
                entry.hash = None;
                entry.error = Some(ConfigProblem::file(
                    &path,
                    None,
                    format!("cannot read the file: {e}; its last good version stays loaded"),
                ));
                return;
            }
        };
        if !meta.is_file() {
            entry.stamp = None;
            entry.hash = None;
            entry.error = None;
            entry.good = None;
            return;
        }
        let stamp = Stamp::of(&meta);
        if mode == ScanMode::Quick && entry.stamp == Some(stamp) {
            return;
        }
        entry.stamp = Some(stamp);
        let bytes = match read_limited(&path) {
            Ok(b) => b,
            Err(message) => {
                entry.hash = None;
                entry.error = Some(ConfigProblem::file(
                    &path,
                    None,
                    format!("{message}; its last good version stays loaded"),
                ));
                return;
            }
        };
        let mut hasher = std::hash::DefaultHasher::new();
        bytes.hash(&mut hasher);
        let hash = hasher.finish();
        if entry.hash == Some(hash) {
            return;
        }
        entry.hash = Some(hash);
        let shown = shows_content(&self.dir, &path);
        match parse_file(&path, group_of(name), &bytes, now) {
            Ok(mut parsed) => {
                if !shown {
                    parsed.problems = parsed.problems.into_iter().map(withhold).collect();
                }
                entry.good = Some(Arc::new(parsed));
                entry.error = None;
            }
            Err(problem) if shown => entry.error = Some(*problem),
            Err(problem) => entry.error = Some(withhold(*problem)),
        }
    }

    fn rebuild(&mut self) -> LoadOutcome {
        let mut settings = Settings::default();
        let mut maintenance = Maintenance::default();
        let mut jobs: BTreeMap<String, Arc<JobSpec>> = BTreeMap::new();
        let mut problems: Vec<ConfigProblem> = self.dir_problem.iter().cloned().collect();
        // The file whose block set the default wrapper last, for the warning below.
        let mut wrapper_file: Option<PathBuf> = None;

        // Sorted file order makes "the last file wins" deterministic.
        for (name, entry) in &self.files {
            problems.extend(entry.error.iter().cloned());
            let Some(good) = &entry.good else {
                continue;
            };
            problems.extend(good.problems.iter().cloned());
            if let Some(s) = &good.settings {
                settings.apply(s);
                if s.sets_default_wrapper_path() {
                    wrapper_file = Some(self.dir.join(name));
                }
            }
            if let Some(m) = &good.maintenance {
                maintenance.apply(m);
            }
            for job in &good.jobs {
                if let Some(earlier) = jobs.insert(job.name.clone(), Arc::clone(job)) {
                    problems.push(ConfigProblem::at(
                        Severity::Warning,
                        &job.source.file,
                        job.source.line,
                        Section::Job(job.name.clone()),
                        None,
                        format!(
                            "also defined in {} line {}; this definition (the last file in \
                             name order) is used",
                            earlier.source.file.display(),
                            earlier.source.line
                        ),
                    ));
                }
            }
        }

        problems.extend(super::deploy::legacy_wrapper_warnings(
            &self.dir,
            &settings,
            wrapper_file.as_deref(),
            jobs.values().map(AsRef::as_ref),
        ));
        let old = &self.current;
        let changed =
            old.jobs != jobs || old.settings != settings || old.maintenance != maintenance;
        let problems_changed = old.problems != problems;
        let ids: BTreeSet<ProblemId> = problems.iter().map(problem_id).collect();
        let new_problems: Vec<ConfigProblem> = problems
            .iter()
            .filter(|p| !self.reported.contains(&problem_id(p)))
            .cloned()
            .collect();
        self.reported = ids;

        if changed || problems_changed {
            self.current = Arc::new(Config {
                dir: self.dir.clone(),
                jobs,
                settings,
                maintenance,
                problems,
                serial: old.serial + u64::from(changed),
            });
        }
        LoadOutcome {
            config: Arc::clone(&self.current),
            changed,
            problems_changed,
            new_problems,
        }
    }
}

/// Whether problems in `path` may quote what the file says: yes for a file in the config
/// directory and for a link that stays inside it (Kubernetes mounts a ConfigMap as links into
/// a `..data` directory beside the files); no for a link that leads elsewhere, whose content
/// is not the operator's job file and may be a secret that would otherwise reach logs and
/// the API.
fn shows_content(dir: &Path, path: &Path) -> bool {
    let Ok(meta) = fs::symlink_metadata(path) else {
        return false;
    };
    if !meta.file_type().is_symlink() {
        return true;
    }
    match (fs::canonicalize(dir), fs::canonicalize(path)) {
        (Ok(dir), Ok(target)) => target.starts_with(dir),
        _ => false,
    }
}

/// A problem without anything the file said: where it is and how bad, not what.
fn withhold(problem: ConfigProblem) -> ConfigProblem {
    let kind = if problem.is_error() {
        "an error"
    } else {
        "a warning"
    };
    ConfigProblem {
        section: Section::File,
        key: None,
        message: format!(
            "{kind} here; details are not shown because the file is a link that leads outside \
             the config directory"
        ),
        ..problem
    }
}

/// A whole-file problem, boxed because it travels in `Err` through several calls.
fn broken(path: &Path, pos: Option<super::raw::Pos>, message: String) -> Box<ConfigProblem> {
    Box::new(ConfigProblem::file(path, pos, message))
}

fn read_limited(path: &Path) -> Result<Vec<u8>, String> {
    let file = fs::File::open(path).map_err(|e| format!("cannot read the file: {e}"))?;
    let mut bytes = Vec::new();
    file.take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read the file: {e}"))?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(format!(
            "the file is larger than {} MiB",
            MAX_FILE_BYTES / 1024 / 1024
        ));
    }
    Ok(bytes)
}

/// Parses one file. `Err` means the whole file is broken (its last good version stays).
fn parse_file(
    path: &Path,
    group: &str,
    bytes: &[u8],
    now: OffsetDateTime,
) -> Result<ParsedFile, Box<ConfigProblem>> {
    let keep = "; its last good version stays loaded";
    let text = std::str::from_utf8(bytes).map_err(|e| {
        broken(
            path,
            None,
            format!("the file is not UTF-8 text ({e}){keep}"),
        )
    })?;
    let doc = parse_yaml(text).map_err(|e| {
        broken(
            path,
            e.pos,
            format!("YAML syntax error: {}{keep}", e.message),
        )
    })?;
    let entries = match &doc.value {
        Value::Map(entries) => entries,
        Value::Null => {
            return Err(broken(path, None, format!("the file is empty{keep}")));
        }
        other => {
            return Err(broken(
                path,
                Some(doc.pos),
                format!(
                    "expected a mapping of job names to jobs, got {}{keep}",
                    other.kind()
                ),
            ));
        }
    };

    let mut parsed = ParsedFile {
        jobs: Vec::new(),
        settings: None,
        maintenance: None,
        problems: Vec::new(),
    };
    // The last duplicate top-level key wins, as in PyYAML.
    let mut last_index: BTreeMap<String, usize> = BTreeMap::new();
    for (i, (k, _)) in entries.iter().enumerate() {
        last_index.insert(k.key_text(), i);
    }
    for (i, (k, v)) in entries.iter().enumerate() {
        let name = k.key_text();
        if last_index.get(&name) != Some(&i) {
            let section = match name.as_str() {
                SETTINGS_KEY => Section::Settings,
                MAINTENANCE_KEY => Section::Maintenance,
                _ => Section::Job(name.clone()),
            };
            parsed.problems.push(ConfigProblem::at(
                Severity::Warning,
                path,
                k.pos.line,
                section,
                None,
                "defined more than once in this file; the last definition is used",
            ));
            continue;
        }
        match name.as_str() {
            SETTINGS_KEY => {
                let block = block_entries(path, k, v, SETTINGS_KEY)?;
                let (s, problems) = parse_settings(path, block);
                parsed.settings = Some(s);
                parsed.problems.extend(problems);
            }
            MAINTENANCE_KEY => {
                let block = block_entries(path, k, v, MAINTENANCE_KEY)?;
                let (m, problems) = parse_maintenance(path, block);
                parsed.maintenance = Some(m);
                parsed.problems.extend(problems);
            }
            _ => {
                if matches!(k.value, Value::Null | Value::Seq(_) | Value::Map(_)) {
                    parsed.problems.push(ConfigProblem::at(
                        Severity::Error,
                        path,
                        k.pos.line,
                        Section::Job(name.clone()),
                        None,
                        "a job name must be text; this entry is skipped",
                    ));
                    continue;
                }
                let outcome = parse_job(path, group, &name, k, v, now);
                parsed.problems.extend(outcome.warnings);
                match outcome.spec {
                    Ok(spec) => parsed.jobs.push(Arc::new(spec)),
                    Err(errors) => {
                        parsed.problems.extend(errors);
                        parsed.problems.push(ConfigProblem::at(
                            Severity::Error,
                            path,
                            k.pos.line,
                            Section::Job(name.clone()),
                            None,
                            "the job is skipped until the errors above are fixed",
                        ));
                    }
                }
            }
        }
    }
    Ok(parsed)
}

/// The entries of a settings or maintenance block; anything but a mapping (or nothing) breaks
/// the whole file, as in the original.
fn block_entries<'a>(
    path: &Path,
    key: &Node,
    value: &'a Node,
    name: &str,
) -> Result<&'a [(Node, Node)], Box<ConfigProblem>> {
    match &value.value {
        Value::Map(entries) => Ok(entries),
        Value::Null => Ok(&[]),
        other => Err(broken(
            path,
            Some(key.pos),
            format!(
                "{name} must be a mapping, got {}; the file's last good version stays loaded",
                other.kind()
            ),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_file_names() {
        for good in ["jobs.yaml", "a.b.yml", "X.YAML"] {
            assert!(is_config_file_name(good), "{good}");
        }
        for bad in [
            ".#jobs.yaml",
            ".jobs.yaml.swp",
            "jobs.yaml~",
            "jobs.yaml.bak",
            "#jobs.yaml#",
            ".yaml",
            "jobs.json",
            ".hidden.yaml",
        ] {
            assert!(!is_config_file_name(bad), "{bad}");
        }
        assert_eq!(group_of("backups.yaml"), "backups");
        assert_eq!(group_of("a.b.yml"), "a.b");
    }
}
