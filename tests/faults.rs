//! Faults end to end, in the real Envoy: a slow provider, a provider that resets connections or
//! answers garbage, the listener's configuration reloaded while requests wait (LDS from a file),
//! a reload with a provider name the filter does not know, and Envoy's hot restart. Each test says
//! what the user sees and asserts it, and that the filter's VM never failed. With `--nocapture`
//! each test prints what its clients got (status, reason, sent/answered ms); RELIABILITY.md has
//! the table.

mod support;
use std::path::Path;
use std::time::{Duration, Instant};
use support::*;

const CLASSES: [&str; 4] = ["critical", "high", "normal", "low"];

fn depths(envoy: &Envoy, provider: &str) -> Vec<u64> {
    CLASSES.iter().map(|c| envoy.stat(provider, &format!("priority.{c}.queue_depth"))).collect()
}

fn set_mock(mock: &Mock, patch: &str) {
    let r = ureq::post(&mock.url("/mock/config")).set("content-type", "application/json").send_string(patch);
    assert!(r.is_ok(), "mock config {patch}: {r:?}");
}

fn assert_no_vm_failure(log: &str) {
    let bad = vm_failures(log);
    assert!(bad.is_empty(), "VM failure or panic in Envoy's log:\n{}", bad.join("\n"));
}

/// A reply read as bytes: the provider's garbage body is not UTF-8.
#[derive(Debug)]
struct Raw {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    ms: u64,
}

impl Raw {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }
}

fn chat_raw(url: &str) -> Raw {
    let started = Instant::now();
    let r = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(60))
        .build()
        .post(url)
        .set("content-type", "application/json")
        .send_string(r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}"#);
    let resp = match r {
        Ok(r) | Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("no HTTP answer: {e}"),
    };
    let status = resp.status();
    let headers =
        resp.headers_names().into_iter().filter_map(|n| resp.header(&n).map(|v| (n.clone(), v.to_string()))).collect();
    let mut body = Vec::new();
    std::io::Read::read_to_end(&mut resp.into_reader(), &mut body).expect("body");
    Raw { status, headers, body, ms: started.elapsed().as_millis() as u64 }
}

fn statuses(replies: &[Timed]) -> Vec<u16> {
    replies.iter().map(Timed::status).collect()
}

/// The route timeout cut to 1 s (`envoy/envoy.yaml` has 120 s), so a provider 3 s slow is past it.
fn one_second_route_timeout(yaml: String) -> String {
    assert!(yaml.contains("timeout: 120s"), "the route timeout moved");
    yaml.replace("timeout: 120s", "timeout: 1s")
}

/// The user sees: a provider slower than the route timeout gets every client Envoy's own 504
/// `upstream request timeout` after the timeout, requests that waited in the filter's queue
/// included (each is released, goes upstream, and times out in turn; none is left waiting). When
/// the provider is fast again the next request gets a 200: a timeout is not a quota signal.
#[test]
fn a_slow_provider_gets_504_after_the_route_timeout_and_queued_requests_are_answered() {
    let mock = Mock::start(&["--latency-ms", "3000"]);
    let config = r#"{"name":"slow","bucket":{"capacity":1,"refill_rate":4,"burst_allowance":0},
        "priorities":{"NORMAL":{"max_wait_ms":10000}}}"#;
    let opts = EnvoyOpts {
        filter_config: config,
        concurrency: 2,
        upstream_port: mock.port,
        edit: Some(one_second_route_timeout),
    };
    let envoy = Envoy::spawn(&opts).unwrap_or_else(|log| panic!("Envoy did not start:\n{log}"));
    let url = envoy.url("/v1/chat/completions");
    let t0 = epoch_ms();
    let replies = simultaneous(4, &url, &[]);
    let summary: Vec<String> = replies.iter().map(|r| r.summary(t0)).collect();
    eprintln!("what the clients got: {summary:#?}");
    assert_eq!(statuses(&replies), [504; 4], "{summary:#?}");
    for r in &replies {
        assert_eq!(r.reply.as_ref().unwrap().body, "upstream request timeout", "{summary:#?}");
        let took = r.done - r.sent;
        assert!((900..6_000).contains(&took), "answered after {took} ms, the timeout is 1 s: {summary:#?}");
    }
    assert!(envoy.stat("slow", "priority.normal.queued") >= 2, "some waited in the queue: {summary:#?}");
    assert!(replies.iter().filter(|r| r.header("x-ratelimit-queued-ms").is_some()).count() >= 2, "{summary:#?}");
    assert_eq!(depths(&envoy, "slow"), [0, 0, 0, 0]);
    set_mock(&mock, r#"{"latency_ms": 0}"#);
    std::thread::sleep(Duration::from_millis(300));
    let r = chat(&url, &[]).unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    assert_no_vm_failure(&envoy.log());
}

