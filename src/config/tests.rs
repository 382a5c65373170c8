//! Loading and validating, end to end from the sources.

use super::*;
use std::path::Path;

fn env(pairs: &[(&str, &str)]) -> Sources {
    Sources {
        env: pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..Sources::default()
    }
}

const KEYS: [(&str, &str); 2] = [("KLAVI_ACCESS_KEY", "ak"), ("KLAVI_SECRET_KEY", "sk")];

fn with_keys(extra: &[(&str, &str)]) -> Sources {
    let mut pairs = KEYS.to_vec();
    pairs.extend_from_slice(extra);
    env(&pairs)
}

fn error_of(sources: &Sources) -> ConfigError {
    match load(sources) {
        Err(e) => e,
        Ok(config) => panic!("expected an error, got {config:?}"),
    }
}

#[test]
fn defaults_match_the_spec() {
    let config = load(&with_keys(&[])).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        config.server.listen,
        "127.0.0.1:8089".parse().ok().unwrap_or_else(|| panic!())
    );
    assert_eq!(
        config.server.ops_listen.map(|a| a.to_string()),
        Some("0.0.0.0:8090".into())
    );
    assert!(config.server.require_header);
    assert_eq!(config.server.shutdown_grace, Duration::from_secs(10));
    assert_eq!(config.server.limits, Limits::default());
    assert_eq!(config.server.max_body_bytes, 16 * 1024);
    assert_eq!(config.server.request_timeout, Duration::from_secs(10));
    assert_eq!(
        config.profiles[0].klavi.auth_url.as_str(),
        "https://api-sandbox.klavi.ai/payment/customer/v1/auth"
    );
    assert_eq!(
        config.profiles[0].klavi.access_key,
        KeySource::Inline(Secret::new("ak"))
    );
    assert_eq!(
        config.profiles[0].klavi.connect_timeout,
        Duration::from_millis(3000)
    );
    assert_eq!(
        config.profiles[0].klavi.request_timeout,
        Duration::from_millis(10_000)
    );
    assert_eq!(config.profiles[0].refresh.policy, RefreshPolicy::default());
    assert_eq!(config.profiles[0].refresh.wait, Duration::from_millis(5000));
    assert_eq!(
        config.profiles[0].refresh.fallback_ttl,
        Duration::from_secs(300)
    );
    assert_eq!(config.log, LogFormat::Text);
    assert_eq!(config.worker_threads, 1);
    assert_eq!(config.fleet, None, "fleet mode is off by default");
    assert!(config.profiles[0].fleet);
}

