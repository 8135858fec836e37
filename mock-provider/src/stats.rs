//! Counters that tests read from `GET /mock/stats` to see what reached the upstream.

use std::collections::BTreeMap;

use serde_json::{json, Value};

#[derive(Default)]
pub struct Stats {
    pub requests: u64,
    pub ok: u64,
    pub rate_limited: u64,
    pub terminal: u64,
    /// Answered with an `x-mock-status` override.
    pub forced: u64,
    /// Requests rejected for a bad `x-mock-*` header.
    pub bad_request: u64,
    /// Answered with a fault (`--fault`, `x-mock-fault`): reset, garbage or a bad 429.
    pub faults: u64,
    pub by_priority: BTreeMap<String, u64>,
    pub by_path: BTreeMap<String, u64>,
    /// Requests being served, streams until their last byte is sent.
    pub in_flight: u64,
    pub max_in_flight: u64,
    /// Sums of the usage in 200 answers (the tokens charged to the token quota;
    /// for an OpenAI chat stream without `include_usage`, the usage it did not report).
    pub tokens_input: u64,
    pub tokens_output: u64,
    /// 200 answers sent as a stream.
    pub streamed: u64,
    /// The slots of `--capacity` (`capacity.rs`).
    pub capacity: Capacity,
}

/// Slots and their queue (`--capacity`). Without a capacity every request gets a slot at once.
#[derive(Default)]
pub struct Capacity {
    /// Requests holding a slot now (streams until their last byte is sent).
    pub in_flight: u64,
    /// Requests queued for a slot now.
    pub waiting: u64,
    pub max_in_flight_seen: u64,
    /// Requests given a slot.
    pub served: u64,
    /// Requests that had to wait for their slot.
    pub queued_total: u64,
    /// Requests answered `capacity_status` because the queue was full.
    pub overflowed: u64,
}

impl Capacity {
    /// Counts a request taking a slot.
    pub fn granted(&mut self) {
        self.in_flight += 1;
        self.served += 1;
        self.max_in_flight_seen = self.max_in_flight_seen.max(self.in_flight);
    }

    pub fn to_json(&self) -> Value {
        json!({
            "in_flight": self.in_flight,
            "waiting": self.waiting,
            "max_in_flight_seen": self.max_in_flight_seen,
            "served": self.served,
            "queued_total": self.queued_total,
            "overflowed": self.overflowed,
        })
    }
}

/// How a request was answered.
pub enum Outcome {
    Ok,
    RateLimited,
    Terminal,
    Forced,
    BadRequest,
    Fault,
    /// The capacity queue was full.
    Overflowed,
}

impl Stats {
    /// Counts an arriving LLM request (before any latency, so in-flight is visible).
    pub fn arrived(&mut self, path: &str, priority: &str) {
        self.requests += 1;
        *self.by_path.entry(path.to_string()).or_default() += 1;
        *self.by_priority.entry(priority.to_string()).or_default() += 1;
        self.in_flight += 1;
        self.max_in_flight = self.max_in_flight.max(self.in_flight);
    }

    pub fn finished(&mut self, outcome: Outcome) {
        match outcome {
            Outcome::Ok => self.ok += 1,
            Outcome::RateLimited => self.rate_limited += 1,
            Outcome::Terminal => self.terminal += 1,
            Outcome::Forced => self.forced += 1,
            Outcome::BadRequest => self.bad_request += 1,
            Outcome::Fault => self.faults += 1,
            Outcome::Overflowed => self.capacity.overflowed += 1,
        }
    }

    /// Counts the usage of a 200 answer.
    pub fn answered(&mut self, input_tokens: u64, output_tokens: u64, streamed: bool) {
        self.tokens_input += input_tokens;
        self.tokens_output += output_tokens;
        self.streamed += u64::from(streamed);
    }

    /// Zeroes everything except requests still being served (or waiting for a slot).
    pub fn reset(&mut self) {
        let c = &self.capacity;
        let capacity = Capacity {
            in_flight: c.in_flight,
            waiting: c.waiting,
            max_in_flight_seen: c.in_flight,
            ..Capacity::default()
        };
        *self = Stats { in_flight: self.in_flight, max_in_flight: self.in_flight, capacity, ..Stats::default() };
    }

    pub fn to_json(&self) -> Value {
        json!({
            "requests": self.requests,
            "ok": self.ok,
            "rate_limited": self.rate_limited,
            "terminal": self.terminal,
            "forced": self.forced,
            "bad_request": self.bad_request,
            "faults": self.faults,
            "by_priority": self.by_priority,
            "by_path": self.by_path,
            "in_flight": self.in_flight,
            "max_in_flight": self.max_in_flight,
            "tokens_input": self.tokens_input,
            "tokens_output": self.tokens_output,
            "streamed": self.streamed,
            "capacity": self.capacity.to_json(),
        })
    }
}
