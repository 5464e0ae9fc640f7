//! Test doubles for the engine: a launcher that records what it was asked, and wrappers that
//! speak to the engine through its event channel.

#![allow(dead_code, clippy::unwrap_used)]

pub mod raw;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use saltpeter_config::{Config, JobSpec};
use saltpeter_engine::Clock;
use saltpeter_engine::launch::{BoxFuture, Launcher, Resolution, StartOutcome, StartRequest};
use saltpeter_engine::{
    ApiRequest, ConnId, Engine, EngineEvent, EngineHandle, EngineParts, Event, Outbound,
    StoreParts, event_channel,
};
use saltpeter_joblog::JobLog;
use saltpeter_proto::*;
use saltpeter_store::Store;
use serde_json::Value;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

/// A job file block that never fires on its own; runs are started explicitly.
pub fn job(name: &str, targets: &str, extra: &str) -> String {
    format!(
        "{name}:\n  sec: 0\n  min: 0\n  hour: 0\n  dom: 1\n  mon: 1\n  dow: '*'\n  year: 2099\n  targets: {targets}\n  target_type: list\n  command: echo hi\n{extra}"
    )
}

pub fn legacy_settings() -> String {
    "saltpeter_config:\n  allow_legacy_wrappers: true\n".into()
}

/// Records start requests; answers resolution with the job's target names. Its machines
/// authenticate with tokens of their own unless [`FakeLauncher::use_salt_keys`] says
/// otherwise.
#[derive(Debug, Default)]
pub struct FakeLauncher {
    failures: Mutex<Vec<(String, String)>>,
    started: Mutex<Vec<String>>,
    envs: Mutex<Vec<Vec<(String, String)>>>,
    tokens: Mutex<std::collections::BTreeMap<String, String>>,
    salt_pki_dir: Mutex<Option<std::path::PathBuf>>,
}

impl FakeLauncher {
    pub fn fail(&self, machine: &str, why: &str) {
        self.failures.lock().push((machine.into(), why.into()));
    }
    pub fn take_started(&self) -> Vec<String> {
        std::mem::take(&mut *self.started.lock())
    }
    pub fn last_env(&self) -> Vec<(String, String)> {
        self.envs.lock().last().cloned().unwrap_or_default()
    }
    /// What the launcher would hand `machine` as `SP_RUN_TOKEN`.
    pub fn token_for(&self, machine: &str) -> Option<String> {
        if let Some(t) = self.tokens.lock().get(machine) {
            return Some(t.clone());
        }
        self.last_env()
            .into_iter()
            .find(|(k, _)| k == "SP_RUN_TOKEN")
            .map(|(_, v)| v)
    }
    /// Runs fired from now on prove their machines with Salt keys from `pki_dir`.
    pub fn use_salt_keys(&self, pki_dir: &std::path::Path) {
        *self.salt_pki_dir.lock() = Some(pki_dir.to_owned());
    }
}

impl Launcher for FakeLauncher {
    fn identity(&self) -> saltpeter_engine::Identity {
        match *self.salt_pki_dir.lock() {
            Some(_) => saltpeter_engine::Identity::SaltKey,
            None => saltpeter_engine::Identity::MachineToken,
        }
    }

    fn salt_pki_dir(&self) -> Option<std::path::PathBuf> {
        self.salt_pki_dir.lock().clone()
    }

    fn resolve(&self, job: Arc<JobSpec>) -> BoxFuture<Resolution> {
        let up = job.targets.names();
        Box::pin(async move {
            Resolution {
                up,
                ..Resolution::default()
            }
        })
    }

    fn start(&self, request: StartRequest) -> BoxFuture<StartOutcome> {
        let failures = self.failures.lock().clone();
        self.started.lock().extend(request.machines.iter().cloned());
        self.envs.lock().push(request.env.clone());
        self.tokens.lock().extend(request.tokens.clone());
        let outcome = request
            .machines
            .iter()
            .map(|m| {
                let failure = failures
                    .iter()
                    .find(|(f, _)| f == m)
                    .map(|(_, why)| why.clone());
                (m.clone(), failure.map_or(Ok(()), Err))
            })
            .collect();
        Box::pin(async move { outcome })
    }
}

