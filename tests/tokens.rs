//! Token limits in the real Envoy: each request reserves its estimated tokens from the token
//! bucket before it goes, and the provider's `usage` settles the difference after.

mod support;
use support::*;

/// A chat completion of about `chars` prompt characters asking for at most `max_tokens`.
fn chat_body(model: &str, chars: usize, max_tokens: u64) -> String {
    format!(
        r#"{{"model":"{model}","max_tokens":{max_tokens},"messages":[{{"role":"user","content":"{}"}}]}}"#,
        "x".repeat(chars)
    )
}

/// `usage.total_tokens` of an OpenAI answer.
fn total_tokens(r: &Reply) -> u64 {
    let v: serde_json::Value = serde_json::from_str(&r.body).unwrap_or_default();
    v["usage"]["total_tokens"].as_u64().unwrap_or(0)
}

#[test]
fn a_request_larger_than_the_whole_token_bucket_is_too_large() {
    let mock = Mock::start(&[]);
    let envoy = Envoy::start(r#"{"name":"tl","tokens":{"capacity":1000}}"#, 1, mock.port);
    let url = envoy.url("/v1/chat/completions");
    let r = post(&url, &chat_body("gpt-4o", 400, 5000), &[]).unwrap();
    assert_eq!(r.status, 429, "{r:?}");
    assert_eq!(r.header("x-llm-ratelimit-reason"), Some("too_large"));
    assert_eq!(r.header("x-should-retry"), Some("false"));
    assert!(r.body.contains("can never pass"), "{}", r.body);
    assert_eq!(mock.received(), 0);
    assert_eq!(envoy.stat("tl", "tokens.too_large"), 1);
    // One that fits goes.
    let r = post(&url, &chat_body("gpt-4o", 400, 100), &[]).unwrap();
    assert_eq!(r.status, 200, "{r:?}");
}

#[test]
fn a_concurrent_burst_of_large_requests_stays_within_the_token_bucket() {
    let mock = Mock::start(&[]);
    // 2000 tokens, next to no refill, no waiting: each request reserves 100 + 200 = 300.
    let config = r#"{"name":"tb","tokens":{"capacity":2000,"refill_rate":0.01},"queue":{"enabled":false}}"#;
    let envoy = Envoy::start(config, 2, mock.port);
    let url = envoy.url("/v1/chat/completions");
    let body = chat_body("gpt-4o", 400, 200);
    let next = std::sync::atomic::AtomicUsize::new(0);
    let replies = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..20 {
            s.spawn(|| {
                if next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < 20 {
                    let r = post(&url, &body, &[]).unwrap();
                    replies.lock().unwrap().push(r);
                }
            });
        }
    });
    let replies = replies.into_inner().unwrap();
    let ok: Vec<&Reply> = replies.iter().filter(|r| r.status == 200).collect();
    let used: u64 = ok.iter().map(|r| total_tokens(r)).sum();
    // Check-then-report limiters let all 20 through (6000 tokens); reserving lets 6 (1800).
    assert_eq!(ok.len(), 6, "{:?}", replies.iter().map(|r| r.status).collect::<Vec<_>>());
    assert!(used <= 2000 + 300, "the provider saw {used} tokens");
    let refused = replies.iter().find(|r| r.status == 429).unwrap();
    assert_eq!(refused.header("x-llm-ratelimit-reason"), Some("token_limit"), "{refused:?}");
    assert_eq!(mock.received(), 6);
    assert!(eventually(std::time::Duration::from_secs(2), || envoy.stat("tb", "tokens.estimated") == 1800));
    assert_eq!(envoy.stat("tb", "tokens.actual"), used);
}

#[test]
fn a_body_larger_than_max_body_bytes_passes_with_an_estimate_from_its_size() {
    let mock = Mock::start(&[]);
    let config = r#"{"name":"lb","tokens":{"capacity":5000000,"max_body_bytes":65536}}"#;
    let envoy = Envoy::start(config, 1, mock.port);
    let url = envoy.url("/v1/chat/completions");
    let r = post(&url, &chat_body("gpt-4o", 5_000_000, 10), &[]).unwrap();
    assert_eq!(r.status, 200, "{}", &r.body[..r.body.len().min(300)]);
    assert_eq!(mock.received(), 1);
    // 5 MB at 4 bytes a token, plus `output_default` (the body's max_tokens was not read).
    let estimated = envoy.stat("lb", "tokens.estimated");
    assert!((1_251_024..1_251_100).contains(&estimated), "{estimated}");
}

