//! The global gate's host side: sends the rate limit service calls (gRPC, from the root context
//! so a request that goes away does not cancel a call others wait on), reads their answers, and
//! tells the requests that waited for them (`Event::GlobalPassed`, `Event::GlobalRefused`).

use super::api::Buffer;
use super::calls::{self, host};
use super::event::{self, Event};
use super::metrics::GlobalStats;
use crate::config::{DescriptorEntry, GlobalConfig};
use crate::global::gate::{Ask, GlobalGate, GlobalVerdict, Outcome, Units, REQUESTS, TOKENS};
use crate::global::proto::{self, Descriptor};
use crate::priority::Priority;
use crate::reply::Reason;
use crate::time::{Duration, Instant};
use crate::worker::Refusal;
use std::cell::RefCell;

const SERVICE: &str = "envoy.service.ratelimit.v3.RateLimitService";
const METHOD: &str = "ShouldRateLimit";

/// What one request needs from the gate: its key (the values of the configured entries but
/// `unit`, each ending in a newline, which no header value holds), units, class.
#[derive(Clone, Debug)]
pub struct GlobalNeed {
    pub key: String,
    pub hits: Units,
    pub class: Priority,
}

pub struct GlobalHost {
    gate: RefCell<GlobalGate>,
    config: GlobalConfig,
    /// The provider's name: the `provider` descriptor entry.
    provider: String,
    /// The encoded `GrpcService` naming the cluster.
    service: Vec<u8>,
    stats: GlobalStats,
    /// The root context's id: calls are made from it, so a request that goes away does not
    /// cancel a call others wait on.
    root_id: u32,
}

/// What the request context does after the gate.
pub enum Gated {
    Pass,
    Wait,
    Refuse(Refusal),
}

impl GlobalHost {
    pub fn new(c: &GlobalConfig, provider: &str, stats: GlobalStats, root_id: u32) -> GlobalHost {
        GlobalHost {
            gate: RefCell::new(GlobalGate::new(c.gate.clone())),
            config: c.clone(),
            provider: provider.to_string(),
            service: proto::encode_service(&c.cluster),
            stats,
            root_id,
        }
    }

    /// A request's need from the gate.
    pub fn need(&self, class: Priority, tenant: Option<&str>, tokens: Option<u64>) -> GlobalNeed {
        let c = &self.config;
        let mut key = String::new();
        for e in &c.descriptors {
            key.push_str(match e {
                DescriptorEntry::Provider => &self.provider,
                // A request without the tenant header counts under "none".
                DescriptorEntry::Tenant => tenant.unwrap_or("none"),
                DescriptorEntry::Class => class.name(),
                DescriptorEntry::Unit => continue,
            });
            key.push('\n');
        }
        // Tokens go to the service only in their own descriptor (`unit` = `tokens`).
        let tokens = if c.descriptors.contains(&DescriptorEntry::Unit) { tokens.unwrap_or(0) } else { 0 };
        GlobalNeed { key, hits: [1, tokens], class }
    }

    /// How long the service's last over-limit answer still holds for `need`, checked before the
    /// local buckets.
    pub fn blocked(&self, need: &GlobalNeed, now: Instant) -> Option<Duration> {
        self.gate.try_borrow().ok()?.blocked(&need.key, need.hits, now)
    }

    /// Request `id` passed the local buckets: the gate lets it through, makes it wait, or refuses.
    pub fn arrive(&self, id: u32, need: &GlobalNeed, may_wait: Duration, now: Instant) -> Gated {
        let verdict = match self.gate.try_borrow_mut() {
            Ok(mut gate) => gate.arrive(&need.key, id, need.hits, may_wait, now),
            Err(_) => return Gated::Pass,
        };
        match verdict {
            GlobalVerdict::Pass { ask } => {
                if let Some(ask) = ask {
                    self.send(ask);
                    restore(id);
                }
                Gated::Pass
            }
            GlobalVerdict::Refuse { wait, unavailable } => Gated::Refuse(refusal(id, need.class, wait, unavailable)),
            GlobalVerdict::Wait { ask } => {
                self.stats.waited.inc();
                if let Some(ask) = ask {
                    self.send(ask);
                    restore(id);
                }
                Gated::Wait
            }
        }
    }

    /// Request `id`, waiting on the gate, is over (its client went away): forget it.
    pub fn leave(&self, id: u32) {
        if let Ok(mut gate) = self.gate.try_borrow_mut() {
            gate.leave(id);
        }
    }

