//! The `failover` targets of one worker: each a core of its own (its buckets, tenant table,
//! slots in flight, quota windows and provider state, in shared data under its own `name`, as
//! its own filters keep them), run beside the primary's, and the request header that routes a
//! request there.
//!
//! A request fails over only when the primary cannot serve it now (its provider state holds or
//! refuses it, or a gate refuses it, at its arrival or while it waits), only if its class may,
//! and only to a target that takes it at once: a target never queues a request. The header is
//! written only then, so the normal path pays no route-cache clear.

use super::metrics::{Metrics, TargetStats};
use super::shared::SharedData;
use crate::breaker::Gate;
use crate::config::FailoverTarget;
use crate::priority::Priority;
use crate::quota::Charge;
use crate::store::Status;
use crate::tenants::TenantTake;
use crate::time::Instant;
use crate::worker::{Admission, Arrival, Decision, Worker};
use std::cell::RefCell;

/// The request header a route in `envoy/envoy.yaml` matches to send a request to a target's
/// cluster: its value is the target's `name`.
pub const ROUTE_HEADER: &str = "x-llm-ratelimit-target";

/// What a target admitted: the decision, and the charge its quota windows reserved (and when).
pub type Admitted = (Decision, Option<(Charge, Instant)>);

pub struct Backup {
    pub target: FailoverTarget,
    pub core: RefCell<Worker>,
    pub stats: TargetStats,
}

impl Backup {
    pub fn new(primary: &str, target: &FailoverTarget, worker_id: u64, now: Instant) -> Backup {
        let core = Worker::new(target.provider.clone(), worker_id);
        if let Err(s) = core.ensure_shared(&SharedData, now) {
            log::warn!(
                "llm-ratelimit: cannot create the shared state of failover target {}: status {s}",
                target.provider.name
            );
        }
        Backup {
            stats: Metrics::of_target(primary, &target.provider.name),
            target: target.clone(),
            core: RefCell::new(core),
        }
    }

    pub fn name(&self) -> &str {
        &self.target.provider.name
    }

    /// Whether requests of class `p` may go here.
    pub fn takes(&self, p: Priority) -> bool {
        self.target.classes[p.index()]
    }

    /// Admits `a` (its `gate` ignored: this target's own is read) if this target can take it at
    /// once, through the gate chain's steps 1 to 4 (`worker::chain`; `charge` in its `quotas`):
    /// the decision (for its tenant slot) and its quota reservation, or `None` (what a step took
    /// given back).
    pub fn admit(&self, a: Arrival, charge: &Charge, now: Instant) -> Result<Option<Admitted>, Status> {
        let Ok(mut core) = self.core.try_borrow_mut() else { return Ok(None) };
        let gate = core.gate(&SharedData, now)?;
        if !matches!(gate, Gate::Pass | Gate::Counted) {
            return Ok(None);
        }
        let (id, need, tenant) = (a.id, a.need, a.tenant);
        let d = core.admit(&SharedData, Arrival { gate, ..a }, now)?;
        // Its queue is off: it never answers Wait; a refusal leaves the request with the primary.
        if !matches!(d.admission, Admission::Pass { .. }) {
            return Ok(None);
        }
        if core.config.quotas.is_empty() {
            return Ok(Some((d, None)));
        }
        match core.take_quotas(&SharedData, charge, now) {
            Ok(Ok(())) => Ok(Some((d, Some((*charge, now))))),
            taken => {
                // Steps 2 and 3 go back, as the primary's do when its step 4 refuses.
                core.give_back(&SharedData, None, need, now)?;
                if let (Some(t), Some(name)) = (&d.tenant, tenant) {
                    if let TenantTake::Taken { slot } = t.take {
                        core.give_tenant_back(&SharedData, name, slot, need.map_or(0, |n| n.tokens), now);
                    }
                }
                let _ = core.end_in_flight(&SharedData, id, None, || Some(now));
                taken.map(|_| None)
            }
        }
    }

    /// The model a request of `model` is sent here as (renamed by `models`, or as it is).
    pub fn model_for<'a>(&'a self, model: Option<&'a str>) -> Option<&'a str> {
        let model = model?;
        Some(self.target.models.iter().find(|(from, _)| from == model).map_or(model, |(_, to)| to.as_str()))
    }

    /// The request body with its `model` as this target names it, when the map has it.
    pub fn rewrite_model(&self, body: &[u8]) -> Option<Vec<u8>> {
        if self.target.models.is_empty() {
            return None;
        }
        let mut v: serde_json::Value = serde_json::from_slice(body).ok()?;
        let model = v.get("model")?.as_str()?;
        let (_, to) = self.target.models.iter().find(|(from, _)| from == model)?;
        v["model"] = serde_json::Value::String(to.clone());
        serde_json::to_vec(&v).ok()
    }

    /// One tick of this target's core: its leases back, its slots' heartbeat.
    pub fn tick(&self, now: Instant) {
        if let Ok(mut core) = self.core.try_borrow_mut() {
            if core.needs_tick() {
                core.tick(&SharedData, now);
            }
        }
    }
}
