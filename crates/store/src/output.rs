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
    /// UTF-16 code units held in `head` (what a browser counts; see [`OutputBuffer::read_from`]).
    head_u16: u64,
    /// UTF-16 code units held in `tail`, including the part past its cap not yet trimmed.
    tail_u16: u64,
    /// UTF-16 code units ever appended (skipped bytes count one unit each).
    total_u16: u64,
    /// Set once bytes were skipped: later text belongs after the gap, never in the head.
    head_closed: bool,
}

/// Default in-memory caps for a running machine: 1 MiB of head and 1 MiB of tail.
pub(crate) const RUNNING_CAP: usize = 1024 * 1024;
/// Caps for finished runs kept in memory for the API: 64 KiB each.
pub const FINISHED_CAP: usize = 64 * 1024;

impl Default for OutputBuffer {
    fn default() -> Self {
        Self::with_caps(RUNNING_CAP, RUNNING_CAP)
    }
}

impl OutputBuffer {
    /// An empty buffer keeping at most `head_cap` + `tail_cap` bytes.
    pub(crate) fn with_caps(head_cap: usize, tail_cap: usize) -> Self {
        Self {
            head: String::new(),
            tail: String::new(),
            head_cap,
            tail_cap,
            total_bytes: 0,
            head_u16: 0,
            tail_u16: 0,
            total_u16: 0,
            head_closed: false,
        }
    }

    /// Appends text.
    pub fn push(&mut self, text: &str) {
        self.total_bytes += text.len() as u64;
        self.total_u16 += utf16_len(text);
        let mut rest = text;
        if !self.head_closed && self.tail.is_empty() && self.head.len() < self.head_cap {
            let room = self.head_cap - self.head.len();
            let cut = floor_char_boundary(rest, room.min(rest.len()));
            self.head.push_str(&rest[..cut]);
            self.head_u16 += utf16_len(&rest[..cut]);
            rest = &rest[cut..];
        }
        if rest.is_empty() {
            return;
        }
        self.tail.push_str(rest);
        self.tail_u16 += utf16_len(rest);
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
        // Round down: a tail cap smaller than one character must not empty the tail.
        let drop = floor_char_boundary(&self.tail, self.tail.len() - self.tail_cap);
        self.tail_u16 -= utf16_len(&self.tail[..drop]);
        self.tail.drain(..drop);
    }

    /// Counts `bytes` of output that is not held (dropped by the store's retention before a
    /// restart); what follows is kept as tail.
    pub fn skip(&mut self, bytes: u64) {
        if bytes > 0 {
            self.total_bytes += bytes;
            // Their UTF-16 length is unknown; one unit per byte keeps later positions unique.
            self.total_u16 += bytes;
            self.head_closed = true;
        }
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
            &self.tail[floor_char_boundary(&self.tail, self.tail.len() - self.tail_cap)..]
        }
    }

    /// Shrinks the caps (for finished runs kept in memory), keeping the newest tail bytes.
    pub fn shrink(&mut self, head_cap: usize, tail_cap: usize) {
        if self.head.len() > head_cap {
            let cut = floor_char_boundary(&self.head, head_cap);
            // What leaves the head is dropped; it sits before the tail, so order holds.
            self.head.truncate(cut);
            self.head_u16 = utf16_len(&self.head);
        }
        self.head_cap = head_cap;
        if self.total_u16 > self.head_u16 {
            // Text follows the head (held or dropped): later text must not be appended to it.
            self.head_cap = self.head.len();
        }
        self.tail_cap = tail_cap;
        self.trim_tail();
        self.head.shrink_to_fit();
        self.tail.shrink_to_fit();
    }
}

/// Where a reader of an [`OutputBuffer`] stands after [`OutputBuffer::read_from`].
///
/// Positions count UTF-16 code units from the start of the machine's output, as JavaScript
/// counts string lengths, so a browser can compare them with what it holds.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct OutputRead {
    /// Where `text` starts.
    pub position: u64,
    /// The text from `position` on (possibly cut at the read's size limit).
    pub text: String,
    /// Where the next read should start: `position` plus the UTF-16 length of `text`.
    pub next: u64,
    /// Everything ever appended, in UTF-16 code units.
    pub total: u64,
    /// Units between the asked position and `position` that are no longer held (the middle
    /// of a long output); 0 when the read continues exactly where asked.
    pub skipped: u64,
}

impl OutputBuffer {
    /// UTF-16 code units ever appended.
    pub fn total_utf16(&self) -> u64 {
        self.total_u16
    }

