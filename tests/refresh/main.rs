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
    let store = TokenStore::new(
        policy.serve_margin,
        policy.min_interval,
        Duration::from_millis(5000),
    );
    start_with(store, policy, jitter, default, script)
}

/// A single_use profile keeping `pool_size` tokens ahead.
fn start_pool(
    pool_size: usize,
    policy: RefreshPolicy,
    default: Step,
    script: Vec<Step>,
) -> Harness {
    let store = TokenStore::single_use(
        policy.serve_margin,
        policy.min_interval,
        Duration::from_millis(5000),
        pool_size,
    );
    start_with(store, policy, 0.0, default, script)
}

fn start_with(
    store: TokenStore,
    policy: RefreshPolicy,
    jitter: f64,
    default: Step,
    script: Vec<Step>,
) -> Harness {
    let (source, stats) = Scripted::new(default, script);
    let source = Arc::new(source);
    let store = Arc::new(store);
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

mod bounds;
mod demands;
mod pool;
mod rejected;
mod schedule;
