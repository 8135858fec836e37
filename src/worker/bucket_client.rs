//! This worker's dealings with the shared bucket: its key, the lease of tokens taken ahead of
//! requests (spent with no shared-data call) and the LLM-token settlements held with it until the
//! tick gives both back, the refusals reused for want of a request token, and the waiter counts
//! this worker last wrote for itself.

use super::{readout, Readout, Refusal};
use crate::admission::{AdmissionRules, Draws, SharedBucket, TokenNeed, HEARTBEAT};
use crate::config::Config;
use crate::priority::Priority;
use crate::reply::Reason;
use crate::store::{self, Status, Store};
use crate::time::{Duration, Instant};

/// What `published` says after a failed write: nothing matches it, so the next tick writes.
const LOST: [u32; 4] = [u32::MAX; 4];
/// A lease takes at most this share of the tokens above every class's floor, so leases stop
/// well before the bucket runs low and every worker can take one.
const LEASE_SHARE: f64 = 8.0;
/// How long a refusal for want of a request token is reused for the same class on the same
/// worker, never past the time its token exists. A token given back meanwhile by another worker
/// (a lease, a waiter that left) is seen at most this late. At 10,000 refusals/s per worker,
/// one read of the bucket serves ten.
const REFUSAL_FRESH: Duration = Duration::from_millis(1);

/// Tokens this worker took from the shared bucket ahead of its requests (a lease), spent with no
/// shared-data call, and LLM-token settlements not written yet. Both go back on the next tick.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct BucketLease {
    pub requests: f64,
    /// Per token bucket: LLM tokens leased, spent only by admissions from the lease.
    pub tokens: Vec<f64>,
    /// Per token bucket: refunds minus charges not written yet (negative: a debt). Kept apart
    /// from `tokens`: spending a refund here would skip the class floors and the debt.
    pub settled: Vec<f64>,
    /// Admissions since the last tick: how large the next lease should be.
    used: u32,
    /// How many requests the next lease takes (1: none beyond the request itself).
    size: u32,
    /// Average LLM-token need of admitted requests, to size token leases.
    avg_need: f64,
    /// Leases taken and the requests they held, since the host last read them (for stats).
    pub taken: (u64, u64),
}

/// What a lease takes beside one admission: request tokens, and LLM tokens from each bucket
/// the admission drew on.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(super) struct Extra {
    requests: f64,
    tokens: [Option<(usize, f64)>; 3],
}

impl Extra {
    /// Takes it out of `s`, the value the admission writes.
    pub(super) fn take_from(self, s: &mut SharedBucket) {
        s.level.tokens -= self.requests;
        for (i, t) in self.tokens.into_iter().flatten() {
            if let Some(l) = s.token_levels.get_mut(i) {
                l.tokens -= t;
            }
        }
    }
}

impl BucketLease {
    /// Whether it holds leased tokens or settlements to write back.
    pub(super) fn holds(&self) -> bool {
        self.requests > 0.0 || self.tokens.iter().chain(&self.settled).any(|&t| t != 0.0)
    }

    /// Whether requests were admitted since the last tick: the tick sizes the next lease by them.
    pub(super) fn in_use(&self) -> bool {
        self.used > 0
    }

    /// Notes what an arrival needs: an average of recent needs sizes token leases.
    pub(super) fn note_need(&mut self, need: Option<TokenNeed>) {
        if let Some(n) = need {
            let avg = &mut self.avg_need;
            *avg = if *avg == 0.0 { n.tokens as f64 } else { 0.9 * *avg + 0.1 * n.tokens as f64 };
        }
    }

    /// Admits a request from the lease, if it holds enough for it in every bucket it draws on.
    pub(super) fn take(&mut self, rules: &AdmissionRules, need: Option<TokenNeed>) -> bool {
        if self.requests < 1.0 {
            return false;
        }
        if let Some(n) = need {
            let draws = rules.draws(n);
            let held = |&(i, t): &(usize, u64)| self.tokens.get(i).is_some_and(|h| *h >= t as f64);
            if !draws.iter().flatten().all(held) {
                return false;
            }
            for (i, t) in draws.into_iter().flatten() {
                if let Some(h) = self.tokens.get_mut(i) {
                    *h -= t as f64;
                }
            }
        }
        self.requests -= 1.0;
        self.count_admission();
        true
    }

    /// Counts an admission, from the lease or the bucket: the count sizes the next lease.
    pub(super) fn count_admission(&mut self) {
        self.used = self.used.saturating_add(1);
    }

