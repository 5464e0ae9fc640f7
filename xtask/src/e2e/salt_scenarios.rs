//! The Salt scenarios: `sp-master` with `launcher: salt` driving a real
//! salt-master and three real salt-minions ([`super::salt_env`]), each scenario printing what
//! it measured. Several masters share the one Salt installation:
//!
//! - `main`: targeting (glob, list, compound), `number_of_targets`, `batch_size`, secrets kept
//!   out of every argv, `kill -9` of one wrapper, an API kill, legacy mode (`use_wrapper:
//!   false`), a forged and a replayed result refused (every wrapper here signs its `connect`
//!   with its minion's real Salt key, see [`super::salt_identity`]), and last, on its own, a
//!   stopped minion;
//! - `maint`: `minion-b` under maintenance, and `allow_legacy_wrappers: true` for a job run by
//!   the original Python wrapper (`saltpeter` 0.9.30 from PyPI, see
//!   [`super::salt_env::ORIGINAL_WRAPPER`]) through Salt;
//! - `nosalt`: a Salt config whose salt-master is not running, so every failure path reports
//!   Salt's own words;
//! - `ha1` and `ha2`: two masters on one throwaway PostgreSQL, started by their scenario
//!   ([`super::salt_cluster`]), whose holder of the job is killed mid-run.
//!
//! Before any job runs, the wrapper is deployed the way a fleet gets it: `state.apply
//! saltpeter.wrapper` of the repository's formula, from the salt-master's file server. A second
//! apply must change nothing, and `sp-master fleet` must report every minion missing its wrapper
//! before the first apply and current (this master's version, its machines port reachable)
//! after it.
//!
//! The scenarios run in [`LANES`] concurrent lanes, then the stopped-minion scenario alone,
//! since stopping `minion-c` changes every other scenario's targets. Lanes rather than one
//! thread per scenario: every `salt` call is a Python process that needs about a second of CPU
//! to start, and a dozen at once on two cores (measured: 12 concurrent `test.ping`s took 54 s
//! each and most minions missed the timeout) would test the machine, not the launcher.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use serde_json::Value;

use super::Outcome;
use super::master::{Master, binary, machine, target_dir};
use super::salt_env::{MINIONS, RELEASE_VERSION, SaltEnv, ensure_venv};

/// A job that never fires by itself; scenarios start runs through the API.
pub(super) fn job(name: &str, body: &str) -> String {
    format!(
        "{name}:\n  sec: 0\n  min: 0\n  hour: 0\n  dom: 1\n  mon: 1\n  dow: '*'\n  year: 2099\n{body}\n"
    )
}

/// Settings for a master that launches through this Salt. The machines endpoint speaks TLS as
/// it does by default beyond loopback, so wrappers reach it over `wss://` with the pinned
/// self-signed certificate (or the operator's, where a scenario sets one).
pub(super) fn settings(salt: &SaltEnv, extra: &str) -> Result<String> {
    Ok(format!(
        "saltpeter_config:\n  launcher: salt\n  salt_bin: '{}'\n  salt_config_dir: '{}'\n  \
         ping_timeout: 20\n  default_saltpeter_server_host: 127.0.0.1\n  default_wrapper_path: '{}'\n  \
         logdir: '@DIR@/log'\n  data_dir: '@DIR@/data'\n  default_wrapper_logdir: '@DIR@/wlog'\n  \
         default_wrapper_loglevel: debug\n  api_ws_bind_addr: 127.0.0.1\n  api_ws_port: {}\n  \
         machines_ws_bind_addr: 127.0.0.1\n  machines_ws_port: {}\n  machines_tls: on\n{extra}",
        salt.salt_bin.display(),
        salt.master_conf.display(),
        salt.sp_wrapper_shim()?.display(),
        // Port 0 is not a valid setting; free ports keep these masters off 8888/8889.
        free_port()?,
        free_port()?,
    ))
}

/// Everything the "tricky" environment value holds: quotes, a YAML comment sign, non-ASCII, a
/// backslash, Jinja and shell syntax. Salt must hand it to the command unchanged.
const TRICKY: &str = r#"a "q" 'x' # é 😀 \ {{ grains['id'] }} $HOME"#;

fn all_minions() -> BTreeSet<String> {
    MINIONS.iter().map(|(id, _)| (*id).to_owned()).collect()
}

