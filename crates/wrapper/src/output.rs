//! Reading the job's output: the pipe reader, the incremental UTF-8 decoder and the batcher.
//!
//! The reader drains the pipe continuously whatever the connection state, so the job never
//! blocks on a full pipe and is never throttled by a read cadence (docs/COMPATIBILITY.md:
//! blocked, throttled or garbled output). Bytes
//! are decoded incrementally: a character split across two reads stays whole, and invalid
//! bytes become U+FFFD exactly as `String::from_utf8_lossy` would replace them over the whole
//! stream. Text is cut into messages of at most [`OUTPUT_CHUNK_BYTES`] bytes, flushed
//! every output interval or as soon as a full chunk is buffered.

use std::time::Duration;

use saltpeter_proto::OUTPUT_CHUNK_BYTES;
use tokio::io::AsyncReadExt;
use tokio::net::unix::pipe;
use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, sleep_until};

use crate::link::LinkInput;
use crate::outbox::{Chunk, Stream};

/// Bytes requested per `read`. Large reads keep the system-call rate low at high output
/// rates; the buffer's pages are only touched (and so only resident) once output flows.
const READ_BYTES: usize = 256 * 1024;

/// An incremental UTF-8 decoder that owns the read buffer: the reader fills
/// [`spare`](Self::spare), then [`commit`](Self::commit) decodes what arrived. Up to three
/// bytes of an incomplete character are carried to the front of the buffer for the next read.
#[derive(Debug)]
pub struct Utf8Decoder {
    buf: Vec<u8>,
    carry: usize,
}

impl Utf8Decoder {
    /// A decoder reading up to `read_bytes` per read.
    pub fn new(read_bytes: usize) -> Self {
        Self {
            buf: vec![0; read_bytes + 4],
            carry: 0,
        }
    }

    /// Where the next read should put its bytes.
    pub fn spare(&mut self) -> &mut [u8] {
        &mut self.buf[self.carry..]
    }

    /// Decodes `n` freshly read bytes (plus any carried ones), appending the text to `out`.
    pub fn commit(&mut self, n: usize, out: &mut String) {
        let len = self.carry + n;
        let used = decode_prefix(&self.buf[..len], out);
        self.buf.copy_within(used..len, 0);
        self.carry = len - used;
    }

    /// Decodes `bytes` as if they had been read.
    #[cfg(test)]
    pub fn feed(&mut self, mut bytes: &[u8], out: &mut String) {
        while !bytes.is_empty() {
            let spare = self.spare();
            let n = spare.len().min(bytes.len());
            spare[..n].copy_from_slice(&bytes[..n]);
            self.commit(n, out);
            bytes = &bytes[n..];
        }
    }

    /// Ends the stream: an incomplete character left over becomes one U+FFFD.
    pub fn finish(&mut self, out: &mut String) {
        if self.carry > 0 {
            out.push(char::REPLACEMENT_CHARACTER);
            self.carry = 0;
        }
    }
}

/// Appends the lossy decoding of `bytes` to `out`, except for an incomplete character at the
/// very end, and returns how many bytes it consumed.
fn decode_prefix(bytes: &[u8], out: &mut String) -> usize {
    // Fast path: a read that is all valid text, perhaps up to a character split at its end,
    // which is what almost every read is. `from_utf8` is much faster than the chunk walk.
    let clean = match std::str::from_utf8(bytes) {
        Ok(text) => text,
        Err(e) if e.error_len().is_none() => {
            std::str::from_utf8(&bytes[..e.valid_up_to()]).unwrap_or_default()
        }
        Err(_) => "",
    };
    if !clean.is_empty() || bytes.is_empty() {
        out.push_str(clean);
        return clean.len();
    }
    let mut used = 0;
    for chunk in bytes.utf8_chunks() {
        out.push_str(chunk.valid());
        used += chunk.valid().len();
        let bad = chunk.invalid();
        if bad.is_empty() {
            continue;
        }
        let at_end = used + bad.len() == bytes.len();
        let incomplete = matches!(std::str::from_utf8(bad), Err(e) if e.error_len().is_none());
        if at_end && incomplete {
            break;
        }
        out.push(char::REPLACEMENT_CHARACTER);
        used += bad.len();
    }
    used
}

