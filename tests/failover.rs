//! `failover` in the real Envoy at `--concurrency 2`, with two mock providers: the primary's
//! quota runs out, CRITICAL and HIGH go on at the backup within the backup's own limit, LOW waits
//! for the primary's reset, and nothing reaches the exhausted primary.
//!
//! Each test prints its measured figures (`cargo test --test failover -- --nocapture`).

mod support;
use std::time::Duration;
use support::*;

const CHAT: &str = "/v1/chat/completions";

/// The primary and its "backup" target (envoy.yaml's `llm_backup` route and cluster): the backup
/// holds 2 tokens and refills 10/s, inside its provider's 10 per second.
fn config(models: &str) -> String {
    format!(
        r#"{{"name":"primary","bucket":{{"capacity":1000,"refill_rate":1000}},
        "classify":{{"header":"x-llm-priority","trust_header":true}},
        "failover":[{{"provider":{{"name":"backup","bucket":{{"capacity":2,"refill_rate":10,"burst_allowance":0}}}}{models}}}]}}"#
    )
}

/// Primary quota exhausted for ~5 s while 30 requests/s arrive for 5 s (30% HIGH, 70% LOW), the
/// backup allowing 10/s: every HIGH request is answered 200 by the backup without waiting for the
/// primary's reset, the backup never gets more than its limit, every LOW request is answered by
/// the primary after its reset, and no request reaches the primary while it is exhausted.
#[test]
fn high_fails_over_to_the_backup_within_its_limit_and_low_waits_for_the_primary() {
    const WINDOW_MS: u64 = 6000;
    const QUOTA: u64 = 200;
    let primary = Mock::start(&["--quota", "200", "--window-ms", "6000"]);
    let backup = Mock::start(&["--quota", "10", "--window-ms", "1000"]);
    let envoy = Envoy::start_with_backup(&config(""), 2, primary.port, backup.port);
    let url = envoy.url(CHAT);
    // Use up the primary's window: all but one request straight at it, the last through Envoy,
    // whose answer says 0 left until the reset.
    let reset_at = primary.restart_window_at_phase(WINDOW_MS, 0);
    for _ in 0..QUOTA - 1 {
        assert_eq!(chat(&primary.url(CHAT), &[]).unwrap().status, 200);
    }
    let last = chat(&url, &[]).unwrap();
    assert_eq!(last.header("x-ratelimit-remaining-requests"), Some("0"), "{last:?}");
    assert_eq!(last.header("x-llm-ratelimit-provider"), None, "the primary answered");
    let exhausted = primary.received();
    let t0 = epoch_ms();
    println!("primary exhausted {} ms before its reset", reset_at.saturating_sub(t0));
    assert!(reset_at > t0 + 3000, "the primary's reset is too close to measure a hold");

    // 30/s for 5 s (or until the reset, if sooner), 3 in 10 HIGH, spread out (9/s).
    let n = (reset_at - t0).min(5000) as usize * 30 / 1000;
    let replies: Vec<(bool, Timed)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..n)
            .map(|i| {
                let url = &url;
                s.spawn(move || {
                    let high = i % 10 % 3 == 0 && i % 10 < 9;
                    std::thread::sleep(Duration::from_millis(i as u64 * 1000 / 30));
                    let class = if high { "HIGH" } else { "LOW" };
                    (high, timed_chat(Duration::from_secs(30), url, &[("x-llm-priority", class)]))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("client")).collect()
    });
    let (high, low): (Vec<_>, Vec<_>) = replies.into_iter().partition(|(h, _)| *h);
    // Only a target's answers say who answered.
    let provider = |t: &Timed| t.header("x-llm-ratelimit-provider").unwrap_or("primary").to_string();
    let high_ok = high.iter().filter(|(_, t)| t.status() == 200 && provider(t) == "backup").count();
    let high_slowest = high.iter().map(|(_, t)| t.done - t.sent).max().unwrap_or(0);
    let low_ok = low.iter().filter(|(_, t)| t.status() == 200 && provider(t) == "primary").count();
    let low_early = low.iter().filter(|(_, t)| t.done + 50 < reset_at).count();
    let backup_stats = backup.stats();
    println!(
        "{n} requests: HIGH {}/{} answered 200 by the backup (slowest {high_slowest} ms); LOW {}/{} answered 200 by \
         the primary, {low_early} before its reset; backup received {} (429s: {}), primary {} during the hold",
        high_ok,
        high.len(),
        low_ok,
        low.len(),
        backup_stats["requests"],
        backup_stats["rate_limited"],
        primary.received() - exhausted - low_ok as u64,
    );
    let statuses = |v: &[(bool, Timed)]| v.iter().map(|(_, t)| (t.status(), provider(t))).collect::<Vec<_>>();
    assert_eq!(high_ok, high.len(), "HIGH: {:?}", statuses(&high));
    assert!(high_slowest < 1500, "a HIGH request took {high_slowest} ms: it waited for the primary");
    assert_eq!(backup_stats["rate_limited"], 0, "the backup was sent more than its limit");
    assert_eq!(low_ok, low.len(), "LOW: {:?}", statuses(&low));
    assert_eq!(low_early, 0, "LOW answered before the primary's reset");
    assert_eq!(primary.counter("rate_limited"), 0, "the exhausted primary was sent requests");
    assert_eq!(
        primary.received(),
        exhausted + low.len() as u64,
        "the primary got something other than LOW after its reset"
    );
    assert_eq!(envoy.stat("primary", "priority.high.failover"), high.len() as u64);
    assert_eq!(envoy.stat("primary", "failover.backup.sent"), high.len() as u64);
    assert_eq!(envoy.stat("primary", "priority.low.failover"), 0);
}

