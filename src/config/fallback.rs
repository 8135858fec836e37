//! `fallback`: cached answers while the breaker is open.

use super::{header_name, Section};

/// Cached answers while the breaker is open (off by default).
#[derive(Clone, Debug, PartialEq)]
pub struct FallbackConfig {
    pub enabled: bool,
    /// Request header carrying the client's cache key; requests without it are never cached.
    pub key_header: String,
    pub max_entries: u64,
    pub max_body_bytes: u64,
    pub max_age_ms: u64,
}

pub(super) fn read(s: &mut Section) -> FallbackConfig {
    FallbackConfig {
        enabled: s.flag("enabled", false),
        key_header: s.string("key_header", "x-llm-cache-key", header_name),
        max_entries: s.whole_to("max_entries", 100, 1, 100_000),
        max_body_bytes: s.whole("max_body_bytes", 65_536, 1),
        max_age_ms: s.whole("max_age_s", 3600, 1) * 1000,
    }
}
