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
//!
//! # How the body is read
//!
//! In one pass over its bytes, in place ([`Scan`]): strings are checked and their characters
//! counted where they lie, everything not needed is checked and skipped, and nothing is
//! allocated but the model's name. The pass accepts only what serde_json accepts, and reads
//! what it accepts as serde_json's `Value` would: where it cannot be sure of that (a key written
//! with an escape, a key repeated where serde_json would keep only the last, more than 32 keys
//! in one object of counted JSON) it gives up, and the body is read into a `Value` instead.

use serde_json::{Map, Number, Value};

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
    let tree;
    let fields = match Fields::scan(body) {
        Some(fields) => Some(fields),
        None => {
            tree = serde_json::from_slice::<Value>(body);
            tree.as_ref().ok().and_then(Value::as_object).map(Fields::of)
        }
    };
    estimate(rules, path, body.len() as u64, fields)
}

/// The estimate for a body of `bytes` whose fields are read (`None`: not a JSON object).
fn estimate(rules: &EstimateRules, path: &str, bytes: u64, fields: Option<Fields>) -> Estimate {
    let (path_model, path_stream) = read_path(path);
    let Some(fields) = fields else {
        return Estimate { model: path_model.map(str::to_owned), stream: path_stream, ..from_size(rules, bytes) };
    };
    let count = &fields.count;
    let input = if count.is_empty() {
        text_tokens(rules, bytes)
    } else {
        text_tokens(rules, count.chars)
            .saturating_add(count.tokens)
            .saturating_add(count.media.saturating_mul(rules.image_tokens))
    };
    let output = fields.output().unwrap_or(rules.output_default).saturating_mul(fields.choices());
    // The path's model is the one served (Azure ignores the body's): it wins.
    let model = path_model.or(fields.model.filter(|m| !m.is_empty()));
    Estimate { input, output, model: model.map(str::to_owned), stream: fields.stream || path_stream }
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
#[derive(Clone, Copy, Debug, Default, PartialEq)]
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
/// Top-level fields whose JSON text is counted (tool definitions).
const TOOL_KEYS: [&str; 3] = ["tools", "functions", "toolConfig"];
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
/// The numbers read, by their index in [`Fields::numbers`]: top-level fields, then fields of
/// top-level objects. 0 to 5 are output maxima, 6 to 8 choices, each group in its order of
/// precedence.
const NUMBERS: [(&str, usize); 4] =
    [("max_completion_tokens", 0), ("max_tokens", 1), ("max_output_tokens", 2), ("n", 6)];
const NESTED_NUMBERS: [(&str, &[(&str, usize)]); 3] = [
    ("generationConfig", &[("maxOutputTokens", 3), ("candidateCount", 7)]),
    ("generation_config", &[("max_output_tokens", 4), ("candidate_count", 8)]),
    ("inferenceConfig", &[("maxTokens", 5)]),
];
/// The most keys an object of counted JSON may have for [`Scan`] to find a repeated one.
const MAX_KEYS: usize = 32;

/// What a request body says.
#[derive(Debug, Default)]
struct Fields<'a> {
    count: Count,
    /// The numbers of [`NUMBERS`] and [`NESTED_NUMBERS`] present (absent, or not a number: `None`).
    numbers: [Option<Number>; 9],
    model: Option<&'a str>,
    stream: bool,
}

