//! How many tokens a request will use, estimated from its JSON body before it is sent.
//!
//! [`from_body`] reads an OpenAI, Anthropic, Gemini (or Vertex) or Bedrock Converse request;
//! [`from_size`] is for a body that was not read. Both are pure and never panic: anything not
//! understood falls back to the body's size, never to 0 for a non-empty body.
//!
//! ```
//! use llm_ratelimit::tokens::estimate::{from_body, from_size, from_unread, EstimateRules};
//!
//! let rules = EstimateRules::default(); // 4 chars per token, 1024 output tokens, 1000 per image
//! let body = br#"{"model":"gpt-4o","max_tokens":100,"stream":true,
//!     "messages":[{"role":"user","content":"Say hello in twelve words."}]}"#;
//! let e = from_body(&rules, "/v1/chat/completions", body);
//! assert_eq!((e.input, e.output, e.total()), (7, 100, 107)); // 26 chars / 4, rounded up
//! assert_eq!((e.model.as_deref(), e.stream), (Some("gpt-4o"), true));
//!
//! let body = br#"{"contents":[{"parts":[{"text":"Hi"},{"inlineData":{"mimeType":"image/png","data":"iVBO"}}]}]}"#;
//! let e = from_body(&rules, "/v1beta/models/gemini-1.5-pro:streamGenerateContent?alt=sse", body);
//! assert_eq!((e.input, e.output), (1 + 1000, 1024));
//! assert_eq!((e.model.as_deref(), e.stream), (Some("gemini-1.5-pro"), true));
//!
//! assert_eq!(from_size(&rules, 4_001).input, 1001);
//! let e = from_unread(&rules, "/v1beta/models/gemini-2.0-flash:generateContent", 4_000_000);
//! assert_eq!((e.input, e.model.as_deref()), (1_000_000, Some("gemini-2.0-flash")));
//! ```
//!
//! # Input tokens
//!
//! `ceil(chars / chars_per_token) + token ids + media parts × image_tokens`, where `chars` counts
//! Unicode characters (not bytes) of the prompt text:
//! - OpenAI chat / completions / embeddings: `messages[]` (`content` as a string or text parts,
//!   `name`, `tool_calls[].function.{name,arguments}`, legacy `function_call`), `prompt` and
//!   `input` (a string, strings, or token ids: each number in them counts as one token).
//! - OpenAI Responses: `instructions`; `input` as a string or items: messages (`input_text` /
//!   `output_text` parts), `function_call` (`name`, `arguments`), `function_call_output` (`output`).
//! - Anthropic messages: `system`; `messages[].content` blocks: `text`, `tool_use` (`name` and the
//!   JSON text of `input`), `tool_result` (its `content`, recursively), `document` with a plain
//!   text source (its `data`).
//! - Gemini: `contents[].parts[]` and `systemInstruction.parts[]`: `text`, `functionCall`
//!   (`name`, JSON of `args`), `functionResponse` (`name`, JSON of `response`); snake_case too.
//! - Bedrock Converse: `system[].text`, `messages[].content[]` (`text`, `toolUse` with the JSON of
//!   its `input`, `toolResult` with its `content`, whose `json` parts count as JSON text).
//! - Tool definitions: the compact JSON text of `tools`, `functions` and `toolConfig`, whatever
//!   its shape (as for all JSON counted: an escape counts as one character, a fraction as 8).
//!
//! Each media part costs a flat `image_tokens`, whatever its size (its base64 is never counted as
//! text): parts typed `image_url`, `input_image`, `image`, `input_audio`, `audio`, `file`,
//! `input_file`, `document` (other than plain text), and parts with a Gemini `inlineData` /
//! `fileData` or a Bedrock `image` / `document` / `video` field. Roles, ids, message framing and
//! anything else (e.g. `response_format`) are not counted.
//!
//! A body that is not a JSON object (not JSON, invalid UTF-8, nested deeper than serde_json's 128
//! levels) or in which none of the above is found counts as [`from_size`]: `ceil(bytes /
//! chars_per_token)`. That over-counts JSON syntax and base64 media, which is the safe side.
//!
//! # Output tokens
//!
//! The requested maximum, the largest valid one of `max_completion_tokens`, `max_tokens`,
//! `max_output_tokens` (Responses), `generationConfig.maxOutputTokens` (Gemini, also
//! `generation_config.max_output_tokens`) and `inferenceConfig.maxTokens` (Bedrock Converse):
//! a body with several may be answered under any of them; without one, `output_default`. A negative or non-numeric value (string, null) is skipped; a
//! fraction is rounded up; anything above [`MAX_OUTPUT_TOKENS`] (10^9) is clamped to it, so
//! the caller should further cap it at what its limits can ever grant. The maximum is multiplied
//! by the number of choices asked for, OpenAI `n` or Gemini `generationConfig.candidateCount`
//! (a whole number, clamped to 1..=[`MAX_CHOICES`]).
//!
//! # Model and streaming
//!
//! `model` is the one the path names (its query string ignored): Gemini / Vertex
//! `.../models/<model>:<method>`, Azure `/openai/deployments/<deployment>/...` (the deployment
//! name) or Bedrock `/model/<model-id>/<action>`; else the body's `model` string. The path's is
//! the model served: Azure ignores the body's. [`model`](super::model) picks its bucket. `stream` is the body's
//! `"stream": true`, or a path whose method starts with `stream` (Gemini `:streamGenerateContent`,
//! Vertex `:streamRawPredict`) or ends with `-stream` (Bedrock `converse-stream`,
//! `invoke-with-response-stream`).

