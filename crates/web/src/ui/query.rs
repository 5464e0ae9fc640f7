//! What API and UI clients ask for, checked at the boundary: the query parameters of the HTTP
//! paths (timeline windows and row limits, output positions, pages of runs, byte ranges) and
//! the subscriptions of a `/ws` connection.
//!
//! Everything here is a plain function of text and the configured [`Limits`], so it can be
//! tested (and fed arbitrary input) without a server. A request outside the bounds is a
//! [`QueryError`], which the HTTP handlers answer with a 400 and the `/ws` task with an `error`
//! message; nothing a client sends reaches the time arithmetic, the store or a connection's
//! memory unchecked.
// Input from clients, files or wrappers reaches arithmetic here, so every operation that could
// overflow or index out of bounds is written checked ("Totality" in docs/ARCHITECTURE.md).
#![warn(
    clippy::arithmetic_side_effects,
    clippy::indexing_slicing,
    clippy::string_slice
)]

use std::collections::{BTreeMap, HashMap};

use time::OffsetDateTime;

use super::messages::parse_when;
use saltpeter_config::Limits;
use saltpeter_engine::{OutputCursor, RunOutputQuery};
use saltpeter_store::TimelineQuery;

/// Why a request was refused; the message is shown to the client as is.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct QueryError(pub String);

/// Rows of `/timeline` and `/api/v1/timeline` when the request names no `limit` (fewer when
/// `timeline_max_rows` is lower).
pub(crate) const TIMELINE_DEFAULT_ROWS: usize = 2000;

/// Runs of `GET /api/v1/jobs/{job}/runs` when the request names no `limit`.
pub(crate) const RUNS_DEFAULT_PAGE: usize = 20;

/// The longest job name a `/ws` connection may subscribe to. Subscriptions live as long as
/// the connection, so their count ([`Limits::ui_max_subscriptions`]) and their size both need
/// a bound; job names are YAML keys, and none in practice comes near this.
pub const MAX_NAME_BYTES: usize = 1024;

/// A timeline window: both bounds parsed with [`parse_when`], spanning at most
/// `timeline_max_days`. A window whose end precedes its start is allowed (and empty).
pub(crate) fn timeline_window(
    start: &str,
    end: &str,
    now: OffsetDateTime,
    limits: &Limits,
) -> Result<(OffsetDateTime, OffsetDateTime), QueryError> {
    let start_at = parse_when(start, now).map_err(|e| QueryError(format!("start_date: {e}")))?;
    let end_at = parse_when(end, now).map_err(|e| QueryError(format!("end_date: {e}")))?;
    // When `start + max` is past the calendar's end, no `end` can be further away than that.
    let max_days = limits.timeline_max_days;
    let latest = start_at.checked_add(time::Duration::days(i64::from(max_days)));
    if latest.is_some_and(|latest| end_at > latest) {
        return Err(QueryError(format!(
            "the window from start_date to end_date is longer than {max_days} days \
             (timeline_max_days)"
        )));
    }
    Ok((start_at, end_at))
}

/// A row limit in `1..=max`, named `key` in errors; `default` when absent (capped at `max`).
fn bounded_count(
    value: Option<&str>,
    key: &str,
    default: usize,
    max: usize,
    setting: &str,
) -> Result<usize, QueryError> {
    let Some(text) = value else {
        return Ok(default.min(max));
    };
    match text.trim().parse::<u64>() {
        Ok(0) => Err(QueryError(format!("{key} must be at least 1"))),
        Ok(n) if usize::try_from(n).is_ok_and(|n| n <= max) => {
            Ok(usize::try_from(n).unwrap_or(max))
        }
        Ok(_) => Err(QueryError(format!(
            "{key} must be at most {max} ({setting})"
        ))),
        Err(_) => Err(QueryError(format!("{key} must be a whole number"))),
    }
}

/// The parameters of `GET /timeline` and `GET /api/v1/timeline`: `start_date` (default
/// `now-1d`), `end_date` (default `now`), `limit`, `job`.
pub fn timeline_query(
    params: &HashMap<String, String>,
    now: OffsetDateTime,
    limits: &Limits,
) -> Result<TimelineQuery, QueryError> {
    let text = |key: &str, default: &'static str| params.get(key).map_or(default, String::as_str);
    let (start, end) = timeline_window(
        text("start_date", "now-1d"),
        text("end_date", "now"),
        now,
        limits,
    )?;
    let limit = bounded_count(
        params.get("limit").map(String::as_str),
        "limit",
        TIMELINE_DEFAULT_ROWS,
        limits.timeline_max_rows,
        "timeline_max_rows",
    )?;
    Ok(TimelineQuery {
        start,
        end,
        job: params.get("job").cloned(),
        limit,
    })
}

