//! A worker's gauges: host calls, so each is written only when its value changed, and the
//! provider's own view (which changes with nearly every answer) only on the tick.

use super::metrics::Metrics;
use crate::signals::Signals;
use crate::time::Instant;
use crate::worker::Readout;
use std::cell::Cell;

pub struct Gauges {
    tokens: Cell<u64>,
    token_bucket: Cell<u64>,
    waiting: Cell<[u32; 4]>,
    /// When the queue depths were last read again for waiters elsewhere.
    pub waiting_refreshed: Cell<Instant>,
    /// When the tenant table was last counted.
    pub census: Cell<Instant>,
    /// The provider's remaining and limit, requests and tokens: as last heard, and as last
    /// published.
    provider_heard: Cell<[Option<u64>; 4]>,
    provider_published: Cell<[Option<u64>; 4]>,
    /// Requests in flight and the limit, as last published.
    slots: Cell<(u64, u64)>,
}

impl Default for Gauges {
    fn default() -> Gauges {
        Gauges {
            tokens: Cell::new(u64::MAX),
            token_bucket: Cell::new(u64::MAX),
            waiting: Cell::new([u32::MAX; 4]),
            waiting_refreshed: Cell::new(Instant::ZERO),
            census: Cell::new(Instant::ZERO),
            provider_heard: Cell::new([None; 4]),
            provider_published: Cell::new([None; 4]),
            slots: Cell::new((u64::MAX, u64::MAX)),
        }
    }
}

impl Gauges {
    /// Whether the last published depths show anyone waiting (then they are read again).
    pub fn anyone_waiting(&self) -> bool {
        self.waiting.get() != [0; 4]
    }

    /// Publishes process-wide queue depths and the bucket levels (only what changed).
    pub fn publish(&self, m: &Metrics, readout: Option<Readout>) {
        let Some((waiting, tokens, token_bucket)) = readout else { return };
        if let Some(t) = token_bucket {
            let whole = t.max(0.0) as u64;
            if self.token_bucket.replace(whole) != whole {
                m.tokens.bucket.record(whole);
            }
        }
        if self.waiting.replace(waiting) != waiting {
            m.depths(waiting);
        }
        let whole = tokens.max(0.0) as u64;
        if self.tokens.replace(whole) != whole {
            m.bucket_tokens.record(whole);
        }
    }

    /// Publishes requests in flight and the in-flight limit (only what changed).
    pub fn slots(&self, m: &Metrics, readout: Option<crate::worker::SlotReadout>) {
        let Some((limit, out)) = readout else { return };
        let (limit, out) = (limit.max(0.0) as u64, u64::from(out));
        let (was_limit, was_out) = self.slots.replace((limit, out));
        if out != was_out {
            m.in_flight.record(out);
        }
        if limit != was_limit {
            m.in_flight_limit.record(limit);
        }
    }

    /// The provider's own remaining and limits, as an answer said them.
    pub fn heard(&self, s: &Signals) {
        let now = [s.remaining_requests, s.remaining_tokens, s.limit_requests, s.limit_tokens];
        let before = self.provider_heard.get();
        self.provider_heard.set([0, 1, 2, 3].map(|i| now[i].or(before[i])));
    }

    /// Publishes the provider's own remaining and limits, beside our buckets (only what changed).
    pub fn provider(&self, m: &Metrics) {
        let (now, before) = (self.provider_heard.get(), self.provider_published.get());
        let p = &m.provider;
        let gauges = [p.remaining_requests, p.remaining_tokens, p.limit_requests, p.limit_tokens];
        for ((v, was), gauge) in now.into_iter().zip(before).zip(gauges) {
            if let Some(v) = v.filter(|_| v != was) {
                gauge.record(v);
            }
        }
        self.provider_published.set(now);
    }
}
