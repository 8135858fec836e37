//! What each API asks and answers: the request fields the mock reads (model, prompt
//! text, max tokens, stream flags) and the reply, as one JSON body or as the list
//! of events its stream sends, in OpenAI chat, OpenAI Responses, Anthropic and
//! Gemini shapes. Pure; `stream.rs` turns the events into bytes on the wire.

use serde_json::{json, Value};

use crate::config::MAX_OUTPUT_TOKENS;
use crate::stream::{deltas, json_array, sse, Event};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Api {
    /// OpenAI `POST /v1/chat/completions`.
    Chat,
    /// OpenAI `POST /v1/responses`.
    Responses,
    /// Anthropic `POST /v1/messages`.
    Anthropic,
    /// Gemini `POST /v1beta/models/{model}:generateContent` (or `:streamGenerateContent`).
    Gemini,
}

/// How the answer goes on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    /// One JSON body with content-length.
    Json,
    /// `text/event-stream`, in uneven chunks.
    Sse,
    /// Gemini's `:streamGenerateContent` without `alt=sse`: a JSON array of the
    /// chunks, itself sent in uneven chunks.
    JsonArray,
}

const DEFAULT_COMPLETION_TOKENS: u64 = 16;

/// What the mock needs from a request body. Never fails: a missing or broken
/// body still gets a 200, with tokens estimated from its length.
#[derive(Debug)]
pub struct LlmRequest {
    pub model: String,
    /// ~4 characters a token, over the prompt's text.
    pub prompt_tokens: u64,
    /// The request's own cap on the reply (clamped to 1..=MAX_OUTPUT_TOKENS).
    pub max_tokens: Option<u64>,
    /// `"stream": true` (Gemini streams by method instead).
    pub stream: bool,
    /// OpenAI chat `stream_options.include_usage`: only then does a stream report usage.
    pub include_usage: bool,
}

impl LlmRequest {
    pub fn parse(api: Api, body: &[u8]) -> Self {
        let Ok(json) = serde_json::from_slice::<Value>(body) else {
            return LlmRequest {
                model: "mock-model".into(),
                prompt_tokens: (body.len() as u64).div_ceil(4),
                max_tokens: None,
                stream: false,
                include_usage: false,
            };
        };
        let (text, max_tokens) = match api {
            Api::Chat => {
                (text_chars(&json["messages"]), json["max_tokens"].as_u64().or(json["max_completion_tokens"].as_u64()))
            }
            Api::Anthropic => {
                (text_chars(&json["messages"]) + text_chars(&json["system"]), json["max_tokens"].as_u64())
            }
            Api::Responses => {
                (text_chars(&json["input"]) + text_chars(&json["instructions"]), json["max_output_tokens"].as_u64())
            }
            Api::Gemini => (
                text_chars(&json["contents"]) + text_chars(&json["systemInstruction"]),
                json["generationConfig"]["maxOutputTokens"].as_u64(),
            ),
        };
        LlmRequest {
            model: json["model"].as_str().unwrap_or("mock-model").to_string(),
            prompt_tokens: text.div_ceil(4),
            max_tokens: max_tokens.map(|n| n.clamp(1, MAX_OUTPUT_TOKENS)),
            stream: api != Api::Gemini && json["stream"] == true,
            include_usage: json["stream_options"]["include_usage"] == true,
        }
    }

    /// The reply's length in tokens: `wanted` (the `x-mock-output-tokens` header or the
    /// `--output-tokens` setting) capped by the request's max tokens; without it, the
    /// max tokens, else 16.
    pub fn completion_tokens(&self, wanted: Option<u64>) -> u64 {
        match (wanted, self.max_tokens) {
            (Some(w), Some(max)) => w.min(max),
            (Some(w), None) => w,
            (None, Some(max)) => max,
            (None, None) => DEFAULT_COMPLETION_TOKENS,
        }
    }
}