    /// The text from UTF-16 position `from` on, at most about `max_bytes` of it.
    ///
    /// Costs O(returned text) plus, when `from` is inside the head or tail, a walk from the
    /// nearer end of that part to `from`; never O(everything appended). A reader that fell
    /// behind into the dropped middle gets the tail with `skipped` telling how much is gone.
    /// A position inside a surrogate pair is moved back to the start of its character.
    pub fn read_from(&self, from: u64, max_bytes: usize) -> OutputRead {
        let total = self.total_u16;
        let from = from.min(total);
        let tail_start = total - self.tail_u16;
        let (position, mut text, skipped) = if from < self.head_u16 {
            let (byte, at) = byte_at(&self.head, self.head_u16, from);
            let mut text = self.head[byte..].to_owned();
            if tail_start == self.head_u16 && text.len() < max_bytes {
                text.push_str(&self.tail);
            }
            (at, text, 0)
        } else if from < tail_start {
            (tail_start, self.tail.clone(), tail_start - from)
        } else {
            let (byte, at) = byte_at(&self.tail, self.tail_u16, from - tail_start);
            (tail_start + at, self.tail[byte..].to_owned(), 0)
        };
        if text.len() > max_bytes {
            text.truncate(floor_char_boundary(&text, max_bytes.max(4)));
        }
        let next = position + utf16_len(&text);
        OutputRead {
            position,
            text,
            next,
            total,
            skipped,
        }
    }
}

/// The UTF-16 length of `s`: one unit per character, two for those outside the BMP (which
/// are exactly the ones encoded in four UTF-8 bytes).
pub fn utf16_len(s: &str) -> u64 {
    let b = s.as_bytes();
    let chars = b.iter().filter(|&&x| (x & 0xC0) != 0x80).count();
    let astral = b.iter().filter(|&&x| x >= 0xF0).count();
    (chars + astral) as u64
}

