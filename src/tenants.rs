//! Bounded per-tenant buckets: every tenant (a value of the tenant header) spends from its own
//! request bucket and, with tenant token limits, its own bucket of LLM tokens, kept in a FIXED
//! table of shared-data slots, so no header value can mint tokens.
//!
//! Limits nest: a request needs a token from its tenant's bucket (this module) and then from the
//! provider-wide bucket (admission). When the provider refuses, the host gives the tenant's
//! tokens back with [`refund`].
//!
//! # LLM tokens
//!
//! With `rules.tokens` ("team A gets 3,000 tokens per minute"), every slot (and the overflow)
//! holds two buckets: requests and LLM tokens. A request takes its request token and its
//! estimated LLM tokens in ONE compare-and-swap of its slot (or of the overflow value): both or
//! neither, and [`TenantTake::Short`] says which bucket was short. When the answer is in,
//! [`settle`] reconciles the estimate with the usage: unused tokens go back (never above full),
//! extra ones are taken as a debt. A debt is carried whole, however deep (the level goes below
//! zero, beyond the capacity if need be, as in the provider's token bucket: `admission`), and the
//! refill pays it back before the tenant's next request passes: written off, requests that
//! reserve little and use much would get many times the tenant's rate through. A request that
//! needs more than a full token bucket could give is never admitted: [`too_large`] tells the
//! caller, which answers it as too large rather than as a wait.
//!
//! # The table
//!
//! `rules.slots` values `<prefix>/tenant/<slot>` (`prefix` is `llm_ratelimit/<name>`), plus one
//! shared overflow value `<prefix>/tenant/overflow` and, with `rules.newcomers`, the newcomers'
//! pool `<prefix>/tenant/pool` (below). A slot holds a tenant's identity (the value itself when
//! it is at most 64 printable bytes, else a marked 64-bit hash) and its buckets' state. A tenant
//! may live in a few candidate slots chosen by `stable_hash` (open addressing); lookups compare
//! identities, so two tenants whose candidates collide never share a bucket.
//!
//! A request takes its tokens from the first candidate that holds its tenant. A tenant without a
//! slot claims the first EMPTY candidate, else the first IDLE one (its request bucket AND its
//! token bucket refilled to full by now, so a tenant in debt is never idle): an idle tenant is
//! displaced only when no candidate is empty. The claimed slot's buckets start FULL, or, with
//! `rules.newcomers`, with what the newcomers' pool gives (below). When every candidate is held
//! by an active tenant, the request spends from the overflow, which has the tenant limits (both
//! buckets) and is shared by all such tenants.
//!
//! # Rotating tenant values: two modes
//!
//! Without `rules.newcomers` (the default), a newcomer's slot starts with full buckets, and a
//! displaced tenant loses nothing (it was full, and comes back to full buckets). Rotating the
//! header value cannot mint tokens beyond the table: everything granted comes from `slots + 1`
//! buckets (the slots and the overflow), each at most full plus its refill, whatever the number
//! of header values. That bound is wide: with 4096 slots, a client that sends a new value on
//! every request can get up to 4097 tenants' buckets plus their refill (the provider-wide
//! buckets still bound it, as they bound everyone). It is the right mode when the tenant header
//! is set by something that authenticates the client (`jwt_authn`, `ext_authz`, a header written
//! from a verified key): nobody can pick a new identity at will, and every legitimate newcomer,
//! such as every tenant after an Envoy restart (shared data starts empty), starts with its full
//! burst.
//!
//! With `rules.newcomers = Some(n)`, every claimed slot's buckets come out of one more shared
//! value, the newcomers' pool `<prefix>/tenant/pool`: a request level and (with `rules.tokens`) a
//! token level, holding `n` tenants' buckets (the tenant limits `rules.bucket` and `rules.tokens`
//! with `n` times the capacity, burst allowance included, and one tenant's refill rate);
//! [`ensure`] creates it full. A claim takes `min(one tenant's full buckets, pool level)` of each
//! bucket out of the pool (one compare-and-swap of the pool) and the claimed slot starts at
//! exactly that: at most ONE tenant's buckets per claim. The arriving request then takes its need
//! from the new slot as any other; it may be short, and the slot is claimed anyway: the tenant
//! has its slot now and refills there at its own rate. Displacing an idle slot is a claim like
//! any other: the idle tenant's full buckets are discarded, not returned to the pool (returned, a
//! client rotating its key would recycle every slot's refill through the pool), and a displaced
//! tenant that comes back is a newcomer again.
//!
//! The invariant: everything granted to tenant identities that had no slot comes from the pool
//! (at most its capacity plus its refill over the time: `n` tenants' buckets plus one tenant's
//! refill), or from the overflow when the table is full (which has the tenant limits too). So a
//! client sending a new tenant value on every request gets, over any stretch of time, at most
//! that from the table, whatever `rules.slots`: beyond `n` first bursts, no more than one tenant
//! gets; with `n = 1`, exactly one tenant's worth: a tenant that rotates its key gets nothing
//! extra. A returning, long-lived tenant keeps its own
//! slot and refills at its own rate, whatever the newcomers do. (The bound is on what is granted,
//! i.e. reserved. What a request then uses beyond its reservation is a debt of the slot that took
//! it, as for every tenant: paid back by that slot's refill, which keeps the slot active, out of
//! anyone's reach, until then. A client that reserves less than it uses and never comes back
//! leaves such debts behind in the slots it claimed, so its overshoot is bounded by the table
//! (each slot repays at one tenant's rate before anyone can claim it again), not by the pool; the
//! provider-wide token bucket charges it in full.)
//!
//! The price, honestly: newcomers share `n` tenants' bursts. After an Envoy restart (shared data
//! is empty, [`ensure`] writes a full pool) or during a flood of new tenant values, the first `n`
//! newcomers get full buckets and the others start with what the pool has refilled since (maybe
//! nothing: their first requests are short, with the wait of their own refill), then each
//! refills at its own rate. As the pool refills (at one tenant's rate: a bucket's worth every
//! `capacity / refill_rate` seconds), newcomers get full buckets again. A
//! flood keeps the pool low, so it slows other newcomers down, never the tenants that hold slots:
//! an active tenant is never displaced, and an idle one only when a newcomer finds no empty
//! candidate. Set `newcomers` when the tenant header is chosen by the client (an API key or team
//! name passed through unverified), to about the number of legitimate tenants that may appear at
//! once (after a restart, all of them): rotation then buys at most that many tenants' buckets,
//! and a larger burst of newcomers than that starts short.
//!
//! A missing or unreadable pool value reads as EMPTY at the present instant, and the first claim
//! writes it so: it refills from then. Only a store that failed [`ensure`] or a foreign writer of
//! shared data can leave one; reading it as full would let anything that can garble the value
//! refill the pool at will, and a newcomer to an empty pool still gets its slot (short at first).
//! [`ensure`], before traffic, replaces an unreadable pool with a full one, as it creates the
//! other values. Without `newcomers` the pool value is neither created nor read (one left by an
//! earlier configuration is ignored); a configuration that turns it on creates it full.
//!
//! # Concurrency
//!
//! Every change is a compare-and-swap of one value; a conflict (another worker wrote first) makes
//! the request decide again from a fresh read. A claim reads the candidates, picks one, (with the
//! pool) draws from the pool (a compare-and-swap of the pool), then writes the slot (a
//! compare-and-swap of the slot, against the value the scan read); if the slot write loses, the
//! draw goes back to the pool (never above full) and the request decides again. After a claim,
//! the request checks that no other worker claimed an earlier candidate for the same tenant
//! meanwhile; if one did, it releases the claimed slot and spends from the earlier one, so a
//! tenant spends from one bucket even when its first requests race on several workers. Releasing
//! gives the slot back what this request took; without the pool, it then empties the slot if its
//! buckets are full again, and else leaves it to the tenant (it refills, and is displaced once
//! idle): emptied early, it would hand its next claimant full buckets on top of what it granted.
//! With the pool, it empties the slot and puts the draw back into the pool, less what other
//! requests spent from it meanwhile. (Only a claim of the earlier candidate that lands after
//! this check can leave a second slot behind; the tenant then spends from the earlier one (the
//! scan finds it first), and the later one keeps what is left of its start until it refills and
//! is displaced. Without the pool, the tenant got at most the request that claim granted beyond
//! its own bucket, never a second bucket to spend; with the pool, the start came from the pool,
//! so nothing is minted.) With the pool, a store failure between the draw and the slot write
//! loses the draw: the pool is poorer, nobody richer.
//!
//! A [`settle`] or [`refund`] for a slot that has passed to another tenant (or been released)
//! meanwhile changes nothing (`Ok(false)`): the slot's new tenant must not pay, nor be fed. A slot
//! passes on only once both its buckets are full again, so this loses at most what the request's
//! estimate missed (its debt); the provider-wide token bucket still charges it.
//!
//! The host calls [`ensure`] from `on_configure` (before traffic): Envoy's CAS cannot guard a key
//! that does not exist yet, so two workers claiming a missing slot at once would both succeed.
//!
//! # Slot values
//!
//! `[MAGIC, kind, identity.., levels]`: the request bucket's `bucket::Level` (16 bytes), then,
//! when the kind has the `WITH_TOKENS` bit, the token bucket's level (an `f64`, 8 bytes, as of
//! the same instant: both buckets are always brought to the same instant together). A value
//! without a token level (requests only: exactly the encoding from before token limits) reads as
//! a full token bucket; a token level the rules no longer have is dropped at the next write.
//! Anything else reads as empty. The overflow and the pool are `[MAGIC, kind, levels]` alike
//! (`KIND_OVERFLOW`, `KIND_POOL`, with the `WITH_TOKENS` bit as in a slot): an unreadable
//! overflow reads as full, an unreadable pool as empty (above).
//!
//! # Configuration (proposal for `config.rs`)
//!
//! ```json
//! "tenant": {"key_header": "x-llm-tenant", "capacity": 10, "refill_rate": 1, "burst_allowance": 0, "slots": 4096,
//!            "tokens": {"capacity": 3000, "refill_rate": 50, "burst_allowance": 0}}
//! ```
//!
//! The whole `tenant` object is optional; without it there are no tenant buckets. Inside it every
//! field is optional, with the defaults shown (but for `tokens`, off unless given, whose values
//! are only an example): `key_header` a header name (lower-cased);
//! `capacity` a whole number >= 1; `refill_rate` a number > 0 (tokens per second, per tenant);
//! `burst_allowance` a whole number >= 0 (spent only by classes with `use_burst`, as in the
//! provider bucket); `slots` a whole number from 1 to 65536 ([`DEFAULT_SLOTS`]). These limits are
//! apart from the provider's `bucket`, which bounds all tenants together.
//!
//! `newcomers` is unset by default (no pool: every newcomer starts with full buckets); set, a
//! whole number from 1 to 65536: the newcomers' pool holds that many tenants' buckets
//! ([`TenantRules::newcomers`]; see "Rotating tenant values" above for when to set it).
//!
//! `tokens` is optional too: without it tenants are limited in requests only. With it every
//! tenant also gets a bucket of LLM tokens ([`TenantRules::tokens`]): `capacity` required, a
//! whole number >= 1; `refill_rate` a number > 0 (LLM tokens per second), by default `capacity`
//! per minute (`capacity / 60`); `burst_allowance` a whole number >= 0, default 0, spent only by
//! classes with `use_burst`. These are apart from the provider's `tokens`, which bound all
//! tenants together.
//!
//! ```
//! use llm_ratelimit::bucket::BucketRules;
//! use llm_ratelimit::store::MemStore;
//! use llm_ratelimit::tenants::{self, Slot, TenantRules, TenantTake};
//! use llm_ratelimit::time::{Duration, Instant};
//! let store = MemStore::default();
//! let p = "llm_ratelimit/openai";
//! let tokens = Some(BucketRules::capacity(3000).refill_rate(50.0));
//! let rules = TenantRules { bucket: BucketRules::capacity(2).refill_rate(1.0), tokens, slots: 16, newcomers: None };
//! tenants::ensure(&store, p, &rules, Instant::ZERO).unwrap();
//! // A newcomer claims a slot with full buckets...
//! let first = tenants::take(&store, p, &rules, "acme", false, 2000, Instant::ZERO).unwrap();
//! assert!(first.claimed && matches!(first.take, TenantTake::Taken { slot: Slot::Table(_) }));
//! // ... and so does another at the same moment (without `newcomers`, every newcomer does).
//! let other = tenants::take(&store, p, &rules, "globex", false, 3000, Instant::ZERO).unwrap();
//! assert!(other.claimed && matches!(other.take, TenantTake::Taken { .. }));
//! // 1000 LLM tokens left: a request estimated at 1500 waits for 500 more (10 s at 50 a second).
//! let second = tenants::take(&store, p, &rules, "acme", false, 1500, Instant::ZERO).unwrap();
//! let ten = Duration::from_secs(10);
//! assert!(matches!(second.take, TenantTake::Short { wait, tokens: true, .. } if wait == ten));
//! // The first answer used 1200: 800 go back.
//! assert!(tenants::settle(&store, p, &rules, "acme", first.slot(), 2000, 1200, Instant::ZERO).unwrap());
//! let third = tenants::take(&store, p, &rules, "acme", false, 1500, Instant::ZERO).unwrap();
//! assert!(matches!(third.take, TenantTake::Taken { .. }));
//! // Both request tokens are spent now.
//! let fourth = tenants::take(&store, p, &rules, "acme", false, 1, Instant::ZERO).unwrap();
//! assert!(matches!(fourth.take, TenantTake::Short { tokens: false, .. }));
//! assert!(tenants::too_large(&rules, 3001, false));
//!
//! // With a newcomers' pool of one tenant's buckets, the first newcomer empties it; another at
//! // the same moment claims a slot with nothing in it, and waits for its own refill (one
//! // request a second).
//! let pooled = TenantRules { newcomers: Some(1), ..rules };
//! let store = MemStore::default();
//! tenants::ensure(&store, p, &pooled, Instant::ZERO).unwrap();
//! let first = tenants::take(&store, p, &pooled, "acme", false, 2000, Instant::ZERO).unwrap();
//! assert!(first.claimed && matches!(first.take, TenantTake::Taken { .. }));
//! let other = tenants::take(&store, p, &pooled, "globex", false, 0, Instant::ZERO).unwrap();
//! let one_second = Duration::from_secs(1);
//! assert!(other.claimed && matches!(other.take, TenantTake::Short { wait, tokens: false, .. } if wait == one_second));
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
const KIND_POOL: u8 = 4;
/// Bit of the kind byte: the value holds a token level after the request level.
const WITH_TOKENS: u8 = 0x80;
/// Slack for float rounding, as in `BucketRules::take`.
const EPSILON: f64 = 1e-9;

