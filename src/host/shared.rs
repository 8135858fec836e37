//! The process-wide admission state in Envoy shared data: one 32-byte value per bucket (tokens,
//! when they were counted, waiters per class). Every change is a compare-and-swap of the whole
//! value, so all workers see one bucket and one set of queue depths at any `--concurrency`.

use super::abi;
use crate::admission::Shared;

/// CAS retries before giving up on one change; a conflict needs another worker to write between
/// our read and our write, so a handful is plenty.
const MAX_CAS_TRIES: usize = 32;

/// Creates the value at `key` if it does not exist yet. Called from `on_configure`, before
/// traffic, because two workers creating the same key at once would both succeed.
pub fn ensure(key: &str, fresh: Shared) -> Result<(), abi::Status> {
    if abi::get_shared(key)?.0.and_then(|v| Shared::decode(&v)).is_none() {
        abi::set_shared(key, &fresh.encode(), 0)?;
    }
    Ok(())
}

/// Reads the value at `key` (or `fresh` if there is none yet), lets `change` decide, and writes
/// what it returns unless another worker wrote first, in which case it decides again.
pub fn update<R>(
    key: &str,
    fresh: Shared,
    mut change: impl FnMut(Shared) -> (R, Option<Shared>),
) -> Result<R, abi::Status> {
    for _ in 0..MAX_CAS_TRIES {
        let (value, cas) = abi::get_shared(key)?;
        let current = value.and_then(|v| Shared::decode(&v)).unwrap_or(fresh);
        let (result, next) = change(current);
        let Some(next) = next else { return Ok(result) };
        match abi::set_shared(key, &next.encode(), cas) {
            Ok(()) => return Ok(result),
            Err(abi::CAS_MISMATCH) => continue,
            Err(s) => return Err(s),
        }
    }
    Err(abi::CAS_MISMATCH)
}
