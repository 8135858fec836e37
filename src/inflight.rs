//! Requests in flight to the provider, process-wide (`in_flight`): requests that went upstream
//! and have not ended, and the limit on them, fixed (`in_flight.max`) or learned from the
//! provider's answers (`in_flight.adaptive`), for providers that publish no quota.
//!
//! Pure: time comes in as an argument. One shared-data value per provider holds the limit, what
//! the adaptive rule remembers, and one entry per worker with requests out. Each worker writes
//! its own count (never an increment), again every [`HEARTBEAT`] while it has requests out, and
//! an entry not refreshed for [`LIVE`] no longer counts: a VM that reloads or dies gives its
//! slots back within `LIVE` instead of leaking them.
//!
//! # The adaptive limit
//! AIMD on the provider's refusals, with a gradient on the time to its response headers (the
//! first token, for streams): with a queue at the provider, that time grows as requests in flight
//! over its capacity, which is what the rule reads.
//! - The baseline is the shortest time to headers of the last two windows of [`WINDOW`]; the
//!   latency is the time to headers smoothed over the last few answers (each weighs 1/[`SMOOTH`]),
//!   so one answer slowed by the machine, not the provider, moves nothing.
//! - An answer that comes back fine (not 429, 503 or 504, the latency within `tolerance` ×
//!   baseline), to a request that took the last slot the limit allowed, adds [`RAISE`] / limit:
//!   about half a request per round trip while the limit binds, nothing while it does not.
//! - A 429, 503 or 504 (Envoy's own upstream timeout is a 504), or a latency over `tolerance` ×
//!   baseline, cuts the limit to limit × `backoff`, or, for latency, to limit × tolerance ×
//!   baseline ÷ latency when that is lower (at most halving it): the capacity the queueing
//!   shows. One cut per round trip: only the answer to a request sent after the last
//!   cut cuts again.
//! - The limit stays between `floor` and `max`.

use crate::store::Stored;
use crate::time::{Duration, Instant};

/// How often a worker with requests out rewrites its entry.
pub const HEARTBEAT: Duration = Duration::from_millis(250);
/// An entry older than this (or this far in the future, after a clock step) no longer counts.
pub const LIVE: Duration = Duration::from_millis(2_000);
/// The baseline is the shortest time to headers of the current window and the one before.
pub const WINDOW: Duration = Duration::from_secs(10);
/// Most worker entries kept (one per worker with requests out).
const MAX_ENTRIES: usize = 256;
/// A fine answer while the limit binds raises it by RAISE / limit: about half a request per round
/// trip, so the sawtooth above the capacity stays small (from 1 to 8 in about 14 round trips).
pub const RAISE: f64 = 0.5;
/// Each answer's weight in the smoothed latency is 1 / SMOOTH.
pub const SMOOTH: u64 = 4;
/// The expected wait for a slot when no answer has been timed yet.
const UNTIMED: Duration = Duration::from_millis(1_000);

/// The adaptive rule's parameters (`in_flight.adaptive`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Adaptive {
    pub floor: f64,
    pub initial: f64,
    pub tolerance: f64,
    pub backoff: f64,
}

/// The limit on requests in flight.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rules {
    /// The fixed limit, or the ceiling of the adaptive one.
    pub max: f64,
    pub adaptive: Option<Adaptive>,
}

/// One worker's requests out, as of `seen_ms` (Unix epoch milliseconds).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    pub worker: u64,
    pub seen_ms: u64,
    pub count: u32,
}

/// The shared value.
#[derive(Clone, Debug, PartialEq)]
pub struct Shared {
    /// The limit now (whole requests: its integer part, at least 1).
    pub limit: f64,
    /// The shortest time to headers of the current window and the one before, in microseconds
    /// (0: none yet), and when the current window began.
    pub best_us: [u64; 2],
    pub window_at: Instant,
    /// The time to headers, smoothed, in microseconds (0: none yet).
    pub smoothed_us: u64,
    /// When the limit was last cut.
    pub cut_at: Instant,
    pub entries: Vec<Entry>,
}

