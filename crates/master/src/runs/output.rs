//! Per-machine output held in memory: append-only and bounded.
//!
//! A job may print gigabytes; the master must not. We keep the first `head_cap` bytes and the
//! last `tail_cap` bytes, plus the total length, so the start of a run (where commands usually
//! say what they are about to do) and its end (where they say how it went) are always at hand.
//! The full text is streamed to the job's log file as it arrives (see `joblog`). Appending is
//! amortised O(length of the appended text), independent of how much came before.

/// Bounded head-and-tail text buffer.
#[derive(Clone, Debug)]
pub struct OutputBuffer {
    head: String,
    tail: String,
    head_cap: usize,
    tail_cap: usize,
    total_bytes: u64,
}

/// Default in-memory caps for a running machine: 1 MiB of head and 1 MiB of tail.
pub const RUNNING_CAP: usize = 1024 * 1024;
/// Caps for finished runs kept in memory for the API: 64 KiB each.
pub const FINISHED_CAP: usize = 64 * 1024;

impl Default for OutputBuffer {
    fn default() -> Self {
        Self::with_caps(RUNNING_CAP, RUNNING_CAP)
    }
}

impl OutputBuffer {
    /// An empty buffer keeping at most `head_cap` + `tail_cap` bytes.
    pub fn with_caps(head_cap: usize, tail_cap: usize) -> Self {
        Self {
            head: String::new(),
            tail: String::new(),
            head_cap,
            tail_cap,
            total_bytes: 0,
        }
    }

    /// Appends text.
    pub fn push(&mut self, text: &str) {
        self.total_bytes += text.len() as u64;
        let mut rest = text;
        if self.tail.is_empty() && self.head.len() < self.head_cap {
            let room = self.head_cap - self.head.len();
            let cut = floor_char_boundary(rest, room.min(rest.len()));
            self.head.push_str(&rest[..cut]);
            rest = &rest[cut..];
        }
        if rest.is_empty() {
            return;
        }
        self.tail.push_str(rest);
        // Trim only when the tail has grown to twice its cap, so each byte is moved at most a
        // constant number of times.
        if self.tail.len() > self.tail_cap.saturating_mul(2).max(1) {
            self.trim_tail();
        }
    }

    fn trim_tail(&mut self) {
        if self.tail.len() <= self.tail_cap {
            return;
        }
        let drop = ceil_char_boundary(&self.tail, self.tail.len() - self.tail_cap);
        self.tail.drain(..drop);
    }

    /// Total bytes ever appended.
    pub fn total_bytes(&self) -> u64 {
        self.total_bytes
    }

    /// Bytes appended but no longer held in memory. Between trims the tail may hold up to
    /// twice its cap; it is counted as if trimmed, so this number and [`Self::text`] agree.
    pub fn omitted_bytes(&self) -> u64 {
        self.total_bytes - self.head.len() as u64 - self.tail_view().len() as u64
    }

    /// The text as held: everything when nothing was dropped, else head, a marker saying how
    /// much is missing, and tail.
    pub fn text(&self) -> String {
        let tail = self.tail_view();
        let omitted = self.omitted_bytes();
        if omitted == 0 {
            let mut s = String::with_capacity(self.head.len() + tail.len());
            s.push_str(&self.head);
            s.push_str(tail);
            return s;
        }
        format!(
            "{}\n[... {omitted} bytes omitted here; the full output is in the job log ...]\n{}",
            self.head, tail
        )
    }

    fn tail_view(&self) -> &str {
        if self.tail.len() <= self.tail_cap {
            &self.tail
        } else {
            &self.tail[ceil_char_boundary(&self.tail, self.tail.len() - self.tail_cap)..]
        }
    }

    /// Shrinks the caps (for finished runs kept in memory), keeping the newest tail bytes.
    pub fn shrink(&mut self, head_cap: usize, tail_cap: usize) {
        if self.head.len() > head_cap {
            let cut = floor_char_boundary(&self.head, head_cap);
            // What leaves the head is dropped; it sits before the tail, so order holds.
            self.head.truncate(cut);
        }
        self.head_cap = head_cap;
        self.tail_cap = tail_cap;
        self.trim_tail();
        self.head.shrink_to_fit();
        self.tail.shrink_to_fit();
    }
}

/// The largest char boundary at or below `at`.
fn floor_char_boundary(s: &str, mut at: usize) -> usize {
    at = at.min(s.len());
    while !s.is_char_boundary(at) {
        at -= 1;
    }
    at
}

/// The smallest char boundary at or above `at`.
fn ceil_char_boundary(s: &str, mut at: usize) -> usize {
    at = at.min(s.len());
    while !s.is_char_boundary(at) {
        at += 1;
    }
    at
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_output_is_kept_whole() {
        let mut b = OutputBuffer::with_caps(8, 8);
        b.push("hello ");
        b.push("wörld");
        assert_eq!(b.text(), "hello wörld");
        assert_eq!(b.total_bytes(), 12);
        assert_eq!(b.omitted_bytes(), 0);
    }

    #[test]
    fn large_output_keeps_head_and_tail_and_counts_the_rest() {
        let mut b = OutputBuffer::with_caps(4, 4);
        for i in 0..100 {
            b.push(&format!("{}", i % 10));
        }
        assert_eq!(b.total_bytes(), 100);
        assert_eq!(b.omitted_bytes(), 92);
        let text = b.text();
        assert!(text.starts_with("0123\n[... 92 bytes omitted"), "{text}");
        assert!(text.ends_with("]\n6789"), "{text}");
    }

    #[test]
    fn multibyte_characters_are_never_split() {
        let mut b = OutputBuffer::with_caps(3, 3);
        for _ in 0..50 {
            b.push("é🚀");
        }
        let text = b.text();
        assert!(text.starts_with('é'));
        assert!(text.ends_with('🚀'));
        assert_eq!(b.total_bytes(), 50 * 6);
    }

    #[test]
    fn shrink_keeps_the_newest_tail() {
        let mut b = OutputBuffer::with_caps(10, 10);
        b.push("abcdefghijklmnopqrstuvwxyz");
        b.shrink(2, 3);
        let text = b.text();
        assert!(text.starts_with("ab\n"), "{text}");
        assert!(text.ends_with("xyz"), "{text}");
    }
}
