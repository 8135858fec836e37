//! What the provider's answers say about its quota, kept per provider in shared data so every
//! worker acts on it: the adaptive circuit breaker and the hold until a reset.
//!
//! - A 429 whose remaining quota is below `safe_threshold` (or unknown) trips the breaker until
//!   the reset instant: new requests fail fast with a precise `Retry-After`. After the reset one
//!   probe goes first (half-open); its success closes the breaker, a 429 opens it again.
//! - A 429 with quota left, or a success that reports the quota used up, holds requests until the
//!   reset instead: they wait in the queue rather than fail.
//! - A success reporting remaining quota below `throttle_below` spaces requests out so the rest of
//!   the quota lasts until the reset.
//! - Terminal quotas (insufficient_quota, spend limits, daily caps) open the breaker with
//!   `terminal` set, so clients are told not to retry.

use crate::signals::Signals;

/// Breaker position.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Mode {
    #[default]
    Closed = 0,
    Open = 1,
    HalfOpen = 2,
}

/// The shared per-provider state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct State {
    pub mode: Mode,
    /// No request goes upstream before this instant (epoch ms): open breaker or a hold.
    pub until_ms: u64,
    /// When the half-open probe was let through.
    pub probe_ms: u64,
    /// The block is a terminal quota: clients must not retry soon.
    pub terminal: bool,
    /// Trips in a row without a success, for the back-off when a 429 gives no timing.
    pub trips: u32,
}

/// What an arriving or waiting request may do now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Gate {
    Pass,
    /// Pass as the one half-open probe.
    Probe,
    /// Hold until `until_ms` (wait in the queue if that fits, else a local 429).
    Hold {
        until_ms: u64,
    },
    /// Fail fast: the breaker is open until `until_ms`.
    Open {
        until_ms: u64,
        terminal: bool,
    },
}

/// What a provider response did, for stats and the rewritten 429.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Verdict {
    /// When a retry can succeed (epoch ms), for a 429's `Retry-After`.
    pub retry_at_ms: Option<u64>,
    pub tripped: bool,
    pub terminal: bool,
    /// A success reported the quota used up or nearly so: requests are held or spaced.
    pub throttled: bool,
    /// The half-open probe succeeded and closed the breaker.
    pub closed: bool,
}

/// The breaker's knobs.
#[derive(Clone, Debug, PartialEq)]
pub struct Policy {
    pub safe_threshold: f64,
    pub throttle_below: f64,
    /// Longest wait a provider may ask for before it counts as terminal.
    pub max_wait_ms: u64,
    /// How long a probe may take before another is let through.
    pub probe_timeout_ms: u64,
    /// Back-off when a 429 says nothing about timing: doubles per trip up to the max.
    pub backoff_ms: u64,
    pub max_backoff_ms: u64,
    /// How long a terminal quota with no reset blocks.
    pub terminal_block_ms: u64,
}

impl Policy {
    /// Decides for a request at `now_ms`; returns the new state to write, if it changed.
    pub fn gate(&self, s: State, now_ms: u64) -> (Gate, Option<State>) {
        match s.mode {
            Mode::Closed if now_ms < s.until_ms => (Gate::Hold { until_ms: s.until_ms }, None),
            Mode::Closed => (Gate::Pass, None),
            Mode::Open if now_ms < s.until_ms => (Gate::Open { until_ms: s.until_ms, terminal: s.terminal }, None),
            Mode::HalfOpen if now_ms < s.probe_ms.saturating_add(self.probe_timeout_ms) => {
                // The probe is out: others wait for its answer.
                (Gate::Hold { until_ms: now_ms + 1000 }, None)
            }
            Mode::Open | Mode::HalfOpen => {
                (Gate::Probe, Some(State { mode: Mode::HalfOpen, probe_ms: now_ms, terminal: false, ..s }))
            }
        }
    }

    /// Updates the state from one provider response with `status` and parsed `signals`.
    pub fn observe(&self, s: State, status: u16, signals: &Signals, now_ms: u64) -> (Verdict, State) {
        let retry_at = signals.retry_at().filter(|&t| t > now_ms);
        if status == 429 || signals.throttled || signals.terminal.is_some() {
            return self.limited(s, signals, retry_at, now_ms);
        }
        if status >= 500 {
            return (Verdict::default(), s);
        }
        let mut v = Verdict { closed: s.mode == Mode::HalfOpen, ..Verdict::default() };
        let mut next = State { mode: Mode::Closed, trips: 0, terminal: false, ..s };
        if s.mode != Mode::Closed {
            next.until_ms = 0;
        }
        let exhausted = signals.remaining_requests == Some(0) || signals.remaining_tokens == Some(0);
        let reset = signals.requests_reset_ms.max(signals.tokens_reset_ms).filter(|&t| t > now_ms);
        if let (true, Some(at)) = (exhausted, retry_at.or(reset)) {
            // Used up: nothing more fits before the reset.
            next.until_ms = next.until_ms.max(at.min(now_ms.saturating_add(self.max_wait_ms)));
            v.throttled = true;
        } else if let (Some(f), Some(at)) = (signals.remaining_fraction(), reset) {
            if f < self.throttle_below {
                // Spread what is left evenly until the reset.
                let left = signals.remaining_requests.into_iter().chain(signals.remaining_tokens).min().unwrap_or(1);
                let gap = (at - now_ms) / left.max(1);
                next.until_ms = next.until_ms.max(now_ms.saturating_add(gap));
                v.throttled = true;
            }
        }
        (v, next)
    }

