//! Which master the link tries next, and whether it pauses first: the failover order over the
//! list of masters (`SP_WEBSOCKET_URLS`, or the one URL of a single master), free of I/O so
//! that the order can be tested on its own. [`crate::link`] reports what happened to each
//! connection and sleeps for the pauses it is told.
//!
//! Rules:
//! - A failed attempt (no TCP, TLS or WebSocket connection, no answer to `connect`, or a
//!   `NOT_HOLDER` refusal) moves on to the next master of the list, at once.
//! - Once every master of the list has failed in a row (a round), the link pauses for the
//!   capped, jittered backoff of [`crate::backoff`], whose window grows with each failed round.
//! - A connection that worked (its `connect` was acknowledged) and then dropped is retried
//!   first at the same master, after the backoff's pause, as with a single master: a master
//!   that restarts or loses a socket is most likely still the holder.
//!
//! With one master this is exactly the single master's reconnect schedule: each failed
//! attempt is a failed round.

/// The position in the list of masters and the failures that decide the next pause.
#[derive(Debug)]
pub struct Masters {
    count: usize,
    current: usize,
    /// Failed attempts since the current round began.
    failed_in_round: usize,
    /// Pauses taken since a connection last worked; the backoff's window grows with it.
    pauses: u32,
    /// Rounds in which every master failed since a connection last worked.
    rounds_failed: u32,
}

/// What to do after a failed attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Next {
    /// Try the (new) current master at once.
    Now,
    /// Every master failed in this round: pause for the backoff after this many earlier
    /// pauses, then try the current master.
    Pause(u32),
}

impl Masters {
    /// The first of `count` masters, the one that launched the wrapper, comes first. A count
    /// of 0 is taken as 1 so that the index is always valid.
    pub fn new(count: usize) -> Self {
        Self {
            count: count.max(1),
            current: 0,
            failed_in_round: 0,
            pauses: 0,
            rounds_failed: 0,
        }
    }

    /// The index of the master to try next (or connected to now).
    pub fn current(&self) -> usize {
        self.current
    }

    /// How many masters there are.
    pub fn count(&self) -> usize {
        self.count
    }

    /// Whether no attempt failed since a connection last worked (or since the start): with
    /// one master, the failure the link logs at once.
    pub fn first_failure(&self) -> bool {
        self.pauses == 0 && self.failed_in_round == 0
    }

    /// Rounds in which every master failed since a connection last worked (or since the
    /// start). A drop of a connection that worked does not count: the round that follows it
    /// is the one that looks for the job's new holder.
    pub fn rounds_failed(&self) -> u32 {
        self.rounds_failed
    }

    /// The attempt at the current master failed: move on to the next one. Within a round the
    /// next master is tried at once; after the last master of a round, after a pause.
    //
    // Why at once and not after a short pause: each master still sees each wrapper at most
    // once per round, and rounds are spaced by the jittered backoff, so a fleet failing over
    // puts on every master the same load a single master's reconnect storm does, spread over
    // the same window; the jitter that spread the round's first attempts carries over to the
    // next masters, since a refused connection or a `NOT_HOLDER` answer takes about the same
    // time for every wrapper. A pause between masters would only delay finding the holder,
    // and a wrapper has 15 s from a takeover to send its next heartbeat.
    pub fn attempt_failed(&mut self) -> Next {
        self.current = (self.current + 1) % self.count;
        self.failed_in_round += 1;
        if self.failed_in_round < self.count {
            return Next::Now;
        }
        self.failed_in_round = 0;
        self.rounds_failed = self.rounds_failed.saturating_add(1);
        let pauses = self.pauses;
        self.pauses = self.pauses.saturating_add(1);
        Next::Pause(pauses)
    }

    /// The current master acknowledged `connect`: the next loss starts afresh.
    pub fn connected(&mut self) {
        self.failed_in_round = 0;
        self.pauses = 0;
        self.rounds_failed = 0;
    }

    /// A connection that worked was lost. The same master is tried again, first, after the
    /// pause this returns the number of earlier pauses for; a new round starts with it.
    pub fn dropped(&mut self) -> u32 {
        self.failed_in_round = 0;
        let pauses = self.pauses;
        self.pauses = self.pauses.saturating_add(1);
        pauses
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_attempts_go_round_the_list_and_pause_after_each_round() {
        let mut m = Masters::new(3);
        assert_eq!(m.current(), 0);
        assert_eq!(m.attempt_failed(), Next::Now);
        assert_eq!(m.current(), 1);
        assert_eq!(m.attempt_failed(), Next::Now);
        assert_eq!(m.current(), 2);
        assert_eq!(m.attempt_failed(), Next::Pause(0));
        assert_eq!(m.current(), 0);
        let next: Vec<Next> = (0..6).map(|_| m.attempt_failed()).collect();
        assert_eq!(
            next,
            [
                Next::Now,
                Next::Now,
                Next::Pause(1),
                Next::Now,
                Next::Now,
                Next::Pause(2)
            ]
        );
    }

    #[test]
    fn a_connection_that_worked_is_retried_at_the_same_master_first() {
        let mut m = Masters::new(3);
        m.attempt_failed();
        m.connected();
        assert_eq!(m.current(), 1);
        assert_eq!(m.dropped(), 0);
        assert_eq!(m.current(), 1, "same master after a drop");
        assert_eq!(m.rounds_failed(), 0);
        // The new round starts with that master: two more failures move on at once, the
        // third completes the round and pauses longer than the drop did.
        assert_eq!(m.attempt_failed(), Next::Now);
        assert_eq!(m.attempt_failed(), Next::Now);
        assert_eq!(m.attempt_failed(), Next::Pause(1));
        assert_eq!(m.current(), 1);
        assert_eq!(m.rounds_failed(), 1);
        m.connected();
        assert_eq!(m.rounds_failed(), 0);
        assert_eq!(
            m.dropped(),
            0,
            "a connection that worked resets the backoff"
        );
    }

    #[test]
    fn one_master_pauses_after_every_failure_as_before() {
        let mut m = Masters::new(1);
        assert!(m.first_failure());
        assert_eq!(m.dropped(), 0);
        assert!(!m.first_failure());
        assert_eq!(m.attempt_failed(), Next::Pause(1));
        assert_eq!(m.attempt_failed(), Next::Pause(2));
        assert_eq!(m.current(), 0);
        m.connected();
        assert_eq!(m.attempt_failed(), Next::Pause(0));
        // An empty list cannot index out of range.
        let mut none = Masters::new(0);
        assert_eq!(none.count(), 1);
        assert_eq!(none.attempt_failed(), Next::Pause(0));
        assert_eq!(none.current(), 0);
    }
}
