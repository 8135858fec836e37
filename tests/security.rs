//! The security review's tests (SECURITY.md lists the threats): end to end in the real Envoy,
//! plus the configuration parser called directly.
//!
//! 1. A client cannot promote itself with any spelling of the priority header.
//! 2. Rotating tenant keys cannot mint tokens, and Envoy's memory stays bounded.
//! 3. Credentials never reach Envoy's log, its stats or the filter's alerts.
//! 4. A hostile configuration is refused, naming the field, without a crash.

mod support;
use llm_ratelimit::config::Config;
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::*;

// ---------------------------------------------------------------------------------------------
// Raw HTTP/1.1: ureq refuses some of the header values a hostile client sends, so these requests
// are written byte for byte.

/// A raw response: status and lower-cased headers.
struct Raw {
    status: u16,
    headers: HashMap<String, String>,
}

/// POSTs a small chat completion to `port` with `extra` header lines (raw bytes, no CRLF).
fn raw_chat(port: u16, extra: &[Vec<u8>]) -> Raw {
    let body = br#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}"#;
    let mut req = Vec::new();
    req.extend_from_slice(b"POST /v1/chat/completions HTTP/1.1\r\nhost: test\r\ncontent-type: application/json\r\n");
    req.extend_from_slice(format!("content-length: {}\r\nconnection: close\r\n", body.len()).as_bytes());
    for line in extra {
        req.extend_from_slice(line);
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"\r\n");
    req.extend_from_slice(body);
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect to Envoy");
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(&req).expect("send");
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out);
    let head = text.split("\r\n\r\n").next().unwrap_or("");
    let mut lines = head.lines();
    let status = lines.next().and_then(|l| l.split(' ').nth(1)).and_then(|c| c.parse().ok()).unwrap_or(0);
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Raw { status, headers }
}

fn prio(value: &str) -> Vec<u8> {
    let mut l = b"x-llm-priority: ".to_vec();
    l.extend_from_slice(value.as_bytes());
    l
}

/// Every spelling a client might try to promote itself with, as raw header lines.
fn spoofs() -> Vec<(String, Vec<Vec<u8>>)> {
    let one = |label: &str, v: &str| (label.to_string(), vec![prio(v)]);
    vec![
        one("upper", "CRITICAL"),
        one("high", "HIGH"),
        one("lower", "critical"),
        one("mixed case", "CrItIcAl"),
        one("mixed high", "hIgH"),
        one("spaces", "   CRITICAL   "),
        one("tabs", "\tCRITICAL\t"),
        one("comma list", "CRITICAL, CRITICAL"),
        one("cyrillic Es", "\u{0421}RITICAL"),
        one("fullwidth", "\u{FF23}\u{FF32}\u{FF29}\u{FF34}\u{FF29}\u{FF23}\u{FF21}\u{FF2C}"),
        one("dotted I", "CR\u{0130}T\u{0130}CAL"),
        one("zero width", "CRITICAL\u{200B}"),
        one("nbsp", "\u{00A0}CRITICAL\u{00A0}"),
        one("empty", ""),
        one("long", &"CRITICAL".repeat(4096)),
        ("header name case".into(), vec![b"X-LLM-Priority: CRITICAL".to_vec()]),
        ("repeated".into(), vec![prio("CRITICAL"), prio("CRITICAL")]),
        ("repeated high low".into(), vec![prio("HIGH"), prio("LOW")]),
        ("repeated normal critical".into(), vec![prio("NORMAL"), prio("CRITICAL")]),
        ("latin-1 bytes".into(), vec![[b"x-llm-priority: CRITICAL".as_slice(), &[0xA0, 0xFF]].concat()]),
    ]
}

