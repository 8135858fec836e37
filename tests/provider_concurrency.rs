//! Issue 8: many requests in flight when a provider's quota runs out, at `--concurrency 2`.
//!
//! - In-flight 429s of one exhausted window are one breaker trip, not one each with a doubling
//!   back-off; every client is told the provider's own reset; clients that may wait are served
//!   right after it; nothing else reaches the exhausted provider. In every timing style.
//! - A short-window quota reported on every answer is used in full every window.
//! - Nothing strands a waiter: a client that leaves, a deadline that passes while held, a slow
//!   probe after the reset.
//!
//! Each test prints its measured figures (`cargo test ... -- --nocapture`).

mod support;
use std::time::Duration;
use support::*;

/// The exhausted window: `QUOTA` requests per `WINDOW_MS`, restarted so that its reset falls at
/// `.PHASE_MS` of a wall-clock second (whole-second styles are then off by ~0.1 s, not ~1 s).
const WINDOW_MS: u64 = 4000;
const PHASE_MS: u64 = 900;
const QUOTA: u64 = 12;
/// Requests that meet the exhausted window at once, and clients that come later, during the hold.
const BURST: usize = 8;
const LATER: usize = 4;
/// Tokens the mock counts for one `chat()` request ("hi": 1 prompt token + 16 completion).
const TOKENS_PER_REQUEST: u64 = 17;
/// "Within 1 s of the reset": `retry-after-ms` lands within this of it; whole-second
/// `retry-after` (rounded up, so up to 1 s late by design) within [-250, 1000 + 250] ms.
const TOLERANCE_MS: i64 = 1000;
const SECS_SLACK_MS: i64 = 250;

const CHAT: &str = "/v1/chat/completions";

/// Mock flags for each style. `groq-tokens` is Groq: requests counted per day with plenty left,
/// the per-window token budget (`QUOTA` requests' worth) is the dimension that runs out.
fn mock_args(style: &str) -> Vec<String> {
    let (quota, window) = (QUOTA.to_string(), WINDOW_MS.to_string());
    let args: Vec<&str> = match style {
        "groq-tokens" => {
            return [
                "--style",
                "groq",
                "--quota",
                "14400",
                "--request-window-ms",
                "86400000",
                "--token-quota",
                &(QUOTA * TOKENS_PER_REQUEST).to_string(),
                "--window-ms",
                &window,
            ]
            .map(String::from)
            .to_vec()
        }
        s => vec!["--style", s, "--quota", &quota, "--window-ms", &window],
    };
    args.into_iter().map(String::from).collect()
}

/// Signed error (ms) of when a client told by `t` would come back, against `reset`:
/// (`retry-after-ms`, `retry-after` seconds), from when it got the answer.
fn retry_errors(t: &Timed, reset: u64) -> (Option<i64>, Option<i64>) {
    let num = |h: &str| t.header(h).and_then(|v| v.trim().parse::<i64>().ok());
    let at = |ms: i64| t.done as i64 + ms - reset as i64;
    (num("retry-after-ms").map(at), num("retry-after").map(|s| at(s * 1000)))
}

/// Checks every 429 in `replies` against the reset; returns the worst errors (ms, secs).
fn check_retry_afters(replies: &[&Timed], reset: u64, t0: u64, problems: &mut Vec<String>) -> (i64, i64) {
    let (mut worst_ms, mut worst_s) = (0i64, 0i64);
    for t in replies.iter().filter(|t| t.status() == 429) {
        let (ms, s) = retry_errors(t, reset);
        match ms {
            Some(e) if e.abs() <= TOLERANCE_MS => {}
            _ => problems.push(format!("retry-after-ms {ms:?} ms off the reset: {}", t.summary(t0))),
        }
        match s {
            Some(e) if (-SECS_SLACK_MS..=TOLERANCE_MS + SECS_SLACK_MS).contains(&e) => {}
            _ => problems.push(format!("Retry-After {s:?} ms off the reset: {}", t.summary(t0))),
        }
        worst_ms = worst_ms.max(ms.map_or(i64::MAX, i64::abs));
        worst_s = worst_s.max(s.map_or(i64::MAX, i64::abs));
    }
    (worst_ms, worst_s)
}

