//! What waiting handlers get: cold starts, forced refreshes, min_ttl, a dead task.

use super::*;

#[tokio::test(start_paused = true)]
async fn forced_refresh_within_min_interval_reuses_the_last_fetch() {
    let h = start(RefreshPolicy::default(), 0.0, token_step(300), vec![]);
    settle().await;
    let first = h.store.current().unwrap();
    sleep(secs(2)).await;
    let (again, reused) = h.store.force_refresh().await.unwrap();
    assert_eq!(again.value(), first.value());
    assert!(reused);
    assert_eq!(h.calls(), 1);
    // After min_interval a forced refresh fetches, once for many callers.
    sleep(secs(4)).await;
    let forced: Vec<_> = (0..100)
        .map(|_| {
            let store = Arc::clone(&h.store);
            tokio::spawn(async move { store.force_refresh().await })
        })
        .collect();
    for f in forced {
        let (token, reused) = f.await.unwrap().unwrap();
        assert_ne!(token.value(), first.value());
        assert!(!reused);
    }
    assert_eq!(h.calls(), 2);
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn forced_refresh_joins_a_fetch_in_flight() {
    let h = start(
        RefreshPolicy::default(),
        0.0,
        Step::Token(secs(300), secs(2), None),
        vec![],
    );
    sleep(Duration::from_millis(500)).await;
    assert!(h.store.state().fetching);
    let token = h.store.force_refresh().await.unwrap().0;
    assert_eq!(token.value().expose(), "token-0");
    assert_eq!(h.calls(), 1);
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn forced_refresh_failure_keeps_the_old_token_served() {
    let h = start(
        RefreshPolicy::default(),
        1.0,
        token_step(300),
        vec![token_step(300), Step::Status(500, None, Duration::ZERO)],
    );
    settle().await;
    sleep(secs(6)).await;
    let error = h.store.force_refresh().await.unwrap_err();
    assert_eq!(error.reason, UnavailableReason::Failed);
    assert_eq!(error.last_error, Some(Category::UpstreamUnavailable));
    assert!(h.store.token_with(Duration::ZERO).await.is_ok());
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn min_ttl_refreshes_when_needed_and_refuses_the_impossible() {
    let h = start(no_jitter(), 0.0, token_step(300), vec![]);
    settle().await;
    sleep(secs(100)).await; // 200 s left
    let token = h.store.token_with(secs(150)).await.unwrap();
    assert_eq!(h.calls(), 1, "enough left: no fetch");
    assert_eq!(token.value().expose(), "token-0");
    let token = h.store.token_with(secs(250)).await.unwrap();
    assert_eq!(h.calls(), 2, "not enough left: one fetch");
    assert_eq!(token.value().expose(), "token-1");
    // More than the token fetched just now has: refused at once, no fetch.
    let error = h.store.token_with(secs(301)).await.unwrap_err();
    assert_eq!(
        error.reason,
        UnavailableReason::MinTtlUnsatisfiable { max_ttl_secs: 300 }
    );
    assert_eq!(h.calls(), 2);
    sleep(secs(30)).await;
    assert_eq!(h.calls(), 2, "nor later, for a handler that has its answer");
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn min_ttl_within_min_interval_is_unsatisfiable_and_after_it_one_fetch() {
    let h = start(no_jitter(), 0.0, token_step(300), vec![]);
    settle().await;
    // 298.5 s wanted, 2 s after the fetch: the token fetched within
    // min_interval has 298 s. Told at once, nothing fetched.
    sleep(secs(2)).await;
    let started = Instant::now();
    let error = h
        .store
        .token_with(Duration::from_millis(298_500))
        .await
        .unwrap_err();
    assert_eq!(
        error.reason,
        UnavailableReason::MinTtlUnsatisfiable { max_ttl_secs: 298 }
    );
    assert_eq!(Instant::now(), started);
    assert_eq!(h.calls(), 1);
    // Past min_interval the same ask is one fetch, and met.
    sleep(secs(4)).await;
    let token = h
        .store
        .token_with(Duration::from_millis(298_500))
        .await
        .unwrap();
    assert_eq!(token.value().expose(), "token-1");
    assert_eq!(h.call_gaps(), vec![secs(6)]);
    h.stop().await;
}

/// Many concurrent min_ttl waiters that no token can satisfy share one
/// fetch, and all get the same 422.
#[tokio::test(start_paused = true)]
async fn concurrent_unsatisfiable_min_ttl_waiters_share_one_fetch() {
    let h = start(
        no_jitter(),
        0.0,
        Step::Token(secs(300), secs(1), None),
        vec![],
    );
    let waiters: Vec<_> = (0..500)
        .map(|_| {
            let store = Arc::clone(&h.store);
            tokio::spawn(async move { store.token_with(secs(10_000)).await })
        })
        .collect();
    for waiter in waiters {
        let error = waiter.await.unwrap().unwrap_err();
        assert!(matches!(
            error.reason,
            UnavailableReason::MinTtlUnsatisfiable { max_ttl_secs: 299 }
        ));
    }
    sleep(secs(60)).await;
    assert_eq!(h.calls(), 1, "one fetch for all of them, none after");
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn cold_start_waiters_time_out_after_wait_ms() {
    let h = start(
        RefreshPolicy::default(),
        0.0,
        Step::Token(secs(300), secs(60), None),
        vec![],
    );
    let started = Instant::now();
    let error = h.store.token_with(Duration::ZERO).await.unwrap_err();
    assert_eq!(error.reason, UnavailableReason::Timeout);
    assert_eq!(Instant::now() - started, Duration::from_millis(5000));
    assert_eq!(error.last_error, None);
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn cold_start_waiters_ride_through_quick_retries() {
    // Two quick failures (0.5 s, 1 s backoff), then success: within 5 s.
    let h = start(
        RefreshPolicy::default(),
        1.0,
        token_step(300),
        vec![Step::Status(500, None, Duration::ZERO), Step::Invalid],
    );
    let token = h.store.token_with(Duration::ZERO).await.unwrap();
    assert_eq!(token.value().expose(), "token-0");
    assert_eq!(h.calls(), 3);
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_dead_refresh_task_is_visible_and_waiters_do_not_hang() {
    let h = start(
        RefreshPolicy::default(),
        0.0,
        token_step(300),
        vec![Step::Panic],
    );
    settle().await;
    assert!(!h.store.state().task_alive);
    let error = h.store.token_with(Duration::ZERO).await.unwrap_err();
    assert_eq!(error.reason, UnavailableReason::TaskStopped);
    let store = Arc::clone(&h.store);
    h.stop.cancel();
    assert!(h.task.await.unwrap_err().is_panic());
    assert!(!store.state().task_alive);
}

#[tokio::test(start_paused = true)]
async fn stopping_the_task_interrupts_a_fetch_in_flight() {
    let h = start(
        RefreshPolicy::default(),
        0.0,
        Step::Token(secs(300), secs(3600), None),
        vec![],
    );
    settle().await;
    assert!(h.store.state().fetching);
    let store = Arc::clone(&h.store);
    h.stop().await;
    let state = store.state();
    assert!(!state.task_alive && !state.fetching);
}

#[tokio::test(start_paused = true)]
async fn state_reports_failures_and_recovery() {
    let h = start(
        RefreshPolicy::default(),
        1.0,
        token_step(300),
        vec![Step::Status(429, None, Duration::ZERO)],
    );
    settle().await;
    let state = h.store.state();
    assert_eq!(
        (state.completed, state.last_error),
        (1, Some(Category::RateLimited))
    );
    assert!(h.store.current().is_none());
    sleep(Duration::from_millis(600)).await;
    let state = h.store.state();
    assert_eq!((state.completed, state.last_error), (2, None));
    h.set_default(Step::Status(500, None, Duration::ZERO));
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_demand_that_min_interval_would_delay_past_the_wait_fails_fast_without_a_fetch() {
    let policy = RefreshPolicy {
        min_interval: secs(10),
        ..no_jitter()
    };
    let h = start(policy, 0.0, token_step(300), vec![]);
    settle().await;
    sleep(Duration::from_millis(1500)).await;
    let started = Instant::now();
    let error = h.store.token_with(secs(299)).await.unwrap_err();
    assert_eq!(
        error.reason,
        UnavailableReason::MinTtlUnsatisfiable { max_ttl_secs: 298 }
    );
    assert_eq!(Instant::now(), started, "told at once");
    // Nothing fetched for it, then or later.
    sleep(secs(30)).await;
    assert_eq!(h.calls(), 1);
    h.stop().await;
}
