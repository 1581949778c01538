//! Network namespaces for the node-integration tests: a "node" namespace (where iamlet, moto
//! and the fake IMDS run, with its own netfilter tables) and "pod" namespaces joined to it by
//! veth pairs whose route to 169.254.169.254 goes via the node side.
//!
//! Safety rules this module enforces: every namespace is created here (unique name per test,
//! deleted on drop, panics included); code meant for a namespace runs on a thread that has
//! entered it and checked that it is not the host's; nothing here sends a packet from the
//! host namespace, and iptables is only ever run inside a namespace created here.

use crate::process::{Output, run_bounded};
use crate::util::{find_on_path, is_ci};
use nix::sched::{CloneFlags, setns};
use std::fs::File;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::ops::{Deref, DerefMut};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Bound on one `ip`/`iptables` command.
const CMD_TIMEOUT: Duration = Duration::from_secs(30);
/// Connect/read/write bound of [`http_get`].
pub const HTTP_TIMEOUT: Duration = Duration::from_secs(5);

/// Tools the node tests need on PATH (or in /usr/sbin).
const TOOLS: &[&str] = &[
    "ip",
    "iptables-nft",
    "iptables-nft-save",
    "iptables-nft-restore",
    "iptables-legacy",
    "iptables-legacy-save",
    "iptables-legacy-restore",
    "ip6tables-nft",
    "ip6tables-nft-save",
    "ip6tables-nft-restore",
    "conntrack",
];

/// Whether network-namespace tests can run here (root, `ip netns`, the iptables tools,
/// conntrack). Elsewhere than CI a missing piece prints `SKIPPED: <test>: <why>` and returns
/// false; in CI (`CI=true`) it panics, so the tests cannot silently not run.
pub fn available(test: &str) -> bool {
    match blocker() {
        None => true,
        Some(why) if is_ci() => panic!("{test}: network-namespace tests must run in CI: {why}"),
        Some(why) => {
            // Straight to fd 2: the test harness captures `eprintln!` of passing tests.
            let _ = writeln!(std::io::stderr(), "SKIPPED: {test}: {why}");
            false
        }
    }
}

fn blocker() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("needs root (network namespaces and iptables)".into());
    }
    let missing: Vec<&str> = TOOLS
        .iter()
        .copied()
        .filter(|t| tool(t).is_none())
        .collect();
    if !missing.is_empty() {
        return Some(format!(
            "missing tools: {} (apt-get install iproute2 iptables conntrack)",
            missing.join(", ")
        ));
    }
    None
}

/// `name` on PATH or in the sbin directories.
pub fn tool(name: &str) -> Option<std::path::PathBuf> {
    find_on_path(name).or_else(|| {
        ["/usr/sbin", "/sbin", "/usr/local/sbin"]
            .iter()
            .map(|d| std::path::Path::new(d).join(name))
            .find(|p| p.is_file())
    })
}

fn run_ip(args: &[&str]) -> Output {
    let mut cmd = Command::new(tool("ip").expect("ip"));
    cmd.args(args);
    run_bounded(cmd, CMD_TIMEOUT)
}

// === impl Netns ===

/// A network namespace created for one test (`ip netns add`), deleted on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
    /// Kept open so [`InNetns`] values can still enter it while being dropped.
    fd: Arc<File>,
}

