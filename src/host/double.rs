//! An in-memory `Host`: what Envoy would give one worker VM, with every call recorded and any
//! of them failed on command. Shared data and the clock belong to the `Process`, which several
//! doubles (several simulated workers, each on its own thread) share, as Envoy's workers share
//! them. Native only; tests drive `dispatch`'s entry points against it.

use super::api::{Buffer, Host, Map, Metric, Status, Stream, BAD_ARGUMENT, NOT_FOUND};
use crate::header_map::HeaderMap;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

/// The host's `CasMismatch`.
const CAS_MISMATCH: Status = 8;
/// A call the double was told to fail answers this (the host's `InternalFailure`).
pub const FAILED: Status = 10;

/// A host for a thread with none installed: every call fails.
pub struct Failing;

pub static NONE: Failing = Failing;

/// What several workers share: shared data and the clock.
#[derive(Default)]
pub struct Process {
    shared: Mutex<HashMap<String, (Vec<u8>, u32)>>,
    cas: AtomicU64,
    now_ns: AtomicU64,
}

impl Process {
    pub fn new(now_ns: u64) -> Arc<Process> {
        let p = Process::default();
        p.now_ns.store(now_ns, Ordering::SeqCst);
        Arc::new(p)
    }

    pub fn now_ns(&self) -> u64 {
        self.now_ns.load(Ordering::SeqCst)
    }

    pub fn advance_ms(&self, ms: u64) {
        self.now_ns.fetch_add(ms * 1_000_000, Ordering::SeqCst);
    }

    /// The raw value of a shared-data key.
    pub fn shared(&self, key: &str) -> Option<Vec<u8>> {
        lock(&self.shared).get(key).map(|(v, _)| v.clone())
    }
}

/// One host call that changes something, as recorded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Call {
    /// `proxy_continue_stream` on request `id`.
    Resume {
        id: u32,
        stream: Stream,
    },
    /// `proxy_send_local_response` for request `id`.
    Reply {
        id: u32,
        status: u32,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    },
    SetHeader {
        id: u32,
        map: Map,
        name: String,
        value: String,
    },
    RemoveHeader {
        id: u32,
        map: Map,
        name: String,
    },
    HttpCall {
        token: u32,
        cluster: String,
        body: Vec<u8>,
    },
    /// A gRPC call, sent from root context `root`, whose answer goes back to it.
    GrpcCall {
        token: u32,
        root: u32,
        message: Vec<u8>,
    },
}

/// One request's headers and bodies as Envoy holds them.
#[derive(Clone, Debug, Default)]
pub struct Streams {
    pub request_headers: Vec<(String, String)>,
    pub request_body: Vec<u8>,
    pub response_headers: Vec<(String, String)>,
    pub response_body: Vec<u8>,
}

#[derive(Default)]
pub struct State {
    /// The effective context.
    pub current: u32,
    /// Contexts Envoy knows (requests and roots); others are "gone".
    pub live: HashSet<u32>,
    pub streams: HashMap<u32, Streams>,
    pub calls: Vec<Call>,
    /// Names of the `Host` methods that fail (`"resume"`, `"send_response"`, ...).
    pub failing: HashSet<&'static str>,
    /// Metrics by id: name, kind, value (counters summed, gauges last, histograms' last sample).
    pub metrics: Vec<(String, Metric, u64)>,
    pub tick_ms: u32,
    pub configuration: Vec<u8>,
    /// The answer an HTTP or gRPC call callback reads.
    pub call_response_headers: Vec<(String, String)>,
    pub grpc_message: Vec<u8>,
    pub logs: Vec<(u32, String)>,
    /// Every host call made, by `Host` method: what a request costs in crossings into Envoy.
    pub host_calls: BTreeMap<&'static str, u64>,
    next_token: u32,
    random: u64,
}

