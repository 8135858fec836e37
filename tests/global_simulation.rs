//! Deterministic simulation of the global gate: several workers (each its own `GlobalGate`, as each
//! worker VM of each Envoy instance has) share one rate limit service, modelled exactly: per unit
//! (requests, LLM tokens, cost), a sliding window of `window_ms` that admits a check's hits when
//! they fit under the limit and says how many remain and when enough will have left the window;
//! settlements refund (newest units first, never below 0) or charge (with no check), as
//! llm-ratelimit-rls does; with `ChargeAfter`, plain hits are counted even over the limit, as
//! envoyproxy/ratelimit does. A seeded random schedule interleaves arrivals on any worker,
//! answers that take 0 to 20 ms (some never come, some calls fail), clients that leave, requests
//! that end and settle what they used through each worker's `Ledger` on its tick, and ticks.
//! proptest shrinks a failing schedule to a short list of events.
//!
//! Properties:
//! - in every window `[t, t + window_ms)` and for each unit, the usage of the requests admitted in
//!   it is at most `limit + H + X + R` (the bounds `global::gate` documents, measured exactly):
//!   `H` the units the workers held leased at `t` (at most `max_lease` requests' worth each, but
//!   for the waiters'), `X` what requests admitted in it used beyond what their checks counted and
//!   had not settled by the service's last grant in it (in flight; all of it for requests let
//!   through without the service's word), `R` what requests admitted before it had counted beyond
//!   their usage and refunded in it; and `H` stays within the documented lease bound;
//! - every request ends: admitted, refused, or gone with its client; none waits past the call
//!   timeout on a silent service once its worker ticks, nor past its deadline on a reset;
//! - a refusal for the limit is given only when the service said over limit for requests or
//!   tokens, and one for the budget only when it said so for cost.
//!
//! And: two Envoys (two workers each), requests estimating 10× their usage, `Reserve`: together
//! they admit at least 85% of what the token limit allows ÷ their actual usage over a long run.

use llm_ratelimit::global::gate::{
    Accounting, Ask, Cause, FailureMode, GlobalGate, GlobalGateRules, GlobalVerdict, Ledger, Outcome, Settlement,
    Units, COST, REQUESTS, TOKENS, UNITS,
};
use llm_ratelimit::global::proto::{Code, Response, Status};
use llm_ratelimit::time::{Duration, Instant};
use proptest::prelude::*;
use std::collections::{BTreeMap, VecDeque};

const TICK_MS: u64 = 10;
const TIMEOUT_MS: u64 = 50;
const KEY: &str = "p\n";
/// Micro-dollars per LLM token used.
const PRICE: u64 = 3;

/// One unit's sliding window at the service.
struct Window {
    limit: u64,
    log: VecDeque<(u64, u64)>,
    /// When a check for this unit was granted: (ms, the service's operation).
    grants: Vec<(u64, u64)>,
}

impl Window {
    fn used(&self) -> u64 {
        self.log.iter().map(|&(_, h)| h).sum()
    }

    fn check(&mut self, hits: u64, now: u64, window_ms: u64, op: u64) -> Status {
        let used = self.used();
        if used + hits <= self.limit {
            self.log.push_back((now, hits));
            self.grants.push((now, op));
            return Status {
                code: Code::Ok,
                remaining: Some(self.limit - used - hits),
                until_reset_ms: Some(window_ms),
            };
        }
        // Until enough units leave the window for these to fit.
        let mut left = used;
        let mut at = now + 1;
        for &(t, h) in &self.log {
            left -= h;
            at = t + window_ms;
            if left + hits <= self.limit {
                break;
            }
        }
        let remaining = self.limit - used.min(self.limit);
        Status { code: Code::OverLimit, remaining: Some(remaining), until_reset_ms: Some(at - now) }
    }

    /// Takes `units` off, newest first, never below 0.
    fn refund(&mut self, mut units: u64) {
        for (_, h) in self.log.iter_mut().rev() {
            let off = units.min(*h);
            *h -= off;
            units -= off;
        }
    }

    fn charge(&mut self, units: u64, now: u64) {
        self.log.push_back((now, units));
    }
}

