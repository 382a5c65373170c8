//! What a fleet keeps in Redis, and how it is kept unreadable there
//! (SPEC §8): the profile's identity, which names its keys without
//! revealing a secret, and the token record, sealed with AES-256-GCM under
//! a key derived from the profile's secret key (HKDF-SHA256), a fresh
//! random nonce per write and the identity as associated data.
//!
//! Pure functions over bytes (ring for the primitives): Redis access alone
//! reveals no token, a value sealed for another profile or under a rotated
//! secret key does not open (and counts as absent), and one tampered with
//! does not open either.

use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::hkdf;
use ring::rand::{SecureRandom, SystemRandom};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::cache::source::Category;
use crate::secret::Secret;

/// Domain separation for everything derived here: a new format gets a new
/// label, and old values stop opening (they count as absent).
const LABEL: &[u8] = b"klavi-token-sidecar/fleet/v1";

/// A profile as the fleet knows it: the SHA-256 of (`base_url`,
/// `auth_path`, access key), as 32 hex digits. Sidecars with the same
/// account share it; different keys never do; it reveals none of them.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Identity(String);

impl Identity {
    /// The identity of the profile with these settings.
    pub fn of(base_url: &str, auth_path: &str, access_key: &Secret) -> Self {
        let mut hash = Sha256::new();
        // Length-prefixed fields: no two different triples hash alike.
        for field in [
            LABEL,
            base_url.as_bytes(),
            auth_path.as_bytes(),
            access_key.expose().as_bytes(),
        ] {
            hash.update((field.len() as u64).to_be_bytes());
            hash.update(field);
        }
        let digest = hash.finalize();
        Self(digest[..16].iter().map(|b| format!("{b:02x}")).collect())
    }

    /// The hex digits.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The token as the fleet shares it, before sealing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// The token.
    #[serde(rename = "accessToken")]
    pub token: String,
    /// Its expiry, unix seconds (each sidecar applies its own margin).
    #[serde(rename = "expireAt")]
    pub expire_at: i64,
    /// When the request that fetched it was sent, unix milliseconds: with
    /// the expiry, its lifetime, so an adopter keeps the fetcher's
    /// schedule.
    #[serde(rename = "issuedAtMs")]
    pub issued_at_ms: i64,
    /// The fleet's count of tokens stored for this profile: a sidecar
    /// never replaces a newer one with an older one.
    pub generation: u64,
}

/// What one sidecar tells the others on the profile's channel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Event {
    /// A token of this generation was stored: waiters read and adopt it.
    Stored {
        /// Its generation.
        generation: u64,
    },
    /// Klavi refused the token with this SHA-256: no one serves it again.
    Rejected {
        /// The token's SHA-256, hex.
        digest: String,
    },
    /// The lock holder's fetch failed with this category: waiters back off
    /// too instead of waiting out their wait.
    Failed {
        /// The lock owner that failed (it keeps the lock for the fleet's
        /// backoff): a waiter believes the event only while that owner
        /// holds the lock, so a replayed one changes nothing.
        owner: String,
        /// Its category.
        category: Category,
        /// Klavi's `Retry-After`, ms, if it sent one.
        retry_after_ms: Option<u64>,
    },
}

/// What a sealed value is, bound into its associated data: a record
/// cannot be replayed as an event nor the other way round.
trait Kind {
    const KIND: &'static [u8];
}

impl Kind for Record {
    const KIND: &'static [u8] = b"record";
}

impl Kind for Event {
    const KIND: &'static [u8] = b"event";
}

/// Why a record could not be sealed.
#[derive(Debug, thiserror::Error)]
#[error("cannot seal the fleet's token record")]
pub struct SealError;

/// The AES-256-GCM key of one profile.
pub struct SealingKey {
    key: LessSafeKey,
    identity: Identity,
}

impl std::fmt::Debug for SealingKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SealingKey")
            .field("identity", &self.identity)
            .finish_non_exhaustive()
    }
}

