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

#[test]
fn leases_serve_busy_workers_and_never_admit_past_the_bucket() {
    // 600 tokens, next to no refill: far from the floor at first, so workers lease; the bucket
    // still admits exactly 600 of 1000, leased or not.
    let mock = Mock::start(&[]);
    let config =
        r#"{"name":"ls","bucket":{"capacity":600,"refill_rate":0.01,"burst_allowance":0},"queue":{"enabled":false}}"#;
    let envoy = Envoy::start(config, 2, mock.port);
    let replies = burst(&envoy.url("/v1/chat/completions"), 1000, 16, &[]);
    assert_eq!(count(&replies, 200), 600);
    assert_eq!(mock.received(), 600);
    let (leases, leased) = (envoy.stat("ls", "bucket.leases"), envoy.stat("ls", "bucket.leased"));
    assert!(leases > 0 && leased >= leases, "no lease was taken: {leases} leases, {leased} tokens");
}