/// The parameters of `GET /api/v1/runs/{instance}/output`: `from=m1:120,m2:0` (UTF-16
/// positions per machine), `machine`, `max_bytes` (0 or absent: the engine's default).
///
/// The `from` list has no cap of its own: a dashboard following a run sends one entry per
/// machine, and the request head that carries it is already bounded by the HTTP server.
pub fn run_output_query(
    instance: &str,
    params: &HashMap<String, String>,
) -> Result<RunOutputQuery, QueryError> {
    let mut from = BTreeMap::new();
    for part in params.get("from").into_iter().flat_map(|f| f.split(',')) {
        if part.is_empty() {
            continue;
        }
        let parsed = part
            .rsplit_once(':')
            .and_then(|(m, p)| Some((m.to_owned(), p.parse::<u64>().ok()?)));
        match parsed {
            Some((m, p)) => {
                from.insert(m, p);
            }
            None => {
                return Err(QueryError(format!(
                    "from: expected machine:position, got {part:?}"
                )));
            }
        }
    }
    let max_bytes = match params.get("max_bytes").map(|v| v.parse::<usize>()) {
        None => 0,
        Some(Ok(n)) => n,
        Some(Err(_)) => return Err(QueryError("max_bytes must be a whole number".into())),
    };
    Ok(RunOutputQuery {
        instance: instance.to_owned(),
        from,
        machine: params.get("machine").cloned(),
        max_bytes,
    })
}

/// One page of a job's runs: `before` (an RFC 3339 `started` of the previous page) and `limit`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunsPage {
    pub before: Option<String>,
    pub limit: usize,
}

/// The parameters of `GET /api/v1/jobs/{job}/runs`: `limit` in `1..=api_max_runs_page`
/// (default 20), `before` passed on as text (it is only compared with stored times).
pub fn runs_page(
    params: &HashMap<String, String>,
    limits: &Limits,
) -> Result<RunsPage, QueryError> {
    let limit = bounded_count(
        params.get("limit").map(String::as_str),
        "limit",
        RUNS_DEFAULT_PAGE,
        limits.api_max_runs_page,
        "api_max_runs_page",
    )?;
    Ok(RunsPage {
        before: params.get("before").cloned(),
        limit,
    })
}

/// A page of the audit trail: entries with an id below `before`, at most `limit`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AuditPage {
    pub before: Option<i64>,
    pub limit: usize,
}

/// The parameters of `GET /api/v1/audit`: `before` (an entry id) and `limit` (default
/// 100, at most `api_max_runs_page`).
pub fn audit_page(
    params: &HashMap<String, String>,
    limits: &Limits,
) -> Result<AuditPage, QueryError> {
    let limit = bounded_count(
        params.get("limit").map(String::as_str),
        "limit",
        saltpeter_store::audit::DEFAULT_PAGE,
        limits.api_max_runs_page,
        "api_max_runs_page",
    )?;
    let before = match params.get("before") {
        None => None,
        Some(text) => Some(text.trim().parse::<i64>().map_err(|_| {
            QueryError("before must be the whole-number id of an audit entry".to_owned())
        })?),
    };
    Ok(AuditPage { before, limit })
}

/// A byte range of a machine's stored output: `offset` (default 0) and `length` (default: to
/// the end).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ByteRange {
    pub offset: u64,
    pub length: Option<u64>,
}

/// The parameters of `GET /api/v1/runs/{instance}/machines/{machine}/output`. Both numbers
/// must fit a signed 64-bit integer, the store's position type, so that nothing downstream
/// has to reinterpret them.
pub fn byte_range(params: &HashMap<String, String>) -> Result<ByteRange, QueryError> {
    let number = |key: &str| -> Result<Option<u64>, QueryError> {
        let Some(text) = params.get(key) else {
            return Ok(None);
        };
        text.trim()
            .parse::<i64>()
            .ok()
            .and_then(|n| u64::try_from(n).ok())
            .map(Some)
            .ok_or_else(|| {
                QueryError(format!(
                    "{key} must be a whole number from 0 to {}",
                    i64::MAX
                ))
            })
    };
    Ok(ByteRange {
        offset: number("offset")?.unwrap_or(0),
        length: number("length")?,
    })
}

/// Checks a `subscribe` before anything is added: at most `ui_max_names_per_command` names,
/// none longer than [`MAX_NAME_BYTES`], and at most `ui_max_subscriptions` in all once they
/// are added. All or nothing, so a refused command leaves the connection as it was.
pub fn admit_subscriptions(
    subs: &BTreeMap<String, BTreeMap<String, OutputCursor>>,
    names: &[String],
    limits: &Limits,
) -> Result<(), QueryError> {
    check_names(names, limits)?;
    let max = limits.ui_max_subscriptions;
    let new = names
        .iter()
        .filter(|n| !subs.contains_key(*n))
        .collect::<std::collections::BTreeSet<_>>()
        .len();
    if subs.len().saturating_add(new) > max {
        return Err(QueryError(format!(
            "at most {max} subscriptions per connection (ui_max_subscriptions); this one has {} \
             and the command adds {new}",
            subs.len()
        )));
    }
    Ok(())
}

