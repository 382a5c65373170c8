//! The fleet's [`TokenSource`]: wraps the Klavi client, so the refresh task
//! keeps its schedule, backoff, budget and single flight, and only where
//! the token comes from changes (SPEC §8).
//!
//! When the task asks for a token:
//! 1. a newer servable token in Redis, not yet due, is adopted (no request
//!    to Klavi);
//! 2. else the sidecar takes the lock (`SET NX PX`, a random owner, PX above
//!    Klavi's request timeout, renewed while the fetch runs), fetches from
//!    Klavi, stores the token sealed with the next generation, publishes,
//!    and releases the lock (compare-and-delete);
//! 3. else another sidecar holds the lock: this one waits, up to
//!    `refresh.wait_ms`, for its publication (re-reading the record and
//!    retrying the lock every [`POLL`], so a holder that died is replaced
//!    once its lock expires), and adopts what it stored. A failure
//!    published by the holder ends the wait with that failure.
//!
//! Redis unreachable or slow at any step: the Klavi client is asked
//! directly, as without fleet mode. A failed fetch keeps the lock for
//! `backoff_initial_ms`, so the fleet too waits that floor before the next
//! attempt (§5.9).

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rand::RngCore as _;
use tokio::time::Instant;

use super::adopt::{self, Verdict};
use super::member::{Held, Member, Sealing};
use super::redis::{Redis, RedisDown};
use super::sealed::{Event, Record};
use crate::cache::policy::RefreshPolicy;
use crate::cache::source::{FetchError, TokenSource};
use crate::cache::token::Token;
use crate::clock::{WallClock, unix_secs};
use crate::secret::Secret;

/// How often a waiting sidecar re-reads the record and retries the lock
/// when no publication comes.
pub const POLL: Duration = Duration::from_millis(250);

/// How much the lock's PX exceeds Klavi's request timeout.
pub const LOCK_MARGIN: Duration = Duration::from_secs(2);

/// The fleet's knobs for one profile.
#[derive(Debug, Clone)]
pub struct FleetSettings {
    /// The profile's refresh policy (the adoption rule and the backoff
    /// floor).
    pub policy: RefreshPolicy,
    /// How long to wait for another sidecar's fetch.
    pub wait: Duration,
    /// The lock's PX: Klavi's request timeout plus [`LOCK_MARGIN`].
    pub lock_px: Duration,
}

/// Why coordinating failed.
enum Failed {
    /// Redis (the link logged it): fetch standalone.
    Redis,
    /// The fetch (ours, or the lock holder's).
    Fetch(FetchError),
}

impl From<RedisDown> for Failed {
    fn from(_: RedisDown) -> Self {
        Self::Redis
    }
}

/// The fleet source over `S` (the Klavi client).
pub struct FleetSource<S> {
    inner: S,
    member: Arc<Member>,
    redis: Redis,
    settings: FleetSettings,
    clock: Arc<dyn WallClock>,
}

impl<S> std::fmt::Debug for FleetSource<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FleetSource")
            .field("profile", &self.member.name)
            .finish_non_exhaustive()
    }
}

fn unix_ms(time: SystemTime) -> i64 {
    (unix_secs(time) * 1000.0) as i64
}

impl<S: TokenSource> FleetSource<S> {
    /// `inner` shared through `redis` as `member`.
    pub fn new(
        inner: S,
        member: Arc<Member>,
        redis: Redis,
        settings: FleetSettings,
        clock: Arc<dyn WallClock>,
    ) -> Self {
        Self {
            inner,
            member,
            redis,
            settings,
            clock,
        }
    }

