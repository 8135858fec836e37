//! Envoy's shared data as the core's `Store`.

use super::calls::host;
use super::vm_local::vm_local;
use crate::store::{Status, Store, CAS_MISMATCH};
use std::cell::Cell;

vm_local! {
    /// Writes that lost their compare-and-swap in this worker VM since the last tick read it.
    static CONFLICTS: Cell<u64> = Cell::new(0);
}

/// The lost compare-and-swaps since the last call (each tick adds them to a counter).
pub fn take_conflicts() -> u64 {
    CONFLICTS.with(|c| c.replace(0))
}

/// The host's process-wide shared data.
pub struct SharedData;

impl Store for SharedData {
    fn get(&self, key: &str) -> Result<(Option<Vec<u8>>, u32), Status> {
        host().get_shared(key)
    }
    fn set(&self, key: &str, value: &[u8], cas: u32) -> Result<(), Status> {
        let written = host().set_shared(key, value, cas);
        if written == Err(CAS_MISMATCH) {
            CONFLICTS.with(|c| c.set(c.get() + 1));
        }
        written
    }
}
