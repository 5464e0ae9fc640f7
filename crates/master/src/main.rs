//! `sp-master`: the command line. Serving is the default; the other subcommands help people
//! trust their configuration before it runs.

mod sys;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use saltpeter_master::server::{self, Options};

/// mimalloc rather than glibc's allocator: at 10,000 wrappers glibc's `malloc`, `free` and
/// their chunk consolidation took ~11% of the master's CPU, every message allocating a few
/// short-lived strings on one thread and freeing them on another (issue 7).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `sp-master --version`: the package version and the git commit of the build (`build.rs`).
const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), " (", env!("SP_GIT_COMMIT"), ")");

#[derive(Debug, Parser)]
#[command(
    name = "sp-master",
    version = VERSION,
    about = "Distributed cron for SaltStack fleets"
)]
struct Cli {
    /// Directory of YAML job files.
    #[arg(
        short = 'c',
        long = "configdir",
        global = true,
        default_value = "/etc/saltpeter"
    )]
    config_dir: PathBuf,
    /// Write the bound addresses as JSON to this file once ready (for scripts and tests).
    #[arg(long, global = true)]
    ready_file: Option<PathBuf>,
    /// The API of the running master, for status, run, kill and logs.
    #[arg(long, global = true, default_value = "http://127.0.0.1:8888")]
    api: String,
    /// Bearer token for the API (its `api_token`).
    #[arg(long, global = true, env = "SP_API_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Print JSON for scripts instead of text for people.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the master (the default).
    Serve,
    /// Print the next fire times of a job.
    Next {
        job: String,
        /// How many times to print.
        #[arg(short = 'n', long, default_value_t = 5)]
        count: usize,
    },
    /// Validate a configuration directory without starting anything.
    Check,
    /// Run the embedded default configuration: a job on two simulated local machines.
    Demo,
    /// Show every job of a running master: schedule, next and last run, result, running.
    Status,
    /// Start a run of a job now.
    Run {
        job: String,
        /// Stream the output until the run ends; exit with a code reflecting the result.
        #[arg(short, long)]
        follow: bool,
    },
    /// Kill a run (or every running instance of a job), or one machine of it.
    Kill {
        /// A job name or a run instance.
        target: String,
        #[arg(short, long)]
        machine: Option<String>,
    },
    /// Print the output the master holds for a run.
    Logs {
        instance: String,
        #[arg(short, long)]
        machine: Option<String>,
    },
    /// For every minion Salt knows: the installed sp-wrapper's version and architecture, and
    /// whether it can reach this master's machines port.
    Fleet {
        /// Salt's target (a glob) for the minions to look at.
        #[arg(long, default_value = "*")]
        target: String,
        /// Salt's timeout for each query, in seconds.
        #[arg(short = 't', long, default_value_t = 20)]
        timeout: u64,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("sp-master: {error:#}");
            ExitCode::from(2)
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    let api = || saltpeter_master::cli::Client::new(&cli.api, cli.token.clone());
    let code = |c: u8| Ok(ExitCode::from(c));
    match cli.command.unwrap_or(Command::Serve) {
        Command::Status => code(saltpeter_master::cli::status(&api()?, cli.json)?),
        Command::Run { job, follow } => {
            code(saltpeter_master::cli::run(&api()?, &job, follow, cli.json)?)
        }
        Command::Kill { target, machine } => code(saltpeter_master::cli::kill(
            &api()?,
            &target,
            machine.as_deref(),
            cli.json,
        )?),
        Command::Logs { instance, machine } => code(saltpeter_master::cli::logs(
            &api()?,
            &instance,
            machine.as_deref(),
            cli.json,
        )?),
        Command::Fleet { target, timeout } => code(saltpeter_master::cli::fleet::fleet(
            &cli.config_dir,
            &saltpeter_master::cli::fleet::MasterVersion {
                version: env!("CARGO_PKG_VERSION").to_owned(),
                commit: env!("SP_GIT_COMMIT").to_owned(),
            },
            &saltpeter_master::cli::fleet::FleetOptions {
                target,
                timeout: std::time::Duration::from_secs(timeout),
                json: cli.json,
            },
        )?),
        Command::Serve => serve(cli.config_dir, cli.ready_file),
        Command::Next { job, count } => {
            let lines = saltpeter_master::config::next_fire_times(
                &cli.config_dir,
                &job,
                count,
                time::OffsetDateTime::now_utc(),
            )?;
            for line in lines {
                println!("{line}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Check => {
            let problems = saltpeter_master::config::check_dir(&cli.config_dir);
            let errors = problems.iter().filter(|p| p.is_error()).count();
            for p in &problems {
                eprintln!("{p}");
            }
            if errors > 0 {
                eprintln!("{errors} error(s) in {}", cli.config_dir.display());
                return Ok(ExitCode::FAILURE);
            }
            println!("{}: OK", cli.config_dir.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Demo => {
            let dir = std::env::temp_dir().join(format!("saltpeter-demo-{}", std::process::id()));
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            let yaml = include_str!("../demo/demo.yaml").replace("@DIR@", &dir.to_string_lossy());
            std::fs::write(dir.join("demo.yaml"), yaml)?;
            println!(
                "Demo configuration in {}; API on http://127.0.0.1:8888/",
                dir.display()
            );
            serve(dir, cli.ready_file)
        }
    }
}

/// How much lower the runtime's threads run than the master's single-threaded stages.
const CONNECTION_THREAD_NICE: i32 = 5;

fn serve(config_dir: PathBuf, ready_file: Option<PathBuf>) -> Result<ExitCode> {
    let log_level = init_tracing();
    raise_fd_limit();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("sp-master")
        // The runtime's threads read and write thousands of sockets; the engine, store,
        // checkpoint and job-log threads (started from this, the main thread, at their own
        // priority) each serve every connection at once. When the cores are short, finishing
        // work already taken in goes first: a store thread preempted for 88 ms held every ack
        // for that long (issue 7).
        .on_thread_start(|| sys::lower_this_thread_priority(CONNECTION_THREAD_NICE))
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        let running = server::start(Options {
            config_dir,
            ..Options::default()
        })
        .await?;
        if let Some(switch) = log_level {
            let mut config = running.config.clone();
            tokio::spawn(async move {
                let mut debug = None;
                loop {
                    let now = config.borrow_and_update().settings.debug;
                    if debug != Some(now) {
                        switch(now);
                        debug = Some(now);
                    }
                    if config.changed().await.is_err() {
                        break;
                    }
                }
            });
        }
        if let Some(path) = ready_file {
            let ready = serde_json::json!({
                "machines": running.machines_addr.to_string(),
                "api": running.api_addr.to_string(),
                "pid": std::process::id(),
            });
            std::fs::write(&path, ready.to_string())
                .with_context(|| format!("writing {}", path.display()))?;
        }
        serve_signals(&running.watcher).await;
        tracing::info!("Shutting down: no new connections; finishing what the engine holds.");
        running.stop().await;
        tracing::info!("Stopped.");
        Ok(ExitCode::SUCCESS)
    })
}

/// Every wrapper holds a socket open for its whole run, so a fleet needs far more descriptors
/// than the usual soft limit of 1024: raise the soft limit to the hard limit (never above it,
/// so no privilege is needed). Failing only costs capacity, so it is logged, not fatal.
fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => {
            if let Err(error) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                tracing::warn!(%error, soft, hard, "Could not raise the open-file limit.");
            }
        }
        Ok(_) => {}
        Err(error) => tracing::warn!(%error, "Could not read the open-file limit."),
    }
}

