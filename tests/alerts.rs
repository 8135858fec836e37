//! The filter's own alerts arrive in a real Alertmanager (Debian `prometheus-alertmanager`):
//! once per trip across workers, resolved when the breaker closes, and never blocking traffic
//! when the receiver is down.

mod support;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use support::*;

/// A real Alertmanager on a free port, killed on drop.
struct Alertmanager {
    child: Child,
    port: u16,
    _dir: TempDir,
}

impl Alertmanager {
    fn start() -> Alertmanager {
        let dir = TempDir::new();
        let config = dir.0.join("alertmanager.yml");
        std::fs::write(&config, "route:\n  receiver: none\nreceivers:\n- name: none\n").unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let cluster_port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut child = Command::new("prometheus-alertmanager")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.path={}", dir.0.join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg(format!("--cluster.listen-address=127.0.0.1:{cluster_port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("prometheus-alertmanager (scripts/setup.sh --test installs it)");
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || for _ in BufReader::new(stderr).lines() {});
        let ready = eventually(Duration::from_secs(15), || {
            get(&format!("http://127.0.0.1:{port}/-/ready")).is_ok_and(|r| r.status == 200)
        });
        assert!(ready, "Alertmanager did not become ready");
        Alertmanager { child, port, _dir: dir }
    }

    /// Alerts it holds, active and resolved-but-not-yet-gone alike: (alertname, provider, state).
    fn alerts(&self) -> Vec<serde_json::Value> {
        let url = format!("http://127.0.0.1:{}/api/v2/alerts?active=true&silenced=true&inhibited=true", self.port);
        get_json(&url).as_array().cloned().unwrap_or_default()
    }
}

impl Drop for Alertmanager {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The Alertmanager port for `EnvoyOpts.edit` (a plain function).
static PORT: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(0);

fn to_alertmanager(yaml: String) -> String {
    let port = PORT.load(std::sync::atomic::Ordering::Relaxed);
    yaml.replace("port_value: 9093", &format!("port_value: {port}"))
}

fn start_envoy(am_port: u16, mock: &Mock) -> Envoy {
    PORT.store(am_port, std::sync::atomic::Ordering::Relaxed);
    // No router retries: Envoy drops a client's own `x-envoy-max-retries` (it sanitizes
    // `x-envoy-*` from clients it does not count as internal), and each retry of a trip would
    // be held for the next probe and fail it, doubling the back-off (1 + 2 + 4 + 8 + 16 s).
    let config = r#"{"name":"al","alert":{"cluster":"alertmanager","min_interval_s":60},
        "priorities":{"NORMAL":{"max_retries":0}}}"#;
    let opts =
        EnvoyOpts { filter_config: config, concurrency: 2, upstream_port: mock.port, edit: Some(to_alertmanager) };
    Envoy::spawn(&opts).unwrap_or_else(|log| panic!("{log}"))
}

/// A 429 with no timing: the breaker opens on a guess (1 s back-off), then a probe checks.
fn trip(url: &str) {
    let r = chat(url, &[("x-mock-status", "429")]).unwrap();
    assert_eq!(r.status, 429, "{r:?}");
}

#[test]
fn a_trip_alerts_once_across_workers_and_the_close_resolves_it() {
    let am = Alertmanager::start();
    let mock = Mock::start(&[]);
    let envoy = start_envoy(am.port, &mock);
    let url = envoy.url("/v1/chat/completions");
    trip(&url);
    let fired = eventually(Duration::from_secs(5), || {
        am.alerts()
            .iter()
            .any(|a| a["labels"]["alertname"] == "LLMProviderQuotaExhausted" && a["labels"]["provider"] == "al")
    });
    assert!(fired, "no alert in Alertmanager: {:?}", am.alerts());
    assert_eq!(envoy.stat("al", "alerts.sent"), 1);
    // The probe after the back-off fails: a second trip, within min_interval_s: no second alert.
    std::thread::sleep(Duration::from_millis(1_100));
    trip(&url);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(envoy.stat("al", "alerts.sent"), 1, "one alert per interval, process-wide");
    // The next probe succeeds and closes the breaker: the alert is resolved.
    // Generous: under a loaded CI machine the back-off (2 s after the failed probe) and the tick
    // that sends the resolve can both run late; a pass returns as soon as it is sent.
    let resolved = eventually(Duration::from_secs(30), || {
        let _ = chat(&url, &[]);
        envoy.stat("al", "alerts.sent") == 2
    });
    let al: std::collections::BTreeMap<_, _> = envoy.stats().into_iter().filter(|(k, _)| k.contains(".al.")).collect();
    assert!(resolved, "no resolve sent: {al:?}\nalerts: {:?}\n{}", am.alerts(), envoy.log());
    let gone = eventually(Duration::from_secs(5), || {
        let now = epoch_ms();
        am.alerts().iter().all(|a| {
            let ends = a["endsAt"].as_str().unwrap_or("");
            a["status"]["state"] != "active"
                || ends < llm_ratelimit::alert::rfc3339(llm_ratelimit::time::Instant::from_millis(now + 1000)).as_str()
        })
    });
    assert!(gone, "the alert is still firing: {:?}", am.alerts());
    assert_eq!(envoy.stat("al", "alerts.failed"), 0);
    // Payloads carry the provider and the event, never a request's credentials.
    let text = serde_json::to_string(&am.alerts()).unwrap();
    assert!(!text.to_lowercase().contains("authorization") && !text.contains("Bearer"), "{text}");
}

#[test]
fn with_the_receiver_down_traffic_goes_on_and_the_failure_is_counted() {
    let am = Alertmanager::start();
    let port = am.port;
    drop(am);
    let mock = Mock::start(&[]);
    let envoy = start_envoy(port, &mock);
    let url = envoy.url("/v1/chat/completions");
    trip(&url);
    assert!(eventually(Duration::from_secs(5), || envoy.stat("al", "alerts.failed") == 1));
    // The breaker's back-off passes and requests flow again, nothing blocked on the alert.
    std::thread::sleep(Duration::from_millis(1_100));
    assert!(eventually(Duration::from_secs(5), || chat(&url, &[]).is_ok_and(|r| r.status == 200)));
}
