//! The allowed range of every numeric key, in one table.
//!
//! Validation checks each key against [`RANGES`], and a test holds
//! `config/default.toml` to the same table (every numeric key documents
//! `Range: LOW–HIGH` matching it), so a key cannot gain a value that makes
//! a loop spin or a wait impossible without the table, the check and the
//! documentation all saying so. Rules between keys are in [`cross_checks`].

use super::{ConfigError, RawConfig};

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
pub const RANGES: [Range; 17] = [
    range("server.shutdown_grace_secs", 1, HOUR),
    range("server.header_read_timeout_ms", 100, 10 * MINUTE_MS),
    range("server.max_header_bytes", 1024, 1 << 20),
    range("server.max_body_bytes", 0, 1 << 20),
    range("server.max_connections", 1, 65_536),
    range("server.request_timeout_ms", 1000, 10 * MINUTE_MS),
    range("klavi.connect_timeout_ms", 100, MINUTE_MS),
    range("klavi.request_timeout_ms", 100, 10 * MINUTE_MS),
    range("refresh.refresh_before_secs", 1, DAY),
    range("refresh.serve_margin_secs", 0, HOUR),
    range("refresh.backoff_initial_ms", 100, MINUTE_MS),
    range("refresh.backoff_max_secs", 1, HOUR),
    range("refresh.min_interval_secs", 1, HOUR),
    range("refresh.wait_ms", 100, 5 * MINUTE_MS),
    range("refresh.max_auth_per_minute", 1, 600),
    range("refresh.fallback_ttl_secs", 1, DAY),
    range("runtime.worker_threads", 0, 64),
];

/// `refresh.jitter_ratio`, the one fractional key.
pub const JITTER_RATIO: std::ops::RangeInclusive<f64> = 0.0..=0.5;