/// Tenant limits, fixed by the configuration.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TenantRules {
    /// Every tenant's request bucket, and the overflow's.
    pub bucket: BucketRules,
    /// Every tenant's LLM-token bucket, and the overflow's. `None`: requests only (the token
    /// counts given to [`take`], [`refund`] and [`settle`] are ignored).
    pub tokens: Option<BucketRules>,
    /// Size of the table. 0 puts every tenant in the overflow.
    pub slots: u32,
    /// The newcomers' pool, in tenants' buckets (configuration: `tenant.newcomers`). `None` (the
    /// default): no pool; a tenant that claims a slot starts with full buckets. `Some(n)`: every
    /// claimed slot starts with what it draws from a pool of `n` tenants' buckets (`n` times the
    /// capacity, burst allowance included, and `n` times the refill rate), at most one tenant's
    /// full buckets per claim. `Some(0)` is taken as `Some(1)`. See the module notes.
    pub newcomers: Option<u32>,
}

/// Where a tenant's tokens came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Slot {
    /// Its own buckets, in this slot of the table.
    Table(u32),
    /// The shared overflow: every candidate slot was held by an active tenant.
    Overflow,
}

/// The tenant side of admission.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum TenantTake {
    /// A request token and the LLM tokens were taken from `slot`; give them back with [`refund`]
    /// if the request goes no further, [`settle`] them once its usage is known.
    Taken { slot: Slot },
    /// The tenant's buckets (or the overflow's) cannot serve this request for `wait`; nothing was
    /// taken. `tokens`: true when the token bucket is what is short (else the request bucket);
    /// when both are, `wait` is the longer of the two waits and `tokens` says whether it is the
    /// token bucket's (a tie: the request bucket's). A request [`too_large`] for the token bucket
    /// is `Short { tokens: true }` every time, with the wait `BucketRules` computes for the
    /// deficit (as if the bucket had no cap): it never passes.
    Short { slot: Slot, wait: Duration, tokens: bool },
}

/// What [`take`] did, with the flags the host counts as stats.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TakeOutcome {
    pub take: TenantTake,
    /// The tenant had no slot and this request gave it one, starting with full buckets or, with
    /// `TenantRules::newcomers`, with what the newcomers' pool gave: `take` may then be `Short`
    /// all the same (the pool had too little).
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

    /// Whether the request was decided by the shared overflow.
    pub fn overflow(&self) -> bool {
        self.slot() == Slot::Overflow
    }
}

/// Slot occupancy, for gauges.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Census {
    /// Slots holding a tenant.
    pub used: u32,
    /// Slots holding a tenant that is not idle (a bucket not full, or in debt): it cannot be
    /// displaced now.
    pub active: u32,
}

pub fn slot_key(prefix: &str, slot: u32) -> String {
    format!("{prefix}/tenant/{slot}")
}

pub fn overflow_key(prefix: &str) -> String {
    format!("{prefix}/tenant/overflow")
}

/// The newcomers' pool (with `TenantRules::newcomers`): what every claimed slot starts with
/// comes out of it.
pub fn pool_key(prefix: &str) -> String {
    format!("{prefix}/tenant/pool")
}

/// Whether a request needing `tokens` LLM tokens is more than a class with `use_burst` could
/// ever take from a tenant's token bucket, even full: [`take`] would refuse it every time, so the
/// caller answers it as too large instead. Always false without a token bucket.
pub fn too_large(rules: &TenantRules, tokens: u64, use_burst: bool) -> bool {
    // The test `BucketRules::take` makes, on a full bucket.
    rules.tokens.is_some_and(|t| t.max - (tokens as f64) < t.reserve_floor(use_burst) - EPSILON)
}

/// Creates the table's values (empty slots, a full overflow and, with `rules.newcomers` and
/// slots, a full newcomers' pool) where there is no readable one. Call before traffic
/// (`on_configure`): see the module notes.
pub fn ensure(store: &impl Store, prefix: &str, rules: &TenantRules, now: Instant) -> Result<(), Status> {
    for slot in 0..rules.slots {
        store::ensure(store, &slot_key(prefix, slot), SlotValue::Empty)?;
    }
    if let Some(pool) = rules.pool().filter(|_| rules.slots > 0) {
        store::ensure(store, &pool_key(prefix), Pool(pool.full(now)))?;
    }
    store::ensure(store, &overflow_key(prefix), Overflow(rules.full(now)))
}

/// Takes one request token and `tokens` LLM tokens (ignored without `rules.tokens`) for `tenant`
/// at `now` (Unix epoch ns), both or neither, in one compare-and-swap: from its slot, from a slot
/// it claims (which starts with full buckets, or with what the newcomers' pool gives), or from
/// the overflow.
/// `use_burst` lets the request's class spend the burst reserve of both buckets. `Err` is a store
/// failure, or other workers winning the CAS every time.
pub fn take(
    store: &impl Store,
    prefix: &str,
    rules: &TenantRules,
    tenant: &str,
    use_burst: bool,
    tokens: u64,
    now: Instant,
) -> Result<TakeOutcome, Status> {
    let id = Identity::of(tenant);
    let candidates = candidates(tenant, rules.slots);
    let done = |take, claimed, displaced| Ok(TakeOutcome { take, claimed, displaced });
    let short = |slot, s: Shortfall| TenantTake::Short { slot, wait: s.wait, tokens: s.tokens };
    // One round per decision: a lost write makes it again on what the winner wrote.
    for _ in 0..store::MAX_CAS_TRIES {
        match scan(store, prefix, rules, &id, &candidates, now)? {
            Scan::Found { slot, cas, state } => {
                let at = Slot::Table(slot);
                match rules.take(state, now, tokens, use_burst) {
                    Err(s) => {
                        if rules.stepped_back(state, now) {
                            // Best effort: the count restarts from the new clock, not the old one.
                            let rebased = SlotValue::held(&id, rules.refill(state, now));
                            write(store, &slot_key(prefix, slot), &rebased, cas)?;
                        }
                        return done(short(at, s), false, false);
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
                // Only a request too large for full buckets (or a bucket configured too small for
                // one request) refuses a newcomer before it claims: it claims nothing.
                if let Err(s) = rules.take(rules.full(now), now, tokens, use_burst) {
                    return done(short(at, s), false, false);
                }
                // The slot starts full, or with what the pool gives; the request takes from that,
                // or is short and claims the slot anyway (the tenant refills there at its own
                // rate).
                let pool = rules.pool();
                let start = match &pool {
                    Some(pool) => draw(store, prefix, rules, pool, now)?,
                    None => rules.full(now),
                };
                let taken = rules.take(start, now, tokens, use_burst);
                let state = *taken.as_ref().unwrap_or(&start);
                if !write(store, &slot_key(prefix, slot), &SlotValue::held(&id, state), cas)? {
                    // Another worker wrote the slot first: the draw goes back, and this request
                    // decides again on what that worker wrote.
                    if let Some(pool) = &pool {
                        to_pool(store, prefix, pool, Amounts::of(&start), now)?;
                    }
                    continue;
                }
                if held_earlier(store, prefix, &id, &candidates, slot)? {
                    // Another worker claimed an earlier candidate for this tenant meanwhile: that
                    // one is the tenant's bucket. Release this one (with the pool, the draw goes
                    // back to it) and decide again, which finds the earlier one.
                    let took =
                        if taken.is_ok() { Amounts { requests: 1.0, tokens: tokens as f64 } } else { Amounts::ZERO };
                    release(store, prefix, rules, &id, slot, Amounts::of(&start), took, now)?;
                    continue;
                }
                let take = match taken {
                    Ok(_) => TenantTake::Taken { slot: at },
                    Err(s) => short(at, s),
                };
                return done(take, true, displaced);
            }
            Scan::Full => {
                let taken = store::update(
                    store,
                    &overflow_key(prefix),
                    || Overflow(rules.full(now)),
                    |Overflow(s)| match rules.take(s, now, tokens, use_burst) {
                        Ok(next) => (Ok(()), Some(Overflow(next))),
                        Err(why) => (Err(why), rules.stepped_back(s, now).then(|| Overflow(rules.refill(s, now)))),
                    },
                )?;
                let take = match taken {
                    Ok(()) => TenantTake::Taken { slot: Slot::Overflow },
                    Err(s) => short(Slot::Overflow, s),
                };
                return done(take, false, false);
            }
        }
    }
    Err(CAS_MISMATCH)
}

/// Gives back what [`take`] took from `slot` for `tenant` (the provider-wide bucket then refused
/// the request): one request token and `tokens` LLM tokens (ignored without `rules.tokens`).
/// Never fills a bucket above its maximum. `Ok(false)`: the slot now belongs to another tenant
/// (or does not exist), and nothing changed.
pub fn refund(
    store: &impl Store,
    prefix: &str,
    rules: &TenantRules,
    tenant: &str,
    slot: Slot,
    tokens: u64,
    now: Instant,
) -> Result<bool, Status> {
    give_back(store, prefix, rules, &Identity::of(tenant), slot, 1.0, tokens as f64, now)
}

/// The answer to a request [`take`] let through from `slot` is in: it reserved `reserved` LLM
/// tokens and used `used`. What it did not use goes back (never above full); what it used beyond
/// its reservation is taken as a debt, carried whole however deep (below zero, beyond the
/// capacity), which the refill pays back before the tenant's next request passes. For
/// `Slot::Overflow`, settles the overflow. `Ok(false)`: the slot is another tenant's now (or does
/// not exist), and nothing changed. Without `rules.tokens`, or when `reserved == used`, there is
/// nothing to settle: `Ok(true)` without reading the store (`Ok(false)` for a slot out of the
/// table).
#[allow(clippy::too_many_arguments)]
pub fn settle(
    store: &impl Store,
    prefix: &str,
    rules: &TenantRules,
    tenant: &str,
    slot: Slot,
    reserved: u64,
    used: u64,
    now: Instant,
) -> Result<bool, Status> {
    if matches!(slot, Slot::Table(i) if i >= rules.slots) {
        return Ok(false);
    }
    if rules.tokens.is_none() || reserved == used {
        return Ok(true);
    }
    // Each side is exact up to 2^53; the difference of two such counts is too.
    let unused = reserved as f64 - used as f64;
    give_back(store, prefix, rules, &Identity::of(tenant), slot, 0.0, unused, now)
}

/// Counts the used and active slots (reads the whole table: for a timer, not per request).
pub fn census(store: &impl Store, prefix: &str, rules: &TenantRules, now: Instant) -> Result<Census, Status> {
    let mut c = Census::default();
    for slot in 0..rules.slots {
        if let Some(SlotValue::Held { state, .. }) = store::read::<SlotValue>(store, &slot_key(prefix, slot))? {
            c.used += 1;
            if !rules.idle(state, now) {
                c.active += 1;
            }
        }
    }
    Ok(c)
}

/// A tenant's buckets (or the overflow's), as stored: the request level and, with a token
/// bucket, the LLM tokens left as of the same instant `requests.at`. Every change brings both to
/// one instant (`BucketRules::refill` moves a level's instant by the clock alone, whatever the
/// bucket), so one instant serves both.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Levels {
    requests: Level,
    /// `None`: written without a token bucket; read as a full one.
    tokens: Option<f64>,
}

/// Why [`TenantRules::take`] refused: the longer wait, and whether the token bucket set it.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Shortfall {
    wait: Duration,
    tokens: bool,
}

/// Request tokens and LLM tokens moved between the pool and a slot (LLM tokens 0 without a
/// token bucket). Never negative.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Amounts {
    requests: f64,
    tokens: f64,
}

impl Amounts {
    const ZERO: Amounts = Amounts { requests: 0.0, tokens: 0.0 };

    /// The levels of `l`, as amounts (a slot's start is exactly what was drawn).
    fn of(l: &Levels) -> Amounts {
        Amounts { requests: l.requests.tokens, tokens: l.tokens.unwrap_or(0.0) }
    }

    fn is_zero(&self) -> bool {
        *self == Amounts::ZERO
    }
}

impl TenantRules {
    /// The newcomers' pool's rules, `None` without a pool: these rules with `n` times each
    /// bucket's capacity (burst allowance included), `n` = `newcomers`, and one tenant's refill
    /// rate: `n` bursts, but over time no more than one tenant gets.
    fn pool(&self) -> Option<TenantRules> {
        let n = f64::from(self.newcomers?.max(1));
        let times_n = |b: BucketRules| BucketRules { max: b.max * n, burst: b.burst * n, rate: b.rate };
        Some(TenantRules { bucket: times_n(self.bucket), tokens: self.tokens.map(times_n), newcomers: None, ..*self })
    }

    /// Full buckets at `now`: what the overflow and a claimed slot without a pool start with
    /// (with the pool's rules: a full pool).
    fn full(&self, now: Instant) -> Levels {
        Levels { requests: self.bucket.full(now), tokens: self.tokens.map(|t| t.max) }
    }

    /// Empty buckets at `now`: what a missing or unreadable pool holds.
    fn empty(&self, now: Instant) -> Levels {
        Levels { requests: Level { tokens: 0.0, at: now }, tokens: self.tokens.map(|_| 0.0) }
    }

