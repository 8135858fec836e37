//! The service against one real redis-server.

mod common;

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::*;

#[tokio::test]
async fn limits_enforced_and_statuses_filled() {
    let redis = Redis::start();
    let rls = Rls::start(&["--redis", &format!("redis://127.0.0.1:{}", redis.port)]);
    let mut c = rls.client().await;
    for i in 0..5u32 {
        let r = c.call(vec![descriptor(&[("m", "a")]), descriptor(&[("nolimit", "x")])], 1).await.unwrap();
        assert_eq!(r.overall_code, Code::Ok as i32);
        let s = &r.statuses[0];
        assert_eq!(s.code, Code::Ok as i32);
        let limit = s.current_limit.as_ref().unwrap();
        assert_eq!((limit.requests_per_unit, limit.unit), (5, Unit::Minute as i32));
        assert_eq!(s.limit_remaining, 4 - i);
        let reset = s.duration_until_reset.unwrap();
        assert!((59..=60).contains(&reset.seconds), "{reset:?}");
        // A descriptor without a limit: OK, no current limit.
        assert_eq!(r.statuses[1].code, Code::Ok as i32);
        assert_eq!(r.statuses[1].current_limit, None);
        if i == 2 {
            // The script is loaded again when Redis lost it.
            assert_eq!(redis.cli(&["SCRIPT", "FLUSH"]).trim(), "OK");
        }
    }
    let r = c
        .call(vec![descriptor(&[("m", "a")]), descriptor(&[("m", "b")]), descriptor(&[("free", "x")])], 1)
        .await
        .unwrap();
    assert_eq!(r.overall_code, Code::OverLimit as i32);
    let codes: Vec<i32> = r.statuses.iter().map(|s| s.code).collect();
    assert_eq!(codes, [Code::OverLimit as i32, Code::Ok as i32, Code::Ok as i32]);
    assert_eq!(r.statuses[0].limit_remaining, 0);
    assert!(r.statuses[0].duration_until_reset.unwrap().seconds >= 59);
    assert_eq!(r.statuses[2].limit_remaining, u32::MAX, "unlimited");
    // shadow_mode: over the limit, answered OK.
    assert!(c.hit(&[("shadow", "s")]).await);
    assert!(c.hit(&[("shadow", "s")]).await);
    // Bad requests.
    let err =
        c.0.should_rate_limit(RateLimitRequest { domain: "test".into(), ..Default::default() }).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    let (status, metrics) = rls.get("/metrics");
    assert_eq!(status, 200);
    assert!(metrics.contains("rls_over_limit_total 1\n"), "{metrics}");
    assert!(metrics.contains("rls_shadow_over_limit_total 1\n"), "{metrics}");
    assert!(metrics.contains("rls_redis_latency_seconds_count 9\n"), "{metrics}");
    assert_eq!(rls.get("/healthz").0, 200);
}

#[tokio::test]
async fn hits_addend_weights_the_hits() {
    let redis = Redis::start();
    let rls = Rls::start(&["--redis", &format!("127.0.0.1:{}", redis.port)]);
    let mut c = rls.client().await;
    let tok = || vec![descriptor(&[("tok", "t")])];
    let expect = |r: RateLimitResponse, code: Code, remaining: u32| {
        assert_eq!((r.statuses[0].code, r.statuses[0].limit_remaining), (code as i32, remaining));
    };
    expect(c.call(tok(), 400).await.unwrap(), Code::Ok, 600);
    expect(c.call(tok(), 400).await.unwrap(), Code::Ok, 200);
    expect(c.call(tok(), 400).await.unwrap(), Code::OverLimit, 200); // denied hits are not counted
    expect(c.call(tok(), 199).await.unwrap(), Code::Ok, 1);
    expect(c.call(tok(), 0).await.unwrap(), Code::Ok, 0); // 0 means 1
    expect(c.call(tok(), 0).await.unwrap(), Code::OverLimit, 0);
    // A descriptor's own hits_addend wins over the request's.
    let mut d = descriptor(&[("tok", "u")]);
    d.hits_addend = Some(envoy_types::pb::google::protobuf::UInt64Value { value: 1000 });
    expect(c.call(vec![d.clone()], 1).await.unwrap(), Code::Ok, 0);
    expect(c.call(vec![descriptor(&[("tok", "u")])], 1).await.unwrap(), Code::OverLimit, 0);
    assert_eq!(c.call(vec![descriptor(&[("tok", "v")])], 1001).await.unwrap().statuses[0].code, Code::OverLimit as i32);
}

