//! The `GET /token` hot path, answered without the router.
//!
//! A plain `GET /token` or `GET /profiles/{name}/token` (no query, no body)
//! that passes the guard while the profile holds a servable token gets the
//! token at once. It applies the router path's own rules, not copies of
//! them: the same [`Guard`](super::Guard), the same rendered bodies and
//! headers, the same request counter (its label set kept as a handle), the
//! same span and event. Anything else (an error to report, `min_ttl`, no
//! servable token, an unknown profile) goes on to the router.

use std::sync::Arc;

use http::header;
use tokio::time::Instant;

use super::accept::wants_plain_text;
use super::{AppState, PROFILE_TOKEN, TOKEN, request_finished, request_span};
use crate::serve::server::FastPath;

/// The hot path over `state`'s profiles.
pub fn token_fast_path(state: AppState) -> FastPath {
    Arc::new(move |request| {
        if request.method() != http::Method::GET || request.uri().query().is_some() {
            return None;
        }
        let path = request.uri().path();
        let (endpoint, route, (counter, latency)) = if path == TOKEN {
            let e = state.endpoints.default_profile()?;
            (e, TOKEN, e.default_route.as_ref()?)
        } else {
            let name = path.strip_prefix("/profiles/")?.strip_suffix(TOKEN)?;
            let e = state.endpoints.get(name)?;
            (e, PROFILE_TOKEN, &e.named_route)
        };
        let headers = request.headers();
        if !state.guard.passes(request)
            || headers.contains_key(header::TRANSFER_ENCODING)
            || headers
                .get(header::CONTENT_LENGTH)
                .is_some_and(|length| length.as_bytes() != b"0")
        {
            return None;
        }
        let now = Instant::now();
        let token = endpoint.profile.store().servable(now)?;
        let response = endpoint
            .bodies
            .get(&token)
            .response(now, wants_plain_text(headers));
        let took = now.elapsed();
        counter.inc();
        latency.observe(took.as_secs_f64());
        if tracing::enabled!(tracing::Level::DEBUG) {
            let span = request_span(request.method(), route);
            let _entered = span.enter();
            request_finished(200, took);
        }
        Some(response)
    })
}
