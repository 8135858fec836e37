//! One request's context: classify it, then let it through, make it wait, or answer a local 429.

use super::root::Filter;
use super::abi;
use super::shared::SharedData;
use crate::store;
use crate::admission::Arrival;
use crate::breaker::Gate;
use crate::classify::classify;
use crate::priority::Priority;
use crate::queue::Waiter;
use crate::reply::Reason;
use crate::signals;
use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::Action;
use std::rc::Rc;

const NANOS_PER_MS: u64 = 1_000_000;
/// Largest provider 429 body read for timing and terminal-quota hints.
const MAX_BODY: usize = 64 * 1024;

pub struct Request {
    f: Rc<Filter>,
    id: u32,
    class: Priority,
    /// Bucket key while this request waits in this worker's queue.
    waiting_on: Option<String>,
    /// The provider answered 429: its body, collected as it passes, and what its headers said.
    body_429: Option<(Vec<u8>, signals::Signals)>,
    /// Fallback cache key of this request, when the fallback is on and the client sent one.
    cache_key: Option<u64>,
    /// A success being collected for the fallback cache: content type and body so far.
    capture: Option<(String, Vec<u8>)>,
}

impl Request {
    pub fn new(f: Rc<Filter>, id: u32) -> Request {
        Request { f, id, class: Priority::Normal, waiting_on: None, body_429: None, cache_key: None, capture: None }
    }

    fn header(name: &str) -> Option<String> {
        abi::request_header(name).unwrap_or_else(|s| {
            log::debug!("llm-ratelimit: cannot read request header {name}: status {s}");
            None
        })
    }

    /// A host call failed: let the request through rather than fail user traffic on our fault.
    fn fail_open(&self, what: &str, status: abi::Status) -> Action {
        log::warn!("llm-ratelimit: {what} failed (status {status}); letting the request through");
        self.f.metrics.errors.inc();
        Action::Continue
    }

