//! The filter's configuration: the JSON in the plugin `configuration`, parsed and validated.
//!
//! Every field is optional and defaults to the values in the README. Anything unknown or out of
//! range is an error that names the field, the bad value and what is allowed, so Envoy refuses to
//! start with a message an operator can act on.
//!
//! One module per section of the JSON, each reading its own fields. A field is read, checked and
//! defaulted in one expression, e.g. `capacity: s.whole("capacity", 100, 1)` (a whole number >= 1,
//! 100 when absent), and the names a section reads are the names it allows: an unknown one is
//! refused with that list. `Config::default()` is the configuration read from nothing, so each
//! default is written once, beside its field. A new field is its struct field plus one read.
//!
//! Read from a `serde_json::Value` field by field (serde's derives cost the `.wasm` some 30 KB),
//! with serde's wording for the errors. Reading goes on past an error, and the error reported is
//! the most basic one found: the first unknown name, else the first value of the wrong type (or
//! unknown variant, or missing field), else the first value breaking its rule.

mod alert;
mod bucket;
mod classify;
mod failover;
mod fallback;
mod global;
mod in_flight;
mod prices;
mod priorities;
mod provider;
mod queue;
mod quotas;
mod role;
mod tenant;
mod tokens;

pub use alert::AlertConfig;
pub use bucket::BucketConfig;
pub use classify::{ClassifyConfig, Matcher, Rule};
pub use failover::{FailoverTarget, MAX_TARGETS};
pub use fallback::FallbackConfig;
pub use global::{DescriptorEntry, GlobalConfig};
pub use priorities::ClassConfig;
pub use provider::ProviderConfig;
pub use queue::QueueConfig;
pub use quotas::MAX_QUOTAS;
pub use role::Role;
pub use tenant::{TenantConfig, TenantTokens};
pub use tokens::{ModelLimit, TokensConfig, MAX_MODELS};

use crate::priority::Priority;
use crate::quota::Quota;
use crate::tokens::price::Prices;
use serde_json::{Map, Value};
use std::cell::Cell;

/// The validated configuration the filter runs with.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    /// Stat dimension for this filter instance (provider or route), e.g. `openai`.
    pub name: String,
    pub bucket: BucketConfig,
    /// Per-class settings, indexed by `Priority::index()`.
    pub classes: [ClassConfig; 4],
    pub classify: ClassifyConfig,
    pub queue: QueueConfig,
    pub provider: ProviderConfig,
    pub role: Role,
    pub fallback: FallbackConfig,
    /// Per-tenant buckets inside the provider's (`None`: no tenant limits).
    pub tenant: Option<TenantConfig>,
    /// LLM-token limits (`None`: requests only, and no body is held).
    pub tokens: Option<TokensConfig>,
    /// What tokens cost, for money budgets (`None`: no costs counted).
    pub prices: Option<Prices>,
    /// Day and month windows for requests, tokens and money (empty: none).
    pub quotas: Vec<Quota>,
    /// Where a request goes when this provider cannot serve it now, in order (empty: nowhere).
    pub failover: Vec<FailoverTarget>,
    /// The most requests at the provider at once, fixed or adaptive (`None`: no limit).
    pub in_flight: Option<crate::inflight::Rules>,
    /// Alerts the filter sends itself (`None`: it only logs and counts).
    pub alert: Option<AlertConfig>,
    /// One limit across many Envoy instances, through a rate limit service (`None`: this
    /// instance's own buckets only).
    pub global: Option<GlobalConfig>,
}

impl Default for Config {
    /// The configuration read from nothing: every field's default.
    fn default() -> Self {
        read_object(String::new(), None, &Errors::default(), Config::read)
    }
}

