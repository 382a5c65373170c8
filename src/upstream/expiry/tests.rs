//! Tables of answers and clocks: every expiry form, skew, jumps.

use super::*;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use std::time::UNIX_EPOCH;

const NOW: u64 = 1_752_053_547;

fn at(secs: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(secs)
}

fn jwt(claims: &str) -> String {
    format!(
        "{}.{}.c2lnbmF0dXJl",
        URL_SAFE_NO_PAD.encode(r#"{"alg":"ES256","typ":"JWT"}"#),
        URL_SAFE_NO_PAD.encode(claims)
    )
}

fn timing() -> Timing {
    Timing {
        sent: at(NOW),
        received: at(NOW),
        date_header: None,
        elapsed: Duration::ZERO,
    }
}

/// A body that must parse.
fn parsed(body: &str) -> AuthBody {
    parse_auth_body(body.as_bytes()).unwrap_or_else(|e| panic!("{e}"))
}

/// Parses and resolves a body sent and received at NOW, fallback 300 s.
fn lifetime_of(body: &str) -> Result<(u64, &'static str), InvalidResponse> {
    let parsed = parse_auth_body(body.as_bytes())?;
    let resolved = resolve(&parsed, timing(), Duration::from_secs(300))?;
    Ok((resolved.lifetime.as_secs(), resolved.source))
}

#[test]
fn every_expiry_form() {
    let exp_in_100 = jwt(&format!(r#"{{"exp":{}}}"#, NOW + 100));
    let exp_in_900 = jwt(&format!(r#"{{"exp":{}}}"#, NOW + 900));
    let cases: Vec<(String, (u64, &str))> = vec![
        // expireAt in seconds, in milliseconds, as a numeric string.
        (
            format!(r#"{{"accessToken":"t","expireAt":{}}}"#, NOW + 287),
            (287, "expireAt"),
        ),
        (
            format!(r#"{{"accessToken":"t","expireAt":{}}}"#, (NOW + 287) * 1000),
            (287, "expireAt"),
        ),
        (
            format!(r#"{{"accessToken":"t","expireAt":"{}"}}"#, NOW + 60),
            (60, "expireAt"),
        ),
        // expireIn / expiresIn are relative.
        (
            r#"{"accessToken":"t","expireIn":120}"#.into(),
            (120, "expireIn"),
        ),
        (
            r#"{"accessToken":"t","expiresIn":"45"}"#.into(),
            (45, "expiresIn"),
        ),
        (
            r#"{"accessToken":"t","expiresIn":30.9}"#.into(),
            (30, "expiresIn"),
        ),
        // expire: number, numeric string, milliseconds, RFC 3339.
        (
            format!(r#"{{"accessToken":"t","expire":{}}}"#, NOW + 10),
            (10, "expire"),
        ),
        (
            format!(r#"{{"accessToken":"t","expire":"{}"}}"#, NOW + 11),
            (11, "expire"),
        ),
        (
            format!(r#"{{"accessToken":"t","expire":{}}}"#, (NOW + 12) * 1000),
            (12, "expire"),
        ),
        (
            r#"{"accessToken":"t","expire":"2025-07-09T09:37:27Z"}"#.into(),
            (300, "expire"),
        ),
        (
            r#"{"accessToken":"t","expire":"2025-07-09T06:37:27-03:00"}"#.into(),
            (300, "expire"),
        ),
        // The JWT's exp alone.
        (format!(r#"{{"accessToken":"{exp_in_100}"}}"#), (100, "exp")),
        // Nothing at all: the fallback.
        (r#"{"accessToken":"t"}"#.into(), (300, "fallback")),
        (
            format!(r#"{{"accessToken":"{}"}}"#, jwt(r#"{"sub":"x"}"#)),
            (300, "fallback"),
        ),
        // null counts as absent.
        (
            r#"{"accessToken":"t","expireAt":null,"expireIn":50}"#.into(),
            (50, "expireIn"),
        ),
        // First found wins among body fields...
        (
            format!(
                r#"{{"accessToken":"t","expireAt":{},"expireIn":10}}"#,
                NOW + 200
            ),
            (200, "expireAt"),
        ),
        (
            r#"{"accessToken":"t","expireIn":20,"expiresIn":10}"#.into(),
            (20, "expireIn"),
        ),
        // ...but the JWT's exp wins where it is earlier.
        (
            format!(
                r#"{{"accessToken":"{exp_in_100}","expireAt":{}}}"#,
                NOW + 287
            ),
            (100, "exp"),
        ),
        (
            format!(
                r#"{{"accessToken":"{exp_in_900}","expireAt":{}}}"#,
                NOW + 287
            ),
            (287, "expireAt"),
        ),
        (
            format!(r#"{{"accessToken":"{exp_in_100}","expireIn":50}}"#),
            (50, "expireIn"),
        ),
    ];
    for (body, expected) in cases {
        assert_eq!(lifetime_of(&body), Ok(expected), "{body}");
    }
}

#[test]
fn invalid_bodies() {
    let cases: Vec<(&str, InvalidResponse)> = vec![
        ("", InvalidResponse::NotJson(String::new())),
        ("<html>oops</html>", InvalidResponse::NotJson(String::new())),
        ("[1,2]", InvalidResponse::NotJson(String::new())),
        (r#""token""#, InvalidResponse::NotJson(String::new())),
        ("{}", InvalidResponse::MissingToken),
        (r#"{"accessToken":""}"#, InvalidResponse::MissingToken),
        (r#"{"accessToken":"   "}"#, InvalidResponse::MissingToken),
        (r#"{"accessToken":42}"#, InvalidResponse::MissingToken),
        (r#"{"accessToken":null}"#, InvalidResponse::MissingToken),
        (r#"{"access_token":"t"}"#, InvalidResponse::MissingToken),
        (
            r#"{"accessToken":"t","expireAt":"soon"}"#,
            InvalidResponse::BadExpiry { field: "expireAt" },
        ),
        (
            r#"{"accessToken":"t","expireAt":{}}"#,
            InvalidResponse::BadExpiry { field: "expireAt" },
        ),
        (
            r#"{"accessToken":"t","expireIn":true}"#,
            InvalidResponse::BadExpiry { field: "expireIn" },
        ),
        (
            r#"{"accessToken":"t","expire":"tomorrow"}"#,
            InvalidResponse::BadExpiry { field: "expire" },
        ),
    ];
    for (body, expected) in cases {
        let got = lifetime_of(body);
        let same_kind = match (&got, &expected) {
            (Err(InvalidResponse::NotJson(_)), InvalidResponse::NotJson(_)) => true,
            (Err(e), expected) => e == expected,
            _ => false,
        };
        assert!(same_kind, "{body}: got {got:?}, expected {expected:?}");
    }
}

#[test]
fn expired_on_arrival_is_invalid() {
    for body in [
        format!(r#"{{"accessToken":"t","expireAt":{}}}"#, NOW - 1),
        format!(r#"{{"accessToken":"t","expireAt":{NOW}}}"#),
        r#"{"accessToken":"t","expireIn":0}"#.to_string(),
        r#"{"accessToken":"t","expireIn":-30}"#.to_string(),
        format!(
            r#"{{"accessToken":"{}","expireIn":60}}"#,
            jwt(&format!(r#"{{"exp":{}}}"#, NOW - 5))
        ),
    ] {
        assert!(
            matches!(
                lifetime_of(&body),
                Err(InvalidResponse::AlreadyExpired { .. })
            ),
            "{body}"
        );
    }
}

#[test]
fn body_over_64_kib_is_refused() {
    let padding = "x".repeat(MAX_BODY_BYTES);
    let body = format!(r#"{{"accessToken":"t","pad":"{padding}"}}"#);
    assert_eq!(
        parse_auth_body(body.as_bytes()).map(|_| ()),
        Err(InvalidResponse::TooLarge {
            limit: MAX_BODY_BYTES
        })
    );
}

#[test]
fn lifetime_counts_from_the_moment_the_request_was_sent() {
    // Sent at NOW, answered 3 s later with expireIn 60: 60 s from sending.
    let body = parsed(r#"{"accessToken":"t","expireIn":60}"#);
    let timing = Timing {
        received: at(NOW + 3),
        elapsed: Duration::from_secs(3),
        ..timing()
    };
    let resolved = resolve(&body, timing, Duration::from_secs(300));
    assert_eq!(
        resolved.map(|r| (r.lifetime, r.expire_at)),
        Ok((Duration::from_secs(60), at(NOW + 60)))
    );
}

#[test]
fn date_header_skew_table() {
    // (Klavi's Date minus ours, expireAt relative to Klavi's now, expected
    //  lifetime on our clock, skew reported)
    let cases: Vec<(i64, u64, u64, Option<f64>)> = vec![
        (0, 300, 300, None),
        (5, 300, 305, None),              // within tolerance: taken as is
        (-5, 300, 295, None),             // likewise
        (600, 300, 300, Some(600.0)),     // Klavi 10 min ahead
        (-600, 300, 300, Some(-600.0)),   // Klavi 10 min behind
        (-3600, 300, 300, Some(-3600.0)), // Klavi an hour behind: would look expired
    ];
    for (skew, expire_in_klavi_time, expected, reported) in cases {
        let klavi_now = (NOW as i64 + skew) as u64;
        let body = format!(
            r#"{{"accessToken":"t","expireAt":{}}}"#,
            klavi_now + expire_in_klavi_time
        );
        let timing = Timing {
            date_header: Some(at(klavi_now)),
            ..timing()
        };
        let resolved = resolve(&parsed(&body), timing, Duration::from_secs(300));
        assert_eq!(
            resolved.map(|r| (r.lifetime.as_secs(), r.skew_secs)),
            Ok((expected, reported)),
            "skew {skew}"
        );
    }
}

#[test]
fn skew_also_moves_the_jwt_exp_but_not_relative_expiries() {
    // Klavi 1 h ahead; the JWT says exp = Klavi's now + 100.
    let klavi_now = NOW + 3600;
    let token = jwt(&format!(r#"{{"exp":{}}}"#, klavi_now + 100));
    let body = parsed(&format!(r#"{{"accessToken":"{token}","expireIn":500}}"#));
    let timing = Timing {
        date_header: Some(at(klavi_now)),
        ..timing()
    };
    let resolved = resolve(&body, timing, Duration::from_secs(300));
    assert_eq!(
        resolved.map(|r| (r.lifetime.as_secs(), r.source)),
        Ok((100, "exp"))
    );
}

#[test]
fn a_wall_clock_jump_during_the_request_never_makes_a_token_fresher() {
    // Klavi's clock is right: its Date is NOW + 1 (1 s on the wire) and
    // the token expires 300 s after NOW. Our wall clock jumps by `jump`
    // seconds while the request is in flight.
    // (jump, Date header sent, expected lifetime from sending, or expired)
    let cases: Vec<(i64, bool, Option<u64>)> = vec![
        (0, true, Some(300)),
        (0, false, Some(300)),
        // Forward an hour: the skew is corrected from the Date header;
        // without the receipt-side measure it would look 3900 s long.
        (3600, true, Some(300)),
        // Forward without a Date header: our clock says it expired.
        (3600, false, None),
        // Backward an hour: the send-side measure says expired; safe.
        (-3600, true, None),
        (-3600, false, Some(300)),
        // Small jumps within the skew tolerance: still never longer.
        (4, true, Some(296)),
        (-4, true, Some(300)),
    ];
    let body = format!(r#"{{"accessToken":"t","expireAt":{}}}"#, NOW + 300);
    let parsed = parsed(&body);
    for (jump, with_date, expected) in cases {
        let timing = Timing {
            sent: at(NOW),
            received: shift(at(NOW + 1), jump as f64),
            date_header: with_date.then(|| at(NOW + 1)),
            elapsed: Duration::from_secs(1),
        };
        let got = resolve(&parsed, timing, Duration::from_secs(300))
            .ok()
            .map(|r| r.lifetime.as_secs());
        assert_eq!(got, expected, "jump {jump} date {with_date}");
        assert!(got.is_none_or(|l| l <= 300), "never fresher than it is");
    }
}

#[test]
fn absurd_expiries_are_clamped_not_panics() {
    let body = r#"{"accessToken":"t","expireAt":1e300}"#;
    // 1e300 is milliseconds by the rule, still absurd: clamped to the max.
    assert_eq!(
        lifetime_of(body).map(|(l, _)| l),
        Ok(MAX_LIFETIME.as_secs())
    );
    let body = r#"{"accessToken":"t","expireIn":1e300}"#;
    assert!(lifetime_of(body).is_ok());
}

#[test]
fn jwt_exp_table() {
    let cases: Vec<(String, Option<f64>)> = vec![
        (jwt(r#"{"exp":1752053847}"#), Some(1_752_053_847.0)),
        (jwt(r#"{"exp":1752053847.5}"#), Some(1_752_053_847.5)),
        (
            format!("{}==", jwt(r#"{"exp":7}"#)).replace("==", ""),
            Some(7.0),
        ),
        (jwt(r#"{"exp":"1752053847"}"#), None),
        (jwt(r#"{"iat":1}"#), None),
        (jwt("not json"), None),
        ("a.b".into(), None),
        ("a.b.c.d".into(), None),
        ("opaque-token".into(), None),
        ("a.!!!.c".into(), None),
        (String::new(), None),
    ];
    for (token, expected) in cases {
        assert_eq!(jwt_exp(&token), expected, "{token}");
    }
}
