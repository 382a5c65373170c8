//! One listener type for the server, TCP or a unix socket (issue 13), so
//! connection limits, eviction, the overflow lane and the drain are
//! written once for both.
//!
//! A unix socket's peer is known by its credentials from the kernel
//! (`SO_PEERCRED`: pid, uid, gid), a TCP peer by its address. What to
//! listen on is a [`ListenAddr`] (`127.0.0.1:8089` or `unix:/path`, as
//! configured); [`bind`] makes the listener.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio_util::either::Either;

use super::unix_socket::{self, SocketFile, UnixBindError};

/// Where a listener listens, as configured: a TCP address or a unix
/// socket's path.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ListenAddr {
    /// `IP:PORT`.
    Tcp(SocketAddr),
    /// `unix:/absolute/path`.
    Unix(PathBuf),
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Tcp(addr) => write!(f, "{addr}"),
            Self::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

impl From<SocketAddr> for ListenAddr {
    fn from(addr: SocketAddr) -> Self {
        Self::Tcp(addr)
    }
}

impl std::str::FromStr for ListenAddr {
    type Err = String;

    /// Reads `IP:PORT` or `unix:/path`; the error says what is wrong.
    fn from_str(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let Some(path) = text.strip_prefix("unix:") else {
            return text.parse().map(Self::Tcp).map_err(|_| {
                format!(
                    "{text:?} is not an IP:port address (e.g. 127.0.0.1:8089 or [::1]:8089) nor \
                     unix:/absolute/path"
                )
            });
        };
        let path = Path::new(path);
        if !path.is_absolute() || path.file_name().is_none() {
            return Err(format!(
                "{text:?} must name a socket by its absolute path, for example \
                 unix:/run/klavi/token.sock"
            ));
        }
        let bytes = path.as_os_str().len();
        let directory = path.parent().map_or(0, |dir| dir.as_os_str().len());
        if bytes > unix_socket::MAX_PATH_BYTES
            || directory + unix_socket::TEMPORARY_NAME_BYTES > unix_socket::MAX_PATH_BYTES
        {
            return Err(format!(
                "{text:?} is too long: the kernel limits socket paths to {} bytes, and the \
                 directory may have at most {} (a temporary name is bound beside the socket)",
                unix_socket::MAX_PATH_BYTES,
                unix_socket::MAX_PATH_BYTES - unix_socket::TEMPORARY_NAME_BYTES
            ));
        }
        if path.as_os_str().as_encoded_bytes().contains(&0) {
            return Err(format!("{text:?} contains a NUL byte"));
        }
        Ok(Self::Unix(path.to_path_buf()))
    }
}

impl ListenAddr {
    /// The TCP address, if it is one.
    pub fn tcp(&self) -> Option<SocketAddr> {
        match self {
            Self::Tcp(addr) => Some(*addr),
            Self::Unix(_) => None,
        }
    }

    /// Whether only this machine's processes can reach it: loopback, or
    /// any unix socket.
    pub fn is_local(&self) -> bool {
        match self {
            Self::Tcp(addr) => addr.ip().is_loopback(),
            Self::Unix(_) => true,
        }
    }
}

/// A connection's byte stream, whichever kind of listener accepted it.
pub type Stream = Either<TcpStream, UnixStream>;

/// What listens: a TCP socket or a unix socket.
#[derive(Debug)]
pub enum Listener {
    /// A TCP listener (loopback, or the ops port).
    Tcp(TcpListener),
    /// A unix socket listener, and the file it removes when dropped (none
    /// when the caller bound it itself).
    Unix(UnixListener, Option<SocketFile>),
}

/// Who connected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peer {
    /// A TCP client, by address.
    Tcp(SocketAddr),
    /// A unix-socket client, by its credentials (the pid is unknown on
    /// some kernels).
    Unix {
        /// Process id, when the kernel says.
        pid: Option<i32>,
        /// User id.
        uid: u32,
        /// Group id.
        gid: u32,
    },
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Tcp(addr) => write!(f, "{addr}"),
            Self::Unix { pid, uid, gid } => match pid {
                // No spaces and no `=`: it is one field's value in a log line.
                Some(pid) => write!(f, "pid:{pid},uid:{uid},gid:{gid}"),
                None => write!(f, "pid:?,uid:{uid},gid:{gid}"),
            },
        }
    }
}

impl From<TcpListener> for Listener {
    fn from(listener: TcpListener) -> Self {
        Self::Tcp(listener)
    }
}

impl From<UnixListener> for Listener {
    fn from(listener: UnixListener) -> Self {
        Self::Unix(listener, None)
    }
}

impl Listener {
    /// The next connection and who made it. TCP streams get `TCP_NODELAY`
    /// (answers are small and must not wait for Nagle).
    pub async fn accept(&self) -> std::io::Result<(Stream, Peer)> {
        match self {
            Self::Tcp(listener) => {
                let (stream, addr) = listener.accept().await?;
                let _ = stream.set_nodelay(true);
                Ok((Either::Left(stream), Peer::Tcp(addr)))
            }
            Self::Unix(listener, _) => {
                let (stream, _) = listener.accept().await?;
                let peer = match stream.peer_cred() {
                    Ok(cred) => Peer::Unix {
                        pid: cred.pid(),
                        uid: cred.uid(),
                        gid: cred.gid(),
                    },
                    Err(_) => Peer::Unix {
                        pid: None,
                        uid: u32::MAX,
                        gid: u32::MAX,
                    },
                };
                Ok((Either::Right(stream), peer))
            }
        }
    }
}

