//! Shipping every job-log event to Elasticsearch and/or OpenSearch (docs/COMPATIBILITY.md,
//! "Job log and search documents"): owns the on-disk queues under `<data_dir>/ship/` and one sender thread per backend.
//!
//! The job-log thread turns each entry into a [`Document`] ([`LogShipper::record`]) and
//! appends it to every backend's queue; that is a short file append, never a network wait, so
//! the engine is no more exposed than it already is to the log files. Each backend's sender
//! thread reads batches from its queue, posts them to `_bulk` (NDJSON, one
//! `{"index":{"_index","_id"}}` action per document, no mapping type, so Elasticsearch 8 and
//! OpenSearch 2 both take it), and moves the queue's cursor only when the batch is answered.
//! Failures back off exponentially with jitter up to a minute; items the backend refused as
//! malformed (4xx) are dropped with a log line, items it could not take now (429, 5xx) go back
//! to the tail of the queue.
//!
//! `http://` or `https://`, through the CLI's client (`cli/http.rs`): an `https` cluster is
//! verified against `ship_ca` or the system's roots; Basic auth comes from the URL.

mod bulk;
mod doc;
mod queue;

use std::io::Read;
use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use parking_lot::{Condvar, Mutex};

use crate::entry::LogEntry;
use saltpeter_http::Client;

pub(crate) use doc::DocBuilder;
pub use doc::{Document, rfc3339};
pub use queue::QueueError;

/// A search backend to ship to.
#[derive(Clone, Debug)]
pub struct Backend {
    /// Names its queue directory and its log lines (`elasticsearch`, `opensearch`).
    pub name: String,
    /// `http[s]://[user:pass@]host:port[/prefix]`; a bare `host:port` means `http://`.
    pub url: String,
    /// Indices are `<index_prefix>-YYYY.MM.DD`.
    pub index_prefix: String,
    /// The CA file an `https://` backend is verified with (`ship_ca`); `None`: the system's
    /// roots.
    pub ca: Option<PathBuf>,
}

impl Backend {
    /// Checks the URL (and the CA file) without starting anything.
    pub(crate) fn validate(&self) -> Result<(), ShipError> {
        client_for(self).map(|_| ())
    }
}

/// Limits and timings; [`ShipOptions::new`] has the production values.
#[derive(Clone, Debug)]
pub struct ShipOptions {
    /// Queue root; each backend gets a subdirectory.
    pub dir: PathBuf,
    /// Most bytes one backend's queue may hold on disk before the oldest documents go.
    pub queue_bytes: u64,
    /// Size at which a new segment file is started; the unit the cap drops.
    pub segment_bytes: u64,
    /// Most documents in one `_bulk` request.
    pub(crate) batch_docs: usize,
    /// About the most bytes of queued documents in one `_bulk` request.
    pub(crate) batch_bytes: u64,
    /// Most bytes of output in one document; head and tail halves are kept.
    pub output_bytes: usize,
    /// Connect, read and write timeout of a request.
    pub timeout: Duration,
    pub backoff_base: Duration,
    pub backoff_cap: Duration,
    /// An item the backend answers 429/5xx this many times is given up.
    pub(crate) max_item_attempts: u32,
}

impl ShipOptions {
    pub fn new(dir: PathBuf) -> Self {
        Self {
            dir,
            queue_bytes: 256 << 20,
            segment_bytes: 8 << 20,
            batch_docs: 500,
            batch_bytes: 5 << 20,
            output_bytes: 1 << 20,
            // The original's request timeout.
            timeout: Duration::from_secs(20),
            backoff_base: Duration::from_millis(500),
            backoff_cap: Duration::from_secs(60),
            max_item_attempts: 20,
        }
    }
}

