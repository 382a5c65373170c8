//! The token store: what HTTP handlers read, and how they wait.
//!
//! The current token sits in an [`ArcSwapOption`]: the `/token` hot path is
//! one atomic load, no lock. Everything slower — waiting on a cold start,
//! `min_ttl`, a forced refresh — goes through the refresh task: a handler
//! records a [`Demand`] and watches [`RefreshState`] until its need is met,
//! the task says it cannot be met in time, or `refresh.wait_ms` runs out.
//! Only the refresh task calls Klavi, so at most one request is ever in
//! flight and every waiter shares its result.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, Weak};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use tokio::sync::{Notify, oneshot, watch};
use tokio::time::Instant;

use crate::cache::digests::{Refusal, TokenLedger};
use crate::cache::pool::{Duplicate, Grant, Lease, Pool, Pooled};
use crate::cache::source::Category;
use crate::cache::token::Token;
use crate::secret::TokenDigest;

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
    /// Attempts finished with a token so far.
    pub successes: u64,
    /// Category of the last attempt's failure; `None` after a success.
    pub last_error: Option<Category>,
    /// When the last successful fetch completed.
    pub last_success_at: Option<Instant>,
    /// When the task will next call Klavi, unless woken earlier.
    pub next_attempt_at: Option<Instant>,
    /// The last demand sequence number the task has taken into account.
    pub demands_seen: u64,
    /// The next attempt waits for the auth budget
    /// (`refresh.max_auth_per_minute`), not for Klavi or the schedule.
    pub budget_held: bool,
}

/// Handlers waiting for a token with at least `wanted` left.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MinRemaining {
    /// The most any of them wants.
    pub wanted: Duration,
    /// The last of their deadlines.
    pub until: Instant,
    /// Successful fetches when the last of them asked: one more success
    /// answers them all, served or told `min_ttl_unsatisfiable`, so the
    /// demand ends there rather than refetching for handlers gone.
    pub successes: u64,
}

/// What waiting handlers need from the refresh task.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Demand {
    /// Bumped by every new demand.
    pub seq: u64,
    /// A token with at least some time left is wanted.
    pub min_remaining: Option<MinRemaining>,
    /// A fetch completed after this many completions is wanted (a forced
    /// refresh), until the deadline.
    pub completion_after: Option<(u64, Instant)>,
    /// The current token was reported rejected and dropped: a replacement
    /// is wanted at once, not held back by `min_interval_secs`, whether
    /// or not anyone still waits, until a token is held again.
    pub replacement: bool,
}

impl Demand {
    /// Drops the parts that are satisfied, answered or expired; returns, if
    /// any part still asks for a fetch, until when the asking handlers wait.
    pub fn prune(
        &mut self,
        now: Instant,
        token: Option<&Token>,
        state: &RefreshState,
    ) -> Option<Instant> {
        if let Some(min) = self.min_remaining {
            let satisfied = token.is_some_and(|t| t.remaining(now) >= min.wanted);
            if satisfied || min.until <= now || state.successes > min.successes {
                self.min_remaining = None;
            }
        }
        if let Some((after, deadline)) = self.completion_after
            && (state.completed > after || deadline <= now)
        {
            self.completion_after = None;
        }
        if token.is_some() {
            self.replacement = false;
        }
        [
            self.min_remaining.map(|m| m.until),
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
    /// A lease's wait ran out while the tokens fetched meanwhile went to
    /// leases that asked earlier (first come, first served).
    TakenByEarlierLeases,
    /// `min_ttl` asks for more than a token fetched within
    /// `min_interval_secs` (or for this request) has left.
    MinTtlUnsatisfiable {
        /// Whole seconds the best token at hand has left.
        max_ttl_secs: u64,
    },
}

/// What waiting handlers ask of the refresh task, as it reads them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Pending {
    /// Until when some handler waits for a fetch.
    pub until: Option<Instant>,
    /// The demand sequence seen.
    pub seq: u64,
    /// A rejected token wants its replacement now (see
    /// [`Demand::replacement`]).
    pub replacement: bool,
}

/// What a report of a rejected token found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    /// It was the current token: dropped, never to be served again, and
    /// a replacement fetched.
    Marked,
    /// It was not the current token (already replaced, or unknown):
    /// nothing changed.
    NotCurrent,
}

/// A profile's readiness, as `/readyz` and the `ready` gauge report it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Readiness {
    /// A token can be served (a shared profile) or leased (single_use);
    /// with this much left (the longest pooled one, for a pool).
    Ready(Option<Duration>),
    /// Not ready, and why.
    NotReady(NotReadyReason),
}

