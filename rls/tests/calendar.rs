//! Calendar windows (`unit: day` and `unit: month`): one counter per window, reset at the local
//! midnight of the limit's `time_zone`. `--clock-offset-s` moves the service's clock; Redis keeps
//! the counts across restarts, so a test can stand just before a midnight, and cross it.

mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::*;

const CALENDAR_LIMITS: &str = "
domain: test
descriptors:
  - key: utc
    rate_limit: {unit: day, requests_per_unit: 3}
  - key: pacific
    rate_limit: {unit: day, requests_per_unit: 3, time_zone: 'PST8PDT,M3.2.0,M11.1.0'}
  - key: monthly
    rate_limit: {unit: month, requests_per_unit: 3, time_zone: UTC}
  - key: monthly-la
    rate_limit: {unit: month, requests_per_unit: 3, time_zone: 'PST8PDT,M3.2.0,M11.1.0'}
";

/// 2025-06-16 00:00 UTC.
const UTC_MIDNIGHT: i64 = 1_750_032_000;
/// 2025-01-15 00:00 PST = 08:00 UTC.
const PST_MIDNIGHT: i64 = 1_736_928_000;
/// 2025-07-15 00:00 PDT = 07:00 UTC.
const PDT_MIDNIGHT: i64 = 1_752_562_800;
/// 2025-03-01 00:00 UTC, after a February of 28 days; March has 31.
const MARCH_UTC: i64 = 1_740_787_200;
/// 2025-03-01 00:00 PST = 08:00 UTC.
const MARCH_PST: i64 = 1_740_816_000;

fn now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs_f64()
}

/// The service, its clock shifted by `offset` seconds.
struct Shifted {
    rls: Rls,
    client: Client,
    offset: i64,
}

impl Shifted {
    async fn start(redis: &Redis, offset: i64) -> Shifted {
        let url = format!("redis://127.0.0.1:{}", redis.port);
        // A second for Redis: these tests time midnights, not Redis; a loaded machine (CI on 2
        // cores) can take more than the default 40 ms.
        let flags = ["--redis", &url, "--clock-offset-s", &offset.to_string(), "--redis-timeout", "1s"];
        let rls = Rls::start_limits(CALENDAR_LIMITS, &flags, &[]);
        let client = rls.client().await;
        Shifted { rls, client, offset }
    }

    /// The service's time now (Redis runs on this machine's clock).
    fn clock(&self) -> f64 {
        now() + self.offset as f64
    }

    /// Sleeps until the service's clock reads `t`.
    async fn sleep_until(&self, t: f64) {
        tokio::time::sleep(Duration::from_secs_f64((t - self.clock()).max(0.0))).await;
    }

    /// (code, remaining, seconds until reset) of one hit on `entries`.
    async fn hit(&mut self, entries: &[(&str, &str)]) -> (i32, u32, f64) {
        let r = self.client.call(vec![descriptor(entries)], 1).await.unwrap();
        let s = &r.statuses[0];
        let reset = s.duration_until_reset.unwrap();
        (s.code, s.limit_remaining, reset.seconds as f64 + reset.nanos as f64 / 1e9)
    }
}

/// An offset that puts the service's clock 0.8 to 0.9 s before `target`: whole seconds, so
/// this waits for the right fraction of a second first.
async fn offset_just_before(target: i64) -> i64 {
    let t = now();
    let wait = (1.1 - t.fract()).rem_euclid(1.0);
    tokio::time::sleep(Duration::from_secs_f64(wait)).await;
    // now is k + 0.1 (or a little more): the clock reads target - 0.9.
    target - 1 - now().floor() as i64
}

const OK: i32 = Code::Ok as i32;
const OVER: i32 = Code::OverLimit as i32;

fn close(got: f64, want: f64, within: f64) -> bool {
    (got - want).abs() <= within
}

