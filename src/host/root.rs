//! The root context: one per worker VM. It owns the configuration, the stats and this worker's
//! wait queues, hands them to every request's context, and on every tick expires and releases
//! waiting requests.

use super::http::Request;
use super::metrics::Metrics;
use super::abi;
use super::shared::SharedData;
use crate::store;
use crate::admission::{Policy, Shared};
use crate::breaker::{self, Gate, Verdict};
use crate::config::Config;
use crate::priority::Priority;
use crate::queue::{WaitQueue, Waiter};
use crate::reply::{self, Limited, Reason};
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::ContextType;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;

const NANOS_PER_MS: u64 = 1_000_000;

/// What every request of this worker shares.
pub struct Filter {
    pub config: Config,
    pub policy: Policy,
    pub metrics: Metrics,
    /// Seconds to refill the whole bucket: the window in `RateLimit-Policy`.
    pub window_s: u64,
    /// This worker's waiting requests, per bucket key (Envoy context ids).
    pub queues: RefCell<HashMap<String, WaitQueue<u32>>>,
    /// Milliseconds each released request waited, until its response headers carry it.
    pub waited_ms: RefCell<HashMap<u32, u64>>,
    /// Shared-data key of the provider's breaker state.
    pub provider_key: String,
    /// Shared-data key of the bucket when there are no tenants.
    pub default_bucket_key: String,
    /// Whether anything reads the request path (path rules, the fallback's key): saves a host
    /// call per request when nothing does.
    pub needs_path: bool,
    /// The bucket level last published, so the gauge is written only when it changes.
    pub published_tokens: Cell<u64>,
}

impl Filter {
    /// Shared-data key of the bucket for `tenant` (`None`: the one bucket of this filter).
    pub fn bucket_key(&self, tenant: Option<&str>) -> String {
        match tenant {
            None => self.default_bucket_key.clone(),
            Some(t) => format!("{}/{}", self.default_bucket_key, tenant_id(t)),
        }
    }

    /// Publishes the bucket level if it changed since this worker last did.
    pub fn publish_tokens(&self, tokens: f64) {
        let whole = tokens.max(0.0) as u64;
        if self.published_tokens.replace(whole) != whole {
            self.metrics.bucket_tokens.record(whole);
        }
    }

    /// The state a bucket starts in: full, nobody waiting.
    pub fn fresh(&self, now_ns: u64) -> Shared {
        Shared::new(self.policy.bucket.full(now_ns))
    }

    /// What the provider's last answers allow a request to do now.
    pub fn gate(&self, now_ms: u64) -> Result<Gate, abi::Status> {
        let policy = &self.config.provider.breaker;
        let gate = store::update(&SharedData, &self.provider_key, || breaker::State::default(), |s| policy.gate(s, now_ms))?;
        if gate == Gate::Probe {
            self.metrics.provider.breaker_probes.inc();
            self.metrics.provider.breaker_state.record(breaker::Mode::HalfOpen as u64);
        }
        Ok(gate)
    }

    /// Learns from one provider response: updates the shared breaker state and the stats.
    /// `first` is false when the same response is read again, from its body.
    pub fn observe(
        &self,
        status: u16,
        signals: &crate::signals::Signals,
        now_ms: u64,
        first: bool,
    ) -> Result<Verdict, abi::Status> {
        let policy = &self.config.provider.breaker;
        let (verdict, state, changed) = store::update(&SharedData, &self.provider_key, || breaker::State::default(), |s| {
            let (v, next) = policy.observe(s, status, signals, now_ms);
            ((v, next, next.mode != s.mode), (next != s).then_some(next))
        })?;
        let m = &self.metrics.provider;
        if status == 429 && first {
            m.upstream_429.inc();
        }
        if verdict.terminal {
            m.terminal_quota.inc();
        }
        if verdict.throttled {
            m.throttled.inc();
        }
        if verdict.tripped {
            m.breaker_trips.inc();
            let secs = state.until_ms.saturating_sub(now_ms).div_ceil(1000);
            log::warn!(
                "llm-ratelimit: provider {} quota exhausted ({}): breaker open for {secs} s",
                self.config.name,
                if verdict.terminal { "terminal" } else { "until reset" }
            );
        }
        if changed {
            m.breaker_state.record(state.mode as u64);
        }
        Ok(verdict)
    }

