//! The fuzz targets' bodies, one function per parser that sees outside input.
//!
//! Each `fuzz_targets/*.rs` is a one-line libFuzzer wrapper around a function here, so the same
//! checks also run on stable as a plain test over the committed corpus (`tests/corpus.rs`:
//! `cargo test --no-default-features` in this folder). Every function must never panic on any
//! input; the `assert!`s are the properties a crash report means were broken.

use llm_ratelimit::config::Config;
use llm_ratelimit::signals::{self, Provider, Signals};
use llm_ratelimit::tokens::estimate::{self, EstimateRules, MAX_CHOICES, MAX_OUTPUT_TOKENS};
use llm_ratelimit::tokens::usage::{self, StreamUsage};

/// A target: panics when an input breaks a property.
pub type Target = fn(&[u8]);

/// The targets by name, for the corpus test.
pub const TARGETS: [(&str, Target); 7] = [
    ("signals_headers", signals_headers),
    ("signals_body", signals_body),
    ("config", config),
    ("estimate", estimate),
    ("usage", usage),
    ("dates", dates),
    ("rls_answer", rls_answer),
];

/// 2023-09-29T16:26:37Z, the reference's clock.
const NOW: u64 = 1_696_004_797_000;
const DAY: u64 = 86_400_000;

const STATUSES: [u16; 16] = [429, 200, 503, 400, 403, 500, 529, 413, 402, 401, 404, 0, 100, 399, 999, u16::MAX];
const NOWS: [u64; 8] = [NOW, 0, 1, u64::MAX, u64::MAX - 5_000, 1_000_000_000_000_000, 253_402_300_799_000, NOW + 1];
const MAX_WAITS: [u64; 8] = [DAY, 0, 1, u64::MAX, 60_000, 300_000, 30 * DAY, 1_000];

/// The first four bytes choose the provider, status, clock and cap; the rest is the payload.
struct Prefix {
    provider: Provider,
    status: u16,
    now_ms: u64,
    max_wait_ms: u64,
}

fn prefix(data: &[u8]) -> (Prefix, &[u8]) {
    let pick = |i: usize| data.get(i).copied().unwrap_or(0) as usize;
    let p = Prefix {
        provider: Provider::ALL[pick(0) % Provider::ALL.len()],
        status: STATUSES[pick(1) % STATUSES.len()],
        now_ms: NOWS[pick(2) % NOWS.len()],
        max_wait_ms: MAX_WAITS[pick(3) % MAX_WAITS.len()],
    };
    (p, data.get(4..).unwrap_or_default())
}

/// What must hold of any parse: every instant is a real wait within the cap, fractions are
/// fractions, and a configured provider is reported as itself.
fn check_signals(p: &Prefix, s: &Signals) {
    for (what, at) in [
        ("retry_at_ms", s.retry_at_ms),
        ("requests_reset_ms", s.requests_reset_ms),
        ("tokens_reset_ms", s.tokens_reset_ms),
    ] {
        if let Some(at) = at {
            assert!(at > p.now_ms, "{what} {at} is not after now {}", p.now_ms);
            assert!(at - p.now_ms <= p.max_wait_ms, "{what} {at} is past the cap {} from {}", p.max_wait_ms, p.now_ms);
        }
    }
    if let Some(f) = s.remaining_fraction() {
        assert!((0.0..=1.0).contains(&f), "remaining_fraction {f}");
    }
    if p.provider != Provider::Auto {
        assert_eq!(s.provider, p.provider);
    }
    if p.status == 429 {
        assert!(s.throttled);
    }
}

/// Response headers: after the prefix, one `name: value` per line (a line without a colon is a
/// name with an empty value). Invalid UTF-8 is replaced, as the host does.
pub fn signals_headers(data: &[u8]) {
    let (p, rest) = prefix(data);
    let text = String::from_utf8_lossy(rest);
    let headers: Vec<(&str, &str)> = text.split('\n').map(|line| line.split_once(':').unwrap_or((line, ""))).collect();
    let s = signals::parse(p.provider, p.status, &headers, None, p.now_ms, p.max_wait_ms);
    check_signals(&p, &s);
    // The body is only read for errors: a success with the same headers says the same.
    let ok = signals::parse(
        p.provider,
        200,
        &headers,
        Some(b"{\"error\":{\"message\":\"try again in 5s\"}}"),
        p.now_ms,
        p.max_wait_ms,
    );
    if p.status == 200 {
        assert_eq!(ok, s);
    }
}

/// An error body: after the prefix, the body bytes, with no headers (the status is raised to
/// an error so the body is read).
pub fn signals_body(data: &[u8]) {
    let (mut p, body) = prefix(data);
    if p.status < 400 {
        p.status = 429;
    }
    let s = signals::parse(p.provider, p.status, &[], Some(body), p.now_ms, p.max_wait_ms);
    check_signals(&p, &s);
    // With no headers, the quota counts can only come from nowhere.
    assert_eq!((s.remaining_requests, s.remaining_tokens, s.limit_requests, s.limit_tokens), (None, None, None, None));
}

