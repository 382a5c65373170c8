//! Profiles in the configuration: inheritance, names, environment keys,
//! errors naming the full key, `check-config` output.

use std::time::Duration;

use super::*;

fn sources(toml: &str, env: &[(&str, &str)]) -> (tempfile::TempDir, Sources) {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let path = dir.path().join("sidecar.toml");
    std::fs::write(&path, toml).unwrap_or_else(|e| panic!("{e}"));
    let sources = Sources {
        file: Some(path),
        env: env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..Sources::default()
    };
    (dir, sources)
}

fn loaded(toml: &str, env: &[(&str, &str)]) -> Config {
    let (_dir, sources) = sources(toml, env);
    load(&sources).unwrap_or_else(|e| panic!("{e}"))
}

fn error(toml: &str, env: &[(&str, &str)]) -> ConfigError {
    let (_dir, sources) = sources(toml, env);
    match load(&sources) {
        Err(e) => e,
        Ok(config) => panic!("expected an error, got {:?}", config.profiles),
    }
}

const TWO: &str = r#"
[klavi]
base_url = "https://api.klavi.ai"
access_key = "product-ak"
secret_key = "product-sk"
request_timeout_ms = 4000

[refresh]
wait_ms = 2000

[profiles.mgmt]
access_key = "mgmt-ak"
secret_key = "mgmt-sk"
auth_path = "/management/v1/auth"
required = false

[profiles.mgmt.refresh]
max_auth_per_minute = 10
"#;

#[test]
fn two_profiles_inherit_the_non_secret_keys_and_refresh() {
    let config = loaded(TWO, &[]);
    let names: Vec<&str> = config.profiles.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["default", "mgmt"], "default first");
    let product = config.profile("default").unwrap_or_else(|| panic!());
    let mgmt = config.profile("mgmt").unwrap_or_else(|| panic!());
    assert_eq!(
        product.klavi.auth_url.as_str(),
        "https://api.klavi.ai/payment/customer/v1/auth"
    );
    assert_eq!(
        mgmt.klavi.auth_url.as_str(),
        "https://api.klavi.ai/management/v1/auth",
        "base_url inherited, auth_path its own"
    );
    assert_eq!(mgmt.klavi.request_timeout, Duration::from_millis(4000));
    assert_eq!(
        mgmt.refresh.wait,
        Duration::from_millis(2000),
        "[refresh] inherited"
    );
    assert_eq!(mgmt.refresh.policy.max_auth_per_minute, 10);
    assert_eq!(product.refresh.policy.max_auth_per_minute, 60);
    assert_eq!(
        mgmt.klavi.access_key,
        KeySource::Inline(Secret::new("mgmt-ak"))
    );
    assert!(product.required && !mgmt.required);
}

#[test]
fn keys_are_never_inherited() {
    let toml = "[klavi]\naccess_key = \"a\"\nsecret_key = \"s\"\n[profiles.other]\nbase_url = \"https://api.klavi.ai\"\n";
    let e = error(toml, &[]);
    assert_eq!(e.key, "profiles.other.access_key");
    assert!(e.message.contains("required"), "{e}");
    let toml = "[profiles.other]\naccess_key = \"a\"\n";
    assert_eq!(error(toml, &[]).key, "profiles.other.secret_key");
}

#[test]
fn without_keys_in_klavi_there_is_no_default_profile() {
    let toml = "[profiles.merchant_1]\naccess_key = \"a\"\nsecret_key = \"s\"\n";
    let config = loaded(toml, &[]);
    let names: Vec<&str> = config.profiles.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["merchant_1"]);
    assert!(config.profile(DEFAULT_PROFILE).is_none());
    // Half a key pair in [klavi] is an error, not "no default profile".
    let toml =
        "[klavi]\nsecret_key = \"s\"\n[profiles.a]\naccess_key = \"a\"\nsecret_key = \"s\"\n";
    assert_eq!(error(toml, &[]).key, "klavi.access_key");
    // And with no profiles at all, [klavi]'s keys are required.
    assert_eq!(error("", &[]).key, "klavi.access_key");
}

