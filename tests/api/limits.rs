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
    let request = format!(
        "GET /token HTTP/1.1\r\nHost: localhost\r\nKlavi-Sidecar: true\r\nX-Big: {big}\r\n\r\n"
    );
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
                .write_all(b"GET /token HTTP/1.1\r\nHost: localhost\r\n")
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
    let two = b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\nGET /token HTTP/1.1\r\nHost: localhost\r\nKlavi-Sidecar: true\r\nConnection: close\r\n\r\n";
    let response = raw_exchange(app.token, two).await;
    assert_eq!(response.matches("HTTP/1.1 200").count(), 2, "{response}");
    app.stop().await;
}

/// An app with tight limits, so attacks play out in a fraction of a second.
async fn tight_app() -> TestApp {
    TestApp::spawn_with(
        klavi_token_sidecar::fake_klavi::FakeKlaviConfig {
            token_ttl: Duration::from_secs(300),
            ..Default::default()
        },
        |_| {},
        &[
            ("KLAVI_SIDECAR_SERVER__HEADER_READ_TIMEOUT_MS", "400"),
            ("KLAVI_SIDECAR_SERVER__MAX_CONNECTIONS", "64"),
        ],
    )
    .await
}

/// Whether the server has closed `stream` (EOF or reset) within `limit`.
async fn closed_within(stream: &mut TcpStream, limit: Duration) -> bool {
    let mut buf = [0u8; 1024];
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0) | Err(_)) => return true,
            Ok(Ok(_)) => continue, // a response (408/400) before the close
        }
    }
}

