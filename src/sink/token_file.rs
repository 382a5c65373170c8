//! Atomic replacement of a file: what a token file needs (SPEC §4.4).
//!
//! The new contents go to a temporary file in the same directory (so the
//! rename cannot cross file systems), created with the wanted mode and
//! flushed to disk; it is then renamed over the target, which readers see
//! switch from the old contents to the new whole, and the directory is
//! flushed so the rename survives a crash. Blocking IO: call it off the
//! runtime's threads.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Temporary files made by this process, to name each one apart.
static TEMPORARIES: AtomicU64 = AtomicU64::new(0);

/// Replaces `path` with `contents`, mode `mode` (e.g. `0o640`), so that a
/// reader sees either the old file or the new one whole. On failure the
/// target is unchanged and no temporary file is left behind.
pub fn write_atomically(path: &Path, contents: &[u8], mode: u32) -> io::Result<()> {
    let temporary = temporary_beside(path)?;
    let written = write_new(&temporary, contents, mode).and_then(|()| fs::rename(&temporary, path));
    if let Err(error) = written {
        let _ = fs::remove_file(&temporary);
        return Err(error);
    }
    sync_directory(path)
}

/// Removes `path`; a file already gone is no error.
pub fn remove(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(error) if error.kind() != io::ErrorKind::NotFound => Err(error),
        _ => Ok(()),
    }
}

/// `DIR/.NAME.tmp-PID-N-RANDOM` for `DIR/NAME`.
fn temporary_beside(path: &Path) -> io::Result<PathBuf> {
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "the path names no file"))?;
    let n = TEMPORARIES.fetch_add(1, Ordering::Relaxed);
    // A random part too: in containers every sidecar is pid 1, and the
    // counter starts again at each run.
    let temporary = format!(
        ".{}.tmp-{}-{n}-{:08x}",
        name.to_string_lossy(),
        std::process::id(),
        rand::random::<u32>()
    );
    Ok(path.with_file_name(temporary))
}

/// A new file at `path` (never an existing one: a leftover is not reused)
/// holding `contents`, with `mode` whatever the umask, flushed to disk.
fn write_new(path: &Path, contents: &[u8], mode: u32) -> io::Result<()> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)?;
    file.set_permissions(fs::Permissions::from_mode(mode))?;
    file.write_all(contents)?;
    file.sync_all()
}

/// Flushes the directory holding `path`, so a rename in it is durable.
fn sync_directory(path: &Path) -> io::Result<()> {
    let directory = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    File::open(directory)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leftovers(dir: &Path) -> Vec<String> {
        fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|name| name.contains(".tmp-"))
            .collect()
    }

    #[test]
    fn writes_replaces_and_sets_the_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        // (contents, mode)
        let cases: [(&[u8], u32); 3] = [
            (b"first\n", 0o640),
            (b"second, longer\n", 0o600),
            (b"", 0o644),
        ];
        for (contents, mode) in cases {
            write_atomically(&path, contents, mode).unwrap();
            assert_eq!(fs::read(&path).unwrap(), contents);
            let meta = fs::metadata(&path).unwrap();
            assert_eq!(meta.permissions().mode() & 0o777, mode);
        }
        assert!(leftovers(dir.path()).is_empty());
        remove(&path).unwrap();
        assert!(!path.exists());
        remove(&path).unwrap();
    }

    #[test]
    fn a_failure_leaves_the_target_and_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        write_atomically(&path, b"good\n", 0o640).unwrap();
        // The target's directory is read-only now: the temporary file
        // cannot be created (root ignores modes, so check that first).
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o500)).unwrap();
        let probe = dir.path().join("probe");
        let writable = File::create(&probe).is_ok();
        let _ = fs::remove_file(&probe);
        if !writable {
            assert!(write_atomically(&path, b"bad\n", 0o640).is_err());
            assert_eq!(fs::read(&path).unwrap(), b"good\n");
        }
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o700)).unwrap();
        // A directory that does not exist.
        let missing = dir.path().join("missing").join("token");
        assert!(write_atomically(&missing, b"x", 0o640).is_err());
        assert!(leftovers(dir.path()).is_empty());
        // A path that names no file.
        assert!(write_atomically(Path::new("/"), b"x", 0o640).is_err());
    }

    #[test]
    fn a_reader_never_sees_a_half_written_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        let versions: Vec<Vec<u8>> = (0..2u8).map(|v| vec![b'a' + v; 64 * 1024]).collect();
        write_atomically(&path, &versions[0], 0o640).unwrap();
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let reader = {
            let (path, done, versions) = (path.clone(), done.clone(), versions.clone());
            std::thread::spawn(move || {
                let mut reads = 0;
                while !done.load(Ordering::Relaxed) && reads < 100_000 {
                    let seen = fs::read(&path).unwrap();
                    assert!(
                        versions.contains(&seen),
                        "a read saw {} bytes of a mix",
                        seen.len()
                    );
                    reads += 1;
                }
                reads
            })
        };
        for i in 0..200 {
            write_atomically(&path, &versions[i % 2], 0o640).unwrap();
        }
        done.store(true, Ordering::Relaxed);
        assert!(reader.join().unwrap() > 0);
        assert!(leftovers(dir.path()).is_empty());
    }
}