    async fn coordinate(&self, sealing: &Arc<Sealing>) -> Result<Token, Failed> {
        let deadline = Instant::now() + self.settings.wait;
        let mut events = self.member.events();
        // Bounded: each round waits at least until the deadline or POLL.
        let rounds = self.settings.wait.as_millis() / POLL.as_millis() + 2;
        for _ in 0..rounds {
            events.borrow_and_update();
            if let Some(token) = self.adopt(sealing).await? {
                return Ok(token);
            }
            let owner = owner();
            if self
                .redis
                .try_lock(&sealing.keys, &owner, self.settings.lock_px)
                .await?
            {
                // Checked again under the lock: a holder may have stored,
                // published and released between the read above and the
                // lock (then fetching again would be a second request for
                // one refresh).
                if let Some(token) = self.adopt(sealing).await? {
                    self.redis.release(&sealing.keys, &owner).await?;
                    return Ok(token);
                }
                return self.fetch_holding(sealing, &owner).await;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            tokio::select! {
                changed = events.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    let event = events.borrow_and_update().1.clone();
                    // Only the holder's own failure ends the wait (its lock
                    // stays for the fleet's backoff): a replayed old event
                    // names an owner that holds nothing now.
                    if let Some(Event::Failed { owner, category, retry_after_ms }) = event
                        && self.redis.lock_owner(&sealing.keys).await?.as_deref() == Some(owner.as_str())
                    {
                        return Err(Failed::Fetch(FetchError::Fleet {
                            category,
                            retry_after: retry_after_ms.map(Duration::from_millis),
                        }));
                    }
                }
                () = tokio::time::sleep(POLL.min(left)) => {}
            }
        }
        Err(Failed::Fetch(FetchError::FleetWait))
    }

    /// The record, if it may be adopted now.
    async fn adopt(&self, sealing: &Sealing) -> Result<Option<Token>, RedisDown> {
        let Some(found) = self.redis.read(&sealing.keys).await? else {
            return Ok(None);
        };
        let Some(record) = sealing.key.open(&found.sealed) else {
            // Another key pair's (rotated keys) or tampered with: absent.
            return Ok(None);
        };
        if record.generation != found.generation {
            return Ok(None);
        }
        let stored = adopt::Stored {
            generation: found.generation,
            expire_at: record.expire_at,
            issued_at_ms: record.issued_at_ms,
            rejected: found.rejected,
        };
        let now_ms = unix_ms(self.clock.now());
        let held = self.member.held();
        let Verdict::Adopt { lifetime, age } =
            adopt::assess(&stored, held.generation, now_ms, &self.settings.policy)
        else {
            return Ok(None);
        };
        let now = Instant::now();
        let expire_at =
            UNIX_EPOCH + Duration::from_secs(u64::try_from(record.expire_at).unwrap_or(0));
        let token = Token::new(
            Secret::new(record.token),
            now.checked_sub(age).unwrap_or(now),
            lifetime,
            expire_at,
        );
        if self.member.store.refusal(&token).is_some()
            || self
                .redis
                .is_rejected(&sealing.keys, &token.digest().to_hex())
                .await?
        {
            return Ok(None);
        }
        self.member.hold(Held {
            generation: record.generation,
            digest: Some(*token.digest()),
            role: Role::Adopted,
        });
        self.member.adopted.inc();
        tracing::info!(
            profile = %self.member.name,
            fingerprint = token.fingerprint(),
            generation = record.generation,
            expires_in_secs = token.remaining(now).as_secs(),
            "token adopted from the fleet"
        );
        Ok(Some(token))
    }