/// How one answer went, for the adaptive rule.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sample {
    /// When its request took its slot.
    pub sent: Instant,
    /// Whether it took the last slot the limit allowed (the limit was binding).
    pub binding: bool,
    pub status: u16,
    /// Its time to response headers.
    pub latency: Duration,
}

/// What a sample did to the limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    Raised,
    Cut,
}

impl Rules {
    /// The value the first worker writes.
    pub fn fresh(&self, now: Instant) -> Shared {
        Shared {
            limit: self.adaptive.map_or(self.max, |a| a.initial),
            best_us: [0; 2],
            window_at: now,
            smoothed_us: 0,
            cut_at: Instant::ZERO,
            entries: Vec::new(),
        }
    }

    /// `s` under these rules (a reload may have changed them).
    pub fn fit(&self, mut s: Shared) -> Shared {
        s.limit = match self.adaptive {
            None => self.max,
            Some(a) => s.limit.max(a.floor).min(self.max),
        };
        s
    }

    /// Learns from `sample` at `now`; the change it made to the limit, if any.
    pub fn learn(&self, s: &mut Shared, sample: Sample, now: Instant) -> Option<Change> {
        if now.saturating_since(s.window_at) >= WINDOW {
            s.best_us = [0, s.best_us[0]];
            s.window_at = now;
        }
        let overload = matches!(sample.status, 429 | 503 | 504);
        let us = (sample.latency.as_nanos() / 1_000).max(1);
        if !overload {
            if s.best_us[0] == 0 || us < s.best_us[0] {
                s.best_us[0] = us;
            }
            s.smoothed_us = match s.smoothed_us {
                0 => us,
                was => was - was / SMOOTH + us / SMOOTH,
            };
        }
        let a = self.adaptive?;
        let baseline = s.baseline_us();
        let latency = s.smoothed_us.max(1);
        let slow = baseline.is_some_and(|b| latency as f64 > a.tolerance * b as f64);
        if overload || slow {
            if sample.sent < s.cut_at {
                return None;
            }
            let gradient = match baseline {
                Some(b) if slow && !overload => (a.tolerance * b as f64 / latency as f64).max(0.5),
                _ => a.backoff,
            };
            let cut = (s.limit * gradient.min(a.backoff)).max(a.floor);
            s.cut_at = now;
            (cut < s.limit).then(|| {
                s.limit = cut;
                Change::Cut
            })
        } else if sample.binding && s.limit < self.max {
            s.limit = (s.limit + RAISE / s.limit.max(1.0)).min(self.max);
            Some(Change::Raised)
        } else {
            None
        }
    }
}

impl Shared {
    /// Requests the limit allows in flight now.
    pub fn allowed(&self) -> u32 {
        (self.limit.max(1.0) as u64).min(u64::from(u32::MAX)) as u32
    }

    /// The baseline time to headers, in microseconds.
    fn baseline_us(&self) -> Option<u64> {
        self.best_us.iter().copied().filter(|&b| b > 0).min()
    }

    /// How long until a slot is expected to free: the baseline spread over the slots.
    pub fn expected_wait(&self) -> Duration {
        let whole = self.baseline_us().map_or(UNTIMED, |b| Duration::from_nanos(b.saturating_mul(1_000)));
        Duration::from_nanos(whole.as_nanos() / u64::from(self.allowed())).max(Duration::from_millis(1))
    }

    /// Requests out at workers other than `me` whose entries are live at `now`.
    pub fn others(&self, me: u64, now: Instant) -> u32 {
        self.entries.iter().filter(|e| e.worker != me && live(e, now)).fold(0u32, |a, e| a.saturating_add(e.count))
    }

    /// Requests out process-wide, with `own` at worker `me`.
    pub fn total(&self, me: u64, own: u32, now: Instant) -> u32 {
        self.others(me, now).saturating_add(own)
    }

