//! `tenant`: a bucket per tenant, inside the provider's (off unless the section is there).

use super::{header_name, per_minute, Section};

/// Each tenant (a value of `key_header`) gets its own bucket, and needs a token from it as well
/// as from the provider-wide `bucket`.
#[derive(Clone, Debug, PartialEq)]
pub struct TenantConfig {
    pub key_header: String,
    pub capacity: u64,
    pub refill_rate: f64,
    pub burst_allowance: u64,
    /// Size of the bounded tenant table; tenants beyond it share an overflow bucket.
    pub slots: u64,
    /// LLM tokens per tenant (`None`: requests only), inside the provider's token bucket.
    pub tokens: Option<TenantTokens>,
    /// Tenant buckets' worth that new tenants together may start with (`None`: each starts full).
    pub newcomers: Option<u64>,
}

/// Each tenant's LLM-token bucket: team A gets 200k tokens per minute.
#[derive(Clone, Debug, PartialEq)]
pub struct TenantTokens {
    pub capacity: u64,
    pub refill_rate: f64,
    pub burst_allowance: u64,
}

pub(super) fn read(s: &mut Section) -> TenantConfig {
    TenantConfig {
        key_header: s.string("key_header", "x-llm-tenant", header_name),
        capacity: s.whole("capacity", 10, 1),
        refill_rate: s.positive("refill_rate", 1.0),
        burst_allowance: s.whole("burst_allowance", 0, 0),
        slots: s.whole_to("slots", u64::from(crate::tenants::DEFAULT_SLOTS), 1, 65_536),
        newcomers: s.has("newcomers").then(|| s.whole_to("newcomers", 1, 1, 65_536)),
        tokens: s.with_opt("tokens", |t| {
            t.require("capacity", "required to limit each tenant's tokens");
            let capacity = t.whole("capacity", 0, 1);
            TenantTokens {
                capacity,
                refill_rate: t.positive("refill_rate", per_minute(capacity)),
                burst_allowance: t.whole("burst_allowance", 0, 0),
            }
        }),
    }
}

#[cfg(test)]
mod tests {
    use crate::config::{err, Config};
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn tenants_are_configured_apart_from_the_provider_bucket() {
        let c = Config::parse(br#"{"tenant":{"key_header":"X-Team","capacity":5,"slots":16}}"#).unwrap();
        let t = c.tenant.unwrap();
        assert_eq!((t.key_header.as_str(), t.capacity, t.refill_rate, t.slots), ("x-team", 5, 1.0, 16));
        assert!(err(r#"{"bucket":{"key_header":"x-tenant"}}"#).starts_with("bucket.key_header: tenant buckets moved"));
        assert!(
            err(r#"{"tenant":{"slots":100000}}"#).starts_with("tenant.slots: must be a whole number from 1 to 65536")
        );
        assert!(err(r#"{"tenant":{"capacty":1}}"#).starts_with("tenant.capacty: unknown field"));
    }
}
