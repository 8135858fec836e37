//! What an LLM provider's response says about quota: how much is left, when it comes back, and
//! whether a retry can help at all.
//!
//! [`parse`] reads response headers (and the body of an error response) into [`Signals`]. It is
//! pure: time comes in as `now_ms`, nothing is read from the host, and no input can make it
//! panic. Anything it does not understand is ignored; unknown is `None` (the caller backs off),
//! never "retry now".
//!
//! ```
//! use llm_ratelimit::signals::{parse, Provider};
//!
//! let headers = [("x-ratelimit-remaining-tokens", "0"), ("x-ratelimit-reset-tokens", "6m0s")];
//! let signals = parse(Provider::Auto, 429, &headers, None, 1_000, 86_400_000);
//! assert_eq!(signals.provider, Provider::OpenAi);
//! assert_eq!(signals.retry_at(), Some(1_000 + 360_000));
//! ```
//!
//! Formats read:
//! - `retry-after-ms`, `x-ms-retry-after-ms` (Azure, milliseconds) and `Retry-After`
//!   (delay-seconds or HTTP-date), checked in that order.
//! - OpenAI, Azure and Groq `x-ratelimit-{limit,remaining,reset}-{requests,tokens}` (resets are
//!   Go durations like `6m0s`, or Azure's integer seconds, also spelled `x-rate-limit-reset-*`).
//! - Anthropic `anthropic-ratelimit-{requests,tokens,input-tokens,output-tokens}-*` (RFC 3339).
//! - Mistral `ratelimitbysize-*` and `x-ratelimit-{limit,remaining}-{tokens-minute,tokens-month,req-minute}`.
//! - AWS Bedrock `x-amzn-ErrorType`.
//! - The `X-RateLimit-*`, `X-Rate-Limit-*` and `RateLimit-*` trios (reset: epoch ms, epoch s or
//!   delta s by size) and IETF `RateLimit` / `RateLimit-Policy` (drafts 07 and 10), see `ietf.rs`.
//! - Error bodies: Gemini `RetryInfo` / `QuotaFailure`, OpenAI/Azure/Anthropic error codes and
//!   "try again in 6.596s" / "retry after 37 seconds" phrases, see `body.rs`.
//!
//! Absolute instants (HTTP-date, epoch, RFC 3339) are measured against the response's `Date`
//! header when it has one, so a skewed provider clock cancels out, and then placed on `now_ms`.

mod body;
mod ietf;
mod providers;
mod values;

use std::cell::OnceCell;

pub use values::{
    parse_count, parse_delta_seconds, parse_go_duration, parse_http_date, parse_millis, parse_ratelimit_reset,
    parse_rfc3339, When,
};

/// Which provider's conventions to read. `Auto` detects from the headers present.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Provider {
    #[default]
    Auto,
    OpenAi,
    Azure,
    Anthropic,
    Gemini,
    Groq,
    Mistral,
    Cohere,
    Bedrock,
    Generic,
}

impl Provider {
    /// Every provider, in the order of its lower-case names.
    pub const ALL: [Provider; 10] = [
        Provider::Auto,
        Provider::OpenAi,
        Provider::Azure,
        Provider::Anthropic,
        Provider::Gemini,
        Provider::Groq,
        Provider::Mistral,
        Provider::Cohere,
        Provider::Bedrock,
        Provider::Generic,
    ];

    /// Parses a configured name, ignoring case and surrounding blanks.
    pub fn parse(name: &str) -> Option<Provider> {
        let name = name.trim();
        Provider::ALL.into_iter().find(|p| p.name().eq_ignore_ascii_case(name))
    }

    /// Lower-case name as written in config and stats.
    pub fn name(self) -> &'static str {
        match self {
            Provider::Auto => "auto",
            Provider::OpenAi => "openai",
            Provider::Azure => "azure",
            Provider::Anthropic => "anthropic",
            Provider::Gemini => "gemini",
            Provider::Groq => "groq",
            Provider::Mistral => "mistral",
            Provider::Cohere => "cohere",
            Provider::Bedrock => "bedrock",
            Provider::Generic => "generic",
        }
    }
}

