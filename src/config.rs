//! Configuration: layered, validated once at start into typed values.
//!
//! Layers, lowest first: built-in defaults < TOML file (`--config` or
//! `KLAVI_SIDECAR_CONFIG`) < environment < command-line flags. Environment
//! keys are `KLAVI_SIDECAR_<SECTION>__<KEY>`; the keys also come from
//! `KLAVI_ACCESS_KEY`, `KLAVI_SECRET_KEY` and their `_FILE` forms.
//! `config/default.toml` documents every key with its default, and a test
//! keeps it equal to [`RawConfig::default`].
//!
//! Any problem becomes one [`ConfigError`] naming the key, which the binary
//! prints on one line before exiting with status 2.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::providers::{Format, Serialized, Toml};
use figment::value::{Dict, Map, Value};
use figment::{Figment, Metadata, Profile, Provider};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use url::{Host, Url};

use crate::cache::policy::RefreshPolicy;
use crate::secret::Secret;
use crate::serve::server::Limits;

mod ranges;
pub use ranges::{RANGES, Range};

/// Prefix of the environment keys.
pub const ENV_PREFIX: &str = "KLAVI_SIDECAR_";
/// Environment variable naming the TOML file.
pub const CONFIG_ENV: &str = "KLAVI_SIDECAR_CONFIG";

/// Short environment names for the keys, as Kubernetes and Docker users
/// expect them, and the configuration key each one sets. They sit below
/// the `KLAVI_SIDECAR_` forms.
const SHORT_ENV: [(&str, &str); 4] = [
    ("KLAVI_ACCESS_KEY", "klavi.access_key"),
    ("KLAVI_SECRET_KEY", "klavi.secret_key"),
    ("KLAVI_ACCESS_KEY_FILE", "klavi.access_key_file"),
    ("KLAVI_SECRET_KEY_FILE", "klavi.secret_key_file"),
];

/// Keys whose values are secrets: never quoted in an error.
const SECRET_KEYS: [&str; 2] = ["klavi.access_key", "klavi.secret_key"];

/// Keys whose environment values are comma-separated lists.
const LIST_KEYS: [&str; 1] = ["server.allowed_hosts"];

/// Keys whose environment values are taken verbatim as strings. Others
/// are read as TOML-like scalars (`30` is a number, `true` a boolean); a
/// key such as `007` must not lose its zeros that way.
const STRING_KEYS: [&str; 9] = [
    "server.listen",
    "server.ops_listen",
    "klavi.base_url",
    "klavi.auth_path",
    "klavi.access_key",
    "klavi.secret_key",
    "klavi.access_key_file",
    "klavi.secret_key_file",
    "log.format",
];

/// The configuration as written: every key of `config/default.toml`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct RawConfig {
    /// `[server]`
    pub server: RawServer,
    /// `[klavi]`
    pub klavi: RawKlavi,
    /// `[refresh]`
    pub refresh: RawRefresh,
    /// `[log]`
    pub log: RawLog,
    /// `[runtime]`
    pub runtime: RawRuntime,
}

/// `[server]`: the two listeners.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawServer {
    /// Token API address. Default `127.0.0.1:8089`.
    pub listen: String,
    /// Lets `listen` be a non-loopback address. Default `false`.
    pub allow_non_loopback: bool,
    /// Probes and metrics address; `""` turns it off. Default `0.0.0.0:8090`.
    pub ops_listen: String,
    /// Token routes demand `Klavi-Sidecar: true`. Default `true`.
    pub require_header: bool,
    /// `Host` names accepted on token routes besides loopback ones. Default
    /// none.
    pub allowed_hosts: Vec<String>,
    /// Drain time after SIGTERM/SIGINT, seconds. Default `10`.
    pub shutdown_grace_secs: u64,
    /// Time to send a request's headers (and keep-alive idle time), ms.
    /// Default `5000`.
    pub header_read_timeout_ms: u64,
    /// Largest request head, bytes; larger gets 431. Default `16384`.
    pub max_header_bytes: u64,
    /// Largest request body, bytes; larger gets 413. Default `1024`.
    pub max_body_bytes: u64,
    /// Open connections per listener. Default `512`.
    pub max_connections: u64,
    /// Longest a request may take, ms; then 408. Default `10000`.
    pub request_timeout_ms: u64,
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
            max_body_bytes: 1024,
            max_connections: 512,
            request_timeout_ms: 10_000,
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
    pub connect_timeout_ms: u64,
    /// Default `10000`.
    pub request_timeout_ms: u64,
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
        }
    }
}

/// `[refresh]`: the refresh policy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawRefresh {
    /// Default `60`.
    pub refresh_before_secs: u64,
    /// Default `0.1`.
    pub jitter_ratio: f64,
    /// Default `5`.
    pub serve_margin_secs: u64,
    /// Default `500`.
    pub backoff_initial_ms: u64,
    /// Default `30`.
    pub backoff_max_secs: u64,
    /// Default `5`.
    pub min_interval_secs: u64,
    /// Default `5000`.
    pub wait_ms: u64,
    /// Default `60`.
    pub max_auth_per_minute: u64,
    /// Default `300`.
    pub fallback_ttl_secs: u64,
}

impl Default for RawRefresh {
    fn default() -> Self {
        Self {
            refresh_before_secs: 60,
            jitter_ratio: 0.1,
            serve_margin_secs: 5,
            backoff_initial_ms: 500,
            backoff_max_secs: 30,
            min_interval_secs: 5,
            wait_ms: 5000,
            max_auth_per_minute: 60,
            fallback_ttl_secs: 300,
        }
    }
}

