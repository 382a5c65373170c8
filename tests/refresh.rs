//! The refresh task and token store against a scripted token source, on
//! tokio's paused clock: hours of refreshes run in milliseconds, and every
//! timing is exact.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, UNIX_EPOCH};

use klavi_token_sidecar::cache::policy::RefreshPolicy;
use klavi_token_sidecar::cache::refresher::{Jitter, Refresher};
use klavi_token_sidecar::cache::source::{Category, FetchError, TokenSource};
use klavi_token_sidecar::cache::store::{TokenStore, UnavailableReason};
use klavi_token_sidecar::cache::token::Token;
use klavi_token_sidecar::secret::Secret;
use klavi_token_sidecar::upstream::error::InvalidResponse;
use tokio::sync::Notify;
use tokio::time::{Instant, sleep};
use tokio_util::sync::CancellationToken;

/// One scripted answer.
#[derive(Debug, Clone)]
enum Step {
    /// A token living this long, after this delay, with this value (or a
    /// new one).
    Token(Duration, Duration, Option<&'static str>),
    /// HTTP status with an optional Retry-After, after a delay.
    Status(u16, Option<Duration>, Duration),
    /// A 2xx that is not a token.
    Invalid,
    /// The previous token again, with the same expiry.
    Repeat,
    /// Panic inside the task.
    Panic,
}

fn token_step(lifetime_secs: u64) -> Step {
    Step::Token(Duration::from_secs(lifetime_secs), Duration::ZERO, None)
}

#[derive(Default)]
struct Stats {
    calls: AtomicU64,
    in_flight: AtomicU64,
    max_in_flight: AtomicU64,
    call_times: Mutex<Vec<Instant>>,
    /// When each failed call ended.
    failures: Mutex<Vec<Instant>>,
}

/// A source that plays a script, then repeats `default` forever.
struct Scripted {
    script: Mutex<VecDeque<Step>>,
    default: Mutex<Step>,
    stats: Arc<Stats>,
    counter: AtomicU64,
    last: Mutex<Option<Token>>,
}

impl Scripted {
    fn new(default: Step, script: Vec<Step>) -> (Self, Arc<Stats>) {
        let stats = Arc::new(Stats::default());
        (
            Self {
                script: Mutex::new(script.into()),
                default: Mutex::new(default),
                stats: Arc::clone(&stats),
                counter: AtomicU64::new(0),
                last: Mutex::new(None),
            },
            stats,
        )
    }
}

struct InFlight<'a>(&'a Stats);
impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

impl TokenSource for Scripted {
    async fn fetch(&self) -> Result<Token, FetchError> {
        let result = self.play().await;
        if result.is_err() {
            self.stats.failures.lock().unwrap().push(Instant::now());
        }
        result
    }
}

impl Scripted {
    async fn play(&self) -> Result<Token, FetchError> {
        let stats = &self.stats;
        stats.calls.fetch_add(1, Ordering::SeqCst);
        stats.call_times.lock().unwrap().push(Instant::now());
        let now_in_flight = stats.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        stats
            .max_in_flight
            .fetch_max(now_in_flight, Ordering::SeqCst);
        let _guard = InFlight(stats);
        let step = self
            .script
            .lock()
            .unwrap()
            .pop_front()
            .unwrap_or_else(|| self.default.lock().unwrap().clone());
        let sent = Instant::now();
        match step {
            Step::Token(lifetime, delay, value) => {
                sleep(delay).await;
                let n = self.counter.fetch_add(1, Ordering::SeqCst);
                let value = value.map_or_else(|| format!("token-{n}"), str::to_string);
                let token = Token::new(Secret::new(value), sent, lifetime, UNIX_EPOCH + lifetime);
                *self.last.lock().unwrap() = Some(token.clone());
                Ok(token)
            }
            Step::Repeat => {
                // As the real client would see it: same value and expiry,
                // so a shorter lifetime counted from this request.
                let last = self
                    .last
                    .lock()
                    .unwrap()
                    .clone()
                    .expect("a token to repeat");
                let left = last.remaining(sent);
                Ok(Token::new(last.value().clone(), sent, left, UNIX_EPOCH))
            }
            Step::Status(status, retry_after, delay) => {
                sleep(delay).await;
                Err(match status {
                    401 | 403 => FetchError::CredentialsRejected { status },
                    429 => FetchError::RateLimited { retry_after },
                    _ => FetchError::Status {
                        status,
                        retry_after,
                    },
                })
            }
            Step::Invalid => Err(InvalidResponse::MissingToken.into()),
            Step::Panic => panic!("scripted panic"),
        }
    }
}

