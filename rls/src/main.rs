//! llm-ratelimit-rls: a stateless Envoy rate limit service (envoy.service.ratelimit.v3) whose
//! counters are sliding or calendar windows in Redis or a Redis Cluster. Settings mirror envoyproxy/ratelimit's
//! environment variables where the same thing exists; flags win over the environment.

mod config;
mod limiter;
mod metrics;
mod server;

use std::fmt::Display;
use std::io::Write;
use std::ops::RangeInclusive;
use std::path::PathBuf;
use std::process::ExitCode;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_server::RateLimitServiceServer;

const USAGE: &str = "\
usage: llm-ratelimit-rls [--config FILE|DIR] [--redis redis://HOST:PORT | --redis-cluster HOST:PORT,...]
                         [--grpc-host H] [--grpc-port P] [--http-host H] [--http-port P] [--redis-timeout 40ms]
                         [--max-in-flight N] [--clock-offset-s N]

  --config FILE|DIR    limits, in envoyproxy/ratelimit's YAML; a directory loads its *.yaml files
                       (env CONFIG; else $RUNTIME_ROOT/$RUNTIME_SUBDIRECTORY/config)
  --redis URL          one Redis: redis://host:port[/db] or host:port (env REDIS_URL with REDIS_TYPE=single;
                       default redis://127.0.0.1:6379)
  --redis-cluster LIST a Redis Cluster's seed nodes host:port,host:port (env REDIS_URL with REDIS_TYPE=cluster)
  --grpc-host/--grpc-port   gRPC listener (env GRPC_HOST, GRPC_PORT; default 0.0.0.0:8081; port 0 to 65535)
  --http-host/--http-port   /metrics, /healthz, /usage (env HOST, PORT; default 0.0.0.0:8080; port 0 to 65535)
  --redis-timeout D    bound on one Redis call, connecting included (env REDIS_TIMEOUT; 40ms; 1ms to 60s)
  --max-in-flight N    Redis calls at once; more are answered UNAVAILABLE at once (env MAX_IN_FLIGHT;
                       1000; 1 to 1000000)
  --clock-offset-s N   for tests and drills: shifts the service's clock (Redis' TIME) by N seconds, signed
                       (env LLM_RLS_CLOCK_OFFSET_S; 0; -3153600000 to 3153600000)
  (env CACHE_KEY_PREFIX: a prefix for every Redis key, without '{' or '}')
Port 0 picks a free port; the first line on stdout is `listening on grpc HOST:PORT http HOST:PORT`.";

/// The bounds of `--redis-timeout`: a longer call would hold Envoy's request far too long.
const TIMEOUT_RANGE: (Duration, Duration) = (Duration::from_millis(1), Duration::from_secs(60));
/// The bounds of `--max-in-flight` (the semaphore refuses more than `usize::MAX >> 3`).
const MAX_IN_FLIGHT_RANGE: RangeInclusive<u32> = 1..=1_000_000;
/// The bounds of `--clock-offset-s`: a century either way keeps Redis' time plus it positive and
/// exact in the scripts' numbers.
const CLOCK_OFFSET_RANGE: RangeInclusive<i64> = -3_153_600_000..=3_153_600_000;

struct Settings {
    config: PathBuf,
    redis: limiter::Target,
    redis_desc: String,
    grpc: String,
    http: String,
    timeout: Duration,
    max_in_flight: u32,
    key_prefix: String,
    clock_offset_s: i64,
}

/// A value as messages show it: at most 40 characters (a hostile one may be 60 KB).
fn shown(v: &str) -> String {
    match v.char_indices().nth(40) {
        Some((i, _)) => format!("{}...", &v[..i]),
        None => v.to_string(),
    }
}

/// A variable's value: unset and empty alike; not UTF-8 is an error.
fn env(name: &str) -> Result<Option<String>, String> {
    match std::env::var(name) {
        Ok(v) => Ok(Some(v).filter(|v| !v.is_empty())),
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(_)) => Err(format!("{name}: not UTF-8")),
    }
}

/// A setting's value and where it came from (`--flag` or `VARIABLE`), for messages.
struct Value {
    text: String,
    from: String,
}

/// A whole number within `range`; the error names the setting and the range.
fn number<T: FromStr + PartialOrd + Display>(v: &Value, range: RangeInclusive<T>) -> Result<T, String> {
    v.text.parse().ok().filter(|n| range.contains(n)).ok_or_else(|| {
        format!("{}: '{}' is not a whole number from {} to {}", v.from, shown(&v.text), range.start(), range.end())
    })
}