/// The service: a window per unit.
struct Service {
    window_ms: u64,
    units: [Window; 3],
    /// Request units counted, in all.
    counted: u64,
    /// Per unit: it said over limit at least once.
    over_said: [bool; 3],
    /// Operations (checks, settlements) so far: their order within a millisecond.
    ops: u64,
}

impl Service {
    fn new(limits: Units, window_ms: u64) -> Service {
        let w = |limit| Window { limit, log: VecDeque::new(), grants: Vec::new() };
        Service {
            window_ms,
            units: [w(limits[0]), w(limits[1]), w(limits[2])],
            counted: 0,
            over_said: [false; 3],
            ops: 0,
        }
    }

    fn trim(&mut self, now: u64) {
        for w in &mut self.units {
            while w.log.front().is_some_and(|&(t, _)| t + self.window_ms <= now) {
                w.log.pop_front();
            }
        }
    }

    /// A check: one descriptor per unit with hits, each decided alone.
    fn check(&mut self, hits: Units, now: u64) -> Response {
        self.trim(now);
        self.ops += 1;
        let mut statuses = Vec::new();
        for u in UNITS.into_iter().filter(|&u| hits[u] > 0) {
            let s = self.units[u].check(hits[u], now, self.window_ms, self.ops);
            if s.code == Code::OverLimit {
                self.over_said[u] = true;
            } else if u == REQUESTS {
                self.counted += hits[u];
            }
            statuses.push(s);
        }
        let over = statuses.iter().any(|s| s.code == Code::OverLimit);
        Response { overall: if over { Code::OverLimit } else { Code::Ok }, statuses }
    }

    /// A settlement call: refunds and charges (`Reserve`'s settle entries, or `ChargeAfter`'s
    /// plain hits, which the service counts whatever its answer).
    fn settle(&mut self, s: &Settlement, now: u64) -> u64 {
        self.trim(now);
        self.ops += 1;
        for u in UNITS {
            if s.refund[u] > 0 {
                self.units[u].refund(s.refund[u]);
            }
            if s.charge[u] > 0 {
                self.units[u].charge(s.charge[u], now);
            }
        }
        self.ops
    }
}

#[derive(Clone, Debug)]
enum Event {
    /// A request on worker `w`, `gap` ms after the previous event; it may wait `may_wait` ms,
    /// uses `used` tokens (and `used × PRICE` micro-dollars), estimated `×percent / 100`, and its
    /// answer lasts `lasts` ms.
    Arrive { w: usize, gap: u64, may_wait: u64, used: u64, percent: u64, lasts: u64 },
    /// The client of the oldest waiting request on worker `w` leaves.
    Leave { w: usize, gap: u64 },
}

fn events(workers: usize) -> impl Strategy<Value = Vec<Event>> {
    let e = prop_oneof![
        8 => (
            0..workers,
            0u64..6,
            prop_oneof![Just(0u64), Just(300), Just(2000)],
            prop_oneof![Just(0u64), 1u64..400],
            prop_oneof![Just(10u64), Just(100), Just(300), Just(1000)],
            0u64..600,
        )
            .prop_map(|(w, gap, may_wait, used, percent, lasts)| Event::Arrive {
                w,
                gap,
                may_wait,
                used,
                percent,
                lasts
            }),
        1 => (0..workers, 0u64..20).prop_map(|(w, gap)| Event::Leave { w, gap }),
    ];
    proptest::collection::vec(e, 1..1500)
}

#[derive(Clone, Debug)]
struct Setup {
    workers: usize,
    limits: Units,
    max_lease: u64,
    accounting: Accounting,
    window_ms: u64,
    /// Percent of calls never answered, and failing (the same again).
    lost_pct: u64,
}

/// A request the gate let through.
#[derive(Clone, Debug)]
struct Admitted {
    at: u64,
    hits: Units,
    /// The service counted its hits (false: let through without the service's word).
    counted: bool,
    used: Units,
    /// When its settlement reached the service (requests never settle): (ms, operation).
    settled: Option<(u64, u64)>,
}

impl Admitted {
    /// The units the service counted for it at its check.
    fn counted(&self) -> Units {
        if self.counted {
            self.hits
        } else {
            [0; 3]
        }
    }
}

