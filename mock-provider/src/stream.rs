//! Streamed answers on the wire: events rendered as server-sent events (or Gemini's
//! JSON array), split into chunks whose boundaries ignore event, line and UTF-8
//! character boundaries, and sent as a chunked body with short pauses, the way a
//! proxy sees a real provider's stream arrive.

use std::convert::Infallible;
use std::time::Duration;

use axum::body::{Body, Bytes};
use serde_json::Value;

/// One server-sent event: an optional `event:` name and one `data:` line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    pub name: Option<String>,
    pub data: String,
}

impl Event {
    /// A `data:`-only event (OpenAI chat, Gemini).
    pub fn data(json: &Value) -> Self {
        Event { name: None, data: json.to_string() }
    }
}

/// The events as SSE text: `event: NAME` (if named) and `data: DATA` lines, each event
/// ended by a blank line. `eol` is "\n" (OpenAI, Anthropic) or "\r\n" (Gemini).
pub fn sse(events: &[Event], eol: &str) -> Vec<u8> {
    let mut out = String::new();
    for e in events {
        if let Some(name) = &e.name {
            out += &format!("event: {name}{eol}");
        }
        out += &format!("data: {}{eol}{eol}", e.data);
    }
    out.into_bytes()
}

/// Gemini's `:streamGenerateContent` without `alt=sse`: one JSON array, an element a chunk.
pub fn json_array(items: &[Value]) -> Vec<u8> {
    let items: Vec<String> = items.iter().map(Value::to_string).collect();
    format!("[{}]", items.join(",\r\n")).into_bytes()
}

/// Sizes of the successive pieces on the wire, cycled: 7..=40 bytes, none a divisor of
/// another's offset, so boundaries fall anywhere (inside `data:`, inside JSON, between
/// `\r` and `\n`, inside a multi-byte character).
const CHUNK_SIZES: [usize; 10] = [7, 23, 12, 40, 9, 31, 17, 26, 8, 35];

/// Splits the stream's bytes into pieces of `CHUNK_SIZES` bytes, in turn.
pub fn split(bytes: &[u8]) -> Vec<Bytes> {
    let mut pieces = Vec::new();
    let mut at = 0;
    for size in CHUNK_SIZES.iter().cycle() {
        if at >= bytes.len() {
            break;
        }
        let end = (at + size).min(bytes.len());
        pieces.push(Bytes::copy_from_slice(&bytes[at..end]));
        at = end;
    }
    pieces
}

/// Reply text in the pieces the deltas carry: 3..=14 characters each, cut on character
/// (never byte) boundaries.
pub fn deltas(text: &str) -> impl Iterator<Item = &str> {
    const DELTA_CHARS: [usize; 8] = [6, 11, 4, 9, 14, 7, 3, 10];
    let mut rest = text;
    DELTA_CHARS.iter().cycle().map_while(move |&n| {
        if rest.is_empty() {
            return None;
        }
        let end = rest.char_indices().nth(n).map_or(rest.len(), |(i, _)| i);
        let (piece, after) = rest.split_at(end);
        rest = after;
        Some(piece)
    })
}

/// At most this many pauses a stream, however long, so a 4096-token answer takes
/// about a tenth of a second, not seconds.
const MAX_PAUSES: usize = 24;
/// Pauses come no more often than after every this many pieces.
const PAUSE_EVERY: usize = 4;

/// A chunked body sending `pieces` one by one, pausing 1..=5 ms between some of them.
/// `guard` lives as long as the body is being sent (dropped at its end or when the
/// client goes away): an in-flight count covers the whole stream.
pub fn body<G: Send + 'static>(pieces: Vec<Bytes>, guard: G) -> Body {
    let stride = (pieces.len() / MAX_PAUSES).max(PAUSE_EVERY);
    let state = (pieces.into_iter().enumerate(), guard);
    Body::from_stream(futures_util::stream::unfold(state, move |(mut pieces, guard)| async move {
        let (i, piece) = pieces.next()?;
        if i > 0 && i % stride == 0 {
            tokio::time::sleep(Duration::from_millis(1 + (i / stride % 5) as u64)).await;
        }
        Some((Ok::<_, Infallible>(piece), (pieces, guard)))
    }))
}

/// Reads SSE text back into (event name, data) pairs; for tests (here and in shapes).
#[cfg(test)]
pub fn parse_sse(text: &str) -> Vec<(Option<String>, String)> {
    let text = text.replace("\r\n", "\n");
    let blocks = text.split("\n\n").filter(|b| !b.is_empty());
    blocks
        .map(|block| {
            let (mut name, mut data) = (None, String::new());
            for line in block.lines() {
                match line.split_once(": ") {
                    Some(("event", v)) => name = Some(v.to_string()),
                    Some(("data", v)) => data += v,
                    _ => panic!("unexpected line {line:?}"),
                }
            }
            (name, data)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_events() {
        let events =
            [Event { name: Some("ping".into()), data: "{}".into() }, Event { name: None, data: "[DONE]".into() }];
        assert_eq!(sse(&events, "\n"), b"event: ping\ndata: {}\n\ndata: [DONE]\n\n");
        assert_eq!(sse(&events[1..], "\r\n"), b"data: [DONE]\r\n\r\n");
        let parsed = parse_sse(std::str::from_utf8(&sse(&events, "\r\n")).unwrap());
        assert_eq!(parsed, [(Some("ping".into()), "{}".into()), (None, "[DONE]".into())]);
        assert_eq!(json_array(&[serde_json::json!({"a": 1}), serde_json::json!(2)]), b"[{\"a\":1},\r\n2]");
    }

    #[test]
    fn splits_anywhere_and_loses_nothing() {
        let text = "data: {\"text\":\"café — é\"}\n\n".repeat(20);
        let pieces = split(text.as_bytes());
        assert_eq!(pieces.concat(), text.as_bytes());
        assert!(pieces.iter().all(|p| (1..=40).contains(&p.len())));
        assert!(pieces[..pieces.len() - 1].iter().all(|p| p.len() >= 7));
        assert!(pieces.iter().any(|p| std::str::from_utf8(p).is_err()), "some piece cuts a character");
        assert!(pieces.iter().filter(|p| p.ends_with(b"\n\n")).count() < pieces.len() / 4);
    }

    #[test]
    fn deltas_cut_on_characters() {
        let text = "é—".repeat(20);
        let pieces: Vec<&str> = deltas(&text).collect();
        assert_eq!(pieces.concat(), text);
        assert_eq!(pieces.iter().map(|p| p.chars().count()).take(3).collect::<Vec<_>>(), [6, 11, 4]);
        assert_eq!(deltas("").count(), 0);
    }

    #[tokio::test]
    async fn body_sends_every_piece_then_drops_the_guard() {
        let pieces = split(&[b'x'; 1000]);
        let guard = std::sync::Arc::new(());
        let body = body(pieces, guard.clone());
        let bytes = axum::body::to_bytes(body, usize::MAX).await.unwrap();
        assert_eq!(bytes.len(), 1000);
        assert_eq!(std::sync::Arc::strong_count(&guard), 1, "the body's guard is gone");
    }
}
