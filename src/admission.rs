//! Admission: what happens to an arriving request, and which waiting request a freed token goes
//! to. Pure decisions over the process-wide value the host keeps in one shared-data key per
//! bucket: the bucket's level plus, per worker, how many of its requests wait in each class. One
//! compare-and-swap both takes a token and keeps every worker's view of the queue right.
//!
//! An arrival takes a token at once only if no waiting request could have used it: newcomers
//! never jump ahead of the queue. Otherwise it waits if its class's queue has room and its
//! expected wait fits its class's `max_wait_ms`; when the process-wide waiting budget is full, a
//! more important arrival takes the place of the newest waiter of the least important class.
//!
//! With token limits, the same value holds one level per token bucket (the provider's, then one
//! per `tokens.per_model` entry): a request takes its request token and its estimated LLM tokens
//! in the same compare-and-swap, all or nothing, and waits in the same queue when either is short.
//!
//! Waiter counts cannot drift: each worker writes its own entry as the length of its own queue
//! (never an increment), refreshed at least every `HEARTBEAT_MS` while it has waiters, and an
//! entry not refreshed for `LIVE_MS` (a lost update, a restarted VM, a reloaded plugin) no longer
//! counts and is dropped by the next writer.

use crate::bucket::{BucketRules, Level};
use crate::config::Config;
use crate::priority::Priority;
use crate::reply::Reason;
use crate::time::{Duration, Instant};

/// How often a worker with waiters rewrites its entry.
pub const HEARTBEAT: Duration = Duration::from_millis(250);
/// An entry older than this (or this far in the future, after a clock step) is gone.
pub const LIVE: Duration = Duration::from_millis(1_000);
/// Most worker entries kept: Envoy runs a worker per hardware thread (`--concurrency`), and
/// hosts with 96 to 256 threads are common. Only workers with waiters have an entry, so the
/// value stays small while few wait; at the bound it is 8 KiB.
const MAX_ENTRIES: usize = 256;
/// Most token levels in one value: the provider's and one per `tokens.per_model` entry.
const MAX_TOKEN_LEVELS: u64 = crate::config::MAX_MODELS as u64 + 1;

/// One worker's waiting requests per class, as of `seen_ms` (Unix epoch milliseconds: the
/// stored field, as written in shared data).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WaiterEntry {
    /// The worker VM's random id.
    pub worker: u64,
    pub seen_ms: u64,
    pub counts: [u32; 4],
}

/// LLM tokens a request needs from token bucket `bucket` (0: `tokens`, `i + 1`: the `i`th
/// `tokens.per_model` entry), `input` of them its estimated prompt: with `tokens.input` and
/// `tokens.output`, it also needs `input` from the one and the rest from the other.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TokenNeed {
    pub bucket: u8,
    pub tokens: u64,
    pub input: u64,
}

impl TokenNeed {
    /// The output part: what is reserved beside the prompt.
    pub fn output(&self) -> u64 {
        self.tokens.saturating_sub(self.input)
    }
}

/// Token buckets one request draws on, with how many tokens from each: its own (the provider's
/// or its model's), then the input and the output buckets when configured.
pub type Draws = [Option<(usize, u64)>; 3];

/// The shared value of one bucket.
#[derive(Clone, Debug, PartialEq)]
pub struct SharedBucket {
    pub level: Level,
    /// One level per token bucket; empty without token limits.
    pub token_levels: Vec<Level>,
    /// Entries of workers that have waiters; workers without waiters have none.
    pub waiters: Vec<WaiterEntry>,
}

/// A request arriving, as the rules see it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Newcomer {
    pub class: Priority,
    /// The LLM tokens it needs, with token limits.
    pub need: Option<TokenNeed>,
    /// Nothing may go upstream before this instant (the provider asked to hold); 0 for none.
    pub not_before: Instant,
    /// The least important class below `class` with a waiter on the worker it arrives at: only
    /// those can be shed from there.
    pub local_victim: Option<Priority>,
}

/// What to do with an arriving request.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Ruling {
    /// Token taken: let it through.
    Admit,
    /// Pause it in its class's queue.
    Wait,
    /// Pause it, and shed the newest local waiter of class `victim` to make room.
    WaitEvicting { victim: Priority },
    /// Refuse it now; a token for its class is expected in `wait`.
    Reject { reason: Reason, wait: Duration },
}

/// The limits admission enforces, derived once from the configuration.
#[derive(Clone, Debug)]
pub struct AdmissionRules {
    pub bucket: BucketRules,
    /// The token buckets, in `TokenNeed::bucket` order, then `tokens.input` and `tokens.output`
    /// when configured; empty without token limits.
    pub token_buckets: Vec<BucketRules>,
    /// Where `tokens.input` and `tokens.output` are in `token_buckets`.
    pub input_bucket: Option<usize>,
    pub output_bucket: Option<usize>,
    /// Whether cache reads count toward `tokens.input`.
    pub count_cached_input: bool,
    pub use_burst: [bool; 4],
    pub queue_enabled: bool,
    pub max_waiting: u32,
    pub floors: [f64; 4],
    pub weights: [f64; 4],
    pub queue_limits: [u64; 4],
    pub max_wait: [Duration; 4],
}

