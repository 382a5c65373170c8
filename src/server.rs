//! Serving a router on a listener, with the limits a sidecar needs.
//!
//! axum's own `serve` has no knobs for hostile clients, so connections are
//! driven by hyper directly:
//! - a header read timeout: slow-header clients, and keep-alive connections
//!   idle for that long, are closed;
//! - a header size limit, answered 431;
//! - a cap on open connections. When it is reached, the oldest connection
//!   with no request in progress is closed to make room, so a flood of idle
//!   or half-sent connections cannot lock out a well-behaved client; only
//!   connections busy with requests (bounded by the request timeout, a
//!   layer of the routers) make a new one wait;
//! - on shutdown, every connection is asked to finish its request in
//!   flight and close; whatever is left after the grace is cut off.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
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
    /// Asked to close.
    evicted: AtomicBool,
    /// Wakes the connection's task to close it.
    evict: Notify,
    /// Its slot under `max_connections`; handed straight to the newcomer
    /// when the connection is evicted, so the newcomer need not wait for
    /// the close to finish.
    slot: Mutex<Option<OwnedSemaphorePermit>>,
}

/// The open connections, oldest first.
#[derive(Debug, Default)]
struct Registry {
    open: Mutex<VecDeque<Arc<Connection>>>,
}

impl Registry {
    fn add(&self, slot: OwnedSemaphorePermit) -> Arc<Connection> {
        let connection = Arc::new(Connection {
            busy: AtomicUsize::new(0),
            evicted: AtomicBool::new(false),
            evict: Notify::new(),
            slot: Mutex::new(Some(slot)),
        });
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

    /// Asks the oldest connection with no request in progress to close and
    /// takes its slot, if there is such a connection.
    fn evict_idle(&self) -> Option<OwnedSemaphorePermit> {
        let open = self.lock();
        let idle = open
            .iter()
            .find(|c| c.busy.load(Ordering::Acquire) == 0 && !c.evicted.load(Ordering::Acquire))?;
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
        self.0.busy.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The router as a hyper service that marks its connection busy while a
/// request is in progress.
#[derive(Clone)]
struct Tracked {
    router: Router,
    connection: Arc<Connection>,
}

type ResponseFuture =
    Pin<Box<dyn Future<Output = Result<http::Response<Body>, Infallible>> + Send>>;

impl hyper::service::Service<http::Request<Incoming>> for Tracked {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = ResponseFuture;

    fn call(&self, request: http::Request<Incoming>) -> Self::Future {
        let busy = Busy::new(&self.connection);
        let response = self.router.clone().oneshot(request.map(Body::new));
        Box::pin(async move {
            let response = response.await;
            drop(busy);
            response
        })
    }
}

/// Serves `router` on `listener` until `shutdown`, then stops accepting,
/// lets requests in flight finish for up to `grace` and closes the rest.
pub async fn serve(
    name: &'static str,
    listener: TcpListener,
    router: Router,
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
            Err(_) => match registry.evict_idle() {
                Some(permit) => permit,
                None => {
                    tracing::debug!(
                        listener = name,
                        "connection limit reached and every connection busy; waiting for one to finish"
                    );
                    tokio::select! {
                        () = shutdown.cancelled() => break,
                        permit = Arc::clone(&slots).acquire_owned() => match permit {
                            Ok(permit) => permit,
                            Err(_) => break,
                        },
                    }
                }
            },
        };
        let connection = registry.add(permit);
        let service = Tracked {
            router: router.clone(),
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
    connection: &Connection,
    shutdown: &CancellationToken,
    cut_off: &CancellationToken,
) {
    let _ = stream.set_nodelay(true);
    let conn = builder.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    let mut closing = false;
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
            () = connection.evict.notified(), if !closing => {
                conn.as_mut().graceful_shutdown();
                closing = true;
            }
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
