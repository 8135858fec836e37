//! The host of this VM, and the calls the filter makes on it, in the filter's words.

use super::api::{Buffer, Host, Map, Status, Stream};
use crate::header_map::HeaderMap;
use crate::time::Instant;

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

/// The host's clock: the one place it is read, and typed.
pub fn now() -> Result<Instant, Status> {
    host().now_ns().map(Instant::from_nanos)
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

/// Replaces the `len` bytes of request body buffered so far (in a request body callback).
pub fn set_request_body(len: usize, bytes: &[u8]) -> Result<(), Status> {
    host().set_buffer(Buffer::RequestBody, len, bytes)
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