/// A number (digits and a point) then `us`, `ms` or `s`; `None` when it is not a `Duration`.
fn parse_duration(s: &str) -> Option<Duration> {
    let (n, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit() && c != '.')?);
    let n: f64 = n.parse().ok()?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "us" | "µs" => n / 1e6,
        _ => return None,
    };
    Duration::try_from_secs_f64(secs).ok()
}

fn parse_timeout(v: &Value) -> Result<Duration, String> {
    let (min, max) = TIMEOUT_RANGE;
    parse_duration(&v.text).filter(|d| (min..=max).contains(d)).ok_or_else(|| {
        format!("{}: '{}' is not a duration from {min:?} to {max:?} (like 40ms or 1s)", v.from, shown(&v.text))
    })
}

/// `{` or `}` in the prefix would make Redis Cluster take the hash tag from the prefix rather
/// than from each descriptor's name: every key in one slot.
fn key_prefix(prefix: String) -> Result<String, String> {
    if prefix.contains(['{', '}']) {
        return Err(format!(
            "CACHE_KEY_PREFIX: '{}' must not contain '{{' or '}}' (Redis Cluster would put every key in one slot)",
            shown(&prefix)
        ));
    }
    Ok(prefix)
}

/// The arguments, all UTF-8.
fn args() -> Result<Vec<String>, String> {
    std::env::args_os()
        .skip(1)
        .map(|a| a.into_string().map_err(|a| format!("argument '{}' is not UTF-8", shown(&a.to_string_lossy()))))
        .collect()
}

fn settings(args: &[String]) -> Result<Settings, String> {
    let mut flags = std::collections::HashMap::new();
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let name = flag.strip_prefix("--").ok_or_else(|| format!("unexpected argument '{}'", shown(flag)))?;
        let (name, value) = match name.split_once('=') {
            Some((n, v)) => (n.to_string(), v.to_string()),
            None => (name.to_string(), it.next().ok_or_else(|| format!("--{} needs a value", shown(name)))?.clone()),
        };
        let known = [
            "config",
            "redis",
            "redis-cluster",
            "grpc-host",
            "grpc-port",
            "http-host",
            "http-port",
            "redis-timeout",
            "max-in-flight",
            "clock-offset-s",
        ];
        if !known.contains(&name.as_str()) {
            return Err(format!("unknown flag --{}", shown(&name)));
        }
        flags.insert(name, value);
    }
    // The flag, else the variable, else the default.
    let get = |flag: &str, var: &str, default: &str| -> Result<Value, String> {
        if let Some(v) = flags.get(flag) {
            return Ok(Value { text: v.clone(), from: format!("--{flag}") });
        }
        Ok(match env(var)? {
            Some(v) => Value { text: v, from: var.to_string() },
            None => Value { text: default.to_string(), from: format!("--{flag}") },
        })
    };

    let config = match flags.get("config") {
        Some(path) => PathBuf::from(path),
        None => match env("CONFIG")? {
            Some(path) => PathBuf::from(path),
            None => match env("RUNTIME_ROOT")? {
                Some(root) => PathBuf::from(root).join(env("RUNTIME_SUBDIRECTORY")?.unwrap_or_default()).join("config"),
                None => return Err("no limits: pass --config FILE, or set CONFIG or RUNTIME_ROOT".into()),
            },
        },
    };
    let timeout = parse_timeout(&get("redis-timeout", "REDIS_TIMEOUT", "40ms")?)?;
    let cluster = match (flags.get("redis-cluster"), flags.get("redis")) {
        (Some(nodes), None) => Some(nodes.clone()),
        (Some(_), Some(_)) => return Err("--redis and --redis-cluster exclude each other".into()),
        (None, Some(_)) => None,
        (None, None) => match env("REDIS_TYPE")?.map(|t| t.to_ascii_lowercase()).as_deref() {
            None | Some("single") => None,
            Some("cluster") => Some(env("REDIS_URL")?.ok_or("REDIS_TYPE=cluster needs REDIS_URL=host:port,...")?),
            Some(other) => return Err(format!("REDIS_TYPE: '{}' is not single or cluster", shown(other))),
        },
    };
    let url = |s: &str| if s.contains("://") { s.to_string() } else { format!("redis://{s}") };
    let (redis, redis_desc) = match cluster {
        Some(nodes) => {
            let nodes: Vec<String> = nodes.split(',').map(|n| url(n.trim())).collect();
            let client = redis::cluster::ClusterClientBuilder::new(nodes.clone())
                .connection_timeout(timeout)
                .response_timeout(timeout)
                .retries(1)
                .build()
                .map_err(|e| format!("--redis-cluster: {e}"))?;
            (limiter::Target::Cluster(Box::new(client)), format!("cluster {}", nodes.join(",")))
        }
        None => {
            let u = url(&get("redis", "REDIS_URL", "redis://127.0.0.1:6379")?.text);
            let client = redis::Client::open(u.as_str()).map_err(|e| format!("--redis: {e}"))?;
            (limiter::Target::Single(client), u)
        }
    };
    let port = |flag: &str, var: &str, default: &str| number::<u16>(&get(flag, var, default)?, 0..=u16::MAX);
    let host = |flag: &str, var: &str| get(flag, var, "0.0.0.0").map(|v| v.text);
    Ok(Settings {
        config,
        redis,
        redis_desc,
        grpc: format!("{}:{}", host("grpc-host", "GRPC_HOST")?, port("grpc-port", "GRPC_PORT", "8081")?),
        http: format!("{}:{}", host("http-host", "HOST")?, port("http-port", "PORT", "8080")?),
        timeout,
        max_in_flight: number(&get("max-in-flight", "MAX_IN_FLIGHT", "1000")?, MAX_IN_FLIGHT_RANGE)?,
        key_prefix: key_prefix(env("CACHE_KEY_PREFIX")?.unwrap_or_default())?,
        clock_offset_s: number(&get("clock-offset-s", "LLM_RLS_CLOCK_OFFSET_S", "0")?, CLOCK_OFFSET_RANGE)?,
    })
}

