//! One profile as a member of the fleet: what it holds (the generation of
//! its token), its current key names and sealing key, the events other
//! sidecars publish for it, and the rejections it tells them of.

use std::sync::{Arc, Mutex, PoisonError};

use arc_swap::ArcSwapOption;
use prometheus_client::metrics::counter::Counter;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::keys::Keys;
use super::redis::Redis;
use super::sealed::{Event, Identity, SealingKey};
use super::source::Role;
use crate::cache::store::{Rejection, TokenStore};
use crate::secret::TokenDigest;
use crate::upstream::credentials::Credentials;

/// How often a rejection Redis did not take is tried again.
const RETRY_REJECTION: std::time::Duration = std::time::Duration::from_secs(1);

/// The largest event that is opened (real ones are under 200 bytes).
const MAX_EVENT_BYTES: usize = 1024;

/// The key names and the sealing key of the profile's current keys.
#[derive(Debug)]
pub struct Sealing {
    /// Its Redis names.
    pub keys: Keys,
    /// Its AES-256-GCM key.
    pub key: SealingKey,
}

/// The token this sidecar holds, as the fleet knows it.
#[derive(Debug, Clone, Copy)]
pub struct Held {
    /// Its generation (0: none, or one fetched standalone).
    pub generation: u64,
    /// Its digest, when it came through the fleet.
    pub digest: Option<TokenDigest>,
    /// How it came.
    pub role: Role,
}

impl Default for Held {
    fn default() -> Self {
        Self {
            generation: 0,
            digest: None,
            role: Role::Standalone,
        }
    }
}

/// One fleet profile's shared state (the source, the subscriber and the
/// rejection task each hold it).
#[derive(Debug)]
pub struct Member {
    /// The profile's name, for the logs.
    pub name: String,
    prefix: String,
    base_url: String,
    auth_path: String,
    credentials: Arc<Credentials>,
    /// The profile's store.
    pub store: Arc<TokenStore>,
    sealing: ArcSwapOption<Sealing>,
    held: Mutex<Held>,
    /// Events heard for this profile, numbered.
    events: watch::Sender<(u64, Option<Event>)>,
    /// `klavi_sidecar_fleet_tokens_adopted_total{profile}`.
    pub adopted: Counter,
    /// Wakes the refresh task when a token was stored and this profile
    /// has none to serve (it may be in a long backoff).
    pub stored: Arc<tokio::sync::Notify>,
}

impl Member {
    /// The member for a profile with these settings.
    pub fn new(
        name: &str,
        prefix: &str,
        (base_url, auth_path): (&str, &str),
        credentials: Arc<Credentials>,
        store: Arc<TokenStore>,
        adopted: Counter,
    ) -> Self {
        Self {
            name: name.to_string(),
            prefix: prefix.to_string(),
            base_url: base_url.to_string(),
            auth_path: auth_path.to_string(),
            credentials,
            store,
            sealing: ArcSwapOption::empty(),
            held: Mutex::new(Held::default()),
            events: watch::Sender::new((0, None)),
            adopted,
            stored: Arc::new(tokio::sync::Notify::new()),
        }
    }

    /// The names and key of the keys in use now (re-derived each time:
    /// key files rotate; HKDF costs microseconds), kept for the
    /// subscriber.
    pub async fn sealing(&self) -> Arc<Sealing> {
        let (access, secret) = self.credentials.current().await;
        let identity = Identity::of(&self.base_url, &self.auth_path, &access);
        let sealing = Arc::new(Sealing {
            keys: Keys::new(&self.prefix, &identity),
            key: SealingKey::derive(&secret, &identity),
        });
        self.sealing.store(Some(Arc::clone(&sealing)));
        sealing
    }

