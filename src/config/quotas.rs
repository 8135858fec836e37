//! `quotas`: windows beyond the token bucket, per day or per month, calendar-aligned in a time
//! zone or rolling, for requests, tokens and money (none unless the list is there).

use super::{show, Fault, Item, Section};
use crate::calendar::{Period, TimeZone};
use crate::quota::{Quota, Unit};

/// Most entries of `quotas`: each is a count in one shared value taken per request.
pub const MAX_QUOTAS: usize = 8;

/// `[{"unit": "tokens", "per": "day", "limit": 1000000, "time_zone": "PST8PDT,M3.2.0,M11.1.0"}]`.
/// `has_tokens`, `has_prices`: whether the `tokens` and `prices` sections are there (token units
/// need the estimate; `usd` needs prices).
pub(super) fn read(top: &mut Section, has_tokens: bool, has_prices: bool) -> Vec<Quota> {
    let quotas: Vec<Quota> = top
        .list("quotas", |item| quota(item, has_tokens, has_prices))
        .unwrap_or_default()
        .into_iter()
        .flatten()
        .collect();
    if quotas.len() > MAX_QUOTAS {
        top.fail(Fault::Value, "quotas", format_args!("at most {MAX_QUOTAS} quotas, got {}", quotas.len()));
    }
    quotas
}

fn quota(item: Item, has_tokens: bool, has_prices: bool) -> Option<Quota> {
    item.object(|q| {
        q.require("unit", "required: requests, tokens, input_tokens, output_tokens or usd");
        let unit = q.variant("unit", &Unit::NAMES.map(|u| u.0), &Unit::NAMES.map(|u| u.1));
        q.require("per", "required: day or month");
        let period = q.variant("per", &Period::NAMES.map(|p| p.0), &Period::NAMES.map(|p| p.1));
        q.require("limit", "required");
        let limit = match unit {
            // Dollars, counted in micro-dollars.
            Some(Unit::MicroUsd) => {
                let usd = q.positive("limit", 1.0);
                if usd > 1e9 {
                    q.fail(Fault::Value, "limit", format_args!("must be at most 10^9 dollars, got {}", show(usd)));
                }
                (usd * 1e6).round() as u64
            }
            _ => q.whole("limit", 1, 1),
        };
        let time_zone = match q.text("time_zone") {
            None => TimeZone::UTC,
            Some(rule) => TimeZone::parse(&rule).unwrap_or_else(|e| {
                q.fail(Fault::Value, "time_zone", e);
                TimeZone::UTC
            }),
        };
        let rolling = q.flag("rolling", false);
        match unit {
            Some(Unit::MicroUsd) if !has_prices => {
                q.fail(Fault::Value, "unit", "\"usd\" needs the \"prices\" section (what tokens cost)")
            }
            Some(Unit::Tokens | Unit::InputTokens | Unit::OutputTokens) if !has_tokens => {
                q.fail(Fault::Value, "unit", "token units need the \"tokens\" section (the estimate)")
            }
            _ => {}
        }
        Some(Quota { unit: unit?, period: period?, time_zone, limit, rolling })
    })
}

#[cfg(test)]
mod tests {
    use crate::calendar::{Period, TimeZone};
    use crate::config::{err, Config};
    use crate::quota::Unit;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    const PRICES: &str = r#""tokens":{"capacity":100000},"prices":{"models":{"gpt-4o":{"input":2.5,"output":10}}}"#;