#[derive(Clone, Debug)]
struct Request {
    w: usize,
    hits: Units,
    used: Units,
    lasts: u64,
    arrived: u64,
}

enum Call {
    Check { w: usize, hits: Units, fails: bool },
    Settle { settlement: Settlement, admitted: Vec<usize> },
}

struct Sim {
    setup: Setup,
    gates: Vec<GlobalGate>,
    ledgers: Vec<Ledger>,
    /// Per worker: requests in its ledger, not sent yet.
    batches: Vec<Vec<usize>>,
    service: Service,
    /// Calls in flight, by due time and token.
    calls: BTreeMap<(u64, u32), Call>,
    next_token: u32,
    rng: u64,
    now: u64,
    waiting: BTreeMap<u32, Request>,
    requests: BTreeMap<u32, Request>,
    admitted: Vec<Admitted>,
    /// Answers ending: (end, index in `admitted`) -> (worker).
    running: BTreeMap<(u64, usize), usize>,
    /// Units all workers held leased at the start of each millisecond.
    held: Vec<Units>,
    /// Waiting requests' units (waiting from, until), to bound what leases hold for them.
    waited: Vec<(u64, u64, Units)>,
}

impl Sim {
    fn new(setup: Setup, seed: u64) -> Sim {
        let rules = GlobalGateRules {
            timeout_ms: TIMEOUT_MS,
            failure_mode: FailureMode::Allow,
            max_lease: setup.max_lease,
            lease_ms: 1000,
            charged_after: [false, setup.accounting == Accounting::ChargeAfter, true],
        };
        Sim {
            gates: (0..setup.workers).map(|_| GlobalGate::new(rules.clone())).collect(),
            ledgers: vec![Ledger::default(); setup.workers],
            batches: vec![Vec::new(); setup.workers],
            service: Service::new(setup.limits, setup.window_ms),
            setup,
            calls: BTreeMap::new(),
            next_token: 0,
            rng: seed,
            now: 0,
            waiting: BTreeMap::new(),
            requests: BTreeMap::new(),
            admitted: Vec::new(),
            running: BTreeMap::new(),
            held: Vec::new(),
            waited: Vec::new(),
        }
    }

    fn rand(&mut self, n: u64) -> u64 {
        self.rng = self.rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (self.rng >> 33) % n
    }

    fn token(&mut self) -> u32 {
        self.next_token += 1;
        self.next_token
    }

    /// When a call is answered (`None`: never), and whether it fails.
    fn fate(&mut self) -> (Option<u64>, bool) {
        let r = self.rand(100);
        let lost = self.setup.lost_pct;
        let due = self.now + self.rand(20);
        (if r < lost { None } else { Some(due) }, r < 2 * lost)
    }

    fn send(&mut self, w: usize, ask: Ask) {
        let token = self.token();
        self.gates[w].sent(ask.key, token);
        if let (Some(due), fails) = self.fate() {
            self.calls.insert((due, token), Call::Check { w, hits: ask.hits, fails });
        }
    }

    /// The gate's checks of `hits` let request `id` through (`counted`: on the service's word).
    fn admit(&mut self, id: u32, counted: bool) {
        let r = self.requests.remove(&id).expect("a request the gate passes arrived");
        let i = self.admitted.len();
        self.admitted.push(Admitted { at: self.now, hits: r.hits, counted, used: r.used, settled: None });
        self.running.insert((self.now + r.lasts, i), r.w);
    }

    fn refused(&mut self, id: u32, cause: Cause) {
        let s = &self.service.over_said;
        match cause {
            Cause::Limit => assert!(s[REQUESTS] || s[TOKENS], "#{id}: a limit refusal before the service said so"),
            Cause::Budget => assert!(s[COST], "#{id}: a budget refusal before the service said so"),
            Cause::Unavailable => panic!("#{id}: the failure mode is allow"),
        }
        self.requests.remove(&id);
    }

    fn stop_waiting(&mut self, id: u32) {
        let r = self.waiting.remove(&id).expect("waiting");
        self.waited.push((r.arrived, self.now, r.hits));
    }

