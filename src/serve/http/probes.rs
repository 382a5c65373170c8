//! `/healthz`, `/readyz` and `/metrics`: on both listeners (metrics on the
//! ops listener only), no header needed, never a token.

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use http::{HeaderValue, StatusCode, header};
use serde_json::{Map, Value, json};
use tokio::time::Instant;

use super::AppState;
use crate::cache::store::Readiness;
use crate::profile::Profile;

pub(super) fn routes() -> Router<AppState> {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
}

pub(super) async fn metrics(State(state): State<AppState>) -> Response {
    let stores = state
        .endpoints
        .all
        .iter()
        .map(|e| (e.profile.name(), e.profile.store().as_ref()));
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static(crate::ops::metrics::CONTENT_TYPE),
        )],
        state.metrics.encode(stores),
    )
        .into_response()
}

/// 200 while every profile's refresh task lives; 503 naming the profiles
/// whose task has died, so liveness restarts the container.
async fn healthz(State(state): State<AppState>) -> Response {
    let dead: Vec<&str> = state
        .endpoints
        .all
        .iter()
        .filter(|e| !e.profile.store().state().task_alive)
        .map(|e| e.profile.name())
        .collect();
    if dead.is_empty() {
        Json(json!({"status": "ok"})).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "error", "reason": "refresh_task_stopped", "profiles": dead})),
        )
            .into_response()
    }
}

/// One profile's readiness: whether it is ready, and its `/readyz` entry
/// (`status`, `expiresIn` or `reason` and `lastError`; `required` is added
/// by the caller).
fn readiness(profile: &Profile, now: Instant) -> (bool, Map<String, Value>) {
    let store = profile.store();
    let mut entry = Map::new();
    match store.readiness(now) {
        Readiness::Ready(expires_in) => {
            entry.insert("status".into(), json!("ready"));
            if let Some(left) = expires_in {
                entry.insert("expiresIn".into(), json!(left.as_secs()));
            }
            if store.is_single_use() {
                entry.insert("pooled".into(), json!(store.pooled(now)));
            }
            (true, entry)
        }
        Readiness::NotReady(reason) => {
            entry.insert("status".into(), json!("not_ready"));
            entry.insert("reason".into(), json!(reason.as_str()));
            entry.insert("lastError".into(), json!(store.state().last_error));
            (false, entry)
        }
    }
}

/// 200 while every required profile is ready, else 503. Top-level fields
/// describe the default profile as in v1; `profiles` has every profile.
async fn readyz(State(state): State<AppState>) -> Response {
    let now = Instant::now();
    let mut ready = true;
    let mut profiles = Map::new();
    let mut body = Map::new();
    for endpoint in &state.endpoints.all {
        let profile = &endpoint.profile;
        let (profile_ready, mut entry) = readiness(profile, now);
        ready &= profile_ready || !profile.required();
        if profile.name() == crate::config::DEFAULT_PROFILE {
            body.extend(entry.clone().into_iter().filter(|(k, _)| k != "status"));
        }
        entry.insert("required".into(), json!(profile.required()));
        profiles.insert(profile.name().to_string(), Value::Object(entry));
    }
    body.insert(
        "status".into(),
        json!(if ready { "ready" } else { "not_ready" }),
    );
    body.insert("profiles".into(), Value::Object(profiles));
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(Value::Object(body))).into_response()
}
