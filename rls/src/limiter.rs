//! The sliding window in Redis: one atomic Lua script per descriptor and call.
//!
//! Each key is a hash of up to `SLOTS + 1` sub-windows ("slots") of `period / SLOTS` each, field =
//! slot number since the epoch, value = hits admitted in it, plus their running total. A call counts every slot from
//! `current - SLOTS` to `current`: that span starts at least one period back and at most one
//! period plus one slot back, so the count is never below the hits of the last period (never
//! admits more than the limit in any window of one period, at any instant) and a hit is
//! forgotten at most `period / SLOTS` (1%) late. Denied hits are not recorded. Time is Redis'
//! own (TIME), so instances of this service with skewed clocks agree.

use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::aio::ConnectionManager;
use redis::cluster_async::ClusterConnection;
use redis::Script;
use tokio::sync::{Mutex, OwnedSemaphorePermit, Semaphore};

/// Sub-windows per window: the window is exact as an upper bound and at most 1% long.
pub const SLOTS: u64 = 100;

const SCRIPT: &str = r#"
-- KEYS[1]: the descriptor's hash: slot number -> hits admitted in it, and t = hits in the counted
-- slots, o = oldest slot that may hold hits, m = newest slot with hits (so a call touches only
-- the slots that left the window since the last call, not all of them).
-- ARGV: limit, window in microseconds, hits to add (0: only look), slots per window.
local key = KEYS[1]
local limit = tonumber(ARGV[1])
local period = tonumber(ARGV[2])
local hits = tonumber(ARGV[3])
local n = tonumber(ARGV[4])
local slot_len = period / n
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local cur = math.floor(now / slot_len)
local first = cur - n
local function field(s) return string.format('%d', s) end
-- a slot s stops counting when first > s, at (s + n + 1) * slot_len
local function gone(s) return (s + n + 1) * slot_len - now end
local head = redis.call('HMGET', key, 't', 'o', 'm')
local used = tonumber(head[1]) or 0
local oldest = tonumber(head[2])
local newest = tonumber(head[3])
if oldest and oldest < first then
  if newest < first then
    redis.call('DEL', key)
    used, oldest, newest = 0, nil, nil
  else
    -- at most n slots: a write at m moved o to at least m - n
    for s = oldest, first - 1 do
      local c = tonumber(redis.call('HGET', key, field(s)))
      if c then
        used = used - c
        redis.call('HDEL', key, field(s))
      end
    end
    oldest = first
    redis.call('HSET', key, 't', used, 'o', field(oldest))
  end
end
local admitted = 0
if used + hits <= limit then
  admitted = 1
  if hits > 0 then
    redis.call('HINCRBY', key, field(cur), hits)
    used = used + hits
    newest = cur
    oldest = oldest or cur
    redis.call('HSET', key, 't', used, 'o', field(oldest), 'm', field(cur))
    redis.call('PEXPIRE', key, math.ceil(gone(cur) / 1000))
  end
end
-- Until reset: when admitted, until the whole limit is free again; when denied, until these
-- hits would fit.
local reset = 0
if admitted == 1 then
  if newest then reset = gone(newest) end
elseif oldest then
  local left = used
  for s = oldest, newest do
    local c = tonumber(redis.call('HGET', key, field(s)))
    if c then
      left = left - c
      reset = gone(s)
      if left + hits <= limit then break end
    end
  end
end
local remaining = limit - used
if remaining < 0 then remaining = 0 end
return {admitted, remaining, math.ceil(reset)}
"#;

/// What one descriptor's check says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub admitted: bool,
    pub remaining: u32,
    pub until_reset: Duration,
}

/// Where the counters live.
pub enum Target {
    Single(redis::Client),
    Cluster(Box<redis::cluster::ClusterClient>),
}

#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

/// Connects lazily (the service starts, and answers UNAVAILABLE, while Redis is down) and bounds
/// every call by `timeout`: a Redis that is down or stuck costs a call at most that long. At most
/// `max_in_flight` operations run at once: past that, callers are refused at once rather than
/// piling onto a slow Redis (each waiting call holds memory, and Envoy waits for it).
pub struct Limiter {
    target: Target,
    conn: Mutex<Option<Conn>>,
    script: Script,
    timeout: Duration,
    in_flight: Arc<Semaphore>,
    max_in_flight: u32,
}

