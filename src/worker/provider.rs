//! This worker's view of the provider: the shared-data key of the provider state, the state last
//! read (trusted for `PROVIDER_FRESH`), and every decision made with it: the gate a request
//! passes, what an answer teaches, what a 429 means for its client, what a router retry does, and
//! counting a request against the provider's window.

use super::{Attempt, Refusal};
use crate::breaker::{BreakerRules, Gate, Mode, ProviderState, Verdict, PROBE_HOLD};
use crate::config::Config;
use crate::priority::Priority;
use crate::reply::Reason;
use crate::signals::Signals;
use crate::store::{self, Status, Store};
use crate::time::{Duration, Instant};
use std::cell::Cell;

/// How long a provider state read says "let it through" without reading it again. At 1000
/// requests/s per worker, at most one request goes on a state a millisecond old.
const PROVIDER_FRESH: Duration = Duration::from_millis(1);

/// The provider state's key, what this worker last read of it, and the rules it is read with.
pub(super) struct ProviderView {
    pub(super) key: String,
    rules: BreakerRules,
    /// The worker's random id: it keys the probe numbers this worker draws.
    id: u64,
    /// Per class, the longest a held router retry may wait.
    max_wait: [Duration; 4],
    /// The state last read and when, to let requests through without reading it again.
    seen: Cell<Option<(ProviderState, Instant)>>,
}

impl ProviderView {
    pub(super) fn new(config: &Config, id: u64) -> ProviderView {
        ProviderView {
            key: format!("llm_ratelimit/{}/provider", config.name),
            rules: config.provider.breaker.clone(),
            id,
            max_wait: Priority::ALL.map(|p| Duration::from_millis(config.class(p).max_wait_ms)),
            seen: Cell::new(None),
        }
    }

    /// The state last read, if that was less than `PROVIDER_FRESH` before `now`.
    fn fresh(&self, now: Instant) -> Option<ProviderState> {
        let (s, seen) = self.seen.get()?;
        (now >= seen && now - seen < PROVIDER_FRESH).then_some(s)
    }

    /// The cached state is stale: the next decision reads it.
    pub(super) fn forget(&self) {
        self.seen.set(None);
    }

    /// See [`super::Worker::gate_and_mode`]. Only a pass is taken from the cache: anything else
    /// may change the state. The provider state keeps whole milliseconds, and so does every
    /// decision made with it: `now` is taken to the millisecond here and below.
    pub(super) fn gate_and_mode(&self, store: &impl Store, now: Instant) -> Result<(Gate, Option<Mode>), Status> {
        let now = now.floor_millis();
        if let Some(s) = self.fresh(now) {
            if self.rules.gate(s, now, self.id) == (Gate::Pass, None) {
                return Ok((Gate::Pass, None));
            }
        }
        let (gate, moved, seen) = store::update(store, &self.key, ProviderState::default, |s| {
            let (gate, next) = self.rules.gate(s, now, self.id);
            let moved = next.filter(|n| n.mode != s.mode).map(|n| n.mode);
            ((gate, moved, next.unwrap_or(s)), next)
        })?;
        self.seen.set(Some((seen, now)));
        Ok((gate, moved))
    }

    /// A request let through under `Gate::Counted` went upstream: count it.
    pub(super) fn spend(&self, store: &impl Store) -> Result<(), Status> {
        self.forget();
        store::update(store, &self.key, ProviderState::default, |s| ((), self.rules.spend(s)))
    }

    /// The provider state as it is.
    pub(super) fn state(&self, store: &impl Store) -> Result<ProviderState, Status> {
        Ok(store::read(store, &self.key)?.unwrap_or_default())
    }

    /// See [`super::Worker::observe`].
    pub(super) fn observe(
        &self,
        store: &impl Store,
        status: u16,
        signals: &Signals,
        probe: Option<u32>,
        now: Instant,
    ) -> Result<(Verdict, ProviderState, bool), Status> {
        let now = now.floor_millis();
        // An answer that changes nothing in the state read within `PROVIDER_FRESH` (a success
        // with quota to spare, the common case) is not read again: a change another worker made
        // meanwhile is seen by the next answer after that.
        if let Some(s) = self.fresh(now) {
            let (v, next) = self.rules.observe(s, status, signals, probe, now);
            if next == s && v == Verdict::default() {
                return Ok((v, s, false));
            }
        }
        let observed = store::update(store, &self.key, ProviderState::default, |s| {
            let (v, next) = self.rules.observe(s, status, signals, probe, now);
            ((v, next, next.mode != s.mode), (next != s).then_some(next))
        });
        self.seen.set(observed.as_ref().ok().map(|&(_, next, _)| (next, now)));
        observed
    }

    /// See [`super::Worker::peek`].
    pub(super) fn peek(&self, store: &impl Store, signals: &Signals, now: Instant) -> Result<Verdict, Status> {
        let now = now.floor_millis();
        let s = self.state(store)?;
        let recorded = (s.until > now).then_some(s.until);
        Ok(Verdict {
            retry_at: signals.retry_at().map(Instant::from_millis).filter(|&t| t > now).max(recorded),
            terminal: signals.terminal.is_some() || (s.terminal && s.mode == Mode::Open),
            ..Verdict::default()
        })
    }

    /// See [`super::Worker::attempt`].
    pub(super) fn attempt(&self, store: &impl Store, class: Priority, now: Instant) -> Result<Attempt, Status> {
        let now = now.floor_millis();
        store::update(store, &self.key, ProviderState::default, |s| self.attempt_on(s, class, now))
    }

    /// What an attempt of `class` does with the provider state `s`, and the state to write.
    fn attempt_on(&self, s: ProviderState, class: Priority, now: Instant) -> (Attempt, Option<ProviderState>) {
        let rules = &self.rules;
        // While an exhausted window's requests are counted, a retry is one of them.
        let s = if rules.window_opens(&s, now) { rules.count_window(s) } else { s };
        if matches!(s.mode, Mode::Open | Mode::HalfOpen) {
            if let (Gate::Probe { probe }, next) = rules.gate(s, now, self.id) {
                return (Attempt::Probe { probe }, next);
            }
        }
        let dry = s.counting && s.left == 0;
        let awaited = rules.probe_awaited(&s, now);
        let until = match awaited {
            Some(end) => end.min(now + PROBE_HOLD),
            None if dry => s.until.max(s.dry_until),
            None => s.until,
        };
        if until <= now && awaited.is_none() {
            return (Attempt::Go, rules.spend(s));
        }
        // A terminal block that has run out waits for its probe like any other.
        let terminal = s.mode == Mode::Open && s.terminal && now < s.until;
        // No probe answered in time (none started: nobody arrived to be it): told to come back,
        // as a new request that can be the probe.
        let wait = if until > now { until - now } else { PROBE_HOLD };
        if !terminal && until > now && wait <= self.max_wait[class.index()] {
            return (Attempt::Hold { until }, None);
        }
        let reason = if s.mode == Mode::Closed { Reason::ProviderHold } else { Reason::BreakerOpen };
        let refusal = Refusal { id: 0, class, reason, wait, tokens: 0.0, retry: !terminal, queued: None };
        (Attempt::Refuse(refusal), None)
    }
}