/// One worker VM's host.
pub struct Double {
    pub process: Arc<Process>,
    state: Mutex<State>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn pairs(h: &[(&str, &str)]) -> Vec<(String, String)> {
    h.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

impl Double {
    /// A worker of `process`, seeded for its random numbers, configured with `configuration`.
    pub fn new(process: Arc<Process>, seed: u64, configuration: &str) -> Double {
        let state = State { configuration: configuration.as_bytes().to_vec(), random: seed | 1, ..State::default() };
        Double { process, state: Mutex::new(state) }
    }

    pub fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    /// Envoy creates context `id` (a root's or a request's).
    pub fn open(&self, id: u32, request_headers: &[(&str, &str)]) {
        let mut s = self.state();
        s.live.insert(id);
        s.streams.insert(id, Streams { request_headers: pairs(request_headers), ..Streams::default() });
    }

    /// Envoy dropped context `id`: calls on it fail from now on.
    pub fn close(&self, id: u32) {
        self.state().live.remove(&id);
    }

    pub fn set_request_body(&self, id: u32, body: &[u8]) {
        self.state().streams.entry(id).or_default().request_body = body.to_vec();
    }

    pub fn set_response(&self, id: u32, headers: &[(&str, &str)], body: &[u8]) {
        let mut s = self.state();
        let st = s.streams.entry(id).or_default();
        st.response_headers = pairs(headers);
        st.response_body = body.to_vec();
    }

    /// Makes the `Host` method named `call` fail (or work again).
    pub fn fail(&self, call: &'static str, failing: bool) {
        let mut s = self.state();
        if failing {
            s.failing.insert(call);
        } else {
            s.failing.remove(call);
        }
    }

    /// The recorded calls since the last take.
    pub fn take_calls(&self) -> Vec<Call> {
        std::mem::take(&mut self.state().calls)
    }

    /// A metric's value by its full name (`wasmcustom.` not included).
    pub fn metric(&self, name: &str) -> Option<u64> {
        self.state().metrics.iter().find(|(n, _, _)| n == name).map(|(_, _, v)| *v)
    }

    /// Every counter, by name.
    pub fn counters(&self) -> BTreeMap<String, u64> {
        let s = self.state();
        s.metrics.iter().filter(|(_, k, _)| *k == Metric::Counter).map(|(n, _, v)| (n.clone(), *v)).collect()
    }

    /// Counts the call, and fails it if told to.
    fn check(&self, s: &mut State, call: &'static str) -> Result<(), Status> {
        *s.host_calls.entry(call).or_default() += 1;
        if s.failing.contains(call) {
            Err(FAILED)
        } else {
            Ok(())
        }
    }

    /// The current context's streams; `BAD_ARGUMENT` if Envoy dropped it.
    fn current<'a>(&self, s: &'a mut State) -> Result<&'a mut Streams, Status> {
        let id = s.current;
        if !s.live.contains(&id) {
            return Err(BAD_ARGUMENT);
        }
        Ok(s.streams.entry(id).or_default())
    }
}

fn map_of(st: &mut Streams, map: Map) -> Option<&mut Vec<(String, String)>> {
    match map {
        Map::RequestHeaders => Some(&mut st.request_headers),
        Map::ResponseHeaders => Some(&mut st.response_headers),
        Map::HttpCallResponseHeaders => None,
    }
}

impl Host for Double {
    fn get_shared(&self, key: &str) -> Result<(Option<Vec<u8>>, u32), Status> {
        self.check(&mut self.state(), "get_shared")?;
        Ok(match lock(&self.process.shared).get(key) {
            Some((v, cas)) => (Some(v.clone()), *cas),
            None => (None, 0),
        })
    }

    fn set_shared(&self, key: &str, value: &[u8], cas: u32) -> Result<(), Status> {
        self.check(&mut self.state(), "set_shared")?;
        let mut shared = lock(&self.process.shared);
        // As Envoy: a CAS of 0 writes unconditionally; a key that does not exist ignores it.
        if let Some((_, now)) = shared.get(key) {
            if cas != 0 && cas != *now {
                return Err(CAS_MISMATCH);
            }
        }
        let next = (self.process.cas.fetch_add(1, Ordering::SeqCst) + 1).max(1) as u32;
        shared.insert(key.to_string(), (value.to_vec(), next));
        Ok(())
    }

    fn log(&self, level: u32, message: &str) -> Result<(), Status> {
        self.state().logs.push((level, message.to_string()));
        Ok(())
    }

    fn define_metric(&self, kind: Metric, name: &str) -> Result<u32, Status> {
        let mut s = self.state();
        self.check(&mut s, "define_metric")?;
        if let Some(i) = s.metrics.iter().position(|(n, _, _)| n == name) {
            return Ok(i as u32);
        }
        s.metrics.push((name.to_string(), kind, 0));
        Ok(s.metrics.len() as u32 - 1)
    }

