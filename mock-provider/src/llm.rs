//! The LLM endpoints: OpenAI chat completions and Responses, Anthropic messages
//! and Gemini generateContent / streamGenerateContent. All go through `answer`,
//! which applies overrides, the capacity slot, latency, terminal states and the quota,
//! then renders the result in the chosen style, whole or streamed (`shapes`, `stream`).

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::header::{CACHE_CONTROL, CONTENT_TYPE};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::Response;

use crate::capacity::{self, Admission};
use crate::config::{parse_latency, parse_output_tokens, Style, Terminal};
use crate::fault::Fault;
use crate::quota::{Budget, Decision, Snapshot};
use crate::shapes::{Api, Framing, LlmRequest, Reply};
use crate::stats::Outcome;
use crate::stream;
use crate::styles::{self, Headers, Report};
use crate::timefmt::epoch;
use crate::AppState;

/// Which endpoint was asked, and how (the Gemini URL carries the model and the framing).
struct Route {
    api: Api,
    path: String,
    /// `None`: from the body's `"stream"`.
    framing: Option<Framing>,
    model: Option<String>,
}

impl Route {
    fn new(api: Api, path: &str) -> Self {
        Route { api, path: path.into(), framing: None, model: None }
    }
}

pub async fn chat_completions(State(state): State<Arc<AppState>>, headers: HeaderMap, body: Bytes) -> Response {
    answer(state, Route::new(Api::Chat, "/v1/chat/completions"), headers, body).await
}

pub async fn responses(State(state): State<Arc<AppState>>, headers: HeaderMap, body: Bytes) -> Response {
    answer(state, Route::new(Api::Responses, "/v1/responses"), headers, body).await
}

pub async fn messages(State(state): State<Arc<AppState>>, headers: HeaderMap, body: Bytes) -> Response {
    answer(state, Route::new(Api::Anthropic, "/v1/messages"), headers, body).await
}

/// `POST /v1beta/models/{model}:generateContent` and `:streamGenerateContent` (SSE with
/// `?alt=sse`, else a streamed JSON array).
pub async fn gemini(
    State(state): State<Arc<AppState>>,
    Path(rest): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = format!("/v1beta/models/{rest}");
    let sse = query.is_some_and(|q| q.split('&').any(|kv| kv == "alt=sse"));
    let (model, framing) = match rest.rsplit_once(':') {
        Some((model, "generateContent")) if !model.is_empty() => (model, Framing::Json),
        Some((model, "streamGenerateContent")) if !model.is_empty() => {
            (model, if sse { Framing::Sse } else { Framing::JsonArray })
        }
        _ => return styles::error(StatusCode::NOT_FOUND, &format!("no route for POST {path}")),
    };
    let route = Route { api: Api::Gemini, framing: Some(framing), model: Some(model.into()), path };
    answer(state, route, headers, body).await
}

async fn answer(state: Arc<AppState>, route: Route, headers: HeaderMap, body: Bytes) -> Response {
    let priority = header(&headers, "x-llm-priority").unwrap_or("none");
    let in_flight = InFlight::start(&state, &route.path, priority);

    let o = match Overrides::parse(&headers) {
        Ok(o) => o,
        Err(message) => {
            state.lock().stats.finished(Outcome::BadRequest);
            return styles::error(StatusCode::BAD_REQUEST, &message);
        }
    };
    // Hidden capacity: wait for a slot (before any header is sent), or overflow at once. The
    // slot is held through the latency, and a stream's body (`held`).
    let slot = match capacity::admit(&state).await {
        Admission::Served(slot) => slot,
        Admission::Overflow(status) => {
            state.lock().stats.finished(Outcome::Overflowed);
            return styles::overloaded(status);
        }
    };
    let held = (in_flight, slot);

    let settings = state.lock().settings.clone();
    let style = o.style.unwrap_or(settings.style);
    let terminal = o.terminal.unwrap_or(settings.terminal);

    // Latency first, so every answer (200 or 429) describes the quota as it is when sent.
    let latency = o.latency_ms.unwrap_or(settings.latency_ms);
    if latency > 0 {
        tokio::time::sleep(Duration::from_millis(latency)).await;
    }

    if let Some(n) = o.fail_attempts {
        let attempt = header(&headers, "x-envoy-attempt-count").and_then(|a| a.trim().parse().ok()).unwrap_or(1u64);
        if attempt <= n {
            state.lock().stats.finished(Outcome::RateLimited);
            return styles::retry_soon();
        }
    }
    if let Some(response) = o.fault.unwrap_or(settings.fault).response() {
        state.lock().stats.finished(Outcome::Fault);
        return response;
    }
    if let Some(status) = o.status {
        state.lock().stats.finished(Outcome::Forced);
        return styles::forced(status);
    }

    let mut request = LlmRequest::parse(route.api, &body);
    if let Some(model) = route.model {
        request.model = model;
    }
    let framing = route.framing.unwrap_or(if request.stream { Framing::Sse } else { Framing::Json });
    let wanted = o.output_tokens.or((settings.output_tokens > 0).then_some(settings.output_tokens));
    let completion_tokens = request.completion_tokens(wanted);
    let id = state.next_id();
    let (now, wall) = (Instant::now(), epoch(SystemTime::now()));
    let mut report = Report {
        snapshot: Snapshot::default(),
        limited: None,
        wall,
        window: Duration::from_millis(settings.window_ms),
        request_id: id,
    };

    let mut inner = state.lock();
    if terminal != Terminal::None {
        inner.stats.finished(Outcome::Terminal);
        return styles::terminal(terminal, &report);
    }
    match inner.quota.try_acquire(request.prompt_tokens + completion_tokens, now) {
        Decision::Limited { snapshot, dimension, retry_after } => {
            inner.stats.finished(Outcome::RateLimited);
            drop(inner);
            report.snapshot = snapshot;
            report.limited = Some((dimension, retry_after));
            styles::rate_limited(style, &report)
        }
        Decision::Allowed(snapshot) => {
            let reply = Reply::new(route.api, id, wall.as_secs(), &request, completion_tokens);
            let (input, output) = reply.usage();
            inner.stats.finished(Outcome::Ok);
            inner.stats.answered(input, output, framing != Framing::Json);
            drop(inner);
            report.snapshot = low_remaining(snapshot, settings.low_remaining);
            // With a capacity, like vLLM: no rate-limit headers at all.
            let headers = match settings.capacity {
                0 => styles::quota_headers(style, &report),
                _ => Headers::new(),
            };
            match framing {
                Framing::Json => styles::respond(StatusCode::OK, headers, reply.json()),
                _ => streamed(headers, framing, &reply, held),
            }
        }
    }
}