/// Characters of text in message contents: plain strings, content-part arrays
/// (`[{"type":"text","text":...}]`), Anthropic system blocks, Responses input
/// items and Gemini `parts` alike.
fn text_chars(v: &Value) -> u64 {
    match v {
        Value::String(s) => s.chars().count() as u64,
        Value::Array(items) => items.iter().map(text_chars).sum(),
        Value::Object(o) => ["content", "text", "parts"].iter().filter_map(|k| o.get(*k)).map(text_chars).sum(),
        _ => 0,
    }
}

/// Cycled to make reply text. Has a 2-byte (é) and a 3-byte (—) character, so stream
/// chunks split inside UTF-8 characters now and then.
const PHRASE: &str = "Mock reply — the café's résumé, streamed in small pieces to test token counts. ";

/// Exactly `4 * tokens` characters of text, so text/4 is the token count.
pub fn reply_text(tokens: u64) -> String {
    PHRASE.chars().cycle().take((4 * tokens) as usize).collect()
}

/// One answer, ready to render in its API's shape.
pub struct Reply {
    pub api: Api,
    pub id: u64,
    /// Unix seconds.
    pub created: u64,
    pub model: String,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub text: String,
    /// OpenAI chat streams: add the final usage chunk.
    pub include_usage: bool,
}

impl Reply {
    pub fn new(api: Api, id: u64, created: u64, request: &LlmRequest, output_tokens: u64) -> Self {
        Reply {
            api,
            id,
            created,
            model: request.model.clone(),
            input_tokens: request.prompt_tokens,
            output_tokens,
            text: reply_text(output_tokens),
            include_usage: request.include_usage,
        }
    }

    /// The usage this reply reports (or would, for a chat stream without include_usage).
    pub fn usage(&self) -> (u64, u64) {
        (self.input_tokens, self.output_tokens)
    }

    /// The whole, non-streamed body.
    pub fn json(&self) -> Value {
        let (p, c) = self.usage();
        match self.api {
            Api::Chat => json!({
                "id": format!("chatcmpl-mock-{}", self.id),
                "object": "chat.completion",
                "created": self.created,
                "model": self.model,
                "choices": [{
                    "index": 0,
                    "message": {"role": "assistant", "content": self.text},
                    "finish_reason": "stop",
                }],
                "usage": {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c},
            }),
            Api::Responses => self.response(
                "completed",
                &self.text,
                json!({
                    "input_tokens": p, "output_tokens": c, "total_tokens": p + c,
                }),
            ),
            Api::Anthropic => json!({
                "id": format!("msg_mock_{}", self.id),
                "type": "message",
                "role": "assistant",
                "model": self.model,
                "content": [{"type": "text", "text": self.text}],
                "stop_reason": "end_turn",
                "stop_sequence": null,
                "usage": {"input_tokens": p, "output_tokens": c},
            }),
            Api::Gemini => self.gemini_chunk(&self.text, true),
        }
    }

    /// The bytes of the streamed answer (`Framing::Sse` or `Framing::JsonArray`).
    pub fn stream_bytes(&self, framing: Framing) -> Vec<u8> {
        match framing {
            Framing::JsonArray => json_array(&self.gemini_chunks()),
            // Gemini ends its SSE lines with CRLF.
            _ if self.api == Api::Gemini => sse(&self.events(), "\r\n"),
            _ => sse(&self.events(), "\n"),
        }
    }

    /// The events of the streamed answer, in order.
    pub fn events(&self) -> Vec<Event> {
        match self.api {
            Api::Chat => self.chat_events(),
            Api::Responses => self.responses_events(),
            Api::Anthropic => self.anthropic_events(),
            Api::Gemini => self.gemini_chunks().into_iter().map(|c| Event::data(&c)).collect(),
        }
    }

