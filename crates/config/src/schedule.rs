//! Cron schedules with seconds and year fields, evaluated in UTC or a job's time zone.
//!
//! This module owns the meaning of a job's seven schedule keys (`sec`, `min`, `hour`, `dom`,
//! `mon`, `dow`, `year`) and answers "when does this job fire next?". It follows the grammar of
//! the Python `crontab` package 1.0.x that the original saltpeter used (docs/COMPATIBILITY.md, "Schedules"):
//!
//! - ranges: sec 0-59, min 0-59, hour 0-23, dom 1-31, mon 1-12, dow 0-6 (7 is Sunday too),
//!   year 1970-2099;
//! - names: `jan`..`dec` in `mon`, `sun`..`sat` in `dow` (case-insensitive);
//! - `*`, `?` (dom and dow only), single values, ranges `a-b`, lists `a,b`, steps `*/n`,
//!   `a-b/n` and `a/n` (from `a` to the end of the field); the first value after the start must
//!   stay inside the field (`*/60` in `min` is an error, as in the original);
//! - `L` in dom (last day of the month) and `L<d>` / `L<a>-<b>` in dow (the last such weekday of
//!   the month);
//! - day-of-month AND day-of-week: both must match, unlike Vixie cron's OR.
//!
//! `Z<n>` in dom ("n days before the end of the month") is accepted by the original but cannot be
//! expressed by the cron engine, so it is rejected with a clear error instead of misfiring.
//!
//! Parsing is ours (it yields the exact value sets, which also power [`Schedule::matches`] and
//! [`Schedule::describe`]); finding the next fire time is croner's, fed with a normalised
//! pattern, evaluated with jiff in the job's zone. Two croner behaviours are handled here:
//! a search that runs out (`TimeSearchLimitExceeded`) means "no further run" and never panics,
//! and the known miss of the second pass through a fall-back hour when the year field ends in
//! that year is worked around by re-searching from the fall-back instant.

use std::fmt;

use croner::Cron;
use croner::errors::CronError;
use croner::parser::{CronParser, Seconds, Year};
use jiff::tz::TimeZone;
use jiff::{Timestamp, Zoned};
use time::OffsetDateTime;

/// One of the seven schedule fields, named after its job key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Field {
    /// `sec`, 0-59.
    Sec,
    /// `min`, 0-59.
    Min,
    /// `hour`, 0-23.
    Hour,
    /// `dom` (day of month), 1-31.
    Dom,
    /// `mon`, 1-12.
    Mon,
    /// `dow` (day of week), 0-6 with 0 = Sunday; 7 is accepted as Sunday.
    Dow,
    /// `year`, 1970-2099.
    Year,
}

impl Field {
    /// Every field in cron-line order.
    pub const ALL: [Field; 7] = [
        Field::Sec,
        Field::Min,
        Field::Hour,
        Field::Dom,
        Field::Mon,
        Field::Dow,
        Field::Year,
    ];

    /// The job key this field is read from.
    pub fn key(self) -> &'static str {
        match self {
            Field::Sec => "sec",
            Field::Min => "min",
            Field::Hour => "hour",
            Field::Dom => "dom",
            Field::Mon => "mon",
            Field::Dow => "dow",
            Field::Year => "year",
        }
    }

    /// The smallest and largest value the field matches (dow's largest is 6; 7 is an alias).
    fn bounds(self) -> (u16, u16) {
        match self {
            Field::Sec | Field::Min => (0, 59),
            Field::Hour => (0, 23),
            Field::Dom => (1, 31),
            Field::Mon => (1, 12),
            Field::Dow => (0, 6),
            Field::Year => (1970, 2099),
        }
    }

    /// The largest value that may be written: 7 for dow (Sunday), the field maximum otherwise.
    fn written_limit(self) -> u16 {
        match self {
            Field::Dow => 7,
            other => other.bounds().1,
        }
    }
}

impl fmt::Display for Field {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.key())
    }
}

/// The seven schedule fields as text, before validation.
///
/// The config layer turns YAML integers into their decimal text; `sec` defaults to `"0"` and
/// `year` to `"*"`, as in the original.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ScheduleFields {
    /// Seconds, default `"0"`.
    pub sec: String,
    /// Minutes (required in job files).
    pub min: String,
    /// Hours (required in job files).
    pub hour: String,
    /// Day of month (required in job files).
    pub dom: String,
    /// Month (required in job files).
    pub mon: String,
    /// Day of week (required in job files).
    pub dow: String,
    /// Year, default `"*"`.
    pub year: String,
}

