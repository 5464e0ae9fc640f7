//! `cargo xtask deps`: the crate graph drawn in docs/ARCHITECTURE.md, written down once, and a
//! check that the workspace's manifests do not leave it.
//!
//! Only edges between the workspace's own packages are judged, and only normal and build
//! dependencies: a test may reach for any crate it needs to set up its scene, but the code
//! that ships may only lean on what the drawing allows. A package missing from [`ALLOWED`]
//! fails too, so a new crate is drawn before it is used.

use std::collections::BTreeSet;
use std::process::Command;

use anyhow::{Context, Result, bail};
use serde_json::Value;

/// Every workspace package and the workspace packages it may depend on.
pub const ALLOWED: &[(&str, &[&str])] = &[
    ("saltpeter-proto", &[]),
    ("saltpeter-tls", &[]),
    ("saltpeter-build", &[]),
    ("saltpeter-files", &[]),
    ("saltpeter-metrics", &[]),
    ("saltpeter-http", &["saltpeter-tls"]),
    ("saltpeter-notify", &[]),
    ("saltpeter-config", &["saltpeter-proto", "saltpeter-notify"]),
    (
        "saltpeter-store",
        &[
            "saltpeter-proto",
            "saltpeter-files",
            "saltpeter-metrics",
            "saltpeter-notify",
        ],
    ),
    (
        "saltpeter-store-postgres",
        &["saltpeter-tls", "saltpeter-proto", "saltpeter-store"],
    ),
    (
        "saltpeter-joblog",
        &[
            "saltpeter-proto",
            "saltpeter-config",
            "saltpeter-files",
            "saltpeter-http",
        ],
    ),
    (
        "saltpeter-engine",
        &[
            "saltpeter-proto",
            "saltpeter-tls",
            "saltpeter-config",
            "saltpeter-store",
            "saltpeter-joblog",
            "saltpeter-metrics",
        ],
    ),
    (
        "saltpeter-web",
        &[
            "saltpeter-proto",
            "saltpeter-tls",
            "saltpeter-files",
            "saltpeter-metrics",
            "saltpeter-config",
            "saltpeter-store",
            "saltpeter-engine",
            "saltpeter-notify",
            "saltpeter-http",
        ],
    ),
    (
        "saltpeter-master",
        &[
            "saltpeter-build",
            "saltpeter-proto",
            "saltpeter-tls",
            "saltpeter-http",
            "saltpeter-metrics",
            "saltpeter-config",
            "saltpeter-store",
            "saltpeter-store-postgres",
            "saltpeter-joblog",
            "saltpeter-engine",
            "saltpeter-web",
            "saltpeter-notify",
        ],
    ),
    (
        "saltpeter-wrapper",
        &["saltpeter-build", "saltpeter-proto", "saltpeter-tls"],
    ),
    ("xtask", &["saltpeter-proto", "saltpeter-tls"]),
];

pub fn run(_args: &[String]) -> Result<()> {
    let out = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["metadata", "--format-version", "1", "--no-deps"])
        .output()
        .context("could not run cargo metadata")?;
    if !out.status.success() {
        bail!(
            "cargo metadata failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let metadata: Value =
        serde_json::from_slice(&out.stdout).context("cargo metadata printed no JSON")?;
    let problems = check(&metadata, ALLOWED);
    if problems.is_empty() {
        eprintln!("The crate graph matches docs/ARCHITECTURE.md.");
        return Ok(());
    }
    for problem in &problems {
        eprintln!("{problem}");
    }
    bail!(
        "{} dependencies leave the drawn crate graph (xtask/src/deps.rs, docs/ARCHITECTURE.md)",
        problems.len()
    )
}

/// What in `metadata` (the output of `cargo metadata --no-deps`) breaks `allowed`, one line
/// per forbidden edge or undrawn package.
pub fn check(metadata: &Value, allowed: &[(&str, &[&str])]) -> Vec<String> {
    let packages = metadata["packages"].as_array().cloned().unwrap_or_default();
    let ours: BTreeSet<&str> = packages.iter().filter_map(|p| p["name"].as_str()).collect();
    let mut problems = Vec::new();
    for package in &packages {
        let Some(name) = package["name"].as_str() else {
            continue;
        };
        let Some((_, may)) = allowed.iter().find(|(n, _)| *n == name) else {
            problems.push(format!(
                "{name} is not in the drawn crate graph: add it to xtask/src/deps.rs"
            ));
            continue;
        };
        for dep in package["dependencies"].as_array().into_iter().flatten() {
            let Some(dep_name) = dep["name"].as_str() else {
                continue;
            };
            // `kind` is null for a normal dependency, "build" or "dev" otherwise.
            if dep["kind"].as_str() == Some("dev") || !ours.contains(dep_name) {
                continue;
            }
            if !may.contains(&dep_name) {
                problems.push(format!("{name} may not depend on {dep_name}"));
            }
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A package's name and its dependencies, each with its `kind` (`None` for a normal one).
    type Package<'a> = (&'a str, &'a [(&'a str, Option<&'a str>)]);

    fn metadata(packages: &[Package<'_>]) -> Value {
        let packages: Vec<Value> = packages
            .iter()
            .map(|(name, deps)| {
                let deps: Vec<Value> = deps
                    .iter()
                    .map(|(dep, kind)| serde_json::json!({ "name": dep, "kind": kind }))
                    .collect();
                serde_json::json!({ "name": name, "dependencies": deps })
            })
            .collect();
        serde_json::json!({ "packages": packages })
    }

    #[test]
    fn the_drawn_graph_passes() {
        let m = metadata(&[
            ("saltpeter-proto", &[]),
            ("saltpeter-engine", &[("saltpeter-proto", None)]),
            (
                "saltpeter-store",
                &[("saltpeter-proto", None), ("serde", None)],
            ),
        ]);
        assert_eq!(check(&m, ALLOWED), Vec::<String>::new());
    }

    #[test]
    fn a_store_that_imports_the_engine_is_rejected() {
        let m = metadata(&[
            ("saltpeter-store", &[("saltpeter-engine", None)]),
            ("saltpeter-engine", &[("saltpeter-store", None)]),
        ]);
        assert_eq!(
            check(&m, ALLOWED),
            vec!["saltpeter-store may not depend on saltpeter-engine".to_owned()]
        );
    }

    #[test]
    fn build_dependencies_count_and_dev_dependencies_do_not() {
        let m = metadata(&[
            ("saltpeter-config", &[("saltpeter-web", Some("build"))]),
            ("saltpeter-store", &[("saltpeter-web", Some("dev"))]),
            ("saltpeter-web", &[]),
        ]);
        assert_eq!(
            check(&m, ALLOWED),
            vec!["saltpeter-config may not depend on saltpeter-web".to_owned()]
        );
    }

    #[test]
    fn an_undrawn_crate_is_rejected() {
        let m = metadata(&[("saltpeter-extra", &[])]);
        assert_eq!(check(&m, ALLOWED).len(), 1);
    }
}