    /// This value with worker `me`'s entry saying `own` at `now` (removed at 0), and entries no
    /// longer live dropped.
    pub fn with_own(mut self, me: u64, own: u32, now: Instant) -> Shared {
        self.entries.retain(|e| e.worker != me && live(e, now));
        if own > 0 && self.entries.len() < MAX_ENTRIES {
            self.entries.push(Entry { worker: me, seen_ms: now.as_millis(), count: own });
        }
        self
    }

    fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(HEAD + 1 + self.entries.len() * 20);
        b.push(VERSION);
        b.extend_from_slice(&self.limit.to_le_bytes());
        let times = [self.best_us[0], self.best_us[1], self.window_at.as_nanos(), self.cut_at.as_nanos()];
        for x in times.into_iter().chain([self.smoothed_us]) {
            b.extend_from_slice(&x.to_le_bytes());
        }
        for e in &self.entries {
            b.extend_from_slice(&e.worker.to_le_bytes());
            b.extend_from_slice(&e.seen_ms.to_le_bytes());
            b.extend_from_slice(&e.count.to_le_bytes());
        }
        b
    }

    fn decode(b: &[u8]) -> Option<Shared> {
        let (&version, rest) = b.split_first()?;
        if version != VERSION || rest.len() < HEAD || !(rest.len() - HEAD).is_multiple_of(20) {
            return None;
        }
        let u64_at = |i: usize| Some(u64::from_le_bytes(rest.get(i..i + 8)?.try_into().ok()?));
        let limit = f64::from_bits(u64_at(0)?);
        if !limit.is_finite() {
            return None;
        }
        let entries = rest[HEAD..]
            .chunks_exact(20)
            .map(|c| {
                Some(Entry {
                    worker: u64::from_le_bytes(c[0..8].try_into().ok()?),
                    seen_ms: u64::from_le_bytes(c[8..16].try_into().ok()?),
                    count: u32::from_le_bytes(c[16..20].try_into().ok()?),
                })
            })
            .collect::<Option<Vec<_>>>()?;
        Some(Shared {
            limit,
            best_us: [u64_at(8)?, u64_at(16)?],
            window_at: Instant::from_nanos(u64_at(24)?),
            cut_at: Instant::from_nanos(u64_at(32)?),
            smoothed_us: u64_at(40)?,
            entries,
        })
    }
}

/// The layout's version (an older value reads as none: the first writer starts afresh).
const VERSION: u8 = 2;
/// Bytes before the entries: the limit and five u64s.
const HEAD: usize = 48;

fn live(e: &Entry, now: Instant) -> bool {
    Instant::from_millis(e.seen_ms).abs_diff(now) <= LIVE
}

