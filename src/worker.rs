//! One worker's part of the filter: its wait queue, and every decision it makes with the
//! process-wide state (the provider's breaker, the shared bucket) kept in a [`Store`].
//!
//! Pure: it never calls the host. Time comes in as an argument, shared data through the `Store`
//! trait, and the answers (pass, wait, refuse, release) go back to the host layer, which turns
//! them into host calls. Tests and the simulation drive several `Worker`s over one `MemStore`.

use crate::admission::{AdmissionRules, Arrival, Need, SharedBucket, HEARTBEAT_MS};
use crate::breaker::{BreakerRules, Gate, Mode, ProviderState, Verdict};
use crate::bucket::Level;
use crate::config::Config;
use crate::idmap::IdMap;
use crate::priority::Priority;
use crate::queue::{WaitQueue, Waiter};
use crate::reply::Reason;
use crate::signals::Signals;
use crate::store::{self, Status, Store};
use crate::tenants::{self, TenantRules, TenantTake};

const NANOS_PER_MS: u64 = 1_000_000;
/// What `published` says after a failed write: nothing matches it, so the next tick writes.
const LOST: [u32; 4] = [u32::MAX; 4];
/// How long a provider state read says "let it through" without reading it again. At 1000
/// requests/s per worker, at most one request goes on a state a millisecond old.
const PROVIDER_FRESH_MS: u64 = 1;
/// A lease takes at most this share of the tokens above every class's floor, so leases stop
/// well before the bucket runs low and every worker can take one.
const LEASE_SHARE: f64 = 8.0;
/// How long a refusal for want of a request token is reused for the same class on the same
/// worker, never past the time its token exists. A token given back meanwhile by another worker
/// (a lease, a waiter that left) is seen at most this late. At 10,000 refusals/s per worker,
/// one read of the bucket serves ten.
const REFUSAL_FRESH_NS: u64 = NANOS_PER_MS;

/// Tokens this worker took from the shared bucket ahead of its requests (a lease), spent with no
/// shared-data call, and LLM-token settlements not written yet. Both go back on the next tick.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Lease {
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

/// Process-wide waiters per class, request tokens and (with token limits) the provider token
/// bucket's level, after a write: what the gauges show.
pub type Levels = ([u32; 4], f64, Option<f64>);

fn levels(s: &SharedBucket, waiting: [u32; 4]) -> Levels {
    (waiting, s.level.tokens, s.token_levels.first().map(|l| l.tokens))
}

/// A local 429 the host must send.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Refusal {
    /// The request (Envoy context id) to answer.
    pub id: u32,
    pub class: Priority,
    pub reason: Reason,
    /// When a retry can succeed.
    pub wait_ns: u64,
    /// Tokens the bucket held, for the `RateLimit` header.
    pub tokens: f64,
    /// False for a terminal quota: clients should not retry soon.
    pub retry: bool,
    /// How long it waited first, for a request refused while waiting.
    pub queued_ms: Option<u64>,
}

/// What `admit` decided, with what the host publishes about it.
#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    pub admission: Admission,
    /// Process-wide waiters and tokens after the write, for the gauges.
    pub levels: Option<Levels>,
    /// What the tenant table did, when tenant limits are on.
    pub tenant: Option<tenants::TakeOutcome>,
}

/// What to do with an arriving request.
#[derive(Clone, Debug, PartialEq)]
pub enum Admission {
    /// Continue upstream; `probe` is set when it goes as the half-open probe.
    Pass {
        probe: Option<u32>,
    },
    /// Paused in this worker's queue; `shed` is a waiter evicted to make room, to be answered.
    Wait {
        shed: Option<Refusal>,
    },
    Refuse(Refusal),
}

/// What an upstream attempt does (see [`Worker::attempt`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Attempt {
    Go,
    /// Goes as the half-open probe: a probe was due and none was out.
    Probe {
        probe: u32,
    },
    Hold {
        until_ms: u64,
    },
    Refuse(Refusal),
}

/// A waiter let through by a tick.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Release {
    pub id: u32,
    pub class: Priority,
    pub waited_ms: u64,
    /// Set when it goes as the half-open probe.
    pub probe: Option<u32>,
}

/// What one tick did, for the host to carry out.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Tick {
    pub released: Vec<Release>,
    /// Waiters whose `max_wait_ms` passed.
    pub expired: Vec<Refusal>,
    /// A half-open probe was let through by this tick.
    pub probe_started: bool,
    /// The breaker's new position, when this tick moved it.
    pub moved: Option<Mode>,
    /// Process-wide waiters and tokens after the last write, for the gauges.
    pub levels: Option<Levels>,
    /// Shared-data failures (the tick went on with what it could do).
    pub errors: Vec<Status>,
}

/// The per-worker state.
pub struct Worker {
    pub config: Config,
    pub rules: AdmissionRules,
    /// This worker VM's random id: its entry among the bucket's waiter counts.
    pub id: u64,
    pub provider_key: String,
    pub bucket_key: String,
    /// Tenant limits, and the prefix of the tenant table's keys.
    pub tenants: Option<(TenantRules, String)>,
    queue: WaitQueue<u32>,
    /// The waiter counts this worker last wrote for itself, and when.
    published: ([u32; 4], u64),
    /// Requests released from the queue, until their response reads how long they waited.
    released: IdMap<Release>,
    /// The clock at the last tick, to notice a step back.
    last_tick_ms: u64,
    lease: Lease,
    /// The provider state last read and when, to let requests through without reading it again
    /// within `PROVIDER_FRESH_MS`.
    provider_seen: std::cell::Cell<Option<(ProviderState, u64)>>,
    /// Per class, the last refusal for want of a request token (no token, queue full), so more
    /// arrivals within `REFUSAL_FRESH_NS` are refused without reading the bucket again.
    refused: [Option<Refused>; 4],
}

/// A refusal kept for the next arrivals of its class: its reason, the level it saw, when it was
/// made and when a token exists again.
#[derive(Clone, Copy, Debug)]
struct Refused {
    reason: Reason,
    tokens: f64,
    at_ns: u64,
    until_ns: u64,
}

impl Worker {
    pub fn new(config: Config, id: u64) -> Worker {
        let name = &config.name;
        Worker {
            rules: AdmissionRules::new(&config),
            id,
            provider_key: format!("llm_ratelimit/{name}/provider"),
            bucket_key: format!("llm_ratelimit/{name}/bucket"),
            tenants: config.tenant.as_ref().map(|t| {
                let slots = t.slots.min(u64::from(u32::MAX)) as u32;
                let rules = TenantRules::new(t.capacity, t.refill_rate, t.burst_allowance, slots);
                (rules, format!("llm_ratelimit/{name}"))
            }),
            queue: WaitQueue::new(config.classes.clone().map(|c| c.weight)),
            published: ([0; 4], 0),
            released: IdMap::new(),
            last_tick_ms: 0,
            lease: Lease { size: 1, ..Lease::default() },
            provider_seen: std::cell::Cell::new(None),
            refused: [None; 4],
            config,
        }
    }

