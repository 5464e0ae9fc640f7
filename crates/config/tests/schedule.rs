//! Schedule semantics: the original's cron grammar, croner as the engine, DST in a time zone, and
//! the "fire each slot once" scheduler helper.
//!
//! The property tests compare `Schedule` against a naive matcher written here from the grammar
//! (docs/COMPATIBILITY.md, "Schedules"), evaluated per value instead of expanding fields, and against a brute-force
//! search over seconds in UTC.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use proptest::prelude::*;
use saltpeter_config::schedule::{Field, Schedule, ScheduleError, ScheduleFields};
use time::macros::datetime;
use time::{Duration, OffsetDateTime};

// ---------------------------------------------------------------------------------------------
// A naive matcher, straight from the grammar.

const BOUNDS: [(u32, u32); 7] = [
    (0, 59),
    (0, 59),
    (0, 23),
    (1, 31),
    (1, 12),
    (0, 6),
    (1970, 2099),
];
const MONTHS: [&str; 12] = [
    "jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec",
];
const DAYS: [&str; 7] = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"];

fn naive_number(idx: usize, text: &str) -> u32 {
    if idx == 4
        && let Some(i) = MONTHS.iter().position(|m| *m == text)
    {
        return i as u32 + 1;
    }
    if idx == 5
        && let Some(i) = DAYS.iter().position(|d| *d == text)
    {
        return i as u32;
    }
    text.parse().expect("generated fields are valid")
}

/// Does `value` satisfy field `idx` written as `text`? `day`/`month_len` serve `L` items.
fn naive_field(idx: usize, text: &str, value: u32, day: u32, month_len: u32) -> bool {
    let (min, max) = BOUNDS[idx];
    let norm = |v: u32| if idx == 5 { v % 7 } else { v };
    text.to_ascii_lowercase().split(',').any(|item| {
        if item == "*" || item == "?" {
            return true;
        }
        if item == "l" {
            return day == month_len;
        }
        if let Some(rest) = item.strip_prefix('l') {
            let (a, b) = rest.split_once('-').unwrap_or((rest, rest));
            let (a, b): (u32, u32) = (a.parse().unwrap(), b.parse().unwrap());
            return day + 7 > month_len && (a..=b).any(|d| d % 7 == value);
        }
        let (piece, step) = match item.split_once('/') {
            Some((p, s)) => (p, Some(s.parse::<u32>().unwrap())),
            None => (item, None),
        };
        let (start, end) = if piece == "*" {
            (min, max)
        } else if let Some((a, b)) = piece.split_once('-') {
            let mut end = naive_number(idx, b);
            if idx == 5 && end == 0 {
                end = 7;
            }
            (naive_number(idx, a), end)
        } else if step.is_none() {
            return norm(naive_number(idx, piece)) == value;
        } else {
            (naive_number(idx, piece), max)
        };
        (start..=end)
            .step_by(step.unwrap_or(1) as usize)
            .any(|v| norm(v) == value)
    })
}

fn days_in_month(t: OffsetDateTime) -> u32 {
    u32::from(t.month().length(t.year()))
}

fn naive_date_matches(f: &[String; 7], t: OffsetDateTime) -> bool {
    let day = u32::from(t.day());
    let ml = days_in_month(t);
    naive_field(3, &f[3], day, day, ml)
        && naive_field(4, &f[4], u32::from(u8::from(t.month())), day, ml)
        && naive_field(
            5,
            &f[5],
            u32::from(t.weekday().number_days_from_sunday()),
            day,
            ml,
        )
        && naive_field(6, &f[6], t.year() as u32, day, ml)
}

fn naive_matches(f: &[String; 7], t: OffsetDateTime) -> bool {
    let (day, ml) = (u32::from(t.day()), days_in_month(t));
    naive_date_matches(f, t)
        && naive_field(2, &f[2], u32::from(t.hour()), day, ml)
        && naive_field(1, &f[1], u32::from(t.minute()), day, ml)
        && naive_field(0, &f[0], u32::from(t.second()), day, ml)
}

