//! How output reaches the disk: an append-only journal that makes each message durable (and
//! ackable) in the batch it arrives in, folded later into per-machine chunks with retention.
//!
//! Why two steps: output is read per machine, so the `output` table is indexed by (instance,
//! machine, idx). Inserting every message there puts each one on a different B-tree page when
//! thousands of machines print at once, and every such page is rewritten into the WAL at
//! commit: 10,000 machines printing once a second made each group commit take ~0.5 s (docs/PERFORMANCE.md).
//! The journal is keyed by a growing id, so a batch of messages from 10,000 machines lands on a
//! few consecutive pages. Each machine's unfolded messages stay in memory too, and are written
//! as one chunk when the machine has 64 KiB pending, when its oldest pending message is a
//! minute old, when pending output in all exceeds a budget, soon after its run ends, or when a
//! query wants its output. The journal's prefix that every machine has folded is deleted in one
//! range.
//!
//! Crash safety: `machines.journal_folded` records, in the fold's transaction, the last
//! journal id folded into the chunks, with the machine's totals (bytes, dropped, next seq) as
//! of that fold; on open, [`Outputs::recover`] counts and folds every later journal row, so a
//! message is neither lost nor stored twice. Writing the totals only when a machine folds keeps
//! a batch from rewriting one `machines` page per message. Journal ids only grow, across
//! restarts.
//!
//! Retention (head and tail per machine) is decided per message at fold time, as if every
//! message had been stored on its own; afterwards the tail is trimmed a chunk at a time.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::{Duration, Instant};

use rusqlite::{OptionalExtension, Transaction, params};

use super::StoreError;
use super::sqlite::Retention;

/// A machine's pending output is folded once it reaches this many bytes; a single message at
/// least this large skips the journal and becomes a chunk of its own.
const CHUNK_BYTES: usize = 64 * 1024;
/// A machine's pending output is folded once its oldest message has waited this long.
const MAX_PENDING_AGE: Duration = Duration::from_secs(60);
/// Pending output of all machines, in memory, beyond which the oldest are folded.
const PENDING_BUDGET: usize = 32 * 1024 * 1024;
/// Folds for ended runs, age or budget per batch (ended runs first), so a thousand machines
/// that started or ended together do not fold in one long commit (each fold rewrites a page of
/// the `output` table). Batches come hundreds of times a second under load, so this still
/// folds thousands of machines a second. Folds for queries and for retention are not capped.
const BACKGROUND_FOLDS_PER_BATCH: usize = 32;

/// The folded prefix of the journal is deleted once it is this long (or when nothing is left
/// pending): deleting it in every batch also rewrote the freelist and the database header in
/// every commit.
const JOURNAL_DELETE_ROWS: i64 = 1024;

/// Journal rows deleted per batch at most. When machines print alike, the floor jumps: every
/// machine's oldest pending message is from about the same second, so the floor stays there
/// until the last of them folds, then leaps a whole budget's worth. At 10,000 machines that was
/// one DELETE of ~140,000 rows every ~16 s, holding its commit (and every ack in it) ~150 ms
/// (docs/PERFORMANCE.md). In steps the backlog goes within a few dozen batches at ~2 ms each.
const JOURNAL_DELETE_MAX_ROWS: i64 = 2048;

type Key = (String, String);

/// Retention and journal bookkeeping of one machine's output, kept while its run is active.
#[derive(Debug, Default)]
struct OutputState {
    next_idx: i64,
    /// Bytes received, stored or pending.
    total: u64,
    /// Where the next chunk starts: bytes received before the pending ones.
    stored_end: u64,
    head: u64,
    tail: VecDeque<(i64, u64)>,
    tail_bytes: u64,
    dropped: u64,
    /// Messages in the journal, not yet folded, oldest first.
    pending: Vec<String>,
    pending_bytes: usize,
    /// The journal id of the oldest pending message, and when it arrived.
    pending_since: Option<(i64, Instant)>,
    /// The journal id of the newest message folded (or pending, once folded).
    folded_through: i64,
    last_journal_id: i64,
    /// Queued in `Outputs::dirty` to have its totals written.
    dirty: bool,
    /// Its run has ended: queued in `Outputs::finished` to be folded and forgotten.
    finished: bool,
    /// The highest `seq + 1` seen since the totals were last written.
    next_seq: Option<u64>,
}

