//! A short chaos soak inside `cargo test` (about 25 s): the sidecar binary
//! under load, its token routes and its proxy, while the fake Klavi cycles
//! through every fault and revokes tokens. The long
//! run is `scripts/soak`; both use `klavi_sidecar_testkit::soak`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Stdio;
use std::time::Duration;

use klavi_sidecar_testkit::soak::{self, Sidecar, SoakConfig};
use klavi_token_sidecar::fake_klavi::{FakeKlavi, FakeKlaviConfig};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_soak_keeps_every_guarantee() {
    let fake = FakeKlavi::start_local(FakeKlaviConfig {
        // Short tokens with a 1 s serve margin: a refresh every ~2 s, so
        // faults hit refreshes and tokens run out within a phase.
        token_ttl: Duration::from_secs(4),
        ..FakeKlaviConfig::default()
    })
    .await
    .unwrap();
    let sidecar = Sidecar::spawn(
        std::path::Path::new(env!("CARGO_BIN_EXE_klavi-token-sidecar")),
        &fake.base_url(),
        &[
            ("KLAVI_SIDECAR_KLAVI__REQUEST_TIMEOUT_MS", "1000"),
            ("KLAVI_SIDECAR_REFRESH__BACKOFF_MAX_SECS", "2"),
            ("KLAVI_SIDECAR_REFRESH__MIN_INTERVAL_SECS", "1"),
            ("KLAVI_SIDECAR_REFRESH__WAIT_MS", "300"),
            ("KLAVI_SIDECAR_REFRESH__SERVE_MARGIN_SECS", "1"),
            ("RUST_LOG", "warn"),
        ],
        Stdio::null(),
    )
    .unwrap();
    let pid = sidecar.pid();

    let report = soak::run(
        SoakConfig {
            token_base: sidecar.token_base.clone(),
            ops_base: sidecar.ops_base.clone(),
            duration: Duration::from_secs(22),
            clients: 16,
            pacing: Duration::from_millis(2),
            fault_phase: Duration::from_millis(1000),
            healthy_phase: Duration::from_millis(300),
            serve_margin: Duration::from_secs(1),
            backoff_max: Duration::from_secs(2),
            rss_growth_limit: 8 << 20,
            reject_every: Some(Duration::from_millis(700)),
            proxy_base: sidecar.proxy_base.clone(),
            proxy_clients: 4,
            revoke_every: Some(Duration::from_millis(900)),
        },
        &fake,
        || soak::rss_of(pid),
    )
    .await;
    println!("{}", report.summary());
    let exit = sidecar.stop().unwrap();
    fake.stop().await;
    assert!(exit.success(), "clean exit on SIGTERM: {exit}");

    assert_eq!(report.violation_count, 0, "{}", report.summary());
    assert!(report.phases >= 10, "{}", report.summary());
    assert!(
        report.ok > 1000 && report.upstream_calls > 10,
        "{}",
        report.summary()
    );
    assert!(report.rss_start.is_some());
    assert!(report.rejections >= 10, "{}", report.summary());
    // Proxied traffic ran throughout, revocations were replayed through.
    assert!(report.proxied > 500, "{}", report.summary());
    assert!(report.revocations >= 10, "{}", report.summary());
    // Never a third send (guarantee 13). Whether a revocation met a
    // proxied request in flight depends on the machine's load (a CI run
    // beside other builds saw none): that a 401 is replayed once is
    // proved deterministically by tests/cli/proxy.rs.
    assert!(
        (1..=2).contains(&report.max_sends),
        "never a third send: {}",
        report.summary()
    );
}
