//! The chaos soak harness: real HTTP load on `/token` while the fake Klavi
//! flips between healthy and every fault it knows, checking SPEC section
//! 5's guarantees continuously.
//!
//! Used by `tests/soak.rs` (a short run inside `cargo test`) and by
//! `examples/soak.rs` / `scripts/soak` (a long run). The sidecar runs as a
//! separate process so its memory can be sampled; the fake runs in the
//! harness's process so faults switch instantly.
//!
//! Invariants checked:
//! 1. no 200 carries a token with less than the serve margin left;
//! 2. no request fails while the token served last still had more than the
//!    serve margin (plus a second of slack) left;
//! 3. never more than one auth request in flight at the fake;
//! 4. after each fault ends, `/readyz` is 200 again within
//!    `backoff_max` plus one second;
//! 5. the sidecar's RSS at the end is within a bound of its RSS a quarter
//!    of the way through (warm: every fault seen once, buffers grown);
//! 6. with `reject_every`, a client reports the current token rejected
//!    that often (as an app does after Klavi's 401), and no request that
//!    starts after a report is answered with the reported token
//!    (guarantee 11), whatever the fake does meanwhile (its `same` fault
//!    sends the rejected token back);
//! 7. with `proxy_clients`, requests through the default profile's proxy
//!    (while `revoke_every` has the fake revoke the current token, so
//!    Klavi answers 401 until the proxy replaces it) each get either
//!    Klavi's answer (it carries `Klavi-Sidecar-Token`) or the sidecar's
//!    error (`Klavi-Sidecar-Error` and its JSON body), never a broken
//!    connection, and no proxied request reaches Klavi a third time
//!    (guarantee 13; the fake's record of API calls is read throughout and
//!    must account for every call it counted).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

use klavi_token_sidecar::fake_klavi::{Chaos, FakeKlavi, Outcome};

/// What to run.
#[derive(Debug, Clone)]
pub struct SoakConfig {
    /// `http://ADDR` of the token listener.
    pub token_base: String,
    /// `http://ADDR` of the ops listener.
    pub ops_base: String,
    /// Total run time (bounded: the run always stops by then plus a phase).
    pub duration: Duration,
    /// Concurrent clients.
    pub clients: usize,
    /// Pause between one client's requests.
    pub pacing: Duration,
    /// Length of each fault phase.
    pub fault_phase: Duration,
    /// Length of each healthy phase between faults.
    pub healthy_phase: Duration,
    /// The sidecar's `refresh.serve_margin_secs`.
    pub serve_margin: Duration,
    /// The sidecar's `refresh.backoff_max_secs`.
    pub backoff_max: Duration,
    /// Allowed RSS growth from after warm-up to the end, bytes.
    pub rss_growth_limit: u64,
    /// Report the current token rejected this often (`None`: never).
    pub reject_every: Option<Duration>,
    /// `http://ADDR` of the default profile's proxy.
    pub proxy_base: String,
    /// Concurrent clients calling Klavi's API through the proxy.
    pub proxy_clients: usize,
    /// Have the fake revoke the token it issued last this often (`None`:
    /// never).
    pub revoke_every: Option<Duration>,
}

/// The faults cycled through, each followed by a healthy phase.
pub fn fault_cycle() -> Vec<(String, Option<Chaos>, Option<Outcome>)> {
    let named = [
        "status:500",
        "status:503:1",
        "status:429:1",
        "status:429",
        "status:401",
        "status:403",
        "hang",
        "reset",
        "garbage",
        "empty-token",
        "huge",
        "expired",
        "same",
        "ttl:2",
        "skew:3600",
        "skew:-3600",
        "delay:700",
    ];
    let mut cycle: Vec<_> = named
        .iter()
        .filter_map(|name| Some((name.to_string(), None, Some(name.parse::<Outcome>().ok()?))))
        .collect();
    let mixed: Vec<Outcome> = named.iter().filter_map(|n| n.parse().ok()).collect();
    cycle.push((
        "chaos (half the answers faulty)".to_string(),
        Some(Chaos {
            rate: 0.5,
            faults: mixed,
        }),
        None,
    ));
    cycle
}