impl Config {
    /// Parses and validates the plugin configuration. Empty input means all defaults.
    pub fn parse(bytes: &[u8]) -> Result<Config, String> {
        match bytes.iter().find(|b| !b.is_ascii_whitespace()) {
            None => return Ok(Config::default()),
            Some(b'{') => {}
            // serde would read an array as the struct's fields in order: refuse it plainly.
            Some(_) => {
                return Err("the configuration must be a JSON object, e.g. {\"bucket\": {\"capacity\": 100}}".into())
            }
        }
        // serde_json says where: "trailing comma at line 4 column 3".
        let json: Value = serde_json::from_slice(bytes).map_err(|e| format!("invalid JSON: {e}"))?;
        let errors = Errors::default();
        let config = read_object(String::new(), Some(&json), &errors, Config::read);
        match errors.0.take() {
            None => Ok(config),
            Some((_, e)) => Err(shorten(e)),
        }
    }

    pub fn class(&self, p: Priority) -> &ClassConfig {
        &self.classes[p.index()]
    }

    /// The top level, in the order an unknown field's error lists the names.
    fn read(top: &mut Section) -> Config {
        let name = top.string("name", "default", stat_token);
        let bucket = top.with("bucket", bucket::read);
        let classes = top.with("priorities", priorities::read);
        let classify = top.with("classify", classify::read);
        let queue = top.with("queue", queue::read);
        let provider = top.with("provider", provider::read);
        let role = role::read(top);
        let fallback = top.with("fallback", fallback::read);
        let tenant = top.with_opt("tenant", tenant::read);
        let tokens = top.with_opt("tokens", tokens::read);
        let prices = top.with_opt("prices", prices::read);
        let quotas = quotas::read(top, tokens.is_some(), prices.is_some());
        let in_flight = top.with_opt("in_flight", in_flight::read);
        let failover = failover::read(top, &name, tokens.is_some());
        let alert = top.with_opt("alert", alert::read);
        let global = top.with_opt("global", |s| global::read(s, tenant.is_some()));
        // A model the operator limits apart must have a price, or every request for it is refused.
        if let (Some(p), Some(t)) = (&prices, &tokens) {
            let unpriced = t.per_model.iter().find(|(m, _)| p.default.is_none() && p.of("", Some(m)).is_none());
            if let Some((m, _)) = unpriced {
                top.fail(
                    Fault::Value,
                    "prices",
                    format_args!(
                        "no price for tokens.per_model model {m:?}: price it in \"models\" or give a \"default\""
                    ),
                );
            }
        }
        // Tenant tokens and prices count what the `tokens` section estimates and reads.
        if tokens.is_none() {
            if tenant.as_ref().is_some_and(|t| t.tokens.is_some()) {
                top.fail(Fault::Value, "tenant.tokens", "needs the \"tokens\" section (the estimate)");
            }
            if prices.is_some() {
                top.fail(Fault::Value, "prices", "needs the \"tokens\" section (the estimate and the usage read)");
            }
        }
        Config {
            name,
            bucket,
            classes,
            classify,
            queue,
            provider,
            role,
            fallback,
            tenant,
            tokens,
            prices,
            quotas,
            in_flight,
            failover,
            alert,
            global,
        }
    }
}

// ---- Reading: a `Section` per JSON object; its methods each read one field. ----

/// What kind of error: `parse` reports the first of the most basic kind found.
#[derive(Clone, Copy, PartialEq, PartialOrd)]
enum Fault {
    /// An unknown field (or `priorities` class).
    Name,
    /// A value of the wrong JSON type, an unknown variant, a missing field.
    Type,
    /// A value breaking its field's rule (range, format, required, consistency).
    Value,
}

/// The error to report so far.
#[derive(Default)]
struct Errors(Cell<Option<(Fault, String)>>);

impl Errors {
    fn add(&self, fault: Fault, message: String) {
        let first = self.0.take();
        self.0.set(match first {
            Some((f, _)) if f <= fault => first,
            _ => Some((fault, message)),
        });
    }
}

