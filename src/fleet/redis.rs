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

use super::adopt::Stored;
use super::keys::Keys;

/// Stores a record only over an older generation (or none); clears a
/// rejected mark; expires the record with the token.
/// KEYS: token. ARGV: generation, sealed record, ttl ms.
const STORE: &str = r"
local current = tonumber(redis.call('HGET', KEYS[1], 'gen') or '0')
if tonumber(ARGV[1]) <= current then return 0 end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'gen', ARGV[1], 'sealed', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
";

/// The next generation: the counter's next value, but above both the
/// stored record's and the caller's (a Redis restarted empty, or a counter
/// evicted, must not hand out numbers the fleet has seen).
/// KEYS: generation, token. ARGV: the caller's generation.
const NEXT_GENERATION: &str = r"
local g = redis.call('INCR', KEYS[1])
local floor = math.max(tonumber(ARGV[1]), tonumber(redis.call('HGET', KEYS[2], 'gen') or '0'))
if g <= floor then
  g = floor + 1
  redis.call('SET', KEYS[1], g)
end
return g
";

/// Marks the record of one generation rejected (not a newer one).
/// KEYS: token. ARGV: generation.
const MARK_REJECTED: &str = r"
if redis.call('HGET', KEYS[1], 'gen') == ARGV[1] then
  redis.call('HSET', KEYS[1], 'rejected', '1')
  return 1
end
return 0
";

/// Deletes the lock if the caller still holds it.
/// KEYS: lock. ARGV: owner.
const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
";

/// Sets the lock's expiry if the caller still holds it.
/// KEYS: lock. ARGV: owner, px.
const RENEW: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
";

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

    /// The profile's record: its plain fields and the sealed token.
    pub async fn read(&self, keys: &Keys) -> Result<Option<(Stored, Vec<u8>)>, RedisDown> {
        let mut conn = self.manager.clone();
        let key = keys.token.clone();
        let (generation, sealed, rejected): (Option<u64>, Option<Vec<u8>>, Option<String>) = self
            .run("HMGET", async move {
                redis::cmd("HMGET")
                    .arg(&key)
                    .arg("gen")
                    .arg("sealed")
                    .arg("rejected")
                    .query_async(&mut conn)
                    .await
            })
            .await?;
        let (Some(generation), Some(sealed)) = (generation, sealed) else {
            return Ok(None);
        };
        Ok(Some((
            Stored {
                generation,
                // Filled in from the sealed record by the caller.
                expire_at: 0,
                issued_at_ms: 0,
                rejected: rejected.is_some(),
            },
            sealed,
        )))
    }

    /// `SET lock owner NX PX px`: whether this sidecar now holds the lock.
    pub async fn try_lock(
        &self,
        keys: &Keys,
        owner: &str,
        px: Duration,
    ) -> Result<bool, RedisDown> {
        let mut conn = self.manager.clone();
        let (key, owner) = (keys.lock.clone(), owner.to_string());
        let px = px.as_millis().max(1) as u64;
        let set: Option<String> = self
            .run("SET NX PX", async move {
                redis::cmd("SET")
                    .arg(&key)
                    .arg(&owner)
                    .arg("NX")
                    .arg("PX")
                    .arg(px)
                    .query_async(&mut conn)
                    .await
            })
            .await?;
        Ok(set.is_some())
    }

    /// Sets the lock's expiry to `px` from now, if `owner` still holds it.
    pub async fn renew(&self, keys: &Keys, owner: &str, px: Duration) -> Result<bool, RedisDown> {
        let mut conn = self.manager.clone();
        let (key, owner) = (keys.lock.clone(), owner.to_string());
        let px = px.as_millis().max(1) as u64;
        let renewed: i64 = self
            .run("renew the lock", async move {
                Script::new(RENEW)
                    .key(&key)
                    .arg(&owner)
                    .arg(px)
                    .invoke_async(&mut conn)
                    .await
            })
            .await?;
        Ok(renewed == 1)
    }

    /// Deletes the lock, if `owner` still holds it.
    pub async fn release(&self, keys: &Keys, owner: &str) -> Result<(), RedisDown> {
        let mut conn = self.manager.clone();
        let (key, owner) = (keys.lock.clone(), owner.to_string());
        let _: i64 = self
            .run("release the lock", async move {
                Script::new(RELEASE)
                    .key(&key)
                    .arg(&owner)
                    .invoke_async(&mut conn)
                    .await
            })
            .await?;
        Ok(())
    }

    /// The generation for a token about to be stored, above `held`.
    pub async fn next_generation(&self, keys: &Keys, held: u64) -> Result<u64, RedisDown> {
        let mut conn = self.manager.clone();
        let (counter, token) = (keys.generation.clone(), keys.token.clone());
        self.run("next generation", async move {
            Script::new(NEXT_GENERATION)
                .key(&counter)
                .key(&token)
                .arg(held)
                .invoke_async(&mut conn)
                .await
        })
        .await
    }

    /// Stores the sealed record of `generation`, expiring after `ttl`;
    /// false if a newer one is there.
    pub async fn store(
        &self,
        keys: &Keys,
        generation: u64,
        sealed: Vec<u8>,
        ttl: Duration,
    ) -> Result<bool, RedisDown> {
        let mut conn = self.manager.clone();
        let key = keys.token.clone();
        let ttl = ttl.as_millis().max(1) as u64;
        let stored: i64 = self
            .run("store the token", async move {
                Script::new(STORE)
                    .key(&key)
                    .arg(generation)
                    .arg(sealed)
                    .arg(ttl)
                    .invoke_async(&mut conn)
                    .await
            })
            .await?;
        Ok(stored == 1)
    }

    /// Marks the record of `generation` rejected.
    pub async fn mark_rejected(&self, keys: &Keys, generation: u64) -> Result<(), RedisDown> {
        let mut conn = self.manager.clone();
        let key = keys.token.clone();
        let _: i64 = self
            .run("mark the token rejected", async move {
                Script::new(MARK_REJECTED)
                    .key(&key)
                    .arg(generation)
                    .invoke_async(&mut conn)
                    .await
            })
            .await?;
        Ok(())
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