    fn chat_events(&self) -> Vec<Event> {
        let chunk = |delta: Value, finish: Value| {
            let mut c = json!({
                "id": format!("chatcmpl-mock-{}", self.id),
                "object": "chat.completion.chunk",
                "created": self.created,
                "model": self.model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            });
            if self.include_usage {
                c["usage"] = Value::Null; // as OpenAI sends it on every chunk but the last
            }
            Event::data(&c)
        };
        let mut events = vec![chunk(json!({"role": "assistant", "content": ""}), Value::Null)];
        events.extend(deltas(&self.text).map(|d| chunk(json!({"content": d}), Value::Null)));
        events.push(chunk(json!({}), json!("stop")));
        if self.include_usage {
            let (p, c) = self.usage();
            events.push(Event::data(&json!({
                "id": format!("chatcmpl-mock-{}", self.id),
                "object": "chat.completion.chunk",
                "created": self.created,
                "model": self.model,
                "choices": [],
                "usage": {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c},
            })));
        }
        events.push(Event { name: None, data: "[DONE]".into() });
        events
    }

    /// A Responses `response` object with one output message holding `text`.
    fn response(&self, status: &str, text: &str, usage: Value) -> Value {
        let output = if status == "completed" { vec![self.message_item("completed", text)] } else { vec![] };
        json!({
            "id": format!("resp_mock_{}", self.id),
            "object": "response",
            "created_at": self.created,
            "status": status,
            "model": self.model,
            "output": output,
            "usage": usage,
        })
    }

    fn message_item(&self, status: &str, text: &str) -> Value {
        let content = if status == "completed" { vec![output_text(text)] } else { vec![] };
        json!({
            "type": "message",
            "id": format!("msg_mock_{}", self.id),
            "status": status,
            "role": "assistant",
            "content": content,
        })
    }

    fn responses_events(&self) -> Vec<Event> {
        let item_id = format!("msg_mock_{}", self.id);
        let at = json!({"item_id": item_id, "output_index": 0, "content_index": 0});
        let with = |kind: &str, base: &Value, extra: Value| {
            let mut v = base.clone();
            v["type"] = json!(kind);
            for (k, x) in extra.as_object().expect("an object") {
                v[k] = x.clone();
            }
            v
        };
        let none = json!({});
        let mut events = vec![
            with("response.created", &none, json!({"response": self.response("in_progress", "", Value::Null)})),
            with(
                "response.output_item.added",
                &none,
                json!({"output_index": 0, "item": self.message_item("in_progress", "")}),
            ),
            with("response.content_part.added", &at, json!({"part": output_text("")})),
        ];
        events.extend(deltas(&self.text).map(|d| with("response.output_text.delta", &at, json!({"delta": d}))));
        events.extend([
            with("response.output_text.done", &at, json!({"text": self.text})),
            with("response.content_part.done", &at, json!({"part": output_text(&self.text)})),
            with(
                "response.output_item.done",
                &none,
                json!({"output_index": 0, "item": self.message_item("completed", &self.text)}),
            ),
            with("response.completed", &none, json!({"response": self.json()})),
        ]);
        events
            .into_iter()
            .enumerate()
            .map(|(i, mut v)| {
                v["sequence_number"] = json!(i);
                let name = v["type"].as_str().expect("a type").to_string();
                Event { name: Some(name), data: v.to_string() }
            })
            .collect()
    }

