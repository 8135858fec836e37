//! Each provider's quota headers, read into requests and tokens buckets.

use super::values::{parse_count, parse_delta_seconds, parse_go_duration, parse_ratelimit_reset, parse_rfc3339};
use super::{ietf, Clock, Headers, Provider, Quota, QuotaDimension, Terminal, When};

/// Reads the quota headers a provider sends. A configured provider reads its own family plus the
/// standard ones; `Auto` reads every family: their names do not collide, and when two report the
/// same dimension the binding report wins. A family whose name prefix no header carries is
/// skipped after one pass over the names, not looked up name by name.
pub(super) fn read(provider: Provider, headers: &Headers, clock: &Clock) -> Quota {
    let own = match provider {
        Provider::Auto => openai(headers, clock)
            .merge(anthropic(headers, clock))
            .merge(mistral(headers, clock))
            .merge(bedrock(headers)),
        Provider::OpenAi | Provider::Azure | Provider::Groq => openai(headers, clock),
        Provider::Anthropic => anthropic(headers, clock),
        Provider::Mistral => mistral(headers, clock),
        Provider::Bedrock => bedrock(headers),
        Provider::Gemini | Provider::Cohere | Provider::Generic => Quota::default(),
    };
    own.merge(standard(headers, clock))
}

/// Header-name prefixes that identify a provider, checked in order (Azure and Groq before the
/// OpenAI-compatible names they also send).
const MARKERS: [(&str, Provider); 16] = [
    ("anthropic-", Provider::Anthropic),
    ("x-amzn-", Provider::Bedrock),
    ("x-ms-", Provider::Azure),
    ("apim-request-id", Provider::Azure),
    ("azureml-model-session", Provider::Azure),
    ("x-rate-limit-reset-tokens", Provider::Azure),
    ("x-rate-limit-reset-requests", Provider::Azure),
    ("ratelimitbysize-", Provider::Mistral),
    ("x-ratelimit-remaining-tokens-minute", Provider::Mistral),
    ("x-ratelimit-remaining-tokens-month", Provider::Mistral),
    ("x-ratelimit-remaining-req-minute", Provider::Mistral),
    ("x-groq-", Provider::Groq),
    ("openai-", Provider::OpenAi),
    ("x-trial-endpoint-call-", Provider::Cohere),
    ("x-ratelimit-remaining-requests", Provider::OpenAi),
    ("x-ratelimit-remaining-tokens", Provider::OpenAi),
];

/// Which provider sent this response; `Generic` when nothing provider-specific is present.
pub(super) fn detect(headers: &Headers, gemini_body: bool) -> Provider {
    if gemini_body {
        return Provider::Gemini;
    }
    MARKERS.iter().find(|(prefix, _)| headers.any_starting_with(prefix)).map_or(Provider::Generic, |&(_, p)| p)
}

/// A bucket from raw limit, remaining and reset values.
fn bucket(clock: &Clock, limit: Option<&str>, remaining: Option<&str>, reset: Option<When>) -> QuotaDimension {
    QuotaDimension {
        remaining: remaining.and_then(parse_count),
        limit: limit.and_then(parse_count),
        reset: clock.wait(reset),
    }
}

/// OpenAI `x-ratelimit-{limit,remaining,reset}-{requests,tokens}`, also used by Azure (integer
/// reset seconds, sometimes spelled `x-rate-limit-*`) and Groq (whose request dimension counts
/// requests per day, so its reset can be hours away). Resets are Go durations to a FULL bucket;
/// a bare number is seconds, and Azure's `0`/`-1` come out unknown.
fn openai(headers: &Headers, clock: &Clock) -> Quota {
    if !headers.any_starting_with("x-ratelimit-") && !headers.any_starting_with("x-rate-limit-") {
        return Quota::default();
    }
    let dimension = |name: &str| {
        let field = |kind: &str| {
            let spelled = |prefix| headers.get_joined(&[prefix, kind, "-", name]);
            spelled("x-ratelimit-").or_else(|| spelled("x-rate-limit-"))
        };
        bucket(clock, field("limit"), field("remaining"), field("reset").and_then(parse_go_duration).map(When::In))
    };
    Quota { requests: dimension("requests"), tokens: dimension("tokens"), ..Quota::default() }
}

