//! The filter's configuration: the JSON in the plugin `configuration`, parsed and validated.
//!
//! Every field is optional and defaults to the values in the README. Anything unknown or out of
//! range is an error that names the field, the bad value and what is allowed, so Envoy refuses to
//! start with a message an operator can act on.

use crate::breaker;
use crate::priority::Priority;
use crate::signals::Provider;
use serde_json::{Map, Value};

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
    /// Alerts the filter sends itself (`None`: it only logs and counts).
    pub alert: Option<AlertConfig>,
    /// One limit across many Envoy instances, through a rate limit service (`None`: this
    /// instance's own buckets only).
    pub global: Option<GlobalConfig>,
}

/// The rate limit service (Envoy's RLS v3 protocol) that a second gate asks after the local
/// buckets.
#[derive(Clone, Debug, PartialEq)]
pub struct GlobalConfig {
    /// The Envoy cluster (HTTP/2) of the service.
    pub cluster: String,
    pub domain: String,
    /// Which entries each descriptor carries, in order.
    pub descriptors: Vec<DescriptorEntry>,
    pub gate: crate::global::gate::GateRules,
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

/// Where and how the filter alerts when a provider's quota runs out.
#[derive(Clone, Debug, PartialEq)]
pub struct AlertConfig {
    /// The Envoy cluster to POST to (e.g. Alertmanager's).
    pub cluster: String,
    pub path: String,
    pub format: crate::alert::Format,
    /// One alert per provider and event per interval, process-wide.
    pub min_interval_ms: u64,
    pub timeout_ms: u64,
    /// Shed waiters per minute on one worker that raise an alert (0: never).
    pub shed_per_minute: u64,
}

/// Token limits: each request needs its estimated LLM tokens from a process-wide token bucket
/// as well as a request token, and is reconciled from the provider's `usage` after.
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
}

#[derive(Clone, Debug, PartialEq)]
pub struct ModelLimit {
    pub capacity: u64,
    pub refill_rate: f64,
}

/// Most `tokens.per_model` entries: each is a level in the provider's one shared bucket value.
pub const MAX_MODELS: usize = 64;

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
}

/// Cached answers while the breaker is open (off by default).
#[derive(Clone, Debug, PartialEq)]
pub struct FallbackConfig {
    pub enabled: bool,
    /// Request header carrying the client's cache key; requests without it are never cached.
    pub key_header: String,
    pub max_entries: u64,
    pub max_body_bytes: u64,
    pub max_age_ms: u64,
}

