//! Hidden capacity (`--capacity K`), like an overloaded self-hosted vLLM/TGI server that
//! publishes no rate-limit headers: K LLM requests are served at once, `capacity_queue` more
//! wait for a slot in arrival order, and any more are answered `capacity_status` at once.
//!
//! The wait happens inside the handler, before any header is sent, so a client sees it as time
//! to first byte. The limits are read from the live settings on every decision, so a capacity
//! changed by `POST /mock/config` applies to the next request (a lower one lets requests already
//! holding slots finish; a higher one, or 0, hands slots to the waiting at once, `pump`).
//!
//! The queue is a list of one-shot channels under the state's lock; a slot is handed to the
//! oldest waiter by counting it as taken and sending on its channel. Guards give every slot back:
//! `Slot` when the request ends (or its client goes away), `Waiting` when a waiter goes away,
//! including one granted a slot it never got to see.

use std::collections::VecDeque;
use std::sync::Arc;

use axum::http::StatusCode;
use tokio::sync::oneshot;

use crate::{AppState, Inner};

/// The requests waiting for a slot, oldest first; counted in `stats.capacity`.
#[derive(Default)]
pub struct Queue {
    waiters: VecDeque<(u64, oneshot::Sender<()>)>,
    next_ticket: u64,
}

pub enum Admission {
    Served(Slot),
    /// The queue was full: answer this status.
    Overflow(StatusCode),
}

/// Takes a slot, waiting in line for one if all are taken; or says to overflow, at once.
pub async fn admit(state: &Arc<AppState>) -> Admission {
    let (ticket, granted) = {
        let mut guard = state.lock();
        let inner = &mut *guard;
        let c = &mut inner.stats.capacity;
        if inner.queue.waiters.is_empty() && has_room(inner.settings.capacity, c.in_flight) {
            c.granted();
            return Admission::Served(Slot(state.clone()));
        }
        if inner.queue.waiters.len() as u64 >= inner.settings.queue_limit() {
            return Admission::Overflow(inner.settings.capacity_status);
        }
        let ticket = inner.queue.next_ticket;
        inner.queue.next_ticket += 1;
        let (tx, rx) = oneshot::channel();
        inner.queue.waiters.push_back((ticket, tx));
        c.queued_total += 1;
        c.waiting = inner.queue.waiters.len() as u64;
        (ticket, rx)
    };
    let mut waiting = Waiting { state: state.clone(), ticket, got_slot: false };
    // The slot is already counted as ours when this returns (an error only if the state is gone).
    let _ = granted.await;
    waiting.got_slot = true;
    Admission::Served(Slot(state.clone()))
}

fn has_room(capacity: u64, in_flight: u64) -> bool {
    capacity == 0 || in_flight < capacity
}

/// Hands free slots to the oldest waiters; after a slot is given back or the capacity changes.
pub fn pump(inner: &mut Inner) {
    let c = &mut inner.stats.capacity;
    while has_room(inner.settings.capacity, c.in_flight) {
        let Some((_, tx)) = inner.queue.waiters.pop_front() else { break };
        c.granted();
        // A receiver already gone belongs to a waiter being dropped: its `Waiting` gives the slot back.
        let _ = tx.send(());
    }
    c.waiting = inner.queue.waiters.len() as u64;
}

fn release(inner: &mut Inner) {
    inner.stats.capacity.in_flight = inner.stats.capacity.in_flight.saturating_sub(1);
    pump(inner);
}

/// A slot held: given back when dropped (the response is complete, its stream has ended, or
/// the client went away and the handler was dropped).
pub struct Slot(Arc<AppState>);

impl Drop for Slot {
    fn drop(&mut self) {
        release(&mut self.0.lock());
    }
}

/// A place in the queue; if dropped before its slot was seen, leaves the queue or gives the
/// slot back.
struct Waiting {
    state: Arc<AppState>,
    ticket: u64,
    got_slot: bool,
}