/// The first naive match strictly after `after` and not after `limit`, in UTC. Whole days and
/// hours whose date/hour fields do not match are skipped, which cannot skip a match.
fn brute_next(
    f: &[String; 7],
    after: OffsetDateTime,
    limit: OffsetDateTime,
) -> Option<OffsetDateTime> {
    let mut t = after.replace_nanosecond(0).unwrap() + Duration::SECOND;
    while t <= limit {
        let (day, ml) = (u32::from(t.day()), days_in_month(t));
        if !naive_date_matches(f, t) {
            t = t.replace_time(time::Time::MIDNIGHT) + Duration::DAY;
        } else if !naive_field(2, &f[2], u32::from(t.hour()), day, ml) {
            t = t.replace_minute(0).unwrap().replace_second(0).unwrap() + Duration::HOUR;
        } else if !naive_field(1, &f[1], u32::from(t.minute()), day, ml) {
            t = t.replace_second(0).unwrap() + Duration::MINUTE;
        } else if naive_field(0, &f[0], u32::from(t.second()), day, ml) {
            return Some(t);
        } else {
            t += Duration::SECOND;
        }
    }
    None
}

// ---------------------------------------------------------------------------------------------
// Generators of valid fields.

/// A valid item for field `idx` (no list).
fn item(idx: usize) -> BoxedStrategy<String> {
    let (min, max) = BOUNDS[idx];
    let limit = if idx == 5 { 7 } else { max };
    let single = (min..=limit).prop_map(|v| v.to_string());
    let range = (min..=limit, min..=limit).prop_map(move |(a, b)| {
        let (a, b) = (a.min(b), a.max(b));
        format!("{a}-{b}")
    });
    let star_step = (1..=(limit - min).max(1)).prop_map(|n| format!("*/{n}"));
    let range_step = (min..=limit, min..=limit, 1u32..=20).prop_filter_map(
        "step must stay in range",
        move |(a, b, n)| {
            let (a, b) = (a.min(b), a.max(b));
            (a + n <= limit).then(|| format!("{a}-{b}/{n}"))
        },
    );
    let from_step = (min..=limit, 1u32..=20)
        .prop_filter_map("step must stay in range", move |(a, n)| {
            (a + n <= limit).then(|| format!("{a}/{n}"))
        });
    let mut options = vec![
        single.boxed(),
        range.boxed(),
        star_step.boxed(),
        range_step.boxed(),
        from_step.boxed(),
    ];
    match idx {
        3 => options.push(Just("L".to_owned()).boxed()),
        4 => options.push((0usize..12).prop_map(|i| MONTHS[i].to_uppercase()).boxed()),
        5 => {
            options.push((0usize..7).prop_map(|i| DAYS[i].to_owned()).boxed());
            options.push((0u32..=7).prop_map(|d| format!("L{d}")).boxed());
            options.push(Just("sat-sun".to_owned()).boxed());
        }
        _ => {}
    }
    proptest::strategy::Union::new(options).boxed()
}

/// A valid field: `*` often (so schedules fire), otherwise one or two items.
fn field(idx: usize) -> BoxedStrategy<String> {
    if idx == 6 {
        // Years around the test window, or any year.
        return prop_oneof![
            3 => Just("*".to_owned()),
            1 => (2020u32..2040, 0u32..5).prop_map(|(a, n)| format!("{a}-{}", a + n)),
            1 => (2020u32..2040).prop_map(|a| a.to_string()),
        ]
        .boxed();
    }
    let star = if matches!(idx, 3 | 5) {
        prop_oneof![Just("*".to_owned()), Just("?".to_owned())].boxed()
    } else {
        Just("*".to_owned()).boxed()
    };
    prop_oneof![
        2 => star,
        2 => item(idx),
        1 => (item(idx), item(idx)).prop_map(|(a, b)| format!("{a},{b}")),
    ]
    .boxed()
}

