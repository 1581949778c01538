//! Who holds a TCP port: listening sockets from /proc/net/tcp{,6} (this network namespace)
//! matched to processes through /proc/PID/fd links, for the one-sentence "port in use" error
//! and `doctor`.

use std::collections::BTreeSet;
use std::fmt;
use thiserror::Error;

/// A process holding a listening socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    pub pid: u32,
    /// `/proc/PID/comm` (the executable's name, at most 15 bytes).
    pub name: String,
}

impl fmt::Display for Holder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (pid {})", self.name, self.pid)
    }
}

/// Socket inodes listening on `port` in a /proc/net/tcp-format `text`.
pub fn parse_listeners(text: &str, port: u16) -> BTreeSet<u64> {
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            // sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
            let local = f.get(1)?;
            let st = f.get(3)?;
            let inode = f.get(9)?.parse::<u64>().ok()?;
            let p = u16::from_str_radix(local.rsplit_once(':')?.1, 16).ok()?;
            (*st == "0A" && p == port && inode != 0).then_some(inode)
        })
        .collect()
}

/// Listening socket inodes on `port` (IPv4 and IPv6).
pub fn listeners(port: u16) -> BTreeSet<u64> {
    ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .flat_map(|t| parse_listeners(&t, port))
        .collect()
}

/// Whether something listens on `port` in this network namespace.
pub fn in_use(port: u16) -> bool {
    !listeners(port).is_empty()
}

/// Processes holding any of `inodes` (those whose /proc/PID/fd this process may read).
pub fn holders(inodes: &BTreeSet<u64>) -> Vec<Holder> {
    let mut out = Vec::new();
    if inodes.is_empty() {
        return out;
    }
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return out;
    };
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(p.path().join("fd")) else {
            continue;
        };
        let holds = fds.flatten().any(|fd| {
            std::fs::read_link(fd.path()).is_ok_and(|l| {
                l.to_str()
                    .and_then(|s| s.strip_prefix("socket:["))
                    .and_then(|s| s.strip_suffix(']'))
                    .and_then(|s| s.parse::<u64>().ok())
                    .is_some_and(|i| inodes.contains(&i))
            })
        });
        if holds {
            let name = std::fs::read_to_string(p.path().join("comm"))
                .map(|s| s.trim().to_owned())
                .unwrap_or_else(|_| "?".into());
            out.push(Holder { pid, name });
        }
    }
    out
}

/// The processes listening on `port`, when they can be found.
pub fn holder_of(port: u16) -> Vec<Holder> {
    holders(&listeners(port))
}

/// A port another process holds: the bind would fail, or (with SO_REUSEPORT) share it.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{}", in_use_sentence(*.port, .flag, .holders))]
pub struct PortInUse {
    pub port: u16,
    pub flag: &'static str,
    pub holders: Vec<Holder>,
}

/// The one sentence for a port that is taken: the port, who holds it, the flags to change.
pub fn in_use_sentence(port: u16, flag: &str, holders: &[Holder]) -> String {
    let who = match holders {
        [] => String::new(),
        [h] => format!(" (held by {h})"),
        hs => format!(
            " (held by {})",
            hs.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    format!(
        "port {port} ({flag}) is already in use on this node{who}; free it or choose other ports with --app-port and --metrics-port (and the DaemonSet's hostPort), e.g. --app-port=8182 --metrics-port=8183"
    )
}

/// Before binding `port`: Err (the in-use sentence) when a process other than iamlet already
/// listens on it — with SO_REUSEPORT on both sides the bind would succeed and the kernel would
/// silently split connections between them. Another iamlet (an upgrade overlapping with its
/// predecessor) is allowed and logged. Port 0 and holders not visible from here pass (the
/// bind itself then decides).
pub fn check_not_shared(port: u16, flag: &'static str) -> Result<(), PortInUse> {
    if port == 0 {
        return Ok(());
    }
    let holders = holder_of(port);
    if holders.iter().any(|h| h.name != "iamlet") {
        return Err(PortInUse {
            port,
            flag,
            holders,
        });
    }
    for h in &holders {
        tracing::warn!(port, holder = %h, "another iamlet listens on this port; connections are shared until it exits");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const TCP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:1FF5 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4242 1 0000000000000000 100 0 0 10 0
   1: 0100007F:1FF5 0100007F:D431 01 00000000:00000000 00:00000000 00000000     0        0 0 1 0000000000000000 20 4 30 10 -1
   2: 0100007F:0050 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 777 1 0000000000000000 100 0 0 10 0
";
    const TCP6: &str = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000000000000:1FF5 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 5151 1 0000000000000000 100 0 0 10 0
";

    #[test]
    fn listening_sockets_by_port() {
        assert_eq!(parse_listeners(TCP, 8181), BTreeSet::from([4242]));
        assert_eq!(parse_listeners(TCP, 80), BTreeSet::from([777]));
        assert!(parse_listeners(TCP, 8182).is_empty());
        assert_eq!(parse_listeners(TCP6, 8181), BTreeSet::from([5151]));
    }

    #[test]
    fn sentence_names_port_holder_and_flags() {
        let s = in_use_sentence(
            8181,
            "--app-port",
            &[Holder {
                pid: 42,
                name: "kube2iam".into(),
            }],
        );
        assert_eq!(
            s,
            "port 8181 (--app-port) is already in use on this node (held by kube2iam (pid 42)); free it or choose other ports with --app-port and --metrics-port (and the DaemonSet's hostPort), e.g. --app-port=8182 --metrics-port=8183"
        );
        assert!(!in_use_sentence(8181, "--app-port", &[]).contains("held by"));
    }

    #[test]
    fn finds_this_process_holding_a_listener() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let h = holder_of(port);
        assert!(h.iter().any(|h| h.pid == std::process::id()), "{h:?}");
        assert!(in_use(port));
        let e = check_not_shared(port, "--app-port")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with(&format!("port {port} (--app-port) is already in use")),
            "{e}"
        );
        assert_eq!(check_not_shared(0, "--app-port"), Ok(()));
    }
}
