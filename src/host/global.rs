//! The global gate's host side: sends the rate limit service calls (gRPC, from the root context
//! so a request that goes away does not cancel a call others wait on), reads their answers, and
//! tells the requests that waited for them (`Event::GlobalPassed`, `Event::GlobalRefused`). It
//! also settles what admitted requests used: gathered per key as they end, sent on the tick, one
//! call per key, whose answers change nothing.

use super::api::Buffer;
use super::calls::{self, host};
use super::event::{self, Event};
use super::metrics::GlobalStats;
use crate::config::{DescriptorEntry, GlobalConfig};
use crate::global::gate::{
    Accounting, Ask, Cause, GlobalGate, GlobalVerdict, Ledger, Outcome, Settlement, Units, COST, MAX_KEYS, REQUESTS,
    TOKENS, UNITS,
};
use crate::global::proto::{self, Descriptor, Settle};
use crate::priority::Priority;
use crate::reply::Reason;
use crate::time::{Duration, Instant};
use crate::worker::Refusal;
use std::cell::{Cell, RefCell};
use std::collections::VecDeque;

const SERVICE: &str = "envoy.service.ratelimit.v3.RateLimitService";
const METHOD: &str = "ShouldRateLimit";
/// The `unit` entry's value per unit.
const UNIT_NAMES: [&str; UNITS.len()] = ["requests", "tokens", "cost"];
/// Most requests remembered as let through without the service's word until they settle (the
/// oldest is forgotten first: then it settles as if counted).
const MAX_UNCOUNTED: usize = 1024;
/// Most settlement calls awaited for their stats (beyond, the oldest is not awaited).
const MAX_SETTLING: usize = 4 * MAX_KEYS;

/// What one request needs from the gate: its key (the values of the configured entries but
/// `unit`, each ending in a newline, which no header value holds), units, class.
#[derive(Clone, Debug)]
pub struct GlobalNeed {
    pub key: String,
    pub hits: Units,
    pub class: Priority,
    /// The request that arrived with it (0: none yet), to know at its settlement whether the
    /// service counted it.
    id: Cell<u32>,
}

/// Settlement counts since the host last took them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SettleCounts {
    /// Settlement calls sent, and those that failed (error status, not sent).
    pub calls: u64,
    pub errors: u64,
    /// Requests whose settlement was dropped: more keys than `MAX_KEYS` in one tick.
    pub dropped: u64,
    /// Units taken off (`reserve`) and added after (both modes), per unit; requests never.
    pub refunded: Units,
    pub charged: Units,
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
    /// The provider's `max_retry_after_s`: a spent budget that resets later than this is not
    /// worth retrying (`x-should-retry: false`).
    max_wait: Duration,
    /// What ended requests used, until the tick settles it.
    ledger: RefCell<Ledger>,
    /// Requests let through without the service's word, not settled yet.
    uncounted: RefCell<VecDeque<u32>>,
    /// Settlement calls in flight: their answers go to no request.
    settling: RefCell<VecDeque<u32>>,
    settled: Cell<SettleCounts>,
}

/// What the request context does after the gate.
pub enum Gated {
    Pass,
    Wait,
    Refuse(Refusal),
}

impl GlobalHost {
    /// `max_wait_ms`: the provider's `max_retry_after_s` in milliseconds
    /// (`config.provider.breaker.max_wait_ms`).
    pub fn new(c: &GlobalConfig, provider: &str, stats: GlobalStats, root_id: u32, max_wait_ms: u64) -> GlobalHost {
        GlobalHost {
            gate: RefCell::new(GlobalGate::new(c.gate.clone())),
            config: c.clone(),
            provider: provider.to_string(),
            service: proto::encode_service(&c.cluster),
            stats,
            root_id,
            max_wait: Duration::from_millis(max_wait_ms),
            ledger: RefCell::new(Ledger::default()),
            uncounted: RefCell::new(VecDeque::new()),
            settling: RefCell::new(VecDeque::new()),
            settled: Cell::new(SettleCounts::default()),
        }
    }

