//! The root context: one per worker VM. It owns the parsed configuration and the stats, and hands
//! them to every request's context.

use super::http::Request;
use super::metrics::Metrics;
use super::{abi, shared};
use crate::bucket::Bucket;
use crate::config::Config;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::ContextType;
use std::rc::Rc;

/// What every request of this worker shares.
pub struct Filter {
    pub config: Config,
    pub bucket: Bucket,
    pub metrics: Metrics,
    /// Seconds to refill the whole bucket: the window in `RateLimit-Policy`.
    pub window_s: u64,
}

impl Filter {
    /// Shared-data key of the bucket for `tenant` (`None`: the one bucket of this filter).
    pub fn bucket_key(&self, tenant: Option<&str>) -> String {
        match tenant {
            None => format!("llm_ratelimit/{}/bucket", self.config.name),
            Some(t) => format!("llm_ratelimit/{}/bucket/{}", self.config.name, tenant_id(t)),
        }
    }
}

/// Long or odd tenant values are hashed so keys stay short and printable.
fn tenant_id(t: &str) -> String {
    if t.len() <= 64 && t.bytes().all(|c| c.is_ascii_graphic()) {
        return t.to_string();
    }
    // FNV-1a: stable across workers and restarts, no dependency.
    let h = t.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3));
    format!("#{h:016x}")
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
        let bucket = Bucket::new(b.capacity, b.refill_rate, b.burst_allowance);
        let window_s = (b.capacity as f64 / b.refill_rate).ceil().max(1.0) as u64;
        let filter = Filter { metrics: Metrics::define(&config.name), config, bucket, window_s };
        if filter.config.bucket.key_header.is_none() {
            let created = abi::now_ns().and_then(|now| shared::ensure(&filter.bucket_key(None), &bucket, now));
            if let Err(s) = created {
                log::warn!("llm-ratelimit: cannot create the shared bucket: status {s}");
            }
        }
        log::info!("llm-ratelimit: configured {:?}", filter.config);
        self.filter = Some(Rc::new(filter));
        true
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        let filter = self.filter.clone()?;
        Some(Box::new(Request::new(filter)))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}
