//! The optional fallback while the breaker is open: recent successful responses, kept in shared
//! data for every worker, answered again to the same request from the same caller.
//!
//! Envoy cannot hold a request's headers while a filter reads its body, so the key cannot be the
//! prompt itself: clients (or an earlier filter) mark a cacheable request with a key header,
//! e.g. a hash of the prompt. That key is the client's word, so it is never enough on its own: a
//! request's [`Identity`] adds its method, path, tenant (the bucket key header) and a hash of its
//! credential, and an answer is served only to a request whose identity equals the one stored
//! with it. The credential itself is never stored.
//!
//! Envoy shared data cannot delete keys, so the cache is a fixed table of `max_entries` slots,
//! one shared-data key each (`llm_ratelimit/<name>/cache/<slot>`), that entries overwrite. An
//! identity has a few candidate slots, chosen from its hash. A lookup reads them and serves the
//! newest fresh entry with the same identity. A store writes to the candidate that already holds
//! the same identity, else to an empty (or expired, or unreadable) one, else over the oldest. The
//! write is a compare-and-swap: if another worker wrote the slot since it was read, the choice is
//! made again. (A slot never written has no CAS token, so two first writers both succeed and the
//! later one wins: that loses an entry, never mixes one.) Entries older than `max_age_ms` are
//! never served; responses larger than `max_body_bytes` are never captured.
//!
//! The path is kept as sent, query included: a credential passed in the query (`?key=`) is part
//! of the identity as it is, not hashed.

use crate::hash::{slot_draw, stable_hash};
use crate::store::{Status, Store, CAS_MISMATCH, MAX_CAS_TRIES};
use crate::time::{Duration, Instant};

/// Candidate slots per identity: more keeps more of the newest entries when slots are scarce, at
/// the price of more shared-data reads per lookup and store.
pub const WAYS: usize = 4;
/// Request headers that carry a credential, in the order they are looked for: the first present
/// one is the request's credential.
pub const CREDENTIAL_HEADERS: [&str; 4] = ["authorization", "x-api-key", "api-key", "x-goog-api-key"];
/// Leads every stored value: anything else (another version's layout, an old evicted marker) is
/// not an entry.
const MAGIC: &[u8; 4] = b"LRC\x01";
/// The value the host replaces a header's invalid UTF-8 with: values that differ only in such
/// bytes would read the same, so they are not an identity.
const LOSSY: char = '\u{fffd}';

/// Who asked what: a cached answer is served only to a request with an equal identity.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    pub method: String,
    pub path: String,
    /// The value of `fallback.key_header`.
    pub client_key: String,
    /// The value of `bucket.key_header`, when that is configured and the request has it.
    pub tenant: Option<String>,
    /// `credential_hash` of the request's credential header, if it has one.
    pub credential: Option<u64>,
}

/// One cached response.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// When it was stored, in epoch ms: the stored field (see [`Entry::stored`]).
    pub stored_ms: u64,
    pub content_type: String,
    pub body: Vec<u8>,
}

/// The hash that stands in for a credential: the header's name and value, never kept themselves.
pub fn credential_hash(header: &str, value: &str) -> u64 {
    stable_hash(&["llm_ratelimit/credential", header, value])
}

impl Identity {
    /// The identity of a request, or `None` when it cannot be cached: it has no `key_header`, or
    /// a part of it had bytes that are not UTF-8. `path` is the request's `:path`, `tenant` the
    /// value of `bucket.key_header` if configured; `header` reads the other request headers.
    pub fn of_request(
        key_header: &str,
        path: &str,
        tenant: Option<&str>,
        header: impl Fn(&str) -> Option<String>,
    ) -> Option<Identity> {
        let client_key = header(key_header)?;
        let method = header(":method").unwrap_or_default();
        let credential = CREDENTIAL_HEADERS.iter().find_map(|&name| Some((name, header(name)?)));
        let lossy = |s: &str| s.contains(LOSSY);
        if [method.as_str(), path, client_key.as_str(), tenant.unwrap_or_default()].into_iter().any(lossy)
            || credential.as_ref().is_some_and(|(_, v)| lossy(v))
        {
            return None;
        }
        Some(Identity {
            method,
            path: path.to_string(),
            client_key,
            tenant: tenant.map(str::to_string),
            credential: credential.map(|(name, value)| credential_hash(name, &value)),
        })
    }