#[test]
fn profiles_from_the_environment() {
    let config = loaded(
        "",
        &[
            ("KLAVI_SIDECAR_PROFILES__MGMT__ACCESS_KEY", "007"),
            ("KLAVI_SIDECAR_PROFILES__MGMT__SECRET_KEY", "s"),
            ("KLAVI_SIDECAR_PROFILES__MGMT__REQUIRED", "false"),
            ("KLAVI_SIDECAR_PROFILES__MGMT__REFRESH__WAIT_MS", "700"),
            ("KLAVI_SIDECAR_PROFILES__MGMT__CONNECT_TIMEOUT_MS", " 900 "),
        ],
    );
    let mgmt = config.profile("mgmt").unwrap_or_else(|| panic!());
    assert_eq!(mgmt.klavi.access_key, KeySource::Inline(Secret::new("007")));
    assert!(!mgmt.required);
    assert_eq!(mgmt.refresh.wait, Duration::from_millis(700));
    assert_eq!(mgmt.klavi.connect_timeout, Duration::from_millis(900));
    // The environment overrides the file, key by key.
    let config = loaded(
        TWO,
        &[(
            "KLAVI_SIDECAR_PROFILES__MGMT__REFRESH__MAX_AUTH_PER_MINUTE",
            "12",
        )],
    );
    let mgmt = config.profile("mgmt").unwrap_or_else(|| panic!());
    assert_eq!(mgmt.refresh.policy.max_auth_per_minute, 12);
    assert_eq!(
        mgmt.klavi.access_key,
        KeySource::Inline(Secret::new("mgmt-ak"))
    );
}

