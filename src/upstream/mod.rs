//! Where tokens come from: Klavi's auth endpoint.
//!
//! [`klavi`] makes one auth request and turns the answer into a token or a
//! categorised error, [`expiry`] reads the answer's expiry (pure), and
//! [`credentials`] holds the keys, inline or from files that may rotate.

pub mod credentials;
pub mod error;
pub mod expiry;
pub mod klavi;
pub mod retry_after;
