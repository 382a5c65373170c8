//! Time as a dependency.
//!
//! Deadlines use tokio's monotonic [`tokio::time::Instant`], which tests
//! pause and advance. Wall-clock time is needed only to read Klavi's
//! absolute expiry times and to report `expireAt`; it comes from a
//! [`WallClock`] so tests can move it together with the paused tokio clock.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::time::Instant;

/// Source of wall-clock time.
pub trait WallClock: Send + Sync + 'static {
    /// The current wall-clock time.
    fn now(&self) -> SystemTime;
}

/// The operating system's clock: the production wall clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl WallClock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// A wall clock that advances with tokio's clock from a fixed start, so a
/// paused test runtime moves both clocks together. `offset` lets a test
/// simulate a wall-clock jump.
pub struct TokioWallClock {
    start_wall: SystemTime,
    start_mono: Instant,
    offset_secs: std::sync::atomic::AtomicI64,
}

impl TokioWallClock {
    /// Starts the clock at `start_wall`, now.
    pub fn starting_at(start_wall: SystemTime) -> Self {
        Self {
            start_wall,
            start_mono: Instant::now(),
            offset_secs: std::sync::atomic::AtomicI64::new(0),
        }
    }

    /// Moves the wall clock by `secs` without moving the monotonic clock.
    pub fn jump(&self, secs: i64) {
        self.offset_secs
            .fetch_add(secs, std::sync::atomic::Ordering::SeqCst);
    }
}

impl fmt::Debug for TokioWallClock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokioWallClock")
            .field("start_wall", &self.start_wall)
            .finish_non_exhaustive()
    }
}

impl WallClock for TokioWallClock {
    fn now(&self) -> SystemTime {
        let base = self.start_wall + self.start_mono.elapsed();
        let offset = self.offset_secs.load(std::sync::atomic::Ordering::SeqCst);
        shift(base, offset as f64)
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

    #[tokio::test(start_paused = true)]
    async fn tokio_wall_clock_follows_the_paused_clock_and_jumps() {
        let start = UNIX_EPOCH + Duration::from_secs(1_000);
        let clock = TokioWallClock::starting_at(start);
        tokio::time::advance(Duration::from_secs(30)).await;
        assert_eq!(unix_secs(clock.now()), 1_030.0);
        clock.jump(-600);
        assert_eq!(unix_secs(clock.now()), 430.0);
    }
}