pub fn salt() -> Result<Vec<Outcome>> {
    let venv = ensure_venv()?;
    let setup = format!(
        "Salt venv {} in {:.1} s",
        if venv.installed {
            "installed"
        } else {
            "reused"
        },
        venv.took.as_secs_f64()
    );
    let dir = target_dir()
        .join("e2e")
        .join(format!("salt-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let mut salt = SaltEnv::start(&venv, &dir.join("salt"))?;
    let setup = format!(
        "{setup}; salt-master + 3 minions answering test.ping after {:.1} s (logs under {})",
        salt.ready_after.as_secs_f64(),
        salt.roots.display()
    );
    let secret = format!(
        "{:x}{}",
        std::process::id(),
        Instant::now().elapsed().subsec_nanos()
    );
    let tricky = TRICKY.replace('\'', "''");
    let jobs = [
        job(
            "glob",
            &format!(
                "  targets: 'minion-*'\n  command: printf '%s|%s|%s\\n' \"$SP_MACHINE_ID\" \"$TRICKY\" \"$(cat /proc/sys/kernel/hostname)\"\n  env:\n    TRICKY: '{tricky}'"
            ),
        ),
        job("list", "  targets: [minion-a, minion-c]\n  target_type: list\n  command: echo list on $SP_MACHINE_ID"),
        job(
            "compound",
            "  targets: 'G@sp_role:web and not L@minion-b'\n  target_type: compound\n  command: echo compound on $SP_MACHINE_ID",
        ),
        job("subset", "  targets: 'minion-*'\n  number_of_targets: 2\n  command: echo picked $SP_MACHINE_ID"),
        job("batched", "  targets: 'minion-*'\n  batch_size: 1\n  command: sleep 2; echo batch $SP_MACHINE_ID"),
        job(
            "secrets",
            &format!(
                "  targets: 'minion-*'\n  command: ': cmd-secret-{secret}; sleep 6; echo done'\n  env:\n    E2E_SECRET: env-secret-{secret}"
            ),
        ),
        job("lost", "  targets: 'minion-*'\n  command: sleep 22\n  timeout: 0"),
        job("killed", "  targets: 'minion-*'\n  command: sleep 120"),
        job(
            "legacy",
            "  targets: 'minion-*'\n  use_wrapper: false\n  command: echo \"legacy $SP_JOB_NAME [$SP_MACHINE_ID$(test -n \"$SP_RUN_TOKEN\" && echo token)]\"; echo oops >&2; exit 3",
        ),
        job("stopped", "  targets: 'minion-*'\n  command: echo alive on $SP_MACHINE_ID"),
        super::salt_identity::JOB.to_owned(),
    ]
    .concat();
    let main = Master::start(
        &dir.join("main"),
        &[("settings.yaml", settings(&salt, "")?), ("jobs.yaml", jobs)],
    )?;
    let site = venv.site_packages()?;
    let original = salt.wrapper_shim(
        "original-wrapper-shim",
        &format!(
            "{} {}",
            venv.bin("python").display(),
            site.join("saltpeter/wrapper.py").display()
        ),
    )?;
    let maint_jobs = [
        job("maint", "  targets: 'minion-*'\n  command: echo maint on $SP_MACHINE_ID"),
        job(
            "original",
            &format!(
                "  targets: [minion-a]\n  target_type: list\n  wrapper_path: '{}'\n  command: printf 'line1\\nline2 é\\n'; exit 7",
                original.display()
            ),
        ),
    ]
    .concat();
    let maint = Master::start(
        &dir.join("maint"),
        &[
            (
                "settings.yaml",
                settings(
                    &salt,
                    "  allow_legacy_wrappers: true\nsaltpeter_maintenance:\n  machines: [minion-b]\n",
                )?,
            ),
            ("jobs.yaml", maint_jobs),
        ],
    )?;
    // A Salt config whose master is not running: what an unreachable Salt looks like.
    let nowhere = dir.join("nosalt-conf");
    std::fs::create_dir_all(&nowhere)?;
    std::fs::write(
        nowhere.join("master"),
        format!(
            "root_dir: {}/nowhere\nret_port: {}\npublish_port: {}\n",
            super::salt_env::socket_dir().display(),
            free_port()?,
            free_port()?
        ),
    )?;
    let nosalt_settings = settings(&salt, "")?.replace(
        &format!("salt_config_dir: '{}'", salt.master_conf.display()),
        &format!("salt_config_dir: '{}'", nowhere.display()),
    );
    let nosalt_jobs = [
        job(
            "unreachable_list",
            "  targets: [minion-a, minion-b]\n  target_type: list\n  command: echo never",
        ),
        job(
            "unreachable_glob",
            "  targets: 'minion-*'\n  command: echo never",
        ),
    ]
    .concat();
    let nosalt = Master::start(
        &dir.join("nosalt"),
        &[
            ("settings.yaml", nosalt_settings),
            ("jobs.yaml", nosalt_jobs),
        ],
    )?;

    // A master with an operator's certificate, signed by a CA the wrappers are pointed at.
    let op_dir = dir.join("op");
    let pki = operator_pki(&op_dir.join("pki"))?;
    let op_jobs = job(
        "operator",
        "  targets: 'minion-*'\n  command: echo verified by the CA on $SP_MACHINE_ID",
    );
    let operator = Master::start(
        &op_dir,
        &[
            (
                "settings.yaml",
                settings(
                    &salt,
                    &format!(
                        "  tls_cert: '{}'\n  tls_key: '{}'\n  tls_ca: '{}'\n",
                        pki.cert.display(),
                        pki.key.display(),
                        pki.ca.display()
                    ),
                )?,
            ),
            ("jobs.yaml", op_jobs),
        ],
    )?;

    let mut outcomes: Vec<Outcome> = vec![("salt: set-up".to_owned(), Ok(setup))];
    outcomes.push((
        "salt: sp-master fleet before the formula: every minion missing its wrapper".to_owned(),
        fleet(&main, false),
    ));
    outcomes.push((
        "salt: state.apply saltpeter.wrapper installs the wrapper; a re-apply changes nothing"
            .to_owned(),
        deploy(&salt),
    ));
    outcomes.push((
        "salt: sp-master fleet after the formula: every minion current and reachable".to_owned(),
        fleet(&main, true),
    ));
    let (m, mt, ns, op) = (&main, &maint, &nosalt, &operator);
    let secret_ref = secret.as_str();
    let roots = salt.roots.clone();
    let (salt_ref, ha_dir) = (&salt, dir.join("ha"));
    let phase1: Vec<Scenario<'_>> = vec![
        // First: the longest, so its lane has the least else to do.
        (
            "salt: two masters on one PostgreSQL; kill -9 of the holder mid-output; the other ends every minion exact, no 253; run forwarded",
            Box::new(move || super::salt_cluster::failover(salt_ref, &ha_dir)),
        ),
        (
            "salt: glob targeting over wss:// pinned; ids not the host name; env passes Salt unchanged",
            Box::new(move || glob(m)),
        ),
        ("salt: list targeting", Box::new(move || list(m))),
        (
            "salt: compound targeting (grain and not list)",
            Box::new(move || compound(m)),
        ),
        (
            "salt: number_of_targets: 2 hits exactly 2",
            Box::new(move || subset(m)),
        ),
        (
            "salt: batch_size: 1 runs machines one after another",
            Box::new(move || batched(m)),
        ),
        (
            "salt: command and env never in any /proc/*/cmdline",
            Box::new(move || secrets(m, secret_ref)),
        ),
        (
            "salt: kill -9 of one wrapper gives 253 there, 0 elsewhere",
            Box::new(move || lost(m)),
        ),
        (
            "salt: API kill gives 143 on every machine",
            Box::new(move || killed(m)),
        ),
        (
            "salt: use_wrapper: false runs the command through cmd.run_all",
            Box::new(move || legacy(m)),
        ),
        (
            "salt: a maintenance machine is skipped",
            Box::new(move || maintenance(mt)),
        ),
        (
            "salt: the original Python wrapper (saltpeter 0.9.30) through Salt",
            Box::new(move || original_wrapper(mt)),
        ),
        (
            "salt: an unreachable salt-master is reported in Salt's words",
            Box::new(move || unreachable(ns)),
        ),
        (
            "salt: a minion's key speaks only for that minion, and only until its result",
            Box::new(move || super::salt_identity::forged(m, &roots)),
        ),
        (
            "salt: an operator's certificate, verified by wrappers against tls_ca",
            Box::new(move || operator_certificate(op)),
        ),
    ];
    outcomes.extend(run_all(phase1));
    let stopped = stopped_minion(&main, &mut salt);
    outcomes.push(("salt: a stopped minion gets 255".to_owned(), stopped));
    Ok(outcomes)
}

/// A named scenario, borrowing the masters it drives.
type Scenario<'a> = (
    &'static str,
    Box<dyn FnOnce() -> Result<String> + Send + 'a>,
);

