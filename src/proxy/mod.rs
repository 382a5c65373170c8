//! The proxy (SPEC §4.3): apps send Klavi requests to the sidecar with no
//! token, and it forwards them with one.
//!
//! - [`target`]: which request targets are forwarded (origin form only)
//!   and the upstream URI each becomes under the profile's `base_url`;
//! - [`headers`]: the headers forwarded each way (hop-by-hop ones dropped,
//!   `Host` Klavi's, `Authorization` the sidecar's, `Klavi-Sidecar`
//!   removed, everything else unchanged);
//! - [`client`]: the pooled client for Klavi (hyper-util, rustls, ALPN);
//! - [`forward`]: one request, its 401 replay, the access log and metrics;
//! - [`deadline`]: a streamed response body cut at the exchange's deadline.

pub mod client;
pub mod deadline;
pub mod forward;
pub mod headers;
pub mod target;

use std::sync::Arc;

use axum::Router;
use axum::middleware;
use axum::response::Response;
use http::StatusCode;
use tower_http::limit::RequestBodyLimitLayer;

pub use forward::{Forwarder, ForwarderConfig, SIDECAR_ERROR};

use crate::serve::http::ApiError;

/// A profile's proxy listener: every path and method goes to
/// [`forward::forward`]; bodies over `proxy.max_body_bytes` are refused
/// by tower-http's limit (413 before anything reaches Klavi).
pub fn proxy_router(forwarder: Arc<Forwarder>) -> Router {
    let limit = forwarder.max_body_bytes();
    Router::new()
        .fallback(forward::forward)
        .layer(RequestBodyLimitLayer::new(limit))
        .layer(middleware::map_response(explain_bare_413))
        .with_state(forwarder)
}

/// The limit layer answers a declared `Content-Length` over the limit
/// with a bare 413; it gets the sidecar's error body and header. Klavi's
/// own 413s (which carry the token fingerprint) pass unchanged.
async fn explain_bare_413(response: Response) -> Response {
    let ours = response.status() == StatusCode::PAYLOAD_TOO_LARGE
        && !response.headers().contains_key(headers::TOKEN_FINGERPRINT)
        && !response.headers().contains_key(SIDECAR_ERROR);
    if ours {
        forward::sidecar_error(ApiError::ProxyBodyTooLarge)
    } else {
        response
    }
}
