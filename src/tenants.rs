//! Bounded per-tenant buckets: every tenant (a value of the tenant header) spends from its own
//! token bucket, kept in a FIXED table of shared-data slots, so no header value can mint tokens.
//!
//! Limits nest: a request needs a token from its tenant's bucket (this module) and then from the
//! provider-wide bucket (admission). When the provider refuses, the host gives the tenant's token
//! back with [`refund`].
//!
//! # The table
//!
//! `rules.slots` values `<prefix>/tenant/<slot>` (`prefix` is `llm_ratelimit/<name>`), plus one
//! shared overflow bucket `<prefix>/tenant/overflow`. A slot holds a tenant's identity (the value
//! itself when it is at most 64 printable bytes, else a marked 64-bit hash) and its bucket state.
//! A tenant may live in a few candidate slots chosen by `stable_hash` (open addressing); lookups
//! compare identities, so two tenants whose candidates collide never share a bucket.
//!
//! A request takes its token from the first candidate that holds its tenant. A tenant without a
//! slot claims the first candidate that is empty or IDLE (its bucket refilled to full by now: its
//! tenant loses nothing, since a returning tenant gets a full bucket anyway) and starts with a
//! full bucket. When every candidate is held by an active tenant, the request spends from the
//! overflow bucket, which has the tenant limits and is shared by all such tenants. So rotating
//! the header value cannot mint tokens: everything granted comes from `slots + 1` buckets, each
//! at most full plus its refill, whatever the number of header values.
//!
//! Every change is a compare-and-swap of one slot; a conflict (another worker wrote first) makes
//! the request decide again from a fresh read. After a claim, the request checks that no other
//! worker claimed an earlier candidate for the same tenant meanwhile; if one did, it gives the
//! claimed slot its token back and spends from the earlier one, so a tenant spends from one
//! bucket even when its first requests race on several workers. (Only a claim of the earlier
//! candidate that lands after this check can leave a second slot behind; the tenant then still
//! spends from the earlier one, and the later one holds the single token it granted until it
//! refills and is displaced: at most one extra token per such race, never a fresh bucket.)
//!
//! The host calls [`ensure`] from `on_configure` (before traffic): Envoy's CAS cannot guard a key
//! that does not exist yet, so two workers claiming a missing slot at once would both succeed.
//!
//! # Configuration (proposal for `config.rs`)
//!
//! ```json
//! "tenant": {"key_header": "x-llm-tenant", "capacity": 10, "refill_rate": 1, "burst_allowance": 0, "slots": 4096}
//! ```
//!
//! The whole `tenant` object is optional; without it there are no tenant buckets. Inside it every
//! field is optional, with the defaults shown: `key_header` a header name (lower-cased);
//! `capacity` a whole number >= 1; `refill_rate` a number > 0 (tokens per second, per tenant);
//! `burst_allowance` a whole number >= 0 (spent only by classes with `use_burst`, as in the
//! provider bucket); `slots` a whole number from 1 to 65536 ([`DEFAULT_SLOTS`]). These limits are
//! apart from the provider's `bucket`, which bounds all tenants together.
//!
//! ```
//! use llm_ratelimit::bucket::BucketRules;
//! use llm_ratelimit::store::MemStore;
//! use llm_ratelimit::tenants::{self, Slot, TenantRules, TenantTake};
//! use llm_ratelimit::time::{Duration, Instant};
//! let store = MemStore::default();
//! let rules = TenantRules { bucket: BucketRules::capacity(2).refill_rate(1.0), slots: 16 };
//! tenants::ensure(&store, "llm_ratelimit/openai", &rules, Instant::ZERO).unwrap();
//! let first = tenants::take(&store, "llm_ratelimit/openai", &rules, "acme", false, Instant::ZERO).unwrap();
//! assert!(first.claimed && matches!(first.take, TenantTake::Taken { slot: Slot::Table(_) }));
//! tenants::take(&store, "llm_ratelimit/openai", &rules, "acme", false, Instant::ZERO).unwrap();
//! let third = tenants::take(&store, "llm_ratelimit/openai", &rules, "acme", false, Instant::ZERO).unwrap();
//! assert!(matches!(third.take, TenantTake::Short { wait, .. } if wait == Duration::from_secs(1)));
//! ```

use crate::bucket::{BucketRules, Level};
use crate::hash::{slot_draw, stable_hash};
use crate::store::{self, Status, Store, Stored, CAS_MISMATCH};
use crate::time::{Duration, Instant};

/// Slots when the configuration names none.
pub const DEFAULT_SLOTS: u32 = 4096;
/// Candidate slots per tenant.
pub const CANDIDATES: u64 = 4;
/// Longest tenant value stored as itself; longer or unprintable values are stored hashed.
const MAX_PLAIN_LEN: usize = 64;
/// First byte of every value this module writes, so foreign bytes read as empty.
const MAGIC: u8 = 0x54;
const KIND_EMPTY: u8 = 0;
const KIND_PLAIN: u8 = 1;
const KIND_HASHED: u8 = 2;
const KIND_OVERFLOW: u8 = 3;
/// Slack for float rounding, as in `BucketRules::take`.
const EPSILON: f64 = 1e-9;

/// Tenant limits, fixed by the configuration.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TenantRules {
    /// Every tenant's bucket, and the overflow bucket's.
    pub bucket: BucketRules,
    /// Size of the table. 0 puts every tenant in the overflow bucket.
    pub slots: u32,
}

/// Where a tenant's token came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Slot {
    /// Its own bucket, in this slot of the table.
    Table(u32),
    /// The shared overflow bucket: every candidate slot was held by an active tenant.
    Overflow,
}

/// The tenant side of admission.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum TenantTake {
    /// A token was taken from `slot`; give it back with [`refund`] if the request goes no further.
    Taken { slot: Slot },
    /// The tenant's bucket (or the overflow) has no token for this request for `wait`.
    Short { slot: Slot, wait: Duration },
}