/// `[runtime]`: the async runtime.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawRuntime {
    /// Worker threads: 1 runs everything on one thread, 0 means one per
    /// CPU the process may use. Default `1`.
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
        serializer.serialize_str("[REDACTED]")
    }
}

/// A bad configuration: which key, and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {message}")]
pub struct ConfigError {
    /// The key (`server.listen`), or the flag or file at fault.
    pub key: String,
    /// What is wrong, on one line.
    pub message: String,
}

impl ConfigError {
    fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            message: one_line(&message.into()),
        }
    }

    fn from_figment(error: figment::Error) -> Self {
        let key = if error.path.is_empty() {
            "configuration".to_string()
        } else {
            error.path.join(".")
        };
        // Figment quotes the offending value; for a key, that is the secret.
        let mut message = if SECRET_KEYS.contains(&key.as_str()) {
            "must be a string (the value is not shown)".to_string()
        } else {
            error.kind.to_string()
        };
        if let Some(metadata) = &error.metadata {
            let origin = match (&error.profile, error.path.is_empty()) {
                (Some(profile), false) => metadata.interpolate(profile, &error.path),
                _ => metadata.name.to_string(),
            };
            match &metadata.source {
                Some(source) => message.push_str(&format!(" (in {} {source})", metadata.name)),
                None => message.push_str(&format!(" (from {origin})")),
            }
        }
        Self::new(key, message)
    }
}

/// Collapses a multi-line message (TOML parse errors draw pictures) to one.
fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Values given on the command line, the top layer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Overrides {
    /// `--listen`: `server.listen`.
    pub listen: Option<String>,
    /// `--ops-listen`: `server.ops_listen`.
    pub ops_listen: Option<String>,
    /// `--log-format`: `log.format`.
    pub log_format: Option<String>,
}

/// Where the configuration comes from. The environment is passed in, not
/// read behind the caller's back, so tests need not touch the process's.
#[derive(Debug, Clone, Default)]
pub struct Sources {
    /// `--config PATH`; when `None`, `KLAVI_SIDECAR_CONFIG` from `env`.
    pub file: Option<PathBuf>,
    /// Environment variables (all of them; irrelevant ones are ignored).
    pub env: Vec<(String, String)>,
    /// Command-line flags.
    pub overrides: Overrides,
}

impl Sources {
    /// Sources from this process's environment.
    pub fn from_process(file: Option<PathBuf>, overrides: Overrides) -> Self {
        Self {
            file,
            env: std::env::vars_os()
                .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
                .collect(),
            overrides,
        }
    }

    fn env_var(&self, name: &str) -> Option<&str> {
        self.env
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The TOML file in effect, if any.
    pub fn config_file(&self) -> Option<PathBuf> {
        self.file.clone().or_else(|| {
            self.env_var(CONFIG_ENV)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        })
    }
}

/// A figment provider for a list of (dotted key, value) pairs, with a name
/// for error messages that maps keys back to where the user wrote them.
struct KeyValues {
    metadata: Metadata,
    pairs: Vec<(String, Value)>,
}

impl Provider for KeyValues {
    fn metadata(&self) -> Metadata {
        self.metadata.clone()
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        let mut dict = Dict::new();
        for (key, value) in &self.pairs {
            if let Some(nested) = figment::util::nest(key, value.clone()).into_dict() {
                dict = merge_dicts(dict, nested);
            }
        }
        Ok(Profile::Default.collect(dict))
    }
}

fn merge_dicts(mut base: Dict, other: Dict) -> Dict {
    for (key, value) in other {
        let merged = match (base.remove(&key), value) {
            (Some(Value::Dict(_, a)), Value::Dict(tag, b)) => Value::Dict(tag, merge_dicts(a, b)),
            (_, value) => value,
        };
        base.insert(key, merged);
    }
    base
}

/// `KLAVI_SIDECAR_SERVER__LISTEN` for `server.listen`.
fn env_name(key: &str) -> String {
    format!(
        "{ENV_PREFIX}{}",
        key.replace('.', "__").to_ascii_uppercase()
    )
}

/// An environment value as figment should see it: verbatim for string
/// keys, else a boolean or number when it reads as one, else the string
/// (which then fails to deserialise with an error naming the key).
///
/// Figment's own `Value::from_str` is not used: it panics on some inputs
/// (a quoted string with a multi-byte character before a backslash; found
/// by fuzzing), and a bad environment must be an error, not a crash.
fn env_value(key: &str, raw: &str) -> Value {
    if STRING_KEYS.contains(&key) {
        return Value::from(raw.to_string());
    }
    if LIST_KEYS.contains(&key) {
        let items: Vec<Value> = raw
            .split(',')
            .map(str::trim)
            .filter(|item| !item.is_empty())
            .map(|item| Value::from(item.to_string()))
            .collect();
        return Value::from(items);
    }
    let trimmed = raw.trim();
    if let Ok(b) = trimmed.parse::<bool>() {
        Value::from(b)
    } else if let Ok(n) = trimmed.parse::<u64>() {
        Value::from(n)
    } else if let Ok(n) = trimmed.parse::<i64>() {
        Value::from(n)
    } else if let Some(f) = trimmed.parse::<f64>().ok().filter(|f| f.is_finite()) {
        Value::from(f)
    } else {
        Value::from(raw.to_string())
    }
}

fn short_env_layer(sources: &Sources) -> KeyValues {
    let pairs = SHORT_ENV
        .iter()
        .filter_map(|(name, key)| Some((key.to_string(), env_value(key, sources.env_var(name)?))))
        .collect();
    KeyValues {
        metadata: Metadata::named("environment variable").interpolater(|_, keys| {
            let key = keys.join(".");
            SHORT_ENV
                .iter()
                .find(|(_, k)| *k == key)
                .map_or_else(|| env_name(&key), |(name, _)| name.to_string())
        }),
        pairs,
    }
}

fn prefixed_env_layer(sources: &Sources) -> KeyValues {
    let pairs = sources
        .env
        .iter()
        .filter_map(|(name, value)| {
            let rest = name.strip_prefix(ENV_PREFIX)?;
            if name == CONFIG_ENV || rest.is_empty() {
                return None;
            }
            let key = rest
                .split("__")
                .map(str::to_ascii_lowercase)
                .collect::<Vec<_>>()
                .join(".");
            Some((key.clone(), env_value(&key, value)))
        })
        .collect();
    KeyValues {
        metadata: Metadata::named("environment variable")
            .interpolater(|_, keys| env_name(&keys.join("."))),
        pairs,
    }
}

fn overrides_layer(overrides: &Overrides) -> KeyValues {
    let flags = [
        ("server.listen", &overrides.listen),
        ("server.ops_listen", &overrides.ops_listen),
        ("log.format", &overrides.log_format),
    ];
    KeyValues {
        metadata: Metadata::named("command-line flag").interpolater(|_, keys| {
            match keys.join(".").as_str() {
                "server.listen" => "--listen".into(),
                "server.ops_listen" => "--ops-listen".into(),
                other => format!("--{}", other.replace(['.', '_'], "-")),
            }
        }),
        pairs: flags
            .iter()
            .filter_map(|(key, value)| Some((key.to_string(), Value::from((*value).clone()?))))
            .collect(),
    }
}

/// Merges every layer into the raw configuration, without validating it.
pub fn load_raw(sources: &Sources) -> Result<RawConfig, ConfigError> {
    match sources.config_file() {
        Some(path) => {
            let text = std::fs::read_to_string(&path).map_err(|e| {
                ConfigError::new("--config", format!("cannot read {}: {e}", path.display()))
            })?;
            raw_from(Some((&path, &text)), sources)
        }
        None => raw_from(None, sources),
    }
}

/// A TOML file's text as a figment layer, named after the file.
struct TomlText<'a> {
    path: &'a Path,
    text: &'a str,
}

