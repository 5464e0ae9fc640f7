//! One backend's sender thread: batches from the queue to `_bulk`, the answer back to the
//! queue, and the backoff between failures.

use std::time::{Duration, Instant};

use super::queue::{Batch, Item};
use super::{Lane, ShipOptions};
use saltpeter_http::Client;

/// `filter_path` keeps a large batch's answer small; both backends support it.
const BULK_PATH: &str = "/_bulk?filter_path=errors,items.*.status,items.*.error";

/// What became of one `_bulk` request.
#[derive(Debug)]
enum Outcome {
    /// Answered item by item, in request order: `None` = accepted, else status and error.
    Items(Vec<Option<(u16, String)>>),
    /// 413: the request was too big.
    TooLarge,
    /// The request as a whole failed in a way that may pass later.
    Retry(String),
    /// The request as a whole was refused (a 4xx that retrying cannot fix).
    Reject(u16, String),
}

/// The thread's body; returns when the lane is told to stop.
pub(super) fn run(lane: &Lane, client: &Client, options: &ShipOptions) {
    let mut backoff = Backoff::new(options.backoff_base, options.backoff_cap);
    let mut batch_docs = options.batch_docs.max(1);
    let mut failing = false;
    loop {
        let Some(batch) = next_batch(lane, batch_docs, options.batch_bytes) else {
            return;
        };
        let outcome = post(client, &batch.items);
        let batch_len = batch.items.len();
        let mut state = lane.state.lock();
        match outcome {
            Outcome::Items(results) => {
                if failing {
                    tracing::info!(backend = %lane.name, "Shipping works again.");
                    failing = false;
                }
                let mut retry = false;
                for (mut item, result) in batch.items.into_iter().zip(results) {
                    match result {
                        None => state.stats.delivered += 1,
                        Some((status, error))
                            if retryable(status)
                                && item.attempts + 1 < options.max_item_attempts =>
                        {
                            tracing::debug!(backend = %lane.name, status, %error, "Bulk item will be retried.");
                            item.attempts += 1;
                            retry = true;
                            match state.queue.push(&item) {
                                Ok(()) => state.stats.requeued += 1,
                                Err(error) => {
                                    state.stats.lost += 1;
                                    tracing::error!(backend = %lane.name, %error, "Could not requeue a log document.");
                                }
                            }
                        }
                        Some((status, error)) => {
                            state.stats.rejected += 1;
                            tracing::warn!(
                                backend = %lane.name,
                                status,
                                %error,
                                index = %item.index,
                                job = %item.doc.job_name,
                                msg_type = %item.doc.msg_type,
                                "The search backend refused a log document; dropped."
                            );
                        }
                    }
                }
                settle(lane, &mut state, &batch.end, batch_len);
                batch_docs = options.batch_docs.max(1);
                if !retry {
                    backoff.reset();
                    continue;
                }
            }
            Outcome::TooLarge if batch.items.len() > 1 => {
                // Split until it fits; nothing was accepted, so the cursor stays.
                batch_docs = (batch.items.len() / 2).max(1);
                continue;
            }
            Outcome::TooLarge | Outcome::Reject(..) => {
                let (status, text) = match &outcome {
                    Outcome::Reject(status, text) => (*status, text.as_str()),
                    _ => (413, "request too large"),
                };
                state.stats.rejected += batch.items.len() as u64;
                tracing::error!(
                    backend = %lane.name,
                    status,
                    error = %text,
                    documents = batch.items.len(),
                    "The search backend refused a bulk request; its documents are dropped."
                );
                settle(lane, &mut state, &batch.end, batch_len);
                continue;
            }
            Outcome::Retry(reason) => {
                state.stats.failed_requests += 1;
                failing = true;
                tracing::warn!(
                    backend = %lane.name,
                    error = %reason,
                    retry_in_ms = backoff.peek().as_millis() as u64,
                    "Shipping log documents failed; will retry."
                );
            }
        }
        drop(state);
        if sleep(lane, backoff.next()) {
            return;
        }
    }
}

fn settle(lane: &Lane, state: &mut super::LaneState, end: &super::queue::Cursor, items: usize) {
    if let Err(error) = state.queue.settle(*end, items) {
        // The batch is done either way; a stale cursor only means a resend, which the
        // document ids make harmless.
        tracing::warn!(backend = %lane.name, %error, "Could not record shipping progress.");
    }
}

