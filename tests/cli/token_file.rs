//! The token file (SPEC §4.4) and `init`, against the binary: written on
//! every new token, never an older or rejected one, retried and reported
//! when it cannot be written, removed on a clean stop; `init` leaves the
//! files and exits, within the backoff floor and the auth budget.

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;

use klavi_token_sidecar::fake_klavi::{FakeKlavi, FakeKlaviConfig};

use super::sidecar::{HEADER, Sidecar, metric_in};
use super::*;

/// Polls `check` every 20 ms for up to 10 s.
async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !check() {
        assert!(Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn read(path: &Path) -> Option<String> {
    std::fs::read_to_string(path).ok()
}

async fn fake() -> FakeKlavi {
    klavi_token_sidecar::upstream::klavi::install_crypto_provider();
    FakeKlavi::start_local(FakeKlaviConfig::default())
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_file_follows_the_token_and_is_removed_on_a_clean_stop() {
    let fake = fake().await;
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("token");
    let json = dir.path().join("mgmt.json");
    let (raw_text, json_text) = (raw.display().to_string(), json.display().to_string());
    let app = Sidecar::start(
        &fake,
        &[
            ("KLAVI_SIDECAR_KLAVI__TOKEN_FILE", &raw_text),
            ("KLAVI_SIDECAR_KLAVI__TOKEN_FILE_MODE", "0600"),
            (
                "KLAVI_SIDECAR_PROFILES__MGMT__ACCESS_KEY",
                "demo-access-key",
            ),
            (
                "KLAVI_SIDECAR_PROFILES__MGMT__SECRET_KEY",
                "demo-secret-key",
            ),
            ("KLAVI_SIDECAR_PROFILES__MGMT__TOKEN_FILE", &json_text),
            ("KLAVI_SIDECAR_PROFILES__MGMT__TOKEN_FILE_FORMAT", "json"),
        ],
    )
    .await;
    // Ready means written: the files are there at once.
    let token = app.token().await;
    assert_eq!(read(&raw), Some(format!("{token}\n")));
    let mode = std::fs::metadata(&raw).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let (status, mgmt) = app.call(false, "/profiles/mgmt/token", None).await;
    assert_eq!(status, 200);
    let written: serde_json::Value = serde_json::from_str(&read(&json).unwrap()).unwrap();
    assert_eq!(written["accessToken"], mgmt["accessToken"]);
    assert_eq!(written["tokenType"], "Bearer");
    assert_eq!(written["expireAt"], mgmt["expireAt"]);
    let mode = std::fs::metadata(&json).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o640, "the default mode");

    // Rejected: the file never holds it again, and gets its replacement.
    let calls = fake.calls();
    let (status, _) = app
        .call(
            true,
            "/token/refresh",
            Some(format!(r#"{{"rejectedToken":"{token}"}}"#)),
        )
        .await;
    assert_eq!(status, 200);
    let renewed = app.token().await;
    assert_ne!(renewed, token);
    eventually("the file holds the new token", || {
        read(&raw) == Some(format!("{renewed}\n"))
    })
    .await;
    assert_eq!(fake.calls(), calls + 1, "one fetch for the replacement");
    assert_eq!(
        app.metric("klavi_sidecar_token_file_writes_total{profile=\"default\",result=\"success\"}")
            .await,
        2.0
    );

    let log = app.stop();
    assert!(log.contains("token file written"), "{log}");
    assert!(!raw.exists(), "removed on a clean stop");
    assert!(!json.exists(), "removed on a clean stop");
    // No temporary file left beside them.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_that_cannot_be_written_is_retried_and_makes_the_profile_unready() {
    let fake = fake().await;
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("later");
    let path = missing.join("token");
    let path_text = path.display().to_string();
    let ops = format!("127.0.0.1:{}", free_port());
    let token = format!("127.0.0.1:{}", free_port());
    let base = fake.base_url();
    let process = Captured::spawn(sidecar(
        &["run", "--listen", &token, "--ops-listen", &ops],
        &[
            ("KLAVI_ACCESS_KEY", "demo-access-key"),
            ("KLAVI_SECRET_KEY", "demo-secret-key"),
            ("KLAVI_SIDECAR_KLAVI__BASE_URL", &base),
            ("KLAVI_SIDECAR_KLAVI__TOKEN_FILE", &path_text),
            ("KLAVI_SIDECAR_REFRESH__BACKOFF_MAX_SECS", "1"),
            ("RUST_LOG", "info"),
        ],
    ));
    let http = reqwest::Client::new();
    let readyz = || async {
        let response = http.get(format!("http://{ops}/readyz")).send().await.ok()?;
        let status = response.status().as_u16();
        Some((status, response.json::<serde_json::Value>().await.ok()?))
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some((503, body)) = readyz().await
            && body["reason"] == "token_file_write_failed"
        {
            assert_eq!(
                body["profiles"]["default"]["reason"],
                "token_file_write_failed"
            );
            break;
        }
        assert!(Instant::now() < deadline, "never reported unready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The token itself is still served: only the file is missing.
    let answer = http
        .get(format!("http://{token}/token"))
        .header(HEADER.0, HEADER.1)
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    // Retries write; they never fetch.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(fake.calls(), 1, "a failing write calls Klavi no more");
    std::fs::create_dir(&missing).unwrap();
    eventually("the retry writes the file", || path.exists()).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while readyz().await.map(|(s, _)| s) != Some(200) {
        assert!(Instant::now() < deadline, "never ready after the write");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let metrics = http
        .get(format!("http://{ops}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let failures = metric_in(
        &metrics,
        "klavi_sidecar_token_file_writes_total{profile=\"default\",result=\"failure\"}",
    );
    assert!(failures >= 2.0, "{failures}");
    let log = process.stop();
    assert!(
        log.contains("cannot write the token file; retrying"),
        "{log}"
    );
    assert!(!path.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_writes_every_file_and_leaves_them() {
    let fake = fake().await;
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("token");
    let json = dir.path().join("payments.json");
    let (raw_text, json_text) = (raw.display().to_string(), json.display().to_string());
    let base = fake.base_url();
    let env = [
        ("KLAVI_ACCESS_KEY", "demo-access-key"),
        ("KLAVI_SECRET_KEY", "demo-secret-key"),
        ("KLAVI_SIDECAR_KLAVI__BASE_URL", base.as_str()),
        ("KLAVI_SIDECAR_KLAVI__TOKEN_FILE", raw_text.as_str()),
        ("KLAVI_SIDECAR_PROFILES__PAY__ACCESS_KEY", "demo-access-key"),
        ("KLAVI_SIDECAR_PROFILES__PAY__SECRET_KEY", "demo-secret-key"),
        (
            "KLAVI_SIDECAR_PROFILES__PAY__TOKEN_FILE",
            json_text.as_str(),
        ),
        ("KLAVI_SIDECAR_PROFILES__PAY__TOKEN_FILE_FORMAT", "json"),
        // Without a file: init does not fetch for it.
        (
            "KLAVI_SIDECAR_PROFILES__OTHER__ACCESS_KEY",
            "demo-access-key",
        ),
        (
            "KLAVI_SIDECAR_PROFILES__OTHER__SECRET_KEY",
            "demo-secret-key",
        ),
    ];
    // Blocks this worker; the fake answers on the other.
    let output = run(&["init", "--timeout", "10"], &env);
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    assert_eq!(fake.calls(), 2, "one auth request per file");
    let token = read(&raw).unwrap();
    assert!(token.ends_with('\n') && token.len() > 1, "{token:?}");
    let pay: serde_json::Value = serde_json::from_str(&read(&json).unwrap()).unwrap();
    assert!(pay["accessToken"].as_str().is_some_and(|t| !t.is_empty()));
    // The tokens work against Klavi.
    let answer = reqwest::Client::new()
        .get(format!("{base}/payment/customer/v1/payments"))
        .bearer_auth(token.trim_end())
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_that_cannot_get_a_token_exits_1_within_the_backoff_floor() {
    let fake = fake().await;
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("token");
    let raw_text = raw.display().to_string();
    let base = fake.base_url();
    let env = [
        ("KLAVI_ACCESS_KEY", "wrong-access-key"),
        ("KLAVI_SECRET_KEY", "wrong-secret-key"),
        ("KLAVI_SIDECAR_KLAVI__BASE_URL", base.as_str()),
        ("KLAVI_SIDECAR_KLAVI__TOKEN_FILE", raw_text.as_str()),
    ];
    let started = Instant::now();
    let output = run(&["init", "--timeout", "2"], &env);
    let took = started.elapsed();
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    let errors = error_lines(&stderr);
    assert_eq!(errors.len(), 1, "{stderr}");
    assert!(
        errors[0].contains("init: not every token file was written within 2 s")
            && errors[0].contains("profile default: the last auth request failed"),
        "{stderr}"
    );
    assert!(!stderr.contains("wrong-secret-key"), "{stderr}");
    assert!(took < Duration::from_secs(8), "{took:?}");
    // 2 s with a 500 ms floor between attempts: at most 5 requests.
    let calls = fake.calls();
    assert!((1..=5).contains(&calls), "{calls} auth requests");
    assert!(!raw.exists());

    // Nothing to do is a configuration error.
    let output = run(&["init"], &KEYS);
    assert_eq!(output.status.code(), Some(2), "{}", text(&output.stderr));
    assert!(text(&output.stderr).contains("klavi.token_file"));
    let output = run(&["init", "--timeout", "0"], &KEYS);
    assert_eq!(output.status.code(), Some(2), "{}", text(&output.stderr));
}
