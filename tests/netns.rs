//! A pod, simulated on one machine with Linux network namespaces (issue
//! 13): the sidecar and a fake Klavi run in a namespace "pod", joined by a
//! veth pair to a namespace "node" that plays kubelet and Prometheus. From
//! "node", the probes answer on the pod's address; the token listener and
//! the proxy, on the pod's loopback, cannot be reached, and nothing the
//! node receives carries the token. From inside "pod", `/token` and the
//! proxy work.
//!
//! It needs root and iproute2's `ip`. Without them it says so and passes,
//! unless `KLAVI_SIDECAR_REQUIRE_NETNS=1` (set by `.ci/run`, where they
//! must be there): then it fails. The namespaces (and with them the veth
//! pair) use this process's pid in their names, are created here and are
//! deleted here, even when an assertion fails. The addresses
//! (10.213.7.0/24, a private range) exist only inside them.

#![allow(clippy::unwrap_used, clippy::expect_used)]
// setns(2) has no safe wrapper in std; one call, on a thread of our own.
#![allow(unsafe_code)]
// Real processes in real namespaces: real time.
#![allow(clippy::disallowed_methods)]

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd as _;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_klavi-token-sidecar");
const POD_IP: &str = "10.213.7.2";
const NODE_IP: &str = "10.213.7.1";

