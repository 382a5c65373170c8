//! Serving a router on a listener, with the limits a sidecar needs.
//!
//! axum's own `serve` has no knobs for hostile clients, so connections are
//! driven by hyper directly:
//! - a header read timeout: slow-header clients, and keep-alive connections
//!   idle for that long, are closed;
//! - a header size limit, answered 431;
//! - a cap on open connections (`max_connections`), with eviction of
//!   connections that hold a slot without being served: a silent newcomer
//!   past half a second, or a client that stopped reading its responses
//!   (`super::connection`). Keep-alive connections of clients that read
//!   are never evicted, so no request they have written is lost;
//! - an overflow lane: while every slot is taken, a newcomer is still
//!   served, one request on a connection that then closes, with a short
//!   header timeout, up to a few dozen at once; an overflow connection
//!   that does not send its request within 100 ms gives its place to the
//!   next newcomer. So however the regular slots are held (busy keep-alive
//!   clients, non-readers, slow headers) and however fast idle sockets
//!   reconnect, a probe gets its answer without waiting for a timeout;
//! - on shutdown, every connection is asked to finish its request in
//!   flight and close; whatever is left just before the grace ends is cut
//!   off, so the process exits within it.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

pub use super::connection::FastPath;
use super::connection::{Connection, FRESH_GRACE, OVERFLOW_GRACE, Registry, Tracked, Watched};
pub use super::listener::{BindError, ListenAddr, bind};
use super::listener::{Listener, Peer, Stream};

/// Protections applied to every connection (the `server.*` limits).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Time allowed to send a request's headers; also how long a keep-alive
    /// connection may sit idle.
    pub header_read_timeout: Duration,
    /// Largest request head accepted; larger ones get 431.
    pub max_header_bytes: usize,
    /// Open connections at most.
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(5),
            max_header_bytes: 16 * 1024,
            max_connections: 512,
        }
    }
}

/// How often a newcomer waiting at the cap looks for an evictable
/// connection again.
const EVICTION_RETRY: Duration = Duration::from_millis(20);

/// Header read timeout of the overflow lane: a newcomer there must send
/// its request promptly.
const OVERFLOW_HEADER_TIMEOUT: Duration = Duration::from_secs(1);

/// Longest an overflow connection lives, whatever its client does.
const OVERFLOW_LIFETIME: Duration = Duration::from_secs(30);

/// How much of the grace is kept for cutting off what is left, so the
/// process exits within it.
const CUT_OFF_RESERVE: Duration = Duration::from_millis(250);

/// Connections the overflow lane serves at once, for a listener of
/// `max_connections`: a quarter as many, at least 64. Each lives one
/// request, or 100 ms if it sends nothing while newcomers wait, so the lane
/// turns over hundreds of newcomers a second whatever idle sockets do.
pub fn overflow_slots(max_connections: usize) -> usize {
    (max_connections / 4).clamp(64, 1024)
}

/// What every connection of one listener shares.
struct Shared {
    name: &'static str,
    router: Router,
    fast: Option<FastPath>,
    regular: hyper::server::conn::http1::Builder,
    overflow: hyper::server::conn::http1::Builder,
    registry: Arc<Registry>,
    overflow_registry: Arc<Registry>,
    tasks: TaskTracker,
    shutdown: CancellationToken,
    cut_off: CancellationToken,
}