/// Where this instance of the filter sits, and so what it does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// One instance, in the listener's filter chain: admission, learning and 429 rewriting.
    /// Learns only from the final response when the router retries.
    Standalone,
    /// In the listener's chain, beside an `observer`: admission and 429 rewriting.
    Admission,
    /// In the cluster's upstream filter chain: learns from every attempt the router makes.
    Observer,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Standalone => "standalone",
            Role::Admission => "admission",
            Role::Observer => "observer",
        }
    }

    pub fn admits(self) -> bool {
        self != Role::Observer
    }
    pub fn learns(self) -> bool {
        self != Role::Admission
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct BucketConfig {
    /// Tokens every class may spend.
    pub capacity: u64,
    /// Tokens added per second, process-wide.
    pub refill_rate: f64,
    /// Extra tokens above `capacity` that only classes with `use_burst` may spend.
    pub burst_allowance: u64,
    /// Most requests one worker leases at once (1: every admission is a compare-and-swap).
    pub max_lease: u64,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ClassConfig {
    /// Share of released tokens while several classes wait.
    pub weight: f64,
    /// Most requests of this class that may wait at once, process-wide.
    pub queue_limit: u64,
    /// Longest a request of this class may wait for a token.
    pub max_wait_ms: u64,
    /// Whether this class may spend the burst reserve.
    pub use_burst: bool,
    /// Router retries for this class (`x-envoy-max-retries`); `None` keeps the route's policy.
    pub max_retries: Option<u64>,
}

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

#[derive(Clone, Debug, PartialEq)]
pub struct QueueConfig {
    /// Whether requests without a token wait (true) or are rejected at once (false).
    pub enabled: bool,
    /// How often each worker releases waiting requests.
    pub tick_ms: u64,
    /// Most requests waiting at once over all classes, process-wide; when full, a more important
    /// arrival sheds the newest waiter of the least important class.
    pub max_waiting: u64,
}

/// How the filter reads the provider's answers.
#[derive(Clone, Debug, PartialEq)]
pub struct ProviderConfig {
    /// Whose rate-limit headers to read; `Auto` reads every known family.
    pub style: Provider,
    pub breaker: breaker::BreakerRules,
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

impl Default for Config {
    fn default() -> Self {
        Config {
            name: "default".into(),
            bucket: BucketConfig { capacity: 100, refill_rate: 10.0, burst_allowance: 20, max_lease: 32 },
            tenant: None,
            tokens: None,
            alert: None,
            global: None,
            classes: Priority::ALL.map(default_class),
            classify: ClassifyConfig {
                header: "x-llm-priority".into(),
                trust_header: false,
                default: Priority::Normal,
                rules: Vec::new(),
            },
            queue: QueueConfig { enabled: true, tick_ms: 10, max_waiting: 5000 },
            role: Role::Standalone,
            fallback: FallbackConfig {
                enabled: false,
                key_header: "x-llm-cache-key".into(),
                max_entries: 100,
                max_body_bytes: 65_536,
                max_age_ms: 3_600_000,
            },
            provider: ProviderConfig {
                style: Provider::Auto,
                breaker: breaker::BreakerRules {
                    safe_threshold: 0.05,
                    throttle_below: 0.0,
                    max_wait_ms: 3_600_000,
                    probe_timeout_ms: 10_000,
                    backoff_ms: 1_000,
                    max_backoff_ms: 60_000,
                    terminal_block_ms: 3_600_000,
                },
            },
        }
    }
}

/// The seed's per-class defaults: weights 5 / 3 / 1 / 0.1, queue limits 50 / 200 / 1000 / 5000.
fn default_class(p: Priority) -> ClassConfig {
    let (weight, queue_limit, use_burst) = match p {
        Priority::Critical => (5.0, 50, true),
        Priority::High => (3.0, 200, true),
        Priority::Normal => (1.0, 1000, false),
        Priority::Low => (0.1, 5000, false),
    };
    ClassConfig { weight, queue_limit, max_wait_ms: 30_000, use_burst, max_retries: None }
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
        RawConfig::read(&json).and_then(RawConfig::validate).map_err(shorten)
    }

    pub fn class(&self, p: Priority) -> &ClassConfig {
        &self.classes[p.index()]
    }
}

// ---- The JSON shape: every field optional, unknown fields rejected. Read from a
// `serde_json::Value` field by field (serde's derives for these structs cost the `.wasm` some
// 30 KB), with serde's wording for the errors. ----

/// One JSON object of the configuration; `at` is its path (`""` at the top).
struct Fields<'a> {
    at: String,
    map: &'a Map<String, Value>,
}

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

/// The index in `names` of string `v` at `at`.
fn pick(at: &str, v: &Value, names: &[&str]) -> Result<usize, String> {
    let Value::String(s) = v else { return Err(format!("{at}: invalid type: {}, expected a string", kind(v))) };
    names
        .iter()
        .position(|n| n == s)
        .ok_or_else(|| format!("{at}: unknown variant `{s}`, expected one of {}", one_of(names)))
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

impl<'a> Fields<'a> {
    /// `v` as an object whose fields are all `known`.
    fn of(at: String, v: &'a Value, known: &[&str]) -> Result<Fields<'a>, String> {
        let Value::Object(map) = v else { return Err(format!("{at}: invalid type: {}, expected a map", kind(v))) };
        if let Some(k) = map.keys().find(|k| !known.contains(&k.as_str())) {
            return Err(format!("{}: unknown field `{k}`, expected one of {}", join(&at, k), one_of(known)));
        }
        Ok(Fields { at, map })
    }

    /// A field; `null` counts as absent.
    fn get(&self, key: &str) -> Option<&'a Value> {
        self.map.get(key).filter(|v| !v.is_null())
    }

    fn invalid(&self, key: &str, v: &Value, expected: &str) -> String {
        format!("{}: invalid type: {}, expected {expected}", join(&self.at, key), kind(v))
    }

    fn num(&self, key: &str) -> Result<Option<f64>, String> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Number(n)) => Ok(n.as_f64()),
            Some(v) => Err(self.invalid(key, v, "a number")),
        }
    }

    fn flag(&self, key: &str) -> Result<Option<bool>, String> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(self.invalid(key, v, "a boolean")),
        }
    }

    fn text(&self, key: &str) -> Result<Option<String>, String> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(v) => Err(self.invalid(key, v, "a string")),
        }
    }

    /// A nested object whose fields are all `known`; `None` when absent.
    fn object(&self, key: &str, known: &[&str]) -> Result<Option<Fields<'a>>, String> {
        self.get(key).map(|v| Fields::of(join(&self.at, key), v, known)).transpose()
    }

    /// A nested object whose keys are names the caller checks, each value read by `read`.
    fn named<T>(
        &self,
        key: &str,
        read: impl Fn(&str, &'a Value) -> Result<T, String>,
    ) -> Result<Vec<(String, T)>, String> {
        match self.get(key) {
            None => Ok(Vec::new()),
            Some(Value::Object(m)) => m.iter().map(|(k, v)| Ok((k.clone(), read(k, v)?))).collect(),
            Some(v) => Err(self.invalid(key, v, "a map")),
        }
    }

    /// One of `names` (exactly as written), as serde names an unknown enum variant.
    fn variant<T: Copy>(&self, key: &str, names: &[&str], values: &[T]) -> Result<Option<T>, String> {
        let Some(v) = self.get(key) else { return Ok(None) };
        Ok(Some(values[pick(&join(&self.at, key), v, names)?]))
    }

    fn priority(&self, key: &str) -> Result<Option<Priority>, String> {
        self.variant(key, &Priority::ALL.map(Priority::name), &Priority::ALL)
    }
}

