//! Rejected tokens and single-use leases through the real binary, against
//! an in-process fake Klavi whose requests the tests count (SPEC §4.2,
//! guarantees 3, 11 and 12).

use std::collections::HashSet;
use std::sync::Arc;

use klavi_token_sidecar::fake_klavi::{FakeKlavi, FakeKlaviConfig, Outcome};

use super::sidecar::{HEADER, Sidecar};
use super::*;

fn rejected(token: &str) -> Option<String> {
    Some(serde_json::json!({ "rejectedToken": token }).to_string())
}

/// An app got 401 for its token within `min_interval_secs` of the fetch:
/// reporting it brings a new token at once, and the rejected one never
/// comes back, from any route, however often asked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_token_is_replaced_at_once_and_never_served_again() {
    let fake = FakeKlavi::start_local(FakeKlaviConfig::lasting(300))
        .await
        .unwrap();
    let app = Sidecar::start(&fake, &[]).await;
    let first = app.token().await;
    assert!(fake.revoke(&first));
    let asked = Instant::now();
    let response = app
        .http
        .post(app.url("/token/refresh"))
        .header(HEADER.0, HEADER.1)
        .body(rejected(&first).unwrap())
        .send()
        .await
        .unwrap();
    assert!(
        asked.elapsed() < Duration::from_secs(1),
        "not held back by min_interval"
    );
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["klavi-sidecar-rejection"], "replaced");
    let body: serde_json::Value = response.json().await.unwrap();
    let second = body["accessToken"].as_str().unwrap().to_string();
    assert_ne!(second, first);
    assert_eq!(fake.calls(), 2);
    for i in 0..3000 {
        assert_ne!(app.token().await, first, "served again at poll {i}");
        if i % 30 == 0 {
            let (status, body) = app.call(true, "/token/refresh", None).await;
            assert_eq!(status, 200);
            assert_ne!(body["accessToken"], first.as_str());
        }
    }
    // Rejecting it again (an app that was slow to notice) fetches nothing.
    let (status, body) = app.call(true, "/token/refresh", rejected(&first)).await;
    assert_eq!(
        (status, body["accessToken"].as_str()),
        (200, Some(second.as_str()))
    );
    assert_eq!(fake.calls(), 2);
    assert_eq!(
        app.metric("klavi_sidecar_rejected_tokens_total{profile=\"default\"}")
            .await,
        1.0
    );
    // Bad bodies are refused and change nothing.
    for bad in ["{\"rejectedToken\": 5}", "not json", "[]"] {
        let (status, body) = app.call(true, "/token/refresh", Some(bad.into())).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (400, Some("invalid_body")),
            "{bad}"
        );
    }
    assert_eq!(app.token().await, second);
    let log = app.stop();
    assert!(
        !log.contains(&first) && !log.contains(&second),
        "no token in the log"
    );
    assert!(log.contains("token reported rejected"), "{log}");
    fake.stop().await;
}