impl OutputState {
    /// Counts a message that arrived: its bytes and its sequence number.
    fn count(&mut self, len: usize, seq: Option<u64>) {
        self.total += len as u64;
        if let Some(seq) = seq {
            self.next_seq = Some(self.next_seq.map_or(seq + 1, |n| n.max(seq + 1)));
        }
    }
}

/// Every active machine's output state and the journal's bookkeeping.
#[derive(Debug, Default)]
pub(super) struct Outputs {
    machines: HashMap<Key, OutputState>,
    /// Machines with pending messages, by the journal id of the oldest one.
    by_age: BTreeMap<i64, Key>,
    pending_bytes: usize,
    next_journal_id: i64,
    /// Journal ids below this are deleted.
    journal_floor: i64,
    /// Machines whose totals changed in this batch (each once), so the end of a batch does
    /// not walk every active machine.
    dirty: Vec<Key>,
    /// Machines of ended runs, to be folded a few per batch and then forgotten: folding a
    /// run of 10,000 machines at once held one commit (and every ack waiting on it) for 3 s.
    finished: VecDeque<Key>,
}

impl Outputs {
    /// Finds where the journal's ids continue, and folds what an earlier process left in the
    /// journal. Runs once, at open, in its own transaction.
    pub(super) fn recover(tx: &Transaction<'_>, retention: Retention) -> Result<Self, StoreError> {
        let journal_max: i64 =
            tx.query_row("SELECT COALESCE(MAX(id), 0) FROM output_journal", [], |r| {
                r.get(0)
            })?;
        let folded_max: i64 = tx.query_row(
            "SELECT COALESCE(MAX(journal_folded), 0) FROM machines",
            [],
            |r| r.get(0),
        )?;
        let mut outputs = Self {
            next_journal_id: journal_max.max(folded_max) + 1,
            ..Self::default()
        };
        type Row = (i64, String, String, Option<i64>, String);
        let rows: Vec<Row> = tx
            .prepare("SELECT id, instance, machine, seq, data FROM output_journal ORDER BY id")?
            .query_map([], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
            })?
            .collect::<Result<_, _>>()?;
        let recovered = rows.len();
        for (id, instance, machine, seq, data) in rows {
            let key = (instance, machine);
            let state = outputs.state(tx, &key)?;
            if id <= state.folded_through {
                continue;
            }
            // The machine's totals were last written when it folded; the journal has the rest.
            state.count(data.len(), seq.map(|s| s as u64));
            outputs.hold(&key, id, data);
        }
        let keys: Vec<Key> = outputs.by_age.values().cloned().collect();
        for key in keys {
            outputs.fold(tx, &key, retention)?;
        }
        outputs.finish_batch(tx, retention)?;
        outputs.machines.clear();
        if recovered > 0 {
            tracing::info!(
                messages = recovered,
                "Folded the output journal left by the previous run."
            );
        }
        Ok(outputs)
    }

    /// Stores one message: in the journal (durable when the batch commits), or straight as a
    /// chunk when it is large.
    pub(super) fn append(
        &mut self,
        tx: &Transaction<'_>,
        key: Key,
        seq: Option<u64>,
        data: String,
        retention: Retention,
    ) -> Result<(), StoreError> {
        let len = data.len();
        self.state(tx, &key)?.count(len, seq);
        if len >= CHUNK_BYTES {
            // Keep the order: what is pending goes first.
            self.fold(tx, &key, retention)?;
            let state = self.state(tx, &key)?;
            state.pending.push(data);
            state.pending_bytes = len;
            write_pending(tx, &key, state, retention)?;
            self.mark_dirty(&key);
            return Ok(());
        }
        let id = self.next_journal_id;
        self.next_journal_id += 1;
        // The machine's totals are not written here: that would rewrite a page of the
        // `machines` table per message. The journal row carries what they need (bytes, seq).
        tx.prepare_cached(
            "INSERT INTO output_journal (id, instance, machine, seq, data)
             VALUES (?1, ?2, ?3, ?4, ?5)",
        )?
        .execute(params![id, key.0, key.1, seq.map(|s| s as i64), data])?;
        let full = self.hold(&key, id, data) >= CHUNK_BYTES;
        if full {
            self.fold(tx, &key, retention)?;
        }
        Ok(())
    }

    /// Writes the pending output of every machine of `instance` (or of one machine) as chunks.
    pub(super) fn fold_run(
        &mut self,
        tx: &Transaction<'_>,
        instance: &str,
        machine: Option<&str>,
        retention: Retention,
    ) -> Result<(), StoreError> {
        let keys: Vec<Key> = self
            .by_age
            .values()
            .filter(|(i, m)| i == instance && machine.is_none_or(|want| want == m))
            .cloned()
            .collect();
        for key in keys {
            self.fold(tx, &key, retention)?;
        }
        Ok(())
    }

    /// A retry starts a machine's sequence over (its next wrapper numbers output from 0): the
    /// output pending under the old numbering is folded first, so neither the totals written
    /// at the end of the batch nor a recovery from the journal count its numbers again, and
    /// then the stored sequence goes back to 0.
    pub(super) fn restart_sequence(
        &mut self,
        tx: &Transaction<'_>,
        instance: &str,
        machine: &str,
        retention: Retention,
    ) -> Result<(), StoreError> {
        self.fold_run(tx, instance, Some(machine), retention)?;
        if let Some(state) = self
            .machines
            .get_mut(&(instance.to_owned(), machine.to_owned()))
        {
            state.next_seq = None;
        }
        tx.execute(
            "UPDATE machines SET next_seq = 0 WHERE instance = ?1 AND machine = ?2",
            params![instance, machine],
        )?;
        Ok(())
    }

    /// Queues a finished run's machines to be folded in the next batches and then forgotten.
    /// Until then their journal rows stay, so a crash in between loses nothing, and a query
    /// folds what it asks for first, as for a running machine.
    pub(super) fn forget_run(&mut self, instance: &str) {
        for (key, state) in &mut self.machines {
            if key.0 == instance && !std::mem::replace(&mut state.finished, true) {
                self.finished.push_back(key.clone());
            }
        }
    }

    /// Folds and forgets every machine of a finished run now (before retention deletes runs,
    /// so no chunk is written for a machine that is gone).
    pub(super) fn fold_finished(
        &mut self,
        tx: &Transaction<'_>,
        retention: Retention,
    ) -> Result<(), StoreError> {
        let (_, forget) = self.fold_some_finished(tx, retention, usize::MAX)?;
        self.flush_totals(tx)?;
        self.forget(forget);
        Ok(())
    }

    /// Folds queued machines of finished runs until `max_folds` of them had something to
    /// write; returns how many did and the machines to forget once their totals are written.
    fn fold_some_finished(
        &mut self,
        tx: &Transaction<'_>,
        retention: Retention,
        max_folds: usize,
    ) -> Result<(usize, Vec<Key>), StoreError> {
        let mut folds = 0;
        let mut forget = Vec::new();
        while folds < max_folds
            && let Some(key) = self.finished.pop_front()
        {
            if self.fold(tx, &key, retention)? {
                folds += 1;
            }
            forget.push(key);
        }
        Ok((folds, forget))
    }

    /// Drops the state of machines whose last totals were just written.
    fn forget(&mut self, keys: Vec<Key>) {
        for key in keys {
            self.machines.remove(&key);
        }
    }

    /// End-of-batch work: folds for age and budget, deletes the folded journal prefix, writes
    /// the totals of every machine that changed.
    pub(super) fn finish_batch(
        &mut self,
        tx: &Transaction<'_>,
        retention: Retention,
    ) -> Result<(), StoreError> {
        let now = Instant::now();
        // Finished runs first: their machines will not print again.
        let (folds, forget) = self.fold_some_finished(tx, retention, BACKGROUND_FOLDS_PER_BATCH)?;
        for _ in folds..BACKGROUND_FOLDS_PER_BATCH {
            let Some((_, key)) = self.by_age.first_key_value() else {
                break;
            };
            let old = self
                .machines
                .get(key)
                .and_then(|s| s.pending_since)
                .is_some_and(|(_, since)| now.saturating_duration_since(since) >= MAX_PENDING_AGE);
            if !old && self.pending_bytes <= PENDING_BUDGET {
                break;
            }
            let key = key.clone();
            self.fold(tx, &key, retention)?;
        }
        let floor = self
            .by_age
            .first_key_value()
            .map_or(self.next_journal_id, |(id, _)| *id);
        let folded = floor - self.journal_floor;
        if folded >= JOURNAL_DELETE_ROWS || (folded > 0 && floor == self.next_journal_id) {
            let upto = floor.min(self.journal_floor + JOURNAL_DELETE_MAX_ROWS);
            tx.prepare_cached("DELETE FROM output_journal WHERE id < ?1")?
                .execute([upto])?;
            self.journal_floor = upto;
        }
        // Totals first: the machines to forget carry their last ones.
        self.flush_totals(tx)?;
        self.forget(forget);
        Ok(())
    }

    /// Loads (once) and returns a machine's state.
    fn state(&mut self, tx: &Transaction<'_>, key: &Key) -> Result<&mut OutputState, StoreError> {
        if !self.machines.contains_key(key) {
            let state = load_state(tx, &key.0, &key.1)?;
            self.machines.insert(key.clone(), state);
        }
        Ok(self.machines.entry(key.clone()).or_default())
    }

    /// Holds a journalled message in memory until it is folded; returns the machine's pending
    /// bytes.
    fn hold(&mut self, key: &Key, id: i64, data: String) -> usize {
        let Some(state) = self.machines.get_mut(key) else {
            return 0;
        };
        if state.pending_since.is_none() {
            state.pending_since = Some((id, Instant::now()));
            self.by_age.insert(id, key.clone());
        }
        state.last_journal_id = id;
        state.pending_bytes += data.len();
        self.pending_bytes += data.len();
        state.pending.push(data);
        state.pending_bytes
    }

    /// Writes a machine's pending messages as chunks and records how far the journal is
    /// folded; says whether there was anything to write.
    fn fold(
        &mut self,
        tx: &Transaction<'_>,
        key: &Key,
        retention: Retention,
    ) -> Result<bool, StoreError> {
        let Some(state) = self.machines.get_mut(key) else {
            return Ok(false);
        };
        let Some((first, _)) = state.pending_since.take() else {
            return Ok(false);
        };
        self.by_age.remove(&first);
        self.pending_bytes -= state.pending_bytes;
        state.folded_through = state.last_journal_id;
        write_pending(tx, key, state, retention)?;
        self.mark_dirty(key);
        Ok(true)
    }

    /// Queues a machine's totals to be written at the end of the batch.
    fn mark_dirty(&mut self, key: &Key) {
        if let Some(state) = self.machines.get_mut(key)
            && !std::mem::replace(&mut state.dirty, true)
        {
            self.dirty.push(key.clone());
        }
    }

    /// Writes the output totals, sequence and journal position of each machine that folded
    /// (or took a large message) in this batch.
    fn flush_totals(&mut self, tx: &Transaction<'_>) -> Result<(), StoreError> {
        let mut stmt = tx.prepare_cached(
            "UPDATE machines SET output_bytes = ?3, output_dropped = ?4,
                next_seq = CASE WHEN ?5 IS NULL THEN next_seq ELSE MAX(next_seq, ?5) END,
                journal_folded = ?6
             WHERE instance = ?1 AND machine = ?2",
        )?;
        for key in std::mem::take(&mut self.dirty) {
            let Some(state) = self.machines.get_mut(&key) else {
                continue;
            };
            // Cleared first: after a failed write the next change queues the machine again.
            state.dirty = false;
            stmt.execute(params![
                key.0,
                key.1,
                // Bytes still pending are in the journal after `journal_folded`, and recovery
                // counts them from there: written here too, they would count twice.
                (state.total - state.pending_bytes as u64) as i64,
                state.dropped as i64,
                state.next_seq.take().map(|s| s as i64),
                state.folded_through,
            ])?;
        }
        Ok(())
    }
}

