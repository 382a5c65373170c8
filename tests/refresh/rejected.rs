//! Rejected tokens (SPEC §4.2, guarantee 11): a token an app reports Klavi
//! refused is never served again, and its replacement comes at once.

use super::bounds::{budget_policy, most_in_any_minute};
use super::*;
use klavi_token_sidecar::cache::store::{NotReadyReason, Readiness, Rejection};

#[tokio::test(start_paused = true)]
async fn a_rejection_within_min_interval_fetches_a_new_token_and_the_old_never_returns() {
    let h = start(RefreshPolicy::default(), 0.0, token_step(300), vec![]);
    settle().await;
    let first = h.store.current().unwrap();
    sleep(secs(1)).await;
    // Without naming the token, a forced refresh this soon reuses it...
    let (again, reused) = h.store.force_refresh().await.unwrap();
    assert!(reused && again.value() == first.value());
    // ...but named rejected, it is replaced at once, not after the 5 s.
    let asked = Instant::now();
    let (rejection, fresh) = h.store.replace_rejected(first.digest()).await;
    let fresh = fresh.unwrap();
    assert_eq!(asked.elapsed(), Duration::ZERO);
    assert_eq!(rejection, Rejection::Marked);
    assert_ne!(fresh.value(), first.value());
    assert_eq!(h.calls(), 2);
    for _ in 0..1000 {
        let served = h.store.token_with(Duration::ZERO).await.unwrap();
        assert_ne!(served.value(), first.value());
        let (forced, _) = h.store.force_refresh().await.unwrap();
        assert_ne!(forced.value(), first.value());
        sleep(Duration::from_millis(100)).await;
    }
    assert!(h.store.is_rejected(&first));
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn concurrent_rejections_of_one_token_cause_one_fetch() {
    let h = start(
        RefreshPolicy::default(),
        0.0,
        Step::Token(secs(300), Duration::from_millis(200), None),
        vec![token_step(300)],
    );
    settle().await;
    let first = h.store.current().unwrap();
    let rejections: Vec<_> = (0..50)
        .map(|_| {
            let store = Arc::clone(&h.store);
            let digest = *first.digest();
            tokio::spawn(async move { store.replace_rejected(&digest).await })
        })
        .collect();
    let mut marked = 0;
    for r in rejections {
        let (rejection, token) = r.await.unwrap();
        let token = token.unwrap();
        assert_eq!(token.value().expose(), "token-1");
        marked += usize::from(rejection == Rejection::Marked);
    }
    assert_eq!(marked, 1, "the first one marks it, the rest find it gone");
    assert_eq!(h.calls(), 2);
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_stale_or_unknown_rejection_returns_the_current_token_and_fetches_nothing() {
    let h = start(RefreshPolicy::default(), 0.0, token_step(300), vec![]);
    settle().await;
    let first = h.store.current().unwrap();
    let second = h.store.replace_rejected(first.digest()).await.1.unwrap();
    sleep(secs(10)).await;
    let calls = h.calls();
    for digest in [
        *first.digest(),
        Secret::new("never-issued").digest(),
        Secret::new("").digest(),
    ] {
        let (rejection, token) = h.store.replace_rejected(&digest).await;
        let token = token.unwrap();
        assert_eq!(rejection, Rejection::NotCurrent);
        assert_eq!(token.value(), second.value());
    }
    settle().await;
    assert_eq!(h.calls(), calls);
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn while_the_replacement_is_pending_readiness_says_token_rejected_and_gets_wait() {
    let h = start(
        RefreshPolicy::default(),
        0.0,
        token_step(300),
        vec![token_step(300), Step::Token(secs(300), secs(2), None)],
    );
    settle().await;
    let first = h.store.current().unwrap();
    assert_eq!(h.store.reject(first.digest()), Rejection::Marked);
    settle().await;
    assert_eq!(
        h.store.readiness(Instant::now()),
        Readiness::NotReady(NotReadyReason::TokenRejected)
    );
    assert!(h.store.servable(Instant::now()).is_none());
    let started = Instant::now();
    let served = h.store.token_with(Duration::ZERO).await.unwrap();
    assert_eq!(started.elapsed(), secs(2), "waited for the replacement");
    assert_eq!(served.value().expose(), "token-1");
    assert!(matches!(
        h.store.readiness(Instant::now()),
        Readiness::Ready(_)
    ));
    h.stop().await;
}

/// A fetch in flight when the token is rejected answers the rejection: no
/// second fetch on top of it.
#[tokio::test(start_paused = true)]
async fn a_rejection_during_a_fetch_in_flight_joins_it() {
    let h = start(
        no_jitter(),
        0.0,
        Step::Token(secs(300), secs(3), None),
        vec![token_step(300)],
    );
    settle().await;
    let first = h.store.current().unwrap();
    // The scheduled refresh (at 240 s) is in flight for 3 s.
    sleep(secs(241)).await;
    assert!(h.store.state().fetching);
    let (rejection, fresh) = h.store.replace_rejected(first.digest()).await;
    assert_eq!(rejection, Rejection::Marked);
    assert_eq!(fresh.unwrap().value().expose(), "token-1");
    assert_eq!(h.calls(), 2);
    h.stop().await;
}

/// Klavi sending the rejected token back (a server that caches its token)
/// is a failed attempt: never stored, never served, and retried only after
/// the backoff.
#[tokio::test(start_paused = true)]
async fn klavi_sending_the_rejected_token_back_is_a_failure_that_backs_off() {
    let h = start(
        RefreshPolicy::default(),
        0.0,
        Step::Repeat,
        vec![token_step(300)],
    );
    settle().await;
    let first = h.store.current().unwrap();
    let (rejection, result) = h.store.replace_rejected(first.digest()).await;
    assert_eq!(
        rejection,
        Rejection::Marked,
        "marked even though no replacement came"
    );
    let error = result.unwrap_err();
    assert_eq!(error.last_error, Some(Category::InvalidResponse));
    assert!(h.store.servable(Instant::now()).is_none());
    // The replacement is asked at once; every retry after it backs off.
    let gaps = h.call_gaps();
    assert!(
        gaps.iter()
            .skip(1)
            .all(|g| *g >= Duration::from_millis(500)),
        "{gaps:?}"
    );
    assert!(h.calls() <= 12, "{} calls within the wait", h.calls());
    h.set_default(token_step(300));
    let served = h.store.token_with(Duration::ZERO).await.unwrap();
    assert_ne!(served.value(), first.value());
    h.stop().await;
}

/// The worst a client can do: reject every token as soon as it gets it.
/// The budget holds (guarantee 10), one fetch at a time (guarantee 3).
#[tokio::test(start_paused = true)]
async fn rejecting_every_token_at_once_stays_within_the_budget() {
    let h = start(budget_policy(10), 0.0, token_step(300), vec![]);
    let store = Arc::clone(&h.store);
    let storm = tokio::spawn(async move {
        let until = Instant::now() + secs(300);
        let mut answered = 0u32;
        while Instant::now() < until {
            match store.token_with(Duration::ZERO).await {
                Ok(token) => {
                    let _ = store.replace_rejected(token.digest()).await;
                    answered += 1;
                }
                Err(_) => sleep(Duration::from_millis(10)).await,
            }
        }
        answered
    });
    let answered = storm.await.unwrap();
    let times = h.stats.call_times.lock().unwrap().clone();
    assert!(
        most_in_any_minute(&times) <= 10,
        "{} in a minute",
        most_in_any_minute(&times)
    );
    assert!(
        times.len() >= 45,
        "the budget is used, not starved: {}",
        times.len()
    );
    assert!(answered >= 45, "{answered}");
    h.stop().await;
}

/// Review finding: a token reported after it was replaced was forgotten,
/// and served again when Klavi later sent it back. A token this profile
/// held is remembered rejected even when it is no longer current (no
/// fetch for it); a digest never held is not remembered.
#[tokio::test(start_paused = true)]
async fn a_late_report_of_a_replaced_token_still_keeps_it_from_coming_back() {
    let h = start(
        RefreshPolicy::default(),
        0.0,
        token_step(300),
        vec![token_step(300), token_step(300)],
    );
    settle().await;
    let first = h.store.current().unwrap();
    sleep(secs(6)).await;
    let (second, _) = h.store.force_refresh().await.unwrap();
    assert_ne!(second.value(), first.value());
    let calls = h.calls();
    assert_eq!(h.store.reject(first.digest()), Rejection::NotCurrent);
    settle().await;
    assert_eq!(h.calls(), calls, "nothing fetched for a stale report");
    assert!(h.store.is_rejected(&first));
    assert!(!h.store.is_rejected(&second));
    // Klavi sends the old one back: refused, never served.
    h.set_default(Step::Token(secs(300), Duration::ZERO, Some("token-0")));
    sleep(secs(6)).await;
    let (rejection, result) = h.store.replace_rejected(second.digest()).await;
    assert_eq!(rejection, Rejection::Marked);
    let error = result.unwrap_err();
    assert_eq!(error.last_error, Some(Category::InvalidResponse));
    assert!(h.store.servable(Instant::now()).is_none());
    h.stop().await;
}

/// Second review finding: profiles of one key pair can be sent the same
/// token; rejected on one, it was still served by the other. It is
/// dropped wherever it is held, and each profile fetches its own
/// replacement.
#[tokio::test(start_paused = true)]
async fn a_token_rejected_on_one_profile_is_dropped_by_another_holding_it() {
    let ledger = Arc::new(klavi_token_sidecar::cache::digests::TokenLedger::default());
    let policy = RefreshPolicy::default();
    let store = || {
        TokenStore::new(policy.serve_margin, policy.min_interval, secs(5))
            .with_ledger(Arc::clone(&ledger))
    };
    let same = Step::Token(secs(300), Duration::ZERO, Some("same"));
    let a = start_with(
        store(),
        policy.clone(),
        0.0,
        token_step(300),
        vec![same.clone()],
    );
    let b = start_with(store(), policy.clone(), 0.0, token_step(300), vec![same]);
    a.store.know_others(vec![Arc::downgrade(&b.store)]);
    b.store.know_others(vec![Arc::downgrade(&a.store)]);
    settle().await;
    let held = b.store.current().unwrap();
    assert_eq!(held.value().expose(), "same");
    let (rejection, fresh) = a.store.replace_rejected(held.digest()).await;
    assert_eq!(rejection, Rejection::Marked);
    assert_ne!(fresh.unwrap().value().expose(), "same");
    assert!(
        b.store
            .servable(Instant::now())
            .is_none_or(|t| t.value().expose() != "same")
    );
    let other = b.store.token_with(Duration::ZERO).await.unwrap();
    assert_ne!(other.value().expose(), "same");
    assert_eq!(b.calls(), 2, "b fetched its own replacement at once");
    a.stop().await;
    b.stop().await;
}
