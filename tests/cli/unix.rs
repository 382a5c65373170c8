//! The token API and a proxy on unix sockets (SPEC §4.4): created with
//! `server.socket_mode`, a stale socket replaced, anything else at the
//! path refused, the peer's credentials in the access log, the files
//! removed on exit.

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;

use klavi_token_sidecar::fake_klavi::{FakeKlavi, FakeKlaviConfig};

use super::sidecar::HEADER;
use super::*;

/// A client whose every connection goes to the socket at `path`.
pub fn unix_client(path: &Path) -> reqwest::Client {
    klavi_token_sidecar::upstream::klavi::install_crypto_provider();
    reqwest::Client::builder()
        .unix_socket(path)
        .build()
        .unwrap()
}

fn mode_of(path: &Path) -> u32 {
    std::fs::symlink_metadata(path)
        .unwrap()
        .permissions()
        .mode()
        & 0o777
}

/// `healthcheck --url unix:SOCKET:/readyz` until it exits 0.
fn wait_ready_on(socket: &Path) {
    let url = format!("unix:{}:/readyz", socket.display());
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let output = run(&["healthcheck", "--url", &url], &[]);
        if output.status.success() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "not ready: {}",
            text(&output.stderr)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

// Multi-threaded: the fake Klavi answers while this thread blocks on
// the binary's healthcheck.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_api_and_a_proxy_serve_on_unix_sockets() {
    let fake = FakeKlavi::start_local(FakeKlaviConfig::default())
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let token_socket = dir.path().join("token.sock");
    let proxy_socket = dir.path().join("proxy.sock");
    // A socket left by a sidecar that was killed: replaced.
    drop(std::os::unix::net::UnixListener::bind(&token_socket).unwrap());
    let listen = format!("unix:{}", token_socket.display());
    let proxy_listen = format!("unix:{}", proxy_socket.display());
    let ops = format!("127.0.0.1:{}", free_port());
    let base = fake.base_url();
    let process = Captured::spawn(sidecar(
        &["run", "--listen", &listen, "--ops-listen", &ops],
        &[
            ("KLAVI_ACCESS_KEY", "demo-access-key"),
            ("KLAVI_SECRET_KEY", "demo-secret-key"),
            ("KLAVI_SIDECAR_KLAVI__BASE_URL", &base),
            ("KLAVI_SIDECAR_KLAVI__PROXY_LISTEN", &proxy_listen),
            ("KLAVI_SIDECAR_SERVER__SOCKET_MODE", "0600"),
            ("RUST_LOG", "info"),
        ],
    ));
    wait_ready_on(&token_socket);
    assert_eq!(mode_of(&token_socket), 0o600);
    assert_eq!(mode_of(&proxy_socket), 0o600);

    // The token: no Host check on a socket (no browser page reaches it by
    // a rebinding name), the header still required.
    let client = unix_client(&token_socket);
    let answer = client
        .get("http://rebinding.example/token")
        .header(HEADER.0, HEADER.1)
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    let body: serde_json::Value = answer.json().await.unwrap();
    assert!(body["accessToken"].as_str().is_some_and(|t| !t.is_empty()));
    let bare = client.get("http://localhost/token").send().await.unwrap();
    assert_eq!(bare.status(), 403);

    // The proxy over its socket, with the peer's credentials logged.
    let proxied = unix_client(&proxy_socket)
        .post("http://localhost/payment/customer/v1/payments")
        .header(HEADER.0, HEADER.1)
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(proxied.status(), 200);
    let echoed: serde_json::Value = proxied.json().await.unwrap();
    assert_eq!(echoed["bearerValid"], true, "{echoed}");

    // With the ops listener off, healthcheck finds the socket itself.
    let output = run(
        &["healthcheck"],
        &[
            ("KLAVI_SIDECAR_SERVER__LISTEN", &listen),
            ("KLAVI_SIDECAR_SERVER__OPS_LISTEN", ""),
        ],
    );
    assert!(output.status.success(), "{}", text(&output.stderr));

    let log = process.stop();
    let me = std::process::id();
    let line = log
        .lines()
        .find(|l| l.contains("proxied"))
        .unwrap_or_else(|| panic!("no access line in {log}"));
    assert!(line.contains(&format!("peer=pid:{me},uid:")), "{line}");
    assert!(log.contains(&format!("token_listener={listen}")), "{log}");
    assert!(
        !token_socket.exists(),
        "the token socket is removed on exit"
    );
    assert!(
        !proxy_socket.exists(),
        "the proxy socket is removed on exit"
    );
}

#[test]
fn a_socket_path_held_by_something_else_is_refused_and_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    // A regular file: a configuration error (exit 2), the file untouched.
    let file = dir.path().join("token.sock");
    std::fs::write(&file, b"not a socket").unwrap();
    let listen = format!("unix:{}", file.display());
    let output = run(&["run", "--listen", &listen, "--ops-listen", ""], &KEYS);
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("server.listen"), "{stderr}");
    assert!(stderr.contains("is not a socket"), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert_eq!(std::fs::read(&file).unwrap(), b"not a socket");

    // A socket someone listens on: exit 1, and it keeps working.
    let live = dir.path().join("live.sock");
    let holder = std::os::unix::net::UnixListener::bind(&live).unwrap();
    let listen = format!("unix:{}", live.display());
    let output = run(&["run", "--listen", &listen, "--ops-listen", ""], &KEYS);
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("another process is listening"), "{stderr}");
    assert!(std::os::unix::net::UnixStream::connect(&live).is_ok());
    drop(holder);

    // A directory that does not exist: exit 1, naming the path.
    let missing = dir.path().join("missing").join("token.sock");
    let listen = format!("unix:{}", missing.display());
    let output = run(&["run", "--listen", &listen, "--ops-listen", ""], &KEYS);
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("missing/token.sock"), "{stderr}");
}
