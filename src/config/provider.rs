//! `provider`: how the filter reads the provider's answers, and its breaker.

use super::{one_of, Fault, Section};
use crate::breaker::BreakerRules;
use crate::signals::Provider;

/// How the filter reads the provider's answers.
#[derive(Clone, Debug, PartialEq)]
pub struct ProviderConfig {
    /// Whose rate-limit headers to read; `Auto` reads every known family.
    pub style: Provider,
    pub breaker: BreakerRules,
}

pub(super) fn read(s: &mut Section) -> ProviderConfig {
    let style = match s.text("style") {
        None => Provider::Auto,
        // Any case, as `Provider::parse` reads it.
        Some(name) => Provider::parse(&name).unwrap_or_else(|| {
            let all = Provider::ALL.map(|p| p.name());
            s.fail(Fault::Type, "style", format_args!("unknown provider {name:?}, expected one of {}", one_of(&all)));
            Provider::Auto
        }),
    };
    let breaker = BreakerRules {
        safe_threshold: s.fraction("safe_threshold", 0.05),
        throttle_below: s.fraction("throttle_below", 0.0),
        max_wait_ms: s.whole("max_retry_after_s", 3600, 1) * 1000,
        probe_timeout_ms: s.whole("probe_timeout_ms", 10_000, 1),
        backoff_ms: s.whole("backoff_ms", 1_000, 1),
        max_backoff_ms: s.whole("max_backoff_ms", 60_000, 1),
        // Not configurable.
        terminal_block_ms: 3_600_000,
    };
    ProviderConfig { style, breaker }
}
