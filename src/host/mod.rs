//! The thin proxy-wasm layer: it reads headers, the clock and shared data, and hands every
//! decision to the pure core. Only the wasm32-wasip1 build has it.

mod abi;
mod fallback;
mod metrics;
mod request;
mod root;
mod shared;
mod worker;

use proxy_wasm::traits::RootContext;
use proxy_wasm::types::LogLevel;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Trace);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(root::Root::default()) });
}}