/// The plugin configuration, and the rules built from it at start.
pub fn config(data: &[u8]) {
    if let Ok(c) = Config::parse(data) {
        let _ = llm_ratelimit::admission::AdmissionRules::new(&c);
    }
}

/// A request body: the first line is the request path, the rest the body.
pub fn estimate(data: &[u8]) {
    let (path, body) = match data.iter().position(|&b| b == b'\n') {
        Some(nl) => (&data[..nl], &data[nl + 1..]),
        None => (&data[..0], data),
    };
    let path = String::from_utf8_lossy(path);
    let rules = EstimateRules::default();
    let e = estimate::from_body(&rules, &path, body);
    if !body.is_empty() {
        assert!(e.input > 0, "a non-empty body is never free");
    }
    assert!(e.output <= MAX_OUTPUT_TOKENS * MAX_CHOICES);
    let _ = e.total();
}

/// A response: the first byte picks how the rest is cut into chunks for a [`StreamUsage`],
/// which must read the same usage and text as when the stream comes in one piece. The whole
/// input is also read by [`usage::from_body`], and a JSON object body must read the same as a
/// one-event stream carrying it.
pub fn usage(data: &[u8]) {
    let Some((&pattern, stream)) = data.split_first() else {
        let _ = usage::from_body(data);
        return;
    };
    let whole = read_stream([stream]);
    let chunked = read_stream(chunks(stream, pattern));
    assert_eq!(whole, chunked, "pattern {pattern}");

    let body = usage::from_body(stream);
    let is_object = stream.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{');
    if is_object && !stream.iter().any(|&b| b == b'\n' || b == b'\r') && stream.len() < 60_000 {
        let mut event = b"data: ".to_vec();
        event.extend_from_slice(stream);
        event.extend_from_slice(b"\n\n");
        assert_eq!(read_stream([&event[..]]).0, body, "a body and the one event carrying it");
    }
}

fn read_stream<'a>(chunks: impl IntoIterator<Item = &'a [u8]>) -> (Option<usage::Usage>, u64) {
    let mut reader = StreamUsage::new();
    chunks.into_iter().for_each(|chunk| reader.feed(chunk));
    (reader.finish(), reader.text_chars())
}

/// Cuts `bytes` by `pattern`: its low bits give a cycle of chunk lengths (0 included, so empty
/// chunks are fed too), its high bit a seeded pseudo-random walk instead.
fn chunks(bytes: &[u8], pattern: u8) -> Vec<&[u8]> {
    let mut lengths: Box<dyn FnMut() -> usize> = if pattern & 0x80 == 0 {
        let cycle = [usize::from(pattern & 0x7), usize::from((pattern >> 3) & 0x7) + 1, 1, 2];
        let mut i = 0;
        Box::new(move || {
            i += 1;
            cycle[i % cycle.len()]
        })
    } else {
        let mut state = u32::from(pattern) | 1;
        Box::new(move || {
            state = state.wrapping_mul(1_103_515_245).wrapping_add(12_345);
            (state >> 16) as usize % 9
        })
    };
    let mut rest = bytes;
    let mut out = Vec::new();
    while !rest.is_empty() {
        let (head, tail) = rest.split_at(lengths().min(rest.len()));
        out.push(head);
        rest = tail;
    }
    out
}

/// The value parsers, with HTTP-dates checked against `httpdate` and RFC 3339 against `chrono`
/// on every input both accept (see RESULTS.md for the differences that are on purpose).
pub fn dates(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let text = text.as_ref();
    let _ = (
        signals::parse_go_duration(text),
        signals::parse_delta_seconds(text),
        signals::parse_millis(text),
        signals::parse_ratelimit_reset(text),
    );
    if let Some(n) = signals::parse_count(text) {
        assert_eq!(Ok(n), text.trim().parse::<u64>());
    }
    check_http_date(text);
    check_rfc3339(text);
}

fn check_http_date(text: &str) {
    let Ok(theirs) = httpdate::parse_http_date(text) else { return };
    let theirs = theirs.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis());
    // httpdate is strict (exact spacing, `GMT`, real weekday, years 1970..=9999, seconds < 60):
    // whatever it accepts, ours must read the same, except that httpdate does not look at the
    // byte between an RFC 850 date and its time (`Sunday, 06-Nov-94(08:49:37 GMT`), which ours
    // requires to be a space: there, ours must read the date with the space put back.
    let ours = signals::parse_http_date(text).or_else(|| {
        // httpdate trims blanks first (str::trim), as ours does.
        let text = text.trim();
        let (weekday, rest) = text.split_once(", ")?;
        let at = weekday.len() + 2 + 9;
        (rest.len() == 22 && rest.as_bytes()[9] != b' ').then(|| {
            let mut spaced = text.as_bytes().to_vec();
            spaced[at] = b' ';
            String::from_utf8(spaced).ok().and_then(|t| signals::parse_http_date(&t))
        })?
    });
    assert_eq!(ours.map(u128::from), theirs.ok(), "HTTP-date {text:?}");
}

