//! What an error body says: Gemini `RetryInfo` and `QuotaFailure`, error codes and messages that
//! mean a retry cannot help, and delay phrases such as "Please try again in 6.596s" (OpenAI,
//! Groq) or "Please retry after 37 seconds" (Azure).
//!
//! Bodies that are not JSON, or larger than any error body, are ignored. Vertex streaming wraps
//! the error object in a list; Bedrock and Mistral put `message` at the top level.

use serde_json::Value;

use super::values::{parse_count, parse_delta_seconds, parse_go_duration, parse_millis};
use super::Terminal;

/// Error bodies are a few hundred bytes; anything far larger is not one we understand.
const MAX_BODY_BYTES: usize = 64 * 1024;
/// A phrase asking to wait this long is a daily quota (Azure's "retry after 86400 seconds").
const DAY_MS: u64 = 86_400_000;
/// Gemini delays above this are quota windows, not short retries.
const GEMINI_SHORT_RETRY_MS: u64 = 300_000;

/// What an error body says.
#[derive(Debug, Default, PartialEq)]
pub(super) struct BodySignals {
    /// Gemini `RetryInfo.retryDelay`.
    pub retry_delay_ms: Option<u64>,
    /// A delay phrase in the message, the last resort for timing.
    pub phrase_delay_ms: Option<u64>,
    pub terminal: Option<Terminal>,
    /// The body has Google RPC error details (`google.rpc.*` or `RESOURCE_EXHAUSTED`).
    pub is_gemini: bool,
}

/// Reads an error body; anything unrecognised yields the empty default.
pub(super) fn read(body: &[u8]) -> BodySignals {
    if body.len() > MAX_BODY_BYTES {
        return BodySignals::default();
    }
    let Ok(json) = serde_json::from_slice::<Value>(body) else {
        return BodySignals::default();
    };
    let root = match &json {
        Value::Array(items) => items.first().unwrap_or(&Value::Null),
        other => other,
    };
    let error = root.get("error").filter(|e| e.is_object()).unwrap_or(root);
    let message = error.get("message").or_else(|| root.get("message")).and_then(Value::as_str).unwrap_or("");
    let gemini = Gemini::read(error);
    let phrase_delay_ms = delay_phrase(message);
    let terminal = code_terminal(root, error)
        .or_else(|| message_terminal(message))
        .or(gemini.daily.then_some(Terminal::DailyQuota))
        .or(phrase_delay_ms.filter(|&ms| ms >= DAY_MS).map(|_| Terminal::DailyQuota))
        .or(gemini.retry_delay_ms.filter(|&ms| ms > GEMINI_SHORT_RETRY_MS).map(|_| Terminal::LongWait));
    BodySignals { retry_delay_ms: gemini.retry_delay_ms, phrase_delay_ms, terminal, is_gemini: gemini.present }
}

/// The Google RPC details of a Gemini / Vertex error.
struct Gemini {
    present: bool,
    retry_delay_ms: Option<u64>,
    /// A `QuotaFailure` violation names a per-day quota.
    daily: bool,
}

impl Gemini {
    fn read(error: &Value) -> Gemini {
        let details = error.get("details").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default();
        let of_type = |suffix: &'static str| {
            details.iter().filter(move |d| d.get("@type").and_then(Value::as_str).is_some_and(|t| t.ends_with(suffix)))
        };
        let retry_delay_ms = of_type("google.rpc.RetryInfo")
            .find_map(|d| d.get("retryDelay").and_then(Value::as_str).and_then(parse_go_duration));
        let daily = of_type("google.rpc.QuotaFailure")
            .filter_map(|d| d.get("violations").and_then(Value::as_array))
            .flatten()
            .filter_map(|v| v.get("quotaId").and_then(Value::as_str))
            .any(is_daily_quota_id);
        let present =
            details.iter().filter_map(|d| d.get("@type").and_then(Value::as_str)).any(|t| t.contains("google.rpc."))
                || error.get("status").and_then(Value::as_str) == Some("RESOURCE_EXHAUSTED");
        Gemini { present, retry_delay_ms, daily }
    }
}

/// `GenerateRequestsPerDayPerProjectPerModel-FreeTier` and the like.
fn is_daily_quota_id(quota_id: &str) -> bool {
    let id = quota_id.to_ascii_lowercase();
    id.contains("perday") || id.contains("daily")
}

