//! The filter reads the provider's rate-limit signals in every style, keeps traffic off an
//! exhausted provider until its reset, and tells every client one precise Retry-After.

mod support;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use support::*;

/// A roomy bucket: here the provider's quota is what runs out.
const ROOMY: &str = r#""bucket":{"capacity":1000,"refill_rate":1000},"classify":{"trust_header":true}"#;

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64
}

/// Restarts the mock's quota window now; returns when that window ends (epoch ms).
fn restart_window(mock: &Mock, window_ms: u64) -> u64 {
    let started = now_ms();
    ureq::post(&format!("http://127.0.0.1:{}/mock/reset", mock.port)).call().expect("reset");
    started + window_ms
}

/// After the provider reports its quota used up, requests wait for the reset instead of
/// reaching it: at most the requests already in flight get its 429.
fn exhausted_window_is_respected(style: &str) {
    let mock = Mock::start(&["--quota", "4", "--window-ms", "2500", "--style", style]);
    let envoy = Envoy::start(&format!("{{\"name\":\"ex\",{ROOMY}}}"), 2, mock.port);
    let reset = restart_window(&mock, 2500);
    let replies = burst(&envoy.url("/v1/chat/completions"), 10, 2, &[]);
    assert!(now_ms() >= reset, "{style}: all 10 cannot fit before the first reset");
    let summary: Vec<String> = replies
        .iter()
        .map(|r| format!("{} {:?} {:?}", r.status, r.header("x-llm-ratelimit-reason"), r.header("retry-after")))
        .collect();
    assert_eq!(count(&replies, 200), 10, "{style}: held requests succeed after the reset: {summary:?}");
    let limited = mock.stats()["rate_limited"].as_u64().unwrap();
    assert!(limited <= 2, "{style}: {limited} requests reached the exhausted provider");
    assert!(envoy.stat("ex", "throttled") >= 1, "{style}: the exhausted quota was noticed");
}

#[test]
fn openai_style_exhaustion_holds_requests_until_the_reset() {
    exhausted_window_is_respected("openai");
}

#[test]
fn anthropic_style_exhaustion_holds_requests_until_the_reset() {
    exhausted_window_is_respected("anthropic");
}

#[test]
fn generic_and_ietf_style_exhaustion_holds_requests_until_the_reset() {
    exhausted_window_is_respected("generic");
    exhausted_window_is_respected("ietf");
}

