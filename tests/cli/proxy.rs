//! The proxy through the real binary, against the in-process fake Klavi
//! whose API calls the tests see and script (SPEC §4.3, guarantee 13).

use std::collections::HashSet;
use std::sync::Arc;

use bytes::Bytes;
use klavi_token_sidecar::fake_klavi::{ApiReply, ApiRequest, FakeKlavi, FakeKlaviConfig};
use klavi_token_sidecar::secret::Secret;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::sidecar::Sidecar;
use super::*;

/// A response as the raw bytes came: status, headers in order, body.
#[derive(Debug)]
struct Raw {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Raw {
    fn all(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }

    fn one(&self, name: &str) -> Option<&str> {
        self.all(name).first().copied()
    }
}

/// Sends `head` (request line and headers, without the blank line; a
/// `Connection: close` is added) and `body` on a new connection to
/// `addr`, and reads the answer to the end.
async fn raw(addr: &str, head: &str, body: &[u8]) -> Raw {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut request = format!("{head}\r\nConnection: close\r\n\r\n").into_bytes();
    request.extend_from_slice(body);
    stream.write_all(&request).await.unwrap();
    let mut bytes = Vec::new();
    tokio::time::timeout(Duration::from_secs(15), stream.read_to_end(&mut bytes))
        .await
        .expect("an answer in time")
        .unwrap();
    parse(&bytes)
}

fn parse(bytes: &[u8]) -> Raw {
    let end = bytes
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no head in {:?}", String::from_utf8_lossy(bytes)));
    let head = String::from_utf8_lossy(&bytes[..end]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Raw {
        status,
        headers,
        body: bytes[end + 4..].to_vec(),
    }
}

/// The API calls the fake received after the first `skip`.
fn calls_after(fake: &FakeKlavi, skip: usize) -> Vec<ApiRequest> {
    fake.api_requests().into_iter().skip(skip).collect()
}

fn header<'a>(call: &'a ApiRequest, name: &str) -> Vec<&'a str> {
    call.headers
        .get_all(name)
        .iter()
        .map(|v| v.to_str().unwrap())
        .collect()
}

/// Nothing the sidecar printed holds a key or any of `tokens`.
fn assert_no_secrets(output: &str, tokens: &HashSet<String>) {
    assert!(!output.contains("demo-secret-key"), "{output}");
    assert!(!output.contains("demo-access-key"), "{output}");
    for token in tokens {
        assert!(!output.contains(token.as_str()), "a token in: {output}");
    }
}