    #[test]
    fn quotas_and_prices_are_read_and_checked_field_by_field() {
        let json = format!(
            r#"{{{PRICES},"quotas":[{{"unit":"usd","per":"day","limit":1.5,"time_zone":"PST8PDT,M3.2.0,M11.1.0"}},{{"unit":"requests","per":"month","limit":1000,"rolling":true}}]}}"#
        );
        let c = Config::parse(json.as_bytes()).unwrap();
        let (usd, requests) = (&c.quotas[0], &c.quotas[1]);
        assert_eq!((usd.unit, usd.period, usd.limit, usd.rolling), (Unit::MicroUsd, Period::Day, 1_500_000, false));
        assert_eq!(usd.time_zone, TimeZone::parse("PST8PDT,M3.2.0,M11.1.0").unwrap());
        assert_eq!((requests.unit, requests.period, requests.limit), (Unit::Requests, Period::Month, 1000));
        assert_eq!((requests.time_zone.clone(), requests.rolling), (TimeZone::UTC, true));
        let p = c.prices.unwrap();
        assert_eq!((p.models[0].1.input, p.models[0].1.cached_input, p.default), (2.5, 2.5, None));
        assert!(Config::default().quotas.is_empty() && Config::default().prices.is_none());

        let e = err(r#"{"quotas":[{"unit":"usd","per":"day","limit":1}]}"#);
        assert!(e.starts_with("quotas[0].unit: \"usd\" needs the \"prices\" section"), "{e}");
        let e = err(r#"{"quotas":[{"unit":"tokens","per":"day","limit":1}]}"#);
        assert!(e.starts_with("quotas[0].unit: token units need the \"tokens\" section"), "{e}");
        let e = err(r#"{"quotas":[{"unit":"requests","per":"day","limit":1,"time_zone":"Mars/Olympus"}]}"#);
        assert!(e.starts_with("quotas[0].time_zone: "), "{e}");
        let e = err(r#"{"quotas":[{"unit":"requests","per":"week","limit":1}]}"#);
        assert!(e.starts_with("quotas[0].per: unknown variant `week`, expected one of `day`, `month`"), "{e}");
        let e = err(r#"{"quotas":[{"unit":"requests","per":"day"}]}"#);
        assert!(e.starts_with("quotas[0].limit: required"), "{e}");
        let e = err(r#"{"quotas":[{"unit":"requests","per":"day","limit":1.5}]}"#);
        assert!(e.starts_with("quotas[0].limit: must be a whole number"), "{e}");
        let e = err(r#"{"quotas":{"unit":"requests"}}"#);
        assert!(e.starts_with("quotas: invalid type: map, expected a sequence"), "{e}");
        let e = err(r#"{"prices":{"models":{"m":{"input":1,"output":1}}}}"#);
        assert!(e.starts_with("prices: needs the \"tokens\" section"), "{e}");
        let e = err(r#"{"tokens":{"capacity":9},"prices":{}}"#);
        assert!(e.starts_with("prices: must price at least one model"), "{e}");
        let e = err(r#"{"tokens":{"capacity":9},"prices":{"models":{"m":{"input":1}}}}"#);
        assert!(e.starts_with("prices.models.m.output: required"), "{e}");
        let e = err(r#"{"tokens":{"capacity":9},"prices":{"default":{"input":-1,"output":1}}}"#);
        assert!(e.starts_with("prices.default.input: must be a number of dollars from 0 to 10^6, got -1"), "{e}");
        let e = err(r#"{"tokens":{"capacity":9},"prices":{"default":{"input":1,"output":1,"cache":1}}}"#);
        assert!(e.starts_with("prices.default.cache: unknown field"), "{e}");
        let e = err(
            r#"{"tokens":{"capacity":9,"per_model":{"o1":{"capacity":5}}},"prices":{"models":{"gpt-4o":{"input":1,"output":1}}}}"#,
        );
        assert!(e.starts_with("prices: no price for tokens.per_model model \"o1\""), "{e}");
        let priced = r#"{"tokens":{"capacity":9,"per_model":{"o1":{"capacity":5}}},"prices":{"default":{"input":1,"output":1}}}"#;
        assert!(Config::parse(priced.as_bytes()).is_ok());
        let many = [r#"{"unit":"requests","per":"day","limit":1}"#; 9].join(",");
        let e = err(&format!(r#"{{"quotas":[{many}]}}"#));
        assert!(e.starts_with("quotas: at most 8 quotas"), "{e}");
    }

    #[test]
    fn tenant_tokens_and_input_output_limits_are_read_and_checked() {
        let c = Config::parse(
            br#"{"tenant":{"tokens":{"capacity":3000}},"tokens":{"input":{"capacity":2000},"output":{"capacity":400,"refill_rate":10}}}"#,
        )
        .unwrap();
        let t = c.tenant.unwrap().tokens.unwrap();
        assert_eq!((t.capacity, t.refill_rate, t.burst_allowance), (3000, 50.0, 0));
        let k = c.tokens.unwrap();
        // The total defaults to the sum of input and output, and their rates.
        assert_eq!((k.capacity, k.refill_rate, k.count_cached_input), (2400, 2000.0 / 60.0 + 10.0, false));
        assert_eq!(k.output.unwrap().refill_rate, 10.0);
        let e = err(r#"{"tenant":{"tokens":{"capacity":3000}}}"#);
        assert!(e.starts_with("tenant.tokens: needs the \"tokens\" section"), "{e}");
        let e = err(r#"{"tenant":{"tokens":{}},"tokens":{"capacity":9}}"#);
        assert!(e.starts_with("tenant.tokens.capacity: required"), "{e}");
        let e = err(r#"{"tokens":{"input":{"capacity":2000}}}"#);
        assert!(e.starts_with("tokens.capacity: required"), "{e}");
        let e = err(r#"{"global":{"cluster":"rls","accounting":"later"}}"#);
        assert!(
            e.starts_with("global.accounting: unknown variant `later`, expected one of `reserve`, `charge_after`"),
            "{e}"
        );
    }
}