/// What [`take`] did, with the flags the host counts as stats.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TakeOutcome {
    pub take: TenantTake,
    /// The tenant had no slot and this request gave it one.
    pub claimed: bool,
    /// ... and that slot belonged to another, idle tenant (implies `claimed`).
    pub displaced: bool,
}

impl TakeOutcome {
    pub fn slot(&self) -> Slot {
        match self.take {
            TenantTake::Taken { slot } | TenantTake::Short { slot, .. } => slot,
        }
    }

    /// Whether the request was decided by the shared overflow bucket.
    pub fn overflow(&self) -> bool {
        self.slot() == Slot::Overflow
    }
}

/// Slot occupancy, for gauges.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Census {
    /// Slots holding a tenant.
    pub used: u32,
    /// Slots holding a tenant whose bucket is not full (cannot be displaced now).
    pub active: u32,
}

pub fn slot_key(prefix: &str, slot: u32) -> String {
    format!("{prefix}/tenant/{slot}")
}

pub fn overflow_key(prefix: &str) -> String {
    format!("{prefix}/tenant/overflow")
}

/// Creates the table's values (empty slots, a full overflow bucket) where there is no readable
/// one. Call before traffic (`on_configure`): see the module notes.
pub fn ensure(store: &impl Store, prefix: &str, rules: &TenantRules, now: Instant) -> Result<(), Status> {
    for slot in 0..rules.slots {
        store::ensure(store, &slot_key(prefix, slot), SlotValue::Empty)?;
    }
    store::ensure(store, &overflow_key(prefix), Overflow(rules.bucket.full(now)))
}

/// Takes one token for `tenant` at `now` (Unix epoch ns): from its slot, from a slot it claims,
/// or from the overflow bucket. `use_burst` lets the request's class spend the burst reserve.
/// `Err` is a store failure, or other workers winning the CAS every time.
pub fn take(
    store: &impl Store,
    prefix: &str,
    rules: &TenantRules,
    tenant: &str,
    use_burst: bool,
    now: Instant,
) -> Result<TakeOutcome, Status> {
    let b = &rules.bucket;
    let floor = b.reserve_floor(use_burst);
    let id = Identity::of(tenant);
    let candidates = candidates(tenant, rules.slots);
    let done = |take, claimed, displaced| Ok(TakeOutcome { take, claimed, displaced });
    // One round per decision: a lost write makes it again on what the winner wrote.
    for _ in 0..store::MAX_CAS_TRIES {
        match scan(store, prefix, rules, &id, &candidates, now)? {
            Scan::Found { slot, cas, state } => {
                let at = Slot::Table(slot);
                match b.take(state, now, 1.0, floor) {
                    Err(wait) => {
                        if b.stepped_back(state, now) {
                            // Best effort: the count restarts from the new clock, not the old one.
                            let rebased = SlotValue::held(&id, b.refill(state, now));
                            write(store, &slot_key(prefix, slot), &rebased, cas)?;
                        }
                        return done(TenantTake::Short { slot: at, wait }, false, false);
                    }
                    Ok(next) => {
                        if write(store, &slot_key(prefix, slot), &SlotValue::held(&id, next), cas)? {
                            return done(TenantTake::Taken { slot: at }, false, false);
                        }
                    }
                }
            }
            Scan::Claim { slot, cas, displaced } => {
                let at = Slot::Table(slot);
                let full = b.full(now);
                // Only a bucket configured too small for one token refuses a newcomer.
                let Ok(next) = b.take(full, now, 1.0, floor) else {
                    return done(TenantTake::Short { slot: at, wait: b.wait(full, 1.0, floor) }, false, false);
                };
                if !write(store, &slot_key(prefix, slot), &SlotValue::held(&id, next), cas)? {
                    continue;
                }
                if held_earlier(store, prefix, &id, &candidates, slot)? {
                    // Another worker claimed an earlier candidate for this tenant meanwhile: that
                    // one is the tenant's bucket. Put this one back to full and spend from it.
                    refund_slot(store, prefix, rules, &id, slot, now)?;
                    continue;
                }
                return done(TenantTake::Taken { slot: at }, true, displaced);
            }
            Scan::Full => {
                let taken = store::update(
                    store,
                    &overflow_key(prefix),
                    || Overflow(b.full(now)),
                    |Overflow(s)| match b.take(s, now, 1.0, floor) {
                        Ok(next) => (Ok(()), Some(Overflow(next))),
                        Err(wait) => (Err(wait), b.stepped_back(s, now).then(|| Overflow(b.refill(s, now)))),
                    },
                )?;
                let take = match taken {
                    Ok(()) => TenantTake::Taken { slot: Slot::Overflow },
                    Err(wait) => TenantTake::Short { slot: Slot::Overflow, wait },
                };
                return done(take, false, false);
            }
        }
    }
    Err(CAS_MISMATCH)
}

/// Gives back the token `take` took from `slot` for `tenant` (the provider-wide bucket then
/// refused the request). Never fills a bucket above its maximum. `Ok(false)`: the slot now
/// belongs to another tenant (or does not exist), and nothing changed.
pub fn refund(
    store: &impl Store,
    prefix: &str,
    rules: &TenantRules,
    tenant: &str,
    slot: Slot,
    now: Instant,
) -> Result<bool, Status> {
    match slot {
        Slot::Table(i) if i < rules.slots => refund_slot(store, prefix, rules, &Identity::of(tenant), i, now),
        Slot::Table(_) => Ok(false),
        Slot::Overflow => {
            let b = &rules.bucket;
            store::update(
                store,
                &overflow_key(prefix),
                || Overflow(b.full(now)),
                |Overflow(s)| {
                    let next = plus_one(b, s, now);
                    (true, (next != s).then_some(Overflow(next)))
                },
            )
        }
    }
}

