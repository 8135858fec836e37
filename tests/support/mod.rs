//! End-to-end harness: the real Envoy (from `.venv` or `ENVOY_BIN`) with our `.wasm`, in front of
//! the real mock provider, each on free loopback ports. Processes are killed on drop, and a failed
//! test prints the Envoy log.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("free port").port()
}

fn existing(candidates: &[PathBuf], what: &str) -> PathBuf {
    candidates.iter().find(|p| p.is_file()).cloned().unwrap_or_else(|| {
        panic!("{what} not found at {candidates:?}: run the tests with `make test`, which builds and installs it")
    })
}

fn envoy_bin() -> PathBuf {
    let mut c: Vec<PathBuf> = std::env::var_os("ENVOY_BIN").map(PathBuf::from).into_iter().collect();
    c.push(root().join(".venv/bin/envoy"));
    existing(&c, "envoy")
}

/// The built `.wasm` (also for configurations written by hand).
pub fn wasm_path() -> PathBuf {
    existing(&[root().join("target/wasm32-wasip1/release/llm_ratelimit.wasm")], "the filter .wasm")
}

fn mock_bin() -> PathBuf {
    existing(&[root().join("target/release/mock-provider"), root().join("target/debug/mock-provider")], "mock-provider")
}

/// The mock LLM provider, killed on drop.
pub struct Mock {
    child: Child,
    pub port: u16,
}