use serde_json::{Map, Value};

/// Output maxima above this are clamped to it.
pub const MAX_OUTPUT_TOKENS: u64 = 1_000_000_000;
/// `n` / `candidateCount` above this are clamped to it.
pub const MAX_CHOICES: u64 = 128;
/// Walks deeper than this into a body stop counting (serde_json already refuses > 128 levels).
const MAX_DEPTH: u32 = 64;

/// How to turn a request into tokens.
#[derive(Clone, Debug, PartialEq)]
pub struct EstimateRules {
    /// Characters of text per token (4 for English with OpenAI/Anthropic tokenizers). A value
    /// that is not a finite number > 0 is taken as 4.
    pub chars_per_token: f64,
    /// Output tokens of a request that does not state its maximum.
    pub output_default: u64,
    /// Flat cost of one image, audio or file part (OpenAI: 85 to ~1100 per image by size and
    /// detail; Anthropic: ~1600 for a 1092x1092 image; Gemini: 258 per image).
    pub image_tokens: u64,
}

impl Default for EstimateRules {
    fn default() -> Self {
        EstimateRules { chars_per_token: 4.0, output_default: 1024, image_tokens: 1000 }
    }
}

/// What a request will use.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Estimate {
    pub input: u64,
    /// The requested maximum output, times the choices asked for.
    pub output: u64,
    pub model: Option<String>,
    pub stream: bool,
}

impl Estimate {
    /// Input plus output, saturating.
    pub fn total(&self) -> u64 {
        self.input.saturating_add(self.output)
    }
}

/// The estimate for a whole request body; `path` is the request path (Gemini, Azure and Bedrock
/// put the model in it).
pub fn from_body(rules: &EstimateRules, path: &str, body: &[u8]) -> Estimate {
    let (path_model, path_stream) = read_path(path);
    let Ok(Value::Object(root)) = serde_json::from_slice::<Value>(body) else {
        let model = path_model.map(str::to_owned);
        return Estimate { model, stream: path_stream, ..from_size(rules, body.len() as u64) };
    };
    let mut count = Count::default();
    for key in PROMPT_KEYS {
        if let Some(v) = root.get(key) {
            count.walk(v, 0);
        }
    }
    for key in ["tools", "functions", "toolConfig"] {
        if let Some(v) = root.get(key) {
            count.json(v, 0);
        }
    }
    let input = if count.is_empty() {
        text_tokens(rules, body.len() as u64)
    } else {
        text_tokens(rules, count.chars)
            .saturating_add(count.tokens)
            .saturating_add(count.media.saturating_mul(rules.image_tokens))
    };
    let output = requested_output(&root).unwrap_or(rules.output_default).saturating_mul(choices(&root));
    // The path's model is the one served (Azure ignores the body's): it wins.
    let model = path_model.or_else(|| root.get("model").and_then(Value::as_str).filter(|m| !m.is_empty()));
    let stream = root.get("stream") == Some(&Value::Bool(true)) || path_stream;
    Estimate { input, output, model: model.map(str::to_owned), stream }
}

/// The estimate for a body that was not read (too large, or not JSON): its input from its size.
pub fn from_size(rules: &EstimateRules, bytes: u64) -> Estimate {
    Estimate { input: text_tokens(rules, bytes), output: rules.output_default, model: None, stream: false }
}

/// The estimate for a body of `bytes` that was not read (too large to hold): its size, and the
/// model and streaming the path names.
pub fn from_unread(rules: &EstimateRules, path: &str, bytes: u64) -> Estimate {
    let (model, stream) = read_path(path);
    Estimate { model: model.map(str::to_owned), stream, ..from_size(rules, bytes) }
}

/// `ceil(chars / chars_per_token)`, saturating.
fn text_tokens(rules: &EstimateRules, chars: u64) -> u64 {
    let per_token = rules.chars_per_token;
    let per_token = if per_token.is_finite() && per_token > 0.0 { per_token } else { 4.0 };
    // Float-to-int casts saturate (and a NaN would be 0), so this cannot panic.
    (chars as f64 / per_token).ceil() as u64
}

/// What the prompt holds.
#[derive(Default)]
struct Count {
    /// Characters of text.
    chars: u64,
    /// Token ids (legacy `prompt`, embeddings `input`).
    tokens: u64,
    /// Image, audio and file parts.
    media: u64,
}

/// Top-level fields holding the prompt.
const PROMPT_KEYS: [&str; 8] =
    ["messages", "prompt", "input", "instructions", "system", "contents", "systemInstruction", "system_instruction"];
/// Fields of a message or part whose text is counted (strings) or walked into.
const WALK_KEYS: [&str; 13] = [
    "text",
    "content",
    "parts",
    "name",
    "output",
    "tool_calls",
    "function",
    "function_call",
    "functionCall",
    "functionResponse",
    "function_response",
    "toolUse",
    "toolResult",
];
/// Fields whose JSON text is counted (or the string itself).
const JSON_KEYS: [&str; 5] = ["arguments", "input", "args", "response", "json"];
/// `type`s of parts that cost a flat `image_tokens`.
const MEDIA_TYPES: [&str; 8] =
    ["image_url", "input_image", "image", "input_audio", "audio", "file", "input_file", "document"];