/// Counts the used and active slots (reads the whole table: for a timer, not per request).
pub fn census(store: &impl Store, prefix: &str, rules: &TenantRules, now: Instant) -> Result<Census, Status> {
    let mut c = Census::default();
    for slot in 0..rules.slots {
        if let Some(SlotValue::Held { state, .. }) = store::read::<SlotValue>(store, &slot_key(prefix, slot))? {
            c.used += 1;
            if !idle(&rules.bucket, state, now) {
                c.active += 1;
            }
        }
    }
    Ok(c)
}

/// Who holds a slot: the tenant value itself when short and printable, else its hash. The kind
/// is part of the identity, so a short value never equals a hashed one.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Identity {
    Plain(Vec<u8>),
    Hashed(u64),
}

impl Identity {
    fn of(tenant: &str) -> Identity {
        if tenant.len() <= MAX_PLAIN_LEN && tenant.bytes().all(|c| c.is_ascii_graphic()) {
            Identity::Plain(tenant.as_bytes().to_vec())
        } else {
            Identity::Hashed(stable_hash(&["tenant-identity", tenant]))
        }
    }
}

/// One slot of the table.
#[derive(Clone, Debug, PartialEq)]
enum SlotValue {
    Empty,
    Held { id: Identity, state: Level },
}

impl SlotValue {
    fn held(id: &Identity, state: Level) -> SlotValue {
        SlotValue::Held { id: id.clone(), state }
    }
}

/// `[MAGIC, KIND_EMPTY]`, `[MAGIC, KIND_PLAIN, len, value.., state]` or
/// `[MAGIC, KIND_HASHED, hash (8, LE), state]`, `state` being `bucket::Level`'s 16 bytes.
impl Stored for SlotValue {
    fn to_bytes(&self) -> Vec<u8> {
        match self {
            SlotValue::Empty => vec![MAGIC, KIND_EMPTY],
            SlotValue::Held { id: Identity::Plain(v), state } => {
                // `Identity::of` keeps plain values at most MAX_PLAIN_LEN (64) bytes long.
                let mut out = vec![MAGIC, KIND_PLAIN, v.len().min(MAX_PLAIN_LEN) as u8];
                out.extend(v.iter().take(MAX_PLAIN_LEN));
                out.extend(state.encode());
                out
            }
            SlotValue::Held { id: Identity::Hashed(h), state } => {
                let mut out = vec![MAGIC, KIND_HASHED];
                out.extend(h.to_le_bytes());
                out.extend(state.encode());
                out
            }
        }
    }

    fn from_bytes(b: &[u8]) -> Option<SlotValue> {
        let (&magic, rest) = b.split_first()?;
        let (&kind, rest) = rest.split_first()?;
        if magic != MAGIC {
            return None;
        }
        let (id, state) = match kind {
            KIND_EMPTY => return rest.is_empty().then_some(SlotValue::Empty),
            KIND_PLAIN => {
                let (&len, rest) = rest.split_first()?;
                let (value, state) = rest.split_at_checked(len as usize)?;
                let printable = value.len() <= MAX_PLAIN_LEN && value.iter().all(|c| c.is_ascii_graphic());
                (printable.then(|| Identity::Plain(value.to_vec()))?, state)
            }
            KIND_HASHED => {
                let (hash, state) = rest.split_at_checked(8)?;
                (Identity::Hashed(u64::from_le_bytes(hash.try_into().ok()?)), state)
            }
            _ => return None,
        };
        // `Level::decode` insists on exactly 16 bytes, so trailing bytes are garbage too.
        Some(SlotValue::Held { id, state: Level::decode(state)? })
    }
}

/// The overflow bucket's value: `[MAGIC, KIND_OVERFLOW, state]`.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Overflow(Level);

impl Stored for Overflow {
    fn to_bytes(&self) -> Vec<u8> {
        let mut out = vec![MAGIC, KIND_OVERFLOW];
        out.extend(self.0.encode());
        out
    }

    fn from_bytes(b: &[u8]) -> Option<Overflow> {
        match b {
            [MAGIC, KIND_OVERFLOW, state @ ..] => Level::decode(state).map(Overflow),
            _ => None,
        }
    }
}

/// A tenant's candidate slots, in the order they are tried, without repeats.
///
/// Not one helper with `fallback::candidates`: both draw with `hash::slot_draw`, but their rules
/// differ where a merge would change behaviour. Here draws 1 to 4 are taken and a repeat is
/// dropped (a tenant may have fewer than 4 candidates), where the cache takes draws 0 to 3 and
/// moves a repeat to the next free slot: one rule for both would move every tenant (or every
/// cached entry) to other slots of the live shared data across an upgrade, losing buckets. And on
/// a collision a tenant never displaces an active tenant (it spends from the overflow bucket:
/// taking the slot would hand out a fresh bucket, minting tokens), where the cache overwrites its
/// oldest entry (losing a cached answer costs nothing but a miss).
fn candidates(tenant: &str, slots: u32) -> Vec<u32> {
    let mut out = Vec::with_capacity(CANDIDATES as usize);
    if slots == 0 {
        return out;
    }
    let h = stable_hash(&["tenant-slot", tenant]);
    for i in 1..=CANDIDATES {
        let slot = slot_draw(h, i, u64::from(slots)) as u32;
        if !out.contains(&slot) {
            out.push(slot);
        }
    }
    out
}

/// A bucket refilled to full by `now`: its tenant loses nothing if it is displaced.
fn idle(b: &BucketRules, s: Level, now: Instant) -> bool {
    b.refill(s, now).tokens >= b.max - EPSILON
}

/// `s` at `now` with one token given back, capped at the bucket's maximum.
fn plus_one(b: &BucketRules, s: Level, now: Instant) -> Level {
    let s = b.refill(s, now);
    Level { tokens: (s.tokens + 1.0).min(b.max), ..s }
}

