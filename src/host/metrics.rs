//! The filter's stats, defined once per worker VM. Names carry the dimensions
//! (`llm_ratelimit.provider.<name>.priority.<class>.<stat>`) because the ABI has no tags; the
//! `stats_tags` in `envoy/` turn them into Prometheus labels.

use super::api::Metric;
use super::calls::host;
use super::vm_local::vm_local;
use crate::priority::Priority;
use std::cell::RefCell;

vm_local! {
    /// Counter increments not yet written: (metric id, amount). Counters are written on the next
    /// tick, not on every request (a host call each); they lag by at most one `tick_ms`. A VM
    /// runs on one worker thread, so this is per worker VM.
    static PENDING: RefCell<Pending> = RefCell::new(Vec::new());
}

/// Counter increments: (metric id, amount).
type Pending = Vec<(u32, u64)>;

/// Runs `f` on the pending increments (one non-generic access: each `with` is code).
fn with_pending(f: &mut dyn FnMut(&mut Pending)) {
    PENDING.with(|p| {
        if let Ok(mut p) = p.try_borrow_mut() {
            f(&mut p);
        }
    });
}

/// Writes every pending counter increment (each tick).
pub fn flush() {
    let mut pending = Vec::new();
    with_pending(&mut |p| std::mem::swap(p, &mut pending));
    for (id, n) in pending {
        if let Err(s) = host().increment_metric(id, n.min(i64::MAX as u64) as i64) {
            log::debug!("llm-ratelimit: increment_metric {id} failed: status {s}");
        }
    }
}

/// A defined metric, or `None` when the host refused to define it (then it is skipped).
#[derive(Clone, Copy, Default)]
pub struct Id(Option<u32>);

impl Id {
    /// `<base>.<stat>`; one out-of-line call per stat keeps `Metrics::define` small.
    #[inline(never)]
    fn named(kind: Metric, base: &str, stat: &str) -> Id {
        Id::define(kind, &format!("{base}.{stat}"))
    }

    fn define(kind: Metric, name: &str) -> Id {
        match host().define_metric(kind, name) {
            Ok(id) => Id(Some(id)),
            Err(s) => {
                log::error!("llm-ratelimit: cannot define metric {name}: status {s}");
                Id(None)
            }
        }
    }

    pub fn inc(self) {
        self.add(1);
    }

    /// Adds `n` to a counter, written on the next tick. Out of line: it is called from dozens of
    /// places.
    #[inline(never)]
    pub fn add(self, n: u64) {
        let (Some(id), true) = (self.0, n > 0) else { return };
        with_pending(&mut |p| match p.iter_mut().find(|(i, _)| *i == id) {
            Some((_, total)) => *total = total.saturating_add(n),
            None => p.push((id, n)),
        });
    }

    /// Sets a gauge or records a histogram sample.
    #[inline(never)]
    pub fn record(self, value: u64) {
        if let Some(id) = self.0 {
            if let Err(s) = host().record_metric(id, value) {
                log::debug!("llm-ratelimit: record_metric {id} failed: status {s}");
            }
        }
    }
}

/// Stats for one priority class.
#[derive(Clone, Copy)]
pub struct ClassStats {
    /// Let through, at once or after waiting.
    pub admitted: Id,
    /// Refused on arrival (no token and may not wait, or its queue was full).
    pub rejected: Id,
    pub queued: Id,
    /// Let through after waiting.
    pub released: Id,
    /// Evicted from the queue for a more important request.
    pub shed: Id,
    /// Waited its class's maximum.
    pub expired: Id,
    /// Client went away while waiting.
    pub cancelled: Id,
    /// Requests waiting now, process-wide (gauge).
    pub queue_depth: Id,
    /// Milliseconds waited by released requests (histogram).
    pub queue_wait_ms: Id,
    /// Router attempts after the first (retries) that reached the upstream filters.
    pub retry_attempts: Id,
    /// Retried requests whose last attempt succeeded (2xx).
    pub retry_succeeded: Id,
    /// Retried requests that ended on a 429 or 503 (the router gave up).
    pub retry_exhausted: Id,
}

