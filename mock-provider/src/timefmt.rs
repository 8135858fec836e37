//! Time formats that real providers put in rate-limit headers and bodies.
//! Hand-written so the mock needs no date/time crates.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Rounds up to whole milliseconds: providers report ms precision, and rounding
/// up means a client that waits the advertised time is never early.
pub fn ceil_ms(d: Duration) -> Duration {
    Duration::from_millis(d.as_nanos().div_ceil(1_000_000) as u64)
}

/// Whole seconds, rounded up (for `retry-after` and other integer-second headers).
pub fn ceil_secs(d: Duration) -> u64 {
    d.as_nanos().div_ceil(1_000_000_000) as u64
}

/// Formats like Go's `time.Duration.String()`: `0s`, `12ms`, `1.5s`, `6m0s`, `1h2m3.5s`.
/// OpenAI and Groq send their `x-ratelimit-reset-*` values in this format.
pub fn go_duration(d: Duration) -> String {
    let ns = d.as_nanos();
    match ns {
        0 => "0s".to_string(),
        1..=999 => format!("{ns}ns"),
        1_000..=999_999 => format!("{}µs", with_fraction(ns / 1_000, ns % 1_000, 3)),
        1_000_000..=999_999_999 => {
            format!("{}ms", with_fraction(ns / 1_000_000, ns % 1_000_000, 6))
        }
        _ => {
            let secs = ns / 1_000_000_000;
            let (h, m, s) = (secs / 3600, secs / 60 % 60, secs % 60);
            let s = with_fraction(s, ns % 1_000_000_000, 9);
            if h > 0 {
                format!("{h}h{m}m{s}s")
            } else if m > 0 {
                format!("{m}m{s}s")
            } else {
                format!("{s}s")
            }
        }
    }
}

/// Protobuf `Duration` JSON form used by Gemini's `RetryInfo.retryDelay`: `26s`, `26.5s`.
pub fn proto_duration(d: Duration) -> String {
    format!("{}s", with_fraction(d.as_secs() as u128, d.subsec_nanos() as u128, 9))
}

/// `whole.frac` with `digits` fractional digits, trailing zeros trimmed.
fn with_fraction(whole: u128, frac: u128, digits: usize) -> String {
    if frac == 0 {
        return whole.to_string();
    }
    let frac = format!("{frac:0digits$}");
    format!("{whole}.{}", frac.trim_end_matches('0'))
}

/// Seconds since the Unix epoch, with the sub-second part.
pub fn epoch(t: SystemTime) -> Duration {
    t.duration_since(UNIX_EPOCH).unwrap_or_default()
}

/// RFC 3339 UTC with whole seconds, e.g. `2026-09-27T10:00:45Z` (Anthropic resets).
pub fn rfc3339(epoch_secs: u64) -> String {
    let (y, mo, d) = civil_from_days((epoch_secs / 86_400) as i64);
    let s = epoch_secs % 86_400;
    format!("{y:04}-{mo:02}-{d:02}T{:02}:{:02}:{:02}Z", s / 3600, s / 60 % 60, s % 60)
}

/// IMF-fixdate (RFC 9110), e.g. `Fri, 29 Sep 2023 16:26:57 GMT`, for `Date`/`Retry-After`.
pub fn http_date(epoch_secs: u64) -> String {
    const DAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"]; // 1970-01-01 was a Thursday
    const MONTHS: [&str; 12] = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
    let days = epoch_secs / 86_400;
    let (y, mo, d) = civil_from_days(days as i64);
    let s = epoch_secs % 86_400;
    format!(
        "{}, {d:02} {} {y:04} {:02}:{:02}:{:02} GMT",
        DAYS[(days % 7) as usize],
        MONTHS[(mo - 1) as usize],
        s / 3600,
        s / 60 % 60,
        s % 60
    )
}

/// The first day of the month after `epoch_secs`, e.g. `2026-10-01` (spend limits reset then).
pub fn next_month_start(epoch_secs: u64) -> String {
    let (y, m, _) = civil_from_days((epoch_secs / 86_400) as i64);
    let (y, m) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
    format!("{y:04}-{m:02}-01")
}

/// Days since 1970-01-01 to (year, month, day); Howard Hinnant's `civil_from_days`.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn go_duration_matches_go() {
        assert_eq!(go_duration(Duration::ZERO), "0s");
        assert_eq!(go_duration(Duration::from_nanos(999)), "999ns");
        assert_eq!(go_duration(Duration::from_nanos(1_500)), "1.5µs");
        assert_eq!(go_duration(ms(12)), "12ms");
        assert_eq!(go_duration(Duration::from_micros(174_500)), "174.5ms");
        assert_eq!(go_duration(ms(1000)), "1s");
        assert_eq!(go_duration(ms(1500)), "1.5s");
        assert_eq!(go_duration(ms(6596)), "6.596s");
        assert_eq!(go_duration(ms(59_123)), "59.123s");
        assert_eq!(go_duration(ms(60_000)), "1m0s");
        assert_eq!(go_duration(ms(360_000)), "6m0s");
        assert_eq!(go_duration(ms(179_560)), "2m59.56s");
        assert_eq!(go_duration(ms(578_016)), "9m38.016s");
        assert_eq!(go_duration(Duration::from_nanos(1_984_999_999)), "1.984999999s");
        assert_eq!(go_duration(ms(3_600_000)), "1h0m0s");
        assert_eq!(go_duration(ms(3_723_500)), "1h2m3.5s");
    }

    #[test]
    fn rounding_up() {
        assert_eq!(ceil_ms(Duration::from_nanos(1)), ms(1));
        assert_eq!(ceil_ms(Duration::from_micros(6_595_001)), ms(6596));
        assert_eq!(ceil_secs(ms(0)), 0);
        assert_eq!(ceil_secs(ms(1)), 1);
        assert_eq!(ceil_secs(ms(2000)), 2);
        assert_eq!(ceil_secs(ms(2001)), 3);
    }

    #[test]
    fn proto_durations() {
        assert_eq!(proto_duration(ms(26_000)), "26s");
        assert_eq!(proto_duration(ms(26_500)), "26.5s");
        assert_eq!(proto_duration(Duration::from_nanos(34_074_824_224)), "34.074824224s");
    }

    #[test]
    fn dates() {
        // Vectors from the provider reference.
        assert_eq!(rfc3339(1_790_503_245), "2026-09-27T10:00:45Z");
        assert_eq!(http_date(1_696_004_817), "Fri, 29 Sep 2023 16:26:57 GMT");
        assert_eq!(http_date(1_655_120_933), "Mon, 13 Jun 2022 11:48:53 GMT");
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(next_month_start(1_790_503_245), "2026-10-01");
        assert_eq!(next_month_start(1_703_980_800), "2024-01-01"); // 2023-12-31
    }
}