    /// Where the identity's candidate slots start: equal identities hash alike; a collision only
    /// shares slots, never an answer.
    pub fn slot_hash(&self) -> u64 {
        // "" for none and "=…" for some keep an absent tenant apart from an empty one.
        let tenant = self.tenant.as_ref().map_or(String::new(), |t| format!("={t}"));
        let credential = self.credential.map_or(String::new(), |c| format!("{c:016x}"));
        stable_hash(&[&self.method, &self.path, &self.client_key, &tenant, &credential])
    }
}

impl Entry {
    /// When it was stored.
    pub fn stored(&self) -> Instant {
        Instant::from_millis(self.stored_ms)
    }

    /// Whether it is at most `max_age` old at `now` (counted in whole milliseconds, as stored).
    pub fn fresh(&self, now: Instant, max_age: Duration) -> bool {
        now.floor_millis() - self.stored() <= max_age
    }
}

/// The shared-data key of slot `slot` of cache `name`.
pub fn slot_key(name: &str, slot: usize) -> String {
    format!("llm_ratelimit/{name}/cache/{slot}")
}

/// The candidate slots, in `0..slots`, of an identity with hash `hash`: `WAYS` distinct ones, or
/// every slot when there are fewer. Each is drawn from the hash on its own; one already drawn
/// moves on to the next slot not drawn. (Why this and `tenants::candidates` are not one helper:
/// see there.)
pub fn candidates(hash: u64, slots: usize) -> Vec<usize> {
    let slots = slots.max(1);
    let mut out: Vec<usize> = Vec::with_capacity(WAYS);
    for i in 0..WAYS.min(slots) as u64 {
        let mut s = slot_draw(hash, i, slots as u64) as usize;
        // Ends: fewer than `slots` are drawn, so one is free.
        while out.contains(&s) {
            s = (s + 1) % slots;
        }
        out.push(s);
    }
    out
}

/// The stored value of `entry` for `id`: the whole identity (the credential only as its hash),
/// then the response. Every variable part carries its length, so nothing is ever truncated.
pub fn encode(id: &Identity, entry: &Entry) -> Vec<u8> {
    let parts = [id.method.as_bytes(), id.path.as_bytes(), id.client_key.as_bytes(), entry.content_type.as_bytes()];
    let tenant = id.tenant.as_ref().map_or(0, String::len);
    // Magic, time, two tags, the credential and six lengths, then the variable parts.
    let fixed = MAGIC.len() + 8 + 2 + 8 + 6 * 8;
    let mut out = Vec::with_capacity(fixed + parts.iter().map(|p| p.len()).sum::<usize>() + tenant + entry.body.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&entry.stored_ms.to_le_bytes());
    match id.credential {
        None => out.push(0),
        Some(c) => {
            out.push(1);
            out.extend_from_slice(&c.to_le_bytes());
        }
    }
    match &id.tenant {
        None => out.push(0),
        Some(t) => {
            out.push(1);
            put(&mut out, t.as_bytes());
        }
    }
    for p in parts {
        put(&mut out, p);
    }
    put(&mut out, &entry.body);
    out
}

fn put(out: &mut Vec<u8>, part: &[u8]) {
    out.extend_from_slice(&(part.len() as u64).to_le_bytes());
    out.extend_from_slice(part);
}

/// The identity and entry in a stored value; `None` for anything `encode` did not write (an
/// empty slot, another version's layout, a truncated or padded value).
pub fn decode(b: &[u8]) -> Option<(Identity, Entry)> {
    let mut r = Reader(b);
    if r.take(MAGIC.len())? != MAGIC {
        return None;
    }
    let stored_ms = r.u64()?;
    let credential = match r.take(1)? {
        [0] => None,
        [1] => Some(r.u64()?),
        _ => return None,
    };
    let tenant = match r.take(1)? {
        [0] => None,
        [1] => Some(r.string()?),
        _ => return None,
    };
    let (method, path, client_key, content_type) = (r.string()?, r.string()?, r.string()?, r.string()?);
    let body = r.part()?.to_vec();
    if !r.0.is_empty() {
        return None;
    }
    Some((Identity { method, path, client_key, tenant, credential }, Entry { stored_ms, content_type, body }))
}

