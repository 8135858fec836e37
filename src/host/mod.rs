//! The thin proxy-wasm layer: it reads headers, the clock and shared data, and hands every
//! decision to the pure core. Every host call goes through `api::Host`: the ABI in the `.wasm`
//! (`abi`), an in-memory double natively (`double`); `calls` picks this VM's and names the calls.
//! Tests drive the whole lifecycle as Envoy would, through `dispatch`'s entry points. No SDK
//! (see `dispatch` for why).
//!
//! By owner: `dispatch` (entry points, context tables, event delivery), `root` (configuration,
//! timer), `request` (one request's phase machine), `worker` (what a worker's requests share),
//! and the parts it owns: `holds`, `gauges`, `alerts`, `replies`, `global`; `metrics` defines the
//! stats, `shared` is shared data as the core's `Store`, `fallback` the cache's host side.

#[cfg(target_arch = "wasm32")]
mod abi;
mod alerts;
pub mod api;
pub mod calls;
pub mod dispatch;
#[cfg(not(target_arch = "wasm32"))]
pub mod double;
pub mod event;
mod failover;
mod fallback;
mod gauges;
mod global;
mod holds;
mod logger;
mod metrics;
mod replies;
pub mod request;
mod reservation;
mod root;
mod shared;
mod vm_local;
mod worker;

#[cfg(target_arch = "wasm32")]
extern "C" {
    fn __wasm_call_ctors();
}

/// What Envoy calls first in a WASI reactor (as the SDK's `main!` defined it): the static
/// constructors, then the logger.
#[cfg(target_arch = "wasm32")]
#[no_mangle]
pub extern "C" fn _initialize() {
    unsafe { __wasm_call_ctors() };
    logger::init();
}

/// Natively: the logger (to the installed host), once per process.
#[cfg(not(target_arch = "wasm32"))]
pub fn init_logger() {
    logger::init();
}
