//! Decides a request's priority class from the operator's rules and, within what the operator
//! trusts, the request's own priority header.

use crate::config::{ClassifyConfig, Matcher};
use crate::priority::Priority;

/// The class for a request with this `path`; `header(name)` reads a request header.
///
/// Rules give the base class (first match wins, else the default). A trusted priority header
/// replaces it; an untrusted one may only lower it, so a client can volunteer to be LOW but can
/// never promote itself.
pub fn classify(cfg: &ClassifyConfig, path: &str, header: impl Fn(&str) -> Option<String>) -> Priority {
    let base = cfg
        .rules
        .iter()
        .find(|r| match &r.matcher {
            Matcher::PathPrefix(prefix) => path.starts_with(prefix.as_str()),
            Matcher::Header { name, value } => header(name).as_deref() == Some(value.as_str()),
        })
        .map_or(cfg.default, |r| r.priority);
    match header(&cfg.header).as_deref().and_then(Priority::parse) {
        Some(asked) if cfg.trust_header => asked,
        Some(asked) => asked.max(base),
        None => base,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    fn cfg(json: &str) -> ClassifyConfig {
        Config::parse(json.as_bytes()).unwrap().classify
    }

    fn headers<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |name| pairs.iter().find(|(n, _)| *n == name).map(|(_, v)| v.to_string())
    }

    #[test]
    fn no_rules_and_no_header_gives_the_default() {
        assert_eq!(classify(&cfg("{}"), "/v1/chat/completions", headers(&[])), Priority::Normal);
        let c = cfg(r#"{"classify":{"default":"LOW"}}"#);
        assert_eq!(classify(&c, "/", headers(&[])), Priority::Low);
    }

    #[test]
    fn untrusted_header_can_lower_but_never_raise() {
        let c = cfg("{}");
        assert_eq!(classify(&c, "/", headers(&[("x-llm-priority", "LOW")])), Priority::Low);
        assert_eq!(classify(&c, "/", headers(&[("x-llm-priority", "CRITICAL")])), Priority::Normal);
        assert_eq!(classify(&c, "/", headers(&[("x-llm-priority", "high")])), Priority::Normal);
    }

    #[test]
    fn trusted_header_sets_the_class_both_ways() {
        let c = cfg(r#"{"classify":{"trust_header":true}}"#);
        assert_eq!(classify(&c, "/", headers(&[("x-llm-priority", "critical")])), Priority::Critical);
        assert_eq!(classify(&c, "/", headers(&[("x-llm-priority", "LOW")])), Priority::Low);
    }

    #[test]
    fn garbage_header_values_are_ignored() {
        let c = cfg(r#"{"classify":{"trust_header":true,"default":"HIGH"}}"#);
        for junk in ["", "urgent", "CRITICAL!", "0"] {
            assert_eq!(classify(&c, "/", headers(&[("x-llm-priority", junk)])), Priority::High);
        }
    }

    #[test]
    fn first_matching_rule_wins_and_the_header_still_only_lowers() {
        let c = cfg(r#"{"classify":{"rules":[
                {"path_prefix":"/v1/batches","priority":"LOW"},
                {"header":"x-team","value":"support","priority":"CRITICAL"},
                {"path_prefix":"/v1","priority":"HIGH"}]}}"#);
        assert_eq!(classify(&c, "/v1/batches/1", headers(&[("x-team", "support")])), Priority::Low);
        assert_eq!(classify(&c, "/v1/chat", headers(&[("x-team", "support")])), Priority::Critical);
        assert_eq!(classify(&c, "/v1/chat", headers(&[("x-team", "sales")])), Priority::High);
        assert_eq!(classify(&c, "/other", headers(&[])), Priority::Normal);
        let lowered = headers(&[("x-team", "support"), ("x-llm-priority", "NORMAL")]);
        assert_eq!(classify(&c, "/v1/chat", lowered), Priority::Normal);
        let raised = headers(&[("x-llm-priority", "CRITICAL")]);
        assert_eq!(classify(&c, "/v1/batches", raised), Priority::Low);
    }
}
