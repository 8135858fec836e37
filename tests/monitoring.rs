//! The monitoring files against the real things: `promtool` checks the Prometheus config and runs
//! the alert unit tests, and a real Prometheus, configured from deploy/prometheus/prometheus.yml,
//! scrapes a real Envoy with the filter under traffic and evaluates deploy/prometheus/alerts.yaml;
//! then every PromQL expression of the dashboard and of the rules must parse and run, and those
//! over stats that moved must return numbers.
//!
//! Prometheus and promtool come from Debian's `prometheus` package (`scripts/setup.sh --test`
//! installs it); without them these tests say so and pass.

mod support;
use serde_json::Value;
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use support::*;

/// Stats the dashboard plots that the filter does not export yet (added on another branch):
/// while Envoy has none of them, expressions over them may return nothing.
const PENDING: &[&str] =
    &["llm_ratelimit_retry_attempts", "llm_ratelimit_retry_succeeded", "llm_ratelimit_retry_exhausted"];

/// Stats that move only on events this test does not cause, so expressions over them may return
/// no number (a histogram quantile over no observations is NaN):
/// - `reset.error_ms` is observed when the provider's later answers (429s for a window already
///   held, a failed probe) place the reset elsewhere than the one used; the mock provider's
///   resets are exact.
/// - Retry shares (`upstream_rq_retry_success` of `upstream_rq_retry`, the filter's
///   `retry_exhausted` of `retry_attempts`) are 0/0 while the router has retried nothing: it
///   retries provider 429s, which the observer's holds mostly prevent.
const MAY_BE_EMPTY: &[&str] =
    &["llm_ratelimit_reset_error_ms_bucket", "envoy_cluster_upstream_rq_retry_success", "llm_ratelimit_retry_attempts"];