/// Starts the mock with `fault` on, sends 3 requests at once through a bucket of 1 (two wait in
/// the queue), and returns the replies; then turns the fault off and returns the first reply after.
fn through_a_fault(fault: &str, provider: &str) -> (Vec<Timed>, Reply, Envoy, Mock) {
    let mock = Mock::start(&["--fault", fault]);
    let config = format!(
        r#"{{"name":"{provider}","bucket":{{"capacity":1,"refill_rate":5,"burst_allowance":0}},
        "priorities":{{"NORMAL":{{"max_wait_ms":10000}}}}}}"#
    );
    let envoy = Envoy::start(&config, 2, mock.port);
    let url = envoy.url("/v1/chat/completions");
    let replies = simultaneous(3, &url, &[]);
    set_mock(&mock, r#"{"fault": "none"}"#);
    let after = chat(&url, &[]).unwrap();
    (replies, after, envoy, mock)
}

/// The user sees: a provider that resets every connection after reading the request gets each
/// client Envoy's 503 once the router's retries (4, on `reset`) are spent, with Envoy's own
/// reason in the body; queued requests too. The filter is unharmed: a reset is not a quota
/// signal, so the first request after the provider recovers gets a 200.
#[test]
fn a_provider_resetting_connections_gets_503_and_the_filter_works_after() {
    let (replies, after, envoy, mock) = through_a_fault("reset", "reset");
    let t0 = replies.iter().map(|r| r.sent).min().unwrap();
    let summary: Vec<String> = replies.iter().map(|r| r.summary(t0)).collect();
    eprintln!("what the clients got: {summary:#?}");
    assert_eq!(statuses(&replies), [503; 3], "{summary:#?}");
    for r in &replies {
        let body = &r.reply.as_ref().unwrap().body;
        assert!(body.starts_with("upstream connect error or disconnect/reset before headers"), "{body}");
        assert!(body.contains("reset"), "{body}");
    }
    // 1 attempt + 4 retries for each of the 3.
    assert_eq!(mock.counter("faults"), 15);
    // Each ended on a 503 after its retries: the admission filter counts it (counters lag a tick).
    let exhausted = || envoy.stat("reset", "priority.normal.retry.exhausted");
    assert!(eventually(Duration::from_secs(1), || exhausted() == 3), "retry.exhausted {}", exhausted());
    assert_eq!(after.status, 200, "{after:?}");
    assert_eq!(depths(&envoy, "reset"), [0, 0, 0, 0]);
    assert_no_vm_failure(&envoy.log());
}