#[derive(Default)]
struct RawConfig {
    name: Option<String>,
    bucket: RawBucket,
    priorities: Vec<(String, RawClass)>,
    classify: RawClassify,
    queue: RawQueue,
    provider: RawProvider,
    role: Option<Role>,
    fallback: RawFallback,
    tenant: Option<RawTenant>,
    tokens: Option<RawTokens>,
    alert: Option<RawAlert>,
    global: Option<RawGlobal>,
}

#[derive(Default)]
struct RawGlobal {
    cluster: Option<String>,
    domain: Option<String>,
    timeout_ms: Option<f64>,
    failure_mode: Option<crate::global::gate::FailureMode>,
    descriptors: Option<Vec<DescriptorEntry>>,
    max_lease: Option<f64>,
    lease_ms: Option<f64>,
}

#[derive(Default)]
struct RawAlert {
    cluster: Option<String>,
    path: Option<String>,
    format: Option<crate::alert::Format>,
    min_interval_s: Option<f64>,
    timeout_ms: Option<f64>,
    shed_per_minute: Option<f64>,
}

#[derive(Default)]
struct RawTokens {
    capacity: Option<f64>,
    refill_rate: Option<f64>,
    burst_allowance: Option<f64>,
    output_default: Option<f64>,
    chars_per_token: Option<f64>,
    max_body_bytes: Option<f64>,
    per_model: Vec<(String, RawModel)>,
}

#[derive(Default)]
struct RawModel {
    capacity: Option<f64>,
    refill_rate: Option<f64>,
}

#[derive(Default)]
struct RawTenant {
    key_header: Option<String>,
    capacity: Option<f64>,
    refill_rate: Option<f64>,
    burst_allowance: Option<f64>,
    slots: Option<f64>,
}

#[derive(Default)]
struct RawFallback {
    enabled: Option<bool>,
    key_header: Option<String>,
    max_entries: Option<f64>,
    max_body_bytes: Option<f64>,
    max_age_s: Option<f64>,
}

#[derive(Default)]
struct RawBucket {
    capacity: Option<f64>,
    refill_rate: Option<f64>,
    burst_allowance: Option<f64>,
    max_lease: Option<f64>,
    key_header: Option<String>,
}

#[derive(Default)]
struct RawClass {
    weight: Option<f64>,
    queue_limit: Option<f64>,
    max_wait_ms: Option<f64>,
    use_burst: Option<bool>,
    max_retries: Option<f64>,
}

#[derive(Default)]
struct RawProvider {
    style: Option<String>,
    safe_threshold: Option<f64>,
    throttle_below: Option<f64>,
    max_retry_after_s: Option<f64>,
    probe_timeout_ms: Option<f64>,
    backoff_ms: Option<f64>,
    max_backoff_ms: Option<f64>,
}

#[derive(Default)]
struct RawClassify {
    header: Option<String>,
    trust_header: Option<bool>,
    default: Option<Priority>,
    rules: Vec<RawRule>,
}

struct RawRule {
    path_prefix: Option<String>,
    header: Option<String>,
    value: Option<String>,
    priority: Priority,
}

#[derive(Default)]
struct RawQueue {
    enabled: Option<bool>,
    tick_ms: Option<f64>,
    max_waiting: Option<f64>,
}

