//! The sidecar binary as the black-box tests start it: against an
//! in-process fake Klavi, with its listeners on free loopback ports.

use klavi_token_sidecar::fake_klavi::FakeKlavi;

use super::*;

/// The value of `series` (name and labels, exactly) in a `/metrics` text.
pub fn metric_in(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {series}"))
}

/// The guard's header.
pub const HEADER: (&str, &str) = ("Klavi-Sidecar", "true");

/// A sidecar process serving `profiles_env` against `fake`, with its token
/// and ops addresses; ready when this returns.
pub struct Sidecar {
    process: Option<Captured>,
    pub token: String,
    pub ops: String,
    /// The default profile's proxy, when `KLAVI_SIDECAR_KLAVI__PROXY_LISTEN`
    /// was given.
    pub proxy: Option<String>,
    pub http: reqwest::Client,
}

/// The default profile's proxy listener, in the environment.
pub const PROXY_LISTEN: &str = "KLAVI_SIDECAR_KLAVI__PROXY_LISTEN";

impl Sidecar {
    /// As [`Sidecar::start`], with the default profile's proxy on a free
    /// port.
    pub async fn start_proxied(fake: &FakeKlavi, env: &[(&str, &str)]) -> Self {
        let proxy = format!("127.0.0.1:{}", free_port());
        let mut all = vec![(PROXY_LISTEN, proxy.as_str())];
        all.extend_from_slice(env);
        Self::start(fake, &all).await
    }

    /// `http://PROXY{path}`.
    pub fn proxied(&self, path: &str) -> String {
        format!(
            "http://{}{path}",
            self.proxy.as_deref().unwrap_or("no-proxy")
        )
    }

    /// A request to `path` through the proxy, with the guard's header.
    pub fn via_proxy(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, self.proxied(path))
            .header(HEADER.0, HEADER.1)
    }

    pub async fn start(fake: &FakeKlavi, env: &[(&str, &str)]) -> Self {
        let sidecar = Self::spawn(fake, env);
        sidecar.wait_ready().await;
        sidecar
    }

    /// As [`Sidecar::start`], without waiting for it to be ready.
    pub fn spawn(fake: &FakeKlavi, env: &[(&str, &str)]) -> Self {
        let (token, ops) = (
            format!("127.0.0.1:{}", free_port()),
            format!("127.0.0.1:{}", free_port()),
        );
        let base = fake.base_url();
        let mut all: Vec<(&str, &str)> = vec![
            ("KLAVI_ACCESS_KEY", "demo-access-key"),
            ("KLAVI_SECRET_KEY", "demo-secret-key"),
            ("KLAVI_SIDECAR_KLAVI__BASE_URL", &base),
            ("RUST_LOG", "info"),
        ];
        all.extend_from_slice(env);
        let process = Captured::spawn(sidecar(
            &["run", "--listen", &token, "--ops-listen", &ops],
            &all,
        ));
        klavi_token_sidecar::upstream::klavi::install_crypto_provider();
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(600)
            .build()
            .unwrap();
        let proxy = env
            .iter()
            .find(|(k, _)| *k == PROXY_LISTEN)
            .map(|(_, v)| v.to_string());
        Self {
            process: Some(process),
            token,
            ops,
            proxy,
            http,
        }
    }

    /// Its pid.
    pub fn pid(&self) -> u32 {
        self.process.as_ref().map_or(0, Captured::pid)
    }

    /// What it logged so far.
    pub fn log(&self) -> String {
        self.process.as_ref().map(Captured::log).unwrap_or_default()
    }

    pub async fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let ready = self
                .http
                .get(format!("http://{}/readyz", self.ops))
                .send()
                .await;
            if ready.is_ok_and(|r| r.status() == 200) {
                return;
            }
            assert!(Instant::now() < deadline, "not ready in time");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.token)
    }

    /// GET (or POST with `body`) on the token listener; status and JSON.
    pub async fn call(
        &self,
        post: bool,
        path: &str,
        body: Option<String>,
    ) -> (u16, serde_json::Value) {
        let request = if post {
            self.http.post(self.url(path))
        } else {
            self.http.get(self.url(path))
        };
        let request = match body {
            Some(body) => request.body(body),
            None => request,
        };
        let response = request.header(HEADER.0, HEADER.1).send().await.unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or_default())
    }

    pub async fn token(&self) -> String {
        let (status, body) = self.call(false, "/token", None).await;
        assert_eq!(status, 200, "{body}");
        body["accessToken"].as_str().unwrap().to_string()
    }

    pub async fn metric(&self, series: &str) -> f64 {
        let text = self
            .http
            .get(format!("http://{}/metrics", self.ops))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        metric_in(&text, series)
    }

    pub fn stop(mut self) -> String {
        self.process.take().map(Captured::stop).unwrap_or_default()
    }
}
