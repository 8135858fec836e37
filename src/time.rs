//! Typed time: an [`Instant`] on the wall clock and a [`Duration`] between two, both whole
//! nanoseconds in a `u64` (good until the year 2554). Zero-cost newtypes: `Copy`, ordered, and
//! every operation saturates (at 0 below, at `u64::MAX` above), so no input can panic or wrap a
//! deadline round to "now".
//!
//! Raw numbers go in and come out only where time meets the outside: the host's clock, the
//! shared-data encodings (each keeps its stored unit), header values, the configuration (in
//! milliseconds) and the stats.
//!
//! ```
//! use llm_ratelimit::time::{Duration, Instant};
//! let t = Instant::from_millis(1_000);
//! assert_eq!((t + Duration::from_millis(250)).as_millis(), 1_250);
//! assert_eq!(t - (t + Duration::from_secs(1)), Duration::ZERO);
//! assert_eq!(Duration::from_nanos(1).as_secs_ceil(), 1);
//! ```

use core::ops::{Add, AddAssign, Div, Mul, Sub, SubAssign};

/// Nanoseconds in a millisecond: the crate's only one.
pub const NANOS_PER_MS: u64 = 1_000_000;
/// The most milliseconds a `u64` of nanoseconds holds: `from_millis` saturates here, so a time
/// read in milliseconds is always a whole millisecond and writes back as the same number.
const MAX_MILLIS: u64 = u64::MAX / NANOS_PER_MS;
const NANOS_PER_SEC: u64 = 1_000_000_000;

/// An instant: nanoseconds since the Unix epoch (or since any origin the caller picks: only
/// differences between instants mean anything here).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Instant(u64);

/// A span of time in nanoseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Duration(u64);

impl Instant {
    /// The origin: also "none" where a stored instant of 0 means nothing was recorded.
    pub const ZERO: Instant = Instant(0);
    pub const MAX: Instant = Instant(u64::MAX);

    pub const fn from_nanos(ns: u64) -> Instant {
        Instant(ns)
    }

    /// `ms` milliseconds after the origin (saturating at the last whole millisecond).
    pub const fn from_millis(ms: u64) -> Instant {
        Instant(Duration::from_millis(ms).0)
    }

    pub const fn as_nanos(self) -> u64 {
        self.0
    }

    /// Whole milliseconds after the origin (rounded down).
    pub const fn as_millis(self) -> u64 {
        self.0 / NANOS_PER_MS
    }

    /// This instant rounded down to a whole millisecond: decisions kept at millisecond resolution
    /// (provider state, queue deadlines) see the clock exactly as their stored values do.
    pub const fn floor_millis(self) -> Instant {
        Instant::from_millis(self.as_millis())
    }

    /// Time from `earlier` to `self`, 0 if `earlier` is later (same as `self - earlier`).
    pub const fn saturating_since(self, earlier: Instant) -> Duration {
        Duration(self.0.saturating_sub(earlier.0))
    }

    /// Time between the two, whichever is later.
    pub const fn abs_diff(self, other: Instant) -> Duration {
        Duration(self.0.abs_diff(other.0))
    }
}

impl Duration {
    pub const ZERO: Duration = Duration(0);
    pub const MAX: Duration = Duration(u64::MAX);

    pub const fn from_nanos(ns: u64) -> Duration {
        Duration(ns)
    }

    /// `ms` milliseconds (saturating at the last whole millisecond).
    pub const fn from_millis(ms: u64) -> Duration {
        let ms = if ms > MAX_MILLIS { MAX_MILLIS } else { ms };
        Duration(ms * NANOS_PER_MS)
    }

    /// `s` seconds (saturating).
    pub const fn from_secs(s: u64) -> Duration {
        Duration(s.saturating_mul(NANOS_PER_SEC))
    }

    /// `s` seconds, rounded up to a whole nanosecond; `as` saturates, so an absurd (or infinite)
    /// span is `Duration::MAX`, and a negative or NaN one is 0.
    pub fn from_secs_f64_ceil(s: f64) -> Duration {
        Duration((s * NANOS_PER_SEC as f64).ceil() as u64)
    }

    pub const fn as_nanos(self) -> u64 {
        self.0
    }

    /// Whole milliseconds (rounded down).
    pub const fn as_millis(self) -> u64 {
        self.0 / NANOS_PER_MS
    }

    /// Milliseconds, rounded up.
    pub const fn as_millis_ceil(self) -> u64 {
        self.0.div_ceil(NANOS_PER_MS)
    }

    /// Whole seconds (rounded down).
    pub const fn as_secs(self) -> u64 {
        self.0 / NANOS_PER_SEC
    }

    /// Seconds, rounded up.
    pub const fn as_secs_ceil(self) -> u64 {
        self.0.div_ceil(NANOS_PER_SEC)
    }

