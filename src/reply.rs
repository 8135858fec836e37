//! The local 429 the filter answers with when it limits a request itself: headers that every
//! client understands (`Retry-After`, `retry-after-ms`, IETF `RateLimit`) and an OpenAI-shaped
//! error body, so existing SDKs back off as they would for the provider's own 429.

use crate::priority::Priority;
use crate::quota::Unit;

/// Why the proxy (not the provider) refused a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// No token now, and the request may not wait for one.
    NoToken,
    /// Its class's queue is full.
    QueueFull,
    /// Evicted from the queue to make room for a more important request.
    Shed,
    /// Waited its class's maximum without getting a token.
    Expired,
    /// The provider's quota is used up (it said so) for longer than the request may wait.
    ProviderHold,
    /// The circuit breaker is open: the provider refused with its quota nearly gone.
    BreakerOpen,
    /// The request's tenant has used up its own bucket.
    TenantLimit,
    /// Not enough LLM tokens for the request's estimate, and it may not wait for them.
    TokenLimit,
    /// The request's estimate is more than the whole token bucket: it can never pass.
    TooLarge,
    /// The rate limit service shared by every instance said over limit until later than the
    /// request may wait.
    GlobalLimit,
    /// The rate limit service did not answer and `global.failure_mode` is `deny`.
    GlobalUnavailable,
    /// A money budget (a `usd` quota, here or in the rate limit service) is spent until its
    /// window's reset.
    BudgetExceeded,
    /// A day or month window (`quotas`) has no room for the request until its reset.
    QuotaExceeded,
    /// `prices` has no price for the request's model and no `default`: it can never pass.
    UnpricedModel,
    /// `in_flight`: the provider has as many requests as it may at once, and a slot is not
    /// expected within the request's wait (or its queue is off).
    InFlightLimit,
}

impl Reason {
    pub fn name(self) -> &'static str {
        match self {
            Reason::NoToken => "no_token",
            Reason::QueueFull => "queue_full",
            Reason::Shed => "shed",
            Reason::Expired => "expired",
            Reason::ProviderHold => "provider_hold",
            Reason::BreakerOpen => "breaker_open",
            Reason::TenantLimit => "tenant_limit",
            Reason::TokenLimit => "token_limit",
            Reason::TooLarge => "too_large",
            Reason::GlobalLimit => "global_limit",
            Reason::GlobalUnavailable => "global_unavailable",
            Reason::BudgetExceeded => "budget_exceeded",
            Reason::QuotaExceeded => "quota_exceeded",
            Reason::UnpricedModel => "unpriced_model",
            Reason::InFlightLimit => "in_flight_limit",
        }
    }
}

/// Everything a local 429 says.
#[derive(Clone, Debug, PartialEq)]
pub struct Limited<'a> {
    /// Policy name in the `RateLimit` headers (the filter's `name`).
    pub name: &'a str,
    pub priority: Priority,
    pub reason: Reason,
    /// Time until a token for this class will exist.
    pub wait_ms: u64,
    /// Tokens this class could still spend (0 when refused for lack of tokens).
    pub remaining: u64,
    /// Bucket capacity and the seconds it takes to refill it, for `RateLimit-Policy`.
    pub quota: u64,
    pub window_s: u64,
    /// False for a terminal provider quota: clients should not retry soon.
    pub retry: bool,
    /// For a `quotas` window that refused: its unit, limit and period ("day", "month").
    pub window: Option<(Unit, u64, &'a str)>,
}

