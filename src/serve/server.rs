//! Serving a router on a listener, with the limits a sidecar needs.
//!
//! axum's own `serve` has no knobs for hostile clients, so connections are
//! driven by hyper directly:
//! - a header read timeout: slow-header clients, and keep-alive connections
//!   idle for that long, are closed;
//! - a header size limit, answered 431;
//! - a cap on open connections. When it is reached, a newcomer takes the
//!   slot of an idle connection: the oldest that has never sent a complete
//!   request and is past a half-second grace (a flood of idle or half-sent
//!   connections); or, once the newcomer has waited that grace itself and
//!   there is no such connection, the keep-alive connection idle the
//!   longest, even one that has served requests. So busy keep-alive
//!   clients cannot hold every slot and starve kubelet's probes (a newcomer
//!   gets a slot within about half a second whenever any connection is
//!   between requests), while an app's pooled connection outlives a flood
//!   of new ones. A request in progress is never cut, and an evicted
//!   connection is closed only when a read finds nothing (a request that
//!   arrived meanwhile is answered, not reset);
//! - on shutdown, every connection is asked to finish its request in
//!   flight and close; whatever is left after the grace is cut off.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt as _;

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

/// One open connection, as the eviction logic sees it.
#[derive(Debug)]
struct Connection {
    /// Requests in progress on it.
    busy: AtomicUsize,
    /// Its last read found nothing to read: the client is not sending.
    waiting: AtomicBool,
    /// It has answered a request (a keep-alive connection of a real client).
    served: AtomicBool,
    /// When it was accepted.
    accepted_at: Instant,
    /// The registry's tick at its last activity (accept, end of a request):
    /// the smallest is the connection idle the longest. A counter, not a
    /// clock, so marking activity costs no clock read on the hot path.
    last_active: AtomicU64,
    /// The registry's activity counter.
    ticks: Arc<AtomicU64>,
    /// Asked to close.
    evicted: AtomicBool,
    /// Wakes the connection's task to close it.
    evict: Notify,
    /// Its slot under `max_connections`; handed straight to the newcomer
    /// when the connection is evicted, so the newcomer need not wait for
    /// the close to finish.
    slot: Mutex<Option<OwnedSemaphorePermit>>,
}

/// How often a newcomer waiting at the cap looks for an evictable
/// connection again.
const EVICTION_RETRY: Duration = Duration::from_millis(20);

/// A fresh connection gets this long to send a request before it may be
/// evicted: real clients write right after connecting, so a burst loses
/// no request, while idle and slow-header connections are cut long before
/// the header timeout.
const FRESH_GRACE: Duration = Duration::from_millis(500);

impl Connection {
    /// Marks activity now: it becomes the most recently active.
    fn touch(&self) {
        let tick = self.ticks.fetch_add(1, Ordering::Relaxed);
        self.last_active.store(tick, Ordering::Relaxed);
    }

    /// Whether it may be evicted, and in which rank: no request in
    /// progress, nothing being sent, not evicted already; then either a
    /// connection that never sent a request, past [`FRESH_GRACE`] (rank 0,
    /// evicted first), or one that has served requests (rank 1). A fresh
    /// connection inside its grace is kept: it is a burst about to send.
    fn eviction_rank(&self) -> Option<(u8, u64)> {
        let idle = self.busy.load(Ordering::Acquire) == 0
            && self.waiting.load(Ordering::Acquire)
            && !self.evicted.load(Ordering::Acquire);
        if !idle {
            return None;
        }
        let last_active = self.last_active.load(Ordering::Relaxed);
        if self.served.load(Ordering::Acquire) {
            Some((1, last_active))
        } else if self.accepted_at.elapsed() >= FRESH_GRACE {
            Some((0, last_active))
        } else {
            None
        }
    }
}

/// The open connections, oldest first.
#[derive(Debug, Default)]
struct Registry {
    open: Mutex<VecDeque<Arc<Connection>>>,
    /// Activity counter shared with the connections.
    ticks: Arc<AtomicU64>,
}

impl Registry {
    fn add(&self, slot: OwnedSemaphorePermit) -> Arc<Connection> {
        self.add_accepted(slot, Instant::now())
    }

    fn add_accepted(&self, slot: OwnedSemaphorePermit, accepted_at: Instant) -> Arc<Connection> {
        let connection = Arc::new(Connection {
            busy: AtomicUsize::new(0),
            waiting: AtomicBool::new(false),
            served: AtomicBool::new(false),
            accepted_at,
            last_active: AtomicU64::new(0),
            ticks: Arc::clone(&self.ticks),
            evicted: AtomicBool::new(false),
            evict: Notify::new(),
            slot: Mutex::new(Some(slot)),
        });
        connection.touch();
        self.lock().push_back(Arc::clone(&connection));
        connection
    }