/// How many Salt scenarios run at once.
const LANES: usize = 4;

/// Runs the scenarios in [`LANES`] threads, each taking every LANES-th scenario in order (so
/// put the long ones first), and returns the outcomes in the given order.
fn run_all(scenarios: Vec<Scenario<'_>>) -> Vec<Outcome> {
    let count = scenarios.len();
    let mut lanes: Vec<Vec<(usize, Scenario<'_>)>> = (0..LANES).map(|_| Vec::new()).collect();
    for (i, scenario) in scenarios.into_iter().enumerate() {
        lanes[i % LANES].push((i, scenario));
    }
    let mut outcomes: Vec<(usize, Outcome)> = std::thread::scope(|s| {
        let handles: Vec<_> = lanes
            .into_iter()
            .map(|lane| {
                s.spawn(move || {
                    lane.into_iter()
                        .map(|(i, (name, f))| (i, (name.to_owned(), f())))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| {
                h.join().unwrap_or_else(|_| {
                    vec![(
                        count,
                        ("salt lane".to_owned(), Err(anyhow::anyhow!("panicked"))),
                    )]
                })
            })
            .collect()
    });
    outcomes.sort_by_key(|(i, _)| *i);
    outcomes.into_iter().map(|(_, o)| o).collect()
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// A run watched from fire to end.
struct Watched {
    run: Value,
    /// From the fire to the harness seeing the end.
    took: Duration,
}

/// Fires `job` and polls its run until it ends.
fn fire_and_watch(m: &Master, job: &str, limit: Duration) -> Result<Watched> {
    let fired = Instant::now();
    let instance = m.run_job(job)?;
    watch(m, &instance, fired, limit)
}

fn watch(m: &Master, instance: &str, fired: Instant, limit: Duration) -> Result<Watched> {
    loop {
        let run = m.run(instance)?;
        if run["ended"].is_string() {
            return Ok(Watched {
                run,
                took: fired.elapsed(),
            });
        }
        ensure!(
            fired.elapsed() < limit,
            "{instance} did not end within {limit:?}: {run}"
        );
        sleep(Duration::from_millis(100));
    }
}

/// Seconds since the epoch of an RFC 3339 time as the API writes it
/// (`2026-11-28T03:39:13.219581+00:00`).
fn epoch(t: &str) -> Option<f64> {
    let (date, rest) = t.split_once('T')?;
    let mut d = date.split('-').map(str::parse::<i64>);
    let (y, mo, da) = (d.next()?.ok()?, d.next()?.ok()?, d.next()?.ok()?);
    let offset_at = rest.find(['+', '-', 'Z']).unwrap_or(rest.len());
    let (clock, zone) = rest.split_at(offset_at);
    let mut c = clock.split(':');
    let (h, mi) = (
        c.next()?.parse::<f64>().ok()?,
        c.next()?.parse::<f64>().ok()?,
    );
    let s = c.next()?.parse::<f64>().ok()?;
    let zone_secs = match zone.get(..1) {
        Some(sign @ ("+" | "-")) => {
            let mut z = zone[1..].split(':');
            let v = z.next()?.parse::<f64>().ok()? * 3600.0 + z.next()?.parse::<f64>().ok()? * 60.0;
            if sign == "+" { v } else { -v }
        }
        _ => 0.0,
    };
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if mo <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (mo + 9) % 12;
    let doy = (153 * mp + 2) / 5 + da - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days as f64 * 86_400.0 + h * 3600.0 + mi * 60.0 + s - zone_secs)
}

fn machines(run: &Value) -> BTreeSet<String> {
    run["machines"]
        .as_object()
        .map(|o| o.keys().cloned().collect())
        .unwrap_or_default()
}

fn short(id: &str) -> &str {
    id.strip_prefix("minion-").unwrap_or(id)
}

/// "fire→start a 6.9 s, b 7.0 s; run 8.1 s", from the API: each machine's `starttime` (the
/// master's time of its wrapper's `start`) and the run's `ended`, against the run's `started`.
fn figures(w: &Watched) -> String {
    let started = w.run["started"].as_str().and_then(epoch);
    let since = |t: &Value| Some(t.as_str().and_then(epoch)? - started?);
    let starts: Vec<String> = w.run["machines"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(name, mach)| match since(&mach["starttime"]) {
            Some(d) => format!("{} {d:.1} s", short(name)),
            None => format!("{} -", short(name)),
        })
        .collect();
    let run = since(&w.run["ended"]).map_or("-".to_owned(), |d| format!("{d:.1} s"));
    format!("fire→start {}; run {run}", starts.join(", "))
}

fn expect_codes(run: &Value, want: &[(&str, i64)]) -> Result<()> {
    let names: BTreeSet<String> = want.iter().map(|(n, _)| (*n).to_owned()).collect();
    ensure!(
        machines(run) == names,
        "machines {:?}, expected {names:?}: {run}",
        machines(run)
    );
    for (name, code) in want {
        let mach = machine(run, name);
        ensure!(
            mach["retcode"] == *code,
            "{name}: expected {code}, got {} ({})",
            mach["retcode"],
            mach["output"]
        );
    }
    Ok(())
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .unwrap_or_default()
        .trim()
        .to_owned()
}

/// Checks that the machines port of `m` speaks only TLS: a plain WebSocket upgrade gets no
/// HTTP answer. Wrappers that reported there therefore came over `wss://`.
fn plain_refused(m: &Master) -> Result<()> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&m.machines, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(
        b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
          Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    )?;
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    ensure!(
        !answer.starts_with(b"HTTP/"),
        "the machines port answered plain HTTP: {:?}",
        String::from_utf8_lossy(&answer)
    );
    Ok(())
}

/// `text` without terminal colour sequences (the master's log may carry them).
pub(super) fn plain_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut in_escape = false;
    for c in text.chars() {
        match (in_escape, c) {
            (false, '\u{1b}') => in_escape = true,
            (false, c) => out.push(c),
            (true, 'm') => in_escape = false,
            (true, _) => {}
        }
    }
    out
}

/// The files of an operator's PKI for the e2e: a CA and a server certificate it signed.
struct OperatorPki {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

/// Makes a CA and a certificate for 127.0.0.1 signed by it (what an operator would bring).
fn operator_pki(dir: &Path) -> Result<OperatorPki> {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    std::fs::create_dir_all(dir)?;
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "saltpeter e2e CA");
    let ca = ca_params.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate()?;
    let cert = CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])?
        .signed_by(&key, &issuer)?;
    let pki = OperatorPki {
        ca: dir.join("ca.pem"),
        cert: dir.join("server.pem"),
        key: dir.join("server-key.pem"),
    };
    std::fs::write(&pki.ca, ca.pem())?;
    std::fs::write(&pki.cert, cert.pem())?;
    std::fs::write(&pki.key, key.serialize_pem())?;
    Ok(pki)
}