/// What a run saw.
#[derive(Debug, Default)]
pub struct SoakReport {
    /// Requests made.
    pub requests: u64,
    /// 200 answers.
    pub ok: u64,
    /// Other answers, by status and error code (or transport error).
    pub failures: BTreeMap<String, u64>,
    /// Auth requests the fake received.
    pub upstream_calls: u64,
    /// Most auth requests in flight at once.
    pub max_in_flight: u64,
    /// Slowest answer.
    pub worst_latency: Duration,
    /// Fault phases run.
    pub phases: u64,
    /// Tokens reported rejected.
    pub rejections: u64,
    /// Requests through the proxy.
    pub proxied: u64,
    /// Their answers: `STATUS klavi` or `STATUS CODE` (the sidecar's).
    pub proxied_answers: BTreeMap<String, u64>,
    /// Tokens the fake revoked.
    pub revocations: u64,
    /// The most times Klavi saw one proxied request.
    pub max_sends: u64,
    /// Slowest return to ready after a fault.
    pub worst_recovery: Duration,
    /// RSS after warm-up and at the end, bytes (if sampled).
    pub rss_start: Option<u64>,
    /// RSS at the end.
    pub rss_end: Option<u64>,
    /// Highest RSS seen.
    pub rss_peak: Option<u64>,
    /// RSS after each phase: (seconds into the run, bytes).
    pub rss_samples: Vec<(u64, u64)>,
    /// Broken invariants (the first few in full).
    pub violations: Vec<String>,
    /// How many violations in all.
    pub violation_count: u64,
}

impl SoakReport {
    /// A printable summary.
    pub fn summary(&self) -> String {
        let mut out = String::new();
        let mib = |b: Option<u64>| {
            b.map_or("n/a".to_string(), |b| {
                format!("{:.1} MiB", b as f64 / 1048576.0)
            })
        };
        let _ = writeln!(out, "requests           {}", self.requests);
        let _ = writeln!(out, "200                {}", self.ok);
        for (reason, n) in &self.failures {
            let _ = writeln!(out, "non-200 {reason:<24} {n}");
        }
        let _ = writeln!(out, "fault phases       {}", self.phases);
        let _ = writeln!(out, "tokens rejected    {}", self.rejections);
        if self.proxied > 0 {
            let _ = writeln!(out, "proxied            {}", self.proxied);
            for (answer, n) in &self.proxied_answers {
                let _ = writeln!(out, "proxied {answer:<24} {n}");
            }
            let _ = writeln!(out, "tokens revoked     {}", self.revocations);
            let _ = writeln!(out, "most sends of one  {}", self.max_sends);
        }
        let _ = writeln!(out, "upstream calls     {}", self.upstream_calls);
        let _ = writeln!(out, "max in flight      {}", self.max_in_flight);
        let _ = writeln!(out, "worst latency      {:?}", self.worst_latency);
        let _ = writeln!(out, "worst recovery     {:?}", self.worst_recovery);
        let _ = writeln!(
            out,
            "RSS warm / end     {} / {} (peak {})",
            mib(self.rss_start),
            mib(self.rss_end),
            mib(self.rss_peak)
        );
        if !self.rss_samples.is_empty() {
            let series: Vec<String> = self
                .rss_samples
                .iter()
                .map(|(t, b)| format!("{t}s:{:.1}", *b as f64 / 1048576.0))
                .collect();
            let _ = writeln!(out, "RSS by phase (MiB) {}", series.join(" "));
        }
        let _ = writeln!(out, "violations         {}", self.violation_count);
        for v in &self.violations {
            let _ = writeln!(out, "  {v}");
        }
        out
    }
}

#[derive(Default)]
struct Shared {
    requests: AtomicU64,
    ok: AtomicU64,
    worst_latency_us: AtomicU64,
    failures: Mutex<BTreeMap<String, u64>>,
    /// (when answered, expireAt, token) of the 200 answered last.
    last_served: Mutex<Option<(Instant, i64, String)>>,
    /// Tokens reported rejected, and when the report was answered (`None`
    /// while it is on its way).
    rejected: Mutex<std::collections::HashMap<String, Option<Instant>>>,
    /// Tokens the fake revoked: the proxy may drop them at any moment.
    revoked: Mutex<std::collections::HashSet<String>>,
    proxied: AtomicU64,
    proxied_answers: Mutex<BTreeMap<String, u64>>,
    violations: Mutex<(Vec<String>, u64)>,
    stop: AtomicBool,
    /// The phase running, for the violation messages.
    phase: Mutex<String>,
}

impl Shared {
    fn violation(&self, what: String) {
        let phase = self
            .phase
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let mut v = self
            .violations
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        v.1 += 1;
        if v.0.len() < 20 {
            v.0.push(format!("[{phase}] {what}"));
        }
    }

