//! The configuration as written: every key of `config/default.toml`, with
//! its default. Numbers, flags and lists also read from strings (see
//! [`super::lenient`]), which is how environment variables arrive.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::secret::Secret;

/// The whole file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct RawConfig {
    /// `[server]`
    pub server: RawServer,
    /// `[klavi]`: the `default` profile's keys, and what other profiles
    /// inherit.
    pub klavi: RawKlavi,
    /// `[refresh]`: the `default` profile's policy, and what other profiles
    /// inherit.
    pub refresh: RawRefresh,
    /// `[proxy]`: how every profile's proxy listener forwards.
    pub proxy: RawProxy,
    /// `[fleet]`: the Redis a fleet of sidecars shares tokens through.
    pub fleet: RawFleet,
    /// `[profiles.NAME]`: more key pairs.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub profiles: BTreeMap<String, RawProfile>,
    /// `[log]`
    pub log: RawLog,
    /// `[runtime]`
    pub runtime: RawRuntime,
}

/// `[server]`: the listeners and their protections.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawServer {
    /// Token API address: a loopback `IP:PORT` or `unix:/path`. Default
    /// `127.0.0.1:8089`.
    pub listen: String,
    /// Lets `listen` be a non-loopback address. Default `false`.
    #[serde(deserialize_with = "super::lenient::bool")]
    pub allow_non_loopback: bool,
    /// Probes and metrics address; `""` turns it off. Default `0.0.0.0:8090`.
    pub ops_listen: String,
    /// Token routes demand `Klavi-Sidecar: true`. Default `true`.
    #[serde(deserialize_with = "super::lenient::bool")]
    pub require_header: bool,
    /// `Host` names accepted on token routes besides loopback ones. Default
    /// none.
    #[serde(deserialize_with = "super::lenient::list")]
    pub allowed_hosts: Vec<String>,
    /// Drain time after SIGTERM/SIGINT, seconds. Default `10`.
    #[serde(deserialize_with = "super::lenient::u64")]
    pub shutdown_grace_secs: u64,
    /// Time to send a request's headers (and keep-alive idle time), ms.
    /// Default `5000`.
    #[serde(deserialize_with = "super::lenient::u64")]
    pub header_read_timeout_ms: u64,
    /// Largest request head, bytes; larger gets 431. Default `16384`.
    #[serde(deserialize_with = "super::lenient::u64")]
    pub max_header_bytes: u64,
    /// Largest request body, bytes; larger gets 413. Default `16384` (the rejected-token body of `POST /token/refresh` may be up to 16 KiB).
    #[serde(deserialize_with = "super::lenient::u64")]
    pub max_body_bytes: u64,
    /// Open connections per listener. Default `512`.
    #[serde(deserialize_with = "super::lenient::u64")]
    pub max_connections: u64,
    /// Longest a request may take, ms; then 408. Default `10000`.
    #[serde(deserialize_with = "super::lenient::u64")]
    pub request_timeout_ms: u64,
    /// Permissions of the unix sockets the sidecar creates, octal.
    /// Default `"0660"`, range `0000`–`0777`.
    pub socket_mode: String,
}

impl Default for RawServer {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8089".into(),
            allow_non_loopback: false,
            ops_listen: "0.0.0.0:8090".into(),
            require_header: true,
            allowed_hosts: Vec::new(),
            shutdown_grace_secs: 10,
            header_read_timeout_ms: 5000,
            max_header_bytes: 16 * 1024,
            max_body_bytes: 16 * 1024,
            max_connections: 512,
            request_timeout_ms: 10_000,
            socket_mode: "0660".into(),
        }
    }
}

