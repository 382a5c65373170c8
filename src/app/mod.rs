//! Putting the pieces together: build (bind, load keys), then run until
//! told to stop.
//!
//! [`Application::build`] binds both listeners first, so a taken port fails
//! at once and `/healthz` answers before the first fetch (guarantee 5), and
//! prepares every profile: its keys and its store.
//! [`Application::run_until_stopped`] starts both servers, then builds the
//! HTTP clients for Klavi and starts each profile's refresh task and
//! key-file watcher and token-file writer; on shutdown the servers drain
//! within the grace, then the refresh tasks stop (and the token files are
//! removed). [`init`] runs the same profile tasks without listeners.

pub mod init;

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::cache::digests::TokenLedger;
use crate::cache::refresher::{RefreshObserver, Refresher};
use crate::cache::store::TokenStore;
use crate::clock::SystemClock;
use crate::config::ranges::KeyNames;
use crate::config::{Config, ConfigError, ProfileConfig, TokenMode};
use crate::fleet::{Fleet, FleetError};
use crate::ops::metrics::Metrics;
use crate::profile::{Profile, Profiles};
use crate::proxy::client::UpstreamClient;
use crate::proxy::{Forwarder, ForwarderConfig, proxy_router};
use crate::serve::http::{AppState, Guard, ops_router, token_fast_path, token_router};
use crate::serve::listener::Listener;
use crate::serve::server::{self, BindError, ListenAddr};
use crate::sink::writer::{OnStop, TokenFileWriter};
use crate::upstream::credentials::Credentials;
use crate::upstream::klavi::{HttpClients, KlaviClient};

/// Each profile's client for auth requests, and for its proxy if it has
/// one; clients with the same settings are shared (one pool each).
fn build_clients(
    profiles: &[ProfileConfig],
) -> Result<(Vec<reqwest::Client>, Vec<Option<UpstreamClient>>), String> {
    let mut http = HttpClients::default();
    let mut upstream: Vec<(std::time::Duration, UpstreamClient)> = Vec::new();
    let mut auth = Vec::with_capacity(profiles.len());
    let mut proxy = Vec::with_capacity(profiles.len());
    for profile in profiles {
        auth.push(http.for_config(&profile.klavi).map_err(|e| e.to_string())?);
        if profile.proxy_listen.is_none() {
            proxy.push(None);
            continue;
        }
        let timeout = profile.klavi.connect_timeout;
        let client = match upstream.iter().find(|(t, _)| *t == timeout) {
            Some((_, client)) => client.clone(),
            None => {
                let client = UpstreamClient::new(timeout).map_err(|e| e.to_string())?;
                upstream.push((timeout, client.clone()));
                client
            }
        };
        proxy.push(Some(client));
    }
    Ok((auth, proxy))
}

