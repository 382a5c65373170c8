//! Prometheus metrics (SPEC section 6), served on the ops listener.
//!
//! Every per-profile series has a `profile` label, whose values are the
//! configured profile names and nothing else (a request for an unknown
//! profile counts under `profile=""`). Counters and the latency histogram
//! are updated as things happen, through a [`ProfileMetrics`] handle per
//! profile; the gauges that describe a held token (expiry, readiness, next
//! refresh) are read from the stores at scrape time, so they are never
//! stale. Routes are the matched route templates; never a token, a key or a
//! raw path.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::prometheus_text;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tokio::time::Instant;

use crate::cache::refresher::RefreshObserver;
use crate::cache::source::Category;
use crate::cache::store::{Readiness, TokenStore};
use crate::clock::{WallClock, unix_secs};

/// `Content-Type` of the exposition (Prometheus text format 0.0.4).
pub const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

/// The route label of a request no route matched.
pub const UNMATCHED: &str = "unmatched";

/// Upstream latency buckets: 5 ms to 10 s.
const LATENCY_BUCKETS: [f64; 12] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 7.5, 10.0,
];

/// Request latency buckets: 50 µs (the hot path) to 10 s (a wait, a slow
/// client).
const REQUEST_BUCKETS: [f64; 14] = [
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0,
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    profile: String,
    route: String,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefreshLabels {
    profile: String,
    result: &'static str,
    category: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    profile: String,
    route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    profile: String,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    profile: String,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProxyLabels {
    profile: String,
    status: u16,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProfileLabel {
    profile: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VersionLabel {
    version: &'static str,
}

type FloatGauge = Gauge<f64, AtomicU64>;
type HistogramFamily = Family<ProfileLabel, Histogram, fn() -> Histogram>;
type RouteHistogramFamily = Family<RouteLabels, Histogram, fn() -> Histogram>;

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

impl ForcedOutcome {
    const ALL: [Self; 3] = [Self::Reused, Self::Fetched, Self::Failed];

    fn label(self) -> &'static str {
        match self {
            Self::Reused => "reused",
            Self::Fetched => "fetched",
            Self::Failed => "failed",
        }
    }
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

impl MinTtlOutcome {
    const ALL: [Self; 3] = [Self::Served, Self::Unsatisfiable, Self::Unavailable];

    fn label(self) -> &'static str {
        match self {
            Self::Served => "served",
            Self::Unsatisfiable => "unsatisfiable",
            Self::Unavailable => "unavailable",
        }
    }
}

/// How a lease (`POST /token/lease`) ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseOutcome {
    /// A pooled token, at once.
    Pooled,
    /// A token, after waiting for a fetch.
    Waited,
    /// 422: no token Klavi gives now can meet `min_ttl`.
    Unsatisfiable,
    /// 503: no token in time.
    Unavailable,
}

impl LeaseOutcome {
    const ALL: [Self; 4] = [
        Self::Pooled,
        Self::Waited,
        Self::Unsatisfiable,
        Self::Unavailable,
    ];

    fn label(self) -> &'static str {
        match self {
            Self::Pooled => "pooled",
            Self::Waited => "waited",
            Self::Unsatisfiable => "unsatisfiable",
            Self::Unavailable => "unavailable",
        }
    }
}

/// How a proxied request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyOutcome {
    /// Klavi's answer to the one request sent.
    Forwarded,
    /// Klavi answered 401; the answer is the replay's, with a fresh token.
    Replayed,
    /// The sidecar answered (`Klavi-Sidecar-Error`).
    SidecarError,
}

impl ProxyOutcome {
    /// The `outcome` label.
    pub fn label(self) -> &'static str {
        match self {
            Self::Forwarded => "forwarded",
            Self::Replayed => "replayed",
            Self::SidecarError => "sidecar_error",
        }
    }
}

/// Proxied request buckets: 1 ms (a loopback Klavi) to 30 s (the default
/// `proxy.request_timeout_ms`).
const PROXY_BUCKETS: [f64; 13] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 30.0,
];

