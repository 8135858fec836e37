//! One limit across many Envoy instances: two real Envoys (`--concurrency 2` each) in front of one
//! mock provider, both asking our rate limit service (rls/) over a real redis-server.

mod support;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};
use support::*;

/// The service's gRPC port, for the yaml edit (a plain `fn`).
static RLS_PORT: AtomicU16 = AtomicU16::new(0);

fn to_rls(yaml: String) -> String {
    yaml.replace("port_value: 8081", &format!("port_value: {}", RLS_PORT.load(Ordering::Relaxed)))
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A redis-server on a free port, persistence off.
fn redis() -> (Killed, u16) {
    let port = free_port();
    let child = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .stdout(Stdio::null())
        .spawn()
        .expect("redis-server (scripts/setup.sh installs it)");
    let up = eventually(Duration::from_secs(5), || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok());
    assert!(up, "redis-server did not start");
    (Killed(child), port)
}

/// Our rate limit service with `limits` (envoyproxy/ratelimit's YAML), on free ports.
fn rls(redis_port: u16, limits: &str, dir: &TempDir) -> (Killed, u16) {
    rls_on(redis_port, limits, dir, 0, &[])
}

/// The same on gRPC port `grpc` (0: a free one), with `extra` flags (e.g. `--clock-offset-s`).
fn rls_on(redis_port: u16, limits: &str, dir: &TempDir, grpc: u16, extra: &[&str]) -> (Killed, u16) {
    let file = dir.0.join("limits.yaml");
    std::fs::write(&file, limits).unwrap();
    let bin = root().join("target/release/llm-ratelimit-rls");
    let mut child = Command::new(&bin)
        .arg("--config")
        .arg(&file)
        .args(["--redis", &format!("redis://127.0.0.1:{redis_port}")])
        .args(["--grpc-host", "127.0.0.1", "--grpc-port", &grpc.to_string(), "--http-host", "127.0.0.1"])
        .args(["--http-port", "0"])
        .args(extra)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{}: {e} (make build builds it)", bin.display()));
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    // "listening on grpc 127.0.0.1:PORT http 127.0.0.1:PORT"
    let grpc = line.split_whitespace().nth(3).and_then(|a| a.rsplit(':').next()?.parse().ok());
    (Killed(child), grpc.unwrap_or_else(|| panic!("unexpected banner {line:?}")))
}

fn envoy(config: &str, mock: &Mock, rls_port: u16) -> Envoy {
    RLS_PORT.store(rls_port, Ordering::Relaxed);
    let opts = EnvoyOpts { filter_config: config, concurrency: 2, upstream_port: mock.port, edit: Some(to_rls) };
    Envoy::spawn(&opts).unwrap_or_else(|log| panic!("{log}"))
}

const LIMITS: &str = "
domain: llm-ratelimit
descriptors:
  - key: provider
    value: shared
    descriptors:
      - key: unit
        value: requests
        rate_limit: {unit: second, requests_per_unit: 40}
";

/// Local buckets far above the shared limit: only the service can hold it.
const SHARED: &str = r#"{"name":"shared","bucket":{"capacity":100000,"refill_rate":100000},
    "queue":{"enabled":false},"global":{"cluster":"ratelimit","timeout_ms":200}}"#;

/// The same for the accuracy runs: a service slowed by a loaded machine must not let the local
/// buckets (far above the limit) decide, so failures deny and the timeout is long.
const HELD: &str = r#"{"name":"shared","bucket":{"capacity":100000,"refill_rate":100000},
    "queue":{"enabled":false},"global":{"cluster":"ratelimit","timeout_ms":1000,"failure_mode":"deny"}}"#;