/// A table of request headers in, forwarded headers out; and Klavi's
/// response headers back, hop-by-hop ones dropped, repeated ones in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_are_forwarded_as_the_contract_says() {
    let fake = FakeKlavi::start_local(FakeKlaviConfig::lasting(300))
        .await
        .unwrap();
    let app = Sidecar::start_proxied(&fake, &[]).await;
    let proxy = app.proxy.clone().unwrap();
    let token = app.token().await;
    fake.push_api([ApiReply::Raw {
        status: 201,
        headers: vec![
            (
                "content-type".into(),
                "application/json; charset=utf-8".into(),
            ),
            ("connection".into(), "x-resp-hop".into()),
            ("x-resp-hop".into(), "1".into()),
            ("keep-alive".into(), "timeout=5".into()),
            ("set-cookie".into(), "a=1".into()),
            ("set-cookie".into(), "b=2".into()),
            ("x-request-id".into(), "klavi-r-42".into()),
            ("cache-control".into(), "private".into()),
        ],
        body: Bytes::from_static(b"{\"id\":\"pay-1\"}"),
    }]);
    let head = "POST /payment/customer/v1/payments/x%20y//z?b=2&a=%2F&a=1 HTTP/1.1\r\n\
                Host: localhost\r\n\
                Klavi-Sidecar: true\r\n\
                Authorization: Bearer the-apps-own-stale-token\r\n\
                Content-Type: application/json\r\n\
                Content-Length: 11\r\n\
                X-Idempotency-Key: pay-42\r\n\
                X-Multi: one\r\n\
                X-Multi: two\r\n\
                Accept: application/json\r\n\
                Keep-Alive: timeout=9\r\n\
                Proxy-Connection: keep-alive\r\n\
                Proxy-Authorization: Basic eDp5\r\n\
                TE: trailers\r\n\
                X-Hop: named-by-connection\r\n\
                Connection: X-Hop";
    let answer = raw(&proxy, head, b"{\"amount\":1").await;
    assert_eq!(answer.status, 201, "{answer:?}");
    let calls = fake.api_requests();
    let call = calls.last().unwrap();
    assert_eq!(call.method, http::Method::POST);
    assert_eq!(
        call.target,
        "/payment/customer/v1/payments/x%20y//z?b=2&a=%2F&a=1"
    );
    assert_eq!(call.body.as_ref(), b"{\"amount\":1");
    // (header, values Klavi got)
    let expected: Vec<(&str, Vec<&str>)> = vec![
        ("host", vec![fake.addr().to_string().leak()]),
        ("authorization", vec![format!("Bearer {token}").leak()]),
        ("content-type", vec!["application/json"]),
        ("content-length", vec!["11"]),
        ("x-idempotency-key", vec!["pay-42"]),
        ("x-multi", vec!["one", "two"]),
        ("accept", vec!["application/json"]),
        ("klavi-sidecar", vec![]),
        ("keep-alive", vec![]),
        ("proxy-connection", vec![]),
        ("proxy-authorization", vec![]),
        ("te", vec![]),
        ("x-hop", vec![]),
        ("connection", vec![]),
    ];
    for (name, values) in &expected {
        assert_eq!(&header(call, name), values, "{name}");
    }
    let unexpected: Vec<_> = call
        .headers
        .keys()
        .filter(|n| !expected.iter().any(|(e, _)| e == n))
        .collect();
    assert!(unexpected.is_empty(), "headers nobody sent: {unexpected:?}");

    assert_eq!(answer.body, b"{\"id\":\"pay-1\"}");
    assert_eq!(answer.all("set-cookie"), vec!["a=1", "b=2"]);
    assert_eq!(
        answer.one("content-type"),
        Some("application/json; charset=utf-8")
    );
    assert_eq!(answer.one("x-request-id"), Some("klavi-r-42"));
    assert_eq!(answer.one("cache-control"), Some("private"));
    assert_eq!(answer.one("x-resp-hop"), None);
    assert_eq!(answer.one("keep-alive"), None);
    assert_eq!(
        answer.one("klavi-sidecar-token"),
        Some(Secret::new(token.as_str()).fingerprint().as_str())
    );
    assert_eq!(answer.one("klavi-sidecar-error"), None);

    let output = app.stop();
    // The access log: one line, with the path and no query.
    let line = output
        .lines()
        .find(|l| l.contains("proxied") && l.contains("status=201"))
        .unwrap_or_else(|| panic!("no access log line in {output}"));
    assert!(
        line.contains("path=/payment/customer/v1/payments/x%20y//z "),
        "{line}"
    );
    assert!(
        !line.contains("a=%2F") && !line.contains("pay-42"),
        "{line}"
    );
    assert!(line.contains("klavi_request_id=\"klavi-r-42\""), "{line}");
    assert!(line.contains("replayed=false"), "{line}");
    assert!(line.contains("sidecar_error=none"), "{line}");
    assert_no_secrets(&output, &HashSet::from([token]));
    fake.stop().await;
}

