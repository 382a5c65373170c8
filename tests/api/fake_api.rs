//! The fake Klavi's API paths, which the demo and the proxy tests rely on:
//! a JSON echo for a token it issued and still honours, 401 otherwise.

use std::time::Duration;

use klavi_token_sidecar::fake_klavi::{
    AUTH_PATH, FakeKlavi, FakeKlaviConfig, Outcome, REVOKE_PATH,
};

use crate::helpers::client;

/// POSTs `body` to the fake's `path`; the JSON answer.
async fn post(
    fake: &FakeKlavi,
    http: &reqwest::Client,
    path: &str,
    body: serde_json::Value,
) -> serde_json::Value {
    let response = http
        .post(format!("{}{path}", fake.base_url()))
        .json(&body)
        .send()
        .await
        .unwrap();
    response.json().await.unwrap()
}

async fn issue(fake: &FakeKlavi, http: &reqwest::Client) -> String {
    let keys = serde_json::json!({"accessKey": "demo-access-key", "secretKey": "demo-secret-key"});
    let body = post(fake, http, AUTH_PATH, keys).await;
    body["accessToken"].as_str().unwrap().to_string()
}

async fn call(
    fake: &FakeKlavi,
    http: &reqwest::Client,
    token: Option<&str>,
) -> (u16, serde_json::Value) {
    let mut request = http.put(format!(
        "{}/payment/customer/v1/payments/42",
        fake.base_url()
    ));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.unwrap();
    (response.status().as_u16(), response.json().await.unwrap())
}

#[tokio::test]
async fn api_paths_echo_for_a_valid_token_and_answer_401_otherwise() {
    let fake = FakeKlavi::start_local(FakeKlaviConfig::lasting(300))
        .await
        .unwrap();
    let http = client();
    let token = issue(&fake, &http).await;
    let (status, body) = call(&fake, &http, Some(&token)).await;
    assert_eq!(status, 200);
    assert_eq!(
        body,
        serde_json::json!({"method": "PUT", "path": "/payment/customer/v1/payments/42", "bearerValid": true})
    );
    // Shared mode: the same token again is fine.
    assert_eq!(call(&fake, &http, Some(&token)).await.0, 200);
    for (bearer, reason) in [(None, "missing"), (Some("not-issued"), "unknown")] {
        let (status, body) = call(&fake, &http, bearer).await;
        assert_eq!((status, body["reason"].as_str()), (401, Some(reason)));
        assert_eq!(body["bearerValid"], false);
        assert_eq!(body["error"], "invalid_token");
    }
    // Revoked over HTTP, as a script would.
    let revoked = post(
        &fake,
        &http,
        REVOKE_PATH,
        serde_json::json!({"accessToken": token}),
    )
    .await;
    assert_eq!(revoked["revoked"], 1);
    let (status, body) = call(&fake, &http, Some(&token)).await;
    assert_eq!((status, body["reason"].as_str()), (401, Some("revoked")));
    assert!(!fake.revoke("not-issued"));
    assert_eq!(fake.api_calls(), 5);
    assert_eq!(fake.calls(), 1, "API calls are not auth calls");
    fake.stop().await;
}

#[tokio::test]
async fn in_single_use_mode_a_token_is_good_for_one_call() {
    let fake = FakeKlavi::start_local(FakeKlaviConfig::lasting(300).single_use())
        .await
        .unwrap();
    let http = client();
    let (a, b) = (issue(&fake, &http).await, issue(&fake, &http).await);
    assert_eq!(call(&fake, &http, Some(&a)).await.0, 200);
    let (status, body) = call(&fake, &http, Some(&a)).await;
    assert_eq!((status, body["reason"].as_str()), (401, Some("used")));
    assert_eq!(call(&fake, &http, Some(&b)).await.0, 200);
    // An expired token is refused too.
    fake.push([Outcome::token_ttl(Duration::ZERO)]);
    let expired = issue(&fake, &http).await;
    let (status, body) = call(&fake, &http, Some(&expired)).await;
    assert_eq!((status, body["reason"].as_str()), (401, Some("expired")));
    fake.stop().await;
}
