//! One proxied request: checked, buffered, sent with the profile's token,
//! replayed once after a 401 with a fresh one, and answered (SPEC §4.3).
//!
//! Klavi is called at most twice per request, and twice only after a 401
//! (guarantee 13): a timeout, a reset or a 5xx is answered as it is, never
//! resent, since the request may have been a payment Klavi received. A
//! single_use profile leases a token for the request and another for its
//! replay; a shared one reports the refused token rejected, which fetches
//! one replacement however many requests saw the 401 at once.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::request::Parts;
use http::{HeaderValue, StatusCode, Uri};
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::Histogram;
use tokio::time::Instant;
use url::Url;

use super::client::{SendError, UpstreamClient};
use super::deadline::DeadlineBody;
use super::headers;
use super::target::{self, TargetError, upstream_uri};
use crate::cache::store::{Rejection, Served, Unavailable, UnavailableReason};
use crate::cache::token::Token;
use crate::ops::metrics::ProxyOutcome;
use crate::profile::Profile;
use crate::secret::TokenDigest;
use crate::serve::http::{ApiError, Guard};
use crate::serve::listener::Peer;

pub use super::headers::SIDECAR_ERROR;

/// Response headers that carry Klavi's id for a request, in the order
/// looked for; the first found goes in the access log.
const REQUEST_ID_HEADERS: [&str; 3] = ["x-request-id", "request-id", "x-correlation-id"];

/// Longest request id and path kept in the access log.
const LOGGED_MAX: usize = 256;

/// How much of a 401's body is read so its connection can be reused.
const DRAINED_MAX: usize = 64 * 1024;

/// What one profile's proxy forwards with.
#[derive(Debug)]
pub struct Forwarder {
    profile: Arc<Profile>,
    /// The profile's name, shared with the bodies it streams.
    name: Arc<str>,
    base: Url,
    host: HeaderValue,
    client: UpstreamClient,
    guard: Guard,
    max_body_bytes: usize,
    timeout: Duration,
    access_log: bool,
    /// The proxy's metric handles kept for every request.
    counted: Counted,
    /// The `Authorization` value of the last token sent.
    bearer: std::sync::Mutex<Option<(TokenDigest, HeaderValue)>>,
}

/// The metric handles every request uses, kept (created at zero with
/// the listener, so dashboards see the proxy before its first request).
#[derive(Debug)]
struct Counted {
    /// 200 from Klavi, no replay: most requests.
    forwarded_ok: Counter,
    duration: Histogram,
}

/// The settings of one profile's proxy.
#[derive(Debug, Clone)]
pub struct ForwarderConfig {
    /// The profile's `base_url`.
    pub base: Url,
    /// What requests must satisfy (the token routes' guard).
    pub guard: Guard,
    /// `proxy.max_body_bytes`.
    pub max_body_bytes: usize,
    /// `proxy.request_timeout_ms`.
    pub timeout: Duration,
    /// `proxy.access_log`.
    pub access_log: bool,
}

impl Forwarder {
    /// The proxy of `profile`, sending through `client`; `None` when the
    /// base URL has no host (configuration refuses such URLs).
    pub fn new(
        profile: Arc<Profile>,
        client: UpstreamClient,
        config: ForwarderConfig,
    ) -> Option<Self> {
        let host = target::authority(&config.base)?;
        let (forwarded_ok, duration) = profile.metrics().proxied();
        let counted = Counted {
            forwarded_ok,
            duration,
        };
        Some(Self {
            counted,
            name: Arc::from(profile.name()),
            profile,
            host: HeaderValue::from_str(&host).ok()?,
            base: config.base,
            client,
            guard: config.guard,
            max_body_bytes: config.max_body_bytes,
            timeout: config.timeout,
            access_log: config.access_log,
            bearer: std::sync::Mutex::new(None),
        })
    }

    /// Largest request body (for the router's limit layer).
    pub fn max_body_bytes(&self) -> usize {
        self.max_body_bytes
    }
}

/// How a request was answered, for the log and the metrics.
struct Answer {
    response: Response,
    outcome: ProxyOutcome,
    /// The token of the request whose answer the app gets.
    token: Option<Arc<Token>>,
}

impl Answer {
    fn sidecar(error: ApiError) -> Self {
        Self {
            response: sidecar_error(error),
            outcome: ProxyOutcome::SidecarError,
            token: None,
        }
    }
}

