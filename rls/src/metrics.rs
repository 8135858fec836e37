//! Counters and the Redis latency histogram, written in the Prometheus text format for /metrics.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// Upper bounds of the latency buckets, in seconds.
const BUCKETS: [f64; 10] = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0];

#[derive(Default)]
pub struct Metrics {
    pub requests: AtomicU64,
    pub over_limit: AtomicU64,
    pub shadow_over_limit: AtomicU64,
    pub descriptors_ok: AtomicU64,
    pub descriptors_over_limit: AtomicU64,
    pub descriptors_no_limit: AtomicU64,
    pub redis_errors: AtomicU64,
    pub overloaded: AtomicU64,
    pub invalid_requests: AtomicU64,
    pub settles_refund: AtomicU64,
    pub settles_charge: AtomicU64,
    pub units_refunded: AtomicU64,
    pub units_charged: AtomicU64,
    latency_buckets: [AtomicU64; BUCKETS.len()],
    latency_count: AtomicU64,
    latency_sum_us: AtomicU64,
}

impl Metrics {
    pub fn observe_redis(&self, took: Duration) {
        let secs = took.as_secs_f64();
        if let Some(i) = BUCKETS.iter().position(|&b| secs <= b) {
            self.latency_buckets[i].fetch_add(1, Relaxed);
        }
        self.latency_count.fetch_add(1, Relaxed);
        self.latency_sum_us.fetch_add(took.as_micros() as u64, Relaxed);
    }

    pub fn render(&self) -> String {
        let mut out = String::with_capacity(2048);
        let counters = [
            ("rls_requests_total", "ShouldRateLimit calls answered", &self.requests),
            ("rls_over_limit_total", "Calls answered OVER_LIMIT", &self.over_limit),
            (
                "rls_shadow_over_limit_total",
                "Descriptors over their limit in shadow_mode (answered OK)",
                &self.shadow_over_limit,
            ),
            ("rls_descriptors_ok_total", "Descriptors within their limit", &self.descriptors_ok),
            ("rls_descriptors_over_limit_total", "Descriptors over their limit", &self.descriptors_over_limit),
            ("rls_descriptors_no_limit_total", "Descriptors with no limit, or unlimited", &self.descriptors_no_limit),
            ("rls_redis_errors_total", "Calls answered UNAVAILABLE: Redis failed or timed out", &self.redis_errors),
            (
                "rls_overloaded_total",
                "Calls answered UNAVAILABLE at once: --max-in-flight Redis operations were in flight",
                &self.overloaded,
            ),
            ("rls_invalid_requests_total", "Calls answered INVALID_ARGUMENT", &self.invalid_requests),
        ];
        for (name, help, value) in counters {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}", value.load(Relaxed));
        }
        let by_kind = [
            (
                "rls_settles_total",
                "Settling descriptors (last entry llm_ratelimit.settle) received, by kind",
                [&self.settles_refund, &self.settles_charge],
            ),
            (
                "rls_settled_units_total",
                "Units refunded (taken off a window: at most what it held) or charged (added to it)",
                [&self.units_refunded, &self.units_charged],
            ),
        ];
        for (name, help, [refund, charge]) in by_kind {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name}{{kind=\"refund\"}} {}\n{name}{{kind=\"charge\"}} {}",
                refund.load(Relaxed),
                charge.load(Relaxed)
            );
        }
        let name = "rls_redis_latency_seconds";
        let _ = writeln!(
            out,
            "# HELP {name} Time of one descriptor's script in Redis, as this service sees it\n# TYPE {name} histogram"
        );
        let mut cumulative = 0;
        for (bound, count) in BUCKETS.iter().zip(&self.latency_buckets) {
            cumulative += count.load(Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
        }
        let count = self.latency_count.load(Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(out, "{name}_sum {}", self.latency_sum_us.load(Relaxed) as f64 / 1e6);
        let _ = writeln!(out, "{name}_count {count}");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_is_cumulative() {
        let m = Metrics::default();
        m.observe_redis(Duration::from_micros(300));
        m.observe_redis(Duration::from_millis(3));
        m.observe_redis(Duration::from_secs(2));
        let text = m.render();
        assert!(text.contains("rls_redis_latency_seconds_bucket{le=\"0.0005\"} 1\n"), "{text}");
        assert!(text.contains("rls_redis_latency_seconds_bucket{le=\"0.005\"} 2\n"), "{text}");
        assert!(text.contains("rls_redis_latency_seconds_bucket{le=\"1\"} 2\n"), "{text}");
        assert!(text.contains("rls_redis_latency_seconds_bucket{le=\"+Inf\"} 3\n"), "{text}");
        assert!(text.contains("rls_redis_latency_seconds_count 3\n"), "{text}");
    }
}
