//! Config loading end to end: job keys and defaults, settings and maintenance, last-good
//! retention, warnings once, the `check`/`next` entry points, hot reload and idle cost.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use proptest::prelude::*;
use saltpeter_config::{
    Config, ConfigProblem, ConfigWatcher, DirLoader, Launcher, ScanMode, Section, Severity,
    TargetType, Targets, WatchOptions, check_dir, next_fire_times,
};
use time::macros::datetime;

const MINIMAL: &str = "  min: 0\n  hour: '*'\n  dom: '*'\n  mon: '*'\n  dow: '*'\n  targets: 'web*'\n  command: 'true'\n";

fn write(dir: &Path, name: &str, text: &str) {
    fs::write(dir.join(name), text).unwrap();
}

/// A directory as these tests see it. A directory that sets no wrapper is warned that jobs
/// would start the original Python wrapper; that warning has its own test and is left out
/// here, so each test sees only the problems it is about.
fn load(dir: &Path) -> Config {
    let mut config = Config::load(dir);
    config
        .problems
        .retain(|p| !(p.file == dir && p.key.as_deref() == Some("default_wrapper_path")));
    config
}

/// A settings file that points jobs at sp-wrapper, as a migrated fleet's config does.
fn with_sp_wrapper(dir: &Path) {
    write(
        dir,
        "00-wrapper.yaml",
        "saltpeter_config:\n  default_wrapper_path: /usr/local/bin/sp-wrapper\n",
    );
}

fn errors(config: &Config) -> Vec<String> {
    config
        .problems
        .iter()
        .filter(|p| p.is_error())
        .map(ToString::to_string)
        .collect()
}

fn warnings(config: &Config) -> Vec<String> {
    config
        .problems
        .iter()
        .filter(|p| !p.is_error())
        .map(ToString::to_string)
        .collect()
}

#[test]
fn every_job_key_and_its_value() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "nightly.yaml",
        r#"
backup:
  sec: 30
  min: "*/15"
  hour: 2-4
  dom: "?"
  mon: jan-jun
  dow: mon-fri
  year: "2020-2099"
  timezone: Europe/Berlin
  targets: [db1, db2]
  target_type: list
  command: /usr/local/bin/backup --all
  user: backup
  cwd: /srv
  env:
    RETRIES: 3
    VERBOSE: true
    RATIO: 1.0
    NAME: nightly
    EMPTY: ~
  timeout: 600
  number_of_targets: 1
  batch_size: 2
  allow_overlap: "i know what i am doing!"
  use_wrapper: no
  wrapper_path: /opt/sp-wrapper
  wrapper_loglevel: debug
  wrapper_logdir: /var/log/spw
  saltpeter_server_host: master.example
  lockfile: /run/backup.lock
  owner: team-db
"#,
    );
    let config = load(dir.path());
    assert!(errors(&config).is_empty(), "{:?}", errors(&config));
    let job = config.job("backup").unwrap();
    assert_eq!(job.name, "backup");
    assert_eq!(job.group, "nightly");
    assert_eq!(
        job.schedule.cron_line(),
        "30 */15 2-4 ? jan-jun mon-fri 2020-2099"
    );
    assert_eq!(job.schedule.timezone(), Some("Europe/Berlin"));
    assert_eq!(job.timezone.as_deref(), Some("Europe/Berlin"));
    assert_eq!(job.targets, Targets::List(vec!["db1".into(), "db2".into()]));
    assert_eq!(job.targets.names(), ["db1", "db2"]);
    assert_eq!(job.target_type, TargetType::List);
    assert_eq!(job.command, "/usr/local/bin/backup --all");
    assert_eq!(job.user.as_deref(), Some("backup"));
    assert_eq!(job.cwd.as_deref(), Some("/srv"));
    let env: Vec<(&str, &str)> = job
        .env
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    assert_eq!(
        env,
        [
            ("EMPTY", "None"),
            ("NAME", "nightly"),
            ("RATIO", "1.0"),
            ("RETRIES", "3"),
            ("VERBOSE", "True"),
        ]
    );
    assert_eq!(job.timeout, Some(Duration::from_secs(600)));
    assert_eq!(job.number_of_targets, 1);
    assert_eq!(job.batch_size, 2);
    assert!(job.allow_overlap);
    assert!(!job.use_wrapper);
    assert_eq!(job.wrapper_path.as_deref(), Some("/opt/sp-wrapper"));
    assert_eq!(job.wrapper_loglevel.as_deref(), Some("debug"));
    assert_eq!(job.wrapper_logdir.as_deref(), Some("/var/log/spw"));
    assert_eq!(job.saltpeter_server_host.as_deref(), Some("master.example"));
    assert_eq!(job.lockfile.as_deref(), Some("/run/backup.lock"));
    assert_eq!(job.extra.get("owner"), Some(&serde_json::json!("team-db")));
    assert_eq!(job.source.file, dir.path().join("nightly.yaml"));
    assert_eq!(job.source.line, 2);
    // The unknown key is a warning, not an error.
    let w = warnings(&config);
    assert_eq!(w.len(), 1, "{w:?}");
    assert!(w[0].contains("key \"owner\": unknown key"), "{}", w[0]);

    // The UI view: keys as written, group forced, env redacted.
    let ui = job.ui_json();
    assert_eq!(ui["min"], "*/15");
    assert_eq!(ui["sec"], 30);
    assert_eq!(ui["group"], "nightly");
    assert_eq!(ui["owner"], "team-db");
    assert_eq!(ui["targets"], serde_json::json!(["db1", "db2"]));
    for value in ui["env"].as_object().unwrap().values() {
        assert_eq!(value, "<redacted>");
    }
    assert!(!ui.to_string().contains("nightly\"") || ui["env"]["NAME"] == "<redacted>");
}

