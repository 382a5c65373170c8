//! The binary as users run it: exit codes, one-line errors, `check-config`,
//! `healthcheck`, signals.

#![allow(clippy::unwrap_used, clippy::expect_used)]
// These tests compare what the sidecar reports with the real clocks.
#![allow(clippy::disallowed_methods)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_klavi-token-sidecar");

fn sidecar(args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut command = Command::new(BIN);
    command.args(args).env_clear();
    for (k, v) in env {
        command.env(k, v);
    }
    command
}

fn run(args: &[&str], env: &[(&str, &str)]) -> Output {
    sidecar(args, env).output().unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The binary's own error lines in `stderr` (log lines aside).
fn error_lines(stderr: &str) -> Vec<&str> {
    stderr
        .lines()
        .filter(|l| l.starts_with("klavi-token-sidecar:"))
        .collect()
}

const KEYS: [(&str, &str); 2] = [
    ("KLAVI_ACCESS_KEY", "cli-test-access-key"),
    ("KLAVI_SECRET_KEY", "cli-test-secret-key"),
];

#[test]
fn help_and_version() {
    let output = run(&["--version"], &[]);
    assert!(output.status.success());
    assert_eq!(
        text(&output.stdout).trim(),
        format!("klavi-token-sidecar {}", env!("CARGO_PKG_VERSION"))
    );
    let output = run(&["--help"], &[]);
    assert!(output.status.success());
    let help = text(&output.stdout);
    for command in [
        "run",
        "demo",
        "fake-klavi",
        "check-config",
        "healthcheck",
        "--config",
    ] {
        assert!(help.contains(command), "--help mentions {command}");
    }
}

#[test]
fn bad_configuration_exits_2_with_one_line_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let bad_toml = dir.path().join("bad.toml");
    std::fs::write(&bad_toml, "[server\n").unwrap();
    let bad_toml = bad_toml.display().to_string();
    let wrong_type = dir.path().join("wrong.toml");
    std::fs::write(&wrong_type, "[refresh]\nwait_ms = \"soon\"\n").unwrap();
    let wrong_type = wrong_type.display().to_string();
    let missing = dir.path().join("missing.toml").display().to_string();
    let with_keys = |extra: &[(&'static str, &'static str)]| {
        let mut env = KEYS.to_vec();
        env.extend_from_slice(extra);
        env
    };
    let cases: Vec<(Vec<&str>, Vec<(&str, &str)>, &str)> = vec![
        (vec!["run"], vec![], "klavi.access_key"),
        (vec![], vec![KEYS[0]], "klavi.secret_key"),
        (
            vec!["run"],
            with_keys(&[("KLAVI_SIDECAR_SERVER__LISTEN", "0.0.0.0:8089")]),
            "server.listen",
        ),
        (
            vec!["run", "--listen", "10.1.2.3:80"],
            KEYS.to_vec(),
            "server.listen",
        ),
        (
            vec!["run"],
            with_keys(&[("KLAVI_SIDECAR_LOG__FORMAT", "xml")]),
            "log.format",
        ),
        (
            vec!["run"],
            with_keys(&[("KLAVI_SIDECAR_KLAVI__BASE_URL", "http://api.klavi.ai")]),
            "klavi.base_url",
        ),
        (
            vec!["run"],
            with_keys(&[("KLAVI_SIDECAR_REFRESH__JITTER_RATIO", "2")]),
            "refresh.jitter_ratio",
        ),
        (
            vec!["run"],
            with_keys(&[("KLAVI_SIDECAR_SERVER__TYPO", "1")]),
            "server.typo",
        ),
        (
            vec!["run", "--config", &bad_toml],
            KEYS.to_vec(),
            "--config",
        ),
        (vec!["--config", &missing, "run"], KEYS.to_vec(), "--config"),
        (
            vec!["run", "--config", &wrong_type],
            KEYS.to_vec(),
            "refresh.wait_ms",
        ),
        (vec!["check-config"], vec![], "klavi.access_key"),
        (
            vec!["demo"],
            vec![("KLAVI_SIDECAR_SERVER__OPS_LISTEN", "not-an-address")],
            "server.ops_listen",
        ),
    ];
    for (args, env, key) in cases {
        let output = run(&args, &env);
        let stderr = text(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{args:?} {env:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
        assert!(
            stderr.starts_with(&format!(
                "klavi-token-sidecar: configuration error: {key}: "
            )),
            "{args:?}: {stderr}"
        );
        assert!(!stderr.contains("panicked") && !stderr.contains("backtrace"));
        assert!(output.stdout.is_empty());
    }
}

#[test]
fn check_config_prints_the_effective_configuration_with_secrets_redacted() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("sidecar.toml");
    std::fs::write(&file, "[refresh]\nwait_ms = 1234\n").unwrap();
    let file = file.display().to_string();
    let output = run(
        &["check-config", "--listen", "127.0.0.1:9999"],
        &[KEYS[0], KEYS[1], ("KLAVI_SIDECAR_CONFIG", &file)],
    );
    assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
    let stdout = text(&output.stdout);
    let parsed: toml::Table = toml::from_str(&stdout).unwrap();
    assert_eq!(parsed["refresh"]["wait_ms"].as_integer(), Some(1234));
    assert_eq!(parsed["server"]["listen"].as_str(), Some("127.0.0.1:9999"));
    assert_eq!(parsed["klavi"]["access_key"].as_str(), Some("[REDACTED]"));
    assert!(!stdout.contains("cli-test-access-key") && !stdout.contains("cli-test-secret-key"));
    assert!(stdout.contains(&file));
}

#[test]
fn a_taken_port_exits_1_with_one_line() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let output = run(&["run", "--listen", &addr, "--ops-listen", ""], &KEYS);
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    let errors = error_lines(&stderr);
    assert_eq!(errors.len(), 1, "{stderr}");
    assert!(
        errors[0].contains(&format!("cannot listen on {addr} (server.listen)")),
        "{stderr}"
    );
}