/// Writes `state.pending` to the `output` table: the messages that fall in the head as one
/// chunk, the rest as one tail chunk, dropping the oldest tail output beyond the cap.
fn write_pending(
    tx: &Transaction<'_>,
    key: &Key,
    state: &mut OutputState,
    retention: Retention,
) -> Result<(), StoreError> {
    let messages = std::mem::take(&mut state.pending);
    state.pending_bytes = 0;
    let head_at = state.stored_end;
    let mut head = String::new();
    let mut tail: VecDeque<String> = VecDeque::new();
    let mut tail_pending = 0u64;
    // Pending messages dropped by retention before the first one kept in the tail.
    let mut skipped = 0u64;
    for data in messages {
        let in_head = tail.is_empty()
            && state.tail.is_empty()
            && state.dropped == 0
            && state.head < retention.head_bytes;
        let len = data.len() as u64;
        if in_head {
            state.head += len;
            head.push_str(&data);
            continue;
        }
        tail_pending += len;
        tail.push_back(data);
        // Drop the oldest tail output beyond the cap (stored chunks first, then pending
        // messages), always keeping the newest message.
        while state.tail_bytes + tail_pending > retention.tail_bytes {
            if let Some((idx, n)) = state.tail.pop_front() {
                tx.prepare_cached(
                    "DELETE FROM output WHERE instance = ?1 AND machine = ?2 AND idx = ?3",
                )?
                .execute(params![key.0, key.1, idx])?;
                state.tail_bytes -= n;
                state.dropped += n;
            } else if tail.len() > 1 {
                let n = tail.pop_front().map_or(0, |d| d.len() as u64);
                tail_pending -= n;
                skipped += n;
                state.dropped += n;
            } else {
                break;
            }
        }
    }
    let tail_at = head_at + head.len() as u64 + skipped;
    if !head.is_empty() {
        insert_chunk(tx, key, state.next_idx, head_at, &head, true)?;
        state.next_idx += 1;
    }
    state.stored_end = tail_at;
    if !tail.is_empty() {
        let chunk: String = tail.into_iter().collect();
        let len = chunk.len() as u64;
        insert_chunk(tx, key, state.next_idx, tail_at, &chunk, false)?;
        state.tail.push_back((state.next_idx, len));
        state.tail_bytes += len;
        state.next_idx += 1;
        state.stored_end += len;
    }
    Ok(())
}

