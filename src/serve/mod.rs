//! Handing tokens out: the HTTP API ([`http`]) on listeners driven by
//! [`server`] (limits, the overflow lane, drain), each connection watched
//! by `connection` (eviction), accepted by a [`listener`] (TCP or a unix
//! socket; [`unix_socket`] creates one at a configured path).

mod connection;
pub mod http;
pub mod listener;
pub mod server;
pub mod unix_socket;
