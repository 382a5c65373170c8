//! The benchmark driver behind `scripts/bench`: the sidecar against a bare
//! hyper reference server, side by side on loopback, plus start-up time,
//! binary size and a cold-start burst. Prints one table; see BENCHMARKS.md.
//!
//! Every process it starts, it stops; every loop is bounded.

// A benchmark measures real elapsed time on the real clock.
#![allow(clippy::disallowed_methods)]

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use clap::Parser;
use klavi_sidecar_testkit::bench::{
    Error, Proc, Run, Wrk, clock_ticks_per_second, free_addr, get, median, rss_kib, status_kib,
    wait_for,
};

#[derive(Debug, Parser)]
struct Args {
    /// Directory holding the release binaries.
    #[arg(long, default_value = "target/release")]
    bin_dir: PathBuf,
    /// Seconds per wrk run.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Rounds of A/B alternation per connection count.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Connection counts to measure.
    #[arg(long, value_delimiter = ',', default_value = "8,64")]
    connections: Vec<u32>,
    /// wrk threads.
    #[arg(long, default_value_t = 2)]
    wrk_threads: u32,
    /// Concurrent requests in the cold-start burst.
    #[arg(long, default_value_t = 10_000)]
    burst: usize,
    /// The sidecar's runtime.worker_threads (its default is 1).
    #[arg(long, default_value_t = 1)]
    worker_threads: usize,
    /// Only the cold-start burst (for quick runs).
    #[arg(long)]
    burst_only: bool,
    /// Profiles the sidecar serves in the steady-state runs (1: the
    /// default only; more are added against the same fake Klavi).
    #[arg(long, default_value_t = 1)]
    profiles: usize,
    /// Extra environment for the sidecar, KEY=VALUE (repeatable), e.g.
    /// KLAVI_SIDECAR_SERVER__MAX_CONNECTIONS=512.
    #[arg(long = "sidecar-env", value_name = "KEY=VALUE")]
    sidecar_env: Vec<String>,
    /// Another sidecar binary (for example the previous release, built
    /// from its own checkout) measured in the same run as a third
    /// contestant, so "performance unchanged" is a same-run comparison.
    /// It gets the same flags and environment with one profile.
    #[arg(long, value_name = "PATH")]
    baseline_bin: Option<PathBuf>,
}

/// `GET /token` at `addr` with `connections`, as `args` say.
fn load(args: &Args, addr: SocketAddr, connections: u32) -> Wrk {
    Wrk {
        url: format!("http://{addr}/token"),
        connections,
        threads: args.wrk_threads.min(connections),
        seconds: args.seconds,
        headers: vec!["Klavi-Sidecar: true".into()],
    }
}

fn sidecar_command(
    exe: &Path,
    token: SocketAddr,
    ops: SocketAddr,
    klavi: SocketAddr,
    args: &Args,
) -> Command {
    let mut command = Command::new(exe);
    command
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
        .env("KLAVI_SIDECAR_KLAVI__BASE_URL", format!("http://{klavi}"))
        .env(
            "KLAVI_SIDECAR_RUNTIME__WORKER_THREADS",
            args.worker_threads.to_string(),
        )
        .env("RUST_LOG", "warn")
        .envs(args.sidecar_env.iter().filter_map(|kv| kv.split_once('=')));
    add_profiles(&mut command, args.profiles);
    command
}

/// Profiles `p1` … `p{n-1}` beside the default one, with the demo keys.
fn add_profiles(command: &mut Command, profiles: usize) {
    for i in 1..profiles {
        for (key, value) in [
            ("ACCESS_KEY", "demo-access-key"),
            ("SECRET_KEY", "demo-secret-key"),
        ] {
            command.env(format!("KLAVI_SIDECAR_PROFILES__P{i}__{key}"), value);
        }
    }
}

/// Start to first `/healthz` 200 (ms) and RSS (KiB) half a second after
/// ready, `runs` times, for a sidecar of `profiles` profiles.
fn start_and_idle(
    exe: &Path,
    klavi: SocketAddr,
    args: &Args,
    profiles: usize,
    runs: usize,
) -> Result<(Vec<f64>, Vec<u64>), Error> {
    let (mut startups, mut rss) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        let (token, ops) = (free_addr()?, free_addr()?);
        let mut command = sidecar_command(exe, token, ops, klavi, args);
        add_profiles(&mut command, profiles);
        let started = Instant::now();
        let proc = Proc::spawn("sidecar", &mut command)?;
        let mut first = None;
        while started.elapsed() < Duration::from_secs(5) {
            if matches!(get(ops, "/healthz", false), Ok((200, _))) {
                first = Some(started.elapsed());
                break;
            }
            std::thread::sleep(Duration::from_micros(100));
        }
        startups.push(first.ok_or("no /healthz 200 within 5 s")?.as_secs_f64() * 1e3);
        wait_for(ops, "/readyz", Duration::from_secs(10))?;
        std::thread::sleep(Duration::from_millis(1500));
        rss.push(rss_kib(proc.pid()));
        drop(proc);
    }
    Ok((startups, rss))
}