/// Fields that make a part a media part (Gemini, Bedrock Converse).
const MEDIA_KEYS: [&str; 7] = ["inlineData", "inline_data", "fileData", "file_data", "image", "document", "video"];

impl Count {
    fn is_empty(&self) -> bool {
        self.chars == 0 && self.tokens == 0 && self.media == 0
    }

    fn text(&mut self, text: &str) {
        self.chars = self.chars.saturating_add(text.chars().count() as u64);
    }

    /// The text of a prompt, message, content or part.
    fn walk(&mut self, value: &Value, depth: u32) {
        if depth > MAX_DEPTH {
            return;
        }
        match value {
            Value::String(text) => self.text(text),
            Value::Number(_) => self.tokens = self.tokens.saturating_add(1),
            Value::Array(items) => items.iter().for_each(|item| self.walk(item, depth + 1)),
            Value::Object(part) => self.part(part, depth),
            Value::Null | Value::Bool(_) => {}
        }
    }

    fn part(&mut self, part: &Map<String, Value>, depth: u32) {
        let kind = part.get("type").and_then(Value::as_str).unwrap_or("");
        let source = part.get("source");
        if kind == "document" && source.and_then(|s| s.get("type")).and_then(Value::as_str) == Some("text") {
            return self.walk(source.and_then(|s| s.get("data")).unwrap_or(&Value::Null), depth + 1);
        }
        if MEDIA_TYPES.contains(&kind) || MEDIA_KEYS.iter().any(|key| part.contains_key(*key)) {
            self.media = self.media.saturating_add(1);
            return;
        }
        for key in WALK_KEYS {
            if let Some(value) = part.get(key) {
                self.walk(value, depth + 1);
            }
        }
        for key in JSON_KEYS {
            match part.get(key) {
                Some(Value::String(text)) => self.text(text),
                Some(value) => self.json(value, depth + 1),
                None => {}
            }
        }
    }

    /// The characters of `value` written as compact JSON, counting an escape as one character and
    /// a number that is not a whole number as 8 (no serialiser in the .wasm).
    fn json(&mut self, value: &Value, depth: u32) {
        let digits = |n: u64| n.checked_ilog10().map_or(1, |log| u64::from(log) + 1);
        let chars = match value {
            Value::Null | Value::Bool(true) => 4,
            Value::Bool(false) => 5,
            Value::Number(n) => match (n.as_u64(), n.as_i64()) {
                (Some(n), _) => digits(n),
                (None, Some(n)) => digits(n.unsigned_abs()) + 1,
                _ => 8,
            },
            Value::String(text) => text.chars().count() as u64 + 2,
            // Brackets and commas.
            Value::Array(items) => {
                if depth <= MAX_DEPTH {
                    items.iter().for_each(|item| self.json(item, depth + 1));
                }
                items.len().max(1) as u64 + 1
            }
            // Braces, and per key its quotes, colon and comma.
            Value::Object(map) => {
                if depth <= MAX_DEPTH {
                    map.values().for_each(|item| self.json(item, depth + 1));
                }
                map.keys().map(|key| key.chars().count() as u64 + 4).sum::<u64>().saturating_add(1).max(2)
            }
        };
        self.chars = self.chars.saturating_add(chars);
    }
}

/// The largest valid requested output maximum: a body may carry several (`max_tokens` beside
/// `max_completion_tokens`), and which one the provider honours is its own business.
fn requested_output(root: &Map<String, Value>) -> Option<u64> {
    let nested = |outer: &str, inner: &str| root.get(outer).and_then(|o| o.get(inner));
    [
        root.get("max_completion_tokens"),
        root.get("max_tokens"),
        root.get("max_output_tokens"),
        nested("generationConfig", "maxOutputTokens"),
        nested("generation_config", "max_output_tokens"),
        nested("inferenceConfig", "maxTokens"),
    ]
    .into_iter()
    .flatten()
    .filter_map(|v| v.as_f64().filter(|n| *n >= 0.0).map(|n| n.ceil().min(MAX_OUTPUT_TOKENS as f64) as u64))
    .max()
}

/// OpenAI `n` or Gemini `candidateCount`, in 1..=MAX_CHOICES; 1 when absent or not a whole number.
fn choices(root: &Map<String, Value>) -> u64 {
    let nested = |outer: &str, inner: &str| root.get(outer).and_then(|o| o.get(inner));
    [root.get("n"), nested("generationConfig", "candidateCount"), nested("generation_config", "candidate_count")]
        .into_iter()
        .flatten()
        .find_map(Value::as_u64)
        .map_or(1, |n| n.clamp(1, MAX_CHOICES))
}

/// The model the path names, if any: Gemini / Vertex `.../models/<model>:<method>`, Azure
/// `/openai/deployments/<deployment>/...`, Bedrock `/model/<model-id>/<action>`.
pub fn path_model(path: &str) -> Option<&str> {
    read_path(path).0
}

