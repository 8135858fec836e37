//! Envoy, as far as the filter can tell: worker VMs (one thread each, over one `Process`'s shared
//! data and clock) whose `dispatch` entry points are called in the order Envoy calls them, and a
//! ledger of what each request became (went upstream, answered locally, cut off), built from the
//! actions returned and the host calls recorded. Drives `src/host/` natively.
#![allow(dead_code)]

use llm_ratelimit::host::api::Stream;
use llm_ratelimit::host::calls::install;
use llm_ratelimit::host::dispatch::{self as d, Action};
use llm_ratelimit::host::double::{Call, Double, Process};
use std::collections::BTreeMap;
use std::sync::mpsc::{channel, Sender};
use std::sync::Arc;

pub const ROOT: u32 = 1;

type Job = Box<dyn FnOnce() + Send>;

/// What Envoy saw of one request.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Life {
    /// Its headers are stopped in the filter chain.
    pub held: bool,
    /// Times its headers went on to the router (must end at most 1).
    pub upstream: u32,
    /// Local replies it got (status each; at most 1, and never with `upstream`).
    pub replies: Vec<u32>,
    /// Its response headers are stopped.
    pub response_held: bool,
    /// `on_done` ran: nothing may act on it after.
    pub done: bool,
    /// Resumes or replies that came after `on_done`, or resumes of a stream not held.
    pub violations: Vec<String>,
}

impl Life {
    pub fn answered(&self) -> bool {
        !self.replies.is_empty()
    }
}

/// One worker VM: its thread, its host double, and the ledger of its requests.
pub struct Vm {
    tx: Sender<Job>,
    pub host: &'static Double,
    pub lives: BTreeMap<u32, Life>,
    /// gRPC calls sent and not yet answered: (root context, token), oldest first.
    pub grpc_calls: Vec<(u32, u32)>,
    /// The root contexts, oldest first: new requests are created by the newest (a reload adds
    /// one; requests in flight keep theirs), and every root ticks.
    pub roots: Vec<u32>,
}

impl Vm {
    /// A worker of `process` with the filter configured by `config` (JSON); `None` if the filter
    /// refused the configuration.
    pub fn start(process: &Arc<Process>, seed: u64, config: &str) -> Option<Vm> {
        let host: &'static Double = Box::leak(Box::new(Double::new(process.clone(), seed, config)));
        let (tx, rx) = channel::<Job>();
        std::thread::spawn(move || {
            install(host);
            llm_ratelimit::host::init_logger();
            for job in rx {
                job();
            }
        });
        let vm = Vm { tx, host, lives: BTreeMap::new(), grpc_calls: Vec::new(), roots: vec![ROOT] };
        host.open(ROOT, &[]);
        vm.run(|| d::proxy_on_context_create(ROOT, 0));
        vm.run(|| d::proxy_on_configure(ROOT, 0)).then_some(vm)
    }