fn fake_command(bin: &Path, addr: SocketAddr, extra: &[&str]) -> Command {
    let mut command = Command::new(bin.join("klavi-token-sidecar"));
    command
        .args([
            "fake-klavi",
            "--listen",
            &addr.to_string(),
            "--token-ttl",
            "3600",
        ])
        .args(extra)
        .env_clear();
    command
}

/// Fires `n` concurrent GET /token, each on its own connection; returns
/// (time until the last answer, statuses).
fn burst(addr: SocketAddr, n: usize) -> Result<(Duration, BTreeMap<u16, usize>), Error> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let started = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..n {
            tasks.spawn(async move {
                let attempt = async {
                    let mut stream = tokio::net::TcpStream::connect(addr).await?;
                    stream
                        .write_all(b"GET /token HTTP/1.1\r\nHost: localhost\r\nKlavi-Sidecar: true\r\nConnection: close\r\n\r\n")
                        .await?;
                    let mut response = Vec::new();
                    stream.read_to_end(&mut response).await?;
                    Ok::<_, std::io::Error>(
                        std::str::from_utf8(response.get(9..12).unwrap_or_default())
                            .ok()
                            .and_then(|s| s.parse::<u16>().ok())
                            .unwrap_or(0),
                    )
                };
                tokio::time::timeout(Duration::from_secs(60), attempt)
                    .await
                    .ok()
                    .and_then(Result::ok)
                    .unwrap_or(0)
            });
        }
        let mut statuses = BTreeMap::new();
        while let Some(status) = tasks.join_next().await {
            *statuses.entry(status.unwrap_or(0)).or_insert(0) += 1;
        }
        Ok((started.elapsed(), statuses))
    })
}

