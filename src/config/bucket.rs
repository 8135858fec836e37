//! `bucket`: the provider-wide token bucket every request needs a token from.

use super::{Fault, Section};

#[derive(Clone, Debug, PartialEq)]
pub struct BucketConfig {
    /// Tokens every class may spend.
    pub capacity: u64,
    /// Tokens added per second, process-wide.
    pub refill_rate: f64,
    /// Extra tokens above `capacity` that only classes with `use_burst` may spend.
    pub burst_allowance: u64,
    /// Most requests one worker leases at once (1: every admission is a compare-and-swap).
    pub max_lease: u64,
}

pub(super) fn read(s: &mut Section) -> BucketConfig {
    let bucket = BucketConfig {
        capacity: s.whole("capacity", 100, 1),
        refill_rate: s.positive("refill_rate", 10.0),
        burst_allowance: s.whole("burst_allowance", 20, 0),
        max_lease: s.whole_to("max_lease", 32, 1, 10_000),
    };
    if s.text("key_header").is_some() {
        let moved = "tenant buckets moved to \"tenant\" and now nest inside the provider bucket, \
                     e.g. {\"tenant\": {\"key_header\": \"x-llm-tenant\", \"capacity\": 10}}";
        s.fail(Fault::Value, "key_header", moved);
    }
    bucket
}
