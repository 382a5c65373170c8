//! Every route's status codes, bodies and headers (SPEC section 4).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use klavi_token_sidecar::fake_klavi::FakeKlaviConfig;
use reqwest::StatusCode;

use crate::helpers::{HEADER, TestApp, json};

fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

#[tokio::test]
async fn get_token_answers_json_with_no_store() {
    let app = TestApp::spawn().await;
    let response = app.get_token("").await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["cache-control"], "no-store");
    assert_eq!(response.headers()["content-type"], "application/json");
    let body = json(response).await;
    let token = body["accessToken"].as_str().unwrap();
    assert_eq!(Some(token.to_string()), app.fake.last_token());
    assert_eq!(body["tokenType"], "Bearer");
    let expires_in = body["expiresIn"].as_i64().unwrap();
    assert!((295..=300).contains(&expires_in), "{body}");
    let expire_at = body["expireAt"].as_i64().unwrap();
    assert!((expire_at - (now_unix() + expires_in)).abs() <= 2, "{body}");
    assert_eq!(body.as_object().unwrap().len(), 4);
    app.stop().await;
}

#[tokio::test]
async fn accept_text_plain_gets_the_bare_token() {
    let app = TestApp::spawn().await;
    let response = app
        .http
        .get(app.url("/token"))
        .header(HEADER.0, HEADER.1)
        .header("Accept", "text/plain")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["cache-control"], "no-store");
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    assert_eq!(Some(response.text().await.unwrap()), app.fake.last_token());
    // q-values decide, on the hot path as through the router (defect: a
    // refused text/plain listed first was served anyway).
    for (accept, plain) in [
        ("text/plain;q=0, application/json", false),
        ("application/json;q=0.5, text/plain", true),
        ("text/*, text/plain;q=0", false),
        ("*/*", false),
    ] {
        for query in ["", "?min_ttl=1"] {
            let response = app
                .http
                .get(app.url(&format!("/token{query}")))
                .header(HEADER.0, HEADER.1)
                .header("Accept", accept)
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), StatusCode::OK);
            let content_type = response.headers()["content-type"].to_str().unwrap();
            assert_eq!(
                content_type.starts_with("text/plain"),
                plain,
                "{accept} {query}: {content_type}"
            );
        }
    }
    app.stop().await;
}

/// Defect: the Host header was never checked, so a page on a DNS-rebinding
/// domain (resolving to 127.0.0.1) was same-origin with the sidecar and
/// could send the header the guard asks for.
#[tokio::test]
async fn a_rebinding_host_is_refused_and_allowed_hosts_pass() {
    let app = TestApp::spawn_with(
        FakeKlaviConfig::default(),
        |_| {},
        &[("KLAVI_SIDECAR_SERVER__ALLOWED_HOSTS", "sidecar.internal")],
    )
    .await;
    // Twice each: the first GET may go through the router (cold start),
    // later ones through the hot path; both must check.
    let cases = [
        ("evil.example:8089", 403),
        ("127.0.0.1.nip.io", 403),
        ("localhost:8089", 200),
        ("127.0.0.1", 200),
        ("[::1]:8089", 200),
        ("sidecar.internal:8089", 200),
        ("Sidecar.Internal", 200),
        ("evil.example:8089", 403),
    ];
    for round in 0..2 {
        for (host, status) in cases {
            for refresh in [false, true] {
                let request = if refresh {
                    app.http.post(app.url("/token/refresh"))
                } else {
                    app.http.get(app.url("/token"))
                };
                let response = request
                    .header(HEADER.0, HEADER.1)
                    .header("Host", host)
                    .send()
                    .await
                    .unwrap();
                assert_eq!(
                    response.status().as_u16(),
                    status,
                    "round {round} Host {host} refresh {refresh}"
                );
                assert_eq!(response.headers()["cache-control"], "no-store");
                if status == 403 {
                    let body = json(response).await;
                    assert_eq!(body["error"], "host_not_allowed");
                    assert!(body["message"].as_str().unwrap().contains("allowed_hosts"));
                }
            }
        }
    }
    // Probes are not token routes: any Host (kubelet sends the pod IP).
    let response = app
        .http
        .get(app.ops_url("/readyz"))
        .header("Host", "10.1.2.3:8090")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    app.stop().await;
}

