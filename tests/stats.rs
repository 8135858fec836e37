//! The documented stats appear on Envoy's admin endpoint, with Prometheus labels from the
//! `stats_tags` in `envoy/envoy.yaml`.

mod support;
use support::*;

const CLASSES: [&str; 4] = ["critical", "high", "normal", "low"];
const CLASS_COUNTERS: [&str; 7] = ["admitted", "rejected", "queued", "released", "shed", "expired", "cancelled"];

#[test]
fn every_documented_stat_is_on_the_admin_endpoint() {
    let mock = Mock::start(&[]);
    let config =
        r#"{"name":"st","bucket":{"capacity":3,"refill_rate":0.01,"burst_allowance":0},"queue":{"enabled":false}}"#;
    let envoy = Envoy::start(config, 2, mock.port);
    let replies = burst(&envoy.url("/v1/chat/completions"), 5, 1, &[]);
    assert_eq!(count(&replies, 200), 3);

    // Every stat the README's table lists, by its name and type.
    let stats = envoy.stats();
    let histograms = envoy.admin_text("/stats?filter=llm_ratelimit&type=Histograms");
    let documented = documented_stats();
    assert!(documented.len() > 30, "{documented:?}");
    for (name, kind) in documented {
        let names: Vec<String> = match name.strip_prefix("priority.<class>.") {
            Some(stat) => CLASSES.iter().map(|c| format!("priority.{c}.{stat}")).collect(),
            None => vec![name.clone()],
        };
        for n in names {
            let full = format!("llm_ratelimit.provider.st.{n}");
            if kind == "histogram" {
                assert!(histograms.contains(&full), "missing histogram {full}");
            } else {
                assert!(stats.contains_key(&format!("wasmcustom.{full}")), "missing {kind} {full}");
            }
        }
    }
    for class in CLASSES {
        for stat in CLASS_COUNTERS.iter().chain(&["queue_depth"]) {
            let name = format!("wasmcustom.llm_ratelimit.provider.st.priority.{class}.{stat}");
            assert!(stats.contains_key(&name), "missing {name}");
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
