//! Deterministic simulation of the local and global gates together: several workers over one
//! `MemStore` (the shared bucket, request tokens and LLM tokens, leases on), each with its own
//! `GlobalGate` answered by a rate limit service modelled as a fixed window over one shared count.
//! A seeded random schedule interleaves arrivals (with and without LLM tokens), worker ticks
//! (the queue's releases and expiries, the gate's timeouts and resets), service answers, failed
//! calls (`failure_mode: deny`: the waiters are refused), clients that leave while queued or while
//! waiting for the service, and time passing. proptest shrinks a failing schedule.
//!
//! A request goes the way the host sends it (`host/request.rs`): `Worker::admit` (or a tick's
//! release) takes its local tokens, then the global gate; a refusal by the gate, or a client
//! leaving while it waits for the gate, gives its local tokens back (`Worker::give_back`).
//!
//! Properties, checked after every event:
//! - no request passes without both: every request the global gate lets through had taken its
//!   local token, and each worker's gate passes at most the units the service granted its calls;
//! - no local token is lost or minted: the bucket's request tokens, plus those leased to workers,
//!   plus those held by requests waiting for the global gate, plus those spent by requests that
//!   passed, are what the bucket started with (plus its refill); the same for LLM tokens.

use llm_ratelimit::admission::{SharedBucket, TokenNeed};
use llm_ratelimit::config::Config;
use llm_ratelimit::global::gate::{Ask, FailureMode, GlobalGate, GlobalGateRules, GlobalVerdict, Outcome};
use llm_ratelimit::global::proto::{Code, Response, Status};
use llm_ratelimit::priority::Priority;
use llm_ratelimit::store::{self, MemStore};
use llm_ratelimit::time::{Duration, Instant};
use llm_ratelimit::worker::{Admission, Arrival, Worker};
use proptest::prelude::*;
use std::collections::BTreeMap;

const START_MS: u64 = 1_700_000_000_000;
const CAPACITY: f64 = 12.0;
const TOKENS: f64 = 2_000.0;
/// So slow that the count of tokens is exact within a run (at most ~0.1 token).
const REFILL: f64 = 0.001;
const WINDOW_MS: u64 = 1_000;
const TIMEOUT_MS: u64 = 50;
const MAX_WAIT_MS: u64 = 400;

fn config() -> Config {
    let json = format!(
        r#"{{"name":"c","bucket":{{"capacity":{CAPACITY},"refill_rate":{REFILL},"burst_allowance":0,"max_lease":4}},
            "queue":{{"tick_ms":10}},
            "priorities":{{"CRITICAL":{{"max_wait_ms":{MAX_WAIT_MS}}},"HIGH":{{"max_wait_ms":{MAX_WAIT_MS}}},
                          "NORMAL":{{"max_wait_ms":{MAX_WAIT_MS}}},"LOW":{{"max_wait_ms":0}}}},
            "tokens":{{"capacity":{TOKENS},"refill_rate":{REFILL}}}}}"#
    );
    Config::parse(json.as_bytes()).expect("valid configuration")
}

#[derive(Clone, Debug)]
enum Event {
    /// A request of class `class` on worker `worker`, needing `need` LLM tokens (0: none).
    Arrive {
        worker: usize,
        class: usize,
        need: u64,
    },
    /// Worker `worker` ticks: its queue and its global gate.
    Tick {
        worker: usize,
    },
    Advance {
        ms: u64,
    },
    /// The service answers call `pick` (modulo the calls in flight).
    Answer {
        pick: usize,
    },
    /// Call `pick` fails (`deny`: its waiters are refused).
    Fail {
        pick: usize,
    },
    /// The client of waiting request `pick` (queued or waiting for the service) leaves.
    Leave {
        pick: usize,
    },
}

