//! The token as the token routes answer it: the JSON body or the bare
//! token, with `Cache-Control: no-store`.
//!
//! Bodies are prepared once per token and kept in the profile's
//! [`RenderCache`], so serving one is a copy and a number, not a
//! serialisation (the `GET /token` hot path).

use std::sync::Arc;

use arc_swap::ArcSwapOption;
use axum::response::Response;
use bytes::{BufMut, Bytes, BytesMut};
use http::{HeaderValue, header};
use tokio::time::Instant;

use crate::cache::token::Token;

/// A token's bodies, prepared once.
#[derive(Debug)]
pub struct Rendered {
    token: Arc<Token>,
    /// `{"accessToken":"…","tokenType":"Bearer","expireAt":N,"expiresIn":`
    json_head: Bytes,
    /// The bare token, for `Accept: text/plain`.
    plain: Bytes,
}

impl Rendered {
    /// Renders `token` (a leased token, served once, is not cached).
    pub fn of(token: &Arc<Token>) -> Self {
        let value = token.value().expose();
        // A string always serialises; the fallback only keeps this total.
        let quoted = serde_json::to_string(value).unwrap_or_else(|_| "\"\"".into());
        let json_head = Bytes::from(format!(
            r#"{{"accessToken":{quoted},"tokenType":"Bearer","expireAt":{},"expiresIn":"#,
            token.expire_at_unix()
        ));
        Self {
            token: Arc::clone(token),
            json_head,
            plain: Bytes::copy_from_slice(value.as_bytes()),
        }
    }

    /// The JSON body with `expiresIn` counted at `at`.
    pub fn json_body(&self, at: Instant) -> Bytes {
        let mut seconds = itoa::Buffer::new();
        let seconds = seconds.format(self.token.remaining(at).as_secs());
        let mut body = BytesMut::with_capacity(self.json_head.len() + seconds.len() + 1);
        body.put_slice(&self.json_head);
        body.put_slice(seconds.as_bytes());
        body.put_u8(b'}');
        body.freeze()
    }

    /// The bare token.
    pub fn plain_body(&self) -> Bytes {
        self.plain.clone()
    }

    /// The answer: JSON, or the bare token when `plain_text`. `judged_at`
    /// is when the token was found servable; `expiresIn` counts from then,
    /// so it never shows less than the margin that was checked.
    pub fn response(&self, judged_at: Instant, plain_text: bool) -> Response {
        let (content_type, body) = if plain_text {
            ("text/plain; charset=utf-8", self.plain_body())
        } else {
            ("application/json", self.json_body(judged_at))
        };
        let mut headers = http::HeaderMap::with_capacity(2);
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        let mut response = Response::new(axum::body::Body::from(body));
        *response.headers_mut() = headers;
        response
    }
}

/// The bodies of a profile's current token, rendered on first use.
#[derive(Debug, Default)]
pub struct RenderCache {
    slot: ArcSwapOption<Rendered>,
}

impl RenderCache {
    /// `token`'s bodies: the cached ones if they are `token`'s, else
    /// rendered now (once per new token) and kept.
    pub fn get(&self, token: &Arc<Token>) -> Arc<Rendered> {
        if let Some(rendered) = self.slot.load().as_ref()
            && Arc::ptr_eq(&rendered.token, token)
        {
            return Arc::clone(rendered);
        }
        let rendered = Arc::new(Rendered::of(token));
        self.slot.store(Some(Arc::clone(&rendered)));
        rendered
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::Secret;
    use std::time::{Duration, UNIX_EPOCH};

    fn token(value: &str, lifetime: Duration) -> Arc<Token> {
        Arc::new(Token::new(
            Secret::new(value),
            Instant::now(),
            lifetime,
            // A whole-second wall expiry: nothing is rounded off.
            UNIX_EPOCH + Duration::from_secs(1_800_000_000),
        ))
    }

    #[tokio::test(start_paused = true)]
    async fn json_body_escapes_and_counts_down() {
        let cache = RenderCache::default();
        for value in ["plain", "with \"quotes\" and \\", "unicode é ✓", "ctl\u{1}"] {
            let token = token(value, Duration::from_secs(300));
            let rendered = cache.get(&token);
            let body: serde_json::Value =
                serde_json::from_slice(&rendered.json_body(Instant::now())).unwrap();
            assert_eq!(
                body,
                serde_json::json!({"accessToken": value, "tokenType": "Bearer",
                    "expireAt": 1_800_000_000, "expiresIn": 300})
            );
            assert_eq!(&rendered.plain_body()[..], value.as_bytes());
            tokio::time::advance(Duration::from_millis(1500)).await;
            let body: serde_json::Value =
                serde_json::from_slice(&cache.get(&token).json_body(Instant::now())).unwrap();
            assert_eq!(body["expiresIn"], 298);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_token_is_rendered_once_and_a_new_token_anew() {
        let cache = RenderCache::default();
        let first = token("a", Duration::from_secs(30));
        let one = cache.get(&first);
        assert!(Arc::ptr_eq(&one, &cache.get(&first)), "rendered once");
        let second = token("b", Duration::from_secs(30));
        assert_eq!(&cache.get(&second).plain_body()[..], b"b");
        assert_eq!(&cache.get(&first).plain_body()[..], b"a");
    }

    /// The soak once caught `expiresIn: 0` with a 1 s margin: the token was
    /// judged with exactly 1 s left and its body counted from a later
    /// instant. The body must count from the instant of the judgement.
    #[tokio::test(start_paused = true)]
    async fn expires_in_counts_from_the_judgement_not_from_later() {
        let margin = Duration::from_secs(1);
        for left in [
            margin,
            margin + Duration::from_nanos(1),
            margin + Duration::from_millis(999),
        ] {
            let judged_at = Instant::now();
            let token = token("t", left);
            assert!(token.is_servable(judged_at, margin));
            // Time passes between the judgement and the body.
            tokio::time::advance(Duration::from_millis(1)).await;
            let response = RenderCache::default()
                .get(&token)
                .response(judged_at, false);
            assert_eq!(response.headers()[header::CACHE_CONTROL], "no-store");
            let body = axum::body::to_bytes(response.into_body(), 1024)
                .await
                .unwrap();
            let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(body["expiresIn"], 1, "{left:?} left when judged");
        }
    }
}
