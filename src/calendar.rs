//! Calendar windows for daily and monthly quotas: local midnights in a time zone given as a POSIX
//! TZ rule (`"PST8PDT,M3.2.0,M11.1.0"`), so the `.wasm` carries no zone database. Written by hand:
//! the grammar is small, and `tz-rs` (the crate that parses these) added ~27 KB to the `.wasm`.
//!
//! ```
//! use llm_ratelimit::calendar::{window, Period, TimeZone};
//! use llm_ratelimit::time::Instant;
//!
//! let la = TimeZone::parse("PST8PDT,M3.2.0,M11.1.0").unwrap();
//! // 2026-03-08 12:00 UTC, the day Los Angeles moves its clocks forward: 23 hours long.
//! let (start, end) = window(Instant::from_millis(1_772_971_200_000), Period::Day, &la);
//! assert_eq!(start, Instant::from_millis(1_772_956_800_000)); // 2026-03-08 08:00 UTC
//! assert_eq!((end - start).as_secs(), 23 * 3600);
//! assert_eq!(la.offset_at(end), -7 * 3600);
//! ```

use crate::time::{Duration, Instant};

const SECS_PER_DAY: i64 = 86_400;
const NANOS_PER_SEC: u64 = 1_000_000_000;
/// Longer input is refused before parsing: real rules are under 50 bytes, and error messages
/// quote the input.
const MAX_RULE_LEN: usize = 128;

