//! `sp-master`: the saltpeter master. It reads a directory of YAML job files, fires jobs on
//! their cron schedules, launches `sp-wrapper` on the targeted machines, and holds the state of
//! every run.
//!
//! # Layout
//! - [`config`]: job files and settings, from raw YAML to validated specs; hot reload.
//! - [`schedule`]: cron expressions (seconds and year fields) and their next fire times.
//!
//! See `docs/ARCHITECTURE.md` for how the pieces talk to each other.

pub mod api;
pub mod cli;
pub mod clock;
pub mod config;
pub mod endpoint;
pub mod engine;
pub mod joblog;
pub mod launch;
pub mod metrics;
pub mod runs;
pub mod schedule;
pub mod server;
pub mod store;
pub mod ui;