    /// Seconds as a float (rates are tokens per second).
    pub fn as_secs_f64(self) -> f64 {
        self.0 as f64 / NANOS_PER_SEC as f64
    }

    pub const fn is_zero(self) -> bool {
        self.0 == 0
    }
}

impl Add<Duration> for Instant {
    type Output = Instant;
    fn add(self, d: Duration) -> Instant {
        Instant(self.0.saturating_add(d.0))
    }
}

impl AddAssign<Duration> for Instant {
    fn add_assign(&mut self, d: Duration) {
        *self = *self + d;
    }
}

impl Sub<Duration> for Instant {
    type Output = Instant;
    fn sub(self, d: Duration) -> Instant {
        Instant(self.0.saturating_sub(d.0))
    }
}

impl SubAssign<Duration> for Instant {
    fn sub_assign(&mut self, d: Duration) {
        *self = *self - d;
    }
}

/// Saturating at 0: an `earlier` that is later gives no time at all.
impl Sub<Instant> for Instant {
    type Output = Duration;
    fn sub(self, earlier: Instant) -> Duration {
        self.saturating_since(earlier)
    }
}

impl Add for Duration {
    type Output = Duration;
    fn add(self, d: Duration) -> Duration {
        Duration(self.0.saturating_add(d.0))
    }
}

impl AddAssign for Duration {
    fn add_assign(&mut self, d: Duration) {
        *self = *self + d;
    }
}

impl Sub for Duration {
    type Output = Duration;
    fn sub(self, d: Duration) -> Duration {
        Duration(self.0.saturating_sub(d.0))
    }
}

impl Mul<u64> for Duration {
    type Output = Duration;
    fn mul(self, n: u64) -> Duration {
        Duration(self.0.saturating_mul(n))
    }
}

/// `n` times `d`, saturating: reads as written in tests and configuration (`2 * SEC`).
impl Mul<Duration> for u64 {
    type Output = Duration;
    fn mul(self, d: Duration) -> Duration {
        d * self
    }
}

/// A share of `d`, rounded down; dividing by 0 saturates (`Duration::MAX`) rather than panic.
impl Div<u64> for Duration {
    type Output = Duration;
    fn div(self, n: u64) -> Duration {
        self.0.checked_div(n).map_or(Duration::MAX, Duration)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn arithmetic_saturates() {
        assert_eq!(Instant::MAX + Duration::from_nanos(1), Instant::MAX);
        assert_eq!(Instant::ZERO - Duration::from_nanos(1), Instant::ZERO);
        assert_eq!(Instant::from_nanos(5) - Instant::from_nanos(9), Duration::ZERO);
        assert_eq!(Instant::from_nanos(9) - Instant::from_nanos(5), Duration::from_nanos(4));
        assert_eq!(Duration::MAX * 2, Duration::MAX);
        assert_eq!(3 * Duration::from_millis(2), Duration::from_millis(6));
        assert_eq!(Duration::from_millis(6) / 4, Duration::from_nanos(1_500_000));
        assert_eq!(Duration::from_millis(6) / 0, Duration::MAX);
        assert_eq!(Duration::from_millis(3) - Duration::from_millis(5), Duration::ZERO);
        // Saturating at the last whole millisecond: it reads back as the same number.
        let last = Instant::from_millis(u64::MAX);
        assert_eq!(Instant::from_millis(last.as_millis()), last);
        assert_eq!(Duration::from_millis(u64::MAX).as_millis(), u64::MAX / NANOS_PER_MS);
        assert_eq!(Duration::from_secs(u64::MAX), Duration::MAX);
    }

    #[test]
    fn units_convert_and_round_as_named() {
        assert_eq!(Instant::from_millis(7).as_nanos(), 7 * NANOS_PER_MS);
        assert_eq!(Instant::from_nanos(7_999_999).as_millis(), 7);
        assert_eq!(Instant::from_nanos(7_999_999).floor_millis(), Instant::from_millis(7));
        assert_eq!(Duration::from_nanos(1).as_millis_ceil(), 1);
        assert_eq!(Duration::from_nanos(1).as_millis(), 0);
        assert_eq!(Duration::from_millis(1_001).as_secs_ceil(), 2);
        assert_eq!(Duration::from_millis(1_999).as_secs(), 1);
        assert_eq!(Duration::from_secs(2).as_secs_ceil(), 2);
        assert_eq!(Duration::from_secs_f64_ceil(0.1), Duration::from_millis(100));
        assert_eq!(Duration::from_secs_f64_ceil(f64::INFINITY), Duration::MAX);
        assert_eq!(Duration::from_secs_f64_ceil(f64::NAN), Duration::ZERO);
        assert_eq!(Duration::from_millis(1_500).as_secs_f64(), 1.5);
        assert!(Duration::from_millis(1) < Duration::from_secs(1));
        assert_eq!(Instant::from_millis(3).abs_diff(Instant::from_millis(1)), Duration::from_millis(2));
    }
}