/// A 200 whose body is sent in uneven chunks; the request stays in flight (and holds its
/// capacity slot) until it ends.
fn streamed(headers: Headers, framing: Framing, reply: &Reply, held: (InFlight, capacity::Slot)) -> Response {
    let bytes = reply.stream_bytes(framing);
    let mut response = Response::new(stream::body(stream::split(&bytes), held));
    let content_type = if framing == Framing::Sse { "text/event-stream" } else { "application/json" };
    response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response.headers_mut().insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    styles::add_headers(&mut response, headers);
    response
}

/// `low_remaining: K` pretends the provider is nearly exhausted: remaining <= K.
fn low_remaining(s: Snapshot, k: u64) -> Snapshot {
    if k == 0 {
        return s;
    }
    let cap = |b: Option<Budget>| b.map(|b| Budget { remaining: b.remaining.min(k), ..b });
    Snapshot { requests: cap(s.requests), tokens: cap(s.tokens) }
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// Per-request `x-mock-*` headers, so one instance can play many providers:
/// `x-mock-style`, `x-mock-latency-ms`, `x-mock-terminal`, `x-mock-status`,
/// `x-mock-output-tokens` (1..=4096: the reply's length, capped by max tokens), and
/// `x-mock-fail-attempts` (N: a 429 that says "retry in 100 ms" to router attempts 1..=N, read
/// from Envoy's `x-envoy-attempt-count`), `x-mock-fault` (`fault::Fault`).
struct Overrides {
    style: Option<Style>,
    latency_ms: Option<u64>,
    terminal: Option<Terminal>,
    status: Option<StatusCode>,
    output_tokens: Option<u64>,
    fail_attempts: Option<u64>,
    fault: Option<Fault>,
}

impl Overrides {
    fn parse(headers: &HeaderMap) -> Result<Self, String> {
        let get = |name: &str| header(headers, name).map(str::trim);
        let named = |name: &str, e: String| format!("{name}: {e}");
        Ok(Overrides {
            style: get("x-mock-style").map(Style::parse).transpose().map_err(|e| named("x-mock-style", e))?,
            latency_ms: get("x-mock-latency-ms")
                .map(parse_latency)
                .transpose()
                .map_err(|e| named("x-mock-latency-ms", e))?,
            terminal: get("x-mock-terminal")
                .map(Terminal::parse)
                .transpose()
                .map_err(|e| named("x-mock-terminal", e))?,
            status: get("x-mock-status").map(parse_status).transpose().map_err(|e| named("x-mock-status", e))?,
            output_tokens: get("x-mock-output-tokens")
                .map(|v| parse_output_tokens(v, 1))
                .transpose()
                .map_err(|e| named("x-mock-output-tokens", e))?,
            fail_attempts: get("x-mock-fail-attempts")
                .map(|v| v.parse::<u64>().map_err(|_| format!("expected a whole number, got '{v}'")))
                .transpose()
                .map_err(|e| named("x-mock-fail-attempts", e))?,
            fault: get("x-mock-fault").map(Fault::parse).transpose().map_err(|e| named("x-mock-fault", e))?,
        })
    }
}

fn parse_status(v: &str) -> Result<StatusCode, String> {
    match v.parse::<u16>() {
        // No 1xx: those are not final responses.
        Ok(n @ 200..=599) => Ok(StatusCode::from_u16(n).expect("in range")),
        _ => Err(format!("expected a status code 200..=599, got '{v}'")),
    }
}

/// Counts a request as in flight for as long as its handler runs, including
/// when the client goes away mid-latency and the handler is dropped.
struct InFlight(Arc<AppState>);

impl InFlight {
    fn start(state: &Arc<AppState>, path: &str, priority: &str) -> Self {
        state.lock().stats.arrived(path, priority);
        InFlight(state.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.lock().stats.in_flight -= 1;
    }
}