    /// What to lease beside an admission that left `s`: requests, and LLM tokens from the
    /// bucket `need` draws on. Nothing when leases are off, or near any class's floor.
    pub(super) fn extra(&self, rules: &AdmissionRules, s: &SharedBucket, need: Option<TokenNeed>) -> Extra {
        let top_floor = rules.floors.iter().fold(0.0f64, |a, &b| a.max(b));
        let room = ((s.level.tokens - top_floor) / LEASE_SHARE).floor();
        let requests = f64::from(self.size.saturating_sub(1)).min(room).max(0.0);
        if requests < 1.0 {
            return Extra::default();
        }
        let Some(n) = need else { return Extra { requests, tokens: [None; 3] } };
        let avg = self.avg_need.max(n.tokens as f64);
        // Each bucket's part of the average need, as this request's parts are.
        let share = |t: u64| if n.tokens == 0 { 1.0 } else { t as f64 / n.tokens as f64 };
        let lease = |(i, t): (usize, u64)| {
            let (b, level) = (rules.token_buckets.get(i)?, s.token_levels.get(i)?);
            let room = ((level.tokens - b.burst) / LEASE_SHARE).floor();
            Some((i, (requests * avg * share(t)).min(room).max(0.0)))
        };
        Extra { requests, tokens: rules.draws(n).map(|d| d.and_then(lease)) }
    }

    /// Adds what an admission leased beside it, in a lease of `buckets` token buckets.
    pub(super) fn add(&mut self, extra: Extra, buckets: usize) {
        self.requests += extra.requests;
        if extra.requests > 0.0 {
            self.taken.0 += 1;
            self.taken.1 += extra.requests as u64;
        }
        for (i, t) in extra.tokens.into_iter().flatten() {
            self.tokens.resize(buckets.max(self.tokens.len()), 0.0);
            if let Some(held) = self.tokens.get_mut(i) {
                *held += t;
            }
        }
    }

    /// A request reserved `reserved` and used `used` (per bucket): the difference is held until
    /// the tick.
    pub(super) fn settle(&mut self, buckets: usize, reserved: Draws, used: Draws) {
        self.settled.resize(buckets.max(self.settled.len()), 0.0);
        for (r, u) in reserved.into_iter().zip(used) {
            if let (Some((i, r)), Some((_, u))) = (r, u) {
                if let Some(t) = self.settled.get_mut(i) {
                    *t += r as f64 - u as f64;
                }
            }
        }
    }

    /// Sizes the next lease by how many requests this one served, at most `max`.
    fn size_next(&mut self, max: u32) {
        self.size = self.used.saturating_add(1).min(max);
        self.used = 0;
    }

    /// What goes back: the requests, and per token bucket the tokens plus the settlements.
    fn held(&self, buckets: usize) -> (f64, Vec<f64>) {
        let held = |i: usize| self.tokens.get(i).copied().unwrap_or(0.0) + self.settled.get(i).copied().unwrap_or(0.0);
        (self.requests, (0..buckets).map(held).collect())
    }

    /// Everything held went back.
    fn clear(&mut self) {
        self.requests = 0.0;
        self.tokens.iter_mut().chain(&mut self.settled).for_each(|t| *t = 0.0);
    }

    /// Leases taken and the requests they held since the last call.
    pub(super) fn take_counts(&mut self) -> (u64, u64) {
        std::mem::take(&mut self.taken)
    }
}

/// A refusal kept for the next arrivals of its class: its reason, the level it saw, when it was
/// made and when a token exists again.
#[derive(Clone, Copy, Debug)]
struct Refused {
    reason: Reason,
    tokens: f64,
    at: Instant,
    until: Instant,
}

/// The bucket's key, and what this worker holds and remembers of the bucket between writes.
pub(super) struct BucketClient {
    pub(super) key: String,
    /// The worker's random id: its entry among the bucket's waiter counts.
    me: u64,
    /// The most requests a lease takes.
    max_lease: u32,
    pub(super) lease: BucketLease,
    /// Per class, the last refusal for want of a request token (no token, queue full), so more
    /// arrivals within `REFUSAL_FRESH` are refused without reading the bucket again.
    refused: [Option<Refused>; 4],
    /// The waiter counts this worker last wrote for itself, and when (a whole millisecond).
    published: ([u32; 4], Instant),
}

impl BucketClient {
    pub(super) fn new(config: &Config, id: u64) -> BucketClient {
        BucketClient {
            key: format!("llm_ratelimit/{}/bucket", config.name),
            me: id,
            max_lease: config.bucket.max_lease.max(1) as u32,
            lease: BucketLease { size: 1, ..BucketLease::default() },
            refused: [None; 4],
            published: ([0; 4], Instant::ZERO),
        }
    }