/// A quota that a short retry cannot fix: the caller should park or fail, not retry soon.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Terminal {
    /// OpenAI `insufficient_quota`: the account is out of credit.
    InsufficientQuota,
    /// A spend cap: Anthropic's `enforced_spend_limit_reached` or a message naming the spend
    /// limit (lasts until the 1st of the month), or OpenAI's `billing_hard_limit_reached`.
    SpendLimit,
    /// A per-day quota: Gemini `PerDay`/`Daily` quota ids, or a phrase asking to wait a whole day.
    DailyQuota,
    /// The request alone exceeds the limit ("Request too large", `request_too_large`): it never fits.
    RequestTooLarge,
    /// Mistral's monthly token quota is spent.
    MonthlyQuota,
    /// Bedrock `ServiceQuotaExceededException`: an account quota, back off long.
    ServiceQuota,
    /// The wait that decides is longer than `max_wait_ms` (or, for Gemini, over 300 s).
    LongWait,
}

/// What one provider response says about quota.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Signals {
    /// The provider whose conventions were read: configured, or detected under `Auto`
    /// (`Generic` when nothing provider-specific was seen).
    pub provider: Provider,
    pub remaining_requests: Option<u64>,
    pub remaining_tokens: Option<u64>,
    pub limit_requests: Option<u64>,
    pub limit_tokens: Option<u64>,
    /// Absolute epoch ms when the request dimension resets.
    pub requests_reset_ms: Option<u64>,
    /// Absolute epoch ms when the token dimension resets.
    pub tokens_reset_ms: Option<u64>,
    /// Absolute epoch ms the provider says to retry at: `retry-after-ms`, `x-ms-retry-after-ms`,
    /// `Retry-After`, Gemini `RetryInfo`, else a message phrase when no exhausted reset is known.
    pub retry_at_ms: Option<u64>,
    /// A quota a short retry cannot fix. Check it before [`Signals::retry_at`].
    pub terminal: Option<Terminal>,
    /// The response says this request was rate-limited: status 429, or Bedrock's
    /// `ThrottlingException` whatever the status.
    pub throttled: bool,
}

impl Signals {
    /// The instant (epoch ms) when a retry can succeed: the explicit retry instant if any, else
    /// the latest known reset among exhausted dimensions (remaining 0), else `None`.
    pub fn retry_at(&self) -> Option<u64> {
        let exhausted_reset = |remaining: Option<u64>, reset: Option<u64>| reset.filter(|_| remaining == Some(0));
        self.retry_at_ms.or_else(|| {
            exhausted_reset(self.remaining_requests, self.requests_reset_ms)
                .max(exhausted_reset(self.remaining_tokens, self.tokens_reset_ms))
        })
    }

    /// Remaining quota as a fraction of the limit (0.0 to 1.0), the smallest over the dimensions
    /// that report both; for the circuit breaker's safe threshold.
    pub fn remaining_fraction(&self) -> Option<f64> {
        let requests = fraction(self.remaining_requests, self.limit_requests);
        let tokens = fraction(self.remaining_tokens, self.limit_tokens);
        match (requests, tokens) {
            (Some(r), Some(t)) => Some(r.min(t)),
            (r, t) => r.or(t),
        }
    }
}

/// `remaining / limit` capped at 1; `None` without both or with a zero limit.
fn fraction(remaining: Option<u64>, limit: Option<u64>) -> Option<f64> {
    let (remaining, limit) = (remaining?, limit?);
    (limit > 0).then(|| (remaining as f64 / limit as f64).min(1.0))
}

