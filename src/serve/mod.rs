//! Handing tokens out: the HTTP API ([`http`]) on listeners driven by
//! [`server`] (limits, the overflow lane, drain), each connection watched
//! by `connection` (eviction).

mod connection;
pub mod http;
pub mod server;
