//! `tokens`: LLM-token limits (off unless the section is there), overall and per model.

use super::{per_minute, Fault, Section};

/// Token limits: each request needs its estimated LLM tokens from a process-wide token bucket
/// as well as a request token, and is settled from the provider's `usage` after.
#[derive(Clone, Debug, PartialEq)]
pub struct TokensConfig {
    pub capacity: u64,
    pub refill_rate: f64,
    /// Tokens above `capacity` only `use_burst` classes may spend.
    pub burst_allowance: u64,
    /// Output tokens assumed when a request names no maximum.
    pub output_default: u64,
    pub chars_per_token: f64,
    /// Largest request body held and read; larger ones are estimated from their size.
    pub max_body_bytes: u64,
    /// Models with their own bucket (no burst), in name order: bucket `i + 1` is `per_model[i]`.
    pub per_model: Vec<(String, ModelLimit)>,
    /// Input tokens apart (Anthropic's ITPM): every request also takes its estimated input from
    /// this bucket, settled from the input its answer reports.
    pub input: Option<ModelLimit>,
    /// Output tokens apart (Anthropic's OTPM): reserved from the requested maximum.
    pub output: Option<ModelLimit>,
    /// Whether cache reads count toward `input` (Anthropic: they do not, for most models).
    pub count_cached_input: bool,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ModelLimit {
    pub capacity: u64,
    pub refill_rate: f64,
}

/// Most `tokens.per_model` entries: each is a level in the provider's one shared bucket value.
pub const MAX_MODELS: usize = 64;

pub(super) fn read(s: &mut Section) -> TokensConfig {
    let input = s.with_opt("input", limit);
    let output = s.with_opt("output", limit);
    // With input and output limits apart, the total defaults to their sum: it never binds first.
    let (apart, apart_rate) = match (&input, &output) {
        (Some(i), Some(o)) => (Some(i.capacity.saturating_add(o.capacity)), i.refill_rate + o.refill_rate),
        _ => (None, 0.0),
    };
    if apart.is_none() {
        s.require("capacity", "required to limit tokens (leave out \"tokens\" for no token limit)");
    }
    let explicit = s.has("capacity");
    let capacity = s.whole("capacity", apart.unwrap_or(0), 1);
    let default_rate = if explicit || apart.is_none() { per_minute(capacity) } else { apart_rate };
    TokensConfig {
        capacity,
        refill_rate: s.positive("refill_rate", default_rate),
        burst_allowance: s.whole("burst_allowance", 0, 0),
        output_default: s.whole("output_default", 1024, 0),
        chars_per_token: s.positive("chars_per_token", 4.0),
        max_body_bytes: s.whole("max_body_bytes", 1 << 20, 1),
        per_model: s.with("per_model", per_model),
        input,
        output,
        count_cached_input: s.flag("count_cached_input", false),
    }
}

/// `{"capacity": N, "refill_rate": R}`: a bucket of its own, refilled per minute by default.
fn limit(m: &mut Section) -> ModelLimit {
    m.require("capacity", "required");
    let capacity = m.whole("capacity", 0, 1);
    ModelLimit { capacity, refill_rate: m.positive("refill_rate", per_minute(capacity)) }
}

/// `{"<model>": {"capacity": N, "refill_rate": R}}`.
fn per_model(s: &mut Section) -> Vec<(String, ModelLimit)> {
    let models = s.entries(limit);
    if models.len() > MAX_MODELS {
        s.fail(Fault::Value, "", format_args!("at most {MAX_MODELS} models, got {}", models.len()));
    }
    if let Some((name, _)) = models.iter().find(|(name, _)| name.is_empty() || name.len() > 256) {
        s.fail(Fault::Value, "", format_args!("a model name must be 1-256 bytes, got {name:?}"));
    }
    models
}

#[cfg(test)]
mod tests {
    use crate::config::{err, Config};
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn token_limits_are_off_by_default_and_checked_field_by_field() {
        assert_eq!(Config::default().tokens, None);
        let c = Config::parse(br#"{"tokens":{"capacity":90000,"per_model":{"gpt-4o":{"capacity":30000},"a":{"capacity":6,"refill_rate":2}}}}"#)
            .unwrap();
        let t = c.tokens.unwrap();
        assert_eq!((t.capacity, t.refill_rate, t.burst_allowance), (90000, 1500.0, 0));
        assert_eq!((t.output_default, t.chars_per_token, t.max_body_bytes), (1024, 4.0, 1 << 20));
        // Name order: bucket i + 1 is per_model[i].
        let models: Vec<(&str, u64, f64)> =
            t.per_model.iter().map(|(n, m)| (n.as_str(), m.capacity, m.refill_rate)).collect();
        assert_eq!(models, [("a", 6, 2.0), ("gpt-4o", 30000, 500.0)]);
        assert!(err(r#"{"tokens":{}}"#).starts_with("tokens.capacity: required"));
        assert_eq!(err(r#"{"tokens":{"capacity":0}}"#), "tokens.capacity: must be a whole number >= 1, got 0");
        assert!(err(r#"{"tokens":{"capacity":9,"chars_per_token":0}}"#)
            .starts_with("tokens.chars_per_token: must be a number > 0"));
        assert!(err(r#"{"tokens":{"capacity":9,"max_body_bytes":"big"}}"#)
            .starts_with("tokens.max_body_bytes: invalid type: string \"big\", expected a number"));
        assert!(err(r#"{"tokens":{"capacity":9,"per_model":{"m":{}}}}"#)
            .starts_with("tokens.per_model.m.capacity: required"));
        assert!(err(r#"{"tokens":{"capacity":9,"per_model":{"m":{"capacity":1,"rate":2}}}}"#)
            .starts_with("tokens.per_model.m.rate: unknown field `rate`, expected one of `capacity`, `refill_rate`"));
        assert!(
            err(r#"{"tokens":{"capacity":9,"per_model":[]}}"#).starts_with("tokens.per_model: invalid type: sequence")
        );
        assert!(err(r#"{"tokens":{"capacty":9}}"#).starts_with("tokens.capacty: unknown field"));
        assert!(err(r#"{"tokens":7}"#).starts_with("tokens: invalid type: number `7`, expected a map"));
        let many: Vec<String> = (0..65).map(|i| format!(r#""m{i}":{{"capacity":1}}"#)).collect();
        let e = err(&format!(r#"{{"tokens":{{"capacity":9,"per_model":{{{}}}}}}}"#, many.join(",")));
        assert!(e.starts_with("tokens.per_model: at most 64 models"), "{e}");
    }
}