/// Anthropic `anthropic-ratelimit-*-{limit,remaining,reset}` with RFC 3339 resets. The tokens
/// dimension is whichever of tokens, input-tokens and output-tokens binds.
fn anthropic(headers: &Headers, clock: &Clock) -> Quota {
    if !headers.any_starting_with("anthropic-ratelimit-") {
        return Quota::default();
    }
    let dimension = |name: &str| {
        let field = |kind: &str| headers.get_joined(&["anthropic-ratelimit-", name, "-", kind]);
        bucket(clock, field("limit"), field("remaining"), field("reset").and_then(parse_rfc3339).map(When::At))
    };
    let tokens = dimension("tokens").tighter(dimension("input-tokens")).tighter(dimension("output-tokens"));
    Quota { requests: dimension("requests"), tokens, ..Quota::default() }
}

/// Mistral, both header generations: `ratelimitbysize-*` (tokens, reset in seconds) and
/// `x-ratelimit-{limit,remaining}-{tokens-minute,tokens-month,req-minute}` (no resets). A spent
/// monthly token quota is terminal.
fn mistral(headers: &Headers, clock: &Clock) -> Quota {
    if !headers.any_starting_with("x-ratelimit-") && !headers.any_starting_with("ratelimitbysize-") {
        return Quota::default();
    }
    let by_size = bucket(
        clock,
        headers.get("ratelimitbysize-limit"),
        headers.get("ratelimitbysize-remaining"),
        headers.get("ratelimitbysize-reset").and_then(parse_delta_seconds).map(When::In),
    );
    let window = |name: &str| {
        let field = |kind: &str| headers.get_joined(&["x-ratelimit-", kind, "-", name]);
        bucket(clock, field("limit"), field("remaining"), None)
    };
    let month = window("tokens-month");
    Quota {
        requests: window("req-minute"),
        tokens: by_size.tighter(window("tokens-minute")).tighter(month),
        terminal: month.is_exhausted().then_some(Terminal::MonthlyQuota),
        throttled: false,
    }
}

/// AWS Bedrock `x-amzn-ErrorType: Code:uri`: a throttle, or a long service quota.
fn bedrock(headers: &Headers) -> Quota {
    let code = headers.get("x-amzn-errortype").and_then(|value| value.split(':').next()).unwrap_or("").trim();
    Quota {
        terminal: code.eq_ignore_ascii_case("ServiceQuotaExceededException").then_some(Terminal::ServiceQuota),
        throttled: code.eq_ignore_ascii_case("ThrottlingException"),
        ..Quota::default()
    }
}

/// The standard families, counted as requests: the `X-RateLimit-*`, `X-Rate-Limit-*` and
/// `RateLimit-*` trios (IETF drafts up to 06) and IETF `RateLimit` / `RateLimit-Policy`.
fn standard(headers: &Headers, clock: &Clock) -> Quota {
    let requests = ["x-ratelimit-", "x-rate-limit-", "ratelimit-"]
        .iter()
        .map(|prefix| trio(headers, clock, prefix))
        .fold(ietf::read(headers, clock), QuotaDimension::tighter);
    Quota { requests, ..Quota::default() }
}

/// `{prefix}limit`, `{prefix}remaining`, `{prefix}reset`; the reset is epoch ms, epoch s or delta
/// s by size. Only the first list member counts (old drafts sent `100, 100;w=60`).
fn trio(headers: &Headers, clock: &Clock, prefix: &str) -> QuotaDimension {
    if !headers.any_starting_with(prefix) {
        return QuotaDimension::default();
    }
    let field = |kind: &str| headers.get_joined(&[prefix, kind]).and_then(|v| v.split([',', ';']).next());
    bucket(clock, field("limit"), field("remaining"), field("reset").and_then(parse_ratelimit_reset))
}

#[cfg(test)]
mod tests {
    use super::super::{parse, Provider, Signals, Terminal};
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    const NOW: u64 = 1_696_004_797_000;
    const DAY: u64 = 86_400_000;

    fn read(provider: Provider, headers: &[(&str, &str)]) -> Signals {
        parse(provider, 429, headers, None, NOW, DAY)
    }