    /// Holding the lock: fetch (renewing it meanwhile); then share the
    /// token in the background (the refresh task stores it at once,
    /// whatever Redis's latency), or on failure keep the lock for the
    /// fleet's backoff and tell the waiters.
    async fn fetch_holding(&self, sealing: &Arc<Sealing>, owner: &str) -> Result<Token, Failed> {
        let px = self.settings.lock_px;
        // Released if this future is dropped mid-fetch (shutdown).
        let mut guard = LockGuard {
            redis: self.redis.clone(),
            sealing: Arc::clone(sealing),
            owner: owner.to_string(),
            armed: true,
        };
        let renew = async {
            // Until the fetch ends (it is bounded by Klavi's timeouts).
            loop {
                tokio::time::sleep(px / 3).await;
                if !matches!(self.redis.renew(&sealing.keys, owner, px).await, Ok(true)) {
                    tracing::debug!(profile = %self.member.name, "the fleet lock could not be renewed");
                }
            }
        };
        let fetched = tokio::select! {
            fetched = self.inner.fetch() => fetched,
            // Never taken: the renewal loop does not end.
            () = renew => Err(FetchError::Timeout),
        };
        guard.armed = false;
        match fetched {
            Ok(token) => {
                let held = self.member.held();
                // The schedule is a fetcher's from now on (its jitter is
                // asked for before the share below ends).
                self.member.hold(Held {
                    generation: held.generation,
                    digest: Some(*token.digest()),
                    role: Role::Fetched,
                });
                tokio::spawn(share(
                    self.redis.clone(),
                    Arc::clone(&self.member),
                    Arc::clone(sealing),
                    owner.to_string(),
                    token.clone(),
                    held.generation,
                    Arc::clone(&self.clock),
                ));
                Ok(token)
            }
            Err(error) => {
                // The fleet's consecutive failures set how long the lock
                // stays: the whole fleet backs off as one sidecar would
                // (never less than the floor, §5.9).
                let policy = &self.settings.policy;
                let failures = self
                    .redis
                    .count_failure(&sealing.keys, policy.backoff_max * 4)
                    .await
                    .unwrap_or(1);
                let failure = crate::cache::policy::Failure {
                    category: error.category(),
                    retry_after: error.retry_after(),
                    failures,
                };
                let cooldown = crate::cache::policy::delay_after_failure(
                    &failure,
                    policy,
                    rand::random::<f64>(),
                );
                let _ = self.redis.renew(&sealing.keys, owner, cooldown).await;
                let event = Event::Failed {
                    owner: owner.to_string(),
                    category: error.category(),
                    retry_after_ms: error.retry_after().map(|d| d.as_millis() as u64),
                };
                if let Ok(sealed) = sealing.key.seal_event(&event) {
                    let _ = self.redis.publish(&sealing.keys, sealed).await;
                }
                Err(Failed::Fetch(error))
            }
        }
    }
}

/// Releases the lock when dropped armed: a fetch cancelled at shutdown
/// does not leave the fleet waiting for the lock's PX.
struct LockGuard {
    redis: Redis,
    sealing: Arc<Sealing>,
    owner: String,
    armed: bool,
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let (redis, sealing, owner) = (
            self.redis.clone(),
            Arc::clone(&self.sealing),
            std::mem::take(&mut self.owner),
        );
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                let _ = redis.release(&sealing.keys, &owner).await;
            });
        }
    }
}

/// Stores `token` with the next generation, publishes, releases the lock
/// (whatever fails on the way: the lock never outlives the share), and
/// clears the fleet's failures. A token reported rejected meanwhile is
/// not shared.
async fn share(
    redis: Redis,
    member: Arc<Member>,
    sealing: Arc<Sealing>,
    owner: String,
    token: Token,
    held_generation: u64,
    clock: Arc<dyn WallClock>,
) {
    let shared = async {
        let _ = redis.clear_failures(&sealing.keys).await;
        if member.store.refusal(&token).is_some() {
            return Ok(());
        }
        if token.remaining(Instant::now()) > super::adopt::MAX_AHEAD {
            // The others would ignore it (an expiry over a day ahead is
            // taken for a broken writer's, SPEC §8): said, not stored.
            tracing::warn!(
                profile = %member.name,
                fingerprint = token.fingerprint(),
                "the token lives longer than a day, which fleet mode does not share; each sidecar \
                 fetches its own"
            );
            return Ok(());
        }
        let generation = redis
            .next_generation(&sealing.keys, held_generation)
            .await?;
        let now = Instant::now();
        let now_ms = unix_ms(clock.now());
        let age_ms = now.saturating_duration_since(token.sent_at()).as_millis() as i64;
        let record = Record {
            token: token.value().expose().to_string(),
            expire_at: token.expire_at_unix(),
            issued_at_ms: now_ms - age_ms,
            generation,
        };
        let Ok(sealed) = sealing.key.seal(&record) else {
            return Ok(());
        };
        let ttl = token.remaining(now).max(Duration::from_millis(1));
        let stored = redis.store(&sealing.keys, generation, &sealed, ttl).await?;
        // Only if nothing newer came meanwhile (this sidecar's own next
        // fetch, or an adoption).
        let digest = *token.digest();
        let current = member.held();
        if current.digest == Some(digest) {
            member.hold(Held {
                generation,
                digest: Some(digest),
                role: Role::Fetched,
            });
        }
        if stored {
            if let Ok(event) = sealing.key.seal_event(&Event::Stored { generation }) {
                redis.publish(&sealing.keys, event).await?;
            }
            tracing::debug!(profile = %member.name, generation, "token shared with the fleet");
        }
        Ok::<(), RedisDown>(())
    };
    if let Err(error) = shared.await {
        tracing::debug!(profile = %member.name, %error, "token not shared");
    }
    let _ = redis.release(&sealing.keys, &owner).await;
}

