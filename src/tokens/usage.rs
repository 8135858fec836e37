//! The tokens a response actually used, as the provider reports them: from a whole JSON body
//! ([`from_body`]) or from a server-sent event stream read chunk by chunk as it passes
//! ([`StreamUsage`]).
//!
//! Pure: nothing is read from the host and no input can make it panic. Anything not understood
//! is ignored; a response that reports no usage gives `None`.
//!
//! ```
//! use llm_ratelimit::tokens::usage::{from_body, StreamUsage, Usage};
//!
//! let body = br#"{"choices":[],"usage":{"prompt_tokens":12,"completion_tokens":30,"total_tokens":42}}"#;
//! assert_eq!(from_body(body), Some(Usage { input: 12, output: 30, cached_input: 0 }));
//!
//! let body = br#"{"usage":{"input_tokens":5,"cache_read_input_tokens":1000,"output_tokens":7}}"#;
//! assert_eq!(from_body(body), Some(Usage { input: 1005, output: 7, cached_input: 1000 }));
//!
//! let stream = "data: {\"choices\":[{\"delta\":{\"content\":\"Grüße\"}}]}\n\n\
//!               data: {\"choices\":[],\"usage\":{\"prompt_tokens\":12,\"completion_tokens\":2}}\n\n\
//!               data: [DONE]\n\n";
//! let mut reader = StreamUsage::new();
//! for chunk in stream.as_bytes().chunks(7) {
//!     reader.feed(chunk); // a chunk may end inside a line or inside a UTF-8 character
//! }
//! assert_eq!(reader.finish(), Some(Usage { input: 12, output: 2, cached_input: 0 }));
//! assert_eq!(reader.text_chars(), 5);
//! ```
//!
//! Formats read (the same reader serves bodies and stream events, told apart by their fields):
//! - OpenAI chat completions (and compatible APIs): `usage.{prompt_tokens, completion_tokens}`;
//!   cached prompt tokens (`prompt_tokens_details.cached_tokens`) are already inside
//!   `prompt_tokens`, reasoning tokens inside `completion_tokens`. Streamed, usage comes in a last chunk `{"choices":[],"usage":{..}}`
//!   only when the request asked `stream_options.include_usage`; Groq's `x_groq.usage` is read too.
//!   Text: `choices[].delta.{content, reasoning_content, reasoning, refusal}`,
//!   `choices[].delta.tool_calls[].function.arguments` and legacy `choices[].text`.
//! - OpenAI Responses: `usage.{input_tokens, output_tokens}` (cached tokens,
//!   `input_tokens_details.cached_tokens`, are inside `input_tokens`); streamed, in `response.usage` of `response.completed` (or
//!   `response.incomplete`, `response.failed`). Text: the `delta` of the `response.output_text`,
//!   `refusal`, `function_call_arguments`, `reasoning_text` and `reasoning_summary_text` deltas.
//! - Anthropic messages: `usage.{input_tokens, output_tokens}`; `cache_creation_input_tokens`
//!   and `cache_read_input_tokens` are reported apart and are added to the input here. Streamed,
//!   `message_start` carries `message.usage`, then each `message_delta` a `usage` whose counts
//!   are cumulative: each field it has replaces the earlier one (never a sum). Text: the
//!   `delta.{text, partial_json, thinking}` of `content_block_delta`.
//! - Gemini / Vertex: `usageMetadata`: input is `promptTokenCount` (which includes
//!   `cachedContentTokenCount`) plus `toolUsePromptTokenCount`; output is `candidatesTokenCount`
//!   plus `thoughtsTokenCount`. Streamed (`alt=sse`) every chunk may carry `usageMetadata`: the
//!   last one counts. A whole body may also be the JSON array of chunks that
//!   `streamGenerateContent` returns without `alt=sse`. Text: `candidates[].content.parts[].text`.
//!
//! The cache reads among the input are reported apart as [`Usage::cached_input`] (Anthropic's
//! `cache_read_input_tokens`, not its cache writes).
//!
//! Where a total is reported (`total_tokens`, `totalTokenCount`) and exceeds input plus output,
//! the excess is counted as output, so categories unknown here are still charged.
//! Counts that are negative become 0, fractions are truncated, and counts beyond `u64` saturate.
//!
//! Stream events are told apart by the `type` inside their data (Anthropic and Responses repeat
//! it there), so `event:` lines are not needed and are ignored, like `id:`, `retry:` and `:`
//! comments. Non-SSE bodies (a plain JSON error, Gemini's JSON array stream) are for
//! [`from_body`]: fed to a [`StreamUsage`] they read as nothing.
//!
//! [`from_body`] reads a body from its end ([`tail`](super::tail)): providers put `usage` after
//! the answer's text, so the last `usage` that reads as one settles it, and nothing before it is
//! read (a body of valid JSON reads as serde_json's `Value` of it would; one whose text before
//! its usage is not valid JSON still gives that usage). A body is read for its usage fields
//! whatever its `type`: the events only a stream has are [`StreamUsage`]'s. Where that reading
//! cannot be sure (a key written with an escape, no usage near the end and broken text before),
//! the body is read from its start, in place (the estimate's `Scan`), keeping only the few fields
//! the usage is in; and what that reading cannot be sure of is read into a `Value` whole.

use super::estimate::Scan;
use super::tail::Back;
use serde_json::{Map, Number, Value};

/// The longest line a [`StreamUsage`] keeps, and the most data one event may gather.
const MAX_LINE: usize = 64 * 1024;
/// Of a longer data line, only the last bytes are kept: enough to find a usage object that
/// follows the bulk, as in a `response.completed` carrying a long output, instructions and tools
/// (its `usage` is followed only by `user` and up to 16 short `metadata` pairs).
const TAIL: usize = 16 * 1024;

/// Anthropic's usage fields: the first three are input, the last is output.
const ANTHROPIC: [&str; 4] =
    ["input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens", "output_tokens"];
/// OpenAI Responses events whose `delta` is generated text.
const RESPONSES_TEXT: [&str; 5] = [
    "response.output_text.delta",
    "response.refusal.delta",
    "response.function_call_arguments.delta",
    "response.reasoning_text.delta",
    "response.reasoning_summary_text.delta",
];

/// Tokens used by one response.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    /// Prompt tokens, including cached ones and cache writes where the provider reports those
    /// apart (Anthropic's `cache_*_input_tokens`), and Gemini's tool-use prompt tokens.
    pub input: u64,
    /// Generated tokens, including reasoning (Gemini's `thoughtsTokenCount`).
    pub output: u64,
    /// The part of `input` read from the provider's prompt cache: Anthropic's
    /// `cache_read_input_tokens`, OpenAI's `prompt_tokens_details.cached_tokens` (chat) or
    /// `input_tokens_details.cached_tokens` (Responses), Gemini's `cachedContentTokenCount`. 0
    /// when not reported; never more than `input`.
    pub cached_input: u64,
}

impl Usage {
    /// Input plus output, saturating.
    pub fn total(&self) -> u64 {
        self.input.saturating_add(self.output)
    }
}