#[test]
fn defaults_of_a_minimal_job() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "jobs.yaml", &format!("j:\n{MINIMAL}"));
    let config = load(dir.path());
    assert!(config.problems.is_empty(), "{:?}", config.problems);
    let job = config.job("j").unwrap();
    assert_eq!(job.schedule.cron_line(), "0 0 * * * * *");
    assert_eq!(job.schedule.timezone(), None);
    assert_eq!(job.targets, Targets::Expression("web*".into()));
    assert_eq!(job.target_type, TargetType::Glob);
    assert_eq!(job.timeout, Some(Duration::from_secs(3600)));
    assert_eq!((job.number_of_targets, job.batch_size), (0, 0));
    assert!(!job.allow_overlap);
    assert!(job.use_wrapper);
    assert!(job.user.is_none() && job.cwd.is_none() && job.env.is_empty());
    assert!(job.wrapper_path.is_none() && job.lockfile.is_none());
    assert!(job.extra.is_empty());
    assert_eq!(job.ui_json()["timeout"], 3600);
}

#[test]
fn timeout_zero_or_null_means_no_limit_and_bad_values_name_the_key() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "jobs.yaml",
        &format!(
            "zero:\n{MINIMAL}  timeout: 0\nnothing:\n{MINIMAL}  timeout: ~\nbackup:\n{MINIMAL}  timeout: 1h\n"
        ),
    );
    let config = load(dir.path());
    assert_eq!(config.job("zero").unwrap().timeout, None);
    assert_eq!(config.job("nothing").unwrap().timeout, None);
    assert!(config.job("backup").is_none());
    let path = dir.path().join("jobs.yaml");
    let expected = format!(
        "{}:27: job \"backup\": key \"timeout\": expected a whole number of seconds, got \"1h\"",
        path.display()
    );
    assert!(errors(&config).contains(&expected), "{:?}", errors(&config));
}

#[test]
fn overlap_only_for_the_exact_magic_string() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "jobs.yaml",
        &format!(
            "a:\n{MINIMAL}  allow_overlap: i know what i am doing!\nb:\n{MINIMAL}  allow_overlap: I know what I am doing!\nc:\n{MINIMAL}  allow_overlap: true\nd:\n{MINIMAL}  allow_overlap: false\n"
        ),
    );
    let config = load(dir.path());
    let overlap = |n: &str| config.job(n).unwrap().allow_overlap;
    assert!(overlap("a"));
    assert!(!overlap("b"));
    assert!(!overlap("c"));
    assert!(!overlap("d"));
    let w = warnings(&config);
    assert_eq!(w.len(), 2, "{w:?}");
    assert!(w.iter().all(|w| w.contains("overlap stays forbidden")));
}

#[test]
fn group_is_forced_to_the_file_stem() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "web.yml",
        &format!("j:\n{MINIMAL}  group: other\n"),
    );
    let config = load(dir.path());
    let job = config.job("j").unwrap();
    assert_eq!(job.group, "web");
    assert_eq!(job.ui_json()["group"], "web");
    let w = warnings(&config);
    assert!(
        w.iter()
            .any(|w| w.contains("group is always the file name \"web\"")),
        "{w:?}"
    );
}

#[test]
fn booleans_accept_yaml_1_1_spellings() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "jobs.yaml",
        &format!(
            "a:\n{MINIMAL}  use_wrapper: Off\nb:\n{MINIMAL}  use_wrapper: YES\nc:\n{MINIMAL}  use_wrapper: maybe\n"
        ),
    );
    let config = load(dir.path());
    assert!(!config.job("a").unwrap().use_wrapper);
    assert!(config.job("b").unwrap().use_wrapper);
    assert!(config.job("c").is_none());
    assert!(
        errors(&config)
            .iter()
            .any(|e| e.contains("job \"c\": key \"use_wrapper\": expected true or false")),
        "{:?}",
        errors(&config)
    );
}

#[test]
fn a_bad_schedule_skips_only_that_job() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "jobs.yaml",
        &format!(
            "good:\n{MINIMAL}bad:\n  min: 61\n  hour: '*'\n  dom: '*'\n  mon: '*'\n  dow: '*'\n  targets: x\n  command: y\n"
        ),
    );
    let config = load(dir.path());
    assert!(config.job("good").is_some());
    assert!(config.job("bad").is_none());
    let e = errors(&config);
    assert!(
        e.iter().any(|e| e.ends_with(
            "jobs.yaml:10: job \"bad\": key \"min\": bad schedule: min \"61\": 61 is out of range 0-59"
        )),
        "{e:?}"
    );
    assert!(
        e.iter()
            .any(|e| e.contains("jobs.yaml:9: job \"bad\": the job is skipped")),
        "{e:?}"
    );
}

