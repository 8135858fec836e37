//! This worker's requests in flight (`in_flight`): the slot each holds, taken in the shared value
//! of `inflight` and given back when its answer ends (with what the answer teaches the adaptive
//! limit), and the heartbeat that keeps this worker's entry live while it has requests out.
//!
//! Far from the limit a worker takes slots ahead (a lease, as it does tokens): its entry counts
//! them, its requests take and give them with no shared-data call, and the tick gives the spare
//! ones back, with the answers not yet learned from. Near the limit (the free slots under
//! `LEASE_SHARE` per worker) every take and give is a compare-and-swap, exact.

use crate::idmap::IdMap;
use crate::inflight::{Change, Rules, Sample, Shared, HEARTBEAT};
use crate::store::{self, Status, Store};
use crate::time::{Duration, Instant};

/// A lease takes at most this share of the free slots, so leases stop well before the limit.
const LEASE_SHARE: f64 = 8.0;
/// Most slots a lease takes beyond the request that took it.
const MAX_LEASE: u32 = 16;
/// Most answers kept to learn from on the next write.
const MAX_SAMPLES: usize = 32;

/// A slot a request holds: when it was taken, and whether it was the last the limit allowed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Held {
    at: Instant,
    binding: bool,
}

/// The limit and requests in flight process-wide, after a write: what the gauges show.
pub type SlotReadout = (f64, u32);

/// What answers did to the adaptive limit: times raised, times cut.
pub type Changes = (u64, u64);

pub struct Slots {
    pub key: String,
    rules: Rules,
    me: u64,
    out: IdMap<Held>,
    /// A slot taken for a waiter the tick is about to release, not yet given to it.
    pending: Option<Held>,
    /// Slots this worker's entry counts beyond its requests: taken ahead, or given back by ended
    /// requests and not yet written.
    spare: u32,
    /// How many spare slots this worker may keep (the last lease's size; 0 near the limit).
    keep: u32,
    /// Answers of the adaptive limit not yet learned from, for the next write.
    samples: Vec<Sample>,
    /// When this worker last wrote its entry.
    written_at: Instant,
    /// What the last write or read showed, and when.
    pub readout: Option<SlotReadout>,
    seen_at: Instant,
    /// What the answers learned from did to the limit, since the host last read it.
    changes: Changes,
}

impl Slots {
    pub fn new(rules: Rules, name: &str, me: u64) -> Slots {
        Slots {
            key: format!("llm_ratelimit/{name}/in_flight"),
            rules,
            me,
            out: IdMap::new(),
            pending: None,
            spare: 0,
            keep: 0,
            samples: Vec::new(),
            written_at: Instant::ZERO,
            readout: None,
            seen_at: Instant::ZERO,
            changes: (0, 0),
        }
    }

    /// What the answers learned from did to the limit since the last call (for stats).
    pub fn take_changes(&mut self) -> Changes {
        std::mem::take(&mut self.changes)
    }

    /// What this worker's entry counts: its requests' slots and its spare ones.
    fn own(&self) -> u32 {
        let held = (self.out.len() + usize::from(self.pending.is_some())).min(u32::MAX as usize) as u32;
        held.saturating_add(self.spare)
    }

    /// Whether the tick has work: an entry to keep live, spare slots or answers to write.
    pub fn needs_tick(&self) -> bool {
        self.own() > 0 || !self.samples.is_empty()
    }

    /// Whether request `id` holds a slot.
    pub fn holds(&self, id: u32) -> bool {
        self.out.contains_key(&id)
    }

    pub fn ensure(&self, store: &impl Store, now: Instant) -> Result<(), Status> {
        store::ensure(store, &self.key, self.rules.fresh(now))
    }

