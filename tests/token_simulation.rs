//! Deterministic simulation of token-limit admission: several workers share one store while a
//! seeded random schedule interleaves arrivals needing LLM tokens (from the provider token bucket
//! or a per-model one, some larger than a class may ever take; bursts of small alike ones on one
//! worker, what leases serve), ticks, clock advances, answers
//! that settle each admitted request (exact, failed, under or over its estimate, some far over),
//! client disconnects and lost CAS writes. Each worker reads the clock a few ms apart from the
//! others; the provider always lets requests through (its cached state never changes). Half the
//! schedules run with `bucket.max_lease` 1 (every admission a compare-and-swap), the others with
//! 4 or the default, so workers lease requests and LLM tokens ahead and spend them with no
//! shared-data call. proptest shrinks a failing schedule to a short, readable list of events.
//!
//! A reference ledger replays, per bucket, exactly what the decisions the workers reported must
//! have done to the shared level and to what each worker holds beside it, kept apart: its lease
//! (requests and LLM tokens) and its settlements not written yet. An admission through the store
//! takes one request token and its need from the shared level, and moves the lease it took with
//! it from the shared level to its worker's lease; an admission from a lease takes them from the
//! worker's lease alone; a settle adds `need - actual` to its worker's settlements, which
//! nothing spends; a tick that writes moves lease and settlements back into the shared level in
//! one write, capped at one bucket (a debt of LLM tokens carried whole), as the core does.
//! Properties, checked after every event:
//! - every admission through the store had its request token and its LLM tokens above its
//!   class's floor; an admission from a lease (only with its worker's queue empty) had them in
//!   what its worker leased (taken above every class's floor), never in its settlements: a
//!   refund goes to the shared level, and to admissions only through the store's checks;
//! - a lease is at most `min(admissions since the worker's previous tick, max_lease - 1)` requests
//!   and an eighth of the requests above the highest floor, its LLM tokens at most an eighth of
//!   the tokens above the burst and `requests × the largest need seen`, and is taken only while
//!   nobody waits process-wide;
//! - the store's levels and every worker's lease and settlements equal the ledger's (a need
//!   taken twice, or never, a lease or a settlement lost, counted twice or mixed up, shows at
//!   once);
//! - the tokens spent (the need of every admitted request while unsettled, its actual use once
//!   answered) stay within `max + refill_rate × elapsed + the excess charged after the fact`,
//!   and `spent + level + leases` within `max + refill_rate × elapsed`: no debt is forgiven (see
//!   [`Ledger::check`] for why both must hold);
//! - admitted requests stay within the request bucket the same way;
//! - a need larger than its class may ever take is refused at once as `too_large`, never to
//!   retry, and nothing else is;
//! - within one class on one worker, releases go in arrival order; a shed waiter is the newest
//!   of the least important class below the arrival's; no waiter expires early, and none is
//!   still paused past its deadline once its worker has ticked;
//! - a tick whose writes all went through leaves no class's oldest waiter behind while what it
//!   needs is there;
//! - a tick keeps its worker's lease only when the write back failed, and says so;
//! - the workers' queues hold exactly the waiters that exist, and once every worker has ticked
//!   the shared waiter counts equal them; once every worker has ticked with no failed write, no
//!   worker holds a lease and the store alone is the ledger.
//!
//! At the end time passes with every worker ticking: no waiter is left, and once the buckets
//! have refilled, a request as large as its class may take passes at once from each bucket.
//!
//! A second simulation replays the overrun measured end to end (requests that reserve 60 tokens
//! and use 1500, in bursts of 40): over any window, what they use stays within the bucket, its
//! refill and one burst's underestimate (see [`check_overrun`]).
//!
//! `SIM_CASES` sets the number of schedules (500 by default; the overrun runs a 25th of them),
//! `SIM_SEED` the seed.

use llm_ratelimit::admission::{SharedBucket, TokenNeed};
use llm_ratelimit::breaker::Gate;
use llm_ratelimit::bucket::Level;
use llm_ratelimit::config::Config;
use llm_ratelimit::priority::Priority;
use llm_ratelimit::reply::Reason;
use llm_ratelimit::store::{self, MemStore};
use llm_ratelimit::time::Instant;
use llm_ratelimit::tokens::meter::Used;
use llm_ratelimit::worker::{Admission, Arrival, BucketLease, Worker};

/// A reported usage of `total` tokens, all output.
fn used(total: u64) -> Used {
    Used { input: 0, output: total, cached_input: 0, reported: true }
}
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::test_runner::RngSeed;
use std::collections::BTreeMap;

const START_MS: u64 = 1_700_000_000_000;
const MS: u64 = 1_000_000;
/// Request buckets `(capacity, refill_rate, burst_allowance)`: a tight one (10 + 2: a lease of
/// one request only while it is nearly full) and a roomy one (40 + 4: leases of up to 4).
const TIGHT: (u64, f64, u64) = (10, 4.0, 2);
const ROOMY: (u64, f64, u64) = (40, 8.0, 4);
/// The provider token bucket (its burst is 0 or `GEN_BURST`, per schedule).
const CAPACITY: u64 = 1_000;
const REFILL: f64 = 200.0;
const GEN_BURST: u64 = 300;
/// The per-model buckets, in model-name order: `TokenNeed::bucket` 1 is "a", 2 is "b".
const MODELS: [(u64, f64); 2] = [(400, 50.0), (150, 20.0)];
/// Workers read the wall clock up to this far ahead of worker 0 (less than the bucket's jitter
/// allowance: never a clock step).
const MAX_SKEW_MS: u64 = 50;
/// A lease takes at most this share of what lies above the highest floor (the core's
/// `LEASE_SHARE`).
const LEASE_SHARE: f64 = 8.0;

/// What one schedule runs with.
#[derive(Clone, Copy, Debug)]
struct Setup {
    /// The request bucket: `TIGHT` or `ROOMY`.
    requests: (u64, f64, u64),
    /// The provider token bucket's burst.
    burst: u64,
    /// `bucket.max_lease`; `None` leaves it out (the default).
    max_lease: Option<u64>,
}

fn config(setup: Setup) -> Config {
    let [(a_cap, a_rate), (b_cap, b_rate)] = MODELS;
    let (req_cap, req_rate, req_burst) = setup.requests;
    let burst = setup.burst;
    let max_lease = setup.max_lease.map_or_else(String::new, |m| format!(r#","max_lease":{m}"#));
    let json = format!(
        r#"{{"bucket":{{"capacity":{req_cap},"refill_rate":{req_rate},"burst_allowance":{req_burst}{max_lease}}},
            "tokens":{{"capacity":{CAPACITY},"refill_rate":{REFILL},"burst_allowance":{burst},
                       "per_model":{{"a":{{"capacity":{a_cap},"refill_rate":{a_rate}}},
                                    "b":{{"capacity":{b_cap},"refill_rate":{b_rate}}}}}}},
            "queue":{{"max_waiting":6}},
            "priorities":{{"CRITICAL":{{"max_wait_ms":4000}},"HIGH":{{"max_wait_ms":3000}},
                           "NORMAL":{{"max_wait_ms":2000}},"LOW":{{"max_wait_ms":1000,"queue_limit":3}}}}}}"#
    );
    Config::parse(json.as_bytes()).unwrap()
}

/// Whether a class may spend a bucket's burst (the defaults: CRITICAL and HIGH).
fn use_burst(class: Priority) -> bool {
    matches!(class, Priority::Critical | Priority::High)
}