/// Error codes and types that a retry cannot fix.
fn code_terminal(root: &Value, error: &Value) -> Option<Terminal> {
    let fields = [error.get("code"), error.get("type"), root.get("code"), root.get("type")];
    fields.into_iter().flatten().filter_map(Value::as_str).find_map(|code| match code.to_ascii_lowercase().as_str() {
        "insufficient_quota" => Some(Terminal::InsufficientQuota),
        "enforced_spend_limit_reached" | "billing_hard_limit_reached" => Some(Terminal::SpendLimit),
        "request_too_large" => Some(Terminal::RequestTooLarge),
        _ => None,
    })
}

/// Messages that a retry cannot fix even under a retryable code: OpenAI's "Request too large
/// ... Limit 30000, Requested 31538" and Anthropic's "would exceed your ... spend limit".
fn message_terminal(message: &str) -> Option<Terminal> {
    let lower = message.to_ascii_lowercase();
    let requested = number_after(&lower, "requested ");
    let limit = number_after(&lower, "limit ");
    if lower.contains("request too large") || requested.zip(limit).is_some_and(|(r, l)| r > l) {
        Some(Terminal::RequestTooLarge)
    } else if lower.contains("spend limit") {
        Some(Terminal::SpendLimit)
    } else {
        None
    }
}

/// The first integer directly after an occurrence of `marker`.
fn number_after(text: &str, marker: &str) -> Option<u64> {
    text.match_indices(marker).find_map(|(start, _)| {
        let rest = text.get(start + marker.len()..)?;
        parse_count(rest.split(|c: char| !c.is_ascii_digit()).next()?)
    })
}

/// The delay in "try again in 6.596s", "try again in 174ms", "retry after 37 seconds",
/// "retry in 26.1s", rounded up to ms.
fn delay_phrase(message: &str) -> Option<u64> {
    const MARKERS: [&str; 3] = ["try again in ", "retry after ", "retry in "];
    let lower = message.to_ascii_lowercase();
    MARKERS.iter().find_map(|marker| {
        let start = lower.find(marker)? + marker.len();
        delay_at_start(lower.get(start..)?)
    })
}

/// A Go duration (`6.596s`), or a number with a unit word (`37 seconds`, `500 ms`, `2 minutes`).
fn delay_at_start(text: &str) -> Option<u64> {
    let end = text.find(|c: char| !(c.is_ascii_alphanumeric() || c == '.' || c == 'µ')).unwrap_or(text.len());
    let (token, rest) = text.split_at(end);
    let token = token.trim_end_matches('.');
    let Some(seconds) = parse_delta_seconds(token) else {
        return parse_go_duration(token);
    };
    let unit = rest.split_whitespace().next().unwrap_or("").trim_end_matches(|c: char| !c.is_ascii_alphabetic());
    match unit {
        "ms" | "millisecond" | "milliseconds" => parse_millis(token),
        "min" | "mins" | "minute" | "minutes" => seconds.checked_mul(60),
        "hour" | "hours" => seconds.checked_mul(3600),
        _ => Some(seconds),
    }
}

#[cfg(test)]
mod tests {
    use super::super::{parse, Provider, Signals, Terminal};
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    const NOW: u64 = 1_696_004_797_000;
    const DAY: u64 = 86_400_000;

    fn read_429(provider: Provider, body: &str) -> Signals {
        parse(provider, 429, &[], Some(body.as_bytes()), NOW, DAY)
    }

    fn openai_error(message: &str, kind: &str, code: &str) -> String {
        serde_json::json!({"error": {"message": message, "type": kind, "param": null, "code": code}}).to_string()
    }

    #[test]
    fn openai_try_again_phrases() {
        for (message, ms) in [
            ("Rate limit reached for requests. Please try again in 6.596s. Visit https://x", 6_596),
            ("Please try again in 174ms", 174),
            ("Please try again in 9m38.016s.", 578_016),
            ("Please try again in 1.984999999s.", 1_985),
            ("PLEASE TRY AGAIN IN 20 SECONDS", 20_000),
            ("try again in 2 minutes", 120_000),
            ("try again in 500 milliseconds", 500),
        ] {
            let s = read_429(Provider::OpenAi, &openai_error(message, "requests", "rate_limit_exceeded"));
            assert_eq!(s.retry_at_ms, Some(NOW + ms), "{message}");
            assert_eq!(s.terminal, None, "{message}");
        }
    }

    #[test]
    fn groq_phrases() {
        let s =
            read_429(Provider::Groq, &openai_error("Please try again in 9m38.016s.", "tokens", "rate_limit_exceeded"));
        assert_eq!(s.retry_at(), Some(NOW + 578_016));
        let s = read_429(
            Provider::Groq,
            &openai_error("Please try again in 1.984999999s.", "tokens", "rate_limit_exceeded"),
        );
        assert_eq!(s.retry_at(), Some(NOW + 1_985));
    }

