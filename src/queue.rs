//! Per-worker wait queue: one FIFO per priority class plus a weighted scheduler across them.
//!
//! Release order across classes uses stride scheduling: each class has a `pass` (its virtual
//! time) and a `stride = sum(weights) / weight`; the scheduler serves the eligible non-empty
//! class with the smallest pass and then advances that pass by its stride, so over many releases
//! each class gets `weight / sum(weights)` of them. A class that becomes non-empty has its pass
//! raised to the current virtual time, so idling never banks credit for a later burst.
//!
//! Pure: no host calls and no clock reads; every time is passed in, and nothing here panics.

use std::collections::VecDeque;

use crate::admission::TokenNeed;
use crate::priority::Priority;
use crate::time::{Duration, Instant};

/// Weights at or below zero, and NaN, are clamped up to this so every class is still served.
pub const MIN_WEIGHT: f64 = 1e-6;
/// Weights above this (including +inf) are clamped down to it so strides stay finite.
pub const MAX_WEIGHT: f64 = 1e6;
/// When virtual time exceeds this, all passes are shifted down so f64 keeps sub-stride precision.
const REBASE_AT: f64 = (1u64 << 40) as f64;

/// One paused request; `Copy` whenever the id is, so queues can hand out copies cheaply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Waiter<T> {
    /// Opaque handle the caller uses to resume the request (Envoy's context id in the filter).
    pub id: T,
    /// Which class queue the waiter sits in.
    pub class: Priority,
    /// When it started waiting, for queue-age stats.
    pub enqueued: Instant,
    /// Absolute time it must not wait past; `expire` removes it at or after this.
    pub deadline: Instant,
    /// The LLM tokens it needs besides its request token (with token limits).
    pub need: Option<TokenNeed>,
}

/// The four class queues and the stride-scheduler state; one per worker thread.
#[derive(Debug)]
pub struct WaitQueue<T> {
    /// FIFO per class, indexed by `Priority::index()`; front is the oldest.
    queues: [VecDeque<Waiter<T>>; 4],
    /// Releases-between-turns per class: `sum(weights) / weight`, always finite and >= 1.
    strides: [f64; 4],
    /// Each class's virtual time: the next release of that class happens "at" this pass.
    passes: [f64; 4],
    /// Highest pass at which any class was served; a rejoining idle class starts no earlier.
    vtime: f64,
}

/// Replaces NaN, zero, negative and infinite weights with a usable positive finite value.
fn sanitize_weight(w: f64) -> f64 {
    if w.is_nan() {
        MIN_WEIGHT
    } else {
        w.max(MIN_WEIGHT).min(MAX_WEIGHT)
    }
}

impl<T: Copy + Eq> WaitQueue<T> {
    /// Builds an empty queue; weights are indexed by `Priority::index()` and sanitized (see
    /// `MIN_WEIGHT`/`MAX_WEIGHT`) rather than rejected, since config validation rejects bad ones.
    pub fn new(weights: [f64; 4]) -> Self {
        let weights = weights.map(sanitize_weight);
        let sum: f64 = weights.iter().sum();
        WaitQueue { queues: Default::default(), strides: weights.map(|w| sum / w), passes: [0.0; 4], vtime: 0.0 }
    }

    /// Appends a waiter to the back of its class queue (caller keeps ids unique).
    pub fn push(&mut self, waiter: Waiter<T>) {
        let i = waiter.class.index();
        if self.queues[i].is_empty() {
            // No banking while idle: a rejoining class starts at the current virtual time,
            // but keeps any lead it still owes (pass above vtime) from recent service.
            self.passes[i] = self.passes[i].max(self.vtime);
        }
        self.queues[i].push_back(waiter);
    }