/// One JSON object of the configuration, read field by field. Each read gives the field's value,
/// or its default when it is absent (`null` counts as absent) or wrong, the error then recorded.
struct Section<'a> {
    /// Path of the object (`""` at the top): every error starts with it.
    at: String,
    /// `None` when the object is absent (or not an object): every read gives its default.
    map: Option<&'a Map<String, Value>>,
    /// The names read so far, in order: the allowed ones, which an unknown field's error lists.
    known: Vec<&'a str>,
    /// The keys are a closed set of names (the `priorities` classes), not fields.
    keys_are_variants: bool,
    errors: &'a Errors,
}

/// Reads the object `v` at `at` with `read`, then refuses the fields it did not read.
fn read_object<'a, T>(
    at: String,
    v: Option<&'a Value>,
    errors: &'a Errors,
    read: impl FnOnce(&mut Section<'a>) -> T,
) -> T {
    let map = match v {
        None => None,
        Some(Value::Object(map)) => Some(map),
        Some(v) => {
            errors.add(Fault::Type, format!("{at}: invalid type: {}, expected a map", kind(v)));
            None
        }
    };
    let mut s = Section { at, map, known: Vec::new(), keys_are_variants: false, errors };
    let out = read(&mut s);
    s.close();
    out
}

impl<'a> Section<'a> {
    /// The path of field `key` (`""`: of this object).
    fn path(&self, key: &str) -> String {
        if key.is_empty() {
            self.at.clone()
        } else {
            join(&self.at, key)
        }
    }

    /// Records `rule` as broken at `key` (`""`: by this object).
    fn fail(&self, fault: Fault, key: &str, rule: impl std::fmt::Display) {
        self.errors.add(fault, format!("{}: {rule}", self.path(key)));
    }

    fn wrong_type(&self, key: &str, v: &Value, expected: &str) {
        self.fail(Fault::Type, key, format_args!("invalid type: {}, expected {expected}", kind(v)));
    }

    /// `rule`'s answer for field `key`; when it refuses, its error is recorded and `fallback` given.
    fn checked<T>(&self, key: &str, rule: Result<T, String>, fallback: T) -> T {
        rule.unwrap_or_else(|e| {
            self.fail(Fault::Value, key, e);
            fallback
        })
    }

