//! Totality: nothing a client, a config file or a settings block sends can panic the master or
//! make it hold unbounded state.
//!
//! Three kinds of tests live here:
//! - regressions, one per overflow that used to panic (each fails on the code before its fix);
//! - property tests that feed the parsers arbitrary and extreme input: the HTTP query
//!   parsers, the `/ws` command parser, `parse_when`, the settings and job parsers, and the
//!   schedule parser and its searches;
//! - end-to-end checks against a running master: bad requests get a 400 or an `error`
//!   message, caps are enforced, and the server still answers afterwards; plus a property
//!   test that drives one `/ws` connection with arbitrary commands.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::time::Duration;

use proptest::prelude::*;
use proptest::test_runner::{Config as RunnerConfig, TestRunner};
use saltpeter_config::job::MAX_TIMEOUT_SECS;
use saltpeter_config::schedule::{Schedule, ScheduleFields};
use saltpeter_config::{Config, Limits};
use saltpeter_master::server::Running;
use saltpeter_web::ui::messages::{parse_command, parse_when};
use saltpeter_web::ui::query;
use serde_json::{Value, json};
use support::raw::{self, Ws, recv, recv_type, send};
use time::OffsetDateTime;

const MINIMAL: &str = "  min: 0\n  hour: '*'\n  dom: '*'\n  mon: '*'\n  dow: '*'\n  targets: 'web*'\n  command: 'true'\n";

fn load(files: &[(&str, &str)]) -> Config {
    let dir = tempfile::tempdir().unwrap();
    for (name, text) in files {
        fs::write(dir.path().join(name), text).unwrap();
    }
    Config::load(dir.path())
}