#[test]
fn fleet_section_is_checked_and_its_password_never_shows() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let file = |body: &str| {
        let path = dir.path().join("fleet.toml");
        std::fs::write(
            &path,
            format!("[klavi]\naccess_key = \"ak\"\nsecret_key = \"sk\"\n{body}"),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        load(&Sources {
            file: Some(path),
            ..Sources::default()
        })
    };
    let config = file(
        "[fleet]\nredis_url = \"rediss://app:hunter22@redis.infra:6380/2\"\nkey_prefix = \"pay:eu\"\ncommand_timeout_ms = 250\n",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let fleet = config.fleet.clone().unwrap_or_else(|| panic!("fleet on"));
    assert_eq!(
        fleet.redis_url.expose(),
        "rediss://app:hunter22@redis.infra:6380/2"
    );
    assert_eq!(fleet.key_prefix, "pay:eu");
    assert_eq!(fleet.command_timeout, Duration::from_millis(250));
    let shown = config.to_redacted_toml();
    assert!(!shown.contains("hunter22"), "{shown}");
    assert!(
        shown.contains("rediss://REDACTED@redis.infra:6380/2"),
        "{shown}"
    );
    assert!(!format!("{config:?}").contains("hunter22"));
    // Every other place the crate reads a password from is redacted too.
    for url in [
        "redis://host/0?password=hunter22",
        "redis://hunter22@host",
        "redis://:hunter22@host:6379/0#frag",
        "redis:u:hunter22@127.0.0.1",
        "rediss:default:hunter22@10.0.0.5:6379",
        "redis:/default:hunter22@host",
        "redis://host/0/../hunter22",
    ] {
        let shown = crate::config::RedisUrl::new(url).redacted();
        assert!(
            !shown.contains("hunter22") && shown.contains("REDACTED"),
            "{url} shows as {shown}"
        );
    }

    let cases = [
        (
            "[fleet]\nredis_url = \"http://:hunter22@redis:6379\"\n",
            "fleet.redis_url",
            "scheme",
        ),
        (
            "[fleet]\nredis_url = \"redis://:hunter22@\"\n",
            "fleet.redis_url",
            "",
        ),
        (
            "[fleet]\nredis_url = \"not a url hunter22\"\n",
            "fleet.redis_url",
            "not a URL",
        ),
        (
            "[fleet]\nredis_url = \"redis://:hunter22@redis:6379/db\"\n",
            "fleet.redis_url",
            "database",
        ),
        ("[fleet]\nkey_prefix = \"\"\n", "fleet.key_prefix", "1–64"),
        (
            "[fleet]\nkey_prefix = \"a b\"\n",
            "fleet.key_prefix",
            "1–64",
        ),
        (
            "[fleet]\ncommand_timeout_ms = 0\n",
            "fleet.command_timeout_ms",
            "",
        ),
        (
            "[fleet]\ncommand_timeout_ms = 10001\n",
            "fleet.command_timeout_ms",
            "",
        ),
        ("[fleet]\nhost = \"x\"\n", "fleet", "unknown"),
        (
            "[fleet]\nredis_url = \"unix:///tmp/r.sock?pass=hunter22\"\n",
            "fleet.redis_url",
            "scheme",
        ),
        (
            "[fleet]\nredis_url = \"redis+unix:///r.sock?password=hunter22\"\n",
            "fleet.redis_url",
            "scheme",
        ),
    ];
    for (body, key, needle) in cases {
        let error = file(body)
            .err()
            .unwrap_or_else(|| panic!("{body} accepted"));
        let line = error.to_string();
        assert!(line.starts_with(key), "{body}: {line}");
        assert!(line.contains(needle), "{body}: {line}");
        assert!(
            !line.contains("hunter22"),
            "{body}: the password shows in {line}"
        );
    }
}

#[test]
fn default_toml_documents_exactly_the_defaults() {
    let text = include_str!("../../config/default.toml");
    // Every key is documented commented out; uncommenting gives the defaults.
    let uncommented: String = text
        .lines()
        .map(|line| match line.strip_prefix("# ") {
            Some(rest) if rest.contains(" = ") || rest.starts_with('[') => rest,
            _ => line,
        })
        .collect::<Vec<_>>()
        .join("\n");
    let parsed: RawConfig = toml::from_str(&uncommented).unwrap_or_else(|e| panic!("{e}"));
    // The example profile parses, with what it says.
    let example = &parsed.profiles["example"];
    assert_eq!(example.required, Some(false));
    assert!(example.access_key_file.is_some() && example.access_key.is_none());
    let mut expected = RawConfig::default();
    expected.klavi.access_key = Some(Secret::new("your-access-key"));
    expected.klavi.secret_key = Some(Secret::new("your-secret-key"));
    assert_eq!(parsed.server, expected.server);
    assert_eq!(parsed.klavi.base_url, expected.klavi.base_url);
    assert_eq!(parsed.klavi.auth_path, expected.klavi.auth_path);
    assert_eq!(
        parsed.klavi.connect_timeout_ms,
        expected.klavi.connect_timeout_ms
    );
    assert_eq!(
        parsed.klavi.request_timeout_ms,
        expected.klavi.request_timeout_ms
    );
    assert_eq!(
        parsed.klavi.allow_insecure_http,
        expected.klavi.allow_insecure_http
    );
    assert_eq!(parsed.klavi.token_file, expected.klavi.token_file);
    assert_eq!(parsed.klavi.token_file_mode, expected.klavi.token_file_mode);
    assert_eq!(
        parsed.klavi.token_file_format,
        expected.klavi.token_file_format
    );
    assert_eq!(parsed.refresh, expected.refresh);
    assert_eq!(parsed.log, expected.log);
    assert_eq!(parsed.runtime, expected.runtime);
    assert_eq!(parsed.proxy, expected.proxy);
    assert_eq!(parsed.fleet, expected.fleet);
    // And the file as shipped (all commented) is valid and yields defaults.
    let shipped: RawConfig = toml::from_str(text).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(shipped, RawConfig::default());
}

#[test]
fn precedence_defaults_file_env_flags() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let path = dir.path().join("c.toml");
    std::fs::write(
        &path,
        "[server]\nlisten = \"127.0.0.1:1001\"\nops_listen = \"127.0.0.1:2001\"\nshutdown_grace_secs = 3\n[refresh]\nwait_ms = 700\n",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let mut sources = with_keys(&[
        ("KLAVI_SIDECAR_SERVER__LISTEN", "127.0.0.1:1002"),
        ("KLAVI_SIDECAR_SERVER__OPS_LISTEN", "127.0.0.1:2002"),
        ("KLAVI_SIDECAR_REFRESH__WAIT_MS", "800"),
    ]);
    sources.file = Some(path);
    sources.overrides.listen = Some("127.0.0.1:1003".into());
    let config = load(&sources).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        config.server.listen.tcp().unwrap().port(),
        1003,
        "flag beats env"
    );
    assert_eq!(
        config.server.ops_listen.map(|a| a.port()),
        Some(2002),
        "env beats file"
    );
    assert_eq!(
        config.server.shutdown_grace,
        Duration::from_secs(3),
        "file beats default"
    );
    assert_eq!(config.profiles[0].refresh.wait, Duration::from_millis(800));
}