/// `[klavi]`: where and how to ask for tokens.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawKlavi {
    /// Default `https://api-sandbox.klavi.ai`.
    pub base_url: String,
    /// Default `/payment/customer/v1/auth`.
    pub auth_path: String,
    /// Lets `base_url` be plain `http://` to a non-loopback host. Default `false`.
    #[serde(deserialize_with = "super::lenient::bool")]
    pub allow_insecure_http: bool,
    /// No default: this or `access_key_file` is required.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub access_key: Option<Secret>,
    /// No default: this or `secret_key_file` is required.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret_key: Option<Secret>,
    /// File holding the access key, re-read when it changes. No default.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub access_key_file: Option<PathBuf>,
    /// File holding the secret key, re-read when it changes. No default.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret_key_file: Option<PathBuf>,
    /// Default `3000`.
    #[serde(deserialize_with = "super::lenient::u64")]
    pub connect_timeout_ms: u64,
    /// Default `10000`.
    #[serde(deserialize_with = "super::lenient::u64")]
    pub request_timeout_ms: u64,
    /// `/readyz` waits for this profile. Default `true`.
    #[serde(deserialize_with = "super::lenient::bool")]
    pub required: bool,
    /// The profile's proxy listener (SPEC §4.3): a loopback address or
    /// `unix:/path`; `""` is off. Default `""`.
    pub proxy_listen: String,
    /// Shared profiles only: file the profile's token is written to (SPEC
    /// §4.4); `""` is off. Default `""`.
    pub token_file: String,
    /// The token file's permissions, octal. Default `"0640"`, range
    /// `0000`–`0777`.
    pub token_file_mode: String,
    /// `raw` (the token and a newline) or `json` (the `GET /token` body).
    /// Default `"raw"`.
    pub token_file_format: String,
    /// `shared` (one token reused by every caller) or `single_use` (every
    /// lease a token never handed out before). Default `"shared"`.
    pub mode: String,
    /// single_use only: tokens fetched ahead and held ready (0: fetch on
    /// each lease). Default `2`, range 0–100.
    #[serde(deserialize_with = "super::lenient::u64")]
    pub pool_size: u64,
    /// With `[fleet]` on, a shared profile shares its token through Redis;
    /// `false` opts out. Default: `true` for shared profiles; a single_use
    /// profile is never in the fleet (`true` is an error).
    #[serde(
        skip_serializing_if = "Option::is_none",
        deserialize_with = "super::lenient::opt_bool"
    )]
    pub fleet: Option<bool>,
}

impl Default for RawKlavi {
    fn default() -> Self {
        Self {
            base_url: "https://api-sandbox.klavi.ai".into(),
            auth_path: "/payment/customer/v1/auth".into(),
            allow_insecure_http: false,
            access_key: None,
            secret_key: None,
            access_key_file: None,
            secret_key_file: None,
            connect_timeout_ms: 3000,
            request_timeout_ms: 10_000,
            required: true,
            proxy_listen: String::new(),
            token_file: String::new(),
            token_file_mode: "0640".into(),
            token_file_format: "raw".into(),
            mode: "shared".into(),
            pool_size: 2,
            fleet: None,
        }
    }
}

impl RawKlavi {
    /// Whether any key or key file is set: without, `[klavi]` is no profile.
    pub fn has_keys(&self) -> bool {
        self.access_key.is_some()
            || self.secret_key.is_some()
            || self.access_key_file.is_some()
            || self.secret_key_file.is_some()
    }
}

