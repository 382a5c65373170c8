//! The lease pool of a single_use profile: tokens fetched ahead, each
//! handed out at most once (SPEC §4.2, guarantee 12).
//!
//! Plain data, no clock and no IO: the caller passes `now`; the refresh
//! task deposits what it fetches and asks [`Pool::due`] when to fetch
//! next; handlers lease. A lease takes the pooled token that expires
//! first among those with enough time left, or queues: waiters are served
//! first come, first served as tokens arrive, each through its own
//! one-shot channel, so one token can reach one caller only.
//!
//! A token is *fresh* until its refresh point (the policy's schedule for a
//! shared token): the pool fetches until it holds `size` fresh ones, and
//! stale ones stay leasable, first, until the serve margin. A deposit asks
//! the process's [`TokenLedger`](super::digests::TokenLedger) first, so a
//! token this process held before, in any profile, is refused rather than
//! handed out a second time.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::time::Instant;

use super::digests::LedgerGuard;
use super::token::Token;

/// A pooled token and when it stops being fresh.
#[derive(Debug, Clone)]
pub struct Pooled {
    /// The token.
    pub token: Arc<Token>,
    /// Its refresh point: after it, the pool fetches a replacement while
    /// it stays leasable.
    pub fresh_until: Instant,
}

/// What a queued lease receives.
#[derive(Debug)]
pub enum Grant {
    /// A token, judged servable with what the lease wanted at `at`.
    Token {
        /// The token.
        pooled: Pooled,
        /// When it was judged.
        at: Instant,
    },
    /// A freshly fetched token falls short of what the lease wanted: that
    /// is the best Klavi gives now (`min_ttl_unsatisfiable`).
    Unsatisfiable {
        /// Whole seconds the fresh token had left.
        max_ttl_secs: u64,
    },
}

/// What [`Pool::lease`] did.
#[derive(Debug)]
pub enum Lease {
    /// A pooled token, taken now.
    Now(Arc<Token>),
    /// A token fetched within `min_interval_secs` falls short of what is
    /// wanted: fetching again so soon would not do better.
    Unsatisfiable {
        /// Whole seconds that token has left.
        max_ttl_secs: u64,
    },
    /// No pooled token will do: queued under this id, to be granted
    /// through the channel.
    Queued(u64),
}

/// A token the pool already had or handed out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Duplicate;

#[derive(Debug)]
struct Waiter {
    id: u64,
    wanted: Duration,
    reply: oneshot::Sender<Grant>,
}

/// The pool.
#[derive(Debug)]
pub struct Pool {
    size: usize,
    margin: Duration,
    ready: Vec<Pooled>,
    waiters: VecDeque<Waiter>,
    /// Expiry of the last token deposited: what a fetch now would bring.
    latest_expiry: Option<Instant>,
    /// The last token deposited could be leased (servable on arrival).
    proven: bool,
    next_id: u64,
}

impl Pool {
    /// An empty pool that keeps `size` fresh tokens and never leases one
    /// with less than `margin` left.
    pub fn new(size: usize, margin: Duration) -> Self {
        Self {
            size,
            margin,
            ready: Vec::new(),
            waiters: VecDeque::new(),
            latest_expiry: None,
            proven: false,
            next_id: 0,
        }
    }

    /// How many fresh tokens it keeps.
    pub fn size(&self) -> usize {
        self.size
    }

    fn prune(&mut self, now: Instant) {
        let margin = self.margin;
        self.ready.retain(|p| p.token.is_servable(now, margin));
        self.waiters.retain(|w| !w.reply.is_closed());
    }

    /// A token with at least `wanted` left (never less than the margin):
    /// the pooled one that expires first among those that have it. Else,
    /// when `fetched_recently` and the last token fetched falls short,
    /// [`Lease::Unsatisfiable`]; else a place in the queue, answered
    /// through `reply`.
    pub fn lease(
        &mut self,
        now: Instant,
        wanted: Duration,
        fetched_recently: bool,
        reply: oneshot::Sender<Grant>,
    ) -> Lease {
        self.prune(now);
        let wanted = wanted.max(self.margin);
        let best = self
            .ready
            .iter()
            .enumerate()
            .filter(|(_, p)| p.token.remaining(now) >= wanted)
            .min_by_key(|(_, p)| p.token.expires_at())
            .map(|(index, _)| index);
        if let Some(index) = best {
            return Lease::Now(self.ready.swap_remove(index).token);
        }
        if fetched_recently
            && let Some(expiry) = self.latest_expiry
            && expiry.saturating_duration_since(now) < wanted
        {
            return Lease::Unsatisfiable {
                max_ttl_secs: expiry.saturating_duration_since(now).as_secs(),
            };
        }
        self.next_id += 1;
        let id = self.next_id;
        self.waiters.push_back(Waiter { id, wanted, reply });
        Lease::Queued(id)
    }

