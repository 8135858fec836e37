//! Process-wide values in Envoy shared data, behind a trait so the core runs natively against
//! `MemStore` (tests, the simulation) and in Envoy against the host's shared data.
//!
//! Every change is a compare-and-swap of the whole value: read, decide, write unless another
//! worker wrote first, then decide again.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;

/// A host status code (proxy-wasm `WasmResult`).
pub type Status = u32;
/// The host's answer when the value changed since it was read.
pub const CAS_MISMATCH: Status = 8;
/// Compare-and-swaps tried before giving up on one change, here and wherever else a value is
/// decided again after a lost write (tenant slots, fallback slots). A loss needs another worker
/// to write between our read and our write, so a handful is plenty.
pub const MAX_CAS_TRIES: usize = 32;

/// Envoy shared data: values with a CAS token. `get` gives `(None, 0)` for a missing key;
/// `set` with `cas` 0 writes unconditionally.
pub trait Store {
    fn get(&self, key: &str) -> Result<(Option<Vec<u8>>, u32), Status>;
    fn set(&self, key: &str, value: &[u8], cas: u32) -> Result<(), Status>;
}

/// A value kept in shared data.
pub trait Stored: Sized {
    fn to_bytes(&self) -> Vec<u8>;
    /// `None` for anything that is not a value this type wrote.
    fn from_bytes(b: &[u8]) -> Option<Self>;
}

/// Reads the value at `key` (or `fresh()` when there is none or it is unreadable), lets `change`
/// decide, and writes what it returns unless another worker wrote first, in which case it
/// decides again on the new value.
pub fn update<T: Stored, R>(
    store: &impl Store,
    key: &str,
    fresh: impl Fn() -> T,
    mut change: impl FnMut(T) -> (R, Option<T>),
) -> Result<R, Status> {
    let mut result = None;
    update_bytes(store, key, &mut |bytes| {
        let current = bytes.and_then(T::from_bytes).unwrap_or_else(&fresh);
        let (r, next) = change(current);
        result = Some(r);
        next.map(|n| n.to_bytes())
    })?;
    // `update_bytes` returns Ok only after calling `change` at least once.
    result.ok_or(CAS_MISMATCH)
}

/// Decides the bytes to write from the bytes read (`None`: write nothing).
type ChangeBytes<'a> = dyn FnMut(Option<&[u8]>) -> Option<Vec<u8>> + 'a;

/// The compare-and-swap loop of `update` on raw bytes: one copy in the `.wasm` for every type.
fn update_bytes(store: &dyn Store, key: &str, change: &mut ChangeBytes) -> Result<(), Status> {
    for _ in 0..MAX_CAS_TRIES {
        let (value, cas) = store.get(key)?;
        let Some(next) = change(value.as_deref()) else { return Ok(()) };
        match store.set(key, &next, cas) {
            Ok(()) => return Ok(()),
            Err(CAS_MISMATCH) => continue,
            Err(s) => return Err(s),
        }
    }
    Err(CAS_MISMATCH)
}

/// Creates the value at `key` if there is no readable one. Called before traffic (from
/// `on_configure`), because two workers creating the same key at once would both succeed.
pub fn ensure<T: Stored>(store: &impl Store, key: &str, fresh: T) -> Result<(), Status> {
    if read::<T>(store, key)?.is_none() {
        store.set(key, &fresh.to_bytes(), 0)?;
    }
    Ok(())
}

/// The value at `key`, if there is a readable one.
pub fn read<T: Stored>(store: &impl Store, key: &str) -> Result<Option<T>, Status> {
    Ok(store.get(key)?.0.and_then(|v| T::from_bytes(&v)))
}

/// An in-memory `Store` with Envoy's CAS semantics, for tests and the simulation. It can be told
/// to fail: `conflicts` makes the next writes lose their CAS, `broken` fails every call.
#[derive(Default)]
pub struct MemStore {
    values: RefCell<HashMap<String, (Vec<u8>, u32)>>,
    pub conflicts: Cell<u32>,
    pub broken: Cell<bool>,
}

/// The status `MemStore` returns when `broken`.
pub const INTERNAL_FAILURE: Status = 10;

impl Store for MemStore {
    fn get(&self, key: &str) -> Result<(Option<Vec<u8>>, u32), Status> {
        if self.broken.get() {
            return Err(INTERNAL_FAILURE);
        }
        Ok(match self.values.borrow().get(key) {
            Some((v, cas)) => (Some(v.clone()), *cas),
            None => (None, 0),
        })
    }

    fn set(&self, key: &str, value: &[u8], cas: u32) -> Result<(), Status> {
        if self.broken.get() {
            return Err(INTERNAL_FAILURE);
        }
        if self.conflicts.get() > 0 {
            self.conflicts.set(self.conflicts.get() - 1);
            return Err(CAS_MISMATCH);
        }
        let mut values = self.values.borrow_mut();
        let slot = values.entry(key.to_string()).or_insert_with(|| (Vec::new(), 0));
        // Like Envoy: a key that does not exist yet ignores the CAS value.
        if cas != 0 && slot.1 != 0 && slot.1 != cas {
            return Err(CAS_MISMATCH);
        }
        *slot = (value.to_vec(), slot.1.wrapping_add(1).max(1));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[derive(Clone, Copy, Debug, PartialEq)]
    struct N(u32);
    impl Stored for N {
        fn to_bytes(&self) -> Vec<u8> {
            self.0.to_le_bytes().to_vec()
        }
        fn from_bytes(b: &[u8]) -> Option<Self> {
            Some(N(u32::from_le_bytes(b.try_into().ok()?)))
        }
    }

    #[test]
    fn update_retries_a_lost_cas_and_gives_up_after_many() {
        let s = MemStore::default();
        s.conflicts.set(3);
        assert_eq!(update(&s, "k", || N(0), |n| (n.0, Some(N(n.0 + 1)))), Ok(0));
        assert_eq!(read::<N>(&s, "k"), Ok(Some(N(1))));
        s.conflicts.set(1000);
        assert_eq!(update(&s, "k", || N(0), |n| ((), Some(N(n.0 + 1)))), Err(CAS_MISMATCH));
        s.broken.set(true);
        assert_eq!(read::<N>(&s, "k"), Err(INTERNAL_FAILURE));
    }

    #[test]
    fn a_stale_cas_loses_and_garbage_reads_as_fresh() {
        let s = MemStore::default();
        s.set("k", b"xyz", 0).unwrap();
        let (_, cas) = s.get("k").unwrap();
        s.set("k", &N(5).to_bytes(), cas).unwrap();
        assert_eq!(s.set("k", &N(6).to_bytes(), cas), Err(CAS_MISMATCH));
        assert_eq!(update(&s, "bad", || N(9), |n| (n, None)), Ok(N(9)));
    }
}