/// `n` HIGH chat requests at once over one HTTP/2 connection, each ending with request trailers:
/// (status, provider, model answered) of each.
fn h2_high(port: u16, n: usize) -> Vec<(u64, String, String)> {
    h2_chats(port, n, 1, &["x-llm-priority:HIGH"], 20.0)
        .iter()
        .map(|r| {
            let body: serde_json::Value =
                r["body"].as_str().and_then(|b| serde_json::from_str(b).ok()).unwrap_or_default();
            (
                r["status"].as_u64().unwrap_or(0),
                r["headers"]["x-llm-ratelimit-provider"].as_str().unwrap_or("none").to_string(),
                body["model"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

/// With token limits the body is held: a request that fails over is sent with the backup's name
/// for its model, over HTTP/1.1 and over HTTP/2 with request trailers; what the backup's own
/// bucket cannot take at once is counted refused and stays with the primary (here refused: HIGH
/// may wait 500 ms, the primary's reset is seconds away).
#[test]
fn a_failed_over_request_carries_the_backups_model_and_a_full_backup_leaves_it_with_the_primary() {
    let primary = Mock::start(&["--quota", "1", "--window-ms", "10000"]);
    let backup = Mock::start(&[]);
    let cfg = config(r#","models":{"gpt-4o-mini":"backup-mini"}"#).replace(
        r#""classify""#,
        r#""tokens":{"capacity":100000},"priorities":{"HIGH":{"max_wait_ms":500}},"classify""#,
    );
    let envoy = Envoy::start_with_backup(&cfg, 2, primary.port, backup.port);
    let url = envoy.url(CHAT);
    primary.restart_window_at_phase(10_000, 0);
    let first = chat(&url, &[("x-llm-priority", "HIGH")]).unwrap();
    assert_eq!(first.header("x-llm-ratelimit-provider"), None, "the primary answered");
    // The primary's quota is gone: three HIGH at once; the backup's bucket holds 2.
    let replies = simultaneous(3, &url, &[("x-llm-priority", "HIGH")]);
    let seen: Vec<(u16, Option<String>)> =
        replies.iter().map(|t| (t.status(), t.header("x-llm-ratelimit-provider").map(str::to_string))).collect();
    println!("HTTP/1.1, 3 HIGH at once: {seen:?}");
    let backups: Vec<&Timed> =
        replies.iter().filter(|t| t.header("x-llm-ratelimit-provider") == Some("backup")).collect();
    assert_eq!(backups.len(), 2, "{seen:?}");
    for t in &backups {
        assert_eq!(t.status(), 200);
        let body: serde_json::Value = serde_json::from_str(&t.reply.as_ref().unwrap().body).unwrap();
        assert_eq!(body["model"], "backup-mini", "{body}");
    }
    let third: Vec<&Timed> = replies.iter().filter(|t| t.status() == 429).collect();
    assert_eq!(third.len(), 1, "{seen:?}");
    assert_eq!(third[0].header("x-llm-ratelimit-source"), Some("proxy"));
    assert_eq!(envoy.stat("primary", "failover.backup.refused"), 1);
    // HTTP/2, the bodies ending with trailers: the backup's bucket has refilled.
    std::thread::sleep(Duration::from_millis(400));
    let h2 = h2_high(envoy.port, 2);
    println!("HTTP/2 with trailers, 2 HIGH at once: {h2:?}");
    assert!(
        h2.iter().all(|(status, provider, model)| *status == 200 && provider == "backup" && model == "backup-mini"),
        "{h2:?}"
    );
    assert_eq!(primary.received(), 1, "the held primary was sent more than the first request");
}

/// A request that failed over and meets a 429 at the backup (whose quota the filter did not know
/// was spent) is told the sooner of the two resets: here the primary's, seconds before the
/// backup's.
#[test]
fn a_429_from_the_backup_says_the_sooner_of_the_two_resets() {
    let primary = Mock::start(&["--quota", "1", "--window-ms", "4000"]);
    let backup = Mock::start(&["--quota", "1", "--window-ms", "30000"]);
    // HIGH may wait 500 ms, at the primary and at the backup (whose observer holds router
    // retries by its own configuration).
    let high = r#""priorities":{"HIGH":{"max_wait_ms":500}}"#;
    let cfg = config("")
        .replace(r#""classify""#, &format!(r#"{high},"classify""#))
        .replace(r#""burst_allowance":0}"#, &format!(r#""burst_allowance":0}},{high}"#));
    let envoy = Envoy::start_with_backup(&cfg, 2, primary.port, backup.port);
    let url = envoy.url(CHAT);
    let primary_reset = primary.restart_window_at_phase(4000, 0);
    backup.restart_window_at_phase(30_000, 0);
    // The backup's one request is spent behind the filter's back; the primary's through it.
    assert_eq!(chat(&backup.url(CHAT), &[]).unwrap().status, 200);
    assert_eq!(chat(&url, &[]).unwrap().status, 200);
    let sent = epoch_ms();
    let r = chat(&url, &[("x-llm-priority", "HIGH")]).unwrap();
    let told: u64 = r.header("retry-after-ms").and_then(|v| v.parse().ok()).unwrap_or(u64::MAX);
    println!(
        "HIGH at the spent backup: {} from {:?}, retry-after-ms {told} (primary resets in {} ms, the backup in ~30 s)",
        r.status,
        r.header("x-llm-ratelimit-provider"),
        primary_reset.saturating_sub(sent)
    );
    assert_eq!(r.status, 429, "{r:?}");
    assert_eq!(r.header("x-llm-ratelimit-provider"), Some("backup"));
    let to_primary = primary_reset.saturating_sub(sent);
    assert!(
        told <= to_primary + 500 && told + 1500 >= to_primary,
        "told {told} ms, the primary resets in {to_primary} ms"
    );
}
