//! The `saltpeter_maintenance` block: global maintenance and machines under maintenance
//! (docs/COMPATIBILITY.md, "Job keys and settings").
//!
//! As in the original, a value of the wrong type is ignored (here with a warning) and, across
//! files, each key is taken from the last file (sorted order) that sets it.

use std::collections::BTreeSet;
use std::path::Path;

use super::problem::{ConfigProblem, Section, Severity};
use super::raw::{Node, Value};

/// Maintenance state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Maintenance {
    /// `global`: no job is started while true (running ones continue).
    pub global: bool,
    /// `machines`: minion ids left out of every run.
    pub machines: BTreeSet<String>,
}

/// What one file's block sets.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct PartialMaintenance {
    global: Option<bool>,
    machines: Option<BTreeSet<String>>,
}

/// Validates one file's `saltpeter_maintenance` mapping.
pub(crate) fn parse_maintenance(
    file: &Path,
    entries: &[(Node, Node)],
) -> (PartialMaintenance, Vec<ConfigProblem>) {
    let mut out = PartialMaintenance::default();
    let mut problems = Vec::new();
    let mut warn = |node: &Node, key: &str, message: String| {
        problems.push(ConfigProblem::at(
            Severity::Warning,
            file,
            node.pos.line,
            Section::Maintenance,
            Some(key),
            message,
        ));
    };
    for (k, v) in entries {
        let key = k.key_text();
        match key.as_str() {
            "global" => match v.as_bool() {
                Ok(b) => out.global = Some(b),
                Err(e) => warn(v, &key, format!("{e}; ignored")),
            },
            "machines" => match &v.value {
                Value::Seq(items) => {
                    let mut set = BTreeSet::new();
                    for item in items {
                        match item.as_text() {
                            Ok(name) => {
                                set.insert(name);
                            }
                            Err(e) => warn(item, &key, format!("{e}; this entry is ignored")),
                        }
                    }
                    out.machines = Some(set);
                }
                Value::Null => out.machines = Some(BTreeSet::new()),
                other => warn(
                    v,
                    &key,
                    format!(
                        "expected a list of minion ids, got {}; ignored",
                        other.kind()
                    ),
                ),
            },
            _ => warn(k, &key, "unknown key; ignored".to_owned()),
        }
    }
    (out, problems)
}

impl Maintenance {
    /// Applies one file's block: each key it sets wins.
    pub(crate) fn apply(&mut self, p: &PartialMaintenance) {
        if let Some(g) = p.global {
            self.global = g;
        }
        if let Some(m) = &p.machines {
            self.machines = m.clone();
        }
    }
}