#[test]
fn promtool_checks_the_config_and_passes_the_alert_unit_tests() {
    let Some(promtool) = which("promtool") else {
        eprintln!("SKIPPED: promtool not found (Debian package `prometheus`; scripts/setup.sh --test installs it)");
        return;
    };
    for args in [
        &["check", "config", "deploy/prometheus/prometheus.yml"][..],
        &["test", "rules", "deploy/prometheus/alerts_test.yaml"],
    ] {
        let out = Command::new(&promtool).args(args).current_dir(root()).output().expect("run promtool");
        assert!(
            out.status.success(),
            "promtool {}:\n{}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn every_dashboard_and_rule_query_runs_on_a_real_prometheus_scraping_envoy() {
    let Some(prometheus_bin) = which("prometheus") else {
        eprintln!("SKIPPED: prometheus not found (Debian package `prometheus`; scripts/setup.sh --test installs it)");
        return;
    };
    let started = Instant::now();
    // A provider allowing 10 requests a second, and a small bucket with short waits, so within
    // seconds there are provider holds and resets, queued, released, shed and refused requests.
    let mock = Mock::start(&["--quota", "10", "--token-quota", "100000", "--window-ms", "1000", "--style", "openai"]);
    let config = r#"{"name": "mon",
        "bucket": {"capacity": 5, "refill_rate": 20, "burst_allowance": 2},
        "tokens": {"capacity": 60000, "output_default": 20},
        "queue": {"max_waiting": 6},
        "priorities": {"CRITICAL": {"max_wait_ms": 1000}, "HIGH": {"max_wait_ms": 600},
                       "NORMAL": {"max_wait_ms": 300}, "LOW": {"max_wait_ms": 150}},
        "classify": {"header": "x-llm-priority", "trust_header": true}}"#;
    let opts =
        EnvoyOpts { filter_config: config, concurrency: 2, upstream_port: mock.port, edit: Some(flush_every_second) };
    let envoy = Envoy::spawn(&opts).unwrap_or_else(|log| panic!("Envoy did not start:\n{log}"));
    let prom = Prometheus::start(&prometheus_bin, envoy.admin);
    // Envoy lists a histogram from its first stats flush on: Prometheus must have seen it empty
    // before the traffic, or rate() has no starting point for the first observations.
    let scraped = eventually(Duration::from_secs(10), || {
        prom.numbers("llm_ratelimit_retry_after_s_count").is_ok_and(|v| !v.is_empty())
    });
    assert!(scraped, "Prometheus never scraped Envoy; its log:\n{}", prom.log());

    // Traffic: a few hundred requests of every class at once.
    let url = envoy.url("/v1/chat/completions");
    let replies: Vec<Reply> = std::thread::scope(|s| {
        let runs =
            [("LOW", 120, 5), ("NORMAL", 80, 3), ("HIGH", 60, 3), ("CRITICAL", 40, 2)].map(|(class, n, threads)| {
                let url = &url;
                s.spawn(move || burst(url, n, threads, &[("x-llm-priority", class)]))
            });
        runs.into_iter().flat_map(|h| h.join().expect("traffic")).collect()
    });
    assert!(
        count(&replies, 200) > 5 && count(&replies, 429) > 50,
        "{} ok, {} 429",
        count(&replies, 200),
        count(&replies, 429)
    );
    // After the provider's reset, requests one after another until its last answer says 0 left
    // (the first of them is the first answer after the burst's hold: reset.accurate).
    std::thread::sleep(Duration::from_millis(1100));
    let exhausted = eventually(Duration::from_secs(8), || {
        let r = chat(&url, &[("x-llm-priority", "CRITICAL")]).expect("request");
        r.status == 200 && r.header("x-ratelimit-remaining-requests") == Some("0")
    });
    assert!(exhausted, "the provider never reported its quota used up");
    assert_eq!(envoy.stat("mon", "provider.remaining_requests"), 0);
    assert!(envoy.stat("mon", "reset.accurate") > 0, "no hold was followed by a success");

    // Prometheus has it all: after Envoy's next stats flush (histograms), the values Envoy
    // shows are the ones Prometheus last scraped.
    std::thread::sleep(Duration::from_millis(1200));
    let envoy_text = envoy.admin_text("/stats/prometheus");
    let totals = [
        "llm_ratelimit_admitted",
        "llm_ratelimit_reset_accurate",
        "llm_ratelimit_retry_after_s_count",
        "llm_ratelimit_queue_wait_ms_count",
        "llm_ratelimit_tokens_estimate_error_pct_count",
    ]
    .map(|m| (m, sum_of(&envoy_text, m)));
    assert!(totals.iter().all(|(_, n)| *n > 0.0), "stats that did not move: {totals:?}");
    let caught_up = eventually(Duration::from_secs(10), || {
        totals.iter().all(|(m, n)| prom.numbers(&format!("sum({m})")).is_ok_and(|v| v == [*n]))
    });
    assert!(caught_up, "Prometheus did not catch up with Envoy's {totals:?}; its log:\n{}", prom.log());
    let names = prom.metric_names();
    assert!(names.contains("llm_ratelimit_admitted") && names.contains("envoy_cluster_upstream_rq_retry"), "{names:?}");

    // The dashboard: every expression runs; those over stats that exist return numbers.
    let dash: Value =
        serde_json::from_str(&std::fs::read_to_string(root().join("deploy/grafana/llm-ratelimit.json")).unwrap())
            .unwrap();
    let mut failures = Vec::new();
    let mut pending_seen = BTreeSet::new();
    let mut checked = 0;
    for panel in dash["panels"].as_array().expect("panels") {
        for t in panel["targets"].as_array().into_iter().flatten() {
            let expr = grafana_to_promql(t["expr"].as_str().expect("expr"));
            checked += 1;
            let metrics = metric_names(&expr);
            let absent: Vec<&String> = metrics.iter().filter(|m| !names.contains(m.as_str())).collect();
            for m in &absent {
                if PENDING.contains(&m.as_str()) {
                    pending_seen.insert(m.to_string());
                } else {
                    failures.push(format!("{}: {expr}: no metric {m} on Envoy", panel["title"]));
                }
            }
            match prom.numbers(&expr) {
                Err(e) => failures.push(format!("{}: {expr}: {e}", panel["title"])),
                Ok(v)
                    if v.iter().all(|x| !x.is_finite())
                        && absent.is_empty()
                        && !metrics.iter().any(|m| MAY_BE_EMPTY.contains(&m.as_str())) =>
                {
                    failures.push(format!("{}: {expr}: no data ({v:?})", panel["title"]))
                }
                Ok(_) => {}
            }
        }
    }
    assert!(checked > 30, "{checked} dashboard queries");

    // The PromQL that deploy/README.md gives for each signal.
    let readme = readme_promql();
    assert!(readme.len() >= 12, "{readme:?}");
    for expr in &readme {
        let metrics = metric_names(expr);
        let absent: Vec<&String> = metrics.iter().filter(|m| !names.contains(m.as_str())).collect();
        for m in &absent {
            if !PENDING.contains(&m.as_str()) {
                failures.push(format!("deploy/README.md: {expr}: no metric {m} on Envoy"));
            }
        }
        match prom.numbers(expr) {
            Err(e) => failures.push(format!("deploy/README.md: {expr}: {e}")),
            Ok(v)
                if v.iter().all(|x| !x.is_finite())
                    && absent.is_empty()
                    && !metrics.iter().any(|m| MAY_BE_EMPTY.contains(&m.as_str())) =>
            {
                failures.push(format!("deploy/README.md: {expr}: no data ({v:?})"))
            }
            Ok(_) => {}
        }
    }

    // The rules, as the real Prometheus evaluated them: all healthy, each expression runs, and
    // every recorded signal has a number.
    let rules = rules_file();
    let recorded: BTreeSet<&str> = rules.iter().filter(|r| r.kind == "record").map(|r| r.name.as_str()).collect();
    let evaluated = eventually(Duration::from_secs(10), || prom.rule_health().len() == rules.len());
    assert!(evaluated, "rules evaluated: {:?}", prom.rule_health());
    for (name, health, error) in prom.rule_health() {
        if health != "ok" {
            failures.push(format!("rule {name}: {health} {error}"));
        }
    }
    for r in &rules {
        for m in metric_names(&r.expr) {
            if !names.contains(&m) {
                failures.push(format!("rule {}: no metric {m} on Envoy", r.name));
            }
        }
        for rec in recorded_names(&r.expr) {
            if !recorded.contains(rec.as_str()) {
                failures.push(format!("rule {}: {rec} is not recorded in alerts.yaml", r.name));
            }
        }
        match prom.numbers(&r.expr) {
            Err(e) => failures.push(format!("rule {}: {e}", r.name)),
            Ok(_) if r.kind == "alert" => {} // a condition: empty unless it fires
            Ok(v)
                if v.iter().all(|x| !x.is_finite())
                    && !metric_names(&r.expr).iter().any(|m| MAY_BE_EMPTY.contains(&m.as_str())) =>
            {
                failures.push(format!("rule {}: no data ({v:?})", r.name))
            }
            Ok(_) => {}
        }
    }
    // The provider said 0 of 5 left while traffic flowed: the quota alert is on its way.
    let alerting = eventually(Duration::from_secs(5), || {
        prom.get("/api/v1/alerts")["data"]["alerts"].as_array().into_iter().flatten().any(|a| {
            a["labels"]["alertname"] == "LLMProviderQuotaNearlyExhausted"
                && a["labels"]["provider"] == "mon"
                && a["labels"]["dimension"] == "requests"
        })
    });
    if !alerting {
        failures.push(format!("LLMProviderQuotaNearlyExhausted not pending: {}", prom.get("/api/v1/alerts")));
    }

    assert!(
        failures.is_empty(),
        "{} problems:\n{}\nPrometheus log:\n{}",
        failures.len(),
        failures.join("\n"),
        prom.log()
    );
    if !pending_seen.is_empty() {
        eprintln!("note: Envoy does not export {pending_seen:?} yet; their panels were only checked to parse");
    }
    eprintln!("{checked} dashboard queries and {} rules checked in {:?}", rules.len(), started.elapsed());
}

/// Envoy merges histograms for its admin endpoint on each stats flush, every 5 s by default;
/// every second keeps the test short. The only change to envoy/envoy.yaml.
fn flush_every_second(yaml: String) -> String {
    assert!(yaml.contains("\nstats_config:"), "envoy/envoy.yaml has no top-level stats_config");
    yaml.replacen("\nstats_config:", "\nstats_flush_interval: 1s\nstats_config:", 1)
}

/// The sum of a metric's samples in Prometheus text.
fn sum_of(text: &str, metric: &str) -> f64 {
    text.lines()
        .filter(|l| l.strip_prefix(metric).is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' ')))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