fn event(workers: usize) -> impl Strategy<Value = Event> {
    prop_oneof![
        6 => (0..workers, 0..4usize, prop_oneof![Just(0u64), 1..300u64])
            .prop_map(|(worker, class, need)| Event::Arrive { worker, class, need }),
        3 => (0..workers).prop_map(|worker| Event::Tick { worker }),
        3 => (1..400u64).prop_map(|ms| Event::Advance { ms }),
        5 => (0..64usize).prop_map(|pick| Event::Answer { pick }),
        1 => (0..64usize).prop_map(|pick| Event::Fail { pick }),
        1 => (0..64usize).prop_map(|pick| Event::Leave { pick }),
    ]
}

/// The rate limit service: a fixed window of `WINDOW_MS` over one count all workers share.
struct Service {
    limit: u64,
    window: u64,
    count: u64,
}

impl Service {
    fn call(&mut self, hits: u64, now_ms: u64) -> Response {
        let window = now_ms / WINDOW_MS;
        if window != self.window {
            (self.window, self.count) = (window, 0);
        }
        let reset = (window + 1) * WINDOW_MS - now_ms;
        let code = if self.count + hits <= self.limit {
            self.count += hits;
            Code::Ok
        } else {
            Code::OverLimit
        };
        let s = Status { code, remaining: Some(self.limit - self.count), until_reset_ms: Some(reset) };
        Response { overall: code, statuses: vec![s] }
    }
}

/// Where a request is in the chain.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Stage {
    /// In its worker's queue: no local token yet.
    Queued,
    /// Holds its local tokens and waits for the global gate's word.
    AwaitingGlobal,
}

#[derive(Clone, Copy, Debug)]
struct Req {
    worker: usize,
    class: Priority,
    need: Option<TokenNeed>,
    stage: Stage,
}

struct Sim {
    store: MemStore,
    workers: Vec<Worker>,
    gates: Vec<GlobalGate>,
    service: Service,
    /// Calls in flight: (worker, token, request units asked).
    calls: Vec<(usize, u32, u64)>,
    next_token: u32,
    next_id: u32,
    now_ms: u64,
    /// Requests waiting (in a queue or at the global gate), by id.
    waiting: BTreeMap<u32, Req>,
    /// Per worker: request units the service granted its calls, and requests its gate passed.
    granted: Vec<u64>,
    passed: Vec<u64>,
    /// Local request tokens and LLM tokens spent by requests that passed both gates.
    spent: (f64, f64),
}

impl Sim {
    fn new(workers: usize, limit: u64, max_lease: u64) -> Sim {
        let rules = GlobalGateRules {
            timeout_ms: TIMEOUT_MS,
            failure_mode: FailureMode::Deny,
            max_lease,
            lease_ms: 1000,
            charged_after: [false; 3],
        };
        let config = config();
        Sim {
            store: MemStore::default(),
            workers: (0..workers).map(|i| Worker::new(config.clone(), 0x5eed ^ i as u64)).collect(),
            gates: (0..workers).map(|_| GlobalGate::new(rules.clone())).collect(),
            service: Service { limit, window: 0, count: 0 },
            calls: Vec::new(),
            next_token: 0,
            next_id: 1,
            now_ms: START_MS,
            waiting: BTreeMap::new(),
            granted: vec![0; workers],
            passed: vec![0; workers],
            spent: (0.0, 0.0),
        }
    }

    fn now(&self) -> Instant {
        Instant::from_millis(self.now_ms)
    }

    fn send(&mut self, w: usize, ask: Option<Ask>) {
        let Some(ask) = ask else { return };
        self.next_token += 1;
        self.gates[w].sent(ask.key, self.next_token);
        self.calls.push((w, self.next_token, ask.hits[0]));
    }

    fn may_wait(&self, class: Priority) -> Duration {
        Duration::from_millis(self.workers[0].config.class(class).max_wait_ms)
    }

