//! Deterministic simulation: several workers share one store while a seeded random schedule
//! interleaves arrivals, ticks, provider answers from before and after a trip (429s with and
//! without timing, successes), lost probes, client disconnects, lost CAS writes and clock steps.
//! proptest shrinks a failing schedule to a short, readable list of events.
//!
//! Properties, checked after every event:
//! - no client is told to wait past the provider's reset plus rounding and its turn at the
//!   bucket's pace (and the no-timing back-off, which grows only when a probe fails);
//! - at most one probe per half-open period: every probe number is let through once, and a probe
//!   a tick starts is sent by that tick, never left behind the requests waiting for it;
//! - no waiter is left paused once its deadline passes (after its worker's tick);
//! - once every worker has ticked, the shared waiter counts equal the waiters that exist.

use llm_ratelimit::admission::{SharedBucket, HEARTBEAT};
use llm_ratelimit::breaker::{Gate, Mode};
use llm_ratelimit::config::Config;
use llm_ratelimit::priority::Priority;
use llm_ratelimit::signals::Signals;
use llm_ratelimit::store::{self, MemStore};
use llm_ratelimit::time::{Duration, Instant};
use llm_ratelimit::worker::{Admission, Arrival, Attempt, Refusal, Worker};
use proptest::prelude::*;
use std::collections::{HashMap, HashSet};

const START_MS: u64 = 1_700_000_000_000;
const WINDOW_MS: u64 = 3_000;
const QUOTA: u32 = 4;
const BACKOFF_MS: u64 = 1_000;

#[derive(Clone, Debug)]
enum Event {
    Arrive {
        worker: usize,
        class: usize,
    },
    Tick {
        worker: usize,
    },
    TickAll,
    Advance {
        ms: u64,
    },
    /// The provider answers in-flight request `pick` (modulo how many are in flight).
    Answer {
        pick: usize,
    },
    /// In-flight request `pick` never answers (a lost probe, a dropped connection).
    Lose {
        pick: usize,
    },
    /// The client of waiting request `pick` goes away.
    Disconnect {
        pick: usize,
    },
    /// The next `n` shared-data writes lose their compare-and-swap.
    Conflicts {
        n: u32,
    },
    /// The wall clock steps back.
    StepBack {
        ms: u64,
    },
}

fn event(workers: usize) -> impl Strategy<Value = Event> {
    prop_oneof![
        6 => (0..workers, 0..4usize).prop_map(|(worker, class)| Event::Arrive { worker, class }),
        4 => (0..workers).prop_map(|worker| Event::Tick { worker }),
        1 => Just(Event::TickAll),
        3 => (1..1_500u64).prop_map(|ms| Event::Advance { ms }),
        5 => (0..64usize).prop_map(|pick| Event::Answer { pick }),
        1 => (0..64usize).prop_map(|pick| Event::Lose { pick }),
        1 => (0..64usize).prop_map(|pick| Event::Disconnect { pick }),
        1 => (1..40u32).prop_map(|n| Event::Conflicts { n }),
    ]
}

/// How the provider tells its quota.
#[derive(Clone, Copy, Debug)]
enum Style {
    /// Remaining and reset on every answer (OpenAI-like).
    Headers,
    /// Only `Retry-After` on 429s.
    RetryAfter,
    /// Nothing at all: the filter must back off.
    Silent,
}

/// A request on its way to the provider: the provider already decided its answer when it
/// arrived there.
struct InFlight {
    worker: usize,
    probe: Option<u32>,
    status: u16,
    signals: Signals,
}

struct Sim {
    store: MemStore,
    workers: Vec<Worker>,
    style: Style,
    /// The true time; workers read `now + skew`.
    now: u64,
    skew: i64,
    next_id: u32,
    /// Provider: the window's start and how much of it is used.
    window: u64,
    used: u32,
    in_flight: Vec<InFlight>,
    /// Waiting requests: id -> (worker, deadline in true time).
    waiting: HashMap<u32, (usize, u64)>,
    probes: HashSet<u32>,
    /// Failed probes in a row so far: how far the no-timing back-off may have grown.
    failed_probes: u32,
    check_told: bool,
}