#[test]
fn config_file_from_the_environment() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let path = dir.path().join("c.toml");
    std::fs::write(&path, "[log]\nformat = \"json\"\n").unwrap_or_else(|e| panic!("{e}"));
    let path_text = path.display().to_string();
    let config = load(&with_keys(&[(CONFIG_ENV, &path_text)])).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.log, LogFormat::Json);
}

#[test]
fn secrets_from_env_stay_exact_strings() {
    let sources = env(&[
        ("KLAVI_ACCESS_KEY", "007"),
        ("KLAVI_SIDECAR_KLAVI__SECRET_KEY", "1.50"),
        ("KLAVI_SECRET_KEY", "ignored-below-prefixed"),
    ]);
    let config = load(&sources).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        config.profiles[0].klavi.access_key,
        KeySource::Inline(Secret::new("007"))
    );
    assert_eq!(
        config.profiles[0].klavi.secret_key,
        KeySource::Inline(Secret::new("1.50"))
    );
}

#[test]
fn hostile_environment_values_are_errors_not_panics() {
    // Figment's own parser panics on this one (fuzzing found it).
    let cases = [
        "\"é\\",
        "\"\\u{",
        "[1,2",
        "{a=1}",
        "0x10",
        "1e400",
        "-0",
        "true false",
    ];
    for value in cases {
        let result = load(&with_keys(&[("KLAVI_SIDECAR_REFRESH__WAIT_MS", value)]));
        assert!(result.is_err() || value == "-0", "{value:?}");
    }
    let config = load(&with_keys(&[
        ("KLAVI_SIDECAR_REFRESH__JITTER_RATIO", "0.25"),
        ("KLAVI_SIDECAR_SERVER__REQUIRE_HEADER", "false"),
        ("KLAVI_SIDECAR_REFRESH__WAIT_MS", " 700 "),
    ]))
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.profiles[0].refresh.policy.jitter_ratio, 0.25);
    assert!(!config.server.require_header);
    assert_eq!(config.profiles[0].refresh.wait, Duration::from_millis(700));
}

