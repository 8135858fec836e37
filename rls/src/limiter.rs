//! The counters in Redis: one atomic Lua script per descriptor and call, of two kinds.
//!
//! **Sliding windows** (every unit but calendar `day` and `month`): each key is a hash of up to
//! `SLOTS + 1` sub-windows ("slots") of `period / SLOTS` each, field = slot number since the
//! epoch, value = hits admitted in it, plus their running total. A call counts every slot from
//! `current - SLOTS` to `current`: that span starts at least one period back and at most one
//! period plus one slot back, so the count is never below the hits of the last period (never
//! admits more than the limit in any window of one period, at any instant) and a hit is
//! forgotten at most `period / SLOTS` (1%) late. Denied hits are not recorded.
//!
//! **Calendar windows** (`day`, `month`): one plain counter per window, its start in the key;
//! the window (from one local midnight, or first of the month, to the next) is computed here from
//! Redis' clock and checked by the script against Redis' own `TIME`, so the decision stays atomic.
//!
//! Both also settle reservations: `refund` takes units off (newest slots first, never below 0),
//! `charge` adds units with no check. Time is Redis' own (TIME) plus `--clock-offset-s`, so
//! instances of this service with skewed clocks agree.

use std::sync::atomic::{AtomicI64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use llm_ratelimit::calendar;
use redis::aio::ConnectionManager;
use redis::cluster_async::ClusterConnection;
use redis::Script;
use tokio::sync::{Mutex, OwnedSemaphorePermit, Semaphore};

use crate::config::{unit_seconds, Limit, Window};

/// Sub-windows per window: the window is exact as an upper bound and at most 1% long.
pub const SLOTS: u64 = 100;

/// Units of one call or settlement are capped here (2^40, a trillion): sums stay exact in Lua's
/// doubles, and a check of more than any `u32` limit is refused all the same.
pub const MAX_UNITS: u64 = 1 << 40;

/// A calendar window's counter lives this long after the window ends: a Redis whose clock steps
/// back a little (a failover to a replica behind) still finds the window's count.
const CALENDAR_MARGIN_MS: u64 = 10 * 60 * 1000;

const SLIDING: &str = r#"
-- KEYS[1]: the descriptor's hash: slot number -> hits admitted in it, and t = hits in the counted
-- slots, o = oldest slot that may hold hits, m = newest slot with hits (so a call touches only
-- the slots that left the window since the last call, not all of them).
-- ARGV: mode (check, charge, refund or peek), limit, window in microseconds, units, slots per
-- window, clock offset in microseconds.
-- Returns {admitted, used, microseconds until reset, units applied, now in microseconds}.
local key = KEYS[1]
local mode = ARGV[1]
local limit = tonumber(ARGV[2])
local period = tonumber(ARGV[3])
local hits = tonumber(ARGV[4])
local n = tonumber(ARGV[5])
local slot_len = period / n
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2]) + tonumber(ARGV[6])
local cur = math.floor(now / slot_len)
local first = cur - n
local write = mode ~= 'peek'
local function int(x) return string.format('%d', x) end
-- a slot s stops counting when first > s, at (s + n + 1) * slot_len
local function gone(s) return (s + n + 1) * slot_len - now end
local head = redis.call('HMGET', key, 't', 'o', 'm')
local used = tonumber(head[1]) or 0
local oldest = tonumber(head[2])
local newest = tonumber(head[3])
if oldest and oldest < first then
  if newest < first then
    if write then redis.call('DEL', key) end
    used, oldest, newest = 0, nil, nil
  else
    -- at most n slots: a write at m moved o to at least m - n
    for s = oldest, first - 1 do
      local c = tonumber(redis.call('HGET', key, int(s)))
      if c then
        used = used - c
        if write then redis.call('HDEL', key, int(s)) end
      end
    end
    oldest = first
    if write then redis.call('HSET', key, 't', int(used), 'o', int(oldest)) end
  end
end
local admitted, applied = 1, 0
if mode == 'check' and used + hits > limit then
  admitted = 0
elseif (mode == 'check' or mode == 'charge') and hits > 0 then
  redis.call('HINCRBY', key, int(cur), int(hits))
  used = used + hits
  newest = cur
  oldest = oldest or cur
  applied = hits
  redis.call('HSET', key, 't', int(used), 'o', int(oldest), 'm', int(cur))
  redis.call('PEXPIRE', key, math.ceil(gone(cur) / 1000))
