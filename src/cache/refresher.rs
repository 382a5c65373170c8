//! The refresh task: the only caller of Klavi.
//!
//! One loop, so at most one request is ever in flight. It sleeps until the
//! policy's refresh time, a backoff, or a handler's demand (whichever comes
//! first, demands never overriding a backoff or `min_interval`), fetches,
//! stores the token and publishes its state for waiting handlers and
//! probes. Every fetch, scheduled or demanded, first waits for the auth
//! budget ([`AuthBudget`]), so no sequence of answers or demands can send
//! more than `max_auth_per_minute` requests in a minute. It keeps the last
//! good token through failures and logs each change of state once.

use std::sync::Arc;

use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use tracing::Instrument as _;

use crate::cache::policy::{self, AuthBudget, BUDGET_WINDOW, Failure, RefreshPolicy};
use crate::cache::pool::Pooled;
use crate::cache::source::{Category, FetchError, TokenSource};
use crate::cache::store::TokenStore;
use crate::cache::token::Token;

/// What the refresh task reports as it goes: the profile's metrics in
/// production. Every method does nothing unless implemented.
pub trait RefreshObserver: Send + Sync + 'static {
    /// A request to the source starts.
    fn attempt_started(&self) {}
    /// It ended after `duration`; `failure` is its category if it failed;
    /// `consecutive_failures` counts failures since the last success.
    fn attempt_finished(
        &self,
        duration: std::time::Duration,
        failure: Option<Category>,
        consecutive_failures: u32,
    ) {
        let _ = (duration, failure, consecutive_failures);
    }
    /// The auth budget starts holding a wanted fetch back.
    fn budget_exhausted(&self) {}
}

/// Observes nothing.
#[derive(Debug, Clone, Copy, Default)]
pub struct Unobserved;

impl RefreshObserver for Unobserved {}

/// How long the task sleeps when nothing is wanted (a single_use profile
/// with `pool_size = 0` and no lease waiting); a demand wakes it sooner.
const IDLE: std::time::Duration = std::time::Duration::from_secs(3600);

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
    source_ready: Arc<Notify>,
    observer: Arc<dyn RefreshObserver>,
    /// The profile, for the logs.
    name: String,
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
    /// Attempts made, for log correlation.
    attempts: u64,
    /// Consecutive failed attempts.
    failures: u32,
    /// Consecutive fetches that brought a token needing refresh at once.
    degenerate: u32,
    /// No attempt, demanded or not, before this.
    backoff_until: Option<Instant>,
    /// When the last failed attempt ended: the next one waits at least
    /// `backoff_initial` from then, key-file changes included (§5.9).
    failed_at: Option<Instant>,
    /// The categories logged since the last success: a failure is logged
    /// at warn level once per category and episode, so a Klavi alternating
    /// between two answers does not log every attempt.
    logged_failures: Vec<Category>,
    /// The budget is holding a wanted fetch back (logged and counted once
    /// per episode).
    budget_held: bool,
}

impl<S: TokenSource> Refresher<S> {
    /// A refresher filling `store` from `source` by `policy`, with random
    /// jitter, no key-file notifications and no observer until told
    /// otherwise.
    pub fn new(source: S, store: Arc<TokenStore>, policy: RefreshPolicy) -> Self {
        Self {
            source,
            store,
            policy,
            jitter: random_jitter(),
            key_changes: Arc::new(Notify::new()),
            source_ready: Arc::new(Notify::new()),
            observer: Arc::new(Unobserved),
            name: "default".to_string(),
        }
    }

    /// Where jitter values come from (fixed values in tests).
    pub fn jitter(mut self, jitter: Jitter) -> Self {
        self.jitter = jitter;
        self
    }

    /// Notified when a key file changes, which retries at once after
    /// rejected credentials.
    pub fn key_changes(mut self, key_changes: Arc<Notify>) -> Self {
        self.key_changes = key_changes;
        self
    }

    /// Notified by the source when a fetch would now succeed without
    /// asking Klavi (the fleet stored a token): a profile with no servable
    /// token backing off after a failure tries at once, but never sooner
    /// than the floor after the failure.
    pub fn source_ready(mut self, source_ready: Arc<Notify>) -> Self {
        self.source_ready = source_ready;
        self
    }

    /// The profile it refreshes, named in every log line it writes.
    pub fn name(mut self, name: &str) -> Self {
        self.name = name.to_string();
        self
    }

