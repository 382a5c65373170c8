//! The names a profile uses in Redis: `PREFIX:{IDENTITY}:token` (a hash:
//! generation, sealed record, rejected mark), `…:generation` (the
//! counter), `…:lock`, `…:failures` (the fleet's shared backoff),
//! `…:rejected` (digests of rejected tokens), and the channel `…:events`. The identity is a hash
//! (see [`super::sealed::Identity`]), so no name reveals a key; the braces
//! are a Redis Cluster hash tag, keeping one profile's keys in one slot so
//! its scripts may touch several.

use super::sealed::Identity;

/// One profile's key names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keys {
    /// The record.
    pub token: String,
    /// The generation counter.
    pub generation: String,
    /// The fetch lock.
    pub lock: String,
    /// The fleet's consecutive failed fetches (its shared backoff).
    pub failures: String,
    /// The SHA-256 digests of tokens reported rejected (a hash).
    pub rejected: String,
    /// The channel of its events.
    pub events: String,
}

impl Keys {
    /// The names of `identity` under `prefix`.
    pub fn new(prefix: &str, identity: &Identity) -> Self {
        let base = format!("{prefix}:{{{}}}", identity.as_str());
        Self {
            token: format!("{base}:token"),
            generation: format!("{base}:generation"),
            lock: format!("{base}:lock"),
            failures: format!("{base}:failures"),
            rejected: format!("{base}:rejected"),
            events: format!("{base}:events"),
        }
    }

    /// The pattern matching every profile's channel under `prefix`.
    pub fn events_pattern(prefix: &str) -> String {
        format!("{prefix}:{{*}}:events")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::Secret;

    #[test]
    fn names_share_a_hash_tag_and_the_pattern_matches_the_channel() {
        let identity = Identity::of("https://api.klavi.ai", "/auth", &Secret::new("ak-secret"));
        let keys = Keys::new("klavi-sidecar", &identity);
        let tag = format!("{{{}}}", identity.as_str());
        for name in [
            &keys.token,
            &keys.generation,
            &keys.lock,
            &keys.failures,
            &keys.rejected,
            &keys.events,
        ] {
            assert!(name.starts_with("klavi-sidecar:{"), "{name}");
            assert!(name.contains(&tag), "{name}");
            assert!(!name.contains("ak-secret"), "{name}");
        }
        let pattern = Keys::events_pattern("klavi-sidecar");
        let (head, tail) = pattern.split_once('*').unwrap_or_default();
        assert!(keys.events.starts_with(head) && keys.events.ends_with(tail));
    }
}