/// Counters of one backend, since this shipper started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ShipStats {
    /// Documents appended to the queue.
    pub queued: u64,
    /// Documents the backend accepted.
    pub delivered: u64,
    /// Documents the backend refused for good (or that failed too often), and dropped.
    pub rejected: u64,
    /// Documents put back at the tail of the queue after a retryable item error.
    pub requeued: u64,
    /// Documents dropped because the queue was full (oldest first).
    pub dropped_full: u64,
    /// Documents that could not be queued at all (disk error).
    pub lost: u64,
    /// `_bulk` requests that failed as a whole and will be retried.
    pub failed_requests: u64,
}

/// Why shipping could not start.
#[derive(Debug, thiserror::Error)]
pub enum ShipError {
    #[error("{backend} URL {url:?}: {source}")]
    Url {
        backend: String,
        url: String,
        source: saltpeter_http::HttpError,
    },
    #[error(transparent)]
    Queue(#[from] QueueError),
    #[error("cannot start the {backend} shipper thread: {source}")]
    Thread {
        backend: String,
        source: std::io::Error,
    },
}

/// One backend's queue and the state its sender thread shares with `ship`.
#[derive(Debug)]
struct Lane {
    name: String,
    prefix: String,
    state: Mutex<LaneState>,
    wake: Condvar,
}

#[derive(Debug)]
struct LaneState {
    queue: queue::Queue,
    stats: ShipStats,
    stop: bool,
}

/// The running shipper. Dropping it stops the sender threads (waiting at most one request
/// timeout); whatever is still queued is sent by the next shipper on the same directory.
#[derive(Debug)]
pub struct Shipper {
    lanes: Vec<Arc<Lane>>,
    threads: Vec<JoinHandle<()>>,
}

impl Shipper {
    /// Opens each backend's queue and starts its sender thread.
    pub fn start(backends: Vec<Backend>, options: ShipOptions) -> Result<Self, ShipError> {
        let mut shipper = Self {
            lanes: Vec::new(),
            threads: Vec::new(),
        };
        for backend in backends {
            let client = client_for(&backend)?.with_timeout(options.timeout);
            let queue = queue::Queue::open(
                options.dir.join(&backend.name),
                options.queue_bytes,
                options.segment_bytes,
            )?;
            let lane = Arc::new(Lane {
                name: backend.name.clone(),
                prefix: backend.index_prefix.clone(),
                state: Mutex::new(LaneState {
                    queue,
                    stats: ShipStats::default(),
                    stop: false,
                }),
                wake: Condvar::new(),
            });
            let thread = {
                let lane = lane.clone();
                let options = options.clone();
                std::thread::Builder::new()
                    .name(format!("ship-{}", backend.name))
                    .spawn(move || bulk::run(&lane, &client, &options))
                    .map_err(|source| ShipError::Thread {
                        backend: backend.name.clone(),
                        source,
                    })?
            };
            shipper.lanes.push(lane);
            shipper.threads.push(thread);
        }
        Ok(shipper)
    }

    /// Queues `doc` for every backend. Never waits on the network.
    pub fn ship(&self, doc: &Document) {
        // Chosen once so a resend after a lost answer overwrites instead of duplicating.
        let id = format!("{:032x}", rand::random::<u128>());
        for lane in &self.lanes {
            let item = queue::Item {
                index: doc.index(&lane.prefix),
                id: id.clone(),
                attempts: 0,
                doc: doc.clone(),
            };
            let mut state = lane.state.lock();
            match state.queue.push(&item) {
                Ok(()) => state.stats.queued += 1,
                Err(error) => {
                    state.stats.lost += 1;
                    tracing::error!(backend = %lane.name, %error, "Could not queue a log document for shipping.");
                }
            }
            state.stats.dropped_full = state.queue.dropped;
            drop(state);
            lane.wake.notify_all();
        }
    }

    /// Whether every backend's queue is empty (all delivered or given up).
    pub fn drained(&self) -> bool {
        self.lanes.iter().all(|l| l.state.lock().queue.is_empty())
    }