    /// One compare-and-swap of the shared value, the answers kept so far learned from first.
    /// `change` gets the value and this worker's entry as written before it, and returns its
    /// result with this worker's new count, or `None` to write nothing.
    fn update<R>(
        &mut self,
        store: &impl Store,
        now: Instant,
        mut change: impl FnMut(&Shared, u32) -> (R, Option<u32>),
    ) -> Result<R, Status> {
        let (rules, me, own, samples) = (self.rules, self.me, self.own(), std::mem::take(&mut self.samples));
        let mut wrote = None;
        let r = store::update(
            store,
            &self.key,
            || rules.fresh(now),
            |s| {
                let mut s = rules.fit(s);
                let mut changes = (0, 0);
                for x in &samples {
                    match rules.learn(&mut s, *x, now) {
                        Some(Change::Raised) => changes.0 += 1,
                        Some(Change::Cut) => changes.1 += 1,
                        None => {}
                    }
                }
                let (r, count) = change(&s, own);
                wrote = count.map(|c| (s.limit, s.total(me, c, now)));
                ((r, changes), count.map(|c| s.with_own(me, c, now)))
            },
        );
        match (r, wrote) {
            (Ok((r, changes)), Some(readout)) => {
                self.written_at = now;
                self.seen_at = now;
                self.readout = Some(readout);
                self.changes.0 += changes.0;
                self.changes.1 += changes.1;
                Ok(r)
            }
            // Not written: the answers are learned from on the next write.
            (r, _) => {
                self.samples = samples;
                r.map(|(r, _)| r)
            }
        }
    }

    /// Takes a slot: for request `id`, or (`None`) for the waiter the tick releases next. `force`:
    /// the half-open probe, which goes whatever is in flight. `Ok(Err(wait))`: none free, and
    /// how long one is expected to take.
    pub fn take(
        &mut self,
        store: &impl Store,
        id: Option<u32>,
        force: bool,
        now: Instant,
    ) -> Result<Result<(), Duration>, Status> {
        if self.spare > 0 {
            self.spare -= 1;
            self.hold(id, Held { at: now, binding: false });
            return Ok(Ok(()));
        }
        let me = self.me;
        let taken = self.update(store, now, |s, own| {
            let total = s.total(me, own, now);
            let allowed = s.allowed();
            if total >= allowed && !force {
                return (Err((s.expected_wait(), (s.limit, total))), None);
            }
            let free = allowed.saturating_sub(total.saturating_add(1));
            let lease = ((f64::from(free) / LEASE_SHARE) as u32).min(MAX_LEASE);
            (Ok((total.saturating_add(1) >= allowed, lease)), Some(own.saturating_add(1 + lease)))
        })?;
        match taken {
            Ok((binding, lease)) => {
                self.spare = lease;
                self.keep = lease;
                self.hold(id, Held { at: now, binding });
                Ok(Ok(()))
            }
            Err((wait, readout)) => {
                self.readout = Some(readout);
                self.seen_at = now;
                self.keep = 0;
                Ok(Err(wait))
            }
        }
    }

    fn hold(&mut self, id: Option<u32>, held: Held) {
        match id {
            Some(id) => {
                self.out.insert(id, held);
            }
            None => self.pending = Some(held),
        }
    }

    /// The slot taken for the next release goes to request `id`.
    pub fn give_pending(&mut self, id: u32) {
        if let Some(held) = self.pending.take() {
            self.out.insert(id, held);
        }
    }

    /// Request `id` (or, `None`, the pending slot nobody was released for) ends: its slot goes
    /// back, and its `answer` (status, when its headers came) is kept for the adaptive limit.
    /// Kept as a spare slot while the lease allows (no shared-data call), else written now (the
    /// clock read through `now` only then). Nothing when it holds none.
    pub fn give(
        &mut self,
        store: &impl Store,
        id: Option<u32>,
        answer: Option<(u16, Instant)>,
        now: impl FnOnce() -> Option<Instant>,
    ) -> Result<(), Status> {
        let held = match id {
            Some(id) => self.out.remove(&id),
            None => self.pending.take(),
        };
        let Some(held) = held else { return Ok(()) };
        if let (Some((status, at)), Some(_)) = (answer, self.rules.adaptive) {
            let latency = at.saturating_since(held.at);
            self.samples.push(Sample { sent: held.at, binding: held.binding, status, latency });
        }
        self.spare += 1;
        if self.spare <= self.keep && self.samples.len() < MAX_SAMPLES {
            return Ok(());
        }
        // No clock: the slot stays spare until the tick writes it.
        let Some(now) = now() else { return Ok(()) };
        let spare = std::mem::take(&mut self.spare);
        let written = self.update(store, now, |_, own| ((), Some(own)));
        if written.is_err() {
            self.spare = spare;
        }
        written
    }