    #[test]
    fn phrase_is_the_last_resort_after_an_exhausted_reset() {
        let body = openai_error("Please try again in 6.596s.", "tokens", "rate_limit_exceeded");
        let headers = [("x-ratelimit-remaining-tokens", "0"), ("x-ratelimit-reset-tokens", "6m0s")];
        let s = parse(Provider::OpenAi, 429, &headers, Some(body.as_bytes()), NOW, DAY);
        assert_eq!(s.retry_at_ms, None);
        assert_eq!(s.retry_at(), Some(NOW + 360_000));
    }

    #[test]
    fn openai_insufficient_quota_is_terminal() {
        let s = read_429(
            Provider::OpenAi,
            &openai_error(
                "You exceeded your current quota, please check your plan.",
                "insufficient_quota",
                "insufficient_quota",
            ),
        );
        assert_eq!(s.terminal, Some(Terminal::InsufficientQuota));
    }

    #[test]
    fn openai_request_too_large_is_terminal() {
        let message =
            "Request too large for gpt-4 in organization org-x on tokens per min (TPM): Limit 30000, Requested 31538.";
        let s = read_429(Provider::OpenAi, &openai_error(message, "tokens", "rate_limit_exceeded"));
        assert_eq!(s.terminal, Some(Terminal::RequestTooLarge));
        let message = "Rate limit reached on tokens per min (TPM): Limit 30000, Used 29000, Requested 40000.";
        assert_eq!(message_terminal(message), Some(Terminal::RequestTooLarge));
        let message = "Rate limit reached on tokens per min (TPM): Limit 30000, Used 29000, Requested 2000. Please try again in 2s.";
        let s = read_429(Provider::OpenAi, &openai_error(message, "tokens", "rate_limit_exceeded"));
        assert_eq!((s.terminal, s.retry_at_ms), (None, Some(NOW + 2_000)));
    }

    #[test]
    fn azure_retry_after_phrase() {
        let body = r#"{"error":{"code":"429","message":"Requests to the ChatCompletions_Create Operation have exceeded call rate limit. Please retry after 37 seconds."}}"#;
        let s = read_429(Provider::Azure, body);
        assert_eq!(s.retry_at_ms, Some(NOW + 37_000));
        assert_eq!(s.terminal, None);
    }

    #[test]
    fn azure_daily_phrase_is_terminal() {
        let body = r#"{"error":{"code":"429","message":"Please retry after 86400 seconds."}}"#;
        let s = read_429(Provider::Azure, body);
        assert_eq!(s.terminal, Some(Terminal::DailyQuota));
    }

    #[test]
    fn anthropic_spend_limit_is_terminal() {
        let body = r#"{"type":"error","error":{"type":"rate_limit_error","message":"This request would exceed your account's monthly spend limit. Please try again later."},"request_id":"req_1"}"#;
        assert_eq!(read_429(Provider::Anthropic, body).terminal, Some(Terminal::SpendLimit));
        let body = r#"{"type":"error","error":{"type":"enforced_spend_limit_reached","message":"x"}}"#;
        assert_eq!(read_429(Provider::Anthropic, body).terminal, Some(Terminal::SpendLimit));
        let body = r#"{"type":"error","error":{"type":"rate_limit_error","message":"Number of request tokens has exceeded your per-minute rate limit"},"request_id":"req_1"}"#;
        assert_eq!(
            read_429(Provider::Anthropic, body),
            Signals { provider: Provider::Anthropic, throttled: true, ..Signals::default() }
        );
    }

    #[test]
    fn anthropic_413_request_too_large() {
        let body =
            r#"{"type":"error","error":{"type":"request_too_large","message":"Request exceeds the maximum size"}}"#;
        assert_eq!(read_429(Provider::Anthropic, body).terminal, Some(Terminal::RequestTooLarge));
    }