fn check_rfc3339(text: &str) {
    let Some(ours) = signals::parse_rfc3339(text) else { return };
    let Ok(theirs) = chrono::DateTime::parse_from_rfc3339(text) else { return };
    // Ours rounds the fraction up to whole milliseconds, counting every digit; chrono keeps
    // nanoseconds (a leap second as 1e9 and up) and drops digits past the ninth.
    // A leap second before 1970 (`1969-12-31T23:59:60Z`) is 0 to ours and -1 s + 1e9 ns to
    // chrono: the same instant, so the sum is taken before any sign check.
    let nanos = i128::from(theirs.timestamp_subsec_nanos());
    let expected = i128::from(theirs.timestamp()) * 1000 + (nanos + 999_999) / 1_000_000;
    let fraction_digits = text.split_once('.').map_or(0, |(_, f)| f.bytes().take_while(u8::is_ascii_digit).count());
    let tolerance = i128::from(fraction_digits > 9 && nanos % 1_000_000 == 0);
    let ours = i128::from(ours);
    assert!(ours >= expected && ours <= expected + tolerance, "RFC 3339 {text:?}: ours {ours}, chrono {expected}");
}

/// An answer of the rate limit service (`RateLimitResponse` bytes), differential against prost:
/// what prost reads, the filter reads alike (overall code, each status's code, remaining when a
/// limit is named, reset when the duration is valid; the filter keeps the first 8 statuses).
/// Then the gate takes it as the answer to a call in flight, and a tick after: never a panic,
/// and the waiting request is let through, refused, or still waiting for a reset it may wait.
pub fn rls_answer(data: &[u8]) {
    use envoy_types::pb::envoy::service::ratelimit::v3::RateLimitResponse;
    use llm_ratelimit::global::gate::{FailureMode, GlobalGate, GlobalGateRules, GlobalVerdict};
    use llm_ratelimit::global::proto::{self, Code};
    use llm_ratelimit::time::{Duration, Instant};
    use prost::Message;
    let ours = proto::decode_response(data);
    if let Ok(theirs) = RateLimitResponse::decode(data) {
        let code = |c: i32| match c {
            1 => Code::Ok,
            2 => Code::OverLimit,
            _ => Code::Unknown,
        };
        match &ours {
            Ok(r) => {
                assert_eq!(r.overall, code(theirs.overall_code));
                assert_eq!(r.statuses.len(), theirs.statuses.len().min(8));
                for (o, t) in r.statuses.iter().zip(&theirs.statuses) {
                    assert_eq!(o.code, code(t.code));
                    assert_eq!(o.remaining, t.current_limit.as_ref().map(|_| u64::from(t.limit_remaining)));
                    let reset = t.duration_until_reset.as_ref().and_then(|d| {
                        let (s, n) = (u64::try_from(d.seconds).ok()?, u64::try_from(d.nanos).ok()?);
                        (n < 1_000_000_000).then(|| s.saturating_mul(1000).saturating_add(n.div_ceil(1_000_000)))
                    });
                    assert_eq!(o.until_reset_ms, reset);
                }
            }
            // Groups (wire types 3 and 4), which prost skips: no service sends them.
            Err(e) => assert_eq!(*e, "unsupported wire type", "prost reads what we refuse"),
        }
    }
    let Ok(r) = ours else { return };
    let rules = GlobalGateRules {
        timeout_ms: 50,
        failure_mode: FailureMode::Deny,
        max_lease: 8,
        lease_ms: 1000,
        charged_after: [false, false, true],
    };
    let mut g = GlobalGate::new(rules);
    let GlobalVerdict::Wait { ask: Some(a) } =
        g.arrive("k", 1, [1, 300, 1], Duration::from_millis(2000), Instant::from_millis(NOW))
    else {
        panic!("first call")
    };
    g.sent(a.key, 7);
    let mut o = g.answered(7, &r, Instant::from_millis(NOW));
    let t = g.tick(Instant::from_millis(NOW + 1));
    o.pass.extend(t.pass.into_iter().chain(t.fallback));
    o.pass.extend(std::mem::take(&mut o.fallback));
    o.refuse.extend(t.refuse);
    assert!(o.pass.len() + o.refuse.len() <= 1, "one request, answered at most once");
    if o.pass.is_empty() && o.refuse.is_empty() {
        // Still waiting: for a reset within its 2 s, or a call (asked again at once).
        let late = g.tick(Instant::from_millis(NOW + 3_000));
        let o = g.tick(Instant::from_millis(NOW + 3_200));
        assert!(late.pass.len() + late.refuse.len() + o.pass.len() + o.refuse.len() <= 1);
    }
}
