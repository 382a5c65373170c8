//! The HTTP API: the token listener's and the ops listener's routes.
//!
//! `GET /token` (the default profile) and `GET /profiles/{name}/token`
//! read the profile's store without a lock and answer at once when a
//! servable token is held; only a cold start, `min_ttl` or a forced refresh
//! waits for the profile's refresh task. Token routes sit behind a guard
//! (the `Klavi-Sidecar` header, no proxied requests, a loopback or allowed
//! `Host`); probes need no header.
//!
//! - `token`: the token routes' handlers;
//! - `probes`: `/healthz`, `/readyz`, `/metrics`;
//! - `fast`: `GET /token` answered without the router, by the same rules;
//! - `render`, `accept`, `guard`, `error`: bodies, content negotiation,
//!   the guard, the error answers.

mod accept;
mod error;
mod fast;
mod guard;
mod probes;
mod render;
pub use render::Rendered;
mod token;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{MatchedPath, Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use http::{StatusCode, header};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::Histogram;
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;

pub use error::ApiError;
pub use fast::token_fast_path;
pub use guard::{Guard, REQUIRED_HEADER};

use crate::cache::store::TokenStore;
use crate::config::DEFAULT_PROFILE;
use crate::ops::metrics::{Metrics, UNMATCHED};
use crate::profile::{Profile, Profiles};

/// The default profile's token route.
const TOKEN: &str = "/token";
/// The default profile's forced-refresh route.
const TOKEN_REFRESH: &str = "/token/refresh";
/// Any profile's token route.
const PROFILE_TOKEN: &str = "/profiles/{name}/token";
/// Any profile's forced-refresh route.
const PROFILE_TOKEN_REFRESH: &str = "/profiles/{name}/token/refresh";
/// The default profile's lease route (single_use profiles).
const TOKEN_LEASE: &str = "/token/lease";
/// Any profile's lease route (single_use profiles).
const PROFILE_TOKEN_LEASE: &str = "/profiles/{name}/token/lease";

/// A profile as the token routes serve it: its bodies, rendered once per
/// token, and the hot path's counters.
#[derive(Debug)]
struct Endpoint {
    profile: Arc<Profile>,
    bodies: render::RenderCache,
    /// `GET /token` answered 200, and its latency (the default profile
    /// only: no other is ever served there).
    default_route: Option<(Counter, Histogram)>,
    /// `GET /profiles/{name}/token` answered 200, and its latency.
    named_route: (Counter, Histogram),
}

/// Every profile's endpoint.
#[derive(Debug, Default)]
struct Endpoints {
    all: Vec<Arc<Endpoint>>,
}

impl Endpoints {
    fn get(&self, name: &str) -> Option<&Arc<Endpoint>> {
        self.all.iter().find(|e| e.profile.name() == name)
    }

    fn default_profile(&self) -> Option<&Arc<Endpoint>> {
        self.get(DEFAULT_PROFILE)
    }

    /// The endpoint a request's path names: the default profile's for
    /// `/token…`, the named one for `/profiles/{name}/…`.
    fn for_path(&self, path: &str) -> Option<&Arc<Endpoint>> {
        match path.strip_prefix("/profiles/") {
            Some(rest) => self.get(rest.split('/').next().unwrap_or_default()),
            None => self.default_profile(),
        }
    }
}

/// What the handlers share.
#[derive(Debug, Clone)]
pub struct AppState {
    endpoints: Arc<Endpoints>,
    /// Where requests are counted.
    pub metrics: Arc<Metrics>,
    /// What token requests must satisfy.
    pub guard: Guard,
    /// Longest time a request may take (answered 408 after).
    pub request_timeout: Duration,
    /// Largest request body (413 beyond).
    pub max_body_bytes: usize,
}

impl AppState {
    /// State over `profiles`, counting into `metrics`, with the header
    /// required and no extra allowed hosts, a request timeout of `wait`
    /// plus 5 s and small bodies: adjust the public fields as configured.
    pub fn new(profiles: &Profiles, metrics: Arc<Metrics>, wait: Duration) -> Self {
        let all = profiles
            .iter()
            .map(|profile| {
                let metrics = profile.metrics();
                let route = |route: &str| {
                    let _ = metrics.waited_counter(route);
                    (
                        metrics.requests_counter(route, 200),
                        metrics.latency_histogram(route),
                    )
                };
                Arc::new(Endpoint {
                    default_route: (profile.name() == DEFAULT_PROFILE).then(|| route(TOKEN)),
                    named_route: route(PROFILE_TOKEN),
                    profile: Arc::clone(profile),
                    bodies: render::RenderCache::default(),
                })
            })
            .collect();
        Self {
            endpoints: Arc::new(Endpoints { all }),
            metrics,
            guard: Guard::default(),
            request_timeout: wait + Duration::from_secs(5),
            max_body_bytes: 16 * 1024,
        }
    }