#[tokio::test]
async fn token_routes_demand_the_header_and_refuse_proxied_requests() {
    let app = TestApp::spawn().await;
    let cases: Vec<(Vec<(&str, &str)>, u16, Option<&str>)> = vec![
        (vec![], 403, Some("missing_header")),
        (
            vec![("Klavi-Sidecar", "false")],
            403,
            Some("missing_header"),
        ),
        (vec![("Klavi-Sidecar", "")], 403, Some("missing_header")),
        (vec![("Klavi-Sidecar", "TRUE")], 200, None),
        (
            vec![HEADER, ("X-Forwarded-For", "10.0.0.1")],
            403,
            Some("proxied_request"),
        ),
        (
            vec![HEADER, ("Forwarded", "for=10.0.0.1")],
            403,
            Some("proxied_request"),
        ),
        (
            vec![("X-Forwarded-For", "10.0.0.1")],
            403,
            Some("proxied_request"),
        ),
    ];
    for path in ["/token", "/token/refresh"] {
        for (headers, status, code) in &cases {
            let mut request = if path == "/token" {
                app.http.get(app.url(path))
            } else {
                app.http.post(app.url(path))
            };
            for (name, value) in headers {
                request = request.header(*name, *value);
            }
            let response = request.send().await.unwrap();
            assert_eq!(response.status().as_u16(), *status, "{path} {headers:?}");
            assert_eq!(response.headers()["cache-control"], "no-store");
            if let Some(code) = code {
                let body = json(response).await;
                assert_eq!(body["error"], *code);
                let message = body["message"].as_str().unwrap();
                if *code == "missing_header" {
                    assert!(
                        message.contains("Klavi-Sidecar: true"),
                        "says how to fix it: {message}"
                    );
                }
            }
        }
    }
    // Probes need no header.
    let response = app.http.get(app.url("/healthz")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    app.stop().await;
}

#[tokio::test]
async fn the_header_can_be_turned_off() {
    let app = TestApp::spawn_with(
        FakeKlaviConfig::default(),
        |_| {},
        &[("KLAVI_SIDECAR_SERVER__REQUIRE_HEADER", "false")],
    )
    .await;
    let response = app.http.get(app.url("/token")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    // Proxied requests stay refused.
    let response = app
        .http
        .get(app.url("/token"))
        .header("X-Forwarded-For", "1.2.3.4")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    app.stop().await;
}

#[tokio::test]
async fn unknown_paths_are_404_json_and_wrong_methods_405_with_allow() {
    let app = TestApp::spawn().await;
    for url in [
        app.url("/nope"),
        app.url("/token/"),
        app.ops_url("/nope"),
        app.ops_url("/token"),
    ] {
        let response = app
            .http
            .get(&url)
            .header(HEADER.0, HEADER.1)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::NOT_FOUND, "{url}");
        let body = json(response).await;
        assert_eq!(body["error"], "not_found");
        assert!(body["message"].is_string());
    }
    let cases = [
        (reqwest::Method::POST, app.url("/token"), "GET,HEAD"),
        (reqwest::Method::DELETE, app.url("/token"), "GET,HEAD"),
        (reqwest::Method::GET, app.url("/token/refresh"), "POST"),
        (reqwest::Method::POST, app.url("/healthz"), "GET,HEAD"),
        (reqwest::Method::PUT, app.ops_url("/readyz"), "GET,HEAD"),
    ];
    for (method, url, allow) in cases {
        let response = app
            .http
            .request(method.clone(), &url)
            .header(HEADER.0, HEADER.1)
            .send()
            .await
            .unwrap();
        assert_eq!(
            response.status(),
            StatusCode::METHOD_NOT_ALLOWED,
            "{method} {url}"
        );
        assert_eq!(response.headers()["allow"], allow);
        assert_eq!(response.headers()["content-type"], "application/json");
        assert_eq!(json(response).await["error"], "method_not_allowed");
    }
    app.stop().await;
}

#[tokio::test]
async fn the_ops_listener_serves_probes_but_never_the_token() {
    let app = TestApp::spawn().await;
    let response = app.http.get(app.ops_url("/healthz")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(json(response).await, serde_json::json!({"status": "ok"}));
    // Once the first token is in (GET /token waits for it), ready.
    assert_eq!(app.get_token("").await.status(), StatusCode::OK);
    let (status, body) = app.readyz().await;
    assert_eq!(status, 200);
    assert_eq!(body["status"], "ready");
    assert!(body["expiresIn"].as_u64().unwrap() > 290);
    for path in ["/token", "/token/refresh"] {
        let response = app
            .http
            .get(app.ops_url(path))
            .header(HEADER.0, HEADER.1)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::NOT_FOUND);
        let text = response.text().await.unwrap();
        assert!(!text.contains(&app.fake.last_token().unwrap()));
    }
    app.stop().await;
}

#[tokio::test]
async fn probes_report_a_dead_refresh_task_and_an_expired_token() {
    use http_body_util::BodyExt;
    use klavi_token_sidecar::cache::store::TokenStore;
    use klavi_token_sidecar::secret::Secret;
    use klavi_token_sidecar::serve::http::{AppState, ops_router};
    use tower::ServiceExt;

    async fn get(router: axum::Router, path: &str) -> (u16, serde_json::Value) {
        let request = http::Request::get(path)
            .body(axum::body::Body::empty())
            .unwrap();
        let response = router.oneshot(request).await.unwrap();
        let status = response.status().as_u16();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        (status, serde_json::from_slice(&bytes).unwrap())
    }

    // A store whose refresh task never ran (or died).
    let store = std::sync::Arc::new(TokenStore::new(
        Duration::from_secs(5),
        Duration::from_secs(5),
        Duration::from_millis(100),
    ));
    let router = ops_router(AppState::single(store.clone(), Duration::from_millis(100)));
    let (status, body) = get(router.clone(), "/healthz").await;
    assert_eq!(
        (status, body),
        (
            503,
            serde_json::json!({"status": "error", "reason": "refresh_task_stopped",
                "profiles": ["default"]})
        )
    );
    // A token held but within the serve margin: token_expired.
    let token = klavi_token_sidecar::cache::token::Token::new(
        Secret::new("t"),
        tokio::time::Instant::now(),
        Duration::from_secs(4),
        UNIX_EPOCH,
    );
    store.set_token(std::sync::Arc::new(token));
    let (status, body) = get(router, "/readyz").await;
    assert_eq!(status, 503);
    assert_eq!(body["reason"], "token_expired");
}

#[tokio::test]
async fn a_request_over_the_time_limit_gets_408_json() {
    use http_body_util::BodyExt;
    use klavi_token_sidecar::cache::policy::RefreshPolicy;
    use klavi_token_sidecar::cache::refresher::Refresher;
    use klavi_token_sidecar::cache::source::FetchError;
    use klavi_token_sidecar::cache::source::TokenSource;
    use klavi_token_sidecar::cache::store::TokenStore;
    use klavi_token_sidecar::cache::token::Token;
    use klavi_token_sidecar::serve::http::{AppState, token_router};
    use std::sync::Arc;
    use tower::ServiceExt;

    /// Klavi never answers.
    struct Never;
    impl TokenSource for Never {
        async fn fetch(&self) -> Result<Token, FetchError> {
            std::future::pending().await
        }
    }

    let store = Arc::new(TokenStore::new(
        Duration::from_secs(5),
        Duration::from_secs(5),
        Duration::from_secs(5),
    ));
    let stop = tokio_util::sync::CancellationToken::new();
    let task = Refresher::new(Never, store.clone(), RefreshPolicy::default()).spawn(stop.clone());
    let mut state = AppState::single(store, Duration::from_secs(5));
    state.request_timeout = Duration::from_millis(50);
    let router = token_router(state);
    let request = http::Request::get("/token")
        .header("host", "localhost")
        .header(HEADER.0, HEADER.1)
        .body(axum::body::Body::empty())
        .unwrap();
    let response = router.oneshot(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::REQUEST_TIMEOUT);
    assert_eq!(response.headers()["content-type"], "application/json");
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    let body: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(body["error"], "request_timeout");
    stop.cancel();
    task.await.unwrap();
}

#[tokio::test]
async fn the_hot_path_answers_exactly_as_the_router_does() {
    use http_body_util::BodyExt;
    use klavi_token_sidecar::cache::store::TokenStore;
    use klavi_token_sidecar::cache::token::Token;
    use klavi_token_sidecar::secret::Secret;
    use klavi_token_sidecar::serve::http::{AppState, token_router};
    use tower::ServiceExt;

    // The real app answers GET /token on the hot path once a token is held.
    let app = TestApp::spawn().await;
    let _ = app.get_token("").await;
    for accept in ["application/json", "text/plain"] {
        let over_http = app
            .http
            .get(app.url("/token"))
            .header(HEADER.0, HEADER.1)
            .header("Accept", accept)
            .send()
            .await
            .unwrap();
        // The same request through the router (no hot path), same token.
        let store = std::sync::Arc::new(TokenStore::new(
            Duration::from_secs(5),
            Duration::from_secs(5),
            Duration::from_secs(5),
        ));
        let value = app.fake.last_token().unwrap();
        store.set_token(std::sync::Arc::new(Token::new(
            Secret::new(value),
            tokio::time::Instant::now(),
            Duration::from_secs(299),
            SystemTime::now() + Duration::from_secs(299),
        )));
        let routed = token_router(AppState::single(store, Duration::from_secs(5)))
            .oneshot(
                http::Request::get("/token")
                    .header("host", "localhost")
                    .header(HEADER.0, HEADER.1)
                    .header("Accept", accept)
                    .body(axum::body::Body::empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(over_http.status().as_u16(), routed.status().as_u16());
        for name in ["content-type", "cache-control"] {
            assert_eq!(
                over_http.headers()[name].to_str().unwrap(),
                routed.headers()[name].to_str().unwrap(),
                "{name} for {accept}"
            );
        }
        let a = over_http.bytes().await.unwrap();
        let b = routed.into_body().collect().await.unwrap().to_bytes();
        if accept == "text/plain" {
            assert_eq!(a, b);
        } else {
            let (a, b): (serde_json::Value, serde_json::Value) = (
                serde_json::from_slice(&a).unwrap(),
                serde_json::from_slice(&b).unwrap(),
            );
            assert_eq!(a["accessToken"], b["accessToken"]);
            assert_eq!(a["tokenType"], b["tokenType"]);
            assert_eq!(
                a.as_object().unwrap().keys().collect::<Vec<_>>(),
                b.as_object().unwrap().keys().collect::<Vec<_>>()
            );
        }
    }
    app.stop().await;
}