/// The model named by the path, and whether the path asks for a stream.
fn read_path(path: &str) -> (Option<&str>, bool) {
    let path = path.split(['?', '#']).next().unwrap_or("");
    let segment_after = |marker: &str, ends: &[char]| {
        let rest = path.get(path.rfind(marker)? + marker.len()..)?;
        rest.split(ends).next().filter(|m| !m.is_empty())
    };
    let model = segment_after("/models/", &[':', '/'])
        .or_else(|| segment_after("/deployments/", &['/']))
        .or_else(|| segment_after("/model/", &['/']));
    let last = path.rsplit('/').next().unwrap_or("");
    let method = last.rsplit_once(':').map_or("", |(_, method)| method);
    (model, method.starts_with("stream") || last.ends_with("-stream"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    /// One token per character, so `input` is the character count plus flat costs.
    const ONE: EstimateRules = EstimateRules { chars_per_token: 1.0, output_default: 1024, image_tokens: 1000 };

    fn est(path: &str, body: &Value) -> Estimate {
        from_body(&ONE, path, body.to_string().as_bytes())
    }

    fn chars(text: &str) -> u64 {
        text.chars().count() as u64
    }

    fn json_chars(value: &Value) -> u64 {
        chars(&value.to_string())
    }

    #[test]
    fn openai_chat_counts_message_text_only() {
        let body = br#"{"model":"gpt-4o-mini","messages":[{"role":"system","content":"You are a helpful assistant."},
            {"role":"user","content":"Hello!"}],"temperature":0.7}"#;
        let e = from_body(&ONE, "/v1/chat/completions", body);
        assert_eq!(e, Estimate { input: 28 + 6, output: 1024, model: Some("gpt-4o-mini".into()), stream: false });
        let e = from_body(&EstimateRules::default(), "/v1/chat/completions", body);
        assert_eq!((e.input, e.total()), (9, 9 + 1024), "34 chars / 4, rounded up");
    }

    #[test]
    fn openai_chat_parts_count_text_and_a_flat_cost_per_image_audio_and_file() {
        let body = json!({"model": "gpt-4o", "max_tokens": 300, "messages": [{"role": "user", "content": [
            {"type": "text", "text": "What is in this image?"},
            {"type": "image_url",
                "image_url": {"url": "data:image/jpeg;base64,/9j/4AAQSkZJRgABAQAAAQABAAD", "detail": "high"}},
            {"type": "input_audio", "input_audio": {"data": "UklGRiQAAABXQVZFZm10IBAAAAABAAEA", "format": "wav"}},
            {"type": "file", "file": {"filename": "draft.pdf", "file_data": "data:application/pdf;base64,JVBERi0xLjQK"}}
        ]}]});
        let e = est("/v1/chat/completions", &body);
        assert_eq!((e.input, e.output), (22 + 3 * 1000, 300));
        let rules = EstimateRules { image_tokens: 85, ..ONE };
        assert_eq!(from_body(&rules, "", body.to_string().as_bytes()).input, 22 + 3 * 85);
    }

    #[test]
    fn openai_tool_calls_results_and_tool_definitions_count() {
        let tools = json!([{"type": "function", "function": {"name": "get_weather", "description": "Get the weather",
            "parameters": {"type": "object", "properties": {"location": {"type": "string"}},
                "required": ["location"]}}}]);
        let body = json!({"model": "gpt-4o", "tools": tools, "tool_choice": "auto", "messages": [
            {"role": "user", "content": "What's the weather in Boston?"},
            {"role": "assistant", "content": null, "tool_calls": [{"id": "call_abc", "type": "function",
                "function": {"name": "get_weather", "arguments": "{\"location\":\"Boston, MA\"}"}}]},
            {"role": "tool", "tool_call_id": "call_abc", "content": "{\"temp\":72}"}
        ]});
        assert_eq!(est("/v1/chat/completions", &body).input, 29 + 11 + 25 + 11 + json_chars(&tools));
        let legacy = json!({"messages": [{"role": "assistant", "content": null,
            "function_call": {"name": "f", "arguments": "{}"}}], "functions": [{"name": "f"}]});
        assert_eq!(est("", &legacy).input, 1 + 2 + json_chars(&json!([{"name": "f"}])));
    }

    #[test]
    fn legacy_completions_prompt_as_string_strings_or_token_ids() {
        let body = json!({"model": "gpt-3.5-turbo-instruct", "prompt": "Say this is a test", "max_tokens": 7});
        assert_eq!((est("/v1/completions", &body).input, est("", &body).output), (18, 7));
        assert_eq!(est("", &json!({"prompt": ["abc", "défg"]})).input, 7);
        assert_eq!(est("", &json!({"prompt": [[1212, 318], [257]]})).input, 3, "one token per id");
    }

    #[test]
    fn embeddings_input_as_string_strings_or_token_ids() {
        let text = "The food was delicious and the waiter...";
        let body = json!({"input": text, "model": "text-embedding-3-small", "encoding_format": "float"});
        assert_eq!(est("/v1/embeddings", &body).input, chars(text));
        assert_eq!(est("", &json!({"input": [text, "abc"]})).input, chars(text) + 3);
        assert_eq!(est("", &json!({"input": [1, 2, 3, 4]})).input, 4);
    }

    #[test]
    fn responses_api_string_input_and_instructions() {
        let body = json!({"model": "gpt-4.1", "instructions": "Talk like a pirate.",
            "input": "Are semicolons optional in JavaScript?", "max_output_tokens": 500, "stream": true});
        let e = est("/v1/responses", &body);
        assert_eq!(e, Estimate { input: 19 + 38, output: 500, model: Some("gpt-4.1".into()), stream: true });
    }

    #[test]
    fn responses_api_items_parts_and_function_calls() {
        let tools = json!([{"type": "function", "name": "get_weather", "parameters": {"type": "object"}}]);
        let body = json!({"model": "o4-mini", "tools": tools, "input": [
            {"role": "user", "content": [
                {"type": "input_text", "text": "what is in this image?"},
                {"type": "input_image", "image_url": "https://upload.wikimedia.org/x.jpg", "detail": "auto"},
                {"type": "input_file", "file_id": "file-6F2ksmvXxt4VdoqmHRw6kL"}]},
            {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": "{\"city\":\"Paris\"}"},
            {"type": "function_call_output", "call_id": "call_1", "output": "{\"temp\":18}"},
            {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "It is 18C."}]}
        ]});
        assert_eq!(est("/v1/responses", &body).input, 22 + 2000 + 11 + 16 + 11 + 10 + json_chars(&tools));
    }

    #[test]
    fn anthropic_messages_system_blocks_tools_images_and_documents() {
        let tools = json!([{"name": "get_weather", "description": "Get the current weather",
            "input_schema": {"type": "object", "properties": {"location": {"type": "string"}},
                "required": ["location"]}}]);
        let tool_input = json!({"location": "San Francisco, CA"});
        let body = json!({
            "model": "claude-3-5-sonnet-20241022", "max_tokens": 1024, "stream": true, "tools": tools,
            "system": [{"type": "text", "text": "You are a weather bot.", "cache_control": {"type": "ephemeral"}}],
            "messages": [
                {"role": "user", "content": [
                    {"type": "image", "source": {"type": "base64", "media_type": "image/jpeg", "data": "/9j/4AAQ"}},
                    {"type": "text", "text": "Describe."}]},
                {"role": "assistant", "content": [{"type": "text", "text": "Checking."},
                    {"type": "tool_use", "id": "toolu_01A09q90qw90lq917835lq9", "name": "get_weather",
                        "input": tool_input}]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_01A09q90qw90lq917835lq9",
                        "content": [{"type": "text", "text": "15 degrees"}]},
                    {"type": "document",
                        "source": {"type": "text", "media_type": "text/plain", "data": "The grass is green."}},
                    {"type": "document",
                        "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBERi0x"}}]}
            ]
        });
        let e = est("/v1/messages", &body);
        let text = 22 + 9 + 9 + 11 + json_chars(&tool_input) + 10 + 19;
        assert_eq!(e.input, text + 2 * 1000 + json_chars(&tools));
        assert_eq!((e.output, e.model.as_deref(), e.stream), (1024, Some("claude-3-5-sonnet-20241022"), true));
        let plain = json!({"model": "claude-3-haiku-20240307", "max_tokens": 64, "system": "Be terse.",
            "messages": [{"role": "user", "content": "Hello, Claude"}, {"role": "assistant", "content": "Hi"},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": "sunny"}]}]});
        assert_eq!((est("/v1/messages", &plain).input, est("", &plain).output), (9 + 13 + 2 + 5, 64));
    }

    #[test]
    fn gemini_parts_system_instruction_tools_and_model_from_the_path() {
        let tools = json!([{"functionDeclarations": [{"name": "find_movies", "description": "find movies",
            "parameters": {"type": "object", "properties": {"location": {"type": "string"}}}}]}]);
        let args = json!({"location": "Mountain View, CA"});
        let response = json!({"movies": ["Barbie", "Oppenheimer"]});
        let body = json!({"systemInstruction": {"parts": [{"text": "You are a cat."}]}, "tools": tools,
            "contents": [
                {"role": "user", "parts": [{"text": "Tell me about this file"},
                    {"fileData": {"mimeType": "application/pdf", "fileUri": "gs://cloud-samples-data/file.pdf"}},
                    {"inlineData": {"mimeType": "image/jpeg", "data": "/9j/4AAQSkZJRgABAQ"}}]},
                {"role": "model", "parts": [{"functionCall": {"name": "find_movies", "args": args}}]},
                {"role": "user", "parts": [{"functionResponse": {"name": "find_movies", "response": response}}]}],
            "generationConfig": {"temperature": 0.9, "maxOutputTokens": 2048, "candidateCount": 1}});
        let e = est("/v1beta/models/gemini-1.5-pro:generateContent", &body);
        let text = 14 + 23 + 11 + json_chars(&args) + 11 + json_chars(&response);
        assert_eq!(e.input, text + 2 * 1000 + json_chars(&tools));
        assert_eq!((e.output, e.model.as_deref(), e.stream), (2048, Some("gemini-1.5-pro"), false));
    }

    #[test]
    fn gemini_snake_case_fields_and_streaming_path() {
        let body = json!({"system_instruction": {"parts": {"text": "Meow."}},
            "contents": {"parts": [{"text": "Hi"}, {"inline_data": {"mime_type": "image/png", "data": "iVBOR"}},
                {"file_data": {"file_uri": "gs://b/v.mp4"}}]},
            "generation_config": {"max_output_tokens": 64, "candidate_count": 2}});
        let e = est("/v1beta/models/gemini-2.0-flash:streamGenerateContent?alt=sse&key=AIza", &body);
        assert_eq!((e.input, e.output), (5 + 2 + 2000, 128));
        assert_eq!((e.model.as_deref(), e.stream), (Some("gemini-2.0-flash"), true));
    }

    #[test]
    fn bedrock_converse_text_media_tools_and_max_tokens() {
        let input = json!({"sign": "WZPZ"});
        let song = json!({"song": "Elemental"});
        let tool_config =
            json!({"tools": [{"toolSpec": {"name": "top_song", "inputSchema": {"json": {"type": "object"}}}}]});
        let body = json!({"system": [{"text": "Be brief."}], "toolConfig": tool_config,
            "messages": [
                {"role": "user", "content": [{"text": "Describe"},
                    {"image": {"format": "png", "source": {"bytes": "iVBORw0KGgo"}}},
                    {"document": {"format": "pdf", "name": "doc", "source": {"bytes": "JVBERi0x"}}}]},
                {"role": "assistant",
                    "content": [{"toolUse": {"toolUseId": "t1", "name": "top_song", "input": input}}]},
                {"role": "user", "content": [{"toolResult": {"toolUseId": "t1", "content": [{"json": song}]}}]}],
            "inferenceConfig": {"maxTokens": 512, "temperature": 0.5}});
        let e = est("/model/anthropic.claude-3-5-sonnet-20240620-v1:0/converse-stream", &body);
        assert_eq!(e.input, 9 + 8 + 2000 + 8 + json_chars(&input) + json_chars(&song) + json_chars(&tool_config));
        assert_eq!(
            (e.output, e.model.as_deref(), e.stream),
            (512, Some("anthropic.claude-3-5-sonnet-20240620-v1:0"), true)
        );
    }

    #[test]
    fn tool_json_is_counted_as_compact_json_text() {
        for value in [
            json!([]),
            json!({}),
            json!([{}, []]),
            json!({"a": [1, 22, -333, 0, null, true, false, "é", ""]}),
            json!({"min": i64::MIN, "max": u64::MAX, "nested": {"k": {"k": []}}}),
        ] {
            let mut count = Count::default();
            count.json(&value, 0);
            assert_eq!(count.chars, json_chars(&value), "{value}");
        }
        let value = json!({"t": 0.5, "s": "a\"b\n"});
        let mut count = Count::default();
        count.json(&value, 0);
        assert_eq!((json_chars(&value), count.chars), (22, 22 + 5 - 2), "a fraction is 8, an escape 1");
    }

    #[test]
    fn multibyte_text_counts_characters_not_bytes() {
        let text = "héllo wörld 你好 👋🏽";
        assert_eq!((chars(text), text.len()), (17, 29));
        let body = json!({"messages": [{"role": "user", "content": text}]});
        assert_eq!(est("", &body).input, 17);
        assert_eq!(from_body(&EstimateRules::default(), "", body.to_string().as_bytes()).input, 5);
        assert_eq!(from_body(&ONE, "", br#"{"prompt":"caf\u00e9"}"#).input, 4, "escapes are decoded");
        assert_eq!(from_body(&ONE, "", r#"{"tools":[{"d":"é"}]}"#.as_bytes()).input, 11, "tool JSON in chars");
    }

    #[test]
    fn every_output_maximum_field_is_read() {
        for (body, output) in [
            (json!({"max_completion_tokens": 10}), 10),
            (json!({"max_tokens": 20}), 20),
            (json!({"max_output_tokens": 30}), 30),
            (json!({"generationConfig": {"maxOutputTokens": 40}}), 40),
            (json!({"generation_config": {"max_output_tokens": 50}}), 50),
            (json!({"inferenceConfig": {"maxTokens": 60}}), 60),
            (json!({"max_tokens": 20, "max_completion_tokens": 10}), 20),
            (json!({"max_completion_tokens": null, "max_tokens": 20}), 20),
            (json!({"temperature": 1}), 1024),
        ] {
            assert_eq!(est("", &body).output, output, "{body}");
        }
    }

    #[test]
    fn the_largest_output_maximum_present_counts() {
        // A provider honours the field it reads, which may be any of them: the largest is safe.
        for (body, output) in [
            (json!({"max_completion_tokens": 1, "max_tokens": 4096}), 4096),
            (json!({"max_tokens": 4096, "max_completion_tokens": 1}), 4096),
            (json!({"max_tokens": 20, "max_output_tokens": 30}), 30),
            (json!({"generationConfig": {"maxOutputTokens": 40}, "generation_config": {"max_output_tokens": 50}}), 50),
            (json!({"max_tokens": 7, "inferenceConfig": {"maxTokens": 60}}), 60),
            (json!({"max_completion_tokens": -1, "max_tokens": 5}), 5),
            (json!({"max_completion_tokens": "9000", "max_tokens": 5}), 5),
            (json!({"max_completion_tokens": 0, "max_tokens": 0}), 0),
            (json!({"max_completion_tokens": 2.5, "max_tokens": 2}), 3),
            (json!({"n": 2, "max_tokens": 5, "max_completion_tokens": 9}), 18),
        ] {
            assert_eq!(est("", &body).output, output, "{body}");
        }
    }

    #[test]
    fn absurd_output_maxima_are_skipped_rounded_or_clamped() {
        for (max, output) in [
            (json!(-5), 1024),
            (json!(-0.5), 1024),
            (json!("100"), 1024),
            (json!(true), 1024),
            (json!({"n": 1}), 1024),
            (json!(0), 0),
            (json!(100.2), 101),
            (json!(1e12), MAX_OUTPUT_TOKENS),
            (json!(1e308), MAX_OUTPUT_TOKENS),
            (json!(u64::MAX), MAX_OUTPUT_TOKENS),
        ] {
            assert_eq!(est("", &json!({"prompt": "x", "max_tokens": max})).output, output, "{max}");
        }
        let body = br#"{"prompt":"x","max_completion_tokens":-1,"max_tokens":184467440737095516160000}"#;
        assert_eq!(from_body(&ONE, "", body).output, MAX_OUTPUT_TOKENS);
        let body = br#"{"prompt":"x","max_tokens":1e400}"#;
        let e = from_body(&ONE, "", body);
        assert_eq!(e, from_size(&ONE, body.len() as u64), "a number serde_json refuses makes the body unreadable");
    }

    #[test]
    fn choices_multiply_the_output() {
        for (body, output) in [
            (json!({"n": 3, "max_tokens": 100}), 300),
            (json!({"n": 0, "max_tokens": 100}), 100),
            (json!({"n": -2, "max_tokens": 100}), 100),
            (json!({"n": 2.5, "max_tokens": 100}), 100),
            (json!({"n": 1000, "max_tokens": 100}), 100 * MAX_CHOICES),
            (json!({"n": u64::MAX, "max_tokens": 1e300}), MAX_OUTPUT_TOKENS * MAX_CHOICES),
            (json!({"n": 2}), 2048),
            (json!({"generationConfig": {"candidateCount": 4, "maxOutputTokens": 10}}), 40),
        ] {
            assert_eq!(est("", &body).output, output, "{body}");
        }
    }

    #[test]
    fn model_and_stream_from_body_or_path() {
        let vertex = |rest: &str| format!("/v1/projects/p/locations/us-east5/publishers/{rest}");
        for (path, model, stream) in [
            ("/v1beta/models/gemini-1.5-pro:generateContent", Some("gemini-1.5-pro"), false),
            ("/v1beta/models/gemini-1.5-pro:countTokens", Some("gemini-1.5-pro"), false),
            ("/v1beta/models/gemini-2.0-flash:streamGenerateContent?alt=sse", Some("gemini-2.0-flash"), true),
            (&vertex("google/models/gemini-1.5-flash-002:streamGenerateContent"), Some("gemini-1.5-flash-002"), true),
            (
                &vertex("anthropic/models/claude-3-5-sonnet-v2@20241022:rawPredict"),
                Some("claude-3-5-sonnet-v2@20241022"),
                false,
            ),
            (&vertex("anthropic/models/claude-3-opus@20240229:streamRawPredict"), Some("claude-3-opus@20240229"), true),
            ("/openai/deployments/gpt-4o-prod/chat/completions?api-version=2024-10-21", Some("gpt-4o-prod"), false),
            (
                "/model/amazon.titan-text-express-v1/invoke-with-response-stream",
                Some("amazon.titan-text-express-v1"),
                true,
            ),
            ("/model/meta.llama3-8b-instruct-v1:0/invoke", Some("meta.llama3-8b-instruct-v1:0"), false),
            ("/v1/chat/completions", None, false),
            ("/v1/chat/completions?stream=true:streamX", None, false),
            ("/v1beta/models/:generateContent", None, false),
            ("/models/", None, false),
            ("", None, false),
            ("::::///models/é:stream", Some("é"), true),
        ] {
            let e = est(path, &json!({"contents": [{"parts": [{"text": "hi"}]}]}));
            assert_eq!((e.model.as_deref(), e.stream), (model, stream), "{path}");
        }
        let body = json!({"model": "gpt-4o", "stream": true, "prompt": "x"});
        let e = est("/openai/deployments/prod/completions", &body);
        assert_eq!((e.model.as_deref(), e.stream), (Some("prod"), true), "the path's model wins");
        assert_eq!(est("/v1/completions", &body).model.as_deref(), Some("gpt-4o"), "else the body's");
        for stream in [json!(false), json!("true"), json!(1), json!(null)] {
            assert!(!est("", &json!({"prompt": "x", "stream": stream})).stream, "{stream}");
        }
        assert_eq!(est("/model/x/invoke", &json!({"model": "", "prompt": "x"})).model.as_deref(), Some("x"));
        assert_eq!(est("", &json!({"model": 42, "prompt": "x"})).model, None);
    }

    #[test]
    fn unreadable_bodies_count_their_size_and_keep_the_path() {
        let rules = EstimateRules::default();
        let truncated = br#"{"model":"gpt-4o","messages":[{"role":"user","content":"Hel"#;
        let e = from_body(&rules, "/v1beta/models/gemini-pro:streamGenerateContent", truncated);
        assert_eq!((e.input, e.output), (from_size(&rules, truncated.len() as u64).input, 1024));
        assert_eq!((e.model.as_deref(), e.stream), (Some("gemini-pro"), true));
        let bodies: [&[u8]; 9] =
            [b"null", b"[1,2,3]", b"\"hello world\"", b"42", b"   ", b"\xff\xfe{}", b"<html>", b"{}", b"{\"a\":1}{}"];
        for body in bodies {
            let e = from_body(&rules, "/v1/chat/completions", body);
            assert_eq!(e, from_size(&rules, body.len() as u64), "{:?}", String::from_utf8_lossy(body));
            assert!(e.input > 0);
        }
    }

    #[test]
    fn known_shapes_without_text_count_the_body_size() {
        for body in [
            json!({"model": "gpt-4o", "messages": []}),
            json!({"messages": [{"role": "user", "content": ""}], "max_tokens": 5}),
            json!({"query": "a request of an API this module does not know", "max_tokens": 5}),
            json!({"input": {"unknown": "object"}}),
            json!({"prompt": {"id": "pmpt_123", "variables": {"city": "Paris"}}}),
        ] {
            let bytes = body.to_string().len() as u64;
            let e = est("", &body);
            assert_eq!(e.input, bytes, "{body}");
        }
        let e = est("", &json!({"messages": [], "max_tokens": 5, "model": "m"}));
        assert_eq!((e.output, e.model.as_deref()), (5, Some("m")), "output and model are still read");
    }

    #[test]
    fn empty_body_costs_only_the_default_output() {
        let e = from_body(&EstimateRules::default(), "/v1/chat/completions", b"");
        assert_eq!(e, Estimate { input: 0, output: 1024, model: None, stream: false });
        assert_eq!(e.total(), 1024);
    }

    #[test]
    fn from_size_rounds_up() {
        let rules = EstimateRules::default();
        for (bytes, input) in [(0, 0), (1, 1), (4, 1), (5, 2), (4_001, 1_001), (u64::MAX, u64::MAX / 4 + 1)] {
            assert_eq!(from_size(&rules, bytes), Estimate { input, output: 1024, model: None, stream: false });
        }
        assert_eq!(from_size(&EstimateRules { chars_per_token: 3.5, ..rules }, 7).input, 2);
    }

    #[test]
    fn deep_nesting_does_not_overflow_the_stack() {
        let rules = EstimateRules::default();
        let open = "[".repeat(10_000);
        assert_eq!(from_body(&rules, "", open.as_bytes()), from_size(&rules, 10_000));
        let balanced = format!("{open}{}", "]".repeat(10_000));
        assert_eq!(from_body(&rules, "", balanced.as_bytes()), from_size(&rules, 20_000));
        let objects = format!("{}1{}", r#"{"content":"#.repeat(10_000), "}".repeat(10_000));
        assert_eq!(from_body(&rules, "", objects.as_bytes()).input, from_size(&rules, objects.len() as u64).input);
        // Within serde_json's 128 levels but past MAX_DEPTH: parsed, the deep text is not counted.
        let deep = format!(r#"{{"messages":{}"deep"{},"prompt":"ab"}}"#, "[".repeat(120), "]".repeat(120));
        assert_eq!(from_body(&ONE, "", deep.as_bytes()).input, 2);
        let deep = format!(r#"{{"messages":{}"deep"{}}}"#, r#"{"content":"#.repeat(100), "}".repeat(100));
        assert_eq!(from_body(&ONE, "", deep.as_bytes()).input, deep.len() as u64);
        let deep = format!(r#"{{"tools":{}"deep"{}}}"#, "[".repeat(120), "]".repeat(120));
        assert!(from_body(&ONE, "", deep.as_bytes()).input > 2 * MAX_DEPTH as u64, "brackets past MAX_DEPTH count");
    }

    #[test]
    fn large_prompts_count_every_character() {
        let text = "a".repeat(1_000_000);
        let body = json!({"messages": [{"role": "user", "content": text}]});
        assert_eq!(from_body(&EstimateRules::default(), "", body.to_string().as_bytes()).input, 250_000);
    }

    #[test]
    fn odd_rules_neither_panic_nor_wrap() {
        let body = json!({"n": 3, "messages": [{"role": "user", "content": [{"type": "text", "text": "12345678"},
            {"type": "image_url",
                "image_url": {"url": "x"}}, {"type": "image_url",
                "image_url": {"url": "y"}}]}]})
        .to_string();
        for per_token in [0.0, -1.0, f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            let rules = EstimateRules { chars_per_token: per_token, ..EstimateRules::default() };
            assert_eq!(from_body(&rules, "", body.as_bytes()).input, 2 + 2000, "{per_token} is taken as 4");
            assert_eq!(from_size(&rules, 8).input, 2);
        }
        let rules = EstimateRules { chars_per_token: 1e-300, output_default: u64::MAX, image_tokens: u64::MAX };
        let e = from_body(&rules, "", body.as_bytes());
        assert_eq!((e.input, e.output, e.total()), (u64::MAX, u64::MAX, u64::MAX));
        assert_eq!(from_size(&rules, 1).input, u64::MAX);
    }
}