impl Sim {
    fn new(workers: usize, style: Style) -> Sim {
        let config = Config::parse(
            br#"{"bucket":{"capacity":1000,"refill_rate":1000},
                 "priorities":{"LOW":{"max_wait_ms":800},"NORMAL":{"max_wait_ms":5000},
                               "HIGH":{"max_wait_ms":8000},"CRITICAL":{"max_wait_ms":20000}},
                 "provider":{"backoff_ms":1000,"max_backoff_ms":8000,"probe_timeout_ms":2000}}"#,
        )
        .unwrap();
        Sim {
            store: MemStore::default(),
            workers: (0..workers).map(|i| Worker::new(config.clone(), 1000 + i as u64)).collect(),
            style,
            now: START_MS,
            skew: 0,
            next_id: 1,
            window: START_MS,
            used: 0,
            in_flight: Vec::new(),
            waiting: HashMap::new(),
            probes: HashSet::new(),
            failed_probes: 0,
            check_told: true,
        }
    }

    /// What the workers read from the wall clock.
    fn clock_ms(&self) -> u64 {
        self.now.saturating_add_signed(self.skew)
    }

    fn window_end(&self) -> u64 {
        self.window + WINDOW_MS
    }

    /// The latest instant a client may be told to come back: the provider's reset (on the
    /// workers' clock) plus rounding, or the back-off when the provider says nothing.
    fn latest_retry_ms(&self) -> u64 {
        let reset = self.window_end().saturating_add_signed(self.skew);
        // Without timing (or with a reset already past, for a 429 answered after its window
        // rolled over) the filter backs off: doubled per failed probe, never otherwise.
        let backoff = (BACKOFF_MS << self.failed_probes.min(3)).min(8_000);
        // A hold or back-off may start just before the window turns over; a waiter's turn
        // behind the others comes on top, at the bucket's pace (1000/s, LOW at a 0.1 weight).
        let turns = self.waiting.len() as u64 * 100;
        reset.max(self.clock_ms()) + backoff + 1_000 + turns
    }

    fn roll_window(&mut self) {
        while self.now >= self.window_end() {
            self.window += WINDOW_MS;
            self.used = 0;
        }
    }

    /// The provider receives a request now and decides its answer.
    fn send(&mut self, worker: usize, probe: Option<u32>) {
        self.roll_window();
        if let Some(n) = probe {
            assert!(self.probes.insert(n), "probe {n} let through twice");
        }
        let ok = self.used < QUOTA;
        if ok {
            self.used += 1;
        }
        let reset = self.window_end().saturating_add_signed(self.skew);
        let remaining = u64::from(QUOTA - self.used);
        let signals = match (self.style, ok) {
            (Style::Headers, _) => Signals {
                remaining_requests: Some(remaining),
                limit_requests: Some(u64::from(QUOTA)),
                requests_reset_ms: Some(reset),
                throttled: !ok,
                ..Signals::default()
            },
            (Style::RetryAfter, false) => Signals { retry_at_ms: Some(reset), throttled: true, ..Signals::default() },
            (_, false) => Signals { throttled: true, ..Signals::default() },
            (_, true) => Signals::default(),
        };
        let status = if ok { 200 } else { 429 };
        self.in_flight.push(InFlight { worker, probe, status, signals });
    }

    fn told(&mut self, r: &Refusal) {
        self.waiting.remove(&r.id);
        let at = self.clock_ms() + r.wait.as_millis_ceil();
        let rounded = self.clock_ms() + r.wait.as_secs_ceil() * 1000;
        let latest = self.latest_retry_ms();
        assert!(
            !self.check_told || at.min(rounded) <= latest,
            "{:?} told to come back in {} ms, after the provider's reset + rounding ({} ms away)",
            r.reason,
            at - self.clock_ms(),
            latest - self.clock_ms()
        );
    }

    fn run(&mut self, e: &Event) {
        let now_ms = self.clock_ms();
        let now_ns = now_ms * 1_000_000;
        match *e {
            Event::Arrive { worker, class } => {
                let id = self.next_id;
                self.next_id += 1;
                let class = Priority::ALL[class];
                let w = &mut self.workers[worker];
                let gate = w.gate(&self.store, Instant::from_millis(now_ms)).unwrap_or(Gate::Pass);
                let arrival = Arrival { id, class, tenant: None, need: None, gate };
                let Ok(decision) = w.admit(&self.store, arrival, Instant::from_nanos(now_ns)) else { return };
                let deadline = self.now + w.config.class(class).max_wait_ms;
                match decision.admission {
                    Admission::Pass { probe } => self.send(worker, probe),
                    Admission::Wait { shed } => {
                        self.waiting.insert(id, (worker, deadline));
                        if let Some(r) = shed {
                            self.told(&r);
                        }
                    }
                    Admission::Refuse(r) => self.told(&r),
                }
            }
            Event::Tick { worker } => {
                self.tick(worker);
            }
            Event::TickAll => {
                // Every worker ticks, whatever the others' writes did.
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
            Event::Answer { pick } if !self.in_flight.is_empty() => {
                let f = self.in_flight.remove(pick % self.in_flight.len());
                let w = &self.workers[f.worker];
                let probe_failed = f.probe.is_some() && f.status == 429;
                if let Ok((v, _, _)) =
                    w.observe(&self.store, f.status, &f.signals, f.probe, Instant::from_millis(now_ms))
                {
                    if probe_failed && v.tripped {
                        self.failed_probes += 1;
                    }
                    if f.status == 200 && v.closed {
                        self.failed_probes = 0;
                    }
                    if let (429, Some(at)) = (f.status, v.retry_at.map(|t| t.as_millis())) {
                        let r = Refusal {
                            id: 0,
                            class: Priority::Normal,
                            reason: llm_ratelimit::reply::Reason::BreakerOpen,
                            wait: Duration::from_millis(at.saturating_sub(now_ms)),
                            tokens: 0.0,
                            retry: true,
                            queued: None,
                        };
                        self.told(&r);
                    }
                }
            }
            Event::Lose { pick } if !self.in_flight.is_empty() => {
                self.in_flight.remove(pick % self.in_flight.len());
            }
            Event::Disconnect { pick } if !self.waiting.is_empty() => {
                let mut ids: Vec<u32> = self.waiting.keys().copied().collect();
                ids.sort_unstable();
                let id = ids[pick % ids.len()];
                let (worker, _) = self.waiting.remove(&id).unwrap();
                assert!(
                    self.workers[worker].leave(&self.store, id, Instant::from_nanos(now_ns)).is_some(),
                    "waiter {id} was not queued"
                );
            }
            Event::Conflicts { n } => self.store.conflicts.set(n),
            Event::StepBack { ms } => {
                // Workers tick every few milliseconds: they see the time just before the step.
                for w in 0..self.workers.len() {
                    self.tick(w);
                }
                self.skew -= ms as i64;
                for w in 0..self.workers.len() {
                    self.tick(w);
                }
            }
            _ => {}
        }
    }

    /// Ticks `worker`; true if a shared-data write failed.
    fn tick(&mut self, worker: usize) -> bool {
        let now_ms = self.clock_ms();
        let before = self.workers[worker].provider_state(&self.store).ok();
        let t = self.workers[worker].tick(&self.store, Instant::from_nanos(now_ms * 1_000_000));
        for r in &t.released {
            assert_eq!(self.waiting.remove(&r.id).map(|(w, _)| w), Some(worker), "released a request it did not hold");
            self.send(worker, r.probe);
        }
        // A probe this tick started goes at once: nothing waits behind it.
        if let (Some(b), Ok(a)) = (before, self.workers[worker].provider_state(&self.store)) {
            if a.mode == Mode::HalfOpen && a.probe != b.probe && a.probe_at == Instant::from_millis(now_ms) {
                assert!(self.probes.contains(&a.probe), "probe {} started by a tick but not sent", a.probe);
            }
        }
        for r in &t.expired {
            assert!(self.waiting.contains_key(&r.id), "expired a request that was not waiting");
            self.told(r);
        }
        // No waiter of this worker is left paused past its deadline.
        for (id, (w, deadline)) in &self.waiting {
            if *w == worker {
                assert!(self.workers[worker].is_waiting(*id), "waiter {id} lost without an answer");
                assert!(*deadline > self.now, "waiter {id} still paused {} ms past its deadline", self.now - deadline);
            }
        }
        !t.errors.is_empty()
    }

    /// Every worker has just ticked: the shared counts are exactly the waiters that exist.
    fn check_counts(&mut self) {
        let now_ms = self.clock_ms();
        let Ok(Some(shared)) = store::read::<SharedBucket>(&self.store, self.workers[0].bucket_key()) else { return };
        let shared = shared.waiting(u64::MAX, [0; 4], Instant::from_millis(now_ms));
        let mut local = [0u32; 4];
        for w in &self.workers {
            for (l, c) in local.iter_mut().zip(w.local_counts()) {
                *l += c;
            }
        }
        assert_eq!(shared, local, "shared waiter counts drifted from the queues");
        let existing = self.waiting.len() as u32;
        assert_eq!(local.iter().sum::<u32>(), existing, "queues and the waiters that exist differ");
    }
}

