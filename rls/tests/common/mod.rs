//! Real `redis-server`s on free 127.0.0.1 ports (persistence off, killed on drop), the service's
//! binary (killed on drop) and a gRPC client from envoy-types' stubs.
#![allow(dead_code)]

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub use envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::Entry;
pub use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
#[allow(unused_imports)]
pub use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::{rate_limit::Unit, Code};
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
pub use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};

pub const LIMITS: &str = "
domain: test
descriptors:
  - key: k            # 50 per second per value
    rate_limit: {unit: second, requests_per_unit: 50}
  - key: m            # 5 per minute per value
    rate_limit: {unit: minute, requests_per_unit: 5}
  - key: m            # 2 per minute for this long value
    value: tenant-with-a-long-name-0123456789012345678901234567890123456789012345678901234567
    rate_limit: {unit: minute, requests_per_unit: 2}
  - key: tok          # 1000 per minute per value
    rate_limit: {unit: minute, requests_per_unit: 1000, name: tokens}
  - key: shadow
    shadow_mode: true
    rate_limit: {unit: minute, requests_per_unit: 1}
  - key: free
    rate_limit: {unlimited: true}
";

/// A port free now, whose cluster bus port (+10000) is free too.
pub fn free_port() -> u16 {
    loop {
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        if port < 55_000 && TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok() {
            return port;
        }
    }
}

