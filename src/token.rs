//! A token as the sidecar holds it.

use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use crate::clock::unix_secs;
use crate::secret::Secret;

/// An access token with its deadline on the monotonic clock.
///
/// The deadline counts from the moment the request that fetched it was
/// sent, so neither time on the wire nor a wall-clock jump can make the
/// token look fresher than it is.
#[derive(Debug, Clone)]
pub struct Token {
    value: Secret,
    fingerprint: String,
    sent_at: Instant,
    expires_at: Instant,
    expire_at_unix: i64,
}

impl Token {
    /// A token fetched by a request sent at `sent_at`, which lives
    /// `lifetime` from then and expires at `expire_at` on the local wall
    /// clock (what clients are told).
    pub fn new(value: Secret, sent_at: Instant, lifetime: Duration, expire_at: SystemTime) -> Self {
        let expires_at = sent_at.checked_add(lifetime).unwrap_or(sent_at);
        Self {
            fingerprint: value.fingerprint(),
            value,
            sent_at,
            expires_at,
            expire_at_unix: unix_secs(expire_at).floor() as i64,
        }
    }

    /// The token itself.
    pub fn value(&self) -> &Secret {
        &self.value
    }

    /// Safe-to-log fingerprint of the token.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// When the request that fetched it was sent.
    pub fn sent_at(&self) -> Instant {
        self.sent_at
    }

    /// The deadline on the monotonic clock.
    pub fn expires_at(&self) -> Instant {
        self.expires_at
    }

    /// The expiry as unix seconds on the local clock (after skew correction).
    pub fn expire_at_unix(&self) -> i64 {
        self.expire_at_unix
    }

    /// From the moment it was requested to its expiry.
    pub fn lifetime(&self) -> Duration {
        self.expires_at.saturating_duration_since(self.sent_at)
    }

    /// Time left at `now`.
    pub fn remaining(&self, now: Instant) -> Duration {
        self.expires_at.saturating_duration_since(now)
    }

    /// Whether it may be handed out at `now`: at least `margin` left.
    pub fn is_servable(&self, now: Instant, margin: Duration) -> bool {
        self.remaining(now) >= margin && self.expires_at > now
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    #[tokio::test(start_paused = true)]
    async fn remaining_and_servability_follow_the_monotonic_clock() {
        let sent = Instant::now();
        let token = Token::new(
            Secret::new("abc"),
            sent,
            Duration::from_secs(30),
            UNIX_EPOCH + Duration::from_secs_f64(1_000.9),
        );
        assert_eq!(token.expire_at_unix(), 1_000);
        assert_eq!(token.fingerprint(), "ba7816bf");
        assert_eq!(token.lifetime(), Duration::from_secs(30));
        let margin = Duration::from_secs(5);
        assert!(token.is_servable(Instant::now(), margin));
        tokio::time::advance(Duration::from_secs(25)).await;
        assert_eq!(token.remaining(Instant::now()), Duration::from_secs(5));
        assert!(token.is_servable(Instant::now(), margin));
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(!token.is_servable(Instant::now(), margin));
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(token.remaining(Instant::now()), Duration::ZERO);
        assert!(!token.is_servable(Instant::now(), Duration::ZERO));
    }
}
