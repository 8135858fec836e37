//! What the provider's answers say about its quota, kept per provider in shared data so every
//! worker acts on it: the adaptive circuit breaker and the hold until a reset.
//!
//! One exhausted window is one event, however many answers report it:
//! - A 429 with the quota gone (below `safe_threshold`, or unknown) trips the breaker until the
//!   provider's reset. 429s that arrive while it is open answer requests admitted before the trip:
//!   they may move the reset to a later instant the provider names, never add a trip or back-off.
//! - A 429 with quota left, or a success that reports the quota used up, holds requests until the
//!   reset instead (they wait rather than fail). A 429 during a hold is the same event.
//! - When the provider named its reset, the breaker closes at that instant: traffic resumes at
//!   the bucket's pace, and a 429 then trips it again (`reset.early`). When it named none (a
//!   back-off guess, or a terminal quota's block), one probe goes first after it (half-open).
//!   Only the probe's answer counts: its success closes the breaker, its 429 opens it again.
//!   Answers to older requests change nothing. Back-off for 429s without timing doubles only
//!   when a probe fails.
//! - Terminal quotas (insufficient_quota, spend limits, daily caps) open the breaker with
//!   `terminal` set, so clients are told not to retry.
//! - A success reporting remaining quota below `throttle_below` spaces requests out so the rest of
//!   the quota lasts until the reset.

use crate::signals::Signals;
use crate::time::{Duration, Instant};

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
pub struct ProviderState {
    pub mode: Mode,
    /// No request goes upstream before this instant (stored in epoch ms): open breaker or a hold.
    pub until: Instant,
    /// When the current half-open probe was let through (stored in epoch ms).
    pub probe_at: Instant,
    /// Number of the latest probe: an answer carrying it is the probe's.
    pub probe: u32,
    /// The block is a terminal quota: clients must not retry soon.
    pub terminal: bool,
    /// Probes in a row that failed, for the back-off when a 429 gives no timing.
    pub failed_probes: u32,
    /// A hold or trip ended at `until`; the first answer after it tells whether that reset
    /// was accurate.
    pub checking: bool,
    /// The breaker opened on a guess (back-off without timing, or a terminal quota): after it a
    /// probe goes first. When the provider named its reset, the breaker closes at that instant.
    pub guessed: bool,
    /// Requests per window the provider allowed when it last ran out (0: unknown). After that
    /// hold, only this many go before the provider says more.
    pub limit: u32,
    /// Counting down the requests left in the provider's window since a hold ended.
    pub counting: bool,
    pub left: u32,
    /// None left: held until this instant (stored in epoch ms) for the provider to name its next
    /// reset.
    pub dry_until: Instant,
}

/// What an arriving or waiting request may do now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Gate {
    Pass,
    /// Pass, and count it against what the provider has left (`BreakerRules::spend`).
    Counted,
    /// Pass as half-open probe number `probe`, ahead of everything held for it.
    Probe {
        probe: u32,
    },
    /// Hold until `until` (wait in the queue if that fits, else a local 429).
    Hold {
        until: Instant,
    },
    /// The breaker is open until `until` (wait if that fits; terminal quotas fail fast).
    Open {
        until: Instant,
        terminal: bool,
    },
}

impl Gate {
    /// Nothing may go upstream before this instant; `Instant::ZERO` when requests may pass.
    pub fn not_before(self) -> Instant {
        match self {
            Gate::Pass | Gate::Counted | Gate::Probe { .. } => Instant::ZERO,
            Gate::Hold { until } | Gate::Open { until, .. } => until,
        }
    }
}

/// What a provider answer did, for stats and the rewritten 429.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Verdict {
    /// When a retry can succeed, for a 429's `Retry-After`.
    pub retry_at: Option<Instant>,
    /// The breaker opened (a trip, or a failed probe).
    pub tripped: bool,
    pub terminal: bool,
    /// A success reported the quota used up or nearly so: requests are held or spaced.
    pub throttled: bool,
    /// The half-open probe succeeded and closed the breaker.
    pub closed: bool,
    /// First answer after a hold or trip: `true` if it succeeded (our reset was right), `false`
    /// if it was a 429 again (our reset was early).
    pub reset_accurate: Option<bool>,
    /// How far a later answer placed the reset from the one we used.
    pub reset_error: Option<Duration>,
}

