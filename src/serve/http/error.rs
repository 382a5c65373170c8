//! Every error the HTTP API answers, as one enum mapped to a status and a
//! `{"error": CODE, "message": TEXT, …}` body. Internal detail stays in the
//! logs.

use std::time::Duration;

use axum::Json;
use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode, header};
use serde::Serialize;

use crate::cache::source::Category;
use crate::cache::store::{Unavailable, UnavailableReason};

/// An error answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiError {
    /// Token route without `Klavi-Sidecar: true`.
    MissingHeader,
    /// Token route with `X-Forwarded-For` or `Forwarded`.
    ProxiedRequest,
    /// Token route with a `Host` that is neither loopback nor in
    /// `server.allowed_hosts` (DNS rebinding).
    HostNotAllowed,
    /// `min_ttl` is not a non-negative integer.
    InvalidMinTtl,
    /// `min_ttl` asks for more than a token fetched within
    /// `min_interval_secs` (or for this request) has left.
    MinTtlUnsatisfiable {
        /// Whole seconds the best token at hand has left.
        max_ttl_secs: u64,
    },
    /// No servable token could be had in time.
    TokenUnavailable(Unavailable),
    /// A forced refresh failed.
    UpstreamError(Unavailable),
    /// `/profiles/{name}/…` for a profile not configured.
    UnknownProfile,
    /// `/token…` while `[klavi]` has no keys (no default profile).
    NoDefaultProfile,
    /// No such route.
    NotFound,
    /// Route exists, method does not; the `Allow` header is kept.
    MethodNotAllowed,
    /// The request took longer than the server allows.
    RequestTimeout,
    /// The request body is over `server.max_body_bytes`.
    PayloadTooLarge,
    /// The body of `POST /token/refresh` is not `{"rejectedToken": "…"}`.
    InvalidBody(&'static str),
    /// A shared-token route on a single_use profile; names the lease route.
    SingleUseProfile {
        /// The profile's lease route.
        lease_route: String,
    },
    /// `POST /token/lease` on a shared profile; names the token route.
    SharedProfile {
        /// The profile's token route.
        token_route: String,
    },
    /// Proxy: no connection to Klavi could be made (connect or TLS
    /// failed); nothing was sent.
    UpstreamUnreachable,
    /// Proxy: the exchange with Klavi failed after the request was sent
    /// (reset, malformed answer): Klavi may have received it.
    UpstreamFailed,
    /// Proxy: `proxy.request_timeout_ms` ran out before Klavi answered.
    UpstreamTimeout,
    /// Proxy: an absolute-form, authority-form or `*` request target.
    NotOriginForm,
    /// Proxy: `CONNECT` (the proxy tunnels nothing).
    ConnectNotSupported,
    /// Proxy: the request body is over `proxy.max_body_bytes`.
    ProxyBodyTooLarge,
    /// Proxy: the request body could not be read (the client went away
    /// mid-body, or sent malformed chunks).
    BodyUnreadable,
    /// Proxy: a transfer coding other than plain `chunked`.
    UnsupportedTransferCoding,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Body {
    error: &'static str,
    message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    last_error: Option<Option<Category>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_ttl: Option<u64>,
}

/// The message of a 503 or 502: true to what happened, so it names a failed
/// attempt only when the last attempt failed (SPEC §4.1).
fn unavailable_message(u: &Unavailable, forced: bool) -> String {
    let what = if forced {
        "the forced refresh brought no token"
    } else {
        "no token with enough time left is available"
    };
    let why = match (u.reason, u.last_error) {
        (UnavailableReason::TaskStopped, _) => "the refresh task is not running",
        (_, Some(Category::LocalRateLimit)) => {
            "the auth budget (refresh.max_auth_per_minute) allows no request to Klavi before \
             refresh.wait_ms runs out"
        }
        (UnavailableReason::TakenByEarlierLeases, _) => {
            "every token fetched while this lease waited went to leases that asked earlier \
             (one auth request at a time, first come first served; a larger pool_size absorbs \
             bursts)"
        }
        (UnavailableReason::Timeout, None) => {
            "the request to Klavi did not finish within refresh.wait_ms"
        }
        (UnavailableReason::Timeout, Some(_)) => {
            "the last attempt to fetch a token from Klavi failed and no later one succeeded \
             within refresh.wait_ms"
        }
        (UnavailableReason::Failed, Some(_)) => {
            "the last attempt to fetch a token from Klavi failed and the next one is not due \
             within refresh.wait_ms"
        }
        (UnavailableReason::Failed, None) => {
            "Klavi's last answer brought no token with enough time left, and the next attempt \
             is not due within refresh.wait_ms"
        }
        (UnavailableReason::MinTtlUnsatisfiable { .. }, _) => {
            "min_ttl cannot be met (answered 422)"
        }
    };
    format!("{what}: {why}; see lastError and retry after Retry-After seconds")
}

impl ApiError {
    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::MissingHeader | Self::ProxiedRequest | Self::HostNotAllowed => {
                StatusCode::FORBIDDEN
            }
            Self::InvalidMinTtl => StatusCode::BAD_REQUEST,
            Self::MinTtlUnsatisfiable { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            Self::TokenUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::UpstreamError(_) => StatusCode::BAD_GATEWAY,
            Self::NotFound | Self::UnknownProfile | Self::NoDefaultProfile => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            Self::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::InvalidBody(_) => StatusCode::BAD_REQUEST,
            Self::SingleUseProfile { .. } | Self::SharedProfile { .. } => StatusCode::CONFLICT,
            Self::UpstreamUnreachable | Self::UpstreamFailed => StatusCode::BAD_GATEWAY,
            Self::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            Self::NotOriginForm | Self::BodyUnreadable | Self::UnsupportedTransferCoding => {
                StatusCode::BAD_REQUEST
            }
            Self::ConnectNotSupported => StatusCode::METHOD_NOT_ALLOWED,
            Self::ProxyBodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        }
    }

    /// The `error` code of the body (also the proxy's `Klavi-Sidecar-Error`).
    pub fn code(&self) -> &'static str {
        self.body().error
    }

    fn body(&self) -> Body {
        let plain = |error, message: &str| Body {
            error,
            message: message.to_string(),
            last_error: None,
            max_ttl: None,
        };
        match self {
            Self::MissingHeader => plain(
                "missing_header",
                "token requests must carry the header 'Klavi-Sidecar: true' (a guard against \
                 SSRF and browsers); add it to the request",
            ),
            Self::ProxiedRequest => plain(
                "proxied_request",
                "requests carrying X-Forwarded-For or Forwarded are refused: the token is only \
                 for apps in this pod, never for proxied callers",
            ),
            Self::HostNotAllowed => plain(
                "host_not_allowed",
                "the Host header is neither a loopback name (localhost, 127.0.0.1, [::1]) nor in \
                 server.allowed_hosts; token routes refuse it as a defence against DNS rebinding",
            ),
            Self::InvalidMinTtl => plain(
                "invalid_min_ttl",
                "min_ttl must be a non-negative whole number of seconds, e.g. ?min_ttl=60",
            ),
            Self::MinTtlUnsatisfiable { max_ttl_secs } => Body {
                error: "min_ttl_unsatisfiable",
                message: format!(
                    "min_ttl asks for more than the freshest token Klavi gave has left ({max_ttl_secs} \
                     s, see maxTtl); fetching again so soon would not do better, so ask for at \
                     most maxTtl"
                ),
                last_error: None,
                max_ttl: Some(*max_ttl_secs),
            },
            Self::TokenUnavailable(u) => Body {
                error: "token_unavailable",
                message: unavailable_message(u, false),
                last_error: Some(u.last_error),
                max_ttl: None,
            },
            Self::UpstreamError(u) => Body {
                error: "upstream_error",
                message: unavailable_message(u, true),
                last_error: Some(u.last_error),
                max_ttl: None,
            },
            Self::UnknownProfile => plain(
                "unknown_profile",
                "no profile of that name is configured; /readyz lists the profiles",
            ),
            Self::NoDefaultProfile => plain(
                "unknown_profile",
                "there is no default profile ([klavi] has no keys); use \
                 /profiles/{name}/token with a configured profile (/readyz lists them)",
            ),
            Self::NotFound => plain(
                "not_found",
                "no such route; the API is described in openapi.yaml",
            ),
            Self::MethodNotAllowed => plain(
                "method_not_allowed",
                "this route does not accept that method; the Allow header lists the ones it does",
            ),
            Self::RequestTimeout => plain("request_timeout", "the request took too long"),
            Self::InvalidBody(why) => Body {
                error: "invalid_body",
                message: format!(
                    "{why}; the body is optional, and if sent it is JSON like \
                     {{\"rejectedToken\": \"<the token Klavi answered 401 to>\"}}"
                ),
                last_error: None,
                max_ttl: None,
            },
            Self::SingleUseProfile { lease_route } => Body {
                error: "single_use_profile",
                message: format!(
                    "this profile is single_use: each token is handed out once, by POST \
                     {lease_route}"
                ),
                last_error: None,
                max_ttl: None,
            },
            Self::SharedProfile { token_route } => Body {
                error: "shared_profile",
                message: format!(
                    "this profile is shared: its one token is served by GET {token_route}; \
                     leases are for profiles with mode = \"single_use\""
                ),
                last_error: None,
                max_ttl: None,
            },
            Self::UpstreamUnreachable => plain(
                "upstream_unreachable",
                "no connection to Klavi could be made (connect or TLS failure); the request was \
                 not sent, so it is safe to retry",
            ),
            Self::UpstreamFailed => plain(
                "upstream_failed",
                "the connection to Klavi failed after the request was sent (reset or malformed \
                 answer); Klavi may have received it, so check before sending it again (the \
                 sidecar never resends)",
            ),
            Self::UpstreamTimeout => plain(
                "upstream_timeout",
                "Klavi did not answer within proxy.request_timeout_ms; it may have received the \
                 request, so check before sending it again (the sidecar never resends)",
            ),
            Self::NotOriginForm => plain(
                "invalid_target",
                "the request target must be a path (origin form), e.g. /payment/customer/v1/...; \
                 the proxy only forwards to its profile's Klavi base_url",
            ),
            Self::ConnectNotSupported => plain(
                "method_not_allowed",
                "CONNECT is not supported: the proxy forwards requests to its profile's Klavi \
                 only, it tunnels nothing",
            ),
            Self::ProxyBodyTooLarge => plain(
                "payload_too_large",
                "the request body is larger than proxy.max_body_bytes (bodies are buffered so a \
                 request can be replayed after a 401); nothing was sent to Klavi",
            ),
            Self::BodyUnreadable => plain(
                "invalid_body",
                "the request body could not be read (the client closed the connection or sent \
                 malformed chunks); nothing was sent to Klavi",
            ),
            Self::UnsupportedTransferCoding => plain(
                "invalid_body",
                "the only transfer coding the proxy takes is plain chunked (Transfer-Encoding: \
                 chunked); nothing was sent to Klavi",
            ),
            Self::PayloadTooLarge => plain(
                "payload_too_large",
                "the request body is larger than server.max_body_bytes, or than 16 KiB on the refresh and lease routes (the only body any route reads is POST /token/refresh's rejectedToken)",
            ),
        }
    }

    fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::TokenUnavailable(u) | Self::UpstreamError(u) => Some(u.retry_after),
            _ => None,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status(), Json(self.body())).into_response();
        if self == Self::ConnectNotSupported {
            response.headers_mut().insert(
                header::ALLOW,
                HeaderValue::from_static("GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"),
            );
        }
        if let Some(after) = self.retry_after() {
            // Whole seconds, rounded up, at least one.
            let secs = after.as_secs() + u64::from(after.subsec_nanos() > 0);
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    async fn render(error: ApiError) -> (StatusCode, Option<String>, serde_json::Value) {
        let response = error.into_response();
        let status = response.status();
        let retry = response
            .headers()
            .get(header::RETRY_AFTER)
            .map(|v| v.to_str().unwrap().to_string());
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        (status, retry, serde_json::from_slice(&bytes).unwrap())
    }

    #[tokio::test]
    async fn every_error_has_a_code_a_message_and_the_right_status() {
        let unavailable = Unavailable {
            reason: UnavailableReason::Failed,
            last_error: Some(Category::CredentialsRejected),
            retry_after: Duration::from_millis(2500),
        };
        let no_error = Unavailable {
            reason: UnavailableReason::Timeout,
            last_error: None,
            retry_after: Duration::ZERO,
        };
        let cases = [
            (ApiError::MissingHeader, 403, "missing_header", None),
            (ApiError::ProxiedRequest, 403, "proxied_request", None),
            (ApiError::HostNotAllowed, 403, "host_not_allowed", None),
            (ApiError::InvalidMinTtl, 400, "invalid_min_ttl", None),
            (
                ApiError::MinTtlUnsatisfiable { max_ttl_secs: 299 },
                422,
                "min_ttl_unsatisfiable",
                None,
            ),
            (
                ApiError::TokenUnavailable(unavailable),
                503,
                "token_unavailable",
                Some("3"),
            ),
            (
                ApiError::TokenUnavailable(no_error),
                503,
                "token_unavailable",
                Some("1"),
            ),
            (
                ApiError::UpstreamError(unavailable),
                502,
                "upstream_error",
                Some("3"),
            ),
            (ApiError::NotFound, 404, "not_found", None),
            (ApiError::UnknownProfile, 404, "unknown_profile", None),
            (ApiError::NoDefaultProfile, 404, "unknown_profile", None),
            (ApiError::MethodNotAllowed, 405, "method_not_allowed", None),
            (ApiError::RequestTimeout, 408, "request_timeout", None),
            (ApiError::PayloadTooLarge, 413, "payload_too_large", None),
            (ApiError::InvalidBody("not JSON"), 400, "invalid_body", None),
            (
                ApiError::UpstreamUnreachable,
                502,
                "upstream_unreachable",
                None,
            ),
            (ApiError::UpstreamFailed, 502, "upstream_failed", None),
            (ApiError::UpstreamTimeout, 504, "upstream_timeout", None),
            (ApiError::NotOriginForm, 400, "invalid_target", None),
            (
                ApiError::ConnectNotSupported,
                405,
                "method_not_allowed",
                None,
            ),
            (ApiError::ProxyBodyTooLarge, 413, "payload_too_large", None),
            (ApiError::BodyUnreadable, 400, "invalid_body", None),
            (
                ApiError::UnsupportedTransferCoding,
                400,
                "invalid_body",
                None,
            ),
            (
                ApiError::SingleUseProfile {
                    lease_route: "/token/lease".into(),
                },
                409,
                "single_use_profile",
                None,
            ),
            (
                ApiError::SharedProfile {
                    token_route: "/token".into(),
                },
                409,
                "shared_profile",
                None,
            ),
        ];
        for (error, status, code, retry) in cases {
            let (got_status, got_retry, body) = render(error.clone()).await;
            assert_eq!(got_status.as_u16(), status, "{error:?}");
            assert_eq!(got_retry.as_deref(), retry, "{error:?}");
            assert_eq!(body["error"], code);
            assert_eq!(error.code(), code);
            assert!(body["message"].as_str().is_some_and(|m| m.len() > 10));
        }
        let (_, _, body) = render(ApiError::TokenUnavailable(unavailable)).await;
        assert_eq!(body["lastError"], "credentials_rejected");
        let (_, _, body) = render(ApiError::TokenUnavailable(no_error)).await;
        assert!(body["lastError"].is_null() && body.as_object().unwrap().contains_key("lastError"));
        let (_, _, body) = render(ApiError::NotFound).await;
        assert!(!body.as_object().unwrap().contains_key("lastError"));
        let (_, _, body) = render(ApiError::MinTtlUnsatisfiable { max_ttl_secs: 299 }).await;
        assert_eq!(body["maxTtl"], 299);
    }

    /// Messages name a failed attempt only when the last attempt failed.
    #[test]
    fn messages_are_true_to_the_last_attempt() {
        let u = |reason, last_error| Unavailable {
            reason,
            last_error,
            retry_after: Duration::from_secs(1),
        };
        let upstream = Some(Category::UpstreamUnavailable);
        let budget = Some(Category::LocalRateLimit);
        // (unavailable, says "failed", mentions the budget)
        let cases = [
            (u(UnavailableReason::Timeout, None), false, false),
            (u(UnavailableReason::Failed, None), false, false),
            (u(UnavailableReason::Timeout, upstream), true, false),
            (u(UnavailableReason::Failed, upstream), true, false),
            (u(UnavailableReason::Failed, budget), false, true),
            (u(UnavailableReason::Timeout, budget), false, true),
        ];
        for (unavailable, failed, mentions_budget) in cases {
            for forced in [false, true] {
                let message = unavailable_message(&unavailable, forced);
                assert_eq!(
                    message.contains("failed"),
                    failed,
                    "{unavailable:?}: {message}"
                );
                assert_eq!(
                    message.contains("max_auth_per_minute"),
                    mentions_budget,
                    "{unavailable:?}: {message}"
                );
            }
        }
    }
}