    /// Splits the pool's levels `pool` (of rules `pool_rules`: `self.pool()`) at `now` into a
    /// newcomer's start (each bucket's level, at most one tenant's full bucket and at least zero,
    /// as of the pool's instant) and what the pool keeps.
    fn split(&self, pool_rules: &TenantRules, pool: Levels, now: Instant) -> (Levels, Levels) {
        let p = pool_rules.refill(pool, now);
        // Not `f64::clamp`: it panics on a NaN bound (and its message costs the `.wasm` 18 KB).
        let give = |level: f64, max: f64| level.min(max).max(0.0);
        let r = give(p.requests.tokens, self.bucket.max);
        let t = self.tokens.zip(p.tokens).map(|(b, x)| give(x, b.max));
        let start = Levels { requests: Level { tokens: r, ..p.requests }, tokens: t };
        let keep = Levels {
            requests: Level { tokens: p.requests.tokens - r, ..p.requests },
            tokens: p.tokens.zip(t).map(|(x, t)| x - t),
        };
        (start, keep)
    }

    /// `l`'s token level for token bucket `t`: a value written without one (before token limits
    /// were configured) has a full one, as a newcomer would; never above full.
    fn token_level(t: &BucketRules, l: &Levels) -> Level {
        Level { tokens: l.tokens.map_or(t.max, |x| x.min(t.max)), at: l.requests.at }
    }

    /// `l` brought forward to `now` (a clock step back adds nothing: `BucketRules::refill`), with
    /// a token level exactly when the rules have a token bucket.
    fn refill(&self, l: Levels, now: Instant) -> Levels {
        let requests = self.bucket.refill(l.requests, now);
        let tokens = self.tokens.map(|t| t.refill(Self::token_level(&t, &l), now).tokens);
        Levels { requests, tokens }
    }

    /// Whether `now` is a clock step back from `l`: write the refilled levels even when taking
    /// nothing, or the refill stalls for as long as the step.
    fn stepped_back(&self, l: Levels, now: Instant) -> bool {
        self.bucket.stepped_back(l.requests, now)
    }

    /// Takes one request token and `need` LLM tokens from `l` at `now`, both or neither, each
    /// above its bucket's floor for the class (`use_burst`).
    fn take(&self, l: Levels, now: Instant, need: u64, use_burst: bool) -> Result<Levels, Shortfall> {
        let requests = self.bucket.take(l.requests, now, 1.0, self.bucket.reserve_floor(use_burst));
        let tokens =
            self.tokens.map(|t| t.take(Self::token_level(&t, &l), now, need as f64, t.reserve_floor(use_burst)));
        match (requests, tokens) {
            (Ok(requests), None) => Ok(Levels { requests, tokens: None }),
            (Ok(requests), Some(Ok(t))) => Ok(Levels { requests, tokens: Some(t.tokens) }),
            (Ok(_), Some(Err(wait))) => Err(Shortfall { wait, tokens: true }),
            (Err(wait), None | Some(Ok(_))) => Err(Shortfall { wait, tokens: false }),
            (Err(r), Some(Err(t))) => Err(Shortfall { wait: r.max(t), tokens: t > r }),
        }
    }

    /// `l` at `now` with `requests` request tokens and `tokens` LLM tokens added, neither above its
    /// bucket's maximum. Negative `tokens` are a debt, kept whole however deep (only kept finite).
    fn credit(&self, l: Levels, now: Instant, requests: f64, tokens: f64) -> Levels {
        let l = self.refill(l, now);
        let r = Level { tokens: (l.requests.tokens + requests).min(self.bucket.max), ..l.requests };
        let t = self.tokens.zip(l.tokens).map(|(t, x)| (x + tokens).min(t.max).max(f64::MIN));
        Levels { requests: r, tokens: t }
    }

    /// Both buckets refilled to full by `now`: the tenant owes nothing and has nothing in
    /// flight that a displacement would forget (it loses its full buckets, and comes back to
    /// full ones, or with the pool to what the pool has). A tenant in debt, or stamped in the
    /// future (a clock step), is not idle.
    fn idle(&self, l: Levels, now: Instant) -> bool {
        let l = self.refill(l, now);
        let tokens_full = self.tokens.zip(l.tokens).is_none_or(|(t, x)| x >= t.max - EPSILON);
        l.requests.tokens >= self.bucket.max - EPSILON && tokens_full
    }
}

impl Levels {
    /// `base` with the `WITH_TOKENS` bit when there is a token level.
    fn kind(&self, base: u8) -> u8 {
        if self.tokens.is_some() {
            base | WITH_TOKENS
        } else {
            base
        }
    }

    fn encode_into(&self, out: &mut Vec<u8>) {
        out.extend(self.requests.encode());
        if let Some(t) = self.tokens {
            out.extend(t.to_le_bytes());
        }
    }

    /// Exactly the 16 bytes of a `Level`, then (`with_tokens`) exactly 8 of a finite `f64`.
    fn decode(with_tokens: bool, b: &[u8]) -> Option<Levels> {
        if !with_tokens {
            return Some(Levels { requests: Level::decode(b)?, tokens: None });
        }
        let (requests, tokens) = b.split_at_checked(Level::ENCODED_LEN)?;
        let tokens = f64::from_le_bytes(tokens.try_into().ok()?);
        tokens.is_finite().then_some(Levels { requests: Level::decode(requests)?, tokens: Some(tokens) })
    }
}

/// A kind byte split into its base kind and whether a token level follows.
fn split_kind(kind: u8) -> (u8, bool) {
    (kind & !WITH_TOKENS, kind & WITH_TOKENS != 0)
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
    Held { id: Identity, state: Levels },
}

impl SlotValue {
    fn held(id: &Identity, state: Levels) -> SlotValue {
        SlotValue::Held { id: id.clone(), state }
    }
}

