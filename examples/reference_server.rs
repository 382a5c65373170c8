//! The benchmark's floor: bare hyper 1.x on tokio answering every request
//! with fixed bytes — the same body and headers `GET /token` returns — and
//! nothing else (no routing, no middleware, no token logic). Not shipped.
//!
//!     reference_server --listen 127.0.0.1:9089 --body-file token.json [--workers 1]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;

use bytes::Bytes;
use clap::Parser;
use http::{HeaderValue, Response, header};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

#[derive(Debug, Parser)]
struct Args {
    /// Address to listen on.
    #[arg(long)]
    listen: SocketAddr,
    /// The body to answer with (a saved `GET /token` response body).
    #[arg(long)]
    body_file: PathBuf,
    /// Content-Type to answer with.
    #[arg(long, default_value = "application/json")]
    content_type: String,
    /// Runtime worker threads (1: current-thread runtime, as the sidecar's
    /// default).
    #[arg(long, default_value_t = 1)]
    workers: usize,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let runtime = if args.workers == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(args.workers)
            .enable_all()
            .build()?
    };
    let body = Bytes::from(std::fs::read(&args.body_file)?);
    let content_type = HeaderValue::from_str(&args.content_type)?;
    runtime.block_on(async move {
        let listener = TcpListener::bind(args.listen).await?;
        loop {
            let (stream, _) = listener.accept().await?;
            let _ = stream.set_nodelay(true);
            let (body, content_type) = (body.clone(), content_type.clone());
            tokio::spawn(async move {
                let service = service_fn(move |_request| {
                    let mut response = Response::new(Full::new(body.clone()));
                    let headers = response.headers_mut();
                    headers.insert(header::CONTENT_TYPE, content_type.clone());
                    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
                    async move { Ok::<_, Infallible>(response) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    })
}