impl RawConfig {
    /// Reads the JSON shape; `validate` then checks the values.
    fn read(v: &Value) -> Result<RawConfig, String> {
        const TOP: [&str; 12] = [
            "name",
            "bucket",
            "priorities",
            "classify",
            "queue",
            "provider",
            "role",
            "fallback",
            "tenant",
            "tokens",
            "alert",
            "global",
        ];
        let top = Fields::of(String::new(), v, &TOP)?;
        let mut raw = RawConfig { name: top.text("name")?, ..RawConfig::default() };
        if let Some(f) =
            top.object("bucket", &["capacity", "refill_rate", "burst_allowance", "max_lease", "key_header"])?
        {
            raw.bucket = RawBucket {
                capacity: f.num("capacity")?,
                refill_rate: f.num("refill_rate")?,
                burst_allowance: f.num("burst_allowance")?,
                max_lease: f.num("max_lease")?,
                key_header: f.text("key_header")?,
            };
        }
        raw.priorities = top.named("priorities", |name, v| {
            const CLASS: [&str; 5] = ["weight", "queue_limit", "max_wait_ms", "use_burst", "max_retries"];
            let f = Fields::of(format!("priorities.{name}"), v, &CLASS)?;
            Ok(RawClass {
                weight: f.num("weight")?,
                queue_limit: f.num("queue_limit")?,
                max_wait_ms: f.num("max_wait_ms")?,
                use_burst: f.flag("use_burst")?,
                max_retries: f.num("max_retries")?,
            })
        })?;
        if let Some(f) = top.object("classify", &["header", "trust_header", "default", "rules"])? {
            let rules = match f.get("rules") {
                None => Vec::new(),
                Some(Value::Array(rules)) => {
                    rules.iter().enumerate().map(|(i, r)| RawRule::read(i, r)).collect::<Result<_, _>>()?
                }
                Some(v) => return Err(f.invalid("rules", v, "a sequence")),
            };
            raw.classify = RawClassify {
                header: f.text("header")?,
                trust_header: f.flag("trust_header")?,
                default: f.priority("default")?,
                rules,
            };
        }
        if let Some(f) = top.object("queue", &["enabled", "tick_ms", "max_waiting"])? {
            raw.queue = RawQueue {
                enabled: f.flag("enabled")?,
                tick_ms: f.num("tick_ms")?,
                max_waiting: f.num("max_waiting")?,
            };
        }
        const PROVIDER: [&str; 7] = [
            "style",
            "safe_threshold",
            "throttle_below",
            "max_retry_after_s",
            "probe_timeout_ms",
            "backoff_ms",
            "max_backoff_ms",
        ];
        if let Some(f) = top.object("provider", &PROVIDER)? {
            raw.provider = RawProvider {
                style: f.text("style")?,
                safe_threshold: f.num("safe_threshold")?,
                throttle_below: f.num("throttle_below")?,
                max_retry_after_s: f.num("max_retry_after_s")?,
                probe_timeout_ms: f.num("probe_timeout_ms")?,
                backoff_ms: f.num("backoff_ms")?,
                max_backoff_ms: f.num("max_backoff_ms")?,
            };
        }
        raw.role = top.variant(
            "role",
            &["standalone", "admission", "observer"],
            &[Role::Standalone, Role::Admission, Role::Observer],
        )?;
        const FALLBACK: [&str; 5] = ["enabled", "key_header", "max_entries", "max_body_bytes", "max_age_s"];
        if let Some(f) = top.object("fallback", &FALLBACK)? {
            raw.fallback = RawFallback {
                enabled: f.flag("enabled")?,
                key_header: f.text("key_header")?,
                max_entries: f.num("max_entries")?,
                max_body_bytes: f.num("max_body_bytes")?,
                max_age_s: f.num("max_age_s")?,
            };
        }
        if let Some(f) = top.object("tenant", &["key_header", "capacity", "refill_rate", "burst_allowance", "slots"])? {
            raw.tenant = Some(RawTenant {
                key_header: f.text("key_header")?,
                capacity: f.num("capacity")?,
                refill_rate: f.num("refill_rate")?,
                burst_allowance: f.num("burst_allowance")?,
                slots: f.num("slots")?,
            });
        }
        const TOKENS: [&str; 7] = [
            "capacity",
            "refill_rate",
            "burst_allowance",
            "output_default",
            "chars_per_token",
            "max_body_bytes",
            "per_model",
        ];
        if let Some(f) = top.object("tokens", &TOKENS)? {
            let per_model = f.named("per_model", |name, v| {
                let m = Fields::of(format!("tokens.per_model.{name}"), v, &["capacity", "refill_rate"])?;
                Ok(RawModel { capacity: m.num("capacity")?, refill_rate: m.num("refill_rate")? })
            })?;
            raw.tokens = Some(RawTokens {
                capacity: f.num("capacity")?,
                refill_rate: f.num("refill_rate")?,
                burst_allowance: f.num("burst_allowance")?,
                output_default: f.num("output_default")?,
                chars_per_token: f.num("chars_per_token")?,
                max_body_bytes: f.num("max_body_bytes")?,
                per_model,
            });
        }
        const ALERT: [&str; 6] = ["cluster", "path", "format", "min_interval_s", "timeout_ms", "shed_per_minute"];
        if let Some(f) = top.object("alert", &ALERT)? {
            use crate::alert::Format;
            raw.alert = Some(RawAlert {
                cluster: f.text("cluster")?,
                path: f.text("path")?,
                format: f.variant("format", &["alertmanager", "json"], &[Format::Alertmanager, Format::Json])?,
                min_interval_s: f.num("min_interval_s")?,
                timeout_ms: f.num("timeout_ms")?,
                shed_per_minute: f.num("shed_per_minute")?,
            });
        }
        const GLOBAL: [&str; 7] =
            ["cluster", "domain", "timeout_ms", "failure_mode", "descriptors", "max_lease", "lease_ms"];
        if let Some(f) = top.object("global", &GLOBAL)? {
            use crate::global::gate::FailureMode;
            let modes = FailureMode::NAMES;
            let descriptors = match f.get("descriptors") {
                None => None,
                Some(Value::Array(list)) => Some(
                    list.iter()
                        .enumerate()
                        .map(|(i, v)| {
                            let at = format!("global.descriptors[{i}]");
                            Ok(DescriptorEntry::ALL[pick(&at, v, &DescriptorEntry::NAMES)?])
                        })
                        .collect::<Result<Vec<_>, String>>()?,
                ),
                Some(v) => return Err(f.invalid("descriptors", v, "a sequence")),
            };
            raw.global = Some(RawGlobal {
                cluster: f.text("cluster")?,
                domain: f.text("domain")?,
                timeout_ms: f.num("timeout_ms")?,
                failure_mode: f.variant("failure_mode", &modes.map(|m| m.0), &modes.map(|m| m.1))?,
                descriptors,
                max_lease: f.num("max_lease")?,
                lease_ms: f.num("lease_ms")?,
            });
        }
        Ok(raw)
    }

