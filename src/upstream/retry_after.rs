//! Reading Klavi's `Retry-After` header (the policy decides what to do with
//! it: [`crate::cache::policy::delay_after_failure`]).

use std::time::{Duration, SystemTime};

/// Reads a `Retry-After` header: delay seconds or an HTTP date.
///
/// `klavi_now` is the time on Klavi's clock when it answered: its `Date`
/// header when it sent one, else the local clock. A date is read against
/// it, so a Klavi clock that is off from ours shifts nothing. Zero, a date
/// that is not in the future, and anything unreadable (negative, fractional,
/// garbage) are `None`: the caller backs off instead.
pub fn parse_retry_after(value: &str, klavi_now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    let after = match value.parse::<u64>() {
        Ok(secs) => Duration::from_secs(secs),
        Err(_) => httpdate::parse_http_date(value)
            .ok()?
            .duration_since(klavi_now)
            .ok()?,
    };
    (!after.is_zero()).then_some(after)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn retry_after_table() {
        let now = UNIX_EPOCH + secs(1_752_053_800);
        let in_ten = httpdate::fmt_http_date(now + secs(10));
        let past = httpdate::fmt_http_date(now - secs(10));
        let same = httpdate::fmt_http_date(now);
        let cases: Vec<(&str, Option<Duration>)> = vec![
            ("7", Some(secs(7))),
            (" 120 ", Some(secs(120))),
            // Zero and past dates say "now": no Retry-After, so the backoff.
            ("0", None),
            ("00", None),
            (&in_ten, Some(secs(10))),
            (&past, None),
            (&same, None),
            ("-1", None),
            ("-0", None),
            ("1.5", None),
            ("soon", None),
            ("", None),
            ("99999999999999999999999", None),
        ];
        for (value, expected) in cases {
            assert_eq!(parse_retry_after(value, now), expected, "{value:?}");
        }
    }

    #[test]
    fn a_retry_after_date_is_read_on_klavis_clock() {
        // Klavi's clock is 60 s behind ours; it asks for 10 s on its clock.
        let local = UNIX_EPOCH + secs(1_752_053_800);
        let klavi = local - secs(60);
        let date = httpdate::fmt_http_date(klavi + secs(10));
        assert_eq!(parse_retry_after(&date, klavi), Some(secs(10)));
        // Read on the local clock, that date would be 50 s in the past.
        assert_eq!(parse_retry_after(&date, local), None);
        // Klavi 60 s ahead: read locally, 70 s; on its own clock, 10 s.
        let klavi = local + secs(60);
        let date = httpdate::fmt_http_date(klavi + secs(10));
        assert_eq!(parse_retry_after(&date, klavi), Some(secs(10)));
    }
}