    /// Request `id` took its local tokens on worker `w`: now the global gate.
    fn through_global(&mut self, w: usize, id: u32, class: Priority, need: Option<TokenNeed>, may_wait: Duration) {
        let req = Req { worker: w, class, need, stage: Stage::AwaitingGlobal };
        let now = self.now();
        match self.gates[w].arrive("c\n", id, [1, 0, 0], may_wait, now) {
            GlobalVerdict::Pass { ask } => {
                self.pass(w, req);
                self.send(w, ask);
            }
            GlobalVerdict::Wait { ask } => {
                self.waiting.insert(id, req);
                self.send(w, ask);
            }
            GlobalVerdict::Fallback => self.pass(w, req),
            GlobalVerdict::Refuse { .. } => self.give_back(req),
        }
    }

    fn pass(&mut self, w: usize, req: Req) {
        assert_eq!(req.stage, Stage::AwaitingGlobal, "passed the global gate without its local token");
        assert_eq!(req.worker, w, "passed on another worker's gate");
        self.passed[w] += 1;
        self.spent.0 += 1.0;
        self.spent.1 += req.need.map_or(0.0, |n| n.tokens as f64);
    }

    fn give_back(&mut self, req: Req) {
        let now = self.now();
        let w = &mut self.workers[req.worker];
        // A failed write would lose them, as in the host; the store here never fails.
        w.give_back(&self.store, None, req.need, now).expect("store answers");
    }

    fn carry(&mut self, w: usize, o: Outcome) {
        for id in o.pass.into_iter().chain(o.fallback) {
            let req = self.waiting.remove(&id).expect("a request the gate passes waits for it");
            self.pass(w, req);
        }
        for r in o.refuse {
            let req = self.waiting.remove(&r.id).expect("a request the gate refuses waits for it");
            assert_eq!(req.stage, Stage::AwaitingGlobal);
            self.give_back(req);
        }
        for ask in o.asks {
            self.send(w, Some(ask));
        }
    }

    fn step(&mut self, e: &Event) {
        let n = self.workers.len();
        match *e {
            Event::Arrive { worker, class, need } => {
                let w = worker % n;
                let (id, now) = (self.next_id, self.now());
                self.next_id += 1;
                let class = Priority::ALL[class];
                let need = (need > 0).then_some(TokenNeed { bucket: 0, tokens: need, input: 0 });
                let may_wait = self.may_wait(class);
                // As the host does: a key over limit for longer than it may wait takes nothing.
                if self.gates[w].blocked("c\n", [1, 0, 0], now).is_some_and(|(t, _)| t > may_wait) {
                    return;
                }
                let worker = &mut self.workers[w];
                let gate = worker.gate(&self.store, now).expect("store answers");
                let arrival = Arrival { id, class, tenant: None, need, gate };
                let d = worker.admit(&self.store, arrival, now).expect("store answers");
                match d.admission {
                    Admission::Pass { .. } => self.through_global(w, id, class, need, may_wait),
                    Admission::Wait { shed } => {
                        self.waiting.insert(id, Req { worker: w, class, need, stage: Stage::Queued });
                        if let Some(r) = shed {
                            self.waiting.remove(&r.id);
                        }
                    }
                    Admission::Refuse(_) => {}
                }
            }
            Event::Tick { worker } => {
                let w = worker % n;
                let now = self.now();
                let t = self.workers[w].tick(&self.store, now);
                for r in t.expired {
                    self.waiting.remove(&r.id);
                }
                for r in t.released {
                    let req = self.waiting.remove(&r.id).expect("a released request was queued");
                    assert_eq!(req.stage, Stage::Queued);
                    self.workers[w].take_release(r.id);
                    let may_wait = self.may_wait(req.class) - r.waited;
                    self.through_global(w, r.id, req.class, req.need, may_wait);
                }
                let o = self.gates[w].tick(now);
                self.carry(w, o);
            }
            Event::Advance { ms } => self.now_ms += ms,
            Event::Answer { pick } | Event::Fail { pick } => {
                if self.calls.is_empty() {
                    return;
                }
                let (w, token, hits) = self.calls.remove(pick % self.calls.len());
                let now = self.now();
                let o = if let Event::Fail { .. } = e {
                    self.gates[w].failed(token, false, now)
                } else {
                    let r = self.service.call(hits, self.now_ms);
                    if r.overall == Code::Ok {
                        self.granted[w] += hits;
                    }
                    self.gates[w].answered(token, &r, now)
                };
                self.carry(w, o);
            }
            Event::Leave { pick } => {
                if self.waiting.is_empty() {
                    return;
                }
                let id = *self.waiting.keys().nth(pick % self.waiting.len()).expect("not empty");
                let req = self.waiting.remove(&id).expect("there");
                let now = self.now();
                match req.stage {
                    Stage::Queued => {
                        self.workers[req.worker].leave(&self.store, id, now);
                    }
                    Stage::AwaitingGlobal => {
                        self.gates[req.worker].leave(id);
                        self.give_back(req);
                    }
                }
            }
        }
    }

