//! The profile: the unit of the sidecar.
//!
//! A profile is one key pair's token and everything that keeps it: its
//! own store (fed by its own refresh task, with its own backoff and auth
//! budget), its metrics, and whether readiness waits for it. `app` builds
//! one per configured profile; every consumer (the HTTP routes today; the
//! lease pool, the proxy, the token file later) receives [`Profiles`] and
//! reads the stores, never the refresh tasks.

use std::sync::Arc;

use crate::cache::store::TokenStore;
use crate::config::DEFAULT_PROFILE;
use crate::ops::metrics::ProfileMetrics;

/// One profile, as its consumers see it.
#[derive(Debug)]
pub struct Profile {
    name: String,
    store: Arc<TokenStore>,
    metrics: ProfileMetrics,
    required: bool,
}

impl Profile {
    /// A profile named `name` serving from `store`.
    pub fn new(
        name: &str,
        store: Arc<TokenStore>,
        metrics: ProfileMetrics,
        required: bool,
    ) -> Self {
        Self {
            name: name.to_string(),
            store,
            metrics,
            required,
        }
    }

    /// `default`, or the `NAME` of `[profiles.NAME]`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its token and the protocol for waiting on one.
    pub fn store(&self) -> &Arc<TokenStore> {
        &self.store
    }

    /// Where its requests and refreshes are counted.
    pub fn metrics(&self) -> &ProfileMetrics {
        &self.metrics
    }

    /// `/readyz` waits for it.
    pub fn required(&self) -> bool {
        self.required
    }
}

/// Every profile, by name; `default` first when there is one.
#[derive(Debug, Default)]
pub struct Profiles {
    all: Vec<Arc<Profile>>,
}

impl Profiles {
    /// The profiles in the order given (names are unique: configuration
    /// guarantees it).
    pub fn new(all: Vec<Arc<Profile>>) -> Self {
        Self { all }
    }

    /// The profile called `name`.
    pub fn get(&self, name: &str) -> Option<&Arc<Profile>> {
        self.all.iter().find(|p| p.name == name)
    }

    /// The profile the `/token…` routes serve, if `[klavi]` has keys.
    pub fn default_profile(&self) -> Option<&Arc<Profile>> {
        self.get(DEFAULT_PROFILE)
    }

    /// Every profile.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Profile>> {
        self.all.iter()
    }
}
