//! Statics of one VM: its context tables, pending counters, lost compare-and-swaps.
//!
//! In the `.wasm` a VM runs on one worker thread, so they are plain statics: `thread_local!`
//! says the same, but its `LocalKey` indirection costs every access, and the context tables are
//! read on every callback (a measured share of the admit path). Natively each thread is one
//! simulated VM, so there they are `thread_local!`. Both read as `NAME.with(|v| ...)`.

/// A value of this VM's one thread. Mutation stays behind a `Cell` or `RefCell` inside.
#[cfg(target_arch = "wasm32")]
pub struct VmLocal<T>(pub T);

// Sound because the VM runs one thread: wasm32-wasip1 has none to spawn, and Envoy calls each VM
// from its own worker thread only.
#[cfg(target_arch = "wasm32")]
unsafe impl<T> Sync for VmLocal<T> {}

#[cfg(target_arch = "wasm32")]
impl<T> VmLocal<T> {
    pub fn with<R>(&'static self, f: impl FnOnce(&T) -> R) -> R {
        f(&self.0)
    }
}

/// `vm_local!(static NAME: Type = const_init;)`: a static of this VM.
macro_rules! vm_local {
    ($(#[$m:meta])* static $name:ident: $t:ty = $init:expr;) => {
        #[cfg(target_arch = "wasm32")]
        $(#[$m])*
        static $name: $crate::host::vm_local::VmLocal<$t> = $crate::host::vm_local::VmLocal($init);
        #[cfg(not(target_arch = "wasm32"))]
        std::thread_local! {
            $(#[$m])*
            static $name: $t = const { $init };
        }
    };
}
pub(crate) use vm_local;

/// What `vm_local!` declares, by type: `&'static Key<T>` is a VM static of `T`.
#[cfg(target_arch = "wasm32")]
pub type Key<T> = VmLocal<T>;
#[cfg(not(target_arch = "wasm32"))]
pub type Key<T> = std::thread::LocalKey<T>;