/// Binary, empty, at the limit and over it, both ways; a body over the
/// limit never reaches Klavi, whether its length is declared or chunked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_are_byte_exact_up_to_the_limit() {
    let fake = FakeKlavi::start_local(FakeKlaviConfig::lasting(300))
        .await
        .unwrap();
    let app =
        Sidecar::start_proxied(&fake, &[("KLAVI_SIDECAR_PROXY__MAX_BODY_BYTES", "65536")]).await;
    let binary: Vec<u8> = (0..=255u8).cycle().take(4099).collect();
    let at_limit: Vec<u8> = (0..65536u32).map(|i| (i * 7 % 251) as u8).collect();
    for body in [Vec::new(), binary.clone(), at_limit.clone()] {
        fake.push_api([ApiReply::Raw {
            status: 200,
            headers: vec![("content-type".into(), "application/octet-stream".into())],
            body: Bytes::from(body.iter().rev().copied().collect::<Vec<u8>>()),
        }]);
        let response = app
            .via_proxy(reqwest::Method::PUT, "/bin")
            .body(body.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let back = response.bytes().await.unwrap();
        let reversed: Vec<u8> = body.iter().rev().copied().collect();
        assert_eq!(
            back.as_ref(),
            reversed.as_slice(),
            "{} bytes back",
            body.len()
        );
        let calls = fake.api_requests();
        let call = calls.last().unwrap();
        assert_eq!(call.body_len, body.len());
        assert_eq!(
            call.body.as_ref(),
            body.as_slice(),
            "{} bytes sent",
            body.len()
        );
    }
    let before = fake.api_calls();
    // Declared over the limit: refused before the body is read.
    let over = vec![b'x'; 65537];
    let response = app
        .via_proxy(reqwest::Method::POST, "/over")
        .body(over.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 413);
    assert_eq!(
        response.headers()["klavi-sidecar-error"],
        "payload_too_large"
    );
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["error"], "payload_too_large");
    // Chunked, so only reading finds it too large.
    let proxy = app.proxy.clone().unwrap();
    let mut chunked = Vec::new();
    for _ in 0..3 {
        chunked.extend_from_slice(format!("{:x}\r\n", 30000).as_bytes());
        chunked.extend_from_slice(&[b'y'; 30000]);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    let answer = raw(
        &proxy,
        "POST /chunked HTTP/1.1\r\nHost: localhost\r\nKlavi-Sidecar: true\r\nTransfer-Encoding: chunked",
        &chunked,
    )
    .await;
    assert_eq!(answer.status, 413, "{answer:?}");
    assert_eq!(answer.one("klavi-sidecar-error"), Some("payload_too_large"));
    assert_eq!(
        fake.api_calls(),
        before,
        "nothing over the limit reached Klavi"
    );
    // A chunked body within the limit goes as one, with its length.
    let answer = raw(
        &proxy,
        "POST /chunked HTTP/1.1\r\nHost: localhost\r\nKlavi-Sidecar: true\r\nTransfer-Encoding: chunked",
        b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
    )
    .await;
    assert_eq!(answer.status, 200, "{answer:?}");
    let calls = fake.api_requests();
    let call = calls.last().unwrap();
    assert_eq!(call.body.as_ref(), b"hello world");
    assert_eq!(header(call, "content-length"), vec!["11"]);
    assert!(header(call, "transfer-encoding").is_empty());
    app.stop();
    fake.stop().await;
}

/// A slow chunked response reaches the app as it comes, not when it ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_response_streams_to_the_app() {
    let fake = FakeKlavi::start_local(FakeKlaviConfig::lasting(300))
        .await
        .unwrap();
    let app = Sidecar::start_proxied(&fake, &[]).await;
    // The second chunk comes long after this test has ended.
    fake.push_api([ApiReply::Chunked {
        chunks: vec![
            Bytes::from_static(b"first part;"),
            Bytes::from_static(b"never seen"),
        ],
        gap: Duration::from_secs(600),
    }]);
    let mut response = app
        .via_proxy(reqwest::Method::GET, "/stream")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let first = tokio::time::timeout(Duration::from_secs(10), response.chunk())
        .await
        .expect("the first chunk while the response is still open")
        .unwrap()
        .unwrap();
    assert_eq!(first.as_ref(), b"first part;");
    drop(response);
    app.stop();
    fake.stop().await;
}

