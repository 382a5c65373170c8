//! The fleet's Redis, as the fleet uses it: a handful of commands, each
//! bounded by `fleet.command_timeout_ms`, and the link's state.
//!
//! The client is the `redis` crate's connection manager, created lazily
//! (starting never waits for Redis) and reconnecting by itself. Every
//! command that fails or is slower than the timeout marks the link down
//! ([`Link`]): the fleet's profiles then fetch on their own until a probe
//! succeeds. Writes that must not overtake each other are Lua scripts run
//! atomically by Redis: storing only a newer generation, releasing or
//! renewing the lock only while holding it.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use prometheus_client::metrics::gauge::Gauge;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{AsyncCommands as _, Script};

use super::keys::Keys;

/// The largest sealed record read: a real one is a few hundred bytes; a
/// bigger value (a hostile or broken writer) counts as absent, and is
/// never loaded into memory.
pub const MAX_SEALED_BYTES: usize = 16 * 1024;

/// Generations stay below 2^53: Lua numbers are doubles, and a bigger
/// one (a hostile or broken writer) counts as none.
pub const MAX_GENERATION: u64 = 1 << 53;

/// The record, if it is a hash with a sane generation and a sealed value
/// no bigger than the limit; anything else counts as absent (never as
/// Redis being down, which would turn the fleet off for good).
/// KEYS: token. ARGV: the size limit, the generation limit.
const READ: &str = r"
if redis.call('TYPE', KEYS[1]).ok ~= 'hash' then return false end
if redis.call('HSTRLEN', KEYS[1], 'sealed') > tonumber(ARGV[1]) then return false end
local g = tonumber(redis.call('HGET', KEYS[1], 'gen'))
if not g or g < 1 or g >= tonumber(ARGV[2]) or g ~= math.floor(g) then return false end
return {tostring(g), redis.call('HGET', KEYS[1], 'sealed'), redis.call('HEXISTS', KEYS[1], 'rejected')}
";

/// Stores a record only over an older generation (or over nothing, or
/// over something that is not a sane record); expires it with the token.
/// KEYS: token. ARGV: generation, sealed record, ttl ms, generation limit.
const STORE: &str = r"
local current = 0
if redis.call('TYPE', KEYS[1]).ok == 'hash' then
  current = tonumber(redis.call('HGET', KEYS[1], 'gen')) or 0
  if current >= tonumber(ARGV[4]) then current = 0 end
end
if tonumber(ARGV[1]) <= current then return 0 end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'gen', ARGV[1], 'sealed', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
";

/// The next generation: the counter's next value, but above both the
/// stored record's and the caller's (a Redis restarted empty, or a counter
/// evicted, must not hand out numbers the fleet has seen). A counter that
/// is not a sane integer, or a record generation past the limit, is
/// ignored and replaced.
/// KEYS: generation, token. ARGV: the caller's generation, the limit.
const NEXT_GENERATION: &str = r"
local limit = tonumber(ARGV[2])
local kind = redis.call('TYPE', KEYS[1]).ok
if kind ~= 'none' then
  local v = kind == 'string' and redis.call('GET', KEYS[1])
  if not v or not string.match(v, '^%d+$') or #v > 15 or tonumber(v) >= limit then
    redis.call('DEL', KEYS[1])
  end
end
local floor = tonumber(ARGV[1])
if redis.call('TYPE', KEYS[2]).ok == 'hash' then
  local stored = tonumber(redis.call('HGET', KEYS[2], 'gen'))
  if stored and stored < limit and stored > floor then floor = stored end
end
local g = redis.call('INCR', KEYS[1])
if g <= floor then
  g = floor + 1
  redis.call('SET', KEYS[1], string.format('%d', g))
end
if g >= limit then
  -- Wrapped: the record (whose generation is the floor) goes too, or
  -- nothing could be stored over it again.
  g = 1
  redis.call('SET', KEYS[1], '1')
  redis.call('DEL', KEYS[2])
end
return g
";

/// Records a rejected token: its digest into the set of rejected ones,
/// scored by when (entries older than `ttl` are trimmed on each write, the
/// longest a stored token may live), so a sidecar that missed the
/// publication, or reads an old record put back, still knows; and the
/// record of its generation (not a newer one) marked.
/// KEYS: rejected, token. ARGV: digest, generation (0: none), ttl ms.
const REJECT: &str = r"
local kind = redis.call('TYPE', KEYS[1]).ok
if kind ~= 'zset' and kind ~= 'none' then redis.call('DEL', KEYS[1]) end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[3]))
redis.call('PEXPIRE', KEYS[1], ARGV[3])
if ARGV[2] ~= '0' and redis.call('TYPE', KEYS[2]).ok == 'hash' and redis.call('HGET', KEYS[2], 'gen') == ARGV[2] then
  redis.call('HSET', KEYS[2], 'rejected', '1')
