//! The filter encodes RLS requests and decodes answers by hand (src/global/proto.rs, to keep the
//! `.wasm` small): both directions checked against prost and envoy-types, what the service runs;
//! and a settlement the filter encodes does what it says at the service.

mod common;

use envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::Entry;
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::{Code, DescriptorStatus, RateLimit};
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use envoy_types::pb::google::protobuf::{Duration, UInt64Value};
use llm_ratelimit::global::proto;
use prost::Message;

use common::{usage, Redis, Rls};

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

/// The filter's request, as the service receives it.
fn as_received(bytes: &[u8]) -> RateLimitRequest {
    let got = RateLimitRequest::decode(bytes).expect("prost decodes it");
    assert_eq!(bytes, got.encode_to_vec(), "the same bytes as prost's");
    got
}

#[test]
fn the_filters_settlement_is_the_documented_wire_form() {
    assert_eq!(proto::SETTLE_KEY, common::SETTLE);
    let d = |kind, hits| {
        proto::Descriptor { entries: vec![("provider", "openai"), ("unit", "tokens")], hits: Some(hits) }.settling(kind)
    };
    let got = as_received(&proto::encode_request(
        "llm-ratelimit",
        &[d(proto::Settle::Refund, 850), d(proto::Settle::Charge, 419)],
        0,
    ));
    let want = |kind: &str, hits| RateLimitDescriptor {
        entries: [("provider", "openai"), ("unit", "tokens"), ("llm_ratelimit.settle", kind)]
            .map(|(k, v)| Entry { key: k.into(), value: v.into() })
            .to_vec(),
        hits_addend: Some(UInt64Value { value: hits }),
        ..Default::default()
    };
    assert_eq!(got.descriptors, [want("refund", 850), want("charge", 419)]);
}

#[tokio::test]
async fn the_filters_settlements_refund_and_charge_at_the_service() {
    let redis = Redis::start();
    let url = format!("redis://127.0.0.1:{}", redis.port);
    let rls = Rls::start(&["--redis", &url, "--redis-timeout", "1s"]);
    let client = rls.client().await.0;
    // `tok` has 1000 per minute (tests/common's limits).
    let d = |hits| proto::Descriptor { entries: vec![("tok", "w")], hits: Some(hits) };
    let send = |bytes: Vec<u8>| {
        let request = as_received(&bytes);
        let mut c = client.clone();
        async move { c.should_rate_limit(request).await.unwrap().into_inner() }
    };
    let reserve = send(proto::encode_request("test", &[d(800)], 800)).await;
    assert_eq!((reserve.overall_code, reserve.statuses[0].limit_remaining), (Code::Ok as i32, 200));
    let refund = send(proto::encode_request("test", &[d(500).settling(proto::Settle::Refund)], 500)).await;
    let status = proto::decode_response(&refund.encode_to_vec()).unwrap();
    assert_eq!(status.overall, proto::Code::Ok);
    assert_eq!(status.statuses[0].remaining, Some(700), "the filter reads the settled numbers");
    let charge = send(proto::encode_request("test", &[d(900).settling(proto::Settle::Charge)], 900)).await;
    assert_eq!((charge.overall_code, charge.statuses[0].limit_remaining), (Code::Ok as i32, 0));
    assert_eq!(usage(&rls, "tok=w").1["used"], 1200);
}
