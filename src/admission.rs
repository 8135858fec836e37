//! Admission: what happens to an arriving request, and which waiting request a freed token goes
//! to. Pure decisions over the process-wide state that the host keeps in one shared-data value
//! (bucket level plus how many requests of each class wait), so one compare-and-swap both takes a
//! token and keeps the queue depths right for every worker.
//!
//! An arrival takes a token at once only if no waiting request could have used it: newcomers
//! never jump ahead of the queue. Otherwise it waits if its class's queue has room and its
//! expected wait fits its class's `max_wait_ms`; when the process-wide waiting budget is full, a
//! more important arrival takes the place of the newest waiter of the least important class.

use crate::bucket::{self, Bucket};
use crate::config::Config;
use crate::priority::Priority;
use crate::reply::Reason;

const NANOS_PER_MS: u64 = 1_000_000;

/// The shared value: the bucket and the process-wide number of waiters per class.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Shared {
    pub bucket: bucket::State,
    pub waiting: [u32; 4],
}

/// What to do with an arriving request.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Arrival {
    /// Token taken: let it through.
    Admit,
    /// Pause it in its class's queue.
    Wait,
    /// Pause it, and shed the newest local waiter of class `victim` to make room.
    WaitEvicting { victim: Priority },
    /// Refuse it now; a token for its class is expected in `wait_ns`.
    Reject { reason: Reason, wait_ns: u64 },
}

/// The limits admission enforces, derived once from the configuration.
#[derive(Clone, Debug)]
pub struct Policy {
    pub bucket: Bucket,
    pub queue_enabled: bool,
    pub max_waiting: u32,
    pub floors: [f64; 4],
    pub weights: [f64; 4],
    pub queue_limits: [u64; 4],
    pub max_wait_ns: [u64; 4],
}

impl Policy {
    pub fn new(c: &Config) -> Policy {
        let b = &c.bucket;
        let bucket = Bucket::new(b.capacity, b.refill_rate, b.burst_allowance);
        Policy {
            bucket,
            queue_enabled: c.queue.enabled,
            max_waiting: c.queue.max_waiting.min(u32::MAX as u64) as u32,
            floors: c.classes.clone().map(|k| bucket.reserve_floor(k.use_burst)),
            weights: c.classes.clone().map(|k| k.weight),
            queue_limits: c.classes.clone().map(|k| k.queue_limit),
            max_wait_ns: c.classes.clone().map(|k| k.max_wait_ms.saturating_mul(NANOS_PER_MS)),
        }
    }

    /// Whether a waiting request of class `p` can take a token from `s` (already refilled).
    pub fn can_release(&self, s: &Shared, p: Priority) -> bool {
        s.bucket.tokens - 1.0 >= self.floors[p.index()] - 1e-9
    }

    /// Decides an arrival of class `p` at `now_ns`. Nothing may go upstream before
    /// `not_before_ns` (the provider asked to hold). `local_victim` is the least important class
    /// below `p` that has a waiter on this worker (only those can be shed from here). Returns the
    /// decision and the state to write back.
    pub fn arrive(
        &self,
        s: Shared,
        p: Priority,
        now_ns: u64,
        not_before_ns: u64,
        local_victim: Option<Priority>,
    ) -> (Arrival, Shared) {
        let mut s = Shared { bucket: self.bucket.refill(s.bucket, now_ns), ..s };
        let hold_ns = not_before_ns.saturating_sub(now_ns);
        let queue_ahead = Priority::ALL.iter().any(|&q| s.waiting[q.index()] > 0 && self.can_release(&s, q));
        if !queue_ahead && hold_ns == 0 {
            if let Ok(next) = self.bucket.take(s.bucket, now_ns, 1.0, self.floors[p.index()]) {
                s.bucket = next;
                return (Arrival::Admit, s);
            }
        }
        let i = p.index();
        let wait_ns = self.expected_wait_ns(&s, p, hold_ns);
        let reject = |reason| (Arrival::Reject { reason, wait_ns }, s);
        if !self.queue_enabled || wait_ns > self.max_wait_ns[i] {
            return reject(if hold_ns > 0 { Reason::ProviderHold } else { Reason::NoToken });
        }
        if u64::from(s.waiting[i]) >= self.queue_limits[i] {
            return reject(Reason::QueueFull);
        }
        let total: u32 = s.waiting.iter().sum();
        if total < self.max_waiting {
            s.waiting[i] += 1;
            return (Arrival::Wait, s);
        }
        match local_victim {
            Some(v) if v > p && s.waiting[v.index()] > 0 => {
                s.waiting[v.index()] -= 1;
                s.waiting[i] += 1;
                (Arrival::WaitEvicting { victim: v }, s)
            }
            _ => reject(Reason::QueueFull),
        }
    }

