//! `sp-master`: the saltpeter master. It reads a directory of YAML job files, fires jobs on
//! their cron schedules, launches `sp-wrapper` on the targeted machines, and holds the state of
//! every run.
//!
//! # Layout
//! - [`config`]: job files and settings, from raw YAML to validated specs; hot reload.
//! - [`schedule`]: cron expressions (seconds and year fields) and their next fire times.
//! - [`engine`]: the one task that owns all job and run state, and the monitor's rules.
//! - [`runs`]: run and machine records, bounded output buffers.
//! - [`store`]: durable state in SQLite, owned by one thread; restart recovery.
//! - [`launch`]: how wrappers are started (local, Salt).
//! - [`endpoint`]: the WebSocket server wrappers talk to.
//! - [`identity`]: the credentials that let a connection speak for one machine of one run.
//! - [`listen`]: the accept loop of both listeners: deadlines, connection caps, the open-file
//!   reserve.
//! - [`api`], [`ui`], [`metrics`]: the operator's HTTP API, UI protocol, dashboard, metrics.
//! - [`joblog`]: per-job log files in the original format; [`ship`]: the same events to
//!   Elasticsearch/OpenSearch.
//! - [`audit`]: who started, killed or reconfigured what, from where.
//! - [`cli`]: subcommands that talk to a running master.
//! - [`private`]: files and directories only the master's user can read.
//! - [`tls`]: which listener speaks TLS, the certificate it presents (self-signed or the
//!   operator's, reloaded on change), what wrappers are told to trust.
//! - [`server`]: wiring shared by `main` and the integration tests; [`clock`]: time sources.
//!
//! See `docs/ARCHITECTURE.md` for how the pieces talk to each other.

pub mod api;
pub mod audit;
pub mod cli;
pub mod clock;
pub mod config;
pub mod endpoint;
pub mod engine;
pub mod identity;
pub mod joblog;
pub mod launch;
pub mod listen;
pub mod metrics;
pub mod private;
pub mod runs;
pub mod schedule;
pub mod server;
pub mod ship;
pub mod store;
pub mod tls;
pub mod ui;
