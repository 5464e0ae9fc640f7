//! The release's packages and their checks: a .deb and an .rpm of each binary for each target
//! (cargo-deb and cargo-generate-rpm, configured in each crate's `Cargo.toml`, packaging the
//! cargo-zigbuild output without building again), tarballs, the Salt formula with the wrapper
//! binaries in its file tree, and `SHA256SUMS`.
//!
//! The checks read the packages with the packaging tools' own readers: `dpkg-deb -c/-f/-e/-x`,
//! a throwaway `dpkg --root` install and removal of the wrapper package into a temporary
//! directory (and a real `dpkg -i`/`dpkg -r` of it where nothing of the name is installed and we
//! are root), and `rpm -qlp` for the .rpm files. The file lists they expect are the ones
//! docs/DEPLOY.md gives.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail, ensure};

use super::tools::{output, path_with};
use super::{BINARIES, Target, VERSION, run_version};
use crate::ci::step;
use crate::e2e::master::{target_dir, workspace_root};

/// Files of the sp-master package (directories aside), as DEPLOY.md lists them.
pub const MASTER_FILES: [&str; 5] = [
    "/etc/saltpeter/saltpeter.yaml",
    "/lib/systemd/system/sp-master.service",
    "/usr/bin/sp-master",
    "/usr/share/doc/sp-master/DEPLOY.md",
    "/usr/share/doc/sp-master/copyright",
];

/// Files of the sp-wrapper package.
pub const WRAPPER_FILES: [&str; 3] = [
    "/usr/bin/sp-wrapper",
    "/usr/share/doc/sp-wrapper/README.md",
    "/usr/share/doc/sp-wrapper/copyright",
];

/// The rpm packages carry no copyright file (rpm keeps the license in its header).
fn rpm_files(name: &str) -> BTreeSet<String> {
    package_files(name)
        .into_iter()
        .filter(|f| !f.ends_with("/copyright"))
        .collect()
}

fn package_files(name: &str) -> BTreeSet<String> {
    let files: &[&str] = if name == "sp-master" {
        &MASTER_FILES
    } else {
        &WRAPPER_FILES
    };
    files.iter().map(|f| (*f).to_owned()).collect()
}

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

fn deb_name(name: &str, target: &Target) -> String {
    format!("{name}_{VERSION}-1_{}.deb", target.deb_arch)
}

fn rpm_name(name: &str, target: &Target) -> String {
    format!("{name}-{VERSION}-1.{}.rpm", target.arch)
}

/// Both .deb packages for `target`; returns their file names in `out`.
pub fn debs(target: &Target, tool_bin: &Path, out: &Path) -> Result<Vec<String>> {
    let mut names = Vec::new();
    for (pkg, name) in BINARIES {
        let file = deb_name(name, target);
        step(
            &format!("cargo deb {name} {}", target.deb_arch),
            cargo()
                .args(["deb", "-p", pkg, "--no-build", "--no-strip", "--target"])
                .arg(target.triple)
                .arg("--output")
                .arg(out.join(&file))
                .current_dir(workspace_root())
                .env("PATH", path_with(&[tool_bin])?),
        )?;
        names.push(file);
    }
    Ok(names)
}

/// Both .rpm packages for `target`.
pub fn rpms(target: &Target, tool_bin: &Path, out: &Path) -> Result<Vec<String>> {
    let mut names = Vec::new();
    for (pkg, name) in BINARIES {
        let file = rpm_name(name, target);
        step(
            &format!("cargo generate-rpm {name} {}", target.arch),
            cargo()
                .args(["generate-rpm", "-p"])
                .arg(Path::new("crates").join(crate_dir(pkg)))
                .arg("--target")
                .arg(target.triple)
                .arg("-o")
                .arg(out.join(&file))
                .current_dir(workspace_root())
                .env("PATH", path_with(&[tool_bin])?),
        )?;
        names.push(file);
    }
    Ok(names)
}

fn crate_dir(pkg: &str) -> &str {
    pkg.strip_prefix("saltpeter-").unwrap_or(pkg)
}

