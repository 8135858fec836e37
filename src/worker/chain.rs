//! The gate chain: every gate a request meets, in order, each with what it takes and, beside it,
//! what goes back when a later gate refuses. This file is the one place to read it.
//!
//! | # | gate | where | takes | when a later gate refuses |
//! |---|------|-------|-------|---------------------------|
//! | 1 | provider state (breaker, holds) | [`Worker::gate`], before `admit`; carried in [`Arrival::gate`] | under `Gate::Counted`, one of the requests the provider has left (after the bucket passes it) | nothing: the count is the provider's window, which a refusal here does not change |
//! | 2 | tenant bucket | [`Worker::admit`] step 2 | one token of the tenant's bucket and, with `tenant.tokens`, the request's LLM tokens, in one compare-and-swap (not the probe's, not under a terminal quota) | step 3 refuses: both go back (`give_tenant_token_back`); a later step refuses, or it leaves the queue without going: both go back ([`Worker::give_tenant_back`], from the host) |
//! | 3 | provider bucket | [`Worker::admit`] step 3 (arrival), `Worker::tick` (a waiter's release) | the request token and the request's LLM tokens (its bucket's, and `tokens.input` / `tokens.output`'s; from the lease, or one compare-and-swap), or a place in the queue | step 4 or 5 refuses: they go back ([`Worker::give_back`]) |
//! | 4 | quota windows (`quotas`: day, month; requests, tokens, money) | [`Worker::take_quotas`], from the host after step 3 passes or releases | the request's charge in every window, in one compare-and-swap | step 5 refuses: it goes back ([`Worker::give_quotas_back`]), with steps 2 and 3's |
//! | 5 | global gate (the rate limit service) | the host, `host/request.rs` `through_global` | the service's units | the last gate |
//!
//! What each step took is settled from the answer's `usage` when it ends (the host's
//! `Reservation`: [`Worker::settle`], [`Worker::settle_tenant`], [`Worker::settle_quotas`], and
//! the service's settlement).
//!
//! Before step 2 the host asks the global gate whether its key is over limit for longer than
//! the request may wait (`GlobalHost::blocked`): such a request is refused before it takes
//! anything. The half-open probe skips step 2 (it goes whatever its tenant spent: everything
//! waits for its answer) and takes at step 3 what the bucket has, maybe no request token: only
//! what it took goes back.

use super::{readout, Admission, Arrival, Decision, Readout, Refusal, Worker};
use crate::admission::TokenNeed;
use crate::breaker::Gate;
use crate::quota::{self, Charge, Exhausted};
use crate::reply::Reason;
use crate::store::{Status, Store};
use crate::tenants::{self, Slot, TakeOutcome, TenantTake};
use crate::time::{Duration, Instant};

impl Worker {
    /// Decides an arriving request: steps 2 and 3 of the chain (step 1's answer is `a.gate`;
    /// step 4 is the host's, and [`Worker::give_back`] its compensation).
    pub fn admit(&mut self, store: &impl Store, a: Arrival<'_>, now: Instant) -> Result<Decision, Status> {
        // 2. Tenant bucket: one token (and the LLM tokens) from the tenant's bucket; a request
        // needing more than the tenant's whole bucket can never pass.
        if let (Some((rules, _)), true) = (&self.tenants, takes_tenant_token(a.gate)) {
            let use_burst = self.config.class(a.class).use_burst;
            if tenants::too_large(rules, a.need.map_or(0, |n| n.tokens), use_burst) {
                let r = Refusal { retry: false, ..Refusal::of(a.id, a.class, Reason::TooLarge, Duration::ZERO, 0.0) };
                return Ok(Decision { admission: Admission::Refuse(r), readout: None, tenant: None });
            }
        }
        let tenant = self.take_tenant_token(store, &a, now)?;
        if let Some(t @ TakeOutcome { take: TenantTake::Short { wait, .. }, .. }) = tenant {
            let r = Refusal::of(a.id, a.class, Reason::TenantLimit, wait, 0.0);
            return Ok(Decision { admission: Admission::Refuse(r), readout: None, tenant: Some(t) });
        }
        // 3. In flight (`in_flight`): a slot, or the request meets the bucket as if the provider
        // held it for a slot's expected wait: it waits in the queue, or is refused.
        let mut a = a;
        let slot_short = match (&mut self.slots, a.gate) {
            (Some(slots), gate @ (Gate::Pass | Gate::Counted | Gate::Probe { .. })) => {
                slots.take(store, Some(a.id), matches!(gate, Gate::Probe { .. }), now)?.err()
            }
            // A request held or refused by the provider state takes no slot.
            _ => None,
        };
        if let Some(wait) = slot_short {
            let until = (now + wait).max(a.gate.not_before());
            a.gate = Gate::Hold { until };
        }
        // 3. Provider bucket: the request token and the LLM tokens, or a place in the queue
        // (a terminal quota refuses here before the bucket is read; the probe takes what is there).
        let (mut admission, readout) = self.admit_provider(store, &a, now)?;
        if !matches!(admission, Admission::Pass { .. }) {
            // A lost write keeps the slot spare for the tick to write back: the request's fate
            // stands.
            let _ = self.end_in_flight(store, a.id, None, || Some(now));
        }
        if let (Admission::Refuse(r), Some(_)) = (&mut admission, slot_short) {
            if r.reason == Reason::ProviderHold {
                r.reason = Reason::InFlightLimit;
            }
        }
        // 1. Provider state, counted once the bucket let it through.
        if let (Gate::Counted, Admission::Pass { .. }) = (a.gate, &admission) {
            self.provider.spend(store)?;
        }
        // 3 refused: 2's token goes back.
        if let (Admission::Refuse(_), Some(t)) = (&admission, &tenant) {
            self.give_tenant_token_back(store, &a, t, now);
        }
        Ok(Decision { admission, readout, tenant })
    }