    /// The counters of `backend`.
    pub fn stats(&self, backend: &str) -> Option<ShipStats> {
        let lane = self.lanes.iter().find(|l| l.name == backend)?;
        let state = lane.state.lock();
        Some(ShipStats {
            dropped_full: state.queue.dropped,
            ..state.stats
        })
    }
}

impl Drop for Shipper {
    fn drop(&mut self) {
        for lane in &self.lanes {
            lane.state.lock().stop = true;
            lane.wake.notify_all();
        }
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

fn client_for(backend: &Backend) -> Result<Client, ShipError> {
    let url = backend.url.trim();
    let url = if url.contains("://") {
        url.to_owned()
    } else {
        format!("http://{url}")
    };
    Client::new(&url, None)
        .and_then(|c| c.with_ca(backend.ca.as_deref()))
        .map_err(|source| ShipError::Url {
            backend: backend.name.clone(),
            url: backend.url.clone(),
            source,
        })
}

/// What the job-log thread holds: turns entries into documents and queues them.
#[derive(Debug)]
pub struct LogShipper {
    shipper: Shipper,
    docs: DocBuilder,
}

impl LogShipper {
    /// `group_of` maps a job name to its group.
    pub fn new(
        shipper: Shipper,
        group_of: Box<dyn Fn(&str) -> String + Send>,
        output_bytes: usize,
    ) -> Self {
        Self {
            shipper,
            docs: DocBuilder::new(group_of, output_bytes),
        }
    }

    /// Ships `entry` if it is a log event; `output` reads a finished machine's output.
    pub fn record(&mut self, entry: &LogEntry, output: Option<&mut dyn Read>) {
        if let Some(doc) = self.docs.document(entry, output) {
            self.shipper.ship(&doc);
        }
    }
}

/// The backends the settings enable (an empty URL disables one).
pub(crate) fn backends(settings: &saltpeter_config::Settings) -> Vec<Backend> {
    [
        (
            "elasticsearch",
            &settings.elasticsearch,
            &settings.elasticsearch_index,
        ),
        (
            "opensearch",
            &settings.opensearch,
            &settings.opensearch_index,
        ),
    ]
    .into_iter()
    .filter(|(_, url, _)| !url.trim().is_empty())
    .map(|(name, url, prefix)| Backend {
        name: name.to_owned(),
        url: url.clone(),
        index_prefix: prefix.clone(),
        ca: settings.ship_ca.clone(),
    })
    .collect()
}

/// The shipper the settings ask for, or `None` when no backend is configured. A backend whose
/// URL cannot be used is logged and left out rather than stopping the master: shipping is an
/// extra, scheduling is the job.
pub fn start_for(
    settings: &saltpeter_config::Settings,
    config: tokio::sync::watch::Receiver<Arc<saltpeter_config::Config>>,
) -> Option<LogShipper> {
    let backends: Vec<Backend> = backends(settings)
        .into_iter()
        .filter(|b| match b.validate() {
            Ok(()) => true,
            Err(error) => {
                tracing::error!(%error, "Not shipping logs to this backend.");
                false
            }
        })
        .collect();
    if backends.is_empty() {
        return None;
    }
    let names: Vec<String> = backends.iter().map(|b| b.name.clone()).collect();
    let options = ShipOptions::new(settings.data_dir.join("ship"));
    let output_bytes = options.output_bytes;
    match Shipper::start(backends, options) {
        Ok(shipper) => {
            tracing::info!(backends = ?names, "Shipping job-log events.");
            // The group is the job file's name; a job removed since has none.
            let group_of = Box::new(move |job: &str| {
                config
                    .borrow()
                    .jobs
                    .get(job)
                    .map(|j| j.group.clone())
                    .unwrap_or_default()
            });
            Some(LogShipper::new(shipper, group_of, output_bytes))
        }
        Err(error) => {
            tracing::error!(%error, "Not shipping job-log events.");
            None
        }
    }
}
