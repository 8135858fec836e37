//! `failover`: where a request goes when the primary cannot serve it now (none unless the list
//! is there). Each target is a provider of its own, configured in full under `provider` (its own
//! `name`, buckets, tokens, `in_flight`; the same JSON its own filters in its cluster run with),
//! so its limits and state are honoured exactly as the primary's.

use super::{Config, Fault, Item, Section};
use crate::priority::Priority;

/// Most `failover` targets: each is a set of cores a worker runs beside the primary's.
pub const MAX_TARGETS: usize = 4;

#[derive(Clone, Debug, PartialEq)]
pub struct FailoverTarget {
    /// The target's own configuration (its queue off: a request that fails over goes at once or
    /// stays with the primary).
    pub provider: Config,
    /// Which classes may go there, by `Priority::index()`.
    pub classes: [bool; 4],
    /// The request body's `model` as the target names it: (primary's, target's).
    pub models: Vec<(String, String)>,
}

pub(super) fn read(top: &mut Section, primary: &str, has_tokens: bool) -> Vec<FailoverTarget> {
    let targets: Vec<FailoverTarget> = top.list("failover", target).unwrap_or_default().into_iter().flatten().collect();
    if targets.len() > MAX_TARGETS {
        top.fail(Fault::Value, "failover", format_args!("at most {MAX_TARGETS} targets, got {}", targets.len()));
    }
    for (i, t) in targets.iter().enumerate() {
        let at = format!("failover[{i}]");
        if t.provider.name == primary || targets[..i].iter().any(|u| u.provider.name == t.provider.name) {
            top.fail(
                Fault::Value,
                "failover",
                format_args!("{at}.provider.name {:?} names the primary or an earlier target", t.provider.name),
            );
        }
        // The body is held (and its `model` readable) only with token limits.
        if !t.models.is_empty() && !has_tokens {
            top.fail(
                Fault::Value,
                "failover",
                format_args!("{at}.models needs the \"tokens\" section (the body held)"),
            );
        }
    }
    targets
}

fn target(item: Item) -> Option<FailoverTarget> {
    item.object(|t| {
        t.require("provider", "required: the target's own configuration, with its \"name\"");
        let (mut provider, named) = t.with("provider", |p| (Config::read(p), p.has("name")));
        if !named && t.has("provider") {
            t.fail(Fault::Value, "provider", "needs its own \"name\" (the one its observer runs with)");
        }
        if !provider.failover.is_empty() {
            t.fail(Fault::Value, "provider", "a failover target has no failover of its own");
        }
        provider.queue.enabled = false;
        let classes = match t.list("classes", |c| c.variant(&Priority::ALL.map(Priority::name), &Priority::ALL)) {
            None => [true, true, false, false],
            Some(list) => {
                let mut on = [false; 4];
                for p in list.into_iter().flatten() {
                    on[p.index()] = true;
                }
                on
            }
        };
        let models = t.with("models", |m| {
            let names: Vec<&String> = m.map.map(|map| map.keys().collect()).unwrap_or_default();
            names.into_iter().filter_map(|k| Some((k.clone(), m.text(k)?))).collect()
        });
        Some(FailoverTarget { provider, classes, models })
    })
}

#[cfg(test)]
mod tests {
    use crate::config::{err, Config};
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn failover_targets_are_providers_of_their_own_checked_field_by_field() {
        assert!(Config::default().failover.is_empty());
        let c = Config::parse(
            br#"{"name":"openai","tokens":{"capacity":1000},"failover":[{"provider":{"name":"azure","bucket":{"capacity":10,"refill_rate":10}},"models":{"gpt-4o":"gpt-4o-eu"}},{"provider":{"name":"small"},"classes":["LOW"]}]}"#,
        )
        .unwrap();
        let t = &c.failover[0];
        assert_eq!(
            (t.provider.name.as_str(), t.provider.bucket.capacity, t.provider.queue.enabled),
            ("azure", 10, false)
        );
        assert_eq!(t.classes, [true, true, false, false]);
        assert_eq!(t.models, vec![("gpt-4o".to_string(), "gpt-4o-eu".to_string())]);
        assert_eq!(c.failover[1].classes, [false, false, false, true]);
        assert!(err(r#"{"failover":[{}]}"#).starts_with("failover[0].provider: required"));
        assert!(err(r#"{"failover":[{"provider":{}}]}"#).starts_with("failover[0].provider: needs its own \"name\""));
        assert!(err(r#"{"name":"a","failover":[{"provider":{"name":"a"}}]}"#).contains("names the primary"));
        assert!(err(r#"{"failover":[{"provider":{"name":"b","bucket":{"capcity":1}}}]}"#)
            .starts_with("failover[0].provider.bucket.capcity: unknown field"));
        assert!(err(r#"{"failover":[{"provider":{"name":"b"},"classes":["URGENT"]}]}"#)
            .starts_with("failover[0].classes[0]"));
        assert!(err(r#"{"failover":[{"provider":{"name":"b"},"models":{"x":"y"}}]}"#)
            .contains("models needs the \"tokens\" section"));
        assert!(err(r#"{"failover":[{"provider":{"name":"b","failover":[{"provider":{"name":"c"}}]}}]}"#)
            .contains("no failover of its own"));
    }
}