    /// Updates the shared bucket with `f`, which sees token levels that match the configuration.
    pub(super) fn update<R>(
        &self,
        store: &impl Store,
        rules: &AdmissionRules,
        now: Instant,
        mut f: impl FnMut(SharedBucket) -> (R, Option<SharedBucket>),
    ) -> Result<R, Status> {
        store::update(store, &self.key, || rules.full(now), |s| f(rules.fit(s, now)))
    }

    /// The request tokens the bucket holds at `now`, if it can be read.
    pub(super) fn tokens_now(&self, store: &impl Store, rules: &AdmissionRules, now: Instant) -> Option<f64> {
        let s: SharedBucket = store::read(store, &self.key).ok()??;
        Some(rules.bucket.refill(s.level, now).tokens)
    }

    /// Gives the lease and the settlements back to the shared bucket, and sizes the next lease by
    /// how many requests the last one served. `own`: this worker's waiters, for the readout.
    pub(super) fn return_lease(
        &mut self,
        store: &impl Store,
        rules: &AdmissionRules,
        own: [u32; 4],
        now: Instant,
    ) -> Result<Option<Readout>, Status> {
        self.lease.size_next(self.max_lease);
        if !self.lease.holds() {
            return Ok(None);
        }
        let (requests, tokens) = self.lease.held(rules.token_buckets.len());
        let me = self.me;
        let written = self.update(store, rules, now, |s| {
            let next = rules.give_back(s, requests, &tokens, now);
            (readout(&next, next.waiting(me, own, now)), Some(next))
        })?;
        self.lease.clear();
        Ok(Some(written))
    }

    /// Writes this worker's waiter counts `own`. After a failure, whatever the shared value says
    /// of this worker, the next tick writes it again.
    pub(super) fn publish(
        &mut self,
        store: &impl Store,
        rules: &AdmissionRules,
        own: [u32; 4],
        now: Instant,
    ) -> Result<Readout, Status> {
        let me = self.me;
        let written = self.update(store, rules, now, |s| {
            let next = s.with_worker(me, own, now);
            (readout(&next, next.waiting(me, own, now)), Some(next))
        });
        self.published = if written.is_ok() { (own, now.floor_millis()) } else { (LOST, Instant::ZERO) };
        written
    }

    /// A write carried this worker's waiter counts `own` at `now`.
    pub(super) fn wrote(&mut self, own: [u32; 4], now: Instant) {
        self.published = (own, now.floor_millis());
    }

    /// The counts written last are to be written again on the next tick.
    pub(super) fn write_again(&mut self) {
        self.published = (LOST, Instant::ZERO);
    }

    /// Whether the counts written last say this worker has waiters (or were lost).
    pub(super) fn shows_waiters(&self) -> bool {
        self.published.0 != [0; 4]
    }

    /// Whether this worker's waiter counts must be written: they are not `own`, or it has
    /// waiters and wrote them `HEARTBEAT` ago (or in the future: the clock stepped back), both
    /// instants counted in whole milliseconds.
    pub(super) fn heartbeat_due(&self, own: [u32; 4], now: Instant) -> bool {
        let (counts, at) = self.published;
        let now = now.floor_millis();
        let stale = now - at >= HEARTBEAT || now < at;
        counts != own || (stale && own != [0; 4])
    }

    /// The refusal of request `id` of `class` made for want of a request token less than
    /// `REFUSAL_FRESH` ago, while its token does not exist yet.
    pub(super) fn recent_refusal(&self, id: u32, class: Priority, now: Instant) -> Option<Refusal> {
        let r = self.refused[class.index()]?;
        let fresh = now >= r.at && now < r.until.min(r.at + REFUSAL_FRESH);
        fresh.then(|| Refusal::of(id, class, r.reason, r.until - now, r.tokens))
    }

    /// Keeps a refusal of `class` for `reason`, when the bucket held `tokens` and a token exists
    /// in `wait`, for the next arrivals of that class.
    pub(super) fn remember_refusal(
        &mut self,
        class: Priority,
        reason: Reason,
        tokens: f64,
        wait: Duration,
        now: Instant,
    ) {
        self.refused[class.index()] = Some(Refused { reason, tokens, at: now, until: now + wait });
    }

    /// Leases given back may make the refusals kept wrong.
    pub(super) fn forget_refusals(&mut self) {
        self.refused = [None; 4];
    }
}