/// The integer keys, in the order of [`RANGES`], with their values in `raw`.
pub fn integer_values(raw: &RawConfig) -> [(&'static str, u64); 17] {
    let (s, k, r) = (&raw.server, &raw.klavi, &raw.refresh);
    [
        ("server.shutdown_grace_secs", s.shutdown_grace_secs),
        ("server.header_read_timeout_ms", s.header_read_timeout_ms),
        ("server.max_header_bytes", s.max_header_bytes),
        ("server.max_body_bytes", s.max_body_bytes),
        ("server.max_connections", s.max_connections),
        ("server.request_timeout_ms", s.request_timeout_ms),
        ("klavi.connect_timeout_ms", k.connect_timeout_ms),
        ("klavi.request_timeout_ms", k.request_timeout_ms),
        ("refresh.refresh_before_secs", r.refresh_before_secs),
        ("refresh.serve_margin_secs", r.serve_margin_secs),
        ("refresh.backoff_initial_ms", r.backoff_initial_ms),
        ("refresh.backoff_max_secs", r.backoff_max_secs),
        ("refresh.min_interval_secs", r.min_interval_secs),
        ("refresh.wait_ms", r.wait_ms),
        ("refresh.max_auth_per_minute", r.max_auth_per_minute),
        ("refresh.fallback_ttl_secs", r.fallback_ttl_secs),
        ("runtime.worker_threads", raw.runtime.worker_threads),
    ]
}

/// The range of `key`.
pub fn range_of(key: &str) -> Option<Range> {
    RANGES.iter().copied().find(|r| r.key == key)
}

/// Every integer key within its range: the first one outside is the error.
pub fn check_ranges(raw: &RawConfig) -> Result<(), ConfigError> {
    for (key, value) in integer_values(raw) {
        let Some(Range { low, high, .. }) = range_of(key) else {
            continue;
        };
        if !(low..=high).contains(&value) {
            return Err(ConfigError::new(
                key,
                format!("{value} is out of range: must be between {low} and {high}"),
            ));
        }
    }
    let ratio = raw.refresh.jitter_ratio;
    if !JITTER_RATIO.contains(&ratio) {
        return Err(ConfigError::new(
            "refresh.jitter_ratio",
            format!("{ratio} is out of range: must be between 0 and 0.5"),
        ));
    }
    Ok(())
}

/// The rules between keys, each failure naming the key to change.
pub fn cross_checks(raw: &RawConfig) -> Result<(), ConfigError> {
    let (s, r) = (&raw.server, &raw.refresh);
    let rules: [(bool, &str, String); 5] = [
        (
            r.serve_margin_secs < r.refresh_before_secs,
            "refresh.serve_margin_secs",
            format!(
                "{} must be below refresh.refresh_before_secs ({}), or a token would stop being \
                 served before its refresh is due",
                r.serve_margin_secs, r.refresh_before_secs
            ),
        ),
        (
            r.fallback_ttl_secs > 2 * r.serve_margin_secs,
            "refresh.fallback_ttl_secs",
            "must be more than twice refresh.serve_margin_secs, or such tokens could never be \
             served"
                .to_string(),
        ),
        (
            r.backoff_max_secs.saturating_mul(1000) >= r.backoff_initial_ms,
            "refresh.backoff_max_secs",
            "must not be smaller than refresh.backoff_initial_ms".to_string(),
        ),
        (
            s.request_timeout_ms > r.wait_ms,
            "server.request_timeout_ms",
            format!(
                "{} must be longer than refresh.wait_ms ({}), or waiting requests would be cut off",
                s.request_timeout_ms, r.wait_ms
            ),
        ),
        (
            s.shutdown_grace_secs.saturating_mul(1000) > r.wait_ms,
            "server.shutdown_grace_secs",
            format!(
                "{} s must be longer than refresh.wait_ms ({} ms), or requests waiting at shutdown \
                 would be cut off without an answer",
                s.shutdown_grace_secs, r.wait_ms
            ),
        ),
    ];
    match rules.into_iter().find(|(holds, _, _)| !holds) {
        Some((_, key, message)) => Err(ConfigError::new(key, message)),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_integer_key_has_a_range_and_the_defaults_are_inside() {
        let raw = RawConfig::default();
        for (key, value) in integer_values(&raw) {
            let range = range_of(key).unwrap_or_else(|| panic!("{key} has no range"));
            assert!(
                (range.low..=range.high).contains(&value),
                "{key} default {value}"
            );
        }
        // Every integer the configuration has is in the list: count them
        // from the serialised defaults.
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
        let mut listed: Vec<String> = integer_values(&raw)
            .iter()
            .map(|(k, _)| k.to_string())
            .collect();
        listed.sort();
        assert_eq!(integers, listed);
        assert!(cross_checks(&raw).is_ok());
        assert!(check_ranges(&raw).is_ok());
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
    fn cross_key_rules_name_the_key() {
        let cases: Vec<(fn(&mut RawConfig), &str)> = vec![
            (
                |r| r.refresh.serve_margin_secs = 60,
                "refresh.serve_margin_secs",
            ),
            (
                |r| r.refresh.fallback_ttl_secs = 10,
                "refresh.fallback_ttl_secs",
            ),
            (
                |r| {
                    r.refresh.backoff_initial_ms = 5000;
                    r.refresh.backoff_max_secs = 4;
                },
                "refresh.backoff_max_secs",
            ),
            (
                |r| r.server.request_timeout_ms = 5000,
                "server.request_timeout_ms",
            ),
            (
                |r| r.server.shutdown_grace_secs = 5,
                "server.shutdown_grace_secs",
            ),
        ];
        for (change, key) in cases {
            let mut raw = RawConfig::default();
            change(&mut raw);
            let error = cross_checks(&raw).err();
            assert_eq!(error.map(|e| e.key).as_deref(), Some(key));
        }
    }

    #[test]
    fn each_bound_is_enforced_on_both_sides() {
        for (key, _) in integer_values(&RawConfig::default()) {
            let range = range_of(key).unwrap_or_else(|| panic!("{key}"));
            let mut outside = vec![range.high.saturating_add(1)];
            if range.low > 0 {
                outside.push(range.low - 1);
            }
            for value in outside {
                let mut raw = RawConfig::default();
                set(&mut raw, key, value);
                let error = check_ranges(&raw).err();
                assert_eq!(
                    error.as_ref().map(|e| e.key.as_str()),
                    Some(key),
                    "{key} = {value}"
                );
            }
            for value in [range.low, range.high] {
                let mut raw = RawConfig::default();
                set(&mut raw, key, value);
                assert!(check_ranges(&raw).is_ok(), "{key} = {value}");
            }
        }
    }

    fn set(raw: &mut RawConfig, key: &str, value: u64) {
        let (s, k, r) = (&mut raw.server, &mut raw.klavi, &mut raw.refresh);
        let slot = match key {
            "server.shutdown_grace_secs" => &mut s.shutdown_grace_secs,
            "server.header_read_timeout_ms" => &mut s.header_read_timeout_ms,
            "server.max_header_bytes" => &mut s.max_header_bytes,
            "server.max_body_bytes" => &mut s.max_body_bytes,
            "server.max_connections" => &mut s.max_connections,
            "server.request_timeout_ms" => &mut s.request_timeout_ms,
            "klavi.connect_timeout_ms" => &mut k.connect_timeout_ms,
            "klavi.request_timeout_ms" => &mut k.request_timeout_ms,
            "refresh.refresh_before_secs" => &mut r.refresh_before_secs,
            "refresh.serve_margin_secs" => &mut r.serve_margin_secs,
            "refresh.backoff_initial_ms" => &mut r.backoff_initial_ms,
            "refresh.backoff_max_secs" => &mut r.backoff_max_secs,
            "refresh.min_interval_secs" => &mut r.min_interval_secs,
            "refresh.wait_ms" => &mut r.wait_ms,
            "refresh.max_auth_per_minute" => &mut r.max_auth_per_minute,
            "refresh.fallback_ttl_secs" => &mut r.fallback_ttl_secs,
            "runtime.worker_threads" => &mut raw.runtime.worker_threads,
            other => panic!("no setter for {other}"),
        };
        *slot = value;
    }
}