impl<'a> Fields<'a> {
    /// The fields of a body read into a `Value`.
    fn of(root: &'a Map<String, Value>) -> Fields<'a> {
        let mut count = Count::default();
        for key in PROMPT_KEYS {
            if let Some(v) = root.get(key) {
                count.walk(v, 0);
            }
        }
        for key in TOOL_KEYS {
            if let Some(v) = root.get(key) {
                count.json(v, 0);
            }
        }
        let mut numbers: [Option<Number>; 9] = Default::default();
        let number = |v: Option<&Value>| v.and_then(Value::as_number).cloned();
        for (key, at) in NUMBERS {
            numbers[at] = number(root.get(key));
        }
        for (outer, inner) in NESTED_NUMBERS {
            for &(key, at) in inner {
                numbers[at] = number(root.get(outer).and_then(|o| o.get(key)));
            }
        }
        let model = root.get("model").and_then(Value::as_str);
        Fields { count, numbers, model, stream: root.get("stream") == Some(&Value::Bool(true)) }
    }

    /// The fields of a body read in place, or `None` to leave it to serde_json (see [`Scan`]).
    fn scan(body: &'a [u8]) -> Option<Fields<'a>> {
        let mut s = Scan::new(body);
        let mut f = Fields::default();
        let mut counted = 0u32;
        s.open(b'{')?;
        let mut first = true;
        while s.more(b'}', &mut first)? {
            let key = s.key()?;
            if let Some(i) = position(&PROMPT_KEYS, key) {
                once(&mut counted, i)?;
                f.count.add(s.walk(0)?);
            } else if let Some(i) = position(&TOOL_KEYS, key) {
                once(&mut counted, PROMPT_KEYS.len() + i)?;
                f.count.chars = f.count.chars.saturating_add(s.json(0)?);
            } else if is(key, "model") {
                f.model = s.str_or_skip()?;
            } else if is(key, "stream") {
                f.stream = s.peek()? == b't';
                s.skip()?;
            } else if let Some(&(_, at)) = NUMBERS.iter().find(|(k, _)| is(key, k)) {
                f.numbers[at] = s.number_or_skip()?;
            } else if let Some((_, inner)) = NESTED_NUMBERS.iter().find(|(k, _)| is(key, k)) {
                // A repeated object replaces the earlier one whole.
                inner.iter().for_each(|&(_, at)| f.numbers[at] = None);
                s.object(|s, key| {
                    match inner.iter().find(|(k, _)| is(key, k)) {
                        Some(&(_, at)) => f.numbers[at] = s.number_or_skip()?,
                        None => s.skip()?,
                    }
                    Some(())
                })?;
            } else {
                s.skip()?;
            }
        }
        s.end()?;
        Some(f)
    }

    /// The largest valid requested output maximum: a body may carry several (`max_tokens` beside
    /// `max_completion_tokens`), and which one the provider honours is its own business.
    fn output(&self) -> Option<u64> {
        let valid =
            |n: &Number| n.as_f64().filter(|n| *n >= 0.0).map(|n| n.ceil().min(MAX_OUTPUT_TOKENS as f64) as u64);
        self.numbers[..6].iter().flatten().filter_map(valid).max()
    }

    /// OpenAI `n` or Gemini `candidateCount`, in 1..=MAX_CHOICES; 1 when absent or not a whole number.
    fn choices(&self) -> u64 {
        self.numbers[6..].iter().flatten().find_map(Number::as_u64).map_or(1, |n| n.clamp(1, MAX_CHOICES))
    }
}

fn position(keys: &[&str], key: &[u8]) -> Option<usize> {
    keys.iter().position(|k| is(key, k))
}

/// Whether `key` is `name`, the lengths compared first: most names tried are not the key.
/// (Inlined, as `Scan::peek`: at opt-level "z" neither would be, and together they take a
/// quarter off reading a chat request in V8, for about 1 KB of .wasm.)
#[inline(always)]
fn is(key: &[u8], name: &str) -> bool {
    key.len() == name.len() && key == name.as_bytes()
}

/// Marks field `i` of an object as seen; `None` if it was: serde_json keeps a repeated key's last
/// value only, and a count cannot take back what the first added.
fn once(seen: &mut u32, i: usize) -> Option<()> {
    let bit = 1 << i;
    if *seen & bit != 0 {
        return None;
    }
    *seen |= bit;
    Some(())
}

impl Count {
    fn is_empty(&self) -> bool {
        self.chars == 0 && self.tokens == 0 && self.media == 0
    }

    fn add(&mut self, other: Count) {
        self.chars = self.chars.saturating_add(other.chars);
        self.tokens = self.tokens.saturating_add(other.tokens);
        self.media = self.media.saturating_add(other.media);
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
        let chars = match value {
            Value::Null | Value::Bool(true) => 4,
            Value::Bool(false) => 5,
            Value::Number(n) => number_chars(n),
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

/// The characters of a number written as JSON: its digits when whole, 8 otherwise.
fn number_chars(n: &Number) -> u64 {
    let digits = |n: u64| n.checked_ilog10().map_or(1, |log| u64::from(log) + 1);
    match (n.as_u64(), n.as_i64()) {
        (Some(n), _) => digits(n),
        (None, Some(n)) => digits(n.unsigned_abs()) + 1,
        _ => 8,
    }
}

/// A JSON text read in place, as serde_json reads it: each method reads one thing at the
/// position and returns `None` where serde_json would fail, and also where this reading leaves
/// the text to serde_json whole (a key written with an escape; see [`Fields::scan`] for the
/// rest). A caller given `None` reads the text into a `Value` instead, so `None` is always
/// safe: what matters is that nothing serde_json refuses is accepted here.
pub(super) struct Scan<'a> {
    bytes: &'a [u8],
    at: usize,
    /// Arrays and objects open.
    open: u32,
}

/// A string as it lies in the text: the bytes between its quotes (valid UTF-8), escapes not
/// decoded.
pub(super) struct Str<'a> {
    pub raw: &'a [u8],
    pub escaped: bool,
    /// Every byte is ASCII (so every byte a character).
    pub ascii: bool,
}

impl Str<'_> {
    /// Its characters once decoded: each escape is one (a surrogate pair one in all).
    pub fn chars(&self) -> u64 {
        let chars = if self.ascii { self.raw.len() as u64 } else { chars_of(self.raw) };
        if !self.escaped {
            return chars;
        }
        // Checked by `Scan::string`: a `\u` has four hex digits, and a trailing surrogate comes
        // right after a leading one.
        let (mut extra, mut rest) = (0, self.raw);
        while let Some(at) = rest.iter().position(|&b| b == b'\\') {
            let (len, less) = match rest.get(at + 1) {
                Some(b'u') => match rest.get(at + 2..at + 6).and_then(hex) {
                    Some(0xDC00..=0xDFFF) => (6, 6),
                    _ => (6, 5),
                },
                _ => (2, 1),
            };
            extra += less;
            rest = rest.get(at + len..).unwrap_or_default();
        }
        chars.saturating_sub(extra)
    }
}

/// How many bytes of `bytes` come before the first quote, backslash or control character (all
/// of them if none), read eight at a time; and whether those are all ASCII.
fn plain(bytes: &[u8]) -> (usize, bool) {
    const ONES: u64 = u64::from_le_bytes([1; 8]);
    const HIGH: u64 = ONES << 7;
    let (mut n, mut high) = (0, 0);
    let mut chunks = bytes.chunks_exact(8);
    for chunk in chunks.by_ref() {
        let word = u64::from_le_bytes(chunk.try_into().unwrap_or_default());
        // A byte's high bit is set where it is zero once XORed (the quote, the backslash) or
        // where it is below 0x20; the lowest such byte is exact (a borrow moves only upwards).
        let quote = word ^ (ONES * u64::from(b'"'));
        let backslash = word ^ (ONES * u64::from(b'\\'));
        let hits = (quote.wrapping_sub(ONES) & !quote
            | backslash.wrapping_sub(ONES) & !backslash
            | word.wrapping_sub(ONES * 0x20) & !word)
            & HIGH;
        if hits != 0 {
            let at = hits.trailing_zeros() / 8;
            // The bytes before the first hit.
            let before = if at == 0 { 0 } else { word & (u64::MAX >> (64 - 8 * at)) };
            return (n + at as usize, high | before & HIGH == 0);
        }
        high |= word & HIGH;
        n += 8;
    }
    let rest = chunks.remainder().iter().take_while(|&&b| b != b'"' && b != b'\\' && b >= 0x20);
    let (count, ascii) = rest.fold((0, true), |(count, ascii), &b| (count + 1, ascii && b.is_ascii()));
    (n + count, high == 0 && ascii)
}

/// Whether `bytes` are UTF-8, as `str::from_utf8` decides (the well-formed sequences of the
/// Unicode Standard's table 3-7), ASCII read eight bytes at a time: `from_utf8` built for size
/// costs a long answer's text more than all the rest of its reading.
fn utf8(bytes: &[u8]) -> bool {
    let mut at = 0;
    while let Some(&lead) = bytes.get(at) {
        if let Some(chunk) = bytes.get(at..at + 8) {
            if u64::from_le_bytes(chunk.try_into().unwrap_or_default()) & u64::from_le_bytes([0x80; 8]) == 0 {
                at += 8;
                continue;
            }
        }
        // The length of the sequence `lead` starts and the range of its second byte; any
        // further byte is in 0x80..=0xBF.
        let (len, second) = match lead {
            0x00..=0x7F => (1, 0..=0xFF),
            0xC2..=0xDF => (2, 0x80..=0xBF),
            0xE0 => (3, 0xA0..=0xBF),
            0xE1..=0xEC | 0xEE..=0xEF => (3, 0x80..=0xBF),
            0xED => (3, 0x80..=0x9F),
            0xF0 => (4, 0x90..=0xBF),
            0xF1..=0xF3 => (4, 0x80..=0xBF),
            0xF4 => (4, 0x80..=0x8F),
            _ => return false,
        };
        if len > 1 {
            let Some([next, rest @ ..]) = bytes.get(at + 1..at + len) else { return false };
            if !second.contains(next) || !rest.iter().all(|b| (0x80..=0xBF).contains(b)) {
                return false;
            }
        }
        at += len;
    }
    true
}

/// The characters of UTF-8: the bytes that do not continue one (0x80..=0xBF).
fn chars_of(utf8: &[u8]) -> u64 {
    utf8.iter().filter(|&&b| b as i8 >= -0x40).count() as u64
}

/// Four hex digits.
fn hex(digits: &[u8]) -> Option<u16> {
    digits.iter().try_fold(0u16, |n, &d| Some(n << 4 | (d as char).to_digit(16)? as u16))
}

impl<'a> Scan<'a> {
    pub(super) fn new(bytes: &'a [u8]) -> Self {
        Scan { bytes, at: 0, open: 0 }
    }

    /// The next byte after whitespace, not taken.
    #[inline(always)]
    pub(super) fn peek(&mut self) -> Option<u8> {
        while let Some(&b) = self.bytes.get(self.at) {
            if !matches!(b, b' ' | b'\n' | b'\t' | b'\r') {
                return Some(b);
            }
            self.at += 1;
        }
        None
    }

    /// Only whitespace is left.
    pub(super) fn end(&mut self) -> Option<()> {
        self.peek().is_none().then_some(())
    }

    /// Opens an array (`[`) or object (`{`): serde_json refuses a 128th level.
    pub(super) fn open(&mut self, bracket: u8) -> Option<()> {
        (self.peek()? == bracket && self.open < 127).then(|| {
            self.at += 1;
            self.open += 1;
        })
    }

    /// Before each item of the array or object opened: whether one follows (`first` is true
    /// before the first), or the closing bracket `close` was taken. An item must follow a comma.
    pub(super) fn more(&mut self, close: u8, first: &mut bool) -> Option<bool> {
        let b = self.peek()?;
        if !std::mem::take(first) {
            if b != close {
                (b == b',').then(|| self.at += 1)?;
                return Some(true);
            }
        } else if b != close {
            return Some(true);
        }
        self.at += 1;
        self.open -= 1;
        Some(false)
    }

    /// The members of the object at the position, each key (as [`key`](Self::key) reads it)
    /// given to `each` to read or skip its value; any other value is skipped. Whether it was an
    /// object.
    pub(super) fn object(&mut self, mut each: impl FnMut(&mut Self, &'a [u8]) -> Option<()>) -> Option<bool> {
        if self.peek()? != b'{' {
            return self.skip().map(|()| false);
        }
        self.open(b'{')?;
        let mut first = true;
        while self.more(b'}', &mut first)? {
            let key = self.key()?;
            each(self, key)?;
        }
        Some(true)
    }

    /// An object's next key (UTF-8, checked) and its colon; `None` for one written with an
    /// escape.
    pub(super) fn key(&mut self) -> Option<&'a [u8]> {
        let key = self.string()?;
        if key.escaped || self.peek()? != b':' {
            return None;
        }
        self.at += 1;
        Some(key.raw)
    }

    /// A string, checked as serde_json checks it: escapes valid (surrogates paired), no control
    /// characters, valid UTF-8.
    pub(super) fn string(&mut self) -> Option<Str<'a>> {
        if self.peek()? != b'"' {
            return None;
        }
        let start = self.at + 1;
        let (mut escaped, mut ascii) = (false, true);
        let mut at = start;
        loop {
            let (n, all_ascii) = plain(self.bytes.get(at..)?);
            at += n;
            ascii &= all_ascii;
            match *self.bytes.get(at)? {
                b'"' => break,
                b'\\' => {
                    escaped = true;
                    at = self.escape(at + 1)?;
                }
                _ => return None,
            }
        }
        let raw = self.bytes.get(start..at)?;
        // ASCII is UTF-8 (and escapes are ASCII).
        if !ascii && !utf8(raw) {
            return None;
        }
        self.at = at + 1;
        Some(Str { raw, escaped, ascii })
    }

    /// The escape after a backslash at `at`: where it ends.
    fn escape(&self, at: usize) -> Option<usize> {
        match self.bytes.get(at)? {
            b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => Some(at + 1),
            b'u' => {
                let n = hex(self.bytes.get(at + 1..at + 5)?)?;
                match n {
                    // A leading surrogate needs its trailing one, right after it.
                    0xD800..=0xDBFF => {
                        let pair = self.bytes.get(at + 5..at + 11)?;
                        let m = hex(pair.get(2..)?)?;
                        (pair.starts_with(b"\\u") && (0xDC00..=0xDFFF).contains(&m)).then_some(at + 11)
                    }
                    0xDC00..=0xDFFF => None,
                    _ => Some(at + 5),
                }
            }
            _ => None,
        }
    }

    /// A number, as serde_json reads it (a whole number within `u64` here, any other by serde_json).
    pub(super) fn number(&mut self) -> Option<Number> {
        self.peek()?;
        let start = self.at;
        while matches!(self.bytes.get(self.at), Some(b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E')) {
            self.at += 1;
        }
        // Whatever follows must end the value (`,`, `]`, `}`, whitespace, the end), which the
        // caller checks: serde_json reads no more of a number than this run of bytes.
        let text = self.bytes.get(start..self.at)?;
        if (1..=19).contains(&text.len()) && text.iter().all(u8::is_ascii_digit) && (text[0] != b'0' || text.len() == 1)
        {
            return Some(text.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0')).into());
        }
        match serde_json::from_slice(text) {
            Ok(Value::Number(n)) => Some(n),
            _ => None,
        }
    }

    /// `true`, `false` or `null`.
    fn literal(&mut self) -> Option<()> {
        let rest = self.bytes.get(self.at..)?;
        let len = [&b"true"[..], b"false", b"null"].iter().find(|word| rest.starts_with(word))?.len();
        self.at += len;
        Some(())
    }

    /// Any value, checked and skipped.
    pub(super) fn skip(&mut self) -> Option<()> {
        match self.peek()? {
            b'"' => self.string().map(drop),
            b'[' => {
                self.open(b'[')?;
                let mut first = true;
                while self.more(b']', &mut first)? {
                    self.skip()?;
                }
                Some(())
            }
            b'{' => self.object(|s, _| s.skip()).map(drop),
            b't' | b'f' | b'n' => self.literal(),
            _ => self.skip_number(),
        }
    }

    /// A number skipped: one written as a plain decimal (`-0.25`, `1.5`; no exponent, so never out
    /// of serde_json's range) is checked here; any other by [`number`](Self::number). A request's
    /// `temperature` or `top_p` then costs no serde_json parse.
    fn skip_number(&mut self) -> Option<()> {
        let rest = self.bytes.get(self.at..)?;
        let digits = |from: usize| rest.iter().skip(from).take_while(|b| b.is_ascii_digit()).count();
        let sign = usize::from(rest.first() == Some(&b'-'));
        let whole = digits(sign);
        let mut end = sign + whole;
        let leading_zero = whole > 1 && rest.get(sign) == Some(&b'0');
        if rest.get(end) == Some(&b'.') {
            let fraction = digits(end + 1);
            end += 1 + fraction;
            if fraction == 0 {
                return None;
            }
        }
        if whole == 0 || leading_zero || end > 300 || matches!(rest.get(end), Some(b'e' | b'E' | b'+' | b'-' | b'.')) {
            return self.number().map(drop);
        }
        self.at += end;
        Some(())
    }

    /// Any value, parsed by serde_json from its text (for the few small values kept whole).
    pub(super) fn value(&mut self) -> Option<Value> {
        self.peek()?;
        let start = self.at;
        self.skip()?;
        serde_json::from_slice(self.bytes.get(start..self.at)?).ok()
    }

    /// A string without escapes, or any other value skipped (`None` inside).
    fn str_or_skip(&mut self) -> Option<Option<&'a str>> {
        if self.peek()? != b'"' {
            return self.skip().map(|()| None);
        }
        let s = self.string()?;
        if s.escaped {
            return None;
        }
        std::str::from_utf8(s.raw).ok().map(Some)
    }

    /// A number, or any other value skipped (`None` inside).
    pub(super) fn number_or_skip(&mut self) -> Option<Option<Number>> {
        match self.peek()? {
            b'-' | b'0'..=b'9' => self.number().map(Some),
            _ => self.skip().map(|()| None),
        }
    }

    /// [`Count::walk`], reading the value.
    fn walk(&mut self, depth: u32) -> Option<Count> {
        let mut count = Count::default();
        if depth > MAX_DEPTH {
            self.skip()?;
            return Some(count);
        }
        match self.peek()? {
            b'"' => count.chars = self.string()?.chars(),
            b'[' => {
                self.open(b'[')?;
                let mut first = true;
                while self.more(b']', &mut first)? {
                    count.add(self.walk(depth + 1)?);
                }
            }
            b'{' => return self.part(depth),
            b't' | b'f' | b'n' => self.literal()?,
            _ => {
                self.number()?;
                count.tokens = 1;
            }
        }
        Some(count)
    }

    /// [`Count::part`], reading the object: what decides the part (its `type`, `source`, a
    /// media field) may come after its text, so the text is counted aside until the end.
    fn part(&mut self, depth: u32) -> Option<Count> {
        let (mut kind, mut text_source, mut media) = (None, None, false);
        let (mut text, mut counted) = (Count::default(), 0u32);
        self.open(b'{')?;
        let mut first = true;
        while self.more(b'}', &mut first)? {
            let key = self.key()?;
            if is(key, "type") {
                kind = self.str_or_skip()?;
            } else if is(key, "source") {
                text_source = self.source(depth)?;
            } else if position(&MEDIA_KEYS, key).is_some() {
                media = true;
                self.skip()?;
            } else if let Some(i) = position(&WALK_KEYS, key) {
                once(&mut counted, i)?;
                text.add(self.walk(depth + 1)?);
            } else if let Some(i) = position(&JSON_KEYS, key) {
                once(&mut counted, WALK_KEYS.len() + i)?;
                let chars = match self.peek()? {
                    b'"' => self.string()?.chars(),
                    _ => self.json(depth + 1)?,
                };
                text.chars = text.chars.saturating_add(chars);
            } else {
                self.skip()?;
            }
        }
        let kind = kind.unwrap_or("");
        Some(match text_source {
            Some(data) if kind == "document" => data,
            _ if position(&MEDIA_TYPES, kind.as_bytes()).is_some() || media => Count { media: 1, ..Count::default() },
            _ => text,
        })
    }

    /// A part's `source`: when it is an object of `"type": "text"`, the text of its `data`.
    fn source(&mut self, depth: u32) -> Option<Option<Count>> {
        let (mut text, mut data) = (false, Count::default());
        let object = self.object(|s, key| {
            match key {
                b"type" => text = s.str_or_skip()? == Some("text"),
                b"data" => data = s.walk(depth + 1)?,
                _ => s.skip()?,
            }
            Some(())
        })?;
        Some((object && text).then_some(data))
    }

    /// [`Count::json`], reading the value: its characters as compact JSON.
    fn json(&mut self, depth: u32) -> Option<u64> {
        let mut chars = 0u64;
        let mut inner = |s: &mut Self| -> Option<()> {
            let c = if depth <= MAX_DEPTH { s.json(depth + 1)? } else { s.skip().map(|()| 0)? };
            chars = chars.saturating_add(c);
            Some(())
        };
        let own = match self.peek()? {
            b'"' => self.string()?.chars() + 2,
            b'[' => {
                let mut items = 0u64;
                self.open(b'[')?;
                let mut first = true;
                while self.more(b']', &mut first)? {
                    items += 1;
                    inner(self)?;
                }
                items.max(1) + 1
            }
            b'{' => {
                // serde_json keeps one value per key: a repeated key is left to it.
                let mut keys: [&[u8]; MAX_KEYS] = [b""; MAX_KEYS];
                let mut n = 0;
                self.open(b'{')?;
                let mut first = true;
                while self.more(b'}', &mut first)? {
                    let key = self.key()?;
                    if keys[..n].contains(&key) {
                        return None;
                    }
                    *keys.get_mut(n)? = key;
                    n += 1;
                    inner(self)?;
                }
                keys[..n].iter().map(|key| chars_of(key) + 4).sum::<u64>().saturating_add(1).max(2)
            }
            b't' | b'n' => self.literal().map(|()| 4)?,
            b'f' => self.literal().map(|()| 5)?,
            _ => number_chars(&self.number()?),
        };
        Some(chars.saturating_add(own))
    }
}

/// The model the path names, if any: Gemini / Vertex `.../models/<model>:<method>`, Azure
/// `/openai/deployments/<deployment>/...`, Bedrock `/model/<model-id>/<action>`.
pub fn path_model(path: &str) -> Option<&str> {
    read_path(path).0
}

/// `text` up to byte `at` (all of it for `None`).
fn before(text: &str, at: Option<usize>) -> &str {
    text.get(..at.unwrap_or(text.len())).unwrap_or("")
}

/// `text` after the last `byte`, if any.
fn after(text: &str, byte: u8) -> Option<&str> {
    text.get(text.bytes().rposition(|b| b == byte)? + 1..)
}

/// The model named by the path, and whether the path asks for a stream.
fn read_path(path: &str) -> (Option<&str>, bool) {
    // Searched as bytes (every delimiter is ASCII, so every cut is at a character boundary):
    // `str`'s pattern searchers cost more than the whole walk of a short path.
    let path = before(path, path.bytes().position(|b| b == b'?' || b == b'#'));
    let segment_after = |marker: &str, ends: &[u8]| {
        let at = path.as_bytes().windows(marker.len()).rposition(|w| w == marker.as_bytes())?;
        let rest = path.get(at + marker.len()..)?;
        Some(before(rest, rest.bytes().position(|b| ends.contains(&b)))).filter(|m| !m.is_empty())
    };
    let model = segment_after("/models/", b":/")
        .or_else(|| segment_after("/deployments/", b"/"))
        .or_else(|| segment_after("/model/", b"/"));
    let last = after(path, b'/').unwrap_or(path);
    let method = after(last, b':').unwrap_or("");
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
        let body = body.to_string();
        let e = from_body(&ONE, path, body.as_bytes());
        assert!(Fields::scan(body.as_bytes()).is_some(), "read in place: {body}");
        assert_eq!(e, by_value(&ONE, path, body.as_bytes()), "{body}");
        e
    }

    /// The estimate with the body read into a `Value`, as it was before the in-place reading:
    /// what `from_body` must always give.
    fn by_value(rules: &EstimateRules, path: &str, body: &[u8]) -> Estimate {
        let tree = serde_json::from_slice::<Value>(body);
        estimate(rules, path, body.len() as u64, tree.as_ref().ok().and_then(Value::as_object).map(Fields::of))
    }

    /// Asserts that `body` reads the same in place as through a `Value`; whether it was read in
    /// place (not left to serde_json).
    fn same(body: &[u8]) -> bool {
        for (rules, path) in
            [(&ONE, "/v1/chat/completions"), (&EstimateRules::default(), "/v1beta/models/g:generateContent")]
        {
            let e = from_body(rules, path, body);
            assert_eq!(e, by_value(rules, path, body), "{:?}", String::from_utf8_lossy(body));
        }
        let scanned = Fields::scan(body).is_some();
        if scanned {
            assert!(
                serde_json::from_slice::<Value>(body).is_ok(),
                "accepted in place only: {:?}",
                String::from_utf8_lossy(body)
            );
        }
        scanned
    }

    /// A tiny seeded LCG.
    struct Lcg(u64);

    impl Lcg {
        fn below(&mut self, n: usize) -> usize {
            self.0 = self.0.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
            (self.0 >> 33) as usize % n.max(1)
        }

        fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
            items[self.below(items.len())]
        }
    }