impl ScheduleFields {
    /// The five fields a job file must give, with `sec` = `"0"` and `year` = `"*"`.
    pub fn new(
        min: impl Into<String>,
        hour: impl Into<String>,
        dom: impl Into<String>,
        mon: impl Into<String>,
        dow: impl Into<String>,
    ) -> Self {
        Self {
            sec: "0".to_owned(),
            min: min.into(),
            hour: hour.into(),
            dom: dom.into(),
            mon: mon.into(),
            dow: dow.into(),
            year: "*".to_owned(),
        }
    }

    /// Splits a cron line the way the original library does: 5 fields are
    /// `min hour dom mon dow`, 6 fields add `year`, 7 fields are `sec min hour dom mon dow year`.
    pub(crate) fn from_cron_line(line: &str) -> Result<Self, ScheduleError> {
        let parts: Vec<&str> = line.split_whitespace().collect();
        let owned = |s: &str| s.to_owned();
        match parts.as_slice() {
            [min, hour, dom, mon, dow] => Ok(Self::new(*min, *hour, *dom, *mon, *dow)),
            [min, hour, dom, mon, dow, year] => Ok(Self {
                year: owned(year),
                ..Self::new(*min, *hour, *dom, *mon, *dow)
            }),
            [sec, min, hour, dom, mon, dow, year] => Ok(Self {
                sec: owned(sec),
                min: owned(min),
                hour: owned(hour),
                dom: owned(dom),
                mon: owned(mon),
                dow: owned(dow),
                year: owned(year),
            }),
            _ => Err(ScheduleError::FieldCount { found: parts.len() }),
        }
    }

    fn get(&self, field: Field) -> &str {
        match field {
            Field::Sec => &self.sec,
            Field::Min => &self.min,
            Field::Hour => &self.hour,
            Field::Dom => &self.dom,
            Field::Mon => &self.mon,
            Field::Dow => &self.dow,
            Field::Year => &self.year,
        }
    }
}

/// Why a schedule was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScheduleError {
    /// One field does not follow the grammar.
    #[error("{field} {value:?}: {reason}")]
    Field {
        /// The offending field.
        field: Field,
        /// Its text as given.
        value: String,
        /// What is wrong, in words.
        reason: String,
    },
    /// A cron line did not have 5, 6 or 7 fields.
    #[error("a cron line needs 5 to 7 fields, found {found}")]
    FieldCount {
        /// How many whitespace-separated fields there were.
        found: usize,
    },
    /// The `timezone` is not a known IANA name.
    #[error("unknown time zone {name:?}: {reason}")]
    TimeZone {
        /// The name as given.
        name: String,
        /// jiff's explanation.
        reason: String,
    },
    /// The cron engine refused the normalised pattern. Our own parser should have caught every
    /// such case first, so this is reported rather than hidden.
    #[error("the cron engine rejected {pattern:?}: {reason}")]
    Engine {
        /// The pattern handed to croner.
        pattern: String,
        /// croner's message.
        reason: String,
    },
    /// The schedule has no fire time after the given moment (for example a year in the past).
    #[error("the schedule can never fire again (nothing matches after {after})")]
    NeverFires {
        /// The moment searched from, RFC 3339.
        after: String,
    },
}

impl ScheduleError {
    /// The field the error is about, if it is about one field.
    pub fn field(&self) -> Option<Field> {
        match self {
            ScheduleError::Field { field, .. } => Some(*field),
            _ => None,
        }
    }
}

/// A set of small integers (at most 192 values above the field's minimum).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
struct Bits([u64; 3]);

impl Bits {
    fn insert(&mut self, offset: u16) {
        let i = usize::from(offset);
        if let Some(word) = self.0.get_mut(i / 64) {
            *word |= 1 << (i % 64);
        }
    }

    fn contains(&self, offset: u16) -> bool {
        let i = usize::from(offset);
        self.0
            .get(i / 64)
            .is_some_and(|word| word & (1 << (i % 64)) != 0)
    }

    fn is_empty(&self) -> bool {
        self.0.iter().all(|w| *w == 0)
    }
}