    fn increment_metric(&self, id: u32, by: i64) -> Result<(), Status> {
        let mut s = self.state();
        self.check(&mut s, "increment_metric")?;
        match s.metrics.get_mut(id as usize) {
            Some((_, Metric::Counter, v)) if by > 0 => {
                *v = v.saturating_add(by as u64);
                Ok(())
            }
            _ => Err(BAD_ARGUMENT),
        }
    }

    fn record_metric(&self, id: u32, value: u64) -> Result<(), Status> {
        let mut s = self.state();
        self.check(&mut s, "record_metric")?;
        match s.metrics.get_mut(id as usize) {
            Some((_, Metric::Gauge | Metric::Histogram, v)) => {
                *v = value;
                Ok(())
            }
            _ => Err(BAD_ARGUMENT),
        }
    }

    fn set_effective_context(&self, id: u32) -> Result<(), Status> {
        let mut s = self.state();
        self.check(&mut s, "set_effective_context")?;
        if !s.live.contains(&id) {
            return Err(BAD_ARGUMENT);
        }
        s.current = id;
        Ok(())
    }

    fn resume(&self, stream: Stream) -> Result<(), Status> {
        let mut s = self.state();
        self.check(&mut s, "resume")?;
        self.current(&mut s)?;
        let id = s.current;
        s.calls.push(Call::Resume { id, stream });
        Ok(())
    }

    fn send_response(&self, status: u32, headers: &[u8], body: &[u8]) -> Result<(), Status> {
        let mut s = self.state();
        self.check(&mut s, "send_response")?;
        self.current(&mut s)?;
        let id = s.current;
        let headers = HeaderMap::read(headers.to_vec()).iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        s.calls.push(Call::Reply { id, status, headers, body: body.to_vec() });
        Ok(())
    }

    fn header(&self, map: Map, name: &str) -> Result<Option<String>, Status> {
        let mut s = self.state();
        self.check(&mut s, "header")?;
        if map == Map::HttpCallResponseHeaders {
            return Ok(s.call_response_headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone()));
        }
        let st = self.current(&mut s)?;
        let m = map_of(st, map).ok_or(NOT_FOUND)?;
        Ok(m.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone()))
    }

    fn headers(&self, map: Map) -> Result<HeaderMap, Status> {
        let mut s = self.state();
        self.check(&mut s, "headers")?;
        let st = self.current(&mut s)?;
        let m = map_of(st, map).ok_or(NOT_FOUND)?;
        let p: Vec<(&str, &str)> = m.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        Ok(HeaderMap::read(crate::header_map::serialize(&p)))
    }

    fn set_header(&self, map: Map, name: &str, value: &str) -> Result<(), Status> {
        let mut s = self.state();
        self.check(&mut s, "set_header")?;
        let st = self.current(&mut s)?;
        let m = map_of(st, map).ok_or(NOT_FOUND)?;
        m.retain(|(k, _)| k != name);
        m.push((name.to_string(), value.to_string()));
        let id = s.current;
        s.calls.push(Call::SetHeader { id, map, name: name.to_string(), value: value.to_string() });
        Ok(())
    }

    fn remove_header(&self, map: Map, name: &str) -> Result<(), Status> {
        let mut s = self.state();
        self.check(&mut s, "remove_header")?;
        let st = self.current(&mut s)?;
        let m = map_of(st, map).ok_or(NOT_FOUND)?;
        m.retain(|(k, _)| k != name);
        let id = s.current;
        s.calls.push(Call::RemoveHeader { id, map, name: name.to_string() });
        Ok(())
    }

    fn buffer(&self, buffer: Buffer, max: usize) -> Result<Vec<u8>, Status> {
        let mut s = self.state();
        self.check(&mut s, "buffer")?;
        let bytes = match buffer {
            Buffer::PluginConfiguration => s.configuration.clone(),
            Buffer::GrpcMessage => s.grpc_message.clone(),
            Buffer::RequestBody => self.current(&mut s)?.request_body.clone(),
            Buffer::ResponseBody => self.current(&mut s)?.response_body.clone(),
        };
        Ok(bytes[..bytes.len().min(max)].to_vec())
    }

    fn set_buffer(&self, buffer: Buffer, _len: usize, bytes: &[u8]) -> Result<(), Status> {
        let mut s = self.state();
        self.check(&mut s, "set_buffer")?;
        let stream = self.current(&mut s)?;
        match buffer {
            Buffer::RequestBody => stream.request_body = bytes.to_vec(),
            Buffer::ResponseBody => stream.response_body = bytes.to_vec(),
            _ => return Err(FAILED),
        }
        Ok(())
    }

    fn now_ns(&self) -> Result<u64, Status> {
        self.check(&mut self.state(), "now_ns")?;
        Ok(self.process.now_ns())
    }

    fn random_u64(&self) -> Option<u64> {
        let mut s = self.state();
        // xorshift: deterministic per seed, so a failing schedule replays.
        let mut x = s.random;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        s.random = x;
        Some(x)
    }

    fn set_tick_period_ms(&self, ms: u32) -> Result<(), Status> {
        let mut s = self.state();
        self.check(&mut s, "set_tick_period_ms")?;
        s.tick_ms = ms;
        Ok(())
    }

    fn http_call(&self, cluster: &str, _headers: &[u8], body: &[u8], _timeout_ms: u32) -> Result<u32, Status> {
        let mut s = self.state();
        self.check(&mut s, "http_call")?;
        s.next_token += 1;
        let token = s.next_token;
        s.calls.push(Call::HttpCall { token, cluster: cluster.to_string(), body: body.to_vec() });
        Ok(token)
    }

    fn grpc_call(
        &self,
        _service: &[u8],
        _name: &str,
        _method: &str,
        message: &[u8],
        _timeout_ms: u32,
    ) -> Result<u32, Status> {
        let mut s = self.state();
        self.check(&mut s, "grpc_call")?;
        s.next_token += 1;
        let token = s.next_token;
        let root = s.current;
        s.calls.push(Call::GrpcCall { token, root, message: message.to_vec() });
        Ok(token)
    }
}

