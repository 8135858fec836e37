//! Fast properties of the parsers that see outside input, and of the stored-value encodings:
//! no input panics or overflows, encodings round-trip, a stream reads the same however it is cut.
//! The long runs are the fuzz targets (fuzz/); these run with `make test`, in a few seconds.

use llm_ratelimit::admission::{SharedBucket, WaiterEntry};
use llm_ratelimit::breaker::{Mode, ProviderState};
use llm_ratelimit::bucket::Level;
use llm_ratelimit::config::Config;
use llm_ratelimit::fallback::{self, Entry, Identity};
use llm_ratelimit::signals::{self, Provider};
use llm_ratelimit::time::Instant;
use llm_ratelimit::tokens::estimate::{self, EstimateRules};
use llm_ratelimit::tokens::usage::{self, StreamUsage, Usage};
use proptest::prelude::*;

/// 2023-09-29T16:26:37Z, the reference's clock.
const NOW: u64 = 1_696_004_797_000;

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig { cases, failure_persistence: None, ..ProptestConfig::default() }
}

// ---- provider signals ----

const HEADER_NAMES: [&str; 24] = [
    "retry-after",
    "retry-after-ms",
    "x-ms-retry-after-ms",
    "date",
    "x-ratelimit-limit-requests",
    "x-ratelimit-remaining-requests",
    "x-ratelimit-reset-requests",
    "x-ratelimit-limit-tokens",
    "x-ratelimit-remaining-tokens",
    "x-ratelimit-reset-tokens",
    "x-rate-limit-reset-tokens",
    "anthropic-ratelimit-tokens-remaining",
    "anthropic-ratelimit-tokens-reset",
    "anthropic-ratelimit-requests-limit",
    "ratelimitbysize-remaining",
    "ratelimitbysize-reset",
    "x-ratelimit-remaining-tokens-month",
    "x-amzn-errortype",
    "ratelimit",
    "ratelimit-policy",
    "x-ratelimit-reset",
    "ratelimit-reset",
    "x-ratelimit-remaining",
    "x-groq-region",
];

/// Values that are almost right: the formats providers use, bent.
fn header_value() -> impl Strategy<Value = String> {
    prop_oneof![
        "[0-9]{1,25}",
        "[0-9]{0,6}\\.[0-9]{0,20}",
        "([0-9]{1,4}(\\.[0-9]{1,3})?(h|m|s|ms|us|µs|ns)){1,4}",
        "(Mon|Fri|Sunday), [0-9]{2} (Sep|Feb|Dec) [0-9]{4} [0-9]{2}:[0-9]{2}:[0-9]{2} GMT",
        "[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\\.[0-9]{1,12})?(Z|[+-][0-9]{2}:[0-9]{2})",
        "\"[a-z]{1,6}\";(r|q|w|t)=[0-9]{1,20}(;(r|q|w|t)=-?[0-9]{1,20}){0,3}",
        "(limit|remaining|reset)=[0-9]{1,12}(, (limit|remaining|reset)=[0-9]{1,12}){0,2}",
        "(Throttling|ServiceQuotaExceeded)Exception(:.{0,10})?",
        ".{0,40}",
    ]
}

fn headers() -> impl Strategy<Value = Vec<(String, String)>> {
    let name = prop_oneof![4 => proptest::sample::select(&HEADER_NAMES[..]).prop_map(str::to_owned), 1 => ".{0,20}"];
    proptest::collection::vec((name, header_value()), 0..8)
}

