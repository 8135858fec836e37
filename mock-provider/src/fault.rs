//! Provider faults below the quota: connections reset, bytes that are not HTTP, and 429s whose
//! rate-limit headers and body are garbage. `--fault KIND` (or `"fault"` in `POST /mock/config`,
//! or a request's `x-mock-fault` header) turns one on for the LLM endpoints; `/mock/*` always
//! answers normally, so a test can turn the fault off again.
//!
//! The two wire faults cannot be said with an HTTP response, so the handler answers with a marker
//! header and the connection's writer (`FaultStream`), seeing the marker at the head of the
//! response, resets the connection or writes garbage instead of sending it.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};

use axum::http::{HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    None,
    /// The request is read, then the connection is reset (TCP RST), no byte of answer.
    Reset,
    /// The request is read, then bytes that are not HTTP are sent and the connection closed.
    Garbage,
    /// A 429 whose rate-limit headers (every provider's names) hold nonsense and whose body is
    /// not JSON (nor UTF-8), though it says `application/json`.
    BadLimits,
}

impl Fault {
    const NAMES: [(&'static str, Fault); 4] =
        [("none", Fault::None), ("reset", Fault::Reset), ("garbage", Fault::Garbage), ("bad_limits", Fault::BadLimits)];

    pub fn parse(s: &str) -> Result<Self, String> {
        Self::NAMES.iter().find(|(n, _)| *n == s).map(|&(_, v)| v).ok_or_else(|| {
            let allowed: Vec<&str> = Self::NAMES.iter().map(|(n, _)| *n).collect();
            format!("unknown value '{s}'; allowed: {}", allowed.join(", "))
        })
    }

    pub fn as_str(self) -> &'static str {
        Self::NAMES.iter().find(|(_, x)| *x == self).map(|(n, _)| *n).expect("every variant is named")
    }

    /// The answer that carries the fault (`None` answers normally).
    pub fn response(self) -> Option<Response> {
        match self {
            Fault::None => None,
            Fault::Reset => Some(wire_marker("reset")),
            Fault::Garbage => Some(wire_marker("garbage")),
            Fault::BadLimits => Some(bad_limits()),
        }
    }
}

/// The header the handler sets and the writer looks for; it never leaves the mock.
const MARKER: &str = "x-mock-wire-fault";

fn wire_marker(kind: &'static str) -> Response {
    let mut r = StatusCode::OK.into_response();
    r.headers_mut().insert(HeaderName::from_static(MARKER), HeaderValue::from_static(kind));
    r
}

/// Every family of rate-limit header the filter reads, each with a value it cannot use.
const BAD_HEADERS: [(&str, &[u8]); 16] = [
    ("retry-after", b"soon"),
    ("retry-after-ms", b"99999999999999999999999999"),
    ("x-ratelimit-limit-requests", b"NaN"),
    ("x-ratelimit-remaining-requests", b"-5"),
    ("x-ratelimit-reset-requests", b"1e999s"),
    ("x-ratelimit-limit-tokens", b"\xff\xfe"),
    ("x-ratelimit-remaining-tokens", b"12abc"),
    ("x-ratelimit-reset-tokens", b"-3m-2s"),
    ("x-ratelimit-reset", b"Tue, 99 Foo 1999 25:61:61 GMT"),
    ("anthropic-ratelimit-requests-remaining", b""),
    ("anthropic-ratelimit-requests-reset", b"2024-13-45T99:99:99Z"),
    ("anthropic-ratelimit-tokens-reset", b"0000-00-00T00:00:00.\xc3\x28Z"),
    ("ratelimit", b"limit=, remaining=abc, reset=-1"),
    ("ratelimit-policy", b";;;q=\"\"\"w="),
    ("x-ms-retry-after-ms", b"1.5e308"),
    ("x-should-retry", b"maybe"),
];

/// Starts like a Gemini error, breaks off, then bytes that are not UTF-8.
const BAD_BODY: &[u8] = b"{\"error\": {\"code\": 429, \"details\": [{\"@type\": \"type.googleapis.com/google.rpc.RetryInfo\", \"retryDelay\": \"1e9\xff\xfe\x00\x01s";

fn bad_limits() -> Response {
    let mut r = (StatusCode::TOO_MANY_REQUESTS, BAD_BODY).into_response();
    let h = r.headers_mut();
    h.insert(HeaderName::from_static("content-type"), HeaderValue::from_static("application/json"));
    for (name, value) in BAD_HEADERS {
        h.insert(HeaderName::from_static(name), HeaderValue::from_bytes(value).expect("no control bytes"));
    }
    r
}

/// What is sent instead of an answer for `garbage`.
const GARBAGE: &[u8] = b"\x00\x01\x02\xffSSH-2.0-not-http \xfe\r\n\r\n\x7fELF\x00\x00";

#[derive(Debug, PartialEq)]
enum Wire {
    Reset,
    Garbage,
}

/// The wire fault a response asks for, if `buf` starts one and carries the marker.
fn wire_fault(buf: &[u8]) -> Option<Wire> {
    if !buf.starts_with(b"HTTP/1.") {
        return None;
    }
    let head = &buf[..buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap_or(buf.len())];
    let find = |kind: &str| {
        let needle = format!("\r\n{MARKER}: {kind}");
        head.windows(needle.len()).any(|w| w.eq_ignore_ascii_case(needle.as_bytes()))
    };
    if find("reset") {
        Some(Wire::Reset)
    } else if find("garbage") {
        Some(Wire::Garbage)
    } else {
        None
    }
}

/// The mock's listener: plain TCP whose connections can carry out wire faults.
pub struct FaultListener(pub TcpListener);

impl axum::serve::Listener for FaultListener {
    type Io = FaultStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        let (inner, addr) = axum::serve::Listener::accept(&mut self.0).await;
        (FaultStream { inner }, addr)
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.0.local_addr()
    }
}

