//! The store against a real PostgreSQL: `cargo xtask ci` starts one and passes its URL in
//! `SALTPETER_TEST_POSTGRES`; a developer runs `cargo xtask postgres` and exports what it
//! prints. Without the variable these tests skip with a message, except under CI, where they
//! fail: a CI run that silently tested nothing would look green.
//!
//! Each test works in a schema of its own, so that tests running at once in one database do
//! not see each other's masters and leases.

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use saltpeter_store_postgres::assign::owner_of;
use saltpeter_store_postgres::lease::begin_fenced;
use saltpeter_store_postgres::schema::{self, SCHEMA_VERSION};
use saltpeter_store_postgres::{Advertised, Database, Epoch, Error, PostgresUrl};
use time::OffsetDateTime;

const URL_ENV: &str = "SALTPETER_TEST_POSTGRES";
/// Short leases keep the takeover tests fast; every wait below is bounded by a few TTLs.
const TTL: Duration = Duration::from_secs(1);

/// The server's URL, `None` (after saying so) when there is none and CI is not set.
fn postgres_url(test: &str) -> Option<String> {
    match std::env::var(URL_ENV) {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            let ci = std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false");
            assert!(
                !ci,
                "CI is set but {URL_ENV} is not: `cargo xtask ci` starts PostgreSQL and sets it"
            );
            eprintln!(
                "skipped {test}: {URL_ENV} is not set (start one with `cargo xtask postgres`)"
            );
            None
        }
    }
}

/// A pool on a fresh schema named after the test, not yet migrated.
async fn fresh(test: &str) -> Option<Database> {
    let url = postgres_url(test)?;
    let schema = format!("t_{test}_{}", std::process::id());
    let admin = Database::connect(&PostgresUrl::parse(&url).unwrap(), 1)
        .await
        .unwrap();
    admin
        .client()
        .await
        .unwrap()
        .batch_execute(&format!(
            "DROP SCHEMA IF EXISTS {schema} CASCADE; CREATE SCHEMA {schema};"
        ))
        .await
        .unwrap();
    let sep = if url.contains('?') { '&' } else { '?' };
    let scoped = format!("{url}{sep}options=-c%20search_path%3D{schema}");
    Some(
        Database::connect(&PostgresUrl::parse(&scoped).unwrap(), 16)
            .await
            .unwrap(),
    )
}

/// A migrated pool on a fresh schema.
async fn migrated(test: &str) -> Option<Database> {
    let db = fresh(test).await?;
    schema::migrate(&db).await.unwrap();
    Some(db)
}

/// What master `id` advertises in these tests: `wss://<id>:8889`, `https://<id>:8888`, and a
/// fingerprint for m2 only (as if it alone made its own certificate).
fn advertised(id: &str) -> Advertised {
    Advertised {
        machines_url: format!("wss://{id}:8889"),
        api_url: format!("https://{id}:8888"),
        tls_fingerprint: (id == "m2").then(|| format!("sha256:{id}")),
    }
}

