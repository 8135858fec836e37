//! The process-wide token bucket in Envoy shared data. Every admission is a compare-and-swap on
//! one 16-byte value, so all workers spend from the same bucket and the configured rate holds for
//! the whole process at any `--concurrency`.

use super::abi;
use crate::bucket::{Bucket, State};

/// CAS retries before giving up on one decision; conflicts need another worker to write between
/// our read and write, so a handful is plenty.
const MAX_CAS_TRIES: usize = 32;

pub enum Take {
    /// Token taken; whole tokens left.
    Admitted { left: f64 },
    /// Not enough tokens for this class; nanoseconds until there will be.
    Wait { ns: u64, left: f64 },
}

/// Creates the bucket full if it does not exist yet. Called from `on_configure`, before traffic,
/// because two workers creating the same key at once would both win.
pub fn ensure(key: &str, bucket: &Bucket, now_ns: u64) -> Result<(), abi::Status> {
    if abi::get_shared(key)?.0.and_then(|v| State::decode(&v)).is_none() {
        abi::set_shared(key, &bucket.full(now_ns).encode(), 0)?;
    }
    Ok(())
}

/// Takes `n` tokens from the bucket at `key` without going below `floor`.
pub fn take(key: &str, bucket: &Bucket, now_ns: u64, n: f64, floor: f64) -> Result<Take, abi::Status> {
    for _ in 0..MAX_CAS_TRIES {
        let (value, cas) = abi::get_shared(key)?;
        // A missing or unreadable value (e.g. a new tenant's key) starts full.
        let state = value.and_then(|v| State::decode(&v)).unwrap_or_else(|| bucket.full(now_ns));
        match bucket.take(state, now_ns, n, floor) {
            Ok(next) => match abi::set_shared(key, &next.encode(), cas) {
                Ok(()) => return Ok(Take::Admitted { left: next.tokens }),
                Err(abi::CAS_MISMATCH) => continue,
                Err(s) => return Err(s),
            },
            Err(ns) => return Ok(Take::Wait { ns, left: bucket.refill(state, now_ns).tokens }),
        }
    }
    Err(abi::CAS_MISMATCH)
}
