//! The refresh policy: pure functions over plain data.
//!
//! When to refresh a token, how long to back off after a failure (a
//! `Retry-After` included) and how many auth requests the budget allows are
//! decided here and nowhere else, without clocks or randomness of their
//! own: the caller passes the current time and a jitter value in `[0, 1)`.
//! The refresh task ([`crate::cache::refresher`]) does the IO.
//!
//! Two rules bound every path that calls Klavi, whatever Klavi answers and
//! whatever clients ask: no wait after a failure is shorter than
//! `backoff_initial` (SPEC §5.9), and no more than `max_auth_per_minute`
//! fetches fall in any 60 s window ([`AuthBudget`], SPEC §5.10).

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

use crate::cache::source::Category;

/// Tokens are assumed to live at most this long, so that absurd expiry
/// values cannot overflow instant arithmetic.
pub const MAX_LIFETIME: Duration = Duration::from_secs(366 * 24 * 3600);

/// The knobs of the refresh policy (the `refresh.*` configuration keys).
#[derive(Debug, Clone, PartialEq)]
pub struct RefreshPolicy {
    /// Refresh once no more than max(this, 20 % of the lifetime) remains.
    pub refresh_before: Duration,
    /// Refresh earlier by up to this fraction of the lifetime, at random.
    pub jitter_ratio: f64,
    /// Never serve a token with less than this left.
    pub serve_margin: Duration,
    /// First backoff step after a failure.
    pub backoff_initial: Duration,
    /// Largest backoff step; also the wait after rejected credentials.
    pub backoff_max: Duration,
    /// Forced refreshes within this window of the last fetch reuse it.
    pub min_interval: Duration,
    /// Auth requests allowed in any 60 s window ([`AuthBudget`]).
    pub max_auth_per_minute: u32,
}

impl Default for RefreshPolicy {
    fn default() -> Self {
        Self {
            refresh_before: Duration::from_secs(60),
            jitter_ratio: 0.1,
            serve_margin: Duration::from_secs(5),
            backoff_initial: Duration::from_millis(500),
            backoff_max: Duration::from_secs(30),
            min_interval: Duration::from_secs(5),
            max_auth_per_minute: 60,
        }
    }
}

/// `d` times `factor`, with `factor` clamped to `[0, 1]` so the result never
/// exceeds `d` and the arithmetic never panics.
fn fraction_of(d: Duration, factor: f64) -> Duration {
    Duration::try_from_secs_f64(d.as_secs_f64() * unit(factor)).unwrap_or(Duration::ZERO)
}

/// `x` clamped to `[0, 1]`; NaN counts as zero.
fn unit(x: f64) -> f64 {
    if x.is_nan() { 0.0 } else { x.clamp(0.0, 1.0) }
}

/// How long after the token was requested it should be refreshed.
///
/// `lifetime` runs from the moment the request was sent to the expiry. The
/// refresh comes once no more than max(`refresh_before`, 20 % of the
/// lifetime) remains, but not before half the lifetime has passed (so short
/// tokens are not refetched at once), then earlier by `jitter` times
/// `jitter_ratio` of the lifetime (so a fleet drifts apart), and in any case
/// before the token stops being servable.
pub fn refresh_offset(lifetime: Duration, policy: &RefreshPolicy, jitter: f64) -> Duration {
    let lifetime = lifetime.min(MAX_LIFETIME);
    let margin = policy.refresh_before.max(fraction_of(lifetime, 0.2));
    let at = lifetime.saturating_sub(margin).max(lifetime / 2);
    let at = at.saturating_sub(fraction_of(lifetime, policy.jitter_ratio * unit(jitter)));
    at.min(lifetime.saturating_sub(policy.serve_margin))
}