#[test]
fn allowed_hosts_are_host_names_or_addresses() {
    for (host, normalised) in [
        ("sidecar.internal", Some("sidecar.internal")),
        ("Sidecar.Internal", Some("sidecar.internal")),
        ("a-b.c", Some("a-b.c")),
        ("10.0.0.5", Some("10.0.0.5")),
        ("[fd00:0::1]", Some("[fd00::1]")),
        ("[::ffff:10.0.0.1]", Some("[::ffff:10.0.0.1]")),
        ("-", None),
        ("...", None),
        ("a..b", None),
        ("-a.b", None),
        ("a_b", None),
        ("evil.example.", None),
        ("0.0.0.0", None),
        ("[::]", None),
        ("[fd00::1", None),
        ("host:8089", None),
        ("http://x", None),
        ("", None),
        // Second review: numeric forms browsers read as addresses.
        ("0", None),
        ("2130706433", None),
        ("0x7f000001", None),
        ("127.1", None),
        ("[::ffff:0.0.0.0]", None),
        ("1a.example", Some("1a.example")),
    ] {
        assert_eq!(
            validate::normalised_host(host).as_deref(),
            normalised,
            "{host:?}"
        );
    }
}

#[test]
fn allowed_hosts_from_env_and_file() {
    let config = load(&with_keys(&[(
        "KLAVI_SIDECAR_SERVER__ALLOWED_HOSTS",
        " Sidecar.Internal , [fd00::1],,",
    )]))
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        config.server.allowed_hosts,
        vec!["sidecar.internal".to_string(), "[fd00::1]".to_string()]
    );
    let raw = raw_from(
        Some((
            Path::new("c.toml"),
            "[server]\nallowed_hosts = [\"a.example\"]\n",
        )),
        &with_keys(&[]),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(raw.server.allowed_hosts, vec!["a.example".to_string()]);
    let config = load(&with_keys(&[])).unwrap_or_else(|e| panic!("{e}"));
    assert!(config.server.allowed_hosts.is_empty());
    assert_eq!(config.profiles[0].refresh.policy.max_auth_per_minute, 60);
}

#[test]
fn ipv6_and_empty_ops_listen_from_env() {
    let config = load(&with_keys(&[
        ("KLAVI_SIDECAR_SERVER__LISTEN", "[::1]:8089"),
        ("KLAVI_SIDECAR_SERVER__OPS_LISTEN", ""),
    ]))
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.server.listen.to_string(), "[::1]:8089");
    assert_eq!(config.server.ops_listen, None);
}

#[test]
fn unix_sockets_from_env() {
    let config = load(&with_keys(&[
        (
            "KLAVI_SIDECAR_SERVER__LISTEN",
            " unix:/run/klavi/token.sock ",
        ),
        ("KLAVI_SIDECAR_SERVER__SOCKET_MODE", "600"),
        (
            "KLAVI_SIDECAR_KLAVI__PROXY_LISTEN",
            "unix:/run/klavi/proxy.sock",
        ),
    ]))
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        config.server.listen,
        ListenAddr::Unix("/run/klavi/token.sock".into())
    );
    assert_eq!(
        config.server.listen.to_string(),
        "unix:/run/klavi/token.sock"
    );
    assert_eq!(config.server.socket_mode, 0o600);
    assert_eq!(
        config.profiles[0].proxy_listen,
        Some(ListenAddr::Unix("/run/klavi/proxy.sock".into()))
    );
    let config = load(&with_keys(&[])).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.server.socket_mode, 0o660);
}

#[test]
fn token_files_from_env() {
    let config = load(&with_keys(&[
        ("KLAVI_SIDECAR_KLAVI__TOKEN_FILE", "/var/run/klavi/token"),
        ("KLAVI_SIDECAR_KLAVI__TOKEN_FILE_MODE", "0444"),
        ("KLAVI_SIDECAR_KLAVI__TOKEN_FILE_FORMAT", "json"),
    ]))
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        config.profiles[0].token_file,
        Some(TokenFileConfig {
            path: "/var/run/klavi/token".into(),
            mode: 0o444,
            format: TokenFileFormat::Json,
        })
    );
    // The defaults: no file; with a path, 0640 and raw.
    let config = load(&with_keys(&[])).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.profiles[0].token_file, None);
    let config = load(&with_keys(&[("KLAVI_SIDECAR_KLAVI__TOKEN_FILE", "/t/tok")]))
        .unwrap_or_else(|e| panic!("{e}"));
    let file = config.profiles[0].token_file.clone().unwrap();
    assert_eq!((file.mode, file.format), (0o640, TokenFileFormat::Raw));
}