/// Every "breaker open for N s" the filter logged.
fn breaker_open_secs(envoy: &Envoy) -> Vec<u64> {
    envoy
        .log()
        .split("breaker open for ")
        .skip(1)
        .filter_map(|rest| rest.split_whitespace().next().and_then(|n| n.parse().ok()))
        .collect()
}

/// The breaker trips at most once for the window, and never claims more than ~5 s.
fn check_breaker(envoy: &Envoy, provider: &str, problems: &mut Vec<String>) -> (u64, Vec<u64>) {
    let trips = envoy.stat(provider, "breaker.trips");
    let open = breaker_open_secs(envoy);
    if trips > 1 {
        problems.push(format!("the breaker tripped {trips} times for one exhausted window"));
    }
    if open.iter().any(|&s| s > 5) {
        problems.push(format!("the filter logged \"breaker open for\" {open:?} s; the reset was <= 4 s away"));
    }
    (trips, open)
}

/// What happened when `BURST` requests met a nearly used-up window and `LATER` more came during
/// the hold.
struct Exhausted {
    mock: Mock,
    envoy: Envoy,
    /// The window's reset (epoch ms) and when the burst was sent.
    reset: u64,
    t0: u64,
    burst: Vec<Timed>,
    later: Vec<Timed>,
    /// Provider 429s one second after the burst (the first wave), and requests it had received
    /// before the later clients came.
    limited_after_wave: u64,
    received_before_later: u64,
}

