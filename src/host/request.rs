//! One request's context: classify it, then let it through, make it wait, or answer a local 429;
//! on the way back, learn from the provider's answer and give a 429 one precise `Retry-After`.

use super::abi;
use super::dispatch::{Action, Context, HttpContext};
use super::global::Gated;
use super::shared::SharedData;
use super::worker::{Bodies, WorkerContext, PROBE_HEADER, REENTERED};
use crate::breaker::{Gate, Verdict};
use crate::classify::classify;
use crate::config::{Config, Role};
use crate::header_map::HeaderMap;
use crate::priority::Priority;
use crate::signals;
use crate::tokens::{estimate, meter::Meter};
use crate::worker::{Admission, Attempt, Decision, Refusal};
use std::rc::Rc;

const NANOS_PER_MS: u64 = 1_000_000;
/// Largest provider 429 body read for timing and terminal-quota hints.
const MAX_BODY: usize = 64 * 1024;

/// A provider 429 whose body is being read.
struct Answer429 {
    headers: HeaderMap,
    /// What the headers alone said.
    from_headers: signals::Signals,
    /// The body so far, when it flows past (not held).
    body: Vec<u8>,
    /// Its headers wait for the body, so the client's first 429 has the body's timing.
    held: bool,
    /// The shared state already learned from the headers.
    learned: bool,
}

pub struct Request {
    w: Rc<WorkerContext>,
    id: u32,
    class: Priority,
    /// It was paused in the worker's queue.
    queued: bool,
    /// It was answered locally: nothing may release it any more.
    answered: bool,
    /// The half-open probe number it carries, when it goes as the probe.
    probe: Option<u32>,
    answer_429: Option<Answer429>,
    /// Fallback cache identity of this request, when the fallback is on and the client sent a key.
    cache_key: Option<crate::fallback::Identity>,
    /// A success being collected for the fallback cache: content type and body so far.
    capture: Option<(String, Vec<u8>)>,
    /// The request path, kept while the body is read (the model may be in it).
    path: String,
    /// Its headers are held until its body is read, to estimate its tokens.
    reading: bool,
    /// Its token estimate, until it is admitted: what it needs, and the input part.
    estimate: Option<(crate::admission::Need, u64)>,
    /// Its tokens, once admitted, until its answer settles them.
    meter: Option<Meter>,
    /// Which attempt of the router's this is (the observer reads `x-envoy-attempt-count`).
    attempt: u32,
}

impl Request {
    pub fn new(w: Rc<WorkerContext>, id: u32) -> Request {
        Request {
            w,
            id,
            class: Priority::Normal,
            queued: false,
            answered: false,
            probe: None,
            answer_429: None,
            cache_key: None,
            capture: None,
            path: String::new(),
            reading: false,
            estimate: None,
            meter: None,
            attempt: 0,
        }
    }

    fn header(name: &str) -> Option<String> {
        abi::request_header(name).unwrap_or_else(|s| {
            log::debug!("llm-ratelimit: cannot read request header {name}: status {s}");
            None
        })
    }

    fn role(&self) -> Role {
        self.w.config.role
    }

    /// A host call failed: let the request through rather than fail user traffic on our fault.
    fn fail_open(&self, what: &str, status: abi::Status) -> Action {
        log::warn!("llm-ratelimit: #{} {what} failed (status {status}); letting the request through", self.id);
        self.w.metrics.errors.inc();
        Action::Continue
    }

