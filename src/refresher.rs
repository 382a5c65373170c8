//! The refresh task: the only caller of Klavi.
//!
//! One loop, so at most one request is ever in flight. It sleeps until the
//! policy's refresh time, a backoff, or a handler's demand (whichever comes
//! first, demands never overriding a backoff or `min_interval`), fetches,
//! stores the token and publishes its state for waiting handlers and
//! probes. It keeps the last good token through failures and logs each
//! change of state once.

use std::future::Future;
use std::sync::Arc;

use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::error::{Category, FetchError};
use crate::policy::{self, Failure, RefreshPolicy};
use crate::store::TokenStore;
use crate::token::Token;

/// Where tokens come from: the Klavi client in production, scripted
/// sources in tests.
pub trait TokenSource: Send + Sync + 'static {
    /// Asks for a new token. Must apply its own timeouts.
    fn fetch(&self) -> impl Future<Output = Result<Token, FetchError>> + Send;
}

impl<T: TokenSource> TokenSource for Arc<T> {
    fn fetch(&self) -> impl Future<Output = Result<Token, FetchError>> + Send {
        (**self).fetch()
    }
}

/// A source of jitter values in `[0, 1)`.
pub type Jitter = Arc<dyn Fn() -> f64 + Send + Sync>;

/// Uniform random jitter, for production.
pub fn random_jitter() -> Jitter {
    Arc::new(rand::random::<f64>)
}

/// The refresh task, ready to spawn.
pub struct Refresher<S> {
    source: S,
    store: Arc<TokenStore>,
    policy: RefreshPolicy,
    jitter: Jitter,
    key_changes: Arc<Notify>,
}

impl<S> std::fmt::Debug for Refresher<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Refresher")
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

/// Marks the task dead when dropped, on return or on panic alike, so
/// `/healthz` and waiting handlers learn of it.
struct AliveGuard(Arc<TokenStore>);

impl Drop for AliveGuard {
    fn drop(&mut self) {
        self.0.update_state(|s| {
            s.task_alive = false;
            s.fetching = false;
        });
    }
}

/// The task's memory between attempts.
#[derive(Debug, Default)]
struct Progress {
    /// Consecutive failed attempts.
    failures: u32,
    /// Consecutive fetches that brought a token needing refresh at once.
    degenerate: u32,
    /// No attempt, demanded or not, before this.
    backoff_until: Option<Instant>,
    /// The category last logged, so a failure is logged once per change.
    logged_failure: Option<Category>,
}

impl<S: TokenSource> Refresher<S> {
    /// A refresher filling `store` from `source`. `key_changes` is notified
    /// when a key file changes, which retries at once after rejected
    /// credentials.
    pub fn new(
        source: S,
        store: Arc<TokenStore>,
        policy: RefreshPolicy,
        jitter: Jitter,
        key_changes: Arc<Notify>,
    ) -> Self {
        Self {
            source,
            store,
            policy,
            jitter,
            key_changes,
        }
    }

    /// Starts the task. It is marked alive before this returns, so probes
    /// answered right after see it.
    pub fn spawn(self, stop: CancellationToken) -> tokio::task::JoinHandle<()> {
        self.store.update_state(|s| s.task_alive = true);
        tokio::spawn(self.run(stop))
    }

