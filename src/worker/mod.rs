//! One worker's part of the filter: its wait queue, and every decision it makes with the
//! process-wide state (the provider's breaker, the shared bucket) kept in a [`Store`].
//!
//! Pure: it never calls the host. Time comes in as an argument, shared data through the `Store`
//! trait, and the answers (pass, wait, refuse, release) go back to the host layer, which turns
//! them into host calls. Tests and the simulation drive several `Worker`s over one `MemStore`.
//!
//! `Worker` owns the queue and the requests released from it, and orchestrates the rest: the
//! gate chain a request meets (provider state, tenant bucket, provider bucket, global gate),
//! each gate's take beside its compensation, is `chain`'s (`admit`, `give_back`); the provider
//! state and what this worker caches of it are `provider`'s; the shared bucket, the lease taken
//! from it, the refusals reused and the waiter counts written are `bucket_client`'s; the rules
//! are `admission`'s and `breaker`'s.

mod bucket_client;
mod chain;
mod provider;
mod slots;

pub use bucket_client::BucketLease;

use crate::admission::{AdmissionRules, Newcomer, Ruling, SharedBucket, TokenNeed};
use crate::breaker::{Gate, Mode, ProviderState, Verdict};
use crate::bucket::{BucketRules, Level};
use crate::config::Config;
use crate::idmap::IdMap;
use crate::priority::Priority;
use crate::queue::{WaitQueue, Waiter};
use crate::reply::Reason;
use crate::signals::Signals;
use crate::store::{self, Status, Store};
use crate::tenants::{self, TenantRules};
use crate::time::{Duration, Instant};
use crate::tokens::meter::Used;
use bucket_client::{BucketClient, Extra};
use provider::ProviderView;
pub use slots::SlotReadout;
use slots::Slots;

/// Process-wide queue depths (waiters per class), request tokens and (with token limits) the
/// provider token bucket's level, after a write: what the gauges show. (A bucket's `Level` is
/// its tokens; a queue's count of waiters is its depth.)
pub type Readout = ([u32; 4], f64, Option<f64>);

fn readout(s: &SharedBucket, waiting: [u32; 4]) -> Readout {
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
    pub wait: Duration,
    /// Tokens the bucket held, for the `RateLimit` header.
    pub tokens: f64,
    /// False for a terminal quota: clients should not retry soon.
    pub retry: bool,
    /// How long it waited first, for a request refused while waiting.
    pub queued: Option<Duration>,
}

/// What `admit` decided, with what the host publishes about it.
#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    pub admission: Admission,
    /// Process-wide waiters and tokens after the write, for the gauges.
    pub readout: Option<Readout>,
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
        until: Instant,
    },
    Refuse(Refusal),
}

/// A waiter let through by a tick.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Release {
    pub id: u32,
    pub class: Priority,
    pub waited: Duration,
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
    pub readout: Option<Readout>,
    /// Shared-data failures (the tick went on with what it could do).
    pub errors: Vec<Status>,
}

/// A request arriving at this worker: `id` (its Envoy context) of `class` from `tenant`, needing
/// `need` LLM tokens, under `gate` (from [`Worker::gate`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Arrival<'a> {
    pub id: u32,
    pub class: Priority,
    pub tenant: Option<&'a str>,
    pub need: Option<TokenNeed>,
    pub gate: Gate,
}

impl Refusal {
    /// A refusal of request `id` of `class` for `reason`, to retry in `wait`, when the bucket
    /// held `tokens`.
    pub fn of(id: u32, class: Priority, reason: Reason, wait: Duration, tokens: f64) -> Refusal {
        Refusal { id, class, reason, wait, tokens, retry: true, queued: None }
    }
}

/// The per-worker state.
pub struct Worker {
    pub config: Config,
    pub rules: AdmissionRules,
    /// This worker VM's random id: its entry among the bucket's waiter counts.
    pub id: u64,
    /// Tenant limits, and the prefix of the tenant table's keys.
    pub tenants: Option<(TenantRules, String)>,
    /// The shared-data key of the `quotas` windows.
    quota_key: String,
    provider: ProviderView,
    bucket: BucketClient,
    /// Requests in flight, with `in_flight` on (admitting roles).
    slots: Option<Slots>,
    queue: WaitQueue<u32>,
    /// Requests released from the queue, until their response reads how long they waited.
    released: IdMap<Release>,
    /// The clock at the last tick (a whole millisecond), to notice a step back.
    last_tick: Instant,
    /// The last half-open probe this worker let through, and whether it took a request token
    /// (it goes without one when there is none): what `give_back` returns if the global gate
    /// refuses it.
    probe_took: Option<(u32, bool)>,
}

/// This worker's waiter counts `own` once `ruling` on an arrival of `class` is carried out.
fn counts_after(own: [u32; 4], class: Priority, ruling: Ruling) -> [u32; 4] {
    let mut after = own;
    if let Ruling::Wait | Ruling::WaitEvicting { .. } = ruling {
        after[class.index()] = after[class.index()].saturating_add(1);
    }
    if let Ruling::WaitEvicting { victim } = ruling {
        after[victim.index()] = after[victim.index()].saturating_sub(1);
    }
    after
}

