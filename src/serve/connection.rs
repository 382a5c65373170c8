//! One connection as the server's limits see it: whether it is between
//! requests, whether its client stopped reading, and how to make it close
//! without losing a request.
//!
//! Only three kinds of connection are ever evicted, each once it has been
//! so for a grace ([`FRESH_GRACE`] in the regular slots, [`OVERFLOW_GRACE`]
//! in the overflow lane): one that has sent nothing since it was accepted
//! (an idle flood), one whose current request head has been arriving for
//! longer than that (slow headers: real clients send a head at once), and
//! one whose client has not read its responses (writes blocked: it is not
//! being served anyway). A keep-alive connection between requests of a
//! client that reads is never evicted: taking it then would lose the next
//! request, which the client has perhaps already written.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use super::listener::{Peer, Stream};
use axum::Router;
use axum::body::Body;
use hyper::body::Incoming;
use tokio::sync::{Notify, OwnedSemaphorePermit};
use tokio::time::Instant;
use tower::ServiceExt as _;

/// A fresh connection gets this long to send a request, and a client this
/// long to read a response, before its slot may go to a newcomer: real
/// clients write right after connecting and read what they asked for, so a
/// burst loses no request, while idle, slow-header and non-reading
/// connections lose their slot long before any timeout.
pub const FRESH_GRACE: Duration = Duration::from_millis(500);

/// The same grace in the overflow lane, where a newcomer at the cap gets
/// one request: a client that connects there and does not send at once
/// gives its place to the next.
pub const OVERFLOW_GRACE: Duration = Duration::from_millis(100);

/// [`Connection::head`]: no request head is arriving.
const NO_HEAD: u64 = 0;
/// [`Connection::head`]: a head is arriving, no scan has seen it yet.
const HEAD_UNSEEN: u64 = 1;
/// [`Connection::head`]: stamps start here.
const HEAD_SEEN: u64 = 2;

/// One open connection.
#[derive(Debug)]
pub struct Connection {
    /// Requests in progress on it.
    busy: AtomicUsize,
    /// Its last read found nothing to read: the client is not sending.
    waiting: AtomicBool,
    /// It has answered a request.
    served: AtomicBool,
    /// When it was accepted.
    accepted_at: Instant,
    /// Microseconds after `accepted_at`, plus one, at which a write
    /// started waiting for the client to read; 0 while writes go through.
    write_blocked_at: AtomicU64,
    /// The request head now arriving, in one word so that the scan can
    /// never leave a stale moment behind: [`NO_HEAD`], [`HEAD_UNSEEN`]
    /// (bytes of a head arrived, no eviction scan has seen them yet), or
    /// microseconds after `accepted_at` plus [`HEAD_SEEN`] at which the
    /// first scan saw it. The connection's task sets and clears it without
    /// a clock read (this is the hot path); only a scan stamps it, and only
    /// from [`HEAD_UNSEEN`].
    head: AtomicU64,
    /// Asked to close.
    evicted: AtomicBool,
    /// Wakes the connection's task to close it.
    pub(super) evict: Notify,
    /// Its slot under `max_connections`; handed straight to the newcomer
    /// when the connection is evicted, so the newcomer need not wait for
    /// the close to finish. `None` for a connection of the overflow lane.
    slot: Mutex<Option<OwnedSemaphorePermit>>,
}

impl Connection {
    /// A connection accepted at `accepted_at`, holding `slot`.
    pub fn new(slot: Option<OwnedSemaphorePermit>, accepted_at: Instant) -> Self {
        Self {
            busy: AtomicUsize::new(0),
            waiting: AtomicBool::new(false),
            served: AtomicBool::new(false),
            accepted_at,
            write_blocked_at: AtomicU64::new(0),
            head: AtomicU64::new(NO_HEAD),
            evicted: AtomicBool::new(false),
            evict: Notify::new(),
            slot: Mutex::new(slot),
        }
    }

    /// Whether the moment stored in `mark` is at least `for_at_least`
    /// before `now`.
    fn marked_for(&self, mark: &AtomicU64, now: Instant, for_at_least: Duration) -> bool {
        match mark.load(Ordering::Acquire) {
            0 => false,
            at => {
                let since = self.accepted_at + Duration::from_micros(at - 1);
                now.saturating_duration_since(since) >= for_at_least
            }
        }
    }

    /// Stores now in `mark`, unless a moment is stored already.
    fn mark_once(&self, mark: &AtomicU64) {
        if mark.load(Ordering::Acquire) == 0 {
            let micros = self.accepted_at.elapsed().as_micros();
            let at = u64::try_from(micros).unwrap_or(u64::MAX - 1) + 1;
            mark.store(at, Ordering::Release);
        }
    }

