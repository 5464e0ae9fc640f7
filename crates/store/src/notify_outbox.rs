//! The notification outbox on SQLite: [`SqliteOutbox`] implements `saltpeter_notify::Outbox`
//! over the `notify_outbox` table of the master's own database file.
//!
//! Which thread owns which connection: the store's thread keeps its connection to itself (it
//! applies the engine's batches and must never wait on anyone else's lock for long), so the
//! outbox opens a **second connection to the same file**, shared by its two users behind a
//! mutex: the notifier (which enqueues, from a blocking task) and the deliverer thread (which
//! claims and records outcomes). The file is in WAL mode, so readers never block the store's
//! writer; the two writers take turns through SQLite's busy handler (5 s), and each outbox
//! write is one short statement, so the store's group commit waits at most that long.
//!
//! The table is created with `CREATE TABLE IF NOT EXISTS` when the outbox opens, a migration
//! step that is idempotent by the table's existence rather than a `user_version` number, so it
//! composes with the store's numbered migrations whatever number they reach. A database
//! without the table (written by an older master) gains it the first time a newer one opens
//! the outbox; an older master opening it later ignores the table.
//!
//! Times are Unix milliseconds (UTC), as the proposed schema says.

use std::path::Path;
use std::time::Duration;

use parking_lot::Mutex;
use rusqlite::{Connection, OptionalExtension, params};
use time::OffsetDateTime;

use saltpeter_notify::outbox::{
    FailureRecord, OutboxCounts, Outcome, SQLITE_SCHEMA, State, bounded_error,
};
use saltpeter_notify::{Channel, Notification, NotifyOn, Outbox, OutboxError, Pending};

/// How long a statement waits for the store's writer before it fails (and the deliverer
/// tries the round again later).
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// The outbox in `saltpeter.db`.
#[derive(Debug)]
pub struct SqliteOutbox {
    conn: Mutex<Connection>,
}

fn storage(e: rusqlite::Error) -> OutboxError {
    OutboxError::Storage(e.to_string())
}

/// Milliseconds since the epoch, clamped to what an `i64` holds.
fn ms(t: OffsetDateTime) -> i64 {
    i64::try_from(t.unix_timestamp_nanos() / 1_000_000).unwrap_or(if t.year() < 1970 {
        i64::MIN
    } else {
        i64::MAX
    })
}

fn from_ms(ms: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms).saturating_mul(1_000_000))
        .unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

fn event(name: &str) -> Result<NotifyOn, OutboxError> {
    NotifyOn::ALL
        .into_iter()
        .find(|e| e.name() == name)
        .ok_or_else(|| OutboxError::Storage(format!("unknown event {name:?} in the outbox")))
}

fn state(name: &str) -> State {
    match name {
        "delivered" => State::Delivered,
        "gave_up" => State::GaveUp,
        "dropped" => State::Dropped,
        _ => State::Pending,
    }
}

fn channel_kind(name: &str) -> &'static str {
    match name {
        "slack" => "slack",
        "email" => "email",
        _ => "webhook",
    }
}

fn channel(kind: &str, target: String, secret: Option<String>) -> Channel {
    match kind {
        "slack" => Channel::Slack { url: target },
        "email" => Channel::Email { to: target },
        _ => Channel::Webhook {
            url: target,
            secret,
        },
    }
}

impl SqliteOutbox {
    /// Opens the outbox in the database at `path` (the store's `saltpeter.db`, which
    /// `Store::open` created private and in WAL mode, or a file of its own beside a PostgreSQL
    /// store), creating its table if missing. A missing file is created private first: SQLite
    /// gives its journal files the database file's mode.
    pub fn open(path: &Path) -> Result<Self, OutboxError> {
        if let Some(dir) = path.parent() {
            saltpeter_files::create_dir(dir).map_err(|e| OutboxError::Storage(e.to_string()))?;
        }
        saltpeter_files::open_append(path).map_err(|e| OutboxError::Storage(e.to_string()))?;
        let conn = Connection::open(path).map_err(storage)?;
        Self::setup(conn)
    }

