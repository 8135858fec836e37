//! Envoy's shared data as the core's `Store`.

use super::abi;
use crate::store::{Status, Store};

/// The host's process-wide shared data.
pub struct SharedData;

impl Store for SharedData {
    fn get(&self, key: &str) -> Result<(Option<Vec<u8>>, u32), Status> {
        abi::get_shared(key)
    }
    fn set(&self, key: &str, value: &[u8], cas: u32) -> Result<(), Status> {
        abi::set_shared(key, value, cas)
    }
}
