//! The global gate: after the local buckets, a request needs its units from a rate limit service
//! that many Envoy instances share. One worker's view, per descriptor key: units leased from the
//! service and not spent yet, the over-limit answer cached until its reset, the one call in
//! flight, and the requests waiting for it. Pure: the host sends the calls, passes in the clock and
//! the answers, and carries out the [`Outcome`]. [`Ledger`] gathers what finished requests used,
//! for the host to settle with the service on its tick.
//!
//! Units: requests (1 each), LLM tokens and cost (micro-dollars). `Accounting::Reserve` asks for
//! a request's token estimate and settles the difference to its usage after (refund or charge,
//! llm-ratelimit-rls' settle entry); `ChargeAfter` asks for 1 token (the window is not spent) and
//! adds the rest after with plain hits. Cost is always checked with 1 (a budget admits while it
//! is not spent) and charged after.
//!
//! Leases: a call asks for what the waiters need plus, while the service's remaining is far from
//! zero, what this key spent in the last second (at most `max_lease` requests' worth, at most an
//! eighth of the remaining), so the common case makes no call; below half, a call tops the lease
//! up while requests go on. Leased units are counted by the service when leased and dropped after
//! `lease_ms` if unspent, so a lease never admits more than the service counted; but units counted
//! in one window can be spent in the next.
//!
//! Overshoot: what the requests admitted in one window of the service may use beyond its limit
//! `L`, per unit (tests/global_simulation.rs checks it in every window):
//! - `H`, the units the workers hold leased when the window starts: per worker at most
//!   `min(max_lease, remaining / 8)` requests' worth of each unit (their average check), plus
//!   what its calls got for waiters that left or still wait for another unit;
//! - requests: `L + H`;
//! - tokens and cost: `L + H + X + R`. `X`: what requests admitted in the window use beyond what
//!   their check counted, until it is settled: with `Reserve`, the tokens of requests in flight
//!   beyond their estimates; with `ChargeAfter`, and cost in both modes (the check counts 1: the
//!   window admits while it is not spent), the usage of the requests in flight. `R`: what
//!   requests admitted before the window counted beyond their usage, refunded in it: with
//!   `Reserve`, at most the estimates of the requests in flight when it starts.
//!
//! Requests let through without the service's word (failure modes) come on top, with all they
//! use (for tokens and cost in `X`, until their settlement charges it all).

use super::proto::{Code, Response};
use crate::time::{Duration, Instant};

pub const REQUESTS: usize = 0;
pub const TOKENS: usize = 1;
/// Micro-dollars, for a money budget.
pub const COST: usize = 2;
/// Every unit, in the order of a call's descriptors.
pub const UNITS: [usize; 3] = [REQUESTS, TOKENS, COST];
/// Requests, LLM tokens and cost.
pub type Units = [u64; UNITS.len()];
const NONE: Units = [0; UNITS.len()];

/// Most keys (descriptor value sets) one worker tracks; idle ones make room for new ones. Also the
/// most keys one tick settles.
pub const MAX_KEYS: usize = 1024;
/// Over-limit without a reset in the answer (Limitador fills no `statuses`): asked again after this.
pub const BACKOFF: Duration = Duration::from_millis(1_000);
/// In `local` mode, how long after a failed call requests skip the service.
pub const RETRY: Duration = Duration::from_millis(1_000);
/// Beyond the call's own timeout (the host's), when the gate gives up on an answer itself.
const TIMEOUT_GRACE: Duration = Duration::from_millis(100);

/// What to do when the service cannot answer (error, timeout, garbage).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailureMode {
    /// Fall back to this instance's own buckets: skip the service for `RETRY`, then ask again.
    Local,
    /// Let the waiting requests through; the next request asks again.
    Allow,
    /// Refuse the waiting requests (`global_unavailable`).
    Deny,
}

impl FailureMode {
    pub const NAMES: [(&'static str, FailureMode); 3] =
        [("local", FailureMode::Local), ("allow", FailureMode::Allow), ("deny", FailureMode::Deny)];
}

/// How a request's LLM tokens and cost reach the service (its request is always one unit).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accounting {
    /// The check asks for the estimate; when the answer ends, the difference to its usage is
    /// refunded or charged with llm-ratelimit-rls' settle entry. Cost is always charged after.
    Reserve,
    /// The check asks for one unit; the rest of what was used is added after with a plain call,
    /// which any RLS v3 service counts (envoyproxy/ratelimit, Limitador). The service may then
    /// pass at most the usage of the requests in flight beyond its limit.
    ChargeAfter,
}

impl Accounting {
    pub const NAMES: [(&'static str, Accounting); 2] =
        [("reserve", Accounting::Reserve), ("charge_after", Accounting::ChargeAfter)];
}

#[derive(Clone, Debug, PartialEq)]
pub struct GlobalGateRules {
    pub timeout_ms: u64,
    pub failure_mode: FailureMode,
    /// Most requests one call may lease ahead (1: a call per request).
    pub max_lease: u64,
    /// How long leased units may be spent.
    pub lease_ms: u64,
    /// Per unit: its check asks one unit and what was used is charged after (cost always; tokens
    /// under `charge_after`). Such units are never leased ahead: leased checks would admit
    /// requests whose charges the service has not seen, past a budget by as many.
    pub charged_after: [bool; 3],
}

impl GlobalGateRules {
    /// `timeout_ms`, typed.
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }

    /// `lease_ms`, typed.
    pub fn lease(&self) -> Duration {
        Duration::from_millis(self.lease_ms)
    }
}

/// A call the host must send: `hits` per unit for key `key` (0: that descriptor is not sent).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ask {
    pub key: usize,
    pub hits: Units,
}

/// Why the gate refuses a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cause {
    /// The service said over limit for requests or tokens (`global_limit`).
    Limit,
    /// The service said over limit for cost: the money budget is spent (`budget_exceeded`).
    Budget,
    /// The service failed, or no key was free, and the failure mode is `deny`
    /// (`global_unavailable`).
    Unavailable,
}

