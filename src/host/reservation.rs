//! What an admitted request holds at the gates of the chain (`worker::chain`), until its answer
//! settles it, or a later gate refuses it and every earlier gate gets its part back.

use super::global::GlobalNeed;
use super::shared::SharedData;
use super::worker::WorkerContext;
use crate::admission::TokenNeed;
use crate::quota::Charge;
use crate::tenants::Slot;
use crate::time::Instant;
use crate::tokens::meter::{self, Meter, Used};
use crate::tokens::price::Price;

#[derive(Debug, Default)]
pub struct Reservation {
    /// The tenant, and the slot whose bucket its token and LLM tokens came from (step 2).
    pub tenant: Option<(String, Slot)>,
    /// Its LLM tokens in the provider's token buckets (step 3), with what the answer says.
    pub meter: Option<Meter>,
    /// Its charge in the quota windows, and when it was reserved (step 4).
    pub quota: Option<(Charge, Instant)>,
    /// Its key and units at the rate limit service (step 5), to settle there too.
    pub global: Option<GlobalNeed>,
    /// Its model's price, when `prices` is configured.
    pub price: Option<Price>,
    /// The failover target it went to (`None`: the primary): whose core settles it.
    pub target: Option<u8>,
}

/// What `need` (or a request without token limits) counts in the quota windows, at `price`.
pub fn charge(need: Option<TokenNeed>, price: Option<&Price>) -> Charge {
    let (input, output) = need.map_or((0, 0), |n| (n.input, n.output()));
    Charge { requests: 1, input, output, micro_usd: price.map_or(0, |p| p.cost(input, output, 0)) }
}

/// What a request that used `used` counts, at `price`; cache reads count as input unless
/// `count_cached_input` is off (as Anthropic counts its input limit).
fn used_charge(used: &Used, price: Option<&Price>, count_cached_input: bool) -> Charge {
    let input = if count_cached_input { used.input } else { used.input.saturating_sub(used.cached_input) };
    let micro_usd = price.map_or(0, |p| p.cost(used.input, used.output, used.cached_input));
    Charge { requests: 1, input, output: used.output, micro_usd }
}

impl Reservation {
    /// A gate after the provider bucket refused it (or it left while waiting for the global
    /// gate): its request token (`probe`: if the probe took one), LLM tokens, tenant token and
    /// quota charge go back. Nothing is settled at its end.
    pub fn give_back(&mut self, w: &WorkerContext, probe: Option<u32>, now: Instant) {
        let need = self.meter.take().map(|m| m.need);
        w.give_back(probe, need, now);
        self.give_tenant_back(w, need, now);
        if let Some((c, at)) = self.quota.take() {
            let _ = w.with_core(|core| {
                core.give_quotas_back(&SharedData, &c, at, now);
                Ok(())
            });
        }
        self.global = None;
    }

    /// It never went (it left the queue, or was refused there): its tenant token and the
    /// `need`ed LLM tokens it took at arrival go back.
    pub fn give_tenant_back(&mut self, w: &WorkerContext, need: Option<TokenNeed>, now: Instant) {
        if let Some((tenant, slot)) = self.tenant.take() {
            let tokens = need.map_or(0, |n| n.tokens);
            let _ = w.with_core(|core| {
                core.give_tenant_back(&SharedData, &tenant, slot, tokens, now);
                Ok(())
            });
        }
    }

    /// Its answer is over, or will never come: what it used settles every gate it reserved at.
    /// `clock` is read only for a tenant's or a quota window's settlement: a request with
    /// neither pays no clock call.
    pub fn settle(&mut self, w: &WorkerContext, clock: impl FnOnce() -> Instant) {
        let Some(mut m) = self.meter.take() else { return };
        let now = (self.tenant.is_some() || self.quota.is_some()).then(clock);
        let used = m.used();
        let need = m.need;
        let count_cached = w.config.tokens.as_ref().is_some_and(|t| t.count_cached_input);
        let spent = used_charge(&used, self.price.as_ref(), count_cached);
        let settled = w.with_target_mut(self.target, |core| {
            core.settle(need, &used);
            if let (Some((tenant, slot)), Some(now)) = (&self.tenant, now) {
                core.settle_tenant(&SharedData, tenant, *slot, need.tokens, used.total(), now)?;
            }
            if let (Some((reserved, at)), Some(now)) = (&self.quota, now) {
                core.settle_quotas(&SharedData, reserved, &spent, *at, now)?;
            }
            Ok(())
        });
        if let Err(s) = settled {
            w.metrics.errors.inc();
            log::warn!("llm-ratelimit: {}: cannot settle a request's tokens: status {s}", w.name());
        }
        if let (Some(g), Some(gate)) = (&self.global, &w.global) {
            gate.settle(g, used.total(), spent.micro_usd);
        }
        let t = &w.metrics.tokens;
        t.estimated.add(need.tokens);
        t.actual.add(used.total());
        t.input.add(used.input);
        t.output.add(used.output);
        if self.price.is_some() {
            t.spent.add(spent.micro_usd);
        }
        if used.reported {
            t.estimate_error_pct.record(meter::error_pct(need.tokens, used.total()));
        }
        self.tenant = None;
        self.quota = None;
        self.global = None;
    }
}
