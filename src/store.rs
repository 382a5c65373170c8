//! The token store: what HTTP handlers read, and how they wait.
//!
//! The current token sits in an [`ArcSwapOption`]: the `/token` hot path is
//! one atomic load, no lock. Everything slower — waiting on a cold start,
//! `min_ttl`, a forced refresh — goes through the refresh task: a handler
//! records a [`Demand`] and watches [`RefreshState`] until its need is met,
//! the task says it cannot be met in time, or `refresh.wait_ms` runs out.
//! Only the refresh task calls Klavi, so at most one request is ever in
//! flight and every waiter shares its result.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use tokio::sync::{Notify, watch};
use tokio::time::Instant;

use crate::error::Category;
use crate::token::Token;

/// What the refresh task publishes after every step.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RefreshState {
    /// The refresh task is running (false before start, after it stops or
    /// if it died).
    pub task_alive: bool,
    /// A request to Klavi is in flight.
    pub fetching: bool,
    /// Attempts finished so far.
    pub completed: u64,
    /// Category of the last attempt's failure; `None` after a success.
    pub last_error: Option<Category>,
    /// When the last successful fetch completed.
    pub last_success_at: Option<Instant>,
    /// When the task will next call Klavi, unless woken earlier.
    pub next_attempt_at: Option<Instant>,
    /// The last demand sequence number the task has taken into account.
    pub demands_seen: u64,
}

/// What waiting handlers need from the refresh task.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Demand {
    /// Bumped by every new demand.
    pub seq: u64,
    /// A token with at least this much left is wanted, until the deadline.
    pub min_remaining: Option<(Duration, Instant)>,
    /// A fetch completed after this many completions is wanted (a forced
    /// refresh), until the deadline.
    pub completion_after: Option<(u64, Instant)>,
}

impl Demand {
    /// Drops the parts that are satisfied or expired; returns, if any part
    /// still asks for a fetch, until when the asking handlers wait.
    pub fn prune(
        &mut self,
        now: Instant,
        token: Option<&Token>,
        completed: u64,
    ) -> Option<Instant> {
        if let Some((min, deadline)) = self.min_remaining {
            let satisfied = token.is_some_and(|t| t.remaining(now) >= min);
            if satisfied || deadline <= now {
                self.min_remaining = None;
            }
        }
        if let Some((after, deadline)) = self.completion_after
            && (completed > after || deadline <= now)
        {
            self.completion_after = None;
        }
        [
            self.min_remaining.map(|(_, d)| d),
            self.completion_after.map(|(_, d)| d),
        ]
        .into_iter()
        .flatten()
        .max()
    }
}

/// A token handed out by a wait, with the instant it was judged servable.
///
/// The response's `expiresIn` must count from that same instant: counted
/// from a later one, a token judged with exactly the margin left could show
/// a second less than the margin (whole seconds round down).
#[derive(Debug, Clone)]
pub struct Served {
    /// The token.
    pub token: Arc<Token>,
    /// When it had at least the margin (and any `min_ttl`) left.
    pub at: Instant,
}

impl std::ops::Deref for Served {
    type Target = Token;

    fn deref(&self) -> &Token {
        &self.token
    }
}

/// Why no token could be handed out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unavailable {
    /// Why.
    pub reason: UnavailableReason,
    /// The last attempt's failure, if the last attempt failed.
    pub last_error: Option<Category>,
    /// When it is worth asking again.
    pub retry_after: Duration,
}

/// The ways a wait for a token ends without one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnavailableReason {
    /// `refresh.wait_ms` ran out.
    Timeout,
    /// The fetch failed, or the next attempt is too far off to wait for.
    Failed,
    /// The refresh task is not running.
    TaskStopped,
    /// The asked-for time left is more than a fresh token would give.
    MinTtlTooLong,
}

/// Shared between the refresh task and the HTTP handlers.
#[derive(Debug)]
pub struct TokenStore {
    current: ArcSwapOption<Token>,
    state: watch::Sender<RefreshState>,
    demand: Mutex<Demand>,
    demand_signal: Notify,
    serve_margin: Duration,
    min_interval: Duration,
    wait: Duration,
}

impl TokenStore {
    /// An empty store: no token yet, refresh task not started.
    pub fn new(serve_margin: Duration, min_interval: Duration, wait: Duration) -> Self {
        Self {
            current: ArcSwapOption::empty(),
            state: watch::Sender::new(RefreshState::default()),
            demand: Mutex::new(Demand::default()),
            demand_signal: Notify::new(),
            serve_margin,
            min_interval,
            wait,
        }
    }

