//! Readiness, cold start, the guarantees of SPEC section 5 that show
//! in-process, shutdown and key rotation.

use std::time::Duration;

use klavi_token_sidecar::fake_klavi::{FakeKlavi, FakeKlaviConfig, Outcome, Reply};
use reqwest::StatusCode;

use crate::helpers::{HEADER, TestApp, concurrent, eventually, json, test_config};

#[tokio::test]
async fn healthz_answers_at_once_and_readyz_follows_the_token() {
    let app = TestApp::spawn_with(
        FakeKlaviConfig::default(),
        |fake| fake.push([Outcome::token().after(Duration::from_millis(1500))]),
        &[],
    )
    .await;
    // The first fetch is still in flight.
    let response = app.http.get(app.ops_url("/healthz")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let (status, body) = app.readyz().await;
    assert_eq!(status, 503);
    assert_eq!(
        body,
        serde_json::json!({"status": "not_ready", "reason": "no_token_yet", "lastError": null,
            "profiles": {"default": {"status": "not_ready", "reason": "no_token_yet",
                "lastError": null, "required": true}}})
    );
    eventually(Duration::from_secs(5), "ready", || async {
        app.readyz().await.0 == 200
    })
    .await;
    assert_eq!(app.fake.calls(), 1);
    app.stop().await;
}

#[tokio::test]
async fn cold_start_burst_of_a_thousand_requests_makes_one_upstream_call() {
    let app = TestApp::spawn_with(
        FakeKlaviConfig::default(),
        |fake| fake.push([Outcome::token().after(Duration::from_millis(700))]),
        &[],
    )
    .await;
    let responses = concurrent(1000, || {
        let (http, url) = (app.http.clone(), app.url("/token"));
        async move {
            let response = http
                .get(url)
                .header(HEADER.0, HEADER.1)
                .send()
                .await
                .unwrap();
            (
                response.status(),
                response.json::<serde_json::Value>().await.unwrap(),
            )
        }
    })
    .await;
    let token = app.fake.last_token().unwrap();
    for (status, body) in responses {
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["accessToken"], token.as_str());
    }
    assert_eq!(app.fake.calls(), 1);
    app.stop().await;
}

#[tokio::test]
async fn without_a_token_requests_wait_then_get_503_with_the_last_error() {
    let app = TestApp::spawn_with(
        FakeKlaviConfig::default(),
        |fake| fake.set_default(Outcome::status(500)),
        &[("KLAVI_SIDECAR_REFRESH__WAIT_MS", "300")],
    )
    .await;
    eventually(Duration::from_secs(5), "first failure", || async {
        app.readyz().await.1["lastError"] == "upstream_unavailable"
    })
    .await;
    let (status, body) = app.readyz().await;
    assert_eq!(status, 503);
    assert_eq!(body["reason"], "no_token_yet");
    let response = app.get_token("").await;
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(response.headers()["cache-control"], "no-store");
    let retry_after: u64 = response.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=30).contains(&retry_after));
    let body = json(response).await;
    assert_eq!(body["error"], "token_unavailable");
    assert_eq!(body["lastError"], "upstream_unavailable");
    assert!(
        body["message"].as_str().unwrap().contains("failed"),
        "{body}"
    );
    // Klavi recovers: ready within backoff_max + 1 s.
    app.fake.set_default(Outcome::token());
    eventually(Duration::from_secs(31), "ready after recovery", || async {
        app.readyz().await.0 == 200
    })
    .await;
    assert_eq!(app.get_token("").await.status(), StatusCode::OK);
    app.stop().await;
}

/// Defect: a 503 said "the last attempt failed" when no attempt had
/// failed (the first fetch was simply slow). The message now says what
/// happened.
#[tokio::test]
async fn a_503_names_a_failure_only_when_there_was_one() {
    let app = TestApp::spawn_with(
        FakeKlaviConfig::default(),
        |fake| fake.set_default(Outcome::from(Reply::Hang)),
        &[("KLAVI_SIDECAR_REFRESH__WAIT_MS", "300")],
    )
    .await;
    let response = app.get_token("").await;
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body = json(response).await;
    assert!(body["lastError"].is_null(), "{body}");
    let message = body["message"].as_str().unwrap();
    assert!(!message.contains("failed"), "{message}");
    assert!(message.contains("did not finish"), "{message}");
    app.stop().await;
}

