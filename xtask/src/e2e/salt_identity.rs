//! The Salt identity scenario: every wrapper of a Salt run proves its minion id by signing
//! the master's challenge with the minion's own Salt key, so a minion that knows the run's
//! token (it is in every wrapper's environment) still cannot report for another minion, and
//! nobody can report for a minion once its result is stored.
//!
//! The forger here is what a compromised `minion-b` could do: read the run token from its own
//! wrapper's environment and sign with its own key (`minion.pem` under its pki dir), claiming
//! to be `minion-a`. The replay comes after the run, with `minion-a`'s own key. Signatures
//! are made with the `openssl` command, so the harness needs no crypto library of its own.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use futures_util::{SinkExt, StreamExt};
use saltpeter_proto::{
    Complete, Connect, Envelope, ErrorCode, Hello, MasterMessage, PROTOCOL_VERSION, WrapperMessage,
    signing_payload,
};
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;

use super::master::{Master, machine};

/// The job the scenario fires: long enough for the forger to act while it runs.
pub const JOB: &str = "forged:\n  sec: 0\n  min: 0\n  hour: 0\n  dom: 1\n  mon: 1\n  dow: '*'\n  \
     year: 2099\n  targets: [minion-a, minion-b]\n  target_type: list\n  \
     command: sleep 6; echo real on $SP_MACHINE_ID\n";

/// A file named `name` somewhere under `dir` (Salt puts keys under `root_dir`'s copy of
/// `/etc/salt/pki/...`).
fn find(dir: &Path, name: &str, want_parent: &str) -> Option<PathBuf> {
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let path = entry.path();
        if path.is_dir() {
            if let Some(found) = find(&path, name, want_parent) {
                return Some(found);
            }
        } else if path.file_name().is_some_and(|n| n == name)
            && path
                .parent()
                .and_then(Path::file_name)
                .is_some_and(|p| p == want_parent)
        {
            return Some(path);
        }
    }
    None
}

fn first_line(path: &Path) -> String {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned()
}

/// RSA-SHA256 (PKCS#1 v1.5) signature of `payload` with the PEM key at `key`, in base64.
fn openssl_sign(key: &Path, payload: &[u8]) -> Result<String> {
    use std::io::Write as _;
    let mut child = Command::new("openssl")
        .args(["dgst", "-sha256", "-sign"])
        .arg(key)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("the scenario signs with the openssl command")?;
    child
        .stdin
        .take()
        .context("openssl stdin")?
        .write_all(payload)?;
    let out = child.wait_with_output()?;
    ensure!(
        out.status.success(),
        "openssl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(base64(&out.stdout))
}

fn base64(bytes: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ABC[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// The run token as minion-b's wrapper holds it: in its environment.
fn token_from_environ(pid: u64) -> Result<String> {
    let environ = std::fs::read(format!("/proc/{pid}/environ"))?;
    environ
        .split(|b| *b == 0)
        .find_map(|kv| kv.strip_prefix(b"SP_RUN_TOKEN="))
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .context("no SP_RUN_TOKEN in the wrapper's environment")
}

/// One connection that asks for a challenge and sends `connect` signed with `key`, then
/// `complete` with retcode 0 for `machine`; returns the master's answer to `connect`.
fn forge(
    url: &str,
    tls: &std::sync::Arc<saltpeter_tls::rustls::ClientConfig>,
    instance: &str,
    machine: &str,
    token: &str,
    key: &Path,
) -> Result<String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        // As a wrapper would: over TLS, trusting the master's certificate by its fingerprint.
        let connector = tokio_tungstenite::Connector::Rustls(tls.clone());
        let (mut ws, _) = tokio::time::timeout(
            Duration::from_secs(5),
            tokio_tungstenite::connect_async_tls_with_config(url, None, false, Some(connector)),
        )
        .await
        .context("connect timed out")??;
        let envelope = Envelope {
            job_name: "forged".into(),
            job_instance: instance.into(),
            machine: machine.into(),
            timestamp: None,
        };
        let hello = WrapperMessage::Hello(Hello {
            envelope: envelope.clone(),
            protocol: Some(PROTOCOL_VERSION),
        });
        ws.send(Message::text(hello.encode())).await?;
        let nonce = match next(&mut ws).await? {
            MasterMessage::Challenge(c) => c.nonce,
            other => bail!("expected a challenge, got {other:?}"),
        };
        let signature = openssl_sign(key, &signing_payload(&nonce, instance, machine))?;
        let connect = WrapperMessage::Connect(Connect {
            envelope: envelope.clone(),
            protocol: Some(PROTOCOL_VERSION),
            token: Some(token.into()),
            signature: Some(signature),
            wrapper_pid: Some(1),
        });
        ws.send(Message::text(connect.encode())).await?;
        let answer = next(&mut ws).await?;
        // Whatever the answer, try to write a result; a refused socket is closed already.
        let complete = WrapperMessage::Complete(Complete {
            envelope,
            retcode: Some(0),
            seq: None,
            cause: None,
            signal: None,
        });
        let _ = ws.send(Message::text(complete.encode())).await;
        Ok(match answer {
            MasterMessage::Error(e) if e.code == ErrorCode::Unauthorized => {
                format!("UNAUTHORIZED ({})", e.message)
            }
            other => format!("{other:?}"),
        })
    })
}

