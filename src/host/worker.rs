//! What every request of one worker VM shares: the pure [`Worker`] (queue and decisions), the
//! stats, and the responses held while their body is read. The root context ticks it; request
//! contexts call into it.

use super::abi;
use super::metrics::Metrics;
use super::shared::SharedData;
use super::vm_local::VmLocal;
use crate::admission::Need;
use crate::alert::{self, Event};
use crate::breaker::{Mode, Verdict};
use crate::config::Config;
use crate::idmap::IdMap;
use crate::priority::Priority;
use crate::reply::{self, Limited};
use crate::signals::Signals;
use crate::store::Status;
use crate::tokens::estimate::{Estimate, EstimateRules};
use crate::tokens::meter::{self, Meter};
use crate::worker::{Attempt, Refusal, Release, Tick, Worker};
use std::cell::{Cell, RefCell};

const NANOS_PER_MS: u64 = 1_000_000;
/// The "status" of a call that found the core already borrowed; no host status uses it.
pub const REENTERED: Status = u32::MAX;
/// Request header that tells the observer (upstream) which probe a request is; removed there.
pub const PROBE_HEADER: &str = "x-llm-ratelimit-probe";
/// How long a held 429 may wait for its body before it is let go without it: short while we do
/// not know whether Envoy delivers bodies to paused headers (`allow_on_headers_stop_iteration`).
const BODY_WAIT_UNKNOWN_MS: u64 = 150;
/// The same for a request held for its body: longer, since a client may pause before its body.
const REQUEST_BODY_WAIT_UNKNOWN_MS: u64 = 1_000;
const BODY_WAIT_MS: u64 = 2_000;
/// How often a worker counts the tenant table's used slots for the gauge.
const TENANT_CENSUS_MS: u64 = 10_000;

/// Whether Envoy delivers a body while the filter holds the headers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bodies {
    Unknown,
    /// A body callback arrived while headers were held: the flag is on.
    Delivered,
    /// A held response never saw its body: the flag is off; keep today's behaviour.
    Withheld,
}

/// Headers held until their body is read: a 429's, or a request's whose tokens are estimated
/// from its body.
struct Held {
    since_ms: u64,
    body_seen: bool,
    request: bool,
}

pub struct WorkerContext {
    pub core: RefCell<Worker>,
    /// The worker's configuration, readable while the core is borrowed.
    pub config: Config,
    /// Per class, the bucket level it may not spend below (the core's, for the local 429).
    floors: [f64; 4],
    pub metrics: Metrics,
    /// Seconds to refill the whole bucket: the window in `RateLimit-Policy`.
    pub window_s: u64,
    /// Whether anything reads the request path (path rules, the fallback's key).
    pub needs_path: bool,
    pub bodies: Cell<Bodies>,
    held: RefCell<IdMap<Held>>,
    /// Attempts (router retries) the observer holds until the provider's reset: id -> until, class.
    attempts: RefCell<IdMap<(u64, Priority)>>,
    /// How request bodies are estimated, when token limits are on.
    pub estimate: Option<EstimateRules>,
    /// The bucket level and queue depths last published, so gauges are written only on change.
    published_tokens: Cell<u64>,
    published_token_bucket: Cell<u64>,
    /// The provider's remaining and limit, requests and tokens: as last heard, and as last
    /// published (on the tick: remaining changes with nearly every answer).
    provider_view: Cell<[Option<u64>; 4]>,
    published_provider: Cell<[Option<u64>; 4]>,
    published_waiting: Cell<[u32; 4]>,
    /// When the queue-depth gauges were last read again for waiters elsewhere.
    levels_refreshed_ms: Cell<u64>,
    /// When the tenant table was last counted.
    census_ms: Cell<u64>,
    /// Alerts to send on the next tick, and the calls sent whose answer has not come.
    alerts: RefCell<Vec<(Event, u64)>>,
    alert_calls: RefCell<IdMap<()>>,
    /// This minute's start and the waiters shed in it, for the shedding alert.
    shed_minute: Cell<(u64, u64)>,
    /// The global gate, when `global` is configured.
    pub global: Option<super::global::GlobalHost>,
    /// The root context's id: calls are made from it.
    pub root_id: Cell<u32>,
    /// The last local 429 sent.
    last_429: Cell<Option<Reply429>>,
    /// `PROVIDER_NEWS` as this filter last saw it.
    provider_news: Cell<u64>,
    /// The `Retry-After` last sampled into `retry_after_s` this tick (0: none; one is ≥ 1 s).
    sampled_retry_after: Cell<u64>,
}

