//! The unix-socket benchmark behind `scripts/bench unix`: `GET /token`
//! over a unix socket against the same over TCP loopback, side by side in
//! one run: two sidecars of one binary and one configuration but the
//! listener, loaded in alternating rounds by the same closed-loop client
//! (below: one blocking keep-alive connection per thread, speaking either
//! transport), so only the transport differs. The figure that matters is
//! the sidecar's CPU time per request (from `/proc`), which the client's
//! own cost does not enter. See BENCHMARKS.md.
//!
//! Every process it starts, it stops; every loop is bounded (by the
//! round's deadline or a count).

// A benchmark measures real elapsed time on the real clock.
#![allow(clippy::disallowed_methods)]

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use clap::Parser;
use klavi_sidecar_testkit::bench::{
    Error, Proc, clock_ticks_per_second, cpu_ticks, free_addr, median, rss_kib, start_upstream,
};

#[derive(Debug, Parser)]
struct Args {
    /// Directory holding the release binaries.
    #[arg(long, default_value = "target/release")]
    bin_dir: PathBuf,
    /// Seconds per run.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Rounds of alternation per connection count.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Connection counts (client threads) to measure.
    #[arg(long, value_delimiter = ',', default_value = "8,64")]
    connections: Vec<u32>,
}

const REQUEST: &[u8] = b"GET /token HTTP/1.1\r\nHost: localhost\r\nKlavi-Sidecar: true\r\n\r\n";

