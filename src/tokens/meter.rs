//! One admitted request's LLM tokens: what it reserved, and what its answer says it used.
//!
//! The host feeds the response as it passes (never holding it): a JSON body is collected up to a
//! bound and read whole at the end; a server-sent event stream is read chunk by chunk. What the
//! request used is then:
//! - for a 2xx, the `usage` the provider reported, when it is its last word;
//! - otherwise at least the reservation: a stream with no usage (OpenAI without
//!   `stream_options.include_usage`) or cut short (client gone, upstream reset) before its last
//!   count, no answer, a JSON body too large or unreadable. What the stream showed (a running
//!   count's input, its output or the streamed text's size in tokens) is charged where it is
//!   more. Charging less than the reservation would let a request with no usage pass for free
//!   whatever it generated;
//! - nothing for a 4xx: the provider refused it before generating anything (a 429 is its own
//!   limiter's refusal, which its reset headers already turn into a hold). The client's retry
//!   reserves again: keeping this reservation too would charge one answer twice;
//! - the reservation for a 5xx, or no status: a gateway timeout or reset may come after the
//!   provider generated the whole answer, and an error body says nothing of that.
//!
//! ```
//! use llm_ratelimit::admission::TokenNeed;
//! use llm_ratelimit::tokens::meter::Meter;
//!
//! let mut m = Meter::new(TokenNeed { bucket: 0, tokens: 1100, input: 0 }, 100, 4.0);
//! m.answer(200, "application/json", 1 << 20);
//! m.feed(br#"{"usage":{"prompt_tokens":90,"completion_tokens":30,"prompt_tokens_details":{"cached_tokens":64}}}"#);
//! let used = m.used();
//! assert_eq!((used.input, used.output, used.cached_input, used.reported), (90, 30, 64, true));
//! ```

use super::usage::{self, StreamUsage, Usage};
use crate::admission::TokenNeed;

/// What the answer is being read as.
#[derive(Debug)]
enum Reading {
    /// No answer yet (or one with no body), or one whose use is unknown: the estimate.
    Nothing,
    /// Refused by the provider (4xx): nothing was used.
    Refused,
    /// A JSON body, collected up to `max` bytes (`None` once it outgrew them).
    Json {
        body: Option<Vec<u8>>,
        max: usize,
    },
    Stream(Box<StreamUsage>),
}

/// Tokens one request used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Used {
    pub input: u64,
    pub output: u64,
    /// The part of `input` the provider read from its prompt cache
    /// ([`Usage::cached_input`](super::usage::Usage::cached_input)), as it reported it; 0 when it
    /// did not (an estimate's input).
    pub cached_input: u64,
    /// The provider reported them (else they are the estimate, or counted from the stream).
    pub reported: bool,
}

impl Used {
    pub fn total(&self) -> u64 {
        self.input.saturating_add(self.output)
    }
}

/// The tokens of one admitted request.
#[derive(Debug)]
pub struct Meter {
    /// What it reserved, and from which bucket.
    pub need: TokenNeed,
    /// The estimated input part of the reservation.
    input: u64,
    chars_per_token: f64,
    reading: Reading,
}

impl Meter {
    pub fn new(need: TokenNeed, estimated_input: u64, chars_per_token: f64) -> Meter {
        Meter { need, input: estimated_input.min(need.tokens), chars_per_token, reading: Reading::Nothing }
    }

    /// The answer's status and content type are known: how to read what follows.
    pub fn answer(&mut self, status: u16, content_type: &str, max_body: usize) {
        let media = content_type.split(';').next().unwrap_or("").trim();
        self.reading = if (400..500).contains(&status) {
            Reading::Refused
        } else if !(200..300).contains(&status) {
            Reading::Nothing
        } else if media.eq_ignore_ascii_case("text/event-stream") {
            Reading::Stream(Box::default())
        } else {
            Reading::Json { body: Some(Vec::new()), max: max_body }
        };
    }

    /// Whether the body is worth reading (for the host: skip the copy otherwise).
    pub fn wants_body(&self) -> bool {
        matches!(self.reading, Reading::Stream(_) | Reading::Json { body: Some(_), .. })
    }

    /// One chunk of the answer's body, in order.
    pub fn feed(&mut self, chunk: &[u8]) {
        match &mut self.reading {
            Reading::Stream(s) => s.feed(chunk),
            Reading::Json { body, max } => {
                let fits = body.as_ref().is_some_and(|b| b.len().saturating_add(chunk.len()) <= *max);
                match body {
                    Some(b) if fits => b.extend_from_slice(chunk),
                    // Too large to read whole: charged at the estimate.
                    _ => *body = None,
                }
            }
            Reading::Nothing | Reading::Refused => {}
        }
    }