/// `[MAGIC, KIND_EMPTY]`, `[MAGIC, KIND_PLAIN (| WITH_TOKENS), len, value.., levels]` or
/// `[MAGIC, KIND_HASHED (| WITH_TOKENS), hash (8, LE), levels]`, `levels` being the request
/// bucket's `bucket::Level` (16 bytes) and, with `WITH_TOKENS`, the token level (`f64`, 8 bytes,
/// LE) as of the same instant.
impl Stored for SlotValue {
    fn to_bytes(&self) -> Vec<u8> {
        match self {
            SlotValue::Empty => vec![MAGIC, KIND_EMPTY],
            SlotValue::Held { id: Identity::Plain(v), state } => {
                // `Identity::of` keeps plain values at most MAX_PLAIN_LEN (64) bytes long.
                let mut out = vec![MAGIC, state.kind(KIND_PLAIN), v.len().min(MAX_PLAIN_LEN) as u8];
                out.extend(v.iter().take(MAX_PLAIN_LEN));
                state.encode_into(&mut out);
                out
            }
            SlotValue::Held { id: Identity::Hashed(h), state } => {
                let mut out = vec![MAGIC, state.kind(KIND_HASHED)];
                out.extend(h.to_le_bytes());
                state.encode_into(&mut out);
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
        let (kind, with_tokens) = split_kind(kind);
        let (id, state) = match kind {
            KIND_EMPTY => return (rest.is_empty() && !with_tokens).then_some(SlotValue::Empty),
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
        // `Levels::decode` insists on exact lengths, so trailing bytes are garbage too.
        Some(SlotValue::Held { id, state: Levels::decode(with_tokens, state)? })
    }
}

/// The overflow's value: `[MAGIC, KIND_OVERFLOW (| WITH_TOKENS), levels]`, as in a slot.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Overflow(Levels);

/// The newcomers' pool: `[MAGIC, KIND_POOL (| WITH_TOKENS), levels]`, as the overflow.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Pool(Levels);

/// `[MAGIC, kind (| WITH_TOKENS), levels]`.
fn encode_levels(kind: u8, l: &Levels) -> Vec<u8> {
    let mut out = vec![MAGIC, l.kind(kind)];
    l.encode_into(&mut out);
    out
}

/// The levels of a value `encode_levels(kind, ..)` wrote; `None` for anything else.
fn decode_levels(kind: u8, b: &[u8]) -> Option<Levels> {
    match b {
        [MAGIC, k, state @ ..] => match split_kind(*k) {
            (base, with_tokens) if base == kind => Levels::decode(with_tokens, state),
            _ => None,
        },
        _ => None,
    }
}

impl Stored for Overflow {
    fn to_bytes(&self) -> Vec<u8> {
        encode_levels(KIND_OVERFLOW, &self.0)
    }

    fn from_bytes(b: &[u8]) -> Option<Overflow> {
        decode_levels(KIND_OVERFLOW, b).map(Overflow)
    }
}

impl Stored for Pool {
    fn to_bytes(&self) -> Vec<u8> {
        encode_levels(KIND_POOL, &self.0)
    }

    fn from_bytes(b: &[u8]) -> Option<Pool> {
        decode_levels(KIND_POOL, b).map(Pool)
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

/// What a read of the candidates found.
enum Scan {
    /// The tenant's buckets, as read with CAS value `cas`.
    Found { slot: u32, cas: u32, state: Levels },
    /// The tenant has no slot; this one, as read with `cas`, is the one it may claim: the first
    /// empty candidate, else the first idle one.
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
    let (mut empty, mut idle) = (None, None);
    for &slot in candidates {
        let (bytes, cas) = store.get(&slot_key(prefix, slot))?;
        match bytes.and_then(|b| SlotValue::from_bytes(&b)).unwrap_or(SlotValue::Empty) {
            SlotValue::Held { id: held, state } if held == *id => return Ok(Scan::Found { slot, cas, state }),
            SlotValue::Empty if empty.is_none() => empty = Some(Scan::Claim { slot, cas, displaced: false }),
            SlotValue::Held { state, .. } if idle.is_none() && rules.idle(state, now) => {
                idle = Some(Scan::Claim { slot, cas, displaced: true })
            }
            _ => {}
        }
    }
    // An idle tenant loses its slot when displaced (it comes back as a newcomer: to full buckets,
    // or with the pool to what the pool has): only when no candidate is empty.
    Ok(empty.or(idle).unwrap_or(Scan::Full))
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

/// Reads the pool (of rules `pool`: `TenantRules::pool`), lets `change` decide on its levels, and
/// writes what it returns, deciding again when another worker wrote first (as `store::update`).
/// A missing or unreadable pool reads as EMPTY at `now` and is written (at least as that) so
/// that it refills from `now`: see the module notes.
fn update_pool<R>(
    store: &impl Store,
    prefix: &str,
    pool: &TenantRules,
    now: Instant,
    mut change: impl FnMut(Levels) -> (R, Option<Levels>),
) -> Result<R, Status> {
    let key = pool_key(prefix);
    for _ in 0..store::MAX_CAS_TRIES {
        let (bytes, cas) = store.get(&key)?;
        let read = bytes.and_then(|b| Pool::from_bytes(&b)).map(|Pool(l)| l);
        let current = read.unwrap_or_else(|| pool.empty(now));
        let (r, next) = change(current);
        let Some(next) = next.or(read.is_none().then_some(current)) else { return Ok(r) };
        match store.set(&key, &Pool(next).to_bytes(), cas) {
            Ok(()) => return Ok(r),
            Err(CAS_MISMATCH) => continue,
            Err(s) => return Err(s),
        }
    }
    Err(CAS_MISMATCH)
}

/// Takes a newcomer's start out of the pool (of rules `pool`) at `now` (`TenantRules::split`:
/// everything the pool holds, at most one tenant's full buckets), in one compare-and-swap of the
/// pool.
fn draw(
    store: &impl Store,
    prefix: &str,
    rules: &TenantRules,
    pool: &TenantRules,
    now: Instant,
) -> Result<Levels, Status> {
    update_pool(store, prefix, pool, now, |levels| {
        let (start, keep) = rules.split(pool, levels, now);
        let write = !Amounts::of(&start).is_zero() || pool.stepped_back(levels, now);
        (start, write.then_some(keep))
    })
}

/// Puts `back` into the pool (of rules `pool`) at `now`, never above full.
fn to_pool(store: &impl Store, prefix: &str, pool: &TenantRules, back: Amounts, now: Instant) -> Result<(), Status> {
    if back.is_zero() {
        return Ok(());
    }
    update_pool(store, prefix, pool, now, |levels| {
        let next = pool.credit(levels, now, back.requests, back.tokens);
        ((), (next != levels).then_some(next))
    })
}

/// Undoes a claim of `slot` for `id` that lost to an earlier candidate: gives the slot what this
/// request `took` from it, then, in the same compare-and-swap:
///
/// - without a pool, empties it if both buckets are full again (it started full), else leaves it
///   to the tenant: emptied, it would hand its next claimant full buckets on top of what it
///   granted; held, it refills and is displaced once idle;
/// - with the pool, empties it and puts back into the pool what it `drawn`, less what other
///   requests spent from it meanwhile (each bucket the lesser of the two, so never more than was
///   drawn). A slot in debt by then (another request of the tenant spent from it and used more
///   than it reserved) is left to the tenant as it is: emptying it would write the debt off; the
///   pool then gets nothing back.
#[allow(clippy::too_many_arguments)]
fn release(
    store: &impl Store,
    prefix: &str,
    rules: &TenantRules,
    id: &Identity,
    slot: u32,
    drawn: Amounts,
    took: Amounts,
    now: Instant,
) -> Result<(), Status> {
    let back = store::update(
        store,
        &slot_key(prefix, slot),
        || SlotValue::Empty,
        |v| match v {
            SlotValue::Held { id: held, state } if held == *id => {
                let l = rules.credit(state, now, took.requests, took.tokens);
                if rules.newcomers.is_none() {
                    if rules.idle(l, now) {
                        return (Amounts::ZERO, Some(SlotValue::Empty));
                    }
                    return (Amounts::ZERO, (l != state).then_some(SlotValue::Held { id: held, state: l }));
                }
                if l.requests.tokens < 0.0 || l.tokens.is_some_and(|t| t < 0.0) {
                    return (Amounts::ZERO, (l != state).then_some(SlotValue::Held { id: held, state: l }));
                }
                let left = Amounts::of(&l);
                let back = Amounts {
                    requests: left.requests.min(drawn.requests).max(0.0),
                    tokens: left.tokens.min(drawn.tokens).max(0.0),
                };
                (back, Some(SlotValue::Empty))
            }
            // Passed to another tenant meanwhile (or gone): nothing of this claim is left there.
            _ => (Amounts::ZERO, None),
        },
    )?;
    match rules.pool() {
        Some(pool) => to_pool(store, prefix, &pool, back, now),
        None => Ok(()),
    }
}

/// Adds `requests` request tokens and `tokens` LLM tokens (negative: a debt) to the buckets of
/// `slot` at `now` (`TenantRules::credit`): a table slot only while `id` holds it, the overflow
/// always. `Ok(false)`: the slot is another tenant's (or does not exist), and nothing changed.
#[allow(clippy::too_many_arguments)]
fn give_back(
    store: &impl Store,
    prefix: &str,
    rules: &TenantRules,
    id: &Identity,
    slot: Slot,
    requests: f64,
    tokens: f64,
    now: Instant,
) -> Result<bool, Status> {
    match slot {
        Slot::Table(i) if i < rules.slots => store::update(
            store,
            &slot_key(prefix, i),
            || SlotValue::Empty,
            |v| match v {
                SlotValue::Held { id: held, state } if held == *id => {
                    let next = rules.credit(state, now, requests, tokens);
                    (true, (next != state).then_some(SlotValue::Held { id: held, state: next }))
                }
                _ => (false, None),
            },
        ),
        Slot::Table(_) => Ok(false),
        Slot::Overflow => store::update(
            store,
            &overflow_key(prefix),
            || Overflow(rules.full(now)),
            |Overflow(s)| {
                let next = rules.credit(s, now, requests, tokens);
                (true, (next != s).then_some(Overflow(next)))
            },
        ),
    }
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
        TenantRules { bucket: BucketRules::capacity(capacity).refill_rate(rate), tokens: None, slots, newcomers: None }
    }

    /// `r` with a newcomers' pool of `n` tenants' buckets.
    fn pooled(r: TenantRules, n: u32) -> TenantRules {
        TenantRules { newcomers: Some(n), ..r }
    }

    /// `rules` with a token bucket of `capacity` LLM tokens refilling `rate` a second.
    fn with_tokens(r: TenantRules, capacity: u64, rate: f64) -> TenantRules {
        TenantRules { tokens: Some(BucketRules::capacity(capacity).refill_rate(rate)), ..r }
    }

    /// Levels with `requests` request tokens and no token level, as of `at`.
    fn levels(requests: f64, at: Instant) -> Levels {
        Levels { requests: Level { tokens: requests, at }, tokens: None }
    }

    fn table(r: &TenantRules) -> MemStore {
        let s = MemStore::default();
        ensure(&s, P, r, T0).unwrap();
        s
    }

    fn take_at(s: &impl Store, r: &TenantRules, tenant: &str, now: Instant) -> TakeOutcome {
        take(s, P, r, tenant, false, 0, now).unwrap()
    }

    /// `take` of one request and `n` LLM tokens, for a class without the burst.
    fn take_n(s: &impl Store, r: &TenantRules, tenant: &str, n: u64, now: Instant) -> TakeOutcome {
        take(s, P, r, tenant, false, n, now).unwrap()
    }

    /// The token bucket's level in `tenant`'s slot (or the overflow), refilled to `now`.
    fn token_level(s: &MemStore, r: &TenantRules, slot: Slot, now: Instant) -> f64 {
        let l = match slot {
            Slot::Table(i) => match store::read::<SlotValue>(s, &slot_key(P, i)).unwrap() {
                Some(SlotValue::Held { state, .. }) => state,
                other => panic!("{other:?}"),
            },
            Slot::Overflow => store::read::<Overflow>(s, &overflow_key(P)).unwrap().unwrap().0,
        };
        r.refill(l, now).tokens.unwrap()
    }

    /// The newcomers' pool (request tokens, LLM tokens or 0), refilled to `now`.
    fn pool_level(s: &MemStore, r: &TenantRules, now: Instant) -> (f64, f64) {
        let l = r.pool().unwrap().refill(store::read::<Pool>(s, &pool_key(P)).unwrap().unwrap().0, now);
        (l.requests.tokens, l.tokens.unwrap_or(0.0))
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
        assert!(matches!(o.take, TenantTake::Short { slot: Slot::Table(_), wait: SEC, tokens: false }), "{o:?}");
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
        // Without a newcomers' pool nothing is created there.
        assert_eq!(s.get(&pool_key(P)), Ok((None, 0)));
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
        assert_eq!(o.take, TenantTake::Short { slot: Slot::Overflow, wait: SEC, tokens: false });
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
        // A second later a's bucket is full again: b takes the slot, with full buckets.
        let o = take_at(&s, &r, "b", T0 + SEC);
        assert_eq!((o.take, o.claimed, o.displaced), (TenantTake::Taken { slot: Slot::Table(0) }, true, true));
        assert!(take_at(&s, &r, "a", T0 + SEC).overflow(), "b is active now");
        // Once b is idle, a comes back to a full bucket: exactly what it had when displaced.
        let o = take_at(&s, &r, "a", T0 + 10 * SEC);
        assert!(o.displaced, "{o:?}");
        assert_eq!(drain(&s, &r, "a", T0 + 10 * SEC), 1);
    }

    #[test]
    fn with_a_pool_a_displaced_tenant_comes_back_as_a_newcomer() {
        let r = pooled(rules(2, 1.0, 1), 1);
        let s = table(&r);
        assert!(taken(&take_at(&s, &r, "a", T0)));
        assert!(take_at(&s, &r, "b", T0).overflow(), "a is active: b overflows");
        // A second later a's bucket is full again: b takes the slot, with what the pool refilled
        // meanwhile (a took all of it at T0): one request. a's full bucket is discarded.
        let o = take_at(&s, &r, "b", T0 + SEC);
        assert_eq!((o.take, o.claimed, o.displaced), (TenantTake::Taken { slot: Slot::Table(0) }, true, true));
        assert_eq!(pool_level(&s, &r, T0 + SEC), (0.0, 0.0), "the displaced bucket did not go to the pool");
        assert!(!taken(&take_at(&s, &r, "b", T0 + SEC)));
        assert!(take_at(&s, &r, "a", T0 + SEC).overflow(), "b is active now");
        // Once b is idle, a comes back as a newcomer: the pool has refilled, so to full buckets.
        let o = take_at(&s, &r, "a", T0 + 10 * SEC);
        assert!(o.displaced && taken(&o), "{o:?}");
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
        // 1000 distinct values, two requests each, all at once. Without a pool: the table's
        // buckets plus the overflow, and not a token more.
        let r = rules(2, 1.0, slots);
        let s = table(&r);
        let granted: u32 = (0..1000).map(|i| drain(&s, &r, &format!("rot-{i}"), T0).min(2)).sum();
        assert_eq!(granted, (slots + 1) * 2);
        // With a pool of one tenant's buckets: the pool's and the overflow's, however many slots
        // the values claim.
        let r = pooled(rules(2, 1.0, slots), 1);
        let s = table(&r);
        let granted: u32 = (0..1000).map(|i| drain(&s, &r, &format!("rot-{i}"), T0).min(2)).sum();
        assert_eq!(granted, 2 + 2);
        assert_eq!(census(&s, P, &r, T0).unwrap(), Census { used: slots, active: slots });
        // The same over ten seconds: at most the capacity plus the refill of (slots + 1) buckets
        // without a pool, of the pool's and the overflow's with one (the slots' own refill goes
        // to values that never come back).
        let elapsed_s = 10.0;
        for (newcomers, buckets) in [(None, f64::from(slots + 1)), (Some(1), 2.0)] {
            let r = TenantRules { newcomers, ..rules(2, 1.0, slots) };
            let s = table(&r);
            let mut granted = 0u32;
            for i in 0..1000u64 {
                let now = T0 + i * 10 * MS;
                granted += (0..3).filter(|_| taken(&take_at(&s, &r, &format!("rot-{i}"), now))).count() as u32;
            }
            let bound = buckets * (2.0 + 1.0 * elapsed_s);
            assert!(f64::from(granted) <= bound, "{newcomers:?}: {granted} > {bound}");
            // Without a pool the table does hand out its buckets: far more than the pool's bound.
            assert!(newcomers.is_some() || granted > 24, "{granted}");
        }

        // LLM tokens the same: 1000 values at once, 30 tokens a request, plenty of requests:
        // three requests (90 of 100 tokens) from each bucket: the table's and the overflow's
        // without a pool, the pool's and the overflow's with one.
        for (newcomers, buckets) in [(None, slots + 1), (Some(1), 2)] {
            let r = TenantRules { newcomers, ..with_tokens(rules(1000, 1.0, slots), 100, 10.0) };
            let s = table(&r);
            let mut requests = 0u32;
            for i in 0..1000 {
                while taken(&take_n(&s, &r, &format!("rot-{i}"), 30, T0)) {
                    requests += 1;
                }
            }
            assert_eq!(requests, 3 * buckets, "{newcomers:?}");
        }
        // Over ten seconds, each value reserving 1 token and using 50 (settled at once, a debt
        // each time): a debt stays with the slot (or the overflow) that took it, at most one
        // request's overshoot per slot in the bound of the (slots + 1) buckets' capacity plus
        // their refill, in both modes. With the pool, what was reserved from the table came
        // from the pool.
        for newcomers in [None, Some(1)] {
            let r = TenantRules { newcomers, ..with_tokens(rules(1000, 1.0, slots), 100, 10.0) };
            let s = table(&r);
            let (mut used, mut requests, mut reserved_from_slots) = (0u64, 0u64, 0u64);
            for i in 0..1000u64 {
                let now = T0 + i * 10 * MS;
                let tenant = format!("rot-{i}");
                for _ in 0..3 {
                    let o = take_n(&s, &r, &tenant, 1, now);
                    if taken(&o) {
                        assert_eq!(settle(&s, P, &r, &tenant, o.slot(), 1, 50, now), Ok(true));
                        used += 50;
                        requests += 1;
                        reserved_from_slots += u64::from(!o.overflow());
                    }
                }
            }
            let bound = f64::from(slots + 1) * (100.0 + 10.0 * elapsed_s + 49.0);
            assert!(used as f64 <= bound, "{newcomers:?}: {used} > {bound}");
            assert!(requests > 0, "{newcomers:?}");
            if newcomers.is_some() {
                assert!(reserved_from_slots as f64 <= 100.0 + 10.0 * elapsed_s, "{reserved_from_slots} reserved");
                assert!(requests <= u64::from(slots) + 4, "{requests} requests");
            }
        }

        // A large table, all empty, and a client sending a new value on EVERY request. Without a
        // pool, every value finds an empty slot (or the overflow) and starts with full buckets:
        // the bound is the table's, 4097 tenants' buckets. With a pool of one tenant's buckets,
        // it is granted at most the pool's capacity plus its refill (one tenant's worth).
        for newcomers in [None, Some(1)] {
            for (gap, n) in [(10 * MS, 1000u64), (SEC, 100), (3 * SEC, 40)] {
                let r = TenantRules { newcomers, ..with_tokens(rules(2, 1.0, 4096), 100, 10.0) };
                let s = table(&r);
                let (mut requests, mut tokens, mut from_overflow) = (0u64, 0u64, 0u64);
                for i in 0..n {
                    let o = take_n(&s, &r, &format!("key-{i}"), 10, T0 + i * gap);
                    if taken(&o) && o.overflow() {
                        from_overflow += 1;
                    } else if taken(&o) {
                        (requests, tokens) = (requests + 1, tokens + 10);
                    }
                    assert!(o.claimed || o.overflow(), "{i}: {o:?}");
                }
                if newcomers.is_none() {
                    assert_eq!(requests + from_overflow, n, "{gap:?}: every new value started full");
                    assert!(from_overflow <= 5, "{gap:?}: {from_overflow}");
                    continue;
                }
                let elapsed_s = (gap * (n - 1)).as_secs_f64();
                let (request_bound, token_bound) = (2.0 + 1.0 * elapsed_s, 100.0 + 10.0 * elapsed_s);
                assert!(requests as f64 <= request_bound, "{gap:?}: {requests} requests > {request_bound}");
                assert!(tokens as f64 <= token_bound, "{gap:?}: {tokens} LLM tokens > {token_bound}");
                // The table is far from full: now and then a value finds its few candidates all
                // held (by active values) and goes to the overflow, which has the tenant limits.
                assert!(from_overflow as f64 <= request_bound && from_overflow <= 5, "{gap:?}: {from_overflow}");
                // Rotating at the pool's pace, a client gets about one tenant's worth, no more;
                // faster, each new value takes what little the pool refilled and mostly waits.
                if gap == SEC {
                    assert!(requests >= 90, "{requests}");
                }
                if gap == 10 * MS {
                    assert!(requests <= 2, "{requests}");
                }
            }
        }
    }

    #[test]
    fn a_steady_tenants_slot_is_unaffected_by_a_rotating_flood() {
        // acme asks ten times a second, more than its 2 a second: always active, it gets its
        // bucket (4) plus its refill, exactly, flood or no flood, pool or no pool.
        let steady = |flood: bool, slots: u32, newcomers: Option<u32>| {
            let r = TenantRules { newcomers, ..with_tokens(rules(4, 2.0, slots), 100, 10.0) };
            let s = table(&r);
            let (mut acme, mut slot, mut flooded) = (0u32, None, 0u32);
            for tick in 0..100u64 {
                let now = T0 + tick * 100 * MS;
                let o = take_n(&s, &r, "acme", 1, now);
                assert!(!o.overflow(), "{tick}: {o:?}");
                assert!(slot.is_none_or(|sl| sl == o.slot()), "{tick}: acme moved: {o:?}");
                slot = Some(o.slot());
                acme += u32::from(taken(&o));
                if flood {
                    for k in 0..20 {
                        flooded += u32::from(taken(&take_n(&s, &r, &format!("rot-{tick}-{k}"), 1, now)));
                    }
                }
            }
            (acme, flooded)
        };
        for newcomers in [None, Some(1)] {
            for slots in [64, 4096] {
                let (alone, _) = steady(false, slots, newcomers);
                let (acme, flooded) = steady(true, slots, newcomers);
                assert_eq!(acme, alone, "{slots} slots, {newcomers:?}");
                assert_eq!(alone, 4 + 2 * 9 + 1, "its bucket, plus 2 a second for 9.9 s");
                // The flood, 2000 values, got the table's and the overflow's without a pool;
                // with one, the pool's (drained by acme at T0) and the overflow's.
                let buckets = if newcomers.is_some() { 2.0 } else { f64::from(slots + 1) };
                let bound = buckets * (4.0 + 2.0 * 9.9);
                assert!(f64::from(flooded) <= bound, "{slots} slots, {newcomers:?}: {flooded} > {bound}");
            }
            // An idle tenant (full buckets) in a roomy table keeps its slot too: newcomers take
            // an empty candidate before an idle one. (1000 newcomers at one instant: acme is the
            // only idle tenant in the table.)
            let r = TenantRules { newcomers, ..rules(4, 2.0, 4096) };
            let s = table(&r);
            let slot = take_at(&s, &r, "acme", T0).slot();
            for i in 0..1000u64 {
                let o = take_at(&s, &r, &format!("rot-{i}"), T0 + 10 * SEC);
                assert!(o.slot() != slot && !o.displaced, "{newcomers:?} {i}: {o:?}");
            }
            let o = take_at(&s, &r, "acme", T0 + 20 * SEC);
            assert_eq!((o.take, o.claimed), (TenantTake::Taken { slot }, false));
            assert_eq!(drain(&s, &r, "acme", T0 + 20 * SEC), 3, "its own full bucket");
            // Precisely: a newcomer whose first candidate holds an idle tenant and whose second
            // is empty takes the empty one.
            let r = TenantRules { newcomers, ..rules(4, 2.0, 2) };
            let s = table(&r);
            let (first, then) = (tenant_with(2, &[0]), tenant_with(2, &[0, 1]));
            assert_eq!(take_at(&s, &r, &first, T0).slot(), Slot::Table(0));
            let o = take_at(&s, &r, &then, T0 + 10 * SEC);
            assert!(o.claimed && !o.displaced && o.slot() == Slot::Table(1), "{newcomers:?}: {o:?}");
            assert_eq!(take_at(&s, &r, &first, T0 + 10 * SEC).slot(), Slot::Table(0));
        }
    }

    #[test]
    fn newcomers_after_the_pool_is_drained_start_with_what_it_has_and_refill_at_their_own_rate() {
        // Requests: 4, one a second. LLM tokens: 100, 10 a second. A pool of one tenant's.
        let r = pooled(with_tokens(rules(4, 1.0, 16), 100, 10.0), 1);
        let s = table(&r);
        assert_eq!(pool_level(&s, &r, T0), (4.0, 100.0), "ensure: a full pool");
        // The first newcomer gets full buckets: the whole pool.
        let a = take_n(&s, &r, "a", 10, T0);
        assert!(a.claimed && taken(&a), "{a:?}");
        assert_eq!(token_level(&s, &r, a.slot(), T0), 90.0);
        assert_eq!(pool_level(&s, &r, T0), (0.0, 0.0));
        // The next one, at the same moment, claims a slot with nothing in it: short, with the
        // wait of its own refill.
        let b = take_n(&s, &r, "b", 10, T0);
        assert!(b.claimed && !b.overflow(), "{b:?}");
        assert_eq!(b.take, TenantTake::Short { slot: b.slot(), wait: SEC, tokens: false });
        // Half a second on, c gets what the pool refilled: half a request, 5 LLM tokens.
        let half = T0 + SEC / 2;
        let c = take_n(&s, &r, "c", 5, half);
        assert_eq!(c.take, TenantTake::Short { slot: c.slot(), wait: SEC / 2, tokens: false });
        assert!(c.claimed, "{c:?}");
        assert_eq!(token_level(&s, &r, c.slot(), half), 5.0);
        assert_eq!(pool_level(&s, &r, half), (0.0, 0.0));
        // Each refills at its own rate from there, not from the pool.
        let o = take_n(&s, &r, "b", 10, T0 + SEC);
        assert_eq!((o.take, o.claimed), (TenantTake::Taken { slot: b.slot() }, false));
        assert_eq!(token_level(&s, &r, b.slot(), T0 + SEC), 0.0);
        assert!(taken(&take_n(&s, &r, "c", 10, T0 + SEC)));
        assert_eq!(token_level(&s, &r, c.slot(), T0 + SEC), 0.0);
        assert_eq!(pool_level(&s, &r, T0 + SEC), (0.5, 5.0), "the pool refills apart");
        // Steady state: once the pool is full again (4 s for requests, 10 s for LLM tokens), a
        // newcomer gets full buckets.
        let t = half + 10 * SEC;
        let d = take_n(&s, &r, "d", 100, t);
        assert!(d.claimed && taken(&d), "{d:?}");
        assert_eq!(drain(&s, &r, "d", t), 3);
        // After a restart the shared data is empty: `ensure` writes a full pool again.
        let s = table(&r);
        assert!(taken(&take_n(&s, &r, "b", 100, T0)));
    }

    #[test]
    fn a_pool_of_n_tenants_starts_n_simultaneous_newcomers_full() {
        // Requests: 4, one a second. LLM tokens: 100, 10 a second. A pool of four tenants':
        // 16 requests and 400 LLM tokens, refilling at one tenant's 1 and 10 a second.
        let r = pooled(with_tokens(rules(4, 1.0, 64), 100, 10.0), 4);
        let s = table(&r);
        assert_eq!(pool_level(&s, &r, T0), (16.0, 400.0), "ensure: a full pool");
        // Four newcomers at once: each draws one tenant's full buckets, no more.
        for t in ["a", "b", "c", "d"] {
            let o = take_n(&s, &r, t, 100, T0);
            assert!(o.claimed && taken(&o), "{t}: {o:?}");
            assert_eq!(token_level(&s, &r, o.slot(), T0), 0.0, "{t}: one tenant's LLM tokens");
            assert_eq!(drain(&s, &r, t, T0), 3, "{t}: one tenant's request bucket");
        }
        assert_eq!(pool_level(&s, &r, T0), (0.0, 0.0));
        // The fifth, two seconds on, gets what the pool refilled meanwhile: one tenant's two
        // seconds, 2 requests and 20 LLM tokens.
        let two = T0 + 2 * SEC;
        let e = take_n(&s, &r, "e", 20, two);
        assert!(e.claimed && taken(&e), "{e:?}");
        assert_eq!(token_level(&s, &r, e.slot(), two), 0.0);
        assert_eq!(drain(&s, &r, "e", two), 1);
        assert_eq!(pool_level(&s, &r, two), (0.0, 0.0));
        // A full pool never starts one newcomer above one tenant's full buckets.
        let t = T0 + 100 * SEC;
        assert_eq!(pool_level(&s, &r, t), (16.0, 400.0), "one tenant's rate: 40 s to fill again");
        let f = take_n(&s, &r, "f", 100, t);
        assert!(f.claimed && taken(&f), "{f:?}");
        assert_eq!(token_level(&s, &r, f.slot(), t), 0.0);
        assert_eq!(drain(&s, &r, "f", t), 3);
        assert_eq!(pool_level(&s, &r, t), (12.0, 300.0));
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
        assert_eq!(take(&s, P, &one, "a", false, 0, T0 + SEC), Err(CAS_MISMATCH));
        s.conflicts.set(0);
        s.broken.set(true);
        assert_eq!(take(&s, P, &one, "a", false, 0, T0), Err(INTERNAL_FAILURE));
        assert_eq!(refund(&s, P, &one, "a", Slot::Table(0), 0, T0), Err(INTERNAL_FAILURE));
        assert_eq!(refund(&s, P, &one, "a", Slot::Overflow, 0, T0), Err(INTERNAL_FAILURE));
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
    fn a_missing_or_garbage_pool_reads_as_empty_and_refills_from_then() {
        let r = pooled(with_tokens(rules(2, 1.0, 4), 100, 10.0), 1);
        for garbage in [None, Some(&b"junk"[..]), Some(&[MAGIC, KIND_POOL, 1, 2][..])] {
            let s = MemStore::default();
            if let Some(g) = garbage {
                s.set(&pool_key(P), g, 0).unwrap();
            }
            // Not full: the newcomer gets its slot, with nothing in it...
            let o = take_n(&s, &r, "a", 10, T0);
            assert!(o.claimed && matches!(o.take, TenantTake::Short { wait: SEC, .. }), "{garbage:?}: {o:?}");
            // ... and the pool is now readable, empty as of then, and refills from there.
            assert_eq!(pool_level(&s, &r, T0), (0.0, 0.0));
            assert_eq!(pool_level(&s, &r, T0 + SEC), (1.0, 10.0));
            assert!(taken(&take_n(&s, &r, "b", 10, T0 + SEC)));
            // `ensure` (before traffic) replaces an unreadable pool with a full one, and keeps a
            // readable one as it is.
            ensure(&s, P, &r, T0 + SEC).unwrap();
            assert_eq!(pool_level(&s, &r, T0 + SEC), (0.0, 0.0));
            s.set(&pool_key(P), b"junk", 0).unwrap();
            ensure(&s, P, &r, T0 + SEC).unwrap();
            assert_eq!(pool_level(&s, &r, T0 + SEC), (2.0, 100.0));
        }
        // No slots, no pool.
        let s = table(&pooled(rules(2, 1.0, 0), 1));
        assert_eq!(s.get(&pool_key(P)), Ok((None, 0)));
        // Without `newcomers` the pool is neither created nor read: a newcomer starts full,
        // whatever is (or is not) there, and the value is left as it is.
        let r = with_tokens(rules(2, 1.0, 4), 100, 10.0);
        for garbage in [None, Some(&b"junk"[..]), Some(&Pool(r.empty(T0)).to_bytes()[..])] {
            let s = table(&r);
            if let Some(g) = garbage {
                s.set(&pool_key(P), g, 0).unwrap();
            }
            let before = s.get(&pool_key(P)).unwrap();
            let o = take_n(&s, &r, "a", 100, T0);
            assert!(o.claimed && taken(&o), "{garbage:?}: {o:?}");
            assert_eq!(drain(&s, &r, "a", T0), 1);
            ensure(&s, P, &r, T0).unwrap();
            assert_eq!(s.get(&pool_key(P)).unwrap(), before, "{garbage:?}");
        }
    }

    #[test]
    fn slot_values_round_trip_and_malformed_ones_are_rejected() {
        let plain = levels(1.5, T0);
        let both = Levels { tokens: Some(-2500.25), ..plain };
        let mut values = vec![SlotValue::Empty];
        for state in [plain, both] {
            for tenant in ["acme".to_string(), String::new(), "x".repeat(64), "x".repeat(65)] {
                values.push(SlotValue::held(&Identity::of(&tenant), state));
            }
        }
        for v in &values {
            assert_eq!(SlotValue::from_bytes(&v.to_bytes()).as_ref(), Some(v));
        }
        // Requests only: exactly the layout from before token limits; with tokens, 8 bytes more.
        let good = values[1].to_bytes();
        let level = plain.requests.encode();
        assert_eq!(good, [&[MAGIC, KIND_PLAIN, 4][..], b"acme", &level].concat());
        let with_tokens = values[5].to_bytes();
        let minus = (-2500.25f64).to_le_bytes();
        assert_eq!(with_tokens, [&[MAGIC, KIND_PLAIN | WITH_TOKENS, 4][..], b"acme", &level, &minus].concat());
        assert_eq!(values[8].to_bytes().len(), 2 + 8 + 16 + 8, "a hashed identity with both levels");
        assert_eq!(SlotValue::from_bytes(&[]), None);
        assert_eq!(SlotValue::from_bytes(&[MAGIC]), None);
        assert_eq!(SlotValue::from_bytes(&[MAGIC, KIND_EMPTY, 0]), None);
        assert_eq!(SlotValue::from_bytes(&[MAGIC, KIND_EMPTY | WITH_TOKENS]), None);
        assert_eq!(SlotValue::from_bytes(&[MAGIC, 9]), None);
        assert_eq!(SlotValue::from_bytes(&[MAGIC, 9 | WITH_TOKENS]), None);
        for g in [&good, &with_tokens] {
            assert_eq!(SlotValue::from_bytes(&g[..g.len() - 1]), None);
            assert_eq!(SlotValue::from_bytes(&[g.as_slice(), &[0]].concat()), None);
            let mut wrong_magic = g.clone();
            wrong_magic[0] ^= 1;
            assert_eq!(SlotValue::from_bytes(&wrong_magic), None);
            let mut too_long = g.clone();
            too_long[2] = 200;
            assert_eq!(SlotValue::from_bytes(&too_long), None);
            let mut unprintable = g.clone();
            unprintable[3] = b'\n';
            assert_eq!(SlotValue::from_bytes(&unprintable), None);
            // The token bit says whether 8 bytes follow the level: flipped, the length is wrong.
            let mut flipped = g.clone();
            flipped[1] ^= WITH_TOKENS;
            assert_eq!(SlotValue::from_bytes(&flipped), None);
        }
        let nan = SlotValue::held(&Identity::of("acme"), levels(f64::NAN, Instant::ZERO)).to_bytes();
        assert_eq!(SlotValue::from_bytes(&nan), None);
        for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            let v = SlotValue::held(&Identity::of("acme"), Levels { tokens: Some(bad), ..plain });
            assert_eq!(SlotValue::from_bytes(&v.to_bytes()), None, "{bad}");
        }
        for state in [plain, both] {
            let o = Overflow(state);
            assert_eq!(Overflow::from_bytes(&o.to_bytes()), Some(o));
            let mut flipped = o.to_bytes();
            flipped[1] ^= WITH_TOKENS;
            assert_eq!(Overflow::from_bytes(&flipped), None);
        }
        assert_eq!(Overflow::from_bytes(&good), None);
        assert_eq!(Overflow::from_bytes(&with_tokens), None);
        // The pool: the overflow's layout under its own kind; neither reads as the other.
        for state in [plain, both] {
            let p = Pool(state);
            let bytes = p.to_bytes();
            assert_eq!(bytes.len(), 2 + 16 + 8 * usize::from(state.tokens.is_some()));
            assert_eq!(bytes[1], state.kind(KIND_POOL));
            assert_eq!(Pool::from_bytes(&bytes), Some(p));
            assert_eq!(Overflow::from_bytes(&bytes), None);
            assert_eq!(Pool::from_bytes(&Overflow(state).to_bytes()), None);
            assert_eq!(SlotValue::from_bytes(&bytes), None);
            assert_eq!(Pool::from_bytes(&bytes[..bytes.len() - 1]), None);
            let mut flipped = bytes.clone();
            flipped[1] ^= WITH_TOKENS;
            assert_eq!(Pool::from_bytes(&flipped), None);
        }
        assert_eq!(Pool::from_bytes(&good), None);
        assert_eq!(Pool::from_bytes(&[MAGIC, KIND_POOL]), None);
    }

    #[test]
    fn take_is_both_or_neither() {
        let r = with_tokens(rules(3, 1.0, 16), 100, 10.0);
        let s = table(&r);
        let o = take_n(&s, &r, "acme", 60, T0);
        assert!(taken(&o) && o.claimed, "{o:?}");
        let slot = o.slot();
        assert_eq!(token_level(&s, &r, slot, T0), 40.0);
        // 50 tokens are not there: the request token is not taken either.
        let o = take_n(&s, &r, "acme", 50, T0);
        assert_eq!(o.take, TenantTake::Short { slot, wait: SEC, tokens: true });
        assert_eq!(token_level(&s, &r, slot, T0), 40.0);
        assert!(taken(&take_n(&s, &r, "acme", 40, T0)));
        assert_eq!(token_level(&s, &r, slot, T0), 0.0);
        // One request token left (the short request took none): a request of no LLM tokens
        // passes, then the request bucket is short, and the LLM tokens stay where they are.
        assert_eq!(drain(&s, &r, "acme", T0), 1);
        assert!(taken(&take_n(&s, &r, "globex", 10, T0)));
        assert_eq!(drain(&s, &r, "globex", T0), 2);
        let o = take_n(&s, &r, "globex", 10, T0);
        assert!(matches!(o.take, TenantTake::Short { tokens: false, wait: SEC, .. }), "{o:?}");
        assert_eq!(token_level(&s, &r, o.slot(), T0), 90.0);
        // The overflow takes both or neither too.
        let r = with_tokens(rules(3, 1.0, 0), 100, 10.0);
        let s = table(&r);
        assert!(taken(&take_n(&s, &r, "a", 70, T0)));
        let o = take_n(&s, &r, "b", 70, T0);
        assert_eq!(o.take, TenantTake::Short { slot: Slot::Overflow, wait: 4 * SEC, tokens: true });
        assert_eq!(drain(&s, &r, "b", T0), 2, "the short request took no request token");
        assert_eq!(token_level(&s, &r, Slot::Overflow, T0), 30.0);
    }

    #[test]
    fn the_short_bucket_is_reported_with_the_longer_wait() {
        // One request a second; 100 LLM tokens, 10 a second.
        let r = with_tokens(rules(1, 1.0, 16), 100, 10.0);
        let s = table(&r);
        let short = |n, now| match take_n(&s, &r, "acme", n, now).take {
            TenantTake::Short { wait, tokens, .. } => Some((wait, tokens)),
            TenantTake::Taken { .. } => None,
        };
        assert_eq!(short(100, T0), None);
        // Both short: the token bucket's 5 s beat the request bucket's 1 s...
        assert_eq!(short(50, T0), Some((5 * SEC, true)));
        // ... the request bucket's 1 s beats the token bucket's 0.5 s, and wins a tie.
        assert_eq!(short(5, T0), Some((SEC, false)));
        assert_eq!(short(10, T0), Some((SEC, false)));
        // A second later the request token is back: only the tokens are short.
        assert_eq!(short(50, T0 + SEC), Some((4 * SEC, true)));
        assert_eq!(short(10, T0 + SEC), None);
        // The request bucket alone short.
        assert_eq!(short(0, T0 + SEC), Some((SEC, false)));
        // Without a token bucket the token count is ignored: only requests can be short.
        let r = rules(1, 1.0, 16);
        let s = table(&r);
        assert!(taken(&take_n(&s, &r, "acme", u64::MAX, T0)));
        let o = take_n(&s, &r, "acme", 0, T0);
        assert!(matches!(o.take, TenantTake::Short { tokens: false, wait: SEC, .. }), "{o:?}");
    }

    #[test]
    fn a_refund_gives_back_both_never_above_full() {
        let r = with_tokens(rules(2, 1.0, 16), 100, 10.0);
        let s = table(&r);
        let slot = take_n(&s, &r, "acme", 60, T0).slot();
        assert_eq!(refund(&s, P, &r, "acme", slot, 60, T0), Ok(true));
        assert_eq!(token_level(&s, &r, slot, T0), 100.0);
        assert_eq!(census(&s, P, &r, T0).unwrap(), Census { used: 1, active: 0 }, "both full again");
        // Refunded after a refill: capped at full, requests and tokens alike.
        let slot = take_n(&s, &r, "acme", 30, T0).slot();
        assert_eq!(refund(&s, P, &r, "acme", slot, 30, T0 + 2 * SEC), Ok(true));
        assert_eq!(token_level(&s, &r, slot, T0 + 2 * SEC), 100.0);
        assert_eq!(drain(&s, &r, "acme", T0 + 2 * SEC), 2);
        // Another tenant's refund does not feed this one.
        assert_eq!(refund(&s, P, &r, "globex", slot, 30, T0 + 2 * SEC), Ok(false));
        // The overflow is refunded the same way.
        let r = with_tokens(rules(2, 1.0, 0), 100, 10.0);
        let s = table(&r);
        assert!(taken(&take_n(&s, &r, "a", 80, T0)));
        assert!(!taken(&take_n(&s, &r, "b", 80, T0)));
        assert_eq!(refund(&s, P, &r, "a", Slot::Overflow, 80, T0), Ok(true));
        assert_eq!(token_level(&s, &r, Slot::Overflow, T0), 100.0);
        assert!(taken(&take_n(&s, &r, "b", 80, T0)));
        assert!(taken(&take_n(&s, &r, "c", 20, T0)));
        assert!(!taken(&take_n(&s, &r, "d", 0, T0)), "two requests: the request bucket is empty");
    }

    #[test]
    fn settle_gives_back_what_was_not_used_and_takes_a_debt_whole() {
        let r = with_tokens(rules(10, 10.0, 16), 100, 10.0);
        let s = table(&r);
        let slot = take_n(&s, &r, "acme", 50, T0).slot();
        assert_eq!(settle(&s, P, &r, "acme", slot, 50, 20, T0), Ok(true));
        assert_eq!(token_level(&s, &r, slot, T0), 80.0);
        // Giving back never fills above full.
        assert_eq!(settle(&s, P, &r, "acme", slot, 1000, 0, T0), Ok(true));
        assert_eq!(token_level(&s, &r, slot, T0), 100.0);
        // Used 340 more than reserved: a debt beyond the whole capacity, kept whole.
        assert!(taken(&take_n(&s, &r, "acme", 10, T0)));
        assert_eq!(settle(&s, P, &r, "acme", slot, 10, 350, T0), Ok(true));
        assert_eq!(token_level(&s, &r, slot, T0), -250.0);
        assert_eq!(census(&s, P, &r, T0).unwrap(), Census { used: 1, active: 1 });
        // The refill pays it back before the next request passes, even one of no LLM tokens.
        let o = take_n(&s, &r, "acme", 0, T0);
        assert_eq!(o.take, TenantTake::Short { slot, wait: 25 * SEC, tokens: true });
        assert_eq!(take_n(&s, &r, "acme", 10, T0).take, TenantTake::Short { slot, wait: 26 * SEC, tokens: true });
        assert!(!taken(&take_n(&s, &r, "acme", 0, T0 + 24 * SEC)));
        assert!(!taken(&take_n(&s, &r, "acme", 1, T0 + 25 * SEC)));
        assert!(taken(&take_n(&s, &r, "acme", 0, T0 + 25 * SEC)));
        assert!(taken(&take_n(&s, &r, "acme", 10, T0 + 26 * SEC)));
        // Nothing to settle: no store access, no change.
        assert_eq!(settle(&s, P, &r, "acme", slot, 7, 7, T0 + 26 * SEC), Ok(true));
        assert_eq!(token_level(&s, &r, slot, T0 + 26 * SEC), 0.0);
        // Another tenant's slot, or no slot at all: nothing changes.
        assert_eq!(settle(&s, P, &r, "globex", slot, 10, 0, T0 + 26 * SEC), Ok(false));
        assert_eq!(settle(&s, P, &r, "globex", slot, 0, 10, T0 + 26 * SEC), Ok(false));
        assert_eq!(settle(&s, P, &r, "acme", Slot::Table(16), 0, 10, T0), Ok(false));
        assert_eq!(settle(&s, P, &r, "acme", Slot::Table(16), 3, 3, T0), Ok(false));
        assert_eq!(token_level(&s, &r, slot, T0 + 26 * SEC), 0.0);
        // The overflow settles the same way.
        let r = with_tokens(rules(10, 10.0, 0), 100, 10.0);
        let s = table(&r);
        assert!(taken(&take_n(&s, &r, "a", 10, T0)));
        assert_eq!(settle(&s, P, &r, "a", Slot::Overflow, 10, 200, T0), Ok(true));
        assert_eq!(token_level(&s, &r, Slot::Overflow, T0), -100.0);
        assert!(!taken(&take_n(&s, &r, "b", 0, T0 + 9 * SEC)));
        assert!(taken(&take_n(&s, &r, "b", 0, T0 + 10 * SEC)));
        // Without a token bucket there is nothing to settle.
        let r = rules(2, 1.0, 4);
        let s = table(&r);
        let slot = take_at(&s, &r, "a", T0).slot();
        assert_eq!(settle(&s, P, &r, "a", slot, 0, u64::MAX, T0), Ok(true));
        assert_eq!(drain(&s, &r, "a", T0), 1);
    }

    #[test]
    fn absurd_token_counts_stay_readable_and_never_mint() {
        let r = with_tokens(rules(10, 10.0, 1), 100, 10.0);
        let s = table(&r);
        let o = take_n(&s, &r, "a", u64::MAX, T0);
        assert!(matches!(o.take, TenantTake::Short { tokens: true, .. }) && !o.claimed, "{o:?}");
        let slot = take_n(&s, &r, "a", 1, T0).slot();
        for _ in 0..3 {
            assert_eq!(settle(&s, P, &r, "a", slot, 0, u64::MAX, T0), Ok(true));
        }
        // The debt is written whole and read back (garbage would read as an empty slot).
        assert!(token_level(&s, &r, slot, T0) < -5e19);
        assert!(take_n(&s, &r, "b", 0, T0 + 1000 * SEC).overflow(), "a tenant in debt is not idle");
        assert!(!taken(&take_n(&s, &r, "a", 0, T0 + 1000 * SEC)));
        // Given back (refund or settlement), it is repaid, and capped at full.
        assert_eq!(refund(&s, P, &r, "a", slot, u64::MAX, T0), Ok(true));
        for _ in 0..3 {
            assert_eq!(settle(&s, P, &r, "a", slot, u64::MAX, 0, T0), Ok(true));
        }
        assert_eq!(token_level(&s, &r, slot, T0), 100.0);
    }

    #[test]
    fn a_tenant_is_idle_only_when_both_buckets_are_full() {
        // One slot. Requests: 2, one a second. LLM tokens: 100, 10 a second.
        let r = with_tokens(rules(2, 1.0, 1), 100, 10.0);
        let s = table(&r);
        assert!(taken(&take_n(&s, &r, "a", 50, T0)));
        // A second later a's request bucket is full, its token bucket is not: b overflows.
        let o = take_n(&s, &r, "b", 0, T0 + SEC);
        assert!(o.overflow() && !o.displaced, "{o:?}");
        assert_eq!(census(&s, P, &r, T0 + SEC).unwrap(), Census { used: 1, active: 1 });
        // Five seconds on, both are full: b takes the slot, with full buckets.
        assert_eq!(census(&s, P, &r, T0 + 5 * SEC).unwrap(), Census { used: 1, active: 0 });
        let o = take_n(&s, &r, "b", 100, T0 + 5 * SEC);
        assert!(o.displaced && taken(&o), "{o:?}");
        // With a pool, b starts with what the pool refilled since a drew it all (2 requests, 50
        // LLM tokens), not with a's full buckets.
        let r = pooled(r, 1);
        let s = table(&r);
        assert!(taken(&take_n(&s, &r, "a", 50, T0)));
        let o = take_n(&s, &r, "b", 100, T0 + 5 * SEC);
        assert!(o.displaced && matches!(o.take, TenantTake::Short { tokens: true, .. }), "{o:?}");
        assert!(taken(&take_n(&s, &r, "b", 50, T0 + 5 * SEC)));
        // Tokens full, requests not: still active.
        let r = with_tokens(rules(2, 0.1, 1), 100, 10.0);
        let s = table(&r);
        assert!(taken(&take_n(&s, &r, "a", 0, T0)));
        assert!(take_n(&s, &r, "b", 0, T0 + 9 * SEC).overflow());
        assert!(take_n(&s, &r, "b", 0, T0 + 10 * SEC).displaced);
        // In debt, with its request bucket full: active until the debt is paid back.
        let r = with_tokens(rules(2, 1.0, 1), 100, 10.0);
        let s = table(&r);
        let slot = take_n(&s, &r, "a", 10, T0).slot();
        assert_eq!(settle(&s, P, &r, "a", slot, 10, 300, T0), Ok(true));
        // -200 LLM tokens: full again 30 s later.
        assert_eq!(token_level(&s, &r, slot, T0), -200.0);
        assert_eq!(census(&s, P, &r, T0 + 29 * SEC).unwrap(), Census { used: 1, active: 1 });
        assert!(take_n(&s, &r, "b", 0, T0 + 29 * SEC).overflow());
        assert!(take_n(&s, &r, "b", 0, T0 + 30 * SEC).displaced);
    }

    #[test]
    fn a_request_too_large_for_the_token_bucket_never_passes() {
        // 100 LLM tokens for every class, 20 more for burst classes.
        let r = with_tokens(rules(10, 1.0, 4), 100, 10.0);
        let r = TenantRules { tokens: r.tokens.map(|t| t.burst_allowance(20)), ..r };
        assert!(!too_large(&r, 100, false) && too_large(&r, 101, false));
        assert!(!too_large(&r, 120, true) && too_large(&r, 121, true));
        assert!(too_large(&r, u64::MAX, true));
        assert!(!too_large(&rules(1, 1.0, 4), u64::MAX, false), "no token bucket: never too large");
        let s = table(&r);
        // Refused with the wait the bucket computes, claiming nothing...
        let o = take_n(&s, &r, "acme", 101, T0);
        assert!(matches!(o.take, TenantTake::Short { tokens: true, wait, .. } if wait == SEC / 10), "{o:?}");
        assert!(!o.claimed);
        assert_eq!(census(&s, P, &r, T0).unwrap().used, 0);
        // ... and however long it waits.
        assert!(taken(&take_n(&s, &r, "acme", 1, T0)));
        assert!(!taken(&take_n(&s, &r, "acme", 101, T0 + 1000 * SEC)));
        assert!(taken(&take_n(&s, &r, "acme", 100, T0 + 1000 * SEC)));
        assert!(taken(&take(&s, P, &r, "acme", true, 20, T0 + 1000 * SEC).unwrap()));
        assert!(!taken(&take(&s, P, &r, "acme", true, 121, T0 + 2000 * SEC).unwrap()));
        assert!(taken(&take(&s, P, &r, "acme", true, 120, T0 + 2000 * SEC).unwrap()));
    }

    #[test]
    fn the_token_bucket_burst_reserve_is_spent_only_by_burst_classes() {
        let r = with_tokens(rules(10, 1.0, 4), 100, 10.0);
        let r = TenantRules { tokens: r.tokens.map(|t| t.burst_allowance(20)), ..r };
        let s = table(&r);
        assert!(taken(&take_n(&s, &r, "a", 100, T0)));
        let o = take_n(&s, &r, "a", 1, T0);
        assert!(matches!(o.take, TenantTake::Short { tokens: true, .. }), "{o:?}");
        assert!(taken(&take(&s, P, &r, "a", true, 20, T0).unwrap()));
        assert!(!taken(&take(&s, P, &r, "a", true, 1, T0).unwrap()));
    }

    #[test]
    fn a_clock_going_backwards_adds_no_llm_tokens() {
        let r = with_tokens(rules(100, 1.0, 1), 100, 10.0);
        let s = table(&r);
        let slot = take_n(&s, &r, "a", 100, T0 + 10 * SEC).slot();
        // A step back adds nothing, and the refill counts from the new clock (no stall).
        assert!(!taken(&take_n(&s, &r, "a", 1, T0 + 5 * SEC)));
        assert!(!taken(&take_n(&s, &r, "a", 6, T0 + 5 * SEC + SEC / 2)));
        assert!(taken(&take_n(&s, &r, "a", 5, T0 + 5 * SEC + SEC / 2)));
        // Refunds and settlements from an earlier clock are still capped, and add no refill.
        assert_eq!(settle(&s, P, &r, "a", slot, 1000, 0, T0), Ok(true));
        assert_eq!(token_level(&s, &r, slot, T0), 100.0);
        assert!(taken(&take_n(&s, &r, "a", 100, T0)));
        assert!(!taken(&take_n(&s, &r, "a", 1, T0)));
        // The overflow likewise.
        let r = with_tokens(rules(100, 1.0, 0), 100, 10.0);
        let s = table(&r);
        assert!(taken(&take_n(&s, &r, "a", 100, T0 + 10 * SEC)));
        assert!(!taken(&take_n(&s, &r, "b", 1, T0 + 2 * SEC)));
        assert!(taken(&take_n(&s, &r, "b", 10, T0 + 3 * SEC)));
    }

    #[test]
    fn a_slot_written_without_a_token_level_reads_as_a_full_token_bucket() {
        // A tenant holding a slot from before token limits were configured.
        let r = with_tokens(rules(3, 1.0, 1), 100, 10.0);
        let s = table(&r);
        let old = SlotValue::held(&Identity::of("a"), levels(1.0, T0));
        s.set(&slot_key(P, 0), &old.to_bytes(), 0).unwrap();
        let o = take_n(&s, &r, "a", 100, T0);
        assert_eq!((o.take, o.claimed), (TenantTake::Taken { slot: Slot::Table(0) }, false));
        assert!(!taken(&take_n(&s, &r, "a", 0, T0)), "its one request token is spent");
        assert_eq!(token_level(&s, &r, Slot::Table(0), T0), 0.0);
        // And the other way: token levels are dropped by rules without them.
        let r = rules(3, 1.0, 1);
        assert_eq!(drain(&s, &r, "a", T0 + 3 * SEC), 3);
        let v = store::read::<SlotValue>(&s, &slot_key(P, 0)).unwrap();
        assert!(matches!(v, Some(SlotValue::Held { state: Levels { tokens: None, .. }, .. })), "{v:?}");
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
        assert_eq!(refund(&s, P, &r, "a", Slot::Table(0), 0, T0), Ok(true));
        assert_eq!(drain(&s, &r, "a", T0), 1);
    }

    #[test]
    fn a_refund_goes_back_only_to_the_tenant_holding_the_slot_and_never_above_full() {
        let r = rules(2, 1.0, 1);
        let s = table(&r);
        let slot = take_at(&s, &r, "a", T0).slot();
        assert_eq!(refund(&s, P, &r, "a", slot, 0, T0), Ok(true));
        assert_eq!(refund(&s, P, &r, "a", slot, 0, T0), Ok(true), "already full: stays full");
        assert_eq!(drain(&s, &r, "a", T0), 2);
        // The slot passes to b once a is full again; a's late refund must not feed b.
        let b = take_at(&s, &r, "b", T0 + 5 * SEC);
        assert!(b.displaced && b.slot() == slot, "{b:?}");
        assert_eq!(refund(&s, P, &r, "a", slot, 0, T0 + 5 * SEC), Ok(false));
        assert_eq!(drain(&s, &r, "b", T0 + 5 * SEC), 1);
        assert_eq!(refund(&s, P, &r, "b", Slot::Table(7), 0, T0), Ok(false), "no such slot");
        // The overflow is refunded the same way, capped.
        let c = take_at(&s, &r, "c", T0 + 5 * SEC);
        assert!(c.overflow() && taken(&c));
        assert_eq!(refund(&s, P, &r, "c", Slot::Overflow, 0, T0 + 5 * SEC), Ok(true));
        assert_eq!(refund(&s, P, &r, "c", Slot::Overflow, 0, T0 + 5 * SEC), Ok(true));
        assert_eq!(drain(&s, &r, "c", T0 + 5 * SEC), 2);
    }

    #[test]
    fn burst_reserve_is_spent_only_by_burst_classes() {
        let r = TenantRules {
            bucket: BucketRules::capacity(2).refill_rate(1.0).burst_allowance(1),
            tokens: None,
            slots: 4,
            newcomers: None,
        };
        let s = table(&r);
        assert_eq!(drain(&s, &r, "a", T0), 2);
        assert!(taken(&take(&s, P, &r, "a", true, 0, T0).unwrap()));
        assert!(!taken(&take(&s, P, &r, "a", true, 0, T0).unwrap()));
        // With the pool, a newcomer's full buckets include the reserve too: the pool holds it.
        let r = pooled(r, 2);
        let s = table(&r);
        assert_eq!(pool_level(&s, &r, T0), (6.0, 0.0));
        for t in ["a", "b"] {
            assert_eq!(drain(&s, &r, t, T0), 2);
            assert!(taken(&take(&s, P, &r, t, true, 0, T0).unwrap()));
            assert!(!taken(&take(&s, P, &r, t, true, 0, T0).unwrap()));
        }
    }

    #[test]
    fn no_slots_puts_every_tenant_in_the_overflow() {
        let r = rules(2, 1.0, 0);
        let s = table(&r);
        assert!(take_at(&s, &r, "a", T0).overflow());
        assert!(take_at(&s, &r, "b", T0).overflow());
        assert!(!taken(&take_at(&s, &r, "c", T0)));
        assert_eq!(refund(&s, P, &r, "a", Slot::Table(0), 0, T0), Ok(false));
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
        /// The hook, and how many of this worker's writes go before it runs.
        hook: RefCell<Option<(u32, Hook<'a>)>>,
    }

    type Hook<'a> = Box<dyn FnOnce(&MemStore) + 'a>;

    impl<'a> Racy<'a> {
        fn new(inner: &'a MemStore) -> Self {
            Racy { inner, hook: RefCell::new(None) }
        }
        fn before_next_write(&self, f: impl FnOnce(&MemStore) + 'a) {
            self.before_write(1, f);
        }
        /// Runs `f` just before this worker's `n`th write from now (1: the next one).
        fn before_write(&self, n: u32, f: impl FnOnce(&MemStore) + 'a) {
            *self.hook.borrow_mut() = Some((n - 1, Box::new(f)));
        }
    }

    impl Store for Racy<'_> {
        fn get(&self, key: &str) -> Result<(Option<Vec<u8>>, u32), Status> {
            self.inner.get(key)
        }
        fn set(&self, key: &str, value: &[u8], cas: u32) -> Result<(), Status> {
            let hook = {
                let mut h = self.hook.borrow_mut();
                match h.take() {
                    Some((0, f)) => Some(f),
                    Some((n, f)) => {
                        *h = Some((n - 1, f));
                        None
                    }
                    None => None,
                }
            };
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

    /// A table of 2 slots and a tenant whose candidates are slot 0 then slot 1: slot 0 held by x,
    /// one token short of full at T0 (full again 50 ms later), slot 1 by y, idle. Rules: 3
    /// tokens, 20 a second, and a newcomers' pool of `newcomers`.
    fn two_held_slots(newcomers: Option<u32>) -> (TenantRules, String, MemStore) {
        let r = TenantRules { newcomers, ..rules(3, 20.0, 2) };
        let t = tenant_with(2, &[0, 1]);
        let mem = table(&r);
        let x = SlotValue::held(&Identity::of("x"), levels(2.0, T0));
        mem.set(&slot_key(P, 0), &x.to_bytes(), 0).unwrap();
        let y = SlotValue::held(&Identity::of("y"), levels(3.0, T0));
        mem.set(&slot_key(P, 1), &y.to_bytes(), 0).unwrap();
        (r, t, mem)
    }

    #[test]
    fn a_claim_racing_an_earlier_candidate_spends_from_the_earlier_one() {
        // Workers read the clock within moments of each other (`CLOCK_JITTER_NS`).
        for newcomers in [None, Some(1)] {
            let (r, t, mem) = two_held_slots(newcomers);
            let racy = Racy::new(&mem);
            // This worker, at T0, sees slot 0 active and goes for slot 1 (y is idle); meanwhile,
            // before its first write lands (the slot, or with the pool its draw), another worker,
            // 50 ms later, finds slot 0 idle and claims it for the same tenant (with the pool,
            // drawing all of it).
            racy.before_next_write(|m| {
                let o = take_at(m, &r, &t, T0 + SEC / 20);
                assert!(o.displaced && o.slot() == Slot::Table(0) && taken(&o), "{o:?}");
            });
            let o = take_at(&racy, &r, &t, T0);
            assert_eq!((o.take, o.claimed), (TenantTake::Taken { slot: Slot::Table(0) }, false));
            // The tenant spent two of slot 0's three tokens; slot 1 was released: full again
            // without the pool (its one token went back), empty of anything with it (the pool
            // was empty by then).
            assert_eq!(drain(&mem, &r, &t, T0 + SEC / 20), 1);
            assert_eq!(census(&mem, P, &r, T0 + SEC / 20).unwrap(), Census { used: 1, active: 1 });
            assert_eq!(store::read::<SlotValue>(&mem, &slot_key(P, 1)), Ok(Some(SlotValue::Empty)));
        }
    }

    #[test]
    fn a_claim_that_loses_the_race_returns_its_draw_to_the_pool() {
        // As above, with the pool, but the other worker claims slot 0 after this one drew the
        // whole pool and before it writes slot 1: it gets only the pool's refill of those 50 ms
        // (one token).
        let (r, t, mem) = two_held_slots(Some(1));
        let racy = Racy::new(&mem);
        racy.before_write(2, |m| {
            let o = take_at(m, &r, &t, T0 + SEC / 20);
            assert!(o.displaced && o.slot() == Slot::Table(0) && taken(&o), "{o:?}");
        });
        let o = take_at(&racy, &r, &t, T0);
        // This worker's claim of slot 1 found the earlier one: it released slot 1, put its draw
        // (3, less nothing: its own request's token went back first) back into the pool, and
        // decided again on slot 0, which has nothing left.
        assert_eq!(o.take, TenantTake::Short { slot: Slot::Table(0), wait: SEC / 20, tokens: false });
        assert!(!o.claimed);
        assert_eq!(store::read::<SlotValue>(&mem, &slot_key(P, 1)), Ok(Some(SlotValue::Empty)));
        assert_eq!(pool_level(&mem, &r, T0 + SEC / 20), (3.0, 0.0), "the draw is back, capped at full");
        // Nothing minted: the tenant spent 1 (all slot 0 got); the pool has its 3 for the next
        // newcomer.
        assert_eq!(drain(&mem, &r, "z", T0 + SEC / 20), 3);

        // A claim whose slot write loses (another worker wrote the slot first) returns its
        // draw too, and decides again: here, the overflow.
        let r = pooled(rules(3, 1.0, 1), 1);
        let mem = table(&r);
        let racy = Racy::new(&mem);
        racy.before_write(2, |m| assert!(take_at(m, &r, "z", T0).claimed));
        let o = take_at(&racy, &r, "a", T0);
        assert!(o.overflow() && taken(&o), "{o:?}");
        assert_eq!(pool_level(&mem, &r, T0), (3.0, 0.0));
        assert!(matches!(take_at(&mem, &r, "z", T0).take, TenantTake::Short { .. }), "z drew the empty pool");
        // Without the pool, the same race: a decides again (the overflow), z keeps its full
        // bucket less its one request.
        let r = rules(3, 1.0, 1);
        let mem = table(&r);
        let racy = Racy::new(&mem);
        racy.before_next_write(|m| assert!(take_at(m, &r, "z", T0).claimed));
        let o = take_at(&racy, &r, "a", T0);
        assert!(o.overflow() && taken(&o), "{o:?}");
        assert_eq!(drain(&mem, &r, "z", T0), 2);
    }

    #[test]
    fn a_released_slot_in_debt_stays_with_its_tenant() {
        // Another request of the tenant spent from the claimed slot (before the earlier claim
        // landed) and settled a debt: emptying the slot would write the debt off, so the release
        // leaves it, and the pool gets nothing back.
        let r = pooled(with_tokens(rules(3, 1.0, 2), 100, 1.0), 1);
        let t = tenant_with(2, &[0, 1]);
        let mem = table(&r);
        let id = Identity::of(&t);
        let debt = Levels { requests: Level { tokens: 2.0, at: T0 }, tokens: Some(-50.0) };
        mem.set(&slot_key(P, 1), &SlotValue::held(&id, debt).to_bytes(), 0).unwrap();
        mem.set(&slot_key(P, 0), &SlotValue::held(&id, r.full(T0)).to_bytes(), 0).unwrap();
        let drawn = Amounts { requests: 3.0, tokens: 100.0 };
        let took = Amounts { requests: 1.0, tokens: 10.0 };
        let pool = pool_level(&mem, &r, T0);
        release(&mem, P, &r, &id, 1, drawn, took, T0).unwrap();
        assert_eq!(pool_level(&mem, &r, T0), pool);
        assert_eq!(token_level(&mem, &r, Slot::Table(1), T0), -40.0, "what it took went back, the debt stays");
        // Without a debt: emptied, and the pool gets back the lesser of what is left and what
        // was drawn (others spent 20 LLM tokens from it: they do not come back).
        let left = Levels { requests: Level { tokens: 2.0, at: T0 }, tokens: Some(70.0) };
        mem.set(&slot_key(P, 1), &SlotValue::held(&id, left).to_bytes(), 0).unwrap();
        mem.set(&pool_key(P), &Pool(r.empty(T0)).to_bytes(), 0).unwrap();
        release(&mem, P, &r, &id, 1, drawn, took, T0).unwrap();
        assert_eq!(store::read::<SlotValue>(&mem, &slot_key(P, 1)), Ok(Some(SlotValue::Empty)));
        assert_eq!(pool_level(&mem, &r, T0), (3.0, 80.0));
        // A slot passed to another tenant meanwhile: untouched, nothing back.
        release(&mem, P, &r, &Identity::of("other"), 0, drawn, took, T0).unwrap();
        assert_eq!(token_level(&mem, &r, Slot::Table(0), T0), 100.0);
        assert_eq!(pool_level(&mem, &r, T0), (3.0, 80.0));

        // Without a pool: a slot in debt, or one others spent from, is left to the tenant (with
        // what this request took back); one full again is emptied.
        let r = TenantRules { newcomers: None, ..r };
        let mem = table(&r);
        mem.set(&slot_key(P, 1), &SlotValue::held(&id, debt).to_bytes(), 0).unwrap();
        release(&mem, P, &r, &id, 1, Amounts::ZERO, took, T0).unwrap();
        assert_eq!(token_level(&mem, &r, Slot::Table(1), T0), -40.0);
        mem.set(&slot_key(P, 1), &SlotValue::held(&id, left).to_bytes(), 0).unwrap();
        release(&mem, P, &r, &id, 1, Amounts::ZERO, took, T0).unwrap();
        assert_eq!(token_level(&mem, &r, Slot::Table(1), T0), 80.0, "others spent 20: not emptied");
        let almost = Levels { requests: Level { tokens: 2.0, at: T0 }, tokens: Some(90.0) };
        mem.set(&slot_key(P, 1), &SlotValue::held(&id, almost).to_bytes(), 0).unwrap();
        release(&mem, P, &r, &id, 1, Amounts::ZERO, took, T0).unwrap();
        assert_eq!(store::read::<SlotValue>(&mem, &slot_key(P, 1)), Ok(Some(SlotValue::Empty)));
        assert_eq!(mem.get(&pool_key(P)), Ok((None, 0)), "no pool touched");
    }

    /// Two workers, each running operations that another worker may interrupt between a read and
    /// a write; a ledger of what was granted per tenant, net of refunds and settlements.
    struct Sim {
        rules: TenantRules,
        tenants: Vec<String>,
        /// Per tenant: what came from table slots.
        from_slots: RefCell<HashMap<String, Granted>>,
        from_overflow: RefCell<Granted>,
        /// What requests that claimed a slot (tenants that had none) were granted, gross: with
        /// the pool, it all came out of the pool.
        claimed: RefCell<Granted>,
        /// Per worker: requests it may still refund or settle (tenant, slot, LLM tokens reserved).
        pending: RefCell<[Vec<(String, Slot, u64)>; 2]>,
        latest: RefCell<Instant>,
    }

    /// Request tokens granted net of refunds; LLM tokens granted net of refunds, and counted at
    /// their usage once settled (a debt included).
    #[derive(Clone, Copy, Debug, Default, PartialEq)]
    struct Granted {
        requests: f64,
        tokens: f64,
    }

    #[derive(Clone, Copy)]
    enum Op {
        Take { tenant: usize, tokens: u64 },
        Refund { pick: usize },
        Settle { pick: usize, used: u64 },
    }

    impl Sim {
        fn run(&self, store: &impl Store, worker: usize, op: Op, now: Instant) {
            let latest = (*self.latest.borrow()).max(now);
            *self.latest.borrow_mut() = latest;
            let mine = |pick: usize| {
                let mut pending = self.pending.borrow_mut();
                let p = &mut pending[worker];
                (!p.is_empty()).then(|| p.swap_remove(pick % p.len()))
            };
            match op {
                Op::Take { tenant, tokens } => {
                    let t = &self.tenants[tenant % self.tenants.len()];
                    let o = take(store, P, &self.rules, t, false, tokens, now).unwrap();
                    if let TenantTake::Taken { slot } = o.take {
                        let g = self.ledger(t, slot, 1.0, tokens as f64);
                        self.pending.borrow_mut()[worker].push((t.clone(), slot, tokens));
                        // At the moment of a grant, all the bucket gave (debts included) fits.
                        if let Some(b) = &self.rules.tokens {
                            let bound = self.bound(b);
                            assert!(g.tokens <= bound, "{t} via {slot:?}: {g:?} > {bound} LLM tokens");
                        }
                        // With the pool, grants to tenants without a slot fit in it, whatever their
                        // number: its capacity plus its refill since T0.
                        if o.claimed {
                            let mut c = self.claimed.borrow_mut();
                            c.requests += 1.0;
                            c.tokens += tokens as f64;
                            if let Some(pool) = self.rules.pool() {
                                assert!(c.requests <= self.bound(&pool.bucket), "pool: {c:?}");
                                if let Some(b) = &pool.tokens {
                                    assert!(c.tokens <= self.bound(b), "pool: {c:?}");
                                }
                            }
                        }
                    }
                }
                Op::Refund { pick } => {
                    if let Some((t, slot, tokens)) = mine(pick) {
                        if refund(store, P, &self.rules, &t, slot, tokens, now).unwrap() {
                            self.ledger(&t, slot, -1.0, -(tokens as f64));
                        }
                    }
                }
                Op::Settle { pick, used } => {
                    if let Some((t, slot, reserved)) = mine(pick) {
                        if settle(store, P, &self.rules, &t, slot, reserved, used, now).unwrap() {
                            self.ledger(&t, slot, 0.0, used as f64 - reserved as f64);
                        }
                    }
                }
            }
        }

        /// Adds to the ledger of `tenant`'s slots (or the overflow's); returns the new total.
        fn ledger(&self, tenant: &str, slot: Slot, requests: f64, tokens: f64) -> Granted {
            let mut slots = self.from_slots.borrow_mut();
            let mut overflow = self.from_overflow.borrow_mut();
            let g = match slot {
                Slot::Overflow => &mut *overflow,
                Slot::Table(_) => slots.entry(tenant.to_string()).or_default(),
            };
            g.requests += requests;
            g.tokens += tokens;
            *g
        }

        /// Most one bucket of rules `b` can have granted since T0.
        fn bound(&self, b: &BucketRules) -> f64 {
            let elapsed_s = (*self.latest.borrow() - T0).as_secs_f64();
            b.max + b.rate * elapsed_s + 1e-6
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

    /// Runs `steps` random steps of two workers over a table of `slots` with `tenants` tenants
    /// (and LLM-token buckets of `tokens`, a newcomers' pool of `newcomers`): the ledgers per
    /// tenant, of the overflow and of the claims, and the request and LLM-token bounds (of one
    /// bucket) at the end.
    fn interleave(
        seed: u64,
        slots: u32,
        tenants: usize,
        steps: usize,
        tokens: Option<BucketRules>,
        newcomers: Option<u32>,
    ) -> (HashMap<String, Granted>, Granted, Granted, Granted) {
        let r = TenantRules { tokens, newcomers, ..rules(3, 2.0, slots) };
        let mem = table(&r);
        let sim = Sim {
            rules: r,
            tenants: (0..tenants).map(|i| format!("tenant-{i}")).collect(),
            from_slots: RefCell::default(),
            from_overflow: RefCell::default(),
            claimed: RefCell::default(),
            pending: RefCell::default(),
            latest: RefCell::new(T0),
        };
        let mut rng = Lcg(seed);
        let mut now = T0;
        for step in 0..steps {
            now += rng.next(40) * MS;
            let op = |rng: &mut Lcg| match rng.next(20) {
                0..=11 => Op::Take { tenant: rng.next(tenants as u64) as usize, tokens: rng.next(31) },
                12..=14 => Op::Refund { pick: rng.next(1000) as usize },
                // Usage anywhere from none to well past the reservation, now and then a debt
                // beyond a whole bucket.
                15..=18 => Op::Settle { pick: rng.next(1000) as usize, used: rng.next(61) },
                _ => Op::Settle { pick: rng.next(1000) as usize, used: 100 + rng.next(200) },
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
            let bound = sim.bound(&r.bucket);
            for (t, g) in sim.from_slots.borrow().iter() {
                assert!(g.requests <= bound, "seed {seed} step {step}: {t} was granted {g:?} > {bound}");
            }
            let o = *sim.from_overflow.borrow();
            assert!(o.requests <= bound, "seed {seed} step {step}: overflow granted {o:?} > {bound}");
            if newcomers.is_none() {
                // Without the pool, everything granted came from the (slots + 1) buckets.
                let total = o.requests + sim.from_slots.borrow().values().map(|g| g.requests).sum::<f64>();
                let table = f64::from(slots + 1) * bound;
                assert!(total <= table, "seed {seed} step {step}: the table granted {total} > {table}");
            }
        }
        let bound = Granted { requests: sim.bound(&r.bucket), tokens: tokens.map_or(0.0, |b| sim.bound(&b)) };
        let granted = sim.from_slots.into_inner();
        let overflow = sim.from_overflow.into_inner();
        (granted, overflow, sim.claimed.into_inner(), bound)
    }

    #[test]
    fn two_interleaved_workers_never_grant_a_tenant_more_than_its_buckets() {
        for seed in [1, 7, 42, 1234, 99_999] {
            for tokens in [None, Some(BucketRules::capacity(100).refill_rate(20.0))] {
                for newcomers in [None, Some(1)] {
                    let at = format!("seed {seed}, {newcomers:?}");
                    // A roomy table: every tenant keeps its slot and the overflow is never needed.
                    let (granted, overflow, claimed, bound) = interleave(seed, 64, 5, 4000, tokens, newcomers);
                    assert_eq!(overflow, Granted::default(), "{at}");
                    // Each tenant claimed once (with the pool, drawing from it).
                    assert!(claimed.requests >= 1.0 && claimed.requests <= 5.0, "{at}: {claimed:?}");
                    // The schedule does press on the limits: someone got close to the bound.
                    let share = |g: &Granted| match tokens {
                        None => g.requests / bound.requests,
                        Some(_) => g.tokens / bound.tokens,
                    };
                    let most = granted.values().map(share).fold(0.0, f64::max);
                    assert!(most > 0.5, "{at}: {most} of the bound, {tokens:?}");
                    // A cramped table: displacement and the overflow in play, the same limits
                    // hold (and the pool's, or the table's: each step checked them).
                    let (_, overflow, claimed, bound) = interleave(seed, 2, 6, 4000, tokens, newcomers);
                    assert!(overflow.requests > 0.0 && overflow.requests <= bound.requests, "{at}: {overflow:?}");
                    assert!(claimed.requests >= 1.0, "{at}: {claimed:?}");
                    // 100,000 tenants: nearly every request is a tenant's first (a rotating
                    // client). With the pool, what they are granted from the table stays in its
                    // bound (checked at every step), the rest in the overflow's; without, each
                    // claim starts full: far more than one tenant's worth, within the table's.
                    let (_, overflow, claimed, bound) = interleave(seed, 64, 100_000, 2000, tokens, newcomers);
                    assert!(overflow.requests <= bound.requests, "{at}: {overflow:?}");
                    match newcomers {
                        Some(_) => {
                            assert!(claimed.requests >= 1.0 && claimed.requests <= bound.requests, "{at}: {claimed:?}");
                            assert!(overflow.requests > 0.0, "{at}: {overflow:?}");
                        }
                        None => assert!(claimed.requests > 2.0 * bound.requests, "{at}: {claimed:?} vs {bound:?}"),
                    }
                }
            }
        }
    }
}