/// The metric families, shared by every profile's handle.
struct Families {
    token_requests: Family<RequestLabels, Counter>,
    request_duration: RouteHistogramFamily,
    waited: Family<RouteLabels, Counter>,
    forced: Family<OutcomeLabels, Counter>,
    min_ttl_refreshes: Family<OutcomeLabels, Counter>,
    refresh: Family<RefreshLabels, Counter>,
    upstream_duration: HistogramFamily,
    in_flight: Family<ProfileLabel, Gauge>,
    budget_exhausted: Family<ProfileLabel, Counter>,
    rejected_tokens: Family<ProfileLabel, Counter>,
    pool_tokens: Family<ProfileLabel, Gauge>,
    leases: Family<OutcomeLabels, Counter>,
    proxy_requests: Family<ProxyLabels, Counter>,
    proxy_duration: HistogramFamily,
    token_file_writes: Family<ResultLabels, Counter>,
    consecutive_failures: Family<ProfileLabel, Gauge>,
    token_expiry: Family<ProfileLabel, Gauge>,
    ready: Family<ProfileLabel, Gauge>,
    last_success: Family<ProfileLabel, FloatGauge>,
    next_refresh: Family<ProfileLabel, FloatGauge>,
    fleet_redis_up: Gauge,
    fleet_adopted: Family<ProfileLabel, Counter>,
}

/// Every metric the sidecar exports.
pub struct Metrics {
    registry: Registry,
    families: Arc<Families>,
    clock: Arc<dyn WallClock>,
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new(Arc::new(crate::clock::SystemClock))
    }
}

