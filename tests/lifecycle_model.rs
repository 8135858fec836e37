//! A model-based test of the request lifecycle: random interleavings of arrivals (with bodies in
//! chunks and trailers), client resets, ticks, provider answers (200, 429 with and without
//! timing, streams), rate limit service answers and failures, and plugin reloads, on several
//! workers over one shared store, driven through `dispatch` as Envoy drives it. Seeded and
//! shrinking (proptest); `PROPTEST_CASES=100000 cargo test --test lifecycle_model` is the long run.
//!
//! Invariants, checked after every step and at the end:
//! - each request goes upstream at most once, is answered locally at most once, never both;
//! - nothing resumes or answers a request after its `on_done`;
//! - requests upstream never exceed the bucket (capacity + burst + refill × time);
//! - at the end every request that its client did not abandon went upstream or was answered
//!   (none stranded), per class admitted + rejected + expired + shed + cancelled = arrivals, and
//!   the bucket's tokens plus those spent equal what it started with (none lost or minted), with
//!   the global gate too (a request it refuses gives its local token back).

mod fake_envoy;
use fake_envoy::*;
use llm_ratelimit::admission::SharedBucket;
use llm_ratelimit::config::Config;
use llm_ratelimit::host::double::Process;
use llm_ratelimit::store::{MemStore, Store};
use proptest::prelude::*;
use std::sync::Arc;

const T0: u64 = 1_700_000_000_000_000_000;
const CLASSES: [&str; 4] = ["critical", "high", "normal", "low"];
const HEADER_CLASSES: [&str; 4] = ["CRITICAL", "HIGH", "NORMAL", "LOW"];
/// Bucket: 4 + 1 burst, refilled so slowly that the count of tokens is exact within a run.
const CAPACITY: f64 = 4.0;
const BURST: f64 = 1.0;
const REFILL: f64 = 0.001;
const MAX_WAIT_MS: u64 = 2_000;
/// The failover target's bucket (with token limits), refilled as slowly.
const FAILOVER_CAPACITY: f64 = 2.0;

fn config(tokens: bool, global: bool, generation: u32) -> String {
    // With token limits, every gate that settles from usage too: tenant tokens, a day window
    // of requests, prices; and slots in flight, and a failover target for CRITICAL.
    let tokens = if tokens {
        r#","tokens":{"capacity":1000000000},"tenant":{"capacity":1000000,"tokens":{"capacity":1000000000}},
            "prices":{"default":{"input":1,"output":1}},"quotas":[{"unit":"requests","per":"day","limit":1000000}],
            "in_flight":{"max":3},
            "failover":[{"provider":{"name":"fb","bucket":{"capacity":2,"refill_rate":0.001,"burst_allowance":0},"in_flight":{"max":1}},"classes":["CRITICAL"]}]"#
    } else {
        ""
    };
    let global = if global { r#","global":{"cluster":"rls","timeout_ms":300,"failure_mode":"deny"}"# } else { "" };
    format!(
        r#"{{"name":"m","bucket":{{"capacity":{CAPACITY},"refill_rate":{REFILL},"burst_allowance":{BURST}}},
            "classify":{{"trust_header":true}},"queue":{{"tick_ms":10}},
            "priorities":{{"CRITICAL":{{"queue_limit":1,"max_wait_ms":{MAX_WAIT_MS}}},
                          "HIGH":{{"queue_limit":1,"max_wait_ms":{MAX_WAIT_MS}}},
                          "NORMAL":{{"queue_limit":2,"max_wait_ms":{MAX_WAIT_MS}}},
                          "LOW":{{"queue_limit":2,"max_wait_ms":{}}}}}{tokens}{global}}}"#,
        MAX_WAIT_MS + u64::from(generation)
    )
}

#[derive(Clone, Debug)]
enum Body {
    None,
    /// In `n` chunks, the last with END_STREAM.
    Chunks(u8),
    /// In `n` chunks, then trailers.
    Trailers(u8),
}

#[derive(Clone, Debug)]
enum Answer {
    Ok,
    Stream,
    /// 429 with `retry-after` seconds.
    Limited(u8),
    /// 429 without timing.
    LimitedBare,
}