    fn carry(&mut self, w: usize, o: Outcome) {
        for (ids, counted) in [(o.pass, true), (o.fallback, false)] {
            for id in ids {
                let waited = self.waiting.get(&id).map(|r| r.w);
                assert_eq!(waited, Some(w), "#{id} passed on worker {w}, not waiting there");
                self.stop_waiting(id);
                self.admit(id, counted);
            }
        }
        for r in o.refuse {
            assert!(self.waiting.contains_key(&r.id), "#{} refused but not waiting", r.id);
            self.stop_waiting(r.id);
            self.refused(r.id, r.cause);
        }
        for ask in o.asks {
            self.send(w, ask);
        }
    }

    /// Worker `w`'s tick: its gate, then what its ended requests used, settled in one call.
    fn tick(&mut self, w: usize) {
        let o = self.gates[w].tick(Instant::from_millis(self.now));
        self.carry(w, o);
        let settlements = self.ledgers[w].take(self.setup.accounting);
        assert_eq!(self.ledgers[w].take_dropped(), 0, "one key");
        let batch = std::mem::take(&mut self.batches[w]);
        let Some(settlement) = settlements.into_iter().next() else {
            // Nothing to correct (or, `ChargeAfter`, only units it cannot take off).
            for &i in &batch {
                self.admitted[i].settled = Some((self.now, self.service.ops));
            }
            return;
        };
        let token = self.token();
        if let (Some(due), false) = self.fate() {
            self.calls.insert((due, token), Call::Settle { settlement, admitted: batch });
        }
    }

    fn advance(&mut self, to: u64) {
        while self.now < to {
            self.now += 1;
            let now = Instant::from_millis(self.now);
            let mut held = [0; 3];
            for g in &self.gates {
                let h = g.held(now);
                for u in UNITS {
                    held[u] += h[u];
                }
            }
            self.held.push(held);
            let due: Vec<_> = self.calls.range(..=(self.now, u32::MAX)).map(|(k, _)| *k).collect();
            for k in due {
                match self.calls.remove(&k).expect("due") {
                    Call::Check { w, fails: true, .. } => {
                        let o = self.gates[w].failed(k.1, false, now);
                        self.carry(w, o);
                    }
                    Call::Check { w, hits, fails: false } => {
                        let r = self.service.check(hits, self.now);
                        let o = self.gates[w].answered(k.1, &r, now);
                        self.carry(w, o);
                    }
                    Call::Settle { settlement, admitted } => {
                        let op = self.service.settle(&settlement, self.now);
                        for i in admitted {
                            self.admitted[i].settled = Some((self.now, op));
                        }
                    }
                }
            }
            let ended: Vec<_> = self.running.range(..=(self.now, usize::MAX)).map(|(k, w)| (*k, *w)).collect();
            for (k, w) in ended {
                self.running.remove(&k);
                let a = &self.admitted[k.1];
                assert!(self.ledgers[w].add(KEY, a.hits, a.counted, a.used));
                self.batches[w].push(k.1);
            }
            if self.now.is_multiple_of(TICK_MS) {
                for w in 0..self.gates.len() {
                    self.tick(w);
                }
            }
        }
    }

    fn arrive(&mut self, id: u32, w: usize, may_wait: u64, used: u64, percent: u64, lasts: u64) {
        let estimate = (used * percent / 100).max(1);
        let tokens = match self.setup.accounting {
            Accounting::Reserve => estimate,
            Accounting::ChargeAfter => 1,
        };
        let r = Request { w, hits: [1, tokens, 1], used: [1, used, used * PRICE], lasts, arrived: self.now };
        self.requests.insert(id, r.clone());
        let now = Instant::from_millis(self.now);
        match self.gates[w].arrive(KEY, id, r.hits, Duration::from_millis(may_wait), now) {
            GlobalVerdict::Pass { ask } => {
                self.admit(id, true);
                if let Some(a) = ask {
                    self.send(w, a);
                }
            }
            GlobalVerdict::Fallback => self.admit(id, false),
            GlobalVerdict::Wait { ask } => {
                self.waiting.insert(id, r);
                if let Some(a) = ask {
                    self.send(w, a);
                }
            }
            GlobalVerdict::Refuse { cause, .. } => self.refused(id, cause),
        }
    }