    fn validate(self) -> Result<Config, String> {
        let d = Config::default();
        let name = match self.name {
            None => d.name,
            Some(n) => stat_token("name", n)?,
        };
        let b = self.bucket;
        let bucket = BucketConfig {
            capacity: whole("bucket.capacity", b.capacity, d.bucket.capacity, 1)?,
            refill_rate: positive("bucket.refill_rate", b.refill_rate, d.bucket.refill_rate)?,
            burst_allowance: whole("bucket.burst_allowance", b.burst_allowance, d.bucket.burst_allowance, 0)?,
            max_lease: whole_to("bucket.max_lease", b.max_lease, d.bucket.max_lease, 1, 10_000)?,
        };
        if b.key_header.is_some() {
            return Err("bucket.key_header: tenant buckets moved to \"tenant\" and now nest inside the provider \
                        bucket, e.g. {\"tenant\": {\"key_header\": \"x-llm-tenant\", \"capacity\": 10}}"
                .into());
        }
        let tenant = match self.tenant {
            None => None,
            Some(t) => Some(TenantConfig {
                key_header: header_name("tenant.key_header", t.key_header.unwrap_or_else(|| "x-llm-tenant".into()))?,
                capacity: whole("tenant.capacity", t.capacity, 10, 1)?,
                refill_rate: positive("tenant.refill_rate", t.refill_rate, 1.0)?,
                burst_allowance: whole("tenant.burst_allowance", t.burst_allowance, 0, 0)?,
                slots: whole_to("tenant.slots", t.slots, u64::from(crate::tenants::DEFAULT_SLOTS), 1, 65_536)?,
            }),
        };
        let tokens = self.tokens.map(RawTokens::validate).transpose()?;
        let alert = match self.alert {
            None => None,
            Some(a) => Some(AlertConfig {
                cluster: match a.cluster {
                    Some(c) if !c.is_empty() => c,
                    _ => return Err("alert.cluster: required: the Envoy cluster to send alerts to".into()),
                },
                path: match a.path {
                    None => "/api/v2/alerts".into(),
                    Some(p) if p.starts_with('/') => p,
                    Some(p) => return Err(format!("alert.path: must start with '/', got {p:?}")),
                },
                format: a.format.unwrap_or(crate::alert::Format::Alertmanager),
                min_interval_ms: whole("alert.min_interval_s", a.min_interval_s, 300, 1)? * 1000,
                timeout_ms: whole("alert.timeout_ms", a.timeout_ms, 1000, 1)?,
                shed_per_minute: whole("alert.shed_per_minute", a.shed_per_minute, 100, 0)?,
            }),
        };
        let global = self.global.map(|g| RawGlobal::validate(g, tenant.is_some())).transpose()?;
        let mut classes = d.classes.clone();
        for (name, raw) in self.priorities {
            let p = Priority::ALL.into_iter().find(|p| p.name() == name).ok_or_else(|| {
                format!("priorities: unknown variant `{name}`, expected one of `CRITICAL`, `HIGH`, `NORMAL`, `LOW`")
            })?;

            let at = |field: &str| format!("priorities.{}.{field}", p.name());
            let c = &mut classes[p.index()];
            c.weight = positive(&at("weight"), raw.weight, c.weight)?;
            c.queue_limit = whole(&at("queue_limit"), raw.queue_limit, c.queue_limit, 0)?;
            c.max_wait_ms = whole(&at("max_wait_ms"), raw.max_wait_ms, c.max_wait_ms, 0)?;
            c.use_burst = raw.use_burst.unwrap_or(c.use_burst);
            if raw.max_retries.is_some() {
                c.max_retries = Some(whole(&at("max_retries"), raw.max_retries, 0, 0)?);
            }
        }
        let k = self.classify;
        let rules = k.rules.into_iter().enumerate().map(|(i, r)| r.validate(i)).collect::<Result<_, _>>()?;
        let classify = ClassifyConfig {
            header: match k.header {
                None => d.classify.header,
                Some(h) => header_name("classify.header", h)?,
            },
            trust_header: k.trust_header.unwrap_or(d.classify.trust_header),
            default: k.default.unwrap_or(d.classify.default),
            rules,
        };
        let q = self.queue;
        let queue = QueueConfig {
            enabled: q.enabled.unwrap_or(d.queue.enabled),
            tick_ms: whole("queue.tick_ms", q.tick_ms, d.queue.tick_ms, 1)?,
            max_waiting: whole("queue.max_waiting", q.max_waiting, d.queue.max_waiting, 0)?,
        };
        let provider = self.provider.validate(d.provider)?;
        let role = self.role.unwrap_or(d.role);
        let f = self.fallback;
        let fallback = FallbackConfig {
            enabled: f.enabled.unwrap_or(d.fallback.enabled),
            key_header: match f.key_header {
                None => d.fallback.key_header,
                Some(h) => header_name("fallback.key_header", h)?,
            },
            max_entries: whole_to("fallback.max_entries", f.max_entries, d.fallback.max_entries, 1, 100_000)?,
            max_body_bytes: whole("fallback.max_body_bytes", f.max_body_bytes, d.fallback.max_body_bytes, 1)?,
            max_age_ms: whole("fallback.max_age_s", f.max_age_s, d.fallback.max_age_ms / 1000, 1)? * 1000,
        };
        Ok(Config { name, bucket, classes, classify, queue, provider, role, fallback, tenant, tokens, alert, global })
    }
}