    /// What a 429 means for its client without learning from it again: the provider's own
    /// timing, or the reset the observer in the upstream chain already recorded.
    pub fn peek(&self, signals: &crate::signals::Signals, now_ms: u64) -> Result<Verdict, abi::Status> {
        let state = store::update(&SharedData, &self.provider_key, || breaker::State::default(), |s| (s, None))?;
        let recorded = (state.until_ms > now_ms).then_some(state.until_ms);
        Ok(Verdict {
            retry_at_ms: signals.retry_at().filter(|&t| t > now_ms).max(recorded),
            terminal: signals.terminal.is_some() || state.terminal,
            ..Verdict::default()
        })
    }

    pub fn wait_queue(&self) -> WaitQueue<u32> {
        WaitQueue::new(self.policy.weights)
    }

    /// The local 429 for a request of `class` when the bucket holds `tokens`, as status,
    /// headers and body.
    pub fn limited(
        &self,
        class: Priority,
        reason: Reason,
        wait_ns: u64,
        tokens: f64,
        retry: bool,
    ) -> (u32, Vec<(&'static str, String)>, String) {
        self.metrics.provider.retry_after_s.record(reply::retry_after_secs(wait_ns.div_ceil(NANOS_PER_MS)));
        reply::too_many_requests(&Limited {
            policy: &self.config.name,
            priority: class,
            reason,
            wait_ms: wait_ns.div_ceil(NANOS_PER_MS),
            remaining: (tokens - self.policy.floors[class.index()]).max(0.0) as u64,
            quota: self.config.bucket.capacity,
            window_s: self.window_s,
            retry,
        })
    }

    /// Answers a waiting request (not the current one) with a local 429.
    pub fn refuse_waiter(&self, w: &Waiter<u32>, reason: Reason, s: &Shared, now_ms: u64) {
        let wait_ns = self.policy.expected_wait_ns(s, w.class, 0);
        let (status, mut headers, body) = self.limited(w.class, reason, wait_ns, s.bucket.tokens, true);
        headers.push(("x-ratelimit-queued-ms", now_ms.saturating_sub(w.enqueued_ms).to_string()));
        let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let sent = abi::set_effective_context(w.id).and_then(|_| abi::send_response(status, &headers, body.as_bytes()));
        if let Err(s) = sent {
            log::debug!("llm-ratelimit: cannot answer waiting request {}: status {s}", w.id);
        }
    }

    /// Expires this worker's waiters on bucket `key`, then releases as many as `gate` allows.
    fn serve(&self, key: &str, q: &mut WaitQueue<u32>, now_ns: u64, gate: Gate) -> Result<(), abi::Status> {
        let now_ms = now_ns / NANOS_PER_MS;
        for w in q.expire(now_ms) {
            let s = store::update(&SharedData, key, || self.fresh(now_ns), |s| {
                let next = self.policy.leave(s, w.class);
                (next, Some(next))
            })?;
            self.metrics.of(w.class).expired.inc();
            self.metrics.levels(&s);
            self.publish_tokens(s.bucket.tokens);
            self.refuse_waiter(&w, Reason::Expired, &s, now_ms);
        }
        let mut allowed = match gate {
            Gate::Pass => usize::MAX,
            Gate::Probe => 1,
            Gate::Hold { .. } | Gate::Open { .. } => 0,
        };
        while !q.is_empty() && allowed > 0 {
            allowed -= 1;
            let released = store::update(&SharedData, key, || self.fresh(now_ns), |s| {
                let s = Shared { bucket: self.policy.bucket.refill(s.bucket, now_ns), ..s };
                match q.peek_next_class(|p| self.policy.can_release(&s, p)) {
                    Some(p) => {
                        let next = self.policy.release(s, p, now_ns);
                        (next.map(|n| (p, n)), next)
                    }
                    None => (None, None),
                }
            })?;
            let Some((p, s)) = released else { break };
            let Some(w) = q.pop_next(|c| c == p) else { break };
            let waited = now_ms.saturating_sub(w.enqueued_ms);
            let m = self.metrics.of(p);
            m.released.inc();
            m.admitted.inc();
            m.queue_wait_ms.record(waited);
            self.metrics.levels(&s);
            self.publish_tokens(s.bucket.tokens);
            if let Ok(mut w_ms) = self.waited_ms.try_borrow_mut() {
                w_ms.insert(w.id, waited);
            }
            if let Err(st) = abi::resume_request(w.id) {
                log::debug!("llm-ratelimit: cannot resume request {}: status {st}", w.id);
            }
        }
        Ok(())
    }
}

/// Long or odd tenant values are hashed so keys stay short and printable.
fn tenant_id(t: &str) -> String {
    if t.len() <= 64 && t.bytes().all(|c| c.is_ascii_graphic()) {
        return t.to_string();
    }
    format!("#{:016x}", crate::hash::stable_hash(&[t]))
}

#[derive(Default)]
pub struct Root {
    filter: Option<Rc<Filter>>,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        let bytes = match abi::plugin_configuration() {
            Ok(b) => b,
            Err(s) => {
                log::error!("llm-ratelimit: cannot read the plugin configuration: status {s}");
                return false;
            }
        };
        let config = match Config::parse(&bytes) {
            Ok(c) => c,
            Err(e) => {
                log::error!("llm-ratelimit: invalid configuration: {e}");
                return false;
            }
        };
        let b = &config.bucket;
        let window_s = (b.capacity as f64 / b.refill_rate).ceil().max(1.0) as u64;
        let filter = Filter {
            policy: Policy::new(&config),
            metrics: Metrics::define(&config.name),
            window_s,
            queues: RefCell::default(),
            waited_ms: RefCell::default(),
            provider_key: format!("llm_ratelimit/{}/provider", config.name),
            default_bucket_key: format!("llm_ratelimit/{}/bucket", config.name),
            needs_path: config.fallback.enabled
                || config.classify.rules.iter().any(|r| matches!(r.matcher, crate::config::Matcher::PathPrefix(_))),
            published_tokens: Cell::new(u64::MAX),
            config,
        };
        if filter.config.role.admits() && filter.config.bucket.key_header.is_none() {
            let created = abi::now_ns().and_then(|now| store::ensure(&SharedData, &filter.bucket_key(None), filter.fresh(now)));
            if let Err(s) = created {
                log::warn!("llm-ratelimit: cannot create the shared bucket: status {s}");
            }
        }
        if filter.config.role.admits() && filter.config.queue.enabled {
            let tick = filter.config.queue.tick_ms.min(u32::MAX as u64) as u32;
            if let Err(s) = abi::set_tick_period_ms(tick) {
                log::error!("llm-ratelimit: cannot start the queue timer: status {s}");
                return false;
            }
        }
        log::info!("llm-ratelimit: configured filter {:?}", filter.config.name);
        self.filter = Some(Rc::new(filter));
        true
    }

    fn on_tick(&mut self) {
        let Some(f) = &self.filter else { return };
        // Never panics: a borrow still held (a host call re-entering the VM) skips this tick.
        let Ok(mut queues) = f.queues.try_borrow_mut() else { return };
        if queues.values().all(WaitQueue::is_empty) {
            return;
        }
        let now = match abi::now_ns() {
            Ok(t) => t,
            Err(s) => return log::warn!("llm-ratelimit: no clock in on_tick: status {s}"),
        };
        let gate = f.gate(now / NANOS_PER_MS).unwrap_or_else(|s| {
            f.metrics.errors.inc();
            log::warn!("llm-ratelimit: cannot read the provider state: status {s}");
            Gate::Pass
        });
        for (key, q) in queues.iter_mut() {
            if let Err(s) = f.serve(key, q, now, gate) {
                f.metrics.errors.inc();
                log::warn!("llm-ratelimit: releasing waiters of {key} failed: status {s}");
            }
        }
        queues.retain(|_, q| !q.is_empty());
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        let filter = self.filter.clone()?;
        Some(Box::new(Request::new(filter, context_id)))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}