/// Klavi revoked the token: the proxy reports it rejected, gets one new
/// token and replays; the app sees 200. If the replay is refused too, the
/// app sees that 401, and Klavi still saw exactly two requests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_401_is_replayed_once_with_a_fresh_token() {
    let fake = FakeKlavi::start_local(FakeKlaviConfig::lasting(300))
        .await
        .unwrap();
    let app = Sidecar::start_proxied(&fake, &[]).await;
    let first = app.token().await;
    let auth_before = fake.calls();
    assert!(fake.revoke(&first));
    let skip = fake.api_requests().len();
    let response = app
        .via_proxy(reqwest::Method::POST, "/payment/customer/v1/payments")
        .body("{\"amount\":5}")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let fingerprint = response.headers()["klavi-sidecar-token"]
        .to_str()
        .unwrap()
        .to_string();
    let echo: serde_json::Value = response.json().await.unwrap();
    assert_eq!(echo["bearerValid"], true);
    let calls = calls_after(&fake, skip);
    assert_eq!(calls.len(), 2, "the request and its replay");
    assert_eq!(fake.calls(), auth_before + 1, "one new token");
    assert_eq!(calls[0].bearer(), Some(first.as_str()));
    let second = calls[1].bearer().unwrap().to_string();
    assert_ne!(second, first);
    assert_eq!(fingerprint, Secret::new(second.as_str()).fingerprint());
    assert_eq!(calls[0].body, calls[1].body, "the same body, replayed");
    assert_eq!(
        app.token().await,
        second,
        "the token route serves the new one"
    );
    assert_eq!(
        app.metric("klavi_sidecar_rejected_tokens_total{profile=\"default\"}")
            .await,
        1.0
    );
    assert_eq!(
        app.metric(
            "klavi_sidecar_proxy_requests_total{profile=\"default\",status=\"200\",outcome=\"replayed\"}"
        )
        .await,
        1.0
    );

    // The replay refused too: Klavi's 401 reaches the app as it is.
    let skip = fake.api_requests().len();
    let auth_before = fake.calls();
    fake.push_api([ApiReply::status(401), ApiReply::status(401)]);
    let response = app
        .via_proxy(reqwest::Method::GET, "/payment/customer/v1/payments/1")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    assert!(response.headers().get("klavi-sidecar-error").is_none());
    assert_eq!(response.text().await.unwrap(), "{\"status\":401}");
    let calls = calls_after(&fake, skip);
    assert_eq!(calls.len(), 2, "never a third time");
    assert_ne!(calls[0].bearer(), calls[1].bearer());
    // Both tokens Klavi refused are dropped: the token route waits for a
    // third, fetched once.
    let third = app.token().await;
    assert!(calls.iter().all(|c| c.bearer() != Some(third.as_str())));
    assert_eq!(fake.calls(), auth_before + 2);
    let output = app.stop();
    let replayed: Vec<&str> = output
        .lines()
        .filter(|l| l.contains("proxied") && l.contains("replayed=true"))
        .collect();
    assert_eq!(replayed.len(), 2, "{output}");
    let seen: HashSet<String> = fake
        .api_requests()
        .iter()
        .filter_map(|c| c.bearer().map(str::to_string))
        .collect();
    assert_no_secrets(&output, &seen);
    fake.stop().await;
}

