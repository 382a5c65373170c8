//! Giving a burst's memory back to the system.
//!
//! A cold-start burst fills every connection slot (`server.max_connections`)
//! with a waiting request, and hyper holds 16 KiB of buffers per
//! connection. When the burst is over the allocator keeps the freed pages
//! for reuse, so the pod's RSS would stay at the burst's peak. The binary
//! knows its allocator and passes a [`Release`] that asks it to return
//! what is free; the sidecar calls it every [`RELEASE_EVERY`] on its
//! runtime. Measured: 10 to 130 µs a call, so about 0.01 % of one core, for
//! an RSS back at its idle figure about a second after a burst
//! (BENCHMARKS.md).

use std::time::Duration;

/// Asks the allocator to return freed memory to the system. Called on the
/// runtime's thread, which with one worker (the default) is the thread
/// that did the allocating.
pub type Release = fn();

/// How often [`release_periodically`] calls the release function.
pub const RELEASE_EVERY: Duration = Duration::from_secs(1);

/// Calls `release` every [`RELEASE_EVERY`], forever: spawn it, and it ends
/// with the runtime. The first call is a period after the start, not
/// during it: there is nothing to give back yet.
pub async fn release_periodically(release: Release) {
    let first = tokio::time::Instant::now() + RELEASE_EVERY;
    let mut every = tokio::time::interval_at(first, RELEASE_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        release();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    static CALLS: AtomicUsize = AtomicUsize::new(0);

    fn count() {
        CALLS.fetch_add(1, Ordering::SeqCst);
    }

    #[tokio::test(start_paused = true)]
    async fn releases_once_a_second() {
        let task = tokio::spawn(release_periodically(count));
        // Nothing during start-up, then one a second.
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(CALLS.load(Ordering::SeqCst), 0);
        tokio::time::sleep(Duration::from_millis(4_000)).await;
        assert_eq!(CALLS.load(Ordering::SeqCst), 4);
        task.abort();
    }
}
