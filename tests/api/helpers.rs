//! Starting the app and the fake, and talking to them.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use klavi_token_sidecar::app::Application;
use klavi_token_sidecar::config::{self, Config, Sources};
use klavi_token_sidecar::fake_klavi::{FakeKlavi, FakeKlaviConfig};
use tokio_util::sync::CancellationToken;

pub const HEADER: (&str, &str) = ("Klavi-Sidecar", "true");

/// A running sidecar and its fake Klavi.
pub struct TestApp {
    pub token: SocketAddr,
    pub ops: SocketAddr,
    pub fake: FakeKlavi,
    pub http: reqwest::Client,
    pub shutdown: CancellationToken,
    pub task: tokio::task::JoinHandle<()>,
}

pub fn client() -> reqwest::Client {
    klavi_token_sidecar::upstream::klavi::install_crypto_provider();
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(20))
        .pool_max_idle_per_host(0)
        .build()
        .unwrap()
}

/// The configuration for an app on random loopback ports pointed at
/// `fake`, with `extra` environment variables on top.
pub fn test_config(fake_url: &str, extra: &[(&str, &str)]) -> Config {
    let mut env: Vec<(String, String)> = [
        ("KLAVI_SIDECAR_SERVER__LISTEN", "127.0.0.1:0"),
        ("KLAVI_SIDECAR_SERVER__OPS_LISTEN", "127.0.0.1:0"),
        ("KLAVI_SIDECAR_KLAVI__BASE_URL", fake_url),
        ("KLAVI_ACCESS_KEY", "demo-access-key"),
        ("KLAVI_SECRET_KEY", "demo-secret-key"),
        ("KLAVI_SIDECAR_KLAVI__REQUEST_TIMEOUT_MS", "2000"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    config::load(&Sources {
        env,
        ..Sources::default()
    })
    .unwrap()
}

impl TestApp {
    /// Starts a fake (configured by `fake_config`, primed by `prime`) and
    /// an app against it.
    pub async fn spawn_with(
        fake_config: FakeKlaviConfig,
        prime: impl FnOnce(&FakeKlavi),
        extra: &[(&str, &str)],
    ) -> Self {
        let fake = FakeKlavi::start_local(fake_config).await.unwrap();
        prime(&fake);
        let config = test_config(&fake.base_url(), extra);
        Self::spawn_config(fake, config).await
    }

    pub async fn spawn_config(fake: FakeKlavi, config: Config) -> Self {
        let app = Application::build(config).await.unwrap();
        let token = app.token_addr().tcp().expect("the tests listen on TCP");
        let ops = app.ops_addr().unwrap();
        let shutdown = CancellationToken::new();
        let stop = shutdown.clone();
        let task = tokio::spawn(async move {
            app.run_until_stopped(stop).await.expect("the app runs");
        });
        Self {
            token,
            ops,
            fake,
            http: client(),
            shutdown,
            task,
        }
    }

    /// A default app: 300 s tokens.
    pub async fn spawn() -> Self {
        Self::spawn_env(&[]).await
    }

    /// An app against a fake issuing 300 s tokens, with `extra`
    /// environment variables.
    pub async fn spawn_env(extra: &[(&str, &str)]) -> Self {
        Self::spawn_with(
            FakeKlaviConfig {
                token_ttl: Duration::from_secs(300),
                ..FakeKlaviConfig::default()
            },
            |_| {},
            extra,
        )
        .await
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.token)
    }

    pub fn ops_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.ops)
    }

    /// GET on the token listener with the required header.
    pub async fn get_token(&self, query: &str) -> reqwest::Response {
        self.http
            .get(self.url(&format!("/token{query}")))
            .header(HEADER.0, HEADER.1)
            .send()
            .await
            .unwrap()
    }

    pub async fn refresh(&self) -> reqwest::Response {
        self.http
            .post(self.url("/token/refresh"))
            .header(HEADER.0, HEADER.1)
            .send()
            .await
            .unwrap()
    }

    pub async fn metrics_text(&self) -> String {
        let response = self
            .http
            .get(self.ops_url("/metrics"))
            .send()
            .await
            .unwrap();
        response.text().await.unwrap()
    }

    pub async fn readyz(&self) -> (u16, serde_json::Value) {
        let response = self.http.get(self.ops_url("/readyz")).send().await.unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap())
    }

    /// Stops the app and the fake, checking the fake never saw two auth
    /// requests at once (guarantee 3).
    pub async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(15), self.task)
            .await
            .expect("the app stops within its grace")
            .unwrap();
        assert!(
            self.fake.max_in_flight() <= 1,
            "more than one auth request in flight"
        );
        self.fake.stop().await;
    }
}

/// Polls `check` every 20 ms until it returns true, for at most `limit`.
pub async fn eventually<F, Fut>(limit: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if check().await {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub async fn json(response: reqwest::Response) -> serde_json::Value {
    response.json().await.unwrap()
}

/// Runs `n` futures made by `make` concurrently; their outputs in order.
pub async fn concurrent<F, Fut, T>(n: usize, make: F) -> Vec<T>
where
    F: Fn() -> Fut,
    Fut: Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    let mut set = tokio::task::JoinSet::new();
    for i in 0..n {
        let future = make();
        set.spawn(async move { (i, future.await) });
    }
    let mut out = set.join_all().await;
    out.sort_by_key(|(i, _)| *i);
    out.into_iter().map(|(_, v)| v).collect()
}