/// The user sees: a provider that answers bytes that are not HTTP gets each client Envoy's 502
/// (a protocol error, retried like a reset); the filter never sees a response and stays well:
/// the first request after the provider recovers gets a 200.
#[test]
fn a_provider_answering_garbage_bytes_gets_502_and_the_filter_works_after() {
    let (replies, after, envoy, mock) = through_a_fault("garbage", "garbage");
    let t0 = replies.iter().map(|r| r.sent).min().unwrap();
    let summary: Vec<String> = replies.iter().map(|r| r.summary(t0)).collect();
    eprintln!("what the clients got: {summary:#?}");
    assert_eq!(statuses(&replies), [502; 3], "{summary:#?}");
    for r in &replies {
        let body = &r.reply.as_ref().unwrap().body;
        assert_eq!(
            body,
            "upstream connect error or disconnect/reset before headers. retried and the latest reset reason: protocol error"
        );
    }
    // Envoy retries a protocol error like a reset: 1 attempt + 4 retries for each of the 3.
    assert_eq!(mock.counter("faults"), 15);
    assert_eq!(after.status, 200, "{after:?}");
    assert_eq!(depths(&envoy, "garbage"), [0, 0, 0, 0]);
    assert_no_vm_failure(&envoy.log());
}

/// The user sees: a provider whose 429s carry nonsense in every rate-limit header (`retry-after:
/// soon`, `1e999s`, `NaN`, bad dates, bytes that are not UTF-8) and a body that is not JSON nor
/// UTF-8 still gets each client a 429 whose `Retry-After` and `retry-after-ms` are the filter's,
/// well-formed, in place of the provider's garbage one: the provider's own 429 (its body as it
/// was), or the filter's once the breaker guards the provider (the provider said nothing
/// readable, so its back-off doubles per failed probe, up to `max_backoff_ms`, and retries wait
/// for each probe's answer instead of going beside it). Nothing crashes, and once the provider
/// answers normally requests get 200 again.
#[test]
fn garbage_rate_limit_headers_and_bodies_get_a_clean_429_and_the_filter_recovers() {
    let mock = Mock::start(&["--fault", "bad_limits"]);
    let config = r#"{"name":"badlimits","bucket":{"capacity":1,"refill_rate":5,"burst_allowance":0},
        "priorities":{"NORMAL":{"max_wait_ms":2000}},"provider":{"max_backoff_ms":4000}}"#;
    let envoy = Envoy::start(config, 2, mock.port);
    let url = envoy.url("/v1/chat/completions");
    let replies: Vec<Raw> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..3).map(|_| s.spawn(|| chat_raw(&url))).collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for r in &replies {
        eprintln!("what the client got: {} after {} ms, retry-after {:?}", r.status, r.ms, r.header("retry-after"));
        assert_eq!(r.status, 429, "{r:?}");
        assert!(r.ms < 20_000, "answered after {} ms", r.ms);
        let secs: u64 = r.header("retry-after").and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("{r:?}"));
        let ms: u64 = r.header("retry-after-ms").and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("{r:?}"));
        assert!((1..=60).contains(&secs) && (1..=60_000).contains(&ms), "{r:?}");
        match r.header("x-llm-ratelimit-source") {
            // The provider's own body goes through as it was.
            Some("provider") => assert!(r.body.starts_with(b"{\"error\": {\"code\": 429"), "{r:?}"),
            // Refused while the breaker is open, or after waiting for it as long as NORMAL may.
            Some("proxy") => {
                assert!(matches!(r.header("x-llm-ratelimit-reason"), Some("breaker_open" | "expired")), "{r:?}")
            }
            other => panic!("source {other:?}: {r:?}"),
        }
    }
    // At most 1 attempt + 4 retries each, and never a retry beside a probe: fewer in practice.
    let attempts = mock.counter("faults");
    assert!((3..=15).contains(&attempts), "{attempts} attempts reached the provider");
    set_mock(&mock, r#"{"fault": "none"}"#);
    let mut last = None;
    let recovered = eventually(Duration::from_secs(10), || {
        let r = chat_raw(&url);
        let ok = r.status == 200;
        last = Some(r);
        ok
    });
    assert!(recovered, "no 200 within 10 s of the provider recovering: {last:?}");
    assert_eq!(depths(&envoy, "badlimits"), [0, 0, 0, 0]);
    assert_no_vm_failure(&envoy.log());
}