    fn enter(&self, phase: &str) {
        *self.phase.lock().unwrap_or_else(PoisonError::into_inner) = phase.to_string();
    }
}

fn now_unix() -> f64 {
    use klavi_token_sidecar::clock::{SystemClock, WallClock as _};
    klavi_token_sidecar::clock::unix_secs(SystemClock.now())
}

async fn client(http: reqwest::Client, url: String, config: Arc<SoakConfig>, shared: Arc<Shared>) {
    let margin = config.serve_margin.as_secs() as i64;
    while !shared.stop.load(Ordering::Relaxed) {
        let started = Instant::now();
        let sent_unix = now_unix();
        let result = http.get(&url).header("Klavi-Sidecar", "true").send().await;
        let outcome = match result {
            Ok(response) => {
                let status = response.status().as_u16();
                let body = response.json::<serde_json::Value>().await.ok();
                Ok((status, body))
            }
            Err(error) => Err(error),
        };
        let latency = started.elapsed();
        shared.requests.fetch_add(1, Ordering::Relaxed);
        shared
            .worst_latency_us
            .fetch_max(latency.as_micros() as u64, Ordering::Relaxed);
        match outcome {
            Ok((200, Some(body))) => {
                shared.ok.fetch_add(1, Ordering::Relaxed);
                let token = body["accessToken"].as_str().unwrap_or_default();
                let reported = shared
                    .rejected
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .get(token)
                    .copied();
                if reported.flatten().is_some_and(|at| at <= started) {
                    shared.violation("served a token reported rejected before the request".into());
                }
                let expires_in = body["expiresIn"].as_i64().unwrap_or(-1);
                let expire_at = body["expireAt"].as_i64().unwrap_or(0);
                // The sidecar judged the token after this request was sent,
                // so it had the margin left then; expireAt is whole
                // seconds, rounded down: up to 1 s less.
                let left = expire_at as f64 - sent_unix;
                if expires_in < margin || left < margin as f64 - 1.5 {
                    shared.violation(format!(
                        "served a token with expiresIn {expires_in}, {left:.1} s to expireAt (margin {margin} s)"
                    ));
                }
                let answered = Instant::now();
                let mut last = shared
                    .last_served
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner);
                // A token reported meanwhile is no token held.
                if reported.is_none() && last.as_ref().is_none_or(|(at, ..)| *at <= answered) {
                    *last = Some((answered, expire_at, token.to_string()));
                }
            }
            other => {
                let reason = match &other {
                    Ok((status, body)) => format!(
                        "{status} {}",
                        body.as_ref()
                            .and_then(|b| b["error"].as_str().map(str::to_string))
                            .unwrap_or_default()
                    ),
                    Err(error) if error.is_timeout() => "timeout".to_string(),
                    Err(_) => "connection error".to_string(),
                };
                *shared
                    .failures
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .entry(reason.clone())
                    .or_default() += 1;
                // Only a token answered before this request began says the
                // sidecar held it when this request arrived.
                let last = shared
                    .last_served
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .clone();
                // A token being reported rejected is no token held, nor
                // is one Klavi revoked (the proxy reports it any moment).
                let held = last.filter(|(.., token)| {
                    !shared
                        .rejected
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .contains_key(token)
                        && !shared
                            .revoked
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .contains(token)
                });
                if let Some((answered, expire_at, _)) = held
                    && answered <= started
                {
                    let left = expire_at as f64 - now_unix();
                    // Slack: whole-second expireAt and the time on the wire.
                    if left > margin as f64 + 2.0 {
                        shared.violation(format!(
                            "{reason} while the token served last had {left:.1} s left"
                        ));
                    }
                }
            }
        }
        tokio::time::sleep(config.pacing).await;
    }
}

