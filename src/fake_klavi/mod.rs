//! A fake Klavi, owned by the project.
//!
//! It backs the `demo` and `fake-klavi` commands and every test that needs
//! an upstream. By default it issues JWT-shaped tokens (unsigned in any
//! meaningful way: the signature is random bytes) to the one configured key
//! pair and answers 401 to any other. Tests script it: each queued
//! [`Outcome`] answers one request — a token, an error status with
//! `Retry-After`, a raw body, a delay, a hang, a connection reset, a skewed
//! `Date` — after which the default outcome applies again.
//!
//! Every other path stands for Klavi's API: it answers 200 with a JSON echo
//! of the method and path when the request carries `Authorization: Bearer`
//! with a token it issued that is still valid, and 401 otherwise, as Klavi
//! does for "the access token provided was invalid or has expired". A
//! token can be revoked ([`FakeKlavi::revoke`], `POST /_fake/revoke`), and
//! with [`FakeKlaviConfig::single_use`] a token's second use is refused, as
//! one version of Klavi's documentation says it is for payment initiation.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode, header};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

mod api;
mod outcome;
pub use api::{ApiReply, ApiRequest};
pub use outcome::{Outcome, Reply, UnknownFault};

use crate::clock::{SystemClock, WallClock as _};

/// Access key the demo uses; not a real Klavi key.
pub const DEMO_ACCESS_KEY: &str = "demo-access-key";
/// Secret key the demo uses; not a real Klavi key.
pub const DEMO_SECRET_KEY: &str = "demo-secret-key";
/// The path the fake answers on (Klavi's auth path).
pub const AUTH_PATH: &str = "/payment/customer/v1/auth";
/// Counters for scripts and benchmarks: `{"calls", "in_flight",
/// "max_in_flight", "issued", "api_calls"}` (not part of Klavi's API).
pub const STATS_PATH: &str = "/_fake/stats";
/// `POST {"accessToken": "…"}` revokes that token, `{"all": true}` every
/// token issued so far; answers `{"revoked": N}` (not part of Klavi's API).
pub const REVOKE_PATH: &str = "/_fake/revoke";

/// How the fake answers by default.
#[derive(Debug, Clone)]
pub struct FakeKlaviConfig {
    /// Lifetime of issued tokens.
    pub token_ttl: Duration,
    /// The accepted access key.
    pub access_key: String,
    /// The accepted secret key.
    pub secret_key: String,
    /// A token is good for one API call: its second use is answered 401.
    pub single_use: bool,
}

impl Default for FakeKlaviConfig {
    fn default() -> Self {
        Self {
            token_ttl: Duration::from_secs(30),
            access_key: DEMO_ACCESS_KEY.into(),
            secret_key: DEMO_SECRET_KEY.into(),
            single_use: false,
        }
    }
}

impl FakeKlaviConfig {
    /// The demo keys, tokens living `secs`.
    pub fn lasting(secs: u64) -> Self {
        Self {
            token_ttl: Duration::from_secs(secs),
            ..Self::default()
        }
    }

    /// Each token good for one API call.
    pub fn single_use(self) -> Self {
        Self {
            single_use: true,
            ..self
        }
    }
}

/// What the fake remembers of a token it issued.
#[derive(Debug, Clone, Copy)]
struct Issued {
    /// Unix seconds.
    expire_at: u64,
    /// API calls made with it.
    uses: u64,
    revoked: bool,
}

/// Why an API call's bearer token was refused.
fn refusal(issued: Option<&Issued>, now_unix: u64, single_use: bool) -> Option<&'static str> {
    match issued {
        None => Some("unknown"),
        Some(t) if t.revoked => Some("revoked"),
        Some(t) if t.expire_at <= now_unix => Some("expired"),
        Some(t) if single_use && t.uses > 0 => Some("used"),
        Some(_) => None,
    }
}

/// A request the fake received (for tests to inspect).
#[derive(Debug, Clone)]
pub struct Recorded {
    /// Request headers.
    pub headers: HeaderMap,
    /// Request body.
    pub body: Bytes,
}

/// Random faults mixed into the default answers.
#[derive(Debug, Clone, PartialEq)]
pub struct Chaos {
    /// Fraction of requests, 0 to 1, that get a fault.
    pub rate: f64,
    /// The faults, picked uniformly.
    pub faults: Vec<Outcome>,
}

