//! Launchers: how the master learns which machines a job's targets name, and how it starts
//! `sp-wrapper` on them. The engine only sees the [`Launcher`] trait; tests inject fakes.
//!
//! - [`local::LocalLauncher`]: every name in `targets` is a machine simulated on this host;
//!   the master runs `sp-wrapper` itself. The embedded default, no Salt needed.
//! - [`salt::SaltLauncher`]: drives the `salt` command line on the Salt master host.
//! - [`bench::BenchLauncher`]: hands start requests to `cargo xtask bench master`'s simulated
//!   wrappers instead of starting anything.

pub mod bench;
pub mod local;
pub mod salt;

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;

use crate::identity::Identity;
use saltpeter_config::JobSpec;

/// A boxed future, so the trait stays object-safe.
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// Which machines a job's targets name.
#[derive(Clone, Debug, Default)]
pub struct Resolution {
    /// Machines that answered and can run the job.
    pub up: Vec<String>,
    /// Machines the launcher expected but that did not answer, with why (255).
    pub down: Vec<(String, String)>,
    /// The resolution itself failed (Salt unreachable, ...): the run has no machines.
    pub error: Option<String>,
}

/// A request to start wrappers on some machines of one run.
#[derive(Clone, Debug)]
pub struct StartRequest {
    pub job: Arc<JobSpec>,
    pub instance: String,
    pub machines: Vec<String>,
    /// The wrapper's environment, identical for every machine (the launcher adds
    /// `SP_MACHINE_ID` itself, since only it knows how to name each machine).
    pub env: Vec<(String, String)>,
    /// Each machine's own `SP_RUN_TOKEN`, for runs whose machines authenticate with tokens of
    /// their own ([`Identity::MachineToken`]); empty when `env` carries the run's token.
    pub tokens: BTreeMap<String, String>,
    /// The program to run on the machine: the job's `wrapper_path`, else the settings'
    /// `default_wrapper_path`; `None` when neither is set and the launcher picks its own.
    pub wrapper_path: Option<String>,
}

/// Per-machine result of a start request: `Err` carries the reason, shown in the 254 output.
pub type StartOutcome = Vec<(String, Result<(), String>)>;

/// The result of running a job's command without a wrapper (legacy mode, `use_wrapper:
/// false`): the command's exit code and its output, known only at the end.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirectResult {
    pub retcode: i64,
    pub output: String,
}

/// Per-machine result of a direct run: `Err` says why the machine gave no result (255).
pub type DirectOutcome = Vec<(String, Result<DirectResult, String>)>;

/// Resolves targets and starts wrappers.
pub trait Launcher: Send + Sync + std::fmt::Debug + 'static {
    /// How the wrappers this launcher starts prove which machine they are. A launcher that
    /// starts each machine's wrapper itself can hand each its own secret (the default); one
    /// that passes a single environment to many machines cannot.
    fn identity(&self) -> Identity {
        Identity::MachineToken
    }
    /// The Salt master's pki directory, whose `minions/<id>` files are the accepted public
    /// keys that [`Identity::SaltKey`] signatures are checked against.
    fn salt_pki_dir(&self) -> Option<PathBuf> {
        None
    }
    /// Which machines the job targets and which of them answer.
    fn resolve(&self, job: Arc<JobSpec>) -> BoxFuture<Resolution>;
    /// Starts the wrapper on each machine of the request.
    fn start(&self, request: StartRequest) -> BoxFuture<StartOutcome>;
    /// Runs the job's command itself on each machine and waits for its end (legacy mode:
    /// no wrapper, no heartbeat, no streaming). `request.env` is the wrapper's environment;
    /// a launcher passes on only what the command should see. Launchers without such a mode
    /// keep this default, which fails every machine with the reason.
    fn run_direct(&self, request: StartRequest) -> BoxFuture<DirectOutcome> {
        let outcome = request
            .machines
            .into_iter()
            .map(|m| {
                (
                    m,
                    Err("this launcher cannot run jobs with use_wrapper: false".to_owned()),
                )
            })
            .collect();
        Box::pin(async move { outcome })
    }
}