/// A request that cannot wait for the reset is refused with a Retry-After that lands on it.
fn retry_after_matches_the_reset(style: &str) {
    let mock = Mock::start(&["--quota", "2", "--window-ms", "4000", "--style", style]);
    let config = format!("{{\"name\":\"ra\",{ROOMY},\"priorities\":{{\"NORMAL\":{{\"max_wait_ms\":300}}}}}}");
    let envoy = Envoy::start(&config, 2, mock.port);
    let reset = restart_window(&mock, 4000);
    let url = envoy.url("/v1/chat/completions");
    for _ in 0..2 {
        assert_eq!(chat(&url, &[]).unwrap().status, 200, "{style}");
    }
    // Styles that report the reset on successes hold from here on. The others (Azure) learn it
    // from the first over-quota request, which the router then holds until the reset itself.
    std::thread::scope(|s| {
        s.spawn(|| chat(&url, &[]));
        std::thread::sleep(Duration::from_millis(300));
        for _ in 0..3 {
            let asked = now_ms();
            let r = chat(&url, &[]).unwrap();
            assert_eq!(r.status, 429, "{style}: {r:?}");
            let reason = r.header("x-llm-ratelimit-reason");
            assert!(matches!(reason, Some("provider_hold" | "breaker_open")), "{style}: {reason:?}");
            let ms: u64 = r.header("retry-after-ms").unwrap().parse().unwrap();
            let secs: u64 = r.header("retry-after").unwrap().parse().unwrap();
            let (at, at_secs) = (asked + ms, asked + secs * 1000);
            assert!(at + 1000 >= reset && at <= reset + 1000, "{style}: retry at {at}, reset at {reset}");
            assert!(
                at_secs + 50 >= reset && at_secs <= reset + 2000,
                "{style}: Retry-After {secs} s, reset in {} ms",
                reset - asked
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    });
    let limited = mock.stats()["rate_limited"].as_u64().unwrap();
    assert!(limited <= 1, "{style}: {limited} requests reached the exhausted provider");
}

#[test]
fn every_style_gets_a_retry_after_within_a_second_of_the_reset() {
    for style in ["openai", "groq", "anthropic", "azure", "mistral", "generic", "generic-date", "ietf", "ietf-draft07"]
    {
        retry_after_matches_the_reset(style);
    }
}

/// LOW gets no router retries here, so the provider's 429 reaches the filter at once.
const NO_LOW_RETRIES: &str = r#""priorities":{"LOW":{"max_retries":0}}"#;

#[test]
fn a_429_trips_the_breaker_until_the_named_reset_which_closes_it() {
    // Gemini-style: no quota headers on successes, timing only in the 429 body.
    let mock = Mock::start(&["--quota", "2", "--window-ms", "3000", "--style", "gemini"]);
    // LOW may wait 500 ms: not long enough for the reset, so an open breaker refuses it at once.
    let config =
        format!("{{\"name\":\"br\",{ROOMY},\"priorities\":{{\"LOW\":{{\"max_retries\":0,\"max_wait_ms\":500}}}}}}");
    let envoy = Envoy::start(&config, 2, mock.port);
    let reset = restart_window(&mock, 3000);
    let url = envoy.url("/v1/chat/completions");
    let low = [("x-llm-priority", "LOW")];
    for _ in 0..2 {
        assert_eq!(chat(&url, &low).unwrap().status, 200);
    }
    let asked = now_ms();
    let r = chat(&url, &low).unwrap();
    assert_eq!(r.status, 429, "{r:?}");
    assert_eq!(r.header("x-llm-ratelimit-source"), Some("provider"));
    assert_eq!(r.header("x-should-retry"), Some("true"));
    // The body's retryDelay was read before the headers went on: this first client has it.
    let ms: u64 = r.header("retry-after-ms").unwrap().parse().unwrap();
    assert!((asked + ms).abs_diff(reset) <= 1000, "told {ms} ms, reset in {} ms", reset - asked);
    assert!(r.body.contains("RESOURCE_EXHAUSTED"), "the provider's body is kept");
    assert_eq!(envoy.stat("br", "breaker.trips"), 1);
    assert_eq!(envoy.stat("br", "breaker.state"), 1);

    // Open: fail fast, nothing reaches the provider, every client told when to come back.
    for _ in 0..5 {
        let r = chat(&url, &low).unwrap();
        assert_eq!(r.status, 429);
        assert_eq!(r.header("x-llm-ratelimit-reason"), Some("breaker_open"));
        let ms: u64 = r.header("retry-after-ms").unwrap().parse().unwrap();
        assert!((now_ms() + ms).abs_diff(reset) <= 1000);
    }
    assert_eq!(mock.received(), 3);

    // The provider named its reset: at that instant the breaker closes, no probe needed, and
    // the first answer after it says the reset was right.
    std::thread::sleep(Duration::from_millis(reset.saturating_sub(now_ms()) + 100));
    assert_eq!(chat(&url, &low).unwrap().status, 200);
    assert_eq!(chat(&url, &low).unwrap().status, 200);
    assert_eq!(envoy.stat("br", "breaker.probes"), 0);
    assert_eq!(envoy.stat("br", "breaker.state"), 0);
    assert_eq!(envoy.stat("br", "reset.accurate"), 1);
    assert_eq!(envoy.stat("br", "reset.early"), 0);
    assert_eq!(envoy.stat("br", "upstream_429"), 1);
}

#[test]
fn without_timing_the_breaker_backs_off_and_one_probe_decides() {
    // Cohere-style: no timing anywhere. The breaker guesses 1 s, the probe then finds the window
    // still exhausted (early: the back-off doubles), and the next probe closes it.
    let mock = Mock::start(&["--quota", "2", "--window-ms", "2500", "--style", "cohere"]);
    let config = format!(
        "{{\"name\":\"pb\",{ROOMY},\"provider\":{{\"backoff_ms\":1000}},\
         \"priorities\":{{\"NORMAL\":{{\"max_retries\":0,\"max_wait_ms\":10000}}}}}}"
    );
    let envoy = Envoy::start(&config, 2, mock.port);
    let reset = restart_window(&mock, 2500);
    let url = envoy.url("/v1/chat/completions");
    for _ in 0..2 {
        assert_eq!(chat(&url, &[]).unwrap().status, 200);
    }
    let r = chat(&url, &[]).unwrap();
    assert_eq!(r.status, 429);
    assert_eq!(r.header("retry-after"), Some("1"), "the guessed back-off: {r:?}");
    // Waiters queue behind the probe and are served once it succeeds (the new window has room
    // for the second probe and one more).
    let replies = burst(&url, 3, 3, &[]);
    let summary: Vec<String> = replies
        .iter()
        .map(|r| {
            format!("{} {:?} {:?}", r.status, r.header("x-llm-ratelimit-reason"), r.header("x-llm-ratelimit-source"))
        })
        .collect();
    assert_eq!(count(&replies, 200), 2, "the failed probe's own client gets its 429: {summary:?}");
    assert!(now_ms() >= reset);
    assert_eq!(envoy.stat("pb", "breaker.probes"), 2, "one probe per half-open period");
    assert_eq!(envoy.stat("pb", "reset.early"), 1);
    assert_eq!(envoy.stat("pb", "reset.accurate"), 1);
    assert_eq!(envoy.stat("pb", "breaker.state"), 0);
    assert_eq!(mock.stats()["rate_limited"].as_u64().unwrap(), 2, "the first 429 and the failed probe");
}

#[test]
fn a_terminal_quota_tells_clients_not_to_retry() {
    let mock = Mock::start(&["--terminal", "insufficient_quota"]);
    let envoy = Envoy::start(&format!("{{\"name\":\"tq\",{ROOMY},{NO_LOW_RETRIES}}}"), 1, mock.port);
    let url = envoy.url("/v1/chat/completions");
    let low = [("x-llm-priority", "LOW")];
    let started = Instant::now();
    let r = chat(&url, &low).unwrap();
    assert_eq!(r.status, 429);
    assert_eq!(r.header("x-llm-ratelimit-source"), Some("provider"));
    assert!(r.body.contains("insufficient_quota"), "the provider's body reaches the client");
    assert_eq!(envoy.stat("tq", "terminal_quota"), 1);
    // Everyone after it is told the same without bothering the provider.
    let r = chat(&url, &[]).unwrap();
    assert_eq!(r.status, 429);
    assert_eq!(r.header("x-llm-ratelimit-reason"), Some("breaker_open"));
    assert_eq!(r.header("x-should-retry"), Some("false"));
    let secs: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!(secs >= 600, "a terminal quota is not a short back-off: {secs} s");
    assert_eq!(mock.received(), 1);
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[test]
fn garbage_rate_limit_headers_are_ignored_safely() {
    // The mock's forced-status mode sends an error with no timing at all; the filter must back
    // off (not say "retry now") and stay alive.
    let mock = Mock::start(&[]);
    let envoy = Envoy::start(&format!("{{\"name\":\"gb\",{ROOMY},{NO_LOW_RETRIES}}}"), 1, mock.port);
    let url = envoy.url("/v1/chat/completions");
    let r = chat(&url, &[("x-llm-priority", "LOW"), ("x-mock-status", "429")]).unwrap();
    assert_eq!(r.status, 429);
    let secs: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!(secs >= 1);
    assert!(!envoy.log().contains("panic"));
}

#[test]
fn while_the_breaker_is_open_the_fallback_answers_from_cache() {
    let mock = Mock::start(&["--quota", "2", "--window-ms", "60000", "--style", "gemini"]);
    let config = r#"{"name":"fb","bucket":{"capacity":1000,"refill_rate":1000},
        "tenant":{"key_header":"x-tenant","capacity":100,"refill_rate":100},
        "classify":{"trust_header":true},"priorities":{"LOW":{"max_retries":0,"max_wait_ms":500}},
        "fallback":{"enabled":true,"key_header":"x-llm-cache-key"}}"#;
    let envoy = Envoy::start(config, 1, mock.port);
    restart_window(&mock, 60_000);
    let url = envoy.url("/v1/chat/completions");
    let acme = [("x-tenant", "acme"), ("authorization", "Bearer sk-acme")];
    let ask = |who: &[(&str, &str)], key: &str| {
        let mut headers = vec![("x-llm-priority", "LOW"), ("x-llm-cache-key", key)];
        headers.extend_from_slice(who);
        chat(&url, &headers).unwrap()
    };
    let first = ask(&acme, "prompt-1");
    assert_eq!(first.status, 200);
    // With neither tenant nor credential a request is still cached, under its key.
    let anonymous = ask(&[], "prompt-anon");
    assert_eq!(anonymous.status, 200);
    assert_eq!(envoy.stat("fb", "fallback.stored"), 2);
    // The quota is gone: this 429 opens the breaker.
    let r = ask(&acme, "prompt-2");
    assert_eq!(r.status, 429);
    // The same request again is answered from the cache, marked as such.
    let cached = ask(&acme, "prompt-1");
    assert_eq!(cached.status, 200, "{cached:?}");
    assert_eq!(cached.header("x-llm-ratelimit-fallback"), Some("cache"));
    assert_eq!(cached.body, first.body);
    let cached = ask(&[], "prompt-anon");
    assert_eq!(cached.status, 200, "{cached:?}");
    assert_eq!(cached.body, anonymous.body);
    assert_eq!(envoy.stat("fb", "fallback.served"), 2);
    // The same key from another tenant or credential, or from nobody, never reads acme's answer.
    let others: [&[(&str, &str)]; 5] = [
        &[("x-tenant", "other"), ("authorization", "Bearer sk-acme")],
        &[("x-tenant", "acme"), ("authorization", "Bearer sk-other")],
        &[("x-tenant", "acme"), ("x-api-key", "Bearer sk-acme")],
        &[("x-tenant", "acme")],
        &[],
    ];
    for who in others {
        let miss = ask(who, "prompt-1");
        assert_eq!(miss.status, 429, "{who:?}: {miss:?}");
        assert_eq!(miss.header("x-llm-ratelimit-reason"), Some("breaker_open"), "{who:?}");
        assert_eq!(miss.header("x-llm-ratelimit-fallback"), None, "{who:?}");
    }
    // A request the cache has never seen still gets the breaker's 429.
    let miss = ask(&acme, "prompt-3");
    assert_eq!(miss.status, 429);
    assert_eq!(miss.header("x-llm-ratelimit-reason"), Some("breaker_open"));
    assert_eq!(envoy.stat("fb", "fallback.served"), 2);
    assert_eq!(mock.received(), 3, "cached and refused requests never reached the provider");
}

#[test]
fn retries_are_counted_per_class_and_by_the_attempt_that_succeeded() {
    let mock = Mock::start(&[]);
    let envoy = Envoy::start(r#"{"name":"rt"}"#, 1, mock.port);
    let url = envoy.url("/v1/chat/completions");
    // Two 429s that say "retry in 100 ms", then a success on the third attempt.
    let r = chat(&url, &[("x-mock-fail-attempts", "2")]).unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.header("x-envoy-attempt-count"), Some("3"));
    assert_eq!(envoy.stat("rt", "priority.normal.retry.attempts"), 2);
    assert_eq!(envoy.stat("rt", "priority.normal.retry.succeeded"), 1);
    assert_eq!(envoy.stat("rt", "priority.normal.retry.exhausted"), 0);
    let histograms = envoy.admin_text("/stats?filter=retry.succeeded_attempt&type=Histograms");
    assert!(histograms.contains("llm_ratelimit.provider.rt.retry.succeeded_attempt"), "{histograms}");
    // Always 429: the router gives up after the route's 4 retries, and the request is exhausted.
    let r = chat(&url, &[("x-mock-fail-attempts", "9")]).unwrap();
    assert_eq!(r.status, 429, "{r:?}");
    assert_eq!(envoy.stat("rt", "priority.normal.retry.exhausted"), 1);
}