    /// The readout of a worker with nothing out, read again every `HEARTBEAT`: it is what this
    /// worker's gauge shows, and a count from before other workers' requests ended would
    /// otherwise stay on the process-wide gauge for good.
    pub fn refresh(&mut self, store: &impl Store, now: Instant) -> Result<(), Status> {
        if self.own() > 0 || self.readout.is_none() || now.saturating_since(self.seen_at) < HEARTBEAT {
            return Ok(());
        }
        self.seen_at = now;
        if let Some(s) = store::read::<Shared>(store, &self.key)? {
            let s = self.rules.fit(s);
            self.readout = Some((s.limit, s.total(self.me, 0, now)));
        }
        Ok(())
    }

    /// Each tick: spare slots and kept answers written, and this worker's entry rewritten every
    /// `HEARTBEAT` while it has requests out, so it stays live.
    pub fn tick(&mut self, store: &impl Store, now: Instant) -> Result<(), Status> {
        let due = self.own() > 0 && now.saturating_since(self.written_at) >= HEARTBEAT;
        if self.spare == 0 && self.samples.is_empty() && !due {
            return Ok(());
        }
        // Spare slots go back: the next lease is sized by what is free then.
        let spare = std::mem::take(&mut self.spare);
        self.keep = 0;
        let written = self.update(store, now, |_, own| ((), Some(own)));
        if written.is_err() {
            self.spare = spare;
        }
        written
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

    fn clock(ms: u64) -> impl FnOnce() -> Option<Instant> {
        move || Some(at(ms))
    }

    /// The slots process-wide, as the shared value counts them now.
    fn total(store: &MemStore, now: Instant) -> u32 {
        crate::store::read::<Shared>(store, "llm_ratelimit/p/in_flight").unwrap().map_or(0, |s| s.total(0, 0, now))
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
        assert_eq!(b.give(&store, Some(3), None, clock(1)), Ok(()));
        // Ending twice gives back once.
        assert_eq!(a.give(&store, Some(1), Some((200, at(5))), clock(5)), Ok(()));
        assert_eq!(a.give(&store, Some(1), Some((200, at(5))), clock(5)), Ok(()));
        assert_eq!(total(&store, at(5)), 2);
        assert_eq!(b.take(&store, Some(2), false, at(6)), Ok(Ok(())));
        assert!(b.take(&store, Some(4), false, at(6)).unwrap().is_err());
        // Worker a's VM goes away with one request out: after LIVE its slot is free again.
        drop(a);
        let later = at(LIVE.as_millis() + 10);
        b.tick(&store, later).unwrap();
        assert_eq!(b.take(&store, Some(4), false, later), Ok(Ok(())));
        assert_eq!(b.readout, Some((3.0, 3)));
    }

    #[test]
    fn an_idle_workers_readout_follows_the_others_requests_as_they_end() {
        let store = MemStore::default();
        let (mut a, mut b) = (fixed(3.0, 1), fixed(3.0, 2));
        b.take(&store, Some(1), false, at(0)).unwrap().unwrap();
        a.take(&store, Some(1), false, at(0)).unwrap().unwrap();
        a.give(&store, Some(1), None, clock(1)).unwrap();
        // a's last write saw b's request out.
        assert_eq!(a.readout, Some((3.0, 1)));
        b.give(&store, Some(1), None, clock(2)).unwrap();
        assert_eq!(b.readout, Some((3.0, 0)));
        // Read again only once a heartbeat has passed since a last saw the value.
        a.refresh(&store, at(2)).unwrap();
        assert_eq!(a.readout, Some((3.0, 1)));
        a.refresh(&store, at(1 + HEARTBEAT.as_millis())).unwrap();
        assert_eq!(a.readout, Some((3.0, 0)));
        // A worker with requests out keeps what its writes show.
        b.take(&store, Some(2), false, at(300)).unwrap().unwrap();
        b.refresh(&store, at(900)).unwrap();
        assert_eq!(b.readout, Some((3.0, 1)));
    }

    #[test]
    fn far_from_the_limit_a_lease_serves_requests_without_shared_data_until_the_tick() {
        let store = MemStore::default();
        let mut a = fixed(1000.0, 1);
        a.take(&store, Some(1), false, at(0)).unwrap().unwrap();
        // One compare-and-swap took 1 + 16 slots: the next 16 take none.
        assert_eq!(total(&store, at(0)), 17);
        store.broken.set(true);
        for id in 2..=17 {
            assert_eq!(a.take(&store, Some(id), false, at(1)), Ok(Ok(())), "#{id}");
        }
        // Ends keep their slot spare (no clock read, no write) while the lease allows.
        for id in 1..=16 {
            assert_eq!(a.give(&store, Some(id), None, || panic!("the clock is read only to write")), Ok(()));
        }
        store.broken.set(false);
        assert_eq!(total(&store, at(2)), 17);
        // The tick gives the spare ones back: one request left out.
        a.tick(&store, at(10)).unwrap();
        assert_eq!(total(&store, at(10)), 1);
        a.give(&store, Some(17), None, clock(11)).unwrap();
        a.tick(&store, at(20)).unwrap();
        assert_eq!(total(&store, at(20)), 0);
        assert!(!a.needs_tick());
    }

    #[test]
    fn near_the_limit_every_take_and_give_is_written() {
        let store = MemStore::default();
        let (mut a, mut b) = (fixed(9.0, 1), fixed(9.0, 2));
        a.take(&store, Some(1), false, at(0)).unwrap().unwrap();
        // 8 free after it: a lease of 1.
        assert_eq!(total(&store, at(0)), 2);
        for id in 1..=7 {
            b.take(&store, Some(id), false, at(0)).unwrap().unwrap();
        }
        assert_eq!(total(&store, at(0)), 9);
        assert!(b.take(&store, Some(8), false, at(0)).unwrap().is_err());
        // a's spare slot: its request takes it without a write.
        a.take(&store, Some(2), false, at(1)).unwrap().unwrap();
        // b's ends are written at once: no lease near the limit.
        b.give(&store, Some(1), None, clock(2)).unwrap();
        assert_eq!(total(&store, at(2)), 8);
    }

    #[test]
    fn a_pending_slot_goes_to_the_released_request_or_back() {
        let store = MemStore::default();
        let mut a = fixed(1.0, 1);
        assert_eq!(a.take(&store, None, false, at(0)), Ok(Ok(())));
        assert!(a.needs_tick());
        assert!(a.take(&store, Some(9), false, at(0)).unwrap().is_err());
        a.give_pending(7);
        assert!(a.holds(7));
        a.give(&store, Some(7), None, clock(1)).unwrap();
        a.take(&store, None, false, at(2)).unwrap().unwrap();
        a.give(&store, None, None, clock(2)).unwrap();
        assert!(!a.needs_tick());
        assert_eq!(a.readout, Some((1.0, 0)));
    }

    #[test]
    fn answers_move_an_adaptive_limit() {
        let store = MemStore::default();
        let rules =
            Rules { max: 8.0, adaptive: Some(Adaptive { floor: 1.0, initial: 1.0, tolerance: 1.2, backoff: 0.9 }) };
        let mut a = Slots::new(rules, "p", 1);
        a.take(&store, Some(1), false, at(0)).unwrap().unwrap();
        a.give(&store, Some(1), Some((200, at(100))), clock(100)).unwrap();
        assert_eq!(a.take_changes(), (1, 0));
        a.take(&store, Some(2), false, at(100)).unwrap().unwrap();
        a.give(&store, Some(2), Some((503, at(150))), clock(150)).unwrap();
        assert_eq!(a.take_changes(), (0, 1));
        assert_eq!(a.readout, Some((1.5 * 0.9, 0)));
    }
}