fn operator_certificate(m: &Master) -> Result<String> {
    let w = fire_and_watch(m, "operator", Duration::from_secs(90))?;
    expect_codes(&w.run, &[("minion-a", 0), ("minion-b", 0), ("minion-c", 0)])?;
    plain_refused(m)?;
    // No self-signed certificate is made when the operator brings one.
    ensure!(
        !m.dir.join("data/tls/cert.pem").exists(),
        "a self-signed certificate was made beside the operator's"
    );
    Ok(format!(
        "wss:// verified by tls_ca on a, b, c; {}",
        figures(&w)
    ))
}

fn glob(m: &Master) -> Result<String> {
    let w = fire_and_watch(m, "glob", Duration::from_secs(90))?;
    expect_codes(&w.run, &[("minion-a", 0), ("minion-b", 0), ("minion-c", 0)])?;
    let host = host_name();
    for (id, _) in MINIONS {
        ensure!(
            id != host,
            "minion id {id} equals the host name; the test would prove nothing"
        );
        let output = machine(&w.run, id)["output"].as_str().unwrap_or_default();
        let want = format!("{id}|{TRICKY}|{host}\n");
        ensure!(output == want, "{id}: output {output:?}, expected {want:?}");
    }
    plain_refused(m)?;
    let pinned = plain_text(&m.log()).contains("machines_tls=true");
    ensure!(
        pinned,
        "the master log does not say the machines endpoint speaks TLS"
    );
    Ok(format!("over wss:// pinned; {}", figures(&w)))
}

