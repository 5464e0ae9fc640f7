//! Who may use the API port: named tokens with a role each (the configuration holds only their
//! SHA-256 hashes), the host names the API answers for, and whether `/metrics` needs a token.
//!
//! The keys are part of `saltpeter_config`, merged per key like every other setting:
//! `api_tokens`, `api_public_names` and `metrics_public`. The checks themselves are made per
//! request in `ui/auth.rs`, against the current configuration, so a reload applies at once.
//!
//! A token is a random secret of 256 bits made by `sp-master token new`; such a token cannot
//! be guessed, so a plain SHA-256 of it is as good as a slow password hash and costs nothing
//! per request.
// Input from configuration files reaches indexing here, so every access is written checked
// ("Totality" in docs/ARCHITECTURE.md).
#![warn(
    clippy::arithmetic_side_effects,
    clippy::indexing_slicing,
    clippy::string_slice
)]

use std::collections::BTreeSet;
use std::fmt;

use rand::RngCore;

use super::raw::{Node, Value};

/// The most tokens `api_tokens` may list.
pub const MAX_TOKENS: usize = 1000;
/// The most names `api_public_names` may list.
pub const MAX_PUBLIC_NAMES: usize = 256;
/// The longest token name, in bytes.
pub(crate) const MAX_TOKEN_NAME: usize = 64;
/// The name under which the single `api_token` of earlier versions acts (with the admin role).
pub const LEGACY_TOKEN_NAME: &str = "api_token";

/// What a token may do. Each role may do everything the roles before it may.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    /// Reads: jobs, runs, output, the configuration, the timeline, `/ws` without commands.
    Viewer,
    /// Also starts runs and kills runs and machines.
    Operator,
    /// Also reads the audit trail, and any maintenance action.
    Admin,
}

impl Role {
    /// The role's name in the configuration and in messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }

    /// Parses a role's name (case-insensitive).
    pub fn parse(text: &str) -> Option<Role> {
        match text.trim().to_ascii_lowercase().as_str() {
            "viewer" => Some(Role::Viewer),
            "operator" => Some(Role::Operator),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One configured token: who it is, what it may do, and the SHA-256 of the secret.
#[derive(Clone, PartialEq, Eq)]
pub struct TokenEntry {
    pub name: String,
    pub role: Role,
    pub sha256: [u8; 32],
}

impl fmt::Debug for TokenEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The hash is not the secret, but it has no place in debug output either.
        f.debug_struct("TokenEntry")
            .field("name", &self.name)
            .field("role", &self.role)
            .finish_non_exhaustive()
    }
}

/// The access settings, with their defaults (no tokens, no public names, `/metrics` public
/// exactly when no token is configured).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Access {
    /// `api_tokens`: the named tokens that passed validation.
    pub tokens: Vec<TokenEntry>,
    /// Whether `api_tokens` lists any entry at all, valid or not. A list whose every entry has
    /// an error still demands tokens: a typo must lock the API, not open it.
    pub(crate) tokens_listed: bool,
    /// `api_public_names`: host names (lower case, without port) the API answers for besides
    /// its own address and loopback.
    pub public_names: Vec<String>,
    /// `metrics_public`: whether `/metrics` is served without a token; `None` means "when no
    /// token is configured".
    pub metrics_public: Option<bool>,
}

/// What one file says about access; `None` where it says nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct PartialAccess {
    tokens: Option<(Vec<TokenEntry>, bool)>,
    public_names: Option<Vec<String>>,
    metrics_public: Option<Option<bool>>,
}

impl PartialAccess {
    /// Reads `key` if it is one of the access keys: `None` when it is not (the caller handles
    /// it), otherwise the problems found (empty when the value was valid). Valid parts of a
    /// value with problems are kept.
    pub(crate) fn parse(&mut self, key: &str, node: &Node) -> Option<Vec<String>> {
        match key {
            "api_tokens" => {
                let (tokens, listed, problems) = parse_tokens(node);
                self.tokens = Some((tokens, listed));
                Some(problems)
            }
            "api_public_names" => Some(match parse_names(node) {
                Ok(names) => {
                    self.public_names = Some(names);
                    Vec::new()
                }
                Err(e) => vec![e],
            }),
            "metrics_public" => Some(match node.value {
                Value::Null => {
                    self.metrics_public = Some(None);
                    Vec::new()
                }
                _ => match node.as_bool() {
                    Ok(b) => {
                        self.metrics_public = Some(Some(b));
                        Vec::new()
                    }
                    Err(e) => vec![e],
                },
            }),
            _ => None,
        }
    }
}

