//! The root context: one per worker VM. It parses the configuration, builds the worker's shared
//! context, hands it to every request, and ticks it.

use super::abi;
use super::dispatch::{Context, ContextType, HttpContext, RootContext};
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

impl Root {
    pub fn new(id: u32) -> Root {
        Root { id, worker: None }
    }
}

impl Context for Root {}

/// A random id for this worker VM: its entry among the shared waiter counts. A reloaded plugin
/// or restarted VM gets a new one, and the old entry stops counting once it is not refreshed.
fn worker_id(now_ns: u64) -> u64 {
    abi::random_u64().unwrap_or_else(|| crate::hash::stable_hash(&[&now_ns.to_string()]))
}

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
        let now = abi::now_ns().unwrap_or(0);
        let core = Worker::new(config, worker_id(now));
        if let Err(s) = core.ensure_shared(&SharedData, now) {
            log::warn!("llm-ratelimit: cannot create the shared state: status {s}");
        }
        // Every role ticks: admission releases waiters, and any role lets go of 429s whose body
        // does not come while their headers are held.
        let tick = core.config.queue.tick_ms.min(u32::MAX as u64) as u32;
        if let Err(s) = abi::set_tick_period_ms(tick) {
            log::error!("llm-ratelimit: cannot start the timer: status {s}");
            return false;
        }
        log::info!("llm-ratelimit: configured filter {:?} ({})", core.config.name, core.config.role.name());
        let worker = WorkerContext::new(core);
        worker.root_id.set(self.id);
        self.worker = Some(Rc::new(worker));
        true
    }

    fn on_tick(&mut self) {
        let Some(w) = &self.worker else { return };
        match abi::now_ns() {
            Ok(now) => w.tick(now),
            Err(s) => log::warn!("llm-ratelimit: no clock in on_tick: status {s}"),
        }
    }

    fn on_http_call_response(&mut self, token_id: u32, num_headers: usize) {
        if let Some(w) = &self.worker {
            w.alert_answered(token_id, num_headers);
        }
    }

    fn on_grpc_receive(&mut self, token_id: u32, response_size: usize) {
        if let Some(w) = &self.worker {
            w.global_answered(token_id, response_size);
        }
    }

    fn on_grpc_close(&mut self, token_id: u32, status_code: u32) {
        if let Some(w) = &self.worker {
            w.global_closed(token_id, status_code);
        }
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        let worker = self.worker.clone()?;
        Some(Box::new(Request::new(worker, context_id)))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}