/// What `arrive` decided for one request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GlobalVerdict {
    /// It goes on units the service counted; `ask` tops the lease up ahead of need (sent while
    /// it goes).
    Pass { ask: Option<Ask> },
    /// It goes without the service's word (the failure mode after a failure, or no key free):
    /// the service counted nothing for it.
    Fallback,
    /// It waits for a call's answer or a reset; `ask` is the call to send, if one is needed now.
    Wait { ask: Option<Ask> },
    /// It may not wait `wait` for the service's reset (or, `Unavailable`, the service failed).
    Refuse { wait: Duration, cause: Cause },
}

/// A waiting request the gate refuses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Refused {
    pub id: u32,
    /// Until the reset (or `RETRY` when the service failed).
    pub wait: Duration,
    pub cause: Cause,
}

/// What a tick, an answer or a failure decided for waiting requests, and calls to send.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    /// Let through on units the service counted.
    pub pass: Vec<u32>,
    /// Let through without the service's word (`local`, `allow` after a failure).
    pub fallback: Vec<u32>,
    pub refuse: Vec<Refused>,
    pub asks: Vec<Ask>,
}

impl Outcome {
    fn merge(&mut self, o: Outcome) {
        self.pass.extend(o.pass);
        self.fallback.extend(o.fallback);
        self.refuse.extend(o.refuse);
        self.asks.extend(o.asks);
    }
}

/// Counts for the stats since the host last took them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub calls: u64,
    pub over_limit: u64,
    /// Calls that failed with an error (status, unreadable answer, not sent), and requests that
    /// found every key busy (`MAX_KEYS`); and calls with no answer in `timeout_ms`.
    pub errors: u64,
    pub timeouts: u64,
    /// Requests let through without the service's word (`local` / `allow` after a failure).
    pub fallback: u64,
    /// Milliseconds from each answered call to its answer.
    pub latency_ms: Vec<u64>,
    /// Units leased ahead of need, and leased units dropped unspent.
    pub leased: Units,
    pub expired: Units,
    /// Per key, LLM tokens leased and dropped unspent: the service counted them, and under
    /// `reserve` they are refunded (not request units: their windows are short, and a refund
    /// landing after the lease's window left would free room the window never had).
    pub expired_tokens: Vec<(String, u64)>,
}

#[derive(Clone, Debug)]
struct Waiter {
    id: u32,
    hits: Units,
    deadline: Instant,
}

#[derive(Clone, Debug)]
struct Call {
    /// The host's token; 0 until it says the call went.
    token: u32,
    sent: Instant,
    hits: Units,
    /// Needed units only: an over-limit answer is final.
    exact: bool,
}

#[derive(Clone, Debug)]
struct Key {
    /// The descriptor values that name this key (the host's encoding).
    name: String,
    /// Leased units not spent yet, usable until `lease_until`.
    left: Units,
    lease_until: Instant,
    /// Per unit: the service said over limit; nothing is asked until then.
    over_until: [Instant; UNITS.len()],
    /// Per unit: the service's remaining after its last answer, when it says.
    remaining: [Option<u64>; UNITS.len()],
    call: Option<Call>,
    /// The next call asks for needed units only (a lease was just refused).
    exact: bool,
    /// In arrival order (a handful: a call serves them all).
    waiters: Vec<Waiter>,
    /// Units spent this second, and in the last whole one: how large a lease should be.
    spent: Units,
    rate: Units,
    second: Instant,
}

impl Key {
    fn new(name: &str, now: Instant) -> Key {
        Key {
            name: name.to_string(),
            left: NONE,
            lease_until: Instant::ZERO,
            over_until: [Instant::ZERO; UNITS.len()],
            remaining: [None; UNITS.len()],
            call: None,
            exact: false,
            waiters: Vec::new(),
            spent: NONE,
            rate: NONE,
            second: now,
        }
    }

    fn idle(&self) -> bool {
        self.call.is_none() && self.waiters.is_empty()
    }

    fn fits(&self, hits: Units) -> bool {
        UNITS.iter().all(|&u| hits[u] <= self.left[u])
    }

    fn spend(&mut self, hits: Units) {
        for u in UNITS {
            self.left[u] -= hits[u];
            self.spent[u] = self.spent[u].saturating_add(hits[u]);
        }
    }

    /// When the units `hits` lacks become askable again, if the service said over limit for
    /// any: the latest reset, and whose it is (cost: the budget; on a tie too).
    fn blocked(&self, hits: Units, now: Instant) -> Option<(Instant, Cause)> {
        let mut latest: Option<(Instant, usize)> = None;
        for u in UNITS {
            let until = self.over_until[u];
            if hits[u] > self.left[u]
                && until > now
                && latest.is_none_or(|(t, _)| until > t || (until == t && u == COST))
            {
                latest = Some((until, u));
            }
        }
        latest.map(|(t, u)| (t, if u == COST { Cause::Budget } else { Cause::Limit }))
    }

    /// The call for what the waiters need beyond the lease, plus a lease ahead.
    fn ask(&mut self, index: usize, rules: &GlobalGateRules, now: Instant) -> Option<Ask> {
        if self.call.is_some() || self.waiters.is_empty() {
            return None;
        }
        let mut need = need(self);
        // Never more than the service last said remain (but the first waiter's need): a call for
        // more than the limit itself would be refused forever.
        let head = self.waiters[0].hits;
        for u in UNITS {
            need[u] = need[u].saturating_sub(self.left[u]);
            if let Some(r) = self.remaining[u] {
                need[u] = need[u].min(r.max(head[u]));
            }
        }
        if self.blocked(need, now).is_some() {
            return None; // the tick asks at the reset
        }
        // Requests that check a unit charged after call for each check: a lease of the other
        // units would only expire unspent.
        let checked = UNITS.into_iter().any(|u| rules.charged_after[u] && need[u] > 0);
        let ahead = if self.exact || checked { NONE } else { self.ahead(rules) };
        self.exact = false;
        let mut hits = NONE;
        for u in UNITS {
            if need[u] > 0 {
                hits[u] = need[u].saturating_add(ahead[u]);
            }
        }
        if hits == NONE {
            return None;
        }
        self.call = Some(Call { token: 0, sent: now, hits, exact: ahead == NONE });
        Some(Ask { key: index, hits })
    }

