//! The token routes: `GET /token`, `POST /token/refresh` and
//! `POST /token/lease` for the default profile, `/profiles/{name}/…` for
//! any profile.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use tokio::time::Instant;

use super::accept::wants_plain_text;
use super::render::Rendered;
use super::{ApiError, AppState, Endpoint, PROFILE_TOKEN, TOKEN};
use crate::cache::source::Category;
use crate::cache::store::{Rejection, Unavailable, UnavailableReason};
use crate::config::DEFAULT_PROFILE;
use crate::ops::metrics::{ForcedOutcome, LeaseOutcome, MinTtlOutcome};
use crate::secret::Secret;

/// The largest `{"rejectedToken": …}` body read (SPEC §4.2).
const REJECTED_BODY_LIMIT: usize = 16 * 1024;

/// Says whether a reported token was the current one (`replaced`) or not
/// (`not_current`: already replaced, or not a token this profile holds,
/// say a typo), so a client can tell its report from a no-op.
const REJECTION_HEADER: http::HeaderName = http::HeaderName::from_static("klavi-sidecar-rejection");

fn rejection_header(rejection: Rejection) -> http::HeaderValue {
    http::HeaderValue::from_static(match rejection {
        Rejection::Marked => "replaced",
        Rejection::NotCurrent => "not_current",
    })
}

/// Whether a token route's path names a profile (`/profiles/{name}/…`)
/// rather than the default one (`/token…`).
fn names_a_profile(request: &Request) -> bool {
    request.uri().path().starts_with("/profiles/")
}

/// The endpoint a token route's path names, or 404 `unknown_profile`
/// (for `/token…`: there is no default profile). The name is taken from
/// the raw path, as the metrics and the hot path take it: profile names
/// never need percent-encoding, so an encoded one is no profile (rather
/// than one served under another's name, or a 400 in text).
fn endpoint(state: &AppState, request: &Request) -> Result<Arc<Endpoint>, ApiError> {
    let missing = if names_a_profile(request) {
        ApiError::UnknownProfile
    } else {
        ApiError::NoDefaultProfile
    };
    state
        .endpoints
        .for_path(request.uri().path())
        .cloned()
        .ok_or(missing)
}

/// `GET /token` and `GET /profiles/{name}/token` off the hot path.
pub(super) async fn get(State(state): State<AppState>, request: Request) -> Response {
    let route = if names_a_profile(&request) {
        PROFILE_TOKEN
    } else {
        TOKEN
    };
    match endpoint(&state, &request) {
        Ok(endpoint) => get_token(&endpoint, route, request).await,
        Err(error) => error.into_response(),
    }
}

/// `POST /token/refresh` and `POST /profiles/{name}/token/refresh`.
pub(super) async fn refresh(State(state): State<AppState>, request: Request) -> Response {
    match endpoint(&state, &request) {
        Ok(endpoint) => refresh_token(&endpoint, request).await,
        Err(error) => error.into_response(),
    }
}

/// `POST /token/lease` and `POST /profiles/{name}/token/lease`.
pub(super) async fn lease(State(state): State<AppState>, request: Request) -> Response {
    match endpoint(&state, &request) {
        Ok(endpoint) => lease_token(&endpoint, request).await,
        Err(error) => error.into_response(),
    }
}

/// A profile's route `suffix` (`/token`, `/token/lease`), as a client
/// calls it.
fn route_of(endpoint: &Endpoint, suffix: &str) -> String {
    match endpoint.profile.name() {
        DEFAULT_PROFILE => suffix.to_string(),
        name => format!("/profiles/{name}{suffix}"),
    }
}

/// 409 for a shared-token route on a single_use profile.
fn refuse_single_use(endpoint: &Endpoint) -> Option<Response> {
    endpoint.profile.store().is_single_use().then(|| {
        ApiError::SingleUseProfile {
            lease_route: route_of(endpoint, "/token/lease"),
        }
        .into_response()
    })
}