/// An engine on the paused clock with a fake launcher.
pub struct Harness {
    pub engine: EngineHandle,
    pub launcher: Arc<FakeLauncher>,
    _dir: tempfile::TempDir,
    config: Option<watch::Sender<Arc<Config>>>,
    next_conn: std::sync::atomic::AtomicU64,
    shutdown: CancellationToken,
    /// What the engine told its event subscriber.
    events: Mutex<mpsc::Receiver<EngineEvent>>,
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

impl Harness {
    pub async fn start(yaml: &str) -> Harness {
        Self::start_with(yaml, None).await
    }

    /// Starts an engine on the store in `data_dir` (a restart when it holds runs).
    pub async fn restart(yaml: &str, data_dir: &std::path::Path) -> Harness {
        Self::start_with(yaml, Some(data_dir)).await
    }

    /// Starts an engine as one master among several, on the store in `data_dir` (fresh
    /// when `None`): it holds no job until [`Harness::cluster`] gives it one.
    pub async fn start_cluster(
        yaml: &str,
        data_dir: Option<&std::path::Path>,
        claims: Arc<FakeClaims>,
    ) -> Harness {
        let parts = saltpeter_engine::ClusterParts {
            master_id: "m-self".into(),
            claims,
        };
        Self::start_full(yaml, data_dir, Some(parts)).await
    }

    /// Tells the engine about a pass of the coordination and lets it load what it gained.
    pub async fn cluster(&self, view: saltpeter_engine::ClusterView) {
        assert!(self.engine.send(Event::Cluster(view)).await);
        // The takeover query is answered by the inline store on the engine's next turn.
        for _ in 0..5 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    async fn start_with(yaml: &str, data_dir: Option<&std::path::Path>) -> Harness {
        Self::start_full(yaml, data_dir, None).await
    }

    async fn start_full(
        yaml: &str,
        data_dir: Option<&std::path::Path>,
        cluster: Option<saltpeter_engine::ClusterParts>,
    ) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("conf");
        std::fs::create_dir_all(&conf).unwrap();
        let settings = format!(
            "saltpeter_config:\n  logdir: {0}/log\n  data_dir: {0}/data\n",
            dir.path().display()
        );
        std::fs::write(conf.join("00-settings.yaml"), settings).unwrap();
        std::fs::write(conf.join("jobs.yaml"), yaml).unwrap();
        let config = Config::load(&conf);
        assert!(
            !config.has_errors(),
            "test config has errors: {:?}",
            config.problems
        );
        let (config_tx, config_rx) = watch::channel(Arc::new(config));
        let launcher = Arc::new(FakeLauncher::default());
        let shutdown = CancellationToken::new();
        let (store, restored) = match data_dir {
            None => Store::inline_memory().unwrap(),
            Some(dir) => {
                let (db, restored) = Store::open(dir, kept()).unwrap();
                (Store::inline(db), restored)
            }
        };
        // As in the master: among several, the engine loads a job's state when it gains it.
        let restored = if cluster.is_some() {
            saltpeter_store::Restored::default()
        } else {
            restored
        };
        let (mut engine, handle) = Engine::new(EngineParts {
            config: config_rx,
            launcher: launcher.clone(),
            joblog: JobLog::start(dir.path().join("spool")).unwrap(),
            clock: Clock::paused(time::macros::datetime!(2026-06-01 12:00 UTC)),
            machines_url: "ws://127.0.0.1:1".into(),
            wrapper_env: Vec::new(),
            shutdown: shutdown.clone(),
            store: StoreParts::Ready(store, restored),
            cluster,
        })
        .unwrap();
        let (events_tx, events) = event_channel();
        engine.set_event_sink(events_tx);
        tokio::spawn(engine.run());
        Harness {
            engine: handle,
            launcher,
            _dir: dir,
            config: Some(config_tx),
            next_conn: 1.into(),
            shutdown,
            events: Mutex::new(events),
        }
    }

