//! Deterministic simulation of token-limit admission: several workers share one store while a
//! seeded random schedule interleaves arrivals needing LLM tokens (from the provider token bucket
//! or a per-model one, some larger than a class may ever take), ticks, clock advances, answers
//! that settle each admitted request (exact, failed, under or over its estimate, some far over),
//! client disconnects and lost CAS writes. Each worker reads the clock a few ms apart from the
//! others. proptest shrinks a failing schedule to a short, readable list of events.
//!
//! A reference ledger replays, per bucket, exactly what the decisions the workers reported must
//! have done to the shared levels: each admission (on arrival or released by a tick) takes one
//! request token and its need, each successful reconcile gives back `need - actual` (or takes the
//! excess), clamped to one bucket either way. Properties, checked after every event:
//! - every admission had its request token and its LLM tokens above its class's floor;
//! - the store's levels equal the ledger's (a need taken twice, or never, shows at once);
//! - the tokens spent (the need of every admitted request while unsettled, its actual use once
//!   answered) stay within `max + refill_rate × elapsed + the excess charged after the fact`,
//!   and so does `spent + level` (see [`Ledger::check`] for why both must hold);
//! - admitted requests stay within the request bucket the same way;
//! - a need larger than its class may ever take is refused at once as `too_large`, never to
//!   retry, and nothing else is;
//! - within one class on one worker, releases go in arrival order; a shed waiter is the newest
//!   of the least important class below the arrival's; no waiter expires early, and none is
//!   still paused past its deadline once its worker has ticked;
//! - a tick whose writes all went through leaves no class's oldest waiter behind while what it
//!   needs is there;
//! - the workers' queues hold exactly the waiters that exist, and once every worker has ticked
//!   the shared waiter counts equal them.
//!
//! At the end time passes with every worker ticking: no waiter is left, and once the buckets
//! have refilled, a request as large as its class may take passes at once from each bucket.
//!
//! `SIM_CASES` sets the number of schedules (500 by default), `SIM_SEED` the seed.

use llm_ratelimit::admission::{Need, SharedBucket};
use llm_ratelimit::breaker::Gate;
use llm_ratelimit::bucket::Level;
use llm_ratelimit::config::Config;
use llm_ratelimit::priority::Priority;
use llm_ratelimit::reply::Reason;
use llm_ratelimit::store::{self, MemStore};
use llm_ratelimit::worker::{Admission, Worker};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::test_runner::RngSeed;
use std::collections::BTreeMap;

const START_MS: u64 = 1_700_000_000_000;
const MS: u64 = 1_000_000;
/// The request bucket.
const REQ_CAPACITY: u64 = 8;
const REQ_REFILL: f64 = 4.0;
const REQ_BURST: u64 = 2;
/// The provider token bucket (its burst is 0 or `GEN_BURST`, per schedule).
const CAPACITY: u64 = 1_000;
const REFILL: f64 = 200.0;
const GEN_BURST: u64 = 300;
/// The per-model buckets, in model-name order: `Need::bucket` 1 is "a", 2 is "b".
const MODELS: [(u64, f64); 2] = [(400, 50.0), (150, 20.0)];
/// Workers read the wall clock up to this far ahead of worker 0 (less than the bucket's jitter
/// allowance: never a clock step).
const MAX_SKEW_MS: u64 = 50;