#[test]
fn bad_profiles_are_one_line_naming_the_full_key() {
    let keys = "access_key = \"a\"\nsecret_key = \"s\"\n";
    let cases: Vec<(String, &str, &str)> = vec![
        (
            format!("[profiles.Mgmt]\n{keys}"),
            "profiles.Mgmt",
            "not a valid profile name",
        ),
        (
            format!("[profiles.1st]\n{keys}"),
            "profiles.1st",
            "starting with a letter",
        ),
        (
            format!("[profiles.a-b]\n{keys}"),
            "profiles.a-b",
            "a-z, 0-9 and _",
        ),
        (
            format!("[profiles.{}]\n{keys}", "a".repeat(33)),
            "profiles.aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
            "1 to 32",
        ),
        (
            format!("[profiles.default]\n{keys}"),
            "profiles.default",
            "reserved",
        ),
        // Names the environment could not spell (second review).
        (
            format!("[profiles.a__b]\n{keys}"),
            "profiles.a__b",
            "without __",
        ),
        (
            format!("[profiles.ab_]\n{keys}"),
            "profiles.ab_",
            "trailing _",
        ),
        // An unknown key ending like a secret is reported as unknown.
        (
            format!("[profiles.mgmt]\n{keys}[profiles.mgmt.refresh]\nsecret_key = \"x\"\n"),
            "profiles.mgmt.refresh.secret_key",
            "unknown field",
        ),
        // check-config's placeholder is no key.
        (
            "[profiles.mgmt]\naccess_key = \"[REDACTED]\"\nsecret_key = \"s\"\n".into(),
            "profiles.mgmt.access_key",
            "placeholder",
        ),
        (
            format!("[profiles.mgmt]\n{keys}typo = 1\n"),
            "profiles.mgmt.typo",
            "unknown field",
        ),
        (
            format!("[profiles.mgmt]\n{keys}[profiles.mgmt.refresh]\nwait = 1\n"),
            "profiles.mgmt.refresh.wait",
            "unknown field",
        ),
        (
            "[profiles.mgmt]\naccess_key = \"a\"\nsecret_key_file = \"/nonexistent/sk\"\n".into(),
            "profiles.mgmt.secret_key_file",
            "cannot read",
        ),
        (
            format!("[profiles.mgmt]\n{keys}secret_key_file = \"/x\"\n"),
            "profiles.mgmt.secret_key",
            "not both",
        ),
        (
            format!("[profiles.mgmt]\n{keys}base_url = \"http://api.klavi.ai\"\n"),
            "profiles.mgmt.base_url",
            "profiles.mgmt.allow_insecure_http",
        ),
        (
            format!("[profiles.mgmt]\n{keys}[profiles.mgmt.refresh]\nwait_ms = 0\n"),
            "profiles.mgmt.refresh.wait_ms",
            "between 100 and 300000",
        ),
        (
            format!("[profiles.mgmt]\n{keys}[profiles.mgmt.refresh]\nserve_margin_secs = 90\n"),
            "profiles.mgmt.refresh.serve_margin_secs",
            "refresh_before_secs",
        ),
        (
            format!("[profiles.mgmt]\n{keys}[profiles.mgmt.refresh]\nwait_ms = 20000\n"),
            "server.request_timeout_ms",
            "profiles.mgmt.refresh.wait_ms",
        ),
        (
            "[profiles.mgmt]\naccess_key = \"a\"\nsecret_key = 5\n".into(),
            "profiles.mgmt.secret_key",
            "not shown",
        ),
        (
            format!(
                "[profiles.a]\n{keys}token_file = \"/t/tok\"\n[profiles.b]\n{keys}token_file = \"/t/tok\"\n"
            ),
            "profiles.b.token_file",
            "cannot share",
        ),
        (
            format!(
                "[profiles.a]\n{keys}proxy_listen = \"127.0.0.1:9\"\n[profiles.b]\n{keys}proxy_listen = \"127.0.0.1:9\"\n"
            ),
            "profiles.b.proxy_listen",
            "clashes with profiles.a.proxy_listen",
        ),
        (
            format!("[profiles.a]\n{keys}proxy_listen = \"127.0.0.1:8089\"\n"),
            "profiles.a.proxy_listen",
            "clashes with server.listen",
        ),
        (
            format!("[profiles.a]\n{keys}proxy_listen = \"127.0.0.1:8090\"\n"),
            "profiles.a.proxy_listen",
            "clashes with server.ops_listen",
        ),
        (
            format!("[profiles.a]\n{keys}proxy_listen = \"10.0.0.5:8091\"\n"),
            "profiles.a.proxy_listen",
            "not a loopback address",
        ),
        (
            format!("[profiles.a]\n{keys}proxy_listen = \"0.0.0.0:8091\"\n"),
            "profiles.a.proxy_listen",
            "not a loopback address",
        ),
        (
            format!("[profiles.a]\n{keys}proxy_listen = \"localhost:8091\"\n"),
            "profiles.a.proxy_listen",
            "not an IP:port address",
        ),
        (
            format!("[profiles.a]\n{keys}proxy_listen = \"unix:run/k.sock\"\n"),
            "profiles.a.proxy_listen",
            "absolute path",
        ),
        (
            format!(
                "[profiles.a]\n{keys}proxy_listen = \"unix:/dddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddd/k.sock\"\n"
            ),
            "profiles.a.proxy_listen",
            "too long",
        ),
        (
            format!(
                "[server]\nlisten = \"unix:/run/k/t.sock\"\n[profiles.a]\n{keys}proxy_listen = \"unix:/run/k/t.sock\"\n"
            ),
            "profiles.a.proxy_listen",
            "clashes with server.listen",
        ),
        (
            format!(
                "[profiles.a]\n{keys}proxy_listen = \"unix:/run/k/p.sock\"\n[profiles.b]\n{keys}proxy_listen = \"unix:/run/k/p.sock\"\n"
            ),
            "profiles.b.proxy_listen",
            "clashes with profiles.a.proxy_listen",
        ),
        (
            format!(
                "[server]\nlisten = \"unix:/run/k/t.sock\"\n[profiles.a]\n{keys}token_file = \"/run/k/t.sock\"\n"
            ),
            "profiles.a.token_file",
            "is the socket of server.listen",
        ),
        (
            format!(
                "[profiles.a]\n{keys}proxy_listen = \"unix:/run/k/p.sock\"\n[profiles.b]\n{keys}token_file = \"/run/k/p.sock\"\n"
            ),
            "profiles.b.token_file",
            "is the socket of profiles.a.proxy_listen",
        ),
        (
            "[profiles.a]\naccess_key = \"a\"\nsecret_key_file = \"/etc/hostname\"\ntoken_file = \"/etc/hostname\"\n".into(),
            "profiles.a.token_file",
            "is profiles.a.secret_key_file",
        ),
        (
            format!("[server]\nsocket_mode = \"0440\"\n[profiles.a]\n{keys}"),
            "server.socket_mode",
            "owner's write bit",
        ),
        (
            format!("[profiles.a]\n{keys}token_file = \"tok\"\n"),
            "profiles.a.token_file",
            "absolute path",
        ),
        (
            format!("[profiles.a]\n{keys}token_file = \"/t/tok\"\ntoken_file_mode = \"0648\"\n"),
            "profiles.a.token_file_mode",
            "octal permission mode",
        ),
        (
            format!("[profiles.a]\n{keys}token_file = \"/t/tok\"\ntoken_file_mode = \"4640\"\n"),
            "profiles.a.token_file_mode",
            "0000 to 0777",
        ),
        (
            format!("[profiles.a]\n{keys}token_file = \"/t/tok\"\ntoken_file_format = \"yaml\"\n"),
            "profiles.a.token_file_format",
            "\"raw\", \"json\"",
        ),
        (
            format!(
                "[proxy]\nrequest_timeout_ms = 5000\n[profiles.a]\n{keys}proxy_listen = \"127.0.0.1:8091\"\n"
            ),
            "proxy.request_timeout_ms",
            "profiles.a.refresh.wait_ms",
        ),
        (
            format!("[proxy]\nmax_body_bytes = 16777217\n[profiles.a]\n{keys}"),
            "proxy.max_body_bytes",
            "out of range",
        ),
        (
            format!("[profiles.pay]\n{keys}mode = \"single-use\"\n"),
            "profiles.pay.mode",
            "\"shared\", \"single_use\"",
        ),
        (
            format!("[profiles.pay]\n{keys}mode = \"single_use\"\ntoken_file = \"/t/tok\"\n"),
            "profiles.pay.token_file",
            "single_use profile cannot have a token file",
        ),
        (
            format!("[profiles.pay]\n{keys}mode = \"single_use\"\nfleet = true\n"),
            "profiles.pay.fleet",
            "cannot be in the fleet",
        ),
        (
            format!("[profiles.pay]\n{keys}mode = \"single_use\"\npool_size = 101\n"),
            "profiles.pay.pool_size",
            "between 0 and 100",
        ),
    ];
    for (toml, key, needle) in cases {
        let e = error(&toml, &[]);
        assert_eq!(e.key, key, "{toml}: {e}");
        assert!(e.message.contains(needle), "{e} should mention {needle:?}");
        assert!(!e.to_string().contains('\n'), "one line: {e}");
        assert!(!e.to_string().contains("\"s\""), "no secret: {e}");
    }
}

