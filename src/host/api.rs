//! Everything the host layer needs from Envoy, as one trait: implemented by the proxy-wasm ABI
//! (`abi`, in the `.wasm`) and by an in-memory double (`double`, native) that records every call
//! and fails any of them on command, so the whole request lifecycle runs under `cargo test`.
//! `calls` says which host this VM has, and names the calls in the filter's words.

use crate::header_map::HeaderMap;

/// A host status code (proxy-wasm `WasmResult`); `Err` of every call below.
pub type Status = u32;
/// The host's `NotFound`.
pub const NOT_FOUND: Status = 1;
/// The host's `BadArgument`: e.g. a context that Envoy already dropped.
pub const BAD_ARGUMENT: Status = 2;

/// What a stream callback tells the host: go on with the stream, or hold it until
/// `proxy_continue_stream`.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Continue = 0,
    Pause = 1,
}

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
    /// Replaces the `len` bytes `buffer` holds (all of it) with `bytes`.
    fn set_buffer(&self, buffer: Buffer, len: usize, bytes: &[u8]) -> Result<(), Status>;
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
