//! One request's context: classify it, then let it through, make it wait, or answer a local 429;
//! on the way back, learn from the provider's answer and give a 429 one precise `Retry-After`.
//!
//! Its life is one [`Phase`]. Every callback Envoy can make, and every event its worker posts,
//! is one `match` on the phase with one decision each; none is left to a default. The table of
//! callback × phase is in README.md ("The request lifecycle").

use super::api::{Action, Status};
use super::calls;
use super::event::Event;
use super::failover::{Backup, ROUTE_HEADER};
use super::global::{Gated, GlobalNeed};
use super::holds::Bodies;
use super::reservation::{self, Reservation};
use super::shared::SharedData;
use super::worker::{WorkerContext, PROBE_HEADER};
use crate::breaker::{Gate, Verdict};
use crate::classify::classify;
use crate::config::{Config, Role};
use crate::header_map::HeaderMap;
use crate::priority::Priority;
use crate::reply::Reason;
use crate::signals;
use crate::time::{Duration, Instant};
use crate::tokens::estimate::{self, Estimate};
use crate::tokens::meter::Meter;
use crate::worker::{Admission, Arrival, Attempt, Decision, Refusal, Release};
use std::rc::Rc;

/// Largest provider 429 body read for timing and terminal-quota hints.
const MAX_BODY: usize = 64 * 1024;

/// Where a request is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Created; its headers not seen yet.
    Arriving,
    /// Its headers held while its body is read, to estimate its tokens.
    ReadingBody,
    /// Waiting in this worker's queue for its tokens.
    Queued,
    /// Through the local buckets; waiting for the rate limit service's word.
    AwaitingGlobal,
    /// (Observer) a router retry held until the provider's reset.
    HeldRetry,
    /// Let through; its answer not begun.
    Upstream,
    /// A provider 429's headers held while its body is read.
    Holding429,
    /// The answer flows to the client.
    Responding,
    /// Answered by this filter (a local 429 or 408, a cached answer): nothing else goes out.
    Answered,
    /// Envoy is done with it: nothing acts on it any more.
    Done,
}

/// A provider 429 whose body is being read.
struct Answer429 {
    headers: HeaderMap,
    /// What the headers alone said.
    from_headers: signals::Signals,
    /// The body so far, when it flows past (not held).
    body: Vec<u8>,
    /// The shared state already learned from the headers.
    learned: bool,
}

pub struct Request {
    w: Rc<WorkerContext>,
    id: u32,
    phase: Phase,
    class: Priority,
    /// The half-open probe number it carries, when it goes as the probe.
    probe: Option<u32>,
    answer_429: Option<Answer429>,
    /// Fallback cache identity of this request, when the fallback is on and the client sent a key.
    cache_key: Option<crate::fallback::Identity>,
    /// A success being collected for the fallback cache: content type and body so far.
    capture: Option<(String, Vec<u8>)>,
    /// The request path, kept while the body is read (the model may be in it).
    path: String,
    /// The body buffered so far while it is read.
    body_size: usize,
    /// Its token estimate, until it is admitted.
    estimate: Option<crate::admission::TokenNeed>,
    /// `prices` has no price for its model: it is refused.
    unpriced: bool,
    /// What it needs from the global gate, kept while it waits in the queue.
    global: Option<GlobalNeed>,
    /// What it holds at the gates, until its answer settles it.
    held: Reservation,
    /// How long it waited in the queue, for `x-ratelimit-queued-ms`.
    waited: Option<Duration>,
    /// Which attempt of the router's this is (the observer reads `x-envoy-attempt-count`).
    attempt: u32,
    /// Its answer's status and when its headers came, for the adaptive in-flight limit.
    answered: Option<(u16, Instant)>,
    /// Its body, kept from its read to its decision when a failover target may rename its model.
    body: Option<Vec<u8>>,
    /// The failover targets were tried for it (once: a refusal after a hold does not try again).
    failover_tried: bool,
    /// Its estimate's model, kept when there are failover targets (each prices it by its own
    /// table).
    model: Option<String>,
}

fn header(name: &str) -> Option<String> {
    calls::request_header(name).unwrap_or_else(|s| {
        log::debug!("llm-ratelimit: cannot read request header {name}: status {s}");
        None
    })
}

fn content_length() -> Option<u64> {
    header("content-length").and_then(|v| v.trim().parse().ok())
}

fn set_header(name: &str, value: &str) {
    if let Err(s) = calls::set_response_header(name, value) {
        log::debug!("llm-ratelimit: cannot set response header {name}: status {s}");
    }
}

/// Appends the current body chunk to `body` if it keeps it within `max` bytes; false if not.
fn append_chunk(body: &mut Vec<u8>, chunk_size: usize, max: usize) -> bool {
    if body.len().saturating_add(chunk_size) > max {
        return false;
    }
    body.extend(calls::response_body(chunk_size).unwrap_or_default());
    true
}

/// The clock, or the origin when the host cannot say.
fn now() -> Instant {
    calls::now().unwrap_or_default()
}

impl Request {
    pub fn new(w: Rc<WorkerContext>, id: u32) -> Request {
        Request {
            w,
            id,
            phase: Phase::Arriving,
            class: Priority::Normal,
            probe: None,
            answer_429: None,
            cache_key: None,
            capture: None,
            path: String::new(),
            body_size: 0,
            estimate: None,
            unpriced: false,
            global: None,
            held: Reservation::default(),
            waited: None,
            attempt: 0,
            answered: None,
            body: None,
            failover_tried: false,
            model: None,
        }
    }

    fn role(&self) -> Role {
        self.w.config.role
    }

    /// The most of a request body read for its estimate (`tokens.max_body_bytes`).
    fn max_body(&self) -> usize {
        self.w.config.tokens.as_ref().map_or(0, |t| usize::try_from(t.max_body_bytes).unwrap_or(usize::MAX))
    }

    // ---- Callbacks from Envoy -------------------------------------------------------------