/// Second review: an invalid [klavi] base_url inherited by a profile was
/// blamed on the profile; and an unparsable URL was echoed, password and
/// all.
#[test]
fn an_inherited_error_names_the_key_written_and_no_url_is_echoed() {
    let toml = "[klavi]\nbase_url = \"http://example.com\"\n[profiles.mgmt]\naccess_key = \"a\"\nsecret_key = \"s\"\n";
    let e = error(toml, &[]);
    assert_eq!(e.key, "klavi.base_url", "{e}");
    let toml = "[klavi]\naccess_key = \"a\"\nsecret_key = \"s\"\nbase_url = \"https://user:SECRETPW@[bad\"\n";
    let e = error(toml, &[]);
    assert_eq!(e.key, "klavi.base_url");
    assert!(!e.to_string().contains("SECRETPW"), "{e}");
}

#[test]
fn check_config_prints_every_profile_in_full_and_redacted() {
    let config = loaded(TWO, &[]);
    let text = config.to_redacted_toml();
    let parsed: toml::Table = toml::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
    let mgmt = &parsed["profiles"]["mgmt"];
    // What it inherits is spelled out.
    assert_eq!(mgmt["base_url"].as_str(), Some("https://api.klavi.ai"));
    assert_eq!(mgmt["request_timeout_ms"].as_integer(), Some(4000));
    assert_eq!(mgmt["refresh"]["wait_ms"].as_integer(), Some(2000));
    assert_eq!(
        mgmt["refresh"]["max_auth_per_minute"].as_integer(),
        Some(10)
    );
    assert_eq!(mgmt["access_key"].as_str(), Some("[REDACTED]"));
    for secret in ["product-ak", "product-sk", "mgmt-ak", "mgmt-sk"] {
        assert!(!text.contains(secret), "{secret} in {text}");
    }
    // And the printed configuration loads back to the same profiles.
    let again = loaded(&text.replace("\"[REDACTED]\"", "\"x\""), &[]);
    assert_eq!(again.profiles.len(), 2);
    assert_eq!(
        again.profile("mgmt").map(|p| &p.refresh),
        config.profile("mgmt").map(|p| &p.refresh)
    );
}

