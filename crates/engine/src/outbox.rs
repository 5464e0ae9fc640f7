//! The outbox: how frames the engine sends reach the connection tasks.
//!
//! The engine reserves a slot in a connection's queue at once (so a wrapper that does not
//! read is still dropped on the spot), and the frames of a whole batch go to one delivery
//! task on the main runtime, which fills the slots. Why: a frame sent straight from the
//! engine's own thread wakes its connection's task from outside the runtime, and tokio puts
//! such wakes in its shared injection queue, which busy workers visit once per many polls.
//! With 10,000 wrappers, the acks released by one slow commit waited there behind the reads
//! for seconds (docs/PERFORMANCE.md). Woken from a worker, a connection's task goes to that worker's own
//! run queue, where reads and acks take turns and idle workers steal.
//!
//! Order is kept: every frame the engine sends passes through the one delivery task in the
//! order it was reserved.

use tokio::sync::mpsc::{self, OwnedPermit};

use super::Outbound;

/// Frames delivered before the delivery task lets its worker run other tasks, so a burst
/// of acks joins the worker's run queue in pieces that fit in it (tokio moves half of a full
/// queue of 256 to the injection queue) and reads keep their turns.
const DELIVER_CHUNK: usize = 64;

/// A reserved slot in a connection's queue and the frame for it.
type Delivery = (OwnedPermit<Outbound>, Outbound);

/// The engine's side: collects a batch of frames and hands it over in one wake-up.
#[derive(Debug)]
pub(super) struct Outbox {
    pending: Vec<Delivery>,
    to_delivery: mpsc::UnboundedSender<Vec<Delivery>>,
}

impl Outbox {
    /// Starts the delivery task on `runtime`; it ends when the outbox is dropped.
    pub(super) fn start(runtime: &tokio::runtime::Handle) -> Self {
        let (to_delivery, batches) = mpsc::unbounded_channel();
        runtime.spawn(deliver(batches));
        Self {
            pending: Vec::new(),
            to_delivery,
        }
    }

    /// Reserves a slot for `out` in `queue`, failing at once if the queue is full or closed.
    pub(super) fn reserve(
        &mut self,
        queue: &mpsc::Sender<Outbound>,
        out: Outbound,
    ) -> Result<(), mpsc::error::TrySendError<mpsc::Sender<Outbound>>> {
        let permit = queue.clone().try_reserve_owned()?;
        self.pending.push((permit, out));
        Ok(())
    }

    /// Hands the frames reserved so far to the delivery task.
    pub(super) fn flush(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let batch = std::mem::take(&mut self.pending);
        // The task lives as long as the runtime; if that is gone, so are the connections.
        let _ = self.to_delivery.send(batch);
    }
}

/// Fills reserved slots, batch by batch, yielding between chunks (see [`DELIVER_CHUNK`]).
async fn deliver(mut batches: mpsc::UnboundedReceiver<Vec<Delivery>>) {
    while let Some(batch) = batches.recv().await {
        for (n, (permit, out)) in batch.into_iter().enumerate() {
            if n > 0 && n % DELIVER_CHUNK == 0 {
                tokio::task::yield_now().await;
            }
            permit.send(out);
        }
    }
}

#[cfg(test)]
mod tests {
    use saltpeter_proto::{MasterMessage, Nack, NackType};

    use super::*;

    fn frame(n: u64) -> Outbound {
        Outbound::Message(MasterMessage::Nack(Nack {
            nack_type: NackType::OutOfOrder,
            expected_seq: n,
            received_seq: n,
            timestamp: None,
        }))
    }

    fn number(out: Outbound) -> u64 {
        match out {
            Outbound::Message(MasterMessage::Nack(n)) => n.expected_seq,
            other => panic!("unexpected frame {other:?}"),
        }
    }

    #[tokio::test]
    async fn frames_arrive_in_order_across_batches_and_chunks() {
        let mut outbox = Outbox::start(&tokio::runtime::Handle::current());
        let (tx, mut rx) = mpsc::channel(1024);
        let total = 3 * DELIVER_CHUNK as u64 + 5;
        for n in 0..total {
            outbox.reserve(&tx, frame(n)).unwrap();
            if n % 50 == 49 {
                outbox.flush();
            }
        }
        outbox.flush();
        for n in 0..total {
            assert_eq!(number(rx.recv().await.unwrap()), n);
        }
    }

    #[tokio::test]
    async fn a_full_queue_is_refused_when_reserving_not_when_delivering() {
        let mut outbox = Outbox::start(&tokio::runtime::Handle::current());
        let (tx, mut rx) = mpsc::channel(2);
        outbox.reserve(&tx, frame(1)).unwrap();
        outbox.reserve(&tx, frame(2)).unwrap();
        // Nothing was delivered yet, but both slots are taken.
        assert!(matches!(
            outbox.reserve(&tx, frame(3)),
            Err(mpsc::error::TrySendError::Full(_))
        ));
        outbox.flush();
        assert_eq!(number(rx.recv().await.unwrap()), 1);
        assert_eq!(number(rx.recv().await.unwrap()), 2);
        drop(rx);
        assert!(matches!(
            outbox.reserve(&tx, frame(4)),
            Err(mpsc::error::TrySendError::Closed(_))
        ));
    }
}