    fn breaker(&self) -> &BreakerRules {
        &self.config.provider.breaker
    }

    /// A full bucket with nobody waiting: what the first request of the process finds.
    pub fn fresh_bucket(&self, now_ns: u64) -> SharedBucket {
        self.rules.full(now_ns)
    }

    /// Updates the shared bucket with `f`, which sees token levels that match the configuration.
    fn update_bucket<R>(
        &self,
        store: &impl Store,
        now_ns: u64,
        f: impl FnMut(SharedBucket) -> (R, Option<SharedBucket>),
    ) -> Result<R, Status> {
        let mut f = f;
        store::update(store, &self.bucket_key, || self.fresh_bucket(now_ns), |s| f(self.rules.fit(s, now_ns)))
    }

    /// Request `need` was taken and the provider reports `actual` tokens used: the difference
    /// is given back or taken on the next tick (held here until then, like a lease).
    pub fn reconcile(&mut self, need: Need, actual: u64) {
        let n = self.rules.token_buckets.len();
        let settled = &mut self.lease.settled;
        settled.resize(n.max(settled.len()), 0.0);
        if let Some(t) = settled.get_mut(usize::from(need.bucket)) {
            *t += need.tokens as f64 - actual as f64;
        }
    }

    /// Admits a request from this worker's lease, if it holds enough for it.
    fn take_from_lease(&mut self, need: Option<Need>) -> bool {
        let l = &mut self.lease;
        if l.requests < 1.0 {
            return false;
        }
        if let Some(n) = need {
            match l.tokens.get_mut(usize::from(n.bucket)) {
                Some(t) if *t >= n.tokens as f64 => *t -= n.tokens as f64,
                _ => return false,
            }
        }
        l.requests -= 1.0;
        l.used = l.used.saturating_add(1);
        true
    }

    /// What to lease beside an admission that left `s`: requests, and LLM tokens from the
    /// bucket `need` draws on. Nothing when leases are off, or near any class's floor.
    fn lease_extra(&self, s: &SharedBucket, need: Option<Need>) -> (f64, Option<(usize, f64)>) {
        let top_floor = self.rules.floors.iter().fold(0.0f64, |a, &b| a.max(b));
        let room = ((s.level.tokens - top_floor) / LEASE_SHARE).floor();
        let requests = f64::from(self.lease.size.saturating_sub(1)).min(room).max(0.0);
        if requests < 1.0 {
            return (0.0, None);
        }
        let Some(n) = need else { return (requests, None) };
        let i = usize::from(n.bucket);
        let (Some(b), Some(level)) = (self.rules.token_buckets.get(i), s.token_levels.get(i)) else {
            return (requests, None);
        };
        let room = ((level.tokens - b.burst) / LEASE_SHARE).floor();
        let avg = self.lease.avg_need.max(n.tokens as f64);
        (requests, Some((i, (requests * avg).min(room).max(0.0))))
    }

    /// Gives this worker's lease and settlements back to the shared bucket, and sizes the next
    /// lease by how many requests the last one served.
    fn return_lease(&mut self, store: &impl Store, now_ns: u64) -> Result<Option<Levels>, Status> {
        let l = &mut self.lease;
        l.size = l.used.saturating_add(1).min(self.config.bucket.max_lease.max(1) as u32);
        l.used = 0;
        if !self.holds_lease() {
            return Ok(None);
        }
        let l = &self.lease;
        let held = |i: usize| l.tokens.get(i).copied().unwrap_or(0.0) + l.settled.get(i).copied().unwrap_or(0.0);
        let (requests, tokens): (f64, Vec<f64>) = (l.requests, (0..self.rules.token_buckets.len()).map(held).collect());
        let (me, own, now_ms) = (self.id, self.local_counts(), now_ns / NANOS_PER_MS);
        let written = self.update_bucket(store, now_ns, |s| {
            let mut next = SharedBucket { level: self.rules.bucket.refill(s.level, now_ns), ..s };
            next.level.tokens = (next.level.tokens + requests).min(self.rules.bucket.max);
            for ((b, l), t) in self.rules.token_buckets.iter().zip(&mut next.token_levels).zip(&tokens) {
                let refilled = b.refill(*l, now_ns);
                // A debt is written whole: the refill pays it back before more of the bucket goes.
                *l = Level { tokens: (refilled.tokens + t).min(b.max), ..refilled };
            }
            (levels(&next, next.waiting(me, own, now_ms)), Some(next))
        })?;
        self.lease.requests = 0.0;
        self.lease.tokens.iter_mut().chain(&mut self.lease.settled).for_each(|t| *t = 0.0);
        Ok(Some(written))
    }

    /// Creates what this worker's role writes in shared data, if missing: the provider state and
    /// the alert slots (every role), the bucket and the tenant table (roles that admit). Before
    /// traffic, because a write to a missing key is unconditional: two workers tripping the
    /// breaker on a fresh provider key would both succeed, and both count the trip.
    pub fn ensure_shared(&self, store: &impl Store, now_ns: u64) -> Result<(), Status> {
        store::ensure(store, &self.provider_key, ProviderState::default())?;
        if self.config.alert.is_some() {
            for slot in crate::alert::SLOTS {
                store::ensure(store, &crate::alert::slot_key(&self.config.name, slot), crate::alert::SentAt(0))?;
            }
        }
        if !self.config.role.admits() {
            return Ok(());
        }
        store::ensure(store, &self.bucket_key, self.fresh_bucket(now_ns))?;
        match &self.tenants {
            Some((rules, prefix)) => tenants::ensure(store, prefix, rules, now_ns),
            None => Ok(()),
        }
    }

    /// This worker's waiters per class.
    pub fn local_counts(&self) -> [u32; 4] {
        Priority::ALL.map(|p| self.queue.len(p).min(u32::MAX as usize) as u32)
    }

    /// Whether request `id` is paused in this worker's queue.
    pub fn is_waiting(&self, id: u32) -> bool {
        self.queue.contains(id)
    }

    /// Whether the tick has work: waiters to serve, or counts to correct in shared data.
    pub fn needs_tick(&self) -> bool {
        // Admissions since the last tick size the next lease: the tick must see them.
        !self.queue.is_empty() || self.published.0 != [0; 4] || self.holds_lease() || self.lease.used > 0
    }