/// One validated field: the values it matches plus the month-relative specials.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct ParsedField {
    field: Field,
    /// `*` or `?` appeared as a list item: every value matches.
    any: bool,
    /// Plain values, stored as offsets from the field minimum.
    values: Bits,
    /// dom only: `L`, the last day of the month.
    last_day: bool,
    /// dow only: weekdays (0 = Sunday) from `L<d>` items, matching in the month's last week.
    last_weekdays: Bits,
}

impl ParsedField {
    fn has(&self, value: u16) -> bool {
        let (min, _) = self.field.bounds();
        value >= min && self.values.contains(value - min)
    }

    /// The plain values in ascending order.
    fn value_list(&self) -> Vec<u16> {
        let (min, max) = self.field.bounds();
        (min..=max).filter(|v| self.has(*v)).collect()
    }

    fn last_weekday_list(&self) -> Vec<u16> {
        (0..=6)
            .filter(|d| self.last_weekdays.contains(*d))
            .collect()
    }
}

fn field_error(field: Field, value: &str, reason: impl Into<String>) -> ScheduleError {
    ScheduleError::Field {
        field,
        value: value.to_owned(),
        reason: reason.into(),
    }
}

const MONTH_NAMES: [&str; 12] = [
    "jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec",
];
const DAY_NAMES: [&str; 7] = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"];

/// Parses a decimal number made of ASCII digits only (no sign, no spaces).
fn parse_digits(text: &str) -> Option<u32> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    // Leading zeros are fine ("05"); an absurdly long number is simply out of range.
    let trimmed = text.trim_start_matches('0');
    if trimmed.len() > 9 {
        return Some(u32::MAX);
    }
    Some(trimmed.parse().unwrap_or(0))
}

/// One value of a range or list: a number, or a month/day name where the field allows names.
fn parse_value(field: Field, item: &str, whole: &str) -> Result<u16, ScheduleError> {
    let named = match field {
        Field::Mon => MONTH_NAMES.iter().position(|n| *n == item).map(|i| i + 1),
        Field::Dow => DAY_NAMES.iter().position(|n| *n == item),
        _ => None,
    };
    let value = match named {
        Some(v) => u32::try_from(v).unwrap_or(u32::MAX),
        None => parse_digits(item)
            .ok_or_else(|| field_error(field, whole, format!("{item:?} is not a number")))?,
    };
    let (min, _) = field.bounds();
    let limit = field.written_limit();
    if value < u32::from(min) || value > u32::from(limit) {
        return Err(field_error(
            field,
            whole,
            format!("{value} is out of range {min}-{limit}"),
        ));
    }
    // The range check above keeps the value well inside u16.
    Ok(u16::try_from(value).unwrap_or(limit))
}

