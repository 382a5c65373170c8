//! The Klavi client against the fake: each row of SPEC section 3's error
//! table, the request Klavi receives, Date skew and the body cap.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use klavi_token_sidecar::cache::source::TokenSource;
use klavi_token_sidecar::cache::source::{Category, FetchError};
use klavi_token_sidecar::clock::SystemClock;
use klavi_token_sidecar::fake_klavi::{FakeKlavi, FakeKlaviConfig, Outcome, Reply};
use klavi_token_sidecar::secret::Secret;
use klavi_token_sidecar::upstream::credentials::Credentials;
use klavi_token_sidecar::upstream::klavi::{KlaviClient, USER_AGENT};
use tokio::time::Instant;

use crate::helpers::test_config;

async fn client_for(fake: &FakeKlavi, access: &str) -> KlaviClient {
    client_at(&fake.base_url(), access)
}

fn client_at(base_url: &str, access: &str) -> KlaviClient {
    let config = test_config(
        base_url,
        &[("KLAVI_SIDECAR_KLAVI__REQUEST_TIMEOUT_MS", "400")],
    );
    let credentials = Credentials::inline(Secret::new(access), Secret::new("demo-secret-key"));
    KlaviClient::new(
        &config.profiles[0].klavi,
        config.profiles[0].refresh.fallback_ttl,
        Arc::new(credentials),
        Arc::new(SystemClock),
    )
    .unwrap()
}

