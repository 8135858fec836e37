//! What one admitted request costs in host calls, each a crossing out of the VM into Envoy (about
//! as much as the rest of a request's wasm work together): counted through the host double on
//! the admit path, the request-only limit (c) beside token limits (t) and a money budget (u), at
//! steady state (leases taken). A change here is a change to the hot path: make it on purpose.

mod fake_envoy;
use fake_envoy::*;
use llm_ratelimit::host::double::Process;
use std::collections::BTreeMap;

const BODY: &[u8] = include_bytes!("../bench/chat.json");
const ANSWER: &[u8] = include_bytes!("../bench/tokens-micro/answer.json");
const LIMIT: &str = r#""bucket":{"capacity":1000000000,"refill_rate":1000000000}"#;
const TOKENS: &str = r#""tokens":{"capacity":1000000000000,"refill_rate":1000000000000}"#;
const BUDGET: &str =
    r#""prices":{"default":{"input":2.5,"output":10}},"quotas":[{"unit":"usd","per":"day","limit":1000000000}]"#;

/// Host calls per request, by `Host` method, over 1,000 requests after 200 to warm up, rounded
/// (a gauge published now and then is not per request); the shared-data calls (leases, once per
/// many requests) apart, as their exact mean.
fn per_request(config: &str) -> (BTreeMap<&'static str, f64>, f64) {
    let p = Process::new(1_000_000_000);
    let mut vm = Vm::start(&p, 1, config).expect("config");
    let answer = [(":status", "200"), ("content-type", "application/json"), ("x-ratelimit-remaining-requests", "9999")];
    let headers = chat_headers(&[("content-length", "985")]);
    let run = |vm: &mut Vm, first: u32, n: u32| {
        for id in first..first + n {
            vm.request_headers(id, &headers, false);
            vm.request_body(id, BODY, true);
            assert_eq!(vm.lives[&id].upstream, 1);
            vm.response_headers(id, &answer, ANSWER, false);
            vm.response_body(id, ANSWER.len(), true);
            vm.done(id);
        }
    };
    run(&mut vm, 10, 200);
    vm.tick();
    vm.host.state().host_calls.clear();
    run(&mut vm, 1_000, 1_000);
    let calls = std::mem::take(&mut vm.host.state().host_calls);
    let shared = ["get_shared", "set_shared"].iter().map(|k| calls.get(k).copied().unwrap_or(0)).sum::<u64>();
    let each = calls
        .into_iter()
        .filter(|(k, _)| !k.ends_with("_shared"))
        .map(|(k, n)| (k, (n as f64 / 1_000.0).round()))
        .filter(|(_, n)| *n > 0.0)
        .collect();
    (each, shared as f64 / 1_000.0)
}

fn calls(pairs: &[(&'static str, f64)]) -> BTreeMap<&'static str, f64> {
    pairs.iter().copied().collect()
}

#[test]
fn the_request_limit_makes_the_calls_it_cannot_do_without() {
    // The priority and probe headers (absent: nothing to rewrite), the clock at arrival and at the
    // answer, and the answer's headers in one call. Leases make shared data rare.
    let (each, shared) = per_request(&format!("{{{LIMIT}}}"));
    assert_eq!(each, calls(&[("header", 2.0), ("headers", 1.0), ("now_ns", 2.0)]));
    assert!(shared < 0.1, "{shared} shared-data calls per request");
}

#[test]
fn a_token_limit_adds_only_reading_both_bodies_and_the_estimate_error_sample() {
    // The request is held for its body without reading its length, the path or the clock; the
    // clock is read once, when it is decided; settling reads no clock.
    let (each, shared) = per_request(&format!("{{{LIMIT},{TOKENS}}}"));
    assert_eq!(
        each,
        calls(&[("buffer", 2.0), ("header", 2.0), ("headers", 1.0), ("now_ns", 2.0), ("record_metric", 1.0)])
    );
    assert!(shared < 0.1, "{shared} shared-data calls per request");
}

#[test]
fn a_budget_adds_the_path_for_the_price_and_the_quota_windows() {
    // The price is the model's (a path may name it); the day's window is taken and settled in
    // shared data, with the clock, per request.
    let (each, shared) = per_request(&format!("{{{LIMIT},{TOKENS},{BUDGET}}}"));
    assert_eq!(
        each,
        calls(&[("buffer", 2.0), ("header", 3.0), ("headers", 1.0), ("now_ns", 3.0), ("record_metric", 1.0)])
    );
    assert!((2.9..3.2).contains(&shared), "{shared} shared-data calls per request");
}
