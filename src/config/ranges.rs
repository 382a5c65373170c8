//! The allowed range of every numeric key, in one table, and the rules
//! between keys.
//!
//! Validation checks each key against [`RANGES`], and a test holds
//! `config/default.toml` to the same table (every numeric key documents
//! `Range: LOW–HIGH` matching it), so a key cannot gain a value that makes
//! a loop spin or a wait impossible without the table, the check and the
//! documentation all saying so. A profile's keys have the ranges of the
//! `[klavi]` and `[refresh]` keys they stand for.

use super::ConfigError;
use super::raw::{RawFleet, RawKlavi, RawProxy, RawRefresh, RawServer};

/// The allowed values of one numeric key, inclusive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    /// The dotted key.
    pub key: &'static str,
    /// Smallest allowed value.
    pub low: u64,
    /// Largest allowed value.
    pub high: u64,
}

const fn range(key: &'static str, low: u64, high: u64) -> Range {
    Range { key, low, high }
}

const MINUTE_MS: u64 = 60_000;
const HOUR: u64 = 3600;
const DAY: u64 = 24 * HOUR;

/// Every integer key of the configuration and its range. Floors above zero
/// are where zero would spin a loop (`backoff_initial_ms`,
/// `min_interval_secs`, `max_auth_per_minute`) or make a wait impossible
/// (`wait_ms`, timeouts).
pub const RANGES: [Range; 21] = [
    range("server.shutdown_grace_secs", 1, HOUR),
    range("server.header_read_timeout_ms", 100, 10 * MINUTE_MS),
    range("server.max_header_bytes", 1024, 1 << 20),
    // The rejected-token report may be 16 KiB (SPEC §4.2): below that a
    // real report could be refused, and the rejected token kept serving.
    range("server.max_body_bytes", 16 << 10, 1 << 20),
    range("server.max_connections", 1, 65_536),
    range("server.request_timeout_ms", 1000, 10 * MINUTE_MS),
    range("klavi.connect_timeout_ms", 100, MINUTE_MS),
    range("klavi.request_timeout_ms", 100, 10 * MINUTE_MS),
    range("klavi.pool_size", 0, 100),
    range("refresh.refresh_before_secs", 1, DAY),
    range("refresh.serve_margin_secs", 0, HOUR),
    range("refresh.backoff_initial_ms", 100, MINUTE_MS),
    range("refresh.backoff_max_secs", 1, HOUR),
    range("refresh.min_interval_secs", 1, HOUR),
    range("refresh.wait_ms", 100, 5 * MINUTE_MS),
    range("refresh.max_auth_per_minute", 1, 600),
    range("refresh.fallback_ttl_secs", 1, DAY),
    range("proxy.max_body_bytes", 0, 16 << 20),
    range("proxy.request_timeout_ms", 1000, 10 * MINUTE_MS),
    range("fleet.command_timeout_ms", 10, 10_000),
    range("runtime.worker_threads", 0, 64),
];

/// How much longer than `wait_ms` the shutdown grace must be.
pub const GRACE_OVER_WAIT_MS: u64 = 500;

/// `refresh.jitter_ratio`, the one fractional key.
pub const JITTER_RATIO: std::ops::RangeInclusive<f64> = 0.0..=0.5;

/// The range of `key` (a `server.`, `klavi.`, `refresh.` or `runtime.` key).
pub fn range_of(key: &str) -> Option<Range> {
    RANGES.iter().copied().find(|r| r.key == key)
}

/// How a profile's keys are named in errors: `klavi.X` and `refresh.X` for
/// the default profile, `profiles.NAME.X` and `profiles.NAME.refresh.X`
/// for the others.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyNames {
    klavi: String,
    refresh: String,
}

impl KeyNames {
    /// The names of profile `name`'s keys.
    pub fn of(name: &str) -> Self {
        if name == super::DEFAULT_PROFILE {
            Self {
                klavi: "klavi.".into(),
                refresh: "refresh.".into(),
            }
        } else {
            Self {
                klavi: format!("profiles.{name}."),
                refresh: format!("profiles.{name}.refresh."),
            }
        }
    }

    /// The full name of a `[klavi]` key of this profile.
    pub fn klavi(&self, key: &str) -> String {
        format!("{}{key}", self.klavi)
    }