    /// What it holds.
    pub fn held(&self) -> Held {
        *self.held.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// It now holds this.
    pub fn hold(&self, held: Held) {
        *self.held.lock().unwrap_or_else(PoisonError::into_inner) = held;
    }

    /// After (re)subscribing: a token this sidecar holds that another
    /// reported rejected while the publication could not reach it is
    /// dropped now.
    pub async fn catch_up(&self, redis: &Redis) {
        let Some(token) = self.store.current() else {
            return;
        };
        let sealing = self.sealing().await;
        if let Ok(true) = redis
            .is_rejected(&sealing.keys, &token.digest().to_hex())
            .await
            && self.store.reject_reported(token.digest()) == Rejection::Marked
        {
            tracing::info!(
                profile = %self.name,
                fingerprint = token.fingerprint(),
                "another sidecar of the fleet reported the token rejected; no longer served"
            );
        }
    }

    /// Follows the events heard for this profile.
    pub fn events(&self) -> watch::Receiver<(u64, Option<Event>)> {
        self.events.subscribe()
    }

    /// A message on `channel`: if it is this profile's and opens under its
    /// key, a rejection is applied to the store at once and any other
    /// event goes to the waiting fetch.
    pub fn hear(&self, channel: &str, payload: &[u8]) {
        let Some(sealing) = self.sealing.load_full() else {
            return;
        };
        if sealing.keys.events != channel || payload.len() > MAX_EVENT_BYTES {
            return;
        }
        let Some(event) = sealing.key.open_event(payload) else {
            tracing::debug!(profile = %self.name, "a fleet message that does not open; ignored");
            return;
        };
        if let Event::Rejected { digest } = &event {
            let Some(digest) = TokenDigest::from_hex(digest) else {
                return;
            };
            if self.store.reject_reported(&digest) == Rejection::Marked {
                tracing::info!(
                    profile = %self.name,
                    fingerprint = digest.fingerprint(),
                    "another sidecar of the fleet reports the token rejected; no longer served"
                );
            }
        }
        if matches!(event, Event::Stored { .. })
            && self.store.servable(tokio::time::Instant::now()).is_none()
        {
            self.stored.notify_one();
        }
        self.events.send_modify(|(seq, last)| {
            *seq += 1;
            *last = Some(event);
        });
    }

    /// Until `stop`: each token reported rejected here is marked rejected
    /// in Redis (if it is the fleet's record) and published, so every
    /// sidecar stops serving it. One that cannot be told (Redis down) is
    /// retried every second until it is, or until a newer rejection
    /// replaces it.
    pub async fn announce_rejections(self: Arc<Self>, redis: Redis, stop: CancellationToken) {
        let mut rejections = self.store.watch_rejections();
        let mut pending: Option<TokenDigest> = None;
        loop {
            let retry = async {
                if pending.is_some() {
                    tokio::time::sleep(RETRY_REJECTION).await;
                } else {
                    std::future::pending::<()>().await;
                }
            };
            tokio::select! {
                biased;
                () = stop.cancelled() => return,
                changed = rejections.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    pending = *rejections.borrow_and_update();
                }
                () = retry => {}
            }
            let Some(digest) = pending else {
                continue;
            };
            if self.announce(&redis, digest).await {
                pending = None;
            }
        }
    }

    /// Marks and publishes one rejection; whether Redis took it.
    async fn announce(&self, redis: &Redis, digest: TokenDigest) -> bool {
        let sealing = self.sealing().await;
        let held = self.held();
        let generation = if held.digest == Some(digest) {
            held.generation
        } else {
            0
        };
        if redis
            .reject(&sealing.keys, &digest.to_hex(), generation)
            .await
            .is_err()
        {
            return false;
        }
        let event = Event::Rejected {
            digest: digest.to_hex(),
        };
        let Ok(sealed) = sealing.key.seal_event(&event) else {
            return true;
        };
        if redis.publish(&sealing.keys, sealed).await.is_err() {
            return false;
        }
        tracing::info!(
            profile = %self.name,
            fingerprint = digest.fingerprint(),
            "told the fleet the token was rejected"
        );
        true
    }
}
