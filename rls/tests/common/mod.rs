//! Real `redis-server`s on free 127.0.0.1 ports (persistence off, killed on drop), the service's
//! binary (killed on drop) and a gRPC client from envoy-types' stubs.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
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
        let limits = temp_dir("limits").join(format!("limits-{}.yaml", free_port()));
        std::fs::write(&limits, LIMITS).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_llm-ratelimit-rls"))
            .args(["--config", limits.to_str().unwrap(), "--grpc-host", "127.0.0.1", "--grpc-port", "0"])
            .args(["--http-host", "127.0.0.1", "--http-port", "0"])
            .args(redis_flags)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        // "listening on grpc HOST:PORT http HOST:PORT"
        let words: Vec<&str> = line.split_whitespace().collect();
        assert!(words.len() == 6 && words[2] == "grpc" && words[4] == "http", "first line: {line:?}");
        Rls { child, grpc: words[3].to_string(), http: words[5].to_string() }
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