    /// Whether this worker holds leased tokens or settlements to write back.
    pub fn holds_lease(&self) -> bool {
        let l = &self.lease;
        l.requests > 0.0 || l.tokens.iter().chain(&l.settled).any(|&t| t != 0.0)
    }

    /// What this worker holds beside the shared value (for tests and the simulation).
    pub fn lease(&self) -> &Lease {
        &self.lease
    }

    /// Leases taken and the requests they held since the last call.
    pub fn take_lease_counts(&mut self) -> (u64, u64) {
        std::mem::take(&mut self.lease.taken)
    }

    /// The release of request `id`, once, for its response headers.
    pub fn take_release(&mut self, id: u32) -> Option<Release> {
        self.released.remove(&id)
    }

    /// What the provider's last answers allow a request to do now. A `Probe` changed the shared
    /// state: the caller must let exactly that request through.
    pub fn gate(&self, store: &impl Store, now_ms: u64) -> Result<Gate, Status> {
        self.gate_and_mode(store, now_ms).map(|(g, _)| g)
    }

    /// Writes this worker's counts again on the next tick, which reads everyone's: the gauges it
    /// wrote last showed waiters elsewhere, and an idle worker would otherwise never correct them.
    pub fn refresh_levels(&mut self) {
        self.published = (LOST, 0);
    }

    /// Another filter of this worker learned from the provider: the state cached here is stale.
    pub fn forget_provider(&self) {
        self.provider_seen.set(None);
    }

    /// Like `gate`, and the breaker's new position when this call moved it.
    pub fn gate_and_mode(&self, store: &impl Store, now_ms: u64) -> Result<(Gate, Option<Mode>), Status> {
        if let Some((s, seen_ms)) = self.provider_seen.get() {
            let fresh = now_ms >= seen_ms && now_ms - seen_ms < PROVIDER_FRESH_MS;
            if fresh && self.breaker().gate(s, now_ms, self.id) == (Gate::Pass, None) {
                return Ok((Gate::Pass, None));
            }
        }
        let (gate, moved, seen) = store::update(store, &self.provider_key, ProviderState::default, |s| {
            let (gate, next) = self.breaker().gate(s, now_ms, self.id);
            let moved = next.filter(|n| n.mode != s.mode).map(|n| n.mode);
            ((gate, moved, next.unwrap_or(s)), next)
        })?;
        self.provider_seen.set(Some((seen, now_ms)));
        Ok((gate, moved))
    }

    /// A request let through under `Gate::Counted` went upstream: count it.
    pub fn spend(&self, store: &impl Store) -> Result<(), Status> {
        self.provider_seen.set(None);
        store::update(store, &self.provider_key, ProviderState::default, |s| ((), self.breaker().spend(s)))
    }

    /// The provider state as it is, for the gauges and log lines.
    pub fn provider_state(&self, store: &impl Store) -> Result<ProviderState, Status> {
        Ok(store::read(store, &self.provider_key)?.unwrap_or_default())
    }

    /// Learns from one provider answer; `probe` is the probe number the request carried.
    pub fn observe(
        &self,
        store: &impl Store,
        status: u16,
        signals: &Signals,
        probe: Option<u32>,
        now_ms: u64,
    ) -> Result<(Verdict, ProviderState, bool), Status> {
        // An answer that changes nothing in the state read within `PROVIDER_FRESH_MS` (a success
        // with quota to spare, the common case) is not read again: a change another worker made
        // meanwhile is seen by the next answer after that.
        if let Some((s, seen_ms)) = self.provider_seen.get() {
            if now_ms >= seen_ms && now_ms - seen_ms < PROVIDER_FRESH_MS {
                let (v, next) = self.breaker().observe(s, status, signals, probe, now_ms);
                if next == s && v == Verdict::default() {
                    return Ok((v, s, false));
                }
            }
        }
        let observed = store::update(store, &self.provider_key, ProviderState::default, |s| {
            let (v, next) = self.breaker().observe(s, status, signals, probe, now_ms);
            ((v, next, next.mode != s.mode), (next != s).then_some(next))
        });
        let seen = observed.as_ref().ok().map(|&(_, next, _)| (next, now_ms));
        self.provider_seen.set(seen);
        observed
    }

    /// What a 429 means for its client without learning from it again: the provider's own
    /// timing, or the reset already recorded (by an observer in the upstream chain).
    pub fn peek(&self, store: &impl Store, signals: &Signals, now_ms: u64) -> Result<Verdict, Status> {
        let s = self.provider_state(store)?;
        let recorded = (s.until_ms > now_ms).then_some(s.until_ms);
        Ok(Verdict {
            retry_at_ms: signals.retry_at().filter(|&t| t > now_ms).max(recorded),
            terminal: signals.terminal.is_some() || (s.terminal && s.mode == Mode::Open),
            ..Verdict::default()
        })
    }

    /// What an attempt the router sends upstream (in the observer: a retry of a request the
    /// provider refused) does while the provider is held or its breaker open: wait for the reset
    /// if that fits the request's class, else be answered here, never reaching the provider.
    /// Router retries then land on the reset rather than on the router's jittered back-off.
    /// When a probe must answer first (the breaker opened without timing), a retry never goes
    /// ahead of it or beside it: it is held and decided again every `PROBE_HOLD_MS`, so it goes
    /// soon after the probe's success; it is answered here if no probe answers in time. When a
    /// probe is due and none is out, the retry is the probe (retries may be all the traffic).
    pub fn attempt(&self, store: &impl Store, class: Priority, now_ms: u64) -> Result<Attempt, Status> {
        let max_wait_ms = self.config.class(class).max_wait_ms;
        store::update(store, &self.provider_key, ProviderState::default, |s| {
            // While an exhausted window's requests are counted, a retry is one of them.
            let s = if self.breaker().window_opens(&s, now_ms) { self.breaker().count_window(s) } else { s };
            if matches!(s.mode, Mode::Open | Mode::HalfOpen) {
                if let (Gate::Probe { probe }, next) = self.breaker().gate(s, now_ms, self.id) {
                    return (Attempt::Probe { probe }, next);
                }
            }
            let dry = s.counting && s.left == 0;
            let awaited = self.breaker().probe_awaited(&s, now_ms);
            let until_ms = match awaited {
                Some(end) => end.min(now_ms.saturating_add(crate::breaker::PROBE_HOLD_MS)),
                None if dry => s.until_ms.max(s.dry_until_ms),
                None => s.until_ms,
            };
            if until_ms <= now_ms && awaited.is_none() {
                return (Attempt::Go, self.breaker().spend(s));
            }
            // A terminal block that has run out waits for its probe like any other.
            let terminal = s.mode == Mode::Open && s.terminal && now_ms < s.until_ms;
            // No probe answered in time (none started: nobody arrived to be it): told to come
            // back, as a new request that can be the probe.
            let wait_ms = if until_ms > now_ms { until_ms - now_ms } else { crate::breaker::PROBE_HOLD_MS };
            if !terminal && until_ms > now_ms && wait_ms <= max_wait_ms {
                return (Attempt::Hold { until_ms }, None);
            }
            let reason = if s.mode == Mode::Closed { Reason::ProviderHold } else { Reason::BreakerOpen };
            let wait_ns = wait_ms.saturating_mul(NANOS_PER_MS);
            (
                Attempt::Refuse(Refusal {
                    id: 0,
                    class,
                    reason,
                    wait_ns,
                    tokens: 0.0,
                    retry: !terminal,
                    queued_ms: None,
                }),
                None,
            )
        })
    }