    /// Field `key`, allowed from now on; `null` counts as absent.
    fn get(&mut self, key: &'a str) -> Option<&'a Value> {
        if !self.known.contains(&key) {
            self.known.push(key);
        }
        self.map?.get(key).filter(|v| !v.is_null())
    }

    /// Whether field `key` is there (not `null`), without reading it.
    fn has(&self, key: &str) -> bool {
        self.map.is_some_and(|m| m.get(key).is_some_and(|v| !v.is_null()))
    }

    /// An error at `key` unless it is present.
    fn require(&mut self, key: &'a str, rule: &str) {
        if self.get(key).is_none() {
            self.fail(Fault::Value, key, rule);
        }
    }

    /// Any JSON number (only the checked readers below use it).
    fn number(&mut self, key: &'a str) -> Option<f64> {
        match self.get(key)? {
            Value::Number(n) => n.as_f64(),
            v => {
                self.wrong_type(key, v, "a number");
                None
            }
        }
    }

    /// A whole number >= `min` and at most 10^15 (JSON numbers arrive as f64 so that `1.5` gets a
    /// clear message); `None` when absent or refused.
    fn whole_opt(&mut self, key: &'a str, min: u64) -> Option<u64> {
        let x = self.number(key)?;
        let rule = match x {
            x if x.fract() == 0.0 && x >= min as f64 && x <= 1e15 => return Some(x as u64),
            x if x > 1e15 => format!("must be a whole number from {min} to 10^15, got {}", show(x)),
            x => format!("must be a whole number >= {min}, got {}", show(x)),
        };
        self.fail(Fault::Value, key, rule);
        None
    }

    /// A whole number >= `min` and at most 10^15, `default` when absent.
    fn whole(&mut self, key: &'a str, default: u64, min: u64) -> u64 {
        self.whole_opt(key, min).unwrap_or(default)
    }

    /// A whole number from `min` to `max`, `default` when absent.
    fn whole_to(&mut self, key: &'a str, default: u64, min: u64, max: u64) -> u64 {
        let n = self.whole(key, default, min);
        let rule = if n > max { Err(format!("must be a whole number from {min} to {max}, got {n}")) } else { Ok(n) };
        self.checked(key, rule, default)
    }

    /// A number > 0 and at most 10^15, the cap whole numbers have: every rate, weight and ratio in
    /// the configuration stays far from where the filter's arithmetic would saturate.
    fn positive(&mut self, key: &'a str, default: f64) -> f64 {
        let rule = match self.number(key) {
            None => Ok(default),
            Some(x) if x.is_finite() && x > 0.0 && x <= 1e15 => Ok(x),
            Some(x) if x > 1e15 => Err(format!("must be a number > 0 and at most 10^15, got {}", show(x))),
            Some(x) => Err(format!("must be a number > 0, got {}", show(x))),
        };
        self.checked(key, rule, default)
    }

    /// A number from 0 to 1, `default` when absent.
    fn fraction(&mut self, key: &'a str, default: f64) -> f64 {
        let rule = match self.number(key) {
            None => Ok(default),
            Some(x) if (0.0..=1.0).contains(&x) => Ok(x),
            Some(x) => Err(format!("must be a number from 0 to 1, got {}", show(x))),
        };
        self.checked(key, rule, default)
    }

    fn flag(&mut self, key: &'a str, default: bool) -> bool {
        match self.get(key) {
            None => default,
            Some(Value::Bool(b)) => *b,
            Some(v) => {
                self.wrong_type(key, v, "a boolean");
                default
            }
        }
    }

    /// Any string; `None` when absent.
    fn text(&mut self, key: &'a str) -> Option<String> {
        match self.get(key)? {
            Value::String(s) => Some(s.clone()),
            v => {
                self.wrong_type(key, v, "a string");
                None
            }
        }
    }

    /// A string as `rule` makes it (e.g. `header_name`), `default` when absent.
    fn string(&mut self, key: &'a str, default: &str, rule: impl FnOnce(String) -> Result<String, String>) -> String {
        match self.text(key) {
            None => default.into(),
            Some(s) => self.checked(key, rule(s), default.into()),
        }
    }

    /// A string that must be there and not be empty, else `rule` is the error.
    fn nonempty(&mut self, key: &'a str, rule: &str) -> String {
        match self.text(key) {
            Some(s) if !s.is_empty() => s,
            _ => {
                self.fail(Fault::Value, key, rule);
                String::new()
            }
        }
    }

    /// One of `names` (exactly as written), as serde names an unknown enum variant; `None` when
    /// absent.
    fn variant<T: Copy>(&mut self, key: &'a str, names: &[&str], values: &[T]) -> Option<T> {
        let v = self.get(key)?;
        match pick(v, names) {
            Ok(i) => Some(values[i]),
            Err(e) => {
                self.fail(Fault::Type, key, e);
                None
            }
        }
    }

    fn priority(&mut self, key: &'a str) -> Option<Priority> {
        self.variant(key, &Priority::ALL.map(Priority::name), &Priority::ALL)
    }

    /// The object at `key`, read by `read` (from nothing, so all defaults, when absent).
    fn with<T>(&mut self, key: &'a str, read: impl FnOnce(&mut Section<'a>) -> T) -> T {
        let v = self.get(key);
        read_object(self.path(key), v, self.errors, read)
    }

