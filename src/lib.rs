//! klavi-token-sidecar keeps a valid Klavi payment API token and serves it
//! to the apps of its pod over loopback HTTP.
//!
//! # A tour
//!
//! Configuration and start-up:
//! - [`config`]: layered configuration (defaults < TOML < env < flags),
//!   validated once into typed values; every failure names its key.
//! - [`cli`]: the commands and their exit codes; `main.rs` only calls it.
//! - [`app`]: binds the listeners, then runs the refresh task and both
//!   servers until shutdown ([`shutdown`] turns signals into a token).
//! - [`telemetry`]: the log subscriber (text or JSON).
//!
//! Getting tokens:
//! - [`credentials`]: the keys, inline or from files that may rotate.
//! - [`klavi`]: one auth request, its answer turned into a [`token::Token`]
//!   or a categorised [`error::FetchError`].
//! - [`expiry`]: pure parsing of the answer's token and expiry forms,
//!   `Date` skew, the earlier-of rule.
//! - [`policy`]: pure refresh schedule, backoff and `Retry-After` rules.
//! - [`refresher`]: the one task that calls Klavi, on the policy's schedule
//!   or when a handler demands it.
//!
//! Serving tokens:
//! - [`store`]: the token in an `ArcSwap` (read lock-free by `GET /token`)
//!   and the demand-and-wait protocol for cold starts, `min_ttl` and
//!   forced refreshes.
//! - [`http`]: routes, the header guard, JSON errors, and the `GET /token`
//!   hot path that answers without the router.
//! - [`server`]: hyper connections with limits, eviction at the connection
//!   cap, and a bounded drain.
//! - [`metrics`]: the Prometheus metrics of the ops listener.
//! - [`memory`]: hands a burst's freed memory back to the system.
//!
//! Around it: [`fake_klavi`] (a scriptable fake upstream, with fault
//! injection, for the demo and the tests), [`demo`], [`healthcheck`],
//! [`secret`] (redacting wrapper and fingerprints), [`clock`] (injectable
//! wall clock), and test tooling shared with examples: `soak` (the chaos
//! soak harness) and `fuzz_support` (the fuzz targets' entry points).
//!
//! # Data flow
//!
//! ```text
//!  key files ──► credentials ──► klavi ──► refresher ──► store (ArcSwap) ──► http ──► apps
//!                                   ▲          │  ▲              │   demands  │
//!                                   │ policy ◄─┘  └──────────────┴────────────┘
//!                               Klavi API
//! ```
//!
//! Only the refresher calls Klavi, so at most one auth request is ever in
//! flight; handlers that need a fresher token record a demand and wait for
//! the refresher's published state.

#![forbid(unsafe_code)]

pub mod app;
pub mod cache;
pub mod cli;
pub mod clock;
pub mod config;
pub mod demo;
pub mod fake_klavi;
pub mod ops;
pub mod profile;
pub mod secret;
pub mod serve;
pub mod shutdown;
pub mod upstream;
