//! From [`RawConfig`] to [`Config`]: every key checked once, every failure
//! one [`ConfigError`] naming the full key (`profiles.mgmt.secret_key_file`).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use url::{Host, Url};

use super::ranges::{self, KeyNames};
use super::raw::{RawConfig, RawFleet, RawKlavi, RawRefresh, RedisUrl};
use super::{
    Config, ConfigError, DEFAULT_PROFILE, FleetConfig, KeySource, KlaviConfig, LogFormat,
    ProfileConfig, ProxyConfig, RefreshConfig, ServerConfig, TokenFileConfig, TokenFileFormat,
    TokenMode, worker_threads,
};
use crate::cache::policy::RefreshPolicy;
use crate::secret::{REDACTED, Secret};
use crate::serve::server::{Limits, ListenAddr};

/// Longest profile name.
const MAX_NAME_LEN: usize = 32;

impl Config {
    /// Checks every key and builds the typed configuration.
    pub fn validate(raw: RawConfig) -> Result<Self, ConfigError> {
        let server = server(&raw)?;
        let log = log_format(&raw.log.format)?;
        ranges::check_server(&raw.server)?;
        // [klavi] and [refresh] are checked even without a default
        // profile, under their own names: the other profiles inherit them.
        let defaults = KeyNames::of(DEFAULT_PROFILE);
        klavi_urls(&defaults, &raw.klavi)?;
        ranges::check_profile(&defaults, &raw.klavi, &raw.refresh)?;

        let mut profiles = Vec::new();
        if raw.klavi.has_keys() || raw.profiles.is_empty() {
            profiles.push(profile(DEFAULT_PROFILE, &raw.klavi, &raw.refresh, &raw)?);
        }
        for (name, own) in &raw.profiles {
            check_name(name)?;
            let (klavi, refresh) = own.effective(&raw.klavi, &raw.refresh);
            profiles.push(profile(name, &klavi, &refresh, &raw)?);
        }
        distinct_listeners(&server, &profiles)?;
        distinct_token_files(&server, &profiles)?;

        let fleet = fleet(&raw.fleet)?;
        if let Some(fleet) = &fleet {
            fleet_waits(fleet, &profiles)?;
        }
        Ok(Self {
            proxy: proxy(&raw, &profiles)?,
            fleet,
            server,
            profiles,
            log,
            worker_threads: worker_threads(&raw.runtime)?,
            raw,
        })
    }
}

fn server(raw: &RawConfig) -> Result<ServerConfig, ConfigError> {
    let s = &raw.server;
    let listen = s
        .listen
        .parse::<ListenAddr>()
        .map_err(|e| ConfigError::new("server.listen", e))?;
    if !listen.is_local() && !s.allow_non_loopback {
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
        if s.ops_listen.trim().starts_with("unix:") {
            return Err(ConfigError::new(
                "server.ops_listen",
                "the ops listener cannot be a unix socket: kubelet probes and Prometheus reach \
                 it over TCP on the pod's address; put server.listen on the socket instead",
            ));
        }
        let ops = socket_addr("server.ops_listen", &s.ops_listen)?;
        if listen.tcp().is_some_and(|listen| tcp_clash(ops, listen)) {
            return Err(ConfigError::new(
                "server.ops_listen",
                format!("{ops} clashes with server.listen ({listen}); use another port"),
            ));
        }
        Some(ops)
    };
    let ms = Duration::from_millis;
    Ok(ServerConfig {
        listen,
        ops_listen,
        require_header: s.require_header,
        allowed_hosts: allowed_hosts(&s.allowed_hosts)?,
        shutdown_grace: Duration::from_secs(s.shutdown_grace_secs),
        limits: Limits {
            header_read_timeout: ms(s.header_read_timeout_ms),
            max_header_bytes: usize::try_from(s.max_header_bytes).unwrap_or(usize::MAX),
            max_connections: usize::try_from(s.max_connections).unwrap_or(usize::MAX),
        },
        max_body_bytes: usize::try_from(s.max_body_bytes).unwrap_or(usize::MAX),
        request_timeout: ms(s.request_timeout_ms),
        socket_mode: socket_mode(&s.socket_mode)?,
    })
}