    async fn run(self, stop: CancellationToken) {
        let _alive = AliveGuard(Arc::clone(&self.store));
        let mut progress = Progress::default();
        let mut scheduled = Instant::now();
        loop {
            let now = Instant::now();
            let state = self.store.state();
            // A demand brings the next attempt forward, but never past a
            // backoff or min_interval, and not for handlers that will have
            // stopped waiting by then.
            let (demanded_until, seen) = self.store.pending_demand(now, state.completed);
            let earliest = [
                progress.backoff_until,
                state
                    .last_success_at
                    .map(|at| at + self.policy.min_interval),
            ]
            .into_iter()
            .flatten()
            .fold(now, Instant::max);
            let wake = match demanded_until {
                Some(until) if earliest < until => scheduled.min(earliest),
                _ => scheduled,
            };
            self.store.update_state(|s| {
                s.next_attempt_at = Some(wake);
                s.demands_seen = seen;
            });

            tokio::select! {
                biased;
                () = stop.cancelled() => return,
                () = self.key_changes.notified() => {
                    if state.last_error == Some(Category::CredentialsRejected) {
                        tracing::info!("key file changed; retrying with the new keys now");
                        scheduled = Instant::now();
                        progress.backoff_until = None;
                    }
                    continue;
                }
                () = self.store.demand_signal().notified() => continue,
                () = tokio::time::sleep_until(wake) => {}
            }

            self.store.update_state(|s| s.fetching = true);
            let outcome = tokio::select! {
                biased;
                () = stop.cancelled() => return,
                outcome = self.source.fetch() => outcome,
            };
            scheduled = match outcome {
                Ok(token) => self.on_success(token, &mut progress),
                Err(error) => self.on_failure(&error, &mut progress),
            };
        }
    }

    /// Stores a fetched token; returns when to refresh next.
    fn on_success(&self, token: Token, progress: &mut Progress) -> Instant {
        let now = Instant::now();
        let margin = self.policy.serve_margin;
        let held = self.store.current();
        let same_token = held.as_ref().is_some_and(|t| t.value() == token.value());
        let plan = policy::delay_after_success(
            token.lifetime(),
            now.saturating_duration_since(token.sent_at()),
            same_token,
            progress.degenerate + 1,
            &self.policy,
            (self.jitter)(),
        );
        let next = now + plan.delay;

        // Never swap a servable token for one that is not (guarantee 2).
        let keep_held = held
            .as_ref()
            .is_some_and(|t| t.is_servable(now, margin) && !token.is_servable(now, margin));
        if plan.degenerate {
            progress.degenerate += 1;
            progress.backoff_until = Some(next);
            tracing::warn!(
                fingerprint = token.fingerprint(),
                expires_in_secs = token.remaining(now).as_secs(),
                same_token,
                next_attempt_in_ms = plan.delay.as_millis() as u64,
                "Klavi returned a token that needs refreshing at once; backing off"
            );
        } else {
            progress.degenerate = 0;
            progress.backoff_until = None;
            if progress.logged_failure.take().is_some() {
                tracing::info!("token refresh recovered");
            }
            tracing::info!(
                fingerprint = token.fingerprint(),
                expires_in_secs = token.remaining(now).as_secs(),
                next_refresh_in_secs = plan.delay.as_secs(),
                "token refreshed"
            );
        }
        progress.failures = 0;
        if !keep_held {
            self.store.set_token(Arc::new(token));
        }
        self.store.update_state(|s| {
            s.fetching = false;
            s.completed += 1;
            s.last_error = None;
            s.last_success_at = Some(now);
            s.next_attempt_at = Some(next);
        });
        next
    }

    /// Records a failure, keeping the held token; returns when to retry.
    fn on_failure(&self, error: &FetchError, progress: &mut Progress) -> Instant {
        let now = Instant::now();
        progress.failures = progress.failures.saturating_add(1);
        let category = error.category();
        let failure = Failure {
            category,
            retry_after: error.retry_after(),
            failures: progress.failures,
        };
        let delay = policy::delay_after_failure(&failure, &self.policy, (self.jitter)());
        let next = now + delay;
        progress.backoff_until = Some(next);
        let servable = self.store.servable(now).is_some();
        if progress.logged_failure != Some(category) {
            progress.logged_failure = Some(category);
            tracing::warn!(
                category = category.as_str(),
                error = %error,
                still_serving = servable,
                next_attempt_in_ms = delay.as_millis() as u64,
                "token refresh failed"
            );
        } else {
            tracing::debug!(
                category = category.as_str(),
                error = %error,
                attempt = progress.failures,
                next_attempt_in_ms = delay.as_millis() as u64,
                "token refresh failed again"
            );
        }
        self.store.update_state(|s| {
            s.fetching = false;
            s.completed += 1;
            s.last_error = Some(category);
            s.next_attempt_at = Some(next);
        });
        next
    }
}