/// Exponential backoff with full jitter above the floor: a random delay
/// between `initial` and `initial * 2^(failures - 1)`, capped at `max`.
/// `failures` counts the consecutive failed attempts, the one just made
/// included. Plain full jitter would reach zero, and a zero wait after a
/// failure is a tight loop against Klavi; `initial` is the floor (§5.9).
pub fn backoff(failures: u32, policy: &RefreshPolicy, jitter: f64) -> Duration {
    let exponent = failures.saturating_sub(1).min(31);
    let floor = policy.backoff_initial.min(policy.backoff_max);
    let ceiling = policy
        .backoff_initial
        .checked_mul(1u32 << exponent)
        .unwrap_or(policy.backoff_max)
        .min(policy.backoff_max);
    floor + fraction_of(ceiling.saturating_sub(floor), jitter)
}

/// What the refresh task knows after a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Failure {
    /// The error category.
    pub category: Category,
    /// The server's `Retry-After`, when it sent one.
    pub retry_after: Option<Duration>,
    /// Consecutive failed attempts, this one included.
    pub failures: u32,
}

/// How long to wait after a failed attempt before the next one.
///
/// Rejected credentials wait the longest backoff (a key file change cuts
/// that short, elsewhere); 429 and 503 honour a positive `Retry-After`,
/// capped at `backoff_max`; everything else, a zero `Retry-After` included,
/// backs off exponentially with full jitter. Whatever the row, the wait is
/// never below `backoff_initial` (§5.9).
pub fn delay_after_failure(failure: &Failure, policy: &RefreshPolicy, jitter: f64) -> Duration {
    let wait = match (failure.category, failure.retry_after) {
        (Category::CredentialsRejected, _) => policy.backoff_max,
        (Category::RateLimited | Category::UpstreamUnavailable, Some(after))
            if !after.is_zero() =>
        {
            after.min(policy.backoff_max)
        }
        _ => backoff(failure.failures, policy, jitter),
    };
    wait.max(policy.backoff_initial)
}

/// Plan after a successful fetch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AfterSuccess {
    /// Delay from now until the next refresh.
    pub delay: Duration,
    /// The token needs refreshing again at once (or is the very token we
    /// had): the delay is a backoff, not the token's schedule.
    pub degenerate: bool,
}

/// When to refresh next after fetching a token.
///
/// `elapsed` is the time since the request was sent; `same_token` says
/// Klavi handed back the token already held. A token that is due for
/// refresh at once would make a tight loop, so it waits a backoff instead,
/// growing with `degenerate_streak` (the number of such fetches in a row,
/// this one included).
pub fn delay_after_success(
    lifetime: Duration,
    elapsed: Duration,
    same_token: bool,
    degenerate_streak: u32,
    policy: &RefreshPolicy,
    jitter: f64,
) -> AfterSuccess {
    let due_in = refresh_offset(lifetime, policy, jitter).saturating_sub(elapsed);
    if due_in.is_zero() || same_token {
        let wait = backoff(degenerate_streak.max(1), policy, jitter).max(policy.backoff_initial);
        AfterSuccess {
            // The same token keeps its own schedule if that is later.
            delay: if same_token { wait.max(due_in) } else { wait },
            degenerate: true,
        }
    } else {
        AfterSuccess {
            delay: due_in,
            degenerate: false,
        }
    }
}

/// The auth-request budget of one profile: at most `limit` fetches in any
/// window of `window` (SPEC §5.10).
///
/// It keeps the instants of the last `limit` fetches, so the bound holds
/// over every window, not per fixed minute (where a token bucket or a
/// counter reset each minute would let `2 × limit` through around a
/// boundary). Every fetch, scheduled or demanded, asks it first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthBudget {
    limit: usize,
    window: Duration,
    /// Start instants of the most recent fetches, oldest first; never more
    /// than `limit` of them.
    recent: VecDeque<Instant>,
}

/// The budget's window (`max_auth_per_minute`).
pub const BUDGET_WINDOW: Duration = Duration::from_secs(60);

impl AuthBudget {
    /// At most `limit` fetches (at least one) in any `window`.
    pub fn new(limit: u32, window: Duration) -> Self {
        let limit = limit.max(1) as usize;
        Self {
            limit,
            window,
            recent: VecDeque::with_capacity(limit),
        }
    }