elseif mode == 'refund' and newest and hits > 0 then
  -- Newest slots first (the reservation refunded was made recently), never below 0 in a slot.
  local left = hits
  local s = newest
  while s >= oldest and left > 0 do
    local c = tonumber(redis.call('HGET', key, int(s)))
    if c then
      if c <= left then
        redis.call('HDEL', key, int(s))
        left = left - c
      else
        redis.call('HINCRBY', key, int(s), int(-left))
        left = 0
        break
      end
    end
    s = s - 1
  end
  applied = hits - left
  used = used - applied
  if used <= 0 then
    redis.call('DEL', key)
    used, oldest, newest = 0, nil, nil
  else
    -- every slot above s was emptied: the newest with hits is s or below (one exists: used > 0)
    while s > oldest and not redis.call('HGET', key, int(s)) do s = s - 1 end
    newest = s
    redis.call('HSET', key, 't', int(used), 'm', int(newest))
  end
end
-- Until reset: when admitted (or settled, or only read), until the whole limit is free again;
-- when denied, until these hits would fit.
local reset = 0
if admitted == 1 then
  if newest then reset = gone(newest) end
elseif oldest then
  local left = used
  for s = oldest, newest do
    local c = tonumber(redis.call('HGET', key, int(s)))
    if c then
      left = left - c
      reset = gone(s)
      if left + hits <= limit then break end
    end
  end
end
return {admitted, used, math.ceil(reset), applied, now}
"#;

const CALENDAR: &str = r#"
-- KEYS[1]: the counter of one calendar window (its start is in the key).
-- ARGV: mode (check, charge, refund or peek), limit, units, the window's start and end in
-- microseconds, clock offset in microseconds, milliseconds to keep the key after the window.
-- Returns {admitted, used, microseconds until reset, units applied, now in microseconds}, or
-- {-1, 0, 0, 0, now} when now is not in the window (the caller computes it again from now).
local key = KEYS[1]
local mode = ARGV[1]
local limit = tonumber(ARGV[2])
local hits = tonumber(ARGV[3])
local start = tonumber(ARGV[4])
local stop = tonumber(ARGV[5])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2]) + tonumber(ARGV[6])
if now < start or now >= stop then return {-1, 0, 0, 0, now} end
local function int(x) return string.format('%d', x) end
local used = tonumber(redis.call('GET', key)) or 0
local admitted, applied = 1, 0
if mode == 'check' and used + hits > limit then
  admitted = 0
elseif (mode == 'check' or mode == 'charge') and hits > 0 then
  used = redis.call('INCRBY', key, int(hits))
  applied = hits
  redis.call('PEXPIRE', key, int(math.ceil((stop - now) / 1000) + tonumber(ARGV[7])))
elseif mode == 'refund' and used > 0 and hits > 0 then
  applied = math.min(hits, used)
  used = used - applied
  if used == 0 then redis.call('DEL', key) else redis.call('DECRBY', key, int(applied)) end
end
return {admitted, used, stop - now, applied, now}
"#;

/// What a script does to a counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Adds the units if they fit in the limit.
    Check,
    /// Adds the units, whatever the limit says.
    Charge,
    /// Takes the units off (newest first), never below 0.
    Refund,
    /// Only reads.
    Peek,
}

impl Mode {
    fn arg(self) -> &'static str {
        match self {
            Mode::Check => "check",
            Mode::Charge => "charge",
            Mode::Refund => "refund",
            Mode::Peek => "peek",
        }
    }
}

/// What a script says of one counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counted {
    /// The units fit (always for a settlement or a read).
    pub admitted: bool,
    /// Units in the window now (after this call), possibly above the limit after charges.
    pub used: u64,
    /// Admitted: until the whole limit is free again (a calendar window: until it ends); denied:
    /// until these units would fit.
    pub until_reset: Duration,
    /// Units added or, for a refund, taken off.
    pub applied: u64,
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
    sliding: Script,
    calendar: Script,
    timeout: Duration,
    in_flight: Arc<Semaphore>,
    max_in_flight: u32,
    /// `--clock-offset-s`, in microseconds: added to Redis' TIME in every script.
    clock_offset_us: i64,
    /// Redis' clock (offset included) less this machine's, as last seen: where to look for the
    /// calendar window first (the script has the last word).
    skew_us: AtomicI64,
}

/// Room for one Redis operation, from [`Limiter::reserve`]; given back when dropped.
pub struct Slot {
    _permit: OwnedSemaphorePermit,
}