/// Fifty apps get 401 at once for the same token: one fetch replaces it
/// for all; meanwhile `/readyz` says `token_rejected` and `GET /token`
/// waits for the replacement.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_rejections_cause_one_fetch() {
    let fake = FakeKlavi::start_local(FakeKlaviConfig::lasting(300))
        .await
        .unwrap();
    let app = Arc::new(Sidecar::start(&fake, &[]).await);
    let first = app.token().await;
    fake.set_default(Outcome::token().after(Duration::from_millis(800)));
    let rejections: Vec<_> = (0..50)
        .map(|_| {
            let app = Arc::clone(&app);
            let first = first.clone();
            tokio::spawn(async move { app.call(true, "/token/refresh", rejected(&first)).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let readyz = app
        .http
        .get(format!("http://{}/readyz", app.ops))
        .send()
        .await
        .unwrap();
    assert_eq!(readyz.status(), 503);
    let readyz: serde_json::Value = readyz.json().await.unwrap();
    assert_eq!(readyz["reason"], "token_rejected", "{readyz}");
    let waiting = app.token().await;
    let mut answers = HashSet::new();
    for r in rejections {
        let (status, body) = r.await.unwrap();
        assert_eq!(status, 200, "{body}");
        answers.insert(body["accessToken"].as_str().unwrap().to_string());
    }
    assert_eq!(answers.len(), 1, "one replacement for all");
    assert!(answers.contains(&waiting));
    assert!(!answers.contains(&first));
    assert_eq!(fake.calls(), 2, "one fetch for fifty rejections");
    assert_eq!(fake.max_in_flight(), 1);
    Arc::try_unwrap(app).ok().unwrap().stop();
    fake.stop().await;
}

/// 500 concurrent leases of a single_use profile get 500 distinct tokens,
/// none also handed out by any other route, with one auth request in
/// flight at a time; and the fake in single-use mode accepts each exactly
/// once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_concurrent_leases_get_five_hundred_distinct_tokens() {
    let fake = FakeKlavi::start_local(FakeKlaviConfig::lasting(300).single_use())
        .await
        .unwrap();
    let pay_fake = FakeKlavi::start_local(FakeKlaviConfig::lasting(300).single_use())
        .await
        .unwrap();
    let pay_url = pay_fake.base_url();
    let app = Arc::new(
        Sidecar::start(
            &fake,
            &[
                ("KLAVI_SIDECAR_PROFILES__PAY__BASE_URL", &pay_url),
                ("KLAVI_SIDECAR_PROFILES__PAY__ACCESS_KEY", "demo-access-key"),
                ("KLAVI_SIDECAR_PROFILES__PAY__SECRET_KEY", "demo-secret-key"),
                ("KLAVI_SIDECAR_PROFILES__PAY__MODE", "single_use"),
                ("KLAVI_SIDECAR_PROFILES__PAY__POOL_SIZE", "4"),
                (
                    "KLAVI_SIDECAR_PROFILES__PAY__REFRESH__MAX_AUTH_PER_MINUTE",
                    "600",
                ),
                ("KLAVI_SIDECAR_PROFILES__PAY__REFRESH__WAIT_MS", "20000"),
                ("KLAVI_SIDECAR_SERVER__REQUEST_TIMEOUT_MS", "30000"),
                ("KLAVI_SIDECAR_SERVER__SHUTDOWN_GRACE_SECS", "30"),
            ],
        )
        .await,
    );
    // Ready with one pooled token; the pool fills to 4 right after.
    let deadline = Instant::now() + Duration::from_secs(5);
    while pay_fake.calls() < 4 {
        assert!(Instant::now() < deadline, "the pool did not fill");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(pay_fake.calls(), 4, "the pool filled ahead, and no further");
    let leases: Vec<_> = (0..500)
        .map(|_| {
            let app = Arc::clone(&app);
            tokio::spawn(async move { app.call(true, "/profiles/pay/token/lease", None).await })
        })
        .collect();
    let shared = app.token().await;
    let mut leased = HashSet::new();
    for lease in leases {
        let (status, body) = lease.await.unwrap();
        assert_eq!(status, 200, "{body}");
        assert!(body["expiresIn"].as_u64().unwrap() >= 5);
        assert!(leased.insert(body["accessToken"].as_str().unwrap().to_string()));
    }
    assert_eq!(leased.len(), 500);
    assert!(!leased.contains(&shared));
    assert_eq!(pay_fake.max_in_flight(), 1, "one auth request at a time");
    assert!(
        pay_fake.calls() <= 500 + 4 + 4,
        "{} auth requests",
        pay_fake.calls()
    );
    // The shared routes refuse the single_use profile, and vice versa.
    let (status, body) = app.call(false, "/profiles/pay/token", None).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (409, Some("single_use_profile"))
    );
    let (status, body) = app.call(true, "/profiles/pay/token/refresh", None).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (409, Some("single_use_profile"))
    );
    let (status, body) = app.call(true, "/token/lease", None).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (409, Some("shared_profile"))
    );
    // Each leased token works once against a Klavi that enforces it.
    let api = app.http.clone();
    let pay = |token: &str| {
        api.post(format!("{pay_url}/payment/customer/v1/payments"))
            .bearer_auth(token)
            .send()
    };
    for token in leased.iter().take(20) {
        assert_eq!(pay(token).await.unwrap().status(), 200);
        assert_eq!(pay(token).await.unwrap().status(), 401, "second use");
    }
    assert!(
        app.metric("klavi_sidecar_leases_total{profile=\"pay\",outcome=\"pooled\"}")
            .await
            + app
                .metric("klavi_sidecar_leases_total{profile=\"pay\",outcome=\"waited\"}")
                .await
            == 500.0
    );
    // Review finding: a lease ignored its body, so a chunked body over the
    // limit used up a token and then lost it with the connection. The
    // body is read first: 413, no token taken (no refill follows).
    tokio::time::sleep(Duration::from_millis(300)).await;
    let calls = pay_fake.calls();
    let chunk = "x".repeat(4096);
    let mut request = "POST /profiles/pay/token/lease HTTP/1.1\r\nHost: localhost\r\n\
                       Klavi-Sidecar: true\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n"
        .to_string();
    for _ in 0..5 {
        request.push_str(&format!("1000\r\n{chunk}\r\n"));
    }
    request.push_str("0\r\n\r\n");
    let answer = http(&app.token, &request);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    // A small body is read and ignored; the next request on the
    // connection is answered too.
    let two = "POST /profiles/pay/token/lease HTTP/1.1\r\nHost: localhost\r\nKlavi-Sidecar: true\r\n\
               Content-Length: 2\r\n\r\n{}GET /healthz HTTP/1.1\r\nHost: localhost\r\n\
               Connection: close\r\n\r\n";
    let answers = http(&app.token, two);
    assert_eq!(answers.matches("HTTP/1.1 200").count(), 2, "{answers}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(pay_fake.calls(), calls + 1, "one refill, for the one lease");
    let log = Arc::try_unwrap(app).ok().unwrap().stop();
    for token in leased.iter().take(50) {
        assert!(!log.contains(token.as_str()), "a token in the log");
    }
    fake.stop().await;
    pay_fake.stop().await;
}
