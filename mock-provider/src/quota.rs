//! The window quota: `limit` requests (and optionally tokens) per window.
//! Time is always passed in, so tests can step the clock without sleeping.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WindowKind {
    /// Counters reset at boundaries aligned to server start (or the last reset).
    Fixed,
    /// Each admitted request counts for exactly `window` after it was admitted.
    Sliding,
}

/// Which budget ran out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dimension {
    Requests,
    Tokens,
}

impl Dimension {
    pub fn as_str(self) -> &'static str {
        match self {
            Dimension::Requests => "requests",
            Dimension::Tokens => "tokens",
        }
    }
}

/// Current state of one budget, as providers report it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Budget {
    pub limit: u64,
    pub remaining: u64,
    /// Time until capacity comes back: the window end (fixed), or until the
    /// oldest counted entry leaves the window (sliding). When the budget is
    /// exhausted this is exactly the time after which the next request fits.
    pub reset: Duration,
}

/// Both budgets; `None` means that budget is unlimited (and not reported).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub requests: Option<Budget>,
    pub tokens: Option<Budget>,
}

impl Snapshot {
    pub fn get(&self, dim: Dimension) -> Option<Budget> {
        match dim {
            Dimension::Requests => self.requests,
            Dimension::Tokens => self.tokens,
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    /// Admitted; the snapshot already counts this request.
    Allowed(Snapshot),
    /// Rejected; nothing was counted. `retry_after` is when the blocking budget frees up.
    Limited { snapshot: Snapshot, dimension: Dimension, retry_after: Duration },
}

pub struct Quota {
    kind: WindowKind,
    start: Instant,
    requests: Counter,
    tokens: Counter,
}

/// One budget: what it admitted that still counts, over its own window.
struct Counter {
    window: Duration,
    limit: u64, // 0 = unlimited
    /// Admitted requests still inside the window: (when, weight).
    log: VecDeque<(Instant, u64)>,
    used: u64,
}

impl Quota {
    pub fn new(kind: WindowKind, window: Duration, request_limit: u64, token_limit: u64, now: Instant) -> Self {
        let window = window.max(Duration::from_millis(1));
        let counter = |limit| Counter { window, limit, log: VecDeque::new(), used: 0 };
        Quota { kind, start: now, requests: counter(request_limit), tokens: counter(token_limit) }
    }

    /// Counts requests over their own `window` (Groq's requests-per-day next to tokens per
    /// minute) instead of the shared one.
    pub fn with_request_window(mut self, window: Duration) -> Self {
        self.requests.window = window.max(Duration::from_millis(1));
        self
    }

    /// Admits a request costing `tokens` unless a budget is already exhausted.
    /// (A request is let in while any budget remains, like OpenAI's token limits,
    /// so the token count may overshoot by one request.)
    pub fn try_acquire(&mut self, tokens: u64, now: Instant) -> Decision {
        self.expire(now);
        let blocked = [(Dimension::Requests, &self.requests), (Dimension::Tokens, &self.tokens)]
            .into_iter()
            .filter(|(_, c)| c.limit > 0 && c.used >= c.limit)
            .map(|(dim, c)| (dim, c.time_until_below(self.kind, self.start, c.limit, now)))
            .max_by_key(|&(_, wait)| wait);

        if let Some((dimension, retry_after)) = blocked {
            return Decision::Limited { snapshot: self.snapshot(now), dimension, retry_after };
        }
        // An unlimited budget has nothing to report, so it keeps no log (benchmarks).
        self.requests.admit(now, 1);
        self.tokens.admit(now, tokens);
        Decision::Allowed(self.snapshot(now))
    }

    pub fn snapshot(&mut self, now: Instant) -> Snapshot {
        self.expire(now);
        let (kind, start) = (self.kind, self.start);
        Snapshot { requests: self.requests.budget(kind, start, now), tokens: self.tokens.budget(kind, start, now) }
    }

    /// Drops entries that no longer count.
    fn expire(&mut self, now: Instant) {
        let (kind, start) = (self.kind, self.start);
        self.requests.expire(kind, start, now);
        self.tokens.expire(kind, start, now);
    }
}

impl Counter {
    fn admit(&mut self, now: Instant, weight: u64) {
        if self.limit > 0 {
            self.log.push_back((now, weight));
            self.used += weight;
        }
    }

    fn budget(&self, kind: WindowKind, start: Instant, now: Instant) -> Option<Budget> {
        (self.limit > 0).then(|| Budget {
            limit: self.limit,
            remaining: self.limit.saturating_sub(self.used),
            reset: self.time_until_below(kind, start, self.used.min(self.limit).max(1), now),
        })
    }

    /// Start of the current fixed window (windows are aligned to `start`).
    fn window_start(&self, start: Instant, now: Instant) -> Instant {
        let window = self.window.as_nanos();
        let elapsed = now.saturating_duration_since(start).as_nanos();
        start + Duration::from_nanos((elapsed / window * window) as u64)
    }

    fn expire(&mut self, kind: WindowKind, start: Instant, now: Instant) {
        // Entries at or after `cutoff` still count.
        let cutoff = match kind {
            WindowKind::Fixed => Some(self.window_start(start, now)),
            WindowKind::Sliding => now.checked_sub(self.window).map(|t| t + Duration::from_nanos(1)),
        };
        let Some(cutoff) = cutoff else { return };
        while let Some(&(t, weight)) = self.log.front() {
            if t >= cutoff {
                break;
            }
            self.used -= weight;
            self.log.pop_front();
        }
    }

    /// How long until usage drops below `limit` (0 if it already is and the log is empty).
    /// Fixed: the window end. Sliding: when enough of the oldest entries have left the window.
    fn time_until_below(&self, kind: WindowKind, start: Instant, limit: u64, now: Instant) -> Duration {
        match kind {
            WindowKind::Fixed => (self.window_start(start, now) + self.window) - now,
            WindowKind::Sliding => {
                let mut used = self.used;
                for &(t, weight) in &self.log {
                    used -= weight;
                    if used < limit {
                        return (t + self.window).saturating_duration_since(now);
                    }
                }
                Duration::ZERO
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WINDOW: Duration = Duration::from_secs(10);

    fn secs(s: f64) -> Duration {
        Duration::from_secs_f64(s)
    }

    fn allowed(d: Decision) -> Snapshot {
        match d {
            Decision::Allowed(s) => s,
            other => panic!("expected Allowed, got {other:?}"),
        }
    }

    fn limited(d: Decision) -> (Dimension, Duration) {
        match d {
            Decision::Limited { dimension, retry_after, .. } => (dimension, retry_after),
            other => panic!("expected Limited, got {other:?}"),
        }
    }

    #[test]
    fn fixed_window_counts_and_resets_at_boundary() {
        let t0 = Instant::now();
        let mut q = Quota::new(WindowKind::Fixed, WINDOW, 2, 0, t0);

        let s = allowed(q.try_acquire(1, t0 + secs(1.0)));
        assert_eq!(s.requests, Some(Budget { limit: 2, remaining: 1, reset: secs(9.0) }));
        assert_eq!(s.tokens, None);
        let s = allowed(q.try_acquire(1, t0 + secs(2.5)));
        assert_eq!(s.requests.unwrap().remaining, 0);
        assert_eq!(s.requests.unwrap().reset, secs(7.5));

        assert_eq!(
            q.try_acquire(1, t0 + secs(4.0)),
            Decision::Limited {
                snapshot: Snapshot {
                    requests: Some(Budget { limit: 2, remaining: 0, reset: secs(6.0) }),
                    tokens: None
                },
                dimension: Dimension::Requests,
                retry_after: secs(6.0),
            }
        );
        // Just before the boundary: still limited; at the boundary: a fresh window.
        assert_eq!(limited(q.try_acquire(1, t0 + secs(9.999))).1, Duration::from_millis(1));
        let s = allowed(q.try_acquire(1, t0 + WINDOW));
        assert_eq!(s.requests, Some(Budget { limit: 2, remaining: 1, reset: WINDOW }));
        // Windows stay aligned to the start, not to the first request.
        let s = allowed(q.try_acquire(1, t0 + secs(25.0)));
        assert_eq!(s.requests.unwrap().remaining, 1);
        assert_eq!(s.requests.unwrap().reset, secs(5.0));
    }

    #[test]
    fn sliding_window_frees_oldest_first() {
        let t0 = Instant::now();
        let mut q = Quota::new(WindowKind::Sliding, WINDOW, 2, 0, t0);
        allowed(q.try_acquire(1, t0 + secs(1.0)));
        let s = allowed(q.try_acquire(1, t0 + secs(4.0)));
        assert_eq!(s.requests.unwrap().remaining, 0);
        // Capacity returns when the request at t=1 leaves the window (t=11).
        assert_eq!(s.requests.unwrap().reset, secs(7.0));
        assert_eq!(limited(q.try_acquire(1, t0 + secs(6.0))), (Dimension::Requests, secs(5.0)));
        let s = allowed(q.try_acquire(1, t0 + secs(11.0)));
        assert_eq!(s.requests.unwrap().remaining, 0);
        // Next slot frees when the t=4 request expires.
        assert_eq!(limited(q.try_acquire(1, t0 + secs(12.0))).1, secs(2.0));
        let s = allowed(q.try_acquire(1, t0 + secs(30.0)));
        assert_eq!(s.requests, Some(Budget { limit: 2, remaining: 1, reset: WINDOW }));
    }

    #[test]
    fn token_budget_blocks_once_exhausted() {
        let t0 = Instant::now();
        let mut q = Quota::new(WindowKind::Sliding, WINDOW, 0, 100, t0);
        let s = allowed(q.try_acquire(60, t0));
        assert_eq!(s.requests, None);
        assert_eq!(s.tokens, Some(Budget { limit: 100, remaining: 40, reset: WINDOW }));
        // Still 40 left, so this one is admitted and overshoots.
        let s = allowed(q.try_acquire(60, t0 + secs(2.0)));
        assert_eq!(s.tokens.unwrap().remaining, 0);
        // Used 120: dropping the first entry (t=0) brings it to 60 < 100.
        assert_eq!(limited(q.try_acquire(1, t0 + secs(3.0))), (Dimension::Tokens, secs(7.0)));
        allowed(q.try_acquire(1, t0 + secs(10.0)));
    }

    #[test]
    fn longest_wait_wins_when_both_exhausted() {
        let t0 = Instant::now();
        let mut q = Quota::new(WindowKind::Sliding, WINDOW, 3, 50, t0);
        allowed(q.try_acquire(5, t0));
        allowed(q.try_acquire(5, t0 + secs(1.0)));
        allowed(q.try_acquire(45, t0 + secs(5.0)));
        // A request slot frees at t=10; tokens drop below 50 only at t=11.
        assert_eq!(limited(q.try_acquire(1, t0 + secs(6.0))), (Dimension::Tokens, secs(5.0)));
    }

    #[test]
    fn unlimited_keeps_no_log() {
        let t0 = Instant::now();
        let mut q = Quota::new(WindowKind::Fixed, WINDOW, 0, 0, t0);
        for i in 0..1000 {
            assert_eq!(allowed(q.try_acquire(5, t0 + Duration::from_millis(i))), Snapshot::default());
        }
        assert!(q.requests.log.is_empty() && q.tokens.log.is_empty());
    }

    #[test]
    fn requests_may_count_over_their_own_window() {
        let t0 = Instant::now();
        // Groq-like: requests per day, tokens per 10 s.
        let day = Duration::from_secs(86_400);
        let mut q = Quota::new(WindowKind::Fixed, WINDOW, 100, 30, t0).with_request_window(day);
        allowed(q.try_acquire(17, t0));
        let s = allowed(q.try_acquire(17, t0 + secs(1.0)));
        assert_eq!(s.requests, Some(Budget { limit: 100, remaining: 98, reset: day - secs(1.0) }));
        assert_eq!(s.tokens, Some(Budget { limit: 30, remaining: 0, reset: secs(9.0) }));
        assert_eq!(limited(q.try_acquire(17, t0 + secs(2.0))), (Dimension::Tokens, secs(8.0)));
        // The token window rolls over; the requests keep counting for the day.
        let s = allowed(q.try_acquire(17, t0 + WINDOW));
        assert_eq!(s.requests.unwrap().remaining, 97);
        assert_eq!(s.tokens.unwrap().remaining, 13);
    }
}
