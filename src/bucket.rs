//! The token bucket: pure arithmetic over a 16-byte state that the host keeps in Envoy shared
//! data, so every worker spends from the same process-wide bucket.
//!
//! ```
//! use llm_ratelimit::bucket::BucketRules;
//! let bucket = BucketRules::capacity(100).refill_rate(10.0).burst_allowance(20);
//! use llm_ratelimit::time::Instant;
//! let full = bucket.full(Instant::ZERO);
//! // A class that may not spend the reserve keeps `burst` tokens untouched:
//! let after = bucket.take(full, Instant::ZERO, 1.0, bucket.reserve_floor(false)).unwrap();
//! assert_eq!(after.tokens, 119.0);
//! ```
//!
//! The bucket holds `capacity + burst` tokens. Every class may spend down to `burst` tokens; only
//! classes allowed the burst (CRITICAL and HIGH by default) may spend the last `burst` tokens, so
//! batch traffic cannot drain what user-facing traffic needs.

use crate::time::{Duration, Instant};

/// How far behind the last update a clock reading may be and still count as the same instant:
/// two workers read the clock a moment apart before racing to write. Further behind is a step.
pub const CLOCK_JITTER: Duration = Duration::from_millis(100);

/// Bucket parameters, fixed by the configuration.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BucketRules {
    /// Most tokens the bucket holds: capacity + burst.
    pub max: f64,
    /// Tokens no class without the burst may spend.
    pub burst: f64,
    /// Tokens added per second.
    pub rate: f64,
}

/// The bucket's level: tokens left at instant `at` (stored as Unix epoch nanoseconds).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Level {
    pub tokens: f64,
    pub at: Instant,
}

impl BucketRules {
    /// A bucket of `capacity` tokens every class may spend, named as in the configuration:
    /// `BucketRules::capacity(100).refill_rate(10.0).burst_allowance(20)`. It refills nothing
    /// until given a `refill_rate`, and has no reserve until given a `burst_allowance`.
    pub fn capacity(capacity: u64) -> BucketRules {
        BucketRules { max: capacity as f64, burst: 0.0, rate: 0.0 }
    }

    /// These rules refilling `per_sec` tokens a second.
    pub fn refill_rate(self, per_sec: f64) -> BucketRules {
        BucketRules { rate: per_sec, ..self }
    }

    /// These rules with `burst` tokens above the capacity that only classes with `use_burst`
    /// may spend. (Added as floats: exact for any configured size, and no overflow.)
    pub fn burst_allowance(self, burst: u64) -> BucketRules {
        let capacity = self.max - self.burst;
        BucketRules { max: capacity + burst as f64, burst: burst as f64, ..self }
    }

    /// A full bucket at `now`: what the first request of the process finds.
    pub fn full(&self, now: Instant) -> Level {
        Level { tokens: self.max, at: now }
    }

    /// The level below which a class may not spend.
    pub fn reserve_floor(&self, use_burst: bool) -> f64 {
        if use_burst {
            0.0
        } else {
            self.burst
        }
    }

    /// The level brought forward to `now`. A clock that went backwards adds nothing and, past
    /// `CLOCK_JITTER` (workers read the clock a moment apart), restarts the count from `now` so a
    /// step back does not stall the refill for as long as the step.
    pub fn refill(&self, s: Level, now: Instant) -> Level {
        if now <= s.at {
            return if self.stepped_back(s, now) { Level { at: now, ..s } } else { s };
        }
        let elapsed = (now - s.at).as_secs_f64();
        Level { tokens: (s.tokens + elapsed * self.rate).min(self.max), at: now }
    }

    /// Whether `now` is a clock step back from `s`: the refilled level then restarts its count
    /// from `now`, and callers write it even when they take nothing, or the stall persists.
    pub fn stepped_back(&self, s: Level, now: Instant) -> bool {
        s.at - now > CLOCK_JITTER
    }

    /// Takes `n` tokens without going below `floor`, or says how long until they exist.
    pub fn take(&self, s: Level, now: Instant, n: f64, floor: f64) -> Result<Level, Duration> {
        let s = self.refill(s, now);
        if s.tokens - n >= floor - 1e-9 {
            Ok(Level { tokens: s.tokens - n, ..s })
        } else {
            Err(self.wait(s, n, floor))
        }
    }

    /// Time until `s` (already refilled) holds `n` tokens above `floor`.
    pub fn wait(&self, s: Level, n: f64, floor: f64) -> Duration {
        let missing = (floor + n - s.tokens).max(0.0);
        // Saturating: an absurd wait is `Duration::MAX`, never a wrap to "now".
        Duration::from_secs_f64_ceil(missing / self.rate)
    }
}

impl Level {
    pub const ENCODED_LEN: usize = 16;

    pub fn encode(&self) -> [u8; 16] {
        let mut out = [0u8; 16];
        out[..8].copy_from_slice(&self.tokens.to_le_bytes());
        out[8..].copy_from_slice(&self.at.as_nanos().to_le_bytes());
        out
    }

