//! Redaction: distinctive keys and tokens never appear in anything the
//! sidecar prints or serves, in either log format, at debug level.

use super::*;

const SECRET_ACCESS: &str = "AK-redaction-probe-7f3a1c";
const SECRET_SECRET: &str = "SK-redaction-probe-9b1c4e";
const WRONG_SECRET: &str = "SK-wrong-probe-55d0aa";

fn sidecar_against(
    fake: u16,
    secret: &str,
    format: &str,
    token_port: u16,
    ops_port: u16,
) -> Captured {
    let token = format!("127.0.0.1:{token_port}");
    let ops = format!("127.0.0.1:{ops_port}");
    let base = format!("http://127.0.0.1:{fake}");
    let command = sidecar(
        &[
            "run",
            "--listen",
            &token,
            "--ops-listen",
            &ops,
            "--log-format",
            format,
        ],
        &[
            ("KLAVI_ACCESS_KEY", SECRET_ACCESS),
            ("KLAVI_SECRET_KEY", secret),
            ("KLAVI_SIDECAR_KLAVI__BASE_URL", &base),
            ("KLAVI_SIDECAR_REFRESH__MIN_INTERVAL_SECS", "1"),
            ("RUST_LOG", "debug"),
        ],
    );
    Captured::spawn(command)
}

#[test]
fn no_key_secret_or_token_appears_in_logs_metrics_or_command_output() {
    let fake_port = free_port();
    let fake_addr = format!("127.0.0.1:{fake_port}");
    let fake = Captured::spawn(sidecar(
        &[
            "fake-klavi",
            "--listen",
            &fake_addr,
            "--access-key",
            SECRET_ACCESS,
            "--secret-key",
            SECRET_SECRET,
        ],
        &[("RUST_LOG", "debug")],
    ));
    fake.wait_for_line("fake Klavi listening");

    let mut printed = Vec::new();
    let mut tokens = Vec::new();
    for format in ["text", "json"] {
        // Success: tokens fetched, served, force-refreshed; metrics scraped.
        let (token_port, ops_port) = (free_port(), free_port());
        let good = sidecar_against(fake_port, SECRET_SECRET, format, token_port, ops_port);
        good.wait_for_line("token refreshed");
        let token_addr = format!("127.0.0.1:{token_port}");
        let ops_addr = format!("127.0.0.1:{ops_port}");
        for response in [
            get(&token_addr, "/token"),
            http(
                &token_addr,
                "POST /token/refresh HTTP/1.1\r\nHost: localhost\r\nKlavi-Sidecar: true\r\nConnection: close\r\n\r\n",
            ),
        ] {
            assert!(response.starts_with("HTTP/1.1 200"), "{response}");
            let body = response.split("\r\n\r\n").nth(1).unwrap();
            let json: serde_json::Value = serde_json::from_str(body).unwrap();
            tokens.push(json["accessToken"].as_str().unwrap().to_string());
        }
        printed.push(get(&ops_addr, "/metrics"));
        printed.push(get(&ops_addr, "/readyz"));
        printed.push(good.stop());

        // Failure: Klavi rejects the keys (logged with the error detail).
        let (token_port, ops_port) = (free_port(), free_port());
        let bad = sidecar_against(fake_port, WRONG_SECRET, format, token_port, ops_port);
        bad.wait_for_line("credentials_rejected");
        let token_addr = format!("127.0.0.1:{token_port}");
        printed.push(get(&token_addr, "/token"));
        printed.push(get(&format!("127.0.0.1:{ops_port}"), "/metrics"));
        printed.push(bad.stop());
    }
    let fake_output = fake.stop();

    // Klavi unreachable: connection errors are logged with their detail.
    let (token_port, ops_port) = (free_port(), free_port());
    let unreachable = sidecar_against(fake_port, SECRET_SECRET, "json", token_port, ops_port);
    unreachable.wait_for_line("upstream_unavailable");
    printed.push(unreachable.stop());

    // Configuration errors and check-config, with the keys set.
    let keys = [
        ("KLAVI_ACCESS_KEY", SECRET_ACCESS),
        ("KLAVI_SECRET_KEY", SECRET_SECRET),
    ];
    for (args, extra) in [
        (vec!["check-config"], vec![]),
        (vec!["check-config", "--listen", "0.0.0.0:1"], vec![]),
        (
            vec!["run"],
            vec![("KLAVI_SIDECAR_KLAVI__BASE_URL", "http://example.com")],
        ),
        (vec!["run"], vec![("KLAVI_SECRET_KEY_FILE", "/nonexistent")]),
        (vec!["demo", "--log-format", "xml"], vec![]),
    ] {
        let mut env = keys.to_vec();
        env.extend(extra);
        let output = run(&args, &env);
        printed.push(text(&output.stdout));
        printed.push(text(&output.stderr));
    }

    assert_eq!(tokens.len(), 4);
    let everything = printed.join("\n") + &fake_output;
    assert!(
        everything.contains("fingerprint"),
        "logs name tokens by fingerprint"
    );
    for secret in [SECRET_ACCESS, SECRET_SECRET, WRONG_SECRET]
        .iter()
        .map(|s| s.to_string())
        .chain(tokens)
    {
        assert!(!everything.contains(&secret), "{secret} leaked");
        // Not even a long piece of a token (its signature, say).
        if secret.contains('.') {
            let signature = secret.rsplit('.').next().unwrap();
            assert!(!everything.contains(signature), "a token signature leaked");
        }
    }
}