impl AdmissionRules {
    pub fn new(c: &Config) -> AdmissionRules {
        let b = &c.bucket;
        let bucket = BucketRules::capacity(b.capacity).refill_rate(b.refill_rate).burst_allowance(b.burst_allowance);
        let limit = |m: &crate::config::ModelLimit| BucketRules::capacity(m.capacity).refill_rate(m.refill_rate);
        let token_buckets: Vec<BucketRules> = c.tokens.as_ref().map_or_else(Vec::new, |t| {
            let provider =
                BucketRules::capacity(t.capacity).refill_rate(t.refill_rate).burst_allowance(t.burst_allowance);
            let models = t.per_model.iter().map(|(_, m)| limit(m));
            std::iter::once(provider)
                .chain(models)
                .chain(t.input.iter().map(limit))
                .chain(t.output.iter().map(limit))
                .collect()
        });
        let apart = |has: bool, from_end: usize| has.then(|| token_buckets.len() - from_end);
        let (has_input, has_output) =
            c.tokens.as_ref().map_or((false, false), |t| (t.input.is_some(), t.output.is_some()));
        AdmissionRules {
            bucket,
            input_bucket: apart(has_input, 1 + usize::from(has_output)),
            output_bucket: apart(has_output, 1),
            count_cached_input: c.tokens.as_ref().is_some_and(|t| t.count_cached_input),
            token_buckets,
            use_burst: c.classes.clone().map(|k| k.use_burst),
            queue_enabled: c.queue.enabled,
            max_waiting: c.queue.max_waiting.min(u32::MAX as u64) as u32,
            floors: c.classes.clone().map(|k| bucket.reserve_floor(k.use_burst)),
            weights: c.classes.clone().map(|k| k.weight),
            queue_limits: c.classes.clone().map(|k| k.queue_limit),
            max_wait: c.classes.clone().map(|k| Duration::from_millis(k.max_wait_ms)),
        }
    }

    /// Whether a request of class `p` can take a token from `level` (already refilled) above its
    /// class floor.
    pub fn clears_floor(&self, level: &Level, p: Priority) -> bool {
        level.tokens - 1.0 >= self.floors[p.index()] - 1e-9
    }

    /// A full bucket at `now`, token buckets included, with nobody waiting.
    pub fn full(&self, now: Instant) -> SharedBucket {
        SharedBucket {
            level: self.bucket.full(now),
            token_levels: self.token_buckets.iter().map(|b| b.full(now)).collect(),
            waiters: Vec::new(),
        }
    }

    /// `s` with token levels that match the configured token buckets (a reload may change them:
    /// the new ones start full).
    pub fn fit(&self, mut s: SharedBucket, now: Instant) -> SharedBucket {
        if s.token_levels.len() != self.token_buckets.len() {
            s.token_levels = self.full(now).token_levels;
        }
        s
    }

    /// The token buckets `need` draws on, and how much from each.
    pub fn draws(&self, need: TokenNeed) -> Draws {
        [
            Some((usize::from(need.bucket), need.tokens)),
            self.input_bucket.map(|i| (i, need.input)),
            self.output_bucket.map(|i| (i, need.output())),
        ]
    }

    /// What a request that reserved `need` used, per bucket it drew on: `input` tokens (`cached`
    /// of them cache reads) and `output` tokens.
    pub fn used_draws(&self, need: TokenNeed, input: u64, output: u64, cached: u64) -> Draws {
        let counted = if self.count_cached_input { input } else { input.saturating_sub(cached) };
        [
            Some((usize::from(need.bucket), input.saturating_add(output))),
            self.input_bucket.map(|i| (i, counted)),
            self.output_bucket.map(|i| (i, output)),
        ]
    }

    /// The level below which class `p` may not spend token bucket `b`.
    fn token_floor(&self, b: &BucketRules, p: Priority) -> f64 {
        b.reserve_floor(self.use_burst[p.index()])
    }

    /// Whether `need` is more than class `p` could ever take from a token bucket it draws on.
    pub fn too_large(&self, need: Option<TokenNeed>, p: Priority) -> bool {
        let Some(n) = need else { return false };
        self.draws(n).into_iter().flatten().any(|(i, tokens)| {
            self.token_buckets.get(i).is_some_and(|b| tokens as f64 > b.max - self.token_floor(b, p))
        })
    }

    /// Takes a request token and the `need`ed LLM tokens for class `p`, all or nothing: the
    /// levels after, or how long until both exist.
    pub fn take(
        &self,
        s: &SharedBucket,
        need: Option<TokenNeed>,
        p: Priority,
        now: Instant,
    ) -> Result<SharedBucket, Duration> {
        // The longest wait of any bucket that is short.
        let mut short: Option<Duration> = None;
        let mut next = s.clone();
        match self.bucket.take(s.level, now, 1.0, self.floors[p.index()]) {
            Ok(level) => next.level = level,
            Err(w) => short = Some(w),
        }
        if let Some(n) = need {
            // `fit` gives every configured bucket a level; a value without one gets full ones.
            while next.token_levels.len() < self.token_buckets.len() {
                let j = next.token_levels.len();
                next.token_levels.push(self.token_buckets[j].full(now));
            }
            for (i, tokens) in self.draws(n).into_iter().flatten() {
                let (Some(b), Some(level)) = (self.token_buckets.get(i), next.token_levels.get_mut(i)) else {
                    continue;
                };
                match b.take(*level, now, tokens as f64, self.token_floor(b, p)) {
                    Ok(t) => *level = t,
                    Err(w) => short = Some(short.map_or(w, |s| s.max(w))),
                }
            }
        }
        match short {
            None => Ok(next),
            Some(wait) => Err(wait),
        }
    }