impl Worker {
    pub fn new(config: Config, id: u64) -> Worker {
        Worker {
            rules: AdmissionRules::new(&config),
            id,
            tenants: config.tenant.as_ref().map(|t| {
                let slots = t.slots.min(u64::from(u32::MAX)) as u32;
                let bucket =
                    BucketRules::capacity(t.capacity).refill_rate(t.refill_rate).burst_allowance(t.burst_allowance);
                let tokens = t.tokens.as_ref().map(|k| {
                    BucketRules::capacity(k.capacity).refill_rate(k.refill_rate).burst_allowance(k.burst_allowance)
                });
                let newcomers = t.newcomers.map(|n| n.min(u64::from(u32::MAX)) as u32);
                (TenantRules { bucket, tokens, slots, newcomers }, format!("llm_ratelimit/{}", config.name))
            }),
            quota_key: crate::quota::key(&format!("llm_ratelimit/{}", config.name)),
            provider: ProviderView::new(&config, id),
            bucket: BucketClient::new(&config, id),
            slots: config.in_flight.filter(|_| config.role.admits()).map(|r| Slots::new(r, &config.name, id)),
            queue: WaitQueue::new(config.classes.clone().map(|c| c.weight)),
            released: IdMap::new(),
            last_tick: Instant::ZERO,
            probe_took: None,
            config,
        }
    }

    /// The shared-data key of the provider state.
    pub fn provider_key(&self) -> &str {
        &self.provider.key
    }

    /// The shared-data key of the bucket.
    pub fn bucket_key(&self) -> &str {
        &self.bucket.key
    }

    /// A full bucket with nobody waiting: what the first request of the process finds.
    pub fn fresh_bucket(&self, now: Instant) -> SharedBucket {
        self.rules.full(now)
    }

    /// Request `need` was taken and the provider reports `used` tokens: the difference, in each
    /// bucket it drew on, is given back or taken on the next tick (held here until then, like a
    /// lease).
    pub fn settle(&mut self, need: TokenNeed, used: &Used) {
        let used = self.rules.used_draws(need, used.input, used.output, used.cached_input);
        self.bucket.lease.settle(self.rules.token_buckets.len(), self.rules.draws(need), used);
    }

