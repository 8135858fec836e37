//! The filter encodes RLS requests and decodes answers by hand (src/global/proto.rs, to keep the
//! `.wasm` small): both directions checked against prost and envoy-types, what the service runs.

use envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::Entry;
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::{Code, DescriptorStatus, RateLimit};
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use envoy_types::pb::google::protobuf::{Duration, UInt64Value};
use llm_ratelimit::global::proto;
use prost::Message;

#[test]
fn the_filters_request_is_what_prost_reads() {
    let d = |unit: &'static str, hits: Option<u64>| proto::Descriptor {
        entries: vec![("provider", "openai"), ("tenant", "ünï"), ("unit", unit)],
        hits,
    };
    let bytes = proto::encode_request("llm-ratelimit", &[d("requests", Some(32)), d("tokens", Some(70_000))], 32);
    let got = RateLimitRequest::decode(bytes.as_slice()).expect("prost decodes it");
    let want = |unit: &str, hits: u64| RateLimitDescriptor {
        entries: [("provider", "openai"), ("tenant", "ünï"), ("unit", unit)]
            .map(|(k, v)| Entry { key: k.into(), value: v.into() })
            .to_vec(),
        hits_addend: Some(UInt64Value { value: hits }),
        ..Default::default()
    };
    assert_eq!(
        got,
        RateLimitRequest {
            domain: "llm-ratelimit".into(),
            descriptors: vec![want("requests", 32), want("tokens", 70_000)],
            hits_addend: 32,
        }
    );
    assert_eq!(bytes, got.encode_to_vec(), "the same bytes as prost's");
}

#[test]
fn prosts_answer_is_what_the_filter_reads() {
    let status = |code: Code, remaining: u32, limit: bool, reset: Option<(i64, i32)>| DescriptorStatus {
        code: code as i32,
        current_limit: limit.then(|| RateLimit { name: "n".into(), requests_per_unit: 100, unit: 1 }),
        limit_remaining: remaining,
        duration_until_reset: reset.map(|(seconds, nanos)| Duration { seconds, nanos }),
        ..Default::default()
    };
    let r = RateLimitResponse {
        overall_code: Code::OverLimit as i32,
        statuses: vec![
            status(Code::Ok, 41, true, Some((2, 250_000_000))),
            status(Code::OverLimit, 0, true, Some((0, 1))),
            status(Code::Ok, 0, false, None),
        ],
        raw_body: b"ignored".to_vec(),
        ..Default::default()
    };
    let got = proto::decode_response(&r.encode_to_vec()).expect("decodes");
    assert_eq!(got.overall, proto::Code::OverLimit);
    let s = |code, remaining, until_reset_ms| proto::Status { code, remaining, until_reset_ms };
    assert_eq!(
        got.statuses,
        vec![
            s(proto::Code::Ok, Some(41), Some(2250)),
            s(proto::Code::OverLimit, Some(0), Some(1)),
            s(proto::Code::Ok, None, None),
        ]
    );
}