/// A 5xx, a reset and a timeout are answered as they are: never resent,
/// since the request may have been a payment Klavi received.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_but_a_401_is_ever_replayed() {
    let fake = FakeKlavi::start_local(FakeKlaviConfig::lasting(300))
        .await
        .unwrap();
    let app = Sidecar::start_proxied(
        &fake,
        &[
            ("KLAVI_SIDECAR_PROXY__REQUEST_TIMEOUT_MS", "1500"),
            ("KLAVI_SIDECAR_REFRESH__WAIT_MS", "1000"),
        ],
    )
    .await;
    let token = app.token().await;
    // (scripted answer, status the app gets, Klavi-Sidecar-Error)
    let cases: Vec<(ApiReply, u16, Option<&str>)> = vec![
        (ApiReply::status(500), 500, None),
        (ApiReply::status(503), 503, None),
        (ApiReply::status(403), 403, None),
        // A status with no registered meaning passes, counted as 0.
        (ApiReply::status(599), 599, None),
        (ApiReply::Reset, 502, Some("upstream_failed")),
        (
            ApiReply::Delay(Duration::from_secs(5)),
            504,
            Some("upstream_timeout"),
        ),
    ];
    for (reply, status, error) in cases {
        let what = format!("{reply:?}");
        let skip = fake.api_requests().len();
        fake.push_api([reply]);
        let response = app
            .via_proxy(reqwest::Method::POST, "/payment/customer/v1/payments")
            .body("{\"amount\":7}")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), status, "{what}");
        assert_eq!(
            response
                .headers()
                .get("klavi-sidecar-error")
                .map(|v| v.to_str().unwrap()),
            error,
            "{what}"
        );
        if let Some(error) = error {
            let body: serde_json::Value = response.json().await.unwrap();
            assert_eq!(body["error"], error);
        }
        assert_eq!(calls_after(&fake, skip).len(), 1, "{what}: sent once");
    }
    assert_eq!(app.token().await, token, "none of these rejects the token");
    assert_eq!(
        app.metric(
            "klavi_sidecar_proxy_requests_total{profile=\"default\",status=\"0\",outcome=\"forwarded\"}"
        )
        .await,
        1.0
    );
    assert_eq!(fake.calls(), 1);
    // Klavi gone: nothing can be sent, and the app is told so.
    let fake_addr = fake.addr();
    fake.stop().await;
    let response = app
        .via_proxy(reqwest::Method::GET, "/payment/customer/v1/payments")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 502, "Klavi at {fake_addr} is gone");
    assert_eq!(
        response.headers()["klavi-sidecar-error"],
        "upstream_unreachable"
    );
    app.stop();
}

/// 200 proxied requests at once share one token; after a revocation, 200
/// more cause one auth request, and none reaches Klavi a third time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_requests_share_one_token_and_one_replacement() {
    let fake = FakeKlavi::start_local(FakeKlaviConfig::lasting(300))
        .await
        .unwrap();
    let app = Arc::new(Sidecar::start_proxied(&fake, &[]).await);
    let token = app.token().await;
    let burst = |round: usize| {
        let app = Arc::clone(&app);
        async move {
            let mut tasks = tokio::task::JoinSet::new();
            for i in 0..200 {
                let app = Arc::clone(&app);
                tasks.spawn(async move {
                    let response = app
                        .via_proxy(
                            reqwest::Method::POST,
                            &format!("/payment/customer/v1/payments/{round}-{i}"),
                        )
                        .body(format!("{{\"n\":{i}}}"))
                        .send()
                        .await
                        .unwrap();
                    response.status().as_u16()
                });
            }
            let mut statuses = Vec::new();
            while let Some(status) = tasks.join_next().await {
                statuses.push(status.unwrap());
            }
            statuses
        }
    };
    let statuses = burst(0).await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    assert_eq!(fake.calls(), 1);
    assert_eq!(fake.api_calls(), 200);
    assert!(fake.revoke(&token));
    let skip = fake.api_requests().len();
    let statuses = burst(1).await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    assert_eq!(fake.calls(), 2, "one replacement for 200 refused requests");
    let calls = calls_after(&fake, skip);
    let mut per_path: std::collections::HashMap<String, usize> = Default::default();
    for call in &calls {
        *per_path.entry(call.target.clone()).or_default() += 1;
    }
    assert_eq!(per_path.len(), 200);
    assert!(per_path.values().all(|n| *n <= 2), "{per_path:?}");
    let app = Arc::into_inner(app).unwrap();
    app.stop();
    fake.stop().await;
}

