//! What every request of one worker VM shares: the pure [`Worker`] (queue and decisions) and the
//! parts of the host side each with one owner: stats, gauges, alerts, holds, local replies and
//! the global gate. The root context ticks it; request contexts call into it; what it decides for
//! another request than the current one goes there as an `Event`.

use super::alerts::Alerts;
use super::event::{self, Event};
use super::failover::Backup;
use super::gauges::Gauges;
use super::global::GlobalHost;
use super::holds::Holds;
use super::metrics::Metrics;
use super::replies::Replies;
use super::shared::SharedData;
use super::vm_local::vm_local;
use crate::admission::TokenNeed;
use crate::alert::Event as Alert;
use crate::breaker::{Mode, Verdict};
use crate::config::Config;
use crate::signals::Signals;
use crate::store::Status;
use crate::time::{Duration, Instant};
use crate::tokens::estimate::{Estimate, EstimateRules};
use crate::tokens::model::model_bucket;
use crate::tokens::price::Price;
use crate::worker::{Refusal, Tick, Worker};
use std::cell::{Cell, RefCell};

/// The "status" of a call that found the core already borrowed; no host status uses it.
const REENTERED: Status = u32::MAX;
/// Request header that tells the observer (upstream) which probe a request is. The admission
/// filter removes any a client sent; the observer removes it before the provider.
pub const PROBE_HEADER: &str = "x-llm-ratelimit-probe";
/// How often a worker counts the tenant table's used slots for the gauge.
const TENANT_CENSUS: Duration = Duration::from_secs(10);

vm_local! {
    /// Bumped whenever a filter of this VM learns from a provider answer that restricts admission
    /// (a 429, an exhausted or low quota, a trip, a probe's answer). The observer upstream and the
    /// admission filter share the worker's VM but not their cores: this is how the admission
    /// filter knows that the provider state it cached for a millisecond is stale.
    static PROVIDER_NEWS: Cell<u64> = Cell::new(0);
}

pub struct WorkerContext {
    pub core: RefCell<Worker>,
    /// The worker's configuration, readable while the core is borrowed.
    pub config: Config,
    pub metrics: Metrics,
    /// Whether anything reads the request path (path rules, the fallback's key, a model named in it).
    pub needs_path: bool,
    /// How request bodies are estimated, when token limits are on.
    pub estimate: Option<EstimateRules>,
    pub holds: Holds,
    pub gauges: Gauges,
    pub alerts: Alerts,
    pub replies: Replies,
    /// The global gate, when `global` is configured.
    pub global: Option<GlobalHost>,
    /// The `failover` targets, in order.
    pub backups: Vec<Backup>,
    /// `PROVIDER_NEWS` as this filter last saw it.
    provider_news: Cell<u64>,
}

impl WorkerContext {
    pub fn new(core: Worker, root_id: u32) -> WorkerContext {
        let c = &core.config;
        let metrics = Metrics::define(&c.name);
        let global_stats = metrics.global;
        WorkerContext {
            config: c.clone(),
            metrics,
            // The path names a model (Gemini, Vertex, Azure, Bedrock), which only per-model
            // buckets, prices and failover targets look at: otherwise it is not read.
            needs_path: c.fallback.enabled
                || c.tokens.as_ref().is_some_and(|t| !t.per_model.is_empty())
                || c.prices.is_some()
                || !c.failover.is_empty()
                || c.classify.rules.iter().any(|r| matches!(r.matcher, crate::config::Matcher::PathPrefix(_))),
            estimate: c.tokens.as_ref().map(|t| EstimateRules {
                chars_per_token: t.chars_per_token,
                output_default: t.output_default,
                ..EstimateRules::default()
            }),
            holds: Holds::default(),
            gauges: Gauges::default(),
            alerts: Alerts::default(),
            replies: Replies::new(c, core.rules.floors),
            global: c
                .global
                .as_ref()
                .map(|g| GlobalHost::new(g, &c.name, global_stats, root_id, c.provider.breaker.max_wait_ms)),
            provider_news: Cell::new(0),
            backups: {
                let now = super::calls::now().unwrap_or_default();
                c.failover.iter().map(|t| Backup::new(&c.name, t, core.id, now)).collect()
            },
            core: RefCell::new(core),
        }
    }

    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// Runs `f` on the core; a borrow still held (a host call re-entering the VM) is the error
    /// `REENTERED`, handled like any failed host call.
    pub fn with_core<R>(&self, f: impl FnOnce(&Worker) -> Result<R, Status>) -> Result<R, Status> {
        self.core.try_borrow().map_err(|_| REENTERED).and_then(|w| f(&w))
    }

