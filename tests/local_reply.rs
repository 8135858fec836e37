//! A request the proxy limits gets a 429 that SDKs understand: an accurate Retry-After, IETF
//! RateLimit headers, an OpenAI-shaped body, and a header saying the proxy limited it.

mod support;
use std::time::Duration;
use support::*;

#[test]
fn a_local_429_says_exactly_when_to_retry() {
    let mock = Mock::start(&[]);
    let config =
        r#"{"name":"reply","bucket":{"capacity":1,"refill_rate":0.5,"burst_allowance":0},"queue":{"enabled":false}}"#;
    let envoy = Envoy::start(config, 2, mock.port);
    let url = envoy.url("/v1/chat/completions");
    assert_eq!(chat(&url, &[]).unwrap().status, 200);

    let r = chat(&url, &[]).unwrap();
    assert_eq!(r.status, 429, "{r:?}");
    // One token every 2 s, just spent: the next exists in a little under 2 s.
    let ms: u64 = r.header("retry-after-ms").unwrap().parse().unwrap();
    assert!((1500..=2000).contains(&ms), "retry-after-ms {ms}");
    assert_eq!(r.header("retry-after"), Some("2"));
    assert_eq!(r.header("ratelimit"), Some("\"reply\";r=0;t=2"));
    assert_eq!(r.header("ratelimit-policy"), Some("\"reply\";q=1;w=2"));
    assert_eq!(r.header("x-llm-ratelimit-source"), Some("proxy"));
    assert_eq!(r.header("x-llm-ratelimit-reason"), Some("no_token"));
    assert_eq!(r.header("x-should-retry"), Some("true"));
    let body: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(body["error"]["code"], "rate_limit_exceeded");
    assert_eq!(body["error"]["type"], "requests");

    // Waiting what it said is enough.
    std::thread::sleep(Duration::from_millis(ms + 50));
    assert_eq!(chat(&url, &[]).unwrap().status, 200);
    assert_eq!(mock.received(), 2, "the limited request never reached the provider");
}