#[tokio::test]
async fn slow_header_clients_are_cut_off_while_others_are_served() {
    let app = tight_app().await;
    assert_eq!(app.get_token("").await.status(), StatusCode::OK);
    let request = b"GET /token HTTP/1.1\r\nHost: localhost\r\nKlavi-Sidecar: true\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n";
    let mut attackers = Vec::new();
    for _ in 0..20 {
        let mut stream = TcpStream::connect(app.token).await.unwrap();
        // Dribble the request a byte at a time, forever (bounded here).
        attackers.push(tokio::spawn(async move {
            for byte in request.iter().cycle().take(200) {
                if stream.write_all(&[*byte]).await.is_err() {
                    return true;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            closed_within(&mut stream, Duration::from_millis(10)).await
        }));
    }
    for _ in 0..10 {
        let started = tokio::time::Instant::now();
        assert_eq!(app.get_token("").await.status(), StatusCode::OK);
        assert!(started.elapsed() < Duration::from_millis(500));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for attacker in attackers {
        assert!(attacker.await.unwrap(), "a slow-header client was cut off");
    }
    app.stop().await;
}

#[tokio::test]
async fn idle_keep_alive_connections_are_closed_after_the_header_timeout() {
    let app = tight_app().await;
    let mut stream = TcpStream::connect(app.token).await.unwrap();
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 1024];
    let n = stream.read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    assert!(
        closed_within(&mut stream, Duration::from_secs(2)).await,
        "idle keep-alive closed"
    );
    app.stop().await;
}

#[tokio::test]
async fn a_flood_of_idle_connections_does_not_lock_out_a_well_behaved_client() {
    // The defaults (5 s header timeout, 512 connections): without
    // eviction, a new connection would wait for the flood's header timeouts.
    let app = TestApp::spawn().await;
    // The app's pooled client has a keep-alive connection before the flood.
    let pooled = reqwest::Client::builder().no_proxy().build().unwrap();
    let get = |client: reqwest::Client| {
        let url = app.url("/token");
        async move {
            let started = tokio::time::Instant::now();
            let response = client
                .get(url)
                .header(crate::helpers::HEADER.0, crate::helpers::HEADER.1)
                .send()
                .await;
            (response.map(|r| r.status()).ok(), started.elapsed())
        }
    };
    assert_eq!(get(pooled.clone()).await.0, Some(StatusCode::OK));
    // Two thousand connections: half idle, half with a half-sent request.
    let mut flood = Vec::new();
    for i in 0..2000 {
        let Ok(mut stream) = TcpStream::connect(app.token).await else {
            continue;
        };
        if i % 2 == 0 {
            let _ = stream
                .write_all(b"GET /token HTTP/1.1\r\nHost: localhost\r\n")
                .await;
        }
        flood.push(stream);
    }
    // The pooled connection is never evicted: answers stay immediate.
    let mut pooled_worst = Duration::ZERO;
    for _ in 0..20 {
        let (status, took) = get(pooled.clone()).await;
        assert_eq!(status, Some(StatusCode::OK));
        pooled_worst = pooled_worst.max(took);
    }
    // A client needing a new connection gets one once the flood's
    // connections have been silent for half a second, not after 5 s.
    let fresh = reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let (status, fresh_took) = get(fresh).await;
    println!(
        "under a 2,000-connection flood: pooled worst {pooled_worst:?}, new connection {fresh_took:?}"
    );
    assert_eq!(status, Some(StatusCode::OK));
    assert!(
        pooled_worst < Duration::from_millis(500),
        "pooled: {pooled_worst:?}"
    );
    assert!(
        fresh_took < Duration::from_secs(3),
        "new connection: {fresh_took:?}"
    );
    drop(flood);
    app.stop().await;
}

/// Defect: the cap evicted only connections that never sent a request, so
/// keep-alive clients sending a request now and then held every slot of
/// the ops listener (reachable by any pod) and kubelet's probes timed out.
/// Now the connection idle the longest makes room.
#[tokio::test]
async fn busy_keep_alive_clients_filling_the_ops_listener_cannot_starve_a_probe() {
    let app = TestApp::spawn_with(
        klavi_token_sidecar::fake_klavi::FakeKlaviConfig::default(),
        |_| {},
        &[("KLAVI_SIDECAR_SERVER__MAX_CONNECTIONS", "16")],
    )
    .await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut hogs = Vec::new();
    for _ in 0..16 {
        let mut stream = TcpStream::connect(app.ops).await.unwrap();
        let stop = std::sync::Arc::clone(&stop);
        hogs.push(tokio::spawn(async move {
            let mut buf = [0u8; 4096];
            let mut answered = 0u32;
            // A request every 20 ms on the same connection, for at most 10 s.
            for _ in 0..500 {
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                let sent = stream
                    .write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
                    .await;
                match (sent, stream.read(&mut buf).await) {
                    (Ok(()), Ok(n)) if n > 0 => answered += 1,
                    _ => break, // evicted to make room
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            answered
        }));
    }
    // Every slot is held by a client that has served requests.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let probe = async {
        let started = tokio::time::Instant::now();
        let mut stream = TcpStream::connect(app.ops).await.unwrap();
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: 10.0.0.7:8090\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await.unwrap();
        (
            String::from_utf8_lossy(&response).into_owned(),
            started.elapsed(),
        )
    };
    let (response, took) = tokio::time::timeout(Duration::from_secs(3), probe)
        .await
        .expect("the probe is answered while the busy clients go on");
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(took < Duration::from_secs(1), "probe took {took:?}");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let served: Vec<u32> = join_counts(hogs).await;
    assert!(
        served.iter().all(|n| *n > 0),
        "the hogs were served: {served:?}"
    );
    app.stop().await;
}

async fn join_counts(tasks: Vec<tokio::task::JoinHandle<u32>>) -> Vec<u32> {
    let mut out = Vec::new();
    for task in tasks {
        out.push(task.await.unwrap());
    }
    out
}

/// A probe on the ops listener: its latency, and whether it got a 200.
async fn probe(addr: std::net::SocketAddr) -> (bool, Duration) {
    let started = tokio::time::Instant::now();
    let exchange = async {
        let mut stream = TcpStream::connect(addr).await.ok()?;
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: 10.0.0.7:8090\r\nConnection: close\r\n\r\n")
            .await
            .ok()?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await.ok()?;
        Some(response.starts_with(b"HTTP/1.1 200"))
    };
    let ok = tokio::time::timeout(Duration::from_secs(5), exchange)
        .await
        .ok()
        .flatten()
        .unwrap_or(false);
    (ok, started.elapsed())
}

/// The worst latency of `n` probes in a row, each asserted to get its 200.
async fn worst_probe(addr: std::net::SocketAddr, n: usize) -> Duration {
    let mut worst = Duration::ZERO;
    for _ in 0..n {
        let (ok, took) = probe(addr).await;
        assert!(ok, "probe failed after {took:?}");
        worst = worst.max(took);
    }
    worst
}

/// A sidecar whose listeners take at most 8 connections each (and 64 on
/// the overflow lane).
async fn capped_at_eight() -> TestApp {
    TestApp::spawn_with(
        klavi_token_sidecar::fake_klavi::FakeKlaviConfig::default(),
        |_| {},
        &[("KLAVI_SIDECAR_SERVER__MAX_CONNECTIONS", "8")],
    )
    .await
}

/// Review finding: clients that send pipelined requests and never read the
/// answers held every slot (their connections were neither idle nor
/// evictable), and kubelet's probes timed out.
#[tokio::test]
async fn clients_that_never_read_cannot_starve_a_probe() {
    let app = capped_at_eight().await;
    let pipelined = b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n".repeat(4000);
    let mut hogs = Vec::new();
    // The 8 slots and the whole overflow lane (64): every one a non-reader.
    for _ in 0..72 {
        let mut stream = TcpStream::connect(app.ops).await.unwrap();
        let requests = pipelined.clone();
        hogs.push(tokio::spawn(async move {
            // Writes until the server stops reading (bounded by a timeout);
            // never reads.
            let _ = tokio::time::timeout(Duration::from_secs(8), stream.write_all(&requests)).await;
            stream
        }));
    }
    tokio::time::sleep(Duration::from_millis(800)).await;
    let worst = worst_probe(app.ops, 3).await;
    assert!(worst < Duration::from_secs(1), "worst probe {worst:?}");
    for hog in hogs {
        hog.abort();
    }
    app.stop().await;
}

/// Review finding: more busy keep-alive clients than slots, reconnecting
/// when evicted, queued ahead of the probe, each newcomer waiting half a
/// second: the probe waited 0.5 s per client ahead of it. Now none of
/// them is evicted, and every newcomer beyond the cap is served at once on
/// the overflow lane, one request per connection: the probe is answered
/// at once and no client request is lost.
#[tokio::test]
async fn more_busy_clients_than_slots_lose_nothing_and_cannot_starve_a_probe() {
    let app = capped_at_eight().await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut clients = Vec::new();
    for _ in 0..30 {
        let stop = std::sync::Arc::clone(&stop);
        let url = app.ops_url("/healthz");
        clients.push(tokio::spawn(async move {
            let http = reqwest::Client::builder().no_proxy().build().unwrap();
            let (mut ok, mut failed) = (0u32, 0u32);
            for _ in 0..2000 {
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                match http.get(&url).send().await {
                    Ok(response) if response.status() == StatusCode::OK => ok += 1,
                    _ => failed += 1,
                }
            }
            (ok, failed)
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let worst = worst_probe(app.ops, 5).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut total = (0, 0);
    for client in clients {
        let (ok, failed) = client.await.unwrap();
        total = (total.0 + ok, total.1 + failed);
    }
    println!(
        "busy clients: {} served, {} failed; worst probe {worst:?}",
        total.0, total.1
    );
    assert!(worst < Duration::from_secs(1), "worst probe {worst:?}");
    assert!(total.0 > 30, "{total:?}");
    assert_eq!(total.1, 0, "no request lost: {total:?}");
    app.stop().await;
}

/// Second review: keep-alive clients that dribble each request head a
/// byte at a time held every regular slot, and idle sockets reconnecting as
/// fast as they were closed kept the overflow lane full: probes waited 3 to
/// 14 s. A head arriving for longer than the grace gives its slot up, and
/// a silent overflow connection gives its place to the next newcomer.
#[tokio::test]
async fn dribbling_readers_and_reconnecting_idle_sockets_cannot_starve_a_probe() {
    let app = capped_at_eight().await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut attackers = Vec::new();
    // Eight dribblers: a request head one byte every 50 ms, read the answer,
    // again (for at most 10 s).
    for _ in 0..8 {
        let (stop, addr) = (std::sync::Arc::clone(&stop), app.ops);
        attackers.push(tokio::spawn(async move {
            let request = b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n";
            let mut buf = [0u8; 1024];
            for _ in 0..50 {
                let Ok(mut stream) = TcpStream::connect(addr).await else {
                    continue;
                };
                'requests: for _ in 0..20 {
                    for byte in request {
                        if stop.load(std::sync::atomic::Ordering::Relaxed)
                            || stream.write_all(&[*byte]).await.is_err()
                        {
                            break 'requests;
                        }
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    if !matches!(stream.read(&mut buf).await, Ok(n) if n > 0) {
                        break;
                    }
                }
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    return;
                }
            }
        }));
    }
    // 150 idle sockets, reconnecting as soon as they are closed.
    for _ in 0..150 {
        let (stop, addr) = (std::sync::Arc::clone(&stop), app.ops);
        attackers.push(tokio::spawn(async move {
            let mut buf = [0u8; 64];
            for _ in 0..2000 {
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    return;
                }
                if let Ok(mut stream) = TcpStream::connect(addr).await {
                    let _ =
                        tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await;
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let worst = worst_probe(app.ops, 5).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for attacker in attackers {
        attacker.abort();
    }
    println!("worst probe under dribblers and reconnecting idle sockets: {worst:?}");
    // kubelet gives a probe 1 s by default.
    assert!(worst < Duration::from_millis(900), "worst probe {worst:?}");
    app.stop().await;
}

#[tokio::test]
async fn bodies_over_the_limit_get_413_json() {
    let app = TestApp::spawn().await;
    let response = app
        .http
        .post(app.url("/token/refresh"))
        .header(crate::helpers::HEADER.0, crate::helpers::HEADER.1)
        .body(vec![b'x'; 16 * 1024 + 1])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["error"], "payload_too_large");
    app.stop().await;
}

#[tokio::test]
async fn non_utf8_paths_are_rejected_cleanly() {
    let app = TestApp::spawn().await;
    let response = raw_exchange(
        app.token,
        b"GET /\xff\xfe HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(response.starts_with("HTTP/1.1 400"), "{response}");
    let response = raw_exchange(
        app.token,
        b"GET /%FF%FE HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(response.starts_with("HTTP/1.1 404"), "{response}");
    assert!(response.contains("not_found"));
    assert_eq!(app.get_token("").await.status(), StatusCode::OK);
    app.stop().await;
}