#[test]
fn modes_pool_sizes_and_fleet_defaults() {
    let toml = "[klavi]\naccess_key = \"a\"\nsecret_key = \"s\"\n\
                [profiles.pay]\naccess_key = \"b\"\nsecret_key = \"t\"\nmode = \"single_use\"\n\
                [profiles.batch]\naccess_key = \"c\"\nsecret_key = \"u\"\nmode = \"single_use\"\n\
                pool_size = 0\nfleet = false\n\
                [profiles.solo]\naccess_key = \"d\"\nsecret_key = \"v\"\nfleet = false\n";
    let config = loaded(toml, &[("KLAVI_SIDECAR_PROFILES__BATCH__POOL_SIZE", "7")]);
    let get = |name: &str| config.profile(name).unwrap_or_else(|| panic!("{name}"));
    assert_eq!(get("default").mode, TokenMode::Shared);
    assert!(
        get("default").fleet,
        "a shared profile is in the fleet by default"
    );
    assert_eq!(get("pay").mode, TokenMode::SingleUse { pool_size: 2 });
    assert!(!get("pay").fleet, "a single_use profile never is");
    assert_eq!(get("batch").mode, TokenMode::SingleUse { pool_size: 7 });
    assert!(!get("solo").fleet);
    // Not inherited: [klavi]'s mode does not make the others single_use.
    let toml = "[klavi]\naccess_key = \"a\"\nsecret_key = \"s\"\nmode = \"single_use\"\n\
                [profiles.other]\naccess_key = \"b\"\nsecret_key = \"t\"\n";
    let config = loaded(toml, &[]);
    assert_eq!(
        config.profile("default").map(|p| p.mode),
        Some(TokenMode::SingleUse { pool_size: 2 })
    );
    assert_eq!(
        config.profile("other").map(|p| p.mode),
        Some(TokenMode::Shared)
    );
    let text = config.to_redacted_toml();
    assert!(text.contains("mode = \"shared\""), "{text}");
}

#[test]
fn shared_profiles_of_one_key_pair_are_reported_for_a_warning() {
    let toml = "[klavi]\naccess_key = \"a\"\nsecret_key = \"s\"\n\
                [profiles.twin]\naccess_key = \"a\"\nsecret_key = \"s\"\n\
                [profiles.other]\naccess_key = \"b\"\nsecret_key = \"s\"\n\
                [profiles.pay]\naccess_key = \"a\"\nsecret_key = \"s\"\nmode = \"single_use\"\n\
                [profiles.elsewhere]\naccess_key = \"a\"\nsecret_key = \"s\"\n\
                base_url = \"https://api.klavi.ai\"\n";
    let config = loaded(toml, &[]);
    assert_eq!(config.shared_key_pair_twins(), vec![("twin", "default")]);
}