end
return 1
";

/// Whether a digest is in the set of rejected tokens.
/// KEYS: rejected. ARGV: digest.
const IS_REJECTED: &str = r"
if redis.call('TYPE', KEYS[1]).ok ~= 'zset' then return 0 end
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then return 1 end
return 0
";

/// Takes the lock if free; a lock someone set without an expiry, or
/// with a longer one than any sidecar sets (a hostile or broken writer,
/// or a key of another type), is bounded to `px`, so it cannot block the
/// fleet for longer than a dead holder would.
/// KEYS: lock. ARGV: owner, px.
const LOCK: &str = r"
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
local left = redis.call('PTTL', KEYS[1])
if left == -1 or left > tonumber(ARGV[2]) then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
";

/// Deletes the lock if the caller still holds it.
/// KEYS: lock. ARGV: owner.
const RELEASE: &str = r"
if redis.call('TYPE', KEYS[1]).ok == 'string' and redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
";

/// Sets the lock's expiry if the caller still holds it.
/// KEYS: lock. ARGV: owner, px.
const RENEW: &str = r"
if redis.call('TYPE', KEYS[1]).ok == 'string' and redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
";

/// Who holds the lock, if it is a lock.
/// KEYS: lock.
const OWNER: &str = r"
if redis.call('TYPE', KEYS[1]).ok ~= 'string' then return false end
return redis.call('GET', KEYS[1])
";

/// Counts a failed fetch of the fleet's (the consecutive failures, for a
/// backoff the whole fleet keeps), forgotten after `ttl` ms.
/// KEYS: failures. ARGV: ttl.
const FAILED: &str = r"
if redis.call('TYPE', KEYS[1]).ok ~= 'string' then redis.call('DEL', KEYS[1]) end
local v = redis.call('GET', KEYS[1])
if v and (not string.match(v, '^%d+$') or #v > 6) then redis.call('DEL', KEYS[1]) end
local n = redis.call('INCR', KEYS[1])
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return n
";

/// The record as Redis holds it, before it is opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredRecord {
    /// Its generation (in clear, so scripts can compare).
    pub generation: u64,
    /// A sidecar marked it rejected.
    pub rejected: bool,
    /// The sealed [`super::sealed::Record`].
    pub sealed: Vec<u8>,
}

/// A Redis command failed or took longer than the command timeout.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct RedisDown(pub String);

/// Whether Redis answers, as the fleet last saw it; each change is
/// logged once and shown by `klavi_sidecar_fleet_redis_up`.
#[derive(Debug)]
pub struct Link {
    /// 0 not tried yet, 1 up, 2 down.
    state: AtomicU8,
    gauge: Gauge,
}

const UNTRIED: u8 = 0;
const UP: u8 = 1;
const DOWN: u8 = 2;

impl Link {
    /// A link not tried yet (used as if up), reporting to `gauge`.
    pub fn new(gauge: Gauge) -> Self {
        gauge.set(0);
        Self {
            state: AtomicU8::new(UNTRIED),
            gauge,
        }
    }

    /// Whether to use Redis (up, or not tried yet).
    pub fn usable(&self) -> bool {
        self.state.load(Ordering::Acquire) != DOWN
    }

    /// Whether Redis is known to be down.
    pub fn is_down(&self) -> bool {
        !self.usable()
    }

    /// A command succeeded.
    pub fn up(&self) {
        self.gauge.set(1);
        match self.state.swap(UP, Ordering::AcqRel) {
            DOWN => tracing::info!("Redis answers again; fleet profiles share their tokens again"),
            UNTRIED => tracing::info!("Redis answers; fleet mode on"),
            _ => {}
        }
    }

    /// A command failed or was too slow.
    pub fn down(&self, error: &RedisDown) {
        self.gauge.set(0);
        if self.state.swap(DOWN, Ordering::AcqRel) != DOWN {
            tracing::warn!(
                error = %error,
                "Redis unreachable or slower than fleet.command_timeout_ms; fleet profiles \
                 fetch their own tokens (standalone) until it answers again"
            );
        }
    }
}

