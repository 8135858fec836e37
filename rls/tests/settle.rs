//! Settling reservations: a descriptor whose last entry is `llm_ratelimit.settle` refunds or
//! charges units on the counter of the entries before it; and `/usage`.

mod common;

use std::time::Duration;

use common::*;

const SETTLE_LIMITS: &str = "
domain: test
descriptors:
  - key: tok            # 10 tokens per minute (sliding)
    rate_limit: {unit: minute, requests_per_unit: 10}
  - key: fast           # 50 per second (sliding: slots of 10 ms)
    rate_limit: {unit: second, requests_per_unit: 50}
  - key: daily          # 10 per day (calendar, UTC)
    rate_limit: {unit: day, requests_per_unit: 10}
  - key: rolling        # 10 per 24 hours (sliding)
    rate_limit: {unit: day, requests_per_unit: 10, rolling: true}
  - key: free
    rate_limit: {unlimited: true}
";

fn start(redis: &Redis) -> Rls {
    // A second for Redis: a loaded machine can take more than the default 40 ms.
    let url = format!("redis://127.0.0.1:{}", redis.port);
    Rls::start_limits(SETTLE_LIMITS, &["--redis", &url, "--redis-timeout", "1s"], &[])
}

/// (code, limit_remaining) of the only status.
async fn one(c: &mut Client, d: RateLimitDescriptor) -> (i32, u32) {
    let r = c.call(vec![d], 1).await.unwrap();
    assert_eq!(r.statuses.len(), 1);
    (r.statuses[0].code, r.statuses[0].limit_remaining)
}

const OK: i32 = Code::Ok as i32;
const OVER: i32 = Code::OverLimit as i32;

#[tokio::test]
async fn refund_frees_room() {
    let redis = Redis::start();
    let rls = start(&redis);
    let mut c = rls.client().await;
    // Sliding and calendar windows alike: limit 10, reserve 8, refund 6, then 7 fit.
    for key in ["tok", "daily", "rolling"] {
        let e = [(key, "a")];
        assert_eq!(one(&mut c, weighed(&e, 8)).await, (OK, 2), "{key}");
        assert_eq!(one(&mut c, weighed(&e, 7)).await, (OVER, 2), "{key}: 7 more do not fit");
        let r = c.call(vec![settle(&e, "refund", 6)], 1).await.unwrap();
        let s = &r.statuses[0];
        assert_eq!((r.overall_code, s.code, s.limit_remaining), (OK, OK, 8), "{key}");
        assert_eq!(s.current_limit.as_ref().unwrap().requests_per_unit, 10);
        assert!(s.duration_until_reset.is_some());
        assert_eq!(one(&mut c, weighed(&e, 7)).await, (OK, 1), "{key}: after the refund 7 fit");
        let (status, u) = usage(&rls, &format!("{key}=a"));
        assert_eq!((status, u["used"].as_u64(), u["remaining"].as_u64()), (200, Some(9), Some(1)), "{key}: {u}");
    }
    // The request's hits_addend when the descriptor has none.
    let mut d = settle(&[("tok", "b")], "refund", 0);
    d.hits_addend = None;
    assert_eq!(one(&mut c, weighed(&[("tok", "b")], 9)).await, (OK, 1));
    let r = c.call(vec![d], 4).await.unwrap();
    assert_eq!(r.statuses[0].limit_remaining, 5);
}