#[test]
fn an_untrusted_priority_header_cannot_promote_in_any_spelling() {
    let mock = Mock::start(&[]);
    let spoofs = spoofs();
    // Every class may spend `capacity`; only CRITICAL and HIGH the reserve of 50 above it, so a
    // promoted request would pass where NORMAL gets a 429.
    let capacity = spoofs.len() + 3;
    let config = format!(
        r#"{{"name":"spoof","bucket":{{"capacity":{capacity},"refill_rate":0.001,"burst_allowance":50}},
        "queue":{{"enabled":false}},"classify":{{"trust_header":false}}}}"#
    );
    let envoy = Envoy::start(&config, 2, mock.port);
    let lows = ["LOW", "low", " Low "];
    // Phase 1: tokens for all. Envoy may refuse a malformed request itself (400): it then never
    // reaches the filter or the provider, which is no promotion either.
    let mut refused_by_envoy = Vec::new();
    for (label, lines) in &spoofs {
        let r = raw_chat(envoy.port, lines);
        match r.status {
            200 => {}
            400 | 431 => refused_by_envoy.push(label.clone()),
            s => panic!("{label}: status {s}"),
        }
    }
    for v in lows {
        assert_eq!(raw_chat(envoy.port, &[prio(v)]).status, 200, "{v:?}");
    }
    let seen = mock.stats()["by_priority"].clone();
    let seen: HashMap<String, u64> = serde_json::from_value(seen).unwrap();
    assert_eq!(seen.get("LOW"), Some(&3), "a client can still lower itself: {seen:?}");
    assert_eq!(seen.get("NORMAL"), Some(&((spoofs.len() - refused_by_envoy.len()) as u64)), "{seen:?}");
    assert!(seen.keys().all(|k| k == "NORMAL" || k == "LOW"), "the provider saw a promoted class: {seen:?}");
    // Phase 2: drain what is left for NORMAL, then every spoof again: each one must be refused
    // as NORMAL (a promoted one would spend the reserve), and LOW stays LOW.
    let mut drained = 0;
    while raw_chat(envoy.port, &[]).status == 200 {
        drained += 1;
        assert!(drained <= capacity, "the bucket never ran dry");
    }
    for (label, lines) in &spoofs {
        let r = raw_chat(envoy.port, lines);
        if refused_by_envoy.contains(label) {
            continue;
        }
        assert_eq!(r.status, 429, "{label}: a spoofed header passed where NORMAL may not");
        assert_eq!(r.headers.get("x-llm-ratelimit-priority").map(String::as_str), Some("NORMAL"), "{label}");
    }
    let r = raw_chat(envoy.port, &[prio("low")]);
    assert_eq!((r.status, r.headers.get("x-llm-ratelimit-priority").map(String::as_str)), (429, Some("LOW")));
    for class in ["critical", "high"] {
        for what in ["admitted", "rejected"] {
            assert_eq!(envoy.stat("spoof", &format!("priority.{class}.{what}")), 0, "{class}.{what}");
        }
    }
    eprintln!("refused by Envoy before the filter: {refused_by_envoy:?}");
}

#[test]
fn priority_names_parse_only_in_ascii() {
    use llm_ratelimit::priority::Priority;
    for v in [
        "\u{0421}RITICAL",
        "\u{FF23}\u{FF32}\u{FF29}\u{FF34}\u{FF29}\u{FF23}\u{FF21}\u{FF2C}",
        "CR\u{0130}T\u{0130}CAL",
        "CRITICAL\u{200B}",
        "CRITICAL,CRITICAL",
        "CRITICAL, LOW",
        "",
        "HIGH\0",
    ] {
        assert_eq!(Priority::parse(v), None, "{v:?}");
    }
    // Unicode case folding is not ASCII's: the Kelvin sign lower-cases to k, long s to s.
    assert_eq!(Priority::parse("\u{017F}"), None);
    assert_eq!(Priority::parse(" critical\t"), Some(Priority::Critical));
}

// ---------------------------------------------------------------------------------------------
// Rotating tenant keys.

/// Envoy's resident set in KiB, from /proc: the Envoy process listening on `admin`.
fn envoy_rss_kib(admin: u16) -> Option<u64> {
    let want = format!(":{admin:04X}");
    let mut inodes = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        for line in std::fs::read_to_string(table).unwrap_or_default().lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() > 9 && f[1].ends_with(&want) && f[3] == "0A" {
                inodes.push(format!("socket:[{}]", f[9]));
            }
        }
    }
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else { continue };
        let holds = fds
            .flatten()
            .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|l| inodes.iter().any(|i| l.to_string_lossy() == *i)));
        if holds {
            let status = std::fs::read_to_string(entry.path().join("status")).ok()?;
            let rss = status.lines().find(|l| l.starts_with("VmRSS:"))?;
            return rss.split_whitespace().nth(1)?.parse().ok();
        }
    }
    None
}