    /// The object at `key`, read by `read`; `None` when absent.
    fn with_opt<T>(&mut self, key: &'a str, read: impl FnOnce(&mut Section<'a>) -> T) -> Option<T> {
        let v = self.get(key)?;
        Some(read_object(self.path(key), Some(v), self.errors, read))
    }

    /// The entry `key` of a map of objects, read by `read`: absent is all defaults, `null` wrong.
    fn entry<T>(&mut self, key: &'a str, read: impl FnOnce(&mut Section<'a>) -> T) -> T {
        self.get(key);
        let v = self.map.and_then(|m| m.get(key));
        read_object(self.path(key), v, self.errors, read)
    }

    /// Every entry of this object, whose keys are names (not fields) the caller checks, each value
    /// an object read by `read`; in name order.
    fn entries<T>(&mut self, mut read: impl FnMut(&mut Section<'a>) -> T) -> Vec<(String, T)> {
        let Some(map) = self.map else { return Vec::new() };
        map.keys().map(|k| (k.clone(), self.entry(k, &mut read))).collect()
    }

    /// The keys are a closed set of names: an unknown one is an unknown variant at this object.
    fn keys_are_variants(&mut self) {
        self.keys_are_variants = true;
    }

    /// The array at `key`, each element read by `read`; `None` when absent.
    fn list<T>(&mut self, key: &'a str, mut read: impl FnMut(Item<'a>) -> T) -> Option<Vec<T>> {
        match self.get(key)? {
            Value::Array(items) => {
                let at = self.path(key);
                let errors = self.errors;
                Some(
                    items
                        .iter()
                        .enumerate()
                        .map(|(i, value)| read(Item { at: format!("{at}[{i}]"), value, errors }))
                        .collect(),
                )
            }
            v => {
                self.wrong_type(key, v, "a sequence");
                None
            }
        }
    }

    /// Refuses the first key not read, listing those read.
    fn close(self) {
        let Some(map) = self.map else { return };
        let Some(k) = map.keys().find(|k| !self.known.contains(&k.as_str())) else { return };
        let names = one_of(&self.known);
        if self.keys_are_variants {
            self.fail(Fault::Name, "", format_args!("unknown variant `{k}`, expected one of {names}"));
        } else {
            self.fail(Fault::Name, k, format_args!("unknown field `{k}`, expected one of {names}"));
        }
    }
}

/// One element of a JSON array, at `at` (`key[i]`).
struct Item<'a> {
    at: String,
    value: &'a Value,
    errors: &'a Errors,
}