/// Validates one field with the original library's rules and expands it to value sets.
fn parse_field(field: Field, text: &str) -> Result<ParsedField, ScheduleError> {
    let whole = text.trim();
    if whole.is_empty() {
        return Err(field_error(field, text, "empty field"));
    }
    if whole.chars().any(char::is_whitespace) {
        return Err(field_error(
            field,
            text,
            "contains spaces (one field per key)",
        ));
    }
    let lower = whole.to_ascii_lowercase();
    let (min, max) = field.bounds();
    let limit = field.written_limit();
    let mut parsed = ParsedField {
        field,
        any: false,
        values: Bits::default(),
        last_day: false,
        last_weekdays: Bits::default(),
    };

    for item in lower.split(',') {
        if item == "*" || item == "?" {
            if item == "?" && !matches!(field, Field::Dom | Field::Dow) {
                return Err(field_error(
                    field,
                    text,
                    "'?' is only allowed in dom and dow",
                ));
            }
            parsed.any = true;
            continue;
        }
        if item == "l" {
            if field != Field::Dom {
                return Err(field_error(
                    field,
                    text,
                    "a bare 'L' (last day of the month) is only allowed in dom",
                ));
            }
            parsed.last_day = true;
            continue;
        }
        if item.starts_with('z') {
            let reason = if field == Field::Dom {
                "'Z<n>' (n days before the end of the month) is not supported by this scheduler; \
                 use 'L' for the last day of the month"
            } else {
                "'Z' is not allowed here"
            };
            return Err(field_error(field, text, reason));
        }
        if let Some(rest) = item.strip_prefix('l') {
            if field != Field::Dow {
                return Err(field_error(
                    field,
                    text,
                    "a leading 'L' (last weekday of the month) is only allowed in dow",
                ));
            }
            let (start, end) = match rest.split_once('-') {
                Some((a, b)) => (a, b),
                None => (rest, rest),
            };
            let day = |s: &str| -> Result<u16, ScheduleError> {
                match parse_digits(s) {
                    Some(d) if d <= 7 => Ok(u16::try_from(d).unwrap_or(0)),
                    _ => Err(field_error(
                        field,
                        text,
                        format!("'L' needs a weekday number 0-7 or a range of them, got {item:?}"),
                    )),
                }
            };
            let (start, end) = (day(start)?, day(end)?);
            if start > end {
                return Err(field_error(
                    field,
                    text,
                    format!("range start {start} is after its end {end}"),
                ));
            }
            for d in start..=end {
                parsed.last_weekdays.insert(d % 7);
            }
            continue;
        }

        let (piece, step) = match item.split_once('/') {
            None => (item, None),
            Some((piece, step_text)) => {
                let step = match parse_digits(step_text) {
                    Some(s) if s > 0 => s,
                    _ => {
                        return Err(field_error(
                            field,
                            text,
                            format!("the step in {item:?} must be a positive whole number"),
                        ));
                    }
                };
                if step > u32::from(limit) {
                    return Err(field_error(
                        field,
                        text,
                        format!("the step {step} is larger than {limit}"),
                    ));
                }
                (piece, Some(u16::try_from(step).unwrap_or(limit)))
            }
        };

        let (start, end) = if piece == "*" {
            (min, max)
        } else if let Some((a, b)) = piece.split_once('-') {
            let start = parse_value(field, a, text)?;
            let mut end = parse_value(field, b, text)?;
            // The original allows "sat-sun": a range ending on Sunday written as 0 means 7.
            if field == Field::Dow && end == 0 {
                end = 7;
            }
            (start, end)
        } else {
            let start = parse_value(field, piece, text)?;
            if step.is_none() {
                parsed.values.insert(if field == Field::Dow {
                    start % 7
                } else {
                    start - min
                });
                continue;
            }
            // "a/n" runs from a to the end of the field.
            (start, max)
        };
        if start > end {
            return Err(field_error(
                field,
                text,
                format!("range start {start} is after its end {end}"),
            ));
        }
        if let Some(step) = step
            && u32::from(start) + u32::from(step) > u32::from(limit)
        {
            return Err(field_error(
                field,
                text,
                format!(
                    "the step {step} from {start} leaves the field's range {min}-{limit} \
                     at once"
                ),
            ));
        }
        let mut v = start;
        while v <= end {
            parsed
                .values
                .insert(if field == Field::Dow { v % 7 } else { v - min });
            v = v.saturating_add(step.unwrap_or(1));
            if v == u16::MAX {
                break;
            }
        }
    }
    Ok(parsed)
}

/// Writes a set of values as croner list items, collapsing runs into `a-b`.
fn push_runs(out: &mut Vec<String>, values: &[u16]) {
    let mut i = 0;
    while let Some(&start) = values.get(i) {
        let mut j = i;
        while values.get(j + 1).is_some_and(|next| *next == values[j] + 1) {
            j += 1;
        }
        let end = values[j];
        out.push(if end > start {
            format!("{start}-{end}")
        } else {
            start.to_string()
        });
        i = j + 1;
    }
}

/// The croner text for one field. Only `*` and explicit values (plus `L` and `d#L`) are used,
/// so croner's own grammar quirks (name replacement, strict steps) never come into play.
fn croner_field(parsed: &ParsedField) -> String {
    let (min, max) = parsed.field.bounds();
    if parsed.any {
        // An explicit year range keeps croner's search bounded by the original's 2099 limit;
        // elsewhere `*` keeps croner's wildcard semantics (dom/dow star rules, interval jobs).
        return if parsed.field == Field::Year {
            format!("{min}-{max}")
        } else {
            "*".to_owned()
        };
    }
    let mut items = Vec::new();
    push_runs(&mut items, &parsed.value_list());
    if parsed.last_day {
        items.push("L".to_owned());
    }
    for d in parsed.last_weekday_list() {
        items.push(format!("{d}#L"));
    }
    items.join(",")
}