impl RawGlobal {
    fn validate(self, has_tenant: bool) -> Result<GlobalConfig, String> {
        use crate::global::gate::{FailureMode, GateRules};
        let cluster = match self.cluster {
            Some(c) if !c.is_empty() => c,
            _ => return Err("global.cluster: required: the Envoy cluster (HTTP/2) of the rate limit service".into()),
        };
        let domain = match self.domain {
            None => "llm-ratelimit".into(),
            Some(d) if !d.is_empty() && d.len() <= 256 => d,
            Some(d) => return Err(format!("global.domain: must be 1 to 256 bytes, got {d:?}")),
        };
        let descriptors = self.descriptors.unwrap_or_else(|| vec![DescriptorEntry::Provider, DescriptorEntry::Unit]);
        if descriptors.is_empty() {
            return Err("global.descriptors: must name at least one entry".into());
        }
        for (i, e) in descriptors.iter().enumerate() {
            if descriptors[..i].contains(e) {
                return Err(format!("global.descriptors: `{}` appears twice", e.name()));
            }
        }
        if descriptors.contains(&DescriptorEntry::Tenant) && !has_tenant {
            return Err("global.descriptors: `tenant` needs the \"tenant\" section (its key_header)".into());
        }
        let timeout_ms = whole_to("global.timeout_ms", self.timeout_ms, 50, 1, 60_000)?;
        let max_lease = whole_to("global.max_lease", self.max_lease, 256, 1, 10_000)?;
        let lease_ms = whole_to("global.lease_ms", self.lease_ms, 1000, 1, 60_000)?;
        let failure_mode = self.failure_mode.unwrap_or(FailureMode::Local);
        Ok(GlobalConfig {
            cluster,
            domain,
            descriptors,
            gate: GateRules { timeout_ms, failure_mode, max_lease, lease_ms },
        })
    }
}