/// What an admitted request turns out to have used.
#[derive(Clone, Copy, Debug)]
enum Usage {
    /// Its estimate.
    Exact,
    /// A failed answer: nothing.
    Failed,
    /// Its estimate off by this percentage.
    Off(i64),
    /// This many tokens more than its estimate (up to three buckets: a debt carried whole).
    Over(u64),
}

impl Usage {
    fn actual(self, need: u64) -> u64 {
        match self {
            Usage::Exact => need,
            Usage::Failed => 0,
            Usage::Off(pct) => (need as i64 * (100 + pct) / 100).max(0) as u64,
            Usage::Over(extra) => need + extra,
        }
    }
}

#[derive(Clone, Debug)]
enum Event {
    Arrive {
        worker: usize,
        class: usize,
        need: Option<TokenNeed>,
    },
    /// `n` arrivals alike at once on one worker (a client's burst): what a lease serves.
    Burst {
        worker: usize,
        class: usize,
        need: Option<TokenNeed>,
        n: usize,
    },
    Tick {
        worker: usize,
    },
    TickAll,
    Advance {
        ms: u64,
    },
    /// The answer to in-flight request `pick` (modulo how many are in flight) is over.
    Answer {
        pick: usize,
        usage: Usage,
    },
    /// The client of waiting request `pick` goes away (of an in-flight one, without waiters).
    Disconnect {
        pick: usize,
    },
    /// The next `n` shared-data writes lose their compare-and-swap (32 lose a whole update).
    Conflicts {
        n: u32,
    },
}

/// Needs around a bucket's `cap` and `cap + burst`: small, up to all of it, at the edges, and
/// more than any class may take.
fn tokens(cap: u64, burst: u64) -> impl Strategy<Value = u64> {
    prop_oneof![
        4 => 0..cap / 4,
        3 => cap / 4..=cap,
        2 => cap - 2..=cap + 2,
        1 => cap + burst - 2..=cap + burst + 2,
        1 => cap..4 * cap,
    ]
}

fn need() -> impl Strategy<Value = Option<TokenNeed>> {
    prop_oneof![
        1 => Just(None),
        6 => tokens(CAPACITY, GEN_BURST).prop_map(|tokens| Some(TokenNeed { bucket: 0, tokens, input: 0 })),
        2 => tokens(MODELS[0].0, 0).prop_map(|tokens| Some(TokenNeed { bucket: 1, tokens, input: 0 })),
        2 => tokens(MODELS[1].0, 0).prop_map(|tokens| Some(TokenNeed { bucket: 2, tokens, input: 0 })),
    ]
}

/// Needs small enough for a lease to hold several.
fn small_need() -> impl Strategy<Value = Option<TokenNeed>> {
    prop_oneof![
        1 => Just(None),
        3 => (0..CAPACITY / 10).prop_map(|tokens| Some(TokenNeed { bucket: 0, tokens, input: 0 })),
        1 => (0..MODELS[0].0 / 10).prop_map(|tokens| Some(TokenNeed { bucket: 1, tokens, input: 0 })),
        1 => (0..MODELS[1].0 / 10).prop_map(|tokens| Some(TokenNeed { bucket: 2, tokens, input: 0 })),
    ]
}

fn usage() -> impl Strategy<Value = Usage> {
    prop_oneof![
        3 => Just(Usage::Exact),
        1 => Just(Usage::Failed),
        3 => (-60..=40i64).prop_map(Usage::Off),
        1 => (1..3_000u64).prop_map(Usage::Over),
    ]
}

fn event(workers: usize) -> impl Strategy<Value = Event> {
    prop_oneof![
        8 => (0..workers, 0..4usize, need()).prop_map(|(worker, class, need)| Event::Arrive { worker, class, need }),
        3 => (0..workers, 0..4usize, small_need(), 2..8usize)
            .prop_map(|(worker, class, need, n)| Event::Burst { worker, class, need, n }),
        4 => (0..workers).prop_map(|worker| Event::Tick { worker }),
        1 => Just(Event::TickAll),
        5 => (1..1_500u64).prop_map(|ms| Event::Advance { ms }),
        5 => (0..64usize, usage()).prop_map(|(pick, usage)| Event::Answer { pick, usage }),
        1 => (0..64usize).prop_map(|pick| Event::Disconnect { pick }),
        1 => (1..40u32).prop_map(|n| Event::Conflicts { n }),
    ]
}

fn setup() -> impl Strategy<Value = Setup> {
    (
        prop_oneof![1 => Just(TIGHT), 2 => Just(ROOMY)],
        prop_oneof![Just(0u64), Just(GEN_BURST)],
        prop_oneof![2 => Just(Some(1u64)), 1 => Just(Some(4)), 1 => Just(None)],
    )
        .prop_map(|(requests, burst, max_lease)| Setup { requests, burst, max_lease })
}

/// One bucket as the decisions reported say it must be, and what was spent from it.
struct Ledger {
    name: &'static str,
    max: f64,
    /// The highest class floor: what no lease may dig into.
    burst: f64,
    rate: f64,
    /// Whether a write back may leave a debt (LLM tokens, carried whole); request leases are
    /// never negative. Either write back caps at `max`.
    debt: bool,
    /// The shared level replayed from the decisions (same arithmetic as the bucket: refill, then
    /// take, lease or write back).
    store: Level,
    /// Per worker: what it leased and has not spent (taken above every floor), the only part of
    /// what it holds beside the shared level that admissions from its lease may spend.
    leased: Vec<f64>,
    /// Per worker: its settlements not written yet, refunds minus charges (negative: a debt);
    /// only a write back moves them. Always 0 for requests.
    settled: Vec<f64>,
    /// Tokens spent: the need of every admitted request while unsettled, its actual once settled.
    spent: f64,
    /// Tokens charged after the fact: the sum of `max(0, actual - need)` over settled requests.
    excess: f64,
}

impl Ledger {
    fn new(name: &'static str, (capacity, rate, burst): (u64, f64, u64), workers: usize, debt: bool) -> Ledger {
        let max = (capacity + burst) as f64;
        Ledger {
            name,
            max,
            burst: burst as f64,
            rate,
            debt,
            store: Level { tokens: max, at: Instant::from_nanos(START_MS * MS) },
            leased: vec![0.0; workers],
            settled: vec![0.0; workers],
            spent: 0.0,
            excess: 0.0,
        }
    }

    /// `l` brought forward to `now_ns`: nothing for a clock a moment behind the last writer.
    fn refill(&self, l: Level, now_ns: u64) -> Level {
        let now = Instant::from_nanos(now_ns);
        if now <= l.at {
            return l;
        }
        let elapsed = (now - l.at).as_secs_f64();
        Level { tokens: (l.tokens + elapsed * self.rate).min(self.max), at: now }
    }

    /// Most a class may ever take.
    fn limit(&self, class: Priority) -> f64 {
        self.max - self.floor(class)
    }

    fn floor(&self, class: Priority) -> f64 {
        if use_burst(class) {
            0.0
        } else {
            self.burst
        }
    }

    /// Whether `n` is in the shared level for `class` at `now_ns`.
    fn has(&self, class: Priority, n: u64, now_ns: u64) -> bool {
        self.refill(self.store, now_ns).tokens - n as f64 >= self.floor(class) - 1e-9
    }

    /// Request `id` of `class` was admitted through the store at `now_ns` taking `n`: it must
    /// have been there.
    fn take(&mut self, id: u32, class: Priority, n: u64, now_ns: u64) {
        let l = self.refill(self.store, now_ns);
        let floor = self.floor(class);
        assert!(
            l.tokens - n as f64 >= floor - 1e-9,
            "{}: #{id} ({class:?}) admitted taking {n} with {} left (its floor is {floor})",
            self.name,
            l.tokens
        );
        self.store = Level { tokens: l.tokens - n as f64, ..l };
        self.spent += n as f64;
    }

