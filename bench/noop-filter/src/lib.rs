//! Does nothing but let every request through: proxy-wasm's per-request floor. With
//! `{"calls": N}` as its configuration it also reads the `:path` header N times per request: the
//! cost of one host call (with the VM re-entry that returns its value), for bench/ablation.py.
//! With `{"reply": H}` it answers every request itself with a 429 carrying H headers (0 to 9, the
//! filter's own 429 has 9) and a 200-byte body: the floor of a wasm filter's reject path.
//! With `{"mimic":1}` it makes the host calls our admit path cannot do without, and nothing else:
//! the priority header read and the clock on the request, the `:status` read on the response; in
//! the observer's place (`"role":"observer"`, which bench/run.py keeps from envoy/envoy.yaml), the
//! observer's: the probe and attempt-count reads on the request, every response header and the
//! clock on the response.
//! With `{"bodies":1}` (in the listener) it holds a request's headers until its body is in, reads
//! the body, and reads each answer's last body chunk: what any filter that estimates from the
//! request and settles from the answer's `usage` must make Envoy do, and nothing else.
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Warn);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root { calls: 0, reply: None, mimic: false, observer: false, bodies: false }) });
}}

struct Root {
    calls: usize,
    reply: Option<usize>,
    mimic: bool,
    observer: bool,
    bodies: bool,
}

/// The number after `"key":` in the configuration text.
fn number(text: &str, key: &str) -> Option<usize> {
    let rest = text.split(&format!("\"{key}\":")).nth(1)?;
    rest.trim_start().chars().take_while(char::is_ascii_digit).collect::<String>().parse().ok()
}

impl Context for Root {}
impl RootContext for Root {
    fn on_configure(&mut self, _: usize) -> bool {
        let config = self.get_plugin_configuration().unwrap_or_default();
        let text = String::from_utf8_lossy(&config);
        self.calls = number(&text, "calls").unwrap_or(0);
        self.reply = number(&text, "reply");
        self.mimic = number(&text, "mimic").is_some_and(|n| n > 0);
        self.observer = text.contains("\"role\":\"observer\"");
        self.bodies = !self.observer && number(&text, "bodies").is_some_and(|n| n > 0);
        true
    }
    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
    fn create_http_context(&self, _id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Pass {
            calls: self.calls,
            reply: self.reply,
            mimic: self.mimic,
            observer: self.observer,
            bodies: self.bodies,
        }))
    }
}

struct Pass {
    calls: usize,
    reply: Option<usize>,
    mimic: bool,
    observer: bool,
    bodies: bool,
}

const HEADERS: [(&str, &str); 9] = [
    ("retry-after", "1"),
    ("retry-after-ms", "1000"),
    ("ratelimit-policy", "\"bench\";q=1;w=1"),
    ("ratelimit", "\"bench\";r=0;t=1"),
    ("x-llm-ratelimit-source", "proxy"),
    ("x-llm-ratelimit-reason", "no_token"),
    ("x-llm-ratelimit-priority", "NORMAL"),
    ("x-should-retry", "true"),
    ("content-type", "application/json"),
];
impl Context for Pass {}
impl HttpContext for Pass {
    fn on_http_request_headers(&mut self, _: usize, end_of_stream: bool) -> Action {
        if self.mimic && self.observer {
            let _ = self.get_http_request_header("x-llm-ratelimit-probe");
            let _ = self.get_http_request_header("x-envoy-attempt-count");
        } else if self.mimic {
            let _ = self.get_http_request_header("x-llm-priority");
            let _ = self.get_current_time();
        }
        for _ in 0..self.calls {
            let _ = self.get_http_request_header(":path");
        }
        if let Some(n) = self.reply {
            let body = [b'x'; 200];
            self.send_http_response(429, HEADERS[..n.min(9)].to_vec(), Some(&body));
            return Action::Pause;
        }
        if self.bodies && !end_of_stream {
            return Action::Pause;
        }
        Action::Continue
    }

    fn on_http_request_body(&mut self, size: usize, end_of_stream: bool) -> Action {
        if !self.bodies {
            return Action::Continue;
        }
        if !end_of_stream {
            return Action::Pause;
        }
        let _ = self.get_http_request_body(0, size);
        Action::Continue
    }

    fn on_http_response_body(&mut self, size: usize, end_of_stream: bool) -> Action {
        if self.bodies && end_of_stream {
            let _ = self.get_http_response_body(0, size);
        }
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _: usize, _: bool) -> Action {
        if self.mimic && self.observer {
            let _ = self.get_http_response_headers();
            let _ = self.get_current_time();
        } else if self.mimic {
            let _ = self.get_http_response_header(":status");
        }
        Action::Continue
    }
}
