//! One request's context: classify it, take a token from the process-wide bucket, and either let
//! it through or answer a local 429.

use super::root::Filter;
use super::shared::{self, Take};
use super::abi;
use crate::classify::classify;
use crate::priority::Priority;
use crate::reply::{self, Limited, Reason};
use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::Action;
use std::rc::Rc;

pub struct Request {
    f: Rc<Filter>,
}

impl Request {
    pub fn new(f: Rc<Filter>) -> Request {
        Request { f }
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

    fn reject(&self, class: Priority, reason: Reason, wait_ns: u64, left: f64) -> Action {
        let floor = self.f.bucket.reserve_floor(self.f.config.class(class).use_burst);
        let (status, headers, body) = reply::too_many_requests(&Limited {
            policy: &self.f.config.name,
            priority: class,
            reason,
            wait_ms: wait_ns.div_ceil(1_000_000),
            remaining: (left - floor).max(0.0) as u64,
            quota: self.f.config.bucket.capacity,
            window_s: self.f.window_s,
        });
        let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        self.f.metrics.of(class).rejected.inc();
        if let Err(s) = abi::send_response(status, &headers, body.as_bytes()) {
            return self.fail_open("send_local_response", s);
        }
        Action::Pause
    }
}

impl Context for Request {}

impl HttpContext for Request {
    fn on_http_request_headers(&mut self, _headers: usize, _end_of_stream: bool) -> Action {
        let cfg = &self.f.config;
        let path = Self::header(":path").unwrap_or_default();
        let class = classify(&cfg.classify, &path, Self::header);
        let tenant = cfg.bucket.key_header.as_deref().and_then(Self::header);
        let key = self.f.bucket_key(tenant.as_deref());
        let now = match abi::now_ns() {
            Ok(t) => t,
            Err(s) => return self.fail_open("get_current_time", s),
        };
        let floor = self.f.bucket.reserve_floor(cfg.class(class).use_burst);
        match shared::take(&key, &self.f.bucket, now, 1.0, floor) {
            Ok(Take::Admitted { left }) => {
                self.f.metrics.of(class).admitted.inc();
                self.f.metrics.bucket_tokens.record(left as u64);
                Action::Continue
            }
            Ok(Take::Wait { ns, left }) => {
                self.f.metrics.bucket_tokens.record(left as u64);
                self.reject(class, Reason::NoToken, ns, left)
            }
            Err(s) => self.fail_open("shared-data token bucket", s),
        }
    }
}
