//! The fleet simulation behind `scripts/fleet-sim` (issue 14): two fleets
//! of sidecar processes side by side in one run, each with its own fake
//! Klavi of short tokens: one in fleet mode on one `redis-server`, one
//! standalone. Both are loaded by the same clients for `--lifetimes` token
//! lifetimes, with a rolling restart of every sidecar of both fleets in the
//! middle and a Redis restart (empty) later.
//!
//! Measured: auth requests per token lifetime for each fleet, tokens
//! served per second, served tokens that were expired or that Klavi (the
//! fake, which knows what it issued) refuses, and the worst time any
//! sidecar was not ready. Writes the auth requests over time as CSV for
//! the plot (`scripts/fleet-plot.py`).
//!
//! Every process it starts, it stops, by its pid; every loop is bounded by
//! the run's deadline or a count.

// A simulation measures real elapsed time on the real clock.
#![allow(clippy::disallowed_methods, clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashSet;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::Parser;
use klavi_sidecar_testkit::bench::{Error, Proc, free_addr};
use klavi_sidecar_testkit::redis::RedisServer;
use klavi_token_sidecar::cache::policy::{RefreshPolicy, refresh_offset};
use klavi_token_sidecar::fake_klavi::{FakeKlavi, FakeKlaviConfig};
use tokio::sync::Mutex;

#[derive(Debug, Parser)]
struct Args {
    /// Directory holding the release binary.
    #[arg(long, default_value = "target/release")]
    bin_dir: PathBuf,
    /// Sidecars per fleet.
    #[arg(long, default_value_t = 20)]
    sidecars: usize,
    /// Token lifetime, seconds.
    #[arg(long, default_value_t = 12)]
    ttl: u64,
    /// Lifetimes the run lasts.
    #[arg(long, default_value_t = 12)]
    lifetimes: u64,
    /// Where the timeline goes (CSV).
    #[arg(long, default_value = "target/fleet-sim.csv")]
    csv: PathBuf,
}

/// One sidecar process and its addresses.
struct Sidecar {
    process: Option<Proc>,
    token: String,
    ops: String,
    env: Vec<(String, String)>,
    /// When it was (re)started.
    started: Instant,
}

fn spawn(bin: &PathBuf, token: &str, ops: &str, env: &[(String, String)]) -> Proc {
    let mut command = Command::new(bin);
    command
        .args(["run", "--listen", token, "--ops-listen", ops])
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    Proc::spawn("sidecar", &mut command).expect("the sidecar starts")
}

/// What the clients saw, per fleet.
#[derive(Default)]
struct Seen {
    served: AtomicU64,
    failed: AtomicU64,
    expired: AtomicU64,
    refused: AtomicU64,
    checked: AtomicU64,
    tokens: Mutex<HashSet<String>>,
}

