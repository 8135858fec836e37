//! The host calls the filter makes, each returning `Err(status)` for any status it does not
//! expect.
//!
//! The SDK's `hostcalls` wrappers `panic!` on statuses they do not foresee, and a panic kills the
//! worker's VM. These declare the same proxy-wasm ABI imports with a plain `u32` status instead.
#![allow(clashing_extern_declarations)]

use crate::header_map::{serialize, HeaderMap};
use std::ptr::{null, null_mut};

pub type Status = u32;
const OK: Status = 0;
const NOT_FOUND: Status = 1;

const REQUEST_HEADERS: u32 = 0;
const RESPONSE_HEADERS: u32 = 2;
const HTTP_CALL_RESPONSE_HEADERS: u32 = 6;
const REQUEST_BODY: u32 = 0;
const RESPONSE_BODY: u32 = 1;
const GRPC_RECEIVE: u32 = 5;
const PLUGIN_CONFIGURATION: u32 = 7;
const STREAM_HTTP_REQUEST: u32 = 0;
const STREAM_HTTP_RESPONSE: u32 = 1;

#[repr(u32)]
#[derive(Clone, Copy)]
pub enum Metric {
    Counter = 0,
    Gauge = 1,
    Histogram = 2,
}

#[link(wasm_import_module = "env")]
extern "C" {
    fn proxy_get_shared_data(k: *const u8, ks: usize, v: *mut *mut u8, vs: *mut usize, cas: *mut u32) -> Status;
    fn proxy_set_shared_data(k: *const u8, ks: usize, v: *const u8, vs: usize, cas: u32) -> Status;
    fn proxy_define_metric(t: Metric, n: *const u8, ns: usize, id: *mut u32) -> Status;
    fn proxy_increment_metric(id: u32, offset: i64) -> Status;
    fn proxy_record_metric(id: u32, value: u64) -> Status;
    fn proxy_set_effective_context(id: u32) -> Status;
    fn proxy_continue_stream(stream: u32) -> Status;
    fn proxy_send_local_response(
        status: u32,
        details: *const u8,
        details_size: usize,
        body: *const u8,
        body_size: usize,
        headers: *const u8,
        headers_size: usize,
        grpc_status: i32,
    ) -> Status;
    fn proxy_get_header_map_pairs(m: u32, v: *mut *mut u8, vs: *mut usize) -> Status;
    fn proxy_get_header_map_value(m: u32, k: *const u8, ks: usize, v: *mut *mut u8, vs: *mut usize) -> Status;
    fn proxy_replace_header_map_value(m: u32, k: *const u8, ks: usize, v: *const u8, vs: usize) -> Status;
    fn proxy_remove_header_map_value(m: u32, k: *const u8, ks: usize) -> Status;
    fn proxy_get_current_time_nanoseconds(t: *mut u64) -> Status;
    fn proxy_set_tick_period_milliseconds(ms: u32) -> Status;
    fn proxy_get_buffer_bytes(b: u32, start: usize, max: usize, v: *mut *mut u8, vs: *mut usize) -> Status;
    fn proxy_log(level: u32, m: *const u8, ms: usize) -> Status;
    fn proxy_http_call(
        upstream: *const u8,
        upstream_size: usize,
        headers: *const u8,
        headers_size: usize,
        body: *const u8,
        body_size: usize,
        trailers: *const u8,
        trailers_size: usize,
        timeout_ms: u32,
        token: *mut u32,
    ) -> Status;
    fn proxy_grpc_call(
        service: *const u8,
        service_size: usize,
        service_name: *const u8,
        service_name_size: usize,
        method: *const u8,
        method_size: usize,
        metadata: *const u8,
        metadata_size: usize,
        message: *const u8,
        message_size: usize,
        timeout_ms: u32,
        token: *mut u32,
    ) -> Status;
}

#[link(wasm_import_module = "wasi_snapshot_preview1")]
extern "C" {
    fn random_get(buf: *mut u8, len: usize) -> u16;
}

/// Eight random bytes from the host (WASI), or `None` if it has none to give.
pub fn random_u64() -> Option<u64> {
    let mut b = [0u8; 8];
    (unsafe { random_get(b.as_mut_ptr(), b.len()) } == 0).then(|| u64::from_le_bytes(b))
}