    /// Strings, numbers and keys that JSON readers differ on, some not JSON at all.
    const STRINGS: [&str; 16] = [
        "",
        "hi",
        "caf\\u00e9",
        "\\ud83d\\ude00",
        "a\\nb",
        "\\\"q\\\"",
        "\\\\",
        "\\/",
        "é👋🏽",
        "\\u0000",
        "text",
        "document",
        "image_url",
        "\\ud800",
        "\\udc00x",
        "\\x",
    ];
    const NUMBERS_TEXT: [&str; 26] = [
        "0",
        "7",
        "-0",
        "12",
        "-12",
        "2.5",
        "1e3",
        "1E-3",
        "-0.0",
        "18446744073709551615",
        "18446744073709551616",
        "-9223372036854775808",
        "-9223372036854775809",
        "123456789012345678901234567890",
        "1e400",
        "01",
        "1.",
        "-",
        "0.2",
        "-0.25",
        "01.5",
        "1.5.3",
        "-01",
        "00",
        "0.",
        "1.0e",
    ];
    const KEYS: [&str; 40] = [
        "messages",
        "prompt",
        "input",
        "instructions",
        "system",
        "contents",
        "systemInstruction",
        "tools",
        "functions",
        "toolConfig",
        "model",
        "stream",
        "max_tokens",
        "max_completion_tokens",
        "max_output_tokens",
        "n",
        "generationConfig",
        "maxOutputTokens",
        "candidateCount",
        "inferenceConfig",
        "maxTokens",
        "type",
        "source",
        "data",
        "text",
        "content",
        "parts",
        "name",
        "arguments",
        "args",
        "json",
        "image",
        "inlineData",
        "function",
        "role",
        "other",
        "t\\u0065xt",
        "usage",
        "x",
        "",
    ];