    /// Step 4 refused: a request that step 3 let through (at its arrival or its release from the
    /// queue) gives back its request token and the `need` LLM tokens it reserved, to the shared
    /// bucket, now. `probe`: the probe number it went as, if it was the half-open probe: its
    /// request token goes back only if it took one. Returns the readout after the write.
    pub fn give_back(
        &mut self,
        store: &impl Store,
        probe: Option<u32>,
        need: Option<TokenNeed>,
        now: Instant,
    ) -> Result<Readout, Status> {
        let took_request = match probe {
            None => true,
            Some(n) => self.probe_took.take() == Some((n, true)),
        };
        let requests = if took_request { 1.0 } else { 0.0 };
        let mut tokens = vec![0.0; self.rules.token_buckets.len()];
        for (i, t) in need.map(|n| self.rules.draws(n)).unwrap_or_default().into_iter().flatten() {
            if let Some(slot) = tokens.get_mut(i) {
                *slot = t as f64;
            }
        }
        let (me, own, rules) = (self.id, self.local_counts(), &self.rules);
        self.bucket.update(store, rules, now, |s| {
            let next = rules.give_back(s, requests, &tokens, now);
            (readout(&next, next.waiting(me, own, now)), Some(next))
        })
    }

    /// Step 4: reserves `charge` in every quota window, all or none. `Ok(Err(_))`: a window has no
    /// room until its reset (a money budget: it is spent).
    pub fn take_quotas(
        &self,
        store: &impl Store,
        charge: &Charge,
        now: Instant,
    ) -> Result<Result<(), Exhausted>, Status> {
        quota::take(store, &self.quota_key, &self.config.quotas, charge, now)
    }

    /// Step 4's compensation: a later gate refused a request that reserved `charge` at
    /// `reserved_at`.
    pub fn give_quotas_back(&self, store: &impl Store, charge: &Charge, reserved_at: Instant, now: Instant) {
        if let Err(s) = quota::give_back(store, &self.quota_key, &self.config.quotas, charge, reserved_at, now) {
            log::debug!("llm-ratelimit: cannot give a quota reservation back: status {s}");
        }
    }

    /// The answer of a request that reserved `reserved` at `reserved_at` says it used `used`.
    pub fn settle_quotas(
        &self,
        store: &impl Store,
        reserved: &Charge,
        used: &Charge,
        reserved_at: Instant,
        now: Instant,
    ) -> Result<(), Status> {
        quota::settle(store, &self.quota_key, &self.config.quotas, reserved, used, reserved_at, now)
    }

    /// Each quota's use in its current window, for the gauges.
    pub fn quota_readout(&self, store: &impl Store, now: Instant) -> Result<Vec<(u64, u64, Instant)>, Status> {
        quota::readout(store, &self.quota_key, &self.config.quotas, now)
    }

    /// The answer of a request that took `reserved` LLM tokens from `tenant`'s bucket in `slot`
    /// says it used `used`: the difference goes back or is taken as a debt.
    pub fn settle_tenant(
        &self,
        store: &impl Store,
        tenant: &str,
        slot: Slot,
        reserved: u64,
        used: u64,
        now: Instant,
    ) -> Result<(), Status> {
        let Some((rules, prefix)) = &self.tenants else { return Ok(()) };
        tenants::settle(store, prefix, rules, tenant, slot, reserved, used, now).map(|_| ())
    }

    /// A later gate (quotas, the global gate) refused a request that took a token and `tokens`
    /// LLM tokens from `tenant`'s bucket in `slot`: they go back (best effort).
    pub fn give_tenant_back(&self, store: &impl Store, tenant: &str, slot: Slot, tokens: u64, now: Instant) {
        let Some((rules, prefix)) = &self.tenants else { return };
        if let Err(s) = tenants::refund(store, prefix, rules, tenant, slot, tokens, now) {
            log::debug!("llm-ratelimit: cannot give the tenant's tokens back: status {s}");
        }
    }

