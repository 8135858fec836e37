//! The value formats providers use to say "how many" and "when".
//!
//! Every parser trims surrounding blanks, rejects anything it does not fully understand (signs,
//! exponents, `inf`, `NaN`, trailing junk) and returns `None` rather than a value that could
//! overflow. Waits are rounded UP to whole milliseconds so a wait is never shortened.

/// A moment a provider names, before it is placed on the proxy's clock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum When {
    /// This many milliseconds after the response.
    In(u64),
    /// This Unix epoch millisecond, on the provider's clock.
    At(u64),
}

use crate::calendar::{days_from_civil, days_in_month};
use crate::time::NANOS_PER_MS;
const NANOS_PER_SECOND: u128 = 1_000_000_000;
const MS_PER_SECOND: u64 = 1000;
/// Fraction digits kept exactly; any further non-zero digit nudges the result up by one.
const MAX_FRACTION_DIGITS: usize = 18;

/// A plain decimal number as written: `12`, `2.5`, `.5`, `5.`.
struct Decimal<'a> {
    whole: &'a str,
    fraction: &'a str,
}

impl Decimal<'_> {
    /// `ceil(self * unit)`, or `None` if it does not fit in a u128.
    fn times_ceil(&self, unit: u128) -> Option<u128> {
        let whole = digits_value(self.whole)?.checked_mul(unit)?;
        let (kept, dropped) = self.fraction.split_at(self.fraction.len().min(MAX_FRACTION_DIGITS));
        let nudge = u128::from(dropped.bytes().any(|b| b != b'0'));
        let scale = 10u128.checked_pow(u32::try_from(kept.len()).ok()?)?;
        let fraction = digits_value(kept)?.checked_mul(unit)?.checked_add(nudge)?;
        whole.checked_add(fraction.div_ceil(scale))
    }

    /// The whole part as a number, for the epoch-or-delta decision.
    fn whole_value(&self) -> Option<u128> {
        digits_value(self.whole)
    }
}

/// Value of a run of ASCII digits (empty is 0), `None` on overflow.
fn digits_value(digits: &str) -> Option<u128> {
    digits.chars().try_fold(0u128, |acc, c| acc.checked_mul(10)?.checked_add(u128::from(c.to_digit(10)?)))
}

/// Splits a leading decimal number off `text`; `None` if there is none.
fn split_decimal(text: &str) -> Option<(Decimal<'_>, &str)> {
    let whole_end = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (whole, rest) = text.split_at(whole_end);
    let (fraction, rest) = match rest.strip_prefix('.') {
        Some(after_dot) => {
            let end = after_dot.find(|c: char| !c.is_ascii_digit()).unwrap_or(after_dot.len());
            after_dot.split_at(end)
        }
        None => ("", rest),
    };
    if whole.is_empty() && fraction.is_empty() {
        return None;
    }
    Some((Decimal { whole, fraction }, rest))
}

/// A whole decimal number and nothing else.
fn whole_decimal(text: &str) -> Option<Decimal<'_>> {
    match split_decimal(text.trim())? {
        (number, "") => Some(number),
        _ => None,
    }
}

/// Rounds nanoseconds up to whole milliseconds.
fn nanos_to_ms_ceil(nanos: u128) -> Option<u64> {
    u64::try_from(nanos.div_ceil(u128::from(NANOS_PER_MS))).ok()
}

/// Splits a Go duration unit off `text`, returning its length in nanoseconds.
/// `ms` is tried before `m`, and both spellings of micro (`µ` U+00B5, `μ` U+03BC) are accepted.
fn split_go_unit(text: &str) -> Option<(u128, &str)> {
    const UNITS: [(&str, u128); 8] = [
        ("ns", 1),
        ("us", 1_000),
        ("µs", 1_000),
        ("μs", 1_000),
        ("ms", 1_000_000),
        ("s", NANOS_PER_SECOND),
        ("m", 60 * NANOS_PER_SECOND),
        ("h", 3600 * NANOS_PER_SECOND),
    ];
    UNITS.iter().find_map(|&(unit, nanos)| {
        let head = text.get(..unit.len())?;
        let rest = text.get(unit.len()..)?;
        head.eq_ignore_ascii_case(unit).then_some((nanos, rest))
    })
}