fn error_body() -> impl Strategy<Value = Vec<u8>> {
    let message = prop_oneof![
        "(Please )?(try again in|retry after|retry in) [0-9]{1,12}(\\.[0-9]{1,12})?(s|ms| seconds| minutes| hours)?\\.?",
        "Request too large .{0,10} Limit [0-9]{1,25}, Requested [0-9]{1,25}",
        ".{0,60}",
    ];
    let code = prop_oneof![
        Just("insufficient_quota"),
        Just("rate_limit_exceeded"),
        Just("enforced_spend_limit_reached"),
        Just("request_too_large")
    ];
    prop_oneof![
        (message.clone(), code).prop_map(|(m, c)| {
            serde_json::json!({"error": {"message": m, "type": c, "code": c}}).to_string().into_bytes()
        }),
        (header_value(), "[A-Za-z]{0,12}(PerDay|Daily)?[A-Za-z]{0,8}").prop_map(|(delay, quota)| {
            serde_json::json!([{"error": {"code": 429, "status": "RESOURCE_EXHAUSTED", "details": [
                {"@type": "type.googleapis.com/google.rpc.QuotaFailure", "violations": [{"quotaId": quota}]},
                {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": delay}]}}])
            .to_string()
            .into_bytes()
        }),
        message.prop_map(|m| serde_json::json!({ "message": m }).to_string().into_bytes()),
        proptest::collection::vec(any::<u8>(), 0..64),
    ]
}

/// `bytes` cut at the places `cuts` picks (sorted; empty pieces included).
fn cut<'a>(bytes: &'a [u8], cuts: &[proptest::sample::Index]) -> Vec<&'a [u8]> {
    let mut at: Vec<usize> = cuts.iter().map(|i| i.index(bytes.len() + 1)).collect();
    at.sort_unstable();
    let mut chunks = Vec::new();
    let mut start = 0;
    for end in at.into_iter().chain([bytes.len()]) {
        chunks.push(&bytes[start..end]);
        start = end;
    }
    chunks
}

proptest! {
    #![proptest_config(config(400))]

    /// Any response: no panic, every instant a real wait within the cap, fractions in 0..=1.
    #[test]
    fn signals_waits_stay_within_the_cap(
        headers in headers(),
        body in error_body(),
        provider in proptest::sample::select(&Provider::ALL[..]),
        status in prop_oneof![Just(429u16), Just(200), Just(503), Just(400), any::<u16>()],
        now in prop_oneof![Just(NOW), any::<u64>()],
        max_wait in prop_oneof![Just(86_400_000u64), any::<u64>()],
    ) {
        let pairs: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
        let s = signals::parse(provider, status, &pairs, Some(&body), now, max_wait);
        for at in [s.retry_at_ms, s.requests_reset_ms, s.tokens_reset_ms, s.retry_at()].into_iter().flatten() {
            prop_assert!(at > now && at - now <= max_wait, "{at} from {now} cap {max_wait}");
        }
        if let Some(f) = s.remaining_fraction() {
            prop_assert!((0.0..=1.0).contains(&f));
        }
        if status == 429 {
            prop_assert!(s.throttled);
        }
        if status < 400 {
            // The body is read only for errors.
            prop_assert_eq!(&s, &signals::parse(provider, status, &pairs, None, now, max_wait));
        }
    }

    #[test]
    fn value_parsers_never_panic(text in ".{0,40}") {
        let _ = (
            signals::parse_go_duration(&text),
            signals::parse_delta_seconds(&text),
            signals::parse_millis(&text),
            signals::parse_ratelimit_reset(&text),
            signals::parse_http_date(&text),
            signals::parse_rfc3339(&text),
        );
        if let Some(n) = signals::parse_count(&text) {
            prop_assert_eq!(Ok(n), text.trim().parse::<u64>());
        }
    }

    #[test]
    fn counts_and_seconds_read_what_is_written(n in any::<u64>(), secs in 0u64..1_000_000_000, ms in 0u64..1000) {
        prop_assert_eq!(signals::parse_count(&n.to_string()), Some(n));
        prop_assert_eq!(signals::parse_delta_seconds(&format!(" {secs} ")), Some(secs * 1000));
        prop_assert_eq!(signals::parse_delta_seconds(&format!("{secs}.{ms:03}")), Some(secs * 1000 + ms));
        prop_assert_eq!(signals::parse_millis(&n.to_string()), Some(n));
    }

    #[test]
    fn go_durations_add_their_parts(h in 0u64..10_000, m in 0u64..60, s in 0u64..60, ms in 0u64..1000) {
        let expected = ((h * 60 + m) * 60 + s) * 1000 + ms;
        prop_assert_eq!(signals::parse_go_duration(&format!("{h}h{m}m{s}.{ms:03}s")), Some(expected));
        prop_assert_eq!(signals::parse_go_duration(&format!("{h}h{m}m{s}s{ms}ms")), Some(expected));
    }

    /// The same instant written as RFC 3339 (with any offset) and as an IMF-fixdate reads the same.
    #[test]
    fn rfc3339_and_http_dates_agree(
        year in 1971u32..=9998,
        month in 1u32..=12,
        day in 1u32..=28,
        hour in 0u32..24,
        minute in 0u32..60,
        second in 0u32..60,
        offset_minutes in -(23 * 60 + 59)..=(23i32 * 60 + 59),
    ) {
        const MONTHS: [&str; 12] = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
        let imf = format!("Sun, {day:02} {} {year:04} {hour:02}:{minute:02}:{second:02} GMT", MONTHS[month as usize - 1]);
        let utc = format!("{year:04}-{month:02}-{day:02}T{hour:02}:{minute:02}:{second:02}Z");
        let at = signals::parse_http_date(&imf);
        prop_assert!(at.is_some(), "{}", imf);
        prop_assert_eq!(signals::parse_rfc3339(&utc), at);
        // The same local time with an offset is that offset away from UTC.
        let sign = if offset_minutes < 0 { '-' } else { '+' };
        let abs = offset_minutes.unsigned_abs();
        let shifted = format!("{}{sign}{:02}:{:02}", &utc[..19], abs / 60, abs % 60);
        let expected = at.unwrap() as i64 - i64::from(offset_minutes) * 60_000;
        prop_assert_eq!(signals::parse_rfc3339(&shifted).map(|v| v as i64), Some(expected));
    }
}

// ---- configuration and request estimates ----

fn json_value() -> impl Strategy<Value = serde_json::Value> {
    use serde_json::Value;
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(Value::from),
        prop_oneof![Just(0.5), Just(1e15), Just(1e16), Just(-1.0), Just(1e300)].prop_map(Value::from),
        "[a-z_A-Z]{0,12}".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        let keys = prop_oneof![
            proptest::sample::select(vec![
                "bucket",
                "capacity",
                "refill_rate",
                "burst_allowance",
                "classify",
                "rules",
                "priority",
                "tokens",
                "per_model",
                "provider",
                "style",
                "queue",
                "tenant",
                "fallback",
                "role",
                "name",
                "priorities",
                "HIGH",
                "messages",
                "content",
                "text",
                "type",
                "image_url",
                "max_tokens",
                "n",
                "model",
                "stream",
                "tools",
                "input",
                "contents",
                "parts",
                "generationConfig",
                "maxOutputTokens",
                "system",
                "tool_calls",
            ])
            .prop_map(str::to_owned),
            "[a-z_]{1,8}",
        ];
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            proptest::collection::vec((keys, inner), 0..5).prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

proptest! {
    #![proptest_config(config(300))]

    #[test]
    fn config_parse_never_panics(value in json_value(), bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
        if let Ok(c) = Config::parse(value.to_string().as_bytes()) {
            let _ = llm_ratelimit::admission::AdmissionRules::new(&c);
        }
        let _ = Config::parse(&bytes);
    }

    /// Never 0 for a non-empty body, whatever it holds; JSON or not.
    #[test]
    fn estimate_is_never_free(
        value in json_value(),
        bytes in proptest::collection::vec(any::<u8>(), 1..64),
        path in prop_oneof![Just("/v1/chat/completions".to_owned()), "(/[a-z:.-]{0,10}){0,5}(\\?.{0,5})?"],
    ) {
        let rules = EstimateRules::default();
        let json = value.to_string();
        prop_assert!(estimate::from_body(&rules, &path, json.as_bytes()).input > 0);
        prop_assert!(estimate::from_body(&rules, &path, &bytes).input > 0);
    }

    /// More prompt text never costs less, and plain text costs ceil(chars / 4).
    #[test]
    fn estimate_grows_with_the_prompt(a in ".{1,200}", b in ".{0,200}") {
        let rules = EstimateRules::default();
        let body = |text: &str| serde_json::json!({"messages": [{"role": "user", "content": text}]}).to_string();
        let short = estimate::from_body(&rules, "/v1/chat/completions", body(&a).as_bytes());
        let long = estimate::from_body(&rules, "/v1/chat/completions", body(&format!("{a}{b}")).as_bytes());
        prop_assert_eq!(short.input, (a.chars().count() as u64).div_ceil(4));
        prop_assert!(long.input >= short.input);
        prop_assert_eq!(short.output, rules.output_default);
    }
}

// ---- response usage ----

/// One SSE event's data, in the formats the usage reader knows (and some it does not).
fn event() -> impl Strategy<Value = String> {
    let n = || 0u64..1_000_000;
    prop_oneof![
        (n(), n()).prop_map(|(i, o)| format!(r#"{{"choices":[],"usage":{{"prompt_tokens":{i},"completion_tokens":{o}}}}}"#)),
        ".{0,12}".prop_map(|t| serde_json::json!({"choices": [{"delta": {"content": t}}]}).to_string()),
        (n(), n()).prop_map(|(i, c)| format!(
            r#"{{"type":"message_start","message":{{"usage":{{"input_tokens":{i},"cache_read_input_tokens":{c},"output_tokens":1}}}}}}"#
        )),
        n().prop_map(|o| format!(r#"{{"type":"message_delta","usage":{{"output_tokens":{o}}}}}"#)),
        ".{0,12}".prop_map(|t| serde_json::json!({"type": "content_block_delta", "delta": {"text": t}}).to_string()),
        (n(), n()).prop_map(|(i, o)| format!(
            r#"{{"type":"response.completed","response":{{"usage":{{"input_tokens":{i},"output_tokens":{o}}}}}}}"#
        )),
        (n(), n(), n()).prop_map(|(p, c, t)| format!(
            r#"{{"candidates":[{{"content":{{"parts":[{{"text":"hé"}}]}}}}],"usageMetadata":{{"promptTokenCount":{p},"candidatesTokenCount":{c},"totalTokenCount":{t}}}}}"#
        )),
        Just("[DONE]".to_owned()),
        "[^\r\n]{0,20}",
    ]
}

/// A stream: events with `event:`/`id:`/comment lines mixed in, any line ending, sometimes a
/// multi-line data, sometimes no final blank line.
fn stream() -> impl Strategy<Value = Vec<u8>> {
    let eol = proptest::sample::select(vec!["\n", "\r\n", "\r"]);
    let item = (event(), eol, 0u8..6).prop_map(|(data, eol, extra)| {
        let mut out = String::new();
        match extra {
            0 => out.push_str(&format!("event: x{eol}")),
            1 => out.push_str(&format!(": keep-alive{eol}")),
            2 => out.push_str(&format!("id: 7{eol}retry: 10{eol}")),
            _ => {}
        }
        if extra == 3 && data.len() > 2 {
            // The same data split over two data lines reads joined by LF (JSON whitespace).
            let cut = (1..data.len()).find(|&i| data.is_char_boundary(i) && data[..i].ends_with(',')).unwrap_or(0);
            if cut > 0 {
                out.push_str(&format!("data: {}{eol}data:{}{eol}{eol}", &data[..cut], &data[cut..]));
                return out;
            }
        }
        out.push_str(&format!("data: {data}{eol}{eol}"));
        out
    });
    (proptest::collection::vec(item, 0..8), any::<bool>()).prop_map(|(items, trim)| {
        let mut s = items.concat();
        if trim {
            s = s.trim_end_matches(['\r', '\n']).to_owned();
        }
        s.into_bytes()
    })
}

fn read_stream<'a>(chunks: impl IntoIterator<Item = &'a [u8]>) -> (Option<Usage>, u64) {
    let mut reader = StreamUsage::new();
    chunks.into_iter().for_each(|chunk| reader.feed(chunk));
    (reader.finish(), reader.text_chars())
}

proptest! {
    #![proptest_config(config(300))]

    /// Any cut, even inside a CRLF or a UTF-8 character, and empty chunks, reads the same.
    #[test]
    fn stream_usage_is_the_same_however_cut(
        bytes in prop_oneof![3 => stream(), 1 => proptest::collection::vec(any::<u8>(), 0..200)],
        cuts in proptest::collection::vec(any::<proptest::sample::Index>(), 0..12),
    ) {
        let chunks = cut(&bytes, &cuts);
        prop_assert_eq!(read_stream(chunks), read_stream([&bytes[..]]));
        let _ = usage::from_body(&bytes);
    }

    /// A JSON object body reads the same as the one SSE event carrying it, but for the events
    /// only a stream has (a body is read for its usage fields whatever its `type`).
    #[test]
    fn a_body_reads_like_its_event(data in event()) {
        prop_assume!(data.starts_with('{'));
        prop_assume!(!["message_start", "content_block_delta"].iter().any(|t| data.contains(t)));
        let sse = format!("data: {data}\n\n");
        prop_assert_eq!(usage::from_body(data.as_bytes()), read_stream([sse.as_bytes()]).0);
    }
}

proptest! {
    // Priority among the usage fields shows only in rarer combinations: more cases.
    #![proptest_config(config(3000))]

    /// A body read from its end gives what serde_json's reading of the whole gives: text with
    /// quotes, escapes and brackets before, between and after the usage fields, repeated keys
    /// (the last counts), keys written with an escape, and arrays of such objects.
    #[test]
    fn a_body_read_from_its_end_reads_as_a_whole_body(body in answer_body()) {
        let value: serde_json::Value = serde_json::from_str(&body).expect("generated JSON");
        let read = |v: &serde_json::Value| read_stream([format!("data: {v}\n\n").as_bytes()]).0;
        let want = match &value {
            serde_json::Value::Array(items) => items.iter().rev().filter(|i| i.is_object()).find_map(read),
            other => read(other),
        };
        prop_assert_eq!(usage::from_body(body.as_bytes()), want, "{}", body);
    }
}

/// An answer body: an object of members among which the usage fields may be, or an array of
/// such objects and other values, with any JSON whitespace.
fn answer_body() -> impl Strategy<Value = String> {
    let ws = proptest::sample::select(vec!["", " ", "\n", "\r\n  ", "\t"]);
    let text = r#"[a-z"\\{}\[\]:, é/]{0,10}"#.prop_map(|t| serde_json::Value::String(t).to_string());
    let filler = prop_oneof![
        text.clone(),
        (0i64..1000).prop_map(|n| (n - 500).to_string()),
        Just("1.5e3".to_owned()),
        Just("null".to_owned()),
        Just("true".to_owned()),
        text.clone().prop_map(|t| format!(r#"[1,{{"a":{t}}},[],{{}}]"#)),
        text.prop_map(|t| format!(r#"{{"x":[{t},{{"usage":{{"prompt_tokens":9}}}}]}}"#)),
    ];
    // Counts as providers write them, and odd ones as serde_json reads them (negative,
    // fractional, beyond u64, not a number).
    let n = || {
        prop_oneof![
            4 => (0u64..100_000).prop_map(|n| n.to_string()),
            1 => proptest::sample::select(vec!["-5", "12.7", "1e3", "0.5", "-0", "18446744073709551616", "null", "\"7\""])
                .prop_map(str::to_owned),
        ]
    };
    let usage = prop_oneof![
        (n(), n()).prop_map(|(i, o)| format!(r#"{{"prompt_tokens":{i},"completion_tokens":{o}}}"#)),
        (n(), n()).prop_map(|(i, c)| format!(
            r#"{{"prompt_tokens":{i},"prompt_tokens_details":{{"cached_tokens":{c}}},"total_tokens":{i}}}"#
        )),
        (n(), n(), n()).prop_map(|(i, c, o)| format!(
            r#"{{"input_tokens":{i},"cache_read_input_tokens":{c},"output_tokens":{o}}}"#
        )),
        Just("{}".to_owned()),
        Just("null".to_owned()),
    ];
    let member = prop_oneof![
        3 => (proptest::sample::select(vec!["choices", "text", "id", "type", "model"]), filler.clone())
            .prop_map(|(k, v)| (k.to_owned(), v)),
        2 => usage.clone().prop_map(|u| ("usage".to_owned(), u)),
        1 => usage.clone().prop_map(|u| ("us\\u0061ge".to_owned(), u)),
        2 => (usage.clone(), filler.clone()).prop_map(|(u, f)| ("response".to_owned(), format!(r#"{{"output":{f},"usage":{u}}}"#))),
        2 => usage.prop_map(|u| ("x_groq".to_owned(), format!(r#"{{"usage":{u}}}"#))),
        2 => (n(), n()).prop_map(|(p, c)| ("usageMetadata".to_owned(), format!(r#"{{"promptTokenCount":{p},"candidatesTokenCount":{c}}}"#))),
        2 => filler.prop_map(|f| ("usage".to_owned(), f)),
    ];
    let object = proptest::collection::vec((member, ws.clone(), ws.clone()), 0..6).prop_map(|members| {
        let body: Vec<String> = members.into_iter().map(|((k, v), a, b)| format!(r#"{a}"{k}"{b}:{a}{v}{b}"#)).collect();
        format!("{{{}}}", body.join(","))
    });
    prop_oneof![
        3 => (object.clone(), ws.clone()).prop_map(|(o, w)| format!("{w}{o}{w}")),
        1 => (proptest::collection::vec(prop_oneof![3 => object, 1 => Just("7".to_owned())], 0..4), ws)
            .prop_map(|(items, w)| format!("{w}[{w}{}{w}]{w}", items.join(","))),
    ]
}

// ---- stored encodings ----

fn level() -> impl Strategy<Value = Level> {
    (any::<f64>().prop_filter("finite", |f| f.is_finite()), any::<u64>())
        .prop_map(|(tokens, at_ns)| Level { tokens, at: Instant::from_nanos(at_ns) })
}

fn provider_state() -> impl Strategy<Value = ProviderState> {
    let mode = prop_oneof![Just(Mode::Closed), Just(Mode::Open), Just(Mode::HalfOpen)];
    (mode, any::<[u64; 3]>(), any::<[u32; 4]>(), any::<[bool; 4]>(), any::<bool>()).prop_map(
        |(
            mode,
            [until_ms, probe_ms, dry_until_ms],
            [probe, failed_probes, limit, left],
            [terminal, checking, guessed, counting],
            _,
        )| {
            ProviderState {
                mode,
                until: Instant::from_millis(until_ms),
                probe_at: Instant::from_millis(probe_ms),
                probe,
                terminal,
                failed_probes,
                checking,
                guessed,
                limit,
                counting,
                left,
                dry_until: Instant::from_millis(dry_until_ms),
            }
        },
    )
}

fn identity_and_entry() -> impl Strategy<Value = (Identity, Entry)> {
    (
        ("[A-Z]{0,7}", ".{0,30}", ".{0,12}", proptest::option::of(".{0,12}"), proptest::option::of(any::<u64>())),
        (any::<u64>(), ".{0,20}", proptest::collection::vec(any::<u8>(), 0..80)),
    )
        .prop_map(|((method, path, client_key, tenant, credential), (stored_ms, content_type, body))| {
            (Identity { method, path, client_key, tenant, credential }, Entry { stored_ms, content_type, body })
        })
}

proptest! {
    #![proptest_config(config(300))]

    #[test]
    fn level_round_trips(l in level(), junk in proptest::collection::vec(any::<u8>(), 0..40)) {
        prop_assert_eq!(Level::decode(&l.encode()), Some(l));
        if let Some(d) = Level::decode(&junk) {
            prop_assert_eq!(&d.encode()[..], &junk[..]);
        }
    }

    #[test]
    fn shared_bucket_round_trips(
        level in level(),
        token_levels in proptest::collection::vec(level(), 0..=65),
        waiters in proptest::collection::vec((any::<u64>(), any::<u64>(), any::<[u32; 4]>()), 0..=64),
        junk in proptest::collection::vec(any::<u8>(), 0..200),
    ) {
        let waiters = waiters.into_iter().map(|(worker, seen_ms, counts)| WaiterEntry { worker, seen_ms, counts }).collect();
        let b = SharedBucket { level, token_levels, waiters };
        prop_assert_eq!(SharedBucket::decode(&b.encode()), Some(b));
        if let Some(d) = SharedBucket::decode(&junk) {
            prop_assert_eq!(d.encode(), junk);
        }
    }

    #[test]
    fn provider_state_round_trips(s in provider_state(), mut junk in proptest::collection::vec(any::<u8>(), 48)) {
        prop_assert_eq!(ProviderState::decode(&s.encode()), Some(s));
        junk[0] %= 3;
        // Any 48 bytes that decode re-encode to a state that decodes the same.
        if let Some(d) = ProviderState::decode(&junk) {
            prop_assert_eq!(ProviderState::decode(&d.encode()), Some(d));
        }
    }

    #[test]
    fn fallback_entries_round_trip((id, entry) in identity_and_entry(), junk in proptest::collection::vec(any::<u8>(), 0..120)) {
        let bytes = fallback::encode(&id, &entry);
        prop_assert_eq!(fallback::decode(&bytes), Some((id.clone(), entry.clone())));
        // Truncated or padded, it is not an entry.
        prop_assert_eq!(fallback::decode(&bytes[..bytes.len() - 1]), None);
        let mut padded = bytes.clone();
        padded.push(0);
        prop_assert_eq!(fallback::decode(&padded), None);
        let mut tagged = b"LRC\x01".to_vec();
        tagged.extend_from_slice(&junk);
        for b in [&junk, &tagged] {
            if let Some((id, entry)) = fallback::decode(b) {
                prop_assert_eq!(&fallback::encode(&id, &entry), b);
            }
        }
    }
}

proptest! {
    #![proptest_config(config(16))]

    /// A data line longer than the reader keeps (64 KiB) still reports the usage near its end,
    /// however the stream is cut: only its last 16 KiB are searched, so the usage sits there.
    #[test]
    fn a_long_line_keeps_its_usage_however_cut(
        bulk in 70_000usize..140_000,
        filler in proptest::sample::select(vec!['a', '"', '{', '\\', 'é']),
        input in 0u64..1_000_000,
        output in 0u64..1_000_000,
        cuts in proptest::collection::vec(any::<proptest::sample::Index>(), 0..40),
    ) {
        let text: String = std::iter::repeat_n(filler, bulk / filler.len_utf8()).collect();
        let data = serde_json::json!({
            "type": "response.completed",
            "response": {"output": text, "usage": {"input_tokens": input, "output_tokens": output}, "user": "u"},
        });
        let bytes = format!("event: response.completed\ndata: {data}\n\ndata: [DONE]\n\n").into_bytes();
        let chunks = cut(&bytes, &cuts);
        let expected = Some(Usage { input, output, cached_input: 0 });
        prop_assert_eq!(read_stream([&bytes[..]]).0, expected);
        prop_assert_eq!(read_stream(chunks).0, expected);
    }
}