struct Harness {
    store: Arc<TokenStore>,
    stats: Arc<Stats>,
    source: Arc<Scripted>,
    keys: Arc<Notify>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Harness {
    fn calls(&self) -> u64 {
        self.stats.calls.load(Ordering::SeqCst)
    }

    fn call_gaps(&self) -> Vec<Duration> {
        let times = self.stats.call_times.lock().unwrap();
        times.windows(2).map(|w| w[1] - w[0]).collect()
    }

    fn set_default(&self, step: Step) {
        *self.source.default.lock().unwrap() = step;
    }

    /// Stops the task and checks the one invariant every test shares: never
    /// more than one fetch in flight.
    async fn stop(self) {
        let Harness {
            stop, task, stats, ..
        } = self;
        stop.cancel();
        task.await.unwrap();
        assert!(
            stats.max_in_flight.load(Ordering::SeqCst) <= 1,
            "more than one fetch in flight"
        );
    }
}

fn fixed_jitter(value: f64) -> Jitter {
    Arc::new(move || value)
}

fn start(policy: RefreshPolicy, jitter: f64, default: Step, script: Vec<Step>) -> Harness {
    let (source, stats) = Scripted::new(default, script);
    let source = Arc::new(source);
    let store = Arc::new(TokenStore::new(
        policy.serve_margin,
        policy.min_interval,
        Duration::from_millis(5000),
    ));
    let keys = Arc::new(Notify::new());
    let stop = CancellationToken::new();
    let task = Refresher::new(Arc::clone(&source), Arc::clone(&store), policy)
        .jitter(fixed_jitter(jitter))
        .key_changes(Arc::clone(&keys))
        .spawn(stop.clone());
    Harness {
        store,
        stats,
        source,
        keys,
        stop,
        task,
    }
}

/// The default policy without schedule jitter, so tables read plainly.
fn no_jitter() -> RefreshPolicy {
    RefreshPolicy {
        jitter_ratio: 0.0,
        ..RefreshPolicy::default()
    }
}

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

/// Lets the refresh task run without moving the clock.
async fn settle() {
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
}

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

fn budget_policy(limit: u32) -> RefreshPolicy {
    RefreshPolicy {
        max_auth_per_minute: limit,
        min_interval: secs(1),
        ..no_jitter()
    }
}

/// Counts the fetches in every 60 s window starting at a fetch.
fn most_in_any_minute(times: &[Instant]) -> usize {
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
/// against a Klavi that answers anything. Never more than the budget in
/// any minute, and never two failures' retries closer than the floor.
#[tokio::test(start_paused = true)]
async fn no_client_demand_and_no_answer_sequence_exceeds_the_budget() {
    let script: Vec<Step> = (0..400)
        .map(|i| match i % 7 {
            0 => Step::Status(429, Some(Duration::ZERO), Duration::ZERO),
            1 => Step::Status(503, None, Duration::ZERO),
            2 => Step::Token(Duration::from_millis(5200), Duration::ZERO, None),
            3 => Step::Invalid,
            4 => Step::Status(500, None, Duration::ZERO),
            5 => Step::Token(secs(300), Duration::from_millis(50), None),
            _ => Step::Token(secs(3), Duration::ZERO, None),
        })
        .collect();
    let limit = 12;
    let h = start(budget_policy(limit), 0.5, token_step(300), script);
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
    let times = h.stats.call_times.lock().unwrap().clone();
    assert!(times.len() > 2 * limit as usize, "{} calls", times.len());
    assert!(
        most_in_any_minute(&times) <= limit as usize,
        "{} in a minute",
        most_in_any_minute(&times)
    );
    // After every failure, the next call waited at least the floor.
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
    h.stop().await;
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