    /// The admission of `id` (just taken from the shared level) also leased `x` to `worker`: at
    /// most an eighth of what is left above the highest floor.
    fn lease_out(&mut self, id: u32, worker: usize, x: f64) {
        let above = self.store.tokens - self.burst;
        // The core floors the share; a hair of rounding must not move it.
        let most = (above / LEASE_SHARE + 1e-6).floor().max(0.0);
        assert!(
            x >= 0.0 && x <= most + 1e-9,
            "{}: #{id}'s admission leased {x} to worker {worker}, with {above} above the highest floor",
            self.name
        );
        self.store.tokens -= x;
        self.leased[worker] += x;
    }

    /// Request `id` of `class` was admitted from `worker`'s lease taking `n`: its worker must
    /// have leased them (above every floor, so any class may spend them). Its settlements are
    /// not there to spend: a refund no floor or debt was checked against would admit requests
    /// no check of the shared level would.
    fn spend_lease(&mut self, id: u32, worker: usize, class: Priority, n: u64) {
        let (leased, settled) = (self.leased[worker], self.settled[worker]);
        assert!(
            leased - n as f64 >= -1e-9,
            "{}: #{id} ({class:?}) admitted from worker {worker}'s lease taking {n}, which leased {leased} \
             (its settlements, {settled}, are not spendable)",
            self.name
        );
        self.leased[worker] -= n as f64;
        self.spent += n as f64;
    }

    /// A request `worker` admitted taking `need` used `actual`: the difference waits in the
    /// worker's settlements for its next tick.
    fn settle(&mut self, worker: usize, need: u64, actual: u64) {
        self.settled[worker] += need as f64 - actual as f64;
        self.spent += actual as f64 - need as f64;
        self.excess += actual.saturating_sub(need) as f64;
    }

    /// `worker`'s tick wrote its lease and settlements back at `now_ns`: the refilled level
    /// plus both, capped at one bucket (a debt is carried whole), as one write. The cap
    /// applies here, not at each settlement.
    fn write_back(&mut self, worker: usize, now_ns: u64) {
        let l = self.refill(self.store, now_ns);
        let tokens = (l.tokens + (self.leased[worker] + self.settled[worker])).min(self.max);
        assert!(self.debt || tokens >= 0.0, "{}: a write back left {tokens}", self.name);
        self.store = Level { tokens, ..l };
        self.leased[worker] = 0.0;
        self.settled[worker] = 0.0;
    }

    /// Checks the store's `level` and the workers' leases `leased` and settlements `settled`
    /// against the ledger, `elapsed_s` after the start, at `now_ns` (the latest any worker's
    /// clock has read).
    ///
    /// The ledger keeps the shared level and what each worker holds apart, because the refill
    /// is capped on the shared level alone: while a lease is out the shared level refills up to
    /// `max` and the lease is cut back to one bucket when it is written back, so no identity on
    /// `level + Σ held` alone could say what a write back leaves. Replaying both, the identity is
    /// exact at every step: each worker's lease and settlements, and `level + Σ held`, equal the
    /// ledger's.
    ///
    /// With S the tokens spent, E the excess charged after the fact and T = L + Σ leased + Σ
    /// settled (the shared level plus what every worker holds), the buckets keep `T = max + rate
    /// × t - S - (refill lost to the cap) - (write backs cut at max)`: an admission moves its
    /// need from T to S, a settlement moves `actual - need` from T to S, and no debt is ever
    /// forgiven. So `S + T <= max + rate × t`. And T is never below -E: the level goes below 0
    /// only by a write back of excess (admissions leave it at or above a floor, the refill only
    /// raises it), leases are never negative, and unwritten settlements are at least minus their
    /// unwritten excess. So `S <= max + rate × t + E`: what was spent beyond the bucket is
    /// what requests used beyond their estimates, owed by the level until the refill pays it.
    fn check(&self, level: Level, leased: &[f64], settled: &[f64], elapsed_s: f64, now_ns: u64) {
        for (what, got, model) in [("leased", leased, &self.leased), ("settled", settled, &self.settled)] {
            for (k, (&h, &m)) in got.iter().zip(model).enumerate() {
                assert!(
                    (h - m).abs() <= 1e-6,
                    "{}: worker {k} has {h} {what} beside the store, the decisions reported leave it {m}",
                    self.name
                );
            }
        }
        let held = |l: &[f64], s: &[f64]| l.iter().chain(s).sum::<f64>();
        let stored = self.refill(level, now_ns).tokens + held(leased, settled);
        let model = self.refill(self.store, now_ns).tokens + held(&self.leased, &self.settled);
        assert!(
            (stored - model).abs() <= 1e-6,
            "{}: the store and the leases hold {stored} tokens, the decisions reported leave {model}",
            self.name
        );
        let refilled = self.max + self.rate * elapsed_s;
        let allowed = refilled + self.excess;
        assert!(
            self.spent <= allowed + 1e-6,
            "{}: {} tokens spent, more than the {allowed} the bucket allows after {elapsed_s} s",
            self.name,
            self.spent
        );
        let allowed = refilled;
        assert!(
            self.spent + stored <= allowed + 1e-6,
            "{}: {} tokens spent and {stored} left (leases included), more than the {allowed} the bucket allows \
             after {elapsed_s} s",
            self.name,
            self.spent
        );
    }
}

/// What a worker holds beside the store, all of it going back on its next tick: leased
/// requests, and per token bucket its leased tokens and, apart, its unwritten settlements.
type Holding = (f64, [f64; 3], [f64; 3]);

fn holding(l: &BucketLease) -> Holding {
    let (mut tokens, mut settled) = ([0.0; 3], [0.0; 3]);
    assert!(l.tokens.len() <= tokens.len(), "a lease of {} token buckets", l.tokens.len());
    assert!(l.settled.len() <= settled.len(), "settlements for {} token buckets", l.settled.len());
    tokens[..l.tokens.len()].copy_from_slice(&l.tokens);
    settled[..l.settled.len()].copy_from_slice(&l.settled);
    (l.requests, tokens, settled)
}

struct Waiting {
    worker: usize,
    class: Priority,
    need: Option<TokenNeed>,
    /// On its worker's clock.
    deadline_ms: u64,
}

/// An admitted request whose answer is not over yet.
struct Flight {
    worker: usize,
    id: u32,
    need: Option<TokenNeed>,
}

/// How often the leased path ran, to tell a schedule that exercised it.
#[derive(Clone, Copy, Debug, Default)]
struct Stats {
    leases: u32,
    from_lease: u32,
    write_backs: u32,
    kept: u32,
}

struct Sim {
    store: MemStore,
    workers: Vec<Worker>,
    /// Worker `k` reads the wall clock as `now + skew[k]`.
    skew: Vec<u64>,
    now: u64,
    next_id: u32,
    waiting: BTreeMap<u32, Waiting>,
    in_flight: Vec<Flight>,
    requests: Ledger,
    /// In `TokenNeed::bucket` order.
    tokens: Vec<Ledger>,
    max_lease: u32,
    /// Per worker: requests `admit` let through since its last tick.
    admitted: Vec<u32>,
    /// Per worker: the most requests its next lease may hold, the admission included (what its
    /// last tick saw, plus one).
    lease_size: Vec<u32>,
    /// Per worker: the largest need it was asked to admit (its average need is below it).
    max_need: Vec<u64>,
    stats: Stats,
}

