//! Whether a record read from Redis may be adopted: plain arithmetic over
//! plain values (SPEC §8), so every rule has a row in the table below.
//!
//! A record is adopted only if it is newer than what this sidecar holds
//! (never an older generation over a newer one), not marked rejected, its
//! expiry neither past nor further than a day ahead (clocks of pods agree
//! to a second; anything else is a broken or hostile writer), and not yet
//! due for refresh by anyone's schedule: adopting a token the refresh
//! policy would replace at once buys nothing, so then the lock is taken
//! and a fresh one fetched.

use std::time::Duration;

use crate::cache::policy::{self, RefreshPolicy};

/// The furthest ahead a stored expiry may be.
pub const MAX_AHEAD: Duration = Duration::from_secs(24 * 3600);

/// A record as read, the token still sealed away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stored {
    /// Its generation.
    pub generation: u64,
    /// Its expiry, unix seconds.
    pub expire_at: i64,
    /// When the fetch that brought it was sent, unix milliseconds.
    pub issued_at_ms: i64,
    /// A sidecar reported it rejected.
    pub rejected: bool,
}

/// What to do with a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Adopt it: it has lived `age` of its `lifetime`.
    Adopt {
        /// From its fetch to its expiry.
        lifetime: Duration,
        /// Since its fetch (zero if the writer's clock is ahead).
        age: Duration,
    },
    /// Not newer than the generation held.
    NotNewer,
    /// Reported rejected.
    Rejected,
    /// Its expiry is past, too far ahead, or before its fetch.
    OutOfRange,
    /// Due for refresh by the earliest schedule a sidecar may have.
    Due,
}

/// The verdict on `record` for a sidecar holding generation `held`
/// (0: none) at `now_ms` (unix milliseconds), under `policy`.
pub fn assess(record: &Stored, held: u64, now_ms: i64, policy: &RefreshPolicy) -> Verdict {
    if record.generation <= held {
        return Verdict::NotNewer;
    }
    if record.rejected {
        return Verdict::Rejected;
    }
    let expire_ms = record.expire_at.saturating_mul(1000);
    let ahead_ms = i64::try_from(MAX_AHEAD.as_millis()).unwrap_or(i64::MAX);
    if expire_ms <= now_ms
        || expire_ms.saturating_sub(now_ms) > ahead_ms
        || record.issued_at_ms >= expire_ms
    {
        return Verdict::OutOfRange;
    }
    let millis = |ms: i64| Duration::from_millis(u64::try_from(ms).unwrap_or(0));
    let lifetime = millis(expire_ms.saturating_sub(record.issued_at_ms)).min(MAX_AHEAD);
    let age = millis(now_ms.saturating_sub(record.issued_at_ms));
    // Jitter 1: the earliest any sidecar's schedule refreshes it, so what
    // is adopted is never due at once under the adopter's own jitter.
    if age >= policy::refresh_offset(lifetime, policy, 1.0) {
        return Verdict::Due;
    }
    Verdict::Adopt { lifetime, age }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW_MS: i64 = 1_900_000_000_000;

    fn record(generation: u64, issued_ago_s: i64, expires_in_s: i64) -> Stored {
        Stored {
            generation,
            expire_at: NOW_MS / 1000 + expires_in_s,
            issued_at_ms: NOW_MS - issued_ago_s * 1000,
            rejected: false,
        }
    }

    #[test]
    fn verdicts() {
        // The default policy: refresh 60 s or 20 % before expiry, never
        // before half the lifetime, jitter up to 10 % of it earlier.
        let policy = RefreshPolicy::default();
        let secs = Duration::from_secs;
        let rejected = Stored {
            rejected: true,
            ..record(5, 10, 3590)
        };
        let cases: Vec<(&str, Stored, u64, Verdict)> = vec![
            (
                "fresh and newer",
                record(5, 10, 3590),
                4,
                Verdict::Adopt {
                    lifetime: secs(3600),
                    age: secs(10),
                },
            ),
            (
                "a cold start holds nothing",
                record(1, 0, 3600),
                0,
                Verdict::Adopt {
                    lifetime: secs(3600),
                    age: secs(0),
                },
            ),
            (
                "the very generation held",
                record(5, 10, 3590),
                5,
                Verdict::NotNewer,
            ),
            (
                "an older generation",
                record(4, 10, 3590),
                5,
                Verdict::NotNewer,
            ),
            ("reported rejected", rejected, 4, Verdict::Rejected),
            ("expired", record(5, 3600, 0), 4, Verdict::OutOfRange),
            (
                "expired long ago",
                record(5, 7200, -3600),
                4,
                Verdict::OutOfRange,
            ),
            (
                "more than a day ahead",
                record(5, 0, 24 * 3600 + 1),
                4,
                Verdict::OutOfRange,
            ),
            (
                "exactly a day ahead",
                record(5, 0, 24 * 3600),
                4,
                Verdict::Adopt {
                    lifetime: secs(24 * 3600),
                    age: secs(0),
                },
            ),
            // 70 % of 3600 s: the earliest jittered schedule.
            (
                "due for the earliest schedule",
                record(5, 2520, 1080),
                4,
                Verdict::Due,
            ),
            (
                "just before it",
                record(5, 2519, 1081),
                4,
                Verdict::Adopt {
                    lifetime: secs(3600),
                    age: secs(2519),
                },
            ),
            (
                "the writer's clock ahead: age zero",
                record(5, -2, 3602),
                4,
                Verdict::Adopt {
                    lifetime: secs(3600),
                    age: secs(0),
                },
            ),
            (
                "issued after its expiry",
                Stored {
                    issued_at_ms: NOW_MS + 4_000_000,
                    ..record(5, 0, 3600)
                },
                4,
                Verdict::OutOfRange,
            ),
            (
                "absurd numbers do not overflow",
                Stored {
                    generation: u64::MAX,
                    expire_at: i64::MAX,
                    issued_at_ms: i64::MIN,
                    rejected: false,
                },
                0,
                Verdict::OutOfRange,
            ),
        ];
        for (name, stored, held, expected) in cases {
            assert_eq!(assess(&stored, held, NOW_MS, &policy), expected, "{name}");
        }
    }

    #[test]
    fn short_tokens_follow_the_half_life_rule() {
        // A 60 s token: refresh at half its life (30 s), the earliest
        // jitter 6 s sooner.
        let policy = RefreshPolicy::default();
        assert!(matches!(
            assess(&record(2, 23, 37), 1, NOW_MS, &policy),
            Verdict::Adopt { .. }
        ));
        assert_eq!(assess(&record(2, 24, 36), 1, NOW_MS, &policy), Verdict::Due);
    }
}