impl Netns {
    /// Creates `il-<tag>-<pid>-<n>` with `lo` up.
    pub fn new(tag: &str) -> Netns {
        static N: AtomicU64 = AtomicU64::new(0);
        let name = format!(
            "il-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let out = run_ip(&["netns", "add", &name]);
        assert!(out.success(), "ip netns add {name}: {}", out.stderr);
        let fd = File::open(format!("/run/netns/{name}"))
            .unwrap_or_else(|e| panic!("open /run/netns/{name}: {e}"));
        let ns = Netns {
            name,
            fd: Arc::new(fd),
        };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip -n NAME args...`; panics with the error when it fails.
    pub fn ip(&self, args: &[&str]) {
        let mut all = vec!["-n", &self.name];
        all.extend_from_slice(args);
        let out = run_ip(&all);
        assert!(out.success(), "ip {}: {}", all.join(" "), out.stderr);
    }

    /// Runs `prog args...` inside (`ip netns exec`), bounded; iptables and friends.
    pub fn exec(&self, prog: &str, args: &[&str]) -> Output {
        let mut cmd = Command::new(tool("ip").expect("ip"));
        cmd.args(["netns", "exec", &self.name, prog]).args(args);
        run_bounded(cmd, CMD_TIMEOUT)
    }

    /// As [`Netns::exec`], panicking unless it exits 0.
    pub fn exec_ok(&self, prog: &str, args: &[&str]) -> String {
        let out = self.exec(prog, args);
        assert!(
            out.success(),
            "{prog} {} in {}: {:?} {}{}",
            args.join(" "),
            self.name,
            out.code,
            out.stdout,
            out.stderr
        );
        out.stdout
    }

    /// Runs `f` on a new thread that has entered this namespace (sockets it opens and
    /// processes it spawns live there) and returns its result; a panic in `f` is re-raised.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let fd = Arc::clone(&self.fd);
        std::thread::scope(|s| {
            s.spawn(move || {
                enter(&fd);
                f()
            })
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
        })
    }

    /// Wraps `value` so that it is dropped inside this namespace (e.g. a server whose
    /// shutdown connects to its own address, which must not leave the namespace).
    pub fn own<T: Send + 'static>(&self, value: T) -> InNetns<T> {
        InNetns {
            value: Some(value),
            fd: Arc::clone(&self.fd),
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let out = run_ip(&["netns", "del", &self.name]);
        if !out.success() {
            eprintln!("ip netns del {}: {}", self.name, out.stderr);
        }
    }
}

/// Enters the namespace behind `fd` on this thread and checks it is not the host's.
fn enter(fd: &File) {
    setns(fd, CloneFlags::CLONE_NEWNET).expect("setns into the test namespace");
    let mine = std::fs::read_link("/proc/thread-self/ns/net").expect("own netns");
    let host = std::fs::read_link("/proc/self/ns/net").expect("main thread netns");
    assert_ne!(mine, host, "still in the host network namespace");
}

// === impl InNetns ===

/// A value dropped on a thread inside its namespace (see [`Netns::own`]); if the namespace
/// cannot be entered it is leaked rather than dropped in the host's.
#[derive(Debug)]
pub struct InNetns<T: Send + 'static> {
    value: Option<T>,
    fd: Arc<File>,
}

impl<T: Send + 'static> Deref for InNetns<T> {
    type Target = T;
    fn deref(&self) -> &T {
        self.value.as_ref().expect("present until drop")
    }
}

impl<T: Send + 'static> DerefMut for InNetns<T> {
    fn deref_mut(&mut self) -> &mut T {
        self.value.as_mut().expect("present until drop")
    }
}

impl<T: Send + 'static> Drop for InNetns<T> {
    fn drop(&mut self) {
        let Some(v) = self.value.take() else { return };
        let fd = Arc::clone(&self.fd);
        let _ = std::thread::spawn(move || {
            if setns(&*fd, CloneFlags::CLONE_NEWNET).is_ok() {
                drop(v);
            } else {
                std::mem::forget(v);
            }
        })
        .join();
    }
}

// === topology ===

/// One pod: its namespace and the veth pair to the node.
#[derive(Debug)]
pub struct Pod {
    pub name: String,
    /// The pod's interface name on the node side (what `--host-interface` matches).
    pub iface: String,
    pub ip: Ipv4Addr,
    pub node_ip: Ipv4Addr,
    pub ip6: Ipv6Addr,
    pub ns: Netns,
}

/// Creates a pod namespace joined to `node` by a veth pair named `iface` on the node side and
/// `eth0` in the pod: node 10.200.`subnet`.1/24 and fd00:200:`subnet`::1/64, pod .2 / ::2,
/// the pod's default routes via the node side.
pub fn add_pod(node: &Netns, name: &str, iface: &str, subnet: u8) -> Pod {
    let ns = Netns::new("pod");
    let node_ip = Ipv4Addr::new(10, 200, subnet, 1);
    let ip = Ipv4Addr::new(10, 200, subnet, 2);
    let node_ip6: Ipv6Addr = format!("fd00:200:{subnet}::1").parse().expect("v6");
    let ip6: Ipv6Addr = format!("fd00:200:{subnet}::2").parse().expect("v6");
    node.ip(&[
        "link",
        "add",
        iface,
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        ns.name(),
    ]);
    node.ip(&["addr", "add", &format!("{node_ip}/24"), "dev", iface]);
    node.ip(&[
        "-6",
        "addr",
        "add",
        &format!("{node_ip6}/64"),
        "dev",
        iface,
        "nodad",
    ]);
    node.ip(&["link", "set", iface, "up"]);
    ns.ip(&["addr", "add", &format!("{ip}/24"), "dev", "eth0"]);
    ns.ip(&[
        "-6",
        "addr",
        "add",
        &format!("{ip6}/64"),
        "dev",
        "eth0",
        "nodad",
    ]);
    ns.ip(&["link", "set", "eth0", "up"]);
    ns.ip(&["route", "add", "default", "via", &node_ip.to_string()]);
    ns.ip(&[
        "-6",
        "route",
        "add",
        "default",
        "via",
        &node_ip6.to_string(),
    ]);
    Pod {
        name: name.to_owned(),
        iface: iface.to_owned(),
        ip,
        node_ip,
        ip6,
        ns,
    }
}

/// Adds `addr/prefix` to the node namespace's `lo` (the metadata address, the host IP).
pub fn add_local_address(node: &Netns, addr: &str) {
    if addr.contains(':') {
        node.ip(&["-6", "addr", "add", addr, "dev", "lo", "nodad"]);
    } else {
        node.ip(&["addr", "add", addr, "dev", "lo"]);
    }
}

/// One plain `GET path` with `Host: 169.254.169.254` and `Connection: close` to `addr`;
/// (status, body). Call it inside a namespace ([`Netns::run`]).
pub fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, HTTP_TIMEOUT)?;
    s.set_read_timeout(Some(HTTP_TIMEOUT))?;
    s.set_write_timeout(Some(HTTP_TIMEOUT))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 169.254.169.254\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    parse_response(&raw)
}

/// (status, body) of a raw HTTP/1.1 response.
pub fn parse_response(raw: &[u8]) -> std::io::Result<(u16, String)> {
    let text = String::from_utf8_lossy(raw);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("not an HTTP response: {text:?}"),
            )
        })?;
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_owned();
    Ok((status, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn responses_are_parsed() {
        let (s, b) = parse_response(b"HTTP/1.1 200 OK\r\nServer: EC2ws\r\n\r\nrole").unwrap();
        assert_eq!((s, b.as_str()), (200, "role"));
        assert!(parse_response(b"garbage").is_err());
    }

    #[test]
    fn a_namespace_is_entered_and_removed() {
        if !available("netns::a_namespace_is_entered_and_removed") {
            return;
        }
        let ns = Netns::new("selftest");
        let path = format!("/run/netns/{}", ns.name());
        let lo_only = ns.run(|| {
            // Only lo exists in a fresh namespace.
            std::fs::read_link("/proc/thread-self/ns/net").unwrap()
        });
        assert_ne!(lo_only, std::fs::read_link("/proc/self/ns/net").unwrap());
        drop(ns);
        assert!(!std::path::Path::new(&path).exists());
    }
}