    /// With nobody waiting, a call that tops the lease back up to what `ahead` says, once it has
    /// fallen below half of that: at a steady rate requests spend leased units while the call is
    /// in flight and never wait for it. A worker never holds more than `max_lease` requests.
    fn top_up(&mut self, index: usize, rules: &GlobalGateRules, now: Instant) -> Option<Ask> {
        if self.call.is_some() || self.exact {
            return None;
        }
        let ahead = self.ahead(rules);
        let mut hits = NONE;
        for u in UNITS {
            if self.left[u] < ahead[u] / 2 && self.over_until[u] <= now {
                hits[u] = ahead[u] - self.left[u];
            }
        }
        if hits[REQUESTS] == 0 {
            // Tokens and cost alone are topped up with the next request units: a call carries all.
            return None;
        }
        self.call = Some(Call { token: 0, sent: now, hits, exact: false });
        Some(Ask { key: index, hits })
    }

    /// Units to lease beyond need: a second's spending (the last whole one's, or this one's so
    /// far if more: a burst leases at once), capped by `max_lease` requests (and their average
    /// tokens and cost) and by an eighth of the service's remaining.
    fn ahead(&self, rules: &GlobalGateRules) -> Units {
        let extra = rules.max_lease.saturating_sub(1);
        let rate = UNITS.map(|u| self.rate[u].max(self.spent[u]));
        let mut ahead = NONE;
        for u in UNITS {
            let per_request = if u == REQUESTS { 1 } else { rate[u] / rate[REQUESTS].max(1) };
            let by_remaining = self.remaining[u].map_or(u64::MAX, |r| r / 8);
            let by_rate = rate[u].saturating_mul(rules.lease_ms) / 1000;
            ahead[u] = if rules.charged_after[u] {
                0
            } else {
                by_rate.min(extra.saturating_mul(per_request)).min(by_remaining)
            };
        }
        ahead
    }

    /// Lets waiters through in arrival order while the lease covers them; refuses those who
    /// cannot wait for the service's reset.
    fn serve(&mut self, out: &mut Outcome, now: Instant) {
        let mut served = 0;
        while let Some(w) = self.waiters.get(served).filter(|w| self.fits(w.hits)) {
            let (id, hits) = (w.id, w.hits);
            out.pass.push(id);
            self.spend(hits);
            served += 1;
        }
        self.waiters.drain(..served);
        let mut kept = Vec::with_capacity(self.waiters.len());
        for w in std::mem::take(&mut self.waiters) {
            match self.blocked(w.hits, now) {
                Some((until, cause)) if until > w.deadline => {
                    out.refuse.push(Refused { id: w.id, wait: until - now, cause })
                }
                _ => kept.push(w),
            }
        }
        self.waiters = kept;
    }
}

/// One worker's global gate.
#[derive(Clone, Debug)]
pub struct GlobalGate {
    pub rules: GlobalGateRules,
    keys: Vec<Key>,
    /// `local` mode after a failure: requests skip the service until then.
    skip_until: Instant,
    counts: Counts,
}

impl GlobalGate {
    pub fn new(rules: GlobalGateRules) -> GlobalGate {
        GlobalGate { rules, keys: Vec::new(), skip_until: Instant::ZERO, counts: Counts::default() }
    }

    /// The name of key `index`, for the host to build the call's descriptors.
    pub fn name(&self, index: usize) -> &str {
        self.keys.get(index).map_or("", |k| &k.name)
    }

    pub fn take_counts(&mut self) -> Counts {
        std::mem::take(&mut self.counts)
    }

    /// Whether anything waits on a call, a reset or a lease's end: the tick has work.
    pub fn busy(&self) -> bool {
        self.keys.iter().any(|k| !k.idle() || k.left != NONE)
    }

    /// Units leased and not spent, over all keys, that may still be spent at `now`.
    pub fn held(&self, now: Instant) -> Units {
        let now = now.floor_millis();
        let mut held = NONE;
        for k in self.keys.iter().filter(|k| k.lease_until > now) {
            for u in UNITS {
                held[u] += k.left[u];
            }
        }
        held
    }

    fn find(&self, name: &str) -> Option<usize> {
        self.keys.iter().position(|k| k.name == name)
    }

    /// The key's index, added (evicting an idle key if the table is full) when new.
    fn key(&mut self, name: &str, now: Instant) -> Option<usize> {
        if let Some(i) = self.find(name) {
            return Some(i);
        }
        if self.keys.len() >= MAX_KEYS {
            let i = self.keys.iter().position(|k| k.idle() && k.over_until.iter().all(|&t| t <= now))?;
            self.keys.swap_remove(i);
        }
        self.keys.push(Key::new(name, now));
        Some(self.keys.len() - 1)
    }

    /// How long a request needing `hits` would wait for the service's reset, and why, if the
    /// service said over limit: checked before the local buckets, so a request that cannot wait
    /// that long costs no local token.
    pub fn blocked(&self, name: &str, hits: Units, now: Instant) -> Option<(Duration, Cause)> {
        let now = now.floor_millis();
        let k = &self.keys[self.find(name)?];
        k.blocked(hits, now).map(|(t, cause)| (t - now, cause))
    }

    /// Request `id`, admitted by the local buckets, needs `hits` and may wait `may_wait`.
    pub fn arrive(&mut self, name: &str, id: u32, hits: Units, may_wait: Duration, now: Instant) -> GlobalVerdict {
        let now = now.floor_millis();
        if now < self.skip_until {
            self.counts.fallback += 1;
            return GlobalVerdict::Fallback;
        }
        let Some(i) = self.key(name, now) else {
            // Every key busy: the service cannot be asked for this one, as if it had failed (but
            // `local` skips it for this request only: filling the table must not switch the
            // service off for every key).
            self.counts.errors += 1;
            if self.rules.failure_mode == FailureMode::Deny {
                return GlobalVerdict::Refuse { wait: RETRY, cause: Cause::Unavailable };
            }
            self.counts.fallback += 1;
            return GlobalVerdict::Fallback;
        };
        let k = &mut self.keys[i];
        roll(k, now);
        if k.lease_until <= now {
            expire(k, &mut self.counts);
        }
        if k.waiters.is_empty() && k.fits(hits) {
            k.spend(hits);
            let ask = k.top_up(i, &self.rules, now);
            self.counted(&ask);
            return GlobalVerdict::Pass { ask };
        }
        if let Some((until, cause)) = k.blocked(hits, now) {
            if until - now > may_wait {
                return GlobalVerdict::Refuse { wait: until - now, cause };
            }
        }
        k.waiters.push(Waiter { id, hits, deadline: now + may_wait });
        let ask = k.ask(i, &self.rules, now);
        self.counted(&ask);
        GlobalVerdict::Wait { ask }
    }

