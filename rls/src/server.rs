//! `envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit` over gRPC (checks, and
//! settlements: descriptors whose last entry is `llm_ratelimit.settle`), and `/metrics`,
//! `/healthz` and `/usage` over HTTP.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::{
    rate_limit::Unit, Code, DescriptorStatus, RateLimit,
};
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_server::RateLimitService;
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use envoy_types::pb::google::protobuf::Duration as PbDuration;
use tonic::{Request, Response, Status};

use crate::config::{Config, Limit, Window};
use crate::limiter::{name, Counted, Limiter, Mode, Slot};
use crate::metrics::Metrics;

/// The key of the entry that makes a descriptor a settlement: the last entry, with the value
/// `refund` or `charge`; the units are the descriptor's `hits_addend`.
pub const SETTLE_KEY: &str = "llm_ratelimit.settle";

pub struct Service {
    pub config: Config,
    pub limiter: Limiter,
    pub metrics: Arc<Metrics>,
    pub key_prefix: String,
}

fn pb_duration(d: Duration) -> PbDuration {
    PbDuration { seconds: d.as_secs() as i64, nanos: d.subsec_nanos() as i32 }
}

fn current_limit(limit: &Limit) -> RateLimit {
    RateLimit { name: limit.name.clone(), requests_per_unit: limit.requests_per_unit, unit: limit.unit as i32 }
}

/// What a descriptor needs: an answer now (no limit, or unlimited), or its script in Redis.
enum Plan {
    Done(DescriptorStatus),
    Run(Work),
}

/// One descriptor's script: its counter's name, its limit, what to do and with how many units.
struct Work {
    name: String,
    limit: Limit,
    mode: Mode,
    units: u64,
}

/// `Check` for an ordinary descriptor; `Refund` or `Charge` when its last entry is
/// `llm_ratelimit.settle`; `Err` for another value there.
fn mode_of(d: &RateLimitDescriptor) -> Result<Mode, String> {
    match d.entries.last() {
        Some(e) if e.key == SETTLE_KEY => match e.value.as_str() {
            "refund" => Ok(Mode::Refund),
            "charge" => Ok(Mode::Charge),
            other => {
                let shown: String = other.chars().take(40).collect();
                Err(format!("unknown {SETTLE_KEY} value '{shown}' (refund or charge)"))
            }
        },
        _ => Ok(Mode::Check),
    }
}

impl Service {
    /// The limit of a descriptor's entries: its own `limit` (Envoy's override) wins over the file.
    fn limit_of(&self, domain: &str, d: Option<&RateLimitDescriptor>, entries: &[(&str, &str)]) -> Option<Limit> {
        match d.and_then(|d| d.limit.as_ref()) {
            Some(o) => match Unit::try_from(o.unit) {
                Ok(unit) if unit != Unit::Unknown => Some(Limit {
                    requests_per_unit: o.requests_per_unit,
                    unit,
                    unlimited: false,
                    shadow_mode: false,
                    name: String::new(),
                    window: Window::of(unit, false, None).unwrap_or(Window::Sliding),
                }),
                _ => None,
            },
            None => self.config.limit(domain, entries).cloned(),
        }
    }

    /// Finds a descriptor's limit (on its raw values, less a settle entry) and its counter.
    fn plan(&self, domain: &str, d: &RateLimitDescriptor, hits: u64, mode: Mode) -> Plan {
        let mut entries: Vec<(&str, &str)> = d.entries.iter().map(|e| (e.key.as_str(), e.value.as_str())).collect();
        if mode != Mode::Check {
            entries.pop();
        }
        let Some(limit) = self.limit_of(domain, Some(d), &entries) else {
            return Plan::Done(DescriptorStatus { code: Code::Ok as i32, ..Default::default() });
        };
        if limit.unlimited {
            return Plan::Done(DescriptorStatus {
                code: Code::Ok as i32,
                limit_remaining: u32::MAX,
                ..Default::default()
            });
        }
        let units = d.hits_addend.as_ref().map_or(hits, |h| h.value);
        Plan::Run(Work { name: name(&self.key_prefix, domain, &entries), limit, mode, units })
    }