/// Switches between `info` and `debug` logging; `None` when `RUST_LOG` fixes the level.
type LogLevelSwitch = Option<Box<dyn Fn(bool) + Send + Sync>>;

/// Logs to stderr. Without `RUST_LOG`, the level follows the config's `debug` key (reloaded
/// with the config, as the original's debug flag was).
fn init_tracing() -> LogLevelSwitch {
    use tracing_subscriber::prelude::*;
    use tracing_subscriber::{EnvFilter, fmt, reload};
    if let Ok(filter) = EnvFilter::try_from_default_env() {
        tracing_subscriber::registry()
            .with(filter)
            .with(fmt::layer().with_target(false))
            .init();
        return None;
    }
    let (filter, handle) = reload::Layer::new(EnvFilter::new("info"));
    tracing_subscriber::registry()
        .with(filter)
        .with(fmt::layer().with_target(false))
        .init();
    Some(Box::new(move |debug| {
        let level = if debug {
            "info,saltpeter_master=debug"
        } else {
            "info"
        };
        // Only fails if the subscriber is gone, at which point nothing logs anyway.
        let _ = handle.modify(|f| *f = EnvFilter::new(level));
    }))
}

/// Waits for SIGTERM (systemd's stop) or SIGINT (Ctrl-C); SIGHUP rereads the config at once
/// and goes on waiting. Without a handler SIGHUP would end the process with no log line, which
/// systemd does not count as a failure.
async fn serve_signals(watcher: &saltpeter_master::config::ConfigWatcher) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) else {
        tracing::error!("Cannot install signal handlers; stop the master with SIGKILL.");
        std::future::pending::<()>().await;
        return;
    };
    loop {
        tokio::select! {
            _ = term.recv() => {
                tracing::info!("SIGTERM received.");
                return;
            }
            _ = int.recv() => {
                tracing::info!("SIGINT received.");
                return;
            }
            _ = hup.recv() => {
                tracing::info!("SIGHUP received: rereading the config directory.");
                watcher.reload_now();
            }
        }
    }
}