    fn counted(&mut self, ask: &Option<Ask>) {
        if ask.is_some() {
            self.counts.calls += 1;
        }
    }

    /// A refund went to the service for the key named `name`: the room it makes may let a
    /// request through before the over-limit answer's reset, so the next one asks again.
    pub fn refunded(&mut self, name: &str) {
        if let Some(i) = self.find(name) {
            self.keys[i].over_until[TOKENS] = Instant::ZERO;
        }
    }

    /// The host sent key `key`'s call as `token`.
    pub fn sent(&mut self, key: usize, token: u32) {
        if let Some(c) = self.keys.get_mut(key).and_then(|k| k.call.as_mut()) {
            c.token = token;
        }
    }

    /// A waiter left (its client went away).
    pub fn leave(&mut self, id: u32) {
        for k in &mut self.keys {
            k.waiters.retain(|w| w.id != id);
        }
    }

    /// The key whose call is `token` (never a call the gate did not ask for: 0 is no token).
    fn calling(&self, token: u32) -> Option<usize> {
        if token == 0 {
            return None;
        }
        self.keys.iter().position(|k| k.call.as_ref().is_some_and(|c| c.token == token))
    }

    /// The answer to call `token`; a token the gate is not waiting on (late, or not its call)
    /// changes nothing.
    pub fn answered(&mut self, token: u32, r: &Response, now: Instant) -> Outcome {
        let now = now.floor_millis();
        let Some(i) = self.calling(token) else {
            return Outcome::default(); // late: the tick gave up on it
        };
        let mut out = Outcome::default();
        let k = &mut self.keys[i];
        let Some(call) = k.call.take() else { return out };
        self.counts.latency_ms.push((now - call.sent).as_millis());
        if k.lease_until <= now {
            expire(k, &mut self.counts); // not renewed by this answer's lease
        }
        // Statuses come in the order of the descriptors sent: one per unit asked, in `UNITS`
        // order.
        let asked = UNITS.into_iter().filter(|&u| call.hits[u] > 0);
        let said = |n: usize| r.statuses.get(n).copied();
        if r.overall == Code::Unknown && r.statuses.iter().all(|s| s.code == Code::Unknown) {
            k.call = Some(call);
            return self.fail(i, now, false);
        }
        let need = need(k);
        let mut over = false;
        for (n, u) in asked.enumerate() {
            let s = said(n);
            let code = s.map_or(r.overall, |s| if s.code == Code::Unknown { r.overall } else { s.code });
            k.remaining[u] = s.and_then(|s| s.remaining);
            if code != Code::OverLimit {
                k.left[u] = k.left[u].saturating_add(call.hits[u]);
                self.counts.leased[u] += call.hits[u].saturating_sub(need[u]);
                continue;
            }
            over = true;
            let head = k.waiters.first().map_or(0, |w| w.hits[u]);
            let fits_exact = k.remaining[u].is_none_or(|rem| rem >= head);
            if !call.exact && fits_exact {
                k.exact = true; // asked ahead and refused: ask again for need alone
            } else {
                let wait = s.and_then(|s| s.until_reset_ms).filter(|&ms| ms > 0).map_or(BACKOFF, Duration::from_millis);
                // Reserved units come back as refunds before the service's reset (which counts
                // reservations as they stand): ask again within a second.
                let wait = if self.rules.charged_after[u] || u == REQUESTS { wait } else { wait.min(BACKOFF) };
                k.over_until[u] = now + wait;
            }
        }
        if over {
            self.counts.over_limit += 1;
        }
        k.lease_until = now + self.rules.lease();
        k.serve(&mut out, now);
        let ask = k.ask(i, &self.rules, now);
        self.counted(&ask);
        out.asks.extend(ask);
        out
    }

    /// Call `token` failed (error status, unreadable answer, or could not be sent); `timeout`:
    /// it was not answered in time. A token the gate is not waiting on changes nothing.
    pub fn failed(&mut self, token: u32, timeout: bool, now: Instant) -> Outcome {
        let now = now.floor_millis();
        match self.calling(token) {
            Some(i) => self.fail(i, now, timeout),
            None => Outcome::default(),
        }
    }

    /// Key `key`'s call could not be sent: the next tick fails it (the request that asked is
    /// still inside its own callback and cannot be resumed from there).
    pub fn not_sent(&mut self, key: usize) {
        if let Some(c) = self.keys.get_mut(key).and_then(|k| k.call.as_mut()) {
            c.sent = Instant::ZERO;
        }
    }

    fn fail(&mut self, i: usize, now: Instant, timeout: bool) -> Outcome {
        let mut out = Outcome::default();
        if timeout {
            self.counts.timeouts += 1;
        } else {
            self.counts.errors += 1;
        }
        let k = &mut self.keys[i];
        k.call = None;
        let waiters = std::mem::take(&mut k.waiters);
        match self.rules.failure_mode {
            FailureMode::Deny => {
                out.refuse.extend(waiters.iter().map(|w| Refused { id: w.id, wait: RETRY, cause: Cause::Unavailable }))
            }
            mode => {
                self.counts.fallback += waiters.len() as u64;
                out.fallback.extend(waiters.iter().map(|w| w.id));
                if mode == FailureMode::Local {
                    self.skip_until = now + RETRY;
                }
            }
        }
        out
    }

