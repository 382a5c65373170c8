//! Configuration: layered, validated once at start into typed values.
//!
//! - [`layers`]: defaults < TOML file < environment < flags, merged by
//!   figment into a [`RawConfig`];
//! - [`raw`]: the shapes as written, every key with its default (a test
//!   keeps `config/default.toml` equal to them), profiles included;
//! - [`lenient`]: numbers, flags and lists that also read from strings,
//!   so environment values need no table of keys;
//! - [`ranges`]: every numeric key's range and the rules between keys;
//! - `validate`: from [`RawConfig`] to [`Config`].
//!
//! `[klavi]` with `[refresh]` is the profile named `default`; each
//! `[profiles.NAME]` (with `[profiles.NAME.refresh]`) is another, inheriting
//! the non-secret `[klavi]` keys and `[refresh]`. Any problem becomes one
//! [`ConfigError`] naming the full key, which the binary prints on one line
//! before exiting with status 2.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use url::Url;

use crate::cache::policy::RefreshPolicy;
use crate::secret::Secret;
use crate::serve::server::{Limits, ListenAddr};

mod error;
pub mod layers;
pub mod lenient;
#[cfg(test)]
mod profile_tests;
pub mod ranges;
pub mod raw;
#[cfg(test)]
mod tests;
mod validate;

pub use error::ConfigError;
pub use layers::{CONFIG_ENV, ENV_PREFIX, Overrides, Sources, load_raw, raw_from};
pub use ranges::{RANGES, Range};
pub use raw::{
    RawConfig, RawFleet, RawKlavi, RawLog, RawProfile, RawProxy, RawRefresh, RawRuntime, RawServer,
    RedisUrl,
};
pub use validate::read_key_file;

/// The name of the profile `[klavi]` and `[refresh]` describe.
pub const DEFAULT_PROFILE: &str = "default";

/// Loads and validates the configuration.
pub fn load(sources: &Sources) -> Result<Config, ConfigError> {
    Config::validate(load_raw(sources)?)
}

/// Where a key comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// Given inline (file, environment).
    Inline(Secret),
    /// Read from this file, and re-read when it changes.
    File(PathBuf),
}

/// `[server]`, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct ServerConfig {
    /// Token API address (loopback or a unix socket, unless explicitly
    /// allowed).
    pub listen: ListenAddr,
    /// Probes and metrics address, if enabled.
    pub ops_listen: Option<SocketAddr>,
    /// Token routes demand `Klavi-Sidecar: true`.
    pub require_header: bool,
    /// `Host` names accepted besides loopback ones, lower case.
    pub allowed_hosts: Vec<String>,
    /// Drain time after a stop signal.
    pub shutdown_grace: Duration,
    /// Connection-level protections.
    pub limits: Limits,
    /// Largest request body.
    pub max_body_bytes: usize,
    /// Longest a request may take.
    pub request_timeout: Duration,
    /// Permissions of the unix sockets the sidecar creates.
    pub socket_mode: u32,
}

/// `[proxy]`, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyConfig {
    /// Largest request body (buffered for a replay); 413 beyond.
    pub max_body_bytes: usize,
    /// One proxied exchange, token wait and replay included.
    pub request_timeout: Duration,
    /// One info line per proxied request.
    pub access_log: bool,
}

/// `[fleet]`, validated: present when `fleet.redis_url` is set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetConfig {
    /// The Redis URL (its password is a secret).
    pub redis_url: RedisUrl,
    /// Namespace of the keys and the channel.
    pub key_prefix: String,
    /// Slower than this counts as Redis being down.
    pub command_timeout: Duration,
}

/// A profile's `[klavi]` keys, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct KlaviConfig {
    /// Klavi's API root, where the proxy forwards (no query, no
    /// credentials).
    pub base_url: Url,
    /// The full auth endpoint: `base_url` + `auth_path`.
    pub auth_url: Url,
    /// The access key.
    pub access_key: KeySource,
    /// The secret key.
    pub secret_key: KeySource,
    /// Connection timeout.
    pub connect_timeout: Duration,
    /// Whole-request timeout.
    pub request_timeout: Duration,
}

/// A profile's `[refresh]` keys, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct RefreshConfig {
    /// The schedule, backoff and budget knobs.
    pub policy: RefreshPolicy,
    /// How long a request may wait for a fetch when no token is servable.
    pub wait: Duration,
    /// Lifetime assumed when neither the response nor the JWT says.
    pub fallback_ttl: Duration,
}

/// How a profile hands out tokens (`klavi.mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenMode {
    /// One token, reused by every caller (`GET /token`).
    Shared,
    /// Every lease gets a token never handed out before
    /// (`POST /token/lease`).
    SingleUse {
        /// Tokens fetched ahead and held ready.
        pool_size: usize,
    },
}