    #[test]
    fn openai_docs_sample() {
        let s = read(
            Provider::Auto,
            &[
                ("x-ratelimit-limit-requests", "60"),
                ("x-ratelimit-limit-tokens", "150000"),
                ("x-ratelimit-remaining-requests", "59"),
                ("x-ratelimit-remaining-tokens", "149984"),
                ("x-ratelimit-reset-requests", "1s"),
                ("x-ratelimit-reset-tokens", "6m0s"),
                ("openai-organization", "org-x"),
            ],
        );
        assert_eq!(s.provider, Provider::OpenAi);
        assert_eq!((s.limit_requests, s.remaining_requests), (Some(60), Some(59)));
        assert_eq!((s.limit_tokens, s.remaining_tokens), (Some(150_000), Some(149_984)));
        assert_eq!(s.requests_reset_ms, Some(NOW + 1_000));
        assert_eq!(s.tokens_reset_ms, Some(NOW + 360_000));
        assert_eq!(s.retry_at(), None, "nothing is exhausted");
        assert_eq!(s.remaining_fraction(), Some(59.0 / 60.0));
    }

    #[test]
    fn openai_exhausted_dimension_decides() {
        let s = read(
            Provider::OpenAi,
            &[
                ("x-ratelimit-remaining-requests", "0"),
                ("x-ratelimit-reset-requests", "12ms"),
                ("x-ratelimit-remaining-tokens", "100"),
                ("x-ratelimit-reset-tokens", "6m0s"),
            ],
        );
        assert_eq!(s.retry_at(), Some(NOW + 12));
    }

    #[test]
    fn latest_reset_decides_when_both_dimensions_are_exhausted() {
        let s = read(
            Provider::Auto,
            &[
                ("X-RateLimit-Remaining-Requests", "0"),
                ("X-RateLimit-Reset-Requests", "1s"),
                ("X-RateLimit-Remaining-Tokens", "0"),
                ("X-RateLimit-Reset-Tokens", "6m0s"),
            ],
        );
        assert_eq!(s.retry_at(), Some(NOW + 360_000));
        assert_eq!(s.retry_at_ms, None);
        assert_eq!(s.terminal, None);
    }

    #[test]
    fn groq_resets() {
        let s = read(
            Provider::Auto,
            &[
                ("x-groq-region", "us-east-1"),
                ("x-ratelimit-limit-requests", "14400"),
                ("x-ratelimit-remaining-requests", "14370"),
                ("x-ratelimit-reset-requests", "2m59.56s"),
                ("x-ratelimit-remaining-tokens", "0"),
                ("x-ratelimit-reset-tokens", "7.66s"),
            ],
        );
        assert_eq!(s.provider, Provider::Groq);
        assert_eq!(s.requests_reset_ms, Some(NOW + 179_560));
        assert_eq!(s.tokens_reset_ms, Some(NOW + 7_660));
        assert_eq!(s.retry_at(), Some(NOW + 7_660));
    }

    #[test]
    fn groq_per_day_bucket_far_away_is_a_long_wait() {
        let s =
            read(Provider::Groq, &[("x-ratelimit-remaining-requests", "0"), ("x-ratelimit-reset-requests", "25h0m0s")]);
        assert_eq!(s.requests_reset_ms, None);
        assert_eq!(s.terminal, Some(Terminal::LongWait));
    }

    #[test]
    fn azure_integer_resets_in_either_spelling() {
        let s = read(Provider::Auto, &[("x-rate-limit-reset-tokens", "55"), ("x-ratelimit-remaining-tokens", "0")]);
        assert_eq!(s.provider, Provider::Azure);
        assert_eq!(s.tokens_reset_ms, Some(NOW + 55_000));
        assert_eq!(s.retry_at(), Some(NOW + 55_000));
        let s = read(Provider::Azure, &[("x-ratelimit-reset-tokens", "55")]);
        assert_eq!(s.tokens_reset_ms, Some(NOW + 55_000));
    }

    #[test]
    fn azure_zero_or_negative_reset_is_unknown() {
        for reset in ["0", "-1"] {
            let s = read(
                Provider::Azure,
                &[
                    ("x-ratelimit-limit-tokens", "-1"),
                    ("x-ratelimit-reset-tokens", reset),
                    ("x-ratelimit-remaining-tokens", "0"),
                ],
            );
            assert_eq!(s.tokens_reset_ms, None, "{reset}");
            assert_eq!(s.limit_tokens, None);
            assert_eq!(s.retry_at(), None, "{reset}");
        }
    }