    /// A request's need from the gate: `tokens` and `cost` are its estimate in LLM tokens and
    /// micro-dollars (`None`: not counted). Tokens ask for the estimate (`reserve`) or 1
    /// (`charge_after`: the window is not spent); cost asks for 1 (the budget is not spent). Both
    /// go to the service only in their own descriptors (`unit` = `tokens`, `cost`).
    pub fn need(&self, class: Priority, tenant: Option<&str>, tokens: Option<u64>, cost: Option<u64>) -> GlobalNeed {
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
        let by_unit = c.descriptors.contains(&DescriptorEntry::Unit);
        let tokens = match (tokens, c.accounting) {
            (Some(t), Accounting::Reserve) if by_unit => t.max(1),
            (Some(_), Accounting::ChargeAfter) if by_unit => 1,
            _ => 0,
        };
        let cost = u64::from(by_unit && cost.is_some());
        GlobalNeed { key, hits: [1, tokens, cost], class, id: Cell::new(0) }
    }

    /// How long the service's last over-limit answer still holds for `need`, and why: checked
    /// before the local buckets.
    pub fn blocked(&self, need: &GlobalNeed, now: Instant) -> Option<(Duration, Cause)> {
        self.gate.try_borrow().ok()?.blocked(&need.key, need.hits, now)
    }