/// Calls Klavi's API through the proxy, each request to a path of its own
/// (so the fake's record tells how often Klavi saw each), and checks that
/// every answer is Klavi's or the sidecar's marked error.
async fn proxy_client(
    http: reqwest::Client,
    id: usize,
    config: Arc<SoakConfig>,
    shared: Arc<Shared>,
) {
    let mut n = 0u64;
    while !shared.stop.load(Ordering::Relaxed) {
        n += 1;
        let url = format!(
            "{}/payment/customer/v1/payments/soak-{id}-{n}",
            config.proxy_base
        );
        let result = http
            .post(&url)
            .header("Klavi-Sidecar", "true")
            .header("Content-Type", "application/json")
            .body("{\"amount\":1}")
            .send()
            .await;
        shared.proxied.fetch_add(1, Ordering::Relaxed);
        let answer = match result {
            Ok(response) => {
                let status = response.status().as_u16();
                let header = |name: &str| {
                    response
                        .headers()
                        .get(name)
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_string)
                };
                let (error, token) = (header("klavi-sidecar-error"), header("klavi-sidecar-token"));
                let body = response.bytes().await;
                match (error, token, body) {
                    (None, Some(_), Ok(_)) => format!("{status} klavi"),
                    (Some(code), None, Ok(body)) => {
                        let said = serde_json::from_slice::<serde_json::Value>(&body)
                            .ok()
                            .and_then(|b| b["error"].as_str().map(str::to_string));
                        if said.as_deref() != Some(code.as_str()) {
                            shared.violation(format!(
                                "proxied {status}: Klavi-Sidecar-Error {code} with body error {said:?}"
                            ));
                        }
                        format!("{status} {code}")
                    }
                    (error, token, body) => {
                        shared.violation(format!(
                            "proxied {status}: neither Klavi's answer nor the sidecar's \
                             (error {error:?}, token {token:?}, body read {})",
                            body.is_ok()
                        ));
                        format!("{status} unmarked")
                    }
                }
            }
            Err(error) => {
                shared.violation(format!("proxied request failed: {error}"));
                "transport error".to_string()
            }
        };
        *shared
            .proxied_answers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(answer)
            .or_default() += 1;
        tokio::time::sleep(config.pacing).await;
    }
}

/// Revokes the token the fake issued last every `every` (Klavi
/// invalidating a token the sidecar holds); returns how many.
async fn revoker(fake: &FakeKlavi, every: Duration, shared: &Shared) -> u64 {
    let mut revoked = 0;
    while !shared.stop.load(Ordering::Relaxed) {
        tokio::time::sleep(every).await;
        if let Some(token) = fake.last_token() {
            shared
                .revoked
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(token.clone());
            if fake.revoke(&token) {
                revoked += 1;
            }
        }
    }
    revoked
}

