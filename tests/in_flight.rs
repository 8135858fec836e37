//! `in_flight` in the real Envoy at `--concurrency 2`: a process-wide limit on requests at the
//! provider, and the adaptive limit finding the hidden capacity of a provider that publishes no
//! quota (the mock's `--capacity`: serves K at once, queues K more, then answers 503, like an
//! overloaded vLLM).
//!
//! Each test prints its measured figures (`cargo test --test in_flight -- --nocapture`).

mod support;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use support::*;

const CHAT: &str = "/v1/chat/completions";

/// `clients` closed-loop clients against `url` until `stop`: each sends its next request as soon
/// as the last is answered. Returns (answers, non-200 answers).
fn load(url: &str, clients: usize, stop: &AtomicBool, answers: &AtomicU64, errors: &AtomicU64) {
    std::thread::scope(|s| {
        for _ in 0..clients {
            s.spawn(|| {
                while !stop.load(Ordering::Relaxed) {
                    let r = chat_within(Duration::from_secs(60), url, &[]);
                    answers.fetch_add(1, Ordering::Relaxed);
                    if r.map_or(true, |r| r.status != 200) {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
        }
    });
}

fn capacity(mock: &Mock, field: &str) -> u64 {
    mock.stats()["capacity"][field].as_u64().unwrap_or_else(|| panic!("no capacity.{field} in /mock/stats"))
}

/// The adaptive limit as the admin endpoint shows it, read `n` times `every` apart: its median.
fn limit(envoy: &Envoy, n: usize, every: Duration) -> (u64, Vec<u64>) {
    let mut seen: Vec<u64> = (0..n)
        .map(|_| {
            std::thread::sleep(every);
            envoy.stat("selfhosted", "in_flight.limit")
        })
        .collect();
    let shown = seen.clone();
    seen.sort_unstable();
    (seen[n / 2], shown)
}

/// Hidden capacity K = 8 (200 ms per answer, 8 more queued, then 503), 24 closed-loop clients:
/// from cold the limit is within [0.75 K, 1.25 K] after 10 s; then the provider's 503s are at
/// most 5% of what it is sent and it serves at least 90% of what K allows; K drops to 4 and the
/// limit follows within 5 s. The same load straight at the provider: over 30% 503s.
#[test]
fn an_adaptive_limit_finds_a_hidden_capacity_from_cold_and_follows_it_down() {
    const K: u64 = 8;
    const SERVICE_MS: u64 = 200;
    const CLIENTS: usize = 24;
    let mock = Mock::start(&["--capacity", "8", "--latency-ms", "200"]);
    let config = r#"{"name":"selfhosted","bucket":{"capacity":100000,"refill_rate":100000},
        "in_flight":{"max":64,"adaptive":{}}}"#;
    let envoy = Envoy::start(config, 2, mock.port);
    let url = envoy.url(CHAT);
    let (stop, answers, errors) = (AtomicBool::new(false), AtomicU64::new(0), AtomicU64::new(0));
    std::thread::scope(|s| {
        s.spawn(|| load(&url, CLIENTS, &stop, &answers, &errors));
        let t0 = Instant::now();
        // From cold: the limit after 10 s (the median of reads over the 10th second).
        std::thread::sleep(Duration::from_secs(9));
        let (found, seen) = limit(&envoy, 5, Duration::from_millis(200));
        println!("limit after {:.1} s: {found} (reads {seen:?}), K = {K}", t0.elapsed().as_secs_f64());
        // Then 6 s measured at the provider.
        let before = (capacity(&mock, "served"), capacity(&mock, "overflowed"));
        let measured = Instant::now();
        std::thread::sleep(Duration::from_secs(6));
        let after = (capacity(&mock, "served"), capacity(&mock, "overflowed"));
        let secs = measured.elapsed().as_secs_f64();
        let (served, overflowed) = (after.0 - before.0, after.1 - before.1);
        let rate = served as f64 / secs;
        let error_share = overflowed as f64 / (served + overflowed).max(1) as f64;
        let allows = K as f64 * 1000.0 / SERVICE_MS as f64;
        println!(
            "steady: {served} served in {secs:.1} s ({rate:.1}/s, {:.0}% of the {allows}/s K allows), \
             {overflowed} 503s ({:.1}% of what the provider was sent); most in flight at the provider {}",
            100.0 * rate / allows,
            100.0 * error_share,
            capacity(&mock, "max_in_flight_seen")
        );
        // K drops to 4: the limit follows within 5 s.
        ureq::post(&mock.url("/mock/config")).send_json(serde_json::json!({"capacity": 4})).expect("config");
        let dropped = Instant::now();
        std::thread::sleep(Duration::from_secs(4));
        let (followed, seen_after) = limit(&envoy, 5, Duration::from_millis(200));
        println!(
            "limit {:.1} s after K dropped to 4: {followed} (reads {seen_after:?})",
            dropped.elapsed().as_secs_f64()
        );
        stop.store(true, Ordering::Relaxed);
        assert!((6..=10).contains(&found), "from cold, the limit is {found}: not within [0.75 K, 1.25 K]");
        assert!(error_share <= 0.05, "{:.1}% of the provider's answers were 503s", 100.0 * error_share);
        assert!(rate >= 0.9 * allows, "served {rate:.1}/s, under 90% of {allows}/s");
        assert!((3..=5).contains(&followed), "5 s after K dropped to 4 the limit is {followed}");
        assert!(envoy.stat("selfhosted", "in_flight.cut") > 0 && envoy.stat("selfhosted", "in_flight.raised") > 0);
    });
    // The clients got answers throughout: the excess waited in the filter's queue.
    println!("clients: {} answers, {} not 200", answers.load(Ordering::Relaxed), errors.load(Ordering::Relaxed));
    let out = || envoy.stat("selfhosted", "in_flight");
    assert!(eventually(Duration::from_secs(10), || out() == 0), "in_flight shows {} with no client left", out());

    // The same load straight at the provider (K back at 8): over 30% of its answers are 503s.
    ureq::post(&mock.url("/mock/config")).send_json(serde_json::json!({"capacity": 8})).expect("config");
    let before = (capacity(&mock, "served"), capacity(&mock, "overflowed"));
    let (stop, answers, errors) = (AtomicBool::new(false), AtomicU64::new(0), AtomicU64::new(0));
    std::thread::scope(|s| {
        s.spawn(|| load(&mock.url(CHAT), CLIENTS, &stop, &answers, &errors));
        std::thread::sleep(Duration::from_secs(4));
        stop.store(true, Ordering::Relaxed);
    });
    let (served, overflowed) = (capacity(&mock, "served") - before.0, capacity(&mock, "overflowed") - before.1);
    let share = overflowed as f64 / (served + overflowed).max(1) as f64;
    println!("without the filter: {served} served, {overflowed} 503s ({:.0}%)", 100.0 * share);
    assert!(share > 0.30, "without the filter only {:.0}% were 503s", 100.0 * share);
}

/// `in_flight.max` 3 across two workers: 12 simultaneous requests all succeed, never more than 3
/// at the provider; clients that give up while waiting or upstream leave no slot behind.
#[test]
fn a_fixed_limit_holds_process_wide_and_leaks_no_slot_when_clients_leave() {
    let mock = Mock::start(&["--latency-ms", "300"]);
    let config = r#"{"name":"fixed","in_flight":{"max":3}}"#;
    let envoy = Envoy::start(config, 2, mock.port);
    let url = envoy.url(CHAT);
    let replies = simultaneous(12, &url, &[]);
    let ok = replies.iter().filter(|t| t.status() == 200).count();
    let most = capacity(&mock, "max_in_flight_seen");
    println!("12 at once through a limit of 3: {ok} answered 200, at most {most} at the provider");
    assert_eq!(ok, 12, "{:?}", replies.iter().map(|t| t.status()).collect::<Vec<_>>());
    assert!(most <= 3, "{most} requests at the provider at once");
    assert!(envoy.stat("fixed", "priority.normal.queued") >= 9 - 3);

    // 12 clients give up after 100 ms: 3 of them upstream, 9 waiting.
    std::thread::scope(|s| {
        for _ in 0..12 {
            s.spawn(|| chat_within(Duration::from_millis(100), &url, &[]));
        }
    });
    let out = || envoy.stat("fixed", "in_flight");
    assert!(eventually(Duration::from_secs(5), || out() == 0), "in_flight shows {} with no client left", out());
    ureq::post(&mock.url("/mock/reset")).call().expect("reset");
    let started = Instant::now();
    let replies = simultaneous(3, &url, &[]);
    let took = started.elapsed();
    assert!(replies.iter().all(|t| t.status() == 200));
    println!("after the storm, 3 at once answered in {took:?}");
    assert!(took < Duration::from_millis(550), "3 requests in {took:?}: a slot was lost");
}

/// The same limit over HTTP/2, 12 streams on 2 connections, each body ending with request
/// trailers: all answered, never more than 3 at the provider; streams given up on (the client
/// closes its connections mid-wait and mid-request) leave no slot behind.
#[test]
fn over_http2_with_trailers_the_limit_holds_and_abandoned_streams_give_their_slots_back() {
    let mock = Mock::start(&["--latency-ms", "300"]);
    let envoy = Envoy::start(r#"{"name":"h2","in_flight":{"max":3}}"#, 2, mock.port);
    let results = h2_chats(envoy.port, 12, 2, &[], 20.0);
    let statuses: Vec<u64> = results.iter().map(|r| r["status"].as_u64().unwrap_or(0)).collect();
    let most = capacity(&mock, "max_in_flight_seen");
    println!("HTTP/2, 12 streams with trailers through a limit of 3: {statuses:?}, at most {most} at the provider");
    assert!(statuses.iter().all(|&s| s == 200), "{results:?}");
    assert!(most <= 3, "{most} requests at the provider at once");

    // The client gives up after 0.4 s: 3 streams upstream, 9 waiting in the filter's queue.
    let gave_up = h2_chats(envoy.port, 12, 2, &[], 0.4);
    assert!(gave_up.iter().any(|r| r["status"].is_null()), "every stream was answered within 0.4 s: {gave_up:?}");
    let out = || envoy.stat("h2", "in_flight");
    assert!(eventually(Duration::from_secs(5), || out() == 0), "in_flight shows {} with no client left", out());
    ureq::post(&mock.url("/mock/reset")).call().expect("reset");
    let again = h2_chats(envoy.port, 3, 1, &[], 10.0);
    assert!(again.iter().all(|r| r["status"] == 200), "{again:?}");
    // From the first stream sent to the last answered: one round trip of 300 ms, not two.
    let at = |field: &'static str| again.iter().filter_map(move |r| r[field].as_u64());
    let took = at("done_ms").max().unwrap_or(0).saturating_sub(at("sent_ms").min().unwrap_or(0));
    println!("after the abandoned streams, 3 at once answered in {took} ms");
    assert!(took < 550, "3 streams in {took} ms: a slot was lost");
}

/// With the queue off, a request over the limit is refused at once: 429 `in_flight_limit`.
#[test]
fn over_the_limit_without_a_queue_is_refused_with_its_reason() {
    let mock = Mock::start(&["--latency-ms", "500"]);
    let config = r#"{"name":"noq","queue":{"enabled":false},"in_flight":{"max":1}}"#;
    let envoy = Envoy::start(config, 2, mock.port);
    let url = envoy.url(CHAT);
    let replies = simultaneous(4, &url, &[]);
    let statuses: Vec<u16> = replies.iter().map(|t| t.status()).collect();
    println!("4 at once through a limit of 1 without a queue: {statuses:?}");
    assert_eq!(statuses.iter().filter(|&&s| s == 200).count(), 1, "{statuses:?}");
    for t in replies.iter().filter(|t| t.status() == 429) {
        assert_eq!(t.header("x-llm-ratelimit-reason"), Some("in_flight_limit"));
        assert_eq!(t.header("x-should-retry"), Some("true"));
    }
}