    /// The events the engine sent its subscriber since the last call.
    pub fn take_events(&self) -> Vec<EngineEvent> {
        let mut rx = self.events.lock();
        std::iter::from_fn(|| rx.try_recv().ok()).collect()
    }

    /// A job's history from the store, newest first, as the API returns it.
    pub async fn history(&self, job: &str) -> Vec<Value> {
        let job = job.to_owned();
        let page = self
            .engine
            .ask(|reply| {
                ApiRequest::Store(saltpeter_store::Query::Runs {
                    job,
                    before: None,
                    limit: 1000,
                    reply,
                })
            })
            .await
            .unwrap()
            .unwrap();
        page.iter()
            .map(|r| serde_json::to_value(r).unwrap())
            .collect()
    }

    /// A run as the store holds it.
    pub async fn stored_run(&self, instance: &str) -> Value {
        let instance = instance.to_owned();
        let view = self
            .engine
            .ask(|reply| ApiRequest::Store(saltpeter_store::Query::Run { instance, reply }))
            .await
            .unwrap()
            .unwrap();
        serde_json::to_value(view.expect("no such run")).unwrap()
    }

    /// Drops the config channel's sender, as when the watcher stops.
    pub fn close_config(&mut self) {
        self.config = None;
    }

    pub async fn try_run(&self, job: &str) -> Result<String, String> {
        let job = job.to_owned();
        let r = self
            .engine
            .ask(|reply| ApiRequest::RunNow {
                job,
                by: tester(),
                reply,
            })
            .await
            .unwrap();
        // Let the resolution and launch tasks report back.
        tokio::time::sleep(Duration::from_millis(1)).await;
        r.map_err(|e| e.to_string())
    }

    pub async fn run(&self, job: &str) -> String {
        self.try_run(job).await.unwrap()
    }

    pub async fn kill_machine(&self, instance: &str, machine: &str) {
        let (instance, machine) = (instance.to_owned(), machine.to_owned());
        self.engine
            .ask(|reply| ApiRequest::KillMachine {
                instance,
                machine,
                by: tester(),
                reply,
            })
            .await
            .unwrap()
            .unwrap();
    }

    pub async fn kill(&self, instance: &str) {
        let instance = instance.to_owned();
        self.engine
            .ask(|reply| ApiRequest::KillRun {
                instance,
                by: tester(),
                reply,
            })
            .await
            .unwrap()
            .unwrap();
    }

    pub async fn run_view(&self, instance: &str) -> Value {
        let instance = instance.to_owned();
        let view = self
            .engine
            .ask(|reply| ApiRequest::GetRun { instance, reply })
            .await
            .unwrap();
        serde_json::to_value(view.expect("no such run")).unwrap()
    }

    pub async fn machine(&self, instance: &str, machine: &str) -> Value {
        self.run_view(instance).await["machines"][machine].clone()
    }

    pub async fn job_summary(&self, job: &str) -> Value {
        let jobs = self.engine.ask(ApiRequest::ListJobs).await.unwrap();
        let jobs = serde_json::to_value(jobs).unwrap();
        jobs.as_array()
            .unwrap()
            .iter()
            .find(|j| j["name"] == job)
            .cloned()
            .unwrap()
    }