/// Reads a stored value front to back; every read that runs past the end is `None`.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, rest) = self.0.split_at_checked(n)?;
        self.0 = rest;
        Some(head)
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
    fn part(&mut self) -> Option<&'a [u8]> {
        let n = usize::try_from(self.u64()?).ok()?;
        self.take(n)
    }
    fn string(&mut self) -> Option<String> {
        String::from_utf8(self.part()?.to_vec()).ok()
    }
}

/// What a lookup serves from the decoded candidates: the newest fresh entry stored for `id`.
pub fn answer(read: Vec<Option<(Identity, Entry)>>, id: &Identity, now: Instant, max_age: Duration) -> Option<Entry> {
    read.into_iter()
        .flatten()
        .filter(|(stored, e)| stored == id && e.fresh(now, max_age))
        .map(|(_, e)| e)
        .max_by_key(|e| e.stored_ms)
}

/// Which of the decoded candidates a new entry for `id` replaces (an index into `read`, which is
/// not empty): the one holding `id` already, else the first empty, unreadable or expired one, else
/// the oldest.
pub fn victim(read: &[Option<(Identity, Entry)>], id: &Identity, now: Instant, max_age: Duration) -> usize {
    let same = read.iter().position(|r| r.as_ref().is_some_and(|(stored, _)| stored == id));
    let free = || read.iter().position(|r| r.as_ref().is_none_or(|(_, e)| !e.fresh(now, max_age)));
    let oldest = || {
        let stored_ms = |(_, r): &(usize, &Option<(Identity, Entry)>)| r.as_ref().map_or(0, |(_, e)| e.stored_ms);
        read.iter().enumerate().min_by_key(stored_ms).map_or(0, |(i, _)| i)
    };
    same.or_else(free).unwrap_or_else(oldest)
}

/// The cached response for `id` in cache `name` (a table of `slots` slots), if one younger than
/// `max_age` was stored for exactly that identity.
pub fn lookup(
    store: &impl Store,
    name: &str,
    id: &Identity,
    now: Instant,
    slots: usize,
    max_age: Duration,
) -> Result<Option<Entry>, Status> {
    let mut read = Vec::with_capacity(WAYS);
    for slot in candidates(id.slot_hash(), slots) {
        read.push(store.get(&slot_key(name, slot))?.0.and_then(|v| decode(&v)));
    }
    Ok(answer(read, id, now, max_age))
}