impl Access {
    /// Applies one file's access keys on top of these: every key the file sets wins.
    pub(crate) fn apply(&mut self, p: &PartialAccess) {
        if let Some((tokens, listed)) = &p.tokens {
            self.tokens = tokens.clone();
            self.tokens_listed = *listed;
        }
        if let Some(names) = &p.public_names {
            self.public_names = names.clone();
        }
        if let Some(m) = p.metrics_public {
            self.metrics_public = m;
        }
    }
}

/// Validates `api_tokens`: the entries that are valid, whether any entry was listed, and one
/// problem per invalid entry.
fn parse_tokens(node: &Node) -> (Vec<TokenEntry>, bool, Vec<String>) {
    let items = match &node.value {
        Value::Null => return (Vec::new(), false, Vec::new()),
        Value::Seq(items) => items,
        _ => {
            return (
                Vec::new(),
                true,
                vec![format!(
                    "expected a list of {{name, role, sha256}} entries, got {}",
                    node.value.kind()
                )],
            );
        }
    };
    let mut problems = Vec::new();
    if items.len() > MAX_TOKENS {
        problems.push(format!(
            "at most {MAX_TOKENS} tokens may be listed, got {}; the first {MAX_TOKENS} are used",
            items.len()
        ));
    }
    let mut tokens: Vec<TokenEntry> = Vec::new();
    let mut names = BTreeSet::new();
    for (i, item) in items.iter().take(MAX_TOKENS).enumerate() {
        let n = i.saturating_add(1);
        match parse_token(item) {
            Ok(t) if !names.insert(t.name.clone()) => {
                problems.push(format!("entry {n}: the name {:?} is listed twice", t.name));
            }
            Ok(t) => tokens.push(t),
            Err(e) => problems.push(format!("entry {n}: {e}")),
        }
    }
    (tokens, !items.is_empty(), problems)
}

fn parse_token(node: &Node) -> Result<TokenEntry, String> {
    let Value::Map(entries) = &node.value else {
        return Err(format!(
            "expected a mapping with name, role and sha256, got {}",
            node.value.kind()
        ));
    };
    let (mut name, mut role, mut sha256) = (None, None, None);
    for (k, v) in entries {
        match k.key_text().as_str() {
            "name" => name = Some(v.as_text()?),
            "role" => {
                let text = v.as_text()?;
                role = Some(Role::parse(&text).ok_or_else(|| {
                    format!("role must be viewer, operator or admin, got {text:?}")
                })?);
            }
            "sha256" => sha256 = Some(parse_hash(&v.as_text()?)?),
            other => {
                return Err(format!(
                    "unknown key {other:?} (expected name, role, sha256)"
                ));
            }
        }
    }
    let name = name.ok_or("name is missing")?;
    check_name(&name)?;
    Ok(TokenEntry {
        role: role.ok_or_else(|| format!("{name}: role is missing"))?,
        sha256: sha256.ok_or_else(|| format!("{name}: sha256 is missing"))?,
        name,
    })
}

/// A token's name appears in the audit trail and the job log, so it is kept to characters
/// that need no quoting there.
pub fn check_name(name: &str) -> Result<(), String> {
    let ok_char = |c: char| c.is_ascii_alphanumeric() || "._@-".contains(c);
    if name.is_empty() || name.len() > MAX_TOKEN_NAME || !name.chars().all(ok_char) {
        return Err(format!(
            "name {name:?} must be 1 to {MAX_TOKEN_NAME} letters, digits, '.', '_', '@' or '-'"
        ));
    }
    Ok(())
}

fn parse_hash(text: &str) -> Result<[u8; 32], String> {
    let text = text.trim();
    let bad = || {
        format!(
            "sha256 must be 64 hexadecimal digits, got {} characters",
            text.len()
        )
    };
    if text.len() != 64 {
        return Err(bad());
    }
    let mut out = [0u8; 32];
    for (byte, pair) in out.iter_mut().zip(text.as_bytes().chunks(2)) {
        let pair = std::str::from_utf8(pair).map_err(|_| bad())?;
        *byte = u8::from_str_radix(pair, 16).map_err(|_| bad())?;
    }
    Ok(out)
}