    /// An outbox in a private in-memory database (tests).
    pub fn in_memory() -> Result<Self, OutboxError> {
        Self::setup(Connection::open_in_memory().map_err(storage)?)
    }

    fn setup(conn: Connection) -> Result<Self, OutboxError> {
        conn.busy_timeout(BUSY_TIMEOUT).map_err(storage)?;
        // The store set WAL on the file already; asking again is harmless and makes a file
        // opened by the outbox alone (tests) behave the same.
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(storage)?;
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(storage)?;
        conn.execute_batch(&format!("BEGIN IMMEDIATE;\n{SQLITE_SCHEMA}\nCOMMIT;"))
            .map_err(storage)?;
        Ok(SqliteOutbox {
            conn: Mutex::new(conn),
        })
    }
}

impl Outbox for SqliteOutbox {
    fn enqueue(&self, n: Notification) -> Result<bool, OutboxError> {
        let (kind, target, secret) = match &n.channel {
            Channel::Webhook { url, secret } => ("webhook", url.as_str(), secret.as_deref()),
            Channel::Slack { url } => ("slack", url.as_str(), None),
            Channel::Email { to } => ("email", to.as_str(), None),
        };
        let created = ms(n.created_at);
        let added = self
            .conn
            .lock()
            .execute(
                "INSERT OR IGNORE INTO notify_outbox
                    (key, job, event, channel, target, secret, subject, body, created_at,
                     next_attempt_at, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?9, ?9)",
                params![
                    n.key,
                    n.job,
                    n.event.name(),
                    kind,
                    target,
                    secret,
                    n.subject,
                    n.body,
                    created
                ],
            )
            .map_err(storage)?;
        Ok(added > 0)
    }