impl Metrics {
    /// Registers every metric under the `klavi_sidecar` prefix; `clock`
    /// turns monotonic instants into the unix times the gauges report.
    pub fn new(clock: Arc<dyn WallClock>) -> Self {
        let mut registry = Registry::with_prefix("klavi_sidecar");
        let families = Families {
            token_requests: Family::default(),
            request_duration: Family::new_with_constructor(|| Histogram::new(REQUEST_BUCKETS)),
            waited: Family::default(),
            forced: Family::default(),
            min_ttl_refreshes: Family::default(),
            refresh: Family::default(),
            upstream_duration: Family::new_with_constructor(|| Histogram::new(LATENCY_BUCKETS)),
            in_flight: Family::default(),
            budget_exhausted: Family::default(),
            rejected_tokens: Family::default(),
            token_file_writes: Family::default(),
            pool_tokens: Family::default(),
            leases: Family::default(),
            proxy_requests: Family::default(),
            proxy_duration: Family::new_with_constructor(|| Histogram::new(PROXY_BUCKETS)),
            consecutive_failures: Family::default(),
            token_expiry: Family::default(),
            ready: Family::default(),
            last_success: Family::default(),
            next_refresh: Family::default(),
            fleet_redis_up: Gauge::default(),
            fleet_adopted: Family::default(),
        };
        let f = &families;
        registry.register(
            "token_requests",
            "HTTP requests answered, by profile (\"\" when none), matched route (or \"unmatched\") and status code, on both listeners",
            f.token_requests.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Time to answer a request, by profile (\"\" when none) and matched route, on both listeners",
            f.request_duration.clone(),
        );
        registry.register(
            "token_requests_waited",
            "Token requests that could not be answered from the held token and waited for the refresh task",
            f.waited.clone(),
        );
        registry.register(
            "forced_refreshes",
            "POST /token/refresh requests by outcome: reused (within min_interval_secs, no call), fetched, failed",
            f.forced.clone(),
        );
        registry.register(
            "min_ttl_refreshes",
            "GET /token?min_ttl requests that needed a fresher token, by outcome: served, unsatisfiable (422), unavailable (503)",
            f.min_ttl_refreshes.clone(),
        );
        registry.register(
            "refresh",
            "Attempts to fetch a token from Klavi, by result (success, failure) and error category (none on success)",
            f.refresh.clone(),
        );
        registry.register(
            "upstream_request_duration_seconds",
            "Duration of auth requests to Klavi, successful or not",
            f.upstream_duration.clone(),
        );
        registry.register(
            "upstream_requests_in_flight",
            "Auth requests to Klavi in flight (never more than 1 per profile)",
            f.in_flight.clone(),
        );
        registry.register(
            "auth_budget_exhausted",
            "Times the auth budget (refresh.max_auth_per_minute) held a wanted request to Klavi back",
            f.budget_exhausted.clone(),
        );
        registry.register(
            "rejected_tokens",
            "Current tokens reported rejected (POST /token/refresh with rejectedToken): each is never served again and replaced",
            f.rejected_tokens.clone(),
        );
        registry.register(
            "token_file_writes",
            "Writes of a profile's token file (SPEC 4.4) by result: success, or failure (retried with backoff; /readyz says token_file_write_failed)",
            f.token_file_writes.clone(),
        );
        registry.register(
            "pool_tokens",
            "single_use profiles: tokens in the pool, ready to lease",
            f.pool_tokens.clone(),
        );
        registry.register(
            "leases",
            "single_use profiles: POST /token/lease by outcome: pooled (at once), waited (for a fetch), unsatisfiable (422), unavailable (503)",
            f.leases.clone(),
        );
        registry.register(
            "proxy_requests",
            "Requests through a profile's proxy, by the status the app got and outcome: forwarded (Klavi's answer), replayed (Klavi answered 401; the replay's answer, with a fresh token), sidecar_error (the sidecar answered, Klavi-Sidecar-Error)",
            f.proxy_requests.clone(),
        );
        registry.register(
            "proxy_request_duration_seconds",
            "Time from a proxied request's arrival to the answer's head (Klavi's, after any replay, or the sidecar's error)",
            f.proxy_duration.clone(),
        );
        registry.register(
            "refresh_consecutive_failures",
            "Failed attempts since the last successful fetch",
            f.consecutive_failures.clone(),
        );
        registry.register(
            "token_expiry_timestamp_seconds",
            "Expiry of the held token, unix seconds (the expireAt served); 0 before the first token",
            f.token_expiry.clone(),
        );
        registry.register(
            "ready",
            "1 while a servable token is held (what /readyz reports for the profile), else 0",
            f.ready.clone(),
        );
        registry.register(
            "last_refresh_success_timestamp_seconds",
            "When the last successful fetch completed, unix seconds; 0 before the first",
            f.last_success.clone(),
        );
        registry.register(
            "next_refresh_timestamp_seconds",
            "When the refresh task will next call Klavi, unix seconds (a fetch in flight: now)",
            f.next_refresh.clone(),
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
        Self {
            registry,
            families: Arc::new(families),
            clock,
        }
    }

    /// Fleet mode is on: its series are exported (only then, so a sidecar
    /// without a Redis shows no Redis "down"); returns the
    /// `fleet_redis_up` gauge to drive.
    pub fn enable_fleet(&mut self) -> Gauge {
        let f = &self.families;
        self.registry.register(
            "fleet_redis_up",
            "1 while the fleet's Redis answers within fleet.command_timeout_ms, else 0 (the fleet's profiles then fetch standalone)",
            f.fleet_redis_up.clone(),
        );
        self.registry.register(
            "fleet_tokens_adopted",
            "Tokens taken from the fleet's Redis instead of fetched from Klavi",
            f.fleet_adopted.clone(),
        );
        f.fleet_redis_up.clone()
    }

    /// The handle of profile `name`, with every series that alerts and
    /// dashboards rely on created at zero, so the first failure shows as an
    /// increase.
    pub fn profile(&self, name: &str) -> ProfileMetrics {
        let f = &self.families;
        let profile = name.to_string();
        let of = || ProfileLabel {
            profile: profile.clone(),
        };
        let _ = f.refresh.get_or_create(&RefreshLabels {
            profile: profile.clone(),
            result: "success",
            category: "none",
        });
        for category in Category::UPSTREAM {
            let _ = f.refresh.get_or_create(&RefreshLabels {
                profile: profile.clone(),
                result: "failure",
                category: category.as_str(),
            });
        }
        for outcome in ForcedOutcome::ALL {
            let _ = f.forced.get_or_create(&OutcomeLabels {
                profile: profile.clone(),
                outcome: outcome.label(),
            });
        }
        for outcome in MinTtlOutcome::ALL {
            let _ = f.min_ttl_refreshes.get_or_create(&OutcomeLabels {
                profile: profile.clone(),
                outcome: outcome.label(),
            });
        }
        let _ = f.upstream_duration.get_or_create(&of());
        let _ = f.budget_exhausted.get_or_create(&of());
        let _ = f.rejected_tokens.get_or_create(&of());
        let _ = f.in_flight.get_or_create(&of());
        let _ = f.consecutive_failures.get_or_create(&of());
        let _ = f.ready.get_or_create(&of());
        let _ = f.token_expiry.get_or_create(&of());
        ProfileMetrics {
            profile,
            families: Arc::clone(&self.families),
        }
    }

    /// Counts an answered request that belongs to no profile (probes,
    /// metrics, unknown paths and profiles), and its latency.
    pub fn request(&self, route: &str, status: u16, took: Duration) {
        count_request(&self.families, "", route, status, took);
    }

    /// The exposition, with each profile's token gauges read from its store
    /// now.
    pub fn encode<'a>(
        &self,
        stores: impl IntoIterator<Item = (&'a str, &'a TokenStore)>,
    ) -> String {
        let now = Instant::now();
        let now_unix = unix_secs(self.clock.now());
        let to_unix = |at: Instant| {
            if at >= now {
                now_unix + (at - now).as_secs_f64()
            } else {
                now_unix - (now - at).as_secs_f64()
            }
        };
        let f = &self.families;
        for (name, store) in stores {
            let label = ProfileLabel {
                profile: name.to_string(),
            };
            let token = store.current();
            f.token_expiry
                .get_or_create(&label)
                .set(token.as_ref().map_or(0, |t| t.expire_at_unix()));
            f.ready.get_or_create(&label).set(i64::from(matches!(
                store.readiness(now),
                Readiness::Ready(_)
            )));
            if store.is_single_use() {
                f.pool_tokens
                    .get_or_create(&label)
                    .set(i64::try_from(store.pooled(now)).unwrap_or(i64::MAX));
            }
            let state = store.state();
            f.last_success
                .get_or_create(&label)
                .set(state.last_success_at.map_or(0.0, to_unix));
            let next = if state.fetching {
                Some(now_unix)
            } else {
                state.next_attempt_at.map(to_unix)
            };
            f.next_refresh
                .get_or_create(&label)
                .set(next.unwrap_or(0.0));
        }
        let mut text = String::with_capacity(8192);
        // Writing to a String cannot fail.
        let _ = prometheus_text::encode(&mut text, &self.registry);
        text
    }
}

/// One profile's metrics: cheap to clone, one per consumer.
#[derive(Clone)]
pub struct ProfileMetrics {
    profile: String,
    families: Arc<Families>,
}

impl fmt::Debug for ProfileMetrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProfileMetrics")
            .field("profile", &self.profile)
            .finish_non_exhaustive()
    }
}