    pub fn on_request_headers(&mut self, end_of_stream: bool) -> Action {
        if self.phase != Phase::Arriving {
            // Headers come once; anything else is not ours to act on.
            return Action::Continue;
        }
        if self.role().admits() {
            self.arrive(end_of_stream)
        } else {
            self.attempt_arrives()
        }
    }

    /// Envoy with `allow_on_headers_stop_iteration` delivers the body while the headers are
    /// paused, and a Continue here would resume them: a held request holds its body too.
    pub fn on_request_body(&mut self, size: usize, end_of_stream: bool) -> Action {
        match self.phase {
            Phase::ReadingBody => self.read_body(size, end_of_stream),
            Phase::Queued | Phase::AwaitingGlobal | Phase::HeldRetry => {
                self.w.holds.bodies_delivered();
                Action::Pause
            }
            Phase::Answered => Action::Pause,
            Phase::Arriving | Phase::Upstream | Phase::Holding429 | Phase::Responding | Phase::Done => Action::Continue,
        }
    }

    /// Trailers end the request: a Continue here would resume held headers and body with them.
    pub fn on_request_trailers(&mut self) -> Action {
        match self.phase {
            // The body is whole: decide now.
            Phase::ReadingBody => self.body_read(self.body_size, true),
            Phase::Queued | Phase::AwaitingGlobal | Phase::HeldRetry | Phase::Answered => Action::Pause,
            Phase::Arriving | Phase::Upstream | Phase::Holding429 | Phase::Responding | Phase::Done => Action::Continue,
        }
    }

    pub fn on_response_headers(&mut self, end_of_stream: bool) -> Action {
        match self.phase {
            Phase::Upstream => self.answer_begins(end_of_stream),
            // Our own local reply (a 429, a 408, a cached answer): nothing to learn or rewrite.
            Phase::Answered | Phase::Done | Phase::Arriving => Action::Continue,
            // Envoy answered a request we held (a 413, a timeout): we let go of it.
            Phase::ReadingBody | Phase::Queued | Phase::AwaitingGlobal | Phase::HeldRetry => {
                self.let_go();
                self.w.metrics.of(self.class).cancelled.inc();
                self.phase = Phase::Answered;
                Action::Continue
            }
            Phase::Holding429 | Phase::Responding => Action::Continue,
        }
    }

    pub fn on_response_body(&mut self, size: usize, end_of_stream: bool) -> Action {
        match self.phase {
            Phase::Holding429 => {
                self.w.holds.body_arrived(self.id);
                // Held: Envoy buffers, and `size` is everything so far.
                if end_of_stream || size >= MAX_BODY {
                    let body = calls::response_body(size.min(MAX_BODY)).unwrap_or_default();
                    self.finish_429(&body, true);
                    self.meter_body(size, end_of_stream);
                    self.phase = Phase::Responding;
                    return Action::Continue;
                }
                Action::Pause
            }
            Phase::Responding => {
                self.meter_body(size, end_of_stream);
                self.read_429_through(size, end_of_stream);
                self.capture_body(size, end_of_stream);
                Action::Continue
            }
            Phase::Arriving
            | Phase::ReadingBody
            | Phase::Queued
            | Phase::AwaitingGlobal
            | Phase::HeldRetry
            | Phase::Upstream
            | Phase::Answered
            | Phase::Done => Action::Continue,
        }
    }

    /// Trailers end the response: a held 429 is read with the body it has, then goes on.
    pub fn on_response_trailers(&mut self) -> Action {
        match self.phase {
            Phase::Holding429 => {
                let body = calls::response_body(MAX_BODY).unwrap_or_default();
                self.finish_429(&body, true);
                self.settle();
                self.phase = Phase::Responding;
                Action::Continue
            }
            Phase::Responding => {
                if let Some(a) = self.answer_429.as_mut() {
                    let body = std::mem::take(&mut a.body);
                    self.finish_429(&body, false);
                }
                self.settle();
                Action::Continue
            }
            Phase::Arriving
            | Phase::ReadingBody
            | Phase::Queued
            | Phase::AwaitingGlobal
            | Phase::HeldRetry
            | Phase::Upstream
            | Phase::Answered
            | Phase::Done => Action::Continue,
        }
    }

    /// The request is over (answered, or its client gone): whatever it holds is freed, and an
    /// answer cut short is settled with what was seen of it.
    pub fn on_done(&mut self) {
        match self.phase {
            Phase::ReadingBody | Phase::Queued | Phase::AwaitingGlobal | Phase::HeldRetry => {
                self.let_go();
                self.w.metrics.of(self.class).cancelled.inc();
            }
            Phase::Holding429 => self.w.holds.let_go(self.id),
            Phase::Arriving | Phase::Upstream | Phase::Responding | Phase::Answered | Phase::Done => {}
        }
        self.settle();
        // Whatever its phase: a release from the queue may have given it a slot just before.
        self.w.end_in_flight(self.held.target, self.id, self.answered);
        self.phase = Phase::Done;
    }

    /// What its worker tells it, decided by its phase; an event for a phase it has left is
    /// stale and does nothing.
    pub fn on_event(&mut self, e: Event) {
        match (self.phase, e) {
            (Phase::Queued, Event::Released(r)) => self.released(r),
            (Phase::Queued, Event::Expired(r)) => self.refuse_waiting(&r, self.w.metrics.of(self.class).expired),
            (Phase::Queued, Event::Shed(r)) => self.refuse_waiting(&r, self.w.metrics.of(self.class).shed),
            (Phase::AwaitingGlobal, Event::GlobalPassed) => {
                self.w.metrics.of(self.class).admitted.inc();
                self.resume();
            }
            (Phase::AwaitingGlobal, Event::GlobalRefused(r)) => {
                self.w.metrics.global.rejected.inc();
                if r.reason == Reason::BudgetExceeded {
                    self.w.metrics.tokens.budget_refused.inc();
                }
                let r = Refusal { class: self.class, queued: self.waited, ..r };
                self.refuse_waiting(&r, self.w.metrics.of(self.class).rejected);
            }
            (Phase::ReadingBody, Event::BodyLate) => self.body_late(),
            (Phase::Holding429, Event::AnswerLate) => {
                // Let go without its body; what flows past is still read.
                if let Some(a) = self.answer_429.as_mut() {
                    a.learned = false;
                }
                self.phase = Phase::Responding;
                if let Err(s) = calls::resume_response(self.id) {
                    log::debug!("llm-ratelimit: #{} cannot resume the response: status {s}", self.id);
                }
            }
            (Phase::HeldRetry, Event::RetryDue) => self.retry_due(),
            // Stale: the request left that phase (a tick's events are delivered right after it, so
            // a release always finds its waiter still queued).
            _ => {}
        }
    }

