//! `demo`: the real service against an embedded fake Klavi, so a newcomer
//! sees tokens served and refreshed with no credentials and no network.

use std::net::SocketAddr;
use std::time::Duration;

use crate::config::{Config, ConfigError, RawConfig};
use crate::fake_klavi::{DEMO_ACCESS_KEY, DEMO_SECRET_KEY};
use crate::secret::Secret;

/// Demo tokens live 30 s, so refreshes show within a minute.
pub const TOKEN_TTL: Duration = Duration::from_secs(30);

/// The configuration as loaded (`raw`), pointed at the fake with the demo
/// keys. Listeners, refresh policy and logging still come from the usual
/// layers.
pub fn config(mut raw: RawConfig, fake_base_url: &str) -> Result<Config, ConfigError> {
    raw.klavi.base_url = fake_base_url.to_string();
    raw.klavi.auth_path = crate::fake_klavi::AUTH_PATH.to_string();
    raw.klavi.access_key = Some(Secret::new(DEMO_ACCESS_KEY));
    raw.klavi.secret_key = Some(Secret::new(DEMO_SECRET_KEY));
    raw.klavi.access_key_file = None;
    raw.klavi.secret_key_file = None;
    Config::validate(raw)
}

/// Tells the newcomer what to try.
pub fn banner(token: SocketAddr, ops: Option<SocketAddr>) {
    let ops = ops.map_or_else(String::new, |ops| {
        let probe = crate::config::probe_address(&crate::config::RawConfig {
            server: crate::config::RawServer {
                ops_listen: ops.to_string(),
                ..Default::default()
            },
            ..Default::default()
        })
        .unwrap_or(ops);
        format!("\n  curl http://{probe}/readyz")
    });
    eprintln!(
        "\nklavi-token-sidecar demo: a fake Klavi issues 30-second tokens; watch the log refresh them.\nTry:\n  curl -H 'Klavi-Sidecar: true' http://{token}/token\n  curl -H 'Klavi-Sidecar: true' -X POST http://{token}/token/refresh{ops}\nStop with Ctrl-C.\n"
    );
}
