//! The token routes' guard against SSRF, browsers and DNS rebinding.
//!
//! An app that can be tricked into fetching a URL (SSRF) or a web page
//! that makes the browser call `localhost` cannot add a custom header, and
//! a request that passed through a proxy is not from an app in this pod. A
//! page on a rebinding domain (one that resolves to 127.0.0.1) is
//! same-origin with the sidecar and could add the header, but its `Host`
//! is its own domain: only loopback names and `server.allowed_hosts` pass.
//! Every token response is also marked `Cache-Control: no-store`.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http::{HeaderMap, HeaderName, HeaderValue, Uri, header};

use super::ApiError;

/// The header token requests must carry, with the value `true`.
pub const REQUIRED_HEADER: HeaderName = HeaderName::from_static("klavi-sidecar");
/// A header proxies add: its presence refuses the request.
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

/// What a token request must satisfy (`server.require_header`,
/// `server.allowed_hosts`).
#[derive(Debug, Clone)]
pub struct Guard {
    /// Demand `Klavi-Sidecar: true`.
    pub require_header: bool,
    /// Host names accepted besides loopback ones, lower case, no port.
    pub allowed_hosts: Arc<[String]>,
    /// Check `Host` at all: not on a unix socket, which no browser page
    /// can reach by a rebinding name.
    pub check_host: bool,
}

impl Default for Guard {
    fn default() -> Self {
        Self {
            require_header: true,
            allowed_hosts: Arc::from([]),
            check_host: true,
        }
    }
}

impl Guard {
    /// This guard as it applies on `listener`: without the `Host` check
    /// on a unix socket.
    pub fn for_listener(&self, listener: &crate::serve::listener::Listener) -> Self {
        let unix = matches!(listener, crate::serve::listener::Listener::Unix(..));
        Self {
            check_host: self.check_host && !unix,
            ..self.clone()
        }
    }

    /// Why a token (or proxied) request is refused, if it is.
    pub fn refusal(
        &self,
        version: http::Version,
        uri: &Uri,
        headers: &HeaderMap,
    ) -> Option<ApiError> {
        if headers.contains_key(X_FORWARDED_FOR) || headers.contains_key(header::FORWARDED) {
            return Some(ApiError::ProxiedRequest);
        }
        if self.check_host && !self.host_allowed(version, uri, headers) {
            return Some(ApiError::HostNotAllowed);
        }
        if self.require_header
            && !headers
                .get(REQUIRED_HEADER)
                .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"true"))
        {
            return Some(ApiError::MissingHeader);
        }
        None
    }

    /// Whether a token request passes the guard.
    pub fn passes<B>(&self, request: &http::Request<B>) -> bool {
        self.refusal(request.version(), request.uri(), request.headers())
            .is_none()
    }

    /// Every host the request names (the `Host` headers and an
    /// absolute-form target's authority) is loopback or allowed. An
    /// HTTP/1.0 request naming none is not from a browser and passes; an
    /// HTTP/1.1 one must name its host (RFC 9112 §3.2).
    fn host_allowed(&self, version: http::Version, uri: &Uri, headers: &HeaderMap) -> bool {
        let named = headers
            .get_all(header::HOST)
            .iter()
            .map(HeaderValue::as_bytes)
            .chain(uri.authority().map(|a| a.as_str().as_bytes()));
        let mut any = false;
        for authority in named {
            any = true;
            match host_of(authority) {
                Some(host) if is_loopback_name(host) || self.is_allowed(host) => {}
                _ => return false,
            }
        }
        any || version < http::Version::HTTP_11
    }

    fn is_allowed(&self, host: &[u8]) -> bool {
        if self.allowed_hosts.is_empty() {
            return false;
        }
        // IPv6 literals compare by address, whatever their spelling.
        if host.first() == Some(&b'[')
            && let Some(canonical) = std::str::from_utf8(host).ok().and_then(|h| {
                h.strip_prefix('[')?
                    .strip_suffix(']')?
                    .parse::<Ipv6Addr>()
                    .ok()
            })
        {
            let canonical = format!("[{canonical}]");
            return self.allowed_hosts.contains(&canonical);
        }
        self.allowed_hosts
            .iter()
            .any(|allowed| allowed.as_bytes().eq_ignore_ascii_case(host))
    }
}

/// The host of a `Host` value (`name`, `name:port`, `[v6]`, `[v6]:port`),
/// brackets kept for IPv6; `None` when it is malformed.
fn host_of(authority: &[u8]) -> Option<&[u8]> {
    let (host, rest) = if authority.first() == Some(&b'[') {
        let end = authority.iter().position(|b| *b == b']')?;
        authority.split_at(end + 1)
    } else {
        let end = authority
            .iter()
            .position(|b| *b == b':')
            .unwrap_or(authority.len());
        authority.split_at(end)
    };
    let port_ok = match rest {
        [] => true,
        [b':', port @ ..] => port.iter().all(u8::is_ascii_digit),
        _ => false,
    };
    (!host.is_empty() && port_ok).then_some(host)
}