/// One bad key per case: the job is skipped and the error names the job, the key and why.
#[test]
fn a_bad_value_skips_its_job_and_names_the_key() {
    for (extra, job, needle) in [
        (
            "  year: 1999\n",
            "old",
            "job \"old\": key \"year\": the schedule can never fire again",
        ),
        // The duplicate keys override MINIMAL's (last wins, with a warning).
        (
            "  dom: 31\n  mon: feb\n",
            "never",
            "job \"never\": key \"schedule\": the schedule can never fire",
        ),
        (
            "  timezone: Atlantis/Capital\n",
            "zone",
            "key \"timezone\": unknown time zone \"Atlantis/Capital\"",
        ),
        (
            "  timeout: 1h\n",
            "backup",
            "job \"backup\": key \"timeout\": expected a whole number of seconds, got \"1h\"",
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            "jobs.yaml",
            &format!("{job}:\n{MINIMAL}{extra}"),
        );
        let config = load(dir.path());
        assert!(config.job(job).is_none(), "{job} was loaded");
        let e = errors(&config);
        assert!(e.iter().any(|e| e.contains(needle)), "{job}: {e:?}");
    }
}

#[test]
fn a_broken_file_keeps_its_last_good_version() {
    let dir = tempfile::tempdir().unwrap();
    with_sp_wrapper(dir.path());
    write(dir.path(), "jobs.yaml", &format!("kept:\n{MINIMAL}"));
    write(dir.path(), "other.yaml", &format!("other:\n{MINIMAL}"));
    let mut loader = DirLoader::new(dir.path());
    let first = loader.scan(ScanMode::Quick);
    assert!(first.changed);
    assert_eq!(first.config.jobs.len(), 2);
    let serial = first.config.serial;

    write(
        dir.path(),
        "jobs.yaml",
        &format!("kept:\n{MINIMAL}new:\n  min: [1,\n"),
    );
    let broken = loader.scan(ScanMode::Quick);
    assert!(!broken.changed, "the effective config did not change");
    assert!(broken.problems_changed);
    assert_eq!(broken.config.serial, serial);
    assert!(broken.config.job("kept").is_some());
    assert!(broken.config.job("other").is_some());
    assert!(broken.config.job("new").is_none());
    let problem = &broken.new_problems[0];
    assert_eq!(problem.section, Section::File);
    assert_eq!(problem.line, Some(10));
    let text = problem.to_string();
    assert!(text.contains("jobs.yaml:10:"), "{text}");
    assert!(text.contains("YAML syntax error"), "{text}");
    assert!(text.contains("last good version stays loaded"), "{text}");

    // Reported once per breakage.
    let again = loader.scan(ScanMode::Full);
    assert!(again.new_problems.is_empty());
    assert_eq!(again.config.problems.len(), 1);

    // Not a mapping, and empty: also broken, last good kept.
    for text in ["- just\n- a list\n", "", "# only a comment\n", "\u{0}\u{1}"] {
        write(dir.path(), "jobs.yaml", text);
        let out = loader.scan(ScanMode::Full);
        assert!(out.config.job("kept").is_some(), "{text:?}");
        assert!(out.config.has_errors(), "{text:?}");
    }
    fs::write(dir.path().join("jobs.yaml"), [0xff, 0xfe, 0x00]).unwrap();
    let out = loader.scan(ScanMode::Full);
    assert!(out.config.job("kept").is_some());
    assert!(errors(&out.config)[0].contains("not UTF-8"));

    // Fixed: the new version replaces the last good one.
    write(dir.path(), "jobs.yaml", &format!("new:\n{MINIMAL}"));
    let fixed = loader.scan(ScanMode::Quick);
    assert!(fixed.changed);
    assert_eq!(fixed.config.serial, serial + 1);
    assert!(fixed.config.job("kept").is_none());
    assert!(fixed.config.job("new").is_some());
    assert!(fixed.config.problems.is_empty());
}

#[test]
fn a_file_broken_from_the_start_has_no_jobs_and_an_error() {
    let dir = tempfile::tempdir().unwrap();
    with_sp_wrapper(dir.path());
    write(dir.path(), "jobs.yaml", "a: b: c\n");
    let problems = check_dir(dir.path());
    assert_eq!(problems.len(), 1);
    assert!(problems[0].is_error());
    assert!(
        problems[0].to_string().contains("jobs.yaml:1:"),
        "{}",
        problems[0]
    );
}

#[test]
fn deleting_a_file_removes_its_jobs() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "a.yaml", &format!("a:\n{MINIMAL}"));
    write(dir.path(), "b.yaml", &format!("b:\n{MINIMAL}"));
    let mut loader = DirLoader::new(dir.path());
    assert_eq!(loader.scan(ScanMode::Quick).config.jobs.len(), 2);
    fs::remove_file(dir.path().join("a.yaml")).unwrap();
    let out = loader.scan(ScanMode::Quick);
    assert!(out.changed);
    assert_eq!(out.config.jobs.keys().collect::<Vec<_>>(), ["b"]);
}

#[test]
fn unknown_keys_are_warned_once() {
    let dir = tempfile::tempdir().unwrap();
    with_sp_wrapper(dir.path());
    write(
        dir.path(),
        "jobs.yaml",
        &format!("j:\n{MINIMAL}  colour: blue\n"),
    );
    let mut loader = DirLoader::new(dir.path());
    let first = loader.scan(ScanMode::Full);
    assert_eq!(first.new_problems.len(), 1);
    assert_eq!(first.new_problems[0].severity, Severity::Warning);
    assert_eq!(first.new_problems[0].key.as_deref(), Some("colour"));
    assert!(loader.scan(ScanMode::Full).new_problems.is_empty());
    // Editing the file (the key moves down a line) does not warn again.
    write(
        dir.path(),
        "jobs.yaml",
        &format!("# a comment\nj:\n{MINIMAL}  colour: blue\n"),
    );
    let edited = loader.scan(ScanMode::Quick);
    assert!(edited.new_problems.is_empty(), "{:?}", edited.new_problems);
    assert_eq!(edited.config.problems.len(), 1);
    assert_eq!(edited.config.problems[0].line, Some(10));
}

