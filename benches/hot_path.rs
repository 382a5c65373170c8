//! Micro-benchmarks of the hot path: `GET /token` through the full router
//! and middleware stack (tower `oneshot`, no sockets; the body rendered
//! once per token, as served) and the refresh schedule. `cargo bench`; CI only compiles them.

use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use axum::body::Body;
use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use http::Request;
use http_body_util::BodyExt;
use klavi_token_sidecar::cache::policy::{RefreshPolicy, refresh_offset};
use klavi_token_sidecar::cache::store::TokenStore;
use klavi_token_sidecar::cache::token::Token;
use klavi_token_sidecar::secret::Secret;
use klavi_token_sidecar::serve::http::{AppState, token_router};
use tokio::time::Instant;
use tower::ServiceExt;

const JWT: &str = "eyJhbGciOiJFUzI1NiIsInR5cCI6IkpXVCJ9.eyJleHAiOjE3OTU2NDg1MDUsImlhdCI6MTc5NTY0ODQ3NSwiaXNzIjoiZmFrZS1rbGF2aSIsImp0aSI6MX0.V72kw6qpxl3ORBzIYzjeAr6rlHTR9nrcGQlv4rPaH_E";

fn token() -> Token {
    Token::new(
        Secret::new(JWT),
        Instant::now(),
        Duration::from_secs(3600),
        UNIX_EPOCH + Duration::from_secs(1_795_648_505),
    )
}

fn get_token(c: &mut Criterion) {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => panic!("runtime: {error}"),
    };
    let router = runtime.block_on(async {
        let store = Arc::new(TokenStore::new(
            Duration::from_secs(5),
            Duration::from_secs(5),
            Duration::from_secs(5),
        ));
        store.set_token(Arc::new(token()));
        token_router(AppState::single(store, Duration::from_secs(5)))
    });
    c.bench_function("GET /token through the router", |b| {
        b.to_async(&runtime).iter(|| {
            let router = router.clone();
            async move {
                let request = Request::get("/token")
                    .header("host", "localhost")
                    .header("klavi-sidecar", "true")
                    .body(Body::empty())
                    .unwrap_or_default();
                let response = router.oneshot(request).await;
                let body = match response {
                    Ok(response) => response
                        .into_body()
                        .collect()
                        .await
                        .map(|b| b.to_bytes())
                        .ok(),
                    Err(never) => match never {},
                };
                black_box(body)
            }
        });
    });
    c.bench_function("GET /token without the header (403)", |b| {
        b.to_async(&runtime).iter(|| {
            let router = router.clone();
            async move {
                let request = Request::get("/token")
                    .header("host", "localhost")
                    .body(Body::empty())
                    .unwrap_or_default();
                black_box(router.oneshot(request).await.map(|r| r.status()))
            }
        });
    });
}

fn schedule(c: &mut Criterion) {
    let policy = RefreshPolicy::default();
    c.bench_function("refresh schedule", |b| {
        b.iter(|| {
            refresh_offset(
                black_box(Duration::from_secs(1800)),
                black_box(&policy),
                black_box(0.37),
            )
        })
    });
}

criterion_group!(benches, get_token, schedule);
criterion_main!(benches);
