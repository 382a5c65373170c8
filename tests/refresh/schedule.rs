//! The schedule, backoff and failures: one fetch per token, never a tight loop.

use super::*;

#[tokio::test(start_paused = true)]
async fn steady_state_is_one_fetch_per_token_and_a_token_is_always_servable() {
    // 300 s tokens, jitter 0.5 of the 10 % ratio: refresh at 240 - 15 = 225 s.
    let h = start(RefreshPolicy::default(), 0.5, token_step(300), vec![]);
    settle().await;
    assert_eq!(h.calls(), 1);
    let margin = RefreshPolicy::default().serve_margin;
    // Ten hours, checked every second.
    for _ in 0..36_100 {
        let now = Instant::now();
        let token = h
            .store
            .servable(now)
            .expect("a servable token at every second");
        assert!(token.remaining(now) >= margin);
        sleep(secs(1)).await;
    }
    assert_eq!(h.calls(), 1 + 36_100 / 225);
    assert!(
        h.call_gaps().iter().all(|gap| *gap == secs(225)),
        "{:?}",
        h.call_gaps()
    );
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn cold_start_burst_of_ten_thousand_waiters_makes_exactly_one_fetch() {
    let h = start(
        RefreshPolicy::default(),
        0.0,
        Step::Token(secs(300), secs(1), None),
        vec![],
    );
    let waiters: Vec<_> = (0..10_000)
        .map(|_| {
            let store = Arc::clone(&h.store);
            tokio::spawn(async move { store.token_with(Duration::ZERO).await })
        })
        .collect();
    for waiter in waiters {
        let token = waiter.await.unwrap().expect("every waiter gets the token");
        assert_eq!(token.value().expose(), "token-0");
    }
    assert_eq!(h.calls(), 1);
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_failing_upstream_never_drops_a_servable_token() {
    let h = start(
        RefreshPolicy::default(),
        1.0,
        Step::Status(500, None, Duration::ZERO),
        vec![token_step(120)],
    );
    settle().await;
    let first = h.store.servable(Instant::now()).unwrap();
    // Served (with margin) until 5 s before expiry, whatever Klavi does.
    while Instant::now() + secs(5) <= first.expires_at() {
        let token = h.store.token_with(Duration::ZERO).await.unwrap();
        assert_eq!(token.value(), first.value());
        sleep(Duration::from_millis(250)).await;
    }
    let error = h.store.token_with(Duration::ZERO).await.unwrap_err();
    assert_eq!(error.last_error, Some(Category::UpstreamUnavailable));
    assert!(h.calls() > 2);
    assert_eq!(
        h.store.state().last_error,
        Some(Category::UpstreamUnavailable)
    );
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn failures_back_off_exponentially_up_to_the_cap() {
    let h = start(
        RefreshPolicy::default(),
        1.0,
        Step::Status(500, None, Duration::ZERO),
        vec![],
    );
    sleep(secs(200)).await;
    let gaps: Vec<_> = h.call_gaps().into_iter().take(9).collect();
    let ms = Duration::from_millis;
    assert_eq!(
        gaps,
        vec![
            ms(500),
            secs(1),
            secs(2),
            secs(4),
            secs(8),
            secs(16),
            secs(30),
            secs(30),
            secs(30)
        ]
    );
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn full_jitter_spreads_the_backoff() {
    let h = start(
        RefreshPolicy::default(),
        0.25,
        Step::Status(502, None, Duration::ZERO),
        vec![],
    );
    sleep(secs(60)).await;
    let gaps: Vec<_> = h.call_gaps().into_iter().take(3).collect();
    // Full jitter above the 0.5 s floor: 0.5 + 0.25 × (ceiling − 0.5).
    assert_eq!(
        gaps,
        vec![
            Duration::from_millis(500),
            Duration::from_millis(625),
            Duration::from_millis(875)
        ]
    );
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn retry_after_is_honoured_for_429_and_503_and_capped() {
    let h = start(
        RefreshPolicy::default(),
        1.0,
        token_step(300),
        vec![
            Step::Status(429, Some(secs(7)), Duration::ZERO),
            Step::Status(503, Some(secs(3)), Duration::ZERO),
            Step::Status(429, Some(secs(3600)), Duration::ZERO),
            Step::Status(500, Some(secs(20)), Duration::ZERO), // ignored: backoff (4th failure: 4 s)
        ],
    );
    sleep(secs(100)).await;
    let gaps: Vec<_> = h.call_gaps().into_iter().take(4).collect();
    assert_eq!(gaps, vec![secs(7), secs(3), secs(30), secs(4)]);
    assert!(h.store.servable(Instant::now()).is_some());
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn rejected_credentials_wait_the_longest_backoff_unless_a_key_file_changes() {
    let h = start(
        RefreshPolicy::default(),
        1.0,
        token_step(300),
        vec![
            Step::Status(401, None, Duration::ZERO),
            Step::Status(403, None, Duration::ZERO),
            Step::Status(401, None, Duration::ZERO),
        ],
    );
    sleep(secs(61)).await;
    assert_eq!(h.call_gaps(), vec![secs(30), secs(30)]);
    assert_eq!(
        h.store.state().last_error,
        Some(Category::CredentialsRejected)
    );
    // A cold-start waiter is told at once: the next try is beyond its wait.
    let started = Instant::now();
    let error = h.store.token_with(Duration::ZERO).await.unwrap_err();
    assert_eq!(error.reason, UnavailableReason::Failed);
    assert_eq!(error.last_error, Some(Category::CredentialsRejected));
    assert_eq!(Instant::now(), started, "no pointless wait");
    assert_eq!(error.retry_after, secs(29));
    // The key file changes: retried at once, and the token arrives.
    h.keys.notify_one();
    settle().await;
    assert_eq!(h.calls(), 4);
    assert!(h.store.servable(Instant::now()).is_some());
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_key_change_does_not_cause_a_fetch_when_healthy() {
    let h = start(RefreshPolicy::default(), 0.0, token_step(300), vec![]);
    settle().await;
    h.keys.notify_one();
    settle().await;
    sleep(secs(10)).await;
    assert_eq!(h.calls(), 1);
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_token_needing_refresh_at_once_is_not_refetched_in_a_tight_loop() {
    // 4 s tokens with a 5 s serve margin are due at once.
    let h = start(RefreshPolicy::default(), 1.0, token_step(4), vec![]);
    sleep(secs(70)).await;
    let gaps = h.call_gaps();
    let ms = Duration::from_millis;
    assert_eq!(
        gaps[..7],
        [
            ms(500),
            secs(1),
            secs(2),
            secs(4),
            secs(8),
            secs(16),
            secs(30)
        ]
    );
    assert!(h.calls() <= 10, "{} calls in 70 s", h.calls());
    // Such a token is never served, and a plain request waits for a fetch
    // rather than being told its (default) min_ttl is impossible.
    assert!(h.store.servable(Instant::now()).is_none());
    let error = h.store.token_with(Duration::ZERO).await.unwrap_err();
    assert!(!matches!(
        error.reason,
        UnavailableReason::MinTtlUnsatisfiable { .. }
    ));
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn the_same_token_again_is_not_refetched_in_a_tight_loop() {
    // A 30 s token is refreshed at 15 s, but Klavi hands back the same one
    // (15 s left). It keeps its own schedule (half its remaining life, at
    // least a backoff), then backs off once it is due at once.
    let h = start(no_jitter(), 1.0, Step::Repeat, vec![token_step(30)]);
    sleep(secs(28)).await;
    let ms = Duration::from_millis;
    assert_eq!(h.call_gaps(), vec![secs(15), ms(7500), ms(2500), secs(2)]);
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_valid_token_is_not_replaced_by_an_unservable_one() {
    let h = start(
        RefreshPolicy::default(),
        0.0,
        token_step(300),
        vec![token_step(60), token_step(3)],
    );
    settle().await;
    let first = h.store.current().unwrap();
    // Refresh at 30 s (60 s token, margin max(60, 12): half = 30) brings a
    // 3 s token; the next try is a backoff (0.5 s) later.
    sleep(Duration::from_millis(30_200)).await;
    assert_eq!(h.calls(), 2);
    let held = h.store.servable(Instant::now()).unwrap();
    assert_eq!(held.value(), first.value());
    h.stop().await;
}
