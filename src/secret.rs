//! Secrets that cannot leak by accident.
//!
//! Keys and tokens travel in [`Secret`], whose `Debug` and `Display` print
//! `[REDACTED]`; the only way to the bytes is [`Secret::expose`], so every
//! place that needs the real value is easy to find with grep. Logs name a
//! token by its [`fingerprint`] instead.

use std::fmt;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq as _;

/// What a secret prints as, everywhere (`Debug`, `Display`, `check-config`).
pub const REDACTED: &str = "[REDACTED]";

/// A string that must never reach a log, an error message or `Debug` output.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Secret(String);

impl Secret {
    /// Wraps a value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The real value, for the few places that must send or serve it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether the value is empty (an empty key is a configuration error).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Fingerprint of the value, safe to log.
    pub fn fingerprint(&self) -> String {
        fingerprint(&self.0)
    }

    /// SHA-256 of the value, for comparing tokens without keeping them.
    pub fn digest(&self) -> TokenDigest {
        TokenDigest::of(&self.0)
    }
}

/// The SHA-256 of a token: what the sidecar compares and remembers of a
/// token it must recognise (a rejected one, one already leased), so it
/// keeps nothing that could be served or leaked. Equality is constant
/// time, so comparing a guess against the current token tells a timing
/// attacker nothing.
#[derive(Clone, Copy)]
pub struct TokenDigest([u8; 32]);

impl TokenDigest {
    /// The digest of `value`.
    pub fn of(value: &str) -> Self {
        Self(Sha256::digest(value.as_bytes()).into())
    }

    /// First 8 hex digits: the token's fingerprint, safe to log.
    pub fn fingerprint(&self) -> String {
        hex::encode(&self.0[..4])
    }

    /// All of it in hex, for a sidecar of the fleet to recognise the token
    /// by (it reveals nothing of the token).
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// The digest written by [`Self::to_hex`].
    pub fn from_hex(text: &str) -> Option<Self> {
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(text, &mut bytes).ok()?;
        Some(Self(bytes))
    }
}

impl PartialEq for TokenDigest {
    fn eq(&self, other: &Self) -> bool {
        bool::from(self.0.ct_eq(&other.0))
    }
}

impl Eq for TokenDigest {}

impl std::hash::Hash for TokenDigest {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.0.hash(state);
    }
}

impl fmt::Debug for TokenDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TokenDigest({})", self.fingerprint())
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

/// First 8 hex digits of the SHA-256 of `value`: enough to tell tokens apart
/// in logs, useless for recovering them.
pub fn fingerprint(value: &str) -> String {
    TokenDigest::of(value).fingerprint()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_and_display_are_redacted() {
        let secret = Secret::new("very-secret-value");
        assert_eq!(format!("{secret:?}"), "[REDACTED]");
        assert_eq!(format!("{secret}"), "[REDACTED]");
        assert_eq!(secret.expose(), "very-secret-value");
    }

    #[test]
    fn fingerprint_is_first_eight_hex_digits_of_sha256() {
        // sha256("abc") = ba7816bf8f01cfea...
        assert_eq!(fingerprint("abc"), "ba7816bf");
        assert_eq!(Secret::new("abc").fingerprint(), "ba7816bf");
        assert_ne!(fingerprint("abd"), fingerprint("abc"));
    }

    #[test]
    fn digests_compare_by_value_and_debug_shows_only_the_fingerprint() {
        let abc = Secret::new("abc").digest();
        assert_eq!(abc, TokenDigest::of("abc"));
        assert_ne!(abc, TokenDigest::of("abd"));
        assert_ne!(abc, TokenDigest::of(""));
        assert_eq!(format!("{abc:?}"), "TokenDigest(ba7816bf)");
        assert_eq!(TokenDigest::from_hex(&abc.to_hex()), Some(abc));
        assert_eq!(TokenDigest::from_hex("ba7816bf"), None);
        assert_eq!(TokenDigest::from_hex(&"zz".repeat(32)), None);
    }
}
