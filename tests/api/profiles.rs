//! Two profiles against two fake Klavis: each served on its own routes,
//! isolated from the other's upstream, with its own readiness and metrics.

use std::time::Duration;

use klavi_token_sidecar::fake_klavi::{FakeKlavi, FakeKlaviConfig, Outcome, Reply};
use reqwest::StatusCode;

use crate::helpers::{HEADER, TestApp, eventually, json, test_config};

/// An app with the default profile on `fake` (300 s tokens) and profile
/// `mgmt` on a second fake with its own keys, primed by `prime_mgmt`.
async fn two_profiles(
    prime_mgmt: impl FnOnce(&FakeKlavi),
    extra: &[(&str, &str)],
) -> (TestApp, FakeKlavi) {
    let mgmt = FakeKlavi::start_local(FakeKlaviConfig {
        token_ttl: Duration::from_secs(300),
        access_key: "mgmt-access-key".into(),
        secret_key: "mgmt-secret-key".into(),
        ..FakeKlaviConfig::default()
    })
    .await
    .unwrap();
    prime_mgmt(&mgmt);
    let product = FakeKlavi::start_local(FakeKlaviConfig {
        token_ttl: Duration::from_secs(300),
        ..FakeKlaviConfig::default()
    })
    .await
    .unwrap();
    let mgmt_url = mgmt.base_url();
    let mut env = vec![
        ("KLAVI_SIDECAR_PROFILES__MGMT__BASE_URL", mgmt_url.as_str()),
        (
            "KLAVI_SIDECAR_PROFILES__MGMT__ACCESS_KEY",
            "mgmt-access-key",
        ),
        (
            "KLAVI_SIDECAR_PROFILES__MGMT__SECRET_KEY",
            "mgmt-secret-key",
        ),
        ("KLAVI_SIDECAR_REFRESH__WAIT_MS", "500"),
    ];
    env.extend_from_slice(extra);
    let config = test_config(&product.base_url(), &env);
    (TestApp::spawn_config(product, config).await, mgmt)
}