/// Stores `entry` (stored at `entry.stored_ms`, which is also "now") for `id` in cache `name`, a
/// table of `slots` slots, in the slot `victim` picks. If another worker writes that slot between
/// our read and our write, the choice is made again on what it wrote.
pub fn store(
    store: &impl Store,
    name: &str,
    id: &Identity,
    entry: &Entry,
    slots: usize,
    max_age: Duration,
) -> Result<(), Status> {
    let value = encode(id, entry);
    let keys: Vec<String> = candidates(id.slot_hash(), slots).into_iter().map(|s| slot_key(name, s)).collect();
    for _ in 0..MAX_CAS_TRIES {
        let mut read = Vec::with_capacity(keys.len());
        let mut cas = Vec::with_capacity(keys.len());
        for key in &keys {
            let (v, c) = store.get(key)?;
            read.push(v.and_then(|v| decode(&v)));
            cas.push(c);
        }
        let i = victim(&read, id, entry.stored(), max_age);
        let (Some(key), Some(&c)) = (keys.get(i), cas.get(i)) else { return Ok(()) };
        match store.set(key, &value, c) {
            Ok(()) => return Ok(()),
            Err(CAS_MISMATCH) => continue,
            Err(s) => return Err(s),
        }
    }
    Err(CAS_MISMATCH)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{MemStore, INTERNAL_FAILURE};
    use std::cell::RefCell;
    use std::collections::{BTreeSet, HashMap};
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    const HOUR: u64 = 3_600_000;

    /// The instant `ms` milliseconds after the epoch.
    fn at(ms: u64) -> Instant {
        Instant::from_millis(ms)
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn id(key: &str, tenant: Option<&str>, credential: Option<&str>) -> Identity {
        Identity {
            method: "POST".into(),
            path: "/v1/chat".into(),
            client_key: key.into(),
            tenant: tenant.map(str::to_string),
            credential: credential.map(|c| credential_hash("authorization", c)),
        }
    }

    fn entry(stored_ms: u64, body: &str) -> Entry {
        Entry { stored_ms, content_type: "application/json".into(), body: body.as_bytes().to_vec() }
    }

    fn headers(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |name| map.get(name).cloned()
    }

    /// A `MemStore` that remembers every key written: how many shared-data keys the cache used.
    #[derive(Default)]
    struct Keys {
        mem: MemStore,
        written: RefCell<BTreeSet<String>>,
    }
    impl Store for Keys {
        fn get(&self, key: &str) -> Result<(Option<Vec<u8>>, u32), Status> {
            self.mem.get(key)
        }
        fn set(&self, key: &str, value: &[u8], cas: u32) -> Result<(), Status> {
            self.written.borrow_mut().insert(key.to_string());
            self.mem.set(key, value, cas)
        }
    }

    #[test]
    fn the_identity_takes_tenant_and_a_credential_hash_from_the_request() {
        let req = [(":method", "POST"), ("x-llm-cache-key", "p1"), ("authorization", "Bearer sk-a")];
        let got = Identity::of_request("x-llm-cache-key", "/v1/chat", Some("acme"), headers(&req)).unwrap();
        let want = Identity { tenant: Some("acme".into()), ..id("p1", None, Some("Bearer sk-a")) };
        assert_eq!(got, want);
        // Without the key header nothing is cached.
        assert_eq!(Identity::of_request("x-llm-cache-key", "/v1/chat", None, headers(&req[..1])), None);
        // No credential and no tenant: still cached, under method, path and key.
        let bare = Identity::of_request("x-llm-cache-key", "/v1/chat", None, headers(&req[..2])).unwrap();
        assert_eq!(bare, id("p1", None, None));
    }

    #[test]
    fn the_first_credential_header_counts_and_its_name_is_part_of_the_hash() {
        let of = |pairs: &[(&str, &str)]| {
            let mut all = vec![(":method", "POST"), ("k", "p1")];
            all.extend_from_slice(pairs);
            Identity::of_request("k", "/", None, headers(&all)).unwrap().credential
        };
        assert_eq!(of(&[("authorization", "A"), ("x-api-key", "B")]), Some(credential_hash("authorization", "A")));
        assert_eq!(of(&[("x-api-key", "B"), ("api-key", "C")]), Some(credential_hash("x-api-key", "B")));
        assert_eq!(of(&[("api-key", "C")]), Some(credential_hash("api-key", "C")));
        assert_eq!(of(&[("x-goog-api-key", "D")]), Some(credential_hash("x-goog-api-key", "D")));
        assert_ne!(of(&[("authorization", "X")]), of(&[("x-api-key", "X")]));
        assert_ne!(of(&[("authorization", "X")]), of(&[("authorization", "Y")]));
        assert_eq!(of(&[]), None);
    }

    #[test]
    fn values_the_host_could_not_read_exactly_are_not_an_identity() {
        let lossy = "k\u{fffd}";
        let base = [(":method", "POST"), ("k", "p1")];
        let with = |extra: (&str, &str)| {
            let mut all = base.to_vec();
            all.push(extra);
            headers(&all)
        };
        assert_eq!(Identity::of_request("k", "/", None, with(("authorization", lossy))), None);
        assert_eq!(Identity::of_request("k", "/", Some(lossy), headers(&base)), None);
        assert_eq!(Identity::of_request("k", lossy, None, headers(&base)), None);
        assert_eq!(Identity::of_request("k", "/", None, with(("k", lossy))), None);
    }

    #[test]
    fn identity_hashes_separate_every_part() {
        let a = id("p1", Some("t"), Some("c"));
        assert_eq!(a.slot_hash(), a.clone().slot_hash());
        let others = [
            id("p2", Some("t"), Some("c")),
            id("p1", Some("u"), Some("c")),
            id("p1", None, Some("c")),
            id("p1", Some(""), Some("c")),
            id("p1", Some("t"), Some("d")),
            id("p1", Some("t"), None),
            Identity { method: "GET".into(), ..a.clone() },
            Identity { path: "/v1/cha".into(), client_key: "tp1".into(), ..a.clone() },
        ];
        for o in &others {
            assert_ne!(a.slot_hash(), o.slot_hash(), "{o:?}");
        }
        assert_ne!(id("p1", None, None).slot_hash(), id("p1", Some(""), None).slot_hash());
    }

    #[test]
    fn candidates_are_distinct_in_range_and_stable() {
        for h in [0, 1, u64::MAX, 0xdead_beef] {
            for slots in [0, 1, 2, 3, 4, 5, 100, 100_000] {
                let c = candidates(h, slots);
                assert_eq!(c.len(), WAYS.min(slots.max(1)), "{h} {slots}: {c:?}");
                assert!(c.iter().all(|&s| s < slots.max(1)));
                assert_eq!(BTreeSet::from_iter(c.iter()).len(), c.len(), "distinct");
                assert_eq!(c, candidates(h, slots));
            }
        }
        assert_eq!(candidates(7, 1), [0]);
        assert_eq!(slot_key("openai", 17), "llm_ratelimit/openai/cache/17");
    }

    #[test]
    fn entries_round_trip_with_their_identity_and_garbage_is_none() {
        for i in [id("p1", Some("acme"), Some("Bearer sk-a")), id("", None, None), id("p", Some(""), None)] {
            let e = entry(42, "{\"a\":1}");
            let bytes = encode(&i, &e);
            assert_eq!(decode(&bytes), Some((i.clone(), e.clone())));
            // Every truncation and every padding is garbage, never a panic.
            for n in 0..bytes.len() {
                assert_eq!(decode(&bytes[..n]), None, "truncated to {n}");
            }
            assert_eq!(decode(&[bytes.as_slice(), b"x"].concat()), None);
            // Every single corrupted byte is caught or decodes to something, never a panic.
            for n in 0..bytes.len() {
                let mut bad = bytes.clone();
                bad[n] ^= 0xff;
                let _ = decode(&bad);
            }
        }
        assert_eq!(decode(b""), None, "an empty (old evicted) value");
        assert_eq!(decode(&[0xff; 64]), None);
        // The previous layout: stored_ms, content-type length, content type, body.
        assert_eq!(decode(&[42, 0, 0, 0, 0, 0, 0, 0, 2, 0, b'a', b'b', b'{', b'}']), None);
        // A huge declared length is refused, not allocated.
        let mut huge = MAGIC.to_vec();
        huge.extend_from_slice(&[0; 8]);
        huge.extend_from_slice(&[0, 0]);
        huge.extend_from_slice(&u64::MAX.to_le_bytes());
        assert_eq!(decode(&huge), None);
    }

    #[test]
    fn the_stored_value_never_holds_the_credential() {
        let req = [(":method", "POST"), ("k", "p1"), ("x-api-key", "sk-very-secret")];
        let i = Identity::of_request("k", "/v1/messages", Some("acme"), headers(&req)).unwrap();
        let bytes = encode(&i, &entry(1, "{}"));
        assert!(!bytes.windows(b"sk-very-secret".len()).any(|w| w == b"sk-very-secret"));
        assert!(bytes.windows(4).any(|w| w == b"acme"), "the tenant is kept as is");
    }

    #[test]
    fn entries_expire_by_age() {
        let e = entry(1_000, "");
        assert!(e.fresh(at(1_500), ms(500)));
        assert!(!e.fresh(at(1_501), ms(500)));
        assert!(e.fresh(at(0), ms(500)), "a clock that went backwards is not an age");
    }

    #[test]
    fn only_the_same_identity_gets_an_answer_and_the_newest_wins() {
        let me = id("p1", Some("acme"), Some("sk-a"));
        let read = vec![
            Some((id("p1", Some("acme"), Some("sk-b")), entry(900, "other credential"))),
            Some((id("p1", Some("evil"), Some("sk-a")), entry(900, "other tenant"))),
            Some((id("p1", Some("acme"), None), entry(900, "no credential"))),
            None,
        ];
        assert_eq!(answer(read.clone(), &me, at(1_000), ms(HOUR)), None);
        let mut with_mine = read;
        with_mine.push(Some((me.clone(), entry(500, "older"))));
        with_mine.push(Some((me.clone(), entry(800, "newer"))));
        assert_eq!(answer(with_mine.clone(), &me, at(1_000), ms(HOUR)), Some(entry(800, "newer")));
        assert_eq!(answer(with_mine, &me, at(1_000), ms(100)), None, "both too old");
    }

    #[test]
    fn a_store_reuses_its_own_slot_then_a_free_one_then_the_oldest() {
        let me = id("p1", None, None);
        let other = |ms, b| Some((id(b, None, None), entry(ms, b)));
        let now = 10 * HOUR;
        // Its own slot, even when an empty one comes first.
        assert_eq!(victim(&[None, other(now, "a"), Some((me.clone(), entry(now, "old")))], &me, at(now), ms(HOUR)), 2);
        // Else the first empty, unreadable or expired one.
        assert_eq!(victim(&[other(now, "a"), None, None], &me, at(now), ms(HOUR)), 1);
        assert_eq!(victim(&[other(now, "a"), other(now - 2 * HOUR, "b"), None], &me, at(now), ms(HOUR)), 1);
        // Else the oldest.
        assert_eq!(victim(&[other(now - 5, "a"), other(now - 9, "b"), other(now - 1, "c")], &me, at(now), ms(HOUR)), 1);
        assert_eq!(victim(&[other(now, "a")], &me, at(now), ms(HOUR)), 0);
    }

    #[test]
    fn another_tenant_or_credential_never_reads_a_cached_answer() {
        let s = MemStore::default();
        let mine = id("p1", Some("acme"), Some("Bearer sk-a"));
        store(&s, "p", &mine, &entry(1_000, "mine"), 100, ms(HOUR)).unwrap();
        assert_eq!(lookup(&s, "p", &mine, at(2_000), 100, ms(HOUR)), Ok(Some(entry(1_000, "mine"))));
        for other in [
            id("p1", Some("evil"), Some("Bearer sk-a")),
            id("p1", None, Some("Bearer sk-a")),
            id("p1", Some("acme"), Some("Bearer sk-b")),
            id("p1", Some("acme"), None),
            id("p1", None, None),
            Identity { path: "/v1/other".into(), ..mine.clone() },
        ] {
            assert_eq!(lookup(&s, "p", &other, at(2_000), 100, ms(HOUR)), Ok(None), "{other:?}");
        }
        // Another cache name is another table.
        assert_eq!(lookup(&s, "q", &mine, at(2_000), 100, ms(HOUR)), Ok(None));
        // Too old.
        assert_eq!(lookup(&s, "p", &mine, at(1_000 + HOUR + 1), 100, ms(HOUR)), Ok(None));
    }

    #[test]
    fn identities_sharing_a_slot_never_get_each_others_answer() {
        // One slot: every identity has the same (only) candidate, as a hash collision would.
        let s = MemStore::default();
        let (a, b) = (id("p1", None, Some("sk-a")), id("p1", None, Some("sk-b")));
        store(&s, "p", &a, &entry(1_000, "a"), 1, ms(HOUR)).unwrap();
        assert_eq!(lookup(&s, "p", &b, at(1_000), 1, ms(HOUR)), Ok(None));
        store(&s, "p", &b, &entry(2_000, "b"), 1, ms(HOUR)).unwrap();
        assert_eq!(lookup(&s, "p", &a, at(2_000), 1, ms(HOUR)), Ok(None), "evicted by b");
        assert_eq!(lookup(&s, "p", &b, at(2_000), 1, ms(HOUR)), Ok(Some(entry(2_000, "b"))));
    }

    #[test]
    fn the_table_never_grows_past_its_slots_and_keeps_recent_entries() {
        let s = Keys::default();
        let slots = 16;
        for n in 0..1_000u64 {
            store(&s, "p", &id(&n.to_string(), None, None), &entry(n, "x"), slots, ms(HOUR)).unwrap();
        }
        let written = s.written.borrow();
        assert!(written.len() <= slots, "{written:?}");
        assert!(written.iter().all(|k| k.starts_with("llm_ratelimit/p/cache/")));
        // The newest entry is always kept; among the last few most still are.
        let hit =
            |n: u64| lookup(&s, "p", &id(&n.to_string(), None, None), at(1_000), slots, ms(HOUR)).unwrap().is_some();
        assert!(hit(999));
        assert!((990..1_000).filter(|&n| hit(n)).count() >= 5);
        assert!(!hit(0), "long evicted");
    }

    #[test]
    fn storing_the_same_identity_again_replaces_it() {
        let s = Keys::default();
        let me = id("p1", Some("acme"), None);
        for t in 1..=20 {
            store(&s, "p", &me, &entry(t, &t.to_string()), 100, ms(HOUR)).unwrap();
        }
        assert_eq!(s.written.borrow().len(), 1, "one slot, rewritten");
        assert_eq!(lookup(&s, "p", &me, at(20), 100, ms(HOUR)), Ok(Some(entry(20, "20"))));
    }

    #[test]
    fn a_full_table_evicts_the_oldest() {
        let s = MemStore::default();
        let (a, b, c) = (id("a", None, None), id("b", None, None), id("c", None, None));
        // Two slots, so every identity's candidates are both of them.
        store(&s, "p", &b, &entry(10, "b"), 2, ms(HOUR)).unwrap();
        store(&s, "p", &a, &entry(5, "a"), 2, ms(HOUR)).unwrap();
        store(&s, "p", &c, &entry(20, "c"), 2, ms(HOUR)).unwrap();
        assert_eq!(lookup(&s, "p", &a, at(20), 2, ms(HOUR)), Ok(None));
        assert_eq!(lookup(&s, "p", &b, at(20), 2, ms(HOUR)), Ok(Some(entry(10, "b"))));
        assert_eq!(lookup(&s, "p", &c, at(20), 2, ms(HOUR)), Ok(Some(entry(20, "c"))));
    }

    #[test]
    fn garbage_in_a_slot_is_a_miss_and_a_free_slot() {
        let s = MemStore::default();
        let me = id("p1", None, None);
        for slot in candidates(me.slot_hash(), 8) {
            s.set(&slot_key("p", slot), b"\x01\x02garbage", 0).unwrap();
        }
        assert_eq!(lookup(&s, "p", &me, at(0), 8, ms(HOUR)), Ok(None));
        store(&s, "p", &me, &entry(5, "ok"), 8, ms(HOUR)).unwrap();
        assert_eq!(lookup(&s, "p", &me, at(5), 8, ms(HOUR)), Ok(Some(entry(5, "ok"))));
    }

    /// A store where, once, another worker writes `theirs` to the slot we are about to write.
    struct Racing {
        mem: MemStore,
        theirs: RefCell<Option<Vec<u8>>>,
    }
    impl Store for Racing {
        fn get(&self, key: &str) -> Result<(Option<Vec<u8>>, u32), Status> {
            self.mem.get(key)
        }
        fn set(&self, key: &str, value: &[u8], cas: u32) -> Result<(), Status> {
            if let Some(theirs) = self.theirs.borrow_mut().take() {
                self.mem.set(key, &theirs, 0)?;
            }
            self.mem.set(key, value, cas)
        }
    }

    #[test]
    fn a_slot_another_worker_took_first_is_chosen_again() {
        let (me, them) = (id("me", None, None), id("them", None, None));
        // A first write so our chosen slot exists and has a CAS token to lose.
        let s = Racing { mem: MemStore::default(), theirs: RefCell::new(None) };
        for slot in candidates(me.slot_hash(), 100) {
            s.mem.set(&slot_key("p", slot), &encode(&id("x", None, None), &entry(0, "expired")), 0).unwrap();
        }
        *s.theirs.borrow_mut() = Some(encode(&them, &entry(2 * HOUR, "theirs")));
        store(&s, "p", &me, &entry(2 * HOUR, "mine"), 100, ms(HOUR)).unwrap();
        assert_eq!(lookup(&s, "p", &me, at(2 * HOUR), 100, ms(HOUR)), Ok(Some(entry(2 * HOUR, "mine"))));
        // Theirs was not overwritten: the retry saw it and took another expired slot.
        let kept = candidates(me.slot_hash(), 100)
            .into_iter()
            .filter_map(|slot| decode(&s.mem.get(&slot_key("p", slot)).unwrap().0?))
            .any(|(i, _)| i == them);
        assert!(kept);
    }

    #[test]
    fn lost_cas_is_retried_and_host_failures_are_errors() {
        let s = MemStore::default();
        let me = id("p1", None, None);
        store(&s, "p", &me, &entry(1, "a"), 10, ms(HOUR)).unwrap();
        s.conflicts.set(3);
        store(&s, "p", &me, &entry(2, "b"), 10, ms(HOUR)).unwrap();
        assert_eq!(lookup(&s, "p", &me, at(2), 10, ms(HOUR)), Ok(Some(entry(2, "b"))));
        s.conflicts.set(1_000);
        assert_eq!(store(&s, "p", &me, &entry(3, "c"), 10, ms(HOUR)), Err(CAS_MISMATCH));
        s.conflicts.set(0);
        s.broken.set(true);
        assert_eq!(store(&s, "p", &me, &entry(4, "d"), 10, ms(HOUR)), Err(INTERNAL_FAILURE));
        assert_eq!(lookup(&s, "p", &me, at(4), 10, ms(HOUR)), Err(INTERNAL_FAILURE));
    }
}