/// `threads_each` clients per URL for `run`: as fast as they can (`rate` None), or paced to
/// `rate` requests per second in all. Returns (admitted, refused, anything else). A refusal must
/// be the gate's: `global_limit` with the reset of a 1 s window, or `global_unavailable`.
fn clients(urls: &[String], threads_each: usize, rate: Option<f64>, run: Duration) -> (usize, usize, Vec<String>) {
    let n = urls.len() * threads_each;
    let every = rate.map(|r| Duration::from_secs_f64(n as f64 / r));
    let start = Instant::now();
    let handles: Vec<_> = (0..n)
        .map(|i| {
            let url = urls[i % urls.len()].clone();
            // Paced clients are spread evenly over one period.
            let mut next = start + every.map_or(Duration::ZERO, |e| e.mul_f64(i as f64 / n as f64));
            std::thread::spawn(move || {
                let (mut ok, mut limited, mut other) = (0, 0, Vec::new());
                while next < start + run && Instant::now() < start + run {
                    if let Some(every) = every {
                        std::thread::sleep(next.saturating_duration_since(Instant::now()));
                        next += every;
                    }
                    match chat(&url, &[]) {
                        Ok(r) if r.status == 200 => ok += 1,
                        Ok(r)
                            if r.status == 429 && r.header("x-llm-ratelimit-reason") == Some("global_unavailable") =>
                        {
                            limited += 1;
                        }
                        Ok(r) if r.status == 429 => {
                            assert_eq!(r.header("x-llm-ratelimit-reason"), Some("global_limit"), "{}", r.body);
                            let secs: u64 = r.header("retry-after").and_then(|s| s.parse().ok()).unwrap();
                            assert!((1..=2).contains(&secs), "retry-after {secs} for a 1 s window");
                            limited += 1;
                            if every.is_none() {
                                // A client that honours Retry-After at a tenth of it, like a busy one.
                                std::thread::sleep(Duration::from_millis(20));
                            }
                        }
                        Ok(r) => other.push(format!("{} {}", r.status, r.body)),
                        Err(e) => other.push(e),
                    }
                }
                (ok, limited, other)
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).fold((0, 0, Vec::new()), |(a, b, mut c), (x, y, z)| {
        c.extend(z);
        (a + x, b + y, c)
    })
}

#[test]
fn two_envoys_share_one_limit_and_the_provider_sees_the_sum_held() {
    let dir = TempDir::new();
    let (_redis, redis_port) = redis();
    let (_rls, rls_port) = rls(redis_port, LIMITS, &dir);
    let mock = Mock::start(&[]);
    let a = envoy(HELD, &mock, rls_port);
    let b = envoy(HELD, &mock, rls_port);
    let urls = [a.url("/v1/chat/completions"), b.url("/v1/chat/completions")];
    // 3.9 s of saturation lies inside 4 windows of 1 s: the service admits at most 4 x 40.
    let (ok, limited, other) = clients(&urls, 4, None, Duration::from_millis(3900));
    assert!(other.is_empty(), "only 200s and 429s: {other:?}");
    let received = mock.received();
    assert_eq!(received as usize, ok, "every admitted request reached the provider");
    let most = 4 * 40;
    println!("admitted {ok} (at most {most}), refused {limited}");
    assert!(ok <= most + most / 50, "two instances held the one limit within 2%: {ok} > {most}");
    assert!(ok >= most * 3 / 4 - 40, "the limit is used, not starved: {ok}");
    assert!(limited > ok, "the surplus was refused");
    for e in [&a, &b] {
        let calls = e.stat("shared", "global.calls");
        let admitted: u64 = ["critical", "high", "normal", "low"]
            .iter()
            .map(|p| e.stat("shared", &format!("priority.{p}.admitted")))
            .sum();
        assert!(calls > 0 && e.stat("shared", "global.errors") == 0, "{calls} calls, no failure");
        assert!(admitted > 0, "each instance admitted some");
    }
}

#[test]
fn leases_spare_the_round_trip_below_the_limit() {
    let dir = TempDir::new();
    let (_redis, redis_port) = redis();
    let limits = LIMITS.replace("requests_per_unit: 40", "requests_per_unit: 10000");
    let (_rls, rls_port) = rls(redis_port, &limits, &dir);
    let mock = Mock::start(&[]);
    let e = envoy(SHARED, &mock, rls_port);
    let (ok, limited, other) = clients(&[e.url("/v1/chat/completions")], 2, None, Duration::from_millis(2500));
    assert!(other.is_empty() && limited == 0, "{other:?} {limited}");
    let calls = e.stat("shared", "global.calls");
    println!("{ok} requests, {calls} calls to the service");
    assert!(calls * 4 <= ok as u64, "leases: {calls} calls for {ok} requests");
    assert!(e.stat("shared", "global.lease_units") > 0);
}

#[test]
fn an_unreachable_service_falls_back_by_failure_mode() {
    let mock = Mock::start(&[]);
    // Nothing listens on this port: every call fails fast.
    let dead = free_port();
    let local = SHARED.replace(r#""timeout_ms":200"#, r#""timeout_ms":100,"failure_mode":"local""#);
    let e = envoy(&local, &mock, dead);
    for _ in 0..5 {
        assert_eq!(chat(&e.url("/v1/chat/completions"), &[]).unwrap().status, 200, "local: own buckets decide");
    }
    assert!(e.stat("shared", "global.errors") >= 1);
    assert!(e.stat("shared", "global.fallback") >= 1);
    drop(e);
    let allow = SHARED.replace(r#""timeout_ms":200"#, r#""timeout_ms":100,"failure_mode":"allow""#);
    let e = envoy(&allow, &mock, dead);
    for _ in 0..3 {
        assert_eq!(chat(&e.url("/v1/chat/completions"), &[]).unwrap().status, 200, "allow: let through");
    }
    // Unlike local, allow asks again on every request that needs a call.
    assert!(e.stat("shared", "global.errors") + e.stat("shared", "global.timeouts") >= 3);
    drop(e);
    let deny = SHARED.replace(r#""timeout_ms":200"#, r#""timeout_ms":100,"failure_mode":"deny""#);
    let e = envoy(&deny, &mock, dead);
    let start = Instant::now();
    let r = chat(&e.url("/v1/chat/completions"), &[]).unwrap();
    assert_eq!(r.status, 429, "{}", r.body);
    assert_eq!(r.header("x-llm-ratelimit-reason"), Some("global_unavailable"));
    assert!(start.elapsed() < Duration::from_secs(1), "never held past the timeout: {:?}", start.elapsed());
}

#[test]
fn waiters_wait_for_the_global_reset_and_the_rest_get_its_retry_after() {
    let dir = TempDir::new();
    let (_redis, redis_port) = redis();
    let limits = LIMITS.replace("unit: second, requests_per_unit: 40", "unit: minute, requests_per_unit: 3");
    let (_rls, rls_port) = rls(redis_port, &limits, &dir);
    let mock = Mock::start(&[]);
    let config = r#"{"name":"shared","global":{"cluster":"ratelimit","timeout_ms":200,"max_lease":1}}"#;
    let e = envoy(config, &mock, rls_port);
    let url = e.url("/v1/chat/completions");
    for i in 0..3 {
        assert_eq!(chat(&url, &[]).unwrap().status, 200, "request {i} within the limit");
    }
    // The fourth would wait a minute: longer than NORMAL's max_wait, so refused with the reset.
    let r = chat(&url, &[]).unwrap();
    assert_eq!(r.status, 429);
    assert_eq!(r.header("x-llm-ratelimit-reason"), Some("global_limit"));
    let secs: u64 = r.header("retry-after").and_then(|s| s.parse().ok()).unwrap();
    assert!((50..=61).contains(&secs), "the service's reset, not a guess: {secs}");
    // Cached until the reset: more refusals cost no call (one worker of two may not know yet).
    let calls = e.stat("shared", "global.calls");
    for _ in 0..6 {
        assert_eq!(chat(&url, &[]).unwrap().status, 429);
    }
    assert!(e.stat("shared", "global.calls") <= calls + 1, "over limit is cached until the reset");
    assert_eq!(mock.received(), 3);
}

#[test]
fn the_shared_limit_holds_within_two_percent_at_several_offered_rates() {
    let dir = TempDir::new();
    let (_redis, redis_port) = redis();
    let (_rls, rls_port) = rls(redis_port, LIMITS, &dir);
    for offered in [80.0, 200.0] {
        let mock = Mock::start(&[]);
        let a = envoy(HELD, &mock, rls_port);
        let b = envoy(HELD, &mock, rls_port);
        // Ten windows of the service's 1 s: each admits at most 40.
        let urls = [a.url("/v1/chat/completions"), b.url("/v1/chat/completions")];
        let (ok, limited, other) = clients(&urls, 4, Some(offered), Duration::from_millis(9_900));
        assert!(other.is_empty(), "{other:?}");
        let limit = 10 * 40;
        println!("offered {offered}/s for 9.9 s: admitted {ok} (limit {limit}), refused {limited}");
        assert_eq!(mock.received() as usize, ok);
        assert!(ok <= limit + limit / 50, "offered {offered}/s: {ok} admitted > limit {limit} + 2%");
        // Below the limit only if the service failed to answer in time (a loaded machine).
        let failed: u64 =
            [&a, &b].iter().map(|e| e.stat("shared", "global.timeouts") + e.stat("shared", "global.errors")).sum();
        assert!(ok >= limit - limit / 50 || failed > 0, "offered {offered}/s: {ok} admitted < limit {limit} - 2%");
        // The next rate starts on a fresh window.
        std::thread::sleep(Duration::from_millis(1100));
    }
}

#[test]
fn priorities_still_decide_who_waits_for_the_shared_limit() {
    let dir = TempDir::new();
    let (_redis, redis_port) = redis();
    let (_rls, rls_port) = rls(redis_port, &LIMITS.replace("requests_per_unit: 40", "requests_per_unit: 10"), &dir);
    let mock = Mock::start(&[]);
    // HIGH may wait 5 s for the service's reset, LOW 100 ms.
    let config = r#"{"name":"shared","bucket":{"capacity":100000,"refill_rate":100000},
        "classify":{"trust_header":true},"priorities":{"LOW":{"max_wait_ms":100}},
        "global":{"cluster":"ratelimit","timeout_ms":200}}"#;
    let e = envoy(config, &mock, rls_port);
    let url = e.url("/v1/chat/completions");
    let send = |class: &'static str| {
        let url = url.clone();
        std::thread::spawn(move || timed_chat(Duration::from_secs(10), &url, &[("x-llm-priority", class)]))
    };
    // 20 LOW then 10 HIGH at once, against 10 per second.
    let low: Vec<_> = (0..20).map(|_| send("LOW")).collect();
    std::thread::sleep(Duration::from_millis(50));
    let high: Vec<_> = (0..10).map(|_| send("HIGH")).collect();
    let status =
        |h: Vec<std::thread::JoinHandle<Timed>>| h.into_iter().map(|h| h.join().unwrap().status()).collect::<Vec<_>>();
    let (low, high) = (status(low), status(high));
    let ok = |v: &[u16]| v.iter().filter(|&&s| s == 200).count();
    println!("LOW {low:?}\nHIGH {high:?}");
    assert_eq!(ok(&high), 10, "every HIGH request waited for the reset and got through");
    assert!(ok(&low) <= 10, "LOW took at most the first window");
    assert!(low.iter().all(|&s| s == 200 || s == 429), "{low:?}");
}

#[test]
fn the_service_dying_mid_run_falls_back_and_the_limit_returns_with_it() {
    let dir = TempDir::new();
    let (_redis, redis_port) = redis();
    let grpc = free_port();
    let (service, rls_port) = rls_on(redis_port, LIMITS, &dir, grpc, &[]);
    assert_eq!(rls_port, grpc);
    let mock = Mock::start(&[]);
    let e = envoy(&SHARED.replace(r#""timeout_ms":200"#, r#""timeout_ms":100"#), &mock, rls_port);
    let urls = [e.url("/v1/chat/completions")];
    // Held to 40/s while the service runs.
    let (ok, ..) = clients(&urls, 4, Some(100.0), Duration::from_millis(1900));
    assert!(ok <= 2 * 40 + 2, "{ok}");
    drop(service);
    // What the service said last (over limit until its reset) still holds; then, dead: each request is answered within the timeout plus a tick, by this instance's own
    // bucket (failure_mode local), counted as fallback.
    std::thread::sleep(Duration::from_millis(1100));
    let slowest = (0..30)
        .map(|_| {
            let t = timed_chat(Duration::from_secs(5), &urls[0], &[]);
            assert_eq!(t.status(), 200, "failure_mode local lets it through");
            t.done - t.sent
        })
        .max()
        .unwrap();
    assert!(slowest < 100 + 10 + 150, "no request held past timeout_ms and a tick: {slowest} ms");
    assert!(e.stat("shared", "global.fallback") > 0);
    assert!(e.stat("shared", "global.errors") + e.stat("shared", "global.timeouts") > 0);
    // Back on the same port: the limit holds again (after at most the 1 s local mode skips it).
    let (_service, _) = rls_on(redis_port, LIMITS, &dir, grpc, &[]);
    std::thread::sleep(Duration::from_millis(1200));
    let (ok, limited, other) = clients(&urls, 4, Some(100.0), Duration::from_millis(2900));
    assert!(other.is_empty(), "{other:?}");
    println!("after the restart: {ok} admitted, {limited} refused");
    assert!(ok <= 3 * 40 + 3 && limited > 0, "the global limit is back: {ok} admitted, {limited} refused");
}

#[test]
fn redis_dying_is_a_fast_error_and_the_gate_falls_back() {
    let dir = TempDir::new();
    let (redis_proc, redis_port) = redis();
    let (_rls, rls_port) = rls(redis_port, LIMITS, &dir);
    let mock = Mock::start(&[]);
    let e = envoy(SHARED, &mock, rls_port);
    let url = e.url("/v1/chat/completions");
    assert_eq!(chat(&url, &[]).unwrap().status, 200);
    drop(redis_proc);
    // The service answers UNAVAILABLE at once: local fallback, no wait for the timeout.
    for _ in 0..5 {
        let t = timed_chat(Duration::from_secs(5), &url, &[]);
        assert_eq!(t.status(), 200);
        assert!(t.done - t.sent < 200 + 10 + 150, "{} ms", t.done - t.sent);
    }
    assert!(e.stat("shared", "global.errors") >= 1, "counted as an error");
    assert!(e.stat("shared", "global.fallback") >= 1);
}

#[test]
fn token_estimates_go_to_the_service_as_token_hits() {
    let dir = TempDir::new();
    let (_redis, redis_port) = redis();
    let limits = LIMITS.replace(
        "        rate_limit: {unit: second, requests_per_unit: 40}\n",
        "        rate_limit: {unit: second, requests_per_unit: 40}\n      - key: unit\n        value: tokens\n        rate_limit: {unit: minute, requests_per_unit: 1000}\n",
    );
    let (_rls, rls_port) = rls(redis_port, &limits, &dir);
    let mock = Mock::start(&["--output-tokens", "10"]);
    // Local token bucket far above the shared one; leases off so each request asks its own.
    let config = r#"{"name":"shared","tokens":{"capacity":1000000},"queue":{"enabled":false},
        "global":{"cluster":"ratelimit","timeout_ms":1000,"max_lease":1}}"#;
    let e = envoy(config, &mock, rls_port);
    let url = e.url("/v1/chat/completions");
    // ~300 tokens each: 1,000 characters of prompt (250) and max_tokens 50.
    let body =
        format!(r#"{{"model":"m","max_tokens":50,"messages":[{{"role":"user","content":"{}"}}]}}"#, "x".repeat(1000));
    let statuses: Vec<(u16, Option<String>)> = (0..5)
        .map(|_| {
            let r = post(&url, &body, &[("content-type", "application/json")]).unwrap();
            (r.status, r.header("x-llm-ratelimit-reason").map(str::to_string))
        })
        .collect();
    println!("{statuses:?}");
    let ok = statuses.iter().filter(|(s, _)| *s == 200).count();
    assert_eq!(ok, 3, "1000 tokens a minute hold three requests of ~300: {statuses:?}");
    assert!(statuses[3..].iter().all(|(s, r)| *s == 429 && r.as_deref() == Some("global_limit")), "{statuses:?}");
    assert_eq!(mock.received(), 3);
}

/// `usage.total_tokens` of an OpenAI answer.
fn total_tokens(r: &Reply) -> u64 {
    let v: serde_json::Value = serde_json::from_str(&r.body).unwrap_or_default();
    v["usage"]["total_tokens"].as_u64().unwrap_or(0)
}

/// A chat body with a 40-character prompt asking for at most `max_tokens`.
fn small_prompt(max_tokens: u64) -> String {
    format!(
        r#"{{"model":"gpt-4o","max_tokens":{max_tokens},"messages":[{{"role":"user","content":"{}"}}]}}"#,
        "x".repeat(40)
    )
}

#[test]
fn estimates_ten_times_the_usage_are_settled_so_two_envoys_use_the_shared_token_limit() {
    let dir = TempDir::new();
    let (_redis, redis_port) = redis();
    let limits = "
domain: llm-ratelimit
descriptors:
  - key: provider
    value: shared
    descriptors:
      - key: unit
        value: requests
        rate_limit: {unit: second, requests_per_unit: 10000}
      - key: unit
        value: tokens
        rate_limit: {unit: minute, requests_per_unit: 6000}
";
    let (_rls, rls_port) = rls(redis_port, limits, &dir);
    // Answers of 40 tokens to prompts of ~10: ~50 used, ~500 reserved (max_tokens 490).
    let mock = Mock::start(&["--output-tokens", "40"]);
    let config = r#"{"name":"shared","tokens":{"capacity":10000000},"queue":{"enabled":false},
        "global":{"cluster":"ratelimit","timeout_ms":1000,"failure_mode":"deny"}}"#;
    let (a, b) = (envoy(config, &mock, rls_port), envoy(config, &mock, rls_port));
    let urls = [a.url("/v1/chat/completions"), b.url("/v1/chat/completions")];
    let body = small_prompt(490);
    let totals = std::sync::Mutex::new((0u64, 0u64));
    let end = Instant::now() + Duration::from_secs(5);
    std::thread::scope(|s| {
        for i in 0..4 {
            let (url, body, totals) = (&urls[i % 2], &body, &totals);
            s.spawn(move || {
                while Instant::now() < end {
                    let r = post(url, body, &[]).unwrap();
                    if r.status == 200 {
                        let mut t = totals.lock().unwrap();
                        t.0 += 1;
                        t.1 += total_tokens(&r);
                    } else {
                        assert_eq!(r.header("x-llm-ratelimit-reason"), Some("global_limit"), "{r:?}");
                        std::thread::sleep(Duration::from_millis(50));
                    }
                }
            });
        }
    });
    let (served, used) = totals.into_inner().unwrap();
    let per_request = used as f64 / served.max(1) as f64;
    println!("served {served}, used {used} tokens, {per_request:.1} per request");

    // What the window holds, used: the estimates alone would have let 12 through.
    let fair = 6000.0 / per_request;
    assert!(served as f64 >= 0.85 * fair, "{served} served < 85% of {fair:.0}");
    // Overshoot: at most the usage beyond their estimates of the requests in flight (none here:
    // each used a tenth of its estimate), so never past the limit.
    assert!(used <= 6000, "{used} tokens used against a limit of 6000");
    assert!(a.stat("shared", "global.refunded_tokens") + b.stat("shared", "global.refunded_tokens") > 0);
}

#[test]
fn a_daily_budget_across_two_envoys_holds_across_their_restarts_and_resets_at_midnight() {
    let dir = TempDir::new();
    let (_redis, redis_port) = redis();
    let tz = "PST8PDT,M3.2.0,M11.1.0";
    let limits = format!(
        "
domain: llm-ratelimit
descriptors:
  - key: provider
    value: shared
    descriptors:
      - key: unit
        value: requests
        rate_limit: {{unit: second, requests_per_unit: 10000}}
      - key: unit
        value: cost
        rate_limit: {{unit: day, requests_per_unit: 1000000, time_zone: \"{tz}\"}}
"
    );
    let (rls_process, rls_port) = rls_on(redis_port, &limits, &dir, 0, &[]);
    // Each answer: 50 output tokens at $200 per million, $0.01; a budget of $1.00 a day.
    let mock = Mock::start(&["--output-tokens", "50"]);
    let config = r#"{"name":"shared","tokens":{"capacity":10000000},"queue":{"enabled":false},
        "prices":{"models":{"gpt-4o":{"input":0,"output":200}}},
        "global":{"cluster":"ratelimit","timeout_ms":1000,"failure_mode":"deny"}}"#;
    let (a, b) = (envoy(config, &mock, rls_port), envoy(config, &mock, rls_port));
    let body = small_prompt(100);
    let mut served = 0;
    let mut refused = None;
    for i in 0..110 {
        let e = if i % 2 == 0 { &a } else { &b };
        let r = post(&e.url("/v1/chat/completions"), &body, &[]).unwrap();
        match r.status {
            200 => served += 1,
            _ => {
                refused = Some(r);
                break;
            }
        }
    }
    let refused = refused.expect("the budget ran out");
    println!("served {served} for $1.00 at $0.01, then {:?}", refused.header("x-llm-ratelimit-reason"));
    assert!((99..=101).contains(&served), "{served} served for $1.00 at $0.01");
    assert_eq!(refused.header("x-llm-ratelimit-reason"), Some("budget_exceeded"), "{refused:?}");
    // Retry-After: the time to midnight Pacific, as the service says.
    let now = llm_ratelimit::time::Instant::from_millis(epoch_ms());
    let tz_rule = llm_ratelimit::calendar::TimeZone::parse(tz).unwrap();
    let (_, midnight) = llm_ratelimit::calendar::window(now, llm_ratelimit::calendar::Period::Day, &tz_rule);
    let to_midnight = (midnight - now).as_millis() as f64 / 1000.0;
    let retry_after: f64 = refused.header("retry-after").unwrap().parse().unwrap();
    assert!((retry_after - to_midnight).abs() <= 2.0, "Retry-After {retry_after}, midnight in {to_midnight}");
    assert_eq!(refused.header("x-should-retry"), Some(if to_midnight > 3600.0 { "false" } else { "true" }));
    // Both Envoys restart: the day's spend is in Redis.
    drop((a, b));
    let (a, b) = (envoy(config, &mock, rls_port), envoy(config, &mock, rls_port));
    for e in [&a, &b] {
        let r = post(&e.url("/v1/chat/completions"), &body, &[]).unwrap();
        assert_eq!(r.header("x-llm-ratelimit-reason"), Some("budget_exceeded"), "after a restart: {r:?}");
    }
    // Past midnight Pacific (the service's clock moved on): a new day's budget.
    drop(rls_process);
    let offset = format!("{}", to_midnight.ceil() as u64 + 5);
    let (_rls, rls_port2) = rls_on(redis_port, &limits, &dir, 0, &["--clock-offset-s", &offset]);
    drop((a, b));
    let a = envoy(config, &mock, rls_port2);
    let r = post(&a.url("/v1/chat/completions"), &body, &[]).unwrap();
    assert_eq!(r.status, 200, "a new day: {r:?}");
}