impl Sim {
    fn new(workers: usize, setup: Setup, skew: &[u64]) -> Sim {
        let config = config(setup);
        let max_lease = config.bucket.max_lease.max(1) as u32;
        let workers: Vec<Worker> = (0..workers).map(|i| Worker::new(config.clone(), 1000 + i as u64)).collect();
        let store = MemStore::default();
        workers[0].ensure_shared(&store, Instant::from_nanos(START_MS * MS)).unwrap();
        let skew = (0..workers.len()).map(|k| if k == 0 { 0 } else { skew[k - 1] }).collect();
        let n = workers.len();
        let [a, b] = MODELS;
        Sim {
            store,
            workers,
            skew,
            now: START_MS,
            next_id: 1,
            waiting: BTreeMap::new(),
            in_flight: Vec::new(),
            requests: Ledger::new("request bucket", setup.requests, n, false),
            tokens: vec![
                Ledger::new("token bucket", (CAPACITY, REFILL, setup.burst), n, true),
                Ledger::new("model a", (a.0, a.1, 0), n, true),
                Ledger::new("model b", (b.0, b.1, 0), n, true),
            ],
            max_lease,
            admitted: vec![0; n],
            lease_size: vec![1; n],
            max_need: vec![0; n],
            stats: Stats::default(),
        }
    }

    fn clock_ms(&self, worker: usize) -> u64 {
        self.now + self.skew[worker]
    }

    /// Request `id` of `class` took its request token and its need from the shared level.
    fn take(&mut self, id: u32, class: Priority, need: Option<TokenNeed>, now_ns: u64) {
        self.requests.take(id, class, 1, now_ns);
        if let Some(n) = need {
            self.tokens[usize::from(n.bucket)].take(id, class, n.tokens, now_ns);
        }
    }

    /// The admission of `id` through the store on `worker` left its lease at `after` (from
    /// `before`): what it leased must fit every bound, and moves from the shared level to it.
    fn lease_out(
        &mut self,
        worker: usize,
        id: u32,
        need: Option<TokenNeed>,
        (before, after): (Holding, Holding),
        quiet: bool,
    ) {
        let requests = after.0 - before.0;
        let size = self.lease_size[worker];
        assert!(
            requests >= 0.0 && requests.fract() == 0.0 && requests <= f64::from(size - 1),
            "#{id}: worker {worker} leased {requests} requests, more than {} (admissions before its last tick, at \
             most max_lease {} - 1)",
            size - 1,
            self.max_lease
        );
        assert!(requests == 0.0 || quiet, "#{id}: worker {worker} leased {requests} requests while requests wait");
        assert_eq!(after.2, before.2, "#{id}: an admission moved worker {worker}'s settlements");
        self.requests.lease_out(id, worker, requests);
        for (i, ledger) in self.tokens.iter_mut().enumerate() {
            let t = after.1[i] - before.1[i];
            match need {
                Some(n) if usize::from(n.bucket) == i && requests > 0.0 => {
                    // Sized by the worker's average need, which is at most the largest it saw.
                    let most = requests * self.max_need[worker] as f64;
                    assert!(t <= most + 1e-6, "#{id}: worker {worker} leased {t} tokens for {requests} requests");
                    ledger.lease_out(id, worker, t);
                }
                _ => assert_eq!(t, 0.0, "#{id}: worker {worker} leased {t} tokens of bucket {i} with {need:?}"),
            }
        }
        if requests > 0.0 {
            self.stats.leases += 1;
        }
    }

    fn arrive(&mut self, worker: usize, class: Priority, need: Option<TokenNeed>) -> Option<Admission> {
        let id = self.next_id;
        self.next_id += 1;
        let clock_ms = self.clock_ms(worker);
        let now_ns = clock_ms * MS;
        let too_large = need.is_some_and(|n| n.tokens as f64 > self.tokens[usize::from(n.bucket)].limit(class));
        if let Some(n) = need {
            self.max_need[worker] = self.max_need[worker].max(n.tokens);
        }
        let w = &mut self.workers[worker];
        let own = w.local_counts();
        // What the admission's compare-and-swap reads (a lost write changes nothing in between).
        let shared: SharedBucket = store::read(&self.store, w.bucket_key()).unwrap().unwrap();
        let quiet = shared.waiting(w.id, own, Instant::from_millis(clock_ms)) == [0; 4];
        let before = holding(w.bucket_lease());
        let decision = w.admit(
            &self.store,
            Arrival { id, class, tenant: None, need, gate: Gate::Pass },
            Instant::from_nanos(now_ns),
        );
        let after = holding(w.bucket_lease());
        let Ok(decision) = decision else {
            // Every CAS lost: nothing was written, nothing queued, nothing leased.
            assert!(!w.is_waiting(id), "#{id} queued by an arrival that failed");
            assert!(!too_large, "#{id} too large, yet the bucket was written");
            assert_eq!(before, after, "#{id}: an arrival that failed changed the lease");
            return None;
        };
        let admission = decision.admission;
        if !matches!(admission, Admission::Pass { .. }) {
            assert_eq!(before, after, "#{id} was not let through, yet its worker's lease changed");
        }
        match &admission {
            Admission::Pass { probe } => {
                assert!(!too_large, "#{id} ({class:?}) needs {need:?}, more than it may ever take, yet passed");
                assert_eq!(*probe, None);
                if decision.readout.is_none() {
                    // Served from the worker's lease, with no shared-data call.
                    assert_eq!(own, [0; 4], "#{id} served from the lease ahead of its own worker's waiters");
                    self.requests.spend_lease(id, worker, class, 1);
                    if let Some(n) = need {
                        self.tokens[usize::from(n.bucket)].spend_lease(id, worker, class, n.tokens);
                    }
                    self.stats.from_lease += 1;
                } else {
                    self.take(id, class, need, now_ns);
                    self.lease_out(worker, id, need, (before, after), quiet);
                }
                self.admitted[worker] += 1;
                self.in_flight.push(Flight { worker, id, need });
            }
            Admission::Wait { shed } => {
                assert!(!too_large, "#{id} ({class:?}) needs {need:?}, more than it may ever take, yet waits");
                assert!(self.workers[worker].is_waiting(id));
                // Waiting writes the request bucket's refill, and takes nothing.
                self.requests.store = self.requests.refill(self.requests.store, now_ns);
                if let Some(r) = shed {
                    assert_eq!(r.reason, Reason::Shed);
                    assert!(r.retry);
                    let victim = self.waiting.get(&r.id).unwrap_or_else(|| panic!("shed #{}, not waiting", r.id));
                    assert_eq!((victim.worker, victim.class), (worker, r.class), "shed #{} from elsewhere", r.id);
                    let lowest = self.waiting.values().filter(|v| v.worker == worker).map(|v| v.class).max();
                    assert!(r.class > class && Some(r.class) == lowest, "{:?} shed for {class:?}", r.class);
                    let newest = self.waiting.iter().rfind(|(_, v)| v.worker == worker && v.class == r.class);
                    assert_eq!(newest.map(|(i, _)| *i), Some(r.id), "shed a waiter that was not the newest");
                    self.waiting.remove(&r.id);
                }
                let deadline_ms = clock_ms + self.workers[worker].config.class(class).max_wait_ms;
                self.waiting.insert(id, Waiting { worker, class, need, deadline_ms });
            }
            Admission::Refuse(r) => {
                assert_eq!((r.id, r.class), (id, class));
                assert!(!self.workers[worker].is_waiting(id));
                if too_large {
                    assert_eq!(r.reason, Reason::TooLarge, "#{id} ({class:?}) needs {need:?}");
                    assert!(!r.retry, "a too-large request is told to retry");
                } else {
                    assert_ne!(r.reason, Reason::TooLarge, "#{id} ({class:?}) needs {need:?}, which fits");
                    assert!(r.retry);
                }
            }
        }
        Some(admission)
    }