    fn leave(&mut self, w: usize) {
        if let Some((&id, _)) = self.waiting.iter().find(|(_, r)| r.w == w) {
            self.stop_waiting(id);
            self.requests.remove(&id);
            self.gates[w].leave(id);
        }
    }

    /// Ends the run: every request ends, and what is left settles.
    fn finish(&mut self) {
        self.advance(self.now + 5000);
        assert!(self.waiting.is_empty(), "every request ends: {:?} still wait", self.waiting.keys());
        assert!(self.running.is_empty());
    }

    /// Checks every window of the run against the overshoot bound, per unit; returns the largest
    /// `H` seen per unit.
    fn check_bounds(&self) -> Units {
        let window = self.setup.window_ms;
        let a = &self.admitted;
        let mut most_held = [0; 3];
        // By settlement time, for `R`.
        let mut by_settled: Vec<(u64, usize)> =
            a.iter().enumerate().filter_map(|(i, r)| r.settled.map(|(s, _)| (s, i))).collect();
        by_settled.sort_unstable();
        let mut start = 0;
        while start < a.len() {
            let t = a[start].at;
            let end = t + window; // exclusive
            let inside = a[start..].iter().take_while(|r| r.at < end);
            let held = t.checked_sub(1).map_or([0; 3], |i| self.held[i as usize]);
            for u in UNITS {
                most_held[u] = most_held[u].max(held[u]);
                let grants = &self.service.units[u].grants;
                // The service's last grant for this unit in the window.
                let last = grants.partition_point(|&(g, _)| g < end);
                let last_grant = (last > 0 && grants[last - 1].0 >= t).then(|| grants[last - 1].1);
                let (mut used, mut x) = (0u64, 0u64);
                for r in inside.clone() {
                    used += r.used[u];
                    let beyond = r.used[u].saturating_sub(r.counted()[u]);
                    let settled_by_grant = matches!((r.settled, last_grant), (Some((_, s)), Some(g)) if s < g);
                    if u == REQUESTS || !settled_by_grant {
                        x += beyond;
                    }
                }
                let from = by_settled.partition_point(|&(s, _)| s < t);
                let to = by_settled.partition_point(|&(s, _)| s < end);
                let refunded: u64 = by_settled[from..to]
                    .iter()
                    .map(|&(_, i)| &a[i])
                    .filter(|r| r.at < t)
                    .map(|r| r.counted()[u].saturating_sub(r.used[u]))
                    .sum();
                let limit = self.setup.limits[u];
                assert!(
                    used <= limit + held[u] + x + refunded,
                    "unit {u}: {used} used by the requests admitted in the window from {t} ms, beyond limit {limit} + \
                     held {} + in flight {x} + refunded {refunded} ({:?})",
                    held[u],
                    self.setup
                );
            }
            start += 1 + a[start..].iter().skip(1).take_while(|r| r.at == t).count();
        }
        most_held
    }

    /// The most units a request's check asks for, per unit.
    fn most_hits(&self) -> Units {
        let mut most = [0; 3];
        for r in &self.admitted {
            for u in UNITS {
                most[u] = most[u].max(r.hits[u]);
            }
        }
        most
    }
}

fn run(setup: Setup, seed: u64, events: &[Event]) {
    let mut sim = Sim::new(setup.clone(), seed);
    for (id, e) in events.iter().enumerate() {
        let id = id as u32 + 1;
        match *e {
            Event::Arrive { w, gap, may_wait, used, percent, lasts } => {
                sim.advance(sim.now + gap);
                sim.arrive(id, w, may_wait, used, percent, lasts);
            }
            Event::Leave { w, gap } => {
                sim.advance(sim.now + gap);
                sim.leave(w);
            }
        }
        // No request waits on a silent service past the timeout once its worker ticked, nor
        // on a reset past a window and its deadline.
        for (&id, r) in &sim.waiting {
            let since = r.arrived;
            assert!(
                sim.now <= since + setup.window_ms + 2000 + TIMEOUT_MS + 100 + TICK_MS,
                "#{id} stranded since {since}"
            );
        }
    }
    sim.finish();
    let most_held = sim.check_bounds();
    // H, the leases held: at most `max_lease` requests' worth per worker, plus what the
    // waiters' calls got for waiters that then left, were refused, or still wait.
    let most_hits = sim.most_hits();
    for u in UNITS {
        let leases = setup.workers as u64 * setup.max_lease * most_hits[u];
        assert!(
            most_held[u] <= leases + most_waiting(&sim.waited, u, 2 * 1000 + 200),
            "unit {u}: held {} > {leases} + waiters'",
            most_held[u]
        );
    }
    assert!(sim.admitted.iter().filter(|r| r.counted).count() as u64 <= sim.service.counted);
}