/// The usage a whole (non-streamed) JSON response body reports; `None` for a body that is not
/// JSON or reports none. A JSON array (Gemini's stream without `alt=sse`) is read element by
/// element, the last usage counting.
pub fn from_body(body: &[u8]) -> Option<Usage> {
    if let Some(read) = from_end(body) {
        return read;
    }
    let json = match pruned(body) {
        Some(json) => json,
        None => serde_json::from_slice(body).ok()?,
    };
    let mut tally = Tally::default();
    match &json {
        Value::Array(items) => items.iter().for_each(|item| tally.event(item)),
        other => tally.event(other),
    }
    tally.usage
}

/// [`from_body`] read from the body's end ([`tail`](super::tail)): the top-level object's
/// members, last first, and of a top-level array its items, last first; `None` when that reading
/// cannot be sure (a key written with an escape, text that is not JSON), and the body is read
/// from its start instead.
fn from_end(body: &[u8]) -> Option<Option<Usage>> {
    // It must at least open as it closes: a server-sent event stream is not read here.
    let close = match body.iter().find(|b| !matches!(b, b' ' | b'\n' | b'\t' | b'\r'))? {
        b'{' => b'}',
        b'[' => b']',
        _ => return None,
    };
    let mut b = Back::new(body);
    if b.peek()? != close {
        return None;
    }
    if !b.take(b']') {
        let usage = object_from_end(&mut b)?;
        return (usage.is_some() || b.at_start()).then_some(usage);
    }
    if !b.take(b'[') {
        loop {
            // The last item with a usage counts, as when the items are read in order.
            if b.peek()? == b'}' {
                if let Some(usage) = object_from_end(&mut b)? {
                    return Some(Some(usage));
                }
            } else {
                b.value()?;
            }
            if b.take(b'[') {
                break;
            }
            if !b.take(b',') {
                return None;
            }
        }
    }
    b.at_start().then_some(None)
}

/// The usage of the object ending at `b`, as [`Tally::event`] reads a body's: `usage`, else
/// `response.usage`, else `x_groq.usage`, else `usageMetadata`, of each key its last
/// occurrence (serde_json keeps that one). Most answers end with their `usage`: once the last
/// one reads as usage, nothing before it counts, and nothing before it is read.
fn object_from_end(b: &mut Back) -> Option<Option<Usage>> {
    const KEYS: [&str; 4] = ["usage", "response", "x_groq", "usageMetadata"];
    let mut found: [Option<&[u8]>; 4] = [None; 4];
    if !b.take(b'}') {
        return None;
    }
    if !b.take(b'{') {
        loop {
            let (key, value) = b.member()?;
            if let Some(i) = KEYS.iter().position(|k| k.as_bytes() == key) {
                if found[i].is_none() {
                    found[i] = Some(value);
                    if i == 0 {
                        if let Some(usage) = Counts::scan_all(value)?.usage() {
                            return Some(Some(usage));
                        }
                    }
                }
            }
            if b.take(b'{') {
                break;
            }
            if !b.take(b',') {
                return None;
            }
        }
    }
    let counts =
        |v: Option<&[u8]>| -> Option<Option<Counts>> { v.map(Counts::scan_all).map_or(Some(None), |c| c.map(Some)) };
    // Of `response` and `x_groq` (a streamed Responses body holds the whole answer there) only
    // their `usage`, read in place.
    let nested = |v: Option<&[u8]>| -> Option<Option<Counts>> {
        let Some(v) = v else { return Some(None) };
        let mut s = Scan::new(v);
        let outer = pruned_object(&mut s, &["usage"], &[])?;
        s.end()?;
        Some(outer.get("usage").map(Counts::of))
    };
    let candidates = [counts(found[0])?, nested(found[1])?, nested(found[2])?];
    let gemini = counts(found[3])?;
    Some(candidates.iter().flatten().find_map(Counts::usage).or_else(|| gemini.as_ref().and_then(Counts::gemini)))
}

/// The fields of an event (a body, or an item of a JSON array) that hold its usage, as
/// [`Tally::event`] reads them: parsed whole, and of the objects around a usage only the usage.
const EVENT_WHOLE: [&str; 3] = ["type", "usage", "usageMetadata"];
const EVENT_NESTED: [&str; 3] = ["message", "response", "x_groq"];

/// What [`Tally::event`] reads of a body for its usage, read in place: of the body (or of each
/// item of a JSON array) the fields [`EVENT_WHOLE`] and the `usage` of [`EVENT_NESTED`], each
/// parsed by serde_json; anything else is checked and skipped. `None` leaves the body to
/// serde_json (see [`Scan`]).
fn pruned(body: &[u8]) -> Option<Value> {
    let mut s = Scan::new(body);
    let json = if s.peek()? == b'[' {
        let mut items = Vec::new();
        s.open(b'[')?;
        let mut first = true;
        while s.more(b']', &mut first)? {
            items.push(pruned_object(&mut s, &EVENT_WHOLE, &EVENT_NESTED)?);
        }
        Value::Array(items)
    } else {
        pruned_object(&mut s, &EVENT_WHOLE, &EVENT_NESTED)?
    };
    s.end()?;
    Some(json)
}

/// Of an object, its fields `whole` parsed whole and its fields `nested` with their `usage` only
/// (a repeated key keeps its last value, as in serde_json). A value that is not an object reads
/// as `null`: nothing in it is read.
fn pruned_object(s: &mut Scan, whole: &[&str], nested: &[&str]) -> Option<Value> {
    let mut map = Map::new();
    let object = s.object(|s, key| {
        let (name, value) = if let Some(name) = whole.iter().find(|name| name.as_bytes() == key) {
            (name, s.value()?)
        } else if let Some(name) = nested.iter().find(|name| name.as_bytes() == key) {
            (name, pruned_object(s, &["usage"], &[])?)
        } else {
            return s.skip();
        };
        map.insert((*name).to_owned(), value);
        Some(())
    })?;
    Some(if object { Value::Object(map) } else { Value::Null })
}

/// Reads the usage of a server-sent event stream (`text/event-stream`) fed chunk by chunk,
/// without buffering the stream.
///
/// Kept between chunks: the incomplete trailing line, as bytes (a line or a UTF-8 character may
/// straddle chunks), and the data of the event under way. Both are bounded by 64 KiB: a longer
/// line is dropped, except that of a data line the last 16 KiB are kept and searched for a usage
/// object, so a huge `response.completed` still reports its usage; an event whose data lines add
/// up to more is dropped. Whatever the input, the line held stays under 80 KiB and the event
/// data under 64 KiB. Lines end with LF, CRLF or CR; multi-line data is joined with LF as the
/// SSE specification says; `data: [DONE]` is skipped. An event left without its closing blank
/// line is still read by [`finish`](Self::finish).
#[derive(Debug, Default)]
pub struct StreamUsage {
    /// The incomplete trailing line (only its tail once `long`).
    line: Vec<u8>,
    /// The current line outgrew `MAX_LINE`: `Some(whether it is a data line)`.
    long: Option<bool>,
    /// The last byte fed was a CR: an LF starting the next chunk ends no further line.
    after_cr: bool,
    /// Data of the event under way.
    data: Vec<u8>,
    has_data: bool,
    /// The event's data outgrew `MAX_LINE`: it is dropped, but for a `salvaged` usage.
    overflow: bool,
    salvaged: Option<Usage>,
    tally: Tally,
}