/// Serves `router` on `listener` until `shutdown`, then stops accepting,
/// lets requests in flight finish for up to `grace` and closes the rest.
pub async fn serve(
    name: &'static str,
    listener: impl Into<Listener>,
    router: Router,
    fast: Option<FastPath>,
    limits: Limits,
    shutdown: CancellationToken,
    grace: Duration,
) {
    let listener = listener.into();
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let overflow_slots = Arc::new(Semaphore::new(overflow_slots(limits.max_connections)));
    let mut regular = hyper::server::conn::http1::Builder::new();
    regular
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_header_size(limits.max_header_bytes)
        .max_buf_size(limits.max_header_bytes.max(8192) * 2)
        .keep_alive(true);
    let mut overflow = regular.clone();
    overflow
        .header_read_timeout(limits.header_read_timeout.min(OVERFLOW_HEADER_TIMEOUT))
        .keep_alive(false);
    let shared = Arc::new(Shared {
        name,
        router,
        fast,
        regular,
        overflow,
        registry: Arc::new(Registry::new(FRESH_GRACE)),
        overflow_registry: Arc::new(Registry::new(OVERFLOW_GRACE)),
        tasks: TaskTracker::new(),
        shutdown: shutdown.clone(),
        cut_off: CancellationToken::new(),
    });

    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                // Out of file descriptors and the like: don't spin.
                tracing::warn!(listener = name, %error, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // A free slot, or one an evictable connection gives up; else the
        // overflow lane; else wait for any of them.
        let mut logged = false;
        loop {
            let slot = Arc::clone(&slots)
                .try_acquire_owned()
                .ok()
                .or_else(|| shared.registry.evict_one());
            if let Some(slot) = slot {
                let connection = shared.registry.add(slot);
                spawn_regular(&shared, stream, peer, connection);
                break;
            }
            let overflow_slot = Arc::clone(&overflow_slots)
                .try_acquire_owned()
                .ok()
                .or_else(|| shared.overflow_registry.evict_one());
            if let Some(slot) = overflow_slot {
                let connection = shared.overflow_registry.add(slot);
                let shared2 = Arc::clone(&shared);
                shared.tasks.spawn(async move {
                    let lane = (&shared2.overflow, OVERFLOW_GRACE);
                    let driven = drive(&shared2, lane, (stream, peer), &connection);
                    let _ = tokio::time::timeout(OVERFLOW_LIFETIME, driven).await;
                    shared2.overflow_registry.remove(&connection);
                });
                break;
            }
            if !logged {
                tracing::debug!(
                    listener = name,
                    "connection limit and overflow lane full; waiting for a slot"
                );
                logged = true;
            }
            tokio::select! {
                () = shutdown.cancelled() => {
                    drop(stream);
                    return drain(&shared, listener, grace).await;
                }
                permit = Arc::clone(&slots).acquire_owned() => {
                    let Ok(slot) = permit else {
                        return drain(&shared, listener, grace).await;
                    };
                    let connection = shared.registry.add(slot);
                    spawn_regular(&shared, stream, peer, connection);
                    break;
                }
                _ = overflow_slots.acquire() => {}
                () = tokio::time::sleep(EVICTION_RETRY) => {}
            }
        }
    }
    drain(&shared, listener, grace).await;
}

fn spawn_regular(shared: &Arc<Shared>, stream: Stream, peer: Peer, connection: Arc<Connection>) {
    let shared2 = Arc::clone(shared);
    shared.tasks.spawn(async move {
        let lane = (&shared2.regular, FRESH_GRACE);
        drive(&shared2, lane, (stream, peer), &connection).await;
        shared2.registry.remove(&connection);
    });
}

/// Stops accepting, waits for the connections to finish their requests and
/// close until just before `grace` ends, then cuts off the rest.
async fn drain(shared: &Shared, listener: Listener, grace: Duration) {
    drop(listener);
    shared.tasks.close();
    let patience = grace.saturating_sub(CUT_OFF_RESERVE);
    if tokio::time::timeout(patience, shared.tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            listener = shared.name,
            grace_secs = grace.as_secs(),
            "connections still open at the end of the shutdown grace; closing them"
        );
        shared.cut_off.cancel();
        shared.tasks.wait().await;
    }
}

/// Runs one connection of a lane (its builder and eviction grace) until
/// it ends: closing it gracefully on shutdown; when evicted, at once if its
/// client stopped reading, else as soon as a read finds nothing; and at
/// once when cut off.
async fn drive(
    shared: &Shared,
    (builder, grace): (&hyper::server::conn::http1::Builder, Duration),
    (stream, peer): (Stream, Peer),
    connection: &Arc<Connection>,
) {
    // The connection's span names its peer (a unix socket's by pid, uid
    // and gid), so every request line logged within it does too.
    let span = tracing::debug_span!("connection", listener = shared.name, peer = %peer);
    let io = Watched::new(stream, Arc::clone(connection));
    let service = Tracked::new(
        shared.router.clone(),
        shared.fast.clone(),
        Arc::clone(connection),
        peer,
    );
    async move {
        let conn = builder.serve_connection(TokioIo::new(io), service);
        tokio::pin!(conn);
        let mut closing = false;
        let mut evicted = false;
        loop {
            tokio::select! {
                result = conn.as_mut() => {
                    if let Err(error) = result {
                        tracing::debug!(listener = shared.name, %error, "connection ended with an error");
                    }
                    return;
                }
                () = shared.shutdown.cancelled(), if !closing => {
                    conn.as_mut().graceful_shutdown();
                    closing = true;
                }
                () = connection.evict.notified(), if !evicted => {
                    // A client that does not read is cut: what it has not read
                    // it was not going to. Otherwise this only wakes the
                    // connection: polled again, it reads, and `Watched` ends it
                    // unless a request has arrived, which is answered first.
                    if connection.write_blocked(Instant::now(), grace) {
                        return;
                    }
                    evicted = true;
                }
                () = shared.cut_off.cancelled() => return,
            }
        }
    }
    .instrument(span)
    .await
}