fn list(m: &Master) -> Result<String> {
    let w = fire_and_watch(m, "list", Duration::from_secs(90))?;
    expect_codes(&w.run, &[("minion-a", 0), ("minion-c", 0)])?;
    ensure!(
        machine(&w.run, "minion-c")["output"] == "list on minion-c\n",
        "{}",
        w.run
    );
    Ok(figures(&w))
}

fn compound(m: &Master) -> Result<String> {
    let w = fire_and_watch(m, "compound", Duration::from_secs(90))?;
    expect_codes(&w.run, &[("minion-a", 0)])?;
    Ok(figures(&w))
}

fn subset(m: &Master) -> Result<String> {
    let w = fire_and_watch(m, "subset", Duration::from_secs(90))?;
    let picked = machines(&w.run);
    ensure!(
        picked.len() == 2 && picked.is_subset(&all_minions()),
        "picked {picked:?}"
    );
    for name in &picked {
        ensure!(machine(&w.run, name)["retcode"] == 0, "{name}: {}", w.run);
    }
    let names: Vec<&str> = picked.iter().map(|s| short(s)).collect();
    Ok(format!("picked {}; {}", names.join("+"), figures(&w)))
}

fn batched(m: &Master) -> Result<String> {
    let w = fire_and_watch(m, "batched", Duration::from_secs(150))?;
    expect_codes(&w.run, &[("minion-a", 0), ("minion-b", 0), ("minion-c", 0)])?;
    let mut spans: Vec<(f64, f64, String)> = Vec::new();
    for name in machines(&w.run) {
        let mach = machine(&w.run, &name);
        let start = mach["starttime"]
            .as_str()
            .and_then(epoch)
            .context("starttime")?;
        let end = mach["endtime"]
            .as_str()
            .and_then(epoch)
            .context("endtime")?;
        spans.push((start, end, name));
    }
    spans.sort_by(|a, b| a.0.total_cmp(&b.0));
    for pair in spans.windows(2) {
        ensure!(
            pair[0].1 <= pair[1].0,
            "{} ran {:.2}..{:.2} and {} began at {:.2}: batches overlap",
            pair[0].2,
            pair[0].0,
            pair[0].1,
            pair[1].2,
            pair[1].0
        );
    }
    let base = spans.first().map_or(0.0, |s| s.0);
    let shown: Vec<String> = spans
        .iter()
        .map(|(s, e, n)| format!("{} {:.1}-{:.1}", short(n), s - base, e - base))
        .collect();
    Ok(format!(
        "intervals (s) {}; run {:.1} s",
        shown.join(", "),
        w.took.as_secs_f64()
    ))
}

