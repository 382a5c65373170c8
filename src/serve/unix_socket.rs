//! Creating a unix socket at a configured path (SPEC §4.4): with its mode
//! from the start, replacing only a stale socket, removed on exit.
//!
//! The socket is bound under a temporary name beside the target, given
//! `server.socket_mode`, then renamed over the target: a client never
//! finds the socket with the umask's permissions, and a stale socket is
//! replaced in one step. What is at the path decides first:
//! - nothing: bind;
//! - a socket that refuses connections (its process died): replace it;
//! - a socket someone answers on: refuse (another sidecar runs there);
//! - anything else (a file, a directory): refuse and touch nothing.
//!
//! [`SocketFile`] removes the path when the listener is dropped, but only
//! if it is still this socket (same device and inode), so a sidecar that
//! replaced ours is not unlinked by our exit. Blocking calls: they run
//! once at start.

use std::fs;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// The kernel's limit on a socket path (`sun_path` holds 108 bytes with
/// the terminating NUL).
pub const MAX_PATH_BYTES: usize = 107;

/// Bytes the temporary name adds to the socket's directory:
/// `/.sidecar-`, up to 10 digits of the pid, `-` and 8 random hex digits
/// (in containers every sidecar may be pid 1).
pub const TEMPORARY_NAME_BYTES: usize = 29;

/// Why a unix socket could not be created.
#[derive(Debug, thiserror::Error)]
pub enum UnixBindError {
    /// Something that is not a socket is at the path.
    #[error("{0} exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    /// A live socket is at the path.
    #[error("another process is listening on {0}")]
    InUse(PathBuf),
    /// The system refused (missing directory, permissions…).
    #[error("{path}: {source}")]
    Io {
        /// The socket's path.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
}

/// The socket file, removed when dropped if it is still ours.
#[derive(Debug)]
pub struct SocketFile {
    path: PathBuf,
    identity: (u64, u64),
}

impl SocketFile {
    /// Where it is.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        let ours = fs::symlink_metadata(&self.path)
            .is_ok_and(|meta| (meta.dev(), meta.ino()) == self.identity);
        if ours {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// Binds a unix socket at `path` with permissions `mode` (e.g. `0o660`),
/// replacing a stale socket there; call it inside a tokio runtime.
pub async fn bind(
    path: &Path,
    mode: u32,
) -> Result<(tokio::net::UnixListener, SocketFile), UnixBindError> {
    let io_error = |source| UnixBindError::Io {
        path: path.to_path_buf(),
        source,
    };
    check_occupant(path).await?;
    let temporary = temporary_beside(path);
    let listener = std::os::unix::net::UnixListener::bind(&temporary).map_err(io_error)?;
    let placed = fs::set_permissions(&temporary, fs::Permissions::from_mode(mode))
        .and_then(|()| fs::rename(&temporary, path));
    if let Err(error) = placed {
        let _ = fs::remove_file(&temporary);
        return Err(io_error(error));
    }
    let meta = fs::symlink_metadata(path).map_err(io_error)?;
    let file = SocketFile {
        path: path.to_path_buf(),
        identity: (meta.dev(), meta.ino()),
    };
    listener.set_nonblocking(true).map_err(io_error)?;
    let listener = tokio::net::UnixListener::from_std(listener).map_err(io_error)?;
    Ok((listener, file))
}

/// Whether the path is free to take: nothing there, or a stale socket.
async fn check_occupant(path: &Path) -> Result<(), UnixBindError> {
    let meta = match fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(UnixBindError::Io {
                path: path.to_path_buf(),
                source,
            });
        }
    };
    if !meta.file_type().is_socket() {
        return Err(UnixBindError::NotASocket(path.to_path_buf()));
    }
    // Non-blocking, and bounded: a live process that does not accept (its
    // backlog full, stopped) must not hang the start.
    let probe = tokio::time::timeout(
        std::time::Duration::from_secs(1),
        tokio::net::UnixStream::connect(path),
    )
    .await;
    match probe {
        Ok(Ok(_)) | Err(_) => Err(UnixBindError::InUse(path.to_path_buf())),
        // A full backlog: someone listens.
        Ok(Err(error)) if error.kind() == io::ErrorKind::WouldBlock => {
            Err(UnixBindError::InUse(path.to_path_buf()))
        }
        // No one listens: a socket left by a process that died.
        Ok(Err(error)) if error.kind() == io::ErrorKind::ConnectionRefused => Ok(()),
        Ok(Err(source)) => Err(UnixBindError::Io {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// `DIR/.sidecar-PID-RANDOM` for `DIR/NAME`: short, since socket paths
/// are, and apart from any other sidecar's.
fn temporary_beside(path: &Path) -> PathBuf {
    path.with_file_name(format!(
        ".sidecar-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode_of(path: &Path) -> u32 {
        fs::symlink_metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[tokio::test]
    async fn created_with_its_mode_and_removed_when_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token.sock");
        for mode in [0o600, 0o660, 0o666] {
            let (listener, file) = bind(&path, mode).await.unwrap();
            assert_eq!(mode_of(&path), mode);
            assert_eq!(file.path(), path);
            let _client = tokio::net::UnixStream::connect(&path).await.unwrap();
            drop(listener);
            drop(file);
            assert!(!path.exists(), "removed on exit");
        }
        let names: Vec<_> = fs::read_dir(dir.path()).unwrap().collect();
        assert!(names.is_empty(), "no temporary left: {names:?}");
    }

    #[tokio::test]
    async fn a_stale_socket_is_replaced_a_live_one_and_other_files_are_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token.sock");
        // Stale: bound, then its listener gone without removing the file.
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        assert!(path.exists());
        let (listener, file) = bind(&path, 0o660).await.unwrap();
        assert_eq!(mode_of(&path), 0o660);

        // Live: the socket above answers.
        match bind(&path, 0o660).await {
            Err(UnixBindError::InUse(p)) => assert_eq!(p, path),
            other => panic!("{other:?}"),
        }
        assert!(path.exists(), "the live socket stays");
        drop((listener, file));

        // A regular file, a directory, a symlink: left alone.
        let plain = dir.path().join("plain");
        fs::write(&plain, b"keep me").unwrap();
        let directory = dir.path().join("directory");
        fs::create_dir(&directory).unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&plain, &link).unwrap();
        for occupied in [&plain, &directory, &link] {
            match bind(occupied, 0o660).await {
                Err(UnixBindError::NotASocket(p)) => assert_eq!(&p, occupied),
                other => panic!("{occupied:?}: {other:?}"),
            }
        }
        assert_eq!(fs::read(&plain).unwrap(), b"keep me");
        assert!(directory.is_dir());
    }

    #[tokio::test]
    async fn a_missing_directory_is_an_error_and_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("missing").join("token.sock");
        match bind(&path, 0o660).await {
            Err(UnixBindError::Io { path: p, source }) => {
                assert_eq!(p, path);
                assert_eq!(source.kind(), io::ErrorKind::NotFound);
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn a_socket_that_replaced_ours_is_not_removed_by_our_exit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token.sock");
        let (listener, file) = bind(&path, 0o660).await.unwrap();
        // Another process took the path over (removed ours, bound anew).
        fs::remove_file(&path).unwrap();
        let theirs = std::os::unix::net::UnixListener::bind(&path).unwrap();
        drop((listener, file));
        assert!(path.exists(), "theirs stays");
        drop(theirs);
    }
}