/// Accumulates decoded text and cuts it into messages of at most `max` bytes, each ending on
/// a character boundary.
#[derive(Debug)]
pub struct Batcher {
    pending: String,
    max: usize,
}

impl Batcher {
    pub fn new(max: usize) -> Self {
        Self {
            pending: String::new(),
            max,
        }
    }

    /// The buffer decoded text is appended to.
    pub fn text(&mut self) -> &mut String {
        &mut self.pending
    }

    /// Whether nothing is buffered.
    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// Takes one full message if at least `max` bytes are buffered.
    pub fn take_full(&mut self) -> Option<String> {
        if self.pending.len() < self.max {
            return None;
        }
        let mut cut = self.max;
        while !self.pending.is_char_boundary(cut) {
            cut -= 1;
        }
        let mut rest = String::with_capacity(self.pending.capacity().max(self.max));
        rest.push_str(&self.pending[cut..]);
        self.pending.truncate(cut);
        Some(std::mem::replace(&mut self.pending, rest))
    }

    /// Takes everything buffered (at most `max` bytes; call again while it returns text).
    pub fn take_any(&mut self) -> Option<String> {
        if let Some(full) = self.take_full() {
            return Some(full);
        }
        (!self.pending.is_empty()).then(|| std::mem::take(&mut self.pending))
    }
}

/// How the pump ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PumpEnd {
    /// Every writer closed the pipe.
    Eof,
    /// The job had exited and background processes still held the pipe at the deadline.
    Deadline,
    /// Reading failed (logged by the caller).
    ReadError,
    /// The link stopped accepting output (its task failed); the rest was read and dropped.
    LinkGone,
}

