//! Requests that find no token wait instead of failing, within bounds: released in weighted
//! priority order, LOW shed first, nothing leaked when clients leave.

mod support;
use std::time::{Duration, Instant};
use support::*;

const CLASSES: [&str; 4] = ["critical", "high", "normal", "low"];

fn depths(envoy: &Envoy, provider: &str) -> Vec<u64> {
    CLASSES.iter().map(|c| envoy.stat(provider, &format!("priority.{c}.queue_depth"))).collect()
}

#[test]
fn a_request_waits_for_the_next_token_and_says_how_long() {
    let mock = Mock::start(&[]);
    let config = r#"{"name":"q1","bucket":{"capacity":1,"refill_rate":2,"burst_allowance":0}}"#;
    let envoy = Envoy::start(config, 2, mock.port);
    let url = envoy.url("/v1/chat/completions");
    assert_eq!(chat(&url, &[]).unwrap().status, 200);
    let started = Instant::now();
    let r = chat(&url, &[]).unwrap();
    let took = started.elapsed();
    assert_eq!(r.status, 200, "{r:?}");
    let queued: u64 = r.header("x-ratelimit-queued-ms").expect("queued header").parse().unwrap();
    assert!((300..=1500).contains(&queued), "waited {queued} ms for a token due in 500 ms");
    assert!(took >= Duration::from_millis(300), "answered after {took:?}");
    assert_eq!(envoy.stat("q1", "priority.normal.queued"), 1);
    assert_eq!(envoy.stat("q1", "priority.normal.released"), 1);
    assert_eq!(envoy.stat("q1", "priority.normal.admitted"), 2);
    assert_eq!(depths(&envoy, "q1"), [0, 0, 0, 0]);
}

#[test]
fn a_request_that_would_wait_too_long_is_refused_at_once() {
    let mock = Mock::start(&[]);
    let config = r#"{"name":"q2","bucket":{"capacity":1,"refill_rate":0.1,"burst_allowance":0},
        "priorities":{"NORMAL":{"max_wait_ms":2000}}}"#;
    let envoy = Envoy::start(config, 2, mock.port);
    let url = envoy.url("/v1/chat/completions");
    assert_eq!(chat(&url, &[]).unwrap().status, 200);
    let started = Instant::now();
    let r = chat(&url, &[]).unwrap();
    assert!(started.elapsed() < Duration::from_secs(1), "refused only after {:?}", started.elapsed());
    assert_eq!(r.status, 429);
    assert_eq!(r.header("x-llm-ratelimit-reason"), Some("no_token"));
    // The next token is 10 s away (0.1 per second).
    assert_eq!(r.header("retry-after"), Some("10"));
    assert_eq!(envoy.stat("q2", "priority.normal.queued"), 0);
}

#[test]
fn overload_admits_every_critical_request_and_sheds_low_first() {
    let mock = Mock::start(&[]);
    // 20 tokens per second; the offered load is ~3x that, mostly LOW, for 3 s.
    let config = r#"{"name":"q3","bucket":{"capacity":10,"refill_rate":20,"burst_allowance":5},
        "classify":{"trust_header":true},"queue":{"max_waiting":40},
        "priorities":{"LOW":{"max_wait_ms":1500},"NORMAL":{"max_wait_ms":3000}}}"#;
    let envoy = Envoy::start(config, 2, mock.port);
    let url = envoy.url("/v1/chat/completions");
    let mix = ["LOW", "LOW", "LOW", "LOW", "LOW", "LOW", "NORMAL", "NORMAL", "CRITICAL", "HIGH"];
    let results = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for i in 0..180 {
            let (url, results) = (&url, &results);
            let class = mix[i % mix.len()];
            s.spawn(move || {
                let r = chat(url, &[("x-llm-priority", class)]).expect("request");
                results.lock().unwrap().push((class, r));
            });
            std::thread::sleep(Duration::from_millis(1000 / 60));
        }
    });
    let results = results.into_inner().unwrap();
    let ok = |c: &str| results.iter().filter(|(k, r)| *k == c && r.status == 200).count();
    let sent = |c: &str| results.iter().filter(|(k, _)| *k == c).count();
    assert_eq!(ok("CRITICAL"), sent("CRITICAL"), "every CRITICAL request admitted");
    assert_eq!(ok("HIGH"), sent("HIGH"), "every HIGH request admitted");
    let low_refused = sent("LOW") - ok("LOW");
    assert!(low_refused > 0, "LOW absorbed the overload");
    assert!(ok("LOW") * sent("NORMAL") < ok("NORMAL") * sent("LOW"), "LOW fares worse than NORMAL");
    for (_, r) in results.iter().filter(|(_, r)| r.status == 429) {
        assert_eq!(r.header("x-llm-ratelimit-source"), Some("proxy"));
        let ms: u64 = r.header("retry-after-ms").unwrap().parse().unwrap();
        assert!(ms > 0 && ms <= 60_000, "retry-after-ms {ms}");
    }
    let queued: u64 = CLASSES.iter().map(|c| envoy.stat("q3", &format!("priority.{c}.queued"))).sum();
    assert!(queued > 0, "requests waited");
    assert_eq!(depths(&envoy, "q3"), [0, 0, 0, 0], "queues drained");
    let total_ok: usize = ["CRITICAL", "HIGH", "NORMAL", "LOW"].iter().map(|c| ok(c)).sum();
    assert_eq!(mock.received(), total_ok as u64);
    assert!(!envoy.log().contains("panic"), "{}", envoy.log());
}

#[test]
fn clients_that_leave_while_queued_leak_nothing() {
    let mock = Mock::start(&[]);
    // 40 waiters at 0.5 tokens per second fit in a 120 s maximum wait: all of them queue.
    let config = r#"{"name":"q4","bucket":{"capacity":1,"refill_rate":0.5,"burst_allowance":0},
        "priorities":{"NORMAL":{"max_wait_ms":120000}}}"#;
    let envoy = Envoy::start(config, 2, mock.port);
    let url = envoy.url("/v1/chat/completions");
    assert_eq!(chat(&url, &[]).unwrap().status, 200);
    std::thread::scope(|s| {
        for _ in 0..40 {
            s.spawn(|| assert!(chat_within(Duration::from_millis(300), &url, &[]).is_err(), "should time out"));
        }
    });
    // Envoy notices the closed connections and drops the paused requests.
    let deadline = Instant::now() + Duration::from_secs(5);
    while envoy.stat("q4", "priority.normal.cancelled") < 40 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(envoy.stat("q4", "priority.normal.queued"), 40);
    assert_eq!(envoy.stat("q4", "priority.normal.cancelled"), 40);
    assert_eq!(depths(&envoy, "q4"), [0, 0, 0, 0]);
    assert_eq!(mock.received(), 1, "no dead request was resumed");
    // The VM is alive and the queue works: the next request waits for its token and gets it.
    let r = chat(&url, &[]).unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    let log = envoy.log();
    assert!(!log.contains("panic") && !log.contains("Wasm VM failed"), "{log}");
}
