//! The headers the proxy forwards, each way (SPEC §4.3).
//!
//! Hop-by-hop headers belong to one connection and are never forwarded:
//! `Connection` and every header it names, `Keep-Alive`,
//! `Proxy-Connection`, `TE`, `Trailer`, `Transfer-Encoding`, `Upgrade`,
//! `Proxy-Authorization` (RFC 9110 §7.6.1). Towards Klavi, `Host` is
//! Klavi's, `Authorization` is the sidecar's token (an app's own is
//! replaced) and `Klavi-Sidecar` (the guard's header) is removed; towards
//! the app, the response says which token was used by its fingerprint.
//! Everything else passes unchanged, values and order.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

use crate::serve::http::REQUIRED_HEADER;

/// The token's fingerprint on every proxied response.
pub const TOKEN_FINGERPRINT: HeaderName = HeaderName::from_static("klavi-sidecar-token");

/// What marks an answer as the sidecar's own, not Klavi's: its error code.
pub const SIDECAR_ERROR: HeaderName = HeaderName::from_static("klavi-sidecar-error");

/// Hop-by-hop headers besides those `Connection` names.
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHORIZATION,
];

/// Drops the hop-by-hop headers from `headers`, in place.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in HOP_BY_HOP.iter().chain(&named) {
        headers.remove(name);
    }
}

/// The headers of a request forwarded to Klavi at `host`, carrying
/// `bearer` (`Bearer <token>`).
///
/// `Expect: 100-continue` is dropped too: the sidecar has already read
/// the body (it answered the expectation itself), and sends it whole.
pub fn to_klavi(app: &HeaderMap, host: HeaderValue, bearer: HeaderValue) -> HeaderMap {
    // A copy: the app's headers are kept for a replay.
    let mut headers = app.clone();
    strip_hop_by_hop(&mut headers);
    headers.remove(REQUIRED_HEADER);
    headers.remove(header::EXPECT);
    headers.insert(header::HOST, host);
    headers.insert(header::AUTHORIZATION, bearer);
    headers
}