/// A single_use profile's proxy leases a token per request: against a
/// Klavi that refuses a token's second use, every request succeeds, each
/// with a token never used before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_use_profile_leases_a_token_per_request() {
    let fake = FakeKlavi::start_local(FakeKlaviConfig::lasting(300).single_use())
        .await
        .unwrap();
    let proxy = format!("127.0.0.1:{}", free_port());
    let app = Arc::new(
        Sidecar::start(
            &fake,
            &[
                ("KLAVI_SIDECAR_KLAVI__MODE", "single_use"),
                ("KLAVI_SIDECAR_KLAVI__POOL_SIZE", "4"),
                ("KLAVI_SIDECAR_KLAVI__PROXY_LISTEN", &proxy),
            ],
        )
        .await,
    );
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..30 {
        let app = Arc::clone(&app);
        tasks.spawn(async move {
            let response = app
                .via_proxy(reqwest::Method::POST, "/payment/customer/v1/payments")
                .body(format!("{{\"n\":{i}}}"))
                .send()
                .await
                .unwrap();
            response.status().as_u16()
        });
    }
    while let Some(status) = tasks.join_next().await {
        assert_eq!(status.unwrap(), 200);
    }
    let calls = fake.api_requests();
    assert_eq!(calls.len(), 30, "no request needed a replay");
    let tokens: HashSet<&str> = calls.iter().filter_map(ApiRequest::bearer).collect();
    assert_eq!(tokens.len(), 30, "each request its own token");
    let app = Arc::into_inner(app).unwrap();
    app.stop();
    fake.stop().await;
}

/// The guard and the target rules: each refusal is the sidecar's (marked),
/// and none reaches Klavi.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_requests_never_reach_klavi() {
    let fake = FakeKlavi::start_local(FakeKlaviConfig::lasting(300))
        .await
        .unwrap();
    let app = Sidecar::start_proxied(&fake, &[]).await;
    let proxy = app.proxy.clone().unwrap();
    let _ = app.token().await;
    // (request head, status, Klavi-Sidecar-Error)
    let cases: Vec<(&str, u16, &str)> = vec![
        ("GET /p HTTP/1.1\r\nHost: localhost", 403, "missing_header"),
        (
            "GET /p HTTP/1.1\r\nHost: evil.example\r\nKlavi-Sidecar: true",
            403,
            "host_not_allowed",
        ),
        (
            "GET /p HTTP/1.1\r\nHost: localhost\r\nKlavi-Sidecar: true\r\nX-Forwarded-For: 10.0.0.1",
            403,
            "proxied_request",
        ),
        (
            "GET /p HTTP/1.1\r\nHost: localhost\r\nKlavi-Sidecar: true\r\nForwarded: for=10.0.0.1",
            403,
            "proxied_request",
        ),
        (
            "GET http://evil.example/steal HTTP/1.1\r\nHost: evil.example\r\nKlavi-Sidecar: true",
            400,
            "invalid_target",
        ),
        (
            "GET http://127.0.0.1/p HTTP/1.1\r\nHost: localhost\r\nKlavi-Sidecar: true",
            400,
            "invalid_target",
        ),
        (
            "OPTIONS * HTTP/1.1\r\nHost: localhost\r\nKlavi-Sidecar: true",
            400,
            "invalid_target",
        ),
        (
            "CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\nKlavi-Sidecar: true",
            405,
            "method_not_allowed",
        ),
    ];
    for (head, status, error) in cases {
        let answer = raw(&proxy, head, b"").await;
        assert_eq!(answer.status, status, "{head}: {answer:?}");
        assert_eq!(answer.one("klavi-sidecar-error"), Some(error), "{head}");
        let body: serde_json::Value = serde_json::from_slice(&answer.body).unwrap();
        assert_eq!(body["error"], error, "{head}");
    }
    assert_eq!(fake.api_calls(), 0);
    app.stop();
    fake.stop().await;
}