fn now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs_f64()
}

/// Sleeps until `frac` into the next second (Redis' clock is this machine's).
async fn until_fraction(frac: f64) {
    let t = now();
    let mut target = t.floor() + frac;
    if target < t + 0.05 {
        target += 1.0;
    }
    tokio::time::sleep(Duration::from_secs_f64(target - t)).await;
}

async fn burst(c: &Client, value: &str, n: usize) -> usize {
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..n {
        let (mut c, value) = (c.clone(), value.to_string());
        tasks.spawn(async move { c.hit(&[("k", &value)]).await });
    }
    tasks.join_all().await.into_iter().filter(|&ok| ok).count()
}

async fn sleep_until(t: f64) {
    tokio::time::sleep(Duration::from_secs_f64((t - now()).max(0.0))).await;
}

#[tokio::test]
async fn sliding_window_does_not_double_at_a_second_boundary() {
    let redis = Redis::start();
    let rls = Rls::start(&["--redis", &format!("redis://127.0.0.1:{}", redis.port)]);
    let c = rls.client().await;
    // 2x the limit (50/s) straddling a second boundary: 50 just before, 50 just after. A run
    // whose bursts were delayed (a loaded machine) so that they did not straddle is run again.
    for attempt in 0..4 {
        let key = format!("boundary{attempt}");
        until_fraction(0.93).await;
        let t0 = now();
        let boundary = t0.ceil();
        let before = burst(&c, &key, 50).await;
        if now() > boundary + 0.04 {
            continue;
        }
        sleep_until(boundary + 0.05).await;
        let after = burst(&c, &key, 50).await;
        if now() > t0 + 0.98 {
            continue;
        }
        assert_eq!(before, 50);
        assert!(before + after <= 50, "admitted {before} + {after} across the boundary, limit 50");
        // Once the first burst is a second old, the window has room again.
        sleep_until(t0 + 1.05).await;
        assert_eq!(burst(&c, &key, 50).await, 50);
        return;
    }
    panic!("the bursts never straddled a second boundary: machine too loaded");
}

#[tokio::test]
async fn sliding_window_holds_at_every_instant() {
    let redis = Redis::start();
    let rls = Rls::start(&["--redis", &format!("redis://127.0.0.1:{}", redis.port)]);
    let mut c = rls.client().await;
    // 2x the limit (50/s), steadily for 2.5 s: one call each 10 ms.
    let start = Instant::now();
    let mut admitted = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    while start.elapsed() < Duration::from_millis(2500) {
        tick.tick().await;
        let sent = start.elapsed().as_secs_f64();
        if c.hit(&[("k", "steady")]).await {
            admitted.push(sent);
        }
    }
    // In every window of one second ending at an admitted call (less 20 ms for the clocks of
    // client and Redis), at most the limit.
    let worst = admitted.iter().map(|&t| admitted.iter().filter(|&&u| u <= t && u > t - 0.98).count()).max().unwrap();
    let memory = redis.cli(&["MEMORY", "USAGE", "{test_k_steady}:1"]);
    let slots = redis.cli(&["HLEN", "{test_k_steady}:1"]).trim().parse::<u32>().unwrap() - 3;
    eprintln!(
        "steady 2x: admitted {} in {:.2} s (limit 50/s), most in any 1 s window {worst}; key: {} slots, {} bytes",
        admitted.len(),
        start.elapsed().as_secs_f64(),
        slots,
        memory.trim()
    );
    assert!(worst <= 50, "{worst} admitted within one second");
    // And not much less than the limit: 50 at once, then 50 per second plus at most 1% (a slot).
    assert!(admitted.len() >= 140, "only {} admitted", admitted.len());
}