/// Bumped whenever a filter of this VM learns from a provider answer that restricts admission
/// (a 429, an exhausted or low quota, a trip, a probe's answer). The observer upstream and the
/// admission filter share the worker's VM but not their cores: this is how the admission filter
/// knows that the provider state it cached for a millisecond is stale.
static PROVIDER_NEWS: VmLocal<Cell<u64>> = VmLocal::new(Cell::new(0));

/// What a local 429 says depends on: class, reason, wait, remaining, retry, queued time.
type Reply429Key = (Priority, reply::Reason, u64, u64, bool, Option<u64>);

/// A local 429, serialized: refusals within the same millisecond say the same, so the last one
/// is kept and sent again.
struct Reply429 {
    key: Reply429Key,
    headers: Vec<u8>,
    body: String,
}

impl WorkerContext {
    pub fn new(core: Worker) -> WorkerContext {
        let c = &core.config;
        WorkerContext {
            config: c.clone(),
            floors: core.rules.floors,
            metrics: Metrics::define(&c.name),
            window_s: (c.bucket.capacity as f64 / c.bucket.refill_rate).ceil().max(1.0) as u64,
            needs_path: c.fallback.enabled
                || c.tokens.is_some()
                || c.classify.rules.iter().any(|r| matches!(r.matcher, crate::config::Matcher::PathPrefix(_))),
            bodies: Cell::new(Bodies::Unknown),
            held: RefCell::default(),
            attempts: RefCell::default(),
            estimate: c.tokens.as_ref().map(|t| EstimateRules {
                chars_per_token: t.chars_per_token,
                output_default: t.output_default,
                ..EstimateRules::default()
            }),
            published_tokens: Cell::new(u64::MAX),
            published_token_bucket: Cell::new(u64::MAX),
            provider_view: Cell::new([None; 4]),
            published_provider: Cell::new([None; 4]),
            published_waiting: Cell::new([u32::MAX; 4]),
            levels_refreshed_ms: Cell::new(0),
            census_ms: Cell::new(0),
            alerts: RefCell::default(),
            alert_calls: RefCell::default(),
            shed_minute: Cell::new((0, 0)),
            global: c.global.as_ref().map(super::global::GlobalHost::new),
            root_id: Cell::new(0),
            last_429: Cell::new(None),
            provider_news: Cell::new(0),
            sampled_retry_after: Cell::new(0),
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

    /// What the provider's last answers allow a request to do now (the core's `gate_and_mode`),
    /// first forgetting the cached provider state if a filter of this VM learned since.
    pub fn gate_and_mode(&self, now_ms: u64) -> Result<(crate::breaker::Gate, Option<Mode>), Status> {
        self.with_core(|w| {
            let news = PROVIDER_NEWS.get();
            if self.provider_news.replace(news) != news {
                w.forget_provider();
            }
            w.gate_and_mode(&SharedData, now_ms)
        })
    }

    /// Publishes process-wide queue depths and the bucket level (only when it changed).
    pub fn publish_levels(&self, levels: Option<crate::worker::Levels>) {
        let Some((waiting, tokens, token_bucket)) = levels else { return };
        if let Some(t) = token_bucket {
            let whole = t.max(0.0) as u64;
            if self.published_token_bucket.replace(whole) != whole {
                self.metrics.tokens.bucket.record(whole);
            }
        }
        // Gauges are host calls: written only when they change, not on every admission.
        if self.published_waiting.replace(waiting) != waiting {
            self.metrics.levels(waiting);
        }
        let whole = tokens.max(0.0) as u64;
        if self.published_tokens.replace(whole) != whole {
            self.metrics.bucket_tokens.record(whole);
        }
    }

    /// Answers the current request with the local 429 for `r`.
    pub fn send_limited(&self, r: &Refusal) -> Result<(), abi::Status> {
        let wait_ms = r.wait_ns.div_ceil(NANOS_PER_MS);
        let secs = reply::retry_after_secs(wait_ms);
        // A storm of refusals says the same few values: each is sampled once per tick.
        if self.sampled_retry_after.replace(secs) != secs {
            self.metrics.provider.retry_after_s.record(secs);
        }
        let remaining = (r.tokens - self.floors[r.class.index()]).max(0.0) as u64;
        let key = (r.class, r.reason, wait_ms, remaining, r.retry, r.queued_ms);
        // Taken out while the host runs (it may call back into this worker), put back after.
        let reply = match self.last_429.take() {
            Some(last) if last.key == key => last,
            _ => self.limited(r, key),
        };
        let sent = abi::send_serialized(429, &reply.headers, reply.body.as_bytes());
        self.last_429.set(Some(reply));
        sent
    }

    /// The local 429 for `r`.
    fn limited(&self, r: &Refusal, key: Reply429Key) -> Reply429 {
        let (_, _, wait_ms, remaining, _, _) = key;
        let c = &self.config;
        let (_, mut headers, body) = reply::too_many_requests(&Limited {
            name: &c.name,
            priority: r.class,
            reason: r.reason,
            wait_ms,
            remaining,
            quota: c.bucket.capacity,
            window_s: self.window_s,
            retry: r.retry,
        });
        if let Some(ms) = r.queued_ms {
            headers.push(("x-ratelimit-queued-ms", ms.to_string()));
        }
        let pairs: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        Reply429 { key, headers: crate::header_map::serialize(&pairs), body }
    }

    /// Answers a waiting request (not the current one) with a local 429.
    pub(super) fn refuse_waiter(&self, r: &Refusal) {
        if let Err(s) = abi::set_effective_context(r.id).and_then(|_| self.send_limited(r)) {
            log::debug!("llm-ratelimit: #{} cannot answer the waiting request: status {s}", r.id);
        }
    }

    /// Lets a released waiter go (unless it now waits for the global gate); a probe is marked for
    /// the observer upstream.
    fn resume(&self, r: &Release, mark_probe: bool, now_ms: u64) {
        if let (Some(n), true) = (r.probe, mark_probe) {
            let marked =
                abi::set_effective_context(r.id).and_then(|_| abi::set_request_header(PROBE_HEADER, &n.to_string()));
            if let Err(s) = marked {
                log::debug!("llm-ratelimit: #{} cannot mark the probe: status {s}", r.id);
            }
        }
        if !self.global_released(r.id, r.waited_ms, now_ms) {
            return;
        }
        self.metrics.of(r.class).admitted.inc();
        if let Err(s) = abi::resume_request(r.id) {
            log::debug!("llm-ratelimit: #{} cannot resume the request: status {s}", r.id);
        }
    }

    /// Carries out what a tick or an arrival decided for waiters: stats, resumes, refusals.
    pub fn carry_out(&self, t: &Tick) {
        let mark_probe = self.config.role == crate::config::Role::Admission;
        let now_ms =
            if t.released.is_empty() || self.global.is_none() { 0 } else { abi::now_ns().unwrap_or(0) / NANOS_PER_MS };
        for r in &t.released {
            let m = self.metrics.of(r.class);
            m.released.inc();
            m.queue_wait_ms.record(r.waited_ms);
            self.resume(r, mark_probe, now_ms);
        }
        for r in &t.expired {
            self.metrics.of(r.class).expired.inc();
            self.refuse_waiter(r);
        }
        if let Some(mode) = t.moved {
            self.breaker_moved(mode, 0);
        }
        if t.probe_started {
            self.probe_started();
        }
        for s in &t.errors {
            self.metrics.errors.inc();
            log::warn!("llm-ratelimit: {}: shared data failed in the tick: status {s}", self.name());
        }
        self.publish_levels(t.levels);
    }

    pub fn probe_started(&self) {
        self.metrics.provider.breaker_probes.inc();
        self.metrics.provider.breaker_state.record(Mode::HalfOpen as u64);
    }

    /// The breaker moved to `mode` (a write of ours did it): the gauge, and a resolve alert
    /// when it closed.
    pub fn breaker_moved(&self, mode: Mode, now_ms: u64) {
        self.metrics.provider.breaker_state.record(mode as u64);
        if mode == Mode::Closed {
            self.raise(Event::BreakerClosed, now_ms);
        }
    }

    /// Queues an alert for the next tick (when alerts are configured).
    fn raise(&self, event: Event, now_ms: u64) {
        if self.config.alert.is_some() {
            if let Ok(mut a) = self.alerts.try_borrow_mut() {
                a.push((event, now_ms));
            }
        }
    }

    /// Sends the queued alerts: one per provider and event per interval, process-wide.
    fn send_alerts(&self, now_ms: u64) {
        let Some(cfg) = &self.config.alert else { return };
        let queued = match self.alerts.try_borrow_mut() {
            Ok(mut a) if !a.is_empty() => std::mem::take(&mut *a),
            _ => return,
        };
        for (event, at_ms) in queued {
            let at_ms = if at_ms == 0 { now_ms } else { at_ms };
            let key = alert::slot_key(self.name(), event.name());
            match alert::claim(&SharedData, &key, &event, now_ms, cfg.min_interval_ms) {
                Ok(true) => {}
                Ok(false) => continue,
                Err(s) => log::debug!("llm-ratelimit: cannot claim the alert slot: status {s}"),
            }
            let body = alert::payload(cfg.format, self.name(), &event, at_ms);
            let headers = [
                (":method", "POST"),
                (":path", cfg.path.as_str()),
                (":authority", cfg.cluster.as_str()),
                ("content-type", "application/json"),
            ];
            let timeout = cfg.timeout_ms.min(u64::from(u32::MAX)) as u32;
            match abi::http_call(&cfg.cluster, &headers, body.as_bytes(), timeout) {
                Ok(token) => {
                    if let Ok(mut c) = self.alert_calls.try_borrow_mut() {
                        c.insert(token, ());
                    }
                }
                Err(s) => {
                    self.metrics.provider.alerts_failed.inc();
                    log::warn!(
                        "llm-ratelimit: {}: cannot send the {} alert to {}: status {s}",
                        self.name(),
                        event.name(),
                        cfg.cluster
                    );
                }
            }
        }
    }

    /// The answer to an alert: counted as sent (2xx) or failed (anything else, or none).
    pub fn alert_answered(&self, token: u32, num_headers: usize) {
        let ours = self.alert_calls.try_borrow_mut().is_ok_and(|mut c| c.remove(&token).is_some());
        if !ours {
            return;
        }
        let status = if num_headers == 0 { None } else { abi::http_call_response_header(":status").ok().flatten() };
        match status.as_deref().and_then(|s| s.parse::<u16>().ok()) {
            Some(200..=299) => self.metrics.provider.alerts_sent.inc(),
            other => {
                self.metrics.provider.alerts_failed.inc();
                log::warn!("llm-ratelimit: {}: the alert receiver answered {other:?}", self.name());
            }
        }
    }

    pub fn shed(&self, r: &Refusal) {
        self.metrics.of(r.class).shed.inc();
        if let (Some(cfg), Ok(now)) = (&self.config.alert, abi::now_ns()) {
            let now_ms = now / NANOS_PER_MS;
            let (start, n) = self.shed_minute.get();
            let (start, n) = if now_ms.saturating_sub(start) >= 60_000 { (now_ms, 1) } else { (start, n + 1) };
            self.shed_minute.set((start, n));
            if cfg.shed_per_minute > 0 && n == cfg.shed_per_minute {
                self.raise(Event::Shedding { per_minute: n }, now_ms);
            }
        }
        self.refuse_waiter(r);
    }

    /// One tick of this worker: held responses first, then the queue, then the counters.
    pub fn tick(&self, now_ns: u64) {
        self.sampled_retry_after.set(0);
        self.tick_core(now_ns);
        self.global_tick(now_ns);
        if let Ok(mut w) = self.core.try_borrow_mut() {
            let (leases, leased) = w.take_lease_counts();
            self.metrics.leases.add(leases);
            self.metrics.leased.add(leased);
        }
        self.metrics.cas_conflicts.add(super::shared::take_conflicts());
        self.send_alerts(now_ns / NANOS_PER_MS);
        self.publish_provider_view();
        super::metrics::flush();
    }

    fn tick_core(&self, now_ns: u64) {
        let now_ms = now_ns / NANOS_PER_MS;
        self.let_go_of_stale_bodies(now_ms);
        self.send_held_attempts(now_ms);
        self.count_tenants(now_ns);
        let refresh = self.published_waiting.get() != [0; 4]
            && now_ms.abs_diff(self.levels_refreshed_ms.get()) >= crate::admission::HEARTBEAT_MS;
        let t = {
            let Ok(mut w) = self.core.try_borrow_mut() else { return };
            if refresh {
                self.levels_refreshed_ms.set(now_ms);
                w.refresh_levels();
            }
            if !w.needs_tick() {
                return;
            }
            w.tick(&SharedData, now_ns)
        };
        // The borrow is dropped: answering a waiter runs its response callbacks synchronously.
        self.carry_out(&t);
    }

    /// Every `TENANT_CENSUS_MS`, the used slots of the tenant table (it reads every slot).
    fn count_tenants(&self, now_ns: u64) {
        let now_ms = now_ns / NANOS_PER_MS;
        if self.config.tenant.is_none() || now_ms.abs_diff(self.census_ms.get()) < TENANT_CENSUS_MS {
            return;
        }
        let Some((rules, prefix)) = self.core.try_borrow().ok().and_then(|w| w.tenants.clone()) else { return };
        self.census_ms.set(now_ms);
        self.metrics.tenants.slots.record(u64::from(rules.slots));
        match crate::tenants::census(&SharedData, &prefix, &rules, now_ns) {
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
        now_ms: u64,
        first: bool,
    ) -> Option<Verdict> {
        let observed = self.with_core(|w| w.observe(&SharedData, status, signals, probe, now_ms));
        let (v, state, changed) = match observed {
            Ok(o) => o,
            Err(s) => {
                self.metrics.errors.inc();
                log::warn!("llm-ratelimit: {}: cannot update the provider state: status {s}", self.name());
                return None;
            }
        };
        if status == 429 || changed || v != Verdict::default() || probe.is_some() {
            PROVIDER_NEWS.set(PROVIDER_NEWS.get().wrapping_add(1));
        }
        let m = &self.metrics.provider;
        self.note_provider_view(signals);
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
        if let Some(e) = v.reset_error_ms {
            m.reset_error_ms.record(e);
        }
        if v.tripped {
            self.raise(Event::BreakerOpen { until_ms: state.until_ms, terminal: v.terminal }, now_ms);
            m.breaker_trips.inc();
            let secs = state.until_ms.saturating_sub(now_ms).div_ceil(1000);
            log::warn!(
                "llm-ratelimit: provider {} quota exhausted ({}): breaker open for {secs} s",
                self.name(),
                if v.terminal { "terminal" } else { "until reset" }
            );
        }
        if changed {
            self.breaker_moved(state.mode, now_ms);
        }
        Some(v)
    }

    /// The provider's own remaining and limits, as this answer said them.
    fn note_provider_view(&self, s: &Signals) {
        let now = [s.remaining_requests, s.remaining_tokens, s.limit_requests, s.limit_tokens];
        let before = self.provider_view.get();
        self.provider_view.set([0, 1, 2, 3].map(|i| now[i].or(before[i])));
    }

    /// Publishes the provider's own remaining and limits, beside our buckets (only what changed).
    fn publish_provider_view(&self) {
        let (now, before) = (self.provider_view.get(), self.published_provider.get());
        let m = &self.metrics.provider;
        let gauges = [m.remaining_requests, m.remaining_tokens, m.limit_requests, m.limit_tokens];
        for ((v, was), gauge) in now.into_iter().zip(before).zip(gauges) {
            if let Some(v) = v.filter(|_| v != was) {
                gauge.record(v);
            }
        }
        self.published_provider.set(now);
    }

    /// The token bucket an estimated request draws on: its model's, if `tokens.per_model` names
    /// it, else the provider's.
    pub fn need(&self, e: &Estimate) -> Option<Need> {
        let t = self.config.tokens.as_ref()?;
        let model = e.model.as_deref().and_then(|m| t.per_model.binary_search_by(|(n, _)| n.as_str().cmp(m)).ok());
        Some(Need { bucket: model.map_or(0, |i| i + 1) as u8, tokens: e.total() })
    }

    /// An admitted request's answer is over (or will never come): the difference between its
    /// reservation and what it used is given back or taken (on the next tick), and both counted.
    pub fn settle(&self, mut m: Meter) {
        let used = m.used();
        match self.core.try_borrow_mut() {
            Ok(mut w) => w.reconcile(m.need, used.total()),
            Err(_) => {
                self.metrics.errors.inc();
                log::warn!("llm-ratelimit: {}: cannot reconcile a request's tokens: re-entered", self.name());
            }
        }
        let t = &self.metrics.tokens;
        t.estimated.add(m.need.tokens);
        t.actual.add(used.total());
        t.input.add(used.input);
        t.output.add(used.output);
        if used.reported {
            t.estimate_error_pct.record(meter::error_pct(m.need.tokens, used.total()));
        }
    }

    /// What a 429 means for its client, without learning from it (the observer did).
    pub fn peek(&self, signals: &Signals, now_ms: u64) -> Option<Verdict> {
        let peeked = self.with_core(|w| w.peek(&SharedData, signals, now_ms));
        peeked.map_err(|s| log::debug!("llm-ratelimit: cannot read the provider state: status {s}")).ok()
    }

    pub fn hold_response(&self, id: u32, now_ms: u64) -> bool {
        self.hold(id, now_ms, false)
    }

    /// Holds request `id`'s headers until its body is read.
    pub fn hold_request(&self, id: u32, now_ms: u64) -> bool {
        self.hold(id, now_ms, true)
    }

    fn hold(&self, id: u32, now_ms: u64, request: bool) -> bool {
        self.held
            .try_borrow_mut()
            .map(|mut h| h.insert(id, Held { since_ms: now_ms, body_seen: false, request }))
            .is_ok()
    }

    /// A body callback for held response `id`: whether it is still held (the tick may have let
    /// it go). Its arrival proves Envoy delivers bodies to held headers.
    pub fn body_arrived(&self, id: u32) -> bool {
        let Ok(mut h) = self.held.try_borrow_mut() else { return false };
        let Some(e) = h.get_mut(&id) else { return false };
        e.body_seen = true;
        self.bodies_delivered();
        true
    }

    /// A body arrived while its headers were held: Envoy delivers them
    /// (`allow_on_headers_stop_iteration`), so 429 bodies are read before their headers go on.
    pub fn bodies_delivered(&self) {
        if self.bodies.replace(Bodies::Delivered) != Bodies::Delivered {
            log::info!("llm-ratelimit: allow_on_headers_stop_iteration is on: bodies are read before their headers");
        }
    }

    /// Forgets held headers of `id` (a 429's, or a request's waiting for its body).
    pub fn release_held(&self, id: u32) {
        if let Ok(mut h) = self.held.try_borrow_mut() {
            h.remove(&id);
        }
    }

    /// Held 429s whose body did not come in time go on without it, so nothing ever hangs. A
    /// request's body comes at its client's pace, bounded by Envoy's stream timeouts; only while
    /// it is unknown whether Envoy delivers bodies to held headers is it let go (unlimited) when
    /// none came within a second.
    fn let_go_of_stale_bodies(&self, now_ms: u64) {
        let bodies = self.bodies.get();
        let limit = if bodies == Bodies::Delivered { BODY_WAIT_MS } else { BODY_WAIT_UNKNOWN_MS };
        let stale: Vec<(u32, bool, bool)> = match self.held.try_borrow_mut() {
            Ok(mut h) if !h.is_empty() => {
                let ids: Vec<(u32, bool, bool)> = h
                    .iter()
                    .filter(|(_, e)| !e.request || (bodies == Bodies::Unknown && !e.body_seen))
                    .filter(|(_, e)| {
                        let limit = if e.request { REQUEST_BODY_WAIT_UNKNOWN_MS } else { limit };
                        now_ms.saturating_sub(e.since_ms) >= limit || now_ms < e.since_ms
                    })
                    .map(|(id, e)| (*id, e.body_seen, e.request))
                    .collect();
                for (id, ..) in &ids {
                    h.remove(id);
                }
                ids
            }
            _ => return,
        };
        for (id, body_seen, request) in stale {
            if !body_seen && self.bodies.get() == Bodies::Unknown {
                self.bodies.set(Bodies::Withheld);
                log::info!(
                    "llm-ratelimit: allow_on_headers_stop_iteration is off: bodies are read after their headers"
                );
            }
            let resumed = if request {
                log::warn!(
                    "llm-ratelimit: #{id}: no request body came while its headers were held: let through unlimited"
                );
                self.metrics.errors.inc();
                abi::resume_request(id)
            } else {
                abi::resume_response(id)
            };
            if let Err(s) = resumed {
                log::debug!("llm-ratelimit: #{id} cannot resume: status {s}");
            }
        }
    }

    /// Holds upstream attempt `id` of `class` until `until_ms`; false if it cannot be held.
    pub fn hold_attempt(&self, id: u32, class: Priority, until_ms: u64) -> bool {
        self.attempts.try_borrow_mut().map(|mut a| a.insert(id, (until_ms, class))).is_ok()
    }

    pub fn attempt_held(&self, id: u32) -> bool {
        self.attempts.try_borrow().is_ok_and(|a| a.contains_key(&id))
    }

    /// Held attempts whose reset has come are decided again (the window's count may have run
    /// out meanwhile): sent, held longer, or answered here.
    fn send_held_attempts(&self, now_ms: u64) {
        let due: Vec<(u32, Priority)> = match self.attempts.try_borrow_mut() {
            Ok(mut a) if !a.is_empty() => {
                let due: Vec<(u32, Priority)> =
                    a.iter().filter(|(_, (until, _))| *until <= now_ms).map(|(id, (_, class))| (*id, *class)).collect();
                for (id, _) in &due {
                    a.remove(id);
                }
                due
            }
            _ => return,
        };
        for (id, class) in due {
            let decided = self.with_core(|w| w.attempt(&SharedData, class, now_ms));
            match decided {
                Ok(Attempt::Hold { until_ms }) if self.hold_attempt(id, class, until_ms) => {}
                Ok(Attempt::Refuse(r)) => self.refuse_waiter(&Refusal { id, ..r }),
                _ => {
                    if let Err(s) = abi::resume_request(id) {
                        log::debug!("llm-ratelimit: #{id} cannot send the held attempt: status {s}");
                    }
                }
            }
        }
    }

    /// Waiter `id` of the current context left (client gone): free its place.
    pub fn leave(&self, id: u32, now_ns: u64) -> Option<Priority> {
        self.release_held(id);
        if let Some(class) = self.global_leave(id) {
            return Some(class);
        }
        if let Ok(mut a) = self.attempts.try_borrow_mut() {
            a.remove(&id);
        }
        let (class, levels) = self.core.try_borrow_mut().ok()?.leave(&SharedData, id, now_ns)?;
        self.publish_levels(levels);
        Some(class)
    }
}