    /// The core of the primary (`None`) or of failover target `target`.
    pub fn core_of(&self, target: Option<u8>) -> &RefCell<Worker> {
        match target.and_then(|t| self.backups.get(usize::from(t))) {
            Some(b) => &b.core,
            None => &self.core,
        }
    }

    /// Runs `f` on the core of `target` (as `core_of`), mutably; `REENTERED` as in `with_core`.
    pub fn with_target_mut<R>(
        &self,
        target: Option<u8>,
        f: impl FnOnce(&mut Worker) -> Result<R, Status>,
    ) -> Result<R, Status> {
        self.core_of(target).try_borrow_mut().map_err(|_| REENTERED).and_then(|mut w| f(&mut w))
    }

    /// Runs `f` on the core, mutably; `REENTERED` as in `with_core`.
    pub fn with_core_mut<R>(&self, f: impl FnOnce(&mut Worker) -> Result<R, Status>) -> Result<R, Status> {
        self.core.try_borrow_mut().map_err(|_| REENTERED).and_then(|mut w| f(&mut w))
    }

    /// What the provider's last answers allow a request to do now (the core's `gate_and_mode`),
    /// first forgetting the cached provider state if a filter of this VM learned since.
    pub fn gate_and_mode(&self, now: Instant) -> Result<(crate::breaker::Gate, Option<Mode>), Status> {
        self.with_core(|w| {
            let news = PROVIDER_NEWS.with(Cell::get);
            if self.provider_news.replace(news) != news {
                w.forget_provider();
            }
            w.gate_and_mode(&SharedData, now)
        })
    }

    pub fn publish_readout(&self, readout: Option<crate::worker::Readout>) {
        self.gauges.publish(&self.metrics, readout);
    }

    /// Answers the current request with the local 429 for `r`.
    pub fn send_limited(&self, r: &Refusal) -> Result<(), Status> {
        self.replies.send(&self.config, &self.metrics, r, None)
    }

    /// Answers the current request with the local 429 of quota window `index` refusing it.
    pub fn send_quota_limited(&self, r: &Refusal, index: usize) -> Result<(), Status> {
        self.replies.send(&self.config, &self.metrics, r, self.config.quotas.get(index))
    }

    /// Posts what a tick or an arrival decided for waiters to each of them.
    pub fn carry_out(&self, t: &Tick) {
        for r in &t.released {
            event::post(r.id, Event::Released(*r));
        }
        for r in &t.expired {
            event::post(r.id, Event::Expired(*r));
        }
        if let Some(mode) = t.moved {
            self.breaker_moved(mode, Instant::ZERO);
        }
        if t.probe_started {
            self.probe_started();
        }
        for s in &t.errors {
            self.metrics.errors.inc();
            log::warn!("llm-ratelimit: {}: shared data failed in the tick: status {s}", self.name());
        }
        self.publish_readout(t.readout);
    }

    /// Waiter `r.id` is evicted for a more important arrival.
    pub fn shed(&self, r: &Refusal, now: Instant) {
        self.alerts.shed(&self.config, now);
        event::post(r.id, Event::Shed(*r));
    }

    pub fn probe_started(&self) {
        self.metrics.provider.breaker_probes.inc();
        self.metrics.provider.breaker_state.record(Mode::HalfOpen as u64);
    }

    /// The breaker moved to `mode` (a write of ours did it): the gauge, and a resolve alert
    /// when it closed.
    pub fn breaker_moved(&self, mode: Mode, now: Instant) {
        self.metrics.provider.breaker_state.record(mode as u64);
        if mode == Mode::Closed {
            self.alerts.raise(&self.config, Alert::BreakerClosed, now);
        }
    }