    /// Runs `f` on the VM's thread (as Envoy calls into the VM) and returns its result.
    pub fn run<R: Send + 'static>(&self, f: impl FnOnce() -> R + Send + 'static) -> R {
        self.run_as(ROOT, f)
    }

    /// `run`, with context `id` effective (Envoy sets it before each callback).
    pub fn run_as<R: Send + 'static>(&self, id: u32, f: impl FnOnce() -> R + Send + 'static) -> R {
        self.host.state().current = id;
        let (tx, rx) = channel();
        self.tx
            .send(Box::new(move || {
                let _ = tx.send(f());
            }))
            .expect("vm thread");
        rx.recv().expect("vm thread answered")
    }

    fn life(&mut self, id: u32) -> &mut Life {
        self.lives.entry(id).or_default()
    }

    /// Reads the calls recorded since the last look into the ledger.
    fn settle_calls(&mut self) {
        for call in self.host.take_calls() {
            match call {
                Call::Resume { id, stream: Stream::Request } => {
                    let l = self.life(id);
                    if l.done {
                        l.violations.push("resumed after on_done".into());
                    } else if l.held {
                        l.held = false;
                        l.upstream += 1;
                    } else {
                        l.violations.push("resumed a request that was not held".into());
                    }
                }
                Call::Resume { id, stream: Stream::Response } => {
                    let l = self.life(id);
                    if l.done {
                        l.violations.push("response resumed after on_done".into());
                    }
                    l.response_held = false;
                }
                Call::Reply { id, status, .. } => {
                    let l = self.life(id);
                    if l.done {
                        l.violations.push("answered after on_done".into());
                    }
                    l.replies.push(status);
                    // Envoy ends the stream with the reply: nothing of the request goes on.
                    l.held = false;
                }
                Call::GrpcCall { token, root, .. } => self.grpc_calls.push((root, token)),
                _ => {}
            }
        }
    }

    /// What a request callback's action does to the held headers.
    fn request_action(&mut self, id: u32, a: Action) -> Action {
        self.settle_calls();
        let l = self.life(id);
        if l.answered() || l.done {
            return a;
        }
        match a {
            Action::Continue if l.held => {
                l.held = false;
                l.upstream += 1;
            }
            Action::Pause if l.upstream == 0 => l.held = true,
            _ => {}
        }
        a
    }

    /// A new request `id` with `headers`; `end` when it has no body or trailers.
    pub fn request_headers(&mut self, id: u32, headers: &[(&str, &str)], end: bool) -> Action {
        self.host.open(id, headers);
        self.life(id);
        let root = *self.roots.last().unwrap_or(&ROOT);
        self.run(move || d::proxy_on_context_create(id, root));
        let a = self.run_as(id, move || d::proxy_on_request_headers(id, 0, end));
        // Headers that are not stopped go on at once.
        if a == Action::Continue && !self.life(id).answered() {
            self.settle_calls();
            let l = self.life(id);
            if !l.answered() {
                l.upstream += 1;
            }
            return a;
        }
        self.request_action(id, a)
    }

    /// The request body so far is `body` (Envoy buffers while the filter pauses).
    pub fn request_body(&mut self, id: u32, body: &[u8], end: bool) -> Action {
        self.host.set_request_body(id, body);
        let size = body.len();
        let a = self.run_as(id, move || d::proxy_on_request_body(id, size, end));
        self.request_action(id, a)
    }

    pub fn request_trailers(&mut self, id: u32) -> Action {
        let a = self.run_as(id, move || d::proxy_on_request_trailers(id, 1));
        self.request_action(id, a)
    }

    /// The provider answers request `id` (which must have gone upstream).
    pub fn response_headers(&mut self, id: u32, headers: &[(&str, &str)], body: &[u8], end: bool) -> Action {
        self.host.set_response(id, headers, body);
        let a = self.run_as(id, move || d::proxy_on_response_headers(id, 0, end));
        self.settle_calls();
        if a == Action::Pause {
            self.life(id).response_held = true;
        }
        a
    }

    pub fn response_body(&mut self, id: u32, size: usize, end: bool) -> Action {
        let a = self.run_as(id, move || d::proxy_on_response_body(id, size, end));
        self.settle_calls();
        if a == Action::Continue {
            self.life(id).response_held = false;
        }
        a
    }

    pub fn response_trailers(&mut self, id: u32) -> Action {
        let a = self.run_as(id, move || d::proxy_on_response_trailers(id, 1));
        self.settle_calls();
        if a == Action::Continue {
            self.life(id).response_held = false;
        }
        a
    }

    /// The stream ends (answered, or its client gone): `on_done`, then the context is deleted.
    pub fn done(&mut self, id: u32) {
        let _ = self.run_as(id, move || d::proxy_on_done(id));
        self.settle_calls();
        self.life(id).done = true;
        self.host.close(id);
        self.run_as(id, move || d::proxy_on_delete(id));
        self.settle_calls();
    }

    pub fn tick(&mut self) {
        for root in self.roots.clone() {
            self.run_as(root, move || d::proxy_on_tick(root));
        }
        self.settle_calls();
    }

    /// The gRPC answer `message` to call `token`.
    /// The plugin's configuration is pushed again: a new root context `root` configured with
    /// `config`; true if the filter took it.
    pub fn reload(&mut self, root: u32, config: &str) -> bool {
        self.host.open(root, &[]);
        self.host.state().configuration = config.as_bytes().to_vec();
        self.run(move || d::proxy_on_context_create(root, 0));
        let ok = self.run_as(root, move || d::proxy_on_configure(root, 0));
        if ok {
            self.roots.push(root);
        }
        ok
    }

    /// The gRPC answer `message` to call `token` of `root`.
    pub fn grpc_answer(&mut self, root: u32, token: u32, message: Vec<u8>) {
        let size = message.len();
        self.host.state().grpc_message = message;
        self.run_as(root, move || d::proxy_on_grpc_receive(root, token, size));
        self.settle_calls();
    }

    pub fn grpc_close(&mut self, root: u32, token: u32, status: u32) {
        self.run_as(root, move || d::proxy_on_grpc_close(root, token, status));
        self.settle_calls();
    }

    /// Counter `stat` of provider `name` (`llm_ratelimit.provider.<name>.<stat>`).
    pub fn stat(&self, name: &str, stat: &str) -> u64 {
        self.host.metric(&format!("llm_ratelimit.provider.{name}.{stat}")).unwrap_or(0)
    }

    /// Every violation any request saw.
    pub fn violations(&self) -> Vec<(u32, String)> {
        let mut v = Vec::new();
        for (id, l) in &self.lives {
            for s in &l.violations {
                v.push((*id, s.clone()));
            }
            if l.upstream > 1 {
                v.push((*id, format!("went upstream {} times", l.upstream)));
            }
            if l.replies.len() > 1 {
                v.push((*id, format!("answered {} times", l.replies.len())));
            }
            if l.upstream > 0 && l.answered() {
                v.push((*id, "went upstream and was answered".into()));
            }
        }
        v
    }

    /// Requests that went upstream.
    pub fn upstream(&self) -> usize {
        self.lives.values().filter(|l| l.upstream > 0).count()
    }
}

/// A chat completion request's headers.
pub fn chat_headers(extra: &[(&'static str, &'static str)]) -> Vec<(&'static str, &'static str)> {
    let mut h = vec![
        (":method", "POST"),
        (":path", "/v1/chat/completions"),
        (":authority", "api"),
        ("content-type", "application/json"),
    ];
    h.extend_from_slice(extra);
    h
}

pub const CHAT_BODY: &[u8] =
    br#"{"model":"gpt-4o-mini","max_tokens":50,"messages":[{"role":"user","content":"hello there"}]}"#;