/// An error made by the sidecar: the JSON error body, marked with
/// `Klavi-Sidecar-Error` so the app can tell it from Klavi's answers.
pub fn sidecar_error(error: ApiError) -> Response {
    let code = error.code();
    let mut response = error.into_response();
    response
        .headers_mut()
        .insert(SIDECAR_ERROR, HeaderValue::from_static(code));
    response
}

/// The handler of every request on a proxy listener.
pub async fn forward(State(forwarder): State<Arc<Forwarder>>, request: Request) -> Response {
    let started = Instant::now();
    let method = request.method().clone();
    let path = logged(request.uri().path()).to_string();
    let peer = request.extensions().get::<Peer>().copied();
    let answer = forwarder.answer(request, started).await;
    let took = started.elapsed();
    let status = answer.response.status().as_u16();
    // A status with no registered meaning counts as 0: whatever Klavi
    // sends, the label's values stay few.
    let label = if answer.response.status().canonical_reason().is_some() {
        status
    } else {
        0
    };
    let counted = &forwarder.counted;
    if status == 200 && answer.outcome == ProxyOutcome::Forwarded {
        counted.forwarded_ok.inc();
    } else {
        forwarder
            .profile
            .metrics()
            .proxy_counter(label, answer.outcome)
            .inc();
    }
    counted.duration.observe(took.as_secs_f64());
    if forwarder.access_log {
        let request_id = REQUEST_ID_HEADERS
            .iter()
            .find_map(|name| answer.response.headers().get(*name))
            .and_then(|value| value.to_str().ok())
            .map(logged);
        let error = answer
            .response
            .headers()
            .get(SIDECAR_ERROR)
            .and_then(|v| v.to_str().ok());
        // Display (`%`) rather than the quoted, escaped form: this line is
        // written for every request, and none of these values needs
        // quoting (a path has no spaces, the rest are codes and hex).
        tracing::info!(
            profile = %forwarder.profile.name(),
            method = %method,
            path = %path,
            status,
            duration_ms = took.as_millis() as u64,
            token = %answer.token.as_ref().map_or("none", |t| t.fingerprint()),
            replayed = answer.outcome == ProxyOutcome::Replayed,
            klavi_request_id = request_id.unwrap_or_default(),
            sidecar_error = %error.unwrap_or("none"),
            peer = %peer.as_ref().map_or(&"unknown" as &dyn std::fmt::Display, |p| p),
            "proxied"
        );
    }
    answer.response
}

