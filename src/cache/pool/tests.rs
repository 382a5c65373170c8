use super::*;
use crate::cache::digests::TokenLedger;
use crate::secret::Secret;
use std::collections::HashSet;
use std::time::UNIX_EPOCH;

use proptest::prelude::*;

const MARGIN: Duration = Duration::from_secs(5);

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

/// A token named `name`, fetched at `at`, living `lifetime`, fresh for
/// half of it.
fn pooled(name: &str, at: Instant, lifetime: u64) -> Pooled {
    let token = Token::new(
        Secret::new(name),
        at,
        secs(lifetime),
        UNIX_EPOCH + secs(1_000_000 + lifetime),
    );
    Pooled {
        token: Arc::new(token),
        fresh_until: at + secs(lifetime / 2),
    }
}

fn name(token: &Token) -> String {
    token.value().expose().to_string()
}

fn lease_now(pool: &mut Pool, now: Instant, wanted: u64) -> Option<String> {
    let (tx, _rx) = oneshot::channel();
    match pool.lease(now, secs(wanted), false, tx) {
        Lease::Now(token) => Some(name(&token)),
        _ => None,
    }
}

#[test]
fn a_lease_takes_the_pooled_token_that_expires_first_among_those_with_enough_left() {
    let t0 = Instant::now();
    let ledger = TokenLedger::default();
    let mut pool = Pool::new(3, MARGIN);
    for (n, life) in [("long", 300), ("short", 20), ("mid", 100)] {
        pool.deposit(pooled(n, t0, life), &mut ledger.lock(), t0)
            .unwrap();
    }
    assert_eq!(pool.ready(t0), 3);
    assert_eq!(lease_now(&mut pool, t0, 50).as_deref(), Some("mid"));
    assert_eq!(lease_now(&mut pool, t0, 0).as_deref(), Some("short"));
    assert_eq!(lease_now(&mut pool, t0, 0).as_deref(), Some("long"));
    assert_eq!(lease_now(&mut pool, t0, 0), None, "each token once");
}

#[test]
fn tokens_past_the_serve_margin_are_dropped_never_leased() {
    let t0 = Instant::now();
    let ledger = TokenLedger::default();
    let mut pool = Pool::new(1, MARGIN);
    pool.deposit(pooled("a", t0, 30), &mut ledger.lock(), t0)
        .unwrap();
    // 25 s in, exactly the margin is left: still leasable.
    assert_eq!(pool.ready(t0 + secs(25)), 1);
    assert_eq!(pool.ready(t0 + secs(25) + Duration::from_millis(1)), 0);
    assert_eq!(
        lease_now(&mut pool, t0 + secs(25) + Duration::from_millis(1), 0),
        None
    );
    // A token already past the margin on arrival is not pooled either.
    let t1 = t0 + secs(100);
    pool.deposit(pooled("b", t1 - secs(28), 30), &mut ledger.lock(), t1)
        .unwrap();
    assert_eq!(pool.ready(t1), 0);
}