/// The breaker's knobs.
#[derive(Clone, Debug, PartialEq)]
pub struct BreakerRules {
    pub safe_threshold: f64,
    pub throttle_below: f64,
    /// Longest wait a provider may ask for before it counts as terminal.
    pub max_wait_ms: u64,
    /// How long a probe may take before another is let through.
    pub probe_timeout_ms: u64,
    /// Back-off when a 429 says nothing about timing: doubles per failed probe up to the max.
    pub backoff_ms: u64,
    pub max_backoff_ms: u64,
    /// How long a terminal quota with no reset blocks.
    pub terminal_block_ms: u64,
}

/// Longest a request is held while the probe is out before it is told to retry (or, for a router
/// retry, decided again).
pub const PROBE_HOLD: Duration = Duration::from_millis(1000);
/// How long the provider's count may stay at zero before the filter stops counting (the answer
/// naming the next reset never came: demand fell, or the provider stopped reporting).
const DRY_HOLD: Duration = Duration::from_millis(1000);

impl BreakerRules {
    /// Decides for a request at `now`; returns the new state to write, if it changed. `key`
    /// (the worker's random id, see `probe_number`) makes a new probe's number unguessable.
    pub fn gate(&self, s: ProviderState, now: Instant, key: u64) -> (Gate, Option<ProviderState>) {
        match s.mode {
            Mode::Closed if now < s.until => (Gate::Hold { until: s.until }, None),
            Mode::Closed if self.window_opens(&s, now) => (Gate::Counted, Some(self.count_window(s))),
            Mode::Closed if s.counting && s.left > 0 => (Gate::Counted, None),
            Mode::Closed if s.counting && s.dry_until == Instant::ZERO => {
                let dry_until = now + DRY_HOLD;
                (Gate::Hold { until: dry_until }, Some(ProviderState { dry_until, ..s }))
            }
            Mode::Closed if s.counting && now < s.dry_until => (Gate::Hold { until: s.dry_until }, None),
            Mode::Closed if s.counting => (Gate::Pass, Some(ProviderState { counting: false, limit: 0, ..s })),
            Mode::Closed => (Gate::Pass, None),
            Mode::Open if now < s.until => (Gate::Open { until: s.until, terminal: s.terminal }, None),
            // The provider said when its quota comes back: that instant closes the breaker, and
            // the first answers after it tell whether it was right.
            Mode::Open if !s.guessed => {
                let next = ProviderState {
                    mode: Mode::Closed,
                    counting: s.limit > 0,
                    left: s.limit,
                    dry_until: Instant::ZERO,
                    ..s
                };
                (if s.limit > 0 { Gate::Counted } else { Gate::Pass }, Some(next))
            }
            Mode::HalfOpen if now < s.probe_at + self.probe_timeout() => {
                // The probe is out: the others wait for its answer.
                let until = (now + PROBE_HOLD).min(s.probe_at + self.probe_timeout());
                (Gate::Hold { until }, None)
            }
            Mode::Open | Mode::HalfOpen => {
                let probe = probe_number(key, s.probe, now.as_millis());
                let next = ProviderState { mode: Mode::HalfOpen, probe_at: now, probe, terminal: false, ..s };
                (Gate::Probe { probe }, Some(next))
            }
        }
    }

    /// Until when a request that cannot be the probe (a router retry) may wait for the probe's
    /// answer, while the breaker waits for one: the probe's timeout while it is out; when one is
    /// due but not out (nobody arrived to be it, or it was lost), a whole timeout more. `None`
    /// when no probe is awaited.
    pub fn probe_awaited(&self, s: &ProviderState, now: Instant) -> Option<Instant> {
        let due = match s.mode {
            Mode::HalfOpen => {
                let deadline = s.probe_at + self.probe_timeout();
                if now < deadline {
                    return Some(deadline);
                }
                deadline
            }
            Mode::Open if s.guessed && now >= s.until => s.until,
            Mode::Open | Mode::Closed => return None,
        };
        Some(due + self.probe_timeout())
    }

    /// A hold for an exhausted window whose limit is known has ended: the new window is counted.
    pub fn window_opens(&self, s: &ProviderState, now: Instant) -> bool {
        s.mode == Mode::Closed && !s.counting && s.limit > 0 && s.until > Instant::ZERO && now >= s.until
    }