/// Every process's command line, as (pid, parent pid, text with NULs as spaces).
fn cmdlines() -> Vec<(u32, u32, String)> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| {
            let e = e.ok()?;
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let raw = std::fs::read(e.path().join("cmdline")).ok()?;
            // Field 4 of stat, after the parenthesised command name.
            let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
            let ppid = stat
                .rsplit(')')
                .next()
                .and_then(|rest| rest.split_whitespace().nth(1))
                .and_then(|p| p.parse().ok())
                .unwrap_or(0);
            Some((pid, ppid, String::from_utf8_lossy(&raw).replace('\0', " ")))
        })
        .collect()
}

fn secrets(m: &Master, secret: &str) -> Result<String> {
    let cmd_secret = format!("cmd-secret-{secret}");
    let env_secret = format!("env-secret-{secret}");
    let fired = Instant::now();
    let instance = m.run_job("secrets")?;
    // Scan every process's argv until the run ends, in parallel with the launch and the job.
    let done = std::sync::atomic::AtomicBool::new(false);
    let (hits, scans) = std::thread::scope(|s| {
        let scanner = s.spawn(|| {
            let mut hits: Vec<(u32, u32, &'static str, String)> = Vec::new();
            let mut scans = 0u32;
            while !done.load(std::sync::atomic::Ordering::Relaxed)
                && fired.elapsed() < Duration::from_secs(120)
            {
                for (pid, ppid, line) in cmdlines() {
                    for (what, needle) in [
                        ("command", cmd_secret.as_str()),
                        ("env", env_secret.as_str()),
                        ("token", "SP_RUN_TOKEN"),
                        // The variable's value, not its name: the job's shell runs
                        // `eval "$SP_COMMAND"`.
                        ("env", "SP_COMMAND="),
                    ] {
                        if line.contains(needle)
                            && !hits.iter().any(|(p, _, w, _)| *p == pid && *w == what)
                        {
                            hits.push((pid, ppid, what, line.clone()));
                        }
                    }
                }
                scans += 1;
                sleep(Duration::from_millis(20));
            }
            (hits, scans)
        });
        let watched = watch(m, &instance, fired, Duration::from_secs(90));
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        let found = scanner.join().unwrap_or_default();
        (watched.map(|w| (w, found.0)), found.1)
    });
    let (w, hits) = hits?;
    expect_codes(&w.run, &[("minion-a", 0), ("minion-b", 0), ("minion-c", 0)])?;
    // The wrapper's shell reads the command from its environment (`sh -c 'eval "$SP_COMMAND"'`),
    // so not even the job's own shell may show it.
    if let Some((pid, ppid, what, line)) = hits.first() {
        anyhow::bail!("the {what} secret is in the argv of pid {pid} (parent {ppid}): {line:?}");
    }
    ensure!(scans >= 20, "only {scans} scans of /proc during the run");
    Ok(format!(
        "{scans} scans of /proc over {:.1} s: command, env and token in no process's argv",
        w.took.as_secs_f64()
    ))
}

fn lost(m: &Master) -> Result<String> {
    let fired = Instant::now();
    let instance = m.run_job("lost")?;
    let run = m.wait_run(&instance, Duration::from_secs(120), |r| {
        MINIONS.iter().all(|(id, _)| {
            machine(r, id)["status"] == "running" && machine(r, id)["wrapper_pid"].is_u64()
        })
    })?;
    let pid = machine(&run, "minion-b")["wrapper_pid"]
        .as_u64()
        .context("wrapper pid")?;
    let status = Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()?;
    ensure!(status.success(), "kill -9 {pid} failed");
    let killed = Instant::now();
    let run = m.wait_run(&instance, Duration::from_secs(25), |r| {
        machine(r, "minion-b")["retcode"].is_i64()
    })?;
    let verdict = killed.elapsed();
    ensure!(
        machine(&run, "minion-b")["retcode"] == 253,
        "minion-b: {}",
        machine(&run, "minion-b")
    );
    ensure!(
        verdict <= Duration::from_secs(16),
        "253 came {verdict:?} after the kill (limit 16 s)"
    );
    let w = watch(m, &instance, fired, Duration::from_secs(90))?;
    expect_codes(
        &w.run,
        &[("minion-a", 0), ("minion-b", 253), ("minion-c", 0)],
    )?;
    Ok(format!(
        "253 on b {:.1} s after kill -9; a and c 0; run {:.1} s",
        verdict.as_secs_f64(),
        w.took.as_secs_f64()
    ))
}

fn killed(m: &Master) -> Result<String> {
    let fired = Instant::now();
    let instance = m.run_job("killed")?;
    let run = m.wait_run(&instance, Duration::from_secs(120), |r| {
        MINIONS
            .iter()
            .all(|(id, _)| machine(r, id)["status"] == "running")
    })?;
    let pids: Vec<u64> = MINIONS
        .iter()
        .filter_map(|(id, _)| machine(&run, id)["pid"].as_u64())
        .collect();
    let asked = Instant::now();
    let r = super::http::post(m.api, &format!("/api/v1/runs/{instance}/kill"))?;
    ensure!(r.status == 202, "kill: HTTP {} {}", r.status, r.body);
    let w = watch(m, &instance, fired, Duration::from_secs(60))?;
    expect_codes(
        &w.run,
        &[("minion-a", 143), ("minion-b", 143), ("minion-c", 143)],
    )?;
    ensure!(
        w.run["success"] == false,
        "a killed run must not count as a success"
    );
    for pid in pids {
        ensure!(
            !Path::new(&format!("/proc/{pid}/cmdline")).exists() || zombie(pid),
            "job process {pid} survived"
        );
    }
    Ok(format!(
        "143 on a, b, c {:.2} s after the request",
        asked.elapsed().as_secs_f64()
    ))
}

fn zombie(pid: u64) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit(')')
            .next()
            .is_some_and(|r| r.trim_start().starts_with('Z'))
    })
}