    /// Its client has not read what it was sent for at least `for_at_least`.
    pub fn write_blocked(&self, now: Instant, for_at_least: Duration) -> bool {
        self.marked_for(&self.write_blocked_at, now, for_at_least)
    }

    fn note_write(&self, pending: bool) {
        if pending {
            self.mark_once(&self.write_blocked_at);
        } else {
            self.write_blocked_at.store(0, Ordering::Release);
        }
    }

    /// Bytes came from the client. They are a request head arriving
    /// (until the service sees the request), except:
    /// - empty lines alone: a client may send CRLF between requests (RFC
    ///   9112 §2.2), which hyper skips without a request ever reaching the
    ///   service to clear the mark;
    /// - bytes read while a request is in service: its body (a rejected
    ///   token's report), which the handler is reading. Marked, they would
    ///   make a keep-alive client that posted a body look like a slow head
    ///   once it idled, and evictable.
    fn bytes_read(&self, bytes: &[u8]) {
        let in_service = self.busy.load(Ordering::Acquire) > 0;
        if !in_service && bytes.iter().any(|byte| !matches!(byte, b'\r' | b'\n')) {
            self.head_arrived();
        }
    }

    /// Bytes of a request head arrived (called by the connection's task).
    fn head_arrived(&self) {
        // Only this task moves the word away from NO_HEAD, so the load and
        // the store cannot race with a scan (which only stamps HEAD_UNSEEN).
        if self.head.load(Ordering::Acquire) == NO_HEAD {
            self.head.store(HEAD_UNSEEN, Ordering::Release);
        }
    }

    /// A request reached the service: its head is complete.
    fn head_complete(&self) {
        self.head.store(NO_HEAD, Ordering::Release);
    }

    /// Whether a request head has been pending for at least `grace`, as
    /// eviction scans (every 20 ms while a newcomer waits) have seen it:
    /// the first scan that sees it pending starts the count.
    fn head_pending_for(&self, now: Instant, grace: Duration) -> bool {
        let micros = now.saturating_duration_since(self.accepted_at).as_micros();
        let stamp = u64::try_from(micros)
            .unwrap_or(u64::MAX - HEAD_SEEN)
            .saturating_add(HEAD_SEEN);
        match self
            .head
            .compare_exchange(HEAD_UNSEEN, stamp, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => grace.is_zero(),
            Err(NO_HEAD) => false,
            Err(at) => {
                let seen = self.accepted_at + Duration::from_micros(at - HEAD_SEEN);
                now.saturating_duration_since(seen) >= grace
            }
        }
    }

    /// May its slot go to a newcomer at `now`, after `grace`: a silent
    /// newcomer, a slow request head, or a client that stopped reading. The
    /// key orders candidates, oldest first.
    fn evictable(&self, now: Instant, grace: Duration) -> Option<Instant> {
        if self.evicted.load(Ordering::Acquire) {
            return None;
        }
        let silent_newcomer = self.busy.load(Ordering::Acquire) == 0
            && self.waiting.load(Ordering::Acquire)
            && !self.served.load(Ordering::Acquire)
            && now.saturating_duration_since(self.accepted_at) >= grace;
        let slow_head = self.head_pending_for(now, grace);
        (silent_newcomer || slow_head || self.write_blocked(now, grace)).then_some(self.accepted_at)
    }

    /// Whether it was asked to close.
    pub fn is_evicted(&self) -> bool {
        self.evicted.load(Ordering::Acquire)
    }
}

/// The open connections of a listener's regular slots, or of its overflow
/// lane, oldest first.
#[derive(Debug)]
pub struct Registry {
    open: Mutex<VecDeque<Arc<Connection>>>,
    /// How long a connection may hold its slot unserved.
    grace: Duration,
}

impl Registry {
    /// An empty registry whose connections have `grace` before eviction.
    pub fn new(grace: Duration) -> Self {
        Self {
            open: Mutex::new(VecDeque::new()),
            grace,
        }
    }

    /// Registers a connection accepted now into `slot`.
    pub fn add(&self, slot: OwnedSemaphorePermit) -> Arc<Connection> {
        self.add_accepted(slot, Instant::now())
    }

    fn add_accepted(&self, slot: OwnedSemaphorePermit, accepted_at: Instant) -> Arc<Connection> {
        let connection = Arc::new(Connection::new(Some(slot), accepted_at));
        self.lock().push_back(Arc::clone(&connection));
        connection
    }

