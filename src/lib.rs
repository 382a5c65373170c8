//! klavi-token-sidecar keeps a valid Klavi payment API token for each of
//! its profiles (key pairs) and serves it to the apps of its pod over
//! loopback HTTP.
//!
//! # A tour
//!
//! The folders are the architecture; data flows down this list.
//!
//! - [`config`]: layered configuration (defaults < TOML < env < flags),
//!   validated once into typed values, one [`config::ProfileConfig`] per
//!   key pair; every failure names its full key.
//! - [`upstream`]: where tokens come from. [`upstream::klavi`] makes one
//!   auth request and turns the answer into a token or a categorised error,
//!   [`upstream::expiry`] reads its expiry (pure), [`upstream::credentials`]
//!   holds the keys, inline or from files that rotate.
//! - [`cache`]: knows neither Klavi nor HTTP. [`cache::source`] is the
//!   `TokenSource` trait and its errors, [`cache::policy`] the pure
//!   schedule, backoff and auth budget, [`cache::refresher`] the one task
//!   per profile that calls the source, [`cache::store`] the token in an
//!   `ArcSwap` and the demand-and-wait protocol.
//! - [`profile`]: a profile's store, metrics and readiness flag, as every
//!   consumer receives it.
//! - [`serve`]: handing tokens out. [`serve::http`] has the routes (token
//!   routes per profile, probes, the `GET /token` hot path that applies the
//!   router's rules without the router), [`serve::server`] drives
//!   connections with limits, an overflow lane and a bounded drain.
//! - [`proxy`]: a profile's proxy listener: apps' requests forwarded to
//!   Klavi with the token added, replayed once after a 401.
//! - [`sink`]: where tokens go besides HTTP: the token file, replaced
//!   atomically and kept equal to the servable token.
//! - [`fleet`]: fleet mode: a `TokenSource` wrapping the Klavi client that
//!   shares one token among the sidecars of one account through Redis,
//!   sealed, with a lock, generations and pub/sub.
//! - [`ops`]: what operators see. Prometheus [`ops::metrics`] with a
//!   `profile` label, the log subscriber, the `healthcheck` command, memory
//!   release.
//! - [`app`] builds a profile per configured key pair, binds the listeners
//!   and runs everything until shutdown ([`shutdown`] turns signals into a
//!   token), and runs `init` ([`app::init`]); [`cli`] is the commands and their exit codes (`main.rs` only
//!   calls it).
//!
//! Around it: [`fake_klavi`] (a scriptable fake Klavi, with fault
//! injection, for the demo and the tests), [`demo`], [`secret`] (redacting
//! wrapper and fingerprints), [`clock`] (the one place that reads the
//! system clock). Test tooling lives in the `klavi-sidecar-testkit` crate.
//!
//! # Data flow
//!
//! ```text
//!              ┌──────────── one per profile ────────────┐
//!  key files ─►│ credentials ─► klavi ─► refresher ─► store │─► profile ─► http ─► apps
//!              │                 ▲      policy ┘  ▲        │                 │
//!              └─────────────────│────────────────│────────┘                 │
//!                            Klavi API            └────── demands ───────────┘
//!                                                  ops::metrics reads the stores
//! ```
//!
//! Only a profile's refresher calls Klavi, so at most one auth request per
//! profile is ever in flight, within its auth budget; handlers that need a
//! fresher token record a demand and wait for the refresher's published
//! state. A new way to hand tokens out is a new consumer of
//! [`profile::Profiles`]; a new way to get them is a new
//! [`cache::source::TokenSource`].

#![forbid(unsafe_code)]

pub mod app;
pub mod cache;
pub mod cli;
pub mod clock;
pub mod config;
pub mod demo;
pub mod fake_klavi;
pub mod fleet;
pub mod ops;
pub mod profile;
pub mod proxy;
pub mod secret;
pub mod serve;
pub mod shutdown;
pub mod sink;
pub mod upstream;
