//! Process-wide state in Envoy shared data: per bucket, one 32-byte value (tokens, when they were
//! counted, waiters per class); per provider, the breaker. Every change is a compare-and-swap of
//! the whole value, so all workers act on one state at any `--concurrency`.

use super::abi;
use crate::{admission, breaker};

/// CAS retries before giving up on one change; a conflict needs another worker to write between
/// our read and our write, so a handful is plenty.
const MAX_CAS_TRIES: usize = 32;

/// A value kept in shared data.
pub trait Stored: Copy {
    fn to_bytes(&self) -> Vec<u8>;
    fn from_bytes(b: &[u8]) -> Option<Self>;
}

impl Stored for admission::Shared {
    fn to_bytes(&self) -> Vec<u8> {
        self.encode().to_vec()
    }
    fn from_bytes(b: &[u8]) -> Option<Self> {
        Self::decode(b)
    }
}

impl Stored for breaker::State {
    fn to_bytes(&self) -> Vec<u8> {
        self.encode().to_vec()
    }
    fn from_bytes(b: &[u8]) -> Option<Self> {
        Self::decode(b)
    }
}

/// Creates the value at `key` if it does not exist yet. Called from `on_configure`, before
/// traffic, because two workers creating the same key at once would both succeed.
pub fn ensure<T: Stored>(key: &str, fresh: T) -> Result<(), abi::Status> {
    if abi::get_shared(key)?.0.and_then(|v| T::from_bytes(&v)).is_none() {
        abi::set_shared(key, &fresh.to_bytes(), 0)?;
    }
    Ok(())
}

/// Reads the value at `key` (or `fresh`), lets `change` decide, and writes what it returns
/// unless another worker wrote first, in which case it decides again.
pub fn update<T: Stored, R>(
    key: &str,
    fresh: T,
    mut change: impl FnMut(T) -> (R, Option<T>),
) -> Result<R, abi::Status> {
    for _ in 0..MAX_CAS_TRIES {
        let (value, cas) = abi::get_shared(key)?;
        let current = value.and_then(|v| T::from_bytes(&v)).unwrap_or(fresh);
        let (result, next) = change(current);
        let Some(next) = next else { return Ok(result) };
        match abi::set_shared(key, &next.to_bytes(), cas) {
            Ok(()) => return Ok(result),
            Err(abi::CAS_MISMATCH) => continue,
            Err(s) => return Err(s),
        }
    }
    Err(abi::CAS_MISMATCH)
}