    /// While the breaker is open: answers with a cached response to the same request, if any.
    fn answer_from_cache(&mut self, cfg: &Config, now_ms: u64) -> bool {
        let fb = &cfg.fallback;
        let Some(key) = &self.cache_key else { return false };
        let Some(entry) = super::fallback::lookup(&SharedData, &cfg.name, key, now_ms, fb) else {
            return false;
        };
        let age = (now_ms.saturating_sub(entry.stored_ms) / 1000).to_string();
        let headers = [
            ("content-type", entry.content_type.as_str()),
            ("age", age.as_str()),
            ("x-llm-ratelimit-fallback", "cache"),
            ("x-llm-ratelimit-priority", self.class.name()),
        ];
        match abi::send_response(200, &headers, &entry.body) {
            Ok(()) => {
                self.answered = true;
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
        let (Some((need, input)), Some(rules)) = (self.estimate.take(), &self.w.estimate) else { return };
        self.meter = Some(Meter::new(need, input, rules.chars_per_token));
    }

    /// Answers this request with a local 429.
    fn refuse(&mut self, r: &Refusal) -> Action {
        self.w.metrics.of(self.class).rejected.inc();
        if r.reason == crate::reply::Reason::TooLarge {
            self.w.metrics.tokens.too_large.inc();
        }
        match self.w.send_limited(r) {
            Ok(()) => {
                self.answered = true;
                Action::Pause
            }
            Err(st) => self.fail_open("send_local_response", st),
        }
    }

    /// Takes a token, waits, or refuses; then, with a global limit, the service's gate.
    fn admit(&mut self, gate: Gate, now_ns: u64) -> Action {
        let tenant = self.w.config.tenant.as_ref().and_then(|t| Self::header(&t.key_header));
        let need = self.estimate.map(|(n, _)| n);
        let global = self.w.global_need(self.class, tenant.as_deref(), need.map(|n| n.tokens));
        let may_wait_ms = if self.w.config.queue.enabled { self.w.config.class(self.class).max_wait_ms } else { 0 };
        if let Some(g) = &global {
            // The service said over limit for longer than this request may wait: no local token spent.
            if let Some(wait_ms) = self.w.global_blocked_ms(g, now_ns / 1_000_000).filter(|&w| w > may_wait_ms) {
                self.w.metrics.global.rejected.inc();
                return self.refuse(&super::global::refusal(self.id, self.class, wait_ms, false));
            }
        }
        let decided = match self.w.core.try_borrow_mut() {
            Ok(mut w) => w.admit(&SharedData, self.id, self.class, tenant.as_deref(), need, gate, now_ns),
            Err(_) => return self.fail_open("worker borrow", REENTERED),
        };
        let Decision { admission, levels, tenant } = match decided {
            Ok(d) => d,
            Err(st) => return self.fail_open("shared-data admission", st),
        };
        self.w.publish_levels(levels);
        if let Some(t) = tenant {
            let m = &self.w.metrics.tenants;
            for (happened, stat) in [(t.claimed, m.claimed), (t.displaced, m.displaced), (t.overflow(), m.overflow)] {
                if happened {
                    stat.inc();
                }
            }
            if matches!(t.take, crate::tenants::TenantTake::Short { .. }) {
                m.limited.inc();
            }
        }
        let m = *self.w.metrics.of(self.class);
        match admission {
            Admission::Pass { probe } => {
                self.start_meter();
                self.probe = probe;
                if let (Some(n), Role::Admission) = (probe, self.role()) {
                    // The observer upstream reads it to know the probe's answer.
                    if let Err(s) = abi::set_request_header(PROBE_HEADER, &n.to_string()) {
                        log::debug!("llm-ratelimit: #{} cannot mark the probe: status {s}", self.id);
                    }
                }
                let Some(g) = global else {
                    m.admitted.inc();
                    return Action::Continue;
                };
                match self.w.global_arrive(self.id, &g, may_wait_ms, now_ns / 1_000_000) {
                    Gated::Pass => {
                        m.admitted.inc();
                        Action::Continue
                    }
                    Gated::Wait => Action::Pause,
                    Gated::Refuse(r) => self.refuse(&r),
                }
            }
            Admission::Refuse(r) => self.refuse(&r),
            Admission::Wait { shed } => {
                self.queued = true;
                m.queued.inc();
                if let Some(g) = global {
                    self.w.global_park(self.id, g);
                }
                if let Some(v) = shed {
                    self.w.shed(&v);
                    // Host calls after this act on our own request again.
                    if let Err(st) = abi::set_effective_context(self.id) {
                        log::debug!("llm-ratelimit: #{} cannot restore the context: status {st}", self.id);
                    }
                }
                Action::Pause
            }
        }
    }

    fn parse(&self, status: u16, headers: &HeaderMap, body: Option<&[u8]>, now_ms: u64) -> signals::Signals {
        let p = &self.w.config.provider;
        signals::parse(p.style, status, &headers.iter().collect::<Vec<_>>(), body, now_ms, p.breaker.max_wait_ms)
    }

    /// Gives a provider 429 one precise `Retry-After` (and friends) for its client.
    fn rewrite_429(&self, verdict: &Verdict, now_ms: u64) {
        let wait_ms = verdict.retry_at_ms.map_or(1000, |t| t.saturating_sub(now_ms));
        let secs = crate::reply::retry_after_secs(wait_ms);
        self.w.metrics.provider.retry_after_s.record(secs);
        set_header("retry-after", &secs.to_string());
        set_header("retry-after-ms", &wait_ms.max(1).to_string());
        set_header("ratelimit", &format!("\"{}\";r=0;t={secs}", self.w.name()));
        set_header("x-llm-ratelimit-source", "provider");
        set_header("x-should-retry", if verdict.terminal { "false" } else { "true" });
    }

    /// Learns from a 429 once its body is read (held or passed), and, while its headers are still
    /// held, tells the client what the body added.
    fn finish_429(&mut self, body: &[u8]) {
        let Some(a) = self.answer_429.take() else { return };
        self.w.release_held(self.id);
        let Ok(now_ns) = abi::now_ns() else { return };
        let now_ms = now_ns / NANOS_PER_MS;
        let signals = self.parse(429, &a.headers, Some(body), now_ms);
        let role = self.role();
        let adds = signals.retry_at() != a.from_headers.retry_at() || signals.terminal != a.from_headers.terminal;
        let verdict = if role.learns() && (!a.learned || adds) {
            self.w.observe(429, &signals, self.probe, now_ms, !a.learned)
        } else {
            None
        };
        if a.held && role.admits() {
            if let Some(v) = verdict.or_else(|| self.w.peek(&signals, now_ms)) {
                self.rewrite_429(&v, now_ms);
            }
        }
    }

    /// The body of a request held to estimate its tokens: read whole (or as far as
    /// `tokens.max_body_bytes`, which must not exceed Envoy's buffer limit), then decided.
    fn read_body(&mut self, size: usize, end_of_stream: bool) -> Action {
        let w = self.w.clone();
        if !w.body_arrived(self.id) {
            // Let go by the tick, bodiless (Envoy does not deliver bodies to held headers).
            self.reading = false;
            return Action::Continue;
        }
        let (Some(rules), Some(t)) = (&w.estimate, &w.config.tokens) else { return Action::Continue };
        let max = usize::try_from(t.max_body_bytes).unwrap_or(usize::MAX);
        if !end_of_stream && size < max {
            return Action::Pause;
        }
        self.reading = false;
        w.release_held(self.id);
        let e = if end_of_stream && size <= max {
            estimate::from_body(rules, &self.path, &abi::request_body(size).unwrap_or_default())
        } else {
            estimate::from_unread(rules, &self.path, content_length().unwrap_or(size as u64))
        };
        self.estimate = w.need(&e).map(|n| (n, e.input));
        match abi::now_ns() {
            Ok(now) => self.decide(now),
            Err(s) => self.fail_open("get_current_time", s),
        }
    }

    /// The provider's gate, an answer from the fallback cache while its breaker is open, then
    /// admission.
    fn decide(&mut self, now: u64) -> Action {
        let w = self.w.clone();
        let now_ms = now / NANOS_PER_MS;
        let gate = match w.gate_and_mode(now_ms) {
            Ok((g, moved)) => {
                if let Some(mode) = moved {
                    w.breaker_moved(mode, now_ms);
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
            Gate::Open { terminal: false, .. } if self.answer_from_cache(&w.config, now_ms) => return Action::Pause,
            _ => {}
        }
        self.admit(gate, now)
    }

    /// A retried request that ended on a 429 or 503: the router gave up (its attempt count comes
    /// on the final answer with the virtual host's `include_attempt_count_in_response`).
    fn count_retries(&self, status: u16, attempts: u32) {
        if attempts > 1 && matches!(status, 429 | 503) {
            self.w.metrics.of(self.class).retry_exhausted.inc();
        }
    }

    /// An admitted request's answer is over, or will never come: its tokens are settled.
    fn settle(&mut self) {
        if let Some(m) = self.meter.take() {
            self.w.settle(m);
        }
    }

    fn store_in_cache(&mut self) {
        let (Some(key), Some((content_type, body)), Ok(now)) = (&self.cache_key, self.capture.take(), abi::now_ns())
        else {
            return;
        };
        let cfg = &self.w.config;
        let entry = crate::fallback::Entry { stored_ms: now / NANOS_PER_MS, content_type, body };
        match super::fallback::store(&SharedData, &cfg.name, key, &entry, &cfg.fallback) {
            Ok(()) => self.w.metrics.provider.fallback_stored.inc(),
            Err(s) => log::warn!("llm-ratelimit: #{} cannot store in the fallback cache: status {s}", self.id),
        }
    }
}

fn content_length() -> Option<u64> {
    Request::header("content-length").and_then(|v| v.trim().parse().ok())
}

/// Appends the current body chunk to `body` if it keeps it within `max` bytes; false if not.
fn append_chunk(body: &mut Vec<u8>, chunk_size: usize, max: usize) -> bool {
    if body.len().saturating_add(chunk_size) > max {
        return false;
    }
    body.extend(abi::response_body(chunk_size).unwrap_or_default());
    true
}

fn set_header(name: &str, value: &str) {
    if let Err(s) = abi::set_response_header(name, value) {
        log::debug!("llm-ratelimit: cannot set response header {name}: status {s}");
    }
}

impl Context for Request {
    /// The request is over: if it was still waiting (its client went away), free its place; if
    /// its tokens are not settled yet, settle them.
    fn on_done(&mut self) -> bool {
        // An answer cut short (client gone) is settled with what was seen of it.
        self.settle();
        // Only a request that waited (or was held) has anything to free: no clock read otherwise.
        if self.queued
            || self.reading
            || self.answer_429.is_some()
            || self.w.attempt_held(self.id)
            || self.w.global_waiting(self.id)
        {
            let now = abi::now_ns().unwrap_or(0);
            if let Some(class) = self.w.leave(self.id, now) {
                self.w.metrics.of(class).cancelled.inc();
            }
        }
        true
    }
}

impl HttpContext for Request {
    fn on_http_request_headers(&mut self, _headers: usize, end_of_stream: bool) -> Action {
        let w = self.w.clone();
        let cfg = &w.config;
        if !cfg.role.admits() {
            // The observer: which probe this attempt is, if any, then off to the provider without it.
            if let Some(n) = Self::header(PROBE_HEADER) {
                self.probe = n.parse().ok();
                if let Err(s) = abi::remove_request_header(PROBE_HEADER) {
                    log::debug!("llm-ratelimit: #{} cannot remove {PROBE_HEADER}: status {s}", self.id);
                }
                return Action::Continue;
            }
            // A router retry of a request the provider refused: it waits here for the reset, or
            // is answered here when it cannot wait that long. A first attempt was just admitted
            // (Envoy says which attempt this is with the virtual host's
            // `include_request_attempt_count`): it costs no shared-data read.
            self.attempt = Self::header("x-envoy-attempt-count").and_then(|n| n.parse().ok()).unwrap_or(0);
            if self.attempt == 1 {
                return Action::Continue;
            }
            let class = Self::header(&cfg.classify.header).as_deref().and_then(Priority::parse);
            self.class = class.unwrap_or(cfg.classify.default);
            if self.attempt > 1 {
                self.w.metrics.of(self.class).retry_attempts.inc();
            }
            let now_ms = abi::now_ns().unwrap_or(0) / NANOS_PER_MS;
            let attempt = self.w.with_core(|w| w.attempt(&SharedData, self.class, now_ms));
            match attempt {
                Ok(Attempt::Hold { until_ms }) if self.w.hold_attempt(self.id, self.class, until_ms) => {
                    return Action::Pause
                }
                Ok(Attempt::Refuse(r)) => return self.refuse(&Refusal { id: self.id, ..r }),
                _ => {}
            }
            return Action::Continue;
        }
        let path = if self.w.needs_path { Self::header(":path").unwrap_or_default() } else { String::new() };
        let sent = std::cell::RefCell::new(None);
        self.class = classify(&cfg.classify, &path, |name| {
            let v = Self::header(name);
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
            if let Err(s) = abi::set_request_header(&cfg.classify.header, self.class.name()) {
                log::debug!("llm-ratelimit: cannot set {}: status {s}", cfg.classify.header);
            }
        }
        if let Some(n) = cfg.class(self.class).max_retries {
            if let Err(s) = abi::set_request_header("x-envoy-max-retries", &n.to_string()) {
                log::debug!("llm-ratelimit: cannot set x-envoy-max-retries: status {s}");
            }
        }
        let now = match abi::now_ns() {
            Ok(t) => t,
            Err(s) => return self.fail_open("get_current_time", s),
        };
        let now_ms = now / NANOS_PER_MS;
        if cfg.fallback.enabled {
            let tenant = cfg.tenant.as_ref().and_then(|t| Self::header(&t.key_header));
            self.cache_key =
                crate::fallback::Identity::of_request(&cfg.fallback.key_header, &path, tenant.as_deref(), Self::header);
        }
        if let (Some(rules), Some(t), false) = (&w.estimate, &cfg.tokens, end_of_stream) {
            // Token limits: the estimate comes from the body, read before the headers go on,
            // unless it is larger than we hold (then from its size).
            let length = content_length();
            let fits = length.is_none_or(|n| n <= t.max_body_bytes);
            if fits && w.bodies.get() != Bodies::Withheld && w.hold_request(self.id, now_ms) {
                self.reading = true;
                self.path = path;
                return Action::Pause;
            }
            let e = estimate::from_unread(rules, &path, length.unwrap_or(0));
            self.estimate = w.need(&e).map(|n| (n, e.input));
        }
        self.decide(now)
    }

    /// Envoy with `allow_on_headers_stop_iteration` delivers the body while the headers are
    /// paused, and a Continue here would release them: a held request holds its body too.
    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        if self.reading {
            return self.read_body(body_size, end_of_stream);
        }
        if self.answered || self.w.attempt_held(self.id) || self.w.global_waiting(self.id) {
            return Action::Pause;
        }
        let waiting = self.queued && self.w.core.try_borrow().is_ok_and(|w| w.is_waiting(self.id));
        if waiting {
            self.w.bodies_delivered();
            return Action::Pause;
        }
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _headers: usize, end_of_stream: bool) -> Action {
        if self.answered {
            // Our own local reply (a 429, a fallback answer): nothing to learn, meter or rewrite.
            return Action::Continue;
        }
        if self.queued {
            let release = self.w.core.try_borrow_mut().ok().and_then(|mut w| w.take_release(self.id));
            if let Some(r) = release {
                set_header("x-ratelimit-queued-ms", &r.waited_ms.to_string());
                self.probe = self.probe.or(r.probe);
                self.start_meter();
            }
        }
        let role = self.role();
        // A role that learns reads every header anyway: one host call for all, `:status` included.
        let all = if role.learns() { Some(abi::response_headers().unwrap_or_default()) } else { None };
        let header = |name: &str| match &all {
            Some(h) => h.get(name).map(str::to_owned),
            None => abi::response_header(name).ok().flatten(),
        };
        let status = header(":status").and_then(|s| s.parse().ok()).unwrap_or(0u16);
        if let (Some(m), Some(t)) = (&mut self.meter, &self.w.config.tokens) {
            m.answer(status, &header("content-type").unwrap_or_default(), t.max_body_bytes as usize);
            if end_of_stream {
                self.settle();
            }
        }
        // Our own local replies (429s, fallback answers) teach nothing about the provider.
        let ours = |marker| role.admits() && header(marker).is_some();
        if (status == 429 && ours("x-llm-ratelimit-source"))
            || (self.cache_key.is_some() && ours("x-llm-ratelimit-fallback"))
        {
            return Action::Continue;
        }
        if status == 200 && self.cache_key.is_some() && !end_of_stream {
            self.capture = Some((header("content-type").unwrap_or_default(), Vec::new()));
        }
        if role == Role::Observer && self.attempt > 1 && (200..300).contains(&status) {
            self.w.metrics.of(self.class).retry_succeeded.inc();
            self.w.metrics.provider.retry_succeeded_attempt.record(u64::from(self.attempt));
        }
        if !role.learns() && !matches!(status, 429 | 503) {
            // The observer learns from successes; here only a 429 needs its Retry-After, and a
            // 429 or 503 may end a retried request (`retry_exhausted`).
            return Action::Continue;
        }
        let Ok(now_ns) = abi::now_ns() else { return Action::Continue };
        let now_ms = now_ns / NANOS_PER_MS;
        let headers = match all {
            Some(h) => h,
            None => abi::response_headers().unwrap_or_default(),
        };
        if role.admits() {
            let attempts = headers.get("x-envoy-attempt-count").and_then(|v| v.parse().ok());
            self.count_retries(status, attempts.unwrap_or(0));
        }
        let signals = self.parse(status, &headers, None, now_ms);
        let hold = status == 429
            && !end_of_stream
            && self.w.bodies.get() != Bodies::Withheld
            && self.w.hold_response(self.id, now_ms);
        let verdict = if role.learns() && !hold {
            self.w.observe(status, &signals, self.probe, now_ms, true)
        } else if status == 429 {
            self.w.peek(&signals, now_ms)
        } else {
            None
        };
        if let (429, Some(v), true) = (status, verdict, role.admits()) {
            // Said at once; a held 429 says it again with what its body adds.
            self.rewrite_429(&v, now_ms);
        }
        if status == 429 && !end_of_stream {
            self.answer_429 =
                Some(Answer429 { headers, from_headers: signals, body: Vec::new(), held: hold, learned: !hold });
        }
        if hold {
            Action::Pause
        } else {
            Action::Continue
        }
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        if let Some(m) = &mut self.meter {
            // Read as it passes, never held: a stream reaches its client chunk by chunk.
            if m.wants_body() {
                m.feed(&abi::response_body(body_size).unwrap_or_default());
            }
            if end_of_stream {
                self.settle();
            }
        }
        if let Some(a) = &mut self.answer_429 {
            // The tick may have let a held 429 go without its body: then it flows like any other.
            a.held = a.held && self.w.body_arrived(self.id);
            if a.held {
                // Held: Envoy buffers, and `body_size` is everything so far.
                if end_of_stream || body_size >= MAX_BODY {
                    let body = abi::response_body(body_size.min(MAX_BODY)).unwrap_or_default();
                    self.finish_429(&body);
                    return Action::Continue;
                }
                return Action::Pause;
            }
            let fits = append_chunk(&mut a.body, body_size, MAX_BODY);
            if end_of_stream || !fits {
                let body = std::mem::take(&mut a.body);
                self.finish_429(&body);
            }
        }
        if let Some((_, body)) = &mut self.capture {
            let max = self.w.config.fallback.max_body_bytes as usize;
            if !append_chunk(body, body_size, max) {
                self.capture = None; // too large to cache
            } else if end_of_stream {
                self.store_in_cache();
            }
        }
        Action::Continue
    }
}
