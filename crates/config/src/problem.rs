//! What can be wrong with a config directory, said with file, line, section and key.
//!
//! A [`ConfigProblem`] is data, not a log line: the loader returns them, `sp-master check` prints
//! them, the watcher logs the new ones and the API can show the current ones.

use std::fmt;
use std::path::{Path, PathBuf};

use super::raw::Pos;

/// How bad a problem is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Severity {
    /// Something was ignored or overridden, but everything loaded.
    Warning,
    /// A file, job or setting was not loaded (a broken file keeps its last good version).
    Error,
}

/// The part of a file a problem is about.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Section {
    /// The file as a whole (syntax, not a mapping, unreadable).
    File,
    /// A job definition, by name.
    Job(String),
    /// The `saltpeter_config` block.
    Settings,
    /// The `saltpeter_maintenance` block.
    Maintenance,
}

/// One problem found while loading a config directory.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConfigProblem {
    /// Error or warning.
    pub severity: Severity,
    /// The file, as found in the directory (the directory joined with the file name).
    pub file: PathBuf,
    /// 1-based line, when known.
    pub line: Option<u64>,
    /// 1-based column, when known (syntax errors).
    pub column: Option<u64>,
    /// The file, job or block the problem is in.
    pub section: Section,
    /// The key the problem is about, if any.
    pub key: Option<String>,
    /// What is wrong, in words.
    pub message: String,
}

impl ConfigProblem {
    /// A problem about the whole file.
    pub(crate) fn file(file: &Path, pos: Option<Pos>, message: impl Into<String>) -> Self {
        Self {
            severity: Severity::Error,
            file: file.to_owned(),
            line: pos.map(|p| p.line).filter(|l| *l > 0),
            column: pos.map(|p| p.column).filter(|c| *c > 0),
            section: Section::File,
            key: None,
            message: message.into(),
        }
    }

    /// A problem inside a section, at a line, optionally about one key.
    pub fn at(
        severity: Severity,
        file: &Path,
        line: u64,
        section: Section,
        key: Option<&str>,
        message: impl Into<String>,
    ) -> Self {
        Self {
            severity,
            file: file.to_owned(),
            line: (line > 0).then_some(line),
            column: None,
            section,
            key: key.map(str::to_owned),
            message: message.into(),
        }
    }

    /// Whether this problem means something was not loaded.
    pub fn is_error(&self) -> bool {
        self.severity == Severity::Error
    }

    /// The job this problem is about, if any.
    pub fn job(&self) -> Option<&str> {
        match &self.section {
            Section::Job(name) => Some(name),
            _ => None,
        }
    }
}

impl fmt::Display for ConfigProblem {
    /// `jobs.yaml:12: job "backup": key "timeout": expected a whole number of seconds, got "1h"`
    /// (the path as found, then `warning: ` for warnings).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
            if let Some(column) = self.column {
                write!(f, ":{column}")?;
            }
        }
        f.write_str(": ")?;
        if self.severity == Severity::Warning {
            f.write_str("warning: ")?;
        }
        match &self.section {
            Section::File => {}
            Section::Job(name) => write!(f, "job {name:?}: ")?,
            Section::Settings => f.write_str("saltpeter_config: ")?,
            Section::Maintenance => f.write_str("saltpeter_maintenance: ")?,
        }
        if let Some(key) = &self.key {
            write!(f, "key {key:?}: ")?;
        }
        f.write_str(&self.message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_names_file_line_job_and_key() {
        let p = ConfigProblem::at(
            Severity::Error,
            Path::new("jobs.yaml"),
            12,
            Section::Job("backup".into()),
            Some("timeout"),
            "expected a whole number of seconds, got \"1h\"",
        );
        assert_eq!(
            p.to_string(),
            "jobs.yaml:12: job \"backup\": key \"timeout\": expected a whole number of seconds, got \"1h\""
        );
        let p = ConfigProblem::file(
            Path::new("/etc/saltpeter/x.yaml"),
            Some(Pos { line: 3, column: 7 }),
            "unclosed bracket",
        );
        assert_eq!(p.to_string(), "/etc/saltpeter/x.yaml:3:7: unclosed bracket");
    }
}