    fn answer(&mut self, pick: usize, usage: Usage) {
        let f = self.in_flight.remove(pick % self.in_flight.len());
        let Some(need) = f.need else { return };
        let actual = usage.actual(need.tokens);
        self.workers[f.worker].settle(need, &used(actual));
        self.tokens[usize::from(need.bucket)].settle(f.worker, need.tokens, actual);
    }

    fn run(&mut self, e: &Event) {
        match *e {
            Event::Arrive { worker, class, need } => {
                self.arrive(worker, Priority::ALL[class], need);
            }
            Event::Burst { worker, class, need, n } => {
                for _ in 0..n {
                    self.arrive(worker, Priority::ALL[class], need);
                    self.check();
                }
            }
            Event::Tick { worker } => {
                self.tick(worker);
            }
            Event::TickAll => {
                let mut lost = false;
                for w in 0..self.workers.len() {
                    lost |= self.tick(w);
                }
                // Writes lost on purpose this round are healed by the next one.
                if !lost {
                    self.check_counts();
                    self.check_no_leases();
                }
            }
            Event::Advance { ms } => self.now += ms,
            Event::Answer { pick, usage } if !self.in_flight.is_empty() => self.answer(pick, usage),
            Event::Disconnect { pick } if !self.waiting.is_empty() => {
                let id = *self.waiting.keys().nth(pick % self.waiting.len()).unwrap();
                let v = self.waiting.remove(&id).unwrap();
                let now_ns = self.clock_ms(v.worker) * MS;
                let left = self.workers[v.worker].leave(&self.store, id, Instant::from_nanos(now_ns)).map(|(c, _)| c);
                assert_eq!(left, Some(v.class), "waiter #{id} was not queued");
            }
            Event::Disconnect { pick } if !self.in_flight.is_empty() => {
                // The client of an admitted request goes: nothing waits, nothing changes.
                let f = &self.in_flight[pick % self.in_flight.len()];
                let now_ns = self.clock_ms(f.worker) * MS;
                assert!(
                    self.workers[f.worker].leave(&self.store, f.id, Instant::from_nanos(now_ns)).is_none(),
                    "#{} left, not waiting",
                    f.id
                );
            }
            Event::Conflicts { n } => self.store.conflicts.set(n),
            _ => {}
        }
        self.check();
    }

    /// Ticks `worker`; true if a shared-data write failed.
    fn tick(&mut self, worker: usize) -> bool {
        let clock_ms = self.clock_ms(worker);
        let now_ns = clock_ms * MS;
        let w = &mut self.workers[worker];
        let (held, before) = (w.holds_bucket_lease(), holding(w.bucket_lease()));
        assert!(!held || w.needs_tick(), "worker {worker} holds a lease and says it needs no tick");
        let t = w.tick(&self.store, Instant::from_nanos(now_ns));
        // BucketLease and settlements go back first, in one write that refills every bucket: all of
        // them, or none and an error.
        if held && !w.holds_bucket_lease() {
            self.requests.write_back(worker, now_ns);
            for ledger in &mut self.tokens {
                ledger.write_back(worker, now_ns);
            }
            self.stats.write_backs += 1;
        } else {
            assert_eq!(
                holding(w.bucket_lease()),
                before,
                "worker {worker}'s tick changed its lease without writing it"
            );
            assert!(!held || !t.errors.is_empty(), "worker {worker}'s tick kept its lease, reporting no failure");
            self.stats.kept += u32::from(held);
        }
        // The next lease is sized by the admissions since the last tick.
        self.lease_size[worker] = (self.admitted[worker] + 1).min(self.max_lease);
        self.admitted[worker] = 0;
        // The queue expires its waiters before it releases any.
        for r in &t.expired {
            let v = self.waiting.remove(&r.id).unwrap_or_else(|| panic!("expired #{}, not waiting", r.id));
            assert_eq!((v.worker, v.class, r.reason), (worker, r.class, Reason::Expired));
            assert!(v.deadline_ms <= clock_ms, "#{} expired {} ms early", r.id, v.deadline_ms - clock_ms);
            assert!(r.retry);
        }
        for r in &t.released {
            let v = self.waiting.remove(&r.id).unwrap_or_else(|| panic!("released #{}, not waiting", r.id));
            assert_eq!((v.worker, v.class), (worker, r.class), "released #{} from elsewhere", r.id);
            assert_eq!(r.probe, None);
            assert!(v.deadline_ms > clock_ms, "#{} released past its deadline", r.id);
            let older = self.waiting.range(..r.id).find(|(_, o)| o.worker == worker && o.class == r.class);
            assert!(older.is_none(), "#{} ({:?}) released before #{} of its class", r.id, r.class, older.unwrap().0);
            self.take(r.id, r.class, v.need, now_ns);
            self.in_flight.push(Flight { worker, id: r.id, need: v.need });
        }
        // A tick that could write stops only when no class's oldest waiter has what it needs.
        if t.errors.is_empty() {
            for class in Priority::ALL {
                let oldest = self.waiting.iter().find(|(_, v)| v.worker == worker && v.class == class);
                if let Some((id, v)) = oldest {
                    let fits = self.requests.has(class, 1, now_ns)
                        && v.need.is_none_or(|n| self.tokens[usize::from(n.bucket)].has(class, n.tokens, now_ns));
                    assert!(!fits, "the tick left #{id} ({class:?}) waiting with what it needs there");
                }
            }
        }
        for (id, v) in &self.waiting {
            if v.worker == worker {
                assert!(
                    v.deadline_ms > clock_ms,
                    "#{id} still paused {} ms past its deadline",
                    clock_ms - v.deadline_ms
                );
            }
        }
        !t.errors.is_empty()
    }

    fn shared(&self) -> SharedBucket {
        store::read(&self.store, self.workers[0].bucket_key()).unwrap().unwrap()
    }

    /// The queues hold exactly the waiters that exist; the levels and balances are the ledger's.
    fn check(&self) {
        for (k, w) in self.workers.iter().enumerate() {
            let mut counts = [0u32; 4];
            for (id, v) in self.waiting.iter().filter(|(_, v)| v.worker == k) {
                assert!(w.is_waiting(*id), "waiter #{id} lost without an answer");
                counts[v.class.index()] += 1;
            }
            assert_eq!(w.local_counts(), counts, "worker {k} queues other waiters than exist");
        }
        let shared = self.shared();
        let now_ns = (self.now + MAX_SKEW_MS) * MS;
        let elapsed_s = (now_ns - START_MS * MS) as f64 / 1e9;
        let held: Vec<Holding> = self.workers.iter().map(|w| holding(w.bucket_lease())).collect();
        let requests: Vec<f64> = held.iter().map(|h| h.0).collect();
        self.requests.check(shared.level, &requests, &vec![0.0; held.len()], elapsed_s, now_ns);
        assert_eq!(shared.token_levels.len(), self.tokens.len());
        for (i, (ledger, level)) in self.tokens.iter().zip(&shared.token_levels).enumerate() {
            let leased: Vec<f64> = held.iter().map(|h| h.1[i]).collect();
            let settled: Vec<f64> = held.iter().map(|h| h.2[i]).collect();
            ledger.check(*level, &leased, &settled, elapsed_s, now_ns);
        }
    }

