//! Lease benchmarks behind `scripts/bench-leases` (BENCHMARKS.md, "Leases"):
//!
//! - latency of `POST /token/lease` from a full pool, beside `GET /token`
//!   of a shared profile measured on the same connection in the same run;
//! - the sustained lease rate with the pool empty (`pool_size = 0`), against
//!   a fake Klavi answering in 50 ms: one auth request in flight at a time,
//!   so Klavi's latency bounds it, and the auth budget bounds it again.
//!
//! Release binaries only; every process it starts, it stops; every loop is
//! bounded by a count or a deadline.

// A benchmark measures real elapsed time on the real clock.
#![allow(clippy::disallowed_methods)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clap::Parser;

#[derive(Debug, Parser)]
struct Args {
    /// The release binary.
    #[arg(long, default_value = "target/release/klavi-token-sidecar")]
    bin: PathBuf,
    /// Rounds of leasing a full pool of 100.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Seconds per empty-pool run.
    #[arg(long, default_value_t = 15)]
    seconds: u64,
}

type Error = Box<dyn std::error::Error>;

/// A child process, stopped (SIGTERM, then kill) when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        for _ in 0..100 {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_addr() -> Result<SocketAddr, Error> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

/// One keep-alive HTTP/1.1 connection.
struct Conn {
    reader: BufReader<TcpStream>,
}

impl Conn {
    fn open(addr: SocketAddr) -> Result<Self, Error> {
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        Ok(Self {
            reader: BufReader::new(stream),
        })
    }

    /// Sends one request; returns the status and body.
    fn call(&mut self, method: &str, path: &str) -> Result<(u16, Vec<u8>), Error> {
        write!(
            self.reader.get_mut(),
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\nKlavi-Sidecar: true\r\nContent-Length: 0\r\n\r\n"
        )?;
        let mut line = String::new();
        self.reader.read_line(&mut line)?;
        let status = line.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
        let mut length = 0usize;
        loop {
            line.clear();
            if self.reader.read_line(&mut line)? == 0 {
                return Err("connection closed".into());
            }
            if line == "\r\n" {
                break;
            }
            if let Some((name, value)) = line.split_once(':')
                && name.eq_ignore_ascii_case("content-length")
            {
                length = value.trim().parse()?;
            }
        }
        let mut body = vec![0; length];
        self.reader.read_exact(&mut body)?;
        Ok((status, body))
    }
}

fn json(body: &[u8]) -> serde_json::Value {
    serde_json::from_slice(body).unwrap_or_default()
}

/// A fake Klavi process answering after `delay_ms`; its address.
fn fake(bin: &PathBuf, delay_ms: u64) -> Result<(Proc, SocketAddr), Error> {
    let addr = free_addr()?;
    let mut command = Command::new(bin);
    command.args([
        "fake-klavi",
        "--listen",
        &addr.to_string(),
        "--token-ttl",
        "300",
    ]);
    if delay_ms > 0 {
        command.args([
            "--faults",
            &format!("delay:{delay_ms}"),
            "--fault-rate",
            "1",
        ]);
    }
    let child = command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let proc = Proc(child);
    wait_until(Duration::from_secs(10), || TcpStream::connect(addr).is_ok())?;
    Ok((proc, addr))
}

/// A sidecar with a shared default profile and a single_use `pay`
/// profile against `klavi`; its token and ops addresses.
fn sidecar(
    bin: &PathBuf,
    klavi: SocketAddr,
    pool_size: usize,
    budget: u32,
) -> Result<(Proc, SocketAddr, SocketAddr), Error> {
    let (token, ops) = (free_addr()?, free_addr()?);
    let base = format!("http://{klavi}");
    let child = Command::new(bin)
        .args([
            "run",
            "--listen",
            &token.to_string(),
            "--ops-listen",
            &ops.to_string(),
        ])
        .env_clear()
        .env("KLAVI_ACCESS_KEY", "demo-access-key")
        .env("KLAVI_SECRET_KEY", "demo-secret-key")
        .env("KLAVI_SIDECAR_KLAVI__BASE_URL", &base)
        .env("KLAVI_SIDECAR_PROFILES__PAY__ACCESS_KEY", "demo-access-key")
        .env("KLAVI_SIDECAR_PROFILES__PAY__SECRET_KEY", "demo-secret-key")
        .env("KLAVI_SIDECAR_PROFILES__PAY__MODE", "single_use")
        .env(
            "KLAVI_SIDECAR_PROFILES__PAY__POOL_SIZE",
            pool_size.to_string(),
        )
        .env(
            "KLAVI_SIDECAR_PROFILES__PAY__REFRESH__MAX_AUTH_PER_MINUTE",
            budget.to_string(),
        )
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let proc = Proc(child);
    wait_until(Duration::from_secs(15), || {
        Conn::open(ops)
            .and_then(|mut c| c.call("GET", "/readyz"))
            .is_ok_and(|(status, _)| status == 200)
    })?;
    Ok((proc, token, ops))
}