impl Mock {
    /// Starts the mock with extra command-line `args` (e.g. `["--quota", "5"]`).
    pub fn start(args: &[&str]) -> Mock {
        let mut child = Command::new(mock_bin())
            .args(["--port", "0"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn mock-provider");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut line).expect("mock banner");
        let port = line.trim().rsplit(':').next().and_then(|p| p.parse().ok()).unwrap_or_else(|| {
            let _ = child.kill();
            panic!("unexpected mock banner {line:?}")
        });
        Mock { child, port }
    }

    pub fn stats(&self) -> serde_json::Value {
        get_json(&format!("http://127.0.0.1:{}/mock/stats", self.port))
    }

    /// Requests the provider actually received.
    pub fn received(&self) -> u64 {
        self.stats()["requests"].as_u64().expect("requests")
    }

    /// One counter of `/mock/stats` (`requests`, `ok`, `rate_limited`, `in_flight`, ...).
    pub fn counter(&self, name: &str) -> u64 {
        self.stats()[name].as_u64().unwrap_or_else(|| panic!("no {name} in /mock/stats"))
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// Restarts the quota window (and zeroes the counters) when the wall clock's millisecond
    /// within the second is `phase_ms`; returns when that window ends (epoch ms). Choosing the
    /// phase puts the reset just before a whole second, so styles that can only say whole
    /// seconds (epoch seconds, HTTP dates) are off by little more than `1000 - phase_ms`.
    pub fn restart_window_at_phase(&self, window_ms: u64, phase_ms: u64) -> u64 {
        let wait = (phase_ms + 1000 - epoch_ms() % 1000) % 1000;
        std::thread::sleep(Duration::from_millis(wait));
        let before = epoch_ms();
        ureq::post(&self.url("/mock/reset")).call().expect("reset");
        let after = epoch_ms();
        (before + after) / 2 + window_ms
    }
}

impl Drop for Mock {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A running Envoy with our filter, killed on drop.
pub struct Envoy {
    child: Child,
    pub port: u16,
    pub admin: u16,
    log: PathBuf,
    _dir: TempDir,
}

/// How to start Envoy: `filter_config` is the JSON put in the plugin configuration.
pub struct EnvoyOpts<'a> {
    pub filter_config: &'a str,
    pub concurrency: u32,
    pub upstream_port: u16,
    /// A change to the rendered `envoy.yaml` (e.g. a flag turned off); `None` runs it as it is.
    pub edit: Option<fn(String) -> String>,
}

impl Envoy {
    pub fn start(filter_config: &str, concurrency: u32, upstream_port: u16) -> Envoy {
        match Envoy::spawn(&EnvoyOpts { filter_config, concurrency, upstream_port, edit: None }) {
            Ok(e) => e,
            Err(log) => panic!("Envoy did not become ready; its log:\n{log}"),
        }
    }

    /// Like `start`, with the `failover` target "backup" (`envoy.yaml`'s `llm_backup` cluster) at
    /// `backup_port`.
    pub fn start_with_backup(filter_config: &str, concurrency: u32, upstream_port: u16, backup_port: u16) -> Envoy {
        let (port, admin) = (free_port(), free_port());
        let yaml = render_config(filter_config, port, admin, upstream_port, &wasm_path())
            .replace("port_value: 9002", &format!("port_value: {backup_port}"));
        let concurrency = concurrency.to_string();
        let args = ["--concurrency", concurrency.as_str(), "--disable-hot-restart"];
        let ready = |admin| get(&format!("http://127.0.0.1:{admin}/ready")).is_ok_and(|r| r.status == 200);
        match Envoy::launch(TempDir::new(), &yaml, "envoy", port, admin, &args, ready) {
            Ok(e) => e,
            Err(log) => panic!("Envoy did not become ready; its log:\n{log}"),
        }
    }

    /// Starts Envoy and waits until it is ready, or returns its log if it exits or times out.
    pub fn spawn(o: &EnvoyOpts) -> Result<Envoy, String> {
        let (port, admin) = (free_port(), free_port());
        let yaml = render_config(o.filter_config, port, admin, o.upstream_port, &wasm_path());
        let yaml = o.edit.map_or(yaml.clone(), |edit| edit(yaml));
        let concurrency = o.concurrency.to_string();
        let args = ["--concurrency", concurrency.as_str(), "--disable-hot-restart"];
        Envoy::launch(TempDir::new(), &yaml, "envoy", port, admin, &args, |admin| {
            get(&format!("http://127.0.0.1:{admin}/ready")).is_ok_and(|r| r.status == 200)
        })
    }

    /// Writes `yaml` into `dir` as `<name>.yaml`, starts Envoy on it with `args`, and waits until
    /// `ready(admin)`; returns its log if it exits first or takes over 30 s.
    fn launch(
        dir: TempDir,
        yaml: &str,
        name: &str,
        port: u16,
        admin: u16,
        args: &[&str],
        ready: impl Fn(u16) -> bool,
    ) -> Result<Envoy, String> {
        let cfg = dir.0.join(format!("{name}.yaml"));
        std::fs::write(&cfg, yaml).expect("write envoy.yaml");
        let log = dir.0.join(format!("{name}.log"));
        let child = Command::new(envoy_bin())
            .arg("-c")
            .arg(&cfg)
            .args(["-l", "warning", "--component-log-level", "wasm:info"])
            // The log file is flushed every 10 s by default: too late for tests that read it.
            .args(["--file-flush-interval-msec", "100"])
            .args(args)
            .arg("--log-path")
            .arg(&log)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn envoy");
        let mut envoy = Envoy { child, port, admin, log, _dir: dir };
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = envoy.child.try_wait() {
                return Err(envoy.log());
            }
            if ready(admin) {
                return Ok(envoy);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(envoy.log())
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `wasmcustom.*` and other counters and gauges from `/stats?format=json`. The filter writes
    /// its counters on each tick (10 ms): wait a few ticks first.
    pub fn stats(&self) -> HashMap<String, u64> {
        std::thread::sleep(Duration::from_millis(40));
        let v = get_json(&format!("http://127.0.0.1:{}/stats?format=json", self.admin));
        let mut out = HashMap::new();
        for s in v["stats"].as_array().into_iter().flatten() {
            if let (Some(n), Some(x)) = (s["name"].as_str(), s["value"].as_u64()) {
                out.insert(n.to_string(), x);
            }
        }
        out
    }

    /// One of our stats by its name after `llm_ratelimit.provider.<name>.`, 0 if absent.
    pub fn stat(&self, provider: &str, rest: &str) -> u64 {
        let name = format!("wasmcustom.llm_ratelimit.provider.{provider}.{rest}");
        self.stats().get(&name).copied().unwrap_or(0)
    }

    pub fn admin_text(&self, path: &str) -> String {
        get(&format!("http://127.0.0.1:{}{path}", self.admin)).expect("admin").body
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("----- Envoy log -----\n{}\n----- end of Envoy log -----", self.log());
        }
    }
}

/// `envoy/envoy.yaml` with test ports, the built `.wasm` and `filter_config` on each filter
/// line (keeping that line's "role"): tests run the configuration users run.
pub fn render_config(filter_config: &str, port: u16, admin: u16, upstream: u16, wasm: &Path) -> String {
    let yaml = std::fs::read_to_string(root().join("envoy/envoy.yaml")).expect("envoy/envoy.yaml");
    yaml.lines()
        .map(|l| {
            let body = l.trim_start();
            if let Some(json) = body.strip_prefix("value: '").and_then(|j| j.strip_suffix('\'')) {
                let indent = &l[..l.len() - body.len()];
                format!("{indent}value: '{}'", with_role(filter_config, json).replace('\'', "''"))
            } else {
                l.replace("port_value: 10000", &format!("port_value: {port}"))
                    .replace("port_value: 9901", &format!("port_value: {admin}"))
                    .replace("port_value: 9000", &format!("port_value: {upstream}"))
                    .replace("target/wasm32-wasip1/release/llm_ratelimit.wasm", &wasm.display().to_string())
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// `filter_config` with the "role" of the yaml line's own configuration; on the line of a failover
/// target's observer (its "name" is a `failover` target's), that target's own configuration. Text
/// that is not a JSON object (a bad-config test) is used as it is.
fn with_role(filter_config: &str, yaml_json: &str) -> String {
    let line = serde_json::from_str::<serde_json::Value>(yaml_json).ok();
    let role = line.as_ref().and_then(|v| v.get("role").cloned());
    let name = line.as_ref().and_then(|v| v.get("name").cloned());
    let config = serde_json::from_str::<serde_json::Value>(filter_config).map(|c| {
        let targets = c.get("failover").and_then(|f| f.as_array()).cloned().unwrap_or_default();
        let target =
            targets.into_iter().filter_map(|t| t.get("provider").cloned()).find(|p| p.get("name") == name.as_ref());
        target.unwrap_or(c)
    });
    match (config, role) {
        (Ok(serde_json::Value::Object(mut m)), Some(role)) => {
            m.insert("role".into(), role);
            serde_json::Value::Object(m).to_string()
        }
        _ => filter_config.to_string(),
    }
}

/// A response, whatever its status.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: HashMap<String, String>,
    pub body: String,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }
}

fn agent() -> ureq::Agent {
    agent_with_timeout(Duration::from_secs(120))
}

fn agent_with_timeout(t: Duration) -> ureq::Agent {
    ureq::AgentBuilder::new().timeout(t).build()
}

fn reply(r: Result<ureq::Response, ureq::Error>) -> Result<Reply, String> {
    let resp = match r {
        Ok(resp) | Err(ureq::Error::Status(_, resp)) => resp,
        Err(e) => return Err(e.to_string()),
    };
    let status = resp.status();
    let headers = resp
        .headers_names()
        .into_iter()
        .filter_map(|n| resp.header(&n).map(|v| (n.to_ascii_lowercase(), v.to_string())))
        .collect();
    let mut body = String::new();
    resp.into_reader().take(1 << 20).read_to_string(&mut body).map_err(|e| e.to_string())?;
    Ok(Reply { status, headers, body })
}

pub fn get(url: &str) -> Result<Reply, String> {
    reply(agent().get(url).call())
}

pub fn get_json(url: &str) -> serde_json::Value {
    serde_json::from_str(&get(url).expect("GET").body).expect("JSON")
}

/// POSTs a small chat completion with `headers`.
pub fn chat(url: &str, headers: &[(&str, &str)]) -> Result<Reply, String> {
    chat_within(Duration::from_secs(120), url, headers)
}

/// Like `chat`, but gives up (and disconnects) after `timeout`.
pub fn chat_within(timeout: Duration, url: &str, headers: &[(&str, &str)]) -> Result<Reply, String> {
    let mut req = agent_with_timeout(timeout).post(url).set("content-type", "application/json");
    for (k, v) in headers {
        req = req.set(k, v);
    }
    reply(req.send_string(r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}"#))
}

/// POSTs `body` (JSON) with `headers`.
pub fn post(url: &str, body: &str, headers: &[(&str, &str)]) -> Result<Reply, String> {
    let mut req = agent().post(url).set("content-type", "application/json");
    for (k, v) in headers {
        req = req.set(k, v);
    }
    reply(req.send_string(body))
}

/// Sends `n` chat requests from `threads` threads at once; returns every reply.
pub fn burst(url: &str, n: usize, threads: usize, headers: &[(&str, &str)]) -> Vec<Reply> {
    let next = std::sync::atomic::AtomicUsize::new(0);
    let out = std::sync::Mutex::new(Vec::with_capacity(n));
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < n {
                    let r = chat(url, headers).expect("request");
                    out.lock().expect("lock").push(r);
                }
            });
        }
    });
    out.into_inner().expect("lock")
}

/// Milliseconds since the Unix epoch (the mock and Envoy use the same clock).
pub fn epoch_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_millis() as u64
}

/// A reply with when its request was sent and when it was answered (epoch ms).
#[derive(Debug)]
pub struct Timed {
    pub sent: u64,
    pub done: u64,
    pub reply: Result<Reply, String>,
}

impl Timed {
    pub fn status(&self) -> u16 {
        self.reply.as_ref().map_or(0, |r| r.status)
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.reply.as_ref().ok().and_then(|r| r.header(name))
    }

