//! Reading one YAML file into a located value tree, and the scalar conversions every section
//! shares.
//!
//! This is the "low-level" half of the config (ripgrep's lowargs): it knows YAML, positions and
//! scalar spellings, and nothing about jobs. Every node keeps the line and column it came from so
//! that later errors can point at it.
//!
//! # YAML 1.1 (the original, PyYAML) versus YAML 1.2 (serde-saphyr)
//!
//! | Spelling                 | Original (YAML 1.1)   | Here                                           |
//! |--------------------------|-----------------------|------------------------------------------------|
//! | `yes`/`no`/`on`/`off`    | booleans              | text; boolean keys (`use_wrapper`, `utc`, `debug`, `api_ws`, `allow_legacy_wrappers`, maintenance `global`) accept them case-insensitively, with `true`/`false` |
//! | `y`/`n`                  | text                  | text                                           |
//! | `010`                    | octal, 8              | text `"010"`; numeric keys and cron fields read it as decimal 10 |
//! | `0o17`                   | text                  | 15                                             |
//! | `1_000`                  | 1000                  | 1000                                           |
//! | `2026-01-01`             | a date                | text                                           |
//! | duplicate mapping keys   | last wins, silently   | last wins; warned for top-level and job keys   |
//!
//! Strings given to `env` are kept as written; other scalars are converted the way Python's
//! `str()` does, so `True`, `False`, `None` and `1.0` reach the job as they did before.
// Input from clients, files or wrappers reaches arithmetic here, so every operation that could
// overflow or index out of bounds is written checked ("Totality" in docs/ARCHITECTURE.md).
#![warn(
    clippy::arithmetic_side_effects,
    clippy::indexing_slicing,
    clippy::string_slice
)]

use std::fmt;

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_saphyr::{Budget, DuplicateKeyPolicy, Options, Spanned};

/// Where a node starts in its file (1-based; 0 when unknown).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub(crate) struct Pos {
    /// Line, 1-based.
    pub line: u64,
    /// Column, 1-based.
    pub column: u64,
}

/// A YAML value with its position.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Node {
    /// The value.
    pub value: Value,
    /// Where it starts.
    pub pos: Pos,
}

/// A YAML value. Mappings keep every entry in file order, duplicates included, so that the
/// caller can warn about them.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Value {
    /// `~`, `null` or nothing.
    Null,
    /// `true`/`false` (YAML 1.2 spellings only).
    Bool(bool),
    /// A whole number.
    Int(i128),
    /// A floating-point number.
    Float(f64),
    /// Text.
    Str(String),
    /// A sequence.
    Seq(Vec<Node>),
    /// A mapping, entries in file order.
    Map(Vec<(Node, Node)>),
}

impl Value {
    /// A short name of the value's type, for error messages.
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            Value::Null => "nothing (null)",
            Value::Bool(_) => "a boolean",
            Value::Int(_) => "a number",
            Value::Float(_) => "a decimal number",
            Value::Str(_) => "text",
            Value::Seq(_) => "a list",
            Value::Map(_) => "a mapping",
        }
    }
}

impl fmt::Display for Value {
    /// The value as Python's `str()` would print the loaded YAML scalar; collections are
    /// summarised.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Null => f.write_str("None"),
            Value::Bool(true) => f.write_str("True"),
            Value::Bool(false) => f.write_str("False"),
            Value::Int(i) => write!(f, "{i}"),
            Value::Float(x) => f.write_str(&python_float(*x)),
            Value::Str(s) => f.write_str(s),
            Value::Seq(items) => write!(f, "a list of {} items", items.len()),
            Value::Map(entries) => write!(f, "a mapping of {} keys", entries.len()),
        }
    }
}

/// Python's `str(float)`: integral values keep a `.0`, specials are `inf`/`nan`.
fn python_float(x: f64) -> String {
    if x.is_nan() {
        "nan".to_owned()
    } else if x.is_infinite() {
        if x > 0.0 { "inf" } else { "-inf" }.to_owned()
    } else if x.fract() == 0.0 && x.abs() < 1e16 {
        format!("{x:.1}")
    } else {
        format!("{x}")
    }
}

impl Node {
    /// The text of a scalar the way the original `str()`-converts it; `None` for collections.
    pub(crate) fn scalar_text(&self) -> Option<String> {
        match &self.value {
            Value::Seq(_) | Value::Map(_) => None,
            other => Some(other.to_string()),
        }
    }

    /// A boolean, accepting YAML 1.1 spellings case-insensitively (`yes`/`no`/`on`/`off`/
    /// `true`/`false`).
    pub(crate) fn as_bool(&self) -> Result<bool, String> {
        match &self.value {
            Value::Bool(b) => Ok(*b),
            Value::Str(s) => match s.to_ascii_lowercase().as_str() {
                "true" | "yes" | "on" => Ok(true),
                "false" | "no" | "off" => Ok(false),
                _ => Err(format!("expected true or false, got {s:?}")),
            },
            other => Err(format!("expected true or false, got {}", other.kind())),
        }
    }