    /// Forgets a closed connection and frees its slot (unless an eviction
    /// already handed the slot on).
    fn remove(&self, connection: &Arc<Connection>) {
        let mut open = self.lock();
        if let Some(i) = open.iter().position(|c| Arc::ptr_eq(c, connection)) {
            open.remove(i);
        }
        drop(
            connection
                .slot
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take(),
        );
    }

    /// Asks the best candidate for eviction to close and takes its slot, if
    /// there is one: a silent newcomer past its grace, oldest first, else
    /// (if `keep_alive_too`) the keep-alive connection idle the longest.
    fn evict_idle(&self, keep_alive_too: bool) -> Option<OwnedSemaphorePermit> {
        let open = self.lock();
        let idle = open
            .iter()
            .filter_map(|c| Some((c.eviction_rank()?, c)))
            .filter(|((rank, _), _)| *rank == 0 || keep_alive_too)
            .min_by_key(|(rank, _)| *rank)
            .map(|(_, c)| c)?;
        idle.evicted.store(true, Ordering::Release);
        idle.evict.notify_one();
        idle.slot
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Arc<Connection>>> {
        self.open.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Counts a request as in progress on its connection until dropped.
struct Busy(Arc<Connection>);

impl Busy {
    fn new(connection: &Arc<Connection>) -> Self {
        connection.busy.fetch_add(1, Ordering::AcqRel);
        Self(Arc::clone(connection))
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.served.store(true, Ordering::Release);
        self.0.touch();
        self.0.busy.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The socket, recording on its connection whether the last read found
/// nothing to read, and reading as closed once evicted with nothing to
/// read.
struct Watched {
    stream: TcpStream,
    connection: Arc<Connection>,
}

impl tokio::io::AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.stream).poll_read(cx, buf);
        if result.is_pending() && self.connection.evicted.load(Ordering::Acquire) {
            // Evicted, and the client is sending nothing right now: end the
            // connection as if the client had closed it. Closing it from
            // outside instead could leave a request that arrived since the
            // last read unread, and the close would reset it.
            return std::task::Poll::Ready(Ok(()));
        }
        let waiting = match &result {
            std::task::Poll::Pending => true,
            std::task::Poll::Ready(Ok(())) => buf.filled().len() == before,
            std::task::Poll::Ready(Err(_)) => true,
        };
        self.connection.waiting.store(waiting, Ordering::Release);
        result
    }
}

impl tokio::io::AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// The router as a hyper service that marks its connection busy while a
/// request is in progress.
#[derive(Clone)]
struct Tracked {
    router: Router,
    fast: Option<FastPath>,
    connection: Arc<Connection>,
}

/// Answers the requests it can answer at once, without the router and its
/// middleware (the `GET /token` hot path); `None` sends the request on to
/// the router. It must answer exactly as the router would.
pub type FastPath =
    Arc<dyn Fn(&http::Request<Incoming>) -> Option<http::Response<Body>> + Send + Sync>;

/// A response now (fast path), or the router's future.
enum ResponseFuture {
    Ready(Option<http::Response<Body>>),
    Routed(Pin<Box<dyn Future<Output = Result<http::Response<Body>, Infallible>> + Send>>),
}

impl Future for ResponseFuture {
    type Output = Result<http::Response<Body>, Infallible>;

    fn poll(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        match self.get_mut() {
            Self::Ready(response) => {
                std::task::Poll::Ready(Ok(response.take().unwrap_or_default()))
            }
            Self::Routed(future) => future.as_mut().poll(cx),
        }
    }
}

impl hyper::service::Service<http::Request<Incoming>> for Tracked {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = ResponseFuture;

    fn call(&self, request: http::Request<Incoming>) -> Self::Future {
        if let Some(response) = self.fast.as_ref().and_then(|fast| fast(&request)) {
            self.connection.served.store(true, Ordering::Release);
            self.connection.touch();
            return ResponseFuture::Ready(Some(response));
        }
        let busy = Busy::new(&self.connection);
        let response = self.router.clone().oneshot(request.map(Body::new));
        ResponseFuture::Routed(Box::pin(async move {
            let response = response.await;
            drop(busy);
            response
        }))
    }
}

/// Serves `router` on `listener` until `shutdown`, then stops accepting,
/// lets requests in flight finish for up to `grace` and closes the rest.
pub async fn serve(
    name: &'static str,
    listener: TcpListener,
    router: Router,
    fast: Option<FastPath>,
    limits: Limits,
    shutdown: CancellationToken,
    grace: Duration,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let registry = Arc::new(Registry::default());
    let tasks = TaskTracker::new();
    let cut_off = CancellationToken::new();
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_header_size(limits.max_header_bytes)
        .max_buf_size(limits.max_header_bytes.max(8192) * 2)
        .keep_alive(true);

    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _peer)) => stream,
            Err(error) => {
                // Out of file descriptors and the like: don't spin.
                tracing::warn!(listener = name, %error, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let permit = match Arc::clone(&slots).try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                // At the cap: take the slot of a connection idle long
                // enough, or wait for one to close or become evictable. A
                // keep-alive connection that has served requests is taken
                // only after this newcomer has waited the grace: silent
                // newcomers of a flood go first.
                let mut waited = false;
                let since = Instant::now();
                loop {
                    if let Some(permit) = registry.evict_idle(since.elapsed() >= FRESH_GRACE) {
                        break permit;
                    }
                    if !waited {
                        tracing::debug!(
                            listener = name,
                            "connection limit reached; waiting for a slot"
                        );
                        waited = true;
                    }
                    tokio::select! {
                        () = shutdown.cancelled() => return drain(name, listener, tasks, cut_off, grace).await,
                        permit = Arc::clone(&slots).acquire_owned() => match permit {
                            Ok(permit) => break permit,
                            Err(_) => return drain(name, listener, tasks, cut_off, grace).await,
                        },
                        () = tokio::time::sleep(EVICTION_RETRY) => {}
                    }
                }
            }
        };
        let connection = registry.add(permit);
        let service = Tracked {
            router: router.clone(),
            fast: fast.clone(),
            connection: Arc::clone(&connection),
        };
        let builder = builder.clone();
        let (shutdown, cut_off, registry) =
            (shutdown.clone(), cut_off.clone(), Arc::clone(&registry));
        tasks.spawn(async move {
            drive(
                name,
                stream,
                &builder,
                service,
                &connection,
                &shutdown,
                &cut_off,
            )
            .await;
            registry.remove(&connection);
        });
    }
    drain(name, listener, tasks, cut_off, grace).await;
}