/// Envoy's heap (`/memory`: `allocated` bytes, `heap_size` bytes).
fn envoy_heap(envoy: &Envoy) -> (u64, u64) {
    let v: serde_json::Value = serde_json::from_str(&envoy.admin_text("/memory")).expect("/memory JSON");
    let n = |k: &str| v[k].as_str().and_then(|s| s.parse().ok()).or(v[k].as_u64()).unwrap_or(0);
    (n("allocated"), n("heap_size"))
}

/// Envoy's growth while `keys` distinct tenant values arrive; asserts the token bound.
fn rotate_tenant_keys(keys: usize) -> (u64, i64, i64) {
    let mock = Mock::start(&[]);
    let config = r#"{"name":"rot","bucket":{"capacity":1000000,"refill_rate":1000000,"burst_allowance":0},
        "queue":{"enabled":false},"tenant":{"key_header":"x-tenant","capacity":2,"refill_rate":0.01,"slots":64}}"#;
    let envoy = Envoy::start(config, 2, mock.port);
    let url = envoy.url("/v1/chat/completions");
    let started = Instant::now();
    let next = AtomicUsize::new(0);
    let send = |upto: usize| {
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    let agent = ureq::AgentBuilder::new().timeout(Duration::from_secs(30)).build();
                    let body = r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#;
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= upto {
                            break;
                        }
                        // Long, distinct values: the table must bound them, not just count them.
                        let tenant = format!("rotating-tenant-{i:08}-{}", "x".repeat(100));
                        let r = agent.post(&url).set("x-tenant", &tenant).send_string(body);
                        match r {
                            Ok(_) | Err(ureq::Error::Status(429, _)) => {}
                            Err(e) => panic!("request {i}: {e}"),
                        }
                    }
                });
            }
        })
    };
    send(200.min(keys));
    std::thread::sleep(Duration::from_millis(200));
    let (heap0, _) = envoy_heap(&envoy);
    let rss0 = envoy_rss_kib(envoy.admin);
    send(keys);
    let elapsed = started.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_millis(200));
    let (heap1, heap_size) = envoy_heap(&envoy);
    let rss1 = envoy_rss_kib(envoy.admin);
    let admitted = mock.received();
    // Everything granted came from 64 slots plus the overflow bucket: each at most full (2)
    // plus its refill (0.01/s) over the run.
    let bound = (64 + 1) * 2 + (65.0 * 0.01 * elapsed).ceil() as u64;
    assert!(admitted <= bound, "{admitted} admitted from {keys} rotating tenant values; bound {bound}");
    let heap_growth = heap1 as i64 - heap0 as i64;
    let rss_growth = match (rss0, rss1) {
        (Some(a), Some(b)) => (b as i64 - a as i64) * 1024,
        _ => 0,
    };
    eprintln!(
        "{keys} tenant keys in {elapsed:.1} s: {admitted} admitted (bound {bound}); heap allocated {heap0} -> {heap1} \
         (heap_size {heap_size}); RSS {rss0:?} -> {rss1:?} KiB"
    );
    assert!(envoy.stat("rot", "tenants.overflow") > 0, "the overflow bucket was never used");
    (admitted, heap_growth, rss_growth)
}

/// Growth allowed while rotating tenant keys (measured: see SECURITY.md).
const MAX_HEAP_GROWTH: i64 = 16 << 20;
const MAX_RSS_GROWTH: i64 = 32 << 20;

#[test]
fn rotating_tenant_keys_mint_no_tokens_and_memory_stays_bounded() {
    let (_, heap, rss) = rotate_tenant_keys(20_000);
    assert!(heap < MAX_HEAP_GROWTH, "Envoy's heap grew {heap} bytes over 20,000 tenant keys");
    assert!(rss < MAX_RSS_GROWTH, "Envoy's RSS grew {rss} bytes over 20,000 tenant keys");
}

/// The long run: `SECURITY_TENANT_KEYS=1000000 cargo test --release --test security -- --ignored`.
#[test]
#[ignore]
fn rotating_tenant_keys_long_run() {
    let keys = std::env::var("SECURITY_TENANT_KEYS").ok().and_then(|v| v.parse().ok()).unwrap_or(1_000_000);
    let (_, heap, rss) = rotate_tenant_keys(keys);
    assert!(heap < MAX_HEAP_GROWTH, "Envoy's heap grew {heap} bytes over {keys} tenant keys");
    assert!(rss < MAX_RSS_GROWTH, "Envoy's RSS grew {rss} bytes over {keys} tenant keys");
}