#[test]
fn key_files() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let ak = dir.path().join("ak");
    let sk = dir.path().join("sk");
    std::fs::write(&ak, "file-access\n").unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(&sk, "file-secret").unwrap_or_else(|e| panic!("{e}"));
    let (ak_text, sk_text) = (ak.display().to_string(), sk.display().to_string());
    let config = load(&env(&[
        ("KLAVI_ACCESS_KEY_FILE", &ak_text),
        ("KLAVI_SECRET_KEY_FILE", &sk_text),
    ]))
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        config.profiles[0].klavi.access_key,
        KeySource::File(ak.clone())
    );
    assert_eq!(read_key_file(&ak), Ok(Secret::new("file-access")));
    assert_eq!(read_key_file(&sk), Ok(Secret::new("file-secret")));
}

#[test]
fn bad_configurations_name_the_key() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let empty = dir.path().join("empty");
    std::fs::write(&empty, "\n").unwrap_or_else(|e| panic!("{e}"));
    let empty = empty.display().to_string();
    let missing = dir.path().join("missing").display().to_string();
    let cases: Vec<(Sources, &str, &str)> = vec![
        (
            env(&[("KLAVI_SECRET_KEY", "s")]),
            "klavi.access_key",
            "required",
        ),
        (
            env(&[("KLAVI_ACCESS_KEY", "a")]),
            "klavi.secret_key",
            "required",
        ),
        (
            with_keys(&[("KLAVI_ACCESS_KEY_FILE", &empty)]),
            "klavi.access_key",
            "not both",
        ),
        (
            env(&[("KLAVI_ACCESS_KEY_FILE", &empty), ("KLAVI_SECRET_KEY", "s")]),
            "klavi.access_key_file",
            "is empty",
        ),
        (
            env(&[
                ("KLAVI_ACCESS_KEY_FILE", &missing),
                ("KLAVI_SECRET_KEY", "s"),
            ]),
            "klavi.access_key_file",
            "cannot read",
        ),
        (
            env(&[("KLAVI_ACCESS_KEY", " "), ("KLAVI_SECRET_KEY", "s")]),
            "klavi.access_key",
            "empty",
        ),
        (
            with_keys(&[("KLAVI_SIDECAR_SERVER__LISTEN", "0.0.0.0:8089")]),
            "server.listen",
            "loopback",
        ),
        (
            with_keys(&[("KLAVI_SIDECAR_SERVER__LISTEN", "localhost:8089")]),
            "server.listen",
            "IP:port",
        ),
        (
            with_keys(&[("KLAVI_SIDECAR_SERVER__OPS_LISTEN", "nope")]),
            "server.ops_listen",
            "IP:port",
        ),
        (
            with_keys(&[("KLAVI_SIDECAR_SERVER__OPS_LISTEN", "0.0.0.0:8089")]),
            "server.ops_listen",
            "clashes",
        ),
        (
            with_keys(&[("KLAVI_SIDECAR_SERVER__SHUTDOWN_GRACE_SECS", "soon")]),
            "server.shutdown_grace_secs",
            "KLAVI_SIDECAR_SERVER__SHUTDOWN_GRACE_SECS",
        ),
        (
            with_keys(&[("KLAVI_SIDECAR_SERVER__LISTNE", "x")]),
            "server.listne",
            "unknown field",
        ),
        (
            with_keys(&[("KLAVI_SIDECAR_KLAVI__BASE_URL", "http://api.klavi.ai")]),
            "klavi.base_url",
            "loopback",
        ),
        (
            with_keys(&[("KLAVI_SIDECAR_KLAVI__BASE_URL", "ftp://x")]),
            "klavi.base_url",
            "scheme",
        ),
        (
            with_keys(&[("KLAVI_SIDECAR_KLAVI__BASE_URL", "not a url")]),
            "klavi.base_url",
            "not a URL",
        ),
        (
            with_keys(&[("KLAVI_SIDECAR_KLAVI__BASE_URL", "https://u:p@api.klavi.ai")]),
            "klavi.base_url",
            "credentials",
        ),
        (
            with_keys(&[("KLAVI_SIDECAR_KLAVI__AUTH_PATH", "auth")]),
            "klavi.auth_path",
            "start with /",
        ),
        (
            with_keys(&[("KLAVI_SIDECAR_KLAVI__REQUEST_TIMEOUT_MS", "0")]),
            "klavi.request_timeout_ms",
            "between 100 and 600000",
        ),
        (
            with_keys(&[("KLAVI_SIDECAR_REFRESH__JITTER_RATIO", "0.9")]),
            "refresh.jitter_ratio",
            "between",
        ),
        (
            with_keys(&[("KLAVI_SIDECAR_REFRESH__BACKOFF_MAX_SECS", "0")]),
            "refresh.backoff_max_secs",
            "out of range",
        ),
        (
            with_keys(&[("KLAVI_SIDECAR_REFRESH__FALLBACK_TTL_SECS", "10")]),
            "refresh.fallback_ttl_secs",
            "twice",
        ),
        (
            with_keys(&[("KLAVI_SIDECAR_REFRESH__WAIT_MS", "-1")]),
            "refresh.wait_ms",
            "KLAVI_SIDECAR_REFRESH__WAIT_MS",
        ),
        (
            with_keys(&[("KLAVI_SIDECAR_REFRESH__MIN_INTERVAL_SECS", "999999")]),
            "refresh.min_interval_secs",
            "between 1 and 3600",
        ),
        (
            with_keys(&[("KLAVI_SIDECAR_LOG__FORMAT", "xml")]),
            "log.format",
            "not one of",
        ),
        (
            with_keys(&[("KLAVI_SIDECAR_SERVER__MAX_HEADER_BYTES", "10")]),
            "server.max_header_bytes",
            "between",
        ),
        (
            with_keys(&[("KLAVI_SIDECAR_RUNTIME__WORKER_THREADS", "1000")]),
            "runtime.worker_threads",
            "between",
        ),
        (
            with_keys(&[("KLAVI_SIDECAR_SERVER__MAX_CONNECTIONS", "0")]),
            "server.max_connections",
            "between",
        ),
        (
            with_keys(&[("KLAVI_SIDECAR_SERVER__HEADER_READ_TIMEOUT_MS", "0")]),
            "server.header_read_timeout_ms",
            "out of range",
        ),
        (
            with_keys(&[("KLAVI_SIDECAR_SERVER__REQUEST_TIMEOUT_MS", "5000")]),
            "server.request_timeout_ms",
            "refresh.wait_ms",
        ),
        // The values that broke v1: a zero that spins or cannot wait.
        (
            with_keys(&[("KLAVI_SIDECAR_REFRESH__MIN_INTERVAL_SECS", "0")]),
            "refresh.min_interval_secs",
            "between 1 and 3600",
        ),
        (
            with_keys(&[("KLAVI_SIDECAR_REFRESH__WAIT_MS", "0")]),
            "refresh.wait_ms",
            "between 100 and 300000",
        ),
        (
            with_keys(&[("KLAVI_SIDECAR_REFRESH__BACKOFF_INITIAL_MS", "0")]),
            "refresh.backoff_initial_ms",
            "between 100 and 60000",
        ),
        (
            with_keys(&[("KLAVI_SIDECAR_REFRESH__MAX_AUTH_PER_MINUTE", "0")]),
            "refresh.max_auth_per_minute",
            "between 1 and 600",
        ),
        (
            with_keys(&[
                ("KLAVI_SIDECAR_SERVER__SHUTDOWN_GRACE_SECS", "3"),
                ("KLAVI_SIDECAR_REFRESH__WAIT_MS", "5000"),
            ]),
            "server.shutdown_grace_secs",
            "refresh.wait_ms",
        ),
        (
            with_keys(&[("KLAVI_SIDECAR_REFRESH__SERVE_MARGIN_SECS", "60")]),
            "refresh.serve_margin_secs",
            "refresh_before_secs",
        ),
        (
            with_keys(&[(
                "KLAVI_SIDECAR_SERVER__ALLOWED_HOSTS",
                "ok.example,http://evil",
            )]),
            "server.allowed_hosts",
            "not a host name",
        ),
        (
            with_keys(&[("KLAVI_SIDECAR_SERVER__LISTEN", "unix:token.sock")]),
            "server.listen",
            "absolute path",
        ),
        (
            with_keys(&[("KLAVI_SIDECAR_SERVER__OPS_LISTEN", "unix:/run/k/ops.sock")]),
            "server.ops_listen",
            "cannot be a unix socket",
        ),
        (
            with_keys(&[("KLAVI_SIDECAR_SERVER__SOCKET_MODE", "rw-rw----")]),
            "server.socket_mode",
            "octal permission mode",
        ),
        (
            with_keys(&[("KLAVI_SIDECAR_SERVER__ALLOWED_HOSTS", "host:8089")]),
            "server.allowed_hosts",
            "no scheme, port",
        ),
        (
            Sources {
                file: Some(missing.clone().into()),
                ..with_keys(&[])
            },
            "--config",
            "cannot read",
        ),
    ];
    for (sources, key, needle) in cases {
        let error = error_of(&sources);
        assert_eq!(error.key, key, "{error}");
        assert!(
            error.message.contains(needle),
            "{error} should mention {needle:?}"
        );
        assert!(!error.to_string().contains('\n'), "one line: {error}");
    }
}