/// The headers of Klavi's response passed to the app, with the token's
/// `fingerprint`. The sidecar's own headers are its to set: a
/// `Klavi-Sidecar-Error` from upstream would make Klavi's answer look like
/// the sidecar's, so it is dropped.
///
/// A `Content-Length` beside `Transfer-Encoding` is dropped too (RFC 9112
/// §6.3): the chunked body is what counts, and hyper would otherwise frame
/// the de-chunked body by the stale length and cut it.
pub fn to_app(mut headers: HeaderMap, fingerprint: &str) -> HeaderMap {
    if headers.contains_key(header::TRANSFER_ENCODING) {
        headers.remove(header::CONTENT_LENGTH);
    }
    strip_hop_by_hop(&mut headers);
    headers.remove(SIDECAR_ERROR);
    if let Ok(value) = HeaderValue::from_str(fingerprint) {
        headers.insert(TOKEN_FINGERPRINT, value);
    }
    headers
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for (name, value) in pairs {
            headers.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        headers
    }

    /// By name (the order of different names means nothing in HTTP), the
    /// values of each name in their order (which does).
    fn pairs(headers: &HeaderMap) -> Vec<(String, String)> {
        let mut pairs: Vec<(String, String)> = headers
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_str().unwrap().to_string()))
            .collect();
        pairs.sort_by(|a, b| a.0.cmp(&b.0));
        pairs
    }

    fn sorted(expected: &[(&str, &str)]) -> Vec<(String, String)> {
        let mut pairs: Vec<(String, String)> = expected
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect();
        pairs.sort_by(|a, b| a.0.cmp(&b.0));
        pairs
    }

    /// A table of request headers in, forwarded headers out.
    #[test]
    fn request_headers_towards_klavi() {
        let host = HeaderValue::from_static("api.klavi.ai");
        let bearer = HeaderValue::from_static("Bearer t0k3n");
        // (headers the app sent, headers Klavi gets)
        let cases: Vec<(Vec<(&str, &str)>, Vec<(&str, &str)>)> = vec![
            (
                vec![("host", "127.0.0.1:8091"), ("klavi-sidecar", "true")],
                vec![("host", "api.klavi.ai"), ("authorization", "Bearer t0k3n")],
            ),
            // The app's own Authorization is replaced, never forwarded.
            (
                vec![
                    ("authorization", "Bearer stale"),
                    ("content-type", "application/json"),
                ],
                vec![
                    ("content-type", "application/json"),
                    ("host", "api.klavi.ai"),
                    ("authorization", "Bearer t0k3n"),
                ],
            ),
            // Hop-by-hop headers, and those Connection names, stay here.
            (
                vec![
                    ("connection", "keep-alive, X-Trace-Hop"),
                    ("keep-alive", "timeout=5"),
                    ("x-trace-hop", "1"),
                    ("proxy-connection", "keep-alive"),
                    ("te", "trailers"),
                    ("trailer", "x-checksum"),
                    ("transfer-encoding", "chunked"),
                    ("upgrade", "h2c"),
                    ("proxy-authorization", "Basic eA=="),
                    ("expect", "100-continue"),
                    ("x-request-id", "abc"),
                ],
                vec![
                    ("x-request-id", "abc"),
                    ("host", "api.klavi.ai"),
                    ("authorization", "Bearer t0k3n"),
                ],
            ),
            // Everything else passes unchanged: repeated headers in order,
            // values byte for byte, names the sidecar does not know.
            (
                vec![
                    ("accept", "application/json"),
                    ("x-idempotency-key", "pay-42"),
                    ("cookie", "a=1"),
                    ("cookie", "b=2"),
                    ("content-length", "17"),
                ],
                vec![
                    ("accept", "application/json"),
                    ("x-idempotency-key", "pay-42"),
                    ("cookie", "a=1"),
                    ("cookie", "b=2"),
                    ("content-length", "17"),
                    ("host", "api.klavi.ai"),
                    ("authorization", "Bearer t0k3n"),
                ],
            ),
        ];
        for (sent, expected) in cases {
            let forwarded = to_klavi(&map(&sent), host.clone(), bearer.clone());
            assert_eq!(pairs(&forwarded), sorted(&expected), "{sent:?}");
        }
    }

    #[test]
    fn a_length_beside_a_transfer_coding_is_dropped() {
        let klavi = map(&[
            ("content-length", "1"),
            ("transfer-encoding", "chunked"),
            ("content-type", "text/plain"),
        ]);
        assert_eq!(
            pairs(&to_app(klavi, "ba7816bf")),
            sorted(&[
                ("content-type", "text/plain"),
                ("klavi-sidecar-token", "ba7816bf"),
            ])
        );
        let plain = map(&[("content-length", "5")]);
        assert_eq!(
            pairs(&to_app(plain, "ba7816bf")),
            sorted(&[("content-length", "5"), ("klavi-sidecar-token", "ba7816bf")])
        );
    }

    #[test]
    fn response_headers_towards_the_app() {
        let klavi = map(&[
            ("content-type", "application/json"),
            ("connection", "close"),
            ("transfer-encoding", "chunked"),
            ("x-request-id", "r-1"),
            ("set-cookie", "a=1"),
            ("set-cookie", "b=2"),
            ("klavi-sidecar-error", "upstream_timeout"),
            ("klavi-sidecar-token", "00000000"),
        ]);
        assert_eq!(
            pairs(&to_app(klavi, "ba7816bf")),
            sorted(&[
                ("content-type", "application/json"),
                ("x-request-id", "r-1"),
                ("set-cookie", "a=1"),
                ("set-cookie", "b=2"),
                ("klavi-sidecar-token", "ba7816bf"),
            ])
        );
    }
}