    // ---- The admission filter's request path ---------------------------------------------

    /// Classifies, marks, and holds the request for its body or decides at once.
    fn arrive(&mut self, end_of_stream: bool) -> Action {
        let w = self.w.clone();
        let cfg = &w.config;
        let path = if w.needs_path { header(":path").unwrap_or_default() } else { String::new() };
        let sent = std::cell::RefCell::new(None);
        self.class = classify(&cfg.classify, &path, |name| {
            let v = header(name);
            if name == cfg.classify.header {
                sent.replace(v.clone());
            }
            v
        });
        // Upstream sees the class the proxy decided, never one a client claimed: a header the client
        // sent is always replaced (every line of it: a second line could claim another class).
        // With none sent and the default class there is nothing to correct, and no header change
        // (each costs Envoy a route-cache clear, ~15% of throughput here).
        let rewrite = sent.into_inner().is_some() || self.class != cfg.classify.default;
        if rewrite {
            if let Err(s) = calls::set_request_header(&cfg.classify.header, self.class.name()) {
                log::debug!("llm-ratelimit: cannot set {}: status {s}", cfg.classify.header);
            }
        }
        // Only this filter says which request is the probe: a client's claim is removed.
        if header(PROBE_HEADER).is_some() {
            if let Err(s) = calls::remove_request_header(PROBE_HEADER) {
                log::debug!("llm-ratelimit: #{} cannot remove {PROBE_HEADER}: status {s}", self.id);
            }
        }
        if let Some(n) = cfg.class(self.class).max_retries {
            if let Err(s) = calls::set_request_header("x-envoy-max-retries", &n.to_string()) {
                log::debug!("llm-ratelimit: cannot set x-envoy-max-retries: status {s}");
            }
        }
        if cfg.fallback.enabled {
            let tenant = cfg.tenant.as_ref().and_then(|t| header(&t.key_header));
            self.cache_key =
                crate::fallback::Identity::of_request(&cfg.fallback.key_header, &path, tenant.as_deref(), header);
        }
        if let (Some(rules), false) = (&w.estimate, end_of_stream) {
            // Token limits: the estimate comes from the body, read before the headers go on (a
            // body larger than we hold is told by its first chunk, then estimated from its size).
            // Neither its length nor the clock is read here: each is a host call.
            let max_wait = Duration::from_millis(cfg.class(self.class).max_wait_ms);
            if w.holds.bodies() != Bodies::Withheld && w.holds.hold_request(self.id, max_wait) {
                self.phase = Phase::ReadingBody;
                self.path = path;
                return Action::Pause;
            }
            let e = estimate::from_unread(rules, &path, content_length().unwrap_or(0));
            self.estimated(&e, &path);
        }
        self.decide_now()
    }

    /// The body of a request held to estimate its tokens: read whole (or as far as
    /// `tokens.max_body_bytes`, which must not exceed Envoy's buffer limit), then decided.
    fn read_body(&mut self, size: usize, end_of_stream: bool) -> Action {
        self.w.holds.body_arrived(self.id);
        let first = self.body_size == 0;
        self.body_size = size;
        let max = self.max_body();
        if !end_of_stream && size < max {
            // A body in several chunks: one that says it is larger than we hold is not waited
            // for, but estimated from its size now.
            if first && content_length().is_some_and(|n| n > max as u64) {
                return self.body_read(size, false);
            }
            return Action::Pause;
        }
        self.body_read(size, end_of_stream)
    }

    /// Its body is read (`whole`), or as much of it as we read: estimated, then decided.
    fn body_read(&mut self, size: usize, whole: bool) -> Action {
        let w = self.w.clone();
        w.holds.let_go(self.id);
        let Some(rules) = &w.estimate else { return self.decide_now() };
        let max = self.max_body();
        let body = if whole && size <= max { calls::request_body(size).unwrap_or_default() } else { Vec::new() };
        let e = if !body.is_empty() {
            estimate::from_body(rules, &self.path, &body)
        } else {
            estimate::from_unread(rules, &self.path, content_length().unwrap_or(size as u64))
        };
        let path = std::mem::take(&mut self.path);
        self.estimated(&e, &path);
        self.path = path;
        if !body.is_empty() && w.backups.iter().any(|b| !b.target.models.is_empty()) {
            self.body = Some(body);
        }
        let action = self.decide_now();
        self.body = None;
        action
    }

    /// Its estimate: what it needs from the token buckets, and its model's price.
    fn estimated(&mut self, e: &Estimate, path: &str) {
        self.estimate = self.w.need(e, path);
        if !self.w.backups.is_empty() {
            self.model.clone_from(&e.model);
        }
        match self.w.price(e, path) {
            Some(Some(p)) => self.held.price = Some(p),
            Some(None) => self.unpriced = true,
            None => {}
        }
    }

    /// Its body did not come in time. Once bodies are known to come, the client is too slow: a
    /// 408. While that is unknown (no body seen on this worker yet), it is decided from its size,
    /// never let through unlimited.
    fn body_late(&mut self) {
        let w = self.w.clone();
        if w.holds.bodies() == Bodies::Delivered || self.body_size > 0 {
            w.metrics.of(self.class).expired.inc();
            let body =
                b"{\"error\":{\"type\":\"request_timeout\",\"message\":\"the request body did not arrive in time\"}}";
            let headers = [("content-type", "application/json"), ("x-llm-ratelimit-source", "proxy")];
            match calls::send_response(408, &headers, body) {
                Ok(()) => self.phase = Phase::Answered,
                Err(s) => log::debug!("llm-ratelimit: #{} cannot answer the slow request: status {s}", self.id),
            }
            return;
        }
        w.holds.body_missing();
        let action = self.body_read(0, false);
        if action == Action::Continue {
            self.resume_stream();
        }
    }