impl SealingKey {
    /// The key of `identity`, derived from its secret key: HKDF-SHA256
    /// with the label as salt and the identity as info.
    pub fn derive(secret_key: &Secret, identity: &Identity) -> Self {
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, LABEL).extract(secret_key.expose().as_bytes());
        let info = [identity.as_str().as_bytes()];
        // Expanding 32 bytes from SHA-256 cannot fail (the limit is 255
        // blocks), nor can a 32-byte key for AES-256.
        let key = prk
            .expand(&info, &AES_256_GCM)
            .map(UnboundKey::from)
            .map(LessSafeKey::new);
        match key {
            Ok(key) => Self {
                key,
                identity: identity.clone(),
            },
            Err(_) => unreachable!("HKDF-SHA256 expands 32 bytes"),
        }
    }

    /// `nonce ‖ ciphertext ‖ tag` of `record`, with a fresh random nonce.
    pub fn seal(&self, record: &Record) -> Result<Vec<u8>, SealError> {
        self.seal_value(record)
    }

    /// The record in `sealed`, or `None` if it does not open (another
    /// profile's, another secret key's, tampered with, truncated).
    pub fn open(&self, sealed: &[u8]) -> Option<Record> {
        self.open_value(sealed)
    }

    /// `event`, sealed like a record.
    pub fn seal_event(&self, event: &Event) -> Result<Vec<u8>, SealError> {
        self.seal_value(event)
    }

    /// The event in `sealed`, or `None` if it does not open.
    pub fn open_event(&self, sealed: &[u8]) -> Option<Event> {
        self.open_value(sealed)
    }

    /// The associated data: the identity and what the value is.
    fn aad<T: Kind>(&self) -> Vec<u8> {
        let mut aad = Vec::with_capacity(self.identity.as_str().len() + 1 + T::KIND.len());
        aad.extend_from_slice(self.identity.as_str().as_bytes());
        aad.push(b'/');
        aad.extend_from_slice(T::KIND);
        aad
    }

    fn seal_value<T: Serialize + Kind>(&self, value: &T) -> Result<Vec<u8>, SealError> {
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new()
            .fill(&mut nonce)
            .map_err(|_| SealError)?;
        let mut body = serde_json::to_vec(value).map_err(|_| SealError)?;
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(self.aad::<T>()),
                &mut body,
            )
            .map_err(|_| SealError)?;
        let mut sealed = Vec::with_capacity(NONCE_LEN + body.len());
        sealed.extend_from_slice(&nonce);
        sealed.extend_from_slice(&body);
        Ok(sealed)
    }

    fn open_value<T: DeserializeOwned + Kind>(&self, sealed: &[u8]) -> Option<T> {
        let (nonce, body) = sealed.split_at_checked(NONCE_LEN)?;
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut body = body.to_vec();
        let plain = self
            .key
            .open_in_place(nonce, Aad::from(self.aad::<T>()), &mut body)
            .ok()?;
        serde_json::from_slice(plain).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(s: &str) -> Secret {
        Secret::new(s)
    }

    fn record() -> Record {
        Record {
            token: "eyJhbGciOiJFUzI1NiJ9.payload.signature".into(),
            expire_at: 1_900_000_000,
            issued_at_ms: 1_899_999_000_250,
            generation: 7,
        }
    }

    #[test]
    fn identities_separate_accounts_and_hide_the_key() {
        let base = Identity::of("https://api.klavi.ai", "/auth", &secret("access-1"));
        let cases = [
            (
                Identity::of("https://api.klavi.ai", "/auth", &secret("access-1")),
                true,
            ),
            (
                Identity::of("https://api.klavi.ai", "/auth", &secret("access-2")),
                false,
            ),
            (
                Identity::of("https://api-sandbox.klavi.ai", "/auth", &secret("access-1")),
                false,
            ),
            (
                Identity::of("https://api.klavi.ai", "/auth2", &secret("access-1")),
                false,
            ),
            // Fields do not run into each other.
            (
                Identity::of("https://api.klavi.ai/", "auth", &secret("access-1")),
                false,
            ),
        ];
        for (other, same) in cases {
            assert_eq!(other == base, same, "{other:?}");
        }
        assert_eq!(base.as_str().len(), 32);
        assert!(base.as_str().bytes().all(|b| b.is_ascii_hexdigit()));
        assert!(!base.as_str().contains("access"));
    }

    #[test]
    fn a_record_opens_only_under_its_own_key_and_identity() {
        let identity = Identity::of("https://api.klavi.ai", "/auth", &secret("access-1"));
        let key = SealingKey::derive(&secret("secret-1"), &identity);
        let sealed = key.seal(&record()).unwrap();
        assert_eq!(key.open(&sealed), Some(record()));

        // A fresh nonce each time: two seals of one record differ.
        assert_ne!(key.seal(&record()).unwrap(), sealed);
        // Nothing of the token, the keys or the JSON shows.
        let text = String::from_utf8_lossy(&sealed);
        for needle in [
            "eyJ",
            "payload",
            "signature",
            "secret-1",
            "access",
            "generation",
        ] {
            assert!(!text.contains(needle), "{needle} in the sealed value");
        }

        // The secret key rotated: absent.
        let rotated = SealingKey::derive(&secret("secret-2"), &identity);
        assert_eq!(rotated.open(&sealed), None);
        // Another profile with the same secret key: absent.
        let other = Identity::of("https://api.klavi.ai", "/auth", &secret("access-2"));
        assert_eq!(
            SealingKey::derive(&secret("secret-1"), &other).open(&sealed),
            None
        );
        // Tampered with anywhere, truncated, empty: absent.
        for at in [0, NONCE_LEN, sealed.len() / 2, sealed.len() - 1] {
            let mut bent = sealed.clone();
            bent[at] ^= 0x01;
            assert_eq!(key.open(&bent), None, "a bit flipped at {at}");
        }
        assert_eq!(key.open(&sealed[..sealed.len() - 1]), None);
        assert_eq!(key.open(&sealed[..NONCE_LEN]), None);
        assert_eq!(key.open(b""), None);
        // A record is not an event, nor an event a record.
        assert_eq!(key.open_event(&sealed), None);
        let event = Event::Stored { generation: 7 };
        let sealed_event = key.seal_event(&event).unwrap();
        assert_eq!(key.open_event(&sealed_event), Some(event));
        assert_eq!(key.open(&sealed_event), None);
        assert_eq!(rotated.open_event(&sealed_event), None);
    }
}