/// The rejected token a `POST /token/refresh` body names: `Ok(None)` for
/// no body (or whitespace, `{}`, a null `rejectedToken`).
fn rejected_token(body: &[u8]) -> Result<Option<Secret>, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    let value: serde_json::Value =
        serde_json::from_slice(body).map_err(|_| ApiError::InvalidBody("the body is not JSON"))?;
    let serde_json::Value::Object(fields) = value else {
        return Err(ApiError::InvalidBody("the body is not a JSON object"));
    };
    match fields.get("rejectedToken") {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(token)) => {
            // As an app may copy it from its Authorization header.
            // ASCII whitespace only: what openapi.yaml's pattern allows.
            let token = token.trim_matches(|c: char| c.is_ascii_whitespace());
            let after_scheme = token.get(6..).and_then(|rest| rest.chars().next());
            let token = match (token.get(..6), after_scheme) {
                (Some(scheme), Some(space))
                    if scheme.eq_ignore_ascii_case("bearer") && space.is_ascii_whitespace() =>
                {
                    // `get(..6)` succeeded: byte 6 is a character boundary.
                    token[6..].trim_start_matches(|c: char| c.is_ascii_whitespace())
                }
                _ => token,
            };
            if token.is_empty() {
                return Err(ApiError::InvalidBody(
                    "rejectedToken must be a non-empty string",
                ));
            }
            Ok(Some(Secret::new(token)))
        }
        Some(_) => Err(ApiError::InvalidBody(
            "rejectedToken must be a non-empty string",
        )),
    }
}

/// The request's body, up to 16 KiB (413 beyond; 400 if it breaks off).
async fn read_body(request: Request) -> Result<axum::body::Bytes, Response> {
    axum::body::to_bytes(request.into_body(), REJECTED_BODY_LIMIT)
        .await
        .map_err(|error| {
            if is_length_limit(&error) {
                ApiError::PayloadTooLarge.into_response()
            } else {
                ApiError::InvalidBody("the body could not be read").into_response()
            }
        })
}

/// Whether a body error is the length limit (413) rather than a broken
/// request (400).
fn is_length_limit(error: &axum::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = source {
        if e.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        source = e.source();
    }
    false
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
    if let Some(refused) = refuse_single_use(endpoint) {
        return refused;
    }
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
    if let Some(refused) = refuse_single_use(endpoint) {
        return refused;
    }
    let plain_text = wants_plain_text(request.headers());
    let body = match read_body(request).await {
        Ok(body) => body,
        Err(response) => return response,
    };
    let rejected = match rejected_token(&body) {
        Ok(rejected) => rejected,
        Err(error) => return error.into_response(),
    };
    let metrics = endpoint.profile.metrics();
    let store = endpoint.profile.store();
    let (result, rejection) = match rejected {
        Some(token) => {
            let digest = token.digest();
            drop(token);
            let (rejection, result) = store.replace_rejected(&digest).await;
            let current = rejection == Rejection::Marked;
            if current {
                metrics.rejected();
            }
            tracing::info!(
                profile = endpoint.profile.name(),
                fingerprint = digest.fingerprint(),
                current,
                "token reported rejected"
            );
            (result.map(|served| (served, !current)), Some(rejection))
        }
        None => (store.force_refresh().await, None),
    };
    match result {
        Ok((served, reused)) => {
            metrics.forced(if reused {
                ForcedOutcome::Reused
            } else {
                ForcedOutcome::Fetched
            });
            let mut response = endpoint
                .bodies
                .get(&served.token)
                .response(served.at, plain_text);
            if let Some(rejection) = rejection {
                response
                    .headers_mut()
                    .insert(REJECTION_HEADER, rejection_header(rejection));
            }
            response
        }
        Err(unavailable) => {
            metrics.forced(ForcedOutcome::Failed);
            // Held back by the auth budget, Klavi was never asked: that is
            // no upstream error (502) but a token unavailable (SPEC §5.10).
            // Held back by the budget, or nothing fetched for this report
            // (it named no current token): as GET /token would answer.
            let nothing_fetched = rejection == Some(Rejection::NotCurrent);
            let mut response =
                if unavailable.last_error == Some(Category::LocalRateLimit) || nothing_fetched {
                    ApiError::TokenUnavailable(unavailable).into_response()
                } else {
                    ApiError::UpstreamError(unavailable).into_response()
                };
            if let Some(rejection) = rejection {
                response
                    .headers_mut()
                    .insert(REJECTION_HEADER, rejection_header(rejection));
            }
            response
        }
    }
}