/// A gzip tarball of `dir` (inside `parent`) with fixed owners, order and times.
fn tar(parent: &Path, dir: &str, archive: &Path, stamp: &str) -> Result<()> {
    step(
        &format!("tar {}", archive.display()),
        Command::new("tar")
            .arg("-C")
            .arg(parent)
            .args(["--sort=name", "--owner=0", "--group=0", "--numeric-owner"])
            .arg(format!("--mtime=@{stamp}"))
            // gzip -n: no name or time in the gzip header either.
            .args(["--use-compress-program=gzip -n -9", "-cf"])
            .arg(archive)
            .arg(dir),
    )
}

fn install(from: &Path, to: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(parent) = to.parent() {
        fs::create_dir_all(parent)?;
    }
    fs::copy(from, to)
        .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
    fs::set_permissions(to, fs::Permissions::from_mode(mode))?;
    Ok(())
}

fn stage_dir() -> PathBuf {
    target_dir().join("dist-stage")
}

/// `sp-wrapper-<v>-<arch>-linux-gnu.tar.gz` (the binary and its README) and
/// `sp-master-<v>-<arch>-linux-gnu.tar.gz` (the binary, the unit, the example configuration and
/// DEPLOY.md), for installing without a package manager.
pub fn tarballs(target: &Target, out: &Path, stamp: &str) -> Result<Vec<String>> {
    let root = workspace_root();
    let stage = stage_dir();
    let mut names = Vec::new();
    for (pkg, name) in BINARIES {
        let dir = format!("{name}-{VERSION}-{}-linux-gnu", target.arch);
        let d = stage.join(&dir);
        if d.exists() {
            fs::remove_dir_all(&d)?;
        }
        install(&target.binary(name), &d.join(name), 0o755)?;
        if pkg == "saltpeter-master" {
            let p = root.join("packaging");
            install(
                &p.join("sp-master.service"),
                &d.join("sp-master.service"),
                0o644,
            )?;
            install(&p.join("saltpeter.yaml"), &d.join("saltpeter.yaml"), 0o644)?;
            install(&root.join("docs/DEPLOY.md"), &d.join("DEPLOY.md"), 0o644)?;
        } else {
            install(
                &root.join("crates/wrapper/README.md"),
                &d.join("README.md"),
                0o644,
            )?;
        }
        let file = format!("{dir}.tar.gz");
        tar(&stage, &dir, &out.join(&file), stamp)?;
        names.push(file);
    }
    Ok(names)
}

/// Hex SHA-256 of each file, as `sha256sum` prints them (run in `dir`).
fn sha256sum(dir: &Path, files: &[String]) -> Result<String> {
    output(
        Command::new("sha256sum").args(files).current_dir(dir),
        "sha256sum",
    )
}

/// `saltpeter-formula-<v>.tar.gz`: the formula (`salt/saltpeter`) with the wrapper of every
/// built architecture at `files/<v>/<arch>/sp-wrapper` and their `files/<v>/SHA256SUMS`, ready
/// to unpack into a Salt file root; plus `salt/pillar.example`.
pub fn formula(targets: &[Target], out: &Path, stamp: &str) -> Result<String> {
    let stage = stage_dir().join("formula");
    if stage.exists() {
        fs::remove_dir_all(&stage)?;
    }
    let dir = format!("saltpeter-formula-{VERSION}");
    let top = stage.join(&dir);
    copy_tree(&workspace_root().join("salt"), &top)?;
    let files = top.join("saltpeter/files").join(VERSION);
    let mut names = Vec::new();
    for target in targets {
        install(
            &target.binary("sp-wrapper"),
            &files.join(target.arch).join("sp-wrapper"),
            0o755,
        )?;
        names.push(format!("{}/sp-wrapper", target.arch));
    }
    fs::write(files.join("SHA256SUMS"), sha256sum(&files, &names)?)?;
    let file = format!("{dir}.tar.gz");
    tar(&stage, &dir, &out.join(&file), stamp)?;
    Ok(file)
}

fn copy_tree(from: &Path, to: &Path) -> Result<()> {
    fs::create_dir_all(to)?;
    for entry in fs::read_dir(from).with_context(|| format!("reading {}", from.display()))? {
        let entry = entry?;
        let path = entry.path();
        let dest = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_tree(&path, &dest)?;
        } else {
            install(&path, &dest, 0o644)?;
        }
    }
    Ok(())
}

