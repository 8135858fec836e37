//! The two LLM endpoints: OpenAI chat completions and Anthropic messages.
//! Both go through `answer`, which applies overrides, latency, terminal
//! states and the quota, then renders the result in the chosen style.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use serde_json::{json, Value};

use crate::config::{parse_latency, Style, Terminal};
use crate::quota::{Budget, Decision, Snapshot};
use crate::stats::Outcome;
use crate::styles::{self, Report};
use crate::timefmt::epoch;
use crate::AppState;

#[derive(Clone, Copy)]
enum Api {
    OpenAi,
    Anthropic,
}

pub async fn chat_completions(State(state): State<Arc<AppState>>, headers: HeaderMap, body: Bytes) -> Response {
    answer(state, Api::OpenAi, headers, body).await
}

pub async fn messages(State(state): State<Arc<AppState>>, headers: HeaderMap, body: Bytes) -> Response {
    answer(state, Api::Anthropic, headers, body).await
}

async fn answer(state: Arc<AppState>, api: Api, headers: HeaderMap, body: Bytes) -> Response {
    let path = match api {
        Api::OpenAi => "/v1/chat/completions",
        Api::Anthropic => "/v1/messages",
    };
    let priority = header(&headers, "x-llm-priority").unwrap_or("none");
    let _in_flight = InFlight::start(&state, path, priority);

    let settings = state.lock().settings.clone();
    let o = match Overrides::parse(&headers) {
        Ok(o) => o,
        Err(message) => {
            state.lock().stats.finished(Outcome::BadRequest);
            return styles::error(StatusCode::BAD_REQUEST, &message);
        }
    };
    let style = o.style.unwrap_or(settings.style);
    let terminal = o.terminal.unwrap_or(settings.terminal);

    // Latency first, so every answer (200 or 429) describes the quota as it is when sent.
    let latency = o.latency_ms.unwrap_or(settings.latency_ms);
    if latency > 0 {
        tokio::time::sleep(Duration::from_millis(latency)).await;
    }

    if let Some(status) = o.status {
        state.lock().stats.finished(Outcome::Forced);
        return styles::forced(status);
    }

    let request = LlmRequest::parse(&body);
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
    match inner.quota.try_acquire(request.prompt_tokens + request.completion_tokens, now) {
        Decision::Limited { snapshot, dimension, retry_after } => {
            inner.stats.finished(Outcome::RateLimited);
            drop(inner);
            report.snapshot = snapshot;
            report.limited = Some((dimension, retry_after));
            styles::rate_limited(style, &report)
        }
        Decision::Allowed(snapshot) => {
            inner.stats.finished(Outcome::Ok);
            drop(inner);
            report.snapshot = low_remaining(snapshot, settings.low_remaining);
            let headers = styles::quota_headers(style, &report);
            styles::respond(StatusCode::OK, headers, request.response(api, id, wall.as_secs()))
        }
    }
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

/// Per-request `x-mock-*` headers, so one instance can play many providers.
struct Overrides {
    style: Option<Style>,
    latency_ms: Option<u64>,
    terminal: Option<Terminal>,
    status: Option<StatusCode>,
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

/// What the mock needs from a request body. Never fails: a missing or broken
/// body still gets a 200, with tokens estimated from its length.
struct LlmRequest {
    model: String,
    prompt_tokens: u64,
    completion_tokens: u64,
}

const DEFAULT_COMPLETION_TOKENS: u64 = 16;
const MAX_COMPLETION_TOKENS: u64 = 4096;
const REPLY: &str = "This is a mock response from mock-provider.";

impl LlmRequest {
    fn parse(body: &[u8]) -> Self {
        let Ok(json) = serde_json::from_slice::<Value>(body) else {
            return LlmRequest {
                model: "mock-model".into(),
                prompt_tokens: (body.len() as u64).div_ceil(4),
                completion_tokens: DEFAULT_COMPLETION_TOKENS,
            };
        };
        // ~4 characters per token, the usual rule of thumb.
        let chars = text_chars(&json["messages"]) + text_chars(&json["system"]);
        let max_tokens = json["max_tokens"].as_u64().or(json["max_completion_tokens"].as_u64());
        LlmRequest {
            model: json["model"].as_str().unwrap_or("mock-model").to_string(),
            prompt_tokens: chars.div_ceil(4),
            completion_tokens: max_tokens.map_or(DEFAULT_COMPLETION_TOKENS, |n| n.clamp(1, MAX_COMPLETION_TOKENS)),
        }
    }

    fn response(&self, api: Api, id: u64, created: u64) -> Value {
        let (p, c) = (self.prompt_tokens, self.completion_tokens);
        match api {
            Api::OpenAi => json!({
                "id": format!("chatcmpl-mock-{id}"),
                "object": "chat.completion",
                "created": created,
                "model": self.model,
                "choices": [{
                    "index": 0,
                    "message": {"role": "assistant", "content": REPLY},
                    "finish_reason": "stop",
                }],
                "usage": {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c},
            }),
            Api::Anthropic => json!({
                "id": format!("msg_mock_{id}"),
                "type": "message",
                "role": "assistant",
                "model": self.model,
                "content": [{"type": "text", "text": REPLY}],
                "stop_reason": "end_turn",
                "stop_sequence": null,
                "usage": {"input_tokens": p, "output_tokens": c},
            }),
        }
    }
}

/// Characters of text in message contents: plain strings, content-part arrays
/// (`[{"type":"text","text":...}]`) and Anthropic system blocks alike.
fn text_chars(v: &Value) -> u64 {
    match v {
        Value::String(s) => s.chars().count() as u64,
        Value::Array(items) => items.iter().map(text_chars).sum(),
        Value::Object(o) => ["content", "text"].iter().filter_map(|k| o.get(*k)).map(text_chars).sum(),
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn estimates_tokens() {
        let r = LlmRequest::parse(
            br#"{"model":"gpt-4o","max_tokens":100,"messages":[
            {"role":"user","content":"12345678"},
            {"role":"user","content":[{"type":"text","text":"abcd"},{"type":"image_url","image_url":{"url":"x"}}]}]}"#,
        );
        assert_eq!((r.model.as_str(), r.prompt_tokens, r.completion_tokens), ("gpt-4o", 3, 100));

        let r = LlmRequest::parse(br#"{"system":[{"type":"text","text":"12345"}],"messages":[],"max_tokens":99999}"#);
        assert_eq!((r.model.as_str(), r.prompt_tokens, r.completion_tokens), ("mock-model", 2, 4096));

        let r = LlmRequest::parse(b"not json at all");
        assert_eq!((r.prompt_tokens, r.completion_tokens), (4, 16));
        assert_eq!(LlmRequest::parse(b"").prompt_tokens, 0);
    }
}