    /// What the request used, once its answer is over (or will never come).
    pub fn used(&mut self) -> Used {
        let estimate =
            Used { input: self.input, output: self.need.tokens - self.input, cached_input: 0, reported: false };
        let reported =
            |u: Usage| Used { input: u.input, output: u.output, cached_input: u.cached_input, reported: true };
        match &mut self.reading {
            Reading::Refused => Used { input: 0, output: 0, cached_input: 0, reported: false },
            Reading::Nothing => estimate,
            Reading::Json { body, .. } => body.as_deref().and_then(usage::from_body).map_or(estimate, reported),
            Reading::Stream(s) => {
                let usage = s.finish();
                match usage {
                    Some(u) if s.is_final() => reported(u),
                    _ => {
                        // A running count's input is the provider's (and so is its cached
                        // part); the output is what the stream showed, and at least the rest of
                        // the reservation.
                        let per_token = if self.chars_per_token > 0.0 { self.chars_per_token } else { 4.0 };
                        let text = (s.text_chars() as f64 / per_token).ceil() as u64;
                        let input = usage.map_or(estimate.input, |u| u.input);
                        let shown = usage.map_or(0, |u| u.output).max(text);
                        let output = shown.max(self.need.tokens.saturating_sub(input));
                        Used { input, output, cached_input: usage.map_or(0, |u| u.cached_input), reported: false }
                    }
                }
            }
        }
    }
}