    fn decide_now(&mut self) -> Action {
        match calls::now() {
            Ok(now) => self.decide(now),
            Err(s) => self.fail_open("get_current_time", s),
        }
    }

    /// The provider's gate, an answer from the fallback cache while its breaker is open, then
    /// admission.
    fn decide(&mut self, now: Instant) -> Action {
        let w = self.w.clone();
        let gate = match w.gate_and_mode(now) {
            Ok((g, moved)) => {
                if let Some(mode) = moved {
                    w.breaker_moved(mode, now);
                }
                g
            }
            Err(s) => {
                w.metrics.errors.inc();
                log::warn!("llm-ratelimit: #{} cannot read the provider state: status {s}", self.id);
                Gate::Pass
            }
        };
        match gate {
            Gate::Probe { .. } => w.probe_started(),
            // The primary holds or refuses everything now: a class that may goes elsewhere.
            Gate::Hold { .. } | Gate::Open { .. } if self.fail_over(now) => return Action::Continue,
            Gate::Open { terminal: false, .. } if self.answer_from_cache(&w.config, now) => return Action::Pause,
            _ => {}
        }
        self.admit(gate, now)
    }

    /// Takes a token, waits, or refuses; then, with a global limit, the service's gate.
    fn admit(&mut self, gate: Gate, now: Instant) -> Action {
        let w = self.w.clone();
        let tenant = w.config.tenant.as_ref().and_then(|t| header(&t.key_header));
        let need = self.estimate;
        if self.unpriced {
            w.metrics.tokens.unpriced.inc();
            let r = Refusal {
                retry: false,
                ..Refusal::of(self.id, self.class, Reason::UnpricedModel, Duration::ZERO, 0.0)
            };
            return self.refuse(&r);
        }
        let cost = self.held.price.map(|p| reservation::charge(need, Some(&p)).micro_usd);
        let global = w.global.as_ref().map(|g| g.need(self.class, tenant.as_deref(), need.map(|n| n.tokens), cost));
        let may_wait = if w.config.queue.enabled {
            Duration::from_millis(w.config.class(self.class).max_wait_ms)
        } else {
            Duration::ZERO
        };
        if let (Some(global_gate), Some(g)) = (&w.global, &global) {
            // The service said over limit for longer than this request may wait: no local token spent.
            if let Some((wait, cause)) = global_gate.blocked(g, now).filter(|&(t, _)| t > may_wait) {
                w.metrics.global.rejected.inc();
                return self.refuse(&global_gate.refusal(self.id, self.class, wait, cause));
            }
        }
        let arrival = Arrival { id: self.id, class: self.class, tenant: tenant.as_deref(), need, gate };
        let tenant_name = w.config.tenant.as_ref().map(|_| tenant.clone().unwrap_or_default());
        let decided = w.with_core_mut(|c| c.admit(&SharedData, arrival, now));
        let Decision { admission, readout, tenant } = match decided {
            Ok(d) => d,
            Err(st) => return self.fail_open("shared-data admission", st),
        };
        w.publish_readout(readout);
        if let Some(t) = tenant {
            if let (crate::tenants::TenantTake::Taken { slot }, Some(name)) = (t.take, &tenant_name) {
                self.held.tenant = Some((name.clone(), slot));
            }
            let m = &w.metrics.tenants;
            for (happened, stat) in [(t.claimed, m.claimed), (t.displaced, m.displaced), (t.overflow(), m.overflow)] {
                if happened {
                    stat.inc();
                }
            }
            if matches!(t.take, crate::tenants::TenantTake::Short { .. }) {
                m.limited.inc();
            }
        }
        match admission {
            Admission::Pass { probe } => {
                self.start_meter();
                self.mark_probe(probe);
                self.through_later_gates(global, may_wait, now)
            }
            Admission::Refuse(r) => self.refuse(&r),
            Admission::Wait { shed } => {
                self.phase = Phase::Queued;
                w.metrics.of(self.class).queued.inc();
                self.global = global;
                if let Some(v) = shed {
                    w.shed(&v, now);
                }
                Action::Pause
            }
        }
    }

    /// Through the local buckets: the quota windows, then the global gate, then upstream.
    fn through_later_gates(&mut self, global: Option<GlobalNeed>, may_wait: Duration, now: Instant) -> Action {
        let w = self.w.clone();
        if !w.config.quotas.is_empty() {
            let charge = reservation::charge(self.held.meter.as_ref().map(|m| m.need), self.held.price.as_ref());
            match w.with_core(|c| c.take_quotas(&SharedData, &charge, now)) {
                Ok(Ok(())) => self.held.quota = Some((charge, now)),
                Ok(Err(e)) => {
                    self.give_back(now);
                    let budget = e.unit == crate::quota::Unit::MicroUsd;
                    let stat = if budget { w.metrics.tokens.budget_refused } else { w.metrics.tokens.quota_refused };
                    stat.inc();
                    let wait = e.reset - now.floor_millis();
                    let reason = if budget { Reason::BudgetExceeded } else { Reason::QuotaExceeded };
                    // A reset further away than a client should wait: tell it not to retry soon.
                    let retry = wait.as_millis() <= w.config.provider.breaker.max_wait_ms;
                    let r =
                        Refusal { retry, queued: self.waited, ..Refusal::of(self.id, self.class, reason, wait, 0.0) };
                    return self.refuse_with_quota(&r, &e);
                }
                Err(st) => return self.fail_open("shared-data quotas", st),
            }
        }
        self.through_global(global, may_wait, now)
    }

