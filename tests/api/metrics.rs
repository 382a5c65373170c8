//! `/metrics` scraped from the running app and parsed as Prometheus text:
//! every metric of SPEC section 6 with its type, and values that move.

use std::time::Duration;

use klavi_token_sidecar::fake_klavi::{FakeKlaviConfig, Outcome};
use prometheus_parse::{Scrape, Value};
use reqwest::StatusCode;

use crate::helpers::{TestApp, eventually, json};

async fn scrape(app: &TestApp) -> Scrape {
    let response = app.http.get(app.ops_url("/metrics")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response.headers()["content-type"],
        "text/plain; version=0.0.4; charset=utf-8"
    );
    let text = response.text().await.unwrap();
    Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).unwrap()
}

/// The value of the sample of `metric` with exactly these labels; a
/// per-profile metric asked for without a `profile` label means the default
/// profile's series.
fn sample<'a>(scrape: &'a Scrape, metric: &str, labels: &[(&str, &str)]) -> Option<&'a Value> {
    let mut labels = labels.to_vec();
    if metric != "klavi_sidecar_build_info" && !labels.iter().any(|(k, _)| *k == "profile") {
        labels.push(("profile", "default"));
    }
    scrape
        .samples
        .iter()
        .find(|s| {
            s.metric == metric
                && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v))
                && s.labels.len() == labels.len()
        })
        .map(|s| &s.value)
}

fn counter(scrape: &Scrape, metric: &str, labels: &[(&str, &str)]) -> f64 {
    match sample(scrape, metric, labels) {
        Some(Value::Counter(v)) => *v,
        other => panic!("{metric}{labels:?} is not a counter: {other:?}"),
    }
}

fn gauge(scrape: &Scrape, metric: &str, labels: &[(&str, &str)]) -> f64 {
    match sample(scrape, metric, labels) {
        Some(Value::Gauge(v)) => *v,
        other => panic!("{metric}{labels:?} is not a gauge: {other:?}"),
    }
}

fn histogram_count(scrape: &Scrape, metric: &str) -> f64 {
    match sample(scrape, metric, &[]) {
        Some(Value::Histogram(buckets)) => {
            let bounds: Vec<f64> = buckets.iter().map(|b| b.less_than).collect();
            assert!(
                bounds.contains(&0.005) && bounds.contains(&10.0),
                "5 ms to 10 s: {bounds:?}"
            );
            buckets.iter().map(|b| b.count).fold(0.0, f64::max)
        }
        other => panic!("{metric} is not a histogram: {other:?}"),
    }
}

