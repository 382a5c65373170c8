//! The proxy benchmark behind `scripts/bench proxy`: requests through the
//! sidecar's proxy to a fast upstream on loopback, side by side in one run
//! with nginx as a reverse proxy to the same upstream and with the client
//! calling the upstream directly. Prints one table; see BENCHMARKS.md.
//!
//! The upstream is `examples/reference_server.rs` answering every path
//! with one auth-response JSON, so it is Klavi's auth endpoint for the
//! sidecar and a fast Klavi API for everyone. Every process it starts, it
//! stops; every loop is bounded.

// A benchmark measures real elapsed time on the real clock.
#![allow(clippy::disallowed_methods)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use clap::Parser;
use klavi_sidecar_testkit::bench::{
    BENCH_TOKEN, Error, Proc, Run, Wrk, clock_ticks_per_second, free_addr, median, rss_kib,
    start_upstream, wait_answering, wait_for,
};

#[derive(Debug, Parser)]
struct Args {
    /// Directory holding the release binaries.
    #[arg(long, default_value = "target/release")]
    bin_dir: PathBuf,
    /// Seconds per wrk run.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Rounds of alternation per connection count.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Connection counts to measure.
    #[arg(long, value_delimiter = ',', default_value = "8,64")]
    connections: Vec<u32>,
    /// wrk threads.
    #[arg(long, default_value_t = 2)]
    wrk_threads: u32,
    /// The nginx binary.
    #[arg(long, default_value = "/usr/sbin/nginx")]
    nginx: PathBuf,
}

/// The API path every contestant is asked for.
const PATH: &str = "/payment/customer/v1/payments";

/// One way of reaching the upstream.
struct Contestant {
    name: &'static str,
    url: String,
    headers: Vec<String>,
    /// The processes whose CPU time is the proxy's (none for the direct
    /// call).
    pids: Vec<u32>,
}

