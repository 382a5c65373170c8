//! Entry points shared by the cargo-fuzz targets (`fuzz/`) and the corpus
//! regression test, so every input the fuzzers keep also runs in
//! `cargo test`. Each must return normally on any input; a panic is a bug.

use std::path::Path;
use std::time::{Duration, UNIX_EPOCH};

use klavi_token_sidecar::cache::policy::MAX_LIFETIME;
use klavi_token_sidecar::config::{Config, Sources, raw_from};
use klavi_token_sidecar::upstream::expiry::{self, MAX_BODY_BYTES, Timing};

/// Reads `data` as Klavi's answer: the body, then the expiry under clocks
/// taken from the input's first bytes.
pub fn auth_response(data: &[u8]) {
    let (clock_bytes, body) = data.split_at(data.len().min(12));
    let mut clocks = [0u8; 12];
    clocks[..clock_bytes.len()].copy_from_slice(clock_bytes);
    let word =
        |i: usize| u32::from_le_bytes([clocks[i], clocks[i + 1], clocks[i + 2], clocks[i + 3]]);
    let sent = UNIX_EPOCH + Duration::from_secs(1_700_000_000 + u64::from(word(0) % 100_000_000));
    let elapsed = Duration::from_millis(u64::from(word(4) % 120_000));
    // A Date header anywhere within a day of sending, or none.
    let skew = i64::from(word(8) % 172_800) - 86_400;
    let date_header =
        (word(8) % 3 != 0).then(|| klavi_token_sidecar::clock::shift(sent, skew as f64));
    let timing = Timing {
        sent,
        received: sent + elapsed,
        date_header,
        elapsed,
    };

    let _ = expiry::jwt_exp(&String::from_utf8_lossy(body));
    let Ok(parsed) = expiry::parse_auth_body(body) else {
        return;
    };
    assert!(body.len() <= MAX_BODY_BYTES);
    assert!(!parsed.access_token.expose().trim().is_empty());
    if let Ok(resolved) = expiry::resolve(&parsed, timing, Duration::from_secs(300)) {
        assert!(resolved.lifetime <= MAX_LIFETIME);
        assert!(
            resolved.lifetime > elapsed,
            "a resolved token has time left on arrival"
        );
        assert!(resolved.expire_at > timing.received);
    }
}

/// Reads `data` as a configuration: a TOML file, then (after a NUL byte)
/// environment lines `NAME=value`.
pub fn configuration(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let (toml, env) = text.split_once('\0').unwrap_or((&text, ""));
    let env = env
        .lines()
        .filter_map(|line| line.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        // Key files would touch the file system; keep the fuzzer pure.
        .filter(|(k, _)| !k.contains("FILE") && k != klavi_token_sidecar::config::CONFIG_ENV)
        .collect();
    let sources = Sources {
        env,
        ..Sources::default()
    };
    let Ok(mut raw) = raw_from(Some((Path::new("fuzz.toml"), toml)), &sources) else {
        return;
    };
    raw.klavi.access_key_file = None;
    raw.klavi.secret_key_file = None;
    for profile in raw.profiles.values_mut() {
        profile.access_key_file = None;
        profile.secret_key_file = None;
    }
    if let Ok(config) = Config::validate(raw) {
        // A valid configuration renders, and nothing secret shows.
        let rendered = config.to_redacted_toml();
        for profile in &config.profiles {
            for key in [&profile.klavi.access_key, &profile.klavi.secret_key] {
                if let klavi_token_sidecar::config::KeySource::Inline(secret) = key {
                    let value = secret.expose();
                    if value.len() >= 8 && !"[REDACTED]".contains(value) {
                        assert!(!rendered.contains(value), "secret rendered");
                    }
                }
            }
        }
    }
}
