//! What a worker holds with a deadline: request headers waiting for their body, provider 429s
//! waiting for theirs, and router retries waiting for the provider's reset. The tick posts an
//! event to each whose time came; the request decides by its phase what that means.
//!
//! Also what this worker knows of Envoy's body delivery: with `allow_on_headers_stop_iteration`
//! Envoy delivers a body while its headers are held; without it, never.

use super::event::{self, Event};
use crate::idmap::IdMap;
use crate::time::{Duration, Instant};
use std::cell::{Cell, RefCell};

/// How long a held 429 waits for its body while delivery is unknown, and once it is known.
const ANSWER_BODY_UNKNOWN: Duration = Duration::from_millis(150);
const ANSWER_BODY: Duration = Duration::from_millis(2_000);
/// How long a held request waits for its first body byte while delivery is unknown; then it is
/// decided from its size (never let through unlimited).
const REQUEST_BODY_UNKNOWN: Duration = Duration::from_millis(1_000);
/// Held requests whose body never came, while delivery was unknown, before this worker concludes
/// Envoy withholds bodies: several, so one slow client does not decide it.
const MISSING_TO_WITHHELD: u32 = 3;

/// Whether Envoy delivers a body while the filter holds the headers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bodies {
    Unknown,
    /// A body callback arrived while headers were held: the flag is on.
    Delivered,
    /// Several held requests never saw their body: the flag is off. Requests are then estimated
    /// from their size, and 429s pass with what their headers say.
    Withheld,
}

/// Headers held until their body is read.
struct Held {
    /// `None` until the next tick stamps it: a request's headers are held without a clock call,
    /// so its wait counts from the first tick after them (at most `tick_ms` long, never short).
    since: Option<Instant>,
    body_seen: bool,
    /// A request's (with its class's `max_wait_ms`), or a provider 429's (`None`).
    request_wait: Option<Duration>,
}

pub struct Holds {
    bodies: Cell<Bodies>,
    /// Held requests whose body never came while delivery was unknown.
    missing: Cell<u32>,
    held: RefCell<IdMap<Held>>,
    /// Router retries held until the provider's reset: id -> until.
    retries: RefCell<IdMap<Instant>>,
}

impl Default for Holds {
    fn default() -> Holds {
        Holds {
            bodies: Cell::new(Bodies::Unknown),
            missing: Cell::new(0),
            held: RefCell::default(),
            retries: RefCell::default(),
        }
    }
}

impl Holds {
    pub fn bodies(&self) -> Bodies {
        self.bodies.get()
    }

    /// Holds request `id`'s headers until its body is read, at most `max_wait` (from the next
    /// tick) once bodies are known to come.
    pub fn hold_request(&self, id: u32, max_wait: Duration) -> bool {
        self.hold(id, Held { since: None, body_seen: false, request_wait: Some(max_wait) })
    }

    /// Holds a provider 429's headers until its body is read.
    pub fn hold_answer(&self, id: u32, now: Instant) -> bool {
        self.hold(id, Held { since: Some(now.floor_millis()), body_seen: false, request_wait: None })
    }

    fn hold(&self, id: u32, h: Held) -> bool {
        self.held.try_borrow_mut().map(|mut held| held.insert(id, h)).is_ok()
    }

    /// A body callback for held `id`: proof that Envoy delivers bodies to held headers.
    pub fn body_arrived(&self, id: u32) {
        if let Ok(mut h) = self.held.try_borrow_mut() {
            if let Some(e) = h.get_mut(&id) {
                e.body_seen = true;
            }
        }
        self.bodies_delivered();
    }

    pub fn bodies_delivered(&self) {
        if self.bodies.replace(Bodies::Delivered) != Bodies::Delivered {
            log::info!("llm-ratelimit: allow_on_headers_stop_iteration is on: bodies are read before their headers");
        }
    }

    /// A held request's body never came while delivery was unknown; after several, this worker
    /// concludes Envoy withholds bodies.
    pub fn body_missing(&self) {
        let n = self.missing.get() + 1;
        self.missing.set(n);
        if n >= MISSING_TO_WITHHELD && self.bodies.get() == Bodies::Unknown {
            self.bodies.set(Bodies::Withheld);
            log::warn!(
                "llm-ratelimit: no held request received its body: allow_on_headers_stop_iteration seems off; \
                 token estimates now come from request sizes"
            );
        }
    }

    /// Forgets held headers of `id`.
    pub fn let_go(&self, id: u32) {
        if let Ok(mut h) = self.held.try_borrow_mut() {
            h.remove(&id);
        }
    }

    /// Holds router retry `id` until `until`; false if it cannot be held.
    pub fn hold_retry(&self, id: u32, until: Instant) -> bool {
        self.retries.try_borrow_mut().map(|mut r| r.insert(id, until)).is_ok()
    }

    pub fn drop_retry(&self, id: u32) {
        if let Ok(mut r) = self.retries.try_borrow_mut() {
            r.remove(&id);
        }
    }

    /// The provider's breaker closed (a probe succeeded): every held retry is decided again now.
    pub fn retries_due(&self) {
        if let Ok(mut r) = self.retries.try_borrow_mut() {
            for (id, _) in r.iter() {
                event::post(*id, Event::RetryDue);
            }
            *r = IdMap::default();
        }
    }

    /// Posts an event to every hold whose time came, and forgets it.
    pub fn post_due(&self, now: Instant) {
        let now = now.floor_millis();
        let bodies = self.bodies.get();
        if let Ok(mut h) = self.held.try_borrow_mut() {
            let due: Vec<(u32, Event)> = h
                .iter_mut()
                .filter_map(|(id, e)| {
                    let since = *e.since.get_or_insert(now);
                    let limit = match e.request_wait {
                        Some(max) if e.body_seen || bodies == Bodies::Delivered => max,
                        Some(_) => REQUEST_BODY_UNKNOWN,
                        None if bodies == Bodies::Delivered => ANSWER_BODY,
                        None => ANSWER_BODY_UNKNOWN,
                    };
                    let late = now - since >= limit || now < since;
                    let ev = if e.request_wait.is_some() { Event::BodyLate } else { Event::AnswerLate };
                    late.then_some((*id, ev))
                })
                .collect();
            for (id, ev) in due {
                h.remove(&id);
                event::post(id, ev);
            }
        }
        if let Ok(mut r) = self.retries.try_borrow_mut() {
            let due: Vec<u32> = r.iter().filter(|(_, until)| **until <= now).map(|(id, _)| *id).collect();
            for id in due {
                r.remove(&id);
                event::post(id, Event::RetryDue);
            }
        }
    }
}
