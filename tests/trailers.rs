//! Requests that end with trailers in the real Envoy. With `allow_on_headers_stop_iteration`
//! (envoy/envoy.yaml sets it), a request's held headers go on as soon as any callback answers
//! Continue, and the trailers callback is one of them: an HTTP/2 client that sends HEADERS, DATA
//! and then a trailers frame (END_STREAM), or an HTTP/1.1 client with a chunked body and a trailer
//! field, must meet the same bucket and the same queue as one whose body ends the request.
//!
//! The client is tests/h2client.py (Python `h2` in .venv/, installed by `scripts/setup.sh --test`):
//! it sends N requests at once and prints every answer with its timing as JSON.

mod support;
use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use support::*;

/// A full bucket of 2 that next to never refills, nothing waits: the 3rd request on gets a 429.
/// `tokens` turns on token limits, so every request's body is held and read before its headers go.
const FULL_BUCKET: &str = r#"{"name":"trl","bucket":{"capacity":2,"refill_rate":0.01,"burst_allowance":0},
    "tokens":{"capacity":1000000},"queue":{"enabled":false}}"#;

/// A bucket of 2 that refills 2 a second, and a queue that waits up to 20 s: 10 at once are 2 at
/// once and then one every 500 ms.
const QUEUED_WITH_TOKENS: &str = r#"{"name":"trq","bucket":{"capacity":2,"refill_rate":2,"burst_allowance":0},
    "tokens":{"capacity":1000000},"priorities":{"NORMAL":{"max_wait_ms":20000}}}"#;

/// The same without token limits: the requests are held only by the queue (on their headers).
const QUEUED: &str = r#"{"name":"trq","bucket":{"capacity":2,"refill_rate":2,"burst_allowance":0},
    "priorities":{"NORMAL":{"max_wait_ms":20000}}}"#;

/// A bucket that never runs out: the provider's own quota is what limits.
const ROOMY: &str = r#"{"name":"quota","bucket":{"capacity":1000,"refill_rate":1000}}"#;

const REQUESTS: usize = 10;
/// The mock provider's requests per window in `provider_quota`.
const QUOTA: usize = 4;
const CAPACITY: usize = 2;
/// Milliseconds between two tokens at `refill_rate` 2.
const REFILL_MS: u64 = 500;

/// How the client sends its requests.
#[derive(Clone, Copy, Debug)]
enum Wire {
    /// HTTP/2 prior knowledge, the requests spread over this many connections.
    H2 { connections: usize },
    /// HTTP/1.1, chunked, one connection per request.
    H1,
}

/// One answer the client saw.
#[derive(Debug)]
struct Answer {
    status: u16,
    reason: Option<String>,
    source: Option<String>,
    queued_ms: Option<u64>,
    /// Epoch ms of the response headers.
    response_ms: Option<u64>,
    error: Option<String>,
}

struct Run {
    t0_ms: u64,
    answers: Vec<Answer>,
}

impl Run {
    fn count(&self, status: u16) -> usize {
        self.answers.iter().filter(|a| a.status == status).count()
    }