fn exhausted_window(style: &str, config: &str) -> Exhausted {
    let args = mock_args(style);
    let mock = Mock::start(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let envoy = Envoy::start(config, 2, mock.port);
    let url = envoy.url(CHAT);
    let reset = mock.restart_window_at_phase(WINDOW_MS, PHASE_MS);
    // Another client of the same account spends all but one request of the window.
    for _ in 1..QUOTA {
        assert_eq!(chat(&mock.url(CHAT), &[]).unwrap().status, 200, "{style}: the mock's quota");
    }
    let t0 = epoch_ms();
    assert!((3000..=4000).contains(&(reset - t0)), "{style}: the reset is {} ms ahead", reset - t0);
    let sleep_until = |t: u64| std::thread::sleep(Duration::from_millis(t.saturating_sub(epoch_ms())));
    let (burst, later, limited_after_wave, received_before_later) = std::thread::scope(|s| {
        // 50 ms at the provider before it answers: all of them are in flight when it runs out.
        let burst = s.spawn(|| simultaneous(BURST, &url, &[("x-mock-latency-ms", "50")]));
        sleep_until(t0 + 1000);
        let limited_after_wave = mock.counter("rate_limited");
        let received_before_later = mock.received();
        let later = simultaneous(LATER, &url, &[]);
        (burst.join().expect("burst"), later, limited_after_wave, received_before_later)
    });
    Exhausted { mock, envoy, reset, t0, burst, later, limited_after_wave, received_before_later }
}

impl Exhausted {
    fn all(&self) -> Vec<&Timed> {
        self.burst.iter().chain(&self.later).collect()
    }

    fn summary(&self) -> Vec<String> {
        self.all().iter().map(|t| t.summary(self.t0)).collect()
    }

    /// At most the requests in flight got the provider's 429, and none after the first wave.
    fn check_provider_429s(&self, style: &str, problems: &mut Vec<String>) -> u64 {
        let limited = self.mock.counter("rate_limited");
        if limited > BURST as u64 {
            problems
                .push(format!("{limited} requests got the exhausted provider's 429 (at most {BURST} were in flight)"));
        }
        if limited > self.limited_after_wave {
            problems.push(format!(
                "{} 429s reached the provider after the first wave ({} within 1 s of the burst, {limited} in all)",
                limited - self.limited_after_wave,
                self.limited_after_wave
            ));
        }
        println!("{style}: provider 429s {limited} ({} in the first second)", self.limited_after_wave);
        limited
    }
}

/// Requests may wait (default `max_wait_ms` 30 s): all of them are served, within 1 s after the
/// reset, and only the first wave ever meets the provider's 429.
fn waiting_clients_are_served_at_the_reset(style: &str) {
    let run = exhausted_window(style, r#"{"name":"pc"}"#);
    let mut problems = Vec::new();
    let all = run.all();
    let (worst_ms, worst_s) = check_retry_afters(&all, run.reset, run.t0, &mut problems);
    for t in &all {
        if t.status() != 200 {
            problems.push(format!("a client that may wait 30 s was not served: {}", t.summary(run.t0)));
        } else if t.done > run.reset.max(t.sent) + 1000 {
            problems.push(format!(
                "served {} ms after the reset (more than 1 s): {}",
                t.done as i64 - run.reset as i64,
                t.summary(run.t0)
            ));
        }
    }
    let limited = run.check_provider_429s(style, &mut problems);
    let (trips, open) = check_breaker(&run.envoy, "pc", &mut problems);
    let last = all.iter().map(|t| t.done as i64 - run.reset as i64).max().unwrap_or(0);
    let envoy_stats = run.envoy.stats();
    let cluster = |s: &str| envoy_stats.get(&format!("cluster.llm_provider.{s}")).copied().unwrap_or(0);
    println!(
        "{style} (wait): served {}/{}, last answer {last} ms after the reset, provider 429s {limited}, \
         breaker trips {trips}, logged open for {open:?} s, worst Retry-After error ms {worst_ms} / s {worst_s}; \
         router retries {} (overflow {}, rate-limited back-off {})",
        all.iter().filter(|t| t.status() == 200).count(),
        all.len(),
        cluster("upstream_rq_retry"),
        cluster("upstream_rq_retry_overflow"),
        cluster("upstream_rq_retry_backoff_ratelimited"),
    );
    assert!(problems.is_empty(), "{style}: {problems:#?}\nreplies: {:#?}", run.summary());
}

/// Requests may not wait (NORMAL `max_wait_ms` 300, no router retries): every 429 any client
/// sees, the provider's passed through (even the first, even Gemini's body-only timing) or the
/// filter's own, tells the provider's reset within 1 s; later clients never reach the provider.
fn clients_that_cannot_wait_are_told_the_reset(style: &str) {
    let config = r#"{"name":"pc","priorities":{"NORMAL":{"max_wait_ms":300,"max_retries":0}}}"#;
    let run = exhausted_window(style, config);
    let mut problems = Vec::new();
    let all = run.all();
    let (worst_ms, worst_s) = check_retry_afters(&all, run.reset, run.t0, &mut problems);
    let limited_replies = all.iter().filter(|t| t.status() == 429).count();
    if count_status(&run.burst, 200) != 1 || limited_replies != BURST + LATER - 1 {
        problems.push(format!("expected one success (the window's last request) and {} 429s", BURST + LATER - 1));
    }
    let provider_429s: Vec<_> =
        run.burst.iter().filter(|t| t.header("x-llm-ratelimit-source") == Some("provider")).collect();
    let first_provider_429 = provider_429s.iter().min_by_key(|t| t.done).map(|t| retry_errors(t, run.reset));
    for t in &run.later {
        let reason = t.header("x-llm-ratelimit-reason");
        if t.status() != 429 || !matches!(reason, Some("provider_hold" | "breaker_open")) {
            problems.push(format!("a later client was not refused by the hold: {}", t.summary(run.t0)));
        }
    }
    let received = run.mock.received();
    if received > run.received_before_later {
        problems
            .push(format!("{} later requests reached the exhausted provider", received - run.received_before_later));
    }
    let limited = run.check_provider_429s(style, &mut problems);
    let (trips, open) = check_breaker(&run.envoy, "pc", &mut problems);
    println!(
        "{style} (no wait): {limited_replies} 429s to clients ({} passed through from the provider; the first one's \
         error ms/s {first_provider_429:?}), worst Retry-After error ms {worst_ms} / s {worst_s}, provider 429s \
         {limited}, breaker trips {trips}, logged open for {open:?} s",
        provider_429s.len()
    );
    assert!(problems.is_empty(), "{style}: {problems:#?}\nreplies: {:#?}", run.summary());
}

fn count_status(replies: &[Timed], status: u16) -> usize {
    replies.iter().filter(|t| t.status() == status).count()
}

macro_rules! every_style {
    ($($module:ident => $style:literal,)*) => {$(
        mod $module {
            #[test]
            fn in_flight_429s_are_one_trip_and_waiting_clients_are_served_at_the_reset() {
                super::waiting_clients_are_served_at_the_reset($style);
            }

            #[test]
            fn clients_that_cannot_wait_are_told_the_providers_reset() {
                super::clients_that_cannot_wait_are_told_the_reset($style);
            }
        }
    )*};
}

every_style! {
    openai_go_durations => "openai",
    azure_retry_after_ms => "azure",
    http_date_retry_after => "generic-date",
    ietf_draft10_ratelimit => "ietf",
    epoch_seconds_reset => "generic",
    epoch_milliseconds_reset => "generic-ms",
    groq_exhausted_token_dimension => "groq-tokens",
    gemini_body_only_retry_info => "gemini",
}

/// Milliseconds in a Go duration as OpenAI sends them (`845ms`, `1.5s`, `1m0s`).
fn go_ms(v: &str) -> Option<f64> {
    if let Some(ms) = v.strip_suffix("ms") {
        return ms.parse().ok();
    }
    let v = v.strip_suffix('s')?;
    let (m, s) = v.split_once('m').unwrap_or(("0", v));
    Some(m.parse::<f64>().ok()? * 60_000.0 + s.parse::<f64>().ok()? * 1000.0)
}

/// A provider allowing Q requests per short window and reporting remaining and reset on every
/// answer, under twice that demand: every window is used in full, hardly any 429 reaches the
/// provider, and every request (all may wait) is served.
#[test]
fn a_short_window_quota_is_used_in_full_every_window_under_twice_the_demand() {
    const Q: u64 = 5;
    const W: u64 = 1000;
    const SENT: u64 = 4 * 2 * Q; // 2Q per window for 4 windows
    let mock = Mock::start(&["--style", "openai", "--quota", &Q.to_string(), "--window-ms", &W.to_string()]);
    let envoy = Envoy::start(r#"{"name":"wu"}"#, 2, mock.port);
    let url = envoy.url(CHAT);
    let first_reset = mock.restart_window_at_phase(W, 0);
    let start = first_reset - W;
    let results = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for i in 0..SENT {
            let (url, results) = (&url, &results);
            std::thread::sleep(Duration::from_millis((start + i * W / (2 * Q)).saturating_sub(epoch_ms())));
            s.spawn(move || {
                let t = timed_chat(Duration::from_secs(40), url, &[]);
                results.lock().unwrap().push(t);
            });
        }
    });
    let results = results.into_inner().unwrap();
    let mut problems = Vec::new();
    // Which provider window served each success: from the reset it reported.
    let mut per_window = std::collections::BTreeMap::<u64, u64>::new();
    for t in &results {
        match (t.status(), t.header("x-ratelimit-reset-requests").and_then(go_ms)) {
            (200, Some(ms)) => {
                let end = t.done as f64 + ms;
                let window = ((end - start as f64) / W as f64).round().max(1.0) as u64 - 1;
                *per_window.entry(window).or_default() += 1;
            }
            _ => problems.push(format!("a request that may wait was not served: {}", t.summary(start))),
        }
    }
    let last = per_window.keys().copied().max().unwrap_or(0);
    let counts: Vec<u64> = (0..=last).map(|w| per_window.get(&w).copied().unwrap_or(0)).collect();
    // Every window but the last (the backlog's tail) is used: all Q, or Q - 1 for timing slack.
    for (w, &n) in counts.iter().enumerate().take(last as usize) {
        if n + 1 < Q {
            problems.push(format!("window {w} served {n} of its {Q} requests"));
        }
    }
    let windows = last + 1;
    let limited = mock.counter("rate_limited");
    if limited > 2 * windows {
        problems.push(format!("{limited} 429s reached the provider over {windows} windows (more than 2 a window)"));
    }
    let refused_60 = results.iter().filter(|t| t.status() == 429 && t.header("retry-after") == Some("60")).count();
    let trips = envoy.stat("wu", "breaker.trips");
    println!(
        "window usage: successes per {W} ms window {counts:?} (quota {Q}), served {}/{SENT}, provider 429s {limited} \
         ({:.1} a window), local 429s with Retry-After 60: {refused_60}, breaker trips {trips}",
        count_status(&results, 200),
        limited as f64 / windows as f64
    );
    let summary: Vec<String> = results.iter().map(|t| t.summary(start)).collect();
    assert!(problems.is_empty(), "{problems:#?}\nreplies: {summary:#?}");
}

const CLASSES: [&str; 4] = ["critical", "high", "normal", "low"];

fn depths(envoy: &Envoy, provider: &str) -> Vec<u64> {
    CLASSES.iter().map(|c| envoy.stat(provider, &format!("priority.{c}.queue_depth"))).collect()
}

/// Clients leave while held for the provider's reset; after the reset a newcomer is admitted at
/// once, not queued behind a phantom waiter, and the queue depths are back to 0.
#[test]
fn clients_that_leave_during_a_provider_hold_leave_no_phantom_waiter() {
    let mock = Mock::start(&["--style", "openai", "--quota", "3", "--window-ms", "3000"]);
    let envoy = Envoy::start(r#"{"name":"ph"}"#, 2, mock.port);
    let url = envoy.url(CHAT);
    let reset = mock.restart_window_at_phase(3000, 0);
    // The third success reports the quota used up: the filter holds from here to the reset.
    for _ in 0..3 {
        assert_eq!(chat(&url, &[]).unwrap().status, 200);
    }
    let leavers = std::thread::scope(|s| {
        let h: Vec<_> = (0..6).map(|_| s.spawn(|| timed_chat(Duration::from_millis(500), &url, &[]))).collect();
        h.into_iter().map(|h| h.join().unwrap()).collect::<Vec<_>>()
    });
    let mut problems = Vec::new();
    for t in &leavers {
        if t.reply.is_ok() {
            problems.push(format!("a client expected to be held for the reset was answered: {}", t.summary(reset)));
        }
    }
    let cancelled = |e: &Envoy| e.stat("ph", "priority.normal.cancelled");
    eventually(Duration::from_secs(2), || cancelled(&envoy) >= leavers.len() as u64);
    let queued_before = envoy.stat("ph", "priority.normal.queued");
    let depth_after_leaving = depths(&envoy, "ph");
    if depth_after_leaving != [0, 0, 0, 0] {
        problems.push(format!("queue depths {depth_after_leaving:?} once every waiter left"));
    }
    // After the reset, newcomers find nobody waiting.
    std::thread::sleep(Duration::from_millis((reset + 200).saturating_sub(epoch_ms())));
    let mut newcomer_ms = Vec::new();
    for _ in 0..2 {
        let t = timed_chat(Duration::from_secs(10), &url, &[]);
        newcomer_ms.push(t.done - t.sent);
        let queued_ms: u64 = t.header("x-ratelimit-queued-ms").and_then(|v| v.parse().ok()).unwrap_or(0);
        if t.status() != 200 || t.done - t.sent > 500 || queued_ms > 100 {
            problems.push(format!("a newcomer after the reset was not admitted at once: {}", t.summary(reset)));
        }
    }
    let queued_newcomers = envoy.stat("ph", "priority.normal.queued") - queued_before;
    if queued_newcomers > 0 {
        problems.push(format!("{queued_newcomers} newcomers were queued with nobody ahead of them"));
    }
    eventually(Duration::from_secs(1), || depths(&envoy, "ph") == [0, 0, 0, 0]);
    let final_depths = depths(&envoy, "ph");
    if final_depths != [0, 0, 0, 0] {
        problems.push(format!("queue depths {final_depths:?} at the end"));
    }
    if mock.received() != 3 + 2 {
        problems
            .push(format!("the provider received {} requests, expected 5 (no dead request resumed)", mock.received()));
    }
    println!(
        "phantom waiters: {} left, cancelled {}, depths after leaving {depth_after_leaving:?}, newcomers answered in \
         {newcomer_ms:?} ms, queued newcomers {queued_newcomers}",
        leavers.len(),
        cancelled(&envoy)
    );
    assert!(problems.is_empty(), "{problems:#?}");
}

/// The first request after the reset (the half-open probe, if there is one) is slow, and its
/// client leaves while it is at the provider: newcomers are not held behind that lost request
/// (for `probe_timeout_ms`, 10 s by default), they are admitted at once.
#[test]
fn a_request_whose_client_left_at_the_provider_does_not_hold_newcomers_after_the_reset() {
    let mock = Mock::start(&["--style", "openai", "--quota", &QUOTA.to_string(), "--window-ms", "3000"]);
    let envoy = Envoy::start(r#"{"name":"lp","priorities":{"LOW":{"max_retries":0}}}"#, 2, mock.port);
    let url = envoy.url(CHAT);
    let reset = mock.restart_window_at_phase(3000, PHASE_MS);
    for _ in 0..QUOTA {
        assert_eq!(chat(&mock.url(CHAT), &[]).unwrap().status, 200);
    }
    let t0 = epoch_ms();
    let mut problems = Vec::new();
    // Opens the breaker until the reset.
    let trip = timed_chat(Duration::from_secs(10), &url, &[("x-llm-priority", "LOW")]);
    if trip.status() != 429 {
        problems.push(format!("the LOW request should have met the exhausted provider: {}", trip.summary(t0)));
    }
    // Held until the reset, then 3 s at the provider; its client gives up 300 ms after the reset.
    let patience = Duration::from_millis((reset + 300).saturating_sub(epoch_ms()));
    let leaver = timed_chat(patience, &url, &[("x-mock-latency-ms", "3000")]);
    if leaver.reply.is_ok() {
        problems.push(format!("the slow request was answered before its client left: {}", leaver.summary(t0)));
    }
    std::thread::sleep(Duration::from_millis((reset + 600).saturating_sub(epoch_ms())));
    let mut newcomer_ms = Vec::new();
    for _ in 0..2 {
        let t = timed_chat(Duration::from_secs(3), &url, &[]);
        newcomer_ms.push(t.done - t.sent);
        if t.status() != 200 || t.done - t.sent > 500 {
            problems.push(format!("a newcomer after the reset was not admitted at once: {}", t.summary(t0)));
            break;
        }
    }
    eventually(Duration::from_secs(1), || depths(&envoy, "lp") == [0, 0, 0, 0]);
    let final_depths = depths(&envoy, "lp");
    if final_depths != [0, 0, 0, 0] {
        problems.push(format!("queue depths {final_depths:?} at the end"));
    }
    println!(
        "lost request after the reset: newcomers answered in {newcomer_ms:?} ms (reset at {} ms, newcomers from {} ms)",
        reset - t0,
        reset + 600 - t0
    );
    assert!(problems.is_empty(), "{problems:#?}");
}

/// Waiters queued for a token when the breaker opens until a reset beyond their `max_wait_ms`
/// are answered 429 by their deadline (+1 s), never left hanging nor sent to the provider.
#[test]
fn waiters_held_past_their_max_wait_are_answered_on_time() {
    let mock = Mock::start(&["--style", "openai", "--quota", &QUOTA.to_string(), "--window-ms", "5000"]);
    let config = r#"{"name":"ex","bucket":{"capacity":1,"refill_rate":2,"burst_allowance":0},
        "priorities":{"NORMAL":{"max_wait_ms":2000},"LOW":{"max_retries":0}}}"#;
    let envoy = Envoy::start(config, 2, mock.port);
    let url = envoy.url(CHAT);
    let reset = mock.restart_window_at_phase(5000, PHASE_MS);
    // The whole window is spent elsewhere; the filter does not know yet.
    for _ in 0..QUOTA {
        assert_eq!(chat(&mock.url(CHAT), &[]).unwrap().status, 200);
    }
    let received_before = mock.received();
    let t0 = epoch_ms();
    let (trip, waiters) = std::thread::scope(|s| {
        // Takes the bucket's only token; its 429 (300 ms later) opens the breaker to the reset.
        let trip = s.spawn(|| {
            timed_chat(Duration::from_secs(10), &url, &[("x-llm-priority", "LOW"), ("x-mock-latency-ms", "300")])
        });
        std::thread::sleep(Duration::from_millis(50));
        // These wait for tokens due in 0.5-1.5 s, within their 2 s; then the breaker holds them.
        let waiters: Vec<_> = (0..3).map(|_| s.spawn(|| timed_chat(Duration::from_secs(15), &url, &[]))).collect();
        (trip.join().unwrap(), waiters.into_iter().map(|h| h.join().unwrap()).collect::<Vec<_>>())
    });
    let mut problems = Vec::new();
    if trip.status() != 429 {
        problems.push(format!("the LOW request should have met the exhausted provider: {}", trip.summary(t0)));
    }
    let mut late_ms = Vec::new();
    for t in &waiters {
        let deadline = t.sent + 2000;
        late_ms.push(t.done as i64 - deadline as i64);
        let reason = t.header("x-llm-ratelimit-reason");
        if t.status() != 429 || !matches!(reason, Some("expired" | "breaker_open" | "provider_hold")) {
            problems.push(format!("a waiter held by the breaker was not refused: {}", t.summary(t0)));
        }
        if t.done > deadline + 1000 {
            problems.push(format!("answered {} ms after its deadline: {}", t.done - deadline, t.summary(t0)));
        }
    }
    let (worst_ms, worst_s) = check_retry_afters(&waiters.iter().collect::<Vec<_>>(), reset, t0, &mut problems);
    let reached = mock.received() - received_before;
    if reached > 1 {
        problems.push(format!("{reached} requests reached the exhausted provider (only the LOW one should)"));
    }
    eventually(Duration::from_secs(1), || depths(&envoy, "ex") == [0, 0, 0, 0]);
    let final_depths = depths(&envoy, "ex");
    if final_depths != [0, 0, 0, 0] {
        problems.push(format!("queue depths {final_depths:?} at the end"));
    }
    println!(
        "expiry while held: waiters answered {late_ms:?} ms after their deadlines, reasons {:?}, Retry-After error ms \
         {worst_ms} / s {worst_s}, requests at the provider {reached}",
        waiters.iter().map(|t| t.header("x-llm-ratelimit-reason").unwrap_or("-")).collect::<Vec<_>>()
    );
    assert!(problems.is_empty(), "{problems:#?}\ntrip: {}\nwaiters: {:#?}", trip.summary(t0), {
        waiters.iter().map(|t| t.summary(t0)).collect::<Vec<_>>()
    });
}

/// Waiters held by the breaker until the provider's reset are released within ~1 s of it, even
/// when the first request after the reset (a half-open probe, if any) is slow.
#[test]
fn held_waiters_are_released_at_the_reset_not_after_a_slow_probe() {
    const WAITERS: u64 = 4;
    const LATENCY_MS: &str = "2000";
    let mock =
        Mock::start(&["--style", "openai", "--quota", &QUOTA.to_string(), "--window-ms", &WINDOW_MS.to_string()]);
    let config = r#"{"name":"pr","priorities":{"LOW":{"max_retries":0}}}"#;
    let envoy = Envoy::start(config, 2, mock.port);
    let url = envoy.url(CHAT);
    let reset = mock.restart_window_at_phase(WINDOW_MS, PHASE_MS);
    for _ in 0..QUOTA {
        assert_eq!(chat(&mock.url(CHAT), &[]).unwrap().status, 200);
    }
    let t0 = epoch_ms();
    // Opens the breaker until the reset.
    let trip = timed_chat(Duration::from_secs(10), &url, &[("x-llm-priority", "LOW")]);
    let received_before = mock.received();
    let mut first_release = None;
    let mut all_released = None;
    let waiters = std::thread::scope(|s| {
        let h: Vec<_> = (0..WAITERS)
            .map(|_| s.spawn(|| timed_chat(Duration::from_secs(20), &url, &[("x-mock-latency-ms", LATENCY_MS)])))
            .collect();
        // Watch the provider: when do the held requests arrive there?
        let deadline = reset + 6000;
        while epoch_ms() < deadline && all_released.is_none() {
            let arrived = mock.received() - received_before;
            let now = epoch_ms() as i64 - reset as i64;
            if arrived >= 1 && first_release.is_none() {
                first_release = Some(now);
            }
            if arrived >= WAITERS {
                all_released = Some(now);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        h.into_iter().map(|h| h.join().unwrap()).collect::<Vec<_>>()
    });
    let mut problems = Vec::new();
    if trip.status() != 429 || envoy.stat("pr", "breaker.trips") != 1 {
        problems.push(format!("the LOW request should have opened the breaker: {}", trip.summary(t0)));
    }
    match first_release {
        Some(ms) if ms >= -100 => {}
        other => problems.push(format!("first held request reached the provider at {other:?} ms from the reset")),
    }
    match all_released {
        Some(ms) if ms <= 1000 => {}
        other => problems.push(format!(
            "all {WAITERS} held requests reached the provider only at {other:?} ms after the reset (more than 1 s)"
        )),
    }
    for t in &waiters {
        if t.status() != 200 {
            problems.push(format!("a held request was not served: {}", t.summary(t0)));
        }
    }
    println!(
        "release after the reset (probe latency {LATENCY_MS} ms): first held request at the provider {first_release:?} \
         ms after the reset, all {WAITERS} at {all_released:?} ms; served {}/{WAITERS}",
        count_status(&waiters, 200)
    );
    let summary: Vec<String> = waiters.iter().map(|t| t.summary(t0)).collect();
    assert!(problems.is_empty(), "{problems:#?}\nreset at {} ms; waiters: {summary:#?}", reset - t0);
}
