//! The proxy-wasm ABI 0.2.1 entry points Envoy calls, in place of the `proxy-wasm` SDK's
//! dispatcher, and the traits our contexts implement (the SDK's names and signatures).
//!
//! Ours because (1) size: the SDK's hashbrown maps, Debug strings and wrappers of every host call
//! cost the `.wasm` ~38 KB; (2) no panics: the SDK panics on a context id it does not know, and a
//! panic kills the worker's VM. Here a callback for an unknown context gets the neutral answer
//! (`Continue`, `true`) and nothing else happens.
//!
//! Contexts live in vector-backed tables: root contexts (one per plugin; the listener filter and
//! the cluster's observer may share a VM) by context id, and each request by its id, created by the
//! root named as its parent. A context is taken out of its slot for the length of its callback, so
//! no borrow is held while our code runs and a reentrant call cannot trip over one.

use super::root::Root;
use super::vm_local::VmLocal;
use std::cell::RefCell;

/// What a stream callback tells the host: go on with the stream, or hold it until
/// `proxy_continue_stream`.
#[repr(u32)]
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Continue = 0,
    Pause = 1,
}

/// The kind of context a root context creates for its streams (TCP stream contexts: none here).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum ContextType {
    HttpContext,
}

/// Callbacks every context gets.
pub trait Context {
    /// The host is done with the context; `true` lets it be deleted now.
    fn on_done(&mut self) -> bool {
        true
    }

    fn on_log(&mut self) {}
}

/// The per-plugin context: configuration, timer, and the factory of request contexts.
pub trait RootContext: Context {
    fn on_vm_start(&mut self, _vm_configuration_size: usize) -> bool {
        true
    }

    fn on_configure(&mut self, _plugin_configuration_size: usize) -> bool {
        true
    }

    fn on_tick(&mut self) {}

    /// The answer to an HTTP call this root made (`num_headers` 0: none came, e.g. a timeout).
    fn on_http_call_response(&mut self, _token_id: u32, _num_headers: usize) {}

    /// The message a gRPC call of this root received, and a call that ended without one.
    fn on_grpc_receive(&mut self, _token_id: u32, _response_size: usize) {}

    fn on_grpc_close(&mut self, _token_id: u32, _status_code: u32) {}

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        None
    }

    fn get_type(&self) -> Option<ContextType> {
        None
    }
}

/// The per-request context.
pub trait HttpContext: Context {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        Action::Continue
    }

    fn on_http_request_body(&mut self, _body_size: usize, _end_of_stream: bool) -> Action {
        Action::Continue
    }

    fn on_http_request_trailers(&mut self, _num_trailers: usize) -> Action {
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        Action::Continue
    }

    fn on_http_response_body(&mut self, _body_size: usize, _end_of_stream: bool) -> Action {
        Action::Continue
    }

    fn on_http_response_trailers(&mut self, _num_trailers: usize) -> Action {
        Action::Continue
    }
}

/// Contexts by id. A context is taken out of its slot for the length of its callback and put
/// back after, so no borrow of the table is held while our code runs: a reentrant callback (the
/// host answering a local reply, or resuming another request, synchronously) finds the slot
/// empty and gets the neutral answer.
struct Table<V> {
    slots: RefCell<Vec<(u32, Option<V>)>>,
}

impl<V> Table<V> {
    const fn new() -> Self {
        Table { slots: RefCell::new(Vec::new()) }
    }

    /// Runs `f` on the slots; `neutral` if they are borrowed (they never are: every borrow ends
    /// within one of these methods, none of which calls out).
    fn slots<R>(&self, neutral: R, f: impl FnOnce(&mut Vec<(u32, Option<V>)>) -> R) -> R {
        match self.slots.try_borrow_mut() {
            Ok(mut s) => f(&mut s),
            Err(_) => neutral,
        }
    }

    /// Adds context `id`, unless it is there already (then it keeps its state).
    fn insert(&self, id: u32, value: V) {
        let unused = self.slots(None, |s| {
            if s.iter().any(|(k, _)| *k == id) {
                return Some(value);
            }
            s.push((id, Some(value)));
            None
        });
        drop(unused); // outside the borrow
    }

