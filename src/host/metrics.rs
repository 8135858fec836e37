//! The filter's stats, defined once per worker VM. Names carry the dimensions
//! (`llm_ratelimit.provider.<name>.priority.<class>.<stat>`) because the ABI has no tags; the
//! `stats_tags` in `envoy/` turn them into Prometheus labels.

use super::abi::{self, Metric};
use crate::priority::Priority;

/// A defined metric, or `None` when the host refused to define it (then it is skipped).
#[derive(Clone, Copy, Default)]
pub struct Id(Option<u32>);

impl Id {
    fn define(kind: Metric, name: &str) -> Id {
        match abi::define_metric(kind, name) {
            Ok(id) => Id(Some(id)),
            Err(s) => {
                log::error!("llm-ratelimit: cannot define metric {name}: status {s}");
                Id(None)
            }
        }
    }

    pub fn inc(self) {
        self.add(1)
    }

    pub fn add(self, by: i64) {
        if let (Some(id), true) = (self.0, by != 0) {
            if let Err(s) = abi::increment_metric(id, by) {
                log::debug!("llm-ratelimit: increment_metric {id} failed: status {s}");
            }
        }
    }

    /// Sets a gauge or records a histogram sample.
    pub fn record(self, value: u64) {
        if let Some(id) = self.0 {
            if let Err(s) = abi::record_metric(id, value) {
                log::debug!("llm-ratelimit: record_metric {id} failed: status {s}");
            }
        }
    }
}

/// Stats for one priority class.
#[derive(Clone, Copy)]
pub struct ClassStats {
    pub admitted: Id,
    pub rejected: Id,
}

pub struct Metrics {
    pub class: [ClassStats; 4],
    /// Whole tokens left in the process-wide bucket after the last decision.
    pub bucket_tokens: Id,
    /// Host calls that failed; the filter let the request through (fail open).
    pub errors: Id,
}

impl Metrics {
    pub fn define(name: &str) -> Metrics {
        let base = format!("llm_ratelimit.provider.{name}");
        let class = Priority::ALL.map(|p| {
            let at = |stat: &str| format!("{base}.priority.{}.{stat}", p.stat_name());
            ClassStats {
                admitted: Id::define(Metric::Counter, &at("admitted")),
                rejected: Id::define(Metric::Counter, &at("rejected")),
            }
        });
        Metrics {
            class,
            bucket_tokens: Id::define(Metric::Gauge, &format!("{base}.bucket.tokens")),
            errors: Id::define(Metric::Counter, &format!("{base}.errors")),
        }
    }

    pub fn of(&self, p: Priority) -> &ClassStats {
        &self.class[p.index()]
    }
}
