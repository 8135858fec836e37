//! Statics of this VM: its context tables, pending counters and lost compare-and-swaps.

use std::ops::Deref;

/// A value of this VM's one thread, as a plain static. `thread_local!` says the same, but its
/// `LocalKey` indirection costs every access, and the context tables are read on every callback
/// (a measured share of the admit path). Mutation stays behind a `Cell` or `RefCell` inside.
pub struct VmLocal<T>(T);

// Sound because the VM runs one thread: wasm32-wasip1 has none to spawn, and Envoy calls each VM
// from its own worker thread only.
unsafe impl<T> Sync for VmLocal<T> {}

impl<T> VmLocal<T> {
    pub const fn new(value: T) -> Self {
        VmLocal(value)
    }
}

impl<T> Deref for VmLocal<T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.0
    }
}