    /// The global gate, when there is one, then upstream.
    fn through_global(&mut self, global: Option<GlobalNeed>, may_wait: Duration, now: Instant) -> Action {
        let w = self.w.clone();
        let (Some(global_gate), Some(g)) = (&w.global, global) else {
            self.w.metrics.of(self.class).admitted.inc();
            self.phase = Phase::Upstream;
            return Action::Continue;
        };
        match global_gate.arrive(self.id, &g, may_wait, now) {
            Gated::Pass => {
                self.held.global = Some(g);
                self.w.metrics.of(self.class).admitted.inc();
                self.phase = Phase::Upstream;
                Action::Continue
            }
            Gated::Wait => {
                self.held.global = Some(g);
                self.phase = Phase::AwaitingGlobal;
                Action::Pause
            }
            Gated::Refuse(r) => {
                self.w.metrics.global.rejected.inc();
                self.give_back(now);
                self.refuse(&Refusal { queued: self.waited, ..r })
            }
        }
    }

    /// The global gate refused it (or it left while waiting for the gate's word) after the local
    /// buckets let it through: its request token and the LLM tokens it reserved go back (its
    /// meter with them: nothing is settled at its end).
    fn give_back(&mut self, now: Instant) {
        let w = self.w.clone();
        self.held.give_back(&w, self.probe, now);
        w.end_in_flight(self.held.target, self.id, None);
    }

    /// Its turn in the queue came: through the global gate, then upstream.
    fn released(&mut self, r: Release) {
        let w = self.w.clone();
        let m = w.metrics.of(self.class);
        m.released.inc();
        m.queue_wait_ms.record(r.waited.as_millis());
        // The core kept the release for its response; this request reads it now.
        let _ = w.core.try_borrow_mut().map(|mut c| c.take_release(self.id));
        self.waited = Some(r.waited);
        self.start_meter();
        self.mark_probe(r.probe);
        let may_wait = Duration::from_millis(w.config.class(self.class).max_wait_ms) - r.waited;
        let global = self.global.take();
        if self.through_later_gates(global, may_wait, now()) == Action::Continue {
            self.resume_stream();
        }
    }

    /// The probe is marked for the observer upstream (only the admission filter's own mark).
    fn mark_probe(&mut self, probe: Option<u32>) {
        self.probe = probe;
        if let (Some(n), Role::Admission) = (probe, self.role()) {
            if let Err(s) = calls::set_request_header(PROBE_HEADER, &n.to_string()) {
                log::debug!("llm-ratelimit: #{} cannot mark the probe: status {s}", self.id);
            }
        }
    }

    /// Lets a held request go upstream (after a callback returned Pause).
    fn resume(&mut self) {
        self.phase = Phase::Upstream;
        self.resume_stream();
    }

    fn resume_stream(&mut self) {
        if let Err(s) = calls::resume_request(self.id) {
            log::debug!("llm-ratelimit: #{} cannot resume the request: status {s}", self.id);
        }
    }

    /// While the breaker is open: answers with a cached response to the same request, if any.
    fn answer_from_cache(&mut self, cfg: &Config, now: Instant) -> bool {
        let fb = &cfg.fallback;
        let Some(key) = &self.cache_key else { return false };
        let Some(entry) = super::fallback::lookup(&SharedData, &cfg.name, key, now, fb) else {
            return false;
        };
        let age = (now.floor_millis() - entry.stored()).as_secs().to_string();
        let headers = [
            ("content-type", entry.content_type.as_str()),
            ("age", age.as_str()),
            ("x-llm-ratelimit-fallback", "cache"),
            ("x-llm-ratelimit-priority", self.class.name()),
        ];
        match calls::send_response(200, &headers, &entry.body) {
            Ok(()) => {
                self.phase = Phase::Answered;
                self.w.metrics.provider.fallback_served.inc();
                true
            }
            Err(s) => {
                log::warn!("llm-ratelimit: #{} cannot answer from the fallback cache: status {s}", self.id);
                false
            }
        }
    }

    /// It was let through (at once or from the queue): its estimate is now reserved.
    fn start_meter(&mut self) {
        let (Some(need), Some(rules)) = (self.estimate, &self.w.estimate) else { return };
        self.held.meter = Some(Meter::new(need, need.input, rules.chars_per_token));
    }

    /// Sends this request to the first `failover` target its class may use that takes it at once:
    /// routed there by `ROUTE_HEADER`, its `model` renamed as the target names it (which needs its
    /// body in hand: a target that renames is skipped otherwise). Whatever it held at the primary
    /// was given back by the gate that refused it.
    fn fail_over(&mut self, now: Instant) -> bool {
        if std::mem::replace(&mut self.failover_tried, true) {
            return false;
        }
        let w = self.w.clone();
        let tenant_of = |b: &Backup| b.target.provider.tenant.as_ref().and_then(|t| header(&t.key_header));
        for (i, b) in w.backups.iter().enumerate() {
            if !b.takes(self.class) {
                continue;
            }
            let body = match (&self.body, b.target.models.is_empty()) {
                (_, true) => None,
                (Some(body), false) => b.rewrite_model(body).map(|new| (body.len(), new)),
                (None, false) => continue,
            };
            let tenant = tenant_of(b);
            let need = self.estimate.or(self.held.meter.as_ref().map(|m| m.need));
            // Priced by the target's own table (for the model it is sent as), else as at the primary.
            let price = match (&b.target.provider.prices, need) {
                (Some(table), Some(_)) => match table.of(&self.path, b.model_for(self.model.as_deref())) {
                    Some(p) => Some(*p),
                    None => {
                        b.stats.refused.inc();
                        continue;
                    }
                },
                _ => self.held.price,
            };
            let charge = reservation::charge(need, price.as_ref());
            let a = Arrival { id: self.id, class: self.class, tenant: tenant.as_deref(), need, gate: Gate::Pass };
            let (d, quota) = match b.admit(a, &charge, now) {
                Ok(Some(d)) => d,
                Ok(None) => {
                    b.stats.refused.inc();
                    continue;
                }
                Err(s) => {
                    w.metrics.errors.inc();
                    log::warn!("llm-ratelimit: #{} cannot try failover target {}: status {s}", self.id, b.name());
                    continue;
                }
            };
            if let Some((len, new)) = &body {
                if calls::set_request_body(*len, new).is_ok() {
                    let _ = calls::set_request_header("content-length", &new.len().to_string());
                }
            }
            if let Err(s) = calls::set_request_header(ROUTE_HEADER, b.name()) {
                log::debug!("llm-ratelimit: #{} cannot route to {}: status {s}", self.id, b.name());
            }
            self.held = Reservation { target: Some(i as u8), price, quota, ..Reservation::default() };
            if let (Some(t), Some(name)) = (d.tenant, tenant) {
                if let crate::tenants::TenantTake::Taken { slot } = t.take {
                    self.held.tenant = Some((name, slot));
                }
            }
            self.estimate = need;
            self.start_meter();
            b.stats.sent.inc();
            let m = w.metrics.of(self.class);
            m.failover.inc();
            m.admitted.inc();
            self.phase = Phase::Upstream;
            return true;
        }
        false
    }