/// Reads the job's pipe until EOF or until the deadline sent on `deadline` (set once the job
/// has exited), forwarding batches to the link. Every message is delivered in order through
/// `tx`, so the caller can queue the final notice and `complete` after this returns.
pub async fn pump(
    mut pipe: pipe::Receiver,
    tx: mpsc::Sender<LinkInput>,
    interval: Duration,
    mut deadline: watch::Receiver<Option<Instant>>,
) -> PumpEnd {
    let mut decoder = Utf8Decoder::new(READ_BYTES);
    let mut batch = Batcher::new(OUTPUT_CHUNK_BYTES);
    let mut flush_at: Option<Instant> = None;
    let mut stop_at: Option<Instant> = None;
    let mut watching = true;
    // Once the link is gone (it never should be before the run ends), output is still read
    // and dropped, so the job can never block on a full pipe.
    let mut link_gone = false;
    let end = loop {
        tokio::select! {
            biased;
            read = pipe.read(decoder.spare()) => match read {
                Ok(0) => break PumpEnd::Eof,
                Ok(n) => {
                    decoder.commit(n, batch.text());
                    while let Some(text) = batch.take_full() {
                        link_gone = link_gone || send(&tx, text).await.is_err();
                    }
                    if !batch.is_empty() && flush_at.is_none() {
                        flush_at = Some(Instant::now() + interval);
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => break PumpEnd::ReadError,
            },
            () = sleep_until(flush_at.unwrap_or_else(Instant::now)), if flush_at.is_some() => {
                flush_at = None;
                while let Some(text) = batch.take_any() {
                    link_gone = link_gone || send(&tx, text).await.is_err();
                }
            }
            () = sleep_until(stop_at.unwrap_or_else(Instant::now)), if stop_at.is_some() => {
                break PumpEnd::Deadline;
            }
            changed = deadline.changed(), if watching => {
                if changed.is_err() {
                    watching = false;
                } else {
                    stop_at = *deadline.borrow_and_update();
                }
            }
        }
    };
    decoder.finish(batch.text());
    while let Some(text) = batch.take_any() {
        link_gone = link_gone || send(&tx, text).await.is_err();
    }
    if link_gone { PumpEnd::LinkGone } else { end }
}

async fn send(tx: &mpsc::Sender<LinkInput>, data: String) -> Result<(), ()> {
    tx.send(LinkInput::Output(Chunk {
        stream: Stream::Stdout,
        data,
    }))
    .await
    .map_err(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Decodes `bytes` split at every position in `cuts` and checks the result against the
    /// lossy decoding of the whole.
    fn check_split(bytes: &[u8], cuts: &[usize]) {
        let mut dec = Utf8Decoder::new(8);
        let mut out = String::new();
        let mut start = 0;
        for &cut in cuts.iter().chain(std::iter::once(&bytes.len())) {
            dec.feed(&bytes[start..cut], &mut out);
            start = cut;
        }
        dec.finish(&mut out);
        assert_eq!(
            out,
            String::from_utf8_lossy(bytes),
            "bytes {bytes:?} cuts {cuts:?}"
        );
    }

    #[test]
    fn split_characters_stay_whole_and_bad_bytes_match_lossy_decoding() {
        let samples: [&[u8]; 8] = [
            "é€😀 plain\r\n".as_bytes(),
            b"\xff\xfe ok",
            b"\xe2\x82",          // truncated at the end
            b"\xe2\x82A\xf0\x9f", // truncated in the middle, then at the end
            b"\xed\xa0\x80",      // a surrogate, never valid
            b"\xc0\xaf\xf5\x80",  // overlong and out of range
            b"a\xf0\x9f\x98\x80b\xe2\x82\xacc",
            b"",
        ];
        for bytes in samples {
            for a in 0..=bytes.len() {
                for b in a..=bytes.len() {
                    check_split(bytes, &[a, b]);
                }
            }
        }
    }

    #[test]
    fn pseudo_random_bytes_match_lossy_decoding_with_small_reads() {
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        let bytes: Vec<u8> = (0..20_000)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                // Bias towards bytes that start or continue multibyte sequences.
                [
                    b'a', b'\r', 0xc3, 0xa9, 0xe2, 0x82, 0xac, 0xf0, 0x9f, 0x98, 0xff,
                ][(state % 11) as usize]
            })
            .collect();
        let mut dec = Utf8Decoder::new(7);
        let mut out = String::new();
        dec.feed(&bytes, &mut out);
        dec.finish(&mut out);
        assert_eq!(out, String::from_utf8_lossy(&bytes));
    }

    #[test]
    fn batcher_cuts_on_character_boundaries_within_the_limit() {
        let mut b = Batcher::new(10);
        b.text().push_str("aaaaaaaaa€bbb"); // the euro sign straddles byte 10
        let first = b.take_full().unwrap();
        assert_eq!(first, "aaaaaaaaa");
        assert_eq!(b.take_full(), None);
        assert_eq!(b.take_any().unwrap(), "€bbb");
        assert_eq!(b.take_any(), None);
        b.text().push_str(&"x".repeat(25));
        let parts: Vec<String> = std::iter::from_fn(|| b.take_any()).collect();
        assert_eq!(
            parts.iter().map(String::len).collect::<Vec<_>>(),
            [10, 10, 5]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn pump_batches_by_interval_and_stops_at_the_deadline() {
        let (rx_end, tx_end) = std::io::pipe().unwrap();
        let reader = pipe::Receiver::from_owned_fd(rx_end.into()).unwrap();
        let mut writer = pipe::Sender::from_owned_fd(tx_end.into()).unwrap();
        let (tx, mut rx) = mpsc::channel(4);
        let (stop_tx, stop_rx) = watch::channel(None);
        let task = tokio::spawn(pump(reader, tx, Duration::from_millis(1000), stop_rx));

        use tokio::io::AsyncWriteExt;
        writer.write_all("one\né".as_bytes()).await.unwrap();
        writer.write_all(b"\n").await.unwrap();
        let started = Instant::now();
        let Some(LinkInput::Output(chunk)) = rx.recv().await else {
            panic!("expected output")
        };
        assert_eq!(chunk.data, "one\né\n");
        assert!(
            started.elapsed() >= Duration::from_millis(999),
            "{:?}",
            started.elapsed()
        );

        // The writer stays open, as a background process would keep it: the pump must still
        // end at the deadline.
        stop_tx
            .send(Some(Instant::now() + Duration::from_secs(2)))
            .unwrap();
        assert_eq!(task.await.unwrap(), PumpEnd::Deadline);
        drop(writer);
    }
}
