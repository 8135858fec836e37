//! A worker's alerts: raised by what it learns, sent on its next tick (one per provider and event
//! per interval, process-wide), and counted by their receiver's answer.

use super::api::Map;
use super::calls::host;
use super::metrics::Metrics;
use super::shared::SharedData;
use crate::alert::{self, Event as Alert};
use crate::config::Config;
use crate::idmap::IdMap;
use crate::time::{Duration, Instant};
use std::cell::{Cell, RefCell};

#[derive(Default)]
pub struct Alerts {
    /// Alerts to send on the next tick, and when they were raised (`Instant::ZERO`: at the tick).
    queued: RefCell<Vec<(Alert, Instant)>>,
    /// Calls sent whose answer has not come.
    calls: RefCell<IdMap<()>>,
    /// This minute's start and the waiters shed in it, for the shedding alert.
    shed_minute: Cell<(Instant, u64)>,
}

impl Alerts {
    /// Queues `alert` for the next tick (when alerts are configured).
    pub fn raise(&self, c: &Config, alert: Alert, now: Instant) {
        if c.alert.is_some() {
            if let Ok(mut a) = self.queued.try_borrow_mut() {
                a.push((alert, now));
            }
        }
    }

    /// A waiter was shed: the shedding alert when this minute's count reaches its threshold.
    pub fn shed(&self, c: &Config, now: Instant) {
        let Some(cfg) = &c.alert else { return };
        let now = now.floor_millis();
        let (start, n) = self.shed_minute.get();
        let (start, n) = if now - start >= Duration::from_secs(60) { (now, 1) } else { (start, n + 1) };
        self.shed_minute.set((start, n));
        if cfg.shed_per_minute > 0 && n == cfg.shed_per_minute {
            self.raise(c, Alert::Shedding { per_minute: n }, now);
        }
    }

    /// Sends the queued alerts: one per provider and event per interval, process-wide.
    pub fn send(&self, c: &Config, metrics: &Metrics, now: Instant) {
        let Some(cfg) = &c.alert else { return };
        let queued = match self.queued.try_borrow_mut() {
            Ok(mut a) if !a.is_empty() => std::mem::take(&mut *a),
            _ => return,
        };
        for (alert, at) in queued {
            let at = if at == Instant::ZERO { now } else { at };
            let key = alert::slot_key(&c.name, alert.name());
            match alert::claim(&SharedData, &key, &alert, now, Duration::from_millis(cfg.min_interval_ms)) {
                Ok(true) => {}
                Ok(false) => continue,
                Err(s) => log::debug!("llm-ratelimit: cannot claim the alert slot: status {s}"),
            }
            let body = alert::payload(cfg.format, &c.name, &alert, at);
            let headers = crate::header_map::serialize(&[
                (":method", "POST"),
                (":path", cfg.path.as_str()),
                (":authority", cfg.cluster.as_str()),
                ("content-type", "application/json"),
            ]);
            let timeout = cfg.timeout_ms.min(u64::from(u32::MAX)) as u32;
            match host().http_call(&cfg.cluster, &headers, body.as_bytes(), timeout) {
                Ok(token) => {
                    if let Ok(mut calls) = self.calls.try_borrow_mut() {
                        calls.insert(token, ());
                    }
                }
                Err(s) => {
                    metrics.provider.alerts_failed.inc();
                    log::warn!(
                        "llm-ratelimit: {}: cannot send the {} alert to {}: status {s}",
                        c.name,
                        alert.name(),
                        cfg.cluster
                    );
                }
            }
        }
    }

    /// The answer to an alert: counted as sent (2xx) or failed (anything else, or none).
    pub fn answered(&self, c: &Config, metrics: &Metrics, token: u32, num_headers: usize) {
        let ours = self.calls.try_borrow_mut().is_ok_and(|mut calls| calls.remove(&token).is_some());
        if !ours {
            return;
        }
        let status =
            if num_headers == 0 { None } else { host().header(Map::HttpCallResponseHeaders, ":status").ok().flatten() };
        match status.as_deref().and_then(|s| s.parse::<u16>().ok()) {
            Some(200..=299) => metrics.provider.alerts_sent.inc(),
            other => {
                metrics.provider.alerts_failed.inc();
                log::warn!("llm-ratelimit: {}: the alert receiver answered {other:?}", c.name);
            }
        }
    }
}