/// Reads one provider response. `headers` are (name, value) pairs, names compared
/// case-insensitively; `body` is the response body when the caller has it (only read for
/// status >= 400, so a completion's text is never mistaken for advice). `max_wait_ms` caps a
/// wait: anything longer is [`Terminal::LongWait`], not an instant.
pub fn parse(
    provider: Provider,
    status: u16,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
    now_ms: u64,
    max_wait_ms: u64,
) -> Signals {
    let headers = Headers::new(headers);
    let clock = Clock { now_ms, date: headers.get("date"), date_ms: OnceCell::new(), max_wait_ms };
    let body = body.filter(|_| status >= 400).map(body::read).unwrap_or_default();
    let quota = providers::read(provider, &headers, &clock);

    // The reference's order: an explicit retry, then the exhausted dimension's reset, then a
    // delay phrase in the message.
    let explicit = explicit_retry(&headers, &clock).or_else(|| clock.wait(body.retry_delay_ms.map(When::In)));
    let reset = quota.exhausted_reset();
    let retry = explicit.or_else(|| match reset {
        Wait::Unknown => clock.wait(body.phrase_delay_ms.map(When::In)),
        _ => Wait::Unknown,
    });
    let long_wait = (retry.or_else(|| reset) == Wait::TooLong).then_some(Terminal::LongWait);

    Signals {
        provider: match provider {
            Provider::Auto => providers::detect(&headers, body.is_gemini),
            configured => configured,
        },
        remaining_requests: quota.requests.remaining,
        remaining_tokens: quota.tokens.remaining,
        limit_requests: quota.requests.limit,
        limit_tokens: quota.tokens.limit,
        requests_reset_ms: quota.requests.reset.until(),
        tokens_reset_ms: quota.tokens.reset.until(),
        retry_at_ms: retry.until(),
        terminal: body.terminal.or(quota.terminal).or(long_wait),
        throttled: status == 429 || quota.throttled,
    }
}

/// The first retry header that gives a usable wait: `retry-after-ms`, `x-ms-retry-after-ms`,
/// then `Retry-After` (delay-seconds or HTTP-date, never epoch).
fn explicit_retry(headers: &Headers, clock: &Clock) -> Wait {
    let millis = |name| clock.wait(headers.get(name).and_then(parse_millis).map(When::In));
    let retry_after = || {
        let value = headers.get("retry-after");
        let delay = value.and_then(parse_delta_seconds).map(When::In);
        clock.wait(delay.or_else(|| value.and_then(parse_http_date).map(When::At)))
    };
    millis("retry-after-ms").or_else(|| millis("x-ms-retry-after-ms")).or_else(retry_after)
}

/// Response headers, looked up by case-insensitive name; the first occurrence wins. A response
/// is looked up some sixty times under `auto`, so names are trimmed once, and a lookup allocates
/// nothing and rejects a name by its length before comparing it.
struct Headers<'a>(Vec<(&'a [u8], &'a str)>);

impl<'a> Headers<'a> {
    fn new(pairs: &[(&'a str, &'a str)]) -> Self {
        Headers(pairs.iter().map(|(n, v)| (n.trim_ascii().as_bytes(), *v)).collect())
    }

    /// The trimmed value of `name`.
    fn get(&self, name: &str) -> Option<&'a str> {
        self.get_joined(&[name])
    }

    /// The trimmed value of the header named by `parts` joined (`["x-ratelimit-", kind]`).
    fn get_joined(&self, parts: &[&str]) -> Option<&'a str> {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        let named = |mut rest: &[u8]| {
            rest.len() == len
                && parts.iter().all(|p| match rest.split_at_checked(p.len()) {
                    Some((head, tail)) => {
                        rest = tail;
                        head.eq_ignore_ascii_case(p.as_bytes())
                    }
                    None => false,
                })
        };
        self.0.iter().find(|(n, _)| named(n)).map(|(_, v)| v.trim())
    }

    /// Whether any header name starts with `prefix` (lower case).
    fn any_starting_with(&self, prefix: &str) -> bool {
        let prefix = prefix.as_bytes();
        self.0.iter().any(|(n, _)| n.get(..prefix.len()).is_some_and(|h| h.eq_ignore_ascii_case(prefix)))
    }
}

/// Clock differences up to this are taken for `Date`'s rounding, not skew.
const MAX_TRUSTED_SKEW_MS: u64 = 2_000;

/// Places provider moments on the proxy's clock.
struct Clock<'a> {
    now_ms: u64,
    /// The response's `Date`, which absolute instants are measured against: parsed when the
    /// first one is (most answers carry none, and every answer carries a `Date`).
    date: Option<&'a str>,
    date_ms: OnceCell<Option<u64>>,
    max_wait_ms: u64,
}

/// How long until something comes back, placed on the proxy's clock. Ordered from least to
/// most waiting, so `max` picks the wait that decides.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
enum Wait {
    /// Not said, unparseable, zero or in the past: the caller backs off.
    #[default]
    Unknown,
    /// Epoch ms on the proxy's clock.
    Until(u64),
    /// Longer than the cap.
    TooLong,
}

impl Wait {
    fn until(self) -> Option<u64> {
        match self {
            Wait::Until(at) => Some(at),
            _ => None,
        }
    }