    /// A non-negative whole number; digit-only text counts (so `010` is ten).
    pub(crate) fn as_count(&self, what: &str) -> Result<u64, String> {
        match &self.value {
            Value::Int(i) => u64::try_from(*i).map_err(|_| format!("expected {what}, got {i}")),
            Value::Str(s) if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) => s
                .parse::<u64>()
                .map_err(|_| format!("expected {what}, got {s:?} (too large)")),
            Value::Str(s) => Err(format!("expected {what}, got {s:?}")),
            Value::Float(x) => Err(format!("expected {what}, got {}", python_float(*x))),
            other => Err(format!("expected {what}, got {}", other.kind())),
        }
    }

    /// Text from a text or number scalar (numbers become their decimal text).
    pub(crate) fn as_text(&self) -> Result<String, String> {
        match &self.value {
            Value::Str(s) => Ok(s.clone()),
            Value::Int(_) | Value::Float(_) => Ok(self.value.to_string()),
            other => Err(format!("expected text, got {}", other.kind())),
        }
    }

    /// The node as JSON, for the UI's view of the file.
    pub(crate) fn to_json(&self) -> serde_json::Value {
        use serde_json::Value as J;
        match &self.value {
            Value::Null => J::Null,
            Value::Bool(b) => J::Bool(*b),
            Value::Int(i) => i64::try_from(*i)
                .map(J::from)
                .or_else(|_| u64::try_from(*i).map(J::from))
                .unwrap_or_else(|_| J::String(i.to_string())),
            Value::Float(x) => serde_json::Number::from_f64(*x)
                .map(J::Number)
                .unwrap_or_else(|| J::String(python_float(*x))),
            Value::Str(s) => J::String(s.clone()),
            Value::Seq(items) => J::Array(items.iter().map(Node::to_json).collect()),
            Value::Map(entries) => {
                let mut map = serde_json::Map::new();
                for (k, v) in entries {
                    map.insert(k.key_text(), v.to_json());
                }
                J::Object(map)
            }
        }
    }

    /// A mapping key as text (non-text keys use their `str()` form).
    pub(crate) fn key_text(&self) -> String {
        match &self.value {
            Value::Str(s) => s.clone(),
            Value::Seq(_) | Value::Map(_) => format!("<{}>", self.value.kind()),
            other => other.to_string(),
        }
    }
}

/// A file that is not valid YAML (or exceeds the parser's budgets).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SyntaxError {
    /// Where the parser stopped, when it knows.
    pub pos: Option<Pos>,
    /// The parser's message without the source snippet.
    pub message: String,
}

/// How deeply collections may nest in a config file (a job's `env` map is at depth 3).
pub(crate) const MAX_DEPTH: usize = 24;

/// Parses one file's text. Never panics; every failure is a [`SyntaxError`].
pub(crate) fn parse_yaml(text: &str) -> Result<Node, SyntaxError> {
    let mut options = Options::default();
    // YAML 1.2 booleans only, so `yes`/`on` stay text where text is expected (an `env` value, a
    // command); boolean keys accept the 1.1 spellings themselves.
    options.strict_booleans = true;
    // `010` stays text instead of becoming 10 or (YAML 1.1) 8: cron fields and counts read it
    // as decimal, and strings keep the zero.
    options.leading_zero_numbers_as_strings = true;
    // PyYAML lets the last duplicate key win; we do too, but want to see them to warn.
    options.duplicate_keys = DuplicateKeyPolicy::PassThrough;
    // Deserializing a nested collection recurses, several kilobytes of stack per level in a
    // debug build, and a stack overflow aborts the process whatever the panic strategy. The
    // parser's default depth budgets (64 block levels, 255 flow levels) are more than a
    // 2 MiB thread stack holds; a config needs four or five levels.
    let mut budget = Budget::default();
    budget.max_depth = MAX_DEPTH;
    budget.flow_nesting_limit = MAX_DEPTH;
    options.budget = Some(budget);
    match serde_saphyr::from_str_with_options::<Spanned<RawNode>>(text, options) {
        Ok(spanned) => Ok(into_node(spanned)),
        Err(err) => {
            let pos = err.location().map(|l| Pos {
                line: l.line(),
                column: l.column(),
            });
            let message = err.without_snippet().to_string();
            // The plain message may still end with " at line L, column C"; the position is
            // reported separately, so drop the duplicate.
            let message = match message.rfind(" at line ") {
                Some(i) if pos.is_some() => message.get(..i).unwrap_or(&message).to_owned(),
                _ => message,
            };
            Err(SyntaxError { pos, message })
        }
    }
}

/// The serde-facing twin of [`Node`]: positions come from `Spanned` wrappers.
enum RawNode {
    Null,
    Bool(bool),
    Int(i128),
    Float(f64),
    Str(String),
    Seq(Vec<Spanned<RawNode>>),
    Map(Vec<(Spanned<RawNode>, Spanned<RawNode>)>),
}

