//! The proxy's client for Klavi: hyper-util's pooled client over rustls.
//!
//! Not reqwest (which the auth requests use): reqwest adds headers the app
//! did not send (`Accept: */*`), and the proxy forwards what the app sent.
//! Keep-alive connections are pooled per host; HTTP/2 is used when Klavi
//! offers it by ALPN; server certificates are checked against the
//! platform's roots, as reqwest does for auth requests; connecting is
//! bounded by the profile's `klavi.connect_timeout_ms`.

use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::upstream::klavi::install_crypto_provider;

/// How long an idle pooled connection to Klavi is kept: below the common
/// 60 s idle timeout of load balancers, so the pool rarely picks a
/// connection the other end is closing.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(50);

/// Why a request got no answer from Klavi.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// No connection could be made (refused, DNS, connect timeout, TLS):
    /// nothing was sent.
    #[error("cannot connect to Klavi: {0}")]
    Unreachable(String),
    /// The exchange failed after connecting: the request may have reached
    /// Klavi.
    #[error("the exchange with Klavi failed: {0}")]
    Failed(String),
}

/// A pooled client for Klavi, cheap to clone (clones share the pool).
#[derive(Clone)]
pub struct UpstreamClient {
    inner: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
}

impl std::fmt::Debug for UpstreamClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamClient").finish_non_exhaustive()
    }
}

impl UpstreamClient {
    /// A client whose connections take at most `connect_timeout` to open
    /// (TCP; the TLS handshake is bounded by the exchange's deadline).
    /// Loads the platform's roots, which takes milliseconds: build it off
    /// the runtime's threads.
    pub fn new(connect_timeout: Duration) -> Result<Self, rustls::Error> {
        install_crypto_provider();
        let mut http = HttpConnector::new();
        // https:// URIs pass through to the TLS layer.
        http.enforce_http(false);
        http.set_connect_timeout(Some(connect_timeout));
        http.set_nodelay(true);
        let https = HttpsConnectorBuilder::new()
            .try_with_platform_verifier()?
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http);
        let inner = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .build(https);
        Ok(Self { inner })
    }

    /// Sends `request` (an absolute URI on Klavi's host, its headers as
    /// forwarded) and returns Klavi's answer, its body still streaming.
    ///
    /// A pooled connection that Klavi closed before the request was
    /// written is retried on a new one by hyper-util; that is the only
    /// retry, and the request had not left.
    pub async fn send(
        &self,
        request: Request<Full<Bytes>>,
    ) -> Result<Response<Incoming>, SendError> {
        self.inner.request(request).await.map_err(|error| {
            let message = chain(&error);
            if error.is_connect() {
                SendError::Unreachable(message)
            } else {
                SendError::Failed(message)
            }
        })
    }
}

/// An error and its causes on one line (never a header or body: hyper's
/// errors carry neither).
fn chain(error: &dyn std::error::Error) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    message
}
