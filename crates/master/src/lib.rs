//! `sp-master`: the saltpeter master. It reads a directory of YAML job files, fires jobs on
//! their cron schedules, launches `sp-wrapper` on the targeted machines, and holds the state of
//! every run.
//!
//! This crate owns only the wiring and the command line; the pieces live in their own crates:
//! `saltpeter-config` (job files, settings, schedules), `saltpeter-store` (durable state),
//! `saltpeter-joblog` (job logs and their shipping), `saltpeter-engine` (run state, launchers)
//! and `saltpeter-web` (the listeners).
//!
//! - [`server`]: builds the store, engine, job log, watcher and listeners and runs them; shared
//!   by `main` and the integration tests.
//! - [`cli`]: subcommands that talk to a running master.
//! - `cluster`: with PostgreSQL, the task that keeps this master's membership and job leases
//!   and tells the engine which jobs it gained and lost.
//! - `events`: the consumers of the engine's events (a log line, the `/metrics` counters),
//!   started by [`server`].
//!
//! See `docs/ARCHITECTURE.md` for how the pieces talk to each other.

pub mod cli;
mod cluster;
mod events;
pub mod notifier;
pub mod server;
