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

use crate::config::ranges::KeyNames;
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

/// What one read of a key file changed: what to log, once per change of
/// state rather than once per read (the watcher reads every second).
#[derive(Debug, PartialEq)]
struct Seen {
    /// The key to use: the one read, or the last good one.
    secret: Secret,
    /// The value differs from the last good one.
    changed: bool,
    /// Reading started failing, or fails differently: why.
    started_failing: Option<String>,
    /// Reading works again after failing.
    recovered: bool,
}

impl FileRead {
    fn apply(&mut self, result: Result<Secret, String>) -> Seen {
        match result {
            Ok(secret) => {
                let recovered = self.failing.take().is_some();
                let changed = self.last_good != secret;
                if changed {
                    self.last_good = secret.clone();
                }
                Seen {
                    secret,
                    changed,
                    started_failing: None,
                    recovered,
                }
            }
            Err(message) => {
                let started_failing =
                    (self.failing.as_ref() != Some(&message)).then(|| message.clone());
                self.failing = Some(message);
                Seen {
                    secret: self.last_good.clone(),
                    changed: false,
                    started_failing,
                    recovered: false,
                }
            }
        }
    }
}

impl Key {
    fn load(source: &KeySource, key: &str) -> Result<Self, ConfigError> {
        Ok(match source {
            KeySource::Inline(secret) => Self::Inline(secret.clone()),
            KeySource::File(path) => {
                let secret = read_key_file(path)
                    .map_err(|message| ConfigError::new(format!("{key}_file"), message))?;
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
    /// changed since the last read. `profile` names it in the logs.
    async fn refresh(&self, profile: &str) -> (Secret, bool) {
        match self {
            Self::Inline(secret) => (secret.clone(), false),
            Self::File { path, read } => {
                let result = read_async(path).await;
                let seen = read
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .apply(result);
                if let Some(error) = &seen.started_failing {
                    tracing::warn!(
                        profile,
                        error = %error,
                        "cannot read key file; keeping the last good key"
                    );
                }
                if seen.recovered {
                    tracing::info!(profile, path = %path.display(), "key file readable again");
                }
                if seen.changed {
                    tracing::info!(profile, path = %path.display(), "key file changed");
                }
                (seen.secret, seen.changed)
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
    /// The profile they belong to, for the logs.
    profile: String,
}

impl Credentials {
    /// Loads profile `profile`'s keys as configured, reading any files
    /// once; an error names the profile's key.
    pub fn load(profile: &str, config: &KlaviConfig) -> Result<Self, ConfigError> {
        let names = KeyNames::of(profile);
        Ok(Self {
            access: Key::load(&config.access_key, &names.klavi("access_key"))?,
            secret: Key::load(&config.secret_key, &names.klavi("secret_key"))?,
            profile: profile.to_string(),
        })
    }

    /// Keys given directly.
    pub fn inline(access: Secret, secret: Secret) -> Self {
        Self {
            access: Key::Inline(access),
            secret: Key::Inline(secret),
            profile: "default".to_string(),
        }
    }

    /// The current keys, files re-read.
    pub async fn current(&self) -> (Secret, Secret) {
        let (access, _) = self.access.refresh(&self.profile).await;
        let (secret, _) = self.secret.refresh(&self.profile).await;
        (access, secret)
    }

    async fn changed(&self) -> bool {
        let (_, a) = self.access.refresh(&self.profile).await;
        let (_, s) = self.secret.refresh(&self.profile).await;
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
            base_url: url::Url::parse("http://127.0.0.1:1").unwrap(),
            auth_url: url::Url::parse("http://127.0.0.1:1/auth").unwrap(),
            access_key: KeySource::File(ak.clone()),
            secret_key: KeySource::File(sk.clone()),
            connect_timeout: Duration::from_secs(1),
            request_timeout: Duration::from_secs(1),
        };
        let creds = Credentials::load("default", &config).unwrap();
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

    /// Defect: an unreadable key file logged a WARN every second, forever
    /// (the watcher reads it once a second). Now once per change of state.
    #[test]
    fn an_unreadable_key_file_is_reported_once_per_change_of_state() {
        let mut read = FileRead {
            last_good: Secret::new("one"),
            failing: None,
        };
        let missing = || Err("cannot read /k: No such file".to_string());
        let empty = || Err("/k is empty".to_string());
        let ok = |v: &str| Ok(Secret::new(v));
        // (read result, key used, changed, starts failing with, recovered)
        let steps: Vec<(Result<Secret, String>, &str, bool, Option<&str>, bool)> = vec![
            (ok("one"), "one", false, None, false),
            (
                missing(),
                "one",
                false,
                Some("cannot read /k: No such file"),
                false,
            ),
            (missing(), "one", false, None, false),
            (missing(), "one", false, None, false),
            (empty(), "one", false, Some("/k is empty"), false),
            (empty(), "one", false, None, false),
            (ok("two"), "two", true, None, true),
            (ok("two"), "two", false, None, false),
            (
                missing(),
                "two",
                false,
                Some("cannot read /k: No such file"),
                false,
            ),
            (ok("two"), "two", false, None, true),
        ];
        for (i, (result, key, changed, failing, recovered)) in steps.into_iter().enumerate() {
            let seen = read.apply(result);
            assert_eq!(
                seen,
                Seen {
                    secret: Secret::new(key),
                    changed,
                    started_failing: failing.map(str::to_string),
                    recovered,
                },
                "step {i}"
            );
        }
    }
}