fn check(status: Status) -> Result<(), Status> {
    if status == OK {
        Ok(())
    } else {
        Err(status)
    }
}

/// Takes ownership of a buffer the host allocated through `proxy_on_memory_allocate`.
unsafe fn owned(ptr: *mut u8, size: usize) -> Vec<u8> {
    if ptr.is_null() {
        Vec::new()
    } else {
        Vec::from_raw_parts(ptr, size, size)
    }
}

/// Value and CAS token of a shared-data key; `(None, 0)` when the key does not exist.
pub fn get_shared(key: &str) -> Result<(Option<Vec<u8>>, u32), Status> {
    let (mut ptr, mut size, mut cas) = (null_mut(), 0usize, 0u32);
    match unsafe { proxy_get_shared_data(key.as_ptr(), key.len(), &mut ptr, &mut size, &mut cas) } {
        OK => Ok((Some(unsafe { owned(ptr, size) }), cas)),
        NOT_FOUND => Ok((None, 0)),
        s => Err(s),
    }
}

/// Writes `value` if the key is still at `cas` (0 = unconditionally); `Err(CAS_MISMATCH)` if not.
pub fn set_shared(key: &str, value: &[u8], cas: u32) -> Result<(), Status> {
    check(unsafe { proxy_set_shared_data(key.as_ptr(), key.len(), value.as_ptr(), value.len(), cas) })
}

/// Writes `message` to Envoy's log at proxy-wasm `level` (trace 0 … critical 5).
pub fn log(level: u32, message: &str) -> Result<(), Status> {
    check(unsafe { proxy_log(level, message.as_ptr(), message.len()) })
}

pub fn define_metric(kind: Metric, name: &str) -> Result<u32, Status> {
    let mut id = 0;
    check(unsafe { proxy_define_metric(kind, name.as_ptr(), name.len(), &mut id) }).map(|_| id)
}

pub fn increment_metric(id: u32, by: i64) -> Result<(), Status> {
    check(unsafe { proxy_increment_metric(id, by) })
}

pub fn record_metric(id: u32, value: u64) -> Result<(), Status> {
    check(unsafe { proxy_record_metric(id, value) })
}

/// Makes the following host calls act on request `context_id`; fails if Envoy dropped it.
pub fn set_effective_context(context_id: u32) -> Result<(), Status> {
    check(unsafe { proxy_set_effective_context(context_id) })
}

/// Continues a paused request that belongs to this worker. Fails (and does nothing) if Envoy has
/// already dropped the context.
pub fn resume_request(context_id: u32) -> Result<(), Status> {
    set_effective_context(context_id)?;
    check(unsafe { proxy_continue_stream(STREAM_HTTP_REQUEST) })
}

/// Continues a response this worker paused (its headers held while the body was read).
pub fn resume_response(context_id: u32) -> Result<(), Status> {
    set_effective_context(context_id)?;
    check(unsafe { proxy_continue_stream(STREAM_HTTP_RESPONSE) })
}

/// Answers the current request locally with `status`, `headers` and `body`.
pub fn send_response(status: u32, headers: &[(&str, &str)], body: &[u8]) -> Result<(), Status> {
    send_serialized(status, &serialize(headers), body)
}

/// `send_response` with headers already in the ABI's encoding (`header_map::serialize`).
pub fn send_serialized(status: u32, headers: &[u8], body: &[u8]) -> Result<(), Status> {
    check(unsafe {
        proxy_send_local_response(status, null(), 0, body.as_ptr(), body.len(), headers.as_ptr(), headers.len(), -1)
    })
}

pub fn request_header(name: &str) -> Result<Option<String>, Status> {
    header(REQUEST_HEADERS, name)
}

pub fn response_header(name: &str) -> Result<Option<String>, Status> {
    header(RESPONSE_HEADERS, name)
}

/// A header of the answer to an HTTP call (in `on_http_call_response`).
pub fn http_call_response_header(name: &str) -> Result<Option<String>, Status> {
    header(HTTP_CALL_RESPONSE_HEADERS, name)
}