/// Envoy with its listener from `<dir>/lds/lds.yaml` (LDS from a file), the filter configured
/// with `config`; returns Envoy, the LDS directory, and how to render a listener for a config.
fn lds_envoy(config: &str, upstream: u16, extra: &[&str]) -> (Envoy, std::path::PathBuf, impl Fn(&str) -> String) {
    let dir = TempDir::new();
    let lds_dir = dir.0.join("lds");
    std::fs::create_dir_all(&lds_dir).unwrap();
    let (port, admin) = (free_port(), free_port());
    let wasm = wasm_path();
    let ld = lds_dir.clone();
    let listener = move |config: &str| lds_split(&render_config(config, port, admin, upstream, &wasm), &ld).1;
    let (bootstrap, lds) = lds_split(&render_config(config, port, admin, upstream, &wasm_path()), &lds_dir);
    std::fs::write(lds_dir.join("lds.yaml"), lds).unwrap();
    let envoy = Envoy::spawn_file(dir, &bootstrap, port, admin, 0, &[&["--disable-hot-restart"], extra].concat())
        .unwrap_or_else(|log| panic!("Envoy did not start:\n{log}"));
    (envoy, lds_dir, listener)
}

fn lds_counter(envoy: &Envoy, name: &str) -> u64 {
    envoy.stats().get(&format!("listener_manager.lds.{name}")).copied().unwrap_or(0)
}

/// Pushes `listener` through the watched LDS file and waits until Envoy counts it in `outcome`
/// (`update_success` or `update_rejected`).
fn push_listener(envoy: &Envoy, lds_dir: &Path, listener: &str, outcome: &str) -> bool {
    let before = lds_counter(envoy, outcome);
    replace_file(lds_dir, "lds.yaml", listener);
    eventually(Duration::from_secs(10), || lds_counter(envoy, outcome) > before)
}

/// Requests that reached `provider`'s NORMAL admission so far: admitted at once, queued, refused.
fn arrivals(envoy: &Envoy, provider: &str) -> u64 {
    let stat = |name: &str| envoy.stat(provider, &format!("priority.normal.{name}"));
    (stat("admitted") + stat("queued") + stat("rejected")).saturating_sub(stat("released"))
}

/// Requests `n` chats from `n` threads, waits until all have reached the filter, and returns
/// their handles with how many wait in the queue then (at least one: the tests need waiters; on a
/// loaded machine a slow arrival may find a refilled token and go at once).
fn start_waiters<'s>(
    s: &'s std::thread::Scope<'s, '_>,
    n: usize,
    url: &'s str,
    envoy: &Envoy,
    provider: &str,
) -> (Vec<std::thread::ScopedJoinHandle<'s, Timed>>, u64) {
    let before = arrivals(envoy, provider);
    let hs: Vec<_> = (0..n).map(|_| s.spawn(move || timed_chat(Duration::from_secs(60), url, &[]))).collect();
    let arrived = eventually(Duration::from_secs(15), || arrivals(envoy, provider) >= before + n as u64);
    assert!(arrived, "{} of {n} requests reached the filter", arrivals(envoy, provider) - before);
    let waiting = depths(envoy, provider)[2];
    assert!(waiting >= 1, "no request waits in the queue");
    (hs, waiting)
}

const SLOW_BUCKET: &str = r#"{"name":"reload","bucket":{"capacity":1,"refill_rate":0.5,"burst_allowance":0},
    "priorities":{"NORMAL":{"max_wait_ms":20000}}}"#;
const FAST_BUCKET: &str = r#"{"name":"reload","bucket":{"capacity":5,"refill_rate":5,"burst_allowance":0},
    "priorities":{"NORMAL":{"max_wait_ms":20000}}}"#;

