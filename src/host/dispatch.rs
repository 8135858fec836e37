//! The proxy-wasm ABI 0.2.1 entry points Envoy calls, in place of the `proxy-wasm` SDK's
//! dispatcher. In the `.wasm` they are the module's exports; natively, tests call them as Envoy
//! would, against the host double.
//!
//! Ours because (1) size: the SDK's hashbrown maps, Debug strings and wrappers of every host call
//! cost the `.wasm` ~38 KB; (2) no panics: the SDK panics on a context id it does not know, and a
//! panic kills the worker's VM. Here a callback for an unknown context gets the neutral answer
//! (`Continue`, `true`) and nothing else happens.
//!
//! Contexts live in vector-backed tables: root contexts (one per plugin; the listener filter and
//! the cluster's observer may share a VM) by context id, and each request by its id, created by the
//! root named as its parent. A context is taken out of its slot for the length of its callback, so
//! no borrow is held while our code runs and a reentrant call cannot trip over one. After every
//! callback, the events it posted for other requests are delivered (`event`).

pub use super::api::Action;
use super::calls;
use super::event::{self, Event};
use super::request::Request;
use super::root::Root;
use super::vm_local::{vm_local, Key};
use std::cell::{Cell, RefCell};

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

vm_local! {
    static ROOTS: Table<Root> = Table::new();
}
vm_local! {
    static REQUESTS: Table<Request> = Table::new();
}
vm_local! {
    /// Events are being delivered: a callback reentered meanwhile leaves them to that loop.
    static DELIVERING: Cell<bool> = Cell::new(false);
}

/// Runs `f` on context `id`, taken out of `table` meanwhile; `neutral` if there is no such context.
fn with<V, R>(table: &'static Key<Table<V>>, id: u32, neutral: R, f: impl FnOnce(&mut V) -> R) -> R {
    table.with(|t| {
        let Some(mut ctx) = t.take(id) else { return neutral };
        let r = f(&mut ctx);
        t.put(id, ctx);
        r
    })
}

/// Runs `f` on request `id`, then delivers what it posted.
fn with_request(id: u32, neutral: Action, f: impl FnOnce(&mut Request) -> Action) -> Action {
    let action = with(&REQUESTS, id, neutral, f);
    deliver();
    action
}

/// Runs `f` on root `id`, then delivers what it posted.
fn with_root<R>(id: u32, neutral: R, f: impl FnOnce(&mut Root) -> R) -> R {
    let r = with(&ROOTS, id, neutral, f);
    deliver();
    r
}

/// Delivers posted events to their requests, each as its own effective context; a request that
/// is gone is skipped. Events that a delivery posts are delivered in the same loop.
fn deliver() {
    if DELIVERING.with(|d| d.replace(true)) {
        return;
    }
    for _ in 0..64 {
        let posted = event::take();
        if posted.is_empty() {
            break;
        }
        for (id, e) in posted {
            if calls::set_effective_context(id).is_ok() {
                with(&REQUESTS, id, (), |r: &mut Request| r.on_event(e));
            }
        }
    }
    DELIVERING.with(|d| d.set(false));
}

/// Delivers `e` to request `id` now (tests; Envoy's callbacks deliver through `deliver`).
pub fn post(id: u32, e: Event) {
    event::post(id, e);
    deliver();
}

#[cfg_attr(target_arch = "wasm32", no_mangle)]
pub extern "C" fn proxy_abi_version_0_2_1() {}

/// Memory the host fills and hands back (header values, buffers, shared data); `abi` takes it
/// over as a `Vec<u8>` of exactly `size` bytes. Null, not an abort, if it cannot be had.
#[cfg(target_arch = "wasm32")]
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

#[cfg_attr(target_arch = "wasm32", no_mangle)]
pub extern "C" fn proxy_on_context_create(context_id: u32, parent_context_id: u32) {
    if parent_context_id == 0 {
        // A root context created twice (the host restarting a plugin) keeps its state.
        ROOTS.with(|t| t.insert(context_id, Root::new(context_id)));
        return;
    }
    // No request context (unknown parent, or a root without a configuration): the request's
    // callbacks all get the neutral answer, so it passes unfiltered.
    if let Some(r) = with(&ROOTS, parent_context_id, None, |root| root.create_request(context_id)) {
        REQUESTS.with(|t| t.insert(context_id, r));
    }
}

#[cfg_attr(target_arch = "wasm32", no_mangle)]
pub extern "C" fn proxy_on_vm_start(_context_id: u32, _vm_configuration_size: usize) -> bool {
    true
}

#[cfg_attr(target_arch = "wasm32", no_mangle)]
pub extern "C" fn proxy_on_configure(context_id: u32, _plugin_configuration_size: usize) -> bool {
    with_root(context_id, true, |r| r.on_configure())
}

#[cfg_attr(target_arch = "wasm32", no_mangle)]
pub extern "C" fn proxy_on_tick(context_id: u32) {
    with_root(context_id, (), |r| r.on_tick())
}

#[cfg_attr(target_arch = "wasm32", no_mangle)]
pub extern "C" fn proxy_on_request_headers(context_id: u32, _num_headers: usize, end_of_stream: bool) -> Action {
    with_request(context_id, Action::Continue, |r| r.on_request_headers(end_of_stream))
}