/// Parses a Go-style duration (`1s`, `6m0s`, `12ms`, `2m59.56s`, `1.984999999s`) into
/// milliseconds, rounded up. A bare number is seconds. Units are case-insensitive.
pub fn parse_go_duration(text: &str) -> Option<u64> {
    let text = text.trim();
    if let Some(ms) = parse_delta_seconds(text) {
        return Some(ms);
    }
    if text.is_empty() {
        return None;
    }
    let mut rest = text;
    let mut nanos: u128 = 0;
    while !rest.is_empty() {
        let (number, after_number) = split_decimal(rest)?;
        let (unit, after_unit) = split_go_unit(after_number)?;
        nanos = nanos.checked_add(number.times_ceil(unit)?)?;
        rest = after_unit;
    }
    nanos_to_ms_ceil(nanos)
}

/// Parses delay-seconds (`30`, `0.5`) into milliseconds, rounded up.
pub fn parse_delta_seconds(text: &str) -> Option<u64> {
    nanos_to_ms_ceil(whole_decimal(text)?.times_ceil(NANOS_PER_SECOND)?)
}

/// Parses a millisecond count (`120000`), as in Azure's `retry-after-ms`; fractions round up.
pub fn parse_millis(text: &str) -> Option<u64> {
    nanos_to_ms_ceil(whole_decimal(text)?.times_ceil(u128::from(NANOS_PER_MS))?)
}

/// Parses a non-negative integer count such as `x-ratelimit-remaining-tokens: 149984`.
pub fn parse_count(text: &str) -> Option<u64> {
    let text = text.trim();
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    u64::try_from(digits_value(text)?).ok()
}

/// Reads the ambiguous `X-RateLimit-Reset` / `RateLimit-Reset` / `X-Rate-Limit-Reset` value:
/// a number >= 1e12 is epoch milliseconds, >= 1e9 epoch seconds, anything smaller delta seconds.
pub fn parse_ratelimit_reset(text: &str) -> Option<When> {
    const EPOCH_MS_FROM: u128 = 1_000_000_000_000;
    const EPOCH_SECONDS_FROM: u128 = 1_000_000_000;
    let number = whole_decimal(text)?;
    let whole = number.whole_value()?;
    if whole >= EPOCH_MS_FROM {
        Some(When::At(nanos_to_ms_ceil(number.times_ceil(u128::from(NANOS_PER_MS))?)?))
    } else if whole >= EPOCH_SECONDS_FROM {
        Some(When::At(nanos_to_ms_ceil(number.times_ceil(NANOS_PER_SECOND)?)?))
    } else {
        Some(When::In(nanos_to_ms_ceil(number.times_ceil(NANOS_PER_SECOND)?)?))
    }
}

/// A UTC calendar date and time of day, validated before conversion.
struct CivilTime {
    year: i64,
    month: u32,
    day: u32,
    hour: u32,
    minute: u32,
    second: u32,
}

impl CivilTime {
    /// Seconds since the Unix epoch, `None` for an impossible date. Leap second 60 is accepted
    /// and lands on the next minute's first second.
    fn epoch_seconds(&self) -> Option<i64> {
        let valid = (1..=12).contains(&self.month)
            && self.day >= 1
            && self.day <= days_in_month(self.year, self.month)
            && self.hour < 24
            && self.minute < 60
            && self.second <= 60;
        if !valid {
            return None;
        }
        let days = days_from_civil(self.year, self.month, self.day);
        let seconds_of_day = i64::from(self.hour * 3600 + self.minute * 60 + self.second);
        days.checked_mul(86_400)?.checked_add(seconds_of_day)
    }
}

/// Exactly `len` ASCII digits.
fn fixed_digits(text: &str, len: usize) -> Option<u32> {
    if text.len() != len || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    u32::try_from(digits_value(text)?).ok()
}