    fn limited(&self, s: State, signals: &Signals, retry_at: Option<u64>, now_ms: u64) -> (Verdict, State) {
        let terminal = signals.terminal.is_some() || retry_at.is_some_and(|t| t - now_ms > self.max_wait_ms);
        let quota_left = signals.remaining_fraction().is_some_and(|f| f >= self.safe_threshold)
            && signals.remaining_requests != Some(0)
            && signals.remaining_tokens != Some(0);
        let backoff = self.backoff_ms.saturating_mul(1u64 << s.trips.min(20)).min(self.max_backoff_ms);
        // No exhausted dimension named a time: the nearest reset the provider mentioned.
        let nearest_reset =
            [signals.requests_reset_ms, signals.tokens_reset_ms].into_iter().flatten().filter(|&t| t > now_ms).min();
        let until = match retry_at.or(nearest_reset) {
            Some(t) => t,
            None if terminal => now_ms.saturating_add(self.terminal_block_ms),
            None => now_ms.saturating_add(backoff),
        };
        let mut v = Verdict { retry_at_ms: Some(until), terminal, ..Verdict::default() };
        if quota_left && !terminal && s.mode == Mode::Closed {
            // Quota left: this is a short back-off, not an outage. Hold, do not fail.
            return (v, State { until_ms: s.until_ms.max(until), ..s });
        }
        // Only a change of position is a trip; a later answer may move the reset instant.
        v.tripped = s.mode != Mode::Open;
        let next = State { mode: Mode::Open, until_ms: until, probe_ms: 0, terminal, trips: s.trips.saturating_add(1) };
        (v, next)
    }
}

impl crate::store::Stored for State {
    fn to_bytes(&self) -> Vec<u8> {
        self.encode().to_vec()
    }
    fn from_bytes(b: &[u8]) -> Option<Self> {
        Self::decode(b)
    }
}

impl State {
    pub const ENCODED_LEN: usize = 24;

    pub fn encode(&self) -> [u8; 24] {
        let mut out = [0u8; 24];
        out[0] = self.mode as u8;
        out[1] = self.terminal as u8;
        out[4..8].copy_from_slice(&self.trips.to_le_bytes());
        out[8..16].copy_from_slice(&self.until_ms.to_le_bytes());
        out[16..24].copy_from_slice(&self.probe_ms.to_le_bytes());
        out
    }

