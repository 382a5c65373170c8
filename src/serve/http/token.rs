//! The token routes: `GET /token` and `POST /token/refresh` for the
//! default profile, `/profiles/{name}/…` for any profile.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use tokio::time::Instant;

use super::accept::wants_plain_text;
use super::{ApiError, AppState, Endpoint, PROFILE_TOKEN, TOKEN};
use crate::cache::source::Category;
use crate::cache::store::{Unavailable, UnavailableReason};
use crate::ops::metrics::{ForcedOutcome, MinTtlOutcome};

/// The endpoint of the default profile, or 404 `unknown_profile`.
fn default_endpoint(state: &AppState) -> Result<Arc<Endpoint>, ApiError> {
    state
        .endpoints
        .default_profile()
        .cloned()
        .ok_or(ApiError::NoDefaultProfile)
}

/// The endpoint `/profiles/{name}/…` names, or 404 `unknown_profile`. The
/// name is taken from the raw path, as the metrics and the hot path take
/// it: profile names never need percent-encoding, so an encoded one is no
/// profile (rather than one served under another's name, or a 400 in text).
fn named_endpoint(state: &AppState, request: &Request) -> Result<Arc<Endpoint>, ApiError> {
    state
        .endpoints
        .for_path(request.uri().path())
        .cloned()
        .ok_or(ApiError::UnknownProfile)
}

pub(super) async fn get_default(State(state): State<AppState>, request: Request) -> Response {
    match default_endpoint(&state) {
        Ok(endpoint) => get_token(&endpoint, TOKEN, request).await,
        Err(error) => error.into_response(),
    }
}

pub(super) async fn get_named(State(state): State<AppState>, request: Request) -> Response {
    match named_endpoint(&state, &request) {
        Ok(endpoint) => get_token(&endpoint, PROFILE_TOKEN, request).await,
        Err(error) => error.into_response(),
    }
}

pub(super) async fn refresh_default(State(state): State<AppState>, request: Request) -> Response {
    match default_endpoint(&state) {
        Ok(endpoint) => refresh_token(&endpoint, request).await,
        Err(error) => error.into_response(),
    }
}

pub(super) async fn refresh_named(State(state): State<AppState>, request: Request) -> Response {
    match named_endpoint(&state, &request) {
        Ok(endpoint) => refresh_token(&endpoint, request).await,
        Err(error) => error.into_response(),
    }
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

async fn get_token(endpoint: &Endpoint, route: &str, request: Request) -> Response {
    let min = match min_ttl(request.uri().query()) {
        Ok(min) => min,
        Err(error) => return error.into_response(),
    };
    let plain_text = wants_plain_text(request.headers());
    let store = endpoint.profile.store();
    let metrics = endpoint.profile.metrics();
    let now = Instant::now();
    // The hot path: one atomic load.
    let held = store.servable(now);
    if let Some(token) = &held
        && min.is_none_or(|min| token.remaining(now) >= min)
    {
        return endpoint.bodies.get(token).response(now, plain_text);
    }
    metrics.waited(route);
    let result = store.token_with(min.unwrap_or(Duration::ZERO)).await;
    if held.is_some() {
        // A servable token was held, so only min_ttl made this wait.
        metrics.min_ttl_refresh(match &result {
            Ok(_) => MinTtlOutcome::Served,
            Err(u) if matches!(u.reason, UnavailableReason::MinTtlUnsatisfiable { .. }) => {
                MinTtlOutcome::Unsatisfiable
            }
            Err(_) => MinTtlOutcome::Unavailable,
        });
    }
    match result {
        Ok(served) => endpoint
            .bodies
            .get(&served.token)
            .response(served.at, plain_text),
        Err(Unavailable {
            reason: UnavailableReason::MinTtlUnsatisfiable { max_ttl_secs },
            ..
        }) => ApiError::MinTtlUnsatisfiable { max_ttl_secs }.into_response(),
        Err(unavailable) => ApiError::TokenUnavailable(unavailable).into_response(),
    }
}

async fn refresh_token(endpoint: &Endpoint, request: Request) -> Response {
    let plain_text = wants_plain_text(request.headers());
    let metrics = endpoint.profile.metrics();
    match endpoint.profile.store().force_refresh().await {
        Ok((served, reused)) => {
            metrics.forced(if reused {
                ForcedOutcome::Reused
            } else {
                ForcedOutcome::Fetched
            });
            endpoint
                .bodies
                .get(&served.token)
                .response(served.at, plain_text)
        }
        Err(unavailable) => {
            metrics.forced(ForcedOutcome::Failed);
            // Held back by the auth budget, Klavi was never asked: that is
            // no upstream error (502) but a token unavailable (SPEC §5.10).
            if unavailable.last_error == Some(Category::LocalRateLimit) {
                ApiError::TokenUnavailable(unavailable).into_response()
            } else {
                ApiError::UpstreamError(unavailable).into_response()
            }
        }
    }
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
}