/// Stops accepting, waits up to `grace` for the connections to finish
/// their requests and close, then cuts off the rest.
async fn drain(
    name: &'static str,
    listener: TcpListener,
    tasks: TaskTracker,
    cut_off: CancellationToken,
    grace: Duration,
) {
    drop(listener);
    tasks.close();
    if tokio::time::timeout(grace, tasks.wait()).await.is_err() {
        tracing::warn!(
            listener = name,
            grace_secs = grace.as_secs(),
            "connections still open after the shutdown grace; closing them"
        );
        cut_off.cancel();
        tasks.wait().await;
    }
}

/// Runs one connection until it ends, closing it gracefully when evicted
/// or on shutdown, and at once when cut off.
async fn drive(
    name: &'static str,
    stream: TcpStream,
    builder: &hyper::server::conn::http1::Builder,
    service: Tracked,
    connection: &Arc<Connection>,
    shutdown: &CancellationToken,
    cut_off: &CancellationToken,
) {
    let _ = stream.set_nodelay(true);
    let io = Watched {
        stream,
        connection: Arc::clone(connection),
    };
    let conn = builder.serve_connection(TokioIo::new(io), service);
    tokio::pin!(conn);
    let mut closing = false;
    let mut evicted = false;
    loop {
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(error) = result {
                    tracing::debug!(listener = name, %error, "connection ended with an error");
                }
                return;
            }
            () = shutdown.cancelled(), if !closing => {
                conn.as_mut().graceful_shutdown();
                closing = true;
            }
            // Only wakes the connection: polled again, it reads, and
            // `Watched` ends it unless a request has arrived, which is then
            // answered first.
            () = connection.evict.notified(), if !evicted => evicted = true,
            () = cut_off.cancelled() => return,
        }
    }
}

/// Pending connections the kernel may queue (it caps this at
/// `net.core.somaxconn`): a cold-start burst waits here, not in SYN retries.
const BACKLOG: u32 = 4096;

/// Binds `addr` for the listener configured by `key`, with address reuse
/// (a restarted sidecar rebinds at once) and a deep backlog.
pub async fn bind(key: &'static str, addr: SocketAddr) -> Result<TcpListener, BindError> {
    let error = |source| BindError { key, addr, source };
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()
    } else {
        tokio::net::TcpSocket::new_v6()
    }
    .map_err(error)?;
    socket.set_reuseaddr(true).map_err(error)?;
    socket.bind(addr).map_err(error)?;
    socket.listen(BACKLOG).map_err(error)
}