// ---------------------------------------------------------------------------------------------
// Credentials.

/// A receiver that answers 200 to everything and keeps each request's bytes.
fn capture_server() -> (u16, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let keep = seen.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let keep = keep.clone();
            std::thread::spawn(move || {
                let mut conn = conn;
                conn.set_read_timeout(Some(Duration::from_millis(500))).ok();
                let mut buf = Vec::new();
                let mut chunk = [0u8; 8192];
                loop {
                    match conn.read(&mut chunk) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                    let text = String::from_utf8_lossy(&buf).to_string();
                    if let Some((head, body)) = text.split_once("\r\n\r\n") {
                        let len = head
                            .lines()
                            .find_map(|l| {
                                l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_string())
                            })
                            .and_then(|v| v.parse::<usize>().ok())
                            .unwrap_or(0);
                        if body.len() >= len {
                            break;
                        }
                    }
                }
                keep.lock().unwrap().push(String::from_utf8_lossy(&buf).to_string());
                let _ = conn.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
            });
        }
    });
    (port, seen)
}

static ALERT_PORT: AtomicU16 = AtomicU16::new(0);

fn to_capture(yaml: String) -> String {
    yaml.replace("port_value: 9093", &format!("port_value: {}", ALERT_PORT.load(Ordering::Relaxed)))
}

const BEARER: &str = "sk-SECRETbearer0123456789abcdef";
const X_API_KEY: &str = "sk-ant-SECRETxapikey0123456789";
const API_KEY: &str = "azureSECRETapikey0123456789";
const GOOG_KEY: &str = "AIzaSECRETgoogkey0123456789";
const QUERY_KEY: &str = "SECRETquerykey0123456789";