/// The most units of `u` that requests waiting within `span` ms of each other asked for.
fn most_waiting(waited: &[(u64, u64, Units)], u: usize, span: u64) -> u64 {
    let mut most = 0;
    for &(_, until, _) in waited {
        let near: u64 =
            waited.iter().filter(|&&(from, to, _)| from <= until && to + span >= until).map(|&(_, _, h)| h[u]).sum();
        most = most.max(near);
    }
    most
}

fn spread(events: Vec<Event>, workers: usize) -> Vec<Event> {
    events
        .into_iter()
        .map(|e| match e {
            Event::Arrive { w, gap, may_wait, used, percent, lasts } => {
                Event::Arrive { w: w % workers, gap, may_wait, used, percent, lasts }
            }
            Event::Leave { w, gap } => Event::Leave { w: w % workers, gap },
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn workers_sharing_one_service_hold_its_limits(
        workers in 1usize..5,
        requests in prop_oneof![Just(5u64), Just(40), Just(200)],
        tokens in prop_oneof![Just(500u64), Just(5_000), Just(50_000)],
        cost in prop_oneof![Just(2_000u64), Just(20_000), Just(1_000_000)],
        max_lease in prop_oneof![Just(1u64), Just(4), Just(32)],
        accounting in prop_oneof![Just(Accounting::Reserve), Just(Accounting::ChargeAfter)],
        seed in any::<u64>(),
        events in events(4),
    ) {
        let setup = Setup {
            workers,
            limits: [requests, tokens, cost],
            max_lease,
            accounting,
            window_ms: 1000,
            lost_pct: 2,
        };
        run(setup, seed, &spread(events, workers));
    }
}

/// Two Envoys of two workers each, one service; requests use 50 to 150 tokens and estimate 10×
/// that, their answers last 100 to 900 ms, and twice as many arrive as the token limit allows.
/// `Reserve` refunds what the estimates held, so the instances admit at least 85% of the limit ÷
/// actual usage; without settlement they would admit a tenth. (In flight, a request holds its
/// estimate: what is admitted tends to `1 / (1 + (estimate / usage - 1) × duration / window)`
/// of the limit, 93% here.)
#[test]
fn estimates_ten_times_usage_still_admit_most_of_the_limit() {
    let window_ms = 60_000;
    let token_limit = 200_000;
    let setup = Setup {
        workers: 4,
        limits: [1_000_000, token_limit, u64::MAX / 4],
        max_lease: 256,
        accounting: Accounting::Reserve,
        window_ms,
        lost_pct: 0,
    };
    let mut sim = Sim::new(setup, 7);
    let windows = 10;
    let mut id = 0;
    // 200,000 tokens a minute at 100 a request: 2,000 requests, 33 a second; 67 a second arrive.
    while sim.now < windows * window_ms {
        id += 1;
        let gap = sim.rand(30);
        sim.advance(sim.now + gap);
        let (w, used, lasts) = (sim.rand(4) as usize, 50 + sim.rand(101), 100 + sim.rand(801));
        sim.arrive(id, w, 0, used, 1000, lasts);
    }
    sim.finish();
    sim.check_bounds();
    let admitted: u64 = sim.admitted.iter().map(|r| r.used[TOKENS]).sum();
    let allowed = token_limit * windows;
    assert!(
        admitted * 100 >= allowed * 85,
        "admitted {admitted} tokens of usage, {}% of the {allowed} the limit allows",
        admitted * 100 / allowed
    );
    assert!(admitted <= allowed + token_limit / 10, "{admitted} > {allowed}");
}
