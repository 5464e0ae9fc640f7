//! How the engine uses what a launcher reports, under tokio's paused clock: legacy mode
//! (`use_wrapper: false`) results from `Launcher::run_direct`, and a resolution in which every
//! target is down. The launcher here is scripted per test; no Salt, no sockets, no processes.

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

use std::sync::Arc;
use std::time::Duration;

use saltpeter_config::{Config, JobSpec};
use saltpeter_engine::Clock;
use saltpeter_engine::launch::{
    BoxFuture, DirectOutcome, DirectResult, Launcher, Resolution, StartOutcome, StartRequest,
};
use saltpeter_engine::{ApiRequest, Engine, EngineHandle, EngineParts, StoreParts};
use saltpeter_joblog::JobLog;
use saltpeter_store::Store;
use serde_json::Value;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

const SEC: Duration = Duration::from_secs(1);

/// Every target is up unless `down` is set; direct runs take `direct_after`, then exit 3.
#[derive(Debug, Default)]
struct Scripted {
    down: bool,
    direct_after: Duration,
}

impl Launcher for Scripted {
    fn resolve(&self, job: Arc<JobSpec>) -> BoxFuture<Resolution> {
        let names = job.targets.names();
        let down = self.down;
        Box::pin(async move {
            if down {
                Resolution {
                    down: names
                        .into_iter()
                        .map(|n| (n, "Target did not respond\n".to_owned()))
                        .collect(),
                    ..Resolution::default()
                }
            } else {
                Resolution {
                    up: names,
                    ..Resolution::default()
                }
            }
        })
    }

    fn start(&self, request: StartRequest) -> BoxFuture<StartOutcome> {
        let outcome = request.machines.into_iter().map(|m| (m, Ok(()))).collect();
        Box::pin(async move { outcome })
    }

    fn run_direct(&self, request: StartRequest) -> BoxFuture<DirectOutcome> {
        let after = self.direct_after;
        Box::pin(async move {
            tokio::time::sleep(after).await;
            request
                .machines
                .into_iter()
                .map(|m| {
                    let output = format!("ran {} on {m}\n", request.job.command);
                    (m, Ok(DirectResult { retcode: 3, output }))
                })
                .collect()
        })
    }
}

struct Running {
    engine: EngineHandle,
    _dir: tempfile::TempDir,
    _config: watch::Sender<Arc<Config>>,
    shutdown: CancellationToken,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

async fn start(launcher: Scripted, jobs: &str) -> Running {
    start_dyn(Arc::new(launcher), jobs).await
}

fn job(name: &str, extra: &str) -> String {
    format!(
        "{name}:\n  sec: 0\n  min: 0\n  hour: 0\n  dom: 1\n  mon: 1\n  dow: '*'\n  year: 2099\n  \
         targets: [m1, m2]\n  target_type: list\n  command: work\n{extra}"
    )
}

impl Running {
    async fn run(&self, job: &str) -> String {
        let job = job.to_owned();
        let r = self
            .engine
            .ask(|reply| ApiRequest::RunNow {
                job,
                by: saltpeter_store::audit::Actor::remote("tester", None),
                reply,
            })
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(1)).await;
        r.unwrap()
    }

    async fn view(&self, instance: &str) -> Value {
        let instance = instance.to_owned();
        let view = self
            .engine
            .ask(|reply| ApiRequest::GetRun { instance, reply })
            .await
            .unwrap();
        serde_json::to_value(view.expect("no such run")).unwrap()
    }
}

#[tokio::test(start_paused = true)]
async fn legacy_mode_waits_for_the_command_without_startup_or_heartbeat_verdicts() {
    let launcher = Scripted {
        direct_after: 100 * SEC,
        ..Scripted::default()
    };
    let r = start(
        launcher,
        &job("legacy", "  use_wrapper: false\n  timeout: 0\n"),
    )
    .await;
    let instance = r.run("legacy").await;
    // Past the 30 s start-up window and any heartbeat timeout: still running, no 254 or 253.
    tokio::time::sleep(99 * SEC).await;
    let run = r.view(&instance).await;
    assert_eq!(run["machines"]["m1"]["status"], "running", "{run}");
    assert!(run["machines"]["m1"]["retcode"].is_null(), "{run}");
    tokio::time::sleep(2 * SEC).await;
    let run = r.view(&instance).await;
    for m in ["m1", "m2"] {
        let mach = &run["machines"][m];
        assert_eq!(mach["retcode"], 3, "{run}");
        assert_eq!(mach["cause"], "exit");
        assert_eq!(mach["output"], format!("ran work on {m}\n"));
        assert!(mach["last_heartbeat"].is_null());
    }
    assert!(run["ended"].is_string() && run["success"] == false, "{run}");
}

