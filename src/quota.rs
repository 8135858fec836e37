//! Process-wide quotas beyond the token bucket: how many requests, LLM tokens (total, input or
//! output) or micro-dollars a provider may spend per day or per month, in windows aligned to the
//! calendar of a time zone or rolling.
//!
//! Pure: time comes in as an argument and the counts live in a [`Store`]. All the quotas of a
//! provider share ONE shared-data value, [`key`]`(prefix)`, so a request is checked and counted
//! in every quota at once, in one compare-and-swap: a request either counts everywhere or
//! nowhere, and workers racing each other decide again on what the winner wrote.
//!
//! # The life of a request
//!
//! 1. [`take`] reserves the request's [`Charge`] (its estimate) in every quota, or refuses it
//!    with the [`Exhausted`] quota that stopped it.
//! 2. When a later gate refuses the request, [`give_back`] returns the whole reservation.
//! 3. When the answer is in, [`settle`] replaces the estimate by what the request really used:
//!    the difference, either way, goes to the window the reservation was counted in.
//!
//! # When a request passes
//!
//! Per quota, with `used` what the current window has counted so far (reservations included):
//!
//! - **Requests and token units** (`requests`, `tokens`, `input_tokens`, `output_tokens`): the
//!   request passes when `used + charge <= limit`: it would not take the window past its limit,
//!   as a provider's own quota would refuse it.
//! - **Money** (`usd`, counted in micro-dollars): the request passes while the budget is not
//!   spent, `used < limit`, and its estimated cost is then reserved in the same compare-and-swap,
//!   so concurrent requests see it. Serial traffic spends exactly up to the budget (the last
//!   request may overshoot by at most its own cost). Concurrent traffic overshoots by at most the
//!   last admitted request's estimate plus what the requests in flight then cost beyond their
//!   estimates when they settle: at most one request's cost per request admitted before the
//!   budget was spent and settled after. This is how LiteLLM-style budgets work (check
//!   `spend < budget`, add the actual cost after), and it keeps estimates larger than the real
//!   cost from refusing the last requests of a budget.
//! - A charge of zero in a unit never refuses in that unit (a request without a price does not
//!   stop at a spent money budget).
//! - A request passes only when every quota lets it; [`Exhausted`] names the refusing quota whose
//!   `reset` is latest (the first of them on a tie): before then the request cannot pass.
//!
//! # Windows
//!
//! - **Calendar** (`rolling: false`): the day or month of the quota's time zone
//!   ([`calendar::window`]), from local midnight to local midnight (the first of the month for a
//!   month). The count restarts at 0 when a new window begins; `reset` is the window's end.
//! - **Rolling** (`rolling: true`): a token bucket holding `limit` that refills `limit` per
//!   period, a day being 86,400 s and a month 30 days ([`Quota::span`]): the GCRA form of a
//!   sliding window, so whatever was spent comes back gradually over one period. `reset` is when
//!   the bucket will hold the request's charge (money: one micro-dollar, "not spent"). The count
//!   is an `f64` (the refill is continuous): whole numbers are exact up to 2^53, and a budget of
//!   10^9 dollars (10^15 µ$, the configuration's largest) keeps it to an eighth of a
//!   micro-dollar, far below anything a request costs.
//!
//! A charge larger than the limit never passes a token or request quota; its `reset` is then the
//! end of the window (calendar) or when a bucket that large would hold it (rolling; `Instant::MAX`
//! for a limit of 0): the caller can tell from `Exhausted::limit`.
//!
//! # Settling
//!
//! - [`settle`] and [`give_back`] change only the window the reservation was counted in, and only
//!   while it is still the current one: once the window has turned, its count is over and nothing
//!   is settled (the new window neither pays for nor is refunded for a request of the old one).
//!   A reservation that a window turn overtook (its worker's clock a moment behind the worker
//!   that turned the window, so it counted in the new window) settles nothing either: the new
//!   window keeps its estimate, erring on the side of the limit.
//! - Rolling quotas have no window that ends: a settle always applies.
//! - **Debt**: a request that used more than it reserved is counted whole, never clipped: a
//!   calendar window's `used` may go above its limit, as may a rolling count (its bucket's level
//!   below zero), refusing what follows until the window turns or the count drains.
//! - Nothing goes below zero: a give-back or settle never takes `used` below 0 (nor fills a rolling
//!   bucket above full).
//!
//! # The clock
//!
//! A clock that steps back never adds: when `now`'s window starts before the stored one, the
//! stored window (and its count) is kept until the clock passes its end; a rolling bucket adds
//! nothing, and restarts its refill from the new clock (as `bucket::BucketRules::refill`).
//!
//! # The stored value
//!
//! `[MAGIC, VERSION]` then 17 bytes per quota, in configuration order: a descriptor (unit, period
//! and rolling, see `Quota::descriptor`) and two little-endian `u64`s: a calendar window's start
//! (ns) and count, or a rolling window's count (`f64` bits) and the instant it was taken at (ns).
//! Garbage, or a value written for another list of quotas (another number of them, or another
//! unit, period or rolling of any), reads as fresh state: a configuration reload that changes the
//! quotas starts them over, while one that only changes limits keeps the counts (a count above
//! a lowered limit is debt). A time zone change keeps the count when the new zone's window starts
//! before the stored one, and restarts it when after. While two configurations with different
//! quotas run at once (the moments of a reload when old and new workers overlap), each reads the
//! other's value as fresh, so counts written in that overlap may be lost.
//!
//! ```
//! use llm_ratelimit::calendar::{Period, TimeZone};
//! use llm_ratelimit::quota::{self, Charge, Quota, Unit};
//! use llm_ratelimit::store::MemStore;
//! use llm_ratelimit::time::Instant;
//! let store = MemStore::default();
//! let key = quota::key("llm_ratelimit/openai");
//! let quotas = [Quota { unit: Unit::Requests, period: Period::Day, time_zone: TimeZone::UTC, limit: 2, rolling: false }];
//! let now = Instant::from_millis(1_700_000_000_000);
//! quota::ensure(&store, &key, &quotas, now).unwrap();
//! let one = Charge { requests: 1, ..Charge::default() };
//! assert_eq!(quota::take(&store, &key, &quotas, &one, now), Ok(Ok(())));
//! assert_eq!(quota::take(&store, &key, &quotas, &one, now), Ok(Ok(())));
//! let refused = quota::take(&store, &key, &quotas, &one, now).unwrap().unwrap_err();
//! assert_eq!((refused.used, refused.limit), (2, 2));
//! ```

use crate::bucket::{BucketRules, Level};
use crate::calendar::{self, Period, TimeZone};
use crate::store::{self, Status, Store, Stored, CAS_MISMATCH};
use crate::time::{Duration, Instant};

/// First byte of the value, so foreign bytes read as fresh state.
const MAGIC: u8 = 0x51;
/// Second byte: the layout. Another version reads as fresh state.
const VERSION: u8 = 1;
const HEADER_LEN: usize = 2;
/// Bytes per quota: descriptor, then two `u64`s.
const SLOT_LEN: usize = 17;
/// Slack for float rounding, as in `BucketRules::take`.
const EPSILON: f64 = 1e-9;
/// Descriptor bits: the unit in bits 0-2, then these.
const MONTH_BIT: u8 = 1 << 3;
const ROLLING_BIT: u8 = 1 << 4;
const UNIT_MASK: u8 = 0b111;

/// What a quota counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unit {
    Requests,
    /// Input and output tokens together.
    Tokens,
    InputTokens,
    OutputTokens,
    /// Money, in millionths of a dollar (configured in dollars as `usd`).
    MicroUsd,
}

impl Unit {
    /// The configuration's names.
    pub const NAMES: [(&'static str, Unit); 5] = [
        ("requests", Unit::Requests),
        ("tokens", Unit::Tokens),
        ("input_tokens", Unit::InputTokens),
        ("output_tokens", Unit::OutputTokens),
        ("usd", Unit::MicroUsd),
    ];

    /// The configuration's name (stats, logs).
    pub fn name(self) -> &'static str {
        Self::NAMES[self.code() as usize].0
    }

    /// Index in `NAMES`; also the unit's bits in the stored descriptor.
    fn code(self) -> u8 {
        match self {
            Unit::Requests => 0,
            Unit::Tokens => 1,
            Unit::InputTokens => 2,
            Unit::OutputTokens => 3,
            Unit::MicroUsd => 4,
        }
    }
}