    /// Request `id` passed the local buckets: the gate lets it through, makes it wait, or refuses.
    pub fn arrive(&self, id: u32, need: &GlobalNeed, may_wait: Duration, now: Instant) -> Gated {
        need.id.set(id);
        let verdict = match self.gate.try_borrow_mut() {
            Ok(mut gate) => gate.arrive(&need.key, id, need.hits, may_wait, now),
            Err(_) => GlobalVerdict::Fallback,
        };
        match verdict {
            GlobalVerdict::Pass { ask } => {
                if let Some(ask) = ask {
                    self.send(ask);
                    restore(id);
                }
                Gated::Pass
            }
            GlobalVerdict::Fallback => {
                self.uncounted(id);
                Gated::Pass
            }
            GlobalVerdict::Refuse { wait, cause } => Gated::Refuse(self.refusal(id, need.class, wait, cause)),
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

    /// A request the gate let through with `need` ended having used `used_tokens` LLM tokens
    /// and `used_cost` micro-dollars: what the service counted for it is corrected on the next
    /// tick. `reserve`: tokens refunded (estimate above usage) or charged (below), cost charged
    /// beyond the 1 its check took; `charge_after`: the usage beyond the checks' 1 added with
    /// plain hits. A request let through without the service's word is charged all it used.
    pub fn settle(&self, need: &GlobalNeed, used_tokens: u64, used_cost: u64) {
        let id = need.id.get();
        if id == 0 {
            return; // never through the gate: nothing counted
        }
        let counted = !self.forget_uncounted(id);
        let added =
            self.ledger.try_borrow_mut().map(|mut l| l.add(&need.key, need.hits, counted, [1, used_tokens, used_cost]));
        if added.is_err() {
            self.count_settled(|s| s.dropped += 1);
        }
        // A check of one unit admits while the window is not spent: its charge must reach the
        // service before the next check, not a tick later, or a budget is passed by every
        // request checked meanwhile.
        if need.hits[COST] > 0 || self.config.accounting == Accounting::ChargeAfter {
            self.send_settlements();
            restore(id);
        }
    }

    /// Settlement counts since last taken (for the stats: `global.settle_calls`, ...).
    pub fn take_settle_counts(&self) -> SettleCounts {
        self.settled.take()
    }

    fn count_settled(&self, f: impl FnOnce(&mut SettleCounts)) {
        let mut s = self.settled.get();
        f(&mut s);
        self.settled.set(s);
    }

    /// Request `id` went without the service's word: its settlement charges all it used.
    fn uncounted(&self, id: u32) {
        if let Ok(mut u) = self.uncounted.try_borrow_mut() {
            if u.len() >= MAX_UNCOUNTED {
                u.pop_front();
            }
            u.push_back(id);
        }
    }

    /// Whether request `id` went without the service's word (forgotten now).
    fn forget_uncounted(&self, id: u32) -> bool {
        let Ok(mut u) = self.uncounted.try_borrow_mut() else { return false };
        match u.iter().position(|&i| i == id) {
            Some(i) => u.remove(i).is_some(),
            None => false,
        }
    }

    /// The descriptor for `unit` of key `name` (its values, newline-separated), with `hits`.
    fn descriptor<'a>(&'a self, name: &'a str, unit: usize, hits: u64) -> Descriptor<'a> {
        let mut values = name.split('\n');
        let entries = self
            .config
            .descriptors
            .iter()
            .map(|e| {
                (e.name(), if *e == DescriptorEntry::Unit { UNIT_NAMES[unit] } else { values.next().unwrap_or("") })
            })
            .collect();
        Descriptor { entries, hits: Some(hits) }
    }

    /// Sends a call from the root context: its token, or the status it could not be sent with.
    fn call(&self, descriptors: &[Descriptor], hits_addend: u64) -> Result<u32, u32> {
        let c = &self.config;
        let hits_addend = hits_addend.min(u64::from(u32::MAX)) as u32;
        let message = proto::encode_request(&c.domain, descriptors, hits_addend);
        if let Err(s) = calls::set_effective_context(self.root_id) {
            log::debug!("llm-ratelimit: cannot call from the root context: status {s}");
        }
        let timeout = c.gate.timeout_ms.min(u64::from(u32::MAX)) as u32;
        host().grpc_call(&self.service, SERVICE, METHOD, &message, timeout)
    }

    /// Sends `ask`'s call from the root context; one that cannot be sent fails on the next tick.
    fn send(&self, ask: Ask) {
        let Ok(mut gate) = self.gate.try_borrow_mut() else { return };
        let name = gate.name(ask.key);
        // One descriptor per unit asked, in `UNITS` order: the answer's statuses follow it.
        let descriptors: Vec<Descriptor> =
            UNITS.into_iter().filter(|&u| ask.hits[u] > 0).map(|u| self.descriptor(name, u, ask.hits[u])).collect();
        match self.call(&descriptors, ask.hits[REQUESTS]) {
            Ok(token) => gate.sent(ask.key, token),
            Err(s) => {
                log::warn!("llm-ratelimit: cannot call the rate limit service {}: status {s}", self.config.cluster);
                gate.not_sent(ask.key);
            }
        }
    }

    /// Sends one key's settlement: per unit, a descriptor ending in the settle entry (`reserve`)
    /// or a plain one (`charge_after`). Its answer is awaited only for the stats.
    fn send_settlement(&self, s: &Settlement) {
        let reserve = self.config.accounting == Accounting::Reserve;
        let mut descriptors = Vec::with_capacity(2);
        for u in [TOKENS, COST] {
            if s.refund[u] > 0 {
                descriptors.push(self.descriptor(&s.key, u, s.refund[u]).settling(Settle::Refund));
            } else if s.charge[u] > 0 {
                let d = self.descriptor(&s.key, u, s.charge[u]);
                descriptors.push(if reserve { d.settling(Settle::Charge) } else { d });
            }
        }
        if descriptors.is_empty() {
            return;
        }
        if s.refund[TOKENS] > 0 {
            if let Ok(mut gate) = self.gate.try_borrow_mut() {
                gate.refunded(&s.key);
            }
        }
        match self.call(&descriptors, 0) {
            Ok(token) => {
                if let Ok(mut calls) = self.settling.try_borrow_mut() {
                    if calls.len() >= MAX_SETTLING {
                        calls.pop_front();
                    }
                    calls.push_back(token);
                }
                self.count_settled(|c| {
                    c.calls += 1;
                    for u in UNITS {
                        c.refunded[u] += s.refund[u];
                        c.charged[u] += s.charge[u];
                    }
                });
            }
            Err(st) => {
                log::warn!(
                    "llm-ratelimit: cannot settle with the rate limit service {}: status {st}",
                    self.config.cluster
                );
                self.count_settled(|c| c.errors += 1);
            }
        }
    }

    /// Whether `token` is a settlement call's (forgotten now).
    fn settled_call(&self, token: u32) -> bool {
        let Ok(mut calls) = self.settling.try_borrow_mut() else { return false };
        match calls.iter().position(|&t| t == token) {
            Some(i) => calls.remove(i).is_some(),
            None => false,
        }
    }

    /// The service answered call `token` (`size` bytes).
    pub fn answered(&self, token: u32, size: usize) {
        if self.settled_call(token) {
            return; // a settlement: counted whatever the answer (over limit is expected)
        }
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
        if self.settled_call(token) {
            self.count_settled(|c| c.errors += 1);
            return;
        }
        let now = calls::now().unwrap_or_default();
        let outcome = match self.gate.try_borrow_mut() {
            // gRPC DEADLINE_EXCEEDED: no answer within timeout_ms.
            Ok(mut gate) => gate.failed(token, status == 4, now),
            Err(_) => return,
        };
        self.carry_out(outcome);
    }

    /// Each tick: timeouts, resets, leases' ends; settlements; and the gate's counts into the
    /// stats.
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
        if let Ok(mut l) = self.ledger.try_borrow_mut() {
            for (key, tokens) in &counts.expired_tokens {
                l.expired(key, *tokens);
            }
        }
        self.send_settlements();
        let s = self.take_settle_counts();
        m.settle_calls.add(s.calls);
        m.settle_errors.add(s.errors);
        m.settle_dropped.add(s.dropped);
        m.refunded_tokens.add(s.refunded[TOKENS]);
        m.charged_tokens.add(s.charged[TOKENS]);
        m.charged_cost.add(s.charged[COST]);
    }

    /// Sends what the ledger holds, one call per key.
    fn send_settlements(&self) {
        let (settlements, dropped) = match self.ledger.try_borrow_mut() {
            Ok(mut l) => (l.take(self.config.accounting), l.take_dropped()),
            Err(_) => (Vec::new(), 0),
        };
        self.count_settled(|c| c.dropped += dropped);
        for s in &settlements {
            self.send_settlement(s);
        }
    }

    /// Tells the waiters what the gate decided, and sends its calls.
    fn carry_out(&self, outcome: Outcome) {
        for id in outcome.pass {
            event::post(id, Event::GlobalPassed);
        }
        for id in outcome.fallback {
            self.uncounted(id);
            event::post(id, Event::GlobalPassed);
        }
        for r in outcome.refuse {
            // The class is the request's own: it answers with it.
            event::post(r.id, Event::GlobalRefused(self.refusal(r.id, Priority::Normal, r.wait, r.cause)));
        }
        for ask in outcome.asks {
            self.send(ask);
        }
    }

    /// The refusal of request `id` by the gate for `cause`, retried after `wait`: a spent budget
    /// resetting later than the provider's `max_retry_after_s` is not worth retrying.
    pub fn refusal(&self, id: u32, class: Priority, wait: Duration, cause: Cause) -> Refusal {
        let reason = match cause {
            Cause::Limit => Reason::GlobalLimit,
            Cause::Budget => Reason::BudgetExceeded,
            Cause::Unavailable => Reason::GlobalUnavailable,
        };
        let retry = !(cause == Cause::Budget && wait > self.max_wait);
        Refusal { id, class, reason, wait, tokens: 0.0, retry, queued: None }
    }
}

/// Host calls after a call sent from the root context act on request `id` again.
fn restore(id: u32) {
    if let Err(s) = calls::set_effective_context(id) {
        log::debug!("llm-ratelimit: #{id} cannot restore the context: status {s}");
    }
}

#[cfg(all(test, not(target_arch = "wasm32")))]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::host::calls::install;
    use crate::host::double::{Call, Double, Process};
    use crate::host::metrics::Metrics;

