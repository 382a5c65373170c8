//! `demo`: the real service against an embedded fake Klavi, so a newcomer
//! sees tokens served and refreshed with no credentials and no network.

use std::net::SocketAddr;
use std::time::Duration;

use crate::config::{Config, ConfigError, RawConfig, RawProfile};
use crate::fake_klavi::{DEMO_ACCESS_KEY, DEMO_SECRET_KEY};
use crate::secret::Secret;

/// Demo tokens live 30 s, so refreshes show within a minute.
pub const TOKEN_TTL: Duration = Duration::from_secs(30);

/// The demo's single_use profile, for payment initiation.
pub const PAYMENTS_PROFILE: &str = "payments";

/// The configuration as loaded (`raw`), pointed at the fake with the demo
/// keys, plus a single_use profile `payments` (pool of 2) unless one of
/// that name is configured. Listeners, refresh policy and logging still
/// come from the usual layers.
pub fn config(mut raw: RawConfig, fake_base_url: &str) -> Result<Config, ConfigError> {
    raw.klavi.base_url = fake_base_url.to_string();
    raw.klavi.auth_path = crate::fake_klavi::AUTH_PATH.to_string();
    raw.klavi.access_key = Some(Secret::new(DEMO_ACCESS_KEY));
    raw.klavi.secret_key = Some(Secret::new(DEMO_SECRET_KEY));
    raw.klavi.access_key_file = None;
    raw.klavi.secret_key_file = None;
    raw.profiles
        .entry(PAYMENTS_PROFILE.to_string())
        .or_insert_with(|| RawProfile {
            access_key: Some(Secret::new(DEMO_ACCESS_KEY)),
            secret_key: Some(Secret::new(DEMO_SECRET_KEY)),
            mode: Some("single_use".into()),
            pool_size: Some(2),
            ..RawProfile::default()
        });
    Config::validate(raw)
}

/// Tells the newcomer what to try.
pub fn banner(token: SocketAddr, ops: Option<SocketAddr>, fake: &str) {
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
    let h = "-H 'Klavi-Sidecar: true'";
    eprintln!(
        "\nklavi-token-sidecar demo: a fake Klavi issues 30-second tokens; watch the log refresh them.\n\
         Try:\n  curl {h} http://{token}/token\n  curl {h} -X POST http://{token}/token/refresh{ops}\n\
         \nCall (the fake) Klavi's API with the token; revoke it to get the 401 Klavi gives a bad token, \
         and report it rejected to get a new one:\n\
         \x20 TOKEN=$(curl -s {h} -H 'Accept: text/plain' http://{token}/token)\n\
         \x20 curl -H \"Authorization: Bearer $TOKEN\" {fake}/payment/customer/v1/payments\n\
         \x20 curl -X POST -d \"{{\\\"accessToken\\\":\\\"$TOKEN\\\"}}\" {fake}/_fake/revoke\n\
         \x20 curl {h} -X POST -d \"{{\\\"rejectedToken\\\":\\\"$TOKEN\\\"}}\" http://{token}/token/refresh\n\
         \nSingle-use tokens, one per payment initiation: profile \"{PAYMENTS_PROFILE}\" has mode = \"single_use\", \
         pool_size = 2:\n  curl {h} -X POST http://{token}/profiles/{PAYMENTS_PROFILE}/token/lease\n\
         Stop with Ctrl-C.\n"
    );
}