#[tokio::test]
async fn utc_day_resets_at_midnight_and_counts_survive_restarts() {
    let redis = Redis::start();
    let e = [("utc", "t")];
    // An hour before midnight: two of three.
    let mut rls = Shifted::start(&redis, UTC_MIDNIGHT - 3600 - now() as i64).await;
    let (code, remaining, reset) = rls.hit(&e).await;
    assert_eq!((code, remaining), (OK, 2));
    assert!(close(reset, 3600.0, 2.0), "until reset {reset} s");
    assert_eq!(rls.hit(&e).await.0, OK);
    let (_, u) = usage(&rls.rls, "utc=t");
    assert_eq!((u["used"].as_u64(), u["remaining"].as_u64(), u["unit"].as_str()), (Some(2), Some(1), Some("day")));
    assert!(close(u["reset_ms"].as_f64().unwrap(), 3_600_000.0, 2000.0), "{u}");
    drop(rls);

    // Restarted a second before midnight: the count is Redis', so one more fits, then none.
    let mut rls = Shifted::start(&redis, offset_just_before(UTC_MIDNIGHT).await).await;
    assert!(rls.clock() < UTC_MIDNIGHT as f64 - 0.3, "too slow to start");
    let (code, remaining, reset) = rls.hit(&e).await;
    assert_eq!((code, remaining), (OK, 0));
    let until = UTC_MIDNIGHT as f64 - rls.clock();
    assert!(close(reset, until, 0.05), "until reset {reset} s, midnight in {until} s");
    assert_eq!(rls.hit(&e).await.0, OVER);
    let (_, u) = usage(&rls.rls, "utc=t");
    assert!(u["reset_ms"].as_u64().unwrap() <= 1000, "{u}");
    // Exactly at midnight, not before.
    rls.sleep_until(UTC_MIDNIGHT as f64 - 0.08).await;
    assert_eq!(rls.hit(&e).await.0, OVER, "just before midnight");
    rls.sleep_until(UTC_MIDNIGHT as f64 + 0.02).await;
    let (code, remaining, reset) = rls.hit(&e).await;
    assert_eq!((code, remaining), (OK, 2), "after midnight: a new day");
    assert!(close(reset, 86_400.0, 0.2), "a whole day to go: {reset}");
    // One key per day, each kept until its day ends (plus a margin).
    let mut keys = redis.keys();
    keys.sort();
    let day = |start: i64| format!("{{test_utc_t}}:day:{start}");
    assert_eq!(keys, [day(UTC_MIDNIGHT - 86_400), day(UTC_MIDNIGHT)]);
    let ttl: i64 = redis.cli(&["TTL", &day(UTC_MIDNIGHT)]).trim().parse().unwrap();
    assert!((86_400..=86_400 + 600).contains(&ttl), "ttl {ttl}");
}

#[tokio::test]
async fn pacific_day_resets_at_local_midnight_in_winter_and_summer() {
    let redis = Redis::start();
    let e = [("pacific", "p")];
    // UTC midnight (16:00 or 17:00 in Los Angeles) resets nothing.
    let utc_midnight = PST_MIDNIGHT - 8 * 3600;
    let mut rls = Shifted::start(&redis, offset_just_before(utc_midnight).await).await;
    for want in [OK, OK, OK, OVER] {
        assert_eq!(rls.hit(&e).await.0, want);
    }
    let (_, _, reset) = rls.hit(&e).await;
    assert!(close(reset, 8.0 * 3600.0 + (utc_midnight as f64 - rls.clock()), 0.05), "{reset}");
    rls.sleep_until(utc_midnight as f64 + 0.02).await;
    assert_eq!(rls.hit(&e).await.0, OVER, "UTC midnight is not Pacific midnight");
    drop(rls);
    // Midnight PST (08:00 UTC), exactly.
    let mut rls = Shifted::start(&redis, offset_just_before(PST_MIDNIGHT).await).await;
    let (code, _, reset) = rls.hit(&e).await;
    assert_eq!(code, OVER, "still the same day");
    assert!(close(reset, PST_MIDNIGHT as f64 - rls.clock(), 0.05), "{reset}");
    let (_, u) = usage(&rls.rls, "pacific=p");
    assert_eq!((u["used"].as_u64(), u["time_zone"].as_str()), (Some(3), Some("PST8PDT,M3.2.0,M11.1.0")), "{u}");
    rls.sleep_until(PST_MIDNIGHT as f64 - 0.08).await;
    assert_eq!(rls.hit(&e).await.0, OVER);
    rls.sleep_until(PST_MIDNIGHT as f64 + 0.02).await;
    let (code, remaining, reset) = rls.hit(&e).await;
    assert_eq!((code, remaining), (OK, 2), "after midnight PST");
    assert!(close(reset, 86_400.0, 0.2), "{reset}");
    drop(rls);
    // In summer, midnight PDT is 07:00 UTC.
    let mut rls = Shifted::start(&redis, offset_just_before(PDT_MIDNIGHT).await).await;
    for want in [OK, OK, OK, OVER] {
        assert_eq!(rls.hit(&e).await.0, want);
    }
    rls.sleep_until(PDT_MIDNIGHT as f64 + 0.02).await;
    let (code, remaining, _) = rls.hit(&e).await;
    assert_eq!((code, remaining), (OK, 2), "after midnight PDT");
}

