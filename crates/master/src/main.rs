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
/// short-lived strings on one thread and freeing them on another.
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
    /// CA file (PEM) to verify an `https://` API with. Without it the CLI trusts the master's
    /// own certificate when the configuration directory names one (`tls_cert`, else the
    /// self-signed `<data_dir>/tls/cert.pem`), else the system's roots.
    #[arg(long, global = true, env = "SP_CA")]
    ca: Option<PathBuf>,
    /// Bearer token for the API (one of `api_tokens`, or `api_token`).
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
        /// Stream the output until the run ends; exit 0 when every machine returned 0, 3 when
        /// the run failed (each machine's code is printed).
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
    /// Show the audit trail, newest first: runs started by hand, kills, configuration and
    /// maintenance changes, with who and from where (needs an admin token).
    Audit {
        /// How many entries to show (default 100).
        #[arg(short = 'n', long)]
        limit: Option<usize>,
    },
    /// Manage API tokens.
    Token {
        #[command(subcommand)]
        action: TokenCommand,
    },
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Make a new token: prints the token once, and the line to add to `api_tokens`.
    New {
        /// Who holds the token; appears in the audit trail and the job log.
        #[arg(long)]
        name: String,
        /// viewer (read), operator (also run and kill) or admin (also the audit trail).
        #[arg(long, default_value = "viewer")]
        role: String,
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
    let api = || -> Result<saltpeter_http::Client> {
        let ca = match &cli.ca {
            Some(ca) => Some(ca.clone()),
            None if cli.api.starts_with("https://") => {
                saltpeter_master::cli::masters_certificate(&cli.config_dir)
            }
            None => None,
        };
        Ok(saltpeter_http::Client::new(&cli.api, cli.token.clone())?.with_ca(ca.as_deref())?)
    };
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
        Command::Audit { limit } => code(saltpeter_master::cli::audit(&api()?, limit, cli.json)?),
        Command::Token {
            action: TokenCommand::New { name, role },
        } => new_token(&name, &role, cli.json),
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
            let lines = saltpeter_config::next_fire_times(
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
            let problems = saltpeter_config::check_dir(&cli.config_dir);
            let errors = problems.iter().filter(|p| p.is_error()).count();
            for p in &problems {
                eprintln!("{p}");
            }
            if errors > 0 {
                eprintln!("{errors} error(s) in {}", cli.config_dir.display());
                return Ok(ExitCode::FAILURE);
            }
            let settings = saltpeter_config::Config::load(&cli.config_dir).settings;
            match &settings.store {
                None => println!(
                    "store: SQLite, {}",
                    settings.data_dir.join("saltpeter.db").display()
                ),
                Some(url) => match saltpeter_store_postgres::PostgresUrl::parse(url.expose()) {
                    Ok(parsed) => println!("store: PostgreSQL, {}", parsed.redacted()),
                    Err(e) => {
                        eprintln!("store: {e}");
                        return Ok(ExitCode::FAILURE);
                    }
                },
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

/// `sp-master token new`: the token goes to stdout once; only its hash goes into the config.
fn new_token(name: &str, role: &str, json: bool) -> Result<ExitCode> {
    use saltpeter_config::access;
    access::check_name(name).map_err(anyhow::Error::msg)?;
    let role = saltpeter_config::Role::parse(role)
        .with_context(|| format!("--role must be viewer, operator or admin, not {role:?}"))?;
    let token = access::new_token();
    let entry = access::config_entry(name, role, &token);
    if json {
        let out = serde_json::json!({
            "name": name,
            "role": role.as_str(),
            "token": token,
            "sha256": access::hex(&access::hash_token(&token)),
        });
        println!("{out}");
    } else {
        println!("token:  {token}");
        println!("Give the token to {name}; it is shown only this once. Add this entry to");
        println!("api_tokens in saltpeter_config (the master reloads it by itself):");
        println!();
        println!("  api_tokens:");
        println!("    - {entry}");
    }
    Ok(ExitCode::SUCCESS)
}

/// How much lower the runtime's threads run than the master's single-threaded stages.
const CONNECTION_THREAD_NICE: i32 = 5;

fn serve(config_dir: PathBuf, ready_file: Option<PathBuf>) -> Result<ExitCode> {
    // The format is chosen once, before anything logs: read the settings now (the watcher
    // reads them again at start and logs their problems).
    let format = saltpeter_config::Config::load(&config_dir)
        .settings
        .log_format;
    let log_level = init_tracing(format);
    raise_fd_limit();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("sp-master")
        // The runtime's threads read and write thousands of sockets; the engine, store,
        // checkpoint and job-log threads (started from this, the main thread, at their own
        // priority) each serve every connection at once. When the cores are short, finishing
        // work already taken in goes first: a store thread preempted for 88 ms held every ack
        // for that long.
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
        serve_signals(&running.watcher, &running.engine).await;
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

use saltpeter_config::settings::LogFormat;

/// Switches between `info` and `debug` logging; `None` when `RUST_LOG` fixes the level.
type LogLevelSwitch = Option<Box<dyn Fn(bool) + Send + Sync>>;

/// Logs to stderr. Without `RUST_LOG`, the level follows the config's `debug` key (reloaded
/// with the config, as the original's debug flag was).
fn init_tracing(format: LogFormat) -> LogLevelSwitch {
    use tracing_subscriber::prelude::*;
    use tracing_subscriber::{EnvFilter, reload};
    // Colour codes only for a person at a terminal: in journald or a log file they are noise.
    let colour = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none();
    if let Ok(filter) = EnvFilter::try_from_default_env() {
        tracing_subscriber::registry()
            .with(filter)
            .with(log_layer(format, colour))
            .init();
        return None;
    }
    let (filter, handle) = reload::Layer::new(EnvFilter::new("info"));
    tracing_subscriber::registry()
        .with(filter)
        .with(log_layer(format, colour))
        .init();
    Some(Box::new(move |debug| {
        let level = if debug { DEBUG_FILTER } else { "info" };
        // Only fails if the subscriber is gone, at which point nothing logs anyway.
        let _ = handle.modify(|f| *f = EnvFilter::new(level));
    }))
}

/// `debug: true` turns on debug logs of every crate of the master (each logs under its own
/// target), and only info from the libraries underneath.
const DEBUG_FILTER: &str = "info,saltpeter_master=debug,saltpeter_config=debug,\
     saltpeter_store=debug,saltpeter_joblog=debug,saltpeter_engine=debug,saltpeter_web=debug,\
     saltpeter_http=debug,saltpeter_files=debug,saltpeter_metrics=debug";

/// The output layer for `format`: JSON objects one per line for log shippers, or text for
/// people (in colour only at a terminal). Both write to stderr.
fn log_layer<S>(
    format: LogFormat,
    colour: bool,
) -> Box<dyn tracing_subscriber::Layer<S> + Send + Sync>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    use tracing_subscriber::{Layer, fmt};
    match format {
        LogFormat::Text => fmt::layer()
            .with_writer(std::io::stderr)
            .with_target(false)
            .with_ansi(colour)
            .boxed(),
        LogFormat::Json => fmt::layer()
            .json()
            .with_writer(std::io::stderr)
            .with_target(false)
            .with_ansi(false)
            .boxed(),
    }
}

/// Waits for SIGTERM (systemd's stop) or SIGINT (Ctrl-C); SIGHUP rereads the config at once
/// and goes on waiting. Without a handler SIGHUP would end the process with no log line, which
/// systemd does not count as a failure.
async fn serve_signals(
    watcher: &saltpeter_config::ConfigWatcher,
    engine: &saltpeter_engine::EngineHandle,
) {
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
                // The reread itself is recorded by the engine when the serial moves (as
                // `config`); this entry says that a signal asked for it.
                use saltpeter_store::audit::{Action, Actor};
                let note = saltpeter_engine::ApiRequest::Note {
                    by: Actor::signal(),
                    action: Action::ReloadRequested,
                    detail: Some("SIGHUP".to_owned()),
                };
                engine.send(saltpeter_engine::Event::Api(note)).await;
                watcher.reload_now();
            }
        }
    }
}
