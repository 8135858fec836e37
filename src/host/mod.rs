//! The thin proxy-wasm layer: it reads headers, the clock and shared data, and hands every
//! decision to the pure core. Only the wasm32-wasip1 build has it. The host calls are in `abi`,
//! the entry points Envoy calls in `dispatch`: no SDK (see `dispatch` for why).

mod abi;
mod dispatch;
mod fallback;
mod global;
mod logger;
mod metrics;
mod request;
mod root;
mod shared;
mod vm_local;
mod worker;

extern "C" {
    fn __wasm_call_ctors();
}

/// What Envoy calls first in a WASI reactor (as the SDK's `main!` defined it): the static
/// constructors, then the logger.
#[no_mangle]
pub extern "C" fn _initialize() {
    unsafe { __wasm_call_ctors() };
    logger::init();
}