async fn fake() -> FakeKlavi {
    FakeKlavi::start_local(FakeKlaviConfig {
        token_ttl: Duration::from_secs(300),
        ..FakeKlaviConfig::default()
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn a_good_answer_is_a_token_with_its_expiry_counted_from_sending() {
    let fake = fake().await;
    let client = client_for(&fake, "demo-access-key").await;
    let before = Instant::now();
    let token = client.fetch().await.unwrap();
    assert_eq!(Some(token.value().expose().to_string()), fake.last_token());
    assert!(token.sent_at() >= before);
    let lifetime = token.lifetime().as_secs();
    assert!((299..=300).contains(&lifetime), "{lifetime}");
    fake.stop().await;
}

#[tokio::test]
async fn the_request_is_what_klavi_expects() {
    let fake = fake().await;
    let client = client_for(&fake, "demo-access-key").await;
    client.fetch().await.unwrap();
    let request = fake.last_request().unwrap();
    assert_eq!(request.headers["accept"], "application/json");
    assert_eq!(request.headers["content-type"], "application/json");
    assert_eq!(request.headers["user-agent"], USER_AGENT);
    assert!(USER_AGENT.starts_with("klavi-token-sidecar/"));
    let body: serde_json::Value = serde_json::from_slice(&request.body).unwrap();
    assert_eq!(
        body,
        serde_json::json!({"accessKey": "demo-access-key", "secretKey": "demo-secret-key"})
    );
    fake.stop().await;
}

#[tokio::test]
async fn the_error_table() {
    let fake = fake().await;
    let client = client_for(&fake, "demo-access-key").await;
    let in_9_s = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(9));
    let big = format!(r#"{{"accessToken":"t","pad":"{}"}}"#, "x".repeat(70_000));
    let s = Duration::from_secs;
    // (outcome, category, Retry-After honoured, status seen)
    let cases: Vec<(Outcome, Category, Option<(Duration, Duration)>, Option<u16>)> = vec![
        (
            Outcome::status(401),
            Category::CredentialsRejected,
            None,
            Some(401),
        ),
        (
            Outcome::status(403),
            Category::CredentialsRejected,
            None,
            Some(403),
        ),
        (
            Outcome::status_retry_after(429, "7"),
            Category::RateLimited,
            Some((s(7), s(7))),
            Some(429),
        ),
        (
            Outcome::status_retry_after(429, &in_9_s),
            Category::RateLimited,
            Some((s(7), s(9))),
            Some(429),
        ),
        (Outcome::status(429), Category::RateLimited, None, Some(429)),
        // "Now" in any form is no Retry-After: the caller backs off.
        (
            Outcome::status_retry_after(429, "0"),
            Category::RateLimited,
            None,
            Some(429),
        ),
        (
            Outcome::status_retry_after(429, "Thu, 01 Jan 2015 00:00:00 GMT"),
            Category::RateLimited,
            None,
            Some(429),
        ),
        (
            Outcome::status_retry_after(503, "-5"),
            Category::UpstreamUnavailable,
            None,
            Some(503),
        ),
        (
            Outcome::status_retry_after(503, "3"),
            Category::UpstreamUnavailable,
            Some((s(3), s(3))),
            Some(503),
        ),
        (
            Outcome::status(503),
            Category::UpstreamUnavailable,
            None,
            Some(503),
        ),
        (
            Outcome::status_retry_after(500, "3"),
            Category::UpstreamUnavailable,
            None,
            Some(500),
        ),
        (
            Outcome::status(502),
            Category::UpstreamUnavailable,
            None,
            Some(502),
        ),
        (
            Outcome::status(404),
            Category::UpstreamUnavailable,
            None,
            Some(404),
        ),
        (
            Outcome::status(400),
            Category::UpstreamUnavailable,
            None,
            Some(400),
        ),
        (
            Outcome::status(302),
            Category::UpstreamUnavailable,
            None,
            Some(302),
        ),
        (
            Outcome::from(Reply::Hang),
            Category::UpstreamUnavailable,
            None,
            None,
        ),
        (
            Outcome::token().after(Duration::from_secs(2)),
            Category::UpstreamUnavailable,
            None,
            None,
        ),
        (
            Outcome::from(Reply::Reset),
            Category::UpstreamUnavailable,
            None,
            None,
        ),
        (
            Outcome::body("<html>maintenance</html>"),
            Category::InvalidResponse,
            None,
            None,
        ),
        (Outcome::body(""), Category::InvalidResponse, None, None),
        (
            Outcome::body(r#"{"expireAt": 1}"#),
            Category::InvalidResponse,
            None,
            None,
        ),
        (
            Outcome::body(r#"{"accessToken": ""}"#),
            Category::InvalidResponse,
            None,
            None,
        ),
        (
            Outcome::body(r#"{"accessToken": "t", "expireAt": 1000}"#),
            Category::InvalidResponse,
            None,
            None,
        ),
        (Outcome::body(big), Category::InvalidResponse, None, None),
    ];
    for (outcome, category, retry_after, status) in cases {
        fake.push([outcome.clone()]);
        let error = client.fetch().await.expect_err("an error");
        assert_eq!(error.category(), category, "{outcome:?}: {error}");
        assert_eq!(error.status(), status, "{outcome:?}: {error}");
        match retry_after {
            Some((low, high)) => {
                let got = error.retry_after().expect("Retry-After honoured");
                assert!(
                    got >= low - Duration::from_secs(1) && got <= high,
                    "{outcome:?}: {got:?}"
                );
            }
            None => assert_eq!(error.retry_after(), None, "{outcome:?}"),
        }
    }
    fake.stop().await;
}

#[tokio::test]
async fn wrong_keys_are_rejected_credentials() {
    let fake = fake().await;
    let client = client_for(&fake, "wrong-key").await;
    let error = client.fetch().await.unwrap_err();
    assert!(
        matches!(error, FetchError::CredentialsRejected { status: 401 }),
        "{error}"
    );
    fake.stop().await;
}

#[tokio::test]
async fn connection_refused_is_upstream_unavailable() {
    // Bind then drop a listener: nothing listens on that port now.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let client = client_at(&format!("http://127.0.0.1:{port}"), "demo-access-key");
    let error = client.fetch().await.unwrap_err();
    assert_eq!(error.category(), Category::UpstreamUnavailable, "{error}");
    assert!(matches!(error, FetchError::Transport(_)), "{error}");
}

#[tokio::test]
async fn every_expiry_form_reaches_the_token() {
    let fake = fake().await;
    let client = client_for(&fake, "demo-access-key").await;
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let cases = [
        (
            format!(r#"{{"accessToken":"a","expireAt":{}}}"#, now + 100),
            100,
        ),
        (
            format!(r#"{{"accessToken":"a","expireAt":{}}}"#, (now + 100) * 1000),
            100,
        ),
        (r#"{"accessToken":"a","expireIn":120}"#.to_string(), 120),
        (r#"{"accessToken":"a","expiresIn":"140"}"#.to_string(), 140),
        (
            format!(r#"{{"accessToken":"a","expire":"{}"}}"#, now + 160),
            160,
        ),
        (r#"{"accessToken":"a"}"#.to_string(), 300),
    ];
    for (body, lifetime) in cases {
        fake.push([Outcome::body(body.clone())]);
        let token = client.fetch().await.unwrap();
        // Never longer than the answer says. Shorter by up to 2 s: the
        // absolute forms are whole seconds counted from `now` (up to 1 s
        // early, plus the time since), and the whole-second Date header
        // may shorten it by up to 1 s more (the earlier-of rule).
        let got = token.lifetime().as_secs_f64();
        let lifetime = lifetime as f64;
        assert!(
            got <= lifetime + 1.0 && got > lifetime - 2.0,
            "{body}: {got}"
        );
    }
    fake.stop().await;
}

/// Defect: a Retry-After date was compared with the local clock, so a
/// Klavi clock 60 s behind turned "in 10 s" into a date 50 s in the past:
/// "now", and a storm. It is read on Klavi's clock, by its Date header.
#[tokio::test]
async fn a_retry_after_date_is_read_on_klavis_clock() {
    let fake = fake().await;
    let client = client_for(&fake, "demo-access-key").await;
    for skew in [-60i64, 0, 60, 3600] {
        let klavi_now = klavi_token_sidecar::clock::shift(SystemTime::now(), skew as f64);
        let date = httpdate::fmt_http_date(klavi_now + Duration::from_secs(10));
        fake.push([Outcome::status_retry_after(429, &date).skewed(skew)]);
        let error = client.fetch().await.unwrap_err();
        let after = error.retry_after().expect("a future date on Klavi's clock");
        assert!(
            (Duration::from_secs(9)..=Duration::from_secs(11)).contains(&after),
            "skew {skew}: {after:?}"
        );
    }
    fake.stop().await;
}

#[tokio::test]
async fn a_skewed_klavi_clock_does_not_shorten_or_lengthen_the_token() {
    let fake = fake().await;
    let client = client_for(&fake, "demo-access-key").await;
    // The fake's expireAt is on the real clock, but its Date header claims
    // to be an hour off: the sidecar trusts the Date header and shifts the
    // expiry by the skew. Here the token is 300 s on Klavi's clock, which
    // the Date says is one hour behind ours.
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let klavi_now = now - 3600;
    fake.push([Outcome::body(format!(
        r#"{{"accessToken":"a","expireAt":{}}}"#,
        klavi_now + 300
    ))
    .skewed(-3600)]);
    let token = client
        .fetch()
        .await
        .expect("not expired on arrival once skew is corrected");
    let lifetime = token.lifetime().as_secs();
    assert!((298..=301).contains(&lifetime), "{lifetime}");
    let expected_expire_at = (now + 300) as i64;
    assert!((token.expire_at_unix() - expected_expire_at).abs() <= 2);
    fake.stop().await;
}
