//! llm-ratelimit: a proxy-wasm filter for Envoy that keeps LLM API traffic inside provider quotas.
//!
//! The pure core (every module but `host`) never calls the host and takes time as an argument,
//! so it is unit-tested natively and compiled to wasm32. `host` is the thin proxy-wasm layer: in
//! the wasm32-wasip1 build that Envoy loads, and natively, where tests drive it through a host
//! double; the wasm32-unknown-unknown test build (Node.js, no proxy-wasm imports) leaves it out.

// `f64::clamp`'s panic message would link core's float formatter: 23 KB of the `.wasm`.
#![allow(clippy::manual_clamp)]

pub mod admission;
pub mod alert;
pub mod breaker;
pub mod bucket;
pub mod calendar;
pub mod classify;
pub mod config;
pub mod fallback;
pub mod global;
pub mod hash;
pub mod header_map;
pub mod idmap;
pub mod inflight;
pub mod priority;
pub mod queue;
pub mod quota;
pub mod reply;
pub mod signals;
pub mod store;
pub mod tenants;
pub mod time;
pub mod tokens;
pub mod worker;

#[cfg(any(target_os = "wasi", not(target_arch = "wasm32")))]
pub mod host;