/// Runs `events`, then lets time pass until every deadline has; `check_told` checks what
/// clients are told against the provider's reset (meaningless once the clock steps).
fn simulate(workers: usize, style: Style, events: &[Event], check_told: bool) {
    let mut sim = Sim::new(workers, style);
    sim.check_told = check_told;
    for e in events {
        sim.run(e);
    }
    // Settle: time passes past every deadline with every worker ticking; nothing is stranded.
    for _ in 0..40 {
        sim.now += 1_000;
        sim.store.conflicts.set(0);
        for w in 0..sim.workers.len() {
            let _ = sim.tick(w);
        }
        while !sim.in_flight.is_empty() {
            sim.run(&Event::Answer { pick: 0 });
        }
    }
    sim.store.conflicts.set(0);
    for w in 0..sim.workers.len() {
        let _ = sim.tick(w);
    }
    sim.check_counts();
    assert!(sim.waiting.is_empty(), "waiters left paused after every deadline: {:?}", sim.waiting);
}

fn style() -> impl Strategy<Value = Style> {
    prop_oneof![Just(Style::Headers), Just(Style::RetryAfter), Just(Style::Silent)]
}

fn cases() -> u32 {
    std::env::var("SIM_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(2_000)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn provider_state_and_queue_stay_right_under_any_interleaving(
        (workers, events) in (1..4usize).prop_flat_map(|w| (Just(w), proptest::collection::vec(event(w), 1..120))),
        style in style(),
    ) {
        simulate(workers, style, &events, true);
    }

    #[test]
    fn clock_steps_strand_no_waiter_and_cause_no_drift(
        events in proptest::collection::vec(
            prop_oneof![8 => event(2), 1 => (1..5_000u64).prop_map(|ms| Event::StepBack { ms })], 1..120),
    ) {
        // With the clock stepping, told instants are on a clock the provider does not share:
        // only stranding and drift are checked here.
        simulate(2, Style::Headers, &events, false);
    }
}