impl Host for Failing {
    fn get_shared(&self, _: &str) -> Result<(Option<Vec<u8>>, u32), Status> {
        Err(FAILED)
    }
    fn set_shared(&self, _: &str, _: &[u8], _: u32) -> Result<(), Status> {
        Err(FAILED)
    }
    fn log(&self, _: u32, _: &str) -> Result<(), Status> {
        Err(FAILED)
    }
    fn define_metric(&self, _: Metric, _: &str) -> Result<u32, Status> {
        Err(FAILED)
    }
    fn increment_metric(&self, _: u32, _: i64) -> Result<(), Status> {
        Err(FAILED)
    }
    fn record_metric(&self, _: u32, _: u64) -> Result<(), Status> {
        Err(FAILED)
    }
    fn set_effective_context(&self, _: u32) -> Result<(), Status> {
        Err(FAILED)
    }
    fn resume(&self, _: Stream) -> Result<(), Status> {
        Err(FAILED)
    }
    fn send_response(&self, _: u32, _: &[u8], _: &[u8]) -> Result<(), Status> {
        Err(FAILED)
    }
    fn header(&self, _: Map, _: &str) -> Result<Option<String>, Status> {
        Err(FAILED)
    }
    fn headers(&self, _: Map) -> Result<HeaderMap, Status> {
        Err(FAILED)
    }
    fn set_header(&self, _: Map, _: &str, _: &str) -> Result<(), Status> {
        Err(FAILED)
    }
    fn remove_header(&self, _: Map, _: &str) -> Result<(), Status> {
        Err(FAILED)
    }
    fn buffer(&self, _: Buffer, _: usize) -> Result<Vec<u8>, Status> {
        Err(FAILED)
    }
    fn set_buffer(&self, _: Buffer, _: usize, _: &[u8]) -> Result<(), Status> {
        Err(FAILED)
    }
    fn now_ns(&self) -> Result<u64, Status> {
        Err(FAILED)
    }
    fn random_u64(&self) -> Option<u64> {
        None
    }
    fn set_tick_period_ms(&self, _: u32) -> Result<(), Status> {
        Err(FAILED)
    }
    fn http_call(&self, _: &str, _: &[u8], _: &[u8], _: u32) -> Result<u32, Status> {
        Err(FAILED)
    }
    fn grpc_call(&self, _: &[u8], _: &str, _: &str, _: &[u8], _: u32) -> Result<u32, Status> {
        Err(FAILED)
    }
}