    /// Runs one descriptor's script; `Err` only when Redis failed.
    async fn run(&self, slot: Slot, w: Work) -> Result<DescriptorStatus, String> {
        let start = Instant::now();
        let counted = self.limiter.run(slot, &w.name, &w.limit, w.mode, w.units).await;
        self.metrics.observe_redis(start.elapsed());
        let counted = counted?;
        let mut code = Code::Ok;
        match w.mode {
            Mode::Check | Mode::Peek if counted.admitted => {
                self.metrics.descriptors_ok.fetch_add(1, Relaxed);
            }
            Mode::Check | Mode::Peek if w.limit.shadow_mode => {
                self.metrics.shadow_over_limit.fetch_add(1, Relaxed);
            }
            Mode::Check | Mode::Peek => {
                self.metrics.descriptors_over_limit.fetch_add(1, Relaxed);
                code = Code::OverLimit;
            }
            Mode::Refund => {
                self.metrics.units_refunded.fetch_add(counted.applied, Relaxed);
            }
            Mode::Charge => {
                self.metrics.units_charged.fetch_add(counted.applied, Relaxed);
            }
        }
        Ok(DescriptorStatus {
            code: code as i32,
            current_limit: Some(current_limit(&w.limit)),
            limit_remaining: remaining(&w.limit, &counted),
            duration_until_reset: Some(pb_duration(counted.until_reset)),
            ..Default::default()
        })
    }

    /// The usage of the counter `entries` matches, for `GET /usage`: one key, read only.
    async fn usage(&self, domain: &str, entries: &[(&str, &str)]) -> Result<String, (u16, String)> {
        let Some(limit) = self.limit_of(domain, None, entries) else {
            return Err((404, "no limit matches this domain and descriptor".into()));
        };
        if limit.unlimited {
            return Ok(serde_json::json!({ "limit": null, "unlimited": true, "name": limit.name }).to_string());
        }
        let mut slots = self.limiter.reserve(1).map_err(|e| {
            self.metrics.overloaded.fetch_add(1, Relaxed);
            (503, e)
        })?;
        let slot = slots.pop().ok_or((500, "no Redis slot reserved".to_string()))?;
        let start = Instant::now();
        let counted = self.limiter.run(slot, &name(&self.key_prefix, domain, entries), &limit, Mode::Peek, 0).await;
        self.metrics.observe_redis(start.elapsed());
        let counted = counted.map_err(|e| {
            self.metrics.redis_errors.fetch_add(1, Relaxed);
            (503, e)
        })?;
        let calendar = match &limit.window {
            Window::Sliding => None,
            Window::Calendar(c) => Some(c.time_zone_name.as_str()),
        };
        let usage = Usage {
            limit: limit.requests_per_unit,
            used: counted.used,
            remaining: u64::from(limit.requests_per_unit).saturating_sub(counted.used),
            reset_ms: counted.until_reset.as_micros().div_ceil(1000) as u64,
            unit: limit.unit.as_str_name().to_ascii_lowercase(),
            window: if calendar.is_some() { "calendar" } else { "sliding" },
            time_zone: calendar,
            name: &limit.name,
            shadow_mode: limit.shadow_mode,
        };
        serde_json::to_string(&usage).map_err(|e| (500, e.to_string()))
    }
}

/// `GET /usage`'s answer, in this order.
#[derive(serde::Serialize)]
struct Usage<'a> {
    limit: u32,
    used: u64,
    remaining: u64,
    reset_ms: u64,
    unit: String,
    window: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    time_zone: Option<&'a str>,
    name: &'a str,
    shadow_mode: bool,
}

/// Units left under the limit (0 when charges took the count past it).
fn remaining(limit: &Limit, counted: &Counted) -> u32 {
    u64::from(limit.requests_per_unit).saturating_sub(counted.used) as u32
}

/// The gRPC face of a shared [`Service`].
pub struct Grpc(pub Arc<Service>);