/// The fleet's commands over one connection manager.
#[derive(Clone)]
pub struct Redis {
    manager: ConnectionManager,
    timeout: Duration,
    link: Arc<Link>,
}

impl std::fmt::Debug for Redis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Redis")
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// `d` in whole milliseconds (at least 1), as a command argument.
fn millis(d: Duration) -> String {
    d.as_millis().clamp(1, u128::from(u64::MAX)).to_string()
}

/// The connection manager's settings: every connection attempt and
/// response bounded by the command timeout; reconnection retried by the
/// manager a few times with a short backoff (the fleet's own probe does the
/// rest).
fn manager_config(timeout: Duration) -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_connection_timeout(Some(timeout))
        .set_response_timeout(Some(timeout))
        .set_number_of_retries(2)
        .set_min_delay(Duration::from_millis(50))
        .set_max_delay(Duration::from_secs(1))
}

impl Redis {
    /// A lazily connecting client for `client`'s Redis.
    pub fn new(
        client: redis::Client,
        timeout: Duration,
        link: Arc<Link>,
    ) -> Result<Self, redis::RedisError> {
        let manager = ConnectionManager::new_lazy_with_config(client, manager_config(timeout))?;
        Ok(Self {
            manager,
            timeout,
            link,
        })
    }

    /// The link's state.
    pub fn link(&self) -> &Arc<Link> {
        &self.link
    }

