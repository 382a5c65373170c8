//! Prometheus metrics (SPEC section 6), served on the ops listener.
//!
//! Counters and the latency histogram are updated as things happen; the
//! gauges that describe the held token (expiry, readiness, next refresh)
//! are read from the store at scrape time, so they are never stale. Label
//! values come from small fixed sets: matched routes, status codes, error
//! categories; never a token, a key or a raw path.

use std::fmt;
use std::time::{Duration, SystemTime};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::prometheus_text;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tokio::time::Instant;

use crate::cache::source::Category;
use crate::cache::store::TokenStore;
use crate::clock::unix_secs;

/// `Content-Type` of the exposition (Prometheus text format 0.0.4).
pub const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

/// Upstream latency buckets: 5 ms to 10 s.
const LATENCY_BUCKETS: [f64; 12] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 7.5, 10.0,
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    route: &'static str,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefreshLabels {
    result: &'static str,
    category: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabel {
    route: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VersionLabel {
    version: &'static str,
}

/// How a forced refresh (`POST /token/refresh`) ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ForcedOutcome {
    /// Within `min_interval_secs` of the last fetch: its token, no call.
    Reused,
    /// A fetch (joined or started) brought a token.
    Fetched,
    /// No token could be had.
    Failed,
}

/// How a `min_ttl` request that needed a fresher token ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MinTtlOutcome {
    /// A token with enough time left.
    Served,
    /// 422: no token Klavi gives now can meet it.
    Unsatisfiable,
    /// 503: no token at all in time.
    Unavailable,
}

/// The route label for a request path: one of the known routes, or
/// `unmatched`, so arbitrary paths never become label values.
pub fn route_label(path: &str) -> &'static str {
    match path {
        "/token" => "/token",
        "/token/refresh" => "/token/refresh",
        "/healthz" => "/healthz",
        "/readyz" => "/readyz",
        "/metrics" => "/metrics",
        _ => "unmatched",
    }
}

