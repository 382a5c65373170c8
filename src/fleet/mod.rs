//! Fleet mode (SPEC §8): sidecars with the same Klavi keys share one token
//! through Redis, so a fleet asks Klavi about once per token lifetime.
//!
//! - [`sealed`]: the profile's identity and the token record, sealed with
//!   AES-256-GCM under a key derived from the secret key;
//! - [`keys`]: the Redis names, derived from the identity;
//! - [`adopt`]: the pure rule for adopting a stored token;
//! - [`redis`]: the commands, each bounded by `fleet.command_timeout_ms`,
//!   and the link's up/down state;
//! - [`source`]: the [`crate::cache::source::TokenSource`] wrapping the
//!   Klavi client (adopt, or lock and fetch, or wait for the holder);
//! - [`member`]: one profile's shared state, and the rejections it tells;
//! - [`listener`]: the pub/sub connection and the rejoin probe.

pub mod adopt;
pub mod keys;
pub mod listener;
pub mod member;
pub mod redis;
pub mod sealed;
pub mod source;

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use self::member::Member;
use self::redis::{Link, Redis};
use self::source::{FleetSettings, FleetSource, LOCK_MARGIN};
use crate::cache::source::TokenSource;
use crate::cache::store::TokenStore;
use crate::clock::SystemClock;
use crate::config::{FleetConfig, ProfileConfig};
use crate::upstream::credentials::Credentials;

/// The fleet of this process: its Redis and the profiles in it.
#[derive(Debug)]
pub struct Fleet {
    client: ::redis::Client,
    redis: Redis,
    prefix: String,
    timeout: Duration,
    members: Vec<Arc<Member>>,
}

/// The Redis URL could not be used.
#[derive(Debug, thiserror::Error)]
#[error("cannot use fleet.redis_url: {0}")]
pub struct FleetError(String);

impl Fleet {
    /// The fleet of `config`, not connected yet (connecting never delays
    /// the start); `up` is `klavi_sidecar_fleet_redis_up`.
    pub fn new(config: &FleetConfig, up: Gauge) -> Result<Self, FleetError> {
        // The error names no URL: it may carry the password.
        let client = ::redis::Client::open(config.redis_url.expose())
            .map_err(|e| FleetError(format!("{:?}", e.kind())))?;
        let link = Arc::new(Link::new(up));
        let redis = Redis::new(client.clone(), config.command_timeout, link)
            .map_err(|e| FleetError(format!("{:?}", e.kind())))?;
        Ok(Self {
            client,
            redis,
            prefix: config.key_prefix.clone(),
            timeout: config.command_timeout,
            members: Vec::new(),
        })
    }

    /// Adds a profile; its source comes from [`Self::source`].
    pub fn join(
        &mut self,
        profile: &ProfileConfig,
        credentials: Arc<Credentials>,
        store: Arc<TokenStore>,
        adopted: Counter,
    ) -> Arc<Member> {
        let member = Arc::new(Member::new(
            &profile.name,
            &self.prefix,
            (
                profile.klavi.base_url.as_str(),
                profile.klavi.auth_url.path(),
            ),
            credentials,
            store,
            adopted,
        ));
        self.members.push(Arc::clone(&member));
        member
    }

    /// `inner` (the profile's Klavi client) shared through the fleet.
    pub fn source<S: TokenSource>(
        &self,
        inner: S,
        member: Arc<Member>,
        profile: &ProfileConfig,
    ) -> FleetSource<S> {
        let settings = FleetSettings {
            policy: profile.refresh.policy.clone(),
            wait: profile.refresh.wait,
            lock_px: profile.klavi.request_timeout + LOCK_MARGIN,
        };
        FleetSource::new(
            inner,
            member,
            self.redis.clone(),
            settings,
            Arc::new(SystemClock),
        )
    }

    /// Starts, into `tasks`, the listener and each member's rejection
    /// announcer, all stopping with `stop`.
    pub fn start(self, stop: &CancellationToken, tasks: &mut JoinSet<()>) {
        for member in &self.members {
            tasks.spawn(Arc::clone(member).announce_rejections(self.redis.clone(), stop.clone()));
        }
        tasks.spawn(listener::listen(
            self.client,
            self.redis,
            self.prefix,
            self.members,
            self.timeout,
            stop.clone(),
        ));
    }
}
