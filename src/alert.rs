//! Alerts the filter sends itself when a provider's quota runs out: what they say, in
//! Alertmanager's `/api/v2/alerts` shape or as a flat JSON event, and the process-wide rule that
//! one alert per provider and event goes out per `min_interval`, however many workers see it.
//!
//! Payloads carry the provider's name, the event and its times, never a request's headers,
//! credentials or prompt text.
//!
//! ```
//! use llm_ratelimit::alert::{payload, Event, Format};
//! let ev = Event::BreakerOpen { until_ms: 1_700_000_060_000, terminal: false };
//! let body = payload(Format::Json, "openai", &ev, 1_700_000_000_000);
//! assert!(body.contains(r#""event":"breaker_open""#) && body.contains("2023-11-14T22:14:20.000Z"));
//! ```

use crate::store::{self, Status, Store};

/// What happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// The provider's quota ran out and the breaker opened, until `until_ms`.
    BreakerOpen { until_ms: u64, terminal: bool },
    /// The breaker closed again: the alert above is resolved.
    BreakerClosed,
    /// This worker shed at least `per_minute` waiting requests in the last minute.
    Shedding { per_minute: u64 },
}

/// How the alert is written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// A list of one alert for Alertmanager's `POST /api/v2/alerts`.
    Alertmanager,
    /// One flat event, for webhook relays (Slack and the like).
    Json,
}

impl Event {
    /// The event's name in payloads and shared-data keys.
    pub fn name(&self) -> &'static str {
        match self {
            Event::BreakerOpen { terminal: true, .. } => SLOTS[0],
            Event::BreakerOpen { .. } | Event::BreakerClosed => SLOTS[1],
            Event::Shedding { .. } => SLOTS[2],
        }
    }

    fn alertname(&self) -> &'static str {
        match self {
            Event::BreakerOpen { terminal: true, .. } => "LLMProviderTerminalQuota",
            Event::BreakerOpen { .. } | Event::BreakerClosed => "LLMProviderQuotaExhausted",
            Event::Shedding { .. } => "LLMRequestsShed",
        }
    }

    fn summary(&self, provider: &str) -> String {
        match self {
            Event::BreakerOpen { terminal: true, .. } => {
                format!("{provider}: terminal quota (billing, spend or daily limit): requests fail fast")
            }
            Event::BreakerOpen { .. } => format!("{provider}: quota exhausted, traffic held until the reset"),
            Event::BreakerClosed => format!("{provider}: quota back, traffic flows"),
            Event::Shedding { per_minute } => {
                format!("{provider}: {per_minute} waiting requests shed in the last minute")
            }
        }
    }
}