/// A validated cron schedule bound to a time zone.
///
/// Equality compares the schedule text and the zone name, which is what "the job's schedule
/// changed" means for the config reloader.
#[derive(Debug, Clone)]
pub struct Schedule {
    /// The seven fields as given (trimmed), for [`Schedule::cron_line`].
    text: [String; 7],
    parsed: [ParsedField; 7],
    cron: Cron,
    tz: TimeZone,
    tz_name: Option<String>,
}

impl PartialEq for Schedule {
    fn eq(&self, other: &Self) -> bool {
        self.text == other.text && self.tz_name == other.tz_name
    }
}

impl Eq for Schedule {}

/// The moment as a jiff timestamp, or `None` outside jiff's range (years -9999..=9999).
fn to_timestamp(t: OffsetDateTime) -> Option<Timestamp> {
    Timestamp::from_nanosecond(t.unix_timestamp_nanos()).ok()
}

fn to_offset_date_time(z: &Zoned) -> Option<OffsetDateTime> {
    OffsetDateTime::from_unix_timestamp_nanos(z.timestamp().as_nanosecond()).ok()
}

/// How many single steps [`Schedule::due_slots`] walks before it jumps to the end of the window.
const DUE_WALK_LIMIT: usize = 1024;

impl Schedule {
    /// Validates the fields and the optional IANA time zone (UTC when `None`, as the original).
    pub fn parse(fields: &ScheduleFields, tz: Option<&str>) -> Result<Schedule, ScheduleError> {
        let mut parsed = Vec::with_capacity(7);
        for field in Field::ALL {
            parsed.push(parse_field(field, fields.get(field))?);
        }
        let parsed: [ParsedField; 7] = parsed
            .try_into()
            .map_err(|_| ScheduleError::FieldCount { found: 0 })?;
        let text = Field::ALL.map(|f| fields.get(f).trim().to_owned());

        let (zone, tz_name) = match tz {
            None => (TimeZone::UTC, None),
            Some(name) => {
                let zone = TimeZone::get(name).map_err(|e| ScheduleError::TimeZone {
                    name: name.to_owned(),
                    reason: e.to_string(),
                })?;
                (zone, Some(name.to_owned()))
            }
        };

        let pattern = parsed
            .iter()
            .map(croner_field)
            .collect::<Vec<_>>()
            .join(" ");
        let cron = CronParser::builder()
            .seconds(Seconds::Required)
            .year(Year::Required)
            .dom_and_dow(true)
            .build()
            .parse(&pattern)
            .map_err(|e| ScheduleError::Engine {
                pattern: pattern.clone(),
                reason: e.to_string(),
            })?;
        Ok(Schedule {
            text,
            parsed,
            cron,
            tz: zone,
            tz_name,
        })
    }

    /// Parses a cron line (5, 6 or 7 fields, see [`ScheduleFields::from_cron_line`]).
    pub fn parse_line(line: &str, tz: Option<&str>) -> Result<Schedule, ScheduleError> {
        Schedule::parse(&ScheduleFields::from_cron_line(line)?, tz)
    }

    /// The time zone name the schedule is evaluated in, `None` for UTC.
    pub fn timezone(&self) -> Option<&str> {
        self.tz_name.as_deref()
    }

    /// The seven fields as one line, `sec min hour dom mon dow year`, as written.
    pub fn cron_line(&self) -> String {
        self.text.join(" ")
    }

    /// The first fire time strictly after `after`, at a whole second.
    ///
    /// Like the original, `after` is first truncated to a whole second. `None` means the
    /// schedule never fires again (past years, impossible dates such as 31 February, or the
    /// 2099 limit of the year field); the search never panics.
    pub fn next_after(&self, after: OffsetDateTime) -> Option<OffsetDateTime> {
        // The common "year in the past" case, without asking croner to search for it. A day of
        // margin covers any zone's offset from UTC.
        let last_year = self.parsed[6].value_list().last().copied();
        if !self.parsed[6].any
            && let Some(last_year) = last_year
            && after
                .checked_sub(time::Duration::DAY)
                .is_some_and(|a| a.year() > i32::from(last_year))
        {
            return None;
        }
        let start = self.zoned(after)?;
        self.next_zoned(&start)
            .and_then(|z| to_offset_date_time(&z))
    }

