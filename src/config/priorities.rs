//! `priorities`: per-class settings, `{"<CLASS>": {...}}` for any of the four classes.

use super::Section;
use crate::priority::Priority;

#[derive(Clone, Debug, PartialEq)]
pub struct ClassConfig {
    /// Share of released tokens while several classes wait.
    pub weight: f64,
    /// Most requests of this class that may wait at once, process-wide.
    pub queue_limit: u64,
    /// Longest a request of this class may wait for a token.
    pub max_wait_ms: u64,
    /// Whether this class may spend the burst reserve.
    pub use_burst: bool,
    /// Router retries for this class (`x-envoy-max-retries`); `None` keeps the route's policy.
    pub max_retries: Option<u64>,
}

/// Every class, indexed by `Priority::index()`.
pub(super) fn read(s: &mut Section) -> [ClassConfig; 4] {
    s.keys_are_variants();
    Priority::ALL.map(|p| s.entry(p.name(), |c| class(c, p)))
}

/// The seed's per-class defaults: weights 5 / 3 / 1 / 0.1, queue limits 50 / 200 / 1000 / 5000.
fn class(s: &mut Section, p: Priority) -> ClassConfig {
    let (weight, queue_limit, use_burst) = match p {
        Priority::Critical => (5.0, 50, true),
        Priority::High => (3.0, 200, true),
        Priority::Normal => (1.0, 1000, false),
        Priority::Low => (0.1, 5000, false),
    };
    ClassConfig {
        weight: s.positive("weight", weight),
        queue_limit: s.whole("queue_limit", queue_limit, 0),
        max_wait_ms: s.whole("max_wait_ms", 30_000, 0),
        use_burst: s.flag("use_burst", use_burst),
        max_retries: s.whole_opt("max_retries", 0),
    }
}