/// Checks the names one `subscribe` or `unsubscribe` carries.
pub(crate) fn check_names(names: &[String], limits: &Limits) -> Result<(), QueryError> {
    let max = limits.ui_max_names_per_command;
    if names.len() > max {
        return Err(QueryError(format!(
            "at most {max} names per command (ui_max_names_per_command), got {}",
            names.len()
        )));
    }
    if names.iter().any(|n| n.len() > MAX_NAME_BYTES) {
        return Err(QueryError(format!(
            "a job name is at most {MAX_NAME_BYTES} bytes long"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    const NOW: OffsetDateTime = time::macros::datetime!(2026-06-01 12:00 UTC);

    #[test]
    fn timeline_bounds_that_overflow_the_calendar_are_errors() {
        let limits = Limits::default();
        for (start, end) in [
            ("now-99999999999d", "now"),
            ("now-9223372036854775807s", "now"),
            ("now", "now+9223372036854775807w"),
            ("now+5000000d", "now+5000001d"),
            ("9999-12-31T23:59:59-23:59", "now"),
        ] {
            let q = params(&[("start_date", start), ("end_date", end)]);
            let e = timeline_query(&q, NOW, &limits).expect_err(start);
            assert!(e.0.contains("_date"), "{start} {end}: {e}");
        }
    }

    #[test]
    fn timeline_windows_and_limits_are_capped_by_the_settings() {
        let limits = Limits {
            timeline_max_rows: 10,
            timeline_max_days: 2,
            ..Limits::default()
        };
        let q = |pairs: &[(&str, &str)]| timeline_query(&params(pairs), NOW, &limits);
        assert_eq!(q(&[]).map(|t| t.limit), Ok(10));
        assert_eq!(q(&[("limit", "3")]).map(|t| t.limit), Ok(3));
        for bad in ["0", "11", "-1", "18446744073709551616", "x"] {
            assert!(q(&[("limit", bad)]).is_err(), "{bad}");
        }
        assert!(q(&[("start_date", "now-2d")]).is_ok());
        let e = q(&[("start_date", "now-3d")]).expect_err("too long");
        assert!(e.0.contains("timeline_max_days"), "{e}");
        // Backwards windows are empty, not an error.
        assert!(q(&[("start_date", "now+1d"), ("end_date", "now-30d")]).is_ok());
    }

    #[test]
    fn runs_pages_are_capped() {
        let limits = Limits::default();
        let page = |l: &str| runs_page(&params(&[("limit", l)]), &limits).map(|p| p.limit);
        assert_eq!(runs_page(&params(&[]), &limits).map(|p| p.limit), Ok(20));
        assert_eq!(page("500"), Ok(500));
        for bad in ["0", "501", "18446744073709551615", "-3", ""] {
            assert!(page(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn byte_ranges_must_fit_the_store() {
        let r = |pairs: &[(&str, &str)]| byte_range(&params(pairs));
        assert_eq!(
            r(&[("offset", "5"), ("length", "9223372036854775807")]),
            Ok(ByteRange {
                offset: 5,
                length: Some(i64::MAX as u64)
            })
        );
        for bad in ["9223372036854775808", "18446744073709551615", "-1", "1e3"] {
            assert!(r(&[("offset", bad)]).is_err(), "{bad}");
            assert!(r(&[("length", bad)]).is_err(), "{bad}");
        }
    }

    #[test]
    fn subscriptions_are_admitted_all_or_nothing() {
        let limits = Limits {
            ui_max_subscriptions: 3,
            ui_max_names_per_command: 2,
            ..Limits::default()
        };
        let mut subs = BTreeMap::new();
        subs.insert("a".to_owned(), BTreeMap::new());
        subs.insert("b".to_owned(), BTreeMap::new());
        let names = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        assert!(admit_subscriptions(&subs, &names(&["a", "c"]), &limits).is_ok());
        assert!(admit_subscriptions(&subs, &names(&["c", "c"]), &limits).is_ok());
        let e = admit_subscriptions(&subs, &names(&["c", "d"]), &limits).expect_err("over");
        assert!(e.0.contains("ui_max_subscriptions"), "{e}");
        let e = admit_subscriptions(&subs, &names(&["a", "b", "c"]), &limits).expect_err("many");
        assert!(e.0.contains("ui_max_names_per_command"), "{e}");
        let long = "x".repeat(MAX_NAME_BYTES + 1);
        assert!(admit_subscriptions(&BTreeMap::new(), &[long], &limits).is_err());
    }
}