impl Drop for Waiting {
    fn drop(&mut self) {
        if self.got_slot {
            return;
        }
        let mut inner = self.state.lock();
        if let Some(i) = inner.queue.waiters.iter().position(|(t, _)| *t == self.ticket) {
            inner.queue.waiters.remove(i);
            inner.stats.capacity.waiting = inner.queue.waiters.len() as u64;
        } else {
            // Granted, but gone before it could use the slot: it was never served.
            inner.stats.capacity.served = inner.stats.capacity.served.saturating_sub(1);
            release(&mut inner);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::pin::pin;
    use std::task::{Context, Poll, Waker};

    use super::*;
    use crate::config::Settings;

    fn state(capacity: u64, queue: u64) -> Arc<AppState> {
        let settings = Settings { capacity, capacity_queue: Some(queue), ..Settings::default() };
        Arc::new(AppState::new(settings))
    }

    fn counts(s: &AppState) -> (u64, u64, u64, u64, u64) {
        let c = &s.lock().stats.capacity;
        (c.in_flight, c.waiting, c.served, c.queued_total, c.max_in_flight_seen)
    }

    fn now<F: Future>(f: F) -> F::Output {
        match pin!(f).poll(&mut Context::from_waker(Waker::noop())) {
            Poll::Ready(v) => v,
            Poll::Pending => panic!("should not wait"),
        }
    }

    fn slot(a: Admission) -> Slot {
        match a {
            Admission::Served(s) => s,
            Admission::Overflow(status) => panic!("overflowed with {status}"),
        }
    }

    fn set_capacity(s: &AppState, k: u64) {
        let mut inner = s.lock();
        inner.settings.capacity = k;
        pump(&mut inner);
    }

    #[tokio::test]
    async fn waiters_are_served_in_order_and_overflow_when_the_queue_is_full() {
        let s = state(1, 2);
        let first = slot(now(admit(&s)));
        let (tx, mut order) = tokio::sync::mpsc::unbounded_channel();
        for (queued, name) in [(1, "second"), (2, "third")] {
            let (s2, tx) = (s.clone(), tx.clone());
            tokio::spawn(async move {
                let _slot = slot(admit(&s2).await);
                tx.send(name).unwrap();
            });
            while counts(&s).1 < queued {
                tokio::task::yield_now().await;
            }
        }
        assert!(matches!(now(admit(&s)), Admission::Overflow(StatusCode::SERVICE_UNAVAILABLE)));
        assert_eq!(counts(&s), (1, 2, 1, 2, 1));
        drop(first);
        assert_eq!((order.recv().await, order.recv().await), (Some("second"), Some("third")));
        assert_eq!(counts(&s), (0, 0, 3, 2, 1));
    }

    #[tokio::test]
    async fn a_waiter_gone_before_or_after_its_grant_loses_no_slot() {
        let s = state(1, 2);
        let first = slot(now(admit(&s)));
        // Gone while queued: leaves the queue.
        {
            let mut waiting = pin!(admit(&s));
            assert!(waiting.as_mut().poll(&mut Context::from_waker(Waker::noop())).is_pending());
            assert_eq!(counts(&s).1, 1);
        }
        assert_eq!(counts(&s), (1, 0, 1, 1, 1));
        // Granted the slot but gone before seeing it: gives it back.
        {
            let mut waiting = pin!(admit(&s));
            assert!(waiting.as_mut().poll(&mut Context::from_waker(Waker::noop())).is_pending());
            drop(first);
            assert_eq!(counts(&s), (1, 0, 2, 2, 1));
        }
        assert_eq!(counts(&s), (0, 0, 1, 2, 1));
        let _again = slot(now(admit(&s)));
    }

    #[tokio::test]
    async fn a_capacity_change_applies_to_the_next_request() {
        let s = state(3, 3);
        let held: Vec<Slot> = (0..2).map(|_| slot(now(admit(&s)))).collect();
        set_capacity(&s, 1);
        let mut waiting = pin!(admit(&s));
        let mut cx = Context::from_waker(Waker::noop());
        assert!(waiting.as_mut().poll(&mut cx).is_pending());
        let mut held = held.into_iter();
        drop(held.next());
        assert!(waiting.as_mut().poll(&mut cx).is_pending(), "one still in flight, over the new capacity");
        drop(held.next());
        let third = slot(waiting.await);
        // Raised (here to unlimited), the waiting get their slots at once.
        let mut fourth = pin!(admit(&s));
        assert!(fourth.as_mut().poll(&mut cx).is_pending());
        set_capacity(&s, 0);
        let _fourth = slot(now(fourth));
        assert_eq!(counts(&s), (2, 0, 4, 2, 2));
        drop(third);
    }
}