    /// Who hears of attempts, their latency and budget holds.
    pub fn observer(mut self, observer: Arc<dyn RefreshObserver>) -> Self {
        self.observer = observer;
        self
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
        let mut budget = AuthBudget::new(self.policy.max_auth_per_minute, BUDGET_WINDOW);
        let mut scheduled = Instant::now();
        loop {
            let now = Instant::now();
            let state = self.store.state();
            // A demand brings the next attempt forward, but never past a
            // backoff, min_interval or the budget, and not for handlers
            // that will have stopped waiting by then.
            let pending = self.store.pending_demand(now, &state);
            let seen = pending.seq;
            // A single_use profile fetches when its pool wants a token
            // (leases waiting, too few fresh ones), after any backoff.
            if let Some(due) = self.store.pool_due(now) {
                // After a failure it also tries on its backoff with no
                // lease waiting (the pool asks for the first token itself),
                // so readiness says whether its keys and Klavi work: a
                // `pool_size = 0` profile would otherwise wait for a lease,
                // which an unready pod never gets.
                let probe = state.last_error.is_some().then_some(now);
                let due = due.into_iter().chain(probe).min().unwrap_or(now + IDLE);
                scheduled = progress.backoff_until.map_or(due, |at| due.max(at));
            }
            let backoff = progress.backoff_until.map_or(now, |at| at.max(now));
            // A rejected token's replacement is wanted whether or not
            // anyone still waits, and `min_interval` does not hold it back
            // (the backoff and the budget still do).
            let (earliest, demanded_until) = if pending.replacement {
                (backoff, Some(now + IDLE))
            } else {
                let after_success = state
                    .last_success_at
                    .map(|at| at + self.policy.min_interval);
                (
                    after_success.map_or(backoff, |at| at.max(backoff)),
                    pending.until,
                )
            };
            let budget_at = budget.next_allowed(now);
            let wanted = match demanded_until {
                Some(until) if earliest < until => scheduled.min(earliest),
                _ => scheduled,
            };
            let demand_at = earliest.max(budget_at);
            let wake = match demanded_until {
                Some(until) if demand_at < until => scheduled.min(demand_at),
                _ => scheduled,
            }
            .max(budget_at);
            let budget_held = budget_at > wanted.max(now);
            if budget_held && !progress.budget_held {
                self.observer.budget_exhausted();
                tracing::warn!(
                    profile = %self.name,
                    max_auth_per_minute = self.policy.max_auth_per_minute,
                    next_attempt_in_ms =
                        budget_at.saturating_duration_since(now).as_millis() as u64,
                    "auth budget used up; holding the next request to Klavi back"
                );
            }
            progress.budget_held = budget_held;
            self.store.update_state(|s| {
                s.next_attempt_at = Some(wake);
                s.demands_seen = seen;
                s.budget_held = budget_held;
            });

            tokio::select! {
                biased;
                () = stop.cancelled() => return,
                () = self.key_changes.notified() => {
                    if state.last_error == Some(Category::CredentialsRejected) {
                        tracing::info!(profile = %self.name, "key file changed; retrying with the new keys now");
                        scheduled = self.retry_soon(&mut progress, now);
                    }
                    continue;
                }
                () = self.source_ready.notified() => {
                    let waiting = progress.backoff_until.is_some_and(|at| at > now);
                    if waiting && self.store.servable(now).is_none() {
                        scheduled = self.retry_soon(&mut progress, now);
                    }
                    continue;
                }
                () = self.store.demand_signal().notified() => continue,
                () = tokio::time::sleep_until(wake) => {}
            }

            budget.record(Instant::now());
            progress.attempts += 1;
            let span = tracing::debug_span!(
                "refresh",
                profile = %self.name,
                attempt = progress.attempts,
                outcome = tracing::field::Empty,
                category = tracing::field::Empty,
                upstream_status = tracing::field::Empty,
                duration_ms = tracing::field::Empty,
                fingerprint = tracing::field::Empty,
                next_attempt_in_ms = tracing::field::Empty,
            );
            self.store.update_state(|s| {
                s.fetching = true;
                // The budget let this fetch through: nothing waits for it
                // now, whatever a waiter's wait ends with.
                s.budget_held = false;
            });
            progress.budget_held = false;
            self.observer.attempt_started();
            let started = Instant::now();
            let outcome = tokio::select! {
                biased;
                () = stop.cancelled() => return,
                outcome = self.source.fetch().instrument(span.clone()) => outcome,
            };
            let outcome = outcome.and_then(|token| self.refuse_known(token));
            let duration = started.elapsed();
            span.record("duration_ms", duration.as_millis() as u64);
            let _entered = span.enter();
            scheduled = match outcome {
                Ok(token) => {
                    span.record("outcome", "success");
                    span.record("fingerprint", token.fingerprint());
                    self.observer.attempt_finished(duration, None, 0);
                    self.on_success(token, &mut progress)
                }
                Err(error) => {
                    span.record("outcome", "failure");
                    span.record("category", error.category().as_str());
                    if let Some(status) = error.status() {
                        span.record("upstream_status", status);
                    }
                    self.observer.attempt_finished(
                        duration,
                        Some(error.category()),
                        progress.failures.saturating_add(1),
                    );
                    self.on_failure(&error, &mut progress)
                }
            };
            let next_in = scheduled.saturating_duration_since(Instant::now());
            span.record("next_attempt_in_ms", next_in.as_millis() as u64);
            tracing::debug!(
                profile = %self.name,
                duration_ms = duration.as_millis() as u64,
                "refresh attempt finished"
            );
        }
    }