fn legacy(m: &Master) -> Result<String> {
    let w = fire_and_watch(m, "legacy", Duration::from_secs(90))?;
    expect_codes(&w.run, &[("minion-a", 3), ("minion-b", 3), ("minion-c", 3)])?;
    for (id, _) in MINIONS {
        let mach = machine(&w.run, id);
        // No SP_MACHINE_ID and no run token reach a command run without the wrapper.
        ensure!(
            mach["output"] == "legacy legacy []\noops\n",
            "{id}: output {}",
            mach["output"]
        );
        ensure!(mach["cause"] == "exit", "{id}: cause {}", mach["cause"]);
        ensure!(
            mach["last_heartbeat"].is_null() && mach["wrapper_version"].is_null(),
            "{id}: {mach}"
        );
    }
    Ok(format!(
        "retcode 3 and stdout+stderr on a, b, c, no heartbeat; run {:.1} s",
        w.took.as_secs_f64()
    ))
}

fn maintenance(m: &Master) -> Result<String> {
    let w = fire_and_watch(m, "maint", Duration::from_secs(90))?;
    expect_codes(&w.run, &[("minion-a", 0), ("minion-c", 0)])?;
    ensure!(
        w.run["maintenance"] == serde_json::json!(["minion-b"]),
        "maintenance list: {}",
        w.run["maintenance"]
    );
    ensure!(w.run["success"] == true, "run should succeed: {}", w.run);
    Ok(format!("minion-b skipped; {}", figures(&w)))
}

fn original_wrapper(m: &Master) -> Result<String> {
    let w = fire_and_watch(m, "original", Duration::from_secs(90))?;
    expect_codes(&w.run, &[("minion-a", 7)])?;
    let mach = machine(&w.run, "minion-a");
    ensure!(
        mach["output"] == "line1\nline2 é\n",
        "output {}",
        mach["output"]
    );
    ensure!(
        mach["wrapper_version"] == "0.9.30",
        "wrapper_version {}",
        mach["wrapper_version"]
    );
    Ok(format!(
        "exit 7 and exact output from wrapper 0.9.30; {}",
        figures(&w)
    ))
}

