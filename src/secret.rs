//! Secrets that cannot leak by accident.
//!
//! Keys and tokens travel in [`Secret`], whose `Debug` and `Display` print
//! `[REDACTED]`; the only way to the bytes is [`Secret::expose`], so every
//! place that needs the real value is easy to find with grep. Logs name a
//! token by its [`fingerprint`] instead.

use std::fmt;

use sha2::{Digest, Sha256};

/// What a secret prints as, everywhere (`Debug`, `Display`, `check-config`).
pub const REDACTED: &str = "[REDACTED]";

/// A string that must never reach a log, an error message or `Debug` output.
#[derive(Clone, PartialEq, Eq)]
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
    let digest = Sha256::digest(value.as_bytes());
    hex::encode(&digest[..4])
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
}