/// Stats of the provider behind this filter.
pub struct ProviderStats {
    /// 429s the provider answered (after Envoy's router retries).
    pub upstream_429: Id,
    /// Times the breaker opened.
    pub breaker_trips: Id,
    /// Half-open probes let through.
    pub breaker_probes: Id,
    /// 0 closed, 1 open, 2 half-open (gauge).
    pub breaker_state: Id,
    /// Provider answers that were terminal quotas (insufficient_quota, spend or daily limits).
    pub terminal_quota: Id,
    /// Successes that reported the quota used up (or low): requests held until the reset.
    pub throttled: Id,
    /// Seconds of every `Retry-After` sent to clients, local or rewritten (histogram).
    pub retry_after_s: Id,
    /// The first answer after a hold or trip succeeded: the reset we used was right.
    pub reset_accurate: Id,
    /// The first answer after a hold or trip was a 429 again: the reset we used was early.
    pub reset_early: Id,
    /// How far the provider's later answers placed the reset from the one we used (histogram).
    pub reset_error_ms: Id,
    /// Requests answered from the fallback cache while the breaker was open.
    pub fallback_served: Id,
    /// Successful responses stored in the fallback cache.
    pub fallback_stored: Id,
    /// Alerts the receiver took (2xx), and alerts that failed (no answer, not 2xx, no cluster).
    pub alerts_sent: Id,
    pub alerts_failed: Id,
    /// Which attempt a retried request succeeded on (histogram).
    pub retry_succeeded_attempt: Id,
    /// The provider's own view, from the last answer that carried it (gauges).
    pub remaining_requests: Id,
    pub remaining_tokens: Id,
    pub limit_requests: Id,
    pub limit_tokens: Id,
}

/// Stats of the token limit (when `tokens` is configured).
pub struct TokenStats {
    /// Tokens reserved by estimate for admitted requests.
    pub estimated: Id,
    /// Tokens the provider reported used (or charged without a report), input plus output.
    pub actual: Id,
    pub input: Id,
    pub output: Id,
    /// |actual - estimate| as a percentage of the estimate, per reconciled request (histogram).
    pub estimate_error_pct: Id,
    /// Whole tokens left in the provider's token bucket after the last decision (gauge).
    pub bucket: Id,
    /// Requests refused because their estimate exceeds the whole token bucket.
    pub too_large: Id,
}

/// Stats of the tenant table (when tenant limits are on).
pub struct TenantStats {
    /// Tenants that claimed a free slot.
    pub claimed: Id,
    /// Tenants that took the slot of an idle tenant whose bucket had refilled.
    pub displaced: Id,
    /// Requests that spent from the shared overflow bucket (table full of active tenants).
    pub overflow: Id,
    /// Requests refused because their tenant's bucket was empty.
    pub limited: Id,
    /// Slots in the table (gauge).
    pub slots: Id,
    /// Slots holding a tenant, counted every few seconds (gauge).
    pub slots_used: Id,
}

/// Stats of the global gate (when `global` is configured).
#[derive(Clone, Copy)]
pub struct GlobalStats {
    /// Calls sent to the rate limit service.
    pub calls: Id,
    /// Answers that said over limit for a unit.
    pub over_limit: Id,
    /// Calls that failed (error status, unreadable answer, not sent), and calls not answered in
    /// `timeout_ms`.
    pub errors: Id,
    pub timeouts: Id,
    /// Requests let through without the service's word after a failure (`local`, `allow`).
    pub fallback: Id,
    /// Requests that waited for a call or a reset, and requests refused by the gate.
    pub waited: Id,
    pub rejected: Id,
    /// Units leased ahead of need, and leased units dropped unspent (requests, LLM tokens).
    pub lease_units: Id,
    pub lease_tokens: Id,
    pub expired: Id,
    pub expired_tokens: Id,
    /// Milliseconds from a call to its answer (histogram).
    pub latency_ms: Id,
}

pub struct Metrics {
    pub class: [ClassStats; 4],
    pub global: GlobalStats,
    pub provider: ProviderStats,
    pub tenants: TenantStats,
    pub tokens: TokenStats,
    /// Whole tokens left in the process-wide bucket after the last decision (gauge).
    pub bucket_tokens: Id,
    /// Leases a worker took, and the request tokens they held.
    pub leases: Id,
    pub leased: Id,
    /// Shared-data writes that lost their compare-and-swap (and were decided again).
    pub cas_conflicts: Id,
    /// Host calls that failed; the filter let the request through (fail open).
    pub errors: Id,
}