impl<'a> Item<'a> {
    /// The element as an object, read by `read`.
    fn object<T>(self, read: impl FnOnce(&mut Section<'a>) -> T) -> T {
        read_object(self.at, Some(self.value), self.errors, read)
    }

    /// The element as one of `names`.
    fn variant<T: Copy>(self, names: &[&str], values: &[T]) -> Option<T> {
        match pick(self.value, names) {
            Ok(i) => Some(values[i]),
            Err(e) => {
                self.errors.add(Fault::Type, format!("{}: {e}", self.at));
                None
            }
        }
    }
}

// ---- Rules and wording shared by the sections. ----

/// What a value is, as serde's errors say it.
fn kind(v: &Value) -> String {
    match v {
        Value::Null => "null".into(),
        Value::Bool(b) => format!("boolean `{b}`"),
        Value::Number(n) => format!("number `{n}`"),
        Value::String(s) => format!("string {s:?}"),
        Value::Array(_) => "sequence".into(),
        Value::Object(_) => "map".into(),
    }
}

fn join(at: &str, key: &str) -> String {
    if at.is_empty() {
        key.to_string()
    } else {
        format!("{at}.{key}")
    }
}

/// The index in `names` of string `v`.
fn pick(v: &Value, names: &[&str]) -> Result<usize, String> {
    let Value::String(s) = v else { return Err(format!("invalid type: {}, expected a string", kind(v))) };
    names.iter().position(|n| n == s).ok_or_else(|| format!("unknown variant `{s}`, expected one of {}", one_of(names)))
}

/// `names` as serde lists what it expected: `a`, `b`, `c`.
fn one_of(names: &[&str]) -> String {
    // A loop, not `join`: its generic copy costs the `.wasm` a kilobyte.
    let mut out = String::new();
    for (i, n) in names.iter().enumerate() {
        out.push_str(if i == 0 { "`" } else { ", `" });
        out.push_str(n);
        out.push('`');
    }
    out
}

/// An error at most `MAX_ERROR` bytes long: messages quote the bad value, and a configuration
/// of megabytes must not become a log line of megabytes (Envoy logs it on every start).
fn shorten(mut e: String) -> String {
    const MAX_ERROR: usize = 512;
    if e.len() > MAX_ERROR {
        let mut end = MAX_ERROR;
        while !e.is_char_boundary(end) {
            end -= 1;
        }
        let more = e.len() - end;
        e.truncate(end);
        e.push_str(&format!("... ({more} bytes more)"));
    }
    e
}

/// Providers state token limits per minute: by default a bucket refills in one.
fn per_minute(capacity: u64) -> f64 {
    capacity as f64 / 60.0
}

/// A number as JSON writes it (serde_json's formatter, not core's: the `.wasm` carries one).
fn show(x: f64) -> String {
    match serde_json::Number::from_f64(x) {
        Some(_) if x.fract() == 0.0 && x.abs() < 1e15 => (x as i64).to_string(),
        Some(n) => n.to_string().replace("e+", "e"),
        None => "a number out of range".into(),
    }
}

/// A non-empty HTTP header name, lower-cased as Envoy stores it.
fn header_name(h: String) -> Result<String, String> {
    let ok = !h.is_empty() && h.bytes().all(|c| c.is_ascii_alphanumeric() || b"-_".contains(&c));
    if ok {
        Ok(h.to_ascii_lowercase())
    } else {
        Err(format!("must be a header name of letters, digits, '-' or '_', got {h:?}"))
    }
}

/// A token that can stand inside a stat name: no dots, so Envoy's tag regexes stay exact.
fn stat_token(s: String) -> Result<String, String> {
    let ok = !s.is_empty() && s.len() <= 64 && s.bytes().all(|c| c.is_ascii_alphanumeric() || b"-_".contains(&c));
    if ok {
        Ok(s)
    } else {
        Err(format!("must be 1-64 letters, digits, '-' or '_', got {s:?}"))
    }
}

/// A URL path.
fn absolute_path(p: String) -> Result<String, String> {
    if p.starts_with('/') {
        Ok(p)
    } else {
        Err(format!("must start with '/', got {p:?}"))
    }
}

/// The error `json` is refused with.
#[cfg(test)]
fn err(json: &str) -> String {
    Config::parse(json.as_bytes()).expect_err("config should be rejected")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::signals::Provider;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;
    #[test]
    fn empty_config_gives_seed_defaults() {
        for input in ["", "  \n", "{}"] {
            let c = Config::parse(input.as_bytes()).unwrap();
            assert_eq!(c, Config::default());
        }
        let c = Config::default();
        assert_eq!((c.bucket.capacity, c.bucket.refill_rate, c.bucket.burst_allowance), (100, 10.0, 20));
        let weights: Vec<f64> = c.classes.iter().map(|c| c.weight).collect();
        assert_eq!(weights, [5.0, 3.0, 1.0, 0.1]);
        let limits: Vec<u64> = c.classes.iter().map(|c| c.queue_limit).collect();
        assert_eq!(limits, [50, 200, 1000, 5000]);
        assert_eq!(c.classify.default, Priority::Normal);
        assert!(!c.classify.trust_header);
    }

    #[test]
    fn partial_overrides_keep_other_defaults() {
        let c = Config::parse(
            br#"{"name":"openai","bucket":{"capacity":5,"refill_rate":0.5},
                 "priorities":{"LOW":{"queue_limit":0}},
                 "classify":{"header":"X-Prio","trust_header":true,"default":"HIGH",
                   "rules":[{"path_prefix":"/v1/batches","priority":"LOW"},
                            {"header":"x-team","value":"support","priority":"CRITICAL"}]}}"#,
        )
        .unwrap();
        assert_eq!(c.name, "openai");
        assert_eq!((c.bucket.capacity, c.bucket.refill_rate, c.bucket.burst_allowance), (5, 0.5, 20));
        assert_eq!(c.class(Priority::Low).queue_limit, 0);
        assert_eq!(c.class(Priority::Low).weight, 0.1);
        assert_eq!(c.class(Priority::Normal).queue_limit, 1000);
        assert_eq!(c.classify.header, "x-prio");
        assert_eq!(c.classify.default, Priority::High);
        assert_eq!(c.classify.rules[0].matcher, Matcher::PathPrefix("/v1/batches".into()));
        assert_eq!(c.classify.rules[1].matcher, Matcher::Header { name: "x-team".into(), value: "support".into() });
    }