/// Reads the fake's record of API calls until told to stop, counting how
/// often each path was called; returns the calls read and the most calls
/// of one path.
async fn count_sends(fake: &FakeKlavi, stop: &AtomicBool) -> (u64, u64) {
    let mut per_path: std::collections::HashMap<String, u64> = Default::default();
    let mut read = 0;
    loop {
        let done = stop.load(Ordering::Relaxed);
        for call in fake.take_api_requests() {
            read += 1;
            *per_path.entry(call.target).or_default() += 1;
        }
        if done {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (read, per_path.values().copied().max().unwrap_or(0))
}

/// Reports the current token rejected every `every`, as an app does after
/// Klavi's 401; returns how many it reported.
async fn rejecter(
    http: reqwest::Client,
    base: String,
    every: Duration,
    shared: Arc<Shared>,
) -> u64 {
    let mut reported = 0;
    while !shared.stop.load(Ordering::Relaxed) {
        tokio::time::sleep(every).await;
        let current = http
            .get(format!("{base}/token"))
            .header("Klavi-Sidecar", "true")
            .send()
            .await;
        let Ok(current) = current else { continue };
        let Ok(body) = current.json::<serde_json::Value>().await else {
            continue;
        };
        let Some(token) = body["accessToken"].as_str() else {
            continue;
        };
        shared
            .rejected
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(token.to_string(), None);
        let report = http
            .post(format!("{base}/token/refresh"))
            .header("Klavi-Sidecar", "true")
            .json(&serde_json::json!({ "rejectedToken": token }))
            .send()
            .await;
        if report.is_err() {
            continue;
        }
        reported += 1;
        shared
            .rejected
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(token.to_string(), Some(Instant::now()));
    }
    reported
}

/// Waits until `/readyz` answers 200; returns how long that took, or
/// `None` if not within `limit`.
async fn time_to_ready(http: &reqwest::Client, url: &str, limit: Duration) -> Option<Duration> {
    let started = Instant::now();
    while started.elapsed() <= limit {
        if let Ok(response) = http.get(url).send().await
            && response.status() == reqwest::StatusCode::OK
        {
            return Some(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    None
}

/// Runs the soak: load from `config.clients` clients while `fake` cycles
/// through [`fault_cycle`], until `config.duration` has passed.
/// `rss` samples the sidecar's resident memory in bytes.
pub async fn run(
    config: SoakConfig,
    fake: &FakeKlavi,
    rss: impl Fn() -> Option<u64>,
) -> SoakReport {
    klavi_token_sidecar::upstream::klavi::install_crypto_provider();
    let config = Arc::new(config);
    let shared = Arc::new(Shared::default());
    let http = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(15))
        .build()
        .unwrap_or_default();
    let token_url = format!("{}/token", config.token_base);
    let ready_url = format!("{}/readyz", config.ops_base);

    // Ready before the load starts.
    if time_to_ready(&http, &ready_url, Duration::from_secs(10))
        .await
        .is_none()
    {
        return SoakReport {
            violations: vec!["the sidecar never became ready".into()],
            violation_count: 1,
            ..SoakReport::default()
        };
    }
    let clients: Vec<_> = (0..config.clients)
        .map(|_| {
            tokio::spawn(client(
                http.clone(),
                token_url.clone(),
                Arc::clone(&config),
                Arc::clone(&shared),
            ))
        })
        .collect();

    let rejecter = config.reject_every.map(|every| {
        tokio::spawn(rejecter(
            http.clone(),
            config.token_base.clone(),
            every,
            Arc::clone(&shared),
        ))
    });

    let proxy_clients: Vec<_> = (0..config.proxy_clients)
        .map(|id| {
            tokio::spawn(proxy_client(
                http.clone(),
                id,
                Arc::clone(&config),
                Arc::clone(&shared),
            ))
        })
        .collect();
    let counting_done = Arc::new(AtomicBool::new(false));
    let revoking = async {
        match config.revoke_every {
            Some(every) => revoker(fake, every, &shared).await,
            None => 0,
        }
    };
    let counting = count_sends(fake, &counting_done);
    let phases = async {
        let report = cycle_faults(&config, fake, &http, &ready_url, &shared, &rss).await;
        shared.stop.store(true, Ordering::Relaxed);
        for client in clients {
            let _ = client.await;
        }
        for client in proxy_clients {
            let _ = client.await;
        }
        counting_done.store(true, Ordering::Relaxed);
        report
    };
    let (mut report, revocations, (read, max_sends)) = tokio::join!(phases, revoking, counting);
    report.revocations = revocations;
    report.max_sends = max_sends;
    report.proxied = shared.proxied.load(Ordering::Relaxed);
    report.proxied_answers = shared
        .proxied_answers
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    if max_sends > 2 {
        shared.violation(format!("a proxied request reached Klavi {max_sends} times"));
    }
    if read != fake.api_calls() {
        shared.violation(format!(
            "the fake counted {} API calls but its record held {read}: some went unchecked",
            fake.api_calls()
        ));
    }
    if let Some(rejecter) = rejecter {
        report.rejections = rejecter.await.unwrap_or(0);
    }
    report.requests = shared.requests.load(Ordering::Relaxed);
    report.ok = shared.ok.load(Ordering::Relaxed);
    report.worst_latency = Duration::from_micros(shared.worst_latency_us.load(Ordering::Relaxed));
    report.failures = shared
        .failures
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    report.upstream_calls = fake.calls();
    report.max_in_flight = fake.max_in_flight();
    let violations = shared
        .violations
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    report.violations = violations.0.clone();
    report.violation_count = violations.1;
    report
}

/// Cycles the fake through [`fault_cycle`] until `config.duration` has
/// passed, checking recovery after each fault and sampling RSS; the
/// report's phases, recovery and memory figures.
async fn cycle_faults(
    config: &SoakConfig,
    fake: &FakeKlavi,
    http: &reqwest::Client,
    ready_url: &str,
    shared: &Shared,
    rss: &impl Fn() -> Option<u64>,
) -> SoakReport {
    let mut report = SoakReport::default();
    let started = Instant::now();
    let mut peak = None::<u64>;
    let sample = |peak: &mut Option<u64>| {
        let now = rss();
        if let Some(now) = now {
            *peak = Some(peak.map_or(now, |p| p.max(now)));
        }
        now
    };
    let cycle = fault_cycle();
    for (name, chaos, outcome) in cycle.iter().cycle() {
        if started.elapsed() >= config.duration {
            break;
        }
        // Healthy first, so the first sample is after warm-up.
        shared.enter("healthy");
        fake.set_chaos(None);
        fake.set_default(Outcome::token());
        tokio::time::sleep(config.healthy_phase).await;
        if let Some(now) = sample(&mut peak) {
            report.rss_samples.push((started.elapsed().as_secs(), now));
        }

        shared.enter(name);
        fake.set_chaos(chaos.clone());
        if let Some(outcome) = outcome {
            fake.set_default(outcome.clone());
        }
        tokio::time::sleep(config.fault_phase).await;
        report.phases += 1;

        shared.enter(&format!("recovering from {name}"));
        fake.set_chaos(None);
        fake.set_default(Outcome::token());
        let limit = config.backoff_max + Duration::from_secs(1);
        match time_to_ready(http, ready_url, limit + Duration::from_secs(30)).await {
            Some(took) => {
                report.worst_recovery = report.worst_recovery.max(took);
                if took > limit {
                    shared.violation(format!(
                        "ready {took:?} after the {name} fault ended (limit {limit:?})"
                    ));
                }
            }
            None => shared.violation(format!("never ready again after the {name} fault")),
        }
        if fake.max_in_flight() > 1 {
            shared.violation(format!(
                "{} auth requests in flight during {name}",
                fake.max_in_flight()
            ));
        }
    }
    report.rss_end = sample(&mut peak);
    report.rss_peak = peak;
    // Warm: the last sample taken before a quarter of the run had passed.
    let warm_at = config.duration.as_secs() / 4;
    report.rss_start = report
        .rss_samples
        .iter()
        .take_while(|(t, _)| *t <= warm_at.max(1))
        .last()
        .or(report.rss_samples.first())
        .map(|(_, b)| *b);
    if let (Some(start), Some(end)) = (report.rss_start, report.rss_end)
        && end > start + config.rss_growth_limit
    {
        shared.violation(format!("RSS grew from {start} to {end} bytes"));
    }
    report
}

/// Resident set size of process `pid`, bytes (Linux).
pub fn rss_of(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// The sidecar binary under soak: `run` on three free loopback ports (token
/// API, ops, the default profile's proxy) against
/// a fake Klavi, with the demo keys. Killed if dropped before
/// [`Sidecar::stop`].
#[derive(Debug)]
pub struct Sidecar {
    child: Option<std::process::Child>,
    /// `http://ADDR` of the token listener.
    pub token_base: String,
    /// `http://ADDR` of the ops listener.
    pub ops_base: String,
    /// `http://ADDR` of the default profile's proxy.
    pub proxy_base: String,
}

fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

impl Sidecar {
    /// Starts `binary` against `klavi_base_url` with `extra_env` on top of
    /// the demo keys; its stderr goes to `stderr`.
    pub fn spawn(
        binary: &std::path::Path,
        klavi_base_url: &str,
        extra_env: &[(&str, &str)],
        stderr: std::process::Stdio,
    ) -> std::io::Result<Self> {
        let (token, ops, proxy) = (free_port()?, free_port()?, free_port()?);
        let child = std::process::Command::new(binary)
            .args([
                "run",
                "--listen",
                &format!("127.0.0.1:{token}"),
                "--ops-listen",
                &format!("127.0.0.1:{ops}"),
            ])
            .env_clear()
            .env(
                "KLAVI_ACCESS_KEY",
                klavi_token_sidecar::fake_klavi::DEMO_ACCESS_KEY,
            )
            .env(
                "KLAVI_SECRET_KEY",
                klavi_token_sidecar::fake_klavi::DEMO_SECRET_KEY,
            )
            .env("KLAVI_SIDECAR_KLAVI__BASE_URL", klavi_base_url)
            .env(
                "KLAVI_SIDECAR_KLAVI__PROXY_LISTEN",
                format!("127.0.0.1:{proxy}"),
            )
            .envs(extra_env.iter().copied())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(stderr)
            .spawn()?;
        Ok(Self {
            child: Some(child),
            token_base: format!("http://127.0.0.1:{token}"),
            ops_base: format!("http://127.0.0.1:{ops}"),
            proxy_base: format!("http://127.0.0.1:{proxy}"),
        })
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, std::process::Child::id)
    }

    /// SIGTERM, then waits up to 15 s; returns how it exited.
    pub fn stop(mut self) -> std::io::Result<std::process::ExitStatus> {
        let Some(mut child) = self.child.take() else {
            return Err(std::io::Error::other("already stopped"));
        };
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        for _ in 0..750 {
            if let Some(status) = child.try_wait()? {
                return Ok(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        child.wait()
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