#[tokio::test]
async fn refund_never_goes_below_zero_and_takes_the_newest_first() {
    let redis = Redis::start();
    let rls = start(&redis);
    let mut c = rls.client().await;
    for key in ["tok", "daily"] {
        let e = [(key, "z")];
        assert_eq!(one(&mut c, weighed(&e, 3)).await, (OK, 7));
        assert_eq!(one(&mut c, settle(&e, "refund", 10)).await, (OK, 10), "{key}: refund of more than used");
        // Not below zero: the whole limit fits, and no more.
        assert_eq!(one(&mut c, weighed(&e, 10)).await, (OK, 0), "{key}");
        assert_eq!(one(&mut c, weighed(&e, 1)).await, (OVER, 0), "{key}");
        assert_eq!(one(&mut c, settle(&e, "refund", 1_000_000)).await, (OK, 10), "{key}");
        assert_eq!(one(&mut c, settle(&e, "refund", 5)).await, (OK, 10), "{key}: a refund of nothing");
        assert!(redis.keys().iter().all(|k| !k.contains(&format!("_{key}_z}}"))), "{key}: empty, deleted");
    }
    // Hits in five slots of 10 ms (limit 50 per second): a refund of 3 empties the newest three.
    let e = [("fast", "s")];
    for _ in 0..5 {
        assert_eq!(one(&mut c, weighed(&e, 1)).await.0, OK);
        tokio::time::sleep(Duration::from_millis(15)).await;
    }
    let key = "{test_fast_s}:1";
    let slots = |redis: &Redis| {
        let all = redis.cli(&["HGETALL", key]);
        let lines: Vec<&str> = all.lines().collect();
        let mut slots: Vec<(u64, u64)> = lines
            .chunks(2)
            .filter(|kv| kv[0].bytes().all(|b| b.is_ascii_digit()))
            .map(|kv| (kv[0].parse().unwrap(), kv[1].parse().unwrap()))
            .collect();
        slots.sort();
        slots
    };
    let before = slots(&redis);
    assert_eq!(before.len(), 5, "{before:?}");
    assert_eq!(one(&mut c, settle(&e, "refund", 3)).await, (OK, 48));
    let after = slots(&redis);
    assert_eq!(after, before[..2], "the two oldest slots are left");
    let head = redis.cli(&["HMGET", key, "t", "m"]);
    let head: Vec<&str> = head.lines().collect();
    assert_eq!(head, ["2", &before[1].0.to_string()], "running total and newest slot follow");
    // A partial refund leaves a slot with fewer hits, never a negative one.
    assert_eq!(one(&mut c, weighed(&e, 4)).await.0, OK);
    assert_eq!(one(&mut c, settle(&e, "refund", 5)).await, (OK, 49));
    let left = slots(&redis);
    assert_eq!(left.iter().map(|s| s.1).sum::<u64>(), 1, "{left:?}");
    assert!(left.iter().all(|s| s.1 > 0), "{left:?}");
    assert_eq!(redis.cli(&["HGET", key, "t"]).trim(), "1");
}

#[tokio::test]
async fn charge_counts_beyond_the_limit() {
    let redis = Redis::start();
    let rls = start(&redis);
    let mut c = rls.client().await;
    for key in ["tok", "daily"] {
        let e = [(key, "c")];
        assert_eq!(one(&mut c, weighed(&e, 8)).await, (OK, 2));
        // The answer used 15, not 8: 7 more, past the limit, counted all the same.
        assert_eq!(one(&mut c, settle(&e, "charge", 7)).await, (OK, 0), "{key}: a charge is never refused");
        let (_, u) = usage(&rls, &format!("{key}=c"));
        assert_eq!((u["used"].as_u64(), u["remaining"].as_u64()), (Some(15), Some(0)), "{key}: {u}");
        assert_eq!(one(&mut c, weighed(&e, 1)).await, (OVER, 0), "{key}: over the limit now");
        assert_eq!(one(&mut c, settle(&e, "refund", 6)).await, (OK, 1), "{key}");
        assert_eq!(one(&mut c, weighed(&e, 1)).await, (OK, 0), "{key}");
    }
    let (_, metrics) = rls.get("/metrics");
    for line in [
        "rls_settles_total{kind=\"refund\"} 2\n",
        "rls_settles_total{kind=\"charge\"} 2\n",
        "rls_settled_units_total{kind=\"refund\"} 12\n",
        "rls_settled_units_total{kind=\"charge\"} 14\n",
    ] {
        assert!(metrics.contains(line), "{line}: {metrics}");
    }
}