    /// Errors with [`ScheduleError::NeverFires`] when nothing matches after `after`.
    pub fn ensure_fires_after(&self, after: OffsetDateTime) -> Result<(), ScheduleError> {
        match self.next_after(after) {
            Some(_) => Ok(()),
            None => Err(ScheduleError::NeverFires {
                after: after
                    .format(&time::format_description::well_known::Rfc3339)
                    .unwrap_or_else(|_| after.to_string()),
            }),
        }
    }

    /// Up to `n` fire times strictly after `from`, in order.
    ///
    /// Each search starts from the exact value the previous one returned, so both passes of
    /// a fall-back hour are kept for interval jobs (croner's documented DST rules).
    pub fn upcoming(&self, from: OffsetDateTime, n: usize) -> Vec<OffsetDateTime> {
        let mut out = Vec::with_capacity(n.min(64));
        let Some(mut cursor) = self.zoned(from) else {
            return out;
        };
        while out.len() < n {
            let Some(next) = self.next_zoned(&cursor) else {
                break;
            };
            let Some(t) = to_offset_date_time(&next) else {
                break;
            };
            out.push(t);
            cursor = next;
        }
        out
    }

    /// The slot to fire for one scheduler step: the latest fire time in `(prev, now]`.
    ///
    /// This is the original's "fire each slot once" rule (docs/COMPATIBILITY.md, "Schedules") as a function. The caller keeps
    /// `prev`, the `now` of its previous step (the start-up time at first), and calls this with
    /// the current time on every step. Because consecutive windows `(prev, now]` never overlap,
    /// every slot is fired at most once, whatever the step jitter; several slots inside one
    /// slow step collapse into one fire (the latest), and nothing scheduled before start-up is
    /// caught up. Returns `None` when no slot falls in the window (or `now <= prev`).
    pub fn due_slots(&self, prev: OffsetDateTime, now: OffsetDateTime) -> Option<OffsetDateTime> {
        if now <= prev {
            return None;
        }
        let first = self.next_after(prev)?;
        if first > now {
            return None;
        }
        let mut last_zoned = self.zoned(first)?;
        let mut last = first;
        for _ in 0..DUE_WALK_LIMIT {
            match self.next_zoned(&last_zoned) {
                Some(next) => match to_offset_date_time(&next) {
                    Some(t) if t <= now => {
                        last = t;
                        last_zoned = next;
                    }
                    _ => return Some(last),
                },
                None => return Some(last),
            }
        }
        // A very long window for a frequent job (say the host slept for a day with a job every
        // second): search backwards from `now`, and accept the answer only if the forward
        // search agrees that it is a slot, so both directions' DST rules stay consistent.
        let now_zoned = self.zoned(now)?;
        if let Ok(candidate) = self
            .cron
            .find_previous_occurrence(&now_zoned, true)
            .map(|z| to_offset_date_time(&z))
            && let Some(candidate) = candidate
            && candidate > last
            && candidate <= now
            && candidate
                .checked_sub(time::Duration::SECOND)
                .and_then(|c| self.next_after(c))
                == Some(candidate)
        {
            return Some(candidate);
        }
        Some(last)
    }

    /// Whether `t` (its whole second, on the wall clock of the schedule's zone) matches every
    /// field. This evaluates our own value sets, independently of the cron engine. A fixed-time
    /// job whose time falls into a spring-forward gap fires at the first instant after the gap,
    /// which this wall-clock test does not match.
    pub fn matches(&self, t: OffsetDateTime) -> bool {
        let Some(z) = self.zoned(t) else {
            return false;
        };
        let dt = z.datetime();
        let [sec, min, hour, dom, mon, dow, year] = &self.parsed;
        let Ok(year_value) = u16::try_from(dt.year()) else {
            return false;
        };
        let month_length = u16::try_from(dt.days_in_month()).unwrap_or(31);
        let day = u16::try_from(dt.day()).unwrap_or(0);
        let weekday = u16::try_from(dt.weekday().to_sunday_zero_offset()).unwrap_or(0);
        let plain = |f: &ParsedField, v: i8| f.any || u16::try_from(v).is_ok_and(|v| f.has(v));
        let dom_ok = dom.any || dom.has(day) || (dom.last_day && day == month_length);
        let dow_ok = dow.any
            || dow.has(weekday)
            || (dow.last_weekdays.contains(weekday) && day + 7 > month_length);
        plain(sec, dt.second())
            && plain(min, dt.minute())
            && plain(hour, dt.hour())
            && plain(mon, dt.month())
            && (year.any || year.has(year_value))
            && dom_ok
            && dow_ok
    }