/// `|actual - estimate|` as a whole percentage of the estimate (0 for a zero estimate).
pub fn error_pct(estimate: u64, actual: u64) -> u64 {
    if estimate == 0 {
        return 0;
    }
    (estimate.abs_diff(actual) as f64 * 100.0 / estimate as f64).round() as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    const NEED: TokenNeed = TokenNeed { bucket: 0, tokens: 1000, input: 0 };

    fn meter() -> Meter {
        Meter::new(NEED, 200, 4.0)
    }

    #[test]
    fn a_json_answer_reports_its_usage_whatever_the_chunking() {
        let body =
            br#"{"type":"message","usage":{"input_tokens":180,"cache_read_input_tokens":20,"output_tokens":57}}"#;
        for split in 0..body.len() {
            let mut m = meter();
            m.answer(200, "application/json; charset=utf-8", 1 << 20);
            m.feed(&body[..split]);
            m.feed(&body[split..]);
            assert_eq!(m.used(), Used { input: 200, output: 57, cached_input: 20, reported: true });
        }
    }

    #[test]
    fn a_stream_reports_its_usage_or_is_charged_by_its_text_and_at_least_its_estimate() {
        let stream = b"event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":150,\"output_tokens\":1}}}\n\n\
event: message_delta\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":42}}\n\n";
        let mut m = meter();
        m.answer(200, "text/event-stream", 0);
        m.feed(stream);
        assert_eq!(m.used(), Used { input: 150, output: 42, cached_input: 0, reported: true });

        // No usage in the stream: the estimated input plus the streamed text at 4 chars a token,
        // and at least the reservation.
        let mut m = meter();
        m.answer(200, "Text/Event-Stream", 0);
        m.feed(
            format!("data: {{\"choices\":[{{\"delta\":{{\"content\":\"{}\"}}}}]}}\n\n", "x".repeat(3999)).as_bytes(),
        );
        assert_eq!(m.used(), Used { input: 200, output: 1000, cached_input: 0, reported: false });
    }

    #[test]
    fn no_answer_an_unreadable_one_or_one_too_large_costs_the_estimate() {
        let estimate = Used { input: 200, output: 800, cached_input: 0, reported: false };
        assert_eq!(meter().used(), estimate, "client gone before the answer");
        let mut m = meter();
        m.answer(200, "application/json", 10);
        m.feed(br#"{"usage":{"prompt_tokens":1,"completion_tokens":1}}"#);
        assert_eq!(m.used(), estimate, "larger than the bound");
        let mut m = meter();
        m.answer(200, "application/json", 100);
        m.feed(b"not json");
        assert_eq!(m.used(), estimate);
    }

    #[test]
    fn a_refused_request_used_nothing_a_failed_one_its_estimate() {
        // Refused before any generation (a 429 by the provider's own limiter): all given back.
        for status in [400, 401, 404, 413, 422, 429] {
            let mut m = meter();
            m.answer(status, "application/json", 100);
            assert!(!m.wants_body());
            m.feed(br#"{"usage":{"prompt_tokens":1,"completion_tokens":1}}"#);
            assert_eq!(m.used().total(), 0, "{status}");
        }
        // A server error, a gateway timeout or reset, no status: it may have generated it all.
        for status in [500, 502, 503, 504, 529, 0, 101, 304] {
            let mut m = meter();
            m.answer(status, "text/event-stream", 100);
            assert!(!m.wants_body());
            m.feed(b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":1}}\n\n");
            assert_eq!(m.used(), Used { input: 200, output: 800, cached_input: 0, reported: false }, "{status}");
        }
    }

    #[test]
    fn an_answer_without_a_final_usage_is_charged_at_least_its_estimate() {
        let used = |content_type: &str, body: &[u8]| {
            let mut m = meter();
            m.answer(200, content_type, 1 << 20);
            m.feed(body);
            m.used()
        };
        let charged = |input, output| Used { input, output, cached_input: 0, reported: false };
        // OpenAI without `stream_options.include_usage`: 10 characters, far less than reserved.
        let text =
            |s: &str| format!("data: {{\"choices\":[{{\"delta\":{{\"content\":\"{s}\"}}}}]}}\n\ndata: [DONE]\n\n");
        assert_eq!(used("text/event-stream", text("0123456789").as_bytes()), charged(200, 800));
        // More text than the estimate's output: the text.
        assert_eq!(used("text/event-stream", text(&"x".repeat(4000)).as_bytes()), charged(200, 1000));
        // Anthropic cut short after `message_start`: its input as reported, its output a running
        // count (1), so at least the rest of the reservation.
        let start = br#"data: {"type":"message_start","message":{"usage":{"input_tokens":150,"output_tokens":1}}}

data: {"type":"content_block_delta","delta":{"type":"text_delta","text":"Hello"}}

"#;
        assert_eq!(used("text/event-stream", start), charged(150, 850));
        // Gemini cut short: a chunk's running `usageMetadata`, no `finishReason` yet.
        let gemini = br#"data: {"candidates":[{"content":{"parts":[{"text":"The"}]}}],"usageMetadata":{"promptTokenCount":300,"totalTokenCount":300}}

"#;
        assert_eq!(used("text/event-stream", gemini), charged(300, 700));
        // vLLM's running usage on every chunk, cut before the last.
        let running = br#"data: {"choices":[{"delta":{"content":"ab"},"finish_reason":null}],"usage":{"prompt_tokens":90,"completion_tokens":2}}

"#;
        assert_eq!(used("text/event-stream", running), charged(90, 910));
        // A 2xx JSON body with no usage: the estimate.
        assert_eq!(used("application/json", br#"{"choices":[]}"#), charged(200, 800));
        // A final usage, whatever it says, is the provider's word.
        let done = br#"data: {"choices":[{"delta":{},"finish_reason":"stop"}],"usage":{"prompt_tokens":90,"completion_tokens":2}}

"#;
        assert_eq!(used("text/event-stream", done), Used { input: 90, output: 2, cached_input: 0, reported: true });
    }

    #[test]
    fn the_cached_input_is_carried_from_the_provider_s_count() {
        let used = |content_type: &str, body: &[u8]| {
            let mut m = meter();
            m.answer(200, content_type, 1 << 20);
            m.feed(body);
            m.used()
        };
        let body =
            br#"{"usageMetadata":{"promptTokenCount":300,"cachedContentTokenCount":256,"candidatesTokenCount":9}}"#;
        assert_eq!(used("application/json", body), Used { input: 300, output: 9, cached_input: 256, reported: true });
        // Anthropic cut short after `message_start`: its input, and the cached part of it, are
        // the provider's count; the output is at least the rest of the reservation.
        let start = br#"data: {"type":"message_start","message":{"usage":{"input_tokens":50,"cache_read_input_tokens":100,"output_tokens":1}}}

"#;
        assert_eq!(
            used("text/event-stream", start),
            Used { input: 150, output: 850, cached_input: 100, reported: false }
        );
        assert_eq!(used("application/json", b"{}").cached_input, 0, "the estimate has none");
    }

    #[test]
    fn estimated_input_never_exceeds_the_reservation() {
        let mut m = Meter::new(TokenNeed { bucket: 0, tokens: 10, input: 0 }, 50, 4.0);
        assert_eq!(m.used(), Used { input: 10, output: 0, cached_input: 0, reported: false });
    }

    #[test]
    fn error_pct_is_relative_to_the_estimate() {
        assert_eq!(error_pct(1000, 900), 10);
        assert_eq!(error_pct(1000, 1500), 50);
        assert_eq!(error_pct(0, 5), 0);
        assert_eq!(error_pct(3, 4), 33);
    }
}
