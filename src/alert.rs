//! Alerts the filter sends itself when a provider's quota runs out: what they say, in
//! Alertmanager's `/api/v2/alerts` shape or as a flat JSON event, and the process-wide rule that
//! one alert per provider and event goes out per `min_interval`, however many workers see it.
//!
//! Payloads carry the provider's name, the event and its times, never a request's headers,
//! credentials or prompt text.
//!
//! ```
//! use llm_ratelimit::alert::{payload, Event, Format};
//! use llm_ratelimit::time::Instant;
//! let ev = Event::BreakerOpen { until: Instant::from_millis(1_700_000_060_000), terminal: false };
//! let body = payload(Format::Json, "openai", &ev, Instant::from_millis(1_700_000_000_000));
//! assert!(body.contains(r#""event":"breaker_open""#) && body.contains("2023-11-14T22:14:20.000Z"));
//! ```

use crate::store::{self, Status, Store};
use crate::time::{Duration, Instant};

/// What happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// The provider's quota ran out and the breaker opened, until `until`.
    BreakerOpen { until: Instant, terminal: bool },
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

/// The alert's body for `provider` at `at` (written to the millisecond).
pub fn payload(format: Format, provider: &str, event: &Event, at: Instant) -> String {
    let summary = json_string(&event.summary(provider));
    let provider_json = json_string(provider);
    let now = rfc3339(at);
    match format {
        Format::Alertmanager => {
            // Alertmanager resolves an alert at its endsAt: the expected reset while it fires
            // (a lost resolve cannot leave it firing), now when it is resolved.
            let ends = match event {
                Event::BreakerOpen { until, .. } => rfc3339((*until).max(at + Duration::from_secs(60))),
                Event::BreakerClosed => now.clone(),
                Event::Shedding { .. } => rfc3339(at + Duration::from_secs(5 * 60)),
            };
            let severity = if matches!(event, Event::Shedding { .. }) { "warning" } else { "critical" };
            format!(
                r#"[{{"labels":{{"alertname":"{}","provider":{provider_json},"severity":"{severity}","source":"llm-ratelimit"}},"annotations":{{"summary":{summary}}},"startsAt":"{now}","endsAt":"{ends}"}}]"#,
                event.alertname()
            )
        }
        Format::Json => {
            let (state, until) = match event {
                Event::BreakerOpen { until, .. } => ("firing", format!(r#","until":"{}""#, rfc3339(*until))),
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

/// When an event was last sent, process-wide (a shared-data value, stored in epoch ms;
/// `Instant::ZERO`: never).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SentAt(pub Instant);

impl store::Stored for SentAt {
    fn to_bytes(&self) -> Vec<u8> {
        self.0.as_millis().to_le_bytes().to_vec()
    }
    fn from_bytes(b: &[u8]) -> Option<Self> {
        Some(SentAt(Instant::from_millis(u64::from_le_bytes(b.try_into().ok()?))))
    }
}

/// Claims the right to send `event` now: true for one caller per `min_interval`, across every
/// worker sharing `store`. A resolve always goes (only the worker whose write closed the breaker
/// sends it); it does not free the slot, so a flapping provider alerts once per interval.
pub fn claim(
    store: &impl Store,
    key: &str,
    event: &Event,
    now: Instant,
    min_interval: Duration,
) -> Result<bool, Status> {
    // Stored to the millisecond: compared to the millisecond.
    let now = now.floor_millis();
    store::update(
        store,
        key,
        || SentAt(Instant::ZERO),
        |last| {
            if *event == Event::BreakerClosed {
                return (true, None);
            }
            let due = last.0 == Instant::ZERO || now - last.0 >= min_interval || now < last.0;
            (due, due.then_some(SentAt(now)))
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

/// An instant as RFC 3339 in UTC to the millisecond, e.g. `2026-11-30T00:50:00.000Z`.
pub fn rfc3339(at: Instant) -> String {
    let ms = at.as_millis();
    let (secs, millis) = (ms / 1000, ms % 1000);
    let (days, rest) = ((secs / 86_400) as i64, secs % 86_400);
    let (year, month, day) = crate::calendar::civil_from_days(days);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{millis:03}Z", rest / 3600, rest % 3600 / 60, rest % 60)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemStore;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    const T: Instant = Instant::from_millis(1_764_463_800_000); // 2025-11-30T00:50:00Z

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn times_are_rfc3339_utc() {
        assert_eq!(rfc3339(Instant::ZERO), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(T + ms(7)), "2025-11-30T00:50:00.007Z");
        assert_eq!(rfc3339(Instant::from_millis(951_782_400_000)), "2000-02-29T00:00:00.000Z");
        assert_eq!(rfc3339(Instant::from_millis(4_102_444_799_999)), "2099-12-31T23:59:59.999Z");
    }

    #[test]
    fn alertmanager_payloads_fire_until_the_reset_and_resolve_now() {
        let open = Event::BreakerOpen { until: T + ms(120_000), terminal: false };
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
        let terminal = Event::BreakerOpen { until: T, terminal: true };
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
        let open = Event::BreakerOpen { until: T, terminal: false };
        assert!(claim(&store, "k", &open, T, ms(60_000)).unwrap());
        assert!(!claim(&store, "k", &open, T + ms(10), ms(60_000)).unwrap(), "another worker, same trip");
        assert!(claim(&store, "k", &Event::BreakerClosed, T + ms(20), ms(60_000)).unwrap());
        assert!(!claim(&store, "k", &open, T + ms(30), ms(60_000)).unwrap(), "a flapping provider: once per interval");
        assert!(claim(&store, "k", &open, T + ms(60_000), ms(60_000)).unwrap());
    }
}