/// An octal permission mode (`"0660"`, `"640"`), at most `0777`: no
/// set-id or sticky bits, which mean nothing for a socket or a token file.
fn file_mode(key: &str, text: &str) -> Result<u32, ConfigError> {
    let digits = text.trim();
    let parsed = (!digits.is_empty()
        && digits.len() <= 4
        && digits.bytes().all(|b| (b'0'..=b'7').contains(&b)))
    .then(|| u32::from_str_radix(digits, 8).ok())
    .flatten()
    .filter(|mode| *mode <= 0o777);
    parsed.ok_or_else(|| {
        ConfigError::new(
            key,
            format!("{text:?} is not an octal permission mode from 0000 to 0777 (e.g. \"0660\")"),
        )
    })
}

/// `server.socket_mode`: connecting needs write permission, so without
/// the owner's write bit not even the sidecar's own user could use the
/// socket, nor tell a stale one from a live one at the next start.
fn socket_mode(text: &str) -> Result<u32, ConfigError> {
    let mode = file_mode("server.socket_mode", text)?;
    if mode & 0o200 == 0 {
        return Err(ConfigError::new(
            "server.socket_mode",
            format!(
                "{text:?} lacks the owner's write bit: connecting to a socket needs it (e.g. \"0660\")"
            ),
        ));
    }
    Ok(mode)
}

/// A profile's token file: off when `token_file` is empty; else an
/// absolute path, its mode and its format. (single_use profiles are
/// refused one in [`mode_and_fleet`].)
fn token_file(names: &KeyNames, k: &RawKlavi) -> Result<Option<TokenFileConfig>, ConfigError> {
    let mode = file_mode(&names.klavi("token_file_mode"), &k.token_file_mode)?;
    let format = match k.token_file_format.trim() {
        "raw" => TokenFileFormat::Raw,
        "json" => TokenFileFormat::Json,
        other => {
            return Err(ConfigError::new(
                names.klavi("token_file_format"),
                format!("{other:?} is not one of \"raw\", \"json\""),
            ));
        }
    };
    let path = k.token_file.trim();
    if path.is_empty() {
        return Ok(None);
    }
    let path = PathBuf::from(path);
    if !path.is_absolute() || path.file_name().is_none() {
        return Err(ConfigError::new(
            names.klavi("token_file"),
            format!(
                "{:?} must be an absolute path to a file, for example /var/run/klavi/token",
                path.display()
            ),
        ));
    }
    Ok(Some(TokenFileConfig { path, mode, format }))
}

/// One profile from its effective `[klavi]` and `[refresh]`.
fn profile(
    name: &str,
    k: &RawKlavi,
    r: &RawRefresh,
    raw: &RawConfig,
) -> Result<ProfileConfig, ConfigError> {
    let names = KeyNames::of(name);
    let (base_url, auth_url) = klavi_urls(&names, k)?;
    let access_key = key_source(&names, "access_key", &k.access_key, &k.access_key_file)?;
    let secret_key = key_source(&names, "secret_key", &k.secret_key, &k.secret_key_file)?;
    ranges::check_profile(&names, k, r)?;
    ranges::check_server_against(&raw.server, &names, r)?;
    let (mode, fleet) = mode_and_fleet(&names, k)?;
    let ms = Duration::from_millis;
    let secs = Duration::from_secs;
    Ok(ProfileConfig {
        name: name.to_string(),
        required: k.required,
        mode,
        fleet,
        proxy_listen: proxy_listen(&names, &k.proxy_listen, raw.server.allow_non_loopback)?,
        token_file: token_file(&names, k)?,
        klavi: KlaviConfig {
            base_url,
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
                max_auth_per_minute: u32::try_from(r.max_auth_per_minute).unwrap_or(u32::MAX),
            },
            wait: ms(r.wait_ms),
            fallback_ttl: secs(r.fallback_ttl_secs),
        },
    })
}