#[tokio::test]
async fn every_metric_exists_and_moves() {
    let app = TestApp::spawn_with(
        FakeKlaviConfig {
            token_ttl: Duration::from_secs(300),
            ..FakeKlaviConfig::default()
        },
        |fake| fake.push([Outcome::token().after(Duration::from_millis(800))]),
        &[("KLAVI_SIDECAR_REFRESH__MIN_INTERVAL_SECS", "1")],
    )
    .await;

    // Before the first token: not ready, nothing fetched, failure series at 0.
    let s = scrape(&app).await;
    assert_eq!(gauge(&s, "klavi_sidecar_ready", &[]), 0.0);
    assert_eq!(
        gauge(&s, "klavi_sidecar_token_expiry_timestamp_seconds", &[]),
        0.0
    );
    assert_eq!(
        gauge(
            &s,
            "klavi_sidecar_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        1.0
    );
    for category in [
        "credentials_rejected",
        "rate_limited",
        "upstream_unavailable",
        "invalid_response",
    ] {
        assert_eq!(
            counter(
                &s,
                "klavi_sidecar_refresh_total",
                &[("result", "failure"), ("category", category)]
            ),
            0.0
        );
    }
    assert!(
        s.docs
            .contains_key("klavi_sidecar_upstream_request_duration_seconds")
    );

    // The first token: success counted, ready, expiry equals the served expireAt.
    let body = json(app.get_token("").await).await;
    let s = scrape(&app).await;
    assert_eq!(gauge(&s, "klavi_sidecar_ready", &[]), 1.0);
    assert_eq!(
        counter(
            &s,
            "klavi_sidecar_refresh_total",
            &[("result", "success"), ("category", "none")]
        ),
        1.0
    );
    assert_eq!(
        gauge(&s, "klavi_sidecar_token_expiry_timestamp_seconds", &[]),
        body["expireAt"].as_f64().unwrap()
    );
    assert_eq!(
        histogram_count(&s, "klavi_sidecar_upstream_request_duration_seconds"),
        1.0
    );
    assert_eq!(
        counter(
            &s,
            "klavi_sidecar_token_requests_total",
            &[("route", "/token"), ("status", "200")]
        ),
        1.0
    );
    // The hot path (a token held) counts the same way.
    for _ in 0..3 {
        assert_eq!(app.get_token("").await.status(), StatusCode::OK);
    }
    let s = scrape(&app).await;
    assert_eq!(
        counter(
            &s,
            "klavi_sidecar_token_requests_total",
            &[("route", "/token"), ("status", "200")]
        ),
        4.0
    );
    assert_eq!(
        counter(
            &s,
            "klavi_sidecar_token_requests_waited_total",
            &[("route", "/token")]
        ),
        1.0
    );
    assert!(
        gauge(
            &s,
            "klavi_sidecar_last_refresh_success_timestamp_seconds",
            &[]
        ) > 1.7e9
    );
    let next = gauge(&s, "klavi_sidecar_next_refresh_timestamp_seconds", &[]);
    let expiry = body["expireAt"].as_f64().unwrap();
    assert!(
        next > expiry - 300.0 && next < expiry,
        "next refresh {next} before expiry {expiry}"
    );
    assert_eq!(
        gauge(&s, "klavi_sidecar_upstream_requests_in_flight", &[]),
        0.0
    );

    // Klavi fails with 500, then rejects the keys: each counted by category
    // (once min_interval has passed, so the forced refresh calls Klavi).
    tokio::time::sleep(Duration::from_millis(1100)).await;
    app.fake.push([Outcome::status(500), Outcome::status(401)]);
    assert_eq!(app.refresh().await.status(), StatusCode::BAD_GATEWAY);
    // The 500 backs off briefly; the next forced refresh meets the 401.
    eventually(Duration::from_secs(5), "the 401 is fetched", || async {
        app.refresh().await;
        app.fake.calls() >= 3
    })
    .await;
    let s = scrape(&app).await;
    assert_eq!(
        counter(
            &s,
            "klavi_sidecar_refresh_total",
            &[("result", "failure"), ("category", "upstream_unavailable")]
        ),
        1.0
    );
    assert_eq!(
        counter(
            &s,
            "klavi_sidecar_refresh_total",
            &[("result", "failure"), ("category", "credentials_rejected")]
        ),
        1.0
    );
    assert_eq!(
        gauge(&s, "klavi_sidecar_refresh_consecutive_failures", &[]),
        2.0
    );
    assert!(
        counter(
            &s,
            "klavi_sidecar_forced_refreshes_total",
            &[("outcome", "failed")]
        ) >= 1.0
    );
    assert!(
        counter(
            &s,
            "klavi_sidecar_token_requests_total",
            &[("route", "/token/refresh"), ("status", "502")]
        ) >= 1.0
    );
    assert_eq!(
        histogram_count(&s, "klavi_sidecar_upstream_request_duration_seconds"),
        3.0
    );
    // Still serving the held token.
    assert_eq!(gauge(&s, "klavi_sidecar_ready", &[]), 1.0);

    // Unknown paths are counted as "unmatched", never by their raw path.
    app.http
        .get(app.url("/eyJsecret-looking-path"))
        .send()
        .await
        .unwrap();
    let s = scrape(&app).await;
    assert_eq!(
        counter(
            &s,
            "klavi_sidecar_token_requests_total",
            &[("profile", ""), ("route", "unmatched"), ("status", "404")]
        ),
        1.0
    );
    assert!(
        s.samples
            .iter()
            .all(|x| x.labels.values().all(|v| !v.contains("eyJ")))
    );
    app.stop().await;
}

#[tokio::test]
async fn readiness_gauge_drops_when_the_token_expires() {
    let app = TestApp::spawn_with(
        FakeKlaviConfig {
            token_ttl: Duration::from_secs(7),
            ..FakeKlaviConfig::default()
        },
        |fake| {
            fake.push([Outcome::token()]);
            fake.set_default(Outcome::status(503));
        },
        &[],
    )
    .await;
    eventually(Duration::from_secs(5), "ready", || async {
        gauge(&scrape(&app).await, "klavi_sidecar_ready", &[]) == 1.0
    })
    .await;
    eventually(
        Duration::from_secs(10),
        "not ready once within the margin",
        || async { gauge(&scrape(&app).await, "klavi_sidecar_ready", &[]) == 0.0 },
    )
    .await;
    let s = scrape(&app).await;
    assert!(
        counter(
            &s,
            "klavi_sidecar_refresh_total",
            &[("result", "failure"), ("category", "upstream_unavailable")]
        ) >= 1.0
    );
    app.stop().await;
}

/// Every `klavi_sidecar_*` name in `text`.
fn metric_names(text: &str) -> std::collections::BTreeSet<String> {
    text.match_indices("klavi_sidecar_")
        .map(|(i, _)| {
            text[i..]
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
                .collect()
        })
        .collect()
}

#[tokio::test]
async fn every_metric_the_alert_rules_and_the_dashboard_use_is_exported() {
    let rules = metric_names(include_str!("../../deploy/prometheus/alerts.yaml"));
    let dashboard_text = include_str!("../../deploy/grafana/klavi-token-sidecar.json");
    let dashboard: serde_json::Value = serde_json::from_str(dashboard_text).unwrap();
    // Every panel query filters by the profile variable and names metrics.
    let mut queries = 0;
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            assert!(expr.contains(r#"profile=~"$profile""#), "{expr}");
            assert!(!metric_names(expr).is_empty(), "{expr}");
            queries += 1;
        }
    }
    assert!(queries >= 8, "{queries} queries");
    let variables = dashboard["templating"]["list"].as_array().unwrap();
    assert!(variables.iter().any(|v| v["name"] == "profile"));
    let dashboard = metric_names(dashboard_text);
    assert!(
        rules.len() >= 4 && dashboard.len() >= 8,
        "{rules:?} {dashboard:?}"
    );
    let used: std::collections::BTreeSet<String> = rules.union(&dashboard).cloned().collect();
    // With a single_use profile too, whose lease series a shared one
    // lacks, and a proxy; the single_use profile's Klavi is a closed port, so the fake still sees one
    // profile's requests only.
    let app = TestApp::spawn_env(&[
        (
            "KLAVI_SIDECAR_PROFILES__PAY__BASE_URL",
            "http://127.0.0.1:9",
        ),
        ("KLAVI_SIDECAR_PROFILES__PAY__REQUIRED", "false"),
        ("KLAVI_SIDECAR_PROFILES__PAY__ACCESS_KEY", "demo-access-key"),
        ("KLAVI_SIDECAR_PROFILES__PAY__SECRET_KEY", "demo-secret-key"),
        ("KLAVI_SIDECAR_PROFILES__PAY__MODE", "single_use"),
        // And a proxy, whose series exist from the start.
        ("KLAVI_SIDECAR_KLAVI__PROXY_LISTEN", "127.0.0.1:0"),
    ])
    .await;
    let response = app.http.get(app.ops_url("/metrics")).send().await.unwrap();
    let text = response.text().await.unwrap();
    let exported: std::collections::BTreeSet<String> = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_string)
        .collect();
    for name in used {
        assert!(
            exported.contains(&name),
            "alerts.yaml or the dashboard uses {name}, which /metrics does not export"
        );
    }
    app.stop().await;
}