fn now_unix() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Loads `fleet` round robin until `until`: each answer's expiry is
/// checked against the clock, and each distinct token (and every 50th
/// answer) against Klavi itself.
async fn load(
    http: reqwest::Client,
    fleet: Arc<Mutex<Vec<Sidecar>>>,
    klavi: String,
    seen: Arc<Seen>,
    until: Instant,
    offset: usize,
) {
    let mut i = offset;
    while Instant::now() < until {
        let target = {
            let fleet = fleet.lock().await;
            fleet[i % fleet.len()].token.clone()
        };
        i += 1;
        let answer = http
            .get(format!("http://{target}/token"))
            .header("Klavi-Sidecar", "true")
            .timeout(Duration::from_secs(6))
            .send()
            .await;
        let body: serde_json::Value = match answer {
            Ok(r) if r.status() == 200 => r.json().await.unwrap_or_default(),
            _ => {
                // A sidecar being restarted: connection refused.
                seen.failed.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(5)).await;
                continue;
            }
        };
        seen.served.fetch_add(1, Ordering::Relaxed);
        let token = body["accessToken"].as_str().unwrap_or_default().to_string();
        let expire_at = body["expireAt"].as_f64().unwrap_or(0.0);
        if expire_at <= now_unix() {
            seen.expired.fetch_add(1, Ordering::Relaxed);
        }
        let new = seen.tokens.lock().await.insert(token.clone());
        if new || i.is_multiple_of(50) {
            seen.checked.fetch_add(1, Ordering::Relaxed);
            let check = http
                .get(format!("{klavi}/payment/customer/v1/check"))
                .bearer_auth(&token)
                .send()
                .await;
            if !matches!(check, Ok(r) if r.status() == 200) {
                seen.refused.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// Polls every sidecar's `/readyz` (outside the fleet's lock); returns
/// the worst not-ready stretch (a restarted sidecar counts from its
/// restart).
async fn watch_readiness(
    http: reqwest::Client,
    fleets: Vec<Arc<Mutex<Vec<Sidecar>>>>,
    until: Instant,
) -> Duration {
    // Per sidecar: (started, ready since then, not ready since).
    let mut state: Vec<Vec<(Instant, bool, Option<Instant>)>> = Vec::new();
    let mut worst = Duration::ZERO;
    while Instant::now() < until {
        for (f, fleet) in fleets.iter().enumerate() {
            let snapshot: Vec<(String, Instant)> = fleet
                .lock()
                .await
                .iter()
                .map(|s| (s.ops.clone(), s.started))
                .collect();
            if state.len() <= f {
                state.push(snapshot.iter().map(|(_, at)| (*at, false, None)).collect());
            }
            for (i, (ops, started)) in snapshot.into_iter().enumerate() {
                let ready = http
                    .get(format!("http://{ops}/readyz"))
                    .timeout(Duration::from_millis(500))
                    .send()
                    .await
                    .is_ok_and(|r| r.status() == 200);
                let now = Instant::now();
                let entry = &mut state[f][i];
                if entry.0 != started {
                    *entry = (started, false, None);
                }
                let since = if entry.1 { entry.2 } else { Some(entry.0) };
                if ready {
                    if let Some(since) = since {
                        worst = worst.max(now - since);
                    }
                    *entry = (started, true, None);
                } else if entry.1 && entry.2.is_none() {
                    entry.2 = Some(now);
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    worst
}

fn fleet_of(bin: &PathBuf, n: usize, env: Vec<(String, String)>) -> Vec<Sidecar> {
    (0..n)
        .map(|_| {
            let token = free_addr().unwrap().to_string();
            let ops = free_addr().unwrap().to_string();
            let process = spawn(bin, &token, &ops, &env);
            Sidecar {
                process: Some(process),
                token,
                ops,
                env: env.clone(),
                started: Instant::now(),
            }
        })
        .collect()
}

/// Restarts sidecar `i` of `fleet` (SIGTERM, wait, start on the same
/// ports) and waits (up to 15 s) until it is ready.
async fn restart(
    http: &reqwest::Client,
    bin: &PathBuf,
    fleet: &Arc<Mutex<Vec<Sidecar>>>,
    i: usize,
) {
    let (token, ops, env) = {
        let mut fleet = fleet.lock().await;
        let sidecar = &mut fleet[i];
        sidecar.started = Instant::now();
        (
            sidecar.token.clone(),
            sidecar.ops.clone(),
            sidecar.env.clone(),
        )
    };
    // Stopped outside the lock (SIGTERM, then its drain).
    let old = fleet.lock().await[i].process.take();
    drop(old);
    let process = spawn(bin, &token, &ops, &env);
    fleet.lock().await[i].process = Some(process);
    for _ in 0..300 {
        let ready = http
            .get(format!("http://{ops}/readyz"))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200);
        if ready {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn main() -> Result<(), Error> {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(run(args))
}

async fn run(args: Args) -> Result<(), Error> {
    klavi_token_sidecar::upstream::klavi::install_crypto_provider();
    let bin = args.bin_dir.join("klavi-token-sidecar");
    let Some(mut redis) = RedisServer::start("the fleet simulation") else {
        return Err("redis-server is needed".into());
    };
    let fleet_klavi = FakeKlavi::start_local(FakeKlaviConfig::lasting(args.ttl)).await?;
    let solo_klavi = FakeKlavi::start_local(FakeKlaviConfig::lasting(args.ttl)).await?;
    let common = |klavi: &FakeKlavi| {
        vec![
            (
                "KLAVI_ACCESS_KEY".to_string(),
                "demo-access-key".to_string(),
            ),
            (
                "KLAVI_SECRET_KEY".to_string(),
                "demo-secret-key".to_string(),
            ),
            (
                "KLAVI_SIDECAR_KLAVI__BASE_URL".to_string(),
                klavi.base_url(),
            ),
            // A 12 s token is refreshed 7.8–9 s after its fetch.
            (
                "KLAVI_SIDECAR_REFRESH__REFRESH_BEFORE_SECS".to_string(),
                "3".to_string(),
            ),
            (
                "KLAVI_SIDECAR_REFRESH__SERVE_MARGIN_SECS".to_string(),
                "2".to_string(),
            ),
            (
                "KLAVI_SIDECAR_SERVER__SHUTDOWN_GRACE_SECS".to_string(),
                "6".to_string(),
            ),
            ("RUST_LOG".to_string(), "warn".to_string()),
        ]
    };
    let mut fleet_env = common(&fleet_klavi);
    fleet_env.push(("KLAVI_SIDECAR_FLEET__REDIS_URL".to_string(), redis.url()));
    let solo_env = common(&solo_klavi);
    let started = Instant::now();
    let fleet = Arc::new(Mutex::new(fleet_of(&bin, args.sidecars, fleet_env)));
    let solo = Arc::new(Mutex::new(fleet_of(&bin, args.sidecars, solo_env)));
    let duration = Duration::from_secs(args.ttl * args.lifetimes);
    let until = started + duration;
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(8)
        .build()?;

    let (fleet_seen, solo_seen) = (Arc::new(Seen::default()), Arc::new(Seen::default()));
    let mut clients = Vec::new();
    for offset in 0..4 {
        clients.push(tokio::spawn(load(
            http.clone(),
            Arc::clone(&fleet),
            fleet_klavi.base_url(),
            Arc::clone(&fleet_seen),
            until,
            offset * 5,
        )));
        clients.push(tokio::spawn(load(
            http.clone(),
            Arc::clone(&solo),
            solo_klavi.base_url(),
            Arc::clone(&solo_seen),
            until,
            offset * 5,
        )));
    }
    let readiness = tokio::spawn(watch_readiness(
        http.clone(),
        vec![Arc::clone(&fleet), Arc::clone(&solo)],
        until,
    ));

    // The timeline: auth requests so far, each second; events marked.
    let mut rows = vec!["t,fleet_auth,standalone_auth,event".to_string()];
    let rolling_at = started + duration * 35 / 100;
    let redis_at = started + duration * 70 / 100;
    let (mut rolled, mut redis_restarted) = (false, false);
    let mut next_sample = started;
    for _ in 0..(duration.as_secs() * 4 + 100) {
        let now = Instant::now();
        if now >= until {
            break;
        }
        if now >= next_sample {
            let t = now.duration_since(started).as_secs_f64();
            rows.push(format!(
                "{t:.2},{},{},",
                fleet_klavi.calls(),
                solo_klavi.calls()
            ));
            next_sample += Duration::from_secs(1);
        }
        if !rolled && now >= rolling_at {
            rolled = true;
            let t0 = Instant::now();
            let t = t0.duration_since(started).as_secs_f64();
            rows.push(format!(
                "{t:.2},{},{},rolling restart",
                fleet_klavi.calls(),
                solo_klavi.calls()
            ));
            // Both fleets at once, one sidecar at a time each, the next
            // once the last is ready (the way a Deployment rolls).
            for i in 0..args.sidecars {
                tokio::join!(
                    restart(&http, &bin, &fleet, i),
                    restart(&http, &bin, &solo, i)
                );
                let t = Instant::now().duration_since(started).as_secs_f64();
                rows.push(format!(
                    "{t:.2},{},{},",
                    fleet_klavi.calls(),
                    solo_klavi.calls()
                ));
            }
            println!(
                "rolling restart of 2 x {} sidecars: {:.1} s",
                args.sidecars,
                t0.elapsed().as_secs_f64()
            );
            let t = Instant::now().duration_since(started).as_secs_f64();
            rows.push(format!(
                "{t:.2},{},{},rolling restart done",
                fleet_klavi.calls(),
                solo_klavi.calls()
            ));
        }
        if !redis_restarted && now >= redis_at {
            redis_restarted = true;
            // Killed and started again, empty (what a Redis pod's restart
            // without persistence does).
            let t = Instant::now().duration_since(started).as_secs_f64();
            rows.push(format!(
                "{t:.2},{},{},redis restart",
                fleet_klavi.calls(),
                solo_klavi.calls()
            ));
            let down = Instant::now();
            tokio::task::block_in_place(|| redis.restart());
            println!("Redis restart: down {:.2} s", down.elapsed().as_secs_f64());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    for client in clients {
        let _ = client.await;
    }
    let worst_unready = readiness.await.unwrap_or_default();
    let elapsed = started.elapsed().as_secs_f64();
    rows.push(format!(
        "{elapsed:.2},{},{},end",
        fleet_klavi.calls(),
        solo_klavi.calls()
    ));
    if let Some(dir) = args.csv.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&args.csv, rows.join("\n") + "\n")?;

    let lifetimes = elapsed / args.ttl as f64;
    // How long a standalone sidecar uses a token before replacing it,
    // under this policy, on average over its jitter: the lifetime that
    // counts ("one auth request per lifetime"). Expiries are whole seconds,
    // so a token lives half a second less than the TTL on average.
    let policy = RefreshPolicy {
        refresh_before: Duration::from_secs(3),
        serve_margin: Duration::from_secs(2),
        ..RefreshPolicy::default()
    };
    let lived = Duration::from_secs_f64(args.ttl as f64 - 0.5);
    let cycle = (0..1000)
        .map(|i| refresh_offset(lived, &policy, (f64::from(i) + 0.5) / 1000.0).as_secs_f64())
        .sum::<f64>()
        / 1000.0;
    let cycles = elapsed / cycle;
    let report = |name: &str, klavi: &FakeKlavi, seen: &Seen| {
        println!(
            "{name:<10} auth requests {:>4} = {:>5.2} per refresh cycle ({:>5.2} per {} s lifetime); \
             served {:>6} ({:>6.0}/s), failed (restarting) {:>4}, expired {}, refused by Klavi {} \
             of {} checked, distinct tokens {}",
            klavi.calls(),
            klavi.calls() as f64 / cycles,
            klavi.calls() as f64 / lifetimes,
            args.ttl,
            seen.served.load(Ordering::Relaxed),
            seen.served.load(Ordering::Relaxed) as f64 / elapsed,
            seen.failed.load(Ordering::Relaxed),
            seen.expired.load(Ordering::Relaxed),
            seen.refused.load(Ordering::Relaxed),
            seen.checked.load(Ordering::Relaxed),
            seen.tokens.try_lock().map_or(0, |t| t.len()),
        );
    };
    println!(
        "{} sidecars per fleet, tokens of {} s refreshed every {cycle:.2} s on average, {:.1} s = \
         {cycles:.1} refresh cycles; rolling restart at 35 %, Redis restarted at 70 %",
        args.sidecars, args.ttl, elapsed
    );
    report("fleet", &fleet_klavi, &fleet_seen);
    report("standalone", &solo_klavi, &solo_seen);
    println!(
        "worst time a sidecar was not ready (restarts included): {:.2} s",
        worst_unready.as_secs_f64()
    );
    println!("timeline: {}", args.csv.display());
    // Stops every sidecar (Proc's drop), then Redis and the fakes.
    drop(fleet.lock().await.drain(..));
    drop(solo.lock().await.drain(..));
    drop(redis);
    fleet_klavi.stop().await;
    solo_klavi.stop().await;
    Ok(())
}