    /// `s` counting a new window of `limit` requests.
    pub fn count_window(&self, s: ProviderState) -> ProviderState {
        ProviderState { counting: true, left: s.limit, dry_until: Instant::ZERO, ..s }
    }

    /// A `Counted` request went upstream: one fewer left in the provider's window.
    pub fn spend(&self, s: ProviderState) -> Option<ProviderState> {
        (s.counting && s.left > 0).then(|| ProviderState { left: s.left - 1, ..s })
    }

    /// Updates the state from one provider answer with `status` and parsed `signals`. `probe` is
    /// the probe number the request carried, if it was let through as a probe.
    pub fn observe(
        &self,
        s: ProviderState,
        status: u16,
        signals: &Signals,
        probe: Option<u32>,
        now: Instant,
    ) -> (Verdict, ProviderState) {
        let limited = status == 429 || signals.throttled || signals.terminal.is_some();
        if !limited && status >= 500 {
            return (Verdict::default(), s);
        }
        let is_probe = s.mode == Mode::HalfOpen && probe == Some(s.probe);
        let mut v = Verdict::default();
        let mut s = s;
        if s.checking && (is_probe || (s.mode == Mode::Closed && now >= s.until)) {
            v.reset_accurate = Some(!limited);
            s.checking = false;
        }
        if limited {
            return self.limited(s, signals, is_probe, now, v);
        }
        match s.mode {
            // Answers to requests admitted before the trip: the breaker stays as it is.
            Mode::Open => return (v, s),
            Mode::HalfOpen if !is_probe => return (v, s),
            Mode::HalfOpen => {
                v.closed = true;
                s = ProviderState { mode: Mode::Closed, until: Instant::ZERO, terminal: false, failed_probes: 0, ..s };
            }
            Mode::Closed => {}
        }
        let exhausted = signals.remaining_requests == Some(0) || signals.remaining_tokens == Some(0);
        let retry_at = at_ms(signals.retry_at()).filter(|&t| t > now);
        let reset = at_ms(signals.requests_reset_ms.max(signals.tokens_reset_ms)).filter(|&t| t > now);
        if let (true, Some(at)) = (exhausted, retry_at.or(reset)) {
            // Used up: nothing more fits before the reset, and then only the window's limit.
            let at = at.min(now + self.max_wait());
            if at > s.until {
                s.until = at;
                s.checking = true;
                s.counting = false;
                s.limit = window_limit(signals);
            }
            v.throttled = true;
        } else if s.counting {
            // The provider's own count can only lower ours: answers in flight are already spent.
            if let Some(r) = signals.remaining_requests {
                s.left = s.left.min(r.min(u64::from(u32::MAX)) as u32);
            }
        } else if let (Some(f), Some(at)) = (signals.remaining_fraction(), reset) {
            if f < self.throttle_below {
                // Spread what is left evenly until the reset.
                let left = signals.remaining_requests.into_iter().chain(signals.remaining_tokens).min().unwrap_or(1);
                let gap = Duration::from_millis((at - now).as_millis() / left.max(1));
                s.until = s.until.max(now + gap);
                v.throttled = true;
            }
        }
        (v, s)
    }

