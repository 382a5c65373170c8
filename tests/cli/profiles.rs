//! Profiles through the real binary: two fake-klavi processes with their
//! own keys, one sidecar with a second profile from the environment.

use super::*;

fn body_of(response: &str) -> serde_json::Value {
    let body = response.split("\r\n\r\n").nth(1).unwrap_or_default();
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {response}"))
}

/// A fake-klavi process accepting `access`/`secret`, with `extra` flags;
/// its base URL.
fn start_fake(access: &str, secret: &str, extra: &[&str]) -> (Captured, String) {
    let addr = format!("127.0.0.1:{}", free_port());
    let mut args = vec![
        "fake-klavi",
        "--listen",
        &addr,
        "--access-key",
        access,
        "--secret-key",
        secret,
    ];
    args.extend_from_slice(extra);
    let fake = Captured::spawn(sidecar(&args, &[]));
    fake.wait_for_line("fake Klavi listening");
    (fake, format!("http://{addr}"))
}

/// Two fake Klavis, the Product API's (the default profile) and the
/// Management API's (`mgmt`, started with `mgmt_faults`), and the
/// environment of a sidecar serving both, plus `extra_env`.
struct TwoProfiles {
    product_fake: Captured,
    mgmt_fake: Captured,
    mgmt_url: String,
    env: Vec<(&'static str, String)>,
}

impl TwoProfiles {
    fn start(mgmt_faults: &[&str], extra_env: &[(&'static str, &str)]) -> Self {
        let (product_fake, product_url) = start_fake("product-ak", "product-sk", &[]);
        let (mgmt_fake, mgmt_url) = start_fake("mgmt-ak", "mgmt-sk", mgmt_faults);
        let env: Vec<(&'static str, String)> = [
            ("KLAVI_ACCESS_KEY", "product-ak"),
            ("KLAVI_SECRET_KEY", "product-sk"),
            ("KLAVI_SIDECAR_KLAVI__BASE_URL", product_url.as_str()),
            ("KLAVI_SIDECAR_PROFILES__MGMT__BASE_URL", mgmt_url.as_str()),
            ("KLAVI_SIDECAR_PROFILES__MGMT__ACCESS_KEY", "mgmt-ak"),
            ("KLAVI_SIDECAR_PROFILES__MGMT__SECRET_KEY", "mgmt-sk"),
        ]
        .into_iter()
        .chain(extra_env.iter().copied())
        .map(|(k, v)| (k, v.to_string()))
        .collect();
        Self {
            product_fake,
            mgmt_fake,
            mgmt_url,
            env,
        }
    }

    fn env(&self) -> Vec<(&str, &str)> {
        self.env.iter().map(|(k, v)| (*k, v.as_str())).collect()
    }

    fn stop(self) {
        self.product_fake.stop();
        self.mgmt_fake.stop();
    }
}

/// Two loopback addresses on free ports: the token and ops listeners.
fn listeners() -> (String, String) {
    (
        format!("127.0.0.1:{}", free_port()),
        format!("127.0.0.1:{}", free_port()),
    )
}

#[test]
fn two_profiles_through_the_binary_each_served_and_reported() {
    let fakes = TwoProfiles::start(&[], &[]);
    let mgmt_url = fakes.mgmt_url.clone();
    let (token, ops) = listeners();
    let env = fakes.env();
    // check-config prints both profiles, redacted.
    let output = run(&["check-config"], &env);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
    let printed: toml::Table = toml::from_str(&text(&output.stdout)).unwrap();
    assert_eq!(
        printed["profiles"]["mgmt"]["base_url"].as_str(),
        Some(mgmt_url.as_str())
    );
    assert_eq!(
        printed["profiles"]["mgmt"]["secret_key"].as_str(),
        Some("[REDACTED]")
    );
    assert!(!text(&output.stdout).contains("mgmt-sk"));

    let service = Captured::spawn(sidecar(
        &["run", "--listen", &token, "--ops-listen", &ops],
        &env,
    ));
    service.wait_for_line("klavi-token-sidecar started");
    let deadline = Instant::now() + Duration::from_secs(10);
    let (product, mgmt) = loop {
        let product = get(&token, "/token");
        let mgmt = get(&token, "/profiles/mgmt/token");
        if product.starts_with("HTTP/1.1 200") && mgmt.starts_with("HTTP/1.1 200") {
            break (body_of(&product), body_of(&mgmt));
        }
        assert!(Instant::now() < deadline, "{product}\n{mgmt}");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_ne!(product["accessToken"], mgmt["accessToken"]);
    let ready = get(&ops, "/readyz");
    assert!(ready.starts_with("HTTP/1.1 200"), "{ready}");
    let ready = body_of(&ready);
    assert_eq!(ready["profiles"]["default"]["status"], "ready");
    assert_eq!(ready["profiles"]["mgmt"]["status"], "ready");
    let metrics = get(&ops, "/metrics");
    for series in [
        r#"klavi_sidecar_ready{profile="default"} 1"#,
        r#"klavi_sidecar_ready{profile="mgmt"} 1"#,
        r#"klavi_sidecar_refresh_total{profile="mgmt",result="success",category="none"} 1"#,
        r#"klavi_sidecar_token_requests_total{profile="mgmt",route="/profiles/{name}/token",status="200"}"#,
    ] {
        assert!(metrics.contains(series), "{series} missing from {metrics}");
    }
    let log = service.stop();
    assert!(log.contains("profiles=default,mgmt"), "{log}");
    // Second review: the refresh lines did not say which key pair.
    for profile in ["default", "mgmt"] {
        assert!(
            log.lines()
                .any(|l| l.contains("token refreshed") && l.contains(&format!("profile={profile}"))),
            "{profile}: {log}"
        );
        assert!(
            log.lines()
                .any(|l| l.contains("profile serving") && l.contains(&format!("profile={profile}"))),
            "{log}"
        );
    }
    for secret in ["product-sk", "mgmt-sk"] {
        assert!(!log.contains(secret), "{secret} leaked");
    }
    fakes.stop();
}

/// Isolation through the binary: the second profile's Klavi hangs on
/// every call, and the default profile is served, ready and refreshed as
/// if it were alone, while readiness names the profile that is not.
#[test]
fn a_hanging_profile_does_not_hold_up_the_other_through_the_binary() {
    let fakes = TwoProfiles::start(
        &["--faults", "hang", "--fault-rate", "1"],
        &[("KLAVI_SIDECAR_REFRESH__WAIT_MS", "2000")],
    );
    let (token, ops) = listeners();
    let env = fakes.env();
    let service = Captured::spawn(sidecar(
        &["run", "--listen", &token, "--ops-listen", &ops],
        &env,
    ));
    service.wait_for_line("klavi-token-sidecar started");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !get(&token, "/token").starts_with("HTTP/1.1 200") {
        assert!(
            Instant::now() < deadline,
            "the default profile was never served"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // Every default request is answered from the held token at once, never
    // after the 2 s wait a request of the hanging neighbour gets.
    for _ in 0..20 {
        let asked = Instant::now();
        let answer = get(&token, "/token");
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(
            asked.elapsed() < Duration::from_secs(1),
            "{:?}",
            asked.elapsed()
        );
    }
    let mgmt = get(&token, "/profiles/mgmt/token");
    assert!(mgmt.starts_with("HTTP/1.1 503"), "{mgmt}");
    let ready = get(&ops, "/readyz");
    assert!(
        ready.starts_with("HTTP/1.1 503"),
        "a required profile is not ready: {ready}"
    );
    let ready = body_of(&ready);
    assert_eq!(ready["profiles"]["default"]["status"], "ready");
    assert_ne!(ready["profiles"]["mgmt"]["status"], "ready");
    let healthz = get(&ops, "/healthz");
    assert!(healthz.starts_with("HTTP/1.1 200"), "{healthz}");
    service.stop();
    fakes.stop();
}
