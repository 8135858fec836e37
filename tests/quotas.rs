//! Quotas that follow real usage, in the real Envoy: tenant token limits settled from `usage`,
//! input and output tokens apart, day windows and money budgets.

mod support;
use llm_ratelimit::calendar::{self, Period, TimeZone};
use llm_ratelimit::time::Instant;
use std::sync::Mutex;
use std::time::Duration;
use support::*;

/// A chat completion with a prompt of `chars` characters asking for at most `max_tokens`.
fn chat_body(chars: usize, max_tokens: u64) -> String {
    format!(
        r#"{{"model":"gpt-4o","max_tokens":{max_tokens},"messages":[{{"role":"user","content":"{}"}}]}}"#,
        "x".repeat(chars)
    )
}

/// `usage.total_tokens` of an OpenAI answer.
fn total_tokens(r: &Reply) -> u64 {
    let v: serde_json::Value = serde_json::from_str(&r.body).unwrap_or_default();
    v["usage"]["total_tokens"].as_u64().unwrap_or(0)
}

/// What one client of `tenant` got in `run`: requests served and the tokens they used. It sends
/// one request at a time and, refused, waits as `Retry-After` says (at most 200 ms).
fn client(url: &str, tenant: &dyn Fn(usize) -> String, body: &str, run: Duration) -> (u64, u64) {
    let end = std::time::Instant::now() + run;
    let (mut served, mut used) = (0, 0);
    let mut i = 0;
    while std::time::Instant::now() < end {
        let key = tenant(i);
        i += 1;
        let r = post(url, body, &[("x-llm-tenant", key.as_str())]).unwrap();
        if r.status == 200 {
            served += 1;
            used += total_tokens(&r);
        } else {
            assert_eq!(r.status, 429, "{r:?}");
            let ms = r.header("retry-after-ms").and_then(|v| v.parse().ok()).unwrap_or(100u64);
            std::thread::sleep(Duration::from_millis(ms.clamp(5, 200)));
        }
    }
    (served, used)
}

#[test]
fn each_tenant_gets_its_tokens_per_minute_settled_from_usage_and_a_rotating_key_gets_nothing_extra() {
    // Answers of 50 tokens to prompts of 10 (40 characters): 60 used, 10 + 500 reserved.
    let mock = Mock::start(&["--output-tokens", "50"]);
    // Tenant values are client-chosen here: three tenants' first bursts for newcomers, then one
    // tenant's refill, whatever the number of values.
    let config = r#"{"name":"tt","tenant":{"capacity":1000,"refill_rate":1000,"newcomers":3,"tokens":{"capacity":3000}},
        "tokens":{"capacity":10000},"queue":{"enabled":false}}"#;
    let envoy = Envoy::start(config, 2, mock.port);
    let url = envoy.url("/v1/chat/completions");
    let body = chat_body(40, 500);
    let run = Duration::from_secs(6);
    let results = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for name in ["a", "b", "rotating"] {
            let (url, body, results) = (&url, &body, &results);
            s.spawn(move || {
                let key = move |i: usize| if name == "rotating" { format!("rotating-{i}") } else { name.to_string() };
                let got = client(url, &key, body, run);
                results.lock().unwrap().push((name, got));
            });
        }
    });
    let results = results.into_inner().unwrap();
    // 3,000 to start with and 50 a second: what one tenant may use in the run.
    let allowed = 3000.0 + 50.0 * run.as_secs_f64();
    for (name, (served, used)) in &results {
        let per_request = *used as f64 / (*served).max(1) as f64;
        eprintln!("{name}: {served} served, {used} tokens, {per_request:.0} per request");
        // Never more than its tokens, plus one reservation per worker in flight.
        assert!((*used as f64) <= allowed + 2.0 * 510.0, "{name} used {used} > {allowed}");
        if *name != "rotating" {
            // Settled from usage, a tenant is served all its tokens allow but the last
            // reservation (the estimate alone would allow 6 requests of 510).
            let fair = (allowed - 510.0) / per_request;
            assert!(*served as f64 >= 0.9 * fair, "{name}: {served} served < 90% of {fair:.0}");
        }
    }
    let fixed = results.iter().find(|(n, _)| *n == "a").unwrap().1 .1;
    let rotating = results.iter().find(|(n, _)| *n == "rotating").unwrap().1 .1;
    assert!(rotating as f64 <= fixed as f64 * 1.1 + 510.0, "rotating keys got {rotating} tokens, a fixed key {fixed}");
    assert!(envoy.stat("tt", "tenants.limited") > 0);
}