fn main() -> Result<(), Error> {
    let args = Args::parse();
    let tick = clock_ticks_per_second();
    let dir = std::env::temp_dir().join(format!("klavi-proxy-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let result = run(&args, tick, &dir);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn run(args: &Args, tick: f64, dir: &Path) -> Result<(), Error> {
    let token = BENCH_TOKEN;
    let (upstream, upstream_addr) = start_upstream(&args.bin_dir, dir)?;

    let sidecar = start_sidecar(args, upstream_addr, true)?;
    let quiet = start_sidecar(args, upstream_addr, false)?;
    let nginx_addr = free_addr()?;
    let nginx = start_nginx(args, dir, nginx_addr, upstream_addr, token)?;
    let nginx_pids = nginx_pids(nginx.pid());
    wait_answering(nginx_addr)?;

    let contestants = [
        Contestant {
            name: "direct",
            url: format!("http://{upstream_addr}{PATH}"),
            headers: vec![format!("Authorization: Bearer {token}")],
            pids: vec![],
        },
        Contestant {
            name: "nginx",
            url: format!("http://{nginx_addr}{PATH}"),
            headers: vec![],
            pids: nginx_pids.clone(),
        },
        Contestant {
            name: "sidecar",
            url: format!("http://{}{PATH}", sidecar.1),
            headers: vec!["Klavi-Sidecar: true".into()],
            pids: vec![sidecar.0.pid()],
        },
        Contestant {
            name: "sidecar, no access log",
            url: format!("http://{}{PATH}", quiet.1),
            headers: vec!["Klavi-Sidecar: true".into()],
            pids: vec![quiet.0.pid()],
        },
    ];
    // Each answers 200 before the load.
    for c in &contestants {
        let load = wrk_of(args, c, 1, 1);
        let run = load.run(&[], tick)?;
        if run.errors > 0 {
            return Err(format!("{} answers errors before the load", c.name).into());
        }
    }
    println!(
        "proxy benchmark: {} rounds of {} s per contestant and connection count, wrk {} threads",
        args.rounds, args.seconds, args.wrk_threads
    );
    let mut results: BTreeMap<(u32, &'static str), Vec<(Run, f64)>> = BTreeMap::new();
    for &connections in &args.connections {
        for c in &contestants {
            wrk_of(args, c, connections, 2).run(&c.pids, tick)?;
        }
        for round in 0..args.rounds {
            for c in &contestants {
                let upstream_before = cpu_of(upstream.pid());
                let run = wrk_of(args, c, connections, args.seconds).run(&c.pids, tick)?;
                let requests = (run.rps * args.seconds as f64).max(1.0);
                let upstream_us =
                    (cpu_of(upstream.pid()).saturating_sub(upstream_before)) as f64 / tick * 1e6
                        / requests;
                eprintln!(
                    "round {} c={connections} {:<24} {:>9.0} req/s p50 {:>6} µs p99 {:>6} µs proxy CPU {:>6.2} µs/req upstream CPU {:>5.2} µs/req errors {}",
                    round + 1,
                    c.name,
                    run.rps,
                    run.p50_us,
                    run.p99_us,
                    run.cpu_us_per_request,
                    upstream_us,
                    run.errors
                );
                results
                    .entry((connections, c.name))
                    .or_default()
                    .push((run, upstream_us));
            }
        }
    }
    report(args, &contestants, &results);
    println!(
        "RSS after the load: sidecar {:.1} MiB, nginx {:.1} MiB (master and worker)",
        rss_kib(sidecar.0.pid()) as f64 / 1024.0,
        nginx_pids.iter().map(|p| rss_kib(*p)).sum::<u64>() as f64 / 1024.0
    );
    drop(nginx);
    drop(quiet);
    drop(sidecar);
    drop(upstream);
    Ok(())
}

fn wrk_of(args: &Args, c: &Contestant, connections: u32, seconds: u64) -> Wrk {
    Wrk {
        url: c.url.clone(),
        connections,
        threads: args.wrk_threads.min(connections),
        seconds,
        headers: c.headers.clone(),
    }
}

fn cpu_of(pid: u32) -> u64 {
    klavi_sidecar_testkit::bench::cpu_ticks(pid)
}

/// The sidecar with its default profile's proxy in front of `upstream`,
/// its access log on or off; ready when this returns.
fn start_sidecar(
    args: &Args,
    upstream: SocketAddr,
    access_log: bool,
) -> Result<(Proc, SocketAddr), Error> {
    let (token, ops, proxy) = (free_addr()?, free_addr()?, free_addr()?);
    let sidecar = Proc::spawn(
        "sidecar",
        Command::new(args.bin_dir.join("klavi-token-sidecar"))
            .args([
                "run",
                "--listen",
                &token.to_string(),
                "--ops-listen",
                &ops.to_string(),
            ])
            .env_clear()
            .env("KLAVI_ACCESS_KEY", "bench-access-key")
            .env("KLAVI_SECRET_KEY", "bench-secret-key")
            .env(
                "KLAVI_SIDECAR_KLAVI__BASE_URL",
                format!("http://{upstream}"),
            )
            .env("KLAVI_SIDECAR_KLAVI__PROXY_LISTEN", proxy.to_string())
            .env("KLAVI_SIDECAR_PROXY__ACCESS_LOG", access_log.to_string()),
    )?;
    wait_for(ops, "/readyz", Duration::from_secs(10))?;
    Ok((sidecar, proxy))
}

/// nginx as the reverse proxy the issue names: one worker (the sidecar
/// runs one runtime thread), a keep-alive upstream, `proxy_set_header
/// Authorization`, its access log on (as the sidecar's), written to
/// /dev/null as the sidecar's stderr is.
fn start_nginx(
    args: &Args,
    dir: &Path,
    listen: SocketAddr,
    upstream: SocketAddr,
    token: &str,
) -> Result<Proc, Error> {
    let prefix = dir.join("nginx");
    std::fs::create_dir_all(prefix.join("logs"))?;
    let conf = prefix.join("nginx.conf");
    std::fs::write(
        &conf,
        format!(
            "worker_processes 1;\n\
             pid {pid};\n\
             error_log {error} warn;\n\
             events {{ worker_connections 4096; }}\n\
             http {{\n\
               access_log /dev/null;\n\
               client_body_temp_path {tmp}/body;\n\
               proxy_temp_path {tmp}/proxy;\n\
               fastcgi_temp_path {tmp}/fastcgi;\n\
               uwsgi_temp_path {tmp}/uwsgi;\n\
               scgi_temp_path {tmp}/scgi;\n\
               upstream klavi {{ server {upstream}; keepalive 64; }}\n\
               server {{\n\
                 listen {listen};\n\
                 location / {{\n\
                   proxy_pass http://klavi;\n\
                   proxy_http_version 1.1;\n\
                   proxy_set_header Connection \"\";\n\
                   proxy_set_header Authorization \"Bearer {token}\";\n\
                 }}\n\
               }}\n\
             }}\n",
            pid = prefix.join("nginx.pid").display(),
            error = prefix.join("logs/error.log").display(),
            tmp = prefix.display(),
        ),
    )?;
    Proc::spawn(
        "nginx",
        Command::new(&args.nginx)
            .arg("-p")
            .arg(&prefix)
            .arg("-c")
            .arg(&conf)
            .args(["-g", "daemon off;"]),
    )
}

/// nginx's master and its worker (the worker is the master's child).
fn nginx_pids(master: u32) -> Vec<u32> {
    let mut pids = vec![master];
    for _ in 0..200 {
        let children = std::fs::read_to_string(format!("/proc/{master}/task/{master}/children"))
            .unwrap_or_default();
        let found: Vec<u32> = children
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect();
        if !found.is_empty() {
            pids.extend(found);
            return pids;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    pids
}

fn report(
    args: &Args,
    contestants: &[Contestant],
    results: &BTreeMap<(u32, &'static str), Vec<(Run, f64)>>,
) {
    println!();
    println!(
        "| connections | contestant | req/s | p50 µs | p99 µs | proxy CPU µs/req | upstream CPU µs/req |"
    );
    println!("|---|---|---|---|---|---|---|");
    for &connections in &args.connections {
        let m = |name: &'static str, f: fn(&(Run, f64)) -> f64| {
            median(
                results
                    .get(&(connections, name))
                    .map(|runs| runs.iter().map(f).collect())
                    .unwrap_or_default(),
            )
        };
        for c in contestants {
            println!(
                "| {connections} | {} | {:.0} | {:.0} | {:.0} | {} | {:.2} |",
                c.name,
                m(c.name, |r| r.0.rps),
                m(c.name, |r| r.0.p50_us),
                m(c.name, |r| r.0.p99_us),
                if c.pids.is_empty() {
                    "—".to_string()
                } else {
                    format!("{:.2}", m(c.name, |r| r.0.cpu_us_per_request))
                },
                m(c.name, |r| r.1),
            );
        }
        let direct_p50 = m("direct", |r| r.0.p50_us);
        for sidecar in ["sidecar", "sidecar, no access log"] {
            let throughput = m(sidecar, |r| r.0.rps) / m("nginx", |r| r.0.rps);
            let cpu =
                m(sidecar, |r| r.0.cpu_us_per_request) / m("nginx", |r| r.0.cpu_us_per_request);
            let added = (m(sidecar, |r| r.0.p50_us) - direct_p50)
                / (m("nginx", |r| r.0.p50_us) - direct_p50);
            println!(
                "RATIO c={connections} {sidecar}: throughput {throughput:.2} × nginx (target ≥ 0.8), \
                 CPU per request {cpu:.2} × nginx (target ≤ 1.25), added p50 over direct {added:.2} × \
                 nginx's (target ≤ 1.25)"
            );
        }
    }
}
