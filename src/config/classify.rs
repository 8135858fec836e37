//! `classify`: how a request's priority class is decided.

use super::{absolute_path, header_name, Fault, Section};
use crate::priority::Priority;

#[derive(Clone, Debug, PartialEq)]
pub struct ClassifyConfig {
    /// Request header that names a priority class.
    pub header: String,
    /// Trusted: the header sets the class. Untrusted: it may only lower it.
    pub trust_header: bool,
    pub default: Priority,
    /// First matching rule wins; none matching gives `default`.
    pub rules: Vec<Rule>,
}

/// A classification rule: a request matching `matcher` gets `priority`.
#[derive(Clone, Debug, PartialEq)]
pub struct Rule {
    pub matcher: Matcher,
    pub priority: Priority,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Matcher {
    PathPrefix(String),
    /// Header equals value (name lower-cased; value compared exactly).
    Header {
        name: String,
        value: String,
    },
}

pub(super) fn read(s: &mut Section) -> ClassifyConfig {
    ClassifyConfig {
        header: s.string("header", "x-llm-priority", header_name),
        trust_header: s.flag("trust_header", false),
        default: s.priority("default").unwrap_or(Priority::Normal),
        rules: s.list("rules", |r| r.object(rule)).unwrap_or_default().into_iter().flatten().collect(),
    }
}

/// `{"path_prefix": "/v1/batches", "priority": "LOW"}` or `{"header": "x-team", "value":
/// "support", "priority": "CRITICAL"}`; `None` when refused.
fn rule(s: &mut Section) -> Option<Rule> {
    let (path_prefix, header, value) = (s.text("path_prefix"), s.text("header"), s.text("value"));
    let priority = s.priority("priority");
    // Required, in serde's words (`priority` above is also `None` when it names no class).
    if s.get("priority").is_none() {
        s.fail(Fault::Type, "", "missing field `priority`");
    }
    let matcher = match (path_prefix, header, value) {
        (Some(p), None, None) => Matcher::PathPrefix(s.checked("path_prefix", absolute_path(p), String::new())),
        (None, Some(h), Some(value)) => {
            Matcher::Header { name: s.checked("header", header_name(h), String::new()), value }
        }
        _ => {
            let rule = "a rule needs either \"path_prefix\" or both \"header\" and \"value\", plus \"priority\"";
            s.fail(Fault::Value, "", rule);
            return None;
        }
    };
    Some(Rule { matcher, priority: priority? })
}

#[cfg(test)]
mod tests {
    use crate::config::err;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn malformed_rules_are_explained() {
        let e = err(r#"{"classify":{"rules":[{"priority":"LOW"}]}}"#);
        assert!(e.starts_with("classify.rules[0]: a rule needs either"), "{e}");
        let e = err(r#"{"classify":{"rules":[{"path_prefix":"v1","priority":"LOW"}]}}"#);
        assert!(e.starts_with("classify.rules[0].path_prefix: must start with '/'"), "{e}");
        let e = err(r#"{"classify":{"rules":[{"header":"x","priority":"LOW"}]}}"#);
        assert!(e.starts_with("classify.rules[0]:"), "{e}");
    }
}
