//! What the master refuses or honours at start-up: an API open to the network without a
//! token, and a default wrapper the operator named for the local launcher.

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

use std::path::Path;
use std::sync::Arc;

use saltpeter_config::Config;
use saltpeter_engine::launch::local::LocalLauncher;
use saltpeter_engine::launch::{Launcher, StartRequest};
use saltpeter_master::server::{self, Options, StartError};
use tokio::net::TcpListener;

fn config_dir(dir: &Path, settings: &str) -> std::path::PathBuf {
    let conf = dir.join("conf");
    std::fs::create_dir_all(&conf).unwrap();
    std::fs::write(
        conf.join("settings.yaml"),
        format!(
            "saltpeter_config:\n  launcher: local\n  logdir: {0}/log\n  data_dir: {0}/data\n{settings}",
            dir.display()
        ),
    )
    .unwrap();
    conf
}

async fn start(conf: std::path::PathBuf) -> Result<server::Running, StartError> {
    server::start(Options {
        config_dir: conf,
        machines_listener: Some(TcpListener::bind("127.0.0.1:0").await.unwrap()),
        api_listener: Some(TcpListener::bind("127.0.0.1:0").await.unwrap()),
        ..Options::default()
    })
    .await
}

#[tokio::test]
async fn an_api_beyond_loopback_without_a_token_is_refused_unless_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let conf = config_dir(dir.path(), "  api_ws_bind_addr: 0.0.0.0\n");
    match start(conf).await {
        Err(StartError::Config(why)) => assert!(why.contains("without api_token"), "{why}"),
        Err(other) => panic!("refused for another reason: {other}"),
        Ok(_) => panic!("an open API must be refused"),
    }
    for extra in [
        "  api_token: secret\n",
        "  allow_unauthenticated_api: true\n",
    ] {
        let dir = tempfile::tempdir().unwrap();
        let conf = config_dir(dir.path(), &format!("  api_ws_bind_addr: 0.0.0.0\n{extra}"));
        let running = start(conf).await.unwrap();
        running.stop().await;
    }
}

#[tokio::test]
async fn the_local_launcher_runs_the_wrapper_the_settings_name() {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("ran");
    let script = dir.path().join("my-wrapper");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\necho \"$SP_MACHINE_ID\" > '{}'\n",
            marker.display()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let conf = config_dir(
        dir.path(),
        &format!("  default_wrapper_path: '{}'\n", script.display()),
    );
    std::fs::write(
        conf.join("jobs.yaml"),
        "j:\n  sec: 0\n  min: 0\n  hour: 0\n  dom: 1\n  mon: 1\n  dow: '*'\n  year: 2099\n  targets: [m1]\n  target_type: list\n  command: 'true'\n",
    )
    .unwrap();
    let config = Config::load(&conf);
    let job = config.job("j").unwrap().clone();
    // An sp-wrapper "beside sp-master" that must not be used when the settings name another.
    let launcher = LocalLauncher {
        default_wrapper: Some("/nonexistent/sp-wrapper".into()),
        lock_dir: Some(dir.path().join("locks")),
    };
    let outcome = launcher
        .start(StartRequest {
            job: Arc::clone(&job),
            instance: "j_1".into(),
            machines: vec!["m1".into()],
            env: Vec::new(),
            tokens: Default::default(),
            wrapper_path: job
                .wrapper_path
                .clone()
                .or_else(|| config.settings.default_wrapper_path.clone()),
        })
        .await;
    assert_eq!(outcome, [("m1".to_owned(), Ok(()))]);
    assert_eq!(std::fs::read_to_string(&marker).unwrap(), "m1\n");
}

/// The real binary: `log_format: json` makes every line of its log one JSON object (without
/// colour codes), and SIGTERM ends it with exit 0.
#[test]
fn json_logs_and_a_clean_exit_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let conf = config_dir(
        dir.path(),
        "  log_format: json\n  api_ws_port: 0\n  machines_ws_bind_addr: 127.0.0.1\n  machines_ws_port: 0\n",
    );
    let ready = dir.path().join("ready.json");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_sp-master"))
        .arg("-c")
        .arg(&conf)
        .arg("--ready-file")
        .arg(&ready)
        .env_remove("RUST_LOG")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !ready.exists() {
        assert!(std::time::Instant::now() < deadline, "not ready in 30 s");
        assert!(
            child.try_wait().unwrap().is_none(),
            "sp-master exited early"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "exit {:?}", out.status);
    let log = String::from_utf8(out.stderr).unwrap();
    let lines: Vec<&str> = log.lines().collect();
    assert!(lines.len() >= 3, "status {:?}, log: {log:?}", out.status);
    for line in &lines {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(v["fields"]["message"].is_string(), "{line}");
        assert!(!line.contains('\u{1b}'), "colour codes in {line}");
    }
    assert!(log.contains("Saltpeter master ready."));
    assert!(log.contains("Engine stopped; store committed, job log written."));
}