    /// Calls not answered in time fail; leases end; waiters whose reset came are asked for,
    /// and those past their deadline are refused.
    pub fn tick(&mut self, now: Instant) -> Outcome {
        let now = now.floor_millis();
        let mut out = Outcome::default();
        let late = self.rules.timeout() + TIMEOUT_GRACE;
        for i in 0..self.keys.len() {
            let k = &self.keys[i];
            if k.call.as_ref().is_some_and(|c| now - c.sent > late) {
                let o = self.fail(i, now, true);
                out.merge(o);
            }
            let k = &mut self.keys[i];
            roll(k, now);
            if k.lease_until <= now && k.left != NONE {
                expire(k, &mut self.counts);
            }
            for u in UNITS {
                if k.over_until[u] <= now {
                    k.over_until[u] = Instant::ZERO;
                }
            }
            // Waiting for a call's answer is bounded by the timeout; the deadline bounds waiting
            // for a reset, and `serve` refuses whoever cannot wait for theirs.
            k.serve(&mut out, now);
            let ask = k.ask(i, &self.rules, now);
            if ask.is_some() {
                self.counts.calls += 1;
            }
            out.asks.extend(ask);
        }
        out
    }
}

/// What the waiters of `k` need in all, per unit.
fn need(k: &Key) -> Units {
    let mut need = NONE;
    for w in &k.waiters {
        for u in UNITS {
            need[u] = need[u].saturating_add(w.hits[u]);
        }
    }
    need
}

/// Starts a new second of spending when one has passed.
fn roll(k: &mut Key, now: Instant) {
    let elapsed = now - k.second;
    if elapsed >= Duration::from_secs(1) {
        k.rate = if elapsed < Duration::from_secs(2) { k.spent } else { NONE };
        k.spent = NONE;
        k.second = now;
    }
}

fn expire(k: &mut Key, counts: &mut Counts) {
    for u in UNITS {
        counts.expired[u] += k.left[u];
    }
    if k.left[TOKENS] > 0 && counts.expired_tokens.len() < MAX_KEYS {
        counts.expired_tokens.push((k.name.clone(), k.left[TOKENS]));
    }
    k.left = NONE;
}

/// One key's settlement for a tick: per unit, what to add at the service (`charge`) or take
/// off (`refund`, `Reserve` only); at most one of the two per unit, never for requests.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Settlement {
    pub key: String,
    pub charge: Units,
    pub refund: Units,
}

/// What finished requests used beyond (or short of) what the service counted for them, per key,
/// until the tick settles it: one call per key per tick. Bounded: at most `MAX_KEYS` keys.
#[derive(Clone, Debug, Default)]
pub struct Ledger {
    /// Per key: units used minus units counted.
    keys: Vec<(String, [i128; UNITS.len()])>,
    dropped: u64,
}