/// What a read of the candidates found.
enum Scan {
    /// The tenant's bucket, as read with CAS value `cas`.
    Found { slot: u32, cas: u32, state: Level },
    /// The tenant has no slot; this one, as read with `cas`, is the first it may claim.
    Claim { slot: u32, cas: u32, displaced: bool },
    /// The tenant has no slot and every candidate is held by an active tenant.
    Full,
}

fn scan(
    store: &impl Store,
    prefix: &str,
    rules: &TenantRules,
    id: &Identity,
    candidates: &[u32],
    now: Instant,
) -> Result<Scan, Status> {
    let mut claim = None;
    for &slot in candidates {
        let (bytes, cas) = store.get(&slot_key(prefix, slot))?;
        match bytes.and_then(|b| SlotValue::from_bytes(&b)).unwrap_or(SlotValue::Empty) {
            SlotValue::Held { id: held, state } if held == *id => return Ok(Scan::Found { slot, cas, state }),
            SlotValue::Empty if claim.is_none() => claim = Some(Scan::Claim { slot, cas, displaced: false }),
            SlotValue::Held { state, .. } if claim.is_none() && idle(&rules.bucket, state, now) => {
                claim = Some(Scan::Claim { slot, cas, displaced: true })
            }
            _ => {}
        }
    }
    Ok(claim.unwrap_or(Scan::Full))
}

/// Whether a candidate tried before `slot` holds the tenant.
fn held_earlier(
    store: &impl Store,
    prefix: &str,
    id: &Identity,
    candidates: &[u32],
    slot: u32,
) -> Result<bool, Status> {
    for &earlier in candidates.iter().take_while(|&&c| c != slot) {
        if let Some(SlotValue::Held { id: held, .. }) = store::read::<SlotValue>(store, &slot_key(prefix, earlier))? {
            if held == *id {
                return Ok(true);
            }
        }
    }
    Ok(false)
}

fn refund_slot(
    store: &impl Store,
    prefix: &str,
    rules: &TenantRules,
    id: &Identity,
    slot: u32,
    now: Instant,
) -> Result<bool, Status> {
    store::update(
        store,
        &slot_key(prefix, slot),
        || SlotValue::Empty,
        |v| match v {
            SlotValue::Held { id: held, state } if held == *id => {
                let next = plus_one(&rules.bucket, state, now);
                (true, (next != state).then_some(SlotValue::Held { id: held, state: next }))
            }
            _ => (false, None),
        },
    )
}