    /// Forgets a closed connection and frees its slot (unless an eviction
    /// already handed the slot on).
    pub fn remove(&self, connection: &Arc<Connection>) {
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

    /// Asks the oldest evictable connection to close and takes its slot,
    /// if there is one.
    pub fn evict_one(&self) -> Option<OwnedSemaphorePermit> {
        let now = Instant::now();
        let open = self.lock();
        let victim = open
            .iter()
            .filter_map(|c| Some((c.evictable(now, self.grace)?, c)))
            .min_by_key(|(accepted_at, _)| *accepted_at)
            .map(|(_, c)| c)?;
        victim.evicted.store(true, Ordering::Release);
        victim.evict.notify_one();
        victim
            .slot
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
        self.0.busy.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The socket, recording on its connection whether the last read found
/// nothing to read and whether writes wait for the client, and reading as
/// closed once evicted with nothing to read.
pub struct Watched {
    stream: Stream,
    connection: Arc<Connection>,
}

impl Watched {
    /// `stream`, watched for `connection`.
    pub fn new(stream: Stream, connection: Arc<Connection>) -> Self {
        Self { stream, connection }
    }
}

impl tokio::io::AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.stream).poll_read(cx, buf);
        if result.is_pending() && self.connection.is_evicted() {
            // Evicted, and the client is sending nothing right now: end the
            // connection as if the client had closed it. Closing it from
            // outside instead could leave a request that arrived since the
            // last read unread, and the close would reset it.
            return Poll::Ready(Ok(()));
        }
        let waiting = match &result {
            Poll::Pending => true,
            Poll::Ready(Ok(())) => buf.filled().len() == before,
            Poll::Ready(Err(_)) => true,
        };
        self.connection.waiting.store(waiting, Ordering::Release);
        if !waiting {
            self.connection.bytes_read(&buf.filled()[before..]);
        }
        result
    }
}

impl tokio::io::AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let result = Pin::new(&mut self.stream).poll_write(cx, buf);
        self.connection.note_write(result.is_pending());
        result
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let result = Pin::new(&mut self.stream).poll_write_vectored(cx, bufs);
        self.connection.note_write(result.is_pending());
        result
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// Answers the requests it can answer at once, without the router and its
/// middleware (the `GET /token` hot path); `None` sends the request on to
/// the router. It must answer exactly as the router would.
pub type FastPath =
    Arc<dyn Fn(&http::Request<Incoming>) -> Option<http::Response<Body>> + Send + Sync>;

/// The router as a hyper service that marks its connection busy while a
/// request is in progress.
#[derive(Clone)]
pub struct Tracked {
    router: Router,
    fast: Option<FastPath>,
    connection: Arc<Connection>,
    peer: Peer,
}

impl Tracked {
    /// Serves `router` (after `fast`) on `connection`, from `peer`.
    pub fn new(
        router: Router,
        fast: Option<FastPath>,
        connection: Arc<Connection>,
        peer: Peer,
    ) -> Self {
        Self {
            router,
            fast,
            connection,
            peer,
        }
    }
}

/// A response now (fast path), or the router's future.
pub enum ResponseFuture {
    Ready(Option<http::Response<Body>>),
    Routed(Pin<Box<dyn Future<Output = Result<http::Response<Body>, Infallible>> + Send>>),
}

impl Future for ResponseFuture {
    type Output = Result<http::Response<Body>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.get_mut() {
            Self::Ready(response) => Poll::Ready(Ok(response.take().unwrap_or_default())),
            Self::Routed(future) => future.as_mut().poll(cx),
        }
    }
}

impl hyper::service::Service<http::Request<Incoming>> for Tracked {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = ResponseFuture;

