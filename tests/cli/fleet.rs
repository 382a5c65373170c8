//! Fleet mode (SPEC §8) against the binary and a real `redis-server` on a
//! free loopback port: one fetch for many sidecars, adoption by
//! generation, nothing readable in Redis, rejections through the fleet,
//! Redis lost and back under load, a lock holder killed mid-fetch, the lock
//! renewed, and the fleet's requests counted while Klavi fails.

use klavi_sidecar_testkit::redis::RedisServer;
use klavi_token_sidecar::fake_klavi::{FakeKlavi, FakeKlaviConfig, Outcome};

use super::sidecar::Sidecar;
use super::*;

const ACCESS: &str = "demo-access-key";
const SECRET: &str = "demo-secret-key";

async fn fake(ttl: u64) -> FakeKlavi {
    klavi_token_sidecar::upstream::klavi::install_crypto_provider();
    FakeKlavi::start_local(FakeKlaviConfig::lasting(ttl))
        .await
        .unwrap()
}

/// A Redis for the test `who` (or `None`: skipped, see the harness), its
/// URL, and a fake Klavi of `ttl`-second tokens.
async fn start(who: &str, ttl: u64) -> Option<(RedisServer, String, FakeKlavi)> {
    let redis = RedisServer::start(who)?;
    let url = redis.url();
    Some((redis, url, fake(ttl).await))
}

/// The environment of a fleet sidecar on `redis`, plus `more`.
fn fleet_env<'a>(redis: &'a str, more: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    let mut env = vec![
        ("KLAVI_SIDECAR_FLEET__REDIS_URL", redis),
        ("KLAVI_SIDECAR_FLEET__KEY_PREFIX", "fleet-test"),
    ];
    env.extend_from_slice(more);
    env
}

/// Short tokens: refresh 2 s before expiry, serve until 1 s before.
const SHORT: [(&str, &str); 2] = [
    ("KLAVI_SIDECAR_REFRESH__REFRESH_BEFORE_SECS", "2"),
    ("KLAVI_SIDECAR_REFRESH__SERVE_MARGIN_SECS", "1"),
];

fn connection(server: &RedisServer) -> redis::Connection {
    redis::Client::open(server.url())
        .unwrap()
        .get_connection()
        .unwrap()
}

/// Every key and every value in Redis, as bytes.
fn everything_in(server: &RedisServer) -> Vec<(String, Vec<Vec<u8>>)> {
    let mut con = connection(server);
    let keys: Vec<String> = redis::cmd("KEYS").arg("*").query(&mut con).unwrap();
    keys.into_iter()
        .filter_map(|key| {
            let kind: String = redis::cmd("TYPE").arg(&key).query(&mut con).unwrap();
            let values: Vec<Vec<u8>> = match kind.as_str() {
                "hash" => redis::cmd("HGETALL").arg(&key).query(&mut con).unwrap(),
                "string" => vec![redis::cmd("GET").arg(&key).query(&mut con).unwrap()],
                // Gone since KEYS (the lock, released meanwhile).
                "none" => return None,
                other => panic!("{key} is a {other}"),
            };
            Some((key, values))
        })
        .collect()
}

fn stored_generation(server: &RedisServer) -> u64 {
    let mut con = connection(server);
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("fleet-test:*:token")
        .query(&mut con)
        .unwrap();
    assert_eq!(keys.len(), 1, "{keys:?}");
    redis::cmd("HGET")
        .arg(&keys[0])
        .arg("gen")
        .query(&mut con)
        .unwrap()
}

