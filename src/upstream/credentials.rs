//! The access and secret keys, inline or from files that may rotate.
//!
//! Kubernetes updates a mounted Secret by swapping a symlink, so the files
//! are simply re-read: before every fetch, and by a watcher that polls
//! them and wakes the refresh task when they change (which matters after
//! Klavi rejected the old keys). A file that is briefly unreadable or empty
//! keeps the last good value rather than losing the key, and says so once
//! per change of state (not once a second, which is how often it is read).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::config::{ConfigError, KeySource, KlaviConfig, read_key_file};
use crate::secret::Secret;

/// How often the watcher looks at the key files.
pub const KEY_FILE_POLL: Duration = Duration::from_secs(1);

#[derive(Debug)]
enum Key {
    Inline(Secret),
    File {
        path: PathBuf,
        read: Mutex<FileRead>,
    },
}

/// What the last reads of a key file gave.
#[derive(Debug)]
struct FileRead {
    /// The last value read successfully.
    last_good: Secret,
    /// Why the last read failed, if it did: logged when it starts or
    /// changes, and its end logged too.
    failing: Option<String>,
}

impl Key {
    fn load(source: &KeySource, key: &str) -> Result<Self, ConfigError> {
        Ok(match source {
            KeySource::Inline(secret) => Self::Inline(secret.clone()),
            KeySource::File(path) => {
                let secret = read_key_file(path).map_err(|message| ConfigError {
                    key: format!("{key}_file"),
                    message,
                })?;
                Self::File {
                    path: path.clone(),
                    read: Mutex::new(FileRead {
                        last_good: secret,
                        failing: None,
                    }),
                }
            }
        })
    }

    /// The current value; for a file, re-read now. Returns whether it
    /// changed since the last read.
    async fn refresh(&self) -> (Secret, bool) {
        match self {
            Self::Inline(secret) => (secret.clone(), false),
            Self::File { path, read } => {
                let result = read_async(path).await;
                let mut state = read.lock().unwrap_or_else(PoisonError::into_inner);
                match result {
                    Ok(secret) => {
                        if state.failing.take().is_some() {
                            tracing::info!(path = %path.display(), "key file readable again");
                        }
                        let changed = state.last_good != secret;
                        if changed {
                            tracing::info!(path = %path.display(), "key file changed");
                            state.last_good = secret.clone();
                        }
                        (secret, changed)
                    }
                    Err(message) => {
                        if state.failing.as_ref() != Some(&message) {
                            tracing::warn!(
                                error = %message,
                                "cannot read key file; keeping the last good key"
                            );
                            state.failing = Some(message);
                        }
                        (state.last_good.clone(), false)
                    }
                }
            }
        }
    }

    fn is_file(&self) -> bool {
        matches!(self, Self::File { .. })
    }
}

async fn read_async(path: &Path) -> Result<Secret, String> {
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || read_key_file(&path))
        .await
        .unwrap_or_else(|e| Err(format!("key file reader failed: {e}")))
}

/// The two keys.
#[derive(Debug)]
pub struct Credentials {
    access: Key,
    secret: Key,
}

impl Credentials {
    /// Loads the keys as configured, reading any files once.
    pub fn load(config: &KlaviConfig) -> Result<Self, ConfigError> {
        Ok(Self {
            access: Key::load(&config.access_key, "klavi.access_key")?,
            secret: Key::load(&config.secret_key, "klavi.secret_key")?,
        })
    }

    /// Keys given directly.
    pub fn inline(access: Secret, secret: Secret) -> Self {
        Self {
            access: Key::Inline(access),
            secret: Key::Inline(secret),
        }
    }

    /// The current keys, files re-read.
    pub async fn current(&self) -> (Secret, Secret) {
        let (access, _) = self.access.refresh().await;
        let (secret, _) = self.secret.refresh().await;
        (access, secret)
    }

    async fn changed(&self) -> bool {
        let (_, a) = self.access.refresh().await;
        let (_, s) = self.secret.refresh().await;
        a || s
    }