/// The alert's body for `provider` at `now_ms` (epoch milliseconds).
pub fn payload(format: Format, provider: &str, event: &Event, now_ms: u64) -> String {
    let summary = json_string(&event.summary(provider));
    let provider_json = json_string(provider);
    let now = rfc3339(now_ms);
    match format {
        Format::Alertmanager => {
            // Alertmanager resolves an alert at its endsAt: the expected reset while it fires
            // (a lost resolve cannot leave it firing), now when it is resolved.
            let ends = match event {
                Event::BreakerOpen { until_ms, .. } => rfc3339((*until_ms).max(now_ms + 60_000)),
                Event::BreakerClosed => now.clone(),
                Event::Shedding { .. } => rfc3339(now_ms + 5 * 60_000),
            };
            let severity = if matches!(event, Event::Shedding { .. }) { "warning" } else { "critical" };
            format!(
                r#"[{{"labels":{{"alertname":"{}","provider":{provider_json},"severity":"{severity}","source":"llm-ratelimit"}},"annotations":{{"summary":{summary}}},"startsAt":"{now}","endsAt":"{ends}"}}]"#,
                event.alertname()
            )
        }
        Format::Json => {
            let (state, until) = match event {
                Event::BreakerOpen { until_ms, .. } => ("firing", format!(r#","until":"{}""#, rfc3339(*until_ms))),
                Event::BreakerClosed => ("resolved", String::new()),
                Event::Shedding { .. } => ("firing", String::new()),
            };
            format!(
                r#"{{"event":"{}","state":"{state}","provider":{provider_json},"at":"{now}"{until},"message":{summary}}}"#,
                event.name()
            )
        }
    }
}

/// Every event's name (`Event::name`), one alert slot each.
pub const SLOTS: [&str; 3] = ["terminal_quota", "breaker_open", "shedding"];

/// The shared-data key of filter `name`'s slot for one event.
pub fn slot_key(name: &str, slot: &str) -> String {
    format!("llm_ratelimit/{name}/alert/{slot}")
}

/// When an event was last sent, process-wide (a shared-data value).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SentAt(pub u64);

impl store::Stored for SentAt {
    fn to_bytes(&self) -> Vec<u8> {
        self.0.to_le_bytes().to_vec()
    }
    fn from_bytes(b: &[u8]) -> Option<Self> {
        Some(SentAt(u64::from_le_bytes(b.try_into().ok()?)))
    }
}

/// Claims the right to send `event` now: true for one caller per `min_interval_ms`, across every
/// worker sharing `store`. A resolve always goes (only the worker whose write closed the breaker
/// sends it); it does not free the slot, so a flapping provider alerts once per interval.
pub fn claim(store: &impl Store, key: &str, event: &Event, now_ms: u64, min_interval_ms: u64) -> Result<bool, Status> {
    store::update(
        store,
        key,
        || SentAt(0),
        |last| {
            if *event == Event::BreakerClosed {
                return (true, None);
            }
            let due = last.0 == 0 || now_ms.saturating_sub(last.0) >= min_interval_ms || now_ms < last.0;
            (due, due.then_some(SentAt(now_ms)))
        },
    )
}

/// `s` as a JSON string literal (by hand: serde_json's serializer costs the `.wasm` kilobytes).
fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if u32::from(c) < 0x20 => out.push_str(&format!("\\u{:04x}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Epoch milliseconds as RFC 3339 in UTC, e.g. `2026-11-30T00:50:00.000Z`.
pub fn rfc3339(ms: u64) -> String {
    let (secs, millis) = (ms / 1000, ms % 1000);
    let (days, rest) = ((secs / 86_400) as i64, secs % 86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{millis:03}Z", rest / 3600, rest % 3600 / 60, rest % 60)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemStore;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    const T: u64 = 1_764_463_800_000; // 2025-11-30T00:50:00Z

    #[test]
    fn times_are_rfc3339_utc() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(T + 7), "2025-11-30T00:50:00.007Z");
        assert_eq!(rfc3339(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(rfc3339(4_102_444_799_999), "2099-12-31T23:59:59.999Z");
    }

    #[test]
    fn alertmanager_payloads_fire_until_the_reset_and_resolve_now() {
        let open = Event::BreakerOpen { until_ms: T + 120_000, terminal: false };
        let v: serde_json::Value = serde_json::from_str(&payload(Format::Alertmanager, "openai", &open, T)).unwrap();
        let a = &v[0];
        assert_eq!(a["labels"]["alertname"], "LLMProviderQuotaExhausted");
        assert_eq!(a["labels"]["provider"], "openai");
        assert_eq!(
            (a["startsAt"].as_str(), a["endsAt"].as_str()),
            (Some("2025-11-30T00:50:00.000Z"), Some("2025-11-30T00:52:00.000Z"))
        );
        let v: serde_json::Value =
            serde_json::from_str(&payload(Format::Alertmanager, "openai", &Event::BreakerClosed, T)).unwrap();
        assert_eq!(v[0]["labels"]["alertname"], "LLMProviderQuotaExhausted", "the same alert, resolved");
        assert_eq!(v[0]["endsAt"], "2025-11-30T00:50:00.000Z");
        let terminal = Event::BreakerOpen { until_ms: T, terminal: true };
        let v: serde_json::Value = serde_json::from_str(&payload(Format::Alertmanager, "a\"b", &terminal, T)).unwrap();
        assert_eq!(
            (v[0]["labels"]["alertname"].as_str(), v[0]["labels"]["provider"].as_str()),
            (Some("LLMProviderTerminalQuota"), Some("a\"b"))
        );
    }

    #[test]
    fn json_payloads_are_one_flat_event() {
        let v: serde_json::Value =
            serde_json::from_str(&payload(Format::Json, "gemini", &Event::Shedding { per_minute: 250 }, T)).unwrap();
        assert_eq!((v["event"].as_str(), v["state"].as_str()), (Some("shedding"), Some("firing")));
        assert!(v["message"].as_str().unwrap().contains("250"));
    }

    #[test]
    fn one_alert_per_interval_across_workers_and_a_resolve_always_goes() {
        let store = MemStore::default();
        let open = Event::BreakerOpen { until_ms: T, terminal: false };
        assert!(claim(&store, "k", &open, T, 60_000).unwrap());
        assert!(!claim(&store, "k", &open, T + 10, 60_000).unwrap(), "another worker, same trip");
        assert!(claim(&store, "k", &Event::BreakerClosed, T + 20, 60_000).unwrap());
        assert!(!claim(&store, "k", &open, T + 30, 60_000).unwrap(), "a flapping provider: once per interval");
        assert!(claim(&store, "k", &open, T + 60_000, 60_000).unwrap());
    }
}