#[test]
fn input_and_output_limits_hold_each_client_by_the_bucket_it_fills() {
    // Answers as long as asked: a reservation is all used, nothing comes back early.
    let mock = Mock::start(&["--output-tokens", "300"]);
    // Anthropic-like: 2,000 input and 400 output tokens per minute.
    let config =
        r#"{"name":"io","tokens":{"input":{"capacity":2000},"output":{"capacity":400}},"queue":{"enabled":false}}"#;
    let envoy = Envoy::start(config, 1, mock.port);
    let url = envoy.url("/v1/chat/completions");
    // Small prompts, long outputs: 300 of OTPM's 400 each.
    let long_out = chat_body(40, 300);
    let statuses: Vec<u16> = (0..3).map(|_| post(&url, &long_out, &[]).unwrap().status).collect();
    assert_eq!(statuses[0], 200);
    let held = post(&url, &long_out, &[]).unwrap();
    assert_eq!((held.status, held.header("x-llm-ratelimit-reason")), (429, Some("token_limit")), "{statuses:?}");
    // Long prompts, short outputs go on meanwhile (the output bucket has room for 10)...
    drop(envoy);
    let envoy = Envoy::start(config, 1, mock.port);
    let url = envoy.url("/v1/chat/completions");
    let long_in = chat_body(6000, 10);
    assert_eq!(post(&url, &long_in, &[]).unwrap().status, 200);
    // ... until ITPM: 1,500 of 2,000 are spent (the answer's usage settled them).
    let held = post(&url, &long_in, &[]).unwrap();
    assert_eq!((held.status, held.header("x-llm-ratelimit-reason")), (429, Some("token_limit")));
    let short = post(&url, &chat_body(40, 10), &[]).unwrap();
    assert_eq!(short.status, 200, "a small request still fits both");
}

/// Seconds from now to the end of the calendar day in `tz`.
fn to_midnight(tz: &str) -> f64 {
    let now = Instant::from_millis(epoch_ms());
    let (_, end) = calendar::window(now, Period::Day, &TimeZone::parse(tz).unwrap());
    (end - now).as_millis() as f64 / 1000.0
}

#[test]
fn a_daily_budget_serves_until_it_is_spent_then_says_when_it_resets() {
    // Each answer is 50 output tokens at $200 per million: $0.01; each reserves 100 ($0.02).
    let mock = Mock::start(&["--output-tokens", "50"]);
    let tz = "PST8PDT,M3.2.0,M11.1.0";
    let config = format!(
        r#"{{"name":"bd","tokens":{{"capacity":10000000}},
        "prices":{{"models":{{"gpt-4o":{{"input":0,"output":200}}}}}},
        "quotas":[{{"unit":"usd","per":"day","limit":1.00,"time_zone":"{tz}"}}]}}"#
    );
    let envoy = Envoy::start(&config, 2, mock.port);
    let url = envoy.url("/v1/chat/completions");
    let body = chat_body(0, 100);
    let mut served = 0;
    let refused = loop {
        let r = post(&url, &body, &[]).unwrap();
        match r.status {
            200 => served += 1,
            _ => break r,
        }
        assert!(served <= 110, "the budget never ran out");
    };
    assert_eq!(served, 100, "{refused:?}");
    assert_eq!(refused.status, 429);
    assert_eq!(refused.header("x-llm-ratelimit-reason"), Some("budget_exceeded"));
    let retry_after: f64 = refused.header("retry-after").unwrap().parse().unwrap();
    let midnight = to_midnight(tz);
    assert!((retry_after - midnight).abs() <= 2.0, "Retry-After {retry_after} s, midnight in {midnight} s");
    let far = midnight > 3600.0;
    assert_eq!(refused.header("x-should-retry"), Some(if far { "false" } else { "true" }));
    assert!(refused.body.contains("$1.00 per day"), "{}", refused.body);
    // The next one too, and the provider saw only the budget's requests.
    assert_eq!(post(&url, &body, &[]).unwrap().status, 429);
    assert_eq!(mock.received(), 100);
    assert!(eventually(Duration::from_secs(2), || envoy.stat("bd", "cost.spent_micro_usd") == 1_000_000));
    assert_eq!(envoy.stat("bd", "cost.budget_refused"), 2);
}

#[test]
fn a_model_without_a_price_is_refused_unless_there_is_a_default() {
    let mock = Mock::start(&[]);
    let prices = r#""prices":{"models":{"gpt-4o-mini":{"input":0.15,"output":0.6}}}"#;
    let config = format!(r#"{{"name":"up","tokens":{{"capacity":100000}},{prices}}}"#);
    let envoy = Envoy::start(&config, 1, mock.port);
    let r = post(&envoy.url("/v1/chat/completions"), &chat_body(40, 10), &[]).unwrap();
    assert_eq!((r.status, r.header("x-llm-ratelimit-reason")), (429, Some("unpriced_model")));
    assert_eq!(r.header("x-should-retry"), Some("false"));
    assert_eq!(mock.received(), 0);
    drop(envoy);
    let config = r#"{"name":"dp","tokens":{"capacity":100000},"prices":{"default":{"input":1,"output":1}}}"#;
    let envoy = Envoy::start(config, 1, mock.port);
    assert_eq!(post(&envoy.url("/v1/chat/completions"), &chat_body(40, 10), &[]).unwrap().status, 200);
}

#[test]
fn a_daily_request_window_refuses_at_its_limit_with_the_time_to_midnight() {
    let mock = Mock::start(&[]);
    let config = r#"{"name":"dw","quotas":[{"unit":"requests","per":"day","limit":5}]}"#;
    let envoy = Envoy::start(config, 2, mock.port);
    let url = envoy.url("/v1/chat/completions");
    let statuses: Vec<u16> = (0..7).map(|_| chat(&url, &[]).unwrap().status).collect();
    assert_eq!(statuses, [200, 200, 200, 200, 200, 429, 429]);
    let r = chat(&url, &[]).unwrap();
    assert_eq!(r.header("x-llm-ratelimit-reason"), Some("quota_exceeded"));
    let retry_after: f64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!((retry_after - to_midnight("UTC")).abs() <= 2.0, "{retry_after}");
    assert!(r.body.contains("5 requests per day"), "{}", r.body);
    assert_eq!(mock.received(), 5);
}