/// One or two ASCII digits (asctime pads the day with a space).
fn short_digits(text: &str) -> Option<u32> {
    fixed_digits(text, 1).or_else(|| fixed_digits(text, 2))
}

/// `HH:MM:SS` as (hour, minute, second).
fn clock_time(text: &str) -> Option<(u32, u32, u32)> {
    let mut parts = text.split(':');
    let hour = fixed_digits(parts.next()?, 2)?;
    let minute = fixed_digits(parts.next()?, 2)?;
    let second = fixed_digits(parts.next()?, 2)?;
    parts.next().is_none().then_some((hour, minute, second))
}

/// Month number of an English three-letter abbreviation, any case.
fn month_number(name: &str) -> Option<u32> {
    const MONTHS: [&str; 12] = ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"];
    let index = MONTHS.iter().position(|month| month.eq_ignore_ascii_case(name))?;
    u32::try_from(index + 1).ok()
}

/// Whether `name` is an English day name, short (`Sun`) or long (`Sunday`), any case.
fn is_day_name(name: &str) -> bool {
    const DAYS: [&str; 7] = ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"];
    DAYS.iter()
        .any(|day| day.eq_ignore_ascii_case(name) || day.get(..3).is_some_and(|short| short.eq_ignore_ascii_case(name)))
}

fn is_gmt(zone: &str) -> bool {
    zone.eq_ignore_ascii_case("GMT") || zone.eq_ignore_ascii_case("UTC")
}

/// Parses an HTTP-date (RFC 9110 section 5.6.7) into epoch milliseconds: IMF-fixdate
/// `Sun, 06 Nov 1994 08:49:37 GMT`, and the obsolete RFC 850 and asctime forms that recipients
/// must still accept. The weekday name is checked for shape only. Dates before 1970 are `None`.
pub fn parse_http_date(text: &str) -> Option<u64> {
    let words: Vec<&str> = text.split_whitespace().collect();
    let time = match words.as_slice() {
        [weekday, day, month, year, time, zone] if is_imf_weekday(weekday) && is_gmt(zone) => {
            civil_time(fixed_digits(year, 4)?, month_number(month)?, fixed_digits(day, 2)?, time)?
        }
        [weekday, date, time, zone] if is_imf_weekday(weekday) && is_gmt(zone) => rfc850_date(date, time)?,
        [weekday, month, day, time, year] if is_day_name(weekday) => {
            civil_time(fixed_digits(year, 4)?, month_number(month)?, short_digits(day)?, time)?
        }
        _ => return None,
    };
    epoch_ms(time.epoch_seconds()?, 0)
}

/// A weekday followed by the comma of IMF-fixdate and RFC 850.
fn is_imf_weekday(word: &str) -> bool {
    word.strip_suffix(',').is_some_and(is_day_name)
}

fn civil_time(year: u32, month: u32, day: u32, time: &str) -> Option<CivilTime> {
    let (hour, minute, second) = clock_time(time)?;
    Some(CivilTime { year: i64::from(year), month, day, hour, minute, second })
}

/// RFC 850 `06-Nov-94`: two-digit years below 70 are 20xx, the rest 19xx (no clock to compare).
fn rfc850_date(date: &str, time: &str) -> Option<CivilTime> {
    let mut parts = date.split('-');
    let day = fixed_digits(parts.next()?, 2)?;
    let month = month_number(parts.next()?)?;
    let short_year = fixed_digits(parts.next()?, 2)?;
    if parts.next().is_some() {
        return None;
    }
    let year = if short_year < 70 { 2000 + short_year } else { 1900 + short_year };
    civil_time(year, month, day, time)
}

/// Epoch milliseconds from seconds plus a millisecond part; `None` before 1970.
fn epoch_ms(seconds: i64, extra_ms: u64) -> Option<u64> {
    u64::try_from(seconds).ok()?.checked_mul(MS_PER_SECOND)?.checked_add(extra_ms)
}