#[tokio::test]
async fn a_held_token_is_served_whatever_klavi_does_and_never_below_the_margin() {
    // 8 s tokens, 5 s margin: servable for 3 s, refresh due at once... then
    // Klavi breaks in every way; the token is served until its margin, then
    // readiness says token_expired.
    let app = TestApp::spawn_with(
        FakeKlaviConfig {
            token_ttl: Duration::from_secs(8),
            ..FakeKlaviConfig::default()
        },
        |fake| {
            fake.push([Outcome::token()]);
            fake.set_default(Outcome::status(500));
        },
        &[("KLAVI_SIDECAR_REFRESH__WAIT_MS", "100")],
    )
    .await;
    eventually(Duration::from_secs(5), "ready", || async {
        app.readyz().await.0 == 200
    })
    .await;
    app.fake.push([
        Outcome::from(Reply::Reset),
        Outcome::body("garbage"),
        Outcome::status(503),
        Outcome::from(Reply::Hang),
    ]);
    let mut served = 0;
    loop {
        let response = app.get_token("").await;
        if response.status() != StatusCode::OK {
            assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
            break;
        }
        let body = json(response).await;
        assert!(
            body["expiresIn"].as_u64().unwrap() >= 5,
            "served below the margin: {body}"
        );
        served += 1;
        assert!(served < 1000, "bounded");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(served > 10);
    let (status, body) = app.readyz().await;
    assert_eq!(status, 503);
    assert_eq!(body["reason"], "token_expired");
    app.stop().await;
}

#[tokio::test]
async fn shutdown_lets_requests_in_flight_finish_then_stops_everything() {
    let app = TestApp::spawn_with(
        FakeKlaviConfig::default(),
        |fake| fake.push([Outcome::token().after(Duration::from_millis(1000))]),
        &[],
    )
    .await;
    let (http, url) = (app.http.clone(), app.url("/token"));
    let waiting =
        tokio::spawn(async move { http.get(url).header(HEADER.0, HEADER.1).send().await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    app.shutdown.cancel();
    let response = waiting.await.unwrap().unwrap();
    assert_eq!(
        response.status(),
        StatusCode::OK,
        "the in-flight request finished"
    );
    let token_url = app.url("/token");
    let http = app.http.clone();
    tokio::time::timeout(Duration::from_secs(11), app.task)
        .await
        .expect("stopped within the grace")
        .unwrap();
    assert!(
        http.get(token_url).send().await.is_err(),
        "no longer accepting"
    );
    app.fake.stop().await;
}

/// Defect: a grace shorter than refresh.wait_ms was accepted, and a
/// request waiting for a token at shutdown was cut without an answer. The
/// grace must now exceed the wait, so the waiting request is answered
/// (503, Klavi hangs) and the process still stops within the grace.
#[tokio::test]
async fn a_request_waiting_at_shutdown_is_answered_within_the_grace() {
    let app = TestApp::spawn_with(
        FakeKlaviConfig::default(),
        |fake| fake.set_default(Outcome::from(Reply::Hang)),
        &[
            ("KLAVI_SIDECAR_SERVER__SHUTDOWN_GRACE_SECS", "1"),
            ("KLAVI_SIDECAR_REFRESH__WAIT_MS", "500"),
            ("KLAVI_SIDECAR_KLAVI__REQUEST_TIMEOUT_MS", "60000"),
        ],
    )
    .await;
    let (http, url) = (app.http.clone(), app.url("/token"));
    let waiting =
        tokio::spawn(async move { http.get(url).header(HEADER.0, HEADER.1).send().await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = tokio::time::Instant::now();
    app.shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(3), app.task)
        .await
        .expect("stopped within the grace")
        .unwrap();
    assert!(started.elapsed() < Duration::from_millis(2500));
    let response = waiting
        .await
        .unwrap()
        .expect("an answer, not a cut connection");
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    app.fake.stop().await;
}

/// Defect: a 429 or 503 with `Retry-After: 0`, or a date in the past, made
/// the sidecar call Klavi back-to-back (about 900 times a second). Counted
/// at the fake: the floor (500 ms, then the growing backoff) holds.
#[tokio::test]
async fn retry_after_now_in_any_form_cannot_storm_klavi() {
    let mut runs = tokio::task::JoinSet::new();
    for retry_after in ["0", "Thu, 01 Jan 2015 00:00:00 GMT", "-1", "soon"] {
        for status in [429, 503] {
            runs.spawn(async move {
                let app = TestApp::spawn_with(
                    FakeKlaviConfig::default(),
                    |fake| fake.set_default(Outcome::status_retry_after(status, retry_after)),
                    &[],
                )
                .await;
                tokio::time::sleep(Duration::from_millis(1600)).await;
                let calls = app.fake.calls();
                app.stop().await;
                (status, retry_after, calls)
            });
        }
    }
    for (status, retry_after, calls) in runs.join_all().await {
        // Attempts at 0, then waits of at least 0.5 s each: at most 4.
        assert!(
            (1..=4).contains(&calls),
            "{status} Retry-After {retry_after:?}: {calls} calls in 1.6 s"
        );
    }
}

#[tokio::test]
async fn rotated_key_files_are_picked_up_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let access = dir.path().join("access-key");
    let secret = dir.path().join("secret-key");
    std::fs::write(&access, "old-access-key\n").unwrap();
    std::fs::write(&secret, "demo-secret-key\n").unwrap();
    let fake = FakeKlavi::start_local(FakeKlaviConfig::default())
        .await
        .unwrap();
    let access_path = access.display().to_string();
    let secret_path = secret.display().to_string();
    let mut config = test_config(&fake.base_url(), &[]);
    let mut raw = config.raw.clone();
    raw.klavi.access_key = None;
    raw.klavi.secret_key = None;
    raw.klavi.access_key_file = Some(access_path.into());
    raw.klavi.secret_key_file = Some(secret_path.into());
    config = klavi_token_sidecar::config::Config::validate(raw).unwrap();
    let app = TestApp::spawn_config(fake, config).await;

    eventually(Duration::from_secs(5), "credentials rejected", || async {
        app.readyz().await.1["lastError"] == "credentials_rejected"
    })
    .await;
    let calls = app.fake.calls();
    // Kubernetes-style rotation: write a new file and rename it into place.
    let staged = dir.path().join("access-key.new");
    std::fs::write(&staged, "demo-access-key\n").unwrap();
    std::fs::rename(&staged, &access).unwrap();
    // Ready well before backoff_max (30 s): the change triggers a retry.
    eventually(Duration::from_secs(5), "ready with the new key", || async {
        app.readyz().await.0 == 200
    })
    .await;
    assert_eq!(app.fake.calls(), calls + 1);
    app.stop().await;
}

#[tokio::test]
async fn a_burst_beyond_the_connection_cap_loses_no_request() {
    // 300 concurrent requests on fresh connections against a cap of 50,
    // during a cold start: the connections beyond the cap wait for a slot;
    // none is evicted with its request unread.
    let app = TestApp::spawn_with(
        FakeKlaviConfig::default(),
        |fake| fake.push([Outcome::token().after(Duration::from_millis(300))]),
        &[("KLAVI_SIDECAR_SERVER__MAX_CONNECTIONS", "50")],
    )
    .await;
    // Plain sockets that write their request as soon as they connect, as
    // real clients do (an HTTP client library on this test's one thread
    // may take longer than the overflow lane's grace to write).
    let addr = app.token;
    let answers = concurrent(300, || async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
        stream
            .write_all(b"GET /token HTTP/1.1\r\nHost: localhost\r\nKlavi-Sidecar: true\r\nConnection: close\r\n\r\n")
            .await
            .ok()?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await.ok()?;
        Some(response)
    })
    .await;
    for answer in answers {
        let answer = answer.expect("answered, not reset");
        assert!(
            answer.starts_with(b"HTTP/1.1 200"),
            "{}",
            String::from_utf8_lossy(&answer)
        );
    }
    assert_eq!(app.fake.calls(), 1);
    app.stop().await;
}