fn error_lines(config: &Config) -> Vec<String> {
    config
        .problems
        .iter()
        .filter(|p| p.is_error())
        .map(ToString::to_string)
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Regressions: values that used to overflow are now errors that name the file and line.

#[test]
fn a_job_timeout_beyond_a_year_is_an_error_naming_file_and_line() {
    for huge in ["18446744073709551615", "31536001"] {
        let config = load(&[("jobs.yaml", &format!("j:\n{MINIMAL}  timeout: {huge}\n"))]);
        assert!(config.job("j").is_none(), "{huge}");
        let errors = error_lines(&config);
        assert!(
            errors
                .iter()
                .any(|e| e.contains("jobs.yaml:9") && e.contains("timeout")),
            "{huge}: {errors:?}"
        );
    }
    let config = load(&[(
        "jobs.yaml",
        &format!("j:\n{MINIMAL}  timeout: {MAX_TIMEOUT_SECS}\n"),
    )]);
    assert_eq!(
        config.job("j").unwrap().timeout,
        Some(Duration::from_secs(MAX_TIMEOUT_SECS))
    );
}

#[test]
fn settings_that_would_overflow_the_clock_or_calendar_are_errors() {
    let block = "saltpeter_config:\n  heartbeat_timeout: 18446744073709551615\n  ping_timeout: 86401\n  retention_days: 4294967296\n  retention_runs_per_job: 18446744073709551615\n  ui_max_subscriptions: 0\n  timeline_max_days: 36501\n";
    let config = load(&[("settings.yaml", block)]);
    let errors = error_lines(&config);
    for (line, key) in [
        (2, "heartbeat_timeout"),
        (3, "ping_timeout"),
        (4, "retention_days"),
        (5, "retention_runs_per_job"),
        (6, "ui_max_subscriptions"),
        (7, "timeline_max_days"),
    ] {
        assert!(
            errors
                .iter()
                .any(|e| e.contains(&format!("settings.yaml:{line}")) && e.contains(key)),
            "{key}: {errors:?}"
        );
    }
    // Each bad value is dropped: the defaults stay.
    let defaults = saltpeter_config::Settings::default();
    let s = &config.settings;
    assert_eq!(s.heartbeat_timeout, defaults.heartbeat_timeout);
    assert_eq!(s.ping_timeout, defaults.ping_timeout);
    assert_eq!(s.retention_days, defaults.retention_days);
    assert_eq!(s.retention_runs_per_job, defaults.retention_runs_per_job);
    assert_eq!(s.limits, Limits::default());
}

#[test]
fn the_caps_are_settings() {
    let block = "saltpeter_config:\n  default_wrapper_path: /usr/local/bin/sp-wrapper\n  ui_max_subscriptions: 3\n  ui_max_names_per_command: 2\n  api_max_runs_page: 50\n  timeline_max_rows: 70\n  timeline_max_days: 9\n";
    let config = load(&[("settings.yaml", block)]);
    assert!(error_lines(&config).is_empty(), "{:?}", config.problems);
    assert!(
        config.problems.is_empty(),
        "no unknown-key warnings: {:?}",
        config.problems
    );
    assert_eq!(
        config.settings.limits,
        Limits {
            ui_max_subscriptions: 3,
            ui_max_names_per_command: 2,
            api_max_runs_page: 50,
            timeline_max_rows: 70,
            timeline_max_days: 9,
        }
    );
}

// ---------------------------------------------------------------------------------------------
// Property tests of the parsers.

/// Date math and RFC 3339 text around the edges: huge counts, every unit, offsets that push
/// a time out of the calendar.
fn date_text() -> BoxedStrategy<String> {
    prop_oneof![
        4 => "now([+-][0-9]{1,19}[smhdw]){1,4}(/d)?",
        1 => "now([+-][0-9]{1,21}[smhdwy]?){0,4}(/d)?",
        2 => "(0000|0001|1970|2026|9999)-(01|12)-(01|31)T(00|23):(00|59):(00|59)(\\.5)?(Z|[+-](00|14|23):(00|59))",
        1 => " ?now ?",
        1 => "[ -~]{0,16}",
    ]
    .boxed()
}

fn limits() -> impl Strategy<Value = Limits> {
    (
        1usize..600,
        1usize..600,
        1usize..600,
        1usize..6000,
        1u32..36_500,
    )
        .prop_map(|(subs, names, page, rows, days)| Limits {
            ui_max_subscriptions: subs,
            ui_max_names_per_command: names,
            api_max_runs_page: page,
            timeline_max_rows: rows,
            timeline_max_days: days,
        })
}

/// A query string's parameters: each key the parsers read, present half the time, with
/// hostile values (date text most often, since it feeds the time arithmetic).
fn params() -> impl Strategy<Value = HashMap<String, String>> {
    const KEYS: [&str; 11] = [
        "start_date",
        "end_date",
        "limit",
        "job",
        "id",
        "from",
        "machine",
        "max_bytes",
        "before",
        "offset",
        "length",
    ];
    let value = prop_oneof![
        4 => date_text(),
        1 => "-?[0-9]{1,22}",
        1 => Just(u64::MAX.to_string()),
        1 => Just(i64::MAX.to_string()),
        1 => Just((1u128 << 64).to_string()),
        1 => "([a-z0-9]{0,6}:-?[0-9]{0,21},?){0,6}",
        1 => "[ -~]{0,12}",
    ];
    prop::collection::vec(prop::option::weighted(0.5, value), KEYS.len()).prop_map(|values| {
        KEYS.iter()
            .zip(values)
            .filter_map(|(k, v)| Some(((*k).to_owned(), v?)))
            .collect()
    })
}

/// Moments across the whole calendar, the edges included.
fn any_moment() -> impl Strategy<Value = OffsetDateTime> {
    let min = time::PrimitiveDateTime::MIN.assume_utc().unix_timestamp();
    let max = time::PrimitiveDateTime::MAX.assume_utc().unix_timestamp();
    prop_oneof![
        (min..=max).prop_map(|s| OffsetDateTime::from_unix_timestamp(s).unwrap()),
        Just(time::PrimitiveDateTime::MIN.assume_utc()),
        Just(time::PrimitiveDateTime::MAX.assume_utc()),
        (0i64..4_102_444_800).prop_map(|s| OffsetDateTime::from_unix_timestamp(s).unwrap()),
    ]
}

/// A cron field from the grammar's vocabulary plus extreme numbers.
fn cron_field() -> BoxedStrategy<String> {
    let atom = prop_oneof![
        Just("*".to_owned()),
        Just("?".to_owned()),
        Just("L".to_owned()),
        "[0-9]{1,3}",
        "[0-9]{10,25}",
        "[0-9]{1,4}-[0-9]{1,4}",
        "\\*/[0-9]{1,12}",
        "[0-9]{1,4}/[0-9]{1,5}",
        "L[0-9]{1,3}(-[0-9]{1,3})?",
        "(jan|dec|sun|sat|mon)(-(fri|nov|sun))?",
        "[ -~]{0,6}",
    ];
    prop::collection::vec(atom, 1..4)
        .prop_map(|v| v.join(","))
        .boxed()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn timeline_bounds_never_panic(text in date_text(), now in any_moment()) {
        if let Ok(at) = parse_when(&text, now) {
            // Whatever parses is a UTC time that prints and compares without panicking.
            prop_assert_eq!(at.offset(), time::UtcOffset::UTC);
            let _ = saltpeter_proto::Timestamp::new(at).to_string();
        }
    }

    #[test]
    fn http_query_parsers_never_panic_and_respect_the_caps(
        q in params(),
        limits in limits(),
        now in any_moment(),
    ) {
        if let Ok(t) = query::timeline_query(&q, now, &limits) {
            prop_assert!(t.limit >= 1 && t.limit <= limits.timeline_max_rows);
            prop_assert!(t.end - t.start <= time::Duration::days(limits.timeline_max_days.into()));
        }
        if let Ok(p) = query::runs_page(&q, &limits) {
            prop_assert!(p.limit >= 1 && p.limit <= limits.api_max_runs_page);
        }
        if let Ok(r) = query::byte_range(&q) {
            prop_assert!(i64::try_from(r.offset).is_ok());
            prop_assert!(r.length.is_none_or(|l| i64::try_from(l).is_ok()));
        }
        let _ = query::run_output_query("j_1", &q);
    }

    #[test]
    fn subscriptions_stay_within_the_caps(
        batches in prop::collection::vec(
            prop::collection::vec(
                prop_oneof![
                    8 => "[a-e]{1,3}",
                    1 => "[a-z]".prop_map(|c| c.repeat(query::MAX_NAME_BYTES + 1)),
                ],
                0..12,
            ),
            0..40,
        ),
        limits in limits(),
    ) {
        let mut subs = BTreeMap::new();
        for names in batches {
            if query::admit_subscriptions(&subs, &names, &limits).is_ok() {
                for n in names {
                    subs.entry(n).or_insert_with(BTreeMap::new);
                }
            }
            prop_assert!(subs.len() <= limits.ui_max_subscriptions);
        }
        prop_assert!(subs.keys().all(|k| k.len() <= query::MAX_NAME_BYTES));
    }

    #[test]
    fn ws_commands_never_panic_the_parser(text in "[ -~]{0,64}", json in ws_command()) {
        let _ = parse_command(&text);
        let _ = parse_command(&json);
    }

    #[test]
    fn schedules_parse_and_search_without_panicking(
        fields in prop::array::uniform7(cron_field()),
        tz in prop::option::of(prop::sample::select(vec!["Europe/Berlin", "America/Santiago", "Pacific/Apia", "UTC", "Nowhere/Else"])),
        start in any_moment(),
        span in 0i64..200_000,
    ) {
        let [sec, min, hour, dom, mon, dow, year] = fields;
        let fields = ScheduleFields { sec, min, hour, dom, mon, dow, year };
        if let Ok(schedule) = Schedule::parse(&fields, tz) {
            let _ = schedule.next_after(start);
            let _ = schedule.upcoming(start, 3);
            let _ = schedule.matches(start);
            let _ = schedule.describe();
            let _ = schedule.ensure_fires_after(start);
            if let Some(end) = start.checked_add(time::Duration::seconds(span)) {
                let _ = schedule.due_slots(start, end);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Property tests of the settings and job parsers, through files as the master reads them.

/// A YAML value of every kind, including the extremes a number can be.
fn yaml_value() -> BoxedStrategy<String> {
    let scalar = prop_oneof![
        Just("18446744073709551615".to_owned()),
        Just("18446744073709551616".to_owned()),
        Just("170141183460469231731687303715884105728".to_owned()),
        Just("-9223372036854775808".to_owned()),
        Just("9223372036854775807".to_owned()),
        Just("1e400".to_owned()),
        Just(".nan".to_owned()),
        Just("-.inf".to_owned()),
        Just("0".to_owned()),
        Just("~".to_owned()),
        Just("0o777777777777777777777".to_owned()),
        Just("0x7fffffffffffffff".to_owned()),
        any::<i64>().prop_map(|n| n.to_string()),
        any::<u64>().prop_map(|n| n.to_string()),
        any::<f64>().prop_map(|x| format!("{x:?}")),
        (0u64..100_000_000u64).prop_map(|n| n.to_string()),
        "'[ -&(-~]{0,12}'",
        "(true|false|yes|no|on|off)",
    ];
    prop_oneof![
        4 => scalar.clone(),
        1 => prop::collection::vec(scalar.clone(), 0..4).prop_map(|v| format!("[{}]", v.join(", "))),
        1 => prop::collection::vec(scalar, 0..3)
            .prop_map(|v| {
                let inner: Vec<String> = v.iter().enumerate().map(|(i, s)| format!("k{i}: {s}")).collect();
                format!("{{{}}}", inner.join(", "))
            }),
        1 => Just("{a: {b: {c: [1, {d: 2}]}}}".to_owned()),
    ]
    .boxed()
}

const SETTING_KEYS: [&str; 43] = [
    "logdir",
    "debug",
    "api_ws",
    "api_ws_bind_addr",
    "api_ws_port",
    "api_token",
    "ws_allowed_origins",
    "machines_ws_bind_addr",
    "machines_ws_port",
    "default_saltpeter_server_host",
    "default_wrapper_path",
    "default_wrapper_loglevel",
    "default_wrapper_logdir",
    "elasticsearch",
    "opensearch",
    "elasticsearch_index",
    "opensearch_index",
    "launcher",
    "heartbeat_timeout",
    "data_dir",
    "allow_legacy_wrappers",
    "salt_bin",
    "salt_config_dir",
    "ping_timeout",
    "retention_runs_per_job",
    "retention_days",
    "retention_output_head_bytes",
    "retention_output_tail_bytes",
    "ui_max_subscriptions",
    "ui_max_names_per_command",
    "api_max_runs_page",
    "timeline_max_rows",
    "timeline_max_days",
    "api_tokens",
    "api_public_names",
    "metrics_public",
    "machines_tls",
    "api_tls",
    "tls_cert",
    "tls_key",
    "tls_ca",
    "allow_plaintext",
    "ship_ca",
];

const JOB_KEYS: [&str; 16] = [
    "sec",
    "min",
    "hour",
    "dom",
    "mon",
    "dow",
    "year",
    "timeout",
    "number_of_targets",
    "batch_size",
    "targets",
    "env",
    "use_wrapper",
    "allow_overlap",
    "timezone",
    "target_type",
];

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Every setting, given any value: loading never panics, and what loads is within the
    /// bounds the engine's arithmetic relies on.
    #[test]
    fn settings_take_any_value_without_panicking(
        entries in prop::collection::vec((prop::sample::select(SETTING_KEYS.to_vec()), yaml_value()), 1..12),
    ) {
        let block: String = entries.iter().map(|(k, v)| format!("  {k}: {v}\n")).collect();
        let config = load(&[("s.yaml", &format!("saltpeter_config:\n{block}"))]);
        let s = &config.settings;
        let day = Duration::from_secs(86_400);
        prop_assert!(s.heartbeat_timeout >= Duration::from_secs(1) && s.heartbeat_timeout <= day);
        prop_assert!(s.ping_timeout >= Duration::from_secs(1) && s.ping_timeout <= day);
        prop_assert!((1..=36_500).contains(&s.retention_days));
        prop_assert!(i64::try_from(s.retention_runs_per_job).is_ok());
        let l = s.limits;
        prop_assert!(l.ui_max_subscriptions >= 1 && l.ui_max_names_per_command >= 1);
        prop_assert!(l.api_max_runs_page >= 1 && l.timeline_max_rows >= 1);
        prop_assert!((1..=36_500).contains(&l.timeline_max_days));
        let a = &s.access;
        prop_assert!(a.tokens.len() <= saltpeter_config::access::MAX_TOKENS);
        prop_assert!(a.public_names.len() <= saltpeter_config::access::MAX_PUBLIC_NAMES);
        prop_assert!(a.tokens.iter().all(|t| saltpeter_config::access::check_name(&t.name).is_ok()));
        // The sums the engine and the launcher compute.
        let now = tokio::time::Instant::now();
        let _ = now + s.heartbeat_timeout;
        let _ = s.ping_timeout + Duration::from_secs(60);
    }

    /// Any `Host` header, against any bind address: the check answers and never panics, and
    /// a name that is not loopback, not listed and not an address is refused.
    #[test]
    fn host_checks_take_any_text(host in ".{0,80}", bound in any::<bool>()) {
        let local: std::net::SocketAddr = if bound { "0.0.0.0:8888" } else { "127.0.0.1:8888" }
            .parse()
            .unwrap();
        let names = vec!["cron.example.net".to_owned()];
        let allowed = saltpeter_web::ui::auth::host_allowed(&host, local, &names);
        if host.contains("attacker") && !host.starts_with('[') {
            prop_assert!(!allowed, "{host:?}");
        }
    }

    /// Every job key, given any value: loading never panics, and a loaded job's timeout is
    /// one the monitor can add to an instant.
    #[test]
    fn jobs_take_any_value_without_panicking(
        entries in prop::collection::vec((prop::sample::select(JOB_KEYS.to_vec()), yaml_value()), 0..8),
    ) {
        let block: String = entries.iter().map(|(k, v)| format!("  {k}: {v}\n")).collect();
        let config = load(&[("jobs.yaml", &format!("j:\n{MINIMAL}{block}"))]);
        for job in config.jobs.values() {
            if let Some(t) = job.timeout {
                prop_assert!(t.as_secs() <= MAX_TIMEOUT_SECS);
                let _ = tokio::time::Instant::now() + t + saltpeter_proto::TIMEOUT_GRACE;
            }
            let _ = job.schedule.next_after(OffsetDateTime::now_utc());
            let _ = job.ui_json();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// End to end: a running master refuses bad requests and carries on.

fn jobs() -> String {
    support::job("j", "[m1]", "") + &support::job("idle", "[m1]", "")
}

/// One HTTP/1.1 GET; returns status and body. A handler that panics closes the connection
/// without an answer, which fails here.
async fn get(r: &Running, path: &str) -> (u16, String) {
    let answer = raw::request(r.api_addr, "GET", path, &[]).await;
    (answer.status, answer.body)
}

async fn ws(r: &Running) -> Ws {
    raw::ws_with(r.api_addr, "", &[]).await.unwrap()
}

#[tokio::test]
async fn http_queries_out_of_range_are_400s_and_the_master_carries_on() {
    let (r, _l, _d) = support::start_server("", &jobs()).await;
    for path in [
        // Used to overflow `OffsetDateTime + Duration` in the handler.
        "/timeline?start_date=now-99999999999d",
        "/api/v1/timeline?end_date=now%2B3000000d",
        "/timeline?start_date=9999-12-31T23:59:59-23:59",
        // Used to pass `limit as i64 == -1` to SQLite, which means "no limit".
        "/timeline?limit=18446744073709551615",
        "/timeline?limit=5001",
        "/timeline?start_date=now-401d",
        "/api/v1/jobs/j/runs?limit=501",
        "/api/v1/jobs/j/runs?limit=0",
        "/api/v1/jobs/j/runs?limit=x",
        // Used to be cast to a negative SQLite offset.
        "/api/v1/runs/j_1/machines/m1/output?offset=9223372036854775808",
        "/api/v1/runs/j_1/machines/m1/output?length=18446744073709551615",
    ] {
        let (status, body) = get(&r, path).await;
        assert_eq!(status, 400, "{path}: {body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        assert!(
            v["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{path}: {body}"
        );
    }
    assert_eq!(get(&r, "/timeline?limit=5000").await.0, 200);
    assert_eq!(get(&r, "/api/v1/jobs/j/runs?limit=500").await.0, 200);
    assert_eq!(get(&r, "/api/v1/jobs").await.0, 200);
}

#[tokio::test]
async fn a_ws_connection_cannot_subscribe_beyond_its_caps() {
    let settings = "  ui_max_subscriptions: 4\n  ui_max_names_per_command: 3\n";
    let (r, _l, _d) = support::start_server(settings, &jobs()).await;
    let mut ws = ws(&r).await;
    assert_eq!(recv(&mut ws).await["type"], "config");
    send(&mut ws, r#"{"subscribe":["a","b","c","d"]}"#).await;
    let e = recv_type(&mut ws, "error").await;
    assert_eq!(e["command"], "subscribe");
    assert!(
        e["error"]
            .as_str()
            .unwrap()
            .contains("ui_max_names_per_command"),
        "{e}"
    );
    send(&mut ws, r#"{"subscribe":["a","b","j"]}"#).await;
    assert_eq!(recv_type(&mut ws, "details").await["cron"], "j");
    send(&mut ws, r#"{"subscribe":["x","y"]}"#).await;
    let e = recv_type(&mut ws, "error").await;
    assert!(
        e["error"]
            .as_str()
            .unwrap()
            .contains("ui_max_subscriptions"),
        "{e}"
    );
    let long = "n".repeat(query::MAX_NAME_BYTES + 1);
    send(&mut ws, &json!({ "subscribe": long }).to_string()).await;
    assert_eq!(recv_type(&mut ws, "error").await["command"], "subscribe");
    // Room is made by unsubscribing; re-subscribing to a held name costs nothing.
    send(&mut ws, r#"{"unsubscribe":["a","b"]}"#).await;
    send(&mut ws, r#"{"subscribe":["x","y","j"]}"#).await;
    assert_eq!(recv_type(&mut ws, "details").await["cron"], "j");
    // A timeline window out of range is an error reply, and the connection carries on.
    send(
        &mut ws,
        r#"{"getTimeline":{"start_date":"now-99999999999d","end_date":"now","id":"1"}}"#,
    )
    .await;
    assert_eq!(recv_type(&mut ws, "error").await["command"], "getTimeline");
    send(
        &mut ws,
        r#"{"getTimeline":{"start_date":"now-1d","end_date":"now","id":"2"}}"#,
    )
    .await;
    assert_eq!(recv_type(&mut ws, "timeline").await["timeline"]["id"], "2");
}

/// A value of any JSON kind, extremes included.
fn json_value() -> BoxedStrategy<Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        Just(json!(u64::MAX)),
        Just(json!(-1)),
        Just(json!(1e308)),
        Just(json!(0.5)),
        date_text().prop_map(Value::from),
        prop::sample::select(vec!["j", "idle", "m1", "j_1", "nope", ""]).prop_map(Value::from),
        "[ -~]{0,12}".prop_map(Value::from),
    ];
    leaf.prop_recursive(2, 64, 40, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..40).prop_map(Value::from),
            prop::collection::btree_map(
                prop::sample::select(vec![
                    "cron",
                    "machine",
                    "position",
                    "job_instance",
                    "start_date",
                    "end_date",
                    "id",
                    "x",
                ])
                .prop_map(str::to_owned),
                inner,
                0..7,
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
    .boxed()
}

/// One `/ws` command: a known key (or not) with an arbitrary argument.
fn ws_command() -> impl Strategy<Value = String> {
    let key = prop::sample::select(vec![
        "subscribe",
        "unsubscribe",
        "ack",
        "run",
        "killCron",
        "killMachine",
        "getTimeline",
        "other",
    ]);
    let any = (key, json_value()).prop_map(|(k, v)| json!({ k: v }).to_string());
    // Well-formed commands with hostile values, so the executing code is reached often.
    let timeline = (date_text(), date_text(), json_value()).prop_map(|(start, end, id)| {
        json!({ "getTimeline": { "start_date": start, "end_date": end, "id": id } }).to_string()
    });
    let names = prop::collection::vec(
        prop_oneof![
            Just("j".to_owned()),
            "[a-z]{1,4}",
            "[a-z]".prop_map(|c| c.repeat(1100))
        ],
        0..30,
    );
    let subscribe = (
        prop::sample::select(vec!["subscribe", "unsubscribe"]),
        names,
    )
        .prop_map(|(k, v)| json!({ k: v }).to_string());
    let kill = (json_value(), json_value(), json_value()).prop_map(|(c, m, i)| {
        json!({ "killMachine": { "cron": c, "machine": m, "job_instance": i } }).to_string()
    });
    prop_oneof![3 => any, 2 => timeline, 2 => subscribe, 1 => kill]
}

/// Arbitrary commands over one connection: after each, the connection still answers a
/// `getTimeline` (so its task did not die), and at the end the HTTP API still answers (so
/// the engine did not either).
#[test]
fn ws_connections_survive_arbitrary_commands() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (r, _l, _d) = rt.block_on(support::start_server(
        "  ui_max_subscriptions: 16\n  ui_max_names_per_command: 8\n",
        &jobs(),
    ));
    let socket = RefCell::new(rt.block_on(ws(&r)));
    let count = RefCell::new(0u64);
    let mut runner = TestRunner::new(RunnerConfig {
        cases: 256,
        failure_persistence: None,
        ..RunnerConfig::default()
    });
    runner
        .run(&ws_command(), |command| {
            let mut ws = socket.borrow_mut();
            let mut n = count.borrow_mut();
            *n += 1;
            let id = format!("probe-{n}");
            rt.block_on(async {
                send(&mut ws, &command).await;
                let probe = json!({
                    "getTimeline": { "start_date": "now-1h", "end_date": "now", "id": id }
                });
                send(&mut ws, &probe.to_string()).await;
                loop {
                    let m = recv(&mut ws).await;
                    if m["type"] == "timeline" && m["timeline"]["id"] == id.as_str() {
                        break;
                    }
                }
            });
            Ok(())
        })
        .unwrap();
    assert_eq!(rt.block_on(get(&r, "/api/v1/jobs")).0, 200);
    let (status, body) = rt.block_on(get(&r, "/api/v1/overview"));
    assert_eq!(status, 200, "{body}");
    drop(socket);
    rt.block_on(async {
        r.shutdown.cancel();
    });
    drop(r);
    rt.shutdown_timeout(Duration::from_secs(5));
}

#[test]
fn a_schedule_search_from_the_first_representable_moment_does_not_panic() {
    // `next_after` used to subtract a day from its argument unchecked when the year field is
    // not `*`, which panics at the start of the calendar.
    let schedule = Schedule::parse_line("0 0 0 1 1 * 2030", None).unwrap();
    let first = time::PrimitiveDateTime::MIN.assume_utc();
    let _ = schedule.next_after(first);
    let _ = schedule.due_slots(first, first + time::Duration::DAY);
}

#[test]
fn deeply_nested_yaml_is_an_error_not_a_stack_overflow() {
    // The parser's default budgets allowed 64 block and 255 flow levels, which overflowed a
    // 2 MiB stack (an abort, whatever the panic strategy) at about 50 in a debug build.
    for depth in [60, 64, 1_000, 100_000] {
        let flow = format!("j: {}{}\n", "[".repeat(depth), "]".repeat(depth));
        let block: String = (0..depth.min(2_000))
            .map(|i| format!("{}k:\n", " ".repeat(i)))
            .collect();
        for text in [flow, block] {
            let config = load(&[("jobs.yaml", &text)]);
            let errors = error_lines(&config);
            assert!(
                errors.iter().any(|e| e.contains("jobs.yaml")),
                "{depth}: {errors:?}"
            );
        }
    }
}

#[test]
fn deeply_nested_ws_commands_are_errors_not_a_stack_overflow() {
    for depth in [100, 127, 128, 129, 100_000] {
        let text = format!(
            "{{\"subscribe\":{}{}}}",
            "[".repeat(depth),
            "]".repeat(depth)
        );
        assert!(parse_command(&text).is_err(), "{depth}");
    }
}

#[tokio::test]
async fn extreme_sequence_numbers_and_exit_codes_from_a_wrapper_are_handled() {
    let h = support::Harness::start(&support::job("j", "[m1]", "")).await;
    let instance = h.run("j").await;
    let mut w = h.wrapper(&instance, "m1").await;
    w.connect_and_start().await;
    assert!(matches!(
        w.output(u64::MAX, "far ahead").await,
        support::Reply::Nack {
            expected: 0,
            received: u64::MAX
        }
    ));
    assert!(matches!(w.output(0, "first").await, support::Reply::Ack(0)));
    assert!(matches!(
        w.output(u64::MAX - 1, "still ahead").await,
        support::Reply::Nack { expected: 1, .. }
    ));
    w.complete(i64::MIN).await;
    let view = h.run_view(&instance).await;
    assert_eq!(view["machines"]["m1"]["retcode"], i64::MIN, "{view}");
}

/// Percent-encodes everything but unreserved characters, so any text fits a query string.
fn encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                char::from(b).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Every read-only route with hostile path segments and query parameters: each request gets
/// an answer (a handler that panicked would close the connection without one), and nothing
/// but a 2xx, 400 or 404 comes back.
#[test]
fn http_routes_answer_arbitrary_queries() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (r, _l, _d) = rt.block_on(support::start_server("", &jobs()));
    // The timeline routes are the ones with time arithmetic behind them: weighted up.
    let route = prop_oneof![
        3 => Just("/timeline"),
        3 => Just("/api/v1/timeline"),
        1 => Just("/api/v1/jobs/{}/runs"),
        1 => Just("/api/v1/runs/{}"),
        1 => Just("/api/v1/runs/{}/output"),
        1 => Just("/api/v1/runs/{}/machines/m1/output"),
        1 => Just("/running"),
        1 => Just("/config"),
        1 => Just("/api/v1/overview"),
    ];
    let segment = prop_oneof![Just("j".to_owned()), Just("j_1".to_owned()), "[ -~]{0,12}",];
    let mut runner = TestRunner::new(RunnerConfig {
        cases: 256,
        failure_persistence: None,
        ..RunnerConfig::default()
    });
    runner
        .run(&(route, segment, params()), |(route, segment, q)| {
            let query: Vec<String> = q
                .iter()
                .map(|(k, v)| format!("{}={}", encode(k), encode(v)))
                .collect();
            let path = format!(
                "{}?{}",
                route.replace("{}", &encode(&segment)),
                query.join("&")
            );
            let (status, body) = rt.block_on(get(&r, &path));
            prop_assert!(
                (200..300).contains(&status) || status == 400 || status == 404,
                "{} -> {} {}",
                path,
                status,
                body
            );
            Ok(())
        })
        .unwrap();
    assert_eq!(rt.block_on(get(&r, "/api/v1/jobs")).0, 200);
    rt.block_on(async {
        r.shutdown.cancel();
    });
    drop(r);
    rt.shutdown_timeout(Duration::from_secs(5));
}