/// Tries to take `job` for `master` until it succeeds, for at most `within`.
async fn acquire_within(
    db: &Database,
    job: &str,
    master: &str,
    within: Duration,
) -> saltpeter_store_postgres::Lease {
    let deadline = Instant::now() + within;
    loop {
        if let Some(lease) = db.acquire_or_renew(job, master, TTL).await.unwrap() {
            return lease;
        }
        assert!(
            Instant::now() < deadline,
            "{master} could not take {job} within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrations_are_idempotent_and_safe_to_run_concurrently() {
    let Some(db) = fresh("migrate").await else {
        return;
    };
    assert_eq!(schema::version(&db).await.unwrap(), 0);
    let (a, b) = tokio::join!(schema::migrate(&db), schema::migrate(&db));
    let mut found = [a.unwrap(), b.unwrap()];
    found.sort_unstable();
    // One of the two migrated from nothing; the other waited on the lock and found it done.
    assert_eq!(found, [0, SCHEMA_VERSION]);
    assert_eq!(schema::migrate(&db).await.unwrap(), SCHEMA_VERSION);
    assert_eq!(schema::version(&db).await.unwrap(), SCHEMA_VERSION);
    assert_eq!(SCHEMA_VERSION, 5);

    // The translated tables take what the SQLite store writes: times, flags, output bytes
    // with a NUL, which PostgreSQL's TEXT would refuse.
    let client = db.client().await.unwrap();
    let now = OffsetDateTime::now_utc();
    client
        .execute(
            "INSERT INTO runs (instance, job, grp, started, killed, token, resolving,
                               maintenance, pending_batches, epoch)
             VALUES ('j_1', 'j', 'g', $1, false, 't', false, '[]', '[]', 1)",
            &[&now],
        )
        .await
        .unwrap();
    client
        .execute(
            "INSERT INTO output (instance, machine, idx, byte_offset, head, data)
             VALUES ('j_1', 'm1', 0, 0, true, $1)",
            &[&b"a\0b".as_slice()],
        )
        .await
        .unwrap();
    let row = client
        .query_one(
            "SELECT r.started, r.identity, octet_length(o.data)
             FROM runs r JOIN output o USING (instance)",
            &[],
        )
        .await
        .unwrap();
    let started: OffsetDateTime = row.get(0);
    assert_eq!(
        started.unix_timestamp_nanos() / 1000,
        now.unix_timestamp_nanos() / 1000
    );
    assert_eq!(row.get::<_, String>(1), "run_token");
    assert_eq!(row.get::<_, i32>(2), 3);
}

/// A database at schema version 3, with a master registered by that release, moves to version
/// 4: the master's row stays and reads with an empty API URL and no fingerprint, and a master
/// of the previous release, which names only the `address` column, can still register.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schema_3_database_gains_what_masters_advertise() {
    let Some(db) = migrated("migrate_4").await else {
        return;
    };
    let client = db.client().await.unwrap();
    // Back to version 3 as it was: the two columns of version 4 did not exist.
    client
        .batch_execute(
            "ALTER TABLE masters DROP COLUMN api_url, DROP COLUMN tls_fingerprint, DROP COLUMN jobs;
             DELETE FROM schema_version WHERE version >= 4;
             INSERT INTO masters (id, address) VALUES ('old', 'wss://old:8889');",
        )
        .await
        .unwrap();
    assert_eq!(schema::version(&db).await.unwrap(), 3);
    assert_eq!(schema::migrate(&db).await.unwrap(), 3);
    assert_eq!(schema::version(&db).await.unwrap(), SCHEMA_VERSION);
    client
        .execute(
            "INSERT INTO masters (id, address) VALUES ('old2', 'wss://old2:8889')",
            &[],
        )
        .await
        .unwrap();
    db.register_master("m2", &advertised("m2")).await.unwrap();
    let live = db.live_masters(Duration::from_secs(10)).await.unwrap();
    // A master that has not said which jobs it has is taken as having every job.
    assert!(live.iter().all(|m| m.jobs.is_none()));
    let rows: Vec<(&str, &str, &str, Option<&str>)> = live
        .iter()
        .map(|m| {
            (
                m.id.as_str(),
                m.machines_url.as_str(),
                m.api_url.as_str(),
                m.tls_fingerprint.as_deref(),
            )
        })
        .collect();
    assert_eq!(
        rows,
        [
            ("m2", "wss://m2:8889", "https://m2:8888", Some("sha256:m2")),
            ("old", "wss://old:8889", "", None),
            ("old2", "wss://old2:8889", "", None),
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_is_renewed_at_the_same_epoch_and_taken_over_at_the_next() {
    let Some(db) = migrated("lease").await else {
        return;
    };
    let a = db
        .acquire_or_renew("backup", "a", TTL)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(a.epoch, Epoch(1));
    assert!(a.may_act(Duration::from_millis(100)));
    let renewed = db
        .acquire_or_renew("backup", "a", TTL)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(renewed.epoch, Epoch(1), "a renewal keeps the epoch");
    assert_eq!(db.acquire_or_renew("backup", "b", TTL).await.unwrap(), None);

    // b takes the job once a's lease has expired by the database's clock.
    let started = Instant::now();
    let b = acquire_within(&db, "backup", "b", 5 * TTL).await;
    assert!(
        started.elapsed() >= TTL / 2,
        "taken before the lease expired"
    );
    assert_eq!(b.epoch, Epoch(2), "a change of owner increments the epoch");
    assert!(
        !renewed.may_act(Duration::ZERO),
        "a must have stopped acting by its own clock"
    );
    assert_eq!(db.acquire_or_renew("backup", "a", TTL).await.unwrap(), None);

    // A release hands the job over at once, still at a higher epoch.
    assert!(db.release("backup", "b").await.unwrap());
    assert!(!db.release("backup", "b").await.unwrap());
    let a2 = db
        .acquire_or_renew("backup", "a", TTL)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(a2.epoch, Epoch(3));
    let row = db.lease_of("backup").await.unwrap().unwrap();
    assert_eq!(
        (row.owner.as_str(), row.epoch, row.valid),
        ("a", Epoch(3), true)
    );

    // The same master taking its own lease again after it expired is an acquisition, not a
    // renewal: its fence from before the gap must not pass.
    tokio::time::sleep(TTL + Duration::from_millis(100)).await;
    let again = db
        .acquire_or_renew("backup", "a", TTL)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(again.epoch, Epoch(4));
    let refused = db.claim_slot(&a2.fence(), OffsetDateTime::now_utc()).await;
    assert!(refused.unwrap_err().is_lost_lease());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_old_owner_cannot_write_after_a_takeover() {
    let Some(db) = migrated("fence").await else {
        return;
    };
    let old = db
        .acquire_or_renew("report", "a", TTL)
        .await
        .unwrap()
        .unwrap();
    let insert = "INSERT INTO slot_claims (job, slot, epoch, master) VALUES ($1, now(), $2, $3)";
    let fence = old.fence();
    assert_eq!(
        db.fenced_execute(&fence, insert, &[&fence.job, &fence.epoch.0, &fence.master])
            .await
            .unwrap(),
        1
    );
    let new = acquire_within(&db, "report", "b", 5 * TTL).await;
    assert_eq!(new.epoch, Epoch(2));
    let err = db
        .fenced_execute(&fence, insert, &[&fence.job, &fence.epoch.0, &fence.master])
        .await
        .unwrap_err();
    assert!(err.is_lost_lease(), "{err}");
    assert!(matches!(
        err,
        Error::LostLease {
            epoch: Epoch(1),
            ..
        }
    ));
    // The same master at a stale epoch is refused too, not only another master.
    let mut stale = new.fence();
    stale.epoch = Epoch(1);
    assert!(
        db.claim_slot(&stale, OffsetDateTime::now_utc())
            .await
            .unwrap_err()
            .is_lost_lease()
    );
    let n: i64 = db
        .client()
        .await
        .unwrap()
        .query_one("SELECT count(*) FROM slot_claims WHERE job = 'report'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1, "the refused writes wrote nothing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_takeover_waits_for_a_fenced_write_in_flight() {
    let Some(db) = migrated("inflight").await else {
        return;
    };
    let old = db
        .acquire_or_renew("sync", "a", TTL)
        .await
        .unwrap()
        .unwrap();
    let mut client = db.client().await.unwrap();
    let tx = begin_fenced(&mut client, &old.fence()).await.unwrap();
    // Outlive the lease while holding the lease row: b's takeover must queue behind this
    // transaction, so a's write lands before epoch 2 begins.
    tokio::time::sleep(TTL + Duration::from_millis(200)).await;
    let db2 = db.clone();
    let takeover = tokio::spawn(async move { db2.acquire_or_renew("sync", "b", TTL).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !takeover.is_finished(),
        "the takeover did not wait for the write in flight"
    );
    tx.execute(
        "INSERT INTO slot_claims (job, slot, epoch, master) VALUES ('sync', now(), 1, 'a')",
        &[],
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    let new = takeover.await.unwrap().unwrap().unwrap();
    assert_eq!((new.master.as_str(), new.epoch), ("b", Epoch(2)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_masters_follow_heartbeats_and_deregistering_frees_leases() {
    let Some(db) = migrated("members").await else {
        return;
    };
    for id in ["m1", "m2"] {
        db.register_master(id, &advertised(id)).await.unwrap();
    }
    let live = db.live_masters(Duration::from_secs(10)).await.unwrap();
    let ids: Vec<&str> = live.iter().map(|m| m.id.as_str()).collect();
    assert_eq!(ids, ["m1", "m2"]);
    let shown = |m: &saltpeter_store_postgres::MasterInfo| Advertised {
        machines_url: m.machines_url.clone(),
        api_url: m.api_url.clone(),
        tls_fingerprint: m.tls_fingerprint.clone(),
    };
    assert_eq!(shown(&live[0]), advertised("m1"));
    assert_eq!(shown(&live[1]), advertised("m2"));
    // Registering again (a master that was found dead and joins again) updates what it
    // advertises, a fingerprint removed included.
    let moved = Advertised {
        machines_url: "wss://m2.example:8889".into(),
        api_url: "https://m2.example:8888".into(),
        tls_fingerprint: None,
    };
    db.register_master("m2", &moved).await.unwrap();
    let live = db.live_masters(Duration::from_secs(10)).await.unwrap();
    assert_eq!(shown(&live[1]), moved);

    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(db.heartbeat("m2").await.unwrap());
    let live = db.live_masters(Duration::from_millis(500)).await.unwrap();
    let ids: Vec<&str> = live.iter().map(|m| m.id.as_str()).collect();
    assert_eq!(ids, ["m2"], "m1's heartbeat is too old");

    db.acquire_or_renew("j", "m2", Duration::from_secs(30))
        .await
        .unwrap()
        .unwrap();
    // Leases that are over are nobody's: one released, one run out.
    db.acquire_or_renew("released", "m1", Duration::from_secs(30))
        .await
        .unwrap()
        .unwrap();
    assert!(db.release("released", "m1").await.unwrap());
    db.acquire_or_renew("ran_out", "m1", Duration::from_millis(1))
        .await
        .unwrap()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let holders = async || -> Vec<(String, String, Epoch)> {
        db.leases()
            .await
            .unwrap()
            .into_iter()
            .map(|l| {
                assert!(l.valid);
                (l.job, l.owner, l.epoch)
            })
            .collect()
    };
    assert_eq!(holders().await, [("j".into(), "m2".into(), Epoch(1))]);
    db.deregister_master("m2").await.unwrap();
    assert!(
        !db.heartbeat("m2").await.unwrap(),
        "a removed master must register again"
    );
    assert_eq!(holders().await, []);
    let taken = db.acquire_or_renew("j", "m1", TTL).await.unwrap().unwrap();
    assert_eq!(
        taken.epoch,
        Epoch(2),
        "the leases of a leaving master are free at once"
    );
    assert_eq!(holders().await, [("j".into(), "m1".into(), Epoch(2))]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_spread_over_live_masters_and_only_a_dead_masters_jobs_move() {
    let Some(db) = migrated("spread").await else {
        return;
    };
    let jobs: Vec<String> = (0..100).map(|i| format!("job-{i:03}")).collect();
    for m in ["m-a", "m-b", "m-c"] {
        db.register_master(m, &advertised(m)).await.unwrap();
    }
    let live_ids = |live: Vec<saltpeter_store_postgres::MasterInfo>| -> Vec<String> {
        live.into_iter().map(|m| m.id).collect()
    };
    let masters = live_ids(db.live_masters(Duration::from_secs(10)).await.unwrap());
    let mut before = HashMap::new();
    for job in &jobs {
        let owner = owner_of(job, &masters).unwrap().clone();
        let lease = db
            .acquire_or_renew(job, &owner, TTL)
            .await
            .unwrap()
            .unwrap();
        before.insert(job.clone(), (owner, lease.epoch));
    }
    for m in &masters {
        let n = before.values().filter(|(o, _)| o == m).count();
        assert!((20..=47).contains(&n), "{m} holds {n} of 100 jobs");
    }

    // m-c dies: its heartbeat stops and its leases run out; the others recompute.
    let deadline = Instant::now() + 5 * TTL;
    let masters = loop {
        for m in ["m-a", "m-b"] {
            assert!(db.heartbeat(m).await.unwrap());
        }
        let live = live_ids(db.live_masters(TTL).await.unwrap());
        if live.len() == 2 {
            break live;
        }
        assert!(Instant::now() < deadline, "m-c still counts as live");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let mut moved = 0;
    for job in &jobs {
        let (was, epoch) = &before[job];
        let owner = owner_of(job, &masters).unwrap();
        if was == "m-c" {
            let lease = acquire_within(&db, job, owner, 5 * TTL).await;
            assert_eq!(lease.epoch, Epoch(epoch.0 + 1));
            moved += 1;
        } else {
            assert_eq!(owner, was, "{job} moved though its master lives");
        }
    }
    assert_eq!(moved, before.values().filter(|(o, _)| o == "m-c").count());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_slot_is_claimed_exactly_once_by_three_masters() {
    let Some(db) = migrated("slots").await else {
        return;
    };
    const SLOTS: i64 = 200;
    let base = OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap();
    let slot = move |i: i64| base + time::Duration::minutes(i);
    let mut tasks = Vec::new();
    for me in ["m1", "m2", "m3"] {
        let db = db.clone();
        tasks.push(tokio::spawn(async move {
            let mut lease = None;
            let mut mine = 0;
            let mut claimed = Vec::new();
            // Each master walks every slot, taking the lease when it is free and handing it
            // on every 25 claims, so the lease changes hands many times during the run.
            for i in 0..SLOTS {
                let deadline = Instant::now() + Duration::from_secs(20);
                loop {
                    assert!(Instant::now() < deadline, "{me} stuck at slot {i}");
                    if lease.is_none() {
                        lease = db.acquire_or_renew("cron", me, TTL).await.unwrap();
                    }
                    let Some(held) = &lease else {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                        continue;
                    };
                    match db.claim_slot(&held.fence(), slot(i)).await {
                        Ok(true) => {
                            claimed.push((i, me));
                            mine += 1;
                            if mine % 25 == 0 && i + 1 < SLOTS {
                                db.release("cron", me).await.unwrap();
                                lease = None;
                                // Hand on for real: the others are waiting at the next slot,
                                // which is unclaimed, so one of them takes the lease soon.
                                let until = Instant::now() + Duration::from_secs(10);
                                while db.lease_of("cron").await.unwrap().unwrap().owner == me {
                                    assert!(Instant::now() < until, "nobody took the lease");
                                    tokio::time::sleep(Duration::from_millis(5)).await;
                                }
                            }
                            break;
                        }
                        Ok(false) => break,
                        Err(e) if e.is_lost_lease() => lease = None,
                        Err(e) => panic!("{me}: {e}"),
                    }
                }
            }
            if lease.is_some() {
                db.release("cron", me).await.unwrap();
            }
            claimed
        }));
    }
    let mut claimed = Vec::new();
    for t in tasks {
        claimed.extend(t.await.unwrap());
    }
    let slots: HashSet<i64> = claimed.iter().map(|(i, _)| *i).collect();
    assert_eq!(claimed.len(), SLOTS as usize, "a slot was claimed twice");
    assert_eq!(slots.len(), SLOTS as usize, "a slot was never claimed");
    let by: HashSet<&str> = claimed.iter().map(|(_, m)| *m).collect();
    assert!(by.len() >= 2, "the lease never changed hands: {by:?}");
    for (i, m) in &claimed {
        let (who, _) = db.slot_claim("cron", slot(*i)).await.unwrap().unwrap();
        assert_eq!(&who, m);
    }
    assert_eq!(db.prune_slot_claims(slot(100)).await.unwrap(), 100);
}

/// Whether the connection of `db` is inside TLS, as the server sees it.
async fn uses_tls(db: &Database) -> bool {
    db.client()
        .await
        .unwrap()
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_is_used_as_sslmode_asks() {
    let Some(url) = postgres_url("tls") else {
        return;
    };
    let ca = std::env::var("SALTPETER_TEST_POSTGRES_CA").unwrap_or_default();
    if ca.is_empty() {
        let ci = std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false");
        assert!(!ci, "CI is set but SALTPETER_TEST_POSTGRES_CA is not");
        eprintln!("skipped tls: SALTPETER_TEST_POSTGRES_CA is not set");
        return;
    }
    let base = url.split('?').next().unwrap();
    let with = |query: &str| PostgresUrl::parse(&format!("{base}?{query}")).unwrap();

    let plain = Database::connect(&with("sslmode=disable"), 1)
        .await
        .unwrap();
    assert!(!uses_tls(&plain).await);
    // `require` encrypts without checking the certificate, as libpq does.
    let any = Database::connect(&with("sslmode=require"), 1)
        .await
        .unwrap();
    assert!(uses_tls(&any).await);
    let ca_param = ca.replace('/', "%2F");
    let verified = Database::connect(
        &with(&format!("sslmode=verify-full&sslrootcert={ca_param}")),
        1,
    )
    .await
    .unwrap();
    assert!(uses_tls(&verified).await);
    // The system's roots do not know the test CA: `verify-full` must refuse the server.
    let err = Database::connect(&with("sslmode=verify-full"), 1)
        .await
        .unwrap_err();
    let password = base
        .split("://")
        .nth(1)
        .and_then(|rest| rest.split('@').next())
        .and_then(|userinfo| userinfo.split(':').nth(1))
        .unwrap();
    for shown in [err.to_string(), format!("{err:?}"), format!("{verified:?}")] {
        assert!(!shown.contains(password), "the password leaked: {shown}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_from_a_newer_release_is_refused() {
    let Some(db) = migrated("toonew").await else {
        return;
    };
    db.client()
        .await
        .unwrap()
        .execute("INSERT INTO schema_version (version) VALUES (99)", &[])
        .await
        .unwrap();
    assert!(matches!(schema::migrate(&db).await, Err(Error::TooNew(99))));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_renewal_becomes_a_timeout_within_the_bound() {
    let Some(db) = migrated("stuck").await else {
        return;
    };
    db.acquire_or_renew("nightly", "a", TTL)
        .await
        .unwrap()
        .unwrap();
    // Another session holds the lease row, as a hung transaction or a lock queue would.
    let mut blocker = db.client().await.unwrap();
    let tx = blocker.transaction().await.unwrap();
    tx.execute(
        "SELECT 1 FROM job_leases WHERE job = 'nightly' FOR UPDATE",
        &[],
    )
    .await
    .unwrap();
    let bounded = db.clone().with_op_timeout(Duration::from_millis(300));
    let started = Instant::now();
    let err = bounded
        .acquire_or_renew("nightly", "a", TTL)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Timeout(_)), "{err}");
    assert!(started.elapsed() < Duration::from_secs(2));
    tx.rollback().await.unwrap();
}

#[tokio::test]
async fn a_server_that_never_answers_fails_the_connection_within_its_timeout() {
    // Needs no PostgreSQL: a socket that accepts and then says nothing, as across a partition.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let hold = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    let url = PostgresUrl::parse(&format!(
        "postgres://u:p@127.0.0.1:{port}/db?sslmode=disable"
    ))
    .unwrap();
    let started = Instant::now();
    let err = Database::connect_bounded(&url, 1, Duration::from_millis(300))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Pool(_)), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    hold.abort();
}

/// What one master's coordinator showed after its last pass.
#[derive(Clone, Debug, Default)]
struct View {
    /// The jobs it may act on.
    held: HashSet<String>,
    /// The ids of the live masters it read.
    masters: Vec<String>,
    /// Whom it saw holding each job.
    holders: BTreeMap<String, String>,
    /// The API URL it read for each live master.
    api_urls: Vec<String>,
}

/// Runs one master's coordinator, ticking every `renew_every`, publishing what it shows after
/// each pass, until told to stop (then it leaves cleanly) or aborted (a crash).
fn run_master(
    coordinator: saltpeter_store_postgres::coordinator::Coordinator,
    view: tokio::sync::watch::Sender<View>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    let mut coordinator = coordinator;
    tokio::spawn(async move {
        let every = coordinator.settings().renew_every;
        loop {
            coordinator.tick().await.unwrap();
            view.send_replace(View {
                held: coordinator.held().map(|l| l.job.clone()).collect(),
                masters: coordinator.masters().iter().map(|m| m.id.clone()).collect(),
                holders: coordinator.holders().clone(),
                api_urls: coordinator
                    .masters()
                    .iter()
                    .map(|m| m.api_url.clone())
                    .collect(),
            });
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = stop.changed() => break,
            }
        }
        view.send_replace(View::default());
        coordinator.shutdown().await.unwrap();
    })
}

/// Waits until `done` holds, for at most `within`; says `what` did not happen otherwise.
async fn eventually(within: Duration, what: &str, mut done: impl FnMut() -> bool) -> Duration {
    let started = Instant::now();
    while !done() {
        assert!(started.elapsed() < within, "{what} within {within:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    started.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinators_spread_jobs_and_take_over_a_dead_masters_within_the_bound() {
    use saltpeter_store_postgres::coordinator::{Coordinator, Settings};
    let Some(db) = migrated("coord").await else {
        return;
    };
    let jobs: Vec<String> = (0..30).map(|i| format!("job-{i:02}")).collect();
    let all: HashSet<String> = jobs.iter().cloned().collect();
    let ids = ["m1", "m2", "m3"];
    let mut views = Vec::new();
    let mut stops = Vec::new();
    let mut tasks = Vec::new();
    // Register all three before any pass, so the first passes agree on who is live.
    let mut coordinators = Vec::new();
    for id in ids {
        let mut settings = Settings::new(id, advertised(id));
        settings.lease_ttl = TTL;
        settings.renew_every = Duration::from_millis(200);
        settings.stop_margin = Duration::from_millis(200);
        settings.master_ttl = TTL;
        let mut c = Coordinator::start(db.clone(), settings).await.unwrap();
        assert!(c.masters().is_empty() && c.holders().is_empty());
        assert_eq!(c.fence("job-00"), None, "nothing is held before a pass");
        c.set_jobs(jobs.clone());
        coordinators.push(c);
    }
    for c in coordinators {
        let (view_tx, view_rx) = tokio::sync::watch::channel(View::default());
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        tasks.push(run_master(c, view_tx, stop_rx));
        views.push(view_rx);
        stops.push(stop_tx);
    }
    // Waits until the masters in `alive` hold every job between them, each job once.
    let converge = |alive: Vec<usize>, within: Duration| {
        let views = views.clone();
        let all = all.clone();
        async move {
            let started = Instant::now();
            loop {
                let sets: Vec<HashSet<String>> = alive
                    .iter()
                    .map(|i| views[*i].borrow().held.clone())
                    .collect();
                let total: usize = sets.iter().map(HashSet::len).sum();
                let union: HashSet<&String> = sets.iter().flatten().collect();
                assert_eq!(total, union.len(), "a job is held by two masters: {sets:?}");
                if union.len() == all.len() {
                    return (started.elapsed(), sets);
                }
                assert!(started.elapsed() < within, "not converged: {sets:?}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    // Whether every master in `alive` sees exactly `alive` as the live masters and names, for
    // every job, the master that holds it by its own account.
    let agree = |alive: &[usize]| {
        let shown: Vec<View> = alive.iter().map(|i| views[*i].borrow().clone()).collect();
        let live: Vec<String> = alive.iter().map(|i| ids[*i].to_owned()).collect();
        let mut truth = BTreeMap::new();
        for (i, view) in alive.iter().zip(&shown) {
            for job in &view.held {
                truth.insert(job.clone(), ids[*i].to_owned());
            }
        }
        truth.len() == all.len()
            && shown
                .iter()
                .all(|v| v.masters == live && v.holders == truth)
    };
    let (_, sets) = converge(vec![0, 1, 2], 3 * TTL).await;
    for set in &sets {
        assert!((4..=18).contains(&set.len()), "uneven: {sets:?}");
    }
    let m3_jobs = sets[2].clone();
    eventually(3 * TTL, "the three masters agree on who holds what", || {
        agree(&[0, 1, 2])
    })
    .await;
    assert_eq!(
        views[0].borrow().api_urls,
        ["https://m1:8888", "https://m2:8888", "https://m3:8888"]
    );

    // m3 crashes: no release, no deregistration. Its leases must run out and move, within a
    // TTL and a few passes (the scaled version of 13 s with the default timings).
    tasks[2].abort();
    assert!(
        views[0].borrow().masters.contains(&"m3".to_owned()),
        "m3 was live at m1's last pass"
    );
    let (took, after) = converge(vec![0, 1], 3 * TTL).await;
    assert!(
        took >= TTL / 2,
        "taken over before m3's leases could expire ({took:?})"
    );
    for (before, now) in sets.iter().take(2).zip(&after) {
        assert!(before.is_subset(now), "a live master lost a job it kept");
    }
    let moved: HashSet<String> = after
        .iter()
        .flatten()
        .filter(|j| !sets[0].contains(*j) && !sets[1].contains(*j))
        .cloned()
        .collect();
    assert_eq!(moved, m3_jobs);
    for job in &m3_jobs {
        assert_eq!(db.lease_of(job).await.unwrap().unwrap().epoch, Epoch(2));
    }
    // m3 is gone from the others' view once its heartbeat is older than the TTL, and they
    // name the new holders of its jobs.
    eventually(3 * TTL, "m1 and m2 see m3 gone and its jobs moved", || {
        agree(&[0, 1])
    })
    .await;
    for view in [&views[0], &views[1]] {
        let view = view.borrow();
        for job in &m3_jobs {
            assert_ne!(view.holders[job], "m3", "{job}");
        }
    }

    // m1 leaves cleanly: m2 takes everything without waiting for leases to expire.
    let left = Instant::now();
    stops[0].send_replace(true);
    let deadline = Instant::now() + 3 * TTL;
    while views[1].borrow().held.len() < all.len() {
        assert!(Instant::now() < deadline, "m2 did not take m1's jobs");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        left.elapsed() < TTL + Duration::from_millis(500),
        "{:?}",
        left.elapsed()
    );
    eventually(3 * TTL, "m2 sees itself alone, holding every job", || {
        agree(&[1])
    })
    .await;
    stops[1].send_replace(true);
    for t in tasks.into_iter().take(2) {
        t.await.unwrap();
    }
}

/// A coordinator's fence is its lease's token while it may act on the job, and nothing once
/// its own clock says the lease may have run out, before any pass notices.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_fences_only_what_it_may_act_on() {
    use saltpeter_store_postgres::coordinator::{Coordinator, Settings};
    let Some(db) = migrated("coord_fence").await else {
        return;
    };
    let mut settings = Settings::new("m1", advertised("m1"));
    settings.lease_ttl = TTL;
    settings.stop_margin = Duration::from_millis(200);
    let mut c = Coordinator::start(db.clone(), settings).await.unwrap();
    c.set_jobs(["backup".to_owned()]);
    let changes = c.tick().await.unwrap();
    assert_eq!(changes.gained.len(), 1);
    let fence = c.fence("backup").unwrap();
    assert_eq!(fence, changes.gained[0].fence());
    assert_eq!((fence.master.as_str(), fence.epoch), ("m1", Epoch(1)));
    assert_eq!(c.fence("other"), None, "a job it does not hold");
    assert_eq!(c.holders().get("backup").map(String::as_str), Some("m1"));
    assert_eq!(c.masters().len(), 1);
    assert_eq!(c.masters()[0].tls_fingerprint, None);
    // No pass for longer than the lease minus the margin: the master must stop by itself.
    tokio::time::sleep(TTL - Duration::from_millis(150)).await;
    assert_eq!(c.fence("backup"), None);
    // The view of the last successful pass stays until the next one.
    assert_eq!(c.holders().get("backup").map(String::as_str), Some("m1"));
}

/// A job only some masters' files have goes to one of those, even when rendezvous hashing
/// prefers a master without it; once that master loads the job too, the job may move there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_is_held_only_by_a_master_whose_files_have_it() {
    use saltpeter_store_postgres::assign::owner_of;
    use saltpeter_store_postgres::coordinator::{Coordinator, Settings};
    let Some(db) = migrated("coord_known").await else {
        return;
    };
    // A job that m2 would win among m1 and m2.
    let job = (0..100)
        .map(|i| format!("new-job-{i}"))
        .find(|j| *owner_of(j, &["m1", "m2"]).unwrap() == "m2")
        .unwrap();
    let start = |id: &'static str| {
        let db = db.clone();
        async move {
            let mut settings = Settings::new(id, advertised(id));
            settings.lease_ttl = TTL;
            settings.stop_margin = Duration::from_millis(200);
            Coordinator::start(db, settings).await.unwrap()
        }
    };
    let (mut m1, mut m2) = (start("m1").await, start("m2").await);
    m1.set_jobs(["common".to_owned(), job.clone()]);
    m2.set_jobs(["common".to_owned()]);
    // Two rounds: the first registers what each has, the second assigns with it known.
    for _ in 0..2 {
        m1.tick().await.unwrap();
        m2.tick().await.unwrap();
    }
    assert!(
        m1.fence(&job).is_some(),
        "m1, the only master with {job}, holds it: {:?}",
        m1.masters()
    );
    assert!(m2.fence(&job).is_none());
    assert_eq!(m2.holders().get(&job).map(String::as_str), Some("m1"));
    let m2_row = m1.masters().iter().find(|m| m.id == "m2").unwrap();
    assert_eq!(m2_row.jobs.as_deref(), Some(&["common".to_owned()][..]));
    // m2 loads the job: m1 lets it go and m2 takes it.
    m2.set_jobs(["common".to_owned(), job.clone()]);
    for _ in 0..3 {
        m2.tick().await.unwrap();
        m1.tick().await.unwrap();
    }
    m2.tick().await.unwrap();
    assert!(m2.fence(&job).is_some(), "m2 takes {job} once it has it");
    assert!(m1.fence(&job).is_none());
}

/// The store backend under a fence: a run's writes carry the epoch of the job's lease, and once
/// another master holds the job nothing more is written or acked for it.
#[test]
fn store_writes_carry_the_lease_epoch_and_stop_once_it_is_lost() {
    use saltpeter_store::{
        Backend, MachineRecord, MachineStatus, Notice, Retention, RunRecord, StoreOp,
    };
    use saltpeter_store_postgres::PgBackend;
    use std::sync::Arc;

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let Some(db) = runtime.block_on(migrated("fenced_store")) else {
        return;
    };
    let ttl = Duration::from_secs(30);
    let lease = runtime
        .block_on(db.acquire_or_renew("j", "m-a", ttl))
        .unwrap()
        .unwrap();
    let fence = Arc::new(parking_lot::Mutex::new(lease.fence()));
    let held = fence.clone();
    let (backend, _) = PgBackend::open(db.url(), Retention::default()).unwrap();
    let mut backend = backend.with_fences(Arc::new(move |job: &str| {
        (job == "j").then(|| held.lock().clone())
    }));
    let now = OffsetDateTime::now_utc();
    let output = |seq: u64, data: &str| StoreOp::Output {
        instance: "j_1".into(),
        machine: "m1".into(),
        seq: Some(seq),
        data: data.into(),
    };
    let notice = |seq: u64| {
        StoreOp::Notify(Notice::Output {
            instance: "j_1".into(),
            machine: "m1".into(),
            seq: Some(seq),
            conn: 1,
            received: None,
        })
    };
    let notices = backend.apply(vec![
        StoreOp::Run(RunRecord {
            instance: "j_1".into(),
            job: "j".into(),
            group: "g".into(),
            started: now,
            ended: None,
            success: None,
            killed: false,
            token: "t".into(),
            identity: "run_token".into(),
            resolving: false,
            maintenance: Vec::new(),
            pending_batches: Vec::new(),
        }),
        StoreOp::Machine(MachineRecord {
            instance: "j_1".into(),
            machine: "m1".into(),
            status: MachineStatus::Running,
            retcode: None,
            cause: None,
            late_retcode: None,
            starttime: Some(now),
            endtime: None,
            last_heartbeat: None,
            wrapper_version: None,
            pid: None,
            wrapper_pid: None,
            launched: true,
            started: true,
            kill_requested: false,
            launch_problem: None,
            modern: true,
            authenticated: true,
        }),
        output(0, "first\n"),
        notice(0),
    ]);
    assert_eq!(notices.len(), 1, "written under the lease, acked");
    let count = |sql: &str| -> i64 {
        runtime.block_on(async {
            db.client()
                .await
                .unwrap()
                .query_one(sql, &[])
                .await
                .unwrap()
                .get(0)
        })
    };
    assert_eq!(
        count("SELECT epoch FROM runs WHERE instance = 'j_1'"),
        lease.epoch.0
    );
    // Another master takes the job over.
    assert!(runtime.block_on(db.release("j", "m-a")).unwrap());
    let taken = runtime
        .block_on(db.acquire_or_renew("j", "m-b", ttl))
        .unwrap()
        .unwrap();
    assert_eq!(taken.epoch, Epoch(lease.epoch.0 + 1));
    let notices = backend.apply(vec![output(1, "late\n"), notice(1)]);
    assert!(notices.is_empty(), "nothing is acked under a lost lease");
    assert_eq!(
        count("SELECT COUNT(*) FROM output WHERE instance = 'j_1'"),
        1
    );
    // Under the fence of whoever holds the job now, writes go through again.
    *fence.lock() = taken.fence();
    let notices = backend.apply(vec![output(1, "by the new holder's fence\n"), notice(1)]);
    assert_eq!(notices.len(), 1);
    assert_eq!(
        count("SELECT COUNT(*) FROM output WHERE instance = 'j_1'"),
        2
    );
}