#[tonic::async_trait]
impl RateLimitService for Grpc {
    async fn should_rate_limit(
        &self,
        request: Request<RateLimitRequest>,
    ) -> Result<Response<RateLimitResponse>, Status> {
        let request = request.into_inner();
        let this = &self.0;
        if request.domain.is_empty() || request.descriptors.is_empty() {
            this.metrics.invalid_requests.fetch_add(1, Relaxed);
            let what = if request.domain.is_empty() { "domain" } else { "descriptor list" };
            return Err(Status::invalid_argument(format!("rate limit {what} must not be empty")));
        }
        // Settlements are told apart (and a bad one refuses the call) before anything counts.
        let modes = request
            .descriptors
            .iter()
            .enumerate()
            .map(|(i, d)| mode_of(d).map_err(|e| format!("descriptors[{i}]: {e}")))
            .collect::<Result<Vec<Mode>, String>>()
            .map_err(|e| {
                this.metrics.invalid_requests.fetch_add(1, Relaxed);
                Status::invalid_argument(e)
            })?;
        // hits_addend 0 means 1, as in Envoy.
        let hits = u64::from(request.hits_addend.max(1));
        let mut statuses = vec![DescriptorStatus::default(); request.descriptors.len()];
        let mut checks = Vec::new();
        let mut no_limit = 0;
        for (i, (d, &mode)) in request.descriptors.iter().zip(&modes).enumerate() {
            match mode {
                Mode::Refund => this.metrics.settles_refund.fetch_add(1, Relaxed),
                Mode::Charge => this.metrics.settles_charge.fetch_add(1, Relaxed),
                _ => 0,
            };
            match this.plan(&request.domain, d, hits, mode) {
                Plan::Done(status) => {
                    statuses[i] = status;
                    no_limit += 1;
                }
                Plan::Run(work) => checks.push((i, work)),
            }
        }
        // Room in Redis for all of the call's scripts, or an answer at once that lets Envoy's
        // failure mode decide (as when Redis fails).
        let slots = match this.limiter.reserve(checks.len()) {
            Ok(slots) => slots,
            Err(e) => {
                this.metrics.overloaded.fetch_add(1, Relaxed);
                return Err(Status::unavailable(e));
            }
        };
        this.metrics.descriptors_no_limit.fetch_add(no_limit, Relaxed);
        // Each descriptor is its own atomic script (its own Cluster slot); all run at once.
        let mut tasks = tokio::task::JoinSet::new();
        for ((i, check), slot) in checks.into_iter().zip(slots) {
            let service = this.clone();
            tasks.spawn(async move { (i, service.run(slot, check).await) });
        }
        while let Some(joined) = tasks.join_next().await {
            match joined {
                Ok((i, Ok(status))) => statuses[i] = status,
                Ok((_, Err(e))) => {
                    this.metrics.redis_errors.fetch_add(1, Relaxed);
                    return Err(Status::unavailable(e));
                }
                Err(e) => return Err(Status::internal(e.to_string())),
            }
        }
        let over = statuses.iter().any(|s| s.code == Code::OverLimit as i32);
        this.metrics.requests.fetch_add(1, Relaxed);
        if over {
            this.metrics.over_limit.fetch_add(1, Relaxed);
        }
        let overall_code = if over { Code::OverLimit } else { Code::Ok } as i32;
        Ok(Response::new(RateLimitResponse { overall_code, statuses, ..Default::default() }))
    }
}

/// Longest query `/usage` reads, and most entries in its descriptor: bounded work per request.
const MAX_QUERY: usize = 8192;
const MAX_ENTRIES: usize = 64;