/// The user sees, when the filter's configuration is replaced (LDS from a file, atomic rename)
/// while 4 requests wait in its queue: every waiting request gets a 200. Envoy updates the
/// listener's filter chain in place and drains the old one (`--drain-time-s`, 600 s by default):
/// the old plugin keeps ticking and releases its own waiters, under the old rules (0.5/s here),
/// while new connections get the new plugin and its limit (5/s) at once. Counts heal: the queue
/// gauges are 0 after, and new requests are admitted at the new rate, not the old one.
#[test]
fn a_reload_while_requests_wait_answers_every_waiter_and_new_requests_follow_the_new_limit() {
    let mock = Mock::start(&[]);
    let (envoy, lds_dir, listener) = lds_envoy(SLOW_BUCKET, mock.port, &[]);
    let url = envoy.url("/v1/chat/completions");
    assert_eq!(chat(&url, &[]).unwrap().status, 200);
    let t0 = epoch_ms();
    let (waiters, fresh) = std::thread::scope(|s| {
        let (hs, _) = start_waiters(s, 4, &url, &envoy, "reload");
        assert!(push_listener(&envoy, &lds_dir, &listener(FAST_BUCKET), "update_success"), "no LDS update");
        let reloaded = epoch_ms();
        // 8 new requests one after the other: at the new 5/s they take about 1.6 s, at the old
        // 0.5/s they would take 16 s.
        let fresh: Vec<Timed> = (0..8).map(|_| timed_chat(Duration::from_secs(60), &url, &[])).collect();
        let took = epoch_ms() - reloaded;
        assert!(took < 5_000, "8 new requests took {took} ms after the reload");
        (hs.into_iter().map(|h| h.join().unwrap()).collect::<Vec<_>>(), fresh)
    });
    let summary: Vec<String> = waiters.iter().chain(&fresh).map(|r| r.summary(t0)).collect();
    eprintln!("what the clients got: {summary:#?}");
    assert_eq!(statuses(&waiters), [200; 4], "{summary:#?}");
    assert_eq!(statuses(&fresh), [200; 8], "{summary:#?}");
    for r in &waiters {
        assert!(r.done - r.sent < 20_000, "waited past max_wait_ms: {summary:#?}");
    }
    let stats = envoy.stats();
    assert_eq!(stats["listener_manager.listener_in_place_updated"], 1);
    assert_eq!(stats["listener_manager.total_filter_chains_draining"], 1, "the old chain drains");
    assert_eq!(depths(&envoy, "reload"), [0, 0, 0, 0]);
    assert_eq!(mock.received(), 13);
    assert_no_vm_failure(&envoy.log());
}

/// The user sees, when Envoy's drain of the old filter chain (`--drain-time-s 2` here) ends
/// before the old plugin's waiters get their token: those clients' connections are closed with
/// no HTTP answer (Envoy ends the draining chain's connections; the filter is told only by
/// `on_done`). No other request is affected and the gauges heal. Hence the rule in
/// RELIABILITY.md: keep `--drain-time-s` above the longest `max_wait_ms`.
#[test]
fn a_drain_shorter_than_the_wait_closes_the_old_waiters_connections() {
    let mock = Mock::start(&[]);
    let (envoy, lds_dir, listener) = lds_envoy(SLOW_BUCKET, mock.port, &["--drain-time-s", "2"]);
    let url = envoy.url("/v1/chat/completions");
    assert_eq!(chat(&url, &[]).unwrap().status, 200);
    let t0 = epoch_ms();
    let (waiters, reloaded) = std::thread::scope(|s| {
        let (hs, _) = start_waiters(s, 4, &url, &envoy, "reload");
        assert!(push_listener(&envoy, &lds_dir, &listener(FAST_BUCKET), "update_success"), "no LDS update");
        let reloaded = epoch_ms();
        (hs.into_iter().map(|h| h.join().unwrap()).collect::<Vec<_>>(), reloaded)
    });
    let summary: Vec<String> = waiters.iter().map(|r| r.summary(t0)).collect();
    eprintln!("what the clients got: {summary:#?}");
    // The old plugin releases one waiter every 2 s; the drain ends 2 s after the reload.
    let answered = waiters.iter().filter(|r| r.status() == 200).count();
    let cut: Vec<&Timed> = waiters.iter().filter(|r| r.reply.is_err()).collect();
    assert_eq!(answered + cut.len(), 4, "{summary:#?}");
    assert!(!cut.is_empty(), "the drain's end cut the waiters still queued: {summary:#?}");
    for r in &cut {
        let at = r.done.saturating_sub(reloaded);
        assert!((1_500..8_000).contains(&at), "cut {at} ms after the reload, the drain is 2 s: {summary:#?}");
    }
    assert!(eventually(Duration::from_secs(3), || depths(&envoy, "reload") == [0, 0, 0, 0]));
    assert_eq!(chat(&url, &[]).unwrap().status, 200);
    assert_no_vm_failure(&envoy.log());
}