/// Parses an RFC 3339 timestamp (`2026-09-27T10:00:45Z`, `2026-09-27T10:00:45.5+02:00`) into
/// epoch milliseconds; fractions round up. `T`/`Z` may be lower case or the `T` a space.
pub fn parse_rfc3339(text: &str) -> Option<u64> {
    let text = text.trim();
    let date = text.get(..10)?;
    let separator = text.get(10..11)?;
    let time = text.get(11..19)?;
    let rest = text.get(19..)?;
    if !matches!(separator, "T" | "t" | " ") {
        return None;
    }
    let (year, month, day) = iso_date(date)?;
    let (hour, minute, second) = clock_time(time)?;
    let (fraction, zone) = split_fraction(rest)?;
    let offset_seconds = utc_offset_seconds(zone)?;
    let local = CivilTime { year: i64::from(year), month, day, hour, minute, second }.epoch_seconds()?;
    let fraction_ms = Decimal { whole: "", fraction }.times_ceil(u128::from(MS_PER_SECOND))?;
    epoch_ms(local.checked_sub(offset_seconds)?, u64::try_from(fraction_ms).ok()?)
}

/// `YYYY-MM-DD` as (year, month, day).
fn iso_date(date: &str) -> Option<(u32, u32, u32)> {
    let mut parts = date.split('-');
    let year = fixed_digits(parts.next()?, 4)?;
    let month = fixed_digits(parts.next()?, 2)?;
    let day = fixed_digits(parts.next()?, 2)?;
    parts.next().is_none().then_some((year, month, day))
}

/// Splits an optional `.digits` fraction (at least one digit) off the front.
fn split_fraction(text: &str) -> Option<(&str, &str)> {
    let Some(after_dot) = text.strip_prefix('.') else {
        return Some(("", text));
    };
    let end = after_dot.find(|c: char| !c.is_ascii_digit()).unwrap_or(after_dot.len());
    (end > 0).then(|| after_dot.split_at(end))
}

