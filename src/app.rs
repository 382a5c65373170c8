//! Putting the pieces together: build (bind, load keys), then run until
//! told to stop.
//!
//! [`Application::build`] binds both listeners first, so a taken port fails
//! at once and `/healthz` answers before the first fetch (guarantee 5).
//! [`Application::run_until_stopped`] starts the refresh task, the key-file
//! watcher and both servers; on shutdown the servers drain within the grace,
//! then the refresh task stops.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::cache::refresher::Refresher;
use crate::cache::store::TokenStore;
use crate::clock::SystemClock;
use crate::config::{Config, ConfigError};
use crate::ops::metrics::Metrics;
use crate::serve::http::{AppState, Guard, ops_router, token_fast_path, token_router};
use crate::serve::server::{self, BindError};
use crate::upstream::credentials::Credentials;
use crate::upstream::klavi::KlaviClient;

/// Why the service could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A configuration problem found late (a key file vanished).
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A port is taken or not allowed.
    #[error(transparent)]
    Bind(#[from] BindError),
    /// The HTTP client could not be built (TLS roots, say).
    #[error("cannot build the HTTP client for Klavi: {0}")]
    Client(String),
}

/// The sidecar, bound and ready to run.
#[derive(Debug)]
pub struct Application {
    config: Config,
    token_listener: TcpListener,
    ops_listener: Option<TcpListener>,
    token_addr: SocketAddr,
    ops_addr: Option<SocketAddr>,
    credentials: Arc<Credentials>,
    client: KlaviClient,
    store: Arc<TokenStore>,
}

impl Application {
    /// Loads the keys, builds the Klavi client and binds both listeners.
    pub async fn build(config: Config) -> Result<Self, StartError> {
        let credentials = Arc::new(Credentials::load(&config.klavi)?);
        let client = KlaviClient::new(
            &config.klavi,
            config.refresh.fallback_ttl,
            Arc::clone(&credentials),
            Arc::new(SystemClock),
        )
        .map_err(|e| StartError::Client(e.to_string()))?;
        let token_listener = server::bind("server.listen", config.server.listen).await?;
        let token_addr = token_listener.local_addr().map_err(|source| BindError {
            key: "server.listen",
            addr: config.server.listen,
            source,
        })?;
        let (ops_listener, ops_addr) = match config.server.ops_listen {
            Some(addr) => {
                let listener = server::bind("server.ops_listen", addr).await?;
                let bound = listener.local_addr().map_err(|source| BindError {
                    key: "server.ops_listen",
                    addr,
                    source,
                })?;
                (Some(listener), Some(bound))
            }
            None => (None, None),
        };
        let refresh = &config.refresh;
        let store = Arc::new(TokenStore::new(
            refresh.policy.serve_margin,
            refresh.policy.min_interval,
            refresh.wait,
        ));
        Ok(Self {
            config,
            token_listener,
            ops_listener,
            token_addr,
            ops_addr,
            credentials,
            client,
            store,
        })
    }

    /// Where the token API listens.
    pub fn token_addr(&self) -> SocketAddr {
        self.token_addr
    }

    /// Where the ops listener listens, if enabled.
    pub fn ops_addr(&self) -> Option<SocketAddr> {
        self.ops_addr
    }

    /// Serves until `shutdown` is cancelled, then drains and stops.
    pub async fn run_until_stopped(self, shutdown: CancellationToken) {
        let Self {
            config,
            token_listener,
            ops_listener,
            token_addr,
            ops_addr,
            credentials,
            client,
            store,
        } = self;
        let stop_refresh = CancellationToken::new();
        let key_changes = Arc::new(Notify::new());
        let watcher = credentials.watch(Arc::clone(&key_changes), stop_refresh.clone());
        let metrics = Arc::new(Metrics::new());
        let refresher = Refresher::new(client, Arc::clone(&store), config.refresh.policy.clone())
            .key_changes(key_changes)
            .observer(Arc::clone(&metrics) as Arc<dyn crate::cache::refresher::RefreshObserver>)
            .spawn(stop_refresh.clone());

        let state = AppState {
            store,
            metrics,
            guard: Guard {
                require_header: config.server.require_header,
                allowed_hosts: config.server.allowed_hosts.clone().into(),
            },
            request_timeout: config.server.request_timeout,
            max_body_bytes: config.server.max_body_bytes,
        };
        let limits = config.server.limits;
        let grace = config.server.shutdown_grace;
        let mut servers = JoinSet::new();
        servers.spawn(server::serve(
            "token",
            token_listener,
            token_router(state.clone()),
            Some(token_fast_path(state.clone())),
            limits,
            shutdown.clone(),
            grace,
        ));
        if let Some(listener) = ops_listener {
            servers.spawn(server::serve(
                "ops",
                listener,
                ops_router(state),
                None,
                limits,
                shutdown.clone(),
                grace,
            ));
        }
        tracing::info!(
            version = env!("CARGO_PKG_VERSION"),
            token_listener = %token_addr,
            ops_listener = %ops_addr.map_or_else(|| "off".to_string(), |a| a.to_string()),
            klavi = %config.klavi.auth_url,
            "klavi-token-sidecar started"
        );

        while servers.join_next().await.is_some() {}
        stop_refresh.cancel();
        let _ = refresher.await;
        if let Some(watcher) = watcher {
            let _ = watcher.await;
        }
        tracing::info!("stopped");
    }
}
