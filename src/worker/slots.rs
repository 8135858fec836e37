//! This worker's requests in flight (`in_flight`): the slot each holds, taken in the shared value
//! of `inflight` and given back when its answer ends (with what the answer teaches the adaptive
//! limit), and the heartbeat that keeps this worker's entry live while it has requests out.

use crate::idmap::IdMap;
use crate::inflight::{Change, Rules, Sample, Shared, HEARTBEAT};
use crate::store::{self, Status, Store};
use crate::time::{Duration, Instant};

/// A slot a request holds: when it was taken, and whether it was the last the limit allowed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Held {
    at: Instant,
    binding: bool,
}

/// The limit and requests in flight process-wide, after a write: what the gauges show.
pub type SlotReadout = (f64, u32);

pub struct Slots {
    pub key: String,
    rules: Rules,
    me: u64,
    out: IdMap<Held>,
    /// A slot taken for a waiter the tick is about to release, not yet given to it.
    pending: Option<Held>,
    /// When this worker last wrote its entry.
    written_at: Instant,
    /// What the last write or read showed.
    pub readout: Option<SlotReadout>,
}

impl Slots {
    pub fn new(rules: Rules, name: &str, me: u64) -> Slots {
        Slots {
            key: format!("llm_ratelimit/{name}/in_flight"),
            rules,
            me,
            out: IdMap::new(),
            pending: None,
            written_at: Instant::ZERO,
            readout: None,
        }
    }

    /// This worker's requests holding a slot.
    fn own(&self) -> u32 {
        (self.out.len() + usize::from(self.pending.is_some())).min(u32::MAX as usize) as u32
    }

    /// Whether this worker has requests out (its entry needs the heartbeat).
    pub fn any_out(&self) -> bool {
        self.own() > 0
    }

    /// Whether request `id` holds a slot.
    pub fn holds(&self, id: u32) -> bool {
        self.out.contains_key(&id)
    }

    pub fn ensure(&self, store: &impl Store, now: Instant) -> Result<(), Status> {
        store::ensure(store, &self.key, self.rules.fresh(now))
    }

    fn update<R>(
        &mut self,
        store: &impl Store,
        now: Instant,
        change: impl FnMut(Shared) -> (R, Option<Shared>),
    ) -> Result<R, Status> {
        let (rules, mut change, mut wrote) = (self.rules, change, false);
        let r = store::update(
            store,
            &self.key,
            || rules.fresh(now),
            |s| {
                let (r, next) = change(rules.fit(s));
                wrote = next.is_some();
                (r, next)
            },
        )?;
        // Only a write refreshes this worker's entry: a refusal reads.
        if wrote {
            self.written_at = now;
        }
        Ok(r)
    }

    /// Takes a slot: for request `id`, or (`None`) for the waiter the tick releases next. `force`:
    /// the half-open probe, which goes whatever is in flight. `Ok(None)`: none free, and how long
    /// one is expected to take.
    pub fn take(
        &mut self,
        store: &impl Store,
        id: Option<u32>,
        force: bool,
        now: Instant,
    ) -> Result<Result<(), Duration>, Status> {
        let (me, own) = (self.me, self.own());
        let taken = self.update(store, now, |s| {
            let total = s.total(me, own, now);
            if total >= s.allowed() && !force {
                return (Err((s.expected_wait(), (s.limit, total))), None);
            }
            let binding = total.saturating_add(1) >= s.allowed();
            let next = s.with_own(me, own.saturating_add(1), now);
            let readout = (next.limit, next.total(me, own.saturating_add(1), now));
            (Ok((binding, readout)), Some(next))
        })?;
        match taken {
            Ok((binding, readout)) => {
                self.readout = Some(readout);
                let held = Held { at: now, binding };
                match id {
                    Some(id) => {
                        self.out.insert(id, held);
                    }
                    None => self.pending = Some(held),
                }
                Ok(Ok(()))
            }
            Err((wait, readout)) => {
                self.readout = Some(readout);
                Ok(Err(wait))
            }
        }
    }

    /// The slot taken for the next release goes to request `id`.
    pub fn give_pending(&mut self, id: u32) {
        if let Some(held) = self.pending.take() {
            self.out.insert(id, held);
        }
    }

