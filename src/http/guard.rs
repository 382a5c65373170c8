//! The token routes' guard against SSRF and browsers.
//!
//! An app that can be tricked into fetching a URL (SSRF) or a web page
//! that makes the browser call `localhost` cannot add a custom header, and
//! a request that passed through a proxy is not from an app in this pod.
//! Every token response is also marked `Cache-Control: no-store`.

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http::{HeaderMap, HeaderName, HeaderValue, header};

use super::ApiError;

/// The header token requests must carry, with the value `true`.
pub const REQUIRED_HEADER: HeaderName = HeaderName::from_static("klavi-sidecar");
/// A header proxies add: its presence refuses the request.
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

/// Why a token request is refused, if it is.
fn refusal(headers: &HeaderMap, require_header: bool) -> Option<ApiError> {
    if headers.contains_key(X_FORWARDED_FOR) || headers.contains_key(header::FORWARDED) {
        Some(ApiError::ProxiedRequest)
    } else if require_header
        && !headers
            .get(REQUIRED_HEADER)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"true"))
    {
        Some(ApiError::MissingHeader)
    } else {
        None
    }
}

/// Whether a token request passes the guard.
pub fn passes(headers: &HeaderMap, require_header: bool) -> bool {
    refusal(headers, require_header).is_none()
}

/// Marks an answer as not cacheable.
pub fn no_store(response: &mut Response) {
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
}

/// Checks the headers, then marks the answer as not cacheable.
pub async fn token_route_guard(
    State(require_header): State<bool>,
    request: Request,
    next: Next,
) -> Response {
    let mut response = match refusal(request.headers(), require_header) {
        Some(error) => error.into_response(),
        None => next.run(request).await,
    };
    no_store(&mut response);
    response
}