#[test]
fn per_model_limits_are_apart_from_the_provider_token_limit() {
    let mock = Mock::start(&[]);
    let config = r#"{"name":"pm","queue":{"enabled":false},
        "tokens":{"capacity":100000,"per_model":{"gpt-small":{"capacity":500,"refill_rate":0.01}}}}"#;
    let envoy = Envoy::start(config, 1, mock.port);
    let url = envoy.url("/v1/chat/completions");
    let small: Vec<u16> = (0..4).map(|_| post(&url, &chat_body("gpt-small", 400, 100), &[]).unwrap().status).collect();
    assert_eq!(small, [200, 200, 429, 429], "two of 200 tokens fit in gpt-small's 500");
    let other = post(&url, &chat_body("gpt-4o", 400, 100), &[]).unwrap();
    assert_eq!(other.status, 200, "other models draw on the provider's bucket");
}

/// Sends the headers and the first bytes of a 1000-byte body, and leaves the rest unsent.
fn half_sent(envoy: &Envoy) -> std::net::TcpStream {
    use std::io::Write;
    let mut s = std::net::TcpStream::connect(("127.0.0.1", envoy.port)).unwrap();
    let head = "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n\
                content-length: 1000\r\n\r\n{\"messages\":";
    s.write_all(head.as_bytes()).unwrap();
    s
}

/// Requests the router has started upstream (headers sent on), whether or not they finished.
fn started_upstream(envoy: &Envoy) -> u64 {
    envoy.stats().get("cluster.llm_provider.upstream_rq_total").copied().unwrap_or(0)
}