    /// Removes and returns the oldest waiter of the class the scheduler picks among eligible ones.
    pub fn pop_next(&mut self, eligible: impl Fn(Priority) -> bool) -> Option<Waiter<T>> {
        let class = self.peek_next_class(eligible)?;
        let i = class.index();
        let waiter = self.queues[i].pop_front()?;
        self.vtime = self.vtime.max(self.passes[i]);
        self.passes[i] += self.strides[i];
        if self.vtime > REBASE_AT {
            self.rebase();
        }
        Some(waiter)
    }

    /// The class `pop_next` would serve with this predicate, without changing any state.
    /// Smallest pass wins; ties go to the more important class. Ineligible classes are skipped
    /// and not charged, so they keep their place and, once eligible again, catch up on the turns
    /// they missed (e.g. NORMAL/LOW after a spell where only the burst reserve was left).
    pub fn peek_next_class(&self, eligible: impl Fn(Priority) -> bool) -> Option<Priority> {
        let mut best: Option<Priority> = None;
        for class in Priority::ALL {
            let i = class.index();
            if self.queues[i].is_empty() || !eligible(class) {
                continue;
            }
            // Strict `<` keeps the earlier (more important) class on ties.
            if best.is_none_or(|b| self.passes[i] < self.passes[b.index()]) {
                best = Some(class);
            }
        }
        best
    }

    /// The oldest waiter of `class`: the next that class would release.
    pub fn head(&self, class: Priority) -> Option<&Waiter<T>> {
        self.queues[class.index()].front()
    }

    /// The clock stepped back by `step`: every time kept here moves back too, so deadlines stay
    /// the same distance away in real time.
    pub fn shift_back(&mut self, step: Duration) {
        for w in self.queues.iter_mut().flatten() {
            w.enqueued -= step;
            w.deadline -= step;
        }
    }

    /// Whether a waiter with this id is queued.
    pub fn contains(&self, id: T) -> bool {
        self.queues.iter().any(|q| q.iter().any(|w| w.id == id))
    }

    /// Removes a waiter wherever it is (e.g. the client disconnected); None if the id is unknown.
    pub fn remove(&mut self, id: T) -> Option<Waiter<T>> {
        self.queues.iter_mut().find_map(|q| {
            let pos = q.iter().position(|w| w.id == id)?;
            q.remove(pos)
        })
    }

    /// Removes and returns every waiter whose deadline has passed (`deadline <= now`),
    /// grouped by class, most important first, oldest first within a class.
    pub fn expire(&mut self, now: Instant) -> Vec<Waiter<T>> {
        let mut expired = Vec::new();
        for q in &mut self.queues {
            q.retain(|w| {
                let keep = w.deadline > now;
                if !keep {
                    expired.push(*w);
                }
                keep
            });
        }
        expired
    }

    /// Makes room for a `class` request: removes the newest waiter of the lowest class strictly
    /// below `class` that has any (LOW first, then NORMAL, then HIGH); None if there is none.
    pub fn evict_newest_below(&mut self, class: Priority) -> Option<Waiter<T>> {
        Priority::ALL.into_iter().rev().filter(|c| *c > class).find_map(|c| self.queues[c.index()].pop_back())
    }

    /// Number of waiters in one class, for the queue-depth gauge and per-class limits.
    pub fn len(&self, class: Priority) -> usize {
        self.queues[class.index()].len()
    }

    /// Number of waiters across all classes, for the worker-wide queue limit.
    pub fn total(&self) -> usize {
        self.queues.iter().map(VecDeque::len).sum()
    }

    /// True when nobody waits, so the timer can stop ticking.
    pub fn is_empty(&self) -> bool {
        self.queues.iter().all(VecDeque::is_empty)
    }