    /// Cuts a backoff short: the next attempt at once, but never sooner
    /// than the floor after the last failure (§5.9); returns when.
    fn retry_soon(&self, progress: &mut Progress, now: Instant) -> Instant {
        let floor = progress
            .failed_at
            .map_or(now, |at| at + self.policy.backoff_initial);
        let at = floor.max(now);
        progress.backoff_until = Some(at);
        at
    }

    /// A token that must not be served is a failed attempt: one reported
    /// rejected (guarantee 11), or for a single_use profile one Klavi sent
    /// before (guarantee 12).
    fn refuse_known(&self, token: Token) -> Result<Token, FetchError> {
        match self.store.refusal(&token) {
            Some(refusal) => Err(FetchError::Invalid(format!(
                "{} ({})",
                refusal.explain(),
                token.fingerprint()
            ))),
            None => Ok(token),
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
            self.source.schedule_jitter(&token, (self.jitter)()),
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
                profile = %self.name,
                fingerprint = token.fingerprint(),
                expires_in_secs = token.remaining(now).as_secs(),
                same_token,
                next_attempt_in_ms = plan.delay.as_millis() as u64,
                "Klavi returned a token that needs refreshing at once; backing off"
            );
        } else {
            progress.degenerate = 0;
            progress.backoff_until = None;
            if !std::mem::take(&mut progress.logged_failures).is_empty() {
                tracing::info!(profile = %self.name, "token refresh recovered");
            }
            if self.store.is_single_use() {
                tracing::info!(
                    profile = %self.name,
                    fingerprint = token.fingerprint(),
                    expires_in_secs = token.remaining(now).as_secs(),
                    "token fetched for the lease pool"
                );
            } else {
                tracing::info!(
                    profile = %self.name,
                    fingerprint = token.fingerprint(),
                    expires_in_secs = token.remaining(now).as_secs(),
                    next_refresh_in_secs = plan.delay.as_secs(),
                    "token refreshed"
                );
            }
        }
        progress.failures = 0;
        if self.store.is_single_use() {
            let jitter = (self.jitter)();
            let fresh_until =
                token.sent_at() + policy::refresh_offset(token.lifetime(), &self.policy, jitter);
            let pooled = Pooled {
                token: Arc::new(token),
                fresh_until,
            };
            if self.store.deposit(pooled).is_err() {
                tracing::warn!(profile = %self.name, "Klavi sent a token it had sent before; not leased");
            }
        } else if !keep_held && !self.store.set_token(Arc::new(token)) {
            // Rejected while it was on its way here: never stored.
            tracing::debug!(profile = %self.name, "fetched token was reported rejected meanwhile");
        }
        self.store.update_state(|s| {
            s.fetching = false;
            s.completed += 1;
            s.successes += 1;
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
        progress.failed_at = Some(now);
        let servable = self.store.servable(now).is_some();
        if !progress.logged_failures.contains(&category) {
            progress.logged_failures.push(category);
            tracing::warn!(
                profile = %self.name,
                category = category.as_str(),
                error = %error,
                still_serving = servable,
                next_attempt_in_ms = delay.as_millis() as u64,
                "token refresh failed"
            );
        } else {
            tracing::debug!(
                profile = %self.name,
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