fn parse_names(node: &Node) -> Result<Vec<String>, String> {
    let items: Vec<&Node> = match &node.value {
        Value::Null => return Ok(Vec::new()),
        Value::Seq(items) => items.iter().collect(),
        _ => vec![node],
    };
    if items.len() > MAX_PUBLIC_NAMES {
        return Err(format!(
            "at most {MAX_PUBLIC_NAMES} names may be listed, got {}",
            items.len()
        ));
    }
    items
        .into_iter()
        .map(|n| {
            let name = n
                .as_text()?
                .trim()
                .trim_end_matches('.')
                .to_ascii_lowercase();
            let ok_char = |c: char| c.is_ascii_alphanumeric() || ".-_:[]".contains(c);
            if name.is_empty() || name.len() > 253 || !name.chars().all(ok_char) {
                return Err(format!(
                    "{name:?} is not a host name such as cron.example.net"
                ));
            }
            Ok(name)
        })
        .collect()
}

/// The SHA-256 of a token, as stored in `api_tokens`.
pub fn hash_token(token: &str) -> [u8; 32] {
    let digest = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

/// Lower-case hexadecimal.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A new token: 32 random bytes in hexadecimal behind a `spt_` prefix (so a leaked one is
/// easy to recognise in logs and scanners).
pub fn new_token() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    format!("spt_{}", hex(&bytes))
}

/// The `api_tokens` entry for a token, as one line of YAML flow mapping.
pub fn config_entry(name: &str, role: Role, token: &str) -> String {
    format!(
        "{{name: {name}, role: {role}, sha256: {}}}",
        hex(&hash_token(token))
    )
}

#[cfg(test)]
// A failed index fails the test, which is what a test should do.
#[allow(clippy::indexing_slicing)]
mod tests {
    use super::*;
    use crate::raw::parse_yaml;

    fn parse(yaml: &str) -> (Access, Vec<String>) {
        let doc = parse_yaml(yaml).expect("yaml");
        let Value::Map(entries) = doc.value else {
            panic!("not a map")
        };
        let mut p = PartialAccess::default();
        let mut problems = Vec::new();
        for (k, v) in &entries {
            problems.extend(p.parse(&k.key_text(), v).expect("an access key"));
        }
        let mut a = Access::default();
        a.apply(&p);
        (a, problems)
    }

    #[test]
    fn tokens_names_and_metrics_are_read() {
        let token = "spt_x";
        let hash = hex(&hash_token(token));
        let (a, problems) = parse(&format!(
            "api_tokens:\n- {{name: alice, role: operator, sha256: {hash}}}\n- {{name: bob, role: VIEWER, sha256: {}}}\n\
             api_public_names: [Cron.Example.NET.]\nmetrics_public: true\n",
            hash.to_uppercase()
        ));
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(a.tokens.len(), 2);
        assert_eq!(a.tokens[0].role, Role::Operator);
        assert_eq!(a.tokens[1].role, Role::Viewer);
        assert_eq!(a.tokens[0].sha256, hash_token(token));
        assert_eq!(a.public_names, ["cron.example.net"]);
        assert_eq!(a.metrics_public, Some(true));
    }

    #[test]
    fn bad_entries_are_dropped_but_still_demand_tokens() {
        let good = hex(&hash_token("t"));
        let (a, problems) = parse(&format!(
            "api_tokens:\n- {{name: alice, role: root, sha256: {good}}}\n- {{name: 'a b', role: admin, sha256: {good}}}\n\
             - {{name: c, role: admin, sha256: abc}}\n- {{name: d, role: admin}}\n- 42\n\
             - {{name: e, role: admin, sha256: {good}}}\n- {{name: e, role: viewer, sha256: {good}}}\n"
        ));
        assert_eq!(problems.len(), 6, "{problems:?}");
        assert_eq!(a.tokens.len(), 1);
        let (a, problems) = parse("api_tokens: [{name: x, role: admin, sha256: zz}]\n");
        assert_eq!(problems.len(), 1);
        assert!(a.tokens.is_empty() && a.tokens_listed);
        let (a, problems) = parse("api_tokens: []\n");
        assert!(problems.is_empty() && !a.tokens_listed);
    }

    #[test]
    fn a_new_token_is_long_random_and_matches_its_entry() {
        let t = new_token();
        assert_eq!(t.len(), 68);
        assert_ne!(t, new_token());
        let entry = config_entry("alice", Role::Admin, &t);
        let (a, problems) = parse(&format!("api_tokens: [{entry}]\n"));
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(a.tokens[0].sha256, hash_token(&t));
    }
}