impl ProfileMetrics {
    fn label(&self) -> ProfileLabel {
        ProfileLabel {
            profile: self.profile.clone(),
        }
    }

    /// The counter of requests on `route` answered `status`, to keep and
    /// increment without a label lookup (the `GET /token` hot path).
    pub fn requests_counter(&self, route: &str, status: u16) -> Counter {
        self.families
            .token_requests
            .get_or_create(&RequestLabels {
                profile: self.profile.clone(),
                route: route.to_string(),
                status,
            })
            .clone()
    }

    /// The latency histogram of `route`, to keep (the hot path).
    pub fn latency_histogram(&self, route: &str) -> Histogram {
        self.families
            .request_duration
            .get_or_create(&RouteLabels {
                profile: self.profile.clone(),
                route: route.to_string(),
            })
            .clone()
    }

    /// Counts an answered request on `route`, and its latency.
    pub fn request(&self, route: &str, status: u16, took: Duration) {
        count_request(&self.families, &self.profile, route, status, took);
    }

    /// The counter of token requests on `route` that had to wait for the
    /// refresh task (created at zero, for dashboards).
    pub fn waited_counter(&self, route: &str) -> Counter {
        self.families
            .waited
            .get_or_create(&RouteLabels {
                profile: self.profile.clone(),
                route: route.to_string(),
            })
            .clone()
    }

    /// Counts a token request on `route` that had to wait for the refresh
    /// task.
    pub fn waited(&self, route: &str) {
        self.waited_counter(route).inc();
    }

    /// Counts a forced refresh.
    pub fn forced(&self, outcome: ForcedOutcome) {
        self.families
            .forced
            .get_or_create(&OutcomeLabels {
                profile: self.profile.clone(),
                outcome: outcome.label(),
            })
            .inc();
    }

    /// Creates a single_use profile's lease series at zero (a shared
    /// profile has none).
    pub fn single_use(&self) {
        let _ = self.families.pool_tokens.get_or_create(&self.label());
        for outcome in LeaseOutcome::ALL {
            let _ = self.families.leases.get_or_create(&OutcomeLabels {
                profile: self.profile.clone(),
                outcome: outcome.label(),
            });
        }
    }

    /// Counts a lease.
    pub fn lease(&self, outcome: LeaseOutcome) {
        self.families
            .leases
            .get_or_create(&OutcomeLabels {
                profile: self.profile.clone(),
                outcome: outcome.label(),
            })
            .inc();
    }

    /// The counter of proxied requests answered `status` with `outcome`,
    /// to keep and increment without a lookup (the proxy's common case).
    pub fn proxy_counter(&self, status: u16, outcome: ProxyOutcome) -> Counter {
        self.families
            .proxy_requests
            .get_or_create(&ProxyLabels {
                profile: self.profile.clone(),
                status,
                outcome: outcome.label(),
            })
            .clone()
    }