/// `SHA256SUMS` over every artifact.
pub fn checksums(out: &Path, artifacts: &[String]) -> Result<()> {
    fs::write(out.join("SHA256SUMS"), sha256sum(out, artifacts)?)?;
    step(
        "sha256sum -c SHA256SUMS",
        Command::new("sha256sum")
            .args(["--quiet", "-c", "SHA256SUMS"])
            .current_dir(out),
    )
}

/// The regular files (and symbolic links) of a `dpkg-deb -c` listing, as absolute paths.
fn deb_listing(deb: &Path) -> Result<BTreeSet<String>> {
    let listing = output(Command::new("dpkg-deb").arg("-c").arg(deb), "dpkg-deb -c")?;
    Ok(listing
        .lines()
        .filter(|l| !l.starts_with('d'))
        .filter_map(|l| l.split_whitespace().nth(5))
        .map(|p| p.trim_start_matches('.').to_owned())
        .collect())
}

fn deb_field(deb: &Path, field: &str) -> Result<String> {
    Ok(output(
        Command::new("dpkg-deb").arg("-f").arg(deb).arg(field),
        "dpkg-deb -f",
    )?
    .trim()
    .to_owned())
}

fn expect_set(what: &str, got: &BTreeSet<String>, want: &BTreeSet<String>) -> Result<()> {
    if got != want {
        bail!(
            "{what}: unexpected {:?}, missing {:?}",
            got.difference(want).collect::<Vec<_>>(),
            want.difference(got).collect::<Vec<_>>()
        );
    }
    Ok(())
}

fn temp(name: &str) -> Result<PathBuf> {
    let dir = target_dir().join("dist-check").join(name);
    if dir.exists() {
        fs::remove_dir_all(&dir)?;
    }
    fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// Checks both .deb packages of `target`; returns what was checked, a line per package.
pub fn check_debs(target: &Target, out: &Path, commit: &str) -> Result<Vec<String>> {
    let mut lines = Vec::new();
    let native = target.arch == std::env::consts::ARCH;
    for (_, name) in BINARIES {
        let deb = out.join(deb_name(name, target));
        let what = deb_name(name, target);
        expect_set(&what, &deb_listing(&deb)?, &package_files(name))?;
        ensure!(deb_field(&deb, "Package")? == name, "{what}: Package");
        ensure!(
            deb_field(&deb, "Architecture")? == target.deb_arch,
            "{what}: Architecture"
        );
        ensure!(
            deb_field(&deb, "Version")? == format!("{VERSION}-1"),
            "{what}: Version"
        );
        ensure!(
            deb_field(&deb, "Depends")? == "libc6 (>= 2.17)",
            "{what}: Depends"
        );
        let control = temp(&format!("{name}-{}-control", target.deb_arch))?;
        step(
            &format!("dpkg-deb -e {what}"),
            Command::new("dpkg-deb").arg("-e").arg(&deb).arg(&control),
        )?;
        let conffiles = fs::read_to_string(control.join("conffiles")).unwrap_or_default();
        let mut note = String::new();
        if name == "sp-master" {
            ensure!(
                conffiles
                    .lines()
                    .any(|l| l == "/etc/saltpeter/saltpeter.yaml"),
                "{what}: the example configuration is not a conffile ({conffiles:?})"
            );
            let postinst = fs::read_to_string(control.join("postinst")).unwrap_or_default();
            ensure!(
                postinst.contains(
                    "install -d -m 0700 -o root -g root /var/lib/saltpeter /var/log/saltpeter"
                ),
                "{what}: postinst does not create the data and log directories"
            );
            note.push_str("conffile /etc/saltpeter/saltpeter.yaml, postinst makes 0700 dirs; ");
        } else {
            ensure!(conffiles.is_empty(), "{what}: unexpected conffiles");
        }
        let root = temp(&format!("{name}-{}-root", target.deb_arch))?;
        step(
            &format!("dpkg-deb -x {what}"),
            Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root),
        )?;
        let bin = root.join("usr/bin").join(name);
        ensure!(
            fs::read(&bin)? == fs::read(target.binary(name))?,
            "{what}: /usr/bin/{name} is not the binary that was built"
        );
        if native {
            let version = run_version(&bin)?;
            ensure!(
                version.ends_with(&format!("{VERSION} ({commit})")),
                "{version}"
            );
            note.push_str(&format!("runs: {version:?}"));
            if name == "sp-master" {
                let conf = root.join("etc/saltpeter");
                let checked = output(
                    Command::new(&bin).arg("check").arg("-c").arg(&conf),
                    "sp-master check of the packaged configuration",
                )?;
                note.push_str(&format!("; packaged config: {}", checked.trim()));
            }
        } else {
            note.push_str("binary matches the build");
        }
        lines.push(format!(
            "{what}: files as documented, Depends libc6 (>= 2.17); {note}"
        ));
    }
    lines.push(dpkg_root_install(target, out)?);
    if native && let Some(line) = real_install(target, out)? {
        lines.push(line);
    }
    Ok(lines)
}

