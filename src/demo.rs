//! `demo`: the real service against an embedded fake Klavi, so a newcomer
//! sees tokens served and refreshed with no credentials and no network.

use std::io::Write as _;
use std::net::SocketAddr;
use std::time::Duration;

use crate::config::{Config, ConfigError, RawConfig};
use crate::fake_klavi::{DEMO_ACCESS_KEY, DEMO_SECRET_KEY};
use crate::secret::Secret;
use crate::serve::server::ListenAddr;

/// Demo tokens live 30 s, so refreshes show within a minute.
pub const TOKEN_TTL: Duration = Duration::from_secs(30);

/// The demo's single_use profile, for payment initiation.
pub const PAYMENTS_PROFILE: &str = "payments";

/// Where the default profile's proxy listens unless configured.
pub const PROXY_LISTEN: &str = "127.0.0.1:8091";

/// Where the `payments` profile's proxy listens unless configured.
pub const PAYMENTS_PROXY_LISTEN: &str = "127.0.0.1:8092";

/// The configuration as loaded (`raw`), pointed at the fake with the demo
/// keys, with a proxy in front of it on [`PROXY_LISTEN`], plus a single_use
/// profile `payments` (pool of 2, its own proxy on
/// [`PAYMENTS_PROXY_LISTEN`]); what is configured of either (a listener,
/// say, through `KLAVI_SIDECAR_PROFILES__PAYMENTS__PROXY_LISTEN`) is kept.
/// Listeners, refresh policy and logging still come from the usual layers.
pub fn config(mut raw: RawConfig, fake_base_url: &str) -> Result<Config, ConfigError> {
    raw.klavi.base_url = fake_base_url.to_string();
    raw.klavi.auth_path = crate::fake_klavi::AUTH_PATH.to_string();
    raw.klavi.access_key = Some(Secret::new(DEMO_ACCESS_KEY));
    raw.klavi.secret_key = Some(Secret::new(DEMO_SECRET_KEY));
    raw.klavi.access_key_file = None;
    raw.klavi.secret_key_file = None;
    if raw.klavi.proxy_listen.trim().is_empty() {
        raw.klavi.proxy_listen = PROXY_LISTEN.to_string();
    }
    let payments = raw
        .profiles
        .entry(PAYMENTS_PROFILE.to_string())
        .or_default();
    if payments.access_key.is_none() && payments.access_key_file.is_none() {
        payments.access_key = Some(Secret::new(DEMO_ACCESS_KEY));
    }
    if payments.secret_key.is_none() && payments.secret_key_file.is_none() {
        payments.secret_key = Some(Secret::new(DEMO_SECRET_KEY));
    }
    payments.mode.get_or_insert_with(|| "single_use".into());
    payments.pool_size.get_or_insert(2);
    payments
        .proxy_listen
        .get_or_insert_with(|| PAYMENTS_PROXY_LISTEN.to_string());
    Config::validate(raw)
}

/// Where the demo listens, for the banner.
#[derive(Debug, Clone)]
pub struct Addresses {
    /// The token API.
    pub token: ListenAddr,
    /// The ops listener, if on.
    pub ops: Option<SocketAddr>,
    /// The default profile's proxy, if on.
    pub proxy: Option<ListenAddr>,
    /// The `payments` profile's proxy, if on.
    pub payments_proxy: Option<ListenAddr>,
}

/// What curl needs before a path to reach `addr`: `http://ADDR`, or
/// `--unix-socket PATH http://localhost` for a socket.
fn curl_base(addr: &ListenAddr) -> String {
    match addr {
        ListenAddr::Tcp(addr) => format!("http://{addr}"),
        ListenAddr::Unix(path) => format!("--unix-socket {} http://localhost", path.display()),
    }
}

/// Tells the newcomer what to try.
pub fn banner(addresses: Addresses, fake: &str) {
    let Addresses {
        token,
        ops,
        proxy,
        payments_proxy,
    } = addresses;
    let ops = ops.map_or_else(String::new, |ops| {
        let probe = crate::config::probe_address(&crate::config::RawConfig {
            server: crate::config::RawServer {
                ops_listen: ops.to_string(),
                ..Default::default()
            },
            ..Default::default()
        })
        .unwrap_or(ListenAddr::Tcp(ops));
        format!("\n  curl {}/readyz", curl_base(&probe))
    });
    let h = "-H 'Klavi-Sidecar: true'";
    let token = curl_base(&token);
    let proxy = proxy.as_ref().map(curl_base);
    let payments_proxy = payments_proxy.as_ref().map(curl_base);
    let mut proxies = String::new();
    if let Some(proxy) = &proxy {
        proxies.push_str(&format!(
            "\nThe proxy: call Klavi through the sidecar with no token at all; it adds one:\n\
             \x20 curl -i {h} {proxy}/payment/customer/v1/payments\n"
        ));
    }
    if let Some(proxy) = &payments_proxy {
        proxies.push_str(&format!(
            "Profile \"{PAYMENTS_PROFILE}\"'s proxy leases a fresh single-use token for every request \
             (see Klavi-Sidecar-Token):\n\
             \x20 curl -i {h} -X POST -d '{{\"amount\":100}}' {proxy}/payment/customer/v1/payments\n"
        ));
    }
    if let Some(proxy) = &proxy {
        proxies.push_str(&format!(
            "Revoke every token: the proxy gets Klavi's 401, replays once with a new token, and you \
             still get 200:\n\
             \x20 curl -X POST -d '{{\"all\":true}}' {fake}/_fake/revoke\n\
             \x20 curl -i {h} {proxy}/payment/customer/v1/payments\n"
        ));
    }
    // Not eprintln!, which panics when stderr is gone.
    let _ = writeln!(
        std::io::stderr().lock(),
        "\nklavi-token-sidecar demo: a fake Klavi issues 30-second tokens; watch the log refresh them.\n\
         Try:\n  curl {h} {token}/token\n  curl {h} -X POST {token}/token/refresh{ops}\n\
         \nCall (the fake) Klavi's API with the token; revoke it to get the 401 Klavi gives a bad token, \
         and report it rejected to get a new one:\n\
         \x20 TOKEN=$(curl -s {h} -H 'Accept: text/plain' {token}/token)\n\
         \x20 curl -H \"Authorization: Bearer $TOKEN\" {fake}/payment/customer/v1/payments\n\
         \x20 curl -X POST -d \"{{\\\"accessToken\\\":\\\"$TOKEN\\\"}}\" {fake}/_fake/revoke\n\
         \x20 curl {h} -X POST -d \"{{\\\"rejectedToken\\\":\\\"$TOKEN\\\"}}\" {token}/token/refresh\n\
         \nSingle-use tokens, one per payment initiation: profile \"{PAYMENTS_PROFILE}\" has mode = \"single_use\", \
         pool_size = 2:\n  curl {h} -X POST {token}/profiles/{PAYMENTS_PROFILE}/token/lease\n{proxies}\
         Stop with Ctrl-C.\n"
    );
}