async fn lease_token(endpoint: &Endpoint, request: Request) -> Response {
    let store = endpoint.profile.store();
    if !store.is_single_use() {
        return ApiError::SharedProfile {
            token_route: route_of(endpoint, TOKEN),
        }
        .into_response();
    }
    let min = match min_ttl(request.uri().query()) {
        Ok(min) => min.unwrap_or(Duration::ZERO),
        Err(error) => return error.into_response(),
    };
    let plain_text = wants_plain_text(request.headers());
    // Read (and ignore) any body before a token is taken: one too large
    // is refused without using a token, and the connection stays usable.
    if let Err(response) = read_body(request).await {
        return response;
    }
    let metrics = endpoint.profile.metrics();
    match store.lease(min).await {
        Ok((served, waited)) => {
            metrics.lease(if waited {
                LeaseOutcome::Waited
            } else {
                LeaseOutcome::Pooled
            });
            tracing::debug!(
                profile = endpoint.profile.name(),
                fingerprint = served.fingerprint(),
                waited,
                "token leased"
            );
            // Each leased token is served once: rendered here, not cached.
            Rendered::of(&served.token).response(served.at, plain_text)
        }
        Err(Unavailable {
            reason: UnavailableReason::MinTtlUnsatisfiable { max_ttl_secs },
            ..
        }) => {
            metrics.lease(LeaseOutcome::Unsatisfiable);
            ApiError::MinTtlUnsatisfiable { max_ttl_secs }.into_response()
        }
        Err(unavailable) => {
            metrics.lease(LeaseOutcome::Unavailable);
            ApiError::TokenUnavailable(unavailable).into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejected_token_bodies() {
        let invalid = |why| Err(ApiError::InvalidBody(why));
        let cases: Vec<(&str, Result<Option<&str>, ApiError>)> = vec![
            ("", Ok(None)),
            (" \r\n", Ok(None)),
            ("{}", Ok(None)),
            (r#"{"rejectedToken": null}"#, Ok(None)),
            (r#"{"rejectedToken": "eyJ.a.b"}"#, Ok(Some("eyJ.a.b"))),
            (r#"{"rejectedToken": "t", "other": 1}"#, Ok(Some("t"))),
            (r#"{"rejectedToken": " t\n"}"#, Ok(Some("t"))),
            (
                r#"{"rejectedToken": "Bearer eyJ.a.b"}"#,
                Ok(Some("eyJ.a.b")),
            ),
            (r#"{"rejectedToken": "bearer  t"}"#, Ok(Some("t"))),
            (r#"{"rejectedToken": "Bearer\tt"}"#, Ok(Some("t"))),
            (r#"{"rejectedToken": "Bearert"}"#, Ok(Some("Bearert"))),
            (r#"{"rejectedToken": "é"}"#, Ok(Some("é"))),
            (r#"{"rejectedToken": "ébearer t"}"#, Ok(Some("ébearer t"))),
            // Byte 6 inside a character: no panic, no scheme.
            (r#"{"rejectedToken": "aéééé"}"#, Ok(Some("aéééé"))),
            // Only ASCII whitespace is trimmed (openapi.yaml says so).
            ("{\"rejectedToken\": \"\u{a0}\"}", Ok(Some("\u{a0}"))),
            ("{\"rejectedToken\": \"\u{85}\"}", Ok(Some("\u{85}"))),
            (r#"{"rejectedToken": "Bearer"}"#, Ok(Some("Bearer"))),
            (r#"{"rejectedToken": "Bearer "}"#, Ok(Some("Bearer"))),
            (
                r#"{"rejectedToken": "  "}"#,
                invalid("rejectedToken must be a non-empty string"),
            ),
            (
                r#"{"rejectedToken": ""}"#,
                invalid("rejectedToken must be a non-empty string"),
            ),
            (
                r#"{"rejectedToken": 5}"#,
                invalid("rejectedToken must be a non-empty string"),
            ),
            (r#"["t"]"#, invalid("the body is not a JSON object")),
            ("rejectedToken=t", invalid("the body is not JSON")),
            ("{\"rejectedToken\": \"t\"", invalid("the body is not JSON")),
        ];
        for (body, expected) in cases {
            let got = rejected_token(body.as_bytes());
            let got = got.map(|t| t.map(|t| t.expose().to_string()));
            assert_eq!(got, expected.map(|t| t.map(str::to_string)), "{body:?}");
        }
    }

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