/// `[refresh]` and its per-profile overrides from one list of keys: each
/// key's type, default and lenient reader are written once.
macro_rules! refresh_keys {
    ($($(#[$doc:meta])* $key:ident: $ty:ty = $default:expr, $read:literal, $read_opt:literal;)*) => {
        /// `[refresh]`: the refresh policy.
        #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
        #[serde(deny_unknown_fields, default)]
        pub struct RawRefresh {
            $($(#[$doc])* #[serde(deserialize_with = $read)] pub $key: $ty,)*
        }

        impl Default for RawRefresh {
            fn default() -> Self {
                Self { $($key: $default,)* }
            }
        }

        /// `[profiles.NAME.refresh]`: any `[refresh]` key, each absent
        /// unless set.
        #[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
        #[serde(deny_unknown_fields, default)]
        pub struct RawRefreshOverrides {
            $(#[serde(skip_serializing_if = "Option::is_none", deserialize_with = $read_opt)]
            $key: Option<$ty>,)*
        }

        impl RawRefreshOverrides {
            /// `base` with these overrides applied.
            pub fn over(&self, base: &RawRefresh) -> RawRefresh {
                RawRefresh { $($key: self.$key.unwrap_or(base.$key),)* }
            }

            /// Every key set, as overrides (for printing a profile in full).
            fn all(refresh: &RawRefresh) -> Self {
                Self { $($key: Some(refresh.$key),)* }
            }
        }
    };
}

refresh_keys! {
    /// Default `60`.
    refresh_before_secs: u64 = 60, "super::lenient::u64", "super::lenient::opt_u64";
    /// Default `0.1`.
    jitter_ratio: f64 = 0.1, "super::lenient::f64", "super::lenient::opt_f64";
    /// Default `5`.
    serve_margin_secs: u64 = 5, "super::lenient::u64", "super::lenient::opt_u64";
    /// Default `500`.
    backoff_initial_ms: u64 = 500, "super::lenient::u64", "super::lenient::opt_u64";
    /// Default `30`.
    backoff_max_secs: u64 = 30, "super::lenient::u64", "super::lenient::opt_u64";
    /// Default `5`.
    min_interval_secs: u64 = 5, "super::lenient::u64", "super::lenient::opt_u64";
    /// Default `5000`.
    wait_ms: u64 = 5000, "super::lenient::u64", "super::lenient::opt_u64";
    /// Default `60`.
    max_auth_per_minute: u64 = 60, "super::lenient::u64", "super::lenient::opt_u64";
    /// Default `300`.
    fallback_ttl_secs: u64 = 300, "super::lenient::u64", "super::lenient::opt_u64";
}

/// `[profiles.NAME]`: every `[klavi]` key, each absent unless set. The
/// non-secret ones absent here are inherited from `[klavi]`; keys and key
/// files never are.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct RawProfile {
    /// Inherited from `klavi.base_url`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub base_url: Option<String>,
    /// Inherited from `klavi.auth_path`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auth_path: Option<String>,
    /// Inherited from `klavi.allow_insecure_http`.
    #[serde(
        skip_serializing_if = "Option::is_none",
        deserialize_with = "super::lenient::opt_bool"
    )]
    pub allow_insecure_http: Option<bool>,
    /// Required (with `secret_key`), or the file forms.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub access_key: Option<Secret>,
    /// Required (with `access_key`), or the file forms.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret_key: Option<Secret>,
    /// File holding the access key.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub access_key_file: Option<PathBuf>,
    /// File holding the secret key.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret_key_file: Option<PathBuf>,
    /// Inherited from `klavi.connect_timeout_ms`.
    #[serde(
        skip_serializing_if = "Option::is_none",
        deserialize_with = "super::lenient::opt_u64"
    )]
    pub connect_timeout_ms: Option<u64>,
    /// Inherited from `klavi.request_timeout_ms`.
    #[serde(
        skip_serializing_if = "Option::is_none",
        deserialize_with = "super::lenient::opt_u64"
    )]
    pub request_timeout_ms: Option<u64>,
    /// Default `true` (not inherited: each profile says for itself).
    #[serde(
        skip_serializing_if = "Option::is_none",
        deserialize_with = "super::lenient::opt_bool"
    )]
    pub required: Option<bool>,
    /// Not inherited. Default `""`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub proxy_listen: Option<String>,
    /// Not inherited. Default `""`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_file: Option<String>,
    /// Not inherited. Default `"0640"`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_file_mode: Option<String>,
    /// Not inherited. Default `"raw"`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_file_format: Option<String>,
    /// Not inherited. Default `"shared"`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    /// Not inherited. Default `2`.
    #[serde(
        skip_serializing_if = "Option::is_none",
        deserialize_with = "super::lenient::opt_u64"
    )]
    pub pool_size: Option<u64>,
    /// Not inherited. Default `true` for a shared profile.
    #[serde(
        skip_serializing_if = "Option::is_none",
        deserialize_with = "super::lenient::opt_bool"
    )]
    pub fleet: Option<bool>,
    /// `[profiles.NAME.refresh]`: overrides of `[refresh]`.
    #[serde(skip_serializing_if = "RawRefreshOverrides::is_empty")]
    pub refresh: RawRefreshOverrides,
}