/// A child process that is killed if the test fails before stopping it.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the demo on random ports with JSON logs; returns it and its
/// token and ops addresses once it has started.
fn start_demo() -> (Running, String, String) {
    let mut child = sidecar(
        &[
            "demo",
            "--listen",
            "127.0.0.1:0",
            "--ops-listen",
            "127.0.0.1:0",
            "--log-format",
            "json",
        ],
        &[
            ("KLAVI_SIDECAR_KLAVI__PROXY_LISTEN", "127.0.0.1:0"),
            (
                "KLAVI_SIDECAR_PROFILES__PAYMENTS__PROXY_LISTEN",
                "127.0.0.1:0",
            ),
        ],
    )
    .stderr(Stdio::piped())
    .stdout(Stdio::null())
    .spawn()
    .unwrap();
    let stderr = child.stderr.take().unwrap();
    let running = Running(child);
    let mut lines = BufReader::new(stderr).lines();
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        let Some(Ok(line)) = lines.next() else { break };
        let Ok(event) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        if event["message"] == "klavi-token-sidecar started" {
            let token = event["token_listener"].as_str().unwrap().to_string();
            let ops = event["ops_listener"].as_str().unwrap().to_string();
            // Keep draining stderr so the child never blocks on a full pipe.
            std::thread::spawn(move || for _ in lines {});
            return (running, token, ops);
        }
    }
    panic!("the demo did not start");
}

