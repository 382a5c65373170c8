//! `healthcheck`: a probe for container images without curl.

use std::process::ExitCode;
use std::time::Duration;

use crate::config::{self, Sources};

/// Default when the configuration names no usable address.
const FALLBACK_URL: &str = "http://127.0.0.1:8090/readyz";

/// The URL to probe: `--url`, else the ops listener from the configuration
/// (keys are not needed, so a probe works even where they are not set).
pub fn url(explicit: Option<String>, sources: &Sources) -> String {
    if let Some(url) = explicit {
        return url;
    }
    config::load_raw(sources)
        .ok()
        .and_then(|raw| config::probe_address(&raw))
        .map_or_else(
            || FALLBACK_URL.to_string(),
            |addr| format!("http://{addr}/readyz"),
        )
}

/// GETs the URL: exit 0 on 200, 1 otherwise, with one line on failure.
pub async fn run(explicit: Option<String>, sources: &Sources) -> ExitCode {
    let url = url(explicit, sources);
    crate::upstream::klavi::install_crypto_provider();
    let client = match reqwest::Client::builder()
        .timeout(Duration::from_secs(3))
        .no_proxy()
        .build()
    {
        Ok(client) => client,
        Err(error) => {
            eprintln!("healthcheck: cannot build a client: {error}");
            return ExitCode::FAILURE;
        }
    };
    match client.get(&url).send().await {
        Ok(response) if response.status() == reqwest::StatusCode::OK => ExitCode::SUCCESS,
        Ok(response) => {
            eprintln!("healthcheck: {url} answered {}", response.status());
            ExitCode::FAILURE
        }
        Err(error) => {
            eprintln!("healthcheck: {url}: {error}");
            ExitCode::FAILURE
        }
    }
}