    /// Polls the key files every [`KEY_FILE_POLL`] and notifies `changes`
    /// when either changes. Does nothing for inline keys.
    pub fn watch(
        self: Arc<Self>,
        changes: Arc<Notify>,
        stop: CancellationToken,
    ) -> Option<tokio::task::JoinHandle<()>> {
        if !self.access.is_file() && !self.secret.is_file() {
            return None;
        }
        Some(tokio::spawn(async move {
            let mut tick = tokio::time::interval(KEY_FILE_POLL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    _ = tick.tick() => {
                        if self.changed().await {
                            changes.notify_one();
                        }
                    }
                }
            }
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn files_are_reread_and_a_bad_read_keeps_the_last_good_key() {
        let dir = tempfile::tempdir().unwrap();
        let ak = dir.path().join("ak");
        let sk = dir.path().join("sk");
        std::fs::write(&ak, "one\n").unwrap();
        std::fs::write(&sk, "secret").unwrap();
        let config = KlaviConfig {
            auth_url: url::Url::parse("http://127.0.0.1:1/auth").unwrap(),
            access_key: KeySource::File(ak.clone()),
            secret_key: KeySource::File(sk.clone()),
            connect_timeout: Duration::from_secs(1),
            request_timeout: Duration::from_secs(1),
        };
        let creds = Credentials::load(&config).unwrap();
        assert_eq!(creds.current().await.0.expose(), "one");
        assert!(!creds.changed().await);
        std::fs::write(&ak, "two\n").unwrap();
        assert!(creds.changed().await);
        assert_eq!(creds.current().await.0.expose(), "two");
        // Emptied or deleted mid-rotation: the last good key stays.
        std::fs::write(&ak, "").unwrap();
        assert_eq!(creds.current().await.0.expose(), "two");
        std::fs::remove_file(&ak).unwrap();
        assert_eq!(creds.current().await.0.expose(), "two");
        assert!(!creds.changed().await);
        assert_eq!(creds.current().await.1.expose(), "secret");
    }

    /// Captures what is logged on this thread.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Captured {
        fn count(&self, needle: &str) -> usize {
            String::from_utf8_lossy(&self.0.lock().unwrap())
                .matches(needle)
                .count()
        }
    }

    /// Defect: an unreadable key file logged a WARN every second, forever
    /// (the watcher reads it once a second). Now once per change of state.
    #[tokio::test]
    async fn an_unreadable_key_file_is_logged_once_per_change_of_state() {
        let logs = Captured::default();
        let writer = logs.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        let _guard = tracing::subscriber::set_default(subscriber);

        let dir = tempfile::tempdir().unwrap();
        let ak = dir.path().join("ak");
        std::fs::write(&ak, "one").unwrap();
        let config = KlaviConfig {
            auth_url: url::Url::parse("http://127.0.0.1:1/auth").unwrap(),
            access_key: KeySource::File(ak.clone()),
            secret_key: KeySource::Inline(Secret::new("s")),
            connect_timeout: Duration::from_secs(1),
            request_timeout: Duration::from_secs(1),
        };
        let creds = Credentials::load(&config).unwrap();
        let warn = "cannot read key file";
        std::fs::remove_file(&ak).unwrap();
        for _ in 0..10 {
            assert_eq!(creds.current().await.0.expose(), "one");
        }
        assert_eq!(logs.count(warn), 1, "once while it stays missing");
        // A different failure is a change of state.
        std::fs::write(&ak, "\n").unwrap();
        for _ in 0..5 {
            creds.current().await;
        }
        assert_eq!(logs.count(warn), 2);
        // Readable again: said once, and the next failure is new.
        std::fs::write(&ak, "two").unwrap();
        for _ in 0..5 {
            assert_eq!(creds.current().await.0.expose(), "two");
        }
        assert_eq!(logs.count("key file readable again"), 1);
        std::fs::remove_file(&ak).unwrap();
        for _ in 0..5 {
            creds.current().await;
        }
        assert_eq!(logs.count(warn), 3);
    }
}