    /// While the breaker is open: answers with a cached response to the same request, if any.
    fn answer_from_cache(&self, now_ms: u64) -> bool {
        let fb = &self.f.config.fallback;
        let Some(key) = self.cache_key else { return false };
        let Some(entry) = super::fallback::lookup(&self.f.config.name, key, now_ms, fb.max_age_ms) else {
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
                self.f.metrics.provider.fallback_served.inc();
                true
            }
            Err(s) => {
                log::warn!("llm-ratelimit: cannot answer from the fallback cache: status {s}");
                false
            }
        }
    }

    /// Answers this request with a local 429; `tokens` is the bucket level it saw.
    fn refuse(&self, reason: Reason, wait_ns: u64, tokens: f64, retry: bool) -> Action {
        self.f.metrics.of(self.class).rejected.inc();
        let (status, headers, body) = self.f.limited(self.class, reason, wait_ns, tokens, retry);
        let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        match abi::send_response(status, &headers, body.as_bytes()) {
            Ok(()) => Action::Pause,
            Err(st) => self.fail_open("send_local_response", st),
        }
    }

    /// Takes a token, waits, or refuses. A refusal because of `not_before_ns` says `hold_reason`.
    fn admit(&mut self, key: &str, now_ns: u64, not_before_ns: u64, hold_reason: Reason) -> Action {
        // The least important class below ours with a waiter here: the one we may shed.
        let local_victim = self.f.queues.try_borrow().ok().and_then(|qs| {
            let q = qs.get(key)?;
            Priority::ALL.into_iter().rev().find(|&p| p > self.class && q.len(p) > 0)
        });
        let fresh = self.f.fresh(now_ns);
        let decided = store::update(&SharedData, key, || fresh, |s| {
            let (arrival, next) = self.f.policy.arrive(s, self.class, now_ns, not_before_ns, local_victim);
            // A refusal changes nothing but the refill, which the next writer redoes anyway.
            let write = !matches!(arrival, Arrival::Reject { .. });
            ((arrival, next), write.then_some(next))
        });
        let (arrival, s) = match decided {
            Ok(d) => d,
            Err(st) => return self.fail_open("shared-data admission", st),
        };
        let m = self.f.metrics.of(self.class);
        self.f.publish_tokens(s.bucket.tokens);
        match arrival {
            Arrival::Admit => {
                m.admitted.inc();
                Action::Continue
            }
            Arrival::Reject { reason: Reason::ProviderHold, wait_ns } => {
                self.refuse(hold_reason, wait_ns, s.bucket.tokens, true)
            }
            Arrival::Reject { reason, wait_ns } => self.refuse(reason, wait_ns, s.bucket.tokens, true),
            Arrival::Wait | Arrival::WaitEvicting { .. } => {
                let now_ms = now_ns / NANOS_PER_MS;
                let deadline_ms = now_ms.saturating_add(self.f.config.class(self.class).max_wait_ms);
                let Ok(mut queues) = self.f.queues.try_borrow_mut() else {
                    return self.fail_open("queue borrow", 0);
                };
                let q = queues.entry(key.to_string()).or_insert_with(|| self.f.wait_queue());
                let victim = match arrival {
                    Arrival::WaitEvicting { .. } => q.evict_newest_below(self.class),
                    _ => None,
                };
                q.push(Waiter { id: self.id, class: self.class, enqueued_ms: now_ms, deadline_ms });
                drop(queues);
                self.waiting_on = Some(key.to_string());
                m.queued.inc();
                self.f.metrics.levels(&s);
                if let Some(v) = victim {
                    self.f.metrics.of(v.class).shed.inc();
                    self.f.refuse_waiter(&v, Reason::Shed, &s, now_ms);
                    // Host calls after this act on our own request again.
                    if let Err(st) = abi::set_effective_context(self.id) {
                        log::debug!("llm-ratelimit: cannot restore context {}: status {st}", self.id);
                    }
                }
                Action::Pause
            }
        }
    }

    /// Reads the provider's rate-limit signals from the response headers, updates the shared
    /// provider state, and gives a 429 one precise `Retry-After` for the client. Returns what the
    /// headers said, so the body can add to it.
    fn learn(&self, status: u16, headers: &[(String, String)]) -> Option<signals::Signals> {
        let now_ms = abi::now_ns().ok()? / NANOS_PER_MS;
        let signals = self.parse(status, headers, None, now_ms);
        let role = self.f.config.role;
        let verdict = if role.learns() {
            self.observe(status, &signals, now_ms, true)?
        } else if status == 429 {
            self.f.peek(&signals, now_ms).ok()?
        } else {
            return None;
        };
        if status == 429 && role.admits() {
            let wait_ms = verdict.retry_at_ms.map_or(1000, |t| t.saturating_sub(now_ms));
            let secs = crate::reply::retry_after_secs(wait_ms);
            self.f.metrics.provider.retry_after_s.record(secs);
            set_header("retry-after", &secs.to_string());
            set_header("retry-after-ms", &wait_ms.max(1).to_string());
            set_header("ratelimit", &format!("\"{}\";r=0;t={secs}", self.f.config.name));
            set_header("x-llm-ratelimit-source", "provider");
            set_header("x-should-retry", if verdict.terminal { "false" } else { "true" });
        }
        Some(signals)
    }

    /// Reads a 429's body once it has passed (Envoy cannot hold the headers while the filter
    /// reads the body): timing or a terminal quota found only there updates the shared state, so
    /// every later client is told.
    fn learn_body(&self, body: &[u8], from_headers: &signals::Signals, headers: &[(String, String)]) {
        let Ok(now_ns) = abi::now_ns() else { return };
        let now_ms = now_ns / NANOS_PER_MS;
        let signals = self.parse(429, headers, Some(body), now_ms);
        if signals.retry_at() != from_headers.retry_at() || signals.terminal != from_headers.terminal {
            self.observe(429, &signals, now_ms, false);
        }
    }

    fn store_in_cache(&mut self) {
        let (Some(key), Some((content_type, body)), Ok(now)) = (self.cache_key, self.capture.take(), abi::now_ns())
        else {
            return;
        };
        let entry = crate::fallback::Entry { stored_ms: now / NANOS_PER_MS, content_type, body };
        let fb = &self.f.config.fallback;
        match super::fallback::store(&self.f.config.name, key, &entry, fb.max_entries as usize) {
            Ok(()) => self.f.metrics.provider.fallback_stored.inc(),
            Err(s) => log::warn!("llm-ratelimit: cannot store in the fallback cache: status {s}"),
        }
    }

    fn parse(&self, status: u16, headers: &[(String, String)], body: Option<&[u8]>, now_ms: u64) -> signals::Signals {
        let pairs: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let cfg = &self.f.config.provider;
        signals::parse(cfg.style, status, &pairs, body, now_ms, cfg.breaker.max_wait_ms)
    }

    fn observe(
        &self,
        status: u16,
        signals: &signals::Signals,
        now_ms: u64,
        first: bool,
    ) -> Option<crate::breaker::Verdict> {
        match self.f.observe(status, signals, now_ms, first) {
            Ok(v) => Some(v),
            Err(s) => {
                self.f.metrics.errors.inc();
                log::warn!("llm-ratelimit: cannot update the provider state: status {s}");
                None
            }
        }
    }
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
    /// The client went away: if it was still waiting, free its place in the queue.
    fn on_done(&mut self) -> bool {
        let Some(key) = self.waiting_on.take() else { return true };
        let removed = match self.f.queues.try_borrow_mut() {
            Ok(mut qs) => qs.get_mut(&key).and_then(|q| q.remove(self.id)),
            Err(_) => None,
        };
        if let Ok(mut w) = self.f.waited_ms.try_borrow_mut() {
            w.remove(&self.id);
        }
        if removed.is_some() {
            self.f.metrics.of(self.class).cancelled.inc();
            let now = abi::now_ns().unwrap_or(0);
            let left = store::update(&SharedData, &key, || self.f.fresh(now), |s| {
                let next = self.f.policy.leave(s, self.class);
                (next, Some(next))
            });
            match left {
                Ok(s) => self.f.metrics.levels(&s),
                Err(st) => log::warn!("llm-ratelimit: cannot update the queue depth: status {st}"),
            }
        }
        true
    }
}