/// `%XX` decoded, and `+` as a space (a form's query); `None` when not UTF-8 or a bad escape.
fn percent_decode(s: &str) -> Option<String> {
    let mut out = Vec::with_capacity(s.len());
    let mut bytes = s.bytes();
    while let Some(b) = bytes.next() {
        match b {
            b'%' => {
                let hex = [bytes.next()?, bytes.next()?];
                out.push(u8::from_str_radix(std::str::from_utf8(&hex).ok()?, 16).ok()?);
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
    }
    String::from_utf8(out).ok()
}

/// `domain=D&descriptor=k1=v1,k2=v2`: the domain and the entries (each key and value
/// %-decoded after splitting on `,` and the first `=`, so `%2C` and `%3D` put those in a value).
fn usage_query(query: &str) -> Result<(String, Vec<(String, String)>), String> {
    if query.len() > MAX_QUERY {
        return Err(format!("query longer than {MAX_QUERY} bytes"));
    }
    let (mut domain, mut descriptor) = (None, None);
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        match percent_decode(k).as_deref() {
            Some("domain") => domain = Some(percent_decode(v).ok_or("domain: bad %-escape or not UTF-8")?),
            Some("descriptor") => descriptor = Some(v),
            _ => {}
        }
    }
    let domain = domain.filter(|d| !d.is_empty()).ok_or("missing domain=")?;
    let raw = descriptor.filter(|d| !d.is_empty()).ok_or("missing descriptor=k1=v1,k2=v2")?;
    let entries = raw
        .split(',')
        .map(|e| {
            let (k, v) = e.split_once('=').ok_or_else(|| format!("descriptor: entry '{e}' is not key=value"))?;
            match (percent_decode(k), percent_decode(v)) {
                (Some(k), Some(v)) if !k.is_empty() => Ok((k, v)),
                _ => Err(format!("descriptor: entry '{e}': empty key, bad %-escape or not UTF-8")),
            }
        })
        .collect::<Result<Vec<_>, String>>()?;
    if entries.len() > MAX_ENTRIES {
        return Err(format!("descriptor: more than {MAX_ENTRIES} entries"));
    }
    Ok((domain, entries))
}

/// `/metrics` (Prometheus text), `/healthz` (200 when Redis answers PING, else 503: a readiness
/// check) and `/usage?domain=D&descriptor=k1=v1,...` (one counter's usage, JSON).
pub fn http(service: Arc<Service>) -> axum::Router {
    use axum::http::{header, StatusCode, Uri};
    use axum::routing::get;
    let metrics = service.metrics.clone();
    let usage = service.clone();
    axum::Router::new()
        .route(
            "/metrics",
            get(move || async move { ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], metrics.render()) }),
        )
        .route(
            "/healthz",
            get(move || async move {
                match service.limiter.ping().await {
                    Ok(took) => (StatusCode::OK, format!("ok (redis PING {took:?})\n")),
                    Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")),
                }
            }),
        )
        .route(
            "/usage",
            get(move |uri: Uri| async move {
                let answer = match usage_query(uri.query().unwrap_or_default()) {
                    Err(e) => Err((400, e)),
                    Ok((domain, entries)) => {
                        let entries: Vec<(&str, &str)> =
                            entries.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
                        usage.usage(&domain, &entries).await
                    }
                };
                let (status, body) = match answer {
                    Ok(body) => (StatusCode::OK, body),
                    Err((status, e)) => (
                        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
                        serde_json::json!({ "error": e }).to_string(),
                    ),
                };
                (status, [(header::CONTENT_TYPE, "application/json")], format!("{body}\n"))
            }),
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_query_splits_then_decodes() {
        let (d, e) = usage_query("domain=llm-ratelimit&descriptor=provider=openai,tenant=a%2Cb%3Dc,unit=cost").unwrap();
        assert_eq!(d, "llm-ratelimit");
        let e: Vec<(&str, &str)> = e.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        assert_eq!(e, [("provider", "openai"), ("tenant", "a,b=c"), ("unit", "cost")]);
        assert!(usage_query("descriptor=a=b").unwrap_err().contains("domain"));
        assert!(usage_query("domain=d").unwrap_err().contains("descriptor"));
        assert!(usage_query("domain=d&descriptor=a").unwrap_err().contains("key=value"));
        assert!(usage_query("domain=d&descriptor=a=%zz").is_err());
        assert!(usage_query("domain=d&descriptor=a=%ff").is_err(), "not UTF-8");
        assert!(usage_query(&format!("domain=d&descriptor={}", vec!["k=v"; 65].join(","))).is_err());
    }

    #[test]
    fn settle_entry_picks_the_mode() {
        let d = |entries: &[(&str, &str)]| RateLimitDescriptor {
            entries: entries
                .iter()
                .map(|(k, v)| envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::Entry {
                    key: k.to_string(),
                    value: v.to_string(),
                })
                .collect(),
            ..Default::default()
        };
        assert_eq!(mode_of(&d(&[("a", "b")])), Ok(Mode::Check));
        assert_eq!(mode_of(&d(&[("a", "b"), (SETTLE_KEY, "refund")])), Ok(Mode::Refund));
        assert_eq!(mode_of(&d(&[("a", "b"), (SETTLE_KEY, "charge")])), Ok(Mode::Charge));
        // Only as the last entry.
        assert_eq!(mode_of(&d(&[(SETTLE_KEY, "refund"), ("a", "b")])), Ok(Mode::Check));
        assert!(mode_of(&d(&[("a", "b"), (SETTLE_KEY, "Refund")])).unwrap_err().contains("'Refund'"));
    }
}