    /// A random JSON text (or nearly: a few of its pieces are not JSON), `depth` levels at most.
    fn random_json(r: &mut Lcg, depth: u32, out: &mut String) {
        let ws = |r: &mut Lcg, out: &mut String| out.push_str(["", "", "", " ", "\n\t ", "\r"][r.below(6)]);
        ws(r, out);
        match if depth == 0 { r.below(4) } else { r.below(7) } {
            0 => out.push_str(&format!("\"{}\"", r.pick(&STRINGS))),
            1 => out.push_str(r.pick(&NUMBERS_TEXT)),
            2 => out.push_str(["true", "false", "null"][r.below(3)]),
            3 => out.push_str(&format!("\"{}\"", r.pick(&STRINGS[..13]))),
            4 => {
                out.push('[');
                for i in 0..r.below(4) {
                    if i > 0 {
                        out.push(',');
                    }
                    random_json(r, depth - 1, out);
                }
                out.push(']');
            }
            _ => {
                out.push('{');
                for i in 0..r.below(5) {
                    if i > 0 {
                        out.push(',');
                    }
                    ws(r, out);
                    out.push_str(&format!("\"{}\":", r.pick(&KEYS)));
                    random_json(r, depth - 1, out);
                }
                ws(r, out);
                out.push('}');
            }
        }
        ws(r, out);
    }