    /// The full name of a `[refresh]` key of this profile.
    pub fn refresh(&self, key: &str) -> String {
        format!("{}{key}", self.refresh)
    }
}

/// `value` within `table_key`'s range; an error names the key as `name`.
pub(super) fn check(name: String, table_key: &str, value: u64) -> Result<(), ConfigError> {
    match range_of(table_key) {
        Some(Range { low, high, .. }) if !(low..=high).contains(&value) => Err(ConfigError::new(
            name,
            format!("{value} is out of range: must be between {low} and {high}"),
        )),
        _ => Ok(()),
    }
}

/// `[server]`'s integer keys and their values.
pub fn server_values(s: &RawServer) -> [(&'static str, u64); 6] {
    [
        ("shutdown_grace_secs", s.shutdown_grace_secs),
        ("header_read_timeout_ms", s.header_read_timeout_ms),
        ("max_header_bytes", s.max_header_bytes),
        ("max_body_bytes", s.max_body_bytes),
        ("max_connections", s.max_connections),
        ("request_timeout_ms", s.request_timeout_ms),
    ]
}

/// `[proxy]`'s integer keys and their values.
pub fn proxy_values(p: &RawProxy) -> [(&'static str, u64); 2] {
    [
        ("max_body_bytes", p.max_body_bytes),
        ("request_timeout_ms", p.request_timeout_ms),
    ]
}

/// `[fleet]`'s integer keys and their values.
pub fn fleet_values(f: &RawFleet) -> [(&'static str, u64); 1] {
    [("command_timeout_ms", f.command_timeout_ms)]
}

/// A profile's `[klavi]` integer keys and their values.
pub fn klavi_values(k: &RawKlavi) -> [(&'static str, u64); 3] {
    [
        ("connect_timeout_ms", k.connect_timeout_ms),
        ("request_timeout_ms", k.request_timeout_ms),
        ("pool_size", k.pool_size),
    ]
}

/// A profile's `[refresh]` integer keys and their values.
pub fn refresh_values(r: &RawRefresh) -> [(&'static str, u64); 8] {
    [
        ("refresh_before_secs", r.refresh_before_secs),
        ("serve_margin_secs", r.serve_margin_secs),
        ("backoff_initial_ms", r.backoff_initial_ms),
        ("backoff_max_secs", r.backoff_max_secs),
        ("min_interval_secs", r.min_interval_secs),
        ("wait_ms", r.wait_ms),
        ("max_auth_per_minute", r.max_auth_per_minute),
        ("fallback_ttl_secs", r.fallback_ttl_secs),
    ]
}

/// Every `[server]` key within its range.
pub fn check_server(s: &RawServer) -> Result<(), ConfigError> {
    for (key, value) in server_values(s) {
        let full = format!("server.{key}");
        check(full.clone(), &full, value)?;
    }
    Ok(())
}

/// Every `[fleet]` key within its range.
pub fn check_fleet(f: &RawFleet) -> Result<(), ConfigError> {
    for (key, value) in fleet_values(f) {
        let full = format!("fleet.{key}");
        check(full.clone(), &full, value)?;
    }
    Ok(())
}

/// Every `[proxy]` key within its range.
pub fn check_proxy(p: &RawProxy) -> Result<(), ConfigError> {
    for (key, value) in proxy_values(p) {
        let full = format!("proxy.{key}");
        check(full.clone(), &full, value)?;
    }
    Ok(())
}

/// Every `[klavi]` and `[refresh]` key of a profile within its range, and
/// the rules between them.
pub fn check_profile(
    names: &KeyNames,
    klavi: &RawKlavi,
    refresh: &RawRefresh,
) -> Result<(), ConfigError> {
    for (key, value) in klavi_values(klavi) {
        check(names.klavi(key), &format!("klavi.{key}"), value)?;
    }
    for (key, value) in refresh_values(refresh) {
        check(names.refresh(key), &format!("refresh.{key}"), value)?;
    }
    let ratio = refresh.jitter_ratio;
    if !JITTER_RATIO.contains(&ratio) {
        return Err(ConfigError::new(
            names.refresh("jitter_ratio"),
            format!("{ratio} is out of range: must be between 0 and 0.5"),
        ));
    }
    let r = refresh;
    let rules: [(bool, &str, String); 3] = [
        (
            r.serve_margin_secs < r.refresh_before_secs,
            "serve_margin_secs",
            format!(
                "{} must be below refresh_before_secs ({}), or a token would stop being served \
                 before its refresh is due",
                r.serve_margin_secs, r.refresh_before_secs
            ),
        ),
        (
            r.fallback_ttl_secs > 2 * r.serve_margin_secs,
            "fallback_ttl_secs",
            "must be more than twice serve_margin_secs, or such tokens could never be served"
                .to_string(),
        ),
        (
            r.backoff_max_secs.saturating_mul(1000) >= r.backoff_initial_ms,
            "backoff_max_secs",
            "must not be smaller than backoff_initial_ms".to_string(),
        ),
    ];
    match rules.into_iter().find(|(holds, _, _)| !holds) {
        Some((_, key, message)) => Err(ConfigError::new(names.refresh(key), message)),
        None => Ok(()),
    }
}

/// The rules between `[server]` and a profile's `wait_ms`: a request
/// waiting for that profile's token must be answered before the request
/// timeout and before the shutdown grace ends.
pub fn check_server_against(
    s: &RawServer,
    names: &KeyNames,
    refresh: &RawRefresh,
) -> Result<(), ConfigError> {
    let wait = refresh.wait_ms;
    let wait_key = names.refresh("wait_ms");
    if s.request_timeout_ms <= wait {
        return Err(ConfigError::new(
            "server.request_timeout_ms",
            format!(
                "{} must be longer than {wait_key} ({wait}), or waiting requests would be cut off",
                s.request_timeout_ms
            ),
        ));
    }
    // The drain cuts what is left a quarter of a second before the grace
    // ends (so the process exits within it): a request that waits its
    // whole wait_ms must be answered before that.
    if s.shutdown_grace_secs.saturating_mul(1000) < wait.saturating_add(GRACE_OVER_WAIT_MS) {
        return Err(ConfigError::new(
            "server.shutdown_grace_secs",
            format!(
                "{} s must be at least {GRACE_OVER_WAIT_MS} ms longer than {wait_key} ({wait} ms), \
                 or requests waiting at shutdown would be cut off without an answer",
                s.shutdown_grace_secs
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::raw::RawConfig;
    use super::*;

    fn all_values(raw: &RawConfig) -> Vec<(String, u64)> {
        let mut values: Vec<(String, u64)> = Vec::new();
        values.extend(
            server_values(&raw.server)
                .iter()
                .map(|(k, v)| (format!("server.{k}"), *v)),
        );
        values.extend(
            klavi_values(&raw.klavi)
                .iter()
                .map(|(k, v)| (format!("klavi.{k}"), *v)),
        );
        values.extend(
            refresh_values(&raw.refresh)
                .iter()
                .map(|(k, v)| (format!("refresh.{k}"), *v)),
        );
        values.extend(
            proxy_values(&raw.proxy)
                .iter()
                .map(|(k, v)| (format!("proxy.{k}"), *v)),
        );
        values.extend(
            fleet_values(&raw.fleet)
                .iter()
                .map(|(k, v)| (format!("fleet.{k}"), *v)),
        );
        values.push(("runtime.worker_threads".into(), raw.runtime.worker_threads));
        values
    }

    #[test]
    fn every_integer_key_has_a_range_and_the_defaults_are_inside() {
        let raw = RawConfig::default();
        let values = all_values(&raw);
        for (key, value) in &values {
            let range = range_of(key).unwrap_or_else(|| panic!("{key} has no range"));
            assert!(
                (range.low..=range.high).contains(value),
                "{key} default {value}"
            );
        }
        // Every integer the configuration has is listed: count them from
        // the serialised defaults.
        let table: toml::Table =
            toml::from_str(&toml::to_string(&raw).unwrap_or_default()).unwrap_or_default();
        let mut integers = Vec::new();
        for (section, value) in &table {
            if let Some(keys) = value.as_table() {
                for (key, value) in keys {
                    if value.is_integer() {
                        integers.push(format!("{section}.{key}"));
                    }
                }
            }
        }
        integers.sort();
        let mut listed: Vec<String> = values.into_iter().map(|(k, _)| k).collect();
        listed.sort();
        assert_eq!(integers, listed);
        let mut table_keys: Vec<String> = RANGES.iter().map(|r| r.key.to_string()).collect();
        table_keys.sort();
        assert_eq!(table_keys, listed, "the table has exactly these keys");
        let names = KeyNames::of("default");
        assert!(check_server(&raw.server).is_ok());
        assert!(check_profile(&names, &raw.klavi, &raw.refresh).is_ok());
        assert!(check_server_against(&raw.server, &names, &raw.refresh).is_ok());
    }

    /// `config/default.toml` states each key's range as the table has it.
    #[test]
    fn default_toml_documents_every_range() {
        let text = include_str!("../../config/default.toml");
        let mut section = "";
        let mut documented: Vec<(String, String)> = Vec::new();
        let mut pending_range: Option<String> = None;
        for line in text.lines() {
            let line = line.trim();
            if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                section = name;
                continue;
            }
            if let Some(at) = line.find("Range: ") {
                pending_range = Some(line[at + 7..].trim_end_matches('.').to_string());
            }
            if let Some(rest) = line.strip_prefix("# ")
                && let Some((key, _)) = rest.split_once(" = ")
                && !key.contains(' ')
                && let Some(range) = pending_range.take()
            {
                documented.push((format!("{section}.{key}"), range));
            }
        }
        let expected = RANGES
            .iter()
            .map(|r| (r.key.to_string(), format!("{}–{}", r.low, r.high)))
            .chain([(
                "refresh.jitter_ratio".to_string(),
                format!("{}–{}", JITTER_RATIO.start(), JITTER_RATIO.end()),
            )]);
        for (key, range) in expected {
            let found = documented
                .iter()
                .find(|(k, _)| *k == key)
                .unwrap_or_else(|| panic!("default.toml documents no range for {key}"));
            assert_eq!(found.1, range, "{key}");
        }
    }

    #[test]
    fn rules_between_keys_name_the_key_of_the_profile() {
        let cases: Vec<(fn(&mut RawRefresh), &str)> = vec![
            (|r| r.serve_margin_secs = 60, "serve_margin_secs"),
            (|r| r.fallback_ttl_secs = 10, "fallback_ttl_secs"),
            (
                |r| {
                    r.backoff_initial_ms = 5000;
                    r.backoff_max_secs = 4;
                },
                "backoff_max_secs",
            ),
            (|r| r.jitter_ratio = 0.6, "jitter_ratio"),
            (|r| r.wait_ms = 0, "wait_ms"),
        ];
        for profile in ["default", "mgmt"] {
            let names = KeyNames::of(profile);
            for (change, key) in &cases {
                let mut refresh = RawRefresh::default();
                change(&mut refresh);
                let error = check_profile(&names, &RawKlavi::default(), &refresh).err();
                assert_eq!(
                    error.map(|e| e.key),
                    Some(names.refresh(key)),
                    "{profile} {key}"
                );
            }
        }
        let names = KeyNames::of("mgmt");
        assert_eq!(names.refresh("wait_ms"), "profiles.mgmt.refresh.wait_ms");
        assert_eq!(
            names.klavi("secret_key_file"),
            "profiles.mgmt.secret_key_file"
        );
        let server = RawServer {
            request_timeout_ms: 5000,
            ..RawServer::default()
        };
        let error = check_server_against(&server, &names, &RawRefresh::default()).err();
        assert_eq!(
            error.as_ref().map(|e| e.key.as_str()),
            Some("server.request_timeout_ms")
        );
        assert!(error.is_some_and(|e| e.message.contains("profiles.mgmt.refresh.wait_ms")));
        let server = RawServer {
            shutdown_grace_secs: 5,
            ..RawServer::default()
        };
        let error = check_server_against(&server, &names, &RawRefresh::default()).err();
        assert_eq!(
            error.map(|e| e.key),
            Some("server.shutdown_grace_secs".to_string())
        );
        // Second review: grace 2 s with wait_ms 1900 was accepted, and the
        // drain (which stops 250 ms before the grace ends) cut the waiting
        // request. The grace must be at least 500 ms longer than the wait.
        let server = RawServer {
            shutdown_grace_secs: 2,
            ..RawServer::default()
        };
        for (wait_ms, ok) in [(1900, false), (1501, false), (1500, true), (400, true)] {
            let refresh = RawRefresh {
                wait_ms,
                ..RawRefresh::default()
            };
            assert_eq!(
                check_server_against(&server, &names, &refresh).is_ok(),
                ok,
                "grace 2 s, wait {wait_ms} ms"
            );
        }
    }

    #[test]
    fn each_bound_is_enforced_on_both_sides() {
        for range in RANGES {
            let mut outside = vec![range.high.saturating_add(1)];
            if range.low > 0 {
                outside.push(range.low - 1);
            }
            for (value, ok) in outside
                .into_iter()
                .map(|v| (v, false))
                .chain([(range.low, true), (range.high, true)])
            {
                let (section, key) = range.key.split_once('.').unwrap_or_default();
                let result = match section {
                    "server" => {
                        let mut s = RawServer::default();
                        set_server(&mut s, key, value);
                        check_server(&s)
                    }
                    "klavi" | "refresh" => {
                        let (mut k, mut r) = (RawKlavi::default(), RawRefresh::default());
                        // Keep the rules between keys out of the way.
                        r.refresh_before_secs = HOUR + 1;
                        r.serve_margin_secs = 0;
                        r.fallback_ttl_secs = DAY;
                        r.backoff_max_secs = HOUR;
                        set_profile(&mut k, &mut r, range.key, value);
                        check_profile(&KeyNames::of("default"), &k, &r)
                    }
                    "proxy" => {
                        let mut p = RawProxy::default();
                        match key {
                            "max_body_bytes" => p.max_body_bytes = value,
                            "request_timeout_ms" => p.request_timeout_ms = value,
                            other => panic!("no setter for {other}"),
                        }
                        check_proxy(&p)
                    }
                    "fleet" => {
                        let mut f = RawFleet::default();
                        match key {
                            "command_timeout_ms" => f.command_timeout_ms = value,
                            other => panic!("no setter for {other}"),
                        }
                        check_fleet(&f)
                    }
                    _ => super::super::worker_threads(&super::super::raw::RawRuntime {
                        worker_threads: value,
                    })
                    .map(|_| ()),
                };
                assert_eq!(
                    result.as_ref().err().map(|e| e.key.as_str()),
                    (!ok).then_some(range.key),
                    "{} = {value}: {result:?}",
                    range.key
                );
            }
        }
    }

    fn set_server(s: &mut RawServer, key: &str, value: u64) {
        let slot = match key {
            "shutdown_grace_secs" => &mut s.shutdown_grace_secs,
            "header_read_timeout_ms" => &mut s.header_read_timeout_ms,
            "max_header_bytes" => &mut s.max_header_bytes,
            "max_body_bytes" => &mut s.max_body_bytes,
            "max_connections" => &mut s.max_connections,
            "request_timeout_ms" => &mut s.request_timeout_ms,
            other => panic!("no setter for {other}"),
        };
        *slot = value;
    }

    fn set_profile(k: &mut RawKlavi, r: &mut RawRefresh, key: &str, value: u64) {
        let slot = match key {
            "klavi.connect_timeout_ms" => &mut k.connect_timeout_ms,
            "klavi.request_timeout_ms" => &mut k.request_timeout_ms,
            "klavi.pool_size" => &mut k.pool_size,
            "refresh.refresh_before_secs" => &mut r.refresh_before_secs,
            "refresh.serve_margin_secs" => &mut r.serve_margin_secs,
            "refresh.backoff_initial_ms" => &mut r.backoff_initial_ms,
            "refresh.backoff_max_secs" => &mut r.backoff_max_secs,
            "refresh.min_interval_secs" => &mut r.min_interval_secs,
            "refresh.wait_ms" => &mut r.wait_ms,
            "refresh.max_auth_per_minute" => &mut r.max_auth_per_minute,
            "refresh.fallback_ttl_secs" => &mut r.fallback_ttl_secs,
            other => panic!("no setter for {other}"),
        };
        *slot = value;
    }
}
