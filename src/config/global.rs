//! `global`: one limit across many Envoy instances, through a rate limit service (off unless the
//! section is there).

use super::{Fault, Section};
use crate::global::gate::{Accounting, FailureMode, GlobalGateRules};

/// The rate limit service (Envoy's RLS v3 protocol) that a second gate asks after the local
/// buckets.
#[derive(Clone, Debug, PartialEq)]
pub struct GlobalConfig {
    /// The Envoy cluster (HTTP/2) of the service.
    pub cluster: String,
    pub domain: String,
    /// Which entries each descriptor carries, in order.
    pub descriptors: Vec<DescriptorEntry>,
    pub gate: GlobalGateRules,
    pub accounting: Accounting,
}

/// A descriptor entry the filter fills in: `provider` = the filter's `name`, `tenant` = the
/// `tenant.key_header` value, `class` = the priority class, `unit` = `requests` or `tokens`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DescriptorEntry {
    Provider,
    Tenant,
    Class,
    Unit,
}

impl DescriptorEntry {
    pub const NAMES: [&'static str; 4] = ["provider", "tenant", "class", "unit"];
    const ALL: [DescriptorEntry; 4] =
        [DescriptorEntry::Provider, DescriptorEntry::Tenant, DescriptorEntry::Class, DescriptorEntry::Unit];

    pub fn name(self) -> &'static str {
        Self::NAMES[self as usize]
    }
}

/// `has_tenant`: whether the configuration has a `tenant` section (for the `tenant` entry).
pub(super) fn read(s: &mut Section, has_tenant: bool) -> GlobalConfig {
    let modes = FailureMode::NAMES;
    let cluster = s.nonempty("cluster", "required: the Envoy cluster (HTTP/2) of the rate limit service");
    let domain = s.string("domain", "llm-ratelimit", |d| match d.len() {
        1..=256 => Ok(d),
        _ => Err(format!("must be 1 to 256 bytes, got {d:?}")),
    });
    let timeout_ms = s.whole_to("timeout_ms", 50, 1, 60_000);
    let failure_mode =
        s.variant("failure_mode", &modes.map(|m| m.0), &modes.map(|m| m.1)).unwrap_or(FailureMode::Local);
    let descriptors = descriptors(s, has_tenant);
    let max_lease = s.whole_to("max_lease", 256, 1, 10_000);
    let lease_ms = s.whole_to("lease_ms", 1000, 1, 60_000);
    let accountings = Accounting::NAMES;
    let accounting =
        s.variant("accounting", &accountings.map(|a| a.0), &accountings.map(|a| a.1)).unwrap_or(Accounting::Reserve);
    GlobalConfig {
        cluster,
        domain,
        descriptors,
        gate: GlobalGateRules {
            timeout_ms,
            failure_mode,
            max_lease,
            lease_ms,
            charged_after: [false, accounting == Accounting::ChargeAfter, true],
        },
        accounting,
    }
}

/// `descriptors`: distinct entries, `["provider", "unit"]` when absent.
fn descriptors(s: &mut Section, has_tenant: bool) -> Vec<DescriptorEntry> {
    use DescriptorEntry::*;
    let Some(list) = s.list("descriptors", |e| e.variant(&DescriptorEntry::NAMES, &DescriptorEntry::ALL)) else {
        return vec![Provider, Unit];
    };
    let list: Vec<DescriptorEntry> = list.into_iter().flatten().collect();
    let rule = if list.is_empty() {
        "must name at least one entry".into()
    } else if let Some(e) = list.iter().enumerate().find_map(|(i, e)| list[..i].contains(e).then_some(e)) {
        format!("`{}` appears twice", e.name())
    } else if list.contains(&Tenant) && !has_tenant {
        "`tenant` needs the \"tenant\" section (its key_header)".into()
    } else {
        return list;
    };
    s.fail(Fault::Value, "descriptors", rule);
    list
}