fn wait_for_exit(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

/// A stderr nobody reads any more (a log collector gone) must not keep
/// SIGTERM from stopping the service: logging to it once made the signal
/// task panic before it cancelled anything.
#[test]
fn sigterm_stops_the_service_even_when_its_stderr_is_gone() {
    let (token, ops) = (free_port(), free_port());
    let mut child = sidecar(
        &[
            "demo",
            "--listen",
            &format!("127.0.0.1:{token}"),
            "--ops-listen",
            &format!("127.0.0.1:{ops}"),
        ],
        &[
            ("KLAVI_SIDECAR_KLAVI__PROXY_LISTEN", "127.0.0.1:0"),
            (
                "KLAVI_SIDECAR_PROFILES__PAYMENTS__PROXY_LISTEN",
                "127.0.0.1:0",
            ),
        ],
    )
    .stdout(Stdio::null())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    // Read the first line, then close the pipe: every later write fails.
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut first = String::new();
    stderr.read_line(&mut first).unwrap();
    drop(stderr);
    let mut running = Running(child);
    let deadline = Instant::now() + Duration::from_secs(15);
    let ops = format!("127.0.0.1:{ops}");
    while !get(&ops, "/healthz").starts_with("HTTP/1.1 200") {
        assert!(Instant::now() < deadline, "the demo never served");
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = Command::new("kill")
        .args(["-TERM", &running.0.id().to_string()])
        .status();
    // If it does not stop, dropping `running` kills it.
    let exit = wait_for_exit(&mut running.0, Duration::from_secs(12));
    assert!(
        exit.is_some_and(|s| s.success()),
        "exit on SIGTERM: {exit:?}"
    );
}

#[test]
fn healthcheck_exits_0_against_a_ready_demo_and_1_once_it_stopped() {
    let (mut demo, _token, ops) = start_demo();
    let url = format!("http://{ops}/readyz");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let output = run(&["healthcheck", "--url", &url], &[]);
        if output.status.success() {
            break;
        }
        assert!(Instant::now() < deadline, "{}", text(&output.stderr));
        std::thread::sleep(Duration::from_millis(50));
    }
    // The default URL comes from the configuration.
    let output = run(
        &["healthcheck"],
        &[("KLAVI_SIDECAR_SERVER__OPS_LISTEN", &ops)],
    );
    assert!(output.status.success(), "{}", text(&output.stderr));

    let status = Command::new("kill")
        .args(["-TERM", &demo.0.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = wait_for_exit(&mut demo.0, Duration::from_secs(12)).expect("exits after SIGTERM");
    assert_eq!(exit.code(), Some(0), "SIGTERM is a clean exit");

    let output = run(&["healthcheck", "--url", &url], &[]);
    assert_eq!(output.status.code(), Some(1));
    assert_eq!(text(&output.stderr).lines().count(), 1);
}

#[test]
fn sigint_is_a_clean_exit_too() {
    let (mut demo, token, _ops) = start_demo();
    // The demo serves a token before it is stopped.
    let mut stream = std::net::TcpStream::connect(&token).unwrap();
    use std::io::{Read, Write};
    write!(
        stream,
        "GET /token HTTP/1.1\r\nHost: localhost\r\nKlavi-Sidecar: true\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    let status = Command::new("kill")
        .args(["-INT", &demo.0.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = wait_for_exit(&mut demo.0, Duration::from_secs(12)).expect("exits after SIGINT");
    assert_eq!(exit.code(), Some(0));
}

#[test]
fn fake_klavi_command_serves_tokens() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let child = sidecar(
        &[
            "fake-klavi",
            "--listen",
            &addr,
            "--token-ttl",
            "42",
            "--access-key",
            "k",
            "--secret-key",
            "s",
        ],
        &[],
    )
    .stderr(Stdio::null())
    .spawn()
    .unwrap();
    let mut fake = Running(child);
    let deadline = Instant::now() + Duration::from_secs(10);
    let response = loop {
        if let Ok(mut stream) = std::net::TcpStream::connect(&addr) {
            use std::io::{Read, Write};
            let body = r#"{"accessKey":"k","secretKey":"s"}"#;
            write!(
                stream,
                "POST /payment/customer/v1/auth HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            )
            .unwrap();
            let mut response = String::new();
            stream.read_to_string(&mut response).unwrap();
            break response;
        }
        assert!(Instant::now() < deadline, "fake-klavi did not start");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    let body = response.split("\r\n\r\n").nth(1).unwrap();
    let json: serde_json::Value = serde_json::from_str(body).unwrap();
    assert!(json["accessToken"].as_str().unwrap().split('.').count() == 3);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let expire_at = json["expireAt"].as_u64().unwrap();
    assert!((now + 40..=now + 43).contains(&expire_at));
    Command::new("kill")
        .args(["-TERM", &fake.0.id().to_string()])
        .status()
        .unwrap();
    assert_eq!(
        wait_for_exit(&mut fake.0, Duration::from_secs(5)).and_then(|s| s.code()),
        Some(0)
    );
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A child whose stderr is collected in the background.
struct Captured {
    child: Running,
    stderr: std::sync::Arc<std::sync::Mutex<String>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Captured {
    fn spawn(mut command: Command) -> Self {
        let mut child = command
            .stderr(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        let text = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let sink = std::sync::Arc::clone(&text);
        let reader = std::thread::spawn(move || {
            let out = std::thread::spawn(move || {
                let mut s = String::new();
                let _ = BufReader::new(stdout).read_to_string(&mut s);
                s
            });
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut all = sink.lock().unwrap();
                all.push_str(&line);
                all.push('\n');
            }
            let out = out.join().unwrap_or_default();
            sink.lock().unwrap().push_str(&out);
        });
        Self {
            child: Running(child),
            stderr: text,
            reader: Some(reader),
        }
    }

    fn pid(&self) -> u32 {
        self.child.0.id()
    }

    /// Everything it printed so far.
    fn log(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    fn wait_for_line(&self, needle: &str) {
        let deadline = Instant::now() + Duration::from_secs(15);
        while !self.stderr.lock().unwrap().contains(needle) {
            assert!(
                Instant::now() < deadline,
                "no {needle:?} in: {}",
                self.stderr.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the process (SIGTERM) and returns everything it printed.
    fn stop(mut self) -> String {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.0.id().to_string()])
            .status();
        let _ = wait_for_exit(&mut self.child.0, Duration::from_secs(12));
        if let Some(reader) = self.reader.take() {
            reader.join().unwrap();
        }
        self.stderr.lock().unwrap().clone()
    }
}

use std::io::Read as _;

fn http(addr: &str, request: &str) -> String {
    use std::io::Write;
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream.write_all(request.as_bytes()).unwrap();
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    response
}

fn get(addr: &str, path: &str) -> String {
    http(
        addr,
        &format!(
            "GET {path} HTTP/1.1\r\nHost: localhost\r\nKlavi-Sidecar: true\r\nConnection: close\r\n\r\n"
        ),
    )
}

mod fleet;
mod leases;
mod profiles;
mod proxy;
mod redaction;
mod sidecar;
mod token_file;
mod unix;
