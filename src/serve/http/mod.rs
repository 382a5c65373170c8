//! The HTTP API: the token listener's and the ops listener's routes.
//!
//! `GET /token` reads the store without a lock and answers at once when a
//! servable token is held; only a cold start, `min_ttl` or a forced refresh
//! waits for the refresh task. Token routes sit behind a guard (the
//! `Klavi-Sidecar` header, no proxied requests, a loopback or allowed
//! `Host`); probes need no header.

mod error;
mod guard;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use http::{HeaderValue, StatusCode, header};
use serde::Serialize;
use serde_json::json;
use tokio::time::Instant;
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;

pub use error::ApiError;
pub use guard::Guard;

use crate::cache::source::Category;
use crate::cache::store::{TokenStore, Unavailable, UnavailableReason};
use crate::cache::token::Token;
use crate::ops::metrics::{ForcedOutcome, Metrics, MinTtlOutcome, route_label};

/// What the handlers share.
#[derive(Debug, Clone)]
pub struct AppState {
    /// The token store.
    pub store: Arc<TokenStore>,
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
    /// State over `store` with fresh metrics, the header required and a
    /// request timeout of `wait` plus 5 s (as the service uses).
    pub fn new(store: Arc<TokenStore>, wait: Duration) -> Self {
        Self {
            store,
            metrics: Arc::new(Metrics::new()),
            guard: Guard::default(),
            request_timeout: wait + Duration::from_secs(5),
            max_body_bytes: 1024,
        }
    }
}

/// The token listener: `/token`, `/token/refresh` and the probes.
pub fn token_router(state: AppState) -> Router {
    let token_routes = Router::new()
        .route("/token", get(get_token))
        .route("/token/refresh", post(refresh_token))
        .route_layer(middleware::from_fn_with_state(
            state.guard.clone(),
            guard::token_route_guard,
        ));
    finish(
        Router::new().merge(token_routes).merge(probe_routes()),
        state,
    )
}

/// The ops listener: probes and metrics. Never the token.
pub fn ops_router(state: AppState) -> Router {
    finish(probe_routes().route("/metrics", get(metrics)), state)
}

fn probe_routes() -> Router<AppState> {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
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
        .layer(middleware::from_fn_with_state(
            Arc::clone(&state.metrics),
            count_request,
        ))
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(|request: &Request| {
                    tracing::debug_span!(
                        "request",
                        method = %request.method(),
                        route = route_label(request.uri().path()),
                    )
                })
                .on_request(())
                .on_response(
                    |response: &Response, latency: Duration, _span: &tracing::Span| {
                        tracing::debug!(
                            status = response.status().as_u16(),
                            latency_us = latency.as_micros() as u64,
                            "request finished"
                        );
                    },
                )
                .on_eos(())
                .on_failure(()),
        )
        .with_state(state)
}

/// The `GET /token` hot path, answered without the router: a plain
/// request (no query, no body, the header present, not proxied) while a
/// servable token is held gets the token, the same headers and the same
/// metrics and trace event as through the router. Anything else (an error
/// to report, `min_ttl`, no servable token) goes through the router.
pub fn token_fast_path(state: AppState) -> crate::serve::server::FastPath {
    let ok = state.metrics.token_ok_counter();
    Arc::new(move |request| {
        if request.method() != http::Method::GET
            || request.uri().path() != "/token"
            || request.uri().query().is_some()
        {
            return None;
        }
        let headers = request.headers();
        if !state.guard.passes(request.uri(), headers)
            || headers.contains_key(header::TRANSFER_ENCODING)
            || headers
                .get(header::CONTENT_LENGTH)
                .is_some_and(|length| length.as_bytes() != b"0")
        {
            return None;
        }
        let now = Instant::now();
        let token = state.store.servable(now)?;
        let response = token_response(&token, now, wants_plain_text(headers));
        ok.inc();
        if tracing::enabled!(tracing::Level::DEBUG) {
            let span = tracing::debug_span!("request", method = "GET", route = "/token");
            let _entered = span.enter();
            tracing::debug!(status = 200u16, latency_us = 0u64, "request finished");
        }
        Some(response)
    })
}

async fn count_request(
    State(metrics): State<Arc<Metrics>>,
    request: Request,
    next: Next,
) -> Response {
    let route = route_label(request.uri().path());
    let response = next.run(request).await;
    metrics.request(route, response.status().as_u16());
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

/// Whether the client asked for the bare token: `Accept` gives `text/plain`
/// a higher q-value than `application/json`, or the same one listed first.
///
/// Each type takes the q of the most specific range that matches it
/// (`text/plain` over `text/*` over `*/*`, RFC 9110 §12.5.1); JSON is the
/// default when nothing is said, when both are refused, and on a tie from
/// the same range (`*/*`).
fn wants_plain_text(headers: &http::HeaderMap) -> bool {
    let mut plain = Preference::default();
    let mut json = Preference::default();
    let ranges = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','));
    for (index, range) in ranges.enumerate() {
        let mut parts = range.split(';');
        let media = parts.next().unwrap_or("").trim();
        let Some((kind, subtype)) = media.split_once('/') else {
            continue;
        };
        let mut q = 1.0;
        for param in parts {
            if let Some((name, value)) = param.split_once('=')
                && name.trim().eq_ignore_ascii_case("q")
            {
                q = value.trim().parse::<f32>().unwrap_or(-1.0);
            }
        }
        if !(0.0..=1.0).contains(&q) {
            continue; // an unreadable q: the range is ignored
        }
        plain.offer(kind, subtype, "text", "plain", q, index);
        json.offer(kind, subtype, "application", "json", q, index);
    }
    plain.q > 0.0 && (plain.q > json.q || (plain.q == json.q && plain.index < json.index))
}

