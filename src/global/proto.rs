//! The protobuf wire format of Envoy's rate limit service v3, by hand: the few messages the filter
//! sends and reads (`envoy.service.ratelimit.v3.RateLimitRequest` / `RateLimitResponse`, and the
//! `envoy.config.core.v3.GrpcService` naming the cluster). A protobuf crate would cost the `.wasm`
//! more than these 200 lines; unknown fields are skipped, so newer services still decode.

/// One descriptor: its entries and, when set, its own `hits_addend`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Descriptor<'a> {
    pub entries: Vec<(&'a str, &'a str)>,
    pub hits: Option<u64>,
}

/// The key of the entry that makes a descriptor a settlement at llm-ratelimit-rls: its last
/// entry, valued `refund` or `charge`; the units are the descriptor's `hits_addend`.
pub const SETTLE_KEY: &str = "llm_ratelimit.settle";

/// A settlement's kind: units taken off the window (never below 0), or added with no check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Settle {
    Refund,
    Charge,
}

impl Settle {
    pub fn value(self) -> &'static str {
        match self {
            Settle::Refund => "refund",
            Settle::Charge => "charge",
        }
    }
}

impl<'a> Descriptor<'a> {
    /// This descriptor as a settlement of `kind`: the settle entry goes last.
    pub fn settling(mut self, kind: Settle) -> Descriptor<'a> {
        self.entries.push((SETTLE_KEY, kind.value()));
        self
    }
}

/// `RateLimitResponse.Code`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Code {
    #[default]
    Unknown,
    Ok,
    OverLimit,
}

impl Code {
    /// From an enum field, read as protobuf reads int32 (the varint's low 32 bits).
    fn from(v: u64) -> Code {
        let v = v as i32;
        match v {
            1 => Code::Ok,
            2 => Code::OverLimit,
            _ => Code::Unknown,
        }
    }
}

/// One `DescriptorStatus`. `remaining` is known only when the service says which limit applied
/// (`current_limit`): proto3 cannot tell an absent `limit_remaining` from 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Status {
    pub code: Code,
    pub remaining: Option<u64>,
    pub until_reset_ms: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Response {
    pub overall: Code,
    pub statuses: Vec<Status>,
}

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn tag(out: &mut Vec<u8>, field: u32, wire: u8) {
    varint(out, (u64::from(field) << 3) | u64::from(wire));
}

fn bytes(out: &mut Vec<u8>, field: u32, b: &[u8]) {
    tag(out, field, 2);
    varint(out, b.len() as u64);
    out.extend_from_slice(b);
}

fn uint(out: &mut Vec<u8>, field: u32, v: u64) {
    if v != 0 {
        tag(out, field, 0);
        varint(out, v);
    }
}

/// `RateLimitRequest { domain = 1, descriptors = 2, hits_addend = 3 }`.
pub fn encode_request(domain: &str, descriptors: &[Descriptor], hits_addend: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(128);
    bytes(&mut out, 1, domain.as_bytes());
    for d in descriptors {
        // RateLimitDescriptor { entries = 1 { key = 1, value = 2 }, hits_addend = 3 (UInt64Value) }
        let mut desc = Vec::with_capacity(64);
        for (k, v) in &d.entries {
            let mut entry = Vec::with_capacity(k.len() + v.len() + 4);
            bytes(&mut entry, 1, k.as_bytes());
            bytes(&mut entry, 2, v.as_bytes());
            bytes(&mut desc, 1, &entry);
        }
        if let Some(h) = d.hits {
            let mut wrapped = Vec::with_capacity(11);
            uint(&mut wrapped, 1, h);
            bytes(&mut desc, 3, &wrapped);
        }
        bytes(&mut out, 2, &desc);
    }
    uint(&mut out, 3, u64::from(hits_addend));
    out
}

/// `GrpcService { envoy_grpc = 1 { cluster_name = 1 } }`: Envoy would otherwise try to parse the
/// bare cluster name as this message, which some names happen to be.
pub fn encode_service(cluster: &str) -> Vec<u8> {
    let mut inner = Vec::with_capacity(cluster.len() + 2);
    bytes(&mut inner, 1, cluster.as_bytes());
    let mut out = Vec::with_capacity(inner.len() + 2);
    bytes(&mut out, 1, &inner);
    out
}

