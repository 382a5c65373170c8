//! Properties of the refresh policy and the expiry arithmetic, for any
//! lifetime, margin, jitter and clock.

use std::time::{Duration, UNIX_EPOCH};

use klavi_token_sidecar::cache::policy::{
    Failure, MAX_LIFETIME, RefreshPolicy, backoff, delay_after_failure, delay_after_success,
    refresh_offset,
};
use klavi_token_sidecar::cache::source::Category;
use klavi_token_sidecar::upstream::expiry::{Timing, parse_auth_body, resolve};
use proptest::prelude::*;

fn policy() -> impl Strategy<Value = RefreshPolicy> {
    (
        0u64..7200,   // refresh_before_secs
        0.0f64..=0.5, // jitter_ratio
        0u64..600,    // serve_margin_secs
        1u64..60_000, // backoff_initial_ms
        1u64..3600,   // backoff_max_secs
        0u64..600,    // min_interval_secs
    )
        .prop_map(|(before, ratio, margin, initial, max, min_interval)| {
            let initial = Duration::from_millis(initial);
            RefreshPolicy {
                refresh_before: Duration::from_secs(before),
                jitter_ratio: ratio,
                serve_margin: Duration::from_secs(margin),
                backoff_initial: initial,
                backoff_max: Duration::from_secs(max).max(initial),
                min_interval: Duration::from_secs(min_interval),
                max_auth_per_minute: 60,
            }
        })
}

fn lifetime() -> impl Strategy<Value = Duration> {
    prop_oneof![
        (0u64..120_000).prop_map(Duration::from_millis),
        (0u64..(400 * 24 * 3600)).prop_map(Duration::from_secs),
    ]
}

fn category() -> impl Strategy<Value = Category> {
    prop::sample::select(Category::UPSTREAM.to_vec())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4096))]

    /// The planned refresh comes before the token stops being servable
    /// (expiry minus the serve margin), and never after the expiry.
    #[test]
    fn planned_refresh_is_before_expiry_minus_margin(
        lifetime in lifetime(), policy in policy(), jitter in 0.0f64..1.0
    ) {
        let at = refresh_offset(lifetime, &policy, jitter);
        let lifetime = lifetime.min(MAX_LIFETIME);
        prop_assert!(at <= lifetime.saturating_sub(policy.serve_margin));
        prop_assert!(at <= lifetime);
    }

    /// After a fetch, the next attempt is never in the past, is before the
    /// token stops being servable whenever the schedule allows it, and is
    /// never sooner than the first backoff step when it does not.
    #[test]
    fn next_attempt_after_success_is_never_in_the_past_nor_a_tight_loop(
        lifetime in lifetime(), policy in policy(), jitter in 0.0f64..1.0,
        elapsed_ms in 0u64..120_000, same in any::<bool>(), streak in 1u32..100
    ) {
        let elapsed = Duration::from_millis(elapsed_ms).min(lifetime);
        let plan = delay_after_success(lifetime, elapsed, same, streak, &policy, jitter);
        let servable_for = lifetime.min(MAX_LIFETIME).saturating_sub(elapsed).saturating_sub(policy.serve_margin);
        if plan.degenerate {
            prop_assert!(plan.delay >= policy.backoff_initial);
        } else {
            prop_assert!(!plan.delay.is_zero());
            prop_assert!(plan.delay <= servable_for, "{:?} > {:?}", plan.delay, servable_for);
        }
    }

    /// Backoff never exceeds its cap, whatever the streak.
    #[test]
    fn backoff_never_exceeds_its_cap(policy in policy(), failures in any::<u32>(), jitter in 0.0f64..=1.0) {
        prop_assert!(backoff(failures, &policy, jitter) <= policy.backoff_max);
    }

    /// Nor does any wait after a failure, Retry-After included.
    #[test]
    fn wait_after_failure_never_exceeds_backoff_max(
        policy in policy(), category in category(), failures in 1u32..1000,
        retry_after in proptest::option::of(0u64..1_000_000), jitter in 0.0f64..=1.0
    ) {
        let failure = Failure { category, retry_after: retry_after.map(Duration::from_secs), failures };
        prop_assert!(delay_after_failure(&failure, &policy, jitter) <= policy.backoff_max);
    }

    /// And none is below the floor (§5.9): not a zero Retry-After, not a
    /// jitter of zero, not any category or streak.
    #[test]
    fn wait_after_failure_is_never_below_backoff_initial(
        policy in policy(), category in category(), failures in any::<u32>(),
        retry_after_ms in proptest::option::of(0u64..100_000_000), jitter in 0.0f64..=1.0
    ) {
        let failure = Failure {
            category,
            retry_after: retry_after_ms.map(Duration::from_millis),
            failures,
        };
        prop_assert!(delay_after_failure(&failure, &policy, jitter) >= policy.backoff_initial);
    }

    /// Backoff grows (its ceiling doubles) until the cap.
    #[test]
    fn backoff_ceiling_is_monotonic(policy in policy(), failures in 1u32..64) {
        prop_assert!(backoff(failures, &policy, 1.0) <= backoff(failures + 1, &policy, 1.0));
    }

    /// Whatever the wall clock does during the request and whatever the
    /// Date header says, a token never looks fresher than Klavi's expiry
    /// allows from the moment of sending, on either clock.
    #[test]
    fn a_resolved_token_is_never_fresher_than_its_expiry(
        expire_in in -1000i64..100_000, elapsed_ms in 0u64..60_000,
        jump in -100_000i64..100_000, date_offset in proptest::option::of(-100_000i64..100_000)
    ) {
        let sent_unix = 1_800_000_000i64;
        let body = format!(r#"{{"accessToken":"t","expireAt":{}}}"#, sent_unix + expire_in);
        let parsed = parse_auth_body(body.as_bytes()).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let sent = UNIX_EPOCH + Duration::from_secs(sent_unix as u64);
        let elapsed = Duration::from_millis(elapsed_ms);
        let received = klavi_token_sidecar::clock::shift(sent + elapsed, jump as f64);
        let date_header = date_offset.map(|o| klavi_token_sidecar::clock::shift(sent + elapsed, o as f64));
        let timing = Timing { sent, received, date_header, elapsed };
        if let Ok(resolved) = resolve(&parsed, timing, Duration::from_secs(300)) {
            prop_assert!(resolved.lifetime > elapsed);
            // Without a Date header the token can never outlive expireAt as
            // measured from sending on the unjumped clock.
            if date_offset.is_none() {
                prop_assert!(resolved.lifetime.as_secs_f64() <= expire_in as f64 + 1e-6);
            }
        }
    }
}
