//! What a worker tells one of its requests: posted by the tick, a call's answer or another
//! request's arrival, and delivered by `dispatch` after the callback that posted it, to the
//! request itself. Each request decides by its own phase what an event means, so nothing acts on
//! a request that has moved on (answered, gone upstream, or done).

use super::vm_local::vm_local;
use crate::worker::{Refusal, Release};
use std::cell::RefCell;

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Event {
    /// Its turn in the queue came: it holds its tokens.
    Released(Release),
    /// It waited its class's `max_wait_ms` in the queue.
    Expired(Refusal),
    /// Evicted from the queue to make room for a more important request.
    Shed(Refusal),
    /// The rate limit service let it through.
    GlobalPassed,
    /// The rate limit service refused it (or failed, under `failure_mode: deny`).
    GlobalRefused(Refusal),
    /// Its headers were held for its body, and the body did not come in time.
    BodyLate,
    /// Its provider 429 was held for its body, and the body did not come in time.
    AnswerLate,
    /// (Observer) its held retry's time came: decide again.
    RetryDue,
}

vm_local! {
    /// Events posted and not yet delivered: (request id, event).
    static POSTED: RefCell<Vec<(u32, Event)>> = RefCell::new(Vec::new());
}

/// Posts `event` for request `id`, delivered after the current callback.
pub fn post(id: u32, event: Event) {
    POSTED.with(|p| {
        if let Ok(mut p) = p.try_borrow_mut() {
            p.push((id, event));
        }
    });
}

/// The events posted so far, oldest first.
pub fn take() -> Vec<(u32, Event)> {
    POSTED.with(|p| p.try_borrow_mut().map(|mut p| std::mem::take(&mut *p)).unwrap_or_default())
}