#[test]
fn duplicate_job_names_last_file_wins_with_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "a.yaml", &format!("same:\n{MINIMAL}"));
    write(
        dir.path(),
        "b.yaml",
        &format!("same:\n{MINIMAL}  command: from-b\n"),
    );
    let config = load(dir.path());
    let job = config.job("same").unwrap();
    assert_eq!(job.group, "b");
    assert_eq!(job.command, "from-b");
    assert!(
        warnings(&config)
            .iter()
            .any(|w| w.contains("b.yaml:1: warning: job \"same\": also defined in")),
        "{:?}",
        warnings(&config)
    );
}

#[test]
fn only_yaml_files_count_and_editor_files_are_skipped() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "a.yml", &format!("a:\n{MINIMAL}"));
    for name in [
        ".#a.yaml",
        "a.yaml~",
        ".a.yaml.swp",
        "notes.txt",
        ".hidden.yaml",
    ] {
        write(dir.path(), name, "not: [valid\n");
    }
    fs::create_dir(dir.path().join("sub.yaml")).unwrap();
    let config = load(dir.path());
    assert_eq!(config.jobs.keys().collect::<Vec<_>>(), ["a"]);
    assert!(config.problems.is_empty(), "{:?}", config.problems);
}

#[test]
fn settings_defaults_merge_and_errors() {
    let dir = tempfile::tempdir().unwrap();
    let config = load(dir.path());
    let s = &config.settings;
    assert_eq!(s.logdir, Path::new("/var/log/saltpeter"));
    assert!(!s.debug && !s.api_ws && !s.allow_legacy_wrappers);
    assert_eq!(s.api_bind_addr.to_string(), "127.0.0.1");
    assert_eq!(s.api_port, 8888);
    assert_eq!(s.machines_bind_addr.to_string(), "0.0.0.0");
    assert_eq!(s.machines_port, 8889);
    assert_eq!(s.launcher, Launcher::Salt);
    assert!(!s.allow_unauthenticated_api);
    assert_eq!(s.heartbeat_timeout, Duration::from_secs(15));
    assert_eq!(s.data_dir, Path::new("/var/lib/saltpeter"));
    assert_eq!(s.default_wrapper_path, None);
    assert_eq!(s.default_wrapper_loglevel, "normal");
    assert_eq!(s.default_wrapper_logdir, "/var/log/sp_wrapper");
    assert!(!s.default_saltpeter_server_host.is_empty());
    assert_eq!((s.elasticsearch.as_str(), s.opensearch.as_str()), ("", ""));
    assert_eq!(s.elasticsearch_index, "saltpeter");
    assert_eq!(s.salt_bin, "salt");
    assert_eq!(s.salt_config_dir, None);
    assert_eq!(s.ping_timeout, Duration::from_secs(20));
    assert!(s.api_token.is_none() && s.ws_allowed_origins.is_empty());

    // a.yaml then b.yaml: b wins per key; keys only a sets stay.
    write(
        dir.path(),
        "a.yaml",
        "saltpeter_config:\n  debug: yes\n  api_ws_port: 9000\n  launcher: salt\n  logdir: /tmp/a\n",
    );
    write(
        dir.path(),
        "b.yaml",
        "saltpeter_config:\n  api_ws_port: 9001\n  heartbeat_timeout: 30\n  machines_ws_port: nope\n  ws_allowed_origins: https://ui.example\n  api_token: secret\n  api_ws_bind_addr: 0.0.0.0\n  extra_thing: 1\n",
    );
    let config = load(dir.path());
    let s = &config.settings;
    assert!(s.debug);
    assert_eq!(s.api_port, 9001);
    assert_eq!(s.launcher, Launcher::Salt);
    assert_eq!(s.logdir, Path::new("/tmp/a"));
    assert_eq!(s.heartbeat_timeout, Duration::from_secs(30));
    assert_eq!(s.machines_port, 8889);
    assert_eq!(s.ws_allowed_origins, ["https://ui.example"]);
    assert_eq!(s.api_token.as_deref(), Some("secret"));
    assert_eq!(s.api_bind_addr.to_string(), "0.0.0.0");
    assert_eq!(s.extra.get("extra_thing"), Some(&serde_json::json!(1)));
    let e = errors(&config);
    assert_eq!(e.len(), 1, "{e:?}");
    assert!(
        e[0].ends_with(
            "b.yaml:4: saltpeter_config: key \"machines_ws_port\": expected a port number, got \"nope\"; this value is ignored"
        ),
        "{}",
        e[0]
    );
    assert!(
        warnings(&config)
            .iter()
            .any(|w| w.contains("key \"extra_thing\": unknown setting")),
        "{:?}",
        warnings(&config)
    );
}

#[test]
fn a_settings_block_that_is_not_a_mapping_breaks_the_file() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "a.yaml",
        &format!("saltpeter_config: [1]\nj:\n{MINIMAL}"),
    );
    let config = load(dir.path());
    assert!(config.jobs.is_empty());
    assert!(errors(&config)[0].contains("saltpeter_config must be a mapping"));
}

