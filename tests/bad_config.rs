//! A bad configuration makes Envoy refuse to start, with a log line that names the field, the
//! bad value and what is allowed.

mod support;
use support::*;

fn refused(filter_config: &str, expected: &str) {
    let mock = Mock::start(&[]);
    match Envoy::spawn(&EnvoyOpts { filter_config, concurrency: 1, upstream_port: mock.port, edit: None }) {
        Ok(envoy) => panic!("Envoy accepted {filter_config}; log:\n{}", envoy.log()),
        Err(log) => assert!(
            log.contains(&format!("llm-ratelimit: invalid configuration: {expected}")),
            "expected {expected:?} in the Envoy log:\n{log}"
        ),
    }
}

#[test]
fn negative_rate_is_refused() {
    refused(r#"{"bucket":{"refill_rate":-1}}"#, "bucket.refill_rate: must be a number > 0, got -1");
}

#[test]
fn zero_capacity_is_refused() {
    refused(r#"{"bucket":{"capacity":0}}"#, "bucket.capacity: must be a whole number >= 1, got 0");
}

#[test]
fn unknown_field_is_refused_with_the_allowed_ones() {
    refused(r#"{"bucket":{"capacty":5}}"#, "bucket.capacty: unknown field `capacty`, expected one of `capacity`");
}

#[test]
fn unknown_priority_is_refused_with_the_allowed_ones() {
    refused(
        r#"{"classify":{"default":"URGENT"}}"#,
        "classify.default: unknown variant `URGENT`, expected one of `CRITICAL`, `HIGH`, `NORMAL`, `LOW`",
    );
}

#[test]
fn wrong_type_is_refused() {
    refused(r#"{"priorities":{"LOW":{"weight":"tiny"}}}"#, "priorities.LOW.weight: invalid type: string \"tiny\"");
}

#[test]
fn not_a_json_object_is_refused() {
    refused("capacity=5", "the configuration must be a JSON object");
    refused("[]", "the configuration must be a JSON object");
}