fn insert_chunk(
    tx: &Transaction<'_>,
    key: &Key,
    idx: i64,
    byte_offset: u64,
    data: &str,
    head: bool,
) -> Result<(), StoreError> {
    tx.prepare_cached(
        "INSERT INTO output (instance, machine, idx, byte_offset, head, data)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?
    .execute(params![key.0, key.1, idx, byte_offset as i64, head, data])?;
    Ok(())
}

/// A machine's state from what is stored: its chunks, totals and journal position.
fn load_state(
    tx: &Transaction<'_>,
    instance: &str,
    machine: &str,
) -> Result<OutputState, StoreError> {
    let mut state = OutputState::default();
    let mut stmt = tx.prepare_cached(
        "SELECT idx, head, byte_offset, length(CAST(data AS BLOB)) FROM output
         WHERE instance = ?1 AND machine = ?2 ORDER BY idx",
    )?;
    let mut rows = stmt.query(params![instance, machine])?;
    while let Some(row) = rows.next()? {
        let idx: i64 = row.get(0)?;
        let head: bool = row.get(1)?;
        let at = row.get::<_, i64>(2)? as u64;
        let len = row.get::<_, i64>(3)? as u64;
        if head {
            state.head += len;
        } else {
            state.tail.push_back((idx, len));
            state.tail_bytes += len;
        }
        state.next_idx = idx + 1;
        state.stored_end = at + len;
    }
    let (total, dropped, folded): (i64, i64, i64) = tx
        .query_row(
            "SELECT output_bytes, output_dropped, journal_folded FROM machines
             WHERE instance = ?1 AND machine = ?2",
            params![instance, machine],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .optional()?
        .unwrap_or((0, 0, 0));
    state.total = total as u64;
    state.dropped = dropped as u64;
    state.folded_through = folded;
    state.last_journal_id = folded;
    Ok(state)
}
