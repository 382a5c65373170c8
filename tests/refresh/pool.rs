//! single_use profiles (SPEC §4.2, guarantee 12): the lease pool, filled
//! ahead by the refresh task, each token handed out once.

use std::collections::HashSet;

use super::bounds::{budget_policy, most_in_any_minute};
use super::*;
use klavi_token_sidecar::cache::digests::TokenLedger;
use klavi_token_sidecar::cache::store::{NotReadyReason, Readiness};

fn name(served: &klavi_token_sidecar::cache::store::Served) -> String {
    served.value().expose().to_string()
}

#[tokio::test(start_paused = true)]
async fn the_pool_fills_to_its_size_one_fetch_at_a_time_and_refills_as_leases_take() {
    let h = start_pool(
        3,
        no_jitter(),
        Step::Token(secs(300), Duration::from_millis(50), None),
        vec![],
    );
    sleep(secs(1)).await;
    assert_eq!(h.calls(), 3);
    assert_eq!(h.store.pooled(Instant::now()), 3);
    assert!(matches!(
        h.store.readiness(Instant::now()),
        Readiness::Ready(_)
    ));
    let (first, waited) = h.store.lease(Duration::ZERO).await.unwrap();
    assert!(!waited, "from the pool");
    assert_eq!(name(&first), "token-0");
    sleep(secs(1)).await;
    assert_eq!(h.calls(), 4, "refilled");
    assert_eq!(h.store.pooled(Instant::now()), 3);
    // Nothing else is fetched while the pool is full and fresh.
    sleep(secs(100)).await;
    assert_eq!(h.calls(), 4);
    h.stop().await;
}

/// `pool_size = 0`: one fetch at start, so readiness says whether the keys
/// and Klavi work (its token goes to the first lease), then one per lease.
#[tokio::test(start_paused = true)]
async fn pool_size_zero_fetches_one_token_per_lease_and_nothing_ahead() {
    let h = start_pool(0, no_jitter(), token_step(300), vec![]);
    assert!(
        matches!(
            h.store.readiness(Instant::now()),
            Readiness::NotReady(NotReadyReason::PoolEmpty)
        ),
        "not ready before an attempt succeeded"
    );
    sleep(secs(60)).await;
    assert_eq!(h.calls(), 1, "the start-up attempt only");
    assert!(matches!(
        h.store.readiness(Instant::now()),
        Readiness::Ready(_)
    ));
    let (first, waited) = h.store.lease(Duration::ZERO).await.unwrap();
    assert!(!waited, "the start-up token");
    assert_eq!(name(&first), "token-0");
    let mut seen = HashSet::from([name(&first)]);
    for i in 0..5 {
        let (served, waited) = h.store.lease(Duration::ZERO).await.unwrap();
        assert!(waited);
        assert!(seen.insert(name(&served)));
        assert_eq!(h.calls(), i + 2);
    }
    sleep(secs(60)).await;
    assert_eq!(h.calls(), 6);
    assert!(matches!(
        h.store.readiness(Instant::now()),
        Readiness::Ready(_)
    ));
    h.stop().await;
}

/// Review finding: with `pool_size = 0`, a fetch that failed after its
/// lease gave up was not retried until the next lease (an hour's idle
/// sleep), and the profile stayed not ready, so in Kubernetes no lease
/// would ever come. A failure is retried on its backoff, lease or not.
#[tokio::test(start_paused = true)]
async fn pool_size_zero_retries_a_failure_with_no_lease_waiting() {
    let h = start_pool(
        0,
        no_jitter(),
        token_step(300),
        vec![
            token_step(300),
            Step::Status(503, None, secs(6)),
            Step::Status(503, None, Duration::ZERO),
        ],
    );
    settle().await;
    let _ = h.store.lease(Duration::ZERO).await.unwrap();
    // This lease's fetch hangs 6 s and fails; the lease gives up at 5 s.
    let error = h.store.lease(Duration::ZERO).await.unwrap_err();
    assert_eq!(error.reason, UnavailableReason::Timeout);
    sleep(secs(2)).await;
    assert_eq!(
        h.store.readiness(Instant::now()),
        Readiness::NotReady(NotReadyReason::PoolEmpty)
    );
    // Retried on the backoff, with nobody waiting, until one succeeds.
    sleep(secs(5)).await;
    settle().await;
    assert_eq!(h.calls(), 4);
    assert!(matches!(
        h.store.readiness(Instant::now()),
        Readiness::Ready(_)
    ));
    let (_, waited) = h.store.lease(Duration::ZERO).await.unwrap();
    assert!(!waited, "the retry's token waits for the next lease");
    h.stop().await;
}

