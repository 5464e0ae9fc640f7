//! The protocol bookkeeping of one run, free of I/O so it can be tested exhaustively: which
//! phase the current connection is in, which output seq the master holds, what to send next,
//! and when `complete` is due. [`crate::link`] feeds it events and sends what it says.
//!
//! Rules (fixed with the master, see docs/PROTOCOL.md):
//! - Every connection starts with `connect`; its ack carries `last_seq`, the highest seq the
//!   master holds, and sending resumes right after it: no gap, no duplicate (docs/COMPATIBILITY.md: broken reconnects).
//! - `start` follows until it has been acked once, on any connection.
//! - Up to [`WINDOW`] outputs may be in flight; acks are cumulative; `nack{expected_seq}`
//!   rewinds to `expected_seq`.
//! - `complete` goes out only once every output is acked, and is repeated on every new
//!   connection until acked.

use saltpeter_proto::Cause;

/// Output messages allowed in flight (sent, not yet acked) on one connection.
pub const WINDOW: u64 = 8;

/// Where the current connection stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// No connection.
    Down,
    /// `connect` sent, waiting for its ack.
    AwaitConnectAck,
    /// `start` sent, waiting for its ack; output waits too.
    AwaitStartAck,
    /// Output may flow.
    Streaming,
}

/// How the run ended, as reported in `complete`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Completion {
    pub retcode: i64,
    pub cause: Cause,
    pub signal: Option<i32>,
}

/// What to do after a connect ack.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Resumed {
    /// Outputs up to this seq can be dropped: the master holds them.
    pub ack_through: Option<u64>,
    /// `start` must be sent (it was never acked).
    pub send_start: bool,
    /// The master holds less than it once acknowledged (it lost data); what it lost cannot
    /// be sent again. Logged by the caller.
    pub regressed: bool,
}

/// The session state of one run across all its connections.
#[derive(Debug)]
pub struct Session {
    phase: Phase,
    start_acked: bool,
    ever_resumed: bool,
    /// Highest seq the master holds, `None` for none.
    acked: Option<u64>,
    /// Next seq to transmit on this connection.
    next_send: u64,
    /// The seq the last nack rewound to, so that the nacks for the other messages that were
    /// in flight at the time do not rewind again (each would cause a duplicate burst).
    rewound_to: Option<u64>,
    completion: Option<Completion>,
    complete_sent: bool,
    complete_acked: bool,
}

impl Default for Session {
    fn default() -> Self {
        Self::new()
    }
}