/// Writes `value` unless the key changed since it was read with `cas`: `Ok(false)` then.
fn write(store: &impl Store, key: &str, value: &SlotValue, cas: u32) -> Result<bool, Status> {
    match store.set(key, &value.to_bytes(), cas) {
        Ok(()) => Ok(true),
        Err(CAS_MISMATCH) => Ok(false),
        Err(s) => Err(s),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{MemStore, INTERNAL_FAILURE};
    use std::cell::RefCell;
    use std::collections::HashMap;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    const SEC: Duration = Duration::from_secs(1);
    const MS: Duration = Duration::from_millis(1);
    const P: &str = "llm_ratelimit/test";
    /// An epoch-like start, so nothing relies on time starting at 0.
    const T0: Instant = Instant::from_nanos(1_700_000_000 * 1_000_000_000);

    fn rules(capacity: u64, rate: f64, slots: u32) -> TenantRules {
        TenantRules { bucket: BucketRules::capacity(capacity).refill_rate(rate), slots }
    }

    fn table(r: &TenantRules) -> MemStore {
        let s = MemStore::default();
        ensure(&s, P, r, T0).unwrap();
        s
    }

    fn take_at(s: &impl Store, r: &TenantRules, tenant: &str, now: Instant) -> TakeOutcome {
        take(s, P, r, tenant, false, now).unwrap()
    }

    fn taken(o: &TakeOutcome) -> bool {
        matches!(o.take, TenantTake::Taken { .. })
    }

    /// Takes single tokens for `tenant` at `now` until refused; returns how many were taken.
    fn drain(s: &impl Store, r: &TenantRules, tenant: &str, now: Instant) -> u32 {
        let mut n = 0;
        while taken(&take_at(s, r, tenant, now)) {
            n += 1;
        }
        n
    }

    /// A tenant name whose candidates (for `slots`) are exactly `want`, in that order.
    fn tenant_with(slots: u32, want: &[u32]) -> String {
        (0..100_000).map(|i| format!("t{i}")).find(|t| candidates(t, slots) == want).unwrap()
    }

    #[test]
    fn a_tenants_limit_holds_and_refills() {
        let r = rules(3, 1.0, 16);
        let s = table(&r);
        assert_eq!(drain(&s, &r, "acme", T0), 3);
        let o = take_at(&s, &r, "acme", T0);
        assert!(matches!(o.take, TenantTake::Short { slot: Slot::Table(_), wait: SEC }), "{o:?}");
        assert_eq!(drain(&s, &r, "acme", T0 + 2 * SEC), 2);
        assert_eq!(drain(&s, &r, "acme", T0 + 100 * SEC), 3);
    }

    #[test]
    fn two_tenants_are_independent() {
        let r = rules(3, 1.0, 16);
        let s = table(&r);
        assert_eq!(drain(&s, &r, "acme", T0), 3);
        assert_eq!(drain(&s, &r, "globex", T0), 3);
        assert_ne!(take_at(&s, &r, "acme", T0).slot(), take_at(&s, &r, "globex", T0).slot());
        assert_eq!(census(&s, P, &r, T0).unwrap(), Census { used: 2, active: 2 });
    }

    #[test]
    fn a_newcomer_claims_an_empty_slot_with_a_full_bucket() {
        let r = rules(2, 1.0, 16);
        let s = table(&r);
        let first = take_at(&s, &r, "acme", T0);
        assert!(first.claimed && !first.displaced && !first.overflow(), "{first:?}");
        let second = take_at(&s, &r, "acme", T0);
        assert!(!second.claimed && second.slot() == first.slot(), "{second:?}");
        assert!(!taken(&take_at(&s, &r, "acme", T0)));
    }

    #[test]
    fn a_table_full_of_active_tenants_sends_newcomers_to_one_overflow_bucket() {
        // One slot: every tenant's only candidate is slot 0.
        let r = rules(2, 1.0, 1);
        let s = table(&r);
        assert_eq!(take_at(&s, &r, "a", T0).take, TenantTake::Taken { slot: Slot::Table(0) });
        for tenant in ["b", "c"] {
            let o = take_at(&s, &r, tenant, T0);
            assert!(o.overflow() && taken(&o) && !o.claimed, "{o:?}");
        }
        // The overflow holds as one limit for all the tenants in it.
        let o = take_at(&s, &r, "d", T0);
        assert_eq!(o.take, TenantTake::Short { slot: Slot::Overflow, wait: SEC });
        assert!(!taken(&take_at(&s, &r, "b", T0)));
        // The slot's tenant still has its own token.
        assert_eq!(take_at(&s, &r, "a", T0).take, TenantTake::Taken { slot: Slot::Table(0) });
    }

    #[test]
    fn an_idle_full_slot_is_displaced_and_its_tenant_loses_nothing() {
        let r = rules(2, 1.0, 1);
        let s = table(&r);
        assert!(taken(&take_at(&s, &r, "a", T0)));
        assert!(take_at(&s, &r, "b", T0).overflow(), "a is active: b overflows");
        // A second later a's bucket is full again: b takes the slot.
        let o = take_at(&s, &r, "b", T0 + SEC);
        assert_eq!((o.take, o.claimed, o.displaced), (TenantTake::Taken { slot: Slot::Table(0) }, true, true));
        assert!(take_at(&s, &r, "a", T0 + SEC).overflow(), "b is active now");
        // Once b is idle, a comes back to a full bucket: exactly what it had when displaced.
        let o = take_at(&s, &r, "a", T0 + 10 * SEC);
        assert!(o.displaced, "{o:?}");
        assert_eq!(drain(&s, &r, "a", T0 + 10 * SEC), 1);
    }

    #[test]
    fn an_active_slot_is_never_displaced() {
        let r = rules(2, 1.0, 1);
        let s = table(&r);
        assert!(taken(&take_at(&s, &r, "a", T0)));
        // 0.999 s later a is still one token short of full.
        for (i, tenant) in ["b", "c", "d"].iter().enumerate() {
            let o = take_at(&s, &r, tenant, T0 + 999 * MS);
            assert!(o.overflow() && !o.displaced, "{i}: {o:?}");
        }
        assert_eq!(take_at(&s, &r, "a", T0 + 999 * MS).slot(), Slot::Table(0));
    }

    #[test]
    fn rotating_tenant_values_cannot_mint_tokens() {
        let slots = 8;
        let r = rules(2, 1.0, slots);
        let s = table(&r);
        // 1000 distinct values, two requests each, all at once: the table's buckets plus the
        // overflow, and not a token more.
        let granted: u32 = (0..1000).map(|i| drain(&s, &r, &format!("rot-{i}"), T0).min(2)).sum();
        assert_eq!(granted, (slots + 1) * 2);
        // The same over ten seconds: at most (slots + 1) buckets' capacity plus their refill.
        let r = rules(2, 1.0, slots);
        let s = table(&r);
        let mut granted = 0u32;
        for i in 0..1000u64 {
            let now = T0 + i * 10 * MS;
            granted += (0..3).filter(|_| taken(&take_at(&s, &r, &format!("rot-{i}"), now))).count() as u32;
        }
        let elapsed_s = 10.0;
        let bound = f64::from(slots + 1) * (2.0 + 1.0 * elapsed_s);
        assert!(f64::from(granted) <= bound, "{granted} > {bound}");
        // ... and the table did hand out its tokens: far more than the overflow alone.
        assert!(granted > 20, "{granted}");
    }

    #[test]
    fn a_colliding_identity_never_shares_a_bucket() {
        // One slot: every pair of tenants collides on slot choice.
        let r = rules(2, 1.0, 1);
        let s = table(&r);
        let long = "k".repeat(100);
        let (l1, l2) = (format!("{long}1"), format!("{long}2"));
        assert!(take_at(&s, &r, &l1, T0).claimed);
        assert!(take_at(&s, &r, &l2, T0).overflow(), "same slot, other tenant: not its bucket");
        assert_eq!(take_at(&s, &r, &l1, T0).slot(), Slot::Table(0));
        assert!(!taken(&take_at(&s, &r, &l1, T0)), "l1 spent its own two tokens");
        // Hashed and plain identities never compare equal, nor do unprintable look-alikes.
        assert_ne!(Identity::of(&l1), Identity::of(&l2));
        assert_ne!(Identity::of("a\u{1}"), Identity::of("a\u{2}"));
        assert!(matches!(Identity::of("a b"), Identity::Hashed(_)));
        let h = match Identity::of(&l1) {
            Identity::Hashed(h) => h,
            other => panic!("{other:?}"),
        };
        assert_ne!(Identity::of(&format!("{h:016x}")), Identity::of(&l1));
        assert_ne!(Identity::of(&"k".repeat(64)), Identity::of(&"k".repeat(65)));
    }

    #[test]
    fn cas_conflicts_are_retried_and_store_failures_are_errors() {
        let r = rules(3, 1.0, 4);
        let s = table(&r);
        s.conflicts.set(5);
        assert!(taken(&take_at(&s, &r, "acme", T0)));
        assert_eq!(s.conflicts.get(), 0);
        // Lost writes took nothing: two tokens are left.
        s.conflicts.set(2);
        assert_eq!(drain(&s, &r, "acme", T0), 2);
        // Conflicts on the overflow are retried too.
        let one = rules(1, 1.0, 1);
        let s = table(&one);
        assert!(taken(&take_at(&s, &one, "a", T0)));
        s.conflicts.set(3);
        assert!(take_at(&s, &one, "b", T0).overflow());
        assert!(!taken(&take_at(&s, &one, "c", T0)));
        // Other workers winning every time: an error, not a loop.
        s.conflicts.set(10_000);
        assert_eq!(take(&s, P, &one, "a", false, T0 + SEC), Err(CAS_MISMATCH));
        s.conflicts.set(0);
        s.broken.set(true);
        assert_eq!(take(&s, P, &one, "a", false, T0), Err(INTERNAL_FAILURE));
        assert_eq!(refund(&s, P, &one, "a", Slot::Table(0), T0), Err(INTERNAL_FAILURE));
        assert_eq!(refund(&s, P, &one, "a", Slot::Overflow, T0), Err(INTERNAL_FAILURE));
        assert_eq!(census(&s, P, &one, T0), Err(INTERNAL_FAILURE));
        assert_eq!(ensure(&s, P, &one, T0), Err(INTERNAL_FAILURE));
    }

    #[test]
    fn garbage_slot_values_read_as_empty() {
        let r = rules(2, 1.0, 1);
        let s = MemStore::default();
        s.set(&slot_key(P, 0), b"not a slot", 0).unwrap();
        s.set(&overflow_key(P), &[MAGIC, KIND_OVERFLOW, 1, 2, 3], 0).unwrap();
        let o = take_at(&s, &r, "a", T0);
        assert!(o.claimed && !o.displaced && o.slot() == Slot::Table(0), "{o:?}");
        // A garbage overflow is a full bucket.
        assert_eq!(drain(&s, &r, "b", T0), 2);
        // `ensure` replaces garbage and keeps what is readable.
        s.set(&slot_key(P, 0), b"junk", 0).unwrap();
        ensure(&s, P, &r, T0).unwrap();
        assert_eq!(store::read::<SlotValue>(&s, &slot_key(P, 0)), Ok(Some(SlotValue::Empty)));
        assert!(store::read::<Overflow>(&s, &overflow_key(P)).unwrap().is_some());
    }

    #[test]
    fn slot_values_round_trip_and_malformed_ones_are_rejected() {
        let state = Level { tokens: 1.5, at: T0 };
        let values = [
            SlotValue::Empty,
            SlotValue::held(&Identity::of("acme"), state),
            SlotValue::held(&Identity::of(""), state),
            SlotValue::held(&Identity::of(&"x".repeat(64)), state),
            SlotValue::held(&Identity::of(&"x".repeat(65)), state),
        ];
        for v in &values {
            assert_eq!(SlotValue::from_bytes(&v.to_bytes()).as_ref(), Some(v));
        }
        let good = values[1].to_bytes();
        assert_eq!(SlotValue::from_bytes(&[]), None);
        assert_eq!(SlotValue::from_bytes(&[MAGIC]), None);
        assert_eq!(SlotValue::from_bytes(&[MAGIC, KIND_EMPTY, 0]), None);
        assert_eq!(SlotValue::from_bytes(&[MAGIC, 9]), None);
        assert_eq!(SlotValue::from_bytes(&good[..good.len() - 1]), None);
        assert_eq!(SlotValue::from_bytes(&[good.as_slice(), &[0]].concat()), None);
        let mut wrong_magic = good.clone();
        wrong_magic[0] ^= 1;
        assert_eq!(SlotValue::from_bytes(&wrong_magic), None);
        let mut too_long = good.clone();
        too_long[2] = 200;
        assert_eq!(SlotValue::from_bytes(&too_long), None);
        let mut unprintable = good.clone();
        unprintable[3] = b'\n';
        assert_eq!(SlotValue::from_bytes(&unprintable), None);
        let nan = SlotValue::held(&Identity::of("acme"), Level { tokens: f64::NAN, at: Instant::ZERO }).to_bytes();
        assert_eq!(SlotValue::from_bytes(&nan), None);
        let o = Overflow(state);
        assert_eq!(Overflow::from_bytes(&o.to_bytes()), Some(o));
        assert_eq!(Overflow::from_bytes(&good), None);
    }

    #[test]
    fn a_clock_going_backwards_adds_nothing() {
        let r = rules(2, 1.0, 1);
        let s = table(&r);
        assert_eq!(drain(&s, &r, "a", T0 + 10 * SEC), 2);
        // A step back adds nothing, and the refill counts from the new clock (no stall).
        assert_eq!(drain(&s, &r, "a", T0 + 5 * SEC), 0);
        assert_eq!(drain(&s, &r, "a", T0 + 5 * SEC + SEC / 2), 0);
        assert_eq!(drain(&s, &r, "a", T0 + 6 * SEC), 1);
        // A bucket stamped in the future is not idle: no displacing it from an earlier clock.
        let o = take_at(&s, &r, "b", T0 + 5 * SEC);
        assert!(o.overflow() && !o.displaced, "{o:?}");
        assert_eq!(drain(&s, &r, "b", T0 + 5 * SEC), 1);
        assert_eq!(drain(&s, &r, "c", T0 + 2 * SEC), 0, "the overflow refills no more from an earlier clock");
        // Refunds from an earlier clock are still capped.
        assert_eq!(refund(&s, P, &r, "a", Slot::Table(0), T0), Ok(true));
        assert_eq!(drain(&s, &r, "a", T0), 1);
    }

    #[test]
    fn a_refund_goes_back_only_to_the_tenant_holding_the_slot_and_never_above_full() {
        let r = rules(2, 1.0, 1);
        let s = table(&r);
        let slot = take_at(&s, &r, "a", T0).slot();
        assert_eq!(refund(&s, P, &r, "a", slot, T0), Ok(true));
        assert_eq!(refund(&s, P, &r, "a", slot, T0), Ok(true), "already full: stays full");
        assert_eq!(drain(&s, &r, "a", T0), 2);
        // The slot passes to b once a is full again; a's late refund must not feed b.
        let b = take_at(&s, &r, "b", T0 + 5 * SEC);
        assert!(b.displaced && b.slot() == slot, "{b:?}");
        assert_eq!(refund(&s, P, &r, "a", slot, T0 + 5 * SEC), Ok(false));
        assert_eq!(drain(&s, &r, "b", T0 + 5 * SEC), 1);
        assert_eq!(refund(&s, P, &r, "b", Slot::Table(7), T0), Ok(false), "no such slot");
        // The overflow is refunded the same way, capped.
        let c = take_at(&s, &r, "c", T0 + 5 * SEC);
        assert!(c.overflow() && taken(&c));
        assert_eq!(refund(&s, P, &r, "c", Slot::Overflow, T0 + 5 * SEC), Ok(true));
        assert_eq!(refund(&s, P, &r, "c", Slot::Overflow, T0 + 5 * SEC), Ok(true));
        assert_eq!(drain(&s, &r, "c", T0 + 5 * SEC), 2);
    }

    #[test]
    fn burst_reserve_is_spent_only_by_burst_classes() {
        let r = TenantRules { bucket: BucketRules::capacity(2).refill_rate(1.0).burst_allowance(1), slots: 4 };
        let s = table(&r);
        assert_eq!(drain(&s, &r, "a", T0), 2);
        assert!(taken(&take(&s, P, &r, "a", true, T0).unwrap()));
        assert!(!taken(&take(&s, P, &r, "a", true, T0).unwrap()));
    }

    #[test]
    fn no_slots_puts_every_tenant_in_the_overflow() {
        let r = rules(2, 1.0, 0);
        let s = table(&r);
        assert!(take_at(&s, &r, "a", T0).overflow());
        assert!(take_at(&s, &r, "b", T0).overflow());
        assert!(!taken(&take_at(&s, &r, "c", T0)));
        assert_eq!(refund(&s, P, &r, "a", Slot::Table(0), T0), Ok(false));
    }

    #[test]
    fn candidates_are_distinct_in_range_and_spread() {
        assert!(candidates("a", 0).is_empty());
        assert_eq!(candidates("a", 1), [0]);
        let mut hits = vec![0u32; 64];
        for i in 0..10_000 {
            let c = candidates(&format!("t{i}"), 64);
            assert!(!c.is_empty() && c.len() <= CANDIDATES as usize);
            assert!(c.iter().all(|&x| x < 64));
            assert!(c.iter().enumerate().all(|(j, x)| !c[..j].contains(x)), "{c:?}");
            hits[c[0] as usize] += 1;
        }
        // 10 000 first choices over 64 slots: about 156 each.
        assert!(hits.iter().all(|&h| (80..240).contains(&h)), "{hits:?}");
        assert_eq!(candidates("acme", 4096), candidates("acme", 4096));
    }

    /// A store that lets another worker run a whole operation between this worker's reads and
    /// its next write, as two Envoy workers do.
    struct Racy<'a> {
        inner: &'a MemStore,
        hook: RefCell<Option<Hook<'a>>>,
    }

    type Hook<'a> = Box<dyn FnOnce(&MemStore) + 'a>;

    impl<'a> Racy<'a> {
        fn new(inner: &'a MemStore) -> Self {
            Racy { inner, hook: RefCell::new(None) }
        }
        fn before_next_write(&self, f: impl FnOnce(&MemStore) + 'a) {
            *self.hook.borrow_mut() = Some(Box::new(f));
        }
    }

    impl Store for Racy<'_> {
        fn get(&self, key: &str) -> Result<(Option<Vec<u8>>, u32), Status> {
            self.inner.get(key)
        }
        fn set(&self, key: &str, value: &[u8], cas: u32) -> Result<(), Status> {
            let hook = self.hook.borrow_mut().take();
            if let Some(h) = hook {
                h(self.inner);
            }
            self.inner.set(key, value, cas)
        }
    }

    #[test]
    fn a_concurrent_claim_for_the_same_tenant_is_shared_not_duplicated() {
        let r = rules(3, 1.0, 16);
        let mem = table(&r);
        let racy = Racy::new(&mem);
        racy.before_next_write(|m| assert!(take_at(m, &r, "acme", T0).claimed));
        let o = take_at(&racy, &r, "acme", T0);
        assert!(!o.claimed && taken(&o), "the other worker's claim wins; this one spends from it: {o:?}");
        assert_eq!(census(&mem, P, &r, T0).unwrap().used, 1);
        assert_eq!(drain(&mem, &r, "acme", T0), 1);
    }

    #[test]
    fn a_claim_racing_an_earlier_candidate_spends_from_the_earlier_one() {
        // Workers read the clock within moments of each other (`CLOCK_JITTER_NS`).
        let r = rules(3, 20.0, 2);
        let t = tenant_with(2, &[0, 1]);
        let mem = table(&r);
        // Slot 0 is held by x, one token short of full: full again 50 ms later.
        let x = SlotValue::held(&Identity::of("x"), Level { tokens: 2.0, at: T0 });
        mem.set(&slot_key(P, 0), &x.to_bytes(), 0).unwrap();
        let racy = Racy::new(&mem);
        // This worker, at T0, sees slot 0 active and goes for slot 1; meanwhile another worker,
        // 50 ms later, finds slot 0 idle and claims it for the same tenant.
        racy.before_next_write(|m| {
            let o = take_at(m, &r, &t, T0 + SEC / 20);
            assert!(o.displaced && o.slot() == Slot::Table(0), "{o:?}");
        });
        let o = take_at(&racy, &r, &t, T0);
        assert_eq!((o.take, o.claimed), (TenantTake::Taken { slot: Slot::Table(0) }, false));
        // The tenant spent two of slot 0's three tokens; slot 1 was put back to full.
        assert_eq!(drain(&mem, &r, &t, T0 + SEC / 20), 1);
        assert_eq!(census(&mem, P, &r, T0 + SEC / 20).unwrap(), Census { used: 2, active: 1 });
    }

    /// Two workers, each running operations that another worker may interrupt between a read and
    /// a write; a ledger of tokens granted per tenant, net of refunds.
    struct Sim {
        rules: TenantRules,
        tenants: Vec<String>,
        /// Per tenant: tokens from table slots, net of refunds.
        from_slots: RefCell<HashMap<String, f64>>,
        from_overflow: RefCell<f64>,
        /// Per worker: tokens it may still refund.
        pending: RefCell<[Vec<(String, Slot)>; 2]>,
        latest: RefCell<Instant>,
    }

    #[derive(Clone, Copy)]
    enum Op {
        Take { tenant: usize },
        Refund { pick: usize },
    }

    impl Sim {
        fn run(&self, store: &impl Store, worker: usize, op: Op, now: Instant) {
            let latest = (*self.latest.borrow()).max(now);
            *self.latest.borrow_mut() = latest;
            match op {
                Op::Take { tenant } => {
                    let t = &self.tenants[tenant % self.tenants.len()];
                    let o = take(store, P, &self.rules, t, false, now).unwrap();
                    if let TenantTake::Taken { slot } = o.take {
                        self.ledger(t, slot, 1.0);
                        self.pending.borrow_mut()[worker].push((t.clone(), slot));
                    }
                }
                Op::Refund { pick } => {
                    let mine = {
                        let mut pending = self.pending.borrow_mut();
                        let p = &mut pending[worker];
                        (!p.is_empty()).then(|| p.swap_remove(pick % p.len()))
                    };
                    if let Some((t, slot)) = mine {
                        if refund(store, P, &self.rules, &t, slot, now).unwrap() {
                            self.ledger(&t, slot, -1.0);
                        }
                    }
                }
            }
        }

        fn ledger(&self, tenant: &str, slot: Slot, n: f64) {
            match slot {
                Slot::Overflow => *self.from_overflow.borrow_mut() += n,
                Slot::Table(_) => *self.from_slots.borrow_mut().entry(tenant.to_string()).or_default() += n,
            }
        }

        /// Most tokens one bucket can have granted since T0.
        fn bound(&self) -> f64 {
            let elapsed_s = (*self.latest.borrow() - T0).as_secs_f64();
            self.rules.bucket.max + self.rules.bucket.rate * elapsed_s + 1e-6
        }
    }

    /// A tiny LCG (Knuth's MMIX constants): the same schedule on every run.
    struct Lcg(u64);
    impl Lcg {
        fn next(&mut self, below: u64) -> u64 {
            self.0 = self.0.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
            (self.0 >> 33) % below
        }
    }

    fn interleave(seed: u64, slots: u32, tenants: usize, steps: usize) -> (HashMap<String, f64>, f64, f64) {
        let r = rules(3, 2.0, slots);
        let mem = table(&r);
        let sim = Sim {
            rules: r,
            tenants: (0..tenants).map(|i| format!("tenant-{i}")).collect(),
            from_slots: RefCell::default(),
            from_overflow: RefCell::default(),
            pending: RefCell::default(),
            latest: RefCell::new(T0),
        };
        let mut rng = Lcg(seed);
        let mut now = T0;
        for step in 0..steps {
            now += rng.next(40) * MS;
            let op = |rng: &mut Lcg| {
                if rng.next(10) < 7 {
                    Op::Take { tenant: rng.next(tenants as u64) as usize }
                } else {
                    Op::Refund { pick: rng.next(1000) as usize }
                }
            };
            let worker = rng.next(2) as usize;
            let (mine, theirs) = (op(&mut rng), op(&mut rng));
            let racy = Racy::new(&mem);
            if rng.next(3) == 0 {
                // The other worker's clock may run a little ahead.
                let their_now = now + rng.next(5) * MS;
                let sim = &sim;
                racy.before_next_write(move |m| sim.run(m, 1 - worker, theirs, their_now));
            }
            sim.run(&racy, worker, mine, now);
            let bound = sim.bound();
            for (t, n) in sim.from_slots.borrow().iter() {
                assert!(*n <= bound, "seed {seed} step {step}: {t} was granted {n} > {bound}");
            }
            let o = *sim.from_overflow.borrow();
            assert!(o <= bound, "seed {seed} step {step}: overflow granted {o} > {bound}");
        }
        let bound = sim.bound();
        let granted = sim.from_slots.into_inner();
        let overflow = sim.from_overflow.into_inner();
        (granted, overflow, bound)
    }

    #[test]
    fn two_interleaved_workers_never_grant_a_tenant_more_than_its_bucket() {
        for seed in [1, 7, 42, 1234, 99_999] {
            // A roomy table: every tenant keeps its slot and the overflow is never needed.
            let (granted, overflow, bound) = interleave(seed, 64, 5, 4000);
            assert_eq!(overflow, 0.0, "seed {seed}");
            // The schedule does press on the limits: someone got close to the bound.
            let most = granted.values().cloned().fold(0.0, f64::max);
            assert!(most > bound * 0.5, "seed {seed}: {most} vs {bound}");
            // A cramped table: displacement and the overflow in play, the same limits hold.
            let (_, overflow, bound) = interleave(seed, 2, 6, 4000);
            assert!(overflow > 0.0 && overflow <= bound, "seed {seed}: {overflow}");
        }
    }
}