async fn get(app: &TestApp, path: &str) -> reqwest::Response {
    app.http
        .get(app.url(path))
        .header(HEADER.0, HEADER.1)
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn each_profile_is_served_on_its_routes_from_its_own_klavi() {
    let (app, mgmt) = two_profiles(|_| {}, &[]).await;
    let product = json(get(&app, "/token").await).await;
    let named_default = json(get(&app, "/profiles/default/token").await).await;
    let management = json(get(&app, "/profiles/mgmt/token").await).await;
    assert_eq!(
        Some(product["accessToken"].as_str().unwrap().to_string()),
        app.fake.last_token()
    );
    assert_eq!(product["accessToken"], named_default["accessToken"]);
    assert_eq!(
        Some(management["accessToken"].as_str().unwrap().to_string()),
        mgmt.last_token()
    );
    assert_ne!(product["accessToken"], management["accessToken"]);
    // Each Klavi saw its own keys, once.
    let body: serde_json::Value =
        serde_json::from_slice(&mgmt.last_request().unwrap().body).unwrap();
    assert_eq!(body["accessKey"], "mgmt-access-key");
    assert_eq!((app.fake.calls(), mgmt.calls()), (1, 1));
    // Forced refreshes and min_ttl per profile.
    let response = app
        .http
        .post(app.url("/profiles/mgmt/token/refresh"))
        .header(HEADER.0, HEADER.1)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        get(&app, "/profiles/mgmt/token?min_ttl=100").await.status(),
        StatusCode::OK
    );
    // Unknown profiles: 404 unknown_profile, on every route; a name is
    // never percent-encoded, so an encoded one is none (second review: it
    // was served under profile "" or answered 400 in plain text).
    for path in [
        "/profiles/nope/token",
        "/profiles/MGMT/token",
        "/profiles/nope/token/refresh",
        "/profiles/%6dgmt/token",
        "/profiles/%6dgmt/token/refresh",
        "/profiles/%FF/token",
        "/profiles//token",
    ] {
        let response = if path.ends_with("refresh") {
            app.http
                .post(app.url(path))
                .header(HEADER.0, HEADER.1)
                .send()
                .await
                .unwrap()
        } else {
            get(&app, path).await
        };
        assert_eq!(response.status(), StatusCode::NOT_FOUND, "{path}");
        assert_eq!(json(response).await["error"], "unknown_profile");
    }
    // The guard holds for every profile's routes.
    let response = app
        .http
        .get(app.url("/profiles/mgmt/token"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    // Readiness lists both.
    let (status, body) = app.readyz().await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["profiles"]["default"]["status"], "ready");
    assert_eq!(body["profiles"]["mgmt"]["status"], "ready");
    assert_eq!(body["profiles"]["mgmt"]["required"], true);
    assert!(body["expiresIn"].as_u64().unwrap() > 200);
    mgmt.stop().await;
    app.stop().await;
}

/// A profile whose Klavi hangs, rejects its keys or storms 429s delays
/// nothing of another profile: not its token, its forced refresh, nor its
/// readiness entry.
#[tokio::test]
async fn a_broken_profile_never_delays_another() {
    let mut runs = tokio::task::JoinSet::new();
    for broken in [
        Outcome::from(Reply::Hang),
        Outcome::status(401),
        Outcome::status_retry_after(429, "0"),
    ] {
        runs.spawn(broken_neighbour(broken));
    }
    runs.join_all().await;
}

async fn broken_neighbour(broken: Outcome) {
    let (app, mgmt) = two_profiles(
        |fake| fake.set_default(broken.clone()),
        &[("KLAVI_SIDECAR_REFRESH__MIN_INTERVAL_SECS", "1")],
    )
    .await;
    assert_eq!(get(&app, "/token").await.status(), StatusCode::OK);
    // Meanwhile the broken profile's own requests wait or fail.
    let (http, url) = (app.http.clone(), app.url("/profiles/mgmt/token"));
    let stuck = tokio::spawn(async move {
        http.get(url)
            .header(HEADER.0, HEADER.1)
            .send()
            .await
            .map(|r| r.status())
    });
    let mut worst = Duration::ZERO;
    for _ in 0..10 {
        let started = tokio::time::Instant::now();
        assert_eq!(
            get(&app, "/token").await.status(),
            StatusCode::OK,
            "{broken:?}"
        );
        worst = worst.max(started.elapsed());
    }
    // A forced refresh of the default profile calls its Klavi at once.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let started = tokio::time::Instant::now();
    let response = app
        .http
        .post(app.url("/token/refresh"))
        .header(HEADER.0, HEADER.1)
        .send()
        .await
        .unwrap();
    worst = worst.max(started.elapsed());
    assert_eq!(response.status(), StatusCode::OK, "{broken:?}");
    assert_eq!(app.fake.calls(), 2, "{broken:?}");
    assert!(
        worst < Duration::from_millis(300),
        "{broken:?}: default took {worst:?}"
    );
    let status = stuck.await.unwrap().unwrap();
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{broken:?}");
    // Readiness: the broken required profile holds the pod back, and says
    // so; the default profile's entry is ready.
    let (status, body) = app.readyz().await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["profiles"]["default"]["status"], "ready");
    assert_eq!(body["profiles"]["mgmt"]["status"], "not_ready");
    assert_eq!(body["profiles"]["mgmt"]["reason"], "no_token_yet");
    assert_eq!(body["expiresIn"].as_u64().map(|s| s > 200), Some(true));
    assert!(mgmt.max_in_flight() <= 1);
    mgmt.stop().await;
    app.stop().await;
}

#[tokio::test]
async fn a_profile_that_is_not_required_does_not_hold_readiness() {
    let (app, mgmt) = two_profiles(
        |fake| fake.set_default(Outcome::status(401)),
        &[("KLAVI_SIDECAR_PROFILES__MGMT__REQUIRED", "false")],
    )
    .await;
    eventually(Duration::from_secs(5), "ready", || async {
        app.readyz().await.0 == 200
    })
    .await;
    let (_, body) = app.readyz().await;
    assert_eq!(body["status"], "ready");
    assert_eq!(body["profiles"]["mgmt"]["status"], "not_ready");
    assert_eq!(body["profiles"]["mgmt"]["required"], false);
    assert_eq!(
        body["profiles"]["mgmt"]["lastError"],
        "credentials_rejected"
    );
    mgmt.stop().await;
    app.stop().await;
}