    /// Whether a waiter of class `p` needing `need` could be released from `s` now.
    pub fn can_take(&self, s: &SharedBucket, need: Option<TokenNeed>, p: Priority, now: Instant) -> bool {
        self.take(s, need, p, now).is_ok()
    }

    /// Decides what becomes of `newcomer` at `now`, with `waiting` requests per class
    /// process-wide. Returns the ruling and the bucket levels to write back.
    pub fn arrive(
        &self,
        s: &SharedBucket,
        newcomer: Newcomer,
        waiting: [u32; 4],
        now: Instant,
    ) -> (Ruling, SharedBucket) {
        let Newcomer { class: p, need, not_before, local_victim } = newcomer;
        let refilled = SharedBucket { level: self.bucket.refill(s.level, now), ..s.clone() };
        if self.too_large(need, p) {
            return (Ruling::Reject { reason: Reason::TooLarge, wait: Duration::ZERO }, refilled);
        }
        let hold = not_before - now;
        let level = refilled.level;
        let queue_ahead = Priority::ALL.iter().any(|&q| waiting[q.index()] > 0 && self.clears_floor(&level, q));
        let taken = self.take(&refilled, need, p, now);
        if !queue_ahead && hold.is_zero() {
            if let Ok(next) = taken {
                return (Ruling::Admit, next);
            }
        }
        let i = p.index();
        // The LLM tokens are the part that is short: the request token is there.
        let tokens_short = taken.is_err() && self.clears_floor(&level, p);
        let token_wait = taken.err().unwrap_or(Duration::ZERO);
        let wait = self.expected_wait(&level, &waiting, p, hold).max(token_wait);
        let reject = |reason| (Ruling::Reject { reason, wait }, refilled.clone());
        if !self.queue_enabled || wait > self.max_wait[i] {
            return reject(if !hold.is_zero() {
                Reason::ProviderHold
            } else if tokens_short {
                Reason::TokenLimit
            } else {
                Reason::NoToken
            });
        }
        if u64::from(waiting[i]) >= self.queue_limits[i] {
            return reject(Reason::QueueFull);
        }
        let total: u32 = waiting.iter().fold(0u32, |a, &w| a.saturating_add(w));
        if total < self.max_waiting {
            return (Ruling::Wait, refilled);
        }
        match local_victim {
            Some(v) if v > p && waiting[v.index()] > 0 => (Ruling::WaitEvicting { victim: v }, refilled),
            _ => reject(Reason::QueueFull),
        }
    }

    /// Takes what a waiter of class `p` needs as the queue releases it: `None` if it is not there.
    pub fn take_for_waiter(
        &self,
        s: &SharedBucket,
        need: Option<TokenNeed>,
        p: Priority,
        now: Instant,
    ) -> Option<SharedBucket> {
        self.take(s, need, p, now).ok()
    }

    /// Whether the half-open probe finds a request token in `s` at `now` (`probe` takes it then).
    pub fn probe_takes_token(&self, s: &SharedBucket, now: Instant) -> bool {
        self.bucket.take(s.level, now, 1.0, 0.0).is_ok()
    }

    /// Takes what the half-open probe needs, as far as there is any; the probe goes regardless,
    /// because everything else waits for its answer (its LLM tokens may leave a debt).
    pub fn probe(&self, s: &SharedBucket, need: Option<TokenNeed>, now: Instant) -> SharedBucket {
        let level = self.bucket.take(s.level, now, 1.0, 0.0).unwrap_or_else(|_| self.bucket.refill(s.level, now));
        let mut next = SharedBucket { level, ..s.clone() };
        for (i, tokens) in need.map(|n| self.draws(n)).unwrap_or_default().into_iter().flatten() {
            next = self.credit(next, i, -(tokens as f64), now);
        }
        next
    }

    /// What a worker gives back on its tick: `requests` request tokens and, per token bucket,
    /// `tokens[i]` LLM tokens (leased and unspent, plus refunds minus charges), each into `s`
    /// refilled, none above its bucket's maximum.
    pub fn give_back(&self, s: SharedBucket, requests: f64, tokens: &[f64], now: Instant) -> SharedBucket {
        let level = self.bucket.refill(s.level, now);
        let level = Level { tokens: (level.tokens + requests).min(self.bucket.max), ..level };
        let mut next = SharedBucket { level, ..s };
        for (i, &t) in tokens.iter().enumerate() {
            next = self.credit(next, i, t, now);
        }
        next
    }

