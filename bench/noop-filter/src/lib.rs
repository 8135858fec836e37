//! Does nothing but let every request through: proxy-wasm's per-request floor. With
//! `{"calls": N}` as its configuration it also reads the `:path` header N times per request: the
//! cost of one host call (with the VM re-entry that returns its value), for bench/ablation.py.
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Warn);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root { calls: 0 }) });
}}

struct Root {
    calls: usize,
}

impl Context for Root {}
impl RootContext for Root {
    fn on_configure(&mut self, _: usize) -> bool {
        let config = self.get_plugin_configuration().unwrap_or_default();
        let text = String::from_utf8_lossy(&config);
        self.calls = text
            .split("\"calls\":")
            .nth(1)
            .map(|rest| rest.trim_start().chars().take_while(char::is_ascii_digit).collect::<String>())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        true
    }
    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
    fn create_http_context(&self, _id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Pass { calls: self.calls }))
    }
}

struct Pass {
    calls: usize,
}
impl Context for Pass {}
impl HttpContext for Pass {
    fn on_http_request_headers(&mut self, _: usize, _: bool) -> Action {
        for _ in 0..self.calls {
            let _ = self.get_http_request_header(":path");
        }
        Action::Continue
    }
}