/// Pending connections the kernel may queue (it caps this at
/// `net.core.somaxconn`): a cold-start burst waits here, not in SYN retries.
const BACKLOG: u32 = 4096;

/// Binds `addr` for the listener configured by `key`; returns the listener
/// and the address it got (port 0 picks one). TCP sockets get address
/// reuse (a restarted sidecar rebinds at once) and a deep backlog; unix
/// sockets get `socket_mode` and replace a stale socket
/// ([`unix_socket::bind`]).
pub async fn bind(
    key: &str,
    addr: &ListenAddr,
    socket_mode: u32,
) -> Result<(Listener, ListenAddr), BindError> {
    match addr {
        ListenAddr::Tcp(tcp) => {
            let error = |source| BindError::Tcp {
                key: key.to_string(),
                addr: *tcp,
                source,
            };
            let socket = if tcp.is_ipv4() {
                tokio::net::TcpSocket::new_v4()
            } else {
                tokio::net::TcpSocket::new_v6()
            }
            .map_err(error)?;
            socket.set_reuseaddr(true).map_err(error)?;
            socket.bind(*tcp).map_err(error)?;
            let listener = socket.listen(BACKLOG).map_err(error)?;
            let bound = listener.local_addr().map_err(error)?;
            Ok((Listener::Tcp(listener), ListenAddr::Tcp(bound)))
        }
        ListenAddr::Unix(path) => {
            let (listener, file) =
                unix_socket::bind(path, socket_mode)
                    .await
                    .map_err(|source| BindError::Unix {
                        key: key.to_string(),
                        source,
                    })?;
            Ok((Listener::Unix(listener, Some(file)), addr.clone()))
        }
    }
}

/// A listener could not be bound.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    /// A TCP port is taken or not allowed.
    #[error("cannot listen on {addr} ({key}): {source}")]
    Tcp {
        /// The configuration key of the address.
        key: String,
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// A unix socket could not be created.
    #[error("cannot listen on unix socket ({key}): {source}")]
    Unix {
        /// The configuration key of the address.
        key: String,
        /// Why.
        source: UnixBindError,
    },
}

impl BindError {
    /// The key and what is wrong, when the configuration itself is at
    /// fault (something that is not a socket sits at a socket's path).
    pub fn misconfigured(&self) -> Option<(&str, String)> {
        match self {
            Self::Unix {
                key,
                source: source @ UnixBindError::NotASocket(_),
            } => Some((key, source.to_string())),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn both_kinds_accept_and_name_their_peer() {
        let tcp = Listener::from(TcpListener::bind("127.0.0.1:0").await.unwrap());
        let Listener::Tcp(inner) = &tcp else {
            unreachable!()
        };
        let addr = inner.local_addr().unwrap();
        let mut client = TcpStream::connect(addr).await.unwrap();
        let (mut stream, peer) = tcp.accept().await.unwrap();
        assert_eq!(peer, Peer::Tcp(client.local_addr().unwrap()));
        client.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        stream.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ping");

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sidecar.sock");
        let unix = Listener::from(UnixListener::bind(&path).unwrap());
        let mut client = UnixStream::connect(&path).await.unwrap();
        let (mut stream, peer) = unix.accept().await.unwrap();
        // This very process is the peer.
        let me = std::process::id() as i32;
        match peer {
            Peer::Unix { pid, .. } => assert_eq!(pid, Some(me)),
            other => panic!("{other:?}"),
        }
        assert!(peer.to_string().starts_with(&format!("pid:{me},uid:")));
        client.write_all(b"pong").await.unwrap();
        stream.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"pong");
    }

    /// The server runs on a unix socket as on TCP: requests answered, a
    /// slow-header client cut at the header timeout, a bounded drain.
    #[tokio::test]
    async fn the_server_serves_a_unix_socket() {
        use std::time::Duration;

        use axum::Router;
        use axum::routing::get;
        use tokio_util::sync::CancellationToken;

        use crate::serve::server::{self, Limits};

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sidecar.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let router = Router::new().route("/healthz", get(|| async { "ok" }));
        let limits = Limits {
            header_read_timeout: Duration::from_millis(300),
            ..Limits::default()
        };
        let stop = CancellationToken::new();
        let served = tokio::spawn(server::serve(
            "test",
            listener,
            router,
            None,
            limits,
            stop.clone(),
            Duration::from_secs(2),
        ));
        let mut client = UnixStream::connect(&path).await.unwrap();
        client
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut answer = String::new();
        client.read_to_string(&mut answer).await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(answer.ends_with("ok"), "{answer}");
        // A client that never finishes its headers is closed.
        let mut slow = UnixStream::connect(&path).await.unwrap();
        slow.write_all(b"GET /healthz HTTP/1.1\r\nHo")
            .await
            .unwrap();
        let mut rest = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), slow.read_to_end(&mut rest)).await;
        assert!(read.is_ok(), "closed at the header timeout");
        stop.cancel();
        tokio::time::timeout(Duration::from_secs(5), served)
            .await
            .unwrap()
            .unwrap();
    }
}