    /// Creates what this worker's role writes in shared data, if missing: the provider state and
    /// the alert slots (every role), the bucket and the tenant table (roles that admit). Before
    /// traffic, because a write to a missing key is unconditional: two workers tripping the
    /// breaker on a fresh provider key would both succeed, and both count the trip.
    pub fn ensure_shared(&self, store: &impl Store, now: Instant) -> Result<(), Status> {
        store::ensure(store, self.provider_key(), ProviderState::default())?;
        if self.config.alert.is_some() {
            for slot in crate::alert::SLOTS {
                store::ensure(
                    store,
                    &crate::alert::slot_key(&self.config.name, slot),
                    crate::alert::SentAt(Instant::ZERO),
                )?;
            }
        }
        if !self.config.role.admits() {
            return Ok(());
        }
        store::ensure(store, self.bucket_key(), self.fresh_bucket(now))?;
        if let Some(slots) = &self.slots {
            slots.ensure(store, now)?;
        }
        crate::quota::ensure(store, &self.quota_key, &self.config.quotas, now)?;
        match &self.tenants {
            Some((rules, prefix)) => tenants::ensure(store, prefix, rules, now),
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
        !self.queue.is_empty()
            || self.bucket.shows_waiters()
            || self.holds_bucket_lease()
            || self.bucket.lease.in_use()
            || self.slots.as_ref().is_some_and(|s| s.needs_tick())
    }

    /// Whether this worker holds leased tokens or settlements to write back.
    pub fn holds_bucket_lease(&self) -> bool {
        self.bucket.lease.holds()
    }

    /// What this worker holds beside the shared value (for tests and the simulation).
    pub fn bucket_lease(&self) -> &BucketLease {
        &self.bucket.lease
    }

    /// Leases taken and the requests they held since the last call.
    pub fn take_lease_counts(&mut self) -> (u64, u64) {
        self.bucket.lease.take_counts()
    }

    /// The release of request `id`, once, for its response headers.
    pub fn take_release(&mut self, id: u32) -> Option<Release> {
        self.released.remove(&id)
    }

    /// Writes this worker's counts again on the next tick, which reads everyone's: the gauges it
    /// wrote last showed waiters elsewhere, and an idle worker would otherwise never correct them.
    pub fn refresh_depths(&mut self) {
        self.bucket.write_again();
    }

    /// What the provider's last answers allow a request to do now. A `Probe` changed the shared
    /// state: the caller must let exactly that request through.
    pub fn gate(&self, store: &impl Store, now: Instant) -> Result<Gate, Status> {
        self.gate_and_mode(store, now).map(|(g, _)| g)
    }

    /// Like `gate`, and the breaker's new position when this call moved it.
    pub fn gate_and_mode(&self, store: &impl Store, now: Instant) -> Result<(Gate, Option<Mode>), Status> {
        self.provider.gate_and_mode(store, now)
    }

    /// Another filter of this worker learned from the provider: the state cached here is stale.
    pub fn forget_provider(&self) {
        self.provider.forget();
    }

    /// A request let through under `Gate::Counted` went upstream: count it.
    pub fn spend(&self, store: &impl Store) -> Result<(), Status> {
        self.provider.spend(store)
    }

    /// The provider state as it is, for the gauges and log lines.
    pub fn provider_state(&self, store: &impl Store) -> Result<ProviderState, Status> {
        self.provider.state(store)
    }

    /// Request `id` ended, or a later gate refused it: the slot it holds in flight (if any) goes
    /// back, its `answer` (status, when its headers came) teaching the adaptive limit. Returns
    /// what that did to the limit.
    pub fn end_in_flight(
        &mut self,
        store: &impl Store,
        id: u32,
        answer: Option<(u16, Instant)>,
        now: impl FnOnce() -> Option<Instant>,
    ) -> Result<(), Status> {
        match &mut self.slots {
            Some(slots) => slots.give(store, Some(id), answer, now),
            None => Ok(()),
        }
    }

    /// What answers did to the adaptive in-flight limit since the last call: (raised, cut).
    pub fn take_slot_changes(&mut self) -> slots::Changes {
        self.slots.as_mut().map_or((0, 0), |s| s.take_changes())
    }

    /// Whether request `id` holds a slot in flight.
    pub fn in_flight(&self, id: u32) -> bool {
        self.slots.as_ref().is_some_and(|s| s.holds(id))
    }

    /// The in-flight limit and requests in flight process-wide, as last written or read.
    pub fn slot_readout(&self) -> Option<SlotReadout> {
        self.slots.as_ref().and_then(|s| s.readout)
    }

    /// Reads the in-flight count again when this worker has none out (for its gauge).
    pub fn refresh_slots(&mut self, store: &impl Store, now: Instant) -> Result<(), Status> {
        self.slots.as_mut().map_or(Ok(()), |s| s.refresh(store, now))
    }

    /// Learns from one provider answer; `probe` is the probe number the request carried.
    pub fn observe(
        &self,
        store: &impl Store,
        status: u16,
        signals: &Signals,
        probe: Option<u32>,
        now: Instant,
    ) -> Result<(Verdict, ProviderState, bool), Status> {
        self.provider.observe(store, status, signals, probe, now)
    }

    /// What a 429 means for its client without learning from it again: the provider's own
    /// timing, or the reset already recorded (by an observer in the upstream chain).
    pub fn peek(&self, store: &impl Store, signals: &Signals, now: Instant) -> Result<Verdict, Status> {
        self.provider.peek(store, signals, now)
    }

    /// What an attempt the router sends upstream (in the observer: a retry of a request the
    /// provider refused) does while the provider is held or its breaker open: wait for the reset
    /// if that fits the request's class, else be answered here, never reaching the provider.
    /// Router retries then land on the reset rather than on the router's jittered back-off.
    /// When a probe must answer first (the breaker opened without timing), a retry never goes
    /// ahead of it or beside it: it is held and decided again every `PROBE_HOLD`, so it goes
    /// soon after the probe's success; it is answered here if no probe answers in time. When a
    /// probe is due and none is out, the retry is the probe (retries may be all the traffic).
    pub fn attempt(&self, store: &impl Store, class: Priority, now: Instant) -> Result<Attempt, Status> {
        self.provider.attempt(store, class, now)
    }

    /// The provider-wide part of `admit`: the breaker's gate, the shared bucket and the queue.
    fn admit_provider(
        &mut self,
        store: &impl Store,
        a: &Arrival,
        now: Instant,
    ) -> Result<(Admission, Option<Readout>), Status> {
        match a.gate {
            Gate::Open { until, terminal: true } => {
                // A terminal quota leaves nothing to spend: the bucket is not consulted.
                let wait = until - now.floor_millis();
                let r = Refusal { retry: false, ..Refusal::of(a.id, a.class, Reason::BreakerOpen, wait, 0.0) };
                return Ok((Admission::Refuse(r), None));
            }
            Gate::Probe { probe } => return self.admit_probe(store, a.need, probe, now),
            _ => {}
        }
        self.bucket.lease.note_need(a.need);
        if a.gate == Gate::Pass && self.queue.is_empty() && self.bucket.lease.take(&self.rules, a.need) {
            return Ok((Admission::Pass { probe: None }, None));
        }
        // A refusal for want of a request token is reused only for an arrival that passes and
        // needs no LLM tokens: anything else depends on more than that token.
        if a.gate == Gate::Pass && a.need.is_none() {
            if let Some(r) = self.bucket.recent_refusal(a.id, a.class, now) {
                return Ok((Admission::Refuse(r), None));
            }
        }
        let newcomer = Newcomer {
            class: a.class,
            need: a.need,
            not_before: a.gate.not_before(),
            // The least important class below ours with a waiter here: the one we may shed.
            local_victim: Priority::ALL.into_iter().rev().find(|&p| p > a.class && self.queue.len(p) > 0),
        };
        let own = self.local_counts();
        let (ruling, written, extra) =
            self.bucket.update(store, &self.rules, now, |s| self.rule_on(s, newcomer, a.gate, own, now))?;
        self.bucket.lease.add(extra, self.rules.token_buckets.len());
        let (_, tokens, _) = written;
        Ok((self.carry_out(ruling, a, tokens, now), Some(written)))
    }

    /// The probe takes what the bucket has for it and goes: it never waits behind the requests
    /// that wait for its answer.
    fn admit_probe(
        &mut self,
        store: &impl Store,
        need: Option<TokenNeed>,
        probe: u32,
        now: Instant,
    ) -> Result<(Admission, Option<Readout>), Status> {
        let (me, own) = (self.id, self.local_counts());
        let mut took = false;
        let written = self.bucket.update(store, &self.rules, now, |s| {
            took = self.rules.probe_takes_token(&s, now);
            let next = self.rules.probe(&s, need, now).with_worker(me, own, now);
            (readout(&next, next.waiting(me, own, now)), Some(next))
        })?;
        self.bucket.wrote(own, now);
        self.probe_took = Some((probe, took));
        Ok((Admission::Pass { probe: Some(probe) }, Some(written)))
    }

    /// One round of an arrival's compare-and-swap on `s`: the rules' ruling, the lease taken
    /// beside an admission, the readout for the gauges, and the value to write.
    fn rule_on(
        &self,
        s: SharedBucket,
        newcomer: Newcomer,
        gate: Gate,
        own: [u32; 4],
        now: Instant,
    ) -> ((Ruling, Readout, Extra), Option<SharedBucket>) {
        let me = self.id;
        let waiting = s.waiting(me, own, now);
        let (ruling, mut taken) = self.rules.arrive(&s, newcomer, waiting, now);
        // With tokens to spare and nobody waiting, take a lease for the next requests here.
        let extra = match ruling {
            Ruling::Admit if gate == Gate::Pass && waiting == [0; 4] => {
                self.bucket.lease.extra(&self.rules, &taken, newcomer.need)
            }
            _ => Extra::default(),
        };
        extra.take_from(&mut taken);
        // A refusal changes nothing but the refill, which the next writer redoes anyway (unless
        // the clock stepped back: then the restarted count must be kept).
        if matches!(ruling, Ruling::Reject { .. }) && !self.rules.bucket.stepped_back(s.level, now) {
            return ((ruling, readout(&taken, waiting), extra), None);
        }
        let after = counts_after(own, newcomer.class, ruling);
        let next = taken.with_worker(me, after, now);
        ((ruling, readout(&next, next.waiting(me, after, now)), extra), Some(next))
    }

    /// Carries out `ruling` on arrival `a`, the bucket holding `tokens` after it: an admission
    /// sizes the next lease, a refusal for want of a request token is kept for reuse, a waiter
    /// is queued (shedding a less important one if told).
    fn carry_out(&mut self, ruling: Ruling, a: &Arrival, tokens: f64, now: Instant) -> Admission {
        let refusal = |reason, wait| Refusal::of(a.id, a.class, reason, wait, tokens);
        match ruling {
            Ruling::Admit => {
                self.bucket.lease.count_admission();
                Admission::Pass { probe: None }
            }
            Ruling::Reject { reason: Reason::ProviderHold, wait } => {
                let open = matches!(a.gate, Gate::Open { .. });
                Admission::Refuse(refusal(if open { Reason::BreakerOpen } else { Reason::ProviderHold }, wait))
            }
            Ruling::Reject { reason, wait } => {
                if matches!(reason, Reason::NoToken | Reason::QueueFull) && a.gate == Gate::Pass && a.need.is_none() {
                    self.bucket.remember_refusal(a.class, reason, tokens, wait, now);
                }
                Admission::Refuse(Refusal { retry: reason != Reason::TooLarge, ..refusal(reason, wait) })
            }
            Ruling::Wait | Ruling::WaitEvicting { .. } => {
                let level = Level { tokens, at: now };
                let shed = match ruling {
                    Ruling::WaitEvicting { .. } => self.queue.evict_newest_below(a.class),
                    _ => None,
                };
                let shed = shed.map(|v| self.refuse_waiter(&v, Reason::Shed, level, Duration::ZERO));
                self.enqueue(a, now);
                Admission::Wait { shed }
            }
        }
    }

    /// Queues arrival `a` until its class's `max_wait_ms`.
    fn enqueue(&mut self, a: &Arrival, now: Instant) {
        let enqueued = now.floor_millis();
        let deadline = enqueued + Duration::from_millis(self.config.class(a.class).max_wait_ms);
        self.queue.push(Waiter { id: a.id, class: a.class, enqueued, deadline, need: a.need });
        self.bucket.wrote(self.local_counts(), now);
    }

    /// The refusal of waiter `w` leaving the queue for `reason`, the bucket at `level`: it is
    /// told what it waited for (a hold of `hold`, the next token), not its turn behind others.
    fn refuse_waiter(&self, w: &Waiter<u32>, reason: Reason, level: Level, hold: Duration) -> Refusal {
        let queued = level.at.floor_millis() - w.enqueued;
        let wait = self.rules.expected_wait(&level, &[0; 4], w.class, hold);
        Refusal { queued: Some(queued), ..Refusal::of(w.id, w.class, reason, wait, level.tokens) }
    }

    /// The client of waiting request `id` went away: forget it, and say so in shared data
    /// (if that write fails, the next tick corrects it). Returns its class if it was waiting,
    /// and the process-wide readout after the write.
    pub fn leave(&mut self, store: &impl Store, id: u32, now: Instant) -> Option<(Priority, Option<Readout>)> {
        self.released.remove(&id);
        let w = self.queue.remove(id)?;
        Some((w.class, self.publish(store, now).ok()))
    }

    /// Writes this worker's waiter counts as they are now.
    fn publish(&mut self, store: &impl Store, now: Instant) -> Result<Readout, Status> {
        let own = self.local_counts();
        self.bucket.publish(store, &self.rules, own, now)
    }

    /// Every `tick_ms`: gives the lease back, answers waiters whose time is up, lets through as
    /// many as the provider and the bucket allow (one, as the probe, when the breaker is
    /// half-open), and keeps this worker's waiter counts fresh in shared data.
    pub fn tick(&mut self, store: &impl Store, now: Instant) -> Tick {
        let mut t = Tick::default();
        self.follow_clock(now);
        // The tick gives leases back: a refusal before it may be wrong after it. Its releases read
        // the provider state afresh: another filter may have learned since it was cached.
        self.bucket.forget_refusals();
        self.provider.forget();
        // Not `t.readout`: that write carries no waiter counts, which the heartbeat writes.
        let returned = self.bucket.return_lease(store, &self.rules, self.local_counts(), now);
        let returned = returned.unwrap_or_else(|s| {
            t.errors.push(s);
            None
        });
        // Expired waiters are answered whatever shared data says.
        let expired = self.queue.expire(now.floor_millis());
        let gate = self.release_waiters(store, now, &mut t);
        self.heartbeat(store, now, &mut t);
        if let Some(Err(s)) = self.slots.as_mut().map(|slots| slots.tick(store, now)) {
            t.errors.push(s);
        }
        t.readout = t.readout.or(returned);
        if !expired.is_empty() {
            t.expired = self.answer_expired(store, &expired, gate, t.readout, now);
        }
        t
    }

    /// A wall clock that stepped back since the last tick keeps every waiter's deadline as far
    /// away as it was.
    fn follow_clock(&mut self, now: Instant) {
        let now = now.floor_millis();
        if now < self.last_tick {
            self.queue.shift_back(self.last_tick - now);
        }
        self.last_tick = now;
    }

    /// Lets waiters through while the gate and the bucket allow, into `t`; returns the gate
    /// the tick ended with.
    fn release_waiters(&mut self, store: &impl Store, now: Instant, t: &mut Tick) -> Gate {
        let mut gate = self.tick_gate(store, now, t);
        t.probe_started = matches!(gate, Gate::Probe { .. });
        while matches!(gate, Gate::Pass | Gate::Counted | Gate::Probe { .. }) && !self.queue.is_empty() {
            // With `in_flight`, a slot first (the probe's whatever is out); back if nobody goes.
            let probe = matches!(gate, Gate::Probe { .. });
            match self.slots.as_mut().map(|slots| slots.take(store, None, probe, now)) {
                None | Some(Ok(Ok(()))) => {}
                Some(Ok(Err(_))) => break,
                Some(Err(s)) => {
                    t.errors.push(s);
                    break;
                }
            }
            let Some(r) = self.release_next(store, gate, now, t) else {
                if let Some(Err(s)) = self.slots.as_mut().map(|slots| slots.give(store, None, None, || Some(now))) {
                    t.errors.push(s);
                }
                break;
            };
            if let Some(slots) = &mut self.slots {
                slots.give_pending(r.id);
            }
            t.released.push(r);
            gate = match gate {
                // One probe only; while the provider's window is counted, ask again each time.
                Gate::Probe { .. } => break,
                Gate::Counted => {
                    if let Err(s) = self.provider.spend(store) {
                        t.errors.push(s);
                    }
                    self.gate(store, now).unwrap_or(Gate::Hold { until: now.floor_millis() })
                }
                g => g,
            };
        }
        if t.probe_started && t.released.is_empty() {
            // Nobody here to send: the probe slot is left to time out and be taken again.
            t.probe_started = false;
        }
        gate
    }

    /// Takes the tokens of the waiter that goes next under `gate`, and lets it go. `None` when
    /// nobody can go, or shared data failed (the failure goes into `t`).
    fn release_next(&mut self, store: &impl Store, gate: Gate, now: Instant, t: &mut Tick) -> Option<Release> {
        let own = self.local_counts();
        let picked = self.bucket.update(store, &self.rules, now, |s| self.pick(s, gate, own, now));
        let (class, readout, took) = picked.unwrap_or_else(|s| {
            t.errors.push(s);
            None
        })?;
        let w = self.queue.pop_next(|c| c == class)?;
        self.bucket.wrote(self.local_counts(), now);
        t.readout = Some(readout);
        let probe = if let Gate::Probe { probe } = gate { Some(probe) } else { None };
        if let Some(n) = probe {
            self.probe_took = Some((n, took));
        }
        let r = Release { id: w.id, class: w.class, waited: now.floor_millis() - w.enqueued, probe };
        self.released.insert(w.id, r);
        Some(r)
    }

    /// The gate of this tick's releases. Only a worker with someone to send may take the
    /// half-open probe's place.
    fn tick_gate(&self, store: &impl Store, now: Instant, t: &mut Tick) -> Gate {
        if self.queue.is_empty() {
            return Gate::Hold { until: now.floor_millis() };
        }
        match self.provider.gate_and_mode(store, now) {
            Ok((g, moved)) => {
                t.moved = moved;
                g
            }
            Err(s) => {
                t.errors.push(s);
                Gate::Pass
            }
        }
    }

    /// One round of a release's compare-and-swap on `s`: the class whose oldest waiter goes next
    /// under `gate`, the readout after and whether it took a request token (always, but the probe
    /// takes one only if there is one), and the value to write.
    fn pick(
        &self,
        s: SharedBucket,
        gate: Gate,
        own: [u32; 4],
        now: Instant,
    ) -> (Option<(Priority, Readout, bool)>, Option<SharedBucket>) {
        let me = self.id;
        let stepped = self.rules.bucket.stepped_back(s.level, now);
        let refilled = SharedBucket { level: self.rules.bucket.refill(s.level, now), ..s };
        let (rules, queue) = (&self.rules, &self.queue);
        let need = |p: Priority| queue.head(p).and_then(|w| w.need);
        let picked = match gate {
            Gate::Probe { .. } => queue.peek_next_class(|_| true).map(|p| (p, rules.probe(&refilled, need(p), now))),
            // A class whose oldest waiter's tokens are short is skipped, not served out of order:
            // within a class, requests go in arrival order.
            _ => queue
                .peek_next_class(|p| rules.can_take(&refilled, need(p), p, now))
                .and_then(|p| Some((p, rules.take_for_waiter(&refilled, need(p), p, now)?))),
        };
        // Nobody to release: write nothing, unless the clock stepped back (the count restarts
        // from now, or the refill would stall for as long as the step).
        let took = match gate {
            Gate::Probe { .. } => rules.probe_takes_token(&refilled, now),
            _ => true,
        };
        let Some((class, taken)) = picked else { return (None, stepped.then_some(refilled)) };
        let mut after = own;
        after[class.index()] = after[class.index()].saturating_sub(1);
        let next = taken.with_worker(me, after, now);
        (Some((class, readout(&next, next.waiting(me, after, now)), took)), Some(next))
    }

    /// Writes this worker's waiter counts if this tick did not: when they changed since written,
    /// or, while it has waiters, every `HEARTBEAT` (entries not refreshed stop counting).
    fn heartbeat(&mut self, store: &impl Store, now: Instant, t: &mut Tick) {
        if t.readout.is_some() || !self.bucket.heartbeat_due(self.local_counts(), now) {
            return;
        }
        match self.publish(store, now) {
            Ok(readout) => t.readout = Some(readout),
            Err(s) => t.errors.push(s),
        }
    }

    /// The refusals answering the `expired` waiters, with the gate the tick ended with and the
    /// readout it last wrote (or read).
    fn answer_expired(
        &self,
        store: &impl Store,
        expired: &[Waiter<u32>],
        gate: Gate,
        written: Option<Readout>,
        now: Instant,
    ) -> Vec<Refusal> {
        let tokens = written.map(|(_, tokens, _)| tokens).or_else(|| self.bucket.tokens_now(store, &self.rules, now));
        let not_before = match gate {
            // Nobody left here to gate: what the provider state says, without taking a probe.
            _ if self.queue.is_empty() => self.provider.state(store).map_or(Instant::ZERO, |s| s.until),
            g => g.not_before(),
        };
        let hold = not_before - now.floor_millis();
        let level = Level { tokens: tokens.unwrap_or(0.0), at: now };
        expired.iter().map(|w| self.refuse_waiter(w, Reason::Expired, level, hold)).collect()
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

    /// The instant `ms` milliseconds after the epoch.
    fn at(ms: u64) -> Instant {
        Instant::from_millis(ms)
    }

    /// The instant `ns` nanoseconds after the epoch.
    fn at_ns(ns: u64) -> Instant {
        Instant::from_nanos(ns)
    }

    fn worker(json: &str, id: u64) -> Worker {
        Worker::new(Config::parse(json.as_bytes()).unwrap(), id)
    }

    /// Opens the breaker on a guess (no timing) at `T0`, for `backoff_ms`.
    fn trip(w: &Worker, store: &MemStore) {
        w.observe(store, 429, &Signals::default(), None, at(T0)).unwrap();
    }

    /// A reported usage of `total` tokens, all output.
    fn used(total: u64) -> Used {
        Used { input: 0, output: total, cached_input: 0, reported: true }
    }

    /// A NORMAL request `id` from no tenant, needing `need`, under `gate`.
    fn normal(id: u32, need: Option<TokenNeed>, gate: Gate) -> Arrival<'static> {
        Arrival { id, class: Priority::Normal, tenant: None, need, gate }
    }

    fn arrive(w: &mut Worker, store: &MemStore, id: u32, at_ms: u64) -> Admission {
        let gate = w.gate(store, at(at_ms)).unwrap();
        w.admit(store, normal(id, None, gate), at(at_ms)).unwrap().admission
    }

    #[test]
    fn every_role_creates_the_provider_state_before_traffic() {
        // A write to a missing key is unconditional: two workers tripping on a fresh key would
        // both succeed. Once created, every write is a compare-and-swap against a version.
        for (json, bucket) in [(r#"{"role":"observer"}"#, false), (r#"{"role":"admission"}"#, true)] {
            let (w, store) = (worker(json, 1), MemStore::default());
            w.ensure_shared(&store, at_ns(0)).unwrap();
            let (provider, cas) = store.get(w.provider_key()).unwrap();
            assert!(provider.is_some() && cas != 0, "{json}");
            assert_eq!(store.get(w.bucket_key()).unwrap().0.is_some(), bucket, "{json}");
        }
    }

    #[test]
    fn alert_slots_exist_before_the_first_alert() {
        // Else two workers raising the same alert at once on a fresh slot would both send it.
        let json = r#"{"role":"observer","alert":{"cluster":"alerts"}}"#;
        let (w, store) = (worker(json, 1), MemStore::default());
        w.ensure_shared(&store, at_ns(0)).unwrap();
        for slot in crate::alert::SLOTS {
            assert_ne!(store.get(&crate::alert::slot_key(&w.config.name, slot)).unwrap().1, 0, "{slot}");
        }
    }

    #[test]
    fn the_tick_releases_by_the_provider_state_as_it_is_not_as_cached() {
        let store = MemStore::default();
        let json = r#"{"bucket":{"capacity":1,"refill_rate":1000000,"burst_allowance":0,"max_lease":1}}"#;
        let (mut a, b) = (worker(json, 1), worker(json, 2));
        a.ensure_shared(&store, at(T0)).unwrap();
        // A caches the provider state as passing, spends the token, and queues the next request.
        assert!(matches!(arrive(&mut a, &store, 1, T0), Admission::Pass { .. }));
        assert!(matches!(arrive(&mut a, &store, 2, T0), Admission::Wait { .. }));
        // Another filter trips the breaker; A's tick, within the millisecond its cache is fresh and
        // with a token refilled, must not send the waiter to the exhausted provider.
        trip(&b, &store);
        assert!(a.tick(&store, at_ns(T0 * MS + 500_000)).released.is_empty());
    }

    #[test]
    fn a_refusal_is_reused_for_a_millisecond_and_never_past_its_token() {
        let store = MemStore::default();
        let json = r#"{"bucket":{"capacity":1,"refill_rate":100,"burst_allowance":0},"queue":{"enabled":false}}"#;
        let mut w = worker(json, 1);
        let at = |us: u64| T0 * MS + us * 1000;
        // The provider's gate says pass (its own cache is tested elsewhere).
        let go =
            |w: &mut Worker, id, t: u64| w.admit(&store, normal(id, None, Gate::Pass), at_ns(t)).map(|d| d.admission);
        assert!(matches!(go(&mut w, 1, at(0)), Ok(Admission::Pass { .. })));
        let Ok(Admission::Refuse(first)) = go(&mut w, 2, at(100)) else { panic!("no token") };
        assert_eq!(first.reason, Reason::NoToken);
        // Shared data fails from here: only a reused refusal can answer.
        store.broken.set(true);
        let Ok(Admission::Refuse(again)) = go(&mut w, 3, at(600)) else { panic!("reused") };
        assert_eq!((again.reason, again.wait.as_nanos()), (Reason::NoToken, first.wait.as_nanos() - MS / 2));
        assert!(go(&mut w, 4, at(1200)).is_err(), "a millisecond later the bucket is read again");
        // Never past the time its token exists (10 ms at 100/s): then the bucket is read.
        store.broken.set(false);
        let Ok(Admission::Refuse(r)) = go(&mut w, 5, at(9950)) else { panic!("still no token") };
        store.broken.set(true);
        assert!(r.wait.as_nanos() <= MS / 10);
        assert!(go(&mut w, 6, at(10_010)).is_err(), "its token exists now: read, not reused");
    }

    #[test]
    fn an_uneventful_answer_reuses_the_provider_state_just_read() {
        let store = MemStore::default();
        let w = worker("{}", 1);
        let ok = Signals { remaining_requests: Some(500), limit_requests: Some(1000), ..Signals::default() };
        w.observe(&store, 200, &ok, None, at(T0)).unwrap();
        store.broken.set(true);
        assert!(w.observe(&store, 200, &ok, None, at(T0)).is_ok(), "nothing to change: no read");
        assert!(w.observe(&store, 429, &Signals::default(), None, at(T0)).is_err(), "a 429 is always written");
        assert!(w.observe(&store, 200, &ok, None, at(T0 + 1)).is_err(), "a millisecond later it reads again");
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
        assert!(w.tick(&store, at(T0 + 1_010)).released.is_empty());
        let probe = w.provider_state(&store).unwrap().probe;
        w.observe(&store, 200, &Signals::default(), Some(probe), at(T0 + 1_050)).unwrap();
        assert_eq!(w.tick(&store, at(T0 + 1_060)).released.len(), 3);
    }

    #[test]
    fn a_tick_takes_the_probe_only_with_someone_to_send() {
        let store = MemStore::default();
        let mut w = worker("{}", 1);
        trip(&w, &store);
        assert!(!w.tick(&store, at(T0 + 2_000)).probe_started);
        assert_eq!(w.provider_state(&store).unwrap().mode, Mode::Open, "the probe slot is still free");
        assert_eq!(arrive(&mut w, &store, 1, T0 + 500), Admission::Wait { shed: None });
        let t = w.tick(&store, at(T0 + 1_000));
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
        assert_eq!(w.leave(&store, 2, at(T0)).map(|(c, _)| c), Some(Priority::Normal));
        store.conflicts.set(0);
        let shared: SharedBucket = store::read(&store, w.bucket_key()).unwrap().unwrap();
        assert_eq!(shared.waiting(0, [0; 4], at(T0)), [0, 0, 1, 0], "the phantom waiter is still there");
        assert!(w.needs_tick());
        w.tick(&store, at(T0 + 10));
        let shared: SharedBucket = store::read(&store, w.bucket_key()).unwrap().unwrap();
        assert_eq!(shared.waiting(0, [0; 4], at(T0 + 10)), [0; 4]);
        assert!(!w.needs_tick());
    }

    #[test]
    fn a_clock_step_back_keeps_deadlines_and_the_refill_going() {
        let store = MemStore::default();
        let mut w = worker(r#"{"bucket":{"capacity":1,"refill_rate":1,"burst_allowance":0}}"#, 3);
        assert_eq!(arrive(&mut w, &store, 1, T0), Admission::Pass { probe: None });
        assert_eq!(arrive(&mut w, &store, 2, T0), Admission::Wait { shed: None });
        w.tick(&store, at(T0 + 100));
        // The clock steps back 10 s: the waiter's token comes 1 s of real time after it queued.
        let back = T0 - 10_000;
        assert!(w.tick(&store, at(back + 200)).released.is_empty());
        assert_eq!(w.tick(&store, at(back + 1_300)).released.len(), 1, "no stall for the step");
    }

    #[test]
    fn a_retry_waits_for_the_reset_only_when_its_class_may_wait_that_long() {
        let store = MemStore::default();
        let w = worker(r#"{"priorities":{"LOW":{"max_wait_ms":500}}}"#, 1);
        let exhausted =
            Signals { remaining_requests: Some(0), requests_reset_ms: Some(T0 + 3_000), ..Signals::default() };
        w.observe(&store, 429, &exhausted, None, at(T0)).unwrap();
        assert_eq!(w.attempt(&store, Priority::Normal, at(T0 + 10)).unwrap(), Attempt::Hold { until: at(T0 + 3_000) });
        match w.attempt(&store, Priority::Low, at(T0 + 10)).unwrap() {
            Attempt::Refuse(r) => assert_eq!((r.reason, r.wait.as_nanos()), (Reason::BreakerOpen, 2_990 * MS)),
            other => panic!("{other:?}"),
        }
        assert_eq!(w.attempt(&store, Priority::Low, at(T0 + 3_000)).unwrap(), Attempt::Go);
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
        w.observe(&store, 200, &exhausted, None, at(T0)).unwrap();
        assert_eq!(w.attempt(&store, Priority::Normal, at(T0 + 10)).unwrap(), Attempt::Hold { until: at(T0 + 1_000) });
        // At the reset the window holds two: two retries go, the third waits for the next reset.
        assert_eq!(w.attempt(&store, Priority::Normal, at(T0 + 1_000)).unwrap(), Attempt::Go);
        assert_eq!(w.attempt(&store, Priority::Normal, at(T0 + 1_000)).unwrap(), Attempt::Go);
        assert!(matches!(w.gate(&store, at(T0 + 1_001)).unwrap(), Gate::Hold { .. }));
        assert!(matches!(w.attempt(&store, Priority::Normal, at(T0 + 1_001)).unwrap(), Attempt::Hold { .. }));
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
        w.tick(&store, at(T0));
        // 4 admissions last tick: the next takes a lease of 4 more, then the lease serves them.
        assert_eq!(arrive(&mut w, &store, 10, T0 + 1), Admission::Pass { probe: None });
        assert_eq!(level(&store).round(), 991.0);
        assert_eq!(w.bucket_lease().requests, 4.0);
        for id in 11..14 {
            assert_eq!(arrive(&mut w, &store, id, T0 + 1), Admission::Pass { probe: None });
        }
        assert_eq!(level(&store).round(), 991.0, "admitted from the lease: no shared-data write");
        // The tick gives the unspent token back: exactly 8 taken for 8 admissions.
        w.tick(&store, at(T0 + 2));
        assert_eq!(level(&store).round(), 992.0);
        assert!(!w.holds_bucket_lease());
    }

    #[test]
    fn no_lease_near_the_floor_or_while_anyone_waits() {
        let store = MemStore::default();
        let json = r#"{"bucket":{"capacity":20,"refill_rate":0.001,"burst_allowance":10,"max_lease":16}}"#;
        let mut w = worker(json, 1);
        for id in 0..8 {
            arrive(&mut w, &store, id, T0);
        }
        w.tick(&store, at(T0));
        // 30 - 8 = 22 left, 12 above the reserve: a lease may take an eighth of that, 1.
        arrive(&mut w, &store, 20, T0 + 1);
        assert_eq!(w.bucket_lease().requests, 1.0);
        w.tick(&store, at(T0 + 2));
        // Drain to the reserve: NORMAL then waits, and no lease is taken while it does.
        let mut id = 30;
        while arrive(&mut w, &store, id, T0 + 3) == (Admission::Pass { probe: None }) {
            id += 1;
        }
        assert_eq!(w.bucket_lease().requests, 0.0);
        let mut other = worker(json, 2);
        assert_eq!(
            other
                .admit(&store, Arrival { class: Priority::Critical, ..normal(99, None, Gate::Pass) }, at(T0 + 3))
                .unwrap()
                .admission,
            Admission::Pass { probe: None }
        );
        assert_eq!(other.bucket_lease().requests, 0.0, "a waiter elsewhere: no lease");
    }

    #[test]
    fn settlements_are_held_until_the_tick_writes_them() {
        let store = MemStore::default();
        let json = r#"{"bucket":{"max_lease":1},"tokens":{"capacity":1000,"refill_rate":0.001}}"#;
        let mut w = worker(json, 1);
        let need = TokenNeed { bucket: 0, tokens: 300, input: 0 };
        let gate = w.gate(&store, at(T0)).unwrap();
        assert!(matches!(
            w.admit(&store, normal(1, Some(need), gate), at(T0)).unwrap().admission,
            Admission::Pass { .. }
        ));
        let tokens = |store: &MemStore| {
            store::read::<SharedBucket>(store, "llm_ratelimit/default/bucket").unwrap().unwrap().token_levels[0]
                .tokens
                .round()
        };
        assert_eq!(tokens(&store), 700.0);
        w.settle(need, &used(100));
        assert_eq!(tokens(&store), 700.0);
        assert!(w.needs_tick());
        w.tick(&store, at(T0));
        assert_eq!(tokens(&store), 900.0);
        assert!(!w.needs_tick());
    }

    #[test]
    fn a_debt_beyond_one_bucket_is_written_back_whole() {
        let store = MemStore::default();
        let json = r#"{"bucket":{"max_lease":1},"tokens":{"capacity":3000,"refill_rate":1000}}"#;
        let mut w = worker(json, 1);
        let need = TokenNeed { bucket: 0, tokens: 60, input: 0 };
        let gate = w.gate(&store, at(T0)).unwrap();
        for id in 0..40 {
            let a = w.admit(&store, normal(id, Some(need), gate), at(T0)).unwrap().admission;
            assert!(matches!(a, Admission::Pass { .. }));
        }
        // Each used 1500: 57,600 more than reserved, written back on the tick.
        for _ in 0..40 {
            w.settle(need, &used(1500));
        }
        w.tick(&store, at(T0));
        let shared = || store::read::<SharedBucket>(&store, "llm_ratelimit/default/bucket").unwrap().unwrap();
        assert_eq!(shared().token_levels[0].tokens.round(), 600.0 - 57_600.0);
        // Paid back by the refill before anything else of that bucket passes: 57 s at 1000/s.
        let later = |s: u64| (T0 + s * 1000) * MS;
        let a = w.admit(&store, normal(99, Some(need), Gate::Pass), at_ns(later(20))).unwrap().admission;
        assert!(matches!(a, Admission::Refuse(r) if r.reason == Reason::TokenLimit), "{a:?}");
        let a = w.admit(&store, normal(99, Some(need), Gate::Pass), at_ns(later(58))).unwrap().admission;
        assert_eq!(a, Admission::Pass { probe: None });
    }
}