    #[test]
    fn anthropic_rfc3339_resets() {
        let s = parse(
            Provider::Auto,
            429,
            &[
                ("anthropic-ratelimit-tokens-reset", "2026-09-27T10:00:45Z"),
                ("anthropic-ratelimit-tokens-remaining", "0"),
            ],
            None,
            NOW,
            u64::MAX,
        );
        assert_eq!(s.provider, Provider::Anthropic);
        assert_eq!(s.tokens_reset_ms, Some(1_790_503_245_000));
        assert_eq!(s.retry_at(), Some(1_790_503_245_000));
    }

    #[test]
    fn anthropic_tokens_take_the_most_exhausted_of_three() {
        let s = read(
            Provider::Anthropic,
            &[
                ("anthropic-ratelimit-requests-limit", "50"),
                ("anthropic-ratelimit-requests-remaining", "49"),
                ("anthropic-ratelimit-requests-reset", "2023-09-29T16:27:37Z"),
                ("anthropic-ratelimit-tokens-limit", "100000"),
                ("anthropic-ratelimit-tokens-remaining", "90000"),
                ("anthropic-ratelimit-tokens-reset", "2023-09-29T16:26:40Z"),
                ("anthropic-ratelimit-input-tokens-limit", "80000"),
                ("anthropic-ratelimit-input-tokens-remaining", "0"),
                ("anthropic-ratelimit-input-tokens-reset", "2023-09-29T16:26:47Z"),
                ("anthropic-ratelimit-output-tokens-limit", "20000"),
                ("anthropic-ratelimit-output-tokens-remaining", "1000"),
                ("anthropic-ratelimit-output-tokens-reset", "2023-09-29T16:26:39Z"),
            ],
        );
        assert_eq!((s.remaining_tokens, s.limit_tokens), (Some(0), Some(80_000)));
        assert_eq!(s.tokens_reset_ms, Some(NOW + 10_000));
        assert_eq!(s.requests_reset_ms, Some(NOW + 60_000));
        assert_eq!(s.retry_at(), Some(NOW + 10_000));
        assert_eq!(s.remaining_fraction(), Some(0.0));
    }

    #[test]
    fn anthropic_lowest_fraction_wins_when_none_is_exhausted() {
        let s = read(
            Provider::Anthropic,
            &[
                ("anthropic-ratelimit-input-tokens-limit", "80000"),
                ("anthropic-ratelimit-input-tokens-remaining", "40000"),
                ("anthropic-ratelimit-output-tokens-limit", "20000"),
                ("anthropic-ratelimit-output-tokens-remaining", "2000"),
            ],
        );
        assert_eq!(s.remaining_tokens, Some(2_000));
        assert_eq!(s.remaining_fraction(), Some(0.1));
    }

    #[test]
    fn anthropic_past_reset_is_unknown() {
        let s = read(
            Provider::Anthropic,
            &[
                ("anthropic-ratelimit-tokens-remaining", "0"),
                ("anthropic-ratelimit-tokens-reset", "2023-09-29T16:26:30Z"),
            ],
        );
        assert_eq!(s.tokens_reset_ms, None);
        assert_eq!(s.retry_at(), None);
    }

    #[test]
    fn mistral_both_generations() {
        let s = read(
            Provider::Auto,
            &[("ratelimitbysize-limit", "500000"), ("ratelimitbysize-remaining", "0"), ("ratelimitbysize-reset", "28")],
        );
        assert_eq!(s.provider, Provider::Mistral);
        assert_eq!(s.tokens_reset_ms, Some(NOW + 28_000));
        assert_eq!(s.retry_at(), Some(NOW + 28_000));

        let s = read(
            Provider::Mistral,
            &[
                ("x-ratelimit-limit-req-minute", "60"),
                ("x-ratelimit-remaining-req-minute", "30"),
                ("x-ratelimit-limit-tokens-minute", "500000"),
                ("x-ratelimit-remaining-tokens-minute", "400000"),
                ("x-ratelimit-limit-tokens-month", "1000000000"),
                ("x-ratelimit-remaining-tokens-month", "999000000"),
            ],
        );
        assert_eq!((s.remaining_requests, s.limit_requests), (Some(30), Some(60)));
        assert_eq!(s.remaining_tokens, Some(400_000));
        assert_eq!(s.remaining_fraction(), Some(0.5));
        assert_eq!(s.terminal, None);
    }