    /// `status reason source retry-after retry-after-ms @ms-after-t0`, for failure messages.
    pub fn summary(&self, t0: u64) -> String {
        match &self.reply {
            Ok(r) => format!(
                "{} {} {} ra={} ra_ms={} sent@{} done@{}",
                r.status,
                r.header("x-llm-ratelimit-reason").unwrap_or("-"),
                r.header("x-llm-ratelimit-source").unwrap_or("-"),
                r.header("retry-after").unwrap_or("-"),
                r.header("retry-after-ms").unwrap_or("-"),
                self.sent as i64 - t0 as i64,
                self.done as i64 - t0 as i64,
            ),
            Err(e) => format!("error {e} sent@{} done@{}", self.sent as i64 - t0 as i64, self.done as i64 - t0 as i64),
        }
    }
}

/// `chat_within`, timed.
pub fn timed_chat(timeout: Duration, url: &str, headers: &[(&str, &str)]) -> Timed {
    let sent = epoch_ms();
    let reply = chat_within(timeout, url, headers);
    Timed { sent, done: epoch_ms(), reply }
}

/// `n` chat requests released at the same instant from `n` threads; timed replies in order.
pub fn simultaneous(n: usize, url: &str, headers: &[(&str, &str)]) -> Vec<Timed> {
    let barrier = std::sync::Barrier::new(n);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..n)
            .map(|_| {
                s.spawn(|| {
                    barrier.wait();
                    timed_chat(Duration::from_secs(60), url, headers)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("request thread")).collect()
    })
}

/// `n` chat requests at once over HTTP/2 (`connections` connections), each body ending with
/// request trailers (tests/h2client.py, `--timeout` `secs` for the whole run): each result
/// object (`status`, `headers`, `body`, `error`, ...; see the script), in request order.
pub fn h2_chats(port: u16, n: usize, connections: usize, headers: &[&str], secs: f64) -> Vec<serde_json::Value> {
    let py = root().join(".venv/bin/python3");
    let has_h2 = Command::new(&py).args(["-c", "import h2"]).output().is_ok_and(|o| o.status.success());
    assert!(has_h2, "{} cannot import h2: run `scripts/setup.sh --test` (it installs h2 into .venv/)", py.display());
    let mut cmd = Command::new(py);
    cmd.arg(root().join("tests/h2client.py")).args(["--port", &port.to_string(), "-n", &n.to_string()]);
    cmd.args(["--connections", &connections.to_string(), "--timeout", &secs.to_string()]);
    for h in headers {
        cmd.args(["--header", h]);
    }
    let out = cmd.output().expect("tests/h2client.py");
    assert!(out.status.success(), "tests/h2client.py: {}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("h2client JSON");
    v["results"].as_array().expect("results").clone()
}

/// Polls `f` every 20 ms until it is true or `timeout` passes; returns whether it became true.
pub fn eventually(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn count(replies: &[Reply], status: u16) -> usize {
    replies.iter().filter(|r| r.status == status).count()
}

/// A temporary directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new() -> TempDir {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("llm-ratelimit-test-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

// ---- Helpers for tests/faults.rs: Envoy from a whole config file, LDS from a file, hot restart.

impl Envoy {
    /// Starts Envoy on the configuration `yaml` (written into `dir`) with `extra` arguments
    /// (e.g. `--base-id`, `--restart-epoch`; add `--disable-hot-restart` unless hot restarting),
    /// and waits until its admin (on `admin`) says LIVE for this `epoch`: during a hot restart the
    /// parent answers on the same admin port until it hands it over.
    pub fn spawn_file(
        dir: TempDir,
        yaml: &str,
        port: u16,
        admin: u16,
        epoch: u64,
        extra: &[&str],
    ) -> Result<Envoy, String> {
        let args: Vec<&str> = ["--concurrency", "2"].iter().chain(extra).copied().collect();
        Envoy::launch(dir, yaml, &format!("envoy-{epoch}"), port, admin, &args, |admin| {
            let info = get(&format!("http://127.0.0.1:{admin}/server_info")).ok();
            let info = info.and_then(|r| serde_json::from_str::<serde_json::Value>(&r.body).ok());
            info.is_some_and(|i| {
                i["state"] == "LIVE" && i["command_line_options"]["restart_epoch"].as_u64().unwrap_or(0) == epoch
            })
        })
    }

    /// The process id (for /proc and signals).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the process has exited (and reaps it).
    pub fn exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }
}

/// Lines of an Envoy log that show a Wasm VM failure or a panic: proxy-wasm-cpp-host's
/// `Function: proxy_on_... failed: Uncaught RuntimeError`, Envoy's `Wasm VM failed`, Rust's
/// `panicked at`, and any critical line.
pub fn vm_failures(log: &str) -> Vec<String> {
    const PATTERNS: [&str; 8] = [
        "panic",
        "wasm vm failed",
        "vm failed",
        "plugin failed",
        "failed: uncaught",
        "runtimeerror",
        "][critical]",
        "unreachable",
    ];
    log.lines().filter(|l| PATTERNS.iter().any(|p| l.to_ascii_lowercase().contains(p))).map(str::to_string).collect()
}

/// `envoy/envoy.yaml` rendered as `render_config` does, split for LDS from a file: the bootstrap
/// (admin, clusters, a `node` (LDS needs one), and `dynamic_resources.lds_config` reading `<lds_dir>/lds.yaml`, watched
/// through `lds_dir` so an atomic rename is picked up) and the listener as a discovery response.
pub fn lds_split(rendered: &str, lds_dir: &Path) -> (String, String) {
    let lines: Vec<&str> = rendered.lines().collect();
    let start = lines.iter().position(|l| *l == "  listeners:").expect("a listeners: block");
    let end = lines.iter().position(|l| *l == "  clusters:").expect("a clusters: block");
    let mut lds = String::from("resources:\n");
    for (i, l) in lines[start + 1..end].iter().enumerate() {
        let l = l.strip_prefix("  ").unwrap_or(l);
        if i == 0 {
            let rest = l.strip_prefix("- ").expect("the listener list item");
            lds += "- \"@type\": type.googleapis.com/envoy.config.listener.v3.Listener\n  ";
            lds += rest;
        } else {
            lds += l;
        }
        lds.push('\n');
    }
    let mut bootstrap: Vec<String> = lines[..start].iter().chain(&lines[end..]).map(|l| l.to_string()).collect();
    bootstrap.push(format!(
        "node: {{ id: llm-ratelimit-test, cluster: llm-ratelimit }}\ndynamic_resources:\n  lds_config:\n    resource_api_version: V3\n    path_config_source:\n      \
         path: {}\n      watched_directory: {{ path: {} }}",
        lds_dir.join("lds.yaml").display(),
        lds_dir.display()
    ));
    (bootstrap.join("\n"), lds)
}

/// Replaces `<dir>/<name>` atomically: written beside `dir` first, then renamed into it (what
/// Envoy's `watched_directory` expects).
pub fn replace_file(dir: &Path, name: &str, text: &str) {
    let tmp = dir.parent().expect("a parent directory").join(format!(".{name}.tmp"));
    std::fs::write(&tmp, text).expect("write the new file");
    std::fs::rename(&tmp, dir.join(name)).expect("rename into place");
}
