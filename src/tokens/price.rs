//! Money: what a request costs at the operator's prices, in micro-dollars.
//!
//! A price is in US dollars per million tokens, as providers publish them, which is also
//! micro-dollars per token: a request's cost needs no scaling.
//!
//! ```
//! use llm_ratelimit::tokens::price::Price;
//! // gpt-4o: $2.50 / $10.00 per million, cached input $1.25.
//! let p = Price { input: 2.5, output: 10.0, cached_input: 1.25 };
//! // 1,000 input tokens (200 of them cache reads) and 500 output tokens.
//! assert_eq!(p.cost(1_000, 500, 200), 7_250);
//! ```

use super::model::model_bucket;

/// US dollars per million tokens (= micro-dollars per token).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Price {
    pub input: f64,
    pub output: f64,
    /// Input tokens read from the provider's prompt cache.
    pub cached_input: f64,
}

/// The price table: per model (matched as `tokens.per_model` is: exact name, else its family),
/// and for every other model the default, or none (such requests are refused).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Prices {
    pub models: Vec<(String, Price)>,
    pub default: Option<Price>,
}

impl Prices {
    /// The price of a request to `path` naming `model`; `None`: no price for it.
    pub fn of(&self, path: &str, model: Option<&str>) -> Option<&Price> {
        match usize::from(model_bucket(&self.models, path, model)) {
            0 => self.default.as_ref(),
            i => self.models.get(i - 1).map(|(_, p)| p),
        }
    }
}

impl Price {
    /// Micro-dollars for `input` tokens (`cached` of them cache reads) and `output` tokens,
    /// rounded up: a budget never undercounts.
    pub fn cost(&self, input: u64, output: u64, cached: u64) -> u64 {
        let cached = cached.min(input);
        let micro =
            (input - cached) as f64 * self.input + cached as f64 * self.cached_input + output as f64 * self.output;
        // Saturates at u64::MAX for absurd counts; NaN cannot arise from the checked prices.
        micro.ceil() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    const GPT4O: Price = Price { input: 2.5, output: 10.0, cached_input: 1.25 };

    #[test]
    fn a_model_is_priced_by_its_own_or_its_family_s_entry_else_the_default() {
        let mut prices = Prices { models: vec![("gpt-4o".into(), GPT4O)], default: None };
        assert_eq!(prices.of("/v1/chat/completions", Some("gpt-4o-2024-08-06")), Some(&GPT4O));
        assert_eq!(prices.of("/v1/chat/completions", Some("gpt-4o-mini")), None, "another model, no default");
        assert_eq!(prices.of("/v1/chat/completions", None), None);
        let default = Price { input: 1.0, output: 1.0, cached_input: 1.0 };
        prices.default = Some(default);
        assert_eq!(prices.of("/v1/chat/completions", Some("gpt-4o-mini")), Some(&default));
    }

    #[test]
    fn cost_is_micro_dollars_rounded_up_with_cache_reads_at_their_price() {
        assert_eq!(GPT4O.cost(1_000_000, 0, 0), 2_500_000);
        assert_eq!(GPT4O.cost(0, 1, 0), 10);
        assert_eq!(GPT4O.cost(1, 0, 0), 3, "2.5 rounds up");
        assert_eq!(GPT4O.cost(100, 0, 500), 125, "cached is at most the input");
        assert_eq!(GPT4O.cost(u64::MAX, u64::MAX, 0), u64::MAX);
    }
}