    fn anthropic_events(&self) -> Vec<Event> {
        let named =
            |v: Value| Event { name: Some(v["type"].as_str().expect("a type").to_string()), data: v.to_string() };
        let mut start = self.json();
        start["content"] = json!([]);
        start["stop_reason"] = Value::Null;
        start["usage"] = json!({"input_tokens": self.input_tokens, "output_tokens": 1});
        let mut events = vec![
            named(json!({"type": "message_start", "message": start})),
            named(json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}})),
            named(json!({"type": "ping"})),
        ];
        events.extend(deltas(&self.text).map(|d| {
            named(json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": d}}))
        }));
        events.extend([
            named(json!({"type": "content_block_stop", "index": 0})),
            named(json!({
                "type": "message_delta",
                "delta": {"stop_reason": "end_turn", "stop_sequence": null},
                "usage": {"output_tokens": self.output_tokens},
            })),
            named(json!({"type": "message_stop"})),
        ]);
        events
    }

    /// Gemini stream chunks: each with some text and the prompt count; the last one
    /// also with the finish reason and the final counts.
    pub fn gemini_chunks(&self) -> Vec<Value> {
        let pieces: Vec<&str> = deltas(&self.text).collect();
        let last = pieces.len().saturating_sub(1);
        if pieces.is_empty() {
            return vec![self.gemini_chunk("", true)];
        }
        pieces.iter().enumerate().map(|(i, d)| self.gemini_chunk(d, i == last)).collect()
    }

    fn gemini_chunk(&self, text: &str, last: bool) -> Value {
        let (p, c) = self.usage();
        let mut candidate = json!({"content": {"parts": [{"text": text}], "role": "model"}, "index": 0});
        let mut usage = json!({"promptTokenCount": p});
        if last {
            candidate["finishReason"] = json!("STOP");
            usage = json!({"promptTokenCount": p, "candidatesTokenCount": c, "totalTokenCount": p + c});
        }
        json!({
            "candidates": [candidate],
            "usageMetadata": usage,
            "modelVersion": self.model,
            "responseId": format!("mock-{}", self.id),
        })
    }
}