    /// `None` for anything that is not a state this module wrote.
    pub fn decode(bytes: &[u8]) -> Option<Level> {
        let tokens = f64::from_le_bytes(bytes.get(..8)?.try_into().ok()?);
        let at_ns = u64::from_le_bytes(bytes.get(8..16)?.try_into().ok()?);
        let at = Instant::from_nanos(at_ns);
        (bytes.len() == Self::ENCODED_LEN && tokens.is_finite()).then_some(Level { tokens, at })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    const SEC: u64 = 1_000_000_000;

    fn at(ns: u64) -> Instant {
        Instant::from_nanos(ns)
    }

    fn ns(ns: u64) -> Duration {
        Duration::from_nanos(ns)
    }

    /// Takes single tokens at `now` until refused; returns how many were taken.
    fn drain(b: &BucketRules, s: &mut Level, now: Instant, floor: f64) -> u32 {
        let mut n = 0;
        while let Ok(next) = b.take(*s, now, 1.0, floor) {
            *s = next;
            n += 1;
        }
        n
    }

    #[test]
    fn a_full_bucket_admits_capacity_then_the_reserve_only_to_burst_classes() {
        let b = BucketRules::capacity(100).refill_rate(10.0).burst_allowance(20);
        let mut s = b.full(at(5 * SEC));
        assert_eq!(drain(&b, &mut s, at(5 * SEC), b.reserve_floor(false)), 100);
        assert_eq!(drain(&b, &mut s, at(5 * SEC), b.reserve_floor(true)), 20);
        assert_eq!(drain(&b, &mut s, at(5 * SEC), 0.0), 0);
    }

    #[test]
    fn refill_is_exact_and_capped() {
        let b = BucketRules::capacity(100).refill_rate(10.0).burst_allowance(20);
        let empty = Level { tokens: 0.0, at: at(0) };
        assert_eq!(b.refill(empty, at(SEC / 2)).tokens, 5.0);
        assert_eq!(b.refill(empty, at(3 * SEC)).tokens, 30.0);
        assert_eq!(b.refill(empty, at(3600 * SEC)).tokens, 120.0);
        let mut s = empty;
        assert_eq!(drain(&b, &mut s, at(2 * SEC), 0.0), 20);
    }

    #[test]
    fn wait_is_the_time_until_a_token_exists_for_that_class() {
        let b = BucketRules::capacity(100).refill_rate(10.0).burst_allowance(20);
        let s = Level { tokens: 0.0, at: at(0) };
        // A burst class needs 1 token: 0.1 s. Another class needs the reserve refilled too: 2.1 s.
        assert_eq!(b.take(s, at(0), 1.0, 0.0), Err(ns(SEC / 10)));
        assert_eq!(b.take(s, at(0), 1.0, 20.0), Err(ns(21 * SEC / 10)));
        // Half a second later the wait has shrunk by half a second.
        assert_eq!(b.take(s, at(SEC / 2), 1.0, 20.0), Err(ns(16 * SEC / 10)));
    }

    #[test]
    fn slow_rates_keep_fractions() {
        let b = BucketRules::capacity(1).refill_rate(0.1);
        let s = Level { tokens: 0.0, at: at(0) };
        assert!(b.take(s, at(9 * SEC), 1.0, 0.0).is_err());
        assert!(b.take(s, at(10 * SEC), 1.0, 0.0).is_ok());
    }

    #[test]
    fn a_clock_going_backwards_adds_nothing_and_does_not_stall_the_refill() {
        let b = BucketRules::capacity(10).refill_rate(10.0);
        let s = Level { tokens: 1.0, at: at(10 * SEC) };
        // A worker that read the clock a moment before the last writer: same instant.
        assert_eq!(b.refill(s, at(10 * SEC - 1_000)), s);
        // A step back of 5 s: nothing added, and the count restarts from the new clock...
        let stepped = b.refill(s, at(5 * SEC));
        assert_eq!(stepped, Level { tokens: 1.0, at: at(5 * SEC) });
        let after = b.take(s, at(5 * SEC), 1.0, 0.0).unwrap();
        assert_eq!(after, Level { tokens: 0.0, at: at(5 * SEC) });
        // ...so a second later a second's worth is back, not nothing for 5 s.
        assert_eq!(b.refill(after, at(6 * SEC)).tokens, 10.0);
    }

    #[test]
    fn state_round_trips_and_garbage_is_rejected() {
        let s = Level { tokens: 42.5, at: at(1_700_000_000 * SEC) };
        assert_eq!(Level::decode(&s.encode()), Some(s));
        assert_eq!(Level::decode(b""), None);
        assert_eq!(Level::decode(&[0u8; 15]), None);
        assert_eq!(Level::decode(&[0u8; 17]), None);
        let nan = Level { tokens: f64::NAN, at: at(0) }.encode();
        assert_eq!(Level::decode(&nan), None);
    }
}