/// Sends an HTTP request to Envoy cluster `cluster`; the answer comes to the root context's
/// `on_http_call_response` with the returned token.
pub fn http_call(cluster: &str, headers: &[(&str, &str)], body: &[u8], timeout_ms: u32) -> Result<u32, Status> {
    let headers = serialize(headers);
    let trailers = serialize(&[]);
    let mut token = 0u32;
    check(unsafe {
        proxy_http_call(
            cluster.as_ptr(),
            cluster.len(),
            headers.as_ptr(),
            headers.len(),
            body.as_ptr(),
            body.len(),
            trailers.as_ptr(),
            trailers.len(),
            timeout_ms,
            &mut token,
        )
    })?;
    Ok(token)
}

/// Sends a unary gRPC call; `service` is an encoded `envoy.config.core.v3.GrpcService`. The
/// answer comes to the calling context's `on_grpc_receive` (or `on_grpc_close` on failure).
pub fn grpc_call(service: &[u8], name: &str, method: &str, message: &[u8], timeout_ms: u32) -> Result<u32, Status> {
    let metadata = serialize(&[]);
    let mut token = 0u32;
    check(unsafe {
        proxy_grpc_call(
            service.as_ptr(),
            service.len(),
            name.as_ptr(),
            name.len(),
            method.as_ptr(),
            method.len(),
            metadata.as_ptr(),
            metadata.len(),
            message.as_ptr(),
            message.len(),
            timeout_ms,
            &mut token,
        )
    })?;
    Ok(token)
}

/// The message a gRPC call received (in `on_grpc_receive`).
pub fn grpc_message(size: usize) -> Result<Vec<u8>, Status> {
    buffer(GRPC_RECEIVE, size)
}

fn header(map: u32, name: &str) -> Result<Option<String>, Status> {
    let (mut ptr, mut size) = (null_mut(), 0usize);
    match unsafe { proxy_get_header_map_value(map, name.as_ptr(), name.len(), &mut ptr, &mut size) } {
        OK => Ok(Some(String::from_utf8_lossy(&unsafe { owned(ptr, size) }).into_owned())),
        NOT_FOUND => Ok(None),
        s => Err(s),
    }
}

pub fn set_request_header(name: &str, value: &str) -> Result<(), Status> {
    check(unsafe {
        proxy_replace_header_map_value(REQUEST_HEADERS, name.as_ptr(), name.len(), value.as_ptr(), value.len())
    })
}

pub fn remove_request_header(name: &str) -> Result<(), Status> {
    check(unsafe { proxy_remove_header_map_value(REQUEST_HEADERS, name.as_ptr(), name.len()) })
}

pub fn set_response_header(name: &str, value: &str) -> Result<(), Status> {
    check(unsafe {
        proxy_replace_header_map_value(RESPONSE_HEADERS, name.as_ptr(), name.len(), value.as_ptr(), value.len())
    })
}

pub fn now_ns() -> Result<u64, Status> {
    let mut t = 0;
    check(unsafe { proxy_get_current_time_nanoseconds(&mut t) }).map(|_| t)
}

pub fn set_tick_period_ms(ms: u32) -> Result<(), Status> {
    check(unsafe { proxy_set_tick_period_milliseconds(ms) })
}

pub fn plugin_configuration() -> Result<Vec<u8>, Status> {
    buffer(PLUGIN_CONFIGURATION, usize::MAX)
}

/// The buffered request body, at most `max` bytes.
pub fn request_body(max: usize) -> Result<Vec<u8>, Status> {
    buffer(REQUEST_BODY, max)
}

/// The buffered response body, at most `max` bytes.
pub fn response_body(max: usize) -> Result<Vec<u8>, Status> {
    buffer(RESPONSE_BODY, max)
}

fn buffer(kind: u32, max: usize) -> Result<Vec<u8>, Status> {
    let (mut ptr, mut size) = (null_mut(), 0usize);
    match unsafe { proxy_get_buffer_bytes(kind, 0, max, &mut ptr, &mut size) } {
        OK => Ok(unsafe { owned(ptr, size) }),
        NOT_FOUND => Ok(Vec::new()),
        s => Err(s),
    }
}

/// Every response header.
pub fn response_headers() -> Result<HeaderMap, Status> {
    let (mut ptr, mut size) = (null_mut(), 0usize);
    check(unsafe { proxy_get_header_map_pairs(RESPONSE_HEADERS, &mut ptr, &mut size) })?;
    Ok(HeaderMap::read(unsafe { owned(ptr, size) }))
}