fn unreachable(m: &Master) -> Result<String> {
    let w = fire_and_watch(m, "unreachable_list", Duration::from_secs(90))?;
    expect_codes(&w.run, &[("minion-a", 255), ("minion-b", 255)])?;
    let output = machine(&w.run, "minion-a")["output"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    ensure!(
        output.starts_with("Target did not respond - Salt: The salt master could not be contacted"),
        "output {output:?}"
    );
    let g = fire_and_watch(m, "unreachable_glob", Duration::from_secs(90))?;
    ensure!(
        machines(&g.run).is_empty() && g.run["success"] == false,
        "{}",
        g.run
    );
    let logged = m.log().lines().any(|l| {
        l.contains("test.ping through Salt failed") && l.contains("could not be contacted")
    });
    ensure!(logged, "the master log does not carry Salt's message");
    Ok(format!(
        "list: 255 \"{}\"; glob: no machines, logged",
        output.lines().next().unwrap_or("")
    ))
}

fn stopped_minion(m: &Master, salt: &mut SaltEnv) -> Result<String> {
    salt.stop_minion("minion-c")?;
    let w = fire_and_watch(m, "stopped", Duration::from_secs(120))?;
    expect_codes(
        &w.run,
        &[("minion-a", 0), ("minion-b", 0), ("minion-c", 255)],
    )?;
    let output = machine(&w.run, "minion-c")["output"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    ensure!(
        output.starts_with("Target did not respond"),
        "minion-c output {output:?}"
    );
    let logged = m
        .log()
        .lines()
        .any(|l| l.contains("Target did not respond") && l.contains("minion-c"));
    ensure!(
        logged,
        "the master log does not name minion-c as not responding"
    );
    Ok(format!(
        "minion-c: {:?}; {}",
        output.trim_end(),
        figures(&w)
    ))
}

/// Every state of one minion's `state.apply` reply: (id, result, whether it changed anything).
fn states(reply: &Value, id: &str) -> Result<Vec<(String, bool, bool)>> {
    let map = reply[id]
        .as_object()
        .with_context(|| format!("{id}: no state results: {}", reply[id]))?;
    Ok(map
        .iter()
        .map(|(key, state)| {
            let changed = state["changes"].as_object().is_some_and(|c| !c.is_empty());
            (key.clone(), state["result"] == true, changed)
        })
        .collect())
}

/// `state.apply saltpeter.wrapper` on every minion: the first apply installs this build's
/// wrapper where the pillar says, a second one reports no change.
fn deploy(salt: &SaltEnv) -> Result<String> {
    let apply = || -> Result<(Value, Duration)> {
        let started = Instant::now();
        let (reply, stderr) =
            salt.salt(&["-t", "120", "minion-*", "state.apply", "saltpeter.wrapper"])?;
        for (id, _) in MINIONS {
            let all = states(&reply, id).with_context(|| format!("stderr: {stderr}"))?;
            if let Some((key, ..)) = all.iter().find(|(_, ok, _)| !ok) {
                anyhow::bail!("{id}: state {key} failed: {}", reply[id][key]);
            }
        }
        Ok((reply, started.elapsed()))
    };
    let (first, first_took) = apply()?;
    let wrapper = std::fs::read(binary("sp-wrapper"))?;
    for (id, _) in MINIONS {
        let changed: Vec<String> = states(&first, id)?
            .into_iter()
            .filter(|(_, _, changed)| *changed)
            .map(|(key, ..)| key)
            .collect();
        ensure!(
            changed.iter().any(|k| k.contains("sp-wrapper_|-")),
            "{id}: the first apply did not install the wrapper (changed: {changed:?})"
        );
        let path = salt.wrapper_install_path(id);
        ensure!(
            std::fs::read(&path).is_ok_and(|b| b == wrapper),
            "{id}: {} is not this build's sp-wrapper",
            path.display()
        );
    }
    let (second, second_took) = apply()?;
    for (id, _) in MINIONS {
        let changed: Vec<String> = states(&second, id)?
            .into_iter()
            .filter(|(_, _, changed)| *changed)
            .map(|(key, ..)| key)
            .collect();
        ensure!(changed.is_empty(), "{id}: the re-apply changed {changed:?}");
    }
    let count = states(&first, "minion-a")?.len();
    Ok(format!(
        "{count} states per minion; first apply {:.1} s (wrapper and log dir created, checksum verified), \
         re-apply {:.1} s with no changes",
        first_took.as_secs_f64(),
        second_took.as_secs_f64()
    ))
}

/// `sp-master fleet --json` against the main master's configuration: before the formula every
/// minion lacks the wrapper (exit 1); after it every minion runs this build and reaches the
/// machines port (exit 0).
fn fleet(m: &Master, deployed: bool) -> Result<String> {
    let started = Instant::now();
    let out = Command::new(binary("sp-master"))
        .arg("fleet")
        .arg("-c")
        .arg(&m.conf)
        .args(["--json", "-t", "20", "--target", "minion-*"])
        .output()?;
    let took = started.elapsed();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report: Value = serde_json::from_str(&stdout).with_context(|| {
        format!(
            "fleet printed no JSON ({}): {stdout} {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    let summary = &report["summary"];
    let ids = serde_json::json!(MINIONS.iter().map(|(id, _)| *id).collect::<Vec<_>>());
    ensure!(summary["total"] == 3, "{report}");
    let arch = std::env::consts::ARCH;
    for (id, _) in MINIONS {
        let minion = &report["minions"][id];
        ensure!(minion["arch"] == arch, "{id}: arch {}", minion["arch"]);
        ensure!(minion["reachable"] == true, "{id}: {minion}");
    }
    if deployed {
        ensure!(
            out.status.code() == Some(0),
            "fleet exited {}: {report}",
            out.status
        );
        ensure!(summary["current"] == ids, "{report}");
        for (id, _) in MINIONS {
            let minion = &report["minions"][id];
            ensure!(
                minion["wrapper_version"] == RELEASE_VERSION,
                "{id}: {minion}"
            );
            ensure!(
                minion["wrapper_commit"] == report["master"]["commit"],
                "{id}: {minion}"
            );
        }
        // The table people read, for the log.
        let text = Command::new(binary("sp-master"))
            .arg("fleet")
            .arg("-c")
            .arg(&m.conf)
            .args(["-t", "20", "--target", "minion-*"])
            .output()?;
        eprintln!(
            "sp-master fleet after the formula:\n{}",
            String::from_utf8_lossy(&text.stdout)
        );
    } else {
        ensure!(
            out.status.code() == Some(1),
            "fleet exited {}: {report}",
            out.status
        );
        ensure!(summary["missing"] == ids, "{report}");
        ensure!(summary["current"] == serde_json::json!([]), "{report}");
    }
    Ok(format!(
        "{:.1} s; current {}, missing {}, cut off {}; minion-a: {}",
        took.as_secs_f64(),
        summary["current"],
        summary["missing"],
        summary["cut_off"],
        report["minions"]["minion-a"]
    ))
}