#[test]
fn maintenance_merges_per_key_and_ignores_wrong_types() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "a.yaml",
        "saltpeter_maintenance:\n  global: on\n  machines: [web1, web2]\n",
    );
    write(
        dir.path(),
        "b.yaml",
        "saltpeter_maintenance:\n  machines: [db1]\n  global: sometimes\n",
    );
    let config = load(dir.path());
    assert!(config.maintenance.global);
    assert_eq!(
        config.maintenance.machines.iter().collect::<Vec<_>>(),
        ["db1"]
    );
    assert!(
        warnings(&config)
            .iter()
            .any(|w| w.contains("saltpeter_maintenance: key \"global\"")),
        "{:?}",
        warnings(&config)
    );
    assert!(errors(&config).is_empty());
}

#[test]
fn serial_changes_only_with_the_effective_config() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "jobs.yaml", &format!("j:\n{MINIMAL}"));
    let mut loader = DirLoader::new(dir.path());
    let first = loader.scan(ScanMode::Quick);
    assert_eq!(first.config.serial, 1);
    // Same content rewritten (new mtime): re-read, same hash, nothing changes.
    write(dir.path(), "jobs.yaml", &format!("j:\n{MINIMAL}"));
    let same = loader.scan(ScanMode::Quick);
    assert!(!same.changed);
    assert!(Arc::ptr_eq(&first.config, &same.config));
    // A comment changes the bytes but not the jobs... except their recorded lines.
    write(
        dir.path(),
        "jobs.yaml",
        &format!("j:\n{MINIMAL}# trailing comment\n"),
    );
    assert!(!loader.scan(ScanMode::Full).changed);
    write(
        dir.path(),
        "jobs.yaml",
        &format!("j:\n{MINIMAL}  command: other\n"),
    );
    let changed = loader.scan(ScanMode::Quick);
    assert!(changed.changed);
    assert_eq!(changed.config.serial, 2);
}

#[test]
fn a_missing_directory_is_a_problem_and_keeps_what_was_loaded() {
    let dir = tempfile::tempdir().unwrap();
    let sub = dir.path().join("conf");
    fs::create_dir(&sub).unwrap();
    write(&sub, "jobs.yaml", &format!("j:\n{MINIMAL}"));
    let mut loader = DirLoader::new(&sub);
    assert_eq!(loader.scan(ScanMode::Quick).config.jobs.len(), 1);
    fs::rename(&sub, dir.path().join("moved")).unwrap();
    let out = loader.scan(ScanMode::Quick);
    assert_eq!(out.config.jobs.len(), 1);
    assert!(
        out.config.problems[0]
            .message
            .contains("cannot read the config directory")
    );
    let problems = check_dir(&sub);
    assert!(problems.iter().any(ConfigProblem::is_error));
}

#[test]
fn check_and_next_entry_points() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "jobs.yaml",
        &format!(
            "berlin:\n  min: 30\n  hour: 2\n  dom: '*'\n  mon: '*'\n  dow: '*'\n  timezone: Europe/Berlin\n  targets: x\n  command: y\nbroken:\n{MINIMAL}  hour: 25\n"
        ),
    );
    let problems = check_dir(dir.path());
    assert!(problems.iter().any(|p| p.is_error() && p.line == Some(18)));

    let now = datetime!(2027-03-26 12:00 UTC);
    let lines = next_fire_times(dir.path(), "berlin", 5, now).unwrap();
    assert_eq!(
        lines,
        [
            "2027-03-27T02:30:00+01:00[Europe/Berlin]",
            // 02:30 does not exist on 28 March (clocks go 02:00 -> 03:00).
            "2027-03-28T03:00:00+02:00[Europe/Berlin]",
            "2027-03-29T02:30:00+02:00[Europe/Berlin]",
            "2027-03-30T02:30:00+02:00[Europe/Berlin]",
            "2027-03-31T02:30:00+02:00[Europe/Berlin]",
        ]
    );
    let err = next_fire_times(dir.path(), "broken", 5, now).unwrap_err();
    let text = err.to_string();
    assert!(
        text.starts_with("no job named \"broken\" is loaded"),
        "{text}"
    );
    assert!(text.contains("key \"hour\""), "{text}");
    assert!(next_fire_times(dir.path(), "nothing", 5, now).is_err());
}

#[test]
fn three_hundred_jobs_load() {
    let dir = tempfile::tempdir().unwrap();
    with_sp_wrapper(dir.path());
    write_many_jobs(dir.path(), 300);
    let mut loader = DirLoader::new(dir.path());
    let started = Instant::now();
    let first = loader.scan(ScanMode::Full);
    let first_took = started.elapsed();
    assert_eq!(first.config.jobs.len(), 300);
    assert!(first.config.problems.is_empty());
    // Rescans of an unchanged directory parse nothing and publish nothing.
    let started = Instant::now();
    let quick = loader.scan(ScanMode::Quick);
    let quick_took = started.elapsed();
    let started = Instant::now();
    let full = loader.scan(ScanMode::Full);
    let full_took = started.elapsed();
    assert!(!quick.changed && !full.changed);
    assert!(Arc::ptr_eq(&first.config, &full.config));
    println!(
        "300 jobs: first load {first_took:?}, quick rescan {quick_took:?}, full rescan {full_took:?}"
    );
}