    fn gemini_body(quota_id: &str, delay: &str) -> String {
        serde_json::json!({"error": {"code": 429, "message": "You exceeded your current quota.", "status": "RESOURCE_EXHAUSTED", "details": [
            {"@type": "type.googleapis.com/google.rpc.QuotaFailure", "violations": [{"quotaMetric": "m", "quotaId": quota_id}]},
            {"@type": "type.googleapis.com/google.rpc.Help", "links": []},
            {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": delay}
        ]}})
        .to_string()
    }

    #[test]
    fn gemini_retry_info() {
        for (delay, ms) in [("26s", 26_000), ("34.074824224s", 34_075)] {
            let s =
                read_429(Provider::Auto, &gemini_body("GenerateContentInputTokensPerModelPerMinute-FreeTier", delay));
            assert_eq!(s.provider, Provider::Gemini);
            assert_eq!(s.retry_at_ms, Some(NOW + ms), "{delay}");
            assert_eq!(s.terminal, None);
        }
    }

    #[test]
    fn gemini_daily_quota_is_terminal() {
        let s = read_429(Provider::Gemini, &gemini_body("GenerateRequestsPerDayPerProjectPerModel-FreeTier", "26s"));
        assert_eq!(s.terminal, Some(Terminal::DailyQuota));
        assert!(is_daily_quota_id("DailyQuota"));
    }

    #[test]
    fn gemini_long_delay_is_terminal() {
        let s = read_429(Provider::Gemini, &gemini_body("X", "51820.638305887s"));
        assert_eq!(s.terminal, Some(Terminal::LongWait));
        assert_eq!(s.retry_at_ms, Some(NOW + 51_820_639));
    }

    #[test]
    fn gemini_vertex_list_wrapper_and_no_retry_info() {
        let body = format!("[{}]", gemini_body("X", "26s"));
        assert_eq!(read_429(Provider::Auto, &body).retry_at_ms, Some(NOW + 26_000));
        let body = r#"{"error":{"code":429,"message":"Resource exhausted. Please try again later.","status":"RESOURCE_EXHAUSTED"}}"#;
        let s = read_429(Provider::Auto, body);
        assert_eq!((s.provider, s.retry_at(), s.terminal), (Provider::Gemini, None, None));
    }

    #[test]
    fn header_retry_after_wins_over_retry_info() {
        let s =
            parse(Provider::Gemini, 429, &[("retry-after", "5")], Some(gemini_body("X", "26s").as_bytes()), NOW, DAY);
        assert_eq!(s.retry_at_ms, Some(NOW + 5_000));
    }

    #[test]
    fn mistral_body_has_no_timing() {
        let body =
            r#"{"object":"error","message":"Rate limit exceeded","type":"rate_limited","param":null,"code":"1300"}"#;
        let s = read_429(Provider::Mistral, body);
        assert_eq!((s.retry_at(), s.terminal), (None, None));
    }

    #[test]
    fn success_bodies_are_never_read() {
        let body = r#"{"choices":[{"message":{"content":"Please try again in 5s"}}],"error":{"message":"try again in 5s","code":"insufficient_quota"}}"#;
        let s = parse(Provider::Auto, 200, &[], Some(body.as_bytes()), NOW, DAY);
        assert_eq!((s.retry_at_ms, s.terminal, s.throttled), (None, None, false));
    }

    #[test]
    fn junk_bodies_are_ignored() {
        let huge =
            format!("{{\"error\":{{\"message\":\"try again in 5s\",\"pad\":\"{}\"}}}}", "x".repeat(MAX_BODY_BYTES));
        let deep = "[".repeat(60_000);
        let bodies: [&[u8]; 12] = [
            b"",
            b"Too Many Requests. Please try again in 5s",
            b"<html>retry after 30 seconds</html>",
            b"\xff\xfe\x00{garbage",
            b"null",
            b"[]",
            b"{\"error\":\"try again in 5s\"}",
            b"{\"error\":{\"message\":42,\"code\":1e400}}",
            br#"{"error":{"message":"try again in NaNs"}}"#,
            br#"{"error":{"message":"try again in -5s"}}"#,
            huge.as_bytes(),
            deep.as_bytes(),
        ];
        for body in bodies {
            let s = parse(Provider::Auto, 429, &[], Some(body), NOW, DAY);
            assert_eq!((s.retry_at(), s.terminal), (None, None), "{:?}", String::from_utf8_lossy(body).get(..40));
        }
    }

    #[test]
    fn phrase_edge_cases() {
        assert_eq!(delay_phrase("try again in 99999999999999999999999s"), None);
        assert_eq!(delay_phrase("try again in inf seconds"), None);
        assert_eq!(delay_phrase("try again in a few minutes"), None);
        assert_eq!(delay_phrase("try again in"), None);
        assert_eq!(delay_phrase("try again in 0.5 s"), Some(500));
        assert_eq!(delay_phrase("retry in 26.1s."), Some(26_100));
        assert_eq!(delay_phrase("try again in 6µs"), Some(1));
        assert_eq!(delay_phrase("try again in 99999999999999999 minutes"), None);
        assert_eq!(delay_phrase("try again in é5s"), None);
    }

    #[test]
    fn message_phrase_over_the_cap_is_a_long_wait() {
        let s = parse(
            Provider::OpenAi,
            429,
            &[],
            Some(openai_error("try again in 2h", "t", "c").as_bytes()),
            NOW,
            3_600_000,
        );
        assert_eq!((s.retry_at_ms, s.terminal), (None, Some(Terminal::LongWait)));
    }
}
