//! llm-ratelimit-rls: a stateless Envoy rate limit service (envoy.service.ratelimit.v3) whose
//! counters are sliding windows in Redis or a Redis Cluster. Settings mirror envoyproxy/ratelimit's
//! environment variables where the same thing exists; flags win over the environment.

mod config;
mod limiter;
mod metrics;
mod server;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_server::RateLimitServiceServer;

const USAGE: &str = "\
usage: llm-ratelimit-rls [--config FILE|DIR] [--redis redis://HOST:PORT | --redis-cluster HOST:PORT,...]
                         [--grpc-host H] [--grpc-port P] [--http-host H] [--http-port P] [--redis-timeout 40ms]

  --config FILE|DIR    limits, in envoyproxy/ratelimit's YAML; a directory loads its *.yaml files
                       (env CONFIG; else $RUNTIME_ROOT/$RUNTIME_SUBDIRECTORY/config)
  --redis URL          one Redis: redis://host:port[/db] or host:port (env REDIS_URL with REDIS_TYPE=single;
                       default redis://127.0.0.1:6379)
  --redis-cluster LIST a Redis Cluster's seed nodes host:port,host:port (env REDIS_URL with REDIS_TYPE=cluster)
  --grpc-host/--grpc-port   gRPC listener (env GRPC_HOST, GRPC_PORT; default 0.0.0.0:8081)
  --http-host/--http-port   /metrics and /healthz (env HOST, PORT; default 0.0.0.0:8080)
  --redis-timeout D    bound on one Redis call, connecting included (env REDIS_TIMEOUT; 40ms, 1s, ...)
  (env CACHE_KEY_PREFIX: a prefix for every Redis key)
Port 0 picks a free port; the first line on stdout is `listening on grpc HOST:PORT http HOST:PORT`.";

struct Settings {
    config: PathBuf,
    redis: limiter::Target,
    redis_desc: String,
    grpc: String,
    http: String,
    timeout: Duration,
    key_prefix: String,
}

fn parse_duration(s: &str) -> Option<Duration> {
    let (n, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit() && c != '.')?);
    let n: f64 = n.parse().ok()?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "us" | "µs" => n / 1e6,
        _ => return None,
    };
    Some(Duration::from_secs_f64(secs))
}

fn settings(args: &[String]) -> Result<Settings, String> {
    let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    let mut flags = std::collections::HashMap::new();
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let name = flag.strip_prefix("--").ok_or_else(|| format!("unexpected argument '{flag}'"))?;
        let (name, value) = match name.split_once('=') {
            Some((n, v)) => (n.to_string(), v.to_string()),
            None => (name.to_string(), it.next().ok_or_else(|| format!("--{name} needs a value"))?.clone()),
        };
        let known =
            ["config", "redis", "redis-cluster", "grpc-host", "grpc-port", "http-host", "http-port", "redis-timeout"];
        if !known.contains(&name.as_str()) {
            return Err(format!("unknown flag --{name}"));
        }
        flags.insert(name, value);
    }
    let get =
        |flag: &str, var: &str, default: &str| flags.get(flag).cloned().or_else(|| env(var)).unwrap_or(default.into());

    let config = match flags.get("config").cloned().or_else(|| env("CONFIG")) {
        Some(path) => PathBuf::from(path),
        None => match env("RUNTIME_ROOT") {
            Some(root) => PathBuf::from(root).join(env("RUNTIME_SUBDIRECTORY").unwrap_or_default()).join("config"),
            None => return Err("no limits: pass --config FILE, or set CONFIG or RUNTIME_ROOT".into()),
        },
    };
    let cluster = match (flags.get("redis-cluster"), flags.get("redis")) {
        (Some(nodes), None) => Some(nodes.clone()),
        (Some(_), Some(_)) => return Err("--redis and --redis-cluster exclude each other".into()),
        (None, Some(_)) => None,
        (None, None) => match env("REDIS_TYPE").map(|t| t.to_ascii_lowercase()).as_deref() {
            None | Some("single") => None,
            Some("cluster") => Some(env("REDIS_URL").ok_or("REDIS_TYPE=cluster needs REDIS_URL=host:port,...")?),
            Some(other) => return Err(format!("REDIS_TYPE: '{other}' is not single or cluster")),
        },
    };
    let url = |s: &str| if s.contains("://") { s.to_string() } else { format!("redis://{s}") };
    let (redis, redis_desc) = match cluster {
        Some(nodes) => {
            let nodes: Vec<String> = nodes.split(',').map(|n| url(n.trim())).collect();
            let timeout = parse_timeout(&get("redis-timeout", "REDIS_TIMEOUT", "40ms"))?;
            let client = redis::cluster::ClusterClientBuilder::new(nodes.clone())
                .connection_timeout(timeout)
                .response_timeout(timeout)
                .retries(1)
                .build()
                .map_err(|e| format!("--redis-cluster: {e}"))?;
            (limiter::Target::Cluster(Box::new(client)), format!("cluster {}", nodes.join(",")))
        }
        None => {
            let u = url(&get("redis", "REDIS_URL", "redis://127.0.0.1:6379"));
            let client = redis::Client::open(u.as_str()).map_err(|e| format!("--redis: {e}"))?;
            (limiter::Target::Single(client), u)
        }
    };
    let port = |flag: &str, var: &str, default: &str| -> Result<u16, String> {
        let v = get(flag, var, default);
        v.parse().map_err(|_| format!("--{flag}: '{v}' is not a port"))
    };
    Ok(Settings {
        config,
        redis,
        redis_desc,
        grpc: format!("{}:{}", get("grpc-host", "GRPC_HOST", "0.0.0.0"), port("grpc-port", "GRPC_PORT", "8081")?),
        http: format!("{}:{}", get("http-host", "HOST", "0.0.0.0"), port("http-port", "PORT", "8080")?),
        timeout: parse_timeout(&get("redis-timeout", "REDIS_TIMEOUT", "40ms"))?,
        key_prefix: env("CACHE_KEY_PREFIX").unwrap_or_default(),
    })
}

fn parse_timeout(s: &str) -> Result<Duration, String> {
    parse_duration(s)
        .filter(|d| !d.is_zero())
        .ok_or_else(|| format!("--redis-timeout: '{s}' is not a duration like 40ms or 1s"))
}

#[tokio::main]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!("{USAGE}");
        return ExitCode::SUCCESS;
    }
    let settings = match settings(&args) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("llm-ratelimit-rls: {e}\n\n{USAGE}");
            return ExitCode::from(2);
        }
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
        limiter: limiter::Limiter::new(settings.redis, settings.timeout),
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
