//! Deterministic simulation of the global gate: several workers (each its own `GlobalGate`, as each
//! worker VM of each Envoy instance has) share one rate limit service, modelled exactly: a sliding
//! window of `WINDOW_MS` that admits a call's hits when they fit under the limit and says how
//! many remain and when enough will have left the window. A seeded random schedule interleaves
//! arrivals on any worker, answers that take 0 to 20 ms (some never come, some calls fail),
//! clients that leave, and ticks. proptest shrinks a failing schedule to a short list of events.
//!
//! Properties:
//! - in every window of `WINDOW_MS`, the requests admitted are at most the limit plus what the
//!   workers leased ahead in the `lease_ms` before it: `limit + workers × max_lease` (the bound
//!   the README states), and never more than the service counted;
//! - every request ends: admitted, refused, or gone with its client; none waits past the call
//!   timeout on a silent service once its worker ticks, nor past its deadline on a reset;
//! - a refusal for the limit is given only when the service said over limit.

use llm_ratelimit::global::gate::{Ask, FailureMode, GlobalGate, GlobalGateRules, GlobalVerdict};
use llm_ratelimit::global::proto::{Code, Response, Status};
use llm_ratelimit::time::{Duration, Instant};
use proptest::prelude::*;
use std::collections::{BTreeMap, VecDeque};

const WINDOW_MS: u64 = 1000;
const TICK_MS: u64 = 10;
const TIMEOUT_MS: u64 = 50;

/// The service: an exact sliding window over (time, hits) admitted.
struct Service {
    limit: u64,
    log: VecDeque<(u64, u64)>,
    counted: Vec<(u64, u64)>,
}

impl Service {
    fn call(&mut self, hits: u64, now: u64) -> Response {
        while self.log.front().is_some_and(|&(t, _)| t + WINDOW_MS <= now) {
            self.log.pop_front();
        }
        let used: u64 = self.log.iter().map(|&(_, h)| h).sum();
        let (code, remaining, reset) = if used + hits <= self.limit {
            self.log.push_back((now, hits));
            self.counted.push((now, hits));
            (Code::Ok, self.limit - used - hits, WINDOW_MS)
        } else {
            // Until enough hits leave the window for these to fit.
            let mut left = used;
            let mut at = now + 1;
            for &(t, h) in &self.log {
                left -= h;
                at = t + WINDOW_MS;
                if left + hits <= self.limit {
                    break;
                }
            }
            (Code::OverLimit, self.limit - used.min(self.limit), at - now)
        };
        let s = Status { code, remaining: Some(remaining), until_reset_ms: Some(reset) };
        Response { overall: code, statuses: vec![s] }
    }
}

#[derive(Clone, Debug)]
enum Event {
    /// A request on worker `w`, `gap` ms after the previous event; it may wait `may_wait` ms.
    Arrive { w: usize, gap: u64, may_wait: u64 },
    /// The client of the oldest waiting request on worker `w` leaves.
    Leave { w: usize, gap: u64 },
}

fn events(workers: usize) -> impl Strategy<Value = Vec<Event>> {
    let e = prop_oneof![
        8 => (0..workers, 0u64..6, prop_oneof![Just(0u64), Just(300), Just(2000)])
            .prop_map(|(w, gap, may_wait)| Event::Arrive { w, gap, may_wait }),
        1 => (0..workers, 0u64..20).prop_map(|(w, gap)| Event::Leave { w, gap }),
    ];
    proptest::collection::vec(e, 1..1500)
}

struct Sim {
    gates: Vec<GlobalGate>,
    service: Service,
    /// Calls in flight: due time -> (worker, token, hits, fails).
    calls: BTreeMap<(u64, u32), (usize, u64, bool)>,
    next_token: u32,
    rng: u64,
    now: u64,
    /// id -> (worker, arrived, deadline for a reset wait)
    waiting: BTreeMap<u32, (usize, u64)>,
    admitted: Vec<u64>,
    over_said: bool,
}

impl Sim {
    fn rand(&mut self, n: u64) -> u64 {
        self.rng = self.rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (self.rng >> 33) % n
    }

    fn send(&mut self, w: usize, ask: Ask) {
        self.next_token += 1;
        let token = self.next_token;
        self.gates[w].sent(ask.key, token);
        let r = self.rand(100);
        // 2% never answered, 2% fail, the rest answered in 0..20 ms.
        if r < 2 {
            return;
        }
        let due = self.now + self.rand(20);
        self.calls.insert((due, token), (w, ask.hits[0], r < 4));
    }

    fn carry(&mut self, w: usize, o: llm_ratelimit::global::gate::Outcome) {
        for id in o.pass {
            let waited = self.waiting.remove(&id);
            assert!(waited.is_some_and(|(ww, _)| ww == w), "#{id} passed on worker {w}, not waiting there");
            self.admitted.push(self.now);
        }
        for (id, _, unavailable) in o.refuse {
            assert!(self.waiting.remove(&id).is_some(), "#{id} refused but not waiting");
            assert!(!unavailable, "failure mode is local");
            assert!(self.over_said, "a limit refusal only after the service said over limit");
        }
        for ask in o.asks {
            self.send(w, ask);
        }
    }