    /// Decides an arriving request `id` of `class` from `tenant`, needing `need` LLM tokens,
    /// under `gate` (from [`Worker::gate`]). With tenant limits it needs a token from its
    /// tenant's bucket and from the provider-wide bucket; the tenant's goes back if the
    /// provider's refuses.
    #[allow(clippy::too_many_arguments)]
    pub fn admit(
        &mut self,
        store: &impl Store,
        id: u32,
        class: Priority,
        tenant: Option<&str>,
        need: Option<Need>,
        gate: Gate,
        now_ns: u64,
    ) -> Result<Decision, Status> {
        let taken = match (&self.tenants, gate) {
            // The probe goes whatever its tenant spent: everything waits for its answer.
            (
                Some((rules, prefix)),
                Gate::Pass | Gate::Counted | Gate::Hold { .. } | Gate::Open { terminal: false, .. },
            ) => {
                let use_burst = self.config.class(class).use_burst;
                let t = tenants::take(store, prefix, rules, tenant.unwrap_or(""), use_burst, now_ns)?;
                if let TenantTake::Short { wait_ns, .. } = t.take {
                    let r = Refusal {
                        id,
                        class,
                        reason: Reason::TenantLimit,
                        wait_ns,
                        tokens: 0.0,
                        retry: true,
                        queued_ms: None,
                    };
                    return Ok(Decision { admission: Admission::Refuse(r), levels: None, tenant: Some(t) });
                }
                Some(t)
            }
            _ => None,
        };
        let (admission, levels) = self.admit_provider(store, id, class, need, gate, now_ns)?;
        if let (Gate::Counted, Admission::Pass { .. }) = (gate, &admission) {
            self.spend(store)?;
        }
        if let (Admission::Refuse(_), Some(t), Some((rules, prefix))) = (&admission, &taken, &self.tenants) {
            if let Err(s) = tenants::refund(store, prefix, rules, tenant.unwrap_or(""), t.slot(), now_ns) {
                log::debug!("llm-ratelimit: #{id} cannot give the tenant's token back: status {s}");
            }
        }
        Ok(Decision { admission, levels, tenant: taken })
    }

    /// The provider-wide part of `admit`: the breaker's gate, the shared bucket and the queue.
    fn admit_provider(
        &mut self,
        store: &impl Store,
        id: u32,
        class: Priority,
        need: Option<Need>,
        gate: Gate,
        now_ns: u64,
    ) -> Result<(Admission, Option<Levels>), Status> {
        let now_ms = now_ns / NANOS_PER_MS;
        let refusal =
            |reason, wait_ns, tokens, retry| Refusal { id, class, reason, wait_ns, tokens, retry, queued_ms: None };
        if let Gate::Open { until_ms, terminal: true } = gate {
            // A terminal quota leaves nothing to spend: the bucket is not consulted.
            let wait_ns = until_ms.saturating_sub(now_ms).saturating_mul(NANOS_PER_MS);
            return Ok((Admission::Refuse(refusal(Reason::BreakerOpen, wait_ns, 0.0, false)), None));
        }
        let own = self.local_counts();
        let me = self.id;
        if let Gate::Probe { probe } = gate {
            // The probe never waits behind the requests that wait for its answer.
            let written = self.update_bucket(store, now_ns, |s| {
                let next = self.rules.probe(&s, need, now_ns).with_worker(me, own, now_ms);
                (levels(&next, next.waiting(me, own, now_ms)), Some(next))
            })?;
            self.published = (own, now_ms);
            return Ok((Admission::Pass { probe: Some(probe) }, Some(written)));
        }
        if let Some(n) = need {
            // An average of recent needs sizes token leases.
            let avg = &mut self.lease.avg_need;
            *avg = if *avg == 0.0 { n.tokens as f64 } else { 0.9 * *avg + 0.1 * n.tokens as f64 };
        }
        if gate == Gate::Pass && self.queue.is_empty() && self.take_from_lease(need) {
            return Ok((Admission::Pass { probe: None }, None));
        }
        if let Some(r) = self.refused[class.index()].filter(|r| {
            gate == Gate::Pass
                && need.is_none()
                && now_ns >= r.at_ns
                && now_ns < r.until_ns.min(r.at_ns + REFUSAL_FRESH_NS)
        }) {
            return Ok((Admission::Refuse(refusal(r.reason, r.until_ns - now_ns, r.tokens, true)), None));
        }
        let hold_reason = if matches!(gate, Gate::Open { .. }) { Reason::BreakerOpen } else { Reason::ProviderHold };
        let not_before_ns = gate.not_before_ms().saturating_mul(NANOS_PER_MS);
        // The least important class below ours with a waiter here: the one we may shed.
        let local_victim = Priority::ALL.into_iter().rev().find(|&p| p > class && self.queue.len(p) > 0);
        let (arrival, written, leased) = self.update_bucket(store, now_ns, |s| {
            let waiting = s.waiting(me, own, now_ms);
            let (arrival, mut taken) = self.rules.arrive(&s, need, waiting, class, now_ns, not_before_ns, local_victim);
            // With tokens to spare and nobody waiting, take a lease for the next requests here.
            let leased = match arrival {
                Arrival::Admit if gate == Gate::Pass && waiting == [0; 4] => self.lease_extra(&taken, need),
                _ => (0.0, None),
            };
            taken.level.tokens -= leased.0;
            if let Some((i, t)) = leased.1 {
                taken.token_levels[i].tokens -= t;
            }
            let mut after = own;
            match arrival {
                Arrival::Wait => after[class.index()] += 1,
                Arrival::WaitEvicting { victim } => {
                    after[class.index()] += 1;
                    after[victim.index()] = after[victim.index()].saturating_sub(1);
                }
                Arrival::Admit | Arrival::Reject { .. } => {}
            }
            // A refusal changes nothing but the refill, which the next writer redoes anyway
            // (unless the clock stepped back: then the restarted count must be kept).
            let next = match arrival {
                Arrival::Reject { .. } if !self.rules.bucket.stepped_back(s.level, now_ns) => None,
                _ => Some(taken.clone().with_worker(me, after, now_ms)),
            };
            let written = match &next {
                Some(n) => levels(n, n.waiting(me, after, now_ms)),
                None => levels(&taken, waiting),
            };
            ((arrival, written, leased), next)
        })?;
        self.lease.requests += leased.0;
        if leased.0 > 0.0 {
            self.lease.taken.0 += 1;
            self.lease.taken.1 += leased.0 as u64;
        }
        if let Some((i, t)) = leased.1 {
            let n = self.rules.token_buckets.len();
            self.lease.tokens.resize(n.max(self.lease.tokens.len()), 0.0);
            self.lease.tokens[i] += t;
        }
        let tokens = written.1;
        let levels = Some(written);
        let admission = match arrival {
            Arrival::Admit => {
                self.lease.used = self.lease.used.saturating_add(1);
                Admission::Pass { probe: None }
            }
            Arrival::Reject { reason: Reason::ProviderHold, wait_ns } => {
                Admission::Refuse(refusal(hold_reason, wait_ns, tokens, true))
            }
            Arrival::Reject { reason, wait_ns } => {
                if matches!(reason, Reason::NoToken | Reason::QueueFull) && gate == Gate::Pass && need.is_none() {
                    let until_ns = now_ns.saturating_add(wait_ns);
                    self.refused[class.index()] = Some(Refused { reason, tokens, at_ns: now_ns, until_ns });
                }
                Admission::Refuse(refusal(reason, wait_ns, tokens, reason != Reason::TooLarge))
            }
            Arrival::Wait | Arrival::WaitEvicting { .. } => {
                let shed = match arrival {
                    Arrival::WaitEvicting { .. } => self.queue.evict_newest_below(class).map(|v| Refusal {
                        id: v.id,
                        class: v.class,
                        reason: Reason::Shed,
                        wait_ns: self.rules.expected_wait_ns(&Level { tokens, at_ns: now_ns }, &[0; 4], v.class, 0),
                        tokens,
                        retry: true,
                        queued_ms: Some(now_ms.saturating_sub(v.enqueued_ms)),
                    }),
                    _ => None,
                };
                let deadline_ms = now_ms.saturating_add(self.config.class(class).max_wait_ms);
                self.queue.push(Waiter { id, class, enqueued_ms: now_ms, deadline_ms, need });
                self.published = (self.local_counts(), now_ms);
                Admission::Wait { shed }
            }
        };
        Ok((admission, levels))
    }