/// `Z` or `±HH:MM` as seconds east of UTC.
fn utc_offset_seconds(zone: &str) -> Option<i64> {
    if zone.eq_ignore_ascii_case("z") {
        return Some(0);
    }
    let sign = match zone.get(..1)? {
        "+" => 1,
        "-" => -1,
        _ => return None,
    };
    let (hours, minutes) = zone.get(1..)?.split_once(':')?;
    let (hours, minutes) = (fixed_digits(hours, 2)?, fixed_digits(minutes, 2)?);
    if hours > 23 || minutes > 59 {
        return None;
    }
    Some(sign * i64::from(hours * 3600 + minutes * 60))
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn go_durations_from_the_reference() {
        assert_eq!(parse_go_duration("6m0s"), Some(360_000));
        assert_eq!(parse_go_duration("1s"), Some(1_000));
        assert_eq!(parse_go_duration("12ms"), Some(12));
        assert_eq!(parse_go_duration("174ms"), Some(174));
        assert_eq!(parse_go_duration("2m59.56s"), Some(179_560));
        assert_eq!(parse_go_duration("7.66s"), Some(7_660));
        assert_eq!(parse_go_duration("9m38.016s"), Some(578_016));
        assert_eq!(parse_go_duration("1.984999999s"), Some(1_985));
        assert_eq!(parse_go_duration("26s"), Some(26_000));
        assert_eq!(parse_go_duration("34.074824224s"), Some(34_075));
        assert_eq!(parse_go_duration("51820.638305887s"), Some(51_820_639));
    }

    #[test]
    fn go_duration_units_and_shapes() {
        assert_eq!(parse_go_duration("1h2m3s"), Some(3_723_000));
        assert_eq!(parse_go_duration("1.5h"), Some(5_400_000));
        assert_eq!(parse_go_duration("1500us"), Some(2));
        assert_eq!(parse_go_duration("1500µs"), Some(2));
        assert_eq!(parse_go_duration("1500μs"), Some(2));
        assert_eq!(parse_go_duration("1ns"), Some(1));
        assert_eq!(parse_go_duration("0"), Some(0));
        assert_eq!(parse_go_duration("0s"), Some(0));
        assert_eq!(parse_go_duration(".5s"), Some(500));
        assert_eq!(parse_go_duration("5.s"), Some(5_000));
        assert_eq!(parse_go_duration("55"), Some(55_000));
        assert_eq!(parse_go_duration(" 6M0S \t"), Some(360_000));
        assert_eq!(parse_go_duration("0.0000000000000000000001s"), Some(1));
    }

    #[test]
    fn go_duration_rejects_garbage() {
        for junk in [
            "",
            " ",
            "s",
            "ms",
            ".",
            "1h30",
            "-1s",
            "+1s",
            "1 s",
            "6m 0s",
            "1x",
            "1s!",
            "inf",
            "NaN",
            "1e3s",
            "99999999999999999999999s",
            "99999999999999999999999999999999999999999999h",
            "\u{fffd}",
            "1µ",
            "1s\u{0}",
        ] {
            assert_eq!(parse_go_duration(junk), None, "{junk:?}");
        }
    }

    #[test]
    fn delta_seconds_and_millis() {
        assert_eq!(parse_delta_seconds("120"), Some(120_000));
        assert_eq!(parse_delta_seconds(" 0.5 "), Some(500));
        assert_eq!(parse_delta_seconds("0.0001"), Some(1));
        assert_eq!(parse_delta_seconds("18446744073709551"), Some(18_446_744_073_709_551_000));
        assert_eq!(parse_delta_seconds("18446744073709552"), None);
        assert_eq!(parse_millis("120000"), Some(120_000));
        assert_eq!(parse_millis("1.2"), Some(2));
        for junk in ["", "-1", "+1", "1e3", "inf", "NaN", "1s", "1,5", "0x10", "١٢"] {
            assert_eq!(parse_delta_seconds(junk), None, "{junk:?}");
            assert_eq!(parse_millis(junk), None, "{junk:?}");
        }
    }

    #[test]
    fn counts_are_plain_non_negative_integers() {
        assert_eq!(parse_count(" 149984 "), Some(149_984));
        assert_eq!(parse_count("18446744073709551615"), Some(u64::MAX));
        for junk in ["", "-1", "1.0", "18446744073709551616", "1e3", "ten"] {
            assert_eq!(parse_count(junk), None, "{junk:?}");
        }
    }

    #[test]
    fn ratelimit_reset_is_epoch_or_delta_by_size() {
        assert_eq!(parse_ratelimit_reset("60"), Some(When::In(60_000)));
        assert_eq!(parse_ratelimit_reset("1655120964"), Some(When::At(1_655_120_964_000)));
        assert_eq!(parse_ratelimit_reset("1655120964123"), Some(When::At(1_655_120_964_123)));
        assert_eq!(parse_ratelimit_reset("999999999"), Some(When::In(999_999_999_000)));
        assert_eq!(parse_ratelimit_reset("1.5"), Some(When::In(1_500)));
        assert_eq!(parse_ratelimit_reset("99999999999999999999999"), None);
        assert_eq!(parse_ratelimit_reset("-5"), None);
        assert_eq!(parse_ratelimit_reset("Fri, 29 Sep 2023 16:26:57 GMT"), None);
    }

    #[test]
    fn http_dates_in_all_three_forms() {
        assert_eq!(parse_http_date("Fri, 29 Sep 2023 16:26:57 GMT"), Some(1_696_004_817_000));
        assert_eq!(parse_http_date("Fri, 29 Sep 2023 16:28:38 GMT"), Some(1_696_004_918_000));
        assert_eq!(parse_http_date("Mon, 13 Jun 2022 11:48:53 GMT"), Some(1_655_120_933_000));
        assert_eq!(parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT"), Some(784_111_777_000));
        assert_eq!(parse_http_date("Sunday, 06-Nov-94 08:49:37 GMT"), Some(784_111_777_000));
        assert_eq!(parse_http_date("Sun Nov  6 08:49:37 1994"), Some(784_111_777_000));
        assert_eq!(parse_http_date("  sun, 06 NOV 1994 08:49:37 gmt "), Some(784_111_777_000));
        assert_eq!(parse_http_date("Thu, 01 Jan 1970 00:00:00 GMT"), Some(0));
        assert_eq!(parse_http_date("Thu, 29 Feb 2024 00:00:00 GMT"), Some(1_709_164_800_000));
        assert_eq!(parse_http_date("Fri, 31 Dec 9999 23:59:59 GMT"), Some(253_402_300_799_000));
    }

    #[test]
    fn http_date_rejects_garbage() {
        for junk in [
            "",
            "120",
            "Fri, 29 Sep 2023 16:26:57",
            "Fri, 29 Sep 2023 16:26:57 PST",
            "Fri 29 Sep 2023 16:26:57 GMT",
            "Fri, 29 Foo 2023 16:26:57 GMT",
            "Fri, 30 Feb 2023 16:26:57 GMT",
            "Fri, 29 Feb 2023 16:26:57 GMT",
            "Fri, 29 Sep 2023 24:00:00 GMT",
            "Fri, 29 Sep 1969 16:26:57 GMT",
            "Fri, 29 Sep 2023 16:26 GMT",
            "Fri, 29 Sep 2023 16:26:57:00 GMT",
            "Xyz, 29 Sep 2023 16:26:57 GMT",
            "Fri, 29 Sep 20233 16:26:57 GMT",
            "Fri, ２9 Sep 2023 16:26:57 GMT",
            // Found by fuzz/ (dates): httpdate accepts any byte between an RFC 850 date and its
            // time; a space is required here, as RFC 9110 writes it.
            "Sunday, 06-Nov-94(08:49:37 GMT",
        ] {
            assert_eq!(parse_http_date(junk), None, "{junk:?}");
        }
    }

    #[test]
    fn rfc3339_with_offsets_and_fractions() {
        assert_eq!(parse_rfc3339("2026-09-27T10:00:45Z"), Some(1_790_503_245_000));
        assert_eq!(parse_rfc3339("2023-09-29T16:26:37Z"), Some(1_696_004_797_000));
        assert_eq!(parse_rfc3339("2023-09-29t16:26:37z"), Some(1_696_004_797_000));
        assert_eq!(parse_rfc3339("2023-09-29 16:26:37Z"), Some(1_696_004_797_000));
        assert_eq!(parse_rfc3339("2023-09-29T18:26:37+02:00"), Some(1_696_004_797_000));
        assert_eq!(parse_rfc3339("2023-09-29T11:56:37-04:30"), Some(1_696_004_797_000));
        assert_eq!(parse_rfc3339("2023-09-29T16:26:37.5Z"), Some(1_696_004_797_500));
        assert_eq!(parse_rfc3339("2023-09-29T16:26:37.0001Z"), Some(1_696_004_797_001));
        assert_eq!(parse_rfc3339("2023-09-29T16:26:37.123456789Z"), Some(1_696_004_797_124));
        assert_eq!(parse_rfc3339("2016-12-31T23:59:60Z"), Some(1_483_228_800_000));
        // Found by fuzz/ (dates, against chrono): the leap second just before the epoch is the epoch.
        assert_eq!(parse_rfc3339("1969-12-31T23:59:60Z"), Some(0));
        assert_eq!(parse_rfc3339("2000-02-29T00:00:00Z"), Some(951_782_400_000));
    }

    #[test]
    fn rfc3339_rejects_garbage() {
        for junk in [
            "",
            "2026-09-27",
            "2026-09-27T10:00:45",
            "2026-09-27T10:00:45+0200",
            "2026-09-27T10:00:45+24:00",
            "2026-13-27T10:00:45Z",
            "2026-09-31T10:00:45Z",
            "1900-02-29T00:00:00Z",
            "1969-12-31T23:59:59Z",
            "1970-01-01T00:30:00+01:00",
            "2026-09-27X10:00:45Z",
            "2026-09-27T10:00:45.Z",
            "2026-09-27T10:00:45Zjunk",
            "2026-09-27T10:00:4５Z",
            "1790503245",
        ] {
            assert_eq!(parse_rfc3339(junk), None, "{junk:?}");
        }
    }

    #[test]
    fn civil_math_matches_known_days() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        assert_eq!(days_from_civil(1969, 12, 31), -1);
        assert_eq!(days_from_civil(2400, 2, 29), 157_113);
    }
}
