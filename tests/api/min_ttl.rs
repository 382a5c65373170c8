//! `GET /token?min_ttl=`: validated, met with one fetch when a fresher
//! token can be had, 422 when not, never a storm.

use std::time::Duration;

use klavi_token_sidecar::fake_klavi::{FakeKlaviConfig, Outcome};
use reqwest::StatusCode;

use crate::helpers::{TestApp, json};

#[tokio::test]
async fn min_ttl_is_validated_and_served() {
    let app = TestApp::spawn().await;
    for bad in ["-1", "1.5", "abc", "", "%2B5"] {
        let response = app.get_token(&format!("?min_ttl={bad}")).await;
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{bad}");
        assert_eq!(response.headers()["cache-control"], "no-store");
        assert_eq!(json(response).await["error"], "invalid_min_ttl");
    }
    let response = app.get_token("?min_ttl=0").await;
    assert_eq!(response.status(), StatusCode::OK);
    let response = app.get_token("?min_ttl=200").await;
    assert_eq!(response.status(), StatusCode::OK);
    assert!(json(response).await["expiresIn"].as_u64().unwrap() >= 200);
    assert_eq!(app.fake.calls(), 1, "enough time left: no refresh");
    // More than the token fetched within min_interval has: 422 with what
    // can be had, at once and without a fetch.
    let response = app.get_token("?min_ttl=3600").await;
    assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(response.headers()["cache-control"], "no-store");
    assert!(!response.headers().contains_key("retry-after"));
    let body = json(response).await;
    assert_eq!(body["error"], "min_ttl_unsatisfiable");
    let max_ttl = body["maxTtl"].as_u64().unwrap();
    assert!((295..=300).contains(&max_ttl), "{body}");
    assert!(body["message"].as_str().unwrap().contains("min_ttl"));
    assert_eq!(app.fake.calls(), 1);
    // Asking for what maxTtl said is served.
    let response = app.get_token(&format!("?min_ttl={}", max_ttl - 1)).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(app.fake.calls(), 1);
    app.stop().await;
}

#[tokio::test]
async fn min_ttl_refreshes_a_token_with_too_little_left() {
    // 300 s tokens; after 2.1 s fewer than 298 s remain, so min_ttl=298
    // needs a refresh (min_interval, 1 s here, has passed).
    let app = TestApp::spawn_env(&[("KLAVI_SIDECAR_REFRESH__MIN_INTERVAL_SECS", "1")]).await;
    let first = json(app.get_token("").await).await;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let response = app.get_token("?min_ttl=298").await;
    assert_eq!(response.status(), StatusCode::OK);
    let body = json(response).await;
    assert!(body["expiresIn"].as_u64().unwrap() >= 298, "{body}");
    assert_ne!(body["accessToken"], first["accessToken"]);
    assert_eq!(app.fake.calls(), 2);
    app.stop().await;
}

/// Defect: an app polling a min_ttl close to the token lifetime held
/// requests waiting for min_interval to pass, then fetched. Now it gets an
/// answer at once (200, or 422 within min_interval), and Klavi sees at
/// most one fetch per min_interval.
#[tokio::test]
async fn polling_min_ttl_near_the_lifetime_is_answered_at_once_and_bounded() {
    let app = TestApp::spawn_env(&[("KLAVI_SIDECAR_REFRESH__MIN_INTERVAL_SECS", "2")]).await;
    assert_eq!(app.get_token("").await.status(), StatusCode::OK);
    let started = tokio::time::Instant::now();
    let (mut ok, mut unsatisfiable, mut slowest) = (0, 0, Duration::ZERO);
    for _ in 0..45 {
        let asked = tokio::time::Instant::now();
        let response = app.get_token("?min_ttl=299").await;
        slowest = slowest.max(asked.elapsed());
        match response.status().as_u16() {
            200 => ok += 1,
            422 => unsatisfiable += 1,
            other => panic!("{other}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let calls = app.fake.calls();
    assert!(
        slowest < Duration::from_millis(500),
        "slowest answer {slowest:?}"
    );
    assert!(
        unsatisfiable > 0 && ok > 0,
        "{ok} served, {unsatisfiable} 422"
    );
    // One fetch at the start, then at most one per min_interval.
    assert!(
        calls as f64 <= 2.0 + elapsed / 2.0,
        "{calls} calls in {elapsed:.1} s"
    );
    app.stop().await;
}

/// Defect: a min_ttl no token can meet, on a cold start, refetched every
/// min_interval until the wait ran out (about 3,300 requests in 5 s with
/// min_interval 0). Now: one fetch, then 422.
#[tokio::test]
async fn an_unsatisfiable_min_ttl_on_a_cold_start_costs_one_fetch() {
    let app = TestApp::spawn_with(
        FakeKlaviConfig {
            token_ttl: Duration::from_secs(300),
            ..FakeKlaviConfig::default()
        },
        |fake| fake.push([Outcome::token().after(Duration::from_millis(300))]),
        &[
            ("KLAVI_SIDECAR_REFRESH__MIN_INTERVAL_SECS", "1"),
            ("KLAVI_SIDECAR_REFRESH__WAIT_MS", "3000"),
        ],
    )
    .await;
    let started = tokio::time::Instant::now();
    let response = app.get_token("?min_ttl=99999").await;
    assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let body = json(response).await;
    assert_eq!(body["error"], "min_ttl_unsatisfiable");
    assert!(
        (295..=300).contains(&body["maxTtl"].as_u64().unwrap()),
        "{body}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "answered after the one fetch"
    );
    // The demand ended with the answer: nothing more is fetched for it.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    assert_eq!(app.fake.calls(), 1);
    app.stop().await;
}

/// Defect: min_ttl was judged from the last lifetime, so a Klavi that
/// starts issuing longer tokens was refused (400) until the next
/// scheduled refresh. Now the fetch is made and the longer token served.
#[tokio::test]
async fn a_min_ttl_longer_than_the_last_lifetime_is_met_when_klavi_gives_more() {
    let app = TestApp::spawn_env(&[("KLAVI_SIDECAR_REFRESH__MIN_INTERVAL_SECS", "1")]).await;
    assert_eq!(app.get_token("").await.status(), StatusCode::OK);
    app.fake
        .set_default(Outcome::token_ttl(Duration::from_secs(900)));
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let response = app.get_token("?min_ttl=600").await;
    assert_eq!(response.status(), StatusCode::OK);
    assert!(json(response).await["expiresIn"].as_u64().unwrap() >= 600);
    assert_eq!(app.fake.calls(), 2);
    app.stop().await;
}