    /// The schedule in words, best effort, for the dashboard ("every 5 minutes",
    /// "at 02:30 on Sunday").
    pub fn describe(&self) -> String {
        let [sec, min, hour, dom, mon, dow, year] = &self.parsed;
        let mut out = describe_time(sec, min, hour);
        let mut days = Vec::new();
        if !dom.any {
            days.push(describe_dom(dom));
        }
        if !dow.any {
            days.push(describe_dow(dow));
        }
        if !days.is_empty() {
            out.push_str(" on ");
            out.push_str(&days.join(" if it is "));
        }
        if !mon.any {
            out.push_str(" in ");
            out.push_str(&describe_set(mon, |v| month_name(v).to_owned()));
        }
        if !year.any {
            out.push_str(" in ");
            out.push_str(&describe_set(year, |v| v.to_string()));
        }
        if let Some(tz) = &self.tz_name {
            out.push_str(" (");
            out.push_str(tz);
            out.push(')');
        }
        out
    }

    fn zoned(&self, t: OffsetDateTime) -> Option<Zoned> {
        // Whole seconds, as the original truncates `now` before searching.
        let whole = t.replace_nanosecond(0).ok()?;
        Some(to_timestamp(whole)?.to_zoned(self.tz.clone()))
    }

    /// croner's next occurrence, with "search limit exceeded" meaning "no further run".
    fn next_zoned(&self, start: &Zoned) -> Option<Zoned> {
        match self.cron.find_next_occurrence(start, false) {
            Ok(z) => Some(z),
            Err(CronError::TimeSearchLimitExceeded) => self.retry_after_fall_back(start),
            Err(_) => None,
        }
    }

    /// Works around croner 4.0.3 missing the second pass of a fall-back hour when the year
    /// field allows no later year: its first walk runs out of years and fails before it tries
    /// the repeated hour. If the clocks go back within two days of `start`, search again from
    /// that instant, where only the second pass remains.
    fn retry_after_fall_back(&self, start: &Zoned) -> Option<Zoned> {
        let horizon = start.timestamp().as_second().saturating_add(2 * 86_400);
        for transition in self.tz.following(start.timestamp()).take(4) {
            let at = transition.timestamp();
            if at.as_second() > horizon {
                break;
            }
            let before = self
                .tz
                .to_offset(Timestamp::from_second(at.as_second() - 1).ok()?);
            if transition.offset() < before {
                let edge = at.to_zoned(self.tz.clone());
                if let Ok(z) = self.cron.find_next_occurrence(&edge, true)
                    && z.timestamp() > start.timestamp()
                {
                    return Some(z);
                }
            }
        }
        None
    }
}

fn month_name(v: u16) -> &'static str {
    const NAMES: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    NAMES
        .get(usize::from(v.saturating_sub(1)))
        .copied()
        .unwrap_or("?")
}

fn day_name(v: u16) -> &'static str {
    const NAMES: [&str; 7] = [
        "Sunday",
        "Monday",
        "Tuesday",
        "Wednesday",
        "Thursday",
        "Friday",
        "Saturday",
    ];
    NAMES.get(usize::from(v)).copied().unwrap_or("?")
}

/// A stride `s` when the values are exactly min, min+s, min+2s, ... up to the field's end.
fn stride_from_start(f: &ParsedField) -> Option<u16> {
    let values = f.value_list();
    let (min, max) = f.field.bounds();
    if values.len() < 2 || values.first() != Some(&min) {
        return None;
    }
    let step = values[1] - values[0];
    let regular = values.windows(2).all(|w| w[1] - w[0] == step);
    let reaches_end = values.last().is_some_and(|last| last + step > max);
    (regular && reaches_end).then_some(step)
}

/// "Monday through Friday", "1, 15 and 20", "every 2nd value from 1".
fn describe_set(f: &ParsedField, name: impl Fn(u16) -> String) -> String {
    let values = f.value_list();
    let mut runs: Vec<String> = Vec::new();
    let mut i = 0;
    while let Some(&start) = values.get(i) {
        let mut j = i;
        while values.get(j + 1).is_some_and(|n| *n == values[j] + 1) {
            j += 1;
        }
        let end = values[j];
        runs.push(match end - start {
            0 => name(start),
            1 => format!("{} and {}", name(start), name(end)),
            _ => format!("{} through {}", name(start), name(end)),
        });
        i = j + 1;
    }
    join_words(&runs)
}