/// Review finding: two profiles with the same keys can be sent the same
/// token; one a shared profile served must never be leased by a
/// single_use one (and the other way round), since the ledger is the
/// process's, not the profile's.
#[tokio::test(start_paused = true)]
async fn a_token_a_shared_profile_served_is_never_leased_by_another_profile() {
    let ledger = Arc::new(TokenLedger::default());
    let policy = no_jitter();
    let shared_store = TokenStore::new(policy.serve_margin, policy.min_interval, secs(5))
        .with_ledger(Arc::clone(&ledger));
    let same = Step::Token(secs(300), Duration::ZERO, Some("same-token"));
    let shared = start_with(shared_store, policy.clone(), 0.0, same.clone(), vec![]);
    settle().await;
    assert_eq!(
        shared.store.current().unwrap().value().expose(),
        "same-token"
    );
    let pool_store = TokenStore::single_use(policy.serve_margin, policy.min_interval, secs(5), 1)
        .with_ledger(Arc::clone(&ledger));
    let pool = start_with(pool_store, policy, 0.0, same, vec![]);
    let error = pool.store.lease(Duration::ZERO).await.unwrap_err();
    assert_eq!(error.last_error, Some(Category::InvalidResponse));
    pool.set_default(token_step(300));
    let (leased, _) = pool.store.lease(Duration::ZERO).await.unwrap();
    assert_ne!(leased.value().expose(), "same-token");
    pool.stop().await;
    shared.stop().await;
}