impl RawTokens {
    fn validate(self) -> Result<TokensConfig, String> {
        if self.capacity.is_none() {
            return Err("tokens.capacity: required to limit tokens (leave out \"tokens\" for no token limit)".into());
        }
        if self.per_model.len() > MAX_MODELS {
            return Err(format!("tokens.per_model: at most {MAX_MODELS} models, got {}", self.per_model.len()));
        }
        let per_model = self
            .per_model
            .into_iter()
            .map(|(name, m)| {
                let at = |f: &str| format!("tokens.per_model.{name}.{f}");
                if name.is_empty() || name.len() > 256 {
                    return Err(format!("tokens.per_model: a model name must be 1-256 bytes, got {name:?}"));
                }
                if m.capacity.is_none() {
                    return Err(format!("{}: required", at("capacity")));
                }
                let capacity = whole(&at("capacity"), m.capacity, 0, 1)?;
                let limit = ModelLimit {
                    capacity,
                    refill_rate: positive(&at("refill_rate"), m.refill_rate, per_minute(capacity))?,
                };
                Ok((name, limit))
            })
            .collect::<Result<_, String>>()?;
        let capacity = whole("tokens.capacity", self.capacity, 0, 1)?;
        Ok(TokensConfig {
            capacity,
            // Providers state token limits per minute: by default the bucket refills in one.
            refill_rate: positive("tokens.refill_rate", self.refill_rate, per_minute(capacity))?,
            burst_allowance: whole("tokens.burst_allowance", self.burst_allowance, 0, 0)?,
            output_default: whole("tokens.output_default", self.output_default, 1024, 0)?,
            chars_per_token: positive("tokens.chars_per_token", self.chars_per_token, 4.0)?,
            max_body_bytes: whole("tokens.max_body_bytes", self.max_body_bytes, 1 << 20, 1)?,
            per_model,
        })
    }
}

impl RawProvider {
    fn validate(self, d: ProviderConfig) -> Result<ProviderConfig, String> {
        let style = match self.style {
            None => d.style,
            Some(name) => Provider::parse(&name).ok_or_else(|| {
                let all: Vec<&str> = Provider::ALL.iter().map(|p| p.name()).collect();
                format!("provider.style: unknown provider {name:?}, expected one of {}", one_of(&all))
            })?,
        };
        let b = d.breaker;
        let breaker = breaker::BreakerRules {
            safe_threshold: fraction("provider.safe_threshold", self.safe_threshold, b.safe_threshold)?,
            throttle_below: fraction("provider.throttle_below", self.throttle_below, b.throttle_below)?,
            max_wait_ms: whole("provider.max_retry_after_s", self.max_retry_after_s, b.max_wait_ms / 1000, 1)? * 1000,
            probe_timeout_ms: whole("provider.probe_timeout_ms", self.probe_timeout_ms, b.probe_timeout_ms, 1)?,
            backoff_ms: whole("provider.backoff_ms", self.backoff_ms, b.backoff_ms, 1)?,
            max_backoff_ms: whole("provider.max_backoff_ms", self.max_backoff_ms, b.max_backoff_ms, 1)?,
            terminal_block_ms: b.terminal_block_ms,
        };
        Ok(ProviderConfig { style, breaker })
    }
}

impl RawRule {
    fn read(i: usize, v: &Value) -> Result<RawRule, String> {
        let f = Fields::of(format!("classify.rules[{i}]"), v, &["path_prefix", "header", "value", "priority"])?;
        let priority = f.priority("priority")?.ok_or_else(|| format!("{}: missing field `priority`", f.at))?;
        Ok(RawRule {
            path_prefix: f.text("path_prefix")?,
            header: f.text("header")?,
            value: f.text("value")?,
            priority,
        })
    }

    fn validate(self, i: usize) -> Result<Rule, String> {
        let at = format!("classify.rules[{i}]");
        let matcher = match (self.path_prefix, self.header, self.value) {
            (Some(p), None, None) if p.starts_with('/') => Matcher::PathPrefix(p),
            (Some(p), None, None) => return Err(format!("{at}.path_prefix: must start with '/', got {p:?}")),
            (None, Some(h), Some(value)) => Matcher::Header { name: header_name(&format!("{at}.header"), h)?, value },
            _ => {
                return Err(format!(
                    "{at}: a rule needs either \"path_prefix\" or both \"header\" and \"value\", plus \"priority\""
                ))
            }
        };
        Ok(Rule { matcher, priority: self.priority })
    }
}

/// A whole number >= `min` (JSON numbers arrive as f64 so that `1.5` gets a clear message).
/// `whole`, at most `max`.
fn whole_to(field: &str, v: Option<f64>, default: u64, min: u64, max: u64) -> Result<u64, String> {
    match whole(field, v, default, min)? {
        n if n > max => Err(format!("{field}: must be a whole number from {min} to {max}, got {n}")),
        n => Ok(n),
    }
}

