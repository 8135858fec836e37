//! `prices`: what tokens cost, per model, for money budgets (off unless the section is there).

use super::{show, Fault, Section};
use crate::tokens::price::{Price, Prices};

/// `{"models": {"<model>": {"input": 2.5, "output": 10, "cached_input": 1.25}}, "default": {...}}`:
/// US dollars per million tokens. Without `default`, a request for a model the table does not
/// price is refused (`unpriced_model`).
pub(super) fn read(s: &mut Section) -> Prices {
    let models = s.with("models", |m| m.entries(price));
    if let Some((name, _)) = models.iter().find(|(name, _)| name.is_empty() || name.len() > 256) {
        s.fail(Fault::Value, "models", format_args!("a model name must be 1-256 bytes, got {name:?}"));
    }
    if models.len() > super::MAX_MODELS {
        s.fail(Fault::Value, "models", format_args!("at most {} models, got {}", super::MAX_MODELS, models.len()));
    }
    let default = s.with_opt("default", price);
    if models.is_empty() && default.is_none() {
        s.fail(Fault::Value, "", "must price at least one model (\"models\") or give a \"default\"");
    }
    Prices { models, default }
}

/// One price: `input` and `output` required, `cached_input` the input price when absent.
fn price(p: &mut Section) -> Price {
    p.require("input", "required (US dollars per million input tokens)");
    p.require("output", "required (US dollars per million output tokens)");
    let input = dollars(p, "input", 0.0);
    Price { input, output: dollars(p, "output", 0.0), cached_input: dollars(p, "cached_input", input) }
}

/// A price from 0 to 10^6 dollars per million tokens.
fn dollars(p: &mut Section, key: &'static str, default: f64) -> f64 {
    let rule = match p.number(key) {
        None => Ok(default),
        Some(x) if (0.0..=1e6).contains(&x) => Ok(x),
        Some(x) => Err(format!("must be a number of dollars from 0 to 10^6, got {}", show(x))),
    };
    p.checked(key, rule, default)
}