    #[test]
    fn unknown_fields_name_the_field_and_the_allowed_ones() {
        let e = err(r#"{"bucket":{"capacty":5}}"#);
        assert!(e.starts_with("bucket.capacty: unknown field `capacty`, expected one of"), "{e}");
        assert!(e.contains("`capacity`") && e.contains("`refill_rate`"), "{e}");
        let e = err(r#"{"colour":1}"#);
        assert!(e.contains("unknown field `colour`") && e.contains("`bucket`"), "{e}");
    }

    #[test]
    fn bad_values_name_field_value_and_rule() {
        assert_eq!(err(r#"{"bucket":{"refill_rate":-1}}"#), "bucket.refill_rate: must be a number > 0, got -1");
        assert_eq!(err(r#"{"bucket":{"refill_rate":0}}"#), "bucket.refill_rate: must be a number > 0, got 0");
        assert_eq!(err(r#"{"bucket":{"capacity":0}}"#), "bucket.capacity: must be a whole number >= 1, got 0");
        assert_eq!(err(r#"{"bucket":{"capacity":2.5}}"#), "bucket.capacity: must be a whole number >= 1, got 2.5");
        assert_eq!(
            err(r#"{"priorities":{"HIGH":{"weight":0}}}"#),
            "priorities.HIGH.weight: must be a number > 0, got 0"
        );
        let e = err(r#"{"bucket":{"capacity":"lots"}}"#);
        assert!(e.starts_with("bucket.capacity: invalid type: string \"lots\""), "{e}");
        let e = err(r#"{"name":"open.ai"}"#);
        assert!(e.starts_with("name: must be 1-64 letters"), "{e}");
    }

    #[test]
    fn unknown_priority_names_list_the_allowed_ones() {
        let e = err(r#"{"classify":{"default":"URGENT"}}"#);
        assert!(e.starts_with("classify.default: unknown variant `URGENT`"), "{e}");
        assert!(e.contains("`CRITICAL`, `HIGH`, `NORMAL`, `LOW`"), "{e}");
        let e = err(r#"{"priorities":{"MEDIUM":{}}}"#);
        assert!(e.starts_with("priorities: unknown variant `MEDIUM`, expected one of `CRITICAL`"), "{e}");
        let e = err(r#"{"priorities":{"LOW":{"weight":"tiny"}}}"#);
        assert!(e.starts_with("priorities.LOW.weight: invalid type: string \"tiny\""), "{e}");
    }

    #[test]
    fn provider_settings_are_validated() {
        let c = Config::parse(
            br#"{"provider":{"style":"Anthropic","safe_threshold":0.1,"max_retry_after_s":60},
            "priorities":{"LOW":{"max_retries":0}}}"#,
        )
        .unwrap();
        assert_eq!(c.provider.style, Provider::Anthropic);
        assert_eq!(c.provider.breaker.safe_threshold, 0.1);
        assert_eq!(c.provider.breaker.max_wait_ms, 60_000);
        assert_eq!(c.class(Priority::Low).max_retries, Some(0));
        assert_eq!(c.class(Priority::High).max_retries, None);
        assert_eq!(c.role, Role::Standalone);
        assert!(!c.fallback.enabled);
        let f = Config::parse(br#"{"fallback":{"enabled":true,"key_header":"Idempotency-Key","max_age_s":60}}"#)
            .unwrap()
            .fallback;
        assert_eq!(
            (f.enabled, f.key_header.as_str(), f.max_age_ms, f.max_entries),
            (true, "idempotency-key", 60_000, 100)
        );
        assert_eq!(
            err(r#"{"fallback":{"max_entries":0}}"#),
            "fallback.max_entries: must be a whole number >= 1, got 0"
        );
        let c = Config::parse(br#"{"role":"observer"}"#).unwrap();
        assert!(c.role.learns() && !c.role.admits());
        let e = err(r#"{"role":"sidecar"}"#);
        assert!(
            e.starts_with("role: unknown variant `sidecar`, expected one of `standalone`, `admission`, `observer`"),
            "{e}"
        );
        let e = err(r#"{"provider":{"style":"openia"}}"#);
        assert!(e.starts_with("provider.style: unknown provider \"openia\", expected one of `auto`, `openai`"), "{e}");
        assert_eq!(
            err(r#"{"provider":{"safe_threshold":2}}"#),
            "provider.safe_threshold: must be a number from 0 to 1, got 2"
        );
    }

    #[test]
    fn not_json_is_an_error_not_a_panic() {
        assert!(!err("not json").is_empty());
        assert!(err("[]").starts_with("the configuration must be a JSON object"));
        assert!(err("[1,2]").starts_with("the configuration must be a JSON object"));
        assert!(err("null").starts_with("the configuration must be a JSON object"));
        assert_eq!(
            err(r#"{"bucket":{"capacity":1e20}}"#),
            "bucket.capacity: must be a whole number from 1 to 10^15, got 1e20"
        );
        assert!(!err(r#"{"bucket":"#).is_empty());
    }

    #[test]
    fn errors_name_the_path_or_the_place_in_the_text() {
        let e = err("{\n  \"queue\": {\n    \"tick_ms\": 5,\n  }\n}");
        assert_eq!(e, "invalid JSON: trailing comma at line 4 column 3");
        let e = err("{\n  \"queue\": {\n    \"tick_ms\": \"fast\"\n  }\n}");
        assert!(e.starts_with("queue.tick_ms: invalid type: string \"fast\""), "{e}");
        let e = err(r#"{"classify":{"rules":[{"priority":"LOW","path_prefix":"/a"},{"priority":"HIGHEST"}]}}"#);
        assert!(e.starts_with("classify.rules[1].priority: unknown variant `HIGHEST`"), "{e}");
    }

    #[test]
    fn wrong_json_types_and_missing_fields_name_the_field() {
        assert!(err(r#"{"queue":{"enabled":"yes"}}"#)
            .starts_with("queue.enabled: invalid type: string \"yes\", expected a boolean"));
        assert!(err(r#"{"bucket":[1]}"#).starts_with("bucket: invalid type: sequence, expected a map"));
        assert!(
            err(r#"{"classify":{"rules":{}}}"#).starts_with("classify.rules: invalid type: map, expected a sequence")
        );
        assert!(err(r#"{"classify":{"rules":[{"path_prefix":"/a"}]}}"#)
            .starts_with("classify.rules[0]: missing field `priority`"));
        assert!(err(r#"{"name":5}"#).starts_with("name: invalid type: number `5`, expected a string"));
        // null is the same as absent, as before.
        assert_eq!(Config::parse(br#"{"bucket":{"capacity":null},"tenant":null}"#).unwrap(), Config::default());
    }
}