#[tokio::test(start_paused = true)]
async fn legacy_mode_still_obeys_the_timeout() {
    let launcher = Scripted {
        direct_after: 1000 * SEC,
        ..Scripted::default()
    };
    let r = start(
        launcher,
        &job("slow", "  use_wrapper: false\n  timeout: 10\n"),
    )
    .await;
    let instance = r.run("slow").await;
    // timeout + 30 s grace, as for wrappers.
    tokio::time::sleep(41 * SEC).await;
    let run = r.view(&instance).await;
    assert_eq!(run["machines"]["m1"]["retcode"], 124, "{run}");
    // The late result does not overwrite the verdict.
    tokio::time::sleep(1000 * SEC).await;
    assert_eq!(r.view(&instance).await["machines"]["m2"]["retcode"], 124);
}

#[tokio::test(start_paused = true)]
async fn a_launcher_without_legacy_mode_fails_each_machine_with_255_and_the_reason() {
    /// Only the trait's defaults beyond resolve and start.
    #[derive(Debug)]
    struct NoDirect;
    impl Launcher for NoDirect {
        fn resolve(&self, job: Arc<JobSpec>) -> BoxFuture<Resolution> {
            let up = job.targets.names();
            Box::pin(async move {
                Resolution {
                    up,
                    ..Resolution::default()
                }
            })
        }
        fn start(&self, request: StartRequest) -> BoxFuture<StartOutcome> {
            let outcome = request.machines.into_iter().map(|m| (m, Ok(()))).collect();
            Box::pin(async move { outcome })
        }
    }
    let r = start_dyn(Arc::new(NoDirect), &job("legacy", "  use_wrapper: false\n")).await;
    let instance = r.run("legacy").await;
    tokio::time::sleep(SEC).await;
    let run = r.view(&instance).await;
    for m in ["m1", "m2"] {
        assert_eq!(run["machines"][m]["retcode"], 255, "{run}");
        let output = run["machines"][m]["output"].as_str().unwrap();
        assert!(
            output.starts_with("Target did not return anything - this launcher cannot run"),
            "{output}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn when_every_target_is_down_every_one_gets_its_255() {
    let launcher = Scripted {
        down: true,
        ..Scripted::default()
    };
    let r = start(launcher, &job("gone", "")).await;
    let instance = r.run("gone").await;
    tokio::time::sleep(SEC).await;
    let run = r.view(&instance).await;
    for m in ["m1", "m2"] {
        assert_eq!(run["machines"][m]["retcode"], 255, "{run}");
        assert_eq!(run["machines"][m]["cause"], "no_response");
        assert_eq!(run["machines"][m]["output"], "Target did not respond\n");
    }
    assert!(run["ended"].is_string() && run["success"] == false, "{run}");
}

async fn start_dyn(launcher: Arc<dyn Launcher>, jobs: &str) -> Running {
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("conf");
    std::fs::create_dir_all(&conf).unwrap();
    let settings = format!(
        "saltpeter_config:\n  logdir: {0}/log\n  data_dir: {0}/data\n",
        dir.path().display()
    );
    std::fs::write(conf.join("00-settings.yaml"), settings).unwrap();
    std::fs::write(conf.join("jobs.yaml"), jobs).unwrap();
    let config = Config::load(&conf);
    assert!(!config.has_errors(), "{:?}", config.problems);
    let (config_tx, config_rx) = watch::channel(Arc::new(config));
    let shutdown = CancellationToken::new();
    let (store, restored) = Store::inline_memory().unwrap();
    let (engine, handle) = Engine::new(EngineParts {
        config: config_rx,
        launcher,
        joblog: JobLog::start(dir.path().join("spool")).unwrap(),
        clock: Clock::paused(time::macros::datetime!(2026-06-01 12:00 UTC)),
        machines_url: "ws://127.0.0.1:1".into(),
        wrapper_env: Vec::new(),
        shutdown: shutdown.clone(),
        store: StoreParts::Ready(store, restored),
        cluster: None,
    })
    .unwrap();
    tokio::spawn(engine.run());
    Running {
        engine: handle,
        _dir: dir,
        _config: config_tx,
        shutdown,
    }
}