fn config(burst: u64) -> Config {
    let [(a_cap, a_rate), (b_cap, b_rate)] = MODELS;
    let json = format!(
        r#"{{"bucket":{{"capacity":{REQ_CAPACITY},"refill_rate":{REQ_REFILL},"burst_allowance":{REQ_BURST}}},
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
    /// This many tokens more than its estimate (far more clamps the debt at one bucket).
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
        need: Option<Need>,
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

fn need() -> impl Strategy<Value = Option<Need>> {
    prop_oneof![
        1 => Just(None),
        6 => tokens(CAPACITY, GEN_BURST).prop_map(|tokens| Some(Need { bucket: 0, tokens })),
        2 => tokens(MODELS[0].0, 0).prop_map(|tokens| Some(Need { bucket: 1, tokens })),
        2 => tokens(MODELS[1].0, 0).prop_map(|tokens| Some(Need { bucket: 2, tokens })),
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
        4 => (0..workers).prop_map(|worker| Event::Tick { worker }),
        1 => Just(Event::TickAll),
        3 => (1..1_500u64).prop_map(|ms| Event::Advance { ms }),
        5 => (0..64usize, usage()).prop_map(|(pick, usage)| Event::Answer { pick, usage }),
        1 => (0..64usize).prop_map(|pick| Event::Disconnect { pick }),
        1 => (1..40u32).prop_map(|n| Event::Conflicts { n }),
    ]
}

/// One bucket as the decisions reported say it must be, and what was spent from it.
struct Ledger {
    name: &'static str,
    max: f64,
    burst: f64,
    rate: f64,
    /// The level replayed from the decisions (same arithmetic as the bucket: refill, then take
    /// or settle).
    model: Level,
    /// Tokens spent: the need of every admitted request while unsettled, its actual once settled.
    spent: f64,
    /// Tokens charged after the fact: the sum of `max(0, actual - need)` over settled requests.
    excess: f64,
}

impl Ledger {
    fn new(name: &'static str, capacity: u64, rate: f64, burst: u64) -> Ledger {
        let max = (capacity + burst) as f64;
        Ledger {
            name,
            max,
            burst: burst as f64,
            rate,
            model: Level { tokens: max, at_ns: START_MS * MS },
            spent: 0.0,
            excess: 0.0,
        }
    }

    /// `l` brought forward to `now_ns`: nothing for a clock a moment behind the last writer.
    fn refill(&self, l: Level, now_ns: u64) -> Level {
        if now_ns <= l.at_ns {
            return l;
        }
        let elapsed = (now_ns - l.at_ns) as f64 / 1e9;
        Level { tokens: (l.tokens + elapsed * self.rate).min(self.max), at_ns: now_ns }
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

    /// Whether `n` is there for `class` at `now_ns`.
    fn has(&self, class: Priority, n: u64, now_ns: u64) -> bool {
        self.refill(self.model, now_ns).tokens - n as f64 >= self.floor(class) - 1e-9
    }

    /// Request `id` of `class` was admitted at `now_ns` taking `n`: it must have been there.
    fn take(&mut self, id: u32, class: Priority, n: u64, now_ns: u64) {
        let l = self.refill(self.model, now_ns);
        let floor = self.floor(class);
        assert!(
            l.tokens - n as f64 >= floor - 1e-9,
            "{}: #{id} ({class:?}) admitted taking {n} with {} left (its floor is {floor})",
            self.name,
            l.tokens
        );
        self.model = Level { tokens: l.tokens - n as f64, ..l };
        self.spent += n as f64;
    }

    /// A request that took `need` used `actual`; `applied` if the reconcile was written.
    fn settle(&mut self, need: u64, actual: u64, now_ns: u64, applied: bool) {
        if applied {
            let l = self.refill(self.model, now_ns);
            let tokens = (l.tokens + need as f64 - actual as f64).clamp(-self.max, self.max);
            self.model = Level { tokens, ..l };
        }
        self.spent += actual as f64 - need as f64;
        self.excess += actual.saturating_sub(need) as f64;
    }

    /// Checks the store's `level` against the ledger, `elapsed_s` after the start, at `now_ns`
    /// (the latest any worker's clock has read).
    ///
    /// With S the tokens spent, E the excess charged after the fact and L the level, the bucket
    /// keeps `L = max + rate × t - S - (refill lost to the cap) - (refunds lost to the cap)
    /// + (debt forgiven by the clamp at -max) + (excess of lost reconciles)`; a forgiven debt
    /// is at most its own excess, so `S + L <= max + rate × t + E`. Between takes
    /// `max + rate × t + E - S` only grows (refill; a settle moves S by `actual - need` and E by
    /// at least that), and right after a take it is at least L, which the take left at or above
    /// its floor: so `S <= max + rate × t + E` as well, debt or no debt.
    fn check(&self, level: Level, elapsed_s: f64, now_ns: u64) {
        let stored = self.refill(level, now_ns).tokens;
        let model = self.refill(self.model, now_ns).tokens;
        assert!(
            (stored - model).abs() <= 1e-6,
            "{}: the store holds {stored} tokens, the decisions reported leave {model}",
            self.name
        );
        let allowed = self.max + self.rate * elapsed_s + self.excess;
        assert!(
            self.spent <= allowed + 1e-6,
            "{}: {} tokens spent, more than the {allowed} the bucket allows after {elapsed_s} s",
            self.name,
            self.spent
        );
        assert!(
            self.spent + stored <= allowed + 1e-6,
            "{}: {} tokens spent and {stored} left, more than the {allowed} the bucket allows after {elapsed_s} s",
            self.name,
            self.spent
        );
    }
}

struct Waiting {
    worker: usize,
    class: Priority,
    need: Option<Need>,
    /// On its worker's clock.
    deadline_ms: u64,
}

/// An admitted request whose answer is not over yet.
struct Flight {
    worker: usize,
    id: u32,
    need: Option<Need>,
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
    /// In `Need::bucket` order.
    tokens: Vec<Ledger>,
}

impl Sim {
    fn new(workers: usize, burst: u64, skew: &[u64]) -> Sim {
        let config = config(burst);
        let workers: Vec<Worker> = (0..workers).map(|i| Worker::new(config.clone(), 1000 + i as u64)).collect();
        let store = MemStore::default();
        workers[0].ensure_bucket(&store, START_MS * MS).unwrap();
        let skew = (0..workers.len()).map(|k| if k == 0 { 0 } else { skew[k - 1] }).collect();
        Sim {
            store,
            workers,
            skew,
            now: START_MS,
            next_id: 1,
            waiting: BTreeMap::new(),
            in_flight: Vec::new(),
            requests: Ledger::new("request bucket", REQ_CAPACITY, REQ_REFILL, REQ_BURST),
            tokens: vec![
                Ledger::new("token bucket", CAPACITY, REFILL, burst),
                Ledger::new("model a", MODELS[0].0, MODELS[0].1, 0),
                Ledger::new("model b", MODELS[1].0, MODELS[1].1, 0),
            ],
        }
    }

    fn clock_ms(&self, worker: usize) -> u64 {
        self.now + self.skew[worker]
    }

    /// Request `id` of `class` was let through by `worker` at its `clock_ms`.
    fn admitted(&mut self, worker: usize, id: u32, class: Priority, need: Option<Need>, clock_ms: u64) {
        let now_ns = clock_ms * MS;
        self.requests.take(id, class, 1, now_ns);
        if let Some(n) = need {
            self.tokens[usize::from(n.bucket)].take(id, class, n.tokens, now_ns);
        }
        self.in_flight.push(Flight { worker, id, need });
    }

    fn arrive(&mut self, worker: usize, class: Priority, need: Option<Need>) -> Option<Admission> {
        let id = self.next_id;
        self.next_id += 1;
        let clock_ms = self.clock_ms(worker);
        let too_large = need.is_some_and(|n| n.tokens as f64 > self.tokens[usize::from(n.bucket)].limit(class));
        let w = &mut self.workers[worker];
        let decision = w.admit(&self.store, id, class, None, need, Gate::Pass, clock_ms * MS);
        let Ok(decision) = decision else {
            // Every CAS lost: nothing was written, nothing queued.
            assert!(!w.is_waiting(id), "#{id} queued by an arrival that failed");
            assert!(!too_large, "#{id} too large, yet the bucket was written");
            return None;
        };
        let admission = decision.admission;
        match &admission {
            Admission::Pass { probe } => {
                assert!(!too_large, "#{id} ({class:?}) needs {need:?}, more than it may ever take, yet passed");
                assert_eq!(*probe, None);
                self.admitted(worker, id, class, need, clock_ms);
            }
            Admission::Wait { shed } => {
                assert!(!too_large, "#{id} ({class:?}) needs {need:?}, more than it may ever take, yet waits");
                assert!(self.workers[worker].is_waiting(id));
                // Waiting writes the request bucket's refill, and takes nothing.
                self.requests.model = self.requests.refill(self.requests.model, clock_ms * MS);
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
        let clock_ms = self.clock_ms(f.worker);
        let applied = self.workers[f.worker].reconcile(&self.store, need, actual, clock_ms * MS).is_ok();
        self.tokens[usize::from(need.bucket)].settle(need.tokens, actual, clock_ms * MS, applied);
    }

    fn run(&mut self, e: &Event) {
        match *e {
            Event::Arrive { worker, class, need } => {
                self.arrive(worker, Priority::ALL[class], need);
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
                }
            }
            Event::Advance { ms } => self.now += ms,
            Event::Answer { pick, usage } if !self.in_flight.is_empty() => self.answer(pick, usage),
            Event::Disconnect { pick } if !self.waiting.is_empty() => {
                let id = *self.waiting.keys().nth(pick % self.waiting.len()).unwrap();
                let v = self.waiting.remove(&id).unwrap();
                let now_ns = self.clock_ms(v.worker) * MS;
                let left = self.workers[v.worker].leave(&self.store, id, now_ns).map(|(c, _)| c);
                assert_eq!(left, Some(v.class), "waiter #{id} was not queued");
            }
            Event::Disconnect { pick } if !self.in_flight.is_empty() => {
                // The client of an admitted request goes: nothing waits, nothing changes.
                let f = &self.in_flight[pick % self.in_flight.len()];
                let now_ns = self.clock_ms(f.worker) * MS;
                assert!(
                    self.workers[f.worker].leave(&self.store, f.id, now_ns).is_none(),
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
        let t = self.workers[worker].tick(&self.store, clock_ms * MS);
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
            self.admitted(worker, r.id, r.class, v.need, clock_ms);
        }
        // A tick that could write stops only when no class's oldest waiter has what it needs.
        if t.errors.is_empty() {
            for class in Priority::ALL {
                let oldest = self.waiting.iter().find(|(_, v)| v.worker == worker && v.class == class);
                if let Some((id, v)) = oldest {
                    let now_ns = clock_ms * MS;
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

    /// The queues hold exactly the waiters that exist; the levels are the ledger's.
    fn check(&self) {
        for (k, w) in self.workers.iter().enumerate() {
            let mut counts = [0u32; 4];
            for (id, v) in self.waiting.iter().filter(|(_, v)| v.worker == k) {
                assert!(w.is_waiting(*id), "waiter #{id} lost without an answer");
                counts[v.class.index()] += 1;
            }
            assert_eq!(w.local_counts(), counts, "worker {k} queues other waiters than exist");
        }
        let shared: SharedBucket = store::read(&self.store, &self.workers[0].bucket_key).unwrap().unwrap();
        let now_ns = (self.now + MAX_SKEW_MS) * MS;
        let elapsed_s = (now_ns - START_MS * MS) as f64 / 1e9;
        self.requests.check(shared.level, elapsed_s, now_ns);
        assert_eq!(shared.token_levels.len(), self.tokens.len());
        for (ledger, level) in self.tokens.iter().zip(&shared.token_levels) {
            ledger.check(*level, elapsed_s, now_ns);
        }
    }

    /// Every worker has just ticked: the shared counts are exactly the waiters that exist.
    fn check_counts(&self) {
        let shared: SharedBucket = store::read(&self.store, &self.workers[0].bucket_key).unwrap().unwrap();
        let shared = shared.waiting(u64::MAX, [0; 4], self.now);
        let mut local = [0u32; 4];
        for w in &self.workers {
            for (l, c) in local.iter_mut().zip(w.local_counts()) {
                *l += c;
            }
        }
        assert_eq!(shared, local, "shared waiter counts drifted from the queues");
    }
}

fn simulate(workers: usize, burst: u64, skew: &[u64], events: &[Event]) {
    let mut sim = Sim::new(workers, burst, skew);
    for e in events {
        sim.run(e);
    }
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
    // Once the buckets have refilled, the most a class may take passes at once from each.
    sim.now += 20_000;
    for (bucket, class) in [(0u8, Priority::Critical), (0, Priority::Normal), (1, Priority::Low), (2, Priority::High)] {
        let tokens = sim.tokens[usize::from(bucket)].limit(class) as u64;
        let need = Some(Need { bucket, tokens });
        let a = sim.arrive(bucket as usize % sim.workers.len(), class, need);
        assert_eq!(a, Some(Admission::Pass { probe: None }), "{class:?} needing {need:?} from full buckets");
        sim.answer(0, Usage::Exact);
        sim.now += 20_000;
        sim.check();
    }
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
        burst in prop_oneof![Just(0u64), Just(GEN_BURST)],
        skew in vec(0..=MAX_SKEW_MS, 3),
    ) {
        simulate(workers, burst, &skew, &events);
    }
}