    fn take(&self, id: u32) -> Option<V> {
        self.slots(None, |s| s.iter_mut().find(|(k, _)| *k == id)?.1.take())
    }

    /// Puts a taken context back, unless its slot went meanwhile (deleted while it ran).
    fn put(&self, id: u32, value: V) {
        let gone = self.slots(None, |s| match s.iter_mut().find(|(k, _)| *k == id) {
            Some((_, v)) => v.replace(value),
            None => Some(value),
        });
        drop(gone); // outside the borrow
    }

    /// Frees the slot; whether there was one.
    fn remove(&self, id: u32) -> bool {
        let gone = self.slots(None, |s| {
            let i = s.iter().position(|(k, _)| *k == id)?;
            Some(s.swap_remove(i))
        });
        gone.is_some() // dropped outside the borrow
    }
}

static ROOTS: VmLocal<Table<Root>> = VmLocal::new(Table::new());
static HTTP: VmLocal<Table<Box<dyn HttpContext>>> = VmLocal::new(Table::new());

/// Runs `f` on context `id`, taken out of `table` meanwhile; `neutral` if there is no such context.
fn with<V, R>(table: &Table<V>, id: u32, neutral: R, f: impl FnOnce(&mut V) -> R) -> R {
    let Some(mut ctx) = table.take(id) else { return neutral };
    let r = f(&mut ctx);
    table.put(id, ctx);
    r
}

fn with_http(id: u32, f: impl FnOnce(&mut dyn HttpContext) -> Action) -> Action {
    with(&HTTP, id, Action::Continue, |c| f(&mut **c))
}

#[no_mangle]
pub extern "C" fn proxy_abi_version_0_2_1() {}

/// Memory the host fills and hands back (header values, buffers, shared data); `abi` takes it
/// over as a `Vec<u8>` of exactly `size` bytes. Null, not an abort, if it cannot be had.
#[no_mangle]
pub extern "C" fn proxy_on_memory_allocate(size: usize) -> *mut u8 {
    if size == 0 {
        return std::ptr::NonNull::dangling().as_ptr();
    }
    match std::alloc::Layout::array::<u8>(size) {
        Ok(layout) => unsafe { std::alloc::alloc(layout) },
        Err(_) => std::ptr::null_mut(),
    }
}

#[no_mangle]
pub extern "C" fn proxy_on_context_create(context_id: u32, parent_context_id: u32) {
    if parent_context_id == 0 {
        // A root context created twice (the host restarting a plugin) keeps its state.
        ROOTS.insert(context_id, Root::new(context_id));
        return;
    }
    let ctx = with(&ROOTS, parent_context_id, None, |root| match root.get_type() {
        Some(ContextType::HttpContext) => root.create_http_context(context_id),
        _ => None,
    });
    // No context (unknown parent, or a root without a configuration): the request's callbacks
    // all get the neutral answer, so it passes unfiltered.
    if let Some(ctx) = ctx {
        HTTP.insert(context_id, ctx);
    }
}

#[no_mangle]
pub extern "C" fn proxy_on_vm_start(context_id: u32, vm_configuration_size: usize) -> bool {
    with(&ROOTS, context_id, true, |r| r.on_vm_start(vm_configuration_size))
}

#[no_mangle]
pub extern "C" fn proxy_on_configure(context_id: u32, plugin_configuration_size: usize) -> bool {
    with(&ROOTS, context_id, true, |r| r.on_configure(plugin_configuration_size))
}

#[no_mangle]
pub extern "C" fn proxy_on_tick(context_id: u32) {
    with(&ROOTS, context_id, (), |r| r.on_tick())
}

#[no_mangle]
pub extern "C" fn proxy_on_request_headers(context_id: u32, num_headers: usize, end_of_stream: bool) -> Action {
    with_http(context_id, |c| c.on_http_request_headers(num_headers, end_of_stream))
}

#[no_mangle]
pub extern "C" fn proxy_on_request_body(context_id: u32, body_size: usize, end_of_stream: bool) -> Action {
    with_http(context_id, |c| c.on_http_request_body(body_size, end_of_stream))
}

