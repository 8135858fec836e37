//! Per-provider rate-limit headers and error bodies, following
//! shared/reference/provider-rate-limit-headers.md.
//!
//! Every time value is derived from the real quota state at the moment of
//! answering and rounded *up* (to ms or whole seconds), so a client that waits
//! the advertised time is never early, and never more than 1 s late.

use std::time::Duration;

use axum::http::{HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use crate::config::{Style, Terminal};
use crate::quota::{Budget, Dimension, Snapshot};
use crate::timefmt::{ceil_ms, ceil_secs, go_duration, http_date, next_month_start, proto_duration, rfc3339};

pub type Headers = Vec<(&'static str, String)>;

/// The quota as seen when answering one request.
pub struct Report {
    pub snapshot: Snapshot,
    /// Set on a 429: the budget that ran out and when it frees up.
    pub limited: Option<(Dimension, Duration)>,
    /// Server wall clock, since the Unix epoch (for absolute reset times).
    pub wall: Duration,
    pub window: Duration,
    pub request_id: u64,
}

impl Report {
    /// The one budget that styles with a single set of headers report: the one
    /// that blocked, else requests, else tokens.
    fn primary(&self) -> Option<Budget> {
        match self.limited {
            Some((dim, _)) => self.snapshot.get(dim),
            None => self.snapshot.requests.or(self.snapshot.tokens),
        }
    }

    /// Absolute time, in whole epoch seconds (rounded up), `after` from now.
    fn epoch_after(&self, after: Duration) -> u64 {
        ceil_secs(self.wall + after)
    }
}

/// Rate-limit headers for `style`, on 200s and 429s alike (plus retry hints on 429s).
pub fn quota_headers(style: Style, r: &Report) -> Headers {
    let mut h = Headers::new();
    let budgets = [("requests", r.snapshot.requests), ("tokens", r.snapshot.tokens)];
    let retry = r.limited.map(|(_, d)| d);
    match style {
        Style::OpenAi | Style::Groq => {
            for (dim, b) in budgets {
                let Some(b) = b else { continue };
                let (limit, remaining, reset) = match dim {
                    "requests" => {
                        ("x-ratelimit-limit-requests", "x-ratelimit-remaining-requests", "x-ratelimit-reset-requests")
                    }
                    _ => ("x-ratelimit-limit-tokens", "x-ratelimit-remaining-tokens", "x-ratelimit-reset-tokens"),
                };
                h.push((limit, b.limit.to_string()));
                h.push((remaining, b.remaining.to_string()));
                h.push((reset, go_duration(ceil_ms(b.reset))));
            }
            if style == Style::Groq {
                h.push(("x-groq-region", "us-west-1".into()));
            }
            if let Some(d) = retry {
                h.push(("retry-after", ceil_secs(d).to_string()));
            }
        }
        Style::Azure => {
            if let Some(b) = r.snapshot.requests {
                h.push(("x-ratelimit-remaining-requests", b.remaining.to_string()));
            }
            if let Some(b) = r.snapshot.tokens {
                h.push(("x-ratelimit-remaining-tokens", b.remaining.to_string()));
            }
            if let Some(d) = retry {
                h.extend(azure_retry(d));
            }
        }
        Style::Anthropic => {
            // One token budget stands in for all three Anthropic token dimensions.
            let dims: [(&str, Option<Budget>); 4] = [
                ("requests", r.snapshot.requests),
                ("tokens", r.snapshot.tokens),
                ("input-tokens", r.snapshot.tokens),
                ("output-tokens", r.snapshot.tokens),
            ];
            for (dim, b) in dims {
                let Some(b) = b else { continue };
                h.push((anthropic_header(dim, "limit"), b.limit.to_string()));
                h.push((anthropic_header(dim, "remaining"), b.remaining.to_string()));
                h.push((anthropic_header(dim, "reset"), rfc3339(r.epoch_after(b.reset))));
            }
            if let Some(d) = retry {
                h.push(("retry-after", ceil_secs(d).to_string()));
            }
        }
        Style::Gemini | Style::Bedrock => {} // timing only in the body, or nowhere
        Style::Mistral => {
            // "bysize" is the token budget; fall back to requests so there is a reset to read.
            if let Some(b) = r.snapshot.tokens.or(r.snapshot.requests) {
                h.push(("ratelimitbysize-limit", b.limit.to_string()));
                h.push(("ratelimitbysize-remaining", b.remaining.to_string()));
                h.push(("ratelimitbysize-reset", ceil_secs(b.reset).to_string()));
            }
            if let Some(b) = r.snapshot.requests {
                h.push(("x-ratelimit-limit-req-minute", b.limit.to_string()));
                h.push(("x-ratelimit-remaining-req-minute", b.remaining.to_string()));
            }
        }
        Style::Cohere => {
            // Trial-key counters, absent on 429 like the real API; never a reset.
            if let (Some(b), None) = (r.snapshot.requests, retry) {
                h.push(("x-trial-endpoint-call-limit", b.limit.to_string()));
                h.push(("x-trial-endpoint-call-remaining", b.remaining.to_string()));
            }
        }
        Style::Generic | Style::GenericDate | Style::GenericMs => {
            if let Some(b) = r.primary() {
                h.push(("x-ratelimit-limit", b.limit.to_string()));
                h.push(("x-ratelimit-remaining", b.remaining.to_string()));
                let reset = match style {
                    // Epoch milliseconds, and no Retry-After: the reset is only here.
                    Style::GenericMs => ceil_ms(r.wall + b.reset).as_millis().to_string(),
                    _ => r.epoch_after(b.reset).to_string(),
                };
                h.push(("x-ratelimit-reset", reset));
            }
            if style == Style::GenericDate {
                // Our own Date (not hyper's cached one) so Retry-After - Date is exact.
                h.push(("date", http_date(r.wall.as_secs())));
                if let Some(d) = retry {
                    h.push(("retry-after", http_date(r.epoch_after(d))));
                }
            } else if let (Style::Generic, Some(d)) = (style, retry) {
                h.push(("retry-after", ceil_secs(d).to_string()));
            }
        }
        Style::Ietf => {
            if let Some(b) = r.primary() {
                let w = ceil_secs(r.window);
                h.push(("ratelimit-policy", format!("\"default\";q={};w={w}", b.limit)));
                h.push(("ratelimit", format!("\"default\";r={};t={}", b.remaining, ceil_secs(b.reset))));
            }
            if let Some(d) = retry {
                h.push(("retry-after", ceil_secs(d).to_string()));
            }
        }
        Style::IetfDraft07 => {
            // No Retry-After: clients must read the reset from RateLimit itself.
            if let Some(b) = r.primary() {
                h.push((
                    "ratelimit",
                    format!("limit={}, remaining={}, reset={}", b.limit, b.remaining, ceil_secs(b.reset)),
                ));
            }
        }
    }
    h
}

fn anthropic_header(dim: &str, field: &str) -> &'static str {
    // HeaderName::from_static needs 'static names; there are only twelve.
    match (dim, field) {
        ("requests", "limit") => "anthropic-ratelimit-requests-limit",
        ("requests", "remaining") => "anthropic-ratelimit-requests-remaining",
        ("requests", _) => "anthropic-ratelimit-requests-reset",
        ("tokens", "limit") => "anthropic-ratelimit-tokens-limit",
        ("tokens", "remaining") => "anthropic-ratelimit-tokens-remaining",
        ("tokens", _) => "anthropic-ratelimit-tokens-reset",
        ("input-tokens", "limit") => "anthropic-ratelimit-input-tokens-limit",
        ("input-tokens", "remaining") => "anthropic-ratelimit-input-tokens-remaining",
        ("input-tokens", _) => "anthropic-ratelimit-input-tokens-reset",
        (_, "limit") => "anthropic-ratelimit-output-tokens-limit",
        (_, "remaining") => "anthropic-ratelimit-output-tokens-remaining",
        _ => "anthropic-ratelimit-output-tokens-reset",
    }
}

fn azure_retry(d: Duration) -> Headers {
    let ms = ceil_ms(d).as_millis().to_string();
    vec![("retry-after-ms", ms.clone()), ("x-ms-retry-after-ms", ms), ("retry-after", ceil_secs(d).to_string())]
}

/// The 429 a provider sends when the window quota is exhausted.
pub fn rate_limited(style: Style, r: &Report) -> Response {
    let (dim, retry) = r.limited.expect("rate_limited needs a blocked dimension");
    let limit = r.snapshot.get(dim).map_or(0, |b| b.limit);
    let per_min = if dim == Dimension::Requests { "RPM" } else { "TPM" };
    let headers = quota_headers(style, r);
    let body = match style {
        Style::OpenAi
        | Style::Groq
        | Style::Generic
        | Style::GenericDate
        | Style::GenericMs
        | Style::Ietf
        | Style::IetfDraft07 => {
            let used = r.snapshot.get(dim).map_or(0, |b| b.limit - b.remaining);
            openai_error(
                &format!(
                    "Rate limit reached for {d} in organization org-mock on {d} per min ({per_min}): \
                     Limit {limit}, Used {used}, Requested 1. Please try again in {}. \
                     Visit https://platform.openai.com/account/rate-limits to learn more.",
                    go_duration(ceil_ms(retry)),
                    d = dim.as_str(),
                ),
                dim.as_str(),
                "rate_limit_exceeded",
            )
        }
        Style::Azure => azure_error(
            if dim == Dimension::Requests { "call rate limit" } else { "token rate limit" },
            ceil_secs(retry),
        ),
        Style::Anthropic => anthropic_error(
            &format!(
                "This request would exceed the rate limit for your organization (org-mock) of {limit} {} \
                 per minute. For details, refer to: https://docs.anthropic.com/en/api/rate-limits. \
                 You can see the response headers for current usage.",
                if dim == Dimension::Requests { "requests" } else { "input tokens" }
            ),
            r.request_id,
        ),
        Style::Gemini => match dim {
            Dimension::Requests => gemini_error(
                "generativelanguage.googleapis.com/generate_content_free_tier_requests",
                "GenerateRequestsPerMinutePerProjectPerModel",
                &proto_duration(ceil_ms(retry)),
            ),
            Dimension::Tokens => gemini_error(
                "generativelanguage.googleapis.com/generate_content_free_tier_input_token_count",
                "GenerateContentInputTokensPerModelPerMinute-FreeTier",
                &proto_duration(ceil_ms(retry)),
            ),
        },
        Style::Mistral => json!({
            "object": "error", "message": "Rate limit exceeded", "type": "rate_limited",
            "param": null, "code": "1300",
        }),
        Style::Cohere => json!({
            "message": format!(
                "You are using a Trial key, which is limited to {limit} API calls / minute. You can continue \
                 to use the Trial key for free or upgrade to a Production key with higher rate limits at \
                 'https://dashboard.cohere.com/api-keys'. Contact us on 'https://discord.gg/XW44jPfYJu' or \
                 email us at support@cohere.com with any questions"
            ),
        }),
        Style::Bedrock => {
            let mut headers = headers;
            headers.push(bedrock_throttling());
            let what = if dim == Dimension::Requests { "requests" } else { "tokens" };
            return respond(
                StatusCode::TOO_MANY_REQUESTS,
                headers,
                json!({"message": format!("Too many {what}, please wait before trying again.")}),
            );
        }
    };
    respond(StatusCode::TOO_MANY_REQUESTS, headers, body)
}

fn bedrock_throttling() -> (&'static str, String) {
    ("x-amzn-errortype", "ThrottlingException:http://internal.amazon.com/coral/com.amazon.bedrock/".into())
}

/// The 429 for a quota that waiting out the window does not fix.
pub fn terminal(kind: Terminal, r: &Report) -> Response {
    let too_many = StatusCode::TOO_MANY_REQUESTS;
    match kind {
        Terminal::None => unreachable!("terminal(None) is never answered"),
        Terminal::InsufficientQuota => respond(
            too_many,
            vec![],
            openai_error(
                "You exceeded your current quota, please check your plan and billing details.",
                "insufficient_quota",
                "insufficient_quota",
            ),
        ),
        // No retry-after: the limit lasts until the 1st of next month.
        Terminal::SpendLimit => respond(
            too_many,
            vec![],
            anthropic_error(
                &format!(
                    "enforced_spend_limit_reached: You have reached your specified API usage limits. \
                     You will regain access on {} at 00:00 UTC.",
                    next_month_start(r.wall.as_secs())
                ),
                r.request_id,
            ),
        ),
        Terminal::Daily => {
            respond(too_many, azure_retry(Duration::from_secs(86_400)), azure_error("call rate limit", 86_400))
        }
        Terminal::RequestTooLarge => respond(
            too_many,
            vec![],
            openai_error(
                "Request too large for gpt-4 in organization org-mock on tokens per min (TPM): \
                 Limit 30000, Requested 31538. The input or output tokens must be reduced in order \
                 to run successfully. Visit https://platform.openai.com/account/rate-limits to learn more.",
                "tokens",
                "rate_limit_exceeded",
            ),
        ),
        Terminal::GeminiDaily => respond(
            too_many,
            vec![],
            gemini_error(
                "generativelanguage.googleapis.com/generate_content_free_tier_requests",
                "GenerateRequestsPerDayPerProjectPerModel-FreeTier",
                "51820.638305887s",
            ),
        ),
    }
}

/// `x-mock-status: N`: that status with an OpenAI-shaped error and no timing hints.
pub fn forced(status: StatusCode) -> Response {
    let kind = if status.is_server_error() { "server_error" } else { "invalid_request_error" };
    let message = format!("mock-provider: forced status {} (x-mock-status)", status.as_u16());
    respond(status, vec![], openai_error(&message, kind, "mock_forced_status"))
}

/// A 429 for `x-mock-fail-attempts`: a short limit that is over in 100 ms.
pub fn retry_soon() -> Response {
    let headers = vec![("retry-after-ms", "100".to_string()), ("retry-after", "1".to_string())];
    let body = openai_error("Rate limit reached. Please try again in 100ms.", "requests", "rate_limit_exceeded");
    respond(StatusCode::TOO_MANY_REQUESTS, headers, body)
}

/// The capacity queue is full (`--capacity`): 503 (or 429) with no timing hint at all, like
/// an overloaded vLLM/TGI.
pub fn overloaded(status: StatusCode) -> Response {
    respond(status, vec![], json!({"error": {"message": "server overloaded", "type": "overloaded"}}))
}

/// Errors about the request itself (bad override header, unknown route).
pub fn error(status: StatusCode, message: &str) -> Response {
    let kind = if status == StatusCode::NOT_FOUND { "not_found" } else { "invalid_request_error" };
    respond(status, vec![], json!({"error": {"message": message, "type": kind}}))
}

fn openai_error(message: &str, kind: &str, code: &str) -> Value {
    json!({"error": {"message": message, "type": kind, "param": null, "code": code}})
}

fn azure_error(what: &str, retry_secs: u64) -> Value {
    json!({"error": {"code": "429", "message": format!(
        "Requests to the ChatCompletions_Create Operation under Azure OpenAI API version 2024-02-01 \
         have exceeded {what} of your current OpenAI S0 pricing tier. Please retry after {retry_secs} \
         seconds. Please go here: https://aka.ms/oai/quotaincrease if you would like to further \
         increase the default rate limit."
    )}})
}

fn anthropic_error(message: &str, request_id: u64) -> Value {
    json!({
        "type": "error",
        "error": {"type": "rate_limit_error", "message": message},
        "request_id": format!("req_mock_{request_id}"),
    })
}

fn gemini_error(metric: &str, quota_id: &str, retry_delay: &str) -> Value {
    json!({"error": {
        "code": 429,
        "message": "Resource has been exhausted (e.g. check quota).",
        "status": "RESOURCE_EXHAUSTED",
        "details": [
            {
                "@type": "type.googleapis.com/google.rpc.QuotaFailure",
                "violations": [{"quotaMetric": metric, "quotaId": quota_id}],
            },
            {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": retry_delay},
        ],
    }})
}

pub fn respond(status: StatusCode, headers: Headers, body: Value) -> Response {
    let mut response = (status, Json(body)).into_response();
    add_headers(&mut response, headers);
    response
}

pub fn add_headers(response: &mut Response, headers: Headers) {
    for (name, value) in headers {
        let value = HeaderValue::from_str(&value).expect("header values are ASCII");
        response.headers_mut().insert(HeaderName::from_static(name), value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(limited: bool) -> Report {
        let budget = |limit, remaining, ms| Budget { limit, remaining, reset: Duration::from_millis(ms) };
        Report {
            snapshot: Snapshot { requests: Some(budget(10, 0, 6_595_400)), tokens: Some(budget(1000, 400, 1500)) },
            limited: limited.then_some((Dimension::Requests, Duration::from_millis(6_595_400))),
            wall: Duration::from_millis(1_696_004_797_250), // 2023-09-29T16:26:37.25Z
            window: Duration::from_secs(60),
            request_id: 7,
        }
    }

    fn get<'a>(h: &'a Headers, name: &str) -> Option<&'a str> {
        h.iter().find(|(n, _)| *n == name).map(|(_, v)| v.as_str())
    }

    #[test]
    fn openai_headers() {
        let h = quota_headers(Style::OpenAi, &report(true));
        assert_eq!(get(&h, "x-ratelimit-reset-requests"), Some("1h49m55.4s"));
        assert_eq!(get(&h, "x-ratelimit-remaining-tokens"), Some("400"));
        assert_eq!(get(&h, "x-ratelimit-reset-tokens"), Some("1.5s"));
        assert_eq!(get(&h, "retry-after"), Some("6596"));
        assert_eq!(get(&quota_headers(Style::OpenAi, &report(false)), "retry-after"), None);
    }

    #[test]
    fn absolute_times_round_up() {
        let h = quota_headers(Style::Anthropic, &report(true));
        // 16:26:37.25 + 1.5 s = 16:26:38.75, rounded up to :39.
        assert_eq!(get(&h, "anthropic-ratelimit-output-tokens-reset"), Some("2023-09-29T16:26:39Z"));
        let h = quota_headers(Style::GenericDate, &report(true));
        assert_eq!(get(&h, "date"), Some("Fri, 29 Sep 2023 16:26:37 GMT"));
        assert_eq!(get(&h, "x-ratelimit-reset"), Some("1696011393")); // now + 6595.4 s, rounded up
        assert_eq!(get(&h, "retry-after"), Some("Fri, 29 Sep 2023 18:16:33 GMT"));
    }

    #[test]
    fn generic_ms_reset_is_epoch_milliseconds_without_retry_after() {
        let h = quota_headers(Style::GenericMs, &report(true));
        // 16:26:37.25 + 6595.4 s, in ms.
        assert_eq!(get(&h, "x-ratelimit-reset"), Some("1696011392650"));
        assert_eq!(get(&h, "x-ratelimit-remaining"), Some("0"));
        assert_eq!(get(&h, "retry-after"), None);
    }

    #[test]
    fn ietf_headers() {
        let h = quota_headers(Style::Ietf, &report(false));
        assert_eq!(get(&h, "ratelimit-policy"), Some("\"default\";q=10;w=60"));
        assert_eq!(get(&h, "ratelimit"), Some("\"default\";r=0;t=6596"));
        let h = quota_headers(Style::IetfDraft07, &report(true));
        assert_eq!(get(&h, "ratelimit"), Some("limit=10, remaining=0, reset=6596"));
    }
}