    fn call(&self, request: http::Request<Incoming>) -> Self::Future {
        self.connection.head_complete();
        if let Some(response) = self.fast.as_ref().and_then(|fast| fast(&request)) {
            self.connection.served.store(true, Ordering::Release);
            return ResponseFuture::Ready(Some(response));
        }
        let busy = Busy::new(&self.connection);
        // Handlers that log a request (the proxy's access line) name its
        // peer; the fast path above needs no such thing.
        let mut request = request.map(Body::new);
        request.extensions_mut().insert(self.peer);
        let response = self.router.clone().oneshot(request);
        ResponseFuture::Routed(Box::pin(async move {
            let response = response.await;
            drop(busy);
            response
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};
    use tokio::sync::Semaphore;
    use tokio_util::either::Either;

    /// A connected pair on loopback: (client, server side as `Watched`).
    async fn pair() -> (TcpStream, Watched) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (stream, _) = listener.accept().await.unwrap();
        let slot = Arc::new(Semaphore::new(1)).acquire_owned().await.unwrap();
        let connection = Registry::new(FRESH_GRACE).add(slot);
        (
            client,
            Watched {
                stream: Either::Left(stream),
                connection,
            },
        )
    }

    /// Waits until the server side has bytes to read.
    async fn readable(watched: &Watched) {
        match &watched.stream {
            Either::Left(tcp) => tcp.readable().await.unwrap(),
            Either::Right(unix) => unix.readable().await.unwrap(),
        }
    }

    /// The same, the server side's connection already evicted.
    async fn evicted_pair() -> (TcpStream, Watched) {
        let (client, watched) = pair().await;
        watched.connection.evicted.store(true, Ordering::Release);
        (client, watched)
    }

    /// What counts as a head arriving: request bytes, but not empty lines
    /// between requests, and not a body read while its request is in
    /// service (a keep-alive client that posted a body is no slow head).
    #[test]
    fn which_bytes_mark_a_head() {
        let fresh = || {
            let slot = Arc::new(Semaphore::new(1)).try_acquire_owned().unwrap();
            Arc::new(Connection::new(Some(slot), Instant::now()))
        };
        // (bytes, request in service, marked)
        let cases: [(&[u8], bool, bool); 6] = [
            (b"GET /token HTTP/1.1\r\n", false, true),
            (b"\r\n", false, false),
            (b"\r\n\r\nG", false, true),
            (b"{\"rejectedToken\":\"t\"}", true, false),
            (b"GET /next", true, false),
            (b"", false, false),
        ];
        for (bytes, in_service, marked) in cases {
            let connection = fresh();
            let busy = in_service.then(|| Busy::new(&connection));
            connection.bytes_read(bytes);
            let head = connection.head.load(Ordering::Acquire);
            assert_eq!(
                head != NO_HEAD,
                marked,
                "{:?}",
                String::from_utf8_lossy(bytes)
            );
            drop(busy);
        }
    }

    /// A head is timed from the first scan that sees it, and nothing of it
    /// outlives the request: a scan that comes after the request reached
    /// the service leaves no moment behind for the next head to inherit.
    #[tokio::test(start_paused = true)]
    async fn a_head_is_timed_from_the_first_scan_and_forgotten_when_complete() {
        let slot = Arc::new(Semaphore::new(1)).try_acquire_owned().unwrap();
        let connection = Connection::new(Some(slot), Instant::now());
        let grace = FRESH_GRACE;
        let pending = |c: &Connection| c.head_pending_for(Instant::now(), grace);
        assert!(!pending(&connection), "no head, nothing to time");

        connection.head_arrived();
        tokio::time::advance(Duration::from_secs(5)).await;
        assert!(!pending(&connection), "the first scan starts the count");
        tokio::time::advance(grace - Duration::from_millis(1)).await;
        assert!(!pending(&connection));
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(pending(&connection), "pending for the grace since seen");
        connection.head_arrived();
        assert!(pending(&connection), "more bytes do not restart the count");

        connection.head_complete();
        assert!(!pending(&connection));
        // The scan runs after the request reached the service: no stamp.
        assert!(!pending(&connection));
        assert_eq!(connection.head.load(Ordering::Acquire), NO_HEAD);
        tokio::time::advance(Duration::from_secs(5)).await;
        connection.head_arrived();
        assert!(!pending(&connection), "the next head starts afresh");
    }

    /// Empty lines between requests (RFC 9112 §2.2) reach no service to
    /// clear the mark, so they are not a head; any other byte is.
    #[tokio::test]
    async fn empty_lines_between_requests_are_not_a_head() {
        let (mut client, mut watched) = pair().await;
        let mut buf = [0u8; 64];
        for (sent, head) in [
            (&b"\r\n"[..], NO_HEAD),
            (b"\r\n\r\n", NO_HEAD),
            (b"\r\nG", HEAD_UNSEEN),
        ] {
            client.write_all(sent).await.unwrap();
            readable(&watched).await;
            let mut read = 0;
            while read < sent.len() {
                read += watched.read(&mut buf).await.unwrap();
            }
            assert_eq!(
                watched.connection.head.load(Ordering::Acquire),
                head,
                "{sent:?}"
            );
        }
    }

    /// (served, busy, waiting, accepted this long ago, writes blocked this
    /// long ago, a request head arriving for this long)
    type Shape = (
        bool,
        usize,
        bool,
        Duration,
        Option<Duration>,
        Option<Duration>,
    );

    fn registry_of(grace: Duration, shapes: &[Shape]) -> Registry {
        let registry = Registry::new(grace);
        let slots = Arc::new(Semaphore::new(shapes.len()));
        for (served, busy, waiting, age, blocked, head) in shapes {
            let slot = Arc::clone(&slots).try_acquire_owned().unwrap();
            let connection = registry.add_accepted(slot, Instant::now() - *age);
            connection.served.store(*served, Ordering::Release);
            connection.busy.store(*busy, Ordering::Release);
            connection.waiting.store(*waiting, Ordering::Release);
            let since = |ago: &Duration| (*age - *ago).as_micros() as u64;
            if let Some(ago) = blocked {
                let at = since(ago) + 1;
                connection.write_blocked_at.store(at, Ordering::Release);
            }
            if let Some(ago) = head {
                let at = since(ago) + HEAD_SEEN;
                connection.head.store(at, Ordering::Release);
            }
        }
        registry
    }

    /// Which connection (by index) is evicted, for each shape of the open
    /// set.
    #[tokio::test(start_paused = true)]
    async fn eviction_choice_table() {
        let s = Duration::from_secs;
        let ms = Duration::from_millis;
        let cases: Vec<(Duration, Vec<Shape>, Option<usize>)> = vec![
            // Keep-alive connections of clients that read: never, idle or
            // busy (taking one between requests loses the next request).
            (
                FRESH_GRACE,
                vec![
                    (true, 0, true, s(9), None, None),
                    (true, 1, false, s(9), None, None),
                ],
                None,
            ),
            // A silent newcomer past its grace: the oldest first.
            (
                FRESH_GRACE,
                vec![
                    (true, 0, true, s(9), None, None),
                    (false, 0, true, s(2), None, None),
                    (false, 0, true, s(3), None, None),
                ],
                Some(2),
            ),
            // Inside its grace it is kept: a burst about to send.
            (
                FRESH_GRACE,
                vec![(false, 0, true, ms(100), None, None)],
                None,
            ),
            // The overflow lane's grace is shorter.
            (
                OVERFLOW_GRACE,
                vec![(false, 0, true, ms(150), None, None)],
                Some(0),
            ),
            (
                OVERFLOW_GRACE,
                vec![(false, 0, true, ms(50), None, None)],
                None,
            ),
            // A client that stopped reading, past the grace: even if it has
            // served requests, even mid-request.
            (
                FRESH_GRACE,
                vec![
                    (true, 0, true, s(9), None, None),
                    (true, 1, false, s(5), Some(s(1)), None),
                ],
                Some(1),
            ),
            (
                FRESH_GRACE,
                vec![(true, 0, false, s(5), Some(ms(100)), None)],
                None,
            ),
            // A request head dribbling in past the grace (slow headers), on
            // a keep-alive connection too; a head just begun is kept.
            (
                FRESH_GRACE,
                vec![
                    (true, 0, true, s(9), None, None),
                    (true, 0, true, s(9), None, Some(ms(600))),
                ],
                Some(1),
            ),
            (
                FRESH_GRACE,
                vec![(true, 0, false, s(9), None, Some(ms(10)))],
                None,
            ),
        ];
        for (grace, shapes, expected) in cases {
            let registry = registry_of(grace, &shapes);
            let evicted = registry
                .evict_one()
                .map(|_| registry.lock().iter().position(|c| c.is_evicted()).unwrap());
            assert_eq!(evicted, expected, "{shapes:?}");
        }
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
        readable(&watched).await;
        let mut buf = [0u8; 64];
        let n = watched.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"GET /token HTTP/1.1\r\n");
        assert!(!watched.connection.waiting.load(Ordering::Acquire));
        // Then nothing more: closed.
        assert_eq!(watched.read(&mut buf).await.unwrap(), 0);
    }

    #[tokio::test]
    async fn a_client_that_does_not_read_blocks_writes_and_is_noticed() {
        let (client, mut watched) = evicted_pair().await;
        let chunk = vec![b'x'; 64 * 1024];
        // Write until the kernel's buffers are full (bounded).
        let mut blocked = false;
        for _ in 0..4096 {
            match tokio::time::timeout(Duration::from_millis(50), watched.write(&chunk)).await {
                Ok(Ok(_)) => {}
                Ok(Err(error)) => panic!("{error}"),
                Err(_) => {
                    blocked = true;
                    break;
                }
            }
        }
        assert!(blocked, "the buffers filled");
        let connection = Arc::clone(&watched.connection);
        assert!(connection.write_blocked(Instant::now(), Duration::ZERO));
        assert!(!connection.write_blocked(Instant::now(), Duration::from_secs(60)));
        drop(client);
    }
}