/// Room for one Redis operation, from [`Limiter::reserve`]; given back when dropped.
pub struct Slot {
    _permit: OwnedSemaphorePermit,
}

impl Limiter {
    pub fn new(target: Target, timeout: Duration, max_in_flight: u32) -> Limiter {
        Limiter {
            target,
            conn: Mutex::new(None),
            script: Script::new(SCRIPT),
            timeout,
            in_flight: Arc::new(Semaphore::new(max_in_flight as usize)),
            max_in_flight,
        }
    }

    /// Room for `n` operations, all or none (a call is refused before any of its descriptors
    /// counts); `Err`, at once, when they do not fit beside those in flight.
    pub fn reserve(&self, n: usize) -> Result<Vec<Slot>, String> {
        let max = self.max_in_flight;
        let wanted = u32::try_from(n).ok().filter(|&n| n <= max).ok_or_else(|| {
            format!("overloaded: a call of {n} Redis operations at once is more than --max-in-flight {max}")
        })?;
        let mut all = self.in_flight.clone().try_acquire_many_owned(wanted).map_err(|_| {
            let busy = max as usize - self.in_flight.available_permits();
            format!("overloaded: {busy} Redis operations in flight (--max-in-flight {max})")
        })?;
        Ok(std::iter::from_fn(|| all.split(1)).map(|p| Slot { _permit: p }).collect())
    }

    async fn connect(&self) -> redis::RedisResult<Conn> {
        let mut conn = match &self.target {
            Target::Single(client) => {
                let config = redis::aio::ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(self.timeout))
                    .set_response_timeout(Some(self.timeout))
                    .set_number_of_retries(1)
                    .set_max_delay(Duration::from_millis(100));
                Conn::Single(ConnectionManager::new_with_config(client.clone(), config).await?)
            }
            Target::Cluster(client) => Conn::Cluster(client.get_async_connection().await?),
        };
        // Loaded ahead so the first calls are EVALSHA; a Redis that lost it (restart, failover,
        // SCRIPT FLUSH) answers NOSCRIPT and `invoke_async` loads it again.
        match &mut conn {
            Conn::Single(c) => self.script.prepare_invoke().load_async(c).await?,
            Conn::Cluster(c) => self.script.prepare_invoke().load_async(c).await?,
        };
        Ok(conn)
    }

    async fn conn(&self) -> redis::RedisResult<Conn> {
        let mut slot = self.conn.lock().await;
        if let Some(conn) = &*slot {
            return Ok(conn.clone());
        }
        let conn = self.connect().await?;
        *slot = Some(conn.clone());
        Ok(conn)
    }

    /// Adds `hits` to `key` if they fit in `limit` per `period`; `Err` when Redis did not answer
    /// within the timeout or answered an error. `_slot` is held until the answer.
    pub async fn check(
        &self,
        _slot: Slot,
        key: &str,
        limit: u32,
        period: Duration,
        hits: u64,
    ) -> Result<Decision, String> {
        let call = async {
            let mut invocation = self.script.key(key);
            invocation.arg(limit).arg(period.as_micros() as u64).arg(hits.min(i64::MAX as u64)).arg(SLOTS);
            let reply: Vec<i64> = match self.conn().await? {
                Conn::Single(mut c) => invocation.invoke_async(&mut c).await?,
                Conn::Cluster(mut c) => invocation.invoke_async(&mut c).await?,
            };
            Ok::<_, redis::RedisError>(reply)
        };
        let reply = match tokio::time::timeout(self.timeout, call).await {
            Ok(Ok(reply)) => reply,
            Ok(Err(e)) => return Err(format!("redis: {e}")),
            Err(_) => return Err(format!("redis: no answer within {:?}", self.timeout)),
        };
        match reply[..] {
            [admitted, remaining, reset_us] => Ok(Decision {
                admitted: admitted == 1,
                remaining: remaining.clamp(0, u32::MAX as i64) as u32,
                until_reset: Duration::from_micros(reset_us.max(0) as u64),
            }),
            _ => Err(format!("redis: unexpected script reply {reply:?}")),
        }
    }

    /// PING within the timeout, for /healthz; a PING counts in `max_in_flight` too.
    pub async fn ping(&self) -> Result<Duration, String> {
        let _slot = self.reserve(1)?;
        let start = Instant::now();
        let call = async {
            let pong: String = match self.conn().await? {
                Conn::Single(mut c) => redis::cmd("PING").query_async(&mut c).await?,
                Conn::Cluster(mut c) => redis::cmd("PING").query_async(&mut c).await?,
            };
            Ok::<_, redis::RedisError>(pong)
        };
        match tokio::time::timeout(self.timeout, call).await {
            Ok(Ok(_)) => Ok(start.elapsed()),
            Ok(Err(e)) => Err(format!("redis: {e}")),
            Err(_) => Err(format!("redis: no answer within {:?}", self.timeout)),
        }
    }
}