    /// Shifts all virtual times down by `vtime`; only relative passes matter, and this keeps
    /// them small enough that adding a stride always changes the pass.
    fn rebase(&mut self) {
        let shift = self.vtime;
        for p in &mut self.passes {
            *p -= shift;
        }
        self.vtime = 0.0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    use Priority::{Critical, High, Low, Normal};

    const DEFAULT_WEIGHTS: [f64; 4] = [5.0, 3.0, 1.0, 0.1];

    fn all(_: Priority) -> bool {
        true
    }

    fn waiter(id: u32, class: Priority, enqueued_ms: u64, deadline_ms: u64) -> Waiter<u32> {
        let (enqueued, deadline) = (Instant::from_millis(enqueued_ms), Instant::from_millis(deadline_ms));
        Waiter { id, class, enqueued, deadline, need: None }
    }

    /// Keeps every class backlogged for `releases` pops and returns each class's share.
    fn measure_shares(weights: [f64; 4], releases: usize) -> [f64; 4] {
        let mut q = WaitQueue::new(weights);
        let mut next_id = 0u32;
        for class in Priority::ALL {
            for _ in 0..releases {
                q.push(waiter(next_id, class, 0, u64::MAX));
                next_id += 1;
            }
        }
        let mut counts = [0usize; 4];
        for _ in 0..releases {
            let w = q.pop_next(all).expect("backlogged");
            counts[w.class.index()] += 1;
        }
        counts.map(|c| c as f64 / releases as f64)
    }

    fn assert_shares_match(weights: [f64; 4]) {
        let sum: f64 = weights.iter().sum();
        let shares = measure_shares(weights, 10_000);
        for class in Priority::ALL {
            let expected = weights[class.index()] / sum;
            let got = shares[class.index()];
            println!(
                "weights {weights:?}: {:<8} expected {:6.3}% got {:6.3}%",
                class.name(),
                expected * 100.0,
                got * 100.0
            );
            // Within 3% of the expected share, or one release for tiny shares.
            assert!(
                (got - expected).abs() <= (expected * 0.03).max(1.0 / 10_000.0),
                "{}: expected {expected}, got {got}",
                class.name()
            );
        }
    }

    #[test]
    fn default_weights_give_proportional_shares() {
        assert_shares_match(DEFAULT_WEIGHTS);
    }

    #[test]
    fn custom_weights_give_proportional_shares() {
        assert_shares_match([1.0, 2.0, 3.0, 4.0]);
        assert_shares_match([2.0, 2.0, 2.0, 2.0]);
        assert_shares_match([100.0, 10.0, 1.0, 0.5]);
    }

    #[test]
    fn low_is_never_starved() {
        let mut q = WaitQueue::new(DEFAULT_WEIGHTS);
        for (id, class) in (0u32..).zip([Critical, High, Normal, Low].repeat(1_000)) {
            q.push(waiter(id, class, 0, u64::MAX));
        }
        // LOW's share is 0.1 / 9.1, so it is served about every 91 releases, never much later.
        let low_turns: Vec<usize> = (0..1_000).filter(|_| q.pop_next(all).map(|w| w.class) == Some(Low)).collect();
        let max_gap = low_turns.windows(2).map(|w| w[1] - w[0]).max();
        assert_eq!(low_turns.len(), 11, "{low_turns:?}");
        assert!(max_gap.is_some_and(|g| g <= 92), "LOW turns {low_turns:?}");
    }

    #[test]
    fn fifo_within_a_class() {
        let mut q = WaitQueue::new(DEFAULT_WEIGHTS);
        for id in 0..5 {
            q.push(waiter(id, Normal, id as u64, 1_000));
        }
        let order: Vec<u32> = std::iter::from_fn(|| q.pop_next(all)).map(|w| w.id).collect();
        assert_eq!(order, vec![0, 1, 2, 3, 4]);
        assert!(q.is_empty());
    }

    #[test]
    fn idle_class_does_not_bank_credit() {
        let mut q = WaitQueue::new([1.0; 4]);
        for id in 0..1_000 {
            q.push(waiter(id, Critical, 0, u64::MAX));
        }
        for _ in 0..500 {
            assert_eq!(q.pop_next(all).map(|w| w.class), Some(Critical));
        }
        // HIGH idled through 500 releases; with equal weights it must now alternate with
        // CRITICAL instead of taking the next 500 releases in a row.
        for id in 1_000..1_100 {
            q.push(waiter(id, High, 0, u64::MAX));
        }
        let next: Vec<Priority> = (0..20).filter_map(|_| q.pop_next(all)).map(|w| w.class).collect();
        let highs = next.iter().filter(|c| **c == High).count();
        assert!((9..=11).contains(&highs), "HIGH got {highs} of 20: {next:?}");
    }

    #[test]
    fn ineligible_classes_are_skipped_without_charge() {
        let mut q = WaitQueue::new([1.0; 4]);
        for (id, class) in (0u32..).zip([Critical, High, Normal, Low].repeat(10)) {
            q.push(waiter(id, class, 0, u64::MAX));
        }
        let reserve_only = |c: Priority| c <= High;
        let served: Vec<Priority> = (0..4).filter_map(|_| q.pop_next(reserve_only)).map(|w| w.class).collect();
        assert_eq!(served, vec![Critical, High, Critical, High]);
        assert_eq!((q.len(Normal), q.len(Low)), (10, 10));
        // NORMAL and LOW kept their place: once eligible they are served before the others.
        assert_eq!(q.peek_next_class(all), Some(Normal));
        let served: Vec<Priority> = (0..4).filter_map(|_| q.pop_next(all)).map(|w| w.class).collect();
        assert_eq!(served, vec![Normal, Low, Normal, Low]);
        // Nothing eligible, or nothing eligible is non-empty: no release.
        assert_eq!(q.pop_next(|_| false), None);
        assert_eq!(q.total(), 32);
    }

    #[test]
    fn peek_matches_pop_and_does_not_change_state() {
        let mut q = WaitQueue::new(DEFAULT_WEIGHTS);
        for (id, class) in (0u32..).zip([Critical, High, Normal, Low].repeat(50)) {
            q.push(waiter(id, class, 0, u64::MAX));
        }
        for _ in 0..150 {
            let peeked = q.peek_next_class(all);
            assert_eq!(q.peek_next_class(all), peeked);
            assert_eq!(q.pop_next(all).map(|w| w.class), peeked);
        }
        assert_eq!(WaitQueue::<u32>::new(DEFAULT_WEIGHTS).peek_next_class(all), None);
    }

    #[test]
    fn sheds_newest_of_lowest_class_below() {
        let mut q = WaitQueue::new(DEFAULT_WEIGHTS);
        q.push(waiter(1, High, 0, 100));
        q.push(waiter(2, High, 1, 100));
        q.push(waiter(3, Normal, 2, 100));
        q.push(waiter(4, Low, 3, 100));
        q.push(waiter(5, Low, 4, 100));
        q.push(waiter(6, Critical, 5, 100));

        // A LOW request can displace nobody; a NORMAL one only LOW waiters.
        assert_eq!(q.evict_newest_below(Low), None);
        assert_eq!(q.evict_newest_below(Normal).map(|w| w.id), Some(5));
        assert_eq!(q.evict_newest_below(Normal).map(|w| w.id), Some(4));
        assert_eq!(q.evict_newest_below(Normal), None);
        // A HIGH request then takes NORMAL, never HIGH.
        assert_eq!(q.evict_newest_below(High).map(|w| w.id), Some(3));
        assert_eq!(q.evict_newest_below(High), None);
        // CRITICAL takes HIGH newest first, never CRITICAL.
        assert_eq!(q.evict_newest_below(Critical).map(|w| w.id), Some(2));
        assert_eq!(q.evict_newest_below(Critical).map(|w| w.id), Some(1));
        assert_eq!(q.evict_newest_below(Critical), None);
        assert_eq!((q.total(), q.len(Critical)), (1, 1));
    }

    #[test]
    fn expire_removes_waiters_at_or_past_deadline() {
        let mut q = WaitQueue::new(DEFAULT_WEIGHTS);
        q.push(waiter(1, Low, 0, 100));
        q.push(waiter(2, Low, 0, 300));
        q.push(waiter(3, Critical, 0, 200));
        q.push(waiter(4, Normal, 0, 50));

        assert!(q.expire(Instant::from_millis(49)).is_empty());
        let mut ids: Vec<u32> = q.expire(Instant::from_millis(100)).iter().map(|w| w.id).collect();
        ids.sort_unstable();
        assert_eq!(ids, vec![1, 4]);
        assert_eq!(q.total(), 2);
        assert_eq!(q.expire(Instant::from_millis(1_000)).len(), 2);
        assert!(q.is_empty());
    }

    #[test]
    fn remove_present_and_absent_ids() {
        let mut q = WaitQueue::new(DEFAULT_WEIGHTS);
        q.push(waiter(1, High, 10, 100));
        q.push(waiter(2, High, 20, 100));
        q.push(waiter(3, Low, 30, 100));

        assert_eq!(q.remove(2), Some(waiter(2, High, 20, 100)));
        assert_eq!(q.remove(2), None);
        assert_eq!(q.remove(99), None);
        assert_eq!(q.remove(3).map(|w| w.class), Some(Low));
        assert_eq!((q.len(High), q.len(Low), q.total()), (1, 0, 1));
        assert_eq!(q.pop_next(all).map(|w| w.id), Some(1));
    }

    #[test]
    fn accessors_count_what_is_waiting() {
        let mut q = WaitQueue::new(DEFAULT_WEIGHTS);
        assert!(q.is_empty());
        q.push(waiter(1, Normal, 10, 500));
        q.push(waiter(2, Normal, 20, 300));
        q.push(waiter(3, Critical, 30, 400));
        assert_eq!((q.len(Normal), q.len(Critical), q.total()), (2, 1, 3));
        assert!(!q.is_empty());
        q.remove(2);
        assert_eq!(q.expire(Instant::from_millis(400)).len(), 1);
        assert_eq!(q.total(), 1);
    }

    #[test]
    fn invalid_weights_are_clamped_not_fatal() {
        // Zero, negative and NaN become MIN_WEIGHT; +inf becomes MAX_WEIGHT.
        let mut q = WaitQueue::new([0.0, -1.0, f64::NAN, f64::INFINITY]);
        assert!(q.strides.iter().all(|s| s.is_finite() && *s >= 1.0));
        for (id, class) in (0u32..).zip([Critical, High, Normal, Low].repeat(100)) {
            q.push(waiter(id, class, 0, u64::MAX));
        }
        let mut counts = [0usize; 4];
        for _ in 0..100 {
            let w = q.pop_next(all).expect("backlogged");
            counts[w.class.index()] += 1;
        }
        // The +inf class dominates; the clamped ones still got their first turn.
        assert!(counts[Low.index()] >= 96, "{counts:?}");
        assert!(counts[..3].iter().all(|c| *c >= 1), "{counts:?}");
        assert!(q.passes.iter().all(|p| p.is_finite()));
    }

    #[test]
    fn huge_strides_rebase_and_keep_scheduling() {
        // One tiny-weight class alone pushes virtual time far past REBASE_AT quickly.
        let mut q = WaitQueue::new([MAX_WEIGHT, MAX_WEIGHT, MAX_WEIGHT, MIN_WEIGHT]);
        for id in 0..100 {
            q.push(waiter(id, Low, 0, u64::MAX));
        }
        for _ in 0..100 {
            assert_eq!(q.pop_next(all).map(|w| w.class), Some(Low));
            assert!(q.vtime <= REBASE_AT && q.passes.iter().all(|p| p.is_finite()));
        }
        // A rejoining class still alternates sensibly with its peers.
        for id in 100..110 {
            q.push(waiter(id, Critical, 0, u64::MAX));
            q.push(waiter(id + 100, High, 0, u64::MAX));
        }
        let served: Vec<Priority> = (0..4).filter_map(|_| q.pop_next(all)).map(|w| w.class).collect();
        assert_eq!(served, vec![Critical, High, Critical, High]);
    }
}