    fn limited(
        &self,
        s: ProviderState,
        signals: &Signals,
        is_probe: bool,
        now: Instant,
        mut v: Verdict,
    ) -> (Verdict, ProviderState) {
        let retry_at = at_ms(signals.retry_at()).filter(|&t| t > now);
        let terminal = signals.terminal.is_some() || retry_at.is_some_and(|t| t - now > self.max_wait());
        // The provider's own timing: an explicit retry instant, else the nearest reset it named.
        let nearest_reset = [signals.requests_reset_ms, signals.tokens_reset_ms]
            .into_iter()
            .flatten()
            .map(Instant::from_millis)
            .filter(|&t| t > now)
            .min();
        let stated = retry_at.or(nearest_reset).filter(|_| !terminal);
        if let Some(t) =
            stated.filter(|_| s.until > Instant::ZERO && (s.mode != Mode::Closed || now < s.until || is_probe))
        {
            v.reset_error = Some(t.abs_diff(s.until));
        }
        let open = |until: Instant, failed_probes: u32, guessed: bool| ProviderState {
            mode: Mode::Open,
            until,
            terminal,
            failed_probes,
            checking: !terminal,
            guessed,
            counting: false,
            limit: window_limit(signals).max(if s.counting { s.limit } else { 0 }),
            ..s
        };
        let (v, next) = if terminal {
            let until = retry_at.unwrap_or(now + Duration::from_millis(self.terminal_block_ms));
            v.tripped = !(s.mode == Mode::Open && s.terminal);
            (v, open(until.max(s.until), s.failed_probes, true))
        } else {
            match s.mode {
                Mode::Open => {
                    // The same exhausted window: only the provider's timing may move the reset.
                    let until = stated.map_or(s.until, |t| t.max(s.until));
                    (v, ProviderState { until, guessed: s.guessed && stated.is_none(), ..s })
                }
                Mode::HalfOpen if !is_probe => (v, s),
                Mode::HalfOpen => {
                    // The probe failed: open again; only now does the back-off grow.
                    let failed = s.failed_probes.saturating_add(1);
                    v.tripped = true;
                    (v, open(stated.unwrap_or(now + self.backoff(failed)), failed, stated.is_none()))
                }
                Mode::Closed => {
                    let holding = now < s.until;
                    let quota_left = signals.remaining_fraction().is_some_and(|f| f >= self.safe_threshold)
                        && signals.remaining_requests != Some(0)
                        && signals.remaining_tokens != Some(0);
                    if holding || quota_left {
                        // A short back-off, or answers to requests admitted before the hold: hold
                        // (do not fail) until the provider's reset.
                        let until = stated.unwrap_or(now + self.backoff(0));
                        let until = if holding { until.max(s.until) } else { until };
                        (v, ProviderState { until, checking: true, ..s })
                    } else {
                        v.tripped = true;
                        let until = stated.unwrap_or(now + self.backoff(s.failed_probes));
                        (v, open(until, s.failed_probes, stated.is_none()))
                    }
                }
            }
        };
        let v = Verdict { retry_at: Some(next.until.max(now + Duration::from_millis(1))), terminal, ..v };
        (v, next)
    }

    /// Back-off after `failed` probes in a row: doubles each time, capped.
    fn backoff(&self, failed: u32) -> Duration {
        Duration::from_millis(self.backoff_ms.saturating_mul(1u64 << failed.min(20)).min(self.max_backoff_ms))
    }

    /// `max_wait_ms`, typed.
    fn max_wait(&self) -> Duration {
        Duration::from_millis(self.max_wait_ms)
    }

    /// `probe_timeout_ms`, typed.
    pub fn probe_timeout(&self) -> Duration {
        Duration::from_millis(self.probe_timeout_ms)
    }
}

/// A new probe's number. Only the answer carrying it closes the breaker or grows the back-off,
/// and it travels in a request header: a client that could guess it (sending the header itself)
/// could close the breaker early or back everyone off. So it mixes the worker's random `key` (it
/// never leaves the process) with the old number and the time over all 32 bits; never 0 (a fresh
/// state's) nor the old number. Not a cryptographic MAC: no probe number is ever shown to
/// clients, so they have nothing to learn the key from.
fn probe_number(key: u64, old: u32, now_ms: u64) -> u32 {
    let h = crate::hash::mix(key ^ crate::hash::mix(now_ms ^ u64::from(old).rotate_left(32)));
    [h as u32, (h >> 32) as u32].into_iter().find(|&n| n != 0 && n != old).unwrap_or(old.wrapping_add(1).max(1))
}

/// An instant the signals name (epoch ms), typed.
fn at_ms(ms: Option<u64>) -> Option<Instant> {
    ms.map(Instant::from_millis)
}

/// The provider's requests per window, when the answer says the requests ran out.
fn window_limit(signals: &Signals) -> u32 {
    match (signals.remaining_requests, signals.limit_requests) {
        (Some(0), Some(l)) => l.min(u64::from(u32::MAX)) as u32,
        _ => 0,
    }
}

impl crate::store::Stored for ProviderState {
    fn to_bytes(&self) -> Vec<u8> {
        self.encode().to_vec()
    }
    fn from_bytes(b: &[u8]) -> Option<Self> {
        Self::decode(b)
    }
}

