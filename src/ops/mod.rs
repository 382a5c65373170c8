//! Operating the sidecar: Prometheus [`metrics`], the log subscriber
//! ([`telemetry`]), the `healthcheck` command and memory release.

pub mod healthcheck;
pub mod memory;
pub mod metrics;
pub mod telemetry;