/// Envoy runs a worker per hardware thread (96 or more on large hosts): with every one of them
/// holding waiters, each sees the exact process-wide count, none cut off.
#[test]
fn waiters_of_more_than_a_hundred_workers_are_all_counted() {
    const WORKERS: usize = 130;
    let config = Config::parse(
        br#"{"bucket":{"capacity":1,"refill_rate":0.1,"burst_allowance":0},
             "priorities":{"NORMAL":{"max_wait_ms":3600000}}}"#,
    )
    .unwrap();
    let store = MemStore::default();
    let mut workers: Vec<Worker> =
        (0..WORKERS).map(|i| Worker::new(config.clone(), 0x9e37_79b9_7f4a_7c15 ^ i as u64)).collect();
    let (now_ms, mut id) = (START_MS, 1);
    for (i, w) in workers.iter_mut().enumerate() {
        // The first request takes the only token; the rest wait: 1, 2 or 3 per worker.
        for _ in 0..(1 + i % 3 + usize::from(i == 0)) {
            let gate = w.gate(&store, Instant::from_millis(now_ms)).unwrap();
            let arrival = Arrival { id, class: Priority::Normal, tenant: None, need: None, gate };
            let d = w.admit(&store, arrival, Instant::from_nanos(now_ms * 1_000_000)).unwrap();
            assert!(matches!(d.admission, Admission::Wait { .. } | Admission::Pass { .. }), "{:?}", d.admission);
            id += 1;
        }
    }
    let total: u32 = workers.iter().map(|w| w.local_counts()[Priority::Normal.index()]).sum();
    assert_eq!(total, (0..WORKERS as u32).map(|i| 1 + i % 3).sum::<u32>());
    let shared: SharedBucket = store::read(&store, workers[0].bucket_key()).unwrap().unwrap();
    for w in &workers {
        let seen = shared.waiting(w.id, w.local_counts(), Instant::from_millis(now_ms + 10));
        assert_eq!(seen[Priority::Normal.index()], total, "worker {:x} sees a wrong total", w.id);
    }
    // Every worker's heartbeat keeps it so.
    for w in &mut workers {
        w.tick(&store, Instant::from_nanos((now_ms + HEARTBEAT.as_millis()) * 1_000_000));
    }
    let shared: SharedBucket = store::read(&store, workers[0].bucket_key()).unwrap().unwrap();
    assert_eq!(
        shared.waiting(u64::MAX, [0; 4], Instant::from_millis(now_ms + HEARTBEAT.as_millis()))
            [Priority::Normal.index()],
        total
    );
}

