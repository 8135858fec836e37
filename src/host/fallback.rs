//! The fallback cache in shared data, for every worker: one value per cached response and one
//! index of keys, oldest first, that bounds how many are kept.

use super::abi;
use crate::fallback::{self, Entry};

const MAX_CAS_TRIES: usize = 32;

fn entry_key(name: &str, key: u64) -> String {
    format!("llm_ratelimit/{name}/cache/{key:016x}")
}

/// The cached response for `key`, if there is one younger than `max_age_ms`.
pub fn lookup(name: &str, key: u64, now_ms: u64, max_age_ms: u64) -> Option<Entry> {
    let (value, _) = abi::get_shared(&entry_key(name, key)).ok()?;
    Entry::decode(&value?).filter(|e| e.fresh(now_ms, max_age_ms))
}

/// Stores `entry` under `key` and evicts what no longer fits in `max_entries`.
pub fn store(name: &str, key: u64, entry: &Entry, max_entries: usize) -> Result<(), abi::Status> {
    abi::set_shared(&entry_key(name, key), &entry.encode(), 0)?;
    let index_key = format!("llm_ratelimit/{name}/cache_index");
    for _ in 0..MAX_CAS_TRIES {
        let (value, cas) = abi::get_shared(&index_key)?;
        let mut index = fallback::decode_index(&value.unwrap_or_default());
        let evicted = fallback::remember(&mut index, key, max_entries);
        match abi::set_shared(&index_key, &fallback::encode_index(&index), cas) {
            Ok(()) => {
                for old in evicted {
                    // Shared data cannot delete: an empty value reads as evicted.
                    abi::set_shared(&entry_key(name, old), &[], 0)?;
                }
                return Ok(());
            }
            Err(abi::CAS_MISMATCH) => continue,
            Err(s) => return Err(s),
        }
    }
    Err(abi::CAS_MISMATCH)
}