/// At most [`LOGGED_MAX`] bytes of `text`, cut at a character boundary.
fn logged(text: &str) -> &str {
    if text.len() <= LOGGED_MAX {
        return text;
    }
    let mut end = LOGGED_MAX;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

impl Forwarder {
    /// One deadline for the whole exchange (one timer): reading the app's
    /// body, the token, the request, a replay. Which step it caught says
    /// whose fault it was: the app's slow body (408) or Klavi (504).
    async fn answer(&self, request: Request, started: Instant) -> Answer {
        let deadline = started + self.timeout;
        let uri = match upstream_uri(&self.base, request.method(), request.uri()) {
            Ok(uri) => uri,
            Err(TargetError::Connect) => return Answer::sidecar(ApiError::ConnectNotSupported),
            Err(TargetError::NotOriginForm) => return Answer::sidecar(ApiError::NotOriginForm),
        };
        if let Some(refused) =
            self.guard
                .refusal(request.version(), request.uri(), request.headers())
        {
            return Answer::sidecar(refused);
        }
        if !plain_chunked(request.headers()) {
            return Answer::sidecar(ApiError::UnsupportedTransferCoding);
        }
        let body_read = AtomicBool::new(false);
        let exchange = async {
            let (parts, body) = request.into_parts();
            let body = read_body(body).await?;
            body_read.store(true, Ordering::Relaxed);
            self.exchange(&parts, &uri, body, deadline).await
        };
        match tokio::time::timeout_at(deadline, exchange).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(error)) => Answer::sidecar(error),
            Err(_) if body_read.load(Ordering::Relaxed) => {
                Answer::sidecar(ApiError::UpstreamTimeout)
            }
            Err(_) => Answer::sidecar(ApiError::RequestTimeout),
        }
    }

    /// The request sent with a token, and once more with a fresh one if
    /// Klavi answers 401 (the caller bounds it by `deadline`; the body of
    /// the answer passed on is bounded by it too).
    async fn exchange(
        &self,
        parts: &Parts,
        uri: &Uri,
        body: Bytes,
        deadline: Instant,
    ) -> Result<Answer, ApiError> {
        let store = self.profile.store();
        let first = self.token().await?;
        let response = self.send(parts, uri, &first, body.clone()).await?;
        if response.status() != StatusCode::UNAUTHORIZED {
            return Ok(self.pass(response, &first, ProxyOutcome::Forwarded, deadline));
        }
        // Klavi refused the token: read what little it said, so the
        // connection can carry the replay, then replay once.
        let _ = Limited::new(response.into_body(), DRAINED_MAX)
            .collect()
            .await;
        let second = if store.is_single_use() {
            let _ = store.reject(first.digest());
            self.token().await?
        } else {
            let (rejection, replacement) = store.replace_rejected(first.digest()).await;
            self.report(rejection, &first);
            replacement.map_err(ApiError::TokenUnavailable)?
        };
        if second.digest() == first.digest() {
            // Never the case (a rejected token is never served), but a
            // replay with the refused token would be a wasted request.
            return Err(ApiError::TokenUnavailable(Unavailable {
                reason: UnavailableReason::Failed,
                last_error: None,
                retry_after: Duration::from_secs(1),
            }));
        }
        let response = self.send(parts, uri, &second, body).await?;
        if response.status() == StatusCode::UNAUTHORIZED {
            // Refused too: that token is not used again either (its
            // replacement is fetched for the next request, not awaited).
            self.report(store.reject(second.digest()), &second);
        }
        Ok(self.pass(response, &second, ProxyOutcome::Replayed, deadline))
    }

    /// Counts and logs a report of a rejected token that was the
    /// profile's current one.
    fn report(&self, rejection: Rejection, token: &Served) {
        if rejection == Rejection::Marked {
            self.profile.metrics().rejected();
            tracing::info!(
                profile = self.profile.name(),
                token = token.fingerprint(),
                "Klavi answered 401 to a proxied request; the token is rejected and replaced"
            );
        }
    }

    /// A token for one request: a lease on a single_use profile, the
    /// shared token otherwise.
    async fn token(&self) -> Result<Served, ApiError> {
        let store = self.profile.store();
        let served = if store.is_single_use() {
            store.lease(Duration::ZERO).await.map(|(served, _)| served)
        } else {
            let now = Instant::now();
            match store.servable(now) {
                // The common case, without the wait's bookkeeping.
                Some(token) => Ok(Served { token, at: now }),
                None => store.token_with(Duration::ZERO).await,
            }
        };
        served.map_err(|u: Unavailable| ApiError::TokenUnavailable(u))
    }

    /// `Bearer <token>`, built once per token (the last one is kept).
    fn bearer(&self, token: &Served) -> Result<HeaderValue, ApiError> {
        let mut last = self
            .bearer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((digest, value)) = last.as_ref()
            && digest == token.digest()
        {
            return Ok(value.clone());
        }
        // A token that is no header value (Klavi's are JWTs) cannot be
        // sent; nothing leaves.
        let mut value = HeaderValue::try_from(format!("Bearer {}", token.value().expose()))
            .map_err(|_| ApiError::UpstreamUnreachable)?;
        value.set_sensitive(true);
        *last = Some((*token.digest(), value.clone()));
        Ok(value)
    }

    /// Sends the request to Klavi with `token`.
    async fn send(
        &self,
        parts: &Parts,
        uri: &Uri,
        token: &Served,
        body: Bytes,
    ) -> Result<http::Response<Incoming>, ApiError> {
        let bearer = self.bearer(token)?;
        let mut request = http::Request::new(Full::new(body));
        *request.method_mut() = parts.method.clone();
        *request.uri_mut() = uri.clone();
        *request.headers_mut() = headers::to_klavi(&parts.headers, self.host.clone(), bearer);
        let response = self.client.send(request).await.map_err(|error| {
            tracing::warn!(profile = self.profile.name(), %error, "proxied request got no answer from Klavi");
            match error {
                SendError::Unreachable(_) => ApiError::UpstreamUnreachable,
                SendError::Failed(_) => ApiError::UpstreamFailed,
            }
        })?;
        if response.status() == StatusCode::SWITCHING_PROTOCOLS {
            // The proxy tunnels nothing, and the app asked for no upgrade
            // (Upgrade is not forwarded): not an answer to pass on.
            tracing::warn!(
                profile = self.profile.name(),
                "Klavi answered 101 Switching Protocols to a proxied request; answered 502"
            );
            return Err(ApiError::UpstreamFailed);
        }
        Ok(response)
    }

    /// Klavi's answer for the app: its headers (hop-by-hop ones dropped,
    /// the token's fingerprint added) and its body, streamed until the
    /// deadline.
    fn pass(
        &self,
        response: http::Response<Incoming>,
        token: &Served,
        outcome: ProxyOutcome,
        deadline: Instant,
    ) -> Answer {
        let (parts, body) = response.into_parts();
        let body = DeadlineBody::new(body, deadline).on_error(Arc::clone(&self.name));
        let mut answer = Response::new(Body::new(body));
        *answer.status_mut() = parts.status;
        *answer.headers_mut() = headers::to_app(parts.headers, token.fingerprint());
        Answer {
            response: answer,
            outcome,
            token: Some(Arc::clone(&token.token)),
        }
    }
}