    /// Sends `ask`'s call from the root context; one that cannot be sent fails on the next tick.
    fn send(&self, ask: Ask) {
        let c = &self.config;
        let Ok(mut gate) = self.gate.try_borrow_mut() else { return };
        let name = gate.name(ask.key);
        let descriptors: Vec<Descriptor> = [(REQUESTS, "requests"), (TOKENS, "tokens")]
            .into_iter()
            .filter(|&(u, _)| ask.hits[u] > 0)
            .map(|(u, unit)| {
                let mut values = name.split('\n');
                let entries = c
                    .descriptors
                    .iter()
                    .map(|e| (e.name(), if *e == DescriptorEntry::Unit { unit } else { values.next().unwrap_or("") }))
                    .collect();
                Descriptor { entries, hits: Some(ask.hits[u]) }
            })
            .collect();
        let hits_addend = ask.hits[REQUESTS].min(u64::from(u32::MAX)) as u32;
        let message = proto::encode_request(&c.domain, &descriptors, hits_addend);
        if let Err(s) = calls::set_effective_context(self.root_id) {
            log::debug!("llm-ratelimit: cannot call from the root context: status {s}");
        }
        let timeout = c.gate.timeout_ms.min(u64::from(u32::MAX)) as u32;
        match host().grpc_call(&self.service, SERVICE, METHOD, &message, timeout) {
            Ok(token) => gate.sent(ask.key, token),
            Err(s) => {
                log::warn!("llm-ratelimit: cannot call the rate limit service {}: status {s}", c.cluster);
                gate.not_sent(ask.key);
            }
        }
    }

    /// The service answered call `token` (`size` bytes).
    pub fn answered(&self, token: u32, size: usize) {
        let now = calls::now().unwrap_or_default();
        let message = host().buffer(Buffer::GrpcMessage, size).unwrap_or_default();
        let outcome = {
            let Ok(mut gate) = self.gate.try_borrow_mut() else { return };
            match proto::decode_response(&message) {
                Ok(r) => gate.answered(token, &r, now),
                Err(e) => {
                    log::warn!("llm-ratelimit: unreadable rate limit service answer: {e}");
                    gate.failed(token, false, now)
                }
            }
        };
        self.carry_out(outcome);
    }

    /// Call `token` ended without an answer (gRPC `status`: unavailable, deadline exceeded, ...).
    pub fn closed(&self, token: u32, status: u32) {
        let now = calls::now().unwrap_or_default();
        let outcome = match self.gate.try_borrow_mut() {
            // gRPC DEADLINE_EXCEEDED: no answer within timeout_ms.
            Ok(mut gate) => gate.failed(token, status == 4, now),
            Err(_) => return,
        };
        self.carry_out(outcome);
    }

    /// Each tick: timeouts, resets, leases' ends; and the gate's counts into the stats.
    pub fn tick(&self, now: Instant) {
        let (outcome, counts) = match self.gate.try_borrow_mut() {
            Ok(mut gate) if gate.busy() => (gate.tick(now), gate.take_counts()),
            Ok(mut gate) => (Outcome::default(), gate.take_counts()),
            Err(_) => return,
        };
        let m = &self.stats;
        m.calls.add(counts.calls);
        m.over_limit.add(counts.over_limit);
        m.errors.add(counts.errors);
        m.timeouts.add(counts.timeouts);
        m.fallback.add(counts.fallback);
        m.lease_units.add(counts.leased[REQUESTS]);
        m.lease_tokens.add(counts.leased[TOKENS]);
        m.expired.add(counts.expired[REQUESTS]);
        m.expired_tokens.add(counts.expired[TOKENS]);
        for ms in counts.latency_ms {
            m.latency_ms.record(ms);
        }
        self.carry_out(outcome);
    }

    /// Tells the waiters what the gate decided, and sends its calls.
    fn carry_out(&self, outcome: Outcome) {
        for id in outcome.pass {
            event::post(id, Event::GlobalPassed);
        }
        for (id, wait, unavailable) in outcome.refuse {
            // The class is the request's own: it answers with it.
            event::post(id, Event::GlobalRefused(refusal(id, Priority::Normal, wait, unavailable)));
        }
        for ask in outcome.asks {
            self.send(ask);
        }
    }
}

/// Host calls after a call sent from the root context act on request `id` again.
fn restore(id: u32) {
    if let Err(s) = calls::set_effective_context(id) {
        log::debug!("llm-ratelimit: #{id} cannot restore the context: status {s}");
    }
}

pub fn refusal(id: u32, class: Priority, wait: Duration, unavailable: bool) -> Refusal {
    Refusal {
        id,
        class,
        reason: if unavailable { Reason::GlobalUnavailable } else { Reason::GlobalLimit },
        wait,
        tokens: 0.0,
        retry: true,
        queued: None,
    }
}