fn wait_until(limit: Duration, mut done: impl FnMut() -> bool) -> Result<(), Error> {
    let started = Instant::now();
    while started.elapsed() < limit {
        if done() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Err(format!("not done within {limit:?}").into())
}

fn pooled(ops: SocketAddr) -> u64 {
    Conn::open(ops)
        .and_then(|mut c| c.call("GET", "/readyz"))
        .map(|(_, body)| {
            json(&body)["profiles"]["pay"]["pooled"]
                .as_u64()
                .unwrap_or(0)
        })
        .unwrap_or(0)
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let index = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[index].as_secs_f64() * 1e6
}

/// Leases a full pool of 100, `rounds` times, beside `GET /token`.
fn full_pool(args: &Args) -> Result<(), Error> {
    let (_fake, klavi) = fake(&args.bin, 0)?;
    let (_sidecar, token, ops) = sidecar(&args.bin, klavi, 100, 600)?;
    let mut conn = Conn::open(token)?;
    let (mut leases, mut gets) = (Vec::new(), Vec::new());
    let mut seen = std::collections::HashSet::new();
    for _ in 0..args.rounds {
        wait_until(Duration::from_secs(30), || pooled(ops) == 100)?;
        for _ in 0..100 {
            let started = Instant::now();
            let (status, body) = conn.call("GET", "/token")?;
            gets.push(started.elapsed());
            assert_eq!(status, 200);
            drop(body);
            let started = Instant::now();
            let (status, body) = conn.call("POST", "/profiles/pay/token/lease")?;
            leases.push(started.elapsed());
            if status != 200 {
                return Err(format!("lease answered {status}").into());
            }
            let token = json(&body)["accessToken"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            if !seen.insert(token) {
                return Err("a token leased twice".into());
            }
        }
    }
    leases.sort();
    gets.sort();
    println!(
        "full pool: {} leases from a pool of 100 (one keep-alive connection, alternating with GET /token)",
        leases.len()
    );
    println!("| request | p50 µs | p99 µs | max µs |");
    println!("|---|---:|---:|---:|");
    for (name, samples) in [
        ("POST /profiles/pay/token/lease", &leases),
        ("GET /token (reference)", &gets),
    ] {
        println!(
            "| {name} | {:.0} | {:.0} | {:.0} |",
            percentile(samples, 0.5),
            percentile(samples, 0.99),
            percentile(samples, 1.0)
        );
    }
    println!("distinct tokens: {}", seen.len());
    Ok(())
}

/// `clients` leasing as fast as they can for `seconds` from an empty pool.
fn empty_pool(args: &Args, clients: usize, budget: u32, seconds: u64) -> Result<(), Error> {
    let (_fake, klavi) = fake(&args.bin, 50)?;
    let (_sidecar, token, _ops) = sidecar(&args.bin, klavi, 0, budget)?;
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let workers: Vec<_> = (0..clients)
        .map(|_| {
            std::thread::spawn(move || -> Result<(Vec<Duration>, u64), String> {
                let mut conn = Conn::open(token).map_err(|e| e.to_string())?;
                let (mut ok, mut limited) = (Vec::new(), 0u64);
                while Instant::now() < deadline {
                    let started = Instant::now();
                    let (status, body) = conn
                        .call("POST", "/profiles/pay/token/lease")
                        .map_err(|e| e.to_string())?;
                    match status {
                        200 => ok.push(started.elapsed()),
                        503 if json(&body)["lastError"] == "local_rate_limit" => {
                            limited += 1;
                            // As a client honouring Retry-After would.
                            std::thread::sleep(Duration::from_millis(200));
                        }
                        other => return Err(format!("lease answered {other}")),
                    }
                }
                Ok((ok, limited))
            })
        })
        .collect();
    let (mut ok, mut limited) = (Vec::new(), 0);
    for worker in workers {
        let (o, l) = worker.join().map_err(|_| "a client panicked")??;
        ok.extend(o);
        limited += l;
    }
    ok.sort();
    println!(
        "| {clients} | {budget} | {seconds} | {} | {:.1} | {:.0} | {:.0} | {limited} |",
        ok.len(),
        ok.len() as f64 / seconds as f64,
        percentile(&ok, 0.5) / 1000.0,
        percentile(&ok, 0.99) / 1000.0,
    );
    Ok(())
}

fn main() -> Result<(), Error> {
    let args = Args::parse();
    full_pool(&args)?;
    println!();
    println!("empty pool (pool_size = 0), fake Klavi answering every auth request in 50 ms:");
    println!(
        "| clients | budget /min | seconds | leases | leases/s | p50 ms | p99 ms | 503 local_rate_limit |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|");
    empty_pool(&args, 1, 600, args.seconds)?;
    empty_pool(&args, 8, 600, args.seconds)?;
    empty_pool(&args, 8, 60, args.seconds * 2)?;
    Ok(())
}