impl HttpContext for Request {
    fn on_http_request_headers(&mut self, _headers: usize, _end_of_stream: bool) -> Action {
        let cfg = &self.f.config;
        if !cfg.role.admits() {
            return Action::Continue;
        }
        let path = if self.f.needs_path { Self::header(":path").unwrap_or_default() } else { String::new() };
        self.class = classify(&cfg.classify, &path, Self::header);
        // Upstream sees the class the proxy decided, never one a client claimed.
        if let Err(s) = abi::set_request_header(&cfg.classify.header, self.class.name()) {
            log::debug!("llm-ratelimit: cannot set {}: status {s}", cfg.classify.header);
        }
        let tenant = cfg.bucket.key_header.as_deref().and_then(Self::header);
        let key = self.f.bucket_key(tenant.as_deref());
        if let Some(n) = cfg.class(self.class).max_retries {
            if let Err(s) = abi::set_request_header("x-envoy-max-retries", &n.to_string()) {
                log::debug!("llm-ratelimit: cannot set x-envoy-max-retries: status {s}");
            }
        }
        let now = match abi::now_ns() {
            Ok(t) => t,
            Err(s) => return self.fail_open("get_current_time", s),
        };
        let fb = &cfg.fallback;
        if fb.enabled {
            if let Some(k) = Self::header(&fb.key_header) {
                let method = Self::header(":method").unwrap_or_default();
                self.cache_key = Some(crate::fallback::key(&method, &path, &k));
            }
        }
        // Held or open: the request may wait for the reset if its class may wait that long
        // (an open breaker then lets one probe go first); a terminal quota fails fast.
        let (not_before_ns, hold_reason) = match self.f.gate(now / NANOS_PER_MS) {
            Ok(Gate::Pass | Gate::Probe) => (0, Reason::ProviderHold),
            Ok(Gate::Hold { until_ms }) => (until_ms.saturating_mul(NANOS_PER_MS), Reason::ProviderHold),
            Ok(Gate::Open { .. }) if self.answer_from_cache(now / NANOS_PER_MS) => return Action::Pause,
            Ok(Gate::Open { until_ms, terminal: false }) => {
                (until_ms.saturating_mul(NANOS_PER_MS), Reason::BreakerOpen)
            }
            Ok(Gate::Open { until_ms, terminal: true }) => {
                let wait_ns = until_ms.saturating_mul(NANOS_PER_MS).saturating_sub(now);
                // The bucket was not consulted: a terminal quota leaves nothing to spend.
                return self.refuse(Reason::BreakerOpen, wait_ns, 0.0, false);
            }
            Err(s) => {
                self.f.metrics.errors.inc();
                log::warn!("llm-ratelimit: cannot read the provider state: status {s}");
                (0, Reason::ProviderHold)
            }
        };
        self.admit(&key, now, not_before_ns, hold_reason)
    }

    fn on_http_response_headers(&mut self, _headers: usize, end_of_stream: bool) -> Action {
        let waited = self.waiting_on.as_ref().and_then(|_| self.f.waited_ms.try_borrow_mut().ok()?.remove(&self.id));
        if let Some(ms) = waited {
            set_header("x-ratelimit-queued-ms", &ms.to_string());
        }
        let role = self.f.config.role;
        let header = |name| abi::response_header(name).ok().flatten();
        let status = header(":status").and_then(|s| s.parse().ok()).unwrap_or(0u16);
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
        if !role.learns() && status != 429 {
            // The observer learns from successes; here only a 429 needs its Retry-After.
            return Action::Continue;
        }
        let headers = abi::response_headers().unwrap_or_default();
        let signals = self.learn(status, &headers);
        if let (429, false, Some(signals), true) = (status, end_of_stream, signals, role.learns()) {
            self.body_429 = Some((Vec::new(), signals));
        }
        Action::Continue
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        if let Some((body, _)) = &mut self.body_429 {
            append_chunk(body, body_size, MAX_BODY);
            if end_of_stream {
                if let Some((body, from_headers)) = self.body_429.take() {
                    let headers = abi::response_headers().unwrap_or_default();
                    self.learn_body(&body, &from_headers, &headers);
                }
            }
        }
        if let Some((_, body)) = &mut self.capture {
            let max = self.f.config.fallback.max_body_bytes as usize;
            if !append_chunk(body, body_size, max) {
                self.capture = None; // too large to cache
            } else if end_of_stream {
                self.store_in_cache();
            }
        }
        Action::Continue
    }
}
