//! Reading Klavi's answer: the token and when it expires.
//!
//! Pure functions over bytes and times. [`parse_auth_body`] finds the token
//! and every expiry hint in a response body; [`resolve`] turns the hints,
//! the `Date` header and the local clock into one lifetime measured from the
//! moment the request was sent.

use std::time::{Duration, SystemTime};

use base64::Engine as _;
use serde_json::{Map, Value};

use crate::cache::policy::MAX_LIFETIME;
use crate::clock::{shift, unix_secs};
use crate::secret::Secret;
use crate::upstream::error::InvalidResponse;

/// Response bodies longer than this are refused (SPEC section 3).
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// Numbers above this in `expireAt`/`expire` are milliseconds, not seconds.
const MILLIS_THRESHOLD: f64 = 1e12;

/// A `Date` header further than this from the local clock is clock skew.
pub const SKEW_TOLERANCE_SECS: f64 = 5.0;

/// What the body says about the expiry, before clocks are considered.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ExpiryClaim {
    /// An absolute time, unix seconds on Klavi's clock.
    At {
        /// Unix seconds.
        unix: f64,
        /// The field it came from.
        field: &'static str,
    },
    /// Seconds from now (from when the request was sent).
    In {
        /// Seconds.
        secs: f64,
        /// The field it came from.
        field: &'static str,
    },
}

/// A parsed auth response body.
#[derive(Debug, Clone)]
pub struct AuthBody {
    /// `accessToken`.
    pub access_token: Secret,
    /// The first expiry field found in the body, if any.
    pub claim: Option<ExpiryClaim>,
    /// The JWT's `exp` claim (unix seconds on Klavi's clock), if the token
    /// is a JWT that carries one.
    pub jwt_exp: Option<f64>,
}

/// Parses a response body of at most [`MAX_BODY_BYTES`].
///
/// Expiry fields, first found wins: `expireAt`, `expireIn`, `expiresIn`,
/// `expire`. A field that is `null` counts as absent; one that is present
/// but unreadable makes the response invalid rather than silently falling
/// through to a guess.
pub fn parse_auth_body(body: &[u8]) -> Result<AuthBody, InvalidResponse> {
    if body.len() > MAX_BODY_BYTES {
        return Err(InvalidResponse::TooLarge {
            limit: MAX_BODY_BYTES,
        });
    }
    let value: Value =
        serde_json::from_slice(body).map_err(|e| InvalidResponse::NotJson(e.to_string()))?;
    let Value::Object(object) = value else {
        return Err(InvalidResponse::NotJson("not an object".into()));
    };
    let access_token = match object.get("accessToken") {
        Some(Value::String(token)) if !token.trim().is_empty() => Secret::new(token.clone()),
        _ => return Err(InvalidResponse::MissingToken),
    };
    let claim = expiry_claim(&object)?;
    let jwt_exp = jwt_exp(access_token.expose());
    Ok(AuthBody {
        access_token,
        claim,
        jwt_exp,
    })
}

fn expiry_claim(object: &Map<String, Value>) -> Result<Option<ExpiryClaim>, InvalidResponse> {
    let present = |field: &str| object.get(field).filter(|v| !v.is_null());
    if let Some(value) = present("expireAt") {
        let unix = number(value).ok_or(InvalidResponse::BadExpiry { field: "expireAt" })?;
        return Ok(Some(ExpiryClaim::At {
            unix: seconds_or_millis(unix),
            field: "expireAt",
        }));
    }
    for field in ["expireIn", "expiresIn"] {
        if let Some(value) = present(field) {
            let secs = number(value).ok_or(InvalidResponse::BadExpiry { field })?;
            return Ok(Some(ExpiryClaim::In { secs, field }));
        }
    }
    if let Some(value) = present("expire") {
        let unix = number(value)
            .map(seconds_or_millis)
            .or_else(|| value.as_str().and_then(rfc3339))
            .ok_or(InvalidResponse::BadExpiry { field: "expire" })?;
        return Ok(Some(ExpiryClaim::At {
            unix,
            field: "expire",
        }));
    }
    Ok(None)
}

/// A finite JSON number, or a string holding one.
fn number(value: &Value) -> Option<f64> {
    let n = match value {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse::<f64>().ok(),
        _ => None,
    }?;
    n.is_finite().then_some(n)
}

fn seconds_or_millis(value: f64) -> f64 {
    if value > MILLIS_THRESHOLD {
        value / 1000.0
    } else {
        value
    }
}