/// Why the service could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A configuration problem found late (a key file vanished).
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A port is taken or not allowed, or a socket cannot be created.
    #[error(transparent)]
    Bind(#[from] BindError),
    /// The HTTP client could not be built (TLS roots, say).
    #[error("cannot build the HTTP client for Klavi: {0}")]
    Client(String),
    /// The fleet's Redis client could not be built.
    #[error(transparent)]
    Fleet(#[from] FleetError),
}

/// The fleet of `config`, when `[fleet]` is on and a profile is in it
/// (its metrics then exported).
fn fleet_for(
    config: &Config,
    profiles: &[ProfileConfig],
    metrics: &mut Metrics,
) -> Result<Option<Fleet>, StartError> {
    let Some(fleet) = &config.fleet else {
        return Ok(None);
    };
    if !profiles.iter().any(|p| p.fleet) {
        tracing::warn!("fleet.redis_url is set but no profile is in the fleet (fleet = false)");
        return Ok(None);
    }
    let up = metrics.enable_fleet();
    Ok(Some(Fleet::new(fleet, up)?))
}

/// One profile, built and ready to start.
#[derive(Debug)]
struct Parts {
    config: ProfileConfig,
    credentials: Arc<Credentials>,
    store: Arc<TokenStore>,
    /// Its proxy listener, bound, and the address it got.
    proxy: Option<(Listener, ListenAddr)>,
}

/// Every profile of `configs`, its keys loaded and its store built
/// (with one token ledger for the process: profiles with the same keys may
/// be sent the same token, and what one leased or saw rejected the others
/// must know); no listener yet.
fn prepare(configs: &[ProfileConfig]) -> Result<Vec<Parts>, StartError> {
    let ledger = Arc::new(TokenLedger::default());
    let mut profiles = Vec::with_capacity(configs.len());
    for profile in configs {
        let credentials = Arc::new(Credentials::load(&profile.name, &profile.klavi)?);
        let refresh = &profile.refresh;
        let (margin, min_interval) = (refresh.policy.serve_margin, refresh.policy.min_interval);
        let mut store = match profile.mode {
            TokenMode::Shared => TokenStore::new(margin, min_interval, refresh.wait),
            TokenMode::SingleUse { pool_size } => {
                TokenStore::single_use(margin, min_interval, refresh.wait, pool_size)
            }
        };
        if profile.token_file.is_some() {
            store = store.with_token_file();
        }
        profiles.push(Parts {
            config: profile.clone(),
            credentials,
            store: Arc::new(store.with_ledger(Arc::clone(&ledger))),
            proxy: None,
        });
    }
    // A token rejected on one profile is dropped by every other that
    // holds it.
    for parts in &profiles {
        let others = profiles
            .iter()
            .filter(|other| !Arc::ptr_eq(&other.store, &parts.store))
            .map(|other| Arc::downgrade(&other.store))
            .collect();
        parts.store.know_others(others);
    }
    Ok(profiles)
}

/// Each profile as its consumers see it, its metrics at zero.
fn consumers(parts: &[Parts], metrics: &Metrics) -> Vec<Arc<Profile>> {
    parts
        .iter()
        .map(|p| {
            // Alive from the start: its task follows in milliseconds, or
            // the process stops.
            p.store.update_state(|s| s.task_alive = true);
            let profile_metrics = metrics.profile(&p.config.name);
            if p.store.is_single_use() {
                profile_metrics.single_use();
            }
            if p.config.proxy_listen.is_some() {
                // At zero before the first scrape; the proxy starts once
                // its client is built.
                let _ = profile_metrics.proxied();
            }
            if p.config.token_file.is_some() {
                profile_metrics.token_file();
            }
            Arc::new(Profile::new(
                &p.config.name,
                Arc::clone(&p.store),
                profile_metrics,
                p.config.required,
            ))
        })
        .collect()
}

/// Starts, into `tasks`, each profile's refresh task, key-file watcher and
/// token-file writer (which does `on_stop` with its file), all stopping
/// with `stop`; profiles in the fleet get their tokens through it, and its
/// listener starts too.
fn start_profiles(
    parts: Vec<Parts>,
    profiles: &Profiles,
    clients: Vec<reqwest::Client>,
    mut fleet: Option<Fleet>,
    on_stop: OnStop,
    stop: &CancellationToken,
    tasks: &mut JoinSet<()>,
) {
    for ((parts, profile), shared) in parts.into_iter().zip(profiles.iter()).zip(clients) {
        let client = KlaviClient::over(
            shared,
            &parts.config.klavi,
            parts.config.refresh.fallback_ttl,
            Arc::clone(&parts.credentials),
            Arc::new(SystemClock),
        );
        let key_changes = Arc::new(Notify::new());
        if let Some(watcher) =
            Arc::clone(&parts.credentials).watch(Arc::clone(&key_changes), stop.clone())
        {
            tasks.spawn(async move {
                let _ = watcher.await;
            });
        }
        if let Some(file) = &parts.config.token_file {
            let writer = TokenFileWriter::for_config(
                Arc::clone(profile),
                file,
                parts.config.refresh.policy.clone(),
                on_stop,
            );
            tasks.spawn(writer.run(stop.clone()));
        }
        let observer: Arc<dyn RefreshObserver> = Arc::new(profile.metrics().clone());
        let (store, policy) = (
            Arc::clone(&parts.store),
            parts.config.refresh.policy.clone(),
        );
        let name = &parts.config.name;
        let refresher = match fleet.as_mut().filter(|_| parts.config.fleet) {
            Some(fleet) => {
                let member = fleet.join(
                    &parts.config,
                    Arc::clone(&parts.credentials),
                    Arc::clone(&parts.store),
                    profile.metrics().fleet_adopted(),
                );
                let stored = Arc::clone(&member.stored);
                let source = fleet.source(client, member, &parts.config);
                Refresher::new(source, store, policy)
                    .key_changes(key_changes)
                    .source_ready(stored)
                    .observer(observer)
                    .name(name)
                    .spawn(stop.clone())
            }
            None => Refresher::new(client, store, policy)
                .key_changes(key_changes)
                .observer(observer)
                .name(name)
                .spawn(stop.clone()),
        };
        tasks.spawn(async move {
            let _ = refresher.await;
        });
    }
    if let Some(fleet) = fleet {
        fleet.start(stop, tasks);
    }
}

/// Builds every profile's auth client (and proxy client) off the runtime's
/// threads, so servers answer meanwhile.
async fn clients_for(
    parts: &[Parts],
) -> Result<(Vec<reqwest::Client>, Vec<Option<UpstreamClient>>), StartError> {
    let configs: Vec<_> = parts.iter().map(|p| p.config.clone()).collect();
    tokio::task::spawn_blocking(move || build_clients(&configs))
        .await
        .unwrap_or_else(|error| Err(format!("the client builder failed: {error}")))
        .map_err(StartError::Client)
}

/// The sidecar, bound and ready to run.
#[derive(Debug)]
pub struct Application {
    config: Config,
    token_listener: Listener,
    ops_listener: Option<Listener>,
    token_addr: ListenAddr,
    ops_addr: Option<SocketAddr>,
    profiles: Vec<Parts>,
}

/// Binds the listener of configuration key `key`; something that is not
/// a socket at a socket's path is a configuration error (exit 2), any
/// other failure a start error.
async fn bind(
    key: &str,
    addr: &ListenAddr,
    socket_mode: u32,
) -> Result<(Listener, ListenAddr), StartError> {
    server::bind(key, addr, socket_mode)
        .await
        .map_err(|error| match error.misconfigured() {
            Some((key, message)) => StartError::Config(ConfigError::new(key, message)),
            None => StartError::Bind(error),
        })
}

impl Application {
    /// Binds both listeners, then loads every profile's keys and builds its
    /// store (its Klavi client comes in [`Self::run_until_stopped`], off the
    /// runtime's thread).
    pub async fn build(config: Config) -> Result<Self, StartError> {
        let mode = config.server.socket_mode;
        let (token_listener, token_addr) =
            bind("server.listen", &config.server.listen, mode).await?;
        let (ops_listener, ops_addr) = match config.server.ops_listen {
            Some(addr) => {
                let (listener, bound) = bind("server.ops_listen", &addr.into(), mode).await?;
                (Some(listener), bound.tcp())
            }
            None => (None, None),
        };
        for (later, earlier) in config.shared_key_pair_twins() {
            tracing::warn!(
                profile = later,
                same_keys_as = earlier,
                "two shared profiles of one key pair fetch two tokens for one account (twice the \
                 auth requests); use one profile"
            );
        }
        let mut profiles = prepare(&config.profiles)?;
        for parts in &mut profiles {
            if let Some(addr) = &parts.config.proxy_listen {
                let key = KeyNames::of(&parts.config.name).klavi("proxy_listen");
                parts.proxy = Some(bind(&key, addr, mode).await?);
            }
        }
        Ok(Self {
            config,
            token_listener,
            ops_listener,
            token_addr,
            ops_addr,
            profiles,
        })
    }

    /// Where the token API listens.
    pub fn token_addr(&self) -> &ListenAddr {
        &self.token_addr
    }

    /// Where the ops listener listens, if enabled.
    pub fn ops_addr(&self) -> Option<SocketAddr> {
        self.ops_addr
    }

    /// Where profile `name`'s proxy listens, if it has one.
    pub fn proxy_addr(&self, name: &str) -> Option<&ListenAddr> {
        self.profiles
            .iter()
            .find(|p| p.config.name == name)
            .and_then(|p| p.proxy.as_ref().map(|(_, addr)| addr))
    }

    /// Serves until `shutdown` is cancelled, then drains and stops.
    ///
    /// The servers start first, so `/healthz` answers while the HTTP
    /// clients for Klavi are built (loading TLS roots takes milliseconds),
    /// then each profile's refresh task and key-file watcher start. A
    /// client that cannot be built stops everything with the error.
    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> Result<(), StartError> {
        let Self {
            config,
            token_listener,
            ops_listener,
            token_addr,
            ops_addr,
            profiles: mut parts,
        } = self;
        let mut metrics = Metrics::new(Arc::new(SystemClock));
        let fleet = fleet_for(&config, &config.profiles, &mut metrics)?;
        let metrics = Arc::new(metrics);
        let served = consumers(&parts, &metrics);
        let names: Vec<String> = served.iter().map(|p| p.name().to_string()).collect();
        let profiles = Profiles::new(served);

        let server_config = &config.server;
        let mut state = AppState::new(&profiles, Arc::clone(&metrics), std::time::Duration::ZERO);
        state.guard = Guard {
            require_header: server_config.require_header,
            allowed_hosts: server_config.allowed_hosts.clone().into(),
            check_host: true,
        };
        state.request_timeout = server_config.request_timeout;
        state.max_body_bytes = server_config.max_body_bytes;
        let (limits, grace) = (server_config.limits, server_config.shutdown_grace);
        let stop_servers = shutdown.child_token();
        let mut servers = JoinSet::new();
        // A unix socket has no Host to rebind: only processes that may
        // open the file reach it.
        let mut token_state = state.clone();
        token_state.guard = state.guard.for_listener(&token_listener);
        servers.spawn(server::serve(
            "token",
            token_listener,
            token_router(token_state.clone()),
            Some(token_fast_path(token_state)),
            limits,
            stop_servers.clone(),
            grace,
        ));
        if let Some(listener) = ops_listener {
            servers.spawn(server::serve(
                "ops",
                listener,
                ops_router(state.clone()),
                None,
                limits,
                stop_servers.clone(),
                grace,
            ));
        }

        let (clients, proxy_clients) = match clients_for(&parts).await {
            Ok(built) => built,
            Err(error) => {
                stop_servers.cancel();
                while servers.join_next().await.is_some() {}
                return Err(error);
            }
        };

        let mut proxies = Vec::new();
        for ((parts, profile), client) in parts.iter_mut().zip(profiles.iter()).zip(proxy_clients) {
            let (Some((listener, addr)), Some(client)) = (parts.proxy.take(), client) else {
                continue;
            };
            let forwarder = Forwarder::new(
                Arc::clone(profile),
                client,
                ForwarderConfig {
                    base: parts.config.klavi.base_url.clone(),
                    guard: state.guard.for_listener(&listener),
                    max_body_bytes: config.proxy.max_body_bytes,
                    timeout: config.proxy.request_timeout,
                    access_log: config.proxy.access_log,
                },
            );
            let Some(forwarder) = forwarder else {
                continue;
            };
            servers.spawn(server::serve(
                "proxy",
                listener,
                proxy_router(Arc::new(forwarder)),
                None,
                limits,
                stop_servers.clone(),
                grace,
            ));
            proxies.push(format!("{}={addr}", profile.name()));
        }

        let stop_refresh = CancellationToken::new();
        let mut tasks = JoinSet::new();
        start_profiles(
            parts,
            &profiles,
            clients,
            fleet,
            OnStop::Remove,
            &stop_refresh,
            &mut tasks,
        );
        tracing::info!(
            version = env!("CARGO_PKG_VERSION"),
            token_listener = %token_addr,
            ops_listener = %ops_addr.map_or_else(|| "off".to_string(), |a| a.to_string()),
            profiles = %names.join(","),
            proxies = %proxies.join(","),
            "klavi-token-sidecar started"
        );
        for profile in &config.profiles {
            let (mode, pool_size) = match profile.mode {
                TokenMode::Shared => ("shared", None),
                TokenMode::SingleUse { pool_size } => ("single_use", Some(pool_size)),
            };
            tracing::info!(
                profile = %profile.name,
                klavi = %profile.klavi.auth_url,
                required = profile.required,
                mode,
                pool_size,
                fleet = profile.fleet && config.fleet.is_some(),
                "profile serving"
            );
        }

        while servers.join_next().await.is_some() {}
        stop_refresh.cancel();
        while tasks.join_next().await.is_some() {}
        tracing::info!("stopped");
        Ok(())
    }
}
