//! Tenant limits nest inside the provider's: each tenant has its own bounded bucket, and all of
//! them together stay inside the provider-wide bucket, whatever header values clients send.

mod support;
use support::*;

#[test]
fn many_tenants_share_the_provider_limit_and_none_exceeds_its_own() {
    let mock = Mock::start(&[]);
    // Provider bucket: 10 tokens, no refill to speak of, no queueing; tenants: 2 each.
    let config = r#"{"name":"tn","bucket":{"capacity":10,"refill_rate":0.01,"burst_allowance":0},
        "queue":{"enabled":false},
        "tenant":{"key_header":"x-tenant","capacity":2,"refill_rate":0.01,"slots":64}}"#;
    let envoy = Envoy::start(config, 2, mock.port);
    let url = envoy.url("/v1/chat/completions");
    // One tenant gets its 2, then its own limit.
    let mut acme = Vec::new();
    for _ in 0..4 {
        acme.push(chat(&url, &[("x-tenant", "acme")]).unwrap());
    }
    assert_eq!(count(&acme, 200), 2);
    let limited = acme.iter().find(|r| r.status == 429).unwrap();
    assert_eq!(limited.header("x-llm-ratelimit-reason"), Some("tenant_limit"), "{limited:?}");
    assert!(limited.header("retry-after").is_some());
    // 60 distinct tenants at once: the provider bucket (8 left) holds for all of them.
    let n = std::sync::atomic::AtomicUsize::new(0);
    let replies = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..6 {
            s.spawn(|| loop {
                let i = n.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= 60 {
                    break;
                }
                let tenant = format!("t{i}");
                let r = chat(&url, &[("x-tenant", tenant.as_str())]).unwrap();
                replies.lock().unwrap().push(r);
            });
        }
    });
    let replies = replies.into_inner().unwrap();
    assert_eq!(count(&replies, 200), 8, "the provider-wide bucket bounds all tenants together");
    assert_eq!(mock.received(), 10);
    assert!(replies.iter().filter(|r| r.status == 429).all(|r| r.header("x-llm-ratelimit-reason") == Some("no_token")));
    assert_eq!(envoy.stat("tn", "tenants.limited"), 2);
    assert!(envoy.stat("tn", "tenants.claimed") >= 61);
}

#[test]
fn a_full_tenant_table_sends_newcomers_to_one_shared_overflow_bucket() {
    let mock = Mock::start(&[]);
    // A table of 4 slots: with more active tenants than that, newcomers share the overflow bucket
    // (capacity 3), so rotating the header value cannot mint tokens.
    let config = r#"{"name":"to","bucket":{"capacity":1000,"refill_rate":1000},"queue":{"enabled":false},
        "tenant":{"key_header":"x-tenant","capacity":3,"refill_rate":0.01,"slots":4}}"#;
    let envoy = Envoy::start(config, 1, mock.port);
    let url = envoy.url("/v1/chat/completions");
    let replies: Vec<Reply> =
        (0..40).map(|i| chat(&url, &[("x-tenant", format!("rotating-{i}").as_str())]).unwrap()).collect();
    let ok = count(&replies, 200);
    // At most every slot's bucket plus the overflow bucket: (4 + 1) x 3.
    assert!(ok <= 15, "{ok} requests passed with rotating tenant values");
    assert!(envoy.stat("to", "tenants.overflow") >= 1);
    assert_eq!(mock.received(), ok as u64);
}
