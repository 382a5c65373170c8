//! Where tokens come from, as the cache sees it: a [`TokenSource`] and what
//! can go wrong when asking it.
//!
//! Callers need the *category* (it decides the next attempt and is what
//! `/readyz`, error bodies and metrics report); the variants keep the detail
//! for the logs. No variant carries a key or a token.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::token::Token;

/// Where tokens come from: the Klavi client in production, scripted
/// sources in tests (and, wrapping the Klavi client, the fleet's Redis).
pub trait TokenSource: Send + Sync + 'static {
    /// Asks for a new token. Must apply its own timeouts.
    fn fetch(&self) -> impl Future<Output = Result<Token, FetchError>> + Send;

    /// The jitter (in `[0, 1)`) of the refresh schedule of `token`, which
    /// this source just returned, given a `drawn` uniform one. Most
    /// sources keep it; the fleet's moves who refreshes first.
    fn schedule_jitter(&self, token: &Token, drawn: f64) -> f64 {
        let _ = token;
        drawn
    }
}

impl<T: TokenSource> TokenSource for Arc<T> {
    fn fetch(&self) -> impl Future<Output = Result<Token, FetchError>> + Send {
        (**self).fetch()
    }

    fn schedule_jitter(&self, token: &Token, drawn: f64) -> f64 {
        (**self).schedule_jitter(token, drawn)
    }
}

/// The error categories of SPEC section 3, as reported to clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Category {
    /// Klavi answered 401 or 403.
    CredentialsRejected,
    /// Klavi answered 429.
    RateLimited,
    /// Klavi could not be reached, timed out or answered another error.
    UpstreamUnavailable,
    /// Klavi answered 2xx with something that is not a usable token.
    InvalidResponse,
    /// Not an answer from Klavi: the profile's auth budget
    /// (`refresh.max_auth_per_minute`) holds the next fetch back beyond the
    /// request's wait (SPEC §5.10).
    LocalRateLimit,
}

impl Category {
    /// The categories of a failed attempt to fetch a token (everything but
    /// [`Category::LocalRateLimit`], which no attempt ends with).
    pub const UPSTREAM: [Self; 4] = [
        Self::CredentialsRejected,
        Self::RateLimited,
        Self::UpstreamUnavailable,
        Self::InvalidResponse,
    ];

    /// The snake_case name used in JSON bodies, logs and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::CredentialsRejected => "credentials_rejected",
            Self::RateLimited => "rate_limited",
            Self::UpstreamUnavailable => "upstream_unavailable",
            Self::InvalidResponse => "invalid_response",
            Self::LocalRateLimit => "local_rate_limit",
        }
    }
}

impl fmt::Display for Category {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A failed attempt to fetch a token.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// 401 or 403.
    #[error("Klavi rejected the credentials (HTTP {status})")]
    CredentialsRejected {
        /// The HTTP status.
        status: u16,
    },
    /// 429.
    #[error("Klavi is rate limiting us (HTTP 429)")]
    RateLimited {
        /// The parsed `Retry-After`, if any.
        retry_after: Option<Duration>,
    },
    /// Any other non-2xx status.
    #[error("Klavi answered HTTP {status}")]
    Status {
        /// The HTTP status.
        status: u16,
        /// The parsed `Retry-After`, if any (honoured for 503 only).
        retry_after: Option<Duration>,
    },
    /// No complete answer within `klavi.request_timeout_ms` (or the
    /// connection within `klavi.connect_timeout_ms`).
    #[error("request to Klavi timed out")]
    Timeout,
    /// Connection refused, reset, DNS failure, TLS failure and the like.
    #[error("could not talk to Klavi: {0}")]
    Transport(String),
    /// A 2xx answer that is not a usable token (the source's explanation).
    #[error("invalid response from Klavi: {0}")]
    Invalid(String),
    /// Fleet mode: another sidecar held the fetch lock, and its fetch
    /// failed with this category (this sidecar backs off as it does).
    #[error("the fleet's fetch failed: {category}")]
    Fleet {
        /// The lock holder's category.
        category: Category,
        /// The `Retry-After` Klavi sent the lock holder, if any.
        retry_after: Option<Duration>,
    },
    /// Fleet mode: another sidecar held the fetch lock, and no token came
    /// from it within `refresh.wait_ms`.
    #[error("another sidecar's fetch did not bring a token within refresh.wait_ms")]
    FleetWait,
}

impl FetchError {
    /// The category of SPEC section 3's error table.
    pub fn category(&self) -> Category {
        match self {
            Self::CredentialsRejected { .. } => Category::CredentialsRejected,
            Self::RateLimited { .. } => Category::RateLimited,
            Self::Status { .. } | Self::Timeout | Self::Transport(_) => {
                Category::UpstreamUnavailable
            }
            Self::Invalid(_) => Category::InvalidResponse,
            Self::Fleet { category, .. } => *category,
            Self::FleetWait => Category::UpstreamUnavailable,
        }
    }

    /// The `Retry-After` to honour: only 429 and 503 carry one.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::RateLimited { retry_after } => *retry_after,
            Self::Status {
                status: 503,
                retry_after,
            } => *retry_after,
            Self::Fleet { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// The HTTP status Klavi answered with, when it answered.
    pub fn status(&self) -> Option<u16> {
        match self {
            Self::CredentialsRejected { status } | Self::Status { status, .. } => Some(*status),
            Self::RateLimited { .. } => Some(429),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn categories_and_retry_after_follow_the_error_table() {
        let s = |status, retry_after| FetchError::Status {
            status,
            retry_after,
        };
        let d = Some(Duration::from_secs(3));
        let cases: Vec<(FetchError, Category, Option<Duration>)> = vec![
            (
                FetchError::CredentialsRejected { status: 401 },
                Category::CredentialsRejected,
                None,
            ),
            (
                FetchError::CredentialsRejected { status: 403 },
                Category::CredentialsRejected,
                None,
            ),
            (
                FetchError::RateLimited { retry_after: d },
                Category::RateLimited,
                d,
            ),
            (s(503, d), Category::UpstreamUnavailable, d),
            (s(500, d), Category::UpstreamUnavailable, None),
            (s(404, None), Category::UpstreamUnavailable, None),
            (FetchError::Timeout, Category::UpstreamUnavailable, None),
            (
                FetchError::Transport("reset".into()),
                Category::UpstreamUnavailable,
                None,
            ),
            (
                FetchError::Invalid("no token".into()),
                Category::InvalidResponse,
                None,
            ),
            (
                FetchError::Fleet {
                    category: Category::RateLimited,
                    retry_after: d,
                },
                Category::RateLimited,
                d,
            ),
            (FetchError::FleetWait, Category::UpstreamUnavailable, None),
        ];
        for (error, category, retry_after) in cases {
            assert_eq!(error.category(), category, "{error}");
            assert_eq!(error.retry_after(), retry_after, "{error}");
        }
    }

    #[test]
    fn category_names_are_the_spec_names() {
        let json = serde_json::to_string(&[
            Category::CredentialsRejected,
            Category::RateLimited,
            Category::UpstreamUnavailable,
            Category::InvalidResponse,
            Category::LocalRateLimit,
        ])
        .unwrap_or_default();
        assert_eq!(
            json,
            r#"["credentials_rejected","rate_limited","upstream_unavailable","invalid_response","local_rate_limit"]"#
        );
        assert_eq!(Category::RateLimited.to_string(), "rate_limited");
    }
}