    /// The token held, servable or not.
    pub fn current(&self) -> Option<Arc<Token>> {
        self.current.load_full()
    }

    /// The token held, if it may be served now. Lock-free.
    pub fn servable(&self, now: Instant) -> Option<Arc<Token>> {
        let guard = self.current.load();
        match guard.as_ref() {
            Some(token) if token.is_servable(now, self.serve_margin) => Some(Arc::clone(token)),
            _ => None,
        }
    }

    /// A snapshot of the refresh task's state.
    pub fn state(&self) -> RefreshState {
        self.state.borrow().clone()
    }

    /// Watches the refresh task's state.
    pub fn subscribe(&self) -> watch::Receiver<RefreshState> {
        self.state.subscribe()
    }

    /// Replaces the token (the refresh task's job; public for tests).
    pub fn set_token(&self, token: Arc<Token>) {
        self.current.store(Some(token));
    }

    /// For the refresh task: publishes a change of state.
    pub(crate) fn update_state(&self, change: impl FnOnce(&mut RefreshState)) {
        self.state.send_modify(change);
    }

    /// For the refresh task: wakes when a handler records a demand.
    pub(crate) fn demand_signal(&self) -> &Notify {
        &self.demand_signal
    }

    /// For the refresh task: until when a demand still asks for a fetch
    /// (after dropping what is met or expired), and the demand sequence seen.
    pub(crate) fn pending_demand(&self, now: Instant, completed: u64) -> (Option<Instant>, u64) {
        let token = self.current.load_full();
        let mut demand = self.demand.lock().unwrap_or_else(PoisonError::into_inner);
        let active = demand.prune(now, token.as_deref(), completed);
        (active, demand.seq)
    }

    fn add_demand(&self, change: impl FnOnce(&mut Demand)) -> u64 {
        let seq = {
            let mut demand = self.demand.lock().unwrap_or_else(PoisonError::into_inner);
            change(&mut demand);
            demand.seq += 1;
            demand.seq
        };
        self.demand_signal.notify_one();
        seq
    }

    /// A servable token with at least `min_remaining` left (never less than
    /// the serve margin), fetching one if needed and waiting up to
    /// `refresh.wait_ms` for it.
    pub async fn token_with(&self, min_remaining: Duration) -> Result<Served, Unavailable> {
        let min_remaining = min_remaining.max(self.serve_margin);
        let meets = |token: &Token, now: Instant| {
            token.remaining(now) >= min_remaining && token.is_servable(now, self.serve_margin)
        };
        let now = Instant::now();
        if let Some(token) = self.current() {
            if meets(&token, now) {
                return Ok(Served { token, at: now });
            }
            // Asking for more than a whole fresh token gives cannot succeed;
            // refetching would only hammer Klavi.
            if min_remaining > self.serve_margin && min_remaining >= token.lifetime() {
                return Err(self.unavailable(UnavailableReason::MinTtlTooLong, now));
            }
        }
        let deadline = now + self.wait;
        let mut state = self.subscribe();
        let seq = self.add_demand(|d| {
            let (wanted, until) = d.min_remaining.unwrap_or((Duration::ZERO, deadline));
            d.min_remaining = Some((wanted.max(min_remaining), until.max(deadline)));
        });
        self.wait_for(&mut state, seq, deadline, |_| {
            let at = Instant::now();
            self.current()
                .filter(|token| meets(token, at))
                .map(|token| Ok(Served { token, at }))
        })
        .await
    }

    /// A freshly fetched token (after Klavi rejected the one the app had),
    /// sharing any fetch in flight. Within `refresh.min_interval_secs` of
    /// the last fetch, that fetch's token is returned without calling
    /// Klavi again; the flag says so.
    pub async fn force_refresh(&self) -> Result<(Served, bool), Unavailable> {
        let now = Instant::now();
        let recent = self
            .state()
            .last_success_at
            .is_some_and(|at| now.saturating_duration_since(at) < self.min_interval);
        if recent && let Some(token) = self.servable(now) {
            return Ok((Served { token, at: now }, true));
        }
        let deadline = now + self.wait;
        let mut state = self.subscribe();
        let after = state.borrow_and_update().completed;
        let seq = self.add_demand(|d| {
            let (wanted, until) = d.completion_after.unwrap_or((after, deadline));
            d.completion_after = Some((wanted.max(after), until.max(deadline)));
        });
        // Any attempt completing from now on answers, the one in flight too.
        self.wait_for(&mut state, seq, deadline, |snapshot| {
            (snapshot.completed > after).then(|| {
                let at = Instant::now();
                match self.servable(at) {
                    Some(token) if snapshot.last_error.is_none() => Ok(Served { token, at }),
                    _ => Err(UnavailableReason::Failed),
                }
            })
        })
        .await
        .map(|token| (token, false))
    }