#[derive(Clone, Debug)]
enum Op {
    Arrive {
        vm: usize,
        class: usize,
        body: Body,
    },
    /// The next body chunk (or trailers) of the `n`th request still sending.
    Send {
        n: usize,
    },
    Reset {
        n: usize,
    },
    Answer {
        n: usize,
        answer: Answer,
    },
    Tick {
        vm: usize,
    },
    Advance {
        ms: u64,
    },
    /// The rate limit service answers the oldest call of `vm`: OK, over limit, or fails.
    Rls {
        vm: usize,
        code: u8,
    },
    /// The plugin's configuration is pushed again: a new root context on every worker.
    Reload,
}

fn op() -> impl Strategy<Value = Op> {
    let body = prop_oneof![Just(Body::None), (1u8..4).prop_map(Body::Chunks), (1u8..3).prop_map(Body::Trailers),];
    let answer = prop_oneof![
        Just(Answer::Ok),
        Just(Answer::Stream),
        (1u8..5).prop_map(Answer::Limited),
        Just(Answer::LimitedBare),
    ];
    prop_oneof![
        6 => (0usize..3, 0usize..4, body).prop_map(|(vm, class, body)| Op::Arrive { vm, class, body }),
        5 => (0usize..8).prop_map(|n| Op::Send { n }),
        2 => (0usize..8).prop_map(|n| Op::Reset { n }),
        3 => (0usize..8, answer).prop_map(|(n, answer)| Op::Answer { n, answer }),
        3 => (0usize..3).prop_map(|vm| Op::Tick { vm }),
        3 => prop_oneof![1u64..50, 200u64..1500].prop_map(|ms| Op::Advance { ms }),
        2 => (0usize..3, 0u8..3).prop_map(|(vm, code)| Op::Rls { vm, code }),
        1 => Just(Op::Reload),
    ]
}

/// What the model knows of one request.
#[derive(Clone, Debug)]
struct Req {
    vm: usize,
    id: u32,
    class: usize,
    /// Body steps left to send (chunks, then trailers if `trailers`).
    chunks_left: u8,
    trailers: bool,
    sent: u8,
    /// Its client gave up (reset) before it was answered.
    abandoned: bool,
    answered_by_provider: bool,
}

struct World {
    process: Arc<Process>,
    vms: Vec<Vm>,
    reqs: Vec<Req>,
    next_id: u32,
    tokens: bool,
    global: bool,
    generation: u32,
    /// Provider 429s answered so far: each may trip the breaker, and its half-open probe goes
    /// without a request token.
    limited: usize,
}

impl World {
    fn new(workers: usize, tokens: bool, global: bool) -> World {
        let process = Process::new(T0);
        let vms = (0..workers)
            .map(|i| Vm::start(&process, 11 + i as u64, &config(tokens, global, 0)).expect("configured"))
            .collect();
        World { process, vms, reqs: Vec::new(), next_id: 100, tokens, global, generation: 0, limited: 0 }
    }

    /// The `n`th request that is still in play (not done), if any.
    fn open(&self, n: usize) -> Option<usize> {
        let open: Vec<usize> =
            (0..self.reqs.len()).filter(|&i| !self.vms[self.reqs[i].vm].lives[&self.reqs[i].id].done).collect();
        (!open.is_empty()).then(|| open[n % open.len()])
    }

    fn life(&self, i: usize) -> &Life {
        let r = &self.reqs[i];
        &self.vms[r.vm].lives[&r.id]
    }

