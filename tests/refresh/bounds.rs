//! The bounds on calls to Klavi: the floor after a failure and the auth budget.

use super::*;

/// Defect: `Retry-After: 0` (or a date in the past, which the client reads
/// as no Retry-After) made the task call Klavi back-to-back, about 900 times
/// a second. Every wait after a failure is now at least backoff_initial.
#[tokio::test(start_paused = true)]
async fn a_zero_retry_after_waits_the_backoff_floor_not_a_tight_loop() {
    for status in [429, 503] {
        // Jitter 0: the backoff at its floor.
        let h = start(
            RefreshPolicy::default(),
            0.0,
            Step::Status(status, Some(Duration::ZERO), Duration::ZERO),
            vec![],
        );
        sleep(secs(10)).await;
        let gaps = h.call_gaps();
        assert!(
            gaps.iter().all(|gap| *gap >= Duration::from_millis(500)),
            "{status}: {gaps:?}"
        );
        assert!(h.calls() <= 21, "{status}: {} calls in 10 s", h.calls());
        h.stop().await;
    }
}

/// A key-file change after rejected credentials retries at once, but not
/// sooner than the floor after the failure (guarantee 9).
#[tokio::test(start_paused = true)]
async fn a_key_change_right_after_a_rejection_still_waits_the_floor() {
    let h = start(
        RefreshPolicy::default(),
        0.0,
        token_step(300),
        vec![Step::Status(401, None, Duration::ZERO)],
    );
    settle().await;
    assert_eq!(h.calls(), 1);
    h.keys.notify_one();
    settle().await;
    assert_eq!(h.calls(), 1, "not at once: within the floor");
    sleep(Duration::from_millis(500)).await;
    settle().await;
    assert_eq!(h.calls(), 2);
    assert_eq!(h.call_gaps(), vec![Duration::from_millis(500)]);
    h.stop().await;
}

pub(crate) fn budget_policy(limit: u32) -> RefreshPolicy {
    RefreshPolicy {
        max_auth_per_minute: limit,
        min_interval: secs(1),
        ..no_jitter()
    }
}

/// Counts the fetches in every 60 s window starting at a fetch.
pub(crate) fn most_in_any_minute(times: &[Instant]) -> usize {
    (0..times.len())
        .map(|i| {
            times[i..]
                .iter()
                .take_while(|t| **t < times[i] + secs(60))
                .count()
        })
        .max()
        .unwrap_or(0)
}

/// Tokens that are due again within a second (5.6 s lifetime, 5 s margin:
/// refresh after 0.6 s, a proper schedule, not a backoff) would be fetched
/// 100 times a minute; the budget holds it at the limit, and a waiter that
/// the budget cannot serve in time is told `local_rate_limit`.
#[tokio::test(start_paused = true)]
async fn the_budget_caps_a_schedule_that_would_storm() {
    let h = start(
        budget_policy(10),
        0.0,
        Step::Token(Duration::from_millis(5600), Duration::ZERO, None),
        vec![],
    );
    sleep(secs(180)).await;
    let times = h.stats.call_times.lock().unwrap().clone();
    assert_eq!(most_in_any_minute(&times), 10, "{} calls", times.len());
    assert!(times.len() >= 30, "the budget is used: {}", times.len());
    // Mid-hold: no servable token, and the budget allows nothing soon.
    let mut waited = None;
    for _ in 0..120 {
        let now = Instant::now();
        let state = h.store.state();
        let held_long =
            state.budget_held && state.next_attempt_at.is_some_and(|at| at > now + secs(6));
        if h.store.servable(now).is_none() && held_long {
            waited = Some(h.store.token_with(Duration::ZERO).await);
            break;
        }
        sleep(Duration::from_millis(500)).await;
    }
    let error = waited.expect("a moment held by the budget").unwrap_err();
    assert_eq!(error.last_error, Some(Category::LocalRateLimit));
    h.stop().await;
}

/// The worst client: forced refreshes and unmeetable min_ttl in a loop,
/// against a Klavi that answers anything (`Retry-After: 0`, 5xx, rejected
/// keys, a 20 s hang, garbage, tokens due at once). Never more than the
/// budget in any minute, never two fetches at once, and never two
/// failures' retries closer than the floor.
#[tokio::test(start_paused = true)]
async fn no_client_demand_and_no_answer_sequence_exceeds_the_budget() {
    let limit = 12;
    let h = start(budget_policy(limit), 0.5, token_step(300), worst_answers());
    let mut clients = Vec::new();
    for i in 0..8u64 {
        let store = Arc::clone(&h.store);
        clients.push(tokio::spawn(async move {
            for round in 0..600u64 {
                if (i + round) % 2 == 0 {
                    let _ = store.force_refresh().await;
                } else {
                    let _ = store.token_with(secs(100_000)).await;
                }
                sleep(Duration::from_millis(100 + 37 * i)).await;
            }
        }));
    }
    for client in clients {
        client.await.unwrap();
    }
    assert_bounded(&h, limit);
    h.stop().await;
}

