//! `healthcheck`: a probe for container images without curl.
//!
//! It probes an `http://` URL, or a unix socket written
//! `unix:/path/to.sock` (then `/readyz`) or `unix:/path/to.sock:/healthz`.
//! The ops listener is always TCP (kubelet and Prometheus reach it on the
//! pod's address), but with it turned off the probe goes to the token
//! listener, which may be a socket.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use crate::config::{self, Sources};
use crate::serve::server::ListenAddr;

/// Default when the configuration names no usable address.
const FALLBACK_URL: &str = "http://127.0.0.1:8090/readyz";

/// How long the whole probe may take.
const TIMEOUT: Duration = Duration::from_secs(3);

/// What to probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// An `http://` (or `https://`) URL.
    Url(String),
    /// A path on a unix socket.
    Unix {
        /// The socket.
        socket: PathBuf,
        /// The request's path, e.g. `/readyz`.
        path: String,
    },
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Url(url) => f.write_str(url),
            Self::Unix { socket, path } => write!(f, "unix:{}:{path}", socket.display()),
        }
    }
}

impl Target {
    /// Reads `--url`: `unix:SOCKET[:PATH]` or a URL.
    pub fn parse(text: &str) -> Self {
        let Some(rest) = text.strip_prefix("unix:") else {
            return Self::Url(text.to_string());
        };
        // The request path starts at the last ":/" (socket names end in
        // a file name, not in ":").
        match rest.rfind(":/") {
            Some(at) => Self::Unix {
                socket: PathBuf::from(&rest[..at]),
                path: rest[at + 1..].to_string(),
            },
            None => Self::Unix {
                socket: PathBuf::from(rest),
                path: "/readyz".to_string(),
            },
        }
    }
}

/// What to probe: `--url`, else the ops listener from the configuration
/// (keys are not needed, so a probe works even where they are not set).
pub fn target(explicit: Option<String>, sources: &Sources) -> Target {
    if let Some(url) = explicit {
        return Target::parse(&url);
    }
    match config::load_raw(sources)
        .ok()
        .and_then(|raw| config::probe_address(&raw))
    {
        Some(ListenAddr::Tcp(addr)) => Target::Url(format!("http://{addr}/readyz")),
        Some(ListenAddr::Unix(socket)) => Target::Unix {
            socket,
            path: "/readyz".to_string(),
        },
        None => Target::Url(FALLBACK_URL.to_string()),
    }
}

/// GETs the target: exit 0 on 200, 1 otherwise, with one line on failure.
pub async fn run(explicit: Option<String>, sources: &Sources) -> ExitCode {
    let target = target(explicit, sources);
    match status(&target).await {
        Ok(200) => ExitCode::SUCCESS,
        Ok(status) => {
            eprintln!("healthcheck: {target} answered {status}");
            ExitCode::FAILURE
        }
        Err(error) => {
            eprintln!("healthcheck: {target}: {error}");
            ExitCode::FAILURE
        }
    }
}

/// The status `target` answers a GET with.
async fn status(target: &Target) -> Result<u16, String> {
    crate::upstream::klavi::install_crypto_provider();
    let builder = reqwest::Client::builder().timeout(TIMEOUT).no_proxy();
    let (builder, url) = match target {
        Target::Url(url) => (builder, url.clone()),
        Target::Unix { socket, path } => (
            builder.unix_socket(socket.as_path()),
            format!("http://localhost{path}"),
        ),
    };
    let client = builder
        .build()
        .map_err(|error| format!("cannot build a client: {error}"))?;
    match client.get(&url).send().await {
        Ok(response) => Ok(response.status().as_u16()),
        Err(error) => Err(error.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_are_read_from_url_or_socket_forms() {
        let cases = [
            (
                "http://127.0.0.1:8090/readyz",
                Target::Url("http://127.0.0.1:8090/readyz".into()),
            ),
            (
                "unix:/run/klavi/token.sock",
                Target::Unix {
                    socket: "/run/klavi/token.sock".into(),
                    path: "/readyz".into(),
                },
            ),
            (
                "unix:/run/klavi/token.sock:/healthz",
                Target::Unix {
                    socket: "/run/klavi/token.sock".into(),
                    path: "/healthz".into(),
                },
            ),
            (
                "unix:/run/a:b/token.sock:/readyz",
                Target::Unix {
                    socket: "/run/a:b/token.sock".into(),
                    path: "/readyz".into(),
                },
            ),
        ];
        for (text, expected) in cases {
            assert_eq!(Target::parse(text), expected, "{text}");
        }
        assert_eq!(
            Target::parse("unix:/s.sock:/healthz").to_string(),
            "unix:/s.sock:/healthz"
        );
    }

    #[tokio::test]
    async fn a_unix_socket_is_probed() {
        use axum::Router;
        use axum::http::StatusCode;
        use axum::routing::get;

        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("s.sock");
        let listener = tokio::net::UnixListener::bind(&socket).unwrap();
        let router = Router::new()
            .route("/readyz", get(|| async { "ready" }))
            .route(
                "/healthz",
                get(|| async { StatusCode::SERVICE_UNAVAILABLE }),
            );
        let served = tokio::spawn(async move { axum::serve(listener, router).await });
        let probe = |text: String| async move { status(&Target::parse(&text)).await };
        let at = socket.display();
        assert_eq!(probe(format!("unix:{at}")).await, Ok(200));
        assert_eq!(probe(format!("unix:{at}:/healthz")).await, Ok(503));
        served.abort();
        let missing = dir.path().join("missing.sock");
        assert!(probe(format!("unix:{}", missing.display())).await.is_err());
    }
}
