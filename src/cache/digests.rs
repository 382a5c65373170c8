//! Tokens the sidecar must recognise without keeping them: rejected ones
//! (never served again) and, for single_use profiles, every one pooled or
//! leased (never handed out twice).
//!
//! Only a token's SHA-256 is kept, and only until the token expires: after
//! that Klavi refuses it anyway, and nothing of it stays in memory. The
//! [`TokenLedger`] is one per process, shared by every profile: two
//! profiles with the same keys may be sent the same token by Klavi, and a
//! token one of them leased as single-use must not be served by the other.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard, PoisonError};

use tokio::time::Instant;

use super::token::Token;
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
        self.expiry(digest, now).is_some()
    }

    /// When the token of `digest` expires, if it is remembered and has
    /// not yet.
    pub fn expiry(&self, digest: &TokenDigest, now: Instant) -> Option<Instant> {
        self.entries
            .get(digest)
            .copied()
            .filter(|expiry| *expiry > now)
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

/// Why the ledger refuses a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// It was reported rejected (guarantee 11).
    Rejected,
    /// It was pooled or leased as single-use (guarantee 12).
    SingleUse,
    /// A single_use profile cannot lease it: this process held it as a
    /// shared token, so callers may have been given it.
    Shared,
}

impl Refusal {
    /// What to log.
    pub fn explain(self) -> &'static str {
        match self {
            Self::Rejected => "Klavi sent back a token that was reported rejected",
            Self::SingleUse => "Klavi sent a token this process already handed out as single-use",
            Self::Shared => {
                "Klavi sent a token this process already served as a shared one; a single_use \
                 profile never hands it out"
            }
        }
    }
}

#[derive(Debug, Default)]
struct Ledger {
    /// Tokens a shared profile held as current (and so may have served).
    shared: ExpiringDigests,
    /// Tokens a single_use profile pooled or leased.
    single_use: ExpiringDigests,
    /// Tokens reported rejected.
    rejected: ExpiringDigests,
}

/// The process's record of the tokens it held, by digest, across
/// profiles. Its lock also orders a profile storing a token against a
/// report rejecting one (see `TokenStore`).
#[derive(Debug, Default)]
pub struct TokenLedger {
    ledger: Mutex<Ledger>,
}

/// The ledger, locked.
#[derive(Debug)]
pub struct LedgerGuard<'a> {
    ledger: MutexGuard<'a, Ledger>,
}

impl TokenLedger {
    /// Locks the ledger.
    pub fn lock(&self) -> LedgerGuard<'_> {
        LedgerGuard {
            ledger: self.ledger.lock().unwrap_or_else(PoisonError::into_inner),
        }
    }
}

impl LedgerGuard<'_> {
    /// Why a shared profile may not hold `token`, if it may not.
    pub fn refuses_shared(&self, token: &Token, now: Instant) -> Option<Refusal> {
        let digest = token.digest();
        if self.ledger.rejected.contains(digest, now) {
            Some(Refusal::Rejected)
        } else if self.ledger.single_use.contains(digest, now) {
            Some(Refusal::SingleUse)
        } else {
            None
        }
    }

    /// Why a single_use profile may not pool `token`, if it may not: it
    /// must be new to the whole process.
    pub fn refuses_single_use(&self, token: &Token, now: Instant) -> Option<Refusal> {
        let digest = token.digest();
        if self.ledger.rejected.contains(digest, now) {
            Some(Refusal::Rejected)
        } else if self.ledger.single_use.contains(digest, now) {
            Some(Refusal::SingleUse)
        } else if self.ledger.shared.contains(digest, now) {
            Some(Refusal::Shared)
        } else {
            None
        }
    }

    /// Records `token` as a shared profile's current token.
    pub fn hold_shared(&mut self, token: &Token, now: Instant) {
        self.ledger
            .shared
            .insert(*token.digest(), token.expires_at(), now);
    }

    /// Records `token` as pooled by a single_use profile.
    pub fn hold_single_use(&mut self, token: &Token, now: Instant) {
        self.ledger
            .single_use
            .insert(*token.digest(), token.expires_at(), now);
    }

    /// Records `digest` rejected until `expires_at`.
    pub fn reject(&mut self, digest: TokenDigest, expires_at: Instant, now: Instant) {
        self.ledger.rejected.insert(digest, expires_at, now);
    }

    /// A token reported rejected after it was replaced: if this process
    /// held it as a shared token, it is recorded rejected too (so Klavi
    /// sending it back later cannot make it served again); a digest this
    /// process never held is not remembered. Returns whether recorded.
    pub fn reject_if_held(&mut self, digest: &TokenDigest, now: Instant) -> bool {
        match self.ledger.shared.expiry(digest, now) {
            Some(expiry) => {
                self.ledger.rejected.insert(*digest, expiry, now);
                true
            }
            None => false,
        }
    }

    /// Whether `token` was reported rejected.
    pub fn is_rejected(&self, token: &Token, now: Instant) -> bool {
        self.ledger.rejected.contains(token.digest(), now)
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
