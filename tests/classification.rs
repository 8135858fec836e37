//! Every request gets one priority class; an untrusted client cannot promote itself.

mod support;
use support::*;

/// Capacity 2 for everyone plus a reserve of 2 that only CRITICAL and HIGH may spend.
fn config(trust: bool) -> String {
    format!(
        r#"{{"name":"cls","bucket":{{"capacity":2,"refill_rate":0.001,"burst_allowance":2}},"queue":{{"enabled":false}},
        "classify":{{"trust_header":{trust},"rules":[{{"path_prefix":"/v1/batches","priority":"LOW"}},
        {{"header":"x-team","value":"support","priority":"CRITICAL"}}]}}}}"#
    )
}

#[test]
fn an_untrusted_header_cannot_raise_priority() {
    let mock = Mock::start(&[]);
    let envoy = Envoy::start(&config(false), 2, mock.port);
    let replies = burst(&envoy.url("/v1/chat/completions"), 4, 1, &[("x-llm-priority", "CRITICAL")]);
    assert_eq!(count(&replies, 200), 2, "treated as NORMAL: no reserve");
    assert_eq!(envoy.stat("cls", "priority.normal.admitted"), 2);
    assert_eq!(envoy.stat("cls", "priority.normal.rejected"), 2);
    assert_eq!(envoy.stat("cls", "priority.critical.admitted"), 0);
    assert_eq!(
        replies.iter().filter(|r| r.status == 429).map(|r| r.header("x-llm-ratelimit-priority")).next(),
        Some(Some("NORMAL"))
    );
}

#[test]
fn a_trusted_header_sets_priority() {
    let mock = Mock::start(&[]);
    let envoy = Envoy::start(&config(true), 2, mock.port);
    let replies = burst(&envoy.url("/v1/chat/completions"), 4, 1, &[("x-llm-priority", "critical")]);
    assert_eq!(count(&replies, 200), 4, "CRITICAL spends the reserve too");
    assert_eq!(envoy.stat("cls", "priority.critical.admitted"), 4);
}

#[test]
fn rules_classify_and_the_header_can_still_lower() {
    let mock = Mock::start(&[]);
    let envoy = Envoy::start(&config(false), 1, mock.port);
    let team = [("x-team", "support")];
    assert_eq!(chat(&envoy.url("/v1/chat/completions"), &team).unwrap().status, 200);
    assert_eq!(envoy.stat("cls", "priority.critical.admitted"), 1);
    // The mock has no batches endpoint: a 404 from it shows the request was let through.
    assert_eq!(chat(&envoy.url("/v1/batches"), &team).unwrap().status, 404);
    assert_eq!(envoy.stat("cls", "priority.low.admitted"), 1, "first matching rule wins");
    let lowered = [("x-team", "support"), ("x-llm-priority", "LOW")];
    chat(&envoy.url("/v1/chat/completions"), &lowered).unwrap();
    assert_eq!(envoy.stat("cls", "priority.low.admitted") + envoy.stat("cls", "priority.low.rejected"), 2);
    // The provider is told the class the proxy decided, not what the client asked for.
    let seen = mock.stats()["by_priority"].clone();
    assert_eq!(seen["CRITICAL"], 1, "{seen}");
}