    fn claim_due(
        &self,
        now: OffsetDateTime,
        limit: usize,
        lease: Duration,
    ) -> Result<Vec<Pending>, OutboxError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let until = ms(saltpeter_notify::shift(now, lease, false));
        let mut conn = self.conn.lock();
        let tx = conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(storage)?;
        let mut out = Vec::new();
        {
            let mut select = tx
                .prepare_cached(
                    "SELECT id, key, job, event, channel, target, secret, subject, body,
                            created_at, attempts
                     FROM notify_outbox
                     WHERE state = 'pending' AND next_attempt_at <= ?1
                     ORDER BY next_attempt_at, id LIMIT ?2",
                )
                .map_err(storage)?;
            let rows = select
                .query_map(params![ms(now), limit], |r| {
                    Ok((
                        r.get::<_, i64>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, String>(2)?,
                        r.get::<_, String>(3)?,
                        r.get::<_, String>(4)?,
                        r.get::<_, String>(5)?,
                        r.get::<_, Option<String>>(6)?,
                        r.get::<_, String>(7)?,
                        r.get::<_, Vec<u8>>(8)?,
                        r.get::<_, i64>(9)?,
                        r.get::<_, i64>(10)?,
                    ))
                })
                .map_err(storage)?;
            for row in rows {
                let (id, key, job, ev, kind, target, secret, subject, body, created, attempts) =
                    row.map_err(storage)?;
                out.push(Pending {
                    id,
                    notification: Notification {
                        key,
                        job,
                        event: event(&ev)?,
                        channel: channel(&kind, target, secret),
                        subject,
                        body,
                        created_at: from_ms(created),
                    },
                    attempts: u32::try_from(attempts).unwrap_or(u32::MAX),
                });
            }
            let mut lease = tx
                .prepare_cached("UPDATE notify_outbox SET next_attempt_at = ?2 WHERE id = ?1")
                .map_err(storage)?;
            for p in &out {
                lease.execute(params![p.id, until]).map_err(storage)?;
            }
        }
        tx.commit().map_err(storage)?;
        Ok(out)
    }

    fn delivered(&self, id: i64, now: OffsetDateTime) -> Result<(), OutboxError> {
        let changed = self
            .conn
            .lock()
            .execute(
                "UPDATE notify_outbox SET state = 'delivered', attempts = attempts + 1,
                        updated_at = ?2
                 WHERE id = ?1",
                params![id, ms(now)],
            )
            .map_err(storage)?;
        if changed == 0 {
            return Err(OutboxError::NoSuchRow(id));
        }
        Ok(())
    }

    fn failed(
        &self,
        id: i64,
        error: &str,
        now: OffsetDateTime,
        outcome: Outcome,
    ) -> Result<(), OutboxError> {
        let error = bounded_error(error);
        let conn = self.conn.lock();
        let changed = match outcome {
            Outcome::RetryAt(at) => conn.execute(
                "UPDATE notify_outbox SET last_error = ?2, updated_at = ?3,
                        attempts = attempts + 1, next_attempt_at = ?4
                 WHERE id = ?1",
                params![id, error, ms(now), ms(at)],
            ),
            Outcome::GaveUp => conn.execute(
                "UPDATE notify_outbox SET last_error = ?2, updated_at = ?3,
                        attempts = attempts + 1, state = 'gave_up'
                 WHERE id = ?1",
                params![id, error, ms(now)],
            ),
            Outcome::Dropped => conn.execute(
                "UPDATE notify_outbox SET last_error = ?2, updated_at = ?3, state = 'dropped'
                 WHERE id = ?1",
                params![id, error, ms(now)],
            ),
        }
        .map_err(storage)?;
        if changed == 0 {
            return Err(OutboxError::NoSuchRow(id));
        }
        Ok(())
    }

    fn failures(&self, limit: usize) -> Result<Vec<FailureRecord>, OutboxError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let conn = self.conn.lock();
        let mut select = conn
            .prepare_cached(
                "SELECT id, key, job, event, channel, state, attempts, last_error, updated_at
                 FROM notify_outbox
                 WHERE last_error IS NOT NULL AND state != 'delivered'
                 ORDER BY updated_at DESC, id DESC LIMIT ?1",
            )
            .map_err(storage)?;
        let rows = select
            .query_map(params![limit], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, String>(4)?,
                    r.get::<_, String>(5)?,
                    r.get::<_, i64>(6)?,
                    r.get::<_, String>(7)?,
                    r.get::<_, i64>(8)?,
                ))
            })
            .map_err(storage)?;
        let mut out = Vec::new();
        for row in rows {
            let (id, key, job, ev, kind, st, attempts, error, at) = row.map_err(storage)?;
            out.push(FailureRecord {
                id,
                key,
                job,
                event: event(&ev)?,
                channel: channel_kind(&kind),
                state: state(&st),
                attempts: u32::try_from(attempts).unwrap_or(u32::MAX),
                error,
                at: from_ms(at),
            });
        }
        Ok(out)
    }

    fn counts(&self) -> Result<OutboxCounts, OutboxError> {
        let conn = self.conn.lock();
        let mut select = conn
            .prepare_cached("SELECT state, COUNT(*) FROM notify_outbox GROUP BY state")
            .map_err(storage)?;
        let rows = select
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))
            .map_err(storage)?;
        let mut c = OutboxCounts::default();
        for row in rows {
            let (st, n) = row.map_err(storage)?;
            let n = u64::try_from(n).unwrap_or(0);
            match state(&st) {
                State::Pending => c.pending = n,
                State::Delivered => c.delivered = n,
                State::GaveUp => c.gave_up = n,
                State::Dropped => c.dropped = n,
            }
        }
        Ok(c)
    }

    fn next_due(&self) -> Result<Option<OffsetDateTime>, OutboxError> {
        let due: Option<i64> = self
            .conn
            .lock()
            .query_row(
                "SELECT MIN(next_attempt_at) FROM notify_outbox WHERE state = 'pending'",
                [],
                |r| r.get(0),
            )
            .optional()
            .map_err(storage)?
            .flatten();
        Ok(due.map(from_ms))
    }

    fn prune(&self, before: OffsetDateTime) -> Result<u64, OutboxError> {
        let n = self
            .conn
            .lock()
            .execute(
                "DELETE FROM notify_outbox WHERE state != 'pending' AND updated_at < ?1",
                params![ms(before)],
            )
            .map_err(storage)?;
        Ok(u64::try_from(n).unwrap_or(u64::MAX))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use saltpeter_notify::outbox::conformance::{outbox_conformance, sample};

    #[test]
    fn the_sqlite_outbox_passes_the_conformance_suite() {
        outbox_conformance(|| Box::new(SqliteOutbox::in_memory().expect("open")));
    }

    #[test]
    fn an_outbox_file_of_its_own_is_created_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("data").join("notify-outbox.db");
        let outbox = SqliteOutbox::open(&path).expect("open");
        assert!(outbox.enqueue(sample("k1", 0)).expect("enqueue"));
        let mode = std::fs::metadata(&path).expect("file").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let dir_mode = std::fs::metadata(path.parent().expect("dir"))
            .expect("dir")
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(dir_mode, 0o700);
    }

    #[test]
    fn the_sqlite_outbox_passes_the_conformance_suite_on_a_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let n = std::sync::atomic::AtomicUsize::new(0);
        outbox_conformance(|| {
            let i = n.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Box::new(SqliteOutbox::open(&dir.path().join(format!("{i}.db"))).expect("open"))
        });
    }

    /// A row claimed by a master that then died is handed out again once its lease ends, by
    /// the next process that opens the file; a delivered row never is, and its key stays known.
    #[test]
    fn a_claimed_row_survives_a_crash_and_returns_after_its_lease() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("saltpeter.db");
        let t0 = time::macros::datetime!(2026-12-06 02:00:00 UTC);
        let lease = Duration::from_secs(60);
        {
            let first = SqliteOutbox::open(&path).expect("open");
            assert!(first.enqueue(sample("k", 0)).expect("enqueue"));
            assert!(first.enqueue(sample("done", 0)).expect("enqueue"));
            let got = first.claim_due(t0, 10, lease).expect("claim");
            assert_eq!(got.len(), 2);
            let done = got
                .iter()
                .find(|p| p.notification.key == "done")
                .expect("row");
            first.delivered(done.id, t0).expect("delivered");
            // Dropped without recording "k": the process died mid-send.
        }
        let second = SqliteOutbox::open(&path).expect("reopen");
        assert!(
            !second.enqueue(sample("k", 0)).expect("enqueue"),
            "the same key: no-op"
        );
        assert!(!second.enqueue(sample("done", 0)).expect("enqueue"));
        let early = t0 + time::Duration::seconds(59);
        assert!(
            second
                .claim_due(early, 10, lease)
                .expect("claim")
                .is_empty()
        );
        let after = t0 + time::Duration::seconds(60);
        let got = second.claim_due(after, 10, lease).expect("claim");
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].notification.key, "k");
        assert_eq!(got[0].notification, sample("k", 0), "every field survived");
    }

    /// The outbox shares the store's file: both open it, and both keep working.
    #[test]
    fn the_outbox_lives_beside_the_store_in_one_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (_db, _restored) =
            crate::Store::open(dir.path(), crate::Retention::default()).expect("store");
        let outbox = SqliteOutbox::open(&dir.path().join("saltpeter.db")).expect("outbox");
        assert!(outbox.enqueue(sample("a", 0)).expect("enqueue"));
        drop(outbox);
        let (_db2, _restored) =
            crate::Store::open(dir.path(), crate::Retention::default()).expect("reopen store");
        let outbox = SqliteOutbox::open(&dir.path().join("saltpeter.db")).expect("outbox");
        assert_eq!(outbox.counts().expect("counts").pending, 1);
    }
}
