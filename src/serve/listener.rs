//! One listener type for the server, TCP or a unix socket (issue 13), so
//! connection limits, eviction, the overflow lane and the drain are
//! written once for both.
//!
//! A unix socket's peer is known by its credentials from the kernel
//! (`SO_PEERCRED`: pid, uid, gid), a TCP peer by its address. Binding a
//! unix socket from the configuration (`unix:/path`, `server.socket_mode`,
//! stale sockets) comes next; this is the type the server runs on.

use std::fmt;
use std::net::SocketAddr;

use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio_util::either::Either;

/// A connection's byte stream, whichever kind of listener accepted it.
pub type Stream = Either<TcpStream, UnixStream>;

/// What listens: a TCP socket or a unix socket.
#[derive(Debug)]
pub enum Listener {
    /// A TCP listener (loopback, or the ops port).
    Tcp(TcpListener),
    /// A unix socket listener.
    Unix(UnixListener),
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
                Some(pid) => write!(f, "pid={pid} uid={uid} gid={gid}"),
                None => write!(f, "pid=? uid={uid} gid={gid}"),
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
        Self::Unix(listener)
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
            Self::Unix(listener) => {
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
        assert!(peer.to_string().starts_with(&format!("pid={me} uid=")));
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