    /// One default profile over `store` (for tests and benchmarks).
    pub fn single(store: Arc<TokenStore>, wait: Duration) -> Self {
        let metrics = Arc::new(Metrics::default());
        let profile = Profile::new(
            DEFAULT_PROFILE,
            store,
            metrics.profile(DEFAULT_PROFILE),
            true,
        );
        Self::new(&Profiles::new(vec![Arc::new(profile)]), metrics, wait)
    }
}

/// The token listener: every profile's token routes and the probes.
pub fn token_router(state: AppState) -> Router {
    let token_routes = Router::new()
        .route(TOKEN, get(token::get))
        .route(TOKEN_REFRESH, post(token::refresh))
        .route(PROFILE_TOKEN, get(token::get))
        .route(PROFILE_TOKEN_REFRESH, post(token::refresh))
        .route(TOKEN_LEASE, post(token::lease))
        .route(PROFILE_TOKEN_LEASE, post(token::lease))
        .route_layer(middleware::from_fn_with_state(
            state.guard.clone(),
            guard::token_route_guard,
        ));
    finish(
        Router::new().merge(token_routes).merge(probes::routes()),
        state,
    )
}

/// The ops listener: probes and metrics. Never a token.
pub fn ops_router(state: AppState) -> Router {
    finish(
        probes::routes().route("/metrics", get(probes::metrics)),
        state,
    )
}

/// The layers every route shares, innermost first: the body limit (413),
/// the request timeout (408), JSON bodies for bare errors (those, axum's
/// 405), request metrics, a tracing span.
fn finish(router: Router<AppState>, state: AppState) -> Router {
    router
        .fallback(not_found)
        .layer(RequestBodyLimitLayer::new(state.max_body_bytes))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            state.request_timeout,
        ))
        .layer(middleware::map_response(fill_bare_errors))
        .layer(middleware::from_fn_with_state(state.clone(), count_request))
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(|request: &Request| {
                    request_span(request.method(), route_of(request))
                })
                .on_request(())
                .on_response(
                    |response: &Response, latency: Duration, _span: &tracing::Span| {
                        request_finished(response.status().as_u16(), latency);
                    },
                )
                .on_eos(())
                .on_failure(()),
        )
        .with_state(state)
}

/// The route a request matched (its template), or `unmatched`: never the
/// raw path, which could be anything.
fn route_of(request: &Request) -> &str {
    request
        .extensions()
        .get::<MatchedPath>()
        .map_or(UNMATCHED, MatchedPath::as_str)
}

/// The span of one request, on both paths (router and hot path).
fn request_span(method: &http::Method, route: &str) -> tracing::Span {
    tracing::debug_span!("request", method = %method, route = route)
}

/// The event that ends one request, on both paths.
fn request_finished(status: u16, latency: Duration) {
    tracing::debug!(
        status,
        latency_us = latency.as_micros() as u64,
        "request finished"
    );
}

/// Counts every answer under its profile (only configured ones: a request
/// for an unknown profile counts under none), route and status.
async fn count_request(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let route = route_of(&request).to_string();
    let is_token_route = route.starts_with(TOKEN) || route.starts_with("/profiles/");
    let endpoint = if is_token_route {
        state.endpoints.for_path(request.uri().path()).cloned()
    } else {
        None
    };
    let started = tokio::time::Instant::now();
    let response = next.run(request).await;
    let status = response.status().as_u16();
    let took = started.elapsed();
    match endpoint {
        Some(endpoint) => endpoint.profile.metrics().request(&route, status, took),
        None => state.metrics.request(&route, status, took),
    }
    response
}

async fn not_found() -> ApiError {
    ApiError::NotFound
}

/// Gives JSON bodies to the bare error responses produced outside the
/// handlers (axum's 405 with its `Allow` header, the request timeout).
async fn fill_bare_errors(response: Response) -> Response {
    let bare = response.headers().get(header::CONTENT_TYPE).is_none();
    let replacement = match response.status() {
        StatusCode::METHOD_NOT_ALLOWED if bare => ApiError::MethodNotAllowed,
        StatusCode::REQUEST_TIMEOUT if bare => ApiError::RequestTimeout,
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::PayloadTooLarge,
        _ => return response,
    };
    let (mut parts, _) = response.into_parts();
    let (new_parts, body) = replacement.into_response().into_parts();
    parts.headers.extend(new_parts.headers);
    Response::from_parts(parts, body)
}
