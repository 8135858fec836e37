//! The deployment files hold together without Docker or Kubernetes: every file docker-compose
//! mounts or builds exists, no two services publish the same host port, Prometheus, Alertmanager
//! and Grafana point at each other the way compose names them, the dashboard is well formed, and
//! the filter configuration embedded in the Istio and Envoy Gateway manifests is accepted by the
//! filter's own parser. (tests/monitoring.rs runs the queries against a real Prometheus.)

use llm_ratelimit::config::{Config, Role};
use serde_json::{json, Map, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &str) -> String {
    std::fs::read_to_string(root().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// The built filter, as `make build` leaves it (the Makefile's WASM).
const WASM: &str = "target/wasm32-wasip1/release/llm_ratelimit.wasm";

#[test]
fn compose_mounts_existing_files_and_publishes_each_host_port_once() {
    let compose = &yaml(&read("docker-compose.yml"))[0];
    let services = compose["services"].as_object().expect("services");
    for want in ["mock-provider", "envoy", "prometheus", "alertmanager", "grafana"] {
        assert!(services.contains_key(want), "no service {want}");
    }
    let mut host_ports: BTreeMap<String, String> = BTreeMap::new();
    for (name, svc) in services {
        for p in svc["ports"].as_array().into_iter().flatten() {
            let (host, _) = port_mapping(p.as_str().expect("port"));
            if let Some(other) = host_ports.insert(host.clone(), name.clone()) {
                panic!("host port {host} published by both {other} and {name}");
            }
        }
        for v in svc["volumes"].as_array().into_iter().flatten() {
            let source = v["source"].as_str().unwrap_or_else(|| panic!("{name}: volume without source: {v}"));
            let rel = source.strip_prefix("./").unwrap_or_else(|| panic!("{name}: {source} is not relative"));
            if rel.starts_with("target/") {
                // A build product: the path `make build` writes, and compose must not invent it.
                assert_eq!(rel, WASM, "{name}: mounts {source}");
                assert_eq!(v["bind"]["create_host_path"], json!(false), "{name}: {source} must not be created");
            } else {
                assert!(root().join(rel).exists(), "{name}: mounts {source}, which does not exist");
            }
        }
        if let Some(build) = svc.get("build") {
            let dockerfile = root()
                .join(build["context"].as_str().expect("context"))
                .join(build["dockerfile"].as_str().expect("dockerfile"));
            assert!(dockerfile.is_file(), "{name}: no {}", dockerfile.display());
        }
        for dep in svc["depends_on"].as_array().into_iter().flatten() {
            assert!(services.contains_key(dep.as_str().expect("depends_on")), "{name} depends on unknown {dep}");
        }
        if let Some(mode) = svc["network_mode"].as_str() {
            let other = mode.strip_prefix("service:").expect("network_mode service:");
            assert!(services.contains_key(other), "{name}: network_mode of unknown {other}");
        }
    }
    // The URLs are documented: every published port is named in the file's header.
    let text = read("docker-compose.yml");
    for port in host_ports.keys() {
        assert!(text.contains(&format!("localhost:{port}")), "host port {port} is not documented as localhost:{port}");
    }
}

#[test]
fn prometheus_alertmanager_and_grafana_find_each_other_in_compose() {
    let compose = &yaml(&read("docker-compose.yml"))[0];
    let services = compose["services"].as_object().expect("services");
    let prom = &yaml(&read("deploy/prometheus/prometheus.yml"))[0];

    // Prometheus: its config and every rule file, mounted side by side.
    let prom_mounts = mounts(&services["prometheus"]);
    let config_target = prom_mounts.get("deploy/prometheus/prometheus.yml").expect("prometheus.yml is mounted");
    let config_dir = Path::new(config_target).parent().expect("dir");
    let args = services["prometheus"]["command"].as_array().expect("command");
    assert!(args.contains(&json!(format!("--config.file={config_target}"))), "{args:?}");
    for rule in prom["rule_files"].as_array().expect("rule_files") {
        let rule = rule.as_str().expect("rule file");
        let source = format!("deploy/prometheus/{rule}");
        assert!(root().join(&source).is_file(), "rule file {source}");
        assert_eq!(
            prom_mounts.get(&source).map(String::as_str),
            config_dir.join(rule).to_str(),
            "{source} beside the config"
        );
    }

    // It scrapes Envoy's admin: the port envoy/envoy.yaml gives the admin, on the service whose
    // network namespace Envoy shares.
    let envoy_yaml = read("envoy/envoy.yaml");
    let admin_port = envoy_yaml
        .split("admin:")
        .nth(1)
        .and_then(|a| a.split("port_value:").nth(1))
        .and_then(|p| p.trim_start().split(|c: char| !c.is_ascii_digit()).next())
        .expect("admin port in envoy/envoy.yaml");
    let envoy_host =
        services["envoy"]["network_mode"].as_str().and_then(|m| m.strip_prefix("service:")).expect("envoy network");
    let scrape = &prom["scrape_configs"][0];
    assert_eq!(scrape["metrics_path"], json!("/stats/prometheus"));
    assert_eq!(scrape["static_configs"][0]["targets"], json!([format!("{envoy_host}:{admin_port}")]));
    assert!(
        container_ports(&services[envoy_host]).contains(admin_port),
        "{envoy_host} does not publish the admin port"
    );

    // Alerts go to the Alertmanager service, which reads deploy/alertmanager.
    let am =
        prom["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"][0].as_str().expect("alertmanager target");
    let (am_host, am_port) = am.split_once(':').expect("host:port");
    assert!(container_ports(&services[am_host]).contains(am_port), "{am}");
    let am_mounts = mounts(&services[am_host]);
    let am_config = am_mounts.get("deploy/alertmanager/alertmanager.yml").expect("alertmanager.yml mounted");
    assert!(services[am_host]["command"]
        .as_array()
        .expect("command")
        .contains(&json!(format!("--config.file={am_config}"))));
    let alertmanager = &yaml(&read("deploy/alertmanager/alertmanager.yml"))[0];
    let receiver = alertmanager["route"]["receiver"].as_str().expect("receiver");
    let receivers = alertmanager["receivers"].as_array().expect("receivers");
    assert!(receivers.iter().any(|r| r["name"] == json!(receiver) && r["webhook_configs"][0]["url"].is_string()));

    // Grafana: the data source is the Prometheus service; the dashboard provider reads the
    // folder the dashboard JSON is mounted in.
    let ds = &yaml(&read("deploy/grafana/provisioning/datasources/prometheus.yaml"))[0]["datasources"][0];
    assert_eq!(ds["type"], json!("prometheus"));
    let url = ds["url"].as_str().expect("url");
    let (host, port) = url.strip_prefix("http://").and_then(|h| h.split_once(':')).expect("http://host:port");
    assert!(services.contains_key(host) && container_ports(&services[host]).contains(port), "{url}");
    let g = mounts(&services["grafana"]);
    assert_eq!(
        g.get("deploy/grafana/provisioning/datasources").map(String::as_str),
        Some("/etc/grafana/provisioning/datasources")
    );
    assert_eq!(
        g.get("deploy/grafana/provisioning/dashboards").map(String::as_str),
        Some("/etc/grafana/provisioning/dashboards")
    );
    let provider = &yaml(&read("deploy/grafana/provisioning/dashboards/llm-ratelimit.yaml"))[0]["providers"][0];
    let dash_target = g.get("deploy/grafana/llm-ratelimit.json").expect("dashboard mounted");
    assert_eq!(Path::new(dash_target).parent().and_then(Path::to_str), provider["options"]["path"].as_str());
}

#[test]
fn dashboard_is_well_formed_and_plots_every_signal() {
    let dash: Value = serde_json::from_str(&read("deploy/grafana/llm-ratelimit.json")).expect("dashboard JSON");
    let vars: BTreeSet<String> = dash["templating"]["list"]
        .as_array()
        .expect("templating")
        .iter()
        .map(|v| v["name"].as_str().expect("name").to_string())
        .collect();
    let panels = dash["panels"].as_array().expect("panels");
    let mut ids = BTreeSet::new();
    let mut cells = BTreeSet::new();
    let mut exprs = Vec::new();
    for p in panels {
        assert!(ids.insert(p["id"].as_u64().expect("id")), "duplicate panel id {}", p["id"]);
        let g = &p["gridPos"];
        let (x, y, w, h) =
            (g["x"].as_u64().unwrap(), g["y"].as_u64().unwrap(), g["w"].as_u64().unwrap(), g["h"].as_u64().unwrap());
        assert!(x + w <= 24, "{} is wider than the grid", p["title"]);
        for cx in x..x + w {
            for cy in y..y + h {
                assert!(cells.insert((cx, cy)), "{} overlaps another panel", p["title"]);
            }
        }
        if p["type"] == json!("row") {
            continue;
        }
        assert_eq!(p["datasource"]["uid"], json!("${datasource}"), "{}", p["title"]);
        let targets = p["targets"].as_array().unwrap_or_else(|| panic!("{} has no targets", p["title"]));
        assert!(!targets.is_empty());
        for t in targets {
            let e = t["expr"].as_str().expect("expr");
            assert!(t["refId"].is_string(), "{e}");
            for var in template_vars(e) {
                assert!(var.starts_with("__") || vars.contains(&var), "{e}: ${var} is not a dashboard variable");
            }
            exprs.push(e.to_string());
        }
    }
    let all = exprs.join("\n");
    for metric in [
        "llm_ratelimit_provider_remaining_requests",
        "llm_ratelimit_provider_limit_requests",
        "llm_ratelimit_provider_remaining_tokens",
        "llm_ratelimit_provider_limit_tokens",
        "llm_ratelimit_bucket_tokens",
        "llm_ratelimit_tokens_bucket",
        "llm_ratelimit_tokens_estimated",
        "llm_ratelimit_tokens_actual",
        "llm_ratelimit_tokens_estimate_error_pct_bucket",
        "llm_ratelimit_reset_accurate",
        "llm_ratelimit_reset_early",
        "llm_ratelimit_reset_error_ms_bucket",
        "envoy_cluster_upstream_rq_retry{",
        "envoy_cluster_upstream_rq_retry_success",
        "envoy_cluster_upstream_rq_retry_limit_exceeded",
        "envoy_cluster_upstream_rq_retry_overflow",
        "llm_ratelimit_retry_attempts",
        "llm_ratelimit_retry_succeeded",
        "llm_ratelimit_retry_exhausted",
        "llm_ratelimit_queue_depth",
        "llm_ratelimit_queue_wait_ms_bucket",
        "llm_ratelimit_admitted",
        "llm_ratelimit_rejected",
        "llm_ratelimit_shed",
        "llm_ratelimit_expired",
        "llm_ratelimit_breaker_state",
        "llm_ratelimit_retry_after_s_bucket",
    ] {
        assert!(all.contains(metric), "no panel plots {metric}");
    }
    // The breaker timeline names its states.
    let breaker = panels.iter().find(|p| p["type"] == json!("state-timeline")).expect("breaker state timeline");
    let names = breaker["fieldConfig"]["defaults"]["mappings"][0]["options"].to_string();
    for s in ["closed", "open", "half-open"] {
        assert!(names.contains(&format!("\"{s}\"")), "{names}");
    }
}

#[test]
fn istio_plugin_config_is_accepted_by_the_filter() {
    let doc = &yaml(&read("deploy/istio/wasmplugin.yaml"))[0];
    assert_eq!(doc["kind"], json!("WasmPlugin"));
    let spec = &doc["spec"];
    let config = parse_config(&spec["pluginConfig"]);
    assert_eq!(config.role, Role::Admission);
    // The fallback the manifest describes (WasmPlugin alone) is valid too.
    let mut standalone = spec["pluginConfig"].clone();
    standalone["role"] = json!("standalone");
    assert_eq!(parse_config(&standalone).role, Role::Standalone);

    assert!(["AUTHN", "AUTHZ", "STATS", "UNSPECIFIED_PHASE"].contains(&spec["phase"].as_str().expect("phase")));
    assert!(spec["priority"].is_i64(), "priority {}", spec["priority"]);
    assert!(["FAIL_OPEN", "FAIL_CLOSE"].contains(&spec["failStrategy"].as_str().expect("failStrategy")));
    assert_eq!(spec["type"], json!("HTTP"));
    assert!(spec["url"].as_str().expect("url").starts_with("oci://"));
    assert_eq!(spec["pluginName"].as_str(), Some(envoy_root_id().as_str()));
}

#[test]
fn envoy_gateway_wasm_config_is_accepted_by_the_filter() {
    let docs = yaml(&read("deploy/envoy-gateway/extension-policy.yaml"));
    let policy = docs.iter().find(|d| d["kind"] == json!("EnvoyExtensionPolicy")).expect("EnvoyExtensionPolicy");
    let wasm = &policy["spec"]["wasm"][0];
    assert_eq!(
        parse_config(&wasm["config"]).role,
        Role::Standalone,
        "no upstream filters in Envoy Gateway: standalone"
    );
    assert_eq!(wasm["rootID"].as_str(), Some(envoy_root_id().as_str()));
    assert_eq!(wasm["code"]["type"], json!("Image"));
    assert!(wasm["code"]["image"]["url"].is_string());
    assert!(policy["spec"]["targetRefs"][0]["kind"].is_string());

    // The EnvoyProxy merges exactly envoy/envoy.yaml's stats_tags into the bootstrap.
    let proxy = docs.iter().find(|d| d["kind"] == json!("EnvoyProxy")).expect("EnvoyProxy");
    assert_eq!(proxy["spec"]["bootstrap"]["type"], json!("Merge"));
    let merged = &yaml(proxy["spec"]["bootstrap"]["value"].as_str().expect("bootstrap value"))[0];
    let ours = yaml(&read("envoy/envoy.yaml"));
    assert_eq!(merged["stats_config"]["stats_tags"], ours[0]["stats_config"]["stats_tags"]);
}

#[test]
fn oci_image_is_plugin_wasm_from_scratch() {
    let dockerfile = read("deploy/oci/Dockerfile");
    let lines: Vec<&str> = dockerfile.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).collect();
    assert_eq!(lines, ["FROM scratch", &format!("COPY {WASM} ./plugin.wasm")]);
    assert!(read("Makefile").contains(&format!("WASM := {WASM}")), "the Makefile builds {WASM}");
    // The build context (the repository root) sends only the .wasm.
    let ignore = read("deploy/oci/Dockerfile.dockerignore");
    assert!(ignore.lines().any(|l| l == "*") && ignore.lines().any(|l| l == format!("!{WASM}")), "{ignore}");
}

#[test]
fn the_yaml_reader_reads_what_these_files_use() {
    let docs = yaml(
        "# c\na: 1\nb:\n  - x\n  - k: 'it''s' # c\n    l: [p, \"q r\"]\nc: |\n  one\n    two\nd: {\n    \"j\": [1, 2]\n  }\ne: true\n---\nf: \"#no comment\"\n",
    );
    assert_eq!(
        docs[0],
        json!({"a": 1, "b": ["x", {"k": "it's", "l": ["p", "q r"]}], "c": "one\n  two\n", "d": {"j": [1, 2]}, "e": true})
    );
    assert_eq!(docs[1], json!({"f": "#no comment"}));
}

// ---- helpers ----

fn parse_config(v: &Value) -> Config {
    assert!(v.is_object(), "the embedded configuration is not a JSON object: {v}");
    Config::parse(v.to_string().as_bytes()).unwrap_or_else(|e| panic!("the filter refuses {v}: {e}"))
}

/// The `root_id` envoy/envoy.yaml gives the filter.
fn envoy_root_id() -> String {
    let yaml = read("envoy/envoy.yaml");
    let line = yaml.lines().find_map(|l| l.trim().strip_prefix("root_id:")).expect("root_id");
    line.trim().to_string()
}

/// "HOST:CONTAINER" → (host, container).
fn port_mapping(p: &str) -> (String, String) {
    let (h, c) = p.rsplit_once(':').unwrap_or((p, p));
    (h.rsplit(':').next().unwrap_or(h).to_string(), c.to_string())
}

fn container_ports(svc: &Value) -> BTreeSet<String> {
    svc["ports"].as_array().into_iter().flatten().map(|p| port_mapping(p.as_str().expect("port")).1).collect()
}

/// A service's bind mounts: repository path (without `./`) → path in the container.
fn mounts(svc: &Value) -> BTreeMap<String, String> {
    svc["volumes"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|v| {
            let s = v["source"].as_str().expect("source");
            (s.trim_start_matches("./").to_string(), v["target"].as_str().expect("target").to_string())
        })
        .collect()
}

/// `$name` and `${name}` in a Grafana expression.
fn template_vars(e: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = e;
    while let Some(i) = rest.find('$') {
        rest = &rest[i + 1..];
        let body = rest.strip_prefix('{').unwrap_or(rest);
        let name: String = body.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
        out.push(name);
    }
    out
}

// ---- a reader for the YAML these files use ----
//
// Cargo.toml has no YAML parser, so this reads the subset the deployment files are written in:
// block mappings and sequences, plain and quoted scalars, `|` blocks, comments, `---` between
// documents, and flow collections (JSON, possibly over several lines, or `[a, b]`).

struct Line {
    indent: usize,
    text: String,
    raw: String,
}

fn yaml(src: &str) -> Vec<Value> {
    let mut docs = Vec::new();
    for doc in split_documents(src) {
        let lines: Vec<Line> = doc
            .lines()
            .map(|raw| {
                let text = strip_comment(raw);
                Line { indent: raw.len() - raw.trim_start().len(), text: text.trim().to_string(), raw: raw.to_string() }
            })
            .collect();
        let mut i = 0;
        skip_blank(&lines, &mut i);
        if i < lines.len() {
            let indent = lines[i].indent;
            docs.push(block(&lines, &mut i, indent));
        }
    }
    docs
}

fn split_documents(src: &str) -> Vec<String> {
    let mut docs = vec![String::new()];
    for l in src.lines() {
        if l.trim_end() == "---" {
            docs.push(String::new());
        } else {
            let d = docs.last_mut().expect("doc");
            d.push_str(l);
            d.push('\n');
        }
    }
    docs
}

fn strip_comment(raw: &str) -> &str {
    let (mut single, mut double) = (false, false);
    let mut prev = ' ';
    for (i, c) in raw.char_indices() {
        match c {
            '\'' if !double => single = !single,
            '"' if !single => double = !double,
            '#' if !single && !double && prev.is_whitespace() => return &raw[..i],
            _ => {}
        }
        prev = c;
    }
    raw
}

fn skip_blank(lines: &[Line], i: &mut usize) {
    while *i < lines.len() && lines[*i].text.is_empty() {
        *i += 1;
    }
}

/// The mapping or sequence whose lines start at column `indent`.
fn block(lines: &[Line], i: &mut usize, indent: usize) -> Value {
    skip_blank(lines, i);
    if lines[*i].text == "-" || lines[*i].text.starts_with("- ") {
        let mut seq = Vec::new();
        while *i < lines.len()
            && lines[*i].indent == indent
            && (lines[*i].text == "-" || lines[*i].text.starts_with("- "))
        {
            let item = lines[*i].text[1..].trim_start().to_string();
            if item.is_empty() {
                *i += 1;
                skip_blank(lines, i);
                let child = lines[*i].indent;
                seq.push(block(lines, i, child));
            } else if key_value(&item).is_some() && !item.starts_with('{') && !item.starts_with('[') {
                // "- key: value" starts a mapping at the column of "key".
                let col = indent + lines[*i].text.len() - item.len();
                let mut owned: Vec<Line> = Vec::new();
                owned.push(Line { indent: col, text: item, raw: String::new() });
                let start = *i + 1;
                let mut end = start;
                while end < lines.len() && (lines[end].text.is_empty() || lines[end].indent >= col) {
                    end += 1;
                }
                owned.extend(lines[start..end].iter().map(|l| Line {
                    indent: l.indent,
                    text: l.text.clone(),
                    raw: l.raw.clone(),
                }));
                let mut j = 0;
                seq.push(block(&owned, &mut j, col));
                *i = end;
            } else {
                seq.push(value_text(lines, i, &item));
            }
            skip_blank(lines, i);
        }
        return Value::Array(seq);
    }
    let mut map = Map::new();
    while *i < lines.len() && lines[*i].indent == indent {
        let text = lines[*i].text.clone();
        if text.starts_with("- ") {
            break;
        }
        let (k, rest) = key_value(&text).unwrap_or_else(|| panic!("not a `key: value` line: {text:?}"));
        let key = scalar(k).as_str().map(str::to_string).unwrap_or_else(|| k.to_string());
        let value = if rest.is_empty() {
            *i += 1;
            skip_blank(lines, i);
            if *i < lines.len()
                && (lines[*i].indent > indent || (lines[*i].indent == indent && lines[*i].text.starts_with("- ")))
            {
                let child = lines[*i].indent;
                block(lines, i, child)
            } else {
                Value::Null
            }
        } else if rest == "|" || rest == "|-" {
            *i += 1;
            let mut body: Vec<&str> = Vec::new();
            while *i < lines.len() && (lines[*i].raw.trim().is_empty() || lines[*i].indent > indent) {
                body.push(&lines[*i].raw);
                *i += 1;
            }
            while body.last().is_some_and(|l| l.trim().is_empty()) {
                body.pop();
            }
            let cut =
                body.iter().filter(|l| !l.trim().is_empty()).map(|l| l.len() - l.trim_start().len()).min().unwrap_or(0);
            let mut s: String = body.iter().map(|l| format!("{}\n", l.get(cut..).unwrap_or(""))).collect();
            if rest == "|-" {
                s.pop();
            }
            Value::String(s)
        } else {
            value_text(lines, i, rest)
        };
        map.insert(key, value);
        skip_blank(lines, i);
    }
    Value::Object(map)
}

/// Splits `key: value` (or `key:`) outside quotes and brackets.
fn key_value(text: &str) -> Option<(&str, &str)> {
    let (mut single, mut double, mut depth) = (false, false, 0i32);
    let bytes = text.as_bytes();
    for (i, &c) in bytes.iter().enumerate() {
        match c {
            b'\'' if !double => single = !single,
            b'"' if !single => double = !double,
            b'[' | b'{' if !single && !double => depth += 1,
            b']' | b'}' if !single && !double => depth -= 1,
            b':' if !single && !double && depth == 0 && (i + 1 == bytes.len() || bytes[i + 1] == b' ') => {
                return Some((text[..i].trim(), text[i + 1..].trim()));
            }
            _ => {}
        }
    }
    None
}

/// A value starting on line `*i` (whose text is `first`): a flow collection, maybe over several
/// lines, or a scalar. Leaves `*i` after it.
fn value_text(lines: &[Line], i: &mut usize, first: &str) -> Value {
    if first.starts_with('{') || first.starts_with('[') {
        let mut text = first.to_string();
        while !balanced(&text) {
            *i += 1;
            text.push('\n');
            text.push_str(&lines.get(*i).unwrap_or_else(|| panic!("unclosed {first}")).text);
        }
        *i += 1;
        return flow(&text);
    }
    *i += 1;
    scalar(first)
}

fn balanced(text: &str) -> bool {
    let (mut double, mut depth) = (false, 0i32);
    let mut prev = ' ';
    for c in text.chars() {
        match c {
            '"' if prev != '\\' => double = !double,
            '[' | '{' if !double => depth += 1,
            ']' | '}' if !double => depth -= 1,
            _ => {}
        }
        prev = c;
    }
    depth == 0
}

fn flow(text: &str) -> Value {
    if let Ok(v) = serde_json::from_str(text) {
        return v;
    }
    let inner = &text.trim()[1..text.trim().len() - 1];
    let items = split_top(inner);
    if text.trim().starts_with('[') {
        Value::Array(
            items.iter().map(|s| if s.starts_with('[') || s.starts_with('{') { flow(s) } else { scalar(s) }).collect(),
        )
    } else {
        let mut m = Map::new();
        for item in items {
            let (k, v) = key_value(&item).unwrap_or_else(|| panic!("not `key: value` in {text}"));
            let v = if v.starts_with('[') || v.starts_with('{') { flow(v) } else { scalar(v) };
            m.insert(k.to_string(), v);
        }
        Value::Object(m)
    }
}

/// Comma-separated items at the top level, outside quotes.
fn split_top(s: &str) -> Vec<String> {
    let (mut single, mut double, mut depth) = (false, false, 0i32);
    let mut out = vec![String::new()];
    for c in s.chars() {
        match c {
            '\'' if !double => single = !single,
            '"' if !single => double = !double,
            '[' | '{' if !single && !double => depth += 1,
            ']' | '}' if !single && !double => depth -= 1,
            ',' if !single && !double && depth == 0 => {
                out.push(String::new());
                continue;
            }
            _ => {}
        }
        out.last_mut().expect("item").push(c);
    }
    out.into_iter().map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect()
}

fn scalar(s: &str) -> Value {
    let s = s.trim();
    if s.starts_with('"') && s.ends_with('"') && s.len() >= 2 {
        return serde_json::from_str(s).unwrap_or_else(|_| Value::String(s[1..s.len() - 1].to_string()));
    }
    if s.starts_with('\'') && s.ends_with('\'') && s.len() >= 2 {
        return Value::String(s[1..s.len() - 1].replace("''", "'"));
    }
    match s {
        "true" => Value::Bool(true),
        "false" => Value::Bool(false),
        "null" | "~" | "" => Value::Null,
        _ => s.parse::<i64>().map(Value::from).unwrap_or_else(|_| Value::String(s.to_string())),
    }
}