fn fields() -> impl Strategy<Value = [String; 7]> {
    (
        field(0),
        field(1),
        field(2),
        field(3),
        field(4),
        field(5),
        field(6),
    )
        .prop_map(|(a, b, c, d, e, f, g)| [a, b, c, d, e, f, g])
}

fn to_fields(f: &[String; 7]) -> ScheduleFields {
    ScheduleFields {
        sec: f[0].clone(),
        min: f[1].clone(),
        hour: f[2].clone(),
        dom: f[3].clone(),
        mon: f[4].clone(),
        dow: f[5].clone(),
        year: f[6].clone(),
    }
}

/// A moment between 2020 and 2036, with a sub-second part.
fn moment() -> impl Strategy<Value = OffsetDateTime> {
    (1_577_836_800i64..2_082_758_400, 0u32..1_000_000_000).prop_map(|(s, ns)| {
        OffsetDateTime::from_unix_timestamp(s).unwrap() + Duration::nanoseconds(i64::from(ns))
    })
}

fn utc(line: &str) -> Schedule {
    Schedule::parse_line(line, None).unwrap_or_else(|e| panic!("{line:?}: {e}"))
}

fn in_zone(line: &str, tz: &str) -> Schedule {
    Schedule::parse_line(line, Some(tz)).unwrap_or_else(|e| panic!("{line:?}: {e}"))
}