pub fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("rls-test-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

pub struct Redis {
    child: Option<Child>,
    pub port: u16,
    dir: PathBuf,
    extra: Vec<String>,
}

impl Redis {
    pub fn start() -> Redis {
        Redis::start_with(free_port(), &[])
    }

    pub fn start_with(port: u16, extra: &[&str]) -> Redis {
        let dir = temp_dir(&format!("redis-{port}"));
        let mut r = Redis { child: None, port, dir, extra: extra.iter().map(|s| s.to_string()).collect() };
        r.restart();
        r
    }

    /// (Re)starts on the same port and waits until it answers PING.
    pub fn restart(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(["--dir", self.dir.to_str().unwrap(), "--loglevel", "warning"])
            .args(&self.extra)
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server (scripts/setup.sh --test installs it)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.cli(&["PING"]).trim() != "PONG" {
            assert!(Instant::now() < deadline, "redis-server on {} did not start", self.port);
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn cli(&self, args: &[&str]) -> String {
        let out = Command::new("redis-cli").args(["-p", &self.port.to_string()]).args(args).output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// All keys (one line each).
    pub fn keys(&self) -> Vec<String> {
        self.cli(&["--scan"]).lines().map(str::to_string).collect()
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub struct Rls {
    child: Child,
    pub grpc: String,
    pub http: String,
}

impl Rls {
    /// Starts the service on free ports with `LIMITS` and these Redis flags.
    pub fn start(redis_flags: &[&str]) -> Rls {
        Rls::start_env(redis_flags, &[])
    }

    /// The same, with these environment variables.
    pub fn start_env(redis_flags: &[&str], env: &[(&str, &str)]) -> Rls {
        Rls::start_limits(LIMITS, redis_flags, env)
    }

    /// The same, with these limits.
    pub fn start_limits(limits: &str, redis_flags: &[&str], env: &[(&str, &str)]) -> Rls {
        let mut args = args_with_limits(limits);
        args.extend(redis_flags.iter().map(OsString::from));
        let env: Vec<(&str, OsString)> = env.iter().map(|(k, v)| (*k, OsString::from(v))).collect();
        match launch(&args, &env) {
            Launch::Listening(rls) => rls,
            other => panic!("the service did not start: {other:?}"),
        }
    }

    pub async fn client(&self) -> Client {
        Client(RateLimitServiceClient::connect(format!("http://{}", self.grpc)).await.unwrap())
    }

    /// GET on the HTTP port: (status, body).
    pub fn get(&self, path: &str) -> (u16, String) {
        let mut s = TcpStream::connect(&self.http).unwrap();
        write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap();
        let status = text.split_whitespace().nth(1).unwrap().parse().unwrap();
        (status, text.split_once("\r\n\r\n").map(|x| x.1.to_string()).unwrap_or_default())
    }
}

impl Drop for Rls {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `--config` (`LIMITS`) and local listeners on free ports.
pub fn base_args() -> Vec<OsString> {
    args_with_limits(LIMITS)
}

/// `--config` (these limits) and local listeners on free ports.
pub fn args_with_limits(text: &str) -> Vec<OsString> {
    let limits = temp_dir("limits").join(format!("limits-{}.yaml", free_port()));
    std::fs::write(&limits, text).unwrap();
    let mut args = vec![OsString::from("--config"), limits.into_os_string()];
    for a in ["--grpc-host", "127.0.0.1", "--grpc-port", "0", "--http-host", "127.0.0.1", "--http-port", "0"] {
        args.push(a.into());
    }
    args
}

/// How a run of the binary went.
pub enum Launch {
    /// It printed its `listening on` line (killed on drop).
    Listening(Rls),
    /// It exited: code (None: killed by a signal) and stderr.
    Exited(Option<i32>, String),
    /// Neither within 10 s (killed).
    Hung,
}

impl std::fmt::Debug for Launch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Launch::Listening(rls) => write!(f, "Listening(grpc {})", rls.grpc),
            Launch::Exited(code, stderr) => write!(f, "Exited({code:?}, {stderr:?})"),
            Launch::Hung => write!(f, "Hung"),
        }
    }
}

/// Runs the binary with exactly these arguments and (added) environment variables.
pub fn launch(args: &[OsString], env: &[(&str, OsString)]) -> Launch {
    let mut child = Command::new(env!("CARGO_BIN_EXE_llm-ratelimit-rls"))
        .args(args)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let mut stderr = child.stderr.take().unwrap();
    let Ok(line) = rx.recv_timeout(Duration::from_secs(10)) else {
        let _ = child.kill();
        let _ = child.wait();
        return Launch::Hung;
    };
    if line.is_empty() {
        // stdout closed: it exited.
        let status = child.wait().unwrap();
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        return Launch::Exited(status.code(), text);
    }
    // Its stderr, passed on for the test's output.
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("{line}");
        }
    });
    // "listening on grpc HOST:PORT http HOST:PORT"
    let words: Vec<&str> = line.split_whitespace().collect();
    assert!(words.len() == 6 && words[2] == "grpc" && words[4] == "http", "first line: {line:?}");
    Launch::Listening(Rls { child, grpc: words[3].to_string(), http: words[5].to_string() })
}

/// The entry that makes a descriptor a settlement (the last one): `refund` or `charge`.
pub const SETTLE: &str = "llm_ratelimit.settle";

/// A descriptor with its own `hits_addend`.
pub fn weighed(entries: &[(&str, &str)], hits: u64) -> RateLimitDescriptor {
    let mut d = descriptor(entries);
    d.hits_addend = Some(envoy_types::pb::google::protobuf::UInt64Value { value: hits });
    d
}

/// A settlement of `units` on the counter of `entries`: `kind` is refund or charge.
pub fn settle(entries: &[(&str, &str)], kind: &str, units: u64) -> RateLimitDescriptor {
    let mut all = entries.to_vec();
    all.push((SETTLE, kind));
    weighed(&all, units)
}

/// The service's /usage answer for `descriptor` (k=v,k=v) in domain `test`: status and JSON.
pub fn usage(rls: &Rls, descriptor: &str) -> (u16, serde_json::Value) {
    let (status, body) = rls.get(&format!("/usage?domain=test&descriptor={descriptor}"));
    (status, serde_json::from_str(&body).unwrap_or_else(|e| panic!("/usage: {e}: {body:?}")))
}

#[derive(Clone)]
pub struct Client(pub RateLimitServiceClient<tonic::transport::Channel>);

pub fn descriptor(entries: &[(&str, &str)]) -> RateLimitDescriptor {
    RateLimitDescriptor {
        entries: entries.iter().map(|(k, v)| Entry { key: k.to_string(), value: v.to_string() }).collect(),
        ..Default::default()
    }
}

impl Client {
    pub async fn call(
        &mut self,
        descriptors: Vec<RateLimitDescriptor>,
        hits: u32,
    ) -> Result<RateLimitResponse, tonic::Status> {
        let request = RateLimitRequest { domain: "test".into(), descriptors, hits_addend: hits };
        self.0.should_rate_limit(request).await.map(|r| r.into_inner())
    }

    /// One descriptor, one hit: admitted?
    pub async fn hit(&mut self, entries: &[(&str, &str)]) -> bool {
        let r = self.call(vec![descriptor(entries)], 1).await.unwrap();
        r.overall_code == Code::Ok as i32
    }
}