impl Stored for Shared {
    fn to_bytes(&self) -> Vec<u8> {
        self.encode()
    }
    fn from_bytes(b: &[u8]) -> Option<Self> {
        Self::decode(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    const T0: u64 = 1_700_000_000_000;

    fn at(ms: u64) -> Instant {
        Instant::from_millis(T0 + ms)
    }

    fn adaptive() -> Rules {
        Rules { max: 64.0, adaptive: Some(Adaptive { floor: 1.0, initial: 1.0, tolerance: 1.2, backoff: 0.9 }) }
    }

    fn sample(sent: u64, binding: bool, status: u16, latency_ms: u64) -> Sample {
        Sample { sent: at(sent), binding, status, latency: Duration::from_millis(latency_ms) }
    }

    #[test]
    fn counts_every_live_worker_and_drops_the_dead() {
        let s = adaptive().fresh(at(0)).with_own(1, 3, at(0)).with_own(2, 2, at(0));
        assert_eq!(s.total(1, 3, at(0)), 5);
        assert_eq!(s.others(3, at(0)), 5);
        // Worker 2 stops writing (its VM reloaded): its slots no longer count after LIVE.
        let later = at(LIVE.as_millis() + 1);
        let s = s.with_own(1, 3, later);
        assert_eq!(s.others(3, later), 3);
        assert_eq!(s.entries.len(), 1);
        // Back to 0: the entry goes.
        assert!(s.with_own(1, 0, later).entries.is_empty());
    }

    #[test]
    fn encodes_and_refuses_garbage() {
        let mut s = adaptive().fresh(at(5)).with_own(7, 2, at(5));
        s.best_us = [1200, 900];
        s.limit = 3.5;
        assert_eq!(Shared::decode(&s.encode()), Some(s.clone()));
        let mut b = s.encode();
        b.pop();
        assert_eq!(Shared::decode(&b), None);
        assert_eq!(Shared::decode(&[]), None);
        let mut nan = s.encode();
        nan[1..9].copy_from_slice(&f64::NAN.to_le_bytes());
        assert_eq!(Shared::decode(&nan), None);
    }

    #[test]
    fn a_fixed_limit_never_moves() {
        let r = Rules { max: 8.0, adaptive: None };
        let mut s = r.fresh(at(0));
        assert_eq!(s.allowed(), 8);
        assert_eq!(r.learn(&mut s, sample(0, true, 503, 10), at(10)), None);
        assert_eq!(r.learn(&mut s, sample(0, true, 200, 10), at(20)), None);
        assert_eq!(s.allowed(), 8);
        // It still times answers, for the expected wait of a slot.
        assert_eq!(s.expected_wait(), Duration::from_nanos(10_000_000 / 8));
    }

    #[test]
    fn grows_only_while_binding_and_cuts_once_per_round_trip() {
        let r = adaptive();
        let mut s = r.fresh(at(0));
        assert_eq!(r.learn(&mut s, sample(0, false, 200, 100), at(100)), None);
        assert_eq!(r.learn(&mut s, sample(0, true, 200, 100), at(100)), Some(Change::Raised));
        assert_eq!(r.learn(&mut s, sample(0, true, 200, 100), at(100)), Some(Change::Raised));
        assert_eq!(s.limit, 1.5 + 0.5 / 1.5);
        // Two 503s to requests sent before the first cut: one cut.
        assert_eq!(r.learn(&mut s, sample(50, true, 503, 100), at(200)), Some(Change::Cut));
        assert!((s.limit - (1.5 + 0.5 / 1.5) * 0.9).abs() < 1e-9);
        assert_eq!(r.learn(&mut s, sample(150, true, 503, 100), at(210)), None);
        // A request sent after it may cut again, never below the floor.
        for t in 0..50 {
            r.learn(&mut s, sample(300 + t * 10, true, 503, 100), at(301 + t * 10));
        }
        assert_eq!(s.limit, 1.0);
        assert_eq!(s.allowed(), 1);
    }

    #[test]
    fn a_slow_answer_cuts_to_the_capacity_its_latency_shows() {
        let r = adaptive();
        let mut s = r.fresh(at(0));
        s.limit = 16.0;
        r.learn(&mut s, sample(0, false, 200, 100), at(100));
        // 16 in flight at a provider serving 4 at once: headers after 400 ms. The first such
        // answer moves the smoothed latency a quarter of the way (175 ms): cut to
        // 16 × 1.2 × 100 / 175.
        assert_eq!(r.learn(&mut s, sample(200, true, 200, 400), at(600)), Some(Change::Cut));
        assert!((s.limit - 16.0 * 1.2 * 100.0 / 175.0).abs() < 1e-9, "{}", s.limit);
        // Answers to requests sent before that cut change nothing; one sent after it, with the
        // smoothed latency at 300 ms, cuts to 1.2 × 100 / 300 of the limit, never below half.
        let before = s.limit;
        assert_eq!(r.learn(&mut s, sample(500, true, 200, 400), at(900)), None);
        assert_eq!(r.learn(&mut s, sample(700, true, 200, 400), at(1100)), Some(Change::Cut));
        assert!((s.limit - before * 0.5).abs() < 1e-9, "{}", s.limit);
        // One answer slowed by the machine, not the provider, moves the smoothed latency a
        // quarter as far: no cut.
        let mut t = r.fresh(at(0));
        t.limit = 8.0;
        r.learn(&mut t, sample(0, false, 200, 100), at(100));
        assert_eq!(r.learn(&mut t, sample(200, true, 200, 170), at(370)), Some(Change::Raised));
    }

    #[test]
    fn the_baseline_forgets_after_two_windows() {
        let r = adaptive();
        let mut s = r.fresh(at(0));
        r.learn(&mut s, sample(0, false, 200, 100), at(100));
        r.learn(&mut s, sample(0, false, 200, 300), at(100 + WINDOW.as_millis()));
        assert_eq!(s.baseline_us(), Some(100_000));
        r.learn(&mut s, sample(0, false, 200, 300), at(100 + 2 * WINDOW.as_millis()));
        assert_eq!(s.baseline_us(), Some(300_000));
    }

    /// A provider serving `k` at once (each in `service` ms, up to `jitter` longer at random: the
    /// machine's noise) and queueing the rest first in, first out, sending headers when it is
    /// done; `clients` closed-loop clients behind the limit; from `start` to `end` ms. Returns
    /// the answers served and the limits allowed at each answer.
    struct Model {
        free: Vec<u64>,
        out: std::collections::BinaryHeap<std::cmp::Reverse<(u64, u64, bool)>>,
        seed: u64,
    }

    impl Model {
        fn new(k: usize) -> Model {
            Model { free: vec![0; k], out: Default::default(), seed: 7 }
        }

        /// Capacity `k` from now: requests in service finish; new ones wait for `k` to be free.
        fn resize(&mut self, k: usize) {
            self.free.sort_unstable();
            let drop = self.free.len().saturating_sub(k);
            self.free.drain(..drop);
        }

        fn send(&mut self, t: u64, binding: bool, service: u64, jitter: u64) {
            self.free.sort_unstable();
            let start = self.free[0].max(t);
            self.seed = self.seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let done = start + service + (self.seed >> 33) % (jitter + 1);
            self.free[0] = done;
            self.out.push(std::cmp::Reverse((done, t, binding)));
        }

        fn run(
            &mut self,
            r: &Rules,
            s: &mut Shared,
            t: &mut u64,
            end: u64,
            service: u64,
            jitter: u64,
        ) -> (u64, Vec<u32>) {
            let (mut served, mut allowed) = (0, Vec::new());
            loop {
                while (self.out.len() as u32) < s.allowed().min(24) {
                    let binding = self.out.len() as u32 + 1 >= s.allowed();
                    self.send(*t, binding, service, jitter);
                }
                let std::cmp::Reverse((done, sent, binding)) = self.out.pop().expect("in flight");
                if done > end {
                    self.out.push(std::cmp::Reverse((done, sent, binding)));
                    *t = end;
                    return (served, allowed);
                }
                *t = done;
                r.learn(
                    s,
                    Sample { sent: at(sent), binding, status: 200, latency: Duration::from_millis(done - sent) },
                    at(done),
                );
                served += 1;
                allowed.push(s.allowed());
            }
        }
    }

    /// From cold, against a provider of capacity K = 8 that queues, with 15% noise on its times:
    /// the limit is within [0.75 K, 1.25 K] after 10 s and stays there, the provider serves over
    /// 90% of what K allows, and when K drops to 4 the limit follows within 5 s.
    #[test]
    fn finds_a_hidden_capacity_and_follows_it_down() {
        let r = adaptive();
        let mut s = r.fresh(at(0));
        let (service, jitter) = (200, 30);
        let mut m = Model::new(8);
        let mut t = 0;
        m.run(&r, &mut s, &mut t, 10_000, service, jitter);
        assert!((6..=10).contains(&s.allowed()), "after 10 s: {}", s.limit);
        let (served, allowed) = m.run(&r, &mut s, &mut t, 20_000, service, jitter);
        let most = 8.0 * 10_000.0 / (service as f64 + jitter as f64 / 2.0);
        assert!(served as f64 >= 0.9 * most, "served {served} of {most:.0}");
        assert!(allowed.iter().all(|n| (6..=10).contains(n)), "{allowed:?}");
        m.resize(4);
        m.run(&r, &mut s, &mut t, 25_000, service, jitter);
        assert!((3..=5).contains(&s.allowed()), "5 s after K dropped to 4: {}", s.limit);
    }
}