#[derive(Debug)]
struct State {
    config: FakeKlaviConfig,
    script: Mutex<VecDeque<Outcome>>,
    default: Mutex<Outcome>,
    chaos: Mutex<Option<Chaos>>,
    calls: AtomicU64,
    in_flight: AtomicU64,
    max_in_flight: AtomicU64,
    issued: AtomicU64,
    api_calls: AtomicU64,
    /// Every token issued and not yet expired, by value.
    tokens: Mutex<std::collections::HashMap<String, Issued>>,
    last_token: Mutex<Option<(String, u64)>>,
    last_request: Mutex<Option<Recorded>>,
    /// Scripted answers for the next API calls, instead of the echo.
    api_script: Mutex<VecDeque<ApiReply>>,
    /// The last API calls received, oldest first (at most
    /// [`api::KEPT_REQUESTS`]).
    api_requests: Mutex<VecDeque<ApiRequest>>,
    stop: CancellationToken,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A running fake Klavi.
#[derive(Debug)]
pub struct FakeKlavi {
    addr: SocketAddr,
    state: Arc<State>,
    task: tokio::task::JoinHandle<()>,
}

impl FakeKlavi {
    /// Binds `listen` and serves until [`FakeKlavi::stop`].
    pub async fn start(listen: SocketAddr, config: FakeKlaviConfig) -> std::io::Result<Self> {
        let listener = TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(State {
            config,
            script: Mutex::new(VecDeque::new()),
            default: Mutex::new(Outcome::token()),
            chaos: Mutex::new(None),
            calls: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            max_in_flight: AtomicU64::new(0),
            issued: AtomicU64::new(0),
            api_calls: AtomicU64::new(0),
            tokens: Mutex::new(std::collections::HashMap::new()),
            last_token: Mutex::new(None),
            last_request: Mutex::new(None),
            api_script: Mutex::new(VecDeque::new()),
            api_requests: Mutex::new(VecDeque::new()),
            stop: CancellationToken::new(),
        });
        let task = tokio::spawn(serve(listener, Arc::clone(&state)));
        Ok(Self { addr, state, task })
    }