    fn step(&mut self, op: &Op) {
        let w = self.vms.len();
        match op.clone() {
            Op::Arrive { vm, class, body } => {
                let vm = vm % w;
                let id = self.next_id;
                self.next_id += 1;
                let (chunks, trailers) = match body {
                    Body::None => (0, false),
                    Body::Chunks(n) => (n, false),
                    Body::Trailers(n) => (n, true),
                };
                let headers = chat_headers(&[("x-llm-priority", HEADER_CLASSES[class])]);
                self.reqs.push(Req {
                    vm,
                    id,
                    class,
                    chunks_left: chunks,
                    trailers,
                    sent: 0,
                    abandoned: false,
                    answered_by_provider: false,
                });
                self.vms[vm].request_headers(id, &headers, chunks == 0 && !trailers);
            }
            Op::Send { n } => {
                let Some(i) = self.open(n) else { return };
                let r = self.reqs[i].clone();
                if r.chunks_left > 0 {
                    self.reqs[i].chunks_left -= 1;
                    self.reqs[i].sent += 1;
                    let end = self.reqs[i].chunks_left == 0 && !r.trailers;
                    let body = &CHAT_BODY
                        [..CHAT_BODY.len() * usize::from(self.reqs[i].sent) / usize::from(r.sent + r.chunks_left)];
                    self.vms[r.vm].request_body(r.id, body, end);
                } else if r.trailers {
                    self.reqs[i].trailers = false;
                    self.vms[r.vm].request_trailers(r.id);
                }
            }
            Op::Reset { n } => {
                let Some(i) = self.open(n) else { return };
                let r = self.reqs[i].clone();
                if !self.life(i).answered() && !r.answered_by_provider {
                    self.reqs[i].abandoned = true;
                }
                self.vms[r.vm].done(r.id);
            }
            Op::Answer { n, answer } => {
                let Some(i) = self.open(n) else { return };
                let r = self.reqs[i].clone();
                let l = self.life(i).clone();
                let vm = &mut self.vms[r.vm];
                if l.answered() {
                    // Envoy sends our local reply back through the filter, then ends the stream.
                    let status = l.replies[0].to_string();
                    vm.response_headers(
                        r.id,
                        &[(":status", status.as_str()), ("x-llm-ratelimit-source", "local")],
                        b"{}",
                        false,
                    );
                    vm.response_body(r.id, 2, true);
                    vm.done(r.id);
                    return;
                }
                if l.upstream == 0 || r.chunks_left > 0 || r.trailers {
                    return; // no answer before the request went and was sent whole
                }
                self.reqs[i].answered_by_provider = true;
                if matches!(answer, Answer::Limited(_) | Answer::LimitedBare) {
                    self.limited += 1;
                }
                match answer {
                    Answer::Ok => {
                        let body = br#"{"usage":{"prompt_tokens":10,"completion_tokens":20,"total_tokens":30}}"#;
                        vm.response_headers(
                            r.id,
                            &[(":status", "200"), ("content-type", "application/json")],
                            body,
                            false,
                        );
                        vm.response_body(r.id, body.len(), true);
                    }
                    Answer::Stream => {
                        let body = b"data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\ndata: [DONE]\n\n";
                        vm.response_headers(
                            r.id,
                            &[(":status", "200"), ("content-type", "text/event-stream")],
                            body,
                            false,
                        );
                        vm.response_body(r.id, body.len(), false);
                        vm.response_trailers(r.id);
                    }
                    Answer::Limited(secs) => {
                        let s = secs.to_string();
                        let body = br#"{"error":{"type":"rate_limit_error"}}"#;
                        let h = [(":status", "429"), ("retry-after", s.as_str()), ("content-type", "application/json")];
                        vm.response_headers(r.id, &h, body, false);
                        vm.response_body(r.id, body.len(), true);
                    }
                    Answer::LimitedBare => {
                        vm.response_headers(r.id, &[(":status", "429")], b"", false);
                        vm.response_trailers(r.id);
                    }
                }
                vm.done(r.id);
            }
            Op::Tick { vm } => {
                self.vms[vm % w].tick();
            }
            Op::Advance { ms } => self.process.advance_ms(ms),
            Op::Rls { vm, code } => {
                let v = vm % w;
                if self.vms[v].grpc_calls.is_empty() {
                    return;
                }
                let (root, token) = self.vms[v].grpc_calls.remove(0);
                match code {
                    0 => self.vms[v].grpc_answer(root, token, vec![0x08, 0x01]),
                    1 => self.vms[v].grpc_answer(root, token, vec![0x08, 0x02]),
                    _ => self.vms[v].grpc_close(root, token, 14),
                }
            }
            Op::Reload => {
                // A new configuration: a new root context on every worker. New requests are the
                // new root's; requests in flight keep the old one, and both tick.
                self.generation += 1;
                let g = self.generation;
                let cfg = config(self.tokens, self.global, g);
                for vm in &mut self.vms {
                    assert!(vm.reload(50 + g, &cfg), "the reloaded configuration is taken");
                }
            }
        }
    }