impl Provider for TomlText<'_> {
    fn metadata(&self) -> Metadata {
        Metadata::from("TOML file", figment::Source::File(self.path.to_path_buf()))
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        Toml::string(self.text).data()
    }
}

/// Merges the layers, the file given as text (`(path, text)`), without
/// validating. Never touches the file system.
pub fn raw_from(file: Option<(&Path, &str)>, sources: &Sources) -> Result<RawConfig, ConfigError> {
    let mut figment = Figment::from(Serialized::defaults(RawConfig::default()));
    if let Some((path, text)) = file {
        // Parse once here so a syntax error names the file on one line.
        toml::from_str::<toml::Table>(text).map_err(|e| {
            ConfigError::new(
                "--config",
                format!("{} is not valid TOML: {}", path.display(), e.message()),
            )
        })?;
        figment = figment.merge(TomlText { path, text });
    }
    figment = figment
        .merge(short_env_layer(sources))
        .merge(prefixed_env_layer(sources))
        .merge(overrides_layer(&sources.overrides));
    figment.extract().map_err(ConfigError::from_figment)
}

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
    /// Token API address (loopback unless explicitly allowed).
    pub listen: SocketAddr,
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
}

/// `[klavi]`, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct KlaviConfig {
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

/// `[refresh]`, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct RefreshConfig {
    /// The schedule and backoff knobs.
    pub policy: RefreshPolicy,
    /// How long a request may wait for a fetch when no token is servable.
    pub wait: Duration,
    /// Lifetime assumed when neither the response nor the JWT says.
    pub fallback_ttl: Duration,
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
    /// `[klavi]`
    pub klavi: KlaviConfig,
    /// `[refresh]`
    pub refresh: RefreshConfig,
    /// `[log]`
    pub log: LogFormat,
    /// Worker threads of the runtime (0: one per CPU).
    pub worker_threads: usize,
    /// What it was built from, for `check-config`.
    pub raw: RawConfig,
}

fn socket_addr(key: &str, value: &str) -> Result<SocketAddr, ConfigError> {
    value.trim().parse().map_err(|_| {
        ConfigError::new(
            key,
            format!("{value:?} is not an IP:port address (e.g. 127.0.0.1:8089 or [::1]:8089)"),
        )
    })
}

fn key_source(
    key: &str,
    inline: &Option<Secret>,
    file: &Option<PathBuf>,
) -> Result<KeySource, ConfigError> {
    let file_key = format!("{key}_file");
    match (inline, file) {
        (Some(_), Some(_)) => Err(ConfigError::new(
            key,
            format!("set either {key} or {file_key}, not both"),
        )),
        (Some(secret), None) if secret.expose().trim().is_empty() => {
            Err(ConfigError::new(key, "is empty"))
        }
        (Some(secret), None) => Ok(KeySource::Inline(secret.clone())),
        (None, Some(path)) => {
            read_key_file(path).map_err(|message| ConfigError::new(file_key, message))?;
            Ok(KeySource::File(path.clone()))
        }
        (None, None) => {
            let env = if key.ends_with("access_key") {
                "KLAVI_ACCESS_KEY"
            } else {
                "KLAVI_SECRET_KEY"
            };
            Err(ConfigError::new(
                key,
                format!(
                    "is required: set {env} or {env}_FILE (or {key} / {file_key} in the config file)"
                ),
            ))
        }
    }
}

