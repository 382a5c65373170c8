//! Which request targets the proxy forwards, and where to.
//!
//! Only origin-form targets (`/path?query`) are forwarded, to the profile's
//! `base_url` with the path appended: the sidecar only ever contacts its
//! profile's Klavi host, whatever the request names. Absolute-form
//! (`http://other/…`) and authority-form (`CONNECT host:port`) targets
//! would make it a general proxy; they are refused.

use http::{Method, Uri};
use url::Url;

/// Why a request target is not forwarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    /// `CONNECT`: the proxy tunnels nothing (405).
    #[error("CONNECT is not supported: the proxy forwards requests to Klavi only")]
    Connect,
    /// An absolute-form or authority-form target, or `*` (400).
    #[error(
        "the request target must be a path (origin form), e.g. /payment/...; the proxy only forwards to its profile's Klavi"
    )]
    NotOriginForm,
}

/// `host` or `host:port` of `base` (its `Host` header and the upstream
/// URIs' authority); `None` for a URL without a host, which the
/// configuration refuses.
pub fn authority(base: &Url) -> Option<String> {
    let host = base.host_str()?;
    Some(match base.port() {
        Some(port) => format!("{host}:{port}"),
        None => host.to_string(),
    })
}

/// The upstream URI for a request `method uri` under `base`: `base`'s
/// scheme and authority, its path (without a trailing slash) followed by
/// the request's path, and the request's query, byte for byte.
pub fn upstream_uri(base: &Url, method: &Method, uri: &Uri) -> Result<Uri, TargetError> {
    if method == Method::CONNECT {
        return Err(TargetError::Connect);
    }
    if uri.scheme().is_some() || uri.authority().is_some() {
        return Err(TargetError::NotOriginForm);
    }
    let Some(path_and_query) = uri.path_and_query() else {
        return Err(TargetError::NotOriginForm);
    };
    let path = path_and_query.path();
    if !path.starts_with('/') {
        // `*` (OPTIONS *) and anything else that is no path.
        return Err(TargetError::NotOriginForm);
    }
    let prefix = base.path().trim_end_matches('/');
    let query = path_and_query
        .query()
        .map_or_else(String::new, |q| format!("?{q}"));
    let authority = authority(base).ok_or(TargetError::NotOriginForm)?;
    Uri::builder()
        .scheme(base.scheme())
        .authority(authority)
        .path_and_query(format!("{prefix}{path}{query}"))
        .build()
        .map_err(|_| TargetError::NotOriginForm)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_and_the_upstream_uris_they_become() {
        let base = |s: &str| Url::parse(s).unwrap();
        let klavi = base("https://api.klavi.ai");
        let local = base("http://127.0.0.1:8088/");
        let prefixed = base("https://gw.example/klavi/");
        let get = Method::GET;
        // (base, method, request target, upstream URI or error)
        let cases: Vec<(&Url, Method, &str, Result<&str, TargetError>)> = vec![
            (
                &klavi,
                Method::POST,
                "/payment/customer/v1/payments",
                Ok("https://api.klavi.ai/payment/customer/v1/payments"),
            ),
            (
                &klavi,
                get.clone(),
                "/p?a=1&b=%20x&a=2",
                Ok("https://api.klavi.ai/p?a=1&b=%20x&a=2"),
            ),
            (&klavi, get.clone(), "/", Ok("https://api.klavi.ai/")),
            (&local, get.clone(), "/x", Ok("http://127.0.0.1:8088/x")),
            (
                &prefixed,
                get.clone(),
                "/v1/a",
                Ok("https://gw.example/klavi/v1/a"),
            ),
            (
                &klavi,
                get.clone(),
                "/a//b/../c",
                Ok("https://api.klavi.ai/a//b/../c"),
            ),
            (
                &klavi,
                get.clone(),
                "http://evil.example/steal",
                Err(TargetError::NotOriginForm),
            ),
            (
                &klavi,
                get.clone(),
                "https://api.klavi.ai/p",
                Err(TargetError::NotOriginForm),
            ),
            (
                &klavi,
                Method::OPTIONS,
                "*",
                Err(TargetError::NotOriginForm),
            ),
            (
                &klavi,
                Method::CONNECT,
                "evil.example:443",
                Err(TargetError::Connect),
            ),
            (&klavi, Method::CONNECT, "/p", Err(TargetError::Connect)),
        ];
        for (base, method, target, expected) in cases {
            let uri: Uri = target.parse().unwrap();
            let got = upstream_uri(base, &method, &uri).map(|u| u.to_string());
            assert_eq!(got, expected.map(str::to_string), "{method} {target}");
        }
    }
}