fn write_many_jobs(dir: &Path, n: usize) {
    // Ten files of thirty jobs, like a real fleet's config.
    for file in 0..10 {
        let mut text = String::new();
        for j in 0..n / 10 {
            text.push_str(&format!(
                "job_{file}_{j}:\n  sec: {j}\n  min: '*/{}'\n  hour: '*'\n  dom: '*'\n  mon: '*'\n  dow: '*'\n  targets: 'web{j}'\n  command: 'echo {j}'\n",
                j % 30 + 1
            ));
        }
        write(dir, &format!("group{file}.yaml"), &text);
    }
}

// ---------------------------------------------------------------------------------------------
// Never panics.

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("x.yaml"), &bytes).unwrap();
        let _ = check_dir(dir.path());
    }

    #[test]
    fn yaml_ish_text_never_panics(
        lines in proptest::collection::vec(
            prop_oneof![
                "[a-z_]{1,12}:",
                "  (sec|min|hour|dom|mon|dow|year|targets|command|timeout|env|use_wrapper|allow_overlap|timezone|number_of_targets|batch_size|target_type): [ -~]{0,20}",
                "saltpeter_(config|maintenance):",
                "  (global|machines|debug|api_ws_port|launcher|heartbeat_timeout): [ -~]{0,12}",
                "    - [ -~]{0,10}",
                "    [A-Z]{1,5}: [ -~]{0,10}",
                "[ -~]{0,30}",
            ],
            0..30,
        )
    ) {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("x.yaml"), lines.join("\n")).unwrap();
        let config = load(dir.path());
        for job in config.jobs.values() {
            let _ = job.schedule.next_after(time::OffsetDateTime::now_utc());
            let _ = job.ui_json();
        }
        for p in &config.problems {
            let _ = p.to_string();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Hot reload.

/// Waits up to `limit` for `pred` on the watcher's current config.
async fn wait_for(
    rx: &mut tokio::sync::watch::Receiver<Arc<Config>>,
    limit: Duration,
    pred: impl Fn(&Config) -> bool,
) -> Option<Duration> {
    let start = Instant::now();
    let result = tokio::time::timeout(limit, rx.wait_for(|c| pred(c))).await;
    result.ok().and_then(Result::ok).map(|_| start.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_reload_sees_changes_within_a_second() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "jobs.yaml", &format!("first:\n{MINIMAL}"));
    let watcher = ConfigWatcher::start(dir.path().to_owned(), WatchOptions::default())
        .await
        .unwrap();
    let mut rx = watcher.subscribe();
    assert!(watcher.current().job("first").is_some());
    let serial = watcher.current().serial;

    // A new file.
    write(dir.path(), "more.yaml", &format!("second:\n{MINIMAL}"));
    let took = wait_for(&mut rx, Duration::from_secs(3), |c| {
        c.job("second").is_some()
    })
    .await
    .expect("new file seen");
    println!("new file seen after {took:?}");
    assert!(took < Duration::from_secs(2), "{took:?}");
    assert!(watcher.current().serial > serial);

    // An edit through an atomic rename, as editors and config managers do.
    let tmp = dir.path().join(".jobs.yaml.tmp");
    fs::write(&tmp, format!("renamed:\n{MINIMAL}")).unwrap();
    fs::rename(&tmp, dir.path().join("jobs.yaml")).unwrap();
    let took = wait_for(&mut rx, Duration::from_secs(3), |c| {
        c.job("renamed").is_some() && c.job("first").is_none()
    })
    .await
    .expect("rename seen");
    println!("renamed file seen after {took:?}");

    // A broken edit keeps the last good jobs and publishes the problem.
    write(dir.path(), "jobs.yaml", "renamed: [\n");
    wait_for(&mut rx, Duration::from_secs(3), |c| c.has_errors())
        .await
        .expect("breakage seen");
    assert!(watcher.current().job("renamed").is_some());

    // Deleting a file removes its jobs.
    fs::remove_file(dir.path().join("more.yaml")).unwrap();
    wait_for(&mut rx, Duration::from_secs(3), |c| {
        c.job("second").is_none()
    })
    .await
    .expect("deletion seen");
    assert!(watcher.scans() >= 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_safety_rescan_catches_changes_without_events() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "jobs.yaml", &format!("a:\n{MINIMAL}"));
    let options = WatchOptions {
        safety_rescan: Duration::from_millis(300),
        ..WatchOptions::default()
    };
    let watcher = ConfigWatcher::start(dir.path().to_owned(), options)
        .await
        .unwrap();
    let mut rx = watcher.subscribe();
    // Same size, and the modification time put back: only a content comparison notices.
    let path = dir.path().join("jobs.yaml");
    let mtime = fs::metadata(&path).unwrap().modified().unwrap();
    write(dir.path(), "jobs.yaml", &format!("b:\n{MINIMAL}"));
    fs::File::options()
        .write(true)
        .open(&path)
        .unwrap()
        .set_modified(mtime)
        .unwrap();
    wait_for(&mut rx, Duration::from_secs(3), |c| c.job("b").is_some())
        .await
        .expect("content change seen");
}

/// User plus system CPU time of this process, from /proc/self/stat.
fn process_cpu_time() -> Duration {
    let stat = fs::read_to_string("/proc/self/stat").unwrap();
    // Fields after the command name (which is in parentheses and may contain spaces).
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the full line, 12 and 13 after the name.
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // The kernel's USER_HZ is 100 on Linux.
    Duration::from_millis(ticks * 10)
}

/// 300 jobs, then ten idle seconds: no rescan runs (events only, the safety rescan is 30 s
/// away) and the CPU time used is printed for the record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_watcher_with_300_jobs_does_not_poll() {
    let dir = tempfile::tempdir().unwrap();
    write_many_jobs(dir.path(), 300);
    let watcher = ConfigWatcher::start(dir.path().to_owned(), WatchOptions::default())
        .await
        .unwrap();
    assert_eq!(watcher.current().jobs.len(), 300);
    let serial = watcher.current().serial;

    let cpu_before = process_cpu_time();
    let wall_before = Instant::now();
    tokio::time::sleep(Duration::from_secs(10)).await;
    let cpu = process_cpu_time().saturating_sub(cpu_before);
    let wall = wall_before.elapsed();
    println!(
        "idle watcher, 300 jobs: {:?} CPU in {:?} wall = {:.3}% of one core, {} rescans",
        cpu,
        wall,
        cpu.as_secs_f64() / wall.as_secs_f64() * 100.0,
        watcher.scans()
    );
    assert_eq!(watcher.scans(), 0);
    assert_eq!(watcher.current().serial, serial);
}