fn main() -> Result<(), Error> {
    let args = Args::parse();
    let bin = args.bin_dir.clone();
    let tick = clock_ticks_per_second();
    let mut report = String::new();

    if args.burst_only {
        println!("{}", cold_start_burst(&args, &bin)?);
        return Ok(());
    }

    // --- Steady state: sidecar vs reference (and the baseline), A B A B.
    let sidecar_exe = bin.join("klavi-token-sidecar");
    let klavi = free_addr()?;
    let _fake = Proc::spawn("fake Klavi", &mut fake_command(&bin, klavi, &[]))?;
    let (token, ops) = (free_addr()?, free_addr()?);
    let sidecar = Proc::spawn(
        "sidecar",
        &mut sidecar_command(&sidecar_exe, token, ops, klavi, &args),
    )?;
    wait_for(ops, "/readyz", Duration::from_secs(10))?;
    std::thread::sleep(Duration::from_millis(500));
    let (status, body) = get(token, "/token", true)?;
    if status != 200 {
        return Err(format!("GET /token answered {status}").into());
    }
    let body_file =
        std::env::temp_dir().join(format!("klavi-bench-body-{}.json", std::process::id()));
    std::fs::write(&body_file, &body)?;
    let reference_addr = free_addr()?;
    let reference = Proc::spawn(
        "reference server",
        Command::new(bin.join("examples/reference_server"))
            .args(["--listen", &reference_addr.to_string(), "--body-file"])
            .arg(&body_file),
    )?;
    let ref_deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(reference_addr).is_err() {
        if Instant::now() > ref_deadline {
            return Err("the reference server did not start".into());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut contestants = vec![
        ("sidecar", token, sidecar),
        ("reference", reference_addr, reference),
    ];
    if let Some(exe) = &args.baseline_bin {
        let (token, ops) = (free_addr()?, free_addr()?);
        let one_profile = Args {
            profiles: 1,
            ..Args::parse()
        };
        let baseline = Proc::spawn(
            "baseline sidecar",
            &mut sidecar_command(exe, token, ops, klavi, &one_profile),
        )?;
        wait_for(ops, "/readyz", Duration::from_secs(10))?;
        contestants.push(("baseline", token, baseline));
    }
    std::thread::sleep(Duration::from_millis(500));
    let idle_rss: Vec<u64> = contestants.iter().map(|c| rss_kib(c.2.pid())).collect();

    let mut results: BTreeMap<(u32, &'static str), Vec<Run>> = BTreeMap::new();
    for &connections in &args.connections {
        let warm = Args {
            seconds: 2,
            ..Args::parse()
        };
        for (_, addr, proc) in &contestants {
            load(&warm, *addr, connections).run(&[proc.pid()], tick)?;
        }
        for round in 1..=args.rounds {
            for (name, addr, proc) in &contestants {
                let run = load(&args, *addr, connections).run(&[proc.pid()], tick)?;
                eprintln!(
                    "  c={connections:<3} round {round} {name:<9} {:>9.0} req/s  p50 {:>5.0} µs  p99 {:>5.0} µs  p99.9 {:>6.0} µs  cpu {:>5.2} µs/req  errors {}",
                    run.rps,
                    run.p50_us,
                    run.p99_us,
                    run.p999_us,
                    run.cpu_us_per_request,
                    run.errors
                );
                results.entry((connections, name)).or_default().push(run);
            }
        }
    }
    let loaded_rss: Vec<u64> = contestants.iter().map(|c| rss_kib(c.2.pid())).collect();
    let names: Vec<&'static str> = contestants.iter().map(|c| c.0).collect();
    drop(contestants);
    let _ = std::fs::remove_file(&body_file);
    report.push_str(&steady_state_table(
        &args,
        &names,
        &results,
        &idle_rss,
        &loaded_rss,
    ));

    // --- Start to first /healthz 200 and idle RSS, one profile and ten.
    let (startups, _) = start_and_idle(&sidecar_exe, klavi, &args, 1, 10)?;
    let startup_median = median(startups.clone());
    let (startups_ten, rss_ten) = start_and_idle(&sidecar_exe, klavi, &args, 10, 5)?;
    let (_, rss_one) = start_and_idle(&sidecar_exe, klavi, &args, 1, 5)?;
    let baseline_startup = match &args.baseline_bin {
        Some(exe) => {
            let (startups, rss) = start_and_idle(exe, klavi, &args, 1, 10)?;
            format!(
                "| baseline: start to first /healthz 200, median of 10 | {:.1} ms |\n| baseline: RSS 1.5 s after ready, median of 10 | {:.1} MiB |\n",
                median(startups),
                median(rss.iter().map(|k| *k as f64 / 1024.0).collect())
            )
        }
        None => String::new(),
    };

    // --- Binary size.
    let size = std::fs::metadata(bin.join("klavi-token-sidecar"))?.len();

    let all = |v: &[f64]| {
        v.iter()
            .map(|s| format!("{s:.1}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mib = |v: &[u64]| {
        v.iter()
            .map(|k| format!("{:.1}", *k as f64 / 1024.0))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let median_mib = |v: &[u64]| median(v.iter().map(|k| *k as f64 / 1024.0).collect());
    report.push_str(&format!(
        "\n| measure | value |\n|---|---|\n| start to first /healthz 200, one profile, median of 10 | {startup_median:.1} ms (all: {}) |\n| start to first /healthz 200, ten profiles, median of 5 | {:.1} ms (all: {}) |\n| RSS 1.5 s after ready, one profile, median of 5 | {:.1} MiB (all: {}) |\n| RSS 1.5 s after ready, ten profiles, median of 5 | {:.1} MiB (all: {}) |\n| stripped release binary | {:.2} MiB ({size} bytes) |\n",
        all(&startups),
        median(startups_ten.clone()),
        all(&startups_ten),
        median_mib(&rss_one),
        mib(&rss_one),
        median_mib(&rss_ten),
        mib(&rss_ten),
        size as f64 / 1048576.0,
    ));
    report.push_str(&baseline_startup);
    report.push_str(&cold_start_burst(&args, &bin)?);
    println!("{report}");
    Ok(())
}

/// The steady-state table: the sidecar, the reference and their ratio,
/// then the baseline and the sidecar's ratio to it when one ran.
fn steady_state_table(
    args: &Args,
    names: &[&'static str],
    results: &BTreeMap<(u32, &'static str), Vec<Run>>,
    idle_rss: &[u64],
    loaded_rss: &[u64],
) -> String {
    let baseline = names.contains(&"baseline");
    let mut table = String::from("| connections | metric | sidecar | reference | ratio |");
    table.push_str(if baseline {
        " baseline | sidecar / baseline |\n|---|---|---|---|---|---|---|\n"
    } else {
        "\n|---|---|---|---|---|\n"
    });
    let fmt = |v: f64| {
        if v < 100.0 {
            format!("{v:.2}")
        } else {
            format!("{v:.0}")
        }
    };
    let rows: [(&str, fn(&Run) -> f64); 5] = [
        ("requests/s", |r| r.rps),
        ("p50 latency (µs)", |r| r.p50_us),
        ("p99 latency (µs)", |r| r.p99_us),
        ("p99.9 latency (µs)", |r| r.p999_us),
        ("CPU time per request (µs)", |r| r.cpu_us_per_request),
    ];
    let empty = Vec::new();
    for &connections in &args.connections {
        let runs = |name: &'static str| results.get(&(connections, name)).unwrap_or(&empty);
        let m = |name: &'static str, f: fn(&Run) -> f64| median(runs(name).iter().map(f).collect());
        for (label, f) in rows {
            let (a, b) = (m("sidecar", f), m("reference", f));
            table.push_str(&format!(
                "| {connections} | {label} | {} | {} | {:.2} |",
                fmt(a),
                fmt(b),
                a / b.max(1e-9)
            ));
            if baseline {
                let c = m("baseline", f);
                table.push_str(&format!(" {} | {:.2} |", fmt(c), a / c.max(1e-9)));
            }
            table.push('\n');
        }
        let errors: u64 = names
            .iter()
            .flat_map(|name| runs(name))
            .map(|r| r.errors)
            .sum();
        table.push_str(&format!(
            "| {connections} | errors (all runs) | {errors} | | |{}\n",
            if baseline { " | |" } else { "" }
        ));
    }
    let mib = |k: u64| k as f64 / 1024.0;
    for (label, rss) in [
        ("RSS idle (MiB)", idle_rss),
        ("RSS after load (MiB)", loaded_rss),
    ] {
        let (a, b) = (rss[0], rss[1]);
        table.push_str(&format!(
            "| | {label} | {:.1} | {:.1} | {:.2} |",
            mib(a),
            mib(b),
            a as f64 / b.max(1) as f64
        ));
        if let Some(&c) = rss.get(2) {
            table.push_str(&format!(
                " {:.1} | {:.2} |",
                mib(c),
                a as f64 / c.max(1) as f64
            ));
        }
        table.push('\n');
    }
    table
}

/// The cold-start burst: `args.burst` concurrent `GET /token` on fresh
/// connections while the fake Klavi takes 1 s to answer. Returns table rows.
fn cold_start_burst(args: &Args, bin: &Path) -> Result<String, Error> {
    let slow_klavi = free_addr()?;
    let _slow_fake = Proc::spawn(
        "slow fake Klavi",
        &mut fake_command(
            bin,
            slow_klavi,
            &["--faults", "delay:1000", "--fault-rate", "1"],
        ),
    )?;
    let (token, ops) = (free_addr()?, free_addr()?);
    let cold = Proc::spawn(
        "sidecar",
        &mut sidecar_command(
            &bin.join("klavi-token-sidecar"),
            token,
            ops,
            slow_klavi,
            args,
        ),
    )?;
    wait_for(ops, "/healthz", Duration::from_secs(5))?;
    let (took, statuses) = burst(token, args.burst)?;
    let rss_at_end = rss_kib(cold.pid());
    // A second later, after a probe (kubelet probes every few seconds; the
    // allocator returns freed memory on its next activity).
    std::thread::sleep(Duration::from_secs(1));
    let _ = get(ops, "/healthz", false);
    std::thread::sleep(Duration::from_millis(100));
    let rss_after = rss_kib(cold.pid());
    let peak = status_kib(cold.pid(), "VmHWM:");
    let (_, stats) = get(slow_klavi, "/_fake/stats", false)?;
    let stats: serde_json::Value = serde_json::from_slice(&stats)?;
    drop(cold);
    Ok(format!(
        "| cold-start burst: requests | {} |\n| cold-start burst: answers by status | {} |\n| cold-start burst: upstream calls | {} |\n| cold-start burst: time until the last answer | {:.2} s (Klavi answers after 1 s) |\n| RSS after the burst (at the last answer / 1 s and a probe later / peak) | {:.1} / {:.1} / {:.1} MiB |\n| sidecar runtime worker threads | {} |\n",
        args.burst,
        statuses
            .iter()
            .map(|(s, n)| format!("{s}: {n}"))
            .collect::<Vec<_>>()
            .join(", "),
        stats["calls"],
        took.as_secs_f64(),
        rss_at_end as f64 / 1024.0,
        rss_after as f64 / 1024.0,
        peak as f64 / 1024.0,
        args.worker_threads,
    ))
}
