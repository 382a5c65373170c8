//! The token file's writer, on tokio's paused clock with a sink that
//! records what the file holds and fails when told.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, SystemTime};

use super::*;
use crate::cache::store::{NotReadyReason, Readiness, TokenStore};
use crate::ops::metrics::Metrics;
use crate::secret::Secret;

/// What the file holds (`None`: no file), how many writes were tried, and
/// how many of the next ones fail.
#[derive(Default)]
struct Recorder {
    file: Mutex<Option<Vec<u8>>>,
    attempts: AtomicU32,
    failing: AtomicU32,
}

impl FileSink for Recorder {
    fn write(&self, contents: &[u8]) -> io::Result<()> {
        self.attempts.fetch_add(1, Ordering::SeqCst);
        if self
            .failing
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err(io::Error::other("disk full"));
        }
        *self.file.lock().unwrap() = Some(contents.to_vec());
        Ok(())
    }

    fn remove(&self) -> io::Result<()> {
        *self.file.lock().unwrap() = None;
        Ok(())
    }

    fn describe(&self) -> String {
        "recorder".into()
    }

    fn blocks(&self) -> bool {
        false
    }
}

impl Recorder {
    fn holds(&self) -> Option<String> {
        self.file
            .lock()
            .unwrap()
            .as_ref()
            .map(|b| String::from_utf8_lossy(b).into_owned())
    }

    fn attempts(&self) -> u32 {
        self.attempts.load(Ordering::SeqCst)
    }
}

const MARGIN: Duration = Duration::from_secs(5);

fn token(value: &str, lifetime: Duration) -> Arc<Token> {
    Arc::new(Token::new(
        Secret::new(value),
        Instant::now(),
        lifetime,
        SystemTime::UNIX_EPOCH + Duration::from_secs(2_000_000_000) + lifetime,
    ))
}

struct Harness {
    store: Arc<TokenStore>,
    sink: Arc<Recorder>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

fn start(format: TokenFileFormat, on_stop: OnStop) -> Harness {
    let store = Arc::new(
        TokenStore::new(MARGIN, Duration::from_secs(5), Duration::from_secs(5)).with_token_file(),
    );
    let metrics = Metrics::default().profile("default");
    let profile = Arc::new(Profile::new("default", Arc::clone(&store), metrics, true));
    let sink = Arc::new(Recorder::default());
    // Full jitter at 1: the backoff's ceiling, 0.5 s, 1 s, 2 s…
    let writer = TokenFileWriter::new(
        profile,
        Arc::clone(&sink) as Arc<dyn FileSink>,
        format,
        RefreshPolicy::default(),
        Arc::new(|| 1.0),
        on_stop,
    );
    let stop = CancellationToken::new();
    let task = tokio::spawn(writer.run(stop.clone()));
    Harness {
        store,
        sink,
        stop,
        task,
    }
}

/// Lets the writer run what is due now.
async fn settle() {
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
}

#[tokio::test(start_paused = true)]
async fn each_new_token_is_written_and_readiness_waits_for_the_file() {
    let h = start(TokenFileFormat::Raw, OnStop::Remove);
    settle().await;
    assert_eq!(h.sink.holds(), None);
    assert_eq!(
        h.store.readiness(Instant::now()),
        Readiness::NotReady(NotReadyReason::NoTokenYet)
    );
    h.store.set_token(token("first", Duration::from_secs(300)));
    settle().await;
    assert_eq!(h.sink.holds().as_deref(), Some("first\n"));
    assert!(matches!(
        h.store.readiness(Instant::now()),
        Readiness::Ready(_)
    ));
    h.store.set_token(token("second", Duration::from_secs(300)));
    settle().await;
    assert_eq!(h.sink.holds().as_deref(), Some("second\n"));
    assert_eq!(h.sink.attempts(), 2, "one write per token");
    // Nothing new: nothing written, however long.
    tokio::time::sleep(Duration::from_secs(200)).await;
    assert_eq!(h.sink.attempts(), 2);
    h.stop.cancel();
    h.task.await.unwrap();
    assert_eq!(h.sink.holds(), None, "removed on a clean stop");
}

#[tokio::test(start_paused = true)]
async fn a_rejected_or_expired_token_leaves_no_file() {
    let h = start(TokenFileFormat::Raw, OnStop::Remove);
    let first = token("first", Duration::from_secs(300));
    h.store.set_token(Arc::clone(&first));
    settle().await;
    assert_eq!(h.sink.holds().as_deref(), Some("first\n"));
    h.store.reject(first.digest());
    settle().await;
    assert_eq!(
        h.sink.holds(),
        None,
        "a rejected token is not left in the file"
    );

    // Expiry during an outage: gone once less than the margin is left.
    h.store.set_token(token("short", Duration::from_secs(60)));
    settle().await;
    assert_eq!(h.sink.holds().as_deref(), Some("short\n"));
    tokio::time::sleep(Duration::from_secs(54)).await;
    settle().await;
    assert_eq!(h.sink.holds().as_deref(), Some("short\n"), "6 s left");
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    settle().await;
    assert_eq!(h.sink.holds(), None, "under 5 s left");
    assert_eq!(
        h.store.readiness(Instant::now()),
        Readiness::NotReady(NotReadyReason::TokenExpired)
    );
    h.stop.cancel();
    h.task.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_failing_write_is_retried_with_backoff_and_reported() {
    let h = start(TokenFileFormat::Raw, OnStop::Remove);
    h.store.set_token(token("first", Duration::from_secs(300)));
    settle().await;
    assert_eq!(h.sink.holds().as_deref(), Some("first\n"));
    h.sink.failing.store(3, Ordering::SeqCst);
    h.store.set_token(token("second", Duration::from_secs(300)));
    settle().await;
    assert_eq!(h.sink.attempts(), 2);
    assert_eq!(h.sink.holds(), None, "not the older token either");
    assert_eq!(
        h.store.readiness(Instant::now()),
        Readiness::NotReady(NotReadyReason::TokenFileWriteFailed)
    );
    // Retries after 0.5 s, 1 s, 2 s (the profile's backoff), not sooner.
    for (wait_ms, attempts) in [(499, 2), (1, 3), (999, 3), (1, 4), (1_999, 4), (1, 5)] {
        tokio::time::sleep(Duration::from_millis(wait_ms)).await;
        settle().await;
        assert_eq!(h.sink.attempts(), attempts, "after {wait_ms} ms more");
    }
    assert_eq!(h.sink.holds().as_deref(), Some("second\n"));
    assert!(matches!(
        h.store.readiness(Instant::now()),
        Readiness::Ready(_)
    ));
    h.stop.cancel();
    h.task.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn json_is_the_get_token_body_and_init_keeps_the_file() {
    let h = start(TokenFileFormat::Json, OnStop::Keep);
    h.store
        .set_token(token("tok\"en", Duration::from_secs(300)));
    settle().await;
    let body: serde_json::Value = serde_json::from_str(&h.sink.holds().unwrap()).unwrap();
    assert_eq!(body["accessToken"], "tok\"en");
    assert_eq!(body["tokenType"], "Bearer");
    assert!(body["expireAt"].as_i64().unwrap() > 0);
    let left = body["expiresIn"].as_u64().unwrap();
    assert!((299..=300).contains(&left), "{left}");
    h.stop.cancel();
    h.task.await.unwrap();
    assert!(
        h.sink.holds().is_some(),
        "kept for the app that starts next"
    );
}
