//! The task that keeps a profile's token file (SPEC §4.4) equal to its
//! servable token.
//!
//! It follows the store (`TokenStore::watch_token`), never the refresh
//! task: each new token is written, atomically, off the runtime's threads;
//! when the profile holds no servable token any more (rejected, or expired
//! during an outage) the file is removed, so the file, when present, holds
//! a token that may be used, as `GET /token` would answer. A failed write
//! is retried with the profile's backoff (`refresh.backoff_*`), counted,
//! and reported by readiness ([`FileState::WriteFailed`]). On a clean stop
//! the service removes the file (no one would refresh it); `init` keeps
//! it.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::token_file;
use crate::cache::policy::{RefreshPolicy, backoff};
use crate::cache::refresher::Jitter;
use crate::cache::store::FileState;
use crate::cache::token::Token;
use crate::config::{TokenFileConfig, TokenFileFormat};
use crate::profile::Profile;
use crate::serve::http::Rendered;

/// Where a token file goes: a real file, or a test's stand-in.
pub trait FileSink: Send + Sync + 'static {
    /// Replaces the file with `contents`, atomically. Blocking.
    fn write(&self, contents: &[u8]) -> io::Result<()>;
    /// Removes the file; one already gone is no error. Blocking.
    fn remove(&self) -> io::Result<()>;
    /// Where, for logs.
    fn describe(&self) -> String;
    /// Whether the calls block (then they run off the runtime's threads).
    fn blocks(&self) -> bool {
        true
    }
}

/// The file at a path, replaced atomically with a mode.
#[derive(Debug, Clone)]
pub struct AtomicFile {
    /// Where.
    pub path: PathBuf,
    /// Its permissions.
    pub mode: u32,
}

impl FileSink for AtomicFile {
    fn write(&self, contents: &[u8]) -> io::Result<()> {
        token_file::write_atomically(&self.path, contents, self.mode)
    }

    fn remove(&self) -> io::Result<()> {
        token_file::remove(&self.path)
    }

    fn describe(&self) -> String {
        self.path.display().to_string()
    }
}

/// What to do with the file when told to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnStop {
    /// Remove it: the service stops, and no one would refresh it.
    Remove,
    /// Keep it: `init` leaves it for the app that starts next.
    Keep,
}

impl std::fmt::Debug for TokenFileWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenFileWriter")
            .field("profile", &self.profile.name())
            .field("file", &self.sink.describe())
            .field("format", &self.format)
            .field("on_stop", &self.on_stop)
            .finish_non_exhaustive()
    }
}

/// Keeps one profile's token file.
pub struct TokenFileWriter {
    profile: Arc<Profile>,
    sink: Arc<dyn FileSink>,
    format: TokenFileFormat,
    policy: RefreshPolicy,
    jitter: Jitter,
    on_stop: OnStop,
}

impl TokenFileWriter {
    /// A writer of `profile`'s token to `sink` in `format`, retrying by
    /// `policy`'s backoff with `jitter`.
    pub fn new(
        profile: Arc<Profile>,
        sink: Arc<dyn FileSink>,
        format: TokenFileFormat,
        policy: RefreshPolicy,
        jitter: Jitter,
        on_stop: OnStop,
    ) -> Self {
        Self {
            profile,
            sink,
            format,
            policy,
            jitter,
            on_stop,
        }
    }

    /// A writer of the configured file.
    pub fn for_config(
        profile: Arc<Profile>,
        file: &TokenFileConfig,
        policy: RefreshPolicy,
        on_stop: OnStop,
    ) -> Self {
        let sink = Arc::new(AtomicFile {
            path: file.path.clone(),
            mode: file.mode,
        });
        Self::new(
            profile,
            sink,
            file.format,
            policy,
            crate::cache::refresher::random_jitter(),
            on_stop,
        )
    }