impl StreamUsage {
    pub fn new() -> Self {
        Self::default()
    }

    /// Reads one chunk of the stream, in the order received.
    pub fn feed(&mut self, chunk: &[u8]) {
        let mut rest = chunk;
        if let Some((&first, after)) = rest.split_first() {
            if self.after_cr && first == b'\n' {
                rest = after;
            }
            self.after_cr = false;
        }
        while let Some(end) = rest.iter().position(|&b| b == b'\n' || b == b'\r') {
            let (line, eol) = rest.split_at(end);
            self.push(line);
            self.end_line();
            rest = match eol {
                [b'\r', b'\n', after @ ..] => after,
                [b'\r'] => {
                    self.after_cr = true;
                    &[]
                }
                [_, after @ ..] => after,
                [] => &[],
            };
        }
        self.push(rest);
    }

    /// Call at the end of the stream: the usage it reported, if any (the last one reported
    /// counts). Reads a last line or event left unterminated.
    pub fn finish(&mut self) -> Option<Usage> {
        if !self.line.is_empty() || self.long.is_some() {
            self.end_line();
        }
        self.dispatch();
        self.tally.usage
    }

    /// Whether the usage [`finish`](Self::finish) returned is the provider's last word, not a
    /// running count of a stream cut short: Anthropic's `message_start` (its output is 1), and a
    /// chunk's usage beside a choice or candidate not finished yet (Gemini's `usageMetadata` on
    /// every chunk, vLLM's `continuous_usage_stats`). False without a usage.
    pub fn is_final(&self) -> bool {
        self.tally.usage.is_some() && !self.tally.running
    }

    /// Characters of generated text seen so far (text, reasoning and tool-call arguments), to
    /// charge a stream that never reports its usage.
    pub fn text_chars(&self) -> u64 {
        self.tally.text_chars
    }

    /// Appends to the trailing line, keeping only the tail of a line longer than `MAX_LINE`.
    fn push(&mut self, bytes: &[u8]) {
        if self.long.is_none() {
            if self.line.len() + bytes.len() <= MAX_LINE {
                self.line.extend_from_slice(bytes);
                return;
            }
            self.long = Some(self.line.iter().chain(bytes).take(5).eq(b"data:"));
        }
        let (_, tail) = bytes.split_at(bytes.len() - bytes.len().min(TAIL));
        self.line.extend_from_slice(tail);
        if self.line.len() > MAX_LINE {
            self.line.drain(..self.line.len() - TAIL);
        }
    }

    fn end_line(&mut self) {
        let mut line = std::mem::take(&mut self.line);
        match self.long.take() {
            None => self.field(&line),
            Some(true) => {
                self.overflow = true;
                self.data.clear();
                self.salvaged = salvage(&line).or(self.salvaged);
            }
            Some(false) => {}
        }
        line.clear();
        self.line = line;
    }

    /// One complete line of the stream.
    fn field(&mut self, line: &[u8]) {
        if line.is_empty() {
            return self.dispatch();
        }
        let (name, value) = match line.iter().position(|&b| b == b':') {
            Some(colon) => {
                let (name, value) = line.split_at(colon);
                let value = value.get(1..).unwrap_or_default();
                (name, value.strip_prefix(b" ").unwrap_or(value))
            }
            None => (line, &[][..]),
        };
        // Comments have an empty name; `event`, `id` and `retry` are not needed.
        if name != b"data" || self.overflow {
            return;
        }
        if self.data.len() + value.len() + 1 > MAX_LINE {
            self.overflow = true;
            self.data.clear();
            return;
        }
        if self.has_data {
            self.data.push(b'\n');
        }
        self.data.extend_from_slice(value);
        self.has_data = true;
    }

    /// The end of an event: reads its data.
    fn dispatch(&mut self) {
        if self.overflow {
            if self.salvaged.is_some() {
                // Too long to read whole: a `response.completed` carrying its whole output.
                self.tally.usage = self.salvaged;
                self.tally.running = false;
            }
        } else if self.has_data && self.data != b"[DONE]" {
            if let Ok(json) = serde_json::from_slice::<Value>(&self.data) {
                self.tally.event(&json);
            }
        }
        self.data.clear();
        self.has_data = false;
        self.overflow = false;
        self.salvaged = None;
    }
}

/// What the bodies or events read so far add up to.
#[derive(Debug, Default)]
struct Tally {
    usage: Option<Usage>,
    /// `usage` is a running count (see [`StreamUsage::is_final`]).
    running: bool,
    /// Anthropic's usage fields so far, in the order of `ANTHROPIC`.
    anthropic: [u64; 4],
    text_chars: u64,
}

impl Tally {
    /// One body, array element or stream event.
    fn event(&mut self, json: &Value) {
        match json.get("type").and_then(Value::as_str).unwrap_or_default() {
            "message_start" => {
                self.anthropic = [0; 4];
                self.anthropic(json.get("message").and_then(|m| m.get("usage")));
                // Its output is 1: the count comes with `message_delta`, at the end.
                self.running = true;
            }
            "message_delta" => {
                self.anthropic(json.get("usage"));
                self.running = false;
            }
            "content_block_delta" => {
                let delta = json.get("delta");
                for key in ["text", "partial_json", "thinking"] {
                    self.text(delta.and_then(|d| d.get(key)));
                }
            }
            kind if RESPONSES_TEXT.contains(&kind) => self.text(json.get("delta")),
            _ => {
                let usage = [json.get("usage"), nested(json, "response", "usage"), nested(json, "x_groq", "usage")]
                    .into_iter()
                    .flatten()
                    .find_map(usage_of)
                    .or_else(|| json.get("usageMetadata").and_then(gemini_usage));
                if usage.is_some() {
                    self.usage = usage;
                    self.running = unfinished(json);
                }
                for choice in items(Some(json), "choices") {
                    let delta = choice.get("delta");
                    for key in ["content", "reasoning_content", "reasoning", "refusal"] {
                        self.text(delta.and_then(|d| d.get(key)));
                    }
                    for call in items(delta, "tool_calls") {
                        self.text(nested(call, "function", "arguments"));
                    }
                    self.text(choice.get("text"));
                }
                for candidate in items(Some(json), "candidates") {
                    for part in items(candidate.get("content"), "parts") {
                        self.text(part.get("text"));
                    }
                }
            }
        }
    }

    /// An Anthropic usage object: each field present replaces the one seen before.
    fn anthropic(&mut self, usage: Option<&Value>) {
        let Some(usage) = usage.filter(|u| u.is_object()) else { return };
        for (slot, key) in self.anthropic.iter_mut().zip(ANTHROPIC) {
            if let Some(n) = usage.get(key).and_then(Value::as_number).map(count) {
                *slot = n;
            }
        }
        let [input, creation, read, output] = self.anthropic;
        let input = input.saturating_add(creation).saturating_add(read);
        self.usage = Some(Usage { input, output, cached_input: read.min(input) });
    }