    /// Starts on a random loopback port.
    pub async fn start_local(config: FakeKlaviConfig) -> std::io::Result<Self> {
        Self::start(SocketAddr::from(([127, 0, 0, 1], 0)), config).await
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR`, to use as `klavi.base_url`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Queues outcomes for the next requests.
    pub fn push(&self, outcomes: impl IntoIterator<Item = Outcome>) {
        lock(&self.state.script).extend(outcomes);
    }

    /// Sets the answer once the queue is empty.
    pub fn set_default(&self, outcome: Outcome) {
        *lock(&self.state.default) = outcome;
    }

    /// Mixes random faults into the default answers (`None` stops).
    pub fn set_chaos(&self, chaos: Option<Chaos>) {
        *lock(&self.state.chaos) = chaos;
    }

    /// Auth requests received so far.
    pub fn calls(&self) -> u64 {
        self.state.calls.load(Ordering::SeqCst)
    }

    /// The most auth requests ever in flight at once.
    pub fn max_in_flight(&self) -> u64 {
        self.state.max_in_flight.load(Ordering::SeqCst)
    }

    /// Tokens issued so far.
    pub fn issued(&self) -> u64 {
        self.state.issued.load(Ordering::SeqCst)
    }

    /// API (non-auth) requests received so far.
    pub fn api_calls(&self) -> u64 {
        self.state.api_calls.load(Ordering::SeqCst)
    }

    /// Revokes `token`: API calls with it are answered 401 from now on.
    /// False if the fake never issued it (or it expired).
    pub fn revoke(&self, token: &str) -> bool {
        match lock(&self.state.tokens).get_mut(token) {
            Some(issued) => {
                issued.revoked = true;
                true
            }
            None => false,
        }
    }

    /// The last token issued.
    pub fn last_token(&self) -> Option<String> {
        lock(&self.state.last_token)
            .as_ref()
            .map(|(t, _)| t.clone())
    }

    /// The last auth request received.
    pub fn last_request(&self) -> Option<Recorded> {
        lock(&self.state.last_request).clone()
    }

    /// Queues answers for the next API calls (instead of the echo).
    pub fn push_api(&self, replies: impl IntoIterator<Item = ApiReply>) {
        lock(&self.state.api_script).extend(replies);
    }

    /// The last API calls received (up to 1024), oldest first.
    pub fn api_requests(&self) -> Vec<ApiRequest> {
        lock(&self.state.api_requests).iter().cloned().collect()
    }

    /// The API calls received since the last take (up to 1024: take them
    /// often), oldest first; the record is emptied.
    pub fn take_api_requests(&self) -> Vec<ApiRequest> {
        lock(&self.state.api_requests).drain(..).collect()
    }

    /// Stops serving and closes every connection.
    pub async fn stop(self) {
        self.state.stop.cancel();
        let _ = self.task.await;
    }

    /// Serves until `shutdown` is cancelled (the `fake-klavi` command).
    pub async fn run_until(self, shutdown: CancellationToken) {
        shutdown.cancelled().await;
        self.stop().await;
    }
}

async fn serve(listener: TcpListener, state: Arc<State>) {
    let graceful = GracefulShutdown::new();
    loop {
        let accepted = tokio::select! {
            () = state.stop.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let Ok((stream, _)) = accepted else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let _ = stream.set_nodelay(true);
        let state = Arc::clone(&state);
        let service = service_fn(move |request| handle(Arc::clone(&state), request));
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder.timer(TokioTimer::new());
        let connection = graceful.watch(builder.serve_connection(TokioIo::new(stream), service));
        tokio::spawn(connection);
    }
    // Hanging handlers end with the stop signal; give the rest a moment.
    let _ = tokio::time::timeout(Duration::from_secs(1), graceful.shutdown()).await;
}

/// The error that makes hyper drop the connection without an answer.
#[derive(Debug, thiserror::Error)]
#[error("scripted connection reset")]
struct ScriptedReset;

/// The fake's answers: whole bodies, or a chunked one that streams.
type FakeBody = BoxBody<Bytes, std::io::Error>;
type FakeResponse = Response<FakeBody>;

/// A whole body.
fn full(bytes: impl Into<Bytes>) -> FakeBody {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

fn json_response(status: StatusCode, body: &serde_json::Value) -> FakeResponse {
    let mut response = Response::new(full(body.to_string()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response
}

struct InFlight<'a>(&'a State);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn handle(
    state: Arc<State>,
    request: Request<Incoming>,
) -> Result<FakeResponse, ScriptedReset> {
    if request.uri().path() == STATS_PATH {
        let stats = json!({
            "calls": state.calls.load(Ordering::SeqCst),
            "in_flight": state.in_flight.load(Ordering::SeqCst),
            "max_in_flight": state.max_in_flight.load(Ordering::SeqCst),
            "issued": state.issued.load(Ordering::SeqCst),
            "api_calls": state.api_calls.load(Ordering::SeqCst),
        });
        return Ok(json_response(StatusCode::OK, &stats));
    }
    if request.uri().path() == REVOKE_PATH && request.method() == Method::POST {
        return Ok(revoke(&state, request).await);
    }
    if request.uri().path() != AUTH_PATH {
        return api::answer(&state, request).await;
    }
    if request.method() != Method::POST {
        return Ok(json_response(
            StatusCode::METHOD_NOT_ALLOWED,
            &json!({"error": "method not allowed"}),
        ));
    }
    state.calls.fetch_add(1, Ordering::SeqCst);
    let now_in_flight = state.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    state
        .max_in_flight
        .fetch_max(now_in_flight, Ordering::SeqCst);
    let _in_flight = InFlight(&state);

    let (parts, body) = request.into_parts();
    let body = match read_body(body, 64 * 1024).await {
        Ok(body) => body,
        Err(refused) => return Ok(refused),
    };
    *lock(&state.last_request) = Some(Recorded {
        headers: parts.headers,
        body: body.clone(),
    });

    let scripted = lock(&state.script).pop_front();
    let outcome = scripted.unwrap_or_else(|| {
        let chaos = lock(&state.chaos).clone();
        match chaos {
            Some(chaos) if !chaos.faults.is_empty() && rand::random::<f64>() < chaos.rate => {
                let pick = rand::random_range(0..chaos.faults.len());
                chaos.faults[pick].clone()
            }
            _ => lock(&state.default).clone(),
        }
    });
    if !outcome.delay.is_zero() {
        tokio::select! {
            () = state.stop.cancelled() => return Err(ScriptedReset),
            () = tokio::time::sleep(outcome.delay) => {}
        }
    }
    let mut response = match outcome.reply {
        Reply::Token { ttl } => match check_keys(&state.config, &body) {
            Ok(()) => issue_token(
                &state,
                ttl.unwrap_or(state.config.token_ttl),
                outcome.date_skew_secs,
            ),
            Err(response) => *response,
        },
        Reply::SameToken => {
            let last = lock(&state.last_token).clone();
            match last {
                Some((token, expire_at)) => json_response(
                    StatusCode::OK,
                    &json!({"accessToken": token, "expireAt": expire_at}),
                ),
                None => issue_token(&state, state.config.token_ttl, outcome.date_skew_secs),
            }
        }
        Reply::Status {
            status,
            retry_after,
        } => {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let mut response = json_response(status, &json!({"error": status.as_u16()}));
            if let Some(value) = retry_after.and_then(|v| http::HeaderValue::from_str(&v).ok()) {
                response.headers_mut().insert(header::RETRY_AFTER, value);
            }
            response
        }
        Reply::Raw { status, body } => {
            let mut response = Response::new(full(body));
            *response.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/json"),
            );
            response
        }
        Reply::Hang => {
            state.stop.cancelled().await;
            return Err(ScriptedReset);
        }
        Reply::Reset => return Err(ScriptedReset),
    };
    let date = crate::clock::shift(SystemClock.now(), outcome.date_skew_secs as f64);
    if let Ok(value) = http::HeaderValue::from_str(&httpdate::fmt_http_date(date)) {
        response.headers_mut().insert(header::DATE, value);
    }
    Ok(response)
}

/// A request body of at most `limit` bytes, or the 400 the fake answers.
async fn read_body(body: Incoming, limit: usize) -> Result<Bytes, FakeResponse> {
    Limited::new(body, limit)
        .collect()
        .await
        .map(|b| b.to_bytes())
        .map_err(|_| json_response(StatusCode::BAD_REQUEST, &json!({"error": "bad body"})))
}

fn check_keys(config: &FakeKlaviConfig, body: &[u8]) -> Result<(), Box<FakeResponse>> {
    let request: serde_json::Value = serde_json::from_slice(body).map_err(|_| {
        Box::new(json_response(
            StatusCode::BAD_REQUEST,
            &json!({"error": "body is not JSON"}),
        ))
    })?;
    let matches = request.get("accessKey").and_then(|v| v.as_str()) == Some(&config.access_key)
        && request.get("secretKey").and_then(|v| v.as_str()) == Some(&config.secret_key);
    if matches {
        Ok(())
    } else {
        Err(Box::new(json_response(
            StatusCode::UNAUTHORIZED,
            &json!({"error": "invalid accessKey or secretKey"}),
        )))
    }
}

fn now_unix() -> u64 {
    SystemClock
        .now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// `POST /_fake/revoke`.
async fn revoke(state: &State, request: Request<Incoming>) -> FakeResponse {
    let body = Limited::new(request.into_body(), 64 * 1024)
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let asked: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    let mut tokens = lock(&state.tokens);
    let revoked = if asked["all"] == json!(true) {
        tokens.values_mut().for_each(|t| t.revoked = true);
        tokens.len()
    } else {
        match asked["accessToken"]
            .as_str()
            .and_then(|t| tokens.get_mut(t))
        {
            Some(issued) => {
                issued.revoked = true;
                1
            }
            None => 0,
        }
    };
    json_response(StatusCode::OK, &json!({"revoked": revoked}))
}

/// A new JWT-shaped token from a clock `skew_secs` off the real one.
fn issue_token(state: &State, ttl: Duration, skew_secs: i64) -> FakeResponse {
    let n = state.issued.fetch_add(1, Ordering::SeqCst) + 1;
    let now = SystemClock
        .now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
        .saturating_add_signed(skew_secs);
    let expire_at = now + ttl.as_secs();
    let header = URL_SAFE_NO_PAD.encode(r#"{"alg":"ES256","typ":"JWT"}"#);
    let claims = json!({"iss": "fake-klavi", "iat": now, "exp": expire_at, "jti": n});
    let payload = URL_SAFE_NO_PAD.encode(claims.to_string());
    let signature = URL_SAFE_NO_PAD.encode(rand::random::<[u8; 32]>());
    let token = format!("{header}.{payload}.{signature}");
    {
        let mut tokens = lock(&state.tokens);
        // Forget expired tokens now and then, so a long run stays small.
        if tokens.len() >= 1024 && n.is_multiple_of(256) {
            let real_now = now_unix();
            tokens.retain(|_, t| t.expire_at > real_now);
        }
        tokens.insert(
            token.clone(),
            Issued {
                expire_at,
                uses: 0,
                revoked: false,
            },
        );
    }
    *lock(&state.last_token) = Some((token.clone(), expire_at));
    json_response(
        StatusCode::OK,
        &json!({"accessToken": token, "expireAt": expire_at}),
    )
}