    /// Every worker has just ticked: the shared counts are exactly the waiters that exist.
    fn check_counts(&self) {
        let shared = self.shared().waiting(u64::MAX, [0; 4], Instant::from_millis(self.now));
        let mut local = [0u32; 4];
        for w in &self.workers {
            for (l, c) in local.iter_mut().zip(w.local_counts()) {
                *l += c;
            }
        }
        assert_eq!(shared, local, "shared waiter counts drifted from the queues");
    }

    /// Every worker has just ticked with no failed write: every lease and settlement is back in
    /// the store, which alone is the ledger.
    fn check_no_leases(&self) {
        for (k, w) in self.workers.iter().enumerate() {
            assert!(!w.holds_bucket_lease(), "worker {k} still holds {:?} after a tick that wrote", w.bucket_lease());
        }
        let shared = self.shared();
        let now_ns = (self.now + MAX_SKEW_MS) * MS;
        let levels = std::iter::once((&self.requests, shared.level)).chain(self.tokens.iter().zip(shared.token_levels));
        for (ledger, level) in levels {
            assert!(
                ledger.leased.iter().chain(&ledger.settled).all(|&h| h == 0.0),
                "{}: the ledger still holds {:?} leased, {:?} settled",
                ledger.name,
                ledger.leased,
                ledger.settled
            );
            let (stored, model) = (ledger.refill(level, now_ns).tokens, ledger.refill(ledger.store, now_ns).tokens);
            assert!(
                (stored - model).abs() <= 1e-6,
                "{}: with no lease out the store holds {stored}, the decisions reported leave {model}",
                ledger.name
            );
        }
    }
}

fn simulate(workers: usize, setup: Setup, skew: &[u64], events: &[Event]) -> Stats {
    finish(replay(workers, setup, skew, events))
}

/// Runs `events`, checking every property after each.
fn replay(workers: usize, setup: Setup, skew: &[u64], events: &[Event]) -> Sim {
    let mut sim = Sim::new(workers, setup, skew);
    for e in events {
        sim.run(e);
    }
    sim
}

/// Lets every waiter go, every answer in and every lease back, then checks what is left.
fn finish(mut sim: Sim) -> Stats {
    // Settle: time passes past every deadline with every worker ticking and every answer in.
    for _ in 0..40 {
        sim.now += 250;
        sim.store.conflicts.set(0);
        for w in 0..sim.workers.len() {
            sim.tick(w);
        }
        while !sim.in_flight.is_empty() {
            sim.answer(0, Usage::Exact);
        }
        sim.check();
    }
    assert!(sim.waiting.is_empty(), "waiters stranded after every deadline: {:?}", sim.waiting.keys());
    sim.run(&Event::TickAll);
    sim.check_counts();
    sim.check_no_leases();
    // Once the buckets have refilled (debts too: paid back whole), the most a class may take
    // passes at once from each.
    let now_ns = (sim.now + MAX_SKEW_MS) * MS;
    let refill_ms =
        sim.tokens.iter().map(|l| (l.max - l.refill(l.store, now_ns).tokens) / l.rate * 1000.0).fold(0.0, f64::max);
    sim.now += refill_ms.ceil() as u64 + 20_000;
    for (bucket, class) in [(0u8, Priority::Critical), (0, Priority::Normal), (1, Priority::Low), (2, Priority::High)] {
        let tokens = sim.tokens[usize::from(bucket)].limit(class) as u64;
        let need = Some(TokenNeed { bucket, tokens, input: 0 });
        let a = sim.arrive(bucket as usize % sim.workers.len(), class, need);
        assert_eq!(a, Some(Admission::Pass { probe: None }), "{class:?} needing {need:?} from full buckets");
        sim.answer(0, Usage::Exact);
        sim.now += 20_000;
        sim.check();
    }
    sim.stats
}

