//! `alert`: alerts the filter sends itself (off unless the section is there).

use super::{absolute_path, Section};
use crate::alert::Format;

/// Where and how the filter alerts when a provider's quota runs out.
#[derive(Clone, Debug, PartialEq)]
pub struct AlertConfig {
    /// The Envoy cluster to POST to (e.g. Alertmanager's).
    pub cluster: String,
    pub path: String,
    pub format: Format,
    /// One alert per provider and event per interval, process-wide.
    pub min_interval_ms: u64,
    pub timeout_ms: u64,
    /// Shed waiters per minute on one worker that raise an alert (0: never).
    pub shed_per_minute: u64,
}

pub(super) fn read(s: &mut Section) -> AlertConfig {
    AlertConfig {
        cluster: s.nonempty("cluster", "required: the Envoy cluster to send alerts to"),
        path: s.string("path", "/api/v2/alerts", absolute_path),
        format: s
            .variant("format", &["alertmanager", "json"], &[Format::Alertmanager, Format::Json])
            .unwrap_or(Format::Alertmanager),
        min_interval_ms: s.whole("min_interval_s", 300, 1) * 1000,
        timeout_ms: s.whole("timeout_ms", 1000, 1),
        shed_per_minute: s.whole("shed_per_minute", 100, 0),
    }
}

#[cfg(test)]
mod tests {
    use crate::config::{err, Config};
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn alerts_are_off_by_default_and_need_a_cluster() {
        assert_eq!(Config::default().alert, None);
        let a = Config::parse(br#"{"alert":{"cluster":"alertmanager"}}"#).unwrap().alert.unwrap();
        assert_eq!(
            (a.path.as_str(), a.format, a.min_interval_ms),
            ("/api/v2/alerts", crate::alert::Format::Alertmanager, 300_000)
        );
        assert_eq!((a.timeout_ms, a.shed_per_minute), (1000, 100));
        assert!(err(r#"{"alert":{}}"#).starts_with("alert.cluster: required"));
        assert!(
            err(r#"{"alert":{"cluster":"x","format":"slack"}}"#).starts_with("alert.format: unknown variant `slack`")
        );
        assert!(err(r#"{"alert":{"cluster":"x","path":"v2"}}"#).starts_with("alert.path: must start with '/'"));
    }
}