fn rfc3339(text: &str) -> Option<f64> {
    let parsed =
        time::OffsetDateTime::parse(text.trim(), &time::format_description::well_known::Rfc3339)
            .ok()?;
    Some(parsed.unix_timestamp_nanos() as f64 / 1e9)
}

/// The `exp` claim of a JWT, without verifying its signature (the sidecar
/// only needs a hint of when Klavi will stop accepting it).
pub fn jwt_exp(token: &str) -> Option<f64> {
    let mut parts = token.split('.');
    let (_header, payload, _signature) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let claims: Value = serde_json::from_slice(&bytes).ok()?;
    let exp = claims.get("exp")?.as_f64()?;
    exp.is_finite().then_some(exp)
}

/// The expiry of a token on the local clock.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Resolved {
    /// From the moment the request was sent to the expiry.
    pub lifetime: Duration,
    /// The expiry on the local clock (after any skew correction).
    pub expire_at: SystemTime,
    /// Where the expiry came from: a field name, `exp` or `fallback`.
    pub source: &'static str,
    /// Klavi's clock minus ours, in seconds, when beyond the tolerance.
    pub skew_secs: Option<f64>,
}

/// The clocks around one request.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// Local wall clock when the request was sent.
    pub sent: SystemTime,
    /// Local wall clock when the response arrived.
    pub received: SystemTime,
    /// The response's `Date` header, if it had a readable one.
    pub date_header: Option<SystemTime>,
    /// Time between sending and receiving on the monotonic clock, which
    /// a wall-clock jump during the request does not move.
    pub elapsed: Duration,
}

/// Places the token's expiry on the local clock.
///
/// Klavi's absolute times are moved by the skew its `Date` header shows
/// (when more than [`SKEW_TOLERANCE_SECS`]); relative ones count from when
/// the request was sent, so time on the wire only makes the token look
/// older, never fresher. When the body and the JWT disagree, the earlier
/// expiry wins; with neither, `fallback` is assumed. A token that expired
/// before it arrived is an invalid response.
///
/// The lifetime is measured both from the wall clock at sending and from
/// the wall clock at receipt plus the monotonic time in between, and the
/// shorter wins: a wall-clock jump during the request can then only make
/// the token look older, never fresher.
pub fn resolve(
    body: &AuthBody,
    timing: Timing,
    fallback: Duration,
) -> Result<Resolved, InvalidResponse> {
    let skew_secs = timing
        .date_header
        .map(|date| unix_secs(date) - unix_secs(timing.received))
        .filter(|skew| skew.abs() > SKEW_TOLERANCE_SECS);
    // Work in seconds from `sent`, clamped so absurd values stay far in the
    // past or future instead of overflowing `SystemTime`.
    let sent_unix = unix_secs(timing.sent);
    let limit = 2.0 * MAX_LIFETIME.as_secs_f64();
    let from_sent = |secs: f64| shift(timing.sent, secs.clamp(-limit, limit));
    let on_local_clock = |unix: f64| from_sent(unix - skew_secs.unwrap_or(0.0) - sent_unix);

    let from_body = body.claim.map(|claim| match claim {
        ExpiryClaim::At { unix, field } => (on_local_clock(unix), field),
        ExpiryClaim::In { secs, field } => (from_sent(secs), field),
    });
    let from_jwt = body.jwt_exp.map(|exp| (on_local_clock(exp), "exp"));
    let (expire_at, source) = match (from_body, from_jwt) {
        (Some(a), Some(b)) => {
            if b.0 < a.0 {
                b
            } else {
                a
            }
        }
        (Some(a), None) | (None, Some(a)) => a,
        (None, None) => (timing.sent + fallback, "fallback"),
    };

    // Seconds from sending to expiry, seen from both ends of the request.
    let elapsed = timing.elapsed.as_secs_f64();
    let from_sent = unix_secs(expire_at) - sent_unix;
    let from_received = unix_secs(expire_at) - unix_secs(timing.received) + elapsed;
    let lifetime_secs = from_sent.min(from_received);
    let left_on_arrival = lifetime_secs - elapsed;
    if left_on_arrival <= 0.0 {
        return Err(InvalidResponse::AlreadyExpired {
            seconds_ago: -left_on_arrival,
        });
    }
    let lifetime = Duration::try_from_secs_f64(lifetime_secs)
        .unwrap_or(MAX_LIFETIME)
        .min(MAX_LIFETIME);
    Ok(Resolved {
        lifetime,
        // On the local clock as it reads now.
        expire_at: shift(timing.received, lifetime.as_secs_f64() - elapsed),
        source,
        skew_secs,
    })
}

#[cfg(test)]
mod tests;