/// Reads a key file: trailing newline trimmed, must not be empty.
pub fn read_key_file(path: &Path) -> Result<Secret, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let key = text.trim_end_matches(['\n', '\r']);
    if key.trim().is_empty() {
        return Err(format!("{} is empty", path.display()));
    }
    Ok(Secret::new(key))
}

fn is_loopback_host(url: &Url) -> bool {
    match url.host() {
        Some(Host::Domain(domain)) => domain.eq_ignore_ascii_case("localhost"),
        Some(Host::Ipv4(ip)) => ip.is_loopback(),
        Some(Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    }
}

fn auth_url(raw: &RawKlavi) -> Result<Url, ConfigError> {
    let base = Url::parse(raw.base_url.trim()).map_err(|e| {
        ConfigError::new(
            "klavi.base_url",
            format!("{:?} is not a URL: {e}", raw.base_url),
        )
    })?;
    match base.scheme() {
        "https" => {}
        "http" if is_loopback_host(&base) || raw.allow_insecure_http => {}
        "http" => {
            return Err(ConfigError::new(
                "klavi.base_url",
                "plain http:// is only allowed for loopback hosts; use https:// or set klavi.allow_insecure_http = true",
            ));
        }
        other => {
            return Err(ConfigError::new(
                "klavi.base_url",
                format!("scheme {other:?} is not supported; use https://"),
            ));
        }
    }
    if base.host().is_none() {
        return Err(ConfigError::new("klavi.base_url", "has no host"));
    }
    if !base.username().is_empty() || base.password().is_some() {
        return Err(ConfigError::new(
            "klavi.base_url",
            "must not carry credentials; set klavi.access_key and klavi.secret_key",
        ));
    }
    if base.query().is_some() || base.fragment().is_some() {
        return Err(ConfigError::new(
            "klavi.base_url",
            "must not have a query or fragment",
        ));
    }
    if !raw.auth_path.starts_with('/') {
        return Err(ConfigError::new(
            "klavi.auth_path",
            format!("{:?} must start with /", raw.auth_path),
        ));
    }
    let joined = format!("{}{}", base.as_str().trim_end_matches('/'), raw.auth_path);
    Url::parse(&joined)
        .map_err(|e| ConfigError::new("klavi.auth_path", format!("{:?}: {e}", raw.auth_path)))
}

/// `server.allowed_hosts`, checked and lower-cased: host names or IP
/// literals (IPv6 in brackets), without a port (any port is accepted).
fn allowed_hosts(hosts: &[String]) -> Result<Vec<String>, ConfigError> {
    hosts
        .iter()
        .map(|host| {
            let host = host.trim();
            let bracketed_v6 = host
                .strip_prefix('[')
                .and_then(|h| h.strip_suffix(']'))
                .is_some_and(|h| h.parse::<std::net::Ipv6Addr>().is_ok());
            let name = !host.is_empty()
                && host
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-' || b == b'_');
            if bracketed_v6 || name {
                Ok(host.to_ascii_lowercase())
            } else {
                Err(ConfigError::new(
                    "server.allowed_hosts",
                    format!(
                        "{host:?} is not a host name (e.g. \"sidecar.internal\", or \"[fd00::1]\" \
                         for IPv6; no scheme, port or path)"
                    ),
                ))
            }
        })
        .collect()
}

impl Config {
    /// Checks every key and builds the typed configuration.
    pub fn validate(raw: RawConfig) -> Result<Self, ConfigError> {
        let s = &raw.server;
        let listen = socket_addr("server.listen", &s.listen)?;
        if !listen.ip().is_loopback() && !s.allow_non_loopback {
            return Err(ConfigError::new(
                "server.listen",
                format!(
                    "{listen} is not a loopback address; the token API must stay inside the pod \
                     (set server.allow_non_loopback = true to override)"
                ),
            ));
        }
        let ops_listen = if s.ops_listen.trim().is_empty() {
            None
        } else {
            let ops = socket_addr("server.ops_listen", &s.ops_listen)?;
            let overlaps = ops.port() == listen.port()
                && ops.port() != 0
                && (ops.ip() == listen.ip() || ops.ip().is_unspecified());
            if overlaps {
                return Err(ConfigError::new(
                    "server.ops_listen",
                    format!("{ops} clashes with server.listen ({listen}); use another port"),
                ));
            }
            Some(ops)
        };

        let allowed_hosts = allowed_hosts(&s.allowed_hosts)?;

        let k = &raw.klavi;
        let auth_url = auth_url(k)?;
        let access_key = key_source("klavi.access_key", &k.access_key, &k.access_key_file)?;
        let secret_key = key_source("klavi.secret_key", &k.secret_key, &k.secret_key_file)?;

        ranges::check_ranges(&raw)?;
        ranges::cross_checks(&raw)?;
        let r = &raw.refresh;
        let ms = Duration::from_millis;
        let secs = Duration::from_secs;
        let max_auth_per_minute = u32::try_from(r.max_auth_per_minute).unwrap_or(u32::MAX);

        let log = match raw.log.format.trim().to_ascii_lowercase().as_str() {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            other => {
                return Err(ConfigError::new(
                    "log.format",
                    format!("{other:?} is not one of \"text\", \"json\""),
                ));
            }
        };

        Ok(Self {
            server: ServerConfig {
                listen,
                ops_listen,
                require_header: s.require_header,
                allowed_hosts,
                shutdown_grace: secs(s.shutdown_grace_secs),
                limits: Limits {
                    header_read_timeout: ms(s.header_read_timeout_ms),
                    max_header_bytes: s.max_header_bytes as usize,
                    max_connections: s.max_connections as usize,
                },
                max_body_bytes: s.max_body_bytes as usize,
                request_timeout: ms(s.request_timeout_ms),
            },
            klavi: KlaviConfig {
                auth_url,
                access_key,
                secret_key,
                connect_timeout: ms(k.connect_timeout_ms),
                request_timeout: ms(k.request_timeout_ms),
            },
            refresh: RefreshConfig {
                policy: RefreshPolicy {
                    refresh_before: secs(r.refresh_before_secs),
                    jitter_ratio: r.jitter_ratio,
                    serve_margin: secs(r.serve_margin_secs),
                    backoff_initial: ms(r.backoff_initial_ms),
                    backoff_max: secs(r.backoff_max_secs),
                    min_interval: secs(r.min_interval_secs),
                    max_auth_per_minute,
                },
                wait: ms(r.wait_ms),
                fallback_ttl: secs(r.fallback_ttl_secs),
            },
            log,
            worker_threads: worker_threads(&raw.runtime)?,
            raw,
        })
    }

    /// The effective configuration as TOML, secrets redacted.
    pub fn to_redacted_toml(&self) -> String {
        toml::to_string(&self.raw).unwrap_or_else(|e| format!("# cannot render: {e}\n"))
    }
}

/// `runtime.worker_threads`, checked.
pub fn worker_threads(runtime: &RawRuntime) -> Result<usize, ConfigError> {
    let Range { low, high, .. } = ranges::range_of("runtime.worker_threads").unwrap_or(Range {
        key: "runtime.worker_threads",
        low: 0,
        high: 64,
    });
    match runtime.worker_threads {
        n if (low..=high).contains(&n) => Ok(n as usize),
        n => Err(ConfigError::new(
            "runtime.worker_threads",
            format!("{n} is out of range: must be between {low} (one per CPU) and {high}"),
        )),
    }
}

/// The address to probe for `healthcheck`: the ops listener (or, when it is
/// off, the token listener), with a wildcard IP replaced by loopback.
pub fn probe_address(raw: &RawConfig) -> Option<SocketAddr> {
    let text = if raw.server.ops_listen.trim().is_empty() {
        &raw.server.listen
    } else {
        &raw.server.ops_listen
    };
    let mut addr: SocketAddr = text.trim().parse().ok()?;
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr.ip() {
            IpAddr::V4(_) => IpAddr::from([127, 0, 0, 1]),
            IpAddr::V6(_) => IpAddr::from([0u16, 0, 0, 0, 0, 0, 0, 1]),
        });
    }
    Some(addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Sources {
        Sources {
            env: pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Sources::default()
        }
    }

    const KEYS: [(&str, &str); 2] = [("KLAVI_ACCESS_KEY", "ak"), ("KLAVI_SECRET_KEY", "sk")];

    fn with_keys(extra: &[(&str, &str)]) -> Sources {
        let mut pairs = KEYS.to_vec();
        pairs.extend_from_slice(extra);
        env(&pairs)
    }

    fn error_of(sources: &Sources) -> ConfigError {
        match load(sources) {
            Err(e) => e,
            Ok(config) => panic!("expected an error, got {config:?}"),
        }
    }

    #[test]
    fn defaults_match_the_spec() {
        let config = load(&with_keys(&[])).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            config.server.listen,
            "127.0.0.1:8089".parse().ok().unwrap_or_else(|| panic!())
        );
        assert_eq!(
            config.server.ops_listen.map(|a| a.to_string()),
            Some("0.0.0.0:8090".into())
        );
        assert!(config.server.require_header);
        assert_eq!(config.server.shutdown_grace, Duration::from_secs(10));
        assert_eq!(config.server.limits, Limits::default());
        assert_eq!(config.server.max_body_bytes, 1024);
        assert_eq!(config.server.request_timeout, Duration::from_secs(10));
        assert_eq!(
            config.klavi.auth_url.as_str(),
            "https://api-sandbox.klavi.ai/payment/customer/v1/auth"
        );
        assert_eq!(
            config.klavi.access_key,
            KeySource::Inline(Secret::new("ak"))
        );
        assert_eq!(config.klavi.connect_timeout, Duration::from_millis(3000));
        assert_eq!(config.klavi.request_timeout, Duration::from_millis(10_000));
        assert_eq!(config.refresh.policy, RefreshPolicy::default());
        assert_eq!(config.refresh.wait, Duration::from_millis(5000));
        assert_eq!(config.refresh.fallback_ttl, Duration::from_secs(300));
        assert_eq!(config.log, LogFormat::Text);
        assert_eq!(config.worker_threads, 1);
    }

    #[test]
    fn default_toml_documents_exactly_the_defaults() {
        let text = include_str!("../config/default.toml");
        // Every key is documented commented out; uncommenting gives the defaults.
        let uncommented: String = text
            .lines()
            .map(|line| match line.strip_prefix("# ") {
                Some(rest) if rest.contains(" = ") || rest.starts_with('[') => rest,
                _ => line,
            })
            .collect::<Vec<_>>()
            .join("\n");
        let parsed: RawConfig = toml::from_str(&uncommented).unwrap_or_else(|e| panic!("{e}"));
        let mut expected = RawConfig::default();
        expected.klavi.access_key = Some(Secret::new("your-access-key"));
        expected.klavi.secret_key = Some(Secret::new("your-secret-key"));
        assert_eq!(parsed.server, expected.server);
        assert_eq!(parsed.klavi.base_url, expected.klavi.base_url);
        assert_eq!(parsed.klavi.auth_path, expected.klavi.auth_path);
        assert_eq!(
            parsed.klavi.connect_timeout_ms,
            expected.klavi.connect_timeout_ms
        );
        assert_eq!(
            parsed.klavi.request_timeout_ms,
            expected.klavi.request_timeout_ms
        );
        assert_eq!(
            parsed.klavi.allow_insecure_http,
            expected.klavi.allow_insecure_http
        );
        assert_eq!(parsed.refresh, expected.refresh);
        assert_eq!(parsed.log, expected.log);
        assert_eq!(parsed.runtime, expected.runtime);
        // And the file as shipped (all commented) is valid and yields defaults.
        let shipped: RawConfig = toml::from_str(text).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(shipped, RawConfig::default());
    }

    #[test]
    fn precedence_defaults_file_env_flags() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            "[server]\nlisten = \"127.0.0.1:1001\"\nops_listen = \"127.0.0.1:2001\"\nshutdown_grace_secs = 3\n[refresh]\nwait_ms = 700\n",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let mut sources = with_keys(&[
            ("KLAVI_SIDECAR_SERVER__LISTEN", "127.0.0.1:1002"),
            ("KLAVI_SIDECAR_SERVER__OPS_LISTEN", "127.0.0.1:2002"),
            ("KLAVI_SIDECAR_REFRESH__WAIT_MS", "800"),
        ]);
        sources.file = Some(path);
        sources.overrides.listen = Some("127.0.0.1:1003".into());
        let config = load(&sources).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(config.server.listen.port(), 1003, "flag beats env");
        assert_eq!(
            config.server.ops_listen.map(|a| a.port()),
            Some(2002),
            "env beats file"
        );
        assert_eq!(
            config.server.shutdown_grace,
            Duration::from_secs(3),
            "file beats default"
        );
        assert_eq!(config.refresh.wait, Duration::from_millis(800));
    }

    #[test]
    fn config_file_from_the_environment() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "[log]\nformat = \"json\"\n").unwrap_or_else(|e| panic!("{e}"));
        let path_text = path.display().to_string();
        let config =
            load(&with_keys(&[(CONFIG_ENV, &path_text)])).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(config.log, LogFormat::Json);
    }

    #[test]
    fn secrets_from_env_stay_exact_strings() {
        let sources = env(&[
            ("KLAVI_ACCESS_KEY", "007"),
            ("KLAVI_SIDECAR_KLAVI__SECRET_KEY", "1.50"),
            ("KLAVI_SECRET_KEY", "ignored-below-prefixed"),
        ]);
        let config = load(&sources).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            config.klavi.access_key,
            KeySource::Inline(Secret::new("007"))
        );
        assert_eq!(
            config.klavi.secret_key,
            KeySource::Inline(Secret::new("1.50"))
        );
    }

    #[test]
    fn hostile_environment_values_are_errors_not_panics() {
        // Figment's own parser panics on this one (fuzzing found it).
        let cases = [
            "\"é\\",
            "\"\\u{",
            "[1,2",
            "{a=1}",
            "0x10",
            "1e400",
            "-0",
            "true false",
        ];
        for value in cases {
            let result = load(&with_keys(&[("KLAVI_SIDECAR_REFRESH__WAIT_MS", value)]));
            assert!(result.is_err() || value == "-0", "{value:?}");
        }
        let config = load(&with_keys(&[
            ("KLAVI_SIDECAR_REFRESH__JITTER_RATIO", "0.25"),
            ("KLAVI_SIDECAR_SERVER__REQUIRE_HEADER", "false"),
            ("KLAVI_SIDECAR_REFRESH__WAIT_MS", " 700 "),
        ]))
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(config.refresh.policy.jitter_ratio, 0.25);
        assert!(!config.server.require_header);
        assert_eq!(config.refresh.wait, Duration::from_millis(700));
    }

    #[test]
    fn allowed_hosts_from_env_and_file() {
        let config = load(&with_keys(&[(
            "KLAVI_SIDECAR_SERVER__ALLOWED_HOSTS",
            " Sidecar.Internal , [fd00::1],,",
        )]))
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            config.server.allowed_hosts,
            vec!["sidecar.internal".to_string(), "[fd00::1]".to_string()]
        );
        let raw = raw_from(
            Some((
                Path::new("c.toml"),
                "[server]\nallowed_hosts = [\"a.example\"]\n",
            )),
            &with_keys(&[]),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(raw.server.allowed_hosts, vec!["a.example".to_string()]);
        let config = load(&with_keys(&[])).unwrap_or_else(|e| panic!("{e}"));
        assert!(config.server.allowed_hosts.is_empty());
        assert_eq!(config.refresh.policy.max_auth_per_minute, 60);
    }

    #[test]
    fn ipv6_and_empty_ops_listen_from_env() {
        let config = load(&with_keys(&[
            ("KLAVI_SIDECAR_SERVER__LISTEN", "[::1]:8089"),
            ("KLAVI_SIDECAR_SERVER__OPS_LISTEN", ""),
        ]))
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(config.server.listen.to_string(), "[::1]:8089");
        assert_eq!(config.server.ops_listen, None);
    }

    #[test]
    fn key_files() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let ak = dir.path().join("ak");
        let sk = dir.path().join("sk");
        std::fs::write(&ak, "file-access\n").unwrap_or_else(|e| panic!("{e}"));
        std::fs::write(&sk, "file-secret").unwrap_or_else(|e| panic!("{e}"));
        let (ak_text, sk_text) = (ak.display().to_string(), sk.display().to_string());
        let config = load(&env(&[
            ("KLAVI_ACCESS_KEY_FILE", &ak_text),
            ("KLAVI_SECRET_KEY_FILE", &sk_text),
        ]))
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(config.klavi.access_key, KeySource::File(ak.clone()));
        assert_eq!(read_key_file(&ak), Ok(Secret::new("file-access")));
        assert_eq!(read_key_file(&sk), Ok(Secret::new("file-secret")));
    }

    #[test]
    fn bad_configurations_name_the_key() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let empty = dir.path().join("empty");
        std::fs::write(&empty, "\n").unwrap_or_else(|e| panic!("{e}"));
        let empty = empty.display().to_string();
        let missing = dir.path().join("missing").display().to_string();
        let cases: Vec<(Sources, &str, &str)> = vec![
            (
                env(&[("KLAVI_SECRET_KEY", "s")]),
                "klavi.access_key",
                "required",
            ),
            (
                env(&[("KLAVI_ACCESS_KEY", "a")]),
                "klavi.secret_key",
                "required",
            ),
            (
                with_keys(&[("KLAVI_ACCESS_KEY_FILE", &empty)]),
                "klavi.access_key",
                "not both",
            ),
            (
                env(&[("KLAVI_ACCESS_KEY_FILE", &empty), ("KLAVI_SECRET_KEY", "s")]),
                "klavi.access_key_file",
                "is empty",
            ),
            (
                env(&[
                    ("KLAVI_ACCESS_KEY_FILE", &missing),
                    ("KLAVI_SECRET_KEY", "s"),
                ]),
                "klavi.access_key_file",
                "cannot read",
            ),
            (
                env(&[("KLAVI_ACCESS_KEY", " "), ("KLAVI_SECRET_KEY", "s")]),
                "klavi.access_key",
                "empty",
            ),
            (
                with_keys(&[("KLAVI_SIDECAR_SERVER__LISTEN", "0.0.0.0:8089")]),
                "server.listen",
                "loopback",
            ),
            (
                with_keys(&[("KLAVI_SIDECAR_SERVER__LISTEN", "localhost:8089")]),
                "server.listen",
                "IP:port",
            ),
            (
                with_keys(&[("KLAVI_SIDECAR_SERVER__OPS_LISTEN", "nope")]),
                "server.ops_listen",
                "IP:port",
            ),
            (
                with_keys(&[("KLAVI_SIDECAR_SERVER__OPS_LISTEN", "0.0.0.0:8089")]),
                "server.ops_listen",
                "clashes",
            ),
            (
                with_keys(&[("KLAVI_SIDECAR_SERVER__SHUTDOWN_GRACE_SECS", "soon")]),
                "server.shutdown_grace_secs",
                "KLAVI_SIDECAR_SERVER__SHUTDOWN_GRACE_SECS",
            ),
            (
                with_keys(&[("KLAVI_SIDECAR_SERVER__LISTNE", "x")]),
                "server.listne",
                "unknown field",
            ),
            (
                with_keys(&[("KLAVI_SIDECAR_KLAVI__BASE_URL", "http://api.klavi.ai")]),
                "klavi.base_url",
                "loopback",
            ),
            (
                with_keys(&[("KLAVI_SIDECAR_KLAVI__BASE_URL", "ftp://x")]),
                "klavi.base_url",
                "scheme",
            ),
            (
                with_keys(&[("KLAVI_SIDECAR_KLAVI__BASE_URL", "not a url")]),
                "klavi.base_url",
                "not a URL",
            ),
            (
                with_keys(&[("KLAVI_SIDECAR_KLAVI__BASE_URL", "https://u:p@api.klavi.ai")]),
                "klavi.base_url",
                "credentials",
            ),
            (
                with_keys(&[("KLAVI_SIDECAR_KLAVI__AUTH_PATH", "auth")]),
                "klavi.auth_path",
                "start with /",
            ),
            (
                with_keys(&[("KLAVI_SIDECAR_KLAVI__REQUEST_TIMEOUT_MS", "0")]),
                "klavi.request_timeout_ms",
                "between 100 and 600000",
            ),
            (
                with_keys(&[("KLAVI_SIDECAR_REFRESH__JITTER_RATIO", "0.9")]),
                "refresh.jitter_ratio",
                "between",
            ),
            (
                with_keys(&[("KLAVI_SIDECAR_REFRESH__BACKOFF_MAX_SECS", "0")]),
                "refresh.backoff_max_secs",
                "out of range",
            ),
            (
                with_keys(&[("KLAVI_SIDECAR_REFRESH__FALLBACK_TTL_SECS", "10")]),
                "refresh.fallback_ttl_secs",
                "twice",
            ),
            (
                with_keys(&[("KLAVI_SIDECAR_REFRESH__WAIT_MS", "-1")]),
                "refresh.wait_ms",
                "KLAVI_SIDECAR_REFRESH__WAIT_MS",
            ),
            (
                with_keys(&[("KLAVI_SIDECAR_REFRESH__MIN_INTERVAL_SECS", "999999")]),
                "refresh.min_interval_secs",
                "between 1 and 3600",
            ),
            (
                with_keys(&[("KLAVI_SIDECAR_LOG__FORMAT", "xml")]),
                "log.format",
                "not one of",
            ),
            (
                with_keys(&[("KLAVI_SIDECAR_SERVER__MAX_HEADER_BYTES", "10")]),
                "server.max_header_bytes",
                "between",
            ),
            (
                with_keys(&[("KLAVI_SIDECAR_RUNTIME__WORKER_THREADS", "1000")]),
                "runtime.worker_threads",
                "between",
            ),
            (
                with_keys(&[("KLAVI_SIDECAR_SERVER__MAX_CONNECTIONS", "0")]),
                "server.max_connections",
                "between",
            ),
            (
                with_keys(&[("KLAVI_SIDECAR_SERVER__HEADER_READ_TIMEOUT_MS", "0")]),
                "server.header_read_timeout_ms",
                "out of range",
            ),
            (
                with_keys(&[("KLAVI_SIDECAR_SERVER__REQUEST_TIMEOUT_MS", "5000")]),
                "server.request_timeout_ms",
                "refresh.wait_ms",
            ),
            // The values that broke v1: a zero that spins or cannot wait.
            (
                with_keys(&[("KLAVI_SIDECAR_REFRESH__MIN_INTERVAL_SECS", "0")]),
                "refresh.min_interval_secs",
                "between 1 and 3600",
            ),
            (
                with_keys(&[("KLAVI_SIDECAR_REFRESH__WAIT_MS", "0")]),
                "refresh.wait_ms",
                "between 100 and 300000",
            ),
            (
                with_keys(&[("KLAVI_SIDECAR_REFRESH__BACKOFF_INITIAL_MS", "0")]),
                "refresh.backoff_initial_ms",
                "between 100 and 60000",
            ),
            (
                with_keys(&[("KLAVI_SIDECAR_REFRESH__MAX_AUTH_PER_MINUTE", "0")]),
                "refresh.max_auth_per_minute",
                "between 1 and 600",
            ),
            (
                with_keys(&[
                    ("KLAVI_SIDECAR_SERVER__SHUTDOWN_GRACE_SECS", "3"),
                    ("KLAVI_SIDECAR_REFRESH__WAIT_MS", "5000"),
                ]),
                "server.shutdown_grace_secs",
                "refresh.wait_ms",
            ),
            (
                with_keys(&[("KLAVI_SIDECAR_REFRESH__SERVE_MARGIN_SECS", "60")]),
                "refresh.serve_margin_secs",
                "refresh_before_secs",
            ),
            (
                with_keys(&[(
                    "KLAVI_SIDECAR_SERVER__ALLOWED_HOSTS",
                    "ok.example,http://evil",
                )]),
                "server.allowed_hosts",
                "not a host name",
            ),
            (
                with_keys(&[("KLAVI_SIDECAR_SERVER__ALLOWED_HOSTS", "host:8089")]),
                "server.allowed_hosts",
                "no scheme, port or path",
            ),
            (
                Sources {
                    file: Some(missing.clone().into()),
                    ..with_keys(&[])
                },
                "--config",
                "cannot read",
            ),
        ];
        for (sources, key, needle) in cases {
            let error = error_of(&sources);
            assert_eq!(error.key, key, "{error}");
            assert!(
                error.message.contains(needle),
                "{error} should mention {needle:?}"
            );
            assert!(!error.to_string().contains('\n'), "one line: {error}");
        }
    }

    #[test]
    fn malformed_toml_is_one_line_naming_the_file() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, "[server\nlisten = 1\n").unwrap_or_else(|e| panic!("{e}"));
        let error = error_of(&Sources {
            file: Some(path.clone()),
            ..with_keys(&[])
        });
        assert_eq!(error.key, "--config");
        assert!(error.message.contains("bad.toml"), "{error}");
        assert!(!error.to_string().contains('\n'));

        std::fs::write(&path, "[server]\nlisten = 8089\n").unwrap_or_else(|e| panic!("{e}"));
        let error = error_of(&Sources {
            file: Some(path),
            ..with_keys(&[])
        });
        assert_eq!(error.key, "server.listen");
        assert!(error.message.contains("bad.toml"), "{error}");
    }

    #[test]
    fn a_mistyped_secret_is_not_quoted_in_the_error() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "[klavi]\nsecret_key = 987654321\n")
            .unwrap_or_else(|e| panic!("{e}"));
        let error = error_of(&Sources {
            file: Some(path),
            ..env(&[("KLAVI_ACCESS_KEY", "a")])
        });
        assert_eq!(error.key, "klavi.secret_key");
        assert!(!error.to_string().contains("987654321"), "{error}");
    }

    #[test]
    fn redacted_toml_hides_secrets() {
        let config = load(&env(&[
            ("KLAVI_ACCESS_KEY", "ak-visible?"),
            ("KLAVI_SECRET_KEY", "sk-visible?"),
        ]))
        .unwrap_or_else(|e| panic!("{e}"));
        let text = config.to_redacted_toml();
        assert!(!text.contains("visible"), "{text}");
        assert!(text.contains("access_key = \"[REDACTED]\""), "{text}");
        assert!(!format!("{config:?}").contains("visible"));
    }

    #[test]
    fn probe_address_table() {
        let raw = |listen: &str, ops: &str| RawConfig {
            server: RawServer {
                listen: listen.into(),
                ops_listen: ops.into(),
                ..RawServer::default()
            },
            ..RawConfig::default()
        };
        let cases = [
            (
                raw("127.0.0.1:8089", "0.0.0.0:8090"),
                Some("127.0.0.1:8090"),
            ),
            (raw("127.0.0.1:8089", "[::]:8090"), Some("[::1]:8090")),
            (
                raw("127.0.0.1:8089", "10.0.0.5:9000"),
                Some("10.0.0.5:9000"),
            ),
            (raw("127.0.0.1:8089", ""), Some("127.0.0.1:8089")),
            (raw("127.0.0.1:8089", "bad"), None),
        ];
        for (raw, expected) in cases {
            assert_eq!(
                probe_address(&raw).map(|a| a.to_string()).as_deref(),
                expected
            );
        }
    }
}