    /// A new wrapper connection for (instance, machine), carrying the run's token.
    pub async fn wrapper(&self, instance: &str, machine: &str) -> FakeWrapper {
        let conn = self
            .next_conn
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(1024);
        let peer: SocketAddr = "127.0.0.1:40000".parse().unwrap();
        assert!(self.engine.send(Event::Connected { conn, peer, tx }).await);
        FakeWrapper {
            engine: self.engine.clone(),
            conn,
            rx,
            instance: instance.into(),
            machine: machine.into(),
            token: self.launcher.token_for(machine),
            signature: None,
            skew: 0,
            kills: 0,
        }
    }
}

/// Slot claims as a database would answer them: every slot once, to whoever asks first;
/// `taken` lists slots another master already claimed.
#[derive(Debug, Default)]
pub struct FakeClaims {
    pub claimed: Mutex<Vec<(String, time::OffsetDateTime)>>,
    pub taken: Mutex<Vec<(String, time::OffsetDateTime)>>,
}

impl saltpeter_engine::SlotClaims for FakeClaims {
    fn claim(
        &self,
        job: &str,
        slot: time::OffsetDateTime,
    ) -> std::pin::Pin<
        Box<dyn std::future::Future<Output = saltpeter_engine::ClaimResult> + Send + 'static>,
    > {
        let key = (job.to_owned(), slot);
        let won = !self.taken.lock().contains(&key) && !self.claimed.lock().contains(&key);
        if won {
            self.claimed.lock().push(key);
        }
        Box::pin(async move { Ok(won) })
    }
}

/// What the engine answered to an output.
#[derive(Debug, PartialEq, Eq)]
pub enum Reply {
    Ack(u64),
    Nack { expected: u64, received: u64 },
    Other(String),
}

/// A wrapper speaking through the engine's event channel.
pub struct FakeWrapper {
    engine: EngineHandle,
    conn: ConnId,
    rx: mpsc::Receiver<Outbound>,
    pub instance: String,
    pub machine: String,
    pub token: Option<String>,
    /// The signature its `connect` carries.
    pub signature: Option<String>,
    /// Seconds added to every timestamp this wrapper sends (its clock is off).
    pub skew: i64,
    kills: usize,
}

impl FakeWrapper {
    fn envelope(&self) -> Envelope {
        let at = time::OffsetDateTime::now_utc() + time::Duration::seconds(self.skew);
        Envelope {
            job_name: self
                .instance
                .rsplit_once('_')
                .map_or("j", |(j, _)| j)
                .to_owned(),
            job_instance: self.instance.clone(),
            machine: self.machine.clone(),
            timestamp: Some(Timestamp::new(at)),
        }
    }

    async fn send(&self, msg: WrapperMessage) {
        assert!(
            self.engine
                .send(Event::Wrapper {
                    conn: self.conn,
                    msg,
                    received: tokio::time::Instant::now(),
                })
                .await
        );
    }

    /// The next frame the engine sends, counting and skipping kills.
    async fn next(&mut self) -> Option<MasterMessage> {
        loop {
            let out = tokio::time::timeout(Duration::from_millis(50), self.rx.recv())
                .await
                .ok()??;
            let msg = match out {
                Outbound::Message(m) | Outbound::Close(m) => m,
                Outbound::OutputAck { ack, .. } => ack,
                // The handshake notice is for the connection's task, not the wrapper.
                Outbound::Accepted => continue,
            };
            if matches!(msg, MasterMessage::Kill(_)) {
                self.kills += 1;
                continue;
            }
            return Some(msg);
        }
    }

    /// Drains pending frames, counting kills.
    fn drain(&mut self) {
        while let Ok(out) = self.rx.try_recv() {
            if let Outbound::Message(MasterMessage::Kill(_))
            | Outbound::Close(MasterMessage::Kill(_)) = out
            {
                self.kills += 1;
            }
        }
    }

    pub fn kills(&mut self) -> usize {
        self.drain();
        self.kills
    }

    pub fn saw_kill(&mut self) -> bool {
        self.kills() > 0
    }

    pub async fn send_connect(&self) {
        self.send(WrapperMessage::Connect(Connect {
            envelope: self.envelope(),
            protocol: self.token.as_ref().map(|_| PROTOCOL_VERSION),
            token: self.token.clone(),
            signature: self.signature.clone(),
            wrapper_pid: Some(4242),
        }))
        .await;
    }

    /// Sends `hello` and returns the challenge's nonce.
    pub async fn hello(&mut self) -> String {
        self.send(WrapperMessage::Hello(Hello {
            envelope: self.envelope(),
            protocol: Some(PROTOCOL_VERSION),
        }))
        .await;
        match self.next().await {
            Some(MasterMessage::Challenge(c)) => c.nonce,
            other => panic!("expected a challenge, got {other:?}"),
        }
    }

