//! Fleet mode (SPEC §8, issue 14, in steps): sidecars of one account share
//! one token through Redis.
//!
//! - [`sealed`]: the profile's identity (its Redis key names) and the token
//!   record, sealed with AES-256-GCM under a key derived from the secret
//!   key, so Redis holds nothing readable.
//!
//! Not wired yet: the `TokenSource` over Redis, the lock, generations and
//! pub/sub come next; `[fleet]` is not a configuration section yet.

pub mod sealed;