    /// The earliest instant, `now` or later, at which one more fetch keeps
    /// every window within the limit.
    pub fn next_allowed(&self, now: Instant) -> Instant {
        match self.recent.front() {
            Some(oldest) if self.recent.len() >= self.limit => now.max(*oldest + self.window),
            _ => now,
        }
    }

    /// Records a fetch started at `at` (which must not be before
    /// [`AuthBudget::next_allowed`]).
    pub fn record(&mut self, at: Instant) {
        if self.recent.len() >= self.limit {
            self.recent.pop_front();
        }
        self.recent.push_back(at);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    fn policy() -> RefreshPolicy {
        RefreshPolicy::default()
    }

    #[test]
    fn refresh_offset_table() {
        let p = policy();
        let no_jitter_ratio = RefreshPolicy {
            jitter_ratio: 0.0,
            ..policy()
        };
        // (lifetime, policy, jitter, expected offset)
        let cases: Vec<(Duration, &RefreshPolicy, f64, Duration)> = vec![
            // The SPEC's two examples: 30 s refreshes at 15 s, 30 min at 24 min.
            (secs(30), &p, 0.0, secs(15)),
            (secs(1800), &p, 0.0, secs(1440)),
            // 5 min: 60 s margin beats 20 % (60 s): 240 s.
            (secs(300), &p, 0.0, secs(240)),
            // 2 min: max(60, 24) = 60 margin, half = 60: 60 s.
            (secs(120), &p, 0.0, secs(60)),
            // 1 hour: 20 % = 12 min margin: 48 min.
            (secs(3600), &p, 0.0, secs(2880)),
            // Full jitter (just under 1): 10 % of the lifetime earlier.
            (
                secs(1800),
                &p,
                0.999_999_999,
                Duration::from_secs_f64(1440.0 - 179.9999998),
            ),
            (secs(30), &p, 0.5, Duration::from_millis(13_500)),
            // Jitter is ignored when the ratio is zero.
            (secs(1800), &no_jitter_ratio, 0.9, secs(1440)),
            // A lifetime shorter than twice the serve margin: refresh before it
            // stops being servable (8 s - 5 s = 3 s), not at half (4 s).
            (secs(8), &p, 0.0, secs(3)),
            // Lifetime shorter than the serve margin: due at once.
            (secs(4), &p, 0.0, Duration::ZERO),
            (Duration::ZERO, &p, 0.0, Duration::ZERO),
            // Huge lifetimes are clamped rather than overflowing.
            (
                Duration::MAX,
                &p,
                0.0,
                MAX_LIFETIME - fraction_of(MAX_LIFETIME, 0.2),
            ),
        ];
        for (lifetime, policy, jitter, expected) in cases {
            let got = refresh_offset(lifetime, policy, jitter);
            let diff = got.abs_diff(expected);
            assert!(
                diff < Duration::from_millis(1),
                "lifetime {lifetime:?} jitter {jitter}: got {got:?}, expected {expected:?}"
            );
        }
    }

    #[test]
    fn refresh_offset_tolerates_bad_jitter_values() {
        let p = policy();
        assert_eq!(refresh_offset(secs(30), &p, f64::NAN), secs(15));
        assert_eq!(refresh_offset(secs(30), &p, -3.0), secs(15));
        // A jitter above one is clamped to the full ratio.
        assert_eq!(refresh_offset(secs(30), &p, 7.0), secs(12));
    }

    #[test]
    fn backoff_table() {
        let p = policy();
        // (failures, jitter, expected)
        let cases = [
            (1, 1.0, Duration::from_millis(500)),
            (2, 1.0, secs(1)),
            (3, 1.0, secs(2)),
            (4, 1.0, secs(4)),
            (6, 1.0, secs(16)),
            (7, 1.0, secs(30)), // 32 s capped at 30 s
            (50, 1.0, secs(30)),
            (u32::MAX, 1.0, secs(30)),
            (0, 1.0, Duration::from_millis(500)), // treated as the first failure
            // Full jitter above the floor: 0.5 s + 0.5 × (2 s − 0.5 s).
            (3, 0.5, Duration::from_millis(1250)),
            // Jitter 0 reaches the floor, never zero (§5.9).
            (3, 0.0, Duration::from_millis(500)),
            (1, 0.0, Duration::from_millis(500)),
            (40, 0.0, Duration::from_millis(500)),
        ];
        for (failures, jitter, expected) in cases {
            assert_eq!(
                backoff(failures, &p, jitter),
                expected,
                "failures {failures} jitter {jitter}"
            );
        }
    }

    #[test]
    fn backoff_never_exceeds_its_cap_even_with_odd_settings() {
        let p = RefreshPolicy {
            backoff_initial: secs(3600),
            backoff_max: secs(10),
            ..policy()
        };
        for failures in 0..100 {
            assert!(backoff(failures, &p, 1.0) <= secs(10));
        }
    }

    #[test]
    fn delay_after_failure_table() {
        let p = policy();
        let f = |category, retry_after, failures| Failure {
            category,
            retry_after,
            failures,
        };
        let cases = [
            // Rejected credentials: the longest backoff, Retry-After or not.
            (f(Category::CredentialsRejected, None, 1), secs(30)),
            (f(Category::CredentialsRejected, Some(secs(1)), 9), secs(30)),
            // 429 and 503 honour Retry-After, capped at backoff_max.
            (f(Category::RateLimited, Some(secs(7)), 1), secs(7)),
            (f(Category::RateLimited, Some(secs(600)), 1), secs(30)),
            (f(Category::UpstreamUnavailable, Some(secs(2)), 4), secs(2)),
            // Without it: exponential backoff (jitter 1.0 here).
            (f(Category::RateLimited, None, 3), secs(2)),
            (
                f(Category::UpstreamUnavailable, None, 1),
                Duration::from_millis(500),
            ),
            (f(Category::InvalidResponse, None, 2), secs(1)),
            (f(Category::InvalidResponse, Some(secs(9)), 2), secs(1)),
            // Retry-After: 0 is no Retry-After: the backoff, not a tight loop.
            (
                f(Category::RateLimited, Some(Duration::ZERO), 1),
                Duration::from_millis(500),
            ),
            (
                f(Category::UpstreamUnavailable, Some(Duration::ZERO), 3),
                secs(2),
            ),
            // A Retry-After shorter than the floor waits the floor.
            (
                f(Category::RateLimited, Some(Duration::from_millis(1)), 1),
                Duration::from_millis(500),
            ),
        ];
        for (failure, expected) in cases {
            assert_eq!(
                delay_after_failure(&failure, &p, 1.0),
                expected,
                "{failure:?}"
            );
        }
    }

    #[test]
    fn no_wait_after_a_failure_is_below_the_floor_whatever_the_row() {
        let p = policy();
        for category in Category::UPSTREAM {
            for retry_after in [None, Some(Duration::ZERO), Some(Duration::from_nanos(1))] {
                for failures in [0, 1, 2, 7, u32::MAX] {
                    for jitter in [0.0, 0.3, 1.0, -1.0, f64::NAN] {
                        let failure = Failure {
                            category,
                            retry_after,
                            failures,
                        };
                        let wait = delay_after_failure(&failure, &p, jitter);
                        assert!(
                            wait >= p.backoff_initial,
                            "{failure:?} jitter {jitter}: {wait:?}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn delay_after_success_table() {
        // No schedule jitter, so the table reads plainly; backoff at jitter 1.
        let p = RefreshPolicy {
            jitter_ratio: 0.0,
            ..policy()
        };
        // (lifetime, elapsed, same_token, streak, expected delay, degenerate)
        let cases = [
            // Normal: a 30 s token fetched in 100 ms refreshes 14.9 s from now.
            (
                secs(30),
                Duration::from_millis(100),
                false,
                1,
                Duration::from_millis(14_900),
                false,
            ),
            (secs(1800), secs(1), false, 1, secs(1439), false),
            // A token already due (4 s lifetime, 5 s margin): back off, never zero.
            (
                secs(4),
                Duration::ZERO,
                false,
                1,
                Duration::from_millis(500),
                true,
            ),
            (secs(4), Duration::ZERO, false, 3, secs(2), true),
            (secs(4), Duration::ZERO, false, 40, secs(30), true),
            // Slow fetch that ate the whole schedule.
            (secs(30), secs(20), false, 2, secs(1), true),
            // The same token again: keep its schedule when that is later...
            (secs(1800), secs(1), true, 1, secs(1439), true),
            // ...and at least the backoff when it is not.
            (
                secs(30),
                secs(15),
                true,
                1,
                Duration::from_millis(500),
                true,
            ),
        ];
        for (lifetime, elapsed, same, streak, delay, degenerate) in cases {
            let got = delay_after_success(lifetime, elapsed, same, streak, &p, 1.0);
            assert_eq!(
                got,
                AfterSuccess { delay, degenerate },
                "lifetime {lifetime:?} elapsed {elapsed:?} same {same} streak {streak}"
            );
        }
    }

    #[test]
    fn a_degenerate_token_never_gets_a_zero_delay_even_with_zero_jitter() {
        let p = policy();
        let got = delay_after_success(secs(1), Duration::ZERO, false, 1, &p, 0.0);
        assert_eq!(got.delay, p.backoff_initial);
        assert!(got.degenerate);
    }

    #[tokio::test(start_paused = true)]
    async fn auth_budget_table() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + secs(s);
        // (limit, fetches recorded at these seconds, asked at, expected earliest)
        let cases: Vec<(u32, Vec<u64>, u64, u64)> = vec![
            (3, vec![], 0, 0),
            (3, vec![0, 1], 2, 2),
            // Full: the oldest of the last three plus the window.
            (3, vec![0, 1, 2], 2, 60),
            (3, vec![0, 1, 2], 59, 60),
            (3, vec![0, 1, 2], 60, 60),
            (3, vec![0, 1, 2], 61, 61),
            // Only the last `limit` count: 0 has dropped out.
            (3, vec![0, 10, 20, 30], 31, 70),
            (1, vec![5], 6, 65),
            // A limit of zero means one.
            (0, vec![5], 6, 65),
        ];
        for (limit, fetches, asked, expected) in cases {
            let mut budget = AuthBudget::new(limit, BUDGET_WINDOW);
            for f in &fetches {
                budget.record(at(*f));
            }
            assert_eq!(
                budget.next_allowed(at(asked)),
                at(expected),
                "limit {limit} fetches {fetches:?} asked at {asked}"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_budget_holds_over_every_window_not_per_minute() {
        // Greedy use for ten minutes: fetch whenever allowed. Every 60 s
        // window, wherever it starts, holds at most the limit; a bucket
        // refilled each minute would let twice the limit through around
        // the boundary.
        let t0 = Instant::now();
        let limit = 7;
        let mut budget = AuthBudget::new(limit, BUDGET_WINDOW);
        let mut fetches = Vec::new();
        let mut now = t0 + Duration::from_millis(59_900);
        while now < t0 + secs(600) {
            let at = budget.next_allowed(now);
            budget.record(at);
            fetches.push(at);
            now = at + Duration::from_millis(1);
        }
        for (i, start) in fetches.iter().enumerate() {
            let in_window = fetches[i..]
                .iter()
                .take_while(|f| **f < *start + BUDGET_WINDOW)
                .count();
            assert!(
                in_window <= limit as usize,
                "{in_window} in the window from {i}"
            );
        }
        assert!(
            fetches.len() >= 9 * limit as usize,
            "the budget is used, not hoarded"
        );
    }
}