    /// Both properties, after every event.
    fn check(&self) {
        for w in 0..self.workers.len() {
            assert!(
                self.passed[w] <= self.granted[w],
                "worker {w}'s gate passed {} requests, the service granted {}",
                self.passed[w],
                self.granted[w]
            );
        }
        let bucket: SharedBucket =
            store::read(&self.store, self.workers[0].bucket_key()).expect("readable").expect("the bucket exists");
        let leased = self.workers.iter().fold((0.0, 0.0), |(r, t), w| {
            let l = w.bucket_lease();
            (r + l.requests, t + l.tokens.first().copied().unwrap_or(0.0) + l.settled.first().copied().unwrap_or(0.0))
        });
        let held = self
            .waiting
            .values()
            .filter(|r| r.stage == Stage::AwaitingGlobal)
            .fold((0.0, 0.0), |(r, t), q| (r + 1.0, t + q.need.map_or(0.0, |n| n.tokens as f64)));
        let refill = REFILL * (self.now_ms - START_MS) as f64 / 1000.0 + 1e-6;
        let requests = bucket.level.tokens + leased.0 + held.0 + self.spent.0;
        assert!(
            requests >= CAPACITY - 1e-6 && requests <= CAPACITY + refill,
            "request tokens: bucket {} + leased {} + held {} + spent {} = {requests}, started with {CAPACITY}",
            bucket.level.tokens,
            leased.0,
            held.0,
            self.spent.0
        );
        let level = bucket.token_levels.first().map_or(TOKENS, |l| l.tokens);
        let tokens = level + leased.1 + held.1 + self.spent.1;
        assert!(
            tokens >= TOKENS - 1e-6 && tokens <= TOKENS + refill,
            "LLM tokens: bucket {level} + leased {} + held {} + spent {} = {tokens}, started with {TOKENS}",
            leased.1,
            held.1,
            self.spent.1
        );
    }
}

fn run(workers: usize, limit: u64, max_lease: u64, events: &[Event]) {
    let mut sim = Sim::new(workers, limit, max_lease);
    let now = sim.now();
    for w in &sim.workers {
        w.ensure_shared(&sim.store, now).expect("store answers");
    }
    for e in events {
        sim.step(e);
        sim.check();
    }
    // Everything ends: waits run out, calls fail or are answered, leases go back.
    for _ in 0..20 {
        sim.step(&Event::Advance { ms: 100 });
        while !sim.calls.is_empty() {
            sim.step(&Event::Answer { pick: 0 });
        }
        for w in 0..workers {
            sim.step(&Event::Tick { worker: w });
        }
        sim.check();
    }
    assert!(sim.waiting.is_empty(), "every request ends: {:?} still wait", sim.waiting);
    for w in &sim.workers {
        assert!(!w.holds_bucket_lease(), "leases go back on the tick");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn local_and_global_gates_together_lose_no_token_and_pass_nothing_unpaid(
        workers in 1usize..4,
        limit in prop_oneof![Just(3u64), Just(10), Just(100)],
        max_lease in prop_oneof![Just(1u64), Just(4)],
        events in proptest::collection::vec(event(3), 1..400),
    ) {
        run(workers, limit, max_lease, &events);
    }
}