    /// Sends `connect` and returns the engine's answer, waiting for it (a signed connect is
    /// checked in the background).
    pub async fn connect_reply(&mut self) -> Option<MasterMessage> {
        self.send_connect().await;
        for _ in 0..100 {
            match self.rx.try_recv() {
                Ok(Outbound::Message(m) | Outbound::Close(m)) => return Some(m),
                Ok(Outbound::OutputAck { ack, .. }) => return Some(ack),
                Ok(Outbound::Accepted) => continue,
                Err(_) => {}
            }
            // Real time: the check runs on a blocking thread, which the paused clock does
            // not wait for.
            std::thread::sleep(Duration::from_millis(10));
            tokio::task::yield_now().await;
        }
        None
    }

    /// Sends a bare `start`, `output` or `complete` and returns whatever comes back.
    pub async fn send_raw(&mut self, msg: WrapperMessage) -> Option<MasterMessage> {
        self.send(msg).await;
        self.next().await
    }

    pub fn envelope_now(&self) -> Envelope {
        self.envelope()
    }

    /// Connects; returns the `last_seq` of the ack.
    pub async fn connect(&mut self) -> Option<i64> {
        self.send_connect().await;
        match self.next().await {
            Some(MasterMessage::Ack(a)) if a.ack_type == AckType::Connect => a.last_seq,
            other => panic!("expected a connect ack, got {other:?}"),
        }
    }

    pub async fn start(&mut self) {
        self.send(WrapperMessage::Start(Start {
            envelope: self.envelope(),
            pid: 4243,
            version: "test".into(),
        }))
        .await;
        match self.next().await {
            Some(MasterMessage::Ack(a)) if a.ack_type == AckType::Start => {}
            other => panic!("expected a start ack, got {other:?}"),
        }
    }

    pub async fn connect_and_start(&mut self) {
        self.connect().await;
        self.start().await;
    }

    pub async fn send_heartbeat(&self) {
        self.send(WrapperMessage::Heartbeat(Heartbeat {
            envelope: self.envelope(),
        }))
        .await;
    }

    pub async fn heartbeat(&mut self) {
        self.send_heartbeat().await;
        // Heartbeats are not answered; make sure the engine has taken it.
        tokio::task::yield_now().await;
    }

    pub async fn output(&mut self, seq: u64, data: &str) -> Reply {
        self.send(WrapperMessage::Output(Output {
            envelope: self.envelope(),
            stream: "stdout".into(),
            data: data.into(),
            seq: Some(seq),
        }))
        .await;
        match self.next().await {
            Some(MasterMessage::Ack(a)) if a.ack_type == AckType::Output => {
                Reply::Ack(a.seq.unwrap())
            }
            Some(MasterMessage::Nack(n)) => Reply::Nack {
                expected: n.expected_seq,
                received: n.received_seq,
            },
            other => Reply::Other(format!("{other:?}")),
        }
    }

    pub async fn complete_with(&mut self, retcode: i64, cause: &str) {
        let cause: Cause = serde_json::from_value(Value::String(cause.into())).unwrap();
        self.send(WrapperMessage::Complete(Complete {
            envelope: self.envelope(),
            retcode: Some(retcode),
            seq: None,
            cause: Some(cause),
            signal: None,
        }))
        .await;
        match self.next().await {
            Some(MasterMessage::Ack(a)) if a.ack_type == AckType::Complete => {}
            other => panic!("expected a complete ack, got {other:?}"),
        }
    }

    pub async fn complete(&mut self, retcode: i64) {
        self.complete_with(retcode, "exit").await;
    }

    pub async fn disconnect(&self) {
        assert!(
            self.engine
                .send(Event::Disconnected { conn: self.conn })
                .await
        );
    }

