//! Handing tokens out: the HTTP API ([`http`]) on listeners driven by
//! [`server`] (limits, eviction, drain).

pub mod http;
pub mod server;