    const ID: u32 = 5;

    /// A host over a double of its own (its clock at 0): `max_retry_after_s` 60, one call per
    /// request.
    fn global(accounting: &str) -> (GlobalHost, &'static Double) {
        let double: &'static Double = Box::leak(Box::new(Double::new(Process::new(0), 1, "")));
        install(double);
        let json = format!(
            r#"{{"provider":{{"max_retry_after_s":60}},
                "global":{{"cluster":"rls","accounting":"{accounting}","max_lease":1}}}}"#
        );
        let c = Config::parse(json.as_bytes()).expect("valid");
        let m = Metrics::define("p");
        let host =
            GlobalHost::new(c.global.as_ref().expect("global"), "p", m.global, 1, c.provider.breaker.max_wait_ms);
        let _ = event::take();
        (host, double)
    }

    /// The gRPC calls sent since last asked: (token, message).
    fn grpc_calls(double: &Double) -> Vec<(u32, Vec<u8>)> {
        let calls = double.take_calls().into_iter();
        calls
            .filter_map(|c| if let Call::GrpcCall { token, message, .. } = c { Some((token, message)) } else { None })
            .collect()
    }

    /// `RateLimitResponse` bytes: per status its code and reset in seconds (< 128).
    fn response(statuses: &[(u8, Option<u8>)]) -> Vec<u8> {
        let over = statuses.iter().any(|s| s.0 == 2);
        let mut b = vec![0x08, if over { 2 } else { 1 }];
        for &(code, reset) in statuses {
            let mut s = vec![0x08, code];
            if let Some(secs) = reset {
                s.extend([0x22, 0x02, 0x08, secs]);
            }
            b.extend([0x12, s.len() as u8]);
            b.extend(s);
        }
        b
    }

    fn answer(host: &GlobalHost, double: &Double, token: u32, statuses: &[(u8, Option<u8>)]) {
        let message = response(statuses);
        double.state().grpc_message = message.clone();
        host.answered(token, message.len());
    }

    fn descriptor(unit: &'static str, hits: u64) -> Descriptor<'static> {
        Descriptor { entries: vec![("provider", "p"), ("unit", unit)], hits: Some(hits) }
    }

    /// Request `ID` estimating 1000 tokens and 500 micro-dollars arrives and waits for its call.
    fn arrive(host: &GlobalHost, double: &Double) -> (GlobalNeed, u32) {
        let need = host.need(Priority::Normal, None, Some(1000), Some(500));
        assert!(matches!(host.arrive(ID, &need, Duration::ZERO, Instant::ZERO), Gated::Wait));
        let calls = grpc_calls(double);
        assert_eq!(calls.len(), 1);
        (need, calls[0].0)
    }

    #[test]
    fn reserve_refunds_and_charges_with_the_settle_entry_at_once_when_cost_is_counted() {
        let (host, double) = global("reserve");
        let (need, token) = arrive(&host, double);
        assert_eq!(need.hits, [1, 1000, 1], "the estimate, and 1 to check the budget");
        answer(&host, double, token, &[(1, None), (1, None), (1, None)]);
        assert_eq!(event::take(), vec![(ID, Event::GlobalPassed)]);
        // A budget's next check must see this charge: sent from the settling callback, no tick.
        host.settle(&need, 150, 420);
        let calls = grpc_calls(double);
        let want = proto::encode_request(
            "llm-ratelimit",
            &[descriptor("tokens", 850).settling(Settle::Refund), descriptor("cost", 419).settling(Settle::Charge)],
            0,
        );
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0].1, want);
        // Its answer (over limit, as a charge may well say) reaches no request, and no gate call.
        answer(&host, double, calls[0].0, &[(2, Some(5)), (2, Some(5))]);
        assert!(event::take().is_empty());
        let s = host.take_settle_counts();
        assert_eq!((s.calls, s.errors, s.refunded, s.charged), (1, 0, [0, 850, 0], [0, 0, 419]));
        // Nothing more to settle: no call.
        host.tick(Instant::from_millis(20));
        assert!(grpc_calls(double).is_empty());
    }

    #[test]
    fn token_refunds_wait_for_the_tick_and_go_as_one_call_per_key() {
        let (host, double) = global("reserve");
        let need = host.need(Priority::Normal, None, Some(1000), None);
        assert!(matches!(host.arrive(ID, &need, Duration::ZERO, Instant::ZERO), Gated::Wait));
        let token = grpc_calls(double)[0].0;
        answer(&host, double, token, &[(1, None), (1, None)]);
        let _ = event::take();
        host.settle(&need, 150, 0);
        host.settle(&need, 350, 0);
        assert!(grpc_calls(double).is_empty(), "no cost: the refund waits for the tick");
        host.tick(Instant::from_millis(10));
        let want = proto::encode_request("llm-ratelimit", &[descriptor("tokens", 1500).settling(Settle::Refund)], 0);
        let calls = grpc_calls(double);
        assert_eq!((calls.len(), &calls[0].1), (1, &want));
    }

    #[test]
    fn charge_after_checks_one_unit_and_adds_the_rest_with_plain_hits() {
        let (host, double) = global("charge_after");
        let (need, token) = arrive(&host, double);
        assert_eq!(need.hits, [1, 1, 1]);
        answer(&host, double, token, &[(1, None), (1, None), (1, None)]);
        host.settle(&need, 150, 420);
        host.tick(Instant::from_millis(10));
        let calls = grpc_calls(double);
        assert_eq!(
            calls[0].1,
            proto::encode_request("llm-ratelimit", &[descriptor("tokens", 149), descriptor("cost", 419)], 0)
        );
        host.closed(calls[0].0, 14);
        assert!(event::take().into_iter().all(|(id, _)| id == ID), "a failed settlement answers no one");
        assert_eq!(host.take_settle_counts().errors, 1);
    }

    #[test]
    fn a_request_let_through_without_the_service_is_charged_all_it_used() {
        let (host, double) = global("reserve");
        let (need, token) = arrive(&host, double);
        host.closed(token, 14); // unavailable: `local` lets it through
        assert_eq!(event::take(), vec![(ID, Event::GlobalPassed)]);
        host.settle(&need, 150, 420);
        host.tick(Instant::from_millis(10));
        let want = proto::encode_request(
            "llm-ratelimit",
            &[descriptor("tokens", 150).settling(Settle::Charge), descriptor("cost", 420).settling(Settle::Charge)],
            0,
        );
        assert_eq!(grpc_calls(double)[0].1, want);
    }

    #[test]
    fn a_spent_budget_refuses_as_budget_exceeded_and_not_worth_retrying_past_max_retry_after() {
        for (reset_s, retry) in [(30, true), (100, false)] {
            let (host, double) = global("reserve");
            let (need, token) = arrive(&host, double);
            answer(&host, double, token, &[(1, None), (1, None), (2, Some(reset_s))]);
            let refused = match event::take().as_slice() {
                [(ID, Event::GlobalRefused(r))] => *r,
                other => panic!("{other:?}"),
            };
            assert_eq!(refused.reason, Reason::BudgetExceeded);
            assert_eq!((refused.wait, refused.retry), (Duration::from_secs(u64::from(reset_s)), retry));
            // Checked before the local buckets too.
            let (wait, cause) = host.blocked(&need, Instant::ZERO).expect("over limit");
            assert_eq!(host.refusal(ID, Priority::Normal, wait, cause), Refusal { class: Priority::Normal, ..refused });
        }
        // Over the token limit: the limit's reason, always worth retrying.
        let (host, double) = global("reserve");
        let (_, token) = arrive(&host, double);
        answer(&host, double, token, &[(1, None), (2, Some(100)), (1, None)]);
        match event::take().as_slice() {
            [(ID, Event::GlobalRefused(r))] => assert_eq!((r.reason, r.retry), (Reason::GlobalLimit, true)),
            other => panic!("{other:?}"),
        }
    }
}