/// `localhost`, an IPv4 loopback address (127.0.0.0/8) or `[::1]`.
fn is_loopback_name(host: &[u8]) -> bool {
    if host.eq_ignore_ascii_case(b"localhost") {
        return true;
    }
    let Ok(text) = std::str::from_utf8(host) else {
        return false;
    };
    if let Some(v6) = text.strip_prefix('[').and_then(|t| t.strip_suffix(']')) {
        return v6.parse::<Ipv6Addr>().is_ok_and(|ip| ip.is_loopback());
    }
    text.parse::<Ipv4Addr>().is_ok_and(|ip| ip.is_loopback())
}

/// Marks an answer as not cacheable.
pub fn no_store(response: &mut Response) {
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
}

/// Checks the request, then marks the answer as not cacheable.
pub async fn token_route_guard(
    State(guard): State<Guard>,
    request: Request,
    next: Next,
) -> Response {
    let refused = guard.refusal(request.version(), request.uri(), request.headers());
    let mut response = match refused {
        Some(error) => error.into_response(),
        None => next.run(request).await,
    };
    no_store(&mut response);
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_table() {
        let guard = Guard {
            require_header: false,
            allowed_hosts: Arc::from(["sidecar.internal".to_string(), "[fd00::1]".to_string()]),
            check_host: true,
        };
        // (Host headers, target, passes)
        let cases: Vec<(Vec<&str>, &str, bool)> = vec![
            (vec![], "/token", true),
            (vec!["localhost"], "/token", true),
            (vec!["LocalHost:8089"], "/token", true),
            (vec!["127.0.0.1:8089"], "/token", true),
            (vec!["127.1.2.3"], "/token", true),
            (vec!["[::1]:8089"], "/token", true),
            (vec!["[::1]"], "/token", true),
            (vec!["sidecar.internal:80"], "/token", true),
            (vec!["SIDECAR.internal"], "/token", true),
            // DNS rebinding: the attacker's own name.
            (vec!["evil.example:8089"], "/token", false),
            (vec!["evil.example"], "/token", false),
            (vec!["localhost.evil.example"], "/token", false),
            (vec!["127.0.0.1.nip.io"], "/token", false),
            (vec!["sidecar.internal.evil"], "/token", false),
            (vec!["10.0.0.5:8089"], "/token", false),
            (vec!["[::2]:8089"], "/token", false),
            // Malformed or smuggled.
            (vec![""], "/token", false),
            (vec![":8089"], "/token", false),
            (vec!["localhost:80x"], "/token", false),
            (vec!["localhost:8089:1"], "/token", false),
            (vec!["[::1"], "/token", false),
            (vec!["localhost", "evil.example"], "/token", false),
            // An absolute-form target names a host too.
            (vec!["localhost"], "http://evil.example/token", false),
            (vec!["localhost"], "http://127.0.0.1:8089/token", true),
            // IPv6 literals compare by address.
            (vec!["[fd00::1]:8089"], "/token", true),
            (vec!["[fd00:0::1]"], "/token", true),
            (vec!["[FD00:0:0:0:0:0:0:1]"], "/token", true),
            (vec!["[fd00::2]"], "/token", false),
        ];
        for (hosts, target, passes) in cases {
            let mut headers = HeaderMap::new();
            for host in &hosts {
                headers.append(header::HOST, HeaderValue::from_str(host).unwrap());
            }
            let mut request = http::Request::get(target).body(()).unwrap();
            *request.headers_mut() = headers;
            // Without any Host, an HTTP/1.1 request is refused, an
            // HTTP/1.0 one passes.
            let expected = passes && (!hosts.is_empty() || request.uri().authority().is_some());
            assert_eq!(
                guard.passes(&request),
                expected,
                "Host {hosts:?} target {target}"
            );
            *request.version_mut() = http::Version::HTTP_10;
            assert_eq!(
                guard.passes(&request),
                passes,
                "HTTP/1.0 {hosts:?} {target}"
            );
        }
    }

    #[test]
    fn refusals_in_order() {
        let guard = Guard::default();
        let uri: Uri = "/token".parse().unwrap();
        let refusal = |pairs: &[(&'static str, &'static str)]| {
            let mut headers = HeaderMap::new();
            for (name, value) in pairs {
                headers.append(*name, HeaderValue::from_static(value));
            }
            guard.refusal(http::Version::HTTP_11, &uri, &headers)
        };
        assert_eq!(
            refusal(&[("host", "localhost")]),
            Some(ApiError::MissingHeader)
        );
        assert_eq!(
            refusal(&[("klavi-sidecar", "TRUE"), ("host", "localhost")]),
            None
        );
        assert_eq!(
            refusal(&[("klavi-sidecar", "true")]),
            Some(ApiError::HostNotAllowed)
        );
        assert_eq!(
            refusal(&[("klavi-sidecar", "true"), ("host", "evil.example")]),
            Some(ApiError::HostNotAllowed)
        );
        assert_eq!(
            refusal(&[("klavi-sidecar", "true"), ("forwarded", "for=1.2.3.4")]),
            Some(ApiError::ProxiedRequest)
        );
    }
}