    /// Runs `command` under the timeout, recording the outcome on the link.
    async fn run<T, F>(&self, what: &str, command: F) -> Result<T, RedisDown>
    where
        F: Future<Output = redis::RedisResult<T>>,
    {
        let outcome = match tokio::time::timeout(self.timeout, command).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(error)) => Err(RedisDown(format!("{what}: {error}"))),
            Err(_) => Err(RedisDown(format!(
                "{what}: no answer within {} ms",
                self.timeout.as_millis()
            ))),
        };
        match &outcome {
            Ok(_) => self.link.up(),
            Err(error) => self.link.down(error),
        }
        outcome
    }

    /// `PING`: the probe that rejoins after an outage.
    pub async fn ping(&self) -> Result<(), RedisDown> {
        let mut conn = self.manager.clone();
        self.run("PING", async move {
            redis::cmd("PING").query_async::<String>(&mut conn).await
        })
        .await
        .map(|_| ())
    }

    /// Runs one of the scripts above with `keys` and `args`.
    async fn eval<T>(
        &self,
        what: &str,
        code: &'static str,
        keys: &[&str],
        args: &[&[u8]],
    ) -> Result<T, RedisDown>
    where
        T: redis::FromRedisValue + Send,
    {
        let mut conn = self.manager.clone();
        let keys: Vec<String> = keys.iter().map(|k| k.to_string()).collect();
        let args: Vec<Vec<u8>> = args.iter().map(|a| a.to_vec()).collect();
        self.run(what, async move {
            let script = Script::new(code);
            let mut invocation = script.prepare_invoke();
            for key in &keys {
                invocation.key(key);
            }
            for arg in &args {
                invocation.arg(arg.as_slice());
            }
            invocation.invoke_async(&mut conn).await
        })
        .await
    }

    /// The profile's record as stored: its generation in clear, whether it
    /// is marked rejected, and the sealed token (anything but a sane
    /// record counts as none).
    pub async fn read(&self, keys: &Keys) -> Result<Option<StoredRecord>, RedisDown> {
        let (limit, generations) = (MAX_SEALED_BYTES.to_string(), MAX_GENERATION.to_string());
        let found: Option<(String, Vec<u8>, i64)> = self
            .eval(
                "read the token",
                READ,
                &[&keys.token],
                &[limit.as_bytes(), generations.as_bytes()],
            )
            .await?;
        Ok(found.and_then(|(generation, sealed, rejected)| {
            Some(StoredRecord {
                generation: generation.parse().ok()?,
                rejected: rejected == 1,
                sealed,
            })
        }))
    }

    /// Who holds the lock now.
    pub async fn lock_owner(&self, keys: &Keys) -> Result<Option<String>, RedisDown> {
        self.eval("read the lock", OWNER, &[&keys.lock], &[]).await
    }

    /// Counts a failed fetch; returns the fleet's consecutive failures.
    pub async fn count_failure(&self, keys: &Keys, ttl: Duration) -> Result<u32, RedisDown> {
        let ttl = millis(ttl);
        let n: i64 = self
            .eval(
                "count a failure",
                FAILED,
                &[&keys.failures],
                &[ttl.as_bytes()],
            )
            .await?;
        Ok(u32::try_from(n).unwrap_or(u32::MAX))
    }

    /// Forgets the fleet's failures (a fetch succeeded).
    pub async fn clear_failures(&self, keys: &Keys) -> Result<(), RedisDown> {
        let mut conn = self.manager.clone();
        let key = keys.failures.clone();
        let _: i64 = self
            .run("clear the failures", async move {
                redis::cmd("DEL").arg(&key).query_async(&mut conn).await
            })
            .await?;
        Ok(())
    }

    /// `SET lock owner NX PX px`: whether this sidecar now holds the lock
    /// (a lock without an expiry, or a longer one, is bounded to `px`).
    pub async fn try_lock(
        &self,
        keys: &Keys,
        owner: &str,
        px: Duration,
    ) -> Result<bool, RedisDown> {
        let px = millis(px);
        let taken: i64 = self
            .eval(
                "take the lock",
                LOCK,
                &[&keys.lock],
                &[owner.as_bytes(), px.as_bytes()],
            )
            .await?;
        Ok(taken == 1)
    }

    /// Sets the lock's expiry to `px` from now, if `owner` still holds it.
    pub async fn renew(&self, keys: &Keys, owner: &str, px: Duration) -> Result<bool, RedisDown> {
        let px = millis(px);
        let renewed: i64 = self
            .eval(
                "renew the lock",
                RENEW,
                &[&keys.lock],
                &[owner.as_bytes(), px.as_bytes()],
            )
            .await?;
        Ok(renewed == 1)
    }

    /// Deletes the lock, if `owner` still holds it.
    pub async fn release(&self, keys: &Keys, owner: &str) -> Result<(), RedisDown> {
        let _: i64 = self
            .eval(
                "release the lock",
                RELEASE,
                &[&keys.lock],
                &[owner.as_bytes()],
            )
            .await?;
        Ok(())
    }

    /// The generation for a token about to be stored, above `held`.
    pub async fn next_generation(&self, keys: &Keys, held: u64) -> Result<u64, RedisDown> {
        let held = held.min(MAX_GENERATION - 1).to_string();
        let limit = MAX_GENERATION.to_string();
        self.eval(
            "next generation",
            NEXT_GENERATION,
            &[&keys.generation, &keys.token],
            &[held.as_bytes(), limit.as_bytes()],
        )
        .await
    }

    /// Stores the sealed record of `generation`, expiring after `ttl`;
    /// false if a newer one is there.
    pub async fn store(
        &self,
        keys: &Keys,
        generation: u64,
        sealed: &[u8],
        ttl: Duration,
    ) -> Result<bool, RedisDown> {
        let (generation, ttl, limit) = (
            generation.to_string(),
            millis(ttl),
            MAX_GENERATION.to_string(),
        );
        let stored: i64 = self
            .eval(
                "store the token",
                STORE,
                &[&keys.token],
                &[
                    generation.as_bytes(),
                    sealed,
                    ttl.as_bytes(),
                    limit.as_bytes(),
                ],
            )
            .await?;
        Ok(stored == 1)
    }

    /// Records the token of `digest` (hex) rejected, and marks the record
    /// of `generation` (0: none).
    pub async fn reject(
        &self,
        keys: &Keys,
        digest: &str,
        generation: u64,
    ) -> Result<(), RedisDown> {
        let (generation, ttl) = (generation.to_string(), millis(super::adopt::MAX_AHEAD));
        let _: i64 = self
            .eval(
                "record the rejection",
                REJECT,
                &[&keys.rejected, &keys.token],
                &[digest.as_bytes(), generation.as_bytes(), ttl.as_bytes()],
            )
            .await?;
        Ok(())
    }

    /// Whether the token of `digest` (hex) was reported rejected.
    pub async fn is_rejected(&self, keys: &Keys, digest: &str) -> Result<bool, RedisDown> {
        let found: i64 = self
            .eval(
                "read the rejections",
                IS_REJECTED,
                &[&keys.rejected],
                &[digest.as_bytes()],
            )
            .await?;
        Ok(found == 1)
    }

    /// Publishes a sealed event on the profile's channel.
    pub async fn publish(&self, keys: &Keys, sealed: Vec<u8>) -> Result<(), RedisDown> {
        let mut conn = self.manager.clone();
        let channel = keys.events.clone();
        let _: i64 = self
            .run(
                "PUBLISH",
                async move { conn.publish(&channel, sealed).await },
            )
            .await?;
        Ok(())
    }
}