#[test]
fn credentials_never_reach_logs_stats_or_alerts() {
    let (alert_port, alerts) = capture_server();
    ALERT_PORT.store(alert_port, Ordering::Relaxed);
    // A provider with 4 requests per minute: the 5th gets a 429 naming a reset a minute away.
    let mock = Mock::start(&["--quota", "4", "--window-ms", "60000", "--style", "gemini"]);
    // Everything on that touches a request's identity: tenants keyed by the API key itself, the
    // fallback cache (keyed by a hash of the credential), alerts at once.
    let config = r#"{"name":"cred","bucket":{"capacity":1000,"refill_rate":100},
        "tenant":{"key_header":"x-api-key","capacity":3,"refill_rate":0.01,"slots":16},
        "fallback":{"enabled":true},"priorities":{"NORMAL":{"max_retries":0,"max_wait_ms":500}},
        "alert":{"cluster":"alertmanager","min_interval_s":1,"shed_per_minute":1}}"#;
    let opts = EnvoyOpts { filter_config: config, concurrency: 2, upstream_port: mock.port, edit: Some(to_capture) };
    let envoy = Envoy::spawn(&opts).unwrap_or_else(|log| panic!("{log}"));
    ureq::post(&mock.url("/mock/reset")).call().expect("reset");
    let url = envoy.url(&format!("/v1/chat/completions?key={QUERY_KEY}"));
    let creds = |tenant: &str| {
        vec![
            ("authorization".to_string(), format!("Bearer {BEARER}")),
            ("x-api-key".to_string(), format!("{X_API_KEY}-{tenant}")),
            ("api-key".to_string(), API_KEY.to_string()),
            ("x-goog-api-key".to_string(), GOOG_KEY.to_string()),
            ("x-llm-cache-key".to_string(), "prompt-1".to_string()),
        ]
    };
    let send = |h: &[(String, String)]| {
        let all: Vec<(&str, &str)> = h.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        chat(&url, &all).expect("request")
    };
    // A success (stored in the fallback cache); a tenant that runs dry (3 successes, then
    // tenant_limit); then the provider's 429: the breaker opens and an alert goes out.
    let a = creds("a");
    assert_eq!(send(&a).status, 200);
    let d = creds("d");
    let replies: Vec<Reply> = (0..5).map(|_| send(&d)).collect();
    assert_eq!(count(&replies, 200), 3);
    assert!(replies.iter().any(|r| r.header("x-llm-ratelimit-reason") == Some("tenant_limit")), "{replies:?}");
    let r = send(&creds("b"));
    assert_eq!((r.status, r.header("x-llm-ratelimit-source")), (429, Some("provider")), "{r:?}");
    // While open: the same caller is answered from the cache, another credential is not.
    let hit = send(&a);
    assert_eq!(hit.header("x-llm-ratelimit-fallback"), Some("cache"), "{hit:?}");
    let mut other = creds("a");
    other[0].1 = "Bearer sk-SECRETother".into();
    let miss = send(&other);
    assert_eq!(miss.header("x-llm-ratelimit-reason"), Some("breaker_open"), "another credential read the cache");
    assert!(eventually(Duration::from_secs(5), || envoy.stat("cred", "alerts.sent") >= 1), "no alert sent");
    std::thread::sleep(Duration::from_millis(300));

    let log = envoy.log();
    assert!(log.contains("llm-ratelimit: configured filter"), "not the filter's log:\n{log}");
    let stats = envoy.admin_text("/stats");
    let prom = envoy.admin_text("/stats/prometheus");
    let alerts = alerts.lock().unwrap().join("\n----\n");
    assert!(alerts.contains("LLMProviderQuotaExhausted"), "no alert captured: {alerts}");
    for secret in [BEARER, X_API_KEY, API_KEY, GOOG_KEY, QUERY_KEY, "SECRET"] {
        for (what, text) in
            [("Envoy's log", &log), ("/stats", &stats), ("/stats/prometheus", &prom), ("alerts", &alerts)]
        {
            assert!(!text.contains(secret), "{secret:?} in {what}:\n{text}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Hostile configuration.

/// Every numeric field: (path, JSON around it with `@` for the value, kind).
#[derive(Clone, Copy, PartialEq, Debug)]
enum Kind {
    /// A whole number (1.5 refused).
    Whole,
    /// A real number > 0.
    Positive,
    /// A fraction from 0 to 1.
    Fraction,
}

fn numeric_fields() -> Vec<(String, String, Kind)> {
    use Kind::*;
    let mut v = Vec::new();
    let mut add = |path: &str, kind: Kind| {
        // `{"a":{"b":@}}` for `a.b`, with what some sections need beside the field: tokens and a
        // model need a capacity, alerts a cluster.
        let parts: Vec<&str> = path.split('.').collect();
        let mut json = String::from("@");
        for i in (0..parts.len()).rev() {
            let extra = match parts[..i].join(".").as_str() {
                "tokens" | "tokens.per_model.m" if parts[i] != "capacity" => r#","capacity":9"#,
                "tenant.tokens" | "tokens.input" if parts[i] != "capacity" => r#","capacity":9"#,
                "alert" | "global" => r#","cluster":"x""#,
                // The adaptive limit moves under `in_flight.max`.
                "in_flight" if parts[i] != "max" => r#","max":9"#,
                // Tenant tokens are estimated by the `tokens` section.
                "" if path.starts_with("tenant.tokens") => r#","tokens":{"capacity":9}"#,
                _ => "",
            };
            json = format!(r#"{{"{}":{json}{extra}}}"#, parts[i]);
        }
        v.push((path.to_string(), json, kind));
    };
    for f in ["capacity", "burst_allowance", "max_lease"] {
        add(&format!("bucket.{f}"), Whole);
    }
    add("bucket.refill_rate", Positive);
    for f in ["capacity", "burst_allowance", "slots"] {
        add(&format!("tenant.{f}"), Whole);
    }
    add("tenant.refill_rate", Positive);
    for f in ["capacity", "burst_allowance", "output_default", "max_body_bytes"] {
        add(&format!("tokens.{f}"), Whole);
    }
    add("tokens.refill_rate", Positive);
    add("tokens.chars_per_token", Positive);
    add("tokens.per_model.m.capacity", Whole);
    add("tokens.per_model.m.refill_rate", Positive);
    for f in ["min_interval_s", "timeout_ms", "shed_per_minute"] {
        add(&format!("alert.{f}"), Whole);
    }
    for class in ["CRITICAL", "HIGH", "NORMAL", "LOW"] {
        for f in ["queue_limit", "max_wait_ms", "max_retries"] {
            add(&format!("priorities.{class}.{f}"), Whole);
        }
        add(&format!("priorities.{class}.weight"), Positive);
    }
    for f in ["tick_ms", "max_waiting"] {
        add(&format!("queue.{f}"), Whole);
    }
    for f in ["max_retry_after_s", "probe_timeout_ms", "backoff_ms", "max_backoff_ms"] {
        add(&format!("provider.{f}"), Whole);
    }
    for f in ["safe_threshold", "throttle_below"] {
        add(&format!("provider.{f}"), Fraction);
    }
    for f in ["max_entries", "max_body_bytes", "max_age_s"] {
        add(&format!("fallback.{f}"), Whole);
    }
    for f in ["timeout_ms", "max_lease", "lease_ms"] {
        add(&format!("global.{f}"), Whole);
    }
    add("tenant.newcomers", Whole);
    for f in ["capacity", "burst_allowance"] {
        add(&format!("tenant.tokens.{f}"), Whole);
    }
    add("tenant.tokens.refill_rate", Positive);
    add("in_flight.max", Whole);
    for f in ["floor", "initial"] {
        add(&format!("in_flight.adaptive.{f}"), Whole);
    }
    add("in_flight.adaptive.tolerance", Positive);
    add("in_flight.adaptive.backoff", Fraction);
    add("tokens.input.capacity", Whole);
    add("tokens.input.refill_rate", Positive);
    // A list entry: its path is `quotas[0].limit`.
    v.push(("quotas[0].limit".into(), r#"{"quotas":[{"unit":"requests","per":"day","limit":@}]}"#.into(), Whole));
    v
}

#[test]
fn every_numeric_field_of_the_config_is_listed_here() {
    // Each numeric read in src/config/ must be one of the fields checked below, so a new numeric
    // field without a cap fails this test. A numeric read is a call of a reader that src/config/
    // mod.rs defines as `fn reader(&mut self, key: ...) -> u64` (or f64, or an Option of either),
    // e.g. `s.whole("capacity", 100, 1)`: every such reader is found, new ones included.
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/src/config");
    let module = std::fs::read_to_string(format!("{dir}/mod.rs")).unwrap();
    let readers: Vec<&str> = module
        .split("fn ")
        .skip(1)
        .filter(|f| {
            let signature = f[..f.find('{').unwrap_or(0)].trim_end();
            let numeric = ["-> u64", "-> f64", "-> Option<u64>", "-> Option<f64>"];
            signature.contains("(&mut self, key: ") && numeric.iter().any(|r| signature.ends_with(r))
        })
        .map(|f| &f[..f.find('(').unwrap()])
        .collect();
    for r in ["number", "whole", "whole_to", "positive", "fraction"] {
        assert!(readers.contains(&r), "no numeric reader `{r}` found in src/config/mod.rs: {readers:?}");
    }
    let listed: Vec<String> =
        numeric_fields().iter().map(|(p, _, _)| p.rsplit('.').next().unwrap().to_string()).collect();
    let mut read = 0;
    for file in std::fs::read_dir(dir).unwrap() {
        let path = file.unwrap().path();
        let source = std::fs::read_to_string(&path).unwrap();
        for reader in &readers {
            for piece in source.split(&format!(".{reader}(\"")).skip(1) {
                let name = piece.split('"').next().unwrap();
                read += 1;
                assert!(
                    listed.iter().any(|l| l == name),
                    "config field {name:?} ({}) is not checked by tests/security.rs",
                    path.display()
                );
            }
        }
    }
    assert!(read >= 30, "found only {read} numeric fields in src/config/");
}

#[test]
fn every_number_is_capped_and_bad_ones_name_their_field() {
    for (path, json, kind) in numeric_fields() {
        let with = |v: &str| json.replace('@', v);
        // The field as parsed is accepted with a sane value.
        let sane = if kind == Kind::Fraction { "0.5" } else { "2" };
        Config::parse(with(sane).as_bytes()).unwrap_or_else(|e| panic!("{path} = {sane}: {e}"));
        let mut bad = vec!["1e300", "-1", "1e16", "\"1\"", "true", "[]", "{}"];
        if kind != Kind::Positive {
            bad.push("1.5");
        }
        if kind == Kind::Positive {
            bad.extend(["0", "-0.0"]);
        }
        for v in bad {
            let e = Config::parse(with(v).as_bytes()).err().unwrap_or_else(|| panic!("{path} = {v} accepted"));
            assert!(e.starts_with(&format!("{path}: ")), "{path} = {v}: the error does not name the field: {e}");
            assert!(e.len() < 600, "{path} = {v}: {e}");
        }
        // JSON cannot carry NaN or infinity; a number beyond f64 is a JSON error, not a panic.
        for v in ["1e400", "-1e400", "NaN", "Infinity"] {
            let e = Config::parse(with(v).as_bytes()).expect_err(v);
            assert!(e.starts_with("invalid JSON"), "{path} = {v}: {e}");
        }
    }
}

#[test]
fn deep_nesting_and_huge_configs_are_refused_without_a_crash() {
    for open in ["[", "{\"a\":"] {
        let close = if open == "[" { "]" } else { "}" };
        let deep = format!("{{\"bucket\":{}1{}}}", open.repeat(10_000), close.repeat(10_000));
        let e = Config::parse(deep.as_bytes()).expect_err("10,000 levels");
        assert!(e.contains("recursion limit exceeded"), "{e}");
    }
    // 10 MB in one value: refused, and the message (which quotes the value) stays short.
    let huge = format!(r#"{{"name":"{}"}}"#, "a".repeat(10 << 20));
    let e = Config::parse(huge.as_bytes()).expect_err("10 MB name");
    assert!(e.starts_with("name: must be 1-64 letters") && e.len() < 600, "{} bytes: {}", e.len(), &e[..100]);
    let huge = format!(r#"{{"classify":{{"header":"{}"}}}}"#, "\u{00e9}".repeat(5 << 20));
    let e = Config::parse(huge.as_bytes()).expect_err("10 MB header name");
    assert!(e.starts_with("classify.header: must be a header name") && e.len() < 600, "{}", e.len());
    // 10 MB of whitespace and an unterminated string: JSON errors, no echo.
    let e = Config::parse(format!("{{{}", " ".repeat(10 << 20)).as_bytes()).expect_err("unterminated");
    assert!(e.starts_with("invalid JSON") && e.len() < 600, "{e}");
    let e = Config::parse(format!("{{\"name\":\"{}", "b".repeat(10 << 20)).as_bytes()).expect_err("unterminated");
    assert!(e.starts_with("invalid JSON") && e.len() < 600, "{}", e.len());
}

#[test]
fn envoy_refuses_to_start_with_a_hostile_config() {
    let mock = Mock::start(&[]);
    let config = r#"{"bucket":{"refill_rate":1e300}}"#;
    match Envoy::spawn(&EnvoyOpts { filter_config: config, concurrency: 1, upstream_port: mock.port, edit: None }) {
        Ok(envoy) => panic!("Envoy accepted {config}; log:\n{}", envoy.log()),
        Err(log) => {
            let want = "llm-ratelimit: invalid configuration: bucket.refill_rate: must be a number > 0 and at most 10^15, got 1e300";
            assert!(log.contains(want), "expected {want:?} in the Envoy log:\n{log}");
        }
    }
}

/// SECURITY.md, threat 1b: a second line a client adds after a first line equal to the decided
/// class (`NORMAL` then `CRITICAL`) must not reach the provider: a header the client sent is
/// always replaced, every line of it.
#[test]
fn the_provider_sees_only_the_decided_class() {
    // The upstream is a capture server: every x-llm-priority line it receives is visible.
    let (port, seen) = capture_server();
    let envoy = Envoy::start(r#"{"name":"up","queue":{"enabled":false}}"#, 1, port);
    for lines in [
        vec![prio("CRITICAL"), prio("CRITICAL")],
        vec![prio("NORMAL"), prio("CRITICAL")],
        vec![prio("LOW"), prio("CRITICAL")],
    ] {
        let r = raw_chat(envoy.port, &lines);
        assert_eq!(r.status, 200);
    }
    let seen = seen.lock().unwrap().clone();
    let classes: Vec<Vec<String>> = seen
        .iter()
        .map(|req| {
            req.lines()
                .filter_map(|l| l.split_once(':'))
                .filter(|(k, _)| k.eq_ignore_ascii_case("x-llm-priority"))
                .map(|(_, v)| v.trim().to_string())
                .collect()
        })
        .collect();
    assert_eq!(classes, [vec!["NORMAL"], vec!["NORMAL"], vec!["LOW"]], "{seen:?}");
}