    /// Waits on the refresh task's state until `done` has an answer, the
    /// wait is hopeless, or `deadline` passes.
    async fn wait_for(
        &self,
        state: &mut watch::Receiver<RefreshState>,
        seq: u64,
        deadline: Instant,
        mut done: impl FnMut(&RefreshState) -> Option<Result<Served, UnavailableReason>>,
    ) -> Result<Served, Unavailable> {
        loop {
            let snapshot = state.borrow_and_update().clone();
            let verdict =
                done(&snapshot).or_else(|| self.hopeless(&snapshot, seq, deadline).map(Err));
            if let Some(verdict) = verdict {
                return verdict.map_err(|reason| self.unavailable(reason, Instant::now()));
            }
            tokio::select! {
                changed = state.changed() => if changed.is_err() {
                    return Err(self.unavailable(UnavailableReason::TaskStopped, Instant::now()));
                },
                () = tokio::time::sleep_until(deadline) => {
                    return Err(self.unavailable(UnavailableReason::Timeout, Instant::now()));
                }
            }
        }
    }

    /// Whether waiting is pointless: the task is gone, or it has seen our
    /// demand and will not try again before our deadline.
    fn hopeless(
        &self,
        state: &RefreshState,
        seq: u64,
        deadline: Instant,
    ) -> Option<UnavailableReason> {
        if !state.task_alive {
            return Some(UnavailableReason::TaskStopped);
        }
        if state.demands_seen < seq || state.fetching {
            return None;
        }
        match state.next_attempt_at {
            Some(at) if at <= deadline => None,
            _ => Some(UnavailableReason::Failed),
        }
    }

    fn unavailable(&self, reason: UnavailableReason, now: Instant) -> Unavailable {
        let state = self.state.borrow();
        let retry_after = match (reason, state.next_attempt_at) {
            (UnavailableReason::MinTtlTooLong, _) => Duration::ZERO,
            (_, Some(at)) => at.saturating_duration_since(now),
            (_, None) => Duration::from_secs(1),
        };
        Unavailable {
            reason,
            last_error: state.last_error,
            retry_after,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::Secret;
    use std::time::UNIX_EPOCH;

    fn token(lifetime_secs: u64) -> Token {
        Token::new(
            Secret::new("t"),
            Instant::now(),
            Duration::from_secs(lifetime_secs),
            UNIX_EPOCH,
        )
    }

    #[tokio::test(start_paused = true)]
    async fn demand_prune_table() {
        let now = Instant::now();
        let later = now + Duration::from_secs(5);
        let earlier = now - Duration::from_millis(1);
        let t100 = token(100);
        let d = |min: Option<(u64, Instant)>, after: Option<(u64, Instant)>| Demand {
            seq: 1,
            min_remaining: min.map(|(s, at)| (Duration::from_secs(s), at)),
            completion_after: after,
        };
        // (demand, token, completed, still active until)
        let cases = [
            (d(None, None), Some(&t100), 0, None),
            (d(Some((50, later)), None), Some(&t100), 0, None), // met
            (d(Some((150, later)), None), Some(&t100), 0, Some(later)), // not met
            (d(Some((150, later)), None), None, 0, Some(later)), // no token
            (d(Some((150, earlier)), None), None, 0, None),     // expired
            (d(None, Some((3, later))), Some(&t100), 3, Some(later)), // waits for a 4th
            (d(None, Some((3, later))), Some(&t100), 4, None),  // got it
            (d(None, Some((3, earlier))), Some(&t100), 3, None), // expired
            (
                d(
                    Some((150, earlier + Duration::from_secs(2))),
                    Some((3, later)),
                ),
                Some(&t100),
                3,
                Some(later),
            ),
        ];
        for (mut demand, token, completed, active) in cases {
            let before = demand;
            assert_eq!(demand.prune(now, token, completed), active, "{before:?}");
        }
    }
}