#[test]
fn retention_settings_have_defaults_and_reject_zero() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "a.yaml",
        "saltpeter_config:\n  retention_runs_per_job: 7\n  retention_days: 2\n  retention_output_head_bytes: 0\n  retention_output_tail_bytes: 1000\n",
    );
    let config = load(dir.path());
    assert!(errors(&config).is_empty(), "{:?}", errors(&config));
    let s = &config.settings;
    assert_eq!((s.retention_runs_per_job, s.retention_days), (7, 2));
    assert_eq!(
        (s.retention_output_head_bytes, s.retention_output_tail_bytes),
        (0, 1000)
    );
    write(
        dir.path(),
        "a.yaml",
        "saltpeter_config:\n  retention_days: 0\n",
    );
    let config = load(dir.path());
    assert_eq!(
        config.settings.retention_days, 30,
        "an invalid value keeps the default"
    );
    assert!(
        errors(&config).iter().any(|e| e.contains("retention_days")),
        "{:?}",
        errors(&config)
    );
}

#[test]
fn wrappers_that_look_like_the_python_one_are_warned_about_unless_legacy_is_allowed() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "jobs.yaml",
        &format!("j:\n{MINIMAL}  wrapper_path: /opt/sp_wrapper.py\nk:\n{MINIMAL}"),
    );
    // Nothing set: Salt starts the original's default path on the minions.
    let config = Config::load(dir.path());
    let keys: Vec<_> = config
        .problems
        .iter()
        .map(|p| (p.severity, p.job().map(str::to_owned), p.key.clone()))
        .collect();
    assert_eq!(
        keys,
        [
            (Severity::Warning, None, Some("default_wrapper_path".into())),
            (
                Severity::Warning,
                Some("j".into()),
                Some("wrapper_path".into())
            ),
        ],
        "{:?}",
        config.problems
    );
    // A settings file naming a Python default is named in the warning.
    write(
        dir.path(),
        "00-settings.yaml",
        "saltpeter_config:\n  default_wrapper_path: python3 /usr/local/bin/wrapper\n",
    );
    let config = Config::load(dir.path());
    assert!(
        config
            .problems
            .iter()
            .any(|p| p.to_string().starts_with(&format!(
                "{}: warning: saltpeter_config: key \"default_wrapper_path\"",
                dir.path().join("00-settings.yaml").display()
            ))),
        "{:?}",
        config.problems
    );
    // Allowed: no warnings at all.
    write(
        dir.path(),
        "00-settings.yaml",
        "saltpeter_config:\n  allow_legacy_wrappers: true\n",
    );
    assert!(Config::load(dir.path()).problems.is_empty());
}

#[test]
fn an_empty_user_is_an_error_and_check_names_unknown_local_users_and_an_open_api() {
    let dir = tempfile::tempdir().unwrap();
    with_sp_wrapper(dir.path());
    write(
        dir.path(),
        "jobs.yaml",
        &format!(
            "empty:\n{MINIMAL}  user: ''\nspaced:\n{MINIMAL}  user: 'a b'\nghost:\n{MINIMAL}  user: no-such-user-here\n"
        ),
    );
    let config = load(dir.path());
    assert!(config.job("empty").is_none() && config.job("spaced").is_none());
    assert!(
        errors(&config)
            .iter()
            .any(|e| e.contains("job \"empty\": key \"user\": the user is empty")),
        "{:?}",
        errors(&config)
    );
    // With Salt the minion judges the user; on this host nothing is said.
    let problems = check_dir(dir.path());
    assert!(!problems.iter().any(|p| p.job() == Some("ghost")));
    // The local launcher runs jobs here, so an unknown user fails check.
    write(
        dir.path(),
        "01-local.yaml",
        "saltpeter_config:\n  launcher: local\n  api_ws_bind_addr: 0.0.0.0\n",
    );
    let problems: Vec<String> = check_dir(dir.path())
        .iter()
        .filter(|p| p.is_error())
        .map(ToString::to_string)
        .collect();
    assert!(
        problems
            .iter()
            .any(|p| p.contains("job \"ghost\": key \"user\": no user \"no-such-user-here\"")),
        "{problems:?}"
    );
    assert!(
        problems.iter().any(|p| p.contains("without api_token")),
        "{problems:?}"
    );
    write(
        dir.path(),
        "02-allow.yaml",
        "saltpeter_config:\n  allow_unauthenticated_api: true\n",
    );
    assert!(
        !check_dir(dir.path())
            .iter()
            .any(|p| p.to_string().contains("without api_token"))
    );
}