/// A listener could not be bound.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr} ({key}): {source}")]
pub struct BindError {
    /// The configuration key of the address.
    pub key: &'static str,
    /// The address.
    pub addr: SocketAddr,
    /// Why.
    pub source: std::io::Error,
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A connected pair on loopback: (client, server side as `Watched`),
    /// the server side's connection already evicted.
    async fn evicted_pair() -> (TcpStream, Watched) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (stream, _) = listener.accept().await.unwrap();
        let slot = Arc::new(Semaphore::new(1)).acquire_owned().await.unwrap();
        let connection = Registry::default().add(slot);
        connection.evicted.store(true, Ordering::Release);
        (client, Watched { stream, connection })
    }

    /// (served, busy, waiting, accepted this long ago, last active tick)
    type Shape = (bool, usize, bool, Duration, u64);

    fn registry_of(shapes: &[Shape]) -> Registry {
        let registry = Registry::default();
        let slots = Arc::new(Semaphore::new(shapes.len()));
        for (served, busy, waiting, age, tick) in shapes {
            let slot = Arc::clone(&slots).try_acquire_owned().unwrap();
            let connection = registry.add_accepted(slot, Instant::now() - *age);
            connection.served.store(*served, Ordering::Release);
            connection.busy.store(*busy, Ordering::Release);
            connection.waiting.store(*waiting, Ordering::Release);
            connection.last_active.store(*tick, Ordering::Relaxed);
        }
        registry
    }

    /// Which connection (by index) is evicted first, for each shape of the
    /// open set.
    #[tokio::test(start_paused = true)]
    async fn eviction_choice_table() {
        let old = Duration::from_secs(1);
        let fresh = Duration::from_millis(100);
        let cases: Vec<(Vec<Shape>, Option<usize>)> = vec![
            // Busy keep-alive clients only, one between requests: it goes,
            // even though it has served requests (the probe-starvation fix).
            (
                vec![
                    (true, 1, false, old, 5),
                    (true, 0, true, old, 9),
                    (true, 1, false, old, 3),
                ],
                Some(1),
            ),
            // Several idle keep-alive connections: the one idle longest.
            (
                vec![
                    (true, 0, true, old, 7),
                    (true, 0, true, old, 2),
                    (true, 0, true, old, 4),
                ],
                Some(1),
            ),
            // A silent newcomer past its grace goes before any keep-alive.
            (
                vec![(true, 0, true, old, 1), (false, 0, true, old, 8)],
                Some(1),
            ),
            // A newcomer inside its grace is kept; the keep-alive goes.
            (
                vec![(false, 0, true, fresh, 1), (true, 0, true, old, 8)],
                Some(1),
            ),
            // Mid-request (busy) or mid-send (not waiting): never.
            (
                vec![
                    (true, 1, true, old, 1),
                    (true, 0, false, old, 2),
                    (false, 0, true, fresh, 0),
                ],
                None,
            ),
        ];
        for (shapes, expected) in cases {
            let registry = registry_of(&shapes);
            let evicted = registry.evict_idle(true).map(|_| {
                registry
                    .lock()
                    .iter()
                    .position(|c| c.evicted.load(Ordering::Acquire))
                    .unwrap()
            });
            assert_eq!(evicted, expected, "{shapes:?}");
        }
        // A newcomer that has not yet waited the grace takes only silent
        // newcomers' slots: the keep-alive connections stay.
        let registry = registry_of(&[(true, 0, true, old, 1), (false, 0, true, old, 8)]);
        assert!(registry.evict_idle(false).is_some());
        assert!(registry.lock()[1].evicted.load(Ordering::Acquire));
        let registry = registry_of(&[(true, 0, true, old, 1), (true, 0, true, old, 2)]);
        assert!(registry.evict_idle(false).is_none());
    }

    #[tokio::test]
    async fn an_evicted_connection_with_nothing_sent_reads_as_closed() {
        let (_client, mut watched) = evicted_pair().await;
        let mut buf = [0u8; 64];
        let read = tokio::time::timeout(Duration::from_secs(5), watched.read(&mut buf)).await;
        assert_eq!(read.unwrap().unwrap(), 0, "end of stream at once");
    }

    #[tokio::test]
    async fn an_evicted_connection_still_reads_a_request_already_sent() {
        let (mut client, mut watched) = evicted_pair().await;
        client.write_all(b"GET /token HTTP/1.1\r\n").await.unwrap();
        watched.stream.readable().await.unwrap();
        let mut buf = [0u8; 64];
        let n = watched.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"GET /token HTTP/1.1\r\n");
        assert!(!watched.connection.waiting.load(Ordering::Acquire));
        // Then nothing more: closed.
        assert_eq!(watched.read(&mut buf).await.unwrap(), 0);
    }
}