    /// `None` for anything that is not a state this module wrote.
    pub fn decode(b: &[u8]) -> Option<State> {
        if b.len() != Self::ENCODED_LEN {
            return None;
        }
        let mode = match b.first()? {
            0 => Mode::Closed,
            1 => Mode::Open,
            2 => Mode::HalfOpen,
            _ => return None,
        };
        Some(State {
            mode,
            terminal: *b.get(1)? == 1,
            trips: u32::from_le_bytes(b.get(4..8)?.try_into().ok()?),
            until_ms: u64::from_le_bytes(b.get(8..16)?.try_into().ok()?),
            probe_ms: u64::from_le_bytes(b.get(16..24)?.try_into().ok()?),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::signals::Terminal;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    const NOW: u64 = 1_700_000_000_000;

    fn policy() -> Policy {
        Policy {
            safe_threshold: 0.05,
            throttle_below: 0.1,
            max_wait_ms: 3_600_000,
            probe_timeout_ms: 10_000,
            backoff_ms: 1_000,
            max_backoff_ms: 60_000,
            terminal_block_ms: 3_600_000,
        }
    }

    fn signals(remaining: Option<u64>, limit: Option<u64>, reset_in_ms: Option<u64>) -> Signals {
        Signals {
            remaining_requests: remaining,
            limit_requests: limit,
            requests_reset_ms: reset_in_ms.map(|d| NOW + d),
            ..Signals::default()
        }
    }

    #[test]
    fn an_exhausted_429_trips_until_the_reset_then_one_probe_closes_it() {
        let p = policy();
        let (v, s) = p.observe(State::default(), 429, &signals(Some(0), Some(100), Some(5_000)), NOW);
        assert!(v.tripped && !v.terminal);
        assert_eq!(v.retry_at_ms, Some(NOW + 5_000));
        assert_eq!(p.gate(s, NOW + 4_999).0, Gate::Open { until_ms: NOW + 5_000, terminal: false });
        let (g, probe) = p.gate(s, NOW + 5_000);
        assert_eq!(g, Gate::Probe);
        let probe = probe.unwrap();
        assert_eq!(probe.mode, Mode::HalfOpen);
        // Only one probe: the next request is held while it is out.
        assert!(matches!(p.gate(probe, NOW + 5_001).0, Gate::Hold { .. }));
        let (v, closed) = p.observe(probe, 200, &signals(Some(99), Some(100), Some(60_000)), NOW + 5_100);
        assert!(v.closed);
        assert_eq!(closed.mode, Mode::Closed);
        assert_eq!(p.gate(closed, NOW + 5_101).0, Gate::Pass);
    }

    #[test]
    fn a_failed_probe_opens_again_and_a_lost_probe_is_replaced() {
        let p = policy();
        let probe = State { mode: Mode::HalfOpen, probe_ms: NOW, ..State::default() };
        let (v, s) = p.observe(probe, 429, &signals(Some(0), Some(100), Some(2_000)), NOW + 100);
        assert!(v.tripped);
        assert_eq!((s.mode, s.until_ms), (Mode::Open, NOW + 2_000));
        assert_eq!(p.gate(probe, NOW + 10_000).0, Gate::Probe, "probe timed out");
    }

    #[test]
    fn a_429_with_quota_left_holds_instead_of_tripping() {
        let p = policy();
        let (v, s) = p.observe(State::default(), 429, &signals(Some(50), Some(100), Some(3_000)), NOW);
        assert!(!v.tripped);
        assert_eq!(s.mode, Mode::Closed);
        assert_eq!(p.gate(s, NOW + 1).0, Gate::Hold { until_ms: NOW + 3_000 });
        assert_eq!(p.gate(s, NOW + 3_000).0, Gate::Pass);
    }

    #[test]
    fn a_429_without_timing_backs_off_exponentially() {
        let p = policy();
        let (v1, s1) = p.observe(State::default(), 429, &Signals::default(), NOW);
        assert_eq!(v1.retry_at_ms, Some(NOW + 1_000));
        let (v2, s2) = p.observe(s1, 429, &Signals::default(), NOW);
        assert_eq!(v2.retry_at_ms, Some(NOW + 2_000));
        let mut s = s2;
        for _ in 0..30 {
            s = p.observe(s, 429, &Signals::default(), NOW).1;
        }
        assert_eq!(s.until_ms, NOW + 60_000, "capped");
    }

    #[test]
    fn terminal_quotas_block_long_and_say_so() {
        let p = policy();
        let sig = Signals { terminal: Some(Terminal::InsufficientQuota), ..Signals::default() };
        let (v, s) = p.observe(State::default(), 429, &sig, NOW);
        assert!(v.terminal && v.tripped);
        assert_eq!(p.gate(s, NOW + 1).0, Gate::Open { until_ms: NOW + 3_600_000, terminal: true });
        // A wait longer than the cap is terminal too.
        let far = Signals { retry_at_ms: Some(NOW + 86_400_000), ..Signals::default() };
        assert!(p.observe(State::default(), 429, &far, NOW).0.terminal);
    }

    #[test]
    fn a_success_that_used_the_quota_up_holds_until_the_reset() {
        let p = policy();
        let (v, s) = p.observe(State::default(), 200, &signals(Some(0), Some(10), Some(4_000)), NOW);
        assert!(v.throttled);
        assert_eq!(p.gate(s, NOW + 10).0, Gate::Hold { until_ms: NOW + 4_000 });
    }

    #[test]
    fn low_remaining_quota_spaces_requests_until_the_reset() {
        let p = policy();
        // 5 of 100 left, reset in 10 s: one request every 2 s.
        let (v, s) = p.observe(State::default(), 200, &signals(Some(5), Some(100), Some(10_000)), NOW);
        assert!(v.throttled);
        assert_eq!(s.until_ms, NOW + 2_000);
        // Plenty left: no throttling.
        let (v, s) = p.observe(State::default(), 200, &signals(Some(50), Some(100), Some(10_000)), NOW);
        assert!(!v.throttled);
        assert_eq!(p.gate(s, NOW).0, Gate::Pass);
    }

    #[test]
    fn server_errors_and_garbage_change_nothing() {
        let p = policy();
        let s = State::default();
        assert_eq!(p.observe(s, 503, &Signals::default(), NOW).1, s);
        assert_eq!(p.observe(s, 200, &Signals::default(), NOW).1, s);
        // A reset in the past is no reason to hold.
        assert_eq!(p.observe(s, 200, &signals(Some(0), Some(10), None), NOW).1, s);
    }

    #[test]
    fn state_round_trips_and_rejects_garbage() {
        let s = State { mode: Mode::HalfOpen, until_ms: 5, probe_ms: 7, terminal: true, trips: 3 };
        assert_eq!(State::decode(&s.encode()), Some(s));
        assert_eq!(State::decode(&[9u8; 24]), None);
        assert_eq!(State::decode(b"short"), None);
    }
}