/// Every metric the sidecar exports.
pub struct Metrics {
    registry: Registry,
    token_requests: Family<RequestLabels, Counter>,
    waited: Family<RouteLabel, Counter>,
    forced: Family<OutcomeLabel, Counter>,
    min_ttl_refreshes: Family<OutcomeLabel, Counter>,
    refresh: Family<RefreshLabels, Counter>,
    upstream_duration: Histogram,
    in_flight: Gauge,
    budget_exhausted: Counter,
    consecutive_failures: Gauge,
    token_expiry: Gauge,
    ready: Gauge,
    last_success: Gauge<f64, std::sync::atomic::AtomicU64>,
    next_refresh: Gauge<f64, std::sync::atomic::AtomicU64>,
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric under the `klavi_sidecar` prefix.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("klavi_sidecar");
        let token_requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "token_requests",
            "HTTP requests answered, by matched route (or \"unmatched\") and status code, on both listeners",
            token_requests.clone(),
        );
        let waited = Family::<RouteLabel, Counter>::default();
        registry.register(
            "token_requests_waited",
            "Token requests that could not be answered from the held token and waited for the refresh task",
            waited.clone(),
        );
        let forced = Family::<OutcomeLabel, Counter>::default();
        registry.register(
            "forced_refreshes",
            "POST /token/refresh requests by outcome: reused (within min_interval_secs, no call), fetched, failed",
            forced.clone(),
        );
        let min_ttl_refreshes = Family::<OutcomeLabel, Counter>::default();
        registry.register(
            "min_ttl_refreshes",
            "GET /token?min_ttl requests that needed a fresher token, by outcome: served, unsatisfiable (422), unavailable (503)",
            min_ttl_refreshes.clone(),
        );
        let refresh = Family::<RefreshLabels, Counter>::default();
        registry.register(
            "refresh",
            "Attempts to fetch a token from Klavi, by result (success, failure) and error category (none on success)",
            refresh.clone(),
        );
        let upstream_duration = Histogram::new(LATENCY_BUCKETS);
        registry.register(
            "upstream_request_duration_seconds",
            "Duration of auth requests to Klavi, successful or not",
            upstream_duration.clone(),
        );
        let in_flight = Gauge::default();
        registry.register(
            "upstream_requests_in_flight",
            "Auth requests to Klavi in flight (never more than 1)",
            in_flight.clone(),
        );
        let budget_exhausted = Counter::default();
        registry.register(
            "auth_budget_exhausted",
            "Times the auth budget (refresh.max_auth_per_minute) held a wanted request to Klavi back",
            budget_exhausted.clone(),
        );
        let consecutive_failures = Gauge::default();
        registry.register(
            "refresh_consecutive_failures",
            "Failed attempts since the last successful fetch",
            consecutive_failures.clone(),
        );
        let token_expiry = Gauge::default();
        registry.register(
            "token_expiry_timestamp_seconds",
            "Expiry of the held token, unix seconds (the expireAt served); 0 before the first token",
            token_expiry.clone(),
        );
        let ready = Gauge::default();
        registry.register(
            "ready",
            "1 while a servable token is held (what /readyz reports), else 0",
            ready.clone(),
        );
        let last_success = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        registry.register(
            "last_refresh_success_timestamp_seconds",
            "When the last successful fetch completed, unix seconds; 0 before the first",
            last_success.clone(),
        );
        let next_refresh = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        registry.register(
            "next_refresh_timestamp_seconds",
            "When the refresh task will next call Klavi, unix seconds (a fetch in flight: now)",
            next_refresh.clone(),
        );
        let build_info = Family::<VersionLabel, Gauge>::default();
        registry.register(
            "build_info",
            "Always 1; the version label says which build runs",
            build_info.clone(),
        );
        build_info
            .get_or_create(&VersionLabel {
                version: env!("CARGO_PKG_VERSION"),
            })
            .set(1);
        // Series that alerts and dashboards rely on exist from the start, at
        // zero, so the first failure shows as an increase.
        let _ = refresh.get_or_create_owned(&RefreshLabels {
            result: "success",
            category: "none",
        });
        for category in Category::UPSTREAM {
            let _ = refresh.get_or_create_owned(&RefreshLabels {
                result: "failure",
                category: category.as_str(),
            });
        }
        for outcome in ["reused", "fetched", "failed"] {
            let _ = forced.get_or_create_owned(&OutcomeLabel { outcome });
        }
        for outcome in ["served", "unsatisfiable", "unavailable"] {
            let _ = min_ttl_refreshes.get_or_create_owned(&OutcomeLabel { outcome });
        }
        let _ = waited.get_or_create_owned(&RouteLabel { route: "/token" });
        Self {
            registry,
            token_requests,
            waited,
            forced,
            min_ttl_refreshes,
            refresh,
            upstream_duration,
            in_flight,
            budget_exhausted,
            consecutive_failures,
            token_expiry,
            ready,
            last_success,
            next_refresh,
        }
    }

    /// The counter of `GET /token` answered 200, for the hot path (no
    /// label lookup per request).
    pub fn token_ok_counter(&self) -> Counter {
        self.token_requests
            .get_or_create(&RequestLabels {
                route: "/token",
                status: 200,
            })
            .clone()
    }

    /// Counts an answered request.
    pub fn request(&self, route: &'static str, status: u16) {
        self.token_requests
            .get_or_create(&RequestLabels { route, status })
            .inc();
    }

    /// Counts a token request that had to wait for the refresh task.
    pub fn waited(&self, route: &'static str) {
        self.waited.get_or_create(&RouteLabel { route }).inc();
    }

    /// Counts a forced refresh.
    pub fn forced(&self, outcome: ForcedOutcome) {
        let outcome = match outcome {
            ForcedOutcome::Reused => "reused",
            ForcedOutcome::Fetched => "fetched",
            ForcedOutcome::Failed => "failed",
        };
        self.forced.get_or_create(&OutcomeLabel { outcome }).inc();
    }

    /// Counts a `min_ttl` request that needed a fresher token.
    pub fn min_ttl_refresh(&self, outcome: MinTtlOutcome) {
        let outcome = match outcome {
            MinTtlOutcome::Served => "served",
            MinTtlOutcome::Unsatisfiable => "unsatisfiable",
            MinTtlOutcome::Unavailable => "unavailable",
        };
        self.min_ttl_refreshes
            .get_or_create(&OutcomeLabel { outcome })
            .inc();
    }

    /// The auth budget starts holding a wanted fetch back.
    pub fn auth_budget_exhausted(&self) {
        self.budget_exhausted.inc();
    }

    /// A request to Klavi starts.
    pub fn upstream_started(&self) {
        self.in_flight.set(1);
    }

    /// A request to Klavi ended after `duration`; `failure` is its
    /// category if it failed; `consecutive_failures` counts failures since
    /// the last success.
    pub fn upstream_finished(
        &self,
        duration: Duration,
        failure: Option<Category>,
        consecutive_failures: u32,
    ) {
        self.in_flight.set(0);
        self.upstream_duration.observe(duration.as_secs_f64());
        let labels = match failure {
            None => RefreshLabels {
                result: "success",
                category: "none",
            },
            Some(category) => RefreshLabels {
                result: "failure",
                category: category.as_str(),
            },
        };
        self.refresh.get_or_create(&labels).inc();
        self.consecutive_failures
            .set(i64::from(consecutive_failures));
    }

    /// The exposition, with the token gauges read from `store` now.
    pub fn encode(&self, store: &TokenStore) -> String {
        let now = Instant::now();
        let now_unix = unix_secs(SystemTime::now());
        let to_unix = |at: Instant| {
            if at >= now {
                now_unix + (at - now).as_secs_f64()
            } else {
                now_unix - (now - at).as_secs_f64()
            }
        };
        let token = store.current();
        self.token_expiry
            .set(token.as_ref().map_or(0, |t| t.expire_at_unix()));
        self.ready.set(i64::from(store.servable(now).is_some()));
        let state = store.state();
        self.last_success
            .set(state.last_success_at.map_or(0.0, to_unix));
        let next = if state.fetching {
            Some(now_unix)
        } else {
            state.next_attempt_at.map(to_unix)
        };
        self.next_refresh.set(next.unwrap_or(0.0));
        let mut text = String::with_capacity(4096);
        // Writing to a String cannot fail.
        let _ = prometheus_text::encode(&mut text, &self.registry);
        text
    }
}

impl crate::cache::refresher::RefreshObserver for Metrics {
    fn attempt_started(&self) {
        self.upstream_started();
    }

    fn attempt_finished(
        &self,
        duration: Duration,
        failure: Option<Category>,
        consecutive_failures: u32,
    ) {
        self.upstream_finished(duration, failure, consecutive_failures);
    }

    fn budget_exhausted(&self) {
        self.auth_budget_exhausted();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_labels_are_a_fixed_set() {
        for (path, label) in [
            ("/token", "/token"),
            ("/token/refresh", "/token/refresh"),
            ("/healthz", "/healthz"),
            ("/readyz", "/readyz"),
            ("/metrics", "/metrics"),
            ("/token/", "unmatched"),
            ("/eyJhbGciOiJIUzI1NiJ9", "unmatched"),
            ("", "unmatched"),
        ] {
            assert_eq!(route_label(path), label);
        }
    }
}