fn output_text(text: &str) -> Value {
    json!({"type": "output_text", "text": text, "annotations": []})
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stream::{parse_sse, split};

    #[test]
    fn estimates_tokens() {
        let r = LlmRequest::parse(
            Api::Chat,
            br#"{"model":"gpt-4o","max_tokens":100,"messages":[
            {"role":"user","content":"12345678"},
            {"role":"user","content":[{"type":"text","text":"abcd"},{"type":"image_url","image_url":{"url":"x"}}]}]}"#,
        );
        assert_eq!((r.model.as_str(), r.prompt_tokens, r.completion_tokens(None)), ("gpt-4o", 3, 100));
        assert!(!r.stream);

        let body = br#"{"system":[{"type":"text","text":"12345"}],"messages":[],"max_tokens":99999,"stream":true}"#;
        let r = LlmRequest::parse(Api::Anthropic, body);
        assert_eq!((r.model.as_str(), r.prompt_tokens, r.completion_tokens(None)), ("mock-model", 2, 4096));
        assert!(r.stream);

        let r = LlmRequest::parse(Api::Chat, b"not json at all");
        assert_eq!((r.prompt_tokens, r.completion_tokens(None)), (4, 16));
        assert_eq!(LlmRequest::parse(Api::Chat, b"").prompt_tokens, 0);
    }

    #[test]
    fn estimates_responses_and_gemini_input() {
        let body = br#"{"model":"gpt-4.1","instructions":"1234","max_output_tokens":50,
            "input":[{"role":"user","content":[{"type":"input_text","text":"12345678"}]}]}"#;
        let r = LlmRequest::parse(Api::Responses, body);
        assert_eq!((r.prompt_tokens, r.max_tokens), (3, Some(50)));
        assert_eq!(LlmRequest::parse(Api::Responses, br#"{"input":"12345"}"#).prompt_tokens, 2);

        let body = br#"{"contents":[{"role":"user","parts":[{"text":"12345678"},{"text":"12"}]}],
            "systemInstruction":{"parts":[{"text":"12"}]},"generationConfig":{"maxOutputTokens":7},"stream":true}"#;
        let r = LlmRequest::parse(Api::Gemini, body);
        assert_eq!((r.prompt_tokens, r.max_tokens, r.stream), (3, Some(7), false));
    }

    #[test]
    fn wanted_output_is_capped_by_max_tokens() {
        let r = LlmRequest::parse(Api::Chat, br#"{"max_tokens":100}"#);
        assert_eq!((r.completion_tokens(Some(30)), r.completion_tokens(Some(300))), (30, 100));
        let r = LlmRequest::parse(Api::Chat, br#"{}"#);
        assert_eq!((r.completion_tokens(Some(30)), r.completion_tokens(None)), (30, 16));
        assert_eq!(LlmRequest::parse(Api::Chat, br#"{"max_completion_tokens":0}"#).completion_tokens(None), 1);
    }

    #[test]
    fn reply_text_is_four_chars_a_token() {
        assert_eq!(reply_text(0), "");
        assert_eq!(reply_text(3).chars().count(), 12);
        let long = reply_text(40);
        assert_eq!(long.chars().count(), 160);
        assert!(long.contains('é') && long.contains('—'));
    }

    fn reply(api: Api, include_usage: bool) -> Reply {
        let body = format!(
            r#"{{"model":"m","max_tokens":25,"max_output_tokens":25,"generationConfig":{{"maxOutputTokens":25}},"stream":true,"stream_options":{{"include_usage":{include_usage}}},
               "messages":[{{"role":"user","content":"{}"}}],"input":"{}","contents":[{{"parts":[{{"text":"{}"}}]}}]}}"#,
            "x".repeat(40),
            "x".repeat(40),
            "x".repeat(40)
        );
        let request = LlmRequest::parse(api, body.as_bytes());
        Reply::new(api, 7, 1_700_000_000, &request, request.completion_tokens(None))
    }

    /// Input and output tokens and the generated text, read back from the JSON shape.
    fn read_json(api: Api, v: &Value) -> (u64, u64, String) {
        let n = |v: &Value| v.as_u64().expect("a count");
        match api {
            Api::Chat => (
                n(&v["usage"]["prompt_tokens"]),
                n(&v["usage"]["completion_tokens"]),
                v["choices"][0]["message"]["content"].as_str().unwrap().into(),
            ),
            Api::Responses => {
                assert_eq!(v["object"], "response");
                assert_eq!(
                    n(&v["usage"]["total_tokens"]),
                    n(&v["usage"]["input_tokens"]) + n(&v["usage"]["output_tokens"])
                );
                (
                    n(&v["usage"]["input_tokens"]),
                    n(&v["usage"]["output_tokens"]),
                    v["output"][0]["content"][0]["text"].as_str().unwrap().into(),
                )
            }
            Api::Anthropic => (
                n(&v["usage"]["input_tokens"]),
                n(&v["usage"]["output_tokens"]),
                v["content"][0]["text"].as_str().unwrap().into(),
            ),
            Api::Gemini => {
                let u = &v["usageMetadata"];
                assert_eq!(n(&u["totalTokenCount"]), n(&u["promptTokenCount"]) + n(&u["candidatesTokenCount"]));
                (
                    n(&u["promptTokenCount"]),
                    n(&u["candidatesTokenCount"]),
                    v["candidates"][0]["content"]["parts"][0]["text"].as_str().unwrap().into(),
                )
            }
        }
    }

    #[test]
    fn json_shapes_report_usage_and_text() {
        for api in [Api::Chat, Api::Responses, Api::Anthropic, Api::Gemini] {
            let r = reply(api, false);
            assert_eq!(read_json(api, &r.json()), (10, 25, reply_text(25)), "{api:?}");
        }
    }

    /// Reads usage and text back from a stream the way a proxy would: the last usage
    /// wins (Anthropic's input from message_start, output from the last message_delta).
    fn read_stream(api: Api, events: &[(Option<String>, String)]) -> (Option<u64>, Option<u64>, String) {
        let (mut input, mut output, mut text) = (None, None, String::new());
        for (name, data) in events {
            if data == "[DONE]" {
                assert_eq!(api, Api::Chat);
                continue;
            }
            let v: Value = serde_json::from_str(data).expect("JSON data");
            if let Some(name) = name {
                assert_eq!(v["type"].as_str(), Some(name.as_str()), "event name repeats the type");
            }
            match api {
                Api::Chat => {
                    assert_eq!(v["object"], "chat.completion.chunk");
                    if let Some(d) = v["choices"][0]["delta"]["content"].as_str() {
                        text += d;
                    }
                    if v["usage"].is_object() {
                        assert_eq!(v["choices"], json!([]));
                        input = v["usage"]["prompt_tokens"].as_u64();
                        output = v["usage"]["completion_tokens"].as_u64();
                    }
                }
                Api::Responses => match v["type"].as_str().unwrap() {
                    "response.output_text.delta" => text += v["delta"].as_str().unwrap(),
                    "response.completed" => {
                        input = v["response"]["usage"]["input_tokens"].as_u64();
                        output = v["response"]["usage"]["output_tokens"].as_u64();
                    }
                    _ => assert!(v["response"]["usage"].is_null()),
                },
                Api::Anthropic => match v["type"].as_str().unwrap() {
                    "message_start" => {
                        input = v["message"]["usage"]["input_tokens"].as_u64();
                        output = v["message"]["usage"]["output_tokens"].as_u64();
                    }
                    "content_block_delta" => text += v["delta"]["text"].as_str().unwrap(),
                    "message_delta" => output = v["usage"]["output_tokens"].as_u64(),
                    _ => {}
                },
                Api::Gemini => {
                    text += v["candidates"][0]["content"]["parts"][0]["text"].as_str().unwrap();
                    input = v["usageMetadata"]["promptTokenCount"].as_u64();
                    output = v["usageMetadata"]["candidatesTokenCount"].as_u64();
                }
            }
        }
        (input, output, text)
    }

    #[test]
    fn sse_shapes_report_usage_once_reassembled() {
        for (api, include_usage) in [
            (Api::Chat, true),
            (Api::Chat, false),
            (Api::Responses, false),
            (Api::Anthropic, false),
            (Api::Gemini, false),
        ] {
            let r = reply(api, include_usage);
            let events = r.events();
            assert!(events.len() > 5, "{api:?}: several deltas");
            let wire: Vec<u8> = split(&r.stream_bytes(Framing::Sse)).concat();
            let parsed = parse_sse(std::str::from_utf8(&wire).unwrap());
            let expected = if api == Api::Chat && !include_usage { (None, None) } else { (Some(10), Some(25)) };
            let (input, output, text) = read_stream(api, &parsed);
            assert_eq!(((input, output), text), (expected, reply_text(25)), "{api:?}");
        }
    }

    #[test]
    fn stream_framing() {
        let wire =
            |api, include_usage| String::from_utf8(reply(api, include_usage).stream_bytes(Framing::Sse)).unwrap();
        let chat = wire(Api::Chat, true);
        assert!(chat.starts_with("data: {") && !chat.contains("event:") && !chat.contains('\r'), "{chat}");
        assert!(chat.ends_with("\"total_tokens\":35}}\n\ndata: [DONE]\n\n"), "{chat}");

        let anthropic = wire(Api::Anthropic, false);
        assert!(anthropic.starts_with("event: message_start\ndata: {"), "{anthropic}");
        assert!(anthropic.ends_with("event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n"), "{anthropic}");

        let responses = wire(Api::Responses, false);
        assert!(responses.starts_with("event: response.created\ndata: {"), "{responses}");
        assert!(responses.contains("event: response.output_text.delta\ndata: {"));
        assert!(responses.contains("event: response.completed\ndata: {"));

        let gemini = wire(Api::Gemini, false);
        assert!(gemini.starts_with("data: {") && gemini.ends_with("}\r\n\r\n"), "{gemini}");

        let r = reply(Api::Gemini, false);
        let array: Value = serde_json::from_slice(&r.stream_bytes(Framing::JsonArray)).unwrap();
        let chunks = array.as_array().unwrap();
        assert!(chunks.len() > 5);
        assert_eq!(chunks.last().unwrap()["usageMetadata"]["totalTokenCount"], 35);
        assert_eq!(chunks[0]["usageMetadata"], json!({"promptTokenCount": 10}));
    }
}