    /// Takes a token for a waiter of class `p` being released: `None` if there is none for it.
    pub fn release(&self, s: Shared, p: Priority, now_ns: u64) -> Option<Shared> {
        let next = self.bucket.take(s.bucket, now_ns, 1.0, self.floors[p.index()]).ok()?;
        let mut waiting = s.waiting;
        waiting[p.index()] = waiting[p.index()].saturating_sub(1);
        Some(Shared { bucket: next, waiting })
    }

    /// The state after a waiter of class `p` left without a token (expired, shed, disconnected).
    pub fn leave(&self, s: Shared, p: Priority) -> Shared {
        let mut waiting = s.waiting;
        waiting[p.index()] = waiting[p.index()].saturating_sub(1);
        Shared { waiting, ..s }
    }

    /// Roughly how long a new waiter of class `p` would wait: until the first token for its class
    /// (and at least `hold_ns`), then its turn among the waiters ahead of it, released at its
    /// weighted share of the rate.
    pub fn expected_wait_ns(&self, s: &Shared, p: Priority, hold_ns: u64) -> u64 {
        let first = self.bucket.wait_ns(s.bucket, 1.0, self.floors[p.index()]).max(hold_ns);
        let ahead = f64::from(s.waiting[p.index()]);
        let competing: f64 = Priority::ALL
            .iter()
            .filter(|&&q| q == p || s.waiting[q.index()] > 0)
            .map(|q| self.weights[q.index()])
            .sum();
        // ahead / (rate * weight / competing), ordered to keep exact values exact.
        let turns_ns = ahead * competing * 1e9 / (self.bucket.rate * self.weights[p.index()]);
        first.saturating_add(turns_ns.ceil() as u64)
    }
}

impl crate::store::Stored for Shared {
    fn to_bytes(&self) -> Vec<u8> {
        self.encode().to_vec()
    }
    fn from_bytes(b: &[u8]) -> Option<Self> {
        Self::decode(b)
    }
}

impl Shared {
    pub const ENCODED_LEN: usize = 32;

    pub fn new(bucket: bucket::State) -> Shared {
        Shared { bucket, waiting: [0; 4] }
    }

    pub fn encode(&self) -> [u8; 32] {
        let mut out = [0u8; 32];
        out[..16].copy_from_slice(&self.bucket.encode());
        for (i, w) in self.waiting.iter().enumerate() {
            out[16 + 4 * i..20 + 4 * i].copy_from_slice(&w.to_le_bytes());
        }
        out
    }

