//! The proxy-wasm ABI 0.2.1 as the `Host`: each call returns `Err(status)` for any status it does
//! not expect.
//!
//! The SDK's `hostcalls` wrappers `panic!` on statuses they do not foresee, and a panic kills the
//! worker's VM. These declare the same proxy-wasm ABI imports with a plain `u32` status instead.
#![allow(clashing_extern_declarations)]

use super::api::{Buffer, Host, Map, Metric, Status, Stream, NOT_FOUND};
use crate::header_map::{serialize, HeaderMap};
use std::ptr::{null, null_mut};

const OK: Status = 0;

#[link(wasm_import_module = "env")]
extern "C" {
    fn proxy_get_shared_data(k: *const u8, ks: usize, v: *mut *mut u8, vs: *mut usize, cas: *mut u32) -> Status;
    fn proxy_set_shared_data(k: *const u8, ks: usize, v: *const u8, vs: usize, cas: u32) -> Status;
    fn proxy_define_metric(t: Metric, n: *const u8, ns: usize, id: *mut u32) -> Status;
    fn proxy_increment_metric(id: u32, offset: i64) -> Status;
    fn proxy_record_metric(id: u32, value: u64) -> Status;
    fn proxy_set_effective_context(id: u32) -> Status;
    fn proxy_continue_stream(stream: Stream) -> Status;
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
    fn proxy_get_header_map_pairs(m: Map, v: *mut *mut u8, vs: *mut usize) -> Status;
    fn proxy_get_header_map_value(m: Map, k: *const u8, ks: usize, v: *mut *mut u8, vs: *mut usize) -> Status;
    fn proxy_replace_header_map_value(m: Map, k: *const u8, ks: usize, v: *const u8, vs: usize) -> Status;
    fn proxy_remove_header_map_value(m: Map, k: *const u8, ks: usize) -> Status;
    fn proxy_get_current_time_nanoseconds(t: *mut u64) -> Status;
    fn proxy_set_tick_period_milliseconds(ms: u32) -> Status;
    fn proxy_get_buffer_bytes(b: Buffer, start: usize, max: usize, v: *mut *mut u8, vs: *mut usize) -> Status;
    fn proxy_set_buffer_bytes(b: Buffer, start: usize, size: usize, v: *const u8, vs: usize) -> Status;
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

/// Envoy, through the ABI's imports.
pub struct Abi;

impl Host for Abi {
    fn get_shared(&self, key: &str) -> Result<(Option<Vec<u8>>, u32), Status> {
        let (mut ptr, mut size, mut cas) = (null_mut(), 0usize, 0u32);
        match unsafe { proxy_get_shared_data(key.as_ptr(), key.len(), &mut ptr, &mut size, &mut cas) } {
            OK => Ok((Some(unsafe { owned(ptr, size) }), cas)),
            NOT_FOUND => Ok((None, 0)),
            s => Err(s),
        }
    }

    fn set_shared(&self, key: &str, value: &[u8], cas: u32) -> Result<(), Status> {
        check(unsafe { proxy_set_shared_data(key.as_ptr(), key.len(), value.as_ptr(), value.len(), cas) })
    }

    fn log(&self, level: u32, message: &str) -> Result<(), Status> {
        check(unsafe { proxy_log(level, message.as_ptr(), message.len()) })
    }

    fn define_metric(&self, kind: Metric, name: &str) -> Result<u32, Status> {
        let mut id = 0;
        check(unsafe { proxy_define_metric(kind, name.as_ptr(), name.len(), &mut id) }).map(|_| id)
    }

    fn increment_metric(&self, id: u32, by: i64) -> Result<(), Status> {
        check(unsafe { proxy_increment_metric(id, by) })
    }

    fn record_metric(&self, id: u32, value: u64) -> Result<(), Status> {
        check(unsafe { proxy_record_metric(id, value) })
    }

    fn set_effective_context(&self, id: u32) -> Result<(), Status> {
        check(unsafe { proxy_set_effective_context(id) })
    }

    fn resume(&self, stream: Stream) -> Result<(), Status> {
        check(unsafe { proxy_continue_stream(stream) })
    }

    fn send_response(&self, status: u32, headers: &[u8], body: &[u8]) -> Result<(), Status> {
        check(unsafe {
            proxy_send_local_response(status, null(), 0, body.as_ptr(), body.len(), headers.as_ptr(), headers.len(), -1)
        })
    }

    fn header(&self, map: Map, name: &str) -> Result<Option<String>, Status> {
        let (mut ptr, mut size) = (null_mut(), 0usize);
        match unsafe { proxy_get_header_map_value(map, name.as_ptr(), name.len(), &mut ptr, &mut size) } {
            OK => Ok(Some(String::from_utf8_lossy(&unsafe { owned(ptr, size) }).into_owned())),
            NOT_FOUND => Ok(None),
            s => Err(s),
        }
    }

    fn headers(&self, map: Map) -> Result<HeaderMap, Status> {
        let (mut ptr, mut size) = (null_mut(), 0usize);
        check(unsafe { proxy_get_header_map_pairs(map, &mut ptr, &mut size) })?;
        Ok(HeaderMap::read(unsafe { owned(ptr, size) }))
    }

    fn set_header(&self, map: Map, name: &str, value: &str) -> Result<(), Status> {
        check(unsafe { proxy_replace_header_map_value(map, name.as_ptr(), name.len(), value.as_ptr(), value.len()) })
    }

    fn remove_header(&self, map: Map, name: &str) -> Result<(), Status> {
        check(unsafe { proxy_remove_header_map_value(map, name.as_ptr(), name.len()) })
    }

    fn buffer(&self, buffer: Buffer, max: usize) -> Result<Vec<u8>, Status> {
        let (mut ptr, mut size) = (null_mut(), 0usize);
        match unsafe { proxy_get_buffer_bytes(buffer, 0, max, &mut ptr, &mut size) } {
            OK => Ok(unsafe { owned(ptr, size) }),
            NOT_FOUND => Ok(Vec::new()),
            s => Err(s),
        }
    }

    fn set_buffer(&self, buffer: Buffer, len: usize, bytes: &[u8]) -> Result<(), Status> {
        // From 0 over the whole buffer: Envoy drains it and puts `bytes` in its place.
        check(unsafe { proxy_set_buffer_bytes(buffer, 0, len, bytes.as_ptr(), bytes.len()) })
    }

    fn now_ns(&self) -> Result<u64, Status> {
        let mut t = 0;
        check(unsafe { proxy_get_current_time_nanoseconds(&mut t) }).map(|_| t)
    }

    fn random_u64(&self) -> Option<u64> {
        let mut b = [0u8; 8];
        (unsafe { random_get(b.as_mut_ptr(), b.len()) } == 0).then(|| u64::from_le_bytes(b))
    }

    fn set_tick_period_ms(&self, ms: u32) -> Result<(), Status> {
        check(unsafe { proxy_set_tick_period_milliseconds(ms) })
    }

    fn http_call(&self, cluster: &str, headers: &[u8], body: &[u8], timeout_ms: u32) -> Result<u32, Status> {
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

    fn grpc_call(
        &self,
        service: &[u8],
        name: &str,
        method: &str,
        message: &[u8],
        timeout_ms: u32,
    ) -> Result<u32, Status> {
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
}