    fn advance(&mut self, to: u64) {
        while self.now < to {
            self.now += 1;
            let due: Vec<_> = self.calls.range(..=(self.now, u32::MAX)).map(|(k, v)| (*k, *v)).collect();
            for (k, (w, hits, fails)) in due {
                self.calls.remove(&k);
                let o = if fails {
                    self.gates[w].failed(k.1, false, Instant::from_millis(self.now))
                } else {
                    let r = self.service.call(hits, self.now);
                    self.over_said |= r.overall == Code::OverLimit;
                    self.gates[w].answered(k.1, &r, Instant::from_millis(self.now))
                };
                self.carry(w, o);
            }
            if self.now.is_multiple_of(TICK_MS) {
                for w in 0..self.gates.len() {
                    let o = self.gates[w].tick(Instant::from_millis(self.now));
                    self.carry(w, o);
                }
            }
        }
    }
}

fn run(workers: usize, limit: u64, max_lease: u64, seed: u64, events: &[Event]) {
    let rules = GlobalGateRules { timeout_ms: TIMEOUT_MS, failure_mode: FailureMode::Allow, max_lease, lease_ms: 1000 };
    let mut sim = Sim {
        gates: (0..workers).map(|_| GlobalGate::new(rules.clone())).collect(),
        service: Service { limit, log: VecDeque::new(), counted: Vec::new() },
        calls: BTreeMap::new(),
        next_token: 0,
        rng: seed,
        now: 0,
        waiting: BTreeMap::new(),
        admitted: Vec::new(),
        over_said: false,
    };
    let mut failed_open = 0;
    for (id, e) in events.iter().enumerate() {
        let id = id as u32 + 1;
        match *e {
            Event::Arrive { w, gap, may_wait } => {
                sim.advance(sim.now + gap);
                match sim.gates[w].arrive(
                    "p\n",
                    id,
                    [1, 0],
                    Duration::from_millis(may_wait),
                    Instant::from_millis(sim.now),
                ) {
                    GlobalVerdict::Pass { ask } => {
                        sim.admitted.push(sim.now);
                        if let Some(a) = ask {
                            sim.send(w, a);
                        }
                    }
                    GlobalVerdict::Wait { ask } => {
                        sim.waiting.insert(id, (w, sim.now));
                        if let Some(a) = ask {
                            sim.send(w, a);
                        }
                    }
                    GlobalVerdict::Refuse { unavailable, .. } => {
                        assert!(!unavailable && sim.over_said, "refused before any over-limit answer");
                    }
                }
            }
            Event::Leave { w, gap } => {
                sim.advance(sim.now + gap);
                if let Some((&id, _)) = sim.waiting.iter().find(|(_, &(ww, _))| ww == w) {
                    sim.waiting.remove(&id);
                    sim.gates[w].leave(id);
                }
            }
        }
        // No request waits on a silent service past the timeout once its worker ticked, nor
        // on a reset past a window and its deadline.
        for (&id, &(_, since)) in &sim.waiting {
            assert!(sim.now <= since + WINDOW_MS + 2000 + TIMEOUT_MS + 100 + TICK_MS, "#{id} stranded since {since}");
        }
    }
    sim.advance(sim.now + 5000);
    assert!(sim.waiting.is_empty(), "every request ends: {:?} still wait", sim.waiting);
    for gate in &mut sim.gates {
        failed_open += gate.take_counts().fallback;
    }
    // Requests let through by the failure mode are not the service's to count.
    let bound = limit + workers as u64 * max_lease;
    let admitted = &sim.admitted;
    for (i, &t) in admitted.iter().enumerate() {
        let in_window = admitted[i..].iter().take_while(|&&u| u < t + WINDOW_MS).count() as u64;
        assert!(
            in_window <= bound + failed_open,
            "{in_window} admitted in the window from {t} ms, bound {bound} (+{failed_open} failed open)"
        );
    }
    let counted: u64 = sim.service.counted.iter().map(|&(_, h)| h).sum();
    assert!(admitted.len() as u64 <= counted + failed_open, "admitted {} > counted {counted}", admitted.len());
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn workers_sharing_one_service_hold_the_limit(
        workers in 1usize..5,
        limit in prop_oneof![Just(5u64), Just(40), Just(200)],
        max_lease in prop_oneof![Just(1u64), Just(4), Just(32)],
        seed in any::<u64>(),
        events in events(4),
    ) {
        let events: Vec<Event> = events
            .into_iter()
            .map(|e| match e {
                Event::Arrive { w, gap, may_wait } => Event::Arrive { w: w % workers, gap, may_wait },
                Event::Leave { w, gap } => Event::Leave { w: w % workers, gap },
            })
            .collect();
        run(workers, limit, max_lease, seed, &events);
    }
}