    /// Step 2: with tenant limits, takes a token from the arrival's tenant's bucket. The probe takes
    /// none: it goes whatever its tenant spent, since everything waits for its answer.
    fn take_tenant_token(&self, store: &impl Store, a: &Arrival, now: Instant) -> Result<Option<TakeOutcome>, Status> {
        let Some((rules, prefix)) = &self.tenants else { return Ok(None) };
        if !takes_tenant_token(a.gate) {
            return Ok(None);
        }
        let use_burst = self.config.class(a.class).use_burst;
        let tokens = a.need.map_or(0, |n| n.tokens);
        tenants::take(store, prefix, rules, a.tenant.unwrap_or(""), use_burst, tokens, now).map(Some)
    }

    /// Step 2's compensation: the provider-wide bucket refused `a`, its tenant's token goes back
    /// (best effort).
    fn give_tenant_token_back(&self, store: &impl Store, a: &Arrival, t: &TakeOutcome, now: Instant) {
        let Some((rules, prefix)) = &self.tenants else { return };
        let tokens = a.need.map_or(0, |n| n.tokens);
        if let Err(s) = tenants::refund(store, prefix, rules, a.tenant.unwrap_or(""), t.slot(), tokens, now) {
            log::debug!("llm-ratelimit: #{} cannot give the tenant's token back: status {s}", a.id);
        }
    }
}

/// Whether a request under `gate` meets the tenant bucket: not the probe (everything waits for
/// its answer), not under a terminal quota (refused at step 3 before anything is spent).
fn takes_tenant_token(gate: Gate) -> bool {
    !matches!(gate, Gate::Probe { .. } | Gate::Open { terminal: true, .. })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admission::SharedBucket;
    use crate::config::Config;
    use crate::priority::Priority;
    use crate::store::{self, MemStore};
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    const T0: u64 = 1_700_000_000_000;

    /// The bucket's request tokens and (with token limits) LLM tokens.
    fn levels(w: &Worker, store: &MemStore) -> (f64, f64) {
        let s: SharedBucket = store::read(store, w.bucket_key()).unwrap().unwrap();
        (s.level.tokens, s.token_levels.first().map_or(0.0, |l| l.tokens))
    }

    #[test]
    fn a_request_the_global_gate_refuses_gives_its_request_token_and_llm_tokens_back() {
        let json = r#"{"bucket":{"capacity":4,"refill_rate":0.001,"burst_allowance":0,"max_lease":1},"tokens":{"capacity":1000}}"#;
        let mut w = Worker::new(Config::parse(json.as_bytes()).unwrap(), 1);
        let store = MemStore::default();
        let now = Instant::from_millis(T0);
        w.ensure_shared(&store, now).unwrap();
        let need = Some(TokenNeed { bucket: 0, tokens: 300, input: 0 });
        let a = Arrival { id: 1, class: Priority::High, tenant: None, need, gate: Gate::Pass };
        assert_eq!(w.admit(&store, a, now).unwrap().admission, Admission::Pass { probe: None });
        assert_eq!(levels(&w, &store), (3.0, 700.0));
        w.give_back(&store, None, need, now).unwrap();
        assert_eq!(levels(&w, &store), (4.0, 1000.0));
    }

    #[test]
    fn the_probe_gives_back_only_the_request_token_it_took() {
        let json = r#"{"bucket":{"capacity":1,"refill_rate":0.001,"burst_allowance":0,"max_lease":1}}"#;
        let mut w = Worker::new(Config::parse(json.as_bytes()).unwrap(), 1);
        let store = MemStore::default();
        let now = Instant::from_millis(T0);
        w.ensure_shared(&store, now).unwrap();
        let probe =
            |id| Arrival { id, class: Priority::High, tenant: None, need: None, gate: Gate::Probe { probe: 7 } };
        // The bucket holds one token: the probe takes it, and gives it back.
        assert_eq!(w.admit(&store, probe(1), now).unwrap().admission, Admission::Pass { probe: Some(7) });
        assert_eq!(levels(&w, &store).0, 0.0);
        w.give_back(&store, Some(7), None, now).unwrap();
        assert_eq!(levels(&w, &store).0, 1.0);
        // Take it again with a request; the next probe finds none and gives none back.
        let a = Arrival { gate: Gate::Pass, ..probe(2) };
        assert_eq!(w.admit(&store, a, now).unwrap().admission, Admission::Pass { probe: None });
        assert_eq!(w.admit(&store, probe(3), now).unwrap().admission, Admission::Pass { probe: Some(7) });
        w.give_back(&store, Some(7), None, now).unwrap();
        assert!(levels(&w, &store).0 < 0.01, "no token minted");
    }
}