    /// The client of waiting request `id` went away: forget it, and say so in shared data
    /// (if that write fails, the next tick corrects it). Returns its class if it was waiting,
    /// and the process-wide levels after the write.
    pub fn leave(&mut self, store: &impl Store, id: u32, now_ns: u64) -> Option<(Priority, Option<Levels>)> {
        self.released.remove(&id);
        let w = self.queue.remove(id)?;
        let written = self.publish(store, now_ns);
        if written.is_err() {
            self.published = (LOST, 0);
        }
        Some((w.class, written.ok()))
    }

    /// Writes this worker's waiter counts as they are now.
    fn publish(&mut self, store: &impl Store, now_ns: u64) -> Result<Levels, Status> {
        let (own, me, now_ms) = (self.local_counts(), self.id, now_ns / NANOS_PER_MS);
        let written = self.update_bucket(store, now_ns, |s| {
            let next = s.with_worker(me, own, now_ms);
            (levels(&next, next.waiting(me, own, now_ms)), Some(next))
        })?;
        self.published = (own, now_ms);
        Ok(written)
    }

    /// Every `tick_ms`: answers waiters whose time is up, lets through as many as the provider
    /// and the bucket allow (one, as the probe, when the breaker is half-open), and keeps this
    /// worker's waiter counts fresh in shared data.
    pub fn tick(&mut self, store: &impl Store, now_ns: u64) -> Tick {
        let now_ms = now_ns / NANOS_PER_MS;
        let mut t = Tick::default();
        if now_ms < self.last_tick_ms {
            // The wall clock stepped back: keep every waiter's deadline as far away as it was.
            self.queue.shift_back(self.last_tick_ms - now_ms);
        }
        self.last_tick_ms = now_ms;
        // The tick gives leases back: a refusal before it may be wrong after it. Its releases read
        // the provider state afresh: another filter may have learned since it was cached.
        self.refused = [None; 4];
        self.provider_seen.set(None);
        // Not `t.levels`: that write carries no waiter counts, which the heartbeat below writes.
        let returned = self.return_lease(store, now_ns).unwrap_or_else(|s| {
            t.errors.push(s);
            None
        });
        // Expired waiters are answered whatever shared data says.
        let expired = self.queue.expire(now_ms);
        // Only a worker with someone to send may take the half-open probe's place.
        let mut gate = if self.queue.is_empty() {
            Gate::Hold { until_ms: now_ms }
        } else {
            match self.gate_and_mode(store, now_ms) {
                Ok((g, moved)) => {
                    t.moved = moved;
                    g
                }
                Err(s) => {
                    t.errors.push(s);
                    Gate::Pass
                }
            }
        };
        t.probe_started = matches!(gate, Gate::Probe { .. });
        let me = self.id;
        while matches!(gate, Gate::Pass | Gate::Counted | Gate::Probe { .. }) && !self.queue.is_empty() {
            let own = self.local_counts();
            let picked = self.update_bucket(store, now_ns, |s| {
                let refilled = SharedBucket { level: self.rules.bucket.refill(s.level, now_ns), ..s.clone() };
                // Nobody to release: write nothing, unless the clock stepped back (the count
                // restarts from now, or the refill would stall for as long as the step).
                let stepped = self.rules.bucket.stepped_back(s.level, now_ns);
                let need = |p: Priority| self.queue.head(p).and_then(|w| w.need);
                let picked = match gate {
                    Gate::Probe { .. } => {
                        self.queue.peek_next_class(|_| true).map(|p| (p, self.rules.probe(&refilled, need(p), now_ns)))
                    }
                    // A class whose oldest waiter's tokens are short is skipped, not served out
                    // of order: within a class, requests go in arrival order.
                    _ => self
                        .queue
                        .peek_next_class(|p| self.rules.can_take(&refilled, need(p), p, now_ns))
                        .and_then(|p| Some((p, self.rules.release(&refilled, need(p), p, now_ns)?))),
                };
                let Some((class, taken)) = picked else { return (None, stepped.then_some(refilled)) };
                let mut after = own;
                after[class.index()] = after[class.index()].saturating_sub(1);
                let next = taken.with_worker(me, after, now_ms);
                (Some((class, levels(&next, next.waiting(me, after, now_ms)))), Some(next))
            });
            let (class, levels) = match picked {
                Ok(Some(p)) => p,
                Ok(None) => break,
                Err(s) => {
                    t.errors.push(s);
                    break;
                }
            };
            let Some(w) = self.queue.pop_next(|c| c == class) else { break };
            self.published = (self.local_counts(), now_ms);
            t.levels = Some(levels);
            let probe = match gate {
                Gate::Probe { probe } => Some(probe),
                _ => None,
            };
            let r = Release { id: w.id, class: w.class, waited_ms: now_ms.saturating_sub(w.enqueued_ms), probe };
            self.released.insert(w.id, r);
            t.released.push(r);
            gate = match gate {
                // One probe only; while the provider's window is counted, ask again each time.
                Gate::Probe { .. } => break,
                Gate::Counted => {
                    if let Err(s) = self.spend(store) {
                        t.errors.push(s);
                    }
                    self.gate(store, now_ms).unwrap_or(Gate::Hold { until_ms: now_ms })
                }
                g => g,
            };
        }
        if t.probe_started && t.released.is_empty() {
            // Nobody here to send: the probe slot is left to time out and be taken again.
            t.probe_started = false;
        }
        let stale = now_ms.saturating_sub(self.published.1) >= HEARTBEAT_MS || now_ms < self.published.1;
        if t.levels.is_none() && (self.published.0 != self.local_counts() || (stale && !self.queue.is_empty())) {
            match self.publish(store, now_ns) {
                Ok(levels) => t.levels = Some(levels),
                Err(s) => {
                    // Whatever the shared value says of us now, the next tick writes it again.
                    self.published = (LOST, 0);
                    t.errors.push(s);
                }
            }
        }
        if t.levels.is_none() {
            t.levels = returned;
        }
        if !expired.is_empty() {
            let tokens = t.levels.map(|(_, tokens, _)| tokens).or_else(|| {
                let s: SharedBucket = store::read(store, &self.bucket_key).ok()??;
                Some(self.rules.bucket.refill(s.level, now_ns).tokens)
            });
            let tokens = tokens.unwrap_or(0.0);
            let not_before_ms = match gate {
                // Nobody left here to gate: what the provider state says, without taking a probe.
                _ if self.queue.is_empty() => self.provider_state(store).map_or(0, |s| s.until_ms),
                g => g.not_before_ms(),
            };
            let hold_ns = not_before_ms.saturating_sub(now_ms).saturating_mul(NANOS_PER_MS);
            let level = Level { tokens, at_ns: now_ns };
            t.expired = expired
                .into_iter()
                .map(|w| Refusal {
                    id: w.id,
                    class: w.class,
                    reason: Reason::Expired,
                    // What it waited for, not its turn behind others: the reset or the next token.
                    wait_ns: self.rules.expected_wait_ns(&level, &[0; 4], w.class, hold_ns),
                    tokens,
                    retry: true,
                    queued_ms: Some(now_ms.saturating_sub(w.enqueued_ms)),
                })
                .collect();
        }
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemStore;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    const MS: u64 = 1_000_000;
    const T0: u64 = 1_700_000_000_000;

    fn worker(json: &str, id: u64) -> Worker {
        Worker::new(Config::parse(json.as_bytes()).unwrap(), id)
    }

    /// Opens the breaker on a guess (no timing) at `T0`, for `backoff_ms`.
    fn trip(w: &Worker, store: &MemStore) {
        w.observe(store, 429, &Signals::default(), None, T0).unwrap();
    }

    fn arrive(w: &mut Worker, store: &MemStore, id: u32, at_ms: u64) -> Admission {
        let gate = w.gate(store, at_ms).unwrap();
        w.admit(store, id, Priority::Normal, None, None, gate, at_ms * MS).unwrap().admission
    }

    #[test]
    fn every_role_creates_the_provider_state_before_traffic() {
        // A write to a missing key is unconditional: two workers tripping on a fresh key would
        // both succeed. Once created, every write is a compare-and-swap against a version.
        for (json, bucket) in [(r#"{"role":"observer"}"#, false), (r#"{"role":"admission"}"#, true)] {
            let (w, store) = (worker(json, 1), MemStore::default());
            w.ensure_shared(&store, 0).unwrap();
            let (provider, cas) = store.get(&w.provider_key).unwrap();
            assert!(provider.is_some() && cas != 0, "{json}");
            assert_eq!(store.get(&w.bucket_key).unwrap().0.is_some(), bucket, "{json}");
        }
    }

    #[test]
    fn alert_slots_exist_before_the_first_alert() {
        // Else two workers raising the same alert at once on a fresh slot would both send it.
        let json = r#"{"role":"observer","alert":{"cluster":"alerts"}}"#;
        let (w, store) = (worker(json, 1), MemStore::default());
        w.ensure_shared(&store, 0).unwrap();
        for slot in crate::alert::SLOTS {
            assert_ne!(store.get(&crate::alert::slot_key(&w.config.name, slot)).unwrap().1, 0, "{slot}");
        }
    }

    #[test]
    fn the_tick_releases_by_the_provider_state_as_it_is_not_as_cached() {
        let store = MemStore::default();
        let json = r#"{"bucket":{"capacity":1,"refill_rate":1000000,"burst_allowance":0,"max_lease":1}}"#;
        let (mut a, b) = (worker(json, 1), worker(json, 2));
        a.ensure_shared(&store, T0 * MS).unwrap();
        // A caches the provider state as passing, spends the token, and queues the next request.
        assert!(matches!(arrive(&mut a, &store, 1, T0), Admission::Pass { .. }));
        assert!(matches!(arrive(&mut a, &store, 2, T0), Admission::Wait { .. }));
        // Another filter trips the breaker; A's tick, within the millisecond its cache is fresh and
        // with a token refilled, must not send the waiter to the exhausted provider.
        trip(&b, &store);
        assert!(a.tick(&store, T0 * MS + 500_000).released.is_empty());
    }

    #[test]
    fn a_refusal_is_reused_for_a_millisecond_and_never_past_its_token() {
        let store = MemStore::default();
        let json = r#"{"bucket":{"capacity":1,"refill_rate":100,"burst_allowance":0},"queue":{"enabled":false}}"#;
        let mut w = worker(json, 1);
        let at = |us: u64| T0 * MS + us * 1000;
        // The provider's gate says pass (its own cache is tested elsewhere).
        let go = |w: &mut Worker, id, t: u64| {
            w.admit(&store, id, Priority::Normal, None, None, Gate::Pass, t).map(|d| d.admission)
        };
        assert!(matches!(go(&mut w, 1, at(0)), Ok(Admission::Pass { .. })));
        let Ok(Admission::Refuse(first)) = go(&mut w, 2, at(100)) else { panic!("no token") };
        assert_eq!(first.reason, Reason::NoToken);
        // Shared data fails from here: only a reused refusal can answer.
        store.broken.set(true);
        let Ok(Admission::Refuse(again)) = go(&mut w, 3, at(600)) else { panic!("reused") };
        assert_eq!((again.reason, again.wait_ns), (Reason::NoToken, first.wait_ns - MS / 2));
        assert!(go(&mut w, 4, at(1200)).is_err(), "a millisecond later the bucket is read again");
        // Never past the time its token exists (10 ms at 100/s): then the bucket is read.
        store.broken.set(false);
        let Ok(Admission::Refuse(r)) = go(&mut w, 5, at(9950)) else { panic!("still no token") };
        store.broken.set(true);
        assert!(r.wait_ns <= MS / 10);
        assert!(go(&mut w, 6, at(10_010)).is_err(), "its token exists now: read, not reused");
    }

    #[test]
    fn an_uneventful_answer_reuses_the_provider_state_just_read() {
        let store = MemStore::default();
        let w = worker("{}", 1);
        let ok = Signals { remaining_requests: Some(500), limit_requests: Some(1000), ..Signals::default() };
        w.observe(&store, 200, &ok, None, T0).unwrap();
        store.broken.set(true);
        assert!(w.observe(&store, 200, &ok, None, T0).is_ok(), "nothing to change: no read");
        assert!(w.observe(&store, 429, &Signals::default(), None, T0).is_err(), "a 429 is always written");
        assert!(w.observe(&store, 200, &ok, None, T0 + 1).is_err(), "a millisecond later it reads again");
    }

    #[test]
    fn the_probe_goes_ahead_of_the_waiters_held_for_it() {
        let store = MemStore::default();
        let mut w = worker("{}", 1);
        trip(&w, &store);
        for id in 1..=3 {
            assert_eq!(arrive(&mut w, &store, id, T0 + 10), Admission::Wait { shed: None });
        }
        // After the back-off an arrival is the probe: it passes though three wait ahead of it.
        assert!(matches!(arrive(&mut w, &store, 9, T0 + 1_000), Admission::Pass { probe: Some(_) }));
        // The waiters stay held for its answer, then go at once.
        assert!(w.tick(&store, (T0 + 1_010) * MS).released.is_empty());
        let probe = w.provider_state(&store).unwrap().probe;
        w.observe(&store, 200, &Signals::default(), Some(probe), T0 + 1_050).unwrap();
        assert_eq!(w.tick(&store, (T0 + 1_060) * MS).released.len(), 3);
    }

    #[test]
    fn a_tick_takes_the_probe_only_with_someone_to_send() {
        let store = MemStore::default();
        let mut w = worker("{}", 1);
        trip(&w, &store);
        assert!(!w.tick(&store, (T0 + 2_000) * MS).probe_started);
        assert_eq!(w.provider_state(&store).unwrap().mode, Mode::Open, "the probe slot is still free");
        assert_eq!(arrive(&mut w, &store, 1, T0 + 500), Admission::Wait { shed: None });
        let t = w.tick(&store, (T0 + 1_000) * MS);
        assert!(t.probe_started);
        assert_eq!(t.released.len(), 1);
        assert!(t.released[0].probe.is_some());
    }

    #[test]
    fn a_lost_count_write_heals_on_the_next_tick() {
        let store = MemStore::default();
        let mut w = worker(r#"{"bucket":{"capacity":1,"refill_rate":0.1,"burst_allowance":0}}"#, 7);
        assert_eq!(arrive(&mut w, &store, 1, T0), Admission::Pass { probe: None });
        assert_eq!(arrive(&mut w, &store, 2, T0), Admission::Wait { shed: None });
        // The client leaves and the write of the new count loses every CAS.
        store.conflicts.set(1_000);
        assert_eq!(w.leave(&store, 2, T0 * MS).map(|(c, _)| c), Some(Priority::Normal));
        store.conflicts.set(0);
        let shared: SharedBucket = store::read(&store, &w.bucket_key).unwrap().unwrap();
        assert_eq!(shared.waiting(0, [0; 4], T0), [0, 0, 1, 0], "the phantom waiter is still there");
        assert!(w.needs_tick());
        w.tick(&store, (T0 + 10) * MS);
        let shared: SharedBucket = store::read(&store, &w.bucket_key).unwrap().unwrap();
        assert_eq!(shared.waiting(0, [0; 4], T0 + 10), [0; 4]);
        assert!(!w.needs_tick());
    }

    #[test]
    fn a_clock_step_back_keeps_deadlines_and_the_refill_going() {
        let store = MemStore::default();
        let mut w = worker(r#"{"bucket":{"capacity":1,"refill_rate":1,"burst_allowance":0}}"#, 3);
        assert_eq!(arrive(&mut w, &store, 1, T0), Admission::Pass { probe: None });
        assert_eq!(arrive(&mut w, &store, 2, T0), Admission::Wait { shed: None });
        w.tick(&store, (T0 + 100) * MS);
        // The clock steps back 10 s: the waiter's token comes 1 s of real time after it queued.
        let back = T0 - 10_000;
        assert!(w.tick(&store, (back + 200) * MS).released.is_empty());
        assert_eq!(w.tick(&store, (back + 1_300) * MS).released.len(), 1, "no stall for the step");
    }

    #[test]
    fn a_retry_waits_for_the_reset_only_when_its_class_may_wait_that_long() {
        let store = MemStore::default();
        let w = worker(r#"{"priorities":{"LOW":{"max_wait_ms":500}}}"#, 1);
        let exhausted =
            Signals { remaining_requests: Some(0), requests_reset_ms: Some(T0 + 3_000), ..Signals::default() };
        w.observe(&store, 429, &exhausted, None, T0).unwrap();
        assert_eq!(w.attempt(&store, Priority::Normal, T0 + 10).unwrap(), Attempt::Hold { until_ms: T0 + 3_000 });
        match w.attempt(&store, Priority::Low, T0 + 10).unwrap() {
            Attempt::Refuse(r) => assert_eq!((r.reason, r.wait_ns), (Reason::BreakerOpen, 2_990 * MS)),
            other => panic!("{other:?}"),
        }
        assert_eq!(w.attempt(&store, Priority::Low, T0 + 3_000).unwrap(), Attempt::Go);
    }

    #[test]
    fn retries_count_against_the_window_the_provider_allows() {
        let store = MemStore::default();
        let w = worker("{}", 1);
        let exhausted = Signals {
            remaining_requests: Some(0),
            limit_requests: Some(2),
            requests_reset_ms: Some(T0 + 1_000),
            ..Signals::default()
        };
        w.observe(&store, 200, &exhausted, None, T0).unwrap();
        assert_eq!(w.attempt(&store, Priority::Normal, T0 + 10).unwrap(), Attempt::Hold { until_ms: T0 + 1_000 });
        // At the reset the window holds two: two retries go, the third waits for the next reset.
        assert_eq!(w.attempt(&store, Priority::Normal, T0 + 1_000).unwrap(), Attempt::Go);
        assert_eq!(w.attempt(&store, Priority::Normal, T0 + 1_000).unwrap(), Attempt::Go);
        assert!(matches!(w.gate(&store, T0 + 1_001).unwrap(), Gate::Hold { .. }));
        assert!(matches!(w.attempt(&store, Priority::Normal, T0 + 1_001).unwrap(), Attempt::Hold { .. }));
    }

    #[test]
    fn a_busy_worker_leases_tokens_and_gives_back_what_it_did_not_spend() {
        let store = MemStore::default();
        let json = r#"{"bucket":{"capacity":1000,"refill_rate":0.001,"burst_allowance":0,"max_lease":16}}"#;
        let mut w = worker(json, 1);
        let level = |store: &MemStore| store::read::<SharedBucket>(store, &w_key()).unwrap().unwrap().level.tokens;
        fn w_key() -> String {
            "llm_ratelimit/default/bucket".into()
        }
        // The first tick has seen no traffic: no lease, one compare-and-swap per admission.
        for id in 0..4 {
            assert_eq!(arrive(&mut w, &store, id, T0), Admission::Pass { probe: None });
        }
        assert_eq!(level(&store).round(), 996.0);
        assert!(w.needs_tick(), "the tick must see the admissions to size the next lease");
        w.tick(&store, T0 * MS);
        // 4 admissions last tick: the next takes a lease of 4 more, then the lease serves them.
        assert_eq!(arrive(&mut w, &store, 10, T0 + 1), Admission::Pass { probe: None });
        assert_eq!(level(&store).round(), 991.0);
        assert_eq!(w.lease().requests, 4.0);
        for id in 11..14 {
            assert_eq!(arrive(&mut w, &store, id, T0 + 1), Admission::Pass { probe: None });
        }
        assert_eq!(level(&store).round(), 991.0, "admitted from the lease: no shared-data write");
        // The tick gives the unspent token back: exactly 8 taken for 8 admissions.
        w.tick(&store, (T0 + 2) * MS);
        assert_eq!(level(&store).round(), 992.0);
        assert!(!w.holds_lease());
    }

    #[test]
    fn no_lease_near_the_floor_or_while_anyone_waits() {
        let store = MemStore::default();
        let json = r#"{"bucket":{"capacity":20,"refill_rate":0.001,"burst_allowance":10,"max_lease":16}}"#;
        let mut w = worker(json, 1);
        for id in 0..8 {
            arrive(&mut w, &store, id, T0);
        }
        w.tick(&store, T0 * MS);
        // 30 - 8 = 22 left, 12 above the reserve: a lease may take an eighth of that, 1.
        arrive(&mut w, &store, 20, T0 + 1);
        assert_eq!(w.lease().requests, 1.0);
        w.tick(&store, (T0 + 2) * MS);
        // Drain to the reserve: NORMAL then waits, and no lease is taken while it does.
        let mut id = 30;
        while arrive(&mut w, &store, id, T0 + 3) == (Admission::Pass { probe: None }) {
            id += 1;
        }
        assert_eq!(w.lease().requests, 0.0);
        let mut other = worker(json, 2);
        assert_eq!(
            other.admit(&store, 99, Priority::Critical, None, None, Gate::Pass, (T0 + 3) * MS).unwrap().admission,
            Admission::Pass { probe: None }
        );
        assert_eq!(other.lease().requests, 0.0, "a waiter elsewhere: no lease");
    }

    #[test]
    fn settlements_are_held_until_the_tick_writes_them() {
        let store = MemStore::default();
        let json = r#"{"bucket":{"max_lease":1},"tokens":{"capacity":1000,"refill_rate":0.001}}"#;
        let mut w = worker(json, 1);
        let need = Need { bucket: 0, tokens: 300 };
        let gate = w.gate(&store, T0).unwrap();
        assert!(matches!(
            w.admit(&store, 1, Priority::Normal, None, Some(need), gate, T0 * MS).unwrap().admission,
            Admission::Pass { .. }
        ));
        let tokens = |store: &MemStore| {
            store::read::<SharedBucket>(store, "llm_ratelimit/default/bucket").unwrap().unwrap().token_levels[0]
                .tokens
                .round()
        };
        assert_eq!(tokens(&store), 700.0);
        w.reconcile(need, 100);
        assert_eq!(tokens(&store), 700.0);
        assert!(w.needs_tick());
        w.tick(&store, T0 * MS);
        assert_eq!(tokens(&store), 900.0);
        assert!(!w.needs_tick());
    }

    #[test]
    fn a_debt_beyond_one_bucket_is_written_back_whole() {
        let store = MemStore::default();
        let json = r#"{"bucket":{"max_lease":1},"tokens":{"capacity":3000,"refill_rate":1000}}"#;
        let mut w = worker(json, 1);
        let need = Need { bucket: 0, tokens: 60 };
        let gate = w.gate(&store, T0).unwrap();
        for id in 0..40 {
            let a = w.admit(&store, id, Priority::Normal, None, Some(need), gate, T0 * MS).unwrap().admission;
            assert!(matches!(a, Admission::Pass { .. }));
        }
        // Each used 1500: 57,600 more than reserved, written back on the tick.
        for _ in 0..40 {
            w.reconcile(need, 1500);
        }
        w.tick(&store, T0 * MS);
        let shared = || store::read::<SharedBucket>(&store, "llm_ratelimit/default/bucket").unwrap().unwrap();
        assert_eq!(shared().token_levels[0].tokens.round(), 600.0 - 57_600.0);
        // Paid back by the refill before anything else of that bucket passes: 57 s at 1000/s.
        let later = |s: u64| (T0 + s * 1000) * MS;
        let a = w.admit(&store, 99, Priority::Normal, None, Some(need), Gate::Pass, later(20)).unwrap().admission;
        assert!(matches!(a, Admission::Refuse(r) if r.reason == Reason::TokenLimit), "{a:?}");
        let a = w.admit(&store, 99, Priority::Normal, None, Some(need), Gate::Pass, later(58)).unwrap().admission;
        assert_eq!(a, Admission::Pass { probe: None });
    }
}
