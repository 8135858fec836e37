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

/// One declared stat, as the README's `## Stats` table documents it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stat {
    /// Its full name, with `<name>` for the filter's name and `<class>` for each priority class.
    pub name: &'static str,
    pub kind: Metric,
    pub help: &'static str,
}

/// The stats table. Each group is a struct; each row one stat: `field, "name", Type, "help";`,
/// named under `llm_ratelimit.provider.<name>.` (and the group's `under` prefix). It generates
/// the struct (the help is the field's doc), its `define_under` (one `Id::named` call a stat, in
/// row order; fields in parentheses are built by the caller and passed in), and `STATS`, the
/// table as data. A new stat is one row here and one in the README's `## Stats` table, which
/// `tests/stats.rs` checks against the stats the filter defines (the unit tests below check those
/// are this table's).
macro_rules! stats {
    ($(
        $(#[$attr:meta])*
        pub struct $group:ident $(under $prefix:literal)? $(( $($part:ident: $part_ty:ty),* $(,)? ))? {
            $($row:tt)*
        }
    )*) => {
        $(stats! { @group [$($prefix)?] $(#[$attr])* pub struct $group ($($($part: $part_ty),*)?) { $($row)* } })*

        /// Every stat, group by group, in row order.
        #[allow(dead_code)] // read by the unit tests only: the .wasm has no use for help texts
        pub const STATS: &[&[Stat]] = &[$($group::STATS),*];
    };
    (@group [] $($rest:tt)*) => {
        stats! { @group [""] $($rest)* }
    };
    (@group [$prefix:literal] $(#[$attr:meta])* pub struct $group:ident ($($part:ident: $part_ty:ty),*) {
        $($field:ident, $name:literal, $kind:ident, $help:literal;)*
    }) => {
        $(#[$attr])*
        pub struct $group {
            $(pub $part: $part_ty,)*
            $(#[doc = $help] pub $field: Id,)*
        }

        impl $group {
            const STATS: &'static [Stat] = &[$(Stat {
                name: concat!("llm_ratelimit.provider.<name>.", $prefix, $name),
                kind: Metric::$kind,
                help: $help,
            }),*];

            /// Defines the group's stats as `<base>.<name>`.
            fn define_under(base: &str, $($part: $part_ty),*) -> $group {
                $group { $($part,)* $($field: Id::named(Metric::$kind, base, $name),)* }
            }
        }
    };
}

stats! {
    /// Stats for one priority class.
    #[derive(Clone, Copy)]
    pub struct ClassStats under "priority.<class>." {
        admitted, "admitted", Counter, "Let through, at once or after waiting.";
        rejected, "rejected", Counter, "Refused with a local 429 other than `expired` and `shed`.";
        queued, "queued", Counter, "Paused to wait for a token.";
        released, "released", Counter, "Let through after waiting.";
        shed, "shed", Counter, "Evicted from the queue for a more important request.";
        expired, "expired", Counter, "Waited its class's maximum, or for its own body.";
        cancelled, "cancelled", Counter, "Client went away (or Envoy answered it) while it waited.";
        queue_depth, "queue_depth", Gauge, "Requests waiting now, process-wide.";
        queue_wait_ms, "queue_wait_ms", Histogram, "Milliseconds waited by released requests.";
        retry_attempts, "retry.attempts", Counter, "Router attempts after the first (retries) that went upstream.";
        retry_succeeded, "retry.succeeded", Counter, "Retried requests whose last attempt succeeded (2xx).";
        retry_exhausted, "retry.exhausted", Counter, "Retried requests that ended on a 429: the router gave up.";
        failover, "failover", Counter, "Sent to a `failover` target instead of the primary.";
    }

    /// Stats of one `failover` target (defined per target, beside the primary's).
    #[derive(Clone, Copy)]
    pub struct TargetStats under "failover.<target>." {
        sent, "sent", Counter, "Requests sent to this target because the primary could not serve them now.";
        refused, "refused", Counter,
            "Requests this target could not take at once (its breaker, hold, buckets or slots): tried next, or left with the primary.";
    }

    /// Stats of the provider behind this filter.
    pub struct ProviderStats {
        upstream_429, "upstream_429", Counter, "429s the provider answered (every attempt, when an observer runs).";
        breaker_trips, "breaker.trips", Counter, "Times the breaker opened.";
        breaker_probes, "breaker.probes", Counter, "Half-open probes let through.";
        breaker_state, "breaker.state", Gauge, "0 closed, 1 open, 2 half-open.";
        terminal_quota, "terminal_quota", Counter,
            "Provider answers that were terminal quotas (insufficient_quota, spend or daily limits).";
        throttled, "throttled", Counter,
            "Successes that reported the quota used up (or low): requests held until the reset.";
        retry_after_s, "retry_after_s", Histogram,
            "Seconds of every `Retry-After` sent to clients, local or rewritten.";
        reset_accurate, "reset.accurate", Counter,
            "The first answer after a hold or trip succeeded: the reset we used was right.";
        reset_early, "reset.early", Counter,
            "The first answer after a hold or trip was a 429 again: the reset we used was early.";
        reset_error_ms, "reset.error_ms", Histogram,
            "How far the provider's later answers placed the reset from the one we used (ms).";
        fallback_served, "fallback.served", Counter,
            "Requests answered from the fallback cache while the breaker was open.";
        fallback_stored, "fallback.stored", Counter, "Successful responses stored in the fallback cache.";
        retry_succeeded_attempt, "retry.succeeded_attempt", Histogram, "Which attempt a retried request succeeded on.";
        alerts_sent, "alerts.sent", Counter, "Alerts the receiver took (2xx).";
        alerts_failed, "alerts.failed", Counter, "Alerts that failed (no cluster, no answer, not 2xx).";
        remaining_requests, "provider.remaining_requests", Gauge,
            "The provider's remaining requests, from its last answer.";
        remaining_tokens, "provider.remaining_tokens", Gauge, "The provider's remaining tokens, from its last answer.";
        limit_requests, "provider.limit_requests", Gauge, "The provider's request limit, from its last answer.";
        limit_tokens, "provider.limit_tokens", Gauge, "The provider's token limit, from its last answer.";
    }

    /// Stats of the token limit (when `tokens` is configured).
    pub struct TokenStats {
        estimated, "tokens.estimated", Counter, "Tokens reserved by estimate for admitted requests.";
        actual, "tokens.actual", Counter,
            "Tokens the provider reported used (or charged without a report), input plus output.";
        input, "tokens.input", Counter, "The input part of `actual`.";
        output, "tokens.output", Counter, "The output part of `actual`.";
        estimate_error_pct, "tokens.estimate_error_pct", Histogram,
            "|actual - estimate| as a percentage of the estimate, per settled request.";
        bucket, "tokens.bucket", Gauge, "Whole tokens left in the provider's token bucket after the last decision.";
        too_large, "tokens.too_large", Counter,
            "Requests refused because their estimate exceeds the whole token bucket (or their tenant's).";
        spent, "cost.spent_micro_usd", Counter,
            "Micro-dollars settled requests cost at `prices` (their usage, else their estimate).";
        budget_refused, "cost.budget_refused", Counter,
            "Requests refused because a money budget was spent (a `usd` quota, or the service's `unit=cost`).";
        unpriced, "cost.unpriced", Counter, "Requests refused because `prices` has no price for their model.";
        quota_refused, "quota.refused", Counter, "Requests refused by a `quotas` window of requests or tokens.";
    }

    /// Stats of the tenant table (when tenant limits are on).
    pub struct TenantStats {
        claimed, "tenants.claimed", Counter, "Tenants that claimed a free slot.";
        displaced, "tenants.displaced", Counter,
            "Tenants that took the slot of an idle tenant whose bucket had refilled.";
        overflow, "tenants.overflow", Counter,
            "Requests that spent from the shared overflow bucket (table full of active tenants).";
        limited, "tenants.limited", Counter, "Requests refused because their tenant's bucket was empty.";
        slots, "tenants.slots", Gauge, "Slots in the table.";
        slots_used, "tenants.slots_used", Gauge, "Slots holding a tenant, counted every few seconds.";
    }

    /// Stats of the global gate (when `global` is configured).
    #[derive(Clone, Copy)]
    pub struct GlobalStats {
        calls, "global.calls", Counter, "Calls sent to the rate limit service.";
        over_limit, "global.over_limit", Counter, "Answers that said over limit for a unit.";
        errors, "global.errors", Counter, "Calls that failed (error status, unreadable answer, not sent).";
        timeouts, "global.timeouts", Counter, "Calls not answered in `timeout_ms`.";
        fallback, "global.fallback", Counter,
            "Requests let through without the service's word after a failure (`local`, `allow`).";
        waited, "global.waited", Counter, "Requests that waited for a call or a reset.";
        rejected, "global.rejected", Counter, "Requests refused by the gate.";
        lease_units, "global.lease_units", Counter, "Request units leased ahead of need.";
        lease_tokens, "global.lease_tokens", Counter, "LLM token units leased ahead of need.";
        expired, "global.expired", Counter, "Leased request units dropped unspent.";
        expired_tokens, "global.expired_tokens", Counter, "Leased LLM token units dropped unspent.";
        settle_calls, "global.settle_calls", Counter, "Settlement calls sent (one per key and tick, or at once for cost).";
        settle_errors, "global.settle_errors", Counter, "Settlement calls that failed or could not be sent.";
        settle_dropped, "global.settle_dropped", Counter,
            "Requests whose settlement was dropped (over 1024 keys at once).";
        refunded_tokens, "global.refunded_tokens", Counter, "LLM tokens refunded to the service (`reserve`).";
        charged_tokens, "global.charged_tokens", Counter, "LLM tokens charged to the service after the answer.";
        charged_cost, "global.charged_cost", Counter, "Micro-dollars charged to the service after the answer.";
        latency_ms, "global.latency_ms", Histogram, "Milliseconds from a call to its answer.";
    }

    /// Every stat of the filter: the groups above (defined first, by `Metrics::define`) and its
    /// own.
    pub struct Metrics (
        class: [ClassStats; 4],
        global: GlobalStats,
        provider: ProviderStats,
        tenants: TenantStats,
        tokens: TokenStats,
    ) {
        bucket_tokens, "bucket.tokens", Gauge, "Whole tokens left in the process-wide bucket after the last decision.";
        leases, "bucket.leases", Counter, "Leases a worker took.";
        leased, "bucket.leased", Counter, "Request tokens the leases held.";
        in_flight, "in_flight", Gauge, "Requests at the provider now, process-wide (`in_flight`; written each tick).";
        in_flight_limit, "in_flight.limit", Gauge, "The in-flight limit now (`in_flight`; adaptive: where it has moved).";
        in_flight_raised, "in_flight.raised", Counter, "Times the adaptive limit rose (by 1 / limit).";
        in_flight_cut, "in_flight.cut", Counter,
            "Times the adaptive limit was cut (a 429, 503 or 504, or headers later than `tolerance` × the baseline).";
        cas_conflicts, "shared.cas_conflicts", Counter,
            "Shared-data writes that lost their compare-and-swap (and were decided again).";
        errors, "errors", Counter, "Host calls that failed; the filter let the request through (fail open).";
    }
}

impl Metrics {
    pub fn define(name: &str) -> Metrics {
        // The names `STATS` gives (`<name>`, `<class>` filled in): the unit tests check they agree.
        let base = format!("llm_ratelimit.provider.{name}");
        let class = Priority::ALL.map(|p| ClassStats::define_under(&format!("{base}.priority.{}", p.stat_name())));
        let provider = ProviderStats::define_under(&base);
        let tokens = TokenStats::define_under(&base);
        let tenants = TenantStats::define_under(&base);
        let global = GlobalStats::define_under(&base);
        Metrics::define_under(&base, class, global, provider, tenants, tokens)
    }

    /// The stats of failover target `target` of filter `name`.
    pub fn of_target(name: &str, target: &str) -> TargetStats {
        TargetStats::define_under(&format!("llm_ratelimit.provider.{name}.failover.{target}"))
    }

    pub fn of(&self, p: Priority) -> &ClassStats {
        &self.class[p.index()]
    }

    /// Publishes the process-wide queue depths just written to shared data.
    pub fn depths(&self, waiting: [u32; 4]) {
        for p in Priority::ALL {
            self.of(p).queue_depth.record(u64::from(waiting[p.index()]));
        }
    }
}

#[cfg(all(test, not(target_arch = "wasm32")))]
mod tests {
    use super::*;
    use crate::host::calls::install;
    use crate::host::double::{Double, Process};

    /// The table's stats as named for filter `name`: (full name, type), `<class>` expanded.
    fn expanded(name: &str) -> Vec<(String, Metric)> {
        let mut out = Vec::new();
        // Per-target stats are defined per `failover` target, not by `Metrics::define`.
        for s in STATS.iter().copied().flatten().filter(|s| !s.name.contains("<target>")) {
            let full = s.name.replace("<name>", name);
            for p in Priority::ALL {
                out.push((full.replace("<class>", p.stat_name()), s.kind));
                if !full.contains("<class>") {
                    break;
                }
            }
        }
        out
    }

    /// `Metrics::define` on a host double of its own; the double records every definition.
    fn defined(name: &str) -> (Metrics, &'static Double) {
        let host: &'static Double = Box::leak(Box::new(Double::new(Process::new(0), 1, "")));
        install(host);
        (Metrics::define(name), host)
    }

    fn name_of(host: &Double, id: Id) -> String {
        host.state().metrics[id.0.expect("defined") as usize].0.clone()
    }

    #[test]
    fn define_defines_every_stat_of_the_table_with_its_type_and_no_other() {
        let (_, host) = defined("p");
        let mut got: Vec<(String, Metric)> = host.state().metrics.iter().map(|(n, k, _)| (n.clone(), *k)).collect();
        let mut want = expanded("p");
        got.sort_by(|a, b| a.0.cmp(&b.0));
        want.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(got, want);
        assert!(want.len() > 80, "{}", want.len());
    }

    #[test]
    fn each_field_holds_the_stat_of_its_row() {
        let (m, host) = defined("p");
        let base = "llm_ratelimit.provider.p";
        assert_eq!(name_of(host, m.of(Priority::Low).admitted), format!("{base}.priority.low.admitted"));
        assert_eq!(
            name_of(host, m.of(Priority::Critical).retry_exhausted),
            format!("{base}.priority.critical.retry.exhausted")
        );
        assert_eq!(name_of(host, m.provider.upstream_429), format!("{base}.upstream_429"));
        assert_eq!(name_of(host, m.provider.limit_tokens), format!("{base}.provider.limit_tokens"));
        assert_eq!(name_of(host, m.tokens.bucket), format!("{base}.tokens.bucket"));
        assert_eq!(name_of(host, m.tenants.slots_used), format!("{base}.tenants.slots_used"));
        assert_eq!(name_of(host, m.global.latency_ms), format!("{base}.global.latency_ms"));
        assert_eq!(name_of(host, m.errors), format!("{base}.errors"));
        assert_eq!(name_of(host, m.leased), format!("{base}.bucket.leased"));
    }

    #[test]
    fn every_row_is_named_once_and_has_help() {
        let all: Vec<&Stat> = STATS.iter().copied().flatten().collect();
        for (i, s) in all.iter().enumerate() {
            let stat = s.name.strip_prefix("llm_ratelimit.provider.<name>.").expect(s.name);
            let plain = stat.replace("<class>", "c").replace("<target>", "t");
            assert!(
                plain.split('.').all(|part| !part.is_empty()
                    && part.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')),
                "{}",
                s.name
            );
            assert!(!s.help.trim().is_empty(), "{} has no help", s.name);
            assert!(all[..i].iter().all(|t| t.name != s.name), "{} twice", s.name);
        }
    }
}