    /// The code of the next `error` frame, if one comes.
    pub async fn error_code(&mut self) -> Option<ErrorCode> {
        match self.next().await {
            Some(MasterMessage::Error(e)) => Some(e.code),
            _ => None,
        }
    }
}

/// Retention that keeps every run: the paused wall clock is in the past of the real one, by
/// which the store ages runs.
fn kept() -> saltpeter_store::Retention {
    saltpeter_store::Retention {
        max_age_days: u32::MAX,
        ..Default::default()
    }
}

/// Writes a job's last fired slot into the store in `data_dir`, as a master that stopped
/// after firing it would have left it.
pub fn seed_last_fired(data_dir: &std::path::Path, job: &str, at: time::OffsetDateTime) {
    use saltpeter_store::{Backend, JobRecord, StoreOp};
    let (mut db, _) = Store::open(data_dir, kept()).unwrap();
    db.apply(vec![StoreOp::Job(JobRecord {
        name: job.into(),
        last_fired: Some(at),
        ..JobRecord::default()
    })]);
}

/// The actor of acts the tests ask the engine for directly.
pub fn tester() -> saltpeter_store::audit::Actor {
    saltpeter_store::audit::Actor::remote("tester", None)
}

/// A whole master through `server::start` on loopback port 0 with a fake launcher: the same
/// wiring as `sp-master`, for socket tests. `settings` is appended to `saltpeter_config`.
pub async fn start_server(
    settings: &str,
    jobs: &str,
) -> (
    saltpeter_master::server::Running,
    Arc<FakeLauncher>,
    tempfile::TempDir,
) {
    start_server_after(settings, jobs, |_| {}).await
}

/// [`start_server`], after `prepare` has seen the data directory (for example to leave in it
/// what a master that stopped earlier would have left).
pub async fn start_server_after(
    settings: &str,
    jobs: &str,
    prepare: impl FnOnce(&std::path::Path),
) -> (
    saltpeter_master::server::Running,
    Arc<FakeLauncher>,
    tempfile::TempDir,
) {
    use saltpeter_master::server::{self, Options};
    use tokio::net::TcpListener;
    let dir = tempfile::tempdir().unwrap();
    prepare(&dir.path().join("data"));
    let conf = dir.path().join("conf");
    std::fs::create_dir_all(&conf).unwrap();
    let block = format!(
        "saltpeter_config:\n  logdir: {0}/log\n  data_dir: {0}/data\n{settings}",
        dir.path().display()
    );
    std::fs::write(conf.join("00-settings.yaml"), block).unwrap();
    std::fs::write(conf.join("jobs.yaml"), jobs).unwrap();
    let launcher = Arc::new(FakeLauncher::default());
    let running = server::start(Options {
        config_dir: conf,
        machines_listener: Some(TcpListener::bind("127.0.0.1:0").await.unwrap()),
        api_listener: Some(TcpListener::bind("127.0.0.1:0").await.unwrap()),
        launcher: Some(launcher.clone()),
        clock: None,
    })
    .await
    .unwrap();
    (running, launcher, dir)
}

/// The test-only keys in `tests/fixtures/test-keys`.
pub fn test_key(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/test-keys")
        .join(name)
}

/// A Salt master pki directory in `dir` that has accepted `minion-a` and `minion-b` with the
/// test keys (in the two public-key forms Salt writes).
pub fn salt_pki_dir(dir: &std::path::Path) -> std::path::PathBuf {
    let pki = dir.join("pki/master");
    std::fs::create_dir_all(pki.join("minions")).unwrap();
    for m in ["minion-a", "minion-b"] {
        std::fs::copy(test_key(&format!("{m}.pub")), pki.join("minions").join(m)).unwrap();
    }
    pki
}

/// What the wrapper on `key_owner` sends as `connect.signature` for a challenge.
pub fn sign_as(key_owner: &str, nonce: &str, instance: &str, machine: &str) -> String {
    use base64::Engine as _;
    use ring::signature::{RSA_PKCS1_SHA256, RsaKeyPair};
    let text = std::fs::read_to_string(test_key(&format!("{key_owner}.pem"))).unwrap();
    let (label, der) = saltpeter_tls::pem_decode(&text).unwrap();
    let key = match label.as_str() {
        "RSA PRIVATE KEY" => RsaKeyPair::from_der(&der).unwrap(),
        _ => RsaKeyPair::from_pkcs8(&der).unwrap(),
    };
    let mut sig = vec![0u8; key.public().modulus_len()];
    key.sign(
        &RSA_PKCS1_SHA256,
        &ring::rand::SystemRandom::new(),
        &signing_payload(nonce, instance, machine),
        &mut sig,
    )
    .unwrap();
    base64::engine::general_purpose::STANDARD.encode(sig)
}