fn cases() -> u32 {
    std::env::var("SIM_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(500)
}

fn seed() -> RngSeed {
    RngSeed::Fixed(std::env::var("SIM_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(0x7_0c3e_5eed))
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: cases(),
        rng_seed: seed(),
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn token_admission_keeps_its_ledger_under_any_interleaving(
        (workers, events) in (2..=4usize).prop_flat_map(|w| (Just(w), vec(event(w), 1..150))),
        setup in setup(),
        skew in vec(0..=MAX_SKEW_MS, 3),
    ) {
        simulate(workers, setup, &skew, &events);
    }
}

fn arrive(worker: usize, class: Priority, need: Option<(u8, u64)>) -> Event {
    let need = need.map(|(bucket, tokens)| TokenNeed { bucket, tokens, input: 0 });
    Event::Arrive { worker, class: class.index(), need }
}

/// Leases on, a roomy request bucket, the provider token bucket with a burst of `GEN_BURST`.
const LEASING: Setup = Setup { requests: ROOMY, burst: GEN_BURST, max_lease: None };

/// The leased path the properties cover is there: a lease is taken, spent, kept through a lost
/// write back, then written back.
#[test]
fn the_simulation_takes_spends_and_returns_leases() {
    let events = [
        Event::Burst { worker: 0, class: 0, need: None, n: 3 },
        Event::Tick { worker: 0 },
        // The first takes a lease of 3 requests and 118 tokens, which serves the next two.
        Event::Burst { worker: 0, class: 0, need: Some(TokenNeed { bucket: 0, tokens: 50, input: 0 }), n: 4 },
        Event::Conflicts { n: 32 },
        Event::Tick { worker: 0 },
        Event::TickAll,
    ];
    let stats = simulate(2, LEASING, &[0, 0, 0], &events);
    assert!(stats.leases >= 1 && stats.from_lease >= 2, "{stats:?}");
    assert!(stats.kept >= 1 && stats.write_backs >= 1, "{stats:?}");
}

// Regressions: a worker's leased tokens and its unwritten settlements were once one balance,
// and `take_from_lease` spent either: a refund admitted requests no check of the shared bucket
// would. Each schedule below leaves worker 0 holding a lease of one request (no LLM tokens) and
// a refund; the request that follows must be decided by the shared bucket, not by the refund.

/// Runs `events`, then `need` arriving on worker 0 as `class`: its decision.
fn after_a_refund(events: &[Event], class: Priority, need: (u8, u64)) -> (Sim, Option<Admission>) {
    let mut sim = replay(2, LEASING, &[0, 0, 0], events);
    let lease = sim.workers[0].bucket_lease();
    assert_eq!(lease.requests, 1.0, "{lease:?}");
    assert!(lease.tokens.iter().all(|&t| t == 0.0) && lease.settled[0] > 0.0, "{lease:?}");
    let a = sim.arrive(0, class, Some(TokenNeed { bucket: need.0, tokens: need.1, input: 0 }));
    sim.check();
    (sim, a)
}

/// CRITICAL takes all 1300 tokens and fails: a 1300 refund waits on worker 0, which then leases
/// one request. A NORMAL request needing 1200 (it may never take more than 1000) is refused as
/// too large, not let through from the refund.
#[test]
fn a_refund_held_for_the_tick_lets_no_too_large_request_through() {
    let events = [
        arrive(0, Priority::Critical, Some((0, 1300))),
        Event::Tick { worker: 0 },
        Event::Answer { pick: 0, usage: Usage::Failed },
        arrive(0, Priority::Critical, None),
    ];
    let (sim, a) = after_a_refund(&events, Priority::Normal, (0, 1200));
    assert!(matches!(a, Some(Admission::Refuse(r)) if r.reason == Reason::TooLarge), "{a:?}");
    finish(sim);
}

/// CRITICAL takes all 1300 tokens and uses 300: a 1001 refund waits on worker 0, which then
/// leases one request. A NORMAL request needing 1000 is refused (`token_limit`, 6.5 s to wait
/// for its 1000 above the 300 only CRITICAL and HIGH may spend, longer than it may wait), not
/// let through from the refund, which would have left nothing of those 300.
#[test]
fn a_refund_held_for_the_tick_is_not_spent_below_the_class_floor() {
    let events = [
        arrive(0, Priority::Critical, Some((0, 1300))),
        Event::Tick { worker: 0 },
        Event::Answer { pick: 0, usage: Usage::Off(-77) },
        arrive(0, Priority::Critical, None),
    ];
    let (sim, a) = after_a_refund(&events, Priority::Normal, (0, 1000));
    assert!(matches!(a, Some(Admission::Refuse(r)) if r.reason == Reason::TokenLimit), "{a:?}");
    finish(sim);
}

/// Worker 1 writes a 2000-token overrun back: the bucket is 800 in debt. Worker 0 holds a 100
/// refund and leases one request. A CRITICAL request needing 100 is refused (`token_limit`, 4.5 s
/// to refill the debt and its 100, longer than it may wait), not let through from the refund.
#[test]
fn a_refund_held_for_the_tick_is_not_spent_while_the_bucket_is_in_debt() {
    let events = [
        arrive(0, Priority::Critical, Some((0, 100))),
        arrive(1, Priority::Critical, Some((0, 0))),
        Event::Tick { worker: 0 },
        Event::Answer { pick: 1, usage: Usage::Over(2000) },
        Event::Tick { worker: 1 },
        Event::Answer { pick: 0, usage: Usage::Failed },
        arrive(0, Priority::Critical, None),
    ];
    let (sim, a) = after_a_refund(&events, Priority::Critical, (0, 100));
    assert!(matches!(a, Some(Admission::Refuse(r)) if r.reason == Reason::TokenLimit), "{a:?}");
    finish(sim);
}

/// Worker 0's tick writes a 10-token refund back, then expires its NORMAL waiter: the shared
/// counts must lose it by the end of that tick, not the next (here they were left at [1, 0, 1, 0]).
#[test]
fn a_tick_that_writes_a_settlement_back_still_publishes_its_waiters() {
    let events = [
        arrive(0, Priority::Critical, Some((0, 1000))),
        arrive(0, Priority::Normal, Some((0, 100))),
        Event::Answer { pick: 0, usage: Usage::Off(-1) },
        Event::Advance { ms: 2000 },
        arrive(0, Priority::Critical, Some((0, 900))),
        Event::TickAll,
    ];
    simulate(2, Setup { requests: ROOMY, burst: 0, max_lease: Some(1) }, &[0, 0, 0], &events);
}

/// Worker 0 holds a CRITICAL waiter the tokens cannot serve for 3.5 s, and writes a settlement
/// back on each tick: each tick must still refresh its waiter count, or after `LIVE_MS` the
/// waiter no longer counts anywhere (here the shared counts were [0, 0, 0, 0]).
#[test]
fn a_tick_that_writes_a_settlement_back_still_refreshes_its_waiters() {
    let events = [
        arrive(0, Priority::Critical, Some((0, 1000))),
        Event::Burst { worker: 0, class: 0, need: Some(TokenNeed { bucket: 2, tokens: 10, input: 0 }), n: 2 },
        arrive(0, Priority::Critical, Some((0, 700))),
        Event::Advance { ms: 600 },
        Event::Answer { pick: 1, usage: Usage::Failed },
        Event::TickAll,
        Event::Advance { ms: 600 },
        Event::Answer { pick: 1, usage: Usage::Failed },
        Event::TickAll,
    ];
    simulate(2, Setup { requests: ROOMY, burst: 0, max_lease: Some(1) }, &[0, 0, 0], &events);
}

// The overrun scenario, measured end to end: a token bucket of 3000 refilled at 1000/s, and every
// 7 s a burst of 40 concurrent requests that each reserve 60 tokens and use 1500. Written off at
// one bucket per write back, the debt let 180,000 tokens through in 21 s.

/// The provider token bucket of the overrun scenario: `(capacity, refill_rate)`.
const OVERRUN_BUCKET: (u64, f64) = (3_000, 1_000.0);
/// Each request reserves this many tokens and uses `OVERRUN_USED`.
const OVERRUN_NEED: u64 = 60;
const OVERRUN_USED: u64 = 1_500;
const OVERRUN_BURST: usize = 40;
const OVERRUN_EVERY_MS: u64 = 7_000;
/// Bursts in one run: 63 s of traffic.
const OVERRUN_BURSTS: usize = 9;
/// Every worker ticks this often (`queue.tick_ms`'s default).
const OVERRUN_TICK_MS: u64 = 10;
/// An admitted request's answer is over this long after it went (at most).
const OVERRUN_MAX_ANSWER_MS: u64 = 3_000;

/// One request of the overrun scenario: its worker, its arrival within its burst and how long its
/// answer takes once it goes.
#[derive(Clone, Copy, Debug)]
struct OverrunRequest {
    worker: usize,
    jitter_ms: u64,
    answer_ms: u64,
}

/// What one run of the overrun scenario let through.
struct OverrunRun {
    /// Per admitted request: when it went (simulated ms since the start) and the tokens it used.
    admitted: Vec<(u64, u64)>,
    /// Per `OVERRUN_TICK_MS` step: the LLM tokens every worker held leased at its start.
    leased: Vec<f64>,
    /// The largest underestimate not yet written back to the store (requests in flight, or
    /// settled on a worker that has not ticked since), counted at each admission, that one
    /// included.
    unwritten: f64,
}

fn overrun_config(max_lease: Option<u64>) -> Config {
    let (capacity, rate) = OVERRUN_BUCKET;
    let max_lease = max_lease.map_or_else(String::new, |m| format!(r#","max_lease":{m}"#));
    let json = format!(
        r#"{{"bucket":{{"capacity":1000,"refill_rate":1000,"burst_allowance":0{max_lease}}},
            "tokens":{{"capacity":{capacity},"refill_rate":{rate}}}}}"#
    );
    Config::parse(json.as_bytes()).unwrap()
}

/// Replays the overrun scenario: `requests[k * OVERRUN_BURST + i]` is the `i`th request of burst
/// `k`. Every worker ticks every `OVERRUN_TICK_MS`, reading its clock `skew` ahead.
fn overrun(workers: usize, skew: &[u64], max_lease: Option<u64>, requests: &[OverrunRequest]) -> OverrunRun {
    let config = overrun_config(max_lease);
    let mut ws: Vec<Worker> = (0..workers).map(|i| Worker::new(config.clone(), 2000 + i as u64)).collect();
    let store = MemStore::default();
    ws[0].ensure_shared(&store, Instant::from_nanos(START_MS * MS)).unwrap();
    let clock_ns = |k: usize, t: u64| (START_MS + t + skew[k]) * MS;
    let need = TokenNeed { bucket: 0, tokens: OVERRUN_NEED, input: 0 };
    let under = (OVERRUN_USED - OVERRUN_NEED) as f64;
    // Answers due: (at ms, worker, request); waiting requests: id -> request.
    let mut answers: Vec<(u64, usize, usize)> = Vec::new();
    let mut waiting: BTreeMap<u32, usize> = BTreeMap::new();
    // Per worker: underestimates settled there and not written back yet.
    let mut settled = vec![0.0f64; workers];
    let mut in_flight = 0.0f64;
    let mut run = OverrunRun { admitted: Vec::new(), leased: Vec::new(), unwritten: 0.0 };
    // Past the last burst's longest wait (NORMAL's 30 s) and its answer.
    let end_ms = OVERRUN_EVERY_MS * OVERRUN_BURSTS as u64 + 30_000 + OVERRUN_MAX_ANSWER_MS + OVERRUN_TICK_MS;
    let admit = |run: &mut OverrunRun, in_flight: &mut f64, settled: &[f64], answers: &mut Vec<_>, k, r, t| {
        let req: &OverrunRequest = &requests[r];
        *in_flight += under;
        run.unwritten = run.unwritten.max(*in_flight + settled.iter().sum::<f64>());
        run.admitted.push((t, OVERRUN_USED));
        answers.push((t + req.answer_ms, k, r));
    };
    for step in 0..end_ms / OVERRUN_TICK_MS {
        let t = step * OVERRUN_TICK_MS;
        run.leased.push(ws.iter().map(|w| w.bucket_lease().tokens.iter().sum::<f64>()).sum());
        for (r, req) in requests.iter().enumerate() {
            let at = (r / OVERRUN_BURST) as u64 * OVERRUN_EVERY_MS + req.jitter_ms;
            if at / OVERRUN_TICK_MS != step {
                continue;
            }
            let k = req.worker % workers;
            let id = r as u32 + 1;
            let arrival = Arrival { id, class: Priority::Normal, tenant: None, need: Some(need), gate: Gate::Pass };
            let d = ws[k].admit(&store, arrival, Instant::from_nanos(clock_ns(k, t))).unwrap();
            match d.admission {
                Admission::Pass { .. } => admit(&mut run, &mut in_flight, &settled, &mut answers, k, r, t),
                Admission::Wait { shed } => {
                    assert!(shed.is_none());
                    waiting.insert(id, r);
                }
                Admission::Refuse(_) => {}
            }
        }
        answers.retain(|&(at, k, _)| {
            if at > t {
                return true;
            }
            ws[k].settle(need, &used(OVERRUN_USED));
            in_flight -= under;
            settled[k] += under;
            false
        });
        for k in 0..workers {
            let tick = ws[k].tick(&store, Instant::from_nanos(clock_ns(k, t)));
            assert!(tick.errors.is_empty(), "{:?}", tick.errors);
            settled[k] = 0.0;
            for e in &tick.expired {
                waiting.remove(&e.id).expect("expired a request that was not waiting");
            }
            for rel in &tick.released {
                let r = waiting.remove(&rel.id).expect("released a request that was not waiting");
                admit(&mut run, &mut in_flight, &settled, &mut answers, k, r, t);
            }
        }
    }
    assert!(answers.is_empty() && waiting.is_empty());
    run
}

/// Tokens a run's requests that went in `[from_ms, to_ms)` used.
fn used_between(run: &OverrunRun, from_ms: u64, to_ms: u64) -> u64 {
    run.admitted.iter().filter(|(t, _)| (from_ms..to_ms).contains(t)).map(|(_, used)| used).sum()
}

/// Checks the bound on every window of a run, at `OVERRUN_TICK_MS` × 10 steps.
///
/// The bound: the tokens used by requests that went in a window `[a, b)` are at most `capacity +
/// refill_rate × (b - a + skew) + leased(a) + U`. Why: let `t` be the last admission in the
/// window. Each admission takes its reservation from the shared level (or from a lease its
/// worker took from it earlier, held at `a` or taken since) and leaves that level at or above 0;
/// an overrun written back only lowers it, and nothing forgives a debt. So the reservations of
/// the window's requests plus the overruns of theirs written back by `t` are at most what the
/// level held at `a` (at most `capacity`), plus what workers held leased at `a`, plus the refill
/// until `t` (read on clocks up to `skew` apart). What is left is the overrun of the window's
/// requests not written back at `t`: requests in flight, or answered on a worker that has not
/// ticked since, at most `U`, the largest such sum at any admission. Answers take at most 3 s
/// and bursts come 7 s apart, so `U` is at most one burst's underestimate, 40 × (1500 − 60) =
/// 57,600, which the run checks too. Before debts were carried whole, a debt beyond one bucket
/// was forgiven at each write back, and nothing bounded the window but the bursts' own size.
fn check_overrun(run: &OverrunRun, max_skew_ms: u64) {
    let (capacity, rate) = OVERRUN_BUCKET;
    let burst_under = OVERRUN_BURST as f64 * (OVERRUN_USED - OVERRUN_NEED) as f64;
    assert!(run.unwritten <= burst_under, "{} underestimated tokens unwritten at once", run.unwritten);
    let grid = OVERRUN_TICK_MS * 10;
    let cells = run.leased.len() / 10;
    // used[i]: tokens used by requests that went before cell i.
    let mut used = vec![0u64; cells + 1];
    for &(t, u) in &run.admitted {
        if let Some(c) = used.get_mut((t / grid) as usize + 1) {
            *c += u;
        }
    }
    for i in 1..used.len() {
        used[i] += used[i - 1];
    }
    for a in 0..cells {
        let leased = run.leased[a * 10];
        for b in a + 1..=cells {
            let in_window = (used[b] - used[a]) as f64;
            let ms = (b - a) as u64 * grid + max_skew_ms;
            let bound = capacity as f64 + rate * ms as f64 / 1000.0 + leased + burst_under;
            assert!(
                in_window <= bound,
                "{in_window} tokens used by requests that went in [{}, {}) ms, more than {bound}",
                a as u64 * grid,
                b as u64 * grid
            );
        }
    }
}

fn overrun_requests() -> impl Strategy<Value = Vec<OverrunRequest>> {
    vec(
        (0..4usize, 0..50u64, 100..=OVERRUN_MAX_ANSWER_MS).prop_map(|(worker, jitter_ms, answer_ms)| OverrunRequest {
            worker,
            jitter_ms,
            answer_ms,
        }),
        OVERRUN_BURST * OVERRUN_BURSTS,
    )
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: cases().div_ceil(25),
        rng_seed: seed(),
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    /// Requests that use far more than they reserved are paid back before more of their bucket
    /// passes: over any window, what they use stays within the bucket, its refill and one
    /// burst's underestimate (see [`check_overrun`]).
    #[test]
    fn overruns_are_paid_back_before_more_passes(
        workers in 2..=4usize,
        skew in vec(0..=MAX_SKEW_MS, 4),
        max_lease in prop_oneof![Just(Some(1u64)), Just(Some(4)), Just(None)],
        requests in overrun_requests(),
    ) {
        let run = overrun(workers, &skew, max_lease, &requests);
        check_overrun(&run, *skew.iter().max().unwrap());
    }
}

/// The measured case: four workers, leases on, the bursts' requests spread round robin and
/// answered within 0.1 to 3 s. In the first 21 s, at most `3000 + 21 × 1000 + 57,600` (81,600)
/// tokens may be used; one burst's 60,000 are.
#[test]
fn the_measured_overrun_stays_within_its_bound() {
    let requests: Vec<OverrunRequest> = (0..OVERRUN_BURST * OVERRUN_BURSTS)
        .map(|r| OverrunRequest { worker: r % 4, jitter_ms: (r % 5) as u64, answer_ms: 100 + (r as u64 * 73) % 2_900 })
        .collect();
    let run = overrun(4, &[0, 0, 0, 0], None, &requests);
    let used = used_between(&run, 0, 21_000);
    eprintln!("overrun: {used} tokens used by requests that went in the first 21 s (bound 81,600)");
    assert!(used <= 81_600, "{used} tokens used in 21 s");
    check_overrun(&run, 0);
}
