//! `init` (SPEC §1, §4.4): for an init container or a Job, fetch one token
//! for every profile that has a `token_file`, write the files, and stop,
//! leaving them for the app that runs next.
//!
//! It runs the service's own pieces, without listeners: each profile's
//! refresh task (so the backoff floor, the auth budget and single flight
//! hold exactly as in the service) and its token-file writer, told to keep
//! the file when stopped.

use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{StartError, clients_for, consumers, fleet_for, prepare, start_profiles};
use crate::cache::store::FileState;
use crate::config::{Config, ConfigError};
use crate::ops::metrics::Metrics;
use crate::profile::{Profile, Profiles};
use crate::sink::writer::OnStop;

/// How often `init` looks whether every file is written.
const POLL: Duration = Duration::from_millis(25);

/// Why `init` did not leave every token file.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    /// It could not start (configuration, client).
    #[error(transparent)]
    Start(#[from] StartError),
    /// Not every file was written in time.
    #[error("not every token file was written within {} s: {}", .timeout.as_secs(), .missing.join("; "))]
    Timeout {
        /// `--timeout`.
        timeout: Duration,
        /// Each profile still without its file, and why.
        missing: Vec<String>,
    },
}

/// Writes every profile's token file within `timeout`; returns what was
/// written (`profile → path`).
pub async fn init(config: Config, timeout: Duration) -> Result<Vec<String>, InitError> {
    let configs: Vec<_> = config
        .profiles
        .iter()
        .filter(|p| p.token_file.is_some())
        .cloned()
        .collect();
    if configs.is_empty() {
        return Err(StartError::Config(ConfigError::new(
            "klavi.token_file",
            "init writes token files, and no profile has one; set klavi.token_file or \
             profiles.NAME.token_file",
        ))
        .into());
    }
    let deadline = Instant::now() + timeout;
    let parts = prepare(&configs)?;
    let mut metrics = Metrics::default();
    // In the fleet, an init container adopts the fleet's token.
    let fleet = fleet_for(&config, &configs, &mut metrics)?;
    let profiles = Profiles::new(consumers(&parts, &metrics));
    let (clients, _) = clients_for(&parts).await?;
    let stop = CancellationToken::new();
    let mut tasks = JoinSet::new();
    start_profiles(
        parts,
        &profiles,
        clients,
        fleet,
        OnStop::Keep,
        &stop,
        &mut tasks,
    );

    let written = |profile: &Arc<Profile>| profile.store().file_state() == Some(FileState::Written);
    // Bounded by the deadline.
    while !profiles.iter().all(written) && Instant::now() < deadline {
        tokio::time::sleep(POLL.min(deadline.saturating_duration_since(Instant::now()))).await;
    }
    let all_written = profiles.iter().all(written);
    stop.cancel();
    while tasks.join_next().await.is_some() {}
    if !all_written {
        let missing = profiles
            .iter()
            .filter(|p| !written(p))
            .map(|p| why_missing(p))
            .collect();
        return Err(InitError::Timeout { timeout, missing });
    }
    Ok(configs
        .iter()
        .filter_map(|c| {
            let file = c.token_file.as_ref()?;
            Some(format!("{}={}", c.name, file.path.display()))
        })
        .collect())
}

/// `profile NAME: REASON`, from what its refresh task and writer last did.
fn why_missing(profile: &Profile) -> String {
    let store = profile.store();
    let state = store.state();
    let why = match (store.file_state(), state.last_error) {
        (Some(FileState::WriteFailed), _) => "the file could not be written".to_string(),
        (_, Some(category)) => format!("the last auth request failed: {}", category.as_str()),
        _ if state.completed == 0 => "no answer from Klavi yet".to_string(),
        _ => "no servable token yet".to_string(),
    };
    format!("profile {}: {why}", profile.name())
}