    /// One tick of this worker: holds first, then the queue, the global gate, the counters.
    pub fn tick(&self, now: Instant) {
        self.replies.tick();
        self.holds.post_due(now);
        self.count_tenants(now);
        self.tick_queue(now);
        if let Some(g) = &self.global {
            g.tick(now);
        }
        for b in &self.backups {
            b.tick(now);
        }
        if let Ok(mut w) = self.core.try_borrow_mut() {
            let (leases, leased) = w.take_lease_counts();
            self.metrics.leases.add(leases);
            self.metrics.leased.add(leased);
            if let Err(s) = w.refresh_slots(&SharedData, now) {
                log::debug!("llm-ratelimit: cannot read the in-flight count: status {s}");
            }
            self.gauges.slots(&self.metrics, w.slot_readout());
            let (raised, cut) = w.take_slot_changes();
            self.metrics.in_flight_raised.add(raised);
            self.metrics.in_flight_cut.add(cut);
        }
        self.metrics.cas_conflicts.add(super::shared::take_conflicts());
        self.alerts.send(&self.config, &self.metrics, now);
        self.gauges.provider(&self.metrics);
        super::metrics::flush();
    }

    fn tick_queue(&self, now: Instant) {
        let now_ms = now.floor_millis();
        let g = &self.gauges;
        let refresh = g.anyone_waiting() && now_ms.abs_diff(g.waiting_refreshed.get()) >= crate::admission::HEARTBEAT;
        let t = {
            let Ok(mut w) = self.core.try_borrow_mut() else { return };
            if refresh {
                g.waiting_refreshed.set(now_ms);
                w.refresh_depths();
            }
            if !w.needs_tick() {
                return;
            }
            w.tick(&SharedData, now)
        };
        self.carry_out(&t);
    }

    /// Every `TENANT_CENSUS`, the used slots of the tenant table (it reads every slot).
    fn count_tenants(&self, now: Instant) {
        let now_ms = now.floor_millis();
        let census = &self.gauges.census;
        if self.config.tenant.is_none() || now_ms.abs_diff(census.get()) < TENANT_CENSUS {
            return;
        }
        let Some((rules, prefix)) = self.core.try_borrow().ok().and_then(|w| w.tenants.clone()) else { return };
        census.set(now_ms);
        self.metrics.tenants.slots.record(u64::from(rules.slots));
        match crate::tenants::census(&SharedData, &prefix, &rules, now_ms) {
            Ok(c) => self.metrics.tenants.slots_used.record(u64::from(c.used)),
            Err(s) => log::debug!("llm-ratelimit: cannot count the tenant table: status {s}"),
        }
    }

    /// Learns from one provider answer: shared provider state and stats. `first` is false when
    /// the same answer is read again with its body.
    pub fn observe(
        &self,
        status: u16,
        signals: &Signals,
        probe: Option<u32>,
        now: Instant,
        first: bool,
    ) -> Option<Verdict> {
        let observed = self.with_core(|w| w.observe(&SharedData, status, signals, probe, now));
        let (v, state, changed) = match observed {
            Ok(o) => o,
            Err(s) => {
                self.metrics.errors.inc();
                log::warn!("llm-ratelimit: {}: cannot update the provider state: status {s}", self.name());
                return None;
            }
        };
        if status == 429 || changed || v != Verdict::default() || probe.is_some() {
            PROVIDER_NEWS.with(|n| n.set(n.get().wrapping_add(1)));
        }
        let m = &self.metrics.provider;
        self.gauges.heard(signals);
        if status == 429 && first {
            m.upstream_429.inc();
        }
        if v.terminal && first {
            m.terminal_quota.inc();
        }
        if v.throttled {
            m.throttled.inc();
        }
        match v.reset_accurate {
            Some(true) => m.reset_accurate.inc(),
            Some(false) => m.reset_early.inc(),
            None => {}
        }
        if let Some(e) = v.reset_error {
            m.reset_error_ms.record(e.as_millis());
        }
        if v.tripped {
            let open = Alert::BreakerOpen { until: state.until, terminal: v.terminal };
            self.alerts.raise(&self.config, open, now);
            m.breaker_trips.inc();
            let secs = (state.until - now.floor_millis()).as_secs_ceil();
            log::warn!(
                "llm-ratelimit: provider {} quota exhausted ({}): breaker open for {secs} s",
                self.name(),
                if v.terminal { "terminal" } else { "until reset" }
            );
        }
        if changed {
            self.breaker_moved(state.mode, now);
            if state.mode == Mode::Closed {
                self.holds.retries_due();
            }
        }
        Some(v)
    }