fn rfc(t: OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 192, ..ProptestConfig::default() })]

    /// next_after is strictly later, a whole second, and matches both matchers.
    #[test]
    fn next_is_later_and_matches(f in fields(), start in moment()) {
        let schedule = Schedule::parse(&to_fields(&f), None).unwrap();
        if let Some(next) = schedule.next_after(start) {
            prop_assert!(next > start);
            prop_assert_eq!(next.nanosecond(), 0);
            prop_assert!(schedule.matches(next), "{} does not match {}", rfc(next), schedule.cron_line());
            prop_assert!(naive_matches(&f, next), "naive: {} does not match {:?}", rfc(next), f);
        }
    }

    /// Against a brute-force search over a bounded window (UTC).
    #[test]
    fn agrees_with_brute_force(f in fields(), start in moment()) {
        let schedule = Schedule::parse(&to_fields(&f), None).unwrap();
        let limit = start + Duration::days(400);
        let expected = brute_next(&f, start, limit);
        let got = schedule.next_after(start);
        match expected {
            Some(e) => prop_assert_eq!(got, Some(e), "{:?} from {}", f, rfc(start)),
            None => prop_assert!(got.is_none_or(|g| g > limit), "{:?} from {}: got {:?}", f, rfc(start), got),
        }
    }

    /// upcoming() is strictly increasing and each step is next_after of the previous.
    #[test]
    fn iteration_is_monotonic(f in fields(), start in moment()) {
        let schedule = Schedule::parse(&to_fields(&f), None).unwrap();
        let times = schedule.upcoming(start, 12);
        let mut prev = start;
        for t in &times {
            prop_assert!(*t > prev);
            prop_assert_eq!(schedule.next_after(prev), Some(*t));
            prev = *t;
        }
        if times.len() < 12 {
            prop_assert_eq!(schedule.next_after(prev), None);
        }
    }

}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Splitting time into arbitrary scheduler steps fires each window's latest slot, never a
    /// slot twice, and never one outside its window.
    #[test]
    fn due_slots_fire_once(
        f in fields(),
        start in moment(),
        steps in proptest::collection::vec(1i64..90_000, 1..12),
    ) {
        let schedule = Schedule::parse(&to_fields(&f), None).unwrap();
        let mut prev = start;
        let mut fired: Vec<OffsetDateTime> = Vec::new();
        for step in steps {
            let now = prev + Duration::milliseconds(step);
            let due = schedule.due_slots(prev, now);
            // The latest slot in (prev, now], by walking next_after.
            let mut expected = None;
            let mut cursor = prev;
            while let Some(t) = schedule.next_after(cursor) {
                if t > now {
                    break;
                }
                expected = Some(t);
                cursor = t;
            }
            prop_assert_eq!(due, expected);
            if let Some(t) = due {
                prop_assert!(t > prev && t <= now);
                prop_assert!(!fired.contains(&t));
                fired.push(t);
            }
            prev = now;
        }
    }

    /// Arbitrary text never panics the parser or the search.
    #[test]
    fn arbitrary_text_never_panics(
        line in "[0-9a-zA-Z*?/,\\- LZ#]{0,40}",
        tz in proptest::option::of("[A-Za-z/_+\\-0-9]{0,20}"),
        start in moment(),
    ) {
        if let Ok(schedule) = Schedule::parse_line(&line, tz.as_deref()) {
            let _ = schedule.next_after(start);
            let _ = schedule.upcoming(start, 3);
            let _ = schedule.describe();
            let _ = schedule.due_slots(start, start + Duration::hours(1));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Grammar examples.

#[test]
fn defaults_are_second_zero_and_any_year() {
    let f = ScheduleFields::new("*/5", "*", "*", "*", "*");
    assert_eq!(f.sec, "0");
    assert_eq!(f.year, "*");
    let s = Schedule::parse(&f, None).unwrap();
    assert_eq!(s.cron_line(), "0 */5 * * * * *");
    let next = s.next_after(datetime!(2027-01-01 10:02:30 UTC)).unwrap();
    assert_eq!(next, datetime!(2027-01-01 10:05:00 UTC));
}

#[test]
fn strictly_after_truncates_to_the_second() {
    let s = utc("* * * * * * *");
    let t = datetime!(2027-01-01 10:00:00.5 UTC);
    assert_eq!(s.next_after(t), Some(datetime!(2027-01-01 10:00:01 UTC)));
    let t = datetime!(2027-01-01 10:00:00 UTC);
    assert_eq!(s.next_after(t), Some(datetime!(2027-01-01 10:00:01 UTC)));
}

#[test]
fn names_and_sunday_as_seven() {
    let s = utc("0 0 12 * jan-MAR Sun,7 *");
    assert_eq!(
        s.next_after(datetime!(2027-01-01 00:00 UTC)),
        Some(datetime!(2027-01-03 12:00 UTC))
    );
    // "sat-sun" wraps to Sunday, as the original allows.
    let s = utc("0 0 0 * * sat-sun *");
    assert_eq!(
        s.upcoming(datetime!(2027-01-01 00:00 UTC), 2),
        vec![
            datetime!(2027-01-02 00:00 UTC),
            datetime!(2027-01-03 00:00 UTC)
        ]
    );
}

#[test]
fn steps_ranges_and_lists() {
    let s = utc("0 7/20 3-5/2 * * * *");
    let times = s.upcoming(datetime!(2027-01-01 00:00 UTC), 6);
    let hm: Vec<_> = times.iter().map(|t| (t.hour(), t.minute())).collect();
    assert_eq!(hm, vec![(3, 7), (3, 27), (3, 47), (5, 7), (5, 27), (5, 47)]);
    let s = utc("0 0 0 1 jan/4 * *");
    let months: Vec<_> = s
        .upcoming(datetime!(2027-01-01 00:00 UTC), 4)
        .iter()
        .map(|t| u8::from(t.month()))
        .collect();
    assert_eq!(months, vec![5, 9, 1, 5]);
}

#[test]
fn dom_and_dow_both_must_match() {
    // Friday the 13th, not "every 13th or every Friday".
    let s = utc("0 0 9 13 * fri *");
    let times = s.upcoming(datetime!(2027-01-01 00:00 UTC), 3);
    assert_eq!(
        times,
        vec![
            datetime!(2027-08-13 09:00 UTC),
            datetime!(2028-10-13 09:00 UTC),
            datetime!(2029-04-13 09:00 UTC),
        ]
    );
}

#[test]
fn last_day_and_last_weekday() {
    let s = utc("0 0 0 L * * *");
    let days: Vec<_> = s
        .upcoming(datetime!(2028-01-15 00:00 UTC), 3)
        .iter()
        .map(|t| t.day())
        .collect();
    assert_eq!(days, vec![31, 29, 31]);
    // L5: the last Friday of the month.
    let s = utc("0 24 7 * * L5 *");
    assert_eq!(
        s.upcoming(datetime!(2027-01-01 00:00 UTC), 2),
        vec![
            datetime!(2027-01-29 07:24 UTC),
            datetime!(2027-02-26 07:24 UTC)
        ]
    );
}

fn field_error(line: &str) -> (Field, String) {
    match Schedule::parse_line(line, None) {
        Err(ScheduleError::Field { field, reason, .. }) => (field, reason),
        other => panic!("{line:?}: expected a field error, got {other:?}"),
    }
}

#[test]
fn invalid_fields_are_rejected_with_the_field_named() {
    for (line, field, needle) in [
        ("0 */60 * * * * *", Field::Min, "larger"),
        ("0 50/10 * * * * *", Field::Min, "leaves"),
        ("0 0 0 * * * 2090-2099/10", Field::Year, "leaves"),
        ("0 60 * * * * *", Field::Min, "out of range"),
        ("0 0 24 * * * *", Field::Hour, "out of range"),
        ("0 0 0 0 * * *", Field::Dom, "out of range"),
        ("0 0 0 * 13 * *", Field::Mon, "out of range"),
        ("0 0 0 * * 8 *", Field::Dow, "out of range"),
        ("0 0 0 * * * 1969", Field::Year, "out of range"),
        ("0 0 0 * * * 2100", Field::Year, "out of range"),
        ("0 5-3 * * * * *", Field::Min, "after its end"),
        ("? 0 * * * * *", Field::Sec, "'?'"),
        ("0 L * * * * *", Field::Min, "'L'"),
        ("0 0 0 * * L *", Field::Dow, "'L'"),
        ("0 0 0 Z3 * * *", Field::Dom, "not supported"),
        ("0 0 0 * * 5#2 *", Field::Dow, "not a number"),
        ("0 0 0 15W * * *", Field::Dom, "not a number"),
        ("0 1,,2 * * * * *", Field::Min, "not a number"),
        ("0 -5 * * * * *", Field::Min, "not a number"),
        ("0 */0 * * * * *", Field::Min, "positive"),
        ("0 1/2/3 * * * * *", Field::Min, "positive"),
        ("0 0 0 * feb-jan * *", Field::Mon, "after its end"),
        ("0 0 0 * * mon-fri/9 *", Field::Dow, "larger"),
    ] {
        let (got_field, reason) = field_error(line);
        assert_eq!(got_field, field, "{line}");
        assert!(reason.contains(needle), "{line}: {reason}");
    }
    assert!(matches!(
        Schedule::parse_line("* * *", None),
        Err(ScheduleError::FieldCount { found: 3 })
    ));
    let fields = ScheduleFields::new("1 2", "*", "*", "*", "*");
    let err = Schedule::parse(&fields, None).unwrap_err();
    assert_eq!(err.field(), Some(Field::Min));
    assert!(err.to_string().contains("spaces"), "{err}");
}

#[test]
fn unknown_time_zone_is_an_error() {
    let err = Schedule::parse_line("0 0 * * *", Some("Mars/Olympus_Mons")).unwrap_err();
    assert!(matches!(err, ScheduleError::TimeZone { .. }), "{err}");
}

#[test]
fn a_past_year_never_fires_and_says_so() {
    let s = utc("0 0 0 1 1 * 1999");
    let now = datetime!(2026-11-28 00:00 UTC);
    assert_eq!(s.next_after(now), None);
    assert!(s.upcoming(now, 5).is_empty());
    assert_eq!(s.due_slots(now, now + Duration::days(400)), None);
    let err = s.ensure_fires_after(now).unwrap_err();
    assert!(err.to_string().contains("never fire"), "{err}");
    // 31 February never exists.
    assert_eq!(utc("0 0 0 31 feb * *").next_after(now), None);
    // The year field ends in 2099, as in the original.
    let last = utc("0 0 0 1 1 * *").upcoming(datetime!(2097-06-01 00:00 UTC), 5);
    assert_eq!(last.len(), 2);
    assert_eq!(last[1].year(), 2099);
    assert!(utc("0 0 0 1 1 * *").ensure_fires_after(now).is_ok());
}

#[test]
fn describe_in_words() {
    for (line, words) in [
        ("0 */5 * * * * *", "every 5 minutes"),
        ("0 30 2 * * sun *", "at 02:30 on Sunday"),
        ("* * * * * * *", "every second"),
        ("*/10 * * * * * *", "every 10 seconds"),
        ("0 * * * * * *", "every minute"),
        ("0 15 * * * * *", "every hour at :15"),
        ("0 0 */6 * * * *", "every 6 hours at :00"),
        ("0 0 9 * * mon-fri *", "at 09:00 on Monday through Friday"),
        ("0 0 0 L * * *", "at 00:00 on the last day of the month"),
        ("0 0 8 1,15 * * *", "at 08:00 on day 1 and 15 of the month"),
        (
            "0 0 0 1 jan * 2030",
            "at 00:00 on day 1 of the month in January in 2030",
        ),
        (
            "0 24 7 * * L5 *",
            "at 07:24 on the last Friday of the month",
        ),
        ("0 0 9,17 * * * *", "at 09:00 and 17:00"),
    ] {
        assert_eq!(utc(line).describe(), words, "{line}");
    }
    assert_eq!(
        in_zone("0 30 2 * * * *", "Europe/Berlin").describe(),
        "at 02:30 (Europe/Berlin)"
    );
}

// ---------------------------------------------------------------------------------------------
// Time zones and DST (America/New_York: 2027-03-14 02:00 -> 03:00, 2027-11-07 02:00 -> 01:00).

#[test]
fn fixed_time_in_the_spring_gap_runs_at_the_first_instant_after_it() {
    let s = in_zone("0 30 2 * * * *", "America/New_York");
    let times = s.upcoming(datetime!(2027-03-13 12:00 UTC), 3);
    // 02:30 does not exist on 14 March: the job runs at 03:00 EDT instead.
    assert_eq!(
        times,
        vec![
            datetime!(2027-03-14 03:00 -4),
            datetime!(2027-03-15 02:30 -4),
            datetime!(2027-03-16 02:30 -4),
        ]
    );
}

#[test]
fn interval_jobs_skip_the_spring_gap() {
    let s = in_zone("0 */30 * * * * *", "America/New_York");
    let times = s.upcoming(datetime!(2027-03-14 06:15 UTC), 3);
    // 01:30 EST, then the wall clock jumps from 02:00 to 03:00: 03:00 EDT, 03:30 EDT.
    assert_eq!(
        times,
        vec![
            datetime!(2027-03-14 06:30 UTC),
            datetime!(2027-03-14 07:00 UTC),
            datetime!(2027-03-14 07:30 UTC),
        ]
    );
}

#[test]
fn fall_back_fixed_runs_once_interval_runs_in_both_passes() {
    let fixed = in_zone("0 30 1 * * * *", "America/New_York");
    let times = fixed.upcoming(datetime!(2027-11-07 00:00 UTC), 2);
    assert_eq!(
        times,
        vec![
            datetime!(2027-11-07 05:30 UTC),
            datetime!(2027-11-08 06:30 UTC)
        ]
    );
    let interval = in_zone("0 */30 1 7 11 * *", "America/New_York");
    let times = interval.upcoming(datetime!(2027-11-07 00:00 UTC), 4);
    assert_eq!(
        times,
        vec![
            datetime!(2027-11-07 05:00 UTC),
            datetime!(2027-11-07 05:30 UTC),
            datetime!(2027-11-07 06:00 UTC),
            datetime!(2027-11-07 06:30 UTC),
        ]
    );
}

/// croner 4.0.3 loses the second pass of a fall-back hour when the year field ends that year
/// and reports TimeSearchLimitExceeded. We must not panic, must return
/// None or a later time, and with our re-search we get the second pass too.
#[test]
fn regression_croner_year_field_at_fall_back() {
    let s = in_zone("0 */30 1 7 11 * 2027", "America/New_York");
    let start = datetime!(2027-11-07 00:00 UTC);
    let times = s.upcoming(start, 10);
    let mut prev = start;
    for t in &times {
        assert!(*t > prev);
        prev = *t;
    }
    assert_eq!(
        times,
        vec![
            datetime!(2027-11-07 05:00 UTC),
            datetime!(2027-11-07 05:30 UTC),
            datetime!(2027-11-07 06:00 UTC),
            datetime!(2027-11-07 06:30 UTC),
        ]
    );
    assert_eq!(s.next_after(datetime!(2027-11-07 06:30 UTC)), None);
    // Same with an explicit list of minutes.
    let s = in_zone("0 0,30 1 7 11 * 2027", "America/New_York");
    assert_eq!(s.upcoming(start, 10).len(), 4);
}

#[test]
fn matches_uses_the_zone_wall_clock() {
    let s = in_zone("0 0 9 * * * *", "Europe/Berlin");
    assert!(s.matches(datetime!(2027-01-04 08:00 UTC)));
    assert!(!s.matches(datetime!(2027-01-04 09:00 UTC)));
    assert!(s.matches(datetime!(2027-07-05 07:00 UTC)));
}

// ---------------------------------------------------------------------------------------------
// The scheduler helper.

#[test]
fn due_slots_collapses_a_slow_step_and_does_not_catch_up() {
    let s = utc("*/10 * * * * * *");
    let t0 = datetime!(2027-01-01 00:00:05 UTC);
    // Nothing between start-up and the first step.
    assert_eq!(s.due_slots(t0, t0 + Duration::seconds(4)), None);
    // A slot exactly at `now` fires; at `prev` it does not (it fired in the previous window).
    let at = datetime!(2027-01-01 00:00:10 UTC);
    assert_eq!(s.due_slots(t0, at), Some(at));
    assert_eq!(s.due_slots(at, at + Duration::seconds(5)), None);
    // A 35 s stall covers 00:00:20, :30 and :40: one fire, the latest.
    let later = at + Duration::seconds(35);
    assert_eq!(
        s.due_slots(at, later),
        Some(datetime!(2027-01-01 00:00:40 UTC))
    );
    // Time going backwards or standing still fires nothing.
    assert_eq!(s.due_slots(later, at), None);
    assert_eq!(s.due_slots(at, at), None);
}

#[test]
fn due_slots_over_a_long_window_finds_the_latest_slot() {
    // Every second for two days: more slots than the forward walk takes one by one.
    let s = utc("* * * * * * *");
    let prev = datetime!(2027-01-01 00:00 UTC);
    let now = datetime!(2027-01-03 00:00:00.7 UTC);
    assert_eq!(
        s.due_slots(prev, now),
        Some(datetime!(2027-01-03 00:00 UTC))
    );
    let s = in_zone("*/5 */30 1 * * * *", "America/New_York");
    let prev = datetime!(2027-11-06 00:00 UTC);
    let now = datetime!(2027-11-07 06:59 UTC);
    assert_eq!(
        s.due_slots(prev, now),
        Some(datetime!(2027-11-07 06:30:55 UTC))
    );
}