/// Where a sidecar's token listener is.
#[derive(Debug, Clone)]
enum Target {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl Target {
    fn connect(&self) -> std::io::Result<Box<dyn Stream>> {
        Ok(match self {
            Self::Tcp(addr) => {
                let stream = TcpStream::connect(addr)?;
                stream.set_nodelay(true)?;
                stream.set_read_timeout(Some(Duration::from_secs(5)))?;
                Box::new(stream)
            }
            Self::Unix(path) => {
                let stream = UnixStream::connect(path)?;
                stream.set_read_timeout(Some(Duration::from_secs(5)))?;
                Box::new(stream)
            }
        })
    }
}

trait Stream: Read + Write + Send {}
impl<T: Read + Write + Send> Stream for T {}

/// One exchange on a keep-alive connection: writes the request, reads one
/// answer whole (headers, then `Content-Length` bytes); its status.
fn exchange(stream: &mut dyn Stream, buf: &mut Vec<u8>) -> std::io::Result<u16> {
    stream.write_all(REQUEST)?;
    buf.clear();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        if buf.len() > 64 * 1024 {
            return Err(std::io::Error::other("head too large"));
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    let status = head.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| std::io::Error::other("no content-length"))?;
    while buf.len() < head_end + length {
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Ok(status)
}

/// What one run measured.
#[derive(Debug, Clone, Copy, Default)]
struct Run {
    rps: f64,
    p50_us: f64,
    p99_us: f64,
    cpu_us_per_request: f64,
    errors: u64,
}

/// `connections` threads, each one connection, for `seconds`; the CPU time
/// `pid` spent meanwhile is charged to the requests completed.
fn load(
    target: &Target,
    connections: u32,
    seconds: u64,
    pid: u32,
    tick: f64,
) -> Result<Run, Error> {
    let before = cpu_ticks(pid);
    let started = Instant::now();
    let deadline = started + Duration::from_secs(seconds);
    let threads: Vec<_> = (0..connections)
        .map(|_| {
            let target = target.clone();
            std::thread::spawn(move || -> (Vec<u32>, u64) {
                let mut latencies = Vec::with_capacity(1 << 16);
                let mut errors = 0u64;
                let mut buf = Vec::with_capacity(1024);
                let Ok(mut stream) = target.connect() else {
                    return (latencies, 1);
                };
                while Instant::now() < deadline {
                    let sent = Instant::now();
                    match exchange(stream.as_mut(), &mut buf) {
                        Ok(200) => latencies.push(sent.elapsed().as_micros() as u32),
                        Ok(_) => errors += 1,
                        Err(_) => {
                            errors += 1;
                            match target.connect() {
                                Ok(fresh) => stream = fresh,
                                Err(_) => break,
                            }
                        }
                    }
                }
                (latencies, errors)
            })
        })
        .collect();
    let mut latencies = Vec::new();
    let mut errors = 0;
    for thread in threads {
        let (mut l, e) = thread.join().map_err(|_| "a client thread panicked")?;
        latencies.append(&mut l);
        errors += e;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let after = cpu_ticks(pid);
    latencies.sort_unstable();
    let at = |q: f64| {
        latencies
            .get(((latencies.len() as f64 * q) as usize).min(latencies.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0) as f64
    };
    let requests = (latencies.len() as f64).max(1.0);
    Ok(Run {
        rps: requests / elapsed,
        p50_us: at(0.5),
        p99_us: at(0.99),
        cpu_us_per_request: after.saturating_sub(before) as f64 / tick * 1e6 / requests,
        errors,
    })
}

fn main() -> Result<(), Error> {
    let args = Args::parse();
    let tick = clock_ticks_per_second();
    let dir = std::env::temp_dir().join(format!("klavi-unix-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let result = run(&args, tick, &dir);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn run(args: &Args, tick: f64, dir: &Path) -> Result<(), Error> {
    let (upstream, upstream_addr) = start_upstream(&args.bin_dir, dir)?;

    let socket = dir.join("token.sock");
    let tcp_addr = free_addr()?;
    let tcp = start_sidecar(args, upstream_addr, &tcp_addr.to_string())?;
    let unix = start_sidecar(args, upstream_addr, &format!("unix:{}", socket.display()))?;
    let contestants = [
        ("TCP loopback", Target::Tcp(tcp_addr), tcp.pid()),
        ("unix socket", Target::Unix(socket), unix.pid()),
    ];
    for (name, target, _) in &contestants {
        wait_serving(name, target)?;
    }
    println!(
        "unix-socket benchmark: GET /token, {} rounds of {} s per transport and connection \
         count, one closed-loop client thread per connection",
        args.rounds, args.seconds
    );
    let mut results: BTreeMap<(u32, &'static str), Vec<Run>> = BTreeMap::new();
    for &connections in &args.connections {
        // Warm-up, not counted.
        for (_, target, pid) in &contestants {
            load(target, connections, 2, *pid, tick)?;
        }
        for round in 0..args.rounds {
            for (name, target, pid) in &contestants {
                let run = load(target, connections, args.seconds, *pid, tick)?;
                eprintln!(
                    "round {} c={connections} {name:<13} {:>9.0} req/s p50 {:>5.0} µs p99 {:>6.0} µs sidecar CPU {:>5.2} µs/req errors {}",
                    round + 1,
                    run.rps,
                    run.p50_us,
                    run.p99_us,
                    run.cpu_us_per_request,
                    run.errors
                );
                results.entry((connections, name)).or_default().push(run);
            }
        }
    }
    println!();
    println!("| connections | transport | req/s | p50 µs | p99 µs | sidecar CPU µs/req | errors |");
    println!("|---|---|---|---|---|---|---|");
    for &connections in &args.connections {
        for (name, _, _) in &contestants {
            let runs = &results[&(connections, *name)];
            let m = |f: fn(&Run) -> f64| median(runs.iter().map(f).collect());
            println!(
                "| {connections} | {name} | {:.0} | {:.0} | {:.0} | {:.2} | {} |",
                m(|r| r.rps),
                m(|r| r.p50_us),
                m(|r| r.p99_us),
                m(|r| r.cpu_us_per_request),
                runs.iter().map(|r| r.errors).sum::<u64>()
            );
        }
    }
    println!();
    for &connections in &args.connections {
        let cpu = |name: &str| {
            median(
                results[&(connections, name)]
                    .iter()
                    .map(|r| r.cpu_us_per_request)
                    .collect(),
            )
        };
        let rps = |name: &str| {
            median(
                results[&(connections, name)]
                    .iter()
                    .map(|r| r.rps)
                    .collect(),
            )
        };
        let ratio = cpu("unix socket") / cpu("TCP loopback");
        println!(
            "c={connections}: unix/TCP CPU per request {ratio:.2} (target ≤ 0.80: {}), throughput {:.2}",
            if ratio <= 0.80 { "met" } else { "NOT met" },
            rps("unix socket") / rps("TCP loopback")
        );
    }
    println!(
        "RSS after the load: TCP sidecar {:.1} MiB, unix sidecar {:.1} MiB",
        rss_kib(tcp.pid()) as f64 / 1024.0,
        rss_kib(unix.pid()) as f64 / 1024.0
    );
    drop(unix);
    drop(tcp);
    drop(upstream);
    Ok(())
}

/// A sidecar serving the token on `listen`, its Klavi the upstream.
fn start_sidecar(args: &Args, upstream: SocketAddr, listen: &str) -> Result<Proc, Error> {
    Proc::spawn(
        "sidecar",
        Command::new(args.bin_dir.join("klavi-token-sidecar"))
            .args(["run", "--listen", listen, "--ops-listen", ""])
            .env_clear()
            .env("KLAVI_ACCESS_KEY", "bench-access-key")
            .env("KLAVI_SECRET_KEY", "bench-secret-key")
            .env(
                "KLAVI_SIDECAR_KLAVI__BASE_URL",
                format!("http://{upstream}"),
            )
            .env("RUST_LOG", "warn"),
    )
}

/// Waits until `GET /token` answers 200 on `target`.
fn wait_serving(name: &str, target: &Target) -> Result<(), Error> {
    let mut buf = Vec::new();
    for _ in 0..500 {
        if let Ok(mut stream) = target.connect()
            && exchange(stream.as_mut(), &mut buf).is_ok_and(|status| status == 200)
        {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Err(format!("the {name} sidecar never served a token").into())
}