#[tokio::test]
async fn month_window_resets_on_the_first() {
    let redis = Redis::start();
    // March is 31 days; in Los Angeles an hour shorter (DST starts on the 9th).
    let march = 31 * 86_400;
    for (key, first, length) in [("monthly", MARCH_UTC, march), ("monthly-la", MARCH_PST, march - 3600)] {
        let e = [(key, "m")];
        // Ten seconds before March: the last of February's three.
        let mut rls = Shifted::start(&redis, first - 10 - now() as i64).await;
        for want in [OK, OK, OK, OVER] {
            assert_eq!(rls.hit(&e).await.0, want, "{key}");
        }
        let (_, u) = usage(&rls.rls, &format!("{key}=m"));
        assert_eq!((u["used"].as_u64(), u["unit"].as_str()), (Some(3), Some("month")), "{u}");
        assert!(close(u["reset_ms"].as_f64().unwrap(), 10_000.0, 1500.0), "{u}");
        drop(rls);
        // Ten seconds into March: a new month.
        let mut rls = Shifted::start(&redis, first + 10 - now() as i64).await;
        let (code, remaining, reset) = rls.hit(&e).await;
        assert_eq!((code, remaining), (OK, 2), "{key}");
        assert!(close(reset, (length - 10) as f64, 1.5), "{key}: {reset}");
        let start = |t: i64| format!("{{test_{key}_m}}:month:{t}");
        assert!(redis.keys().contains(&start(first)), "{key}: {:?}", redis.keys());
    }
}

#[test]
fn bad_time_zone_refuses_to_start_naming_the_field() {
    let bad = [
        ("rate_limit: {unit: day, requests_per_unit: 1, time_zone: 'America/Los_Angeles'}", "zone database"),
        ("rate_limit: {unit: day, requests_per_unit: 1, time_zone: 'PST8PDT'}", "not a POSIX TZ rule"),
        ("rate_limit: {unit: minute, requests_per_unit: 1, time_zone: UTC}", "only a calendar window"),
        ("rate_limit: {unit: day, rolling: true, requests_per_unit: 1, time_zone: UTC}", "only a calendar window"),
    ];
    for (limit, why) in bad {
        let yaml = format!("domain: d\ndescriptors:\n  - key: a\n    descriptors:\n      - key: b\n        {limit}\n");
        match launch(&args_with_limits(&yaml), &[]) {
            Launch::Exited(code, stderr) => {
                assert_eq!(code, Some(2), "{stderr}");
                assert!(stderr.contains("descriptors[0].descriptors[0].rate_limit.time_zone: "), "{stderr}");
                assert!(stderr.contains(why), "{limit}: {stderr}");
            }
            other => panic!("{limit}: {other:?}"),
        }
    }
}