#[test]
fn headers_wait_for_their_body_only_with_a_token_limit() {
    let mock = Mock::start(&[]);
    // Without a token limit, headers go on at once and the body streams after them.
    let envoy = Envoy::start(r#"{"name":"nt"}"#, 1, mock.port);
    let _open = half_sent(&envoy);
    assert!(eventually(std::time::Duration::from_secs(2), || started_upstream(&envoy) == 1));
    let r = post(&envoy.url("/v1/chat/completions"), &chat_body("gpt-4o", 400, 100), &[]).unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(envoy.stat("nt", "tokens.estimated"), 0);
    drop(envoy);
    // With one, they wait for the body: nothing goes upstream before it is read.
    let envoy = Envoy::start(r#"{"name":"wt","tokens":{"capacity":100000}}"#, 1, mock.port);
    let open = half_sent(&envoy);
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert_eq!(started_upstream(&envoy), 0, "headers went on before the body was read");
    drop(open);
    let r = post(&envoy.url("/v1/chat/completions"), &chat_body("gpt-4o", 400, 100), &[]).unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(started_upstream(&envoy), 1);
    assert_eq!(envoy.stat("wt", "errors"), 0);
}

#[test]
fn without_allow_on_headers_stop_iteration_requests_are_estimated_from_content_length() {
    let mock = Mock::start(&[]);
    let opts = EnvoyOpts {
        filter_config: r#"{"name":"nf","tokens":{"capacity":100000}}"#,
        concurrency: 1,
        upstream_port: mock.port,
        edit: Some(|yaml| {
            yaml.replace("allow_on_headers_stop_iteration: true", "allow_on_headers_stop_iteration: false")
        }),
    };
    let envoy = Envoy::spawn(&opts).unwrap_or_else(|log| panic!("{log}"));
    let url = envoy.url("/v1/chat/completions");
    // While the worker has not seen a body delivered, a request waits a second for one, then is
    // decided from its content-length: through the limit, never unlimited.
    for _ in 0..3 {
        let t0 = std::time::Instant::now();
        let r = post(&url, &chat_body("gpt-4o", 400, 100), &[]).unwrap();
        assert_eq!(r.status, 200);
        assert!(t0.elapsed() < std::time::Duration::from_secs(3), "{:?}", t0.elapsed());
    }
    assert!(eventually(std::time::Duration::from_secs(2), || envoy.stat("nf", "tokens.estimated") > 0));
    // After three with no body ever seen, Envoy withholds bodies: no request is held any more,
    // each is estimated from its content-length and goes at once.
    let t0 = std::time::Instant::now();
    for _ in 0..5 {
        assert_eq!(post(&url, &chat_body("gpt-4o", 400, 100), &[]).unwrap().status, 200);
    }
    assert!(t0.elapsed() < std::time::Duration::from_secs(1), "{:?}", t0.elapsed());
    assert_eq!(envoy.stat("nf", "errors"), 0, "nobody let through unlimited");
    let logged = eventually(std::time::Duration::from_secs(3), || envoy.log().contains("stop_iteration seems off"));
    assert!(logged, "the log says why");
}

/// One request of each provider shape, whole and streamed: (path, body).
fn shapes(prompt: &str, max: u64) -> Vec<(String, String)> {
    let gemini = format!(
        r#"{{"contents":[{{"role":"user","parts":[{{"text":"{prompt}"}}]}}],"generationConfig":{{"maxOutputTokens":{max}}}}}"#
    );
    vec![
        (
            "/v1/chat/completions".into(),
            format!(r#"{{"model":"gpt-4o","max_tokens":{max},"messages":[{{"role":"user","content":"{prompt}"}}]}}"#),
        ),
        (
            "/v1/chat/completions".into(),
            format!(
                r#"{{"model":"gpt-4o","max_tokens":{max},"stream":true,"stream_options":{{"include_usage":true}},"messages":[{{"role":"user","content":"{prompt}"}}]}}"#
            ),
        ),
        (
            "/v1/chat/completions".into(),
            format!(
                r#"{{"model":"gpt-4o","max_tokens":{max},"stream":true,"messages":[{{"role":"user","content":"{prompt}"}}]}}"#
            ),
        ),
        ("/v1/responses".into(), format!(r#"{{"model":"gpt-4o","max_output_tokens":{max},"input":"{prompt}"}}"#)),
        (
            "/v1/responses".into(),
            format!(r#"{{"model":"gpt-4o","max_output_tokens":{max},"stream":true,"input":"{prompt}"}}"#),
        ),
        (
            "/v1/messages".into(),
            format!(
                r#"{{"model":"claude-sonnet-4","max_tokens":{max},"messages":[{{"role":"user","content":"{prompt}"}}]}}"#
            ),
        ),
        (
            "/v1/messages".into(),
            format!(
                r#"{{"model":"claude-sonnet-4","max_tokens":{max},"stream":true,"messages":[{{"role":"user","content":"{prompt}"}}]}}"#
            ),
        ),
        ("/v1beta/models/gemini-2.0-flash:generateContent".into(), gemini.clone()),
        ("/v1beta/models/gemini-2.0-flash:streamGenerateContent?alt=sse".into(), gemini),
    ]
}

/// The tokens the mock served so far: input + output of every 200 it sent.
fn served(mock: &Mock) -> u64 {
    mock.counter("tokens_input") + mock.counter("tokens_output")
}

#[test]
fn streamed_and_whole_answers_of_every_provider_are_settled_from_their_usage() {
    // Replies of 20 tokens, whatever maximum the request asks for.
    let mock = Mock::start(&["--output-tokens", "20"]);
    let envoy = Envoy::start(r#"{"name":"rc","tokens":{"capacity":100000,"refill_rate":0.01}}"#, 2, mock.port);
    let prompt = "Tell me about token buckets in forty words or fewer, please.".repeat(4);
    // Tokens the filter charged beyond what the provider served (answers without a usage).
    let mut unreported = 0;
    for (path, body) in shapes(&prompt, 500) {
        // An OpenAI chat stream reports its usage only when asked to.
        let reports = !body.contains(r#""stream":true"#) || !path.contains("chat") || body.contains("include_usage");
        let (served_before, actual_before) = (served(&mock), envoy.stat("rc", "tokens.actual"));
        let estimated_before = envoy.stat("rc", "tokens.estimated");
        let r = post(&envoy.url(&path), &body, &[]).unwrap();
        assert_eq!(r.status, 200, "{path}: {}", r.body);
        let ok = eventually(std::time::Duration::from_secs(2), || {
            let (estimated, actual) = (envoy.stat("rc", "tokens.estimated"), envoy.stat("rc", "tokens.actual"));
            let charged = if reports { served(&mock) - served_before } else { estimated - estimated_before };
            estimated > estimated_before && actual - actual_before == charged
        });
        let (estimated, actual) = (
            envoy.stat("rc", "tokens.estimated") - estimated_before,
            envoy.stat("rc", "tokens.actual") - actual_before,
        );
        let served_now = served(&mock) - served_before;
        assert!(ok, "{path} {body}: the filter settled {actual} of {estimated}, the provider served {served_now}");
        if reports {
            // The estimate reserved the maximum (500 out); the answer used 20.
            assert_eq!(estimated - actual, 480, "{path} {body}");
        } else {
            // No usage: charged its reservation, never less.
            assert_eq!(actual, estimated, "{path} {body}");
            unreported += actual - served_now;
        }
    }
    assert!(unreported > 0, "the chat stream without include_usage was charged its reservation");
    // Every reservation was settled: the bucket is back where the usage alone puts it, but for
    // the reservation kept by the answer without one.
    let left = envoy.stat("rc", "tokens.bucket");
    assert_eq!(left, 100_000 - served(&mock) - unreported, "bucket {left}");
}

#[test]
fn the_provider_sees_at_most_the_token_capacity_plus_one_request_s_error() {
    // Estimates of 600 (200 in, 400 out) for answers of 250: refunds let more through than
    // the estimate alone would (5), and what the provider serves stays within the capacity.
    let mock = Mock::start(&["--output-tokens", "50"]);
    let config = r#"{"name":"tpm","tokens":{"capacity":3000,"refill_rate":1},
        "priorities":{"NORMAL":{"max_wait_ms":2000}}}"#;
    let envoy = Envoy::start(config, 2, mock.port);
    let url = envoy.url("/v1/chat/completions");
    let body = chat_body("gpt-4o", 800, 400);
    let t0 = std::time::Instant::now();
    let next = std::sync::atomic::AtomicUsize::new(0);
    let statuses = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..8 {
            s.spawn(|| {
                while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < 40 {
                    let r = post(&url, &body, &[]).unwrap();
                    statuses.lock().unwrap().push(r.status);
                }
            });
        }
    });
    // Settlements are written on the next tick: then the refunds admit more.
    std::thread::sleep(std::time::Duration::from_millis(100));
    for _ in 0..5 {
        statuses.lock().unwrap().push(post(&url, &body, &[]).unwrap().status);
    }
    let elapsed = t0.elapsed().as_secs_f64();
    let statuses = statuses.into_inner().unwrap();
    let ok = statuses.iter().filter(|&&s| s == 200).count();
    assert!(statuses.iter().all(|&s| s == 200 || s == 429), "{statuses:?}");
    let served = served(&mock);
    assert_eq!(served, ok as u64 * 250, "{ok} answered");
    let bound = 3000.0 + elapsed * 1.0 + 600.0;
    assert!((served as f64) <= bound, "the provider served {served} tokens in {elapsed:.1} s (bound {bound})");
    assert!(ok > 5, "refunds let more than capacity / estimate through: {ok}");
}

#[test]
fn odd_and_hostile_bodies_are_estimated_safely() {
    let mock = Mock::start(&[]);
    let envoy = Envoy::start(r#"{"name":"ob","tokens":{"capacity":100000}}"#, 1, mock.port);
    let url = envoy.url("/v1/chat/completions");
    for (body, status) in [
        ("not json at all", 200),
        ("", 200),
        (r#"{"max_tokens":-5,"messages":[{"role":"user","content":"hi"}]}"#, 200),
        (r#"{"messages":[{"role":"user","content":{"deeply":[[[[["odd"]]]]]}}],"max_tokens":"many"}"#, 200),
        (r#"{"max_tokens":1e300,"messages":[]}"#, 429),
        (&format!("{}{}", "[".repeat(10_000), "]".repeat(10_000)), 200),
    ] {
        let r = post(&url, body, &[]).unwrap();
        assert_eq!(r.status, status, "{}: {r:?}", &body[..body.len().min(80)]);
    }
    // A chunked body (no content-length) is read the same way.
    let chunked = ureq::post(&url)
        .set("content-type", "application/json")
        .send(std::io::Cursor::new(chat_body("gpt-4o", 400, 10).into_bytes()))
        .map(|r| r.status());
    assert_eq!(chunked.ok(), Some(200));
    assert_eq!(envoy.stat("ob", "tokens.too_large"), 1);
    assert_eq!(envoy.stat("ob", "errors"), 0);
}

#[test]
fn clients_that_go_away_mid_body_or_mid_stream_leave_nothing_behind() {
    use std::io::{Read, Write};
    let mock = Mock::start(&["--output-tokens", "2000", "--latency-ms", "20"]);
    let config = r#"{"name":"gone","tokens":{"capacity":100000,"refill_rate":0.01}}"#;
    let envoy = Envoy::start(config, 2, mock.port);
    for _ in 0..20 {
        // Headers and part of the body, then gone: the held request is dropped.
        let mut s = std::net::TcpStream::connect(("127.0.0.1", envoy.port)).unwrap();
        let head = "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n\r\n{\"messages\":";
        s.write_all(head.as_bytes()).unwrap();
        drop(s);
        // A stream read for a moment, then gone: no usage came (none asked), so it is charged
        // its reservation.
        let body = r#"{"model":"m","max_tokens":4000,"stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
        let mut s = std::net::TcpStream::connect(("127.0.0.1", envoy.port)).unwrap();
        let req = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        s.write_all(req.as_bytes()).unwrap();
        let mut first = [0u8; 64];
        let _ = s.read(&mut first);
        drop(s);
    }
    let settled = eventually(std::time::Duration::from_secs(5), || envoy.stat("gone", "tokens.estimated") == 20 * 4001);
    assert!(settled, "estimated {}", envoy.stat("gone", "tokens.estimated"));
    // Each cut stream was charged its estimate: less would let a cut stream go for free.
    assert_eq!(envoy.stat("gone", "tokens.actual"), 20 * 4001);
    let r = post(&envoy.url("/v1/chat/completions"), &chat_body("gpt-4o", 40, 10), &[]).unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(envoy.stat("gone", "errors"), 0);
}