    /// Whether a `failover` target may take this request (before the clock is read for it). Only
    /// where the route is still to be chosen: never in the observer, past the router.
    fn may_fail_over(&self) -> bool {
        !self.failover_tried && self.w.config.role.admits() && self.w.backups.iter().any(|b| b.takes(self.class))
    }

    /// `fail_over` from a refusal: the clock read only when a target may take it.
    fn fail_over_now(&mut self) -> bool {
        self.may_fail_over() && calls::now().is_ok_and(|now| self.fail_over(now))
    }

    /// Answers this request with a local 429, unless a `failover` target takes it.
    fn refuse(&mut self, r: &Refusal) -> Action {
        if self.fail_over_now() {
            return Action::Continue;
        }
        match self.w.send_limited(r) {
            Ok(()) => {
                self.w.metrics.of(self.class).rejected.inc();
                if r.reason == Reason::BudgetExceeded {
                    self.w.metrics.tokens.budget_refused.inc();
                }
                if r.reason == Reason::TooLarge {
                    self.w.metrics.tokens.too_large.inc();
                }
                self.phase = Phase::Answered;
                Action::Pause
            }
            Err(st) => self.fail_open("send_local_response", st),
        }
    }

    /// Answers this request, in its own callback, with the local 429 of the quota window that
    /// refused it (its limit and period in the body).
    fn refuse_with_quota(&mut self, r: &Refusal, e: &crate::quota::Exhausted) -> Action {
        if self.fail_over_now() {
            return Action::Continue;
        }
        match self.w.send_quota_limited(r, e.index) {
            Ok(()) => {
                self.w.metrics.of(self.class).rejected.inc();
                self.phase = Phase::Answered;
                Action::Pause
            }
            Err(st) => self.fail_open("send_local_response", st),
        }
    }

    /// Answers this request, held since an earlier callback, with a local 429 counted in `stat`,
    /// unless a `failover` target takes it: its wait ran out, it was shed, or the rate limit
    /// service refused it. It holds nothing at the primary by then; a target that renames the
    /// model is skipped (the body is no longer in hand).
    fn refuse_waiting(&mut self, r: &Refusal, stat: super::metrics::Id) {
        self.let_go();
        if self.fail_over_now() {
            self.resume_stream();
            return;
        }
        match self.w.send_limited(r) {
            Ok(()) => {
                stat.inc();
                self.phase = Phase::Answered;
            }
            Err(s) => self.resume_on_failure("send_local_response", s),
        }
    }

    /// A host call failed: let the request through rather than fail user traffic on our fault
    /// (counted admitted, and in `errors`).
    fn fail_open(&mut self, what: &str, status: Status) -> Action {
        log::warn!("llm-ratelimit: #{} {what} failed (status {status}); letting the request through", self.id);
        self.w.metrics.errors.inc();
        self.w.metrics.of(self.class).admitted.inc();
        self.phase = Phase::Upstream;
        Action::Continue
    }

    /// `fail_open` for a request held since an earlier callback: no request is stranded.
    fn resume_on_failure(&mut self, what: &str, status: Status) {
        if self.fail_open(what, status) == Action::Continue {
            self.resume_stream();
        }
    }

    /// Frees whatever its phase holds in the worker: a queue place, a wait on the gate, a hold.
    fn let_go(&mut self) {
        let w = self.w.clone();
        match self.phase {
            Phase::ReadingBody | Phase::Holding429 => w.holds.let_go(self.id),
            Phase::Queued => {
                w.leave_queue(self.id, now());
                // It never went: its tenant's token and LLM tokens go back.
                self.held.give_tenant_back(&w, self.estimate, now());
            }
            Phase::AwaitingGlobal => {
                if let Some(g) = &w.global {
                    g.leave(self.id);
                }
                // Refused by the gate, or gone before its word: it never uses its local tokens.
                self.give_back(now());
            }
            Phase::HeldRetry => w.holds.drop_retry(self.id),
            Phase::Arriving | Phase::Upstream | Phase::Responding | Phase::Answered | Phase::Done => {}
        }
    }

    // ---- The observer's request path ------------------------------------------------------

    /// A request reaching the observer (upstream of the router): the probe, a first attempt, or
    /// a router retry that waits here for the provider's reset.
    fn attempt_arrives(&mut self) -> Action {
        let w = self.w.clone();
        if let Some(n) = header(PROBE_HEADER) {
            // Which probe this attempt is, then off to the provider without the mark.
            self.probe = n.parse().ok();
            if let Err(s) = calls::remove_request_header(PROBE_HEADER) {
                log::debug!("llm-ratelimit: #{} cannot remove {PROBE_HEADER}: status {s}", self.id);
            }
            self.phase = Phase::Upstream;
            return Action::Continue;
        }
        // A first attempt was just admitted (Envoy says which attempt this is with the virtual
        // host's `include_request_attempt_count`): it costs no shared-data read.
        self.attempt = header("x-envoy-attempt-count").and_then(|n| n.parse().ok()).unwrap_or(0);
        self.phase = Phase::Upstream;
        if self.attempt == 1 {
            return Action::Continue;
        }
        let class = header(&w.config.classify.header).as_deref().and_then(Priority::parse);
        self.class = class.unwrap_or(w.config.classify.default);
        if self.attempt > 1 {
            w.metrics.of(self.class).retry_attempts.inc();
        }
        self.decide_attempt(true)
    }

