//! A map from Envoy context ids to small values, as a vector: the maps the filter keeps per
//! worker (released waiters, held responses, held retries) hold a handful of entries, and a hash
//! table per value type costs the `.wasm` kilobytes it does not need.

/// Entries in insertion order; every operation is a linear scan.
#[derive(Debug)]
pub struct IdMap<V> {
    entries: Vec<(u32, V)>,
}

impl<V> Default for IdMap<V> {
    fn default() -> Self {
        Self::new()
    }
}

impl<V> IdMap<V> {
    pub const fn new() -> Self {
        IdMap { entries: Vec::new() }
    }

    /// Sets the value of `id`, returning the one it replaces.
    pub fn insert(&mut self, id: u32, value: V) -> Option<V> {
        match self.get_mut(&id) {
            Some(v) => Some(std::mem::replace(v, value)),
            None => {
                self.entries.push((id, value));
                None
            }
        }
    }

    pub fn remove(&mut self, id: &u32) -> Option<V> {
        let i = self.entries.iter().position(|(k, _)| k == id)?;
        Some(self.entries.swap_remove(i).1)
    }

    pub fn get_mut(&mut self, id: &u32) -> Option<&mut V> {
        self.entries.iter_mut().find(|(k, _)| k == id).map(|(_, v)| v)
    }

    pub fn contains_key(&self, id: &u32) -> bool {
        self.entries.iter().any(|(k, _)| k == id)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&u32, &V)> {
        self.entries.iter().map(|(k, v)| (k, v))
    }

    pub fn iter_mut(&mut self) -> impl Iterator<Item = (&u32, &mut V)> {
        self.entries.iter_mut().map(|(k, v)| (&*k, v))
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn behaves_like_a_map() {
        let mut m = IdMap::new();
        assert_eq!(m.insert(1, "a"), None);
        assert_eq!(m.insert(2, "b"), None);
        assert_eq!(m.insert(1, "c"), Some("a"));
        assert_eq!(m.len(), 2);
        assert!(m.contains_key(&2));
        *m.get_mut(&2).unwrap() = "d";
        assert_eq!(m.remove(&2), Some("d"));
        assert_eq!(m.remove(&2), None);
        assert_eq!(m.iter().collect::<Vec<_>>(), [(&1, &"c")]);
        assert!(!m.is_empty());
    }
}