impl Limiter {
    pub fn new(target: Target, timeout: Duration, max_in_flight: u32, clock_offset_s: i64) -> Limiter {
        let clock_offset_us = clock_offset_s.saturating_mul(1_000_000);
        Limiter {
            target,
            conn: Mutex::new(None),
            sliding: Script::new(SLIDING),
            calendar: Script::new(CALENDAR),
            timeout,
            in_flight: Arc::new(Semaphore::new(max_in_flight as usize)),
            max_in_flight,
            clock_offset_us,
            skew_us: AtomicI64::new(clock_offset_us),
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
        for script in [&self.sliding, &self.calendar] {
            match &mut conn {
                Conn::Single(c) => script.prepare_invoke().load_async(c).await?,
                Conn::Cluster(c) => script.prepare_invoke().load_async(c).await?,
            };
        }
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

    /// Runs `mode` with `units` on the counter of `limit` for the descriptor named `name` (from
    /// [`name`]); `Err` when Redis did not answer within the timeout or answered an error. `_slot`
    /// is held until the answer.
    pub async fn run(&self, _slot: Slot, name: &str, limit: &Limit, mode: Mode, units: u64) -> Result<Counted, String> {
        let units = units.min(MAX_UNITS);
        let call = async {
            let mut conn = self.conn().await.map_err(|e| format!("redis: {e}"))?;
            match &limit.window {
                Window::Sliding => {
                    let period = Duration::from_secs(unit_seconds(limit.unit));
                    let mut invocation = self.sliding.key(format!("{name}:{}", period.as_secs()));
                    invocation
                        .arg(mode.arg())
                        .arg(limit.requests_per_unit)
                        .arg(period.as_micros() as u64)
                        .arg(units)
                        .arg(SLOTS)
                        .arg(self.clock_offset_us);
                    let reply = invoke(&mut conn, &invocation).await?;
                    self.learn_clock(&reply);
                    Ok::<_, String>(reply)
                }
                Window::Calendar(cal) => {
                    // Where this machine thinks Redis' clock is; the script checks it against
                    // its own TIME and, when the window is not the right one, says what time it
                    // is: the next try uses that.
                    let mut now_us = now_us().saturating_add(self.skew_us.load(Relaxed));
                    for _ in 0..3 {
                        let now = llm_ratelimit::time::Instant::from_nanos(now_us.max(0) as u64 * 1000);
                        let (start, end) = calendar::window(now, cal.period, &cal.time_zone);
                        let (start_us, end_us) = (start.as_nanos() / 1000, end.as_nanos() / 1000);
                        let period = if matches!(cal.period, calendar::Period::Day) { "day" } else { "month" };
                        let mut invocation =
                            self.calendar.key(format!("{name}:{period}:{}", start.as_nanos() / 1_000_000_000));
                        invocation
                            .arg(mode.arg())
                            .arg(limit.requests_per_unit)
                            .arg(units)
                            .arg(start_us)
                            .arg(end_us)
                            .arg(self.clock_offset_us)
                            .arg(CALENDAR_MARGIN_MS);
                        let reply = invoke(&mut conn, &invocation).await?;
                        self.learn_clock(&reply);
                        match reply.first() {
                            Some(-1) => now_us = reply.get(4).copied().unwrap_or(now_us),
                            _ => return Ok(reply),
                        }
                    }
                    Err("redis: the calendar window moved under three tries (a clock stepping?)".to_string())
                }
            }
        };
        let reply = match tokio::time::timeout(self.timeout, call).await {
            Ok(Ok(reply)) => reply,
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err(format!("redis: no answer within {:?}", self.timeout)),
        };
        match reply[..] {
            [admitted, used, reset_us, applied, _now] if admitted >= 0 => Ok(Counted {
                admitted: admitted == 1,
                used: used.max(0) as u64,
                until_reset: Duration::from_micros(reset_us.max(0) as u64),
                applied: applied.max(0) as u64,
            }),
            _ => Err(format!("redis: unexpected script reply {reply:?}")),
        }
    }

    /// Keeps Redis' clock (as a script's reply gives it) less this machine's.
    fn learn_clock(&self, reply: &[i64]) {
        if let Some(&redis_now) = reply.get(4) {
            self.skew_us.store(redis_now.saturating_sub(now_us()), Relaxed);
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

/// This machine's clock, in microseconds since the epoch.
fn now_us() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros() as i64)
}

async fn invoke(conn: &mut Conn, invocation: &redis::ScriptInvocation<'_>) -> Result<Vec<i64>, String> {
    match conn {
        Conn::Single(c) => invocation.invoke_async(c).await,
        Conn::Cluster(c) => invocation.invoke_async(c).await,
    }
    .map_err(|e| format!("redis: {e}"))
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

/// The name of a descriptor's counters: the domain and entries inside a Cluster hash tag (one
/// slot per descriptor). The key adds the window: `:SECONDS` (a sliding window's length, so that
/// a changed unit starts afresh) or `:day:START` / `:month:START` (a calendar window's start, in
/// seconds since the epoch). `_`, `%`, `{`, `}`
/// and `#` inside names are %-escaped so that different descriptors never share a key, and a
/// hashed value or name (`#…`) is never a literal one. Limits are matched on the raw values
/// before: hashing only bounds the key, to at most `prefix` + 267 bytes.
pub fn name(prefix: &str, domain: &str, entries: &[(&str, &str)]) -> String {
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
    format!("{prefix}{{{name}}}")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sliding window's key.
    fn key(prefix: &str, domain: &str, entries: &[(&str, &str)], period: Duration) -> String {
        format!("{}:{}", name(prefix, domain, entries), period.as_secs())
    }

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
