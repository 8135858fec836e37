//! Settings: parsed from the command line at start, changed at runtime by
//! `POST /mock/config`. Both go through `Settings::set`, so flags, JSON fields
//! and error messages stay the same everywhere.

use axum::http::StatusCode;
use serde_json::{json, Map, Value};

use crate::fault::Fault;
use crate::quota::WindowKind;

pub const USAGE: &str = "\
usage: mock-provider [--port N] [--host ADDR] [--latency-ms N] [--quota N] [--window-ms N]
                     [--window fixed|sliding] [--style STYLE] [--token-quota N]
                     [--request-window-ms N] [--low-remaining N] [--terminal KIND]
                     [--output-tokens N] [--fault KIND]
                     [--capacity K] [--capacity-queue Q] [--capacity-status 503|429]
  --quota 0 and --token-quota 0 mean unlimited; --port 0 picks a free port.
  --output-tokens N: every reply is N tokens long, or max_tokens if that is less
  (0, the default: max_tokens, else 16); header x-mock-output-tokens overrides it.
  The token quota is charged prompt (text chars/4) plus reply tokens.
  Streams (\"stream\":true; Gemini :streamGenerateContent, SSE with ?alt=sse) come in uneven chunks.
  --request-window-ms counts requests over their own window (0: the --window-ms one),
  e.g. Groq's requests per day next to tokens per minute.
  STYLE: openai groq azure anthropic gemini mistral cohere bedrock generic generic-date generic-ms
         ietf ietf-draft07
  KIND:  none insufficient_quota spend_limit daily request_too_large gemini_daily
  --fault: none reset (TCP reset after the request) garbage (non-HTTP bytes, then close)
           bad_limits (429s with nonsense rate-limit headers and a body that is not JSON);
  header x-mock-fault overrides it per request; /mock/* is never faulted.
  --capacity K: hidden capacity, like an overloaded self-hosted vLLM/TGI: K requests are served at
  once, Q more wait for a slot in arrival order (--capacity-queue, default: K, following it), any
  more get --capacity-status (503, the default, or 429) at once. A slot is held for --latency-ms
  (alias --service-ms; x-mock-latency-ms per request) and, for a stream, until its last byte, so
  time to headers = wait for a slot + latency. 200s and overflow answers carry no rate-limit
  headers (a --quota, if set too, still answers its own 429s in --style). 0 (default): unlimited.
  A lower --capacity set at runtime holds new requests back until enough slots are given back.";

/// How a provider reports its limits (headers and 429 bodies).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Style {
    OpenAi,
    Groq,
    Azure,
    Anthropic,
    Gemini,
    Mistral,
    Cohere,
    Bedrock,
    Generic,
    GenericDate,
    GenericMs,
    Ietf,
    IetfDraft07,
}

impl Style {
    const NAMES: [(&'static str, Style); 13] = [
        ("openai", Style::OpenAi),
        ("groq", Style::Groq),
        ("azure", Style::Azure),
        ("anthropic", Style::Anthropic),
        ("gemini", Style::Gemini),
        ("mistral", Style::Mistral),
        ("cohere", Style::Cohere),
        ("bedrock", Style::Bedrock),
        ("generic", Style::Generic),
        ("generic-date", Style::GenericDate),
        ("generic-ms", Style::GenericMs),
        ("ietf", Style::Ietf),
        ("ietf-draft07", Style::IetfDraft07),
    ];

    pub fn parse(s: &str) -> Result<Self, String> {
        lookup(&Self::NAMES, s)
    }

    pub fn as_str(self) -> &'static str {
        name_of(&Self::NAMES, self)
    }
}

/// Quota states that no amount of waiting for the window fixes: every request
/// gets a 429 that a proxy should treat as terminal.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Terminal {
    None,
    InsufficientQuota,
    SpendLimit,
    Daily,
    RequestTooLarge,
    GeminiDaily,
}

impl Terminal {
    const NAMES: [(&'static str, Terminal); 6] = [
        ("none", Terminal::None),
        ("insufficient_quota", Terminal::InsufficientQuota),
        ("spend_limit", Terminal::SpendLimit),
        ("daily", Terminal::Daily),
        ("request_too_large", Terminal::RequestTooLarge),
        ("gemini_daily", Terminal::GeminiDaily),
    ];

    pub fn parse(s: &str) -> Result<Self, String> {
        lookup(&Self::NAMES, s)
    }

    pub fn as_str(self) -> &'static str {
        name_of(&Self::NAMES, self)
    }
}

fn lookup<T: Copy>(names: &[(&str, T)], s: &str) -> Result<T, String> {
    names.iter().find(|(n, _)| *n == s).map(|&(_, v)| v).ok_or_else(|| {
        let allowed: Vec<&str> = names.iter().map(|(n, _)| *n).collect();
        format!("unknown value '{s}'; allowed: {}", allowed.join(", "))
    })
}

fn name_of<T: Copy + PartialEq>(names: &[(&'static str, T)], v: T) -> &'static str {
    names.iter().find(|(_, x)| *x == v).map(|(n, _)| *n).expect("every variant is named")
}

pub fn parse_window(s: &str) -> Result<WindowKind, String> {
    match s {
        "fixed" => Ok(WindowKind::Fixed),
        "sliding" => Ok(WindowKind::Sliding),
        _ => Err(format!("unknown value '{s}'; allowed: fixed, sliding")),
    }
}

/// Longest latency we accept, so a typo cannot park a connection for days.
pub const MAX_LATENCY_MS: u64 = 3_600_000;

pub fn parse_latency(s: &str) -> Result<u64, String> {
    match s.parse::<u64>() {
        Ok(ms) if ms <= MAX_LATENCY_MS => Ok(ms),
        _ => Err(format!("expected milliseconds 0..={MAX_LATENCY_MS}, got '{s}'")),
    }
}

/// The overflow answer of a full capacity queue: 503 (vLLM/TGI overloaded) or 429.
pub fn parse_capacity_status(s: &str) -> Result<StatusCode, String> {
    match s {
        "503" => Ok(StatusCode::SERVICE_UNAVAILABLE),
        "429" => Ok(StatusCode::TOO_MANY_REQUESTS),
        _ => Err(format!("expected 503 or 429, got '{s}'")),
    }
}

/// The longest reply, in tokens (max_tokens above it are clamped to it).
pub const MAX_OUTPUT_TOKENS: u64 = 4096;

pub fn parse_output_tokens(s: &str, min: u64) -> Result<u64, String> {
    match s.parse::<u64>() {
        Ok(n) if (min..=MAX_OUTPUT_TOKENS).contains(&n) => Ok(n),
        _ => Err(format!("expected tokens {min}..={MAX_OUTPUT_TOKENS}, got '{s}'")),
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Settings {
    pub host: String,
    pub port: u16,
    pub latency_ms: u64,
    pub quota: u64,
    pub window_ms: u64,
    /// The requests' own window; 0 means `window_ms`.
    pub request_window_ms: u64,
    pub window: WindowKind,
    pub style: Style,
    pub token_quota: u64,
    pub low_remaining: u64,
    pub terminal: Terminal,
    /// Reply length in tokens, capped by the request's max tokens; 0: the max tokens, else 16.
    pub output_tokens: u64,
    /// A fault on every LLM request (`fault::Fault`).
    pub fault: Fault,
    /// Hidden capacity (`capacity.rs`): LLM requests served at once; 0: unlimited.
    pub capacity: u64,
    /// How many more may wait for a slot; `None`: as many as `capacity`.
    pub capacity_queue: Option<u64>,
    /// The answer when the queue is full too: 503 or 429.
    pub capacity_status: StatusCode,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            host: "127.0.0.1".into(),
            port: 0,
            latency_ms: 0,
            quota: 0,
            window_ms: 60_000,
            request_window_ms: 0,
            window: WindowKind::Fixed,
            style: Style::OpenAi,
            token_quota: 0,
            low_remaining: 0,
            terminal: Terminal::None,
            output_tokens: 0,
            fault: Fault::None,
            capacity: 0,
            capacity_queue: None,
            capacity_status: StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

impl Settings {
    /// Parses `--flag value` / `--flag=value` pairs (without the program name).
    /// `Ok(None)` means `--help` was asked for.
    pub fn from_args(args: impl IntoIterator<Item = String>) -> Result<Option<Self>, String> {
        let mut settings = Settings::default();
        let mut args = args.into_iter();
        while let Some(arg) = args.next() {
            if arg == "-h" || arg == "--help" {
                return Ok(None);
            }
            let Some(flag) = arg.strip_prefix("--") else {
                return Err(format!("unexpected argument '{arg}'"));
            };
            let (flag, value) = match flag.split_once('=') {
                Some((f, v)) => (f.to_string(), v.to_string()),
                None => {
                    let v = args.next().ok_or_else(|| format!("--{flag} needs a value"))?;
                    (flag.to_string(), v)
                }
            };
            settings.set(&flag.replace('-', "_"), &value, true).map_err(|e| format!("--{flag}: {e}"))?;
        }
        Ok(Some(settings))
    }

    /// Applies a JSON object with any subset of the runtime settings. All or nothing.
    pub fn patched(&self, patch: &Map<String, Value>) -> Result<Self, String> {
        let mut next = self.clone();
        for (key, value) in patch {
            let value = match value {
                Value::String(s) => s.clone(),
                Value::Number(n) => n.to_string(),
                other => return Err(format!("{key}: expected a string or number, got {other}")),
            };
            next.set(key, &value, false).map_err(|e| format!("{key}: {e}"))?;
        }
        Ok(next)
    }

    /// Sets one setting by its snake_case name. `host`/`port` only at startup.
    fn set(&mut self, name: &str, value: &str, startup: bool) -> Result<(), String> {
        let number = |min: u64| match value.parse::<u64>() {
            Ok(n) if n >= min => Ok(n),
            _ => Err(format!("expected an integer >= {min}, got '{value}'")),
        };
        match name {
            "host" | "port" if !startup => return Err("can only be set on the command line".into()),
            "host" => self.host = value.to_string(),
            "port" => self.port = value.parse().map_err(|_| format!("expected a port 0..=65535, got '{value}'"))?,
            // With a capacity, the latency is each request's service time, spent holding its slot.
            "latency_ms" | "service_ms" => self.latency_ms = parse_latency(value)?,
            "quota" => self.quota = number(0)?,
            "window_ms" => self.window_ms = number(1)?,
            "request_window_ms" => self.request_window_ms = number(0)?,
            "window" => self.window = parse_window(value)?,
            "style" => self.style = Style::parse(value)?,
            "token_quota" => self.token_quota = number(0)?,
            "low_remaining" => self.low_remaining = number(0)?,
            "terminal" => self.terminal = Terminal::parse(value)?,
            "output_tokens" => self.output_tokens = parse_output_tokens(value, 0)?,
            "fault" => self.fault = Fault::parse(value)?,
            "capacity" => self.capacity = number(0)?,
            "capacity_queue" => self.capacity_queue = Some(number(0)?),
            "capacity_status" => self.capacity_status = parse_capacity_status(value)?,
            _ => {
                return Err(format!(
                    "unknown setting; known: latency_ms (or service_ms), quota, window_ms, request_window_ms, \
                     window, style, token_quota, low_remaining, terminal, output_tokens, fault, capacity, \
                     capacity_queue, capacity_status{}",
                    if startup { ", host, port" } else { "" }
                ))
            }
        }
        Ok(())
    }

    /// How many requests may wait for a slot when all `capacity` are taken.
    pub fn queue_limit(&self) -> u64 {
        self.capacity_queue.unwrap_or(self.capacity)
    }

    /// Whether switching from `self` to `other` needs a fresh quota window.
    pub fn quota_changed(&self, other: &Settings) -> bool {
        (self.quota, self.token_quota, self.window_ms, self.request_window_ms, self.window)
            != (other.quota, other.token_quota, other.window_ms, other.request_window_ms, other.window)
    }

    pub fn to_json(&self) -> Value {
        json!({
            "host": self.host,
            "port": self.port,
            "latency_ms": self.latency_ms,
            "quota": self.quota,
            "window_ms": self.window_ms,
            "request_window_ms": self.request_window_ms,
            "window": match self.window { WindowKind::Fixed => "fixed", WindowKind::Sliding => "sliding" },
            "style": self.style.as_str(),
            "token_quota": self.token_quota,
            "low_remaining": self.low_remaining,
            "terminal": self.terminal.as_str(),
            "output_tokens": self.output_tokens,
            "fault": self.fault.as_str(),
            "capacity": self.capacity,
            "capacity_queue": self.queue_limit(),
            "capacity_status": self.capacity_status.as_u16(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Result<Option<Settings>, String> {
        Settings::from_args(s.split_whitespace().map(String::from))
    }

    #[test]
    fn parses_flags() {
        let s = args("--port 9000 --host=0.0.0.0 --quota 5 --window sliding --style generic-date --terminal daily")
            .unwrap()
            .unwrap();
        assert_eq!((s.port, s.host.as_str(), s.quota), (9000, "0.0.0.0", 5));
        assert_eq!((s.window, s.style, s.terminal), (WindowKind::Sliding, Style::GenericDate, Terminal::Daily));
        assert_eq!(args("--help").unwrap(), None);
    }

    #[test]
    fn errors_name_the_flag_and_allowed_values() {
        let e = args("--style foo").unwrap_err();
        assert!(e.starts_with("--style: unknown value 'foo'; allowed: openai,"), "{e}");
        assert!(args("--window-ms 0").unwrap_err().starts_with("--window-ms:"));
        assert!(args("--quota").unwrap_err().contains("needs a value"));
        assert!(args("--bogus 1").unwrap_err().starts_with("--bogus: unknown setting"));
        assert_eq!(args("--output-tokens 5000").unwrap_err(), "--output-tokens: expected tokens 0..=4096, got '5000'");
        assert_eq!(args("--output-tokens 12").unwrap().unwrap().output_tokens, 12);
    }

    #[test]
    fn json_patch_is_all_or_nothing() {
        let base = Settings::default();
        let patch = json!({"quota": 3, "style": "anthropic"});
        let next = base.patched(patch.as_object().unwrap()).unwrap();
        assert_eq!((next.quota, next.style), (3, Style::Anthropic));
        assert!(base.quota_changed(&next));

        let bad = json!({"quota": 3, "port": 1});
        assert_eq!(base.patched(bad.as_object().unwrap()).unwrap_err(), "port: can only be set on the command line");
        let bad = json!({"latency_ms": -1});
        assert!(base.patched(bad.as_object().unwrap()).is_err());
    }

    #[test]
    fn capacity_settings() {
        let s = args("--capacity 8 --service-ms 300 --capacity-status 429").unwrap().unwrap();
        assert_eq!((s.capacity, s.queue_limit(), s.latency_ms), (8, 8, 300));
        assert_eq!(s.capacity_status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(Settings::default().capacity_status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(args("--capacity-status 500").unwrap_err(), "--capacity-status: expected 503 or 429, got '500'");

        // The queue follows the capacity until it is set.
        let next = s.patched(json!({"capacity": 4}).as_object().unwrap()).unwrap();
        assert_eq!((next.capacity, next.queue_limit()), (4, 4));
        let next = next.patched(json!({"capacity_queue": 0, "service_ms": 5}).as_object().unwrap()).unwrap();
        assert_eq!((next.queue_limit(), next.latency_ms), (0, 5));
        assert_eq!(next.to_json()["capacity_queue"], 0);
        assert_eq!(next.to_json()["capacity_status"], 429);
        assert!(!s.quota_changed(&next));
    }
}