/// How much an `Accept` header wants one media type: the q of its most
/// specific matching range, and where that range stands.
#[derive(Debug, Clone, Copy)]
struct Preference {
    /// 0 exact, 1 `type/*`, 2 `*/*`, 3 no match.
    specificity: u8,
    q: f32,
    index: usize,
}

impl Default for Preference {
    fn default() -> Self {
        Self {
            specificity: 3,
            q: 0.0,
            index: usize::MAX,
        }
    }
}

impl Preference {
    fn offer(
        &mut self,
        kind: &str,
        subtype: &str,
        want: &str,
        want_sub: &str,
        q: f32,
        index: usize,
    ) {
        let specificity = match (kind.trim(), subtype.trim()) {
            (k, s) if k.eq_ignore_ascii_case(want) && s.eq_ignore_ascii_case(want_sub) => 0,
            (k, "*") if k.eq_ignore_ascii_case(want) => 1,
            ("*", "*") => 2,
            _ => return,
        };
        if specificity < self.specificity {
            *self = Self {
                specificity,
                q,
                index,
            };
        }
    }
}

/// The token as `GET /token` answers it, `Cache-Control: no-store`
/// included (built directly: this is the hot path). `judged_at` is when it
/// was found servable; `expiresIn` counts from then, so it never shows less
/// than the margin that was checked.
fn token_response(token: &Token, judged_at: Instant, plain_text: bool) -> Response {
    let (content_type, body) = if plain_text {
        ("text/plain; charset=utf-8", token.plain_body())
    } else {
        ("application/json", token.json_body(judged_at))
    };
    let mut headers = http::HeaderMap::with_capacity(2);
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    let mut response = Response::new(axum::body::Body::from(body));
    *response.headers_mut() = headers;
    response
}

/// `min_ttl` from the query string: `Ok(None)` when absent.
fn min_ttl(query: Option<&str>) -> Result<Option<Duration>, ApiError> {
    let Some(query) = query else {
        return Ok(None);
    };
    let mut found = None;
    for (key, value) in url::form_urlencoded::parse(query.as_bytes()) {
        if key == "min_ttl" {
            if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
                return Err(ApiError::InvalidMinTtl);
            }
            // Beyond u64 is beyond any token's lifetime anyway.
            let secs = value.parse::<u64>().unwrap_or(u64::MAX);
            found = Some(Duration::from_secs(secs));
        }
    }
    Ok(found)
}

async fn get_token(State(state): State<AppState>, request: Request) -> Response {
    let min = match min_ttl(request.uri().query()) {
        Ok(min) => min,
        Err(error) => return error.into_response(),
    };
    let plain_text = wants_plain_text(request.headers());
    let now = Instant::now();
    // The hot path: one atomic load.
    let held = state.store.servable(now);
    if let Some(token) = &held
        && min.is_none_or(|min| token.remaining(now) >= min)
    {
        return token_response(token, now, plain_text);
    }
    state.metrics.waited("/token");
    let result = state.store.token_with(min.unwrap_or(Duration::ZERO)).await;
    if held.is_some() {
        // A servable token was held, so only min_ttl made this wait.
        state.metrics.min_ttl_refresh(match &result {
            Ok(_) => MinTtlOutcome::Served,
            Err(u) if matches!(u.reason, UnavailableReason::MinTtlUnsatisfiable { .. }) => {
                MinTtlOutcome::Unsatisfiable
            }
            Err(_) => MinTtlOutcome::Unavailable,
        });
    }
    match result {
        Ok(served) => token_response(&served, served.at, plain_text),
        Err(Unavailable {
            reason: UnavailableReason::MinTtlUnsatisfiable { max_ttl_secs },
            ..
        }) => ApiError::MinTtlUnsatisfiable { max_ttl_secs }.into_response(),
        Err(unavailable) => ApiError::TokenUnavailable(unavailable).into_response(),
    }
}

async fn refresh_token(State(state): State<AppState>, request: Request) -> Response {
    let plain_text = wants_plain_text(request.headers());
    match state.store.force_refresh().await {
        Ok((served, reused)) => {
            state.metrics.forced(if reused {
                ForcedOutcome::Reused
            } else {
                ForcedOutcome::Fetched
            });
            token_response(&served, served.at, plain_text)
        }
        Err(unavailable) => {
            state.metrics.forced(ForcedOutcome::Failed);
            ApiError::UpstreamError(unavailable).into_response()
        }
    }
}