    /// Upstream requests never exceed what the bucket holds plus its refill, and the half-open
    /// probes (at most one per provider 429); with token limits, plus what the failover target's
    /// bucket holds (its stats, written per tick, lag: they are checked at the end).
    fn check_bucket(&self) -> Result<(), TestCaseError> {
        let upstream: usize = self.vms.iter().map(Vm::upstream).sum();
        let elapsed_s = (self.process.now_ns() - T0) as f64 / 1e9;
        let target = if self.tokens { FAILOVER_CAPACITY + REFILL * elapsed_s } else { 0.0 };
        let allowed = CAPACITY + BURST + REFILL * elapsed_s + self.limited as f64 + target;
        prop_assert!(upstream as f64 <= allowed + 1e-9, "{upstream} upstream, the bucket allows {allowed}");
        Ok(())
    }

    fn check_lives(&self) -> Result<(), TestCaseError> {
        for vm in &self.vms {
            prop_assert_eq!(vm.violations(), vec![]);
        }
        self.check_bucket()
    }

    /// Everything still open ends: bodies sent, waits run out, answers given, streams closed.
    fn finish(&mut self) -> Result<(), TestCaseError> {
        for i in 0..self.reqs.len() {
            while !self.life(i).done && (self.reqs[i].chunks_left > 0 || self.reqs[i].trailers) {
                let n = (0..self.reqs.len()).filter(|&j| !self.life(j).done).position(|j| j == i).unwrap_or(0);
                self.step(&Op::Send { n });
            }
        }
        for _ in 0..20 {
            self.process.advance_ms(500);
            for v in 0..self.vms.len() {
                self.step(&Op::Tick { vm: v });
                while !self.vms[v].grpc_calls.is_empty() {
                    self.step(&Op::Rls { vm: v, code: 2 });
                }
            }
        }
        for i in 0..self.reqs.len() {
            if self.life(i).done {
                continue;
            }
            let r = self.reqs[i].clone();
            let l = self.life(i).clone();
            prop_assert!(
                l.upstream == 1 || l.answered(),
                "request {} (worker {}) stranded: {:?} {:?}",
                r.id,
                r.vm,
                l,
                r
            );
            let n = (0..self.reqs.len()).filter(|&j| !self.life(j).done).position(|j| j == i).unwrap_or(0);
            self.step(&Op::Answer { n, answer: Answer::Ok });
        }
        for v in 0..self.vms.len() {
            self.step(&Op::Tick { vm: v });
        }
        Ok(())
    }

    /// No slot in flight is left taken once every request has ended and a reloaded VM's entry has
    /// expired: the primary's and the failover target's.
    fn check_slots(&mut self) -> Result<(), TestCaseError> {
        if !self.tokens {
            return Ok(());
        }
        self.process.advance_ms(llm_ratelimit::inflight::LIVE.as_millis() + 1);
        for v in 0..self.vms.len() {
            self.step(&Op::Tick { vm: v });
        }
        let now = llm_ratelimit::time::Instant::from_nanos(self.process.now_ns());
        for name in ["m", "fb"] {
            let Some(raw) = self.process.shared(&format!("llm_ratelimit/{name}/in_flight")) else { continue };
            let store = MemStore::default();
            store.set("k", &raw, 0).expect("set");
            let s: llm_ratelimit::inflight::Shared =
                llm_ratelimit::store::read(&store, "k").expect("read").expect("in_flight decodes");
            prop_assert_eq!(s.total(0, 0, now), 0, "{}: slots left taken: {:?}", name, s.entries);
        }
        Ok(())
    }