    /// Adds `tokens` (negative: takes them) to token bucket `i` of `s` refilled, never above its
    /// maximum. A debt is carried whole, however deep (the level is an `f64`), and the refill pays
    /// it back before anything else of that bucket passes: written off, requests that reserve
    /// little and use much would get many times the bucket's rate through.
    fn credit(&self, mut s: SharedBucket, i: usize, tokens: f64, now: Instant) -> SharedBucket {
        if let (Some(b), Some(l)) = (self.token_buckets.get(i), s.token_levels.get_mut(i)) {
            let refilled = b.refill(*l, now);
            *l = Level { tokens: (refilled.tokens + tokens).min(b.max), ..refilled };
        }
        s
    }

    /// Roughly how long a new waiter of class `p` would wait: until the first token for its class
    /// (and at least `hold`), then its turn among the waiters ahead of it, released at its
    /// weighted share of the rate.
    pub fn expected_wait(&self, level: &Level, waiting: &[u32; 4], p: Priority, hold: Duration) -> Duration {
        let first = self.bucket.wait(*level, 1.0, self.floors[p.index()]).max(hold);
        let ahead = f64::from(waiting[p.index()]);
        let competing: f64 =
            Priority::ALL.iter().filter(|&&q| q == p || waiting[q.index()] > 0).map(|q| self.weights[q.index()]).sum();
        // ahead / (rate * weight / competing), ordered to keep exact values exact.
        let turns_ns = ahead * competing * 1e9 / (self.bucket.rate * self.weights[p.index()]);
        first + Duration::from_nanos(turns_ns.ceil() as u64)
    }
}

/// Whether an entry written at `seen_ms` still counts at `now_ms` (both whole milliseconds).
fn live(seen_ms: u64, now_ms: u64) -> bool {
    Duration::from_millis(seen_ms.abs_diff(now_ms)) <= LIVE
}

impl SharedBucket {
    pub fn new(level: Level) -> SharedBucket {
        SharedBucket { level, token_levels: Vec::new(), waiters: Vec::new() }
    }

    /// Requests waiting per class process-wide at `now`: every live entry, with this worker's
    /// own entry replaced by `own` (its queue, which it knows exactly).
    pub fn waiting(&self, worker: u64, own: [u32; 4], now: Instant) -> [u32; 4] {
        let now_ms = now.as_millis();
        let mut sum = own;
        for e in self.waiters.iter().filter(|e| e.worker != worker && live(e.seen_ms, now_ms)) {
            for (s, c) in sum.iter_mut().zip(e.counts) {
                *s = s.saturating_add(c);
            }
        }
        sum
    }

    /// This worker's entry set to `own` as of `now` (removed when it has no waiters), and
    /// entries that are no longer live dropped.
    pub fn with_worker(mut self, worker: u64, own: [u32; 4], now: Instant) -> SharedBucket {
        let now_ms = now.as_millis();
        self.waiters.retain(|e| e.worker != worker && live(e.seen_ms, now_ms));
        if own != [0; 4] {
            self.waiters.push(WaiterEntry { worker, seen_ms: now_ms, counts: own });
        }
        if self.waiters.len() > MAX_ENTRIES {
            self.waiters.sort_by_key(|e| std::cmp::Reverse(e.seen_ms));
            self.waiters.truncate(MAX_ENTRIES);
        }
        self
    }

    /// The request level, the number of token levels (8 bytes), the token levels, then the
    /// waiter entries (32 bytes each).
    pub fn encode(&self) -> Vec<u8> {
        let levels = 1 + self.token_levels.len();
        let mut out = Vec::with_capacity(8 + Level::ENCODED_LEN * levels + 32 * self.waiters.len());
        out.extend_from_slice(&self.level.encode());
        out.extend_from_slice(&(self.token_levels.len() as u64).to_le_bytes());
        for l in &self.token_levels {
            out.extend_from_slice(&l.encode());
        }
        for e in &self.waiters {
            out.extend_from_slice(&e.worker.to_le_bytes());
            out.extend_from_slice(&e.seen_ms.to_le_bytes());
            for c in e.counts {
                out.extend_from_slice(&c.to_le_bytes());
            }
        }
        out
    }

    /// `None` for anything that is not a value this module wrote.
    pub fn decode(bytes: &[u8]) -> Option<SharedBucket> {
        const L: usize = Level::ENCODED_LEN;
        let level = Level::decode(bytes.get(..L)?)?;
        let n = u64::from_le_bytes(bytes.get(L..L + 8)?.try_into().ok()?);
        if n > MAX_TOKEN_LEVELS {
            return None;
        }
        let start = L + 8 + L * n as usize;
        let token_levels = bytes.get(L + 8..start)?.chunks_exact(L).map(Level::decode).collect::<Option<Vec<_>>>()?;
        let rest = bytes.get(start..)?;
        if rest.len() % 32 != 0 || rest.len() / 32 > MAX_ENTRIES {
            return None;
        }
        let u64_at = |c: &[u8], i: usize| Some(u64::from_le_bytes(c.get(i..i + 8)?.try_into().ok()?));
        let u32_at = |c: &[u8], i: usize| Some(u32::from_le_bytes(c.get(i..i + 4)?.try_into().ok()?));
        let waiters = rest
            .chunks_exact(32)
            .map(|c| {
                Some(WaiterEntry {
                    worker: u64_at(c, 0)?,
                    seen_ms: u64_at(c, 8)?,
                    counts: [u32_at(c, 16)?, u32_at(c, 20)?, u32_at(c, 24)?, u32_at(c, 28)?],
                })
            })
            .collect::<Option<Vec<_>>>()?;
        Some(SharedBucket { level, token_levels, waiters })
    }
}