/// Runs `ip ARGS`, panicking with its stderr on failure.
fn ip(args: &[&str]) {
    let output = Command::new("ip").args(args).output().unwrap();
    assert!(
        output.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Why namespaces cannot be used here, if they cannot.
fn unavailable() -> Option<String> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Some("the test is not running as root".into());
    }
    match Command::new("ip").args(["netns", "list"]).output() {
        Ok(output) if output.status.success() => None,
        Ok(output) => Some(format!(
            "`ip netns list` failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        )),
        Err(error) => Some(format!("no `ip` command (install iproute2): {error}")),
    }
}

/// The two namespaces and the processes started in them; all removed on
/// drop, whatever happened.
struct Pod {
    pod: String,
    node: String,
    processes: Vec<Child>,
}

impl Pod {
    fn create() -> Self {
        let id = std::process::id();
        let this = Self {
            pod: format!("ks-pod-{id}"),
            node: format!("ks-node-{id}"),
            processes: Vec::new(),
        };
        // Interface names: at most 15 bytes.
        let (in_pod, in_node) = (format!("ksp{id}"), format!("ksn{id}"));
        ip(&["netns", "add", &this.pod]);
        ip(&["netns", "add", &this.node]);
        ip(&[
            "link", "add", &in_pod, "type", "veth", "peer", "name", &in_node,
        ]);
        ip(&["link", "set", &in_pod, "netns", &this.pod]);
        ip(&["link", "set", &in_node, "netns", &this.node]);
        for (ns, dev, addr) in [
            (&this.pod, &in_pod, POD_IP),
            (&this.node, &in_node, NODE_IP),
        ] {
            ip(&["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", dev]);
            ip(&["-n", ns, "link", "set", dev, "up"]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        this
    }

    /// Starts the binary inside "pod" (`ip netns exec` execs it, so the
    /// child is the binary itself).
    fn start(&mut self, args: &[&str], env: &[(&str, &str)]) {
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", &self.pod, BIN])
            .args(args)
            .env_clear()
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        self.processes.push(command.spawn().unwrap());
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        for child in &mut self.processes {
            let _ = child.kill();
            let _ = child.wait();
        }
        // Deleting a namespace deletes the veth end inside it, and so the
        // pair.
        for ns in [&self.pod, &self.node] {
            let _ = Command::new("ip").args(["netns", "delete", ns]).status();
        }
    }
}

/// Runs `work` on a thread that has entered namespace `ns`: every socket
/// it opens is in that namespace.
fn inside<T: Send + 'static>(ns: &str, work: impl FnOnce() -> T + Send + 'static) -> T {
    let handle = std::fs::File::open(format!("/var/run/netns/{ns}")).unwrap();
    std::thread::spawn(move || {
        // SAFETY: setns with a valid namespace descriptor, which `handle`
        // keeps open for the call; it changes this thread only.
        let entered = unsafe { libc::setns(handle.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(entered, 0, "setns: {}", std::io::Error::last_os_error());
        work()
    })
    .join()
    .unwrap()
}

/// One HTTP/1.1 exchange; the status and the whole answer, or the
/// connection error.
fn http(addr: &str, request: &str) -> Result<(u16, String), std::io::Error> {
    let addr: SocketAddr = addr.parse().unwrap();
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.write_all(request.as_bytes())?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    let status = answer.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    Ok((status, answer))
}

fn get(addr: &str, path: &str, headers: &str) -> Result<(u16, String), std::io::Error> {
    http(
        addr,
        &format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n{headers}Connection: close\r\n\r\n"),
    )
}

#[test]
fn the_token_never_leaves_the_pods_loopback() {
    if let Some(why) = unavailable() {
        let required = std::env::var("KLAVI_SIDECAR_REQUIRE_NETNS").is_ok_and(|v| v == "1");
        assert!(
            !required,
            "network namespaces are required here (KLAVI_SIDECAR_REQUIRE_NETNS=1) but not \
             available: {why}"
        );
        eprintln!("SKIPPED the pod simulation: network namespaces are not available: {why}");
        return;
    }
    let mut pod = Pod::create();
    // Fixed ports: the namespaces are new, so nothing else holds them.
    pod.start(
        &["fake-klavi", "--listen", "127.0.0.1:18088"],
        &[("RUST_LOG", "warn")],
    );
    pod.start(
        &[
            "run",
            "--listen",
            "127.0.0.1:8089",
            "--ops-listen",
            "0.0.0.0:8090",
        ],
        &[
            ("KLAVI_ACCESS_KEY", "demo-access-key"),
            ("KLAVI_SECRET_KEY", "demo-secret-key"),
            ("KLAVI_SIDECAR_KLAVI__BASE_URL", "http://127.0.0.1:18088"),
            ("KLAVI_SIDECAR_KLAVI__PROXY_LISTEN", "127.0.0.1:8091"),
            ("RUST_LOG", "warn"),
        ],
    );
    let pod_ops = format!("{POD_IP}:8090");

    // From the node, as kubelet: the probes on the pod's address.
    let node = pod.node.clone();
    let ops = pod_ops.clone();
    let probes = inside(&node, move || {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match get(&ops, "/readyz", "") {
                Ok((200, _)) => break,
                _ if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
                other => panic!("never ready from the node: {other:?}"),
            }
        }
        let answers: Vec<_> = ["/healthz", "/readyz", "/metrics", "/token"]
            .iter()
            .map(|path| get(&ops, path, "Klavi-Sidecar: true\r\n").unwrap())
            .collect();
        answers
    });
    assert_eq!(probes[0].0, 200, "{}", probes[0].1);
    assert_eq!(probes[1].0, 200, "{}", probes[1].1);
    assert_eq!(probes[2].0, 200);
    assert!(probes[2].1.contains("klavi_sidecar_ready"));
    assert_eq!(probes[3].0, 404, "the ops listener never serves a token");

    // From the node, the token listener and the proxy do not exist.
    let node_view = inside(&node, || {
        [
            format!("{POD_IP}:8089"),
            format!("{POD_IP}:8091"),
            "127.0.0.1:8089".to_string(),
            "127.0.0.1:8091".to_string(),
        ]
        .map(|addr| {
            (
                addr.clone(),
                get(&addr, "/token", "Klavi-Sidecar: true\r\n"),
            )
        })
    });
    for (addr, answer) in &node_view {
        let error = answer.as_ref().expect_err(addr);
        assert_eq!(
            error.kind(),
            std::io::ErrorKind::ConnectionRefused,
            "{addr}: {error}"
        );
    }

    // Inside the pod, as the app: the token, and Klavi through the proxy.
    let app_view = inside(&pod.pod, || {
        let token = get(
            "127.0.0.1:8089",
            "/token",
            "Klavi-Sidecar: true\r\nAccept: text/plain\r\n",
        );
        let proxied = get(
            "127.0.0.1:8091",
            "/payment/customer/v1/payments",
            "Klavi-Sidecar: true\r\n",
        );
        let ops_by_pod_address = get(&format!("{POD_IP}:8090"), "/healthz", "");
        (token, proxied, ops_by_pod_address)
    });
    let (status, answer) = app_view.0.unwrap();
    assert_eq!(status, 200, "{answer}");
    let token = answer.rsplit("\r\n\r\n").next().unwrap().to_string();
    assert!(token.len() > 20, "{token:?}");
    let (status, answer) = app_view.1.unwrap();
    assert_eq!(status, 200, "{answer}");
    assert!(answer.contains(r#""bearerValid":true"#), "{answer}");
    assert_eq!(app_view.2.unwrap().0, 200);

    // Nothing the node received carries the token.
    for (status, answer) in &probes {
        assert!(
            !answer.contains(&token),
            "{status}: the token reached the node"
        );
    }
    drop(pod);
    let left = Command::new("ip").args(["netns", "list"]).output().unwrap();
    let left = String::from_utf8_lossy(&left.stdout);
    assert!(!left.contains(&node), "namespaces deleted: {left}");
}
