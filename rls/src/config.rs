//! The limits: YAML files in the schema of envoyproxy/ratelimit (`domain`, nested `descriptors`
//! of `key` / optional `value` / `rate_limit {unit, requests_per_unit, unlimited, name}` /
//! `shadow_mode`), looked up the way envoyproxy/ratelimit looks them up, so a user can move
//! between the two services without touching Envoy.

use std::collections::HashMap;
use std::path::Path;

use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::rate_limit::Unit;
use llm_ratelimit::calendar::{Period, TimeZone};
use serde::Deserialize;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct YamlRoot {
    #[serde(default)]
    domain: String,
    #[serde(default)]
    descriptors: Vec<YamlDescriptor>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct YamlDescriptor {
    #[serde(default)]
    key: String,
    #[serde(default)]
    value: String,
    rate_limit: Option<YamlRateLimit>,
    #[serde(default)]
    descriptors: Vec<YamlDescriptor>,
    #[serde(default)]
    shadow_mode: bool,
    // Accepted so that envoyproxy/ratelimit files load; only naming of stats there.
    #[serde(default)]
    detailed_metric: bool,
    #[serde(default)]
    value_to_metric: bool,
    #[serde(default)]
    metadata: Option<serde_yaml_ng::Value>,
    // Accepted only when off: they change what is limited, and are not implemented here.
    #[serde(default)]
    quota_mode: bool,
    #[serde(default)]
    share_threshold: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct YamlRateLimit {
    #[serde(default)]
    requests_per_unit: u32,
    #[serde(default)]
    unit: String,
    #[serde(default)]
    unlimited: bool,
    #[serde(default)]
    name: String,
    #[serde(default)]
    replaces: Vec<serde_yaml_ng::Value>,
    // Extensions: the time zone of a calendar window (`day`, `month`), and a sliding window for
    // those units instead.
    time_zone: Option<String>,
    #[serde(default)]
    rolling: bool,
}

/// One limit from the file, or from a descriptor's own `limit` override.
#[derive(Clone, Debug, PartialEq)]
pub struct Limit {
    pub requests_per_unit: u32,
    pub unit: Unit,
    pub unlimited: bool,
    pub shadow_mode: bool,
    pub name: String,
    pub window: Window,
}

/// How a limit counts time.
#[derive(Clone, Debug, PartialEq)]
pub enum Window {
    /// The last `unit_seconds(unit)`, at every instant (second, minute, hour, week, year, and day
    /// or month with `rolling: true`).
    Sliding,
    /// A fixed window from one local midnight (day) or first of the month (month) to the next, in
    /// a time zone: `unit: day` and `unit: month` unless `rolling: true`.
    Calendar(Calendar),
}

/// A calendar window's period and time zone.
#[derive(Clone, Debug, PartialEq)]
pub struct Calendar {
    pub period: Period,
    pub time_zone: TimeZone,
    /// As written in the file ("UTC" by default), for /usage.
    pub time_zone_name: String,
}

impl Window {
    /// `day` and `month` count calendar windows in `time_zone` (UTC when `None`), unless `rolling`.
    pub fn of(unit: Unit, rolling: bool, time_zone: Option<&str>) -> Result<Window, String> {
        let period = match unit {
            Unit::Day if !rolling => Period::Day,
            Unit::Month if !rolling => Period::Month,
            _ => {
                return match time_zone {
                    None => Ok(Window::Sliding),
                    Some(_) => Err("only a calendar window (unit day or month, without rolling: true) has a time \
                                    zone"
                        .into()),
                }
            }
        };
        let (time_zone, time_zone_name) = match time_zone {
            None => (TimeZone::UTC, "UTC".to_string()),
            Some(rule) => (TimeZone::parse(rule).map_err(|e| format!("'{rule}': {e}"))?, rule.to_string()),
        };
        Ok(Window::Calendar(Calendar { period, time_zone, time_zone_name }))
    }
}

#[derive(Default, Debug)]
struct Node {
    /// Children by `key` (matches any value) or `key_value` (matches that value), as
    /// envoyproxy/ratelimit keys them.
    children: HashMap<String, Node>,
    limit: Option<Limit>,
}

/// All domains of all loaded files.
#[derive(Default, Debug)]
pub struct Config {
    domains: HashMap<String, Node>,
}

/// The length of a unit's window in seconds (months and years as envoyproxy/ratelimit counts them).
pub fn unit_seconds(unit: Unit) -> u64 {
    match unit {
        Unit::Unknown => 0,
        Unit::Second => 1,
        Unit::Minute => 60,
        Unit::Hour => 3600,
        Unit::Day => 86_400,
        Unit::Week => 7 * 86_400,
        Unit::Month => 30 * 86_400,
        Unit::Year => 365 * 86_400,
    }
}

impl Config {
    /// Loads a file, or every `*.yaml` / `*.yml` file of a directory (as envoyproxy/ratelimit
    /// loads `$RUNTIME_ROOT/$RUNTIME_SUBDIRECTORY/config/`).
    pub fn load(path: &Path) -> Result<Config, String> {
        let mut config = Config::default();
        if path.is_dir() {
            let mut files: Vec<_> = std::fs::read_dir(path)
                .map_err(|e| format!("{}: {e}", path.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
                .collect();
            files.sort();
            for file in files {
                config.add_file(&file)?;
            }
        } else {
            config.add_file(path)?;
        }
        Ok(config)
    }

    fn add_file(&mut self, path: &Path) -> Result<(), String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        self.add_yaml(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Adds one file's text; errors name the field, as `descriptors[0].rate_limit.unit: ...`.
    pub fn add_yaml(&mut self, text: &str) -> Result<(), String> {
        let root: YamlRoot = serde_yaml_ng::from_str(text).map_err(|e| e.to_string())?;
        if root.domain.is_empty() {
            return Err("domain: config file cannot have empty domain".into());
        }
        if self.domains.contains_key(&root.domain) {
            return Err(format!("domain: duplicate domain '{}'", root.domain));
        }
        let mut node = Node::default();
        load_descriptors(&mut node, &root.descriptors, "descriptors")?;
        self.domains.insert(root.domain, node);
        Ok(())
    }

    /// The limit for a descriptor's entries, found as envoyproxy/ratelimit finds it: at each
    /// entry `key_value` first, then `key`; the limit counts only at the last entry.
    pub fn limit(&self, domain: &str, entries: &[(&str, &str)]) -> Option<&Limit> {
        let mut node = self.domains.get(domain)?;
        for (i, (key, value)) in entries.iter().enumerate() {
            let next = node.children.get(&format!("{key}_{value}")).or_else(|| node.children.get(*key))?;
            if i == entries.len() - 1 {
                return next.limit.as_ref();
            }
            if next.children.is_empty() {
                return None;
            }
            node = next;
        }
        None
    }
}

fn load_descriptors(parent: &mut Node, list: &[YamlDescriptor], path: &str) -> Result<(), String> {
    for (i, d) in list.iter().enumerate() {
        let here = format!("{path}[{i}]");
        if d.key.is_empty() {
            return Err(format!("{here}.key: descriptor has empty key"));
        }
        if d.value.contains('*') {
            return Err(format!("{here}.value: wildcard values are not supported"));
        }
        if d.quota_mode {
            return Err(format!("{here}.quota_mode: not supported"));
        }
        if d.share_threshold {
            return Err(format!("{here}.share_threshold: not supported (no wildcard values)"));
        }
        let _ = (d.detailed_metric, d.value_to_metric, &d.metadata);
        let composite = if d.value.is_empty() { d.key.clone() } else { format!("{}_{}", d.key, d.value) };
        if parent.children.contains_key(&composite) {
            return Err(format!("{here}: duplicate descriptor composite key '{composite}'"));
        }
        let mut node = Node::default();
        if let Some(rl) = &d.rate_limit {
            node.limit = Some(parse_limit(rl, d.shadow_mode, &format!("{here}.rate_limit"))?);
        }
        load_descriptors(&mut node, &d.descriptors, &format!("{here}.descriptors"))?;
        parent.children.insert(composite, node);
    }
    Ok(())
}

fn parse_limit(rl: &YamlRateLimit, shadow_mode: bool, here: &str) -> Result<Limit, String> {
    if !rl.replaces.is_empty() {
        return Err(format!("{here}.replaces: not supported"));
    }
    let unit = match Unit::from_str_name(&rl.unit.to_ascii_uppercase()) {
        Some(Unit::Unknown) | None if !rl.unit.is_empty() => {
            return Err(format!(
                "{here}.unit: invalid rate limit unit '{}' (second, minute, hour, day, week, month or year)",
                rl.unit
            ))
        }
        Some(unit) => unit,
        None => Unit::Unknown,
    };
    if rl.unlimited && unit != Unit::Unknown {
        return Err(format!("{here}.unit: should not specify rate limit unit when unlimited"));
    }
    if !rl.unlimited && unit == Unit::Unknown {
        return Err(format!("{here}.unit: missing (second, minute, hour, day, week, month or year)"));
    }
    let window = if rl.unlimited {
        if rl.time_zone.is_some() {
            return Err(format!("{here}.time_zone: an unlimited limit has no window"));
        }
        Window::Sliding
    } else {
        Window::of(unit, rl.rolling, rl.time_zone.as_deref()).map_err(|e| format!("{here}.time_zone: {e}"))?
    };
    Ok(Limit {
        requests_per_unit: rl.requests_per_unit,
        unit,
        unlimited: rl.unlimited,
        shadow_mode,
        name: rl.name.clone(),
        window,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const YAML: &str = "
domain: llm-ratelimit
descriptors:
  - key: provider
    descriptors:
      - key: unit
        value: requests
        rate_limit: {unit: second, requests_per_unit: 100}
      - key: unit
        value: tokens
        rate_limit: {unit: minute, requests_per_unit: 90000}
  - key: provider
    value: internal
    rate_limit: {unlimited: true}
  - key: tenant
    shadow_mode: true
    rate_limit: {unit: Hour, requests_per_unit: 5}
";

    fn config() -> Config {
        let mut c = Config::default();
        c.add_yaml(YAML).unwrap();
        c
    }

    #[test]
    fn looks_up_like_envoyproxy_ratelimit() {
        let c = config();
        let l = c.limit("llm-ratelimit", &[("provider", "openai"), ("unit", "tokens")]).unwrap();
        assert_eq!((l.requests_per_unit, l.unit), (90000, Unit::Minute));
        let l = c.limit("llm-ratelimit", &[("provider", "x"), ("unit", "requests")]).unwrap();
        assert_eq!((l.requests_per_unit, l.unit), (100, Unit::Second));
        assert!(c.limit("llm-ratelimit", &[("provider", "internal")]).unwrap().unlimited);
        assert!(c.limit("llm-ratelimit", &[("tenant", "a")]).unwrap().shadow_mode);
        // No limit: at the wrong depth, on an unknown value or domain.
        assert_eq!(c.limit("llm-ratelimit", &[("provider", "openai")]), None);
        assert_eq!(c.limit("llm-ratelimit", &[("provider", "a"), ("unit", "x")]), None);
        assert_eq!(c.limit("llm-ratelimit", &[("tenant", "a"), ("unit", "requests")]), None);
        assert_eq!(c.limit("other", &[("provider", "a")]), None);
    }

    #[test]
    fn day_and_month_are_calendar_windows_unless_rolling() {
        let mut c = Config::default();
        c.add_yaml(
            "domain: d
descriptors:
  - {key: a, rate_limit: {unit: day, requests_per_unit: 1}}
  - {key: b, rate_limit: {unit: month, requests_per_unit: 1, time_zone: 'PST8PDT,M3.2.0,M11.1.0'}}
  - {key: c, rate_limit: {unit: day, requests_per_unit: 1, rolling: true}}
  - {key: e, rate_limit: {unit: week, requests_per_unit: 1}}
  - {key: f, rate_limit: {unit: minute, requests_per_unit: 1, rolling: true}}
",
        )
        .unwrap();
        let window = |key| c.limit("d", &[(key, "x")]).unwrap().window.clone();
        let calendar = |period, name: &str| {
            let time_zone = if name == "UTC" { TimeZone::UTC } else { TimeZone::parse(name).unwrap() };
            Window::Calendar(Calendar { period, time_zone, time_zone_name: name.into() })
        };
        assert_eq!(window("a"), calendar(Period::Day, "UTC"));
        assert_eq!(window("b"), calendar(Period::Month, "PST8PDT,M3.2.0,M11.1.0"));
        for key in ["c", "e", "f"] {
            assert_eq!(window(key), Window::Sliding, "{key}");
        }
    }

    #[test]
    fn the_shipped_limits_load() {
        let mut c = Config::default();
        c.add_yaml(include_str!("../limits.yaml")).unwrap();
        let l = c.limit("llm-ratelimit", &[("provider", "openai"), ("tenant", "acme"), ("unit", "cost")]).unwrap();
        assert_eq!((l.requests_per_unit, l.unit), (1_000_000, Unit::Day));
        assert!(matches!(&l.window, Window::Calendar(cal) if cal.time_zone_name == "UTC"));
    }

    fn error(yaml: &str) -> String {
        Config::default().add_yaml(yaml).unwrap_err()
    }

    #[test]
    fn errors_name_the_field() {
        let e = error("domain: d\ndescriptors:\n  - key: a\n    rate_limit: {unit: fortnight, requests_per_unit: 1}\n");
        assert!(e.starts_with("descriptors[0].rate_limit.unit: invalid rate limit unit 'fortnight'"), "{e}");
        let e = error("domain: d\ndescriptors:\n  - key: a\n    rate_limit: {unit: second, requests_per_unt: 1}\n");
        assert!(e.contains("descriptors[0].rate_limit: unknown field `requests_per_unt`"), "{e}");
        let e = error("domain: d\ndescriptors:\n  - key: a\n    descriptors: [{value: b}]\n");
        assert!(e.starts_with("descriptors[0].descriptors[0].key: descriptor has empty key"), "{e}");
        let e = error("domain: d\ndescriptors:\n  - key: a\n    rate_limit: {unit: second, requests_per_unit: -1}\n");
        assert!(e.contains("descriptors[0].rate_limit.requests_per_unit"), "{e}");
        assert!(error("descriptors: []\n").starts_with("domain: "));
        assert!(error("domain: d\ndescriptors:\n  - {key: a}\n  - {key: a}\n").contains("duplicate"));
        assert!(error("domain: [\n").contains("line"));
        let e = error("domain: d\ndescriptors:\n  - key: a\n    rate_limit: {unlimited: true, unit: second}\n");
        assert!(e.contains("when unlimited"), "{e}");
        let e = error(
            "domain: d\ndescriptors:\n  - key: a\n    rate_limit: {unit: day, requests_per_unit: 1, time_zone: PST}\n",
        );
        assert!(e.starts_with("descriptors[0].rate_limit.time_zone: 'PST': not a POSIX TZ rule"), "{e}");
        let e = error(
            "domain: d\ndescriptors:\n  - key: a\n    rate_limit: {unit: hour, requests_per_unit: 1, time_zone: UTC}\n",
        );
        assert!(e.starts_with("descriptors[0].rate_limit.time_zone: only a calendar window"), "{e}");
        let e = error("domain: d\ndescriptors:\n  - key: a\n    rate_limit: {unlimited: true, time_zone: UTC}\n");
        assert!(e.starts_with("descriptors[0].rate_limit.time_zone: "), "{e}");
    }
}
