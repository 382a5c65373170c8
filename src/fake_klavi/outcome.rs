//! What the fake answers: scripted outcomes, and their names for
//! `fake-klavi --faults`.

use std::time::Duration;

/// What to answer.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    /// A new token (if the keys match; else 401). `ttl` overrides the
    /// configured lifetime.
    Token {
        /// Lifetime, or the configured one.
        ttl: Option<Duration>,
    },
    /// The token issued last, with its original expiry.
    SameToken,
    /// An error status, with an optional `Retry-After` value.
    Status {
        /// The HTTP status.
        status: u16,
        /// `Retry-After`, verbatim.
        retry_after: Option<String>,
    },
    /// A raw body with this status (`application/json` content type).
    Raw {
        /// The HTTP status.
        status: u16,
        /// The body.
        body: Vec<u8>,
    },
    /// Never answer (until the fake stops).
    Hang,
    /// Close the connection without answering.
    Reset,
}

/// One scripted answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// What to answer.
    pub reply: Reply,
    /// Wait this long first.
    pub delay: Duration,
    /// Send a `Date` header this many seconds off the real clock.
    pub date_skew_secs: i64,
}

impl Outcome {
    /// A token of the configured lifetime.
    pub fn token() -> Self {
        Self::from(Reply::Token { ttl: None })
    }

    /// A token of this lifetime.
    pub fn token_ttl(ttl: Duration) -> Self {
        Self::from(Reply::Token { ttl: Some(ttl) })
    }

    /// An error status.
    pub fn status(status: u16) -> Self {
        Self::from(Reply::Status {
            status,
            retry_after: None,
        })
    }

    /// An error status with `Retry-After`.
    pub fn status_retry_after(status: u16, retry_after: &str) -> Self {
        Self::from(Reply::Status {
            status,
            retry_after: Some(retry_after.into()),
        })
    }

    /// A raw 200 body.
    pub fn body(body: impl Into<Vec<u8>>) -> Self {
        Self::from(Reply::Raw {
            status: 200,
            body: body.into(),
        })
    }

    /// The same answer after `delay`.
    pub fn after(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }

    /// The same answer from a Klavi whose clock is `secs` off: its `Date`
    /// header and the expiry of any token it issues.
    pub fn skewed(mut self, secs: i64) -> Self {
        self.date_skew_secs = secs;
        self
    }

    /// A 2xx body larger than the sidecar accepts (100 KiB).
    pub fn huge_body() -> Self {
        let padding = "x".repeat(100 * 1024);
        Self::body(format!(
            r#"{{"accessToken":"t","expireIn":300,"padding":"{padding}"}}"#
        ))
    }
}

/// An outcome that cannot be read from text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown fault {0:?}; expected one of: ok, ttl:SECS, same, expired, status:CODE[:RETRY_AFTER], delay:MS, hang, reset, garbage, empty-token, huge, skew:SECS"
)]
pub struct UnknownFault(pub String);

/// Outcomes by name, for `fake-klavi --faults` and test scripts:
/// `ok`, `ttl:SECS` (a token of that lifetime), `same` (the last token
/// again), `expired` (a token already expired), `status:CODE[:RETRY_AFTER]`,
/// `delay:MS` (a token, late), `hang`, `reset`, `garbage` (not JSON),
/// `empty-token`, `huge` (a 100 KiB body), `skew:SECS` (a token from a
/// clock that far off).
impl std::str::FromStr for Outcome {
    type Err = UnknownFault;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let unknown = || UnknownFault(text.to_string());
        let mut parts = text.trim().split(':');
        let name = parts.next().unwrap_or_default();
        let arg = parts.next();
        let extra = parts.next();
        let takes_arg = matches!(name, "ttl" | "status" | "delay" | "skew");
        if arg.is_some() != takes_arg || (extra.is_some() && name != "status") {
            return Err(unknown());
        }
        let number =
            |arg: Option<&str>| arg.and_then(|a| a.parse::<u64>().ok()).ok_or_else(unknown);
        let outcome = match name {
            "ok" | "token" => Self::token(),
            "ttl" => Self::token_ttl(Duration::from_secs(number(arg)?)),
            "same" => Self::from(Reply::SameToken),
            "expired" => Self::token_ttl(Duration::ZERO),
            "status" => {
                let status = number(arg)?;
                if !(100..=599).contains(&status) {
                    return Err(unknown());
                }
                match extra {
                    Some(after) => Self::status_retry_after(status as u16, after),
                    None => Self::status(status as u16),
                }
            }
            "delay" => Self::token().after(Duration::from_millis(number(arg)?)),
            "hang" => Self::from(Reply::Hang),
            "reset" => Self::from(Reply::Reset),
            "garbage" => Self::body("<html><body>502 Bad Gateway</body></html>"),
            "empty-token" => Self::body(r#"{"accessToken":"","expireIn":300}"#),
            "huge" => Self::huge_body(),
            "skew" => {
                let secs = arg
                    .and_then(|a| a.parse::<i64>().ok())
                    .ok_or_else(unknown)?;
                Self::token().skewed(secs)
            }
            _ => return Err(unknown()),
        };
        Ok(outcome)
    }
}

impl From<Reply> for Outcome {
    fn from(reply: Reply) -> Self {
        Self {
            reply,
            delay: Duration::ZERO,
            date_skew_secs: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faults_by_name() {
        let s = Duration::from_secs;
        let cases: Vec<(&str, Outcome)> = vec![
            ("ok", Outcome::token()),
            ("ttl:3", Outcome::token_ttl(s(3))),
            ("ttl:31536000", Outcome::token_ttl(s(31_536_000))),
            ("same", Outcome::from(Reply::SameToken)),
            ("expired", Outcome::token_ttl(Duration::ZERO)),
            ("status:503", Outcome::status(503)),
            ("status:429:7", Outcome::status_retry_after(429, "7")),
            (
                "delay:1500",
                Outcome::token().after(Duration::from_millis(1500)),
            ),
            ("hang", Outcome::from(Reply::Hang)),
            ("reset", Outcome::from(Reply::Reset)),
            ("huge", Outcome::huge_body()),
            ("skew:-3600", Outcome::token().skewed(-3600)),
        ];
        for (name, expected) in cases {
            assert_eq!(name.parse::<Outcome>(), Ok(expected), "{name}");
        }
        assert!(matches!(
            "garbage".parse::<Outcome>().map(|o| o.reply),
            Ok(Reply::Raw { status: 200, .. })
        ));
        for bad in [
            "",
            "nope",
            "status",
            "status:abc",
            "status:99",
            "ttl",
            "ttl:-1",
            "hang:1",
            "skew:x",
            "ok:1",
        ] {
            assert!(bad.parse::<Outcome>().is_err(), "{bad}");
        }
    }
}
