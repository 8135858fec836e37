//! The root context: one per plugin in a worker VM. It parses the configuration, builds the
//! worker's shared context, hands it to every request, and ticks it.

use super::api::Buffer;
use super::calls::{self, host};
use super::request::Request;
use super::shared::SharedData;
use super::worker::WorkerContext;
use crate::config::Config;
use crate::worker::Worker;
use std::rc::Rc;

pub struct Root {
    id: u32,
    worker: Option<Rc<WorkerContext>>,
}

/// A random id for this worker VM: its entry among the shared waiter counts. A reloaded plugin
/// or restarted VM gets a new one, and the old entry stops counting once it is not refreshed.
fn worker_id(now_ns: u64) -> u64 {
    host().random_u64().unwrap_or_else(|| crate::hash::stable_hash(&[&now_ns.to_string()]))
}

impl Root {
    pub fn new(id: u32) -> Root {
        Root { id, worker: None }
    }

    /// Reads and checks the configuration; false makes Envoy refuse it (the reason is logged).
    pub fn on_configure(&mut self) -> bool {
        let bytes = match host().buffer(Buffer::PluginConfiguration, usize::MAX) {
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
        let now = calls::now().unwrap_or_default();
        let core = Worker::new(config, worker_id(now.as_nanos()));
        if let Err(s) = core.ensure_shared(&SharedData, now) {
            log::warn!("llm-ratelimit: cannot create the shared state: status {s}");
        }
        // Every role ticks: admission releases waiters, and any role lets go of what it holds
        // past its deadline.
        let tick = core.config.queue.tick_ms.min(u32::MAX as u64) as u32;
        if let Err(s) = host().set_tick_period_ms(tick) {
            log::error!("llm-ratelimit: cannot start the timer: status {s}");
            return false;
        }
        log::info!("llm-ratelimit: configured filter {:?} ({})", core.config.name, core.config.role.name());
        let worker = WorkerContext::new(core, self.id);
        self.worker = Some(Rc::new(worker));
        true
    }

    pub fn on_tick(&mut self) {
        let Some(w) = &self.worker else { return };
        match calls::now() {
            Ok(now) => w.tick(now),
            Err(s) => log::warn!("llm-ratelimit: no clock in on_tick: status {s}"),
        }
    }

    pub fn on_http_call_response(&mut self, token_id: u32, num_headers: usize) {
        if let Some(w) = &self.worker {
            w.alerts.answered(&w.config, &w.metrics, token_id, num_headers);
        }
    }

    pub fn on_grpc_receive(&mut self, token_id: u32, response_size: usize) {
        if let Some(g) = self.worker.as_ref().and_then(|w| w.global.as_ref()) {
            g.answered(token_id, response_size);
        }
    }

    pub fn on_grpc_close(&mut self, token_id: u32, status_code: u32) {
        if let Some(g) = self.worker.as_ref().and_then(|w| w.global.as_ref()) {
            g.closed(token_id, status_code);
        }
    }

    /// The context of a new request, when this root is configured.
    pub fn create_request(&self, context_id: u32) -> Option<Request> {
        let worker = self.worker.clone()?;
        Some(Request::new(worker, context_id))
    }
}
