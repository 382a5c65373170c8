//! Content negotiation for the token routes: JSON, or the bare token for
//! clients that prefer `text/plain`.

use http::header;

/// Whether the client asked for the bare token: `Accept` gives `text/plain`
/// a higher q-value than `application/json`, or the same one listed first.
///
/// Each type takes the q of the most specific range that matches it
/// (`text/plain` over `text/*` over `*/*`, RFC 9110 §12.5.1); JSON is the
/// default when nothing is said, when both are refused, and on a tie from
/// the same range (`*/*`).
pub fn wants_plain_text(headers: &http::HeaderMap) -> bool {
    let mut plain = Preference::default();
    let mut json = Preference::default();
    let ranges = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','));
    for (index, range) in ranges.enumerate() {
        let mut parts = range.split(';');
        let media = parts.next().unwrap_or("").trim();
        let Some((kind, subtype)) = media.split_once('/') else {
            continue;
        };
        let mut q = 1.0;
        for param in parts {
            if let Some((name, value)) = param.split_once('=')
                && name.trim().eq_ignore_ascii_case("q")
            {
                q = value.trim().parse::<f32>().unwrap_or(-1.0);
            }
        }
        if !(0.0..=1.0).contains(&q) {
            continue; // an unreadable q: the range is ignored
        }
        plain.offer(kind, subtype, "text", "plain", q, index);
        json.offer(kind, subtype, "application", "json", q, index);
    }
    plain.q > 0.0 && (plain.q > json.q || (plain.q == json.q && plain.index < json.index))
}

/// How much an `Accept` header wants one media type: the q of its most
/// specific matching range, and where that range stands.
#[derive(Debug, Clone, Copy)]
struct Preference {
    /// 0 exact, 1 `type/*`, 2 `*/*`, 3 no match.
    specificity: u8,
    q: f32,
    index: usize,
}

impl Default for Preference {
    fn default() -> Self {
        Self {
            specificity: 3,
            q: 0.0,
            index: usize::MAX,
        }
    }
}

impl Preference {
    fn offer(
        &mut self,
        kind: &str,
        subtype: &str,
        want: &str,
        want_sub: &str,
        q: f32,
        index: usize,
    ) {
        let specificity = match (kind.trim(), subtype.trim()) {
            (k, s) if k.eq_ignore_ascii_case(want) && s.eq_ignore_ascii_case(want_sub) => 0,
            (k, "*") if k.eq_ignore_ascii_case(want) => 1,
            ("*", "*") => 2,
            _ => return,
        };
        if specificity < self.specificity {
            *self = Self {
                specificity,
                q,
                index,
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_table() {
        let cases = [
            (None, false),
            (Some("application/json"), false),
            (Some("text/plain"), true),
            (Some("TEXT/PLAIN; charset=utf-8"), true),
            (Some("text/html, text/plain;q=0.9"), true),
            (Some("application/json, text/plain"), false),
            (Some("text/plain, application/json"), true),
            (Some("*/*"), false),
            // q-values decide before order.
            (Some("text/plain;q=0, application/json"), false),
            (Some("text/plain; q=0.0, */*"), false),
            (Some("application/json;q=0.5, text/plain"), true),
            (Some("application/json, text/plain;q=0.9"), false),
            (Some("text/plain;q=0.9, application/json;q=0.8"), true),
            (Some("text/plain;q=0.5, */*"), false),
            (Some("*/*;q=0.1, text/plain"), true),
            // The most specific range wins: text/plain refused although
            // text/* is welcome.
            (Some("text/*, text/plain;q=0"), false),
            (Some("text/*"), true),
            (Some("text/*;q=0.5, application/*;q=0.4"), true),
            (Some("application/*"), false),
            // Both refused, garbage, odd spacing: JSON.
            (Some("text/plain;q=0, application/json;q=0"), false),
            (Some("text/plain;q=abc"), false),
            (Some("text/plain;q=2"), false),
            (Some("nonsense, ,;"), false),
            (Some(" text/plain ; q=1 "), true),
        ];
        for (accept, plain) in cases {
            let mut builder = http::Request::builder().uri("/token");
            if let Some(accept) = accept {
                builder = builder.header(header::ACCEPT, accept);
            }
            let request = builder.body(axum::body::Body::empty()).unwrap();
            assert_eq!(wants_plain_text(request.headers()), plain, "{accept:?}");
        }
    }
}