/// A cursor over one message's fields.
struct Fields<'a> {
    rest: &'a [u8],
}

enum Value<'a> {
    Int(u64),
    Bytes(&'a [u8]),
    Fixed,
}

impl<'a> Fields<'a> {
    fn varint(&mut self) -> Result<u64, &'static str> {
        let mut v = 0u64;
        for i in 0..10 {
            let (&b, rest) = self.rest.split_first().ok_or("truncated varint")?;
            self.rest = rest;
            v |= u64::from(b & 0x7f) << (7 * i);
            if b < 0x80 {
                return Ok(v);
            }
        }
        Err("varint longer than 10 bytes")
    }

    fn skip(&mut self, n: u64) -> Result<&'a [u8], &'static str> {
        let n = usize::try_from(n).map_err(|_| "length out of range")?;
        if n > self.rest.len() {
            return Err("truncated field");
        }
        let (b, rest) = self.rest.split_at(n);
        self.rest = rest;
        Ok(b)
    }

    fn next(&mut self) -> Option<Result<(u64, Value<'a>), &'static str>> {
        if self.rest.is_empty() {
            return None;
        }
        Some(self.field())
    }

    fn field(&mut self) -> Result<(u64, Value<'a>), &'static str> {
        let key = self.varint()?;
        let value = match key & 7 {
            0 => Value::Int(self.varint()?),
            1 => self.skip(8).map(|_| Value::Fixed)?,
            2 => {
                let n = self.varint()?;
                Value::Bytes(self.skip(n)?)
            }
            5 => self.skip(4).map(|_| Value::Fixed)?,
            _ => return Err("unsupported wire type"),
        };
        Ok((key >> 3, value))
    }
}

fn fields(b: &[u8]) -> Fields<'_> {
    Fields { rest: b }
}

/// `google.protobuf.Duration { seconds = 1, nanos = 2 }` fields, merged into `d` (protobuf merges a
/// repeated message field), read as int64 and int32 are.
fn duration(b: &[u8], d: &mut (i64, i32)) -> Result<(), &'static str> {
    let mut f = fields(b);
    while let Some(field) = f.next() {
        match field? {
            (1, Value::Int(v)) => d.0 = v as i64,
            (2, Value::Int(v)) => d.1 = v as u32 as i32,
            _ => {}
        }
    }
    Ok(())
}

/// A duration in milliseconds, rounded up; `None` when negative or malformed (then the answer
/// has no reset, rather than being unreadable).
fn millis((secs, nanos): (i64, i32)) -> Option<u64> {
    let (secs, nanos) = (u64::try_from(secs).ok()?, u64::try_from(nanos).ok().filter(|&n| n < 1_000_000_000)?);
    Some(secs.saturating_mul(1000).saturating_add(nanos.div_ceil(1_000_000)))
}

fn status(b: &[u8]) -> Result<Status, &'static str> {
    let mut s = Status::default();
    let (mut remaining, mut has_limit, mut reset) = (0u64, false, None);
    let mut f = fields(b);
    while let Some(field) = f.next() {
        match field? {
            (1, Value::Int(v)) => s.code = Code::from(v),
            (2, Value::Bytes(_)) => has_limit = true,
            (3, Value::Int(v)) => remaining = v & u64::from(u32::MAX),
            (4, Value::Bytes(d)) => duration(d, reset.get_or_insert((0, 0)))?,
            _ => {}
        }
    }
    s.remaining = has_limit.then_some(remaining);
    s.until_reset_ms = reset.and_then(millis);
    Ok(s)
}

/// Decodes a `RateLimitResponse` (`overall_code = 1`, `statuses = 2`; the rest is skipped).
pub fn decode_response(b: &[u8]) -> Result<Response, &'static str> {
    let mut r = Response::default();
    let mut f = fields(b);
    while let Some(field) = f.next() {
        match field? {
            (1, Value::Int(v)) => r.overall = Code::from(v),
            (2, Value::Bytes(s)) if r.statuses.len() < MAX_STATUSES => r.statuses.push(status(s)?),
            _ => {}
        }
    }
    Ok(r)
}

