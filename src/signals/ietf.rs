//! IETF `RateLimit` and `RateLimit-Policy` (draft-ietf-httpapi-ratelimit-headers).
//!
//! Draft 10 sends structured-field lists of named items with parameters:
//! `RateLimit-Policy: "burst";q=100;w=60` (q quota, w window, qu unit, pk partition key) and
//! `RateLimit: "burst";r=50;t=30` (r remaining, t seconds until more quota). Draft 07 sent one
//! dictionary, `RateLimit: limit=100, remaining=50, reset=5`. Drafts up to 06 used separate
//! `RateLimit-Limit`/`-Remaining`/`-Reset` headers, read with the `X-RateLimit-*` trios.
//! Window, unit and partition key do not change when quota comes back, so only q, r and t are
//! used. Malformed members are ignored.

use super::values::{parse_count, parse_delta_seconds, When};
use super::{Clock, Headers, QuotaDimension};

/// The binding quota the `RateLimit` header reports, with its limit from `RateLimit-Policy`.
pub(super) fn read(headers: &Headers, clock: &Clock) -> QuotaDimension {
    let Some(field) = headers.get("ratelimit") else {
        return QuotaDimension::default();
    };
    let members = split_outside_quotes(field, ',');
    if members.iter().any(|member| is_dictionary_entry(member)) {
        return draft07(&members, clock);
    }
    let policies = headers.get("ratelimit-policy").map(|p| split_outside_quotes(p, ',')).unwrap_or_default();
    members
        .iter()
        .map(|member| draft10(member, &policies, clock))
        .fold(QuotaDimension::default(), QuotaDimension::tighter)
}

/// Draft 07 entries are `key=value` at the top level, where draft 10 has a name.
fn is_dictionary_entry(member: &str) -> bool {
    split_outside_quotes(member, ';').first().is_some_and(|item| item.contains('='))
}

/// Draft 07: `limit=100, remaining=50, reset=5`.
fn draft07(members: &[&str], clock: &Clock) -> QuotaDimension {
    let entry = |key: &str| {
        members.iter().find_map(|member| {
            let item = split_outside_quotes(member, ';').into_iter().next()?;
            let (name, value) = item.split_once('=')?;
            name.trim().eq_ignore_ascii_case(key).then_some(value.trim())
        })
    };
    QuotaDimension {
        remaining: entry("remaining").and_then(parse_count),
        limit: entry("limit").and_then(parse_count),
        reset: clock.wait(entry("reset").and_then(parse_delta_seconds).map(When::In)),
    }
}

/// One draft 10 `RateLimit` member; its limit is `q` of the policy with the same name.
fn draft10(member: &str, policies: &[&str], clock: &Clock) -> QuotaDimension {
    let name = item_name(member);
    let policy = policies.iter().find(|policy| item_name(policy) == name);
    QuotaDimension {
        remaining: param(member, "r").and_then(parse_count),
        limit: policy.and_then(|policy| param(policy, "q")).and_then(parse_count),
        reset: clock.wait(param(member, "t").and_then(parse_delta_seconds).map(When::In)),
    }
}

/// The member's item with quotes removed: `"burst";q=1` gives `burst`.
fn item_name(member: &str) -> &str {
    let item = split_outside_quotes(member, ';').into_iter().next().unwrap_or("");
    item.strip_prefix('"').and_then(|rest| rest.strip_suffix('"')).unwrap_or(item)
}

/// The value of parameter `key` of a member, if present.
fn param<'a>(member: &'a str, key: &str) -> Option<&'a str> {
    split_outside_quotes(member, ';').into_iter().skip(1).find_map(|param| {
        let (name, value) = param.split_once('=')?;
        name.trim().eq_ignore_ascii_case(key).then_some(value.trim())
    })
}

/// Splits `text` on `separator` where it is not inside a quoted string; pieces are trimmed.
fn split_outside_quotes(text: &str, separator: char) -> Vec<&str> {
    let mut pieces = Vec::new();
    let (mut start, mut quoted, mut escaped) = (0, false, false);
    for (index, c) in text.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            _ if c == separator && !quoted => {
                pieces.push(text.get(start..index).unwrap_or("").trim());
                start = index + c.len_utf8();
            }
            _ => {}
        }
    }
    pieces.push(text.get(start..).unwrap_or("").trim());
    pieces
}