    /// `self` unless it is unknown.
    fn or_else(self, next: impl FnOnce() -> Wait) -> Wait {
        match self {
            Wait::Unknown => next(),
            known => known,
        }
    }
}

impl Clock<'_> {
    /// What absolute instants are measured against. `Date` has whole-second precision, so it
    /// is used only to correct a real clock skew between the provider and the proxy.
    fn base_ms(&self) -> u64 {
        match *self.date_ms.get_or_init(|| self.date.and_then(parse_http_date)) {
            Some(date) if date.abs_diff(self.now_ms) > MAX_TRUSTED_SKEW_MS => date,
            _ => self.now_ms,
        }
    }

    /// Converts a moment: a zero or negative delay is unknown (a 429 that says "now" is not
    /// trusted, as the official SDKs do not), a delay over the cap is too long.
    fn wait(&self, when: Option<When>) -> Wait {
        let delay = match when {
            Some(When::In(ms)) => Some(ms),
            Some(When::At(at)) => at.checked_sub(self.base_ms()),
            None => None,
        };
        match delay {
            None | Some(0) => Wait::Unknown,
            Some(ms) if ms > self.max_wait_ms => Wait::TooLong,
            Some(ms) => self.now_ms.checked_add(ms).map_or(Wait::Unknown, Wait::Until),
        }
    }
}

/// One quota dimension (requests or tokens) as one header family reports it.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct QuotaDimension {
    remaining: Option<u64>,
    limit: Option<u64>,
    reset: Wait,
}

impl QuotaDimension {
    fn is_exhausted(&self) -> bool {
        self.remaining == Some(0)
    }

    fn is_empty(&self) -> bool {
        *self == QuotaDimension::default()
    }

    /// Of two reports of the same dimension, the one that binds: an exhausted one (the later
    /// reset if both are), else the lower fraction left, else the lower count left.
    fn tighter(self, other: QuotaDimension) -> QuotaDimension {
        if self.is_empty() {
            return other;
        }
        if other.is_empty() {
            return self;
        }
        let other_binds = match (self.is_exhausted(), other.is_exhausted()) {
            (true, true) => other.reset > self.reset,
            (exhausted, other_exhausted) if exhausted != other_exhausted => other_exhausted,
            _ => match (fraction(self.remaining, self.limit), fraction(other.remaining, other.limit)) {
                (Some(mine), Some(theirs)) => theirs < mine,
                _ => other.remaining.is_some_and(|theirs| self.remaining.is_none_or(|mine| theirs < mine)),
            },
        };
        if other_binds {
            other
        } else {
            self
        }
    }
}

/// What the quota headers of a response say, across header families.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct Quota {
    requests: QuotaDimension,
    tokens: QuotaDimension,
    terminal: Option<Terminal>,
    /// A provider throttle marker was seen (Bedrock `ThrottlingException`).
    throttled: bool,
}

impl Quota {
    /// Combines two families' reports, keeping the binding bucket of each dimension.
    fn merge(self, other: Quota) -> Quota {
        Quota {
            requests: self.requests.tighter(other.requests),
            tokens: self.tokens.tighter(other.tokens),
            terminal: self.terminal.or(other.terminal),
            throttled: self.throttled || other.throttled,
        }
    }

