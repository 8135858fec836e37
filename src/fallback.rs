//! The optional fallback while the breaker is open: recent successful responses, kept in shared
//! data for every worker, answered again to requests with the same cache key.
//!
//! Envoy cannot hold a request's headers while a filter reads its body, so the key cannot be the
//! prompt itself: clients (or an earlier filter) mark a cacheable request with a key header,
//! e.g. a hash of the prompt. The cache is bounded: at most `max_entries` responses of at most
//! `max_body_bytes` each; the oldest is evicted first and entries older than `max_age_s` are not
//! served.

/// One cached response.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub stored_ms: u64,
    pub content_type: String,
    pub body: Vec<u8>,
}

/// The cache key of a request: its method, path and the client's cache key.
pub fn key(method: &str, path: &str, cache_key: &str) -> u64 {
    crate::hash::stable_hash(&[method, path, cache_key])
}

impl Entry {
    pub fn encode(&self) -> Vec<u8> {
        let ct = self.content_type.as_bytes();
        let ct_len = ct.len().min(u16::MAX as usize);
        let mut out = Vec::with_capacity(10 + ct_len + self.body.len());
        out.extend_from_slice(&self.stored_ms.to_le_bytes());
        out.extend_from_slice(&(ct_len as u16).to_le_bytes());
        out.extend_from_slice(&ct[..ct_len]);
        out.extend_from_slice(&self.body);
        out
    }

    /// `None` for an evicted (empty) or foreign value.
    pub fn decode(b: &[u8]) -> Option<Entry> {
        let stored_ms = u64::from_le_bytes(b.get(..8)?.try_into().ok()?);
        let ct_len = u16::from_le_bytes(b.get(8..10)?.try_into().ok()?) as usize;
        let content_type = String::from_utf8(b.get(10..10 + ct_len)?.to_vec()).ok()?;
        Some(Entry { stored_ms, content_type, body: b.get(10 + ct_len..)?.to_vec() })
    }

    pub fn fresh(&self, now_ms: u64, max_age_ms: u64) -> bool {
        now_ms.saturating_sub(self.stored_ms) <= max_age_ms
    }
}

/// The index of cached keys, oldest first. Adding `k` moves it to the end; the keys pushed out
/// past `max_entries` are returned for eviction.
pub fn remember(index: &mut Vec<u64>, k: u64, max_entries: usize) -> Vec<u64> {
    index.retain(|&x| x != k);
    index.push(k);
    let over = index.len().saturating_sub(max_entries);
    index.drain(..over).collect()
}

pub fn encode_index(index: &[u64]) -> Vec<u8> {
    index.iter().flat_map(|k| k.to_le_bytes()).collect()
}

/// Unreadable trailing bytes are dropped, never a panic.
pub fn decode_index(b: &[u8]) -> Vec<u64> {
    b.chunks_exact(8).filter_map(|c| c.try_into().ok().map(u64::from_le_bytes)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn keys_separate_their_parts_and_are_stable() {
        assert_eq!(key("POST", "/v1/chat", "abc"), key("POST", "/v1/chat", "abc"));
        assert_ne!(key("POST", "/v1/chat", "abc"), key("POST", "/v1/chat", "abd"));
        assert_ne!(key("POST", "/v1/chat", "abc"), key("POST", "/v1/cha", "tabc"));
        assert_ne!(key("GET", "/v1/chat", "abc"), key("POST", "/v1/chat", "abc"));
    }

    #[test]
    fn entries_round_trip_and_garbage_is_none() {
        let e = Entry { stored_ms: 42, content_type: "application/json".into(), body: b"{\"a\":1}".to_vec() };
        assert_eq!(Entry::decode(&e.encode()), Some(e.clone()));
        assert_eq!(Entry::decode(b""), None, "evicted entries are empty");
        assert_eq!(Entry::decode(&[1, 2, 3]), None);
        let mut bad = e.encode();
        bad[8] = 0xff; // content-type longer than the value
        assert_eq!(Entry::decode(&bad), None);
    }

    #[test]
    fn entries_expire_by_age() {
        let e = Entry { stored_ms: 1_000, content_type: String::new(), body: vec![] };
        assert!(e.fresh(1_500, 500));
        assert!(!e.fresh(1_501, 500));
        assert!(e.fresh(0, 500), "a clock that went backwards is not an age");
    }

    #[test]
    fn the_index_evicts_the_oldest_and_refreshes_repeats() {
        let mut index = vec![];
        assert!(remember(&mut index, 1, 2).is_empty());
        assert!(remember(&mut index, 2, 2).is_empty());
        assert!(remember(&mut index, 1, 2).is_empty(), "a repeat is not a new entry");
        assert_eq!(index, [2, 1]);
        assert_eq!(remember(&mut index, 3, 2), [2]);
        assert_eq!(index, [1, 3]);
        assert_eq!(decode_index(&encode_index(&index)), index);
        assert_eq!(decode_index(&[1, 2, 3]), Vec::<u64>::new());
    }
}