    /// Runs until `stop`: removes what an earlier run may have left (a
    /// token no one vouches for), then follows the profile's token.
    pub async fn run(self, stop: CancellationToken) {
        let store = Arc::clone(self.profile.store());
        let mut changes = store.watch_token();
        self.remove("left by an earlier run").await;
        // The token the file holds, and the retry schedule of a failing
        // write.
        let mut held: Option<Arc<Token>> = None;
        let mut failures: u32 = 0;
        let mut retry_at: Option<Instant> = None;
        loop {
            changes.borrow_and_update();
            let now = Instant::now();
            let wake = match store.servable(now) {
                Some(token) if held.as_ref().is_some_and(|h| Arc::ptr_eq(h, &token)) => {
                    // Written: look again once it is no longer servable
                    // (just after the last instant it is, or this would
                    // wake at that instant and find nothing to do, again).
                    let last = token
                        .expires_at()
                        .checked_sub(self.policy.serve_margin)
                        .unwrap_or(now);
                    Some(last.max(now) + Duration::from_millis(1))
                }
                Some(token) if retry_at.is_none_or(|at| now >= at) => {
                    match self.write(&token, now).await {
                        Ok(()) => {
                            held = Some(token);
                            failures = 0;
                            retry_at = None;
                            store.set_file_state(FileState::Written);
                        }
                        Err(error) => {
                            failures = failures.saturating_add(1);
                            let delay = backoff(failures, &self.policy, (self.jitter)());
                            retry_at = Some(Instant::now() + delay);
                            store.set_file_state(FileState::WriteFailed);
                            // The file holds the current token or nothing:
                            // not an older one, which could be reported
                            // rejected or expire before a write succeeds.
                            if held.take().is_some() {
                                self.remove("its token was replaced").await;
                            }
                            tracing::warn!(
                                profile = self.profile.name(),
                                file = %self.sink.describe(),
                                %error,
                                failures,
                                retry_in_ms = delay.as_millis() as u64,
                                "cannot write the token file; retrying"
                            );
                        }
                    }
                    continue;
                }
                Some(_) => retry_at,
                None => {
                    if held.take().is_some() {
                        self.remove("its token is no longer servable").await;
                        store.set_file_state(FileState::NotWritten);
                    }
                    None
                }
            };
            tokio::select! {
                () = stop.cancelled() => break,
                changed = changes.changed() => {
                    if changed.is_err() {
                        break;
                    }
                }
                () = sleep_until(wake) => {}
            }
        }
        if self.on_stop == OnStop::Remove {
            self.remove("the sidecar stops").await;
        }
    }

    /// Writes `token`, judged servable at `now`.
    async fn write(&self, token: &Arc<Token>, now: Instant) -> io::Result<()> {
        let contents = match self.format {
            TokenFileFormat::Raw => {
                let mut raw = token.value().expose().as_bytes().to_vec();
                raw.push(b'\n');
                raw
            }
            TokenFileFormat::Json => Rendered::of(token).json_body(now).to_vec(),
        };
        let written = self.offload(move |sink| sink.write(&contents)).await;
        self.profile.metrics().token_file_written(written.is_ok());
        if written.is_ok() {
            tracing::info!(
                profile = self.profile.name(),
                file = %self.sink.describe(),
                token = token.fingerprint(),
                "token file written"
            );
        }
        written
    }

    /// Removes the file, logging why (and a failure).
    async fn remove(&self, why: &'static str) {
        let removed = self.offload(|sink| sink.remove()).await;
        if let Err(error) = removed {
            tracing::warn!(
                profile = self.profile.name(),
                file = %self.sink.describe(),
                %error,
                why,
                "cannot remove the token file"
            );
        }
    }
}

impl TokenFileWriter {
    /// Runs `call` on the sink, on a blocking thread if it blocks.
    async fn offload(
        &self,
        call: impl FnOnce(&dyn FileSink) -> io::Result<()> + Send + 'static,
    ) -> io::Result<()> {
        let sink = Arc::clone(&self.sink);
        if !sink.blocks() {
            return call(sink.as_ref());
        }
        tokio::task::spawn_blocking(move || call(sink.as_ref()))
            .await
            .unwrap_or_else(|error| Err(io::Error::other(error.to_string())))
    }
}

/// Sleeps until `at`, or forever.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests;