/// Whether the request's transfer coding, if any, is plain `chunked`:
/// hyper removes the chunking, and any other coding (`gzip, chunked`)
/// would reach Klavi undeclared once the header is dropped.
fn plain_chunked(headers: &http::HeaderMap) -> bool {
    headers
        .get_all(http::header::TRANSFER_ENCODING)
        .iter()
        .all(|value| {
            value
                .as_bytes()
                .trim_ascii()
                .eq_ignore_ascii_case(b"chunked")
        })
}

/// The whole request body (the router's limit layer caps it at
/// `proxy.max_body_bytes`).
async fn read_body(body: Body) -> Result<Bytes, ApiError> {
    match body.collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(error) => {
            let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&error);
            while let Some(e) = cause {
                if e.is::<LengthLimitError>() {
                    return Err(ApiError::ProxyBodyTooLarge);
                }
                cause = e.source();
            }
            Err(ApiError::BodyUnreadable)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logged_text_is_cut_at_a_character_boundary() {
        let long_ascii = "a".repeat(300);
        let multibyte = format!("{}é", "a".repeat(LOGGED_MAX - 1));
        // (text, logged length)
        let cases: [(&str, usize); 4] = [
            ("/payment/customer/v1/payments", 29),
            ("", 0),
            (&long_ascii, LOGGED_MAX),
            // 'é' takes two bytes and would straddle the limit.
            (&multibyte, LOGGED_MAX - 1),
        ];
        for (text, len) in cases {
            assert_eq!(logged(text).len(), len, "{text}");
        }
    }

    #[tokio::test]
    async fn bodies_over_the_limit_and_broken_ones_are_told_apart() {
        // What tower-http's limit layer hands the handler: the body
        // wrapped in http-body-util's Limited.
        let read = |limit: usize, body: Body| async move {
            read_body(Body::new(Limited::new(body, limit)))
                .await
                .map(|b| b.len())
        };
        let stream = |chunks: Vec<Result<Bytes, std::io::Error>>| {
            let (mut tx, body) = http_body_util::channel::Channel::<Bytes, std::io::Error>::new(8);
            tokio::spawn(async move {
                for chunk in chunks {
                    match chunk {
                        Ok(bytes) => {
                            let _ = tx.send_data(bytes).await;
                        }
                        Err(error) => {
                            tx.abort(error);
                            return;
                        }
                    }
                }
            });
            Body::new(body)
        };
        let ok = |n: usize| Ok(Bytes::from(vec![b'x'; n]));
        assert_eq!(read(10, stream(vec![ok(4), ok(6)])).await, Ok(10));
        assert_eq!(
            read(10, stream(vec![ok(4), ok(7)])).await,
            Err(ApiError::ProxyBodyTooLarge)
        );
        assert_eq!(
            read(10, stream(vec![ok(4), Err(std::io::Error::other("gone"))])).await,
            Err(ApiError::BodyUnreadable)
        );
    }
}

#[cfg(test)]
mod transfer_coding_tests {
    use super::*;

    #[test]
    fn only_plain_chunked_is_accepted() {
        // (Transfer-Encoding values, accepted)
        let cases: [(&[&str], bool); 6] = [
            (&[], true),
            (&["chunked"], true),
            (&[" Chunked "], true),
            (&["gzip, chunked"], false),
            (&["gzip", "chunked"], false),
            (&["identity"], false),
        ];
        for (values, accepted) in cases {
            let mut headers = http::HeaderMap::new();
            for value in values {
                headers.append(
                    http::header::TRANSFER_ENCODING,
                    HeaderValue::from_static(value),
                );
            }
            assert_eq!(plain_chunked(&headers), accepted, "{values:?}");
        }
    }
}
