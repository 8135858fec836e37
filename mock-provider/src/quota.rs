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
    window: Duration,
    request_limit: u64, // 0 = unlimited
    token_limit: u64,   // 0 = unlimited
    start: Instant,
    /// Admitted requests still inside the window: (when, tokens).
    log: VecDeque<(Instant, u64)>,
    tokens_in_log: u64,
}

impl Quota {
    pub fn new(kind: WindowKind, window: Duration, request_limit: u64, token_limit: u64, now: Instant) -> Self {
        Quota {
            kind,
            window: window.max(Duration::from_millis(1)),
            request_limit,
            token_limit,
            start: now,
            log: VecDeque::new(),
            tokens_in_log: 0,
        }
    }

    /// Admits a request costing `tokens` unless a budget is already exhausted.
    /// (A request is let in while any budget remains, like OpenAI's token limits,
    /// so the token count may overshoot by one request.)
    pub fn try_acquire(&mut self, tokens: u64, now: Instant) -> Decision {
        self.expire(now);
        let blocked = [
            (Dimension::Requests, self.request_limit, self.log.len() as u64),
            (Dimension::Tokens, self.token_limit, self.tokens_in_log),
        ]
        .into_iter()
        .filter(|&(_, limit, used)| limit > 0 && used >= limit)
        .map(|(dim, limit, _)| (dim, self.time_until_below(dim, limit, now)))
        .max_by_key(|&(_, wait)| wait);

        if let Some((dimension, retry_after)) = blocked {
            return Decision::Limited { snapshot: self.snapshot(now), dimension, retry_after };
        }
        // With no limits there is nothing to report, so keep no log (benchmarks).
        if self.request_limit > 0 || self.token_limit > 0 {
            self.log.push_back((now, tokens));
            self.tokens_in_log += tokens;
        }
        Decision::Allowed(self.snapshot(now))
    }

    pub fn snapshot(&mut self, now: Instant) -> Snapshot {
        self.expire(now);
        let budget = |dim, limit: u64, used: u64| {
            (limit > 0).then(|| Budget {
                limit,
                remaining: limit.saturating_sub(used),
                reset: self.time_until_below(dim, used.min(limit).max(1), now),
            })
        };
        Snapshot {
            requests: budget(Dimension::Requests, self.request_limit, self.log.len() as u64),
            tokens: budget(Dimension::Tokens, self.token_limit, self.tokens_in_log),
        }
    }

    /// Start of the current fixed window.
    fn window_start(&self, now: Instant) -> Instant {
        let window = self.window.as_nanos();
        let elapsed = now.saturating_duration_since(self.start).as_nanos();
        self.start + Duration::from_nanos((elapsed / window * window) as u64)
    }

    /// Drops entries that no longer count.
    fn expire(&mut self, now: Instant) {
        // Entries at or after `cutoff` still count.
        let cutoff = match self.kind {
            WindowKind::Fixed => Some(self.window_start(now)),
            WindowKind::Sliding => now.checked_sub(self.window).map(|t| t + Duration::from_nanos(1)),
        };
        let Some(cutoff) = cutoff else { return };
        while let Some(&(t, tokens)) = self.log.front() {
            if t >= cutoff {
                break;
            }
            self.tokens_in_log -= tokens;
            self.log.pop_front();
        }
    }

    /// How long until usage of `dim` drops below `limit` (0 if it already is and
    /// the log is empty). Fixed: the window end. Sliding: when enough of the
    /// oldest entries have left the window.
    fn time_until_below(&self, dim: Dimension, limit: u64, now: Instant) -> Duration {
        match self.kind {
            WindowKind::Fixed => (self.window_start(now) + self.window) - now,
            WindowKind::Sliding => {
                let mut used = match dim {
                    Dimension::Requests => self.log.len() as u64,
                    Dimension::Tokens => self.tokens_in_log,
                };
                for &(t, tokens) in &self.log {
                    used -= match dim {
                        Dimension::Requests => 1,
                        Dimension::Tokens => tokens,
                    };
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
        assert!(q.log.is_empty());
    }
}