#[tokio::test]
async fn metrics_say_which_profile() {
    let (app, mgmt) = two_profiles(|fake| fake.push([Outcome::status(503)]), &[]).await;
    assert_eq!(get(&app, "/token").await.status(), StatusCode::OK);
    // The first mgmt fetch fails (503), the retry after the floor succeeds.
    eventually(Duration::from_secs(5), "mgmt token", || async {
        get(&app, "/profiles/mgmt/token").await.status() == StatusCode::OK
    })
    .await;
    for _ in 0..3 {
        get(&app, "/profiles/mgmt/token").await;
        get(&app, "/token").await;
    }
    get(&app, "/profiles/nope/token").await;
    let text = app.metrics_text().await;
    let value = |series: &str| -> f64 {
        text.lines()
            .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{series} not in {text}"))
    };
    assert_eq!(
        value(
            r#"klavi_sidecar_refresh_total{profile="mgmt",result="failure",category="upstream_unavailable"}"#
        ),
        1.0
    );
    assert_eq!(
        value(
            r#"klavi_sidecar_refresh_total{profile="default",result="failure",category="upstream_unavailable"}"#
        ),
        0.0
    );
    assert_eq!(
        value(r#"klavi_sidecar_refresh_total{profile="mgmt",result="success",category="none"}"#),
        1.0
    );
    assert!(
        value(
            r#"klavi_sidecar_token_requests_total{profile="default",route="/token",status="200"}"#
        ) >= 4.0
    );
    assert!(
        value(
            r#"klavi_sidecar_token_requests_total{profile="mgmt",route="/profiles/{name}/token",status="200"}"#
        ) >= 4.0
    );
    assert_eq!(
        value(
            r#"klavi_sidecar_token_requests_total{profile="",route="/profiles/{name}/token",status="404"}"#
        ),
        1.0,
        "an unknown profile is no label value"
    );
    assert_eq!(value(r#"klavi_sidecar_ready{profile="mgmt"}"#), 1.0);
    assert!(!text.contains("nope"), "raw names never become labels");
    // A named profile is never served on /token: no series says so.
    assert!(
        !text.contains(r#"profile="mgmt",route="/token""#),
        "a series that can never move"
    );
    mgmt.stop().await;
    app.stop().await;
}

#[tokio::test]
async fn without_keys_in_klavi_the_token_routes_are_404_and_profiles_serve() {
    let mgmt = FakeKlavi::start_local(FakeKlaviConfig::default())
        .await
        .unwrap();
    let url = mgmt.base_url();
    let env: Vec<(String, String)> = [
        ("KLAVI_SIDECAR_SERVER__LISTEN", "127.0.0.1:0"),
        ("KLAVI_SIDECAR_SERVER__OPS_LISTEN", "127.0.0.1:0"),
        ("KLAVI_SIDECAR_PROFILES__ONLY__BASE_URL", url.as_str()),
        (
            "KLAVI_SIDECAR_PROFILES__ONLY__ACCESS_KEY",
            "demo-access-key",
        ),
        (
            "KLAVI_SIDECAR_PROFILES__ONLY__SECRET_KEY",
            "demo-secret-key",
        ),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let config = klavi_token_sidecar::config::load(&klavi_token_sidecar::config::Sources {
        env,
        ..Default::default()
    })
    .unwrap();
    let other = FakeKlavi::start_local(FakeKlaviConfig::default())
        .await
        .unwrap();
    let app = TestApp::spawn_config(other, config).await;
    for _ in 0..2 {
        let response = get(&app, "/token").await;
        assert_eq!(response.status(), StatusCode::NOT_FOUND);
        assert_eq!(json(response).await["error"], "unknown_profile");
    }
    assert_eq!(
        get(&app, "/profiles/only/token").await.status(),
        StatusCode::OK
    );
    let (status, body) = app.readyz().await;
    assert_eq!(status, 200);
    assert!(
        body.get("expiresIn").is_none(),
        "no default profile: {body}"
    );
    assert_eq!(body["profiles"]["only"]["status"], "ready");
    assert_eq!(app.fake.calls(), 0);
    mgmt.stop().await;
    app.stop().await;
}