#[test]
fn malformed_toml_is_one_line_naming_the_file() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, "[server\nlisten = 1\n").unwrap_or_else(|e| panic!("{e}"));
    let error = error_of(&Sources {
        file: Some(path.clone()),
        ..with_keys(&[])
    });
    assert_eq!(error.key, "--config");
    assert!(error.message.contains("bad.toml"), "{error}");
    assert!(!error.to_string().contains('\n'));

    std::fs::write(&path, "[server]\nlisten = 8089\n").unwrap_or_else(|e| panic!("{e}"));
    let error = error_of(&Sources {
        file: Some(path),
        ..with_keys(&[])
    });
    assert_eq!(error.key, "server.listen");
    assert!(error.message.contains("bad.toml"), "{error}");
}

#[test]
fn a_mistyped_secret_is_not_quoted_in_the_error() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let path = dir.path().join("c.toml");
    std::fs::write(&path, "[klavi]\nsecret_key = 987654321\n").unwrap_or_else(|e| panic!("{e}"));
    let error = error_of(&Sources {
        file: Some(path),
        ..env(&[("KLAVI_ACCESS_KEY", "a")])
    });
    assert_eq!(error.key, "klavi.secret_key");
    assert!(!error.to_string().contains("987654321"), "{error}");
}

#[test]
fn redacted_toml_hides_secrets() {
    let config = load(&env(&[
        ("KLAVI_ACCESS_KEY", "ak-visible?"),
        ("KLAVI_SECRET_KEY", "sk-visible?"),
    ]))
    .unwrap_or_else(|e| panic!("{e}"));
    let text = config.to_redacted_toml();
    assert!(!text.contains("visible"), "{text}");
    assert!(text.contains("access_key = \"[REDACTED]\""), "{text}");
    assert!(!format!("{config:?}").contains("visible"));
}

#[test]
fn probe_address_table() {
    let raw = |listen: &str, ops: &str| RawConfig {
        server: RawServer {
            listen: listen.into(),
            ops_listen: ops.into(),
            ..RawServer::default()
        },
        ..RawConfig::default()
    };
    let cases = [
        (
            raw("127.0.0.1:8089", "0.0.0.0:8090"),
            Some("127.0.0.1:8090"),
        ),
        (raw("127.0.0.1:8089", "[::]:8090"), Some("[::1]:8090")),
        (
            raw("127.0.0.1:8089", "10.0.0.5:9000"),
            Some("10.0.0.5:9000"),
        ),
        (raw("127.0.0.1:8089", ""), Some("127.0.0.1:8089")),
        (raw("127.0.0.1:8089", "bad"), None),
        (
            raw("unix:/run/klavi/token.sock", ""),
            Some("unix:/run/klavi/token.sock"),
        ),
    ];
    for (raw, expected) in cases {
        assert_eq!(
            probe_address(&raw).map(|a| a.to_string()).as_deref(),
            expected
        );
    }
}
