//! `envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit` over gRPC, and `/metrics` and
//! `/healthz` over HTTP.

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

use crate::config::{unit_seconds, Config, Limit};
use crate::limiter::{key, Limiter, Slot};
use crate::metrics::Metrics;

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
    Check(Check),
}

/// One descriptor's script: its counter, its limit and the hits to add.
struct Check {
    key: String,
    period: Duration,
    limit: Limit,
    hits: u64,
}

impl Service {
    /// Finds a descriptor's limit (on its raw values) and its counter's key.
    fn plan(&self, domain: &str, d: &RateLimitDescriptor, hits: u64) -> Plan {
        let entries: Vec<(&str, &str)> = d.entries.iter().map(|e| (e.key.as_str(), e.value.as_str())).collect();
        // A descriptor may carry its own limit (Envoy's `limit` override); it wins over the file.
        let limit = match &d.limit {
            Some(o) => match Unit::try_from(o.unit) {
                Ok(unit) if unit != Unit::Unknown => Some(Limit {
                    requests_per_unit: o.requests_per_unit,
                    unit,
                    unlimited: false,
                    shadow_mode: false,
                    name: String::new(),
                }),
                _ => None,
            },
            None => self.config.limit(domain, &entries).cloned(),
        };
        let Some(limit) = limit else {
            return Plan::Done(DescriptorStatus { code: Code::Ok as i32, ..Default::default() });
        };
        if limit.unlimited {
            return Plan::Done(DescriptorStatus {
                code: Code::Ok as i32,
                limit_remaining: u32::MAX,
                ..Default::default()
            });
        }
        let hits = d.hits_addend.as_ref().map_or(hits, |h| h.value);
        let period = Duration::from_secs(unit_seconds(limit.unit));
        Plan::Check(Check { key: key(&self.key_prefix, domain, &entries, period), period, limit, hits })
    }

    /// Runs one descriptor's script; `Err` only when Redis failed.
    async fn check(&self, slot: Slot, c: Check) -> Result<DescriptorStatus, String> {
        let start = Instant::now();
        let decision = self.limiter.check(slot, &c.key, c.limit.requests_per_unit, c.period, c.hits).await;
        self.metrics.observe_redis(start.elapsed());
        let decision = decision?;
        let mut code = Code::Ok;
        if decision.admitted {
            self.metrics.descriptors_ok.fetch_add(1, Relaxed);
        } else if c.limit.shadow_mode {
            self.metrics.shadow_over_limit.fetch_add(1, Relaxed);
        } else {
            self.metrics.descriptors_over_limit.fetch_add(1, Relaxed);
            code = Code::OverLimit;
        }
        Ok(DescriptorStatus {
            code: code as i32,
            current_limit: Some(current_limit(&c.limit)),
            limit_remaining: decision.remaining,
            duration_until_reset: Some(pb_duration(decision.until_reset)),
            ..Default::default()
        })
    }
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
        // hits_addend 0 means 1, as in Envoy.
        let hits = u64::from(request.hits_addend.max(1));
        let mut statuses = vec![DescriptorStatus::default(); request.descriptors.len()];
        let mut checks = Vec::new();
        for (i, d) in request.descriptors.iter().enumerate() {
            match this.plan(&request.domain, d, hits) {
                Plan::Done(status) => statuses[i] = status,
                Plan::Check(check) => checks.push((i, check)),
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
        this.metrics.descriptors_no_limit.fetch_add((statuses.len() - checks.len()) as u64, Relaxed);
        // Each descriptor is its own atomic script (its own Cluster slot); all run at once.
        let mut tasks = tokio::task::JoinSet::new();
        for ((i, check), slot) in checks.into_iter().zip(slots) {
            let service = this.clone();
            tasks.spawn(async move { (i, service.check(slot, check).await) });
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

/// `/metrics` (Prometheus text) and `/healthz` (200 when Redis answers PING, else 503: a
/// readiness check).
pub fn http(service: Arc<Service>) -> axum::Router {
    use axum::http::{header, StatusCode};
    use axum::routing::get;
    let metrics = service.metrics.clone();
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
}