    /// Every answer, in order of arrival, for failure messages.
    fn summary(&self) -> String {
        let mut a: Vec<&Answer> = self.answers.iter().collect();
        a.sort_by_key(|a| a.response_ms.unwrap_or(u64::MAX));
        a.iter()
            .map(|a| match &a.error {
                Some(e) => format!("  error: {e}"),
                None => format!(
                    "  {} @{}ms reason={} source={} queued_ms={}",
                    a.status,
                    a.response_ms.map_or(-1, |t| t as i64 - self.t0_ms as i64),
                    a.reason.as_deref().unwrap_or("-"),
                    a.source.as_deref().unwrap_or("-"),
                    a.queued_ms.map_or("-".into(), |q| q.to_string()),
                ),
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Milliseconds after t0 at which the 200s came, earliest first.
    fn ok_times(&self) -> Vec<u64> {
        let mut t: Vec<u64> = self
            .answers
            .iter()
            .filter(|a| a.status == 200)
            .filter_map(|a| a.response_ms)
            .map(|t| t.saturating_sub(self.t0_ms))
            .collect();
        t.sort_unstable();
        t
    }
}

fn python() -> std::path::PathBuf {
    let py = root().join(".venv/bin/python3");
    let has_h2 = Command::new(&py)
        .args(["-c", "import h2"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(has_h2, "{} cannot import h2: run `scripts/setup.sh --test` (it installs h2 into .venv/)", py.display());
    py
}

/// Sends `REQUESTS` chat completions at once through `envoy`, ending each with trailers unless
/// `trailers` is false; returns every answer. The client gives up on a request after
/// `client_timeout` (then it is an answer with an error), and is killed if it runs 10 s longer.
fn send(envoy: &Envoy, wire: Wire, trailers: bool, client_timeout: Duration) -> Run {
    let mut cmd = Command::new(python());
    cmd.arg(root().join("tests/h2client.py"))
        .args(["--port", &envoy.port.to_string(), "-n", &REQUESTS.to_string()])
        .args(["--timeout", &client_timeout.as_secs_f64().to_string()]);
    match wire {
        Wire::H2 { connections } => cmd.args(["--connections", &connections.to_string()]),
        Wire::H1 => cmd.arg("--http1"),
    };
    if !trailers {
        cmd.arg("--no-trailers");
    }
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn tests/h2client.py");
    let (mut out, mut err) = (child.stdout.take().expect("stdout"), child.stderr.take().expect("stderr"));
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let limit = client_timeout + Duration::from_secs(10);
    let started = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait for the client") {
            break Some(s);
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let (out, err) = (out.join().expect("stdout reader"), err.join().expect("stderr reader"));
    let status = status.unwrap_or_else(|| panic!("tests/h2client.py still running after {limit:?}; stderr:\n{err}"));
    assert!(status.success(), "tests/h2client.py failed ({status}); stderr:\n{err}");
    let v: serde_json::Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("client output is not JSON ({e}): {out}\n{err}"));
    let header = |r: &serde_json::Value, name: &str| r["headers"][name].as_str().map(str::to_string);
    let answers = v["results"]
        .as_array()
        .expect("results")
        .iter()
        .map(|r| Answer {
            status: r["status"].as_u64().unwrap_or(0) as u16,
            reason: header(r, "x-llm-ratelimit-reason"),
            source: header(r, "x-llm-ratelimit-source"),
            queued_ms: header(r, "x-ratelimit-queued-ms").and_then(|q| q.parse().ok()),
            response_ms: r["response_ms"].as_u64(),
            error: r["error"].as_str().map(str::to_string),
        })
        .collect();
    Run { t0_ms: v["t0_ms"].as_u64().expect("t0_ms"), answers }
}

/// Envoy with `filter_config`; with HTTP/1.1, its listener reads trailers (without
/// `enable_trailers` Envoy drops them and the last chunk ends the request).
fn envoy(filter_config: &str, wire: Wire, upstream_port: u16) -> Envoy {
    let edit: Option<fn(String) -> String> = match wire {
        Wire::H2 { .. } => None,
        Wire::H1 => Some(|yaml| {
            let (from, to) = (
                "          stat_prefix: llm_ingress\n",
                "          stat_prefix: llm_ingress\n          http_protocol_options: { enable_trailers: true }\n",
            );
            assert!(yaml.contains(from), "envoy/envoy.yaml has no `stat_prefix: llm_ingress` line to add to");
            yaml.replacen(from, to, 1)
        }),
    };
    let opts = EnvoyOpts { filter_config, concurrency: 2, upstream_port, edit };
    Envoy::spawn(&opts).unwrap_or_else(|log| panic!("Envoy did not become ready; its log:\n{log}"))
}

/// 10 requests at once against a full bucket of 2, with nothing allowed to wait: 2 reach the
/// provider and 8 get the proxy's 429, each promptly.
fn full_bucket(wire: Wire, trailers: bool) {
    let mock = Mock::start(&[]);
    let envoy = envoy(FULL_BUCKET, wire, mock.port);
    let run = send(&envoy, wire, trailers, Duration::from_secs(15));
    let how = format!("{wire:?}, {}", if trailers { "with trailers" } else { "without trailers" });
    let answers = run.summary();
    let errors: Vec<&String> = run.answers.iter().filter_map(|a| a.error.as_ref()).collect();
    assert!(errors.is_empty(), "{how}: {} of {REQUESTS} got no answer:\n{answers}", errors.len());
    let reached = mock.received() as usize;
    assert_eq!(
        reached, CAPACITY,
        "{how}: {reached} of {REQUESTS} requests reached the provider through a bucket of {CAPACITY}; answers:\n{answers}"
    );
    assert_eq!(run.count(200), CAPACITY, "{how}: answers:\n{answers}");
    assert_eq!(run.count(429), REQUESTS - CAPACITY, "{how}: answers:\n{answers}");
    for a in run.answers.iter().filter(|a| a.status == 429) {
        assert_eq!(a.source.as_deref(), Some("proxy"), "{how}: a 429 not from the proxy:\n{answers}");
        assert_eq!(a.reason.as_deref(), Some("no_token"), "{how}: answers:\n{answers}");
    }
    // Refused at once: nothing waits for a token, nor for the client's 15 s timeout.
    let last = run.answers.iter().filter_map(|a| a.response_ms).max().unwrap_or(0).saturating_sub(run.t0_ms);
    assert!(last < 3000, "{how}: the last answer came {last} ms after the requests:\n{answers}");
    let failures = vm_failures(&envoy.log());
    assert!(failures.is_empty(), "{how}: the VM failed:\n{}", failures.join("\n"));
}

/// 10 requests at once against a bucket of 2 refilling 2 a second, all allowed to wait: every
/// one gets its 200, 2 at once and the rest one by one as tokens come, not all together.
fn queued(filter_config: &str, wire: Wire, trailers: bool) {
    let mock = Mock::start(&[]);
    let envoy = envoy(filter_config, wire, mock.port);
    let run = send(&envoy, wire, trailers, Duration::from_secs(20));
    let how = format!(
        "{wire:?}, {}, {}",
        if trailers { "with trailers" } else { "without trailers" },
        if filter_config.contains("tokens") { "token limits" } else { "no token limits" }
    );
    let answers = run.summary();
    let errors: Vec<&String> = run.answers.iter().filter_map(|a| a.error.as_ref()).collect();
    assert!(errors.is_empty(), "{how}: {} of {REQUESTS} got no answer:\n{answers}", errors.len());
    assert_eq!(run.count(200), REQUESTS, "{how}: every request may wait for its token; answers:\n{answers}");
    // Token k (k >= CAPACITY, from 0) comes (k - CAPACITY + 1) * 500 ms after the burst; a
    // released request is answered at once (the mock has no latency). 250 ms of slack for ticks
    // and scheduling.
    let times = run.ok_times();
    for (k, &t) in times.iter().enumerate().skip(CAPACITY) {
        let due = (k - CAPACITY + 1) as u64 * REFILL_MS;
        assert!(
            t + 250 >= due,
            "{how}: answer #{} came {t} ms after the burst, before its token (due at {due} ms): the queue \
             let requests through faster than the bucket refills; 200s at {times:?} ms; answers:\n{answers}",
            k + 1
        );
    }
    let expected_last = (REQUESTS - CAPACITY) as u64 * REFILL_MS;
    let last = *times.last().expect("200s");
    assert!(
        last <= expected_last + 2500,
        "{how}: the last answer came {last} ms after the burst (due at {expected_last}):\n{answers}"
    );
    let waited = run.answers.iter().filter(|a| a.queued_ms.is_some()).count();
    assert_eq!(waited, REQUESTS - CAPACITY, "{how}: answers that say they waited (x-ratelimit-queued-ms):\n{answers}");
    assert_eq!(mock.received() as usize, REQUESTS);
    let failures = vm_failures(&envoy.log());
    assert!(failures.is_empty(), "{how}: the VM failed:\n{}", failures.join("\n"));
}

/// 10 requests at once to a provider whose quota (4 per 2.5 s window, OpenAI style) runs out:
/// the router retries the provider's 429s, and the filter's observer (a cluster upstream filter,
/// which sees each attempt's headers, body and trailers) holds every retry until the provider's
/// reset. All 10 succeed, within the route's 4 retries, and the exhausted provider is asked again
/// only as windows reset: at most 2 times for each request over the quota (5 to 8 seen).
fn provider_quota(trailers: bool) {
    let mock = Mock::start(&["--quota", &QUOTA.to_string(), "--window-ms", "2500", "--style", "openai"]);
    let wire = Wire::H2 { connections: REQUESTS };
    let envoy = envoy(ROOMY, wire, mock.port);
    ureq::post(&mock.url("/mock/reset")).call().expect("restart the quota window");
    let run = send(&envoy, wire, trailers, Duration::from_secs(20));
    let how = format!("{wire:?}, {}", if trailers { "with trailers" } else { "without trailers" });
    let answers = run.summary();
    let errors: Vec<&String> = run.answers.iter().filter_map(|a| a.error.as_ref()).collect();
    assert!(errors.is_empty(), "{how}: {} of {REQUESTS} got no answer:\n{answers}", errors.len());
    let limited = mock.counter("rate_limited");
    let retries = envoy.stat("quota", "priority.normal.retry.attempts");
    let over = (REQUESTS - QUOTA) as u64;
    assert!(
        limited <= 2 * over,
        "{how}: the exhausted provider answered {limited} 429s ({retries} router retries; at most {} expected): \
         retries went before the provider's reset; answers:\n{answers}",
        2 * over
    );
    assert_eq!(run.count(200), REQUESTS, "{how}: every request gets its 200 after a reset; answers:\n{answers}");
    let failures = vm_failures(&envoy.log());
    assert!(failures.is_empty(), "{how}: the VM failed:\n{}", failures.join("\n"));
}

/// The comparison: the same burst without trailers (the body ends each request).
#[test]
fn without_trailers_a_full_bucket_lets_two_of_ten_through() {
    full_bucket(Wire::H2 { connections: REQUESTS }, false);
}

/// The comparison: the queue releases one every 500 ms when the body ends each request.
#[test]
fn without_trailers_the_queue_releases_one_request_per_token() {
    queued(QUEUED_WITH_TOKENS, Wire::H2 { connections: REQUESTS }, false);
}

#[test]
fn h2_requests_with_trailers_get_no_more_than_a_full_bucket_allows() {
    full_bucket(Wire::H2 { connections: REQUESTS }, true);
}

#[test]
fn h2_streams_with_trailers_on_one_connection_get_no_more_than_a_full_bucket_allows() {
    full_bucket(Wire::H2 { connections: 1 }, true);
}

#[test]
fn http1_chunked_requests_with_trailers_get_no_more_than_a_full_bucket_allows() {
    full_bucket(Wire::H1, true);
}

#[test]
fn h2_requests_with_trailers_wait_in_the_queue_for_their_tokens() {
    queued(QUEUED_WITH_TOKENS, Wire::H2 { connections: REQUESTS }, true);
}

#[test]
fn http1_chunked_requests_with_trailers_wait_in_the_queue_for_their_tokens() {
    queued(QUEUED_WITH_TOKENS, Wire::H1, true);
}

/// Without token limits the headers are held only while queued, and the trailers still come.
#[test]
fn h2_requests_with_trailers_wait_in_the_queue_without_token_limits() {
    queued(QUEUED, Wire::H2 { connections: REQUESTS }, true);
}

/// The comparison: retries held until the reset when the body ends each request.
#[test]
fn without_trailers_retries_wait_for_the_providers_reset() {
    provider_quota(false);
}

/// The observer holds a router retry on its headers; the attempt's trailers come after its body.
#[test]
fn h2_retries_with_trailers_wait_for_the_providers_reset() {
    provider_quota(true);
}
