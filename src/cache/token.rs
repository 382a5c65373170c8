//! A token as the sidecar holds it.

use std::fmt;
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use crate::clock::unix_secs;
use crate::secret::{Secret, TokenDigest};

/// An access token with its deadline on the monotonic clock.
///
/// The deadline counts from the moment the request that fetched it was
/// sent, so neither time on the wire nor a wall-clock jump can make the
/// token look fresher than it is. How a consumer renders it (a JSON body,
/// a header, a file) is the consumer's business.
#[derive(Clone)]
pub struct Token {
    value: Secret,
    digest: TokenDigest,
    fingerprint: String,
    sent_at: Instant,
    expires_at: Instant,
    expire_at_unix: i64,
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Token")
            .field("fingerprint", &self.fingerprint)
            .field("sent_at", &self.sent_at)
            .field("expires_at", &self.expires_at)
            .field("expire_at_unix", &self.expire_at_unix)
            .finish_non_exhaustive()
    }
}

impl Token {
    /// A token fetched by a request sent at `sent_at`, which lives
    /// `lifetime` from then and expires at `expire_at` on the local wall
    /// clock (what clients are told).
    ///
    /// The expiry is rounded down to whole unix seconds here, once, and the
    /// monotonic deadline moves down by the same fraction: the expiry
    /// enforced is the `expireAt` reported, so a client computing
    /// `expireAt − now` never sees less than the serve margin (SPEC §3).
    pub fn new(value: Secret, sent_at: Instant, lifetime: Duration, expire_at: SystemTime) -> Self {
        let unix = unix_secs(expire_at);
        // Klavi's expiries are whole seconds, which float arithmetic on the
        // way here can leave a hair below: within a millisecond of the next
        // second counts as that second (the deadline enforced is then that
        // hair earlier than the one reported, never later).
        let whole = (unix + 1e-3).floor();
        let fraction =
            Duration::try_from_secs_f64((unix - whole).max(0.0)).unwrap_or(Duration::ZERO);
        let lifetime = lifetime.saturating_sub(fraction);
        let expires_at = sent_at.checked_add(lifetime).unwrap_or(sent_at);
        let expire_at_unix = whole as i64;
        let digest = value.digest();
        Self {
            fingerprint: digest.fingerprint(),
            digest,
            value,
            sent_at,
            expires_at,
            expire_at_unix,
        }
    }

    /// The token itself.
    pub fn value(&self) -> &Secret {
        &self.value
    }

    /// Its SHA-256, to recognise it (rejected, already leased) by.
    pub fn digest(&self) -> &TokenDigest {
        &self.digest
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
            UNIX_EPOCH + Duration::from_secs(1_000),
        );
        assert_eq!(token.expire_at_unix(), 1_000);
        assert!(!format!("{token:?}").contains("abc"));
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

#[cfg(test)]
mod expiry_tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    /// The deadline enforced is the whole-second `expireAt` reported: for
    /// every fraction the wall-clock expiry can have, a token judged
    /// servable has at least the margin left by `expireAt − wall now`.
    #[tokio::test(start_paused = true)]
    async fn the_expiry_enforced_is_the_expiry_reported() {
        let margin = Duration::from_secs(5);
        // (wall clock at sending, lifetime in ms)
        for (sent_unix_ms, lifetime_ms) in [
            (970_000u64, 30_900u64),
            (970_000, 29_990),
            (970_000, 30_000),
            (970_250, 30_999),
            (970_999, 29_002),
            (970_500, 5_600),
        ] {
            let sent = Instant::now();
            let sent_wall = UNIX_EPOCH + Duration::from_millis(sent_unix_ms);
            let lifetime = Duration::from_millis(lifetime_ms);
            let token = Token::new(Secret::new("t"), sent, lifetime, sent_wall + lifetime);
            let expire_at = token.expire_at_unix() as f64;
            assert_eq!(
                expire_at,
                ((sent_unix_ms + lifetime_ms) / 1000) as f64,
                "rounded down"
            );
            assert!(token.lifetime() <= lifetime);
            // Walk the clock in 10 ms steps to past the expiry.
            for step in 0..=(lifetime_ms / 10 + 2) {
                let elapsed = Duration::from_millis(step * 10);
                let now = sent + elapsed;
                let wall_now = (sent_unix_ms as f64 + (step * 10) as f64) / 1000.0;
                if token.is_servable(now, margin) {
                    assert!(
                        expire_at - wall_now >= margin.as_secs_f64() - 1e-9,
                        "sent {sent_unix_ms} lifetime {lifetime_ms}: served at {wall_now} with \
                         expireAt {expire_at}"
                    );
                }
            }
            // And nothing is lost beyond the fraction: servable until
            // exactly expireAt − margin.
            let last = Duration::from_secs_f64(expire_at - sent_unix_ms as f64 / 1000.0) - margin;
            let last = last.saturating_sub(Duration::from_millis(1));
            assert!(token.is_servable(sent + last, margin));
        }
    }
}

#[cfg(test)]
mod rounding_tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    /// A whole-second expiry that arrives a float hair below the second is
    /// that second, not the one before (which would cost a whole second).
    #[tokio::test(start_paused = true)]
    async fn a_hair_below_a_whole_second_is_that_second() {
        let sent = Instant::now();
        let lifetime = Duration::from_secs(300);
        for (expire, expected_unix, expected_lifetime) in [
            (1_000_000.0 - 1e-7, 1_000_000, lifetime),
            (1_000_000.0, 1_000_000, lifetime),
            (
                1_000_000.5,
                1_000_000,
                lifetime - Duration::from_millis(500),
            ),
            (
                1_000_000.998,
                1_000_000,
                lifetime - Duration::from_millis(998),
            ),
        ] {
            let token = Token::new(
                Secret::new("t"),
                sent,
                lifetime,
                UNIX_EPOCH + Duration::from_secs_f64(expire),
            );
            assert_eq!(token.expire_at_unix(), expected_unix, "{expire}");
            let diff = token.lifetime().abs_diff(expected_lifetime);
            assert!(
                diff < Duration::from_micros(10),
                "{expire}: {:?}",
                token.lifetime()
            );
        }
    }
}