/// The byte offset in `s` (whose UTF-16 length is `len16`) of UTF-16 offset `want`, and the
/// UTF-16 offset actually found there (smaller than `want` only inside a surrogate pair).
/// Walks from the nearer end, so reading near the end of a long text is cheap.
fn byte_at(s: &str, len16: u64, want: u64) -> (usize, u64) {
    if s.len() as u64 == len16 {
        // ASCII: bytes and units agree.
        let at = want.min(len16);
        return (at as usize, at);
    }
    if want <= len16 / 2 {
        let mut at = 0;
        for (byte, c) in s.char_indices() {
            let next = at + c.len_utf16() as u64;
            if next > want {
                return (byte, at);
            }
            at = next;
        }
        (s.len(), at)
    } else {
        let mut at = len16;
        let mut byte = s.len();
        for (b, c) in s.char_indices().rev() {
            if at <= want {
                break;
            }
            at -= c.len_utf16() as u64;
            byte = b;
        }
        (byte, at)
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

/// Joins the stored chunks `(byte offset, text)` that overlap `[offset, end)`, in order, into
/// that byte range of a machine's output, with a marker where retention dropped bytes. Both
/// backends read ranges so. Offsets come from a table, so a corrupt row saturates rather than
/// panics or wraps.
pub fn join_range(
    chunks: impl IntoIterator<Item = (i64, String)>,
    offset: i64,
    end: i64,
) -> String {
    let mut text = String::new();
    let mut cursor = offset;
    for (at, data) in chunks {
        if at > cursor {
            text.push_str(&format!(
                "\n[... {} bytes dropped by retention ...]\n",
                at.saturating_sub(cursor)
            ));
        }
        let byte = |n: i64| usize::try_from(n.max(0)).unwrap_or(usize::MAX);
        let from = ceil_char_boundary(&data, byte(cursor.max(at).saturating_sub(at)));
        let to = ceil_char_boundary(&data, byte(end.saturating_sub(at)));
        if let Some(piece) = data.get(from..to) {
            text.push_str(piece);
        }
        cursor = at.saturating_add(i64::try_from(data.len()).unwrap_or(i64::MAX));
    }
    text
}

fn ceil_char_boundary(s: &str, mut at: usize) -> usize {
    at = at.min(s.len());
    // Ends at `s.len()` at the latest, which is a boundary.
    while !s.is_char_boundary(at) {
        at = at.saturating_add(1);
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

    /// Reads everything from `from` on, following `next` like a live reader would.
    fn read_all(b: &OutputBuffer, mut from: u64, max: usize) -> (String, u64) {
        let mut out = String::new();
        let mut skipped = 0;
        for _ in 0..10_000 {
            let r = b.read_from(from, max);
            skipped += r.skipped;
            if r.text.is_empty() {
                break;
            }
            out.push_str(&r.text);
            from = r.next;
        }
        (out, skipped)
    }

    #[test]
    fn positions_count_utf16_units_including_surrogate_pairs() {
        let mut b = OutputBuffer::with_caps(1024, 1024);
        b.push("a🚀é\n");
        assert_eq!(b.total_utf16(), 5);
        assert_eq!(utf16_len("a🚀é\n"), "a🚀é\n".encode_utf16().count() as u64);
        let r = b.read_from(3, 100);
        assert_eq!((r.position, r.text.as_str(), r.next), (3, "é\n", 5));
        // Inside the surrogate pair: back to the start of the rocket.
        let r = b.read_from(2, 100);
        assert_eq!((r.position, r.text.as_str()), (1, "🚀é\n"));
        b.push("z");
        let r = b.read_from(5, 100);
        assert_eq!(
            (r.position, r.text.as_str(), r.next, r.total),
            (5, "z", 6, 6)
        );
        assert_eq!(b.read_from(6, 100).text, "");
        assert_eq!(b.read_from(60, 100).position, 6);
    }

    #[test]
    fn a_reader_following_next_sees_every_byte_when_nothing_was_dropped() {
        let mut b = OutputBuffer::with_caps(64, 64);
        let mut all = String::new();
        let mut from = 0;
        let mut seen = String::new();
        for i in 0..40 {
            let piece = format!("{i}é🚀\r");
            b.push(&piece);
            all.push_str(&piece);
            let r = b.read_from(from, 1 << 20);
            if r.skipped == 0 && from < 64 {
                seen.push_str(&r.text);
                from = r.next;
            }
        }
        assert!(all.starts_with(&seen));
        // Small read sizes cut at character boundaries and still add up.
        let mut small = OutputBuffer::with_caps(1 << 20, 1 << 20);
        small.push(&all);
        let (text, skipped) = read_all(&small, 0, 5);
        assert_eq!((text, skipped), (all.clone(), 0));
        let (text, _) = read_all(&small, 0, 1);
        assert_eq!(text, all);
    }

    #[test]
    fn a_reader_in_the_dropped_middle_is_told_and_resumes_at_the_tail() {
        let mut b = OutputBuffer::with_caps(4, 4);
        for i in 0..100 {
            b.push(&format!("{}", i % 10));
        }
        // Head "0123" is units 0..4; the tail (held, maybe past its cap) ends at 100.
        let r = b.read_from(0, 1 << 20);
        assert_eq!((r.position, r.text.as_str(), r.next), (0, "0123", 4));
        let r = b.read_from(4, 1 << 20);
        assert!(r.skipped > 0 && r.position == 4 + r.skipped, "{r:?}");
        assert!(r.text.ends_with("6789") && r.next == 100, "{r:?}");
        // Reading the newest units walks from the end.
        let r = b.read_from(98, 1 << 20);
        assert_eq!((r.position, r.text.as_str(), r.skipped), (98, "89", 0));
        // Non-ASCII tails too.
        let mut b = OutputBuffer::with_caps(3, 3);
        for _ in 0..50 {
            b.push("é🚀");
        }
        let total = b.total_utf16();
        assert_eq!(total, 150);
        let r = b.read_from(total - 2, 100);
        assert_eq!((r.text.as_str(), r.position), ("🚀", total - 2));
    }

    #[test]
    fn shrinking_keeps_positions_and_closes_the_head() {
        let mut b = OutputBuffer::with_caps(10, 10);
        b.push("abcdefghij");
        b.shrink(2, 3);
        assert_eq!(b.total_utf16(), 10);
        b.push("XY");
        let r = b.read_from(2, 100);
        assert_eq!((r.position, r.text.as_str(), r.skipped), (10, "XY", 8));
        assert!(
            b.text().ends_with("XY") && b.text().starts_with("ab\n"),
            "{}",
            b.text()
        );
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

    #[test]
    fn skipped_bytes_count_as_omitted_and_close_the_head() {
        let mut b = OutputBuffer::with_caps(8, 8);
        b.push("head");
        b.skip(100);
        b.push("tail");
        assert_eq!(b.total_bytes(), 108);
        assert_eq!(b.omitted_bytes(), 100);
        let text = b.text();
        assert!(text.starts_with("head\n[... 100 bytes omitted"), "{text}");
        assert!(text.ends_with("tail"), "{text}");
    }
}