fn join_words(parts: &[String]) -> String {
    match parts {
        [] => String::new(),
        [one] => one.clone(),
        [init @ .., last] => format!("{} and {}", init.join(", "), last),
    }
}

fn plural(n: u16, unit: &str) -> String {
    if n == 1 {
        format!("every {unit}")
    } else {
        format!("every {n} {unit}s")
    }
}

fn single(f: &ParsedField) -> Option<u16> {
    match f.value_list().as_slice() {
        [v] if !f.any => Some(*v),
        _ => None,
    }
}

fn describe_time(sec: &ParsedField, min: &ParsedField, hour: &ParsedField) -> String {
    let (s, m, h) = (single(sec), single(min), single(hour));
    if let (Some(s), Some(m), Some(h)) = (s, m, h) {
        return if s == 0 {
            format!("at {h:02}:{m:02}")
        } else {
            format!("at {h:02}:{m:02}:{s:02}")
        };
    }
    let every = |f: &ParsedField, unit: &str| -> Option<String> {
        if f.any {
            Some(plural(1, unit))
        } else {
            stride_from_start(f).map(|step| plural(step, unit))
        }
    };
    // Finest moving field first: "every 5 minutes", "every second", "every hour at :15".
    if sec.any || stride_from_start(sec).is_some() {
        let mut out = every(sec, "second").unwrap_or_default();
        if !min.any {
            out.push_str(&format!(
                " during minute {}",
                describe_set(min, |v| v.to_string())
            ));
        }
        if !hour.any {
            out.push_str(&format!(
                " of hour {}",
                describe_set(hour, |v| v.to_string())
            ));
        }
        return out;
    }
    if let Some(s) = s
        && (min.any || stride_from_start(min).is_some())
    {
        let mut out = every(min, "minute").unwrap_or_default();
        if s != 0 {
            out.push_str(&format!(" at second {s}"));
        }
        if !hour.any {
            out.push_str(&format!(
                " during hour {}",
                describe_set(hour, |v| v.to_string())
            ));
        }
        return out;
    }
    if let (Some(s), Some(m)) = (s, m)
        && (hour.any || stride_from_start(hour).is_some())
    {
        let at = if s == 0 {
            format!(" at :{m:02}")
        } else {
            format!(" at :{m:02}:{s:02}")
        };
        return format!("{}{at}", every(hour, "hour").unwrap_or_default());
    }
    if s == Some(0) && m.is_none() && (hour.any || stride_from_start(hour).is_some()) {
        return format!(
            "{} at minutes {}",
            every(hour, "hour").unwrap_or_default(),
            describe_set(min, |v| v.to_string())
        );
    }
    if let (Some(s), Some(m)) = (s, m) {
        let hours = hour.value_list();
        let times: Vec<String> = hours
            .iter()
            .map(|h| {
                if s == 0 {
                    format!("{h:02}:{m:02}")
                } else {
                    format!("{h:02}:{m:02}:{s:02}")
                }
            })
            .collect();
        return format!("at {}", join_words(&times));
    }
    let part = |f: &ParsedField, unit: &str| {
        if f.any {
            format!("every {unit}")
        } else {
            format!("{unit} {}", describe_set(f, |v| v.to_string()))
        }
    };
    format!(
        "at {}, {}, {}",
        part(sec, "second"),
        part(min, "minute"),
        part(hour, "hour")
    )
}

fn describe_dom(dom: &ParsedField) -> String {
    let mut parts = Vec::new();
    if !dom.values.is_empty() {
        parts.push(format!(
            "day {} of the month",
            describe_set(dom, |v| v.to_string())
        ));
    }
    if dom.last_day {
        parts.push("the last day of the month".to_owned());
    }
    join_words(&parts)
}

fn describe_dow(dow: &ParsedField) -> String {
    let mut parts = Vec::new();
    if !dow.values.is_empty() {
        parts.push(describe_set(dow, |v| day_name(v).to_owned()));
    }
    let last = dow.last_weekday_list();
    if !last.is_empty() {
        let names: Vec<String> = last.iter().map(|d| day_name(*d).to_owned()).collect();
        parts.push(format!("the last {} of the month", join_words(&names)));
    }
    join_words(&parts)
}