/// Guarantee 7 on the proxy listener: slow headers, huge headers, garbage
/// and a flood of idle connections do not stop it serving others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_clients_cannot_stop_the_proxy() {
    let fake = FakeKlavi::start_local(FakeKlaviConfig::lasting(300))
        .await
        .unwrap();
    let app = Sidecar::start_proxied(
        &fake,
        &[
            ("KLAVI_SIDECAR_SERVER__MAX_CONNECTIONS", "32"),
            ("KLAVI_SIDECAR_SERVER__HEADER_READ_TIMEOUT_MS", "1000"),
        ],
    )
    .await;
    let proxy = app.proxy.clone().unwrap();
    // Huge headers: 431, nothing forwarded.
    let huge = format!(
        "GET /p HTTP/1.1\r\nHost: localhost\r\nKlavi-Sidecar: true\r\nX-Big: {}",
        "a".repeat(20_000)
    );
    let answer = raw(&proxy, &huge, b"").await;
    assert_eq!(answer.status, 431);
    // Garbage: 400.
    let mut garbage = tokio::net::TcpStream::connect(&proxy).await.unwrap();
    garbage
        .write_all(b"\x00\x01\x02 not http\r\n\r\n")
        .await
        .unwrap();
    let mut bytes = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), garbage.read_to_end(&mut bytes)).await;
    assert!(
        bytes.starts_with(b"HTTP/1.1 400"),
        "{:?}",
        String::from_utf8_lossy(&bytes)
    );
    // Every slot held: idle sockets and slow-header clients.
    let mut held = Vec::new();
    for i in 0..40 {
        let mut stream = tokio::net::TcpStream::connect(&proxy).await.unwrap();
        if i % 2 == 0 {
            stream
                .write_all(b"GET /p HTTP/1.1\r\nHost: loc")
                .await
                .unwrap();
        }
        held.push(stream);
    }
    let response = app
        .via_proxy(reqwest::Method::GET, "/payment/customer/v1/payments")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(fake.api_calls(), 1, "only the real request reached Klavi");
    drop(held);
    app.stop();
    fake.stop().await;
}

/// Worst case for the auth budget through the proxy: Klavi answers 401 to
/// every API call, so every proxied request reports its token rejected.
/// Auth requests stay within `max_auth_per_minute`, and no request is
/// sent more than twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_klavi_that_refuses_every_token_is_not_stormed() {
    let fake = FakeKlavi::start_local(FakeKlaviConfig::lasting(300))
        .await
        .unwrap();
    let app = Arc::new(
        Sidecar::start_proxied(
            &fake,
            &[
                ("KLAVI_SIDECAR_REFRESH__MAX_AUTH_PER_MINUTE", "5"),
                ("KLAVI_SIDECAR_REFRESH__WAIT_MS", "300"),
            ],
        )
        .await,
    );
    fake.push_api((0..400).map(|_| ApiReply::status(401)));
    // Ten clients, ten requests each, one after another: each round
    // reports new tokens rejected.
    let mut tasks = tokio::task::JoinSet::new();
    for lane in 0..10 {
        let app = Arc::clone(&app);
        tasks.spawn(async move {
            let mut answers = Vec::new();
            for i in 0..10 {
                let response = app
                    .via_proxy(
                        reqwest::Method::POST,
                        &format!("/payment/customer/v1/payments/{lane}-{i}"),
                    )
                    .send()
                    .await
                    .unwrap();
                let marked = response
                    .headers()
                    .get("klavi-sidecar-error")
                    .map(|v| v.to_str().unwrap().to_string());
                answers.push((response.status().as_u16(), marked));
            }
            answers
        });
    }
    let mut unavailable = 0;
    let mut answers = Vec::new();
    while let Some(lane) = tasks.join_next().await {
        answers.extend(lane.unwrap());
    }
    for (status, marked) in answers {
        match status {
            401 => assert_eq!(marked, None, "Klavi's own 401"),
            503 => {
                assert_eq!(marked.as_deref(), Some("token_unavailable"));
                unavailable += 1;
            }
            other => panic!("unexpected {other}"),
        }
    }
    // The budget was reached (replacements were demanded and refused),
    // and never passed.
    assert!(unavailable > 0);
    assert!(
        (2..=5).contains(&fake.calls()),
        "{} auth requests",
        fake.calls()
    );
    let mut per_path: std::collections::HashMap<String, usize> = Default::default();
    for call in fake.api_requests() {
        *per_path.entry(call.target).or_default() += 1;
    }
    assert!(per_path.values().all(|n| *n <= 2), "{per_path:?}");
    let app = Arc::into_inner(app).unwrap();
    app.stop();
    fake.stop().await;
}