    fn text(&mut self, text: Option<&Value>) {
        if let Some(text) = text.and_then(Value::as_str) {
            self.text_chars = self.text_chars.saturating_add(text.chars().count() as u64);
        }
    }
}

/// The members of a usage object (`usage`, `usageMetadata`) its counts are read from: which of
/// [`COUNTS`] are present, the count of each that is a number, and the `cached_tokens` of each of
/// [`DETAILS`]. Read from a `Value` (a stream event) or in place from the text (a body read from
/// its end: no `Value` built, no serde_json on the way), alike.
#[derive(Debug, Default)]
struct Counts {
    present: u16,
    counts: [Option<u64>; COUNTS.len()],
    cached: [Option<u64>; DETAILS.len()],
}

const COUNTS: [&str; 13] = [
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "input_tokens",
    "cache_creation_input_tokens",
    "cache_read_input_tokens",
    "output_tokens",
    "promptTokenCount",
    "toolUsePromptTokenCount",
    "candidatesTokenCount",
    "thoughtsTokenCount",
    "totalTokenCount",
    "cachedContentTokenCount",
];
const DETAILS: [&str; 2] = ["prompt_tokens_details", "input_tokens_details"];

impl Counts {
    /// Of a `Value` (nothing of one that is not an object).
    fn of(usage: &Value) -> Counts {
        let mut c = Counts::default();
        for (i, key) in COUNTS.iter().enumerate() {
            if let Some(v) = usage.get(key) {
                c.present |= 1 << i;
                c.counts[i] = v.as_number().map(count);
            }
        }
        for (i, key) in DETAILS.iter().enumerate() {
            c.cached[i] = usage.get(key).and_then(|d| d.get("cached_tokens")).and_then(Value::as_number).map(count);
        }
        c
    }

    /// Of the value at `s`, read in place as serde_json reads it (a repeated key keeps its last
    /// value); `None` where [`Scan`] leaves the text to serde_json.
    fn scan(s: &mut Scan) -> Option<Counts> {
        let mut c = Counts::default();
        s.object(|s, key| {
            if let Some(i) = COUNTS.iter().position(|k| k.as_bytes() == key) {
                c.present |= 1 << i;
                c.counts[i] = s.number_or_skip()?.as_ref().map(count);
            } else if let Some(i) = DETAILS.iter().position(|k| k.as_bytes() == key) {
                // A repeated object replaces the earlier one whole.
                c.cached[i] = None;
                s.object(|s, key| {
                    if key == b"cached_tokens" {
                        c.cached[i] = s.number_or_skip()?.as_ref().map(count);
                    } else {
                        s.skip()?;
                    }
                    Some(())
                })?;
            } else {
                s.skip()?;
            }
            Some(())
        })?;
        Some(c)
    }

    /// Of a whole text (`None`: not JSON, or left to serde_json).
    fn scan_all(text: &[u8]) -> Option<Counts> {
        let mut s = Scan::new(text);
        let c = Counts::scan(&mut s)?;
        s.end()?;
        Some(c)
    }

    fn has(&self, key: &str) -> bool {
        COUNTS.iter().position(|k| *k == key).is_some_and(|i| self.present & 1 << i != 0)
    }

    fn get(&self, key: &str) -> Option<u64> {
        COUNTS.iter().position(|k| *k == key).and_then(|i| self.counts[i])
    }

    /// A `usage` object: OpenAI chat (`prompt_tokens`), else OpenAI Responses or Anthropic
    /// (`input_tokens`, cache fields added).
    fn usage(&self) -> Option<Usage> {
        let (input, output, cached) = if self.has("prompt_tokens") || self.has("completion_tokens") {
            (self.get("prompt_tokens"), self.get("completion_tokens"), self.cached[0])
        } else if ANTHROPIC.iter().any(|key| self.has(key)) {
            let input = ANTHROPIC[..3].iter().filter_map(|key| self.get(key)).fold(0, u64::saturating_add);
            let cached = self.get("cache_read_input_tokens").or(self.cached[1]);
            (Some(input), self.get("output_tokens"), cached)
        } else {
            return None;
        };
        Some(with_total(input.unwrap_or(0), output.unwrap_or(0), self.get("total_tokens"), cached))
    }

    /// Gemini's `usageMetadata`.
    fn gemini(&self) -> Option<Usage> {
        let [prompt, tool_use, candidates, thoughts, total] = [
            "promptTokenCount",
            "toolUsePromptTokenCount",
            "candidatesTokenCount",
            "thoughtsTokenCount",
            "totalTokenCount",
        ]
        .map(|key| self.get(key));
        if [prompt, tool_use, candidates, thoughts, total].iter().all(Option::is_none) {
            return None;
        }
        let sum = |a: Option<u64>, b: Option<u64>| a.unwrap_or(0).saturating_add(b.unwrap_or(0));
        Some(with_total(sum(prompt, tool_use), sum(candidates, thoughts), total, self.get("cachedContentTokenCount")))
    }
}

/// A `usage` object's usage ([`Counts::usage`]).
fn usage_of(usage: &Value) -> Option<Usage> {
    Counts::of(usage).usage()
}

/// Gemini's `usageMetadata` ([`Counts::gemini`]).
fn gemini_usage(usage: &Value) -> Option<Usage> {
    Counts::of(usage).gemini()
}

/// Charges as output whatever a reported total has beyond input and output; the cached part of
/// the input is at most the input.
fn with_total(input: u64, output: u64, total: Option<u64>, cached: Option<u64>) -> Usage {
    let output = output.max(total.unwrap_or(0).saturating_sub(input));
    Usage { input, output, cached_input: cached.unwrap_or(0).min(input) }
}

/// A token count: negatives are 0, fractions truncated, anything beyond `u64` saturates.
fn count(n: &Number) -> u64 {
    n.as_u64().unwrap_or_else(|| n.as_f64().map_or(0, |f| f as u64))
}

fn nested<'a>(json: &'a Value, outer: &str, inner: &str) -> Option<&'a Value> {
    json.get(outer)?.get(inner)
}

/// Whether a chunk has a choice or candidate not finished yet: a usage beside it is a running
/// count. A chunk with none (OpenAI's usage chunk, `response.completed`) is the last.
fn unfinished(json: &Value) -> bool {
    let open = |item: &Value, key: &str| item.get(key).is_none_or(Value::is_null);
    items(Some(json), "choices").iter().any(|c| open(c, "finish_reason"))
        || items(Some(json), "candidates").iter().any(|c| open(c, "finishReason"))
}

/// The array under `key`, or nothing.
fn items<'a>(json: Option<&'a Value>, key: &str) -> &'a [Value] {
    json.and_then(|j| j.get(key)).and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default()
}

