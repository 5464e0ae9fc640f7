//! The build scripts' shared part: embeds the git commit a binary is built from as
//! `SP_GIT_COMMIT`, for `--version`. `crates/master/build.rs` and `crates/wrapper/build.rs` call
//! [`embed_git_commit`] and nothing else.
//!
//! `cargo xtask dist` passes the commit in the `SP_GIT_COMMIT` environment variable, so a release
//! build says which commit it is even where no `.git` exists (a source tarball); otherwise git is
//! asked, and a tree without git says `unknown`.

// What no other crate uses is `pub(crate)`, so the compiler reports it once nothing calls it.
#![warn(unreachable_pub)]

use std::process::Command;

/// Prints the cargo instructions that set `SP_GIT_COMMIT` and rerun the build script when the
/// commit changes. Call it from a build script only: it writes to standard output for cargo.
pub fn embed_git_commit() {
    println!("cargo:rerun-if-env-changed=SP_GIT_COMMIT");
    let commit = std::env::var("SP_GIT_COMMIT")
        .ok()
        .filter(|c| !c.trim().is_empty())
        .or_else(from_git)
        .unwrap_or_else(|| "unknown".to_owned());
    println!("cargo:rustc-env=SP_GIT_COMMIT={}", commit.trim());
}

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
        .filter(|s| !s.is_empty())
}

/// The short commit of HEAD. The build script runs again when HEAD moves: when `HEAD` itself
/// changes (a checkout), when the branch it names changes (a commit), or when refs are packed.
fn from_git() -> Option<String> {
    let commit = git(&["rev-parse", "--short=7", "HEAD"])?;
    let mut watched = vec!["HEAD".to_owned(), "packed-refs".to_owned()];
    if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"]) {
        watched.push(branch);
    }
    for name in watched {
        if let Some(path) = git(&["rev-parse", "--git-path", &name]) {
            println!("cargo:rerun-if-changed={path}");
        }
    }
    Some(commit)
}