#[tokio::test]
async fn concurrent_clients_lose_no_update() {
    let redis = Redis::start();
    let rls = Rls::start(&["--redis", &format!("redis://127.0.0.1:{}", redis.port)]);
    let c = rls.client().await;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let mut c = c.clone();
        tasks.spawn(async move {
            let mut ok = 0;
            for _ in 0..150 {
                ok += c.hit(&[("tok", "shared")]).await as u32;
            }
            ok
        });
    }
    let admitted: u32 = tasks.join_all().await.into_iter().sum();
    assert_eq!(admitted, 1000, "8 x 150 calls against 1000 per minute");
    let stored: u64 = redis.cli(&["HGET", "{test_tok_shared}:60", "t"]).trim().parse().unwrap();
    assert_eq!(stored, 1000);
}

#[tokio::test]
async fn redis_down_is_a_fast_error_and_recovery_follows() {
    let port = free_port();
    // The service starts before Redis.
    let rls = Rls::start(&["--redis", &format!("redis://127.0.0.1:{port}")]);
    let mut c = rls.client().await;
    let fast_unavailable = |r: Result<RateLimitResponse, tonic::Status>, took: Duration| {
        assert_eq!(r.unwrap_err().code(), tonic::Code::Unavailable);
        assert!(took < Duration::from_millis(100), "error after {took:?}");
        took
    };
    let t = Instant::now();
    fast_unavailable(c.call(vec![descriptor(&[("m", "x")])], 1).await, t.elapsed());
    assert_eq!(rls.get("/healthz").0, 503);
    let mut redis = Redis::start_with(port, &[]);
    assert!(c.hit(&[("m", "x")]).await);
    assert_eq!(rls.get("/healthz").0, 200);

    redis.kill();
    let mut slowest = Duration::ZERO;
    for _ in 0..10 {
        let t = Instant::now();
        slowest = slowest.max(fast_unavailable(c.call(vec![descriptor(&[("m", "x")])], 1).await, t.elapsed()));
    }
    eprintln!("redis down: slowest UNAVAILABLE of 10 after {slowest:?}");
    redis.restart();
    let t = Instant::now();
    while c.call(vec![descriptor(&[("m", "x")])], 1).await.is_err() {
        assert!(t.elapsed() < Duration::from_secs(3), "no recovery after Redis came back");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!("recovered {:?} after Redis restarted", t.elapsed());
    let (_, metrics) = rls.get("/metrics");
    assert!(!metrics.contains("rls_redis_errors_total 0\n"), "{metrics}");
}

#[test]
fn bad_limits_exit_2_naming_the_field() {
    let file = temp_dir("bad").join("bad.yaml");
    std::fs::write(
        &file,
        "domain: d\ndescriptors:\n  - key: a\n    rate_limit: {unit: fortnight, requests_per_unit: 1}\n",
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_llm-ratelimit-rls"))
        .args(["--config", file.to_str().unwrap()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("bad.yaml: descriptors[0].rate_limit.unit: invalid rate limit unit 'fortnight'"),
        "{stderr}"
    );
    let out =
        std::process::Command::new(env!("CARGO_BIN_EXE_llm-ratelimit-rls")).args(["--nope", "1"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[tokio::test]
async fn long_values_make_short_keys_and_still_count_apart() {
    let redis = Redis::start();
    let rls = Rls::start(&["--redis", &format!("redis://127.0.0.1:{}", redis.port)]);
    let mut c = rls.client().await;
    // Two 50 KB values (as a tenant header may be) that differ in their last byte.
    let a = "t".repeat(50_000);
    let b = format!("{}u", &a[1..]);
    for i in 0..6 {
        assert_eq!(c.hit(&[("m", &a)]).await, i < 5, "call {i}");
    }
    assert!(c.hit(&[("m", &b)]).await, "another value has its own counter");
    // A limit the file gives to one (long) value still matches it.
    let vip = "tenant-with-a-long-name-0123456789012345678901234567890123456789012345678901234567";
    for i in 0..3 {
        assert_eq!(c.hit(&[("m", vip)]).await, i < 2, "{vip}: call {i}");
    }
    let keys = redis.keys();
    assert_eq!(keys.len(), 3, "{} keys", keys.len());
    for k in &keys {
        assert!(k.len() <= 64, "a key of {} bytes: {}...", k.len(), &k[..k.len().min(80)]);
    }
}

#[tokio::test]
async fn full_in_flight_answers_unavailable_at_once() {
    let redis = Redis::start();
    let url = format!("redis://127.0.0.1:{}", redis.port);
    let rls = Rls::start(&["--redis", &url, "--max-in-flight", "1", "--redis-timeout", "5s"]);
    let mut c = rls.client().await;
    assert!(c.hit(&[("m", "warm")]).await, "connected");
    // Redis holds every command for 2 s: the next call keeps the only slot that long.
    assert_eq!(redis.cli(&["CLIENT", "PAUSE", "2000", "ALL"]).trim(), "OK");
    let mut slow = c.clone();
    let held = tokio::spawn(async move { slow.call(vec![descriptor(&[("m", "held")])], 1).await });
    tokio::time::sleep(Duration::from_millis(150)).await;
    for i in 0..3 {
        let t = Instant::now();
        let err = c.call(vec![descriptor(&[("m", "more")])], 1).await.unwrap_err();
        let took = t.elapsed();
        assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
        assert!(err.message().contains("overloaded"), "{err:?}");
        assert!(took < Duration::from_millis(250), "call {i} answered after {took:?}");
    }
    // A call that needs no Redis is still answered.
    assert!(c.hit(&[("free", "x")]).await);
    assert_eq!(held.await.unwrap().unwrap().overall_code, Code::Ok as i32, "the held call completes");
    // Two descriptors with limits need two slots at once: never with one.
    let err = c.call(vec![descriptor(&[("m", "p")]), descriptor(&[("m", "q")])], 1).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    assert!(err.message().contains("--max-in-flight"), "{err:?}");
    assert!(c.hit(&[("m", "more")]).await, "the slot is free again");
    let (_, metrics) = rls.get("/metrics");
    assert!(metrics.contains("rls_overloaded_total 4\n"), "{metrics}");
    assert!(metrics.contains("rls_redis_errors_total 0\n"), "{metrics}");
}

/// Redis Cluster's slot of a key (the one of its hash tag: the first `{...}`, if not empty), from
/// a node with cluster support (`CLUSTER KEYSLOT` needs no slots of its own).
fn keyslot(node: &Redis, key: &str) -> u32 {
    let slot = node.cli(&["CLUSTER", "KEYSLOT", key]);
    slot.trim().parse().unwrap_or_else(|_| panic!("CLUSTER KEYSLOT: {slot}"))
}

#[tokio::test]
async fn key_prefix_cannot_move_the_hash_tag() {
    // Either the service refuses a prefix with a hash tag of its own, or it keeps each
    // descriptor's counter in a slot of its own, whatever the prefix.
    let port = free_port();
    let node =
        Redis::start_with(port, &["--cluster-enabled", "yes", "--cluster-config-file", &format!("n-{port}.conf")]);
    let redis = Redis::start();
    for prefix in ["{rl}:", "rl:", "a{b}c{", "}{"] {
        redis.cli(&["FLUSHALL"]);
        let mut args = base_args();
        args.extend(["--redis".into(), format!("redis://127.0.0.1:{}", redis.port).into()]);
        let rls = match launch(&args, &[("CACHE_KEY_PREFIX", prefix.into())]) {
            Launch::Listening(rls) => rls,
            Launch::Exited(code, stderr) => {
                assert_eq!(code, Some(2), "{stderr}");
                assert!(stderr.contains("CACHE_KEY_PREFIX"), "{stderr}");
                assert!(prefix.contains(['{', '}']), "'{prefix}' refused: {stderr}");
                continue;
            }
            Launch::Hung => panic!("prefix '{prefix}': hung"),
        };
        let mut c = rls.client().await;
        for i in 0..8 {
            assert!(c.hit(&[("m", &format!("user{i}"))]).await);
        }
        let keys = redis.keys();
        assert_eq!(keys.len(), 8);
        let mut slots: Vec<u32> = keys.iter().map(|k| keyslot(&node, k)).collect();
        slots.sort();
        slots.dedup();
        assert!(slots.len() >= 4, "prefix '{prefix}': 8 keys in slots {slots:?}: {keys:?}");
        for k in &keys {
            assert!(k.starts_with(prefix), "{k}");
            // The slot is the one of the descriptor's own name.
            let name = k[prefix.len()..].split_once('}').unwrap().0.trim_start_matches('{');
            assert_eq!(keyslot(&node, k), keyslot(&node, name), "{k}");
        }
    }
}
