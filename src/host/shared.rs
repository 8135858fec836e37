//! Envoy's shared data as the core's `Store`.

use super::abi;
use super::vm_local::VmLocal;
use crate::store::{Status, Store, CAS_MISMATCH};
use std::cell::Cell;

/// Writes that lost their compare-and-swap in this worker VM since the last tick read it.
static CONFLICTS: VmLocal<Cell<u64>> = VmLocal::new(Cell::new(0));

/// The lost compare-and-swaps since the last call (each tick adds them to a counter).
pub fn take_conflicts() -> u64 {
    CONFLICTS.replace(0)
}

/// The host's process-wide shared data.
pub struct SharedData;

impl Store for SharedData {
    fn get(&self, key: &str) -> Result<(Option<Vec<u8>>, u32), Status> {
        abi::get_shared(key)
    }
    fn set(&self, key: &str, value: &[u8], cas: u32) -> Result<(), Status> {
        let written = abi::set_shared(key, value, cas);
        if written == Err(CAS_MISMATCH) {
            CONFLICTS.set(CONFLICTS.get() + 1);
        }
        written
    }
}