    #[test]
    fn reading_in_place_gives_what_a_value_gives() {
        let mut r = Lcg(1);
        let (mut scanned, mut total) = (0, 0);
        for _ in 0..20_000 {
            let mut body = String::from("{");
            for i in 0..r.below(5) {
                if i > 0 {
                    body.push(',');
                }
                body.push_str(&format!("\"{}\":", r.pick(&KEYS[..24])));
                random_json(&mut r, 5, &mut body);
            }
            body.push('}');
            total += 1;
            scanned += usize::from(same(body.as_bytes()));
            // Cut short, or with a byte changed: mostly not JSON.
            let bytes = body.as_bytes();
            same(&bytes[..r.below(bytes.len())]);
            let mut changed = bytes.to_vec();
            let at = r.below(changed.len());
            let junk = b"{}[],:\"\\ 0e-x\xff\x01";
            changed[at] = junk[r.below(junk.len())];
            same(&changed);
        }
        // Most valid bodies are read in place, not left to serde_json.
        assert!(scanned * 2 > total, "{scanned} of {total} read in place");
    }

    #[test]
    fn odd_json_reads_as_a_value_reads_it() {
        let bodies: [&[u8]; 36] = [
            br#"{"prompt":"a","prompt":"bcd"}"#,
            br#"{"messages":[{"content":"ab","content":"abc"}]}"#,
            br#"{"messages":[{"type":"image","type":"text","text":"abc"}]}"#,
            br#"{"tools":[{"a":1,"a":22}]}"#,
            br#"{"tools":{"\u0061":1,"a":2}}"#,
            br#"{"pr\u006fmpt":"abc"}"#,
            br#"{"model":"g\u0070t","prompt":"x"}"#,
            br#"{"model":"a","model":"bb","prompt":"x"}"#,
            br#"{"generationConfig":{"maxOutputTokens":5},"generationConfig":{},"prompt":"x"}"#,
            br#"{"generationConfig":{"maxOutputTokens":5,"maxOutputTokens":"x"},"prompt":"x"}"#,
            br#"{"stream":true,"stream":false,"prompt":"x"}"#,
            br#"{"max_tokens":1e400,"prompt":"x"}"#,
            br#"{"max_tokens":-0,"n":-0,"prompt":"x"}"#,
            br#"{"tools":[-0,-0.0,1E2,18446744073709551616,-9223372036854775808,-9223372036854775809]}"#,
            br#"{"prompt":"\ud83d\ude00\u00e9\n\"\\\/"}"#,
            br#"{"prompt":"\ud83d"}"#,
            br#"{"prompt":"\ude00"}"#,
            br#"{"prompt":"\ud83d\u0041"}"#,
            br#"{"prompt":"\uD83D\uDE00\uABCD"}"#,
            br#"{"prompt":"\u12"}"#,
            b"{\"prompt\":\"a\x01b\"}",
            b"{\"prompt\":\"\xc3\"}",
            b"{\"prompt\":\"a\x7fb\"}",
            br#"{"prompt":"a",}"#,
            br#"{"prompt":["a",]}"#,
            br#"{"prompt":["a" "b"]}"#,
            br#"{"prompt":01}"#,
            br#"{"prompt":[1.]}"#,
            br#"{"prompt":[tru]}"#,
            br#"{"prompt":"a"} x"#,
            b"\xef\xbb\xbf{\"prompt\":\"a\"}",
            br#"{"messages":[{"type":"document","source":{"type":"text","data":"abc","type":"base64"}}]}"#,
            br#"{"messages":[{"source":{"data":"abcd","type":"text"},"type":"document","text":"zz"}]}"#,
            br#"{"messages":[{"type":"document","source":{"type":"text","data":["ab",{"text":"c"}]}}]}"#,
            br#"{"input":[{"type":"function_call","arguments":{"k":[1,2]},"input":"abc"}]}"#,
            b" \t\r\n{\"prompt\" : [ \"ab\" , 12 ] }\n ",
        ];
        for body in bodies {
            same(body);
        }
        let keys: String = (0..40).map(|i| format!("\"k{i}\":{i},")).collect();
        same(format!(r#"{{"tools":{{{keys}"k":0}}}}"#).as_bytes());
        for depth in [60, 63, 64, 65, 66, 126, 127, 128, 129] {
            for (open, close) in [("[", "]"), (r#"{"content":"#, "}"), (r#"{"a":"#, "}")] {
                for key in ["messages", "tools"] {
                    let body =
                        format!(r#"{{"{key}":{}"deep"{},"prompt":"ab"}}"#, open.repeat(depth), close.repeat(depth));
                    same(body.as_bytes());
                }
            }
        }
    }

    #[test]
    fn utf8_is_what_from_utf8_accepts() {
        let mut r = Lcg(3);
        // Bytes around every boundary of the table, ASCII runs, and text.
        let pieces: [&[u8]; 16] = [
            b"a",
            b"abcdefghij",
            b"\x7f",
            b"\x80",
            b"\xbf",
            b"\xc0",
            b"\xc1",
            b"\xc2",
            b"\xdf",
            b"\xe0",
            b"\xed",
            b"\xef",
            b"\xf0",
            b"\xf4",
            b"\xf5",
            b"\xff",
        ];
        let texts =
            ["é", "—", "€", "👋🏽", "\u{10FFFF}", "\u{D7FF}", "\u{E000}", "\u{FFFF}", "\u{10000}", "\u{800}", "\u{7FF}"];
        for _ in 0..200_000 {
            let mut bytes = Vec::new();
            for _ in 0..r.below(6) {
                match r.below(3) {
                    0 => bytes.extend_from_slice(pieces[r.below(pieces.len())]),
                    1 => bytes.extend_from_slice(texts[r.below(texts.len())].as_bytes()),
                    _ => bytes.push(0x80 | r.below(0x80) as u8),
                }
            }
            assert_eq!(utf8(&bytes), std::str::from_utf8(&bytes).is_ok(), "{bytes:x?}");
        }
        for b in 0..=0xFFFF_u32 {
            for bytes in
                [&b.to_be_bytes()[2..], &(b << 8 | 0x80).to_be_bytes()[1..], &(b << 16 | 0x8080).to_be_bytes()[..]]
            {
                assert_eq!(utf8(bytes), std::str::from_utf8(bytes).is_ok(), "{bytes:x?}");
            }
        }
    }

    #[test]
    fn escaped_strings_count_their_characters() {
        for (raw, chars) in [
            ("", 0),
            ("abc", 3),
            ("caf\\u00e9", 4),
            ("\\ud83d\\ude00", 1),
            ("\\n\\t\\\"\\\\\\/", 5),
            ("\\\\u0041", 6),
            ("é\\u00e9👋", 3),
        ] {
            let body = format!("\"{raw}\"");
            let mut s = Scan::new(body.as_bytes());
            let string = s.string().unwrap_or_else(|| panic!("{raw}"));
            let decoded: String = serde_json::from_str(&body).unwrap_or_default();
            assert_eq!((string.chars(), decoded.chars().count() as u64), (chars, chars), "{raw}");
        }
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
