//! The long chaos soak: `scripts/soak [SECONDS]` runs this against the
//! release binary. See `klavi_sidecar_testkit::soak` for what it checks.

use std::path::PathBuf;
use std::process::{ExitCode, Stdio};
use std::time::Duration;

use clap::Parser;
use klavi_sidecar_testkit::soak::{self, Sidecar, SoakConfig};
use klavi_token_sidecar::fake_klavi::{FakeKlavi, FakeKlaviConfig};

/// Chaos soak of the sidecar binary on loopback.
#[derive(Debug, Parser)]
struct Args {
    /// How long to run, seconds.
    #[arg(long, default_value_t = 600)]
    duration_secs: u64,
    /// The sidecar binary.
    #[arg(long, default_value = "target/release/klavi-token-sidecar")]
    binary: PathBuf,
    /// Concurrent clients of the token routes.
    #[arg(long, default_value_t = 64)]
    clients: usize,
    /// Concurrent clients calling Klavi's API through the proxy.
    #[arg(long, default_value_t = 8)]
    proxy_clients: usize,
    /// Pause between one client's requests, ms.
    #[arg(long, default_value_t = 5)]
    pacing_ms: u64,
    /// Lifetime of the fake's tokens, seconds.
    #[arg(long, default_value_t = 30)]
    token_ttl_secs: u64,
    /// Length of each fault phase, seconds (longer than a token's servable
    /// life, so tokens run out during faults).
    #[arg(long, default_value_t = 30)]
    fault_secs: u64,
    /// Length of each healthy phase, seconds.
    #[arg(long, default_value_t = 5)]
    healthy_secs: u64,
    /// Write the sidecar's log here.
    #[arg(long)]
    log: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    match run(args).await {
        Ok(clean) if clean => ExitCode::SUCCESS,
        Ok(_) => ExitCode::FAILURE,
        Err(error) => {
            eprintln!("soak: {error}");
            ExitCode::from(2)
        }
    }
}

async fn run(args: Args) -> Result<bool, Box<dyn std::error::Error>> {
    let backoff_max = Duration::from_secs(5);
    let fake = FakeKlavi::start_local(FakeKlaviConfig {
        token_ttl: Duration::from_secs(args.token_ttl_secs),
        ..FakeKlaviConfig::default()
    })
    .await?;
    let stderr = match &args.log {
        Some(path) => Stdio::from(std::fs::File::create(path)?),
        None => Stdio::null(),
    };
    let sidecar = Sidecar::spawn(
        &args.binary,
        &fake.base_url(),
        &[
            ("KLAVI_SIDECAR_KLAVI__REQUEST_TIMEOUT_MS", "2000"),
            ("KLAVI_SIDECAR_REFRESH__BACKOFF_MAX_SECS", "5"),
            ("KLAVI_SIDECAR_REFRESH__WAIT_MS", "1000"),
            ("RUST_LOG", "info"),
        ],
        stderr,
    )?;
    let pid = sidecar.pid();
    println!(
        "soak: {} s, {} clients, {} s tokens, {} s faults / {} s healthy, sidecar pid {pid}",
        args.duration_secs, args.clients, args.token_ttl_secs, args.fault_secs, args.healthy_secs
    );
    let report = soak::run(
        SoakConfig {
            token_base: sidecar.token_base.clone(),
            ops_base: sidecar.ops_base.clone(),
            duration: Duration::from_secs(args.duration_secs),
            clients: args.clients,
            pacing: Duration::from_millis(args.pacing_ms),
            fault_phase: Duration::from_secs(args.fault_secs),
            healthy_phase: Duration::from_secs(args.healthy_secs),
            serve_margin: Duration::from_secs(5),
            backoff_max,
            rss_growth_limit: 2 << 20,
            reject_every: Some(Duration::from_secs(2)),
            proxy_base: sidecar.proxy_base.clone(),
            proxy_clients: args.proxy_clients,
            revoke_every: Some(Duration::from_secs(3)),
        },
        &fake,
        || soak::rss_of(pid),
    )
    .await;
    let exit = sidecar.stop()?;
    fake.stop().await;
    print!("{}", report.summary());
    println!("sidecar exit       {exit}");
    Ok(report.violation_count == 0 && exit.success())
}