/// One quota, fixed by the configuration.
#[derive(Clone, Debug, PartialEq)]
pub struct Quota {
    pub unit: Unit,
    pub period: Period,
    /// Where the calendar window's days begin (unused when `rolling`).
    pub time_zone: TimeZone,
    /// Most the window counts (micro-dollars for `Unit::MicroUsd`).
    pub limit: u64,
    /// A sliding window of one period instead of the calendar's day or month.
    pub rolling: bool,
}

/// What one request counts in each unit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Charge {
    pub requests: u64,
    pub input: u64,
    pub output: u64,
    pub micro_usd: u64,
}

impl Charge {
    /// The charge in `unit`: `Tokens` is input plus output (saturating).
    pub fn of(&self, unit: Unit) -> u64 {
        match unit {
            Unit::Requests => self.requests,
            Unit::Tokens => self.input.saturating_add(self.output),
            Unit::InputTokens => self.input,
            Unit::OutputTokens => self.output,
            Unit::MicroUsd => self.micro_usd,
        }
    }
}

/// A quota refused a request.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Exhausted {
    /// The quota's place in the configured list.
    pub index: usize,
    pub unit: Unit,
    pub limit: u64,
    /// What its window has counted (may be above `limit`: debt, or money's last request).
    pub used: u64,
    /// When the request could pass: the window's end (calendar) or when the rolling bucket holds
    /// its charge (money: when it is not spent).
    pub reset: Instant,
}

impl Quota {
    /// A rolling window's length: a day is 86,400 s, a month 30 days.
    pub fn span(&self) -> Duration {
        match self.period {
            Period::Day => Duration::from_secs(86_400),
            Period::Month => Duration::from_secs(30 * 86_400),
        }
    }

    /// The rolling bucket: `limit` tokens, refilling `limit` per `span`.
    fn bucket(&self) -> BucketRules {
        BucketRules::capacity(self.limit).refill_rate(self.limit as f64 / self.span().as_secs_f64())
    }

    /// What must be left for a charge of `n` to pass: all of it, or (money) one micro-dollar.
    fn need(&self, n: u64) -> u64 {
        match self.unit {
            Unit::MicroUsd => n.min(1),
            _ => n,
        }
    }

    /// What the stored value records of the quota: a count kept for another descriptor means
    /// something else.
    fn descriptor(&self) -> u8 {
        let month = if matches!(self.period, Period::Month) { MONTH_BIT } else { 0 };
        let rolling = if self.rolling { ROLLING_BIT } else { 0 };
        self.unit.code() | month | rolling
    }

    fn window(&self, now: Instant) -> (Instant, Instant) {
        calendar::window(now, self.period, &self.time_zone)
    }

    /// A calendar count brought forward to `now`: `(start, used, end)`. A new window restarts
    /// the count; a window starting before the stored one (the clock stepped back) keeps it.
    fn current(&self, start: Instant, used: u64, now: Instant) -> (Instant, u64, Instant) {
        let (w_start, w_end) = self.window(now);
        if w_start > start {
            (w_start, 0, w_end)
        } else if w_start == start {
            (start, used, w_end)
        } else {
            (start, used, self.window(start).1)
        }
    }
}

/// The shared-data key of a provider's quotas; `prefix` is `llm_ratelimit/<name>`.
pub fn key(prefix: &str) -> String {
    format!("{prefix}/quota")
}

/// Creates the value at `key` unless there is one readable for these quotas (a garbage value, or
/// one written for other quotas, is replaced by fresh state). Call before traffic
/// (`on_configure`): Envoy's CAS cannot guard a key that does not exist yet. Nothing to do
/// without quotas.
pub fn ensure(store: &impl Store, key: &str, quotas: &[Quota], now: Instant) -> Result<(), Status> {
    if quotas.is_empty() {
        return Ok(());
    }
    for _ in 0..store::MAX_CAS_TRIES {
        let (bytes, cas) = store.get(key)?;
        if bytes.and_then(|b| State::from_bytes(&b)).is_some_and(|s| s.fits(quotas)) {
            return Ok(());
        }
        match store.set(key, &State::fresh(quotas, now).to_bytes(), cas) {
            Ok(()) => return Ok(()),
            Err(CAS_MISMATCH) => continue,
            Err(s) => return Err(s),
        }
    }
    Err(CAS_MISMATCH)
}

/// Reserves `charge` in every quota at `now`, all or none, in one compare-and-swap; a lost CAS
/// decides again, up to `store::MAX_CAS_TRIES` times, then `Err(CAS_MISMATCH)`. `Ok(Err(_))`:
/// refused, nothing reserved. Without quotas, passes without touching the store.
pub fn take(
    store: &impl Store,
    key: &str,
    quotas: &[Quota],
    charge: &Charge,
    now: Instant,
) -> Result<Result<(), Exhausted>, Status> {
    if quotas.is_empty() {
        return Ok(Ok(()));
    }
    store::update(
        store,
        key,
        || State::fresh(quotas, now),
        |read| {
            let state = read.clone().fit(quotas, now);
            // `brought`: every quota brought forward to now; `charged`: with the charge added.
            let mut brought = state.clone();
            let mut charged = state.clone();
            let mut refused: Option<Exhausted> = None;
            let mut stepped_back = false;
            for (i, q) in quotas.iter().enumerate() {
                let n = charge.of(q.unit);
                let need = q.need(n);
                let refuse = |used, reset| Exhausted { index: i, unit: q.unit, limit: q.limit, used, reset };
                let (now_slot, refusal, after) = match state.slots[i] {
                    Slot::Window { start, used } => {
                        let (start, used, end) = q.current(start, used, now);
                        let over = need > 0 && used.saturating_add(need) > q.limit;
                        let after = Slot::Window { start, used: used.saturating_add(n) };
                        (Slot::Window { start, used }, over.then(|| refuse(used, end)), after)
                    }
                    Slot::Rolling { used, at } => {
                        let b = q.bucket();
                        let level = level(&b, used, at);
                        stepped_back |= b.stepped_back(level, now);
                        let level = b.refill(level, now);
                        let short = need > 0 && level.tokens - (need as f64) < -EPSILON;
                        let after = rolling(&b, Level { tokens: level.tokens - n as f64, ..level });
                        let reset = || now + b.wait(level, need as f64, 0.0);
                        (rolling(&b, level), short.then(|| refuse(rolling_used(&b, level), reset())), after)
                    }
                };
                brought.slots[i] = now_slot;
                charged.slots[i] = after;
                if let Some(e) = refusal {
                    if refused.is_none_or(|r| e.reset > r.reset) {
                        refused = Some(e);
                    }
                }
            }
            match refused {
                // Nothing reserved; a bucket whose clock stepped back is written anyway, or its
                // refill would count from the old clock (see `BucketRules::stepped_back`).
                Some(e) => (Err(e), (stepped_back || !read.fits(quotas)).then_some(brought)),
                None => (Ok(()), (charged != read).then_some(charged)),
            }
        },
    )
}

/// Gives back all of a reservation `take` made at `reserved_at` (a later gate refused the
/// request). Never below zero; a calendar window that has turned since gets nothing back.
pub fn give_back(
    store: &impl Store,
    key: &str,
    quotas: &[Quota],
    charge: &Charge,
    reserved_at: Instant,
    now: Instant,
) -> Result<(), Status> {
    adjust(store, key, quotas, reserved_at, now, |q| (0, charge.of(q.unit)))
}

/// The answer settled a request that `take` reserved `reserved` for at `reserved_at`; it used
/// `used`. The difference, either way, goes to the window the reservation was counted in while it
/// is the current one: more than reserved is debt, counted whole; less is given back, never below
/// zero. If that calendar window has turned since, it is over and nothing is settled (nor is
/// `used` counted in the new window). Rolling quotas always settle.
pub fn settle(
    store: &impl Store,
    key: &str,
    quotas: &[Quota],
    reserved: &Charge,
    used: &Charge,
    reserved_at: Instant,
    now: Instant,
) -> Result<(), Status> {
    adjust(store, key, quotas, reserved_at, now, |q| (used.of(q.unit), reserved.of(q.unit)))
}

