//! What the benchmark drivers (`examples/bench.rs`,
//! `examples/proxy_bench.rs`) share: processes they start and always stop,
//! wrk runs with the CPU time they cost, plain HTTP probes, `/proc`
//! readings.
//!
//! Every process started here is stopped by its pid; every loop is
//! bounded.

// A benchmark measures real elapsed time on the real clock.
#![allow(clippy::disallowed_methods)]

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// What a benchmark step can fail with.
pub type Error = Box<dyn std::error::Error>;

/// A child process, stopped (SIGTERM, then kill) when dropped.
#[derive(Debug)]
pub struct Proc {
    child: Child,
    name: &'static str,
}

impl Proc {
    /// Starts `command` with no input and its output discarded.
    pub fn spawn(name: &'static str, command: &mut Command) -> Result<Self, Error> {
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start {name}: {e}"))?;
        Ok(Self { child, name })
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        for _ in 0..100 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("bench: {} did not stop on SIGTERM; killing it", self.name);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The token the bench's Klavi hands out.
pub const BENCH_TOKEN: &str =
    "eyJhbGciOiJFUzI1NiJ9.eyJpc3MiOiJiZW5jaCJ9.bench-signature-0123456789abcdef";

/// The bench's Klavi: `examples/reference_server` (from `bin_dir`)
/// answering every path with one auth response ([`BENCH_TOKEN`], an hour
/// to live), so it is a sidecar's auth endpoint and a fast Klavi API at
/// once; its body file goes in `dir`. Answering when this returns.
pub fn start_upstream(bin_dir: &Path, dir: &Path) -> Result<(Proc, SocketAddr), Error> {
    let expire_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs()
        + 3600;
    let body_file = dir.join("auth.json");
    std::fs::write(
        &body_file,
        format!("{{\"accessToken\":\"{BENCH_TOKEN}\",\"expireAt\":{expire_at}}}"),
    )?;
    let addr = free_addr()?;
    let upstream = Proc::spawn(
        "upstream",
        Command::new(bin_dir.join("examples/reference_server"))
            .args(["--listen", &addr.to_string()])
            .arg("--body-file")
            .arg(&body_file),
    )?;
    wait_answering(addr)?;
    Ok((upstream, addr))
}

/// Waits (up to 5 s) until `addr` answers HTTP at all.
pub fn wait_answering(addr: SocketAddr) -> Result<(), Error> {
    for _ in 0..500 {
        if get(addr, "/", false).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Err(format!("nothing answers on {addr}").into())
}

pub fn free_addr() -> Result<SocketAddr, Error> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

/// One HTTP/1.1 GET; returns (status, body).
pub fn get(addr: SocketAddr, path: &str, header: bool) -> std::io::Result<(u16, Vec<u8>)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let extra = if header {
        "Klavi-Sidecar: true\r\n"
    } else {
        ""
    };
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\n{extra}Connection: close\r\n\r\n"
    )?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    let status = std::str::from_utf8(response.get(9..12).unwrap_or_default())
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or_else(Vec::new, |i| response[i + 4..].to_vec());
    Ok((status, body))
}

pub fn wait_for(addr: SocketAddr, path: &str, limit: Duration) -> Result<Duration, Error> {
    let started = Instant::now();
    while started.elapsed() < limit {
        if matches!(get(addr, path, true), Ok((200, _))) {
            return Ok(started.elapsed());
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    Err(format!("{addr}{path} not 200 within {limit:?}").into())
}

pub fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

pub fn rss_kib(pid: u32) -> u64 {
    status_kib(pid, "VmRSS:")
}

/// User plus system CPU time of `pid`, in clock ticks (1/100 s on Linux).
pub fn cpu_ticks(pid: u32) -> u64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0;
    };
    // Fields after the command name (which may contain spaces).
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    field(11) + field(12)
}

pub fn clock_ticks_per_second() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok()?.trim().parse().ok())
        .unwrap_or(100.0)
}

#[derive(Debug, Clone, Default)]
pub struct Run {
    /// Requests per second.
    pub rps: f64,
    /// Median latency.
    pub p50_us: f64,
    /// 99th percentile latency.
    pub p99_us: f64,
    /// 99.9th percentile latency.
    pub p999_us: f64,
    /// CPU time of the measured processes per completed request.
    pub cpu_us_per_request: f64,
    /// Socket errors and answers that were not 2xx or 3xx.
    pub errors: u64,
}

/// One wrk run: `connections` keep-alive connections on `threads`
/// threads for `seconds`, GET `url` with `headers`.
#[derive(Debug, Clone)]
pub struct Wrk {
    /// What to load.
    pub url: String,
    /// Open connections.
    pub connections: u32,
    /// wrk threads.
    pub threads: u32,
    /// Length of the run.
    pub seconds: u64,
    /// Request headers, `Name: value`.
    pub headers: Vec<String>,
}

impl Wrk {
    /// Runs wrk (with `scripts/wrk-report.lua`), charging the CPU time the
    /// processes `pids` spent meanwhile to the requests it completed.
    pub fn run(&self, pids: &[u32], tick: f64) -> Result<Run, Error> {
        let cpu = || pids.iter().map(|pid| cpu_ticks(*pid)).sum::<u64>();
        let before = cpu();
        let mut command = Command::new("wrk");
        command.args([
            "-t",
            &self.threads.max(1).to_string(),
            "-c",
            &self.connections.to_string(),
            "-d",
            &format!("{}s", self.seconds),
            "-s",
            "scripts/wrk-report.lua",
        ]);
        for header in &self.headers {
            command.args(["-H", header]);
        }
        let output = command.arg(&self.url).output()?;
        let after = cpu();
        let text = String::from_utf8_lossy(&output.stdout);
        let line = text
            .lines()
            .find(|l| l.starts_with("RESULT "))
            .ok_or_else(|| format!("no RESULT from wrk: {text}"))?;
        let fields: BTreeMap<&str, f64> = line
            .split_whitespace()
            .skip(1)
            .filter_map(|kv| kv.split_once('='))
            .filter_map(|(k, v)| Some((k, v.parse().ok()?)))
            .collect();
        let value = |k: &str| fields.get(k).copied().unwrap_or(0.0);
        let requests = value("requests").max(1.0);
        Ok(Run {
            rps: requests / (value("duration_us") / 1e6),
            p50_us: value("p50"),
            p99_us: value("p99"),
            p999_us: value("p999"),
            cpu_us_per_request: (after.saturating_sub(before)) as f64 / tick * 1e6 / requests,
            errors: value("errors") as u64,
        })
    }
}

pub fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(0.0)
}