    /// Per class: every arrival was admitted, rejected, expired, shed or cancelled, once.
    fn check_stats(&self) -> Result<(), TestCaseError> {
        for (c, class) in CLASSES.iter().enumerate() {
            let arrivals = self.reqs.iter().filter(|r| r.class == c).count() as u64;
            let sum: u64 = ["admitted", "rejected", "expired", "shed", "cancelled"]
                .iter()
                .map(|s| self.vms.iter().map(|vm| vm.stat("m", &format!("priority.{class}.{s}"))).sum::<u64>())
                .sum();
            prop_assert_eq!(sum, arrivals, "class {}: outcomes counted vs arrivals", class);
        }
        Ok(())
    }

    /// The bucket's tokens plus those spent by requests that went upstream are what it started
    /// with (plus the tiny refill): none lost, none minted.
    fn check_tokens(&self) -> Result<(), TestCaseError> {
        let raw = self.process.shared("llm_ratelimit/m/bucket").expect("bucket in shared data");
        let bucket = SharedBucket::decode(&raw).expect("bucket decodes");
        // Requests that failed over took nothing from this bucket.
        let failed_over: u64 = self.vms.iter().map(|vm| vm.stat("m", "priority.critical.failover")).sum();
        let upstream = self.vms.iter().map(Vm::upstream).sum::<usize>() - failed_over as usize;
        let elapsed_s = (self.process.now_ns() - T0) as f64 / 1e9;
        let probes: u64 = self.vms.iter().map(|vm| vm.stat("m", "breaker.probes")).sum();
        let total = bucket.level.tokens + upstream as f64;
        let start = CAPACITY + BURST;
        // A probe goes even with no token left: it takes one if there is one.
        prop_assert!(
            total >= start - 1e-6 && total <= start + REFILL * elapsed_s + probes as f64 + 1e-6,
            "bucket {} + {} upstream = {}, started with {} (refill {:.4}, {} probes; {} failed over)",
            bucket.level.tokens,
            upstream,
            total,
            start,
            REFILL * elapsed_s,
            probes,
            failed_over
        );
        if self.tokens {
            // The day window counted each request that went upstream once: none that a later
            // gate refused or that left first, none twice (a request let through when a host call
            // failed takes nothing: `errors`).
            let store = MemStore::default();
            let key = llm_ratelimit::quota::key("llm_ratelimit/m");
            let raw = self.process.shared(&key).expect("quota in shared data");
            store.set(&key, &raw, 0).expect("set");
            let config = Config::parse(config(true, self.global, 0).as_bytes()).expect("config");
            let now = llm_ratelimit::time::Instant::from_nanos(self.process.now_ns());
            let used = llm_ratelimit::quota::readout(&store, &key, &config.quotas, now).expect("readout")[0].0;
            let errors: u64 = self.vms.iter().map(|vm| vm.stat("m", "errors")).sum();
            prop_assert!(
                used <= upstream as u64 && used + errors >= upstream as u64,
                "the day window counted {used}, {upstream} went upstream ({errors} host errors)"
            );
        }
        Ok(())
    }
}

fn run(workers: usize, tokens: bool, global: bool, ops: &[Op]) -> Result<(), TestCaseError> {
    let mut world = World::new(workers, tokens, global);
    for op in ops {
        world.step(op);
        world.check_lives()?;
    }
    world.finish()?;
    world.check_lives()?;
    world.check_stats()?;
    // With the global gate too: a request the service refuses after the local bucket let it
    // through gives its token back.
    world.check_tokens()?;
    world.check_slots()?;
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1500, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn local_limits_hold_in_every_interleaving(
        workers in 1usize..=3,
        tokens in any::<bool>(),
        ops in proptest::collection::vec(op(), 1..60),
    ) {
        run(workers, tokens, false, &ops)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 700, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn with_the_global_gate_every_request_still_ends_once(
        workers in 1usize..=2,
        tokens in any::<bool>(),
        ops in proptest::collection::vec(op(), 1..60),
    ) {
        run(workers, tokens, true, &ops)?;
    }
}
