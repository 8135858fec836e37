//! mock-provider: a small HTTP server that behaves like an LLM API, with a
//! configurable window quota and provider-specific rate-limit headers and 429s.
//! Upstream for the end-to-end tests, the demo and the benchmarks.
//!
//! LLM endpoints (whole JSON, or streamed when asked, always with token usage):
//! `POST /v1/chat/completions`, `POST /v1/responses`, `POST /v1/messages`,
//! `POST /v1beta/models/{model}:generateContent` and `:streamGenerateContent`.
//! Control: `GET /mock/stats`, `POST /mock/reset`, `POST /mock/config`.
//! Faults (`--fault`, `fault.rs`): connection resets, non-HTTP bytes, garbage 429s.
//! Hidden capacity (`--capacity`, `capacity.rs`): K requests at once, a bounded FIFO queue,
//! 503s past it, and no rate-limit headers, like an overloaded self-hosted vLLM/TGI.

mod capacity;
mod config;
mod fault;
mod llm;
mod quota;
mod shapes;
mod stats;
mod stream;
mod styles;
mod timefmt;

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::Value;
use tokio::net::TcpListener;

use config::{Settings, USAGE};
use quota::Quota;
use stats::Stats;

pub struct AppState {
    inner: Mutex<Inner>,
    next_id: AtomicU64,
}

/// Everything that changes together, under one lock (held only briefly, never across awaits).
pub struct Inner {
    settings: Settings,
    quota: Quota,
    stats: Stats,
    /// Requests waiting for a slot of `settings.capacity`.
    queue: capacity::Queue,
}

impl AppState {
    fn new(settings: Settings) -> Self {
        let quota = new_quota(&settings);
        AppState {
            inner: Mutex::new(Inner { settings, quota, stats: Stats::default(), queue: capacity::Queue::default() }),
            next_id: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic elsewhere must not take the whole mock down.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed) + 1
    }
}

/// A fresh quota whose windows start now.
fn new_quota(s: &Settings) -> Quota {
    let quota = Quota::new(s.window, Duration::from_millis(s.window_ms), s.quota, s.token_quota, Instant::now());
    match s.request_window_ms {
        0 => quota,
        ms => quota.with_request_window(Duration::from_millis(ms)),
    }
}

#[tokio::main]
async fn main() {
    let mut settings = match Settings::from_args(std::env::args().skip(1)) {
        Ok(Some(s)) => s,
        Ok(None) => {
            println!("{USAGE}");
            return;
        }
        Err(e) => {
            eprintln!("mock-provider: {e}\n{USAGE}");
            std::process::exit(2);
        }
    };
    let listener = match TcpListener::bind((settings.host.as_str(), settings.port)).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("mock-provider: cannot listen on {}:{}: {e}", settings.host, settings.port);
            std::process::exit(1);
        }
    };
    let addr = listener.local_addr().expect("bound socket has an address");
    settings.port = addr.port(); // report the real port in /mock/stats
    let app = router(Arc::new(AppState::new(settings)));

    // Tests read this exact line to find the port.
    println!("listening on {addr}");
    std::io::stdout().flush().expect("stdout");

    if let Err(e) = axum::serve(fault::FaultListener(listener), app).with_graceful_shutdown(shutdown_signal()).await {
        eprintln!("mock-provider: {e}");
        std::process::exit(1);
    }
}

fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(llm::chat_completions))
        .route("/v1/responses", post(llm::responses))
        .route("/v1/messages", post(llm::messages))
        .route("/v1beta/models/{*rest}", post(llm::gemini))
        .route("/mock/stats", get(stats))
        .route("/mock/reset", post(reset))
        .route("/mock/config", post(update_config))
        .fallback(not_found)
        .method_not_allowed_fallback(not_found)
        // Real APIs take multi-megabyte prompts (axum's default is 2 MB).
        .layer(axum::extract::DefaultBodyLimit::max(64 << 20))
        .with_state(state)
}

async fn stats(State(state): State<Arc<AppState>>) -> Json<Value> {
    let inner = state.lock();
    let mut body = inner.stats.to_json();
    body["settings"] = inner.settings.to_json();
    Json(body)
}

/// Zeroes the counters and starts a new quota window now.
async fn reset(State(state): State<Arc<AppState>>) -> Json<Value> {
    let mut inner = state.lock();
    inner.stats.reset();
    inner.quota = new_quota(&inner.settings);
    Json(inner.settings.to_json())
}

/// Changes any subset of the runtime settings; a quota change starts a new window, and
/// a capacity change applies to the next request (more room goes to the waiting at once).
async fn update_config(State(state): State<Arc<AppState>>, body: Bytes) -> Response {
    let patch = match serde_json::from_slice::<Value>(&body) {
        Ok(Value::Object(patch)) => patch,
        _ => return styles::error(StatusCode::BAD_REQUEST, "expected a JSON object of settings"),
    };
    let mut inner = state.lock();
    let next = match inner.settings.patched(&patch) {
        Ok(next) => next,
        Err(e) => return styles::error(StatusCode::BAD_REQUEST, &e),
    };
    if inner.settings.quota_changed(&next) {
        inner.quota = new_quota(&next);
    }
    inner.settings = next;
    capacity::pump(&mut inner);
    Json(inner.settings.to_json()).into_response()
}

async fn not_found(method: Method, uri: Uri) -> Response {
    styles::error(StatusCode::NOT_FOUND, &format!("no route for {method} {}", uri.path()))
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = terminate => {},
    }
}