/// The same worst Klavi against the two demands this issue added: clients
/// reporting every token they get as rejected, and a single_use profile
/// whose leases (some with an unmeetable `min_ttl`) loop, while Klavi also
/// sends tokens back it sent before. The same bounds hold.
#[tokio::test(start_paused = true)]
async fn no_rejection_or_lease_and_no_answer_sequence_exceeds_the_budget() {
    let limit = 12;
    let mut answers = worst_answers();
    for i in (4..answers.len()).step_by(11) {
        answers.insert(i, Step::Repeat);
    }
    let shared = start(budget_policy(limit), 0.5, token_step(300), answers.clone());
    let pool = start_pool(0, budget_policy(limit), token_step(300), answers);
    let mut clients = Vec::new();
    for i in 0..8u64 {
        let (rejecter, leaser) = (Arc::clone(&shared.store), Arc::clone(&pool.store));
        clients.push(tokio::spawn(async move {
            for round in 0..600u64 {
                if let Ok(token) = rejecter.token_with(Duration::ZERO).await {
                    let _ = rejecter.replace_rejected(token.digest()).await;
                }
                let wanted = if (i + round) % 3 == 0 {
                    secs(100_000)
                } else {
                    Duration::ZERO
                };
                let _ = leaser.lease(wanted).await;
                sleep(Duration::from_millis(100 + 37 * i)).await;
            }
        }));
    }
    for client in clients {
        client.await.unwrap();
    }
    assert_bounded(&shared, limit);
    assert_bounded(&pool, limit);
    shared.stop().await;
    pool.stop().await;
}

/// Klavi answering anything: `Retry-After: 0`, 5xx, rejected keys, a 20 s
/// hang, garbage, tokens due at once.
fn worst_answers() -> Vec<Step> {
    (0..400)
        .map(|i| match i % 9 {
            0 => Step::Status(429, Some(Duration::ZERO), Duration::ZERO),
            1 => Step::Status(503, None, Duration::ZERO),
            2 => Step::Token(Duration::from_millis(5200), Duration::ZERO, None),
            3 => Step::Invalid,
            4 => Step::Status(500, None, Duration::ZERO),
            5 => Step::Token(secs(300), Duration::from_millis(50), None),
            6 => Step::Status(401, None, Duration::ZERO),
            7 => Step::Status(503, Some(Duration::ZERO), secs(20)),
            _ => Step::Token(secs(3), Duration::ZERO, None),
        })
        .collect()
}

/// Never more than `limit` fetches in any minute, never two at once, and
/// after every failure the next call waited at least the floor.
fn assert_bounded(h: &Harness, limit: u32) {
    let times = h.stats.call_times.lock().unwrap().clone();
    assert!(times.len() > 2 * limit as usize, "{} calls", times.len());
    assert_eq!(h.stats.max_in_flight.load(Ordering::SeqCst), 1);
    assert!(
        most_in_any_minute(&times) <= limit as usize,
        "{} in a minute",
        most_in_any_minute(&times)
    );
    let failures = h.stats.failures.lock().unwrap().clone();
    assert!(failures.len() > 5);
    let floor = RefreshPolicy::default().backoff_initial;
    for failed in failures {
        if let Some(next) = times.iter().find(|t| **t > failed) {
            assert!(
                *next - failed >= floor,
                "{:?} after a failure",
                *next - failed
            );
        }
    }
}

/// Review finding: once the budget let a fetch through, a waiter whose wait
/// ran out while that fetch hung was told `local_rate_limit`. The budget
/// was not the reason then.
#[tokio::test(start_paused = true)]
async fn a_wait_during_a_fetch_in_flight_is_not_blamed_on_the_budget() {
    let h = start(
        budget_policy(1),
        0.0,
        token_step(300),
        vec![
            // Due again after 3 s; the budget holds the next fetch to 60 s.
            token_step(8),
            // That one hangs for 30 s.
            Step::Token(secs(300), secs(30), None),
        ],
    );
    settle().await;
    sleep(secs(10)).await;
    assert!(h.store.state().budget_held, "held by the budget");
    let error = h.store.token_with(Duration::ZERO).await.unwrap_err();
    assert_eq!(error.last_error, Some(Category::LocalRateLimit));
    // The budget lets the fetch go at 60 s; it hangs.
    sleep(secs(51)).await;
    assert!(h.store.state().fetching);
    assert!(!h.store.state().budget_held);
    let error = h.store.token_with(Duration::ZERO).await.unwrap_err();
    assert_eq!(error.reason, UnavailableReason::Timeout);
    assert_eq!(error.last_error, None, "a fetch in flight, not the budget");
    h.stop().await;
}