pub struct FaultStream {
    inner: TcpStream,
}

impl AsyncRead for FaultStream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for FaultStream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match wire_fault(buf) {
            None => Pin::new(&mut self.inner).poll_write(cx, buf),
            Some(Wire::Reset) => {
                // Closing with a zero linger sends RST instead of FIN.
                let _ = self.inner.set_zero_linger();
                Poll::Ready(Err(io::ErrorKind::ConnectionReset.into()))
            }
            Some(Wire::Garbage) => {
                // A fresh answer's socket buffer has room for these few bytes; then the error
                // makes the server close the connection (FIN, so the garbage arrives first).
                let _ = Pin::new(&mut self.inner).poll_write(cx, GARBAGE);
                Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()))
            }
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_errors_list_them() {
        for (name, f) in Fault::NAMES {
            assert_eq!(Fault::parse(name), Ok(f));
            assert_eq!(f.as_str(), name);
        }
        assert_eq!(
            Fault::parse("boom").unwrap_err(),
            "unknown value 'boom'; allowed: none, reset, garbage, bad_limits"
        );
    }

    #[test]
    fn the_writer_finds_the_marker_only_in_a_response_head() {
        assert_eq!(wire_fault(b"HTTP/1.1 200 OK\r\nx-mock-wire-fault: reset\r\n\r\n"), Some(Wire::Reset));
        assert_eq!(
            wire_fault(b"HTTP/1.1 200 OK\r\nX-Mock-Wire-Fault: garbage\r\ncontent-length: 0\r\n\r\n"),
            Some(Wire::Garbage)
        );
        assert_eq!(wire_fault(b"HTTP/1.1 200 OK\r\ncontent-length: 30\r\n\r\n\r\nx-mock-wire-fault: reset"), None);
        assert_eq!(wire_fault(b"data: x-mock-wire-fault: reset\r\n"), None);
    }

    #[test]
    fn bad_limits_is_a_429_with_every_header() {
        let r = Fault::BadLimits.response().unwrap();
        assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(r.headers().len(), BAD_HEADERS.len() + 1);
        assert!(Fault::None.response().is_none());
    }
}