#[cfg(test)]
mod tests {
    use super::super::{parse, Provider, Signals};
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    const NOW: u64 = 1_696_004_797_000;
    const DAY: u64 = 86_400_000;

    fn read(headers: &[(&str, &str)]) -> Signals {
        parse(Provider::Auto, 429, headers, None, NOW, DAY)
    }

    #[test]
    fn draft10_remaining_with_time_until_more() {
        let s = read(&[("RateLimit", "\"default\";r=50;t=30")]);
        assert_eq!(s.remaining_requests, Some(50));
        assert_eq!(s.requests_reset_ms, Some(NOW + 30_000));
        assert_eq!(s.retry_at(), None, "quota left");
    }

    #[test]
    fn draft10_exhausted() {
        let s = read(&[("RateLimit", "\"default\";r=0;t=50")]);
        assert_eq!(s.remaining_requests, Some(0));
        assert_eq!(s.retry_at(), Some(NOW + 50_000));
    }

    #[test]
    fn draft10_policy_gives_limits_by_name() {
        let s = read(&[
            ("RateLimit-Policy", "\"permin\";q=50;w=60,\"perhr\";q=1000;w=3600"),
            ("RateLimit", "\"permin\";r=40;t=10, \"perhr\";r=100;t=1200"),
        ]);
        assert_eq!((s.remaining_requests, s.limit_requests), (Some(100), Some(1_000)));
        assert_eq!(s.remaining_fraction(), Some(0.1));
        assert_eq!(s.requests_reset_ms, Some(NOW + 1_200_000));
    }

    #[test]
    fn draft10_policy_with_unit_and_partition_key() {
        let s = read(&[
            ("RateLimit-Policy", "\"burst\";q=100;w=60;qu=\"requests\";pk=:cHsdsRa894==:, \"daily\";q=1000;w=86400"),
            ("RateLimit", "\"burst\";r=0;t=5;pk=:cHsdsRa894==:, \"daily\";r=0;t=7200"),
        ]);
        assert_eq!(s.limit_requests, Some(1_000));
        assert_eq!(s.retry_at(), Some(NOW + 7_200_000));
    }

    #[test]
    fn retry_after_wins_over_t() {
        let s = read(&[("RateLimit", "\"default\";r=0;t=50"), ("Retry-After", "20")]);
        assert_eq!(s.retry_at_ms, Some(NOW + 20_000));
        assert_eq!(s.retry_at(), Some(NOW + 20_000));
    }

    #[test]
    fn draft07_dictionary() {
        let s = read(&[("RateLimit", "limit=100, remaining=50, reset=5")]);
        assert_eq!((s.remaining_requests, s.limit_requests), (Some(50), Some(100)));
        assert_eq!(s.requests_reset_ms, Some(NOW + 5_000));
        let s = read(&[("ratelimit", "LIMIT=100 , REMAINING=0 , RESET=5")]);
        assert_eq!(s.retry_at(), Some(NOW + 5_000));
    }

    #[test]
    fn quoted_commas_and_semicolons_stay_in_the_name() {
        let s = read(&[("RateLimit-Policy", "\"a,b;c\";q=10"), ("RateLimit", "\"a,b;c\";r=0;t=3")]);
        assert_eq!((s.limit_requests, s.retry_at()), (Some(10), Some(NOW + 3_000)));
        assert_eq!(split_outside_quotes(r#""x\"y,z";r=1, b"#, ','), vec![r#""x\"y,z";r=1"#, "b"]);
    }

    #[test]
    fn malformed_fields_are_ignored() {
        for junk in [
            "",
            ",,,",
            "\"unterminated;r=0;t=5",
            "\"d\";r=-1;t=5",
            "\"d\";r=0;t=-5",
            "\"d\";r=0;t=inf",
            "\"d\";r;t",
            "é;r=0;t=\u{fffd}",
        ] {
            let s = read(&[("RateLimit", junk)]);
            assert_eq!(s.retry_at(), None, "{junk:?}");
        }
        let s = read(&[("RateLimit", "\"d\";r=0"), ("RateLimit-Policy", "garbage;;;q=")]);
        assert_eq!((s.remaining_requests, s.limit_requests, s.retry_at()), (Some(0), None, None));
    }
}