/// Reports `token` rejected to `sidecar`, as an app that got a 401.
async fn reject(sidecar: &Sidecar, token: &str) -> (u16, serde_json::Value) {
    let body = format!(r#"{{"rejectedToken":"{token}"}}"#);
    sidecar.call(true, "/token/refresh", Some(body)).await
}

/// The lock's name, once a sidecar has taken it (within 5 s).
async fn lock_taken(con: &mut redis::Connection) -> String {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg("fleet-test:*:lock")
            .query(con)
            .unwrap();
        if let Some(lock) = keys.into_iter().next() {
            return lock;
        }
        assert!(Instant::now() < deadline, "the lock was never taken");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn eventually<F, Fut>(what: &str, limit: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while !check().await {
        assert!(Instant::now() < deadline, "not within {limit:?}: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecars_of_one_account_fetch_once_per_lifetime_and_redis_reads_nothing() {
    let Some((redis, url, fake)) = start("fleet: one fetch per lifetime", 6).await else {
        return;
    };
    // Three sidecars started at once: one fetch between them.
    let env = fleet_env(&url, &SHORT);
    let fleet: Vec<Sidecar> = (0..3).map(|_| Sidecar::spawn(&fake, &env)).collect();
    for sidecar in &fleet {
        sidecar.wait_ready().await;
    }
    assert_eq!(
        fake.calls(),
        1,
        "a cold start of three sidecars fetches once"
    );
    let first = fleet[0].token().await;
    for sidecar in &fleet[1..] {
        assert_eq!(sidecar.token().await, first);
    }
    assert_eq!(stored_generation(&redis), 1);

    // Three lifetimes of 6 s (each refreshed after about 3.4–4 s): about
    // four fetches for the fleet, where three standalone sidecars make
    // about twelve.
    let started = Instant::now();
    let mut seen = std::collections::BTreeSet::from([first.clone()]);
    while started.elapsed() < Duration::from_secs(12) {
        for sidecar in &fleet {
            let (status, body) = sidecar.call(false, "/token", None).await;
            assert_eq!(status, 200, "{body}");
            assert!(body["expiresIn"].as_u64().unwrap() >= 1, "{body}");
            seen.insert(body["accessToken"].as_str().unwrap().to_string());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let calls = fake.calls();
    assert!(
        (3..=5).contains(&calls),
        "{calls} fetches in 12 s for the fleet"
    );
    assert_eq!(
        stored_generation(&redis),
        calls,
        "one generation per fetch, none skipped or repeated"
    );
    // Every token served came from a fetch (the last one may not have
    // been asked for yet).
    let served = seen.len() as u64;
    assert!(
        served == calls || served + 1 == calls,
        "{served} tokens served, {calls} fetched"
    );
    let mut adopted = 0.0;
    for sidecar in &fleet {
        adopted += sidecar
            .metric("klavi_sidecar_fleet_tokens_adopted_total{profile=\"default\"}")
            .await;
        assert_eq!(sidecar.metric("klavi_sidecar_fleet_redis_up").await, 1.0);
    }
    // Each token is fetched by one sidecar and adopted by the two others
    // (the last one perhaps not yet by all).
    assert!(
        adopted >= 2.0 * (calls as f64 - 1.0),
        "{adopted} adoptions for {calls} fetches"
    );

    // What Redis holds: names under the prefix and a hash, and values
    // that show neither a token nor a key.
    let contents = everything_in(&redis);
    assert_eq!(
        contents.len(),
        2,
        "the record and the counter (the lock is gone): {contents:?}"
    );
    for (key, values) in &contents {
        assert!(key.starts_with("fleet-test:{"), "{key}");
        for needle in seen
            .iter()
            .map(String::as_str)
            .chain([ACCESS, SECRET, "eyJ"])
        {
            assert!(!key.contains(needle), "{key}");
            for value in values {
                let text = String::from_utf8_lossy(value);
                let part = &needle[..needle.len().min(24)];
                assert!(!text.contains(part), "{key} holds {part}");
            }
        }
    }
    for sidecar in fleet {
        sidecar.stop();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_rejected_on_one_sidecar_is_dropped_by_all_within_a_second() {
    let Some((_redis, url, fake)) = start("fleet: rejections", 300).await else {
        return;
    };
    let env = fleet_env(&url, &[]);
    let a = Sidecar::start(&fake, &env).await;
    let b = Sidecar::start(&fake, &env).await;
    let c = Sidecar::start(&fake, &env).await;
    let token = a.token().await;
    assert_eq!(b.token().await, token);
    assert_eq!(c.token().await, token);
    assert_eq!(fake.calls(), 1);

    let rejected_at = Instant::now();
    let (status, body) = reject(&a, &token).await;
    assert_eq!(status, 200, "{body}");
    let fresh = body["accessToken"].as_str().unwrap().to_string();
    assert_ne!(fresh, token);
    for other in [&b, &c] {
        eventually(
            "the rejected token no longer served",
            Duration::from_secs(1),
            || async {
                let (status, body) = other.call(false, "/token", None).await;
                assert_ne!(
                    body["accessToken"],
                    token.as_str(),
                    "served after its rejection"
                );
                status == 200
            },
        )
        .await;
        assert_eq!(other.token().await, fresh, "the fleet's one replacement");
    }
    assert!(rejected_at.elapsed() < Duration::from_secs(2));
    assert_eq!(fake.calls(), 2, "one replacement for the whole fleet");
    assert!(
        b.log().contains("reports the token rejected"),
        "{}",
        b.log()
    );
    assert_eq!(
        b.metric("klavi_sidecar_fleet_tokens_adopted_total{profile=\"default\"}")
            .await,
        2.0
    );
    for sidecar in [a, b, c] {
        sidecar.stop();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_lost_and_back_under_load_changes_nothing_clients_see() {
    let Some((mut redis, url, fake)) = start("fleet: Redis restarts", 6).await else {
        return;
    };
    let env = fleet_env(&url, &SHORT);
    let fleet = [
        Sidecar::start(&fake, &env).await,
        Sidecar::start(&fake, &env).await,
    ];

    let load = |seconds: u64| {
        let fleet = &fleet;
        async move {
            let started = Instant::now();
            let mut served = 0u64;
            while started.elapsed() < Duration::from_secs(seconds) {
                for sidecar in fleet {
                    let (status, body) = sidecar.call(false, "/token", None).await;
                    assert_eq!(status, 200, "{body}");
                    assert!(body["expiresIn"].as_u64().unwrap() >= 1, "{body}");
                    served += 1;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            served
        }
    };
    assert!(load(2).await > 0);
    redis.stop();
    // Standalone through more than a lifetime: every answer 200.
    assert!(load(8).await > 0);
    for sidecar in &fleet {
        assert_eq!(sidecar.metric("klavi_sidecar_fleet_redis_up").await, 0.0);
        assert!(
            sidecar.log().contains("Redis unreachable"),
            "{}",
            sidecar.log()
        );
        let (status, _) = sidecar_ready(sidecar).await;
        assert_eq!(status, 200, "readiness does not depend on Redis");
    }
    let standalone_calls = fake.calls();
    redis.restart();
    eventually("rejoined", Duration::from_secs(5), || async {
        let mut up = true;
        for sidecar in &fleet {
            up &= sidecar.metric("klavi_sidecar_fleet_redis_up").await == 1.0;
        }
        up
    })
    .await;
    assert!(load(8).await > 0);
    let rejoined_calls = fake.calls() - standalone_calls;
    // Two or three refreshes for the fleet (a busy machine may see a
    // command time out, and a fetch go standalone); about five alone.
    assert!(
        rejoined_calls <= 4,
        "{rejoined_calls} fetches in 8 s after rejoining"
    );
    for sidecar in fleet {
        let log = sidecar.stop();
        assert_eq!(
            log.matches("Redis unreachable").count(),
            1,
            "logged once: {log}"
        );
        assert_eq!(log.matches("Redis answers again").count(), 1, "{log}");
    }
}

async fn sidecar_ready(sidecar: &Sidecar) -> (u16, String) {
    let response = sidecar
        .http
        .get(format!("http://{}/readyz", sidecar.ops))
        .send()
        .await
        .unwrap();
    (response.status().as_u16(), response.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_holder_killed_mid_fetch_delays_the_fleet_by_at_most_the_lock_px() {
    let Some((redis, url, fake)) = start("fleet: a killed lock holder", 300).await else {
        return;
    };
    // Klavi hangs on the first request; the lock's PX is 3 s + 2 s.
    fake.push([Outcome::from(klavi_token_sidecar::fake_klavi::Reply::Hang)]);
    let env = fleet_env(&url, &[("KLAVI_SIDECAR_KLAVI__REQUEST_TIMEOUT_MS", "3000")]);
    let holder = Sidecar::spawn(&fake, &env);
    let mut con = connection(&redis);
    let lock = lock_taken(&mut con).await;
    let waiter = Sidecar::spawn(&fake, &env);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let killed_at = Instant::now();
    Command::new("kill")
        .args(["-KILL", &holder.pid().to_string()])
        .status()
        .unwrap();
    let pttl: i64 = redis::cmd("PTTL").arg(&lock).query(&mut con).unwrap();
    assert!((0..=5000).contains(&pttl), "{pttl}");
    waiter.wait_ready().await;
    let delay = killed_at.elapsed();
    assert!(
        delay <= Duration::from_millis(5000 + 1000),
        "the fleet waited {delay:?} after the holder died"
    );
    assert_eq!(fake.calls(), 2, "the hung request and the waiter's");
    let _ = holder.stop();
    waiter.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lock_is_renewed_while_a_slow_fetch_runs_and_released_after() {
    let Some((redis, url, fake)) = start("fleet: lock renewal", 300).await else {
        return;
    };
    // A 5.5 s answer under Klavi's 6 s timeout: PX 8 s, renewed every
    // 8/3 s.
    fake.push([Outcome::token().after(Duration::from_millis(5500))]);
    let env = fleet_env(&url, &[("KLAVI_SIDECAR_KLAVI__REQUEST_TIMEOUT_MS", "6000")]);
    let sidecar = Sidecar::spawn(&fake, &env);
    let mut con = connection(&redis);
    let lock = lock_taken(&mut con).await;
    let taken_at = Instant::now();
    // After 4 s an unrenewed lock would have under 4 s left; renewed at
    // about 2.7 s, it has over 5.
    tokio::time::sleep(Duration::from_secs(4).saturating_sub(taken_at.elapsed())).await;
    let pttl: i64 = redis::cmd("PTTL").arg(&lock).query(&mut con).unwrap();
    assert!(pttl > 5000, "PTTL {pttl} ms: not renewed");
    sidecar.wait_ready().await;
    let released = Instant::now() + Duration::from_secs(2);
    while redis::cmd("EXISTS")
        .arg(&lock)
        .query::<bool>(&mut con)
        .unwrap()
    {
        assert!(
            Instant::now() < released,
            "not released once the token is stored"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(fake.calls(), 1);
    sidecar.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_klavi_is_asked_by_one_sidecar_at_a_time_no_more_than_alone() {
    let Some((_redis, url, fake)) = start("fleet: Klavi failing", 300).await else {
        return;
    };
    fake.set_default(Outcome::status(500));
    let env = fleet_env(&url, &[("KLAVI_SIDECAR_REFRESH__BACKOFF_MAX_SECS", "4")]);
    let fleet: Vec<Sidecar> = (0..4).map(|_| Sidecar::spawn(&fake, &env)).collect();
    tokio::time::sleep(Duration::from_secs(6)).await;
    let calls = fake.calls();
    // Alone, each would try every 0.5–4 s (its backoff growing): 12–48
    // requests in 6 s. The fleet takes turns, each failure holding the
    // lock for the fleet's backoff (at least the 500 ms floor): at most
    // one request per 500 ms, fewer as the failures add up.
    assert!(
        fake.max_in_flight() <= 1,
        "one request at a time for the fleet"
    );
    assert!((2..=13).contains(&calls), "{calls} requests in 6 s");
    // Then Klavi recovers: one fetch, and the others, however long their
    // own backoff, are woken by its publication and adopt at once.
    fake.set_default(Outcome::token());
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut first_ready = None;
    loop {
        let mut ready = 0;
        for sidecar in &fleet {
            if sidecar_ready(sidecar).await.0 == 200 {
                ready += 1;
            }
        }
        if ready > 0 && first_ready.is_none() {
            first_ready = Some(Instant::now());
        }
        if ready == fleet.len() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{ready} of {} ready",
            fleet.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let spread = first_ready.map(|at| at.elapsed()).unwrap_or_default();
    assert!(
        spread < Duration::from_millis(1500),
        "the last sidecar was ready {spread:?} after the first"
    );
    let token = fleet[0].token().await;
    for sidecar in &fleet[1..] {
        assert_eq!(sidecar.token().await, token);
    }
    assert_eq!(fleet[0].metric("klavi_sidecar_fleet_redis_up").await, 1.0);
    for sidecar in fleet {
        sidecar.stop();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rediss_works_over_rustls_and_an_unknown_certificate_is_redis_down() {
    let fixtures = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tls");
    let (cert, key, ca) = (
        format!("{fixtures}/server.pem"),
        format!("{fixtures}/server.key"),
        format!("{fixtures}/ca.pem"),
    );
    let Some((redis, tls_port)) = RedisServer::start_tls("fleet: rediss://", &cert, &key) else {
        return;
    };
    let url = format!("rediss://localhost:{tls_port}");
    let fake = fake(300).await;
    // The test CA trusted (rustls-native-certs reads SSL_CERT_FILE).
    let env = fleet_env(&url, &[("SSL_CERT_FILE", ca.as_str())]);
    let trusted = Sidecar::start(&fake, &env).await;
    let token = trusted.token().await;
    eventually(
        "the token stored over TLS",
        Duration::from_secs(5),
        || async { everything_in(&redis).len() == 2 },
    )
    .await;
    assert_eq!(trusted.metric("klavi_sidecar_fleet_redis_up").await, 1.0);
    // A second sidecar adopts it over TLS.
    let second = Sidecar::start(&fake, &env).await;
    assert_eq!(second.token().await, token);
    assert_eq!(fake.calls(), 1);

    // Without the CA, the certificate is refused: Redis counts as down,
    // the sidecar fetches on its own and is ready.
    let untrusting = Sidecar::start(&fake, &fleet_env(&url, &[])).await;
    assert_eq!(untrusting.metric("klavi_sidecar_fleet_redis_up").await, 0.0);
    assert_eq!(fake.calls(), 2);
    let log = untrusting.stop();
    assert!(
        log.contains("UnknownIssuer") || log.contains("certificate"),
        "{log}"
    );
    trusted.stop();
    second.stop();
}

/// The key names the sidecars of `fake` use (the demo keys, prefix
/// `fleet-test`).
fn keys_of(fake: &FakeKlavi) -> klavi_token_sidecar::fleet::keys::Keys {
    use klavi_token_sidecar::fleet::sealed::Identity;
    let base = url::Url::parse(&fake.base_url()).unwrap();
    let identity = Identity::of(
        base.as_str(),
        "/payment/customer/v1/auth",
        &klavi_token_sidecar::secret::Secret::new(ACCESS),
    );
    klavi_token_sidecar::fleet::keys::Keys::new("fleet-test", &identity)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_in_redis_neither_stalls_the_fleet_nor_turns_it_off() {
    let Some((redis, url, fake)) = start("fleet: garbage in Redis", 300).await else {
        return;
    };
    let keys = keys_of(&fake);
    let mut con = connection(&redis);
    // A lock that never expires, a counter of the wrong type, a record
    // that is not a hash.
    let _: () = redis::cmd("SET")
        .arg(&keys.lock)
        .arg("forever")
        .query(&mut con)
        .unwrap();
    let _: () = redis::cmd("HSET")
        .arg(&keys.generation)
        .arg("x")
        .arg("y")
        .query(&mut con)
        .unwrap();
    let _: () = redis::cmd("SET")
        .arg(&keys.token)
        .arg("garbage")
        .query(&mut con)
        .unwrap();
    // The lock's PX: 3 s + 2 s.
    let env = fleet_env(&url, &[("KLAVI_SIDECAR_KLAVI__REQUEST_TIMEOUT_MS", "3000")]);
    let started = Instant::now();
    let first = Sidecar::start(&fake, &env).await;
    assert!(
        started.elapsed() < Duration::from_secs(5 + 2),
        "the endless lock held the fleet for {:?}",
        started.elapsed()
    );
    let token = first.token().await;
    let second = Sidecar::start(&fake, &env).await;
    assert_eq!(
        second.token().await,
        token,
        "adopted over the repaired record"
    );
    assert_eq!(fake.calls(), 1);
    assert_eq!(first.metric("klavi_sidecar_fleet_redis_up").await, 1.0);
    assert_eq!(second.metric("klavi_sidecar_fleet_redis_up").await, 1.0);
    let generation: u64 = redis::cmd("GET")
        .arg(&keys.generation)
        .query(&mut con)
        .unwrap();
    assert_eq!(generation, 1);
    first.stop();
    second.stop();

    // A record with the last generation below 2^53 and a huge value: absent, never
    // loaded, and replaced by the next fetch with a sane generation.
    let huge = vec![b'x'; 4 << 20];
    let _: () = redis::cmd("DEL").arg(&keys.token).query(&mut con).unwrap();
    let _: () = redis::cmd("HSET")
        .arg(&keys.token)
        .arg("gen")
        .arg("9007199254740991")
        .arg("sealed")
        .arg(huge)
        .query(&mut con)
        .unwrap();
    let third = Sidecar::start(&fake, &env).await;
    assert_eq!(fake.calls(), 2, "fetched: nothing usable in Redis");
    assert_eq!(third.metric("klavi_sidecar_fleet_redis_up").await, 1.0);
    let stored: u64 = redis::cmd("HGET")
        .arg(&keys.token)
        .arg("gen")
        .query(&mut con)
        .unwrap();
    assert!(stored < 1 << 53, "{stored}");
    let fourth = Sidecar::start(&fake, &env).await;
    assert_eq!(fourth.token().await, third.token().await);
    assert_eq!(fake.calls(), 2);
    third.stop();
    fourth.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejection_made_while_redis_is_down_reaches_the_fleet_when_it_is_back() {
    let Some((mut redis, url, fake)) = start("fleet: a rejection during an outage", 300).await
    else {
        return;
    };
    let env = fleet_env(&url, &[]);
    let a = Sidecar::start(&fake, &env).await;
    let b = Sidecar::start(&fake, &env).await;
    let token = a.token().await;
    assert_eq!(b.token().await, token);
    redis.stop();
    let (status, body) = reject(&a, &token).await;
    assert_eq!(status, 200, "{body}");
    assert_ne!(body["accessToken"], token.as_str());
    // B cannot know yet.
    assert_eq!(b.token().await, token);
    redis.restart();
    let back = Instant::now();
    eventually(
        "B drops the token rejected during the outage",
        Duration::from_secs(5),
        || async {
            let (_, body) = b.call(false, "/token", None).await;
            body["accessToken"] != token.as_str()
        },
    )
    .await;
    println!("told {:?} after Redis came back", back.elapsed());
    a.stop();
    b.stop();
}
