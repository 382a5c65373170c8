//! A real `redis-server` for the fleet's tests and simulation, on a free
//! loopback port (never 6379), with no persistence, stopped by its pid.
//!
//! On a machine without `redis-server`, [`RedisServer::start`] returns
//! `None` after printing a skip line, unless `CI` is set: then it panics
//! with how to install it, so CI cannot pass by skipping.

// Waiting for a real process to answer takes real time.
#![allow(clippy::disallowed_methods)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// How to get `redis-server` on Debian or Ubuntu.
pub const INSTALL_HINT: &str = "install it with `apt-get install redis-server` (Debian/Ubuntu)";

/// A running `redis-server`.
#[derive(Debug)]
pub struct RedisServer {
    child: Option<Child>,
    addr: SocketAddr,
    dir: PathBuf,
    extra: Vec<String>,
}

fn binary() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain([
            "/usr/bin".into(),
            "/usr/sbin".into(),
            "/usr/local/bin".into(),
        ])
        .map(|dir| dir.join("redis-server"))
        .find(|candidate| candidate.is_file())
}

fn free_port() -> std::io::Result<u16> {
    // Never 6379: a developer's own Redis may be there.
    for _ in 0..20 {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        if port != 6379 {
            return Ok(port);
        }
    }
    Err(std::io::Error::other("no free port"))
}

impl RedisServer {
    /// Starts one for the test `who`, or says why not (see the module).
    pub fn start(who: &str) -> Option<Self> {
        Self::start_with(who, &[])
    }

    /// As [`Self::start`], also serving TLS on a second free port with
    /// this certificate and key (clients are not asked for one); the plain
    /// port stays for the harness's own checks.
    pub fn start_tls(who: &str, cert: &str, key: &str) -> Option<(Self, u16)> {
        let port = free_port().unwrap_or_else(|e| panic!("{who}: {e}"));
        let port_text = port.to_string();
        let args = [
            "--tls-port",
            port_text.as_str(),
            "--tls-cert-file",
            cert,
            "--tls-key-file",
            key,
            "--tls-auth-clients",
            "no",
        ];
        Self::start_with(who, &args).map(|server| (server, port))
    }

    /// As [`Self::start`], with more `redis-server` arguments.
    pub fn start_with(who: &str, extra: &[&str]) -> Option<Self> {
        if binary().is_none() {
            if std::env::var_os("CI").is_some() {
                panic!("{who}: redis-server is not installed and CI is set; {INSTALL_HINT}");
            }
            eprintln!("SKIPPED {who}: redis-server is not installed; {INSTALL_HINT}");
            return None;
        }
        let port = free_port().unwrap_or_else(|e| panic!("{who}: {e}"));
        let dir = std::env::temp_dir().join(format!("klavi-redis-{}-{port}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let mut server = Self {
            child: None,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            dir,
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        server.spawn().unwrap_or_else(|e| panic!("{who}: {e}"));
        Some(server)
    }

    fn spawn(&mut self) -> Result<(), String> {
        let redis = binary().ok_or("redis-server is gone")?;
        let child = Command::new(redis)
            .args(["--bind", "127.0.0.1", "--port"])
            .arg(self.addr.port().to_string())
            .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .args(&self.extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start redis-server: {e}"))?;
        self.child = Some(child);
        // Up to 10 s for it to answer PING.
        for _ in 0..500 {
            if self.ping() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(format!("redis-server on {} never answered", self.addr))
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://{}", self.addr)
    }

    /// Its address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Its pid, while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether it answers `PING` now.
    pub fn ping(&self) -> bool {
        let Ok(mut stream) = TcpStream::connect_timeout(&self.addr, Duration::from_millis(200))
        else {
            return false;
        };
        let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
        if stream.write_all(b"PING\r\n").is_err() {
            return false;
        }
        let mut reply = [0u8; 7];
        stream.read_exact(&mut reply).is_ok() && &reply == b"+PONG\r\n"
    }

    /// Stops it (SIGKILL: an abrupt loss, as when its node dies); its data
    /// is gone.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port, empty.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn().unwrap_or_else(|e| panic!("{e}"));
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