/// Waits for something to send; `None` when told to stop.
fn next_batch(lane: &Lane, max_docs: usize, max_bytes: u64) -> Option<Batch> {
    let mut state = lane.state.lock();
    loop {
        if state.stop {
            return None;
        }
        match state.queue.read(max_docs, max_bytes) {
            Ok(batch) if !batch.items.is_empty() => return Some(batch),
            Ok(_) => {}
            Err(error) => {
                tracing::warn!(backend = %lane.name, %error, "Could not read the ship queue.");
            }
        }
        // `ship` notifies; the timeout only bounds the damage of a missed wake-up.
        lane.wake.wait_for(&mut state, Duration::from_secs(5));
    }
}

/// Sleeps `d` unless told to stop first; true when stopped. New documents do not cut a backoff
/// short, or a busy master would hammer a backend that is down.
fn sleep(lane: &Lane, d: Duration) -> bool {
    let deadline = Instant::now() + d;
    let mut state = lane.state.lock();
    while !state.stop && Instant::now() < deadline {
        lane.wake.wait_until(&mut state, deadline);
    }
    state.stop
}

fn retryable(status: u16) -> bool {
    status == 429 || status >= 500
}

/// The NDJSON body: an `index` action (no `_type`) and the document, per item.
pub(super) fn body(items: &[Item]) -> Vec<u8> {
    let mut out = Vec::new();
    for item in items {
        let action = serde_json::json!({"index": {"_index": item.index, "_id": item.id}});
        // Serialising plain structs and `json!` values cannot fail.
        let _ = serde_json::to_writer(&mut out, &action);
        out.push(b'\n');
        let _ = serde_json::to_writer(&mut out, &item.doc);
        out.push(b'\n');
    }
    out
}

fn post(client: &Client, items: &[Item]) -> Outcome {
    let response = match client.send(
        "POST",
        BULK_PATH,
        Some("application/x-ndjson"),
        &body(items),
    ) {
        Ok(r) => r,
        Err(e) => return Outcome::Retry(e.to_string()),
    };
    let text = || response.body.chars().take(500).collect::<String>();
    match response.status {
        200..=299 => {}
        413 => return Outcome::TooLarge,
        // Rate limits, auth and routing can all be fixed on the other side; keep the data.
        401 | 403 | 404 | 408 | 429 => {
            return Outcome::Retry(format!("HTTP {}: {}", response.status, text()));
        }
        400..=499 => return Outcome::Reject(response.status, text()),
        _ => return Outcome::Retry(format!("HTTP {}: {}", response.status, text())),
    }
    let json = response.json();
    if json["errors"] == serde_json::Value::Bool(false) {
        return Outcome::Items(vec![None; items.len()]);
    }
    let Some(answers) = json["items"].as_array().filter(|a| a.len() == items.len()) else {
        return Outcome::Retry(format!("unexpected bulk answer: {}", text()));
    };
    Outcome::Items(
        answers
            .iter()
            .map(|answer| {
                // `{"index": {"status": 201, ...}}`: one action key per item.
                let result = answer.as_object().and_then(|o| o.values().next());
                let status = result
                    .and_then(|r| r["status"].as_u64())
                    .and_then(|s| u16::try_from(s).ok())
                    .unwrap_or(500);
                if (200..300).contains(&status) {
                    None
                } else {
                    let error = result.map(|r| r["error"].to_string()).unwrap_or_default();
                    Some((status, error))
                }
            })
            .collect(),
    )
}

/// Exponential backoff with equal jitter: half the step fixed, half random, so many masters
/// recovering from the same outage do not retry in step.
#[derive(Debug)]
struct Backoff {
    base: Duration,
    cap: Duration,
    step: Duration,
}

impl Backoff {
    fn new(base: Duration, cap: Duration) -> Self {
        Self {
            base,
            cap,
            step: base,
        }
    }

    fn reset(&mut self) {
        self.step = self.base;
    }

    fn peek(&self) -> Duration {
        self.step
    }

    fn next(&mut self) -> Duration {
        let step = self.step;
        self.step = (self.step * 2).min(self.cap);
        let half = step / 2;
        let jitter = rand::random_range(0..=half.as_millis() as u64);
        half + Duration::from_millis(jitter)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap_with_bounded_jitter() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(1000));
        let mut steps = Vec::new();
        for _ in 0..6 {
            let step = b.peek();
            let d = b.next();
            assert!(
                d >= step / 2 && d <= step,
                "{d:?} outside [{:?}, {step:?}]",
                step / 2
            );
            steps.push(step.as_millis());
        }
        assert_eq!(steps, [100, 200, 400, 800, 1000, 1000]);
        b.reset();
        assert_eq!(b.peek(), Duration::from_millis(100));
    }
}
