//! The Klavi client: one `POST {base_url}/payment/customer/v1/auth`.
//!
//! Turns Klavi's answer into a [`Token`] or a categorised [`FetchError`]:
//! status codes by SPEC section 3's table, `Retry-After`, bodies capped at
//! 64 KiB, the expiry read by [`crate::upstream::expiry`] and placed on the local
//! monotonic clock from the moment the request was sent.

use std::sync::Arc;
use std::time::Duration;

use http::header::{ACCEPT, CONTENT_TYPE, DATE, RETRY_AFTER};
use serde::Serialize;
use tokio::time::Instant;
use url::Url;

use crate::cache::source::{FetchError, TokenSource};
use crate::cache::token::Token;
use crate::clock::WallClock;
use crate::config::KlaviConfig;
use crate::upstream::credentials::Credentials;
use crate::upstream::error::InvalidResponse;
use crate::upstream::expiry::{self, MAX_BODY_BYTES, Timing};
use crate::upstream::retry_after::parse_retry_after;

/// `User-Agent` sent to Klavi.
pub const USER_AGENT: &str = concat!("klavi-token-sidecar/", env!("CARGO_PKG_VERSION"));

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct AuthRequest<'a> {
    access_key: &'a str,
    secret_key: &'a str,
}

/// Fetches tokens from Klavi.
pub struct KlaviClient {
    http: reqwest::Client,
    url: Url,
    /// The whole exchange, body included (`klavi.request_timeout_ms`).
    request_timeout: Duration,
    credentials: Arc<Credentials>,
    clock: Arc<dyn WallClock>,
    fallback_ttl: Duration,
}

impl std::fmt::Debug for KlaviClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KlaviClient")
            .field("url", &self.url.as_str())
            .finish_non_exhaustive()
    }
}

/// The HTTP clients auth requests go through. Building one loads the TLS
/// roots, which takes milliseconds, so profiles with the same connect
/// timeout and proxy rule share one (and its pool of connections to Klavi);
/// each request carries its profile's own request timeout.
#[derive(Debug, Default)]
pub struct HttpClients {
    built: Vec<((Duration, bool), reqwest::Client)>,
}

impl HttpClients {
    /// The client for a profile of `config`, built on first use.
    pub fn for_config(&mut self, config: &KlaviConfig) -> Result<reqwest::Client, reqwest::Error> {
        let loopback = match config.auth_url.host() {
            Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
            Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
            Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
            None => false,
        };
        let key = (config.connect_timeout, loopback);
        if let Some((_, client)) = self.built.iter().find(|(k, _)| *k == key) {
            return Ok(client.clone());
        }
        install_crypto_provider();
        let mut builder = reqwest::Client::builder()
            .user_agent(USER_AGENT)
            .connect_timeout(config.connect_timeout)
            // Never follow a redirect with the keys in the body.
            .redirect(reqwest::redirect::Policy::none())
            .pool_idle_timeout(Duration::from_secs(50));
        if loopback {
            // A proxy from the environment must not capture loopback calls.
            builder = builder.no_proxy();
        }
        let client = builder.build()?;
        self.built.push((key, client.clone()));
        Ok(client)
    }
}

impl KlaviClient {
    /// A client for `config.auth_url`, with an HTTP client of its own.
    pub fn new(
        config: &KlaviConfig,
        fallback_ttl: Duration,
        credentials: Arc<Credentials>,
        clock: Arc<dyn WallClock>,
    ) -> Result<Self, reqwest::Error> {
        let http = HttpClients::default().for_config(config)?;
        Ok(Self::over(http, config, fallback_ttl, credentials, clock))
    }

    /// A client for `config.auth_url` over `http` (shared with other
    /// profiles: see [`HttpClients`]).
    pub fn over(
        http: reqwest::Client,
        config: &KlaviConfig,
        fallback_ttl: Duration,
        credentials: Arc<Credentials>,
        clock: Arc<dyn WallClock>,
    ) -> Self {
        Self {
            http,
            url: config.auth_url.clone(),
            request_timeout: config.request_timeout,
            credentials,
            clock,
            fallback_ttl,
        }
    }