/// Status, headers and body of the local reply.
pub fn too_many_requests(l: &Limited) -> (u32, Vec<(&'static str, String)>, String) {
    let secs = retry_after_secs(l.wait_ms);
    let headers = vec![
        ("retry-after", secs.to_string()),
        ("retry-after-ms", l.wait_ms.max(1).to_string()),
        ("ratelimit-policy", format!("\"{}\";q={};w={}", l.name, l.quota, l.window_s)),
        ("ratelimit", format!("\"{}\";r={};t={}", l.name, l.remaining, secs)),
        ("x-llm-ratelimit-source", "proxy".to_string()),
        ("x-llm-ratelimit-reason", l.reason.name().to_string()),
        ("x-llm-ratelimit-priority", l.priority.name().to_string()),
        ("x-should-retry", l.retry.to_string()),
        ("content-type", "application/json".to_string()),
    ];
    let (message, kind) = match (l.reason, l.window) {
        (r @ (Reason::BudgetExceeded | Reason::QuotaExceeded), Some((unit, limit, per))) => (
            format!(
                "{} reached by the proxy: {} per {per}. It resets in {}.{:03}s.",
                if r == Reason::BudgetExceeded { "Budget" } else { "Quota" },
                amount(unit, limit),
                l.wait_ms / 1000,
                l.wait_ms % 1000
            ),
            if r == Reason::BudgetExceeded { "budget" } else { "quota" },
        ),
        (Reason::BudgetExceeded, None) => (
            format!(
                "Budget reached at the rate limit service. It resets in {}.{:03}s.",
                l.wait_ms / 1000,
                l.wait_ms % 1000
            ),
            "budget",
        ),
        (Reason::UnpricedModel, _) => (
            "The proxy has no price for this model (unpriced_model): it can never pass. Do not retry it.".to_string(),
            "budget",
        ),
        (Reason::TooLarge, _) => (
            "Request too large for the proxy's token limit (too_large): it can never pass. Do not retry it."
                .to_string(),
            "tokens",
        ),
        (r, _) => (
            format!(
                "Rate limit reached by the proxy for {} priority requests ({}). Please try again in {}.{:03}s.",
                l.priority.name(),
                r.name(),
                l.wait_ms / 1000,
                l.wait_ms % 1000
            ),
            if r == Reason::TokenLimit { "tokens" } else { "requests" },
        ),
    };
    // Written directly: the message holds only our own words and numbers, nothing to escape.
    let body =
        format!(r#"{{"error":{{"message":"{message}","type":"{kind}","param":null,"code":"rate_limit_exceeded"}}}}"#);
    (429, headers, body)
}

/// A quota's limit in its unit's words: `$1.50`, `1000 tokens`.
fn amount(unit: Unit, limit: u64) -> String {
    match unit {
        Unit::MicroUsd => {
            let cents = limit.div_ceil(10_000);
            format!("${}.{:02}", cents / 100, cents % 100)
        }
        u => format!("{limit} {}", u.name().replace('_', " ")),
    }
}

/// Whole seconds for `Retry-After`: rounded up so a client never retries before the token
/// exists, and at least 1 because 0 invites an immediate retry storm.
pub fn retry_after_secs(wait_ms: u64) -> u64 {
    wait_ms.div_ceil(1000).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    fn limited(wait_ms: u64) -> Limited<'static> {
        Limited {
            name: "openai",
            priority: Priority::Low,
            reason: Reason::NoToken,
            wait_ms,
            remaining: 0,
            quota: 100,
            window_s: 10,
            retry: true,
            window: None,
        }
    }

    fn header<'a>(h: &'a [(&str, String)], name: &str) -> &'a str {
        h.iter().find(|(n, _)| *n == name).map(|(_, v)| v.as_str()).unwrap()
    }

    #[test]
    fn retry_after_rounds_up_and_is_never_zero() {
        assert_eq!(retry_after_secs(0), 1);
        assert_eq!(retry_after_secs(1), 1);
        assert_eq!(retry_after_secs(1000), 1);
        assert_eq!(retry_after_secs(1001), 2);
        assert_eq!(retry_after_secs(2100), 3);
        assert_eq!(retry_after_secs(u64::MAX), u64::MAX / 1000 + 1);
    }

    #[test]
    fn headers_carry_the_wait_the_policy_and_the_source() {
        let (status, h, _) = too_many_requests(&limited(2100));
        assert_eq!(status, 429);
        assert_eq!(header(&h, "retry-after"), "3");
        assert_eq!(header(&h, "retry-after-ms"), "2100");
        assert_eq!(header(&h, "ratelimit"), "\"openai\";r=0;t=3");
        assert_eq!(header(&h, "ratelimit-policy"), "\"openai\";q=100;w=10");
        assert_eq!(header(&h, "x-llm-ratelimit-source"), "proxy");
        assert_eq!(header(&h, "x-llm-ratelimit-priority"), "LOW");
        assert_eq!(header(&h, "x-should-retry"), "true");
    }

    #[test]
    fn terminal_quotas_tell_clients_not_to_retry() {
        let (_, h, _) = too_many_requests(&Limited { retry: false, reason: Reason::BreakerOpen, ..limited(3_600_000) });
        assert_eq!(header(&h, "x-should-retry"), "false");
        assert_eq!(header(&h, "retry-after"), "3600");
        assert_eq!(header(&h, "x-llm-ratelimit-reason"), "breaker_open");
    }

    #[test]
    fn body_has_the_openai_error_shape() {
        let (_, _, body) = too_many_requests(&limited(174));
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["error"]["code"], "rate_limit_exceeded");
        assert_eq!(v["error"]["type"], "requests");
        assert!(v["error"]["param"].is_null());
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(msg.contains("try again in 0.174s"), "{msg}");
        let (_, h, body) = too_many_requests(&Limited { reason: Reason::TooLarge, retry: false, ..limited(0) });
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!((v["error"]["type"].as_str(), header(&h, "x-should-retry")), (Some("tokens"), "false"));
        assert!(v["error"]["message"].as_str().unwrap().contains("can never pass"));
    }
}