    /// Sends, holds or answers a router retry (again when its hold ends).
    fn decide_attempt(&mut self, in_callback: bool) -> Action {
        let w = self.w.clone();
        match w.with_core(|c| c.attempt(&SharedData, self.class, now())) {
            Ok(Attempt::Hold { until }) if w.holds.hold_retry(self.id, until) => {
                self.phase = Phase::HeldRetry;
                Action::Pause
            }
            Ok(Attempt::Probe { probe }) => {
                // Its answer is the probe's: it closes the breaker or opens it again.
                self.probe = Some(probe);
                w.probe_started();
                self.phase = Phase::Upstream;
                Action::Continue
            }
            Ok(Attempt::Refuse(r)) => {
                let r = Refusal { id: self.id, ..r };
                if in_callback {
                    return self.refuse(&r);
                }
                self.refuse_waiting(&r, self.w.metrics.of(self.class).rejected);
                Action::Pause
            }
            _ => {
                self.phase = Phase::Upstream;
                Action::Continue
            }
        }
    }

    fn retry_due(&mut self) {
        if self.decide_attempt(false) == Action::Continue {
            self.resume_stream();
        }
    }

    // ---- The answer -----------------------------------------------------------------------

    /// The signals of an answer; the parser reads instants in epoch ms.
    fn parse(&self, status: u16, headers: &HeaderMap, body: Option<&[u8]>, now: Instant) -> signals::Signals {
        let p = &self.w.config.provider;
        let headers = &headers.iter().collect::<Vec<_>>();
        signals::parse(p.style, status, headers, body, now.as_millis(), p.breaker.max_wait_ms)
    }

    /// The provider's answer begins: learn from it, meter it, and hold a 429 for its body.
    fn answer_begins(&mut self, end_of_stream: bool) -> Action {
        let w = self.w.clone();
        self.phase = Phase::Responding;
        if let Some(waited) = self.waited {
            set_header("x-ratelimit-queued-ms", &waited.as_millis().to_string());
        }
        let role = self.role();
        // A role that learns reads every header anyway: one host call for all, `:status` included.
        let all = if role.learns() { Some(calls::response_headers().unwrap_or_default()) } else { None };
        let get = |name: &str| match &all {
            Some(h) => h.get(name).map(str::to_owned),
            None => calls::response_header(name).ok().flatten(),
        };
        let status = get(":status").and_then(|s| s.parse().ok()).unwrap_or(0u16);
        // Only on an answer from a failover target: the normal path pays no header.
        if let (Some(b), true) = (self.held.target.and_then(|t| w.backups.get(usize::from(t))), role.admits()) {
            set_header("x-llm-ratelimit-provider", b.name());
        }
        // The time to headers teaches the adaptive limit only.
        if w.in_flight_of(self.held.target).is_some_and(|r| r.adaptive.is_some()) {
            self.answered = calls::now().ok().map(|now| (status, now));
        }
        if let (Some(m), Some(t)) = (&mut self.held.meter, &w.config.tokens) {
            m.answer(status, &get("content-type").unwrap_or_default(), t.max_body_bytes as usize);
            if end_of_stream {
                self.settle();
            }
        }
        // A local reply from upstream (the observer's 429 for a retry, a cached answer) is ours:
        // nothing to learn or rewrite (its tokens are settled as a 429's).
        let ours = |marker| role.admits() && get(marker).is_some();
        if status == 429 && ours("x-llm-ratelimit-source") {
            // The target's observer answered a retry with the target's reset: the primary's may
            // be sooner.
            if self.held.target.is_some() {
                let wait = get("retry-after-ms").and_then(|v| v.parse().ok()).map(Duration::from_millis);
                self.sooner_with_primary(wait);
            }
            return Action::Continue;
        }
        if self.cache_key.is_some() && ours("x-llm-ratelimit-fallback") {
            return Action::Continue;
        }
        if status == 200 && self.cache_key.is_some() && !end_of_stream {
            self.capture = Some((get("content-type").unwrap_or_default(), Vec::new()));
        }
        if role == Role::Observer && self.attempt > 1 && (200..300).contains(&status) {
            w.metrics.of(self.class).retry_succeeded.inc();
            w.metrics.provider.retry_succeeded_attempt.record(u64::from(self.attempt));
        }
        if !role.learns() && !matches!(status, 429 | 503) {
            // The observer learns from successes; here only a 429 needs its Retry-After, and a
            // 429 or 503 may end a retried request (`retry_exhausted`).
            return Action::Continue;
        }
        let Ok(now) = calls::now() else { return Action::Continue };
        let headers = match all {
            Some(h) => h,
            None => calls::response_headers().unwrap_or_default(),
        };
        if role.admits() {
            let attempts = headers.get("x-envoy-attempt-count").and_then(|v| v.parse().ok()).unwrap_or(0u32);
            // A retried request that ended on a 429 or 503: the router gave up (its attempt count
            // comes on the final answer with the virtual host's `include_attempt_count_in_response`).
            if attempts > 1 && matches!(status, 429 | 503) {
                w.metrics.of(self.class).retry_exhausted.inc();
            }
        }
        let signals = self.parse(status, &headers, None, now);
        let hold = status == 429
            && !end_of_stream
            && w.holds.bodies() != Bodies::Withheld
            && w.holds.hold_answer(self.id, now);
        let verdict = self.judge(status, &signals, now, role.learns() && !hold, true);
        if let (429, Some(v), true) = (status, verdict, role.admits()) {
            // Said at once; a held 429 says it again with what its body adds.
            self.rewrite_429(&v, now);
        }
        if status == 429 && !end_of_stream {
            self.answer_429 = Some(Answer429 { headers, from_headers: signals, body: Vec::new(), learned: !hold });
        }
        if hold {
            self.phase = Phase::Holding429;
            Action::Pause
        } else {
            Action::Continue
        }
    }

