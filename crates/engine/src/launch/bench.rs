//! The benchmark launcher (`launcher: bench`): for `cargo xtask bench master` only.
//!
//! Every name in a job's `targets` is a simulated machine, as with the local launcher, but
//! nothing is spawned: each start request is appended as one JSON line to
//! `<data_dir>/bench-starts.jsonl` (instance, machines, each machine's token, machines URL,
//! and the wall time it was written), and every machine is reported started. The load generator tails that
//! file and opens one WebSocket per machine, speaking the real protocol. So the engine, the
//! machines endpoint, the monitor, the store, the API and the metrics all run their production
//! code; only the launcher (Salt, or `sp-wrapper` processes) is replaced, which is what the
//! benchmark must exclude anyway: 10,000 wrapper processes would not fit on the machine that
//! measures the master.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use super::local::target_names;
use super::{BoxFuture, Launcher, Resolution, StartOutcome, StartRequest};
use saltpeter_config::JobSpec;

/// The name of the file start requests are appended to, under the data dir.
pub(crate) const STARTS_FILE: &str = "bench-starts.jsonl";

/// Hands start requests to an external load generator through a file.
#[derive(Debug)]
pub struct BenchLauncher {
    path: PathBuf,
}

impl BenchLauncher {
    /// A launcher writing to `<data_dir>/bench-starts.jsonl`.
    pub fn new(data_dir: &std::path::Path) -> Self {
        Self {
            path: data_dir.join(STARTS_FILE),
        }
    }
}

impl Launcher for BenchLauncher {
    fn resolve(&self, job: Arc<JobSpec>) -> BoxFuture<Resolution> {
        let up = target_names(&job);
        Box::pin(async move {
            Resolution {
                up,
                ..Resolution::default()
            }
        })
    }

    fn start(&self, request: StartRequest) -> BoxFuture<StartOutcome> {
        let path = self.path.clone();
        Box::pin(async move {
            let env = |k: &str| {
                request
                    .env
                    .iter()
                    .find(|(name, _)| name == k)
                    .map(|(_, v)| v.clone())
                    .unwrap_or_default()
            };
            let at = time::OffsetDateTime::now_utc().unix_timestamp_nanos();
            let line = serde_json::json!({
                "instance": request.instance,
                "job": request.job.name,
                "machines": request.machines,
                "tokens": request.tokens,
                "url": env("SP_WEBSOCKET_URL"),
                "tls_fingerprint": env("SP_TLS_FINGERPRINT"),
                "written_unix_ns": at.to_string(),
            })
            .to_string();
            let machines = request.machines;
            // A file write may block; keep it off the runtime's workers.
            let written = tokio::task::spawn_blocking(move || {
                let mut file = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&path)?;
                // One write of the whole line, so a reader never sees half of it for long.
                file.write_all(format!("{line}\n").as_bytes())
            })
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r.map_err(|e| format!("cannot write the bench start file: {e}")));
            machines.into_iter().map(|m| (m, written.clone())).collect()
        })
    }
}