impl Metrics {
    pub fn define(name: &str) -> Metrics {
        let base = format!("llm_ratelimit.provider.{name}");
        let class = Priority::ALL.map(|p| {
            let class = format!("{base}.priority.{}", p.stat_name());
            let at = |kind, stat: &str| Id::named(kind, &class, stat);
            ClassStats {
                admitted: at(Metric::Counter, "admitted"),
                rejected: at(Metric::Counter, "rejected"),
                queued: at(Metric::Counter, "queued"),
                released: at(Metric::Counter, "released"),
                shed: at(Metric::Counter, "shed"),
                expired: at(Metric::Counter, "expired"),
                cancelled: at(Metric::Counter, "cancelled"),
                queue_depth: at(Metric::Gauge, "queue_depth"),
                queue_wait_ms: at(Metric::Histogram, "queue_wait_ms"),
                retry_attempts: at(Metric::Counter, "retry.attempts"),
                retry_succeeded: at(Metric::Counter, "retry.succeeded"),
                retry_exhausted: at(Metric::Counter, "retry.exhausted"),
            }
        });
        let at = |kind, stat: &str| Id::named(kind, &base, stat);
        let provider = ProviderStats {
            upstream_429: at(Metric::Counter, "upstream_429"),
            breaker_trips: at(Metric::Counter, "breaker.trips"),
            breaker_probes: at(Metric::Counter, "breaker.probes"),
            breaker_state: at(Metric::Gauge, "breaker.state"),
            terminal_quota: at(Metric::Counter, "terminal_quota"),
            throttled: at(Metric::Counter, "throttled"),
            retry_after_s: at(Metric::Histogram, "retry_after_s"),
            reset_accurate: at(Metric::Counter, "reset.accurate"),
            reset_early: at(Metric::Counter, "reset.early"),
            reset_error_ms: at(Metric::Histogram, "reset.error_ms"),
            fallback_served: at(Metric::Counter, "fallback.served"),
            fallback_stored: at(Metric::Counter, "fallback.stored"),
            retry_succeeded_attempt: at(Metric::Histogram, "retry.succeeded_attempt"),
            alerts_sent: at(Metric::Counter, "alerts.sent"),
            alerts_failed: at(Metric::Counter, "alerts.failed"),
            remaining_requests: at(Metric::Gauge, "provider.remaining_requests"),
            remaining_tokens: at(Metric::Gauge, "provider.remaining_tokens"),
            limit_requests: at(Metric::Gauge, "provider.limit_requests"),
            limit_tokens: at(Metric::Gauge, "provider.limit_tokens"),
        };
        let tokens = TokenStats {
            estimated: at(Metric::Counter, "tokens.estimated"),
            actual: at(Metric::Counter, "tokens.actual"),
            input: at(Metric::Counter, "tokens.input"),
            output: at(Metric::Counter, "tokens.output"),
            estimate_error_pct: at(Metric::Histogram, "tokens.estimate_error_pct"),
            bucket: at(Metric::Gauge, "tokens.bucket"),
            too_large: at(Metric::Counter, "tokens.too_large"),
        };
        let tenants = TenantStats {
            claimed: at(Metric::Counter, "tenants.claimed"),
            displaced: at(Metric::Counter, "tenants.displaced"),
            overflow: at(Metric::Counter, "tenants.overflow"),
            limited: at(Metric::Counter, "tenants.limited"),
            slots: at(Metric::Gauge, "tenants.slots"),
            slots_used: at(Metric::Gauge, "tenants.slots_used"),
        };
        let global = GlobalStats {
            calls: at(Metric::Counter, "global.calls"),
            over_limit: at(Metric::Counter, "global.over_limit"),
            errors: at(Metric::Counter, "global.errors"),
            timeouts: at(Metric::Counter, "global.timeouts"),
            fallback: at(Metric::Counter, "global.fallback"),
            waited: at(Metric::Counter, "global.waited"),
            rejected: at(Metric::Counter, "global.rejected"),
            lease_units: at(Metric::Counter, "global.lease_units"),
            lease_tokens: at(Metric::Counter, "global.lease_tokens"),
            expired: at(Metric::Counter, "global.expired"),
            expired_tokens: at(Metric::Counter, "global.expired_tokens"),
            latency_ms: at(Metric::Histogram, "global.latency_ms"),
        };
        Metrics {
            class,
            global,
            provider,
            tenants,
            tokens,
            bucket_tokens: at(Metric::Gauge, "bucket.tokens"),
            leases: at(Metric::Counter, "bucket.leases"),
            leased: at(Metric::Counter, "bucket.leased"),
            cas_conflicts: at(Metric::Counter, "shared.cas_conflicts"),
            errors: at(Metric::Counter, "errors"),
        }
    }

    pub fn of(&self, p: Priority) -> &ClassStats {
        &self.class[p.index()]
    }

    /// Publishes the process-wide queue depths just written to shared data.
    pub fn levels(&self, waiting: [u32; 4]) {
        for p in Priority::ALL {
            self.of(p).queue_depth.record(u64::from(waiting[p.index()]));
        }
    }
}
