//! `in_flight` across workers: several `Worker`s share one store while a seeded random schedule
//! interleaves arrivals, ticks, answers (successes, 429s, 503s), clients that leave while waiting
//! or while upstream, worker VMs that reload (their requests and entry gone) and lost CAS writes.
//! proptest shrinks a failing schedule to a short list of events.
//!
//! Properties:
//! - requests upstream never exceed the limit (fixed), or `in_flight.max` (adaptive);
//! - no slot is lost: once every request has ended and a reloaded worker's entry has expired,
//!   the limit's worth of requests go at once again;
//! - no request is stranded: every waiter is released or answered once slots free and its
//!   deadline passes.

use llm_ratelimit::config::Config;
use llm_ratelimit::inflight::LIVE;
use llm_ratelimit::priority::Priority;
use llm_ratelimit::store::MemStore;
use llm_ratelimit::time::{Duration, Instant};
use llm_ratelimit::worker::{Admission, Arrival, Worker};
use proptest::prelude::*;
use std::collections::HashMap;

const START_MS: u64 = 1_700_000_000_000;

#[derive(Clone, Debug)]
enum Event {
    Arrive {
        worker: usize,
        class: usize,
    },
    Tick {
        worker: usize,
    },
    Advance {
        ms: u64,
    },
    /// Upstream request `pick` ends with `status`.
    Answer {
        pick: usize,
        status: u16,
    },
    /// The client of waiting request `pick` leaves.
    Leave {
        pick: usize,
    },
    /// Worker `worker`'s VM reloads: its requests and queue are gone, a new VM takes its place.
    Reload {
        worker: usize,
    },
    Conflicts {
        n: u32,
    },
}

fn event(workers: usize) -> impl Strategy<Value = Event> {
    prop_oneof![
        6 => (0..workers, 0..4usize).prop_map(|(worker, class)| Event::Arrive { worker, class }),
        4 => (0..workers).prop_map(|worker| Event::Tick { worker }),
        2 => (1..800u64).prop_map(|ms| Event::Advance { ms }),
        5 => (0..64usize, prop_oneof![Just(200u16), Just(429), Just(503)])
            .prop_map(|(pick, status)| Event::Answer { pick, status }),
        1 => (0..64usize).prop_map(|pick| Event::Leave { pick }),
        1 => (0..workers).prop_map(|worker| Event::Reload { worker }),
        1 => (1..40u32).prop_map(|n| Event::Conflicts { n }),
    ]
}

/// Where a request is.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Where {
    Waiting,
    Upstream {
        at: Instant,
    },
    /// Shared data failed at its admission: the host lets it through (fail open), maybe without
    /// a slot; it ends like any other, but does not count against the limit.
    FailedOpen {
        at: Instant,
    },
}

struct Sim {
    store: MemStore,
    config: Config,
    workers: Vec<Worker>,
    /// Each worker's requests, by id.
    requests: Vec<HashMap<u32, Where>>,
    next_id: u32,
    next_vm: u64,
    now: Instant,
    max: usize,
}