impl crate::store::Stored for SharedBucket {
    fn to_bytes(&self) -> Vec<u8> {
        self.encode()
    }
    fn from_bytes(b: &[u8]) -> Option<Self> {
        Self::decode(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;
    use Priority::*;

    const SEC: u64 = 1_000_000_000;

    /// The instant `ns` nanoseconds after the origin.
    fn at(ns: u64) -> Instant {
        Instant::from_nanos(ns)
    }

    /// The instant `ms` milliseconds after the origin.
    fn at_ms(ms: u64) -> Instant {
        Instant::from_millis(ms)
    }

    fn ns(ns: u64) -> Duration {
        Duration::from_nanos(ns)
    }

    fn rules(json: &str) -> AdmissionRules {
        AdmissionRules::new(&Config::parse(json.as_bytes()).unwrap())
    }

    fn level(tokens: f64) -> Level {
        Level { tokens, at: at(0) }
    }

    fn bucket(tokens: f64) -> SharedBucket {
        SharedBucket::new(level(tokens))
    }

    /// An arrival of class `p` needing `need`, with no hold and nothing to shed.
    fn newcomer(p: Priority, need: Option<TokenNeed>) -> Newcomer {
        Newcomer { class: p, need, not_before: Instant::ZERO, local_victim: None }
    }

    #[test]
    fn admits_while_tokens_last_then_queues() {
        let r = rules("{}");
        let (d, l) = r.arrive(&bucket(21.0), newcomer(Normal, None), [0; 4], at(0));
        assert_eq!(d, Ruling::Admit);
        assert_eq!(l.level.tokens, 20.0);
        let (d, l) = r.arrive(&l, newcomer(Normal, None), [0; 4], at(0));
        assert_eq!(d, Ruling::Wait);
        assert_eq!(l.level.tokens, 20.0);
    }

    #[test]
    fn newcomers_do_not_jump_ahead_of_waiters_who_could_use_the_token() {
        let r = rules("{}");
        // One token above the reserve and a NORMAL waiter: a NORMAL newcomer must queue.
        assert_eq!(r.arrive(&bucket(21.0), newcomer(Normal, None), [0, 0, 1, 0], at(0)).0, Ruling::Wait);
        // Only the reserve left: LOW waiters cannot use it, so CRITICAL goes straight through.
        let (d, l) = r.arrive(&bucket(20.0), newcomer(Critical, None), [0, 0, 0, 7], at(0));
        assert_eq!(d, Ruling::Admit);
        assert_eq!(l.level.tokens, 19.0);
    }

    #[test]
    fn a_wait_longer_than_the_class_maximum_is_refused_at_once() {
        let r = rules(r#"{"bucket":{"refill_rate":1},"priorities":{"LOW":{"max_wait_ms":5000}}}"#);
        // LOW needs the reserve (20) refilled plus one token: 21 s at 1/s.
        let (d, _) = r.arrive(&bucket(0.0), newcomer(Low, None), [0; 4], at(0));
        assert_eq!(d, Ruling::Reject { reason: Reason::NoToken, wait: ns(21 * SEC) });
        // CRITICAL may spend the reserve: one token in 1 s, within its 30 s.
        assert_eq!(r.arrive(&bucket(0.0), newcomer(Critical, None), [0; 4], at(0)).0, Ruling::Wait);
    }

    #[test]
    fn a_provider_hold_queues_newcomers_even_with_tokens_left() {
        let r = rules("{}");
        let (d, l) =
            r.arrive(&bucket(100.0), Newcomer { not_before: at(2 * SEC), ..newcomer(Normal, None) }, [0; 4], at(0));
        assert_eq!(d, Ruling::Wait);
        assert_eq!(l.level.tokens, 100.0);
        // A hold longer than the class may wait is refused at once, saying why.
        let (d, _) =
            r.arrive(&bucket(100.0), Newcomer { not_before: at(60 * SEC), ..newcomer(Normal, None) }, [0; 4], at(0));
        assert_eq!(d, Ruling::Reject { reason: Reason::ProviderHold, wait: ns(60 * SEC) });
    }

    #[test]
    fn queue_disabled_rejects_with_the_time_to_the_next_token() {
        let r = rules(r#"{"queue":{"enabled":false}}"#);
        let (d, _) = r.arrive(&bucket(20.5), newcomer(Normal, None), [0; 4], at(0));
        assert_eq!(d, Ruling::Reject { reason: Reason::NoToken, wait: ns(SEC / 20) });
    }

    #[test]
    fn a_full_class_queue_refuses() {
        let r = rules(r#"{"priorities":{"HIGH":{"queue_limit":2}}}"#);
        let (d, _) = r.arrive(&bucket(0.0), newcomer(High, None), [0, 2, 0, 0], at(0));
        assert!(matches!(d, Ruling::Reject { reason: Reason::QueueFull, .. }));
    }

    #[test]
    fn a_full_waiting_budget_sheds_a_less_important_local_waiter() {
        let r = rules(r#"{"queue":{"max_waiting":3}}"#);
        let full = [0, 0, 1, 2];
        assert_eq!(
            r.arrive(&bucket(0.0), Newcomer { local_victim: Some(Low), ..newcomer(Critical, None) }, full, at(0)).0,
            Ruling::WaitEvicting { victim: Low }
        );
        // Nothing less important on this worker: refuse.
        let (d, _) = r.arrive(&bucket(0.0), newcomer(Critical, None), full, at(0));
        assert!(matches!(d, Ruling::Reject { reason: Reason::QueueFull, .. }));
        // LOW never sheds LOW.
        let (d, _) = r.arrive(&bucket(0.0), Newcomer { local_victim: Some(Low), ..newcomer(Low, None) }, full, at(0));
        assert!(matches!(d, Ruling::Reject { reason: Reason::QueueFull, .. }));
    }

    #[test]
    fn expected_wait_counts_the_waiters_ahead_at_the_class_share() {
        let r = rules(r#"{"bucket":{"refill_rate":10,"burst_allowance":0}}"#);
        // 0.1 s to the first token, then 10 NORMAL waiters ahead at the full rate: 1 s.
        assert_eq!(r.expected_wait(&level(0.0), &[0, 0, 10, 0], Normal, Duration::ZERO), ns(11 * SEC / 10));
        // With CRITICAL (5) also waiting, NORMAL (1) gets a sixth of the rate.
        assert_eq!(r.expected_wait(&level(0.0), &[3, 0, 10, 0], Normal, Duration::ZERO), ns(SEC / 10 + 6 * SEC));
    }

    #[test]
    fn take_for_waiter_respects_the_reserve_and_the_probe_always_goes() {
        let r = rules("{}");
        let l = r.take_for_waiter(&bucket(21.0), None, Normal, at(0)).unwrap();
        assert_eq!(l.level.tokens, 20.0);
        assert_eq!(r.take_for_waiter(&l, None, Normal, at(0)), None);
        assert!(r.take_for_waiter(&l, None, High, at(0)).is_some());
        assert_eq!(r.probe(&bucket(0.5), None, at(0)).level.tokens, 0.5, "no token: the probe goes without one");
        assert_eq!(r.probe(&bucket(3.0), None, at(0)).level.tokens, 2.0);
    }

    #[test]
    fn waiter_counts_are_per_worker_and_heal_when_an_owner_goes_quiet() {
        let b = SharedBucket::new(level(0.0));
        let b = b.with_worker(1, [0, 0, 2, 0], at_ms(1_000)).with_worker(2, [1, 0, 0, 3], at_ms(1_000));
        assert_eq!(b.waiting(9, [0; 4], at_ms(1_000)), [1, 0, 2, 3]);
        // Each worker's own queue replaces what it wrote: a lost update is no drift.
        assert_eq!(b.waiting(1, [0, 0, 5, 0], at_ms(1_000)), [1, 0, 5, 3]);
        // Worker 2 stops refreshing (a restarted VM): after LIVE_MS it no longer counts...
        assert_eq!(b.waiting(9, [0; 4], at_ms(1_001) + LIVE), [0, 0, 2, 0].map(|_| 0));
        let b = b.with_worker(1, [0, 0, 2, 0], at_ms(1_500));
        assert_eq!(b.waiting(9, [0; 4], at_ms(2_001)), [0, 0, 2, 0]);
        // ...and the next writer drops it. A worker with no waiters has no entry.
        let b = b.with_worker(1, [0; 4], at_ms(2_001));
        assert!(b.waiters.is_empty());
        // A clock step back does not keep dead entries alive forever either.
        let b = SharedBucket::new(level(0.0)).with_worker(3, [1, 0, 0, 0], at_ms(10_000));
        assert_eq!(b.waiting(9, [0; 4], at_ms(5_000)), [0; 4]);
    }

    #[test]
    fn shared_value_round_trips_and_rejects_garbage() {
        let b = SharedBucket::new(Level { tokens: 3.5, at: at(9 * SEC) }).with_worker(7, [1, 2, 3, 4], at_ms(5));
        assert_eq!(SharedBucket::decode(&b.encode()), Some(b.clone()));
        assert_eq!(SharedBucket::decode(&b.encode()[..20]), None);
        assert_eq!(SharedBucket::decode(b"garbage"), None);
        // A level, no token levels, then one entry more than the bound.
        let mut over = b.encode()[..24].to_vec();
        over.resize(24 + 32 * (MAX_ENTRIES + 1), 0);
        assert_eq!(SharedBucket::decode(&over), None);
        over.truncate(24 + 32 * MAX_ENTRIES);
        assert_eq!(SharedBucket::decode(&over).map(|s| s.waiters.len()), Some(MAX_ENTRIES));
    }

    fn with_tokens(json: &str, tokens: f64) -> (AdmissionRules, SharedBucket) {
        let r = rules(json);
        let mut b = r.full(at(0));
        b.token_levels[0].tokens = tokens;
        (r, b)
    }

    fn need(tokens: u64) -> Option<TokenNeed> {
        Some(TokenNeed { bucket: 0, tokens, input: 0 })
    }

    /// `need` was taken and `actual` tokens used: what a worker's settlement gives back.
    fn settle(r: &AdmissionRules, s: SharedBucket, need: TokenNeed, actual: u64, now: Instant) -> SharedBucket {
        r.credit(s, usize::from(need.bucket), need.tokens as f64 - actual as f64, now)
    }

    #[test]
    fn a_request_takes_its_request_token_and_its_llm_tokens_together_or_neither() {
        let (r, b) = with_tokens(r#"{"tokens":{"capacity":1000,"refill_rate":100}}"#, 300.0);
        let (d, l) = r.arrive(&b, newcomer(Normal, need(250)), [0; 4], at(0));
        assert_eq!(d, Ruling::Admit);
        assert_eq!((l.level.tokens, l.token_levels[0].tokens), (119.0, 50.0));
        // 250 more are short by 200: it waits 2 s at 100/s, and takes nothing meanwhile.
        let (d, l2) = r.arrive(&l, newcomer(Normal, need(250)), [0; 4], at(0));
        assert_eq!(d, Ruling::Wait);
        assert_eq!((l2.level.tokens, l2.token_levels[0].tokens), (119.0, 50.0));
        assert!(!r.can_take(&l, need(250), Normal, at(SEC)));
        assert!(r.can_take(&l, need(250), Normal, at(2 * SEC)));
        // Not allowed to wait: refused as a token limit, with the time until the tokens exist.
        let (r, _) = with_tokens(r#"{"tokens":{"capacity":1000,"refill_rate":100},"queue":{"enabled":false}}"#, 0.0);
        let d = r.arrive(&l, newcomer(Normal, need(250)), [0; 4], at(0)).0;
        assert_eq!(d, Ruling::Reject { reason: Reason::TokenLimit, wait: ns(2 * SEC) });
    }

    #[test]
    fn more_than_the_whole_token_bucket_is_too_large_and_never_waits() {
        let json = r#"{"tokens":{"capacity":1000,"refill_rate":100,"burst_allowance":500}}"#;
        let (r, b) = with_tokens(json, 1500.0);
        // NORMAL may not spend the burst: 1000 is its most; CRITICAL may spend 1500.
        assert_eq!(
            r.arrive(&b, newcomer(Normal, need(1001)), [0; 4], at(0)).0,
            Ruling::Reject { reason: Reason::TooLarge, wait: Duration::ZERO }
        );
        assert_eq!(r.arrive(&b, newcomer(Normal, need(1000)), [0; 4], at(0)).0, Ruling::Admit);
        assert_eq!(r.arrive(&b, newcomer(Critical, need(1500)), [0; 4], at(0)).0, Ruling::Admit);
        assert!(r.too_large(need(1501), Critical));
        assert!(!r.too_large(None, Low));
    }

    #[test]
    fn per_model_buckets_are_apart_from_the_provider_token_bucket() {
        let r = rules(r#"{"tokens":{"capacity":1000,"per_model":{"big":{"capacity":100},"small":{"capacity":50}}}}"#);
        let b = r.full(at(0));
        assert_eq!(b.token_levels.iter().map(|l| l.tokens).collect::<Vec<_>>(), [1000.0, 100.0, 50.0]);
        let small = Some(TokenNeed { bucket: 2, tokens: 50, input: 0 });
        let (d, l) = r.arrive(&b, newcomer(Normal, small), [0; 4], at(0));
        assert_eq!(d, Ruling::Admit);
        assert_eq!(l.token_levels.iter().map(|l| l.tokens).collect::<Vec<_>>(), [1000.0, 100.0, 0.0]);
        // 50 more at 50 a minute: longer than NORMAL's 30 s.
        let d = r.arrive(&l, newcomer(Normal, small), [0; 4], at(0)).0;
        assert_eq!(d, Ruling::Reject { reason: Reason::TokenLimit, wait: ns(60 * SEC) });
        assert_eq!(r.arrive(&l, newcomer(Normal, need(50)), [0; 4], at(0)).0, Ruling::Admit);
    }

    #[test]
    fn input_and_output_limits_hold_each_kind_of_client_by_its_own_bucket() {
        // Anthropic's ITPM 2,000 and OTPM 400: the total defaults to their sum and never binds.
        let r = rules(r#"{"tokens":{"input":{"capacity":2000},"output":{"capacity":400}},"queue":{"enabled":false}}"#);
        let b = r.full(at(0));
        assert_eq!(b.token_levels.iter().map(|l| l.tokens).collect::<Vec<_>>(), [2400.0, 2000.0, 400.0]);
        let ask = |input, output| Some(TokenNeed { bucket: 0, tokens: input + output, input });
        // Small prompts, long outputs: the second waits for OTPM (300 + 300 > 400).
        let (d, l) = r.arrive(&b, newcomer(Normal, ask(50, 300)), [0; 4], at(0));
        assert_eq!(d, Ruling::Admit);
        assert_eq!(l.token_levels.iter().map(|l| l.tokens).collect::<Vec<_>>(), [2050.0, 1950.0, 100.0]);
        let d = r.arrive(&l, newcomer(Normal, ask(50, 300)), [0; 4], at(0)).0;
        // 200 output tokens short at 400 a minute: 30 s.
        assert_eq!(d, Ruling::Reject { reason: Reason::TokenLimit, wait: ns(30 * SEC) });
        // Long prompts, short outputs: held by ITPM.
        let (d, l) = r.arrive(&b, newcomer(Normal, ask(1500, 10)), [0; 4], at(0));
        assert_eq!(d, Ruling::Admit);
        assert!(matches!(r.arrive(&l, newcomer(Normal, ask(1500, 10)), [0; 4], at(0)).0, Ruling::Reject { .. }));
        // A prompt larger than the whole input bucket can never pass.
        assert!(r.too_large(ask(2001, 1), Normal));
        assert!(!r.too_large(ask(10, 400), Normal));
        assert!(r.too_large(ask(10, 401), Normal));
        // Settling: cache reads do not count toward the input bucket unless configured.
        let n = TokenNeed { bucket: 0, tokens: 350, input: 50 };
        assert_eq!(r.used_draws(n, 500, 20, 400), [Some((0, 520)), Some((1, 100)), Some((2, 20))]);
        let counted =
            rules(r#"{"tokens":{"input":{"capacity":2000},"output":{"capacity":400},"count_cached_input":true}}"#);
        assert_eq!(counted.used_draws(n, 500, 20, 400)[1], Some((1, 500)));
    }

    #[test]
    fn settling_refunds_or_charges_the_difference() {
        let (r, b) = with_tokens(r#"{"tokens":{"capacity":1000,"refill_rate":10}}"#, 400.0);
        let n = TokenNeed { bucket: 0, tokens: 500, input: 0 };
        assert_eq!(settle(&r, b.clone(), n, 200, at(0)).token_levels[0].tokens, 700.0);
        assert_eq!(settle(&r, b.clone(), n, 900, at(0)).token_levels[0].tokens, 0.0);
        // Refunds never overfill; a debt is carried whole.
        assert_eq!(settle(&r, b.clone(), n, 0, at(0)).token_levels[0].tokens, 900.0);
        assert_eq!(
            settle(&r, b.clone(), TokenNeed { bucket: 0, tokens: 0, input: 0 }, 9_000, at(0)).token_levels[0].tokens,
            -8600.0
        );
        // The probe goes without its tokens, leaving a debt the refill pays.
        let p = r.probe(&b, need(600), at(0));
        assert_eq!(p.token_levels[0].tokens, -200.0);
        // A bucket index that does not exist changes nothing.
        assert_eq!(settle(&r, b.clone(), TokenNeed { bucket: 9, tokens: 5, input: 0 }, 0, at(0)), b);
    }

    #[test]
    fn a_debt_is_carried_whole_and_the_refill_pays_it_back() {
        // 40 requests reserved 60 each and used 1500 each: 57,600 over, 57.6 buckets.
        let (r, b) = with_tokens(r#"{"tokens":{"capacity":1000,"refill_rate":1000}}"#, 400.0);
        let over = settle(&r, b.clone(), TokenNeed { bucket: 0, tokens: 40 * 60, input: 0 }, 40 * 1500, at(0));
        assert_eq!(over.token_levels[0].tokens, 400.0 - 57_600.0);
        // The probe's overrun is carried whole too.
        assert_eq!(r.probe(&b, need(9_000), at(0)).token_levels[0].tokens, -8_600.0);
        // The shared value holds it, and the refill pays it back from below zero.
        assert_eq!(SharedBucket::decode(&over.encode()), Some(over.clone()));
        assert_eq!(r.token_buckets[0].refill(over.token_levels[0], at(57 * SEC)).tokens, -200.0);
        // Nothing of that bucket passes until the debt is paid: not even a request needing 0.
        let d = r.arrive(&over, newcomer(Normal, need(0)), [0; 4], at(0)).0;
        assert_eq!(d, Ruling::Reject { reason: Reason::TokenLimit, wait: ns(57_200 * SEC / 1000) });
        assert!(!r.can_take(&over, need(100), Normal, at(57_299 * SEC / 1000)));
        assert!(r.can_take(&over, need(100), Normal, at(57_300 * SEC / 1000)));
    }

    #[test]
    fn token_levels_round_trip_and_follow_the_configuration() {
        let r = rules(r#"{"tokens":{"capacity":1000,"per_model":{"m":{"capacity":10}}}}"#);
        let b = r.full(at(5)).with_worker(7, [1, 0, 0, 0], at_ms(5));
        assert_eq!(SharedBucket::decode(&b.encode()), Some(b.clone()));
        // A value written before token limits were configured gets full token buckets.
        let old = SharedBucket::new(level(3.0));
        let fitted = r.fit(SharedBucket::decode(&old.encode()).unwrap(), at(9));
        assert_eq!((fitted.level.tokens, fitted.token_levels.len()), (3.0, 2));
        assert_eq!(fitted.token_levels[1], Level { tokens: 10.0, at: at(9) });
    }
}