#[tokio::test(start_paused = true)]
async fn waiting_leases_are_served_first_come_first_served_each_a_distinct_token() {
    let h = start_pool(
        0,
        no_jitter(),
        Step::Token(secs(300), Duration::from_millis(100), None),
        vec![],
    );
    let leases: Vec<_> = (0..20)
        .map(|_| {
            let store = Arc::clone(&h.store);
            tokio::spawn(async move { store.lease(Duration::ZERO).await })
        })
        .collect();
    let mut got = Vec::new();
    for lease in leases {
        got.push(name(&lease.await.unwrap().unwrap().0));
    }
    let expected: Vec<String> = (0..20).map(|n| format!("token-{n}")).collect();
    assert_eq!(got, expected, "in the order they asked");
    assert_eq!(h.calls(), 20);
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn stale_tokens_are_replaced_and_leased_first_and_expired_ones_never() {
    // 60 s tokens, margin 5 s: fresh for 30 s, leasable for 55 s.
    let h = start_pool(1, no_jitter(), token_step(60), vec![]);
    settle().await;
    assert_eq!(h.calls(), 1);
    sleep(secs(30)).await;
    settle().await;
    assert_eq!(h.calls(), 2, "a fresh one fetched beside the stale one");
    assert_eq!(h.store.pooled(Instant::now()), 2);
    let (older, _) = h.store.lease(Duration::ZERO).await.unwrap();
    assert_eq!(name(&older), "token-0", "the one expiring first");
    // Nothing is leased past the margin: token-1 (fetched at 30 s) goes
    // at 85 s, and by then token-2 has replaced it.
    sleep(secs(60)).await;
    settle().await;
    let (token, _) = h.store.lease(Duration::ZERO).await.unwrap();
    assert!(token.remaining(Instant::now()) >= secs(5));
    assert_eq!(
        name(&token),
        "token-2",
        "token-1 expired in the pool, unleased"
    );
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn leases_beyond_the_budget_wait_or_get_local_rate_limit() {
    let h = start_pool(0, budget_policy(10), token_step(300), vec![]);
    let mut leased = HashSet::new();
    let mut limited = 0;
    for _ in 0..100 {
        match h.store.lease(Duration::ZERO).await {
            Ok((served, _)) => assert!(leased.insert(name(&served))),
            Err(error) => {
                assert_eq!(error.last_error, Some(Category::LocalRateLimit));
                limited += 1;
            }
        }
        sleep(Duration::from_millis(500)).await;
    }
    let times = h.stats.call_times.lock().unwrap().clone();
    assert!(most_in_any_minute(&times) <= 10, "{times:?}");
    assert!(
        limited > 0 && leased.len() >= 10,
        "{limited} {}",
        leased.len()
    );
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_token_klavi_sends_twice_is_leased_once() {
    let h = start_pool(1, no_jitter(), Step::Repeat, vec![token_step(300)]);
    settle().await;
    let (first, _) = h.store.lease(Duration::ZERO).await.unwrap();
    // The refills bring the same token: failures, backed off, never leased.
    let error = h.store.lease(Duration::ZERO).await.unwrap_err();
    assert_eq!(error.last_error, Some(Category::InvalidResponse));
    assert!(
        h.call_gaps()
            .iter()
            .skip(1)
            .all(|g| *g >= Duration::from_millis(500))
    );
    assert_eq!(
        h.store.readiness(Instant::now()),
        Readiness::NotReady(NotReadyReason::PoolEmpty)
    );
    h.set_default(token_step(300));
    let (second, _) = h.store.lease(Duration::ZERO).await.unwrap();
    assert_ne!(name(&second), name(&first));
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn min_ttl_on_a_lease_is_met_or_refused_with_the_best_klavi_gives() {
    let h = start_pool(1, no_jitter(), token_step(60), vec![]);
    settle().await;
    let (served, _) = h.store.lease(secs(50)).await.unwrap();
    assert!(served.remaining(served.at) >= secs(50));
    let error = h.store.lease(secs(100)).await.unwrap_err();
    assert_eq!(
        error.reason,
        UnavailableReason::MinTtlUnsatisfiable { max_ttl_secs: 60 }
    );
    // Asked again at once, it is refused without another fetch.
    let calls = h.calls();
    let error = h.store.lease(secs(100)).await.unwrap_err();
    assert!(matches!(
        error.reason,
        UnavailableReason::MinTtlUnsatisfiable { .. }
    ));
    assert_eq!(h.calls(), calls);
    h.stop().await;
}

/// A lease that gives up (its wait runs out) does not lose the token its
/// fetch brings: the pool keeps it for the next lease.
#[tokio::test(start_paused = true)]
async fn a_token_arriving_after_its_lease_gave_up_goes_to_the_next_lease() {
    let h = start_pool(
        0,
        no_jitter(),
        Step::Token(secs(300), secs(7), None),
        vec![],
    );
    let error = h.store.lease(Duration::ZERO).await.unwrap_err();
    assert_eq!(error.reason, UnavailableReason::Timeout);
    sleep(secs(3)).await;
    let (served, waited) = h.store.lease(Duration::ZERO).await.unwrap();
    assert!(!waited, "the token that came late was pooled");
    assert_eq!(name(&served), "token-0");
    h.stop().await;
}

/// Second review finding: with `pool_size = 0`, a start-up fetch that
/// brought a token already too short to lease made the profile ready,
/// and every lease failed. Ready needs a token that could be leased; until
/// one comes the profile keeps trying, on the degenerate backoff.
#[tokio::test(start_paused = true)]
async fn pool_size_zero_is_not_ready_on_tokens_too_short_to_lease() {
    // 3 s tokens against a 5 s margin.
    let h = start_pool(0, no_jitter(), token_step(3), vec![]);
    sleep(secs(10)).await;
    assert_eq!(
        h.store.readiness(Instant::now()),
        Readiness::NotReady(NotReadyReason::PoolEmpty)
    );
    let calls = h.calls();
    // Each one a degenerate success: at most one per backoff floor.
    assert!((2..=21).contains(&calls), "{calls} attempts in 10 s");
    assert!(
        h.call_gaps()
            .iter()
            .all(|g| *g >= Duration::from_millis(500))
    );
    h.set_default(token_step(300));
    sleep(secs(30)).await;
    assert!(matches!(
        h.store.readiness(Instant::now()),
        Readiness::Ready(_)
    ));
    h.stop().await;
}