    async fn fetch_token(&self) -> Result<Token, FetchError> {
        let (access, secret) = self.credentials.current().await;
        let body = serde_json::to_vec(&AuthRequest {
            access_key: access.expose(),
            secret_key: secret.expose(),
        })
        .map_err(|e| FetchError::Transport(format!("cannot encode request: {e}")))?;

        let sent = Instant::now();
        let sent_wall = self.clock.now();
        let mut response = self
            .http
            .post(self.url.clone())
            .timeout(self.request_timeout)
            .header(ACCEPT, "application/json")
            .header(CONTENT_TYPE, "application/json")
            .body(body)
            .send()
            .await
            .map_err(transport_error)?;

        let status = response.status();
        let header = |name| {
            response
                .headers()
                .get(name)
                .and_then(|v: &http::HeaderValue| v.to_str().ok())
                .map(str::to_string)
        };
        let date_header = header(DATE).and_then(|d| httpdate::parse_http_date(&d).ok());
        if !status.is_success() {
            // A Retry-After date is on Klavi's clock: read it against
            // Klavi's Date, so a skewed Klavi clock cannot turn it into "now".
            let klavi_now = date_header.unwrap_or_else(|| self.clock.now());
            let retry_after = header(RETRY_AFTER).and_then(|v| parse_retry_after(&v, klavi_now));
            return Err(match status.as_u16() {
                401 | 403 => FetchError::CredentialsRejected {
                    status: status.as_u16(),
                },
                429 => FetchError::RateLimited { retry_after },
                other => FetchError::Status {
                    status: other,
                    retry_after,
                },
            });
        }

        if response
            .content_length()
            .is_some_and(|len| len > MAX_BODY_BYTES as u64)
        {
            return Err(InvalidResponse::TooLarge {
                limit: MAX_BODY_BYTES,
            }
            .into());
        }
        let mut bytes = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(transport_error)? {
            if bytes.len() + chunk.len() > MAX_BODY_BYTES {
                return Err(InvalidResponse::TooLarge {
                    limit: MAX_BODY_BYTES,
                }
                .into());
            }
            bytes.extend_from_slice(&chunk);
        }

        let parsed = expiry::parse_auth_body(&bytes)?;
        let timing = Timing {
            sent: sent_wall,
            received: self.clock.now(),
            date_header,
            elapsed: sent.elapsed(),
        };
        let resolved = expiry::resolve(&parsed, timing, self.fallback_ttl)?;
        if let Some(skew) = resolved.skew_secs {
            tracing::warn!(
                skew_secs = skew,
                "Klavi's Date header is off from the local clock; expiry placed on the local clock"
            );
        }
        if resolved.source == "fallback" {
            tracing::warn!(
                fallback_ttl_secs = self.fallback_ttl.as_secs(),
                "Klavi's response does not say when the token expires; assuming refresh.fallback_ttl_secs"
            );
        }
        tracing::debug!(
            expiry_source = resolved.source,
            lifetime_secs = resolved.lifetime.as_secs(),
            upstream_ms = sent.elapsed().as_millis() as u64,
            "Klavi answered with a token"
        );
        Ok(Token::new(
            parsed.access_token,
            sent,
            resolved.lifetime,
            resolved.expire_at,
        ))
    }
}

impl TokenSource for KlaviClient {
    async fn fetch(&self) -> Result<Token, FetchError> {
        self.fetch_token().await
    }
}

/// Makes rustls use ring (reqwest is built without a default provider).
/// Must run before any reqwest client is built; repeating it is harmless.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A transport failure, with its cause chain on one line (no secrets: the
/// URL carries none, the body is never included).
fn transport_error(error: reqwest::Error) -> FetchError {
    if error.is_timeout() {
        return FetchError::Timeout;
    }
    let mut message = error.to_string();
    let mut source = std::error::Error::source(&error);
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    FetchError::Transport(message)
}