/// Why a profile is not ready (the `reason` of `/readyz`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotReadyReason {
    /// No token has been fetched yet.
    NoTokenYet,
    /// The token held has less than the serve margin left.
    TokenExpired,
    /// The token was reported rejected; its replacement is pending.
    TokenRejected,
    /// A single_use profile has no token to lease.
    PoolEmpty,
    /// The token file could not be written (SPEC §4.4).
    TokenFileWriteFailed,
}

/// Whether a profile's token file holds its token (SPEC §4.4), as its
/// writer reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileState {
    /// No token written (none yet, or the last one was removed).
    NotWritten = 0,
    /// The file holds a token that was servable when written.
    Written = 1,
    /// The last write failed; it is being retried.
    WriteFailed = 2,
}

impl NotReadyReason {
    /// The snake_case name `/readyz` reports.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NoTokenYet => "no_token_yet",
            Self::TokenExpired => "token_expired",
            Self::TokenRejected => "token_rejected",
            Self::PoolEmpty => "pool_empty",
            Self::TokenFileWriteFailed => "token_file_write_failed",
        }
    }
}

/// A lease that waits in the pool's queue; leaving (given up, or the
/// handler dropped) takes it out, and a token granted meanwhile goes back
/// to the pool, never handed out.
struct Waiting<'a> {
    pool: &'a Mutex<Pool>,
    id: u64,
    reply: oneshot::Receiver<Grant>,
}