/// A time zone as a POSIX TZ rule: "UTC" (the default), "EST5EDT,M3.2.0,M11.1.0",
/// "PST8PDT,M3.2.0,M11.1.0", "<+0530>-5:30", "CET-1CEST,M3.5.0,M10.5.0/3", "JST-9" ... Zone names
/// are checked but not kept: only offsets and rules decide a window.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TimeZone {
    /// Standard time, seconds east of UTC (POSIX writes them west: "PST8" is -8 h).
    std: i32,
    dst: Option<Dst>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Dst {
    /// Seconds east of UTC while daylight saving time is on.
    offset: i32,
    /// When DST starts, in standard local time.
    start: Change,
    /// When DST ends, in daylight local time.
    end: Change,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Change {
    day: RuleDay,
    /// Seconds after local midnight of `day`: -167 h to 167 h (RFC 8536 extends POSIX's 0-24 h,
    /// and TZif footers use it, e.g. "IST-2IDT,M3.4.4/26,M10.5.0").
    time: i32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RuleDay {
    /// `Jn`: 1-365, February 29 never counted (J60 is always March 1).
    Julian1(u16),
    /// `n`: 0-365, February 29 counted.
    Julian0(u16),
    /// `Mm.w.d`: weekday `d` (0 = Sunday) of week `w` (5 = the last) of month `m`.
    MonthWeekDay { month: u8, week: u8, weekday: u8 },
}

impl TimeZone {
    pub const UTC: TimeZone = TimeZone { std: 0, dst: None };

    /// Parses a POSIX TZ rule: `std offset [dst [offset] ,start[/time],end[/time]]`, names being
    /// three or more letters or `<quoted>` (letters, digits, `+`, `-`), offsets `[+|-]hh[:mm[:ss]]`
    /// west of UTC, dates `Jn`, `n` or `Mm.w.d`. "UTC" alone is UTC. A DST name needs its rule:
    /// without a zone database there is no default to fall back on.
    pub fn parse(rule: &str) -> Result<TimeZone, String> {
        let rule = rule.trim_matches(|c: char| c.is_ascii_whitespace());
        if rule.len() > MAX_RULE_LEN {
            return Err(format!("not a POSIX TZ rule: longer than {MAX_RULE_LEN} bytes"));
        }
        if !rule.is_ascii() {
            return Err("not a POSIX TZ rule: only ASCII characters are allowed".into());
        }
        if rule.is_empty() {
            return Err("not a POSIX TZ rule: empty".into());
        }
        if rule == "UTC" {
            return Ok(TimeZone::UTC);
        }
        if rule.starts_with(':') || (rule.contains('/') && !rule.contains(',')) {
            return Err(format!(
                "not a POSIX TZ rule: {rule:?} names a zone database entry, which is not available; \
                 give the rule instead, e.g. \"PST8PDT,M3.2.0,M11.1.0\" for America/Los_Angeles"
            ));
        }
        Parser { text: rule.as_bytes(), at: 0 }.zone().map_err(|e| format!("not a POSIX TZ rule: {e}"))
    }

    /// The UTC offset in effect at `at`, in seconds east of UTC ("PST8" gives -28800).
    pub fn offset_at(&self, at: Instant) -> i64 {
        let t = secs(at);
        Changes::around(self, year_of(t)).offset(t)
    }
}

/// A calendar period a quota counts over.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Period {
    Day,
    Month,
}

impl Period {
    pub const NAMES: [(&'static str, Period); 2] = [("day", Period::Day), ("month", Period::Month)];
}

/// The calendar window of `period` in `tz` containing `now`: [start, end) from one local midnight
/// (the 1st of the month's for `Month`) to the next, exact across DST changes (a day is 23 or
/// 25 hours then). Where a change skips midnight, the day starts when the clocks do. Bounds
/// saturate at `Instant::ZERO` and `Instant::MAX`. No allocation.
pub fn window(now: Instant, period: Period, tz: &TimeZone) -> (Instant, Instant) {
    let t = secs(now);
    let changes = Changes::around(tz, year_of(t));
    let local_day = (t + changes.offset(t)).div_euclid(SECS_PER_DAY);
    // Windows are numbered: days since the epoch, or months since year 0.
    let (mut n, first_day): (i64, fn(i64) -> i64) = match period {
        Period::Day => (local_day, |day| day),
        Period::Month => {
            let (year, month, _) = civil_from_days(local_day);
            (year * 12 + i64::from(month) - 1, |n| days_from_civil(n.div_euclid(12), n.rem_euclid(12) as u32 + 1, 1))
        }
    };
    let start_of = |n: i64| changes.first_at_or_after(first_day(n) * SECS_PER_DAY);
    let (mut start, mut end) = (start_of(n), start_of(n + 1));
    // `start <= t` always holds. `end <= t` only where a change turns the clocks back past
    // midnight, or skips a whole day: `now` then belongs to a later window. Offsets are under
    // 25 h, so two steps are enough; four bound the loop.
    for _ in 0..4 {
        if end > t {
            break;
        }
        n += 1;
        start = end;
        end = start_of(n + 1);
    }
    (instant(start), instant(end))
}

/// Whole seconds since the epoch: boundaries are whole seconds, so flooring keeps comparisons exact.
fn secs(at: Instant) -> i64 {
    // u64 nanoseconds hold under 1.9e10 seconds: no truncation, and room for any offset.
    (at.as_nanos() / NANOS_PER_SEC) as i64
}

fn instant(secs: i64) -> Instant {
    Instant::ZERO + Duration::from_secs(u64::try_from(secs).unwrap_or(0))
}

fn year_of(t: i64) -> i64 {
    civil_from_days(t.div_euclid(SECS_PER_DAY)).0
}

/// The zone's changes for the five years around one, enough to read the offset anywhere within a
/// year of it: a change lands at most ~8 days (167 h plus an offset) outside its nominal year.
struct Changes {
    std: i64,
    dst: i64,
    /// (instant, offset from then on), per year DST start then end. The changes are not sorted
    /// (the south starts DST late in the year), so a lookup takes the latest one at or before a
    /// time, ties going to the later entry: DST all year ("0/0,J365/25") ends one year exactly
    /// where the next begins.
    at: [(i64, i64); 10],
    len: usize,
}

impl Changes {
    fn around(tz: &TimeZone, year: i64) -> Changes {
        let std = i64::from(tz.std);
        let offset = tz.dst.map_or(std, |dst| i64::from(dst.offset));
        let mut changes = Changes { std, dst: offset, at: [(0, 0); 10], len: 0 };
        if let Some(dst) = tz.dst {
            for (i, y) in (year - 2..=year + 2).enumerate() {
                // A change's time is read on the clock in effect before it.
                let start = dst.start.local_secs(y) - std;
                let end = dst.end.local_secs(y) - offset;
                if let Some(slot) = changes.at.get_mut(2 * i..2 * i + 2) {
                    slot.copy_from_slice(&[(start, offset), (end, std)]);
                    changes.len = 2 * i + 2;
                }
            }
        }
        changes
    }

    fn list(&self) -> &[(i64, i64)] {
        self.at.get(..self.len).unwrap_or(&[])
    }

    fn offset(&self, t: i64) -> i64 {
        let mut latest: Option<(i64, i64)> = None;
        for &(at, offset) in self.list() {
            if at <= t && latest.is_none_or(|(l, _)| at >= l) {
                latest = Some((at, offset));
            }
        }
        latest.map_or(self.std, |(_, offset)| offset)
    }

    /// The first instant whose local time is `local` or later. It is where one of the offsets
    /// reaches `local` or where a change jumps over it, so only those candidates are tried.
    fn first_at_or_after(&self, local: i64) -> i64 {
        let reached = |t: i64| t + self.offset(t) >= local;
        let candidates = [local - self.std, local - self.dst].into_iter().chain(self.list().iter().map(|&(at, _)| at));
        candidates.filter(|&t| reached(t)).min().unwrap_or(local - self.std)
    }
}

impl Change {
    /// Local seconds since the epoch (on the clock in effect before the change) in `year`.
    fn local_secs(&self, year: i64) -> i64 {
        let jan1 = days_from_civil(year, 1, 1);
        let day = match self.day {
            RuleDay::Julian1(n) => jan1 + i64::from(n) - 1 + i64::from(n >= 60 && is_leap(year)),
            RuleDay::Julian0(n) => jan1 + i64::from(n),
            RuleDay::MonthWeekDay { month, week, weekday } => {
                let month = u32::from(month);
                let first = days_from_civil(year, month, 1);
                let mut day =
                    first + (i64::from(weekday) - weekday_of(first)).rem_euclid(7) + 7 * (i64::from(week) - 1);
                // Week 5 means the last such weekday, which may be the 4th.
                if day - first >= i64::from(days_in_month(year, month)) {
                    day -= 7;
                }
                day
            }
        };
        day * SECS_PER_DAY + i64::from(self.time)
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's `days_from_civil`).
pub(crate) fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year.rem_euclid(400);
    let month_from_march = i64::from((month + 9) % 12);
    let day_of_year = (153 * month_from_march + 2) / 5 + i64::from(day) - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

/// (year, month, day) of days since 1970-01-01 (Hinnant's `civil_from_days`).
pub(crate) fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let days = days + 719_468;
    let era = days.div_euclid(146_097);
    let day_of_era = days.rem_euclid(146_097);
    let year_of_era = (day_of_era - day_of_era / 1_460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_from_march = (5 * day_of_year + 2) / 153;
    // In range by construction: 1-31 and 1-12.
    let day = (day_of_year - (153 * month_from_march + 2) / 5 + 1) as u32;
    let month = if month_from_march < 10 { month_from_march + 3 } else { month_from_march - 9 } as u32;
    (year_of_era + era * 400 + i64::from(month <= 2), month, day)
}

/// 0 = Sunday; 1970-01-01 was a Thursday.
fn weekday_of(days: i64) -> i64 {
    (days + 4).rem_euclid(7)
}

fn is_leap(year: i64) -> bool {
    year % 4 == 0 && (year % 100 != 0 || year % 400 == 0)
}

pub(crate) fn days_in_month(year: i64, month: u32) -> u32 {
    match month {
        2 if is_leap(year) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// A cursor over the (ASCII, bounded) rule; errors say what was expected where.
struct Parser<'a> {
    text: &'a [u8],
    at: usize,
}

impl<'a> Parser<'a> {
    fn zone(&mut self) -> Result<TimeZone, String> {
        let std_name = self.name().ok_or_else(|| format!("expected a zone name at {:?}", self.rest()))?;
        if self.at_end() || !self.at_offset() {
            return Err(format!("expected an offset after {std_name:?}"));
        }
        let std = -self.hms(24, "offset")?;
        if self.at_end() {
            return Ok(TimeZone { std, dst: None });
        }
        let dst_name =
            self.name().ok_or_else(|| format!("expected a DST zone name or the end at {:?}", self.rest()))?;
        // DST is an hour ahead of standard time unless said otherwise.
        let offset = if self.at_offset() { -self.hms(24, "DST offset")? } else { std + 3600 };
        if !self.eat(b',') {
            return Err(format!(
                "expected \",start[/time],end[/time]\" after {dst_name:?} (there is no default rule without a zone database)"
            ));
        }
        let start = self.change()?;
        if !self.eat(b',') {
            return Err(format!("expected \",\" and the end of DST at {:?}", self.rest()));
        }
        let end = self.change()?;
        if !self.at_end() {
            return Err(format!("unexpected {:?} after the rule", self.rest()));
        }
        Ok(TimeZone { std, dst: Some(Dst { offset, start, end }) })
    }

    /// Three or more letters, or `<` three or more of letters, digits, `+`, `-` `>`.
    fn name(&mut self) -> Option<&'a str> {
        let from = self.at;
        let name = if self.eat(b'<') {
            let name = self.run(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'-');
            Some(name).filter(|_| self.eat(b'>'))
        } else {
            Some(self.run(|b| b.is_ascii_alphabetic()))
        };
        let name = name.filter(|name| name.len() >= 3);
        if name.is_none() {
            self.at = from;
        }
        name
    }

    /// A change: a date and an optional `/time` (02:00 by default).
    fn change(&mut self) -> Result<Change, String> {
        let here = self.rest();
        let day = if self.eat(b'J') {
            RuleDay::Julian1(self.number(3, 1, 365).ok_or_else(|| format!("expected a day 1-365 after J at {here:?}"))?)
        } else if self.eat(b'M') {
            let month = self.number(2, 1, 12);
            let week = self.eat(b'.').then(|| self.number(1, 1, 5)).flatten();
            let weekday = self.eat(b'.').then(|| self.number(1, 0, 6)).flatten();
            match (month, week, weekday) {
                (Some(month), Some(week), Some(weekday)) => {
                    RuleDay::MonthWeekDay { month: month as u8, week: week as u8, weekday: weekday as u8 }
                }
                _ => return Err(format!("expected Mm.w.d (month 1-12, week 1-5, weekday 0-6) at {here:?}")),
            }
        } else {
            RuleDay::Julian0(
                self.number(3, 0, 365).ok_or_else(|| format!("expected a date (Jn, n or Mm.w.d) at {here:?}"))?,
            )
        };
        let time = if self.eat(b'/') { self.hms(167, "time")? } else { 2 * 3600 };
        Ok(Change { day, time })
    }

    /// `[+|-]hh[:mm[:ss]]` in seconds, hours at most `max_hours`.
    fn hms(&mut self, max_hours: u16, what: &str) -> Result<i32, String> {
        let here = self.rest();
        let bad = || format!("expected a {what} [+|-]hh[:mm[:ss]] (hours 0-{max_hours}) at {here:?}");
        let sign = if self.eat(b'-') {
            -1
        } else {
            self.eat(b'+');
            1
        };
        let hours = self.number(if max_hours > 99 { 3 } else { 2 }, 0, max_hours).ok_or_else(bad)?;
        let (mut minutes, mut seconds) = (0, 0);
        if self.eat(b':') {
            minutes = self.number(2, 0, 59).ok_or_else(bad)?;
            if self.eat(b':') {
                seconds = self.number(2, 0, 59).ok_or_else(bad)?;
            }
        }
        Ok(sign * (i32::from(hours) * 3600 + i32::from(minutes) * 60 + i32::from(seconds)))
    }

    /// 1 to `max_digits` decimal digits, valued `min..=max`.
    fn number(&mut self, max_digits: usize, min: u16, max: u16) -> Option<u16> {
        let digits = self.run(|b| b.is_ascii_digit());
        if digits.is_empty() || digits.len() > max_digits {
            return None;
        }
        let value = digits.bytes().fold(0u16, |n, b| n * 10 + u16::from(b - b'0'));
        (min..=max).contains(&value).then_some(value)
    }

    /// The longest run of bytes matching `keep` (ASCII, so always a whole `str`).
    fn run(&mut self, keep: impl Fn(u8) -> bool) -> &'a str {
        let from = self.at;
        while self.text.get(self.at).is_some_and(|&b| keep(b)) {
            self.at += 1;
        }
        self.text.get(from..self.at).and_then(|run| core::str::from_utf8(run).ok()).unwrap_or("")
    }

    fn eat(&mut self, byte: u8) -> bool {
        let found = self.text.get(self.at) == Some(&byte);
        self.at += usize::from(found);
        found
    }

    fn at_offset(&self) -> bool {
        self.text.get(self.at).is_some_and(|b| b.is_ascii_digit() || *b == b'+' || *b == b'-')
    }

    fn at_end(&self) -> bool {
        self.at >= self.text.len()
    }

    fn rest(&self) -> &'a str {
        self.text.get(self.at..).and_then(|rest| core::str::from_utf8(rest).ok()).unwrap_or("")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    const HOUR: i64 = 3600;
    const LA: &str = "PST8PDT,M3.2.0,M11.1.0";

    fn zone(rule: &str) -> TimeZone {
        TimeZone::parse(rule).unwrap_or_else(|e| panic!("{rule:?}: {e}"))
    }

    /// An instant from a UTC date and time.
    fn utc(year: i64, month: u32, day: u32, hour: i64, minute: i64) -> Instant {
        instant(days_from_civil(year, month, day) * SECS_PER_DAY + hour * HOUR + minute * 60)
    }

    fn hours(window: (Instant, Instant)) -> u64 {
        (window.1 - window.0).as_secs() / 3600
    }

    #[test]
    fn civil_arithmetic_matches_known_dates() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        assert_eq!(days_from_civil(2026, 3, 8) * SECS_PER_DAY, 1_772_928_000);
        assert_eq!(days_from_civil(2028, 2, 29) + 1, days_from_civil(2028, 3, 1));
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
        for days in [-800_000, -1, 0, 59, 11_016, 20_000, 212_000] {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
        assert_eq!(weekday_of(days_from_civil(2026, 3, 8)), 0); // a Sunday
    }

    #[test]
    fn utc_days_and_months() {
        let tz = TimeZone::UTC;
        let now = utc(2026, 5, 17, 13, 45) + Duration::from_millis(10_500);
        assert_eq!(window(now, Period::Day, &tz), (utc(2026, 5, 17, 0, 0), utc(2026, 5, 18, 0, 0)));
        assert_eq!(window(now, Period::Month, &tz), (utc(2026, 5, 1, 0, 0), utc(2026, 6, 1, 0, 0)));
        // Leap February 2028: 29 days.
        let feb = window(utc(2028, 2, 29, 12, 0), Period::Month, &tz);
        assert_eq!(feb, (Instant::from_millis(1_832_976_000_000), Instant::from_millis(1_835_481_600_000)));
        assert_eq!(hours(feb), 29 * 24);
        assert_eq!(hours(window(utc(2027, 2, 10, 0, 0), Period::Month, &tz)), 28 * 24);
        // December into January.
        let last = utc(2027, 1, 1, 0, 0) - Duration::from_nanos(1);
        assert_eq!(window(last, Period::Month, &tz), (utc(2026, 12, 1, 0, 0), utc(2027, 1, 1, 0, 0)));
        assert_eq!(window(last, Period::Day, &tz), (utc(2026, 12, 31, 0, 0), utc(2027, 1, 1, 0, 0)));
        assert_eq!(tz.offset_at(now), 0);
    }

    #[test]
    fn a_boundary_belongs_to_the_next_window() {
        let la = zone(LA);
        let (start, end) = window(utc(2026, 7, 4, 12, 0), Period::Day, &la);
        assert_eq!((start, end), (utc(2026, 7, 4, 7, 0), utc(2026, 7, 5, 7, 0)));
        assert_eq!(window(end, Period::Day, &la).0, end);
        assert_eq!(window(end - Duration::from_nanos(1), Period::Day, &la), (start, end));
        assert_eq!(window(start, Period::Day, &la), (start, end));
        let (month_start, month_end) = window(utc(2026, 7, 4, 12, 0), Period::Month, &la);
        assert_eq!(window(month_end, Period::Month, &la).0, month_end);
        assert_eq!(window(month_start, Period::Month, &la), (month_start, month_end));
    }

    #[test]
    fn los_angeles_days_across_dst() {
        let la = zone(LA);
        // 2026-03-08: clocks go 02:00 PST -> 03:00 PDT, a 23-hour day.
        let spring = window(utc(2026, 3, 8, 12, 0), Period::Day, &la);
        assert_eq!(spring, (utc(2026, 3, 8, 8, 0), utc(2026, 3, 9, 7, 0)));
        assert_eq!(hours(spring), 23);
        // 2026-11-01: clocks go 02:00 PDT -> 01:00 PST, a 25-hour day.
        let fall = window(utc(2026, 11, 1, 12, 0), Period::Day, &la);
        assert_eq!(fall, (utc(2026, 11, 1, 7, 0), utc(2026, 11, 2, 8, 0)));
        assert_eq!(hours(fall), 25);
        // Either side of the 10:00Z change.
        assert_eq!(la.offset_at(utc(2026, 3, 8, 10, 0) - Duration::from_nanos(1)), -8 * HOUR);
        assert_eq!(la.offset_at(utc(2026, 3, 8, 10, 0)), -7 * HOUR);
        assert_eq!(la.offset_at(utc(2026, 11, 1, 9, 0) - Duration::from_nanos(1)), -7 * HOUR);
        assert_eq!(la.offset_at(utc(2026, 11, 1, 9, 0)), -8 * HOUR);
    }

    #[test]
    fn los_angeles_months_across_dst() {
        let la = zone(LA);
        let march = window(utc(2026, 3, 20, 0, 0), Period::Month, &la);
        assert_eq!(march, (utc(2026, 3, 1, 8, 0), utc(2026, 4, 1, 7, 0)));
        assert_eq!(hours(march), 31 * 24 - 1);
        let november = window(utc(2026, 11, 15, 0, 0), Period::Month, &la);
        assert_eq!(november, (utc(2026, 11, 1, 7, 0), utc(2026, 12, 1, 8, 0)));
        assert_eq!(hours(november), 30 * 24 + 1);
        // 2026-12-01 02:00Z is still November 30 in Los Angeles.
        assert_eq!(window(utc(2026, 12, 1, 2, 0), Period::Month, &la), november);
    }

    #[test]
    fn fixed_offsets_either_side_of_utc() {
        let est = zone("EST5");
        assert_eq!(est.offset_at(utc(2026, 7, 1, 0, 0)), -5 * HOUR);
        // 03:00Z is still the previous day in New York time.
        assert_eq!(window(utc(2026, 5, 17, 3, 0), Period::Day, &est), (utc(2026, 5, 16, 5, 0), utc(2026, 5, 17, 5, 0)));
        let tokyo = zone("JST-9");
        assert_eq!(tokyo.offset_at(utc(2026, 7, 1, 0, 0)), 9 * HOUR);
        // 20:00Z is already the next day in Tokyo.
        let day = window(utc(2026, 5, 17, 20, 0), Period::Day, &tokyo);
        assert_eq!(day, (utc(2026, 5, 17, 15, 0), utc(2026, 5, 18, 15, 0)));
        assert_eq!(
            window(utc(2026, 5, 31, 16, 0), Period::Month, &tokyo),
            (utc(2026, 5, 31, 15, 0), utc(2026, 6, 30, 15, 0))
        );
        let india = zone("<+0530>-5:30");
        assert_eq!(india.offset_at(utc(2026, 1, 1, 0, 0)), 5 * HOUR + 30 * 60);
        assert_eq!(
            window(utc(2026, 5, 17, 19, 0), Period::Day, &india),
            (utc(2026, 5, 17, 18, 30), utc(2026, 5, 18, 18, 30))
        );
        assert_eq!(zone("NPT-5:45").offset_at(Instant::ZERO), 5 * HOUR + 45 * 60);
        assert_eq!(zone("<-03>3").offset_at(Instant::ZERO), -3 * HOUR);
        assert_eq!(zone("XXX-1:02:03").offset_at(Instant::ZERO), HOUR + 2 * 60 + 3);
    }

    #[test]
    fn new_york_and_central_europe() {
        let ny = zone("EST5EDT,M3.2.0,M11.1.0");
        assert_eq!(ny.offset_at(utc(2026, 1, 15, 0, 0)), -5 * HOUR);
        assert_eq!(ny.offset_at(utc(2026, 7, 15, 0, 0)), -4 * HOUR);
        let cet = zone("CET-1CEST,M3.5.0,M10.5.0/3");
        // Last Sundays: 2026-03-29 (23 h) and 2026-10-25 (25 h).
        let spring = window(utc(2026, 3, 29, 12, 0), Period::Day, &cet);
        assert_eq!(spring, (utc(2026, 3, 28, 23, 0), utc(2026, 3, 29, 22, 0)));
        let fall = window(utc(2026, 10, 25, 12, 0), Period::Day, &cet);
        assert_eq!(fall, (utc(2026, 10, 24, 22, 0), utc(2026, 10, 25, 23, 0)));
        assert_eq!(hours(fall), 25);
        assert_eq!(cet.offset_at(utc(2026, 10, 25, 1, 0) - Duration::from_nanos(1)), 2 * HOUR);
        assert_eq!(cet.offset_at(utc(2026, 10, 25, 1, 0)), HOUR);
    }

    #[test]
    fn southern_hemisphere_dst_spans_the_new_year() {
        let sydney = zone("AEST-10AEDT,M10.1.0,M4.1.0/3");
        assert_eq!(sydney.offset_at(utc(2026, 1, 15, 0, 0)), 11 * HOUR);
        assert_eq!(sydney.offset_at(utc(2026, 7, 15, 0, 0)), 10 * HOUR);
        assert_eq!(sydney.offset_at(utc(2026, 12, 31, 23, 0)), 11 * HOUR);
        // 2026-04-05: 03:00 AEDT -> 02:00 AEST, 25 hours.
        let april = window(utc(2026, 4, 5, 3, 0), Period::Day, &sydney);
        assert_eq!(april, (utc(2026, 4, 4, 13, 0), utc(2026, 4, 5, 14, 0)));
        // 2026-10-04: 02:00 AEST -> 03:00 AEDT, 23 hours.
        let october = window(utc(2026, 10, 4, 3, 0), Period::Day, &sydney);
        assert_eq!(october, (utc(2026, 10, 3, 14, 0), utc(2026, 10, 4, 13, 0)));
        // The year in Sydney starts 13:00Z on December 31.
        let january = window(utc(2026, 12, 31, 13, 0), Period::Month, &sydney);
        assert_eq!(january, (utc(2026, 12, 31, 13, 0), utc(2027, 1, 31, 13, 0)));
    }

    #[test]
    fn julian_day_forms() {
        // Jn never counts February 29: J60 is March 1 in any year.
        let j = zone("AAA0BBB,J60/0,J300/0");
        let n = zone("AAA0BBB,59/0,300/0");
        for tz in [&j, &n] {
            assert_eq!(tz.offset_at(utc(2027, 2, 28, 23, 0)), 0);
            assert_eq!(tz.offset_at(utc(2027, 3, 1, 0, 0)), HOUR);
        }
        // n counts it: day 59 is February 29 in 2028.
        assert_eq!(j.offset_at(utc(2028, 2, 29, 12, 0)), 0);
        assert_eq!(n.offset_at(utc(2028, 2, 29, 12, 0)), HOUR);
        // Day 300 of 2028 is October 27, J300 October 27 of any year.
        assert_eq!(n.offset_at(utc(2028, 10, 26, 23, 0) - Duration::from_nanos(1)), HOUR);
        assert_eq!(n.offset_at(utc(2028, 10, 26, 23, 0)), 0);
        assert_eq!(j.offset_at(utc(2027, 10, 26, 23, 0)), 0);
        // A change at midnight skips it: the day starts when the clocks do, 23 hours before the next.
        assert_eq!(window(utc(2028, 2, 29, 12, 0), Period::Day, &n), (utc(2028, 2, 29, 0, 0), utc(2028, 2, 29, 23, 0)));
    }

    #[test]
    fn clocks_back_at_midnight() {
        // Brazil's 2018 rule: DST ended at 00:00, so Saturday 23:00 came twice (a 25-hour day),
        // and began at 00:00, so Sunday started at 01:00 (23 hours).
        let brazil = zone("<-03>3<-02>,M11.1.0/0,M2.3.0/0");
        let saturday = window(utc(2019, 2, 17, 2, 30), Period::Day, &brazil);
        assert_eq!(saturday, (utc(2019, 2, 16, 2, 0), utc(2019, 2, 17, 3, 0)));
        let sunday = window(utc(2018, 11, 4, 12, 0), Period::Day, &brazil);
        assert_eq!(sunday, (utc(2018, 11, 4, 3, 0), utc(2018, 11, 5, 2, 0)));
        // Clocks back from 00:30 to 23:30: the repeated half hour falls in the next day's window,
        // which started at the first midnight, so every instant lies in exactly one window.
        let odd = zone("AAA0BBB,M3.2.0,M11.1.0/0:30");
        let change = utc(2026, 10, 31, 23, 30); // 00:30 BBB on November 1
        let (start, end) = window(change, Period::Day, &odd);
        assert_eq!(start, utc(2026, 10, 31, 23, 0));
        assert!(start <= change && change < end);
        assert_eq!(window(start - Duration::from_nanos(1), Period::Day, &odd).1, start);
        // DST all year: each year's end is the next year's start.
        let always = zone("EST5EDT,0/0,J365/25");
        for at in [utc(2026, 1, 1, 4, 59), utc(2026, 1, 1, 5, 0), utc(2026, 7, 1, 0, 0), utc(2026, 12, 31, 23, 0)] {
            assert_eq!(always.offset_at(at), -4 * HOUR);
            assert_eq!(hours(window(at, Period::Day, &always)), 24);
        }
    }

    #[test]
    fn saturates_at_the_ends_of_time() {
        let la = zone(LA);
        assert_eq!(window(Instant::ZERO, Period::Day, &la), (Instant::ZERO, utc(1970, 1, 1, 8, 0)));
        assert_eq!(window(Instant::ZERO, Period::Month, &TimeZone::UTC), (Instant::ZERO, utc(1970, 2, 1, 0, 0)));
        let (start, end) = window(Instant::MAX, Period::Month, &zone("JST-9"));
        assert!(start < Instant::MAX && end == Instant::MAX);
        assert_eq!(window(Instant::MAX, Period::Day, &la).1, Instant::MAX);
    }

    #[test]
    fn parses_the_rule_forms() {
        assert_eq!(zone("UTC"), TimeZone::UTC);
        assert_eq!(zone("UTC0"), TimeZone::UTC);
        assert_eq!(zone(" GMT+0 "), TimeZone::UTC);
        assert_eq!(zone("EST+5"), zone("EST5"));
        assert_eq!(zone("PST8PDT7,M3.2.0/2:00:00,M11.1.0/02:00"), zone(LA));
        assert_eq!(zone("<PST>8<PDT>,M3.2.0,M11.1.0"), zone(LA));
        // RFC 8536's extended times: Israel's change on "Thursday 26:00", Greenland's at -1:00.
        assert!(TimeZone::parse("IST-2IDT,M3.4.4/26,M10.5.0").is_ok());
        assert!(TimeZone::parse("<-02>2<-01>,M3.5.0/-1,M10.5.0/0").is_ok());
    }

    #[test]
    fn refuses_what_is_not_a_rule() {
        let err = |rule: &str| TimeZone::parse(rule).expect_err(rule);
        assert_eq!(err("PST"), "not a POSIX TZ rule: expected an offset after \"PST\"");
        assert!(err("").contains("empty"));
        assert!(err("  ").contains("empty"));
        assert!(err(&"PST8".repeat(10_000)).contains("longer than"));
        assert!(err("PST8PDT\u{e9}").contains("ASCII"));
        assert!(err("America/Los_Angeles").contains("PST8PDT,M3.2.0,M11.1.0"));
        assert!(err(":America/New_York").contains("zone database"));
        assert!(err("PST8PDT").contains("no default rule"));
        assert!(err("PST8PDT,M13.1.0,M11.1.0").contains("Mm.w.d"));
        for garbage in [
            "8",
            "PS8",
            "PST25",
            "PST8:60",
            "PST-",
            "PST+",
            "PST8:",
            "PST123",
            "<PST8",
            "<P>8",
            "<PS T>8",
            "PST8P",
            "PST8PDT,",
            "PST8PDT,M3.2.0",
            "PST8PDT,M3.2.0,",
            "PST8PDT,M3.2.0,M11.1.0,",
            "PST8PDT,M3.2.0,M11.1.0/",
            "PST8PDT,M3.2.0/168,M11.1.0",
            "PST8PDT,M3.6.0,M11.1.0",
            "PST8PDT,M3.2.7,M11.1.0",
            "PST8PDT,M0.2.0,M11.1.0",
            "PST8PDT,M3.2,M11.1.0",
            "PST8PDT,J0,J365",
            "PST8PDT,J366,J1",
            "PST8PDT,366,1",
            "PST8PDT,0001,1",
            "PST8 PDT,M3.2.0,M11.1.0",
            "PST8PDT,M3.2.0,M11.1.0 x",
            "\0",
        ] {
            assert!(err(garbage).starts_with("not a POSIX TZ rule: "), "{garbage:?}");
        }
    }

    /// No panic on any prefix or one-byte change of real rules, and windows that hold together
    /// whenever one parses (the proptest below goes further natively).
    #[test]
    fn mangled_rules_never_panic() {
        let rules =
            [LA, "CET-1CEST,M3.5.0,M10.5.0/3", "<+0530>-5:30", "AEST-10AEDT,M10.1.0,M4.1.0/3", "X1Y,J1/-167,300/167"];
        let bytes = b"0123456789+-:,./<>JMPSTDUC \x7f";
        let now = utc(2026, 3, 8, 12, 0);
        for rule in rules {
            for cut in 0..=rule.len() {
                for &b in bytes {
                    let mut text = rule.as_bytes().to_vec();
                    text.truncate(cut);
                    text.push(b);
                    text.extend_from_slice(rule.as_bytes().get(cut + 1..).unwrap_or(&[]));
                    let Ok(tz) = TimeZone::parse(&String::from_utf8_lossy(&text)) else { continue };
                    for period in [Period::Day, Period::Month] {
                        let (start, end) = window(now, period, &tz);
                        assert!(start <= now && now < end, "{:?}", String::from_utf8_lossy(&text));
                    }
                }
            }
        }
    }
}

#[cfg(all(test, not(target_arch = "wasm32")))]
mod proptests {
    use super::*;
    use proptest::prelude::*;

    const ZONES: [&str; 9] = [
        "UTC",
        "PST8PDT,M3.2.0,M11.1.0",
        "EST5EDT,M3.2.0,M11.1.0",
        "CET-1CEST,M3.5.0,M10.5.0/3",
        "AEST-10AEDT,M10.1.0,M4.1.0/3",
        "<+0530>-5:30",
        "<-03>3<-02>,M11.1.0/0,M2.3.0/0",
        "IST-2IDT,M3.4.4/26,M10.5.0",
        "NZST-12NZDT,M9.5.0,M4.1.0/3",
    ];
    /// 2500-01-01: instants up to here keep the next window's end short of `Instant::MAX`.
    const UNTIL_SECS: u64 = 16_725_225_600;

    proptest! {
        #[test]
        fn windows_tile_time(zone in 0..ZONES.len(), whole_secs in 0..UNTIL_SECS, nanos in 0..1_000_000_000u64) {
            let tz = TimeZone::parse(ZONES[zone]).unwrap();
            let now = Instant::from_nanos(whole_secs * 1_000_000_000 + nanos);
            for period in [Period::Day, Period::Month] {
                let (start, end) = window(now, period, &tz);
                prop_assert!(start <= now && now < end);
                prop_assert_eq!(window(start, period, &tz), (start, end));
                prop_assert_eq!(window(end, period, &tz).0, end);
                let hours = (end - start).as_secs() as f64 / 3600.0;
                let days = match period {
                    Period::Day => 1.0..=1.0,
                    Period::Month => 28.0..=31.0,
                };
                prop_assert!(hours >= days.start() * 24.0 - 1.0 && hours <= days.end() * 24.0 + 1.0, "{hours} h");
                if period == Period::Day {
                    prop_assert!([23.0, 24.0, 25.0].contains(&hours), "{hours} h");
                }
                // Local midnight: the wall clock reads 00:00 at the start, unless a change skipped it.
                let local = secs(start) + tz.offset_at(start);
                let skipped = tz.offset_at(start) != tz.offset_at(start - Duration::from_nanos(1));
                prop_assert!(local.rem_euclid(SECS_PER_DAY) == 0 || skipped || start == Instant::ZERO);
            }
        }

        #[test]
        fn parse_never_panics(text in proptest::collection::vec(proptest::sample::select(b"0123456789+-:,./<>JMPSTDU \xc3\xa9".to_vec()), 0..40)) {
            let text = String::from_utf8_lossy(&text);
            if let Ok(tz) = TimeZone::parse(&text) {
                let now = Instant::from_millis(1_772_971_200_000);
                let (start, end) = window(now, Period::Day, &tz);
                prop_assert!(start <= now && now < end);
            }
        }
    }
}
