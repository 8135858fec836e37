//! Token limits in the real Envoy: each request reserves its estimated tokens from the token
//! bucket before it goes, and the provider's `usage` settles the difference after.

mod support;
use support::*;

/// A chat completion of about `chars` prompt characters asking for at most `max_tokens`.
fn chat_body(model: &str, chars: usize, max_tokens: u64) -> String {
    format!(
        r#"{{"model":"{model}","max_tokens":{max_tokens},"messages":[{{"role":"user","content":"{}"}}]}}"#,
        "x".repeat(chars)
    )
}

/// `usage.total_tokens` of an OpenAI answer.
fn total_tokens(r: &Reply) -> u64 {
    let v: serde_json::Value = serde_json::from_str(&r.body).unwrap_or_default();
    v["usage"]["total_tokens"].as_u64().unwrap_or(0)
}

#[test]
fn a_request_larger_than_the_whole_token_bucket_is_too_large() {
    let mock = Mock::start(&[]);
    let envoy = Envoy::start(r#"{"name":"tl","tokens":{"capacity":1000}}"#, 1, mock.port);
    let url = envoy.url("/v1/chat/completions");
    let r = post(&url, &chat_body("gpt-4o", 400, 5000), &[]).unwrap();
    assert_eq!(r.status, 429, "{r:?}");
    assert_eq!(r.header("x-llm-ratelimit-reason"), Some("too_large"));
    assert_eq!(r.header("x-should-retry"), Some("false"));
    assert!(r.body.contains("can never pass"), "{}", r.body);
    assert_eq!(mock.received(), 0);
    assert_eq!(envoy.stat("tl", "tokens.too_large"), 1);
    // One that fits goes.
    let r = post(&url, &chat_body("gpt-4o", 400, 100), &[]).unwrap();
    assert_eq!(r.status, 200, "{r:?}");
}

#[test]
fn a_concurrent_burst_of_large_requests_stays_within_the_token_bucket() {
    let mock = Mock::start(&[]);
    // 2000 tokens, next to no refill, no waiting: each request reserves 100 + 200 = 300.
    let config = r#"{"name":"tb","tokens":{"capacity":2000,"refill_rate":0.01},"queue":{"enabled":false}}"#;
    let envoy = Envoy::start(config, 2, mock.port);
    let url = envoy.url("/v1/chat/completions");
    let body = chat_body("gpt-4o", 400, 200);
    let next = std::sync::atomic::AtomicUsize::new(0);
    let replies = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..20 {
            s.spawn(|| {
                if next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < 20 {
                    let r = post(&url, &body, &[]).unwrap();
                    replies.lock().unwrap().push(r);
                }
            });
        }
    });
    let replies = replies.into_inner().unwrap();
    let ok: Vec<&Reply> = replies.iter().filter(|r| r.status == 200).collect();
    let used: u64 = ok.iter().map(|r| total_tokens(r)).sum();
    // Check-then-report limiters let all 20 through (6000 tokens); reserving lets 6 (1800).
    assert_eq!(ok.len(), 6, "{:?}", replies.iter().map(|r| r.status).collect::<Vec<_>>());
    assert!(used <= 2000 + 300, "the provider saw {used} tokens");
    let refused = replies.iter().find(|r| r.status == 429).unwrap();
    assert_eq!(refused.header("x-llm-ratelimit-reason"), Some("token_limit"), "{refused:?}");
    assert_eq!(mock.received(), 6);
    assert!(eventually(std::time::Duration::from_secs(2), || envoy.stat("tb", "tokens.estimated") == 1800));
    assert_eq!(envoy.stat("tb", "tokens.actual"), used);
}

#[test]
fn a_body_larger_than_max_body_bytes_passes_with_an_estimate_from_its_size() {
    let mock = Mock::start(&[]);
    let config = r#"{"name":"lb","tokens":{"capacity":5000000,"max_body_bytes":65536}}"#;
    let envoy = Envoy::start(config, 1, mock.port);
    let url = envoy.url("/v1/chat/completions");
    let r = post(&url, &chat_body("gpt-4o", 5_000_000, 10), &[]).unwrap();
    assert_eq!(r.status, 200, "{}", &r.body[..r.body.len().min(300)]);
    assert_eq!(mock.received(), 1);
    // 5 MB at 4 bytes a token, plus `output_default` (the body's max_tokens was not read).
    let estimated = envoy.stat("lb", "tokens.estimated");
    assert!((1_251_024..1_251_100).contains(&estimated), "{estimated}");
}

#[test]
fn per_model_limits_are_apart_from_the_provider_token_limit() {
    let mock = Mock::start(&[]);
    let config = r#"{"name":"pm","queue":{"enabled":false},
        "tokens":{"capacity":100000,"per_model":{"gpt-small":{"capacity":500,"refill_rate":0.01}}}}"#;
    let envoy = Envoy::start(config, 1, mock.port);
    let url = envoy.url("/v1/chat/completions");
    let small: Vec<u16> = (0..4).map(|_| post(&url, &chat_body("gpt-small", 400, 100), &[]).unwrap().status).collect();
    assert_eq!(small, [200, 200, 429, 429], "two of 200 tokens fit in gpt-small's 500");
    let other = post(&url, &chat_body("gpt-4o", 400, 100), &[]).unwrap();
    assert_eq!(other.status, 200, "other models draw on the provider's bucket");
}

#[test]
fn without_a_token_limit_nothing_is_estimated() {
    let mock = Mock::start(&[]);
    let envoy = Envoy::start(r#"{"name":"nt"}"#, 1, mock.port);
    let url = envoy.url("/v1/chat/completions");
    let r = post(&url, &chat_body("gpt-4o", 400, 100), &[]).unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(envoy.stat("nt", "tokens.estimated"), 0);
    assert_eq!(envoy.stat("nt", "tokens.actual"), 0);
}