/// For gauges and the operator: each quota's `(used, limit, when)` at `now`, in configuration
/// order. `when` is the calendar window's end, or when the rolling bucket is full again (`now`
/// if it is). A rolling `used` is `limit` minus the level, rounded to a whole unit (above
/// `limit` in debt). Reads only.
pub fn readout(
    store: &impl Store,
    key: &str,
    quotas: &[Quota],
    now: Instant,
) -> Result<Vec<(u64, u64, Instant)>, Status> {
    if quotas.is_empty() {
        return Ok(Vec::new());
    }
    let state = store::read::<State>(store, key)?.unwrap_or_else(|| State::fresh(quotas, now)).fit(quotas, now);
    Ok(quotas
        .iter()
        .zip(&state.slots)
        .map(|(q, slot)| match *slot {
            Slot::Window { start, used } => {
                let (_, used, end) = q.current(start, used, now);
                (used, q.limit, end)
            }
            Slot::Rolling { used, at } => {
                let b = q.bucket();
                let level = b.refill(level(&b, used, at), now);
                let missing = (b.max - level.tokens).max(0.0);
                let full_at =
                    if missing <= EPSILON { now } else { now + Duration::from_secs_f64_ceil(missing / b.rate) };
                (rolling_used(&b, level), q.limit, full_at)
            }
        })
        .collect())
}

/// The CAS loop of `give_back` and `settle`: per quota, `delta(q) = (add, sub)` changes the count
/// of the reservation's window by `add - sub` (a rolling level by `sub - add`).
fn adjust(
    store: &impl Store,
    key: &str,
    quotas: &[Quota],
    reserved_at: Instant,
    now: Instant,
    delta: impl Fn(&Quota) -> (u64, u64),
) -> Result<(), Status> {
    if quotas.is_empty() {
        return Ok(());
    }
    store::update(
        store,
        key,
        || State::fresh(quotas, now),
        |read| {
            let mut next = read.clone().fit(quotas, now);
            for (q, slot) in quotas.iter().zip(next.slots.iter_mut()) {
                let (add, sub) = delta(q);
                let change = i128::from(add) - i128::from(sub);
                *slot = match *slot {
                    Slot::Window { start, used } => {
                        let (start, used, _) = q.current(start, used, now);
                        let used = if change != 0 && q.window(reserved_at).0 == start {
                            (i128::from(used) + change).clamp(0, i128::from(u64::MAX)) as u64
                        } else {
                            used
                        };
                        Slot::Window { start, used }
                    }
                    Slot::Rolling { used, at } => {
                        let b = q.bucket();
                        let level = b.refill(level(&b, used, at), now);
                        rolling(&b, Level { tokens: (level.tokens - change as f64).min(b.max), ..level })
                    }
                };
            }
            ((), (next != read).then_some(next))
        },
    )
}

/// A rolling count as its bucket's level: what is left of the limit (below zero in debt).
fn level(b: &BucketRules, used: f64, at: Instant) -> Level {
    Level { tokens: b.max - used.max(0.0), at }
}

/// A bucket's level as the rolling count it stores.
fn rolling(b: &BucketRules, level: Level) -> Slot {
    Slot::Rolling { used: b.max - level.tokens, at: level.at }
}

/// What a rolling bucket at `level` has counted, to the nearest whole unit.
fn rolling_used(b: &BucketRules, level: Level) -> u64 {
    // `as` saturates: a level deep in debt reads as `u64::MAX` at worst.
    (b.max - level.tokens).round().max(0.0) as u64
}

/// One quota's stored count.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Slot {
    /// A calendar window beginning at `start` (`Instant::ZERO`: none yet) and its count.
    Window { start: Instant, used: u64 },
    /// A rolling window's count as of `at`: what its bucket lacks of full (it drains at the
    /// refill rate). Stored as the count rather than the level, so a reload that changes the
    /// limit keeps what was spent, as a calendar window does.
    Rolling { used: f64, at: Instant },
}

/// Every quota of a provider, each with the descriptor of the quota it was written for.
#[derive(Clone, Debug, PartialEq)]
struct State {
    descriptors: Vec<u8>,
    slots: Vec<Slot>,
}

impl State {
    fn fresh(quotas: &[Quota], now: Instant) -> State {
        State {
            descriptors: quotas.iter().map(Quota::descriptor).collect(),
            slots: quotas
                .iter()
                .map(|q| {
                    if q.rolling {
                        Slot::Rolling { used: 0.0, at: now }
                    } else {
                        Slot::Window { start: Instant::ZERO, used: 0 }
                    }
                })
                .collect(),
        }
    }

    /// Whether this was written for `quotas` (limits and time zones aside).
    fn fits(&self, quotas: &[Quota]) -> bool {
        self.descriptors.len() == quotas.len() && self.descriptors.iter().zip(quotas).all(|(&d, q)| d == q.descriptor())
    }

    /// This state if it was written for `quotas`, else fresh state for them.
    fn fit(self, quotas: &[Quota], now: Instant) -> State {
        if self.fits(quotas) {
            self
        } else {
            State::fresh(quotas, now)
        }
    }
}

