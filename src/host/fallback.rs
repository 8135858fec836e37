//! The fallback cache for the request path: the core's slot table (`crate::fallback`) in shared
//! data, sized and aged by the config, with host failures logged. Everything that decides lives
//! in the core, generic over `Store`, and is tested there against `MemStore`.

use crate::config::FallbackConfig;
use crate::fallback::{self, Entry, Identity};
use crate::store::{Status, Store};
use crate::time::{Duration, Instant};

/// The cached response for exactly this request's identity, if there is one younger than
/// `fallback.max_age_s`. A shared-data failure is a miss.
pub fn lookup(store: &impl Store, name: &str, id: &Identity, now: Instant, cfg: &FallbackConfig) -> Option<Entry> {
    fallback::lookup(store, name, id, now, slots(cfg), max_age(cfg)).unwrap_or_else(|s| {
        log::warn!("llm-ratelimit: cannot read the fallback cache: status {s}");
        None
    })
}

/// Stores `entry` for `id` in one of its slots.
pub fn store(store: &impl Store, name: &str, id: &Identity, entry: &Entry, cfg: &FallbackConfig) -> Result<(), Status> {
    fallback::store(store, name, id, entry, slots(cfg), max_age(cfg))
}

/// `fallback.max_entries` (at most 100 000, by config) as a slot count.
fn slots(cfg: &FallbackConfig) -> usize {
    usize::try_from(cfg.max_entries).unwrap_or(usize::MAX)
}

/// `max_age_ms`, typed.
fn max_age(cfg: &FallbackConfig) -> Duration {
    Duration::from_millis(cfg.max_age_ms)
}