impl RawRefreshOverrides {
    fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

impl RawProfile {
    /// The profile's effective `[klavi]` and `[refresh]`: its own keys over
    /// what it inherits from `klavi` and `refresh`. Keys, key files and the
    /// per-profile keys (`required`, `proxy_listen`, `token_file*`, `mode`,
    /// `pool_size`, `fleet`) are not inherited.
    pub fn effective(&self, klavi: &RawKlavi, refresh: &RawRefresh) -> (RawKlavi, RawRefresh) {
        let own = RawKlavi {
            base_url: self
                .base_url
                .clone()
                .unwrap_or_else(|| klavi.base_url.clone()),
            auth_path: self
                .auth_path
                .clone()
                .unwrap_or_else(|| klavi.auth_path.clone()),
            allow_insecure_http: self
                .allow_insecure_http
                .unwrap_or(klavi.allow_insecure_http),
            access_key: self.access_key.clone(),
            secret_key: self.secret_key.clone(),
            access_key_file: self.access_key_file.clone(),
            secret_key_file: self.secret_key_file.clone(),
            connect_timeout_ms: self.connect_timeout_ms.unwrap_or(klavi.connect_timeout_ms),
            request_timeout_ms: self.request_timeout_ms.unwrap_or(klavi.request_timeout_ms),
            required: self.required.unwrap_or(true),
            proxy_listen: self.proxy_listen.clone().unwrap_or_default(),
            token_file: self.token_file.clone().unwrap_or_default(),
            token_file_mode: self
                .token_file_mode
                .clone()
                .unwrap_or_else(|| "0640".into()),
            token_file_format: self
                .token_file_format
                .clone()
                .unwrap_or_else(|| "raw".into()),
            mode: self.mode.clone().unwrap_or_else(|| "shared".into()),
            pool_size: self.pool_size.unwrap_or(2),
            fleet: self.fleet,
        };
        (own, self.refresh.over(refresh))
    }

    /// The profile with every key spelled out (secrets stay redacted when
    /// printed), for `check-config`.
    pub fn spelled_out(&self, klavi: &RawKlavi, refresh: &RawRefresh) -> Self {
        let (k, r) = self.effective(klavi, refresh);
        Self {
            base_url: Some(k.base_url),
            auth_path: Some(k.auth_path),
            allow_insecure_http: Some(k.allow_insecure_http),
            access_key: k.access_key,
            secret_key: k.secret_key,
            access_key_file: k.access_key_file,
            secret_key_file: k.secret_key_file,
            connect_timeout_ms: Some(k.connect_timeout_ms),
            request_timeout_ms: Some(k.request_timeout_ms),
            required: Some(k.required),
            proxy_listen: Some(k.proxy_listen),
            token_file: Some(k.token_file),
            token_file_mode: Some(k.token_file_mode),
            token_file_format: Some(k.token_file_format),
            fleet: Some(k.fleet.unwrap_or(k.mode.trim() == "shared")),
            mode: Some(k.mode),
            pool_size: Some(k.pool_size),
            refresh: RawRefreshOverrides::all(&r),
        }
    }
}

/// `[proxy]`: what every profile's proxy listener allows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawProxy {
    /// Largest request body, bytes; larger gets 413 before Klavi is
    /// called (bodies are buffered, so one can be replayed after a 401).
    /// Default `1048576`, range 0–16777216.
    #[serde(deserialize_with = "super::lenient::u64")]
    pub max_body_bytes: u64,
    /// One proxied exchange, token wait and replay included, ms; then 504.
    /// Default `30000`, range 1000–600000.
    #[serde(deserialize_with = "super::lenient::u64")]
    pub request_timeout_ms: u64,
    /// One info line per proxied request. Default `true`.
    #[serde(deserialize_with = "super::lenient::bool")]
    pub access_log: bool,
}