impl Session {
    pub fn new() -> Self {
        Self {
            phase: Phase::Down,
            start_acked: false,
            ever_resumed: false,
            acked: None,
            next_send: 0,
            rewound_to: None,
            completion: None,
            complete_sent: false,
            complete_acked: false,
        }
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// The lowest seq not yet acknowledged.
    pub fn first_unacked(&self) -> u64 {
        self.acked.map_or(0, |a| a + 1)
    }

    /// A socket is open; the caller sends `connect`.
    pub fn connected(&mut self) {
        self.phase = Phase::AwaitConnectAck;
        self.complete_sent = false;
        self.rewound_to = None;
    }

    /// The connection is gone.
    pub fn disconnected(&mut self) {
        self.phase = Phase::Down;
        self.complete_sent = false;
    }

    /// The master acknowledged `connect`, holding output up to `last_seq` (-1: none; absent:
    /// an original master that does not say). `produced` is the number of outputs numbered.
    pub fn connect_acked(&mut self, last_seq: Option<i64>, produced: u64) -> Resumed {
        let mut out = Resumed {
            ack_through: None,
            send_start: false,
            regressed: false,
        };
        if self.phase != Phase::AwaitConnectAck {
            return out;
        }
        let held = match last_seq {
            Some(n) if n >= 0 => Some((n as u64).min(produced.saturating_sub(1))),
            Some(_) => None,
            // The original master keeps no state across sockets and tells nothing; the best
            // guess is that it holds what it acknowledged.
            None if self.ever_resumed => self.acked,
            None => None,
        };
        if held.map_or(0, |h| h + 1) > self.first_unacked() {
            self.acked = held;
            out.ack_through = held;
        } else if held < self.acked {
            out.regressed = true;
        }
        self.next_send = self.first_unacked();
        self.ever_resumed = true;
        out.send_start = !self.start_acked;
        self.phase = if self.start_acked {
            Phase::Streaming
        } else {
            Phase::AwaitStartAck
        };
        out
    }

    /// The master acknowledged `start`.
    pub fn start_acked(&mut self) {
        self.start_acked = true;
        if self.phase == Phase::AwaitStartAck {
            self.phase = Phase::Streaming;
        }
    }

    /// A cumulative output ack for `seq`. Returns the seq through which outputs can be
    /// dropped, if it advanced.
    pub fn output_acked(&mut self, seq: u64, produced: u64) -> Option<u64> {
        if seq >= produced || self.acked.is_some_and(|a| a >= seq) {
            return None;
        }
        self.acked = Some(seq);
        self.next_send = self.next_send.max(seq + 1);
        Some(seq)
    }

    /// A nack: the master expects `expected` next. Returns the seq through which outputs can
    /// be dropped, if the nack implies the master holds more than was acked.
    pub fn nacked(&mut self, expected: u64, produced: u64) -> Option<u64> {
        if self.phase != Phase::Streaming || expected > produced {
            return None;
        }
        let implied = expected
            .checked_sub(1)
            .and_then(|held| self.output_acked(held, produced));
        if expected < self.next_send && self.rewound_to != Some(expected) {
            self.next_send = expected.max(self.first_unacked());
            self.rewound_to = Some(expected);
        }
        implied
    }

    /// The next output to transmit, if the window allows; counts it as sent.
    pub fn take_next(&mut self, produced: u64) -> Option<u64> {
        if self.phase != Phase::Streaming
            || self.next_send >= produced
            || self.next_send - self.first_unacked() >= WINDOW
        {
            return None;
        }
        let seq = self.next_send;
        self.next_send += 1;
        Some(seq)
    }

    /// Outputs sent on this connection and not yet acked.
    pub fn in_flight(&self) -> u64 {
        self.next_send.saturating_sub(self.first_unacked())
    }

    /// The run has ended; every output has been numbered.
    pub fn set_completion(&mut self, completion: Completion) {
        self.completion = Some(completion);
    }

    pub fn completion(&self) -> Option<Completion> {
        self.completion
    }

    /// `complete` to send now, if due: the run ended, every output is acked, and it has not
    /// been sent on this connection yet. Counts it as sent.
    pub fn take_complete(&mut self, produced: u64) -> Option<Completion> {
        let due = self.phase == Phase::Streaming
            && !self.complete_sent
            && !self.complete_acked
            && self.first_unacked() == produced;
        let completion = self.completion.filter(|_| due)?;
        self.complete_sent = true;
        Some(completion)
    }

    /// The master acknowledged `complete`. Returns whether it was one we sent.
    pub fn complete_acked(&mut self) -> bool {
        if self.complete_sent {
            self.complete_acked = true;
        }
        self.complete_acked
    }

    pub fn is_done(&self) -> bool {
        self.complete_acked
    }

    /// Whether the connection is waiting for an ack of any kind (for the ack timeout).
    pub fn awaiting_ack(&self) -> bool {
        match self.phase {
            Phase::Down => false,
            Phase::AwaitConnectAck | Phase::AwaitStartAck => true,
            Phase::Streaming => {
                self.in_flight() > 0 || (self.complete_sent && !self.complete_acked)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn streaming(produced: u64) -> Session {
        let mut s = Session::new();
        s.connected();
        let r = s.connect_acked(Some(-1), produced);
        assert!(r.send_start);
        s.start_acked();
        assert_eq!(s.phase(), Phase::Streaming);
        s
    }

    fn drain(s: &mut Session, produced: u64) -> Vec<u64> {
        std::iter::from_fn(|| s.take_next(produced)).collect()
    }

    #[test]
    fn output_waits_for_start_ack_then_respects_the_window() {
        let mut s = Session::new();
        s.connected();
        assert_eq!(s.take_next(20), None);
        s.connect_acked(Some(-1), 20);
        assert_eq!(s.take_next(20), None, "no output before start is acked");
        s.start_acked();
        assert_eq!(drain(&mut s, 20), (0..WINDOW).collect::<Vec<_>>());
        assert_eq!(s.output_acked(2, 20), Some(2));
        assert_eq!(drain(&mut s, 20), vec![8, 9, 10]);
        assert_eq!(s.output_acked(1, 20), None, "old acks change nothing");
    }

    #[test]
    fn reconnect_resumes_after_the_masters_last_seq_and_skips_start() {
        let mut s = streaming(10);
        assert_eq!(drain(&mut s, 10).len(), 8);
        s.output_acked(1, 10);
        s.disconnected();
        assert_eq!(s.take_next(10), None);
        s.connected();
        // The master applied 0..=4 although only 0..=1 were acked before the drop.
        let r = s.connect_acked(Some(4), 10);
        assert_eq!(
            r,
            Resumed {
                ack_through: Some(4),
                send_start: false,
                regressed: false
            }
        );
        assert_eq!(drain(&mut s, 10), vec![5, 6, 7, 8, 9]);
    }

    #[test]
    fn start_is_resent_on_reconnect_until_acked() {
        let mut s = Session::new();
        s.connected();
        assert!(s.connect_acked(Some(-1), 0).send_start);
        s.disconnected();
        s.connected();
        assert!(s.connect_acked(Some(-1), 0).send_start);
        s.start_acked();
        s.disconnected();
        s.connected();
        assert!(!s.connect_acked(Some(-1), 0).send_start);
    }

    #[test]
    fn an_original_master_without_last_seq_resumes_after_the_last_ack() {
        let mut s = Session::new();
        s.connected();
        s.connect_acked(None, 3);
        s.start_acked();
        assert_eq!(drain(&mut s, 3), vec![0, 1, 2]);
        s.output_acked(0, 3);
        s.disconnected();
        s.connected();
        s.connect_acked(None, 3);
        assert_eq!(drain(&mut s, 3), vec![1, 2]);
    }

    #[test]
    fn a_master_that_lost_data_is_flagged_and_unknown_seqs_are_clamped() {
        let mut s = streaming(5);
        drain(&mut s, 5);
        s.output_acked(3, 5);
        s.disconnected();
        s.connected();
        let r = s.connect_acked(Some(1), 5);
        assert!(r.regressed);
        assert_eq!(drain(&mut s, 5), vec![4]);
        s.disconnected();
        s.connected();
        // A last_seq beyond what was produced cannot be trusted beyond what exists.
        let r = s.connect_acked(Some(99), 5);
        assert_eq!(r.ack_through, Some(4));
        assert_eq!(s.take_next(5), None);
    }

    #[test]
    fn nack_rewinds_once_per_gap() {
        let mut s = streaming(10);
        drain(&mut s, 10);
        // Messages 3..=7 were in flight when the master noticed a gap at 3.
        assert_eq!(s.nacked(3, 10), Some(2));
        assert_eq!(s.take_next(10), Some(3));
        // The nacks for 4..=7 that follow ask for 3 again: no second rewind.
        for _ in 4..=7 {
            s.nacked(3, 10);
        }
        assert_eq!(drain(&mut s, 10), vec![4, 5, 6, 7, 8, 9]);
    }

    #[test]
    fn complete_waits_for_every_ack_and_is_resent_after_reconnect() {
        let mut s = streaming(2);
        s.set_completion(Completion {
            retcode: 0,
            cause: Cause::Exit,
            signal: None,
        });
        assert_eq!(drain(&mut s, 2), vec![0, 1]);
        assert_eq!(s.take_complete(2), None, "outputs still in flight");
        s.output_acked(1, 2);
        assert!(s.take_complete(2).is_some());
        assert_eq!(s.take_complete(2), None, "only once per connection");
        assert!(s.awaiting_ack());
        s.disconnected();
        s.connected();
        s.connect_acked(Some(1), 2);
        assert!(s.take_complete(2).is_some());
        assert!(s.complete_acked());
        assert!(s.is_done());
        assert!(!s.awaiting_ack());
    }

    #[test]
    fn complete_ack_for_something_never_sent_is_ignored() {
        let mut s = streaming(0);
        assert!(!s.complete_acked());
        assert!(!s.is_done());
    }
}