/// The user sees, for a reload that names a provider the filter has no format for
/// (`"name": "acme-llm-9"`): it is accepted, as any name is (the name is the stats label and
/// the shared-state key; `provider.style: auto` reads every header family), and the next
/// requests are counted under the new name. A reload with an unknown `provider.style` is refused:
/// the filter's `on_configure` fails, Envoy rejects the listener update (`lds.update_rejected`),
/// its log names the field (and Envoy logs the refused plugin as `Wasm VM failed Failed to
/// configure base Wasm plugin` / `Plugin ... failed to load`), and the previous configuration
/// keeps serving.
#[test]
fn a_reload_with_an_unknown_provider_is_accepted_by_name_and_refused_by_style() {
    let mock = Mock::start(&[]);
    let (envoy, lds_dir, listener) = lds_envoy(SLOW_BUCKET, mock.port, &[]);
    let url = envoy.url("/v1/chat/completions");
    assert_eq!(chat(&url, &[]).unwrap().status, 200);

    let acme = r#"{"name":"acme-llm-9","bucket":{"capacity":5,"refill_rate":5,"burst_allowance":0}}"#;
    assert!(push_listener(&envoy, &lds_dir, &listener(acme), "update_success"), "not accepted");
    assert_eq!(lds_counter(&envoy, "update_rejected"), 0);
    assert_eq!(chat(&url, &[]).unwrap().status, 200);
    assert_eq!(envoy.stat("acme-llm-9", "priority.normal.admitted"), 1);

    let bad = r#"{"name":"acme-llm-9","provider":{"style":"acme"},"bucket":{"capacity":5,"refill_rate":5}}"#;
    replace_file(&lds_dir, "lds.yaml", &listener(bad));
    assert!(eventually(Duration::from_secs(10), || lds_counter(&envoy, "update_rejected") == 1), "not refused");
    let log = envoy.log();
    assert!(
        log.contains(r#"invalid configuration: provider.style: unknown provider "acme", expected one of"#),
        "the log names the field:\n{log}"
    );
    // The accepted configuration still serves: 5 requests at once fit its bucket of 5.
    let replies = burst(&url, 5, 5, &[]);
    assert_eq!(count(&replies, 200), 5, "{replies:?}");
    assert_eq!(envoy.stat("acme-llm-9", "priority.normal.admitted"), 6);
    // Envoy reports the refused plugin as a VM that failed to configure (error and critical
    // lines); those are the only such lines: no trap, no panic, and the running VMs are fine.
    let refusal = [
        "Wasm VM failed Failed to configure base Wasm plugin",
        "Plugin llm_ratelimit failed to load",
        "Plugin configured to fail closed failed to load",
    ];
    let failures = vm_failures(&envoy.log());
    assert!(!failures.is_empty(), "Envoy said nothing of the refused plugin:\n{log}");
    for line in &failures {
        assert!(refusal.iter().any(|r| line.contains(r)), "unexpected failure line: {line}");
    }
}

/// The user sees, through Envoy's hot restart (`--restart-epoch 1`, same `--base-id`) while 6
/// requests are in flight (2 at the provider, up to 4 waiting in the filter's queue): every one gets its
/// 200 from the old epoch, which keeps its connections while it drains; new connections go to the
/// new epoch, whose filter works from its first request (a fresh bucket of its own: shared data is
/// per process; a third simultaneous request waits for a token); the old epoch exits at
/// `--parent-shutdown-time-s`.
#[test]
fn hot_restart_answers_requests_in_flight_and_the_new_epoch_serves_with_the_filter() {
    let mock = Mock::start(&["--latency-ms", "1000"]);
    let config = r#"{"name":"hot","bucket":{"capacity":2,"refill_rate":1,"burst_allowance":0},
        "priorities":{"NORMAL":{"max_wait_ms":20000}}}"#;
    let (port, admin) = (free_port(), free_port());
    let yaml = render_config(config, port, admin, mock.port, &wasm_path());
    let base_id = (std::process::id() % 40_000 + 1_000).to_string();
    let args = |epoch| {
        ["--base-id", &base_id, "--restart-epoch", epoch, "--drain-time-s", "10", "--parent-shutdown-time-s", "14"]
            .map(String::from)
    };
    let start = |epoch: u64, a: [String; 8]| {
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        Envoy::spawn_file(TempDir::new(), &yaml, port, admin, epoch, &a)
            .unwrap_or_else(|log| panic!("epoch {epoch}:\n{log}"))
    };
    let mut old = start(0, args("0"));
    let url = old.url("/v1/chat/completions");
    let t0 = epoch_ms();
    let (in_flight, new) = std::thread::scope(|s| {
        let (hs, waiting) = start_waiters(s, 6, &url, &old, "hot");
        let new = start(1, args("1"));
        (hs.into_iter().map(|h| h.join().unwrap()).collect::<Vec<_>>(), (new, waiting))
    });
    let (new, waiting) = new;
    let summary: Vec<String> = in_flight.iter().map(|r| r.summary(t0)).collect();
    eprintln!("what the clients got: {summary:#?}");
    assert_eq!(statuses(&in_flight), [200; 6], "{summary:#?}");
    let queued = in_flight.iter().filter(|r| r.header("x-ratelimit-queued-ms").is_some()).count();
    assert!(queued as u64 >= waiting, "{waiting} were waiting at the restart: {summary:#?}");

    let info = get_json(&format!("http://127.0.0.1:{admin}/server_info"));
    assert_eq!(info["command_line_options"]["restart_epoch"], 1, "the admin is the new epoch's");
    let fresh = simultaneous(3, &url, &[("x-mock-latency-ms", "0")]);
    let summary: Vec<String> = fresh.iter().map(|r| r.summary(t0)).collect();
    eprintln!("what the clients got: {summary:#?}");
    assert_eq!(statuses(&fresh), [200; 3], "{summary:#?}");
    assert_eq!(fresh.iter().filter(|r| r.header("x-ratelimit-queued-ms").is_some()).count(), 1, "{summary:#?}");
    assert!(new.log().contains(r#"configured filter "hot" (admission)"#), "{}", new.log());
    assert!(eventually(Duration::from_secs(20), || old.exited()), "the old epoch did not exit");
    assert_eq!(depths(&new, "hot"), [0, 0, 0, 0]);
    assert_eq!(mock.received(), 9);
    assert_no_vm_failure(&old.log());
    assert_no_vm_failure(&new.log());
    // Envoy killed on drop leaves its hot-restart shared memory behind (104 bytes): remove it.
    drop(new);
    let _ = std::fs::remove_file(format!("/dev/shm/envoy_shared_memory_{base_id}0"));
}