/// Exit 2 with the message; a closed stderr is no reason to panic.
fn bad_usage(e: &str) -> ExitCode {
    let _ = writeln!(std::io::stderr(), "llm-ratelimit-rls: {e}\n\n{USAGE}");
    ExitCode::from(2)
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = match args() {
        Ok(args) => args,
        Err(e) => return bad_usage(&e),
    };
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!("{USAGE}");
        return ExitCode::SUCCESS;
    }
    let settings = match settings(&args) {
        Ok(s) => s,
        Err(e) => return bad_usage(&e),
    };
    let config = match config::Config::load(&settings.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("llm-ratelimit-rls: bad limits: {e}");
            return ExitCode::from(2);
        }
    };
    let service = Arc::new(server::Service {
        config,
        limiter: limiter::Limiter::new(
            settings.redis,
            settings.timeout,
            settings.max_in_flight,
            settings.clock_offset_s,
        ),
        metrics: Default::default(),
        key_prefix: settings.key_prefix,
    });
    let bind = |addr: String| async move {
        tokio::net::TcpListener::bind(&addr).await.map_err(|e| format!("cannot listen on {addr}: {e}"))
    };
    let (grpc, http) = match (bind(settings.grpc).await, bind(settings.http).await) {
        (Ok(g), Ok(h)) => (g, h),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("llm-ratelimit-rls: {e}");
            return ExitCode::FAILURE;
        }
    };
    let (grpc_addr, http_addr) = (grpc.local_addr().ok(), http.local_addr().ok());
    if let (Some(g), Some(h)) = (grpc_addr, http_addr) {
        println!("listening on grpc {g} http {h}");
    }
    eprintln!("llm-ratelimit-rls: limits from {}, redis {}", settings.config.display(), settings.redis_desc);
    if settings.clock_offset_s != 0 {
        eprintln!("llm-ratelimit-rls: clock shifted by {} s (--clock-offset-s)", settings.clock_offset_s);
    }

    let http_server = axum::serve(http, server::http(service.clone()));
    let grpc_server = tonic::transport::Server::builder()
        .add_service(RateLimitServiceServer::new(server::Grpc(service)))
        .serve_with_incoming(tonic::transport::server::TcpIncoming::from(grpc));
    tokio::select! {
        r = grpc_server => if let Err(e) = r { eprintln!("llm-ratelimit-rls: grpc: {e}"); return ExitCode::FAILURE },
        r = http_server => if let Err(e) = r { eprintln!("llm-ratelimit-rls: http: {e}"); return ExitCode::FAILURE },
        _ = shutdown() => {}
    }
    ExitCode::SUCCESS
}

async fn shutdown() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
