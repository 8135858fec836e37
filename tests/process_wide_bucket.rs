//! The bucket holds for the whole Envoy process: a burst admits capacity (+ burst reserve for
//! burst classes) plus what refilled meanwhile, whatever the number of workers.

mod support;
use std::time::Instant;
use support::*;

const CONFIG: &str = r#"{"name":"acc","bucket":{"capacity":40,"refill_rate":1,"burst_allowance":10},
    "queue":{"enabled":false},"classify":{"trust_header":true}}"#;

/// Sends `n` requests of `priority` at once and checks admitted = expected + refill.
fn burst_admits(concurrency: u32, priority: &str, n: usize, expected: usize) {
    let mock = Mock::start(&[]);
    let envoy = Envoy::start(CONFIG, concurrency, mock.port);
    let started = Instant::now();
    let replies = burst(&envoy.url("/v1/chat/completions"), n, 16, &[("x-llm-priority", priority)]);
    let refilled = started.elapsed().as_secs_f64().ceil() as usize; // 1 token per second
    let (ok, limited) = (count(&replies, 200), count(&replies, 429));
    eprintln!(
        "concurrency {concurrency}, {priority}: admitted {ok} of {n}, expected {expected} + up to {refilled} refilled"
    );
    assert_eq!(ok + limited, n, "only 200s and 429s expected");
    assert!(
        ok >= expected && ok <= expected + refilled,
        "concurrency {concurrency}, {priority}: admitted {ok}, expected {expected} (+ up to {refilled} refilled)"
    );
    assert_eq!(mock.received(), ok as u64, "the provider saw exactly the admitted requests");
    let class = priority.to_ascii_lowercase();
    assert_eq!(envoy.stat("acc", &format!("priority.{class}.admitted")), ok as u64);
    assert_eq!(envoy.stat("acc", &format!("priority.{class}.rejected")), limited as u64);
}

#[test]
fn one_worker_admits_capacity_to_normal_traffic() {
    burst_admits(1, "NORMAL", 120, 40);
}

#[test]
fn four_workers_share_one_bucket() {
    burst_admits(4, "NORMAL", 120, 40);
}

#[test]
fn burst_classes_also_spend_the_reserve_across_workers() {
    burst_admits(4, "CRITICAL", 120, 50);
}