async fn next<S>(ws: &mut S) -> Result<MasterMessage>
where
    S: futures_util::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    loop {
        let frame = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .context("no answer within 10 s")?
            .context("closed without an answer")??;
        if let Message::Text(t) = frame {
            return Ok(MasterMessage::decode(t.as_str())?);
        }
    }
}

/// The scenario: a forged `connect` during the run, a replay after it; both refused and the
/// results stay what the real wrappers reported.
pub fn forged(m: &Master, roots: &Path) -> Result<String> {
    let key_b =
        find(&roots.join("minion-b"), "minion.pem", "minion").context("minion-b's minion.pem")?;
    let key_a =
        find(&roots.join("minion-a"), "minion.pem", "minion").context("minion-a's minion.pem")?;
    let accepted = find(&roots.join("master"), "minion-a", "minions")
        .context("the master's accepted key of minion-a")?;
    let forms = format!(
        "minion.pem {:?}, accepted {:?}",
        first_line(&key_a),
        first_line(&accepted)
    );
    let ready: Value = serde_json::from_str(&std::fs::read_to_string(m.dir.join("ready.json"))?)?;
    let url = format!(
        "wss://{}/",
        ready["machines"].as_str().context("machines address")?
    );
    let cert = saltpeter_tls::certs_from_file(&m.dir.join("data/tls/cert.pem"))?;
    let der = cert.first().context("the master's certificate")?;
    let pinned = saltpeter_tls::Trust::Pinned(saltpeter_tls::Fingerprint::of(der.as_ref()));
    let tls = std::sync::Arc::new(saltpeter_tls::client_config(&pinned)?);

    let fired = Instant::now();
    let instance = m.run_job("forged")?;
    let run = m.wait_run(&instance, Duration::from_secs(60), |r| {
        ["minion-a", "minion-b"].iter().all(|id| {
            machine(r, id)["status"] == "running" && machine(r, id)["wrapper_pid"].is_u64()
        })
    })?;
    let pid_b = machine(&run, "minion-b")["wrapper_pid"]
        .as_u64()
        .context("wrapper pid")?;
    let token = token_from_environ(pid_b)?;
    let during = forge(&url, &tls, &instance, "minion-a", &token, &key_b)?;
    ensure!(
        during.starts_with("UNAUTHORIZED"),
        "minion-b's key was accepted for minion-a: {during}"
    );

    let run = m.wait_run(&instance, Duration::from_secs(60), |r| {
        r["ended"].is_string()
    })?;
    let after = forge(&url, &tls, &instance, "minion-a", &token, &key_a)?;
    ensure!(
        after.starts_with("UNAUTHORIZED"),
        "a connect after the result was accepted: {after}"
    );
    let again = m.run(&instance)?;
    for id in ["minion-a", "minion-b"] {
        let mach = machine(&again, id);
        ensure!(
            mach["retcode"] == 0 && mach["output"] == format!("real on {id}\n"),
            "{id}: {mach}"
        );
        ensure!(
            mach == machine(&run, id),
            "{id} changed after its result: {mach}"
        );
    }
    let refused = m
        .log()
        .lines()
        .filter(|l| l.contains("Rejected a wrapper message") || l.contains("minion key check"))
        .count();
    ensure!(refused >= 2, "the refusals are not in the master's log");
    Ok(format!(
        "minion-b's key for minion-a: refused; a's own key after the result: refused; \
         results intact; {forms}; run {:.1} s",
        fired.elapsed().as_secs_f64()
    ))
}
