//! The fake's stand-in for Klavi's API: every path but the auth one.
//!
//! By default a JSON echo of the method and path, 200 with a valid bearer
//! token it issued and 401 otherwise. Tests see each call as it arrived
//! ([`ApiRequest`]: method, target, headers, body) and can script the next
//! answers ([`ApiReply`]): any status, headers and bytes, a body streamed
//! in slow chunks, a delay, a reset.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::BodyExt;
use http_body_util::channel::Channel;
use hyper::body::Incoming;
use serde_json::json;

use super::{
    FakeResponse, ScriptedReset, State, full, json_response, lock, now_unix, read_body, refusal,
};

/// API calls remembered for [`super::FakeKlavi::api_requests`].
pub const KEPT_REQUESTS: usize = 1024;

/// Bytes of each remembered call's body kept (so the memory the record
/// takes stays bounded at 64 MiB, whatever clients send).
pub const KEPT_BODY: usize = 64 * 1024;

/// Largest API request body read (the proxy allows at most 16 MiB).
const MAX_BODY: usize = 32 << 20;

/// An API call the fake received.
#[derive(Debug, Clone)]
pub struct ApiRequest {
    /// Its method.
    pub method: Method,
    /// Its path and query, as sent.
    pub target: String,
    /// Its headers, as sent.
    pub headers: HeaderMap,
    /// Its body, as sent (its first [`KEPT_BODY`] bytes).
    pub body: Bytes,
    /// Its body's whole length.
    pub body_len: usize,
}

impl ApiRequest {
    /// The bearer token it carried, if any.
    pub fn bearer(&self) -> Option<&str> {
        self.headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
    }
}

/// A scripted answer to one API call, instead of the echo.
#[derive(Debug, Clone)]
pub enum ApiReply {
    /// This status, these headers and this body, whatever the token.
    Raw {
        /// Status code.
        status: u16,
        /// Headers, in order.
        headers: Vec<(String, String)>,
        /// Body bytes.
        body: Bytes,
    },
    /// 200 with a chunked body: the first chunk at once, each next one
    /// after `gap`.
    Chunked {
        /// The chunks.
        chunks: Vec<Bytes>,
        /// The pause before each chunk after the first.
        gap: Duration,
    },
    /// The echo, after this long.
    Delay(Duration),
    /// The connection is dropped after the request is read, no answer.
    Reset,
}

impl ApiReply {
    /// `status` with a small JSON body.
    pub fn status(status: u16) -> Self {
        Self::Raw {
            status,
            headers: vec![("content-type".into(), "application/json".into())],
            body: Bytes::from(format!("{{\"status\":{status}}}")),
        }
    }
}

/// Answers one API call.
pub(super) async fn answer(
    state: &Arc<State>,
    request: Request<Incoming>,
) -> Result<FakeResponse, ScriptedReset> {
    state.api_calls.fetch_add(1, Ordering::SeqCst);
    let (parts, body) = request.into_parts();
    let body = match read_body(body, MAX_BODY).await {
        Ok(body) => body,
        Err(refused) => return Ok(refused),
    };
    let call = ApiRequest {
        method: parts.method,
        target: parts
            .uri
            .path_and_query()
            .map_or_else(|| parts.uri.path().to_string(), |p| p.as_str().to_string()),
        headers: parts.headers,
        body_len: body.len(),
        body: body.slice(..body.len().min(KEPT_BODY)),
    };
    {
        let mut kept = lock(&state.api_requests);
        if kept.len() >= KEPT_REQUESTS {
            kept.pop_front();
        }
        kept.push_back(call.clone());
    }
    let scripted = lock(&state.api_script).pop_front();
    match scripted {
        None => Ok(echo(state, &call)),
        Some(ApiReply::Raw {
            status,
            headers,
            body,
        }) => {
            let mut response = Response::new(full(body));
            *response.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
            for (name, value) in headers {
                if let (Ok(name), Ok(value)) = (
                    HeaderName::from_bytes(name.as_bytes()),
                    HeaderValue::from_str(&value),
                ) {
                    response.headers_mut().append(name, value);
                }
            }
            Ok(response)
        }
        Some(ApiReply::Chunked { chunks, gap }) => Ok(chunked(state, chunks, gap)),
        Some(ApiReply::Delay(delay)) => {
            tokio::select! {
                () = state.stop.cancelled() => Err(ScriptedReset),
                () = tokio::time::sleep(delay) => Ok(echo(state, &call)),
            }
        }
        Some(ApiReply::Reset) => Err(ScriptedReset),
    }
}

/// 200 whose body arrives chunk by chunk, `gap` apart.
fn chunked(state: &Arc<State>, chunks: Vec<Bytes>, gap: Duration) -> FakeResponse {
    let (mut sender, body) = Channel::<Bytes, std::io::Error>::new(1);
    let stop = state.stop.clone();
    tokio::spawn(async move {
        for (i, chunk) in chunks.into_iter().enumerate() {
            if i > 0 {
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(gap) => {}
                }
            }
            if sender.send_data(chunk).await.is_err() {
                return;
            }
        }
    });
    let mut response = Response::new(body.boxed());
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    response
}

/// Klavi's API as far as tokens go: 200 echoing the method and path with a
/// valid bearer token (counting its use), 401 otherwise.
fn echo(state: &State, call: &ApiRequest) -> FakeResponse {
    let refused = match call.bearer() {
        None => Some("missing"),
        Some(token) => {
            let mut tokens = lock(&state.tokens);
            let issued = tokens.get_mut(token);
            let refused = refusal(issued.as_deref(), now_unix(), state.config.single_use);
            if let (None, Some(issued)) = (refused, issued) {
                issued.uses += 1;
            }
            refused
        }
    };
    let path = call.target.split('?').next().unwrap_or_default();
    let echo = |valid: bool| {
        json!({
            "method": call.method.as_str(),
            "path": path,
            "bearerValid": valid,
        })
    };
    match refused {
        None => json_response(StatusCode::OK, &echo(true)),
        Some(why) => {
            let mut body = echo(false);
            body["error"] = json!("invalid_token");
            body["message"] = json!("the access token provided was invalid or has expired");
            body["reason"] = json!(why);
            json_response(StatusCode::UNAUTHORIZED, &body)
        }
    }
}