    /// The token bucket an estimated request draws on: its model's, if `tokens.per_model` names
    /// it or its family (the path's model before the body's), else the provider's.
    pub fn need(&self, e: &Estimate, path: &str) -> Option<TokenNeed> {
        let t = self.config.tokens.as_ref()?;
        let bucket = model_bucket(&t.per_model, path, e.model.as_deref());
        let tokens = e.total();
        Some(TokenNeed { bucket, tokens, input: e.input.min(tokens) })
    }

    /// The price of an estimated request, with `prices` configured: `Some(None)` when its model
    /// has none (it is refused).
    pub fn price(&self, e: &Estimate, path: &str) -> Option<Option<Price>> {
        let prices = self.config.prices.as_ref()?;
        Some(prices.of(path, e.model.as_deref()).copied())
    }

    /// The global gate refused a request the local buckets let through (the gate chain's step 4,
    /// `worker::chain`): its request token (`probe`: only if the probe took one) and the `need`
    /// LLM tokens it reserved go back to the shared bucket.
    pub fn give_back(&self, probe: Option<u32>, need: Option<TokenNeed>, now: Instant) {
        match self.with_core_mut(|w| w.give_back(&SharedData, probe, need, now)) {
            Ok(readout) => self.publish_readout(Some(readout)),
            Err(s) => {
                self.metrics.errors.inc();
                log::warn!("llm-ratelimit: {}: cannot give a refused request's tokens back: status {s}", self.name());
            }
        }
    }

    /// Request `id` ended, or a later gate refused it: its slot in flight goes back (with
    /// `in_flight`), its `answer` (status, when its headers came) teaching the adaptive limit.
    pub fn end_in_flight(&self, target: Option<u8>, id: u32, answer: Option<(u16, Instant)>) {
        if self.in_flight_of(target).is_none() {
            return;
        }
        // The clock only when the slot is written now (not when it stays spare).
        let now = || super::calls::now().ok();
        match self.with_target_mut(target, |w| w.end_in_flight(&SharedData, id, answer, now)) {
            // A waiter here takes the slot now, not on the next tick.
            Ok(()) if target.is_none() && self.core.try_borrow().is_ok_and(|w| w.local_counts() != [0; 4]) => {
                if let Ok(now) = super::calls::now() {
                    self.tick_queue(now);
                }
            }
            Ok(()) => {}
            Err(s) => {
                self.metrics.errors.inc();
                log::warn!("llm-ratelimit: {}: cannot give a slot in flight back: status {s}", self.name());
            }
        }
    }

    /// The `in_flight` rules of the primary (`None`) or of failover target `target`.
    pub fn in_flight_of(&self, target: Option<u8>) -> Option<&crate::inflight::Rules> {
        match target.and_then(|t| self.backups.get(usize::from(t))) {
            Some(b) => b.target.provider.in_flight.as_ref(),
            None => self.config.in_flight.as_ref(),
        }
    }

    /// What a 429 means for its client, without learning from it (the observer did).
    pub fn peek(&self, signals: &Signals, now: Instant) -> Option<Verdict> {
        let peeked = self.with_core(|w| w.peek(&SharedData, signals, now));
        peeked.map_err(|s| log::debug!("llm-ratelimit: cannot read the provider state: status {s}")).ok()
    }

    /// Waiter `id` left this worker's queue before its turn (client gone, or answered by Envoy).
    pub fn leave_queue(&self, id: u32, now: Instant) -> bool {
        let left = self.core.try_borrow_mut().ok().and_then(|mut w| w.leave(&SharedData, id, now));
        match left {
            Some((_, readout)) => {
                self.publish_readout(readout);
                true
            }
            None => false,
        }
    }
}