/// The last `"usage":{..}` or `"usageMetadata":{..}` object in the tail of an over-long data
/// line that reads as usage. The pattern cannot match inside a JSON string, where quotes are
/// escaped.
fn salvage(tail: &[u8]) -> Option<Usage> {
    (0..tail.len()).rev().find_map(|at| {
        let rest = tail.get(at..)?;
        let (gemini, object) = match rest.strip_prefix(b"\"usageMetadata\":") {
            Some(object) => (true, object),
            None => (false, rest.strip_prefix(b"\"usage\":")?),
        };
        let json = serde_json::Deserializer::from_slice(object).into_iter::<Value>().next()?.ok()?;
        if gemini {
            gemini_usage(&json)
        } else {
            usage_of(&json)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    /// The usage and text read from `chunks`.
    fn read_chunks<'a>(chunks: impl IntoIterator<Item = &'a [u8]>) -> (Option<Usage>, u64) {
        let mut reader = StreamUsage::new();
        chunks.into_iter().for_each(|chunk| reader.feed(chunk));
        (reader.finish(), reader.text_chars())
    }

    /// Chunks of 1 to 7 bytes, from a tiny seeded LCG.
    fn random_chunks(bytes: &[u8], seed: u64) -> Vec<&[u8]> {
        let (mut seed, mut rest, mut chunks) = (seed, bytes, Vec::new());
        while !rest.is_empty() {
            seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
            let (chunk, after) = rest.split_at(rest.len().min(1 + (seed >> 33) as usize % 7));
            chunks.push(chunk);
            rest = after;
        }
        chunks
    }

    /// The usage and text of `stream` fed whole, then in seeded random 1–7 byte chunks: all
    /// must agree.
    fn read_stream_in_random_chunks(stream: &str, rounds: u64) -> (Option<Usage>, u64) {
        let whole = read_chunks([stream.as_bytes()]);
        for seed in 0..rounds {
            assert_eq!(read_chunks(random_chunks(stream.as_bytes(), seed)), whole, "random chunks, seed {seed}");
        }
        whole
    }

    /// As `read_stream_in_random_chunks`, and also split at every byte position and fed byte by
    /// byte: lines and UTF-8 characters straddling chunks.
    fn read_stream(stream: &str) -> (Option<Usage>, u64) {
        let whole = read_stream_in_random_chunks(stream, 20);
        let bytes = stream.as_bytes();
        for at in 0..=bytes.len() {
            let (head, tail) = bytes.split_at(at);
            assert_eq!(read_chunks([head, tail]), whole, "split at byte {at}");
        }
        assert_eq!(read_chunks(bytes.chunks(1)), whole, "byte by byte");
        whole
    }

    fn usage(input: u64, output: u64) -> Option<Usage> {
        Some(Usage { input, output, cached_input: 0 })
    }

    /// A usage with `cached_input` of its input read from the cache.
    fn cached(input: u64, output: u64, cached_input: u64) -> Option<Usage> {
        Some(Usage { input, output, cached_input })
    }

    const OPENAI_CHAT_STREAM: &str = concat!(
        r#"data: {"id":"chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT","object":"chat.completion.chunk","created":1741570283,"model":"gpt-4o-2024-08-06","service_tier":"default","system_fingerprint":"fp_fc9f1d7035","choices":[{"index":0,"delta":{"role":"assistant","content":"","refusal":null},"logprobs":null,"finish_reason":null}],"usage":null}"#,
        "\n\n",
        r#"data: {"id":"chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT","object":"chat.completion.chunk","created":1741570283,"model":"gpt-4o-2024-08-06","service_tier":"default","system_fingerprint":"fp_fc9f1d7035","choices":[{"index":0,"delta":{"content":"Bonjour"},"logprobs":null,"finish_reason":null}],"usage":null}"#,
        "\n\n",
        r#"data: {"id":"chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT","object":"chat.completion.chunk","created":1741570283,"model":"gpt-4o-2024-08-06","service_tier":"default","system_fingerprint":"fp_fc9f1d7035","choices":[{"index":0,"delta":{"content":" ! Ça va ? 👋"},"logprobs":null,"finish_reason":null}],"usage":null}"#,
        "\n\n",
        r#"data: {"id":"chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT","object":"chat.completion.chunk","created":1741570283,"model":"gpt-4o-2024-08-06","service_tier":"default","system_fingerprint":"fp_fc9f1d7035","choices":[{"index":0,"delta":{},"logprobs":null,"finish_reason":"stop"}],"usage":null}"#,
        "\n\n",
    );
    const OPENAI_CHAT_USAGE_CHUNK: &str = concat!(
        r#"data: {"id":"chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT","object":"chat.completion.chunk","created":1741570283,"model":"gpt-4o-2024-08-06","service_tier":"default","system_fingerprint":"fp_fc9f1d7035","choices":[],"usage":{"prompt_tokens":19,"completion_tokens":10,"total_tokens":29,"prompt_tokens_details":{"cached_tokens":0,"audio_tokens":0},"completion_tokens_details":{"reasoning_tokens":0,"audio_tokens":0,"accepted_prediction_tokens":0,"rejected_prediction_tokens":0}}}"#,
        "\n\n",
    );
    /// "Bonjour" and " ! Ça va ? 👋".
    const OPENAI_CHAT_CHARS: u64 = 7 + 12;

    #[test]
    fn openai_chat_stream_with_include_usage_reports_the_last_chunk() {
        let stream = format!("{OPENAI_CHAT_STREAM}{OPENAI_CHAT_USAGE_CHUNK}data: [DONE]\n\n");
        assert_eq!(read_stream(&stream), (usage(19, 10), OPENAI_CHAT_CHARS));
    }

    #[test]
    fn openai_chat_stream_without_include_usage_reports_none_but_counts_text() {
        let stream = format!("{OPENAI_CHAT_STREAM}data: [DONE]\n\n");
        assert_eq!(read_stream(&stream), (None, OPENAI_CHAT_CHARS));
    }

    #[test]
    fn openai_chat_stream_counts_reasoning_and_tool_call_arguments() {
        let stream = concat!(
            r#"data: {"choices":[{"index":0,"delta":{"role":"assistant","reasoning_content":"Think"}}]}"#,
            "\n\n",
            r#"data: {"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"id":"call_1","type":"function","function":{"name":"get_weather","arguments":""}}]}}]}"#,
            "\n\n",
            r#"data: {"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{\"city\":\"Zürich\"}"}}]}}]}"#,
            "\n\n",
            r#"data: {"choices":[],"usage":{"prompt_tokens":80,"completion_tokens":25,"total_tokens":105,"completion_tokens_details":{"reasoning_tokens":12}}}"#,
            "\n\ndata: [DONE]\n\n",
        );
        assert_eq!(read_stream(stream), (usage(80, 25), 5 + 17));
    }

    #[test]
    fn groq_usage_in_x_groq_is_read() {
        let stream = concat!(
            r#"data: {"id":"chatcmpl-1","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"Hi"},"finish_reason":null}]}"#,
            "\n\n",
            r#"data: {"id":"chatcmpl-1","object":"chat.completion.chunk","choices":[{"index":0,"delta":{},"finish_reason":"stop"}],"x_groq":{"id":"req_01","usage":{"queue_time":0.02,"prompt_tokens":24,"prompt_time":0.001,"completion_tokens":3,"completion_time":0.004,"total_tokens":27,"total_time":0.005}}}"#,
            "\n\ndata: [DONE]\n\n",
        );
        assert_eq!(read_stream(stream), (usage(24, 3), 2));
    }

    #[test]
    fn openai_chat_body() {
        let body = r#"{
          "id": "chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG",
          "object": "chat.completion",
          "created": 1741570283,
          "model": "gpt-4o-2024-08-06",
          "choices": [{"index": 0, "message": {"role": "assistant", "content": "The image shows a wooden boardwalk.", "refusal": null, "annotations": []}, "logprobs": null, "finish_reason": "stop"}],
          "usage": {
            "prompt_tokens": 1117, "completion_tokens": 46, "total_tokens": 1163,
            "prompt_tokens_details": {"cached_tokens": 1024, "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0, "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0}
          },
          "service_tier": "default",
          "system_fingerprint": "fp_fc9f1d7035"
        }"#;
        assert_eq!(from_body(body.as_bytes()), cached(1117, 46, 1024));
        assert_eq!(from_body(body.as_bytes()).map(|u| u.total()), Some(1163));
    }

    fn responses_stream(deltas: &[&str]) -> String {
        let created = r#"data: {"type":"response.created","sequence_number":0,"response":{"id":"resp_67c9fdcecf488190bdd9a0409de3a1ec07b8b0ad4e5eb654","object":"response","created_at":1741290958,"status":"in_progress","error":null,"incomplete_details":null,"instructions":"You are a helpful assistant.","max_output_tokens":null,"model":"gpt-4.1-2025-04-14","output":[],"parallel_tool_calls":true,"previous_response_id":null,"reasoning":{"effort":null,"summary":null},"store":true,"temperature":1.0,"text":{"format":{"type":"text"}},"tool_choice":"auto","tools":[],"top_p":1.0,"truncation":"disabled","usage":null,"user":null,"metadata":{}}}"#;
        let item = "msg_67c9fdcf37fc8190ba82116e33fb28c507b8b0ad4e5eb654";
        let mut stream = format!("event: response.created\n{created}\n\n");
        for (n, delta) in deltas.iter().enumerate() {
            let json = serde_json::json!({"type": "response.output_text.delta", "sequence_number": n + 4,
                "item_id": item, "output_index": 0, "content_index": 0, "delta": delta});
            stream += &format!("event: response.output_text.delta\ndata: {json}\n\n");
        }
        let text = deltas.concat();
        let done = serde_json::json!({"type": "response.output_text.done", "sequence_number": 90, "item_id": item,
            "output_index": 0, "content_index": 0, "text": text});
        let completed = serde_json::json!({"type": "response.completed", "sequence_number": 91, "response": {
            "id": "resp_67c9fdcecf488190bdd9a0409de3a1ec07b8b0ad4e5eb654", "object": "response",
            "created_at": 1741290958, "status": "completed", "error": null, "incomplete_details": null,
            "instructions": "You are a helpful assistant.", "max_output_tokens": null, "model": "gpt-4.1-2025-04-14",
            "output": [{"id": item, "type": "message", "status": "completed", "role": "assistant",
                "content": [{"type": "output_text", "text": text, "annotations": []}]}],
            "parallel_tool_calls": true, "previous_response_id": null, "reasoning": {"effort": null, "summary": null},
            "store": true, "temperature": 1.0, "text": {"format": {"type": "text"}}, "tool_choice": "auto", "tools": [],
            "top_p": 1.0, "truncation": "disabled",
            "usage": {"input_tokens": 37, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": 11,
                "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 48},
            "user": null, "metadata": {}}});
        // serde_json sorts keys, which keeps `usage` after `output` and `tools` as OpenAI sends it.
        stream
            + &format!(
                "event: response.output_text.done\ndata: {done}\n\nevent: response.completed\ndata: {completed}\n\n"
            )
    }

    #[test]
    fn openai_responses_stream_reports_response_completed() {
        let stream = responses_stream(&["Hi there", "! Schön 😊"]);
        assert_eq!(read_stream(&stream), (usage(37, 11), 8 + 9));
    }

    #[test]
    fn openai_responses_completed_longer_than_a_line_still_reports_usage() {
        let deltas = vec!["All work and no play makes Jack a dull boy. "; 3_000];
        let stream = responses_stream(&deltas);
        assert!(stream.lines().any(|line| line.len() > 2 * MAX_LINE));
        assert_eq!(read_stream_in_random_chunks(&stream, 3), (usage(37, 11), 44 * 3_000));
    }

    #[test]
    fn openai_responses_body() {
        let body = r#"{"id":"resp_67ccd3a9da748190baa7f1570fe91ac604becb25c45c1d41","object":"response","created_at":1741476777,
          "status":"completed","error":null,"incomplete_details":null,"instructions":null,"max_output_tokens":null,
          "model":"gpt-4o-2024-08-06","output":[{"type":"message","id":"msg_67ccd3acc8d48190a77525dc6de64b4104becb25c45c1d41",
          "status":"completed","role":"assistant","content":[{"type":"output_text","text":"The image depicts a scenic landscape.","annotations":[]}]}],
          "parallel_tool_calls":true,"previous_response_id":null,"reasoning":{"effort":null,"summary":null},"store":true,
          "temperature":1.0,"text":{"format":{"type":"text"}},"tool_choice":"auto","tools":[],"top_p":1.0,"truncation":"disabled",
          "usage":{"input_tokens":328,"input_tokens_details":{"cached_tokens":256},"output_tokens":52,
          "output_tokens_details":{"reasoning_tokens":0},"total_tokens":380},"user":null,"metadata":{}}"#;
        assert_eq!(from_body(body.as_bytes()), cached(328, 52, 256));
    }

    const ANTHROPIC_STREAM: &str = concat!(
        "event: message_start\n",
        r#"data: {"type":"message_start","message":{"id":"msg_01XFDUDYJgAACzvnptvVoYEL","type":"message","role":"assistant","model":"claude-sonnet-4-20250514","content":[],"stop_reason":null,"stop_sequence":null,"usage":{"input_tokens":472,"cache_creation_input_tokens":0,"cache_read_input_tokens":2048,"output_tokens":1,"service_tier":"standard"}}}"#,
        "\n\nevent: content_block_start\n",
        r#"data: {"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}"#,
        "\n\nevent: ping\n",
        r#"data: {"type": "ping"}"#,
        "\n\nevent: content_block_delta\n",
        r#"data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hello"}}"#,
        "\n\nevent: content_block_delta\n",
        r#"data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"! Grüße 🌍"}}"#,
        "\n\nevent: content_block_stop\n",
        r#"data: {"type":"content_block_stop","index":0}"#,
        "\n\nevent: message_delta\n",
        r#"data: {"type":"message_delta","delta":{"stop_reason":"end_turn","stop_sequence":null},"usage":{"output_tokens":15}}"#,
        "\n\nevent: message_stop\n",
        r#"data: {"type":"message_stop"}"#,
        "\n\n",
    );

    #[test]
    fn anthropic_stream_adds_cache_reads_to_input() {
        assert_eq!(read_stream(ANTHROPIC_STREAM), (cached(472 + 2048, 15, 2048), 5 + 9));
    }

    #[test]
    fn anthropic_output_is_cumulative_the_last_delta_counts() {
        let stream = ANTHROPIC_STREAM.replace(
            "event: message_stop",
            concat!(
                "event: message_delta\n",
                r#"data: {"type":"message_delta","delta":{"stop_reason":"end_turn","stop_sequence":null},"usage":{"output_tokens":27}}"#,
                "\n\nevent: message_stop",
            ),
        );
        assert_eq!(read_stream(&stream), (cached(2520, 27, 2048), 14));
    }

    #[test]
    fn anthropic_message_delta_input_fields_replace_those_of_message_start() {
        let stream = ANTHROPIC_STREAM.replace(
            r#""usage":{"output_tokens":15}"#,
            r#""usage":{"input_tokens":472,"cache_creation_input_tokens":100,"cache_read_input_tokens":2048,"output_tokens":15,"server_tool_use":{"web_search_requests":0}}"#,
        );
        assert_eq!(read_stream(&stream), (cached(472 + 100 + 2048, 15, 2048), 14));
    }

    #[test]
    fn anthropic_stream_counts_thinking_and_tool_input() {
        let stream = concat!(
            "event: message_start\n",
            r#"data: {"type":"message_start","message":{"id":"msg_01","type":"message","role":"assistant","content":[],"model":"claude-opus-4-1","usage":{"input_tokens":610,"output_tokens":3}}}"#,
            "\n\nevent: content_block_delta\n",
            r#"data: {"type":"content_block_delta","index":0,"delta":{"type":"thinking_delta","thinking":"Need weather."}}"#,
            "\n\nevent: content_block_delta\n",
            r#"data: {"type":"content_block_delta","index":0,"delta":{"type":"signature_delta","signature":"EqQBCgIYAhIM1gbcDa9GJwZA2b3hGgxBdjrkzLoky3dl1pkiMOYds"}}"#,
            "\n\nevent: content_block_delta\n",
            r#"data: {"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":"{\"location\": \"San"}}"#,
            "\n\nevent: message_delta\n",
            r#"data: {"type":"message_delta","delta":{"stop_reason":"tool_use","stop_sequence":null},"usage":{"output_tokens":89}}"#,
            "\n\n",
        );
        assert_eq!(read_stream(stream), (usage(610, 89), 13 + 17));
    }

    #[test]
    fn anthropic_body_adds_cache_writes_and_reads_to_input() {
        let body = r#"{"id":"msg_013Zva2CMHLNnXjNJJKqJ2EF","type":"message","role":"assistant","model":"claude-sonnet-4-20250514",
          "content":[{"type":"text","text":"Hi! My name is Claude."}],"stop_reason":"end_turn","stop_sequence":null,
          "usage":{"input_tokens":21,"cache_creation_input_tokens":188086,"cache_read_input_tokens":0,"output_tokens":393,
          "service_tier":"standard"}}"#;
        assert_eq!(from_body(body.as_bytes()), usage(21 + 188_086, 393));
    }

    const GEMINI_STREAM: &str = concat!(
        r#"data: {"candidates": [{"content": {"parts": [{"text": "The"}],"role": "model"},"index": 0}],"usageMetadata": {"promptTokenCount": 8,"totalTokenCount": 8,"promptTokensDetails": [{"modality": "TEXT","tokenCount": 8}]},"modelVersion": "gemini-2.5-flash","responseId": "Ae5gaPqhFsb3nvgPsK7t0Qo"}"#,
        "\r\n\r\n",
        r#"data: {"candidates": [{"content": {"parts": [{"text": " sky is blue — ☀️ mostly."}],"role": "model"},"finishReason": "STOP","index": 0}],"usageMetadata": {"promptTokenCount": 8,"candidatesTokenCount": 9,"totalTokenCount": 50,"promptTokensDetails": [{"modality": "TEXT","tokenCount": 8}],"thoughtsTokenCount": 33},"modelVersion": "gemini-2.5-flash","responseId": "Ae5gaPqhFsb3nvgPsK7t0Qo"}"#,
        "\r\n\r\n",
    );

    #[test]
    fn gemini_stream_last_usage_metadata_counts_with_thoughts_as_output() {
        // "The", then " sky is blue — ☀️ mostly." (☀️ is two characters: U+2600 U+FE0F).
        assert_eq!(read_stream(GEMINI_STREAM), (usage(8, 9 + 33), 3 + 25));
    }

    #[test]
    fn gemini_body_and_vertex_array_body() {
        let body = r#"{"candidates":[{"content":{"parts":[{"text":"Hello there"}],"role":"model"},"finishReason":"STOP","avgLogprobs":-0.05}],
          "usageMetadata":{"promptTokenCount":1200,"candidatesTokenCount":40,"totalTokenCount":1300,"cachedContentTokenCount":1024,
          "thoughtsTokenCount":60,"promptTokensDetails":[{"modality":"TEXT","tokenCount":1200}]},"modelVersion":"gemini-2.5-pro"}"#;
        assert_eq!(from_body(body.as_bytes()), cached(1200, 100, 1024));
        let array = r#"[{"candidates":[{"content":{"role":"model","parts":[{"text":"Hel"}]}}],"usageMetadata":{"promptTokenCount":5,"totalTokenCount":5}},
          {"candidates":[{"content":{"role":"model","parts":[{"text":"lo"}]},"finishReason":"STOP"}],
           "usageMetadata":{"promptTokenCount":5,"candidatesTokenCount":2,"totalTokenCount":7}}]"#;
        assert_eq!(from_body(array.as_bytes()), usage(5, 2));
    }

    #[test]
    fn a_reported_total_beyond_input_and_output_is_charged_as_output() {
        let body = br#"{"usageMetadata":{"promptTokenCount":10,"candidatesTokenCount":5,"toolUsePromptTokenCount":4,"totalTokenCount":30}}"#;
        assert_eq!(from_body(body), usage(14, 16));
        assert_eq!(from_body(br#"{"usage":{"prompt_tokens":10,"total_tokens":12}}"#), usage(10, 2));
    }

    #[test]
    fn sse_data_without_space_comments_ids_and_retry_are_handled() {
        let stream = concat!(
            ": OPENROUTER PROCESSING\n\n",
            "retry: 3000\nid: 7\n",
            r#"data:{"choices":[{"delta":{"content":"ok"}}]}"#,
            "\n\n:keep-alive\n",
            r#"data:{"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":1}}"#,
            "\n\ndata:[DONE]\n\n",
        );
        assert_eq!(read_stream(stream), (usage(3, 1), 2));
    }

    #[test]
    fn sse_multi_line_data_is_joined_with_newlines() {
        let stream = "event: message_delta\ndata: {\"type\": \"message_delta\",\ndata: \"usage\": {\"output_tokens\": 9}\ndata: }\n\n";
        assert_eq!(read_stream(stream), (usage(0, 9), 0));
    }

    #[test]
    fn sse_lone_cr_and_mixed_line_endings() {
        let stream = concat!(
            r#"data: {"choices":[{"delta":{"content":"a"}}]}"#,
            "\r\r",
            r#"data: {"choices":[{"delta":{"content":"b"}}]}"#,
            "\n\r\n",
            r#"data: {"choices":[],"usage":{"prompt_tokens":2,"completion_tokens":2}}"#,
            "\r\n\n",
        );
        assert_eq!(read_stream(stream), (usage(2, 2), 2));
    }

    #[test]
    fn only_a_stream_s_last_count_is_final() {
        let read = |stream: &str| {
            let mut reader = StreamUsage::new();
            reader.feed(stream.as_bytes());
            (reader.finish().is_some(), reader.is_final())
        };
        let chat = format!("{OPENAI_CHAT_STREAM}{OPENAI_CHAT_USAGE_CHUNK}data: [DONE]\n\n");
        let responses = responses_stream(&["Hi"]);
        for stream in [chat.as_str(), ANTHROPIC_STREAM, GEMINI_STREAM, &responses] {
            assert_eq!(read(stream), (true, true), "{stream}");
        }
        // Cut short: Anthropic after `message_start`, Gemini before its `finishReason`, a usage on
        // every chunk (vLLM's `continuous_usage_stats`) before the last.
        let anthropic = ANTHROPIC_STREAM.split("event: message_delta").next().unwrap_or_default();
        let gemini = GEMINI_STREAM.split("\r\n\r\n").next().unwrap_or_default();
        let running = r#"data: {"choices":[{"delta":{"content":"a"},"finish_reason":null}],"usage":{"prompt_tokens":5,"completion_tokens":1}}"#;
        for stream in [anthropic, gemini, running] {
            assert_eq!(read(stream), (true, false), "{stream}");
        }
        assert_eq!(read(OPENAI_CHAT_STREAM), (false, false), "no usage at all");
        let last = r#"data: {"choices":[{"delta":{},"finish_reason":"stop"}],"usage":{"prompt_tokens":5,"completion_tokens":2}}"#;
        assert_eq!(read(&format!("{running}\n\n{last}\n\n")), (true, true), "the last chunk's count");
    }

    #[test]
    fn an_event_left_unterminated_is_read_at_finish_and_finish_repeats() {
        let stream = r#"data: {"choices":[],"usage":{"prompt_tokens":4,"completion_tokens":6}}"#;
        assert_eq!(read_stream(stream), (usage(4, 6), 0));
        let mut reader = StreamUsage::new();
        reader.feed(stream.as_bytes());
        assert_eq!(reader.finish(), usage(4, 6));
        assert_eq!(reader.finish(), usage(4, 6));
    }

    #[test]
    fn garbage_bodies_read_as_none() {
        for body in [
            &b""[..],
            b"not json",
            b"\xff\xfe\x00garbage",
            b"{\"usage\":{\"prompt_tokens\":12",
            b"{\"usage\":null}",
            b"{\"usage\":{\"foo\":1}}",
            b"{\"usage\":[1,2]}",
            b"{\"usageMetadata\":\"x\"}",
            b"{\"error\":{\"message\":\"Rate limit reached\",\"type\":\"requests\",\"code\":\"rate_limit_exceeded\"}}",
            b"[1,\"a\",null,[]]",
            b"42",
            b"data: {\"usage\":{\"prompt_tokens\":1}}\n\n",
        ] {
            assert_eq!(from_body(body), None, "{}", String::from_utf8_lossy(body));
        }
    }

    #[test]
    fn odd_numbers_are_clamped_or_ignored() {
        let read = |usage: &str| from_body(format!(r#"{{"usage":{usage}}}"#).as_bytes());
        assert_eq!(read(r#"{"prompt_tokens":-5,"completion_tokens":2.7}"#), usage(0, 2));
        assert_eq!(read(r#"{"prompt_tokens":"12","completion_tokens":null}"#), usage(0, 0));
        assert_eq!(
            read(r#"{"prompt_tokens":1e300,"completion_tokens":123456789012345678901234567890}"#),
            usage(u64::MAX, u64::MAX)
        );
        assert_eq!(read(r#"{"prompt_tokens":1e300,"completion_tokens":5}"#).map(|u| u.total()), Some(u64::MAX));
        assert_eq!(
            read(r#"{"input_tokens":18446744073709551615,"cache_read_input_tokens":9,"output_tokens":-0.5}"#),
            cached(u64::MAX, 0, 9)
        );
        let mut reader = StreamUsage::new();
        reader.feed(b"data: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":-3}}\n\n");
        assert_eq!(reader.finish(), usage(0, 0));
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut seed = 7_u64;
        let mut bytes = Vec::new();
        for _ in 0..20_000 {
            seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
            let pick = (seed >> 40) as usize;
            let pieces: [&[u8]; 8] =
                [b"data: ", b"\n", b"\r", b"{\"usage\":{", b"\"prompt_tokens\":", b"\xf0\x9f", b"}", b"[DONE]"];
            match pieces.get(pick % 12) {
                Some(piece) => bytes.extend_from_slice(piece),
                None => bytes.push((seed >> 32) as u8),
            }
        }
        let _ = read_chunks(random_chunks(&bytes, 1));
        let _ = from_body(&bytes);
        for at in (0..bytes.len()).step_by(97) {
            let _ = salvage(&bytes[at..]);
        }
    }

    #[test]
    fn a_megabyte_line_without_newline_stays_bounded_and_the_stream_recovers() {
        let mut reader = StreamUsage::new();
        reader.feed(b"data: {\"choices\":[{\"delta\":{\"content\":\"");
        let filler = vec![b'a'; 1000];
        for _ in 0..1_000 {
            reader.feed(&filler);
            assert!(reader.line.len() <= MAX_LINE + TAIL, "{}", reader.line.len());
        }
        reader.feed(&[b'b'; 1 << 20]);
        assert!(reader.line.len() <= MAX_LINE + TAIL && reader.data.len() <= MAX_LINE);
        reader.feed(b"\"}}]}\n\ndata: {\"choices\":[{\"delta\":{\"content\":\"ok\"}}],\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":2}}\n\n");
        assert_eq!((reader.finish(), reader.text_chars()), (usage(1, 2), 2));
        assert!(reader.line.capacity() <= 2 * (MAX_LINE + TAIL) && reader.data.capacity() <= 2 * MAX_LINE);
    }

    #[test]
    fn event_data_over_the_bound_across_lines_is_dropped() {
        let line = format!("data: \"{}\"\n", "x".repeat(40_000));
        let stream = format!("{line}{line}\ndata: {{\"usage\":{{\"prompt_tokens\":1,\"completion_tokens\":1}}}}\n\n");
        let mut reader = StreamUsage::new();
        reader.feed(stream.as_bytes());
        assert!(reader.data.capacity() <= MAX_LINE);
        assert_eq!(reader.finish(), usage(1, 1));
    }
}