/// `dpkg --root` install, `-L` and removal of the wrapper package in a temporary directory with
/// its own dpkg database: what `dpkg -i` does, without touching this machine's packages. (The
/// wrapper package has no maintainer scripts, which would run chrooted into the directory.)
fn dpkg_root_install(target: &Target, out: &Path) -> Result<String> {
    let deb = out.join(deb_name("sp-wrapper", target));
    let root = temp(&format!("dpkg-root-{}", target.deb_arch))?;
    let admin = root.join("var/lib/dpkg");
    for sub in ["info", "updates", "triggers"] {
        fs::create_dir_all(admin.join(sub))?;
    }
    fs::write(admin.join("status"), "")?;
    let dpkg = |args: &[&str]| {
        let mut cmd = Command::new("dpkg");
        cmd.arg(format!("--root={}", root.display()))
            .args([
                "--force-not-root",
                // Without a chroot: the package has no scripts, and the directory has no
                // ldconfig or shell to chroot into.
                "--force-script-chrootless",
                "--force-depends",
                "--force-architecture",
            ])
            .args(["--log=/dev/null"])
            .args(args);
        cmd
    };
    let mut install = dpkg(&["-i"]);
    install.arg(&deb);
    output(&mut install, "dpkg --root -i")?;
    let listed: BTreeSet<String> = output(&mut dpkg(&["-L", "sp-wrapper"]), "dpkg --root -L")?
        .lines()
        .filter(|l| !root.join(l.trim_start_matches('/')).is_dir())
        .map(str::to_owned)
        .collect();
    expect_set("dpkg -L sp-wrapper", &listed, &package_files("sp-wrapper"))?;
    let bin = root.join("usr/bin/sp-wrapper");
    ensure!(
        bin.is_file(),
        "dpkg --root did not install /usr/bin/sp-wrapper"
    );
    output(&mut dpkg(&["-r", "sp-wrapper"]), "dpkg --root -r")?;
    ensure!(!bin.exists(), "dpkg --root -r left /usr/bin/sp-wrapper");
    Ok(format!(
        "sp-wrapper {}: dpkg --root install, dpkg -L as documented, dpkg -r removes it",
        target.deb_arch
    ))
}

/// A real `dpkg -i` and `dpkg -r` of the wrapper package, only as root and only where no
/// package of that name and no `/usr/bin/sp-wrapper` exist (a shared machine keeps its own).
fn real_install(target: &Target, out: &Path) -> Result<Option<String>> {
    let root = nix::unistd::Uid::effective().is_root();
    let installed = Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", "sp-wrapper"])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("installed"));
    if !root || installed || Path::new("/usr/bin/sp-wrapper").exists() {
        eprintln!("    (no real dpkg -i: not root, or sp-wrapper already on this machine)");
        return Ok(None);
    }
    let deb = out.join(deb_name("sp-wrapper", target));
    let result = (|| -> Result<String> {
        output(Command::new("dpkg").arg("-i").arg(&deb), "dpkg -i")?;
        let listed: BTreeSet<String> =
            output(Command::new("dpkg").args(["-L", "sp-wrapper"]), "dpkg -L")?
                .lines()
                .filter(|l| !Path::new(l).is_dir())
                .map(str::to_owned)
                .collect();
        expect_set("dpkg -L sp-wrapper", &listed, &package_files("sp-wrapper"))?;
        run_version(Path::new("/usr/bin/sp-wrapper"))
    })();
    let removed = output(Command::new("dpkg").args(["-r", "sp-wrapper"]), "dpkg -r");
    let version = result?;
    removed?;
    ensure!(
        !Path::new("/usr/bin/sp-wrapper").exists(),
        "dpkg -r left /usr/bin/sp-wrapper"
    );
    Ok(Some(format!(
        "sp-wrapper {}: dpkg -i, dpkg -L as documented, /usr/bin/sp-wrapper --version {version:?}, dpkg -r",
        target.deb_arch
    )))
}