    /// Request `id` (or, `None`, the pending slot nobody was released for) ends: its slot goes
    /// back, and its `answer` (status, when its headers came) teaches the limit. Nothing when it
    /// holds none.
    pub fn give(
        &mut self,
        store: &impl Store,
        id: Option<u32>,
        answer: Option<(u16, Instant)>,
        now: Instant,
    ) -> Result<Option<Change>, Status> {
        let held = match id {
            Some(id) => self.out.remove(&id),
            None => self.pending.take(),
        };
        let Some(held) = held else { return Ok(None) };
        let (me, own, rules) = (self.me, self.own(), self.rules);
        let sample = answer.map(|(status, at)| Sample {
            sent: held.at,
            binding: held.binding,
            status,
            latency: at.saturating_since(held.at),
        });
        let r = self.update(store, now, |mut s| {
            let change = sample.and_then(|x| rules.learn(&mut s, x, now));
            let next = s.with_own(me, own, now);
            ((change, (next.limit, next.total(me, own, now))), Some(next))
        });
        match r {
            Ok((change, readout)) => {
                self.readout = Some(readout);
                Ok(change)
            }
            // The count is this worker's own: the next heartbeat writes it right.
            Err(s) => {
                self.written_at = Instant::ZERO;
                Err(s)
            }
        }
    }

    /// Rewrites this worker's entry every `HEARTBEAT` while it has requests out, so it stays live.
    pub fn heartbeat(&mut self, store: &impl Store, now: Instant) -> Result<(), Status> {
        if !self.any_out() || now.saturating_since(self.written_at) < HEARTBEAT {
            return Ok(());
        }
        let (me, own) = (self.me, self.own());
        let readout = self.update(store, now, |s| {
            let next = s.with_own(me, own, now);
            ((next.limit, next.total(me, own, now)), Some(next))
        })?;
        self.readout = Some(readout);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inflight::{Adaptive, LIVE};
    use crate::store::MemStore;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    const T0: u64 = 1_700_000_000_000;

    fn at(ms: u64) -> Instant {
        Instant::from_millis(T0 + ms)
    }

    fn fixed(max: f64, me: u64) -> Slots {
        Slots::new(Rules { max, adaptive: None }, "p", me)
    }

    #[test]
    fn the_limit_holds_across_workers_and_a_dead_worker_gives_its_slots_back() {
        let store = MemStore::default();
        let (mut a, mut b) = (fixed(3.0, 1), fixed(3.0, 2));
        assert_eq!(a.take(&store, Some(1), false, at(0)), Ok(Ok(())));
        assert_eq!(a.take(&store, Some(2), false, at(0)), Ok(Ok(())));
        assert_eq!(b.take(&store, Some(1), false, at(0)), Ok(Ok(())));
        assert!(b.take(&store, Some(2), false, at(0)).unwrap().is_err());
        // The probe goes anyway.
        assert_eq!(b.take(&store, Some(3), true, at(0)), Ok(Ok(())));
        assert_eq!(b.give(&store, Some(3), None, at(1)), Ok(None));
        // Ending twice gives back once.
        assert_eq!(a.give(&store, Some(1), Some((200, at(5))), at(5)), Ok(None));
        assert_eq!(a.give(&store, Some(1), Some((200, at(5))), at(5)), Ok(None));
        assert_eq!(b.take(&store, Some(2), false, at(6)), Ok(Ok(())));
        assert!(b.take(&store, Some(4), false, at(6)).unwrap().is_err());
        // Worker a's VM goes away with one request out: after LIVE its slot is free again.
        drop(a);
        let later = at(LIVE.as_millis() + 10);
        b.heartbeat(&store, later).unwrap();
        assert_eq!(b.take(&store, Some(4), false, later), Ok(Ok(())));
        assert_eq!(b.readout, Some((3.0, 3)));
    }

    #[test]
    fn a_pending_slot_goes_to_the_released_request_or_back() {
        let store = MemStore::default();
        let mut a = fixed(1.0, 1);
        assert_eq!(a.take(&store, None, false, at(0)), Ok(Ok(())));
        assert!(a.any_out());
        assert!(a.take(&store, Some(9), false, at(0)).unwrap().is_err());
        a.give_pending(7);
        assert!(a.holds(7));
        a.give(&store, Some(7), None, at(1)).unwrap();
        a.take(&store, None, false, at(2)).unwrap().unwrap();
        a.give(&store, None, None, at(2)).unwrap();
        assert!(!a.any_out());
        assert_eq!(a.readout, Some((1.0, 0)));
    }

    #[test]
    fn answers_move_an_adaptive_limit() {
        let store = MemStore::default();
        let rules =
            Rules { max: 8.0, adaptive: Some(Adaptive { floor: 1.0, initial: 1.0, tolerance: 1.2, backoff: 0.9 }) };
        let mut a = Slots::new(rules, "p", 1);
        a.take(&store, Some(1), false, at(0)).unwrap().unwrap();
        assert_eq!(a.give(&store, Some(1), Some((200, at(100))), at(100)), Ok(Some(Change::Raised)));
        a.take(&store, Some(2), false, at(100)).unwrap().unwrap();
        a.take(&store, Some(3), false, at(100)).unwrap().unwrap();
        assert_eq!(a.give(&store, Some(2), Some((503, at(150))), at(150)), Ok(Some(Change::Cut)));
        assert_eq!(a.readout, Some((1.8, 1)));
    }
}