async fn metrics(State(state): State<AppState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static(crate::ops::metrics::CONTENT_TYPE),
        )],
        state.metrics.encode(&state.store),
    )
        .into_response()
}

async fn healthz(State(state): State<AppState>) -> Response {
    if state.store.state().task_alive {
        Json(json!({"status": "ok"})).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "error", "reason": "refresh_task_stopped"})),
        )
            .into_response()
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct NotReady {
    status: &'static str,
    reason: &'static str,
    last_error: Option<Category>,
}

async fn readyz(State(state): State<AppState>) -> Response {
    let now = Instant::now();
    if let Some(token) = state.store.servable(now) {
        return Json(json!({"status": "ready", "expiresIn": token.remaining(now).as_secs()}))
            .into_response();
    }
    let reason = if state.store.current().is_some() {
        "token_expired"
    } else {
        "no_token_yet"
    };
    let body = NotReady {
        status: "not_ready",
        reason,
        last_error: state.store.state().last_error,
    };
    (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn min_ttl_table() {
        let d = |s| Ok(Some(Duration::from_secs(s)));
        type Case = (Option<&'static str>, Result<Option<Duration>, ApiError>);
        let cases: Vec<Case> = vec![
            (None, Ok(None)),
            (Some(""), Ok(None)),
            (Some("other=1"), Ok(None)),
            (Some("min_ttl=0"), d(0)),
            (Some("min_ttl=60"), d(60)),
            (Some("a=b&min_ttl=120"), d(120)),
            (Some("min_ttl=99999999999999999999999"), d(u64::MAX)),
            (Some("min_ttl="), Err(ApiError::InvalidMinTtl)),
            (Some("min_ttl=-1"), Err(ApiError::InvalidMinTtl)),
            (Some("min_ttl=1.5"), Err(ApiError::InvalidMinTtl)),
            (Some("min_ttl=+5"), Err(ApiError::InvalidMinTtl)),
            (Some("min_ttl=abc"), Err(ApiError::InvalidMinTtl)),
            (Some("min_ttl=%FF"), Err(ApiError::InvalidMinTtl)),
        ];
        for (query, expected) in cases {
            assert_eq!(min_ttl(query), expected, "{query:?}");
        }
    }

    /// The soak once caught `expiresIn: 0` with a 1 s margin: the token was
    /// judged with exactly 1 s left and its body counted from a later
    /// instant. The body must count from the instant of the judgement.
    #[tokio::test(start_paused = true)]
    async fn expires_in_counts_from_the_judgement_not_from_later() {
        use crate::secret::Secret;
        let margin = Duration::from_secs(1);
        for left in [
            margin,
            margin + Duration::from_nanos(1),
            margin + Duration::from_millis(999),
        ] {
            let judged_at = Instant::now();
            let token = Token::new(
                Secret::new("t"),
                judged_at,
                left,
                // A whole-second wall expiry: nothing is rounded off.
                std::time::UNIX_EPOCH + Duration::from_secs(1_800_000_000),
            );
            assert!(token.is_servable(judged_at, margin));
            // Time passes between the judgement and the body.
            tokio::time::advance(Duration::from_millis(1)).await;
            let response = token_response(&token, judged_at, false);
            let body = axum::body::to_bytes(response.into_body(), 1024)
                .await
                .unwrap();
            let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(body["expiresIn"], 1, "{left:?} left when judged");
        }
    }

    #[test]
    fn accept_table() {
        let cases = [
            (None, false),
            (Some("application/json"), false),
            (Some("text/plain"), true),
            (Some("TEXT/PLAIN; charset=utf-8"), true),
            (Some("text/html, text/plain;q=0.9"), true),
            (Some("application/json, text/plain"), false),
            (Some("text/plain, application/json"), true),
            (Some("*/*"), false),
            // q-values decide before order.
            (Some("text/plain;q=0, application/json"), false),
            (Some("text/plain; q=0.0, */*"), false),
            (Some("application/json;q=0.5, text/plain"), true),
            (Some("application/json, text/plain;q=0.9"), false),
            (Some("text/plain;q=0.9, application/json;q=0.8"), true),
            (Some("text/plain;q=0.5, */*"), false),
            (Some("*/*;q=0.1, text/plain"), true),
            // The most specific range wins: text/plain refused although
            // text/* is welcome.
            (Some("text/*, text/plain;q=0"), false),
            (Some("text/*"), true),
            (Some("text/*;q=0.5, application/*;q=0.4"), true),
            (Some("application/*"), false),
            // Both refused, garbage, odd spacing: JSON.
            (Some("text/plain;q=0, application/json;q=0"), false),
            (Some("text/plain;q=abc"), false),
            (Some("text/plain;q=2"), false),
            (Some("nonsense, ,;"), false),
            (Some(" text/plain ; q=1 "), true),
        ];
        for (accept, plain) in cases {
            let mut builder = http::Request::builder().uri("/token");
            if let Some(accept) = accept {
                builder = builder.header(header::ACCEPT, accept);
            }
            let request = builder.body(axum::body::Body::empty()).unwrap();
            assert_eq!(wants_plain_text(request.headers()), plain, "{accept:?}");
        }
    }
}
