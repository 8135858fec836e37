//! This worker's view of the provider: the shared-data key of the provider state, the state last
//! read (trusted for `PROVIDER_FRESH_MS`), and every decision made with it: the gate a request
//! passes, what an answer teaches, what a 429 means for its client, what a router retry does, and
//! counting a request against the provider's window.

use super::{Attempt, Refusal, NANOS_PER_MS};
use crate::breaker::{BreakerRules, Gate, Mode, ProviderState, Verdict, PROBE_HOLD_MS};
use crate::config::Config;
use crate::priority::Priority;
use crate::reply::Reason;
use crate::signals::Signals;
use crate::store::{self, Status, Store};
use std::cell::Cell;

/// How long a provider state read says "let it through" without reading it again. At 1000
/// requests/s per worker, at most one request goes on a state a millisecond old.
const PROVIDER_FRESH_MS: u64 = 1;

/// The provider state's key, what this worker last read of it, and the rules it is read with.
pub(super) struct ProviderView {
    pub(super) key: String,
    rules: BreakerRules,
    /// The worker's random id: it keys the probe numbers this worker draws.
    id: u64,
    /// Per class, the longest a held router retry may wait.
    max_wait_ms: [u64; 4],
    /// The state last read and when, to let requests through without reading it again.
    seen: Cell<Option<(ProviderState, u64)>>,
}

impl ProviderView {
    pub(super) fn new(config: &Config, id: u64) -> ProviderView {
        ProviderView {
            key: format!("llm_ratelimit/{}/provider", config.name),
            rules: config.provider.breaker.clone(),
            id,
            max_wait_ms: Priority::ALL.map(|p| config.class(p).max_wait_ms),
            seen: Cell::new(None),
        }
    }

    /// The state last read, if that was less than `PROVIDER_FRESH_MS` before `now_ms`.
    fn fresh(&self, now_ms: u64) -> Option<ProviderState> {
        let (s, seen_ms) = self.seen.get()?;
        (now_ms >= seen_ms && now_ms - seen_ms < PROVIDER_FRESH_MS).then_some(s)
    }

    /// The cached state is stale: the next decision reads it.
    pub(super) fn forget(&self) {
        self.seen.set(None);
    }

    /// See [`super::Worker::gate_and_mode`]. Only a pass is taken from the cache: anything else
    /// may change the state.
    pub(super) fn gate_and_mode(&self, store: &impl Store, now_ms: u64) -> Result<(Gate, Option<Mode>), Status> {
        if let Some(s) = self.fresh(now_ms) {
            if self.rules.gate(s, now_ms, self.id) == (Gate::Pass, None) {
                return Ok((Gate::Pass, None));
            }
        }
        let (gate, moved, seen) = store::update(store, &self.key, ProviderState::default, |s| {
            let (gate, next) = self.rules.gate(s, now_ms, self.id);
            let moved = next.filter(|n| n.mode != s.mode).map(|n| n.mode);
            ((gate, moved, next.unwrap_or(s)), next)
        })?;
        self.seen.set(Some((seen, now_ms)));
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
        now_ms: u64,
    ) -> Result<(Verdict, ProviderState, bool), Status> {
        // An answer that changes nothing in the state read within `PROVIDER_FRESH_MS` (a success
        // with quota to spare, the common case) is not read again: a change another worker made
        // meanwhile is seen by the next answer after that.
        if let Some(s) = self.fresh(now_ms) {
            let (v, next) = self.rules.observe(s, status, signals, probe, now_ms);
            if next == s && v == Verdict::default() {
                return Ok((v, s, false));
            }
        }
        let observed = store::update(store, &self.key, ProviderState::default, |s| {
            let (v, next) = self.rules.observe(s, status, signals, probe, now_ms);
            ((v, next, next.mode != s.mode), (next != s).then_some(next))
        });
        self.seen.set(observed.as_ref().ok().map(|&(_, next, _)| (next, now_ms)));
        observed
    }

    /// See [`super::Worker::peek`].
    pub(super) fn peek(&self, store: &impl Store, signals: &Signals, now_ms: u64) -> Result<Verdict, Status> {
        let s = self.state(store)?;
        let recorded = (s.until_ms > now_ms).then_some(s.until_ms);
        Ok(Verdict {
            retry_at_ms: signals.retry_at().filter(|&t| t > now_ms).max(recorded),
            terminal: signals.terminal.is_some() || (s.terminal && s.mode == Mode::Open),
            ..Verdict::default()
        })
    }

    /// See [`super::Worker::attempt`].
    pub(super) fn attempt(&self, store: &impl Store, class: Priority, now_ms: u64) -> Result<Attempt, Status> {
        store::update(store, &self.key, ProviderState::default, |s| self.attempt_on(s, class, now_ms))
    }

    /// What an attempt of `class` does with the provider state `s`, and the state to write.
    fn attempt_on(&self, s: ProviderState, class: Priority, now_ms: u64) -> (Attempt, Option<ProviderState>) {
        let rules = &self.rules;
        // While an exhausted window's requests are counted, a retry is one of them.
        let s = if rules.window_opens(&s, now_ms) { rules.count_window(s) } else { s };
        if matches!(s.mode, Mode::Open | Mode::HalfOpen) {
            if let (Gate::Probe { probe }, next) = rules.gate(s, now_ms, self.id) {
                return (Attempt::Probe { probe }, next);
            }
        }
        let dry = s.counting && s.left == 0;
        let awaited = rules.probe_awaited(&s, now_ms);
        let until_ms = match awaited {
            Some(end) => end.min(now_ms.saturating_add(PROBE_HOLD_MS)),
            None if dry => s.until_ms.max(s.dry_until_ms),
            None => s.until_ms,
        };
        if until_ms <= now_ms && awaited.is_none() {
            return (Attempt::Go, rules.spend(s));
        }
        // A terminal block that has run out waits for its probe like any other.
        let terminal = s.mode == Mode::Open && s.terminal && now_ms < s.until_ms;
        // No probe answered in time (none started: nobody arrived to be it): told to come back,
        // as a new request that can be the probe.
        let wait_ms = if until_ms > now_ms { until_ms - now_ms } else { PROBE_HOLD_MS };
        if !terminal && until_ms > now_ms && wait_ms <= self.max_wait_ms[class.index()] {
            return (Attempt::Hold { until_ms }, None);
        }
        let reason = if s.mode == Mode::Closed { Reason::ProviderHold } else { Reason::BreakerOpen };
        let wait_ns = wait_ms.saturating_mul(NANOS_PER_MS);
        let refusal = Refusal { id: 0, class, reason, wait_ns, tokens: 0.0, retry: !terminal, queued_ms: None };
        (Attempt::Refuse(refusal), None)
    }
}