/// Values longer than this are hashed in keys (a header's value can be tens of KB).
const MAX_VALUE: usize = 64;
/// Names (inside the hash tag) longer than this are hashed whole: long domains or keys, or many
/// entries, come only with a descriptor's own `limit`, which a caller may send.
const MAX_NAME: usize = 256;

/// `#` and 16 hex digits (64 bits) of `s`'s SHA-1: a fixed size whatever the input, collisions
/// negligible (about n²/2⁶⁵ among n distinct values), and a counter of another value cannot be
/// hit on purpose (that takes a second preimage: 2⁶⁴ tries).
fn digest(s: &str) -> String {
    let mut hex = sha1_smol::Sha1::from(s).digest().to_string();
    hex.truncate(16);
    format!("#{hex}")
}

/// The Redis key of a descriptor: the domain and entries inside a Cluster hash tag (one slot per
/// descriptor), then the window length so that a changed unit starts afresh. `_`, `%`, `{`, `}`
/// and `#` inside names are %-escaped so that different descriptors never share a key, and a
/// hashed value or name (`#…`) is never a literal one. Limits are matched on the raw values
/// before: hashing only bounds the key, to at most `prefix` + 267 bytes.
pub fn key(prefix: &str, domain: &str, entries: &[(&str, &str)], period: Duration) -> String {
    fn push(out: &mut String, s: &str) {
        for c in s.chars() {
            match c {
                '_' | '%' | '{' | '}' | '#' => out.push_str(&format!("%{:02X}", c as u32)),
                c => out.push(c),
            }
        }
    }
    let mut name = String::with_capacity(64);
    push(&mut name, domain);
    for (key, value) in entries {
        name.push('_');
        push(&mut name, key);
        name.push('_');
        if value.len() > MAX_VALUE {
            name.push_str(&digest(value));
        } else {
            push(&mut name, value);
        }
    }
    if name.len() > MAX_NAME {
        name = digest(&name);
    }
    format!("{prefix}{{{name}}}:{}", period.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_hash_tagged_and_unambiguous() {
        let p = Duration::from_secs(60);
        assert_eq!(
            key("", "d", &[("provider", "openai"), ("unit", "tokens")], p),
            "{d_provider_openai_unit_tokens}:60"
        );
        assert_ne!(key("", "d", &[("a_b", "c")], p), key("", "d", &[("a", "b_c")], p));
        assert_eq!(key("x:", "d", &[("k", "{v}")], p), "x:{d_k_%7Bv%7D}:60");
        // Long values are hashed, and a short value cannot pass for a hashed one.
        let long = "v".repeat(MAX_VALUE + 1);
        let hashed = key("", "d", &[("k", &long)], p);
        assert_eq!(hashed, format!("{{d_k_{}}}:60", digest(&long)));
        assert_eq!(hashed.len(), "{d_k_}:60".len() + 17);
        assert_ne!(key("", "d", &[("k", &digest(&long))], p), hashed);
        assert_ne!(hashed, key("", "d", &[("k", &format!("{long}w"))], p));
        // A long name is hashed whole.
        let many: Vec<(&str, &str)> = vec![("key", "value"); 100];
        assert_eq!(key("", "d", &many, p).len(), "{}:60".len() + 17);
    }
}