impl ProviderState {
    pub const ENCODED_LEN: usize = 48;

    pub fn encode(&self) -> [u8; 48] {
        let mut out = [0u8; 48];
        out[0] = self.mode as u8;
        out[1] = self.terminal as u8;
        out[2] = self.checking as u8;
        out[3] = self.guessed as u8;
        out[4..8].copy_from_slice(&self.failed_probes.to_le_bytes());
        out[8..16].copy_from_slice(&self.until.as_millis().to_le_bytes());
        out[16..24].copy_from_slice(&self.probe_at.as_millis().to_le_bytes());
        out[24..28].copy_from_slice(&self.probe.to_le_bytes());
        out[28] = self.counting as u8;
        out[32..36].copy_from_slice(&self.limit.to_le_bytes());
        out[36..40].copy_from_slice(&self.left.to_le_bytes());
        out[40..48].copy_from_slice(&self.dry_until.as_millis().to_le_bytes());
        out
    }

    /// `None` for anything that is not a state this module wrote.
    pub fn decode(b: &[u8]) -> Option<ProviderState> {
        if b.len() != Self::ENCODED_LEN {
            return None;
        }
        let mode = match b.first()? {
            0 => Mode::Closed,
            1 => Mode::Open,
            2 => Mode::HalfOpen,
            _ => return None,
        };
        let u32_at = |i: usize| Some(u32::from_le_bytes(b.get(i..i + 4)?.try_into().ok()?));
        let u64_at = |i: usize| Some(u64::from_le_bytes(b.get(i..i + 8)?.try_into().ok()?));
        let ms_at = |i: usize| u64_at(i).map(Instant::from_millis);
        Some(ProviderState {
            mode,
            terminal: *b.get(1)? == 1,
            checking: *b.get(2)? == 1,
            guessed: *b.get(3)? == 1,
            failed_probes: u32_at(4)?,
            until: ms_at(8)?,
            probe_at: ms_at(16)?,
            probe: u32_at(24)?,
            counting: *b.get(28)? == 1,
            limit: u32_at(32)?,
            left: u32_at(36)?,
            dry_until: ms_at(40)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::signals::Terminal;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    const NOW_MS: u64 = 1_700_000_000_000;
    const NOW: Instant = Instant::from_millis(NOW_MS);

    /// `ms` milliseconds after `NOW`.
    fn at(ms: u64) -> Instant {
        NOW + Duration::from_millis(ms)
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }
    /// The worker's random id, which keys probe numbers.
    const KEY: u64 = 0x5eed_1e55_c0ff_ee00;

    fn rules() -> BreakerRules {
        BreakerRules {
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
            requests_reset_ms: reset_in_ms.map(|d| NOW_MS + d),
            ..Signals::default()
        }
    }

    fn exhausted(reset_in_ms: u64) -> Signals {
        signals(Some(0), Some(100), Some(reset_in_ms))
    }

    /// Lets the probe through at `at`; returns its number and the half-open state.
    fn probe(r: &BreakerRules, s: ProviderState, at: Instant) -> (u32, ProviderState) {
        match r.gate(s, at, KEY) {
            (Gate::Probe { probe }, Some(next)) => (probe, next),
            other => panic!("expected a probe, got {other:?}"),
        }
    }

    #[test]
    fn an_exhausted_429_trips_until_the_reset_and_the_reset_closes_it() {
        let r = rules();
        let (v, s) = r.observe(ProviderState::default(), 429, &exhausted(5_000), None, NOW);
        assert!(v.tripped && !v.terminal);
        assert_eq!(v.retry_at, Some(at(5_000)));
        assert_eq!(r.gate(s, at(4_999), KEY).0, Gate::Open { until: at(5_000), terminal: false });
        // The provider named its reset: no probe, traffic resumes at that instant, counted
        // against the window's limit of 100.
        let (g, closed) = r.gate(s, at(5_000), KEY);
        assert_eq!(g, Gate::Counted);
        let closed = closed.unwrap();
        assert_eq!(closed.mode, Mode::Closed);
        assert_eq!(r.observe(closed, 200, &Signals::default(), None, at(5_050)).0.reset_accurate, Some(true));
        // Had the reset been early, the next 429 trips again and says so.
        let (v, again) = r.observe(closed, 429, &exhausted(7_000), None, at(5_050));
        assert!(v.tripped);
        assert_eq!(v.reset_accurate, Some(false));
        assert_eq!(again.until, at(7_000));
    }

    #[test]
    fn after_an_exhausted_window_only_its_limit_goes_until_the_provider_names_the_next_reset() {
        let r = rules();
        let (_, held) = r.observe(ProviderState::default(), 200, &signals(Some(0), Some(3), Some(1_000)), None, NOW);
        assert_eq!(r.gate(held, at(999), KEY).0, Gate::Hold { until: at(1_000) });
        let (g, s) = r.gate(held, at(1_000), KEY);
        assert_eq!(g, Gate::Counted);
        let mut s = s.unwrap();
        for _ in 0..3 {
            assert_eq!(r.gate(s, at(1_010), KEY).0, Gate::Counted);
            s = r.spend(s).unwrap();
        }
        // All three are out: hold until an answer names the next reset...
        let (g, dry) = r.gate(s, at(1_020), KEY);
        assert_eq!(g, Gate::Hold { until: at(2_020) });
        let dry = dry.unwrap();
        let (_, next) = r.observe(dry, 200, &signals(Some(0), Some(3), Some(2_000)), None, at(1_030));
        assert_eq!(r.gate(next, at(1_040), KEY).0, Gate::Hold { until: at(2_000) });
        assert_eq!(r.gate(next, at(2_000), KEY).0, Gate::Counted);
        // ...or, when none comes, stop counting after a second.
        assert_eq!(r.gate(dry, at(2_020), KEY).0, Gate::Pass);
        // An answer saying fewer are left lowers the count; one saying more does not raise it.
        let (_, s) = r.gate(held, at(1_000), KEY);
        let s = s.unwrap();
        assert_eq!(r.observe(s, 200, &signals(Some(1), Some(3), Some(2_000)), None, at(1_001)).1.left, 1);
        assert_eq!(r.observe(s, 200, &signals(Some(9), Some(3), Some(2_000)), None, at(1_001)).1.left, 3);
    }

    #[test]
    fn a_429_without_timing_opens_until_a_back_off_then_one_probe_closes_it() {
        let r = rules();
        let (v, s) = r.observe(ProviderState::default(), 429, &Signals::default(), None, NOW);
        assert!(v.tripped);
        assert_eq!(r.gate(s, at(999), KEY).0, Gate::Open { until: at(1_000), terminal: false });
        let (n, half) = probe(&r, s, at(1_000));
        assert_eq!(half.mode, Mode::HalfOpen);
        // Only one probe: the next request is held while it is out.
        assert!(matches!(r.gate(half, at(1_001), KEY).0, Gate::Hold { .. }));
        let (v, closed) = r.observe(half, 200, &signals(Some(99), Some(100), Some(60_000)), Some(n), at(1_100));
        assert!(v.closed);
        assert_eq!(v.reset_accurate, Some(true));
        assert_eq!(closed.mode, Mode::Closed);
        assert_eq!(r.gate(closed, at(1_101), KEY).0, Gate::Pass);
    }

    #[test]
    fn many_429s_for_one_exhausted_window_are_one_trip_bounded_by_the_reset() {
        let r = rules();
        let (v, mut s) = r.observe(ProviderState::default(), 429, &exhausted(2_990), None, NOW);
        assert!(v.tripped);
        for i in 1..8 {
            let (v, next) = r.observe(s, 429, &exhausted(2_990 - i * 10), None, at(i * 10));
            assert!(!v.tripped, "answer {i} is the same event");
            assert_eq!(v.retry_at, Some(at(2_990)));
            s = next;
        }
        assert_eq!((s.mode, s.until, s.failed_probes), (Mode::Open, at(2_990), 0));
        // 429s with no timing while open change nothing either.
        assert_eq!(r.observe(s, 429, &Signals::default(), None, at(100)).1, s);
    }

    #[test]
    fn only_the_probe_closes_a_breaker_opened_on_a_guess() {
        let r = rules();
        let (_, open) = r.observe(ProviderState::default(), 429, &Signals::default(), None, NOW);
        // A success answering a request admitted before the trip.
        assert_eq!(r.observe(open, 200, &Signals::default(), None, at(10)).1, open);
        let (n, half) = probe(&r, open, at(1_000));
        assert_eq!(r.observe(half, 200, &Signals::default(), None, at(1_010)).1, half);
        assert_eq!(r.observe(half, 200, &Signals::default(), Some(n.wrapping_sub(1)), at(1_010)).1, half);
        assert_eq!(r.observe(half, 429, &Signals::default(), None, at(1_010)).1, half, "a stale 429");
        assert!(r.observe(half, 200, &Signals::default(), Some(n), at(1_010)).0.closed);
    }

    #[test]
    fn a_failed_probe_opens_again_and_a_lost_probe_is_replaced() {
        let r = rules();
        let (_, open) = r.observe(ProviderState::default(), 429, &Signals::default(), None, NOW);
        let (n, half) = probe(&r, open, at(1_000));
        let (v, s) = r.observe(half, 429, &exhausted(3_000), Some(n), at(1_100));
        assert!(v.tripped);
        assert_eq!(v.reset_accurate, Some(false), "our back-off was too short");
        assert_eq!(v.reset_error, Some(Duration::from_millis(2_000)));
        assert_eq!((s.mode, s.until), (Mode::Open, at(3_000)));
        // A probe that never answers is replaced after the timeout, under a new number.
        let (n2, half2) = probe(&r, half, at(1_000) + ms(10_000));
        assert_ne!(n2, n);
        assert_eq!(r.observe(half2, 200, &Signals::default(), Some(n), at(11_001)).1, half2);
    }

    #[test]
    fn a_guessed_or_stale_probe_number_changes_nothing() {
        let r = rules();
        let (_, open) = r.observe(ProviderState::default(), 429, &Signals::default(), None, NOW);
        let (lost, half) = probe(&r, open, at(1_000));
        // The first probe is lost; its replacement is the one whose answer counts.
        let (n, half) = probe(&r, half, at(11_000));
        // Guesses a client could send as the probe header: small numbers, the previous probe's
        // and the numbers around it.
        let guesses = [0, 1, 2, 3, u32::MAX, lost, lost.wrapping_add(1), lost.wrapping_sub(1)];
        for g in guesses {
            for status in [200, 429] {
                let (v, s) = r.observe(half, status, &Signals::default(), Some(g), at(11_010));
                assert_eq!(s, half, "probe {g} (the probe is {n}) answered {status} moved the breaker");
                assert!(!v.closed && !v.tripped, "{g} {status}");
            }
        }
        assert!(r.observe(half, 200, &Signals::default(), Some(n), at(11_010)).0.closed);
        let (v, s) = r.observe(half, 429, &Signals::default(), Some(n), at(11_010));
        assert!(v.tripped);
        assert_eq!((s.until, s.failed_probes), (at(11_010) + ms(2_000), 1), "the back-off doubled");
    }

    #[test]
    fn probe_numbers_are_spread_over_32_bits() {
        let r = rules();
        let (_, open) = r.observe(ProviderState::default(), 429, &Signals::default(), None, NOW);
        let mut seen = std::collections::HashSet::new();
        let mut s = open;
        for i in 0..64 {
            let (n, half) = probe(&r, s, at(1_000) + ms(i * 10_000));
            assert!(n >= 1 << 16, "probe {i} is {n}: guessable");
            assert!(seen.insert(n), "probe {i} repeats {n}");
            s = half;
        }
        // Across 64 numbers each of the 32 bits is set in some and clear in others.
        let (ors, ands) = seen.iter().fold((0u32, u32::MAX), |(o, a), &n| (o | n, a & n));
        assert_eq!((ors, ands), (u32::MAX, 0));
    }

    #[test]
    fn back_off_without_timing_grows_only_when_probes_fail() {
        let r = rules();
        let (v, mut s) = r.observe(ProviderState::default(), 429, &Signals::default(), None, NOW);
        assert_eq!(v.retry_at, Some(at(1_000)));
        for _ in 0..5 {
            s = r.observe(s, 429, &Signals::default(), None, at(10)).1;
        }
        assert_eq!(s.until, at(1_000), "answers while open do not grow it");
        let mut t = at(1_000);
        for want in [2_000, 4_000, 8_000, 16_000, 32_000, 60_000, 60_000] {
            let (n, half) = probe(&r, s, t);
            s = r.observe(half, 429, &Signals::default(), Some(n), t).1;
            assert_eq!(s.until - t, ms(want));
            t = s.until;
        }
        let (n, half) = probe(&r, s, t);
        s = r.observe(half, 200, &Signals::default(), Some(n), t).1;
        assert_eq!(r.observe(s, 429, &Signals::default(), None, t).1.until, t + ms(1_000), "reset after success");
    }

    #[test]
    fn a_429_with_quota_left_holds_and_later_429s_stay_in_the_hold() {
        let r = rules();
        let (v, s) = r.observe(ProviderState::default(), 429, &signals(Some(50), Some(100), Some(3_000)), None, NOW);
        assert!(!v.tripped);
        assert_eq!(s.mode, Mode::Closed);
        assert_eq!(r.gate(s, at(1), KEY).0, Gate::Hold { until: at(3_000) });
        let (v, s2) = r.observe(s, 429, &exhausted(3_000), None, at(50));
        assert!(!v.tripped, "an in-flight 429 during the hold");
        assert_eq!(r.gate(s2, at(3_000), KEY).0, Gate::Pass);
        // The first answer after the hold says whether the reset was right.
        assert_eq!(r.observe(s2, 200, &Signals::default(), None, at(3_100)).0.reset_accurate, Some(true));
    }

    #[test]
    fn terminal_quotas_block_long_and_say_so() {
        let r = rules();
        let sig = Signals { terminal: Some(Terminal::InsufficientQuota), ..Signals::default() };
        let (v, s) = r.observe(ProviderState::default(), 429, &sig, None, NOW);
        assert!(v.terminal && v.tripped);
        assert_eq!(r.gate(s, at(1), KEY).0, Gate::Open { until: at(3_600_000), terminal: true });
        assert!(!r.observe(s, 429, &sig, None, at(2)).0.tripped, "still the same event");
        // A wait longer than the cap is terminal too.
        let far = Signals { retry_at_ms: Some(NOW_MS + 86_400_000), ..Signals::default() };
        assert!(r.observe(ProviderState::default(), 429, &far, None, NOW).0.terminal);
    }

    #[test]
    fn a_success_that_used_the_quota_up_holds_until_the_reset() {
        let r = rules();
        let (v, s) = r.observe(ProviderState::default(), 200, &signals(Some(0), Some(10), Some(4_000)), None, NOW);
        assert!(v.throttled);
        assert_eq!(r.gate(s, at(10), KEY).0, Gate::Hold { until: at(4_000) });
    }

    #[test]
    fn low_remaining_quota_spaces_requests_until_the_reset() {
        let r = rules();
        // 5 of 100 left, reset in 10 s: one request every 2 s.
        let (v, s) = r.observe(ProviderState::default(), 200, &signals(Some(5), Some(100), Some(10_000)), None, NOW);
        assert!(v.throttled);
        assert_eq!(s.until, at(2_000));
        let (v, s) = r.observe(ProviderState::default(), 200, &signals(Some(50), Some(100), Some(10_000)), None, NOW);
        assert!(!v.throttled);
        assert_eq!(r.gate(s, NOW, KEY).0, Gate::Pass);
    }

    #[test]
    fn server_errors_and_garbage_change_nothing() {
        let r = rules();
        let s = ProviderState::default();
        assert_eq!(r.observe(s, 503, &Signals::default(), None, NOW).1, s);
        assert_eq!(r.observe(s, 200, &Signals::default(), None, NOW).1, s);
        // A reset in the past is no reason to hold.
        assert_eq!(r.observe(s, 200, &signals(Some(0), Some(10), None), None, NOW).1, s);
    }

    #[test]
    fn state_round_trips_and_rejects_garbage() {
        let s = ProviderState {
            mode: Mode::HalfOpen,
            until: Instant::from_millis(5),
            probe_at: Instant::from_millis(7),
            probe: 9,
            terminal: true,
            failed_probes: 3,
            checking: true,
            guessed: true,
            limit: 5,
            counting: true,
            left: 2,
            dry_until: Instant::from_millis(11),
        };
        assert_eq!(ProviderState::decode(&s.encode()), Some(s));
        assert_eq!(ProviderState::decode(&[9u8; 48]), None);
        assert_eq!(ProviderState::decode(b"short"), None);
    }
}
