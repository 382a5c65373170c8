//! The proxy (SPEC §4.3): apps send Klavi requests to the sidecar with no
//! token, and it forwards them with one.
//!
//! Built in steps (issue 12). In place so far, as pure functions with
//! tables of cases:
//! - [`target`]: which request targets are forwarded (origin form only)
//!   and the upstream URI each becomes under the profile's `base_url`;
//! - [`headers`]: the headers forwarded each way (hop-by-hop ones dropped,
//!   `Host` Klavi's, `Authorization` the sidecar's, `Klavi-Sidecar`
//!   removed, everything else unchanged).
//!
//! Not yet: the listener, the pooled upstream client, the 401 replay, the
//! access log and metrics (`proxy_listen` is still refused by the
//! configuration until they are).

pub mod headers;
pub mod target;