#[tokio::test]
async fn settle_without_a_limit_is_ok_and_a_bad_kind_is_refused() {
    let redis = Redis::start();
    let rls = start(&redis);
    let mut c = rls.client().await;
    let r = c
        .call(
            vec![
                settle(&[("nolimit", "x")], "refund", 5),
                settle(&[("free", "x")], "charge", 5),
                settle(&[], "refund", 5),
                // The settle entry counts only as the last one.
                weighed(&[(SETTLE, "refund"), ("tok", "n")], 2),
            ],
            1,
        )
        .await
        .unwrap();
    assert_eq!(r.overall_code, OK);
    let got: Vec<(i32, u32, bool)> =
        r.statuses.iter().map(|s| (s.code, s.limit_remaining, s.current_limit.is_some())).collect();
    assert_eq!(got, [(OK, 0, false), (OK, u32::MAX, false), (OK, 0, false), (OK, 0, false)]);
    assert!(redis.keys().is_empty(), "{:?}", redis.keys());
    // An unknown kind refuses the whole call before anything counts.
    let err = c.call(vec![weighed(&[("tok", "k")], 3), settle(&[("tok", "k")], "undo", 3)], 1).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("descriptors[1]") && err.message().contains("'undo'"), "{err:?}");
    assert!(redis.keys().is_empty(), "nothing counted: {:?}", redis.keys());
    // Settling and checking in one call (its descriptors run at once, in no set order).
    let r = c.call(vec![weighed(&[("tok", "m")], 9), settle(&[("tok", "m")], "charge", 1)], 1).await.unwrap();
    assert_eq!(r.statuses.iter().map(|s| s.code).collect::<Vec<_>>(), [OK, OK]);
    assert_eq!(one(&mut c, weighed(&[("tok", "m")], 1)).await, (OVER, 0));
}

#[tokio::test]
async fn usage_reads_one_counter() {
    let redis = Redis::start();
    let rls = start(&redis);
    let mut c = rls.client().await;
    assert_eq!(one(&mut c, weighed(&[("tok", "u,v")], 4)).await, (OK, 6));
    // A value with a comma: %-escaped after the split.
    let (status, u) = usage(&rls, "tok=u%2Cv");
    assert_eq!(status, 200, "{u}");
    assert_eq!((u["limit"].as_u64(), u["used"].as_u64(), u["remaining"].as_u64()), (Some(10), Some(4), Some(6)));
    assert_eq!((u["unit"].as_str(), u["window"].as_str()), (Some("minute"), Some("sliding")));
    let reset = u["reset_ms"].as_u64().unwrap();
    assert!((59_000..=60_600).contains(&reset), "{u}");
    let (_, body) = rls.get("/usage?domain=test&descriptor=tok=u%2Cv");
    assert!(body.starts_with(r#"{"limit":10,"used":4,"remaining":6,"reset_ms":"#), "{body}");
    // Reading writes nothing and counts nothing.
    let (_, again) = usage(&rls, "tok=u%2Cv");
    assert_eq!(again["used"], 4);
    assert_eq!(one(&mut c, weighed(&[("tok", "u,v")], 6)).await, (OK, 0));
    // A counter never written: 0 used.
    let (status, u) = usage(&rls, "daily=never");
    assert_eq!((status, u["used"].as_u64(), u["remaining"].as_u64()), (200, Some(0), Some(10)), "{u}");
    assert_eq!(
        (u["unit"].as_str(), u["window"].as_str(), u["time_zone"].as_str()),
        (Some("day"), Some("calendar"), Some("UTC"))
    );
    assert!(u["reset_ms"].as_u64().unwrap() <= 86_400_000);
    assert!(redis.keys().iter().all(|k| !k.contains("never")), "a read creates no key");
    // No limit: 404; a bad query: 400; both JSON.
    let (status, u) = usage(&rls, "nolimit=x");
    assert_eq!(status, 404, "{u}");
    assert!(u["error"].as_str().unwrap().contains("no limit"), "{u}");
    let (status, body) = rls.get("/usage?descriptor=tok=a");
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("domain"), "{body}");
    let (status, _) = rls.get("/usage?domain=test&descriptor=tok");
    assert_eq!(status, 400);
    let (status, u) = usage(&rls, "free=x");
    assert_eq!((status, u["unlimited"].as_bool()), (200, Some(true)), "{u}");
}