/// Checks both .rpm packages of `target` with rpm's own queries.
pub fn check_rpms(target: &Target, out: &Path) -> Result<Vec<String>> {
    let mut lines = Vec::new();
    for (_, name) in BINARIES {
        let file = rpm_name(name, target);
        let rpm = out.join(&file);
        let q = |args: &[&str]| {
            let mut cmd = Command::new("rpm");
            cmd.args(args).arg(&rpm);
            output(&mut cmd, &format!("rpm {}", args.join(" ")))
        };
        let listed: BTreeSet<String> = q(&["-qlp"])?.lines().map(str::to_owned).collect();
        expect_set(&format!("rpm -qlp {file}"), &listed, &rpm_files(name))?;
        let head = q(&["-qp", "--qf", "%{NAME} %{VERSION} %{RELEASE} %{ARCH}"])?;
        ensure!(
            head == format!("{name} {VERSION} 1 {}", target.arch),
            "{file}: {head}"
        );
        let mut note = String::new();
        if name == "sp-master" {
            let config = q(&["-qcp"])?;
            ensure!(
                config.trim() == "/etc/saltpeter/saltpeter.yaml",
                "{file}: config files {config:?}"
            );
            let scripts = q(&["-qp", "--scripts"])?;
            ensure!(
                scripts.contains(
                    "install -d -m 0700 -o root -g root /var/lib/saltpeter /var/log/saltpeter"
                ),
                "{file}: no post-install script for the directories: {scripts}"
            );
            note.push_str("; config file /etc/saltpeter/saltpeter.yaml, %post makes 0700 dirs");
        }
        let requires = q(&["-qp", "--requires"])?;
        ensure!(
            requires.lines().any(|l| l.starts_with("glibc >= 2.17")),
            "{file}: requires {requires:?}"
        );
        lines.push(format!(
            "{file}: rpm -qlp as documented, {head}, requires glibc >= 2.17{note}"
        ));
    }
    Ok(lines)
}

/// The formula tarball holds the states and a wrapper per architecture whose `SHA256SUMS` line
/// matches it.
pub fn check_formula(targets: &[Target], out: &Path) -> Result<Vec<String>> {
    let dir = temp("formula")?;
    let file = format!("saltpeter-formula-{VERSION}.tar.gz");
    step(
        &format!("tar -x {file}"),
        Command::new("tar")
            .arg("-C")
            .arg(&dir)
            .arg("-xzf")
            .arg(out.join(&file)),
    )?;
    let top = dir.join(format!("saltpeter-formula-{VERSION}"));
    for state in [
        "saltpeter/wrapper.sls",
        "saltpeter/master.sls",
        "saltpeter/map.jinja",
        "pillar.example",
    ] {
        ensure!(top.join(state).is_file(), "{file}: no {state}");
    }
    let files = top.join("saltpeter/files").join(VERSION);
    step(
        "sha256sum -c formula SHA256SUMS",
        Command::new("sha256sum")
            .args(["--quiet", "-c", "SHA256SUMS"])
            .current_dir(&files),
    )?;
    let arches: Vec<&str> = targets.iter().map(|t| t.arch).collect();
    Ok(vec![format!(
        "{file}: states, pillar example, sp-wrapper for {} matching files/{VERSION}/SHA256SUMS",
        arches.join(", ")
    )])
}
