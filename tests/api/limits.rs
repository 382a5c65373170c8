//! Hostile or broken clients cannot stop the sidecar serving others
//! (guarantee 7): oversized headers get 431, garbage gets 400, idle and
//! half-sent connections do not block well-behaved clients.

use std::time::Duration;

use reqwest::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::helpers::TestApp;

async fn raw_exchange(addr: std::net::SocketAddr, request: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut response = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut response)).await;
    String::from_utf8_lossy(&response).into_owned()
}

#[tokio::test]
async fn huge_headers_get_431() {
    let app = TestApp::spawn().await;
    let big = "x".repeat(64 * 1024);
    let request =
        format!("GET /token HTTP/1.1\r\nHost: a\r\nKlavi-Sidecar: true\r\nX-Big: {big}\r\n\r\n");
    let response = raw_exchange(app.token, request.as_bytes()).await;
    assert!(
        response.starts_with("HTTP/1.1 431"),
        "{}",
        &response[..response.len().min(200)]
    );
    assert_eq!(app.get_token("").await.status(), StatusCode::OK);
    app.stop().await;
}

#[tokio::test]
async fn garbage_bytes_get_400_and_others_are_still_served() {
    let app = TestApp::spawn().await;
    for garbage in [
        &b"\x00\x01\x02\xff\xfe garbage\r\n\r\n"[..],
        b"GET /token HTTP/9.9\r\n\r\n",
        b"NOT HTTP AT ALL\r\n\r\n",
    ] {
        let response = raw_exchange(app.token, garbage).await;
        assert!(
            response.starts_with("HTTP/1.1 400"),
            "{garbage:?}: {response}"
        );
    }
    assert_eq!(app.get_token("").await.status(), StatusCode::OK);
    app.stop().await;
}

#[tokio::test]
async fn idle_and_half_sent_connections_do_not_block_others() {
    let app = TestApp::spawn().await;
    let mut idle = Vec::new();
    for i in 0..200 {
        let mut stream = TcpStream::connect(app.token).await.unwrap();
        if i % 2 == 0 {
            // Half a request, never finished.
            stream
                .write_all(b"GET /token HTTP/1.1\r\nHost: a\r\n")
                .await
                .unwrap();
        }
        idle.push(stream);
    }
    for _ in 0..20 {
        let started = tokio::time::Instant::now();
        assert_eq!(app.get_token("").await.status(), StatusCode::OK);
        assert!(started.elapsed() < Duration::from_secs(1));
    }
    drop(idle);
    app.stop().await;
}

#[tokio::test]
async fn http_1_0_and_pipelined_requests_are_answered() {
    let app = TestApp::spawn().await;
    let response = raw_exchange(app.token, b"GET /healthz HTTP/1.0\r\n\r\n").await;
    assert!(
        response.starts_with("HTTP/1.0 200") || response.starts_with("HTTP/1.1 200"),
        "{response}"
    );
    let two = b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\nGET /token HTTP/1.1\r\nHost: a\r\nKlavi-Sidecar: true\r\nConnection: close\r\n\r\n";
    let response = raw_exchange(app.token, two).await;
    assert_eq!(response.matches("HTTP/1.1 200").count(), 2, "{response}");
    app.stop().await;
}