#[no_mangle]
pub extern "C" fn proxy_on_request_trailers(context_id: u32, num_trailers: usize) -> Action {
    with_http(context_id, |c| c.on_http_request_trailers(num_trailers))
}

#[no_mangle]
pub extern "C" fn proxy_on_response_headers(context_id: u32, num_headers: usize, end_of_stream: bool) -> Action {
    with_http(context_id, |c| c.on_http_response_headers(num_headers, end_of_stream))
}

#[no_mangle]
pub extern "C" fn proxy_on_response_body(context_id: u32, body_size: usize, end_of_stream: bool) -> Action {
    with_http(context_id, |c| c.on_http_response_body(body_size, end_of_stream))
}

#[no_mangle]
pub extern "C" fn proxy_on_response_trailers(context_id: u32, num_trailers: usize) -> Action {
    with_http(context_id, |c| c.on_http_response_trailers(num_trailers))
}

#[no_mangle]
pub extern "C" fn proxy_on_done(context_id: u32) -> bool {
    match with(&HTTP, context_id, None, |c| Some(c.on_done())) {
        Some(done) => done,
        None => with(&ROOTS, context_id, true, |r| r.on_done()),
    }
}

#[no_mangle]
pub extern "C" fn proxy_on_log(context_id: u32) {
    let logged = with(&HTTP, context_id, false, |c| {
        c.on_log();
        true
    });
    if !logged {
        with(&ROOTS, context_id, (), |r| r.on_log())
    }
}

#[no_mangle]
pub extern "C" fn proxy_on_delete(context_id: u32) {
    if !HTTP.remove(context_id) {
        ROOTS.remove(context_id);
    }
}

// Callbacks for what the filter never asks for (callouts, queues, foreign functions) or is never
// attached to (TCP streams). The SDK exported them, so they stay; each does nothing.

#[no_mangle]
pub extern "C" fn proxy_on_queue_ready(_context_id: u32, _queue_id: u32) {}

#[no_mangle]
pub extern "C" fn proxy_on_new_connection(_context_id: u32) -> Action {
    Action::Continue
}

#[no_mangle]
pub extern "C" fn proxy_on_downstream_data(_context_id: u32, _data_size: usize, _end_of_stream: bool) -> Action {
    Action::Continue
}

#[no_mangle]
pub extern "C" fn proxy_on_downstream_connection_close(_context_id: u32, _peer_type: u32) {}

#[no_mangle]
pub extern "C" fn proxy_on_upstream_data(_context_id: u32, _data_size: usize, _end_of_stream: bool) -> Action {
    Action::Continue
}

#[no_mangle]
pub extern "C" fn proxy_on_upstream_connection_close(_context_id: u32, _peer_type: u32) {}

#[no_mangle]
pub extern "C" fn proxy_on_http_call_response(
    context_id: u32,
    token_id: u32,
    num_headers: usize,
    _body_size: usize,
    _num_trailers: usize,
) {
    // Only root contexts make calls (from their tick).
    with(&ROOTS, context_id, (), |r| r.on_http_call_response(token_id, num_headers))
}

#[no_mangle]
pub extern "C" fn proxy_on_grpc_receive_initial_metadata(_context_id: u32, _token_id: u32, _headers: u32) {}

/// Only root contexts make gRPC calls (request contexts make them as their root).
#[no_mangle]
pub extern "C" fn proxy_on_grpc_receive(context_id: u32, token_id: u32, response_size: usize) {
    with(&ROOTS, context_id, (), |r| r.on_grpc_receive(token_id, response_size))
}

#[no_mangle]
pub extern "C" fn proxy_on_grpc_receive_trailing_metadata(_context_id: u32, _token_id: u32, _trailers: u32) {}

#[no_mangle]
pub extern "C" fn proxy_on_grpc_close(context_id: u32, token_id: u32, status_code: u32) {
    with(&ROOTS, context_id, (), |r| r.on_grpc_close(token_id, status_code))
}

#[no_mangle]
pub extern "C" fn proxy_on_foreign_function(_context_id: u32, _function_id: u32, _arguments_size: usize) {}