impl Waiting<'_> {
    /// Leaves the queue; a grant that arrived meanwhile is the answer.
    fn leave(&mut self) -> Option<Grant> {
        lock(self.pool).cancel(self.id);
        self.reply.try_recv().ok()
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if let Some(Grant::Token { pooled, .. }) = self.leave() {
            lock(self.pool).restore(pooled, Instant::now());
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Shared between the refresh task and the HTTP handlers.
#[derive(Debug)]
pub struct TokenStore {
    current: ArcSwapOption<Token>,
    /// What the process knows of the tokens it held (shared by every
    /// profile). Its lock also orders storing a token against rejecting
    /// one, so a token rejected while a fetch brings it back is never
    /// stored again.
    ledger: Arc<TokenLedger>,
    /// single_use profiles: the lease pool (then `current` stays empty).
    pool: Option<Mutex<Pool>>,
    /// The other profiles' stores: a token rejected here is dropped there
    /// too if they hold it (profiles of one key pair may be sent the same
    /// token), so no route of any profile serves it again.
    others: OnceLock<Vec<Weak<TokenStore>>>,
    state: watch::Sender<RefreshState>,
    /// Bumped whenever `current` changes (a new token, a rejection), for
    /// consumers that follow the token itself (the token file).
    token_changes: watch::Sender<u64>,
    /// The token file's state ([`FileState`]), when the profile has one.
    file: Option<AtomicU8>,
    /// The last current token reported rejected here (not through the
    /// fleet), for the fleet to tell the other sidecars.
    rejections: watch::Sender<Option<TokenDigest>>,
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
            ledger: Arc::new(TokenLedger::default()),
            pool: None,
            others: OnceLock::new(),
            state: watch::Sender::new(RefreshState::default()),
            token_changes: watch::Sender::new(0),
            file: None,
            rejections: watch::Sender::new(None),
            demand: Mutex::new(Demand::default()),
            demand_signal: Notify::new(),
            serve_margin,
            min_interval,
            wait,
        }
    }

    /// An empty store for a single_use profile: its refresh task keeps
    /// `pool_size` tokens ready to lease, and nothing is ever served
    /// twice.
    pub fn single_use(
        serve_margin: Duration,
        min_interval: Duration,
        wait: Duration,
        pool_size: usize,
    ) -> Self {
        Self {
            pool: Some(Mutex::new(Pool::new(pool_size, serve_margin))),
            ..Self::new(serve_margin, min_interval, wait)
        }
    }

    /// Shares `ledger` with the other profiles' stores (the app gives every
    /// store the process's one ledger; a store on its own has its own).
    pub fn with_ledger(mut self, ledger: Arc<TokenLedger>) -> Self {
        self.ledger = ledger;
        self
    }

    /// The profile writes a token file: readiness waits for it.
    pub fn with_token_file(mut self) -> Self {
        self.file = Some(AtomicU8::new(FileState::NotWritten as u8));
        self
    }

    /// For the token file's writer: what the file now holds.
    pub fn set_file_state(&self, state: FileState) {
        if let Some(file) = &self.file {
            file.store(state as u8, Ordering::Release);
        }
    }

    /// The token file's state, if the profile has one.
    pub fn file_state(&self) -> Option<FileState> {
        self.file
            .as_ref()
            .map(|file| match file.load(Ordering::Acquire) {
                1 => FileState::Written,
                2 => FileState::WriteFailed,
                _ => FileState::NotWritten,
            })
    }

    /// Watches the token held: the value changes whenever a token is
    /// stored or dropped as rejected.
    pub fn watch_token(&self) -> watch::Receiver<u64> {
        self.token_changes.subscribe()
    }

    fn token_changed(&self) {
        self.token_changes.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Whether tokens are leased (single_use) rather than shared.
    pub fn is_single_use(&self) -> bool {
        self.pool.is_some()
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

    /// Replaces the token (the refresh task's job; public for tests),
    /// unless the process may not serve it (reported rejected, or leased
    /// as single-use): then it returns false and the store stays as it
    /// was.
    pub fn set_token(&self, token: Arc<Token>) -> bool {
        let now = Instant::now();
        let mut ledger = self.ledger.lock();
        if ledger.refuses_shared(&token, now).is_some() {
            return false;
        }
        ledger.hold_shared(&token, now);
        self.current.store(Some(token));
        drop(ledger);
        self.token_changed();
        true
    }

    /// Whether `token` was reported rejected (and has not expired).
    pub fn is_rejected(&self, token: &Token) -> bool {
        self.ledger.lock().is_rejected(token, Instant::now())
    }

    /// Why this profile may not take `token` from Klavi, if it may not:
    /// reported rejected (guarantee 11), or for a single_use profile held
    /// by this process before, in any profile (guarantee 12).
    pub fn refusal(&self, token: &Token) -> Option<Refusal> {
        let ledger = self.ledger.lock();
        let now = Instant::now();
        if self.is_single_use() {
            ledger.refuses_single_use(token, now)
        } else {
            ledger.refuses_shared(token, now)
        }
    }

    /// Klavi refused the token whose digest is `rejected`: if it is the
    /// current one, it is dropped and remembered until it expires, so no
    /// route of any profile serves it again, and a replacement is
    /// demanded at once. A token this profile held before is remembered
    /// rejected too, with no fetch. Compared in constant time; only the
    /// digest is kept.
    pub fn reject(&self, rejected: &TokenDigest) -> Rejection {
        let rejection = self.reject_here(rejected);
        if rejection == Rejection::Marked {
            self.rejections.send_replace(Some(*rejected));
        }
        rejection
    }

    /// Another sidecar of the fleet reports this token rejected: as
    /// [`Self::reject`], but not announced back to the fleet.
    pub fn reject_reported(&self, rejected: &TokenDigest) -> Rejection {
        self.reject_here(rejected)
    }

    /// Watches the current tokens reported rejected in this process.
    pub fn watch_rejections(&self) -> watch::Receiver<Option<TokenDigest>> {
        self.rejections.subscribe()
    }

    fn reject_here(&self, rejected: &TokenDigest) -> Rejection {
        let (rejection, dropped) = {
            let now = Instant::now();
            let mut ledger = self.ledger.lock();
            let rejection = match self.current.load_full() {
                Some(token) if token.digest() == rejected => {
                    ledger.reject(*rejected, token.expires_at(), now);
                    self.current.store(None);
                    Rejection::Marked
                }
                // Not current, but held before: remembered, and dropped
                // wherever another profile holds it.
                _ if ledger.reject_if_held(rejected, now) => Rejection::NotCurrent,
                _ => return Rejection::NotCurrent,
            };
            // Under the same lock, so no other profile stores it meanwhile.
            let dropped: Vec<Arc<TokenStore>> = self
                .others
                .get()
                .into_iter()
                .flatten()
                .filter_map(Weak::upgrade)
                .filter(|other| other.drop_if_current(rejected))
                .collect();
            (rejection, dropped)
        };
        if rejection == Rejection::Marked {
            self.token_changed();
            self.add_demand(|d| d.replacement = true);
        }
        for other in dropped {
            other.token_changed();
            other.add_demand(|d| d.replacement = true);
        }
        rejection
    }

    /// Drops the current token if it is `rejected` (the caller holds the
    /// ledger's lock); whether it did.
    fn drop_if_current(&self, rejected: &TokenDigest) -> bool {
        let holds = self
            .current
            .load()
            .as_ref()
            .is_some_and(|token| token.digest() == rejected);
        if holds {
            self.current.store(None);
        }
        holds
    }

    /// Tells this store about the other profiles' stores, so that a token
    /// rejected here is dropped wherever it is held (the app does this
    /// once, after building every store).
    pub fn know_others(&self, others: Vec<Weak<TokenStore>>) {
        let _ = self.others.set(others);
    }

    /// The token named rejected is gone and its replacement not yet here.
    pub fn awaiting_replacement(&self) -> bool {
        self.current.load().is_none() && lock(&self.demand).replacement
    }

    /// For a single_use profile's refresh task: puts a fetched token into
    /// the pool (or straight to a waiting lease); refused if this process
    /// held it before, in any profile.
    pub(crate) fn deposit(&self, pooled: Pooled) -> Result<(), Duplicate> {
        let Some(pool) = &self.pool else {
            return Err(Duplicate);
        };
        // The ledger's lock, then the pool's: the one order either is
        // taken in together.
        let mut ledger = self.ledger.lock();
        lock(pool).deposit(pooled, &mut ledger, Instant::now())
    }

    /// For a single_use profile's refresh task: when the next fetch is
    /// wanted (`Some(None)`: nothing is); `None` for a shared profile.
    pub(crate) fn pool_due(&self, now: Instant) -> Option<Option<Instant>> {
        self.pool.as_ref().map(|pool| lock(pool).due(now))
    }

    /// Tokens ready to lease now (0 for a shared profile).
    pub fn pooled(&self, now: Instant) -> usize {
        self.pool.as_ref().map_or(0, |pool| lock(pool).ready(now))
    }

    /// Whether the profile is ready, and if not why.
    pub fn readiness(&self, now: Instant) -> Readiness {
        if let Some(pool) = &self.pool {
            let pool = lock(pool);
            let ready = pool.ready(now);
            // A pool of size 0 fetches per lease: ready once a fetch has
            // brought a token that could be leased, while the last attempt
            // did not fail.
            let working = pool.proven() && self.state.borrow().last_error.is_none();
            return if ready > 0 || (pool.size() == 0 && working) {
                Readiness::Ready(None)
            } else {
                Readiness::NotReady(NotReadyReason::PoolEmpty)
            };
        }
        if let Some(token) = self.servable(now) {
            // With a token file, ready once the file holds a token.
            return match self.file_state() {
                Some(FileState::WriteFailed) => {
                    Readiness::NotReady(NotReadyReason::TokenFileWriteFailed)
                }
                Some(FileState::NotWritten) => Readiness::NotReady(NotReadyReason::NoTokenYet),
                Some(FileState::Written) | None => Readiness::Ready(Some(token.remaining(now))),
            };
        }
        Readiness::NotReady(if self.awaiting_replacement() {
            NotReadyReason::TokenRejected
        } else if self.current().is_some() {
            NotReadyReason::TokenExpired
        } else {
            NotReadyReason::NoTokenYet
        })
    }

    /// For the refresh task (and the app that starts it): publishes a
    /// change of state.
    pub(crate) fn update_state(&self, change: impl FnOnce(&mut RefreshState)) {
        self.state.send_modify(change);
    }

    /// For the refresh task: wakes when a handler records a demand.
    pub(crate) fn demand_signal(&self) -> &Notify {
        &self.demand_signal
    }

    /// For the refresh task: until when a demand still asks for a fetch
    /// (after dropping what is met, answered or expired), and the demand
    /// sequence seen.
    pub(crate) fn pending_demand(&self, now: Instant, state: &RefreshState) -> Pending {
        let token = self.current.load_full();
        let mut demand = lock(&self.demand);
        let until = demand.prune(now, token.as_deref(), state);
        Pending {
            until,
            seq: demand.seq,
            replacement: demand.replacement,
        }
    }

    /// A fetch succeeded within `refresh.min_interval_secs` of `now`: its
    /// token is the best Klavi gives now, and asking again would only
    /// hammer it.
    fn fetched_recently(&self, state: &RefreshState, now: Instant) -> bool {
        state
            .last_success_at
            .is_some_and(|at| now.saturating_duration_since(at) < self.min_interval)
    }

    fn add_demand(&self, change: impl FnOnce(&mut Demand)) -> u64 {
        let seq = {
            let mut demand = lock(&self.demand);
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
    ///
    /// When more than the margin is asked for (`min_ttl`) and a token
    /// fetched within `min_interval_secs`, or for this very request, falls
    /// short, the answer is [`UnavailableReason::MinTtlUnsatisfiable`] at
    /// once: fetching again so soon would bring no better token and only
    /// hammer Klavi. Otherwise one fetch, shared with every other waiter.
    pub async fn token_with(&self, min_remaining: Duration) -> Result<Served, Unavailable> {
        let margin = self.serve_margin;
        let wanted = min_remaining.max(margin);
        let beyond_margin = min_remaining > margin;
        let meets = |token: &Token, now: Instant| {
            token.remaining(now) >= wanted && token.is_servable(now, margin)
        };
        let unsatisfiable = |token: &Token, now: Instant| UnavailableReason::MinTtlUnsatisfiable {
            max_ttl_secs: token.remaining(now).as_secs(),
        };
        let now = Instant::now();
        let mut state = self.subscribe();
        let snapshot = state.borrow_and_update().clone();
        if let Some(token) = self.current() {
            if meets(&token, now) {
                return Ok(Served { token, at: now });
            }
            if beyond_margin
                && self.fetched_recently(&snapshot, now)
                && token.is_servable(now, margin)
            {
                return Err(self.unavailable(unsatisfiable(&token, now), now));
            }
        }
        let deadline = now + self.wait;
        let successes = snapshot.successes;
        let seq = self.add_demand(|d| {
            let merged = match d.min_remaining {
                Some(m) => MinRemaining {
                    wanted: m.wanted.max(wanted),
                    until: m.until.max(deadline),
                    successes: m.successes.max(successes),
                },
                None => MinRemaining {
                    wanted,
                    until: deadline,
                    successes,
                },
            };
            d.min_remaining = Some(merged);
        });
        self.wait_for(&mut state, seq, deadline, |snapshot| {
            let at = Instant::now();
            let token = self.current()?;
            if meets(&token, at) {
                return Some(Ok(Served { token, at }));
            }
            // A fetch succeeded since this request asked and still falls
            // short: that is the best Klavi gives now.
            let fetched_since = snapshot.successes > successes && snapshot.last_error.is_none();
            (beyond_margin && fetched_since && token.is_servable(at, margin))
                .then(|| Err(unsatisfiable(&token, at)))
        })
        .await
    }

    /// A freshly fetched token (after Klavi rejected the one the app had),
    /// sharing any fetch in flight. Within `refresh.min_interval_secs` of
    /// the last fetch, that fetch's token is returned without calling
    /// Klavi again; the flag says so.
    pub async fn force_refresh(&self) -> Result<(Served, bool), Unavailable> {
        let now = Instant::now();
        if self.fetched_recently(&self.state(), now)
            && let Some(token) = self.servable(now)
        {
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

    /// After Klavi refused `rejected`: if it is the current token, it is
    /// never served again and a fresh one is fetched at once (coalesced,
    /// not held back by `min_interval_secs`, within the budget) and
    /// returned; otherwise the current token is returned, waiting as
    /// `GET /token` would if none is servable, and nothing is fetched for
    /// it.
    pub async fn replace_rejected(
        &self,
        rejected: &TokenDigest,
    ) -> (Rejection, Result<Served, Unavailable>) {
        let rejection = self.reject(rejected);
        (rejection, self.token_with(Duration::ZERO).await)
    }

    /// A single_use profile's lease: a token no caller was given before,
    /// with at least `min_remaining` left (never less than the margin),
    /// from the pool or, when it has none, the next fetch, waiting up to
    /// `refresh.wait_ms`; waiters are served first come, first served.
    /// The flag says whether it had to wait.
    pub async fn lease(&self, min_remaining: Duration) -> Result<(Served, bool), Unavailable> {
        let now = Instant::now();
        let Some(pool) = &self.pool else {
            return Err(self.unavailable(UnavailableReason::Failed, now));
        };
        let mut state = self.subscribe();
        let snapshot = state.borrow_and_update().clone();
        let recently = min_remaining > self.serve_margin && self.fetched_recently(&snapshot, now);
        let (reply, receiver) = oneshot::channel();
        let queued = lock(pool).lease(now, min_remaining, recently, reply);
        let id = match queued {
            Lease::Now(token) => {
                // The pool may now be short: the refresh task looks.
                self.demand_signal.notify_one();
                return Ok((Served { token, at: now }, false));
            }
            Lease::Unsatisfiable { max_ttl_secs } => {
                let reason = UnavailableReason::MinTtlUnsatisfiable { max_ttl_secs };
                return Err(self.unavailable(reason, now));
            }
            Lease::Queued(id) => id,
        };
        let mut waiting = Waiting {
            pool,
            id,
            reply: receiver,
        };
        let seq = self.add_demand(|_| {});
        let successes_when_queued = snapshot.successes;
        let deadline = now + self.wait;
        let granted = |grant: Grant| match grant {
            Grant::Token { pooled, at } => Ok((
                Served {
                    token: pooled.token,
                    at,
                },
                true,
            )),
            Grant::Unsatisfiable { max_ttl_secs } => Err(self.unavailable(
                UnavailableReason::MinTtlUnsatisfiable { max_ttl_secs },
                Instant::now(),
            )),
        };
        loop {
            let snapshot = state.borrow_and_update().clone();
            let gave_up = match self.hopeless(&snapshot, seq, deadline) {
                Some(reason) => reason,
                None => tokio::select! {
                    grant = &mut waiting.reply => match grant {
                        Ok(grant) => return granted(grant),
                        Err(_) => UnavailableReason::TaskStopped,
                    },
                    changed = state.changed() => match changed {
                        Ok(()) => continue,
                        Err(_) => UnavailableReason::TaskStopped,
                    },
                    () = tokio::time::sleep_until(deadline) => {
                        if self.state.borrow().successes > successes_when_queued {
                            UnavailableReason::TakenByEarlierLeases
                        } else {
                            UnavailableReason::Timeout
                        }
                    }
                },
            };
            // A grant that arrived as the wait ended is still the answer.
            return match waiting.leave() {
                Some(grant) => granted(grant),
                None => Err(self.unavailable(gave_up, Instant::now())),
            };
        }
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
            (UnavailableReason::MinTtlUnsatisfiable { .. }, _) => Duration::ZERO,
            (_, Some(at)) => at.saturating_duration_since(now),
            (_, None) => Duration::from_secs(1),
        };
        // A wait cut short by the budget says so, whatever Klavi last said.
        let last_error = match reason {
            UnavailableReason::Failed
            | UnavailableReason::Timeout
            | UnavailableReason::TakenByEarlierLeases
                if state.budget_held && !state.fetching =>
            {
                Some(Category::LocalRateLimit)
            }
            _ => state.last_error,
        };
        Unavailable {
            reason,
            last_error,
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
        let min = |s: u64, until: Instant, successes: u64| {
            Some(MinRemaining {
                wanted: Duration::from_secs(s),
                until,
                successes,
            })
        };
        let d = |min_remaining: Option<MinRemaining>, after: Option<(u64, Instant)>| Demand {
            seq: 1,
            min_remaining,
            completion_after: after,
            replacement: false,
        };
        let state = |completed: u64, successes: u64| RefreshState {
            completed,
            successes,
            ..RefreshState::default()
        };
        // (demand, token, state, still active until)
        let cases = [
            (d(None, None), Some(&t100), state(0, 0), None),
            (d(min(50, later, 0), None), Some(&t100), state(0, 0), None), // met
            (
                d(min(150, later, 0), None),
                Some(&t100),
                state(0, 0),
                Some(later),
            ), // not met
            (d(min(150, later, 0), None), None, state(0, 0), Some(later)), // no token
            (d(min(150, earlier, 0), None), None, state(0, 0), None),     // expired
            // A success since the demand answered its handlers, met or not.
            (d(min(150, later, 2), None), Some(&t100), state(3, 3), None),
            // A failure since does not: they still wait.
            (
                d(min(150, later, 2), None),
                Some(&t100),
                state(3, 2),
                Some(later),
            ),
            (
                d(None, Some((3, later))),
                Some(&t100),
                state(3, 3),
                Some(later),
            ), // waits for a 4th
            (d(None, Some((3, later))), Some(&t100), state(4, 4), None), // got it
            (d(None, Some((3, earlier))), Some(&t100), state(3, 3), None), // expired
            (
                d(
                    min(150, earlier + Duration::from_secs(2), 3),
                    Some((3, later)),
                ),
                Some(&t100),
                state(3, 3),
                Some(later),
            ),
        ];
        for (mut demand, token, state, active) in cases {
            let before = demand;
            assert_eq!(demand.prune(now, token, &state), active, "{before:?}");
        }
        // A rejected token's replacement is wanted until a token is held.
        let mut replacing = Demand {
            replacement: true,
            ..Demand::default()
        };
        replacing.prune(now, None, &state(3, 3));
        assert!(replacing.replacement);
        replacing.prune(now, Some(&t100), &state(3, 3));
        assert!(!replacing.replacement);
    }
}