/// `mode` and what a single_use profile cannot have: a token file (a file
/// is read by anyone, any number of times) or a place in the fleet (a
/// token shared by many sidecars is not single-use).
fn mode_and_fleet(names: &KeyNames, k: &RawKlavi) -> Result<(TokenMode, bool), ConfigError> {
    match k.mode.trim() {
        "shared" => Ok((TokenMode::Shared, k.fleet.unwrap_or(true))),
        "single_use" => {
            if !k.token_file.trim().is_empty() {
                return Err(ConfigError::new(
                    names.klavi("token_file"),
                    "a single_use profile cannot have a token file: a file can be read any \
                     number of times; leave it empty or use mode = \"shared\"",
                ));
            }
            if k.fleet == Some(true) {
                return Err(ConfigError::new(
                    names.klavi("fleet"),
                    "a single_use profile cannot be in the fleet: a token shared by many \
                     sidecars is not single-use; remove the key or set it to false",
                ));
            }
            let pool_size = usize::try_from(k.pool_size).unwrap_or(usize::MAX);
            Ok((TokenMode::SingleUse { pool_size }, false))
        }
        other => Err(ConfigError::new(
            names.klavi("mode"),
            format!("{other:?} is not one of \"shared\", \"single_use\""),
        )),
    }
}

/// Profile names: 1–32 of `[a-z0-9_]`, starting with a letter; `default`
/// is `[klavi]`'s. Lower case only, so environment names map one to one.
fn check_name(name: &str) -> Result<(), ConfigError> {
    let key = format!("profiles.{name}");
    if name == DEFAULT_PROFILE {
        return Err(ConfigError::new(
            key,
            "the name \"default\" is reserved for [klavi] and [refresh]; choose another",
        ));
    }
    // `__` separates keys in environment names and a trailing `_` would run
    // into that separator: neither could be written there.
    let well_formed = (1..=MAX_NAME_LEN).contains(&name.len())
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        && !name.contains("__")
        && !name.ends_with('_');
    if well_formed {
        Ok(())
    } else {
        Err(ConfigError::new(
            key.escape_debug().to_string(),
            format!(
                "is not a valid profile name: 1 to {MAX_NAME_LEN} characters of a-z, 0-9 and _, \
                 starting with a letter, without __ or a trailing _ (which environment names \
                 could not spell)"
            ),
        ))
    }
}

/// No two profiles share a non-empty value of `key`.
/// No two profiles write one token file, and none writes where a unix
/// socket listens (the writer would replace the socket).
fn distinct_token_files(
    server: &ServerConfig,
    profiles: &[ProfileConfig],
) -> Result<(), ConfigError> {
    let sockets: Vec<(&Path, String)> =
        std::iter::once((&server.listen, "server.listen".to_string()))
            .chain(profiles.iter().filter_map(|p| {
                Some((
                    p.proxy_listen.as_ref()?,
                    KeyNames::of(&p.name).klavi("proxy_listen"),
                ))
            }))
            .filter_map(|(addr, key)| match addr {
                ListenAddr::Unix(path) => Some((path.as_path(), key)),
                ListenAddr::Tcp(_) => None,
            })
            .collect();
    let mut seen: BTreeMap<&Path, &str> = BTreeMap::new();
    for profile in profiles {
        let Some(file) = &profile.token_file else {
            continue;
        };
        let key_files = profiles.iter().flat_map(|p| {
            [
                (
                    &p.klavi.access_key,
                    KeyNames::of(&p.name).klavi("access_key_file"),
                ),
                (
                    &p.klavi.secret_key,
                    KeyNames::of(&p.name).klavi("secret_key_file"),
                ),
            ]
        });
        for (source, key) in key_files {
            if matches!(source, KeySource::File(path) if *path == file.path) {
                return Err(ConfigError::new(
                    KeyNames::of(&profile.name).klavi("token_file"),
                    format!(
                        "{:?} is {key}; the token file would overwrite the key",
                        file.path.display()
                    ),
                ));
            }
        }
        if let Some((_, key)) = sockets.iter().find(|(path, _)| *path == file.path) {
            return Err(ConfigError::new(
                KeyNames::of(&profile.name).klavi("token_file"),
                format!(
                    "{:?} is the socket of {key}; the token file needs a path of its own",
                    file.path.display()
                ),
            ));
        }
        if let Some(first) = seen.insert(&file.path, &profile.name) {
            return Err(ConfigError::new(
                KeyNames::of(&profile.name).klavi("token_file"),
                format!(
                    "{:?} is also profile {first:?}'s token_file; two profiles cannot share one",
                    file.path.display()
                ),
            ));
        }
    }
    Ok(())
}