/// The filter sends at most three descriptors; a hostile service cannot make it keep more.
const MAX_STATUSES: usize = 8;

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> Vec<u8> {
        let d = |unit: &'static str, hits| Descriptor { entries: vec![("provider", "openai"), ("unit", unit)], hits };
        encode_request("llm-ratelimit", &[d("requests", Some(3)), d("tokens", Some(300))], 3)
    }

    #[test]
    fn request_bytes_match_protoc() {
        // The same bytes prost encodes for this message (rls/tests/wire.rs checks it both ways).
        let want: &[u8] = b"\n\rllm-ratelimit\x12*\n\x12\n\x08provider\x12\x06openai\n\x10\n\x04unit\x12\x08requests\x1a\x02\x08\x03\x12)\n\x12\n\x08provider\x12\x06openai\n\x0e\n\x04unit\x12\x06tokens\x1a\x03\x08\xac\x02\x18\x03";
        assert_eq!(request(), want);
    }

    #[test]
    fn a_settlement_is_a_descriptor_whose_last_entry_says_which() {
        let d = |unit: &'static str, hits, kind| {
            Descriptor { entries: vec![("provider", "openai"), ("unit", unit)], hits: Some(hits) }.settling(kind)
        };
        let b = encode_request("llm-ratelimit", &[d("tokens", 850, Settle::Refund), d("cost", 419, Settle::Charge)], 0);
        // The same bytes prost encodes (checked once with envoy-types' RateLimitRequest).
        let want: &[u8] = b"\n\rllm-ratelimit\x12I\n\x12\n\x08provider\x12\x06openai\n\x0e\n\x04unit\x12\x06tokens\n\x1e\n\x14llm_ratelimit.settle\x12\x06refund\x1a\x03\x08\xd2\x06\x12G\n\x12\n\x08provider\x12\x06openai\n\x0c\n\x04unit\x12\x04cost\n\x1e\n\x14llm_ratelimit.settle\x12\x06charge\x1a\x03\x08\xa3\x03";
        assert_eq!(b, want);
    }

    #[test]
    fn service_names_the_cluster() {
        assert_eq!(encode_service("ratelimit"), b"\n\x0b\n\tratelimit");
    }

    #[test]
    fn decodes_statuses_and_skips_unknown_fields() {
        let msg = |build: &dyn Fn(&mut Vec<u8>)| {
            let mut b = Vec::new();
            build(&mut b);
            b
        };
        let limit = msg(&|b| {
            uint(b, 1, 100);
            uint(b, 2, 1);
        });
        let reset = msg(&|b| {
            uint(b, 1, 1);
            uint(b, 2, 500_000_000);
        });
        let ok = msg(&|b| {
            uint(b, 1, 1);
            bytes(b, 2, &limit);
            uint(b, 3, 7);
            bytes(b, 4, &reset);
        });
        let over = msg(&|b| uint(b, 1, 2));
        let b = msg(&|b| {
            uint(b, 1, 2);
            bytes(b, 2, &ok);
            b.extend([0x49, 1, 2, 3, 4, 5, 6, 7, 8]); // field 9, fixed64: unknown
            bytes(b, 2, &over);
            bytes(b, 5, b"raw body");
        });
        let r = decode_response(&b).unwrap();
        assert_eq!(r.overall, Code::OverLimit);
        assert_eq!(
            r.statuses,
            vec![
                Status { code: Code::Ok, remaining: Some(7), until_reset_ms: Some(1500) },
                Status { code: Code::OverLimit, remaining: None, until_reset_ms: None },
            ]
        );
    }

    #[test]
    fn garbage_is_an_error_never_a_panic() {
        for b in [&[0x12, 0x05, 0x08][..], &[0xff; 11], &[0x0b], &[0x12, 0x02, 0x22, 0x05]] {
            assert!(decode_response(b).is_err(), "{b:?}");
        }
        assert_eq!(decode_response(&[]).unwrap(), Response::default());
        // Every prefix of a valid message decodes or errs.
        let mut b = vec![0x08, 0x01, 0x12, 0x06, 0x08, 0x01, 0x12, 0x00, 0x18, 0x05];
        b.extend([0x12, 0x04, 0x22, 0x02, 0x08, 0x03]);
        for n in 0..=b.len() {
            let _ = decode_response(&b[..n]);
        }
        let r = decode_response(&b).unwrap();
        assert_eq!(r.statuses[0].remaining, Some(5));
        assert_eq!(r.statuses[1].until_reset_ms, Some(3000));
    }
}