/// A random lock owner: whoever holds the lock is the one that set it.
fn owner() -> String {
    let mut bytes = [0u8; 16];
    rand::rng().fill_bytes(&mut bytes);
    hex::encode(bytes)
}

/// The schedule's jitter for a token the fleet shares, from a `drawn`
/// uniform one: the sidecar that fetched it refreshes in the earlier half
/// of the jitter window (jitter in `[0.5, 1)` moves the refresh earlier),
/// those that adopted it in the later half. So the fetcher fetches again
/// and the others adopt, and the fleet's token is refreshed about when a
/// standalone sidecar's would be, not at the earliest of N random times;
/// the adopters stay spread over half the window, so they do not all
/// fetch at one instant if Redis is down then. A standalone token keeps
/// its draw.
pub fn shared_jitter(role: Role, drawn: f64) -> f64 {
    let drawn = if drawn.is_finite() {
        drawn.clamp(0.0, 1.0)
    } else {
        0.0
    };
    match role {
        Role::Fetched => 0.5 + drawn / 2.0,
        Role::Adopted => drawn / 2.0,
        Role::Standalone => drawn,
    }
}

/// How this sidecar came by the token it holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// It fetched it and shared it.
    Fetched,
    /// It adopted it from Redis.
    Adopted,
    /// It fetched it on its own (Redis down).
    Standalone,
}

impl<S: TokenSource> TokenSource for FleetSource<S> {
    fn schedule_jitter(&self, token: &Token, drawn: f64) -> f64 {
        let held = self.member.held();
        let role = match held.digest {
            Some(digest) if digest == *token.digest() => held.role,
            _ => Role::Standalone,
        };
        shared_jitter(role, drawn)
    }

    async fn fetch(&self) -> Result<Token, FetchError> {
        // Down: probe first (twice: the first command after Redis came
        // back fails on the old connection and makes the manager
        // reconnect), each bounded by the command timeout, so a refresh
        // due just after Redis is back rejoins at once instead of fetching
        // on its own.
        if self.redis.link().usable()
            || self.redis.ping().await.is_ok()
            || self.redis.ping().await.is_ok()
        {
            let sealing = self.member.sealing().await;
            match self.coordinate(&sealing).await {
                Ok(token) => return Ok(token),
                Err(Failed::Fetch(error)) => return Err(error),
                // Logged by the link, once per outage.
                Err(Failed::Redis) => {}
            }
        }
        // Standalone: the token is this sidecar's alone (generation 0), so
        // any the fleet stores later counts as newer.
        let token = self.inner.fetch().await?;
        self.member.hold(Held::default());
        Ok(token)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fetcher_refreshes_in_the_earlier_half_and_adopters_in_the_later() {
        let cases = [
            (Role::Fetched, 0.0, 0.5),
            (Role::Fetched, 0.5, 0.75),
            (Role::Fetched, 1.0, 1.0),
            (Role::Adopted, 0.0, 0.0),
            (Role::Adopted, 0.5, 0.25),
            (Role::Adopted, 1.0, 0.5),
            (Role::Standalone, 0.3, 0.3),
            (Role::Fetched, f64::NAN, 0.5),
            (Role::Adopted, 7.0, 0.5),
            (Role::Standalone, -1.0, 0.0),
        ];
        for (role, drawn, jitter) in cases {
            assert_eq!(shared_jitter(role, drawn), jitter, "{role:?} {drawn}");
        }
        // Jitter moves the refresh earlier: whatever the draws, the
        // fetcher's schedule is no later than any adopter's.
        let policy = RefreshPolicy::default();
        let lifetime = Duration::from_secs(3600);
        for i in 0..=10 {
            for k in 0..=10 {
                let fetcher = shared_jitter(Role::Fetched, f64::from(i) / 10.0);
                let adopter = shared_jitter(Role::Adopted, f64::from(k) / 10.0);
                assert!(
                    crate::cache::policy::refresh_offset(lifetime, &policy, fetcher)
                        <= crate::cache::policy::refresh_offset(lifetime, &policy, adopter)
                );
            }
        }
    }
}