impl Stored for State {
    fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + SLOT_LEN * self.slots.len());
        out.extend([MAGIC, VERSION]);
        for (&d, slot) in self.descriptors.iter().zip(&self.slots) {
            let (a, b) = match *slot {
                Slot::Window { start, used } => (start.as_nanos(), used),
                Slot::Rolling { used, at } => (used.to_bits(), at.as_nanos()),
            };
            out.push(d);
            out.extend(a.to_le_bytes());
            out.extend(b.to_le_bytes());
        }
        out
    }

    fn from_bytes(b: &[u8]) -> Option<State> {
        let [MAGIC, VERSION, rest @ ..] = b else { return None };
        if rest.len() % SLOT_LEN != 0 {
            return None;
        }
        let mut state = State { descriptors: Vec::new(), slots: Vec::new() };
        for chunk in rest.chunks_exact(SLOT_LEN) {
            let (&d, words) = chunk.split_first()?;
            let a = u64::from_le_bytes(words.get(..8)?.try_into().ok()?);
            let b = u64::from_le_bytes(words.get(8..16)?.try_into().ok()?);
            if d & !(UNIT_MASK | MONTH_BIT | ROLLING_BIT) != 0 || usize::from(d & UNIT_MASK) >= Unit::NAMES.len() {
                return None;
            }
            let slot = if d & ROLLING_BIT != 0 {
                let used = f64::from_bits(a);
                if !used.is_finite() {
                    return None;
                }
                Slot::Rolling { used, at: Instant::from_nanos(b) }
            } else {
                Slot::Window { start: Instant::from_nanos(a), used: b }
            };
            state.descriptors.push(d);
            state.slots.push(slot);
        }
        Some(state)
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
    const NS: Duration = Duration::from_nanos(1);
    const HOUR: Duration = Duration::from_secs(3600);
    const DAY: Duration = Duration::from_secs(86_400);
    const K: &str = "llm_ratelimit/test/quota";
    /// 2024-03-15 17:00 UTC (10:00 in Los Angeles, daylight saving time).
    const T0: Instant = Instant::from_nanos(1_710_522_000 * 1_000_000_000);
    /// The next midnight in UTC: 2024-03-16 00:00 UTC.
    const MIDNIGHT: Instant = Instant::from_nanos(1_710_547_200 * 1_000_000_000);
    /// The next midnight in Los Angeles: 2024-03-16 00:00 PDT, 07:00 UTC.
    const LA_MIDNIGHT: Instant = Instant::from_nanos(1_710_572_400 * 1_000_000_000);
    /// The next month in UTC: 2024-04-01 00:00 UTC.
    const APRIL: Instant = Instant::from_nanos(1_711_929_600 * 1_000_000_000);

    fn la() -> TimeZone {
        TimeZone::parse("PST8PDT,M3.2.0,M11.1.0").unwrap()
    }

    fn quota(unit: Unit, period: Period, limit: u64, rolling: bool) -> Quota {
        Quota { unit, period, time_zone: TimeZone::UTC, limit, rolling }
    }

    fn daily(unit: Unit, limit: u64) -> Quota {
        quota(unit, Period::Day, limit, false)
    }

    fn requests(n: u64) -> Charge {
        Charge { requests: n, ..Charge::default() }
    }

    fn tokens(input: u64, output: u64) -> Charge {
        Charge { requests: 1, input, output, micro_usd: 0 }
    }

    fn usd(micro: u64) -> Charge {
        Charge { requests: 1, micro_usd: micro, ..Charge::default() }
    }

    fn store(quotas: &[Quota]) -> MemStore {
        let s = MemStore::default();
        ensure(&s, K, quotas, T0).unwrap();
        s
    }

    fn take_at(s: &impl Store, quotas: &[Quota], charge: Charge, now: Instant) -> Result<(), Exhausted> {
        take(s, K, quotas, &charge, now).unwrap()
    }

    /// Takes `charge` at `now` until refused: how many passed, and the refusal.
    fn drain(s: &impl Store, quotas: &[Quota], charge: Charge, now: Instant) -> (u32, Exhausted) {
        let mut n = 0;
        loop {
            match take_at(s, quotas, charge, now) {
                Ok(()) => n += 1,
                Err(e) => return (n, e),
            }
        }
    }

    fn used(s: &impl Store, quotas: &[Quota], now: Instant) -> Vec<u64> {
        readout(s, K, quotas, now).unwrap().into_iter().map(|r| r.0).collect()
    }

    fn state(s: &impl Store) -> State {
        store::read::<State>(s, K).unwrap().unwrap()
    }

    /// `a` and `b` within a microsecond (float rates round waits by a nanosecond or so).
    fn close(a: Instant, b: Instant) -> bool {
        a.abs_diff(b) <= Duration::from_nanos(1_000)
    }

    #[test]
    fn units_name_and_charge_as_configured() {
        for (name, unit) in Unit::NAMES {
            assert_eq!(unit.name(), name);
        }
        let c = Charge { requests: 1, input: 3, output: 4, micro_usd: 5 };
        assert_eq!(Unit::NAMES.map(|(_, u)| c.of(u)), [1, 7, 3, 4, 5]);
        assert_eq!(Charge { input: u64::MAX, output: 1, ..c }.of(Unit::Tokens), u64::MAX);
        assert_eq!(key("llm_ratelimit/openai"), "llm_ratelimit/openai/quota");
        assert_eq!(quota(Unit::Tokens, Period::Month, 1, true).span(), 30 * DAY);
        assert_eq!(quota(Unit::Tokens, Period::Day, 1, true).span(), DAY);
    }

    #[test]
    fn a_daily_request_limit_is_exact_at_the_boundary() {
        let qs = [daily(Unit::Requests, 3)];
        let s = store(&qs);
        let (n, e) = drain(&s, &qs, requests(1), T0);
        assert_eq!(n, 3);
        assert_eq!(e, Exhausted { index: 0, unit: Unit::Requests, limit: 3, used: 3, reset: MIDNIGHT });
        assert!(take_at(&s, &qs, requests(1), MIDNIGHT - NS).is_err());
        // A new day: the count starts over, the next reset is a day later.
        let (n, e) = drain(&s, &qs, requests(1), MIDNIGHT);
        assert_eq!((n, e.used, e.reset), (3, 3, MIDNIGHT + DAY));
        assert_eq!(readout(&s, K, &qs, MIDNIGHT + HOUR), Ok(vec![(3, 3, MIDNIGHT + DAY)]));
        // A charge passes when it fits whole: used + charge <= limit.
        let s = store(&qs);
        assert_eq!(take_at(&s, &qs, requests(2), T0), Ok(()));
        assert_eq!(take_at(&s, &qs, requests(2), T0).unwrap_err().used, 2);
        assert_eq!(take_at(&s, &qs, requests(1), T0), Ok(()));
        assert_eq!(used(&s, &qs, T0), [3]);
    }

    #[test]
    fn daily_tokens_settle_to_what_was_used() {
        let qs = [daily(Unit::Tokens, 1000), daily(Unit::InputTokens, 600), daily(Unit::OutputTokens, 500)];
        let s = store(&qs);
        assert_eq!(take_at(&s, &qs, tokens(100, 400), T0), Ok(()));
        assert_eq!(used(&s, &qs, T0), [500, 100, 400]);
        settle(&s, K, &qs, &tokens(100, 400), &tokens(50, 150), T0, T0 + SEC).unwrap();
        assert_eq!(used(&s, &qs, T0), [200, 50, 150]);
        // Refused by the output quota alone: nothing reserved anywhere.
        let e = take_at(&s, &qs, tokens(0, 500), T0 + SEC).unwrap_err();
        assert_eq!((e.index, e.unit, e.used, e.reset), (2, Unit::OutputTokens, 150, MIDNIGHT));
        assert_eq!(used(&s, &qs, T0), [200, 50, 150]);
        // Exactly up to the limits.
        assert_eq!(take_at(&s, &qs, tokens(500, 300), T0 + SEC), Ok(()));
        assert_eq!(used(&s, &qs, T0), [1000, 550, 450]);
        assert_eq!(take_at(&s, &qs, tokens(1, 0), T0 + SEC).unwrap_err().index, 0);
        // Settling frees what the estimate held beyond the answer.
        settle(&s, K, &qs, &tokens(500, 300), &tokens(400, 100), T0 + SEC, T0 + 2 * SEC).unwrap();
        assert_eq!(used(&s, &qs, T0 + 2 * SEC), [700, 450, 250]);
        assert_eq!(take_at(&s, &qs, tokens(150, 150), T0 + 2 * SEC), Ok(()));
        // Settling exactly what was reserved changes nothing (and writes nothing).
        let before = s.get(K).unwrap();
        settle(&s, K, &qs, &tokens(150, 150), &tokens(150, 150), T0 + 2 * SEC, T0 + 3 * SEC).unwrap();
        assert_eq!(s.get(K).unwrap(), before);
    }

    #[test]
    fn a_usd_budget_serves_until_spent_then_resets_at_local_midnight() {
        let budget =
            Quota { unit: Unit::MicroUsd, period: Period::Day, time_zone: la(), limit: 1_000_000, rolling: false };
        let qs = [budget.clone()];
        let s = store(&qs);
        let mut served = 0;
        let mut now = T0;
        loop {
            match take_at(&s, &qs, usd(30_000), now) {
                Ok(()) => served += 1,
                Err(e) => {
                    assert_eq!(
                        e,
                        Exhausted {
                            index: 0,
                            unit: Unit::MicroUsd,
                            limit: 1_000_000,
                            used: 1_000_000,
                            reset: LA_MIDNIGHT
                        }
                    );
                    break;
                }
            }
            settle(&s, K, &qs, &usd(30_000), &usd(10_000), now, now + SEC).unwrap();
            now += 2 * SEC;
        }
        // Estimates three times the cost do not refuse the last requests of the budget.
        assert_eq!(served, 100);
        assert!(take_at(&s, &qs, usd(30_000), LA_MIDNIGHT - NS).is_err());
        assert_eq!(take_at(&s, &qs, usd(30_000), LA_MIDNIGHT), Ok(()));
        assert_eq!(readout(&s, K, &qs, LA_MIDNIGHT), Ok(vec![(30_000, 1_000_000, LA_MIDNIGHT + DAY)]));
        // The same traffic against a token-style limit (used + charge <= limit) stops at 98.
        let qs = [Quota { unit: Unit::Tokens, ..budget }];
        let s = store(&qs);
        let mut served = 0;
        while take_at(&s, &qs, tokens(0, 30_000), T0).is_ok() {
            settle(&s, K, &qs, &tokens(0, 30_000), &tokens(0, 10_000), T0, T0).unwrap();
            served += 1;
        }
        assert_eq!(served, 98);
    }

    #[test]
    fn a_spent_budget_admits_one_last_request_of_any_cost() {
        let qs = [daily(Unit::MicroUsd, 100)];
        let s = store(&qs);
        assert_eq!(take_at(&s, &qs, usd(99), T0), Ok(()));
        // 99 < 100: not spent, so a request costing far more passes and is reserved whole.
        assert_eq!(take_at(&s, &qs, usd(5_000), T0), Ok(()));
        assert_eq!(used(&s, &qs, T0), [5_099]);
        assert_eq!(take_at(&s, &qs, usd(1), T0).unwrap_err().used, 5_099);
        // A request without a price is not stopped by a spent budget.
        assert_eq!(take_at(&s, &qs, usd(0), T0), Ok(()));
    }

    #[test]
    fn a_zero_charge_never_refuses_in_its_unit() {
        let qs = [daily(Unit::Tokens, 10), daily(Unit::MicroUsd, 10), daily(Unit::Requests, 0)];
        let s = store(&qs);
        // A limit of 0 refuses any request charged in it ...
        assert_eq!(take_at(&s, &qs, tokens(1, 0), T0).unwrap_err().index, 2);
        // ... and nothing else.
        let free = Charge::default();
        assert_eq!(take_at(&s, &qs, free, T0), Ok(()));
        let spend = Charge { input: 10, micro_usd: 10, ..free };
        assert_eq!(take_at(&s, &qs, spend, T0), Ok(()));
        assert_eq!(take_at(&s, &qs, Charge { micro_usd: 1, ..free }, T0).unwrap_err().index, 1);
        assert_eq!(take_at(&s, &qs, Charge { input: 1, ..free }, T0).unwrap_err().index, 0);
        assert_eq!(take_at(&s, &qs, free, T0), Ok(()));
    }

    #[test]
    fn the_refusal_names_the_quota_that_frees_last() {
        let qs = [daily(Unit::Requests, 1), quota(Unit::Requests, Period::Month, 1, false), daily(Unit::Tokens, 5)];
        let s = store(&qs);
        assert_eq!(take_at(&s, &qs, tokens(5, 0), T0), Ok(()));
        // All three refuse: the month's quota resets last.
        let e = take_at(&s, &qs, tokens(5, 0), T0).unwrap_err();
        assert_eq!((e.index, e.reset), (1, APRIL));
        // Two refuse with the same reset: the first of them.
        let qs2 = [daily(Unit::Requests, 1), daily(Unit::Tokens, 5)];
        let s2 = store(&qs2);
        assert_eq!(take_at(&s2, &qs2, tokens(5, 0), T0), Ok(()));
        assert_eq!(take_at(&s2, &qs2, tokens(5, 0), T0).unwrap_err().index, 0);
        // The next day only the month's quota is left to refuse, and a refusal reserves nothing.
        let e = take_at(&s, &qs, tokens(5, 0), MIDNIGHT).unwrap_err();
        assert_eq!((e.index, e.used, e.reset), (1, 1, APRIL));
        assert_eq!(used(&s, &qs, MIDNIGHT), [0, 1, 0]);
        assert_eq!(take_at(&s, &qs, tokens(5, 0), APRIL), Ok(()));
    }

    #[test]
    fn a_settle_after_the_window_turned_settles_nothing() {
        let qs = [daily(Unit::Tokens, 1000)];
        let s = store(&qs);
        let before = MIDNIGHT - SEC;
        take_at(&s, &qs, tokens(0, 600), before).unwrap();
        take_at(&s, &qs, tokens(0, 100), before).unwrap();
        // Settled after midnight: the old day is over, and the new one neither pays nor is refunded.
        settle(&s, K, &qs, &tokens(0, 600), &tokens(0, 100), before, MIDNIGHT + SEC).unwrap();
        assert_eq!(used(&s, &qs, MIDNIGHT + SEC), [0]);
        settle(&s, K, &qs, &tokens(0, 100), &tokens(0, 900), before, MIDNIGHT + SEC).unwrap();
        assert_eq!(used(&s, &qs, MIDNIGHT + SEC), [0]);
        take_at(&s, &qs, tokens(0, 300), MIDNIGHT + SEC).unwrap();
        give_back(&s, K, &qs, &tokens(0, 600), before, MIDNIGHT + 2 * SEC).unwrap();
        assert_eq!(used(&s, &qs, MIDNIGHT + 2 * SEC), [300]);
        // A reservation of the current window settles as usual.
        settle(&s, K, &qs, &tokens(0, 300), &tokens(0, 50), MIDNIGHT + SEC, MIDNIGHT + 3 * SEC).unwrap();
        assert_eq!(used(&s, &qs, MIDNIGHT + 3 * SEC), [50]);
    }

    #[test]
    fn give_back_returns_the_whole_reservation_never_below_zero() {
        let qs = [daily(Unit::Requests, 2), quota(Unit::Requests, Period::Day, 24, true)];
        let s = store(&qs);
        assert_eq!(drain(&s, &qs, requests(1), T0).0, 2);
        give_back(&s, K, &qs, &requests(1), T0, T0 + SEC).unwrap();
        assert_eq!(used(&s, &qs, T0 + SEC), [1, 1]);
        assert_eq!(take_at(&s, &qs, requests(1), T0 + SEC), Ok(()));
        // More than was taken: down to zero (calendar) and a full bucket (rolling), no further.
        give_back(&s, K, &qs, &requests(9), T0, T0 + SEC).unwrap();
        assert_eq!(used(&s, &qs, T0 + SEC), [0, 0]);
        let qs_rolling = [qs[1].clone()];
        let s = store(&qs_rolling);
        give_back(&s, K, &qs_rolling, &requests(5), T0, T0).unwrap();
        assert_eq!(drain(&s, &qs_rolling, requests(1), T0).0, 24);
        // Without quotas there is nothing to do (and the store is not touched).
        let broken = MemStore::default();
        broken.broken.set(true);
        assert_eq!(give_back(&broken, K, &[], &requests(1), T0, T0), Ok(()));
    }

    #[test]
    fn a_rolling_window_refills_gradually() {
        // 24 a day: one back every hour.
        let qs = [quota(Unit::Requests, Period::Day, 24, true)];
        let s = store(&qs);
        let (n, e) = drain(&s, &qs, requests(1), T0);
        assert_eq!((n, e.used, e.limit), (24, 24, 24));
        assert!(close(e.reset, T0 + HOUR), "{e:?}");
        let r = readout(&s, K, &qs, T0).unwrap();
        assert!(r[0].0 == 24 && close(r[0].2, T0 + DAY), "{r:?}");
        assert!(take_at(&s, &qs, requests(1), T0 + HOUR - MS).is_err());
        assert_eq!(drain(&s, &qs, requests(1), T0 + HOUR + MS).0, 1);
        assert_eq!(drain(&s, &qs, requests(1), T0 + 4 * HOUR).0, 3);
        // Unlike a calendar day, midnight restores nothing; a full period restores all.
        assert_eq!(drain(&s, &qs, requests(1), MIDNIGHT).0, 3);
        assert_eq!(drain(&s, &qs, requests(1), MIDNIGHT + DAY).0, 24);
        // A month is 30 days: 30 a month is one a day.
        let qs = [quota(Unit::Requests, Period::Month, 30, true)];
        let s = store(&qs);
        assert_eq!(drain(&s, &qs, requests(1), T0).0, 30);
        assert!(close(take_at(&s, &qs, requests(1), T0).unwrap_err().reset, T0 + DAY));
        // A money budget: passes while not spent, reserving the whole charge.
        let qs = [quota(Unit::MicroUsd, Period::Day, 1_000_000, true)];
        let s = store(&qs);
        assert_eq!(drain(&s, &qs, usd(600_000), T0).0, 2);
        let e = take_at(&s, &qs, usd(600_000), T0).unwrap_err();
        // 200,000 µ$ in debt: passes again once one µ$ is back, 200,001 / 10^6 of a day later.
        assert_eq!(e.used, 1_200_000);
        assert!(close(e.reset, T0 + Duration::from_nanos(17_280_086_400_000)), "{e:?}");
        let r = readout(&s, K, &qs, T0).unwrap();
        assert!(r[0].0 == 1_200_000 && close(r[0].2, T0 + DAY + DAY / 5), "{r:?}");
        assert!(take_at(&s, &qs, usd(600_000), e.reset - MS).is_err());
        assert_eq!(take_at(&s, &qs, usd(600_000), e.reset), Ok(()));
    }

    #[test]
    fn debt_is_counted_whole() {
        let qs = [daily(Unit::Tokens, 1000), quota(Unit::Tokens, Period::Day, 1000, true)];
        let s = store(&qs);
        take_at(&s, &qs, tokens(0, 500), T0).unwrap();
        settle(&s, K, &qs, &tokens(0, 500), &tokens(0, 2500), T0, T0).unwrap();
        assert_eq!(used(&s, &qs, T0), [2500, 2500]);
        let r = readout(&s, K, &qs, T0).unwrap();
        assert!(close(r[1].2, T0 + 5 * DAY / 2), "{r:?}");
        // Refused by both; the rolling bucket is 1500 in debt and needs 1501 / 1000 of a day.
        let e = take_at(&s, &qs, tokens(1, 0), T0).unwrap_err();
        assert_eq!((e.index, e.used), (1, 2500));
        assert!(close(e.reset, T0 + Duration::from_nanos(129_686_400_000_000)), "{e:?}");
        // The calendar day's debt ends with the day; the rolling debt drains at the refill rate.
        assert_eq!(take_at(&s, &qs, tokens(1, 0), MIDNIGHT).unwrap_err().index, 1);
        assert_eq!(used(&s, &qs, MIDNIGHT), [0, 2208]);
        assert_eq!(take_at(&s, &qs, tokens(1, 0), e.reset), Ok(()));
        let calendar = [qs[0].clone()];
        let s = store(&calendar);
        take_at(&s, &calendar, tokens(0, 500), T0).unwrap();
        settle(&s, K, &calendar, &tokens(0, 500), &tokens(0, 2500), T0, T0).unwrap();
        let e = take_at(&s, &calendar, tokens(1, 0), T0).unwrap_err();
        assert_eq!((e.used, e.reset), (2500, MIDNIGHT));
        assert_eq!(take_at(&s, &calendar, tokens(1, 0), MIDNIGHT), Ok(()));
    }

    #[test]
    fn a_clock_stepping_back_never_adds() {
        let qs = [daily(Unit::Requests, 2)];
        let s = store(&qs);
        let tomorrow = MIDNIGHT + HOUR;
        assert_eq!(drain(&s, &qs, requests(1), tomorrow).0, 2);
        // The clock steps back into yesterday: tomorrow's window and count stay.
        let e = take_at(&s, &qs, requests(1), MIDNIGHT - HOUR).unwrap_err();
        assert_eq!((e.used, e.reset), (2, MIDNIGHT + DAY));
        assert_eq!(readout(&s, K, &qs, MIDNIGHT - HOUR), Ok(vec![(2, 2, MIDNIGHT + DAY)]));
        // A reservation of the kept window is still given back from the earlier clock.
        give_back(&s, K, &qs, &requests(1), tomorrow, MIDNIGHT - HOUR).unwrap();
        assert_eq!(used(&s, &qs, MIDNIGHT - HOUR), [1]);
        assert_eq!(state(&s).slots[0], Slot::Window { start: MIDNIGHT, used: 1 });
        // Rolling: nothing added by the step, and the refill counts from the new clock.
        let qs = [quota(Unit::Requests, Period::Day, 24, true)];
        let s = store(&qs);
        assert_eq!(drain(&s, &qs, requests(1), T0 + 10 * HOUR).0, 24);
        assert!(take_at(&s, &qs, requests(1), T0 + 5 * HOUR).is_err());
        assert!(take_at(&s, &qs, requests(1), T0 + 5 * HOUR + HOUR / 2).is_err());
        assert_eq!(drain(&s, &qs, requests(1), T0 + 6 * HOUR + MS).0, 1);
    }

    #[test]
    fn cas_conflicts_are_retried_and_store_failures_are_errors() {
        let qs = [daily(Unit::Requests, 3), quota(Unit::Tokens, Period::Day, 100, true)];
        let s = store(&qs);
        s.conflicts.set(5);
        assert_eq!(take_at(&s, &qs, tokens(10, 0), T0), Ok(()));
        assert_eq!(s.conflicts.get(), 0);
        // The lost writes counted nothing.
        assert_eq!(used(&s, &qs, T0), [1, 10]);
        s.conflicts.set(3);
        settle(&s, K, &qs, &tokens(10, 0), &tokens(4, 0), T0, T0).unwrap();
        s.conflicts.set(3);
        give_back(&s, K, &qs, &tokens(4, 0), T0, T0).unwrap();
        assert_eq!(used(&s, &qs, T0), [0, 0]);
        // Other workers winning every time: an error, not a loop.
        s.conflicts.set(10_000);
        assert_eq!(take(&s, K, &qs, &tokens(1, 0), T0), Err(CAS_MISMATCH));
        assert_eq!(settle(&s, K, &qs, &tokens(1, 0), &tokens(2, 0), T0, T0), Err(CAS_MISMATCH));
        assert_eq!(give_back(&s, K, &qs, &tokens(1, 0), T0, T0 + SEC), Err(CAS_MISMATCH));
        s.set(K, b"junk", 0).unwrap_err();
        s.conflicts.set(0);
        s.set(K, b"junk", 0).unwrap();
        s.conflicts.set(10_000);
        assert_eq!(ensure(&s, K, &qs, T0), Err(CAS_MISMATCH));
        s.conflicts.set(0);
        s.broken.set(true);
        assert_eq!(take(&s, K, &qs, &tokens(1, 0), T0), Err(INTERNAL_FAILURE));
        assert_eq!(settle(&s, K, &qs, &tokens(1, 0), &tokens(2, 0), T0, T0), Err(INTERNAL_FAILURE));
        assert_eq!(give_back(&s, K, &qs, &tokens(1, 0), T0, T0), Err(INTERNAL_FAILURE));
        assert_eq!(readout(&s, K, &qs, T0), Err(INTERNAL_FAILURE));
        assert_eq!(ensure(&s, K, &qs, T0), Err(INTERNAL_FAILURE));
        // No quotas: nothing to check, and the store is not asked.
        assert_eq!(take(&s, K, &[], &tokens(1, 0), T0), Ok(Ok(())));
        assert_eq!(settle(&s, K, &[], &tokens(1, 0), &tokens(2, 0), T0, T0), Ok(()));
        assert_eq!(readout(&s, K, &[], T0), Ok(vec![]));
        assert_eq!(ensure(&s, K, &[], T0), Ok(()));
    }

    #[test]
    fn garbage_and_values_of_other_quotas_read_as_fresh() {
        let qs = [daily(Unit::Requests, 2), quota(Unit::MicroUsd, Period::Month, 50, true)];
        let s = MemStore::default();
        s.set(K, b"not a quota", 0).unwrap();
        assert_eq!(readout(&s, K, &qs, T0), Ok(vec![(0, 2, MIDNIGHT), (0, 50, T0)]));
        assert_eq!(take_at(&s, &qs, usd(10), T0), Ok(()));
        assert_eq!(used(&s, &qs, T0), [1, 10]);
        // Limits changed by a reload: the counts stay.
        let raised = [daily(Unit::Requests, 5), quota(Unit::MicroUsd, Period::Month, 100, true)];
        ensure(&s, K, &raised, T0).unwrap();
        assert_eq!(used(&s, &raised, T0), [1, 10]);
        // ... also when lowered below them: a rolling count above its limit drains as debt does.
        let lowered = [daily(Unit::Requests, 1), quota(Unit::MicroUsd, Period::Month, 5, true)];
        assert_eq!(used(&s, &lowered, T0), [1, 10]);
        assert_eq!(take_at(&s, &lowered, Charge::default(), T0), Ok(()));
        assert_eq!(take_at(&s, &lowered, usd(1), T0).unwrap_err().index, 1);
        // Another unit, period, kind or number of quotas: fresh counts, and `ensure` writes them.
        let others: [&[Quota]; 4] = [
            &[daily(Unit::Tokens, 2), qs[1].clone()],
            &[quota(Unit::Requests, Period::Month, 2, false), qs[1].clone()],
            &[daily(Unit::Requests, 2), quota(Unit::MicroUsd, Period::Month, 50, false)],
            &[daily(Unit::Requests, 2)],
        ];
        for other in others {
            assert!(used(&s, other, T0).iter().all(|&u| u == 0), "{other:?}");
        }
        ensure(&s, K, others[3], T0).unwrap();
        assert_eq!(state(&s), State::fresh(others[3], T0));
        // `ensure` keeps a readable value of its quotas and replaces garbage.
        take_at(&s, others[3], requests(1), T0).unwrap();
        ensure(&s, K, others[3], T0).unwrap();
        assert_eq!(used(&s, others[3], T0), [1]);
        s.set(K, &[MAGIC, VERSION, 0xff], 0).unwrap();
        ensure(&s, K, &qs, T0).unwrap();
        assert_eq!(state(&s), State::fresh(&qs, T0));
    }

    #[test]
    fn values_round_trip_and_malformed_ones_are_rejected() {
        let qs = [daily(Unit::OutputTokens, 7), quota(Unit::MicroUsd, Period::Month, 9, true)];
        let mut st = State::fresh(&qs, T0);
        st.slots[0] = Slot::Window { start: MIDNIGHT, used: u64::MAX };
        st.slots[1] = Slot::Rolling { used: 1012.5, at: T0 };
        let good = st.to_bytes();
        assert_eq!(good.len(), HEADER_LEN + 2 * SLOT_LEN);
        assert_eq!(State::from_bytes(&good), Some(st.clone()));
        assert!(State::from_bytes(&good).unwrap().fits(&qs));
        assert_eq!(State::from_bytes(&[MAGIC, VERSION]).map(|s| s.slots.len()), Some(0));
        assert_eq!(State::from_bytes(&[]), None);
        assert_eq!(State::from_bytes(&[MAGIC]), None);
        assert_eq!(State::from_bytes(&good[..good.len() - 1]), None);
        assert_eq!(State::from_bytes(&[good.as_slice(), &[0]].concat()), None);
        for (at, bad) in [(0, MAGIC ^ 1), (1, VERSION + 1), (2, 5), (2, 0x20), (2, 0x80), (19, 7 | ROLLING_BIT)] {
            let mut b = good.clone();
            b[at] = bad;
            assert_eq!(State::from_bytes(&b), None, "byte {at} = {bad:#x}");
        }
        let mut nan = st.clone();
        nan.slots[1] = Slot::Rolling { used: f64::NAN, at: T0 };
        assert_eq!(State::from_bytes(&nan.to_bytes()), None);
        nan.slots[1] = Slot::Rolling { used: f64::NEG_INFINITY, at: T0 };
        assert_eq!(State::from_bytes(&nan.to_bytes()), None);
    }

    /// A store that lets another worker run a whole operation between this worker's read and its
    /// next write, as two Envoy workers do.
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
    fn a_worker_racing_between_read_and_write_is_counted_too() {
        let qs = [daily(Unit::Requests, 2)];
        let mem = store(&qs);
        let racy = Racy::new(&mem);
        racy.before_next_write(|m| assert_eq!(take_at(m, &qs, requests(1), T0), Ok(())));
        assert_eq!(take_at(&racy, &qs, requests(1), T0), Ok(()));
        assert_eq!(used(&mem, &qs, T0), [2]);
        // The loser decides again on what the winner wrote: now it is refused.
        racy.before_next_write(|m| settle(m, K, &qs, &requests(1), &requests(1), T0, T0).unwrap());
        assert!(take_at(&racy, &qs, requests(1), T0).is_err());
        racy.before_next_write(|m| give_back(m, K, &qs, &requests(1), T0, T0).unwrap());
        give_back(&racy, K, &qs, &requests(1), T0, T0).unwrap();
        assert_eq!(used(&mem, &qs, T0), [0]);
    }

    /// One request of the interleaving test: what it reserved, what it will settle, and per quota
    /// the window its `reserved_at` falls in and the window it was counted in.
    struct Req {
        at: Instant,
        reserved: Charge,
        used: Charge,
        own_window: Vec<Instant>,
        counted_in: Vec<Instant>,
    }

    #[derive(Clone, Copy, Debug)]
    enum Op {
        Take,
        Settle(usize),
        GiveBack(usize),
    }

    /// Workers taking, settling and giving back over one store, a ledger of what every calendar
    /// window should hold, and per money window the most it may hold.
    struct Sim {
        quotas: Vec<Quota>,
        pending: RefCell<Vec<Vec<Req>>>,
        /// Per calendar quota: window start -> what its requests count (reserved or used).
        ledger: RefCell<Vec<HashMap<Instant, i128>>>,
        /// Per window of the money quota: `limit - 1` plus what the requests pending at its last
        /// paid admission may still add (the admitted charge, and settles above reservations).
        usd_bound: RefCell<HashMap<Instant, i128>>,
        /// The rolling quota: requests granted net of give-backs.
        rolling_net: RefCell<i128>,
        latest: RefCell<Instant>,
        /// Per quota: the most it held (calendar: in any window; rolling: net granted).
        most: RefCell<Vec<i128>>,
        rng: RefCell<Lcg>,
    }

    const USD: usize = 3;

    impl Sim {
        fn charge(&self) -> (Charge, Charge) {
            let mut rng = self.rng.borrow_mut();
            // A quarter of the requests are free of tokens and money: they count only as requests.
            let free = rng.next(4) == 0;
            let (input, output) = if free { (0, 0) } else { (rng.next(200), rng.next(300)) };
            let micro_usd = if free || rng.next(2) == 0 { 0 } else { 1_000 + rng.next(4_000) };
            let reserved = Charge { requests: 1, input, output, micro_usd };
            // Token estimates are upper bounds; the money may come out above the estimate.
            let used = Charge {
                requests: 1,
                input: rng.next(input + 1),
                output: rng.next(output + 1),
                micro_usd: rng.next(2 * micro_usd + 1),
            };
            (reserved, used)
        }

        fn windows(&self, s: &MemStore) -> Vec<Instant> {
            let st = store::read::<State>(s, K).unwrap().unwrap();
            st.slots
                .iter()
                .map(|slot| if let Slot::Window { start, .. } = *slot { start } else { Instant::ZERO })
                .collect()
        }

        fn run(&self, s: &impl Store, mem: &MemStore, worker: usize, op: Op, now: Instant) {
            let latest = (*self.latest.borrow()).max(now);
            *self.latest.borrow_mut() = latest;
            let qs = &self.quotas;
            match op {
                Op::Take => {
                    let (reserved, used) = self.charge();
                    match take(s, K, qs, &reserved, now).unwrap() {
                        Err(_) => {}
                        Ok(()) => {
                            let counted_in = self.windows(mem);
                            let own_window =
                                qs.iter().map(|q| if q.rolling { Instant::ZERO } else { q.window(now).0 }).collect();
                            let req = Req { at: now, reserved, used, own_window, counted_in };
                            self.count(&req, |q| i128::from(reserved.of(q.unit)));
                            *self.rolling_net.borrow_mut() += 1;
                            if reserved.micro_usd > 0 {
                                let w = req.counted_in[USD];
                                let excess =
                                    |r: &Req| (i128::from(r.used.micro_usd) - i128::from(r.reserved.micro_usd)).max(0);
                                let pending = self.pending.borrow();
                                let others: i128 =
                                    pending.iter().flatten().filter(|r| r.counted_in[USD] == w).map(excess).sum();
                                let bound = i128::from(qs[USD].limit) - 1
                                    + i128::from(reserved.micro_usd)
                                    + excess(&req)
                                    + others;
                                self.usd_bound.borrow_mut().insert(w, bound);
                            }
                            self.pending.borrow_mut()[worker].push(req);
                        }
                    }
                }
                Op::Settle(pick) | Op::GiveBack(pick) => {
                    let req = {
                        let mut pending = self.pending.borrow_mut();
                        let mine = &mut pending[worker];
                        if mine.is_empty() {
                            return;
                        }
                        mine.swap_remove(pick % mine.len())
                    };
                    let (reserved, used) = (req.reserved, req.used);
                    if let Op::Settle(_) = op {
                        settle(s, K, qs, &reserved, &used, req.at, now).unwrap();
                        self.settled(&req, mem, |q| i128::from(used.of(q.unit)) - i128::from(reserved.of(q.unit)));
                    } else {
                        give_back(s, K, qs, &reserved, req.at, now).unwrap();
                        self.settled(&req, mem, |q| -i128::from(reserved.of(q.unit)));
                        *self.rolling_net.borrow_mut() -= 1;
                    }
                }
            }
        }

        fn count(&self, req: &Req, n: impl Fn(&Quota) -> i128) {
            let mut ledger = self.ledger.borrow_mut();
            for (i, q) in self.quotas.iter().enumerate().filter(|(_, q)| !q.rolling) {
                *ledger[i].entry(req.counted_in[i]).or_default() += n(q);
            }
        }

        /// A settle applies where the reservation's own window is the current one.
        fn settled(&self, req: &Req, mem: &MemStore, change: impl Fn(&Quota) -> i128) {
            let now_in = self.windows(mem);
            let mut ledger = self.ledger.borrow_mut();
            for (i, q) in self.quotas.iter().enumerate().filter(|(_, q)| !q.rolling) {
                if req.own_window[i] == now_in[i] {
                    assert_eq!(req.counted_in[i], now_in[i]);
                    *ledger[i].entry(now_in[i]).or_default() += change(q);
                }
            }
        }

        fn check(&self, mem: &MemStore, seed: u64, step: usize) {
            let st = store::read::<State>(mem, K).unwrap().unwrap();
            let ledger = self.ledger.borrow();
            for (i, q) in self.quotas.iter().enumerate() {
                match st.slots[i] {
                    Slot::Window { start, used } => {
                        let want = ledger[i].get(&start).copied().unwrap_or(0);
                        let mut most = self.most.borrow_mut();
                        most[i] = most[i].max(want);
                        assert_eq!(i128::from(used), want, "seed {seed} step {step}: quota {i} window {start:?}");
                        for (w, &n) in &ledger[i] {
                            assert!(n >= 0, "seed {seed} step {step}: quota {i}");
                            if i == USD {
                                let bound = self.usd_bound.borrow().get(w).copied().unwrap_or(0);
                                assert!(n <= bound, "seed {seed} step {step}: usd {n} > {bound} in {w:?}");
                            } else {
                                assert!(n <= i128::from(q.limit), "seed {seed} step {step}: quota {i}: {n}");
                            }
                        }
                    }
                    Slot::Rolling { .. } => {
                        let elapsed = (*self.latest.borrow() - START).as_secs_f64();
                        let bound = q.limit as f64 + q.bucket().rate * elapsed + 1e-6;
                        let net = *self.rolling_net.borrow();
                        let mut most = self.most.borrow_mut();
                        most[i] = most[i].max(net);
                        let net = net as f64;
                        assert!(net <= bound, "seed {seed} step {step}: rolling {net} > {bound}");
                    }
                }
            }
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

    /// 23:58:20 in Los Angeles, 100 s before the daily windows turn: requests still pending then
    /// are settled in the next window.
    const START: Instant = Instant::from_nanos(1_710_572_300 * 1_000_000_000);

    /// Runs `steps` operations of `workers` workers from `START`; returns the quotas, the most
    /// each held, and how many windows the money quota saw.
    fn interleave(seed: u64, workers: usize, steps: usize) -> (Vec<Quota>, Vec<i128>, usize) {
        let zone = |q: Quota| Quota { time_zone: la(), ..q };
        let quotas = vec![
            zone(daily(Unit::Requests, 120)),
            zone(daily(Unit::Tokens, 7_000)),
            zone(daily(Unit::OutputTokens, 4_000)),
            zone(daily(Unit::MicroUsd, 60_000)),
            quota(Unit::Requests, Period::Day, 230, true),
        ];
        let mem = MemStore::default();
        ensure(&mem, K, &quotas, START).unwrap();
        let sim = Sim {
            ledger: RefCell::new(vec![HashMap::new(); quotas.len()]),
            most: RefCell::new(vec![0; quotas.len()]),
            quotas,
            pending: RefCell::new((0..workers).map(|_| Vec::new()).collect()),
            usd_bound: RefCell::default(),
            rolling_net: RefCell::new(0),
            latest: RefCell::new(START),
            rng: RefCell::new(Lcg(seed)),
        };
        let mut now = START;
        for step in 0..steps {
            let rng = || sim.rng.borrow_mut();
            now += rng().next(400) * MS;
            let op = || {
                let r = rng().next(20);
                let pick = rng().next(1000) as usize;
                match r {
                    0..=10 => Op::Take,
                    11..=16 => Op::Settle(pick),
                    _ => Op::GiveBack(pick),
                }
            };
            let worker = rng().next(workers as u64) as usize;
            let (mine, theirs) = (op(), op());
            let racy = Racy::new(&mem);
            if rng().next(3) != 0 {
                let other = (worker + 1 + rng().next(workers as u64 - 1) as usize) % workers;
                // The other worker's clock may run a little ahead.
                let their_now = now + rng().next(5) * MS;
                let sim = &sim;
                racy.before_next_write(move |m| sim.run(m, m, other, theirs, their_now));
            }
            sim.run(&racy, &mem, worker, mine, now);
            sim.check(&mem, seed, step);
        }
        let windows = sim.ledger.borrow()[USD].len();
        (sim.quotas, sim.most.into_inner(), windows)
    }

    #[test]
    fn interleaved_workers_count_every_request_once_and_keep_the_limits() {
        for (seed, workers) in [(1, 2), (7, 3), (42, 4), (1234, 2), (99_999, 3)] {
            let (quotas, most, windows) = interleave(seed, workers, 4_000);
            assert_eq!(windows, 2, "seed {seed}: the schedule crosses local midnight");
            // Every limit was pressed: nearly reached, and the budget spent.
            for (q, most) in quotas.iter().zip(most) {
                let limit = i128::from(q.limit);
                let near = if q.unit == Unit::MicroUsd { limit } else { limit * 9 / 10 };
                assert!(most >= near, "seed {seed}: {} {most} of {limit}", q.unit.name());
            }
        }
    }

    #[cfg(not(target_arch = "wasm32"))]
    mod props {
        use super::*;
        use proptest::prelude::*;

        fn all_kinds() -> Vec<Quota> {
            vec![
                daily(Unit::Requests, 3),
                quota(Unit::Tokens, Period::Month, 1_000, false),
                quota(Unit::InputTokens, Period::Day, 10, true),
                quota(Unit::MicroUsd, Period::Month, 1_000_000_000_000, true),
            ]
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 512, failure_persistence: None, ..ProptestConfig::default() })]

            #[test]
            fn no_bytes_panic_or_fail(bytes in proptest::collection::vec(any::<u8>(), 0..80), well_formed in any::<bool>(), now in any::<u64>()) {
                let qs = all_kinds();
                // Half the cases: a well-formed header and descriptors with arbitrary words.
                let bytes = if well_formed {
                    let mut b = vec![MAGIC, VERSION];
                    for (i, q) in qs.iter().enumerate() {
                        b.push(q.descriptor());
                        b.extend((0..16).map(|j| bytes.get(i * 16 + j).copied().unwrap_or(0xff)));
                    }
                    b
                } else {
                    bytes
                };
                let _ = State::from_bytes(&bytes);
                let s = MemStore::default();
                s.set(K, &bytes, 0).unwrap();
                let now = Instant::from_nanos(now);
                let c = Charge { requests: 1, input: 5, output: 5, micro_usd: 7 };
                readout(&s, K, &qs, now).unwrap();
                take(&s, K, &qs, &c, now).unwrap().ok();
                settle(&s, K, &qs, &c, &Charge { input: u64::MAX, ..c }, now, now).unwrap();
                give_back(&s, K, &qs, &c, Instant::ZERO, now).unwrap();
                readout(&s, K, &qs, now).unwrap();
            }

            #[test]
            fn a_serial_budget_serves_while_not_spent(
                limit in 1u64..2_000_000,
                costs in proptest::collection::vec((0u64..50_000, 0u64..80_000), 1..120),
                rolling in any::<bool>(),
            ) {
                let qs = [quota(Unit::MicroUsd, Period::Day, limit, rolling)];
                let s = store(&qs);
                let mut spent = 0u64;
                for (i, &(reserved, used)) in costs.iter().enumerate() {
                    // A second apart, all before midnight; the rolling refill over a few minutes
                    // is under a thousandth of the budget, so test it against a loose floor.
                    let now = T0 + i as u64 * SEC;
                    let passed = take_at(&s, &qs, usd(reserved), now).is_ok();
                    if !rolling {
                        prop_assert_eq!(passed, reserved == 0 || spent < limit, "spent {} of {}", spent, limit);
                    } else if reserved == 0 || spent < limit {
                        prop_assert!(passed);
                    }
                    if passed {
                        settle(&s, K, &qs, &usd(reserved), &usd(used), now, now).unwrap();
                        spent += used;
                    }
                }
                if !rolling {
                    prop_assert_eq!(used(&s, &qs, T0), vec![spent]);
                }
            }
        }
    }
}
