//! Starts the real binary on port 0 and talks plain HTTP/1.1 to it over TCP.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

struct Server {
    child: Child,
    addr: String,
}

impl Server {
    fn start(args: &str) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_mock-provider"))
            .args(args.split_whitespace())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn mock-provider");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let addr = line.trim().strip_prefix("listening on ").expect(&line).to_string();
        Server { child, addr }
    }

    async fn request(&self, method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> Reply {
        let mut stream = TcpStream::connect(&self.addr).await.unwrap();
        let mut req = format!("{method} {path} HTTP/1.1\r\nhost: mock\r\nconnection: close\r\n");
        for (name, value) in headers {
            req += &format!("{name}: {value}\r\n");
        }
        req += &format!("content-type: application/json\r\ncontent-length: {}\r\n\r\n{body}", body.len());
        stream.write_all(req.as_bytes()).await.unwrap();
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await.unwrap();
        Reply::parse(&raw)
    }

    async fn chat(&self, headers: &[(&str, &str)]) -> Reply {
        let body = r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hello there!"}]}"#;
        self.request("POST", "/v1/chat/completions", headers, body).await
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Reply {
    status: u16,
    headers: HashMap<String, String>,
    body: Value,
    /// The body as text, de-chunked.
    text: String,
    /// How many pieces a chunked body came in (0 without chunking).
    pieces: usize,
}

impl Reply {
    /// Small JSON answers come with content-length; streamed ones chunked.
    fn parse(raw: &[u8]) -> Reply {
        let split = raw.windows(4).position(|w| w == b"\r\n\r\n").expect("complete response");
        let (head, mut rest) = (std::str::from_utf8(&raw[..split]).unwrap(), &raw[split + 4..]);
        let mut lines = head.lines();
        let status = lines.next().unwrap().split(' ').nth(1).unwrap().parse().unwrap();
        let headers: HashMap<String, String> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        let (mut body, mut pieces) = (Vec::new(), 0);
        if headers.get("transfer-encoding").is_some_and(|v| v == "chunked") {
            loop {
                let eol = rest.windows(2).position(|w| w == b"\r\n").expect("chunk size line");
                let size = usize::from_str_radix(std::str::from_utf8(&rest[..eol]).unwrap(), 16).unwrap();
                if size == 0 {
                    break;
                }
                body.extend_from_slice(&rest[eol + 2..eol + 2 + size]);
                rest = &rest[eol + 2 + size + 2..];
                pieces += 1;
            }
        } else {
            body = rest.to_vec();
        }
        let text = String::from_utf8(body).expect("UTF-8 once whole");
        Reply { status, body: serde_json::from_str(&text).unwrap_or(Value::Null), text, pieces, headers }
    }

    /// The `data:` payloads of an SSE body, parsed (`[DONE]` left out).
    fn events(&self) -> Vec<Value> {
        let text = self.text.replace("\r\n", "\n");
        let data = text.lines().filter_map(|l| l.strip_prefix("data: ")).filter(|d| *d != "[DONE]");
        data.map(|d| serde_json::from_str(d).unwrap()).collect()
    }

    fn header(&self, name: &str) -> &str {
        self.headers.get(name).map(String::as_str).unwrap_or_else(|| panic!("no {name} in {:?}", self.headers))
    }
}

/// Parses the Go durations the mock emits (`59.123s`, `1m0s`, `12ms`, `23h59m59.5s`) to seconds.
fn go_secs(s: &str) -> f64 {
    if let Some(ms) = s.strip_suffix("ms") {
        return ms.parse::<f64>().unwrap() / 1000.0;
    }
    let (h, s) = s.split_once('h').map_or((0.0, s), |(h, s)| (h.parse::<f64>().unwrap(), s));
    let s = s.strip_suffix('s').unwrap();
    h * 3600.0
        + match s.split_once('m') {
            Some((m, s)) => m.parse::<f64>().unwrap() * 60.0 + s.parse::<f64>().unwrap(),
            None => s.parse::<f64>().unwrap(),
        }
}

#[tokio::test]
async fn openai_quota_then_429_with_consistent_headers() {
    let server = Server::start("--quota 2 --window-ms 5000 --style openai");

    let first = server.chat(&[("x-llm-priority", "CRITICAL")]).await;
    assert_eq!(first.status, 200);
    assert_eq!(first.header("x-ratelimit-limit-requests"), "2");
    assert_eq!(first.header("x-ratelimit-remaining-requests"), "1");
    assert!(go_secs(first.header("x-ratelimit-reset-requests")) <= 5.0);
    assert!(!first.headers.contains_key("retry-after"));
    assert_eq!(first.body["object"], "chat.completion");
    assert_eq!(first.body["model"], "gpt-4o");
    assert_eq!(first.body["usage"]["prompt_tokens"], 3); // 12 chars / 4
    assert_eq!(first.body["usage"]["total_tokens"], 3 + 16);

    let second = server.chat(&[]).await;
    assert_eq!((second.status, second.header("x-ratelimit-remaining-requests")), (200, "0"));

    let limited = server.chat(&[("x-llm-priority", "CRITICAL")]).await;
    assert_eq!(limited.status, 429);
    assert_eq!(limited.header("x-ratelimit-remaining-requests"), "0");
    let reset = go_secs(limited.header("x-ratelimit-reset-requests"));
    let retry_after: f64 = limited.header("retry-after").parse().unwrap();
    assert!(reset > 1.0 && reset <= 5.0, "reset {reset}");
    assert!(retry_after >= reset && retry_after < reset + 1.0, "retry-after {retry_after} vs {reset}");
    assert_eq!(limited.body["error"]["code"], "rate_limit_exceeded");
    assert_eq!(limited.body["error"]["type"], "requests");
    let message = limited.body["error"]["message"].as_str().unwrap();
    assert!(message.contains("Please try again in "), "{message}");

    let stats = server.request("GET", "/mock/stats", &[], "").await.body;
    assert_eq!(
        (stats["requests"].as_u64(), stats["ok"].as_u64(), stats["rate_limited"].as_u64()),
        (Some(3), Some(2), Some(1))
    );
    assert_eq!(stats["by_priority"]["CRITICAL"], 2);
    assert_eq!(stats["by_priority"]["none"], 1);
    assert_eq!(stats["by_path"]["/v1/chat/completions"], 3);
    assert_eq!(stats["settings"]["quota"], 2);

    // Reset starts a fresh window.
    server.request("POST", "/mock/reset", &[], "").await;
    assert_eq!(server.chat(&[]).await.status, 200);
}

#[tokio::test]
async fn sliding_window_admits_again_after_the_advertised_wait() {
    let server = Server::start("--quota 1 --window-ms 2000 --window sliding --style ietf");
    assert_eq!(server.chat(&[]).await.status, 200);
    let limited = server.chat(&[]).await;
    assert_eq!(limited.status, 429);
    assert_eq!(limited.header("ratelimit-policy"), "\"default\";q=1;w=2");
    assert_eq!(limited.header("ratelimit"), "\"default\";r=0;t=2");
    assert_eq!(limited.header("retry-after"), "2");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(server.chat(&[]).await.status, 200);
}

#[tokio::test]
async fn styles_terminals_and_overrides() {
    let server = Server::start("--quota 1 --window-ms 60000");
    assert_eq!(server.chat(&[]).await.status, 200);

    // Switch style at runtime.
    let settings = server.request("POST", "/mock/config", &[], r#"{"style":"anthropic"}"#).await;
    assert_eq!(settings.body["style"], "anthropic");
    let r = server.request("POST", "/v1/messages", &[], r#"{"max_tokens":5,"messages":[]}"#).await;
    assert_eq!(r.status, 429);
    assert_eq!(r.body["error"]["type"], "rate_limit_error");
    assert!(r.header("anthropic-ratelimit-requests-reset").ends_with('Z'));
    let retry: u64 = r.header("retry-after").parse().unwrap();
    assert!((50..=60).contains(&retry), "{retry}");

    // Per-request style override.
    let r = server.chat(&[("x-mock-style", "gemini")]).await;
    assert_eq!(r.body["error"]["status"], "RESOURCE_EXHAUSTED");
    let delay = r.body["error"]["details"][1]["retryDelay"].as_str().unwrap();
    assert!(delay.ends_with('s') && delay.trim_end_matches('s').parse::<f64>().unwrap() > 50.0);

    let r = server.chat(&[("x-mock-style", "bedrock")]).await;
    assert!(r.header("x-amzn-errortype").starts_with("ThrottlingException:"));

    // Terminal kinds win over the quota, and count separately.
    let r = server.chat(&[("x-mock-terminal", "insufficient_quota")]).await;
    assert_eq!((r.status, r.body["error"]["code"].as_str()), (429, Some("insufficient_quota")));
    let r = server.chat(&[("x-mock-terminal", "daily")]).await;
    assert_eq!((r.header("retry-after"), r.header("retry-after-ms")), ("86400", "86400000"));

    let r = server.chat(&[("x-mock-status", "503")]).await;
    assert_eq!((r.status, r.body["error"]["type"].as_str()), (503, Some("server_error")));
    let r = server.chat(&[("x-mock-style", "nope")]).await;
    assert_eq!(r.status, 400);

    let r = server.request("POST", "/mock/config", &[], r#"{"window":"hourly"}"#).await;
    assert_eq!(r.status, 400);
    assert!(r.body["error"]["message"].as_str().unwrap().starts_with("window: unknown value"));
    assert_eq!(server.request("GET", "/nope", &[], "").await.status, 404);

    let stats = server.request("GET", "/mock/stats", &[], "").await.body;
    assert_eq!((stats["terminal"].as_u64(), stats["rate_limited"].as_u64()), (Some(2), Some(3)));
}

#[test]
fn bad_flag_exits_2_naming_the_flag() {
    let out = Command::new(env!("CARGO_BIN_EXE_mock-provider")).args(["--window", "hourly"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--window: unknown value 'hourly'; allowed: fixed, sliding"), "{stderr}");
}

#[tokio::test]
async fn generic_ms_reports_the_reset_in_epoch_milliseconds_only() {
    let server = Server::start("--quota 1 --window-ms 4000 --style generic-ms");
    let now_ms = || std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
    let before = now_ms();
    let ok = server.chat(&[]).await;
    assert_eq!((ok.status, ok.header("x-ratelimit-remaining")), (200, "0"));
    let reset: u64 = ok.header("x-ratelimit-reset").parse().unwrap();
    // The window starts at the first request and its end is rounded up to the next millisecond.
    assert!(reset > before + 3000 && reset <= now_ms() + 4001, "reset {reset}, asked at {before}");
    let limited = server.chat(&[]).await;
    assert_eq!(limited.status, 429);
    assert_eq!(limited.header("x-ratelimit-reset"), reset.to_string());
    assert!(!limited.headers.contains_key("retry-after"), "the reset is only in x-ratelimit-reset");
}

#[tokio::test]
async fn groq_requests_per_day_next_to_an_exhausted_token_window() {
    // 19 tokens a request (12 chars / 4 + 16 completion): the second one uses up 30.
    let server =
        Server::start("--style groq --quota 1000 --request-window-ms 86400000 --token-quota 30 --window-ms 4000");
    let first = server.chat(&[]).await;
    assert_eq!(first.header("x-groq-region"), "us-west-1");
    assert_eq!(first.header("x-ratelimit-remaining-tokens"), "11");
    assert_eq!(server.chat(&[]).await.header("x-ratelimit-remaining-tokens"), "0");
    let limited = server.chat(&[]).await;
    assert_eq!(limited.status, 429);
    assert_eq!(limited.body["error"]["type"], "tokens");
    assert_eq!(limited.header("x-ratelimit-remaining-requests"), "998");
    assert!(go_secs(limited.header("x-ratelimit-reset-requests")) > 86_000.0);
    let tokens_reset = go_secs(limited.header("x-ratelimit-reset-tokens"));
    assert!(tokens_reset > 3.0 && tokens_reset <= 4.0, "{tokens_reset}");
    assert_eq!(limited.header("retry-after"), "4");
    let settings = server.request("GET", "/mock/stats", &[], "").await.body["settings"].clone();
    assert_eq!(settings["request_window_ms"], 86_400_000);
}

#[tokio::test]
async fn streamed_answers_arrive_in_pieces_and_count_their_tokens() {
    let server = Server::start("--token-quota 1000 --window-ms 60000 --style openai");
    // 12 prompt chars = 3 tokens; 20 output tokens asked, under max_tokens 30.
    let body = r#"{"model":"gpt-4o","stream":true,"stream_options":{"include_usage":true},"max_tokens":30,
        "messages":[{"role":"user","content":"hello there!"}]}"#;
    let r = server.request("POST", "/v1/chat/completions", &[("x-mock-output-tokens", "20")], body).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), "text/event-stream");
    assert_eq!(r.header("x-ratelimit-remaining-tokens"), "977"); // charged 3 + 20
    assert!(r.pieces > 10, "{} pieces", r.pieces);
    assert!(r.text.ends_with("data: [DONE]\n\n"));
    let events = r.events();
    let text: String = events.iter().filter_map(|e| e["choices"][0]["delta"]["content"].as_str()).collect();
    assert_eq!(text.chars().count(), 80);
    let usage = &events.last().unwrap()["usage"];
    assert_eq!((usage["prompt_tokens"].as_u64(), usage["completion_tokens"].as_u64()), (Some(3), Some(20)));

    // Anthropic: usage in message_start (input) and message_delta (output).
    let body =
        r#"{"model":"claude","stream":true,"max_tokens":7,"messages":[{"role":"user","content":"hello there!"}]}"#;
    let r = server.request("POST", "/v1/messages", &[], body).await;
    assert_eq!(r.header("content-type"), "text/event-stream");
    assert!(r.text.starts_with("event: message_start\n"));
    let events = r.events();
    assert_eq!(events[0]["message"]["usage"]["input_tokens"], 3);
    let delta = events.iter().find(|e| e["type"] == "message_delta").unwrap();
    assert_eq!(delta["usage"]["output_tokens"], 7);

    // Gemini SSE: the last chunk has the final counts.
    let body = r#"{"contents":[{"parts":[{"text":"hello there!"}]}],"generationConfig":{"maxOutputTokens":5}}"#;
    let r = server.request("POST", "/v1beta/models/gemini-2.0-flash:streamGenerateContent?alt=sse", &[], body).await;
    assert_eq!(r.header("content-type"), "text/event-stream");
    let events = r.events();
    let usage = &events.last().unwrap()["usageMetadata"];
    assert_eq!((usage["candidatesTokenCount"].as_u64(), usage["totalTokenCount"].as_u64()), (Some(5), Some(8)));

    let stats = server.request("GET", "/mock/stats", &[], "").await.body;
    assert_eq!((stats["tokens_input"].as_u64(), stats["tokens_output"].as_u64()), (Some(9), Some(32)));
    assert_eq!((stats["streamed"].as_u64(), stats["ok"].as_u64()), (Some(3), Some(3)));
    assert_eq!(stats["in_flight"], 0);
    server.request("POST", "/mock/reset", &[], "").await;
    let stats = server.request("GET", "/mock/stats", &[], "").await.body;
    assert_eq!((stats["tokens_input"].as_u64(), stats["streamed"].as_u64()), (Some(0), Some(0)));
}

#[tokio::test]
async fn responses_and_gemini_whole_answers() {
    let server = Server::start("--output-tokens 9");
    let body = r#"{"model":"gpt-4.1","instructions":"be brief","input":"hello there!"}"#;
    let r = server.request("POST", "/v1/responses", &[], body).await;
    assert_eq!((r.status, r.body["object"].as_str()), (200, Some("response")));
    assert_eq!(r.body["usage"], serde_json::json!({"input_tokens": 5, "output_tokens": 9, "total_tokens": 14}));
    assert_eq!(r.body["output"][0]["content"][0]["text"].as_str().unwrap().chars().count(), 36);

    let body = r#"{"contents":[{"parts":[{"text":"hello there!"}]}],"generationConfig":{"maxOutputTokens":4}}"#;
    let r = server.request("POST", "/v1beta/models/gemini-2.0-flash:generateContent", &[], body).await;
    assert_eq!(r.header("content-type"), "application/json");
    assert_eq!(r.body["usageMetadata"]["candidatesTokenCount"], 4); // max tokens below --output-tokens
    assert_eq!(r.body["modelVersion"], "gemini-2.0-flash");

    // Without alt=sse: one JSON array, streamed.
    let r = server.request("POST", "/v1beta/models/gemini-2.0-flash:streamGenerateContent", &[], body).await;
    assert!(r.pieces > 1 && r.body.is_array(), "{}", r.text);
    assert_eq!(r.body.as_array().unwrap().last().unwrap()["usageMetadata"]["totalTokenCount"], 7);

    assert_eq!(server.request("POST", "/v1beta/models/gemini:countTokens", &[], "{}").await.status, 404);
    let r = server.chat(&[("x-mock-output-tokens", "0")]).await;
    assert_eq!(r.status, 400);
}

/// Sends one LLM request over a fresh connection and returns what came back, or the read error.
async fn raw_exchange(addr: &str, extra_header: &str) -> Result<Vec<u8>, std::io::ErrorKind> {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let body = "{}";
    let req = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: mock\r\nconnection: close\r\n{extra_header}content-length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(req.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await.map(|_| raw).map_err(|e| e.kind())
}

#[tokio::test]
async fn faults_reset_or_garbage_the_connection_and_leave_mock_routes_alone() {
    let server = Server::start("--port 0 --fault reset");
    assert_eq!(raw_exchange(&server.addr, "").await, Err(std::io::ErrorKind::ConnectionReset));
    let garbage = raw_exchange(&server.addr, "x-mock-fault: garbage\r\n").await.unwrap();
    assert!(!garbage.is_empty() && !garbage.starts_with(b"HTTP/"), "{garbage:?}");
    let ok = Reply::parse(&raw_exchange(&server.addr, "x-mock-fault: none\r\n").await.unwrap());
    assert_eq!(ok.status, 200);
    // /mock/* answers even with the fault on, so a test can turn it off.
    let stats = server.request("GET", "/mock/stats", &[], "").await;
    assert_eq!((stats.status, stats.body["faults"].as_u64()), (200, Some(2)));
    assert_eq!(stats.body["settings"]["fault"], "reset");
    let off = server.request("POST", "/mock/config", &[], r#"{"fault":"bad_limits"}"#).await;
    assert_eq!(off.status, 200);
    let bad = raw_exchange(&server.addr, "").await.unwrap();
    assert!(bad.starts_with(b"HTTP/1.1 429 "), "{:?}", String::from_utf8_lossy(&bad));
    assert!(String::from_utf8_lossy(&bad).contains("\r\nretry-after: soon\r\n"));
}

/// Sends `n` chat requests at once; each comes back with the time its whole answer took
/// (for these small JSON answers, the time to headers).
async fn concurrent_chats(server: Arc<Server>, n: usize) -> Vec<(Reply, Duration)> {
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let server = server.clone();
            tokio::spawn(async move {
                let start = Instant::now();
                let reply = server.chat(&[]).await;
                (reply, start.elapsed())
            })
        })
        .collect();
    let mut replies = Vec::new();
    for task in tasks {
        replies.push(task.await.unwrap());
    }
    replies
}

/// Polls `/mock/stats` until `ready` holds (5 s at most), and returns those stats.
async fn stats_when(server: &Server, what: &str, ready: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let stats = server.request("GET", "/mock/stats", &[], "").await.body;
        if ready(&stats) {
            return stats;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}: {stats}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The names of the headers a client could read a limit or a wait from.
fn rate_limit_headers(r: &Reply) -> Vec<&str> {
    let names = r.headers.keys().map(String::as_str);
    names.filter(|n| n.contains("ratelimit") || n.contains("retry-after")).collect()
}

fn overloaded_body() -> Value {
    json!({"error": {"message": "server overloaded", "type": "overloaded"}})
}

fn statuses(replies: &[(Reply, Duration)]) -> Vec<(u16, Duration)> {
    replies.iter().map(|(r, t)| (r.status, *t)).collect()
}

#[tokio::test]
async fn hidden_capacity_serves_k_queues_q_and_overflows_without_rate_limit_headers() {
    // A quota too (never reached), so a 200 would have x-ratelimit-* headers without the capacity.
    let args = "--capacity 2 --capacity-queue 1 --service-ms 300 --quota 1000 --style openai";
    let server = Arc::new(Server::start(args));
    let mut replies = concurrent_chats(server.clone(), 5).await;
    replies.sort_by_key(|(_, took)| *took);
    let (ok, overflowed): (Vec<_>, Vec<_>) = replies.iter().partition(|(r, _)| r.status == 200);
    assert_eq!((ok.len(), overflowed.len()), (3, 2), "{:?}", statuses(&replies));
    for (r, _) in &replies {
        assert!(rate_limit_headers(r).is_empty(), "{} with {:?}", r.status, r.headers);
    }
    assert_eq!(ok[0].0.body["object"], "chat.completion");
    // Two served at once (300 ms), the third after waiting for a slot (300 + 300 ms).
    assert!(ok[0].1 >= Duration::from_millis(290), "{:?}", statuses(&replies));
    assert!(ok[2].1 >= Duration::from_millis(450), "the queued one waited: {:?}", statuses(&replies));
    for (r, took) in &overflowed {
        assert_eq!((r.status, &r.body), (503, &overloaded_body()));
        assert!(*took < ok[0].1, "overflow is answered at once: {:?}", statuses(&replies));
    }
    let stats = server.request("GET", "/mock/stats", &[], "").await.body;
    let expected = json!({"in_flight": 0, "waiting": 0, "max_in_flight_seen": 2, "served": 3,
        "queued_total": 1, "overflowed": 2});
    assert_eq!(stats["capacity"], expected);
    assert_eq!((stats["requests"].as_u64(), stats["ok"].as_u64()), (Some(5), Some(3)));
    let settings = &stats["settings"];
    assert_eq!((&settings["capacity"], &settings["capacity_queue"]), (&json!(2), &json!(1)));
    assert_eq!((&settings["capacity_status"], &settings["latency_ms"]), (&json!(503), &json!(300)));

    // Down to one slot at runtime: one at a time, the queue (set explicitly) still 1.
    server.request("POST", "/mock/reset", &[], "").await;
    let settings = server.request("POST", "/mock/config", &[], r#"{"capacity":1}"#).await.body;
    assert_eq!((&settings["capacity"], &settings["capacity_queue"]), (&json!(1), &json!(1)));
    let replies = concurrent_chats(server.clone(), 3).await;
    let served = replies.iter().filter(|(r, _)| r.status == 200).count();
    assert_eq!(served, 2, "{:?}", statuses(&replies));
    let stats = server.request("GET", "/mock/stats", &[], "").await.body;
    let expected = json!({"in_flight": 0, "waiting": 0, "max_in_flight_seen": 1, "served": 2,
        "queued_total": 1, "overflowed": 1});
    assert_eq!(stats["capacity"], expected);
}

#[tokio::test]
async fn lowering_capacity_at_runtime_holds_new_requests_until_slots_come_back() {
    let server = Arc::new(Server::start("--capacity 8 --latency-ms 800 --capacity-status 429"));
    let old = tokio::spawn(concurrent_chats(server.clone(), 6));
    stats_when(&server, "6 in flight", |s| s["capacity"]["in_flight"] == 6).await;

    // 8 -> 4 while 6 are served: the queue follows (4), and new requests wait for in-flight < 4.
    let settings = server.request("POST", "/mock/config", &[], r#"{"capacity":4}"#).await.body;
    assert_eq!((&settings["capacity"], &settings["capacity_queue"]), (&json!(4), &json!(4)));
    let new = tokio::spawn(concurrent_chats(server.clone(), 6));
    let stats = stats_when(&server, "6 new ones queued or turned away", |s| {
        s["capacity"]["waiting"].as_u64().unwrap() + s["capacity"]["overflowed"].as_u64().unwrap() == 6
    })
    .await;
    let c = &stats["capacity"];
    assert_eq!((&c["in_flight"], &c["waiting"], &c["overflowed"]), (&json!(6), &json!(4), &json!(2)), "{stats}");

    let old = old.await.unwrap();
    assert!(old.iter().all(|(r, _)| r.status == 200), "{:?}", statuses(&old));
    let c = server.request("GET", "/mock/stats", &[], "").await.body["capacity"].clone();
    assert!(c["in_flight"].as_u64().unwrap() <= 4, "{c}");
    let new = new.await.unwrap();
    let (ok, limited): (Vec<_>, Vec<_>) = new.iter().partition(|(r, _)| r.status == 200);
    assert_eq!((ok.len(), limited.len()), (4, 2), "{:?}", statuses(&new));
    for (r, _) in &limited {
        assert_eq!((r.status, &r.body), (429, &overloaded_body()));
        assert!(rate_limit_headers(r).is_empty(), "{:?}", r.headers);
    }
    let stats = server.request("GET", "/mock/stats", &[], "").await.body;
    let expected = json!({"in_flight": 0, "waiting": 0, "max_in_flight_seen": 6, "served": 10,
        "queued_total": 4, "overflowed": 2});
    assert_eq!(stats["capacity"], expected);
}

/// Sends a chat request and leaves the connection open without reading.
async fn send_only(addr: &str) -> TcpStream {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let req = "POST /v1/chat/completions HTTP/1.1\r\nhost: mock\r\ncontent-length: 2\r\n\r\n{}";
    stream.write_all(req.as_bytes()).await.unwrap();
    stream
}

#[tokio::test]
async fn clients_gone_mid_wait_or_mid_service_give_their_slot_back() {
    let server = Server::start("--capacity 1 --capacity-queue 2 --service-ms 3000");
    let served = send_only(&server.addr).await;
    stats_when(&server, "the first served", |s| s["capacity"]["in_flight"] == 1).await;
    let queued = send_only(&server.addr).await;
    stats_when(&server, "the second queued", |s| s["capacity"]["waiting"] == 1).await;

    drop(queued);
    let stats = stats_when(&server, "the queued one gone", |s| s["capacity"]["waiting"] == 0).await;
    assert_eq!(stats["capacity"]["in_flight"], 1, "the first still holds the slot: {stats}");
    drop(served);
    let stats = stats_when(&server, "the served one gone", |s| s["capacity"]["in_flight"] == 0).await;
    assert_eq!((stats["in_flight"].as_u64(), stats["ok"].as_u64()), (Some(0), Some(0)), "{stats}");

    // The slot is free again: a stream is served at once, also without rate-limit headers.
    let body = r#"{"model":"m","stream":true,"messages":[{"role":"user","content":"hello there!"}]}"#;
    let r = server.request("POST", "/v1/chat/completions", &[("x-mock-latency-ms", "0")], body).await;
    assert_eq!((r.status, r.header("content-type")), (200, "text/event-stream"));
    assert!(r.text.ends_with("data: [DONE]\n\n") && rate_limit_headers(&r).is_empty(), "{:?}", r.headers);
    let stats = server.request("GET", "/mock/stats", &[], "").await.body;
    let expected = json!({"in_flight": 0, "waiting": 0, "max_in_flight_seen": 1, "served": 2,
        "queued_total": 1, "overflowed": 0});
    assert_eq!(stats["capacity"], expected);
}