    /// What an answer means: learned from (`learn`; `first`: not read before) by the provider that
    /// gave it, or, for a 429, read for its client. A request that failed over was answered by
    /// its target: its state learns, never the primary's, and its 429 says the sooner of the
    /// target's reset and the primary's.
    fn judge(
        &self,
        status: u16,
        signals: &signals::Signals,
        now: Instant,
        learn: bool,
        first: bool,
    ) -> Option<Verdict> {
        let w = &self.w;
        let Some(b) = self.held.target.and_then(|t| w.backups.get(usize::from(t))) else {
            return if learn {
                w.observe(status, signals, self.probe, now, first)
            } else if status == 429 {
                w.peek(signals, now)
            } else {
                None
            };
        };
        let core = b.core.try_borrow().ok()?;
        let verdict = if learn {
            core.observe(&SharedData, status, signals, None, now).ok().map(|(v, _, _)| v)
        } else if status == 429 {
            core.peek(&SharedData, signals, now).ok()
        } else {
            None
        };
        let primary = self.primary_reset(now);
        verdict.map(|mut v| {
            if let (Some(p), 429) = (primary, status) {
                if v.retry_at.is_none_or(|r| p < r) {
                    v.retry_at = Some(p);
                }
            }
            v
        })
    }

    /// A failover target's 429 whose client was told to wait `wait`: when the primary's reset is
    /// sooner, it is told that instead.
    fn sooner_with_primary(&self, wait: Option<Duration>) {
        let Ok(now) = calls::now() else { return };
        let Some(until) = self.primary_reset(now) else { return };
        if wait.is_none_or(|w| until - now.floor_millis() < w) {
            self.rewrite_429(&Verdict { retry_at: Some(until), ..Verdict::default() }, now);
        }
    }

    /// The primary's reset, while it is still ahead: what a failover target's 429 says when it
    /// comes sooner than the target's own.
    fn primary_reset(&self, now: Instant) -> Option<Instant> {
        let state = self.w.with_core(|c| c.provider_state(&SharedData)).ok()?;
        Some(state.until).filter(|&until| until > now)
    }

    /// Gives a provider 429 one precise `Retry-After` (and friends) for its client.
    fn rewrite_429(&self, verdict: &Verdict, now: Instant) {
        let wait_ms = verdict.retry_at.map_or(1000, |t| (t - now.floor_millis()).as_millis());
        let secs = crate::reply::retry_after_secs(wait_ms);
        self.w.metrics.provider.retry_after_s.record(secs);
        set_header("retry-after", &secs.to_string());
        set_header("retry-after-ms", &wait_ms.max(1).to_string());
        set_header("ratelimit", &format!("\"{}\";r=0;t={secs}", self.w.name()));
        set_header("x-llm-ratelimit-source", "provider");
        set_header("x-should-retry", if verdict.terminal { "false" } else { "true" });
    }

    /// Learns from a 429 once its body is read (held or passed), and, while its headers are still
    /// `held`, tells the client what the body added.
    fn finish_429(&mut self, body: &[u8], held: bool) {
        let Some(a) = self.answer_429.take() else { return };
        self.w.holds.let_go(self.id);
        let Ok(now) = calls::now() else { return };
        let signals = self.parse(429, &a.headers, Some(body), now);
        let role = self.role();
        let adds = signals.retry_at() != a.from_headers.retry_at() || signals.terminal != a.from_headers.terminal;
        let verdict =
            if role.learns() && (!a.learned || adds) { self.judge(429, &signals, now, true, !a.learned) } else { None };
        if held && role.admits() {
            if let Some(v) = verdict.or_else(|| self.judge(429, &signals, now, false, false)) {
                self.rewrite_429(&v, now);
            }
        }
    }

    /// A 429 not held (let go, or bodies withheld) is read as it flows past.
    fn read_429_through(&mut self, size: usize, end_of_stream: bool) {
        let Some(a) = &mut self.answer_429 else { return };
        let fits = append_chunk(&mut a.body, size, MAX_BODY);
        if end_of_stream || !fits {
            let body = std::mem::take(&mut a.body);
            self.finish_429(&body, false);
        }
    }

    /// The answer's tokens, read as they pass (never held: a stream reaches its client chunk by
    /// chunk).
    fn meter_body(&mut self, size: usize, end_of_stream: bool) {
        let Some(m) = &mut self.held.meter else { return };
        if m.wants_body() {
            m.feed(&calls::response_body(size).unwrap_or_default());
        }
        if end_of_stream {
            self.settle();
        }
    }

    fn capture_body(&mut self, size: usize, end_of_stream: bool) {
        let Some((_, body)) = &mut self.capture else { return };
        let max = self.w.config.fallback.max_body_bytes as usize;
        if !append_chunk(body, size, max) {
            self.capture = None; // too large to cache
        } else if end_of_stream {
            self.store_in_cache();
        }
    }

    /// An admitted request's answer is over, or will never come: its tokens are settled.
    fn settle(&mut self) {
        let w = self.w.clone();
        self.held.settle(&w, now);
    }

    fn store_in_cache(&mut self) {
        let (Some(key), Some((content_type, body)), Ok(now)) = (&self.cache_key, self.capture.take(), calls::now())
        else {
            return;
        };
        let cfg = &self.w.config;
        let entry = crate::fallback::Entry { stored_ms: now.as_millis(), content_type, body };
        match super::fallback::store(&SharedData, &cfg.name, key, &entry, &cfg.fallback) {
            Ok(()) => self.w.metrics.provider.fallback_stored.inc(),
            Err(s) => log::warn!("llm-ratelimit: #{} cannot store in the fallback cache: status {s}", self.id),
        }
    }
}