    /// A proxy's handles, kept for every request: the counter of its
    /// common case (200 from Klavi, no replay) and the duration
    /// histogram. Creates both series at zero.
    pub fn proxied(&self) -> (Counter, Histogram) {
        (
            self.proxy_counter(200, ProxyOutcome::Forwarded),
            self.proxy_histogram(),
        )
    }

    /// The histogram of proxied requests' durations, to keep.
    pub fn proxy_histogram(&self) -> Histogram {
        self.families
            .proxy_duration
            .get_or_create(&self.label())
            .clone()
    }

    /// The profile writes a token file: its write counters, at zero.
    pub fn token_file(&self) {
        for result in ["success", "failure"] {
            let _ = self
                .families
                .token_file_writes
                .get_or_create(&ResultLabels {
                    profile: self.profile.clone(),
                    result,
                });
        }
    }

    /// Counts a write of the token file.
    pub fn token_file_written(&self, ok: bool) {
        self.families
            .token_file_writes
            .get_or_create(&ResultLabels {
                profile: self.profile.clone(),
                result: if ok { "success" } else { "failure" },
            })
            .inc();
    }

    /// The profile is in the fleet: its adoption counter, created at zero.
    pub fn fleet_adopted(&self) -> Counter {
        self.families
            .fleet_adopted
            .get_or_create(&self.label())
            .clone()
    }

    /// Counts a current token reported rejected.
    pub fn rejected(&self) {
        self.families
            .rejected_tokens
            .get_or_create(&self.label())
            .inc();
    }

    /// Counts a `min_ttl` request that needed a fresher token.
    pub fn min_ttl_refresh(&self, outcome: MinTtlOutcome) {
        self.families
            .min_ttl_refreshes
            .get_or_create(&OutcomeLabels {
                profile: self.profile.clone(),
                outcome: outcome.label(),
            })
            .inc();
    }
}

fn count_request(families: &Families, profile: &str, route: &str, status: u16, took: Duration) {
    families
        .token_requests
        .get_or_create(&RequestLabels {
            profile: profile.to_string(),
            route: route.to_string(),
            status,
        })
        .inc();
    families
        .request_duration
        .get_or_create(&RouteLabels {
            profile: profile.to_string(),
            route: route.to_string(),
        })
        .observe(took.as_secs_f64());
}

impl RefreshObserver for ProfileMetrics {
    fn attempt_started(&self) {
        self.families.in_flight.get_or_create(&self.label()).set(1);
    }

    fn attempt_finished(
        &self,
        duration: Duration,
        failure: Option<Category>,
        consecutive_failures: u32,
    ) {
        let f = &self.families;
        let label = self.label();
        f.in_flight.get_or_create(&label).set(0);
        f.upstream_duration
            .get_or_create(&label)
            .observe(duration.as_secs_f64());
        let (result, category) = match failure {
            None => ("success", "none"),
            Some(category) => ("failure", category.as_str()),
        };
        f.refresh
            .get_or_create(&RefreshLabels {
                profile: self.profile.clone(),
                result,
                category,
            })
            .inc();
        f.consecutive_failures
            .get_or_create(&label)
            .set(i64::from(consecutive_failures));
    }

    fn budget_exhausted(&self) {
        self.families
            .budget_exhausted
            .get_or_create(&self.label())
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_profile_has_its_alerting_series_at_zero_and_its_own_counts() {
        let metrics = Metrics::default();
        let a = metrics.profile("a");
        let b = metrics.profile("b");
        a.attempt_finished(Duration::from_millis(5), Some(Category::RateLimited), 1);
        b.budget_exhausted();
        let text = metrics.encode([]);
        for profile in ["a", "b"] {
            for category in Category::UPSTREAM {
                let series = format!(
                    "klavi_sidecar_refresh_total{{profile=\"{profile}\",result=\"failure\",category=\"{}\"}}",
                    category.as_str()
                );
                assert!(text.contains(&series), "{series} missing");
            }
            assert!(text.contains(&format!(
                "klavi_sidecar_auth_budget_exhausted_total{{profile=\"{profile}\"}}"
            )));
        }
        assert!(text.contains(
            "klavi_sidecar_refresh_total{profile=\"a\",result=\"failure\",category=\"rate_limited\"} 1"
        ));
        assert!(text.contains(
            "klavi_sidecar_refresh_total{profile=\"b\",result=\"failure\",category=\"rate_limited\"} 0"
        ));
        assert!(text.contains("klavi_sidecar_auth_budget_exhausted_total{profile=\"b\"} 1"));
        assert!(text.contains("klavi_sidecar_auth_budget_exhausted_total{profile=\"a\"} 0"));
    }
}