fn into_node(spanned: Spanned<RawNode>) -> Node {
    let pos = Pos {
        line: spanned.referenced.line(),
        column: spanned.referenced.column(),
    };
    let value = match spanned.value {
        RawNode::Null => Value::Null,
        RawNode::Bool(b) => Value::Bool(b),
        RawNode::Int(i) => Value::Int(i),
        RawNode::Float(x) => Value::Float(x),
        RawNode::Str(s) => Value::Str(s),
        RawNode::Seq(items) => Value::Seq(items.into_iter().map(into_node).collect()),
        RawNode::Map(entries) => Value::Map(
            entries
                .into_iter()
                .map(|(k, v)| (into_node(k), into_node(v)))
                .collect(),
        ),
    };
    Node { value, pos }
}

impl<'de> Deserialize<'de> for RawNode {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(RawVisitor)
    }
}

struct RawVisitor;

impl<'de> Visitor<'de> for RawVisitor {
    type Value = RawNode;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any YAML value")
    }

    fn visit_unit<E: de::Error>(self) -> Result<RawNode, E> {
        Ok(RawNode::Null)
    }

    fn visit_none<E: de::Error>(self) -> Result<RawNode, E> {
        Ok(RawNode::Null)
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<RawNode, D::Error> {
        RawNode::deserialize(d)
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<RawNode, E> {
        Ok(RawNode::Bool(v))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<RawNode, E> {
        Ok(RawNode::Int(i128::from(v)))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<RawNode, E> {
        Ok(RawNode::Int(i128::from(v)))
    }

    fn visit_i128<E: de::Error>(self, v: i128) -> Result<RawNode, E> {
        Ok(RawNode::Int(v))
    }

    fn visit_u128<E: de::Error>(self, v: u128) -> Result<RawNode, E> {
        // Beyond i128 only in absurd files; keep the digits as text rather than fail.
        Ok(i128::try_from(v).map_or_else(|_| RawNode::Str(v.to_string()), RawNode::Int))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<RawNode, E> {
        Ok(RawNode::Float(v))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<RawNode, E> {
        Ok(RawNode::Str(v.to_owned()))
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<RawNode, E> {
        Ok(RawNode::Str(v))
    }

    fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<RawNode, E> {
        Ok(RawNode::Str(String::from_utf8_lossy(v).into_owned()))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<RawNode, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element()? {
            items.push(item);
        }
        Ok(RawNode::Seq(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawNode, A::Error> {
        let mut entries = Vec::new();
        while let Some(entry) = map.next_entry()? {
            entries.push(entry);
        }
        Ok(RawNode::Map(entries))
    }
}

#[cfg(test)]
#[allow(clippy::indexing_slicing)] // A test that indexes out of bounds fails, as it should.
mod tests {
    use super::*;

    fn map_entries(node: &Node) -> &[(Node, Node)] {
        match &node.value {
            Value::Map(entries) => entries,
            other => panic!("not a mapping: {other:?}"),
        }
    }

    #[test]
    fn scalars_and_positions() {
        let doc = parse_yaml(
            "# comment\njob:\n  min: 010\n  on: yes\n  n: ~\n  f: 1.0\n  i: 1_000\n  b: true\n",
        )
        .unwrap();
        let (key, job) = &map_entries(&doc)[0];
        assert_eq!(key.key_text(), "job");
        assert_eq!(key.pos, Pos { line: 2, column: 1 });
        let entries = map_entries(job);
        let get = |name: &str| {
            &entries
                .iter()
                .find(|(k, _)| k.key_text() == name)
                .unwrap()
                .1
        };
        assert_eq!(get("min").value, Value::Str("010".into()));
        assert_eq!(get("min").pos.line, 3);
        assert_eq!(get("min").as_count("n").unwrap(), 10);
        assert_eq!(get("on").value, Value::Str("yes".into()));
        assert!(get("on").as_bool().unwrap());
        assert_eq!(get("n").scalar_text().unwrap(), "None");
        assert_eq!(get("f").scalar_text().unwrap(), "1.0");
        assert_eq!(get("i").value, Value::Int(1000));
        assert_eq!(get("b").scalar_text().unwrap(), "True");
    }

    #[test]
    fn booleans_accept_yaml_1_1_spellings() {
        for (text, expected) in [
            ("YES", true),
            ("Off", false),
            ("on", true),
            ("False", false),
        ] {
            let node = Node {
                value: Value::Str(text.into()),
                pos: Pos::default(),
            };
            assert_eq!(node.as_bool(), Ok(expected), "{text}");
        }
        let node = Node {
            value: Value::Str("y".into()),
            pos: Pos::default(),
        };
        assert!(node.as_bool().is_err());
    }

    #[test]
    fn syntax_errors_have_positions() {
        let err = parse_yaml("a: 1\nb: [1,\n").unwrap_err();
        assert_eq!(err.pos.map(|p| p.line), Some(2));
        assert!(!err.message.contains(" at line "), "{}", err.message);
    }

    #[test]
    fn duplicate_keys_are_kept_for_the_caller() {
        let doc = parse_yaml("a: 1\na: 2\n").unwrap();
        assert_eq!(map_entries(&doc).len(), 2);
    }
}