#[test]
fn waiters_are_served_first_come_first_served_each_with_a_different_token() {
    let t0 = Instant::now();
    let ledger = TokenLedger::default();
    let mut pool = Pool::new(0, MARGIN);
    let mut receivers = Vec::new();
    for _ in 0..3 {
        let (tx, rx) = oneshot::channel();
        assert!(matches!(
            pool.lease(t0, Duration::ZERO, false, tx),
            Lease::Queued(_)
        ));
        receivers.push(rx);
    }
    assert_eq!(pool.waiting(), 3);
    assert_eq!(pool.due(t0), Some(t0), "waiters want a fetch now");
    for n in ["a", "b", "c", "d"] {
        pool.deposit(pooled(n, t0, 60), &mut ledger.lock(), t0)
            .unwrap();
    }
    let got: Vec<String> = receivers
        .iter_mut()
        .map(|rx| match rx.try_recv() {
            Ok(Grant::Token { pooled, .. }) => name(&pooled.token),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(got, ["a", "b", "c"]);
    assert_eq!(pool.waiting(), 0);
    assert_eq!(pool.ready(t0), 1, "the fourth is pooled");
}

#[test]
fn a_grant_to_a_lease_gone_goes_to_the_next_waiter_and_a_restored_token_back_to_the_pool() {
    let t0 = Instant::now();
    let ledger = TokenLedger::default();
    let mut pool = Pool::new(0, MARGIN);
    let (gone_tx, gone_rx) = oneshot::channel();
    let (next_tx, mut next_rx) = oneshot::channel();
    let _ = pool.lease(t0, Duration::ZERO, false, gone_tx);
    let _ = pool.lease(t0, Duration::ZERO, false, next_tx);
    drop(gone_rx);
    pool.deposit(pooled("a", t0, 60), &mut ledger.lock(), t0)
        .unwrap();
    let Ok(Grant::Token { pooled: got, .. }) = next_rx.try_recv() else {
        panic!("the live waiter gets the token");
    };
    assert_eq!(name(&got.token), "a");
    // Granted, but its lease gave up before taking it: back in the pool,
    // and leasable (once).
    pool.restore(got, t0);
    assert_eq!(lease_now(&mut pool, t0, 0).as_deref(), Some("a"));
    assert_eq!(lease_now(&mut pool, t0, 0), None);
}

#[test]
fn a_token_klavi_sends_again_is_refused_until_it_expires() {
    let t0 = Instant::now();
    let ledger = TokenLedger::default();
    let mut pool = Pool::new(2, MARGIN);
    pool.deposit(pooled("a", t0, 60), &mut ledger.lock(), t0)
        .unwrap();
    assert_eq!(lease_now(&mut pool, t0, 0).as_deref(), Some("a"));
    assert_eq!(
        pool.deposit(pooled("a", t0, 60), &mut ledger.lock(), t0 + secs(1)),
        Err(Duplicate)
    );
    assert_eq!(
        pool.deposit(pooled("b", t0, 60), &mut ledger.lock(), t0 + secs(1)),
        Ok(())
    );
    assert_eq!(
        pool.deposit(pooled("b", t0, 60), &mut ledger.lock(), t0 + secs(1)),
        Err(Duplicate)
    );
    assert_eq!(pool.ready(t0 + secs(1)), 1);
}

#[test]
fn min_ttl_a_fresh_token_cannot_meet_is_answered_unsatisfiable() {
    let t0 = Instant::now();
    let ledger = TokenLedger::default();
    let mut pool = Pool::new(0, MARGIN);
    let (short_tx, mut short_rx) = oneshot::channel();
    let (any_tx, mut any_rx) = oneshot::channel();
    let _ = pool.lease(t0, secs(100), false, short_tx);
    let _ = pool.lease(t0, Duration::ZERO, false, any_tx);
    pool.deposit(pooled("a", t0, 60), &mut ledger.lock(), t0)
        .unwrap();
    assert!(matches!(
        short_rx.try_recv(),
        Ok(Grant::Unsatisfiable { max_ttl_secs: 60 })
    ));
    assert!(matches!(any_rx.try_recv(), Ok(Grant::Token { .. })));
    // Within min_interval of that fetch, the same ask is answered at once.
    let (tx, _rx) = oneshot::channel();
    assert!(matches!(
        pool.lease(t0 + secs(1), secs(100), true, tx),
        Lease::Unsatisfiable { max_ttl_secs: 59 }
    ));
    // Not fetched recently: it queues for a fetch instead.
    let (tx, _rx) = oneshot::channel();
    assert!(matches!(
        pool.lease(t0 + secs(1), secs(100), false, tx),
        Lease::Queued(_)
    ));
}

#[test]
fn when_the_next_fetch_is_due() {
    let t0 = Instant::now();
    // (pool size, tokens as (fetched s ago, lifetime), now offset, due)
    type Case = (usize, Vec<(u64, u64)>, Option<u64>);
    let cases: Vec<Case> = vec![
        (0, vec![], Some(0)),                   // size 0: one, to prove Klavi works
        (2, vec![], Some(0)),                   // empty: now
        (2, vec![(0, 60)], Some(0)),            // one short
        (2, vec![(0, 60), (0, 100)], Some(30)), // full: when the first goes stale
        (1, vec![(40, 60)], Some(0)),           // the only one is stale
        (1, vec![(40, 60), (0, 60)], Some(30)), // stale ones do not count
        (0, vec![(0, 60)], None),               // then nothing ahead
        (0, vec![(58, 60)], Some(0)),           // the last one was too short to lease
    ];
    for (size, tokens, due) in cases {
        let now = t0 + secs(100);
        let ledger = TokenLedger::default();
        let mut pool = Pool::new(size, MARGIN);
        for (i, (ago, life)) in tokens.iter().enumerate() {
            pool.deposit(
                pooled(&i.to_string(), now - secs(*ago), *life),
                &mut ledger.lock(),
                now,
            )
            .unwrap();
        }
        assert_eq!(
            pool.due(now),
            due.map(|s| now + secs(s)),
            "size {size}, tokens {tokens:?}"
        );
    }
}

#[derive(Debug, Clone)]
enum Op {
    /// A lease wanting this many seconds left (0: the margin).
    Lease(u64),
    /// A fetched token of this lifetime; `Some(i)`: the i-th token sent
    /// again.
    Deposit(u64, Option<usize>),
    /// Time passes.
    Advance(u64),
    /// The i-th queued lease gives up (its handler goes away).
    GiveUp(usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0u64..80).prop_map(Op::Lease),
        3 => (1u64..90, proptest::option::weighted(0.2, 0usize..50)).prop_map(|(l, d)| Op::Deposit(l, d)),
        2 => (0u64..30).prop_map(Op::Advance),
        1 => (0usize..20).prop_map(Op::GiveUp),
    ]
}

proptest! {
    /// No interleaving of leases, deposits (duplicates among them), time
    /// passing and leases giving up hands one token out twice, or hands out
    /// one with less left than was wanted.
    #[test]
    fn no_interleaving_hands_a_token_out_twice(
        size in 0usize..4,
        ops in proptest::collection::vec(op(), 1..120),
    ) {
        let t0 = Instant::now();
        let mut now = t0;
        let ledger = TokenLedger::default();
    let mut pool = Pool::new(size, MARGIN);
        let mut sent: Vec<Pooled> = Vec::new();
        let mut queued: Vec<(u64, Duration, oneshot::Receiver<Grant>)> = Vec::new();
        let mut handed: HashSet<String> = HashSet::new();
        let mut hand_out = |token: &Token, wanted: Duration, at: Instant| {
            let n = name(token);
            prop_assert!(handed.insert(n.clone()), "{n} handed out twice");
            prop_assert!(token.remaining(at) >= wanted.max(MARGIN), "{n} short");
            Ok(())
        };
        for op in ops {
            match op {
                Op::Lease(wanted) => {
                    let (tx, rx) = oneshot::channel();
                    match pool.lease(now, secs(wanted), false, tx) {
                        Lease::Now(token) => hand_out(&token, secs(wanted), now)?,
                        Lease::Queued(id) => queued.push((id, secs(wanted), rx)),
                        Lease::Unsatisfiable { .. } => {}
                    }
                }
                Op::Deposit(lifetime, again) => {
                    // A token sent again comes with its own expiry, as a
                    // JWT's `exp` fixes it.
                    let token = match again {
                        Some(i) if !sent.is_empty() => sent[i % sent.len()].clone(),
                        _ => pooled(&format!("t{}", sent.len()), now, lifetime),
                    };
                    sent.push(token.clone());
                    let _ = pool.deposit(token, &mut ledger.lock(), now);
                }
                Op::Advance(s) => now += secs(s),
                Op::GiveUp(i) if !queued.is_empty() => {
                    let (id, _, mut rx) = queued.remove(i % queued.len());
                    pool.cancel(id);
                    // What the store does when a lease goes away: a grant
                    // already sent goes back to the pool.
                    if let Ok(Grant::Token { pooled, .. }) = rx.try_recv() {
                        pool.restore(pooled, now);
                    }
                }
                Op::GiveUp(_) => {}
            }
            let mut still = Vec::new();
            for (id, wanted, mut rx) in queued.drain(..) {
                match rx.try_recv() {
                    Ok(Grant::Token { pooled, at }) => hand_out(&pooled.token, wanted, at)?,
                    Ok(Grant::Unsatisfiable { .. }) => {}
                    Err(_) => still.push((id, wanted, rx)),
                }
            }
            queued = still;
            prop_assert_eq!(pool.waiting(), queued.len());
        }
    }
}