    #[test]
    fn mistral_spent_month_is_terminal() {
        let s = read(
            Provider::Auto,
            &[("x-ratelimit-limit-tokens-month", "1000000"), ("x-ratelimit-remaining-tokens-month", "0")],
        );
        assert_eq!(s.provider, Provider::Mistral);
        assert_eq!(s.terminal, Some(Terminal::MonthlyQuota));
    }

    #[test]
    fn bedrock_throttle_has_no_timing() {
        let s = parse(
            Provider::Auto,
            400,
            &[("x-amzn-ErrorType", "ThrottlingException:http://internal.amazon.com/coral/com.amazon.bedrock/")],
            Some(br#"{"message":"Too many tokens, please wait before trying again."}"#),
            NOW,
            DAY,
        );
        assert_eq!(s.provider, Provider::Bedrock);
        assert!(s.throttled);
        assert_eq!((s.retry_at(), s.terminal), (None, None));
    }

    #[test]
    fn bedrock_service_quota_is_terminal() {
        let s = parse(
            Provider::Bedrock,
            400,
            &[("X-Amzn-ErrorType", "ServiceQuotaExceededException:http://internal.amazon.com/")],
            None,
            NOW,
            DAY,
        );
        assert_eq!(s.terminal, Some(Terminal::ServiceQuota));
        assert!(!s.throttled);
    }

    #[test]
    fn cohere_has_no_timing() {
        let s =
            read(Provider::Auto, &[("x-trial-endpoint-call-limit", "10"), ("x-trial-endpoint-call-remaining", "9")]);
        assert_eq!(s.provider, Provider::Cohere);
        assert_eq!(s, Signals { provider: Provider::Cohere, throttled: true, ..Signals::default() });
    }

    #[test]
    fn github_style_epoch_reset_is_measured_against_date() {
        let s = read(
            Provider::Auto,
            &[
                ("Date", "Mon, 13 Jun 2022 11:48:53 GMT"),
                ("X-RateLimit-Limit", "5000"),
                ("X-RateLimit-Remaining", "0"),
                ("X-RateLimit-Reset", "1655120964"),
            ],
        );
        assert_eq!(s.provider, Provider::Generic);
        assert_eq!(s.requests_reset_ms, Some(NOW + 31_000));
        assert_eq!(s.retry_at(), Some(NOW + 31_000));
    }

    #[test]
    fn generic_reset_families() {
        let s = read(Provider::Generic, &[("x-ratelimit-remaining", "0"), ("x-ratelimit-reset", "60")]);
        assert_eq!(s.retry_at(), Some(NOW + 60_000));
        let s = read(Provider::Generic, &[("X-Rate-Limit-Remaining", "0"), ("X-Rate-Limit-Reset", "1696004827123")]);
        assert_eq!(s.retry_at(), Some(NOW + 30_123));
        let s = read(
            Provider::Generic,
            &[("RateLimit-Limit", "100, 100;w=60"), ("RateLimit-Remaining", "0"), ("RateLimit-Reset", "5")],
        );
        assert_eq!((s.limit_requests, s.retry_at()), (Some(100), Some(NOW + 5_000)));
    }

    #[test]
    fn epoch_reset_in_the_past_is_unknown() {
        let s = read(Provider::Generic, &[("x-ratelimit-remaining", "0"), ("x-ratelimit-reset", "1696004000")]);
        assert_eq!(s.retry_at(), None);
        assert_eq!(s.terminal, None);
    }

    #[test]
    fn configured_provider_ignores_other_families() {
        let s = read(Provider::OpenAi, &[("anthropic-ratelimit-tokens-remaining", "0")]);
        assert_eq!((s.provider, s.remaining_tokens), (Provider::OpenAi, None));
        let s = read(Provider::Auto, &[("anthropic-ratelimit-tokens-remaining", "0")]);
        assert_eq!(s.remaining_tokens, Some(0));
    }

    #[test]
    fn exhausted_family_binds_over_a_roomy_one() {
        let s = read(
            Provider::Auto,
            &[
                ("x-ratelimit-remaining-requests", "10"),
                ("x-ratelimit-limit-requests", "100"),
                ("RateLimit", "\"default\";r=0;t=50"),
            ],
        );
        assert_eq!(s.remaining_requests, Some(0));
        assert_eq!(s.retry_at(), Some(NOW + 50_000));
    }
}
