//! Everything the host layer needs from Envoy, as one trait: implemented by the proxy-wasm ABI
//! (`abi`, in the `.wasm`) and by an in-memory double (`double`, native) that records every call
//! and fails any of them on command, so the whole request lifecycle runs under `cargo test`.
//!
//! Callers use the free functions below; `host()` is the one place that says which host it is.

use crate::header_map::HeaderMap;

/// A host status code (proxy-wasm `WasmResult`); `Err` of every call below.
pub type Status = u32;
/// The host's `NotFound`.
pub const NOT_FOUND: Status = 1;
/// The host's `BadArgument`: e.g. a context that Envoy already dropped.
pub const BAD_ARGUMENT: Status = 2;

/// The kinds of metric the ABI defines.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Metric {
    Counter = 0,
    Gauge = 1,
    Histogram = 2,
}

/// The header maps the filter reads or writes (the ABI's numbers).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Map {
    RequestHeaders = 0,
    ResponseHeaders = 2,
    HttpCallResponseHeaders = 6,
}

/// The buffers the filter reads (the ABI's numbers).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Buffer {
    RequestBody = 0,
    ResponseBody = 1,
    GrpcMessage = 5,
    PluginConfiguration = 7,
}

/// The direction of a stream that `resume` continues.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stream {
    Request = 0,
    Response = 1,
}

/// The proxy-wasm host, as the filter uses it. Calls on a request act on the current (effective)
/// context; every one may fail, and a failure is an `Err`, never a panic.
pub trait Host {
    /// Value and CAS token of a shared-data key; `(None, 0)` when it does not exist.
    fn get_shared(&self, key: &str) -> Result<(Option<Vec<u8>>, u32), Status>;
    /// Writes `value` if the key is still at `cas` (0: unconditionally).
    fn set_shared(&self, key: &str, value: &[u8], cas: u32) -> Result<(), Status>;
    /// Envoy's log at proxy-wasm `level` (trace 0 … critical 5).
    fn log(&self, level: u32, message: &str) -> Result<(), Status>;
    fn define_metric(&self, kind: Metric, name: &str) -> Result<u32, Status>;
    fn increment_metric(&self, id: u32, by: i64) -> Result<(), Status>;
    fn record_metric(&self, id: u32, value: u64) -> Result<(), Status>;
    /// Makes the following calls act on request `id`; fails if Envoy dropped it.
    fn set_effective_context(&self, id: u32) -> Result<(), Status>;
    /// Continues the current request's paused `stream`.
    fn resume(&self, stream: Stream) -> Result<(), Status>;
    /// Answers the current request locally; `headers` in the ABI's encoding.
    fn send_response(&self, status: u32, headers: &[u8], body: &[u8]) -> Result<(), Status>;
    fn header(&self, map: Map, name: &str) -> Result<Option<String>, Status>;
    fn headers(&self, map: Map) -> Result<HeaderMap, Status>;
    fn set_header(&self, map: Map, name: &str, value: &str) -> Result<(), Status>;
    fn remove_header(&self, map: Map, name: &str) -> Result<(), Status>;
    /// At most `max` bytes of `buffer` from its start.
    fn buffer(&self, buffer: Buffer, max: usize) -> Result<Vec<u8>, Status>;
    fn now_ns(&self) -> Result<u64, Status>;
    /// Eight random bytes, or `None` if the host has none to give.
    fn random_u64(&self) -> Option<u64>;
    fn set_tick_period_ms(&self, ms: u32) -> Result<(), Status>;
    /// An HTTP call to Envoy cluster `cluster`; its answer comes to the calling root context.
    fn http_call(&self, cluster: &str, headers: &[u8], body: &[u8], timeout_ms: u32) -> Result<u32, Status>;
    /// A unary gRPC call; `service` is an encoded `envoy.config.core.v3.GrpcService`.
    fn grpc_call(
        &self,
        service: &[u8],
        name: &str,
        method: &str,
        message: &[u8],
        timeout_ms: u32,
    ) -> Result<u32, Status>;
}

/// The host of this VM: the ABI in the `.wasm` (a constant, so calls are direct).
#[cfg(target_arch = "wasm32")]
pub fn host() -> &'static dyn Host {
    &super::abi::Abi
}

#[cfg(not(target_arch = "wasm32"))]
std::thread_local! {
    /// Natively each thread is one VM (as each Envoy worker is): its host, once installed.
    static HOST: std::cell::Cell<Option<&'static dyn Host>> = const { std::cell::Cell::new(None) };
}

/// The host of this VM: the one `install`ed on this thread (a host that fails every call if none).
#[cfg(not(target_arch = "wasm32"))]
pub fn host() -> &'static dyn Host {
    HOST.with(|h| h.get()).unwrap_or(&super::double::NONE)
}

/// Makes `host` this thread's (this simulated VM's) host.
#[cfg(not(target_arch = "wasm32"))]
pub fn install(host: &'static dyn Host) {
    HOST.with(|h| h.set(Some(host)));
}

// What the filter calls, in its own words.

pub fn now_ns() -> Result<u64, Status> {
    host().now_ns()
}

pub fn request_header(name: &str) -> Result<Option<String>, Status> {
    host().header(Map::RequestHeaders, name)
}

pub fn response_header(name: &str) -> Result<Option<String>, Status> {
    host().header(Map::ResponseHeaders, name)
}

pub fn response_headers() -> Result<HeaderMap, Status> {
    host().headers(Map::ResponseHeaders)
}

pub fn set_request_header(name: &str, value: &str) -> Result<(), Status> {
    host().set_header(Map::RequestHeaders, name, value)
}

pub fn remove_request_header(name: &str) -> Result<(), Status> {
    host().remove_header(Map::RequestHeaders, name)
}

pub fn set_response_header(name: &str, value: &str) -> Result<(), Status> {
    host().set_header(Map::ResponseHeaders, name, value)
}

pub fn request_body(max: usize) -> Result<Vec<u8>, Status> {
    host().buffer(Buffer::RequestBody, max)
}

pub fn response_body(max: usize) -> Result<Vec<u8>, Status> {
    host().buffer(Buffer::ResponseBody, max)
}

pub fn set_effective_context(id: u32) -> Result<(), Status> {
    host().set_effective_context(id)
}

/// Continues paused request `id` (its headers, body and trailers go upstream).
pub fn resume_request(id: u32) -> Result<(), Status> {
    host().set_effective_context(id)?;
    host().resume(Stream::Request)
}

/// Continues the held response of request `id`.
pub fn resume_response(id: u32) -> Result<(), Status> {
    host().set_effective_context(id)?;
    host().resume(Stream::Response)
}

/// Answers the current request locally with `status`, `headers` and `body`.
pub fn send_response(status: u32, headers: &[(&str, &str)], body: &[u8]) -> Result<(), Status> {
    host().send_response(status, &crate::header_map::serialize(headers), body)
}

/// `send_response` with headers already in the ABI's encoding.
pub fn send_serialized(status: u32, headers: &[u8], body: &[u8]) -> Result<(), Status> {
    host().send_response(status, headers, body)
}
