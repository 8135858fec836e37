//! The local 429s a worker sends: built once per distinct answer, sent again while refusals say
//! the same (a storm of refusals within a millisecond says the same few values).

use super::api::Status;
use super::calls;
use super::metrics::Metrics;
use crate::config::Config;
use crate::priority::Priority;
use crate::quota::Quota;
use crate::reply::{self, Limited};
use crate::worker::Refusal;
use std::cell::Cell;

/// What a local 429 says depends on: class, reason, wait, remaining, retry, queued time, and the
/// quota window's limit for a quota's refusal.
type Key = (Priority, reply::Reason, u64, u64, bool, Option<u64>, Option<u64>);

/// A local 429, serialized.
struct Serialized {
    key: Key,
    headers: Vec<u8>,
    body: String,
}

pub struct Replies {
    /// Per class, the bucket level it may not spend below (the core's), for `remaining`.
    floors: [f64; 4],
    /// Seconds to refill the whole bucket: the window in `RateLimit-Policy`.
    pub window_s: u64,
    last: Cell<Option<Serialized>>,
    /// The `Retry-After` last sampled into `retry_after_s` this tick (0: none; one is ≥ 1 s).
    sampled_retry_after: Cell<u64>,
}

impl Replies {
    pub fn new(c: &Config, floors: [f64; 4]) -> Replies {
        Replies {
            floors,
            window_s: (c.bucket.capacity as f64 / c.bucket.refill_rate).ceil().max(1.0) as u64,
            last: Cell::new(None),
            sampled_retry_after: Cell::new(0),
        }
    }

    /// A new tick: the next `Retry-After` is sampled again.
    pub fn tick(&self) {
        self.sampled_retry_after.set(0);
    }

    /// Answers the current request with the local 429 for `r`; `window`: the quota that refused it.
    pub fn send(&self, c: &Config, metrics: &Metrics, r: &Refusal, window: Option<&Quota>) -> Result<(), Status> {
        let wait_ms = r.wait.as_millis_ceil();
        let secs = reply::retry_after_secs(wait_ms);
        if self.sampled_retry_after.replace(secs) != secs {
            metrics.provider.retry_after_s.record(secs);
        }
        let remaining = (r.tokens - self.floors[r.class.index()]).max(0.0) as u64;
        let key =
            (r.class, r.reason, wait_ms, remaining, r.retry, r.queued.map(|q| q.as_millis()), window.map(|q| q.limit));
        // Taken out while the host runs (it may call back into this worker), put back after.
        let reply = match self.last.take() {
            Some(last) if last.key == key => last,
            _ => self.build(c, r, key, window),
        };
        let sent = calls::send_serialized(429, &reply.headers, reply.body.as_bytes());
        self.last.set(Some(reply));
        sent
    }

    fn build(&self, c: &Config, r: &Refusal, key: Key, window: Option<&Quota>) -> Serialized {
        let (_, _, wait_ms, remaining, _, queued_ms, _) = key;
        let (_, mut headers, body) = reply::too_many_requests(&Limited {
            name: &c.name,
            priority: r.class,
            reason: r.reason,
            wait_ms,
            remaining,
            quota: c.bucket.capacity,
            window_s: self.window_s,
            retry: r.retry,
            window: window.map(|q| (q.unit, q.limit, period_name(q.period))),
        });
        if let Some(ms) = queued_ms {
            headers.push(("x-ratelimit-queued-ms", ms.to_string()));
        }
        let pairs: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        Serialized { key, headers: crate::header_map::serialize(&pairs), body }
    }
}

/// The configuration's word for `p`: "day", "month".
fn period_name(p: crate::calendar::Period) -> &'static str {
    crate::calendar::Period::NAMES.iter().find(|(_, q)| *q == p).map_or("day", |(n, _)| n)
}