#[test]
fn a_linked_file_from_outside_is_read_but_never_quoted() {
    let outside = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    with_sp_wrapper(dir.path());
    let secret = format!("j:\n{MINIMAL}  timeout: TOPSECRET-VALUE\nok:\n{MINIMAL}");
    write(outside.path(), "secret.yaml", &secret);
    std::os::unix::fs::symlink(
        outside.path().join("secret.yaml"),
        dir.path().join("linked.yaml"),
    )
    .unwrap();
    let config = load(dir.path());
    assert!(config.job("ok").is_some(), "a linked file is still read");
    let text: Vec<String> = check_dir(dir.path())
        .iter()
        .map(ToString::to_string)
        .collect();
    assert!(!text.is_empty());
    assert!(
        text.iter()
            .all(|t| !t.contains("TOPSECRET") && !t.contains("timeout")),
        "{text:?}"
    );
    assert!(
        text.iter()
            .any(|t| t.contains("linked.yaml:") && t.contains("details are not shown")),
        "{text:?}"
    );
    // A broken linked file is withheld too.
    write(outside.path(), "secret.yaml", "password: [TOPSECRET\n");
    let text: Vec<String> = check_dir(dir.path())
        .iter()
        .map(ToString::to_string)
        .collect();
    assert!(text.iter().all(|t| !t.contains("TOPSECRET")), "{text:?}");
    // A link inside the directory (a ConfigMap's `..data`) is the operator's own file.
    fs::remove_file(dir.path().join("linked.yaml")).unwrap();
    fs::create_dir(dir.path().join("..data")).unwrap();
    write(&dir.path().join("..data"), "inner.yaml", &secret);
    std::os::unix::fs::symlink("..data/inner.yaml", dir.path().join("inner.yaml")).unwrap();
    let text: Vec<String> = check_dir(dir.path())
        .iter()
        .map(ToString::to_string)
        .collect();
    assert!(
        text.iter().any(|t| t.contains("TOPSECRET-VALUE")),
        "{text:?}"
    );
}

#[test]
fn connection_limits_have_defaults_parse_and_reject_zero() {
    use std::time::Duration;
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "a.yaml", "saltpeter_config:\n  debug: false\n");
    let s = load(dir.path()).settings;
    assert_eq!(s.handshake_timeout, Duration::from_secs(10));
    assert_eq!(s.http_header_timeout, Duration::from_secs(10));
    assert_eq!(
        (s.max_pending_connections, s.max_pending_connections_per_ip),
        (2048, 256)
    );
    assert_eq!(s.ui_idle_timeout, Duration::from_secs(600));
    assert_eq!(s.fd_reserve, None);
    write(
        dir.path(),
        "a.yaml",
        "saltpeter_config:\n  handshake_timeout: 2\n  http_header_timeout: 3\n  \
         max_pending_connections: 40\n  max_pending_connections_per_ip: 4\n  \
         ui_idle_timeout: 60\n  fd_reserve: 0\n",
    );
    let config = load(dir.path());
    assert!(errors(&config).is_empty(), "{:?}", errors(&config));
    let s = &config.settings;
    assert_eq!(s.handshake_timeout, Duration::from_secs(2));
    assert_eq!(s.http_header_timeout, Duration::from_secs(3));
    assert_eq!(
        (s.max_pending_connections, s.max_pending_connections_per_ip),
        (40, 4)
    );
    assert_eq!(s.ui_idle_timeout, Duration::from_secs(60));
    assert_eq!(s.fd_reserve, Some(0));
    write(
        dir.path(),
        "a.yaml",
        "saltpeter_config:\n  handshake_timeout: 0\n  max_pending_connections_per_ip: 0\n  \
         fd_reserve: lots\n  ui_idle_timeout: 99999999999\n",
    );
    let config = load(dir.path());
    let s = &config.settings;
    assert_eq!(s.handshake_timeout, Duration::from_secs(10));
    assert_eq!(s.max_pending_connections_per_ip, 256);
    assert_eq!(s.fd_reserve, None);
    for key in [
        "handshake_timeout",
        "max_pending_connections_per_ip",
        "fd_reserve",
    ] {
        assert!(
            errors(&config).iter().any(|e| e.contains(key)),
            "no error for {key}: {:?}",
            errors(&config)
        );
    }
}

#[test]
fn cluster_api_url_takes_an_http_url_and_names_a_bad_one() {
    let dir = tempfile::tempdir().unwrap();
    with_sp_wrapper(dir.path());
    write(
        dir.path(),
        "a.yaml",
        "saltpeter_config:\n  cluster_api_url: 'https://cron-a.example.net:8888/'\n",
    );
    let config = load(dir.path());
    assert!(errors(&config).is_empty(), "{:?}", errors(&config));
    assert_eq!(
        config.settings.cluster_api_url.as_deref(),
        Some("https://cron-a.example.net:8888")
    );
    for bad in ["ftp://cron-a:8888", "https://", "http://a b:1", "8888"] {
        write(
            dir.path(),
            "a.yaml",
            &format!("saltpeter_config:\n  cluster_api_url: '{bad}'\n"),
        );
        let config = load(dir.path());
        let errors = errors(&config);
        assert!(
            errors.iter().any(|e| e.contains("cluster_api_url")),
            "{bad}: {errors:?}"
        );
        assert_eq!(config.settings.cluster_api_url, None, "{bad}");
    }
}