/// One profile: a key pair and everything about getting its tokens.
#[derive(Debug, Clone, PartialEq)]
pub struct ProfileConfig {
    /// `default` for `[klavi]`, else the `NAME` of `[profiles.NAME]`.
    pub name: String,
    /// Where and how to ask for tokens.
    pub klavi: KlaviConfig,
    /// When to ask.
    pub refresh: RefreshConfig,
    /// `/readyz` waits for this profile.
    pub required: bool,
    /// Shared or single_use.
    pub mode: TokenMode,
    /// Shares its token through the fleet's Redis when `[fleet]` is on
    /// (never for a single_use profile).
    pub fleet: bool,
    /// The profile's proxy listener (SPEC §4.3), if any.
    pub proxy_listen: Option<ListenAddr>,
    /// The file its token is written to (SPEC §4.4), if any; shared
    /// profiles only.
    pub token_file: Option<TokenFileConfig>,
}

/// A profile's token file (`token_file`, `token_file_mode`,
/// `token_file_format`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenFileConfig {
    /// Where (absolute).
    pub path: PathBuf,
    /// Its permissions.
    pub mode: u32,
    /// What it holds.
    pub format: TokenFileFormat,
}

/// What a token file holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenFileFormat {
    /// The bare token and a newline.
    Raw,
    /// The `GET /token` body.
    Json,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// The validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// `[server]`
    pub server: ServerConfig,
    /// Every profile: `default` first when there is one, then by name.
    pub profiles: Vec<ProfileConfig>,
    /// `[proxy]`
    pub proxy: ProxyConfig,
    /// `[fleet]`, when `fleet.redis_url` is set.
    pub fleet: Option<FleetConfig>,
    /// `[log]`
    pub log: LogFormat,
    /// Worker threads of the runtime (0: one per CPU).
    pub worker_threads: usize,
    /// What it was built from, for `check-config`.
    pub raw: RawConfig,
}

impl Config {
    /// The profile called `name`.
    pub fn profile(&self, name: &str) -> Option<&ProfileConfig> {
        self.profiles.iter().find(|p| p.name == name)
    }

    /// Pairs of shared profiles (later, earlier) of one key pair: same
    /// auth URL and same access key or key file. They fetch two tokens
    /// for one account and double the auth traffic, so the service warns
    /// of them. (A
    /// single_use profile beside a shared one of the same keys is fine:
    /// the token ledger keeps their tokens apart.)
    pub fn shared_key_pair_twins(&self) -> Vec<(&str, &str)> {
        let shared: Vec<&ProfileConfig> = self
            .profiles
            .iter()
            .filter(|p| p.mode == TokenMode::Shared)
            .collect();
        let mut twins = Vec::new();
        for (i, later) in shared.iter().enumerate() {
            if let Some(earlier) = shared[..i].iter().find(|earlier| {
                earlier.klavi.auth_url == later.klavi.auth_url
                    && earlier.klavi.access_key == later.klavi.access_key
            }) {
                twins.push((later.name.as_str(), earlier.name.as_str()));
            }
        }
        twins
    }

    /// The effective configuration as TOML, every profile spelled out with
    /// what it inherits, secrets redacted.
    pub fn to_redacted_toml(&self) -> String {
        let mut shown = self.raw.clone();
        for profile in shown.profiles.values_mut() {
            *profile = profile.spelled_out(&self.raw.klavi, &self.raw.refresh);
        }
        toml::to_string(&shown).unwrap_or_else(|e| format!("# cannot render: {e}\n"))
    }
}

/// `runtime.worker_threads`, checked against its range (0: one per CPU).
pub fn worker_threads(runtime: &RawRuntime) -> Result<usize, ConfigError> {
    const KEY: &str = "runtime.worker_threads";
    ranges::check(KEY.to_string(), KEY, runtime.worker_threads)?;
    Ok(usize::try_from(runtime.worker_threads).unwrap_or(usize::MAX))
}

/// The address to probe for `healthcheck`: the ops listener (or, when it is
/// off, the token listener, which may be a unix socket), with a wildcard IP
/// replaced by loopback.
pub fn probe_address(raw: &RawConfig) -> Option<ListenAddr> {
    let text = if raw.server.ops_listen.trim().is_empty() {
        &raw.server.listen
    } else {
        &raw.server.ops_listen
    };
    let mut addr: SocketAddr = match text.parse::<ListenAddr>().ok()? {
        ListenAddr::Tcp(addr) => addr,
        unix @ ListenAddr::Unix(_) => return Some(unix),
    };
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr.ip() {
            IpAddr::V4(_) => IpAddr::from([127, 0, 0, 1]),
            IpAddr::V6(_) => IpAddr::from([0u16, 0, 0, 0, 0, 0, 0, 1]),
        });
    }
    Some(ListenAddr::Tcp(addr))
}