    /// The reset that decides when exhausted dimensions come back: the latest.
    fn exhausted_reset(&self) -> Wait {
        [self.requests, self.tokens].iter().filter(|b| b.is_exhausted()).map(|b| b.reset).max().unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    /// 2023-09-29T16:26:37Z, the reference's test-vector clock.
    const NOW: u64 = 1_696_004_797_000;
    const DAY: u64 = 86_400_000;

    fn read(headers: &[(&str, &str)]) -> Signals {
        parse(Provider::Auto, 429, headers, None, NOW, DAY)
    }

    #[test]
    fn provider_names_round_trip() {
        for provider in Provider::ALL {
            assert_eq!(Provider::parse(provider.name()), Some(provider));
        }
        assert_eq!(Provider::parse(" OpenAI "), Some(Provider::OpenAi));
        assert_eq!(Provider::parse("vertex"), None);
        assert_eq!(Provider::parse(""), None);
    }

    #[test]
    fn retry_after_seconds_and_http_dates() {
        assert_eq!(read(&[("Retry-After", "120")]).retry_at_ms, Some(NOW + 120_000));
        assert_eq!(read(&[("retry-after", "Fri, 29 Sep 2023 16:26:57 GMT")]).retry_at_ms, Some(NOW + 20_000));
        assert_eq!(read(&[("RETRY-AFTER", "Fri, 29 Sep 2023 16:28:38 GMT")]).retry_at_ms, Some(NOW + 121_000));
        assert_eq!(read(&[("retry-after", " 0.5 ")]).retry_at_ms, Some(NOW + 500));
        let s = parse(Provider::Anthropic, 429, &[("retry-after", "30")], None, NOW, DAY);
        assert_eq!(s.retry_at(), Some(NOW + 30_000));
    }

    #[test]
    fn azure_millisecond_headers_come_first() {
        assert_eq!(read(&[("retry-after-ms", "120000")]).retry_at_ms, Some(NOW + 120_000));
        let s = read(&[("retry-after", "60"), ("x-ms-retry-after-ms", "1500"), ("retry-after-ms", "2000")]);
        assert_eq!(s.retry_at_ms, Some(NOW + 2_000));
        let s = read(&[("retry-after", "60"), ("x-ms-retry-after-ms", "1500"), ("retry-after-ms", "junk")]);
        assert_eq!(s.retry_at_ms, Some(NOW + 1_500));
        assert_eq!(s.provider, Provider::Azure);
    }

    #[test]
    fn http_date_is_measured_against_the_date_header() {
        let s = read(&[("Date", "Fri, 29 Sep 2023 16:00:00 GMT"), ("Retry-After", "Fri, 29 Sep 2023 16:00:30 GMT")]);
        assert_eq!(s.retry_at_ms, Some(NOW + 30_000), "a provider clock 26 minutes slow cancels out");
        let s = read(&[("Date", "garbage"), ("Retry-After", "Fri, 29 Sep 2023 16:26:57 GMT")]);
        assert_eq!(s.retry_at_ms, Some(NOW + 20_000), "an unreadable Date falls back to now");
    }

    #[test]
    fn retry_after_is_never_an_epoch() {
        let s = read(&[("Retry-After", "1696004817")]);
        assert_eq!((s.retry_at_ms, s.terminal), (None, Some(Terminal::LongWait)));
    }

    #[test]
    fn zero_past_and_junk_are_unknown_never_now() {
        for value in [
            "0",
            "-1",
            "",
            "  ",
            "NaN",
            "inf",
            "-inf",
            "1e3",
            "Thu, 01 Jan 1970 00:00:00 GMT",
            "Fri, 29 Sep 2023 16:26:37 GMT",
            "\u{0}\u{fffd}é",
        ] {
            let s = read(&[("retry-after", value), ("retry-after-ms", value), ("x-ms-retry-after-ms", value)]);
            assert_eq!((s.retry_at(), s.terminal), (None, None), "{value:?}");
        }
    }

    #[test]
    fn waits_over_the_cap_are_long_not_instants() {
        let s = read(&[("Retry-After", "86401")]);
        assert_eq!((s.retry_at(), s.terminal), (None, Some(Terminal::LongWait)));
        let s = read(&[("Retry-After", "86400")]);
        assert_eq!((s.retry_at(), s.terminal), (Some(NOW + DAY), None));
        let s = read(&[("Retry-After", "Fri, 31 Dec 9999 23:59:59 GMT")]);
        assert_eq!((s.retry_at(), s.terminal), (None, Some(Terminal::LongWait)));
        let s = read(&[("Retry-After", "99999999999999999999999")]);
        assert_eq!((s.retry_at(), s.terminal), (None, None), "unrepresentable is junk");
    }

    #[test]
    fn clock_never_overflows() {
        let s = parse(Provider::Auto, 429, &[("retry-after", "10")], None, u64::MAX - 5, u64::MAX);
        assert_eq!(s.retry_at(), None);
        let s = parse(Provider::Auto, 429, &[("retry-after", "Fri, 29 Sep 2023 16:26:57 GMT")], None, 0, u64::MAX);
        assert_eq!(s.retry_at(), Some(1_696_004_817_000));
    }

    #[test]
    fn explicit_retry_beats_exhausted_resets() {
        let s =
            read(&[("retry-after", "3"), ("x-ratelimit-remaining-tokens", "0"), ("x-ratelimit-reset-tokens", "6m0s")]);
        assert_eq!(s.retry_at(), Some(NOW + 3_000));
        assert_eq!(s.tokens_reset_ms, Some(NOW + 360_000));
    }

    #[test]
    fn header_names_are_case_insensitive_and_values_trimmed() {
        let s = read(&[(" X-RATELIMIT-REMAINING-TOKENS ", " 0 "), ("x-ratelimit-reset-TOKENS", "\t7.66S ")]);
        assert_eq!(s.retry_at(), Some(NOW + 7_660));
    }

    #[test]
    fn remaining_fraction_takes_the_smallest_dimension() {
        let s = Signals {
            remaining_requests: Some(30),
            limit_requests: Some(60),
            remaining_tokens: Some(10),
            limit_tokens: Some(100),
            ..Signals::default()
        };
        assert_eq!(s.remaining_fraction(), Some(0.1));
        let s = Signals { remaining_requests: Some(90), limit_requests: Some(60), ..Signals::default() };
        assert_eq!(s.remaining_fraction(), Some(1.0), "capped");
        let s = Signals {
            remaining_requests: Some(0),
            limit_requests: Some(0),
            remaining_tokens: Some(5),
            ..Signals::default()
        };
        assert_eq!(s.remaining_fraction(), None, "zero limit and missing limit are skipped");
    }

    #[test]
    fn retry_at_uses_the_latest_known_exhausted_reset() {
        let s = Signals {
            remaining_requests: Some(0),
            requests_reset_ms: Some(5),
            remaining_tokens: Some(0),
            ..Signals::default()
        };
        assert_eq!(s.retry_at(), Some(5));
        let s = Signals { remaining_requests: Some(1), requests_reset_ms: Some(5), ..Signals::default() };
        assert_eq!(s.retry_at(), None);
    }

    #[test]
    fn throttled_follows_status() {
        assert!(read(&[]).throttled);
        assert!(!parse(Provider::Auto, 200, &[], None, NOW, DAY).throttled);
        assert_eq!(
            parse(Provider::Auto, 200, &[], None, NOW, DAY),
            Signals { provider: Provider::Generic, ..Signals::default() }
        );
    }

    /// Deterministic junk: every parser must survive arbitrary text without panicking.
    #[test]
    fn arbitrary_input_never_panics() {
        const PIECES: [&str; 24] = [
            "0",
            "9",
            "99999999999999999999",
            ".",
            "-",
            "+",
            "s",
            "ms",
            "µ",
            "m",
            "h",
            ":",
            ",",
            ";",
            "=",
            "\"",
            "\\",
            "T",
            "Z",
            "GMT",
            " ",
            "é",
            "\u{fffd}",
            "r=",
        ];
        const NAMES: [&str; 12] = [
            "retry-after",
            "retry-after-ms",
            "date",
            "ratelimit",
            "ratelimit-policy",
            "x-ratelimit-reset",
            "x-ratelimit-reset-tokens",
            "x-ratelimit-remaining-tokens",
            "anthropic-ratelimit-tokens-reset",
            "ratelimitbysize-reset",
            "x-amzn-errortype",
            "anthropic-ratelimit-tokens-remaining",
        ];
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move |bound: usize| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            usize::try_from(state % bound as u64).unwrap_or(0)
        };
        for _ in 0..3000 {
            let value: String = (0..next(12)).map(|_| PIECES[next(PIECES.len())]).collect();
            let headers: Vec<(&str, &str)> = NAMES.iter().map(|&name| (name, value.as_str())).collect();
            let body = format!("{{\"error\":{{\"message\":\"try again in {value}\",\"details\":[{{\"@type\":\"google.rpc.RetryInfo\",\"retryDelay\":\"{value}\"}}]}}}}");
            let s =
                parse(Provider::Auto, 429, &headers, Some(body.as_bytes()), next(1 << 20) as u64, next(1 << 20) as u64);
            let _ = (s.retry_at(), s.remaining_fraction());
            let _ = (
                parse_go_duration(&value),
                parse_http_date(&value),
                parse_rfc3339(&value),
                parse_ratelimit_reset(&value),
            );
        }
    }
}
