//! The README's stats table is the filter's: natively, against the stats the filter defines
//! (from the one table in `src/host/metrics.rs`); and in the real Envoy, on its admin endpoint,
//! with Prometheus labels from the `stats_tags` in `envoy/envoy.yaml`.

mod fake_envoy;
mod support;
use fake_envoy::Vm;
use llm_ratelimit::host::api::Metric;
use llm_ratelimit::host::double::Process;
use std::collections::BTreeMap;
use support::*;

const CLASSES: [&str; 4] = ["critical", "high", "normal", "low"];
/// With a failover target "b" (for CRITICAL only: the NORMAL requests below stay), so its stats
/// are defined too.
const CONFIG: &str = r#"{"name":"st","bucket":{"capacity":3,"refill_rate":0.01,"burst_allowance":0},"queue":{"enabled":false},
    "failover":[{"provider":{"name":"b"},"classes":["CRITICAL"]}]}"#;

/// Natively (no Envoy): every stat the filter defines, on a host double, is in the README's table
/// with its type, and the table lists no other.
#[test]
fn the_readme_documents_every_defined_stat_and_no_other() {
    let vm = Vm::start(&Process::new(1_700_000_000_000_000_000), 1, CONFIG).expect("configured");
    let prefix = "llm_ratelimit.provider.st.";
    let mut defined = BTreeMap::new();
    for (name, kind, _) in vm.host.state().metrics.iter() {
        let stat = name.strip_prefix(prefix).unwrap_or_else(|| panic!("{name} is not under {prefix}"));
        let kind = match kind {
            Metric::Counter => "counter",
            Metric::Gauge => "gauge",
            Metric::Histogram => "histogram",
        };
        defined.insert(stat.to_string(), kind.to_string());
    }
    assert!(defined.len() > 80, "{defined:?}");
    let mut documented = BTreeMap::new();
    for (name, kind) in documented_stats() {
        for n in expand(&name) {
            assert!(documented.insert(n.clone(), kind.clone()).is_none(), "{n} is in the README twice");
        }
    }
    let wrong: Vec<String> = defined
        .iter()
        .filter(|(n, k)| documented.get(*n) != Some(k))
        .map(|(n, k)| format!("{n} ({k}, README: {})", documented.get(n).map_or("missing", |d| d.as_str())))
        .collect();
    assert!(wrong.is_empty(), "defined stats the README lacks or types wrongly: {wrong:?}");
    let extra: Vec<&String> = documented.keys().filter(|n| !defined.contains_key(*n)).collect();
    assert!(extra.is_empty(), "stats the README lists that the filter does not define: {extra:?}");
}

#[test]
fn every_documented_stat_is_on_the_admin_endpoint() {
    let mock = Mock::start(&[]);
    let envoy = Envoy::start(CONFIG, 2, mock.port);
    let replies = burst(&envoy.url("/v1/chat/completions"), 5, 1, &[]);
    assert_eq!(count(&replies, 200), 3);

    // Every stat the README's table lists, by its name and type.
    let stats = envoy.stats();
    let histograms = envoy.admin_text("/stats?filter=llm_ratelimit&type=Histograms");
    let documented = documented_stats();
    assert!(documented.len() > 30, "{documented:?}");
    for (name, kind) in documented {
        for n in expand(&name) {
            let full = format!("llm_ratelimit.provider.st.{n}");
            if kind == "histogram" {
                assert!(histograms.contains(&full), "missing histogram {full}");
            } else {
                assert!(stats.contains_key(&format!("wasmcustom.{full}")), "missing {kind} {full}");
            }
        }
    }
    assert_eq!(stats["wasmcustom.llm_ratelimit.provider.st.priority.normal.admitted"], 3);
    assert_eq!(stats["wasmcustom.llm_ratelimit.provider.st.priority.normal.rejected"], 2);
    assert_eq!(stats["wasmcustom.llm_ratelimit.provider.st.bucket.tokens"], 0);
    assert_eq!(stats["wasmcustom.llm_ratelimit.provider.st.errors"], 0);
    assert!(histograms.contains("llm_ratelimit.provider.st.priority.normal.queue_wait_ms"), "{histograms}");
    assert!(histograms.contains("llm_ratelimit.provider.st.retry_after_s"), "{histograms}");

    let prom = envoy.admin_text("/stats/prometheus");
    for line in [
        "llm_ratelimit_admitted{provider=\"st\",priority=\"normal\"} 3",
        "llm_ratelimit_rejected{provider=\"st\",priority=\"normal\"} 2",
        "llm_ratelimit_admitted{provider=\"st\",priority=\"critical\"} 0",
        "llm_ratelimit_queue_depth{provider=\"st\",priority=\"low\"} 0",
        "llm_ratelimit_bucket_tokens{provider=\"st\"} 0",
        "llm_ratelimit_errors{provider=\"st\"} 0",
        "llm_ratelimit_breaker_state{provider=\"st\"} 0",
    ] {
        assert!(prom.lines().any(|l| l == line), "missing Prometheus line {line}");
    }
}

/// A documented name as stats are named: `priority.<class>.*` once per class, `failover.<target>.*`
/// for `CONFIG`'s target.
fn expand(name: &str) -> Vec<String> {
    if let Some(stat) = name.strip_prefix("failover.<target>.") {
        return vec![format!("failover.b.{stat}")];
    }
    match name.strip_prefix("priority.<class>.") {
        Some(stat) => CLASSES.iter().map(|c| format!("priority.{c}.{stat}")).collect(),
        None => vec![name.to_string()],
    }
}

/// (name, type) of every row of the README's stats table; `a` / `b` rows give both names.
fn documented_stats() -> Vec<(String, String)> {
    let readme = std::fs::read_to_string(root().join("README.md")).expect("README.md");
    let table = readme.split("\n## Stats").nth(1).and_then(|t| t.split("\n## ").next()).expect("## Stats");
    let mut out = Vec::new();
    for row in table.lines().filter(|l| l.starts_with("| `")) {
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        let kind = cells[2].to_string();
        for name in cells[1].split(" / ") {
            out.push((name.trim_matches('`').to_string(), kind.clone()));
        }
    }
    out
}