impl Sim {
    /// `max` slots (with 24 or more, workers take leases of slots far from the limit).
    fn new(workers: usize, adaptive: bool, max: usize) -> Sim {
        let adaptive = if adaptive { r#","adaptive":{"floor":1,"initial":2}"# } else { "" };
        let json =
            format!(r#"{{"bucket":{{"capacity":100000,"refill_rate":100000}},"in_flight":{{"max":{max}{adaptive}}}}}"#);
        let config = Config::parse(json.as_bytes()).unwrap();
        let store = MemStore::default();
        let now = Instant::from_millis(START_MS);
        let mut sim = Sim {
            store,
            config,
            workers: Vec::new(),
            requests: vec![HashMap::new(); workers],
            next_id: 1,
            next_vm: 1,
            now,
            max,
        };
        for _ in 0..workers {
            let w = sim.vm();
            sim.workers.push(w);
        }
        sim
    }

    fn vm(&mut self) -> Worker {
        self.next_vm += 1;
        let w = Worker::new(self.config.clone(), self.next_vm);
        w.ensure_shared(&self.store, self.now).unwrap();
        w
    }

    fn upstream(&self) -> usize {
        self.requests.iter().flat_map(|r| r.values()).filter(|w| matches!(w, Where::Upstream { .. })).count()
    }

    fn waiting(&self) -> usize {
        self.requests.iter().flat_map(|r| r.values()).filter(|w| **w == Where::Waiting).count()
    }

    /// The `pick`th request (in id order) in `state`.
    fn pick(&self, pick: usize, upstream: bool) -> Option<(usize, u32)> {
        let mut all: Vec<(usize, u32)> = self
            .requests
            .iter()
            .enumerate()
            .flat_map(|(w, r)| {
                r.iter()
                    .filter(move |(_, s)| matches!(s, Where::Upstream { .. } | Where::FailedOpen { .. }) == upstream)
                    .map(move |(id, _)| (w, *id))
            })
            .collect();
        all.sort_by_key(|&(_, id)| id);
        (!all.is_empty()).then(|| all[pick % all.len()])
    }

    fn apply(&mut self, e: &Event) {
        match *e {
            Event::Arrive { worker, class } => {
                let id = self.next_id;
                self.next_id += 1;
                let w = &mut self.workers[worker];
                let Ok(gate) = w.gate(&self.store, self.now) else { return };
                let a = Arrival { id, class: Priority::ALL[class], tenant: None, need: None, gate };
                let Ok(d) = w.admit(&self.store, a, self.now) else {
                    self.requests[worker].insert(id, Where::FailedOpen { at: self.now });
                    return;
                };
                match d.admission {
                    Admission::Pass { .. } => {
                        self.requests[worker].insert(id, Where::Upstream { at: self.now });
                    }
                    Admission::Wait { shed } => {
                        self.requests[worker].insert(id, Where::Waiting);
                        if let Some(s) = shed {
                            self.requests[worker].remove(&s.id);
                        }
                    }
                    Admission::Refuse(_) => {}
                }
            }
            Event::Tick { worker } => self.tick(worker),
            // Live VMs tick every `queue.tick_ms`: at least every 200 ms here, well inside the
            // heartbeat's liveness.
            Event::Advance { ms } => {
                let mut left = ms;
                while left > 0 {
                    let step = left.min(200);
                    left -= step;
                    self.now += Duration::from_millis(step);
                    for w in 0..self.workers.len() {
                        self.tick(w);
                    }
                }
            }
            Event::Answer { pick, status } => {
                let Some((worker, id)) = self.pick(pick, true) else { return };
                let (Some(Where::Upstream { at }) | Some(Where::FailedOpen { at })) = self.requests[worker].remove(&id)
                else {
                    return;
                };
                let headers = at + Duration::from_millis(1).max(self.now.saturating_since(at));
                let _ = self.workers[worker].end_in_flight(&self.store, id, Some((status, headers)), || Some(self.now));
            }
            Event::Leave { pick } => {
                let Some((worker, id)) = self.pick(pick, false) else { return };
                self.requests[worker].remove(&id);
                self.workers[worker].leave(&self.store, id, self.now);
                let _ = self.workers[worker].end_in_flight(&self.store, id, None, || Some(self.now));
            }
            Event::Reload { worker } => {
                self.requests[worker].clear();
                self.workers[worker] = self.vm();
            }
            Event::Conflicts { n } => self.store.conflicts.set(n),
        }
    }

    fn tick(&mut self, worker: usize) {
        let t = self.workers[worker].tick(&self.store, self.now);
        for r in &t.released {
            assert!(self.workers[worker].in_flight(r.id), "released #{} without a slot", r.id);
            self.requests[worker].insert(r.id, Where::Upstream { at: self.now });
        }
        for r in &t.expired {
            self.requests[worker].remove(&r.id);
        }
    }

    /// The limit holds: fixed, and the ceiling of the adaptive one.
    fn check(&self) {
        assert!(self.upstream() <= self.max, "{} upstream, limit {}", self.upstream(), self.max);
    }
}

fn run(events: &[Event], workers: usize, adaptive: bool, max: usize) {
    let mut sim = Sim::new(workers, adaptive, max);
    for e in events {
        sim.apply(e);
        sim.check();
    }
    // Everything ends: answer every upstream request; waiters get slots or time out.
    sim.store.conflicts.set(0);
    for _ in 0..200 {
        while let Some((worker, id)) = sim.pick(0, true) {
            sim.requests[worker].remove(&id);
            sim.workers[worker].end_in_flight(&sim.store, id, Some((200, sim.now)), || Some(sim.now)).unwrap();
        }
        sim.now += Duration::from_millis(50);
        for w in 0..workers {
            sim.tick(w);
        }
        sim.check();
        if sim.waiting() == 0 && sim.upstream() == 0 {
            break;
        }
    }
    assert_eq!(sim.waiting(), 0, "waiters stranded");
    assert_eq!(sim.upstream(), 0);
    // A reloaded VM's entry expires: the limit's worth goes at once again.
    sim.now = sim.now + LIVE + Duration::from_millis(1);
    let mut passed = 0;
    for i in 0..max {
        let w = i % workers;
        let id = sim.next_id;
        sim.next_id += 1;
        let gate = sim.workers[w].gate(&sim.store, sim.now).unwrap();
        let a = Arrival { id, class: Priority::Critical, tenant: None, need: None, gate };
        if let Admission::Pass { .. } = sim.workers[w].admit(&sim.store, a, sim.now).unwrap().admission {
            passed += 1;
        }
    }
    // Adaptive: the limit is what the answers made it, at least the floor.
    if adaptive {
        assert!(passed >= 1, "no slot free after everything ended");
    } else {
        assert_eq!(passed, max, "slots lost");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn a_fixed_limit_holds_across_workers_and_loses_no_slot(events in prop::collection::vec(event(3), 1..120)) {
        run(&events, 3, false, 3);
    }

    #[test]
    fn an_adaptive_limit_stays_under_its_ceiling_and_loses_no_slot(events in prop::collection::vec(event(2), 1..120)) {
        run(&events, 2, true, 3);
    }

    #[test]
    fn leases_of_slots_far_from_the_limit_never_exceed_it_nor_lose_a_slot(events in prop::collection::vec(event(3), 1..160)) {
        run(&events, 3, false, 24);
    }
}