// ---- Prometheus ----

/// A real Prometheus with deploy/prometheus/prometheus.yml, changed only where it must be:
/// Envoy's admin address, 1 s intervals, the rules file's path and a closed Alertmanager port.
struct Prometheus {
    child: Child,
    port: u16,
    dir: TempDir,
}

impl Prometheus {
    fn start(bin: &PathBuf, envoy_admin: u16) -> Prometheus {
        let dir = TempDir::new();
        let port = free_port();
        let src = std::fs::read_to_string(root().join("deploy/prometheus/prometheus.yml")).expect("prometheus.yml");
        let rules = root().join("deploy/prometheus/alerts.yaml");
        let mut cfg = src
            .replace("mock-provider:9901", &format!("127.0.0.1:{envoy_admin}"))
            .replace("alertmanager:9093", &format!("127.0.0.1:{}", free_port()))
            .replace("scrape_interval: 15s", "scrape_interval: 1s")
            .replace("evaluation_interval: 15s", "evaluation_interval: 1s")
            .replace("  - alerts.yaml", &format!("  - {}", rules.display()));
        for must in ["127.0.0.1:", "scrape_interval: 1s", "evaluation_interval: 1s", "alerts.yaml"] {
            assert!(
                cfg.contains(must),
                "deploy/prometheus/prometheus.yml changed shape: no {must} after rewriting:\n{cfg}"
            );
        }
        cfg.push('\n');
        let cfg_path = dir.0.join("prometheus.yml");
        std::fs::write(&cfg_path, cfg).expect("write prometheus.yml");
        let log = std::fs::File::create(dir.0.join("prometheus.log")).expect("log");
        let child = Command::new(bin)
            .arg(format!("--config.file={}", cfg_path.display()))
            .arg(format!("--storage.tsdb.path={}", dir.0.join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--log.level=warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn prometheus");
        let p = Prometheus { child, port, dir };
        let ready = eventually(Duration::from_secs(20), || get(&p.url("/-/ready")).is_ok_and(|r| r.status == 200));
        assert!(ready, "Prometheus did not become ready:\n{}", p.log());
        p
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.0.join("prometheus.log")).unwrap_or_default()
    }

    fn get(&self, path: &str) -> Value {
        serde_json::from_str(&get(&self.url(path)).expect("GET").body).expect("JSON")
    }

    /// Runs an instant query: the values of its result, or the error Prometheus gives.
    fn numbers(&self, expr: &str) -> Result<Vec<f64>, String> {
        let r = ureq::get(&self.url("/api/v1/query")).query("query", expr).call();
        let body = match r {
            Ok(r) | Err(ureq::Error::Status(_, r)) => r.into_string().map_err(|e| e.to_string())?,
            Err(e) => return Err(e.to_string()),
        };
        let v: Value = serde_json::from_str(&body).map_err(|e| format!("{e}: {body}"))?;
        if v["status"] != "success" {
            return Err(format!("{} {}", v["errorType"], v["error"]));
        }
        let data = &v["data"];
        let value = |s: &Value| s.as_str().and_then(|s| s.parse::<f64>().ok()).unwrap_or(f64::NAN);
        Ok(match data["resultType"].as_str() {
            Some("vector") => data["result"].as_array().into_iter().flatten().map(|s| value(&s["value"][1])).collect(),
            Some("scalar") => vec![value(&data["result"][1])],
            other => return Err(format!("result type {other:?}")),
        })
    }

    fn metric_names(&self) -> BTreeSet<String> {
        let v = self.get("/api/v1/label/__name__/values");
        v["data"].as_array().expect("names").iter().map(|n| n.as_str().expect("name").to_string()).collect()
    }

    /// (rule, health, last error) of every rule evaluated at least once.
    fn rule_health(&self) -> Vec<(String, String, String)> {
        let v = self.get("/api/v1/rules");
        let mut out = Vec::new();
        for g in v["data"]["groups"].as_array().into_iter().flatten() {
            for r in g["rules"].as_array().into_iter().flatten() {
                if r["lastEvaluation"].as_str().is_some_and(|t| !t.starts_with("0001")) {
                    let s = |k: &str| r[k].as_str().unwrap_or("").to_string();
                    out.push((s("name"), s("health"), s("lastError")));
                }
            }
        }
        out
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---- expressions ----

struct Rule {
    kind: &'static str,
    name: String,
    expr: String,
}

/// The `record:` / `alert:` rules of alerts.yaml with their `expr:` (one line or a `|` block).
fn rules_file() -> Vec<Rule> {
    let text = std::fs::read_to_string(root().join("deploy/prometheus/alerts.yaml")).expect("alerts.yaml");
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    let mut current: Option<(&'static str, String)> = None;
    let mut i = 0;
    while i < lines.len() {
        let t = lines[i].trim_start().trim_start_matches("- ");
        if let Some(n) = t.strip_prefix("record:") {
            current = Some(("record", n.trim().to_string()));
        } else if let Some(n) = t.strip_prefix("alert:") {
            current = Some(("alert", n.trim().to_string()));
        } else if let Some(e) = t.strip_prefix("expr:") {
            let (kind, name) = current.take().expect("expr before record/alert");
            let indent = lines[i].len() - lines[i].trim_start().len();
            let expr = if e.trim() == "|" {
                let mut body = Vec::new();
                while i + 1 < lines.len()
                    && (lines[i + 1].trim().is_empty() || lines[i + 1].len() - lines[i + 1].trim_start().len() > indent)
                {
                    i += 1;
                    body.push(lines[i].trim());
                }
                body.join("\n")
            } else {
                e.trim().to_string()
            };
            out.push(Rule { kind, name, expr });
        }
        i += 1;
    }
    assert!(out.len() >= 12, "{} rules read from alerts.yaml", out.len());
    out
}

/// The expressions of deploy/README.md's `promql` blocks: a line that starts in the first
/// column starts one, indented lines continue it, `#` starts a comment.
fn readme_promql() -> Vec<String> {
    let text = std::fs::read_to_string(root().join("deploy/README.md")).expect("deploy/README.md");
    let mut out: Vec<String> = Vec::new();
    for block in text.split("```promql\n").skip(1) {
        for line in block.split("\n```").next().unwrap_or("").lines() {
            let code = line.split(" #").next().unwrap_or("").trim_end();
            if code.trim().is_empty() {
                continue;
            }
            if line.starts_with(' ') {
                let last = out.last_mut().expect("continuation of an expression");
                last.push(' ');
                last.push_str(code.trim());
            } else {
                out.push(code.to_string());
            }
        }
    }
    out
}

/// A dashboard expression as Grafana sends it, with every variable at "All".
fn grafana_to_promql(e: &str) -> String {
    let e = e
        .replace("$__rate_interval", "1m")
        .replace("$provider", ".*")
        .replace("$priority", ".*")
        .replace("$cluster", "llm_provider");
    assert!(!e.contains('$'), "unknown variable in {e}");
    e
}

/// Identifiers in an expression (not inside quotes).
fn identifiers(expr: &str) -> Vec<(String, char)> {
    let mut out = Vec::new();
    let chars: Vec<char> = expr.chars().collect();
    let (mut i, mut quoted) = (0, false);
    while i < chars.len() {
        let c = chars[i];
        if c == '"' {
            quoted = !quoted;
            i += 1;
        } else if !quoted && (c.is_ascii_alphabetic() || c == '_') {
            let start = i;
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':') {
                i += 1;
            }
            let next = chars[i..].iter().find(|c| !c.is_whitespace()).copied().unwrap_or(' ');
            out.push((chars[start..i].iter().collect(), next));
        } else {
            i += 1;
        }
    }
    out
}

/// Envoy metric names an expression reads (label names, followed by `=`, `!` or `~`, are not).
fn metric_names(expr: &str) -> BTreeSet<String> {
    identifiers(expr)
        .into_iter()
        .filter(|(id, next)| {
            (id.starts_with("llm_ratelimit_") || id.starts_with("envoy_")) && !matches!(next, '=' | '!' | '~')
        })
        .map(|(id, _)| id)
        .collect()
}

/// Names of recording rules an expression reads (`llm_ratelimit:...`).
fn recorded_names(expr: &str) -> BTreeSet<String> {
    identifiers(expr).into_iter().map(|(id, _)| id).filter(|id| id.starts_with("llm_ratelimit:")).collect()
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| std::env::split_paths(&paths).map(|p| p.join(name)).find(|p| p.is_file()))
}
