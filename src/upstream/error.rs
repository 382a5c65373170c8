//! Why an answer from Klavi is not a usable token.

use crate::cache::source::FetchError;

/// Why a 2xx answer from Klavi was not a usable token.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum InvalidResponse {
    /// The body is longer than the limit.
    #[error("response body larger than {limit} bytes")]
    TooLarge {
        /// The limit in bytes.
        limit: usize,
    },
    /// The body is not a JSON object.
    #[error("response body is not a JSON object: {0}")]
    NotJson(String),
    /// `accessToken` is missing, empty or not a string.
    #[error("response has no non-empty string accessToken")]
    MissingToken,
    /// An expiry field is present but unreadable.
    #[error("unreadable expiry field {field}")]
    BadExpiry {
        /// The field name.
        field: &'static str,
    },
    /// The token expired before it arrived.
    #[error("token already expired on arrival ({seconds_ago:.0} s ago)")]
    AlreadyExpired {
        /// How long ago it expired, in seconds.
        seconds_ago: f64,
    },
}

impl From<InvalidResponse> for FetchError {
    fn from(error: InvalidResponse) -> Self {
        Self::Invalid(error.to_string())
    }
}