fn whole(field: &str, v: Option<f64>, default: u64, min: u64) -> Result<u64, String> {
    match v {
        None => Ok(default),
        Some(x) if x.fract() == 0.0 && x >= min as f64 && x <= 1e15 => Ok(x as u64),
        Some(x) if x > 1e15 => Err(format!("{field}: must be a whole number from {min} to 10^15, got {}", show(x))),
        Some(x) => Err(format!("{field}: must be a whole number >= {min}, got {}", show(x))),
    }
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

fn per_minute(capacity: u64) -> f64 {
    capacity as f64 / 60.0
}

/// A number > 0 and at most 10^15, the cap whole numbers have: every rate, weight and ratio in
/// the configuration stays far from where the filter's arithmetic would saturate.
fn positive(field: &str, v: Option<f64>, default: f64) -> Result<f64, String> {
    match v {
        None => Ok(default),
        Some(x) if x.is_finite() && x > 0.0 && x <= 1e15 => Ok(x),
        Some(x) if x > 1e15 => Err(format!("{field}: must be a number > 0 and at most 10^15, got {}", show(x))),
        Some(x) => Err(format!("{field}: must be a number > 0, got {}", show(x))),
    }
}

/// A number as JSON writes it (serde_json's formatter, not core's: the `.wasm` carries one).
fn show(x: f64) -> String {
    match serde_json::Number::from_f64(x) {
        Some(_) if x.fract() == 0.0 && x.abs() < 1e15 => (x as i64).to_string(),
        Some(n) => n.to_string().replace("e+", "e"),
        None => "a number out of range".into(),
    }
}

/// A number from 0 to 1.
fn fraction(field: &str, v: Option<f64>, default: f64) -> Result<f64, String> {
    match v {
        None => Ok(default),
        Some(x) if (0.0..=1.0).contains(&x) => Ok(x),
        Some(x) => Err(format!("{field}: must be a number from 0 to 1, got {}", show(x))),
    }
}

/// A non-empty HTTP header name, lower-cased as Envoy stores it.
fn header_name(field: &str, h: String) -> Result<String, String> {
    let ok = !h.is_empty() && h.bytes().all(|c| c.is_ascii_alphanumeric() || b"-_".contains(&c));
    if ok {
        Ok(h.to_ascii_lowercase())
    } else {
        Err(format!("{field}: must be a header name of letters, digits, '-' or '_', got {h:?}"))
    }
}

/// A token that can stand inside a stat name: no dots, so Envoy's tag regexes stay exact.
fn stat_token(field: &str, s: String) -> Result<String, String> {
    let ok = !s.is_empty() && s.len() <= 64 && s.bytes().all(|c| c.is_ascii_alphanumeric() || b"-_".contains(&c));
    if ok {
        Ok(s)
    } else {
        Err(format!("{field}: must be 1-64 letters, digits, '-' or '_', got {s:?}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    fn err(json: &str) -> String {
        Config::parse(json.as_bytes()).expect_err("config should be rejected")
    }

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
    fn malformed_rules_are_explained() {
        let e = err(r#"{"classify":{"rules":[{"priority":"LOW"}]}}"#);
        assert!(e.starts_with("classify.rules[0]: a rule needs either"), "{e}");
        let e = err(r#"{"classify":{"rules":[{"path_prefix":"v1","priority":"LOW"}]}}"#);
        assert!(e.starts_with("classify.rules[0].path_prefix: must start with '/'"), "{e}");
        let e = err(r#"{"classify":{"rules":[{"header":"x","priority":"LOW"}]}}"#);
        assert!(e.starts_with("classify.rules[0]:"), "{e}");
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

    #[test]
    fn alerts_are_off_by_default_and_need_a_cluster() {
        assert_eq!(Config::default().alert, None);
        let a = Config::parse(br#"{"alert":{"cluster":"alertmanager"}}"#).unwrap().alert.unwrap();
        assert_eq!(
            (a.path.as_str(), a.format, a.min_interval_ms),
            ("/api/v2/alerts", crate::alert::Format::Alertmanager, 300_000)
        );
        assert_eq!((a.timeout_ms, a.shed_per_minute), (1000, 100));
        assert!(err(r#"{"alert":{}}"#).starts_with("alert.cluster: required"));
        assert!(
            err(r#"{"alert":{"cluster":"x","format":"slack"}}"#).starts_with("alert.format: unknown variant `slack`")
        );
        assert!(err(r#"{"alert":{"cluster":"x","path":"v2"}}"#).starts_with("alert.path: must start with '/'"));
    }
}
