//! Time as a dependency.
//!
//! Deadlines use tokio's monotonic [`tokio::time::Instant`], which tests
//! pause and advance. Wall-clock time is needed only to read Klavi's
//! absolute expiry times and to report `expireAt`; it comes from a
//! [`WallClock`], read at the edges (the Klavi client) and passed as plain
//! values to the pure functions of [`crate::upstream::expiry`].

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Source of wall-clock time.
pub trait WallClock: Send + Sync + 'static {
    /// The current wall-clock time.
    fn now(&self) -> SystemTime;
}

/// The operating system's clock: the production wall clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl WallClock for SystemClock {
    // The one place the system clock is read (clippy.toml bans it
    // elsewhere).
    #[allow(clippy::disallowed_methods)]
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// `time` as fractional unix seconds (negative before 1970).
pub fn unix_secs(time: SystemTime) -> f64 {
    match time.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_secs_f64(),
        Err(e) => -e.duration().as_secs_f64(),
    }
}

/// `time` moved by `secs` (either sign), saturating instead of panicking.
pub fn shift(time: SystemTime, secs: f64) -> SystemTime {
    if !secs.is_finite() {
        return time;
    }
    let magnitude = Duration::try_from_secs_f64(secs.abs()).unwrap_or(Duration::MAX);
    let shifted = if secs >= 0.0 {
        time.checked_add(magnitude)
    } else {
        time.checked_sub(magnitude)
    };
    shifted.unwrap_or(time)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unix_secs_handles_both_sides_of_the_epoch() {
        assert_eq!(unix_secs(UNIX_EPOCH + Duration::from_secs(10)), 10.0);
        assert_eq!(unix_secs(UNIX_EPOCH - Duration::from_secs(10)), -10.0);
    }

    #[test]
    fn shift_moves_both_ways_and_never_panics() {
        let t = UNIX_EPOCH + Duration::from_secs(100);
        assert_eq!(unix_secs(shift(t, 5.0)), 105.0);
        assert_eq!(unix_secs(shift(t, -5.0)), 95.0);
        assert_eq!(shift(t, f64::NAN), t);
        assert_eq!(shift(t, f64::INFINITY), t);
        // Far beyond what SystemTime holds: unchanged rather than a panic.
        assert_eq!(shift(t, 1e30), t);
    }
}
