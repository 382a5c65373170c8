//! Tokens the sidecar must recognise without keeping them: rejected ones
//! (never served again) and, for single_use profiles, every one pooled or
//! leased (never handed out twice).
//!
//! Only a token's SHA-256 is kept, and only until the token expires: after
//! that Klavi refuses it anyway, and nothing of it stays in memory.

use std::collections::HashMap;

use tokio::time::Instant;

use crate::secret::TokenDigest;

/// Digests, each forgotten once its token has expired.
///
/// Lookups hash: the digests compared here are of tokens Klavi sent, never
/// of a client's guess (that is compared in constant time against the one
/// current token, in the store).
#[derive(Debug, Default)]
pub struct ExpiringDigests {
    entries: HashMap<TokenDigest, Instant>,
    /// Entries after the last sweep: the next sweep comes once there are
    /// twice as many, so sweeping costs O(1) per insert over time.
    swept_at_len: usize,
}

impl ExpiringDigests {
    /// Remembers `digest` until `expires_at`.
    pub fn insert(&mut self, digest: TokenDigest, expires_at: Instant, now: Instant) {
        if self.entries.len() >= (2 * self.swept_at_len).max(16) {
            self.entries.retain(|_, expiry| *expiry > now);
            self.swept_at_len = self.entries.len();
        }
        let expiry = self.entries.entry(digest).or_insert(expires_at);
        *expiry = (*expiry).max(expires_at);
    }

    /// Whether `digest` is remembered and its token not yet expired.
    pub fn contains(&self, digest: &TokenDigest, now: Instant) -> bool {
        self.entries.get(digest).is_some_and(|expiry| *expiry > now)
    }

    /// Digests held, expired ones not yet swept included.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether none is held.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn digests_are_recognised_until_their_token_expires_then_forgotten() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut set = ExpiringDigests::default();
        set.insert(TokenDigest::of("a"), t0 + s(10), t0);
        assert!(set.contains(&TokenDigest::of("a"), t0 + s(9)));
        assert!(!set.contains(&TokenDigest::of("b"), t0));
        assert!(!set.contains(&TokenDigest::of("a"), t0 + s(10)), "expired");
        // Many inserts later the expired one is swept, and memory stays
        // bounded by the tokens still alive (here: 1 000 alive at a time).
        for i in 0..100_000u64 {
            let now = t0 + s(20 + i);
            set.insert(TokenDigest::of(&i.to_string()), now + s(1_000), now);
        }
        assert!(set.len() <= 2_100, "{} held", set.len());
        let now = t0 + s(20 + 100_000);
        assert!(set.contains(&TokenDigest::of("99999"), now));
        assert!(!set.contains(&TokenDigest::of("a"), now));
    }
}