#[cfg_attr(target_arch = "wasm32", no_mangle)]
pub extern "C" fn proxy_on_request_body(context_id: u32, body_size: usize, end_of_stream: bool) -> Action {
    with_request(context_id, Action::Continue, |r| r.on_request_body(body_size, end_of_stream))
}

#[cfg_attr(target_arch = "wasm32", no_mangle)]
pub extern "C" fn proxy_on_request_trailers(context_id: u32, _num_trailers: usize) -> Action {
    with_request(context_id, Action::Continue, |r| r.on_request_trailers())
}

#[cfg_attr(target_arch = "wasm32", no_mangle)]
pub extern "C" fn proxy_on_response_headers(context_id: u32, _num_headers: usize, end_of_stream: bool) -> Action {
    with_request(context_id, Action::Continue, |r| r.on_response_headers(end_of_stream))
}

#[cfg_attr(target_arch = "wasm32", no_mangle)]
pub extern "C" fn proxy_on_response_body(context_id: u32, body_size: usize, end_of_stream: bool) -> Action {
    with_request(context_id, Action::Continue, |r| r.on_response_body(body_size, end_of_stream))
}

#[cfg_attr(target_arch = "wasm32", no_mangle)]
pub extern "C" fn proxy_on_response_trailers(context_id: u32, _num_trailers: usize) -> Action {
    with_request(context_id, Action::Continue, |r| r.on_response_trailers())
}

/// The request is over (answered, or its client gone); a root context: the plugin is going.
#[cfg_attr(target_arch = "wasm32", no_mangle)]
pub extern "C" fn proxy_on_done(context_id: u32) -> bool {
    let was_request = with(&REQUESTS, context_id, false, |r| {
        r.on_done();
        true
    });
    deliver();
    was_request || with_root(context_id, true, |_| true)
}

#[cfg_attr(target_arch = "wasm32", no_mangle)]
pub extern "C" fn proxy_on_log(_context_id: u32) {}

#[cfg_attr(target_arch = "wasm32", no_mangle)]
pub extern "C" fn proxy_on_delete(context_id: u32) {
    if !REQUESTS.with(|t| t.remove(context_id)) {
        ROOTS.with(|t| t.remove(context_id));
    }
}

// Callbacks for what the filter never asks for (queues, foreign functions) or is never attached
// to (TCP streams). The SDK exported them, so they stay; each does nothing.

#[cfg_attr(target_arch = "wasm32", no_mangle)]
pub extern "C" fn proxy_on_queue_ready(_context_id: u32, _queue_id: u32) {}

#[cfg_attr(target_arch = "wasm32", no_mangle)]
pub extern "C" fn proxy_on_new_connection(_context_id: u32) -> Action {
    Action::Continue
}

#[cfg_attr(target_arch = "wasm32", no_mangle)]
pub extern "C" fn proxy_on_downstream_data(_context_id: u32, _data_size: usize, _end_of_stream: bool) -> Action {
    Action::Continue
}

#[cfg_attr(target_arch = "wasm32", no_mangle)]
pub extern "C" fn proxy_on_downstream_connection_close(_context_id: u32, _peer_type: u32) {}

#[cfg_attr(target_arch = "wasm32", no_mangle)]
pub extern "C" fn proxy_on_upstream_data(_context_id: u32, _data_size: usize, _end_of_stream: bool) -> Action {
    Action::Continue
}

#[cfg_attr(target_arch = "wasm32", no_mangle)]
pub extern "C" fn proxy_on_upstream_connection_close(_context_id: u32, _peer_type: u32) {}

/// Only root contexts make calls (from their tick, or for a request as their root).
#[cfg_attr(target_arch = "wasm32", no_mangle)]
pub extern "C" fn proxy_on_http_call_response(
    context_id: u32,
    token_id: u32,
    num_headers: usize,
    _body_size: usize,
    _num_trailers: usize,
) {
    with_root(context_id, (), |r| r.on_http_call_response(token_id, num_headers))
}

#[cfg_attr(target_arch = "wasm32", no_mangle)]
pub extern "C" fn proxy_on_grpc_receive_initial_metadata(_context_id: u32, _token_id: u32, _headers: u32) {}

#[cfg_attr(target_arch = "wasm32", no_mangle)]
pub extern "C" fn proxy_on_grpc_receive(context_id: u32, token_id: u32, response_size: usize) {
    with_root(context_id, (), |r| r.on_grpc_receive(token_id, response_size))
}

#[cfg_attr(target_arch = "wasm32", no_mangle)]
pub extern "C" fn proxy_on_grpc_receive_trailing_metadata(_context_id: u32, _token_id: u32, _trailers: u32) {}

#[cfg_attr(target_arch = "wasm32", no_mangle)]
pub extern "C" fn proxy_on_grpc_close(context_id: u32, token_id: u32, status_code: u32) {
    with_root(context_id, (), |r| r.on_grpc_close(token_id, status_code))
}

#[cfg_attr(target_arch = "wasm32", no_mangle)]
pub extern "C" fn proxy_on_foreign_function(_context_id: u32, _function_id: u32, _arguments_size: usize) {}