    /// `None` for anything that is not a value this module wrote.
    pub fn decode(bytes: &[u8]) -> Option<Shared> {
        if bytes.len() != Self::ENCODED_LEN {
            return None;
        }
        let bucket = bucket::State::decode(bytes.get(..16)?)?;
        let mut waiting = [0u32; 4];
        for (i, w) in waiting.iter_mut().enumerate() {
            *w = u32::from_le_bytes(bytes.get(16 + 4 * i..20 + 4 * i)?.try_into().ok()?);
        }
        Some(Shared { bucket, waiting })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;
    use Priority::*;

    const SEC: u64 = 1_000_000_000;

    fn policy(json: &str) -> Policy {
        Policy::new(&Config::parse(json.as_bytes()).unwrap())
    }

    fn state(tokens: f64, waiting: [u32; 4]) -> Shared {
        Shared { bucket: bucket::State { tokens, at_ns: 0 }, waiting }
    }

    #[test]
    fn admits_while_tokens_last_then_queues() {
        let p = policy("{}");
        let (d, s) = p.arrive(state(21.0, [0; 4]), Normal, 0, 0, None);
        assert_eq!(d, Arrival::Admit);
        assert_eq!(s.bucket.tokens, 20.0);
        let (d, s) = p.arrive(s, Normal, 0, 0, None);
        assert_eq!(d, Arrival::Wait);
        assert_eq!(s.waiting, [0, 0, 1, 0]);
        assert_eq!(s.bucket.tokens, 20.0);
    }

    #[test]
    fn newcomers_do_not_jump_ahead_of_waiters_who_could_use_the_token() {
        let p = policy("{}");
        // One token above the reserve and a NORMAL waiter: a NORMAL newcomer must queue.
        let (d, _) = p.arrive(state(21.0, [0, 0, 1, 0]), Normal, 0, 0, None);
        assert_eq!(d, Arrival::Wait);
        // Only the reserve left: LOW waiters cannot use it, so CRITICAL goes straight through.
        let (d, s) = p.arrive(state(20.0, [0, 0, 0, 7]), Critical, 0, 0, None);
        assert_eq!(d, Arrival::Admit);
        assert_eq!(s.bucket.tokens, 19.0);
    }

    #[test]
    fn a_wait_longer_than_the_class_maximum_is_refused_at_once() {
        let p = policy(r#"{"bucket":{"refill_rate":1},"priorities":{"LOW":{"max_wait_ms":5000}}}"#);
        // LOW needs the reserve (20) refilled plus one token: 21 s at 1/s.
        let (d, _) = p.arrive(state(0.0, [0; 4]), Low, 0, 0, None);
        assert_eq!(d, Arrival::Reject { reason: Reason::NoToken, wait_ns: 21 * SEC });
        // CRITICAL may spend the reserve: one token in 1 s, within its 30 s.
        let (d, _) = p.arrive(state(0.0, [0; 4]), Critical, 0, 0, None);
        assert_eq!(d, Arrival::Wait);
    }

    #[test]
    fn a_provider_hold_queues_newcomers_even_with_tokens_left() {
        let p = policy("{}");
        let (d, s) = p.arrive(state(100.0, [0; 4]), Normal, 0, 2 * SEC, None);
        assert_eq!(d, Arrival::Wait);
        assert_eq!(s.bucket.tokens, 100.0);
        // A hold longer than the class may wait is refused at once, saying why.
        let (d, _) = p.arrive(state(100.0, [0; 4]), Normal, 0, 60 * SEC, None);
        assert_eq!(d, Arrival::Reject { reason: Reason::ProviderHold, wait_ns: 60 * SEC });
    }

    #[test]
    fn queue_disabled_rejects_with_the_time_to_the_next_token() {
        let p = policy(r#"{"queue":{"enabled":false}}"#);
        let (d, _) = p.arrive(state(20.5, [0; 4]), Normal, 0, 0, None);
        assert_eq!(d, Arrival::Reject { reason: Reason::NoToken, wait_ns: SEC / 20 });
    }

    #[test]
    fn a_full_class_queue_refuses() {
        let p = policy(r#"{"priorities":{"HIGH":{"queue_limit":2}}}"#);
        let (d, _) = p.arrive(state(0.0, [0, 2, 0, 0]), High, 0, 0, None);
        assert!(matches!(d, Arrival::Reject { reason: Reason::QueueFull, .. }));
    }

    #[test]
    fn a_full_waiting_budget_sheds_a_less_important_local_waiter() {
        let p = policy(r#"{"queue":{"max_waiting":3}}"#);
        let full = state(0.0, [0, 0, 1, 2]);
        let (d, s) = p.arrive(full, Critical, 0, 0, Some(Low));
        assert_eq!(d, Arrival::WaitEvicting { victim: Low });
        assert_eq!(s.waiting, [1, 0, 1, 1]);
        // Nothing less important on this worker: refuse.
        let (d, _) = p.arrive(full, Critical, 0, 0, None);
        assert!(matches!(d, Arrival::Reject { reason: Reason::QueueFull, .. }));
        // LOW never sheds LOW.
        let (d, _) = p.arrive(full, Low, 0, 0, Some(Low));
        assert!(matches!(d, Arrival::Reject { reason: Reason::QueueFull, .. }));
    }

    #[test]
    fn expected_wait_counts_the_waiters_ahead_at_the_class_share() {
        let p = policy(r#"{"bucket":{"refill_rate":10,"burst_allowance":0}}"#);
        let s = state(0.0, [0, 0, 10, 0]);
        // 0.1 s to the first token, then 10 NORMAL waiters ahead at the full rate: 1 s.
        assert_eq!(p.expected_wait_ns(&s, Normal, 0), 11 * SEC / 10);
        // With CRITICAL (5) also waiting, NORMAL (1) gets a sixth of the rate.
        let s = state(0.0, [3, 0, 10, 0]);
        assert_eq!(p.expected_wait_ns(&s, Normal, 0), SEC / 10 + 6 * SEC);
    }

    #[test]
    fn release_and_leave_keep_the_counts() {
        let p = policy("{}");
        let s = state(21.0, [0, 0, 2, 0]);
        let s = p.release(s, Normal, 0).unwrap();
        assert_eq!((s.bucket.tokens, s.waiting), (20.0, [0, 0, 1, 0]));
        assert_eq!(p.release(s, Normal, 0), None);
        assert!(p.release(s, High, 0).is_some());
        assert_eq!(p.leave(s, Normal).waiting, [0; 4]);
        assert_eq!(p.leave(p.leave(s, Normal), Normal).waiting, [0; 4]);
    }

    #[test]
    fn shared_state_round_trips_and_rejects_garbage() {
        let s = Shared { bucket: bucket::State { tokens: 3.5, at_ns: 9 * SEC }, waiting: [1, 2, 3, 4] };
        assert_eq!(Shared::decode(&s.encode()), Some(s));
        assert_eq!(Shared::decode(&s.encode()[..16]), None);
        assert_eq!(Shared::decode(b"garbage"), None);
    }
}