fn log_format(format: &str) -> Result<LogFormat, ConfigError> {
    match format.trim().to_ascii_lowercase().as_str() {
        "text" => Ok(LogFormat::Text),
        "json" => Ok(LogFormat::Json),
        other => Err(ConfigError::new(
            "log.format",
            format!("{other:?} is not one of \"text\", \"json\""),
        )),
    }
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
    names: &KeyNames,
    which: &str,
    inline: &Option<Secret>,
    file: &Option<PathBuf>,
) -> Result<KeySource, ConfigError> {
    let key = names.klavi(which);
    let file_key = names.klavi(&format!("{which}_file"));
    match (inline, file) {
        (Some(_), Some(_)) => Err(ConfigError::new(
            &key,
            format!("set either {key} or {file_key}, not both"),
        )),
        (Some(secret), None) if secret.expose().trim().is_empty() => {
            Err(ConfigError::new(key, "is empty"))
        }
        (Some(secret), None) if secret.expose() == REDACTED => Err(ConfigError::new(
            key,
            "is the placeholder check-config prints instead of a key; set the real key",
        )),
        (Some(secret), None) => Ok(KeySource::Inline(secret.clone())),
        (None, Some(path)) => {
            read_key_file(path).map_err(|message| ConfigError::new(file_key, message))?;
            Ok(KeySource::File(path.clone()))
        }
        (None, None) if key.starts_with("klavi.") => {
            let env = if which == "access_key" {
                "KLAVI_ACCESS_KEY"
            } else {
                "KLAVI_SECRET_KEY"
            };
            Err(ConfigError::new(
                &key,
                format!(
                    "is required: set {env} or {env}_FILE (or {key} / {file_key} in the config \
                     file), or define profiles in [profiles.NAME] instead"
                ),
            ))
        }
        (None, None) => Err(ConfigError::new(
            &key,
            format!("is required: every profile needs its own keys ({key} or {file_key})"),
        )),
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

/// A profile's `proxy_listen`: off when empty, else a loopback address or
/// a unix socket (unless `server.allow_non_loopback`): whoever reaches it
/// spends the profile's token.
fn proxy_listen(
    names: &KeyNames,
    value: &str,
    allow_non_loopback: bool,
) -> Result<Option<ListenAddr>, ConfigError> {
    let key = names.klavi("proxy_listen");
    if value.trim().is_empty() {
        return Ok(None);
    }
    let addr = value
        .parse::<ListenAddr>()
        .map_err(|e| ConfigError::new(&key, e))?;
    if !addr.is_local() && !allow_non_loopback {
        return Err(ConfigError::new(
            key,
            format!(
                "{addr} is not a loopback address; the proxy adds the profile's token to whatever \
                 reaches it, so it must stay inside the pod (server.allow_non_loopback = true \
                 overrides)"
            ),
        ));
    }
    Ok(Some(addr))
}

/// Two TCP addresses that cannot both be bound (port 0 picks a free port,
/// so it never clashes).
fn tcp_clash(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() == b.port()
        && a.port() != 0
        && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

/// No two listeners on one address: each `proxy_listen` apart from the
/// others, `server.listen` and `server.ops_listen`; two sockets at one
/// path clash too.
fn distinct_listeners(
    server: &ServerConfig,
    profiles: &[ProfileConfig],
) -> Result<(), ConfigError> {
    let clash = |a: &ListenAddr, b: &ListenAddr| match (a, b) {
        (ListenAddr::Tcp(a), ListenAddr::Tcp(b)) => tcp_clash(*a, *b),
        (ListenAddr::Unix(a), ListenAddr::Unix(b)) => a == b,
        _ => false,
    };
    let mut taken: Vec<(ListenAddr, String)> =
        vec![(server.listen.clone(), "server.listen".into())];
    if let Some(ops) = server.ops_listen {
        taken.push((ListenAddr::Tcp(ops), "server.ops_listen".into()));
    }
    for profile in profiles {
        let Some(addr) = &profile.proxy_listen else {
            continue;
        };
        let key = KeyNames::of(&profile.name).klavi("proxy_listen");
        if let Some((_, other)) = taken.iter().find(|(t, _)| clash(t, addr)) {
            return Err(ConfigError::new(
                key,
                format!("{addr} clashes with {other}; each listener needs its own address"),
            ));
        }
        taken.push((addr.clone(), key));
    }
    Ok(())
}

/// `[proxy]`, and its rule against every proxied profile's `wait_ms`: a
/// proxied request may wait that long for a token and must still have
/// time to be sent.
fn proxy(raw: &RawConfig, profiles: &[ProfileConfig]) -> Result<ProxyConfig, ConfigError> {
    let p = &raw.proxy;
    ranges::check_proxy(p)?;
    let timeout = Duration::from_millis(p.request_timeout_ms);
    if let Some(profile) = profiles
        .iter()
        .find(|profile| profile.proxy_listen.is_some() && profile.refresh.wait >= timeout)
    {
        return Err(ConfigError::new(
            "proxy.request_timeout_ms",
            format!(
                "{} must be longer than {} ({} ms), or a proxied request waiting for a token \
                 would time out before it is sent",
                p.request_timeout_ms,
                KeyNames::of(&profile.name).refresh("wait_ms"),
                profile.refresh.wait.as_millis()
            ),
        ));
    }
    Ok(ProxyConfig {
        max_body_bytes: usize::try_from(p.max_body_bytes).unwrap_or(usize::MAX),
        request_timeout: timeout,
        access_log: p.access_log,
    })
}

/// A profile's `base_url` (where the proxy forwards) and its auth URL
/// (`base_url` + `auth_path`), both checked.
fn klavi_urls(names: &KeyNames, raw: &RawKlavi) -> Result<(Url, Url), ConfigError> {
    let key = names.klavi("base_url");
    // The value is not quoted: a URL that does not parse may still carry
    // a password before its `@`.
    let base = Url::parse(raw.base_url.trim())
        .map_err(|e| ConfigError::new(&key, format!("is not a URL: {e}")))?;
    match base.scheme() {
        "https" => {}
        "http" if is_loopback_host(&base) || raw.allow_insecure_http => {}
        "http" => {
            return Err(ConfigError::new(
                &key,
                format!(
                    "plain http:// is only allowed for loopback hosts; use https:// or set {} = true",
                    names.klavi("allow_insecure_http")
                ),
            ));
        }
        other => {
            return Err(ConfigError::new(
                &key,
                format!("scheme {other:?} is not supported; use https://"),
            ));
        }
    }
    if base.host().is_none() {
        return Err(ConfigError::new(&key, "has no host"));
    }
    if !base.username().is_empty() || base.password().is_some() {
        return Err(ConfigError::new(
            &key,
            "must not carry credentials; set the access and secret keys instead",
        ));
    }
    if base.query().is_some() || base.fragment().is_some() {
        return Err(ConfigError::new(&key, "must not have a query or fragment"));
    }
    let path_key = names.klavi("auth_path");
    if !raw.auth_path.starts_with('/') {
        return Err(ConfigError::new(
            path_key,
            format!("{:?} must start with /", raw.auth_path),
        ));
    }
    let joined = format!("{}{}", base.as_str().trim_end_matches('/'), raw.auth_path);
    let auth = Url::parse(&joined)
        .map_err(|e| ConfigError::new(path_key, format!("{:?}: {e}", raw.auth_path)))?;
    Ok((base, auth))
}

/// `server.allowed_hosts`, checked and normalised: host names (RFC 1123
/// labels, no trailing dot), IPv4 literals, or IPv6 literals in brackets
/// (kept in their canonical form, so `[fd00:0::1]` and `[fd00::1]` are one
/// host); no port (any port is accepted), and never an unspecified address.
fn allowed_hosts(hosts: &[String]) -> Result<Vec<String>, ConfigError> {
    hosts
        .iter()
        .map(|host| {
            normalised_host(host.trim()).ok_or_else(|| {
                ConfigError::new(
                    "server.allowed_hosts",
                    format!(
                        "{host:?} is not a host name or IP address (e.g. \"sidecar.internal\", \
                         \"10.0.0.5\", or \"[fd00::1]\" for IPv6; no scheme, port, path or trailing \
                         dot, and not 0.0.0.0 or [::])"
                    ),
                )
            })
        })
        .collect()
}

/// `host` lower-cased, an IPv6 literal in canonical form; `None` if it is
/// no host name or address, or an unspecified one.
pub(crate) fn normalised_host(host: &str) -> Option<String> {
    if let Some(inner) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        let ip: std::net::Ipv6Addr = inner.parse().ok()?;
        let unspecified =
            ip.is_unspecified() || ip.to_ipv4_mapped().is_some_and(|v4| v4.is_unspecified());
        return (!unspecified).then(|| format!("[{ip}]"));
    }
    if let Ok(ip) = host.parse::<std::net::Ipv4Addr>() {
        return (!ip.is_unspecified()).then(|| ip.to_string());
    }
    // Forms a browser reads as an IPv4 address (`2130706433`, `0x7f000001`,
    // `127.1`) are no host names; written as such they would never match.
    if matches!(Host::parse(host), Ok(Host::Ipv4(_))) {
        return None;
    }
    let label_ok = |label: &str| {
        (1..=63).contains(&label.len())
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
    };
    let is_name = (1..=253).contains(&host.len()) && host.split('.').all(label_ok);
    is_name.then(|| host.to_ascii_lowercase())
}

/// `[fleet]`: off while `redis_url` is empty; else a `redis://` or
/// `rediss://` URL with a host, a key prefix safe in key names, and the
/// command timeout within its range.
fn fleet(f: &RawFleet) -> Result<Option<FleetConfig>, ConfigError> {
    ranges::check_fleet(f)?;
    let prefix = f.key_prefix.as_str();
    let prefix_ok = (1..=64).contains(&prefix.len())
        && prefix
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.:-".contains(&b));
    if !prefix_ok {
        return Err(ConfigError::new(
            "fleet.key_prefix",
            format!("{prefix:?} must be 1–64 characters of A–Z, a–z, 0–9, _ . : -"),
        ));
    }
    let text = f.redis_url.expose().trim();
    if text.is_empty() {
        return Ok(None);
    }
    // Errors show the URL redacted: its password is a secret.
    let shown = f.redis_url.redacted();
    let url = Url::parse(text).map_err(|e| {
        ConfigError::new(
            "fleet.redis_url",
            format!(
                "{shown:?} is not a URL ({e}); expected redis://HOST:PORT or rediss://HOST:PORT"
            ),
        )
    })?;
    if !matches!(url.scheme(), "redis" | "rediss") {
        return Err(ConfigError::new(
            "fleet.redis_url",
            format!(
                "{shown:?} has scheme {:?}; expected redis:// or rediss:// (TLS)",
                url.scheme()
            ),
        ));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(ConfigError::new(
            "fleet.redis_url",
            format!("{shown:?} names no host"),
        ));
    }
    // The redis crate reads the database from the path.
    let path = url.path().trim_start_matches('/');
    if !path.is_empty() && path.parse::<u16>().is_err() {
        return Err(ConfigError::new(
            "fleet.redis_url",
            format!("{shown:?}: the path must be a database number, like /0"),
        ));
    }
    // What the client will make of it, checked now (a start error later
    // would be exit 1, and the crate's message may quote the URL).
    if let Err(error) = redis::Client::open(text) {
        return Err(ConfigError::new(
            "fleet.redis_url",
            format!(
                "{shown:?} is not a Redis URL the client accepts ({:?})",
                error.kind()
            ),
        ));
    }
    Ok(Some(FleetConfig {
        redis_url: RedisUrl::new(text),
        key_prefix: prefix.to_string(),
        command_timeout: Duration::from_millis(f.command_timeout_ms),
    }))
}

/// A fleet profile's waiting request must have time for the Redis
/// commands before the fetch (reading the record, taking the lock), each
/// up to `fleet.command_timeout_ms`: twice it must stay below the
/// profile's `refresh.wait_ms`.
fn fleet_waits(fleet: &FleetConfig, profiles: &[ProfileConfig]) -> Result<(), ConfigError> {
    let needed = fleet.command_timeout.saturating_mul(2);
    match profiles
        .iter()
        .find(|p| p.fleet && p.refresh.wait <= needed)
    {
        Some(profile) => Err(ConfigError::new(
            "fleet.command_timeout_ms",
            format!(
                "{} ms is too long for {} ({} ms): twice the command timeout must stay below it, \
                 or a request waiting for a token would time out in Redis commands",
                fleet.command_timeout.as_millis(),
                KeyNames::of(&profile.name).refresh("wait_ms"),
                profile.refresh.wait.as_millis()
            ),
        )),
        None => Ok(()),
    }
}