impl Default for RawProxy {
    fn default() -> Self {
        Self {
            max_body_bytes: 1 << 20,
            request_timeout_ms: 30_000,
            access_log: true,
        }
    }
}

/// `[fleet]`: sidecars of one account share one token through Redis
/// (SPEC §8). Off while `redis_url` is empty.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawFleet {
    /// `redis://` or `rediss://` (TLS) URL of the fleet's Redis, with any
    /// user, password and database number. Its password is a secret: it is
    /// shown redacted. Default `""` (off).
    pub redis_url: RedisUrl,
    /// Namespace of the sidecar's keys and channel in Redis: 1–64 of
    /// `[A-Za-z0-9_.:-]`. Default `"klavi-sidecar"`.
    pub key_prefix: String,
    /// Any Redis command slower than this counts as Redis being down (the
    /// profile then fetches on its own), ms. Default `500`, range 10–10000.
    #[serde(deserialize_with = "super::lenient::u64")]
    pub command_timeout_ms: u64,
}

impl Default for RawFleet {
    fn default() -> Self {
        Self {
            redis_url: RedisUrl::default(),
            key_prefix: "klavi-sidecar".into(),
            command_timeout_ms: 500,
        }
    }
}

/// A Redis URL, whose password never prints: `Debug` and serialisation
/// (what `check-config` shows) replace it with `REDACTED`.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct RedisUrl(Secret);

impl RedisUrl {
    /// Wraps a URL.
    pub fn new(url: impl Into<String>) -> Self {
        Self(Secret::new(url))
    }

    /// The URL itself, password included, for the Redis client.
    pub fn expose(&self) -> &str {
        self.0.expose()
    }

    /// The URL as it may be shown: scheme, host, port and path; any user
    /// information and any query (the crate also reads `?password=` and
    /// `?pass=`) replaced by `REDACTED`; all of it replaced when it does
    /// not parse, since then no one knows where the password is.
    pub fn redacted(&self) -> String {
        let text = self.0.expose().trim();
        if text.is_empty() {
            return String::new();
        }
        let Ok(url) = url::Url::parse(text) else {
            return crate::secret::REDACTED.to_string();
        };
        let mut shown = format!("{}://", url.scheme());
        // No host: whatever follows the scheme may be the credentials.
        let Some(host) = url.host_str().filter(|h| !h.is_empty()) else {
            return shown + "REDACTED";
        };
        if !url.username().is_empty() || url.password().is_some() {
            shown.push_str("REDACTED@");
        }
        shown.push_str(host);
        if let Some(port) = url.port() {
            shown.push_str(&format!(":{port}"));
        }
        // A database number, or nothing; anything else is not shown.
        let path = url.path();
        if path
            .strip_prefix('/')
            .is_some_and(|db| db.bytes().all(|b| b.is_ascii_digit()))
        {
            shown.push_str(path);
        } else if !path.is_empty() {
            shown.push_str("/REDACTED");
        }
        if url.query().is_some() || url.fragment().is_some() {
            shown.push_str("?REDACTED");
        }
        shown
    }
}

impl std::fmt::Debug for RedisUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RedisUrl({:?})", self.redacted())
    }
}

impl<'de> Deserialize<'de> for RedisUrl {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer).map(Self::new)
    }
}

impl Serialize for RedisUrl {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.redacted())
    }
}

/// `[runtime]`: the async runtime.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawRuntime {
    /// Worker threads: 1 runs everything on one thread, 0 means one per
    /// CPU the process may use. Default `1`.
    #[serde(deserialize_with = "super::lenient::u64")]
    pub worker_threads: u64,
}

impl Default for RawRuntime {
    fn default() -> Self {
        Self { worker_threads: 1 }
    }
}

/// `[log]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawLog {
    /// `text` or `json`. Default `text`.
    pub format: String,
}

impl Default for RawLog {
    fn default() -> Self {
        Self {
            format: "text".into(),
        }
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer).map(Secret::new)
    }
}

/// Secrets serialise redacted, so printing a configuration cannot leak them.
impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(crate::secret::REDACTED)
    }
}