/// The admission filter and the observer of one worker, over one store: the provider said
/// nothing about timing, so the breaker opened on a 1 s guess and one probe must go first.
fn tripped_without_timing() -> (MemStore, Worker, Worker) {
    let store = MemStore::default();
    let admission = Worker::new(Config::parse(br#"{"role":"admission"}"#).unwrap(), 0x1111);
    let observer = Worker::new(Config::parse(br#"{"role":"observer"}"#).unwrap(), 0x2222);
    admission.ensure_shared(&store, Instant::from_nanos(START_MS * 1_000_000)).unwrap();
    observer.observe(&store, 429, &Signals::default(), None, Instant::from_millis(START_MS)).unwrap();
    (store, admission, observer)
}

/// The router's retries held in the observer, decided again whenever their hold ends (as the host
/// does): none may go before the probe's answer; one of them may be the probe when none is out.
/// The probe's number, if one of them became it.
fn held_retries_wait(observer: &Worker, store: &MemStore, held: &mut [u64], now_ms: u64) -> Option<u32> {
    let mut probe = None;
    for until in held.iter_mut().filter(|u| **u <= now_ms) {
        match observer.attempt(store, Priority::Normal, Instant::from_millis(now_ms)).unwrap() {
            Attempt::Hold { until: at } => {
                let until_ms = at.as_millis();
                assert!(until_ms > now_ms, "held until {until_ms}, now {now_ms}");
                *until = until_ms;
            }
            Attempt::Probe { probe: p } if probe.is_none() => {
                probe = Some(p);
                *until = u64::MAX; // gone upstream
            }
            other => panic!("a held retry at {} ms: {other:?} before the probe's answer", now_ms - START_MS),
        }
    }
    probe
}

#[test]
fn held_retries_wait_for_the_probes_answer() {
    for (probe_succeeds, arrival_probes) in [(true, true), (false, true), (true, false), (false, false)] {
        let (store, mut admission, observer) = tripped_without_timing();
        // Five retries of requests the provider refused, held in the observer until the back-off.
        let mut held = [START_MS + 10; 5];
        assert_eq!(held_retries_wait(&observer, &store, &mut held, START_MS + 10), None);
        assert!(held.iter().all(|&u| u == START_MS + 1_000), "{held:?}");
        // The back-off ends: one probe goes, an arrival or one of the retries, never both.
        let at = START_MS + 1_000;
        let probe = if arrival_probes {
            let gate = admission.gate(&store, Instant::from_millis(at)).unwrap();
            let arrival = Arrival { id: 1, class: Priority::Normal, tenant: None, need: None, gate };
            let d = admission.admit(&store, arrival, Instant::from_nanos(at * 1_000_000)).unwrap();
            let Admission::Pass { probe: Some(probe) } = d.admission else { panic!("{:?}", d.admission) };
            assert_eq!(held_retries_wait(&observer, &store, &mut held, at), None, "a second probe");
            probe
        } else {
            let probe = held_retries_wait(&observer, &store, &mut held, at).expect("a retry probes");
            let gate = admission.gate(&store, Instant::from_millis(at)).unwrap();
            assert!(matches!(gate, Gate::Hold { .. }), "an arrival beside the probe: {gate:?}");
            probe
        };
        for t in [1_001, 1_500, 2_000, 2_600] {
            assert_eq!(held_retries_wait(&observer, &store, &mut held, START_MS + t), None);
        }
        let at = START_MS + 2_700;
        let waiting = held.iter().filter(|&&u| u != u64::MAX).count();
        if probe_succeeds {
            let (v, _, _) =
                observer.observe(&store, 200, &Signals::default(), Some(probe), Instant::from_millis(at)).unwrap();
            assert!(v.closed);
            for _ in 0..waiting {
                assert_eq!(
                    observer.attempt(&store, Priority::Normal, Instant::from_millis(at + 1)).unwrap(),
                    Attempt::Go
                );
            }
        } else {
            let (v, _, _) =
                observer.observe(&store, 429, &Signals::default(), Some(probe), Instant::from_millis(at)).unwrap();
            assert!(v.tripped);
            // Open again for a doubled back-off: held until then (or refused if they may not wait).
            for _ in 0..waiting {
                let a = observer.attempt(&store, Priority::Normal, Instant::from_millis(at + 1)).unwrap();
                assert_eq!(a, Attempt::Hold { until: Instant::from_millis(at + 2_000) });
            }
        }
    }
}

#[test]
fn a_held_retry_is_the_probe_when_no_request_arrives_and_another_when_it_is_lost() {
    // Only retries arrive: one of them probes; the rest wait for its answer. Its answer never
    // comes: after the probe timeout (10 s) another retry probes, never two at once.
    let (store, _admission, observer) = tripped_without_timing();
    let mut held = [START_MS + 1_000; 4];
    let mut probes = Vec::new();
    for t in (1_000..=11_000).step_by(250) {
        if let Some(p) = held_retries_wait(&observer, &store, &mut held, START_MS + t) {
            probes.push((t, p));
        }
    }
    assert_eq!(probes.len(), 2, "{probes:?}");
    assert_eq!((probes[0].0, probes[1].0), (1_000, 11_000), "{probes:?}");
    assert_ne!(probes[0].1, probes[1].1);
}
