//! The audit trail's vocabulary: who did something ([`Actor`]), what they did ([`Action`]),
//! and the record the engine writes to the store for each act ([`AuditRecord`]) and reads
//! back for `GET /api/v1/audit` ([`AuditEntry`]).
//!
//! Recorded: every run started by hand (API, `/ws`, CLI), every kill of a run or a machine,
//! every configuration change the engine takes in (its serial moved), every change of
//! maintenance, and every reload asked for with SIGHUP. Runs the scheduler starts are not
//! recorded here: the job log and the run history already hold each of them, and a busy
//! schedule would crowd out the acts of people. The store keeps the trail for
//! `retention_days` and at most [`MAX_ROWS`] entries, whichever is less.

use std::fmt;
use std::net::IpAddr;

use serde::Serialize;
use time::OffsetDateTime;

/// The most entries the store keeps; older ones are deleted first.
pub const MAX_ROWS: u64 = 100_000;
/// Entries of `GET /api/v1/audit` when the request names no `limit` (fewer when
/// `api_max_runs_page` is lower).
pub const DEFAULT_PAGE: usize = 100;

/// Who did something: a token's name (or `anonymous` when the API needs none), or one of the
/// master's own actors (`config` for a change the watcher read, `signal` for a SIGHUP), and
/// the address a request came from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Actor {
    pub name: String,
    /// The peer's IP address, for acts that came over the network.
    pub source: Option<IpAddr>,
}

impl Actor {
    /// A person or script, by token name and address.
    pub fn remote(name: impl Into<String>, source: Option<IpAddr>) -> Actor {
        Actor {
            name: name.into(),
            source,
        }
    }

    /// The configuration watcher (a file changed).
    pub fn config() -> Actor {
        Actor::remote("config", None)
    }

    /// A signal to the process (SIGHUP).
    pub fn signal() -> Actor {
        Actor::remote("signal", None)
    }
}

impl fmt::Display for Actor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.source {
            Some(ip) => write!(f, "{} from {ip}", self.name),
            None => f.write_str(&self.name),
        }
    }
}

/// What was done.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// A run started by hand.
    Run,
    /// A kill of a whole run.
    Kill,
    /// A kill of one machine of a run.
    KillMachine,
    /// Maintenance (global or per machine) changed.
    Maintenance,
    /// The engine took in a changed configuration.
    ConfigReload,
    /// Someone asked for the configuration to be reread (SIGHUP).
    ReloadRequested,
}

impl Action {
    /// The action's name in the store and in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Run => "run",
            Action::Kill => "kill",
            Action::KillMachine => "kill_machine",
            Action::Maintenance => "maintenance",
            Action::ConfigReload => "config_reload",
            Action::ReloadRequested => "reload_requested",
        }
    }
}

/// One act, as the engine hands it to the store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditRecord {
    pub at: OffsetDateTime,
    pub actor: Actor,
    pub action: Action,
    pub job: Option<String>,
    pub instance: Option<String>,
    pub machine: Option<String>,
    /// Whether the master did it (a refused run, say, is recorded with `false`).
    pub ok: bool,
    /// Why it was refused, or what changed.
    pub detail: Option<String>,
}

/// One act as `GET /api/v1/audit` and `sp-master audit` show it, newest first.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct AuditEntry {
    /// Grows with every entry; pass the last one of a page as `before` for the next page.
    pub id: i64,
    /// RFC 3339, UTC.
    pub at: String,
    pub actor: String,
    pub source: Option<String>,
    pub action: String,
    pub job: Option<String>,
    pub instance: Option<String>,
    pub machine: Option<String>,
    pub ok: bool,
    pub detail: Option<String>,
}