impl Ledger {
    /// A request the gate let through on key `key` used `used` (tokens and cost; its request
    /// unit is exact), having asked for `hits` (`counted`: the service counted them; false when
    /// let through without its word, then all it used is charged). Units it did not ask for are
    /// not counted at the service and not settled. False when the table is full: dropped.
    pub fn add(&mut self, key: &str, hits: Units, counted: bool, used: Units) -> bool {
        let mut delta = [0i128; UNITS.len()];
        for u in [TOKENS, COST] {
            if hits[u] > 0 {
                delta[u] = i128::from(used[u]) - if counted { i128::from(hits[u]) } else { 0 };
            }
        }
        if delta == [0; UNITS.len()] {
            return true;
        }
        let Some(net) = self.net(key) else { return false };
        for u in UNITS {
            net[u] += delta[u];
        }
        true
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Settlements dropped for a full table since last asked.
    pub fn take_dropped(&mut self) -> u64 {
        std::mem::take(&mut self.dropped)
    }

    /// What to send, one settlement per key with anything to settle. `ChargeAfter` cannot take
    /// units off: a key's net refund is dropped.
    /// `tokens` leased for `key` and dropped unspent: refunded with the next settlement
    /// (`reserve`; `charge_after` leases no tokens). False when dropped.
    pub fn expired(&mut self, key: &str, tokens: u64) -> bool {
        let Some(net) = self.net(key) else { return false };
        net[TOKENS] -= i128::from(tokens);
        true
    }

    /// What `key` nets so far, added when new; `None` (counted as dropped) when `MAX_KEYS` keys
    /// are held already.
    fn net(&mut self, key: &str) -> Option<&mut [i128; UNITS.len()]> {
        let i = match self.keys.iter().position(|(k, _)| k == key) {
            Some(i) => i,
            None if self.keys.len() < MAX_KEYS => {
                self.keys.push((key.to_string(), [0; UNITS.len()]));
                self.keys.len() - 1
            }
            None => {
                self.dropped += 1;
                return None;
            }
        };
        self.keys.get_mut(i).map(|(_, net)| net)
    }

    pub fn take(&mut self, accounting: Accounting) -> Vec<Settlement> {
        let mut out = Vec::with_capacity(self.keys.len());
        for (key, delta) in self.keys.drain(..) {
            let mut s = Settlement { key, ..Settlement::default() };
            for u in UNITS {
                let d = delta[u].clamp(-i128::from(u64::MAX), i128::from(u64::MAX));
                if d > 0 {
                    s.charge[u] = d as u64;
                } else if d < 0 && accounting == Accounting::Reserve {
                    s.refund[u] = d.unsigned_abs() as u64;
                }
            }
            if s.charge != NONE || s.refund != NONE {
                out.push(s);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::super::proto::Status;
    use super::*;

    /// The instant `ms` milliseconds after the origin.
    fn at(ms: u64) -> Instant {
        Instant::from_millis(ms)
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn rules(mode: FailureMode, max_lease: u64) -> GlobalGateRules {
        GlobalGateRules {
            timeout_ms: 50,
            failure_mode: mode,
            max_lease,
            lease_ms: 1000,
            charged_after: [false, false, true],
        }
    }

    fn key() -> &'static str {
        "openai"
    }

    fn ok(remaining: u64) -> Response {
        let s = Status { code: Code::Ok, remaining: Some(remaining), until_reset_ms: Some(1000) };
        Response { overall: Code::Ok, statuses: vec![s] }
    }

    fn over(remaining: u64, reset_ms: u64) -> Response {
        let s = Status { code: Code::OverLimit, remaining: Some(remaining), until_reset_ms: Some(reset_ms) };
        Response { overall: Code::OverLimit, statuses: vec![s] }
    }

    fn unavailable(id: u32) -> Refused {
        Refused { id, wait: RETRY, cause: Cause::Unavailable }
    }

    fn asked(v: GlobalVerdict) -> Ask {
        match v {
            GlobalVerdict::Wait { ask: Some(a) } => a,
            other => panic!("expected a call, got {other:?}"),
        }
    }

    #[test]
    fn first_request_waits_for_one_call_and_the_next_share_it() {
        let mut g = GlobalGate::new(rules(FailureMode::Local, 32));
        let a = asked(g.arrive(key(), 1, [1, 0, 0], ms(1000), at(0)));
        assert_eq!(a.hits, [1, 0, 0], "no spending seen yet: no lease ahead");
        g.sent(a.key, 7);
        assert_eq!(
            g.arrive(key(), 2, [1, 0, 0], ms(1000), at(1)),
            GlobalVerdict::Wait { ask: None },
            "one call in flight"
        );
        let o = g.answered(7, &ok(99), at(2));
        assert_eq!(o.pass, vec![1]);
        // Request 2 was not in the call: a second call follows, one ahead for the one spent.
        assert_eq!(o.asks, vec![Ask { key: 0, hits: [2, 0, 0] }]);
    }

    /// Arrivals at `now_ms` (ms), every call answered at once with `answer`: (calls, largest ask).
    fn burst(g: &mut GlobalGate, ids: std::ops::Range<u32>, now_ms: u64, answer: &Response) -> (u64, u64) {
        let (mut calls, mut most) = (0, 0);
        for id in ids {
            match g.arrive(key(), id, [1, 0, 0], ms(1000), at(now_ms)) {
                GlobalVerdict::Pass { ask: None } => {}
                GlobalVerdict::Pass { ask: Some(a) } => {
                    // A top-up, sent while the request goes.
                    calls += 1;
                    most = most.max(a.hits[REQUESTS]);
                    g.sent(a.key, id + 1);
                    assert!(g.answered(id + 1, answer, at(now_ms)).pass.is_empty());
                }
                GlobalVerdict::Wait { ask: Some(a) } => {
                    calls += 1;
                    most = most.max(a.hits[REQUESTS]);
                    g.sent(a.key, id + 1);
                    assert_eq!(g.answered(id + 1, answer, at(now_ms)).pass, vec![id]);
                }
                other => panic!("{other:?}"),
            }
        }
        (calls, most)
    }

    #[test]
    fn a_lease_grows_with_a_burst_and_expires_unspent() {
        let mut g = GlobalGate::new(rules(FailureMode::Local, 32));
        let (calls, most) = burst(&mut g, 0..200, 500, &ok(100_000));
        // Leases grow with what this second spent, topped up at half: never more than
        // `max_lease` held, about a call per 16 requests once grown.
        assert!(most <= 32, "{most}");
        assert!(calls <= 200 / 16 + 6, "{calls} calls for 200 requests");
        g.tick(at(1499));
        let before = g.take_counts();
        assert_eq!(before.calls, calls);
        assert_eq!(before.expired, [0; 3], "still within lease_ms");
        g.tick(at(1500));
        let c = g.take_counts();
        // What was leased ahead and not spent is dropped at the lease's end.
        assert!(before.leased[REQUESTS] >= 200 - calls, "most requests went on leased units");
        assert!((1..=32).contains(&c.expired[REQUESTS]), "what was held, at most max_lease: {}", c.expired[0]);
    }

    #[test]
    fn leases_shrink_with_the_remaining_and_a_refused_lease_is_asked_again_exactly() {
        let mut g = GlobalGate::new(rules(FailureMode::Local, 32));
        let (_, most) = burst(&mut g, 0..100, 0, &ok(40));
        assert!((2..=1 + 40 / 8).contains(&most), "at most an eighth of the remaining ahead: {most}");
        // Spend until the lease is topped up; the service refuses the top-up while 3 remain.
        let mut id = 100;
        let a = loop {
            match g.arrive(key(), id, [1, 0, 0], ms(1000), at(0)) {
                GlobalVerdict::Pass { ask: Some(a) } => break a,
                GlobalVerdict::Pass { ask: None } => id += 1,
                other => panic!("{other:?}"),
            }
        };
        assert!(a.hits[REQUESTS] > 1);
        g.sent(a.key, 1);
        assert_eq!(g.answered(1, &over(3, 900), at(1)), Outcome::default());
        // When the lease runs out, a request asks for itself alone, and gets it.
        let a = loop {
            id += 1;
            match g.arrive(key(), id, [1, 0, 0], ms(1000), at(2)) {
                GlobalVerdict::Wait { ask: Some(a) } => break a,
                GlobalVerdict::Pass { ask: None } => {}
                other => panic!("{other:?}"),
            }
        };
        assert_eq!(a.hits, [1, 0, 0], "exactly its need");
        g.sent(a.key, 2);
        assert_eq!(g.answered(2, &ok(2), at(3)).pass, vec![id]);
    }

    #[test]
    fn over_limit_is_cached_until_its_reset() {
        let mut g = GlobalGate::new(rules(FailureMode::Local, 1));
        let a = asked(g.arrive(key(), 1, [1, 0, 0], ms(5000), at(0)));
        g.sent(a.key, 1);
        let o = g.answered(1, &over(0, 3000), at(10));
        assert!(o.pass.is_empty() && o.refuse.is_empty(), "may wait 5 s for a 3 s reset");
        assert_eq!(g.blocked(key(), [1, 0, 0], at(1010)), Some((ms(2000), Cause::Limit)));
        // A request that may wait 1 s is refused at once, no call.
        assert_eq!(
            g.arrive(key(), 2, [1, 0, 0], ms(1000), at(1010)),
            GlobalVerdict::Refuse { wait: ms(2000), cause: Cause::Limit }
        );
        assert_eq!(g.take_counts().calls, 1);
        // Nothing asked before the reset; asked at it.
        assert!(g.tick(at(2000)).asks.is_empty());
        let o = g.tick(at(3010));
        assert_eq!(o.asks, vec![Ask { key: 0, hits: [1, 0, 0] }]);
        g.sent(0, 2);
        assert_eq!(g.answered(2, &ok(9), at(3020)).pass, vec![1]);
    }

    #[test]
    fn tokens_go_with_requests_and_each_unit_is_granted_alone() {
        let mut g = GlobalGate::new(rules(FailureMode::Local, 1));
        let a = asked(g.arrive(key(), 1, [1, 500, 0], ms(5000), at(0)));
        assert_eq!(a.hits, [1, 500, 0]);
        g.sent(0, 1);
        let r = Response {
            overall: Code::OverLimit,
            statuses: vec![
                Status { code: Code::Ok, remaining: Some(50), until_reset_ms: None },
                Status { code: Code::OverLimit, remaining: Some(100), until_reset_ms: Some(500) },
            ],
        };
        assert!(g.answered(1, &r, at(0)).pass.is_empty());
        // The request unit is held (leased); only tokens are asked for, at the tokens' reset.
        assert!(g.tick(at(499)).asks.is_empty());
        let o = g.tick(at(501));
        assert_eq!(o.asks, vec![Ask { key: 0, hits: [0, 500, 0] }]);
        g.sent(0, 2);
        let r = Response { overall: Code::Ok, statuses: vec![Status { code: Code::Ok, ..Status::default() }] };
        assert_eq!(g.answered(2, &r, at(502)).pass, vec![1]);
    }

    #[test]
    fn failure_modes() {
        for (mode, passed) in [(FailureMode::Local, true), (FailureMode::Allow, true), (FailureMode::Deny, false)] {
            let mut g = GlobalGate::new(rules(mode, 32));
            let a = asked(g.arrive(key(), 1, [1, 0, 0], ms(1000), at(0)));
            g.sent(a.key, 1);
            g.arrive(key(), 2, [1, 0, 0], ms(1000), at(0));
            let o = g.failed(1, false, at(40));
            if passed {
                assert_eq!(o.fallback, vec![1, 2], "{mode:?}");
                assert!(o.pass.is_empty(), "the service counted nothing for them");
            } else {
                assert_eq!(o.refuse, vec![unavailable(1), unavailable(2)]);
            }
            // Local skips the service for a while; allow asks again at once.
            let next = g.arrive(key(), 3, [1, 0, 0], ms(1000), at(50));
            match mode {
                FailureMode::Local => assert_eq!(next, GlobalVerdict::Fallback),
                _ => assert!(matches!(next, GlobalVerdict::Wait { ask: Some(_) })),
            }
        }
    }

    #[test]
    fn no_request_waits_past_the_timeout_for_a_silent_service() {
        let mut g = GlobalGate::new(rules(FailureMode::Allow, 32));
        let a = asked(g.arrive(key(), 1, [1, 0, 0], ms(10_000), at(0)));
        g.sent(a.key, 1);
        assert!(g.tick(at(100)).pass.is_empty());
        assert_eq!(g.tick(at(151)).fallback, vec![1], "timeout 50 ms + grace");
        assert_eq!(g.answered(1, &ok(5), at(200)), Outcome::default(), "a late answer is ignored");
    }

    #[test]
    fn garbage_answers_fail_like_errors() {
        let mut g = GlobalGate::new(rules(FailureMode::Deny, 32));
        let a = asked(g.arrive(key(), 1, [1, 0, 0], ms(1000), at(0)));
        g.sent(a.key, 1);
        let o = g.answered(1, &Response::default(), at(1));
        assert_eq!(o.refuse, vec![unavailable(1)]);
    }

    #[test]
    fn the_key_table_is_bounded() {
        let mut g = GlobalGate::new(rules(FailureMode::Local, 32));
        for t in 0..(MAX_KEYS as u32 + 10) {
            let k = t.to_string();
            if let GlobalVerdict::Wait { ask: Some(a) } = g.arrive(&k, t, [1, 0, 0], ms(1000), at(0)) {
                g.sent(a.key, t + 1);
                g.answered(t + 1, &ok(5), at(0));
            }
        }
        assert!(g.keys.len() <= MAX_KEYS);
    }

    #[test]
    fn a_full_key_table_follows_the_failure_mode() {
        for mode in [FailureMode::Deny, FailureMode::Local, FailureMode::Allow] {
            let mut g = GlobalGate::new(rules(mode, 32));
            // Every key busy: a call in flight for each, none answered.
            for t in 0..MAX_KEYS as u32 {
                let a = asked(g.arrive(&t.to_string(), t, [1, 0, 0], ms(1000), at(0)));
                g.sent(a.key, t + 1);
            }
            g.take_counts();
            let v = g.arrive("new", 5000, [1, 0, 0], ms(1000), at(1));
            let c = g.take_counts();
            match mode {
                FailureMode::Deny => {
                    assert_eq!(v, GlobalVerdict::Refuse { wait: RETRY, cause: Cause::Unavailable });
                    assert_eq!(c.fallback, 0);
                }
                _ => {
                    assert_eq!(v, GlobalVerdict::Fallback, "{mode:?}");
                    assert_eq!(c.fallback, 1, "{mode:?}");
                }
            }
            assert_eq!(c.errors, 1, "{mode:?}: counted as a failure");
            // The tracked keys are unaffected: `local` skips the service only for the untracked key.
            assert_eq!(g.arrive("0", 6000, [1, 0, 0], ms(1000), at(2)), GlobalVerdict::Wait { ask: None }, "{mode:?}");
        }
    }

    fn status(code: Code, remaining: u64, reset_ms: u64) -> Status {
        Status { code, remaining: Some(remaining), until_reset_ms: Some(reset_ms) }
    }

    fn answer(statuses: Vec<Status>) -> Response {
        let over = statuses.iter().any(|s| s.code == Code::OverLimit);
        Response { overall: if over { Code::OverLimit } else { Code::Ok }, statuses }
    }

    #[test]
    fn statuses_map_to_the_units_asked_in_order() {
        // One, two or three descriptors: the n-th status is the n-th unit with hits, in UNITS order.
        for (hits, over_unit) in [
            ([1, 0, 0], REQUESTS),
            ([1, 0, 1], COST),
            ([1, 700, 0], TOKENS),
            ([1, 700, 1], COST),
            ([1, 700, 1], TOKENS),
            ([0, 700, 1], COST),
        ] {
            let mut g = GlobalGate::new(rules(FailureMode::Local, 1));
            let a = asked(g.arrive(key(), 1, hits, ms(0), at(0)));
            assert_eq!(a.hits, hits);
            // Reserved tokens come back as refunds: their over-limit answer holds 1 s at most.
            let wait = if over_unit == TOKENS { 1000 } else { 5000 };
            g.sent(a.key, 1);
            let asked: Vec<usize> = UNITS.into_iter().filter(|&u| hits[u] > 0).collect();
            let statuses = asked
                .iter()
                .map(|&u| if u == over_unit { status(Code::OverLimit, 0, 5000) } else { status(Code::Ok, 9, 1000) })
                .collect();
            let o = g.answered(1, &answer(statuses), at(1));
            let cause = if over_unit == COST { Cause::Budget } else { Cause::Limit };
            assert_eq!(o.refuse, vec![Refused { id: 1, wait: ms(wait), cause }], "{hits:?}, over: {over_unit}");
            // The units granted are held; the one refused is cached over limit.
            assert_eq!(g.blocked(key(), hits, at(2)), Some((ms(wait - 1), cause)));
            let mut other = hits;
            other[over_unit] = 0;
            assert_eq!(g.blocked(key(), other, at(2)), None, "{hits:?}: only {over_unit} is over");
        }
    }

    #[test]
    fn a_spent_budget_refuses_with_its_cause_and_the_latest_reset_decides() {
        let mut g = GlobalGate::new(rules(FailureMode::Local, 1));
        let a = asked(g.arrive(key(), 1, [1, 100, 1], ms(0), at(0)));
        g.sent(a.key, 1);
        // Tokens reset in 2 s, the budget in an hour.
        let r = answer(vec![
            status(Code::Ok, 5, 1000),
            status(Code::OverLimit, 0, 2000),
            status(Code::OverLimit, 0, 3_600_000),
        ]);
        let o = g.answered(1, &r, at(0));
        assert_eq!(o.refuse, vec![Refused { id: 1, wait: ms(3_600_000), cause: Cause::Budget }]);
        assert_eq!(
            g.arrive(key(), 2, [1, 100, 1], ms(1000), at(10)),
            GlobalVerdict::Refuse { wait: ms(3_599_990), cause: Cause::Budget }
        );
        // A request that does not count cost waits only on the tokens' reset (at most 1 s: refunds
        // may free room before it): the limit's cause.
        assert_eq!(g.blocked(key(), [1, 100, 0], at(10)), Some((ms(990), Cause::Limit)));
        // The budget resetting first: the tokens' later reset decides, and says so.
        let mut g = GlobalGate::new(rules(FailureMode::Local, 1));
        let a = asked(g.arrive(key(), 1, [1, 100, 1], ms(0), at(0)));
        g.sent(a.key, 1);
        let r = answer(vec![
            status(Code::Ok, 5, 1000),
            status(Code::OverLimit, 0, 60_000),
            status(Code::OverLimit, 0, 500),
        ]);
        assert_eq!(g.answered(1, &r, at(0)).refuse[0].cause, Cause::Limit);
    }

    #[test]
    fn a_budget_check_is_never_leased_ahead_nor_anything_beside_it() {
        let mut g = GlobalGate::new(rules(FailureMode::Local, 8));
        let ok3 = answer(vec![status(Code::Ok, 1_000_000, 1000); 3]);
        let mut most = NONE;
        let mut token = 0;
        // A second of 20 requests of 300 tokens, each checking the budget with 1.
        for id in 0..20 {
            let ask = match g.arrive(key(), id, [1, 300, 1], ms(1000), at(u64::from(id) * 50)) {
                GlobalVerdict::Pass { ask } => ask,
                GlobalVerdict::Wait { ask } => ask,
                other => panic!("{other:?}"),
            };
            if let Some(a) = ask {
                token += 1;
                for u in UNITS {
                    most[u] = most[u].max(a.hits[u]);
                }
                g.sent(a.key, token);
                g.answered(token, &ok3, at(u64::from(id) * 50));
            }
        }
        // Each request's check goes to the service, where the charges of the answers before it
        // are: a lease of checks would pass a budget by as many. Nothing is leased beside it.
        assert_eq!(most, [1, 300, 1], "{most:?}");
        assert_eq!(token, 20, "a call per request");
        assert_eq!(g.take_counts().leased, NONE);
    }

    #[test]
    fn the_ledger_settles_per_key_what_the_service_did_not_count_right() {
        let mut l = Ledger::default();
        // Reserve: asked 1000 tokens and 1 micro-dollar; used 150 and 420.
        assert!(l.add("a", [1, 1000, 1], true, [1, 150, 420]));
        assert!(l.add("a", [1, 100, 1], true, [1, 130, 80]));
        // Let through without the service's word: all it used is charged.
        assert!(l.add("b", [1, 1000, 1], false, [1, 200, 50]));
        // Units it did not ask for are not settled.
        assert!(l.add("c", [1, 0, 0], true, [1, 999, 999]));
        let s = l.take(Accounting::Reserve);
        assert_eq!(
            s,
            vec![
                Settlement { key: "a".into(), charge: [0, 0, 419 + 79], refund: [0, 850 - 30, 0] },
                Settlement { key: "b".into(), charge: [0, 200, 50], refund: [0; 3] },
            ]
        );
        assert!(l.is_empty());
        // ChargeAfter: the check took 1 of each; a net refund cannot be sent.
        l.add("a", [1, 1, 1], true, [1, 500, 0]);
        l.add("d", [1, 1, 1], true, [1, 0, 0]);
        assert_eq!(
            l.take(Accounting::ChargeAfter),
            vec![Settlement { key: "a".into(), charge: [0, 499, 0], refund: [0; 3] }]
        );
    }

    #[test]
    fn the_ledger_is_bounded() {
        let mut l = Ledger::default();
        for k in 0..MAX_KEYS + 5 {
            l.add(&k.to_string(), [1, 10, 0], true, [1, 20, 0]);
        }
        assert!(l.add("0", [1, 10, 0], true, [1, 20, 0]), "a known key still settles");
        assert_eq!(l.take_dropped(), 5);
        assert_eq!(l.take(Accounting::Reserve).len(), MAX_KEYS);
    }
}
