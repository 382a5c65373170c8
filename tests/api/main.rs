//! The real application on loopback ports against the project's fake
//! Klavi: routes, headers, upstream failures, readiness, shutdown, key
//! rotation.

#![allow(clippy::unwrap_used, clippy::expect_used)]
// These tests compare what the sidecar reports with the real clocks.
#![allow(clippy::disallowed_methods)]

mod fake_api;
mod forced_refresh;
mod helpers;
mod lifecycle;
mod limits;
mod metrics;
mod min_ttl;
mod profiles;
mod routes;
mod upstream;