    /// Leaves the queue (the lease gave up or went away).
    pub fn cancel(&mut self, id: u64) {
        self.waiters.retain(|w| w.id != id);
    }

    /// A token just fetched: to the first waiter it satisfies, else into
    /// the pool. Waiters it falls short of are told so, since a fresh
    /// token is the best Klavi gives now. A token `ledger` says this
    /// process held before is refused, and one taken is recorded there.
    pub fn deposit(
        &mut self,
        pooled: Pooled,
        ledger: &mut LedgerGuard<'_>,
        now: Instant,
    ) -> Result<(), Duplicate> {
        let token = &pooled.token;
        if ledger.refuses_single_use(token, now).is_some() {
            return Err(Duplicate);
        }
        ledger.hold_single_use(token, now);
        self.latest_expiry = Some(token.expires_at());
        self.proven = token.is_servable(now, self.margin);
        self.give(pooled, now, true);
        Ok(())
    }

    /// Puts back a granted token whose lease went away before taking it:
    /// it was never handed out.
    pub fn restore(&mut self, pooled: Pooled, now: Instant) {
        self.give(pooled, now, false);
    }

    fn give(&mut self, pooled: Pooled, now: Instant, fresh: bool) {
        self.prune(now);
        if !pooled.token.is_servable(now, self.margin) {
            return;
        }
        let remaining = pooled.token.remaining(now);
        let mut pooled = pooled;
        let mut index = 0;
        while index < self.waiters.len() {
            let wanted = self.waiters[index].wanted;
            if remaining >= wanted {
                let Some(waiter) = self.waiters.remove(index) else {
                    break;
                };
                match waiter.reply.send(Grant::Token { pooled, at: now }) {
                    Ok(()) => return,
                    // Gone since the prune: the next waiter, then.
                    Err(Grant::Token { pooled: back, .. }) => pooled = back,
                    Err(Grant::Unsatisfiable { .. }) => return,
                }
            } else if fresh {
                if let Some(waiter) = self.waiters.remove(index) {
                    let _ = waiter.reply.send(Grant::Unsatisfiable {
                        max_ttl_secs: remaining.as_secs(),
                    });
                }
            } else {
                index += 1;
            }
        }
        self.ready.push(pooled);
    }

    /// When the next fetch is wanted: now while leases wait or fewer than
    /// `size` fresh tokens are held, else when the first fresh one goes
    /// stale; with `size` 0 and no lease waiting, now until a token that
    /// could be leased has come, then `None`.
    pub fn due(&self, now: Instant) -> Option<Instant> {
        if self.waiters.iter().any(|w| !w.reply.is_closed()) {
            return Some(now);
        }
        let mut fresh: Vec<Instant> = self
            .ready
            .iter()
            .filter(|p| p.fresh_until > now && p.token.is_servable(now, self.margin))
            .map(|p| p.fresh_until)
            .collect();
        if self.size == 0 {
            // Nothing ahead, but one token that could be leased, so that
            // readiness says whether Klavi gives usable ones.
            return (!self.proven).then_some(now);
        }
        if fresh.len() < self.size {
            return Some(now);
        }
        // When one more goes stale than the pool may spare.
        fresh.sort_unstable();
        fresh.get(fresh.len() - self.size).copied()
    }

    /// Whether the last token deposited could be leased.
    pub fn proven(&self) -> bool {
        self.proven
    }

    /// Tokens a lease could take now.
    pub fn ready(&self, now: Instant) -> usize {
        self.ready
            .iter()
            .filter(|p| p.token.is_servable(now, self.margin))
            .count()
    }

    /// Leases waiting.
    pub fn waiting(&self) -> usize {
        self.waiters.iter().filter(|w| !w.reply.is_closed()).count()
    }
}

#[cfg(test)]
mod tests;
